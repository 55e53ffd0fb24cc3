"""If branches as models of their own, and back.

A network exported with a branch on an input (Silero VAD picks its 16 kHz or
8 kHz network with an ``If`` on the sample rate) keeps every weight in ``If``
bodies, where a pass that walks the main graph finds nothing. A branch lifted
out by :func:`branch_model` is an ordinary model: its inputs are the outer
values the body reads, its outputs the body's, its opsets the main model's. A
pass rewrites it like any model, and :func:`put_back` returns the rewritten body
to its ``If``, renaming whatever the pass defined under a name the rest of the
model already uses (ONNX names are unique across scopes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from optc.ir.model import Model, iter_graphs, iter_all_tensors, tensor_nbytes

# A branch holding fewer weight bytes than this has nothing a pass would compress (a pad-mode switch, a shape fix-up).
MIN_BRANCH_WEIGHT_BYTES = 4096


@dataclass(frozen=True)
class Branch:
    """One body of a main-graph ``If``: the node's index, the attribute, and the outer names the body reads."""

    node_index: int
    node_name: str
    attribute: str  # then_branch / else_branch
    condition: str  # the If's condition tensor
    free: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"{self.node_name}/{self.attribute}"

    @property
    def taken_when(self) -> bool:
        return self.attribute == "then_branch"


def weighty_branches(model: Model) -> list[Branch]:
    """The bodies of the main graph's ``If`` nodes that hold weights (at least :data:`MIN_BRANCH_WEIGHT_BYTES`)."""
    out = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH and sum(tensor_nbytes(t) for t in iter_all_tensors(attr.g)) >= MIN_BRANCH_WEIGHT_BYTES:
                out.append(Branch(index, node.name or f"If#{index}", attr.name, node.input[0], tuple(sorted(free_names(attr.g)))))
    return out


def free_names(graph: onnx.GraphProto) -> set[str]:
    """Names ``graph`` reads from enclosing scopes: node inputs (nested bodies included) and outputs it does not define."""
    local = {t.name for t in graph.initializer} | {vi.name for vi in graph.input} | {o for n in graph.node for o in n.output}
    free: set[str] = set()
    for node in graph.node:
        free |= {i for i in node.input if i and i not in local}
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                free |= free_names(body) - local
    return free | {o.name for o in graph.output if o.name not in local}


