"""sparsify: pattern validity, exact levels, OBS beating magnitude, the pass end to end."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import SAMPLE, make_model, ort_run, rand
from onnx import helper, numpy_helper

from optc.errors import ConfigError
from optc.ir import load_model
from optc.data import CalibrationSet
from optc.passes.framework import PassContext
from optc.passes.framework.options import build_config
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig
from optc.passes.sparsify.patterns import (
    magnitude_prune,
    obs_prune,
    parse_pattern,
    prune_mask,
    reconstruction_error,
)


def correlated_inputs(rows: int, dim: int, seed: int = 0) -> np.ndarray:
    """Inputs with strongly correlated features and uneven scales (where OBS matters)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((dim, dim)) * 0.5 + np.eye(dim)
    return rng.standard_normal((rows, dim)) @ mix * rng.uniform(0.2, 3.0, dim)


# --- patterns -------------------------------------------------------------------------


def test_parse_pattern_forms_and_errors():
    assert str(parse_pattern("2:4")) == "2:4" and parse_pattern("2:4").fixed_sparsity == 0.5
    assert str(parse_pattern("block:4x4")) == "block:4x4"
    assert parse_pattern("Unstructured").kind == "unstructured"
    for bad in ("4:2", "0:4", "block:1x1", "blocks", "2-4"):
        with pytest.raises(ValueError, match="pattern"):
            parse_pattern(bad)


@pytest.mark.parametrize("values,field", [({"sparsity": "1.0"}, "sparsity"), ({"pattern": "3:2"}, "pattern"), ({"damp": "-1"}, "damp"), ({"block_size": "0"}, "block_size")])
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError, match=field):
        build_config("sparsify", SparsifyConfig, values)


@pytest.mark.parametrize("n,m,cols", [(2, 4, 16), (2, 4, 18), (4, 8, 20), (1, 4, 9)])
def test_nm_mask_keeps_at_most_n_per_group(n, m, cols):
    w = rand(6, cols)
    out = magnitude_prune(w, parse_pattern(f"{n}:{m}"), 0)
    for start in range(0, cols, m):
        assert (np.count_nonzero(out[:, start : start + m], axis=1) <= n).all()
    full_groups = cols // m
    assert np.count_nonzero(out[:, : full_groups * m] == 0) == 6 * full_groups * (m - n)
    # The kept entries are the largest of each group.
    group = np.abs(w[:, :m])
    kept = np.abs(out[:, :m]) > 0
    assert (group[kept].reshape(6, n).min(axis=1) >= np.where(kept, -np.inf, group).max(axis=1)).all()


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_level_is_exact(sparsity):
    w = rand(13, 29)
    out = magnitude_prune(w, parse_pattern("unstructured"), int(round(sparsity * w.size)))
    assert np.count_nonzero(out == 0) == int(round(sparsity * w.size))
    assert np.abs(out[out != 0]).min() >= np.abs(w[out == 0]).max()


