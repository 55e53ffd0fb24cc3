"""distill: the low-rank fit (exact on rank-r weights, whitening beats plain SVD on
the data objective, closed-form errors), the rewrites vs onnxruntime, budgets,
checker validity and the honest ``modified``."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import SAMPLE, make_model, ops, ort_run, rand, run_checked
from onnx import helper

from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, make_pass
from optc.passes.numerics.lowrank import data_error, fit_low_rank


LOW_RANK = ("matmul", "gemm", "conv")


def _low_rank(out, inp, r, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((out, r)) @ rng.standard_normal((r, inp))


def _correlated(rows, d, seed=0):
    """Rows with a strongly anisotropic covariance (like real activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.logspace(0, -2, d)[None, :]
    return rng.standard_normal((rows, d)) @ mix.T + 0.5 * rng.standard_normal(d)


# --- numerical kernel ---------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])  # both sides of the eigen-decomposition
@pytest.mark.parametrize("method", ["whitened", "asvd", "plain"])
def test_true_rank_weight_is_reproduced(method, shape):
    m = _low_rank(*shape, 3)
    x = _correlated(200, shape[1])
    h = x.T @ x / len(x)
    spec = fit_low_rank(m, h, method=method)
    assert spec.smallest_rank(1e-9) == 3
    left, right = spec.factors(3)
    np.testing.assert_allclose(left @ right, m, atol=1e-8)


@pytest.mark.parametrize("shape", [(10, 16), (16, 10)])
@pytest.mark.parametrize("method", ["whitened", "asvd", "plain"])
def test_closed_form_error_matches_direct(method, shape):
    m = np.random.default_rng(1).standard_normal(shape)
    x = _correlated(300, shape[1], seed=2)
    h = x.T @ x / len(x)
    spec = fit_low_rank(m, h, method=method, damp=0.01)
    for r in (1, 4, 9, 10):
        left, right = spec.factors(r)
        direct = data_error(m, left @ right, h) / data_error(m, 0 * m, h)
        assert spec.relative_error(r) == pytest.approx(direct, rel=1e-6, abs=1e-12)


def test_whitening_beats_plain_svd_on_the_data():
    m = np.random.default_rng(3).standard_normal((24, 32))
    x = _correlated(500, 32, seed=4)
    h = x.T @ x / len(x)
    white, plain = fit_low_rank(m, h, method="whitened", damp=1e-6), fit_low_rank(m, h, method="plain")
    for r in range(1, 24):
        assert white.relative_error(r) <= plain.relative_error(r) + 1e-12
    assert white.relative_error(8) < 0.5 * plain.relative_error(8)
    wide = fit_low_rank(m.T[:, :20], h[:20, :20], method="whitened", damp=1e-6)  # out > in
    plain_wide = fit_low_rank(m.T[:, :20], h[:20, :20], method="plain")
    assert all(wide.relative_error(r) <= plain_wide.relative_error(r) + 1e-12 for r in range(1, 20))


# --- the pass -------------------------------------------------------------------------


def run_distill(proto, save, calib: dict, **options):
    path = save(proto)
    model = load_model(path)
    infer_shapes(model)
    np.savez(path.with_name("calib.npz"), **calib)
    calibration = CalibrationSet.from_path(path.with_name("calib.npz"), model)
    return model, run_checked("distill", model, PassContext(calibration=calibration), **options)


def _mlp(w1, w2, bias):
    return make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
            helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
            helper.make_node("Relu", ["hb"], ["a"], name="relu"),
            helper.make_node("Gemm", ["a", "W2"], ["y"], transB=1, alpha=0.5, name="gemm"),
        ],
        [("x", ["N", w1.shape[0]])],
        [("y", ["N", w2.shape[0]])],
        [("W1", w1), ("b", bias), ("W2", w2)],
    )


def test_true_rank_layers_are_replaced_exactly(save):
    w1 = _low_rank(32, 24, 4, seed=5).astype(np.float32)  # (in, out)
    w2 = _low_rank(16, 24, 3, seed=6).astype(np.float32)  # transB: (out, in)
    proto = _mlp(w1, w2, rand(24, seed=7))
    x = _correlated(64, 32, seed=8).astype(np.float32)
    _, result = run_distill(proto, save, {"x": x}, budget=1e-8, students=LOW_RANK)
    assert result.modified
    assert ops(result.model) == ["MatMul", "MatMul", "Add", "Relu", "MatMul", "Gemm"]
    ranks = {l["node"]: l["rank"] for l in result.stats["layers"]}
    assert ranks == {"mm1": 4, "gemm": 3}
    assert result.stats["params_removed"] == (32 * 24 - 4 * 56) + (24 * 16 - 3 * 40)
    xt = _correlated(10, 32, seed=9).astype(np.float32)
    ref, got = ort_run(proto, {"x": xt})["y"], ort_run(result.model.proto, {"x": xt})["y"]
    np.testing.assert_allclose(got, ref, atol=1e-3, rtol=1e-4)
    assert result.stats["global"]["mean_cosine"] > 1 - 1e-9


