"""The default budget (optc.search.guard): lossy passes left at their default strength may not cost
more than a point (or output cosine 0.99 on held-out calibration samples); strengths the user wrote
run as asked."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SAMPLE

from optc.cli.main import cli
from optc.data import CalibrationSet
from optc.errors import ConfigError
from optc.evaluation import load_metric
from optc.ir.io import load_model
from optc.passes import make_pass, parse_pass_spec
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig
from optc.search.guard import at_default_strength

MODEL, CALIB, TEST = SAMPLE / "mnist_cnn.onnx", SAMPLE / "calib.npz", SAMPLE / "test.npz"


def compile_(tmp_path, name, *args):
    out = tmp_path / name
    res = CliRunner().invoke(cli, ["compile", str(MODEL), "-o", str(out), "--pass", "canonicalize", "--calib", str(CALIB),
                                   "--no-latency", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text()), res.output


def test_which_passes_run_at_default_strength():
    assert at_default_strength(make_pass("sparsify"))
    assert at_default_strength(parse_pass_spec("sparsify:method=magnitude")[0])  # a detail, not how much
    assert not at_default_strength(parse_pass_spec("sparsify:sparsity=0.5")[0])  # the default value, but written
    assert not at_default_strength(parse_pass_spec("sparsify:pattern=2:4")[0])
    assert at_default_strength(make_pass("quantize")) and not at_default_strength(parse_pass_spec("quantize:max_drop=0.02")[0])
    assert at_default_strength(make_pass("distill")) and not at_default_strength(parse_pass_spec("distill:budget=0.1")[0])
    assert not at_default_strength(Sparsify(SparsifyConfig()))  # built in Python: every option chosen
    assert not at_default_strength(make_pass("fold-constants"))  # exact


def test_hold_out_splits_off_a_quarter_spread_over_the_set_and_refuses_what_it_cannot_split(tmp_path):
    """Samples spread evenly, not the last ones: a set sorted by class (an image folder listed in order) held out
    its last classes and fitted on the others."""
    model = load_model(MODEL)
    fit, held = CalibrationSet.from_path(CALIB, model).hold_out(model)
    with np.load(CALIB) as data:
        everything = data["input"]
    assert fit.num_samples + held.num_samples == len(everything) and held.num_samples == 64
    at = np.floor((np.arange(64) + 0.5) * 500 / 64).astype(int)  # 3, 11, 19, 27, 35, ...: one in each stretch of 7.8
    assert list(at[:5]) == [3, 11, 19, 27, 35] and at[-1] == 496
    np.testing.assert_array_equal(held.take(64)["input"], everything[at])
    np.testing.assert_array_equal(fit.take(436)["input"], np.delete(everything, at, axis=0))
    # ten classes in order, 12 samples each: 30 held out, every class among them, 9 of each left to fit on
    labels = np.repeat(np.arange(10), 12)
    np.savez(tmp_path / "sorted.npz", input=everything[:120] + labels[:, None, None, None].astype(np.float32) * 1000)
    fit, held = CalibrationSet.from_path(tmp_path / "sorted.npz", model).hold_out(model)
    held_classes = np.round(held.take(30)["input"].reshape(30, -1).max(axis=1) / 1000).astype(int)
    fit_classes = np.round(fit.take(90)["input"].reshape(90, -1).max(axis=1) / 1000).astype(int)
    assert sorted(set(held_classes)) == list(range(10)) and np.bincount(fit_classes).min() >= 8, (held_classes, fit_classes)
    np.savez(tmp_path / "few.npz", input=everything[:7])
    with pytest.raises(ConfigError, match="too few to hold 4 out"):
        CalibrationSet.from_path(tmp_path / "few.npz", model).hold_out(model)


@pytest.mark.slow
def test_default_that_misses_is_scaled_down_and_held_on_the_test_set(tmp_path):
    """distill's defaults take 2 points of the sample CNN: held to one point, from --eval."""
    report, output = compile_(tmp_path, "auto", "--pass", "distill", "--eval", TEST)
    assert "misses the default budget" in " ".join(output.split())
    search = report["search"]
    assert search["max_drop"] == pytest.approx(0.01) and search["metric"] == "top1"
    chosen = search["chosen"]
    assert chosen["feasible"] and 0 < chosen["strengths"]["distill#5"] < 0.05  # some distillation kept, less than asked
    acc = report["evaluation"]["accuracy"]
    assert acc["before"] - acc["after"] <= 0.01 + 1e-9
    assert report["after"]["macs"] < report["before"]["macs"]

    asked, _ = compile_(tmp_path, "asked", "--pass", "distill:budget=0.05", "--eval", TEST)  # written: as asked
    assert asked.get("search") is None
    assert asked["evaluation"]["accuracy"]["before"] - asked["evaluation"]["accuracy"]["after"] > 0.01
    off, _ = compile_(tmp_path, "off", "--pass", "distill", "--eval", TEST, "--no-default-budget")
    assert off.get("search") is None and off["after"]["macs"] == asked["after"]["macs"]


