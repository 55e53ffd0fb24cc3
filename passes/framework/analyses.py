"""Analyses remembered between runs of a pass, keyed by what they are computed from.

A pass keeps no state between runs, but the default budget's search runs one
pass several times on the same input model and calibration data, changing only
how much it takes (distill's error budget, sparsify's level): the statistics
and fits that do not depend on that (distill's students of every size, the
teacher's outputs) came out the same each time and were computed again each
time (MiniLM distill: 5 runs, each fitting the same 30 students). An
:class:`AnalysisCache` holds such results under a key naming everything they
are computed from: the model's content (:meth:`Model.fingerprint`), the
calibration set's content (:attr:`CalibrationSet.digest`), the seed and every
option the analysis reads. A hit is therefore what the computation would give,
and a pass using one is as deterministic as before.

Bounded by bytes (least recently used go first); a result larger than the
bound is not kept. Cached values are shared between runs: callers must not
change them (arrays are made read-only where the cache can see them).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Generic, Hashable, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

T = TypeVar("T")


class AnalysisCache(Generic[T]):
    """A bounded least-recently-used store of analysis results (see module docstring)."""

    def __init__(self, name: str, max_bytes: int):
        self.name = name
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, tuple[T, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: Hashable, compute: Callable[[], T], nbytes: Callable[[T], int]) -> T:
        """The result remembered for ``key``, else ``compute()`` (remembered when it fits)."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            logger.debug("%s: reused (same model, data and settings)", self.name)
            return entry[0]
        self.misses += 1
        value = compute()
        size = nbytes(value)
        if size <= self.max_bytes:
            self._entries[key] = (value, size)
            while sum(s for _, s in self._entries.values()) > self.max_bytes:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        self._entries.clear()


def array_bytes(value: Any, _seen: set[int] | None = None) -> int:
    """Bytes of the numpy arrays reachable from ``value`` (dataclasses, mappings, sequences), each counted once;
    the arrays are made read-only, since a cached value is shared by every run that hits it."""
    seen = _seen if _seen is not None else set()
    if id(value) in seen:
        return 0
    seen.add(id(value))
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
        return value.nbytes
    if isinstance(value, dict):
        return sum(array_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(array_bytes(v, seen) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(array_bytes(getattr(value, f), seen) for f in value.__dataclass_fields__)
    return 0
