"""Editing and analysing the graph.

:class:`GraphEditor` is a typed facade over onnx-graphsurgeon: tensors know
their producers and consumers, removals keep the graph's interface intact, and
:meth:`GraphEditor.commit` ends every edit with ``cleanup().toposort()``.
:func:`to_networkx` gives a read-only view for analyses (dominators, groups).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from optc.ir.model import Model
from optc.ir.toposort import toposort

IR_INITIALIZERS_NOT_INPUTS = 4  # the first IR version whose initializers need not be graph inputs

Node = gs.Node
Tensor = gs.Tensor
Constant = gs.Constant
Variable = gs.Variable


class GraphEditor:
    """Edit a model through onnx-graphsurgeon, then :meth:`commit` a new :class:`Model`."""

    def __init__(self, model: Model):
        self.model = model
        self.graph: gs.Graph = gs.import_onnx(model.proto)
        self._fresh = 0
        self._taken: set[str] | None = None  # names in use (fresh_name), read on first need
        _detach_tensor_attributes(self.graph)

    # --- queries -----------------------------------------------------------------
    @property
    def nodes(self) -> list[gs.Node]:
        return self.graph.nodes

    @property
    def outputs(self) -> list[gs.Tensor]:
        """The graph outputs, in order."""
        return self.graph.outputs

    def tensors(self) -> dict[str, gs.Tensor]:
        return self.graph.tensors()

    def tensor(self, name: str) -> gs.Tensor | None:
        return self.graph.tensors().get(name)

    @staticmethod
    def producer(tensor: gs.Tensor) -> gs.Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: gs.Tensor) -> list[gs.Node]:
        return list(tensor.outputs)

    @staticmethod
    def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
        """The value of a constant tensor (an initializer), else None."""
        return np.asarray(tensor.values) if isinstance(tensor, gs.Constant) else None

    def is_graph_output(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.outputs)

    def is_graph_input(self, tensor: gs.Tensor) -> bool:
        return any(t is tensor for t in self.graph.inputs)

    def signature(self) -> list[tuple]:
        """Nodes with their wiring, order-free: toposort may reorder without changing anything."""
        return sorted((n.name, n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs)) for n in self.graph.nodes)

    # --- edits -------------------------------------------------------------------
    def fresh_name(self, stem: str) -> str:
        # The names in use are read once per editor, then kept up to date with the names handed out: only this
        # method makes names of the form ``stem__optcN``, and reading every tensor per call made packing a
        # MiniLM's sparse weights quadratic (6 % of a sparsify run).
        if self._taken is None:
            self._taken = set(self.graph.tensors().keys()) | {n.name for n in self.graph.nodes}
        while True:
            self._fresh += 1
            name = f"{stem}__optc{self._fresh}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def add_constant(self, stem: str, values: np.ndarray) -> gs.Constant:
        """A new initializer holding ``values``, with its shape kept (0-d stays 0-d)."""
        # Not np.ascontiguousarray: it returns at least 1-d, and onnxruntime's QDQ
        # fusions need scalar (0-d) scales and zero points.
        return gs.Constant(self.fresh_name(stem), np.asarray(values, order="C"))

    def add_node(
        self,
        op: str,
        inputs: Sequence[gs.Tensor],
        outputs: Sequence[gs.Tensor] | None = None,
        attrs: dict[str, Any] | None = None,
        name: str | None = None,
    ) -> gs.Node:
        outs = list(outputs) if outputs is not None else [gs.Variable(self.fresh_name(op))]
        node = gs.Node(op=op, name=name or self.fresh_name(op), attrs=attrs or {}, inputs=list(inputs), outputs=outs)
        self.graph.nodes.append(node)
        return node

    def add_after(self, node: gs.Node, op: str, value: np.ndarray, stem: str) -> gs.Node:
        """Insert ``op(node's output, value)`` (e.g. a bias ``Add``) right after ``node``.

        The new node's output takes over the old output tensor, so its name, its
        consumers and its place among the graph outputs stay as they were.
        """
        out = node.outputs[0]
        pre = gs.Variable(self.fresh_name(f"{node.name}_pre_{op.lower()}"), dtype=out.dtype, shape=out.shape)
        node.outputs[0] = pre
        return self.add_node(op, [pre, self.add_constant(stem, value)], outputs=[out], name=self.fresh_name(f"{stem}_{op.lower()}"))

    def replace_uses(self, old: gs.Tensor, new: gs.Tensor) -> None:
        """Point every consumer (and graph output slot) of ``old`` at ``new``."""
        for consumer in list(old.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is old:
                    consumer.inputs[i] = new
        self.graph.outputs = [new if t is old else t for t in self.graph.outputs]

    def bypass(self, node: gs.Node, input_index: int = 0) -> bool:
        """Remove a node whose output equals one of its inputs.

        When the output is a graph output, the graph keeps its output name: the
        input tensor takes the output's name instead. Returns False (and edits
        nothing) when that is impossible (the input is itself a graph input or
        output, or a constant).
        """
        src, dst = node.inputs[input_index], node.outputs[0]
        if self.is_graph_output(dst):
            if self.is_graph_input(src) or self.is_graph_output(src) or isinstance(src, gs.Constant):
                return False
            name, dtype, shape = dst.name, dst.dtype, dst.shape
            self.replace_uses(dst, src)
            src.name = name
            src.dtype = dtype or src.dtype
            src.shape = shape if shape is not None else src.shape
        else:
            self.replace_uses(dst, src)
        node.outputs.clear()
        node.inputs.clear()
        return True

    def fold_constants(self, *, fold_shapes: bool, max_bytes: int, exclude: Callable[[Node], bool], bodies: bool = True) -> None:
        """Replace every subgraph whose inputs are all constant by its value, computed by onnxruntime.

        ``bodies=False`` leaves If/Loop/Scan bodies alone (onnx-graphsurgeon does not apply ``exclude`` inside them).
        """
        # No inlining of an If whose condition folds: onnx-graphsurgeon renames the branch's outputs and
        # leaves their consumers reading the old names (Silero VAD's nested Ifs: a model onnxruntime refuses).
        options = dict(fold_shapes=fold_shapes, size_threshold=max_bytes, should_exclude_node=exclude, flatten_subgraphs=False,
                       recurse_subgraphs=bodies)
        if fold_shapes:
            self._split_shape_slices(self.graph, bodies)
        with quiet_graphsurgeon():
            toposort(self.graph)
            try:
                # Every constant subgraph in one onnxruntime run: DenseNet-121's 849 computed
                # weights in under a second, where partitioning copies the graph per part (618 s).
                self.graph.fold_constants(partitioning=None, error_ok=False, **options)
            except Exception:  # a subgraph onnxruntime cannot run: fold around it, part by part
                # "basic" retries a failing part unchanged until the recursion limit (minutes, or
                # out of memory, with large weights); "recursive" drops a node per retry: bounded.
                self.graph.fold_constants(partitioning="recursive", error_ok=True, **options)
            self.graph.cleanup(remove_unused_graph_inputs=False)

    def _split_shape_slices(self, graph: gs.Graph, bodies: bool) -> None:
        """Each ``Shape`` with ``start``/``end`` (opset 15) of a static tensor as a plain ``Shape`` and a ``Slice`` of it,
        which both fold to the same values (Slice clamps negative and outlying bounds as Shape does). onnx-graphsurgeon
        0.6's shape folding ignores the two attributes: ``Shape(x, start=1, end=2)`` of a static 2x3 ``x`` folded to
        [2, 3], not [3], and the model computed 5 where onnxruntime computes 3, with no error."""
        for node in list(graph.nodes):
            for body in _attribute_values(node) if bodies else ():
                if isinstance(body, gs.Graph):
                    self._split_shape_slices(body, bodies)
            if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)):
                continue
            shape = node.inputs[0].shape if node.inputs else None
            if shape is None or not all(isinstance(d, int) for d in shape):
                continue  # not folded: left as it is, so a fold that folds nothing changes nothing
            start, end = int(node.attrs.pop("start", 0)), int(node.attrs.pop("end", np.iinfo(np.int64).max))
            whole = gs.Variable(self.fresh_name(f"{node.outputs[0].name}_whole"), dtype=np.int64)
            sliced = node.outputs[0]
            node.outputs = [whole]
            bounds = [gs.Constant(self.fresh_name(f"{sliced.name}_{what}"), np.array([v], np.int64)) for what, v in
                      (("start", start), ("end", end), ("axis", 0))]
            graph.nodes.append(gs.Node("Slice", self.fresh_name(f"{node.name or 'shape'}_slice"), inputs=[whole, *bounds], outputs=[sliced]))

    def remove_dead_code(self) -> None:
        """Drop nodes no graph output depends on, and unused initializers; graph inputs stay."""
        with quiet_graphsurgeon():
            self.graph.cleanup(remove_unused_graph_inputs=False)

    def commit(self) -> Model:
        """Clean up, sort and export; model-level fields of the original are kept.

        Untouched weights are still the original TensorProtos (gs LazyValues).
        gs's exporter would copy each twice (make_graph, then make_model), so
        they are exported as stubs and copied once, straight into the new model.
        A source TensorProto's own name is not the tensor's: the ``value`` of a
        ``Constant`` node that gs folded is usually unnamed (``""``).
        """
        notes: list[str] = []
        toposort(self.graph.cleanup(remove_unused_graph_inputs=False))
        lazy: dict[str, Any] = {}
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues:
                source = tensor._values.tensor
                stub = onnx.TensorProto(name=source.name, data_type=source.data_type, dims=source.dims)
                lazy[tensor.name] = (tensor, tensor._values)
                tensor._values = LazyValues(stub)
        try:
            proto = gs.export_onnx(self.graph, do_type_check=False)
        finally:
            for tensor, values in lazy.values():
                tensor._values = values
        _restore_weights(proto.graph, lazy, frozenset())
        _hoist_shared_initializers(proto.graph)
        old = self.model.proto
        proto.ir_version = old.ir_version
        if proto.ir_version < IR_INITIALIZERS_NOT_INPUTS:
            # Below IR 4 every initializer must also be a graph input, and onnx-graphsurgeon's
            # export lists only the real inputs: shape inference then ignores the weights (MACs
            # read 0, prune sees no shapes, the version converter fails). IR 4 dropped that rule
            # and nothing else an opset <= 9 model uses, so raising it keeps the model valid.
            notes.append(f"IR version raised from {proto.ir_version} to {IR_INITIALIZERS_NOT_INPUTS}: initializers need not be graph inputs")
            proto.ir_version = IR_INITIALIZERS_NOT_INPUTS
        del proto.opset_import[:]
        proto.opset_import.extend(old.opset_import)
        for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
            setattr(proto, field, getattr(old, field))
        del proto.metadata_props[:]
        proto.metadata_props.extend(old.metadata_props)
        return Model(proto, self.model.source, list(self.model.notes) + [n for n in notes if n not in self.model.notes], dict(self.model.bound))


def _restore_weights(graph: onnx.GraphProto, lazy: dict[str, Any], outer: frozenset[str]) -> None:
    """Put the source weights back in place of :meth:`GraphEditor.commit`'s stubs, in ``graph`` and its subgraphs.

    gs exports an outer constant that a Loop or If body reads as an initializer
    of that body too: the body's stub is dropped where an enclosing graph holds
    the weight (the body reads it from there, as it did before the edit),
    else it gets the weight.
    """
    kept = []
    for init in graph.initializer:
        entry = lazy.get(init.name)
        if entry is not None and _is_stub(init):
            if init.name in outer:
                continue
            tensor, values = entry
            init.CopyFrom(values.tensor)
            init.name = tensor.name
        kept.append(init)
    if len(kept) != len(graph.initializer):
        copies = [onnx.TensorProto() for _ in kept]
        for copy, init in zip(copies, kept):
            copy.CopyFrom(init)
        del graph.initializer[:]
        graph.initializer.extend(copies)
    scope = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _restore_weights(body, lazy, scope)


def _hoist_shared_initializers(graph: onnx.GraphProto) -> None:
    """One copy of a weight that gs exported into several bodies: kept in ``graph``, which they all see.

    A ``Constant`` node whose value If/Loop bodies read (Silero VAD's LSTM weights, read by two nested
    Ifs) becomes a gs constant, and gs's exporter writes it into every body that reads it: the weights
    grew by half on export. A body's copy is dropped when ``graph`` holds the same tensor, or moved up
    when another body holds an identical one (a name two bodies define with different values is kept).
    """
    from optc.ir.model import iter_graphs

    bodies = list(iter_graphs(graph))[1:]
    top = {t.name: t for t in graph.initializer}
    held: dict[str, list[tuple[onnx.GraphProto, onnx.TensorProto]]] = {}
    for body in bodies:
        for t in body.initializer:
            held.setdefault(t.name, []).append((body, t))
    drop: dict[int, set[str]] = {}
    for name, copies in held.items():
        first = copies[0][1]
        same = all(t == first for _, t in copies[1:]) and (name not in top or top[name] == first)
        if not same or (len(copies) < 2 and name not in top):
            continue
        if name not in top:
            graph.initializer.append(first)
            top[name] = first
        for body, _ in copies:
            drop.setdefault(id(body), set()).add(name)
    for body in bodies:
        names = drop.get(id(body))
        if names:
            kept = [t for t in body.initializer if t.name not in names]
            copies = [onnx.TensorProto() for _ in kept]
            for copy, t in zip(copies, kept):
                copy.CopyFrom(t)
            del body.initializer[:]
            body.initializer.extend(copies)


def _is_stub(t: onnx.TensorProto) -> bool:
    """A tensor exported with its name, type and dims only (see :meth:`GraphEditor.commit`)."""
    return not t.raw_data and not t.external_data and not any(
        getattr(t, f) for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    )


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[None]:
    """onnx-graphsurgeon prints its warnings itself; keep them out of our output for this call only."""
    logger = gs.logger.G_LOGGER
    saved = logger.severity
    logger.severity = logger.ERROR
    try:
        yield
    finally:
        logger.severity = saved


def _detach_tensor_attributes(graph: gs.Graph) -> None:
    """Give tensor-valued node attributes (``Constant``'s and ``ConstantOfShape``'s
    ``value``...) their own TensorProto, so that no edit reaches the source model.

    gs imports them as views of the model's AttributeProtos, and its exporter (run
    by :meth:`GraphEditor.commit`, and by gs's folder on each subgraph it evaluates)
    sets each proto's name in place: to the gs tensor's name, or to the output's
    name once a ``Constant`` node is folded into a tensor. Only protos whose name
    would change are copied: in practice unnamed attribute values, which are small
    (loading lifts the weights held in ``Constant`` nodes into initializers).
    """
    for node in graph.nodes:
        for value in _attribute_values(node):
            if isinstance(value, gs.Graph):
                _detach_tensor_attributes(value)
            elif isinstance(value, gs.Constant) and type(value._values) is LazyValues:
                source = value._values.tensor
                names = {value.name}
                if node.op == "Constant":
                    names |= {t.name for t in node.outputs}
                if not source.HasField("name") or names != {source.name}:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(source)
                    value._values = LazyValues(copy)


def _attribute_values(node: gs.Node) -> Iterator[Any]:
    """Every value of ``node``'s attributes, a list's items one by one (an If's branches, a Constant's tensor)."""
    for attr in node.attrs.values():
        yield from attr if isinstance(attr, list) else (attr,)


def to_networkx(model: Model) -> nx.MultiDiGraph:
    """Nodes of the main graph keyed by name; an edge per tensor flowing between them.

    Node attributes: ``op`` and ``proto`` (the NodeProto). Edge attribute: ``tensor``.
    Graph inputs and initializers are not nodes; see :func:`tensor_sources`.
    """
    g = nx.MultiDiGraph()
    producer: dict[str, str] = {}
    for node in model.graph.node:
        g.add_node(node.name, op=node.op_type, proto=node)
        for out in node.output:
            if out:
                producer[out] = node.name
    for node in model.graph.node:
        for name in node.input:
            if name in producer:
                g.add_edge(producer[name], node.name, tensor=name)
    return g


def consumers_by_tensor(model: Model) -> dict[str, list[onnx.NodeProto]]:
    """For each tensor name, the nodes of the main graph that read it."""
    uses: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            if name:
                uses.setdefault(name, []).append(node)
    return uses


def producers_by_tensor(model: Model) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output if o}
