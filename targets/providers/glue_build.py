"""Compile a kernel glue source once into optc's cache (``$XDG_CACHE_HOME/optc/glue``), keyed by everything that
shapes its code: the source, the headers it includes, the compiler, its flags and whatever else the caller names
(a vendor library's version). Both glues (oneDNN's for x86, and optc's Winograd kernels where no vendor library
is used: ARM targets, x86 without oneDNN, boards) are built this way and linked into each ``model.so`` that calls
them."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from optc.errors import TargetError


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "optc" / "glue"


def source_digest(source: Path, headers: Sequence[Path]) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in (source, *headers))).hexdigest()[:16]


def compiled(source: Path, digest: str, compiler: str, flags: Sequence[str], what: str, extra: str = "") -> Path:
    """The object file of ``source`` (whose and whose headers' ``digest`` is given), built on first use; ``what``
    names the glue in a failure's one-line message."""
    import tvm_ffi

    include = tvm_ffi.libinfo.find_include_path()
    key = hashlib.sha256((digest + extra + compiler + str(include) + " ".join(flags)).encode()).hexdigest()[:20]
    target = cache_dir() / f"{source.stem}-{key}.o"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".o", dir=target.parent)
    os.close(fd)
    done = subprocess.run([compiler, *flags, "-c", str(source), f"-I{include}", "-o", tmp], check=False, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise TargetError(f"building the {what} failed: {compiler_error(done.stderr)}")
    os.replace(tmp, target)  # atomic: a concurrent compile sees the whole object or none
    return target


def compiler_error(stderr: str) -> str:
    """The line of a failed compile that says what failed: its first ``error:`` (the last line is often the
    source line's caret, ``| ^``), else its last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    first = next((line for line in lines if "error:" in line), None)
    return first or (lines[-1] if lines else "(no message)")
