"""Calibration and evaluation data from Python: any iterable of feeds.

What users of other tools already have: a list or generator of feed dicts
(``{input name: array}``, samples on axis 0, one batch each), a PyTorch
``DataLoader`` mapped to numpy, or an onnxruntime ``CalibrationDataReader``
(anything with ``get_next()`` returning a feed, then None). Evaluation data
yields ``(feed, labels)`` pairs.

The feeds are read once and held in memory (at most :data:`MAX_HELD_BYTES`).
Consecutive feeds whose arrays share their non-batch shape are joined into one
group; a feed of another shape (a longer token batch) starts a new group, so
token batches of different lengths are kept as they came. A rank-0 input's
value (0-d) holds for every sample of its feed.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from optc.data.calibration import CalibrationSet, feed_samples, sample_axes
from optc.errors import ConfigError
from optc.ir.bind import check_bound_arrays
from optc.ir.model import Model

MAX_HELD_BYTES = 2 << 30


def is_feed_source(data: Any) -> bool:
    """Whether ``data`` is an iterable of feeds or a ``CalibrationDataReader`` (not a path, not one feed)."""
    if hasattr(data, "get_next"):
        return True
    return isinstance(data, Iterable) and not isinstance(data, (str, bytes, Mapping)) and not hasattr(data, "__fspath__")


def from_feeds(feeds: Any, model: Model, *, kind: str = "calibration") -> CalibrationSet:
    """A :class:`CalibrationSet` from an iterable of feed dicts (or a ``CalibrationDataReader``)."""
    chunks = _group(_feed_items(feeds, kind, labelled=False), model, kind)
    return CalibrationSet.from_chunks([c for c, _ in chunks], model, kind=kind)


def labelled_from_feeds(pairs: Any, model: Model):
    """A :class:`~optc.data.labelled.LabelledSet` from an iterable of ``(feed, labels)`` pairs."""
    from optc.data.labelled import LabelledSet

    chunks = _group(_feed_items(pairs, "evaluation", labelled=True), model, "evaluation")
    data = CalibrationSet.from_chunks([c for c, _ in chunks], model, kind="evaluation")
    labels = np.concatenate([lab for _, lab in chunks])
    return LabelledSet.checked(data, labels)


def _feed_items(source: Any, kind: str, labelled: bool) -> Iterator[tuple[int, Mapping[str, Any], Any]]:
    items = iter(source.get_next, None) if hasattr(source, "get_next") else iter(source)
    for index, item in enumerate(items, start=1):
        if labelled:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], Mapping)):
                raise ConfigError(f"{kind} feed #{index}: expected a (feed dict, labels) pair, got {type(item).__name__}")
            yield index, item[0], item[1]
        else:
            if not isinstance(item, Mapping):
                raise ConfigError(f"{kind} feed #{index}: expected a dict of input name -> array, got {type(item).__name__}")
            yield index, item, None


def _group(items: Iterable[tuple[int, Mapping[str, Any], Any]], model: Model, kind: str) -> list[tuple[dict[str, np.ndarray], np.ndarray | None]]:
    """Consecutive feeds of one shape joined: ``[(arrays, labels or None), ...]``."""
    scalars = {s.name for s in model.inputs if s.shape == ()}
    axes = sample_axes(model.inputs)
    groups: list[tuple[tuple, list[dict[str, np.ndarray]], list[np.ndarray]]] = []
    held = 0
    for index, feed, labels in items:
        arrays = {str(k): np.asarray(v) for k, v in feed.items()}
        if any(a.dtype == object for a in arrays.values()):
            raise ConfigError(f"{kind} feed #{index}: an array of Python objects; give numeric arrays")
        check_bound_arrays(model.bound, arrays, f"{kind} feed #{index}")  # inputs bound to constants: checked, dropped
        arrays = {k: a for k, a in arrays.items() if k not in model.bound}
        n = feed_samples(arrays, model.inputs)
        for k in scalars & set(arrays):
            if arrays[k].ndim:
                raise ConfigError(f"{kind} feed #{index}, input '{k}': shape {list(arrays[k].shape)}; the input is a scalar (0-d)")
            arrays[k] = np.full(n, arrays[k])
        # Feeds join when they differ only in samples; an input given whole joins only feeds that give the same value.
        key = tuple(sorted((k, tuple(d for i, d in enumerate(a.shape) if i != axes.get(k, 0)), a.dtype.str,
                            a.tobytes() if axes.get(k, 0) is None else b"") for k, a in arrays.items()))
        held += sum(a.nbytes for a in arrays.values())
        if held > MAX_HELD_BYTES:
            raise ConfigError(f"{kind} feeds: more than {MAX_HELD_BYTES >> 30} GiB; optc holds Python feeds in memory: give fewer, or .npz files")
        label_array = None
        if labels is not None:
            label_array = np.asarray(labels)
            label_array = label_array.reshape(1) if label_array.ndim == 0 else label_array
            if len(label_array) != n:
                raise ConfigError(f"{kind} feed #{index}: {len(label_array)} labels for {n} samples")
        if groups and groups[-1][0] == key:
            groups[-1][1].append(arrays)
            groups[-1][2].append(label_array)
        else:
            groups.append((key, [arrays], [label_array]))
    if not groups:
        raise ConfigError(f"{kind} feeds: the iterable gave no feeds")
    out = []
    for _, feeds, labels in groups:
        # Inputs given whole (no sample axis) are the same in every feed of a group: kept once.
        joined = {k: np.concatenate([f[k] for f in feeds], axis=axes.get(k, 0)) if feeds[0][k].ndim and axes.get(k, 0) is not None
                  else feeds[0][k] for k in feeds[0]}
        out.append((joined, np.concatenate(labels) if labels[0] is not None else None))
    return out
