"""oneDNN as a kernel provider for x86 artifacts.

The glue (``onednn_glue.cc``) is compiled once per glue source, TVM-FFI and
oneDNN version into the optc cache and linked into each ``model.so`` that
calls it (``export_library(addons=[glue.o], options=[-ldnnl])``). The
artifact keeps a dynamic dependency on ``libdnnl.so.2`` (no static oneDNN
ships): the manifest records it, and :func:`check_runtime` refuses to load an
artifact whose library is missing with a one-line reason instead of the
loader's undefined-symbol message.

Where oneDNN comes from: the system's library where the loader finds one
(Debian's ``libdnnl2``, ``LD_LIBRARY_PATH``), else the ``onednn-cpu-gomp``
wheel's in this Python environment (``pip install optc[tvm]`` installs it and
its headers, ``onednn-devel-cpu-gomp``, on x86-64 Linux: no root, no apt). Its
headers are the first of the system's and the wheel's of the library's major
version. Without them, or without a C++ compiler, optc falls back to its TVM
kernels and the report says why.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from optc.errors import TargetError
from optc.targets.providers.glue_build import compiled, source_digest

NAME = "onednn"
SONAME = "libdnnl.so.2"
GLUE = Path(__file__).with_name("onednn_glue.cc")
GLUE_HEADERS = tuple(Path(__file__).with_name(h) for h in ("openmp_pool.h", "pacer.h", "winograd_builds.h", "winograd.h", "winograd_tile.h"))  # included by the glue: part of its cache key
SYSTEM_INCLUDE = Path("/usr/include")
COMPILER = "g++"
INSTALL_HINT = "pip install onednn-cpu-gomp==2022.2.1 onednn-devel-cpu-gomp==2022.2.1, or Debian's libdnnl-dev"


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""
    version: str = ""


@functools.lru_cache(maxsize=1)
def availability() -> Availability:
    """Whether artifacts can call oneDNN here; the reason when they cannot."""
    if os.environ.get("OPTC_DISABLE_ONEDNN"):
        return Availability(False, "disabled by OPTC_DISABLE_ONEDNN")
    version = runtime_version()
    if version is None:
        return Availability(False, f"{SONAME} cannot be loaded ({INSTALL_HINT})")
    if include_dir() is None:
        return Availability(False, f"no oneDNN {version.split('.')[0]}.x headers beside its {SONAME} ({INSTALL_HINT})")
    if shutil.which(COMPILER) is None:
        return Availability(False, f"no C++ compiler ({COMPILER}) to build the oneDNN glue")
    return Availability(True, version=version)


def library() -> tuple[ctypes.CDLL, Path | None] | None:
    """oneDNN's library, loaded into this process (the system's, else this environment's wheel's: see the top of this
    file) with its path where it is a wheel's; None when neither is there. Loaded before any ``model.so`` that calls
    it: the artifact's dependency on ``libdnnl.so.2`` then resolves to this copy."""
    from optc.targets.artifact import apply_runtime_env
    from optc.targets.deploy.run_artifact import load_library

    # libdnnl loads libgomp, which reads GOMP_SPINCOUNT once, now: the artifact's settings, for the kernel race and the
    # artifacts this process runs (the user's own settings stand)
    apply_runtime_env()
    try:
        return load_library(SONAME)
    except OSError:
        return None


def _include_candidates() -> list[Path]:
    from optc.targets.deploy.run_artifact import wheel_library_dirs

    return [SYSTEM_INCLUDE, *(d.parent / "include" for d in wheel_library_dirs())]


@functools.lru_cache(maxsize=1)
def include_dir() -> Path | None:
    """The folder holding ``oneapi/dnnl/dnnl.hpp`` of the loaded library's major version: the system's or a wheel's."""
    version = runtime_version()
    if version is None:
        return None
    for folder in _include_candidates():
        if (folder / "oneapi/dnnl/dnnl.hpp").is_file() and header_version(folder).split(".")[0] == version.split(".")[0]:
            return folder
    return None


