"""Build the C++ runner (``runner.cc``) for this machine against the installed TVM wheels.

::

    python -m optc.targets.deploy.build_runner [--force]    # prints the runner's path

The result is a folder that runs artifacts without Python, cached outside the repository
(``$XDG_CACHE_HOME/optc/runner-<arch>``, by default ``~/.cache/optc/runner-x86_64``)::

    optc-runner            runner.cc, compiled with this machine's g++
    lib/libtvm_runtime.so  from the installed apache-tvm wheel
    lib/libtvm_ffi.so      from the installed apache-tvm-ffi wheel
    lib/libdnnl.so.2       from the onednn-cpu-gomp wheel, where it is installed (artifacts that call oneDNN
                           load it; the system's libdnnl2 serves where the wheel is not)
    runner.json            what it was built from (SHA-256 of the source and the libraries)

The runner finds its libraries in ``lib/`` beside it (rpath ``$ORIGIN/lib``), so the folder can
be copied to a machine of the same architecture. It is rebuilt when ``runner.cc``, the wheels
or the compiler change, in a temporary folder renamed into place. ``tools/make_arm_root.py``
builds the aarch64 one from the same source with :func:`compile_runner`.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from optc.targets.deploy.run_artifact import machine_arch

SOURCE = Path(__file__).with_name("runner.cc")
RUNNER = "optc-runner"
CXX = "g++"


class RunnerBuildError(Exception):
    """The runner cannot be built here; the message says what is missing."""


def compile_runner(cxx: str, include: Path, root: Path) -> None:
    """Compile :data:`SOURCE` into ``root/optc-runner``, linked against ``root/lib``'s TVM runtime."""
    cmd = [cxx, "-std=c++17", "-O2", "-I", str(include), str(SOURCE), "-o", str(root / RUNNER),
           "-Wl,--no-as-needed", "-L", str(root / "lib"), "-ltvm_runtime", "-ltvm_ffi", "-ldl", "-Wl,-rpath,$ORIGIN/lib"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RunnerBuildError(f"compiling {SOURCE.name} with {cxx} failed:\n{done.stderr.strip()}")


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc" / f"runner-{machine_arch()}"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # not imported: TVM's import takes seconds
    if spec is None or not spec.submodule_search_locations:
        raise RunnerBuildError(f"the {name} package is not installed (pip install 'optc[tvm]')")
    return Path(next(iter(spec.submodule_search_locations)))


def _inputs() -> tuple[Path, dict[str, Path]]:
    """The tvm-ffi headers and the runtime libraries of the installed wheels: TVM's two, and oneDNN's where its wheel is
    installed (the runner finds it in ``lib/`` as it finds TVM's; the runner's own dlopen of it searches its rpath)."""
    from optc.targets.deploy.run_artifact import wheel_library
    from optc.targets.providers.onednn import SONAME

    ffi, tvm = _package_dir("tvm_ffi"), _package_dir("tvm")
    libraries = {"libtvm_runtime.so": tvm / "lib" / "libtvm_runtime.so", "libtvm_ffi.so": ffi / "lib" / "libtvm_ffi.so"}
    for path in [ffi / "include", *libraries.values()]:
        if not path.exists():
            raise RunnerBuildError(f"{path} is missing from the installed wheels")
    dnnl = wheel_library(SONAME)
    if dnnl is not None:
        libraries[SONAME] = dnnl
    return ffi / "include", libraries


def _stamp(libraries: dict[str, Path], cxx_version: str) -> dict[str, object]:
    from optc.targets.artifact import sha256

    return {"source_sha256": sha256(SOURCE), "libraries": {name: sha256(p) for name, p in libraries.items()}, "cxx": cxx_version}


def build(root: Path | None = None, force: bool = False) -> Path:
    """The runner binary, built unless an up-to-date one is in ``root``."""
    root = root or default_root()
    if shutil.which(CXX) is None:
        raise RunnerBuildError(f"no {CXX} (Debian: apt-get install g++)")
    include, libraries = _inputs()
    cxx_version = subprocess.run([CXX, "--version"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    stamp = _stamp(libraries, cxx_version)
    with_stamp = root / "runner.json"
    if not force and (root / RUNNER).is_file() and with_stamp.is_file():
        try:
            if json.loads(with_stamp.read_text()) == stamp:
                return root / RUNNER
        except json.JSONDecodeError:
            pass
    with staged_folder(root) as staging:
        (staging / "lib").mkdir()
        for name, path in libraries.items():
            shutil.copy2(path, staging / "lib" / name)
        compile_runner(CXX, include, staging)
        (staging / "runner.json").write_text(json.dumps(stamp, indent=2) + "\n")
    return root / RUNNER


@contextlib.contextmanager
def staged_folder(root: Path) -> Iterator[Path]:
    """A new folder beside ``root`` that replaces it when the block succeeds: an interrupted build leaves no half folder."""
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        staging.chmod(0o755)
        yield staging
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=None, help=f"where to build it (default {default_root()})")
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        print(build(args.root, args.force))
    except RunnerBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
