"""Instruments: diagnostics that hook every pass instead of ad-hoc flags.

* :class:`VerifyEach` (``--verify-each``): onnx's checker after every pass, then
  onnxruntime on sample inputs compared with the previous stage (max abs/rel
  error, cosine). It also enforces the pass contract: the input model is not
  mutated, and a pass that reports no change left the model byte-identical.
* :class:`TimePasses` (``--time-passes``): wall time per pass, logged as it goes
  (the CLI also adds a time column to its table).
* :class:`DumpAfter` (``--dump-after NAME``): the model after the named passes.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import numpy as np

from optc.errors import OptcError, PassError
from optc.ir.io import save_model
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.ir.validate import check_model
from optc.evaluation.fidelity import compare_outputs
from optc.passes.framework.base import Pass, PassContext, PassResult
from optc.passes.framework.manager import Instrument, PassRecord

logger = logging.getLogger(__name__)

EXACT_ATOL = 1e-5
EXACT_RTOL = 1e-5


def within_exact_tolerance(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> bool:
    return all(
        ref.shape == actual[name].shape
        and np.allclose(actual[name].astype(np.float64), ref.astype(np.float64), atol=EXACT_ATOL, rtol=EXACT_RTOL, equal_nan=True)
        for name, ref in reference.items()
    )


class VerifyEach(Instrument):
    """Check every pass against the stage before it, on fixed sample inputs."""

    def __init__(self, feeds: Mapping[str, np.ndarray]):
        self.feeds = dict(feeds)
        self._reference: dict[str, np.ndarray] | None = None
        self._input_hash: str | None = None

    def _outputs(self, model: Model) -> dict[str, np.ndarray]:
        session = make_session(model)
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, self.feeds)))

    def before_pipeline(self, model: Model, ctx: PassContext) -> None:
        self._reference = self._outputs(model)

    def before_pass(self, p: Pass, model: Model, ctx: PassContext) -> None:
        self._input_hash = model.fingerprint()

    def after_pass(self, p: Pass, before: Model, result: PassResult, record: PassRecord, ctx: PassContext) -> None:
        if before.fingerprint() != self._input_hash:
            raise PassError("mutated its input model in place (passes must return a new model)", pass_name=p.name)
        if not result.modified:
            if result.model.fingerprint() != self._input_hash:
                raise PassError("reported no change but the model changed", pass_name=p.name)
            record.drift = {"checked": True, "outputs": {}, "unchanged": True}
            return
        try:
            check_model(result.model)
        except OptcError as exc:
            raise PassError(f"produced an invalid model: {exc}", pass_name=p.name) from exc
        assert self._reference is not None
        actual = self._outputs(result.model)
        metrics = compare_outputs(self._reference, actual)
        exact_ok = within_exact_tolerance(self._reference, actual)
        record.drift = {"checked": True, "outputs": metrics, "within_exact_tolerance": exact_ok}
        if p.exact and not exact_ok:
            worst = max(m["max_abs"] for m in metrics.values())
            raise PassError(f"is declared exact but changed the outputs (max abs error {worst:.3g})", pass_name=p.name)
        self._reference = actual


class TimePasses(Instrument):
    """Log each pass's wall time as the pipeline runs (the records keep it too)."""

    def after_pass(self, p: Pass, before: Model, result: PassResult, record: PassRecord, ctx: PassContext) -> None:
        logger.info("time: %-22s %8.3f s  %s", p.name, record.seconds, "modified" if result.modified else "no change")


class DumpAfter(Instrument):
    """Save the model after the named passes (``all`` for every pass) into ``folder``."""

    def __init__(self, names: set[str], folder: Path):
        self.names = names
        self.folder = folder
        self._index = 0

    def after_pass(self, p: Pass, before: Model, result: PassResult, record: PassRecord, ctx: PassContext) -> None:
        self._index += 1
        if p.name in self.names or "all" in self.names:
            path = self.folder / f"{self._index:02d}-{p.name}.onnx"
            save_model(result.model, path)
            logger.info("dumped %s", path)
