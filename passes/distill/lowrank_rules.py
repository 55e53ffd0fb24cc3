"""Low-rank students of the distill pass: rules for MatMul, Gemm and Conv.

* ``matmul``: ``x @ W`` (W constant, ``in x out``) -> ``(x @ A) @ B`` with
  ``A = R^T`` (``in x r``) and ``B = L^T`` (``r x out``); a following bias Add
  is untouched.
* ``gemm``: ``alpha * x @ W' + beta * C`` -> ``MatMul(x, R^T)`` then the same
  Gemm with weight ``L`` (layout kept, alpha/beta/C kept).
* ``conv``: a ``k x k`` Conv (group 1) -> a ``k x k`` Conv with ``r`` output
  channels (``R`` reshaped to ``r x cin x k x k``, same strides/pads/dilations,
  no bias) then a 1x1 Conv with ``L`` and the original bias. This is exact
  algebra on im2col rows: ``M x = L (R x)``, and ``R x`` over all receptive
  fields is the first convolution.

``L R`` comes from :mod:`optc.passes.numerics.lowrank` (whitened, ASVD or plain SVD) on
the Gram of the layer input, so the relative data error of every rank is known
in closed form and a budget maps to a rank without touching the data again.
A student must have at most ``(1 - min_reduction)`` of the teacher's
parameters: ``r (in + out) <= (1 - min_reduction) in out`` (MACs scale the
same way, as both stages see the same positions).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from optc.ir.graph import GraphEditor, Node
from optc.passes.layers import InputGram, LinearLayer, weight_matrix
from optc.passes.numerics.lowrank import LowRankSpectrum, fit_low_rank


@dataclass(frozen=True)
class LowRankPlan:
    """A chosen low-rank student for one layer."""

    layer: LinearLayer
    rank: int
    left: np.ndarray  # (out, r)
    right: np.ndarray  # (r, in)
    rel_error: float

    @property
    def key(self) -> str:
        return self.layer.node

    @property
    def params_teacher(self) -> int:
        return self.layer.in_features * self.layer.out_features

    @property
    def params_student(self) -> int:
        return self.rank * (self.layer.in_features + self.layer.out_features)

    def report(self, macs: Mapping[str, float]) -> dict:
        teacher_macs = int(macs.get(self.layer.node, 0))
        return {
            "node": self.layer.node, "student": "lowrank", "op": self.layer.op, "rank": self.rank,
            "full_rank": min(self.layer.in_features, self.layer.out_features),
            "params_teacher": self.params_teacher, "params_student": self.params_student,
            "macs_teacher": teacher_macs, "macs_student": int(round(teacher_macs * self.params_student / self.params_teacher)),
            "rel_error": self.rel_error,
        }

    def apply(self, editor: GraphEditor, nodes: Mapping[str, Node]) -> None:
        RULES[rule_for(self.layer.op)].rewrite(editor, nodes[self.layer.node], self)


@dataclass(frozen=True)
class LowRankCandidate:
    """A layer a low-rank rule matched, with its spectrum under the calibration inputs."""

    layer: LinearLayer
    spectrum: LowRankSpectrum
    max_rank: int  # largest rank that still removes min_reduction of the params

    @property
    def key(self) -> str:
        return self.layer.node

    @property
    def nodes(self) -> tuple[str, ...]:
        """The teacher nodes the student replaces (their MACs are the student's to save)."""
        return (self.layer.node,)

    @property
    def params(self) -> int:
        return self.layer.in_features * self.layer.out_features

    def plan(self, budget: float) -> LowRankPlan | str:
        """The smallest-rank student within ``budget``, or why there is none."""
        rank = self.spectrum.smallest_rank(budget)
        if rank > self.max_rank:
            return (f"rank {rank} needed for budget {budget:.3g} does not reduce params enough "
                    f"(max rank {self.max_rank}; error at it {self.spectrum.relative_error(self.max_rank):.3g})")
        left, right = self.spectrum.factors(rank)
        return LowRankPlan(self.layer, rank, left, right, self.spectrum.relative_error(rank))

    def removed(self, budget: float) -> int:
        rank = self.spectrum.smallest_rank(budget)
        return self.params - rank * (self.layer.in_features + self.layer.out_features) if rank <= self.max_rank else 0

    def tradeoff(self) -> tuple[np.ndarray, np.ndarray]:
        """Relative error and params removed of every admissible student (ranks 1..max_rank)."""
        ranks = np.arange(1, self.max_rank + 1)
        errors = np.array([self.spectrum.relative_error(int(r)) for r in ranks])
        return errors, self.params - ranks * (self.layer.in_features + self.layer.out_features)


def low_rank_candidate(layer: LinearLayer, w: np.ndarray, gram: InputGram, *, method: str, damp: float, alpha: float,
                       min_reduction: float) -> LowRankCandidate:
    m = weight_matrix(layer, w.astype(np.float64))
    spectrum = fit_low_rank(m, gram.gram[0] / gram.rows, method=method, damp=damp, alpha=alpha)
    d_in, d_out = layer.in_features, layer.out_features
    max_rank = min(int(math.floor((1 - min_reduction) * d_in * d_out / (d_in + d_out))), spectrum.max_rank)
    return LowRankCandidate(layer, spectrum, max_rank)


# --- rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A student: which layers it matches, why it refuses one, and how it rewrites."""

    name: str
    pattern: str  # op type of the teacher node (a LinearLayer with a constant weight)
    check: Callable[[LinearLayer], str | None]  # reason for refusing, or None
    rewrite: Callable[[GraphEditor, Node, LowRankPlan], None]


def _check_matmul(layer: LinearLayer) -> str | None:
    return None if len(layer.weight_shape) == 2 else f"weight of rank {len(layer.weight_shape)}"


def _check_gemm(layer: LinearLayer) -> str | None:
    return "transA=1 is not supported" if layer.trans_a else None


def _check_conv(layer: LinearLayer) -> str | None:
    if layer.group != 1:
        return f"grouped convolution (group={layer.group})"
    if len(layer.kernel) != 2:
        return "only 2-D convolutions"
    return None


def _rewrite_matmul(editor: GraphEditor, node: Node, plan: LowRankPlan) -> None:
    dtype = np.asarray(node.inputs[1].values).dtype
    a = editor.add_constant(f"{node.name}_A", plan.right.T.astype(dtype))
    b = editor.add_constant(f"{node.name}_B", plan.left.T.astype(dtype))
    first = editor.add_node("MatMul", [node.inputs[0], a], name=editor.fresh_name(f"{node.name}_lowrank"))
    # The teacher node becomes the second stage: it keeps its name and output tensor.
    node.inputs[0] = first.outputs[0]
    node.inputs[1] = b


def _rewrite_gemm(editor: GraphEditor, node: Node, plan: LowRankPlan) -> None:
    dtype = np.asarray(node.inputs[1].values).dtype
    a = editor.add_constant(f"{node.name}_A", plan.right.T.astype(dtype))
    second = plan.left if plan.layer.trans_b else plan.left.T
    first = editor.add_node("MatMul", [node.inputs[0], a], name=editor.fresh_name(f"{node.name}_lowrank"))
    node.inputs[0] = first.outputs[0]
    node.inputs[1] = editor.add_constant(f"{node.name}_B", second.astype(dtype))


def _rewrite_conv(editor: GraphEditor, node: Node, plan: LowRankPlan) -> None:
    layer = plan.layer
    dtype = np.asarray(node.inputs[1].values).dtype
    cin = layer.weight_shape[1]
    reduce_w = plan.right.reshape(plan.rank, cin, *layer.kernel).astype(dtype)
    expand_w = plan.left.reshape(*plan.left.shape, 1, 1).astype(dtype)
    attrs = {k: v for k, v in node.attrs.items() if k != "group"}
    attrs["kernel_shape"] = list(layer.kernel)
    first = editor.add_node("Conv", [node.inputs[0], editor.add_constant(f"{node.name}_reduce", reduce_w)], attrs=attrs,
                            name=editor.fresh_name(f"{node.name}_lowrank"))
    node.attrs = {"kernel_shape": [1, 1], "strides": [1, 1], "pads": [0, 0, 0, 0], "dilations": [1, 1], "group": 1}
    node.inputs[0] = first.outputs[0]
    node.inputs[1] = editor.add_constant(f"{node.name}_expand", expand_w)


RULES: dict[str, Rule] = {
    r.name: r
    for r in (
        Rule("matmul", "MatMul", _check_matmul, _rewrite_matmul),
        Rule("gemm", "Gemm", _check_gemm, _rewrite_gemm),
        Rule("conv", "Conv", _check_conv, _rewrite_conv),
    )
}


def rule_for(op: str) -> str:
    return next(name for name, r in RULES.items() if r.pattern == op)
