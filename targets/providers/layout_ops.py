"""Rewrites that let ConvertLayout keep activations in NHWC: clips, variadic element-wise ops, squeezes.

**Clips as maximum/minimum.** TVM's ONNX frontend writes ``Clip`` (any opset) as TE
calls of ``topi.maximum`` and ``topi.minimum``, and ``HardSigmoid``/``HardSwish``
as ``R.clip``; neither has a layout rule, so converting the convolutions to NHWC
wraps every clip in two transposes. On a MobileNetV3-style classifier (RapidOCR's
direction model) the hard-swish kernels with their transposes took 0.5 of the
artifact's 1.1 ms. ``R.maximum``/``R.minimum`` with a scalar bound are element-wise
binary ops, which ConvertLayout keeps in any layout. :mod:`.chains` reads the pair
as the clip post-op a provider fuses. Only calls whose meaning is certain are
rewritten: ``R.clip``, and ``call_tir`` of a function the TE emitter named
``maximum``/``minimum`` (``maximum1``, ...) on a tensor and a scalar of its dtype,
returning the tensor's shape.

**Per-tensor quantize and dequantize as element-wise ops.** ``R.quantize`` and
``R.dequantize`` have no layout rule either: in an int8 model every activation
between two NHWC convolutions went back to NCHW to be requantised, and forward
again (on the sample CNN at batch 64, 0.7 of the artifact's 3.2 ms were these
transposes and their copies). With a scalar scale and zero point both are
element-wise, written as TVM's own legalisation computes them (``round(x / s) +
zp`` clipped to the type's range and cast; ``(int32(q) - zp) · s``), so the
values are bit for bit the same and FuseOps fuses them back into one kernel.
Per-channel ones (an axis that moves with the layout) and constants (biases,
which :mod:`.chains` reads as ``dequantize`` calls) are left as they are.

**Sum/Max/Min/Mean of several tensors as a chain of binary ops.** The frontend
broadcasts each input, stacks them on a new axis and reduces it; ConvertLayout
fails on the 5-D stack (``Invalid SLayout``: ResNet-50 and ShuffleNet from the
onnx wheel, whose residuals are ``Sum``), and the stack copies every input once
more. The frontend's own fallback for unknown shapes is the pairwise form,
which ONNX's multidirectional broadcasting makes equivalent; a residual written
as ``add`` is also what a provider fuses into the convolution before it.

**Squeezes with negative axes, counted from the front.** TVM 0.27's layout rule
for ``R.squeeze`` indexes the layout with the axis as given: ``axis=[-1]`` after a
converted convolution throws ``std::bad_alloc`` and the whole model stays NCHW
(Silero VAD's ``Squeeze(-1)`` after its last 1-D convolution: 5x onnxruntime's
time with TVM's kernels, which have no NCHW template). ``axis=[a + rank]`` is the
same op; every other axis-taking op tried (sum, mean, softmax, concat, take, ...)
converts negative axes correctly.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from optc.targets.providers.chains import dtype_of, module_bindings, prim_number, static_shape
from optc.targets.providers.offload import rewrite_functions

_TE_NAME = re.compile(r"(maximum|minimum)\d*$")


def layout_friendly(mod: Any) -> Any:
    """``mod`` with its clips, variadic element-wise ops and negative squeeze axes rewritten (the same module when there
    are none)."""
    return rewritten(_Rewriter(mod), mod)


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: Any) -> None:
        super().__init__(mod)
        self.count = 0
        self.var2val = module_bindings(mod)
        self.clip, self.call_tir, self.where, self.stack, self.broadcast_to, self.quantize, self.dequantize, self.max_pool2d, self.squeeze = (
            tvm.ir.Op.get(f"relax.{name}")
            for name in ("clip", "call_tir", "where", "stack", "broadcast_to", "quantize", "dequantize", "nn.max_pool2d", "squeeze"))

    def visit_call_(self, call: Any) -> Any:
        if call.op.same_as(self.squeeze):
            axes = call.attrs.axis
            rank = int(getattr(call.args[0].ty, "ndim", -1))  # known for symbolic shapes too
            if axes is not None and rank > 0 and any(int(a) < 0 for a in axes):
                self.count += 1
                return relax.op.squeeze(self.visit_expr(call.args[0]), [int(a) % rank for a in axes])
        elif call.op.same_as(self.quantize) or call.op.same_as(self.dequantize):
            out = self._pooled(call) if call.op.same_as(self.quantize) else None
            out = out if out is not None else self._qdq(call)
            if out is not None:
                self.count += 1
                return out
        elif call.op.same_as(self.clip):
            bounds = [prim_number(a) for a in call.args[1:3]]
            if None not in bounds and dtype_of(call) in ("float32", "float16", "float64"):
                self.count += 1
                out = self.visit_expr(call.args[0])
                lo, hi = bounds
                dtype = dtype_of(call)
                if not math.isinf(lo):
                    out = self.builder_.emit(relax.op.maximum(out, relax.const(lo, dtype)))
                return relax.op.minimum(out, relax.const(hi, dtype)) if not math.isinf(hi) else out
        elif isinstance(call.op, tvm.ir.Op) and call.op.name in _PAIRWISE:
            stacked = self._value(call.args[0])
            parts = self._stacked(stacked) if _reduces_axis0(call) else None
            if parts:
                self.count += 1
                out = self.visit_expr(parts[0])
                for part in parts[1:]:
                    out = self.builder_.emit(_PAIRWISE[call.op.name](out, self.visit_expr(part)))
                if call.op.name == "relax.mean":
                    out = relax.op.divide(out, relax.const(len(parts), dtype_of(call)))
                return out
        elif call.op.same_as(self.call_tir) and isinstance(call.args[0], relax.GlobalVar):
            match = _TE_NAME.match(call.args[0].name_hint)
            args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else ()
            if match and len(args) == 2 and static_shape(args[1]) == () and dtype_of(args[0]) == dtype_of(args[1]) == dtype_of(call) \
                    and static_shape(args[0]) is not None and static_shape(args[0]) == static_shape(call):
                self.count += 1
                op = relax.op.maximum if match.group(1) == "maximum" else relax.op.minimum
                return op(self.visit_expr(args[0]), self._bound(args[1]))
        return super().visit_call_(call)

    def _value(self, expr: Any) -> Any:
        """What a variable of the input module is bound to (an expression that is not a variable, as it is). From the
        input's own bindings: the builder's lose a variable whose value this rewriter changed."""
        if not isinstance(expr, relax.Var):
            return expr
        return self.var2val[expr] if expr in self.var2val else self.lookup_binding(expr)

    def _scalar_params(self, call: Any) -> tuple[float, int] | None:
        """A quantize's or dequantize's constant per-tensor (scale, zero point), else None."""
        params = [self._value(a) for a in call.args[1:3]]
        if not all(isinstance(a, Constant) and a.value.numpy().size == 1 for a in params):
            return None
        scale, zero = (a.value.numpy().reshape(()) for a in params)
        return (float(scale), int(zero)) if scale.dtype == np.float32 else None

    def _pooled(self, call: Any) -> Any:
        """``quantize(max_pool2d(dequantize(x)))`` with one scale and zero point on both sides, as ``max_pool2d(x)``.

        Dequantizing is increasing, so the max of the dequantized window is the dequantized max, which the quantize
        gives back exactly; the 8-bit pool's padding (the type's least value) never wins a window that has a pixel.
        ResNet-18 int8 spent 0.57 of 6 ms dequantizing its stem's 112x112x64 map to pool it in float and quantize
        it again; onnxruntime drops such pairs the same way."""
        pool = self._value(call.args[0])
        if not (isinstance(pool, relax.Call) and pool.op.same_as(self.max_pool2d)):
            return None
        dq = self._value(pool.args[0])
        if not (isinstance(dq, relax.Call) and dq.op.same_as(self.dequantize)) or dtype_of(dq.args[0]) != str(call.attrs.out_dtype):
            return None
        params = self._scalar_params(call)
        if params is None or params != self._scalar_params(dq):
            return None
        return relax.Call(pool.op, [self.visit_expr(dq.args[0])], pool.attrs)

    def _qdq(self, call: Any) -> Any:
        """A per-tensor quantize or dequantize of an activation as element-wise ops (module docstring); None otherwise."""
        data = call.args[0]
        params = self._scalar_params(call)
        if isinstance(self._value(data), Constant) or params is None:
            return None
        scale, zero = np.float32(params[0]), params[1]
        out_dtype, in_dtype = str(call.attrs.out_dtype), dtype_of(data)
        x = self.visit_expr(data)
        if call.op.same_as(self.quantize):
            if in_dtype != "float32" or out_dtype not in ("uint8", "int8"):
                return None
            return quantize_ops(self.builder_.emit, x, float(scale), zero, out_dtype)
        if in_dtype not in ("uint8", "int8") or out_dtype != "float32":
            return None
        shifted = relax.op.subtract(relax.op.astype(x, "int32"), relax.const(int(zero), "int32"))
        return relax.op.multiply(relax.op.astype(self.builder_.emit(shifted), "float32"), relax.const(scale, "float32"))

    def _stacked(self, value: Any) -> list[Any] | None:
        """The tensors of ``stack([broadcast_to(x, s), ...], axis=0)``, each before its broadcast; None otherwise."""
        if not (isinstance(value, relax.Call) and value.op.same_as(self.stack) and int(value.attrs.axis) == 0):
            return None
        fields = value.args[0].fields if isinstance(value.args[0], relax.Tuple) else None
        if not fields or len(fields) < 2:
            return None
        parts = []
        for field in fields:
            inner = self._value(field)
            parts.append(inner.args[0] if isinstance(inner, relax.Call) and inner.op.same_as(self.broadcast_to) else field)
        if any(dtype_of(p) not in ("float32", "float16", "float64") for p in parts):
            return None
        return parts

    def _bound(self, expr: Any) -> Any:
        """The frontend's NaN guard ``where(isnan(c), ±inf, c)`` on a constant ``c`` that is not NaN is ``c``: a
        constant bound is what :mod:`.chains` fuses as a clip post-op."""
        value = self._value(expr)
        if isinstance(value, relax.Call) and value.op.same_as(self.where) and isinstance(value.args[2], Constant):
            bound = value.args[2].value.numpy()
            if bound.size == 1 and not np.isnan(bound).any():
                return value.args[2]
        return self.visit_expr(expr)


def quantize_ops(emit: Any, x: Any, scale: float, zero: int, dtype: str) -> Any:
    """A per-tensor ``R.quantize`` of float32 ``x`` as the element-wise ops TVM's legalisation computes:
    ``round(x / s) + z`` clipped to ``dtype``'s range, then cast (the cast returned, not emitted). :mod:`.chains`
    reads this form as the quantize a provider's int8 chain absorbs."""
    info = np.iinfo(dtype)
    value = relax.op.add(relax.op.round(relax.op.divide(x, relax.const(scale, "float32"))), relax.const(float(zero), "float32"))
    value = relax.op.maximum(relax.op.minimum(emit(value), relax.const(float(info.max), "float32")), relax.const(float(info.min), "float32"))
    return relax.op.astype(emit(value), dtype)