def branch_model(model: Model, branch: Branch) -> Model | None:
    """The body as a model whose inputs are the outer values it reads; None when one of them has no known type.

    Outer initializers the body reads become the branch model's own (a pass may rewrite them;
    :func:`put_back` keeps a rewritten copy under a new name).
    """
    body = _body(model, branch)
    known = {vi.name: vi for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]}
    outer_inits = {t.name: t for t in model.graph.initializer}
    graph = onnx.GraphProto()
    graph.CopyFrom(body)
    graph.name = f"{model.graph.name or 'main'}.{branch.label}"
    for name in branch.free:
        if name in outer_inits:
            graph.initializer.append(outer_inits[name])
        elif name in known and known[name].type.HasField("tensor_type"):
            graph.input.append(known[name])
        else:
            return None
    proto = helper.make_model(graph, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    proto.functions.extend(model.proto.functions)
    return Model(proto, model.source)


def declare_rank(model: Model, name: str, rank: int) -> None:
    """Give graph input ``name``, whose shape was unknown, ``rank`` unknown dims (its samples then sit on axis 0)."""
    vi = next(vi for vi in model.graph.input if vi.name == name)
    vi.type.tensor_type.shape.Clear()
    for _ in range(rank):
        vi.type.tensor_type.shape.dim.add()


def put_back(model: Model, branch: Branch, rewritten: Model) -> list[str]:
    """Replace the body in ``model`` (in place) by ``rewritten``'s graph; returns the names it had to change."""
    body = _body(model, branch)
    outer_inits = {t.name: t for t in model.graph.initializer}
    graph = onnx.GraphProto()
    graph.CopyFrom(rewritten.graph)
    del graph.input[:]
    del graph.value_info[:]  # inferred for the branch model; the main model's inference fills them again
    kept = [t for t in graph.initializer if not (t.name in outer_inits and t == outer_inits[t.name])]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    # Names defined elsewhere in the model (outside this body) that the new body defines again.
    body.Clear()
    elsewhere = _defined(model.graph)
    renamed = sorted(_defined(graph) & elsewhere)
    if renamed:
        taken = elsewhere | _defined(graph)
        mapping = {}
        for name in renamed:
            new, k = f"{name}__{branch.attribute}", 1
            while new in taken:
                new, k = f"{name}__{branch.attribute}{k}", k + 1
            mapping[name] = new
            taken.add(new)
        _rename(graph, mapping)
    body.CopyFrom(graph)
    have = {(i.domain or "ai.onnx") for i in model.proto.opset_import}
    for imp in rewritten.proto.opset_import:
        if (imp.domain or "ai.onnx") not in have:
            model.proto.opset_import.append(imp)
    return renamed


def _body(model: Model, branch: Branch) -> onnx.GraphProto:
    node = model.graph.node[branch.node_index]
    return next(a.g for a in node.attribute if a.name == branch.attribute)


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Every name defined in ``graph`` and its bodies: inputs, initializers, node outputs."""
    names: set[str] = set()
    for g in iter_graphs(graph):
        names |= {vi.name for vi in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output if o}
    return names


def _rename(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for g in iter_graphs(graph):
        for t in g.initializer:
            t.name = mapping.get(t.name, t.name)
        for seq in (g.input, g.output, g.value_info):
            for vi in seq:
                vi.name = mapping.get(vi.name, vi.name)
        for node in g.node:
            node.input[:] = [mapping.get(i, i) for i in node.input]
            node.output[:] = [mapping.get(o, o) for o in node.output]


# An If whose condition is computed from constants is inlined when at most this many nodes compute it (a comparison of a
# bound setting with a constant, a cast or two); a longer computation is fold-constants' to fold, not this step's.
MAX_CONDITION_NODES = 32


def inline_decided_ifs(model: Model) -> list[str]:
    """Replace, in place, each main-graph ``If`` whose condition is a constant by the body it takes; returns their labels.

    What makes a condition constant is an input bound to a value (:mod:`optc.ir.bind`: Silero VAD's ``sr == 16000``).
    optc inlines these itself, before onnxruntime sees the model: onnxruntime's own inlining of a constant ``If`` refuses
    Silero's nested bodies, and so does onnx-graphsurgeon's. The body's nodes and initializers join the main graph (names
    the rest of the model already defines are renamed), and an Identity gives each of its outputs the ``If``'s name."""
    done = []
    while True:
        decided = decided_if(model)
        if decided is None:
            return done
        index, node, value = decided
        taken = "then_branch" if bool(np.asarray(value).ravel()[0]) else "else_branch"
        body = onnx.GraphProto()
        body.CopyFrom(next(a.g for a in node.attribute if a.name == taken))
        others = {vi.name for vi in model.graph.input} | {t.name for t in model.graph.initializer}
        for j, other in enumerate(model.graph.node):
            if j != index:
                others |= set(other.output)
                for attr in other.attribute:
                    for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                        others |= _defined(sub)
        clashes = sorted(_defined(body) & others)
        if clashes:
            _rename(body, {name: _fresh(name, others | _defined(body)) for name in clashes})
        label = f"{node.name or f'If#{index}'} ({taken.split('_')[0]})"
        nodes = list(body.node) + [helper.make_node("Identity", [inner.name], [outer], name=f"{node.name or 'If'}_{taken}_out{k}")
                                   for k, (inner, outer) in enumerate(zip(body.output, node.output))]
        model.graph.initializer.extend(body.initializer)
        kept = list(model.graph.node)
        del model.graph.node[:]
        model.graph.node.extend(kept[:index] + nodes + kept[index + 1:])
        done.append(label)


def decided_if(model: Model) -> tuple[int, onnx.NodeProto, np.ndarray] | None:
    """The first main-graph ``If`` whose condition is a constant: its index, node and condition value; None when none is.
    Reads the model only."""
    return next(((i, n, v) for i, n in enumerate(model.graph.node)
                 if n.op_type == "If" and n.domain in ("", "ai.onnx") and (v := _constant(model, n.input[0])) is not None), None)


def _fresh(name: str, taken: set[str]) -> str:
    new, k = f"{name}__inlined", 1
    while new in taken:
        new, k = f"{name}__inlined{k}", k + 1
    taken.add(new)
    return new


def _constant(model: Model, name: str) -> np.ndarray | None:
    """The value of main-graph tensor ``name`` when only initializers and Constant nodes feed it (at most
    :data:`MAX_CONDITION_NODES` nodes, none with a body), computed by onnx's reference evaluator; else None."""
    inits = {t.name: t for t in model.graph.initializer}
    if name in inits:
        return numpy_helper.to_array(inits[name])
    producer = {o: n for n in model.graph.node for o in n.output if o}
    graph_inputs = {vi.name for vi in model.graph.input} - set(inits)
    needed, todo, used_inits = [], [name], {}
    while todo:
        current = todo.pop()
        if current in inits:
            used_inits[current] = inits[current]
            continue
        node = producer.get(current)
        if node is None or current in graph_inputs or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        if node in needed:
            continue
        needed.append(node)
        if len(needed) > MAX_CONDITION_NODES:
            return None
        todo.extend(i for i in node.input if i)
    order = [n for n in model.graph.node if n in needed]  # the model's own order is topological
    graph = helper.make_graph(order, "condition", [], [helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)],
                              initializer=list(used_inits.values()))
    proto = helper.make_model(graph, opset_imports=list(model.proto.opset_import), ir_version=model.proto.ir_version)
    try:
        from onnx.reference import ReferenceEvaluator

        (value,) = ReferenceEvaluator(proto).run(None, {})
    except Exception:  # noqa: BLE001 - what the evaluator cannot compute stays an If for the runtime to decide
        return None
    value = np.asarray(value)
    return value if value.size == 1 else None
