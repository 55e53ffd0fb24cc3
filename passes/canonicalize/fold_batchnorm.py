"""fold-batchnorm: fold inference BatchNormalization into the Conv/ConvTranspose/Gemm before it.

BatchNorm computes ``y = s * (x - mean) + beta`` per channel with
``s = gamma / sqrt(var + eps)``. When ``x = W * a + b`` is linear in ``a`` with
output channel ``c`` owned by slice ``W[c]``, then ``y = (s[c] W[c]) * a +
(s[c] (b[c] - mean[c]) + beta[c])``: scale the weights per output channel and
rewrite the bias. Output channels live on axis 0 of a Conv weight, on axis 1
of each group of a ConvTranspose weight, and on the N axis of a Gemm's B.

Rewrites always create new constants, so a weight shared with another node is
never changed under it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from optc.ir.graph import GraphEditor, Node
from optc.ir.liveness import has_ops
from optc.ir.model import Model
from optc.passes.framework import NoOptions, Pass, PassContext, PassResult, register_pass


@dataclass(frozen=True)
class BatchNormFold:
    """A planned fold: the BatchNorm, its linear producer and the new constants."""

    bn: Node
    producer: Node
    weight: np.ndarray
    bias: np.ndarray


@register_pass("fold-batchnorm")
class FoldBatchNorm(Pass[NoOptions]):
    """Fold BatchNormalization into a preceding Conv, ConvTranspose or Gemm (exact up to rounding)."""

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        if not has_ops(model, {"BatchNormalization"}):  # no graph import for nothing
            return PassResult(model, modified=False, stats={"folded": 0})
        editor = GraphEditor(model)
        plans: list[BatchNormFold] = []
        skipped: list[str] = []
        for node in editor.nodes:
            if node.op != "BatchNormalization":
                continue
            plan = plan_fold(editor, node)
            if isinstance(plan, str):
                skipped.append(f"{node.name}: {plan}")
            else:
                plans.append(plan)
        if not plans:
            return PassResult(model, modified=False, stats={"folded": 0}, skipped=skipped)
        for plan in plans:
            apply_fold(editor, plan)
        return PassResult(editor.commit(), modified=True, stats={"folded": len(plans)}, skipped=skipped)


def plan_fold(editor: GraphEditor, bn: Node) -> BatchNormFold | str:
    """A fold for ``bn``, or the reason it cannot be folded."""
    if len([o for o in bn.outputs if o.name]) != 1:
        return "training-mode BatchNorm (running statistics are outputs)"
    if bn.attrs.get("training_mode", 0):
        return "training_mode=1"
    params = [editor.constant_value(t) for t in bn.inputs[1:5]]
    if any(p is None for p in params):
        return "scale, bias, mean or variance is not constant"
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)  # type: ignore[union-attr]
    eps = float(bn.attrs.get("epsilon", 1e-5))
    x = bn.inputs[0]
    producer = editor.producer(x)
    if producer is None or producer.op not in ("Conv", "ConvTranspose", "Gemm"):
        return f"input is not produced by Conv/ConvTranspose/Gemm ({producer.op if producer else 'graph input'})"
    if len(x.outputs) != 1 or editor.is_graph_output(x):
        return f"output of '{producer.name}' has other uses"
    w = editor.constant_value(producer.inputs[1])
    if w is None:
        return f"weight of '{producer.name}' is not constant"
    b_tensor = producer.inputs[2] if len(producer.inputs) > 2 and producer.inputs[2].name else None
    b = editor.constant_value(b_tensor) if b_tensor is not None else None
    if b_tensor is not None and b is None:
        return f"bias of '{producer.name}' is not constant"
    scale = gamma / np.sqrt(var + eps)
    channels = scale.shape[0]
    if producer.op == "Conv":
        if w.shape[0] != channels:
            return "channel count differs from the Conv's"
        new_w = w.astype(np.float64) * scale.reshape(-1, *([1] * (w.ndim - 1)))
        bias = np.zeros(channels) if b is None else b.astype(np.float64)
    elif producer.op == "ConvTranspose":
        group = int(producer.attrs.get("group", 1))
        if w.shape[1] * group != channels:
            return "channel count differs from the ConvTranspose's"
        grouped = w.astype(np.float64).reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
        grouped = grouped * scale.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))
        new_w = grouped.reshape(w.shape)
        bias = np.zeros(channels) if b is None else b.astype(np.float64)
    else:
        plan = _gemm_fold(producer, w, b, scale, channels)
        if isinstance(plan, str):
            return plan
        new_w, bias = plan
    new_b = scale * (bias - mean) + beta
    dtype = w.dtype
    return BatchNormFold(bn, producer, new_w.astype(dtype), new_b.astype(dtype))


def _gemm_fold(gemm: Node, w: np.ndarray, c: np.ndarray | None, scale: np.ndarray, channels: int):
    if gemm.attrs.get("transA", 0) not in (0, 1) or w.ndim != 2:
        return "unsupported Gemm form"
    trans_b = int(gemm.attrs.get("transB", 0))
    n = w.shape[0] if trans_b else w.shape[1]
    if n != channels:
        return "channel count differs from the Gemm's"
    beta = float(gemm.attrs.get("beta", 1.0))
    new_w = w.astype(np.float64) * (scale[:, None] if trans_b else scale[None, :])
    if c is None:
        bias = np.zeros(channels)
    elif c.size == 1:
        bias = np.full(channels, float(c.ravel()[0]) * beta)
    elif c.shape in ((channels,), (1, channels)):
        bias = c.reshape(-1).astype(np.float64) * beta
    else:
        return f"Gemm bias of shape {list(c.shape)} is not per-channel"
    # alpha stays on the product; beta is folded into the new bias (and set to 1).
    return new_w, bias


def apply_fold(editor: GraphEditor, plan: BatchNormFold) -> None:
    producer, bn = plan.producer, plan.bn
    producer.inputs[1] = editor.add_constant(f"{producer.name}_W_bnfold", plan.weight)
    bias = editor.add_constant(f"{producer.name}_B_bnfold", plan.bias)
    if producer.op == "Gemm":
        producer.attrs["beta"] = 1.0
    if len(producer.inputs) > 2:
        producer.inputs[2] = bias
    else:
        producer.inputs.append(bias)
    # The producer now writes the BatchNorm's output tensor directly.
    conv_out, bn_out = producer.outputs[0], bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    producer.outputs[0] = bn_out
    conv_out.inputs.clear()
