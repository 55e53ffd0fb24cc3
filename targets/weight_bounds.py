"""Mark the fused functions whose int8 weights x86's ``vpmaddubsw`` multiplies exactly.

x86 cores without VNNI multiply 8-bit values with ``vpmaddubsw``, whose pairwise int16 sums saturate unless the
weights stay within +-64 (:mod:`optc.targets.dot_intrinsics`). Whether they do is a property of the constants, which a
PrimFunc does not see: its weight is a parameter. This pass, run after FuseTIR for such targets only, reads every
``call_tir`` of each function and marks the callee (``tiled_kernels.PAIRS_FIT_ATTR``) when, at every call, each int8
operand of two or more dimensions is a constant (directly, or through a variable bound to one) within the bound.
A function also called with an int8 operand computed at run time, or with wider weights anywhere, is not marked and
keeps the widening kernel, exact for any values.

The mark is part of the function's structure, so a tuning record made for a marked function (vpmaddubsw in its
trace) is never applied to an unmarked one. Targets whose int8 kernels accumulate in int32 (VNNI, Arm's dot
products) get no mark, and their functions hash as before.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax, tirx

from optc.targets.providers.chains import constant_value, dtype_of, module_bindings
from optc.targets.tiled_kernels import PAIRS_FIT_ATTR, dot_product


def mark_weight_bounds(mod: Any, target: Any) -> Any:
    dot = dot_product(target)
    if dot is None or dot.weight_max is None:
        return mod
    values = module_bindings(mod)
    fits: dict[Any, bool] = {}
    for value in values.values():
        if not (isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.call_tir"):
            continue
        callee, args = value.args[0], getattr(value.args[1], "fields", ())
        if not isinstance(mod[callee], tirx.PrimFunc):
            continue
        for arg in args:
            if dtype_of(arg) != "int8" or int(getattr(getattr(arg, "ty", None), "ndim", 0)) < 2:
                continue  # not an int8 operand of a product (a zero point, a scalar, another type)
            weight = constant_value(arg, values)
            within = weight is not None and int(np.abs(weight.astype(np.int16)).max(initial=0)) <= dot.weight_max
            fits[callee] = fits.get(callee, True) and within
    for gvar, ok in fits.items():
        if ok:
            mod[gvar] = mod[gvar].with_attr(PAIRS_FIT_ATTR, True)
    return mod
