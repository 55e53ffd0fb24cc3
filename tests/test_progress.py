"""Progress of long passes: steps reported from deep inside a pass reach the CLI's display."""
from __future__ import annotations

import io
import time

from helpers import SAMPLE
from rich.console import Console

from optc import progress
from optc.cli.progress import ProgressInstrument
from optc.ir import load_model
from optc.passes import Pass, PassManager, PassResult, register_pass


@register_pass("test-slow-steps")
class _SlowSteps(Pass):
    """Takes 1.5 s in four reported steps and changes nothing."""

    def run(self, model, ctx):
        for done in range(4):
            progress.step(done, 4, "things done")
            time.sleep(0.375)
        return PassResult(model, modified=False)


def test_a_log_gets_a_line_every_few_seconds_with_the_steps():
    log = io.StringIO()
    shown = ProgressInstrument(Console(file=io.StringIO()), total=1, stream=log)
    shown.LOG_EVERY_S = 0.5
    with progress.reporting_to(shown.step):
        PassManager([_SlowSteps()], [shown]).run(load_model(SAMPLE / "mnist_cnn.onnx"))
    shown.close()
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 4, lines
    assert all(line.startswith("optc: [1/1] test-slow-steps: ") and line.endswith(" s") for line in lines)
    assert any("/4 things done" in line for line in lines)


def test_steps_outside_a_display_cost_nothing_and_reach_no_one():
    progress.step(1, 2, "things")  # no sink installed: nothing happens
    seen = []
    with progress.reporting_to(lambda *a: seen.append(a)):
        progress.step(1, 2, "things")
    progress.step(2, 2, "things")
    assert seen == [(1, 2, "things")]


def test_real_passes_report_their_steps():
    """prune-channels captures calibration batches and refits layer by layer; distill fits students: all reported."""
    from optc import api

    seen: dict[str, list[tuple[int, int]]] = {}
    with progress.reporting_to(lambda done, total, unit: seen.setdefault(unit, []).append((done, total))):
        api.compile(SAMPLE / "mnist_cnn.onnx", [api.make_pass("prune-channels", {"ratio": 0.3}), api.make_pass("distill")],
                    calibration=SAMPLE / "calib.npz", measure_latency=False, default_budget=False)
    assert {"calibration runs", "layers refit", "students fitted"} <= set(seen), seen
    for steps in seen.values():
        assert all(0 <= done <= total for done, total in steps)