@pytest.mark.slow
def test_without_eval_the_default_is_held_on_held_out_calibration_samples(tmp_path):
    report, output = compile_(tmp_path, "q", "--pass", "quantize")
    assert report.get("search") is None  # int8 of the sample keeps cosine 0.99: nothing searched
    assert any("within the default budget (the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax "
               "agreement at least 0.99 (logits) on 64 held-out calibration samples): cosine 0.99" in n for n in report["notes"])
    report, _ = compile_(tmp_path, "mf", "--pass", "prune-channels:ratio=0.6", "--min-fidelity", "0.995")
    assert report["search"]["metric"] == "cosine" and report["search"]["samples"] == 64
    assert "lower confidence bound" in report["search"]["score"]  # a handful of split-off samples: their bound, not their mean
    assert report["search"]["chosen"]["strengths"]["prune-channels#5"] < 0.6
    # The metric a missed label-free default is searched with, named: held out of the calibration data too.
    report, _ = compile_(tmp_path, "fid", "--pass", "prune-channels:ratio=0.6", "--metric", "fidelity", "--max-drop", "0.01")
    search = report["search"]
    assert search["metric"] == "fidelity" and search["samples"] == 64 and search["chosen"]["metric"] >= 0.99
    assert 0 < search["chosen"]["strengths"]["prune-channels#5"] < 0.6


def _scores(n: int, flips: dict[int, int], noise: dict[int, float]) -> tuple[dict, dict]:
    """Reference logits [n, 10 positions, 5 classes] and a copy with ``flips[i]`` positions of sample i
    decided otherwise and ``noise[i]`` of the reference's size added to sample i."""
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, 10, 5)) * 4
    ref[..., 0] += 20  # decisive: the top class is near certain at every position
    out = ref.copy()
    for i, k in flips.items():
        out[i, :k, 1] = out[i, :k, 0] + 1
    for i, scale in noise.items():
        out[i] += scale * np.linalg.norm(ref[i]) / np.sqrt(ref[i].size) * rng.normal(size=ref[i].shape)
    return {"logits": out.astype(np.float32)}, {"logits": ref.astype(np.float32)}


def test_lower_bound_is_students_t_bound_of_the_mean():
    from optc.evaluation.fidelity import lower_bound

    assert lower_bound(np.ones(8)) == 1.0 and lower_bound(np.array([0.7])) == 0.7
    values = np.array([0.999] * 7 + [0.95])
    expected = values.mean() - 1.415 * values.std(ddof=1) / np.sqrt(8)  # t(0.90, 7 df) = 1.415
    assert lower_bound(values) == pytest.approx(expected, abs=1e-12)
    wide = np.linspace(0.98, 1.0, 61)  # 60 df: t(0.90) = 1.296, from the expansion beyond the table
    assert lower_bound(wide) == pytest.approx(wide.mean() - 1.296 * wide.std(ddof=1) / np.sqrt(61), abs=2e-5)


def test_sample_agreements_judge_each_sample_on_its_own_positions():
    from optc.evaluation.fidelity import decision_agreement, sample_agreements

    out, ref = _scores(4, {0: 3, 2: 1}, {})
    per_sample = sample_agreements(ref["logits"], out["logits"])
    np.testing.assert_allclose(per_sample, [0.7, 1.0, 0.9, 1.0])
    assert per_sample.mean() == pytest.approx(decision_agreement(ref["logits"], out["logits"]))
    assert sample_agreements(np.linspace(-3, 3, 40).reshape(4, 10), np.zeros((4, 10))) is None  # not class scores


