"""The NHWC conversion when TVM's ConvertLayout throws on one op: that op keeps its layout, the rest converts.

TVM 0.27's layout rules throw on some valid models (``std::bad_alloc`` for a ``Squeeze`` with a negative
axis, before :mod:`.layout_ops` counted such axes from the front; ``Invalid SLayout`` for a 5-D stack). One
such op used to keep the whole model in NCHW, where optc's own convolution kernels have no template (Silero
VAD ran at 5x onnxruntime's time with TVM's kernels). Here the call that makes the conversion throw is found
by bisecting the main function's bindings, and that one call is legalised to its ``call_tir``: a PrimFunc has
no layout rule, so ConvertLayout hands it its inputs in their original layout (a transpose before it, one
after) and converts everything else. Then the conversion is tried again, up to :data:`MAX_KEPT` calls.
"""
from __future__ import annotations

from typing import Any

import tvm
from tvm import relax

from optc.targets.providers.offload import rewrite_functions

MAX_KEPT = 4  # calls left in their layout before the whole model is: past a few, the model is not one TVM converts


def convert_layout(mod: Any, layouts: dict[str, list[str]]) -> tuple[Any, list[str], str]:
    """``mod`` through ConvertLayout(``layouts``), the ops (names, in order) of the calls left in their original
    layout so that it converts, and the last line of the first error ("" when none). Raises ConvertLayout's first
    error when no such calls are found."""
    kept: list[str] = []
    first: Exception | None = None
    while True:  # each pass keeps one more call, at most MAX_KEPT
        try:
            return relax.transform.ConvertLayout(layouts)(mod), kept, last_line(first) if first else ""
        except Exception as exc:  # noqa: BLE001 - TVM raises TVMError, ValueError, even std::bad_alloc as RuntimeError
            first = first or exc
            culprit = failing_call(mod, layouts) if len(kept) < MAX_KEPT else None
            if culprit is None:
                raise first from None
            mod = _legalized(mod, culprit)
            kept.append(culprit.op.name)


def last_line(exc: BaseException) -> str:
    """An exception's last line: TVM's errors end with the message, after the C++ backtrace."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[-1]


def failing_call(mod: Any, layouts: dict[str, list[str]]) -> Any:
    """The call of ``mod``'s main function (one dataflow block) from which on ConvertLayout throws: the last
    binding of the shortest prefix of its bindings that fails to convert; None when the main function is of
    another shape, the whole of it converts (the failure is elsewhere), or the culprit is no op TVM legalises."""
    main = mod["main"] if any(g.name_hint == "main" for g in mod.get_global_vars()) else None
    if not isinstance(main, relax.Function) or not isinstance(main.body, relax.SeqExpr) or len(main.body.blocks) != 1 \
            or not isinstance(main.body.blocks[0], relax.DataflowBlock):
        return None
    bindings = list(main.body.blocks[0].bindings)

    def fails(count: int) -> bool:
        try:
            relax.transform.ConvertLayout(layouts)(_prefix(mod, main, bindings, count))
        except Exception:  # noqa: BLE001 - see convert_layout
            return True
        return False

    if not bindings or not fails(len(bindings)):
        return None
    low, high = 1, len(bindings)
    while low < high:
        mid = (low + high) // 2
        if fails(mid):
            high = mid
        else:
            low = mid + 1
    value = bindings[low - 1].value
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.get_attr("FLegalize") is not None):
        return None
    return value


def _prefix(mod: Any, main: Any, bindings: list[Any], count: int) -> Any:
    """``mod`` with its main function cut after ``count`` bindings, the last one's value its output."""
    last = bindings[count - 1]
    out = relax.Var("prefix_out", last.var.ty)
    block = relax.DataflowBlock(bindings[: count - 1] + [relax.VarBinding(out, last.value)])
    func = relax.Function(main.params, relax.SeqExpr([block], out), last.var.ty, main.is_pure, main.attrs)
    cut = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv.name_hint != "main"})
    cut[mod.get_global_var("main")] = func
    return cut


def _legalized(mod: Any, call: Any) -> Any:
    """``mod`` with ``call`` (one Relax op call) replaced by the ``call_tir`` TVM's legalisation makes of it."""
    return rewrite_functions(_LegalizeOne(mod, call), mod)


@relax.expr_functor.mutator
class _LegalizeOne(relax.PyExprMutator):
    def __init__(self, mod: Any, call: Any) -> None:
        super().__init__(mod)
        self.call = call

    def visit_call_(self, call: Any) -> Any:
        if call.same_as(self.call):
            return call.op.get_attr("FLegalize")(self.builder_, call)
        return super().visit_call_(call)
