"""Structural checks run on every model optc loads.

They run before onnx's checker so that the common ways a file can be broken
(no graph, cycles, dangling inputs, a tensor produced twice, an opset out of
range) get a message that names the problem and the nodes involved. After the
checker, strict shape inference rejects graphs no runtime can execute (a Concat
of tensors of different ranks), naming the node; declared shapes that merely
disagree with inference are tolerated.

Limits (a model past them is refused, so that the checks optc runs itself
stay fast and bounded): at most :data:`MAX_NODES` nodes in all graphs
together, names of at most :data:`MAX_NAME_CHARS` characters. Every check
here is linear in the size of the graph (a 100,000-node graph loads in seconds).
"""
from __future__ import annotations

import heapq
import math
import re
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx

from optc.errors import ModelLoadError, first_line
from optc.ir.model import Model, iter_all_tensors, iter_graphs
from optc.ir.opset import check_upgradable
from optc.ir.weights import PLACEHOLDER_LOCATION, skeleton_copy

# Older models load when onnx's version converter can upgrade them (checked in ir/opset.py).
MIN_OPSET = 1
MAX_OPSET = onnx.defs.onnx_opset_version()
# Nodes in the main graph and every subgraph together.
MAX_NODES = 1_000_000
# Tensor, node, input and output names, op types, domains and symbolic dims.
MAX_NAME_CHARS = 4096

_KNOWN_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != onnx.TensorProto.UNDEFINED)


def validate_structure(proto: onnx.ModelProto) -> None:
    """Raise :class:`ModelLoadError` for a malformed model; toposort an unsorted one."""
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError("not an ONNX model (no IR version or no graph)")
    graph = proto.graph
    if len(graph.output) == 0:
        raise ModelLoadError("the graph is empty (no outputs)" if len(graph.node) == 0 else "the graph has no outputs")
    _check_limits(graph)
    _check_interface(graph)
    _check_opset(proto)
    produced = _check_single_assignment(graph)
    free = [_subgraph_free_names(node) for node in graph.node]
    _check_dangling(graph, produced, free)
    _toposort_or_fail_on_cycle(graph, free)


def _check_limits(graph: onnx.GraphProto) -> None:
    nodes = 0
    for g in iter_graphs(graph):
        nodes += len(g.node)
        if nodes > MAX_NODES:
            raise ModelLoadError(f"the model has more than {MAX_NODES} nodes (optc's limit)")
        if _longest_name(g) <= MAX_NAME_CHARS:
            continue
        for name, what in _names(g):
            if len(name) > MAX_NAME_CHARS:
                raise ModelLoadError(f"{what} has a name of {len(name)} characters (optc's limit is {MAX_NAME_CHARS}): '{name[:40]}...'")


def _longest_name(g: onnx.GraphProto) -> int:
    """The length of the longest name in ``g`` (a fast pass; :func:`_names` says which one)."""
    values = (*g.input, *g.output, *g.value_info)
    return max(
        max((len(vi.name) for vi in values), default=0),
        max((len(d.dim_param) for vi in values for d in vi.type.tensor_type.shape.dim), default=0),
        max((len(t.name) for t in g.initializer), default=0),
        max((len(sp.values.name) for sp in g.sparse_initializer), default=0),
        max(
            (max(len(n.name), len(n.op_type), len(n.domain), max(map(len, n.input), default=0), max(map(len, n.output), default=0)) for n in g.node),
            default=0,
        ),
    )


def _names(g: onnx.GraphProto) -> Iterator[tuple[str, str]]:
    for vi in (*g.input, *g.output, *g.value_info):
        yield vi.name, "a graph input, output or value_info"
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                yield d.dim_param, f"a symbolic dim of '{vi.name[:40]}'"
    for t in g.initializer:
        yield t.name, "an initializer"
    for sp in g.sparse_initializer:
        yield sp.values.name, "a sparse initializer"
    for node in g.node:
        yield node.name, "a node"
        yield node.op_type, f"the op type of node '{node.name[:40]}'"
        yield node.domain, f"the domain of node '{node.name[:40]}'"
        for name in (*node.input, *node.output):
            yield name, f"a tensor of node '{node.name[:40]}'"


def _check_interface(graph: onnx.GraphProto) -> None:
    """Element types and dims of the graph's inputs and outputs, which optc turns into arrays."""
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for vi in values:
            if not vi.type.HasField("tensor_type"):
                continue
            t = vi.type.tensor_type
            if t.elem_type and t.elem_type not in _KNOWN_TYPES:
                raise ModelLoadError(f"graph {kind} '{vi.name}' has unknown element type {t.elem_type}")
            for d in t.shape.dim:
                if d.HasField("dim_value") and d.dim_value < 0:
                    raise ModelLoadError(
                        f"graph {kind} '{vi.name}' has a negative dim {d.dim_value}; a dynamic dim is a name (dim_param) or left unset"
                    )


