"""Running many pipelines that share prefixes, each shared prefix once.

Passes keep no state between runs and a fixed seed makes them deterministic,
so the model after passes ``p1..pk`` depends only on the input and on those
passes' configurations: it is memoised by their ``repr`` (which names every
option). A search that changes the third pass's strength re-runs from the
third pass; the calibration captures and statistics of the first two are not
recomputed. The teacher's outputs (what ``distill-head`` fits to) are those
of the pipeline's input, captured once.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Sequence

from optc.data.teacher import TeacherOutputs
from optc.ir.model import Model
from optc.passes.framework import Pass, PassContext, PassManager, Requirement


class PrefixRunner:
    """Runs pipelines on one input model, memoising every prefix it has run (LRU, bounded by bytes)."""

    def __init__(self, model: Model, ctx: PassContext, *, max_bytes: int = 1 << 30):
        self.model, self.max_bytes = model, max_bytes
        self.ctx = ctx
        self._cache: OrderedDict[tuple[str, ...], Model] = OrderedDict()
        self.passes_run = 0
        self.passes_reused = 0

    def run(self, passes: Sequence[Pass]) -> Model:
        """The model after ``passes``, reusing the longest prefix already computed."""
        keys = tuple(repr(p) for p in passes)
        start, model = 0, self.model
        for k in range(len(keys), 0, -1):
            hit = self._cache.get(keys[:k])
            if hit is not None:
                self._cache.move_to_end(keys[:k])
                start, model = k, hit
                break
        self.passes_reused += start
        for i in range(start, len(passes)):
            model = PassManager([passes[i]]).run(model, self._context(passes)).model
            self.passes_run += 1
            self._remember(keys[: i + 1], model)
        return model

    def _context(self, passes: Sequence[Pass]) -> PassContext:
        if self.ctx.teacher is None and any(Requirement.TEACHER in p.requirements() for p in passes):
            self.ctx = dataclasses.replace(self.ctx, teacher=TeacherOutputs.capture(self.model, self.ctx.calibration))
        return self.ctx

    def _remember(self, key: tuple[str, ...], model: Model) -> None:
        self._cache[key] = model
        while len(self._cache) > 1 and sum(m.weight_bytes() for m in self._cache.values()) > self.max_bytes:
            self._cache.popitem(last=False)
