"""Reading a graph without touching protobuf.

Passes analyse graphs through these functions (with :mod:`optc.ir.graph` for
producers and consumers, :func:`optc.ir.stats.shape_map` for every known shape,
and :func:`optc.ir.shapes.drop_inferred_shapes` to forget stale ones), so that
the ONNX protobuf API stays inside ``ir/`` (``tests/test_boundaries.py`` checks
that no pass reads a protobuf field). What they give:

* the main graph's nodes in graph order, and its output names;
* initializers by name: values (converted on each read) and, without touching
  the data, their dtype and shape (:class:`Initializers`);
* the dtype and shape of every typed value (:func:`value_specs`), dtypes as numpy
  dtypes, never ONNX type numbers (:func:`onnx_type` converts the other way, for
  attributes such as ``Cast``'s ``to``);
* node attributes as Python values, and the value of ``Constant`` nodes.

A node here is onnx's ``NodeProto``, read-only by convention: its ``name``,
``op_type``, ``domain``, ``input`` and ``output`` are read directly, its
attributes through :func:`attribute`. Passes that edit go through
:class:`~optc.ir.graph.GraphEditor`.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import numpy as np
import onnx
from numpy.typing import DTypeLike
from onnx import helper, numpy_helper

from optc.ir.model import Model, TensorSpec, numpy_dtype, spec_from_value_info

NodeProto = onnx.NodeProto
TensorProto = onnx.TensorProto

# The element types activations are computed in; the float8/float4 storage types are not among them.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def graph_nodes(model: Model) -> list[NodeProto]:
    """The main graph's nodes in graph order (topological: an ONNX requirement)."""
    return list(model.proto.graph.node)


def input_names(model: Model) -> list[str]:
    """The main graph's inputs, initializers listed as inputs left out."""
    return [spec.name for spec in model.inputs]


def output_names(model: Model) -> list[str]:
    """The main graph's outputs, in order."""
    return [o.name for o in model.proto.graph.output]


class Initializers(Mapping[str, np.ndarray]):
    """A model's initializers by name, as arrays converted on each read.

    Membership, iteration and :meth:`spec` do not touch the data, so asking
    which names are constants or what dtype a weight has costs nothing.
    """

    def __init__(self, model: Model):
        self._tensors = {t.name: t for t in model.proto.graph.initializer}

    def __getitem__(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self._tensors[name])

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def spec(self, name: str) -> TensorSpec:
        """dtype and shape of initializer ``name``."""
        t = self._tensors[name]
        return TensorSpec(name, numpy_dtype(t.data_type), tuple(t.dims))


def initializers(model: Model) -> Initializers:
    return Initializers(model)


def value_specs(model: Model) -> dict[str, TensorSpec]:
    """dtype and shape of every tensor-typed value: inferred ``value_info``, then graph inputs and
    outputs (a name listed twice takes its last declaration).

    Values without a tensor type (sequences, maps) are left out; a tensor whose
    element type is unknown has dtype None.
    """
    graph = model.proto.graph
    infos = [*graph.value_info, *graph.input, *graph.output]
    return {vi.name: spec_from_value_info(vi) for vi in infos if vi.type.HasField("tensor_type")}


def is_float(dtype: np.dtype | None) -> bool:
    """Whether ``dtype`` is one activations are computed in (see :data:`FLOAT_DTYPES`)."""
    return dtype is not None and dtype.name in FLOAT_DTYPES


def onnx_type(dtype: DTypeLike) -> int:
    """The ONNX element type of a numpy dtype, for attributes that name a type (``Cast``'s ``to``)."""
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


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