def runtime_version() -> str | None:
    """The version of the oneDNN library this process loads, or None when it is missing."""
    found = library()
    if found is None:
        return None
    lib = found[0]

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]

    lib.dnnl_version.restype = ctypes.POINTER(Version)
    v = lib.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


def header_version(folder: Path | None = None) -> str:
    """The version ``folder``'s oneDNN headers declare (default: those the glue is compiled with)."""
    folder = folder or include_dir() or SYSTEM_INCLUDE
    try:
        text = (folder / "oneapi/dnnl/dnnl_version.h").read_text()
    except OSError:
        return "?.?.?"
    parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


@functools.lru_cache(maxsize=1)
def glue_digest() -> str:
    return source_digest(GLUE, GLUE_HEADERS)


def glue_object() -> Path:
    """The compiled glue, built on first use and cached by everything that shapes its code."""
    include = include_dir()
    flags = ["-O3", "-std=c++17", "-fPIC", "-fopenmp"] + ([f"-I{include}"] if include and include != SYSTEM_INCLUDE else [])
    return compiled(GLUE, glue_digest(), COMPILER, flags, "oneDNN glue", f"{header_version()} {include}")


def link_options() -> list[str]:
    """Linker flags for ``export_library``: options come before the objects, so --as-needed must be off. A wheel's
    library is linked by its path (no ``libdnnl.so`` on the linker's search path); ``model.so`` then needs it by its
    soname alone, as with the system's. libgomp: the glue sets OpenMP's per-thread thread count (omp_set_num_threads)
    around small calls."""
    found = library()
    dnnl = str(found[1]) if found and found[1] else "-ldnnl"
    return ["-Wl,--no-as-needed", dnnl, "-lgomp"]


def check_runtime(recorded: str) -> None:
    """Before loading an artifact that calls oneDNN: the library must load, with the major version it was built for."""
    found = runtime_version()
    if found is None:
        raise TargetError(f"this artifact calls oneDNN {recorded} but {SONAME} is not installed here ({INSTALL_HINT})")
    if found.split(".")[0] != recorded.split(".")[0]:
        raise TargetError(f"this artifact was built against oneDNN {recorded}; this machine has {found} (major versions differ)")


# oneDNN's ISA levels (ONEDNN_MAX_CPU_ISA's names), widest first, with the Linux flags each needs. oneDNN's AVX2 kernels
# use FMA; its AVX-512 ones need the Xeon subset (BW, VL, DQ).
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
ISA_LEVELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("AVX512_CORE_AMX", (*_AVX512, "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")),
    ("AVX512_CORE_BF16", (*_AVX512, "avx512_vnni", "avx512_bf16")),
    ("AVX512_CORE_VNNI", (*_AVX512, "avx512_vnni")),
    ("AVX512_CORE", _AVX512),
    ("AVX2_VNNI", ("avx2", "fma", "avx_vnni")),
    ("AVX2", ("avx2", "fma")),
    ("AVX", ("avx",)),
    ("SSE41", ("sse4_1",)),
)


def isa_for(flags: frozenset[str] | set[str]) -> str | None:
    """The widest oneDNN ISA (an ``ONEDNN_MAX_CPU_ISA`` value) a CPU with these Linux ``flags`` runs."""
    return next((name for name, needs in ISA_LEVELS if set(needs) <= flags), None)


def effective_isa() -> str | None:
    """The ISA oneDNN dispatches to in this process, as its headers name it (``avx2``), or None where unknown. oneDNN
    fixes it at its first kernel: ``ONEDNN_MAX_CPU_ISA`` set later has no effect."""
    found, include = library(), include_dir()
    if found is None or include is None:
        return None
    lib = found[0]
    try:
        text = (include / "oneapi/dnnl/dnnl_types.h").read_text()
    except OSError:
        return None
    names = {int(value, 16): name for name, value in re.findall(r"dnnl_cpu_isa_(\w+) = (0x[0-9a-fA-F]+)", text)
             if name not in ("all", "no_hints", "prefer_ymm", "default")}
    lib.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
    return names.get(int(lib.dnnl_get_effective_cpu_isa()))
