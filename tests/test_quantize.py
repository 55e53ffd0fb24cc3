"""quantize: calibrators on synthetic distributions, QDQ structure and axes, accuracy
budgets against onnxruntime fp32, bias correction / GPTQ measurably helping, fallback."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import SAMPLE, make_model, ort_run, rand
from onnx import helper

from optc.errors import ConfigError
from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass
from optc.passes.quantize.calibrators import HistogramCalibrator, MinMaxCalibrator, StreamingHistogram, expected_sq_error
from optc.passes.quantize.qdq import activation_params, fake_quantize

# --- calibrators -------------------------------------------------------------------


def _outlier_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(200_000)
    x[:5] = [40.0, -35.0, 50.0, 38.0, -45.0]  # rare outliers
    return x.astype(np.float32)


def test_histogram_merging_is_order_independent():
    x = _outlier_data()
    one, parts = StreamingHistogram(1024), StreamingHistogram(1024)
    one.update(x)
    for chunk in np.array_split(x[::-1], 7):  # small values first: forces doublings later
        parts.update(chunk)
    assert one.radius == parts.radius
    np.testing.assert_array_equal(one.counts, parts.counts)
    assert one.counts.sum() + one.zeros == x.size


def test_minmax_is_exact_and_contains_zero():
    cal = MinMaxCalibrator()
    for chunk in np.array_split(np.linspace(0.5, 3.0, 100), 4):
        cal.update(chunk)
    assert cal.range() == (0.0, 3.0)


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibrators_clip_outliers(method):
    cal = HistogramCalibrator(method, percentile=99.99, unsigned=True)
    for chunk in np.array_split(_outlier_data(), 5):
        cal.update(chunk)
    lo, hi = cal.range()
    assert -10 < lo < -2 and 2 < hi < 10, (lo, hi)  # outliers near +-40 clipped away


def test_percentile_matches_numpy():
    x = _outlier_data(1)
    cal = HistogramCalibrator("percentile", percentile=99.9, bins=8192)
    cal.update(x)
    lo, hi = cal.range()
    assert abs(hi - np.percentile(x, 99.9)) < 0.05 and abs(lo - np.percentile(x, 0.1)) < 0.05


def test_mse_minimises_the_quantisation_error_it_claims_to():
    # Heavy tails (Laplace): clipping trades a little tail error for finer steps.
    # (Far outliers of N(0,1), as above, cost more clipped than kept: mse keeps them.)
    x = np.random.default_rng(2).laplace(size=100_000).astype(np.float32)
    cal = HistogramCalibrator("mse")
    cal.update(x)
    lo, hi = cal.range()

    def real_mse(a, b):
        p = activation_params(a, b)
        return float(np.mean((fake_quantize(x.astype(np.float64), p) - x) ** 2))

    chosen = real_mse(lo, hi)
    full = real_mse(float(x.min()), float(x.max()))
    assert chosen < 0.9 * full
    # Within a few percent of the best range on a fine grid of the same family.
    grid = [real_mse(x.min() * t, x.max() * t) for t in np.linspace(0.01, 1, 100)]
    assert chosen <= 1.05 * min(grid)
    # The histogram estimate agrees with the measured error.
    assert expected_sq_error(cal.hist, lo, hi) == pytest.approx(chosen, rel=0.1)


def test_entropy_keeps_a_one_sided_background_value():
    # A normalised image: most pixels at the black level -0.42, strokes up to 2.8.
    rng = np.random.default_rng(0)
    x = np.full(100_000, -0.4242, np.float32)
    x[:20_000] = rng.uniform(-0.42, 2.8, 20_000)
    cal = HistogramCalibrator("entropy")
    cal.update(x)
    lo, hi = cal.range()
    assert lo <= -0.42 and hi > 2.0


# --- the pass ----------------------------------------------------------------------


def _calib(tmp_path, model, n=64, seed=0, **arrays):
    rng = np.random.default_rng(seed)
    feeds = arrays or {s.name: rng.standard_normal((n, *s.shape[1:])).astype(np.float32) for s in model.inputs}
    np.savez(tmp_path / "calib.npz", **feeds)
    return CalibrationSet.from_path(tmp_path / "calib.npz", model)


def _run(save, tmp_path, proto, calib_arrays=None, **options):
    model = load_model(save(proto))
    infer_shapes(model)
    before = model.proto.SerializeToString()
    calib = _calib(tmp_path, model, **(calib_arrays or {}))
    result = PassManager([make_pass("quantize", options)]).run(model, PassContext(calibration=calib))
    assert model.proto.SerializeToString() == before, "the pass mutated its input"
    onnx.checker.check_model(result.model.proto, full_check=True)
    return result.model, result.records[0]


def _conv_gemm_model(opset=17):
    return make_model(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["p"], name="pool"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "G", "C"], ["g"], transB=0, name="gemm"),
            helper.make_node("MatMul", ["g", "M"], ["y"], name="mm"),
        ],
        [("x", ["N", 3, 8, 8])],
        [("y", ["N", 4])],
        [("W", rand(8, 3, 3, 3)), ("B", rand(8, seed=1)), ("G", rand(8, 6, seed=2)), ("C", rand(6, seed=3)), ("M", rand(6, 4, seed=4))],
        opset=opset,
    )


def _dq_axis(model, weight_consumer):
    producers = {o: n for n in model.graph.node for o in n.output}
    node = next(n for n in model.graph.node if n.name == weight_consumer)
    dq = producers[node.input[1]]
    assert dq.op_type == "DequantizeLinear"
    return next((a.i for a in dq.attribute if a.name == "axis"), 1), model.initializer_array(dq.input[0])


def _quantized_tensors(model):
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.mark.parametrize("calibrator", ["minmax", "percentile", "entropy", "mse"])
def test_qdq_structure_axes_and_error_budget(save, tmp_path, calibrator):
    proto = _conv_gemm_model()
    q, record = _run(save, tmp_path, proto, calibrator=calibrator)
    hist = q.op_histogram()
    # Layer inputs x, f, g; with int8 chains also the Conv's output after its Relu and the pooled map.
    assert _quantized_tensors(q) == {"x", "r", "p", "f", "g"}
    assert hist["QuantizeLinear"] == 5 and hist["DequantizeLinear"] == 5 + 3 + 2  # acts, weights, int32 biases
    assert _dq_axis(q, "conv")[0] == 0 and _dq_axis(q, "gemm")[0] == 1 and _dq_axis(q, "mm")[0] == 1
    w_conv = _dq_axis(q, "conv")[1]
    assert w_conv.dtype == np.int8 and w_conv.shape == (8, 3, 3, 3) and np.abs(w_conv).max() <= 127
    bias_dq = next(n for n in q.graph.node if n.op_type == "DequantizeLinear" and q.initializer_array(n.input[0]).dtype == np.int32)
    assert bias_dq is not None
    x = rand(16, 3, 8, 8, seed=7)
    ref, got = ort_run(proto, {"x": x})["y"], ort_run(q.proto, {"x": x})["y"]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # declared budget: 5 % of range
    stats = record.stats
    assert stats["quantized"] == 3 and all(l["weight_sqnr_db"] > 30 for l in stats["layers"].values())
    assert stats["weight_bytes_after"] < stats["weight_bytes_before"]


def test_include_exclude_and_float_bias(save, tmp_path):
    q, record = _run(save, tmp_path, _conv_gemm_model(), exclude=("mm",), bias="float")
    assert record.stats["quantized"] == 2 and "mm: excluded" in record.skipped
    assert next(n for n in q.graph.node if n.name == "mm").input[1] == "M"
    assert not any(q.initializer_array(t.name).dtype == np.int32 for t in q.graph.initializer)
    q2, record2 = _run(save, tmp_path, _conv_gemm_model(), include=("Conv",))
    assert record2.stats["quantized"] == 1 and _quantized_tensors(q2) == {"x", "r"}  # the pool leads to no int8 layer
    q3, _ = _run(save, tmp_path, _conv_gemm_model(), include=("Conv",), int8_chains=False)
    assert _quantized_tensors(q3) == {"x"}


def test_opset_11_is_upgraded(save, tmp_path):
    proto = _conv_gemm_model(opset=11)
    q, _ = _run(save, tmp_path, proto)
    assert q.opset >= 13
    x = rand(4, 3, 8, 8, seed=1)
    ref = ort_run(proto, {"x": x})["y"]
    assert np.abs(ort_run(q.proto, {"x": x})["y"] - ref).max() < 0.05 * np.abs(ref).max()


def _biased_gemm():
    # Inputs far from zero mean: weight rounding then shifts every output by (M' - M) E[x].
    w = rand(64, 32, seed=5) * 0.05
    return make_model([helper.make_node("Gemm", ["x", "W", "C"], ["y"], transB=1, name="fc")], [("x", ["N", 64])], [("y", ["N", 32])], [("W", w.T.copy()), ("C", np.zeros(32, np.float32))])


def test_bias_correction_removes_the_mean_shift(save, tmp_path):
    rng = np.random.default_rng(0)
    x = (4.0 + 0.1 * rng.standard_normal((256, 64))).astype(np.float32)
    proto = _biased_gemm()
    errors = {}
    for flag in (False, True):
        q, _ = _run(save, tmp_path, proto, {"x": x}, bias_correction=flag, reduce_range=True, calibrator="minmax")
        diff = ort_run(q.proto, {"x": x})["y"] - ort_run(proto, {"x": x})["y"]
        errors[flag] = float(np.abs(diff.mean(axis=0)).mean())
    assert errors[True] < 0.3 * errors[False], errors


def test_gptq_reduces_output_error(save, tmp_path):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((512, 8))
    x = (base @ rng.standard_normal((8, 64)) + 0.05 * rng.standard_normal((512, 64))).astype(np.float32)  # correlated inputs
    proto = make_model([helper.make_node("MatMul", ["x", "M"], ["y"], name="mm")], [("x", ["N", 64])], [("y", ["N", 16])], [("M", rand(64, 16, seed=2))])
    errors = {}
    for rounding in ("nearest", "gptq"):
        q, _ = _run(save, tmp_path, proto, {"x": x}, rounding=rounding, reduce_range=True, calibrator="minmax", bias_correction=False)
        diff = ort_run(q.proto, {"x": x})["y"] - ort_run(proto, {"x": x})["y"]
        errors[rounding] = float(np.mean(diff**2))
    assert errors["gptq"] < 0.8 * errors["nearest"], errors


def test_max_drop_keeps_sensitive_layers_float(save, tmp_path):
    q, record = _run(save, tmp_path, _conv_gemm_model(), max_drop=1e-7, eval_samples=32)
    stats = record.stats
    assert set(stats["sensitivity"]) == {"conv", "gemm", "mm"}
    assert stats["float"], "a near-zero budget must send layers back to float"
    most = max(stats["sensitivity"], key=stats["sensitivity"].get)
    assert most in stats["float"]
    assert any("kept float" in s for s in record.skipped)


def test_sensitivities_are_measured_only_for_a_fallback_and_within_its_time(save, tmp_path):
    """A model within its budget needs no fallback: no layer's sensitivity is measured (each is a run of the model on
    the evaluation samples). One that misses it measures them on the search's clock, which may end the measuring."""
    _, within = _run(save, tmp_path, _conv_gemm_model(), max_drop=0.5, eval_samples=32)
    assert within.stats["sensitivity"] == {} and not within.stats["float"]
    _, asked = _run(save, tmp_path, _conv_gemm_model(), max_drop=0.5, eval_samples=32, sensitivity=True)
    assert set(asked.stats["sensitivity"]) == {"conv", "gemm", "mm"}
    _, spent = _run(save, tmp_path, _conv_gemm_model(), max_drop=1e-7, eval_samples=32, time_budget_s=0.0)
    assert len(spent.stats["sensitivity"]) < 3 and not spent.stats["float"] and spent.stats["budget_met"] is False


