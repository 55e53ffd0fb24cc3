"""Model statistics: parameters, bytes, MACs, weight sparsity, op histogram.

MACs are counted for the ops that dominate inference cost (Conv, ConvTranspose,
Gemm, MatMul) from inferred shapes, with symbolic dims (batch, sequence)
counted as 1; freeze shapes with --input-shape for other sizes. A node whose
shapes are not known is listed under ``macs_unknown`` rather than counted as
zero silently.

``params`` counts each weight's logical entries once, whatever its storage: a
weight stored packed (nonzeros + bitmask, ``pack-sparse``) or as an ONNX sparse
initializer counts its dense shape, not its values plus index or mask entries;
``nonzero_params`` counts the entries that are not zero. The packed form is
recognised from the model's ``optc.packed_weights`` metadata, checked against
the initializers present (a later pass that folds the decode subgraph back to
a dense weight leaves a stale entry, which is ignored).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optc.ir.model import Model, iter_all_tensors, iter_graphs, spec_from_value_info, tensor_nbytes

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
# Recurrent layers count their MACs too (Resemblyzer, 96 % of its weights in 3 LSTMs, read 65.5k a sample against
# about 216M), but their weights are not "compute weights": the passes that compress those leave them alone.
RECURRENT_OPS = ("LSTM", "GRU", "RNN")
PACKED_WEIGHTS_KEY = "optc.packed_weights"  # JSON: {values initializer: {"mask", "shape", "weight"}}


@dataclass
class WeightStat:
    name: str
    shape: tuple[int, ...]
    zero_fraction: float


@dataclass
class ModelStats:
    params: int
    nonzero_params: int
    param_bytes: int
    macs: int
    macs_per_node: dict[str, int]
    macs_unknown: list[str]
    weights: list[WeightStat]
    op_histogram: dict[str, int]
    nodes: int
    # symbolic dims past the leading (batch) one that MACs counted as 1: openWakeWord's melspectrogram read 271k
    # MACs per sample with its `samples` dim at 1, and 53.5M with 32,000 samples frozen
    macs_symbolic: list[str] = field(default_factory=list)

    @property
    def zero_fraction(self) -> float:
        """Zeros over all weights of compute ops, by element count."""
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        zeros = sum(w.zero_fraction * int(np.prod(w.shape)) for w in self.weights)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "param_bytes": self.param_bytes,
            "macs": self.macs,
            "macs_per_node": self.macs_per_node,
            "macs_unknown": self.macs_unknown,
            "macs_symbolic": self.macs_symbolic,
            "weight_zero_fraction": round(self.zero_fraction, 6),
            "weights": [{"name": w.name, "shape": list(w.shape), "zero_fraction": round(w.zero_fraction, 6)} for w in self.weights],
            "op_histogram": self.op_histogram,
            "nodes": self.nodes,
        }


def shape_map(model: Model) -> dict[str, tuple[int | str | None, ...]]:
    """Known shapes of every value: inputs, outputs, value_info and initializers."""
    return _graph_shapes(model.graph)


def compute_stats(model: Model) -> ModelStats:
    shapes = shape_map(model)
    g = model.graph
    macs: dict[str, int] = {}
    unknown: list[str] = []
    scalars = {t.name: int(numpy_helper.to_array(t).reshape(())) for t in iter_all_tensors(g)
               if t.data_type in _INT_TYPES and int(np.prod(t.dims, dtype=np.int64)) == 1}
    _graph_macs(g, shapes, "", macs, unknown, scalars)
    packed = packed_weights(model)
    params, nonzero, counts = _param_counts(g, packed)
    weight_names = _compute_weights(g)
    weights = []
    for t in g.initializer:
        if t.name in weight_names and t.data_type in _FLOAT_TYPES:
            shape, nz = counts[t.name]
            size = int(np.prod(shape, dtype=np.int64))
            weights.append(WeightStat(t.name, shape, float(size - nz) / max(size, 1)))
    for values, entry in packed.items():
        size = int(np.prod(entry["shape"], dtype=np.int64))
        weights.append(WeightStat(entry["weight"], tuple(entry["shape"]), 1 - entry["nonzero"] / max(size, 1)))
    tensors = list(iter_all_tensors(g))
    return ModelStats(
        params=params,
        nonzero_params=nonzero,
        param_bytes=sum(tensor_nbytes(t) for t in tensors),
        macs=sum(macs.values()),
        macs_per_node=macs,
        macs_unknown=unknown,
        weights=weights,
        op_histogram=dict(sorted(model.op_histogram().items(), key=lambda kv: (-kv[1], kv[0]))),
        nodes=len(g.node),
        macs_symbolic=_symbolic_dims(g, shapes),
    )


def _symbolic_dims(graph: onnx.GraphProto, shapes: dict) -> list[str]:
    """The symbolic dims, past each tensor's leading one, of the main graph's compute nodes (MACs count them as 1)."""
    names: dict[str, None] = {}
    for node in graph.node:
        if node.op_type in COMPUTE_OPS and node.domain in ("", "ai.onnx"):
            for tensor in (*node.input[:1], *node.output[:1]):
                for d in (shapes.get(tensor) or ())[1:]:
                    if isinstance(d, str) and d:
                        names[d] = None
        elif node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
            batch_axis = 0 if any(a.name == "layout" and a.i == 1 for a in node.attribute) else 1  # X: [seq, batch, in]
            for axis, d in enumerate(shapes.get(node.input[0]) or ()):
                if axis != batch_axis and isinstance(d, str) and d:
                    names[d] = None
    return list(names)


def _graph_macs(graph: onnx.GraphProto, shapes: dict, prefix: str, macs: dict[str, int], unknown: list[str],
                scalars: dict[str, int]) -> None:
    """MACs of ``graph``'s compute nodes into ``macs``, control flow included.

    An If counts its costlier branch (one of the two runs per sample); a Loop its body
    times a constant trip count, else once (and it is listed in ``unknown``); a Scan
    its body once per step along a static scan axis. Subgraph nodes are keyed
    ``outer_node/branch/node``, so they never shadow a main-graph node of the same name.
    """
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in COMPUTE_OPS or node.op_type in RECURRENT_OPS:
            count = node_macs(node, shapes)
            if count is None:
                unknown.append(prefix + node.name)
            else:
                macs[prefix + node.name] = count
        elif node.op_type in ("If", "Loop", "Scan"):
            _control_flow_macs(node, shapes, prefix, macs, unknown, scalars)


def _control_flow_macs(node: onnx.NodeProto, shapes: dict, prefix: str, macs: dict[str, int], unknown: list[str],
                       scalars: dict[str, int]) -> None:
    bodies = {a.name: a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH}
    counted = []
    for name, body in bodies.items():
        inner: dict[str, int] = {}
        inner_unknown: list[str] = []
        _graph_macs(body, {**shapes, **_graph_shapes(body)}, f"{prefix}{node.name}/{name}/", inner, inner_unknown, scalars)
        counted.append((sum(inner.values()), inner, inner_unknown))
    if not counted:
        return
    _, inner, inner_unknown = max(counted, key=lambda c: c[0])  # If: the costlier branch
    times = 1
    if node.op_type == "Loop":
        trips = scalars.get(node.input[0]) if node.input and node.input[0] else None
        if trips is None:
            unknown.append(f"{prefix}{node.name} (Loop: trip count not constant, one iteration counted)")
        times = trips if trips is not None else 1
    elif node.op_type == "Scan":
        axis_len = [d for d in (shapes.get(i, (None,)) for i in node.input[-1:]) if d]
        first = axis_len[0][0] if axis_len and axis_len[0] else None
        times = first if isinstance(first, int) else 1
    macs.update({k: v * times for k, v in inner.items()})
    unknown.extend(inner_unknown)


def _graph_shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        spec = spec_from_value_info(vi)
        if spec.shape is not None:
            out[vi.name] = spec.shape
    for t in graph.initializer:
        out[t.name] = tuple(t.dims)
    return out


def record_packed_weights(model: Model, entries: dict[str, dict]) -> None:
    """Add packed weights (values initializer -> ``{"mask", "shape", "weight"}``) to the model's metadata."""
    props = {p.key: p for p in model.proto.metadata_props}
    known = json.loads(props[PACKED_WEIGHTS_KEY].value) if PACKED_WEIGHTS_KEY in props else {}
    known.update(entries)
    if PACKED_WEIGHTS_KEY in props:
        props[PACKED_WEIGHTS_KEY].value = json.dumps(known, sort_keys=True)
    else:
        model.proto.metadata_props.add(key=PACKED_WEIGHTS_KEY, value=json.dumps(known, sort_keys=True))


