"""Top-1 accuracy of a model on labelled data, run in onnxruntime on the CPU."""
from __future__ import annotations

from optc.data.labelled import LabelledSet
from optc.errors import ConfigError
from optc.evaluation.metrics import model_outputs, topk
from optc.ir.model import Model


def accuracy(model: Model, data: LabelledSet, batch_size: int = 64) -> float | None:
    """Top-1 accuracy against the labels, on every sample (a fixed batch's last feed padded), read as the ``top1`` metric
    reads it (the first output of class scores, else of class indices: :func:`~optc.evaluation.metrics.topk_hits`);
    None where no output holds either."""
    n = len(data.labels) if data.labels is not None else 0
    if not n:
        return float("nan")
    try:
        return topk(1)(model_outputs(model, data.inputs, batch_size), data.labels)
    except ConfigError:
        return None
