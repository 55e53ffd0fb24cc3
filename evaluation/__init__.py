"""Measuring models: fidelity to a reference, accuracy on labelled data, latency.

Everything here runs the models in onnxruntime on the CPU. The driver reports
with it and the passes hold their budgets with it, so one definition of each
figure serves both.
"""
from __future__ import annotations

from optc.evaluation.accuracy import accuracy
from optc.evaluation.fidelity import compare_outputs, fidelity_drop, sample_cosines
from optc.evaluation.latency import interleaved_latency_ms, latency_ms
from optc.evaluation.metrics import Metric, MetricRunner, load_metric, model_outputs

__all__ = ["Metric", "MetricRunner", "load_metric", "model_outputs", "accuracy", "compare_outputs", "fidelity_drop", "interleaved_latency_ms", "latency_ms", "sample_cosines"]
