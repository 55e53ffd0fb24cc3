"""sparsify allocation: sensitivity (OBS error curves) and OWL levels meet the global target."""
from __future__ import annotations

import numpy as np
import pytest

from optc.errors import ConfigError
from optc.passes.framework.options import build_config
from optc.passes.sparsify.sparsify import SparsifyConfig
from optc.passes.sparsify.allocation import LayerCosts, owl_counts, sensitivity_counts, uniform_counts
from test_sparsify import _run, _small_cnn


def _costs(scale: float, n: int, seed: int, outliers: float = 0.0) -> LayerCosts:
    costs = np.sort(np.random.default_rng(seed).exponential(scale, n))
    return LayerCosts(f"l{seed}", n, costs, outliers, costs)


def test_sensitivity_meets_the_total_and_minimises_the_estimate():
    layers = [_costs(1e-4, 1000, 0), _costs(1e-3, 3000, 1), _costs(1e-2, 500, 2)]
    counts = sensitivity_counts(layers, 0.5, 0.2)
    assert sum(counts) == sum(uniform_counts(layers, 0.5))
    for layer, count in zip(layers, counts):
        assert 0.3 * layer.units - 1 <= count <= 0.7 * layer.units + 1
    # Cheap layers absorb more zeros; the estimated total error is lower than any feasible move away.
    assert counts[0] / 1000 > 0.5 > counts[2] / 500
    estimate = lambda cs: sum(l.costs[:c].sum() for l, c in zip(layers, cs))
    assert estimate(counts) < estimate(uniform_counts(layers, 0.5))
    for a, b in [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2)]:
        moved = list(counts)
        moved[a] += 10
        moved[b] -= 10
        if all(0.3 * l.units - 1 <= c <= 0.7 * l.units + 1 for l, c in zip(layers, moved)):
            assert estimate(moved) >= estimate(counts)


def test_owl_gives_outlier_layers_fewer_zeros_at_the_same_mean():
    layers = [_costs(1, 1000, 0, outliers=0.01), _costs(1, 2000, 1, outliers=0.05), _costs(1, 1000, 2, outliers=0.03)]
    counts = owl_counts(layers, 0.6, 0.1)
    assert sum(counts) == sum(uniform_counts(layers, 0.6))
    levels = [c / l.units for c, l in zip(counts, layers)]
    assert levels[0] > levels[2] > levels[1]
    assert max(levels) - min(levels) <= 0.2 + 1e-3


def test_allocation_needs_a_free_level():
    with pytest.raises(ConfigError, match="allocation"):
        build_config("sparsify", SparsifyConfig, {"pattern": "2:4", "allocation": "sensitivity"})


@pytest.mark.parametrize("pattern", ["unstructured", "block:4x4"])
def test_sensitivity_pass_keeps_the_level_and_lowers_the_total_error(tmp_path, save, pattern):
    _, uniform, _ = _run(_small_cnn(), tmp_path, save, sparsity="0.6", pattern=pattern)
    _, sens, x = _run(_small_cnn(), tmp_path, save, sparsity="0.6", pattern=pattern, allocation="sensitivity", max_shift="0.2")
    # Same number of units (entries or tiles); edge tiles of the 5-row Gemm hold fewer entries.
    slack = 0 if pattern == "unstructured" else 0.03 * uniform.stats["params_sparsified"]
    assert sens.stats["nonzero_params"] == pytest.approx(uniform.stats["nonzero_params"], abs=slack)
    levels = [layer["sparsity"] for layer in sens.stats["layers"]]
    assert max(levels) - min(levels) > 0.05 and all(0.4 - 1e-6 <= s <= 0.8 + 1e-6 for s in levels)
    total = lambda r: sum(layer["rel_error"] for layer in r.stats["layers"])
    assert total(sens) < total(uniform)


def test_global_magnitude_uses_one_threshold_within_the_bounds(tmp_path, save):
    """No zeroed weight could swap with a kept one in another layer unless a level bound stops it."""
    model, result, _ = _run(_small_cnn(), tmp_path, save, sparsity="0.5", method="magnitude", allocation="global", max_shift="0.45")
    assert result.stats["nonzero_params"] == pytest.approx(result.stats["params_sparsified"] / 2, abs=1)
    new = {t.name: t for t in result.model.graph.initializer}
    layers = []
    for node, weight in [("conv1", "W1"), ("conv2", "W2"), ("fc", "G")]:
        before = np.abs(model.initializer_array(weight)).ravel()
        name = next(n.input[1] for n in result.model.graph.node if n.name == node)
        zeroed = result.model.initializer_array(new[name].name).ravel() == 0
        layers.append((before, zeroed))
    levels = [z.mean() for _, z in layers]
    assert levels[2] > 0.5 > levels[0]  # the Gemm's weights are 10x smaller: it takes most of the zeros
    for (wa, za), la in zip(layers, levels):
        for (wb, zb), lb in zip(layers, levels):
            if la > 0.05 + 0.01 and lb < 0.95 - 0.01:  # a could give a zero back, b could take one
                assert wa[za].max() <= wb[~zb].min() + 1e-7
