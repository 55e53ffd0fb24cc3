"""The passes' BLAS runs on one thread (whatever the load: the written weights must not depend on it)."""
from __future__ import annotations

import numpy as np
import threadpoolctl

from optc.passes.framework import blas
from optc.passes.framework.blas import one_blas_thread


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]


def test_one_blas_thread_inside_passes_unless_the_user_chose(monkeypatch):
    np.ones((64, 64)) @ np.ones((64, 64))  # load BLAS
    before = _blas_threads()
    for name in blas.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    with one_blas_thread():
        assert _blas_threads() and set(_blas_threads()) == {1}
    assert _blas_threads() == before
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with one_blas_thread():
        assert _blas_threads() == before
