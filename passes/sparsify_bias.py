"""Fold a per-output-feature offset into a linear layer's bias (used by sparsify's bias correction).

Pruning ``W`` to ``W'`` shifts the mean output by ``(W - W') mean(x)``; adding
that to the bias leaves only the centred error ``||(W - W')(X - mean)||^2``,
which is what the OBS sweep minimises when ``bias_correction`` is on.

Where the offset goes, for a node ``node`` computing ``x W (+ b)``:

* Conv, ConvTranspose, Gemm with a constant bias input of ``out`` entries: a new
  constant ``b + delta`` for this node only (the old one may be shared);
* Conv, ConvTranspose, Gemm without a bias: ``delta`` becomes the bias input;
* MatMul whose only consumer is an ``Add`` of a constant with ``out`` entries
  (the usual exported bias): a new constant for that Add;
* anything else: a new ``Add`` of ``delta`` after the node.
"""
from __future__ import annotations

import numpy as np

from optc.ir.graph import GraphEditor
from optc.passes.layers import LinearLayer


def add_to_bias(editor: GraphEditor, node, layer: LinearLayer, delta: np.ndarray) -> None:
    """Make ``node``'s output larger by ``delta`` (one value per output feature)."""
    out = delta.size
    if layer.op in ("Conv", "ConvTranspose", "Gemm"):
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            bias = editor.constant_value(node.inputs[2])
            if bias is not None and bias.size == out:
                node.inputs[2] = editor.add_constant(f"{node.inputs[2].name}_corrected", (bias.reshape(-1) + delta).reshape(bias.shape).astype(bias.dtype))
                return
        elif len(node.inputs) == 2:
            node.inputs.append(editor.add_constant(f"{layer.weight}_bias", delta))
            return
    output = node.outputs[0]
    consumers = editor.consumers(output)
    if layer.op == "MatMul" and len(consumers) == 1 and consumers[0].op == "Add" and not editor.is_graph_output(output):
        add = consumers[0]
        other = 1 if add.inputs[0] is output else 0
        bias = editor.constant_value(add.inputs[other])
        if bias is not None and bias.size == out and bias.shape[-1] == out:
            add.inputs[other] = editor.add_constant(f"{add.inputs[other].name}_corrected", (bias + delta.reshape(bias.shape)).astype(bias.dtype))
            return
    # A new Add after the node; channel-first outputs (Conv) broadcast over trailing spatial axes.
    shape = (out,) if layer.op in ("MatMul", "Gemm") else (out,) + (1,) * len(layer.kernel)
    is_output = editor.is_graph_output(output)
    shifted = editor.add_node("Add", [output, editor.add_constant(f"{layer.weight}_bias", delta.reshape(shape))]).outputs[0]
    shifted.dtype, shifted.shape = output.dtype, output.shape
    for consumer in consumers:
        consumer.inputs[:] = [shifted if t is output else t for t in consumer.inputs]
    if is_output:  # the graph keeps its output name
        name = output.name
        output.name = editor.fresh_name(name)
        shifted.name = name
        editor.graph.outputs = [shifted if t is output else t for t in editor.graph.outputs]
