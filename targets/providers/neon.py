"""optc's Winograd kernels on ARM targets: which 3x3 convolutions take them, and their glue (``neon_glue.cc``)
cross-compiled for aarch64 and linked into ``model.so``.

ARM artifacts have no vendor library: TVM's tiled kernels (:mod:`optc.targets.tiled_kernels`) compute every op,
a direct convolution doing 9 multiply-adds per input channel, output channel and pixel. optc's Winograd kernels
(``winograd_tile.h``, the x86 glue's, built at NEON's 4 floats) do 2.25 (F(4x4, 3x3)) or 4 (F(2x2, 3x3)) plus their
transforms, and read transformed weights 4x or 1.8x the size of the filters.

On x86 the race times both and keeps the faster. An ARM target cannot be timed here (qemu emulates NEON lane by
lane, and the board is not this machine), so the choice is a cost model of a board, kept simple and stated: a
call costs the larger of its multiply-adds and the bytes of weights it reads, at ``MACS_PER_BYTE`` multiply-adds
per byte (a Cortex-A76 core: two 128-bit FMA pipes at 2.4 GHz, 19 G multiply-adds a second, against 15-20 GB/s of
LPDDR4X), plus the transforms' work and the call's own; a Winograd kernel is chosen where the model has it ``MARGIN`` times cheaper than
the direct kernel, and only with at most ``MAX_TRANSFORMED_BYTES`` of transformed weights a layer (more is both
DRAM traffic every call and memory the board holds for as long as the artifact is loaded).
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from optc.errors import TargetError
from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43, Chain
from optc.targets.providers.glue_build import compiled, source_digest

GLUE = Path(__file__).with_name("neon_glue.cc")
GLUE_HEADERS = tuple(Path(__file__).with_name(h) for h in ("winograd.h", "winograd_tile.h"))
PREFIX = "optc_neon"  # the glue's functions: optc_neon_conv2d, _nobias, _sum
FLAGS = ["-O3", "-std=c++17", "-fPIC"]
ARCH_FLAGS = {"aarch64": ["-march=armv8-a"], "x86_64": []}  # x86-64: the same source for the kernels' unit tests

MACS_PER_BYTE = 1.3
MARGIN = 1.25
CALL_MACS = 20_000  # a glue call's own cost (its call site's lookup, the pool's wake-up), about 1 us of a core
MAX_TRANSFORMED_BYTES = 8 << 20
NR = 8  # output channels a register tile covers (two NEON vectors): the transformed weights are padded to it
# (label, positions of a tile (its transformed filter's size), output tile side, multiply-adds of the input and output
# transforms per tile and channel, counting an add as one)
TILES = {ALGO_WINOGRAD_F43: ("winograd F(4x4,3x3)", 36, 4, 144, 80), ALGO_WINOGRAD_F23: ("winograd F(2x2,3x3)", 16, 2, 32, 12)}


@functools.lru_cache(maxsize=1)
def glue_digest() -> str:
    return source_digest(GLUE, GLUE_HEADERS)


def glue_object(compiler: str = "aarch64-linux-gnu-g++", arch: str = "aarch64") -> Path:
    """The glue compiled for ``arch`` by ``compiler``, built on first use and cached."""
    if shutil.which(compiler) is None:
        raise TargetError(f"optc's NEON kernels need the cross compiler '{compiler}' (Debian: apt-get install g++-aarch64-linux-gnu)")
    return compiled(GLUE, glue_digest(), compiler, [*FLAGS, *ARCH_FLAGS[arch]], "NEON kernels' glue")


def transformed_bytes(chain: Chain, algo: int) -> int:
    """The transformed weights the glue holds for ``chain`` at ``algo``: positions x output channels (padded to a
    register tile) x input channels, float32."""
    assert chain.weight is not None
    k, c = chain.weight.shape[:2]
    return TILES[algo][1] * -(-k // NR) * NR * c * 4


def cost(chain: Chain, algo: int | None) -> float:
    """The model's time for ``chain`` (direct when ``algo`` is None), in multiply-adds."""
    assert chain.weight is not None
    if algo is None:
        return max(float(chain.macs()), MACS_PER_BYTE * chain.weight.size * 4)
    k, c = chain.weight.shape[:2]
    n, oh, ow = chain.out_shape[0], chain.out_shape[1], chain.out_shape[2]  # NHWC
    _label, positions, m, t_in, t_out = TILES[algo]
    tiles = n * -(-oh // m) * -(-ow // m)
    macs = tiles * (positions * c * k + t_in * c + t_out * k) + CALL_MACS
    return max(float(macs), MACS_PER_BYTE * transformed_bytes(chain, algo))


def choose(chain: Chain) -> int | None:
    """The Winograd algorithm the cost model picks for ``chain``, or None (TVM's direct kernel)."""
    if not chain.optc_winograd_candidate() or chain.given_out_shape is not None:
        return None
    direct = cost(chain, None)
    fits = [a for a in TILES if transformed_bytes(chain, a) <= MAX_TRANSFORMED_BYTES]
    best = min(fits, key=lambda a: cost(chain, a), default=None)
    return best if best is not None and cost(chain, best) * MARGIN <= direct else None


def place(mod: Any, report: Any) -> Any:
    """``mod`` (NHWC) with the 3x3 convolutions :func:`choose` picks sent to the NEON glue; ``report`` (a
    :class:`~optc.targets.providers.select.ProviderReport`) says which and why."""
    from optc.targets.providers.offload import find_chains, offload

    chains = [c for c in find_chains(mod) if c.kind == "conv2d" and c.src_dtype == "float32"]
    picks = {id(c): choose(c) for c in chains}
    for chain in chains:
        algo = picks[id(chain)]
        if algo is not None:
            chain.algo, chain.glue = algo, PREFIX
    mod, taken = offload(mod, chains, lambda c: picks[id(c)] is not None)
    report.chains = len(chains)
    report.glue = "neon" if taken else ""
    report.unmeasured = "chosen by a cost model of the board: an ARM target cannot be timed here"
    for chain in chains:
        algo = picks[id(chain)]
        entry = {"workload": chain.workload(), "macs": chain.macs(), "model_direct": cost(chain, None)}
        if algo is not None:
            entry.update(algorithm=TILES[algo][0], model_winograd=cost(chain, algo))
            report.winograd_optc_bytes += transformed_bytes(chain, algo)
            report.offloaded.append(entry)
        else:
            report.kept.append(entry)
    return mod
