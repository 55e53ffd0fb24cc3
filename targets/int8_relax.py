"""The Relax side of int8 lowering: the mutator that rewrites QDQ regions.

This module imports TVM at module level; :func:`optc.targets.int8_lowering.lower_int8`
imports it only when a build asks for int8 lowering, so that ``optc --help``
and the passes never load TVM. The maths, what is lowered and what stays float
are described in :mod:`optc.targets.int8_lowering`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant  # relax constants in TVM 0.27's unified IR

from optc.targets.int8_lowering import Int8Report, Region, weight_digest

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
INT8_TYPES = ("int8", "uint8")
# int8 dot products (x86 VNNI, Arm's sdot) multiply groups of 4 input channels: a convolution with fewer
# (an image model's first, on 1 or 3 channels) pads them with zeros, and oneDNN and TVM then run it slower
# than float32 does (the MNIST sample's 1-channel stem at batch 64: 0.29 ms in oneDNN's int8 kernel).
DOT_GROUP = 4


@dataclass(frozen=True)
class Activation:
    """A per-tensor quantised activation: the 8-bit tensor behind a ``dequantize`` and its parameters."""

    data: Any  # relax Expr of dtype int8/uint8
    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True)
class Weight:
    """A constant int8 weight with symmetric scales along its output channel."""

    q: np.ndarray  # int8; conv: (O, I/g, kh, kw); matmul: (K, N)
    scale: np.ndarray  # float32 per output channel (O or N)
    key: str  # digest of the ONNX initializer it came from


@dataclass(frozen=True)
class Lowered:
    """A region's integer form: the expression that replaces it, the weight it read, and how it computes."""

    expr: Any
    weight: Weight
    computes: str = "int8"


def lower(mod: Any, owners: Mapping[str, str], activations: str | None = None, weight_max: int | None = None) -> tuple[Any, Int8Report]:
    """Rewrite the lowerable regions of ``mod``; the very same module when none was lowered.

    ``activations``: feed the integer kernels 8-bit activations of this type only (the other one shifted by 128), for
    targets whose dot-product instruction takes one: int8 for Armv8.2's ``sdot``, uint8 for x86's ``vpdpbusd``.
    """
    report = Int8Report()
    new_mod = Int8Lowering(mod, dict(owners), report, activations, weight_max).run()
    if not report.lowered:
        return mod, report  # nothing rewritten: hand back the very same module
    return relax.transform.DeadCodeElimination()(new_mod), report


