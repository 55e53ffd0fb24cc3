"""The passes' BLAS runs on one thread while every core is busy, and keeps its threads otherwise."""
from __future__ import annotations

import os

import numpy as np
import threadpoolctl

from optc.passes.framework import blas
from optc.passes.framework.blas import blas_threads_for_load


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


def test_one_blas_thread_while_the_cores_are_busy(monkeypatch):
    np.ones((64, 64)) @ np.ones((64, 64))  # load BLAS
    before = _blas_threads()
    for name in blas.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (float(os.cpu_count() or 1), 0.0, 0.0))
    with blas_threads_for_load():
        assert _blas_threads() and set(_blas_threads()) == {1}
    assert _blas_threads() == before
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    with blas_threads_for_load():
        assert _blas_threads() == before
    # a thread count the user chose is theirs
    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 0.0, 0.0))
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with blas_threads_for_load():
        assert _blas_threads() == before