def test_fidelity_drop_holds_flipped_decisions_that_the_cosine_hides():
    """A pass's own fallback judged by the cosine alone kept every layer int8 where a frame's argmax flipped."""
    from optc.evaluation.fidelity import fidelity_drop
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((50, 10)) * 0.1
    logits[np.arange(50), rng.integers(0, 10, 50)] += 5.0  # decisive frames
    near = logits.copy()
    top = logits.argmax(1)
    near[:5, (top[:5] + 1) % 10] = logits[:5, top[:5]] + 0.01  # five of 50 decisions flip by a hair
    reference, actual = [logits.astype(np.float32)], [near.astype(np.float32)]
    cosine = fidelity_drop(reference, actual, "cosine")
    assert cosine < 0.05
    assert fidelity_drop(reference, actual, "fidelity") == pytest.approx(0.1)
    embedding = [rng.standard_normal((50, 10)).astype(np.float32)]  # not class scores: held to the cosine only
    assert fidelity_drop(embedding, [embedding[0] * 1.01], "fidelity") == pytest.approx(0.0, abs=1e-9)


def test_bounded_refuses_a_mean_that_one_bad_sample_hides_in():
    """Seven faithful samples and one poor one: the mean clears 0.99 of fidelity, the bound does not."""
    from optc.evaluation.metrics import bounded

    out, ref = _scores(8, {}, {7: 0.35})
    plain, held = load_metric("fidelity"), bounded(load_metric("fidelity"))
    assert held.bounded and held.name == "fidelity" and not plain.bounded
    assert plain(out, None, ref) > 0.99 > held(out, None, ref)
    cosine = bounded(load_metric("cosine"))
    assert load_metric("cosine")(out, None, ref) > cosine(out, None, ref)
    same, ref = _scores(8, {}, {i: 0.01 for i in range(8)})  # alike samples: the bound is the mean, near enough
    assert held(same, None, ref) == pytest.approx(plain(same, None, ref), abs=1e-4)


def test_a_labelled_budget_holds_the_upper_bound_of_the_paired_drop(tmp_path):
    """500 digits, a twin that loses 4 and gains 1: 0.6 points as a mean, 1.17 as the bound a budget of one
    point holds (the search once chose such a model and it lost 2.6 points on the next 500)."""
    from optc.evaluation.metrics import MetricRunner, bounded

    top1 = load_metric("top1")
    assert bounded(top1).bounded and bounded(top1).per_sample is not None and not top1.bounded
    custom = dataclasses.replace(top1, name="mine.py:f", per_sample=None)
    assert bounded(custom) is custom  # one number for the whole set: held as it is
    labels = np.zeros(500, np.int64)
    scores = np.tile(np.float32([5, 0]), (500, 1))
    scores[:10] = [0, 5]  # the input model misses 10
    twin = scores.copy()
    twin[10:14] = [0, 5]  # loses 4
    twin[0] = [5, 0]  # gains 1
    model = _head(tmp_path, "model", np.eye(2))
    runner = MetricRunner(bounded(top1), CalibrationSet.from_arrays({"x": scores}, model), labels, model)
    score, drop = runner.judge({"scores": twin})
    assert score == pytest.approx(0.974) and runner.baseline == pytest.approx(0.98)
    d = np.zeros(500)
    d[10:14], d[0] = 1, -1
    assert drop == pytest.approx(0.006 + 1.2816 * d.std(ddof=1) / np.sqrt(500), abs=2e-4) and drop > 0.01
    plain = MetricRunner(top1, CalibrationSet.from_arrays({"x": scores}, model), labels, model)
    assert plain.judge({"scores": twin})[1] == pytest.approx(0.006)


def test_weights_that_grow_are_said_so():
    """A 'compression' that leaves the weights bigger is never kept silently."""
    from types import SimpleNamespace

    from optc.api import _size_warnings

    record = SimpleNamespace(name="sparsify", before={"bytes": 1000}, after={"bytes": 3000})
    grown = SimpleNamespace(initial=SimpleNamespace(param_bytes=1000), final=SimpleNamespace(param_bytes=3000), records=[record])
    (line,) = _size_warnings(grown, [make_pass("sparsify")])
    assert line.startswith("the weights grew from 1.0 KiB to 2.9 KiB (sparsify)")
    shrunk = SimpleNamespace(initial=SimpleNamespace(param_bytes=3000), final=SimpleNamespace(param_bytes=1000), records=[])
    assert _size_warnings(shrunk, [make_pass("sparsify")]) == []
    assert _size_warnings(grown, [make_pass("fold-constants")]) == []  # exact passes only: not a compression claim


