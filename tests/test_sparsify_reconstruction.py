"""sparsify reconstruction options: bias correction (graph outputs keep their names) and sequential stages."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import load_model
from optc.data import CalibrationSet
from optc.passes.framework import PassContext
from optc.passes.framework.options import build_config
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig
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


def _deep_mlp(depth: int = 4, width: int = 32):
    nodes, inits, x = [], [], "x"
    for i in range(depth):
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"], name=f"mm{i}"), helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"], name=f"add{i}")]
        x = f"a{i}"
        if i < depth - 1:
            nodes.append(helper.make_node("Tanh", [x], [f"t{i}"], name=f"tanh{i}"))
            x = f"t{i}"
        inits += [(f"W{i}", (rand(width, width, seed=10 + i) * 1.5 / width**0.5).astype(np.float32)), (f"b{i}", (rand(width, seed=20 + i) * 0.1).astype(np.float32))]
    nodes.append(helper.make_node("Identity", [x], ["y"], name="out"))
    return make_model(nodes, [("x", ["N", width])], [("y", ["N", width])], inits)


def test_stages_correct_upstream_error(tmp_path, save):
    """Each later stage is fitted to the dense model's outputs on the sparser model's inputs: lower end-to-end error."""
    proto = _deep_mlp()
    model = load_model(save(proto))
    x = _shifted_inputs(1200, 32)
    np.savez(tmp_path / "calib.npz", x=x[:800])
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    run = lambda stages: Sparsify(build_config("sparsify", SparsifyConfig, {"sparsity": "0.6", "stages": stages, "storage": "dense"})).run(
        model, PassContext(calibration=calib))
    one, four = run("1"), run("4")
    assert one.stats["stages"] == 1 and four.stats["stages"] == 4
    onnx.checker.check_model(four.model.proto)
    assert four.stats["nonzero_params"] == one.stats["nonzero_params"]
    assert [l["sparsity"] for l in four.stats["layers"]] == [l["sparsity"] for l in one.stats["layers"]]
    held = x[800:]
    ref = ort_run(proto, {"x": held})["y"]
    err = lambda r: float(np.linalg.norm(ort_run(r.model.proto, {"x": held})["y"] - ref) / np.linalg.norm(ref))
    assert err(four) < 0.9 * err(one), (err(four), err(one))  # measured 0.61 vs 0.74


def test_stages_split_by_depth(save):
    from optc.passes.layers import find_linear_layers
    from optc.passes.sparsify.sequential import layer_depths, split_stages

    model = load_model(save(_deep_mlp(depth=5)))
    layers, _ = find_linear_layers(model)
    depths = layer_depths(model, layers)
    assert [depths[l.node] for l in layers] == [0, 1, 2, 3, 4]
    assert [[l.node for l in s] for s in split_stages(depths, layers, 2)] == [["mm0", "mm1", "mm2"], ["mm3", "mm4"]]
    assert len(split_stages(depths, layers, 9)) == 5


@pytest.mark.parametrize("n", [5, 128, 129, 300])
def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse(n):
    """U^T U = (H + damp)^-1 with U upper triangular: the triangular inverse by halves is exact to rounding."""
    from optc.passes.numerics.obs import inverse_hessian_factor, inverse_lower

    x = np.random.default_rng(n).standard_normal((2 * n, n))
    h = x.T @ x / (2 * n)
    u = inverse_hessian_factor(h, 0.01)
    damped = h + 0.01 * np.mean(np.diag(h)) * np.eye(n)
    assert np.array_equal(u, np.triu(u))
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(n), atol=1e-9)
    lower = np.linalg.cholesky(damped)
    np.testing.assert_allclose(inverse_lower(lower), np.linalg.inv(lower), rtol=1e-10, atol=1e-12)
