"""A quantize read back by a dequantize in the same region keeps its value in float: the 8-bit round trip is exact.

Inside an int8 region, a value quantized and at once dequantized again (a residual add's
branch: the convolution's output requantised, then read as ``(q - z) s`` by the add) is
written by TVM's legalisation as ``astype(astype(astype(c, uint8), int32) - z, float32)``,
where ``c`` is the quantize's clamped, rounded value. ``c`` is an integer within the 8-bit
type's range, so ``astype(c, uint8)`` read back as int32 or float32 is ``c`` itself, and the
narrowing and widening conversions are pure cost: on a pruned CNN's int8 residual convolution
(64 x 14 x 14 x 24, 1 thread) the epilogue's round trip took 0.23 ms of 0.88, as much as the
rest of the epilogue. ``astype(q, int32)`` becomes ``astype(c, int32)``, exactly.

Only where ``c`` is proven integral and in range: a ``round`` reached through the zero
point's add and the clamps (:func:`.chains.walk_to_round`), with integral constants and
every clamp's inside the 8-bit type's range; and only where nothing else reads the 8-bit
value (then it is not computed at all).
"""
from __future__ import annotations

from typing import Any

from tvm import relax

from optc.targets.providers.chains import dtype_of, module_bindings, op_name, scalar_number, walk_to_round
from optc.targets.providers.layout_ops import rewritten

RANGES = {"uint8": (0, 255), "int8": (-128, 127)}
WIDE = ("int32", "float32")  # read back as: both hold every 8-bit value exactly


def round_trips(mod: Any) -> Any:
    """``mod`` with each 8-bit quantize read back as int32 or float32 reading the clamped value instead (the same
    module when none)."""
    rewriter = _RoundTrip(mod)
    return rewritten(rewriter, mod) if rewriter.targets else mod


def _uses(mod: Any) -> dict[Any, int]:
    """How many times each variable is read in ``mod``'s Relax functions (a function's result counts as a read)."""
    counts: dict[Any, int] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            counts[expr] = counts.get(expr, 0) + 1

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func.body, visit)
    return counts


@relax.expr_functor.mutator
class _RoundTrip(relax.PyExprMutator):
    def __init__(self, mod: Any) -> None:
        super().__init__(mod)
        self.count = 0
        self.values = module_bindings(mod)
        self.uses = _uses(mod)
        # widening astype call -> the clamped float value its 8-bit operand was cast from
        self.targets = {}
        for value in self.values.values():
            source = self._clamped_source(value)
            if source is not None:
                self.targets[value] = source

    def _clamped_source(self, value: Any) -> Any | None:
        """For ``astype(astype(c, int8|uint8), int32|float32)`` with ``c`` integral and within the 8-bit range: ``c``."""
        if op_name(value) != "relax.astype" or str(value.attrs.dtype) not in WIDE:
            return None
        narrow = self.values.get(value.args[0], value.args[0])
        if op_name(narrow) != "relax.astype" or str(narrow.attrs.dtype) not in RANGES:
            return None
        if self.uses.get(value.args[0], 0) != 1:
            # read elsewhere too (the next layer's 8-bit input, and a skip connection): the 8-bit tensor stays, and
            # reading the float value instead made it an output of its own, 4 bytes an element, and a cast kernel
            return None
        c = narrow.args[0]
        if isinstance(c, relax.DataflowVar) and not isinstance(value.args[0], relax.DataflowVar):
            return None  # the 8-bit value leaves its dataflow block, c may not: the read-back may be outside it
        if dtype_of(c) != "float32" or not self._integral_within(c, RANGES[str(narrow.attrs.dtype)]):
            return None
        return c

    def _integral_within(self, expr: Any, bounds: tuple[int, int]) -> bool:
        """Whether ``expr`` is a rounded value brought into ``bounds`` by clamps (a lower and an upper) after any
        zero point is added. Every constant on the way is an integer, and every clamp's within ``bounds``: then each
        clamp keeps a bounded value bounded, in whatever order they come. The walk meets the ops last-applied first."""
        chain = walk_to_round(expr, self.values)
        if chain is None:
            return False
        low, high = False, False
        for call in chain[:-1]:
            name = op_name(call)
            consts = [scalar_number(a) for a in call.args if not isinstance(a, relax.Var)]
            if any(c is None or not c.is_integer() for c in consts):
                return False  # a non-integral constant leaves a non-integral value
            if name in ("relax.add", "relax.subtract"):
                if not (low and high):  # the zero point's add: only before both clamps, which then bound the sum
                    return False
                continue
            if any(not bounds[0] <= c <= bounds[1] for c in consts):
                return False  # a clamp outside the range (at 300, or a clip with swapped bounds) proves nothing
            low = low or name in ("relax.nn.relu", "relax.clip", "relax.maximum")
            high = high or name in ("relax.clip", "relax.minimum")
        return low and high

    def visit_call_(self, call: Any) -> Any:
        source = self.targets.get(call)
        if source is not None:
            self.count += 1
            return relax.op.astype(self.visit_expr(source), str(call.attrs.dtype))
        return super().visit_call_(call)
