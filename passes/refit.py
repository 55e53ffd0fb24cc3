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

from optc.passes.layers import InputGram


@dataclass(frozen=True)
class Refit:
    weight: np.ndarray  # (out, len(keep)) float64
    bias_delta: np.ndarray  # (out,) float64: add to the layer's bias
    rel_error: float  # ||Y - Y_refit||^2 / ||Y||^2 on the calibration rows
    rel_error_plain: float  # the same error when the removed columns are simply dropped


def refit_columns(gram: InputGram, w: np.ndarray, keep: np.ndarray, *, group: int = 0, ridge: float = 1e-4, bias: bool = True) -> Refit:
    """Refit ``w`` (``out x in`` matrix) to the columns ``keep`` of its input.

    ``ridge`` is relative to the mean diagonal of the Gram so that it means the
    same thing for any activation scale; it pulls towards ``w[:, keep]``. Errors are computed in closed form from
    the same Gram, so reporting them costs no extra pass over the data.
    """
    g = gram.gram[group] / max(gram.rows, 1)
    s = gram.total[group] / max(gram.rows, 1)
    w = w.astype(np.float64)
    keep = np.asarray(keep, dtype=np.int64)
    k = len(keep)
    # Augmented second-moment matrix of [X, 1] restricted to the kept columns.
    a = np.empty((k + 1, k + 1))
    a[:k, :k] = g[np.ix_(keep, keep)]
    a[:k, k] = a[k, :k] = s[keep]
    a[k, k] = 1.0
    rhs = np.empty((k + 1, w.shape[0]))
    rhs[:k] = g[keep] @ w.T
    rhs[k] = s @ w.T
    if not bias:
        a, rhs = a[:k, :k], rhs[:k]
    lam = ridge * max(float(np.mean(np.diag(g))), 1e-12)
    a_reg = a.copy()
    a_reg[np.arange(k), np.arange(k)] += lam
    rhs[:k] += lam * w[:, keep].T
    try:
        sol = np.linalg.solve(a_reg, rhs)
    except np.linalg.LinAlgError:
        sol = np.linalg.lstsq(a_reg, rhs, rcond=None)[0]
    new_w = sol[:k].T
    delta = sol[k] if bias else np.zeros(w.shape[0])
    total = _energy(g, w)
    return Refit(new_w, delta, _error(g, s, w, keep, new_w, delta) / total, _error(g, s, w, keep, w[:, keep], np.zeros(w.shape[0])) / total)


def _energy(g: np.ndarray, w: np.ndarray) -> float:
    return max(float(np.einsum("oi,ij,oj->", w, g, w)), 1e-30)


def _error(g: np.ndarray, s: np.ndarray, w: np.ndarray, keep: np.ndarray, w_k: np.ndarray, b: np.ndarray) -> float:
    """Mean ||x W^T - (x_K W_K^T + b)||^2 over rows, expanded over the Gram."""
    full = np.zeros_like(w)
    full[:, keep] = w_k
    d = w - full  # the error is x D^T - b
    err = np.einsum("oi,ij,oj->", d, g, d) - 2.0 * float(b @ (d @ s)) + float(b @ b)
    return max(float(err), 0.0)