def deconvs_as_matmuls(mod: Any) -> Any:
    """``mod`` with each transposed convolution whose kernel equals its stride written as a matmul and a pixel shuffle.

    Such a ConvTranspose (2x2 stride 2: DBNet's and U-Nets' upsampling) never overlaps its windows: every
    input pixel's channels times the weight give its own KHxKW block of the output,
    ``y[n, o, i*KH + a, j*KW + b] = sum_c x[n, c, i, j] w[c, o, a, b]``. As one matmul over the channels
    (``[N, H, W, C] @ [C, O*KH*KW]``) it is a GEMM a provider runs at full speed; oneDNN's deconvolution took
    7 ms for RapidOCR detector's 24->24 one and 36 ms for its 24->1 one, TVM's 8. The same module when none.
    """
    return rewritten(_DeconvRewriter(mod), mod)


def rewritten(rewriter: Any, mod: Any) -> Any:
    """``mod`` through ``rewriter``, or ``mod`` itself when it rewrote nothing."""
    new_mod = rewrite_functions(rewriter, mod)
    if not rewriter.count:
        return mod
    # a rewritten call returns a var the mutator binds again (lv188 = lv10_1): ConvertLayout has no rule for such an
    # alias and put ResNet-50's residual adds back in NCHW, between transposes (22 of its 107 ms)
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(new_mod))