def test_budget_that_cannot_be_met_replaces_nothing(save):
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((32, 24)).astype(np.float32), rng.standard_normal((16, 24)).astype(np.float32)
    proto = _mlp(w1, w2, rand(24, seed=1))
    x = rng.standard_normal((64, 32)).astype(np.float32)
    model, result = run_distill(proto, save, {"x": x}, budget=1e-4, min_reduction=0.2, students=LOW_RANK)
    assert not result.modified and result.model is model
    assert any(s.startswith("mm1: rank") and "does not reduce params" in s for s in result.skipped)
    assert any(s.startswith("gemm: rank") for s in result.skipped)


def test_sequential_refit_corrects_upstream_error(save):
    """The second student refit on the first student's output (not the teacher's) lowers the model's error."""
    w1, w2 = rand(32, 24, seed=11), rand(16, 24, seed=12)
    proto = _mlp(w1, w2, rand(24, seed=13))
    x = _correlated(512, 32, seed=14).astype(np.float32)
    options = {"budget": 0.05, "students": LOW_RANK, "min_reduction": 0.05}
    _, plain = run_distill(proto, save, {"x": x}, reconstruct="none", **options)
    _, seq = run_distill(proto, save, {"x": x}, **options)
    assert [l["rank"] for l in seq.stats["layers"]] == [l["rank"] for l in plain.stats["layers"]]
    assert seq.stats["reconstruct"] == "sequential" and plain.stats["reconstruct"] == "none"
    # The first student is refit on the teacher's own input: only its bias (the mean of the dropped directions)
    # can improve. The second's error is against the teacher's output, upstream error included.
    first = next(layer for layer in seq.stats["layers"] if layer["node"] == "mm1")
    assert first["rel_error"] <= first["rel_error_fit"] + 1e-9
    assert seq.stats["global"]["rel_mse"] < 0.95 * plain.stats["global"]["rel_mse"]
    y = ort_run(proto, {"x": x})["y"].astype(np.float64)
    measured = lambda m: ((ort_run(m.proto, {"x": x})["y"] - y) ** 2).sum() / (y**2).sum()
    assert measured(seq.model) == pytest.approx(seq.stats["global"]["rel_mse"], rel=1e-3)


@pytest.mark.parametrize("fit, budget", [("whitened", 0.02), ("asvd", 0.3), ("plain", 0.3)])  # whitening sees the correlations
def test_budget_respected_and_measured(save, fit, budget):
    w1 = rand(32, 24, seed=2)
    proto = make_model([helper.make_node("MatMul", ["x", "W1"], ["y"], name="mm1")], [("x", ["N", 32])], [("y", ["N", 24])], [("W1", w1)])
    x = _correlated(256, 32, seed=3).astype(np.float32)
    _, result = run_distill(proto, save, {"x": x}, budget=budget, fit=fit)
    assert result.stats["fit"] == fit
    (layer,) = result.stats["layers"]
    assert layer["rel_error"] <= budget and layer["rank"] < 24 * 32 / 56
    y, yr = ort_run(proto, {"x": x})["y"].astype(np.float64), ort_run(result.model.proto, {"x": x})["y"].astype(np.float64)
    measured = ((y - yr) ** 2).sum() / (y**2).sum()
    assert measured == pytest.approx(layer["rel_error"], rel=1e-3, abs=1e-6)