def packed_weights(model: Model) -> dict[str, dict]:
    """The packed weights whose values and mask initializers are both in the graph, with ``nonzero`` counts."""
    raw = next((p.value for p in model.proto.metadata_props if p.key == PACKED_WEIGHTS_KEY), None)
    if raw is None:
        return {}
    try:
        entries = json.loads(raw)
    except ValueError:
        return {}
    inits = {t.name: t for t in model.graph.initializer}
    found = {}
    for values, entry in entries.items():
        if isinstance(entry, dict) and values in inits and entry.get("mask") in inits:
            found[values] = {**entry, "nonzero": int(np.prod(inits[values].dims, dtype=np.int64))}
    return found


def _param_counts(graph: onnx.GraphProto, packed: dict[str, dict]) -> tuple[int, int, dict[str, tuple[tuple[int, ...], int]]]:
    """(logical entries, nonzero entries) over every stored tensor (see the module doc), and each
    tensor's (shape, nonzero count) by name, the first of a name (the main graph's) kept: every
    tensor is read once, here, since stats run before and after every pass."""
    masks = {e["mask"] for e in packed.values()}
    params = nonzero = 0
    counts: dict[str, tuple[tuple[int, ...], int]] = {}
    for t in iter_all_tensors(graph):
        size = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
        nz = size if t.data_type == onnx.TensorProto.STRING else int(np.count_nonzero(numpy_helper.to_array(t)))
        counts.setdefault(t.name, (tuple(int(d) for d in t.dims), nz))
        if t.name in masks:
            continue
        if t.name in packed:
            params += int(np.prod(packed[t.name]["shape"], dtype=np.int64))
            nonzero += size
        else:
            params += size
            nonzero += nz
    for g in iter_graphs(graph):  # sparse initializers: dense shape, stored values (indices are storage)
        for sp in g.sparse_initializer:
            values = int(np.prod(sp.values.dims, dtype=np.int64))
            indices = int(np.prod(sp.indices.dims, dtype=np.int64))
            params += int(np.prod(sp.dims, dtype=np.int64)) - values - indices
            nonzero -= indices
    return params, nonzero, counts


