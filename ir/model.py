"""The in-memory model: an ``onnx.ModelProto`` plus what optc learnt about it.

``Model`` is deliberately thin: the protobuf stays the source of truth so that a
pass that changes nothing leaves the model byte-identical, and so that models
over 2 GB never need a second whole-model copy.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

# Initializers smaller than this stay inside the protobuf when a model is saved
# with external data; onnx uses the same default.
EXTERNAL_DATA_THRESHOLD_BYTES = 1024
# Above this many weight bytes a model is saved with external data even when
# it was loaded without: protobuf cannot serialise messages over 2 GiB.
PROTOBUF_LIMIT_BYTES = 2**31 - 1
EXTERNAL_SAVE_ABOVE_BYTES = 1_800_000_000


@dataclass(frozen=True)
class TensorSpec:
    """Name, element type and shape of a graph input or output.

    Dims are ints when known, strings for symbolic dims and None when unknown.
    """

    name: str
    dtype: np.dtype | None
    shape: tuple[int | str | None, ...] | None

    @property
    def is_static(self) -> bool:
        return self.shape is not None and all(isinstance(d, int) for d in self.shape)

    def describe(self) -> str:
        dims = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def numpy_dtype(onnx_type: int) -> np.dtype:
    """The numpy dtype of an ONNX TensorProto element type."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def spec_from_value_info(vi: onnx.ValueInfoProto) -> TensorSpec:
    t = vi.type.tensor_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type) if t.elem_type else None
    shape: tuple[int | str | None, ...] | None = None
    if t.HasField("shape"):
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(d.dim_value)
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        shape = tuple(dims)
    return TensorSpec(vi.name, np.dtype(dtype) if dtype is not None else None, shape)


@dataclass
class Model:
    """An ONNX model being compiled.

    Attributes:
        proto: the model; weights are held in memory (external data is loaded).
        source: the file it was loaded from, for messages.
        notes: facts learnt while loading or lifting (shown in reports).
        bound: inputs bound to constants (``--input-value``, :mod:`optc.ir.bind`): now initializers; data that
            still holds them is checked against these values.
    """

    proto: onnx.ModelProto
    source: Path | None = None
    notes: list[str] = field(default_factory=list)
    bound: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    @property
    def opset(self) -> int:
        """Version of the default ("" / ai.onnx) operator set."""
        for imp in self.proto.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 0

    @property
    def opset_imports(self) -> dict[str, int]:
        return {imp.domain or "ai.onnx": imp.version for imp in self.proto.opset_import}

    @property
    def initializer_names(self) -> set[str]:
        return {t.name for t in self.graph.initializer}

    @property
    def inputs(self) -> list[TensorSpec]:
        """Graph inputs that are real inputs (not initializers listed as inputs)."""
        inits = self.initializer_names
        return [spec_from_value_info(vi) for vi in self.graph.input if vi.name not in inits]

    @property
    def outputs(self) -> list[TensorSpec]:
        return [spec_from_value_info(vi) for vi in self.graph.output]

    def initializer(self, name: str) -> onnx.TensorProto | None:
        for t in self.graph.initializer:
            if t.name == name:
                return t
        return None

    def initializer_array(self, name: str) -> np.ndarray | None:
        t = self.initializer(name)
        return None if t is None else numpy_helper.to_array(t)

    def weight_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in iter_all_tensors(self.graph))

    def op_histogram(self) -> Counter[str]:
        return Counter(_qualified_op(n) for n in iter_all_nodes(self.graph))

    def fingerprint(self) -> str:
        """sha256 of the deterministic serialisation: equal exactly when the models are byte-identical."""
        return hashlib.sha256(self.proto.SerializeToString(deterministic=True)).hexdigest()

    def with_initializers(self, values: Mapping[str, np.ndarray]) -> "Model":
        """A new model in which the named initializers of the main graph hold ``values`` (names kept).

        Cheaper than an edit through :class:`~optc.ir.graph.GraphEditor` (which imports
        and exports the whole graph) when only weight values change: a sequential refit
        rewrites one layer's weights at a time, and a graph round trip per layer made
        it quadratic in the model (ddddocr's YOLOX-style detector: 26 of 307 s of a
        prune-channels run). The proto is built anew, not
        edited in place (see :mod:`optc.ir.weights` on upb's arena).
        """
        missing = set(values) - self.initializer_names
        if missing:
            raise KeyError(f"not initializers of the main graph: {', '.join(sorted(missing))}")
        proto = onnx.ModelProto()
        _copy_fields_except(self.proto, proto, "graph")
        _copy_fields_except(self.graph, proto.graph, "initializer")
        for t in self.graph.initializer:
            if t.name in values:
                proto.graph.initializer.append(numpy_helper.from_array(np.asarray(values[t.name]), t.name))
            else:
                proto.graph.initializer.add().CopyFrom(t)
        return Model(proto, self.source, list(self.notes), dict(self.bound))

    def set_initializers(self, values: Mapping[str, np.ndarray]) -> None:
        """Give the named initializers of the main graph new values (names kept), in place.

        For a model the caller made and owns (see :meth:`copy`): a layer-by-layer refit rewrites
        its weights one layer at a time, and a new model per layer copied every weight per layer
        (quadratic in the model). upb keeps a replaced payload's memory until the model goes,
        so each weight replaced costs its size once more, at most.
        """
        missing = set(values)
        for t in self.graph.initializer:
            if t.name in values:
                t.CopyFrom(numpy_helper.from_array(np.asarray(values[t.name]), t.name))
                missing.discard(t.name)
        if missing:
            raise KeyError(f"not initializers of the main graph: {', '.join(sorted(missing))}")

    def copy(self) -> "Model":
        """A deep copy (doubles memory: avoid for very large models)."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        return Model(proto, self.source, list(self.notes), dict(self.bound))


def _copy_fields_except(src, dst, skip: str) -> None:
    """Every set field of protobuf message ``src`` but ``skip`` into the empty message ``dst``."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _qualified_op(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def iter_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from iter_graphs(g)


def iter_all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for g in iter_graphs(graph):
        yield from g.node


def iter_all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers, sparse initializer values and Constant-node tensors of every graph."""
    for g in iter_graphs(graph):
        yield from g.initializer
        for sp in g.sparse_initializer:
            yield sp.values
            yield sp.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    yield attr.t
                elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor.values
                    yield attr.sparse_tensor.indices


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes of a tensor's payload, computed from dims (no data is touched)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    if t.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    try:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        itemsize = 1
    if t.data_type in _SUBBYTE_TYPES:
        return (n + 1) // 2
    return n * itemsize


_SUBBYTE_TYPES = {
    getattr(onnx.TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1")
    if hasattr(onnx.TensorProto, name)
}
