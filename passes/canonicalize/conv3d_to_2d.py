"""conv3d-to-2d: a 3-D convolution over a depth of one is a 2-D convolution (exact).

Exporters of video and watermarking networks write image layers as Conv3D with a depth-1 kernel on
``[N, C, 1, H, W]`` frames (invisible-watermark's RivaGAN encoder and decoder: every convolution is
``[32, 3, 1, 11, 11]``). The lossy passes and the x86 kernel providers work on 1-D and 2-D
convolutions; in 3-D such layers were skipped by every lossy pass and compiled by TVM's untuned
lowering (RivaGAN's decoder ran 35-68x slower than onnxruntime).

Each such Conv becomes ``Squeeze(axis 2) -> Conv2D -> Unsqueeze(axis 2)``. Then each of those
Unsqueezes sinks through the ops that do not care about a unit axis (element-wise ops, with a
constant or another sunk Unsqueeze beside them; BatchNormalization; Softmax and Transpose, their
axes renumbered), and where it meets a Squeeze of the same axis both go: a chain of depth-1 layers
runs in 4-D from its first convolution to the first op that needs the fifth axis (a Reshape, a
Concat with a graph input), which keeps one Unsqueeze. Only the Unsqueezes this pass makes sink, so a
model without such convolutions is left exactly as it was.
"""
from __future__ import annotations

import numpy as np
from optc.ir.graph import Constant, GraphEditor, Node, Tensor, Variable
from optc.ir.liveness import has_ops
from optc.ir.model import Model
from optc.passes.framework import NoOptions, Pass, PassContext, PassResult, Requirement, register_pass

DEPTH = 2  # the axis a depth-1 Conv3D's input and output have in common: [N, C, D, H, W]

# Ops whose every output element depends only on the same element of their first input (and
# scalars or broadcast constants in the others): a unit axis passes through them untouched.
UNARY = frozenset({
    "Abs", "Ceil", "Clip", "Cos", "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Log", "Mish", "Neg", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin",
    "Softplus", "Softsign", "Sqrt", "Tanh", "ThresholdedRelu",
})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "PRelu", "Max", "Min"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax", "Hardmax"})


@register_pass("conv3d-to-2d")
class Conv3dTo2d(Pass[NoOptions]):
    """Rewrite 3-D convolutions with a depth-1 kernel on depth-1 input as 2-D ones (exact)."""

    requires = frozenset({Requirement.SHAPES})

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not has_ops(model, {"Conv"}):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"converted": 0})
        editor = GraphEditor(model)
        convs = [n for n in editor.nodes if n.op == "Conv" and n.domain in ("", "ai.onnx", None) and _rank(n) == 5]
        if not convs:
            return PassResult(model, modified=False, stats={"converted": 0})
        axes = _Axes(editor, model.opset)
        skipped: list[str] = []
        sunk: list[Node] = []
        squeezed: dict[str, Tensor] = {}  # one Squeeze per input, however many convolutions read it
        for conv in convs:
            reason = _why_not(editor, conv)
            if reason:
                skipped.append(f"{conv.name}: {reason}")
            else:
                sunk.append(_to_2d(editor, axes, conv, squeezed))
        if not sunk:
            return PassResult(model, modified=False, stats={"converted": 0}, skipped=skipped)
        _sink(editor, axes, sunk)
        return PassResult(editor.commit(), modified=True, stats={"converted": len(sunk)}, skipped=skipped)


def _rank(conv: Node) -> int | None:
    w = conv.inputs[1] if len(conv.inputs) > 1 else None
    return len(w.shape) if w is not None and w.shape is not None else None


