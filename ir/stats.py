"""Model statistics: parameters, bytes, MACs, weight sparsity, op histogram.

MACs are counted for the ops that dominate inference cost (Conv, ConvTranspose,
Gemm, MatMul) from inferred shapes, with symbolic dims (batch, sequence)
counted as 1; freeze shapes with --input-shape for other sizes. A node whose
shapes are not known is listed under ``macs_unknown`` rather than counted as
zero silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from optc.ir.model import Model, iter_all_tensors, spec_from_value_info, tensor_nbytes

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class WeightStat:
    name: str
    shape: tuple[int, ...]
    zero_fraction: float


@dataclass
class ModelStats:
    params: int
    param_bytes: int
    macs: int
    macs_per_node: dict[str, int]
    macs_unknown: list[str]
    weights: list[WeightStat]
    op_histogram: dict[str, int]
    nodes: int

    @property
    def zero_fraction(self) -> float:
        """Zeros over all weights of compute ops, by element count."""
        total = sum(int(np.prod(w.shape)) for w in self.weights)
        zeros = sum(w.zero_fraction * int(np.prod(w.shape)) for w in self.weights)
        return zeros / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "params": self.params,
            "param_bytes": self.param_bytes,
            "macs": self.macs,
            "macs_per_node": self.macs_per_node,
            "macs_unknown": self.macs_unknown,
            "weight_zero_fraction": round(self.zero_fraction, 6),
            "weights": [{"name": w.name, "shape": list(w.shape), "zero_fraction": round(w.zero_fraction, 6)} for w in self.weights],
            "op_histogram": self.op_histogram,
            "nodes": self.nodes,
        }


def shape_map(model: Model) -> dict[str, tuple[int | str | None, ...]]:
    """Known shapes of every value: inputs, outputs, value_info and initializers."""
    shapes: dict[str, tuple[int | str | None, ...]] = {}
    g = model.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        spec = spec_from_value_info(vi)
        if spec.shape is not None:
            shapes[vi.name] = spec.shape
    for t in g.initializer:
        shapes[t.name] = tuple(t.dims)
    return shapes


def compute_stats(model: Model) -> ModelStats:
    shapes = shape_map(model)
    g = model.graph
    macs: dict[str, int] = {}
    unknown: list[str] = []
    for node in g.node:
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        count = node_macs(node, shapes)
        if count is None:
            unknown.append(node.name)
        else:
            macs[node.name] = count
    weight_names = _compute_weights(g)
    weights = []
    for t in g.initializer:
        if t.name in weight_names and t.data_type in _FLOAT_TYPES:
            arr = numpy_helper.to_array(t)
            weights.append(WeightStat(t.name, tuple(arr.shape), float(np.count_nonzero(arr == 0)) / max(arr.size, 1)))
    tensors = list(iter_all_tensors(g))
    return ModelStats(
        params=sum(int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1 for t in tensors),
        param_bytes=sum(tensor_nbytes(t) for t in tensors),
        macs=sum(macs.values()),
        macs_per_node=macs,
        macs_unknown=unknown,
        weights=weights,
        op_histogram=dict(sorted(model.op_histogram().items(), key=lambda kv: (-kv[1], kv[0]))),
        nodes=len(g.node),
    )


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
    return None
