"""Detaching weight payloads from a model for a moment.

Whole-model protobuf copies are what make large models run out of memory (and
protobuf refuses to serialise more than 2 GiB). Checking, shape inference and
saving only need the graph, so the payloads of large tensors are moved out of
the protobuf, the small remainder is copied or serialised, and the payloads
are put back exactly as they were (same field, same bytes).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import onnx
from onnx import numpy_helper

from optc.ir.model import iter_all_tensors, tensor_nbytes

_DATA_FIELDS = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
# Integer tensors this small are kept: shape inference's data propagation
# reads Reshape targets and similar constants.
_KEEP_INT_BELOW_BYTES = 65536
PLACEHOLDER_LOCATION = "optc-detached-weights"


@dataclass
class DetachedTensor:
    tensor: onnx.TensorProto
    field: str
    payload: object
    location: int | None  # None: the field was unset (proto2 keeps set-to-default apart)

    def array(self) -> np.ndarray:
        """The tensor's value, read from the stashed payload."""
        probe = onnx.TensorProto()
        probe.data_type = self.tensor.data_type
        probe.dims.extend(self.tensor.dims)
        if self.field == "raw_data":
            probe.raw_data = self.payload  # type: ignore[assignment]
        else:
            getattr(probe, self.field).extend(self.payload)  # type: ignore[arg-type]
        return numpy_helper.to_array(probe)

    def raw_bytes(self) -> bytes:
        if self.field == "raw_data":
            return self.payload  # type: ignore[return-value]
        return self.array().tobytes()


def _should_detach(t: onnx.TensorProto, threshold: int) -> bool:
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
        return False
    nbytes = tensor_nbytes(t)
    if nbytes < threshold:
        return False
    if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and nbytes < _KEEP_INT_BELOW_BYTES:
        return False
    return True


@contextlib.contextmanager
def detached_weights(
    proto: onnx.ModelProto,
    threshold: int = 1024,
    mark_external: Callable[[onnx.TensorProto, DetachedTensor], None] | None = None,
) -> Iterator[list[DetachedTensor]]:
    """Move large tensor payloads out of ``proto`` for the duration of the block.

    Inside the block each detached tensor is marked as external data (by
    ``mark_external`` if given, else with a placeholder location), so that the
    checker and shape inference accept it. On exit every payload is restored
    into the field it came from.
    """
    stash: list[DetachedTensor] = []
    try:
        for t in iter_all_tensors(proto.graph):
            if not _should_detach(t, threshold):
                continue
            field = next((f for f in _DATA_FIELDS if f != "string_data" and _has_data(t, f)), None)
            if field is None:
                continue
            payload = t.raw_data if field == "raw_data" else list(getattr(t, field))
            item = DetachedTensor(t, field, payload, t.data_location if t.HasField("data_location") else None)
            t.ClearField(field)
            stash.append(item)
            if mark_external is not None:
                mark_external(t, item)
            else:
                mark_external_location(t, PLACEHOLDER_LOCATION)
        yield stash
    finally:
        for item in stash:
            t = item.tensor
            t.ClearField("external_data")
            if item.location is None:
                t.ClearField("data_location")
            else:
                t.data_location = item.location
            if item.field == "raw_data":
                t.raw_data = item.payload  # type: ignore[assignment]
            else:
                getattr(t, item.field).extend(item.payload)  # type: ignore[arg-type]


def mark_external_location(t: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None) -> None:
    """Point ``t`` at external data (onnx's helper insists on raw_data being present)."""
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    t.data_location = onnx.TensorProto.EXTERNAL


def _has_data(t: onnx.TensorProto, field: str) -> bool:
    if field == "raw_data":
        return t.HasField("raw_data")
    return len(getattr(t, field)) > 0


def skeleton_copy(proto: onnx.ModelProto, threshold: int = 1024) -> onnx.ModelProto:
    """A copy of ``proto`` whose large tensors are placeholders (graph only)."""
    skeleton = onnx.ModelProto()
    with detached_weights(proto, threshold):
        skeleton.CopyFrom(proto)
    return skeleton