def _why_not(editor: GraphEditor, conv: Node) -> str | None:
    w = editor.constant_value(conv.inputs[1])
    if w is None:
        return "3-D convolution with a computed weight"
    if w.shape[DEPTH] != 1:
        return f"3-D convolution with a depth-{w.shape[DEPTH]} kernel (only depth-1 kernels on depth-1 input are 2-D)"
    shape = conv.inputs[0].shape
    depth = shape[DEPTH] if shape is not None and len(shape) == 5 else None
    if not isinstance(depth, (int, np.integer)):
        named = f"'{depth}'" if isinstance(depth, str) and depth else "unknown size"
        return f"3-D convolution over a depth of {named} (a 2-D one only at depth 1: freeze it with --input-shape if it is 1)"
    if depth != 1:
        return f"3-D convolution over a depth of {depth} (only depth 1 is a 2-D convolution)"
    pads = list(conv.attrs.get("pads", [0] * 6))
    if pads[0] or pads[3]:
        return "3-D convolution padded along its depth"
    return None


class _Axes:
    """Squeeze / Unsqueeze of one axis, written as the model's opset wants (axes an input from opset 13)."""

    def __init__(self, editor: GraphEditor, opset: int):
        self.editor, self.as_input = editor, opset >= 13

    def node(self, op: str, x: Tensor, axis: int, out: Tensor | None = None) -> Node:
        if self.as_input:
            const = self.editor.add_constant(f"{op.lower()}_axes", np.array([axis], dtype=np.int64))
            return self.editor.add_node(op, [x, const], [out] if out is not None else None)
        return self.editor.add_node(op, [x], [out] if out is not None else None, attrs={"axes": [axis]})

    def axis(self, node: Node) -> int | None:
        """The one axis a Squeeze/Unsqueeze names, counted from the front; None for several or unknown."""
        if self.as_input:
            value = self.editor.constant_value(node.inputs[1]) if len(node.inputs) > 1 else None
        else:
            value = node.attrs.get("axes")
        if value is None or np.asarray(value).size != 1:
            return None
        axis = int(np.asarray(value).ravel()[0])
        rank = _known_rank(node.outputs[0] if node.op == "Unsqueeze" else node.inputs[0])
        if axis < 0:
            axis = axis + rank if rank is not None else -1
        return axis if axis >= 0 else None


