"""Data the driver and the passes share: calibration sets, labelled sets, the teacher's outputs.

It sits outside ``passes/`` so that the driver, the evaluation code and every
pass family reach it without importing one another's internals.
"""
from __future__ import annotations

from optc.data.calibration import CalibrationSet, capture_activations, real_tokens
from optc.data.labelled import LABEL_KEYS, LabelledSet
from optc.data.teacher import TeacherOutputs

__all__ = ["LABEL_KEYS", "CalibrationSet", "LabelledSet", "TeacherOutputs", "capture_activations", "real_tokens"]
