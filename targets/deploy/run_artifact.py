#!/usr/bin/env python3
"""Run an optc artifact with numpy and TVM's runtime alone (no optc, onnx or onnxruntime).

Copy this one file to the machine that runs the artifact::

    python run_artifact.py ARTIFACT --input NAME=FILE.npy ... [--output OUT.npz|OUT.npy] [--repeats N]

Before anything runs, it checks what the artifact's ``manifest.json`` states:

- integrity: ``model.so`` is read once, hashed as it is read, into a sealed memory file
  (``memfd``), and that is what TVM loads, so a library swapped after the check cannot run.
  Integrity, not authenticity: the manifest is not signed, and whoever can write the folder
  can rewrite it;
- the machine: its architecture, and every CPU feature the library's code uses
  (``runtime.cpu``; manifests without it are from before optc recorded it, and load);
- the inputs: every input the manifest names, with its dtype and shape, in its order.

It then sets the variables of ``runtime.env`` that the user has not set (they steer OpenMP's
and TVM's thread pools, and are read when those start), loads the library into a Relax VM
and runs ``main``. A refusal is one line on stderr and exit code 2; a failure inside TVM, one
line and exit code 1.

optc imports these checks from here (:mod:`optc.targets.artifact`): ``optc run`` and this
runner refuse the same things in the same words. So this file must import nothing but the
standard library, numpy and (when it runs a model) TVM.
"""
from __future__ import annotations

import argparse
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class Refused(Exception):
    """The artifact, this machine or an input is not what the manifest says (one line, exit code 2)."""


# --- files ---------------------------------------------------------------------------------------

