"""The most compression within an accuracy budget.

A budget is a metric measured on held-out data (``--eval``, which no pass fits
on) and the largest drop from the input model's value the run may accept
(``--max-drop``; ``--min-fidelity C`` is the metric ``cosine`` with a drop of
``1 - C``). Every lossy pass in the pipeline obeys it: the value of its
strength option (``Pass.strength``: ``ratio``, ``sparsity``,
``target_reduction``) is the most it may take.

Search: if the pipeline as asked meets the budget, it is kept. Otherwise one
common scale ``s`` of every strength is bisected (the metric falls as every
pass takes more, so the feasible scales form an interval from 0). Where to
take within a pass (which layers, channels, subgraphs) stays the pass's own
measured decision (its sensitivity allocation), so a layer that cannot take
compression is found by measuring, not by a list. Lossy passes without a
scalable strength (``quantize``; ``distill`` steered by its error budget) are
tried, when even ``s`` near 0 misses the budget, first with their own
per-layer fallback (``max_drop``: the most sensitive layers stay float, judged
by the pass's measure nearest the budget's), then with a tighter one, then
left out, the one whose removal recovers the most first.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from optc.evaluation.metrics import MetricRunner
from optc.ir.model import Model
from optc.ir.stats import compute_stats
from optc.passes.framework import Pass, PipelineResult
from optc.search.points import Point
from optc.search.prefix import PrefixRunner

OnPoint = Callable[[Point, Model], None]


@dataclass(frozen=True)
class Budget:
    """A metric on held-out data and the largest drop from the input model's value."""

    runner: MetricRunner
    max_drop: float

    def measure(self, model: Model) -> tuple[float, float, bool]:
        score, drop = self.runner.measure(model)
        return score, drop, drop <= self.max_drop + 1e-12


def measure_pipeline(prefix: PrefixRunner, budget: Budget, pipeline: Sequence[Pass], strengths: dict[str, Any],
                     latency_ms: Callable[[Model], float] | None = None) -> tuple[Point, PipelineResult]:
    """Run ``pipeline`` (reusing computed prefixes) and measure it: one explored point and its run (model, records)."""
    start = time.perf_counter()
    run = prefix.run_pipeline(pipeline)
    model = run.model
    score, drop, ok = budget.measure(model)
    stats = compute_stats(model)
    point = Point(strengths, score, drop, stats.param_bytes, stats.macs, ok, latency_ms=latency_ms(model) if latency_ms else None,
                  seconds=time.perf_counter() - start, passes=[repr(p) for p in pipeline])
    return point, run


@dataclass
class BudgetResult:
    passes: list[Pass]
    run: PipelineResult  # the chosen pipeline's run: the caller reports it rather than running it again
    chosen: Point
    points: list[Point]
    notes: list[str]

    @property
    def model(self) -> Model:
        return self.run.model


def configure(passes: Sequence[Pass], scale: float, off: frozenset[int] = frozenset(), fallback: dict[int, Pass] | None = None) -> list[Pass]:
    """The pipeline with every scalable strength times ``scale`` (0 leaves the pass out), fixed
    lossy passes in ``off`` left out, and those in ``fallback`` replaced by their fallback form."""
    out: list[Pass] = []
    for i, p in enumerate(passes):
        if p.exact:
            out.append(p)
            continue
        if fallback and i in fallback:
            p = fallback[i]
        value = getattr(p.config, p.strength_option(), None) if p.strength_option() else None
        if isinstance(value, (int, float)) and value:
            if scale > 0:
                out.append(type(p)(dataclasses.replace(p.config, **{p.strength_option(): value * scale})))
        elif i not in off:
            out.append(p)
    return out


def strengths(passes: Sequence[Pass], scale: float, off: frozenset[int], fallback: dict[int, Pass]) -> dict[str, Any]:
    """What each lossy pass was asked to take, for reports: ``name#index -> value`` (0: left out)."""
    out: dict[str, Any] = {}
    for i, p in enumerate(passes):
        if p.exact:
            continue
        value = getattr(p.config, p.strength_option(), None) if p.strength_option() else None
        key = f"{p.name}#{i}"
        if isinstance(value, (int, float)) and value:
            out[key] = round(value * scale, 6)
        elif i in off:
            out[key] = 0
        else:
            out[key] = "fallback" if i in fallback else "as configured"
    return out


class _Evaluator:
    def __init__(self, passes: Sequence[Pass], runner: PrefixRunner, budget: Budget, on_point: OnPoint | None):
        self.passes, self.runner, self.budget, self.on_point = list(passes), runner, budget, on_point
        self.points: list[Point] = []
        self.runs: dict[int, PipelineResult] = {}

    def __call__(self, scale: float, off: frozenset[int], fallback: dict[int, Pass]) -> Point:
        pipeline = configure(self.passes, scale, off, fallback)
        point, run = measure_pipeline(self.runner, self.budget, pipeline, strengths(self.passes, scale, off, fallback))
        self.points.append(point)
        # Keep models only for this point and the most compressed feasible one: a
        # search over a large model must not hold a copy of it per point.
        best = min((q for q in self.points if q.feasible), key=lambda q: q.bytes, default=None)
        self.runs = {k: r for k, r in self.runs.items() if best is not None and k == id(best)}
        self.runs[id(point)] = run
        if self.on_point is not None:
            self.on_point(point, run.model)
        return point


