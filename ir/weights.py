"""Skeletons: a model's graph without its weight payloads.

Checking, shape inference and saving with external data only need the graph.
A skeleton is built field by field into a new protobuf, so the source model
is never touched: with protobuf's upb backend, clearing and re-setting a
payload in place does not free the arena memory it used, so every
detach/restore cycle would grow the process by the model's size.
"""
from __future__ import annotations

from typing import Callable

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from optc.ir.model import tensor_nbytes

_DATA_FIELDS = frozenset({"raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"})
# Integer tensors this small are kept: shape inference's data propagation
# reads Reshape targets and similar constants.
_KEEP_INT_BELOW_BYTES = 65536
PLACEHOLDER_LOCATION = "optc-detached-weights"

_A = onnx.AttributeProto
_HEAVY_ATTRS = {_A.TENSOR, _A.SPARSE_TENSOR, _A.GRAPH, _A.GRAPHS, _A.TENSORS, _A.SPARSE_TENSORS}

# Called for each detached tensor with (source, stub); the stub has every field but the data.
OnDetach = Callable[[onnx.TensorProto, onnx.TensorProto], None]


def mark_external_location(t: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None) -> None:
    """Point ``t`` at external data (onnx's helper insists on raw_data being present)."""
    del t.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    t.data_location = onnx.TensorProto.EXTERNAL


def _should_detach(t: onnx.TensorProto, threshold: int) -> bool:
    if t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING:
        return False
    nbytes = tensor_nbytes(t)
    if nbytes < threshold:
        return False
    if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) and nbytes < _KEEP_INT_BELOW_BYTES:
        return False
    return any(t.HasField(f) if f == "raw_data" else len(getattr(t, f)) > 0 for f in _DATA_FIELDS - {"string_data"})


def _copy_fields(src: Message, dst: Message, skip: frozenset[str] | set[str] | tuple[str, ...] = ()) -> None:
    for fd, value in src.ListFields():
        if fd.name in skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor(src: onnx.TensorProto, dst: onnx.TensorProto, threshold: int, on_detach: OnDetach | None) -> None:
    if not _should_detach(src, threshold):
        dst.CopyFrom(src)
        return
    _copy_fields(src, dst, skip=_DATA_FIELDS | {"external_data", "data_location"})
    if on_detach is None:
        mark_external_location(dst, PLACEHOLDER_LOCATION)
    else:
        on_detach(src, dst)


def _sparse(src: onnx.SparseTensorProto, dst: onnx.SparseTensorProto, threshold: int, on_detach: OnDetach | None) -> None:
    _copy_fields(src, dst, skip=("values", "indices"))
    _tensor(src.values, dst.values, threshold, on_detach)
    _tensor(src.indices, dst.indices, threshold, on_detach)


def _graph(src: onnx.GraphProto, dst: onnx.GraphProto, threshold: int, on_detach: OnDetach | None) -> None:
    _copy_fields(src, dst, skip=("node", "initializer", "sparse_initializer"))
    for t in src.initializer:
        _tensor(t, dst.initializer.add(), threshold, on_detach)
    for sp in src.sparse_initializer:
        _sparse(sp, dst.sparse_initializer.add(), threshold, on_detach)
    for node in src.node:
        out = dst.node.add()
        if not any(a.type in _HEAVY_ATTRS for a in node.attribute):
            out.CopyFrom(node)
            continue
        _copy_fields(node, out, skip=("attribute",))
        for a in node.attribute:
            da = out.attribute.add()
            if a.type not in _HEAVY_ATTRS:
                da.CopyFrom(a)
                continue
            _copy_fields(a, da, skip=("t", "g", "graphs", "tensors", "sparse_tensor", "sparse_tensors"))
            if a.HasField("t"):
                _tensor(a.t, da.t, threshold, on_detach)
            if a.HasField("g"):
                _graph(a.g, da.g, threshold, on_detach)
            for g in a.graphs:
                _graph(g, da.graphs.add(), threshold, on_detach)
            for t in a.tensors:
                _tensor(t, da.tensors.add(), threshold, on_detach)
            if a.HasField("sparse_tensor"):
                _sparse(a.sparse_tensor, da.sparse_tensor, threshold, on_detach)
            for s in a.sparse_tensors:
                _sparse(s, da.sparse_tensors.add(), threshold, on_detach)


def skeleton_copy(proto: onnx.ModelProto, threshold: int = 1024, on_detach: OnDetach | None = None) -> onnx.ModelProto:
    """A new model holding ``proto``'s graph with large payloads left out.

    Each left-out tensor keeps its name, type and dims and points at external
    data: a placeholder location, or whatever ``on_detach`` sets (saving uses
    it to write the payload and record offset and length).
    """
    skeleton = onnx.ModelProto()
    _copy_fields(proto, skeleton, skip=("graph",))
    if proto.HasField("graph"):
        _graph(proto.graph, skeleton.graph, threshold, on_detach)
    return skeleton


def skeleton_without_initializers(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Everything but the main graph's initializers (for streamed saving)."""
    skeleton = onnx.ModelProto()
    _copy_fields(proto, skeleton, skip=("graph",))
    _copy_fields(proto.graph, skeleton.graph, skip=("initializer",))
    return skeleton
