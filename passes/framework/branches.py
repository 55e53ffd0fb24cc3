"""Every pass also runs inside the main graph's ``If`` branches, each branch as a model of its own.

:mod:`optc.ir.branches` lifts a body that holds weights out as a model (inputs:
the outer values it reads). A data-driven pass needs that model's calibration
data: the values those outer names take on the calibration samples whose
condition selects the branch, captured with onnxruntime one batch at a time (a
batch never mixes two values of a rank-0 input, so it takes one branch). A
branch no sample takes keeps its weights, and the pass says so. Nested ``If``
bodies are reached the same way, one level at a time.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import numpy as np

from optc.data.calibration import CalibrationSet
from optc.errors import ConfigError, OptcError
from optc.ir.branches import Branch, branch_model, declare_rank, put_back, weighty_branches
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.ir.shapes import infer_shapes
from optc.passes.framework.base import Pass, PassContext, PassResult, Requirement

Runner = Callable[[Pass, Model, PassContext], PassResult]
logger = logging.getLogger(__name__)


def run_with_branches(p: Pass, model: Model, ctx: PassContext, run: Runner) -> PassResult:
    """``run(p, model, ctx)``, then ``p`` on every weighty ``If`` branch, merged into one result."""
    result = run(p, model, ctx)
    branches = weighty_branches(result.model)
    if not branches:
        return result
    needs = p.requirements()
    data_driven = Requirement.CALIBRATION in needs or Requirement.TEACHER in needs
    current, modified = result.model, result.modified
    stats, skipped = dict(result.stats), list(result.skipped)
    for branch in branches:
        sub = branch_model(current, branch)
        if sub is None:
            skipped.append(f"{branch.label}: the types of the outer values it reads are unknown")
            continue
        sub_ctx = dataclasses.replace(ctx, teacher=None)
        if data_driven:
            try:
                data = branch_calibration(current, branch, sub, ctx.calibration) if ctx.calibration is not None else None
            except ConfigError as exc:  # values read from outside whose samples optc cannot line up
                skipped.append(f"{branch.label}: its calibration data cannot be built ({exc}); its weights are kept")
                continue
            if data is None:
                skipped.append(f"{branch.label}: no calibration sample takes this branch ({branch.condition} is never "
                               f"{str(branch.taken_when).lower()}); its weights are kept")
                continue
            sub_ctx = dataclasses.replace(sub_ctx, calibration=data)
        if Requirement.TEACHER in needs:
            from optc.data.teacher import TeacherOutputs

            sub_ctx = dataclasses.replace(sub_ctx, teacher=TeacherOutputs.capture(sub, sub_ctx.calibration))
        try:
            infer_shapes(sub)
            sub_result = run_with_branches(p, sub, sub_ctx, run)
        except OptcError:
            raise
        except Exception as exc:  # noqa: BLE001 - our bug, on a branch: the rest of the model is still compiled
            # A failure inside a branch (new ground for every pass) keeps that branch as it was and says so,
            # rather than failing a run whose main graph compiled; the message names it as optc's error.
            logger.warning("%s: left %s as it was after an internal error: %s: %s", p.name, branch.label, type(exc).__name__, exc)
            skipped.append(f"{branch.label}: kept as it was after an internal error in {p.name} ({type(exc).__name__}: {exc})")
            continue
        skipped += [f"{branch.label}: {s}" for s in sub_result.skipped]
        if not sub_result.modified:
            continue
        if current is model:  # the manager's contract: an unchanged result is the very model it was given
            current = model.copy()
        renamed = put_back(current, branch, sub_result.model)
        if renamed:
            current.notes.append(f"{p.name}: {len(renamed)} names defined in {branch.label} renamed (already used outside it)")
        modified = True
        _merge(stats, sub_result.stats)
    if not modified:
        return PassResult(model, False, stats, skipped)
    return PassResult(current, True, stats, skipped)


def branch_calibration(model: Model, branch: Branch, sub: Model, calibration: CalibrationSet) -> CalibrationSet | None:
    """``sub``'s inputs (the branch as a model) on the samples that take ``branch``; None when none does."""
    sub_inputs = [n for n in branch.free if n not in model.initializer_names]
    main_inputs = {s.name for s in model.inputs}
    # the condition and the values the body reads that the main graph computes (not its inputs)
    computed = [n for n in dict.fromkeys([branch.condition, *sub_inputs]) if n not in main_inputs]
    session = make_session(model, extra_outputs=computed) if computed else None
    chunks = []
    for feed in calibration.batches(16):
        values = {**feed, **dict(zip(computed, session.run(computed, feed)))} if session else feed
        if bool(np.asarray(values[branch.condition]).reshape(-1)[0]) != branch.taken_when:
            continue
        chunks.append({n: values[n] for n in sub_inputs})
    if not chunks:
        return None
    for spec in sub.inputs:
        if spec.shape is None:  # a value computed outside the branch whose shape inference could not tell
            declare_rank(sub, spec.name, chunks[0][spec.name].ndim)
    mask = calibration.token_mask if calibration.token_mask in sub_inputs else None
    return CalibrationSet.from_chunks(chunks, sub, kind=f"{calibration.kind} ({branch.label})", token_mask=mask)


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    """Per-pass statistics over the whole model: counts added, lists joined, nested tables merged; any other
    value (a ratio, a name) is the first one seen."""
    for key, value in extra.items():
        have = into.get(key)
        if isinstance(value, bool) or have is None:
            into.setdefault(key, value)
        elif type(value) is int and type(have) is int:
            into[key] = have + value
        elif isinstance(value, list) and isinstance(have, list):
            into[key] = have + value
        elif isinstance(value, dict) and isinstance(have, dict):
            merged = dict(have)
            _merge(merged, value)
            into[key] = merged
