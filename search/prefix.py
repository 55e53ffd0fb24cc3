"""Running many pipelines that share prefixes, each shared prefix once.

Passes keep no state between runs and a fixed seed makes them deterministic,
so the model after passes ``p1..pk`` depends only on the input and on those
passes' configurations: it is memoised by their ``repr`` (which names every
option). A search that changes the third pass's strength re-runs from the
third pass; the calibration captures and statistics of the first two are not
recomputed. The teacher's outputs (what ``distill-head`` fits to) are those
of the pipeline's input, captured once.

Each prefix is remembered with what its passes did (their :class:`PassRecord`
and the stats after them), so the pipeline a search chooses comes back as the
:class:`PipelineResult` a plain run would give, and the compile that asked for
the search reports it without running its passes again. A pipeline already run
outside the search on the same input and context (the run the default budget
found too lossy) is handed in with :meth:`PrefixRunner.remember`, so the
search's first point does not run it again.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Sequence

from optc.data.teacher import TeacherOutputs
from optc.ir.model import Model
from optc.ir.stats import ModelStats
from optc.passes.framework import Pass, PassContext, PassManager, PipelineResult, Requirement


class PrefixRunner:
    """Runs pipelines on one input model, memoising every prefix it has run (LRU, bounded by bytes)."""

    def __init__(self, model: Model, ctx: PassContext, *, max_bytes: int = 1 << 30):
        self.model, self.max_bytes = model, max_bytes
        self.ctx = ctx
        self._cache: OrderedDict[tuple[str, ...], PipelineResult] = OrderedDict()
        self._initial: ModelStats | None = None  # the input's stats, as the first pass run on it saw them
        self.passes_run = 0
        self.passes_reused = 0

    def run(self, passes: Sequence[Pass]) -> Model:
        """The model after ``passes``, reusing the longest prefix already computed."""
        return self.run_pipeline(passes).model

    def run_pipeline(self, passes: Sequence[Pass]) -> PipelineResult:
        """What ``PassManager(passes).run`` on the input gives (model, records, stats), reusing the longest prefix computed."""
        keys = tuple(repr(p) for p in passes)
        start, done = 0, None
        for k in range(len(keys), 0, -1):
            hit = self._cache.get(keys[:k])
            if hit is not None:
                self._cache.move_to_end(keys[:k])
                start, done = k, hit
                break
        self.passes_reused += start
        model = done.model if done is not None else self.model
        records = list(done.records) if done is not None else []
        final = done.final if done is not None else None
        for i in range(start, len(passes)):
            step = PassManager([passes[i]]).run(model, self._context(passes))
            if self._initial is None and i == 0:
                self._initial = step.initial
            model, final = step.model, step.final
            records += step.records
            self.passes_run += 1
            self._remember(keys[: i + 1], PipelineResult(model, list(records), self._input_stats(), final))
        return PipelineResult(model, records, self._input_stats(), final if final is not None else self._input_stats())

    def remember(self, passes: Sequence[Pass], result: PipelineResult) -> None:
        """Take ``result`` as what ``passes`` give on this runner's input: the caller ran them with the same
        input model, calibration data and seed (a pass configured the same on the same input gives the same model)."""
        if self._initial is None:
            self._initial = result.initial
        self._remember(tuple(repr(p) for p in passes), result)

    def _input_stats(self) -> ModelStats:
        if self._initial is None:  # no pass has run on the input (an empty pipeline): as the manager measures it
            self._initial = PassManager([]).run(self.model, self.ctx).initial
        return self._initial

    def _context(self, passes: Sequence[Pass]) -> PassContext:
        if self.ctx.teacher is None and any(Requirement.TEACHER in p.requirements() for p in passes):
            self.ctx = dataclasses.replace(self.ctx, teacher=TeacherOutputs.capture(self.model, self.ctx.calibration))
        return self.ctx

    def _remember(self, key: tuple[str, ...], result: PipelineResult) -> None:
        self._cache[key] = result
        while len(self._cache) > 1 and sum(r.model.weight_bytes() for r in self._cache.values()) > self.max_bytes:
            self._cache.popitem(last=False)
