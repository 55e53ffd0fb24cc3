"""Choosing the pipeline a budgeted run compiles: the library side of ``--max-drop``,
``--min-fidelity``, ``--time-budget`` and ``--objective``.

The budget is measured on the evaluation data (``--eval``), which no pass fits
on: calibration data would flatter every pass that fitted to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from optc.data.labelled import LabelledSet
from optc.errors import ConfigError
from optc.evaluation.latency import latency_ms
from optc.evaluation.metrics import Metric, MetricRunner, bounded, load_metric
from optc.ir.model import Model
from optc.passes.framework import Pass, PassContext, PipelineResult
from optc.search.budget import Budget, fit_to_budget
from optc.search.explore import OnImprove, explore
from optc.search.prefix import PrefixRunner

OBJECTIVES = ("size", "macs", "latency")
EXIT_BUDGET_MISSED = 3  # documented in the README: a CI job can tell it from bad input (2)


class BudgetMissed(ConfigError):
    """The compiled model misses the accuracy budget (exit code 3): nothing is written."""

    exit_code = EXIT_BUDGET_MISSED


@dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    """What the user asked: a metric and the most it may drop, and optionally a search."""

    metric: str | Metric | None = None  # default: top1 with max_drop, cosine with min_fidelity
    max_drop: float | None = None
    min_fidelity: float | None = None
    time_budget_s: float | None = None
    objective: str = "size"
    search_steps: int = 6  # bisection steps of the common strength scale (resolution 2**-steps)
    search_limit_s: float | None = None  # the time the strength search may take (the default budget's: guard.SEARCH_LIMIT_S)
    hold: tuple[str, ...] = ()  # outputs the metric does not read, held by their cosine too (MetricRunner's hold: the default budget's)

    def __post_init__(self) -> None:
        if self.max_drop is not None and self.min_fidelity is not None:
            raise ConfigError("--max-drop and --min-fidelity are two ways to state one budget: give one")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"--max-drop must be in [0, 1) (an absolute drop of the metric: 0.01 is one point), not {self.max_drop}")
        if self.min_fidelity is not None and not 0 < self.min_fidelity <= 1:
            raise ConfigError(f"--min-fidelity must be in (0, 1], not {self.min_fidelity}")
        if self.time_budget_s is not None and not 0 < self.time_budget_s <= 7 * 86400:
            raise ConfigError(f"--time-budget must be a positive number of seconds (at most a week), not {self.time_budget_s}")
        if self.time_budget_s is not None and not self.active:
            raise ConfigError("--time-budget searches within an accuracy budget: give --max-drop or --min-fidelity too")
        if self.search_limit_s is not None and not self.search_limit_s > 0:
            raise ConfigError(f"the search's time limit must be a positive number of seconds, not {self.search_limit_s}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")

    @property
    def active(self) -> bool:
        return self.max_drop is not None or self.min_fidelity is not None

    def resolve(self) -> tuple[Metric, float]:
        """The metric object and the largest drop it may take."""
        if self.min_fidelity is not None:
            if self.metric not in (None, "cosine"):
                raise ConfigError("--min-fidelity is a floor on the cosine to the input model: drop --metric, or use --max-drop with it")
            return load_metric("cosine"), 1.0 - self.min_fidelity
        return self.named_metric() or load_metric("top1"), float(self.max_drop)

    def named_metric(self) -> Metric | None:
        """The metric the user named (``--metric``) as an object; None when none was named."""
        if self.metric is None:
            return None
        return self.metric if isinstance(self.metric, Metric) else load_metric(self.metric)


@dataclass
class Chosen:
    passes: list[Pass]
    run: PipelineResult  # ``passes`` run on the input (model, records, stats), as measured by the search
    section: dict[str, Any] = field(default_factory=dict)  # report.json's "search"


def choose_pipeline(passes: Sequence[Pass], model: Model, ctx: PassContext, labelled: LabelledSet | None, spec: BudgetSpec,
                    on_improve: OnImprove | None = None, ran: tuple[Sequence[Pass], PipelineResult] | None = None) -> Chosen:
    """The strongest pipeline within the budget (see :mod:`optc.search.budget` and :mod:`optc.search.explore`).

    ``ran``: a pipeline the caller already ran on ``model`` with ``ctx`` and its result (the run the default
    budget found too lossy); the search takes it as computed instead of running it again.
    """
    if labelled is None:
        raise ConfigError("an accuracy budget is measured on held-out data: give --eval LABELLED.npz (data no pass fits on)")
    metric, drop = spec.resolve()
    metric = bounded(metric)  # the budget's data is a sample of the user's: held with a confidence bound
    runner = MetricRunner(metric, labelled.inputs, labelled.labels, model, hold=spec.hold)
    prefix = PrefixRunner(model, ctx)
    if ran is not None:
        prefix.remember(*ran)
    budget = Budget(runner, drop)
    section: dict[str, Any] = {"metric": metric.name, "max_drop": drop, "baseline": runner.baseline, "samples": labelled.inputs.num_samples,
                               "objective": {"size": "bytes"}.get(spec.objective, spec.objective)}
    if runner.hold:
        section["held_by_cosine"] = list(runner.hold)
    if metric.bounded:
        section["score"] = ("the mean; the drop is the 90 % upper confidence bound of the paired per-sample drop" if metric.per_sample
                            else "the 90 % lower confidence bound of the per-sample mean")
    if spec.time_budget_s is not None:
        feeds = labelled.inputs.take(8)
        timing: Callable[[Model], float] | None = (lambda m: latency_ms(m, feeds, repeats=20, budget_s=1.0)) if spec.objective == "latency" else None
        found = explore(passes, prefix, budget, objective=section["objective"], time_budget_s=spec.time_budget_s, on_improve=on_improve, latency_ms=timing)
        section.update(points=[p.to_dict() for p in found.points], stopped=found.stopped, time_budget_s=spec.time_budget_s,
                       chosen=found.best.to_dict(), notes=[])
        chosen, run = found.passes, found.run
    else:
        fitted = fit_to_budget(passes, prefix, budget, steps=spec.search_steps, limit_s=spec.search_limit_s)
        if spec.search_limit_s is not None:
            section["limit_s"] = spec.search_limit_s
        section.update(points=[p.to_dict() for p in fitted.points], chosen=fitted.chosen.to_dict(), notes=fitted.notes)
        chosen, run = fitted.passes, fitted.run
    section["passes_run"], section["passes_reused"] = prefix.passes_run, prefix.passes_reused
    return Chosen(list(chosen), run, section)