@relax.expr_functor.mutator
class _DeconvRewriter(relax.PyExprMutator):
    def __init__(self, mod: Any) -> None:
        super().__init__(mod)
        self.count = 0
        self.deconv = tvm.ir.Op.get("relax.nn.conv2d_transpose")

    def visit_call_(self, call: Any) -> Any:
        if not call.op.same_as(self.deconv):
            return super().visit_call_(call)
        a = call.attrs
        weight = self.lookup_binding(call.args[1]) if isinstance(call.args[1], relax.Var) else call.args[1]
        x_shape, out_shape = static_shape(call.args[0]), static_shape(call)
        if not isinstance(weight, Constant) or x_shape is None or out_shape is None or len(x_shape) != 4:
            return super().visit_call_(call)
        w = weight.value.numpy()
        c, o, kh, kw = w.shape
        n, _, h, wd = x_shape
        plain = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout)) == ("NCHW", "IOHW", "NCHW") and int(a.groups) == 1
        plain = plain and w.dtype == np.float32 and dtype_of(call.args[0]) == "float32" and all(int(v) == 1 for v in a.dilation)
        strides = [int(v) for v in a.strides]
        if plain and strides != [kh, kw] and out_shape == (n, o, h * strides[0], wd * strides[1]):
            sub = _subpixel(self, call, x_shape, w, strides, [int(v) for v in a.padding])
            if sub is not None:
                return sub
        if not plain or strides != [kh, kw] or any(int(v) for v in a.padding) or any(int(v) for v in a.output_padding) \
                or out_shape != (n, o, h * kh, wd * kw):
            return super().visit_call_(call)
        self.count += 1
        R = relax.op
        emit = self.builder_.emit
        rows = emit(R.permute_dims(self.visit_expr(call.args[0]), [0, 2, 3, 1]))
        y = emit(R.matmul(rows, relax.const(np.ascontiguousarray(w.reshape(c, o * kh * kw)))))
        y = emit(R.reshape(y, [n, h, wd, o, kh, kw]))
        y = emit(R.permute_dims(y, [0, 3, 1, 4, 2, 5]))
        return R.reshape(y, [n, o, h * kh, wd * kw])