def open_regular(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> BinaryIO:
    """Open ``path`` for reading if it is a regular file.

    The type is checked before the open (a device is never opened) and again on the descriptor;
    ``O_NONBLOCK`` keeps a FIFO from hanging the open.
    """
    if not stat.S_ISREG(os.stat(path, follow_symlinks=follow_symlinks).st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def hash_stream(f: BinaryIO, sink: int | None = None) -> str:
    """The SHA-256 of what is left in ``f``, writing each chunk to the open file ``sink`` as it is hashed."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        digest.update(chunk)
        view = memoryview(chunk)
        while sink is not None and view:
            view = view[os.write(sink, view):]
    return digest.hexdigest()


def place_verified(f: BinaryIO, digest: str, what: str, target: Path, *, in_memory: bool) -> int | None:
    """Copy ``f`` to ``target`` (a new file in a private folder), hashing exactly the bytes copied.

    With ``in_memory``, where the system has sealable memory files, the bytes go to a ``memfd``
    sealed against any change and ``target`` is a link to it; that descriptor is returned (the
    caller closes it once the library is loaded). A SHA-256 other than ``digest`` is refused
    (``what`` names the file), and ``target`` removed, before anything can use it.
    """
    fd = _sealable_memfd(target.name) if in_memory else None
    if fd is None:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            _check_digest(hash_stream(f, out), digest, what)
        except BaseException:
            target.unlink()
            raise
        finally:
            os.close(out)
        return None
    try:
        _check_digest(hash_stream(f, fd), digest, what)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        target.symlink_to(f"/proc/{os.getpid()}/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _sealable_memfd(name: str) -> int | None:
    if not hasattr(os, "memfd_create") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return None
    try:
        return os.memfd_create(f"optc-{name}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None


def _check_digest(actual: str, expected: str, what: str) -> None:
    if actual != expected:
        raise Refused(f"{what} does not match its SHA-256 in the manifest; refusing to load it")


def read_npy(file: str) -> np.ndarray:
    """One ``.npy`` array; refused when its header declares more data than the file holds (before allocating it)."""
    from numpy.lib import format as npy

    try:
        with open_regular(file) as f:
            version = npy.read_magic(f)
            shape, _, dtype = npy.read_array_header_1_0(f) if version == (1, 0) else npy.read_array_header_2_0(f)
            if dtype.hasobject:
                raise ValueError("object arrays are not read (they would need pickle)")
            declared = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if declared > os.fstat(f.fileno()).st_size - f.tell():
                raise ValueError(f"its header declares {list(shape)} {dtype}, more than the file holds")
            f.seek(0)
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read {file}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}") from exc


# --- the manifest's promises ------------------------------------------------------------------------

def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest, with the fields a runner needs (the library's name and SHA-256, the inputs)."""
    try:
        with open_regular(folder / MANIFEST, follow_symlinks=False) as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise Refused(f"{folder}: no {MANIFEST}; not an optc artifact") from None
    except OSError as exc:
        raise Refused(f"{folder / MANIFEST}: cannot be read: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Refused(f"{folder / MANIFEST}: not valid JSON: {getattr(exc, 'msg', exc)}") from exc
    except RecursionError as exc:  # [[[[...: Python's parser recurses per level
        raise Refused(f"{folder / MANIFEST}: nested too deeply to be a manifest") from exc
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(files.get(manifest.get("library")), str) or not isinstance(manifest.get("inputs"), list):
        raise Refused(f"{folder / MANIFEST}: lacks the library's SHA-256 or the inputs; not an optc artifact manifest")
    return manifest


def machine_arch() -> str:
    """This machine's architecture as the manifest names it (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line of ``/proc/cpuinfo`` (``flags``, ``model name``); None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


# Linux's aarch64 feature bits (arch/arm64/include/uapi/asm/hwcap.h): name -> (0: AT_HWCAP, 1: AT_HWCAP2; bit).
# The kernel prints the same names in /proc/cpuinfo's "Features" line; the bits are read instead because
# qemu-user emulates the auxiliary vector but shows the host's /proc/cpuinfo. runner.cc holds the same table.
AARCH64_HWCAP = {
    "fp": (0, 0), "asimd": (0, 1), "crc32": (0, 7), "atomics": (0, 8), "fphp": (0, 9), "asimdhp": (0, 10),
    "asimdrdm": (0, 12), "jscvt": (0, 13), "fcma": (0, 14), "lrcpc": (0, 15), "asimddp": (0, 20), "sve": (0, 22),
    "asimdfhm": (0, 23), "sve2": (1, 1), "i8mm": (1, 13), "bf16": (1, 14),
}
_AT_HWCAP, _AT_HWCAP2 = 16, 26


def host_cpu_features(arch: str) -> frozenset[str]:
    """This CPU's features, named as Linux names them (x86: /proc/cpuinfo's ``flags``)."""
    if arch == "aarch64":
        words = _auxv_hwcaps()
        if words is not None:
            return frozenset(name for name, (word, bit) in AARCH64_HWCAP.items() if words[word] >> bit & 1)
        return frozenset((cpuinfo_field("Features") or "").split())
    return frozenset((cpuinfo_field("flags") or "").split())


def _auxv_hwcaps() -> tuple[int, int] | None:
    try:
        data = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    pairs = np.frombuffer(data[: len(data) // 16 * 16], dtype=np.uint64).reshape(-1, 2)
    found = {int(key): int(value) for key, value in pairs}
    return (found[_AT_HWCAP], found.get(_AT_HWCAP2, 0)) if _AT_HWCAP in found else None


def check_cpu(manifest: Mapping[str, Any], arch: str | None = None, features: frozenset[str] | None = None) -> None:
    """Refuse a machine of another architecture, or whose CPU lacks a feature the library's code uses.

    ``arch`` and ``features`` default to this machine's (tests pass others).
    """
    cpu = (manifest.get("runtime") or {}).get("cpu")
    if not cpu:
        return  # a manifest from before optc recorded the CPU
    arch = arch or machine_arch()
    if cpu.get("arch") != arch:
        raise Refused(f"this artifact is for {cpu.get('arch')}; this machine is {arch}")
    have = host_cpu_features(arch) if features is None else features
    missing = [name for name in cpu.get("features") or () if name not in have]
    if missing:
        compiled_for = " ".join(filter(None, [cpu.get("mcpu") or "", ",".join(cpu.get("mattr") or ())])) or "a generic CPU"
        hint = " (optc compile --target x86 on this machine, or --cpu naming it)" if arch == "x86_64" else ""  # runner.cc says the same
        raise Refused(f"this CPU lacks {', '.join(missing)}, which the artifact's code uses (compiled for {compiled_for}); compile it for this CPU{hint}")


def wheel_library_dirs() -> list[Path]:
    """Where a vendor library is looked for when the loader's own search has none: this Python environment's ``lib/``
    (where pip puts a wheel's data files: the ``onednn-cpu-gomp`` wheel's ``libdnnl.so.2``), the user's with
    ``--user``, and ``lib/`` beside this file (a deployed runner's folder, laid out as the C++ runner's)."""
    import site

    bases = [sys.prefix, getattr(site, "USER_BASE", None) or "", str(Path(__file__).resolve().parent)]
    return [Path(b) / "lib" for b in dict.fromkeys(bases) if b]


def wheel_library(soname: str) -> Path | None:
    """``soname`` in the first of :func:`wheel_library_dirs` that holds it, or None."""
    return next((d / soname for d in wheel_library_dirs() if (d / soname).is_file()), None)


_LOADED: dict[str, tuple[ctypes.CDLL, Path | None]] = {}


def load_library(soname: str) -> tuple[ctypes.CDLL, Path | None]:
    """``soname`` loaded into this process and kept there, with its path where it came from a wheel (None: the loader's
    search path found it). Once loaded, the dependency of every ``model.so`` on it resolves to this copy, which the
    loader's own search (``LD_LIBRARY_PATH``, the system's libraries) is tried for first. Raises OSError when neither
    has it."""
    if soname in _LOADED:
        return _LOADED[soname]
    try:
        _LOADED[soname] = (ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL), None)
    except OSError as missing:
        path = wheel_library(soname)
        if path is None:
            raise missing
        _LOADED[soname] = (ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL), path)
    return _LOADED[soname]


def check_libraries(manifest: Mapping[str, Any]) -> None:
    """Refuse, in one line, an artifact whose vendor library (``runtime.libraries``) cannot be loaded here; load the
    ones it needs (from this environment's wheels where the system has none)."""
    for lib in (manifest.get("runtime") or {}).get("libraries") or ():
        soname = lib.get("soname")
        try:
            load_library(soname or f"<{lib.get('name')}: no soname in the manifest>")
        except OSError as exc:
            raise Refused(f"this artifact needs {lib.get('name')} {lib.get('version') or ''} ({soname}), which cannot be loaded here: {exc}") from exc


def apply_env(env: Mapping[str, str]) -> None:
    """Set each of ``env`` the user has not set (read by OpenMP and TVM when they start: call before loading)."""
    for key, value in env.items():
        os.environ.setdefault(key, str(value))


def check_feeds(inputs: Sequence[Mapping[str, Any]], feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """The feeds in the manifest's input order, C-contiguous; refused unless names, dtypes and shapes are the manifest's."""
    names = [spec["name"] for spec in inputs]
    missing = [n for n in names if n not in feeds]
    if missing:
        raise Refused(f"missing input '{missing[0]}'; the artifact takes {', '.join(names)}")
    extra = sorted(set(feeds) - set(names))
    if extra:
        raise Refused(f"unknown input '{extra[0]}'; the artifact takes {', '.join(names)}")
    values = []
    for spec in inputs:
        value = np.ascontiguousarray(feeds[spec["name"]])
        if list(value.shape) != list(spec["shape"]) or value.dtype.name != spec["dtype"]:
            raise Refused(f"input '{spec['name']}': got {value.dtype} {list(value.shape)}, the artifact takes {spec['dtype']} {spec['shape']}")
        values.append(value)
    return values


def vm_outputs(result: Any) -> list[Any]:
    """The VM's result as a list of tensors (one output comes back bare, several as a tuple)."""
    return [result] if hasattr(result, "numpy") else list(result)


# --- the runner ------------------------------------------------------------------------------------

def load_vm(folder: Path, manifest: Mapping[str, Any]) -> tuple[Any, Any]:
    """(VM, device) running the verified bytes of the manifest's library (its vendor libraries loaded first: see
    :func:`check_libraries`; set the manifest's ``runtime.env`` before, as :func:`run` does)."""
    check_libraries(manifest)  # before TVM's import (seconds): a missing library is refused at once
    import tvm
    import tvm_ffi
    from tvm import relax

    device = tvm.cuda(0) if (manifest.get("target") or {}).get("device") == "cuda" else tvm.cpu(0)
    if not device.exist:
        raise Refused("this artifact is for a CUDA GPU and none is present here")
    name = manifest["library"]
    private = Path(tempfile.mkdtemp(prefix="optc-run-"))
    fd = None
    try:
        try:
            f = open_regular(folder / name, follow_symlinks=False)
        except OSError as exc:
            raise Refused(f"{folder}: '{name}' cannot be read: {exc.strerror or exc}") from exc
        with f:
            fd = place_verified(f, manifest["files"][name], f"{folder}: '{name}'", private / "model.so", in_memory=True)
        # tvm_ffi's loader keeps the link's own name (TVM picks its loader by the ".so" suffix);
        # tvm.runtime.load_module would resolve it to the memfd, whose path has no suffix.
        lib = tvm_ffi.load_module(str(private / "model.so"))
    finally:
        if fd is not None:
            os.close(fd)  # the loaded library keeps its own mapping
        shutil.rmtree(private, ignore_errors=True)
    share_thread_pool(lib)
    return relax.VirtualMachine(lib, device), device


def share_thread_pool(lib: Any) -> None:
    """An artifact that calls oneDNN runs its TVM kernels on oneDNN's OpenMP threads (onednn_glue's openmp_pool.h):
    set up now, so the first inference's kernels already use them (the plain TVM runtime does it at the first oneDNN
    call). Artifacts without oneDNN, or built before optc had it, keep TVM's pool."""
    try:
        choose = lib.get_function("optc_dnnl_thread_pool", query_imports=True)
    except AttributeError:
        return
    choose()


def run(folder: Path, inputs: Sequence[str], repeats: int = 1) -> tuple[dict[str, np.ndarray], list[float]]:
    """Outputs by name and each run's milliseconds, for ``NAME=FILE.npy`` items."""
    manifest = read_manifest(folder)
    check_cpu(manifest)
    feeds: dict[str, np.ndarray] = {}
    for item in inputs:
        name, eq, file = item.partition("=")
        if not eq or not name:
            raise Refused(f"--input {item}: expected NAME=FILE.npy")
        if name in feeds:
            raise Refused(f"--input {name} is given twice")
        feeds[name] = read_npy(file)
    values = check_feeds(manifest["inputs"], feeds)
    # the environment first: OpenMP reads GOMP_SPINCOUNT once, when libgomp loads, and load_vm loads oneDNN's first
    apply_env((manifest.get("runtime") or {}).get("env") or {})
    vm, device = load_vm(folder, manifest)
    import tvm

    main_fn = vm["main"]
    args = [tvm.runtime.tensor(value, device) for value in values]
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = main_fn(*args)
        device.sync()
        times.append((time.perf_counter() - start) * 1e3)
    names = [spec["name"] for spec in manifest["outputs"]]
    return {name: tensor.numpy() for name, tensor in zip(names, vm_outputs(result))}, times


def save_outputs(outputs: Mapping[str, np.ndarray], path: Path) -> None:
    """All outputs by name to an ``.npz``; the only output to an ``.npy``."""
    if path.suffix == ".npy" and len(outputs) != 1:
        raise Refused(f"--output {path}: the artifact has {len(outputs)} outputs; name an .npz")
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    if path.suffix == ".npy":
        np.save(tmp, next(iter(outputs.values())))
    else:
        np.savez(tmp, **outputs)
    tmp.replace(path)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's usage block would make a bad flag two lines
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _OneLineParser(prog="run_artifact.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="the artifact folder (holding manifest.json and model.so)")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy", help="one per input the manifest lists")
    parser.add_argument("--output", type=Path, help="write the outputs: .npz (all, by name) or .npy (a single output)")
    parser.add_argument("--repeats", type=int, default=1, help="run N times and print the median milliseconds")
    args = parser.parse_args(argv)
    try:
        if args.repeats < 1:
            raise Refused(f"--repeats {args.repeats}: must be 1 or more")
        if args.output is not None and args.output.suffix not in (".npz", ".npy"):
            raise Refused(f"--output {args.output}: name an .npz (every output) or an .npy (a single output)")
        outputs, times = run(args.artifact, args.input, args.repeats)
        if args.output is not None:
            save_outputs(outputs, args.output)
    except Refused as exc:
        print(f"run_artifact.py: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 -- TVM raises many kinds; the first line says what failed
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"run_artifact.py: error: {type(exc).__name__}: {first}", file=sys.stderr)
        return 1
    for name, value in outputs.items():
        print(f"{name}: {value.dtype} {list(value.shape)} first values {[round(float(v), 5) for v in value.ravel()[:5]]}")
    if args.repeats > 1:
        print(f"median {float(np.median(times)):.3f} ms over {len(times)} runs (min {min(times):.3f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
