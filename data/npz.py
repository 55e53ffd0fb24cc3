""".npz archives read without trusting them.

An ``.npz`` is a zip of ``.npy`` members. Its zip directory and each member's
``.npy`` header (dtype, shape) are read and checked before any array is
decompressed: the header's shape × dtype must be exactly the member's declared
uncompressed size, the dtype numeric (no Python objects: nothing is
unpickled), and all arrays of one archive together at most
:data:`MAX_ARCHIVE_BYTES`. A 3 MB deflate bomb declaring 6 GB is refused
from its directory; zipfile never decompresses past a member's declared size,
and an array is allocated only once its header matched the declared size.

Files are opened with :func:`optc.ir.io.open_regular_file` (FIFOs, devices and,
inside folders, symbolic links refused) and read from that descriptor.
"""
from __future__ import annotations

import hashlib

import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from optc.errors import ConfigError
from optc.ir.io import file_problem, open_regular_file

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma reads no lzma members either
    LZMAError = zlib.error  # type: ignore[assignment,misc]

# What a corrupt member can raise while it is decompressed (bz2 raises OSError and ValueError).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, LZMAError, NotImplementedError, RuntimeError, ValueError, OSError, EOFError)

# Arrays of one archive, decompressed, together (a larger set is a folder of archives).
MAX_ARCHIVE_BYTES = 2 << 30
MAX_MEMBERS = 1024
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArrayInfo:
    """What a member's ``.npy`` header declares."""

    dtype: np.dtype
    shape: tuple[int, ...]
    fortran_order: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class FileIdentity:
    """Enough of ``fstat`` to notice a file replaced or rewritten between two opens."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, fd: int) -> "FileIdentity":
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class NpzArchive:
    """An opened, checked ``.npz``; arrays are decompressed by :meth:`read`, one at a time.

    Args:
        path: the archive.
        label: how messages name it ("calibration file a.npz").
        follow_symlinks: False for files found in a folder (only the user's own path may be a link).

    Raises:
        ConfigError: the file is not a regular file, not a zip, or a member is
            not a plain numeric ``.npy`` of the size it declares, or the arrays
            exceed :data:`MAX_ARCHIVE_BYTES`.
    """

    def __init__(self, path: Path, label: str, *, follow_symlinks: bool = True):
        self.label = label
        try:
            self._file: IO[bytes] = open_regular_file(path, follow_symlinks=follow_symlinks)
        except OSError as exc:
            raise ConfigError(f"{label}: {file_problem(exc)}") from exc
        try:
            self.identity = FileIdentity.of(self._file.fileno())
            self._zip = self._open_zip()
            self.arrays: dict[str, ArrayInfo] = {}
            self._members: dict[str, zipfile.ZipInfo] = {}
            self._read_directory()
        except BaseException:
            self._file.close()
            raise

    def _open_zip(self) -> zipfile.ZipFile:
        if not zipfile.is_zipfile(self._file):
            raise ConfigError(f"{self.label}: not an .npz archive")
        try:
            return zipfile.ZipFile(self._file)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
            raise ConfigError(f"{self.label}: not an .npz archive ({exc})") from exc

    def _read_directory(self) -> None:
        infos = self._zip.infolist()
        if len(infos) > MAX_MEMBERS:
            raise ConfigError(f"{self.label}: {len(infos)} members, more than optc's limit of {MAX_MEMBERS}")
        total = 0
        for info in infos:
            if not info.filename.endswith(".npy") or info.is_dir():
                raise ConfigError(f"{self.label}: member '{info.filename[:200]}' is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in self.arrays:
                raise ConfigError(f"{self.label}: array '{name[:200]}' is stored twice")
            with self._open_member(info) as member:
                array = self._header(member, name)
                header_bytes = member.tell()
            if header_bytes + array.nbytes != info.file_size:
                raise ConfigError(
                    f"{self.label}: array '{name}' declares {list(array.shape)} {array.dtype} ({array.nbytes} bytes) "
                    f"but its member holds {info.file_size - header_bytes} bytes"
                )
            total += array.nbytes
            if total > MAX_ARCHIVE_BYTES:
                raise ConfigError(
                    f"{self.label}: its arrays take over {MAX_ARCHIVE_BYTES >> 20} MiB decompressed (optc's limit per file); "
                    "split the data into a folder of smaller .npz files"
                )
            self.arrays[name] = array
            self._members[name] = info

    def _open_member(self, info: zipfile.ZipInfo) -> Any:
        try:
            return self._zip.open(info)
        except _READ_ERRORS as exc:
            raise ConfigError(f"{self.label}: cannot read member '{info.filename[:200]}': {exc}") from exc

    def _header(self, member: IO[bytes], name: str) -> ArrayInfo:
        fmt = np.lib.format
        try:
            version = fmt.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = fmt.read_array_header_1_0(member)
            elif version in ((2, 0), (3, 0)):
                shape, fortran_order, dtype = fmt.read_array_header_2_0(member)
            else:
                raise ValueError(f"unknown .npy format version {version}")
        except Exception as exc:  # numpy reports a bad header as ValueError, SyntaxError, TokenError...
            raise ConfigError(f"{self.label}: array '{name}' has no readable .npy header ({type(exc).__name__}: {exc})") from exc
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in "biufcSU":
            raise ConfigError(f"{self.label}: array '{name}' has dtype {dtype}; only plain numeric and fixed-width string arrays are read (nothing is unpickled)")
        return ArrayInfo(dtype, tuple(int(d) for d in shape), bool(fortran_order))

    def read(self, name: str) -> np.ndarray:
        """Decompress one array (its header is checked again against the directory's)."""
        info = self.arrays[name]
        try:
            with self._open_member(self._members[name]) as member:
                if self._header(member, name) != info:
                    raise ConfigError(f"{self.label}: array '{name}' changed while it was read")
                flat = np.empty(math.prod(info.shape), dtype=info.dtype)
                view = memoryview(flat).cast("B")
                done = 0
                while done < info.nbytes:
                    chunk = member.read(min(_CHUNK, info.nbytes - done))
                    if not chunk:
                        raise ConfigError(f"{self.label}: array '{name}' ends early")
                    view[done : done + len(chunk)] = chunk
                    done += len(chunk)
                member.read(1)  # reaching the end checks the member's CRC
        except _READ_ERRORS as exc:
            raise ConfigError(f"{self.label}: array '{name}' cannot be read: {exc}") from exc
        if info.fortran_order:
            return flat.reshape(info.shape[::-1]).transpose()
        return flat.reshape(info.shape)

    def digest(self) -> bytes:
        """blake2b of the file's bytes as opened (the archive as stored, not decompressed)."""
        h = hashlib.blake2b(digest_size=16)
        position = self._file.tell()
        self._file.seek(0)
        while block := self._file.read(1 << 20):
            h.update(block)
        self._file.seek(position)
        return h.digest()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def __enter__(self) -> "NpzArchive":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
