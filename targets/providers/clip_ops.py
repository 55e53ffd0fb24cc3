"""Clips as ``maximum``/``minimum``, so that they stay in the layout the convolutions run in.

TVM's ONNX frontend writes ``Clip`` (any opset) as TE calls of ``topi.maximum``
and ``topi.minimum``, and ``HardSigmoid``/``HardSwish`` as ``R.clip``; neither
has a layout rule, so converting the convolutions to NHWC wraps every clip in
two transposes. On a MobileNetV3-style classifier (RapidOCR's direction model)
the hard-swish kernels with their transposes took 0.5 of the artifact's 1.1 ms.
``R.maximum``/``R.minimum`` with a scalar bound are element-wise binary ops,
which ConvertLayout keeps in any layout. :mod:`.chains` reads the pair as the
clip post-op a provider fuses.

Only calls whose meaning is certain are rewritten: ``R.clip``, and
``call_tir`` of a function the TE emitter named ``maximum``/``minimum``
(``maximum1``, ...) on a tensor and a scalar of its dtype, returning the
tensor's shape.
"""
from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.ir.expr import Constant

from optc.targets.providers.chains import dtype_of, static_shape

_TE_NAME = re.compile(r"(maximum|minimum)\d*$")


def clips_as_min_max(mod: Any) -> Any:
    """``mod`` with its clips written as ``R.maximum``/``R.minimum`` (the same module when there are none)."""
    rewriter = _Rewriter(mod)
    new_mod = rewriter.run()
    return relax.transform.DeadCodeElimination()(new_mod) if rewriter.count else mod


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    def __init__(self, mod: Any) -> None:
        super().__init__(mod)
        self.mod = mod
        self.count = 0
        self.clip, self.call_tir, self.where = (tvm.ir.Op.get(f"relax.{name}") for name in ("clip", "call_tir", "where"))

    def run(self) -> Any:
        for gvar, func in self.mod.functions_items():
            if isinstance(func, relax.Function):
                self.builder_.update_func(gvar, self.visit_expr(func))
        return self.builder_.get()

    def visit_call_(self, call: Any) -> Any:
        if call.op.same_as(self.clip):
            bounds = [_prim(a) for a in call.args[1:3]]
            if None not in bounds and dtype_of(call) in ("float32", "float16", "float64"):
                self.count += 1
                out = self.visit_expr(call.args[0])
                lo, hi = bounds
                dtype = dtype_of(call)
                if not math.isinf(lo):
                    out = self.builder_.emit(relax.op.maximum(out, relax.const(lo, dtype)))
                return relax.op.minimum(out, relax.const(hi, dtype)) if not math.isinf(hi) else out
        elif call.op.same_as(self.call_tir) and isinstance(call.args[0], relax.GlobalVar):
            match = _TE_NAME.match(call.args[0].name_hint)
            args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else ()
            if match and len(args) == 2 and static_shape(args[1]) == () and dtype_of(args[0]) == dtype_of(args[1]) == dtype_of(call) \
                    and static_shape(args[0]) is not None and static_shape(args[0]) == static_shape(call):
                self.count += 1
                op = relax.op.maximum if match.group(1) == "maximum" else relax.op.minimum
                return op(self.visit_expr(args[0]), self._bound(args[1]))
        return super().visit_call_(call)

    def _bound(self, expr: Any) -> Any:
        """The frontend's NaN guard ``where(isnan(c), ±inf, c)`` on a constant ``c`` that is not NaN is ``c``: a
        constant bound is what :mod:`.chains` fuses as a clip post-op."""
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        if isinstance(value, relax.Call) and value.op.same_as(self.where) and isinstance(value.args[2], Constant):
            bound = value.args[2].value.numpy()
            if bound.size == 1 and not np.isnan(bound).any():
                return value.args[2]
        return self.visit_expr(expr)


def _prim(expr: Any) -> float | None:
    """A clip bound: an IntImm/FloatImm, or a PrimValue holding one."""
    value = getattr(expr, "value", None)
    value = getattr(value, "value", value)
    return float(value) if isinstance(value, (int, float)) else None
