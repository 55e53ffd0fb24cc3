"""SmoothQuant: exact rescaling (folded into LayerNorm or a Mul), and the int8 error it removes
on activations with an outlier channel, against onnxruntime fp32."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.errors import ConfigError
from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass
from optc.passes.quantize.smoothquant import smoothing_scales

OUTLIER = 3  # the input channel that is ~50x larger than the others


def _tokens(n=256, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16, 32)).astype(np.float32)
    return x


def _ln_attention_inputs():
    """LayerNorm whose gamma has one huge channel (as in BERT) feeding two MatMuls (query, key)."""
    gamma = np.ones(32, np.float32)
    gamma[OUTLIER] = 50.0
    return make_model(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1, name="ln"),
            helper.make_node("MatMul", ["h", "Wq"], ["q"], name="mm_q"),
            helper.make_node("MatMul", ["h", "Wk"], ["k"], name="mm_k"),
            helper.make_node("Add", ["q", "k"], ["y"], name="sum"),
        ],
        [("x", ["N", 16, 32])],
        [("y", ["N", 16, 24])],
        [("gamma", gamma), ("beta", 0.1 * rand(32, seed=1)), ("Wq", 0.2 * rand(32, 24, seed=2)), ("Wk", 0.2 * rand(32, 24, seed=3))],
    )


def _residual_gemm():
    """An outlier channel read by a Gemm and by a residual Add (which must keep the unscaled tensor)."""
    return make_model(
        [
            helper.make_node("Mul", ["x", "boost"], ["h"], name="boost_mul"),
            helper.make_node("Gemm", ["h", "W", "C"], ["g"], transB=1, name="fc"),
            helper.make_node("Add", ["g", "h"], ["y"], name="residual"),
        ],
        [("x", ["N", 32])],
        [("y", ["N", 32])],
        [("boost", np.where(np.arange(32) == OUTLIER, 50.0, 1.0).astype(np.float32)), ("W", 0.2 * rand(32, 32, seed=4)), ("C", rand(32, seed=5))],
    )


def _run(save, tmp_path, proto, x, name, **options):
    model = load_model(save(proto))
    infer_shapes(model)
    before = model.proto.SerializeToString()
    np.savez(tmp_path / "calib.npz", x=x)
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    result = PassManager([make_pass(name, options)]).run(model, PassContext(calibration=calib))
    assert model.proto.SerializeToString() == before, "the pass mutated its input"
    onnx.checker.check_model(result.model.proto, full_check=True)
    return result.model, result.records[0]


def test_scales_follow_the_formula():
    a, w = np.array([8.0, 1.0, 0.0, 4.0]), np.array([0.5, 2.0, 1.0, 0.0])
    s = smoothing_scales(a, w, 0.5)
    np.testing.assert_allclose(s, [np.sqrt(8 / 0.5), np.sqrt(1 / 2.0), 1.0, 1.0])  # dead channels keep s = 1
    np.testing.assert_allclose(smoothing_scales(a, w, 0.0)[:2], [2.0, 0.5])  # alpha 0: s = 1 / max|W_j|


def test_folds_into_layernorm_exactly(save, tmp_path):
    proto, x = _ln_attention_inputs(), _tokens()
    smoothed, record = _run(save, tmp_path, proto, x, "smoothquant", alpha=0.5)
    assert record.modified and record.stats["smoothed_tensors"] == 1 and record.stats["smoothed_layers"] == 2
    info = record.stats["smoothing"]["h"]
    assert info["placed"] == "folded into ln" and sorted(info["layers"]) == ["mm_k", "mm_q"]
    assert info["channel_peak_to_median"][1] < 0.5 * info["channel_peak_to_median"][0]  # flatter channels
    assert smoothed.op_histogram() == load_model(save(proto)).op_histogram()  # no node added
    feeds = {"x": x[:8]}
    ref, got = ort_run(proto, feeds)["y"], ort_run(smoothed.proto, feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())  # exact up to float32 rounding


def test_inserts_a_mul_when_another_reader_needs_the_tensor(save, tmp_path):
    proto = _residual_gemm()
    x = rand(128, 32, seed=6)
    smoothed, record = _run(save, tmp_path, proto, x, "smoothquant", alpha=0.5)
    assert record.stats["smoothing"]["h"]["placed"].startswith("Mul ")
    assert smoothed.op_histogram()["Mul"] == 2
    add = next(n for n in smoothed.graph.node if n.name == "residual")
    assert "h" in add.input  # the residual still reads the unscaled tensor
    ref, got = ort_run(proto, {"x": x})["y"], ort_run(smoothed.proto, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("builder", ["ln", "residual"])
def test_smoothquant_reduces_int8_error_on_an_outlier_channel(save, tmp_path, builder):
    # Bounded inputs for the Gemm: test values beyond the calibrated range would be
    # clipped the same with or without smoothing and hide the difference.
    uniform = lambda n, seed: np.random.default_rng(seed).uniform(-1, 1, (n, 32)).astype(np.float32)  # noqa: E731
    proto, x = (_ln_attention_inputs(), _tokens()) if builder == "ln" else (_residual_gemm(), uniform(512, 6))
    test = _tokens(32, seed=9) if builder == "ln" else uniform(64, 10)
    ref = ort_run(proto, {"x": test})["y"]
    errors = {}
    for alpha in (None, 0.5):
        q, record = _run(save, tmp_path, proto, x, "quantize", smoothquant=alpha, calibrator="minmax", reduce_range=False)
        assert record.stats["quantized"] == (2 if builder == "ln" else 1)
        got = ort_run(q.proto, {"x": test})["y"]
        errors[alpha] = float(np.mean((got - ref) ** 2) / np.mean(ref**2))
    assert errors[0.5] < 0.25 * errors[None], errors  # the outlier no longer sets every channel's step
    assert errors[0.5] < 1e-3, errors  # declared budget: relative MSE 0.1 % vs onnxruntime fp32


def test_quantize_with_smoothquant_keeps_qdq_format(save, tmp_path):
    q, record = _run(save, tmp_path, _ln_attention_inputs(), _tokens(64), "quantize", smoothquant=0.5)
    hist = q.op_histogram()
    assert hist["QuantizeLinear"] == 1 and hist["DequantizeLinear"] == 3 and "Mul" not in hist
    producers = {o: n for n in q.graph.node for o in n.output}
    for name in ("mm_q", "mm_k"):
        node = next(n for n in q.graph.node if n.name == name)
        assert producers[node.input[0]].op_type == "DequantizeLinear"
        wdq = producers[node.input[1]]
        assert wdq.op_type == "DequantizeLinear" and next(a.i for a in wdq.attribute if a.name == "axis") == 1
    assert record.stats["smoothed_layers"] == 2


def test_bad_alpha_is_rejected():
    with pytest.raises(ConfigError, match="alpha"):
        make_pass("smoothquant", {"alpha": "1.5"})
    with pytest.raises(ConfigError, match="smoothquant"):
        make_pass("quantize", {"smoothquant": "-0.1"})


def test_fallback_runs_on_the_smoothed_model_and_scores_against_the_original(save, tmp_path):
    proto, x = _ln_attention_inputs(), _tokens(64)
    q, record = _run(save, tmp_path, proto, x, "quantize", smoothquant=0.5, max_drop=0.0, eval_samples=16)
    stats = record.stats
    assert set(stats["sensitivity"]) == {"mm_q", "mm_k"} and stats["float"]
    most = max(stats["sensitivity"], key=stats["sensitivity"].get)
    assert most in stats["float"]
    # The reported drop is 1 - mean cosine of the kept model against the original float model.
    ref, got = ort_run(proto, {"x": x[:16]})["y"].reshape(16, -1), ort_run(q.proto, {"x": x[:16]})["y"].reshape(16, -1)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert stats["drop"] == pytest.approx(1 - cos.mean(), abs=1e-6)
