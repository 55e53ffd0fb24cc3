"""Accuracy budgets and the strength search (optc.search) on the real sample CNN and on synthetic points."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import SAMPLE

from optc.data import CalibrationSet, LabelledSet
from optc.evaluation import MetricRunner, load_metric
from optc.ir.io import load_model
from optc.passes import PassContext, parse_pass_specs
from optc.search import Budget, Point, PrefixRunner, explore, fit_to_budget, pareto_front


def _point(cost: int, metric: float) -> Point:
    return Point({}, metric, 1 - metric, cost, cost, True)


def test_pareto_front_keeps_only_undominated_points():
    points = [_point(10, 0.9), _point(5, 0.8), _point(8, 0.95), _point(12, 0.95), _point(5, 0.7)]
    front = pareto_front(points, "bytes")
    assert [(p.bytes, p.metric) for p in front] == [(5, 0.8), (8, 0.95)]
    assert [p.pareto for p in points] == [False, True, True, False, False]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The sample CNN, its calibration set, and its 1,000 test digits split in two: one half
    the budget is measured on, the other held out from everything (the honest test)."""
    tmp = tmp_path_factory.mktemp("search")
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    with np.load(SAMPLE / "test.npz") as data:
        arrays = {k: data[k] for k in data.files}
    for name, part in (("budget", slice(0, 500)), ("held_out", slice(500, 1000))):
        np.savez(tmp / f"{name}.npz", **{k: v[part] for k, v in arrays.items()})
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    return model, calib, LabelledSet.from_path(tmp / "budget.npz", model), LabelledSet.from_path(tmp / "held_out.npz", model)


@pytest.mark.slow
def test_budget_scales_an_overreaching_pipeline_back_and_holds_on_held_out_data(sample):
    model, calib, budget_set, held_out = sample
    passes = parse_pass_specs(["canonicalize", "prune-channels:ratio=0.7"])
    top1 = load_metric("top1")
    runner = PrefixRunner(model, PassContext(calibration=calib))
    result = fit_to_budget(passes, runner, Budget(MetricRunner(top1, budget_set.inputs, budget_set.labels, model), 0.01), steps=4)
    full = result.points[0]
    assert not full.feasible, "ratio=0.7 should cost more than a point on this model"
    assert result.chosen.feasible and result.chosen.drop <= 0.01
    assert 0 < result.chosen.strengths["prune-channels#5"] < 0.7
    assert result.chosen.macs < result.points[1].macs  # compressed, not left alone (points[1]: strength 0)
    assert any("scaled to" in n for n in result.notes)
    # Judged on digits no pass and no search step saw.
    test = MetricRunner(top1, held_out.inputs, held_out.labels, model)
    assert test.drop(result.model) <= 0.02
    # The canonicalize prefix ran once and was reused by every later point.
    assert runner.passes_reused >= 4 * (len(result.points) - 1)


@pytest.mark.slow
def test_a_pipeline_within_budget_is_kept_as_asked(sample):
    model, calib, budget_set, _ = sample
    passes = parse_pass_specs(["canonicalize", "prune-channels:ratio=0.2"])
    runner = PrefixRunner(model, PassContext(calibration=calib))
    result = fit_to_budget(passes, runner, Budget(MetricRunner(load_metric("top1"), budget_set.inputs, budget_set.labels, model), 0.02))
    assert len(result.points) == 1 and result.chosen.strengths == {"prune-channels#5": 0.2}


@pytest.mark.slow
def test_explore_publishes_every_improvement_and_marks_the_front(sample):
    model, calib, budget_set, _ = sample
    passes = parse_pass_specs(["prune-channels:ratio=0.7", "quantize"])
    cosine = MetricRunner(load_metric("cosine"), budget_set.inputs, None, model)
    published = []
    result = explore(passes, PrefixRunner(model, PassContext(calibration=calib)), Budget(cosine, 0.01), objective="bytes",
                     time_budget_s=120, on_improve=lambda p, m, ps: published.append(p.bytes))
    assert published == sorted(published, reverse=True) and published[-1] == result.best.bytes
    assert result.best.feasible and result.best.chosen and result.best.pareto
    assert all(not q.feasible or q.bytes >= result.best.bytes for q in result.points)
    assert result.best.bytes < result.points[1].bytes or result.points[0].feasible


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["cosine", "fidelity"])
def test_a_lossy_pass_without_a_scalable_strength_that_misses_is_left_out(sample, metric):
    """quantize with every layer forced int8 and a zero budget: no strength to scale, so it falls back
    per layer, judged by the pass's measure nearest the budget's, then tighter, then the floor is the
    pipeline without it (once this re-measured nothing and returned the missing point)."""
    model, calib, budget_set, _ = sample
    passes = parse_pass_specs(["canonicalize", "quantize:reduce_range=true,calibrator=minmax"])
    runner = PrefixRunner(model, PassContext(calibration=calib))
    result = fit_to_budget(passes, runner, Budget(MetricRunner(load_metric(metric), budget_set.inputs, None, model), 1e-7))
    assert not result.points[0].feasible
    fallbacks = [p.passes[-1] for p in result.points[1:3]]
    assert "max_drop=5e-08" in fallbacks[0] and "max_drop=1.25e-08" in fallbacks[1], fallbacks
    assert all(f"metric={metric}," in f for f in fallbacks), fallbacks
    assert [n.split(" (")[0] for n in result.notes[:2]] == ["quantize: its most sensitive layers fall back"] * 2
    assert result.chosen.feasible
    assert all(p.name != "quantize" for p in result.passes)


