"""Mark each fused function with the largest |value| of the int8 weights it is called with.

x86 cores without VNNI multiply 8-bit values with ``vpmaddubsw``, whose pairwise int16 sums saturate unless the
weights stay within +-64 (:mod:`optc.targets.dot_intrinsics`). Whether they do is a property of the constants, which a
PrimFunc does not see: its weight is a parameter. This pass, run after FuseTIR, reads the constants each ``call_tir``
passes and records their bound on the callee (``tiled_kernels.WEIGHT_MAX_ATTR``); the tiled template uses
``vpmaddubsw`` only where the bound fits. A function called with several weights gets the largest; one called with a
computed int8 operand gets none, and keeps the widening kernel.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, tirx
from tvm.ir.expr import Constant

from optc.targets.providers.chains import module_bindings
from optc.targets.tiled_kernels import WEIGHT_MAX_ATTR


def mark_weight_bounds(mod: Any) -> Any:
    largest: dict[Any, int] = {}
    for value in module_bindings(mod).values():
        if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir"):
            continue
        callee, args = value.args[0], value.args[1]
        constants = [a.value.numpy() for a in getattr(args, "fields", ()) if isinstance(a, Constant)]
        weights = [w for w in constants if w.dtype == np.int8 and w.ndim >= 2 and w.size]  # not a zero point
        if weights and isinstance(mod[callee], tirx.PrimFunc):
            bound = max(int(np.abs(w.astype(np.int16)).max()) for w in weights)
            largest[callee] = max(largest.get(callee, 0), bound)
    for gvar, bound in largest.items():
        mod[gvar] = mod[gvar].with_attr(WEIGHT_MAX_ATTR, bound)
    return mod
