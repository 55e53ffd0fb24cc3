"""distill: replace subgraphs by smaller students fitted to the teacher's activations.

Students (rules: pattern + check + rewrite), in order of precedence:

* ``mlp`` (:mod:`optc.passes.distill.mlp`): ``Linear -> elementwise -> Linear``
  with fewer hidden units, the second layer refit by least squares.
* ``matmul``, ``gemm``, ``conv`` (:mod:`optc.passes.distill.lowrank_rules`): one
  layer becomes two of rank ``r``, fitted whitened (SVD-LLM), ASVD or plain.

A layer claimed by an ``mlp`` block is not offered to the low-rank rules.
Every student is fitted on the Gram of its layer's input over the calibration
set, so the relative data error of each width/rank is known in closed form
(the subgraph output's ``||Y - Y_student||^2 / ||Y||^2``). The width/rank is the
smallest meeting ``budget``; with ``target_reduction`` the budgets are set so
that the candidates lose that fraction of their params (or the model that
fraction of its MACs, ``reduce=macs``): one common budget, or per-subgraph
budgets with the least summed error (:mod:`optc.passes.distill.allocation`). A student must remove at least ``min_reduction`` of the
teacher's params (MACs scale the same way).

With ``reconstruct=sequential`` (the default) each student's last layer is
then refit in graph order on its input as the student model computes it,
against the teacher layer's output on the teacher's input
(:mod:`optc.passes.layers.sequential_refit`, shared with prune-channels): a student
downstream corrects the error of those before it instead of compounding it.
One calibration pass per student; the reported ``rel_error`` is the refit's.

Layer errors compound through the network, so the whole model is then run on
the calibration data against the teacher; while the output relative MSE
exceeds ``global_budget`` (or mean cosine is below ``min_cosine``) the
replacements with the largest layer errors are backed off.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Mapping, Protocol

import numpy as np

from optc.ir.graph import GraphEditor
from optc import progress
from optc.ir.model import Model
from optc.evaluation.fidelity import sample_cosines
from optc.ir.session import make_session
from optc.ir.stats import compute_stats
from optc.ir.view import graph_nodes
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass
from optc.passes.framework.analyses import AnalysisCache, array_bytes
from optc.data.calibration import CalibrationSet
from optc.passes.distill.allocation import KEEP, allocate
from optc.passes.distill.lowrank_rules import RULES, low_rank_candidate
from optc.passes.distill.mlp import MlpPlan, match_mlp_blocks, mlp_candidate
from optc.passes.layers import LinearLayer, find_linear_layers, input_grams
from optc.passes.layers.sequential_refit import RefitTarget, refit_in_graph_order
from optc.data.teacher import TeacherOutputs

logger = logging.getLogger(__name__)

STUDENTS = ("mlp", *RULES)


@dataclass(frozen=True, kw_only=True)
class DistillConfig(PassConfig):
    budget: float = option(0.05, "per-subgraph relative MSE ||Y-Y_student||^2/||Y||^2 on calibration data", ge=0)
    target_reduction: float | None = option(
        None, "fraction to remove (replaces budget): of the candidates' params, or with reduce=macs of the model's MACs", gt=0, lt=1
    )
    reduce: Literal["params", "macs"] = option("params", "what target_reduction counts")
    allocation: Literal["common", "least-total"] = option(
        "common", "target_reduction: one error budget for every subgraph, or the sizes with the least summed error (distill_allocation)"
    )
    global_budget: float | None = option(None, "max relative MSE at the model outputs vs the teacher", ge=0)
    min_cosine: float | None = option(None, "min mean per-sample cosine at the model outputs vs the teacher", ge=-1, le=1)
    fit: Literal["whitened", "asvd", "plain"] = option("whitened", "low-rank fit: whitened (SVD-LLM), asvd (activation scaling) or plain SVD")
    damp: float = option(0.01, "whitening damping, relative to the mean input second moment", ge=0)
    alpha: float = option(0.5, "ASVD exponent on the per-channel activation RMS", ge=0, le=2)
    mlp_select: Literal["greedy", "magnitude"] = option("greedy", "how the mlp student picks hidden units")
    min_reduction: float = option(0.1, "a student must remove at least this fraction of the subgraph's params", ge=0, lt=1)
    exclude: tuple[str, ...] = option((), "node names or op types left alone")
    students: tuple[str, ...] = option(("mlp", "matmul", "gemm", "conv"), "rules to apply")
    batch_size: int = option(16, "calibration batch size", ge=1)
    max_batches: int | None = option(None, "calibration batches used (None: all)", ge=1)
    max_backoff: int = option(8, "rounds of backing off layers to meet the global budget", ge=0)
    reconstruct: Literal["sequential", "none"] = option("sequential", "sequential: refit each student's last layer, in graph order, on the student model's own input")
    ridge: float = option(1e-4, "sequential refit: ridge towards the student's fitted weights, relative to the input second moment", ge=0)

    def __post_init__(self) -> None:
        super().__post_init__()  # declared bounds
        # Not a range: each entry must name a student (STUDENTS is built from the rule table, so no Literal).
        unknown = set(self.students) - set(STUDENTS)
        if unknown:
            raise ValueError(f"students: unknown {sorted(unknown)}; valid: {', '.join(STUDENTS)}")


class Plan(Protocol):
    """A chosen student (low-rank or narrower MLP)."""

    key: str
    rel_error: float
    params_teacher: int
    params_student: int

    def report(self, macs: Mapping[str, float]) -> dict: ...

    def apply(self, editor: GraphEditor, nodes: Mapping) -> None: ...


class Candidate(Protocol):
    """A matched subgraph whose students of every size are known (one fit)."""

    key: str
    params: int
    nodes: tuple[str, ...]  # teacher nodes replaced

    def plan(self, budget: float) -> Plan | str: ...

    def removed(self, budget: float) -> int: ...

    def tradeoff(self) -> tuple[np.ndarray, np.ndarray]: ...


# Budget-independent analyses of the input model (passes/framework/analyses.py): the fitted students
# (Grams, spectra, unit orders: the Grams themselves are input_grams' and shared with its cache) and
# the teacher's outputs on the calibration data.
_CANDIDATES: AnalysisCache[tuple[tuple[Candidate, ...], tuple[str, ...]]] = AnalysisCache("distill: fitted students", 1 << 30)
_TEACHER: AnalysisCache[TeacherOutputs] = AnalysisCache("distill: teacher outputs", 256 << 20)


@register_pass("distill")
class Distill(Pass[DistillConfig]):
    """Replace subgraphs by smaller students fitted on calibration data (see module docstring)."""

    config_class = DistillConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False
    strength = "target_reduction"
    strength_options = frozenset({"target_reduction", "budget", "global_budget", "min_cosine"})

    def strength_option(self) -> str | None:
        # Without a target the per-subgraph error budget decides how much goes: a budget scales it down.
        return "target_reduction" if self.config.target_reduction is not None else "budget"

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        cfg = self.config
        skipped: list[str] = []
        # What the remembered analyses are keyed by; serialising the model is 1 s for MiniLM, so once a run.
        identity = (model.fingerprint(), ctx.calibration.digest)
        candidates = self._candidates(model, ctx, identity, skipped)
        plans = self._choose(model, candidates, skipped)
        if not plans:
            return PassResult(model, modified=False, stats={"replaced": 0}, skipped=skipped)
        reference = _TEACHER.get_or_compute(
            (*identity, cfg.batch_size, cfg.max_batches),
            lambda: TeacherOutputs.capture(model, ctx.calibration, batch_size=cfg.batch_size, max_batches=cfg.max_batches, max_samples=None),
            array_bytes,
        )
        student, refit_errors = self._build(model, plans, ctx)
        if cfg.global_budget is not None or cfg.min_cosine is not None:
            student, plans, refit_errors, fidelity = self._back_off(model, student, plans, refit_errors, candidates, reference, ctx, skipped)
            if not plans:
                return PassResult(model, modified=False, stats={"replaced": 0, "global": fidelity}, skipped=skipped)
        else:
            fidelity = output_fidelity(reference, student, ctx.calibration)
        stats = self._report(model, list(plans.values()), candidates, refit_errors, fidelity)
        return PassResult(student, modified=True, stats=stats, skipped=skipped)

    # -- analysis ----------------------------------------------------------------
    def _candidates(self, model: Model, ctx: PassContext, identity: tuple[str, str], skipped: list[str]) -> list[Candidate]:
        """Every matched subgraph with its students of every size, and why the others are left alone.

        None of it depends on how much is taken (``budget``, ``target_reduction``, the back-off), so the
        default budget's search, which runs this pass at several budgets, fits the students once.
        """
        cfg = self.config
        key = (*identity, ctx.seed, cfg.exclude, cfg.students, cfg.mlp_select,
               cfg.min_reduction, cfg.fit, cfg.damp, cfg.alpha, cfg.batch_size, cfg.max_batches)
        found, reasons = _CANDIDATES.get_or_compute(key, lambda: self._fit_candidates(model, ctx), array_bytes)
        skipped.extend(reasons)
        return list(found)

    def _fit_candidates(self, model: Model, ctx: PassContext) -> tuple[tuple[Candidate, ...], tuple[str, ...]]:
        cfg = self.config
        skipped: list[str] = []
        layers, refused = find_linear_layers(model, exclude=cfg.exclude)
        skipped.extend(refused)
        blocks = []
        if "mlp" in cfg.students:
            blocks, near = match_mlp_blocks(model, layers)
            skipped.extend(near)
        claimed = {b.first.node for b in blocks} | {b.second.node for b in blocks}
        by_op = {RULES[s].pattern: RULES[s] for s in cfg.students if s in RULES}
        matched: list[LinearLayer] = []
        for layer in layers:
            if layer.node in claimed:
                continue
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
        if not matched and not blocks:
            return (), tuple(skipped)
        fitted = matched + [b.second for b in blocks]
        grams = input_grams(model, ctx.calibration, fitted, batch_size=cfg.batch_size, max_batches=cfg.max_batches, seed=ctx.seed)
        out: list[Candidate] = []
        for block in blocks:
            gram = grams.get(block.second.node)
            if gram is None or gram.rows == 0:
                skipped.append(f"{block.key}: mlp: hidden activation not seen on the calibration data")
                continue
            w2 = model.initializer_array(block.second.weight)
            out.append(mlp_candidate(block, w2, gram, select=cfg.mlp_select, min_reduction=cfg.min_reduction))
        for index, layer in enumerate(matched):
            progress.step(index, len(matched), "students fitted")
            gram = grams.get(layer.node)
            if gram is None or gram.rows == 0:
                skipped.append(f"{layer.node}: input not seen on the calibration data")
                continue
            out.append(low_rank_candidate(layer, model.initializer_array(layer.weight), gram, method=cfg.fit, damp=cfg.damp,
                                          alpha=cfg.alpha, min_reduction=cfg.min_reduction))
        return tuple(out), tuple(skipped)

    def _choose(self, model: Model, candidates: list[Candidate], skipped: list[str]) -> dict[str, Plan]:
        cfg = self.config
        budgets = {c.key: cfg.budget for c in candidates}
        if cfg.target_reduction is not None and candidates:
            if cfg.reduce == "macs":
                stats = compute_stats(model)
                weights = {c.key: sum(stats.macs_per_node.get(n, 0) for n in c.nodes) / c.params for c in candidates}
                target = cfg.target_reduction * stats.macs
            else:
                weights = {c.key: 1.0 for c in candidates}
                target = cfg.target_reduction * sum(c.params for c in candidates)
            budgets = allocate(candidates, weights, target, cfg.allocation)
            logger.info("distill: %s budgets for %.0f%% of the %s: %s", cfg.allocation, 100 * cfg.target_reduction, cfg.reduce,
                        ", ".join(f"{k} {b:.3g}" for k, b in budgets.items()))
        plans: dict[str, Plan] = {}
        for cand in candidates:
            if budgets[cand.key] == KEEP:
                skipped.append(f"{cand.key}: kept: the {cfg.allocation} allocation saves more elsewhere for less error")
                continue
            plan = cand.plan(budgets[cand.key])
            if isinstance(plan, str):
                skipped.append(f"{cand.key}: {plan}")
            else:
                plans[cand.key] = plan
        return plans

    def _build(self, teacher: Model, plans: dict[str, Plan], ctx: PassContext) -> tuple[Model, dict[str, float]]:
        """The teacher with ``plans`` applied and, with ``reconstruct=sequential``, their last layers refit.

        Also returns, per refit student, its relative error after the refit.
        """
        student = apply_plans(teacher, list(plans.values()))
        if self.config.reconstruct == "none":
            return student, {}
        order = {n.name: i for i, n in enumerate(graph_nodes(teacher))}
        # Chained MLP blocks (a 3-layer MLP: L1 -> L2 -> L3) share a layer: the first plan refits L2, the second keeps
        # some of L2's output units. L2's refit then reproduces the teacher's rows of those units (its bias already holds
        # the first refit's delta for them); refit against every row, the shapes disagreed (scikit-learn's MLP: a crash).
        narrowed = {p.block.first.node: p.keep for p in plans.values() if isinstance(p, MlpPlan)}
        targets = []
        for key in sorted(plans, key=lambda k: order.get(k, len(order))):
            rows, delta = narrowed.get(key), getattr(plans[key], "bias_delta", None)
            targets.append(RefitTarget(key, rows=rows, bias_already=delta[rows] if delta is not None and rows is not None else delta))
        student, fits = refit_in_graph_order(
            student, teacher, targets, ctx.calibration, ridge=self.config.ridge, max_batches=self.config.max_batches, seed=ctx.seed
        )
        return student, {key: fit.rel_error for key, fit in fits.items()}

    def _back_off(self, teacher: Model, student: Model, plans: dict[str, Plan], refit_errors: dict[str, float],
                  candidates: list[Candidate], reference: TeacherOutputs, ctx: PassContext, skipped: list[str]):
        """Tighten the worst subgraphs' budgets (a larger student) until the model outputs are within the global budget.

        Each round quarters the budget of the worst quarter of the replaced
        subgraphs (by their error); one whose tighter budget needs a student
        that no longer saves enough params is restored to the teacher's.
        """
        cfg = self.config
        by_key = {c.key: c for c in candidates}
        for round_ in range(cfg.max_backoff + 1):
            fid = output_fidelity(reference, student, ctx.calibration)
            ok = (cfg.global_budget is None or fid["rel_mse"] <= cfg.global_budget) and (
                cfg.min_cosine is None or fid["mean_cosine"] >= cfg.min_cosine
            )
            logger.info("distill: round %d: %d subgraphs, global rel MSE %.4g, cosine %.5f", round_, len(plans), fid["rel_mse"], fid["mean_cosine"])
            if ok or not plans or round_ == cfg.max_backoff:
                break
            worst = sorted(plans.values(), key=lambda p: p.rel_error, reverse=True)[: max(1, len(plans) // 4)]
            plans = dict(plans)
            for p in worst:
                tighter = by_key[p.key].plan(p.rel_error / 4)
                if isinstance(tighter, str):
                    del plans[p.key]
                    skipped.append(f"{p.key}: backed off to the teacher (global rel MSE {fid['rel_mse']:.3g}, "
                                   f"cosine {fid['mean_cosine']:.5f}; {tighter})")
                else:
                    plans[p.key] = tighter
            student, refit_errors = self._build(teacher, plans, ctx) if plans else (teacher, {})
        if not ok:
            for key in plans:
                skipped.append(f"{key}: backed off (global budget not met after {cfg.max_backoff} rounds)")
            return teacher, {}, {}, fid
        return student, plans, refit_errors, fid

    def _report(self, model: Model, plans: list[Plan], candidates: list[Candidate], refit_errors: Mapping[str, float],
                fidelity: Mapping[str, float]) -> dict:
        macs = compute_stats(model).macs_per_node
        layers = [p.report(macs) for p in plans]
        for layer, plan in zip(layers, plans):
            if plan.key in refit_errors:
                layer["rel_error_fit"], layer["rel_error"] = layer["rel_error"], refit_errors[plan.key]
        return {
            "replaced": len(plans),
            "fit": self.config.fit,
            "reconstruct": self.config.reconstruct,
            "params_removed": sum(l["params_teacher"] - l["params_student"] for l in layers),
            "candidate_params": sum(c.params for c in candidates),
            "macs_removed": sum(l["macs_teacher"] - l["macs_student"] for l in layers),
            **({"target": f"{self.config.target_reduction:.0%} of the {self.config.reduce}, {self.config.allocation} allocation"}
               if self.config.target_reduction is not None else {}),
            "layers": layers,
            "global": dict(fidelity),
        }


def apply_plans(model: Model, plans: list[Plan]) -> Model:
    editor = GraphEditor(model)
    nodes = {n.name: n for n in editor.nodes}
    for plan in plans:
        plan.apply(editor, nodes)
    return editor.commit()


def output_fidelity(reference: TeacherOutputs, student: Model, calib: CalibrationSet) -> dict[str, float]:
    """Relative MSE and mean per-sample cosine of the student's float outputs vs the teacher's."""
    session = make_session(student)
    names = [o.name for o in session.get_outputs()]
    err = ref = 0.0
    cosines: list[np.ndarray] = []
    for feed, expected in reference.with_feeds(calib):
        for name, s in zip(names, session.run(names, feed)):
            t = expected[name]
            if t.dtype.kind != "f":
                continue
            t64 = t.astype(np.float64).reshape(len(t), -1)
            s64 = s.astype(np.float64).reshape(len(s), -1)
            err += float(((t64 - s64) ** 2).sum())
            ref += float((t64**2).sum())
            cosines.append(sample_cosines(t64, s64))
    cos = np.concatenate(cosines) if cosines else np.ones(1)
    return {"rel_mse": err / ref if ref > 0 else 0.0, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
