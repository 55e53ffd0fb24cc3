"""optc's own kernels for convolutions and matmuls: register-tiled schedules of TVM's NHWC (and NWC) convolutions,
grouped and depthwise included, and of matmuls by a weight or between activations, for any CPU target LLVM
compiles for.

TVM's untuned lowering of a convolution is one scalar loop nest: 14x slower
than oneDNN at the median over this project's measured workloads, 80x on
ResNet-shaped ones. MetaSchedule closes that only after minutes per task. This
schedule is what a tuned kernel converges to, written once:

- the output is cut into tiles of ``tw`` pixels along the row (rows of a matmul)
  x ``tc`` channels (columns);
  each tile's accumulators live in vector registers for the whole reduction
  (``kh x kw x ic``), so every weight vector loaded serves ``tw`` pixels and every
  input value broadcast serves ``tc / lanes`` vectors (a tile under 1024 bytes is a
  stack array LLVM keeps in registers; a larger one, a long reduction's 14 x 32 on
  AVX-512, comes from TVM's workspace pool each tile: ACCUMULATOR_SCOPE);
- weights are repacked once, at compile time, as ``[oc / tc, kh, kw, ic, tc]``
  (``[n / tc, k, tc]`` for a matmul; TVM's layout-rewrite pre-processing, folded
  into the constants), so the tile's weight loads are contiguous; a matmul's
  second activation (attention's K and V) is read as it is, its columns innermost;
- bias, residual and activation run on the tile as it is written back (the
  epilogue is inlined into the write-back), rows are spread over threads, and the
  padded input is one parallel copy.

The tile sizes come from the target's vector width and register count (AVX-512:
16 lanes, 32 registers; AVX2: 8 and 16; NEON: 4 and 32): ``tc`` is two vectors
where the channels allow, ``tw`` the largest divisor of the output width that
keeps ``tw x tc / lanes`` accumulators and a few operands in registers. On x86
the schedule is TVM's candidate against oneDNN (the provider choice measures
both); on ARM, which has no vendor provider, it is the default kernel. Measured
on this machine (AVX-512, 2 threads), conv + bias + ReLU, untuned -> template:
64ch@56² 3x3 179 -> 2.3 ms, 24ch@28² 3.6 -> 0.13 ms, 48->1 ch@64² 1.9 -> 0.35 ms; dense + bias +
ReLU 128x256 @ 256x1024 127 -> 0.68 ms (oneDNN 0.67), an LSTM step's 1x512 @ 512x2048 7.2 -> 0.053 ms (0.064).
A BERT-shaped encoder with TVM's kernels only: 716 -> 9.8 ms (onnxruntime 11.9). A dense layer whose columns no
power-of-two tile divides (8210 classes) has its weight padded with zero columns at compile time (ddddocr's
22x1024 @ 1024x8210: 350 -> 5 ms); a convolution's channels and rows are widened to whole tiles before fusion
(:mod:`optc.targets.tile_padding`). Rows that only 1 divides (197 tokens) are covered by guarded tiles.

8-bit reductions on a core with dot products (an aarch64 core with ``sdot``, ``--cpu cortex-a76``; an x86 core with
VNNI's ``vpdpbusd``) split the input channels by 4 innermost, pack the weight as ``[oc / tc, .., ic / 4, tc, 4]`` and
compute each accumulator vector's 4-deep step with one instruction (:mod:`optc.targets.dot_intrinsics`). An x86
core without VNNI computes that step with ``vpmaddubsw`` and ``vpmaddwd``, where the function's weights are known
to fit its int16 pairs (within +-64: :mod:`optc.targets.weight_bounds`); elsewhere the widening kernel stays.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# grouped and depthwise: the same loops, the group in the index; 1-D convolutions (NWC) have one spatial loop fewer
CONV_BLOCKS = ("conv2d_nhwc", "group_conv2d_nhwc", "conv1d_nwc", "group_conv1d_nwc")
MATMUL_BLOCK = "matmul"
SPARE_REGISTERS = 4  # for the broadcast input value and the weight vectors in flight
# The tile's accumulators: a buffer of "global" scope under TVM's stack limit (kMaxStackAlloca, 1024 bytes) is a stack
# array, which LLVM keeps in registers. A "local" one, or one of 1024 bytes or more, was taken from TVM's workspace pool
# on every tile: TVMBackendAllocWorkspace and FreeWorkspace calls, a memset, and the accumulators stored to it and read
# back, as much as the arithmetic where the reduction is short (an image's first convolution, 9 multiply-adds an
# output: 1 -> 16 channels, 3x3, 28x28, batch 64, with its requantising epilogue, 0.63 -> 0.31 ms).
ACCUMULATOR_SCOPE = "global"
STACK_BYTES = 1024
# A tile of 32 channels (AVX-512) fits the stack with 7 pixels, not 14. Where the reduction is short that is worth it:
# per tile, the pool's calls weigh against few instructions. Measured (1 thread, in turns, 14 -> 7 pixels): int8 3x3
# 24 -> 32 channels (54 vpdpbusd an accumulator) 10-15 % faster, 48 -> 32 (108) and 64 -> 64 (144) level; fp32 3x3
# 8 -> 32 (72 FMAs) 17 % faster, 16 -> 32 (144) 7 %; fp32 with 256 (a BERT projection) to 1,024 steps 5-10 % slower.
SHORT_REDUCTION = 192
# Below this many multiply-adds a convolution runs on the calling thread: waking the pool costs tens of
# microseconds (the oneDNN glue draws the same line, onednn_glue.cc).
PARALLEL_MACS = 1 << 21
# ... unless it reads at least this many bytes of weights: a matrix-vector product (an LSTM step's 1x512 @ 512x2048,
# 1 M multiply-adds) is bound by its 4 MB of weights, 180 us a call from L3 on one core. Threaded, each core reads
# its own columns, and consecutive steps find them in that core's L2.
PARALLEL_WEIGHT_BYTES = 1 << 20
# 8-bit dot products (Armv8.2's sdot, x86's VNNI, or vpmaddubsw + vpmaddwd without it): each int32 lane adds a
# 4-deep product of 8-bit pairs (sdot: 16 multiply-adds an instruction against 4 for the widening multiply-accumulate
# the vectoriser emits otherwise).
DOT_DEPTH = 4


class Untileable(ValueError):
    """A shape the template matched and does not cover (not a failure of its schedule): reported as such."""


# Why the template failed on blocks it matched, while a build records them (TVM's default schedule then runs those
# blocks, correct and slower; a failure that stayed invisible once cost every ARM int8 convolution its tiling).
_failures: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("optc_tiled_failures", default=None)


@contextmanager
def recording_failures() -> Iterator[list[str]]:
    """Collect, within this block, one line per convolution or matmul the template matched but could not schedule."""
    found: list[str] = []
    token = _failures.set(found)
    try:
        yield found
    finally:
        _failures.reset(token)


def vector_shape(target: Any) -> tuple[int, int]:
    """(float32 lanes, vector registers) of an LLVM CPU target."""
    from tvm.target import codegen

    if str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return 4, 32
    try:
        if codegen.target_has_features("avx512f", target):
            return 16, 32
        if codegen.target_has_features("avx2", target):
            return 8, 16
    except Exception:  # noqa: BLE001 - a target LLVM cannot describe: the narrowest vectors are safe
        pass
    return 4, 16


def _divisor(extent: int, candidates: list[int] | tuple[int, ...]) -> int:
    return next((c for c in candidates if c > 0 and extent % c == 0), 1)


def channel_widths(lanes: int) -> tuple[int, ...]:
    """The channel tiles the template tries, widest first: two vectors, one, a half and a quarter of one."""
    return 2 * lanes, lanes, lanes // 2, lanes // 4


def tiles(out_width: int, out_channels: int, lanes: int, registers: int, group: int | None = None,
          steps: int | None = None) -> tuple[int, int]:
    """(tw, tc): pixels and channels per register tile; ``group`` caps tc (a grouped conv's output channels per group).
    ``steps``: the reduction's instructions per accumulator (:func:`reduction_steps`); where it is short the tile's
    accumulators stay under TVM's stack limit (ACCUMULATOR_SCOPE, SHORT_REDUCTION).

    tw divides the width where a divisor of at least a third of the register budget does. Otherwise (an OCR model's
    43-pixel rows: only 1 divides, and a 1-pixel tile has 2 accumulators, latency-bound at a quarter of the FMA rate)
    near-equal tiles cover the row and the last one is guarded: 43 -> 4 tiles of 11, one pixel computed and dropped."""
    widths = [w for w in channel_widths(lanes) if group is None or group % w == 0]
    tc = _divisor(out_channels, widths) if out_channels >= 4 else out_channels
    vectors = max(1, tc // lanes)
    cap = min(max(1, (registers - SPARE_REGISTERS) // vectors), 14)
    if steps is not None and steps <= SHORT_REDUCTION:
        cap = min(cap, max(1, (STACK_BYTES - 1) // (4 * tc)))  # 4-byte accumulators on the stack (ACCUMULATOR_SCOPE)
    tw = _divisor(out_width, list(range(cap, 0, -1)))
    if 3 * tw < cap < out_width:
        tw = -(-out_width // -(-out_width // cap))
    return tw, tc


def reduction_steps(extents: list[int], input_dtype: str) -> int:
    """The instructions an accumulator vector takes over a reduction of ``extents``: one a multiply-add in float, one
    per 4-deep dot product on 8-bit inputs (DOT_DEPTH). Read from the input's type, which tile_padding sees too: the
    widening kernel an 8-bit layer keeps without a dot product takes four times as many, so its tile is cut to the
    stack up to 768 multiply-adds where a float one's stops at 192."""
    size = math.prod(extents)
    return size // DOT_DEPTH if input_dtype in ("int8", "uint8") else size


def schedule_tiled(func: Any, target: Any) -> Any | None:
    """``func`` with its NHWC convolution, or its matmul, register-tiled; None when it holds neither or the schedule
    fails (TVM's default lowering then stays)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    return sch.mod["main"].with_attr("tir.is_scheduled", True) if tile(sch, target) else None


def tile(sch: Any, target: Any) -> bool:
    """Register-tile the schedule's convolution or matmul in place (also MetaSchedule's design space for such a
    task, tuning.py); False when it holds neither or the schedule fails."""
    func = sch.mod["main"]
    for name, shape in [*((b, _conv_roles) for b in CONV_BLOCKS), (MATMUL_BLOCK, _matmul_roles)]:
        try:
            block = sch.get_sblock(name)
        except Exception:  # noqa: BLE001, S112 - no such block
            continue
        try:
            roles = shape(sch, block, func)
            return roles is not None and _tiled(sch, block, roles, target)
        except Exception as exc:  # noqa: BLE001 - an unusual fused function: TVM's default lowering is always correct
            logger.debug("%s template not applied: %s", name, exc)
            found = _failures.get()
            if found is not None:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                found.append(f"{name} -> {_output_shape(func)}: {type(exc).__name__}: {first}"[:200])
            return False
    return False


def _output_shape(func: Any) -> str:
    """The shape of a PrimFunc's last parameter (its output), for messages."""
    try:
        return "x".join(str(int(d)) for d in func.params[-1].shape)
    except Exception:  # noqa: BLE001 - a message only
        return "?"


