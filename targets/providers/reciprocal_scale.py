"""Quantizes left to TVM multiply by the reciprocal of their scale instead of dividing by it.

A per-tensor quantize is written ``round(x / s) + z``, clipped and cast to 8 bits
(:func:`~optc.targets.providers.layout_ops.quantize_ops`, TVM's own legalisation).
A vector division takes about ten times a multiplication's issue slots
(``vdivps`` on AVX-512), so the requantisations TVM computes itself were bound
by it: on the MNIST sample's pruned int8 model at batch 64 (1 thread), the
1-channel float stem's requantised output took 372 us of the artifact's 1.9 ms, and
a residual add's 105 us, for 800 K and 300 K elements. ``x · (1/s)`` differs from
``x / s`` by at most an ulp or two, so the rounding can move by one step only
where ``x / s`` lies within about 1e-7 of a half: within the one quantisation step of
onnxruntime that int8 outputs are held to, and what oneDNN's and onnxruntime's own
requantising kernels do (they multiply by a combined scale).

Only a division by a scalar constant whose quotient is rounded and, through the
zero point's add and the clamps, cast to an 8-bit type is rewritten: a float
model's own ``Round(Div(x, c))`` keeps its exact division. Runs after the providers
have taken their chains (:mod:`.chains` reads the division form as the quantize a
chain absorbs).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from optc.targets.providers.chains import dtype_of, module_bindings, op_name, scalar_number, walk_to_round
from optc.targets.providers.layout_ops import rewritten


def reciprocal_quantize(mod: Any) -> Any:
    """``mod`` with each quantize's division by its scale a multiplication by the reciprocal (the same module when none)."""
    rewriter = _Reciprocal(mod)
    return rewritten(rewriter, mod) if rewriter.divisions else mod


@relax.expr_functor.mutator
class _Reciprocal(relax.PyExprMutator):
    def __init__(self, mod: Any) -> None:
        super().__init__(mod)
        self.count = 0
        values = module_bindings(mod)
        self.divisions = {d for d in (self._quantizing_division(v, values) for v in values.values()) if d is not None}

    @staticmethod
    def _quantizing_division(value: Any, values: dict[Any, Any]) -> Any:
        """The ``x / s`` behind ``astype(...round(x / s)..., int8|uint8)``, or None."""
        if op_name(value) != "relax.astype" or str(value.attrs.dtype) not in ("int8", "uint8"):
            return None
        chain = walk_to_round(value.args[0], values)
        if chain is None:
            return None
        division = values.get(chain[-1].args[0], chain[-1].args[0])
        ok = op_name(division) == "relax.divide" and dtype_of(division) == "float32" and scalar_number(division.args[1]) not in (None, 0.0)
        return division if ok else None

    def visit_call_(self, call: Any) -> Any:
        if call in self.divisions:
            self.count += 1
            inverse = np.float32(1.0) / np.float32(scalar_number(call.args[1]))
            return relax.op.multiply(self.visit_expr(call.args[0]), relax.const(inverse, "float32"))
        return super().visit_call_(call)
