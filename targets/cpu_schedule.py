"""Default CPU schedules for the light functions no record or provider covers.

TVM's untuned CPU lowering runs every fused function as one scalar thread.
That is fine for a handful of elements and costly for the element-wise ops,
permutes, pools, softmaxes and normalisations left between the heavy kernels
(several milliseconds of a ResNet-18 whose convolutions take twenty). These
functions are memory-bound, so one schedule serves them: inline what can be
inlined, then spread the output's outer loops over threads and let the
innermost loop vectorise. A function the schedule cannot take (or whose
output is too small to be worth a thread) keeps TVM's default. Convolutions
and matmuls get optc's register-tiled kernels instead (:mod:`.tiled_kernels`).
"""
from __future__ import annotations

import logging
from typing import Any

from optc.targets.tiled_kernels import tile, vectorize_short

logger = logging.getLogger(__name__)

# Output elements below which waking the thread pool costs more than it saves: a sleeping
# worker takes tens of microseconds to wake, a 32K-element add a few to compute (BERT-shaped
# model, 2 threads: adds and transposes 6-9x slower threaded at 4096).
PARALLEL_MIN = 1 << 17
VECTOR = 16  # lanes the innermost split aims for; LLVM narrows to the target's width


def schedule_function(func: Any) -> Any | None:
    """``func`` scheduled, or None when it is left as it is."""
    import tvm
    from tvm import s_tir

    if func.attrs is not None and func.attrs.get("tir.is_scheduled", False):
        return None
    target = tvm.target.Target.current(allow_none=True)
    if target is not None and target.kind.name == "llvm":
        sch = s_tir.Schedule(func)
        if tile(sch, target):  # a convolution or a matmul: optc's register-tiled kernel
            _schedule_tail(sch)
            return sch.mod["main"].with_attr("tir.is_scheduled", True)
    try:
        sch = s_tir.Schedule(func)
        root = sch.get_sblock("root")  # a function without one raises: left as it is, below
        blocks = sch.get_child_blocks(root)
        if not blocks:
            return None
        for block in blocks[:-1]:
            _inline(sch, block)
        before = len(blocks)
        blocks = sch.get_child_blocks(root)
        # fewer blocks is already a gain: each one left is a pass over memory (an input's quantize, pad and transpose
        # to NHWC: 7 passes, 0.18 ms for a 64x1x28x28 batch, when its one channel left nothing to vectorise)
        changed = len(blocks) < before
        for block in blocks:
            changed |= _parallelise(sch, block)
        if not changed:
            return None
        return sch.mod["main"].with_attr("tir.is_scheduled", True)
    except Exception as exc:  # noqa: BLE001 - the default lowering is always a correct fallback
        logger.debug("default CPU schedule skipped: %s", exc)
        return None


def _schedule_tail(sch: Any) -> None:
    """The blocks a tiled kernel left untouched: element-wise ops FuseOps put after it that read more than its tile.

    A squeeze-excite gate is a 1x1 convolution of a pooled ``[1, 1, 1, C]`` vector whose consumers scale the whole
    ``[1, H, W, C]`` map it gates (and, int8, requantise it): the tile covers C values and the map's
    ``H x W x C`` ones stayed one scalar thread, 2.7 ms of RapidOCR's 14 ms int8 detector. They get the element-wise
    schedule: inlined into one another, then threads and vectors."""
    try:
        root = sch.get_sblock("root")
        tail = [b for b in sch.get_child_blocks(root) if not _scheduled(sch, b)]
        for block in tail[:-1]:
            _inline(sch, block)
        for block in sch.get_child_blocks(root):
            if not _scheduled(sch, block):
                _parallelise(sch, block)
    except Exception as exc:  # noqa: BLE001 - what is left serial stays correct
        logger.debug("blocks after a tiled kernel left serial: %s", exc)


def _scheduled(sch: Any, block: Any) -> bool:
    """Whether the tiled schedule already placed ``block``: the weight packing, the reduction itself, or a block with
    a threaded, vectorised or unrolled loop (the padded copy, the accumulators' initialisation and write-back)."""
    from tvm import tirx

    node = sch.get(block)
    if node.annotations.get("meta_schedule.layout_rewrite_preproc") or _is_reduction(sch, block):
        return True
    return any(sch.get(loop).kind != tirx.ForKind.SERIAL for loop in sch.get_loops(block))


