"""distill: replace linear subgraphs by smaller students fitted to the teacher's activations.

Students (rules: pattern + check + rewrite):

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

``L R`` is fitted by :mod:`optc.passes.lowrank` (whitened or plain SVD) on the
Gram of the layer input over the calibration set, so the relative data error
``||(W - W_r) X||^2 / ||W X||^2`` of every rank is known in closed form. The
rank is the smallest meeting ``budget``; with ``target_reduction`` a common
budget is searched (bisection) so that the candidates lose that fraction of
their parameters. A student must have at most ``(1 - min_reduction)`` of the
teacher's parameters: ``r (in + out) <= (1 - min_reduction) in out`` (MACs
scale the same way, as both stages see the same positions).

Layer errors compound through the network, so the whole model is then run on
the calibration data against the teacher; while the output relative MSE
exceeds ``global_budget`` (or mean cosine is below ``min_cosine``) the
replacements with the largest layer errors are backed off.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from optc.ir.graph import GraphEditor, Node
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.ir.stats import compute_stats
from optc.passes.base import Pass, PassContext, PassResult, Requirement, option, register_pass
from optc.passes.calibration import CalibrationSet
from optc.passes.layers import LinearLayer, find_linear_layers, input_grams, weight_matrix
from optc.passes.lowrank import LowRankSpectrum, fit_low_rank

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    budget: float = option(0.05, "per-subgraph relative MSE ||(W-W_r)X||^2/||WX||^2 on calibration data")
    target_reduction: float | None = option(None, "fraction of candidate params to remove (replaces budget)")
    global_budget: float | None = option(None, "max relative MSE at the model outputs vs the teacher")
    min_cosine: float | None = option(None, "min mean per-sample cosine at the model outputs vs the teacher")
    whiten: bool = option(True, "activation-aware (whitened, SVD-LLM) instead of plain SVD")
    damp: float = option(0.01, "whitening damping, relative to the mean input second moment")
    min_reduction: float = option(0.1, "a student must remove at least this fraction of the layer's params")
    exclude: tuple[str, ...] = option((), "node names or op types left alone")
    students: tuple[str, ...] = option(("matmul", "gemm", "conv"), "rules to apply")
    batch_size: int = option(16, "calibration batch size")
    max_batches: int | None = option(None, "calibration batches used (None: all)")
    max_backoff: int = option(8, "rounds of backing off layers to meet the global budget")

    def __post_init__(self) -> None:
        if not self.budget >= 0:
            raise ValueError(f"budget must be >= 0, got {self.budget}")
        if self.target_reduction is not None and not 0 < self.target_reduction < 1:
            raise ValueError(f"target_reduction must be in (0, 1), got {self.target_reduction}")
        if not 0 <= self.min_reduction < 1:
            raise ValueError(f"min_reduction must be in [0, 1), got {self.min_reduction}")
        if self.damp < 0:
            raise ValueError(f"damp must be >= 0, got {self.damp}")
        unknown = set(self.students) - set(RULES)
        if unknown:
            raise ValueError(f"students: unknown {sorted(unknown)}; valid: {', '.join(RULES)}")


# --- rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class LowRankPlan:
    """A chosen student for one layer."""

    layer: LinearLayer
    rank: int
    left: np.ndarray  # (out, r)
    right: np.ndarray  # (r, in)
    rel_error: float


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


# --- the pass ------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    layer: LinearLayer
    spectrum: LowRankSpectrum
    max_rank: int  # largest rank that still removes min_reduction of the params

    @property
    def params(self) -> int:
        return self.layer.in_features * self.layer.out_features

    def student_params(self, rank: int) -> int:
        return rank * (self.layer.in_features + self.layer.out_features)


@register_pass("distill")
class Distill(Pass[DistillConfig]):
    """Replace linear layers by low-rank students fitted on calibration data (see module docstring)."""

    config_class = DistillConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        skipped: list[str] = []
        candidates = self._candidates(model, ctx, skipped)
        plans = self._choose(candidates, skipped)
        if not plans:
            return PassResult(model, modified=False, stats={"replaced": 0}, skipped=skipped)
        student = apply_plans(model, list(plans.values()))
        if cfg.global_budget is not None or cfg.min_cosine is not None:
            student, plans, fidelity = self._back_off(model, student, plans, candidates, ctx.calibration, skipped)
            if not plans:
                return PassResult(model, modified=False, stats={"replaced": 0, "global": fidelity}, skipped=skipped)
        else:
            reference = teacher_outputs(model, ctx.calibration, cfg.batch_size, cfg.max_batches)
            fidelity = output_fidelity(reference, student, ctx.calibration, cfg.batch_size, cfg.max_batches)
        stats = self._report(model, list(plans.values()), candidates, fidelity)
        return PassResult(student, modified=True, stats=stats, skipped=skipped)

    # -- analysis ----------------------------------------------------------------
    def _candidates(self, model: Model, ctx: PassContext, skipped: list[str]) -> list[Candidate]:
        cfg = self.config
        layers, refused = find_linear_layers(model, exclude=cfg.exclude)
        skipped.extend(refused)
        by_op = {RULES[s].pattern: RULES[s] for s in cfg.students}
        matched: list[LinearLayer] = []
        for layer in layers:
            rule = by_op.get(layer.op)
            reason = f"no student rule for {layer.op}" if rule is None else rule.check(layer)
            if reason is None:
                d_in, d_out = layer.in_features, layer.out_features
                if d_in * d_out * (1 - cfg.min_reduction) < d_in + d_out:
                    reason = f"too small: even rank 1 does not remove {cfg.min_reduction:.0%} of {d_out}x{d_in}"
            if reason:
                skipped.append(f"{layer.node}: {reason}")
            else:
                matched.append(layer)
        if not matched:
            return []
        grams = input_grams(model, ctx.calibration, matched, batch_size=cfg.batch_size, max_batches=cfg.max_batches, seed=ctx.seed)
        out: list[Candidate] = []
        for layer in matched:
            gram = grams.get(layer.node)
            if gram is None or gram.rows == 0:
                skipped.append(f"{layer.node}: input not seen on the calibration data")
                continue
            w = model.initializer_array(layer.weight)
            m = weight_matrix(layer, w.astype(np.float64))
            spectrum = fit_low_rank(m, gram.gram[0] / gram.rows, whiten=cfg.whiten, damp=cfg.damp)
            d_in, d_out = layer.in_features, layer.out_features
            max_rank = min(int(math.floor((1 - cfg.min_reduction) * d_in * d_out / (d_in + d_out))), spectrum.max_rank)
            out.append(Candidate(layer, spectrum, max_rank))
        return out

    def _choose(self, candidates: list[Candidate], skipped: list[str]) -> dict[str, LowRankPlan]:
        cfg = self.config
        budget = cfg.budget
        if cfg.target_reduction is not None:
            budget = budget_for_reduction(candidates, cfg.target_reduction)
            logger.info("distill: common layer budget %.4g for %.0f%% reduction", budget, 100 * cfg.target_reduction)
        plans: dict[str, LowRankPlan] = {}
        for cand in candidates:
            plan = plan_for(cand, budget)
            if isinstance(plan, str):
                skipped.append(f"{cand.layer.node}: {plan}")
            else:
                plans[cand.layer.node] = plan
        return plans

    def _back_off(self, teacher: Model, student: Model, plans: dict[str, LowRankPlan], candidates: list[Candidate],
                  calib: CalibrationSet, skipped: list[str]):
        """Tighten the worst layers' budgets (a higher rank) until the model outputs are within the global budget.

        Each round quarters the budget of the worst quarter of the replaced
        layers (by layer error); a layer whose tighter budget needs a rank that
        no longer saves enough params is restored to the teacher's.
        """
        cfg = self.config
        by_node = {c.layer.node: c for c in candidates}
        reference = teacher_outputs(teacher, calib, cfg.batch_size, cfg.max_batches)
        for round_ in range(cfg.max_backoff + 1):
            fid = output_fidelity(reference, student, calib, cfg.batch_size, cfg.max_batches)
            ok = (cfg.global_budget is None or fid["rel_mse"] <= cfg.global_budget) and (
                cfg.min_cosine is None or fid["mean_cosine"] >= cfg.min_cosine
            )
            logger.info("distill: round %d: %d layers, global rel MSE %.4g, cosine %.5f", round_, len(plans), fid["rel_mse"], fid["mean_cosine"])
            if ok or not plans or round_ == cfg.max_backoff:
                break
            worst = sorted(plans.values(), key=lambda p: p.rel_error, reverse=True)[: max(1, len(plans) // 4)]
            plans = dict(plans)
            for p in worst:
                tighter = plan_for(by_node[p.layer.node], p.rel_error / 4)
                if isinstance(tighter, str):
                    del plans[p.layer.node]
                    skipped.append(f"{p.layer.node}: backed off to the teacher (global rel MSE {fid['rel_mse']:.3g}, "
                                   f"cosine {fid['mean_cosine']:.5f}; {tighter})")
                else:
                    plans[p.layer.node] = tighter
            student = apply_plans(teacher, list(plans.values())) if plans else teacher
        if not ok:
            for node in plans:
                skipped.append(f"{node}: backed off (global budget not met after {cfg.max_backoff} rounds)")
            return teacher, {}, fid
        return student, plans, fid

    def _report(self, model: Model, plans: list[LowRankPlan], candidates: list[Candidate], fidelity: Mapping[str, float]) -> dict:
        macs = compute_stats(model).macs_per_node
        layers = []
        for p in plans:
            d_in, d_out = p.layer.in_features, p.layer.out_features
            ratio = p.rank * (d_in + d_out) / (d_in * d_out)
            teacher_macs = int(macs.get(p.layer.node, 0))
            layers.append({
                "node": p.layer.node, "op": p.layer.op, "rank": p.rank, "full_rank": min(d_in, d_out),
                "params_teacher": d_in * d_out, "params_student": p.rank * (d_in + d_out),
                "macs_teacher": teacher_macs, "macs_student": int(round(teacher_macs * ratio)),
                "rel_error": p.rel_error,
            })
        before = sum(l["params_teacher"] for l in layers)
        after = sum(l["params_student"] for l in layers)
        return {
            "replaced": len(plans),
            "whiten": self.config.whiten,
            "params_removed": before - after,
            "candidate_params": sum(c.params for c in candidates),
            "macs_removed": sum(l["macs_teacher"] - l["macs_student"] for l in layers),
            "layers": layers,
            "global": dict(fidelity),
        }


def budget_for_reduction(candidates: list[Candidate], target: float) -> float:
    """The smallest common layer budget under which the candidates lose ``target`` of their params.

    Removed params grow monotonically with the budget, so bisection on it (in
    log space) finds the threshold; if even the loosest budget cannot reach the
    target, the loosest is returned.
    """
    total = sum(c.params for c in candidates)

    def removed(budget: float) -> int:
        out = 0
        for c in candidates:
            r = c.spectrum.smallest_rank(budget)
            if r <= c.max_rank:
                out += c.params - c.student_params(r)
        return out

    lo, hi = -12.0, 0.0  # log10 budget
    if removed(10**hi) < target * total:
        return 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if removed(10**mid) >= target * total:
            hi = mid
        else:
            lo = mid
    return 10**hi


def apply_plans(model: Model, plans: list[LowRankPlan]) -> Model:
    editor = GraphEditor(model)
    nodes = {n.name: n for n in editor.nodes}
    for plan in plans:
        RULES[_rule_name(plan.layer.op)].rewrite(editor, nodes[plan.layer.node], plan)
    return editor.commit()


def _rule_name(op: str) -> str:
    return next(name for name, r in RULES.items() if r.pattern == op)


def plan_for(cand: Candidate, budget: float) -> LowRankPlan | str:
    """The smallest-rank student of ``cand`` within ``budget``, or why there is none."""
    rank = cand.spectrum.smallest_rank(budget)
    if rank > cand.max_rank:
        return (f"rank {rank} needed for budget {budget:.3g} does not reduce params enough "
                f"(max rank {cand.max_rank}; error at it {cand.spectrum.relative_error(cand.max_rank):.3g})")
    left, right = cand.spectrum.factors(rank)
    return LowRankPlan(cand.layer, rank, left, right, cand.spectrum.relative_error(rank))


def teacher_outputs(teacher: Model, calib: CalibrationSet, batch_size: int, max_batches: int | None) -> list[list[np.ndarray]]:
    """The teacher's float outputs per calibration batch (computed once, compared many times)."""
    session = make_session(teacher)
    names = [o.name for o in session.get_outputs()]
    out = []
    for i, feed in enumerate(calib.batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        out.append(session.run(names, feed))
    return out


def output_fidelity(reference: list[list[np.ndarray]], student: Model, calib: CalibrationSet, batch_size: int,
                    max_batches: int | None) -> dict[str, float]:
    """Relative MSE and mean per-sample cosine of the student's float outputs vs the teacher's."""
    session = make_session(student)
    names = [o.name for o in session.get_outputs()]
    err = ref = 0.0
    cosines: list[np.ndarray] = []
    for feed, expected in zip(calib.batches(batch_size), reference):
        for t, s in zip(expected, session.run(names, feed)):
            if t.dtype.kind != "f":
                continue
            t64 = t.astype(np.float64).reshape(len(t), -1)
            s64 = s.astype(np.float64).reshape(len(s), -1)
            err += float(((t64 - s64) ** 2).sum())
            ref += float((t64**2).sum())
            denom = np.linalg.norm(t64, axis=1) * np.linalg.norm(s64, axis=1)
            cosines.append(np.where(denom > 0, (t64 * s64).sum(axis=1) / np.maximum(denom, 1e-300), 1.0))
    cos = np.concatenate(cosines) if cosines else np.ones(1)
    return {"rel_mse": err / ref if ref > 0 else 0.0, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
