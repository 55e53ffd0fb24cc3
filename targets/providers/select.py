"""Choose, by measurement, which provider computes each heavy op chain.

For every distinct workload (op, shapes, attributes, post-ops: never weight
values) the candidates are built side by side in one small module, TVM's
kernel compiled exactly as the model's will be (tuning records applied when
the database has them, default schedules otherwise) and the provider's call,
and timed in alternating blocks on random inputs, on all threads and then on
one (the artifact may run on either); the candidate that loses least to the
fastest at either count wins (:func:`winner`). A 3x3
stride-1 fp32 convolution has a third candidate, oneDNN's Winograd kernel
(fewer multiplies, a blocked layout and reorders around it), kept only when
oneDNN has one for this CPU and its outputs agree with the direct
convolution's to ``WINOGRAD_RTOL`` of their range. Close races get more
blocks before they are decided. Choices
are kept in ``providers.json`` in the tuning database folder, keyed by the
workload, the target, the CPU and the library version, so a second compile
measures nothing.

Modes: ``auto`` (measure), ``tvm`` (never offload), ``onednn`` (offload every
chain oneDNN can take, unmeasured).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from optc.targets.artifact import apply_runtime_env
from optc.targets.compare import in_turns
from optc.targets.deploy.run_artifact import share_thread_pool
from optc.errors import TargetError
from optc.targets.presets import cpuinfo_field
from optc.targets.providers import onednn
from optc.targets.providers.chains import (
    ACT_CLIP,
    ACT_GELU_ERF,
    ACT_RELU,
    ACT_SIGMOID,
    ACT_SWISH,
    ALGO_WINOGRAD,
    ALGO_WINOGRAD_F23,
    ALGO_WINOGRAD_F43,
    Chain,
)
from optc.targets.providers.layout_fallback import convert_layout, last_line
from optc.targets.providers.layout_ops import deconvs_as_matmuls, layout_friendly, quantize_ops
from optc.targets.providers.winograd_glue import over_cap, transformed_bytes
from optc.targets.providers.offload import (
    act_attrs,
    conv_attrs,
    find_chains,
    offload,
    provider_call,
)

logger = logging.getLogger(__name__)

MODES = ("auto", "tvm", "onednn")
CHOICES = "providers.json"
BLOCKS, RUNS = 3, 3
CLEAR_WIN = 3.0  # after the first block, a candidate this many times slower is not timed further
CLOSE_RACE, CLOSE_BLOCKS = 1.3, 6  # winners within 1.3x of the runner-up are timed again over 6 more blocks
# Winograd transforms change the rounding: measured at 1e-6 to 2e-6 of the output range on ResNet-shaped
# convolutions (oneDNN 2.6, AVX-512), against 1e-7 for the direct kernel. 1e-4 leaves room, not error.
WINOGRAD_RTOL = 1e-4
# The version of optc's own TVM kernels: a race against an older one is run again (2: the register-tiled conv template;
# 3: int8 on x86's VNNI dot products; 4: output channels padded to whole vectors, tile_padding.padded_channels;
# 5: a padded kernel's epilogue on the tile, tiled_kernels._epilogue_on_tile; 6: accumulators on the stack and short
# reductions' tiles cut to fit, a residual's add on the tile, providers/requant_round_trip.py).
TVM_KERNELS = 6
# A chain whose winner leads the other provider's best by less than this goes with the provider that computes most of
# the model's other chains (:func:`settle_ties`): a hand-over between them cost up to a third of such a kernel's time.
SWITCH_MARGIN = 1.25
# How far apart two providers' summed race figures for the same chains may be and still tell nothing: the race's figures
# move by 10-20 % between compiles here. BERT's projections with TVM's kernels 3 % behind oneDNN's in sum went to TVM
# in 2 of 5 compiles once TVM's kernels got faster, among oneDNN's layer norms (decided, 2x): 11.3 ms against 8.7.
RACE_NOISE = 0.10
SWEEP_CAP = 64 << 20  # more than a process's share of a server's last-level cache: the model's weights come from memory
CANDIDATES = {"tvm": "tvm_ms", "onednn": "onednn_ms", "winograd": "winograd_ms", "winograd_f43": "winograd_f43_ms",
              "winograd_f23": "winograd_f23_ms"}
# Which kernels' call each candidate is: oneDNN's glue computes its own Winograd kernel and optc's F(4x4, 3x3) and
# F(2x2, 3x3), in the same NHWC layout as its direct one (hand-overs between them cost nothing).
FAMILIES = {"tvm": "tvm", "onednn": "onednn", "winograd": "onednn", "winograd_f43": "onednn", "winograd_f23": "onednn"}


class Winograd(NamedTuple):
    """A Winograd candidate of a 3x3 stride-1 convolution: the race's function prefix, the glue's algorithm, the name
    the report gives it, and for optc's own kernels the positions of a tile (their transformed weights are that many
    times the filters' 9 taps, output channels padded to 32; 0 for oneDNN's, which keeps its own)."""

    kind: str
    algo: int
    label: str
    positions: int

    def offered(self, chain: Chain) -> bool:
        """Whether the race tries it on ``chain``: optc's kernels only where their transformed weights fit the cap."""
        if not self.positions:
            return chain.winograd_candidate()
        return chain.optc_winograd_candidate() and not over_cap(chain, self.algo, OPTC_WINOGRAD_NR)


