"""Convolutions left to optc's tiled kernel compute whole register tiles: their rows are padded, the extra outputs dropped.

The tiled kernel (:mod:`optc.targets.tiled_kernels`) computes ``tw`` output pixels of a row per
register tile. Where only small numbers divide the row (an OCR model's 43-pixel maps), ``tiles``
picks near-equal tiles that cover it and the last one is guarded: a predicate inside the
unrolled reduction, which cost about 1.6x (48->192 3x3 at 16x43, 1 thread: 1.95 ms guarded,
1.17 at 16x44 unguarded). TVM's ``pad_einsum`` pads a matmul's loops but refuses a
convolution (its input index ``x + kx`` is not an iterator).

So the convolution itself is widened before fusion: its right padding grows by what the extra
output pixels read (``stride`` input columns each, zeros), the output gets whole tiles, and a
slice keeps the real pixels. Exact: each real output reads what it read before. The slice
stops the tile's epilogue from being inlined past it (the template then runs bias and
activation as a loop of their own over the real pixels, :func:`tiled_kernels._tiled`).

Runs after the providers took their chains, so oneDNN's convolutions are not widened; only
NHWC ``conv2d`` (1-D convolutions exported as ``[N, C, L, 1]`` tile along their height, which
is padded then).
"""
from __future__ import annotations

from typing import Any

from tvm import relax

from optc.targets.providers.chains import op_name
from optc.targets.providers.layout_ops import rewritten
from optc.targets.tiled_kernels import tiles, vector_shape


def pad_rows(mod: Any, target: Any) -> Any:
    """``mod`` with each NHWC ``conv2d`` whose row the tiled kernel would cover with a guarded tile widened to whole
    tiles and sliced back; the same module when there is none."""
    lanes, registers = vector_shape(target)
    return rewritten(_RowPadder(mod, lanes, registers), mod)


def padded_rows(out_shape: list[int], groups: int, weight_shape: list[int], lanes: int, registers: int) -> tuple[int, int] | None:
    """(axis, padded extent) of the row the tiled kernel tiles in an NHWC convolution's output, where its tile does
    not divide it; else None. ``weight_shape`` is OHWI: a grouped convolution's tile stays inside a group."""
    n, h, w, c = out_shape
    axis = 1 if w == 1 else 2  # as tiled_kernels._conv_roles: a [N, C, L, 1] 1-D convolution tiles along L
    row = out_shape[axis]
    per_group = weight_shape[-1]
    group = None
    if groups > 1 and per_group > 1:  # grouped, not depthwise
        group = c // groups
    tw, _ = tiles(row, c, lanes, registers, group)
    if row % tw == 0:
        return None
    return axis, -(-row // tw) * tw


@relax.expr_functor.mutator
class _RowPadder(relax.PyExprMutator):
    def __init__(self, mod: Any, lanes: int, registers: int) -> None:
        super().__init__(mod)
        self.count = 0
        self.lanes, self.registers = lanes, registers

    def visit_call_(self, call: Any) -> Any:
        if op_name(call) != "relax.nn.conv2d":
            return super().visit_call_(call)
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "OHWI", "NHWC"):
            return super().visit_call_(call)
        try:
            out_shape = [int(d) for d in call.ty.shape]
            weight_shape = [int(d) for d in call.args[1].ty.shape]
        except (AttributeError, TypeError, ValueError):  # symbolic shapes: nothing the template tiles
            return super().visit_call_(call)
        found = padded_rows(out_shape, int(attrs.groups), weight_shape, self.lanes, self.registers)
        if found is None:
            return super().visit_call_(call)
        axis, extent = found
        extra = (extent - out_shape[axis]) * int(attrs.strides[axis - 1])
        top, left, bottom, right = (int(p) for p in attrs.padding)
        padding = [top, left, bottom + extra, right] if axis == 1 else [top, left, bottom, right + extra]
        wide = self.builder_.emit(relax.op.nn.conv2d(
            self.visit_expr(call.args[0]), self.visit_expr(call.args[1]), strides=[int(s) for s in attrs.strides],
            padding=padding, dilation=[int(d) for d in attrs.dilation], groups=int(attrs.groups), data_layout="NHWC",
            kernel_layout="OHWI", out_layout="NHWC", out_dtype=attrs.out_dtype))
        self.count += 1
        return relax.op.strided_slice(wide, axes=[axis], begin=[0], end=[out_shape[axis]])
