"""Fold a per-output-feature offset into a linear layer's bias.

Used wherever a rewrite leaves a known mean shift at a layer's output: the
least-squares refits of prune-channels (the removed channels' mean
contribution) and sparsify's bias correction (pruning ``W`` to ``W'`` shifts the
mean output by ``(W - W') mean(x)``).

``delta`` is in the units of ``x W`` (before a Gemm's ``alpha``). Where it goes,
for a node computing ``alpha x W (+ beta b)``:

* Conv, ConvTranspose, Gemm with a constant bias of ``out`` entries: a new
  constant ``b + (alpha / beta) delta`` for this node only (the old one may be
  shared);
* Conv, ConvTranspose, Gemm without a bias: ``alpha delta`` becomes the bias
  (a Gemm's ``beta`` set to 1);
* MatMul whose only consumer is an ``Add`` of a constant with ``out`` entries
  on the last axis (the usual exported bias): a new constant for that Add;
* anything else: a new ``Add`` after the node, which keeps the output's name.
"""
from __future__ import annotations

import numpy as np

from optc.ir.graph import GraphEditor, Node


def add_to_bias(editor: GraphEditor, node: Node, delta: np.ndarray) -> None:
    """Make ``node``'s output larger by ``delta`` (one value per output feature)."""
    delta = np.asarray(delta, dtype=np.float64).reshape(-1)
    out = delta.size
    dtype = np.asarray(editor.constant_value(node.inputs[1])).dtype
    if node.op in ("Conv", "ConvTranspose", "Gemm"):
        alpha = float(node.attrs.get("alpha", 1.0)) if node.op == "Gemm" else 1.0
        beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name
        bias = editor.constant_value(node.inputs[2]) if has_bias else None
        if bias is not None and bias.size == out:
            new = bias.astype(np.float64).reshape(-1) + (alpha / beta) * delta
            node.inputs[2] = editor.add_constant(f"{node.inputs[2].name}_corrected", new.reshape(bias.shape).astype(bias.dtype))
            return
        if not has_bias:
            if node.op == "Gemm":
                node.attrs["beta"] = 1.0
            node.inputs.append(editor.add_constant(f"{node.name}_bias", (alpha * delta).astype(dtype)))
            return
    output = node.outputs[0]
    consumers = editor.consumers(output)
    if node.op == "MatMul" and len(consumers) == 1 and consumers[0].op == "Add" and not editor.is_graph_output(output):
        add = consumers[0]
        other = 1 if add.inputs[0] is output else 0
        bias = editor.constant_value(add.inputs[other])
        if bias is not None and bias.size == out and bias.shape[-1] == out:
            add.inputs[other] = editor.add_constant(f"{add.inputs[other].name}_corrected", (bias + delta.reshape(bias.shape)).astype(bias.dtype))
            return
    # Channel-first outputs (Conv) broadcast over the trailing spatial axes.
    weight_rank = np.asarray(editor.constant_value(node.inputs[1])).ndim
    shape = (out,) + (1,) * (weight_rank - 2) if node.op in ("Conv", "ConvTranspose") else (out,)
    editor.add_after(node, "Add", delta.reshape(shape).astype(dtype), f"{node.name}_bias")
