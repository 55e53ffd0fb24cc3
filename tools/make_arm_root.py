#!/usr/bin/env python3
"""Build (once) the aarch64 runner that checks ARM artifacts under qemu-user.

``optc compile MODEL --target arm`` cross-links ``model.so`` with Debian's
``aarch64-linux-gnu-g++``. To check its numbers on this x86 machine we run it
under ``qemu-aarch64-static`` with optc's C++ Relax VM runner
(``targets/deploy/runner.cc``, the one source for x86-64 and aarch64) linked against the TVM runtime from the aarch64
wheels of the very TVM that compiled the artifact. This is the lighter of the
two routes in ``shared/TVM_NOTES.md``: no emulated Python (``import tvm`` alone
takes 30 s under qemu), no 280 MB debootstrap root, well under a second per
small model.

The root lives outside the repository, by default in
``$XDG_CACHE_HOME/optc/arm64-root`` (``~/.cache/optc/arm64-root``)::

    lib/libtvm_runtime.so, lib/libtvm_ffi.so   from the pinned aarch64 wheels (SHA-256 checked)
    include/                                   tvm-ffi and DLPack headers (from the same wheel)
    optc-runner                                targets/deploy/runner.cc, cross-compiled
    root.json                                  versions, wheel hashes, runner source hash

It is rebuilt when ``targets/deploy/runner.cc`` or the pinned versions change and is
written to a temporary folder renamed into place, so an interrupted build
leaves no half root.

Needs (Debian)::

    apt-get install g++-aarch64-linux-gnu qemu-user-static

Usage::

    python tools/make_arm_root.py [--root DIR] [--wheels DIR] [--force]
    python tools/make_arm_root.py --check ARTIFACT_DIR   # run it under qemu vs onnxruntime

``--wheels DIR`` takes already downloaded wheels (offline); otherwise pip
downloads them (``--platform manylinux_2_28_aarch64``; the manylinux2014 tag
finds nothing). The test ``tests/test_targets_arm.py`` imports this file for
:func:`run_artifact` and skips, naming this script, when the root is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from optc.targets.artifact import sha256
from optc.targets.deploy.build_runner import RUNNER, SOURCE, RunnerBuildError, compile_runner, staged_folder

CXX = "aarch64-linux-gnu-g++"
QEMU = ("qemu-aarch64-static", "qemu-aarch64")
SYSROOT = Path("/usr/aarch64-linux-gnu")  # Debian's libc6-arm64-cross (comes with the g++ package)
PLATFORM = "manylinux_2_28_aarch64"

# The aarch64 wheels of the TVM that compiles the artifacts (pyproject's tvm extra).
# An artifact must run on the runtime of the same TVM build.
WHEELS = {
    "apache-tvm": ("0.27.0.post1", "4acfdb7653e4e1ba7a707bdf2833db72eb8fda7d04d99141f2a4e1da43171fb7"),
    "apache-tvm-ffi": ("0.1.14.post1", "c7a759781d4fbf2b99fa12f2741f250b882b06acc2747bb02831d491d1ac7d3c"),
}
# wheel member -> path in the root (a trailing "/" copies a folder)
MEMBERS = {
    "apache-tvm": {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so"},
    "apache-tvm-ffi": {"tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so", "tvm_ffi/include/": "include/"},
}


class ArmRootError(Exception):
    """The root cannot be built or used; the message says what is missing."""


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc" / "arm64-root"


def qemu() -> str | None:
    """The qemu-user binary for aarch64, if installed."""
    return next((shutil.which(name) for name in QEMU if shutil.which(name)), None)


def _expected_stamp() -> dict[str, object]:
    return {
        "wheels": {name: {"version": v, "sha256": h} for name, (v, h) in WHEELS.items()},
        "runner_sha256": sha256(SOURCE),
    }


def unusable_reason(root: Path | None = None) -> str | None:
    """Why ARM artifacts cannot be run here (None when they can)."""
    root = root or default_root()
    if shutil.which(CXX) is None:
        return f"no {CXX} (apt-get install g++-aarch64-linux-gnu)"
    if qemu() is None:
        return "no qemu-aarch64-static (apt-get install qemu-user-static)"
    if not (SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        return f"no aarch64 libc in {SYSROOT} (apt-get install libc6-arm64-cross)"
    stamp = root / "root.json"
    if not stamp.is_file() or not (root / RUNNER).is_file():
        return f"no arm64 runner root at {root}; build it with: python tools/make_arm_root.py"
    try:
        built = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return f"{stamp} is unreadable; rebuild with: python tools/make_arm_root.py --force"
    if {k: built.get(k) for k in ("wheels", "runner_sha256")} != _expected_stamp():
        return f"the arm64 runner root at {root} is stale; rebuild with: python tools/make_arm_root.py"
    return None


def _fetch_wheels(dest: Path, wheel_dir: Path | None) -> dict[str, Path]:
    """One verified wheel per pinned package, from ``wheel_dir`` or pip."""
    if wheel_dir is None:
        pins = [f"{name}=={version}" for name, (version, _) in WHEELS.items()]
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--platform", PLATFORM, "--python-version", "3.11", "--dest", str(dest), *pins]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ArmRootError(f"pip could not download the aarch64 wheels: {last}")
        wheel_dir = dest
    found: dict[str, Path] = {}
    for name, (version, digest) in WHEELS.items():
        stem = f"{name.replace('-', '_')}-{version}-"
        candidates = [p for p in sorted(wheel_dir.glob(f"{stem}*.whl")) if "aarch64" in p.name]
        if not candidates:
            raise ArmRootError(f"no aarch64 wheel of {name}=={version} in {wheel_dir}")
        if sha256(candidates[0]) != digest:
            raise ArmRootError(f"{candidates[0].name}: SHA-256 differs from the pinned one")
        found[name] = candidates[0]
    return found


def _extract(wheel: Path, members: Mapping[str, str], root: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        for src, dst in members.items():
            chosen = [n for n in names if (n.startswith(src) if src.endswith("/") else n == src) and not n.endswith("/")]
            if not chosen:
                raise ArmRootError(f"{wheel.name} has no {src}")
            for name in chosen:
                target = root / (dst + name[len(src):] if src.endswith("/") else dst)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as fin, open(target, "wb") as fout:
                    shutil.copyfileobj(fin, fout)


def build_root(root: Path | None = None, wheel_dir: Path | None = None, force: bool = False) -> Path:
    """Build the root unless an up-to-date one is there; returns its path."""
    root = root or default_root()
    if not force and unusable_reason(root) is None:
        return root
    if shutil.which(CXX) is None:
        raise ArmRootError(f"no {CXX}; install it with: apt-get install g++-aarch64-linux-gnu")
    with staged_folder(root) as staging:
        with tempfile.TemporaryDirectory() as downloads:
            wheels = _fetch_wheels(Path(downloads), wheel_dir)
            for name, wheel in wheels.items():
                _extract(wheel, MEMBERS[name], staging)
        try:
            compile_runner(CXX, staging / "include", staging)
        except RunnerBuildError as exc:
            raise ArmRootError(str(exc)) from exc
        cxx_version = subprocess.run([CXX, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        (staging / "root.json").write_text(json.dumps({**_expected_stamp(), "cxx": cxx_version}, indent=2) + "\n")
    return root


@dataclass
class EmulatedRun:
    outputs: dict[str, np.ndarray]
    run_ms: list[float]  # per call of "main", as timed inside the emulated process
    wall_s: float  # the whole qemu process: start-up, library load, every run


def run_artifact(folder: Path, feeds: Mapping[str, np.ndarray], root: Path | None = None, repeats: int = 1, timeout: float = 600,
                 cpu: str | None = None) -> EmulatedRun:
    """Run an ARM artifact under qemu-user; its files are checked against the manifest first (and the
    runner checks the library's SHA-256, the emulated CPU's features and the inputs again). ``cpu``: qemu's
    ``-cpu`` model (default ``max``, every feature qemu emulates)."""
    from optc.targets.artifact import read_verified_manifest

    root = root or default_root()
    reason = unusable_reason(root)
    if reason:
        raise ArmRootError(reason)
    manifest = read_verified_manifest(folder)
    if manifest["target"]["name"] != "arm":
        raise ArmRootError(f"{folder} is a {manifest['target']['name']} artifact, not arm")
    with tempfile.TemporaryDirectory() as tmp:
        inputs = []
        for i, spec in enumerate(manifest["inputs"]):
            np.save(Path(tmp) / f"input_{i}.npy", np.ascontiguousarray(feeds[spec["name"]]))
            inputs += ["--input", f"{spec['name']}={Path(tmp) / f'input_{i}.npy'}"]
        cmd = [str(qemu()), *(["-cpu", cpu] if cpu else []), "-L", str(SYSROOT), str(root / RUNNER), str(folder), "--output-dir", tmp, "--repeats", str(repeats), *inputs]
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise ArmRootError(f"the emulated run took more than {timeout:.0f} s") from exc
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise ArmRootError(f"the emulated run failed (exit {done.returncode}): {done.stderr.strip()[-2000:]}")
        run_ms = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("run_ms ")]
        outputs = {spec["name"]: np.load(Path(tmp) / f"output_{i}.npy") for i, spec in enumerate(manifest["outputs"])}
    return EmulatedRun(outputs, run_ms, wall)


def _check(folder: Path, root: Path) -> None:
    """Run the artifact on random inputs under qemu and against onnxruntime on its model.onnx."""
    from optc.ir.io import load_model
    from optc.ir.session import make_session, sample_feeds

    model = load_model(folder / "model.onnx")
    feeds = sample_feeds(model)
    run = run_artifact(folder, feeds, root, repeats=3)
    names = list(run.outputs)
    reference = dict(zip(names, make_session(model).run(names, feeds)))
    diff = max(float(np.abs(run.outputs[n].astype(np.float64) - reference[n]).max()) for n in names)
    print(f"{folder}: max |Δ| vs onnxruntime {diff:.3g}; emulated run {min(run.run_ms):.1f} ms; qemu process {run.wall_s:.2f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help=f"where to build it (default {default_root()})")
    parser.add_argument("--wheels", type=Path, default=None, help="folder with the aarch64 wheels already downloaded")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument("--check", type=Path, metavar="ARTIFACT", help="then run this ARM artifact under qemu against onnxruntime")
    args = parser.parse_args(argv)
    try:
        root = build_root(args.root, args.wheels, args.force)
        print(f"arm64 runner root: {root}")
        if args.check:
            _check(args.check, root)
    except ArmRootError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # optc's own errors (bad artifact) are one line too
        if type(exc).__module__.startswith("optc"):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
