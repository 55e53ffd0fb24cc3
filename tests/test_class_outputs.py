"""top1/topk on classifiers whose outputs are not scores first.

scikit-learn's ONNX converters (and models exported with an ArgMax head) put the predicted class, an integer a
sample, before the probabilities. top1 read the first output as scores: one value a sample, so its "best class" was
always 0 and accuracy the share of labels equal to 0 (10.6 % on digits, before and after a pass that took the model
from 97.4 % to 11.2 %): a budget that could not fail, and a ruined model written with exit 0.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from helpers import SAMPLE
from onnx import TensorProto, helper

from optc.cli.main import cli
from optc.errors import ConfigError
from optc.evaluation import load_metric

LABELS = np.array([3, 1, 4, 1, 5])


def _scores(labels: np.ndarray, wrong: int = 0) -> np.ndarray:
    s = np.full((len(labels), 10), 0.01, np.float32)
    s[np.arange(len(labels)), labels] = 0.91
    s[np.arange(wrong), labels[:wrong]] = 0.05  # second best
    s[np.arange(wrong), (labels[:wrong] + 1) % 10] = 0.91
    return s


def test_top1_reads_the_scores_output_after_a_class_index_output():
    top1 = load_metric("top1")
    outputs = {"label": LABELS.astype(np.int64) * 0, "probabilities": _scores(LABELS, wrong=2)}
    assert top1(outputs, LABELS) == pytest.approx(3 / 5)  # the scores, not the (here wrong) label output
    assert load_metric("top5")(outputs, LABELS) == pytest.approx(1.0)


def test_top1_reads_class_indices_when_no_output_holds_scores():
    predicted = LABELS.copy()
    predicted[0] = 9
    assert load_metric("top1")({"label": predicted.astype(np.int64)}, LABELS) == pytest.approx(4 / 5)
    with pytest.raises(ConfigError, match="top5 needs class scores; the model outputs only one class a sample"):
        load_metric("top5")({"label": predicted.astype(np.int64)}, LABELS)


def test_top1_reads_one_probability_a_sample_as_a_binary_decision_and_refuses_other_single_floats():
    labels = np.array([0, 1, 1, 0])
    assert load_metric("top1")({"p": np.array([[0.2], [0.7], [0.4], [0.1]], np.float32)}, labels) == pytest.approx(3 / 4)
    with pytest.raises(ConfigError, match=r"no output holds class scores, class indices or probabilities .* y float32 \[4\]"):
        load_metric("top1")({"y": np.array([-3.0, 2.0, 5.0, 0.5], np.float32)}, labels)


def _with_class_output_first(path) -> None:
    """The sample CNN with an ArgMax head: outputs (label int64 [N], logits [N, 10]), as scikit-learn's converters order them."""
    model = onnx.load(str(SAMPLE / "mnist_cnn.onnx"))
    g = model.graph
    logits = g.output[0].name
    g.node.append(helper.make_node("ArgMax", [logits], ["label"], axis=1, keepdims=0))
    label = helper.make_tensor_value_info("label", TensorProto.INT64, [g.output[0].type.tensor_type.shape.dim[0].dim_param or 1])
    outputs = [label, *g.output]
    del g.output[:]
    g.output.extend(outputs)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.mark.slow
def test_a_budget_on_a_model_with_a_class_output_first_holds_the_real_accuracy(tmp_path):
    """sparsify at 95 % takes the sample CNN to a few points of top-1 above chance; with --max-drop 0.01 the search must
    now scale it back, and the written model keep its accuracy on digits the budget never saw."""
    path = tmp_path / "argmax_first.onnx"
    _with_class_output_first(path)
    test = dict(np.load(SAMPLE / "test.npz"))
    order = np.random.default_rng(3).permutation(len(test["label"]))
    budget, held = order[:500], order[500:]
    np.savez(tmp_path / "budget.npz", input=test["input"][budget], label=test["label"][budget])
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out"), "--pass", "canonicalize",
                                   "--pass", "sparsify:sparsity=0.95", "--calib", str(SAMPLE / "calib.npz"),
                                   "--eval", str(tmp_path / "budget.npz"), "--max-drop", "0.01", "--no-latency"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    acc = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]["accuracy"]
    assert acc["before"] > 0.9, acc  # read from the logits: the sample scores 97-98 %, not the 10 % of labels equal to 0

    def accuracy(model_path) -> float:
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        label = np.concatenate([session.run(["label"], {"input": test["input"][i:i + 1]})[0] for i in held])
        return float(np.mean(label == test["label"][held]))

    before, after = accuracy(path), accuracy(tmp_path / "out" / "model.onnx")
    assert before - after <= 0.02, (before, after)  # one point on the budget's digits, two on the held-out half