OPTC_WINOGRAD_NR = 32  # output channels an AVX-512 register tile of optc's kernels covers: their weights are padded to it
WINOGRAD = {"winograd": Winograd("wino", ALGO_WINOGRAD, "winograd", 0),
            "winograd_f43": Winograd("wf43", ALGO_WINOGRAD_F43, "winograd F(4x4,3x3)", 36),
            "winograd_f23": Winograd("wf23", ALGO_WINOGRAD_F23, "winograd F(2x2,3x3)", 16)}
ONE_THREAD = "_1t_ms"  # the same candidates timed on one thread: "tvm_1t_ms", ...


@dataclass
class ProviderReport:
    """What went where, and why; the report's ``target.providers`` section."""

    mode: str
    onednn: dict[str, Any] = field(default_factory=dict)  # available, version, reason
    layout: str = "NCHW"
    chains: int = 0
    offloaded: list[dict[str, Any]] = field(default_factory=list)  # workload, ops, MACs, measured ms
    kept: list[dict[str, Any]] = field(default_factory=list)  # chains TVM computes, with why
    measured: int = 0  # workloads timed in this compile
    reused: int = 0  # workloads whose choice came from providers.json
    measure_seconds: float = 0.0
    sweep_mib: int = 0  # memory read between two timed calls in the race, as the rest of the model would
    libraries: list[dict[str, str]] = field(default_factory=list)  # linked into model.so: name, soname, version
    unmeasured: str = ""  # why an automatic choice was made without timing the candidates here
    # memory optc's Winograd kernels hold at run time for their transformed weights (4x the weights' own 3x3 taps for
    # F(4x4, 3x3), 1.8x for F(2x2, 3x3), output channels padded to 32): the artifact's resident size grows by it
    winograd_optc_bytes: int = 0
    glue: str = ""  # "winograd": optc's own Winograd kernels (winograd_glue.py; no oneDNN) are linked into model.so
    board: str = ""  # where the race ran when not here: a board behind --rpc-tracker (winograd_race.py)
    cost_model: bool = False  # optc's Winograd kernels placed by the board's cost model (winograd_glue.py), not timed

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# Convolutions in NHWC for oneDNN; a transposed convolution stays NCHW, the only layout TVM can lower it in
# (RapidOCR's detector: "CodeGenVM cannot emit this Relax operator" after 77 s of compiling).
NHWC_LAYOUTS = {"relax.nn.conv2d": ["NHWC", "OHWI"], "relax.nn.conv1d": ["NWC", "OWI"], "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


# Ops the VM runs itself, never as TIR: left by LegalizeOps in any layout (a CNN + LSTM reading its feature map's shape).
VM_OPS = frozenset({"relax.shape_of", "relax.tensor_to_shape", "relax.shape_to_tensor"})


def unlegalizable(mod: Any, target: Any) -> list[str]:
    """Relax ops that LegalizeOps leaves in ``mod`` (no TIR for them in the layout they now have)."""
    import tvm
    from tvm import relax

    with target:
        lowered = relax.transform.LegalizeOps()(mod)
    left: set[str] = set()
    for _, func in lowered.functions_items():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for binding in block.bindings:
                    value = binding.value
                    if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name.startswith("relax.") \
                            and not value.op.name.startswith(("relax.call_", "relax.builtin", "relax.vm", "relax.memory")) \
                            and value.op.name not in VM_OPS:
                        left.add(value.op.name)
    return sorted(left)


def tvm_layout(mod: Any, target: Any, report: ProviderReport) -> Any:
    """``mod`` as both providers' kernels read it: convolutions in NHWC (:func:`to_nhwc`), then each upsampling
    ConvTranspose (kernel = stride) a matmul and a pixel shuffle (after the conversion: its 6-D shuffle is no layout
    ConvertLayout should see). TVM's conv2d_transpose has no tiled kernel: RapidOCR's detector with TVM's kernels
    spent 54 of its 73 ms in two of them."""
    return deconvs_as_matmuls(to_nhwc(mod, target, report))


def to_nhwc(mod: Any, target: Any, report: ProviderReport) -> Any:
    """``mod`` with its convolutions in NHWC, which both oneDNN (in place, no reorders) and optc's own
    register-tiled kernel (targets.tiled_kernels, vectorised over the channels) read; NCHW where TVM cannot."""
    if not any(c.kind == "conv2d" for c in find_chains(mod)):
        return mod
    # Clips and variadic sums first become binary ops, which ConvertLayout keeps in NHWC (layout_ops); a call its
    # rules throw on keeps its layout alone (layout_fallback).
    try:
        converted, kept, why = convert_layout(layout_friendly(mod), NHWC_LAYOUTS)
        stuck = unlegalizable(converted, target)
        if stuck:
            raise ValueError(f"no NHWC kernel for {', '.join(stuck)}")
        report.layout = "NHWC" + (f" ({', '.join(kept)} kept in NCHW: {why[:80]})" if kept else "")
        if kept:
            logger.warning("TVM's layout conversion throws on %s (%s): kept in NCHW, the rest in NHWC", ", ".join(kept), why[:160])
        return converted
    except Exception as exc:  # noqa: BLE001 - TVM's layout rules fail on some ops (Magika's 3-D reductions): NCHW is correct
        first = last_line(exc)
        logger.warning("TVM cannot convert this model's layout to NHWC (%s): its convolutions run in NCHW", first[:160])
        report.layout = f"NCHW (NHWC conversion failed: {first[:100]})"  # the why, in the report and the CLI's line
        return mod


def place(mod: Any, target: Any, mode: str, db_dir: Path, compile_fn: Callable[[Any], Any]) -> tuple[Any, ProviderReport]:
    """``mod`` with the chains the chosen providers compute rewritten into their calls."""
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}")
    report = ProviderReport(mode)
    avail = onednn.availability()
    report.onednn = {"available": avail.ok, "version": avail.version, "reason": avail.reason}
    mod = tvm_layout(mod, target, report)
    if mode == "tvm":
        return mod, report
    if not avail.ok:
        if mode == "auto":  # optc's own Winograd kernels raced against TVM's for the 3x3 convolutions
            from optc.targets.providers.winograd_race import place_measured

            logger.warning("oneDNN kernels unavailable (%s): TVM's own kernels, and optc's Winograd where it wins", avail.reason)
            try:
                return place_measured(mod, target, db_dir, compile_fn, report), report
            except TargetError as exc:  # its glue did not build here (no g++): TVM's kernels, as before there was one
                logger.warning("optc's Winograd kernels not raced: %s", exc)
                return mod, report
        logger.warning("oneDNN kernels unavailable (%s): every op compiles with TVM's own kernels", avail.reason)
        return mod, report
    chains = find_chains(mod)
    report.chains = len(chains)
    if not chains:
        return mod, report
    timings: dict[str, dict[str, Any]] = {}
    if mode == "auto":
        timings = _measured_choices(chains, target, db_dir, compile_fn, report)
    by_workload = {c.workload(): c for c in chains}
    timings = {w: _offered_only(t, by_workload[w]) for w, t in timings.items()}
    raced = {c.workload(): winner(timings.get(c.workload())) for c in chains}
    choice = settle_ties([(c.workload(), c.macs()) for c in chains], timings, raced)
    for chain in chains:
        if choice[chain.workload()] in WINOGRAD:
            chain.algo = WINOGRAD[choice[chain.workload()]].algo
    mod, taken = offload(mod, chains, lambda c: choice[c.workload()] != "tvm")
    for chain in chains:
        entry = {"workload": chain.workload(), "macs": chain.macs(), **timings.get(chain.workload(), {})}
        wino = WINOGRAD.get(choice[chain.workload()])
        if wino is not None:
            entry["algorithm"] = wino.label
            if wino.positions and chain.weight is not None:
                report.winograd_optc_bytes += transformed_bytes(chain, wino.algo, OPTC_WINOGRAD_NR)
        if choice[chain.workload()] != raced[chain.workload()]:  # the report's timings alone would contradict the choice
            entry["near_tie"] = (f"{raced[chain.workload()]} led by less than {SWITCH_MARGIN}x; "
                                 f"{choice[chain.workload()]}, which computes most of the model, kept")
        (report.offloaded if any(c is chain for c in taken) else report.kept).append(entry)
    if taken:
        report.libraries = [{"name": "oneDNN", "soname": onednn.SONAME, "version": avail.version}]
    return mod, report


