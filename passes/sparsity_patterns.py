"""Sparsity patterns on a ``(out, in)`` weight matrix, and the OBS / SparseGPT solver.

Patterns (all on the matrix of :func:`optc.passes.layers.weight_matrix`):

* ``unstructured``: any entries; exactly ``round(s * size)`` are zeroed.
* ``N:M``: in every row, each group of ``M`` consecutive input columns keeps at
  most ``N`` nonzeros (a trailing group shorter than ``M`` too), so sparsity is
  ``1 - N/M`` whatever the requested level.
* ``block:RxC``: the matrix is tiled in ``R`` rows by ``C`` columns (edge tiles
  may be partial); whole tiles are zeroed, ``round(s * tiles)`` of them.

A mask is chosen from a per-entry *score*: ``w^2`` for magnitude pruning, the
OBS saliency ``w^2 / [H^-1]_jj^2`` for reconstruction. Tile scores are sums.

OBS reconstruction (Frantar & Alistarh, SparseGPT, 2023). For a row ``w`` the
layer loss is ``(w - w') H (w - w')^T`` with ``H = X X^T`` (damped). Removing
weight ``j`` and optimally re-fitting the others costs ``w_j^2 / [H^-1]_jj``
and moves the remaining weights by ``-(w_j / [H^-1]_jj) H^-1_{j,:}``.
Processing columns left to right, the inverse Hessian of the columns still to
come is the trailing block of ``U^T U`` where ``U`` is the upper Cholesky
factor of ``H^-1``; its row ``j`` (scaled by ``U_jj``) gives the update for
column ``j``, so one factorisation serves all rows. The mask of a column block
(``block_size`` columns) is chosen at its start from the weights updated so
far; for N:M it is chosen at the start of each group of M columns. Updates
inside a block are applied column by column, and the block's accumulated error
is pushed to later columns in one matrix product (the "lazy batch" update).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class SparsityPattern:
    """A parsed pattern: ``kind`` plus its N:M or tile parameters."""

    kind: Literal["unstructured", "nm", "block"]
    n: int = 0
    m: int = 0
    rows: int = 1
    cols: int = 1

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern imposes (N:M), else None."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None

    @property
    def column_step(self) -> int:
        """Columns that must be decided together (OBS blocks are multiples of this)."""
        return self.m if self.kind == "nm" else self.cols

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block:{self.rows}x{self.cols}"
        return "unstructured"


_NM = re.compile(r"^(\d+):(\d+)$")
_BLOCK = re.compile(r"^block:(\d+)x(\d+)$")


def parse_pattern(text: str) -> SparsityPattern:
    """``"unstructured"``, ``"N:M"`` (0 < N < M) or ``"block:RxC"``.

    Raises:
        ValueError: naming the ``pattern`` field and the accepted forms.
    """
    text = text.strip().lower()
    if text == "unstructured":
        return SparsityPattern("unstructured")
    if match := _NM.match(text):
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"pattern '{text}': N:M needs 0 < N < M")
        return SparsityPattern("nm", n=n, m=m)
    if match := _BLOCK.match(text):
        r, c = int(match.group(1)), int(match.group(2))
        if r < 1 or c < 1 or r * c < 2:
            raise ValueError(f"pattern '{text}': a block needs at least 2 entries")
        return SparsityPattern("block", rows=r, cols=c)
    raise ValueError(f"pattern must be 'unstructured', 'N:M' (e.g. 2:4) or 'block:RxC' (e.g. block:4x4), not '{text}'")


def units(shape: tuple[int, int], pattern: SparsityPattern) -> int:
    """How many prunable units (entries or tiles) a matrix of ``shape`` has."""
    rows, cols = shape
    if pattern.kind == "block":
        return math.ceil(rows / pattern.rows) * math.ceil(cols / pattern.cols)
    return rows * cols


def split_count(total: int, sizes: list[int]) -> list[int]:
    """Share ``total`` among parts of ``sizes`` proportionally, summing exactly to ``total``.

    Cumulative rounding: part ``i`` gets ``round(t * end_i) - round(t * start_i)``.
    """
    whole = sum(sizes)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    cuts = np.rint(total * bounds / max(whole, 1)).astype(int)
    return [int(b - a) for a, b in zip(cuts[:-1], cuts[1:])]


def prune_mask(scores: np.ndarray, pattern: SparsityPattern, count: int = 0) -> np.ndarray:
    """Boolean mask of the entries to zero (True = pruned).

    ``count`` is the number of units (entries, or tiles for blocks) to prune;
    it is ignored for N:M, whose groups each lose their ``M - N`` lowest scores.
    """
    rows, cols = scores.shape
    if pattern.kind == "nm":
        m = pattern.m
        padded = math.ceil(cols / m) * m
        # Padding scores are +inf so they are never "pruned" ahead of real entries.
        s = np.full((rows, padded), np.inf)
        s[:, :cols] = scores
        groups = s.reshape(rows, -1, m)
        order = np.argsort(groups, axis=-1, kind="stable")
        mask = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(mask, order[..., : m - pattern.n], True, axis=-1)
        mask = mask.reshape(rows, padded)[:, :cols]
        # A short trailing group keeps up to N entries: unprune its best ones.
        tail = cols % m
        if tail and tail <= pattern.n:
            mask[:, cols - tail :] = False
        return mask
    if count <= 0:
        return np.zeros(scores.shape, dtype=bool)
    if pattern.kind == "block":
        r, c = pattern.rows, pattern.cols
        tr, tc = math.ceil(rows / r), math.ceil(cols / c)
        s = np.zeros((tr * r, tc * c))
        s[:rows, :cols] = scores
        tiles = s.reshape(tr, r, tc, c).sum(axis=(1, 3))
        pruned = np.zeros(tiles.size, dtype=bool)
        pruned[np.argsort(tiles.ravel(), kind="stable")[:count]] = True
        full = np.repeat(np.repeat(pruned.reshape(tr, tc), r, axis=0), c, axis=1)
        return full[:rows, :cols]
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argpartition(scores.ravel(), count - 1)[:count] if count < scores.size else slice(None)] = True
    return mask.reshape(scores.shape)


def prune_count(shape: tuple[int, int], pattern: SparsityPattern, sparsity: float) -> int:
    """Units to prune in a matrix of ``shape`` for the requested level (0 for N:M)."""
    return 0 if pattern.kind == "nm" else int(round(sparsity * units(shape, pattern)))


def magnitude_prune(w: np.ndarray, pattern: SparsityPattern, count: int) -> np.ndarray:
    """``w`` with its ``count`` smallest units (by ``w^2``) zeroed."""
    out = w.copy()
    out[prune_mask(w.astype(np.float64) ** 2, pattern, count)] = 0
    return out


def inverse_hessian_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``), ``H`` symmetric PSD.

    With ``J`` the reversal permutation and ``J H J = L L^T``, ``U = J L^-1 J``
    (upper triangular, positive diagonal, and ``U^T U = J L^-T L^-1 J = H^-1``):
    one Cholesky and one triangular inverse instead of inverting ``H`` and
    factorising the inverse. ``damp * mean(diag H)`` is added to the diagonal
    first; it is raised tenfold (up to 1.0) while the matrix is not positive definite.
    """
    h = np.asarray(h, dtype=np.float64)
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
    return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1])