def test_a_fixed_batch_of_one_is_judged_on_every_sample(save, tmp_path):
    """Once the fallback of a batch-1 model measured its first sample only: 22 frames of ddddocr's OCR
    said every layer could stay int8, and 352 held-out frames disagreed."""
    proto = _conv_gemm_model()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    q, record = _run(save, tmp_path, proto, max_drop=1e-7, metric="fidelity", eval_samples=40)
    assert record.stats["fallback_samples"] == 40
    assert record.stats["float"]


def test_a_tighter_fallback_reuses_the_drops_measured_and_writes_the_same_model(save, tmp_path):
    """The default budget tightens a fallback that missed: the same model, data and options measure nothing again,
    calibration included (PicoDet's took 60-100 s a try)."""
    from optc.passes.quantize.quantize import _CALIBRATIONS, _DROPS
    _DROPS.clear()
    _CALIBRATIONS.clear()
    misses, hits = _DROPS.misses, _DROPS.hits
    _, first = _run(save, tmp_path, _conv_gemm_model(), max_drop=1e-7, metric="fidelity", eval_samples=32)
    assert len(first.stats["sensitivity"]) == 3  # it missed: every layer's sensitivity measured
    measured = _DROPS.misses - misses
    tight, record = _run(save, tmp_path, _conv_gemm_model(), max_drop=1e-9, metric="fidelity", eval_samples=32)
    assert _DROPS.hits - hits >= 4  # the full drop and the 3 one-layer ones, at least
    assert _DROPS.misses - misses - measured < measured
    assert _CALIBRATIONS.hits >= 2  # the second run's activation ranges and input means
    _DROPS.clear()
    _CALIBRATIONS.clear()
    fresh, again = _run(save, tmp_path, _conv_gemm_model(), max_drop=1e-9, metric="fidelity", eval_samples=32)
    assert tight.proto.SerializeToString() == fresh.proto.SerializeToString()
    assert record.stats["float"] == again.stats["float"]


