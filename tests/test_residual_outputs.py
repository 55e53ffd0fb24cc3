"""An output that is an input plus a change (a watermark encoder's marked frame, a denoiser's cleaned signal) is
judged by the change: its whole cosine is the input's. invisible-watermark's RivaGAN encoder, which adds 2.5 % to a
frame, read cosine 1.0000 under quantize while the mark it adds moved to 0.976."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.cli.main import cli
from optc.evaluation.fidelity import Changes, residual_bases, sample_cosines


def test_which_outputs_are_an_input_plus_a_change():
    rng = np.random.default_rng(0)
    frame = rng.normal(0, 1, (8, 3, 16, 16))
    inputs = {"frame": frame, "bits": rng.integers(0, 2, (8, 32)).astype(np.float32)}
    outputs = {
        "marked": frame + 0.03 * rng.normal(0, 1, frame.shape),  # a watermark
        "same": frame.copy(),  # passed through: no change to judge
        "features": rng.normal(0, 1, frame.shape),  # the input's shape, not the input
        "halved": frame * 0.4,  # a change of 60 % of the output's size: a different signal, judged whole
        "score": rng.normal(0, 1, (8, 32)),
    }
    assert residual_bases(inputs, outputs) == {"marked": "frame"}
    found = Changes.find(inputs, outputs)
    assert dict(found.bases) == {"marked": "frame"} and list(found.given) == ["frame"]
    judged = found.view(outputs)
    np.testing.assert_allclose(judged["marked"], outputs["marked"] - frame)
    assert judged["features"] is outputs["features"]


def _marker(path):
    """y = x + 0.02 * tanh(conv(relu(conv(x)))): a residual model whose change a lossy pass can move a lot
    while the whole output stays at cosine ~1."""
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["h"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["c"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
        helper.make_node("Mul", ["t", "strength"], ["m"], name="scale"),
        helper.make_node("Add", ["x", "m"], ["y"], name="mark"),
    ]
    inits = [("W1", rand(32, 3, 3, 3, seed=1) * 0.3), ("B1", rand(32, seed=2) * 0.1), ("W2", rand(3, 32, 3, 3, seed=3) * 0.1),
             ("strength", np.array(0.02, np.float32))]
    proto = make_model(nodes, [("x", ["N", 3, 12, 12])], [("y", ["N", 3, 12, 12])], inits)
    onnx.save_model(proto, str(path))
    return proto


@pytest.mark.slow
def test_the_default_budget_holds_what_a_residual_model_adds(tmp_path):
    proto = _marker(tmp_path / "marker.onnx")
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "calib.npz", x=rng.uniform(-1, 1, (64, 3, 12, 12)).astype(np.float32))
    check = rng.uniform(-1, 1, (256, 3, 12, 12)).astype(np.float32)  # held out: no pass or budget saw it
    reference = ort_run(proto, {"x": check})["y"]

    def compile_(name, *args):
        out = tmp_path / name
        res = CliRunner().invoke(cli, ["compile", str(tmp_path / "marker.onnx"), "-o", str(out), "--pass", "sparsify:method=magnitude",
                                       "--calib", str(tmp_path / "calib.npz"), "--no-latency", *args], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        got = ort_run(onnx.load(str(out / "model.onnx")), {"x": check})["y"]
        whole = float(sample_cosines(reference, got).mean())
        change = float(sample_cosines(reference - check, got - check).mean())
        return json.loads((out / "report.json").read_text()), " ".join(res.output.split()), whole, change

    # As asked, the default sparsity keeps the whole output at cosine ~1 and moves the mark far.
    _, _, whole, change = compile_("asked", "--no-default-budget")
    assert whole > 0.999 and change < 0.98, (whole, change)
    report, output, whole, change = compile_("default")
    assert "judging y by what it adds to x" in output and "misses the default budget" in output
    assert change >= 0.985, change
    fidelity = report["evaluation"]["fidelity"]["y"]
    assert fidelity["change_of"] == "x" and fidelity["change_cosine"] < fidelity["cosine"]
    assert "(of what y adds to x)" in output