def test_conv_student_matches_onnxruntime(save):
    rng = np.random.default_rng(4)
    # A conv whose im2col weight has rank 5: the student is exact.
    w = _low_rank(16, 8 * 9, 5, seed=4).reshape(16, 8, 3, 3).astype(np.float32)
    proto = make_model(
        [helper.make_node("Conv", ["x", "W", "B"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv")],
        [("x", ["N", 8, 9, 9])],
        [("y", ["N", 16, 5, 5])],
        [("W", w), ("B", rand(16, seed=5))],
    )
    x = rng.standard_normal((12, 8, 9, 9)).astype(np.float32)
    _, result = run_distill(proto, save, {"x": x}, budget=1e-8)
    assert ops(result.model) == ["Conv", "Conv"]
    shapes = {t.name: list(t.dims) for t in result.model.graph.initializer}
    assert sorted(shapes.values()) == [[5, 8, 3, 3], [16], [16, 5, 1, 1]]
    np.testing.assert_allclose(ort_run(result.model.proto, {"x": x[:3]})["y"], ort_run(proto, {"x": x[:3]})["y"], atol=1e-3)


def test_refusals_are_explained(save):
    proto = make_model(
        [
            helper.make_node("Conv", ["x", "Wd"], ["d"], group=4, pads=[1, 1, 1, 1], name="dw"),
            helper.make_node("Conv", ["d", "Wp"], ["y"], name="tiny"),
        ],
        [("x", ["N", 4, 6, 6])],
        [("y", ["N", 1, 6, 6])],
        [("Wd", rand(4, 1, 3, 3)), ("Wp", rand(1, 4, 1, 1))],
    )
    _, result = run_distill(proto, save, {"x": rand(4, 4, 6, 6)}, exclude=("nothing",))
    assert not result.modified
    assert "dw: grouped convolution (group=4)" in result.skipped
    assert any(s.startswith("tiny: too small") for s in result.skipped)


def test_target_reduction_and_global_backoff(save):
    rng = np.random.default_rng(6)
    w1, w2 = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((16, 32)).astype(np.float32)
    proto = _mlp(w1, w2, rand(32, seed=1))
    x = _correlated(128, 32, seed=7).astype(np.float32)
    _, result = run_distill(proto, save, {"x": x}, target_reduction=0.3, students=LOW_RANK)
    assert result.modified
    removed = result.stats["params_removed"] / result.stats["candidate_params"]
    assert removed >= 0.3
    # A global budget tighter than what the layers give backs them off, and says so.
    _, strict = run_distill(proto, save, {"x": x}, target_reduction=0.3, global_budget=1e-9, max_backoff=3, students=LOW_RANK)
    assert not strict.modified
    assert any("backed off" in s for s in strict.skipped)


@pytest.mark.slow
def test_sample_cnn_compiles_within_budget(save, tmp_path):
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    options = {"budget": 0.02, "min_reduction": 0.05, "min_cosine": 0.995}
    # One-shot students: 2 % per layer compounds past the global budget, and layers are backed off.
    plain = make_pass("distill", {**options, "reconstruct": "none"}).run(model, PassContext(calibration=calib))
    assert plain.modified and any("backed off" in s for s in plain.skipped)
    # Refit in sequence, each student corrects the error upstream: no back-off, more removed.
    result = make_pass("distill", options).run(model, PassContext(calibration=calib))
    assert result.modified
    onnx.checker.check_model(result.model.proto, full_check=True)
    assert result.stats["global"]["mean_cosine"] >= 0.995
    assert not any("backed off" in s for s in result.skipped)
    assert result.stats["macs_removed"] > plain.stats["macs_removed"] > 0
    assert all("rel_error_fit" in layer for layer in result.stats["layers"])


def test_runs_at_several_budgets_fit_the_students_once(save, monkeypatch):
    """The default budget's search runs distill at several budgets on one input model, on a set opened
    again: the students and the teacher's outputs are computed once, and every run gives what a
    run with nothing remembered gives (the same model, byte for byte)."""
    import optc.passes.distill.distill as distill
    from optc.data.teacher import TeacherOutputs
    from optc.passes.framework.analyses import AnalysisCache

    rng = np.random.default_rng(8)
    w1, w2 = rng.standard_normal((32, 32)).astype(np.float32), rng.standard_normal((16, 32)).astype(np.float32)
    path = save(_mlp(w1, w2, rand(32, seed=2)))
    model = load_model(path)
    infer_shapes(model)
    np.savez(path.with_name("calib.npz"), x=_correlated(128, 32, seed=3).astype(np.float32))

    def opened():
        return PassContext(calibration=CalibrationSet.from_path(path.with_name("calib.npz"), model))

    def fresh_caches():
        monkeypatch.setattr(distill, "_CANDIDATES", AnalysisCache("students", 1 << 30))
        monkeypatch.setattr(distill, "_TEACHER", AnalysisCache("teacher", 1 << 30))

    fits, captures = [], []
    fit, capture = distill.Distill._fit_candidates, TeacherOutputs.capture
    monkeypatch.setattr(distill.Distill, "_fit_candidates", lambda self, *a: fits.append(1) or fit(self, *a))
    monkeypatch.setattr(TeacherOutputs, "capture", lambda *a, **k: captures.append(1) or capture(*a, **k))
    budgets = (0.05, 0.02, 0.01)
    fresh_caches()
    searched = [make_pass("distill", {"budget": b}).run(model, opened()) for b in budgets]
    assert len(fits) == 1 and len(captures) == 1
    for budget, result in zip(budgets, searched):
        fresh_caches()
        alone = make_pass("distill", {"budget": budget}).run(model, opened())
        assert result.modified and alone.model.proto.SerializeToString() == result.model.proto.SerializeToString()
        assert result.skipped == alone.skipped
    assert len({r.stats["params_removed"] for r in searched}) > 1  # the budgets took different amounts