def obs_prune(
    w: np.ndarray,
    h: np.ndarray,
    pattern: SparsityPattern,
    count: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> np.ndarray:
    """SparseGPT: ``w`` (rows, cols) pruned to the pattern with OBS updates on ``h`` (cols, cols).

    ``count`` units are pruned in total (ignored for N:M); they are shared among
    column blocks in proportion to their sizes. Returns a float64 matrix whose
    pruned entries are exactly zero.
    """
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    u = inverse_hessian_factor(h, damp)
    step = pattern.column_step
    block = max(step, (block_size // step) * step)
    starts = list(range(0, cols, block))
    widths = [min(block, cols - s) for s in starts]
    counts = split_count(count, [units((rows, wd), pattern) for wd in widths]) if pattern.kind != "nm" else [0] * len(starts)
    for i1, width, k in zip(starts, widths, counts):
        i2 = i1 + width
        w1 = w[:, i1:i2].copy()
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        err = np.zeros_like(w1)
        mask = np.zeros_like(w1, dtype=bool)
        if pattern.kind != "nm":
            mask = prune_mask(w1**2 / d**2, pattern, k)
        for j in range(width):
            if pattern.kind == "nm" and j % step == 0:
                g = slice(j, min(j + step, width))
                mask[:, g] = prune_mask(w1[:, g] ** 2 / d[g] ** 2, pattern)
            q = np.where(mask[:, j], 0.0, w1[:, j])
            e = (w1[:, j] - q) / d[j]
            w1[:, j:] -= np.outer(e, u1[j, j:])
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w


def reconstruction_error(w: np.ndarray, w_new: np.ndarray, gram: np.ndarray) -> float:
    """``||(W - W')X||^2 / ||W X||^2`` from the (undamped) Gram ``X X^T``."""
    den = output_energy(w, gram)
    return output_energy(w - w_new, gram) / den if den > 0 else 0.0


def output_energy(w: np.ndarray, gram: np.ndarray) -> float:
    """``||W X||^2 = tr(W G W^T)`` (a BLAS product; a 3-operand einsum is far slower)."""
    return float(np.sum((w @ gram) * w))
