"""Channel dependency groups: which channels must be removed together (DepGraph-style).

Every Conv/Gemm/MatMul with a constant weight *creates* a channel space: its
output channels (weight rows). The analysis walks the graph in topological
order and tracks, for every tensor, which spaces its channel axis is made of:
a :class:`Layout` is a sequence of segments, each ``length`` channels of one
space, each channel spanning ``block`` consecutive features (``block > 1``
after a Flatten of ``[N, C, H, W]``). Removing channel ``j`` of a space then
means, everywhere the space flows:

* its **source**: weight row ``j`` (and bias entry ``j``) is dropped;
* **pass-through ops** (activations, BatchNorm, pooling, depthwise Conv,
  elementwise ops with a per-channel constant): entry ``j`` of every
  per-channel parameter is dropped (:class:`ParamSlice`);
* its **consumers** (the next Conv/Gemm/MatMul): the weight columns that
  read channel ``j`` are dropped (and refit, see :mod:`optc.passes.numerics.refit`).

Coupling: an elementwise op over two channelled tensors (a residual Add) must
keep the same channels on both sides, so their spaces are merged (union-find
via networkx) into one :class:`ChannelGroup`. Concat along the channel axis
concatenates layouts (an index map, no coupling); Flatten into a Gemm
multiplies ``block``.

Grouped convolutions (``1 < group < channels``): group ``h`` of a Conv with
``G`` groups reads input channels ``[h C_in/G, (h+1) C_in/G)`` and writes
output channels ``[h C_out/G, (h+1) C_out/G)``. After pruning it is still a
Conv with ``G`` groups only if every group keeps the same number of input
and of output channels. So a grouped conv is a source whose space is cut into
``G`` equal contiguous *blocks*, and a consumer that cuts its input's space
into ``G`` blocks; a group's ``blocks`` is the least common multiple over its
spaces (equal counts in the finer blocks give equal counts in the coarser), and
the choice keeps the same number of channels in each block. A consumer's group
``h`` then keeps, of its weight's input columns, those of the channels its
block kept.

A channel shuffle (ShuffleNet: Reshape ``[N, C, *S] -> [N, G, C/G, *S]``,
Transpose of axes 1 and 2, Reshape back) puts channel ``g C/G + i`` of its
input at position ``i G + g``: the segment is marked ``shuffle=G`` and keeps its
space. Pruned, the split needs the same count ``k`` in each of the ``G`` groups
(``G`` blocks), and the kept channel ranked ``r`` in group ``g`` goes to
position ``r G + g``. A grouped Conv with ``G'`` groups after it reads, in its
group ``h``, channels ``[h c/G', (h+1) c/G')`` of every shuffle group ``g``
(``c = C/G``): the space is cut into ``G G'`` blocks of ``c/G'``, and with equal
counts in each, group ``h`` of the pruned Conv again reads exactly what its
block kept (``c`` must be a multiple of ``G'``).

Anything the walk cannot prove safe freezes the spaces involved, with the
reason kept for the report: graph outputs, ops it does not know, reshapes other
than a flatten or a channel shuffle, normalisation over the channel axis
(LayerNorm statistics change when channels go), weights shared between nodes,
broadcasts it cannot align, grouped convolutions reading several spaces (a
concatenation: equal counts per group would tie the choices of different
groups), and shuffles of anything but one whole space.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from networkx.utils import UnionFind

from optc.ir.graph import consumers_by_tensor, producers_by_tensor
from optc.ir.model import Model, TensorSpec
from optc.ir.stats import shape_map
from optc.ir.view import NodeProto, attribute, attributes, constant_node_value, graph_nodes, initializers, output_names

PASS_THROUGH = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Gelu", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Exp", "Log", "Abs", "Neg", "Sqrt", "Reciprocal", "Sign", "Floor", "Ceil", "Round",
    "Clip", "Identity", "Dropout", "Cast", "ThresholdedRelu", "Sin", "Cos",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool", "Resize", "Upsample",
})
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu"})
REDUCTIONS = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceL2", "ReduceL1"})
# Inputs of these ops that are per-channel parameters (sliced with the channels).
CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class Segment:
    space: int
    length: int  # channels
    block: int = 1  # features per channel
    shuffle: int = 1  # > 1: the space's channels in channel-shuffle order over this many groups (see position_order)


def position_order(length: int, shuffle: int) -> np.ndarray:
    """The space's channel at each position of a segment: after a shuffle over ``G`` groups of
    ``c = length / G``, position ``i G + g`` holds channel ``g c + i``."""
    return np.arange(length).reshape(shuffle, length // shuffle).T.ravel()


Layout = tuple[Segment, ...]


def layout_size(layout: Layout) -> int:
    return sum(s.length * s.block for s in layout)


@dataclass(frozen=True)
class Channelled:
    axis: int  # non-negative, in the tensor's own rank
    rank: int
    layout: Layout


@dataclass(frozen=True)
class ParamSlice:
    """A constant input of a node whose ``axis`` is indexed like ``layout``."""

    node: str
    input_index: int
    axis: int
    layout: Layout


@dataclass(frozen=True)
class Source:
    """A node whose output channels (weight rows) make a space."""

    node: str
    op: str
    space: int


@dataclass(frozen=True)
class Consumer:
    """A Conv/Gemm/MatMul whose weight columns read a channelled input."""

    node: str
    op: str
    layout: Layout
    group: int = 1  # a grouped Conv: its group h reads block h of the (single-space) layout


@dataclass(frozen=True)
class ReshapeFix:
    """A Reshape whose constant target holds, at ``axis``, the feature count of ``layout`` divided by ``divide``:
    a flatten (axis 1), or a channel shuffle's split into ``[N, G, C/G, ...]`` (axis 2, divide G) and merge back."""

    node: str
    layout: Layout
    axis: int = 1
    divide: int = 1


