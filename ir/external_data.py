"""External-data safety: a model file must never make optc read or write
outside its own folder.

A location is refused when it is absolute, contains ``..``, or resolves
(through symlinks) to a path outside the model's folder. onnx >= 1.21 has
defences of its own; these checks run first so the message names the tensor
and the rule it broke, and so the same rules hold when saving.

Reading does not trust a checked path: the file is opened relative to a
descriptor of the model folder, one component at a time with ``O_NOFOLLOW``.
A symbolic link met on the way is followed by optc itself, and only while it
stays inside the folder (at most :data:`MAX_SYMLINKS` of them). The opened
descriptor must be a regular file with a single hard link (a hard link inside
the folder can name any file of the device, ``/etc/passwd`` included) on the
folder's own device, and the bytes are read from that descriptor.
"""
from __future__ import annotations

import os
import stat
from collections import deque
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import onnx

from optc.errors import ModelLoadError
from optc.ir.model import iter_all_tensors, tensor_nbytes

# Symbolic links followed while resolving one location (Linux's own limit is 40).
MAX_SYMLINKS = 40


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for t in iter_all_tensors(graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def check_location(location: str, base_dir: Path, *, tensor: str, must_exist: bool) -> Path:
    """Return the resolved file for ``location`` or raise :class:`ModelLoadError`.

    The rules on the location string itself; reading opens the file again
    without trusting this answer (see :func:`load_external_data`).
    """
    if not location:
        raise ModelLoadError(f"tensor '{tensor}': external data has no location")
    if "\0" in location:
        raise ModelLoadError(f"tensor '{tensor}': external data location {location!r} contains a NUL byte")
    if (
        os.path.isabs(location)
        or PurePosixPath(location).is_absolute()
        or PureWindowsPath(location).is_absolute()
        or PureWindowsPath(location).drive
    ):
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}' is absolute; only paths inside the model folder are allowed")
    parts = PurePosixPath(location.replace("\\", "/")).parts
    if ".." in parts:
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}' contains '..' and may point outside the model folder; only paths inside it are allowed")
    try:
        base = base_dir.resolve()
        target = (base / location).resolve()
    except RuntimeError as exc:  # pathlib's "Symlink loop"
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}' is a loop of symbolic links") from exc
    except OSError as exc:
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}': {exc.strerror}") from exc
    if target != base and base not in target.parents:
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}' resolves outside the model folder (to {target})")
    if must_exist and not target.is_file():
        raise ModelLoadError(f"tensor '{tensor}': external data file '{location}' is missing next to the model")
    return target


def load_external_data(graph: onnx.GraphProto, base_dir: Path) -> int:
    """Check every location, then read every external payload into its tensor. Returns how many.

    optc reads the bytes itself (onnx refuses every symlink, even one that stays
    inside the folder; containment is what matters, see the module docstring).
    """
    tensors = list(external_tensors(graph))
    if not tensors:
        return 0
    for t in tensors:
        check_location(external_info(t).get("location", ""), base_dir, tensor=t.name, must_exist=False)
    opened: dict[str, int] = {}
    try:
        base_fd = os.open(base_dir, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ModelLoadError(f"cannot open the model folder {base_dir}: {exc.strerror}") from exc
    try:
        for t in tensors:
            info = external_info(t)
            location = info["location"]
            if location not in opened:
                opened[location] = _open_inside(base_fd, base_dir, location, t.name)
            _read_payload(t, opened[location], info)
    finally:
        for fd in opened.values():
            os.close(fd)
        os.close(base_fd)
    return len(tensors)


def _read_payload(t: onnx.TensorProto, fd: int, info: dict[str, str]) -> None:
    size = os.fstat(fd).st_size
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else size - offset
    except ValueError as exc:
        raise ModelLoadError(f"tensor '{t.name}': external data offset/length is not an integer") from exc
    if offset < 0 or length < 0 or offset + length > size:
        raise ModelLoadError(
            f"tensor '{t.name}': external data range [{offset}, {offset + length}) is beyond the end of "
            f"'{info['location']}' ({size} bytes)"
        )
    want = tensor_nbytes(t) if t.data_type != onnx.TensorProto.STRING else length
    if length != want:
        raise ModelLoadError(f"tensor '{t.name}': external data holds {length} bytes, its dims {list(t.dims)} need {want}")
    payload = os.pread(fd, length, offset) if length else b""
    if len(payload) != length:
        raise ModelLoadError(f"tensor '{t.name}': external data file ended early")
    t.raw_data = payload
    t.data_location = onnx.TensorProto.DEFAULT
    del t.external_data[:]


def _open_inside(base_fd: int, base_dir: Path, location: str, tensor: str) -> int:
    """A read-only descriptor of ``location`` opened without leaving the folder of ``base_fd``."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    base_real = os.path.realpath(base_dir)
    where = f"tensor '{tensor}': external data '{location}'"
    dirs = [base_fd]  # the directories walked into; dirs[0] is the model folder
    pending = deque(_parts(location))
    links = 0
    try:
        while pending:
            part = pending.popleft()
            if part == "..":
                if len(dirs) == 1:
                    raise ModelLoadError(f"{where} resolves outside the model folder (through a symbolic link)")
                os.close(dirs.pop())
                continue
            last = not pending
            try:
                if last and _is_device(part, dirs[-1]):  # not even opened: opening a device can act
                    raise ModelLoadError(f"{where} is a device, not a regular file")
                fd = os.open(part, flags if last else flags | os.O_DIRECTORY, dir_fd=dirs[-1])
            except OSError as exc:
                target = _link_target(part, dirs[-1])
                if target is None:
                    if isinstance(exc, FileNotFoundError):
                        raise ModelLoadError(f"tensor '{tensor}': external data file '{location}' is missing next to the model") from exc
                    raise ModelLoadError(f"{where}: cannot open: {exc.strerror}") from exc
                links += 1
                if links > MAX_SYMLINKS:
                    raise ModelLoadError(f"{where}: more than {MAX_SYMLINKS} symbolic links (a loop?)") from exc
                if os.path.isabs(target):
                    inside = os.path.relpath(target, base_real)
                    if inside == ".." or inside.startswith("../") or os.path.isabs(inside):
                        raise ModelLoadError(f"{where} resolves outside the model folder (to {target})") from exc
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                    target = inside
                pending.extendleft(reversed(_parts(target)))
                continue
            if not last:
                dirs.append(fd)
                continue
            _check_opened(fd, base_fd, where)
            return fd
        raise ModelLoadError(f"{where} names a folder, not a file")
    finally:
        for d in dirs[1:]:
            os.close(d)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _is_device(name: str, dir_fd: int) -> bool:
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISBLK(mode)


def _link_target(name: str, dir_fd: int) -> str | None:
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return None


def _check_opened(fd: int, base_fd: int, where: str) -> None:
    st = os.fstat(fd)
    try:
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"{where} is not a regular file")
        if st.st_nlink != 1:
            raise ModelLoadError(
                f"{where} has {st.st_nlink} hard links; external data must be a file of its own "
                "(a hard link can name any file on the disk)"
            )
        if st.st_dev != os.fstat(base_fd).st_dev:
            raise ModelLoadError(f"{where} is on another file system than the model folder")
    except ModelLoadError:
        os.close(fd)
        raise
