"""Activation range calibrators: streamed statistics -> the clipping range ``[lo, hi]``.

Every calibrator sees one tensor's values batch by batch (``update``) and then
answers ``range()``. Memory is bounded: min/max, or one histogram of fixed size.

Histogram (:class:`StreamingHistogram`): ``bins`` equal bins over ``[-R, R]``.
When a batch exceeds ``R``, ``R`` doubles and adjacent bins merge in pairs;
with ``bins`` divisible by 4 the old edges are a subset of the new ones, so the
merge is exact and the result does not depend on batch order beyond the range
(a value is counted in the bin it would have been counted in had ``R`` been
known from the start).

Choosing the range from the histogram, with ``L`` quantisation levels:

* ``minmax``: the observed extremes.
* ``percentile p``: ``hi`` is the ``p``-th percentile, ``lo`` the ``(100-p)``-th
  (outliers beyond are clipped); each end is kept at the observed extreme when
  the data do not reach past zero on that side.
* ``entropy`` (TensorRT's KL calibration): on a one-signed histogram, for every
  candidate threshold ``T`` (a bin edge) let ``P`` be the histogram up to ``T``
  with the tail folded into the last bin, and ``Q`` the same histogram
  requantised to ``L`` levels (counts spread evenly over the non-empty bins of
  each level); pick ``T`` minimising ``KL(P || Q)``. Symmetric int8 uses the
  histogram of ``|x|`` with ``L = 128``; asymmetric activations get one
  threshold per side (``L = 128`` each, or 256 when the tensor is one-signed),
  so a dominant background value on one side (a normalised image's black)
  cannot drag the other side's threshold down with it. Exact zeros are left
  out: they are representable in any range.
* ``mse``: scale both observed extremes by ``t`` in a grid over ``(0, 1]`` and
  pick the ``t`` minimising the expected squared error
  ``sum_b n_b (c_b - deq(q(c_b)))^2`` with bin centres ``c_b`` plus the
  in-bin rounding error ``w^2/12`` per value (uniform within a bin).

Ranges always contain zero, so zero is exactly representable (padding, ReLU).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

CalibratorName = Literal["minmax", "percentile", "entropy", "mse"]
MIN_PER_BIN = 16  # entropy: average values per histogram bin below which bins are merged


class RangeCalibrator(Protocol):
    def update(self, values: np.ndarray) -> None: ...

    def range(self) -> tuple[float, float]: ...


@dataclass
class MinMaxCalibrator:
    lo: float = np.inf
    hi: float = -np.inf

    def update(self, values: np.ndarray) -> None:
        if values.size:
            self.lo = min(self.lo, float(values.min()))
            self.hi = max(self.hi, float(values.max()))

    def range(self) -> tuple[float, float]:
        if not np.isfinite(self.lo):
            return 0.0, 0.0
        return min(self.lo, 0.0), max(self.hi, 0.0)


@dataclass
class StreamingHistogram:
    """Counts of ``bins`` equal bins over ``[-radius, radius]``; radius doubles as needed."""

    bins: int = 4096
    radius: float = 0.0
    counts: np.ndarray = field(default=None)  # type: ignore[assignment]
    lo: float = np.inf
    hi: float = -np.inf
    zeros: int = 0  # exact zeros, kept out of ``counts`` (see entropy_threshold)

    def __post_init__(self) -> None:
        if self.bins % 4:
            raise ValueError(f"bins must be divisible by 4 (exact merging), got {self.bins}")
        if self.counts is None:
            self.counts = np.zeros(self.bins, dtype=np.int64)

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, dtype=np.float64).ravel()
        x = x[np.isfinite(x)]
        if not x.size:
            return
        self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))
        peak = max(abs(self.lo), abs(self.hi))
        if self.radius == 0.0:
            # Start at a power of two so later doublings keep edges on round numbers.
            self.radius = 2.0 ** np.ceil(np.log2(peak)) if peak > 0 else 1.0
        while peak > self.radius:
            pairs = self.counts.reshape(-1, 2).sum(axis=1)  # bins/2 bins of double width
            merged = np.zeros_like(self.counts)
            quarter = self.bins // 4
            merged[quarter : quarter + pairs.size] = pairs
            self.counts, self.radius = merged, self.radius * 2
        is_zero = x == 0
        self.zeros += int(is_zero.sum())
        x = x[~is_zero]
        idx = np.floor((x + self.radius) / self.width).astype(np.int64)
        self.counts += np.bincount(np.clip(idx, 0, self.bins - 1), minlength=self.bins)

    @property
    def width(self) -> float:
        return 2 * self.radius / self.bins

    @property
    def centres(self) -> np.ndarray:
        return -self.radius + (np.arange(self.bins) + 0.5) * self.width

    def with_zeros(self) -> np.ndarray:
        """Counts with the exact zeros put back in the bin ``[0, width)``."""
        counts = self.counts.copy()
        counts[self.bins // 2] += self.zeros
        return counts

    def absolute(self) -> np.ndarray:
        """Histogram of ``|x|`` over ``[0, radius]`` (``bins/2`` bins): fold at zero."""
        half = self.bins // 2
        return self.counts[half:] + self.counts[:half][::-1]


@dataclass
class HistogramCalibrator:
    """Percentile, entropy or MSE range from a :class:`StreamingHistogram`."""

    method: CalibratorName
    percentile: float = 99.99
    bins: int = 4096
    unsigned: bool = True  # activations stored as uint8 (all 256 levels on a one-signed tensor)
    hist: StreamingHistogram = field(init=False)

    def __post_init__(self) -> None:
        self.hist = StreamingHistogram(self.bins)

    def update(self, values: np.ndarray) -> None:
        self.hist.update(values)

    def range(self) -> tuple[float, float]:
        h = self.hist
        if h.counts.sum() + h.zeros == 0 or h.radius == 0:
            return 0.0, 0.0
        lo, hi = min(h.lo, 0.0), max(h.hi, 0.0)
        if self.method == "minmax":
            return lo, hi
        if self.method == "percentile":
            return percentile_range(h, self.percentile)
        one_signed = lo == 0.0 or hi == 0.0
        if self.method == "entropy":
            if not self.unsigned:  # symmetric int8: one threshold for |x|
                t = entropy_threshold(h.absolute(), h.width, 128)
                return max(lo, -t), min(hi, t)
            # Asymmetric: each side gets its own threshold (a one-signed tensor all 256 levels).
            levels = 256 if one_signed else 128
            half = h.bins // 2
            t_hi = entropy_threshold(h.counts[half:], h.width, levels) if hi > 0 else 0.0
            t_lo = entropy_threshold(h.counts[:half][::-1], h.width, levels) if lo < 0 else 0.0
            return max(lo, -t_lo), min(hi, t_hi)
        t = mse_factor(h, lo, hi, levels=256)
        return lo * t, hi * t


def make_calibrator(method: CalibratorName, *, percentile: float = 99.99, bins: int = 4096, unsigned: bool = True) -> RangeCalibrator:
    if method == "minmax":
        return MinMaxCalibrator()
    return HistogramCalibrator(method, percentile=percentile, bins=bins, unsigned=unsigned)


def percentile_range(h: StreamingHistogram, p: float) -> tuple[float, float]:
    counts = h.with_zeros()
    cdf = np.cumsum(counts) / counts.sum()
    edges_hi = -h.radius + (np.arange(h.bins) + 1) * h.width
    tail = 1.0 - p / 100.0
    hi = float(edges_hi[min(np.searchsorted(cdf, 1.0 - tail), h.bins - 1)])
    lo = float(edges_hi[np.searchsorted(cdf, tail)] - h.width)
    # Never extend past the data, and keep zero inside.
    return min(max(lo, h.lo), 0.0), max(min(hi, h.hi), 0.0)


def entropy_threshold(counts: np.ndarray, width: float, levels: int = 128) -> float:
    """TensorRT's KL threshold on a histogram of ``|x|`` with bins of ``width``.

    Exact zeros should not be in ``counts``: zero is always representable, and
    a ReLU's spike at zero, spread over a merged level, would dominate the KL.
    """
    counts = counts.astype(np.float64)
    nonzero = np.nonzero(counts)[0]
    if nonzero.size == 0:
        return width
    last = int(nonzero[-1]) + 1
    # A sparse histogram (few values over many bins) makes every clipped one look
    # alike to KL: coarsen until bins hold MIN_PER_BIN values on average.
    while last > levels and counts.sum() < MIN_PER_BIN * last and counts.size % 2 == 0:
        counts, width = counts.reshape(-1, 2).sum(axis=1), width * 2
        last = (last + 1) // 2
    if last <= levels:
        return last * width  # fewer bins than levels: no clipping needed
    csum = np.concatenate([[0.0], np.cumsum(counts)])
    used = counts > 0
    cused = np.concatenate([[0], np.cumsum(used)])
    total = csum[-1]
    best_kl, best_i = np.inf, last
    step = max(1, (last - levels) // 1024)
    for i in range(levels, last + 1, step):
        # Q: the first i bins merged into `levels` chunks, each chunk's mass spread
        # evenly over its non-empty bins; P: the same bins with the tail clipped in.
        edges = np.round(np.linspace(0, i, levels + 1)).astype(np.int64)
        chunk = np.repeat(np.arange(levels), np.diff(edges))
        mass = (csum[edges[1:]] - csum[edges[:-1]])[chunk]
        nz = (cused[edges[1:]] - cused[edges[:-1]])[chunk]
        q = np.where(used[:i], mass / np.maximum(nz, 1), 0.0)
        p = counts[:i].copy()
        p[-1] += total - csum[i]
        if p[-1] > 0 and q[-1] == 0:
            continue  # Q cannot represent the clipped tail: KL is infinite
        mask = p > 0
        pn, qn = p[mask] / total, q[mask] / csum[i]
        kl = float(np.sum(pn * np.log(pn / qn)))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i * width


def expected_sq_error(h: StreamingHistogram, lo: float, hi: float, levels: int = 256) -> float:
    """Mean squared error of asymmetric quantisation over ``[lo, hi]`` estimated from ``h``."""
    if hi <= lo:
        return float(np.sum(h.counts * h.centres**2) / max(h.counts.sum() + h.zeros, 1))
    scale = (hi - lo) / (levels - 1)
    zero = np.round(-lo / scale)
    c, counts = h.centres, h.with_zeros()
    q = np.clip(np.round(c / scale) + zero, 0, levels - 1)
    err = (c - (q - zero) * scale) ** 2
    # Inside a bin values spread over its width: unclipped ones add the rounding
    # noise of the bin itself when the bin is narrower than a step.
    inside = (c >= lo) & (c <= hi)
    err = err + np.where(inside, min(h.width, scale) ** 2 / 12, 0.0)
    return float(np.sum(counts * err) / counts.sum())


def mse_factor(h: StreamingHistogram, lo: float, hi: float, levels: int = 256, grid: int = 100) -> float:
    """The factor ``t`` in ``(0, 1]`` whose range ``[t lo, t hi]`` minimises :func:`expected_sq_error`."""
    factors = np.linspace(1.0 / grid, 1.0, grid)
    errors = [expected_sq_error(h, lo * t, hi * t, levels) for t in factors]
    return float(factors[int(np.argmin(errors))])