@pytest.mark.parametrize("shape,pattern", [((16, 32), "block:4x4"), ((10, 14), "block:4x4"), ((8, 12), "block:1x4")])
def test_block_zeros_are_aligned_tiles(shape, pattern):
    p = parse_pattern(pattern)
    tiles = -(-shape[0] // p.rows) * -(-shape[1] // p.cols)
    mask = prune_mask(rand(*shape) ** 2, p, tiles // 2)
    for r in range(0, shape[0], p.rows):
        for c in range(0, shape[1], p.cols):
            tile = mask[r : r + p.rows, c : c + p.cols]
            assert tile.all() or not tile.any()
    pruned_tiles = sum(mask[r, c] for r in range(0, shape[0], p.rows) for c in range(0, shape[1], p.cols))
    assert pruned_tiles == tiles // 2


# --- OBS --------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.7), ("2:4", None), ("4:8", None), ("block:4x4", 0.5)])
def test_obs_beats_magnitude_on_the_layer_objective(pattern, sparsity):
    p = parse_pattern(pattern)
    w = np.random.default_rng(1).standard_normal((32, 64))
    x = correlated_inputs(2000, 64)
    gram = x.T @ x
    tiles = -(-32 // p.rows) * -(-64 // p.cols)
    count = 0 if sparsity is None else int(round(sparsity * tiles))
    mag = magnitude_prune(w, p, count)
    obs = obs_prune(w, gram / len(x), p, count, damp=0.01, block_size=16)
    err_mag, err_obs = reconstruction_error(w, mag, gram), reconstruction_error(w, obs, gram)
    assert err_obs < 0.7 * err_mag, (err_obs, err_mag)
    # Same pattern and level as magnitude pruning.
    assert np.count_nonzero(obs == 0) == np.count_nonzero(mag == 0)
    if p.kind == "nm":
        for start in range(0, 64, p.m):
            assert (np.count_nonzero(obs[:, start : start + p.m], axis=1) <= p.n).all()
    if p.kind == "block":
        tiles_zero = (obs.reshape(8, 4, 16, 4) == 0).all(axis=(1, 3))
        assert np.count_nonzero(tiles_zero) == count
        assert np.count_nonzero(obs == 0) == count * 16


def test_obs_with_no_pruning_returns_the_weights():
    w = rand(4, 8).astype(np.float64)
    x = correlated_inputs(100, 8)
    np.testing.assert_allclose(obs_prune(w, x.T @ x, parse_pattern("unstructured"), 0), w, atol=1e-9)


def test_obs_survives_a_singular_hessian():
    w = rand(4, 8).astype(np.float64)
    x = correlated_inputs(100, 8)
    x[:, 3] = 0  # a dead input column
    out = obs_prune(w, x.T @ x, parse_pattern("unstructured"), 16, damp=0.0)
    assert np.isfinite(out).all() and np.count_nonzero(out == 0) == 16


# --- the pass -----------------------------------------------------------------------------


def _small_cnn(group: int = 1):
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], group=group, name="conv2"),
        helper.make_node("Flatten", ["c2"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "G"], ["y"], transB=1, name="fc"),
    ]
    inits = [("W1", rand(8, 4, 3, 3, seed=1)), ("W2", rand(8, 8 // group, 3, 3, seed=2)), ("G", rand(5, 8 * 6 * 6, seed=3) * 0.1)]
    return make_model(nodes, [("x", ["N", 4, 6, 6])], [("y", ["N", 5])], inits)


def _run(proto, tmp_path, save, **options):
    model = load_model(save(proto))
    x = np.abs(rand(64, 4, 6, 6, seed=7))
    np.savez(tmp_path / "calib.npz", x=x)
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    options.setdefault("storage", "dense")
    config = build_config("sparsify", SparsifyConfig, options)
    return model, Sparsify(config).run(model, PassContext(calibration=calib)), x


@pytest.mark.parametrize("options", [{"sparsity": "0.5"}, {"pattern": "2:4"}, {"pattern": "block:4x4", "sparsity": "0.5"}, {"method": "magnitude", "sparsity": "0.7"}])
def test_pass_writes_valid_sparse_weights(tmp_path, save, options):
    proto = _small_cnn()
    before = proto.SerializeToString()
    model, result, x = _run(proto, tmp_path, save, **options)
    assert result.modified and result.model is not model
    assert model.proto.SerializeToString() == before  # the input model is untouched
    onnx.checker.check_model(result.model.proto)
    stats = result.stats
    assert [layer["node"] for layer in stats["layers"]] == ["conv1", "conv2", "fc"]
    level = 0.5 if "sparsity" not in options else float(options["sparsity"])
    for layer in stats["layers"]:
        assert 0 <= layer["rel_error"] < 1
        if options.get("pattern", "unstructured") in ("unstructured", "2:4"):
            assert layer["sparsity"] == pytest.approx(round(level * layer["params"]) / layer["params"], abs=1e-6)
    assert stats["nonzero_params"] < stats["params_sparsified"]
    assert "size only" in stats["speedup"]
    assert stats["bytes_compressed"] < stats["bytes_compressed_before"]
    # The written weights are what the stats say, and run in onnxruntime.
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    fc = next(n for n in result.model.graph.node if n.name == "fc")
    assert np.count_nonzero(inits[fc.input[1]]) == stats["layers"][2]["nonzero"]
    y_ref = ort_run(proto, {"x": x[:8]})["y"]
    y = ort_run(result.model.proto, {"x": x[:8]})["y"]
    cos = float((y * y_ref).sum() / np.linalg.norm(y) / np.linalg.norm(y_ref))
    assert np.isfinite(y).all()
    if options.get("method", "obs") == "obs":  # declared budget on random weights; magnitude has none
        assert cos > 0.6


def test_obs_pass_has_lower_error_than_magnitude(tmp_path, save):
    _, obs, x = _run(_small_cnn(), tmp_path, save, sparsity="0.6")
    _, mag, _ = _run(_small_cnn(), tmp_path, save, sparsity="0.6", method="magnitude")
    for a, b in zip(obs.stats["layers"], mag.stats["layers"]):
        assert a["rel_error"] < b["rel_error"], (a, b)


def test_grouped_conv_is_pruned_per_group(tmp_path, save):
    _, result, _ = _run(_small_cnn(group=2), tmp_path, save, pattern="2:4")
    onnx.checker.check_model(result.model.proto)
    conv2 = next(layer for layer in result.stats["layers"] if layer["node"] == "conv2")
    assert conv2["sparsity"] == pytest.approx(0.5 * 36 / 36, abs=0.06)  # groups of 4 over 36 columns


def test_nothing_to_do_returns_the_same_model(tmp_path, save):
    model, result, _ = _run(_small_cnn(), tmp_path, save, sparsity="0")
    assert not result.modified and result.model is model
    model, result, _ = _run(_small_cnn(), tmp_path, save, exclude="Conv|Gemm")
    assert not result.modified and result.model is model
    assert "conv1: excluded" in result.skipped


@pytest.mark.slow
def test_sample_cnn_2to4_keeps_accuracy(tmp_path):
    from optc.data import LabelledSet
    from optc.evaluation import accuracy

    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    test = LabelledSet.from_path(SAMPLE / "test.npz", model)
    result = Sparsify(SparsifyConfig(pattern="2:4", measure_bytes=False)).run(model, PassContext(calibration=calib))
    assert accuracy(result.model, test) >= accuracy(model, test) - 0.01
