"""Convolutions left to optc's tiled kernel compute whole register tiles: rows and channels padded, the extra dropped.

The tiled kernel (:mod:`optc.targets.tiled_kernels`) computes ``tw`` output pixels of a row by
``tc`` channels per register tile, and both must divide the convolution's output.

- **Rows.** Where only small numbers divide a row (an OCR model's 43-pixel maps), ``tiles``
  picks near-equal tiles that cover it and the last one is guarded: a predicate inside the
  unrolled reduction, which cost about 1.6x (48->192 3x3 at 16x43, 1 thread: 1.95 ms guarded,
  1.17 at 16x44 unguarded). TVM's ``pad_einsum`` pads a matmul's loops but refuses a
  convolution (its input index ``x + kx`` is not an iterator). So the right padding grows by
  what the extra output pixels read (``stride`` input columns each, zeros).
- **Channels.** Where no vector width divides the output channels (MTCNN's 10, a YOLO head's
  255), the template gave up and TVM's scalar lowering ran (on ARM, the only kernel there is).
  Where only part of a vector divides them (a pruned layer's 24 channels with 16 lanes: tiles
  of 8), every instruction ran half empty. The weight gets zero filters up to a multiple of the
  vector width (of a quarter of it for fewer than half a vector's channels), at compile time,
  where that takes fewer vector instructions (:func:`padded_channels`).

Then a slice keeps the real output. Exact: each real output reads what it read before. The
slice stops the tile's epilogue from being inlined past it: the template runs bias and
activation as a block of their own over the tile's real outputs, under the tile loop
(:func:`tiled_kernels._epilogue_on_tile`).

Runs after the providers took their chains, so oneDNN's convolutions are left as they are; only
NHWC ``conv2d`` (1-D convolutions exported as ``[N, C, L, 1]`` tile along their height, which
is padded then) and NWC ``conv1d``, whose channels only are padded (Silero's 258-channel STFT).
A grouped convolution's filters stay in their group: each group gets its zero filters
(ShuffleNet's 1x1 convolutions in 4 groups of 34 channels: 34 -> 48), and a ``[N, H, W, G, og']``
view of the output is sliced to the real ones. That reshape is not element-wise, so FuseOps
leaves it, the slice and the bias after it to a function of their own: one more pass over the
output, against TVM's scalar loop for the whole convolution before.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tvm import relax

from optc.targets.providers.chains import constant_value, module_bindings, op_name
from optc.targets.providers.layout_ops import rewritten
from optc.targets.tiled_kernels import channel_widths, reduction_steps, tiles, vector_shape


def pad_tiles(mod: Any, target: Any) -> Any:
    """``mod`` with each NHWC ``conv2d`` (NWC ``conv1d``) the tiled kernel could not cover in whole tiles widened to
    them and sliced back; the same module when there is none."""
    lanes, registers = vector_shape(target)
    return rewritten(_TilePadder(mod, lanes, registers), mod)


def padded_channels(channels: int, groups: int, lanes: int, depthwise: bool = False) -> int | None:
    """The output channels to compute where the template would tile ``channels`` (a grouped convolution's: each
    group's, padded alike) with more vector instructions than the padded count takes; else None. A depthwise
    convolution tiles its channels as they are.

    Each instruction of a tile narrower than a vector fills part of the register: 24 channels with 16 lanes were
    tiled by 8, three half-width instructions per pixel and input where 32 padded ones take two. Measured on a pruned
    CNN's int8 convolutions at batch 64 (AVX-512 VNNI, 1 thread): 24->24 3x3 1.04 -> 0.52 ms, 16->24 stride 2 0.88 ->
    0.51. Fewer instructions only: 48 channels (three full vectors) stay as they are."""
    per_group = channels // groups
    if depthwise or per_group < (4 if groups == 1 else 2):
        return None
    step = lanes if per_group > lanes // 2 else max(lanes // 4, 1)
    padded = -(-per_group // step) * step
    # a width of one lane (a quarter of NEON's four) is no vector: ARM's 255-channel YOLO head is padded to 256 too
    tile = next((w for w in channel_widths(lanes) if w > 1 and per_group % w == 0), None)
    # A grouped convolution's padded output is sliced through a reshape FuseOps leaves to a pass of its own (module
    # docstring): measured worth it only where no vector tiled its groups at all, so those alone are padded.
    if tile is not None and (groups > 1 or padded // min(step, lanes) >= per_group // min(tile, lanes)):
        return None
    return padded * groups


def padded_rows(out_shape: list[int], groups: int, weight_shape: list[int], lanes: int, registers: int,
                input_dtype: str = "float32") -> tuple[int, int] | None:
    """(axis, padded extent) of the row the tiled kernel tiles in an NHWC convolution's output, where its tile does
    not divide it; else None. ``weight_shape`` is OHWI: a grouped convolution's tile stays inside a group; with
    ``input_dtype`` (as tiled_kernels._tiled reads it) it gives the reduction's length, which bounds the tile where it
    is short (tiled_kernels.tiles)."""
    n, h, w, c = out_shape
    axis = 1 if w == 1 else 2  # as tiled_kernels._conv_roles: a [N, C, L, 1] 1-D convolution tiles along L
    row = out_shape[axis]
    group = c // groups if groups > 1 and weight_shape[-1] > 1 else None  # grouped, not depthwise
    tw, _ = tiles(row, c, lanes, registers, group, reduction_steps(weight_shape[1:], input_dtype))
    if row % tw == 0:
        return None
    return axis, -(-row // tw) * tw


@relax.expr_functor.mutator
class _TilePadder(relax.PyExprMutator):
    def __init__(self, mod: Any, lanes: int, registers: int) -> None:
        super().__init__(mod)
        self.count = 0
        self.lanes, self.registers = lanes, registers
        # the weight behind ConvertLayout's permute_dims of a constant, folded only after this pass
        self.values = module_bindings(mod)

    def visit_call_(self, call: Any) -> Any:
        name = op_name(call)
        layouts = {"relax.nn.conv2d": ("NHWC", "OHWI", "NHWC"), "relax.nn.conv1d": ("NWC", "OWI", "NWC")}.get(name)
        attrs = call.attrs
        if layouts is None or (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != layouts:
            return super().visit_call_(call)
        try:
            out_shape = [int(d) for d in call.ty.shape]
            weight_shape = [int(d) for d in call.args[1].ty.shape]
        except (AttributeError, TypeError, ValueError):  # symbolic shapes: nothing the template tiles
            return super().visit_call_(call)
        groups = int(attrs.groups)
        channels = padded_channels(out_shape[-1], groups, self.lanes, depthwise=groups > 1 and weight_shape[-1] == 1)
        value = constant_value(call.args[1], self.values) if channels is not None else None
        if value is None:  # a weight computed at run time keeps its channels
            channels = None
        # a 1-D convolution's channels only: its rows are tiled along W, which the tiled kernel guards
        rows = padded_rows([*out_shape[:3], channels or out_shape[3]], groups, weight_shape, self.lanes, self.registers,
                           str(call.args[0].ty.dtype)) if name == "relax.nn.conv2d" else None
        if channels is None and rows is None:
            return super().visit_call_(call)
        weight = self.visit_expr(call.args[1]) if channels is None else relax.const(_zero_filters(value, groups, channels),
                                                                                    str(value.dtype))
        padding = [int(p) for p in attrs.padding]
        wide_shape = [*out_shape[:-1], channels or out_shape[-1]]
        axes, ends = [], []
        if rows is not None:
            axis, extent = rows
            extra = (extent - out_shape[axis]) * int(attrs.strides[axis - 1])
            padding[2 + axis - 1] += extra  # [top, left, bottom, right]: bottom for H, right for W
            wide_shape[axis] = extent
            axes.append(axis)
            ends.append(out_shape[axis])
        conv = relax.op.nn.conv2d if name == "relax.nn.conv2d" else relax.op.nn.conv1d
        wide = self.builder_.emit(conv(
            self.visit_expr(call.args[0]), weight, strides=[int(s) for s in attrs.strides], padding=padding,
            dilation=[int(d) for d in attrs.dilation], groups=groups, data_layout=layouts[0], kernel_layout=layouts[1],
            out_layout=layouts[2], out_dtype=attrs.out_dtype))
        self.count += 1
        return self._real(wide, wide_shape, out_shape, groups, axes, ends)

    def _real(self, wide: Any, wide_shape: list[int], out_shape: list[int], groups: int, axes: list[int],
              ends: list[int]) -> Any:
        """The real outputs of the widened ``wide`` (channels last): rows ``axes`` cut to ``ends``, and each group's
        real channels, through a ``[.., G, og']`` view where the convolution is grouped."""
        c = len(out_shape) - 1
        if wide_shape[c] == out_shape[c] or groups == 1:
            if wide_shape[c] != out_shape[c]:
                axes, ends = [*axes, c], [*ends, out_shape[c]]
            return relax.op.strided_slice(wide, axes=axes, begin=[0] * len(axes), end=ends)
        view = relax.op.reshape(wide, [*wide_shape[:c], groups, wide_shape[c] // groups])
        real = relax.op.strided_slice(view, axes=[*axes, c + 1], begin=[0] * (len(axes) + 1), end=[*ends, out_shape[c] // groups])
        return relax.op.reshape(self.builder_.emit(real), out_shape)


def _zero_filters(value: np.ndarray, groups: int, channels: int) -> np.ndarray:
    """The OHWI weight ``value`` with zero filters appended to each group's, ``channels`` in all."""
    per_group = value.reshape(groups, value.shape[0] // groups, *value.shape[1:])
    zeros = np.zeros((groups, channels // groups - per_group.shape[1], *value.shape[1:]), value.dtype)
    return np.concatenate([per_group, zeros], axis=1).reshape(channels, *value.shape[1:])