@dataclass
class ChannelGroup:
    """Spaces that must keep the same channels, and every place that indexes them."""

    id: int
    spaces: list[int]
    size: int
    sources: list[Source] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # reasons; empty = prunable
    blocks: int = 1  # equal contiguous blocks that must each keep the same number of channels (grouped convs)

    @property
    def prunable(self) -> bool:
        return not self.frozen

    @property
    def name(self) -> str:
        return "+".join(s.node for s in self.sources) or f"group{self.id}"


@dataclass
class ChannelGraph:
    """The result of the analysis; read-only for the rest of the pass."""

    groups: list[ChannelGroup]
    space_group: dict[int, int]
    params: list[ParamSlice]
    consumers: list[Consumer]
    reshapes: list[ReshapeFix]

    def readers(self, group: int) -> list[Consumer]:
        """The consumers whose input holds channels of ``group``."""
        return [c for c in self.consumers if any(self.space_group[s.space] == group for s in c.layout)]


def analyse_channels(model: Model, protect: frozenset[str] = frozenset()) -> ChannelGraph:
    """Dependency groups of ``model`` (shapes must be inferred). ``protect``: node names or op types kept whole."""
    return _Walker(model, protect).run()


class _Walker:
    def __init__(self, model: Model, protect: frozenset[str]):
        self.model = model
        self.protect = protect
        self.shapes = shape_map(model)
        self.inits = initializers(model)
        self.outputs = output_names(model)
        self.producer = producers_by_tensor(model)
        self.readers = consumers_by_tensor(model)  # one entry per input slot that reads the tensor
        self.chan: dict[str, Channelled] = {}
        self.sizes: list[int] = []
        self.blocks: dict[int, int] = {}  # space -> equal blocks its grouped convolutions cut it into
        self.frozen: dict[int, list[str]] = {}
        self.uf = UnionFind()
        self.sources: list[Source] = []
        self.params: list[ParamSlice] = []
        self.consumers: list[Consumer] = []
        self.reshapes: list[ReshapeFix] = []

    # --- spaces -----------------------------------------------------------------
    def new_space(self, size: int, frozen: str | None = None) -> int:
        space = len(self.sizes)
        self.sizes.append(size)
        self.uf[space]  # noqa: B018 - registers the element
        if frozen:
            self.frozen.setdefault(space, []).append(frozen)
        return space

    def freeze(self, layout: Layout, reason: str) -> None:
        for seg in layout:
            self.frozen.setdefault(seg.space, []).append(reason)

    def freeze_all(self, items: list[Channelled], reason: str) -> None:
        for c in items:
            self.freeze(c.layout, reason)

    def freeze_inputs(self, node: NodeProto, reason: str) -> None:
        for name in node.input:
            if name in self.chan:
                self.freeze(self.chan[name].layout, reason)

    # --- walk -------------------------------------------------------------------
    def run(self) -> ChannelGraph:
        for node in graph_nodes(self.model):
            self.visit(node)
        for out in self.outputs:
            if out in self.chan:
                self.freeze(self.chan[out].layout, f"reaches graph output '{out}'")
        return self.groups()

    def visit(self, node: NodeProto) -> None:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.freeze_inputs(node, f"consumed by custom op {node.domain}.{op} '{node.name}'")
            return
        if node.name in self.protect or op in self.protect:
            self.freeze_inputs(node, f"excluded node '{node.name}'")
            if op in ("Conv", "Gemm", "MatMul"):
                self.linear(node, protected=True)
            return
        if op in ("Conv", "Gemm", "MatMul"):
            self.linear(node)
        elif op in PASS_THROUGH or op in CHANNEL_PARAMS:
            self.pass_through(node)
        elif op in ELEMENTWISE:
            self.elementwise(node)
        elif op == "Concat":
            self.concat(node)
        elif op in ("Flatten", "Reshape"):
            self.flatten(node)
        elif op in REDUCTIONS:
            self.reduce(node)
        elif op in ("Pad", "Slice", "Transpose", "Squeeze", "Unsqueeze"):
            self.reposition(node)
        elif op == "Shape" and node.input[0] in self.chan and self.reads_only_batch(node):
            pass  # x.size(0) of a dynamic-batch export: the channel count is not read
        else:
            self.freeze_inputs(node, f"consumed by {op} '{node.name}'")

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    def dim(self, name: str, axis: int) -> int | None:
        shape = self.shapes.get(name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        d = shape[axis]
        return d if isinstance(d, int) else None

    def set_out(self, node: NodeProto, axis: int, layout: Layout) -> None:
        out = node.output[0]
        rank = self.rank(out)
        if rank is None or self.dim(out, axis) != layout_size(layout):
            self.freeze(layout, f"output shape of {node.op_type} '{node.name}' unknown or not channel-preserving")
            return
        self.chan[out] = Channelled(axis, rank, layout)

    # --- op kinds ---------------------------------------------------------------
    def linear(self, node: NodeProto, protected: bool = False) -> None:
        attrs = attributes(node)
        w = self.inits.spec(node.input[1]) if len(node.input) > 1 and node.input[1] in self.inits else None
        data = self.chan.get(node.input[0])
        why = self.linear_refusal(node, attrs, w)
        group = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
        depthwise = why is None and group > 1 and w.shape[1] == 1 and w.shape[0] == group
        if data is not None:
            if why is not None:
                self.freeze(data.layout, f"feeds {node.op_type} '{node.name}' ({why})")
            elif depthwise:
                return self.depthwise(node, data, w)
            elif data.axis != (1 if node.op_type == "Conv" else data.rank - 1):
                self.freeze(data.layout, f"channel axis {data.axis} is not the contracted axis of '{node.name}'")
            elif group > 1 and len(data.layout) != 1:
                self.freeze(data.layout, f"feeds grouped Conv '{node.name}' (group={group}) from {len(data.layout)} concatenated spaces "
                                         "(each group must lose as many channels as the others: a tie between the spaces' choices)")
            elif group > 1 and data.layout[0].shuffle > 1 and (data.layout[0].length // data.layout[0].shuffle) % group:
                seg = data.layout[0]
                self.freeze(data.layout, f"feeds grouped Conv '{node.name}' (group={group}) after a channel shuffle over {seg.shuffle} groups "
                                         f"of {seg.length // seg.shuffle} channels, which its {group} groups do not divide")
            else:
                if group > 1:
                    self.cut(data.layout[0].space, group * data.layout[0].shuffle)
                self.consumers.append(Consumer(node.name, node.op_type, data.layout, group))
        for name in node.input[1:]:
            if name in self.chan:
                self.freeze(self.chan[name].layout, f"used as a weight or bias of '{node.name}'")
        if why is not None or depthwise:
            return
        out_channels = self.out_channels(node, attrs, w)
        reason = None
        if protected:
            reason = f"excluded node '{node.name}'"
        elif len(self.readers.get(node.input[1], ())) > 1:
            reason = f"weight of '{node.name}' is shared with other nodes"
        elif node.op_type == "Gemm" and not self.gemm_bias_ok(node, out_channels):
            reason = f"bias of Gemm '{node.name}' is not per output channel"
        space = self.new_space(out_channels, reason)
        if group > 1:
            self.cut(space, group)
        self.sources.append(Source(node.name, node.op_type, space))
        rank = self.rank(node.output[0])
        axis = 1 if node.op_type == "Conv" else (rank - 1 if rank else -1)
        if rank is None:
            self.frozen.setdefault(space, []).append(f"output shape of '{node.name}' unknown")
            return
        self.set_out(node, axis, (Segment(space, out_channels),))

    def linear_refusal(self, node: NodeProto, attrs: dict, w: TensorSpec | None) -> str | None:
        if w is None:
            return "weight is not a constant"
        if w.dtype.kind != "f":
            return "weight is not floating point"
        if node.op_type == "MatMul" and len(w.shape) != 2:
            return f"MatMul weight of rank {len(w.shape)}"
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            return "Gemm with transA"
        if node.op_type == "Conv":
            group = attrs.get("group", 1)
            cin = self.dim(node.input[0], 1)
            depthwise = group == cin and w.shape[1] == 1 and w.shape[0] == cin
            if group > 1 and not depthwise and (cin is None or w.shape[0] % group or w.shape[1] * group != cin):
                return f"grouped convolution (group={group}) whose channels do not split into its groups"
        return None

    def cut(self, space: int, blocks: int) -> None:
        """A grouped convolution reads or writes ``space`` in ``blocks`` groups that must stay equal."""
        self.blocks[space] = math.lcm(self.blocks.get(space, 1), blocks)

    @staticmethod
    def out_channels(node: NodeProto, attrs: dict, w: TensorSpec) -> int:
        if node.op_type == "Conv":
            return int(w.shape[0])
        if node.op_type == "Gemm":
            return int(w.shape[0] if attrs.get("transB", 0) else w.shape[1])
        return int(w.shape[-1])

    def gemm_bias_ok(self, node: NodeProto, out_channels: int) -> bool:
        if len(node.input) < 3 or not node.input[2]:
            return True
        if node.input[2] not in self.inits:
            return False
        bias = self.inits.spec(node.input[2]).shape
        return int(np.prod(bias)) in (1, out_channels) and (len(bias) <= 1 or bias[0] == 1)

    def depthwise(self, node: NodeProto, data: Channelled, w: TensorSpec) -> None:
        """A depthwise Conv ties input channel j to output channel j: a pass-through with sliced weights."""
        if data.axis != 1:
            return self.freeze(data.layout, f"channel axis {data.axis} is not the channel axis of '{node.name}'")
        self.params.append(ParamSlice(node.name, 1, 0, data.layout))
        if len(node.input) > 2 and node.input[2]:
            self.params.append(ParamSlice(node.name, 2, 0, data.layout))
        self.set_out(node, 1, data.layout)

    def pass_through(self, node: NodeProto) -> None:
        data = self.chan.get(node.input[0]) if node.input else None
        for i, name in enumerate(node.input[1:], start=1):
            if name in self.chan and i not in CHANNEL_PARAMS.get(node.op_type, ()):
                self.freeze(self.chan[name].layout, f"side input of {node.op_type} '{node.name}'")
        if data is None:
            return
        if node.op_type in CHANNEL_PARAMS:
            if data.axis != 1:
                return self.freeze(data.layout, f"{node.op_type} '{node.name}' normalises another axis")
            for i in CHANNEL_PARAMS[node.op_type]:
                if i < len(node.input) and node.input[i]:
                    if node.input[i] not in self.inits:
                        return self.freeze(data.layout, f"{node.op_type} '{node.name}' has non-constant parameters")
                    self.params.append(ParamSlice(node.name, i, 0, data.layout))
        self.set_out(node, data.axis, data.layout)

    def elementwise(self, node: NodeProto) -> None:
        out = node.output[0]
        out_rank = self.rank(out)
        inputs = [(i, name, self.chan.get(name)) for i, name in enumerate(node.input) if name]
        channelled = [(i, name, c) for i, name, c in inputs if c is not None]
        if not channelled:
            return
        layouts = [c.layout for _, _, c in channelled]

        def fail(reason: str) -> None:
            self.freeze_all([c for _, _, c in channelled], reason)

        if out_rank is None:
            return fail(f"output shape of {node.op_type} '{node.name}' unknown")
        axes = {c.axis + out_rank - c.rank for _, _, c in channelled}
        if len(axes) != 1:
            return fail(f"{node.op_type} '{node.name}' mixes channel axes")
        axis = axes.pop()
        first = layouts[0]
        for layout in layouts[1:]:
            if [(s.length, s.block, s.shuffle) for s in layout] != [(s.length, s.block, s.shuffle) for s in first]:
                return fail(f"{node.op_type} '{node.name}' joins tensors with different channel layouts")
        for layout in layouts[1:]:
            for a, b in zip(first, layout):
                self.uf.union(a.space, b.space)
        pending = []
        for i, name, c in inputs:
            if c is not None:
                continue
            rank = self.rank(name)
            if rank is None:
                return fail(f"operand '{name}' of {node.op_type} '{node.name}' has an unknown shape")
            own = axis - (out_rank - rank)
            size = self.dim(name, own) if own >= 0 else 1
            if size == 1:
                continue
            if size == layout_size(first) and name in self.inits:
                pending.append(ParamSlice(node.name, i, own, first))
                continue
            return fail(f"operand '{name}' of {node.op_type} '{node.name}' spans the channels but is not a per-channel constant")
        self.params.extend(pending)
        self.set_out(node, axis, first)

    def concat(self, node: NodeProto) -> None:
        axis = attribute(node, "axis", 0)
        rank = self.rank(node.output[0])
        channelled = [self.chan[n] for n in node.input if n in self.chan]
        if not channelled:
            return
        if rank is None:
            return self.freeze_all(channelled, f"output shape of Concat '{node.name}' unknown")
        axis = axis % rank
        if any(c.axis != axis for c in channelled):
            return self.freeze_all(channelled, f"Concat '{node.name}' is not along the channel axis")
        layout: list[Segment] = []
        for name in node.input:
            c = self.chan.get(name)
            if c is not None:
                layout.extend(c.layout)
                continue
            size = self.dim(name, axis)
            if size is None:
                return self.freeze_all(channelled, f"Concat '{node.name}' input '{name}' has an unknown size")
            if size:
                layout.append(Segment(self.new_space(size, f"concatenated with '{name}', which no prunable layer produces"), size))
        self.set_out(node, axis, tuple(layout))

    def flatten(self, node: NodeProto) -> None:
        """``[N, C, *S] -> [N, C * prod(S)]``: channel j becomes a block of features."""
        data = self.chan.get(node.input[0])
        if len(node.input) > 1 and node.input[1] in self.chan:
            self.freeze(self.chan[node.input[1]].layout, f"shape input of '{node.name}'")
        if data is None:
            return
        in_shape, out_shape = self.shapes.get(node.input[0]), self.shapes.get(node.output[0])
        flat_input = data.axis == 1 and in_shape is not None and all(isinstance(d, int) for d in in_shape[1:])
        # x.view(x.size(0), -1) of a dynamic-batch export: the -1 absorbs the new feature count.
        dynamic = flat_input and node.op_type == "Reshape" and self.is_batch_flatten(node)
        ok = flat_input and out_shape is not None and len(out_shape) == 2 and in_shape[0] == out_shape[0]
        if node.op_type == "Flatten":
            ok = ok and attribute(node, "axis", 1) == 1
        else:
            ok = ok and len(node.input) > 1 and node.input[1] in self.inits
        if not (ok or dynamic):
            if node.op_type == "Reshape" and self.splits_channels(data, in_shape, out_shape):
                return self.shuffle(node, data, out_shape[1])
            return self.freeze(data.layout, f"reshaped by {node.op_type} '{node.name}' (only a flatten of [N, C, ...] into [N, features] is followed)")
        spatial = int(np.prod(in_shape[2:])) if len(in_shape) > 2 else 1
        layout = tuple(Segment(s.space, s.length, s.block * spatial, s.shuffle) for s in data.layout)
        if dynamic:  # nothing to rewrite, and the inferred output shape need not know the feature count
            self.chan[node.output[0]] = Channelled(1, 2, layout)
            return
        if node.op_type == "Reshape":
            self.reshapes.append(ReshapeFix(node.name, layout))
        self.set_out(node, 1, layout)

    def shuffle(self, split: NodeProto, data: Channelled, groups: int) -> None:
        """A channel shuffle starting at ``split`` (see module docstring), else freeze with the reason."""
        def refuse(why: str) -> None:
            self.freeze(data.layout, f"split into [groups, channels] by Reshape '{split.name}', {why}")

        readers = self.readers.get(split.output[0], [])
        swap = readers[0] if len(readers) == 1 else None
        perm = attribute(swap, "perm") if swap is not None and swap.op_type == "Transpose" else None
        rank = data.rank + 1
        if perm is None or list(perm) != [0, 2, 1, *range(3, rank)] or split.output[0] in self.outputs:
            return refuse("not followed by a Transpose of those two axes alone (only a channel shuffle is followed)")
        after = self.readers.get(swap.output[0], [])
        merge = after[0] if len(after) == 1 else None
        if (merge is None or merge.op_type != "Reshape" or swap.output[0] in self.outputs or len(merge.input) < 2
                or merge.input[1] not in self.inits or self.shapes.get(merge.output[0]) != self.shapes.get(split.input[0])):
            return refuse("then not reshaped back to its input's shape by a Reshape of a constant target")
        if split.input[1] not in self.inits:
            return refuse("a Reshape of a non-constant target")
        if len(data.layout) != 1 or data.layout[0].block != 1 or data.layout[0].shuffle != 1:
            return refuse("a channel shuffle of several spaces, or of one already shuffled (only one whole space is followed)")
        seg = data.layout[0]
        self.cut(seg.space, groups)
        layout = (Segment(seg.space, seg.length, 1, groups),)
        self.reshapes.append(ReshapeFix(split.name, data.layout, axis=2, divide=groups))
        self.reshapes.append(ReshapeFix(merge.name, layout))
        self.chan[merge.output[0]] = Channelled(1, data.rank, layout)

    @staticmethod
    def splits_channels(data: Channelled, in_shape, out_shape) -> bool:
        """``[N, C, *S] -> [N, G, C/G, *S]``: the first half of ShuffleNet's channel shuffle."""
        if data.axis != 1 or in_shape is None or out_shape is None or len(out_shape) != len(in_shape) + 1:
            return False
        return list(out_shape[:1]) + list(out_shape[3:]) == list(in_shape[:1]) + list(in_shape[2:]) and (
            isinstance(out_shape[1], int) and isinstance(out_shape[2], int) and out_shape[1] * out_shape[2] == in_shape[1])

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            return constant_node_value(node)
        return None

    def reads_only_batch(self, node: NodeProto) -> bool:
        """Whether every use of this Shape's output reads dim 0 alone (``Gather(shape, 0)``)."""
        attrs = attributes(node)
        if attrs.get("start", 0) == 0 and attrs.get("end") == 1:
            return True
        if attrs.get("start", 0) != 0 or node.output[0] in self.outputs:
            return False
        readers = self.readers.get(node.output[0], [])
        return bool(readers) and all(self.is_dim0_gather(r) for r in readers)

    def is_dim0_gather(self, node: NodeProto) -> bool:
        index = self.const(node.input[1]) if node.op_type == "Gather" and len(node.input) > 1 else None
        axis = attribute(node, "axis", 0)
        return index is not None and axis == 0 and index.size == 1 and int(index.ravel()[0]) == 0

    def is_batch_flatten(self, node: NodeProto) -> bool:
        """A Reshape to ``Concat(Unsqueeze(Gather(Shape(x), 0)), [-1])`` of its own input ``x``: ``[N, -1]``."""
        concat = self.producer.get(node.input[1]) if len(node.input) > 1 else None
        if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
            return False
        rest = self.const(concat.input[1])
        if rest is None or rest.ravel().tolist() != [-1]:
            return False
        first = self.producer.get(concat.input[0])
        if first is not None and first.op_type == "Unsqueeze":
            first = self.producer.get(first.input[0])
        if first is None or not self.is_dim0_gather(first):
            return False
        shape = self.producer.get(first.input[0])
        return shape is not None and shape.op_type == "Shape" and shape.input[0] == node.input[0]

    def reduce(self, node: NodeProto) -> None:
        """A reduction over other axes (a mean over H, W) keeps the channels; over the channel axis it does not."""
        data = self.chan.get(node.input[0])
        if data is None:
            return
        attrs = attributes(node)
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.inits[node.input[1]].tolist() if node.input[1] in self.inits else None
        if not axes:
            return self.freeze(data.layout, f"{node.op_type} '{node.name}' reduces all axes or non-constant axes")
        axes = sorted(a % data.rank for a in axes)
        if data.axis in axes:
            return self.freeze(data.layout, f"{node.op_type} '{node.name}' reduces the channel axis")
        axis = data.axis if attrs.get("keepdims", 1) else data.axis - sum(a < data.axis for a in axes)
        self.set_out(node, axis, data.layout)

    def reposition(self, node: NodeProto) -> None:
        """Ops that leave the channels alone but may move their axis: a spatial Pad or Slice (a conv's
        padding, a crop), a Transpose (NCW -> NWC before a MatMul), a Squeeze/Unsqueeze of other axes.

        Each needs its axes as constants; touching the channel axis itself (padding or slicing
        channels, squeezing it) freezes the group, since the pruned count would no longer match.
        """
        data = self.chan.get(node.input[0]) if node.input else None
        for name in node.input[1:]:
            if name in self.chan:
                self.freeze(self.chan[name].layout, f"side input of {node.op_type} '{node.name}'")
        if data is None:
            return
        axis, why = self._moved_axis(node, data)
        if why is not None:
            return self.freeze(data.layout, f"{node.op_type} '{node.name}' {why}")
        self.set_out(node, axis, data.layout)

    def _moved_axis(self, node: NodeProto, data: Channelled) -> tuple[int, str | None]:
        """Where the channel axis is after ``node``, or why it cannot be followed."""
        op, rank, attrs = node.op_type, data.rank, attributes(node)

        def operand(index: int, attr: str) -> np.ndarray | None:
            if attr in attrs:
                return np.asarray(attrs[attr])
            if index < len(node.input) and node.input[index]:
                return self.const(node.input[index])
            return None

        if op == "Pad":
            pads = operand(1, "pads")
            if pads is None:
                return 0, "has non-constant pads"
            axes = operand(3, "axes")
            axes = [int(a) % rank for a in axes.ravel()] if axes is not None else list(range(rank))
            begin, end = pads.ravel()[: len(axes)], pads.ravel()[len(axes):]
            touched = {a for a, b, e in zip(axes, begin, end) if b or e}
            return (data.axis, None) if data.axis not in touched else (0, "pads the channel axis")
        if op == "Slice":
            starts, ends = operand(1, "starts"), operand(2, "ends")
            if starts is None or ends is None:
                return 0, "has non-constant starts or ends"
            axes = operand(3, "axes")
            axes = [int(a) % rank for a in axes.ravel()] if axes is not None else list(range(len(starts.ravel())))
            if data.axis not in axes:
                return data.axis, None
            k = axes.index(data.axis)
            steps = operand(4, "steps")
            whole = int(starts.ravel()[k]) == 0 and int(ends.ravel()[k]) >= layout_size(data.layout)
            whole = whole and (steps is None or int(steps.ravel()[k]) == 1)
            return (data.axis, None) if whole else (0, "slices the channel axis")
        if op == "Transpose":
            perm = attrs.get("perm")
            perm = list(perm) if perm is not None else list(range(rank))[::-1]
            return perm.index(data.axis), None
        axes = operand(1, "axes")
        if axes is None:
            return 0, "has non-constant or implicit axes"
        if op == "Squeeze":
            axes = sorted(int(a) % rank for a in axes.ravel())
            if data.axis in axes:
                return 0, "squeezes the channel axis"
            return data.axis - sum(a < data.axis for a in axes), None
        out_rank = rank + axes.size  # Unsqueeze: axes index the output
        axes = sorted(int(a) % out_rank for a in axes.ravel())
        axis = data.axis
        for a in axes:
            if a <= axis:
                axis += 1
        return axis, None

    # --- result -----------------------------------------------------------------
    def groups(self) -> ChannelGraph:
        roots: dict[int, int] = {}
        groups: list[ChannelGroup] = []
        space_group: dict[int, int] = {}
        for space in range(len(self.sizes)):
            root = self.uf[space]
            if root not in roots:
                roots[root] = len(groups)
                groups.append(ChannelGroup(len(groups), [], self.sizes[space]))
            group = groups[roots[root]]
            group.spaces.append(space)
            space_group[space] = group.id
            group.blocks = math.lcm(group.blocks, self.blocks.get(space, 1))
            for reason in self.frozen.get(space, []):
                if reason not in group.frozen:
                    group.frozen.append(reason)
        for group in groups:
            if group.size % group.blocks:
                group.frozen.append(f"its grouped convolutions cut its {group.size} channels into {group.blocks} equal blocks, "
                                    "which do not divide them")
        for source in self.sources:
            groups[space_group[source.space]].sources.append(source)
        return ChannelGraph(groups, space_group, self.params, self.consumers, self.reshapes)