@pytest.mark.slow
def test_a_search_out_of_time_leaves_out_what_still_misses_and_gives_a_fallback_only_the_time_left(sample):
    """The default budget's search is bounded (guard.SEARCH_LIMIT_S): PicoDet's quantize tried fallbacks for
    over 1,000 s. Out of time, a pass without a scalable strength that still misses is left out, saying so."""
    model, calib, budget_set, _ = sample
    passes = parse_pass_specs(["canonicalize", "quantize:reduce_range=true,calibrator=minmax"])
    budget = Budget(MetricRunner(load_metric("cosine"), budget_set.inputs, None, model), 1e-7)
    spent = fit_to_budget(passes, PrefixRunner(model, PassContext(calibration=calib)), budget, limit_s=1e-9)
    assert len(spent.points) == 2 and not spent.points[0].feasible and spent.chosen.feasible  # as asked, then without it
    assert all(p.name != "quantize" for p in spent.passes)
    assert spent.notes[0].startswith("quantize: left out, the search's 1e-09 s ran out before the budget held with it")
    timed = fit_to_budget(passes, PrefixRunner(model, PassContext(calibration=calib)), budget, limit_s=120)
    budgets = [float(p.passes[-1].split("time_budget_s=")[1].split(",")[0].rstrip(")")) for p in timed.points[1:3]]
    assert len(budgets) == 2 and all(0 < b <= 120 for b in budgets), budgets  # each fallback had at most the search's time left, not its 300 s


def test_other_orders_move_only_the_float_passes():
    from optc.search.explore import other_orders

    passes = parse_pass_specs(["canonicalize", "distill", "prune-channels", "quantize"])
    names = [[p.name for p in order] for order in other_orders(passes)]
    canon = ["fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code"]
    assert names == [canon + ["prune-channels", "distill", "quantize"]]
    assert other_orders(parse_pass_specs(["prune-channels", "quantize"])) == []
    assert len(other_orders(parse_pass_specs(["distill", "prune-channels", "sparsify", "quantize"]))) == 5


@pytest.mark.slow
def test_explore_searches_the_other_order_with_time_left(sample):
    model, calib, budget_set, _ = sample
    # Too strong together, so a search; cheap variants of both passes keep the test short.
    passes = parse_pass_specs(["sparsify:sparsity=0.9,method=magnitude", "prune-channels:ratio=0.7,reconstruct=none,criterion=l1"])
    cosine = MetricRunner(load_metric("cosine"), CalibrationSet.from_arrays({"input": budget_set.inputs.take(64)["input"]}, model), None, model)
    result = explore(passes, PrefixRunner(model, PassContext(calibration=calib)), Budget(cosine, 0.01), objective="bytes",
                     time_budget_s=600)
    orders = {tuple(name.split(":")[0] for name in p.passes) for p in result.points if len(p.passes) == 2}
    assert orders == {("sparsify", "prune-channels"), ("prune-channels", "sparsify")}
    assert "every order of the float passes searched" in result.stopped
    assert result.best.feasible and all(not q.feasible or q.bytes >= result.best.bytes for q in result.points)


def test_a_search_captures_each_input_gram_and_factor_once(sample, monkeypatch):
    """Every strength the search tries runs the pass on the same input model: its calibration
    capture and its inverse-Hessian factors are computed at the first and reused after."""
    import optc.passes.layers.grams as grams
    import optc.passes.numerics.obs as obs

    model, calib, _, _ = sample
    monkeypatch.setattr(grams, "_GRAMS", grams.OrderedDict())
    monkeypatch.setattr(obs, "_FACTORS", obs.OrderedDict())
    captures, factors = [], []
    capture, factor = grams.capture_activations, obs._factor
    monkeypatch.setattr(grams, "capture_activations", lambda *a, **k: captures.append(1) or capture(*a, **k))
    monkeypatch.setattr(obs, "_factor", lambda h, damp: factors.append((h.tobytes(), damp)) or factor(h, damp))
    passes = parse_pass_specs(["canonicalize", "sparsify:sparsity=0.95"])
    cosine = MetricRunner(load_metric("cosine"), calib, None, model)
    result = fit_to_budget(passes, PrefixRunner(model, PassContext(calibration=calib)), Budget(cosine, 1e-4), steps=3)
    runs = sum(1 for p in result.points if p.strengths["sparsify#5"] > 0)
    assert runs >= 3
    assert len(captures) == 1
    assert factors and len(factors) == len(set(factors))  # each distinct Hessian factored once, not once per run
