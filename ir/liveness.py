"""Scans of the model's protobuf that tell a pass it has nothing to do, before any graph is imported.

Importing a graph into onnx-graphsurgeon costs about 0.15 ms a node (15 s for
100,000 nodes), and every canonicalize pass would pay it on every model. These
scans are one pass over the node list each. They answer for the top-level
graph and are conservative: a node holding a subgraph (whose body reads outer
names) or anything they cannot tell about makes them answer "maybe", and the
pass does its full work as before.
"""
from __future__ import annotations

from collections.abc import Collection

import onnx
from optc.ir.model import Model

SHAPE_OPS = frozenset({"Shape", "Size"})  # where onnx-graphsurgeon's shape folding starts


def _has_subgraphs(graph: onnx.GraphProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def may_have_dead_code(model: Model) -> bool:
    """False when every node feeds a graph output and every initializer is read (nothing for cleanup to drop)."""
    graph = model.graph
    if _has_subgraphs(graph):
        return True
    producer = {}
    for i, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = i
    live: set[int] = set()
    used: set[str] = set()
    stack = [o.name for o in graph.output]
    while stack:
        name = stack.pop()
        if name in used:
            continue
        used.add(name)
        i = producer.get(name)
        if i is not None and i not in live:
            live.add(i)
            stack.extend(n for n in graph.node[i].input if n)
    return len(live) != len(graph.node) or any(t.name not in used for t in graph.initializer)


def may_fold(model: Model, *, fold_shapes: bool, exclude_ops: Collection[str]) -> bool:
    """False when no node computes from constants alone (nor, with ``fold_shapes``, reads a shape)."""
    graph = model.graph
    if _has_subgraphs(graph) or graph.sparse_initializer:
        return True
    constant = {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if node.op_type == "Constant" or (fold_shapes and node.op_type in SHAPE_OPS):
            return True
        if node.op_type not in exclude_ops and all(name in constant for name in node.input):
            return True
    return False


def has_ops(model: Model, ops: Collection[str]) -> bool:
    """Whether a top-level node is one of ``ops`` (of any domain)."""
    return any(n.op_type in ops for n in model.graph.node)