def _offered_only(timing: dict[str, Any], chain: Chain) -> dict[str, Any]:
    """``timing`` less the figures of optc's kernels no longer offered for ``chain`` (stored before a tighter memory
    cap): a stored figure never chooses a kernel the race would not try now."""
    gone = [name for name, w in WINOGRAD.items() if w.positions and not w.offered(chain)]
    return {k: v for k, v in timing.items() if not any(k.startswith(name) for name in gone)}


def winner(timing: dict[str, Any] | None) -> str:
    """The measured candidate (``tvm``, ``onednn``, ``winograd``, ``winograd_f43``, ``winograd_f23``) that loses least to the fastest at either thread count,
    all threads or one; oneDNN's direct kernel when unmeasured.

    The artifact may run on either: a deployer sets OMP_NUM_THREADS, and the pacer runs a loaded machine's calls on one
    thread. They disagree on small convolutions: the MNIST sample's 3x3 32->32 at 14x14 took 25.6 us direct and 29.9
    Winograd on 2 threads, 35 and 24 on one. Each candidate's worse ratio to the fastest decides (Winograd's 1.17 against
    direct's 1.46); ties go to the faster on all threads. Choices measured before optc timed one thread have
    all-thread figures only."""
    if not timing:
        return "onednn"
    regret = _regrets(timing)
    return min(regret, key=regret.__getitem__)