def _inline(sch: Any, block: Any) -> None:
    """Into its consumer, else into its producer; a block that can be neither (a reduction feeding two) stays.

    Never into a reduction whose channels will not be vectorised with its window's loops outside them: there a
    padding puts a bounds test inside the window loop, which LLVM then cannot vectorise (NHWC 3x3 max-pool of
    112x112x64: 1.15 ms against 0.14 ms with the padded copy kept). Where they will be, the test is one per
    window position and the padded copy is a pass over memory saved (the same pool, 1 thread: 187 against 369 us)."""
    if any(_is_reduction(sch, c) and not _reads_channels_innermost(sch, c) for c in sch.get_consumers(block)):
        return
    for inline in (sch.compute_inline, sch.reverse_compute_inline):
        try:
            inline(block)
            return
        except Exception:  # noqa: BLE001, S112 - TVM raises its own error kinds; staying is correct
            continue


def _is_reduction(sch: Any, block: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _parallelise(sch: Any, block: Any) -> bool:
    """Fuse the leading spatial loops, thread them, vectorise the innermost spatial loop."""
    from tvm import tirx

    loops = sch.get_loops(block)
    if not loops:
        return False
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    if len(kinds) != len(loops):
        return False
    spatial = []
    for loop, kind in zip(loops, kinds):
        if kind != tirx.IterVar.DataPar:
            break
        spatial.append(loop)
    extents = [int(sch.get(loop).extent) for loop in spatial] if spatial else []
    total = 1
    for e in extents:
        total *= e
    threaded = total >= PARALLEL_MIN
    reduction = len(spatial) < len(loops)
    if reduction and not threaded:
        return _vectorise_reduction(sch, block, loops, spatial, extents)
    if not threaded:
        return _vectorise_innermost(sch, spatial, extents) if len(spatial) == len(loops) else False
    if not reduction and len(spatial) > 1 and extents[-1] >= VECTOR // 2:
        fused = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
        sch.parallel(fused)
        inner = spatial[-1]
        if extents[-1] % VECTOR == 0 and extents[-1] > VECTOR:
            _, inner = sch.split(inner, factors=[None, VECTOR])
        if extents[-1] % VECTOR == 0:
            sch.vectorize(inner)
        elif extents[-1] <= 64:
            vectorize_short(sch, inner)
        return True
    if not reduction and len(spatial) > 2 and extents[-1] <= 4 and _reads_along(sch, block, spatial[-2]):
        # An image's few channels innermost, read from NCHW (its quantize, pad and transpose to NHWC): vectors along
        # the width read each channel's row as it lies, instead of gathering pixels across the planes (1x3x224x224:
        # 0.67 ms with the loops fused and cut into vectors)
        *outer, width, channels = spatial
        sch.reorder(*outer, channels, width)
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        lanes = next((w for w in (VECTOR, 12, 10, VECTOR // 2, 6, 5, VECTOR // 4) if extents[-2] % w == 0 and extents[-2] > w), None)
        if lanes is not None:
            _, inner = sch.split(width, factors=[None, lanes])
            sch.vectorize(inner)
        return True
    if reduction:
        # threads over the outer spatial loops; the innermost (channels, in NHWC) is vectorised with the window's
        # loops moved outside it, where it walks the input's innermost axis: LLVM does not vectorise a loop with a
        # reduction inside it (NHWC 3x3 max-pool of 112x112x64, 1 thread: 375 us one channel at a time)
        outer = spatial[:-1] if len(spatial) > 1 and extents[-1] >= VECTOR // 2 else spatial
        channels = len(outer) < len(spatial) and _reads_channels_innermost(sch, block)
        if channels:
            _window_outside(sch, loops, spatial)
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        if channels:
            _vectorise_innermost(sch, spatial, extents)
        return True
    fused = sch.fuse(*spatial) if len(spatial) > 1 else spatial[0]
    outer, inner = sch.split(fused, factors=[None, VECTOR * 4])
    sch.parallel(outer)
    _, inner_inner = sch.split(inner, factors=[None, VECTOR])
    sch.vectorize(inner_inner)
    return True


def _reads_along(sch: Any, block: Any, loop: Any) -> bool:
    """Whether ``loop`` moves ``block``'s first read along that buffer's innermost axis (a read from NCHW, the width)."""
    from tvm.tirx.analysis import undefined_vars

    node = sch.get(block)
    loops = [sch.get(lp) for lp in sch.get_loops(block)]
    if not node.reads or len(node.iter_vars) != len(loops):
        return False
    var = node.iter_vars[next(i for i, lp in enumerate(loops) if lp.same_as(sch.get(loop)))].var
    return any(v.same_as(var) for v in undefined_vars(node.reads[0].region[-1].min))


def _vectorise_reduction(sch: Any, block: Any, loops: list[Any], spatial: list[Any], extents: list[int]) -> bool:
    """One thread: the reduction loops moved outside the innermost output loop, which is then vectorised.

    Only when that loop walks the input's innermost axis: a global pool over NHWC then adds whole rows of
    channels (1x24x96x16: 32 us scalar, one channel at a time down a stride of 16 floats)."""
    if not spatial or extents[-1] < 4 or not _reads_channels_innermost(sch, block):
        return False
    _window_outside(sch, loops, spatial)
    return _vectorise_innermost(sch, spatial, extents)


def _window_outside(sch: Any, loops: list[Any], spatial: list[Any]) -> None:
    """The reduction's loops moved between the outer output loops and the innermost one."""
    sch.reorder(*spatial[:-1], *loops[len(spatial):], spatial[-1])


def _reads_channels_innermost(sch: Any, block: Any) -> bool:
    """Whether a reduction's innermost output loop walks its first read along that buffer's innermost axis, one
    element a step, over at least 4 elements (a pool's NHWC channels): its window's loops can go outside it."""
    from tvm import tirx

    node = sch.get(block)
    kinds = [iv.iter_type for iv in node.iter_vars]
    spatial = next((i for i, kind in enumerate(kinds) if kind != tirx.IterVar.DataPar), len(kinds))
    if not node.reads or spatial == 0 or spatial == len(kinds):
        return False
    last = node.iter_vars[spatial - 1]
    innermost = node.reads[0].region[-1]
    return (isinstance(innermost.min, tirx.Var) and innermost.min.same_as(last.var) and int(innermost.extent) == 1
            and isinstance(last.dom.extent, tirx.IntImm) and int(last.dom.extent) >= 4)


def _vectorise_innermost(sch: Any, spatial: list[Any], extents: list[int]) -> bool:
    """One thread: vectorise the innermost loop, in vector-width pieces when it divides evenly, whole or in pieces of
    16 or 8 lanes (:func:`vectorize_short`) when it is short (24 channels: a hard-swish over 1x24x96x24 took 294 us
    scalar, against 6 us vectorised), else in pieces of 8 or 4."""
    if not spatial:
        return False
    extent = extents[-1]
    rows = [i for i, e in enumerate(extents) if e > 1]
    if extent == 1 and rows and extents[rows[-1]] >= VECTOR // 2:
        # one channel innermost (NHWC, C = 1): vectorise the row it lies along. Fused, the lanes' indices into an
        # NCHW read are (f // HW, f % HW // W, f % W), which LLVM gathers (the sample's 64x1x28x28 input quantised
        # and moved to NHWC: 82 us)
        row = spatial[rows[-1]]
        sch.reorder(*[loop for i, loop in enumerate(spatial) if i != rows[-1]], row)
        return _vectorise_innermost(sch, [row], [extents[rows[-1]]])
    if extent == 1 and len(spatial) > 1:  # a short row: vectorise the loops fused
        total = 1
        for e in extents:
            total *= e
        width = next((w for w in (VECTOR, VECTOR // 2, VECTOR // 4) if total % w == 0 and total > w), None)
        if width is None:
            return False
        _, inner = sch.split(sch.fuse(*spatial), factors=[None, width])
        sch.vectorize(inner)
        return True
    width = next((w for w in (VECTOR, VECTOR // 2, VECTOR // 4) if extent % w == 0 and extent > w), None)
    if extent % VECTOR == 0 and extent > VECTOR or width is not None and extent > 64:
        _, inner = sch.split(spatial[-1], factors=[None, width])
        sch.vectorize(inner)
    elif 2 <= extent <= 64:
        vectorize_short(sch, spatial[-1])
    else:
        return False
    return True


def default_schedules(mod: Any) -> tuple[Any, int]:
    """``mod`` with every unscheduled PrimFunc that :func:`schedule_function` takes scheduled; and how many."""
    import tvm

    updates = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            scheduled = schedule_function(func)
            if scheduled is not None:
                updates[gvar] = scheduled
    if not updates:
        return mod, 0
    mod = mod.shallow_copy() if hasattr(mod, "shallow_copy") else mod
    for gvar, func in updates.items():
        mod.update_func(gvar, func)
    return mod, len(updates)
