"""Top-1 accuracy of a model on labelled data, run in onnxruntime on the CPU."""
from __future__ import annotations

from optc.data.calibration import feed_samples
from optc.data.labelled import LabelledSet
from optc.ir.model import Model
from optc.ir.session import make_session


def accuracy(model: Model, data: LabelledSet, batch_size: int = 64) -> float:
    """Top-1 accuracy of the first output against the labels."""
    session = make_session(model)
    first = session.get_outputs()[0].name
    correct = seen = 0
    for feed, n in data.inputs.padded_batches(batch_size):  # every sample, a fixed batch's last feed padded
        logits = session.run([first], feed)[0]
        logits = logits[:n] if n < feed_samples(feed, data.inputs.inputs) and len(logits) > n else logits
        correct += int((logits.reshape(n, -1).argmax(axis=-1) == data.labels[seen : seen + n]).sum())
        seen += n
    return correct / seen if seen else float("nan")
