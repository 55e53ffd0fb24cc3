"""optc's own Winograd kernels where no vendor library computes the convolutions: their glue
(``winograd_glue.cc``), compiled for the target and linked into ``model.so``, and which 3x3 convolutions take them
on an ARM board, by a cost model (x86 without oneDNN races them instead: :mod:`.winograd_race`).

Without a vendor library TVM's tiled kernels (:mod:`optc.targets.tiled_kernels`) compute every op, a direct
convolution doing 9 multiply-adds per input channel, output channel and pixel. optc's Winograd kernels
(``winograd_tile.h``, the oneDNN glue's, built for NEON's 4 floats a vector on aarch64) do 2.25 (F(4x4, 3x3)) or 4
(F(2x2, 3x3)) plus their transforms, and read transformed weights 4x or 1.8x the size of the filters.

An ARM target cannot be timed here (qemu emulates NEON lane by lane, and the board is not this machine), so the
choice is a cost model of a board, kept simple and stated: a call costs the larger of its multiply-adds (channels
padded to the vectors and register tiles) and the bytes of weights it reads, at ``MACS_PER_BYTE`` multiply-adds per
byte (a Cortex-A76 core: two 128-bit FMA pipes at 2.4 GHz, 19 G multiply-adds a second, against 15-20 GB/s of
LPDDR4X), plus the transforms' work and the call's own. Those two were fitted to the race on this x86 machine (its
AVX2 code: 16 registers of 8 floats, the register file of NEON's 32 of 4), F(4x4) and F(2x2) against TVM's tiled
kernel on 18 shapes from 8 to 512 channels: the transforms cost ``TRANSFORM_FACTOR`` times their adds (they go
through memory), a call ``CALL_MACS``, and the model's speed-ups then fall within 22 % (rms) of the measured ones
(1.7x to 3.7x where channels reach 16 and the side 14; 0.6x to 0.9x for 8 channels at 56 or 20 at 12). A Winograd
kernel is chosen where the model has it ``MARGIN`` times cheaper than the direct kernel (well clear of its error), and only with at most
``MAX_TRANSFORMED_BYTES`` of transformed weights a layer (more is both DRAM traffic every call and memory the board
holds for as long as the artifact is loaded).
"""
from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

from optc.errors import TargetError
from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43, Chain
from optc.targets.providers.glue_build import compiled, source_digest

GLUE = Path(__file__).with_name("winograd_glue.cc")
GLUE_HEADERS = tuple(Path(__file__).with_name(h) for h in ("winograd_builds.h", "winograd.h", "winograd_tile.h"))
PREFIX = "optc_winograd"  # the glue's functions: optc_winograd_conv2d, _nobias, _sum
FLAGS = ["-O3", "-std=c++17", "-fPIC"]
ARCH_FLAGS = {"aarch64": ["-march=armv8-a"], "x86_64": []}  # x86-64: the AVX2 and AVX-512 builds have their own

MACS_PER_BYTE = 1.3
MARGIN = 1.4
TRANSFORM_FACTOR = 4
CALL_MACS = 80_000  # a glue call's own cost (its lookup, the pool's wake-up, the scratch): 4 us at 19 G multiply-adds a second
MAX_TRANSFORMED_BYTES = 8 << 20
NR = 8  # output channels a NEON register tile covers (two vectors): the transformed weights are padded to it
LANES = 4  # floats a NEON vector holds: the transformed inputs' channels are padded to it
# (label, positions of a tile (its transformed filter's size), output tile side, multiply-adds of the input and output
# transforms per tile and channel, counting an add as one)
TILES = {ALGO_WINOGRAD_F43: ("winograd F(4x4,3x3)", 36, 4, 144, 80), ALGO_WINOGRAD_F23: ("winograd F(2x2,3x3)", 16, 2, 32, 12)}


@functools.lru_cache(maxsize=1)
def glue_digest() -> str:
    return source_digest(GLUE, GLUE_HEADERS)


def toolchain(cross_compiler: str | None) -> tuple[str, str]:
    """(compiler, architecture) the glue is built with for a target: its cross compiler's aarch64 (ARM), else this
    machine's g++ for x86-64."""
    return (cross_compiler, "aarch64") if cross_compiler else ("g++", "x86_64")


def glue_object(compiler: str = "g++", arch: str = "x86_64") -> Path:
    """The glue compiled for ``arch`` by ``compiler``, built on first use and cached."""
    if shutil.which(compiler) is None:
        raise TargetError(f"optc's Winograd kernels need the C++ compiler '{compiler}'"
                          + (" (Debian: apt-get install g++-aarch64-linux-gnu)" if arch == "aarch64" else ""))
    return compiled(GLUE, glue_digest(), compiler, [*FLAGS, *ARCH_FLAGS[arch]], "Winograd kernels' glue")


