"""The passes' linear algebra runs on one BLAS thread.

numpy's BLAS (OpenBLAS) keeps its worker threads spinning while they wait for work. On a machine whose
cores are busy, every product then waits for workers that are not running: measured on 2 shared cores
at load 4-6, a 144x216 Gram product took 55 ms with 2 BLAS threads against 1 ms with one, and a
1536-wide Cholesky 1.13 s against 0.08 s (distill on RapidOCR's detector: 113 s -> 55 s on one thread).
Choosing the thread count from the load would make the written weights depend on it (a sum split over
two threads rounds differently: a pipeline replayed from pipeline.yaml gave other quantisation scales),
so it is one thread always: the same model byte for byte on any load, at the cost of the BLAS share of a
run on an idle many-core machine. A thread count the user set in the environment (OPENBLAS_NUM_THREADS,
OMP_NUM_THREADS, MKL_NUM_THREADS) is left alone.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread inside the block, unless the user chose a thread count in the environment."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