@relax.expr_functor.mutator
class Int8Lowering(relax.PyExprMutator):
    """Rewrites each lowerable conv2d/matmul of every Relax function and records each region in ``report``."""

    def __init__(self, mod: Any, owners: dict[str, str], report: Int8Report, activations: str | None = None,
                 weight_max: int | None = None) -> None:
        super().__init__(mod)
        self.mod = mod
        self.activations = activations
        self.weight_max = weight_max
        self.shifted: dict[Any, Any] = {}  # an 8-bit tensor -> its copy shifted into ``activations``
        self.owners = owners
        self.report = report
        self.var2val: dict[Any, Any] = {}
        self.count = 0

    def run(self) -> Any:
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.var2val = relax.analysis.get_var2val(func)
                self.shifted = {}
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: Any) -> Any:
        name = self._op(call)
        if name == "relax.nn.conv2d":
            lowered = self._region("conv2d", call, self._conv2d)
        elif name == "relax.matmul":
            lowered = self._region("matmul", call, self._matmul)
        else:
            lowered = None
        return lowered if lowered is not None else super().visit_call_(call)

    # --- matching --------------------------------------------------------------

    def _value(self, expr: Any) -> Any:
        return self.var2val.get(expr, expr) if isinstance(expr, relax.Var) else expr

    @staticmethod
    def _op(value: Any) -> str:
        """The operator name of a call to a Relax op, else '' (calls to functions, non-calls)."""
        return str(value.op.name) if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else ""

    def _dequantize_behind(self, expr: Any) -> Any:
        """The ``dequantize`` call that ``expr`` is bound to, through one ``permute_dims``; else None."""
        value = self._value(expr)
        if self._op(value) == "relax.permute_dims":
            value = self._value(value.args[0])
        return value if self._op(value) == "relax.dequantize" else None

    def _region(self, op: str, call: Any, lower: Any) -> Any:
        self.count += 1
        if not any(self._dequantize_behind(a) is not None for a in call.args[:2]):
            self.report.float_ops += 1
            return None
        dtype = str(call.ty.dtype)
        result = lower(call) if dtype == "float32" else f"computes in {dtype}, not float32"
        if isinstance(result, Lowered):
            self.report.regions.append(Region(op, self._name(op, call, result.weight), True, computes=result.computes))
            return result.expr
        self.report.regions.append(Region(op, self._name(op, call, None), False, result))
        logger.info("int8 lowering: %s stays float: %s", op, result)
        return None

    def _name(self, op: str, call: Any, weight: Weight | None) -> str:
        key = weight.key if weight is not None else self._weight_key(call.args[1])
        if key is not None and key in self.owners:
            return self.owners[key]
        shape = static_shape(call)
        return f"{op} #{self.count} -> {'x'.join(map(str, shape))}"

    def _weight_key(self, expr: Any) -> str | None:
        value = self._dequantize_behind(expr)
        if value is not None and isinstance(value.args[0], Constant):
            return weight_digest(value.args[0].value.numpy())
        return None

    def _activation(self, expr: Any) -> Activation | str:
        value = self._value(expr)
        if self._op(value) != "relax.dequantize":
            return "activation input is not a DequantizeLinear output"
        data, scale, zero = value.args
        dtype = str(data.ty.dtype)
        if dtype not in INT8_TYPES:
            return f"activation is {dtype}, not int8/uint8"
        if not (isinstance(scale, Constant) and isinstance(zero, Constant)):
            return "activation scale/zero point are not constants"
        s, z = scale.value.numpy(), zero.value.numpy()
        if s.size != 1 or z.size != 1:
            return "activation is quantised per channel (per-tensor needed)"
        return Activation(data, float(s.reshape(())), int(z.reshape(())), dtype)

    def _weight_dq(self, value: Any, out_axis: int, ndim: int) -> Weight | str:
        if self._op(value) != "relax.dequantize":
            return "weight input is not a DequantizeLinear output"
        data, scale, zero = value.args
        if not isinstance(data, Constant):
            return "weight is not a constant"
        q = data.value.numpy()
        if q.dtype != np.int8:
            return f"weight is {q.dtype}, not int8"
        if q.ndim != ndim:
            return f"weight is {q.ndim}-D, not {ndim}-D"
        if not (isinstance(scale, Constant) and isinstance(zero, Constant)):
            return "weight scale/zero point are not constants"
        s, z = scale.value.numpy().astype(np.float32), zero.value.numpy()
        if np.any(z != 0):
            return "weight zero point is not 0 (asymmetric weights)"
        channels = q.shape[out_axis]
        if s.size == 1:
            s = np.full(channels, s.reshape(()), np.float32)
        elif int(value.attrs.axis) % q.ndim != out_axis % q.ndim or s.size != channels:
            return f"weight scales run along axis {int(value.attrs.axis)}, not the output channel"
        return Weight(q, s.reshape(-1), weight_digest(q))

    # --- rewriting -------------------------------------------------------------

    def _conv2d(self, call: Any) -> Lowered | str:
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return f"layout {attrs.data_layout}/{attrs.kernel_layout} (NCHW/OIHW needed)"
        x = self._activation(call.args[0])
        if isinstance(x, str):
            return x
        w = self._weight_dq(self._value(call.args[1]), 0, 4)
        if isinstance(w, str):
            return w
        q = w.q.astype(np.int64)
        overflow = overflow_reason(x, np.abs(q).reshape(q.shape[0], -1).sum(axis=1), self.activations)
        if overflow:
            return overflow
        bb = self.builder_
        if q.shape[1] < DOT_GROUP and int(attrs.groups) == 1:
            return Lowered(self._conv2d_float(call, x, w), w, "float32 on the 8-bit input (fewer than 4 input channels)")
        if q.shape[1] > 1 and (saturates := self._saturates(q)):  # a depthwise one multiplies no pairs
            return saturates
        data, zero_point = self._input(x)
        padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
        if zero_point != 0 and any(padding):
            # float zero padding is z_x in the quantised domain
            top, left, bottom, right = padding
            data = bb.emit(relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], "constant", float(zero_point)))
            padding = [0, 0, 0, 0]
        acc = bb.emit(
            relax.op.nn.conv2d(
                data,
                relax.const(w.q, "int8"),
                strides=[int(s) for s in attrs.strides],
                padding=padding,
                dilation=[int(d) for d in attrs.dilation],
                groups=int(attrs.groups),
                out_dtype="int32",
            )
        )
        out = q.shape[0]
        if zero_point != 0:
            correction = (zero_point * q.reshape(out, -1).sum(axis=1)).astype(np.int32).reshape(1, out, 1, 1)
            acc = bb.emit(relax.op.subtract(acc, relax.const(correction, "int32")))
        scale = (np.float64(x.scale) * w.scale.astype(np.float64)).astype(np.float32).reshape(1, out, 1, 1)
        return Lowered(relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")), relax.const(scale, "float32")), w)

    def _conv2d_float(self, call: Any, x: Activation, w: Weight) -> Any:
        """The convolution in float32 on the 8-bit input: ``conv2d(x_q - z_x, W_q s_x s_w)``, the products onnxruntime's
        QDQ evaluation forms (``(x_q - z_x) s_x`` times ``W_q s_w``), rounded once more at most. The scales sit in the
        weights, so the bias, activation and next quantize after it fuse into its kernel as in any float chain: the
        MNIST sample's stem at batch 64 otherwise wrote its 3 MB float output before scaling it."""
        attrs = call.attrs
        bb = self.builder_
        data = bb.emit(relax.op.astype(self.visit_expr(x.data), "float32"))
        if x.zero_point != 0:  # float zero padding is z_x in the quantised domain: 0 once z_x is taken off
            data = bb.emit(relax.op.subtract(data, relax.const(np.float32(x.zero_point))))
        scale = np.float64(x.scale) * w.scale.astype(np.float64).reshape(-1, 1, 1, 1)
        return relax.op.nn.conv2d(
            data,
            relax.const((w.q.astype(np.float64) * scale).astype(np.float32)),
            strides=[int(s) for s in attrs.strides],
            padding=[int(p) for p in attrs.padding],
            dilation=[int(d) for d in attrs.dilation],
            groups=int(attrs.groups),
            out_dtype="float32",
        )

    def _matmul(self, call: Any) -> Lowered | str:
        x = self._activation(call.args[0])
        if isinstance(x, str):
            return x
        value = self._value(call.args[1])
        if self._op(value) == "relax.permute_dims":
            axes = value.attrs.axes
            if axes is None or [int(a) for a in axes] != [1, 0]:
                return "weight is permuted other than a 2-D transpose"
            w = self._weight_dq(self._value(value.args[0]), 0, 2)  # Gemm transB=1: (N, K), scales on N
            if isinstance(w, str):
                return w
            w = Weight(np.ascontiguousarray(w.q.T), w.scale, w.key)
        else:
            w = self._weight_dq(value, 1, 2)  # MatMul / Gemm transB=0: (K, N), scales on N
            if isinstance(w, str):
                return w
        q = w.q.astype(np.int64)
        overflow = overflow_reason(x, np.abs(q).sum(axis=0), self.activations) or self._saturates(q)
        if overflow:
            return overflow
        bb = self.builder_
        data, zero_point = self._input(x)
        acc = bb.emit(relax.op.matmul(data, relax.const(w.q, "int8"), out_dtype="int32"))
        if zero_point != 0:
            correction = (zero_point * q.sum(axis=0)).astype(np.int32)
            acc = bb.emit(relax.op.subtract(acc, relax.const(correction, "int32")))
        scale = (np.float64(x.scale) * w.scale.astype(np.float64)).astype(np.float32)
        return Lowered(relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")), relax.const(scale, "float32")), w)

    def _saturates(self, q: np.ndarray) -> str:
        """A reason when the target's int8 kernels would saturate on these weights (int8_lowering: ``weight_max``)."""
        largest = int(np.abs(q).max(initial=0))
        if self.weight_max is None or largest <= self.weight_max:
            return ""
        return (f"weights up to {largest}: on a CPU without VNNI int8 kernels add products in pairs into int16, which "
                f"weights over {self.weight_max} can saturate (quantize's reduce_range writes 7-bit ones)")

    def _input(self, x: Activation) -> tuple[Any, int]:
        """The 8-bit input the integer kernel reads, and its zero point.

        Where the target's dot product takes the other 8-bit type, the input is shifted by 128 into it: uint8 ``x_q``
        becomes the int8 ``x_q - 128`` with zero point ``z_x - 128`` (Armv8.2's ``sdot``), int8 ``x_q`` the uint8
        ``x_q + 128`` with zero point ``z_x + 128`` (x86's ``vpdpbusd``). The same real values, exactly (``x_q - z_x``
        is unchanged), so the instruction can multiply it by the int8 weights. FuseOps puts the shift into the
        producer's requantisation epilogue.
        """
        data = self.visit_expr(x.data)
        shift = activation_shift(x.dtype, self.activations)
        if not shift:
            return data, x.zero_point
        if data not in self.shifted:  # once per tensor, however many kernels read it
            wide = relax.op.add(relax.op.astype(data, "int16"), relax.const(shift, "int16"))
            self.shifted[data] = self.builder_.emit(relax.op.astype(wide, self.activations))
        return self.shifted[data], x.zero_point + shift


def activation_shift(dtype: str, activations: str | None) -> int:
    """What a ``dtype`` activation is shifted by to become ``activations`` (+128 into uint8, -128 into int8); 0 when it
    already is, or no type is asked for."""
    if activations is None or dtype == activations:
        return 0
    return 128 if activations == "uint8" else -128


def overflow_reason(x: Activation, abs_row_sums: np.ndarray, activations: str | None = None) -> str:
    """A reason when ``sum |x_q| |W_q|`` could leave int32 for some output channel, else ''. Bounded for the type the
    kernel reads: ``activations``, where ``_input`` shifts the other type into it (zero point moved by 128)."""
    shift = activation_shift(x.dtype, activations)
    dtype, zero_point = (activations, x.zero_point + shift) if shift else (x.dtype, x.zero_point)
    peak = 255 if dtype == "uint8" else 128
    worst = int(abs_row_sums.max(initial=0)) * (peak + abs(zero_point))
    if worst > INT32_MAX:
        return f"int32 accumulator could overflow (bound {worst:.3g})"
    return ""


def static_shape(expr: Any) -> list[int]:
    try:
        return [int(d) for d in expr.ty.shape]
    except (AttributeError, TypeError, ValueError):  # untyped, or symbolic dims
        return []
