"""Labelled evaluation data: the model's inputs plus a ``label`` array.

Labelled data is an ``.npz`` holding the model's inputs plus a ``label`` (or
``labels``) array of class indices, checked against the model like calibration data.
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

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], labels: np.ndarray, model: Model) -> "LabelledSet":
        """Labelled data held in memory: model inputs as for :meth:`CalibrationSet.from_arrays`, one class index per sample."""
        data = CalibrationSet.from_arrays(arrays, model, kind="evaluation")
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ConfigError(f"evaluation labels must be a 1-D integer array, got {labels.dtype} {list(labels.shape)}")
        if len(labels) != data.num_samples:
            raise ConfigError(f"evaluation data: {len(labels)} labels for {data.num_samples} samples")
        return cls(data, labels)

    @classmethod
    def from_path(cls, path: str | Path, model: Model) -> "LabelledSet":
        data = CalibrationSet.from_path(path, model, extra_keys=LABEL_KEYS, kind="evaluation")
        labels = []
        for index, f in enumerate(data.files):
            with data.open(index) as arrays:
                key = next((k for k in sorted(LABEL_KEYS) if k in arrays.arrays), None)
                if key is None:
                    raise ConfigError(f"evaluation file {f.name}: no 'label' array (class index per sample)")
                declared = arrays.arrays[key]
                if len(declared.shape) != 1 or declared.dtype.kind not in "iu":
                    raise ConfigError(
                        f"evaluation file {f.name}: 'label' must be a 1-D integer array, got {declared.dtype} {list(declared.shape)}"
                    )
                labels.append(arrays.read(key))
        joined = np.concatenate(labels)
        if len(joined) != data.num_samples:
            raise ConfigError(f"evaluation data: {len(joined)} labels for {data.num_samples} samples")
        return cls(data, joined)
