"""Narrower-MLP student of the distill pass: ``Linear -> elementwise -> Linear`` with fewer hidden units.

Pattern: a MatMul/Gemm ``L1`` (constant weight, hidden width ``h``), then a
region of elementwise nodes (bias Add, GELU's ``Div/Erf/Add/Mul``, Relu, ...)
whose only non-constant input is ``L1``'s output and whose constants are
scalars or per-unit vectors (shape ``[..., h]``), ending in the input ``a`` of a
second MatMul/Gemm ``L2``. No tensor of the block may be read outside it.

Maths: every node of the region acts on each hidden unit separately, so
dropping unit ``j`` (column ``j`` of ``L1``'s weight, entry ``j`` of every
per-unit constant, row ``j`` of ``L2``'s weight) leaves every other unit's
activation ``a_j`` bit-identical. ``L2`` computes ``y = W a`` (``W``: ``out x h``);
with the kept units ``K`` the student is refit by least squares on the
calibration activations (:func:`optc.passes.numerics.refit.refit_columns`):

    min over W_K, b   E ||W a - (W_K a_K + b)||^2  (+ ridge)

which needs only the Gram of ``[1, a]``. The bias ``b`` (the mean contribution
of the dropped units) is folded into ``L2``'s bias; a bias Add is inserted when
there is none.

Choosing ``K`` (and the refit error of every width, from one factorisation):
:mod:`optc.passes.numerics.unit_selection`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from optc.ir.graph import GraphEditor, Node, Variable, consumers_by_tensor, producers_by_tensor
from optc.ir.model import Model
from optc.ir.view import initializers, output_names
from optc.passes.layers import InputGram, LinearLayer, weight_matrix
from optc.passes.numerics.refit import refit_columns
from optc.passes.numerics.unit_selection import RIDGE, select_units

ELEMENTWISE = frozenset({
    "Abs", "Add", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish", "Identity", "LeakyRelu",
    "Mul", "Neg", "Pow", "PRelu", "Relu", "Selu", "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh",
})


@dataclass(frozen=True)
class MlpBlock:
    """A matched ``L1 -> elementwise region -> L2`` block."""

    first: LinearLayer
    second: LinearLayer
    region: tuple[str, ...]  # elementwise node names
    per_unit: tuple[tuple[str, int], ...]  # (node, input index) of constants sliced along the hidden axis
    tensors: tuple[str, ...]  # tensors whose last axis is the hidden width
    bias_add: tuple[str, int] | None  # L2 MatMul: (Add node, index of its constant bias input)

    @property
    def key(self) -> str:
        return self.second.node

    @property
    def hidden(self) -> int:
        return self.first.out_features

    @property
    def params_per_unit(self) -> int:
        return self.first.in_features + self.second.out_features


def match_mlp_blocks(model: Model, layers: list[LinearLayer]) -> tuple[list[MlpBlock], list[str]]:
    """Blocks whose second layer is one of ``layers``, and ``"node: reason"`` for near misses.

    A near miss is a MatMul/Gemm whose input comes through elementwise nodes
    from another linear layer but breaks a condition of the pattern.
    """
    by_output = {l.output: l for l in layers if l.op in ("MatMul", "Gemm")}
    producers, consumers = producers_by_tensor(model), consumers_by_tensor(model)
    inits = initializers(model)
    graph_outputs = set(output_names(model))
    blocks, refused = [], []
    for second in layers:
        if second.op not in ("MatMul", "Gemm"):
            continue
        found = _match(second, by_output, producers, consumers, inits, graph_outputs)
        if isinstance(found, MlpBlock):
            blocks.append(found)
        elif found:
            refused.append(f"{second.node}: mlp: {found}")
    return blocks, refused


def _match(second, by_output, producers, consumers, inits, graph_outputs) -> MlpBlock | str | None:
    """The block ending at ``second``; a reason when it nearly matches; None when there is no MLP shape at all."""
    if second.trans_a or second.input in by_output or producers.get(second.input) is None:
        return None
    if producers[second.input].op_type not in ELEMENTWISE:
        return None
    region: list = []
    seen: set[str] = set()
    roots: set[str] = set()
    consts: list[tuple[str, int, str]] = []
    stack = [second.input]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in by_output:
            roots.add(t)
            continue
        prod = producers.get(t)
        if prod is None or prod.op_type not in ELEMENTWISE:
            return None if prod is None else f"{prod.op_type} node {prod.name} between the layers is not elementwise"
        region.append(prod)
        for i, name in enumerate(prod.input):
            if name in inits:
                consts.append((prod.name, i, name))
            elif name:
                stack.append(name)
    if len(roots) != 1:
        return "the activation does not come from exactly one linear layer" if roots else None
    first = by_output[roots.pop()]
    if first.trans_a or (first.op == "MatMul" and len(first.weight_shape) != 2):
        return f"first layer {first.node} is not a plain 2-D MatMul/Gemm"
    h = first.out_features
    if second.in_features != h:
        return f"hidden widths differ ({first.node}: {h}, {second.node}: {second.in_features})"
    names = {n.name for n in region} | {second.node}
    for t in seen:
        if t in graph_outputs or any(c.name not in names for c in consumers.get(t, [])):
            return f"hidden tensor {t} is read outside the block"
    per_unit = []
    for node, i, name in consts:
        dims = inits.spec(name).shape
        size = math.prod(dims)
        if size == 1:
            continue
        if dims[-1] == h and size == h:
            per_unit.append((node, i))
        else:
            return f"constant {name} of shape {list(dims)} in {node} is neither scalar nor per-unit"
    if first.op == "Gemm" and first.bias is not None:
        if first.bias not in inits:
            return f"bias of {first.node} is not a constant"
        dims = inits.spec(first.bias).shape
        if math.prod(dims) not in (1, h):
            return f"bias of {first.node} of shape {list(dims)} is not per-unit"
    bias_add = None
    if second.op == "MatMul":
        users = consumers.get(second.output, [])
        if second.output not in graph_outputs and len(users) == 1 and users[0].op_type == "Add":
            add = users[0]
            other = [i for i, n in enumerate(add.input) if n != second.output]
            if len(other) == 1 and add.input[other[0]] in inits:
                dims = inits.spec(add.input[other[0]]).shape
                if dims and dims[-1] == second.out_features and math.prod(dims) == second.out_features:
                    bias_add = (add.name, other[0])
    tensors = tuple(sorted(seen))
    return MlpBlock(first, second, tuple(n.name for n in region), tuple(per_unit), tensors, bias_add)


# --- fitting -------------------------------------------------------------------------


@dataclass(frozen=True)
class MlpPlan:
    """A chosen width for one block: the kept units and the refit second layer."""

    block: MlpBlock
    keep: np.ndarray  # sorted unit indices
    weight: np.ndarray  # (out, k) refit L2 matrix
    bias_delta: np.ndarray  # (out,)
    rel_error: float
    rel_error_plain: float  # dropping the same units without the refit

    @property
    def key(self) -> str:
        return self.block.key

    @property
    def params_teacher(self) -> int:
        return self.block.hidden * self.block.params_per_unit

    @property
    def params_student(self) -> int:
        return len(self.keep) * self.block.params_per_unit

    def report(self, macs: Mapping[str, float]) -> dict:
        b = self.block
        teacher_macs = int(macs.get(b.first.node, 0) + macs.get(b.second.node, 0))
        return {
            "node": b.second.node, "first": b.first.node, "student": "mlp", "op": f"{b.first.op}+{b.second.op}",
            "hidden": len(self.keep), "hidden_teacher": b.hidden,
            "params_teacher": self.params_teacher, "params_student": self.params_student,
            "macs_teacher": teacher_macs, "macs_student": int(round(teacher_macs * len(self.keep) / b.hidden)),
            "rel_error": self.rel_error, "rel_error_without_refit": self.rel_error_plain,
        }

    def apply(self, editor: GraphEditor, nodes: Mapping[str, Node]) -> None:
        rewrite_mlp(editor, nodes, self)


@dataclass(frozen=True)
class MlpCandidate:
    block: MlpBlock
    gram: InputGram  # of L2's input (the hidden activation)
    matrix: np.ndarray  # L2 as (out, h)
    order: np.ndarray  # units in selection order
    curve: np.ndarray  # relative error (upper bound) keeping the first k units of ``order``, k = 0..max_width
    max_width: int  # widest student that still removes min_reduction of the params

    @property
    def key(self) -> str:
        return self.block.key

    @property
    def nodes(self) -> tuple[str, ...]:
        """The teacher nodes the student replaces (their MACs are the student's to save)."""
        return (self.block.first.node, self.block.second.node)

    @property
    def params(self) -> int:
        return self.block.hidden * self.block.params_per_unit

    def _width(self, budget: float) -> int:
        ok = np.nonzero(self.curve[1:] <= budget)[0]
        return int(ok[0]) + 1 if ok.size else self.block.hidden

    def plan(self, budget: float) -> MlpPlan | str:
        k = self._width(budget)
        if k > self.max_width:
            return (f"mlp: width {k}/{self.block.hidden} needed for budget {budget:.3g} does not reduce params enough "
                    f"(max width {self.max_width}; error at it {self.curve[self.max_width]:.3g})")
        keep = np.sort(self.order[:k])
        fit = refit_columns(self.gram, self.matrix, keep, ridge=RIDGE)
        return MlpPlan(self.block, keep, fit.weight, fit.bias_delta, fit.rel_error, fit.rel_error_plain)

    def removed(self, budget: float) -> int:
        k = self._width(budget)
        return (self.block.hidden - k) * self.block.params_per_unit if k <= self.max_width else 0

    def tradeoff(self) -> tuple[np.ndarray, np.ndarray]:
        """Relative error (bound) and params removed of every admissible student (widths 1..max_width)."""
        widths = np.arange(1, self.max_width + 1)
        return self.curve[widths], (self.block.hidden - widths) * self.block.params_per_unit


def mlp_candidate(block: MlpBlock, w2: np.ndarray, gram: InputGram, *, select: str, min_reduction: float) -> MlpCandidate:
    matrix = weight_matrix(block.second, w2.astype(np.float64))
    h = block.hidden
    max_width = min(int(math.floor((1 - min_reduction) * h)), h)
    order, curve = select_units(gram, matrix, max_width, select=select)
    return MlpCandidate(block, gram, matrix, order, curve, max_width)


# --- rewrite -------------------------------------------------------------------------


def rewrite_mlp(editor: GraphEditor, nodes: Mapping[str, Node], plan: MlpPlan) -> None:
    """Slice L1 and the per-unit constants to the kept units; L2 gets the refit weight and bias."""
    block, keep = plan.block, plan.keep
    k = len(keep)
    first, second = nodes[block.first.node], nodes[block.second.node]
    dtype = np.asarray(first.inputs[1].values).dtype
    w1 = np.asarray(first.inputs[1].values)
    if block.first.op == "Gemm" and block.first.trans_b:
        w1 = w1[keep, :]
    else:
        w1 = w1[:, keep]
    first.inputs[1] = editor.add_constant(f"{first.name}_narrow", w1)
    if block.first.op == "Gemm" and len(first.inputs) > 2 and np.asarray(first.inputs[2].values).size == block.hidden:
        c = np.asarray(first.inputs[2].values)
        first.inputs[2] = editor.add_constant(f"{first.name}_bias", c[..., keep])
    for name, index in block.per_unit:
        node = nodes[name]
        value = np.asarray(node.inputs[index].values)
        node.inputs[index] = editor.add_constant(f"{name}_narrow", value[..., keep])
    tensors = editor.tensors()
    for name in block.tensors:
        t = tensors[name]
        if isinstance(t, Variable) and t.shape is not None and len(t.shape):
            t.shape = [*t.shape[:-1], k]
    new_w = plan.weight.T if block.second.op == "MatMul" or not block.second.trans_b else plan.weight
    second.inputs[1] = editor.add_constant(f"{second.name}_refit", new_w.astype(dtype))
    _fold_bias(editor, nodes, plan, second, dtype)


def _fold_bias(editor: GraphEditor, nodes: Mapping[str, Node], plan: MlpPlan, second: Node, dtype) -> None:
    delta = plan.bias_delta
    if plan.block.second.op == "Gemm":
        alpha = float(second.attrs.get("alpha", 1.0))
        beta = float(second.attrs.get("beta", 1.0))
        has_c = len(second.inputs) > 2 and beta != 0.0
        c = np.asarray(second.inputs[2].values, dtype=np.float64) + alpha * delta / beta if has_c else alpha * delta
        if not has_c:
            second.attrs["beta"] = 1.0
            while len(second.inputs) > 2:
                second.inputs.pop()
            second.inputs.append(editor.add_constant(f"{second.name}_bias", c.astype(dtype)))
        else:
            second.inputs[2] = editor.add_constant(f"{second.name}_bias", c.astype(dtype))
        return
    if plan.block.bias_add is not None:
        name, index = plan.block.bias_add
        add = nodes[name]
        bias = np.asarray(add.inputs[index].values)
        add.inputs[index] = editor.add_constant(f"{name}_bias", (bias.astype(np.float64) + delta.reshape(bias.shape)).astype(bias.dtype))
        return
    editor.add_after(second, "Add", delta.astype(dtype), f"{second.name}_bias")