def test_too_few_samples_is_a_clear_error(save, tmp_path):
    model = load_model(save(_conv_gemm_model()))
    np.savez(tmp_path / "few.npz", x=rand(3, 3, 8, 8))
    calib = CalibrationSet.from_path(tmp_path / "few.npz", model)
    with pytest.raises(ConfigError, match="at least"):
        PassManager([make_pass("quantize")]).run(model, PassContext(calibration=calib))


def test_missing_calibration_is_a_clear_error(save):
    model = load_model(save(_conv_gemm_model()))
    with pytest.raises(ConfigError, match="calib"):
        PassManager([make_pass("quantize")]).run(model, PassContext())


def test_bad_options_are_rejected():
    with pytest.raises(ConfigError, match="percentile"):
        make_pass("quantize", {"percentile": "30"})
    with pytest.raises(ConfigError, match="calibrator"):
        make_pass("quantize", {"calibrator": "kl"})


@pytest.mark.slow
def test_mnist_cnn_keeps_accuracy():
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    passes = [make_pass("fold-batchnorm"), make_pass("quantize", {"calibrator": "percentile"})]
    q = PassManager(passes).run(model, PassContext(calibration=calib)).model
    onnx.checker.check_model(q.proto, full_check=True)
    test = np.load(SAMPLE / "test.npz")
    logits = ort_run(q.proto, {"input": test["input"]})[q.outputs[0].name]
    assert (logits.argmax(1) == test["label"]).mean() >= 0.975  # fp32: 0.980


