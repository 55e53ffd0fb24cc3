"""Deployable artifacts: ``model.so`` plus a manifest that pins every file by SHA-256.

What the manifest guarantees: integrity, not authenticity. It catches a file
corrupted or changed since the compile (a bad copy, a truncated download, an
edit), because its SHA-256 no longer matches. It proves nothing about who made
the artifact: the manifest is not signed, so anyone who can write the folder
can rewrite the manifest to match their own files. Trust an artifact folder as
much as you trust whoever can write to it.

What loading guarantees: :func:`load_artifact` runs exactly the bytes it
verified. Before anything is loaded, every file the manifest lists is hashed,
and a folder holding anything else (a file the manifest does not list, a
symbolic link, a manifest entry outside the folder) is refused: optc never
loads a file it did not check. The library is then read once, hashed as it
is read, and those bytes are copied into a private sealed memory file
(``memfd``; where there is none, a file in a folder only this user can open),
which is what TVM loads; replacing ``model.so`` on disk after the check
changes nothing. ``optc bench`` reads ``model.onnx`` (and its external data)
the same way before comparing with it. Loading also refuses a machine whose CPU
lacks a feature the library's code uses (``runtime.cpu``, written by
:mod:`optc.targets.cpu_features`). These checks are those of the deployed runner
(:mod:`optc.targets.deploy.run_artifact`), imported from it.

Files optc writes beside the manifest after it: ``pipeline.yaml`` and the
output folder's ``.optc-output.json`` (see :mod:`optc.driver`); no other file
may be unlisted.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from optc import __version__
from optc.errors import ConfigError, OptcError, TargetError
from optc.ir.io import open_regular_file
from optc.ir.model import Model
from optc.targets.deploy.run_artifact import Refused, apply_env, check_cpu, check_feeds, hash_stream, place_verified, read_npy, share_thread_pool, vm_outputs
from optc.targets.spec import TargetSpec

MANIFEST = "manifest.json"
LIBRARY = "model.so"
# Written into the output folder after the manifest (by optc.api.compile and optc.driver.Staging.publish).
WRITTEN_AFTER_MANIFEST = frozenset({MANIFEST, "pipeline.yaml", ".optc-output.json"})


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hash_stream(f)


# How optc runs its artifacts, and what a deployer should set before loading one (README, "Threads"):
# oneDNN's OpenMP threads and TVM's pool share the cores. OpenMP threads spin briefly between
# back-to-back kernels, then sleep; TVM's workers sleep at once. Measured at 2 threads (ResNet-18 /
# BERT-shaped, ratio to onnxruntime in the same process): this setting 1.02 / 1.03 quiet, 1.08 / 0.94
# with two busy processes on the cores; OMP_WAIT_POLICY=PASSIVE 1.03 / 1.56 quiet, 0.82 / 0.68
# loaded; ACTIVE doubles onnxruntime's own latency beside it.
RUNTIME_ENV = {"GOMP_SPINCOUNT": "100000", "TVM_THREAD_POOL_SPIN_COUNT": "0"}


def apply_runtime_env() -> None:
    """Set :data:`RUNTIME_ENV` where the user has not (read by OpenMP and TVM when they start: call before loading)."""
    apply_env(RUNTIME_ENV)


@contextlib.contextmanager
def _refusal_as(error: type[OptcError], prefix: str = "") -> Iterator[None]:
    """The deployed runner's refusals (:mod:`optc.targets.deploy.run_artifact`) as optc errors: one line, exit 2."""
    try:
        yield
    except Refused as exc:
        raise error(f"{prefix}{exc}") from exc


def check_libraries(manifest: Mapping[str, Any]) -> None:
    """Refuse, in one line, an artifact whose vendor library is missing here (instead of an undefined-symbol error)."""
    for lib in (manifest.get("runtime") or {}).get("libraries") or ():
        if lib.get("name") == "oneDNN":
            from optc.targets.providers.onednn import check_runtime

            check_runtime(str(lib.get("version") or ""))
        else:
            raise TargetError(f"this artifact needs {lib.get('name')!r}, which this optc does not know how to check")