def test_a_model_made_slower_is_said_so():
    """quantize made a face-landmark CNN 2.3x slower in onnxruntime: that is never kept silently either."""
    from optc.api import Evaluation, Latency, _speed_warnings

    def evaluation(before, after):
        return Evaluation({}, 8, "evaluation data", None, Latency(before, after, before / after, "onnxruntime CPU", "in turns"))

    from types import SimpleNamespace

    def ran(**modified):
        return SimpleNamespace(records=[SimpleNamespace(name=n, modified=m) for n, m in modified.items()])

    (line,) = _speed_warnings(evaluation(1.0, 2.3), [make_pass("quantize")], ran(quantize=True))
    assert line.startswith("the compressed model is 2.30x slower in onnxruntime on this machine (1.000 -> 2.300 ms")
    assert _speed_warnings(evaluation(1.0, 1.05), [make_pass("quantize")], ran(quantize=True)) == []  # within timing noise
    assert _speed_warnings(evaluation(1.0, 2.3), [make_pass("fold-constants")], ran(**{"fold-constants": True})) == []
    # a lossy pass that changed nothing: the same model timed twice, whatever the noise says
    assert _speed_warnings(evaluation(1.0, 2.3), [make_pass("quantize")], ran(quantize=False)) == []


def test_flipped_decisions_are_said_so_even_when_the_cosine_holds():
    """A strength the user wrote runs as asked; when the argmax of a class-score output moves at more than
    one position in a hundred, stderr and the report say so, as they do for a cosine below 0.99."""
    from optc.api import Evaluation, OutputFidelity, _quality_warnings
    from optc.evaluation.fidelity import compare_outputs

    ref = np.where((np.r_[0:200] % 10 == 0)[:, None], np.float32([0, 1, 0.95]), np.float32([8, 0.5, 0.2]))
    metrics = compare_outputs({"scores": ref}, {"scores": ref * np.float32([1, 0.9, 1])})["scores"]
    assert metrics["cosine"] > 0.999 and metrics["agreement"] == pytest.approx(0.9)
    assert "agreement" not in compare_outputs({"emb": ref[:, :1]}, {"emb": ref[:, :1]})["emb"]  # one logit: no decision
    evaluation = Evaluation({"scores": OutputFidelity.from_dict(metrics)}, 8, "evaluation data", None, None)
    assert Evaluation.from_dict(evaluation.to_dict()).fidelity["scores"].agreement == pytest.approx(0.9)  # report.json round trip
    (line,) = _quality_warnings(evaluation, "evaluation data")
    assert line.startswith("the argmax of output 'scores' agrees with the input model's at 0.9000 of positions")


def _head(tmp_path, name, weights):
    """``scores = x @ weights``: the input model, or its 'compressed' twin when only ``weights`` differ."""
    import onnx
    from helpers import make_model

    path = tmp_path / f"{name}.onnx"
    onnx.save(make_model([onnx.helper.make_node("MatMul", ["x", "w"], ["scores"])], [("x", ["N", weights.shape[0]])],
                         [("scores", ["N", weights.shape[1]])], [("w", weights.astype(np.float32))]), path)
    return load_model(path)


def _label_free_guard(model, x):
    """The guard a `--pass sparsify` run without --eval gets: 64 of these 256 samples held out."""
    from optc.search.guard import plan

    guard, fit, skipped = plan([make_pass("sparsify")], model, CalibrationSet.from_arrays({"x": x}, model), None, None)
    assert guard is not None and skipped is None and fit.num_samples == 192
    return guard


def test_label_free_guard_holds_argmax_decisions_not_only_cosine(tmp_path):
    """CTC-like scores: most positions a confident 'blank', every 10th a near-tie between two characters.
    The twin scales one class by 0.9: the mean cosine stays above 0.999, the near-ties flip."""
    # five classes: outputs of at most four values a sample are also held score by score, which would see the scaling
    x = np.where((np.r_[0:256] % 10 == 0)[:, None], np.float32([0, 1, 0.95, 0, 0]), np.float32([8, 0.5, 0.2, 0.1, 0]))
    model, twin = _head(tmp_path, "model", np.eye(5)), _head(tmp_path, "twin", np.diag([1, 0.9, 1, 1, 1]))
    guard = _label_free_guard(model, x)
    held = guard.data.inputs.take(64)["x"]
    assert ((held @ np.diag([1, 0.9, 1, 1, 1])).argmax(1) != held.argmax(1)).mean() > 0.05  # decisions flip beyond one point
    assert load_metric("cosine")(ort_scores(twin, held), None, ort_scores(model, held)) > 0.999  # which cosine cannot see
    score, drop, within, figures = guard.check(twin)
    assert not within and score == pytest.approx(1 - drop) and score < 0.95
    means, bound = figures.removesuffix(")").split(" (lower bound ")
    cosine, agreement = (float(f.split()[-1]) for f in means.removesuffix(" (scores)").split(", "))
    # One decision per sample: the bound of 64 samples' agreement sits below their mean, and is what is held.
    assert figures.startswith("cosine ") and cosine > 0.999 and agreement > score and float(bound) == pytest.approx(score, abs=1e-4)
    assert guard.describe() == ("the 90 % lower confidence bound of the mean cosine of each output at least 0.99 and argmax agreement "
                                "at least 0.99 (scores) on 64 held-out calibration samples")
    assert guard.check(model)[2]