def test_the_fallback_finds_the_fewest_float_layers_in_about_two_log2_runs():
    """PicoDet needed 40 of its ~100 layers float and took 40 runs of the model at 8 s each: its time budget ended first."""
    from optc.passes.quantize.fallback import fewest_float

    order = [f"l{i}" for i in range(100)]
    for needed in (1, 3, 40, 64, 99):
        runs = []
        value = lambda k, needed=needed: 0.0 if k >= needed else 0.1 * (1 - k / 200)  # noqa: E731
        k, trials = fewest_float(order, lambda k: runs.append(k) or value(k), 0.1, 0.01, lambda: False)
        assert k == needed and trials == [(n, value(n)) for n in runs]
        assert len(runs) <= 2 * np.log2(needed) + 2, (needed, runs)
    # no count is within: the one with the least drop; ties go to the fewer layers; every layer float is not tried
    k, trials = fewest_float(order[:6], lambda k: [0.5, 0.2, 0.3, 0.25, 0.2, 0.2, 0.0][k], 0.5, 0.01, lambda: False)
    assert k == 1 and [n for n, _ in trials] == [1, 2, 4, 5]
    assert fewest_float(order[:1], lambda k: 0.0, 0.1, 0.01, lambda: False) == (0, [])
    # a spent clock measures nothing more: the model as it was
    assert fewest_float(order, lambda k: 0.0, 0.1, 0.01, lambda: True) == (0, [])


