"""How close one model's outputs are to another's: the one place fidelity is computed.

Three views of the same comparison, each for a different reader:

* :func:`compare_outputs`: per output, the worst absolute error, that error
  relative to the reference's range, and the cosine of the whole tensors
  (``--verify-each`` and the report's fidelity line).
* :func:`sample_cosines`: the cosine of every sample's flattened output, so a
  budget can be a *mean per-sample* cosine that one bad sample cannot hide in.
* :func:`fidelity_drop`: a loss for accuracy budgets, ``1 - mean per-sample
  cosine`` or ``1 - top-1 agreement`` with the reference.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def compare_outputs(reference: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per output: max absolute error, max error relative to the reference's range, cosine."""
    out: dict[str, dict[str, float]] = {}
    for name, ref in reference.items():
        got = actual[name]
        if ref.shape != got.shape:
            out[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "cosine": float("nan"), "shape_changed": 1.0}
            continue
        r = ref.astype(np.float64).ravel()
        g = got.astype(np.float64).ravel()
        # NaN or inf in both at the same place (sqrt or log of random inputs) is agreement, not error.
        agree = ~np.isfinite(r) & ((r == g) | (np.isnan(r) & np.isnan(g)))
        if agree.any():
            r, g = r[~agree], g[~agree]
        diff = np.abs(r - g)
        max_abs = float(diff.max()) if diff.size else 0.0
        scale = float(np.abs(r).max()) if r.size else 0.0
        denom = float(np.linalg.norm(r) * np.linalg.norm(g))
        if not np.isfinite(denom):  # NaN/inf outputs: say so rather than score them
            cosine = float("nan")
        else:
            cosine = float(r @ g / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
        out[name] = {"max_abs": max_abs, "max_rel": max_abs / scale if scale > 0 else max_abs, "cosine": cosine}
    return out


def sample_cosines(reference: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Cosine between each sample's flattened reference and actual output (1 where both are zero).

    The leading axis is the sample axis; a 0-d output counts as one sample.
    """
    n = len(reference) if reference.ndim else 1
    r = reference.astype(np.float64).reshape(n, -1)
    a = actual.astype(np.float64).reshape(n, -1)
    denom = np.linalg.norm(r, axis=1) * np.linalg.norm(a, axis=1)
    return np.where(denom > 0, np.sum(r * a, axis=1) / np.maximum(denom, 1e-300), 1.0)


def fidelity_drop(reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], metric: str) -> float:
    """``1 - mean per-sample cosine`` over outputs (``cosine``), or ``1 - top-1 agreement`` of the first (``top1``)."""
    if metric == "top1":
        r, a = reference[0], actual[0]
        n = len(r)
        return float(np.mean(r.reshape(n, -1).argmax(-1) != a.reshape(n, -1).argmax(-1)))
    return float(1.0 - np.mean([sample_cosines(r, a).mean() for r, a in zip(reference, actual)]))