def io_specs(model: Model) -> dict[str, list[dict[str, Any]]]:
    """The manifest's ``inputs`` and ``outputs``: what :meth:`LoadedArtifact.run` takes and returns."""
    def spec(s: Any) -> dict[str, Any]:
        return {"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape or ())}

    return {"inputs": [spec(s) for s in model.inputs], "outputs": [spec(s) for s in model.outputs]}


def write_manifest(folder: Path, model: Model, spec: TargetSpec, libraries: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """Hash every file already in ``folder`` (the manifest is written last); ``libraries``: the vendor libraries model.so needs."""
    import tvm
    from optc.targets.cpu_features import required_cpu

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": "optc-artifact/1",
        "optc_version": __version__,
        "tvm_version": tvm.__version__,
        "target": spec.to_dict(),
        "library": LIBRARY,
        "runtime": {"libraries": [dict(lib) for lib in libraries], "env": RUNTIME_ENV, "cpu": required_cpu(spec)},
        **io_specs(model),
        "files": {p.relative_to(folder).as_posix(): sha256(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_verified_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, once every file it lists matches its SHA-256 and nothing else is in ``folder``."""
    manifest = _read_manifest(folder)
    _check_files(folder, manifest, unchecked=())
    return manifest


def _read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, its names checked (inside the folder, the library listed); no file hashed yet."""
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"{folder}: no {MANIFEST}; not an optc artifact (compile with --target x86|arm|gpu)")
    try:
        with _open_listed(folder, MANIFEST) as f:
            manifest = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {getattr(exc, 'msg', exc)}") from exc
    except RecursionError as exc:  # [[[[...: Python's parser recurses per level
        raise ConfigError(f"{path}: nested too deeply to be a manifest") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        raise ConfigError(f"{path}: no 'files' table of names and SHA-256 digests")
    for name in files:
        if not _inside(name):
            raise ConfigError(f"{path}: names '{name}', outside the artifact folder")
    if manifest.get("library") not in files:
        raise ConfigError(f"{path}: the library is not covered by the manifest")
    return manifest


def _check_files(folder: Path, manifest: Mapping[str, Any], unchecked: Collection[str]) -> None:
    """Refuse unlisted files, then hash every listed file but ``unchecked`` (those are hashed as they are copied)."""
    _refuse_unlisted(folder, manifest["files"])
    for name, digest in manifest["files"].items():
        if name in unchecked:
            continue
        with _open_listed(folder, name) as f:
            actual = hash_stream(f)
        if actual != digest:
            raise ConfigError(f"{folder}: '{name}' does not match its SHA-256 in the manifest; refusing to load it")


def _inside(name: Any) -> bool:
    rel = PurePosixPath(name) if isinstance(name, str) else None
    return rel is not None and not rel.is_absolute() and ".." not in rel.parts and name not in ("", ".")


def _refuse_unlisted(folder: Path, files: Mapping[str, str]) -> None:
    """Refuse a symbolic link anywhere in the folder, and any file or folder the manifest does not account for."""
    listed = set(files)
    parents = {str(p) for name in listed for p in PurePosixPath(name).parents if str(p) != "."}
    for root, dirnames, filenames in os.walk(folder):
        base = PurePosixPath(Path(root).relative_to(folder).as_posix())
        for name in dirnames:
            rel = str(base / name)
            if os.path.islink(os.path.join(root, name)):
                raise ConfigError(f"{folder}: '{rel}' is a symbolic link; an artifact folder holds only the files its manifest lists")
            if rel not in parents:
                raise ConfigError(f"{folder}: '{rel}/' is not listed in the manifest; refusing to load an artifact folder holding files it does not cover")
        for name in filenames:
            rel = str(base / name)
            if os.path.islink(os.path.join(root, name)):
                raise ConfigError(f"{folder}: '{rel}' is a symbolic link; an artifact folder holds only the files its manifest lists")
            if rel not in listed and rel not in WRITTEN_AFTER_MANIFEST:
                raise ConfigError(f"{folder}: '{rel}' is not listed in the manifest; refusing to load an artifact folder holding files it does not cover")


@contextlib.contextmanager
def _open_listed(folder: Path, name: str) -> Iterator[BinaryIO]:
    """Open a file of the artifact: a regular file, not through a symbolic link."""
    try:
        f = open_regular_file(folder / name, follow_symlinks=False)
    except FileNotFoundError:
        raise ConfigError(f"{folder}: '{name}' listed in the manifest is missing") from None
    except OSError as exc:
        raise ConfigError(f"{folder}: '{name}' cannot be read: {exc.strerror or exc}") from exc
    with f:
        yield f


@dataclass
class VerifiedArtifact:
    """An artifact whose files matched the manifest, with private copies of the ones to be read.

    ``private`` is a folder only this user can open; the library's bytes are in
    a sealed memory file where the system has them (``memfd``). Nothing here
    reads the artifact folder again. :meth:`close` removes the copies.
    """

    folder: Path
    manifest: dict[str, Any]
    private: Path
    library_fd: int | None = None  # the sealed memfd holding the library
    copies: dict[str, Path] = field(default_factory=dict)  # manifest name -> private copy

    def library_path(self) -> Path:
        """A path TVM can load the verified library from (named ``.so``: TVM picks its loader by suffix)."""
        return self.copies[self.manifest["library"]]

    def close(self) -> None:
        if self.library_fd is not None:
            os.close(self.library_fd)
            self.library_fd = None
        shutil.rmtree(self.private, ignore_errors=True)

    def __enter__(self) -> VerifiedArtifact:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def verify_artifact(folder: Path, *, also_copy: Collection[str] = ()) -> VerifiedArtifact:
    """Check ``folder`` against its manifest and make private copies of the library and of ``also_copy``.

    Each copied file is read once; its hash is taken over the very bytes
    written to the copy, and a mismatch is refused before the copy is used.
    """
    manifest = _read_manifest(folder)
    library = manifest["library"]
    missing = [n for n in also_copy if n not in manifest["files"]]
    if missing:
        raise ConfigError(f"{folder}: '{missing[0]}' is not listed in the manifest")
    copied = list(dict.fromkeys([library, *also_copy]))
    _check_files(folder, manifest, unchecked=copied)
    verified = VerifiedArtifact(folder, manifest, Path(tempfile.mkdtemp(prefix="optc-artifact-")))
    try:
        for name in copied:
            target = verified.private / PurePosixPath(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            with _open_listed(folder, name) as f, _refusal_as(ConfigError):
                fd = place_verified(f, manifest["files"][name], f"{folder}: '{name}'", target, in_memory=name == library)
            if fd is not None:
                verified.library_fd = fd
            verified.copies[name] = target
    except BaseException:
        verified.close()
        raise
    return verified


@dataclass
class LoadedArtifact:
    manifest: dict[str, Any]
    vm: Any
    device: Any
    _main: Any = field(default=None, init=False, repr=False)  # the VM's entry, looked up once
    # One device tensor per input, refilled each run when the caller's array cannot be lent to the VM
    # as it is (TVM's kernels assume 64-byte aligned buffers): copying into it costs 10 us, allocating 25.
    # Outputs are copied out before run returns, so nothing the caller holds aliases the VM's memory.
    # Like the VM itself, not for concurrent runs.
    _inputs: list[Any] = field(default_factory=list, init=False, repr=False)
    _specs: list[tuple[str, tuple[int, ...], np.dtype]] = field(default_factory=list, init=False, repr=False)
    _views: list[np.ndarray | None] = field(default_factory=list, init=False, repr=False)  # numpy views of _inputs on the host
    _output_names: list[str] = field(default_factory=list, init=False, repr=False)
    _from_dlpack: Any = field(default=None, init=False, repr=False)
    _lent: list[tuple[np.ndarray, Any] | None] = field(default_factory=list, init=False, repr=False)  # (array, its DLPack view)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs by name. On a 0.05 ms model the wrapping was a tenth of the time, so the common case (the manifest's
        arrays, C-contiguous; 64-byte aligned ones lent to the VM by DLPack, others copied) is checked inline.
        The arrays last passed are kept (one per input) until the next run passes others."""
        if self._main is None:
            self._prepare()
        values = [feeds.get(name) for name, _, _ in self._specs]
        if len(feeds) != len(self._specs) or not all(
                type(v) is np.ndarray and v.shape == shape and v.dtype == dtype and v.flags.c_contiguous
                for v, (_, shape, dtype) in zip(values, self._specs)):
            with _refusal_as(ConfigError):
                values = check_feeds(self.manifest["inputs"], feeds)
        args = []
        for i, (buffer, view, value) in enumerate(zip(self._inputs, self._views, values)):
            if view is None:
                buffer.copyfrom(value)  # device memory
            else:
                lent = self._lent[i]
                if lent is None or lent[0] is not value:
                    # TVM's kernels assume 64-byte aligned buffers. Reading the address costs 1 us, so the answer (and the
                    # DLPack view) is kept for the array last passed here: while it is held, numpy cannot move its data.
                    lent = self._lent[i] = (value, self._from_dlpack(value) if value.ctypes.data % 64 == 0 else None)
                if lent[1] is not None:
                    buffer = lent[1]
                else:
                    np.copyto(view, value)  # 1 us where copyfrom takes 10-20
            args.append(buffer)
        return {name: _to_numpy(v) for name, v in zip(self._output_names, vm_outputs(self._main(*args)))}

    def _prepare(self) -> None:
        import tvm
        import tvm_ffi

        self._main = self.vm["main"]
        self._from_dlpack = tvm_ffi.from_dlpack
        self._specs = [(s["name"], tuple(s["shape"]), np.dtype(s["dtype"])) for s in self.manifest["inputs"]]
        self._output_names = [s["name"] for s in self.manifest["outputs"]]
        self._inputs = [tvm.runtime.empty(shape, dtype.name, self.device) for _, shape, dtype in self._specs]
        on_cpu = self.device.dlpack_device_type() == tvm.cpu().dlpack_device_type()
        self._views = [_host_view(b) if on_cpu else None for b in self._inputs]
        self._lent = [None] * len(self._inputs)


def _host_view(tensor: Any) -> np.ndarray | None:
    """A writable numpy view of a host tensor; None where numpy cannot take it by DLPack."""
    try:
        view = np.from_dlpack(tensor)
    except (TypeError, RuntimeError, BufferError):
        return None
    return view if view.flags.writeable else None


def _to_numpy(tensor: Any) -> np.ndarray:
    """A copy of a VM output: through DLPack (1 us) where the tensor is on the host, else ``numpy()`` (10 us)."""
    try:
        return np.from_dlpack(tensor).copy()
    except (TypeError, RuntimeError, BufferError):  # device memory, or a dtype numpy's DLPack import lacks
        return tensor.numpy()


def load_artifact(folder: Path) -> LoadedArtifact:
    """Verify the artifact against its manifest, then load the verified library bytes into a Relax VM."""
    with verify_artifact(folder) as verified:
        return load_verified(verified)


def load_verified(verified: VerifiedArtifact) -> LoadedArtifact:
    """Load the library from ``verified``'s private copy (never from the artifact folder)."""
    from optc.targets.support import require_tvm

    manifest = verified.manifest
    with _refusal_as(TargetError):
        check_cpu(manifest)  # before TVM's import (seconds): a machine that cannot run the code is told so at once
    require_tvm()
    import tvm
    import tvm_ffi
    from tvm import relax

    kind = manifest["target"]["device"]
    device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    if kind == "cuda" and not device.exist:
        raise TargetError("this artifact is for a CUDA GPU and none is present here")
    if manifest["target"]["name"] == "arm":
        import platform

        if platform.machine() not in ("aarch64", "arm64"):
            raise TargetError("this artifact is for aarch64; run it on an ARM board (or under qemu-aarch64)")
    apply_runtime_env()  # first: OpenMP reads GOMP_SPINCOUNT once, when libgomp loads, and check_libraries loads oneDNN's
    check_libraries(manifest)
    # tvm_ffi's loader, not tvm.runtime.load_module: that one resolves symbolic links, and the
    # memfd behind ours has no path of its own that ends in ".so".
    try:
        lib = tvm_ffi.load_module(str(verified.library_path()))
        share_thread_pool(lib)
        vm = relax.VirtualMachine(lib, device)
    except RuntimeError as exc:  # it matched the manifest, but is no library of this machine or no TVM module
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"{verified.folder}: '{manifest['library']}' matches the manifest but cannot be loaded: {first}") from exc
    return LoadedArtifact(manifest, vm, device)


def run_artifact_files(artifact: Path, inputs: Sequence[str], output: Path | None = None) -> list[str]:
    """``optc run``: feeds from ``NAME=FILE.npy`` items, outputs to an ``.npz``; returns one summary line per output."""
    feeds = {}
    for item in inputs:
        name, eq, file = item.partition("=")
        if not eq:
            raise ConfigError(f"--input {item}: expected NAME=FILE.npy")
        feeds[name] = _read_npy(file, f"--input {item}")
    outputs = load_artifact(artifact).run(feeds)
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp.npz")
        np.savez(tmp, **outputs)
        tmp.replace(output)
    return [f"{name}: {value.dtype} {list(value.shape)} first values {np.round(value.ravel()[:5], 5).tolist()}" for name, value in outputs.items()]


def _read_npy(file: str, where: str) -> np.ndarray:
    """One ``.npy`` array, opened as a regular file (a FIFO or device cannot hang or flood the run)
    and refused when its header declares more data than the file holds (before allocating it)."""
    with _refusal_as(ConfigError, f"{where}: "):
        return read_npy(file)
