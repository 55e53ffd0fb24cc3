"""QDQ arithmetic and writing QuantizeLinear/DequantizeLinear pairs into a graph.

Affine quantisation ``q = clip(round(x / s) + z, qmin, qmax)``, ``x' = (q - z) s``.

* Activations over a calibrated range ``[lo, hi]`` (zero inside):
  ``s = (hi - lo) / (qmax - qmin)``, ``z = round(qmin - lo / s)`` (asymmetric), or
  ``s = max(|lo|, |hi|) / 127``, ``z = 0`` (symmetric int8).
* Weights, symmetric int8 per output channel ``c``: ``s_c = max|W_c| / 127``
  (``/ 63`` with ``reduce_range``: 7-bit weights, which cannot saturate the
  16-bit intermediate sums of x86 int8 kernels without VNNI).
* Biases as int32 with ``s_b = s_x s_w[c]`` and ``z = 0``: the integer kernel adds
  them straight to the int32 accumulator ``sum (q_x - z_x) q_w``, which is what
  onnxruntime's QDQ fusion expects.
* GPTQ rounding (:func:`gptq_quantize`): columns of ``M`` (out x in) are rounded
  one at a time and the error of column ``i``, weighted by the inverse Hessian
  ``H^-1`` of the layer input (``H = E[x x^T]``), is pushed onto the columns not
  yet rounded, minimising ``||M X - M' X||^2`` greedily (Frantar et al. 2022);
  the sweep is :func:`optc.passes.numerics.obs.obs_sweep`, shared with SparseGPT pruning.

Graph writing goes through :class:`optc.ir.graph.GraphEditor`: constants are new
initializers, so shared weights are never changed under another node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from optc.ir.graph import GraphEditor, Node, Tensor, Variable
from optc.passes.numerics.obs import inverse_hessian_factor, obs_sweep

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class ActivationParams:
    scale: float
    zero_point: int
    dtype: np.dtype

    @property
    def bounds(self) -> tuple[int, int]:
        info = np.iinfo(self.dtype)
        return int(info.min), int(info.max)


def activation_params(lo: float, hi: float, *, unsigned: bool = True, symmetric: bool = False) -> ActivationParams:
    """Scale and zero point covering ``[lo, hi]`` (which must contain zero)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        dtype = np.dtype(np.int8)
        peak = max(-lo, hi)
        scale = peak / 127 if peak > 0 else 1.0
        return ActivationParams(float(np.float32(scale)), 0, dtype)
    dtype = np.dtype(np.uint8 if unsigned else np.int8)
    info = np.iinfo(dtype)
    span = hi - lo
    scale = float(np.float32(span / (info.max - info.min))) if span > 0 else 1.0
    zero = int(np.clip(np.round(info.min - lo / scale), info.min, info.max))
    return ActivationParams(scale, zero, dtype)


def fake_quantize(x: np.ndarray, p: ActivationParams) -> np.ndarray:
    qmin, qmax = p.bounds
    return (np.clip(np.round(x / p.scale) + p.zero_point, qmin, qmax) - p.zero_point) * p.scale


def weight_scales(m: np.ndarray, *, per_channel: bool = True, reduce_range: bool = False) -> np.ndarray:
    """Per-row (output channel) symmetric scales of a weight matrix ``(out, in)``."""
    qmax = 63 if reduce_range else 127
    peak = np.abs(m).max(axis=1) if per_channel else np.full(m.shape[0], np.abs(m).max())
    scale = (peak / qmax).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def round_weights(m: np.ndarray, scale: np.ndarray, *, reduce_range: bool = False) -> np.ndarray:
    qmax = 63 if reduce_range else 127
    return np.clip(np.round(m / scale[:, None]), -qmax, qmax).astype(np.int8)