def _check_opset(proto: onnx.ModelProto) -> None:
    versions = {imp.domain or "": imp.version for imp in proto.opset_import}
    uses_default = any(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    if "" not in versions and "ai.onnx" not in versions:
        if uses_default:
            raise ModelLoadError("the model imports no default (ai.onnx) opset but uses its operators")
        return
    version = versions.get("", versions.get("ai.onnx", 0))
    if version > MAX_OPSET:
        raise ModelLoadError(f"unsupported opset {version}: this onnx supports opsets {MIN_OPSET}..{MAX_OPSET}")
    if version < MIN_OPSET:
        raise ModelLoadError(f"unsupported opset {version}")
    check_upgradable(proto)


def _check_single_assignment(graph: onnx.GraphProto) -> set[str]:
    produced: dict[str, str] = {}
    for t in graph.initializer:
        produced[t.name] = "initializer"
    for sp in graph.sparse_initializer:
        produced[sp.values.name] = "initializer"
    for vi in graph.input:
        produced.setdefault(vi.name, "graph input")
    for node in graph.node:
        for out in node.output:
            if not out:
                continue
            if out in produced:
                raise ModelLoadError(
                    f"duplicate tensor name: '{out}' is produced twice (by {produced[out]} and node '{node.name or node.op_type}')"
                )
            produced[out] = f"node '{node.name or node.op_type}'"
    return set(produced)


def _subgraph_free_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope."""
    free: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {t.name for t in g.initializer} | {vi.name for vi in g.input}
            local |= {o for n in g.node for o in n.output}
            for n in g.node:
                free |= {i for i in n.input if i and i not in local}
                free |= _subgraph_free_names(n) - local
    return free


def _check_dangling(graph: onnx.GraphProto, produced: set[str], free: list[set[str]]) -> None:
    for node, outer in zip(graph.node, free):
        needed = [i for i in node.input if i] + sorted(outer)
        for name in needed:
            if name not in produced:
                raise ModelLoadError(
                    f"node '{node.name or node.op_type}' reads '{name}', which no node, input or initializer produces"
                )
    for out in graph.output:
        if out.name not in produced:
            raise ModelLoadError(f"graph output '{out.name}' is not produced by any node")


def _toposort_or_fail_on_cycle(graph: onnx.GraphProto, free: list[set[str]]) -> None:
    """Kahn's algorithm, taking the lowest-numbered ready node first: the file's
    order is kept when it is already topological. O(E log N)."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    preds: list[set[int]] = []
    succs: list[list[int]] = [[] for _ in graph.node]
    for i, node in enumerate(graph.node):
        mine = {producer[name] for name in _chain(node.input, free[i]) if name in producer}
        preds.append(mine)
        for p in mine:
            succs[p].append(i)
    waiting = [len(p) for p in preds]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in succs[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) < len(graph.node):
        names = [graph.node[i].name or graph.node[i].op_type for i in _a_cycle(preds, waiting)]
        raise ModelLoadError("the graph has a cycle through nodes " + " -> ".join(names + names[:1]))
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)


def _chain(a: Iterable[str], b: Iterable[str]) -> Iterator[str]:
    yield from a
    yield from b


