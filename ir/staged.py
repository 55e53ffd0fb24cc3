"""Running a model in stages over the same feeds, each stage computing only what earlier stages did not.

A sequential refit (:mod:`optc.passes.layers.sequential_refit`) needs, layer after
layer, one layer's input as the model edited so far computes it. A session per
layer costs a whole model run per layer and feed, whatever output is asked:
onnxruntime runs every node of a session (YOLOv8n at 320x320: 13 ms for the
output of its third Conv, 17 ms for the model's output), so 46 refit layers of
YOLOv8n cost 46 x 2 x 32 full runs (150 of 180 s of prune-channels).

A :class:`StagedRun` keeps, for every feed, the values that nodes not yet run
still read (the frontier), and each :meth:`~StagedRun.stage` builds a session of
only the nodes between that frontier and the tensors asked for. After an edit,
:meth:`~StagedRun.update` forgets every value downstream of the edited nodes;
they are computed again, from the new weights, when asked for. So each stage
gives what a full run of the current model gives (up to onnxruntime's fusions,
which do not reach across a stage's edge: float rounding), and a sequence of
stages in graph order runs each node about once per feed.

Held values are bounded: past ``max_bytes`` (all feeds together) they are
dropped, and what is asked for later is computed again from the model's
inputs, as a session of the whole model would.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper

from optc.errors import OptcError
from optc.ir.model import Model
from optc.ir.session import Session, make_session


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from the scopes around it (a Loop or If body reading outer tensors)."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(name for name in node.input if name)
        for body in _subgraphs(node):
            reads |= _outer_reads(body)
    return reads - local


class _Index:
    """Producers and readers of a model's main graph, outer reads of subgraphs counted as reads."""

    def __init__(self, model: Model):
        graph = model.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: t for t in graph.initializer}
        self.inputs = {vi.name: vi for vi in graph.input if vi.name not in self.initializers}
        self.types = {vi.name: vi for vi in graph.value_info}
        self.producer: dict[str, int] = {}
        self.reads: list[list[str]] = []
        self.readers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            reads = [name for name in node.input if name]
            for body in _subgraphs(node):
                reads += sorted(_outer_reads(body))
            self.reads.append(reads)
            for name in dict.fromkeys(reads):
                self.readers[name].append(i)

    def downstream(self, nodes: Iterable[str]) -> set[str]:
        """Every tensor computed from an output of the named nodes, those outputs included."""
        by_name = {n.name: i for i, n in enumerate(self.nodes) if n.name}
        stack = [o for name in nodes if name in by_name for o in self.nodes[by_name[name]].output if o]
        seen: set[str] = set()
        while stack:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            for reader in self.readers.get(name, ()):
                stack.extend(o for o in self.nodes[reader].output if o)
        return seen


