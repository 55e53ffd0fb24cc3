"""Deployable artifacts: ``model.so`` plus a manifest that pins every file by SHA-256.

A compiled library is native code: :func:`load_artifact` refuses to load one
whose bytes do not match its manifest, and refuses manifests that name files
outside the artifact folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from optc import __version__
from optc.errors import ConfigError, TargetError
from optc.ir.model import Model
from optc.targets.spec import TargetSpec

MANIFEST = "manifest.json"
LIBRARY = "model.so"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path, model: Model, spec: TargetSpec) -> dict[str, Any]:
    """Hash every file already in ``folder`` (the manifest is written last)."""
    import tvm

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": "optc-artifact/1",
        "optc_version": __version__,
        "tvm_version": tvm.__version__,
        "target": spec.to_dict(),
        "library": LIBRARY,
        "inputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape or ())} for s in model.inputs],
        "outputs": [{"name": s.name, "dtype": str(s.dtype), "shape": list(s.shape or ())} for s in model.outputs],
        "files": {str(p.relative_to(folder)): sha256(p) for p in files},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_verified_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{folder}: no {MANIFEST}; not an optc artifact (compile with --target x86|arm|gpu)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc.msg}") from exc
    root = folder.resolve()
    for name, digest in manifest.get("files", {}).items():
        file = (folder / name).resolve()
        if root not in file.parents:
            raise ConfigError(f"{path}: names '{name}', outside the artifact folder")
        if not file.is_file():
            raise ConfigError(f"{folder}: '{name}' listed in the manifest is missing")
        if sha256(file) != digest:
            raise ConfigError(f"{folder}: '{name}' does not match its SHA-256 in the manifest; refusing to load it")
    if manifest.get("library") not in manifest.get("files", {}):
        raise ConfigError(f"{path}: the library is not covered by the manifest")
    return manifest


@dataclass
class LoadedArtifact:
    manifest: dict[str, Any]
    vm: Any
    device: Any

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tvm

        args = []
        for spec in self.manifest["inputs"]:
            if spec["name"] not in feeds:
                raise ConfigError(f"missing input '{spec['name']}'; the artifact takes {', '.join(i['name'] for i in self.manifest['inputs'])}")
            value = np.ascontiguousarray(feeds[spec["name"]])
            if list(value.shape) != spec["shape"] or str(value.dtype) != spec["dtype"]:
                raise ConfigError(f"input '{spec['name']}': got {value.dtype} {list(value.shape)}, the artifact takes {spec['dtype']} {spec['shape']}")
            args.append(tvm.runtime.tensor(value, self.device))
        extra = set(feeds) - {i["name"] for i in self.manifest["inputs"]}
        if extra:
            raise ConfigError(f"unknown input '{sorted(extra)[0]}'; the artifact takes {', '.join(i['name'] for i in self.manifest['inputs'])}")
        out = self.vm["main"](*args)
        values = [out] if hasattr(out, "numpy") else list(out)
        return {spec["name"]: v.numpy() for spec, v in zip(self.manifest["outputs"], values)}


def load_artifact(folder: Path) -> LoadedArtifact:
    """Verify the manifest's hashes, then load the library into a Relax VM."""
    manifest = read_verified_manifest(folder)
    import tvm
    from tvm import relax

    kind = manifest["target"]["device"]
    device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    if kind == "cuda" and not device.exist:
        raise TargetError("this artifact is for a CUDA GPU and none is present here")
    if manifest["target"]["name"] == "arm":
        import platform

        if platform.machine() not in ("aarch64", "arm64"):
            raise TargetError("this artifact is for aarch64; run it on an ARM board (or under qemu-aarch64)")
    lib = tvm.runtime.load_module(str(folder / manifest["library"]))
    return LoadedArtifact(manifest, relax.VirtualMachine(lib, device), device)


def run_artifact_files(artifact: Path, inputs: Sequence[str], output: Path | None = None) -> list[str]:
    """``optc run``: feeds from ``NAME=FILE.npy`` items, outputs to an ``.npz``; returns one summary line per output."""
    feeds = {}
    for item in inputs:
        name, eq, file = item.partition("=")
        if not eq:
            raise ConfigError(f"--input {item}: expected NAME=FILE.npy")
        try:
            feeds[name] = np.load(file, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--input {item}: cannot read {file}: {exc}") from exc
    outputs = load_artifact(artifact).run(feeds)
    if output is not None:
        tmp = output.with_name(f".{output.name}.tmp.npz")
        np.savez(tmp, **outputs)
        tmp.replace(output)
    return [f"{name}: {value.dtype} {list(value.shape)} first values {np.round(value.ravel()[:5], 5).tolist()}" for name, value in outputs.items()]
