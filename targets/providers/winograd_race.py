"""optc's own Winograd kernels (:mod:`.winograd_glue`) raced against TVM's tiled kernel, where no vendor library is
raced: x86 without oneDNN, timed here, and any board behind ``--rpc-tracker``, timed on the board.

Where oneDNN is missing (not on x86-64 Linux, no ``onednn-cpu-gomp`` wheel, or ``OPTC_DISABLE_ONEDNN``), TVM's kernels compute every op, and a 3x3
convolution is a direct one; a board reached through an RPC tracker may have no vendor library at all. optc's
Winograd kernels need none: for each fp32 3x3 stride-1 convolution they take, F(4x4, 3x3) and F(2x2, 3x3) are timed
beside TVM's kernel in one module, in alternating blocks, as the oneDNN race does, and the figures are kept in the
same ``providers.json`` under this glue's version (and the board's key). Here the rest of the model's memory is swept
between calls; a board's timings come from TVM's ``time_evaluator`` over the RPC session (its weights stay in the
board's caches between calls, which favours the kernel reading more of them: Winograd's). A Winograd kernel whose
outputs stray from TVM's by more than ``WINOGRAD_RTOL`` of the range is not raced; one is kept only where it is
``RACE_NOISE`` faster than TVM's kernel, since it also holds its transformed weights in memory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43, Chain
from optc.targets.providers.offload import find_chains, provider_call
from optc.targets.providers.select import (BLOCKS, ISA_VARIABLES, OPTC_WINOGRAD_NR, RACE_NOISE, WINOGRAD, WINOGRAD_RTOL, ProviderReport,
                                           _measured_choices, _race, isa_cap, reference)
from optc.targets.providers.winograd_glue import NR as NEON_NR
from optc.targets.providers.winograd_glue import PREFIX, glue_digest, glue_object, over_cap, send, takes

logger = logging.getLogger(__name__)

KINDS = {"winograd_f43": ALGO_WINOGRAD_F43, "winograd_f23": ALGO_WINOGRAD_F23}  # race names, as select.WINOGRAD's
BOARD_REPEAT_MS = 20  # each timed block on a board runs the call for at least this long


@dataclass(frozen=True)
class Board:
    """A board behind an RPC tracker, and the toolchain its code is built with."""

    host: str
    port: int
    key: str
    compiler: str = "g++"  # aarch64-linux-gnu-g++ for an aarch64 target
    arch: str = "x86_64"

    def describe(self) -> str:
        return f"measured on the board '{self.key}' through the RPC tracker at {self.host}:{self.port}"


def place_measured(mod: Any, target: Any, db_dir: Path, compile_fn: Callable[[Any], Any], report: ProviderReport,
                   board: Board | None = None) -> Any:
    """``mod`` (NHWC) with the 3x3 convolutions where optc's Winograd beat TVM's kernel sent to the glue."""
    nr = padding(board)
    chains = [c for c in find_chains(mod) if c.kind == "conv2d" and c.src_dtype == "float32"]
    candidates = [c for c in chains if takes(c) and not all(over_cap(c, a, nr) for a in KINDS.values())]
    timings: dict[str, dict[str, Any]] = {}
    if candidates:
        glue_object(*((board.compiler, board.arch) if board else ()))  # a glue that does not build costs the race, now
        version = f"optc-winograd-{glue_digest()}" + (f"-board-{board.key}-{board.arch}" if board else "")
        timer = measure if board is None else lambda todo, tgt, fn, sweep: measure_on_board(todo, fn, board)
        timings = _measured_choices(candidates, target, db_dir, compile_fn, report, version=version, timer=timer)
    if board is not None:
        report.sweep_mib, report.board = 0, board.describe()
    picks = {id(c): fastest(timings.get(c.workload()), c, nr) for c in chains}
    return send(mod, chains, picks, report, timings, nr)


def padding(board: Board | None) -> int:
    """Output channels the glue's register tile covers where it runs (its transformed weights are padded to them):
    NEON's 8, else AVX-512's 32 (this machine's widest; AVX2 pads to 16)."""
    return NEON_NR if board is not None and board.arch == "aarch64" else OPTC_WINOGRAD_NR


def fastest(timing: dict[str, Any] | None, chain: Chain, nr: int) -> int | None:
    """The Winograd algorithm that beat TVM's kernel by ``RACE_NOISE``, the faster of the two, among those within the
    memory cap (figures stored before a tighter cap do not count); None for TVM's."""
    if not timing or "tvm_ms" not in timing:
        return None
    times = {name: timing[f"{name}_ms"] for name, algo in KINDS.items()
             if isinstance(timing.get(f"{name}_ms"), (int, float)) and not over_cap(chain, algo, nr)}
    best = min(times, key=times.__getitem__, default=None)
    return KINDS[best] if best is not None and times[best] * (1 + RACE_NOISE) < timing["tvm_ms"] else None


def race_module(chains: list[Chain]) -> tuple[Any, list[list[np.ndarray]]]:
    """One Relax module with ``tvm_i`` (TVM's kernel) and ``wf43_i``/``wf23_i`` (the glue's) for each chain, and
    each chain's random inputs."""
    from tvm import relax

    bb = relax.BlockBuilder()
    inputs: list[list[np.ndarray]] = []
    rng = np.random.default_rng(0)
    for i, chain in enumerate(chains):
        shapes = [chain.in_shapes[0]] + ([chain.out_shape] if chain.residual is not None else [])
        inputs.append([rng.standard_normal(s).astype(np.float32) for s in shapes])
        for kind, algo in (("tvm", None), *((WINOGRAD[n].kind, a) for n, a in KINDS.items())):
            params = [relax.Var(f"a{j}", relax.TensorType(list(s), "float32")) for j, s in enumerate(shapes)]
            residual = params[-1] if chain.residual is not None else None
            with bb.function(f"{kind}_{i}", params):
                with bb.dataflow():
                    if algo is None:
                        y = reference(bb, chain, params[0], None, residual)
                    else:
                        y = bb.emit(provider_call(replace(chain, algo=algo, glue=PREFIX), params[0], None, residual))
                    out = bb.emit_output(y)
                bb.emit_func_output(out)
    return bb.get(), inputs


def checked(vm: Any, chain: Chain, i: int, args: list[Any], build: str, nr: int) -> tuple[list[str], dict[str, Any]]:
    """The candidates of chain ``i`` to race: TVM's, and each Winograd kernel whose transformed weights fit the cap
    and whose outputs are TVM's to ``WINOGRAD_RTOL`` of the range; and the report's errors, or why a kernel is not
    raced."""
    want = vm[f"tvm_{i}"](*args).numpy().astype(np.float64)
    scale = max(float(np.abs(want).max()), 1e-30)
    names, extra = ["tvm"], {}
    for name, algo in KINDS.items():
        if why := over_cap(chain, algo, nr):
            extra[name] = why
            continue
        error = float(np.abs(vm[f"{WINOGRAD[name].kind}_{i}"](*args).numpy() - want).max()) / scale
        if error <= WINOGRAD_RTOL:
            names.append(name)
            extra.update({f"{name}_error": error, f"{name}_kernel": f"optc_winograd:{build}"})
        else:
            extra[name] = f"error {error:.1e} of the output range, above {WINOGRAD_RTOL:g}"
    return names, extra


@contextlib.contextmanager
def held_to(isa: str | None) -> Iterator[None]:
    """``ONEDNN_MAX_CPU_ISA`` set to ``isa`` while the race runs (nothing when None): the glue fixes its vector width at
    its first call by this CPU, capped by it, so a target CPU narrower than this one (``--cpu haswell`` here) is raced
    with the build it would run (AVX2), not this CPU's AVX-512 one."""
    if isa is None:
        yield
        return
    before = os.environ.get(ISA_VARIABLES[0])
    os.environ[ISA_VARIABLES[0]] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ISA_VARIABLES[0], None)
        else:
            os.environ[ISA_VARIABLES[0]] = before


