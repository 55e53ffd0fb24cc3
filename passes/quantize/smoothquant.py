"""smoothquant: move activation outlier channels into the weights before int8 (Xiao et al. 2022).

A MatMul/Gemm computes ``y = X W`` with ``X`` ``(tokens, K)`` and ``W`` ``(K, N)``.
For any positive per-channel vector ``s`` (length ``K``),

    ``y = (X diag(s)^-1) (diag(s) W)``

exactly. Per-tensor int8 activations lose resolution when a few input channels
are much larger than the rest (transformers' LayerNorm outputs are the classic
case); per-output-channel weight scales barely notice a row of ``W`` growing.
SmoothQuant picks

    ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``

(``max|X_j|`` over calibration tokens, ``max|W_j|`` over row ``j`` of every
weight that reads ``X``), which flattens the activation channels toward each
other and moves their spread into the weights; ``alpha`` sets how much
(0: none moved to the weights, 1: all of it). Layers reading the same tensor
(query, key, value) share one ``s``: the division is applied to the tensor once.

Where the division goes:

* into the producing ``LayerNormalization`` when the tensor is read by the
  smoothed layers only (``gamma / s``, ``beta / s``: no new node), or
* a ``Mul`` by the constant ``1 / s`` read by the smoothed layers only (other
  readers, such as a residual ``Add``, keep the unscaled tensor).

The rewrite is exact in real arithmetic; in float32 outputs move by rounding
only. Conv layers, Gemm with ``transA`` and channels with no signal (``max|X_j|``
or ``max|W_j|`` zero, where ``s_j`` stays 1) are left alone and reported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from optc.ir.graph import GraphEditor, Variable
from optc.ir.model import Model
from optc.passes.framework import Pass, PassConfig, PassContext, PassResult, Requirement, option, register_pass
from optc.data.calibration import CalibrationSet, capture_activations
from optc.passes.layers import LinearLayer, find_linear_layers, matrix_to_weight, weight_matrix

logger = logging.getLogger(__name__)

SMOOTHABLE_OPS = ("MatMul", "Gemm")
SCALE_LIMITS = (1e-5, 1e5)  # keeps 1/s and s finite in float32 for degenerate channels


@dataclass(frozen=True, kw_only=True)
class SmoothQuantConfig(PassConfig):
    alpha: float = option(0.5, "migration strength: 0 keeps activations as they are, 1 moves all their range into the weights", ge=0, le=1)
    exclude: tuple[str, ...] = option((), "node names or op types left unsmoothed")
    batch_size: int = option(16, "calibration batch size", ge=1)
    max_batches: int | None = option(None, "calibration batches used (None: all)", ge=1)


@dataclass(frozen=True)
class Smoothing:
    """One activation tensor divided by ``scale`` and the layers whose weights absorb it."""

    tensor: str
    layers: tuple[LinearLayer, ...]
    scale: np.ndarray  # (K,), float64
    activation_peak: float  # max|X| before
    smoothed_peak: float  # max|X / s| after
    # Peak-to-median ratio of the channel maxima max|X_j| (per-tensor int8 wants it small).
    spread_before: float
    spread_after: float


def smoothable_layers(model: Model, exclude: Sequence[str] = ()) -> tuple[list[LinearLayer], list[str]]:
    """MatMul/Gemm layers SmoothQuant can rescale, and ``"node: reason"`` for the others."""
    layers, skipped = find_linear_layers(model, exclude=exclude)
    chosen = []
    for layer in layers:
        if layer.op not in SMOOTHABLE_OPS:
            skipped.append(f"{layer.node}: {layer.op} is not smoothed (MatMul and Gemm only)")
        elif layer.trans_a:
            skipped.append(f"{layer.node}: Gemm with transA is not smoothed")
        elif not layer.node:
            skipped.append(f"unnamed {layer.op}: smoothquant needs node names (run canonicalize)")
        else:
            chosen.append(layer)
    return chosen, skipped


def channel_peaks(model: Model, calib: CalibrationSet, tensors: Sequence[str], *, batch_size: int = 16, max_batches: int | None = None) -> dict[str, np.ndarray]:
    """``max|X_j|`` over calibration tokens for the last axis of every tensor (padding excluded)."""
    peaks: dict[str, np.ndarray] = {}

    def reduce(name: str, value: np.ndarray) -> None:
        if value.size == 0:
            return
        p = np.abs(value.astype(np.float64, copy=False)).reshape(-1, value.shape[-1]).max(axis=0)
        peaks[name] = p if name not in peaks else np.maximum(peaks[name], p)

    capture_activations(model, calib, list(tensors), reduce, batch_size=batch_size, max_batches=max_batches)
    return peaks


def smoothing_scales(act_peak: np.ndarray, weight_peak: np.ndarray, alpha: float) -> np.ndarray:
    """``s_j = a_j^alpha / w_j^(1-alpha)``, 1 where a channel carries no signal."""
    live = (act_peak > 0) & (weight_peak > 0)
    s = np.ones_like(act_peak, dtype=np.float64)
    s[live] = act_peak[live] ** alpha / weight_peak[live] ** (1.0 - alpha)
    return np.clip(s, *SCALE_LIMITS)


def plan_smoothing(model: Model, layers: Sequence[LinearLayer], peaks: dict[str, np.ndarray], alpha: float) -> tuple[list[Smoothing], list[str]]:
    """One :class:`Smoothing` per activation tensor read by ``layers``."""
    by_tensor: dict[str, list[LinearLayer]] = {}
    for layer in layers:
        by_tensor.setdefault(layer.input, []).append(layer)
    plans, skipped = [], []
    for tensor, group in by_tensor.items():
        a = peaks.get(tensor)
        if a is None or a.shape[0] != group[0].in_features:
            skipped.extend(f"{l.node}: input channels of {tensor} do not match the weight rows" for l in group)
            continue
        w = np.max([np.abs(weight_matrix(l, model.initializer_array(l.weight).astype(np.float64))).max(axis=0) for l in group], axis=0)
        s = smoothing_scales(a, w, alpha)
        smoothed = a / s
        ratio = lambda p: float(p.max() / max(np.median(p), 1e-30))  # noqa: E731
        plans.append(Smoothing(tensor, tuple(group), s, float(a.max()), float(smoothed.max()), ratio(a), ratio(smoothed)))
    return plans, skipped


def apply_smoothing(model: Model, plans: Sequence[Smoothing]) -> tuple[Model, dict[str, str]]:
    """A new model with every plan applied; returns it and ``tensor: where the division went``."""
    editor = GraphEditor(model)
    nodes = {n.name: n for n in editor.nodes}
    tensors = editor.tensors()
    placed: dict[str, str] = {}
    for plan in plans:
        x = tensors[plan.tensor]
        readers = [nodes[l.node] for l in plan.layers]
        for layer, node in zip(plan.layers, readers):
            m = weight_matrix(layer, model.initializer_array(layer.weight).astype(np.float64))
            w = matrix_to_weight(layer, m * plan.scale[None, :]).astype(np.float32)
            node.inputs[1] = editor.add_constant(f"{layer.weight}_smoothed", w)
        placed[plan.tensor] = _divide(editor, x, plan.scale, readers)
    return editor.commit(), placed


def _divide(editor: GraphEditor, x, scale: np.ndarray, readers: list) -> str:
    """Make ``readers`` see ``x / scale``: folded into a LayerNormalization when possible, else a Mul."""
    producer = editor.producer(x)
    only_readers = {id(n) for n in editor.consumers(x)} == {id(n) for n in readers}
    if producer is not None and producer.op == "LayerNormalization" and only_readers and not editor.is_graph_output(x):
        gamma = editor.constant_value(producer.inputs[1])
        beta = editor.constant_value(producer.inputs[2]) if len(producer.inputs) > 2 else None
        axis = int(producer.attrs.get("axis", -1))
        last_axis_only = axis == -1 or (x.shape is not None and axis == len(x.shape) - 1)
        if gamma is not None and gamma.shape == scale.shape and last_axis_only and (beta is None or beta.shape == scale.shape):
            producer.inputs[1] = editor.add_constant(f"{producer.name}_scale_smoothed", (gamma / scale).astype(gamma.dtype))
            if beta is not None:
                producer.inputs[2] = editor.add_constant(f"{producer.name}_bias_smoothed", (beta / scale).astype(beta.dtype))
            return f"folded into {producer.name}"
    inv = editor.add_constant(f"{x.name}_smooth_inv", (1.0 / scale).astype(np.float32))
    out = Variable(editor.fresh_name(f"{x.name}_smoothed"), dtype=np.float32, shape=x.shape)
    mul = editor.add_node("Mul", [x, inv], [out], name=editor.fresh_name(f"{x.name}_SmoothQuant"))
    for node in readers:
        for i, t in enumerate(node.inputs):
            if t is x:
                node.inputs[i] = out
    return f"Mul {mul.name}"


def smooth_model(
    model: Model, calib: CalibrationSet, cfg: SmoothQuantConfig, only: set[str] | None = None
) -> tuple[Model, list[Smoothing], dict[str, str], list[str]]:
    """Analyse then apply: ``(smoothed model, plans, placement per tensor, skipped)``.

    ``only`` restricts smoothing to these node names (the layers a later pass quantizes).
    """
    layers, skipped = smoothable_layers(model, cfg.exclude)
    if only is not None:
        layers = [l for l in layers if l.node in only]
    if not layers:
        return model, [], {}, skipped
    peaks = channel_peaks(model, calib, sorted({l.input for l in layers}), batch_size=cfg.batch_size, max_batches=cfg.max_batches)
    plans, more = plan_smoothing(model, layers, peaks, cfg.alpha)
    skipped += more
    if not plans:
        return model, [], {}, skipped
    smoothed, placed = apply_smoothing(model, plans)
    return smoothed, plans, placed, skipped


def smoothing_stats(plans: Sequence[Smoothing], placed: dict[str, str]) -> dict[str, Any]:
    return {
        "smoothed_tensors": len(plans),
        "smoothed_layers": sum(len(p.layers) for p in plans),
        "smoothing": {
            p.tensor: {
                "layers": [l.node for l in p.layers],
                "placed": placed.get(p.tensor, ""),
                "peak": round(p.activation_peak, 4),
                "peak_after": round(p.smoothed_peak, 4),
                "channel_peak_to_median": [round(p.spread_before, 2), round(p.spread_after, 2)],
            }
            for p in plans
        },
    }


@register_pass("smoothquant")
class SmoothQuant(Pass[SmoothQuantConfig]):
    """Per-channel scale migration from activations into MatMul/Gemm weights (exact in real arithmetic)."""

    config_class = SmoothQuantConfig
    requires = frozenset({Requirement.CALIBRATION, Requirement.SHAPES})
    exact = False  # float32 rounding of rescaled weights moves outputs slightly

    def run(self, model: Model, ctx: PassContext) -> PassResult:
        smoothed, plans, placed, skipped = smooth_model(model, ctx.calibration, self.config)
        if not plans:
            return PassResult(model, modified=False, stats={"smoothed_tensors": 0}, skipped=skipped)
        return PassResult(smoothed, modified=True, stats=smoothing_stats(plans, placed), skipped=skipped)