_INT_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}


def _compute_weights(graph: onnx.GraphProto) -> set[str]:
    names: set[str] = set()
    for node in graph.node:
        if node.op_type in COMPUTE_OPS:
            names.update(i for i in node.input[:3] if i)
    return names


def _static(shape) -> tuple[int, ...] | None:
    """Concrete dims; symbolic dims (batch, sequence) count as 1 so MACs are per sample."""
    if shape is None or any(d is None for d in shape):
        return None
    return tuple(d if isinstance(d, int) else 1 for d in shape)


def node_macs(node: onnx.NodeProto, shapes: dict) -> int | None:
    """Multiply-accumulates of one compute node, or None when shapes are not static."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type in ("Conv", "ConvTranspose"):
        x, w = _static(shapes.get(node.input[0])), _static(shapes.get(node.input[1]))
        y = _static(shapes.get(node.output[0]))
        if x is None or w is None or y is None:
            return None
        kernel = int(np.prod(w[2:]))
        if node.op_type == "Conv":
            # each output element: Cin/group * kernel MACs
            return int(np.prod(y)) * w[1] * kernel
        # ConvTranspose: each input element scatters into Cout/group * kernel outputs
        return int(np.prod(x)) * w[1] * kernel
    if node.op_type == "Gemm":
        a, b = _static(shapes.get(node.input[0])), _static(shapes.get(node.input[1]))
        if a is None or b is None:
            return None
        m, k = (a[1], a[0]) if attrs.get("transA", 0) else (a[0], a[1])
        n = b[0] if attrs.get("transB", 0) else b[1]
        return m * k * n
    if node.op_type == "MatMul":
        a, b = _static(shapes.get(node.input[0])), _static(shapes.get(node.input[1]))
        y = _static(shapes.get(node.output[0]))
        if a is None or b is None or y is None:
            return None
        k = a[-1] if len(a) >= 1 else 1
        return int(np.prod(y)) * k
    if node.op_type in RECURRENT_OPS:
        # every step of every direction: the gates' input and recurrent products, [gates*hidden, in + hidden]
        x, w, r = (_static(shapes.get(node.input[i])) if len(node.input) > i and node.input[i] else None for i in range(3))
        if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
            return None
        return x[0] * x[1] * w[0] * (w[1] * w[2] + r[1] * r[2])
    return None