@dataclass
class _RoundRule:
    """GPTQ's column rule for :func:`optc.passes.numerics.obs.obs_sweep`: round to the row's int grid."""

    scale: np.ndarray  # (rows,), float64
    qmax: int

    def start_block(self, start: int, block: np.ndarray, diag: np.ndarray) -> None:
        pass

    def column(self, j: int, block: np.ndarray, diag: np.ndarray) -> np.ndarray:
        return np.clip(np.round(block[:, j] / self.scale), -self.qmax, self.qmax) * self.scale


def gptq_quantize(m: np.ndarray, scale: np.ndarray, hessian: np.ndarray, *, reduce_range: bool = False, damp: float = 0.01, block: int = 128) -> np.ndarray:
    """Integer weights for ``m`` (out x in) rounded column by column with error feedback through ``hessian``.

    ``hessian`` is the undamped ``E[x x^T]``; ``damp * mean(diag)`` is added before factorising.
    Input channels that never carry signal (zero diagonal) get zero weights.
    """
    qmax = 63 if reduce_range else 127
    w = m.astype(np.float64).copy()
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    s = scale.astype(np.float64)
    swept = obs_sweep(w, inverse_hessian_factor(h, damp), _RoundRule(s, qmax), block_size=block)
    return np.clip(np.round(swept / s[:, None]), -qmax, qmax).astype(np.int8)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - approx) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    if noise == 0:
        return float("inf")
    return 10 * np.log10(signal / noise) if signal > 0 else float("-inf")


# --- graph writing ------------------------------------------------------------------

def insert_activation_qdq(editor: GraphEditor, tensor: Tensor, params: ActivationParams, consumers: list[Node]) -> Tensor:
    """``tensor -> QuantizeLinear -> DequantizeLinear``, read by ``consumers`` in place of ``tensor``."""
    scale = editor.add_constant(f"{tensor.name}_scale", np.array(params.scale, dtype=np.float32))
    zero = editor.add_constant(f"{tensor.name}_zero_point", np.array(params.zero_point, dtype=params.dtype))
    quantized = Variable(editor.fresh_name(f"{tensor.name}_quantized"), dtype=params.dtype, shape=tensor.shape)
    dequantized = Variable(editor.fresh_name(f"{tensor.name}_dequantized"), dtype=np.float32, shape=tensor.shape)
    editor.add_node("QuantizeLinear", [tensor, scale, zero], [quantized], name=editor.fresh_name(f"{tensor.name}_QuantizeLinear"))
    editor.add_node("DequantizeLinear", [quantized, scale, zero], [dequantized], name=editor.fresh_name(f"{tensor.name}_DequantizeLinear"))
    for node in consumers:
        for i, t in enumerate(node.inputs):
            if t is tensor:
                node.inputs[i] = dequantized
    return dequantized


def dequantized_constant(editor: GraphEditor, stem: str, q: np.ndarray, scale: np.ndarray, axis: int | None) -> Tensor:
    """An integer initializer behind a DequantizeLinear (per-axis when ``axis`` is given)."""
    values = editor.add_constant(f"{stem}_quantized", q)
    if axis is not None:
        s = editor.add_constant(f"{stem}_scale", scale.astype(np.float32))
        zero = editor.add_constant(f"{stem}_zero_point", np.zeros(scale.shape, dtype=q.dtype))
    else:
        s = editor.add_constant(f"{stem}_scale", np.array(scale.ravel()[0], dtype=np.float32))
        zero = editor.add_constant(f"{stem}_zero_point", np.zeros((), dtype=q.dtype))
    out = Variable(editor.fresh_name(f"{stem}_dequantized"), dtype=np.float32, shape=list(q.shape))
    attrs = {"axis": axis} if axis is not None else {}
    editor.add_node("DequantizeLinear", [values, s, zero], [out], attrs=attrs, name=editor.fresh_name(f"{stem}_DequantizeLinear"))
    return out


def bias_int32(bias: np.ndarray, input_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Bias as int32 with scale ``s_x s_w``, or None when it would overflow int32."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    q = np.round(bias.astype(np.float64) / scale)
    if np.any(np.abs(q) > INT32_MAX):
        return None
    return q.astype(np.int32), scale
