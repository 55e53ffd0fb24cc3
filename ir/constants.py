"""Normalisations applied on load: weights in Constant nodes become initializers,
and every node gets a name.

Exporters such as paddle2onnx and tf2onnx keep every weight in a ``Constant``
node; passes look for weights among initializers, so without lifting they
would find nothing. Lifting is exact: the same tensor under the same name.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import numpy_helper

from optc.ir.model import Model

_VALUE_ATTRS = {
    "value_float": lambda a: np.array(a.f, dtype=np.float32),
    "value_floats": lambda a: np.array(list(a.floats), dtype=np.float32),
    "value_int": lambda a: np.array(a.i, dtype=np.int64),
    "value_ints": lambda a: np.array(list(a.ints), dtype=np.int64),
}


def constant_node_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node produces, or None when it is not a plain dense value."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
        return None
    attr = node.attribute[0]
    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
        tensor = onnx.TensorProto()
        tensor.CopyFrom(attr.t)
        return tensor
    make = _VALUE_ATTRS.get(attr.name)
    return numpy_helper.from_array(make(attr)) if make else None


def count_constant_weights(model: Model) -> int:
    """Constant nodes of the main graph holding more than one element (weights, not scalars)."""
    count = 0
    for node in model.graph.node:
        tensor = constant_node_tensor(node)
        if tensor is not None and int(np.prod(tensor.dims, dtype=np.int64)) > 1:
            count += 1
    return count


def lift_constant_nodes(model: Model) -> int:
    """Turn the main graph's ``Constant`` nodes into initializers. Returns how many."""
    graph = model.graph
    if model.proto.ir_version < 4:
        # Before IR 4 every initializer must also be a graph input; not worth it.
        return 0
    outputs = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    lifted: list[onnx.TensorProto] = []
    for node in graph.node:
        tensor = constant_node_tensor(node) if node.output and node.output[0] not in outputs else None
        if tensor is None:
            keep.append(node)
            continue
        tensor.name = node.output[0]
        lifted.append(tensor)
    if not lifted:
        return 0
    kept = [_copy(n) for n in keep]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(lifted)
    return len(lifted)


def name_unnamed_nodes(model: Model) -> int:
    """Give every unnamed node a unique name (``<OpType>_<n>``) so reports can cite it."""
    graph = model.graph
    taken = {n.name for n in graph.node if n.name}
    counts: Counter[str] = Counter()
    named = 0
    for node in graph.node:
        if node.name:
            continue
        while True:
            candidate = f"{node.op_type}_{counts[node.op_type]}"
            counts[node.op_type] += 1
            if candidate not in taken:
                break
        node.name = candidate
        taken.add(candidate)
        named += 1
    return named


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out

