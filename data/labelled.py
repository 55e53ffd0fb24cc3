"""Labelled evaluation data: the model's inputs plus a ``label`` array.

Labelled data is an ``.npz`` holding the model's inputs plus a ``label`` (or
``labels``) array (without one, only label-free metrics such as ``cosine`` apply), checked against the model like calibration data. Labels have
one entry per sample on axis 0 and any dtype numpy stores without pickle:
integers (class indices, what ``top1``/``top5`` read), floats (regression
targets), booleans, fixed-width strings (for a custom ``--metric``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from optc.errors import ConfigError
from optc.ir.model import Model
from optc.data.calibration import CalibrationSet

LABEL_KEYS = frozenset({"label", "labels"})


@dataclass(frozen=True)
class LabelledSet:
    inputs: CalibrationSet
    labels: np.ndarray | None  # None: held-out inputs without labels (a metric measured against the input model)
    # Samples split off the calibration data (a few, chosen by optc, not the user's own evaluation set): the
    # passes fit on the rest, and pipeline.yaml records how many (data.held_out) so that a replay fits on the same.
    split_from_calibration: bool = False

    @classmethod
    def checked(cls, data: CalibrationSet, labels: np.ndarray) -> "LabelledSet":
        """``labels`` checked against ``data``: a storable dtype and one entry per sample."""
        labels = np.asarray(labels)
        _check_label_type(labels.dtype, labels.shape, "evaluation labels")
        if len(labels) != data.num_samples:
            raise ConfigError(f"evaluation data: {len(labels)} labels for {data.num_samples} samples")
        return cls(data, labels)

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], labels: np.ndarray, model: Model) -> "LabelledSet":
        """Labelled data held in memory: model inputs as for :meth:`CalibrationSet.from_arrays`, one label per sample."""
        return cls.checked(CalibrationSet.from_arrays(arrays, model, kind="evaluation"), labels)

    @property
    def class_indices(self) -> bool:
        """Whether the labels are one integer class index per sample (what top-1 accuracy reads)."""
        return self.labels is not None and self.labels.ndim == 1 and self.labels.dtype.kind in "iu"

    @classmethod
    def from_path(cls, path: str | Path, model: Model) -> "LabelledSet":
        data = CalibrationSet.from_path(path, model, extra_keys=LABEL_KEYS, kind="evaluation")
        labels, unlabelled = [], []
        for index, f in enumerate(data.files):
            with data.open(index) as arrays:
                key = next((k for k in sorted(LABEL_KEYS) if k in arrays.arrays), None)
                if key is None:  # fine for --metric cosine (to the input model's outputs); a labelled metric says so
                    unlabelled.append(f.name)
                    continue
                declared = arrays.arrays[key]
                _check_label_type(declared.dtype, declared.shape, f"evaluation file {f.name}: '{key}'")
                labels.append(arrays.read(key))
        if len(unlabelled) == len(data.files):
            return cls(data, None)
        if unlabelled:
            raise ConfigError(f"evaluation file {unlabelled[0]}: no 'label' array, while other files have one")
        try:
            joined = np.concatenate(labels)
        except ValueError as exc:
            raise ConfigError(f"evaluation data: the files' labels do not join ({exc})") from exc
        return cls.checked(data, joined)


def _check_label_type(dtype: np.dtype, shape: tuple[int, ...], where: str) -> None:
    # Object arrays need pickle to load (refused by optc's npz reader); complex or datetime labels are no metric's input.
    if dtype.kind not in "biufSU" or not shape:
        raise ConfigError(f"{where} must be an array with one label per sample on axis 0, of integers, floats, booleans "
                          f"or fixed-width strings; got {dtype} {list(shape)}")
