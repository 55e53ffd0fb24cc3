"""Low-rank factorisation of a linear layer, fitted to its calibration inputs.

A layer computes ``y = M x`` with ``M`` of shape ``(out, in)``; over the
calibration rows ``X`` (columns ``x``) the data objective of a rank-``r``
student ``M_r = L R`` (``L``: ``out x r``, ``R``: ``r x in``) is

    err(r) = ||(M - M_r) X||_F^2 / rows = tr((M - M_r) H (M - M_r)^T),   H = X X^T / rows.

*Plain SVD* truncates ``M = U S V^T`` and minimises the weight error
``||M - M_r||_F``, which is the data error only when ``H`` is a multiple of I.

*Whitened SVD* (SVD-LLM): factor the damped ``H + d I = C C^T`` (Cholesky),
take the SVD ``M C = U S V^T`` and keep ``L = U_r S_r``, ``R = V_r^T C^-1``.
Then ``(M - M_r) C = sum_{i>r} s_i u_i v_i^T``, so each dropped singular value
adds exactly ``s_i^2`` to the damped objective: the truncation is optimal for
the data, and exact whenever ``M`` has rank ``r`` (``M C`` then has rank r).

*ASVD* (activation-aware SVD, Yuan et al. 2023) scales the input channels by
their activation magnitude instead of whitening: ``C = diag(s)`` with
``s_j = rms(x_j)^alpha`` (the RMS comes from the Gram's diagonal, which is what
is streamed; the paper's mean ``|x_j|`` would need another pass). It weighs
channels that carry large activations (outlier features) without modelling their
correlations, so it sits between plain and whitened SVD; ``R = V_r^T C^-1``
as above.

All three share one closed form for the *undamped* data error of every rank
at once. With ``M = sum_i L_i R_i`` (columns ``L_i = s_i u_i`` orthogonal):

    err(r) = sum_{i>r} s_i^2 * (R_i H R_i^T),

because the cross terms carry ``u_i^T u_j = 0``. Rank selection therefore needs
one decomposition per layer and no extra passes over the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LowRankSpectrum:
    """``M = left @ right`` split into rank-1 terms ordered by importance, with the data error of each truncation."""

    left: np.ndarray  # (out, k), orthogonal columns
    right: np.ndarray  # (k, in)
    error: np.ndarray  # (k + 1,): err(r) for r = 0..k, in data units (per row)
    energy: float  # ||M X||^2 / rows, the denominator of the relative error

    @property
    def max_rank(self) -> int:
        return self.left.shape[1]

    def relative_error(self, rank: int) -> float:
        """``||(M - M_r) X||^2 / ||M X||^2`` for the rank-``rank`` truncation."""
        rank = min(max(rank, 0), self.max_rank)
        return float(self.error[rank] / self.energy) if self.energy > 0 else 0.0

    def smallest_rank(self, budget: float) -> int:
        """The smallest rank whose relative data error is within ``budget`` (at least 1)."""
        rel = self.error / self.energy if self.energy > 0 else np.zeros_like(self.error)
        ok = np.nonzero(rel <= budget)[0]
        return max(int(ok[0]) if ok.size else self.max_rank, 1)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """``(L, R)`` with ``L @ R`` the rank-``rank`` student of ``M``."""
        return self.left[:, :rank], self.right[:rank]


def whitening_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Lower-triangular ``C`` with ``C C^T = H + damp * mean(diag H) I``.

    The damping keeps ``C`` invertible when the calibration inputs do not span
    every direction (dead features, fewer rows than features).
    """
    scale = max(float(np.mean(np.diag(h))), 1e-12)
    eye = np.eye(h.shape[0])
    for extra in (damp, 10 * damp, 1e-2, 1e-1):
        try:
            return np.linalg.cholesky(h + max(extra, 1e-10) * scale * eye)
        except np.linalg.LinAlgError:
            continue  # rounding made H + dI indefinite: damp harder
    raise np.linalg.LinAlgError("input covariance is not positive definite even after damping")


METHODS = ("whitened", "asvd", "plain")


def asvd_scale(h: np.ndarray, alpha: float) -> np.ndarray:
    """ASVD's per-channel scale ``rms(x_j)^alpha``; dead channels get a small floor so ``C`` stays invertible."""
    rms = np.sqrt(np.maximum(np.diag(h), 0.0))
    floor = max(float(rms.mean()), 1e-12) * 1e-3
    return np.maximum(rms, floor) ** alpha


def fit_low_rank(m: np.ndarray, h: np.ndarray, *, method: str = "whitened", damp: float = 0.01, alpha: float = 0.5) -> LowRankSpectrum:
    """Decompose ``m`` (out x in) for truncation under the input second moment ``h`` (in x in, ``X X^T / rows``).

    Only the smaller side is decomposed, by a symmetric eigensolver (much
    cheaper than an SVD of the wide matrix):

    * ``out <= in``: the top left singular vectors ``U`` of ``M C`` are the top
      eigenvectors of ``M C C^T M^T = M (H + dI) M^T``, and the SVD-LLM student
      ``U_r S_r V_r^T C^-1 = U_r U_r^T M``: no Cholesky factor or inverse needed.
    * ``out > in``: eigenvectors ``V`` of ``(M C)^T (M C)``, then
      ``L = M C V`` and ``R = V^T C^-1`` (a triangular solve).

    Plain SVD is the same with ``C = I``, ASVD with ``C = diag(s)``.

    Args:
        m: the layer's weight matrix.
        h: calibration second moment of the layer input (undamped).
        method: ``"whitened"`` (SVD-LLM), ``"asvd"`` (activation-magnitude
            scaling) or ``"plain"`` (weight SVD).
        damp: whitening damping, relative to the mean diagonal of ``h``.
        alpha: ASVD's exponent on the channel magnitude.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    m = np.asarray(m, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    h = (h + h.T) / 2
    d_out, d_in = m.shape
    s = asvd_scale(h, alpha) if method == "asvd" else None
    if d_out <= d_in:
        if method == "whitened":
            scale = max(float(np.mean(np.diag(h))), 1e-12)
            gram = (m @ h) @ m.T + damp * scale * (m @ m.T)
        elif s is not None:
            gram = (m * s**2) @ m.T
        else:
            gram = m @ m.T
        _, u = np.linalg.eigh((gram + gram.T) / 2)
        left = u[:, ::-1]
        right = left.T @ m
    elif method == "whitened":
        c = whitening_factor(h, damp)
        k = m @ c
        _, v = np.linalg.eigh(k.T @ k)
        v = v[:, ::-1]
        left = k @ v
        right = np.linalg.solve(c.T, v).T
    else:
        s = s if s is not None else np.ones(d_in)
        k = m * s
        _, v = np.linalg.eigh(k.T @ k)
        v = v[:, ::-1]
        left = k @ v
        right = v.T / s
    # Columns of ``left`` are orthogonal, so err(r) = sum_{i>r} |L_i|^2 R_i H R_i^T.
    terms = np.maximum((left**2).sum(axis=0) * ((right @ h) * right).sum(axis=1), 0.0)
    error = np.concatenate([np.cumsum(terms[::-1])[::-1], [0.0]])
    energy = float(((m @ h) * m).sum())
    return LowRankSpectrum(left, right, error, energy)


def data_error(m: np.ndarray, m_hat: np.ndarray, h: np.ndarray) -> float:
    """``tr((M - M_hat) H (M - M_hat)^T)``: the data objective evaluated directly (for tests)."""
    e = np.asarray(m, dtype=np.float64) - np.asarray(m_hat, dtype=np.float64)
    return float(((e @ h) * e).sum())
