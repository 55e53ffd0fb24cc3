"""Labelled evaluation data: the model's inputs plus a ``label`` array.

Labelled data is an ``.npz`` holding the model's inputs plus a ``label`` (or
``labels``) array of class indices, checked against the model like calibration data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optc.errors import ConfigError
from optc.ir.model import Model
from optc.data.calibration import CalibrationSet

LABEL_KEYS = frozenset({"label", "labels"})


@dataclass(frozen=True)
class LabelledSet:
    inputs: CalibrationSet
    labels: np.ndarray

    @classmethod
    def from_path(cls, path: str | Path, model: Model) -> "LabelledSet":
        data = CalibrationSet.from_path(path, model, extra_keys=LABEL_KEYS, kind="evaluation")
        labels = []
        for f in data.files:
            with np.load(f, allow_pickle=False) as arrays:
                key = next((k for k in LABEL_KEYS if k in arrays.files), None)
                if key is None:
                    raise ConfigError(f"evaluation file {f.name}: no 'label' array (class index per sample)")
                lab = arrays[key]
            if lab.ndim != 1 or lab.dtype.kind not in "iu":
                raise ConfigError(f"evaluation file {f.name}: 'label' must be a 1-D integer array, got {lab.dtype} {list(lab.shape)}")
            labels.append(lab)
        joined = np.concatenate(labels)
        if len(joined) != data.num_samples:
            raise ConfigError(f"evaluation data: {len(joined)} labels for {data.num_samples} samples")
        return cls(data, joined)
