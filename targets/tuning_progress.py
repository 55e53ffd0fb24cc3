"""Tuning progress: trial and task counts and the best latency so far, as MetaSchedule measures.

MetaSchedule reports progress only as log tables. :func:`progress_callback`
builds a measure callback (run after every measured batch, beside the default
ones that commit records) that keeps counts and calls ``on_progress`` with a
:class:`TuneProgress`; the CLI draws a progress bar from it.

The estimate of the model's time is MetaSchedule's own: the sum over tasks of
(task weight x best measured latency), over the tasks measured so far.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneProgress:
    tasks: int  # tasks being tuned (those the database lacked)
    tasks_done: int  # tasks whose trial budget is spent or whose search ended
    trials: int  # candidates measured so far
    trials_total: int  # trials per task x tasks: the budget
    failed: int  # candidates that failed to build or run
    task: str  # the task just measured
    task_best_ms: float | None  # its best latency so far (None: no candidate ran)
    estimated_ms: float | None  # sum of weight x best over the measured tasks
    tasks_measured: int  # tasks with at least one candidate that ran

    def describe(self) -> str:
        best = f"{format_ms(self.estimated_ms)} over {self.tasks_measured} tasks" if self.estimated_ms is not None else "none yet"
        failed = f", {self.failed} failed" if self.failed else ""
        return f"{self.tasks_done}/{self.tasks} tasks, {self.trials}/{self.trials_total} trials{failed}; best estimate {best}"


def format_ms(ms: float) -> str:
    return f"{ms:.3g} ms" if ms >= 0.1 else f"{ms * 1e3:.3g} µs"


def _seconds(result: Any) -> float | None:
    """Mean run time of one runner result, or None when it failed."""
    if result.error_msg or not result.run_secs:
        return None
    secs = [float(getattr(v, "value", v)) for v in result.run_secs]
    return sum(secs) / len(secs)


class ProgressTracker:
    """Counts per task; ``update`` takes one measured batch."""

    def __init__(self, names: list[str], weights: list[float], trials_per_task: int):
        self.names = names
        self.weights = weights
        self.trials_per_task = trials_per_task
        self.trials = [0] * len(names)
        self.best: list[float | None] = [None] * len(names)
        self.ended = [False] * len(names)
        self.failed = 0

    def estimate_ms(self) -> float | None:
        measured = [i for i, b in enumerate(self.best) if b is not None]
        return sum(self.weights[i] * self.best[i] for i in measured) * 1e3 if measured else None

    def never_ran(self, name: str) -> bool:
        """True when ``name`` was tuned and none of its candidates ran."""
        return name in self.names and self.best[self.names.index(name)] is None and self.trials[self.names.index(name)] > 0

    def update(self, task_id: int, runner_results: list[Any], terminated: bool) -> TuneProgress:
        self.trials[task_id] += len(runner_results)
        for result in runner_results:
            secs = _seconds(result)
            if secs is None:
                self.failed += 1
            elif self.best[task_id] is None or secs < self.best[task_id]:
                self.best[task_id] = secs
        self.ended[task_id] = terminated or self.trials[task_id] >= self.trials_per_task
        return self.progress(task_id)

    def finish(self) -> TuneProgress:
        """Every task ended (a search can stop without a last measured batch)."""
        self.ended = [True] * len(self.names)
        return self.progress()

    def progress(self, task_id: int | None = None) -> TuneProgress:
        """Where tuning stands; ``task_id`` is the task last measured (None: before the first)."""
        best = self.best[task_id] if task_id is not None else None
        return TuneProgress(
            tasks=len(self.names),
            tasks_done=sum(self.ended),
            trials=sum(self.trials),
            trials_total=self.trials_per_task * len(self.names),
            failed=self.failed,
            task=self.names[task_id] if task_id is not None else "",
            task_best_ms=best * 1e3 if best is not None else None,
            estimated_ms=self.estimate_ms(),
            tasks_measured=sum(b is not None for b in self.best),
        )


def progress_callback(tracker: ProgressTracker, on_progress: Callable[[TuneProgress], None]) -> Any:
    """A MetaSchedule measure callback that feeds ``tracker`` and reports to ``on_progress``."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class _Progress(PyMeasureCallback):
        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            try:
                terminated = bool(task_scheduler.tasks_[task_id].is_terminated)
            except (AttributeError, IndexError):  # the record's fields are an implementation detail
                terminated = False
            progress = tracker.update(int(task_id), list(runner_results), terminated)
            try:
                on_progress(progress)
            except Exception:  # a display error must not abort hours of tuning
                logger.exception("tuning progress display failed")

    return _Progress()
