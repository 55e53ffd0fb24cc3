"""Structural checks run on every model optc loads.

They run before onnx's checker so that the common ways a file can be broken
(no graph, cycles, dangling inputs, a tensor produced twice, an opset out of
range) get a message that names the problem and the nodes involved. After the
checker, strict shape inference rejects graphs no runtime can execute (a Concat
of tensors of different ranks), naming the node; declared shapes that merely
disagree with inference are tolerated.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path

import networkx as nx
import onnx

from optc.errors import ModelLoadError
from optc.ir.opset import check_upgradable
from optc.ir.weights import PLACEHOLDER_LOCATION, skeleton_copy

# Older models load when onnx's version converter can upgrade them (checked in ir/opset.py).
MIN_OPSET = 1
MAX_OPSET = onnx.defs.onnx_opset_version()


def validate_structure(proto: onnx.ModelProto) -> None:
    """Raise :class:`ModelLoadError` for a malformed model; toposort an unsorted one."""
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError("not an ONNX model (no IR version or no graph)")
    graph = proto.graph
    if len(graph.output) == 0:
        raise ModelLoadError("the graph is empty (no outputs)" if len(graph.node) == 0 else "the graph has no outputs")
    _check_opset(proto)
    produced = _check_single_assignment(graph)
    _check_dangling(graph, produced)
    _toposort_or_fail_on_cycle(graph)


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


def _check_dangling(graph: onnx.GraphProto, produced: set[str]) -> None:
    for node in graph.node:
        needed = [i for i in node.input if i] + sorted(_subgraph_free_names(node))
        for name in needed:
            if name not in produced:
                raise ModelLoadError(
                    f"node '{node.name or node.op_type}' reads '{name}', which no node, input or initializer produces"
                )
    for out in graph.output:
        if out.name not in produced:
            raise ModelLoadError(f"graph output '{out.name}' is not produced by any node")


def _toposort_or_fail_on_cycle(graph: onnx.GraphProto) -> None:
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    dag = nx.DiGraph()
    dag.add_nodes_from(range(len(graph.node)))
    for i, node in enumerate(graph.node):
        for name in list(node.input) + sorted(_subgraph_free_names(node)):
            if name in producer:
                dag.add_edge(producer[name], i)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        names = [graph.node[a].name or graph.node[a].op_type for a, _ in cycle]
        raise ModelLoadError("the graph has a cycle through nodes " + " -> ".join(names + names[:1]))
    order = list(nx.lexicographical_topological_sort(dag))
    if order != list(range(len(graph.node))):
        nodes = [graph.node[i] for i in order]
        copies = [onnx.NodeProto() for _ in nodes]
        for c, n in zip(copies, nodes):
            c.CopyFrom(n)
        del graph.node[:]
        graph.node.extend(copies)


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
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
