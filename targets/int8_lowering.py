"""Lower the int8 QDQ regions of a Relax module to integer kernels.

TVM's ONNX frontend imports ``DequantizeLinear`` as ``R.dequantize`` and the
Conv/MatMul/Gemm after it as a float ``R.nn.conv2d``/``R.matmul``: an int8 QDQ
model compiles, but computes in float. This module rewrites, after import, every

    conv2d(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w[o], 0, axis=o))
    matmul(dequantize(x_q, s_x, z_x), dequantize(W_q, s_w[n], 0, axis=n))   (also W_q^T via permute_dims, Gemm transB=1)

into an integer kernel with int32 accumulation and a float epilogue. With
per-tensor activation parameters and symmetric per-output-channel weights,

    y[o] = sum_k (x_q[k] - z_x) s_x * W_q[o,k] s_w[o]
         = s_x s_w[o] * (sum_k x_q[k] W_q[o,k]  -  z_x sum_k W_q[o,k])

so ``acc = conv2d(x_q, W_q, out_dtype=int32)`` (uint8/int8 x int8) minus the
per-channel constant ``z_x * sum_k W_q[o,k]`` is the exact integer sum, and one
multiply by ``s_x s_w[o]`` turns it back into the float the rest of the graph
(bias add, ReLU, residual adds) expects. Zero padding in float is the value
``z_x`` in the quantised domain, so a padded conv with ``z_x != 0`` pads ``x_q``
explicitly with ``z_x`` first (``nn.pad``) and runs the integer conv unpadded;
the correction then holds at the borders too.

Requantisation: the next layer's ``QuantizeLinear`` stays a ``R.quantize`` on
that float epilogue, and the next integer conv reads its uint8/int8 output
directly (its ``dequantize`` is bypassed), so between quantised layers the
tensors are 8-bit; FuseOps puts scale, bias, ReLU and quantize into the integer
kernel's epilogue. Where a region ends (a float consumer), the epilogue is the
dequantisation to float.

The result equals onnxruntime's float evaluation of the QDQ graph up to float32
rounding of the sum (ours is exact before the scale); an intermediate value that
lands within rounding of a ``.5`` boundary can quantise one step apart.

Regions that do not fit (per-tensor activation scale and zero point, constant
int8 weight with zero weight zero point and scales along the output channel,
NCHW/OIHW layouts, an int32 sum that cannot overflow) stay in float and are
reported with the reason.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from optc.errors import TargetError
from optc.ir.model import Model

logger = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
INT8_TYPES = ("int8", "uint8")


@dataclass(frozen=True)
class Region:
    """One quantised conv2d/matmul of the Relax module and what became of it."""

    op: str  # "conv2d" or "matmul"
    name: str  # the ONNX node (found through its weight), else a description
    lowered: bool
    reason: str = ""  # why it stayed float

    def to_dict(self) -> dict[str, Any]:
        out = {"op": self.op, "node": self.name}
        if not self.lowered:
            out["reason"] = self.reason
        return out


@dataclass
class Int8Report:
    regions: list[Region] = field(default_factory=list)
    float_ops: int = 0  # conv2d/matmul with no dequantized input at all (never quantised)

    @property
    def lowered(self) -> list[Region]:
        return [r for r in self.regions if r.lowered]

    @property
    def left_float(self) -> list[Region]:
        return [r for r in self.regions if not r.lowered]

    def to_dict(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "lowered": len(self.lowered),
            "lowered_regions": [r.to_dict() for r in self.lowered],
            "left_float": [r.to_dict() for r in self.left_float],
            "unquantized_ops": self.float_ops,
        }


@dataclass(frozen=True)
class _Activation:
    data: Any  # relax Expr of dtype int8/uint8
    scale: float
    zero_point: int
    dtype: str


@dataclass(frozen=True)
class _Weight:
    q: np.ndarray  # int8; conv: (O, I/g, kh, kw); matmul: (K, N)
    scale: np.ndarray  # float32 per output channel (O or N)
    key: str  # digest of the ONNX initializer it came from


def weight_digest(q: np.ndarray) -> str:
    return hashlib.sha1(str(q.shape).encode() + np.ascontiguousarray(q).tobytes()).hexdigest()


def weight_owners(model: Model) -> dict[str, str]:
    """Digest of each int8 weight initializer behind a DequantizeLinear -> the Conv/Gemm/MatMul reading it.

    The Relax module keeps the weight bytes unchanged, so the report can name
    ONNX nodes instead of Relax variables.
    """
    producers = {o: n for n in model.graph.node for o in n.output}
    owners: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        dq = producers.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = model.initializer_array(dq.input[0])
        if q is None or q.dtype != np.int8:
            continue
        key = weight_digest(q)
        owners[key] = f"{owners[key]}+{node.name}" if key in owners else node.name or node.op_type
    return owners


def lower_int8(mod: Any, owners: Mapping[str, str] | None = None) -> tuple[Any, Int8Report]:
    """Rewrite every lowerable int8 region of ``mod`` (a Relax IRModule from the ONNX frontend).

    Returns the new module (dead float weight dequantisations removed) and a
    report of the regions lowered and those left in float, with reasons.
    """
    from tvm import relax

    report = Int8Report()
    try:
        new_mod = _make_lowering(relax)(mod, dict(owners or {}), report).run()
        if not report.lowered:
            new_mod = mod  # nothing rewritten: hand back the very same module
        else:
            new_mod = relax.transform.DeadCodeElimination()(new_mod)
    except Exception as exc:  # TVM raises many kinds; the float module still compiles
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TargetError(f"int8 lowering failed ({type(exc).__name__}: {first}); compile with --no-int8-lowering to keep QDQ in float") from exc
    logger.info("int8 lowering: %d regions lowered, %d left in float", len(report.lowered), len(report.left_float))
    return new_mod, report


def _make_lowering(relax: Any) -> type:
    """The mutator class, defined once TVM is imported (TVM is imported lazily)."""
    import tvm
    from tvm.ir.expr import Constant  # relax constants in TVM 0.27's unified IR

    @relax.expr_functor.mutator
    class Int8Lowering(relax.PyExprMutator):
        def __init__(self, mod: Any, owners: dict[str, str], report: Int8Report) -> None:
            super().__init__(mod)
            self.mod = mod
            self.owners = owners
            self.report = report
            self.var2val: dict[Any, Any] = {}
            self.count = 0

        def run(self) -> Any:
            for gvar, func in self.mod.functions_items():
                if isinstance(func, relax.Function):
                    self.var2val = relax.analysis.get_var2val(func)
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
            if isinstance(result, tuple):
                expr, weight = result
                self.report.regions.append(Region(op, self._name(op, call, weight), True))
                return expr
            self.report.regions.append(Region(op, self._name(op, call, None), False, result))
            logger.info("int8 lowering: %s stays float: %s", op, result)
            return None

        def _name(self, op: str, call: Any, weight: _Weight | None) -> str:
            key = weight.key if weight is not None else self._weight_key(call.args[1])
            if key is not None and key in self.owners:
                return self.owners[key]
            shape = _static_shape(call)
            return f"{op} #{self.count} -> {'x'.join(map(str, shape))}"

        def _weight_key(self, expr: Any) -> str | None:
            value = self._dequantize_behind(expr)
            if value is not None and isinstance(value.args[0], Constant):
                return weight_digest(value.args[0].value.numpy())
            return None

        def _activation(self, expr: Any) -> _Activation | str:
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
            return _Activation(data, float(s.reshape(())), int(z.reshape(())), dtype)

        def _weight_dq(self, value: Any, out_axis: int, ndim: int) -> _Weight | str:
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
            return _Weight(q, s.reshape(-1), weight_digest(q))

        # --- rewriting -------------------------------------------------------------

        def _conv2d(self, call: Any) -> tuple[Any, _Weight] | str:
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
            overflow = _overflow(x, np.abs(q).reshape(q.shape[0], -1).sum(axis=1))
            if overflow:
                return overflow
            bb = self.builder_
            data = self.visit_expr(x.data)
            padding = [int(p) for p in attrs.padding]  # top, left, bottom, right
            if x.zero_point != 0 and any(padding):
                # float zero padding is z_x in the quantised domain
                top, left, bottom, right = padding
                data = bb.emit(relax.op.nn.pad(data, [0, 0, 0, 0, top, bottom, left, right], "constant", float(x.zero_point)))
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
            if x.zero_point != 0:
                correction = (x.zero_point * q.reshape(out, -1).sum(axis=1)).astype(np.int32).reshape(1, out, 1, 1)
                acc = bb.emit(relax.op.subtract(acc, relax.const(correction, "int32")))
            scale = (np.float64(x.scale) * w.scale.astype(np.float64)).astype(np.float32).reshape(1, out, 1, 1)
            return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")), relax.const(scale, "float32")), w

        def _matmul(self, call: Any) -> tuple[Any, _Weight] | str:
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
                w = _Weight(np.ascontiguousarray(w.q.T), w.scale, w.key)
            else:
                w = self._weight_dq(value, 1, 2)  # MatMul / Gemm transB=0: (K, N), scales on N
                if isinstance(w, str):
                    return w
            q = w.q.astype(np.int64)
            overflow = _overflow(x, np.abs(q).sum(axis=0))
            if overflow:
                return overflow
            bb = self.builder_
            acc = bb.emit(relax.op.matmul(self.visit_expr(x.data), relax.const(w.q, "int8"), out_dtype="int32"))
            if x.zero_point != 0:
                correction = (x.zero_point * q.sum(axis=0)).astype(np.int32)
                acc = bb.emit(relax.op.subtract(acc, relax.const(correction, "int32")))
            scale = (np.float64(x.scale) * w.scale.astype(np.float64)).astype(np.float32)
            return relax.op.multiply(bb.emit(relax.op.astype(acc, "float32")), relax.const(scale, "float32")), w

    return Int8Lowering


def _overflow(x: _Activation, abs_row_sums: np.ndarray) -> str:
    """A reason when ``sum |x_q| |W_q|`` could leave int32 for some output channel, else ''."""
    peak = 255 if x.dtype == "uint8" else 128
    worst = int(abs_row_sums.max(initial=0)) * peak + abs(x.zero_point) * int(abs_row_sums.max(initial=0))
    if worst > INT32_MAX:
        return f"int32 accumulator could overflow (bound {worst:.3g})"
    return ""


def _static_shape(expr: Any) -> list[int]:
    try:
        return [int(d) for d in expr.ty.shape]
    except (AttributeError, TypeError, ValueError):  # untyped, or symbolic dims
        return []
