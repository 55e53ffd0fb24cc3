"""The column-by-column OBS sweep shared by SparseGPT pruning and GPTQ rounding.

For a weight row ``w`` and the layer-input Hessian ``H = E[x x^T]`` the
reconstruction loss of a changed row is ``(w - w') H (w - w')^T``. Forcing
weight ``j`` to a value ``q`` (zero when pruning, a grid point when rounding)
and re-fitting the weights not yet processed costs ``(w_j - q)^2 / [H^-1]_jj``
and moves them by ``-((w_j - q) / [H^-1]_jj) H^-1_{j,:}``. Processing columns
left to right, the inverse Hessian of the remaining columns is the trailing
block of ``U^T U`` with ``U`` the upper Cholesky factor of ``H^-1``; its row
``j`` (scaled by ``U_jj``) is the update for column ``j``, so one factorisation
serves all rows (Frantar et al.: OBC, GPTQ 2022, SparseGPT 2023).

Updates inside a block of columns are applied column by column; the block's
accumulated error reaches the later columns in one matrix product ("lazy
batch"). What a column becomes is decided by a :class:`ColumnRule`: the
sweep itself knows nothing of sparsity patterns or integer grids.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol

import numpy as np


class ColumnRule(Protocol):
    """Decides the new value of each column as the sweep reaches it."""

    def start_block(self, start: int, block: np.ndarray, diag: np.ndarray) -> None:
        """Called when columns ``start: start + block.shape[1]`` (current values ``block``) begin."""

    def column(self, j: int, block: np.ndarray, diag: np.ndarray) -> np.ndarray:
        """The new values of column ``j`` of the block (``block[:, j]`` holds the updated weights)."""


def inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), ``H`` symmetric PSD.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J``
    (upper triangular, positive diagonal, and ``U^T U = J L^-T L^-1 J = H^-1``):
    one Cholesky and one triangular inverse (:func:`inverse_lower`) instead of
    inverting ``H`` and factorising the inverse. ``damp * mean(diag H)`` is added
    to the diagonal first; it is raised tenfold (up to 1.0) while the matrix is not
    positive definite.

    The last factors are remembered (bounded by bytes) by the content of ``H`` and
    ``damp``: the default budget's search runs sparsify (or quantize) at several
    strengths on the same Hessians, and the factor is most of a run (MiniLM's 1536-wide
    Cholesky: 1 s on two loaded cores). The remembered factor is read-only.
    """
    h = np.asarray(h, dtype=np.float64)
    key = (hashlib.blake2b(np.ascontiguousarray(h).tobytes(), digest_size=16).digest(), h.shape, float(damp))
    u = _FACTORS.get(key)
    if u is not None:
        _FACTORS.move_to_end(key)
        return u
    u = _factor(h, damp)
    if u.nbytes <= FACTORS_MAX_BYTES:
        u.flags.writeable = False
        _FACTORS[key] = u
        while sum(v.nbytes for v in _FACTORS.values()) > FACTORS_MAX_BYTES:
            _FACTORS.popitem(last=False)
    return u


_FACTORS: OrderedDict[tuple, np.ndarray] = OrderedDict()
FACTORS_MAX_BYTES = 256 << 20


def _factor(h: np.ndarray, damp: float) -> np.ndarray:
    scale = max(float(np.mean(np.diag(h))), 1e-12)
    eye = np.eye(h.shape[0])
    flipped = h[::-1, ::-1]
    while True:
        try:
            lower = np.linalg.cholesky(flipped + damp * scale * eye)
            break
        except np.linalg.LinAlgError:
            if damp >= 1.0:
                raise
            damp = max(damp * 10, 1e-6)
    return np.ascontiguousarray(inverse_lower(lower)[::-1, ::-1])


def inverse_lower(lower: np.ndarray, base: int = 128) -> np.ndarray:
    """``L^-1`` of a lower triangular ``L``, by halves: ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``.

    numpy has no triangular inverse; its general ``inv`` (an LU solve against the
    identity) costs four times the products this does (MiniLM's 1536-wide Hessian:
    0.31 s against 0.07 s on one core). Blocks of ``base`` or fewer go to ``inv``.
    """
    n = lower.shape[0]
    if n <= base:
        return np.linalg.inv(lower)
    k = n // 2
    a_inv = inverse_lower(lower[:k, :k], base)
    d_inv = inverse_lower(lower[k:, k:], base)
    out = np.zeros_like(lower)
    out[:k, :k] = a_inv
    out[k:, k:] = d_inv
    out[k:, :k] = -(d_inv @ lower[k:, :k]) @ a_inv
    return out


def obs_sweep(w: np.ndarray, u: np.ndarray, rule: ColumnRule, *, block_size: int = 128) -> np.ndarray:
    """``w`` (rows, cols) with every column set by ``rule`` and the error pushed onto later columns.

    ``u`` is :func:`inverse_hessian_factor` of the ``(cols, cols)`` Hessian.
    Returns a new float64 matrix; column ``j`` holds exactly what ``rule`` returned for it.
    """
    w = np.array(w, dtype=np.float64)
    cols = w.shape[1]
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        rule.start_block(i1, w1, d)
        for j in range(i2 - i1):
            q = rule.column(j, w1, d)
            e = (w1[:, j] - q) / d[j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w