def function_of(name: str, i: int) -> str:
    return f"tvm_{i}" if name == "tvm" else f"{WINOGRAD[name].kind}_{i}"


def measure(chains: list[Chain], target: Any, compile_fn: Callable[[Any], Any], sweep: int = 0) -> dict[str, dict[str, Any]]:
    """Time TVM's kernel and optc's two Winograd kernels for each chain here, in alternating blocks, reading ``sweep``
    bytes of other memory before every timed call."""
    import tvm
    from tvm import relax

    module, inputs = race_module(chains)
    executable = compile_fn(module)
    with tempfile.TemporaryDirectory(prefix="optc-winograd-") as tmp, held_to(isa_cap(target)):
        path = Path(tmp) / "kernels.so"
        executable.export_library(str(path), addons=[str(glue_object())])
        lib = tvm.runtime.load_module(str(path))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        build = str(lib.get_function("optc_winograd_impl", query_imports=True)())
        other = np.ones(sweep // 8) if sweep else None
        evict = (lambda: float(other.sum())) if other is not None else None  # noqa: E731
        results: dict[str, dict[str, Any]] = {}
        for i, chain in enumerate(chains):
            args = [tvm.runtime.tensor(a) for a in inputs[i]]
            names, extra = checked(vm, chain, i, args, build, OPTC_WINOGRAD_NR)
            fns = {f"{n}_ms": (lambda fn=function_of(n, i), a=args: vm[fn](*a)) for n in names}
            results[chain.workload()] = {**_race(fns, evict), **extra}
            _log(chain, results[chain.workload()])
        return results


def measure_on_board(chains: list[Chain], compile_fn: Callable[[Any], Any], board: Board) -> dict[str, dict[str, Any]]:
    """The same race on ``board``: the module built with its toolchain, uploaded through the tracker, each candidate
    timed by the board's ``time_evaluator`` in alternating blocks (the lowest block's mean counts)."""
    import tvm
    import tvm.support
    from tvm import relax, rpc

    module, inputs = race_module(chains)
    executable = compile_fn(module)
    with tempfile.TemporaryDirectory(prefix="optc-winograd-board-") as tmp:
        path = Path(tmp) / "kernels.so"
        kwargs: dict[str, Any] = {"addons": [str(glue_object(board.compiler, board.arch))]}
        if board.compiler != "g++":
            kwargs["fcompile"] = tvm.support.cc.cross_compiler(board.compiler)
        executable.export_library(str(path), **kwargs)
        session = rpc.connect_tracker(board.host, board.port).request(board.key, session_timeout=600)
        session.upload(str(path))
        dev = session.cpu()
        lib = session.load_module(path.name)
        vm = relax.VirtualMachine(lib, dev)
        build = str(lib.get_function("optc_winograd_impl", query_imports=True)())
    results: dict[str, dict[str, Any]] = {}
    for i, chain in enumerate(chains):
        args = [tvm.runtime.tensor(a, dev) for a in inputs[i]]
        names, extra = checked(vm, chain, i, args, build, padding(board))
        timers = {n: vm.time_evaluator(function_of(n, i), dev, number=1, repeat=1, min_repeat_ms=BOARD_REPEAT_MS) for n in names}
        best = {n: float("inf") for n in names}
        for _ in range(BLOCKS):
            for n, timer in timers.items():
                best[n] = min(best[n], timer(*args).mean * 1e3)
        results[chain.workload()] = {**{f"{n}_ms": t for n, t in best.items()}, **extra}
        _log(chain, results[chain.workload()])
    return results


def _log(chain: Chain, result: dict[str, Any]) -> None:
    logger.info("kernels: %s  %s", chain.workload(), "  ".join(f"{k[:-3]} {v:.3f} ms" for k, v in result.items() if k.endswith("_ms")))
