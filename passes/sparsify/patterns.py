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
weight ``j`` and optimally re-fitting the others costs ``w_j^2 / [H^-1]_jj``;
the column-by-column sweep that applies the re-fit is
:func:`optc.passes.numerics.obs.obs_sweep` (shared with GPTQ rounding). The mask
of a column block (``block_size`` columns) is chosen at its start from the
weights updated so far; for N:M it is chosen at the start of each group of M columns.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from optc.passes.numerics.obs import inverse_hessian_factor, obs_sweep


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


def tile_sums(scores: np.ndarray, pattern: SparsityPattern) -> np.ndarray:
    """``scores`` summed over the pattern's ``r x c`` tiles, shape ``(ceil(rows/r), ceil(cols/c))`` (edge tiles zero-padded)."""
    rows, cols = scores.shape
    r, c = pattern.rows, pattern.cols
    tr, tc = math.ceil(rows / r), math.ceil(cols / c)
    s = np.zeros((tr * r, tc * c))
    s[:rows, :cols] = scores
    return s.reshape(tr, r, tc, c).sum(axis=(1, 3))


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
        tiles = tile_sums(scores, pattern)
        pruned = np.zeros(tiles.size, dtype=bool)
        pruned[np.argsort(tiles.ravel(), kind="stable")[:count]] = True
        full = np.repeat(np.repeat(pruned.reshape(tiles.shape), pattern.rows, axis=0), pattern.cols, axis=1)
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


@dataclass
class _PruneRule:
    """SparseGPT's column rule for :func:`optc.passes.numerics.obs.obs_sweep`: zero the masked entries.

    The mask of a block is chosen by OBS saliency ``w^2 / [H^-1]_jj^2`` when the
    block starts (N:M: at the start of each group of ``M`` columns).
    """

    pattern: SparsityPattern
    counts: dict[int, int]  # block start -> units to prune in it
    mask: np.ndarray = None  # type: ignore[assignment]

    def start_block(self, start: int, block: np.ndarray, diag: np.ndarray) -> None:
        self.mask = np.zeros(block.shape, dtype=bool)
        if self.pattern.kind != "nm":
            self.mask = prune_mask(block**2 / diag**2, self.pattern, self.counts[start])

    def column(self, j: int, block: np.ndarray, diag: np.ndarray) -> np.ndarray:
        step = self.pattern.column_step
        if self.pattern.kind == "nm" and j % step == 0:
            g = slice(j, min(j + step, block.shape[1]))
            self.mask[:, g] = prune_mask(block[:, g] ** 2 / diag[g] ** 2, self.pattern)
        return np.where(self.mask[:, j], 0.0, block[:, j])


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
    rows, cols = np.shape(w)
    step = pattern.column_step
    block = max(step, (block_size // step) * step)
    starts = list(range(0, cols, block))
    widths = [min(block, cols - s) for s in starts]
    counts = split_count(count, [units((rows, wd), pattern) for wd in widths]) if pattern.kind != "nm" else [0] * len(starts)
    rule = _PruneRule(pattern, dict(zip(starts, counts)))
    return obs_sweep(w, inverse_hessian_factor(h, damp), rule, block_size=block)


def reconstruction_error(w: np.ndarray, w_new: np.ndarray, gram: np.ndarray) -> float:
    """``||(W - W')X||^2 / ||W X||^2`` from the (undamped) Gram ``X X^T``."""
    den = output_energy(w, gram)
    return output_energy(w - w_new, gram) / den if den > 0 else 0.0


def output_energy(w: np.ndarray, gram: np.ndarray) -> float:
    """``||W X||^2 = tr(W G W^T)`` (a BLAS product; a 3-operand einsum is far slower)."""
    return float(np.sum((w @ gram) * w))