def test_sensitivities_take_at_most_half_the_time_budget_worst_rounded_first(monkeypatch):
    """The fallback's search gets the other half; the half measures the layers most likely to matter first."""
    from optc.passes.quantize import fallback as q

    clock = [0.0]
    monkeypatch.setattr(q.time, "perf_counter", lambda: clock[0])
    rounding = {f"l{i}": 40.0 - i for i in range(10)}  # SQNR in dB: l9 is the worst rounded

    def measure(name):
        clock[0] += 10.0
        return 1.0
    sens = q.measure_sensitivities(rounding, measure, 0.0, 35.0)
    assert list(sens) == ["l9", "l8", "l7", "l6"]  # at 40 s the half budget is spent: measured worst-rounded first
    assert len(q.measure_sensitivities(rounding, measure, clock[0], None)) == 10  # asked for (sensitivity=true): all


def test_rounding_sqnr_counts_the_input_activations_rounding_too(save, tmp_path):
    """PicoDet's sparse hard-swish activations (RMS 0.06 on a range of 3.6) round at 15 dB while its weights round
    above 38 dB: ordered by the weights alone, the fallback measured the wrong layers first and kept 101 of 102 float."""
    from optc.passes.quantize.fallback import activation_noise

    rng = np.random.default_rng(0)
    sparse = (0.03 * rng.standard_normal((64, 16))).astype(np.float32)  # its range is set by rare peaks (below)
    dense = rng.uniform(-1, 1, (64, 16)).astype(np.float32)
    proto = make_model([helper.make_node("Identity", ["x"], ["y"])], [("x", ["N", 16])], [("y", ["N", 16])])
    model = load_model(save(proto))
    calib = CalibrationSet.from_arrays({"x": sparse}, model)
    noise_sparse = activation_noise(model, calib, {"x": activation_params(-0.375, 3.2)}, batch_size=16, max_batches=None)
    calib = CalibrationSet.from_arrays({"x": dense}, model)
    noise_dense = activation_noise(model, calib, {"x": activation_params(-1.0, 1.0)}, batch_size=16, max_batches=None)
    snr = lambda r: -10 * np.log10(r["x"])  # noqa: E731
    assert snr(noise_sparse) < 25 < 40 < snr(noise_dense), (snr(noise_sparse), snr(noise_dense))
    # uniform values over the range, 256 levels: the textbook 6.02 * 8 dB, less the crest of a uniform signal
    assert snr(noise_dense) == pytest.approx(20 * np.log10(np.sqrt(1 / 3) / (2 / 255 / np.sqrt(12))), abs=0.5)


def test_recurrent_layers_left_float_are_named(save, tmp_path):
    """Resemblyzer keeps 96 % of its weights in 3 LSTMs; quantize wrote int8 for its one Gemm (3 % smaller) and said
    nothing of them."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "M"], ["h"], name="proj"),
         helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0, 2], name="time_major"),
         helper.make_node("LSTM", ["t", "W", "R"], ["Y"], hidden_size=4, name="lstm"),
         helper.make_node("Squeeze", ["Y", "axis"], ["s"], name="squeeze"),
         helper.make_node("Transpose", ["s"], ["y"], perm=[1, 0, 2], name="batch_major")],
        [("x", ["N", 5, 6])], [("y", ["N", 5, 4])],
        [("M", rand(6, 3)), ("W", rand(1, 16, 3, seed=1) * 0.5), ("R", rand(1, 16, 4, seed=2) * 0.5), ("axis", np.array([1], np.int64))],
    )
    _, record = _run(save, tmp_path, proto, max_drop=0.5)
    assert record.modified
    assert "lstm: LSTM weights stay float (quantize writes int8 for Conv, Gemm and MatMul)" in record.skipped