def fit_to_budget(passes: Sequence[Pass], runner: PrefixRunner, budget: Budget, *, steps: int = 6, on_point: OnPoint | None = None,
                  limit_s: float | None = None) -> BudgetResult:
    """The configuration with the most compression found within ``budget`` (see module docstring).

    ``limit_s``: the time the search may take. Past it, lossy passes without a scalable strength that still
    miss the budget are left out and the bisection stops at the best point found; a fallback started before
    it gets at most the time left (its own ``time_budget_s`` otherwise).
    """
    clock = _Clock(limit_s)
    evaluate = _Evaluator(passes, runner, budget, on_point)
    notes: list[str] = []
    full = evaluate(1.0, frozenset(), {})
    if full.feasible:
        return _result(evaluate, full, 1.0, frozenset(), {}, notes)
    scalable = [i for i, p in enumerate(passes) if not p.exact and p.strength_option() and getattr(p.config, p.strength_option(), None)]
    fixed = [i for i, p in enumerate(passes) if not p.exact and i not in scalable]
    off: frozenset[int] = frozenset()
    fallback: dict[int, Pass] = {}
    while True:
        # Without a scalable strength the floor is the pipeline as asked, less what was relaxed so far.
        floor = evaluate(0.0, off, fallback) if scalable else (full if not off and not fallback else evaluate(1.0, off, fallback))
        if floor.feasible:
            break
        if clock.spent() and any(i not in off for i in fixed):
            left = [i for i in fixed if i not in off]
            off, fallback = off | frozenset(left), {i: p for i, p in fallback.items() if i not in left}
            notes.append(f"{', '.join(passes[i].name for i in left)}: left out, the search's {limit_s:g} s ran out before "
                         f"the budget held with it (give --max-drop, or the pass's own max_drop, to search longer)")
            continue
        step = _relax_fixed(evaluate, passes, fixed, off, fallback, budget, clock)
        if step is None:  # nothing left to relax: only exact passes remain, which cannot miss a budget
            return _result(evaluate, floor, 0.0, off, fallback, notes)
        off, fallback, note = step
        notes.append(note)
    lo, hi, best = 0.0, 1.0, floor
    for _ in range(steps if scalable else 0):
        if clock.spent():
            notes.append(f"the search's {limit_s:g} s ran out: strengths bisected to {lo:.3f}, not finer")
            break
        mid = (lo + hi) / 2
        point = evaluate(mid, off, fallback)
        if point.feasible:
            lo, best = mid, point
        else:
            hi = mid
    notes.append(f"the pipeline as asked missed the budget (drop {full.drop:.4f} > {budget.max_drop:.4f}); "
                 f"strengths scaled to {lo:.3f} of what was asked")
    return _result(evaluate, best, lo, off, fallback, notes)


class _Clock:
    """The time a search has left (None: no limit)."""

    def __init__(self, limit_s: float | None):
        self.deadline = None if limit_s is None else time.monotonic() + limit_s

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def spent(self) -> bool:
        return self.left() == 0.0


def _relax_fixed(evaluate: _Evaluator, passes: Sequence[Pass], fixed: list[int], off: frozenset[int], fallback: dict[int, Pass],
                 budget: Budget, clock: _Clock | None = None) -> tuple[frozenset[int], dict[int, Pass], str] | None:
    """One step back for a lossy pass without a scalable strength: its own fallback first, tightened
    once when that misses, else leave it out."""
    for i in fixed:
        p = passes[i]
        if i in off or "max_drop" not in _fields(p) or getattr(p.config, "max_drop") is not None:
            continue
        # The fallback holds its drop on the calibration data it fits; the budget holds a confidence bound
        # on held-out data, so a fallback at half the budget can still miss it (ddddocr's OCR: 0.9886 of
        # its frames agreed, bounded at 0.9814 < 0.99). One tighter try costs far less than losing the pass.
        if i in fallback and fallback[i].config.max_drop < budget.max_drop / 2:
            continue  # tightened once already
        level = budget.max_drop / 2 if i not in fallback else budget.max_drop / (2 * FALLBACK_TIGHTEN)
        changes: dict[str, Any] = {"max_drop": level}
        if "metric" in _fields(p):
            changes["metric"] = _fallback_metric(budget)
        left = clock.left() if clock is not None else None
        if left is not None and "time_budget_s" in _fields(p):
            changes["time_budget_s"] = min(p.config.time_budget_s, left)
        return off, {**fallback, i: type(p)(dataclasses.replace(p.config, **changes))}, f"{p.name}: its most sensitive layers fall back (max_drop={level:g})"
    candidates = [i for i in fixed if i not in off]
    if not candidates:
        return None
    trials = [(evaluate(0.0, off | {i}, fallback), i) for i in candidates]
    best, index = max(trials, key=lambda t: t[0].metric)
    return off | {index}, fallback, f"{passes[index].name}: left out, the budget cannot hold with it (metric {best.metric:.4f} without it)"


FALLBACK_TIGHTEN = 4  # the second fallback holds a quarter of the first's drop


def _fallback_metric(budget: Budget) -> str:
    """The pass's own fidelity measure closest to what the budget holds: an argmax budget is not met by a cosine."""
    name = budget.runner.metric.name
    if budget.runner.hold:  # outputs top-k does not read, held by their cosine: fidelity sees them, top1 does not
        return "fidelity"
    return "top1" if name in ("top1", "top5") else "fidelity" if name == "fidelity" else "cosine"


def _fields(p: Pass) -> set[str]:
    return {f.name for f in dataclasses.fields(p.config)} if dataclasses.is_dataclass(p.config) else set()


def _result(evaluate: _Evaluator, point: Point, scale: float, off: frozenset[int], fallback: dict[int, Pass], notes: list[str]) -> BudgetResult:
    point.chosen = True
    if id(point) not in evaluate.runs:  # dropped to save memory: the prefix cache makes this cheap
        evaluate.runs[id(point)] = evaluate.runner.run_pipeline(configure(evaluate.passes, scale, off, fallback))
    return BudgetResult(configure(evaluate.passes, scale, off, fallback), evaluate.runs[id(point)], point, evaluate.points, notes)
