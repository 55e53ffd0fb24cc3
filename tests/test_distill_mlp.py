"""distill's narrower-MLP student: the pattern (Relu, GELU as Erf, Gemm/MatMul, with and
without a second bias), exact students when units are dead or constant, the
prefix-error curve against direct refits, budgets and refusals."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, ops, ort_run, rand
from onnx import helper
from test_distill import run_distill

from optc.passes.numerics.unit_selection import select_units
from optc.passes.layers import InputGram
from optc.passes.numerics.refit import refit_columns


def _weights(d_in, h, d_out, live, seed=0):
    """An MLP whose units beyond ``live`` are dead (never positive) or constant (zero weights, positive bias)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((d_in, h)).astype(np.float32)
    b1 = rng.standard_normal(h).astype(np.float32)
    w1[:, live:] = 0.0
    b1[live::2] = -1.0  # dead after Relu
    b1[live + 1 :: 2] = 0.7  # constant 0.7: its contribution belongs in the bias
    w2 = rng.standard_normal((h, d_out)).astype(np.float32)
    return w1, b1, w2


def _relu_mlp(w1, b1, w2, b2=None, gemm=False):
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["z"], name="fc1"),
        helper.make_node("Add", ["z", "b1"], ["zb"], name="fc1_bias"),
        helper.make_node("Relu", ["zb"], ["a"], name="relu"),
    ]
    inits = [("W1", w1), ("b1", b1)]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["a", "W2t", "b2"], ["y"], transB=1, alpha=0.5, beta=2.0, name="fc2"))
        inits += [("W2t", np.ascontiguousarray(w2.T)), ("b2", b2)]
    elif b2 is not None:
        nodes += [helper.make_node("MatMul", ["a", "W2"], ["p"], name="fc2"), helper.make_node("Add", ["p", "b2"], ["y"], name="fc2_bias")]
        inits += [("W2", w2), ("b2", b2)]
    else:
        nodes.append(helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2"))
        inits.append(("W2", w2))
    return make_model(nodes, [("x", ["N", w1.shape[0]])], [("y", ["N", w2.shape[1]])], inits)


@pytest.mark.parametrize("variant", ["bias_add", "no_bias", "gemm"])
def test_dead_and_constant_units_are_removed_exactly(save, variant):
    w1, b1, w2 = _weights(12, 32, 8, live=10, seed=1)
    b2 = rand(8, seed=2)
    proto = _relu_mlp(w1, b1, w2, b2=None if variant == "no_bias" else b2, gemm=variant == "gemm")
    x = rand(256, 12, seed=3)
    _, result = run_distill(proto, save, {"x": x}, budget=1e-7, students=("mlp",))
    assert result.modified
    (layer,) = result.stats["layers"]
    assert layer["student"] == "mlp" and layer["hidden"] <= 10 and layer["hidden_teacher"] == 32
    assert layer["params_student"] == layer["hidden"] * (12 + 8)
    expected = {"bias_add": ["MatMul", "Add", "Relu", "MatMul", "Add"], "no_bias": ["MatMul", "Add", "Relu", "MatMul", "Add"],
                "gemm": ["MatMul", "Add", "Relu", "Gemm"]}[variant]
    assert ops(result.model) == expected
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert [12, layer["hidden"]] in shapes.values()
    xt = rand(20, 12, seed=4)
    np.testing.assert_allclose(ort_run(result.model.proto, {"x": xt})["y"], ort_run(proto, {"x": xt})["y"], atol=2e-4, rtol=1e-4)


def _gelu_mlp(w1, b1, w2, b2):
    """GELU as torch exports it: x * 0.5 * (1 + erf(x / sqrt 2)), scalar constants."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["z"], name="dense"),
        helper.make_node("Add", ["b1", "z"], ["zb"], name="dense_bias"),
        helper.make_node("Div", ["zb", "sqrt2"], ["q"], name="div"),
        helper.make_node("Erf", ["q"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["e1"], name="add1"),
        helper.make_node("Mul", ["zb", "e1"], ["m"], name="mul"),
        helper.make_node("Mul", ["m", "half"], ["a"], name="mul_half"),
        helper.make_node("MatMul", ["a", "W2"], ["p"], name="dense_1"),
        helper.make_node("Add", ["b2", "p"], ["y"], name="dense_1_bias"),
    ]
    inits = [("W1", w1), ("b1", b1), ("sqrt2", np.float32(np.sqrt(2))), ("one", np.float32(1)), ("half", np.float32(0.5)),
             ("W2", w2), ("b2", b2)]
    return make_model(nodes, [("x", ["B", "S", w1.shape[0]])], [("y", ["B", "S", w2.shape[1]])], inits)


def test_gelu_block_within_budget_and_measured(save):
    rng = np.random.default_rng(5)
    # Hidden units with decaying output weights: a few carry most of the output.
    w1, b1 = rand(16, 48, seed=6), rand(48, seed=7)
    w2 = (rng.standard_normal((48, 16)) * np.logspace(0, -2, 48)[:, None]).astype(np.float32)
    proto = _gelu_mlp(w1, b1, w2, rand(16, seed=8))
    x = rand(64, 5, 16, seed=9)
    _, result = run_distill(proto, save, {"x": x}, budget=0.01, students=("mlp",))
    (layer,) = result.stats["layers"]
    assert layer["node"] == "dense_1" and layer["first"] == "dense"
    assert layer["rel_error"] <= 0.01 and layer["hidden"] < 48 * 0.9
    assert layer["rel_error"] < layer["rel_error_without_refit"]
    assert ops(result.model) == ["MatMul", "Add", "Div", "Erf", "Add", "Mul", "Mul", "MatMul", "Add"]
    y, b2 = ort_run(proto, {"x": x})["y"].astype(np.float64), rand(16, seed=8)
    ys = ort_run(result.model.proto, {"x": x})["y"].astype(np.float64)
    measured = ((y - ys) ** 2).sum() / ((y - b2) ** 2).sum()  # the block output is W a (before the bias)
    assert measured == pytest.approx(layer["rel_error"], rel=2e-2, abs=1e-6)


@pytest.mark.parametrize("select", ["greedy", "magnitude"])
def test_prefix_curve_equals_direct_refits(select):
    rng = np.random.default_rng(10)
    a = np.maximum(rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40)) * 0.3 + 0.2, 0.0)
    w = rng.standard_normal((12, 40))
    gram = InputGram((a.T @ a)[None], a.sum(0)[None], len(a))
    order, curve = select_units(gram, w, 36, select=select)
    assert sorted(order.tolist()) == sorted(set(order.tolist())) and len(order) == 36
    for k in (1, 5, 20, 36):
        direct = refit_columns(gram, w, np.sort(order[:k])).rel_error
        assert direct == pytest.approx(curve[k], rel=1e-4, abs=1e-10)  # float64 round-off of two formulas


def test_greedy_order_of_a_width_is_the_prefix_of_a_wider_one(monkeypatch):
    """unit_order remembers the longest order it computed and cuts it: what it cuts is what a
    fresh forward selection of that width picks (blocks of 2 units, so last steps are cut short)."""
    import optc.passes.numerics.unit_selection as us

    rng = np.random.default_rng(12)
    a = np.maximum(rng.standard_normal((600, 30)) @ rng.standard_normal((30, 30)), 0.0)
    w = rng.standard_normal((6, 30))
    gram = InputGram((a.T @ a)[None], a.sum(0)[None], len(a))
    monkeypatch.setattr(us, "_ORDERS", us.OrderedDict())
    fresh = {k: us.unit_order(gram, w, k, block=2) for k in (25, 7, 14)}  # 7 and 14 cut from 25's
    assert len(us._ORDERS) == 1
    for k, order in fresh.items():
        monkeypatch.setattr(us, "_ORDERS", us.OrderedDict())
        assert np.array_equal(order, us.unit_order(gram, w, k, block=2))
        assert np.array_equal(order, select_units(gram, w, k, block=2)[0])


def test_greedy_selection_needs_fewer_units_than_magnitude():
    rng = np.random.default_rng(11)
    # Correlated hidden units: magnitude keeps redundant copies, greedy does not.
    base = np.maximum(rng.standard_normal((800, 10)), 0)
    a = np.concatenate([base, base[:, :10] * 1.01 + 0.01 * rng.standard_normal((800, 10)), 0.1 * rng.standard_normal((800, 20))], axis=1)
    w = rng.standard_normal((8, 40))
    gram = InputGram((a.T @ a)[None], a.sum(0)[None], len(a))
    _, greedy = select_units(gram, w, 39, select="greedy")
    _, magnitude = select_units(gram, w, 39, select="magnitude")
    assert np.argmax(greedy <= 0.05) < np.argmax(magnitude <= 0.05)


def test_refusals_are_explained(save):
    w1, b1, w2 = _weights(12, 32, 8, live=10)
    proto = _relu_mlp(w1, b1, w2)
    # The activation is also a graph output: narrowing it would change the interface.
    proto.graph.output.append(helper.make_tensor_value_info("a", 1, ["N", 32]))
    model, result = run_distill(proto, save, {"x": rand(64, 12)}, budget=1e-7, students=("mlp",))
    assert not result.modified and result.model is model
    assert "fc2: mlp: hidden tensor a is read outside the block" in result.skipped
    # A softmax between the layers mixes units.
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["z"], name="fc1"), helper.make_node("Softmax", ["z"], ["a"], name="sm"),
             helper.make_node("MatMul", ["a", "W2"], ["y"], name="fc2")]
    proto = make_model(nodes, [("x", ["N", 12])], [("y", ["N", 8])], [("W1", w1), ("W2", w2)])
    _, result = run_distill(proto, save, {"x": rand(64, 12)}, budget=1e-7, students=("mlp",))
    assert not result.modified


def test_budget_that_cannot_be_met_replaces_nothing(save):
    proto = _relu_mlp(rand(12, 32, seed=1), rand(32, seed=2), rand(32, 8, seed=3), b2=rand(8, seed=4))
    model, result = run_distill(proto, save, {"x": rand(128, 12, seed=5)}, budget=1e-6, students=("mlp",))
    assert not result.modified and result.model is model
    assert any(s.startswith("fc2: mlp: width") and "does not reduce params" in s for s in result.skipped)


def test_chained_blocks_share_their_middle_layer(save):
    """A 3-layer MLP (scikit-learn's MLPClassifier exports one) is two blocks sharing fc2: the first refits fc2, the
    second keeps some of fc2's units. fc2's refit must reproduce the teacher's rows of the kept units: against every
    row, the shapes disagreed and the pass crashed (exit 1 on scikit-learn's digits MLP)."""
    rng = np.random.default_rng(11)
    w1, b1, w2 = _weights(12, 32, 24, live=10, seed=12)
    b2 = rng.standard_normal(24).astype(np.float32)
    w2[:, 8:] = 0.0  # fc2's units beyond 8: dead or constant, as fc1's beyond 10
    b2[8::2], b2[9::2] = -1.0, 0.7
    w3, b3 = rand(24, 6, seed=13), rand(6, seed=14)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["z1"], name="fc1"), helper.make_node("Add", ["z1", "b1"], ["y1"], name="fc1_bias"),
             helper.make_node("Relu", ["y1"], ["a1"], name="relu1"),
             helper.make_node("MatMul", ["a1", "W2"], ["z2"], name="fc2"), helper.make_node("Add", ["z2", "b2"], ["y2"], name="fc2_bias"),
             helper.make_node("Relu", ["y2"], ["a2"], name="relu2"),
             helper.make_node("MatMul", ["a2", "W3"], ["z3"], name="fc3"), helper.make_node("Add", ["z3", "b3"], ["y"], name="fc3_bias")]
    proto = make_model(nodes, [("x", ["N", 12])], [("y", ["N", 6])], [("W1", w1), ("b1", b1), ("W2", w2), ("b2", b2), ("W3", w3), ("b3", b3)])
    _, result = run_distill(proto, save, {"x": rand(256, 12, seed=15)}, budget=1e-7, students=("mlp",))
    layers = {layer["node"]: layer for layer in result.stats["layers"]}
    assert set(layers) == {"fc2", "fc3"} and layers["fc2"]["hidden"] <= 10 and layers["fc3"]["hidden"] <= 8, layers
    shapes = sorted(list(t.dims) for t in result.model.graph.initializer if len(t.dims) == 2)
    assert shapes == sorted([[12, layers["fc2"]["hidden"]], [layers["fc2"]["hidden"], layers["fc3"]["hidden"]], [layers["fc3"]["hidden"], 6]])
    xt = rand(40, 12, seed=16)
    np.testing.assert_allclose(ort_run(result.model.proto, {"x": xt})["y"], ort_run(proto, {"x": xt})["y"], atol=2e-4, rtol=1e-4)
