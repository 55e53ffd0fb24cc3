"""passes/framework/analyses.py and CalibrationSet.digest: what the passes' remembered analyses are keyed by and bounded to."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from helpers import SAMPLE

from optc.data import CalibrationSet
from optc.ir import load_model
from optc.passes.framework.analyses import AnalysisCache, array_bytes


@dataclasses.dataclass(frozen=True)
class _Fit:
    left: np.ndarray
    right: np.ndarray


def test_cache_computes_once_per_key_and_keeps_within_its_bound():
    cache: AnalysisCache[_Fit] = AnalysisCache("fits", max_bytes=3 * 800)
    calls = []

    def fit(seed):
        calls.append(seed)
        rng = np.random.default_rng(seed)
        return _Fit(rng.standard_normal(50), rng.standard_normal(50))  # 800 bytes

    first = cache.get_or_compute(("m", 1), lambda: fit(1), array_bytes)
    assert cache.get_or_compute(("m", 1), lambda: fit(1), array_bytes) is first and calls == [1]
    for seed in (2, 3, 4):  # the fourth entry evicts the least recently used (seed 1)
        cache.get_or_compute(("m", seed), lambda: fit(seed), array_bytes)
    cache.get_or_compute(("m", 1), lambda: fit(1), array_bytes)
    assert calls == [1, 2, 3, 4, 1]
    assert (cache.hits, cache.misses) == (1, 5)
    # Shared between runs: the remembered arrays cannot be changed in place.
    with pytest.raises(ValueError):
        first.left[0] = 0.0


def test_a_result_over_the_bound_is_computed_each_time():
    cache: AnalysisCache[np.ndarray] = AnalysisCache("big", max_bytes=100)
    calls = []
    for _ in range(2):
        cache.get_or_compute("k", lambda: calls.append(1) or np.zeros(100), array_bytes)
    assert len(calls) == 2


def test_array_bytes_counts_shared_arrays_once():
    a = np.zeros(10)
    assert array_bytes({"x": a, "y": [a, (a, np.zeros(5))]}) == 120


def test_calibration_digest_follows_the_content_not_the_object(tmp_path):
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    np.savez(tmp_path / "a.npz", input=x)
    np.savez(tmp_path / "b.npz", input=x)
    a, b = CalibrationSet.from_path(tmp_path / "a.npz", model), CalibrationSet.from_path(tmp_path / "b.npz", model)
    memory = CalibrationSet.from_arrays({"input": x}, model)
    assert a.digest == b.digest == CalibrationSet.from_path(tmp_path / "a.npz", model).digest
    assert memory.digest == CalibrationSet.from_arrays({"input": x.copy()}, model).digest
    # One sample changed: another digest, from a file rewritten in place or from memory.
    y = x.copy()
    y[3, 0, 0, 0] += 1
    np.savez(tmp_path / "a.npz", input=y)
    assert CalibrationSet.from_path(tmp_path / "a.npz", model).digest != b.digest
    assert CalibrationSet.from_arrays({"input": y}, model).digest != memory.digest
    # A split on the same model gives the same parts each time.
    fit1, held1 = memory.hold_out(model)
    fit2, held2 = memory.hold_out(model)
    assert fit1 is not fit2 and fit1.digest == fit2.digest and held1.digest == held2.digest != fit1.digest
