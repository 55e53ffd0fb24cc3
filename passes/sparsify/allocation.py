"""Per-layer sparsity levels that meet a global target (``sparsify:allocation=...``).

``uniform``: every layer loses ``round(s * units)`` units (entries or tiles).

``sensitivity``: a closed-form error curve per layer from the OBS layer
objective. Removing entry ``(i, j)`` of ``W`` and re-fitting the rest of row
``i`` on the damped Hessian ``H`` costs ``w_ij^2 / [H^-1]_jj`` (Optimal Brain
Surgeon); a tile costs the sum over its entries. Sorting a layer's costs
ascending and dividing their running sum by the layer's output energy
``tr(W G W^T)`` gives ``e_l(k)``, the relative error of pruning its ``k``
cheapest units, an estimate that ignores the interaction of removals (the
sweep re-fits as it goes). The ``e_l`` are convex (running sums of sorted
costs), so the allocation that minimises ``sum_l e_l(k_l)`` subject to
``sum_l k_l = K`` takes the ``K`` smallest normalised costs over all layers; each
layer is first held inside ``s +- max_shift`` so no layer is left dense or
emptied on the strength of an estimate. ``K`` is the uniform allocation's total.

``global``: global magnitude pruning, the classic baseline. One threshold on
``w^2`` (a tile's sum of ``w^2`` for blocks) over all layers: the ``K`` smallest
units of the whole model, each layer again held inside ``s +- max_shift`` (a
pure global threshold can empty a layer whose weights are small). Inside each
layer the method (``magnitude`` or ``obs``) still picks the units.

``owl`` (Yin et al., Outlier Weighed Layerwise sparsity, 2024): a layer's
outlier ratio ``D_l`` is the fraction of its entries whose score
``|w_ij| * ||x_j||`` exceeds ``owl_m`` times the layer mean. Levels are
``s_l = 1 - D_l`` mapped linearly onto ``[s - max_shift, s + max_shift]`` (more
outliers, less sparsity), then shifted so the unit-weighted mean is ``s``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.passes.numerics.obs import inverse_hessian_factor
from optc.passes.sparsify.patterns import SparsityPattern, output_energy, tile_sums, units


@dataclass(frozen=True)
class LayerCosts:
    """One layer's units and the OBS cost of each, for allocation."""

    node: str
    units: int
    costs: np.ndarray  # per unit, ascending, divided by the layer's output energy
    outlier_ratio: float
    magnitudes: np.ndarray  # per unit w^2 (tile sums), ascending


def layer_costs(node: str, parts: list[np.ndarray], grams: np.ndarray, rows: int, pattern: SparsityPattern, damp: float, owl_m: float) -> LayerCosts:
    """Normalised OBS costs of every unit of a layer (all its groups), and its OWL outlier ratio.

    ``parts`` are the per-group ``(out, in)`` matrices, ``grams`` the undamped
    ``(groups, in, in)`` sums ``X X^T`` over ``rows`` rows.
    """
    costs, magnitudes, scores, energy = [], [], [], 0.0
    for w, gram in zip(parts, grams):
        h = gram / max(rows, 1)
        u = inverse_hessian_factor(h, damp)
        inv_diag = np.sum(u * u, axis=0)  # diag(U^T U) = diag(H^-1)
        costs.append(_per_unit(w**2 / inv_diag, pattern))
        magnitudes.append(_per_unit(w**2, pattern))
        scores.append((np.abs(w) * np.sqrt(np.maximum(np.diag(h), 0))).ravel())
        energy += output_energy(w, h)
    all_costs = np.sort(np.concatenate(costs)) / max(energy, 1e-300)
    score = np.concatenate(scores)
    outliers = float(np.mean(score > owl_m * score.mean())) if score.size else 0.0
    count = sum(units(p.shape, pattern) for p in parts)
    return LayerCosts(node, count, all_costs, outliers, np.sort(np.concatenate(magnitudes)))


def _per_unit(entry_costs: np.ndarray, pattern: SparsityPattern) -> np.ndarray:
    """Entry costs summed per unit (an entry, or an ``r x c`` tile), flat."""
    return (tile_sums(entry_costs, pattern) if pattern.kind == "block" else entry_costs).ravel()


def uniform_counts(layers: list[LayerCosts] | list[int], sparsity: float) -> list[int]:
    """``round(s * units)`` per layer (``layers`` as costs or as unit counts)."""
    sizes = [l.units if isinstance(l, LayerCosts) else l for l in layers]
    return [int(round(sparsity * n)) for n in sizes]


def sensitivity_counts(layers: list[LayerCosts], sparsity: float, max_shift: float) -> list[int]:
    """Units to prune per layer: the uniform total, spent on the globally cheapest normalised costs."""
    return _cheapest_counts(layers, [l.costs for l in layers], sparsity, max_shift)


def global_magnitude_counts(layers: list[LayerCosts], sparsity: float, max_shift: float) -> list[int]:
    """Units to prune per layer: the uniform total, spent on the smallest weights of the whole model."""
    return _cheapest_counts(layers, [l.magnitudes for l in layers], sparsity, max_shift)


def _cheapest_counts(layers: list[LayerCosts], costs: list[np.ndarray], sparsity: float, max_shift: float) -> list[int]:
    """The uniform total of units, taken where ``costs`` (each ascending) are smallest, each layer within ``sparsity +- max_shift``."""
    total = sum(uniform_counts(layers, sparsity))
    lo = [int(np.ceil(max(sparsity - max_shift, 0.0) * l.units - 1e-9)) for l in layers]
    hi = [int(np.floor(min(sparsity + max_shift, 1.0) * l.units + 1e-9)) for l in layers]
    free = total - sum(lo)
    if free <= 0:
        return lo
    candidates = np.concatenate([c[a:b] for c, a, b in zip(costs, lo, hi)])
    owner = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(zip(lo, hi))])
    chosen = np.argpartition(candidates, free - 1)[:free] if free < candidates.size else np.arange(candidates.size)
    extra = np.bincount(owner[chosen], minlength=len(layers))
    return [a + int(e) for a, e in zip(lo, extra)]


def owl_counts(layers: list[LayerCosts], sparsity: float, max_shift: float) -> list[int]:
    """OWL levels: fewer zeros where the outlier ratio is high, unit-weighted mean ``sparsity``."""
    ratios = np.array([l.outlier_ratio for l in layers])
    sizes = np.array([l.units for l in layers], dtype=np.float64)
    span = ratios.max() - ratios.min()
    if span <= 0:
        return uniform_counts(layers, sparsity)
    levels = sparsity + max_shift - 2 * max_shift * (ratios - ratios.min()) / span
    levels += sparsity - float(np.sum(levels * sizes) / sizes.sum())
    levels = np.clip(levels, 0.0, 0.99)
    counts = np.rint(levels * sizes).astype(int)
    # Rounding and clipping: settle the difference on the largest layers.
    diff = sum(uniform_counts(layers, sparsity)) - int(counts.sum())
    for i in np.argsort(-sizes):
        if diff == 0:
            break
        step = int(np.clip(diff, -counts[i], sizes[i] - counts[i]))
        counts[i] += step
        diff -= step
    return [int(c) for c in counts]
