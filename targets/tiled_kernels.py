"""optc's own convolution kernel: a register-tiled schedule of TVM's NHWC conv2d, for any CPU LLVM targets.

TVM's untuned lowering of a convolution is one scalar loop nest: 14x slower
than oneDNN at the median over this project's measured workloads, 80x on
ResNet-shaped ones. MetaSchedule closes that only after minutes per task. This
schedule is what a tuned kernel converges to, written once:

- the output is cut into tiles of ``tw`` pixels along the row x ``tc`` channels;
  each tile's accumulators live in vector registers for the whole reduction
  (``kh x kw x ic``), so every weight vector loaded serves ``tw`` pixels and every
  input value broadcast serves ``tc / lanes`` vectors;
- weights are repacked once, at compile time, as ``[oc / tc, kh, kw, ic, tc]``
  (TVM's layout-rewrite pre-processing, folded into the constants), so the tile's
  weight loads are contiguous;
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
64ch@56² 3x3 179 -> 2.3 ms, 24ch@28² 3.6 -> 0.13 ms, 48->1 ch@64² 1.9 -> 0.35 ms.
"""
from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

CONV_BLOCK = "conv2d_nhwc"
SPARE_REGISTERS = 4  # for the broadcast input value and the weight vectors in flight
# Below this many multiply-adds a convolution runs on the calling thread: waking the pool costs tens of
# microseconds (the oneDNN glue draws the same line, onednn_glue.cc).
PARALLEL_MACS = 1 << 22


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


def tiles(out_width: int, out_channels: int, lanes: int, registers: int) -> tuple[int, int]:
    """(tw, tc): pixels and channels per register tile."""
    tc = _divisor(out_channels, (2 * lanes, lanes, lanes // 2, lanes // 4)) if out_channels >= 4 else out_channels
    vectors = max(1, tc // lanes)
    budget = max(1, (registers - SPARE_REGISTERS) // vectors)
    return _divisor(out_width, list(range(min(budget, 14), 0, -1))), tc


def schedule_conv(func: Any, target: Any) -> Any | None:
    """``func`` with its NHWC float32 convolution register-tiled; None when it holds none or the schedule fails."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        conv = sch.get_sblock(CONV_BLOCK)
    except Exception:  # noqa: BLE001 - no such block: not a convolution
        return None
    try:
        return _tiled(sch, conv, target)
    except Exception as exc:  # noqa: BLE001 - an unusual fused function: TVM's default lowering is always correct
        logger.debug("conv template not applied: %s", exc)
        return None


def _tiled(sch: Any, conv: Any, target: Any) -> Any | None:
    node = sch.get(conv)
    if len(node.writes) != 1 or str(getattr(node.writes[0].source, "dtype", "")) != "float32":
        return None
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        return None
    n, oh, ow, oc, rh, rw, rc = loops
    macs = 1
    for loop in loops:
        macs *= int(sch.get(loop).extent)
    threaded = macs >= PARALLEL_MACS
    lanes, registers = vector_shape(target)
    tw, tc = tiles(int(sch.get(ow).extent), int(sch.get(oc).extent), lanes, registers)
    packed = sch.cache_read(conv, 1, "global")
    sch.transform_layout(packed, ("write", 0), lambda o, h, w, i: (o // tc, h, w, i, o % tc))
    sch.annotate(packed, "meta_schedule.layout_rewrite_preproc", True)
    sch.cache_write(conv, 0, "local")
    write_back = sch.get_consumers(conv)[0]
    while len(consumers := sch.get_consumers(write_back)) == 1:  # bias, residual, activation: on the tile
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # noqa: BLE001 - a consumer that reads more than the tile stays a loop of its own
            break
    ow_o, ow_i = sch.split(ow, [None, tw])
    oc_o, oc_i = sch.split(oc, [None, tc])
    if _weights_dominate(node):
        # Deep layers (512 channels at 7x7): the weights outweigh the activations, and with rows outermost every
        # row streamed all of them again (6.5 ms against oneDNN's 1.4). Channel tiles outermost keep one tile's
        # weights in cache across the rows.
        sch.reorder(n, oc_o, oh, ow_o, rh, rw, rc, ow_i, oc_i)
        sch.reverse_compute_at(write_back, ow_o)
        outer = sch.fuse(n, oc_o, oh)
    else:
        sch.reorder(n, oh, ow_o, oc_o, rh, rw, rc, ow_i, oc_i)
        sch.reverse_compute_at(write_back, oc_o)
        outer = sch.fuse(n, oh)
    if threaded:
        sch.parallel(outer)
    sch.unroll(ow_i)
    sch.vectorize(oc_i)
    sch.decompose_reduction(conv, rh)  # after parallel: the init must not sit between the fused loops
    sch.vectorize(sch.get_loops(write_back)[-1])
    for block in sch.get_producers(conv):
        _parallel_copy(sch, block, threaded)
    return sch.mod["main"].with_attr("tir.is_scheduled", True)


def _weights_dominate(node: Any) -> bool:
    """Whether the convolution reads more weight than input bytes (its reads: padded input, weights)."""
    sizes = []
    for region in node.reads[:2]:
        shape = getattr(region.source, "shape", None)
        if shape is None:
            return False
        size = 1
        for dim in shape:
            size *= int(dim)
        sizes.append(size)
    return len(sizes) == 2 and sizes[1] > sizes[0]


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
            sch.vectorize(loops[3])
    except Exception as exc:  # noqa: BLE001 - left serial: correct, slower
        logger.debug("padding copy left serial: %s", exc)
