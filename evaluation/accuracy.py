"""Top-1 accuracy of a model on labelled data, run in onnxruntime on the CPU."""
from __future__ import annotations

from optc.data.labelled import LabelledSet
from optc.evaluation.metrics import model_outputs
from optc.ir.model import Model


def accuracy(model: Model, data: LabelledSet, batch_size: int = 64) -> float:
    """Top-1 accuracy of the first output against the labels, on every sample (a fixed batch's last feed padded)."""
    n = len(data.labels) if data.labels is not None else 0
    if not n:
        return float("nan")
    first = model.outputs[0].name
    logits = model_outputs(model, data.inputs, batch_size, [first])[first]
    return float((logits.reshape(n, -1).argmax(axis=-1) == data.labels).mean())