def _phase_taps(k: int, s: int, p: int) -> tuple[int, int, np.ndarray]:
    """For one axis of a transposed convolution (kernel k, stride s, padding p, output s times the input): the input
    offsets t = i - q an output y = q*s + a reads, t_min .. t_max over every phase a, and the kernel index each phase
    reads at each offset (-1 where it reads none): y = i*s + ky - p, so ky = a + p - t*s."""
    t_min = min(-((k - 1 - a - p) // s) for a in range(s))
    t_max = max((a + p) // s for a in range(s))
    taps = np.full((s, t_max - t_min + 1), -1)
    for a in range(s):
        for t in range(t_min, t_max + 1):
            ky = a + p - t * s
            if 0 <= ky < k:
                taps[a, t - t_min] = ky
    return t_min, t_max, taps


def _subpixel(rewriter: Any, call: Any, x_shape: tuple[int, ...], w: np.ndarray, strides: list[int], padding: list[int]) -> Any:
    """A transposed convolution whose output is stride times its input (4x4 stride 2 padding 1: CenterNet's and DLA's
    upsampling, GAN generators) as one NHWC convolution to stride x stride phases of the output channels, then a pixel
    shuffle: output pixel (q*s + a, r*s + b) is phase (a, b) of input pixel (q, r), a small convolution over the input
    (the sub-pixel decomposition). oneDNN's deconvolution ran LORE's 256->256 one at 96x96 at 17 G multiply-adds a
    second (571 ms); as a convolution it is a kernel the providers run at full speed, and Winograd's where 3x3. None
    where the padding is asymmetric or the phases' window is wider than the kernel."""
    c, o, kh, kw = w.shape
    (sh, sw), (pt, pl, pb, pr) = strides, padding
    if pt != pb or pl != pr or min(sh, sw) < 2:
        return None
    ty0, ty1, taps_y = _phase_taps(kh, sh, pt)
    tx0, tx1, taps_x = _phase_taps(kw, sw, pl)
    if ty0 > 0 or tx0 > 0 or ty1 < 0 or tx1 < 0 or taps_y.shape[1] > kh or taps_x.shape[1] > kw:
        return None
    # OHWI weights: output channel (o, a, b), window position (ty, tx), input channel c
    wn = np.zeros((o, sh, sw, taps_y.shape[1], taps_x.shape[1], c), np.float32)
    for a in range(sh):
        for b in range(sw):
            for ty, ky in enumerate(taps_y[a]):
                for tx, kx in enumerate(taps_x[b]):
                    if ky >= 0 and kx >= 0:
                        wn[:, a, b, ty, tx, :] = w[:, :, ky, kx].T
    rewriter.count += 1
    n, _, h, wd = x_shape
    R = relax.op
    emit = rewriter.builder_.emit
    x = emit(R.permute_dims(rewriter.visit_expr(call.args[0]), [0, 2, 3, 1]))
    y = emit(R.nn.conv2d(x, relax.const(wn.reshape(o * sh * sw, *wn.shape[3:])), padding=[-ty0, -tx0, ty1, tx1],
                         data_layout="NHWC", kernel_layout="OHWI"))
    y = emit(R.reshape(y, [n, h, wd, o, sh, sw]))
    y = emit(R.permute_dims(y, [0, 3, 1, 4, 2, 5]))
    return R.reshape(y, [n, o, h * sh, wd * sw])


_PAIRWISE = {"relax.sum": relax.op.add, "relax.max": relax.op.maximum, "relax.min": relax.op.minimum, "relax.mean": relax.op.add}


def _reduces_axis0(call: Any) -> bool:
    axes = call.attrs.axis
    return axes is not None and [int(a) for a in axes] == [0] and not bool(call.attrs.keepdims)

