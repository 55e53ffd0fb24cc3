"""External-data safety: a model file must never make optc read or write
outside its own folder.

A location is refused when it is absolute, contains ``..``, or resolves
(through symlinks) to a path outside the model's folder. onnx >= 1.21 has
defences of its own; these checks run first so the message names the tensor
and the rule it broke, and so the same rules hold when saving.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterator

import onnx

from optc.errors import ModelLoadError
from optc.ir.model import iter_all_tensors


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def external_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    for t in iter_all_tensors(graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def check_location(location: str, base_dir: Path, *, tensor: str, must_exist: bool) -> Path:
    """Return the resolved file for ``location`` or raise :class:`ModelLoadError`."""
    if not location:
        raise ModelLoadError(f"tensor '{tensor}': external data has no location")
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
    base = base_dir.resolve()
    target = (base / location).resolve()
    if target != base and base not in target.parents:
        raise ModelLoadError(f"tensor '{tensor}': external data location '{location}' resolves outside the model folder (to {target})")
    if must_exist and not target.is_file():
        raise ModelLoadError(f"tensor '{tensor}': external data file '{location}' is missing next to the model")
    return target


def validate_external_data(graph: onnx.GraphProto, base_dir: Path) -> list[tuple[onnx.TensorProto, Path, int, int]]:
    """Check every external tensor of ``graph`` before any byte is read.

    Returns:
        (tensor, file, offset, length) for each tensor stored externally.
    """
    found = []
    for t in external_tensors(graph):
        info = external_info(t)
        path = check_location(info.get("location", ""), base_dir, tensor=t.name, must_exist=True)
        size = path.stat().st_size
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
        found.append((t, path, offset, length))
    return found


def load_external_data(graph: onnx.GraphProto, base_dir: Path) -> int:
    """Validate, then read every external payload into its tensor. Returns how many.

    optc reads the bytes itself (onnx refuses every symlink, even one that stays
    inside the folder; containment is what matters and is checked above).
    """
    entries = validate_external_data(graph, base_dir)
    for tensor, path, offset, length in entries:
        with open(path, "rb") as f:
            f.seek(offset)
            payload = f.read(length)
        if len(payload) != length:
            raise ModelLoadError(f"tensor '{tensor.name}': external data file ended early")
        tensor.raw_data = payload
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    return len(entries)