def takes(chain: Chain) -> bool:
    """Whether the glue computes ``chain``: an fp32 NHWC 3x3 stride-1 convolution with an epilogue it applies."""
    return chain.kind == "conv2d" and chain.optc_winograd_candidate() and chain.given_out_shape is None


def transformed_bytes(chain: Chain, algo: int, nr: int = NR) -> int:
    """The transformed weights the glue holds for ``chain`` at ``algo``: positions x output channels (padded to a
    register tile's ``nr``) x input channels, float32."""
    assert chain.weight is not None
    k, c = chain.weight.shape[:2]
    return TILES[algo][1] * -(-k // nr) * nr * c * 4


def over_cap(chain: Chain, algo: int, nr: int = NR) -> str:
    """Why ``chain`` may not take ``algo``'s kernel for its memory, or "": its transformed weights over
    ``MAX_TRANSFORMED_BYTES`` (the race's figure may favour such a kernel, but the artifact holds them for as long as
    it is loaded: F(4x4, 3x3) on ResNet-50's 512-channel layers, 36 MiB each, was 100 MiB beside its 98 MiB of weights)."""
    held = transformed_bytes(chain, algo, nr)
    return f"{held / (1 << 20):.1f} MiB of transformed weights, over {MAX_TRANSFORMED_BYTES >> 20} MiB a layer" if held > MAX_TRANSFORMED_BYTES else ""


def cost(chain: Chain, algo: int | None) -> float:
    """The board model's time for ``chain`` (direct when ``algo`` is None), in multiply-adds."""
    assert chain.weight is not None
    if algo is None:
        return max(float(chain.macs()), MACS_PER_BYTE * chain.weight.size * 4)
    k, c = chain.weight.shape[:2]
    kp, cp = -(-k // NR) * NR, -(-c // LANES) * LANES
    n, oh, ow = chain.out_shape[0], chain.out_shape[1], chain.out_shape[2]  # NHWC
    _label, positions, m, t_in, t_out = TILES[algo]
    tiles = n * -(-oh // m) * -(-ow // m)
    macs = tiles * (positions * cp * kp + TRANSFORM_FACTOR * (t_in * cp + t_out * kp)) + CALL_MACS
    return max(float(macs), MACS_PER_BYTE * transformed_bytes(chain, algo))


def choose(chain: Chain) -> int | None:
    """The Winograd algorithm the board's cost model picks for ``chain``, or None (TVM's direct kernel)."""
    if not takes(chain):
        return None
    direct = cost(chain, None)
    fits = [a for a in TILES if not over_cap(chain, a)]
    best = min(fits, key=lambda a: cost(chain, a), default=None)
    return best if best is not None and cost(chain, best) * MARGIN <= direct else None


def send(mod: Any, chains: list[Chain], picks: dict[int, int | None], report: Any, figures: dict[str, dict[str, Any]],
         nr: int = NR) -> Any:
    """``mod`` with each chain whose pick (by ``id``) is an algorithm sent to the glue; ``report`` (a
    :class:`~optc.targets.providers.select.ProviderReport`) lists every chain, offloaded or kept, with its ``figures``
    (by workload: the race's timings, or the cost model's)."""
    from optc.targets.providers.offload import offload

    for chain in chains:
        if picks[id(chain)] is not None:
            chain.algo, chain.glue = picks[id(chain)], PREFIX
    mod, taken = offload(mod, chains, lambda c: picks[id(c)] is not None)
    report.chains = len(chains)
    report.glue = "winograd" if taken else ""
    for chain in chains:
        algo = picks[id(chain)]
        entry = {"workload": chain.workload(), "macs": chain.macs(), **figures.get(chain.workload(), {})}
        if algo is not None:
            entry["algorithm"] = TILES[algo][0]
            report.winograd_optc_bytes += transformed_bytes(chain, algo, nr)
        (report.offloaded if algo is not None else report.kept).append(entry)
    return mod


def place_for_board(mod: Any, report: Any) -> Any:
    """``mod`` (NHWC) with the 3x3 convolutions :func:`choose` picks sent to the glue (an ARM target)."""
    from optc.targets.providers.offload import find_chains

    chains = [c for c in find_chains(mod) if c.kind == "conv2d" and c.src_dtype == "float32"]
    picks = {id(c): choose(c) for c in chains}
    figures = {c.workload(): {"model_direct": cost(c, None), **({"model_winograd": cost(c, a)} if a else {})}
               for c in chains for a in [picks[id(c)]]}
    report.unmeasured = "chosen by a cost model of the board: no board timed them; --rpc-tracker races them on one"
    report.cost_model = True
    return send(mod, chains, picks, report, figures)
