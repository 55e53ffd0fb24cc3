"""The teacher's outputs: what the pipeline's input model computes on the calibration data.

Passes that win back accuracy after others have compressed the model (head
distillation) fit to the *original* model's outputs, not to the model they
receive. Holding the original model through the pipeline would cost one more
copy of the weights; its outputs on the calibration samples are small (a
classifier's logits), so :class:`~optc.passes.framework.manager.PassManager` captures
them once, before the first pass, when a pass declares
``Requirement.TEACHER``, and puts them in ``PassContext.teacher``.

Outputs are kept per batch (as onnxruntime returned them) together with the
batch size used, so a pass reads its own activations in lockstep by iterating
``calibration.batches(teacher.batch_size)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from optc.ir.model import Model
from optc.ir.session import make_session
from optc.data.calibration import CalibrationSet, feed_samples


@dataclass(frozen=True)
class TeacherOutputs:
    """Per calibration batch, the teacher's outputs by name."""

    batch_size: int
    batches: tuple[dict[str, np.ndarray], ...]

    @property
    def num_samples(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches if b)

    @property
    def max_batches(self) -> int:
        return len(self.batches)

    @classmethod
    def capture(cls, teacher: Model, calibration: CalibrationSet, *, batch_size: int = 16,
                max_batches: int | None = None, max_samples: int | None = 4096) -> "TeacherOutputs":
        """Run ``teacher`` on the calibration batches (at most ``max_samples`` samples, whole batches)."""
        session = make_session(teacher)
        names = [o.name for o in session.get_outputs()]
        out: list[dict[str, np.ndarray]] = []
        seen = 0
        for i, feed in enumerate(calibration.batches(batch_size)):
            if (max_batches is not None and i >= max_batches) or (max_samples is not None and seen >= max_samples):
                break
            out.append(dict(zip(names, session.run(names, feed))))
            seen += feed_samples(feed, calibration.inputs)
        return cls(batch_size, tuple(out))

    def with_feeds(self, calibration: CalibrationSet) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
        """``(feed, teacher outputs)`` pairs in the order they were captured."""
        yield from zip(calibration.batches(self.batch_size), self.batches)
