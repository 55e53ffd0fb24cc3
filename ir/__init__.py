"""optc's ONNX layer: the only package that imports onnx and onnx-graphsurgeon."""
from __future__ import annotations

from optc.ir.graph import GraphEditor, to_networkx
from optc.ir.io import load_model, save_model
from optc.ir.model import Model, TensorSpec
from optc.ir.shapes import ShapeReport, freeze_input_shapes, infer_shapes, parse_shape_spec
from optc.ir.stats import ModelStats, compute_stats

__all__ = [
    "GraphEditor",
    "Model",
    "ModelStats",
    "ShapeReport",
    "TensorSpec",
    "compute_stats",
    "freeze_input_shapes",
    "infer_shapes",
    "load_model",
    "parse_shape_spec",
    "save_model",
    "to_networkx",
]