class StagedRun:
    """A model run over a fixed sequence of feeds in stages (see module docstring).

    Every stage must see the same feeds, in the same order: held values are keyed
    by the feed's position.
    """

    def __init__(self, model: Model, *, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._index = _Index(model)
        self._model = model
        self._held: set[str] = set()  # names held, for every feed
        self._values: list[dict[str, np.ndarray]] = []  # per feed
        self._computed: set[str] = set()  # valid for the current model, held or not
        self.nodes_run = 0  # nodes in the sessions of all stages so far (for tests and diagnostics)

    def update(self, model: Model, edited: Iterable[str]) -> None:
        """Continue with ``model``, which differs from the previous one only in the nodes named ``edited``
        (and in nodes it added after them); values computed from their outputs are forgotten."""
        self._index = _Index(model)
        self._model = model
        stale = self._index.downstream(edited)
        alive = set(self._index.producer)
        self._computed = {n for n in self._computed if n in alive and n not in stale}
        dropped = {n for n in self._held if n not in self._computed}
        self._forget(dropped)

    @contextlib.contextmanager
    def stage(self, names: Sequence[str]) -> Iterator["Stage"]:
        """A stage computing ``names`` for each feed (:meth:`Stage.run`), from the values held so far."""
        stage = Stage(self, list(dict.fromkeys(names)))
        try:
            yield stage
        except BaseException:
            self._forget(set(self._held))
            self._values = []
            raise
        self._finish(stage)

    # --- bookkeeping -----------------------------------------------------------------
    def _plan(self, names: list[str]) -> tuple[list[int], list[str], list[str]]:
        """The nodes to run, their inputs from outside (model inputs, held values), and what they export."""
        index = self._index
        needed: set[int] = set()
        stack = [n for n in names if n not in self._held]
        while stack:
            name = stack.pop()
            if name in self._held or name in index.inputs or name in index.initializers:
                continue
            producer = index.producer.get(name)
            if producer is None:
                raise OptcError(f"tensor '{name}' is neither computed by a node nor an input of the model")
            if producer in needed:
                continue
            needed.add(producer)
            stack.extend(index.reads[producer])
        nodes = sorted(needed)
        produced = {o for i in nodes for o in index.nodes[i].output if o}
        outside = dict.fromkeys(r for i in nodes for r in index.reads[i] if r not in produced and r not in index.initializers)
        done = self._computed | produced
        frontier = [o for o in sorted(produced) if any(not self._finished(r, done) for r in index.readers.get(o, ()) if r not in needed)]
        return nodes, list(outside), list(dict.fromkeys([n for n in names if n in produced] + frontier))

    def _finished(self, node: int, done: set[str]) -> bool:
        return all(o in done for o in self._index.nodes[node].output if o)

    def _finish(self, stage: "Stage") -> None:
        if stage.feeds_seen != len(self._values):
            # A stage saw other feeds than the stages before it: what is held does not line up.
            self._forget(set(self._held))
            self._values = []
            return
        self._computed |= stage.produced
        self._held |= set(stage.exports)
        done = self._computed
        dead = {n for n in self._held if all(self._finished(r, done) for r in self._index.readers.get(n, ()))}
        self._forget(dead)
        if sum(v.nbytes for values in self._values for v in values.values()) > self.max_bytes:
            self._forget(set(self._held))

    def _forget(self, names: set[str]) -> None:
        self._held -= names
        for values in self._values:
            for name in names:
                values.pop(name, None)


class Stage:
    """One stage of a :class:`StagedRun`: the session of the nodes it needs, run feed by feed."""

    def __init__(self, run: StagedRun, names: list[str]):
        self.run_ = run
        self.names = names
        nodes, self.inputs, self.exports = run._plan(names)
        index = run._index
        self.produced = {o for i in nodes for o in index.nodes[i].output if o}
        self.session: Session | None = None
        if nodes:
            first = run._values[0] if run._values else {}
            dtypes = {n: first[n].dtype for n in self.inputs if isinstance(first.get(n), np.ndarray)}
            # Not spinning: between runs the caller multiplies Grams, and onnxruntime's workers spinning
            # for the next run take the cores BLAS's threads need (a thin Gram product took 31 ms, not 0.4).
            self.session = make_session(_segment(run._model, index, nodes, self.inputs, dtypes, self.exports), spinning=False)
            run.nodes_run += len(nodes)
        self.feeds_seen = 0

    def run(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The asked tensors for the next feed (feeds in the order every stage sees them)."""
        run = self.run_
        position = self.feeds_seen
        self.feeds_seen += 1
        if position == len(run._values):
            run._values.append({})
        held = run._values[position]
        values: dict[str, np.ndarray] = {}
        if self.session is not None:
            missing = [n for n in self.inputs if n not in feed and n not in held]
            if missing:
                raise OptcError(f"staged run: feed {position} has no value for '{missing[0]}' (stages must see the same feeds)")
            inputs = {n: held[n] if n in held else feed[n] for n in self.inputs}
            values = dict(zip(self.exports, self.session.run(self.exports, inputs)))
            for name in self.exports:
                held[name] = values[name]
        return {n: values[n] if n in values else held[n] if n in held else feed[n] for n in self.names}


def _segment(model: Model, index: _Index, nodes: list[int], inputs: list[str], dtypes: Mapping[str, np.dtype],
             outputs: list[str]) -> Model:
    """A model of ``nodes`` (graph order) reading ``inputs``: the model's own inputs as it declares them,
    held values by their dtype (``dtypes``, shapes left open) or, failing that, their inferred type."""
    graph = helper.make_graph([index.nodes[i] for i in nodes], "stage", [], [])
    for name in inputs:
        vi = graph.input.add()
        known = index.types.get(name)
        if name in index.inputs:
            vi.CopyFrom(index.inputs[name])
        elif name in dtypes:
            vi.CopyFrom(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtypes[name]), None))
        elif known is not None:
            vi.CopyFrom(known)
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
        else:
            raise OptcError(f"staged run: the type of '{name}' is unknown")
    reads = {r for i in nodes for r in index.reads[i]}
    graph.initializer.extend(index.initializers[n] for n in sorted(reads) if n in index.initializers)
    for name in outputs:
        vi = graph.output.add()
        known = index.types.get(name)
        if known is not None and known.type.HasField("tensor_type"):
            vi.CopyFrom(known)
            vi.type.tensor_type.ClearField("shape")
        else:
            vi.name = name
    old = model.proto
    proto = helper.make_model(graph, opset_imports=list(old.opset_import), ir_version=old.ir_version)
    proto.functions.extend(old.functions)
    return Model(proto, model.source)