def _regrets(timing: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """Each measured candidate's (regret, all-thread ms): its worse ratio to the fastest over the two thread counts;
    with all-thread figures only, the all-thread time for both.

    An all-thread figure above the same kernel's one-thread figure counts as the one-thread figure (:func:`_all_threads`).
    On cores another process kept busy, optc's Winograd kernels timed 5.5-12.9 ms on two threads
    against 0.54-0.84 on one, and five chains they won went to oneDNN's direct kernel (0.65-0.96 ms)."""
    present = {name: timing[key] for name, key in CANDIDATES.items() if isinstance(timing.get(key), (int, float))}
    single = {name: timing[key.replace("_ms", ONE_THREAD)] for name, key in CANDIDATES.items()
              if isinstance(timing.get(key.replace("_ms", ONE_THREAD)), (int, float))}
    if single.keys() != present.keys():
        return {name: (ms, ms) for name, ms in present.items()}
    present = {name: _all_threads(timing, key) for name, key in CANDIDATES.items() if name in present}
    return {name: (max(present[name] / min(present.values()), single[name] / min(single.values())), present[name])
            for name in present}


def settle_ties(work: list[tuple[str, int]], timings: dict[str, dict[str, Any]], choice: dict[str, str]) -> dict[str, str]:
    """``choice`` (by workload) with the near-ties (a winner ahead of the other provider's best by less than ``SWITCH_MARGIN``) given
    to the provider that computes most of the clearly decided chains' multiply-adds.

    Each chain is raced alone, but a tensor handed between oneDNN's kernels and TVM's costs what the race does not
    see. The sample CNN's int8 artifact at batch 64, 1 thread, in turns: 3.62 ms all on oneDNN, 3.78 all on TVM, 4.29
    as the race mixed them on near-ties (3 % and 4 % leads). Per call, in turns: TVM's residual convolution took 0.90 ms
    reading oneDNN's output against 0.68 in the all-TVM artifact, and oneDNN's 1x1 convolution 0.12 ms after TVM's
    depthwise one against 0.05 after its own (oneDNN's 512-bit kernels and TVM's 256-bit ones at 24 channels, before
    tile_padding widened those to 512: likely the core's frequency changes). The race's own figures move by 10-20 %
    between compiles on a shared machine. Where the ties hold more multiply-adds than the clearly decided chains, those
    cannot speak for the model: the ties go together to the provider whose kernels for them sum to less time."""
    families = FAMILIES
    decided: dict[str, int] = {"tvm": 0, "onednn": 0}
    ties = {}
    for workload, macs in work:
        timing = timings.get(workload)
        regret = _regrets(timing) if timing else {}
        mine = families[choice[workload]]
        others = [r for name, r in regret.items() if families[name] != mine]
        if others and min(others)[0] < SWITCH_MARGIN * regret[choice[workload]][0]:
            ties[workload] = regret
        elif others:
            decided[mine] += macs
    if not ties:
        return choice
    tied = [(workload, macs) for workload, macs in work if workload in ties]
    if sum(decided.values()) >= sum(macs for _, macs in tied) and decided["tvm"] != decided["onednn"]:
        major = max(decided, key=decided.__getitem__)
    else:
        # The ties are most of the model (a BERT encoder's projections: oneDNN ahead by 9-12 %, while a 65 K
        # multiply-add pooler was the only clear decision and gave all of them to TVM, 12.6 ms against 10.8 with
        # oneDNN's, in turns): one provider for all of them, the one whose kernels take less time in sum; where the
        # sums are within the race's own noise, the one that leaves fewer hand-overs between the decided chains.
        sums = {family: sum(_family_ms(timings[w], family, families) for w, _ in tied) for family in ("tvm", "onednn")}
        major = min(sums, key=sums.__getitem__)
        if max(sums.values()) <= (1 + RACE_NOISE) * sums[major]:
            major = min(sums, key=lambda family: (_handovers(work, choice, ties, family, families), sums[family]))
    return {**choice, **{w: min((r, name) for name, r in regret.items() if families[name] == major)[1] for w, regret in ties.items()}}


def _handovers(work: list[tuple[str, int]], choice: dict[str, str], ties: dict[str, Any], family: str,
               families: dict[str, str]) -> int:
    """How many times, along the model's chains in order, the provider changes if the ties go to ``family``."""
    order = [family if w in ties else families.get(choice[w], choice[w]) for w, _ in work]
    return sum(a != b for a, b in zip(order, order[1:]))


def _family_ms(timing: dict[str, Any], family: str, families: dict[str, str]) -> float:
    """A chain's time with the provider ``family``'s fastest candidate: all threads (:func:`_all_threads`) plus one
    thread where measured."""
    return min(_all_threads(timing, key) + timing.get(key.replace("_ms", ONE_THREAD), timing[key])
               for name, key in CANDIDATES.items() if families[name] == family and isinstance(timing.get(key), (int, float)))


def _all_threads(timing: dict[str, Any], key: str) -> float:
    """A candidate's all-thread figure as the artifact meets it: at most its one-thread figure, where measured (a call
    site that loses on all threads runs on the calling thread alone: pacer.h, for the glue's calls and TVM's loops)."""
    return min(timing[key], timing.get(key.replace("_ms", ONE_THREAD), timing[key]))


def held_isa(target: Any) -> list[str | None]:
    """The ISA oneDNN is timed with for ``target``, where held: the target's (:func:`isa_cap`), or one the user set."""
    return [isa_cap(target), *(os.environ.get(v) for v in ISA_VARIABLES)]


def _key(chain: Chain, target: Any, version: str, sweep: int, held: Sequence[str | None] = ()) -> str:
    """The providers.json key of a race; ``held``: :func:`held_isa`, computed once per compile."""
    text = json.dumps([chain.workload(), str(target), cpuinfo_field("model name") or platform.processor() or platform.machine(), version,
                       onednn.glue_digest(), TVM_KERNELS] + ([sweep] if sweep else []) + ([list(held)] if any(held) else []), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _measured_choices(chains: list[Chain], target: Any, db_dir: Path, compile_fn: Callable[[Any], Any],
                      report: ProviderReport, version: str | None = None, timer: Callable[..., dict[str, dict[str, Any]]] | None = None
                      ) -> dict[str, dict[str, Any]]:
    """Each workload's race figures: from ``providers.json`` where fresh, else timed by ``timer`` (:func:`measure`,
    oneDNN's against TVM's; ``version`` names the other provider, oneDNN's by default) and stored."""
    version = version or report.onednn["version"]
    timer = timer or measure
    unique = {c.workload(): c for c in chains}
    sweep = sweep_bytes(chains)
    report.sweep_mib = sweep >> 20
    store = _Store(db_dir)
    known = store.read()
    load = _load()
    held = held_isa(target)
    keys = {w: _key(c, target, version, sweep, held) for w, c in unique.items()}
    todo = [c for w, c in unique.items() if _stale(known.get(keys[w]), load)]
    report.reused = len(unique) - len(todo)
    if todo:
        start = time.perf_counter()
        measured = timer(todo, target, compile_fn, sweep)
        report.measure_seconds = time.perf_counter() - start
        report.measured = len(todo)
        known = store.update({keys[c.workload()]: {**measured[c.workload()], "load": round(load, 2)} for c in todo})
    return {w: known[keys[w]] for w in unique}


def sweep_bytes(chains: list[Chain]) -> int:
    """How much memory the race reads between two timed calls of a kernel: what the rest of the model reads and
    writes between two runs of its chain (every chain's weights and output), as a power of two of MiB, at most
    ``SWEEP_CAP``; 0 below 1 MiB, where a model stays in a core's cache.

    Timed alone, a kernel finds its weights where its last call left them. In ResNet-18 the 512-channel 3x3
    convolutions ran at 2.3 ms a call in the model against 1.15 in the race (1 thread), the Winograd form the race
    chose reading 17 MB of transformed weights a call; the first convolution 1.56 against 1.16 ms."""
    total = 0
    for c in chains:
        total += c.weight.nbytes if c.weight is not None else 0
        total += int(np.prod(c.out_shape)) * (1 if c.out_dtype in ("uint8", "int8") else 4)
    mib = min(total, SWEEP_CAP) / (1 << 20)
    return 0 if mib < 1 else (1 << round(np.log2(mib))) << 20


def _load() -> float:
    """Runnable threads per core over the last minute (the load average over the core count)."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:
        return 0.0


def _stale(entry: dict[str, Any] | None, load: float) -> bool:
    """Whether a workload must be timed (again): never timed, or timed while the cores were oversubscribed
    (load above one per core) and they are less busy now. On a shared machine a burst of load once made
    oneDNN's 0.1 ms convolution time at 15 ms and TVM's 4 ms kernel win, and the choice was kept for good."""
    if entry is None:
        return True
    then = entry.get("load")
    return isinstance(then, (int, float)) and then > 1.0 and load < then


class _Store:
    """``providers.json``: choices shared by concurrent compiles (read-merge-replace under a lock)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / CHOICES

    def read(self) -> dict[str, dict[str, float]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # absent or damaged: measured again, rewritten whole
        return {k: v for k, v in data.items() if isinstance(v, dict) and {"onednn_ms", "tvm_ms"} <= v.keys()} if isinstance(data, dict) else {}

    def update(self, new: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / (CHOICES + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            logger.warning("kernel choices not saved in %s: %s", self.folder, exc)
            return new
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            merged = {**self.read(), **new}
            with tempfile.NamedTemporaryFile("w", dir=self.folder, prefix=".providers-", suffix=".json", delete=False) as tmp:
                json.dump(merged, tmp, indent=1, sort_keys=True)
            os.replace(tmp.name, self.path)
            return merged
        finally:
            os.close(fd)


def reference(bb: Any, chain: Chain, x: Any, other: Any, residual: Any) -> Any:
    """The chain as the Relax ops TVM compiles (what the provider's call replaces)."""
    from tvm import relax

    R = relax.op
    if chain.kind == "softmax":
        return bb.emit(R.nn.softmax(x, axis=chain.axis))
    if chain.kind == "layer_norm":
        assert chain.weight is not None and chain.bias is not None
        return bb.emit(R.nn.layer_norm(x, relax.const(chain.weight), relax.const(chain.bias), axes=[-1], epsilon=chain.eps))
    int8 = chain.scale is not None
    out_dtype = "int32" if int8 else None
    if chain.kind == "conv2d":
        c = chain.conv
        assert chain.weight is not None
        w = chain.weight.transpose(0, 2, 3, 1) if c["nhwc"] else chain.weight
        layouts = ("NHWC", "OHWI") if c["nhwc"] else ("NCHW", "OIHW")
        shape = (1, 1, 1, -1) if c["nhwc"] else (1, -1, 1, 1)
        t, l, b, r = c["padding"]  # type: ignore[misc]
        y = bb.emit(R.nn.conv2d(x, relax.const(np.ascontiguousarray(w)), strides=c["strides"], padding=[t, l, b, r],
                                dilation=c["dilation"], groups=c["groups"], data_layout=layouts[0], kernel_layout=layouts[1],
                                out_dtype=out_dtype))
        y = _requantise(bb, chain, y, shape)
        if chain.bias is not None:
            y = bb.emit(R.add(y, relax.const(chain.bias.reshape(shape))))
    elif chain.kind == "conv2d_transpose":
        assert chain.weight is not None
        c = chain.conv
        t, l, b, r = c["padding"]  # type: ignore[misc]
        y = bb.emit(R.nn.conv2d_transpose(x, relax.const(chain.weight), strides=c["strides"], padding=[t, l, b, r],
                                          output_padding=_output_padding(chain), dilation=c["dilation"]))
        if chain.bias is not None:
            y = bb.emit(R.add(y, relax.const(chain.bias.reshape(1, -1, 1, 1))))
    elif chain.kind == "matmul":
        assert chain.weight is not None
        y = _requantise(bb, chain, bb.emit(R.matmul(x, relax.const(chain.weight), out_dtype=out_dtype)), (-1,))
        if chain.bias is not None:
            y = bb.emit(R.add(y, relax.const(chain.bias)))
    else:
        y = bb.emit(R.matmul(x, other))
    if residual is not None:
        y = bb.emit(R.add(y, residual))
    if chain.act == ACT_RELU:
        y = bb.emit(R.nn.relu(y))
    elif chain.act == ACT_SIGMOID:
        y = bb.emit(R.sigmoid(y))
    elif chain.act == ACT_CLIP:
        y = bb.emit(R.clip(y, relax.prim_value(chain.clip[0]), relax.prim_value(chain.clip[1])))
    elif chain.act == ACT_SWISH:
        y = bb.emit(R.multiply(y, bb.emit(R.sigmoid(y))))
    elif chain.act == ACT_GELU_ERF:
        erf = bb.emit(R.erf(bb.emit(R.divide(y, relax.const(np.float32(np.sqrt(2.0)))))))
        y = bb.emit(R.multiply(bb.emit(R.multiply(y, bb.emit(R.add(erf, relax.const(np.float32(1.0)))))), relax.const(np.float32(0.5))))
    if chain.out_dtype != "float32":  # the per-tensor quantize the chain absorbed, as layout_ops writes it
        y = bb.emit(quantize_ops(bb.emit, y, chain.out_scale, chain.out_zero, chain.out_dtype))
    return y


def _output_padding(chain: Chain) -> list[int]:
    """What ONNX's output_padding added to a transposed convolution's output, recovered from its shape."""
    c, (_, _, h, w), (_, _, kh, kw) = chain.conv, chain.in_shapes[0], chain.weight.shape  # type: ignore[union-attr]
    t, l, b, r = c["padding"]  # type: ignore[misc]
    full = [(h - 1) * c["strides"][0] + (kh - 1) * c["dilation"][0] + 1 - t - b,  # type: ignore[index]
            (w - 1) * c["strides"][1] + (kw - 1) * c["dilation"][1] + 1 - l - r]  # type: ignore[index]
    return [chain.out_shape[2] - full[0], chain.out_shape[3] - full[1]]


def _requantise(bb: Any, chain: Chain, acc: Any, shape: tuple[int, ...]) -> Any:
    """``astype(acc - comp, float32) · scale`` after an int8 chain's accumulator (as targets/int8_relax.py writes it)."""
    from tvm import relax

    if chain.scale is None:
        return acc
    if chain.comp is not None:
        acc = bb.emit(relax.op.subtract(acc, relax.const(chain.comp.reshape(shape).astype(np.int32))))
    acc = bb.emit(relax.op.astype(acc, "float32"))
    return bb.emit(relax.op.multiply(acc, relax.const(chain.scale.reshape(shape))))


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, shape).astype(np.uint8)
    if dtype == "int8":
        return rng.integers(-128, 128, shape).astype(np.int8)
    return rng.standard_normal(shape).astype(np.float32)


def measure(chains: list[Chain], target: Any, compile_fn: Callable[[Any], Any], sweep: int = 0) -> dict[str, dict[str, Any]]:
    """Time TVM's kernel and oneDNN's (direct, and Winograd where it applies) for each chain, in one module, in alternating
    blocks, reading ``sweep`` bytes of other memory before every timed call (:func:`sweep_bytes`)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    inputs: list[list[np.ndarray]] = []
    rng = np.random.default_rng(0)
    for i, chain in enumerate(chains):
        shapes = [chain.in_shapes[0]] + ([chain.in_shapes[1]] if chain.other is not None else []) + ([chain.out_shape] if chain.residual is not None else [])
        dtypes = [chain.src_dtype] + ["float32"] * (len(shapes) - 1)
        arrays = [_random(rng, s, d) for s, d in zip(shapes, dtypes)]
        inputs.append(arrays)
        algos = {w.kind: w.algo for w in WINOGRAD.values() if w.offered(chain)}
        for kind in ("tvm", "dnn", *algos):
            params = [relax.Var(f"a{j}", relax.TensorType(list(s), d)) for j, (s, d) in enumerate(zip(shapes, dtypes))]
            x = params[0]
            other = params[1] if chain.other is not None else None
            residual = params[-1] if chain.residual is not None else None
            with bb.function(f"{kind}_{i}", params):
                with bb.dataflow():
                    if kind == "tvm":
                        y = reference(bb, chain, x, other, residual)
                    else:
                        called = replace(chain, algo=algos.get(kind, chain.algo))
                        y = bb.emit(provider_call(called, x, other, residual))
                    out = bb.emit_output(y)
                bb.emit_func_output(out)
    executable = compile_fn(bb.get())
    # The artifact's thread settings for the candidates (and the artifact timed after them): OpenMP's were applied when
    # onednn.library() first loaded libdnnl (libgomp reads them once, then); TVM's pool reads its own when it starts.
    apply_runtime_env()
    plans = [{"workload": c.workload(), **{name: _winograd_query(c, w.algo) if w.offered(c) else None for name, w in WINOGRAD.items()}}
             for c in chains]
    isa = isa_cap(target)
    with tempfile.TemporaryDirectory(prefix="optc-kernels-") as tmp:
        path = Path(tmp) / "kernels.so"
        executable.export_library(str(path), addons=[str(onednn.glue_object())], options=onednn.link_options())
        if isa is not None:
            from optc.targets.providers.timing_child import time_in_child

            try:
                return time_in_child(path, plans, inputs, sweep, isa)
            except TargetError as exc:  # our failure, not the user's: the race as before, with this CPU's oneDNN
                logger.warning("%s; oneDNN timed with this CPU's kernels instead", exc)
        return time_library(path, plans, inputs, sweep)


ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN reads either (the first wins)


def isa_cap(target: Any) -> str | None:
    """The ``ONEDNN_MAX_CPU_ISA`` under which oneDNN runs as on the target's CPU, where it would not here: ``--cpu haswell``
    on an AVX-512 machine. TVM's candidates run the target's code; oneDNN, which picks its kernels by the CPU it runs on,
    would race its AVX-512 ones against them. None for this machine's own CPU, or where the variable is set already."""
    from optc.targets.cpu_features import target_flags
    from optc.targets.deploy.run_artifact import host_cpu_features

    if any(v in os.environ for v in ISA_VARIABLES) or not target.attrs.get("mcpu"):
        return None  # the user's own cap stands; a target naming no CPU runs wherever oneDNN adapts to
    arch, flags = target_flags(target)
    if arch != "x86_64":
        return None
    wanted = onednn.isa_for(flags) or "SSE41"  # oneDNN's narrowest: below it, its reference kernels wherever it runs
    return None if wanted == onednn.isa_for(host_cpu_features(arch)) else wanted


def time_library(path: Path, plans: list[dict[str, Any]], inputs: list[list[np.ndarray]], sweep: int) -> dict[str, dict[str, Any]]:
    """Race the candidates of the kernels library at ``path`` (``tvm_i``, ``dnn_i``, ``wino_i``), one plan per chain:
    its ``workload`` and, for a Winograd candidate, the glue's query for the kernel oneDNN would run."""
    import tvm
    from tvm import relax

    onednn.library()  # in timing_child's fresh process too: the library's libdnnl.so.2 then resolves to the copy optc found
    lib = tvm.runtime.load_module(str(path))
    share_thread_pool(lib)  # TVM's candidates on OpenMP's threads, as in the artifact: one thread count steers both
    vm = relax.VirtualMachine(lib, tvm.cpu())
    other = np.ones(sweep // 8) if sweep else None
    evict = (lambda: float(other.sum())) if other is not None else None  # noqa: E731
    results = {}
    for i, plan in enumerate(plans):
        workload = plan["workload"]
        args = [tvm.runtime.tensor(a) for a in inputs[i]]
        fns = {"tvm_ms": lambda i=i, a=args: vm[f"tvm_{i}"](*a), "onednn_ms": lambda i=i, a=args: vm[f"dnn_{i}"](*a)}
        extra: dict[str, Any] = {}
        for name, wino in WINOGRAD.items():
            if plan.get(name) is not None:
                usable, more = _winograd_usable(lib, vm, plan[name], i, args, name)
                extra.update(more)
                if usable:
                    fns[f"{name}_ms"] = lambda i=i, a=args, kind=wino.kind: vm[f"{kind}_{i}"](*a)
        results[workload] = {**_race(fns, evict), **extra}
        with one_thread() as threads:
            if threads:
                single = _race(fns, evict)
                stalled = implausible_single(results[workload], single, threads)
                if stalled:  # timed again, the lower figure kept
                    again = _race({k: fns[k] for k in stalled}, evict)
                    single.update({k: min(single[k], again[k]) for k in stalled})
                results[workload].update({k.replace("_ms", ONE_THREAD): v for k, v in single.items()})
        logger.info("kernels: %s  %s", workload, "  ".join(f"{k[:-3]} {v:.3f} ms" for k, v in results[workload].items() if k.endswith("_ms")))
    return results


def implausible_single(threaded: dict[str, Any], single: dict[str, float], threads: int) -> list[str]:
    """The candidates whose one-thread time is more than 1.5x ``threads`` (the all-thread figures' count) times their
    all-thread time. N threads cannot make a kernel N times faster, so such a figure is a stall (a burst of another
    process's load), not the kernel: once on this machine, the MNIST sample's stem read 252 us on one thread against 6.3
    on two, and the race kept oneDNN's kernel, 2.2x slower than TVM's, for every later compile."""
    return [k for k, t in single.items() if isinstance(threaded.get(k), (int, float)) and t > 1.5 * threads * threaded[k]]


@contextlib.contextmanager
def one_thread() -> Iterator[int]:
    """The calling thread held to one OpenMP thread (oneDNN's calls and, on the shared pool, TVM's loops): yields the
    thread count it had, or 0 on a one-core machine or without libgomp (nothing to measure apart)."""
    if (os.cpu_count() or 1) < 2:
        yield 0
        return
    try:
        gomp = ctypes.CDLL("libgomp.so.1")
    except OSError:
        yield 0
        return
    before = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield before
    finally:
        gomp.omp_set_num_threads(before)


def _race(fns: dict[str, Callable[[], Any]], evict: Callable[[], Any] | None = None) -> dict[str, float]:
    """Lowest block medians; a race won by less than ``CLOSE_RACE`` is timed over more blocks, so one
    burst of load on a shared machine does not decide it (a 0.1 ms convolution once measured 15 ms)."""
    # a candidate far behind after one block ends its race
    best, _ = in_turns(fns, budget_s=0, max_runs=RUNS, min_blocks=BLOCKS, clear_win=CLEAR_WIN, before=evict)
    ordered = sorted(best.values())
    # TVM's untuned kernel winning is the rare outcome and the costly one when wrong (10-50x on a matmul):
    # it is timed again too, since one burst of load in the first block can drop the provider's candidate
    # (a BERT-shaped encoder kept 4 of its 46 chains in TVM at load 3 and ran at x1.6 of onnxruntime).
    tvm_won = "tvm_ms" in best and best["tvm_ms"] == ordered[0]
    if len(ordered) > 1 and (ordered[1] < CLOSE_RACE * ordered[0] or tvm_won):
        again, _ = in_turns(fns, budget_s=0, max_runs=RUNS, min_blocks=CLOSE_BLOCKS, before=evict)
        best = {k: min(best[k], again[k]) for k in best}
    return best


def _winograd_query(chain: Chain, algo: int) -> list[Any]:
    """The glue's arguments for the kernel it would run ``chain`` with by Winograd ``algo`` (JSON: a child process asks too)."""
    called = replace(chain, algo=algo)
    assert chain.weight is not None
    return [list(chain.in_shapes[0]), list(chain.weight.shape), list(chain.out_shape), conv_attrs(called, act_attrs(called))]


def _winograd_usable(lib: Any, vm: Any, query: list[Any], i: int, args: list[Any], name: str) -> tuple[bool, dict[str, Any]]:
    """Whether the glue runs the Winograd candidate ``name`` (:data:`WINOGRAD`: oneDNN's, or optc's F(4x4, 3x3) / F(2x2, 3x3)
    on AVX2 or AVX-512) for chain ``i`` on this CPU, and its outputs agree with oneDNN's direct kernel's. The report's
    keys: ``winograd_kernel``, ``winograd_error`` (or ``winograd``, why not), ``winograd_f43_``... for optc's."""
    kind = WINOGRAD[name].kind
    if not WINOGRAD[name].positions:
        kernel = str(lib.get_function("optc_dnnl_conv2d_impl", query_imports=True)(*query))
        if "wino" not in kernel:
            return False, {name: f"no Winograd kernel here (oneDNN runs {kernel})"}
    else:
        kernel = str(lib.get_function("optc_wino_impl", query_imports=True)(query[1], query[3]))
        if not kernel.startswith("optc_wino"):
            return False, {name: kernel}
    direct, wino = vm[f"dnn_{i}"](*args).numpy(), vm[f"{kind}_{i}"](*args).numpy()
    scale = max(float(np.abs(direct).max()), 1e-30)
    error = float(np.abs(direct.astype(np.float64) - wino).max()) / scale
    if not error <= WINOGRAD_RTOL:
        return False, {name: f"{kernel}: error {error:.1e} of the output range, above {WINOGRAD_RTOL:g}"}
    return True, {f"{name}_kernel": kernel, f"{name}_error": error}
