"""Least-squares refit of a linear layer that loses some of its input columns.

When channels feeding a layer are removed (channel pruning, a narrower MLP),
the layer can still reproduce most of its original output from the columns that
remain: with calibration inputs X (rows) and weight W (out x in), solve

    min over W_K, b   || X W^T  -  (X_K W_K^T + 1 b^T) ||^2  +  lam ||W_K - W[:, K]||^2

The normal equations only need the Gram matrix of the *original* input
(``G = X^T X``, ``s = X^T 1``, ``n`` rows), which :func:`optc.passes.layers.input_grams`
already streams: ``[G_KK s_K; s_K^T n] [W_K^T; b^T] = [G_K: W^T; s^T W^T]``.
The bias row is what folds the mean contribution of the removed channels back
in (He et al., 2017); without it only the kept columns are rescaled.

The ridge pulls towards the *original* weights, not towards zero: when the
removed columns are constant or dead the original weights plus a bias shift
already fit exactly, and the ridge then costs nothing (a zero-pulling ridge
would shrink every weight a little). The bias is not penalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.passes.numerics.grams import InputGram, PairedGram, output_energy


@dataclass(frozen=True)
class Refit:
    weight: np.ndarray  # (out, k) float64
    bias_delta: np.ndarray  # (out,) float64: add to the layer's bias
    rel_error: float  # ||Y - Y_refit||^2 / ||Y||^2 on the calibration rows
    rel_error_plain: float  # the same error with the prior weights and no bias change


def refit_columns(gram: InputGram, w: np.ndarray, keep: np.ndarray, *, group: int = 0, ridge: float = 1e-4, bias: bool = True) -> Refit:
    """Refit ``w`` (``out x in`` matrix) to the columns ``keep`` of its input.

    ``ridge`` is relative to the mean diagonal of the Gram so that it means the
    same thing for any activation scale; it pulls towards ``w[:, keep]``.
    Errors are computed in closed form from the same Gram, so reporting them
    costs no extra pass over the data.
    """
    n = max(gram.rows, 1)
    g = gram.gram[group] / n
    s = gram.total[group] / n
    keep = np.asarray(keep, dtype=np.int64)
    w = w.astype(np.float64)
    return refit_from_moments(g[np.ix_(keep, keep)], s[keep], g[keep] @ w.T, s @ w.T, output_energy(w, g), w[:, keep], ridge=ridge, bias=bias)


def refit_paired(pg: PairedGram, w: np.ndarray, prior: np.ndarray, *, group: int = 0, ridge: float = 1e-4, bias: bool = True) -> Refit:
    """Refit so that the layer on the fitted model's input (``a``) reproduces ``w`` on the reference input (``b``).

    ``w`` (``out x d_ref``) is the reference layer's weight matrix, ``prior``
    (``out x d_fit``) the weights the fitted model has now. Without ``pg.bb``,
    ``pg.energy`` must be that of ``w`` (group 0), and without ``pg.ab``, ``pg.ay`` its cross moment.
    """
    n = max(pg.rows, 1)
    w = w.astype(np.float64)
    if pg.bb is None:
        if pg.energy is None or group != 0:
            raise ValueError("refit_paired: the paired Gram holds neither B B^T nor the target's energy")
        target = pg.energy / n
    else:
        target = output_energy(w, pg.bb[group] / n)
    if pg.ab is None:
        if pg.ay is None or group != 0:
            raise ValueError("refit_paired: the paired Gram holds neither A B^T nor the target's cross moment")
        ay = pg.ay / n
    else:
        ay = (pg.ab[group] / n) @ w.T
    return refit_from_moments(
        pg.aa[group] / n, pg.sum_a[group] / n, ay, (pg.sum_b[group] / n) @ w.T, target, prior.astype(np.float64), ridge=ridge, bias=bias,
    )


def refit_from_moments(aa, sa, ay, sy, target: float, prior, *, ridge: float, bias: bool) -> Refit:
    """Solve ``min E||y - (x_a W'^T + b)||^2 + lam ||W' - prior||^2`` from per-row moments.

    ``aa = E[x_a x_a^T]``, ``sa = E[x_a]``, ``ay = E[x_a y^T]``, ``sy = E[y]`` and
    ``target = E||y||^2``, the target ``y`` being ``x_b W^T``. Normal equations over
    ``z = [x_a, 1]``: ``E[z z^T] [W'^T; b^T] = E[z y^T]`` (plus the ridge on the weight rows).
    Only ``E[z y^T]`` is needed of the cross moments, so a caller may sum ``x_a y^T``
    directly (``out`` columns) instead of ``x_a x_b^T`` (``d_ref`` columns).
    """
    k = len(sa)
    out = len(sy)
    zz = np.empty((k + 1, k + 1))
    zz[:k, :k] = aa
    zz[:k, k] = zz[k, :k] = sa
    zz[k, k] = 1.0
    zy = np.vstack([ay, sy[None]])  # E[z y^T]
    lam = ridge * max(float(np.mean(np.diag(aa))) if k else 0.0, 1e-12)
    size = k + 1 if bias else k
    a_reg = zz[:size, :size].copy()
    a_reg[np.arange(k), np.arange(k)] += lam
    b_reg = zy[:size].copy()
    b_reg[:k] += lam * prior.T
    try:
        sol = np.linalg.solve(a_reg, b_reg)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(a_reg, b_reg, rcond=None)[0]
    theta = np.vstack([sol, np.zeros((1, out))]) if not bias else sol
    energy = max(target, 1e-30)
    plain = np.vstack([prior.T, np.zeros((1, out))])
    return Refit(theta[:k].T, theta[k], _error(theta, zz, zy, target) / energy, _error(plain, zz, zy, target) / energy)


def _error(theta: np.ndarray, zz: np.ndarray, zy: np.ndarray, target: float) -> float:
    """``E||y - z theta||^2`` expanded over the moments (``zy = E[z y^T]``, ``target = E||y||^2``)."""
    err = target - 2.0 * np.sum(theta * zy) + np.sum(theta * (zz @ theta))
    return max(float(err), 0.0)
