"""distill's target_reduction allocation: the least-total choice is optimal for what it saves
(checked by brute force), reaches its target in params or MACs, and the pass honours it."""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pytest
from helpers import make_model, ort_run, rand, run_checked
from onnx import helper

from optc.ir import infer_shapes, load_model
from optc.ir.stats import compute_stats
from optc.data import CalibrationSet
from optc.passes import PassContext
from optc.passes.distill.allocation import allocate, common_budget, least_total_budgets


@dataclass(frozen=True)
class Curve:
    """A candidate's sizes as the allocation sees them: error and params removed, largest saving first."""

    key: str
    errors: np.ndarray
    saved: np.ndarray

    @property
    def params(self) -> int:
        return int(self.saved.max()) + 1

    def tradeoff(self):
        return self.errors, self.saved

    def removed(self, budget: float) -> int:
        ok = np.nonzero(self.errors <= budget)[0]
        return int(self.saved[ok].max()) if ok.size else 0


def _curves(seed: int) -> list[Curve]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(4):
        n = int(rng.integers(2, 5))
        saved = np.sort(rng.integers(1, 100, n))[::-1].astype(float)
        errors = np.sort(rng.uniform(0, 1, n))[::-1] * rng.uniform(0.05, 1)  # relative errors: more saved, more error
        out.append(Curve(f"c{i}", errors, saved))
    return out


def _chosen(curves, budgets):
    """(total saved, total error) of the sizes the budgets pick."""
    saved = error = 0.0
    for c in curves:
        ok = np.nonzero(c.errors <= budgets[c.key])[0]  # none under KEEP: the teacher stays
        if not ok.size:
            continue
        i = ok[np.argmax(c.saved[ok])]
        saved, error = saved + c.saved[i], error + c.errors[i]
    return saved, error


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_least_total_is_optimal_for_what_it_saves(seed, fraction):
    curves = _curves(seed)
    weights = {c.key: 1.0 + int(c.key[1:]) for c in curves}  # e.g. MACs per param differ by layer
    wcurves = [Curve(c.key, c.errors, c.saved * weights[c.key]) for c in curves]
    target = fraction * sum(c.saved.max() for c in wcurves)
    saved, error = _chosen(wcurves, least_total_budgets(curves, weights, target))
    assert saved >= target
    # No combination of sizes (the teacher included) saving as much has less summed error.
    options = [[(0.0, 0.0)] + list(zip(c.saved, c.errors)) for c in wcurves]
    for combo in itertools.product(*options):
        if sum(s for s, _ in combo) >= saved:
            assert sum(e for _, e in combo) >= error - 1e-12
    # The common budget reaches the target too, with the same error everywhere (its worst is the least).
    b = common_budget(curves, weights, target)
    assert _chosen(wcurves, {c.key: b for c in curves})[0] >= target


def test_unreachable_target_saves_everything_it_can():
    curves = _curves(1)
    budgets = allocate(curves, {c.key: 1.0 for c in curves}, 1e9, "least-total")
    assert budgets == {c.key: float(c.errors[np.argmax(c.saved)]) for c in curves}
    assert allocate(curves, {c.key: 1.0 for c in curves}, 1e9, "common") == {c.key: 1.0 for c in curves}


def _two_convs():
    """conv_a at full resolution holds the MACs, conv_b (stride 2, wider) the params."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "Wa", "Ba"], ["a"], pads=[1, 1, 1, 1], name="conv_a"),
            helper.make_node("Relu", ["a"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "Wb", "Bb"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2], name="conv_b"),
        ],
        [("x", ["N", 8, 16, 16])],
        [("y", ["N", 16, 8, 8])],
        [("Wa", rand(16, 8, 3, 3, seed=1) / 8), ("Ba", rand(16, seed=2)), ("Wb", rand(16, 16, 3, 3, seed=3) / 12), ("Bb", rand(16, seed=4))],
    )


@pytest.mark.parametrize("allocation", ["common", "least-total"])
def test_macs_target_is_reached_and_measured(save, allocation):
    proto = _two_convs()
    path = save(proto)
    model = load_model(path)
    infer_shapes(model)
    x = np.random.default_rng(5).standard_normal((32, 8, 16, 16)).astype(np.float32)
    x[:, 4:] *= 0.05  # anisotropic inputs: the whitened fit has something to find
    np.savez(path.with_name("calib.npz"), x=x)
    ctx = PassContext(calibration=CalibrationSet.from_path(path.with_name("calib.npz"), model))
    options = {"target_reduction": 0.3, "reduce": "macs", "allocation": allocation, "min_reduction": 0.05}
    result = run_checked("distill", model, ctx, **options)
    assert result.modified
    after = result.model
    infer_shapes(after)
    base = compute_stats(model).macs
    assert 1 - compute_stats(after).macs / base >= 0.3
    assert result.stats["macs_removed"] == base - compute_stats(after).macs
    assert result.stats["target"] == f"30% of the macs, {allocation} allocation"
    # The report's model-output error is what onnxruntime measures.
    y, got = ort_run(proto, {"x": x})["y"].astype(np.float64), ort_run(after.proto, {"x": x})["y"].astype(np.float64)
    assert ((y - got) ** 2).sum() / (y**2).sum() == pytest.approx(result.stats["global"]["rel_mse"], rel=1e-3, abs=1e-7)
    # Counted in params instead, the same fraction is of the candidates' params.
    by_params = run_checked("distill", model, ctx, **{**options, "reduce": "params"})
    assert by_params.stats["params_removed"] >= 0.3 * by_params.stats["candidate_params"]
