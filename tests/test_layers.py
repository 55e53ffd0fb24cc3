"""The shared linear-layer view: im2col rows reproduce the layer, Grams stream correctly."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes.layers import find_linear_layers, input_grams, input_row_sums, input_rows, matrix_to_weight, weight_matrix


@pytest.mark.parametrize(
    "attrs,cin,group",
    [
        ({"pads": [1, 1, 1, 1]}, 4, 1),
        ({"strides": [2, 2], "pads": [0, 1, 1, 0]}, 4, 1),
        ({"dilations": [2, 2], "pads": [2, 2, 2, 2]}, 4, 1),
        ({"pads": [1, 1, 1, 1], "group": 2}, 4, 2),
        ({"auto_pad": "SAME_UPPER", "strides": [2, 2]}, 4, 1),
        ({"pads": [1, 1, 1, 1], "group": 4}, 4, 4),  # depthwise
    ],
)
def test_conv_rows_reproduce_the_convolution(save, attrs, cin, group):
    w = rand(8, cin // group, 3, 3)
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", **attrs)], [("x", [2, cin, 7, 7])], [("y", ["n", "c", "h", "w"])], [("W", w)])
    model = load_model(save(proto))
    infer_shapes(model)
    (layer,), _ = find_linear_layers(model)
    x = rand(2, cin, 7, 7, seed=1)
    y = ort_run(proto, {"x": x})["y"]
    rows = input_rows(layer, x)  # (g, n*ho*wo, d)
    m = weight_matrix(layer, w).reshape(group, 8 // group, -1)
    out = np.einsum("god,grd->gro", m, rows)  # (g, rows, out_per_group)
    n, _, ho, wo = y.shape
    got = out.reshape(group, n, ho, wo, 8 // group).transpose(1, 0, 4, 2, 3).reshape(y.shape)
    np.testing.assert_allclose(got, y, atol=1e-4)
    np.testing.assert_array_equal(matrix_to_weight(layer, weight_matrix(layer, w)), w)
    # The rows' sum without unfolding them (quantize's input means: DNSMOS's rows took 14.9 GiB).
    sums, count = input_row_sums(layer, x)
    assert count == rows.shape[1]
    np.testing.assert_allclose(sums, rows.astype(np.float64).sum(axis=1), rtol=1e-9, atol=1e-9)


def test_row_sums_of_a_1d_convolution(save):
    proto = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="conv", pads=[2, 1], strides=[2], dilations=[2])],
                       [("x", [3, 4, 20])], [("y", ["n", "c", "l"])], [("W", rand(6, 4, 3))])
    model = load_model(save(proto))
    infer_shapes(model)
    (layer,), _ = find_linear_layers(model)
    x = rand(3, 4, 20, seed=2)
    rows = input_rows(layer, x)
    sums, count = input_row_sums(layer, x)
    assert count == rows.shape[1]
    np.testing.assert_allclose(sums, rows.astype(np.float64).sum(axis=1), rtol=1e-9, atol=1e-9)


def test_gemm_and_matmul_views(save):
    proto = make_model(
        [helper.make_node("Gemm", ["x", "G"], ["h"], transB=1, name="gemm"), helper.make_node("MatMul", ["h", "M"], ["y"], name="mm")],
        [("x", [3, 4])],
        [("y", [3, 2])],
        [("G", rand(5, 4)), ("M", rand(5, 2))],
    )
    model = load_model(save(proto))
    layers, skipped = find_linear_layers(model, exclude=())
    assert [(l.node, l.out_features, l.in_features) for l in layers] == [("gemm", 5, 4), ("mm", 2, 5)]
    assert skipped == []
    assert find_linear_layers(model, exclude=("MatMul",))[1] == ["mm: excluded"]


def test_input_grams_match_a_direct_computation(save, tmp_path):
    proto = make_model([helper.make_node("MatMul", ["x", "M"], ["y"], name="mm")], [("x", ["N", 3])], [("y", ["N", 2])], [("M", rand(3, 2))])
    model = load_model(save(proto))
    x = rand(10, 3, seed=4)
    np.savez(tmp_path / "c.npz", x=x)
    calib = CalibrationSet.from_path(tmp_path / "c.npz", model)
    layers, _ = find_linear_layers(model)
    gram = input_grams(model, calib, layers, batch_size=4)["mm"]
    assert gram.rows == 10
    np.testing.assert_allclose(gram.gram[0], x.astype(np.float64).T @ x, rtol=1e-6)
    np.testing.assert_allclose(gram.mean[0], x.mean(axis=0), rtol=1e-6)


def test_shared_weights_are_left_alone_with_the_reason(tmp_path):
    """basic-pitch's CQT reuses 3 kernels in 30 convs: compressing each node's copy grew the model 142 -> 391 KiB."""
    import onnx
    from helpers import make_model, rand
    from onnx import helper

    from optc import api
    from optc.ir import load_model
    from optc.passes.layers.linear import find_linear_layers

    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="mm1"), helper.make_node("MatMul", ["a", "w"], ["b"], name="mm2"),
             helper.make_node("MatMul", ["b", "own"], ["y"], name="mm3")]
    proto = make_model(nodes, [("x", ["N", 32])], [("y", ["N", 32])], [("w", rand(32, 32, seed=1)), ("own", rand(32, 32, seed=2))])
    path = tmp_path / "shared.onnx"
    onnx.save(proto, path)
    layers, skipped = find_linear_layers(load_model(path))
    assert [layer.node for layer in layers] == ["mm3"]
    assert "mm1: weight 'w' is shared by 2 nodes (compressing it node by node would store 2 copies)" in skipped
    np.savez(tmp_path / "c.npz", x=rand(64, 32, seed=3))
    for spec in ("sparsify:sparsity=0.5", "quantize"):
        result = api.compile(path, api.parse_pass_spec(spec), calibration=tmp_path / "c.npz", measure_latency=False, default_budget=False)
        assert result.report.after.param_bytes <= result.report.before.param_bytes, spec


def test_gram_products_fall_back_to_float64_where_float32_overflows():
    """A model whose weights are one constant (the onnx wheel's Inception-v1) has activations near 1e20: their
    float32 products overflow, and NaN weights followed. The products are redone in float64 there."""
    from optc.passes.layers.grams import _gram

    rows = np.full((1, 8, 3), 1e20, dtype=np.float32)
    g = _gram(rows, rows)
    assert np.isfinite(g).all() and g.dtype == np.float64
    np.testing.assert_allclose(g, np.full((1, 3, 3), 8e40), rtol=1e-6)
    small = np.arange(24, dtype=np.float32).reshape(1, 8, 3)
    np.testing.assert_allclose(_gram(small, small)[0], small[0].T.astype(np.float64) @ small[0])