def test_label_free_guard_does_not_read_an_embedding_as_decisions(tmp_path):
    """A 16-dim embedding of small values: its argmax is a near-tie that means nothing, so only the cosine holds it."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 0.1, (256, 16)).astype(np.float32)
    weights = rng.normal(0, 1, (16, 16))
    twin_weights = weights + rng.normal(0, 0.08, weights.shape)
    model, twin = _head(tmp_path, "model", weights), _head(tmp_path, "twin", twin_weights)
    guard = _label_free_guard(model, x)
    held = guard.data.inputs.take(64)["x"]
    assert ((held @ twin_weights).argmax(1) != (held @ weights).argmax(1)).mean() > 0.01  # the argmax moves beyond one point...
    score, _, within, figures = guard.check(twin)
    assert within and 0.99 <= score < 1  # ...but the cosine holds, and the cosine is what is held
    from optc.evaluation.metrics import bounded

    twin_out, reference = ort_scores(twin, held), ort_scores(model, held)
    mean = load_metric("cosine")(twin_out, None, reference)
    assert score == pytest.approx(bounded(load_metric("cosine"))(twin_out, None, reference)) and score < mean
    assert "(no output holds class scores to hold by argmax)" in guard.describe()
    assert figures == f"cosine {mean:.4f} (lower bound {score:.4f})"


def test_which_outputs_hold_class_scores():
    """The rule of optc.evaluation.fidelity.class_scores, on the kinds of output the zoo has."""
    from optc.evaluation.fidelity import class_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1, (40, 1, 50)) + 12 * np.eye(50)[rng.integers(0, 50, 40)][:, None]  # [T, 1, classes], time-major
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert class_scores(logits.astype(np.float32)).shape == (40, 50)
    assert class_scores(np.log(probabilities)).shape == (40, 50)  # log-softmax
    assert class_scores(probabilities[:, :, :, None, None].astype(np.float32)).shape == (40, 50)  # [N, C, 1, 1]
    assert class_scores(np.full((8, 2), 0.5)) is not None  # a two-way softmax, even undecided
    embedding = rng.normal(0, 1, (32, 384))
    assert class_scores(embedding / np.linalg.norm(embedding, axis=1, keepdims=True)) is None
    assert class_scores(rng.uniform(0, 1, (32, 88))) is None  # sigmoid multi-label (note posteriors)
    assert class_scores(rng.normal(0, 0.2, (32, 4))) is None  # box offsets, landmarks
    assert class_scores(rng.normal(0, 3, (32, 1))) is None and class_scores(rng.normal(0, 3, (32,))) is None  # one logit
    assert class_scores(logits.astype(np.int64)) is None  # class indices already decided: not scores
    assert class_scores(np.concatenate([logits, [[[np.nan] * 50]]])) is None
    # Features of a large scale: their softmax picks a top value as decisively as logits do, but it stands
    # barely above the next (openWakeWord's 96-value speech embedding, its 32-bin log-mel frames).
    wide = 8 * rng.normal(0, 1, (64, 96))
    assert np.mean(1 / np.exp(wide - wide.max(1, keepdims=True)).sum(1) >= 0.5) > 0.5  # the softmax test alone passes
    assert class_scores(wide) is None
    mel = np.cumsum(rng.normal(0, 4, (16, 50, 32)), axis=-1)  # neighbouring bins close: a smooth spectrum
    assert class_scores(mel) is None


def test_a_trained_classifiers_logits_are_class_scores():
    import onnx
    from helpers import ort_run

    from optc.evaluation.fidelity import class_scores

    test = np.load(SAMPLE / "test.npz")
    logits = next(iter(ort_run(onnx.load(str(SAMPLE / "mnist_cnn.onnx")), {"input": test["input"][:200]}).values()))
    assert class_scores(logits) is not None


def ort_scores(model, x):
    from optc.ir.session import make_session

    return {"scores": make_session(model).run(["scores"], {"x": x})[0]}


@pytest.mark.slow
def test_a_default_that_misses_runs_no_pipeline_twice(tmp_path, monkeypatch):
    """The run that missed the default budget is the search's first point, and the pipeline the search chose
    is written as the search ran it: every distill configuration runs once (before: the one asked for three
    times, the chosen one twice), and the model is the one a replay of pipeline.yaml, running every pass, gives."""
    import optc.passes.framework.manager as manager
    from optc.api import compile as compile_api
    from optc.driver import read_pipeline_file
    from optc.passes import parse_pass_specs

    runs: list[str] = []
    run_pass = manager._run
    monkeypatch.setattr(manager, "_run", lambda p, model, ctx: runs.append(repr(p)) or run_pass(p, model, ctx))
    asked = parse_pass_specs(["canonicalize", "distill"])
    # With --eval the passes fit on all of calib.npz, as a replay's do (without, on the part not held out).
    auto = compile_api(MODEL, asked, calibration=CALIB, evaluation=TEST, output=tmp_path / "auto", measure_latency=False)
    search = auto.report.search
    assert search is not None and any("misses the default budget" in n for n in auto.report.notes)
    assert search["points"][0]["passes"] == [repr(p) for p in asked] and not search["points"][0]["feasible"]
    # Passes ran in the first run and in the search, nowhere else; the search ran none of the first run's again.
    assert len(runs) == len(asked) + search["passes_run"]
    assert search["passes_reused"] >= len(asked)
    distills = [r for r in runs if r.startswith("distill")]
    assert len(distills) == len(set(distills)) == sum(1 for p in search["points"] if p["strengths"]["distill#5"]) >= 3
    chosen = search["chosen"]["passes"]
    assert auto.report.pipeline == tuple(chosen) and [p.name for p in auto.report.passes] == [s.split(":")[0] for s in chosen]
    assert auto.report.passes[-1].modified and auto.report.after.macs < auto.report.before.macs

    runs.clear()
    replay = compile_api(MODEL, read_pipeline_file(tmp_path / "auto" / "pipeline.yaml").passes, calibration=CALIB, evaluation=TEST,
                         output=tmp_path / "replay", measure_latency=False)
    assert runs == chosen  # a replay runs every pass: no search, nothing remembered from the run above
    assert (tmp_path / "replay" / "model.onnx").read_bytes() == (tmp_path / "auto" / "model.onnx").read_bytes()
    assert [p.to_dict() | {"seconds": 0} for p in replay.report.passes] == [p.to_dict() | {"seconds": 0} for p in auto.report.passes]
    assert replay.report.after == auto.report.after


def test_bounded_takes_outputs_whose_leading_axis_is_not_the_samples():
    """Silero VAD's state is [2, N, 128]: its per-'sample' cosines number 2, the probability's N. Bounded on its own
    (the zoo's Silero rows failed with 'setting an array element with a sequence' before)."""
    from optc.evaluation.metrics import bounded

    rng = np.random.default_rng(0)
    ref = {"p": rng.random((8, 1)).astype(np.float32), "state": rng.standard_normal((2, 8, 16)).astype(np.float32)}
    out = {"p": ref["p"] * 1.01, "state": ref["state"] + 0.05 * rng.standard_normal((2, 8, 16)).astype(np.float32)}
    for name in ("cosine", "fidelity"):
        plain, held = load_metric(name)(out, None, ref), bounded(load_metric(name))(out, None, ref)
        assert 0.9 < held < plain <= 1.0


def test_a_built_in_metric_that_fails_is_an_internal_error_and_bad_labels_a_clear_one():
    """The zoo's Silero rows failed inside the fidelity metric and were reported as 'metric fidelity raised ...',
    exit 2, as if the user's metric had failed. A built-in metric's own failure is optc's bug; labels that cannot
    match the outputs are the user's, said in one line."""
    top1 = load_metric("top1")
    with pytest.raises(ConfigError, match=r"no output holds class scores, class indices or probabilities for the 7 labels .* y float32 \[2, 10\]"):
        top1({"y": np.zeros((2, 10), np.float32)}, np.zeros(7, np.int64))
    with pytest.raises(ValueError):  # not a ConfigError: the CLI shows it as an internal error, exit 1
        load_metric("cosine")({"y": np.zeros((3, 4))}, None, {"y": np.zeros((2, 5))})