def _known_rank(t: Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def _drop(shape, axis: int):
    return None if shape is None else [d for i, d in enumerate(shape) if i != axis]


def _to_2d(editor: GraphEditor, axes: _Axes, conv: Node, squeezed: dict[str, Tensor]) -> Node:
    """Rewrite ``conv`` in place as a 2-D convolution between a Squeeze and an Unsqueeze; returns the Unsqueeze."""
    x, y = conv.inputs[0], conv.outputs[0]
    if x.name not in squeezed:
        squeezed[x.name] = Variable(editor.fresh_name(f"{x.name}_2d"), dtype=x.dtype, shape=_drop(x.shape, DEPTH))
        axes.node("Squeeze", x, DEPTH, squeezed[x.name])
    w = editor.constant_value(conv.inputs[1])
    conv.inputs[0] = squeezed[x.name]
    conv.inputs[1] = editor.add_constant(f"{conv.name}_W_2d", np.ascontiguousarray(w[:, :, 0]))
    attrs = conv.attrs
    for key in ("kernel_shape", "strides", "dilations"):
        if key in attrs:
            attrs[key] = list(attrs[key])[1:]
    if "pads" in attrs:
        p = list(attrs["pads"])
        attrs["pads"] = [p[1], p[2], p[4], p[5]]
    out2d = Variable(editor.fresh_name(f"{y.name}_2d"), dtype=y.dtype, shape=_drop(y.shape, DEPTH))
    conv.outputs[0] = out2d
    return axes.node("Unsqueeze", out2d, DEPTH, y)


def _sink(editor: GraphEditor, axes: _Axes, unsqueezes: list[Node]) -> None:
    """Move each Unsqueeze below the ops a unit axis passes through; drop it at a Squeeze of its axis."""
    ours = {id(u): DEPTH for u in unsqueezes}
    work = list(unsqueezes)
    while work:
        u = work.pop()
        if not u.outputs or not u.inputs or id(u) not in ours:
            continue
        axis = ours[id(u)]
        for consumer in list(u.outputs[0].outputs):
            moved = _absorb(editor, axes, consumer, u, axis, ours)
            if moved is not None:
                ours[id(moved[0])] = moved[1]
                work.append(moved[0])


def _sunk_input(t: Tensor, axis: int, ours: dict[int, int]) -> Tensor | None:
    """The 4-D tensor behind ``t`` when ``t`` is one of this pass's Unsqueezes of ``axis``."""
    producer = t.inputs[0] if t.inputs else None
    if producer is not None and producer.op == "Unsqueeze" and ours.get(id(producer)) == axis:
        return producer.inputs[0]
    return None


def _absorb(editor: GraphEditor, axes: _Axes, node: Node, u: Node, axis: int, ours: dict[int, int]):
    """Rewrite ``node`` (a consumer of ``u``) on the squeezed tensor; the new (Unsqueeze, axis), or None."""
    if node.domain not in ("", "ai.onnx", None) or len(node.outputs) != 1:
        return None
    out = node.outputs[0]
    rank = _known_rank(u.outputs[0])
    if rank is None:
        return None
    if node.op == "Squeeze":
        if axes.axis(node) != axis or editor.is_graph_output(out):
            return None
        editor.replace_uses(out, u.inputs[0])
        node.inputs.clear()
        node.outputs.clear()
        return None
    inputs = _squeezed_inputs(editor, node, axis, rank, ours)
    if inputs is None:
        return None
    attrs = dict(node.attrs)
    new_axis = axis
    if node.op in SOFTMAX:
        k = int(attrs.get("axis", -1 if axes.as_input else 1))
        k = k + rank if k < 0 else k
        if k == axis:
            return None
        attrs["axis"] = k - (k > axis)
    elif node.op == "Transpose":
        perm = list(attrs.get("perm", range(rank - 1, -1, -1)))
        new_axis = perm.index(axis)
        attrs["perm"] = [p - (p > axis) for p in perm if p != axis]
    inner = Variable(editor.fresh_name(f"{out.name}_2d"), dtype=out.dtype, shape=None)
    editor.add_node(node.op, inputs, [inner], attrs=attrs, name=node.name)
    node.inputs.clear()
    node.outputs.clear()
    return axes.node("Unsqueeze", inner, new_axis, out), new_axis


def _squeezed_inputs(editor: GraphEditor, node: Node, axis: int, rank: int, ours: dict[int, int]) -> list[Tensor] | None:
    """``node``'s inputs with the unit axis gone, or None when one of them needs it."""
    op = node.op
    if op in UNARY or op in SOFTMAX or op == "Transpose":
        first = _sunk_input(node.inputs[0], axis, ours)
        rest = node.inputs[1:]  # Clip's min and max: scalars
        if first is None or any(not isinstance(t, Constant) or np.asarray(t.values).size > 1 for t in rest):
            return None
        return [first, *rest]
    if op == "BatchNormalization":
        first = _sunk_input(node.inputs[0], axis, ours)
        # Its statistics are per channel (axis 1); the unit axis must not be the channel or batch axis.
        return [first, *node.inputs[1:]] if first is not None and axis >= 2 else None
    if op in BINARY and len(node.inputs) == 2:
        new = []
        for t in node.inputs:
            sunk = _sunk_input(t, axis, ours)
            if sunk is None:
                sunk = _squeezed_constant(editor, t, axis, rank)
            if sunk is None:
                return None
            new.append(sunk)
        # At least one side is ours (the Unsqueeze being sunk), so the result keeps the 4-D rank.
        return new
    return None


def _squeezed_constant(editor: GraphEditor, t: Tensor, axis: int, rank: int) -> Tensor | None:
    """A constant operand broadcast against a rank-``rank`` tensor, as it broadcasts without the unit axis."""
    value = editor.constant_value(t)
    if value is None or value.ndim > rank:
        return None
    at = axis - (rank - value.ndim)  # broadcasting aligns the trailing axes
    if at < 0:
        return t  # it does not reach the unit axis: the same constant broadcasts the same way in 4-D
    if value.shape[at] != 1:
        return None
    return editor.add_constant(f"{t.name}_2d", np.squeeze(value, axis=at))
