"""oneDNN as a kernel provider for x86 artifacts.

The glue (``onednn_glue.cc``) is compiled once per glue source, TVM-FFI and
oneDNN version into the optc cache and linked into each ``model.so`` that
calls it (``export_library(addons=[glue.o], options=[-ldnnl])``). The
artifact keeps a dynamic dependency on ``libdnnl.so.2`` (Debian ships no
static oneDNN): the manifest records it, and :func:`check_runtime` refuses to
load an artifact whose library is missing with a one-line reason instead of
the loader's undefined-symbol message.

Availability needs the headers and library (Debian ``libdnnl-dev``) and a C++
compiler; without them optc falls back to its TVM kernels and the report
says why.
"""
from __future__ import annotations

import ctypes
import ctypes.util
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
HEADER = Path("/usr/include/oneapi/dnnl/dnnl.hpp")
VERSION_HEADER = Path("/usr/include/oneapi/dnnl/dnnl_version.h")
COMPILER = "g++"


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
    if not HEADER.is_file() or not VERSION_HEADER.is_file():
        return Availability(False, "oneDNN headers not found (Debian: apt-get install libdnnl-dev)")
    if shutil.which(COMPILER) is None:
        return Availability(False, f"no C++ compiler ({COMPILER}) to build the oneDNN glue")
    version = runtime_version()
    if version is None:
        return Availability(False, f"{SONAME} cannot be loaded (Debian: apt-get install libdnnl2)")
    return Availability(True, version=version)


def runtime_version() -> str | None:
    """The version of the oneDNN library this process would load, or None when it is missing."""
    try:
        lib = ctypes.CDLL(SONAME)
    except OSError:
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                    ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]

    lib.dnnl_version.restype = ctypes.POINTER(Version)
    v = lib.dnnl_version().contents
    return f"{v.major}.{v.minor}.{v.patch}"


def header_version() -> str:
    text = VERSION_HEADER.read_text()
    parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) if m else "?" for m in parts)


@functools.lru_cache(maxsize=1)
def glue_digest() -> str:
    return source_digest(GLUE, GLUE_HEADERS)


def glue_object() -> Path:
    """The compiled glue, built on first use and cached by everything that shapes its code."""
    return compiled(GLUE, glue_digest(), COMPILER, ["-O3", "-std=c++17", "-fPIC", "-fopenmp"], "oneDNN glue", header_version())


def link_options() -> list[str]:
    """Linker flags for ``export_library``: options come before the objects, so --as-needed must be off.
    libgomp: the glue sets OpenMP's per-thread thread count (omp_set_num_threads) around small calls."""
    return ["-Wl,--no-as-needed", "-ldnnl", "-lgomp"]


def check_runtime(recorded: str) -> None:
    """Before loading an artifact that calls oneDNN: the library must load, with the major version it was built for."""
    found = runtime_version()
    if found is None:
        raise TargetError(f"this artifact calls oneDNN {recorded} but {SONAME} is not installed here (Debian: apt-get install libdnnl2)")
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
    try:
        lib = ctypes.CDLL(SONAME)
        text = HEADER.with_name("dnnl_types.h").read_text()
    except OSError:
        return None
    names = {int(value, 16): name for name, value in re.findall(r"dnnl_cpu_isa_(\w+) = (0x[0-9a-fA-F]+)", text)
             if name not in ("all", "no_hints", "prefer_ymm", "default")}
    lib.dnnl_get_effective_cpu_isa.restype = ctypes.c_int
    return names.get(int(lib.dnnl_get_effective_cpu_isa()))
