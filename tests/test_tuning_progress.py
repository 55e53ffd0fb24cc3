"""Tuning progress counts (the MetaSchedule side is exercised by the slow tuning tests in test_targets)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from optc.targets.tuning_progress import ProgressTracker, format_ms


def result(ms: float | None):
    """A runner result as MetaSchedule hands it over: run_secs, or an error message."""
    return SimpleNamespace(run_secs=[ms / 1e3, ms / 1e3] if ms is not None else None, error_msg=None if ms is not None else "RuntimeError")


def test_counts_best_latency_and_weighted_estimate():
    tracker = ProgressTracker(["conv", "dense"], [2.0, 1.0], trials_per_task=4)
    start = tracker.progress()
    assert (start.tasks_done, start.trials, start.trials_total, start.estimated_ms, start.task) == (0, 0, 8, None, "")
    p = tracker.update(0, [result(3.0), result(None)], terminated=False)
    assert (p.trials, p.failed, p.tasks_done, p.task, p.task_best_ms) == (2, 1, 0, "conv", pytest.approx(3.0))
    assert p.estimated_ms == pytest.approx(6.0) and p.tasks_measured == 1  # weight 2 x 3 ms
    p = tracker.update(0, [result(1.5), result(2.0)], terminated=False)
    assert p.tasks_done == 1 and p.task_best_ms == pytest.approx(1.5) and p.estimated_ms == pytest.approx(3.0)
    p = tracker.update(1, [result(None)], terminated=True)  # a search can end before its budget
    assert p.tasks_done == 2 and p.task_best_ms is None and p.estimated_ms == pytest.approx(3.0)
    assert tracker.never_ran("dense") and not tracker.never_ran("conv") and not tracker.never_ran("other")
    assert "2/2 tasks, 5/8 trials, 2 failed; best estimate 3 ms over 1 tasks" == p.describe()


def test_finish_ends_every_task():
    tracker = ProgressTracker(["a", "b", "c"], [1.0, 1.0, 1.0], trials_per_task=2)
    tracker.update(0, [result(0.05)], terminated=False)
    done = tracker.finish()
    assert done.tasks_done == 3 and done.estimated_ms == pytest.approx(0.05)
    assert format_ms(0.05) == "50 µs" and format_ms(12.345) == "12.3 ms"