def _a_cycle(preds: list[set[int]], waiting: list[int]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm left (each has a left-over predecessor), in edge order."""
    left = [i for i, w in enumerate(waiting) if w > 0]
    seen: dict[int, int] = {}
    path: list[int] = []
    node = left[0]
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(p for p in preds[node] if waiting[p] > 0)
    return list(reversed(path[seen[node]:]))


def check_tensor_payloads(graph: onnx.GraphProto) -> None:
    """Every stored tensor has a known type, non-negative dims and exactly the
    bytes (or elements) its dims declare. Run once external data is loaded.

    Without this a declared shape and its payload can disagree, and the first
    pass that reads the weight fails far from the cause.
    """
    for t in iter_all_tensors(graph):
        where = f"tensor '{t.name[:80]}'"
        if t.data_type not in _KNOWN_TYPES:
            raise ModelLoadError(f"{where} has unknown data type {t.data_type}")
        if any(d < 0 for d in t.dims):
            raise ModelLoadError(f"{where} has a negative dim in {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue
        count = math.prod(t.dims)
        if t.HasField("raw_data"):
            want = _raw_bytes(t.data_type, count)
            if want is not None and len(t.raw_data) != want:
                raise ModelLoadError(f"{where}: dims {list(t.dims)} need {want} bytes of data, it holds {len(t.raw_data)}")
            continue
        field, per = _TYPED_FIELDS.get(t.data_type, (None, 1))
        if field is None:
            continue
        have = len(getattr(t, field))
        if have != count * per and not (have == 0 and count == 0):
            raise ModelLoadError(f"{where}: dims {list(t.dims)} need {count * per} values in {field}, it holds {have}")


def _raw_bytes(data_type: int, count: int) -> int | None:
    """Bytes of ``count`` packed elements of ``data_type`` (None when optc does not know the packing)."""
    if data_type in _PACKED_BITS:
        return (count * _PACKED_BITS[data_type] + 7) // 8
    if data_type == onnx.TensorProto.STRING:
        return None
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


_T = onnx.TensorProto
_PACKED_BITS = {getattr(_T, n): b for n, b in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2)) if hasattr(_T, n)}
_TYPED_FIELDS = {
    _T.FLOAT: ("float_data", 1), _T.COMPLEX64: ("float_data", 2),
    _T.DOUBLE: ("double_data", 1), _T.COMPLEX128: ("double_data", 2),
    _T.INT64: ("int64_data", 1), _T.UINT32: ("uint64_data", 1), _T.UINT64: ("uint64_data", 1),
    _T.STRING: ("string_data", 1),
    **{t: ("int32_data", 1) for t in (_T.INT32, _T.INT16, _T.INT8, _T.UINT8, _T.UINT16, _T.BOOL, _T.FLOAT16, _T.BFLOAT16)},
}


def check_model(model: Model) -> None:
    """:func:`run_checker` on ``model``."""
    run_checker(model.proto)


def run_checker(proto: onnx.ModelProto) -> None:
    """onnx's checker on the graph alone: weight payloads are replaced by
    placeholders, so no whole-model copy is made and the 2 GiB limit does not apply.

    Then strict shape inference (what ``full_check`` adds), keeping only errors that
    make the graph impossible to run (a Concat of rank-2 and rank-3 tensors, a MatMul
    of mismatched dims); see :func:`_check_shape_consistency`.
    """
    skeleton = skeleton_copy(proto)
    with tempfile.TemporaryDirectory(prefix="optc-check-") as tmp:
        # The checker insists that external locations name a regular file.
        (Path(tmp) / PLACEHOLDER_LOCATION).touch()
        path = Path(tmp) / "skeleton.onnx"
        path.write_bytes(skeleton.SerializeToString())
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            first = first_line(exc)
            raise ModelLoadError(f"fails the ONNX checker: {first}") from exc
    _check_shape_consistency(skeleton)


# ``(op_type:Concat, node name: cat): [ShapeInferenceError] All inputs to Concat must have same rank...``
_NODE_ERROR = re.compile(r"\(op_type:(?P<op>[^,]*), node name: (?P<node>.*?)\): \[\w+\] (?P<message>.*)")
# A node's inferred type or shape disagreeing with a declared one (graph outputs,
# value_info) is a wrong annotation, not a wrong graph: onnxruntime warns and runs.
_ANNOTATION_CONFLICTS = ("existing shape differ", "differs from existing elem type")


def _check_shape_consistency(skeleton: onnx.ModelProto) -> None:
    """Raise :class:`ModelLoadError` naming the first node whose inputs strict
    shape inference finds inconsistent.

    ``skeleton`` is a copy without large payloads (shape inference reads only
    small constant inputs such as Reshape's shape); its declared intermediate and
    output shapes are dropped here, so that a wrong annotation neither rejects the
    model nor propagates into a false error downstream. Remaining conflicts with declared
    shapes and types (in subgraphs) are tolerated, and so is an error that names no
    node: only inconsistencies attributable to a node reject.
    """
    del skeleton.graph.value_info[:]
    for out in skeleton.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    try:
        onnx.shape_inference.infer_shapes(skeleton, check_type=True, strict_mode=True)
    except onnx.shape_inference.InferenceError as exc:
        for line in str(exc).splitlines():
            found = _NODE_ERROR.search(line)
            if found is None or any(c in found["message"] for c in _ANNOTATION_CONFLICTS):
                continue
            node = f"node '{found['node']}' ({found['op']})" if found["node"] else f"a {found['op']} node"
            raise ModelLoadError(f"fails ONNX shape inference at {node}: {found['message'].strip()}") from exc
