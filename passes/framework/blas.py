"""BLAS threads for the passes' linear algebra, chosen once per pipeline run from the machine's load.

numpy's BLAS (OpenBLAS) keeps its worker threads spinning while they wait for work. On a machine whose
cores are all busy, every product then waits for workers that are not running: measured on 2 shared
cores at load 4-6, a 144x216 Gram product took 55 ms with 2 BLAS threads against 1 ms with one, and a
1536-wide Cholesky 1.13 s against 0.08 s (distill on RapidOCR's detector: 113 s -> 55 s on one thread).
So when the 1-minute load average is at least the number of cores, the passes' numpy runs on one
thread; on a quieter machine BLAS keeps its own thread count. A thread count the user set in the
environment (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS, MKL_NUM_THREADS) is left alone.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

logger = logging.getLogger(__name__)

USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def busy() -> bool:
    """Whether every core already has a runnable thread (1-minute load average >= cores)."""
    try:
        return os.getloadavg()[0] >= (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


@contextlib.contextmanager
def blas_threads_for_load() -> Iterator[None]:
    """One BLAS thread while the machine is oversubscribed (see the module docstring); else nothing changes."""
    if any(os.environ.get(name) for name in USER_SETTINGS) or not busy():
        yield
        return
    from threadpoolctl import threadpool_limits

    logger.debug("load average at or above the core count: the passes' BLAS runs on one thread")
    with threadpool_limits(limits=1, user_api="blas"):
        yield