@dataclass
class _Roles:
    """A block's loops by role: ``outer`` spatial loops, ``rows`` (tiled by tw, unrolled), ``cols`` (tiled by tc,
    vectorised), ``reduce``; and how the weight (read 1) is repacked, given tc."""

    outer: list[Any]
    rows: Any
    cols: Any
    reduce: list[Any]
    # (tc, depth) -> the weight's packed index; depth > 1 also splits the reduction innermost (dot products)
    pack: Callable[..., Callable[..., tuple[Any, ...]]] | None  # None: B is an activation, read as it is
    group: int | None = None  # a grouped conv's output channels per group: a tile must not straddle two groups


def _conv_roles(sch: Any, block: Any, func: Any) -> _Roles | None:
    loops = sch.get_loops(block)
    if len(loops) == 7:  # n, oh, ow, oc | kh, kw, ic
        n, oh, ow, oc, *reduce = loops
        outer = [n, oh]
        if int(sch.get(ow).extent) == 1:  # a 1-D conv exported as [N, C, L, 1]: tile along L, as the race timed it
            outer, ow = [n, ow], oh

        def pack(tc: int, depth: int = 1) -> Callable[..., tuple[Any, ...]]:
            if depth > 1:
                return lambda o, h, w, i: (o // tc, h, w, i // depth, o % tc, i % depth)
            return lambda o, h, w, i: (o // tc, h, w, i, o % tc)
    elif len(loops) == 5:  # n, ow, oc | kw, ic
        n, ow, oc, *reduce = loops
        outer = [n]

        def pack(tc: int, depth: int = 1) -> Callable[..., tuple[Any, ...]]:
            if depth > 1:
                return lambda o, w, i: (o // tc, w, i // depth, o % tc, i % depth)
            return lambda o, w, i: (o // tc, w, i, o % tc)
    else:
        return None
    group = None
    reads = sch.get(block).reads
    if sch.get(block).name_hint.startswith("group_") and len(reads) == 2:
        channels, per_group = int(reads[0].source.shape[-1]), int(reads[1].source.shape[-1])
        if per_group > 1:  # not depthwise: a tile's channels must read one group's inputs (else a gather per lane)
            group = int(sch.get(oc).extent) // (channels // per_group)
    return _Roles(outer, ow, oc, reduce, pack, group)


def _matmul_roles(sch: Any, block: Any, func: Any) -> _Roles | None:
    """``A[..., i, k] · B[k, j]``: with B a weight (a layout-free parameter, which prepacking folds), a dense layer whose
    B is packed; with B an activation ``[..., k, j]`` (attention's Q·Kᵀ and P·V), read as it is, j already innermost."""
    loops = sch.get_loops(block)
    reads = sch.get(block).reads
    if len(loops) < 3 or len(reads) != 2:
        return None
    b_shape = getattr(reads[1].source, "shape", ())
    *outer, i, j, k = loops
    free = {int(i) for i in (func.attrs.get("layout_free_buffers", []) if func.attrs is not None else [])}
    weights = {func.params[i].name for i in free if i < len(func.params)}  # params are the buffers (TVM 0.27)
    if reads[1].source.name in weights and len(b_shape) == 2:

        def pack(tc: int, depth: int = 1) -> Callable[..., tuple[Any, ...]]:
            if depth > 1:
                return lambda kk, jj: (jj // tc, kk // depth, jj % tc, kk % depth)
            return lambda kk, jj: (jj // tc, kk, jj % tc)
        return _Roles(list(outer), i, j, [k], pack)
    if len(b_shape) < 2 or int(b_shape[-1]) != int(sch.get(j).extent) or int(b_shape[-2]) != int(sch.get(k).extent):
        return None  # not B[..., k, j] (a transposed operand): left to TVM's default
    return _Roles(list(outer), i, j, [k], None)


def _tiled(sch: Any, block: Any, roles: _Roles, target: Any) -> bool:
    node = sch.get(block)
    # float32, or the int32 accumulators of an int8 region (targets.int8_lowering): both 4 bytes a lane
    if len(node.writes) != 1 or str(getattr(node.writes[0].source, "dtype", "")) not in ("float32", "int32"):
        return False
    macs = 1
    for loop in sch.get_loops(block):
        macs *= int(sch.get(loop).extent)
    threaded = macs >= PARALLEL_MACS or _weight_bytes(node) >= PARALLEL_WEIGHT_BYTES
    lanes, registers = vector_shape(target)
    cols = int(sch.get(roles.cols).extent)
    steps = reduction_steps([int(sch.get(loop).extent) for loop in roles.reduce], str(node.reads[0].source.dtype))
    tw, tc = tiles(int(sch.get(roles.rows).extent), cols, lanes, registers, roles.group, steps)
    padded = None  # the block that writes the zero-padded weight, where the columns are padded
    if tc == 1 and cols > 1:
        # No power-of-two tile divides the columns (a classifier's 8210 classes). A dense layer's weight is padded
        # with zero columns to a multiple of two vectors, at compile time with its packing; the extra outputs are
        # computed and never read. TVM's default lowering of such a layer was 350 ms where oneDNN took 5.
        # (Rows are not padded so: a guarded last row tile cost less than the input's padded copy, 197x768 @ 768x768
        # 2.09 against 2.48 ms. A convolution's guard cost more, and tile_padding widens those.)
        # Raised, not returned: tile() records it, and the report says which op kept TVM's scalar loop (ShuffleNet's
        # grouped convolutions did so unseen, 45 of its 55 ms, before tile_padding gave each group its zero filters).
        if roles.pack is None or roles.group is not None or len(roles.reduce) != 1:
            what = "an activation's" if roles.pack is None else "a grouped convolution's" if roles.group else "these"
            raise Untileable(f"no vector tile divides {what} {cols} columns{f' (groups of {roles.group})' if roles.group else ''}")
        try:
            padded, tc = _pad_columns(sch, block, roles, cols, 2 * lanes)
        except Exception as exc:  # noqa: BLE001 - not an einsum TVM can pad: its default lowering, reported
            raise Untileable(f"{cols} columns no vector tile divides, not padded: {exc}") from exc
        tw, _ = tiles(int(sch.get(roles.rows).extent), tc, lanes, registers, steps=steps)
    dot = _dot_product(sch, node, roles, tc, target)
    depth = DOT_DEPTH if dot is not None else 1
    if roles.pack is not None:
        packed = padded if padded is not None else sch.cache_read(block, 1, "global")
        sch.transform_layout(packed, ("write", 0), roles.pack(tc, depth))
        sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
    sch.cache_write(block, 0, ACCUMULATOR_SCOPE)
    write_back = sch.get_consumers(block)[0]
    # Padded columns, or rows or channels widened by tile_padding: the epilogue is a block of its own over the real
    # ones, under the tile loop (_epilogue_on_tile). Inlined into the tile's write-back it lost the bound and wrote the
    # padding past each row's end.
    epilogue = _unpad(sch, write_back) if _sliced(sch, write_back) else None
    if epilogue is None:  # bias, residual, activation: on the tile
        _inline_consumers(sch, write_back)
    rows_o, rows_i = sch.split(roles.rows, [None, tw])
    cols_o, cols_i = sch.split(roles.cols, [None, tc])
    reduce, inner = roles.reduce, [rows_i, cols_i]
    if dot is not None:  # ic by 4 innermost, under each accumulator vector: one instruction per (pixel, vector, 4 inputs)
        red_o, red_i = sch.split(roles.reduce[-1], [None, depth])
        lanes_o, lanes_i = sch.split(cols_i, [None, dot[1]])
        reduce, inner = [*roles.reduce[:-1], red_o], [rows_i, lanes_o, lanes_i, red_i]
    *batch, last = roles.outer or [None]
    if _weights_dominate(node):
        # Deep layers (512 channels at 7x7) and matrix-vector products: the weights outweigh the activations,
        # and with rows outermost every row streamed all of them again (6.5 ms against oneDNN's 1.4). Column
        # tiles outermost keep one tile's weights in cache across the rows.
        order = [*batch, cols_o, *([last] if last is not None else []), rows_o]
        sch.reorder(*order, *reduce, *inner)
        sch.reverse_compute_at(write_back, rows_o)
    else:
        order = [*roles.outer, rows_o, cols_o]
        sch.reorder(*order, *reduce, *inner)
        sch.reverse_compute_at(write_back, cols_o)
    if threaded:
        # Every loop above the reduction, the innermost tile loop too. With that one left out, decompose_reduction
        # (below) fused it into the threaded loop and the loop it made was serial: every tiled convolution ran on one
        # thread whatever the thread count (an image's first int8 convolution at batch 64: 0.25 ms on 1 or 2 threads).
        sch.parallel(sch.fuse(*order) if len(order) > 1 else order[0])
    sch.unroll(rows_i)
    if depth > 1:
        sch.unroll(inner[1])
    elif tc > 1:  # one column (a 1-channel head): nothing to vectorise, and TVM refuses to (a reduction under it)
        sch.vectorize(cols_i)
    sch.decompose_reduction(block, reduce[0])  # after parallel: the init must not sit between the fused loops
    if tc > 1:
        sch.vectorize(sch.get_loops(write_back)[-1])
    if epilogue is not None and not _epilogue_on_tile(sch, epilogue, write_back, _common_loop(sch, block, write_back), lanes):
        _epilogue_loop(sch, epilogue, threaded, lanes)
    for producer in sch.get_producers(block):
        _parallel_copy(sch, producer, threaded)
    if dot is not None:  # last: the block it replaces is gone afterwards
        sch.tensorize(inner[2], dot[0].intrin(dot[1]))
    return True


def _pad_columns(sch: Any, block: Any, roles: _Roles, cols: int, tc: int) -> tuple[Any, int]:
    """Pad a matmul's columns (and its weight's) up to a multiple of ``tc``; ``roles`` then name the padded loops.
    Returns the block that writes the padded weight (it reads the parameter, so the layout rewrite folds the padding
    into the constant) and ``tc``. The matmul's iterators are ``[..., i, j, k]``, j the columns."""
    iters = len(sch.get(block).iter_vars)
    sch.pad_einsum(block, [-(-cols // tc) * tc if axis == iters - 2 else 1 for axis in range(iters)])
    *outer, rows, columns, reduce = sch.get_loops(block)
    roles.outer, roles.rows, roles.cols, roles.reduce = outer, rows, columns, [reduce]
    weight = sch.get(block).reads[1].source
    (pad,) = [b for b in sch.get_producers(block) if sch.get(b).writes[0].source.same_as(weight)]
    return pad, tc


def _common_loop(sch: Any, a: Any, b: Any) -> Any | None:
    """The innermost loop enclosing both blocks (the tile loop, once the write-back sits under it); None if none."""
    common = None
    for x, y in zip(sch.get_loops(a), sch.get_loops(b)):
        if not sch.get(x).same_as(sch.get(y)):
            break
        common = x
    return common


def _epilogue_on_tile(sch: Any, block: Any, write_back: Any, loop: Any | None, lanes: int) -> bool:
    """A padded or widened kernel's epilogue (and the element-wise ops after it) under the tile loop, over the tile's
    real outputs, reading the accumulators themselves; False where it cannot go there (then it is one loop of its own).

    Run as a loop of its own, the epilogue read the whole int32 output back from memory: a pruned layer's 24 channels
    padded to 32 (int8, 3x3 at 14x14, batch 64, 1 thread) took 0.54-0.57 ms where the same layer with 32 real channels,
    its epilogue on the tile, took 0.45-0.47; on the tile, 0.48. TVM bounds the block by the tile's region, so the
    padding is never written (inlined into the write-back itself it was: the reason for the separate loop)."""
    if loop is None:
        return False
    _inline_consumers(sch, block)
    try:
        sch.reverse_compute_at(block, loop)
    except Exception as exc:  # noqa: BLE001 - a consumer reading more than the tile: one loop of its own
        logger.debug("epilogue left as a loop of its own: %s", exc)
        return False
    with contextlib.suppress(Exception):  # the copy to the int32 output goes: the epilogue reads the accumulators
        sch.compute_inline(write_back)
    with contextlib.suppress(Exception):  # a guarded region (a tile past the last real column): scalar, correct
        _vectorize_lanes(sch, sch.get_loops(block)[-1], lanes)
    return True


def _inline_consumers(sch: Any, block: Any) -> None:
    """Inline the element-wise ops after ``block`` into it (stops at one that is not element-wise)."""
    while len(consumers := sch.get_consumers(block)) == 1:
        consumer = consumers[0]
        try:
            sch.reverse_compute_inline(consumer)
            continue
        except Exception:  # noqa: BLE001 - perhaps a second input computed in this function: below
            pass
        try:
            _inline_side_inputs(sch, consumer, block)
            sch.reverse_compute_inline(consumer)
        except Exception as exc:  # noqa: BLE001 - a consumer that is not element-wise stays a loop of its own
            logger.debug("%s not inlined into the epilogue: %s", sch.get(consumer).name_hint, str(exc).strip()[-300:])
            break


def _inline_side_inputs(sch: Any, consumer: Any, block: Any) -> None:
    """Inline into ``consumer`` the element-wise ops computing its inputs other than ``block``'s output.

    TVM inlines a consumer into its producer only where it reads one buffer computed in the function. A residual add
    after an int8 convolution also reads the skip connection dequantised (cast, subtract, multiply: blocks of their
    own): it stayed a loop of its own over the whole output, reading back the convolution's result written as float
    (a pruned CNN's 24-channel residual at 14x14, batch 64: 0.2 ms more than the same convolution without it)."""
    def others(of: Any) -> list[Any]:
        # a producer that feeds something else too (the convolution's own input) would be inlined there as well
        return [p for p in sch.get_producers(of) if not sch.get(p).same_as(sch.get(block)) and len(sch.get_consumers(p)) == 1]

    pending = others(consumer)
    while pending:
        producer = pending.pop()
        upstream = others(producer)
        sch.compute_inline(producer)  # raises where it is not element-wise: the caller keeps the loop
        pending.extend(upstream)


def _epilogue_loop(sch: Any, block: Any, threaded: bool, lanes: int) -> None:
    """A padded or widened kernel's epilogue as one loop: the element-wise ops after it inlined, the outer loops
    threaded, the innermost (channels, or columns) in vectors where the lanes divide it."""
    _inline_consumers(sch, block)
    *outer, last = sch.get_loops(block)
    if threaded and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
    _vectorize_lanes(sch, last, lanes)


def _vectorize_lanes(sch: Any, loop: Any, lanes: int) -> None:
    """An epilogue's innermost loop (channels, or columns) in vectors of ``lanes``, or half of them, where one divides."""
    width = next((w for w in (lanes, lanes // 2) if w > 1 and int(sch.get(loop).extent) % w == 0), None)
    if width is not None:
        sch.vectorize(sch.split(loop, [None, width])[1])


def _sliced(sch: Any, write_back: Any) -> bool:
    """Whether the write-back's one consumer writes a slice of the tile's output (the copy pad_einsum makes, or the
    slice after a convolution tile_padding widened): reverse-inlined, TVM dropped its bound."""
    consumers = sch.get_consumers(write_back)
    if len(consumers) != 1:
        return False
    shape = [int(d) for d in sch.get(write_back).writes[0].source.shape]
    sliced = [int(d) for d in sch.get(consumers[0]).writes[0].source.shape]
    return len(sliced) == len(shape) and sliced != shape and all(a <= b for a, b in zip(sliced, shape))


def _unpad(sch: Any, write_back: Any) -> Any:
    """The block after a padded matmul's or widened convolution's write-back that reads its real columns or pixels
    (the copy pad_einsum made, or tile_padding's slice), inlined into the bias or activation that follows where there
    is one."""
    (copy,) = sch.get_consumers(write_back)
    consumers = sch.get_consumers(copy)
    if len(consumers) == 1:
        try:
            sch.compute_inline(copy)
            return consumers[0]
        except Exception:  # noqa: BLE001 - the copy stays: one more pass over the output
            pass
    return copy


@dataclass(frozen=True)
class DotProduct:
    """A CPU's 4-deep 8-bit dot-product instruction: ``name``, the activation dtype it multiplies by int8 weights, and
    the accumulator widths (int32 lanes) it comes in, widest first."""

    name: str
    activation: str
    lanes: tuple[int, ...]
    shifted: bool = True  # whether the int8 lowering shifts activations of the other type into ``activation``
    weight_max: int | None = None  # the largest |weight| it computes exactly (vpmaddubsw's int16 pairs); None: any

    def intrin(self, lanes: int) -> str:
        """The tensor intrinsic computing ``lanes`` accumulators' 4-deep step."""
        from optc.targets.dot_intrinsics import pmaddubsw_intrin, sdot_intrin, vnni_intrin

        if self.name == "sdot":
            return sdot_intrin(ACCUMULATOR_SCOPE)
        return {"vpdpbusd": vnni_intrin, "vpmaddubsw": pmaddubsw_intrin}[self.name](lanes, ACCUMULATOR_SCOPE)

    def describe(self) -> str:
        other = "uint8" if self.activation == "int8" else "int8"
        how = f"{other} ones shifted by 128" if self.shifted else f"{other} ones unshifted, for oneDNN: the widening kernel"
        bound = "" if self.weight_max is None else f"; weights within +-{self.weight_max} only: the lowering keeps wider ones float"
        return f"{self.name} ({self.activation} activations; {how}{bound})"


# A fused function's attribute, set where every int8 weight it is called with is a constant within the dot product's
# weight_max (targets/weight_bounds.py). It is part of the function's structure, so a tuning record made with
# vpmaddubsw in its trace is never applied to the same layer with wider or unknown weights.
PAIRS_FIT_ATTR = "optc.int8_pairs_fit"
# Without VNNI the pairs of vpmaddubsw saturate at int16: 255 * (64 + 64) = 32640 is the most that fits.
PMADDUBSW_WEIGHT_MAX = 64


def dot_product(target: Any) -> DotProduct | None:
    """The 8-bit dot product ``target`` has: Armv8.2's ``sdot`` (int8 x int8, e.g. ``--cpu cortex-a76``), x86's VNNI
    ``vpdpbusd`` (uint8 x int8; 16 lanes with AVX512-VNNI, 8 and 4 with AVX512-VL or AVX-VNNI), without VNNI
    ``vpmaddubsw`` + ``vpmaddwd`` (uint8 x int8, weights within +-64; 16 lanes with AVX-512BW, 8 and 4 with AVX2), or
    None."""
    from tvm.target import codegen

    def has(feature: str) -> bool:
        return _has(target, feature)

    if str(target.attrs.get("mtriple", "")).startswith(("aarch64", "arm64")):
        return DotProduct("sdot", "int8", (DOT_DEPTH,)) if has("dotprod") else None
    if str(target.kind.name) != "llvm":
        return None
    zmm = vector_shape(target)[0] == 16
    # LLVM 22 declares vpdpbusd on i8 vectors (dot_intrinsics); the pinned TVM wheel links it, older builds go without
    if codegen.llvm_version_major() >= 22:
        narrow = (8, 4) if has("avxvnni") or (has("avx512vnni") and has("avx512vl")) else ()
        wide = (16,) if has("avx512vnni") and zmm else ()
        if wide or narrow:
            return DotProduct("vpdpbusd", "uint8", wide + narrow)
    # Without VNNI (Zen 3, Skylake): three instructions for vpdpbusd's one; exact for 7-bit weights only, as the
    # quantize pass writes them for such CPUs
    narrow = (8, 4) if has("avx2") else ()
    wide = (16,) if has("avx512bw") and zmm else ()
    return DotProduct("vpmaddubsw", "uint8", wide + narrow, weight_max=PMADDUBSW_WEIGHT_MAX) if wide or narrow else None


def pair_weight_max(target: Any) -> int | None:
    """The largest |weight| ``target``'s int8 kernels multiply exactly, None where any is: on x86 without VNNI, oneDNN
    and optc's ``vpmaddubsw`` alike add products in pairs into saturating int16 (targets/int8_lowering.py)."""
    if str(target.kind.name) != "llvm" or not _has(target, "sse2"):  # not x86 (an Arm board, or built on one)
        return None
    return None if _has(target, "avx512vnni") or _has(target, "avxvnni") else PMADDUBSW_WEIGHT_MAX


def _has(target: Any, feature: str) -> bool:
    """Whether LLVM says ``target`` has ``feature``; False for a target LLVM cannot describe."""
    from tvm.target import codegen

    try:
        return bool(codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - nothing assumed
        return False


def _dot_product(sch: Any, node: Any, roles: _Roles, tc: int, target: Any) -> tuple[DotProduct, int] | None:
    """The dot product computing this block and its accumulator width, where one can: 8-bit activations of the
    instruction's type (the int8 lowering shifts the other type by 128 on such targets) times int8 weights into int32,
    a packed weight, a width dividing tc and 4 | the innermost reduction (input channels; a grouped conv's per group, its
    tile inside one group; a depthwise one has a single input channel and stays on the widening kernels). An
    instruction with a ``weight_max`` (vpmaddubsw) only where the function is marked as fitting it."""
    reads = node.reads
    if roles.pack is None or len(reads) != 2 or int(sch.get(roles.reduce[-1]).extent) % DOT_DEPTH:
        return None
    dot = dot_product(target)
    if dot is None or [str(getattr(r.source, "dtype", "")) for r in reads] != [dot.activation, "int8"]:
        return None
    if dot.weight_max is not None:
        attrs = sch.mod["main"].attrs
        if attrs is None or not bool(attrs.get(PAIRS_FIT_ATTR, False)):
            return None  # weights not known to fit: the widening kernel, exact for any
    lanes = next((n for n in dot.lanes if tc % n == 0), None)
    return (dot, lanes) if lanes is not None else None


def _read_sizes(node: Any) -> list[int] | None:
    """Elements of the block's first two operands (input, weights); None where a shape is unknown."""
    sizes = []
    for region in node.reads[:2]:
        shape = getattr(region.source, "shape", None)
        if shape is None:
            return None
        size = 1
        for dim in shape:
            size *= int(dim)
        sizes.append(size)
    return sizes if len(sizes) == 2 else None


def _weights_dominate(node: Any) -> bool:
    """Whether the block reads more bytes of its second operand (the weights) than of its first (the input)."""
    sizes = _read_sizes(node)
    return sizes is not None and sizes[1] > sizes[0]


def _weight_bytes(node: Any) -> int:
    """Bytes of the block's second operand (the weights), 0 where unknown."""
    sizes = _read_sizes(node)
    return 0 if sizes is None else sizes[1] * node.reads[1].source.dtype.bits // 8


def _parallel_copy(sch: Any, block: Any, threaded: bool) -> None:
    """The padded input: rows over threads (with the convolution's), channels vectorised where short enough."""
    try:
        if sch.get(block).annotations.get("meta_schedule.layout_rewrite_preproc"):
            return
        loops = sch.get_loops(block)
        if len(loops) != 4:
            return
        if threaded:
            sch.parallel(sch.fuse(loops[0], loops[1]))
        if int(sch.get(loops[3]).extent) <= 64:
            vectorize_short(sch, loops[3])
    except Exception as exc:  # noqa: BLE001 - left serial: correct, slower
        logger.debug("padding copy left serial: %s", exc)


def vectorize_short(sch: Any, loop: Any) -> None:
    """Vectorise a loop of at most 64 iterations (channels): whole when its extent is a power of two, else in the
    widest pieces of 16 or 8 lanes that divide it (whole when neither does).

    LLVM legalises a vector of 24 lanes poorly where it converts types: an int8 residual's requantisation over
    64x14x14x24 (uint8 -> int32 -> float, round, float -> uint8) took 1.0 ms as 24-lane vectors, 0.27 as 3 x 8.
    Pieces of 4 lose to the whole vector: a quantise-and-move of 28-pixel rows took 19 us as 7 x 4, 9.5 whole."""
    extent = int(sch.get(loop).extent)
    width = next((w for w in (16, 8) if extent % w == 0), None)
    if extent & (extent - 1) == 0 or width is None:
        sch.vectorize(loop)
    else:
        sch.vectorize(sch.split(loop, [None, width])[1])
