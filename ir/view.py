"""Reading a graph without touching protobuf: node attributes and constant values.

Passes analyse graphs through these functions (and :mod:`optc.ir.graph` for
producers and consumers), so that the ONNX protobuf API stays inside ``ir/``.
A node here is onnx's ``NodeProto``, read-only by convention: passes that edit
go through :class:`~optc.ir.graph.GraphEditor`.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

NodeProto = onnx.NodeProto
TensorProto = onnx.TensorProto


def attributes(node: NodeProto) -> dict[str, Any]:
    """Every attribute of ``node`` as a Python value (ints, floats, lists, tensors as TensorProto)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def attribute(node: NodeProto, name: str, default: Any = None) -> Any:
    """One attribute of ``node`` as a Python value, or ``default`` when absent."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def to_array(tensor: TensorProto) -> np.ndarray:
    """A tensor's values (external data must already be loaded, as :func:`optc.ir.io.load_model` does)."""
    return numpy_helper.to_array(tensor)


def constant_node_value(node: NodeProto) -> np.ndarray | None:
    """The value of a ``Constant`` node given as a tensor (``value``), else None."""
    value = attribute(node, "value")
    return to_array(value) if value is not None else None
