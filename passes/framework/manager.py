"""Running a pipeline: requirements, analyses, instruments, records.

The manager checks every pass's requirements before the first pass runs,
provides shape inference when a pass needs it (recomputed only after a pass
changed the graph), records what each pass did (params, bytes, MACs, time,
drift) and calls instruments before and after each pass. Every pass also runs
on the weights inside the main graph's ``If`` branches (:mod:`.branches`). A pass that raises
something other than an :class:`OptcError` is a bug, reported as a
:class:`PassCrash` (exit code 1, not 2) that names it and the passes that ran before it.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from optc.errors import ConfigError, OptcError, PassCrash, PassError
from optc.ir.model import Model
from optc.ir.opset import upgrade_opset
from optc.ir.shapes import infer_shapes
from optc.ir.stats import ModelStats, compute_stats
from optc.passes.framework.base import Pass, PassContext, PassResult, Requirement
from optc.passes.framework.blas import one_blas_thread
from optc.passes.framework.branches import run_with_branches

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass did, for reports."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    drift: dict[str, Any] | None = None  # filled by VerifyEach

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name,
            "options": self.options,
            "modified": self.modified,
            "seconds": round(self.seconds, 4),
            "before": self.before,
            "after": self.after,
            "stats": self.stats,
            "skipped": self.skipped,
            "drift": self.drift,
        }


@dataclass
class PipelineResult:
    model: Model
    records: list[PassRecord]
    initial: ModelStats
    final: ModelStats


class Instrument:
    """Hooks around every pass (timing, verification, dumps). Default: do nothing."""

    # An instrument that only shows progress needs no run of its own: a pipeline a budget search already ran
    # is written as measured instead of being run again for it (api._run).
    display_only = False

    def before_pipeline(self, model: Model, ctx: PassContext) -> None: ...

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None: ...

    def after_pass(self, p: Pass, before: Model, result: PassResult, record: PassRecord, ctx: PassContext) -> None: ...


def _run(p: Pass, model: Model, ctx: PassContext) -> PassResult:
    return p.run(model, ctx)


def _summary(stats: ModelStats) -> dict[str, int]:
    return {"params": stats.params, "nonzero_params": stats.nonzero_params, "bytes": stats.param_bytes, "macs": stats.macs, "nodes": stats.nodes}


class PassManager:
    """An ordered pipeline of configured passes."""

    def __init__(self, passes: Sequence[Pass], instruments: Sequence[Instrument] = ()):
        self.passes = list(passes)
        self.instruments = list(instruments)

    def check_requirements(self, model: Model, ctx: PassContext) -> None:
        """Fail before any work when a pass needs what the run does not have."""
        for p in self.passes:
            if (Requirement.CALIBRATION in p.requirements() or Requirement.TEACHER in p.requirements()) and ctx.calibration is None:
                raise ConfigError(f"pass '{p.name}' needs calibration data: give --calib FILE.npz")
            if ctx.calibration is not None and ctx.calibration.num_samples < p.min_calibration_samples:
                raise ConfigError(f"{p.name} needs at least {p.min_calibration_samples} calibration samples, got {ctx.calibration.num_samples}")
            if Requirement.STATIC_SHAPES in p.requirements():
                dynamic = [s.describe() for s in model.inputs if not s.is_static]
                if dynamic:
                    raise ConfigError(f"pass '{p.name}' needs static input shapes; freeze with --input-shape ({'; '.join(dynamic)})")

    def run(self, model: Model, ctx: PassContext | None = None) -> PipelineResult:
        with one_blas_thread():
            return self._run(model, ctx)

    def _run(self, model: Model, ctx: PassContext | None) -> PipelineResult:
        ctx = ctx or PassContext()
        self.check_requirements(model, ctx)
        infer_shapes(model)
        if ctx.teacher is None and any(Requirement.TEACHER in p.requirements() for p in self.passes):
            from optc.data.teacher import TeacherOutputs

            ctx = dataclasses.replace(ctx, teacher=TeacherOutputs.capture(model, ctx.calibration))
        initial = compute_stats(model)
        current_stats = initial
        for inst in self.instruments:
            inst.before_pipeline(model, ctx)
        records: list[PassRecord] = []
        for index, p in enumerate(self.passes):
            unchanged = model  # what a pass that changes nothing hands on: its opset upgrade is undone too
            if p.min_opset and model.opset < p.min_opset:
                # A functional upgrade: earlier stages (and VerifyEach's reference) are untouched.
                model = model.copy()
                upgrade_opset(model, p.min_opset)
                infer_shapes(model)
            for inst in self.instruments:
                inst.before_pass(p, model, ctx)
            start = time.perf_counter()
            try:
                result = run_with_branches(p, model, ctx, _run)
            except OptcError:
                raise
            except Exception as exc:  # a bug in a pass: say which, and what ran before
                ran = ", ".join(q.name for q in self.passes[:index]) or "none"
                raise PassCrash(f"{type(exc).__name__}: {exc} (passes run before: {ran})", pass_name=p.name) from exc
            finally:
                # onnx-graphsurgeon graphs are reference cycles holding the previous
                # model's tensors; collect them now rather than when gc gets round to it.
                gc.collect()
            seconds = time.perf_counter() - start
            if result.modified:
                # Shapes are kept fresh after every change: stats need them, and
                # so does any later pass that requires Requirement.SHAPES.
                infer_shapes(result.model)
                new_stats = compute_stats(result.model)
            else:
                if result.model is not model:
                    raise PassError("reported no change but returned a different model object", pass_name=p.name)
                new_stats = current_stats
            record = PassRecord(
                name=p.name,
                options=p.describe_config(),
                modified=result.modified,
                seconds=seconds,
                before=_summary(current_stats),
                after=_summary(new_stats),
                stats=result.stats,
                skipped=result.skipped,
            )
            for inst in self.instruments:
                inst.after_pass(p, model, result, record, ctx)
            logger.info("%s: %s in %.3fs", p.name, "modified" if result.modified else "no change", seconds)
            records.append(record)
            model, current_stats = (result.model if result.modified else unchanged), new_stats
        return PipelineResult(model, records, initial, current_stats)
