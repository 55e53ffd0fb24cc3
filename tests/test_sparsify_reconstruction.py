"""sparsify bias correction: the mean output shift of pruning goes into the bias; graph outputs keep their names."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import load_model
from optc.passes import CalibrationSet
from optc.passes.base import PassContext
from optc.passes.options import build_config
from optc.passes.sparsify import Sparsify, SparsifyConfig
from test_sparsify import correlated_inputs


def _shifted_inputs(rows: int, dim: int) -> np.ndarray:
    """Correlated features with large, uneven means (post-LayerNorm transformer inputs look like this)."""
    return (correlated_inputs(rows, dim) + np.linspace(-3, 5, dim)).astype(np.float32)


def _models():
    w1, w2 = rand(32, 48, seed=1), rand(48, 16, seed=2)
    mlp = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
            helper.make_node("Relu", ["hb"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2"),  # no bias, and a graph output
        ],
        [("x", ["N", 32])], [("y", ["N", 16])], [("W1", w1), ("b1", rand(48, seed=3)), ("W2", w2)],
    )
    conv = make_model(
        [
            helper.make_node("Conv", ["x", "K"], ["c"], pads=[1, 1, 1, 1], name="conv"),  # no bias input
            helper.make_node("Flatten", ["c"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "G", "gb"], ["y"], transB=1, name="fc"),
        ],
        [("x", ["N", 4, 5, 5])], [("y", ["N", 6])], [("K", rand(8, 4, 3, 3, seed=4)), ("G", rand(6, 200, seed=5) * 0.1), ("gb", rand(6, seed=6))],
    )
    return {"mlp": (mlp, _shifted_inputs(400, 32)), "conv": (conv, (rand(400, 4, 5, 5, seed=8) + 2.0).astype(np.float32))}


@pytest.mark.parametrize("case", ["mlp", "conv"])
def test_bias_correction_lowers_the_error(tmp_path, save, case):
    proto, x = _models()[case]
    model = load_model(save(proto))
    np.savez(tmp_path / "calib.npz", x=x[:300])
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    run = lambda on: Sparsify(build_config("sparsify", SparsifyConfig, {"sparsity": "0.6", "bias_correction": on, "storage": "dense"})).run(
        model, PassContext(calibration=calib))
    with_bias, without = run("true"), run("false")
    onnx.checker.check_model(with_bias.model.proto)
    assert [o.name for o in with_bias.model.graph.output] == ["y"]
    assert with_bias.stats["nonzero_params"] == without.stats["nonzero_params"]
    for a, b in zip(with_bias.stats["layers"], without.stats["layers"]):
        assert a["rel_error"] < b["rel_error"], (a, b)
    if case == "mlp":  # end to end on held-out rows (the conv case has two layers fitted independently)
        held = x[300:]
        ref = ort_run(proto, {"x": held})["y"]
        err = lambda r: float(np.linalg.norm(ort_run(r.model.proto, {"x": held})["y"] - ref))
        assert err(with_bias) < 0.97 * err(without), (err(with_bias), err(without))
    ops = with_bias.model.op_histogram()
    if case == "mlp":  # mm1's Add constant corrected in place, mm2 gets a new Add
        assert ops["Add"] == 2
    else:  # the Conv gains a bias input, the Gemm's bias is corrected
        assert ops["Add"] == 0 and len(next(n for n in with_bias.model.graph.node if n.op_type == "Conv").input) == 3
