"""The artifact just built against onnxruntime on this machine, timed in turns (the compile report's ``target.latency``).

A user compiles to get something faster than running the ONNX file; the report
says whether they did, on the same inputs and cores. Only for targets this
machine runs (x86 here; not ARM cross-builds, not CUDA without a GPU). The
library is loaded from the folder optc has just written, before the manifest
exists, and run as ``optc run`` and ``optc bench`` run artifacts; its outputs are compared too.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.targets.artifact import LoadedArtifact, apply_runtime_env, io_specs
from optc.targets.deploy.run_artifact import share_thread_pool
from optc.targets.spec import TargetSpec

BUDGET_S = 3.0  # about this long in all; at least three blocks of each
BLOCK_RUNS = 5


def in_turns(fns: Mapping[str, Callable[[], Any]], budget_s: float = BUDGET_S, max_runs: int = BLOCK_RUNS,
             min_blocks: int = 3, clear_win: float | None = None, fixed_runs: bool = False,
             before: Callable[[], Any] | None = None) -> tuple[dict[str, float], int]:
    """Lowest block median (ms) of each function, timed in alternating blocks so that load from other
    users of the machine hits them alike; at least ``min_blocks`` blocks, more while ``budget_s`` lasts
    (at most 20). Each function is called once first (caches, lazily built kernels); a slow one gets
    fewer runs per block. With ``clear_win``, a first block in which one function is that many times
    slower than another ends the timing. Also the number of blocks. ``fixed_runs``: every block has
    ``max_runs`` runs (benchmarks that say how many they take). ``before``: called, untimed, before every
    timed call (a kernel race evicts the caches as the rest of a model would)."""
    warm = []
    for fn in fns.values():
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    runs = max_runs if fixed_runs else max(1, min(max_runs, int(0.1 / max(max(warm), 1e-6))))
    best = {k: float("inf") for k in fns}
    deadline, blocks = time.perf_counter() + budget_s, 0
    while blocks < min_blocks or (time.perf_counter() < deadline and blocks < 20):
        for key, fn in fns.items():
            times = []
            for _ in range(runs):
                if before is not None:
                    before()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            best[key] = min(best[key], float(np.median(times)))
        blocks += 1
        if blocks == 1 and clear_win is not None and max(best.values()) > clear_win * min(best.values()):
            break
    return best, blocks


def cpu_notes(spec: TargetSpec, calls_onednn: bool, timed: bool) -> list[str]:
    """Notes for an x86 artifact compiled for a CPU other than this one's: its code could not be run here (neither timed
    nor checked), or its latency line ran oneDNN's kernels for this CPU, not the ones the target's will."""
    import tvm
    from optc.targets.cpu_features import missing_here
    from optc.targets.providers import onednn
    from optc.targets.providers.select import isa_cap

    if spec.device != "cpu" or spec.foreign_triple() is not None:
        return []
    mcpu = spec.target.get("mcpu")
    missing = missing_here(spec.target)
    if missing:
        return [(f"the artifact was not run here: code for {mcpu} may use {', '.join(missing)}, which this CPU lacks "
                 "(optc bench or optc run on such a machine times and checks it)")]
    cap = isa_cap(tvm.target.Target(spec.target)) if calls_onednn and timed else None
    return [(f"the latency line ran oneDNN's kernels for this CPU ({onednn.effective_isa()}), not {mcpu}'s ({cap.lower()}); "
             "the kernel race timed those (optc bench on such a machine times the artifact as deployed)")] if cap else []


def runs_here(spec: TargetSpec) -> bool:
    """Whether this machine can run the target's code: a CPU target of this architecture whose features it has."""
    from optc.targets.cpu_features import missing_here

    return spec.device == "cpu" and spec.foreign_triple() is None and not missing_here(spec.target)


def versus_onnxruntime(artifact: LoadedArtifact, model: Model, feeds: Mapping[str, np.ndarray], **timing: Any) -> dict[str, Any]:
    """``artifact`` and onnxruntime running ``model`` on ``feeds``: lowest block medians (ms, :func:`in_turns`
    with ``timing``), their ratio, and the largest output difference.

    onnxruntime's default session keeps its intra-op workers spinning while it lives, on the cores the
    other runtime's threads need: ResNet-18 at 2 threads took 24.5 ms in turns with it, 12.9 ms in turns
    with a session whose workers sleep, onnxruntime 17.6 ms either way. So the artifact is timed in turns
    with the sleeping session, the default session is then timed on its own, and onnxruntime's figure is
    the faster of its two (spinning pays on models of small ops: a BERT-shaped encoder 6.9 against 8.1 ms).
    In a deployment the artifact has its process to itself."""
    quiet = make_session(model, spinning=False)
    names = [o["name"] for o in artifact.manifest["outputs"]]
    got, want = artifact.run(feeds), dict(zip(names, quiet.run(names, dict(feeds))))
    diff = max((float(np.abs(got[n].astype(np.float64) - want[n]).max()) for n in names if got[n].size), default=0.0)
    best, blocks = in_turns({"artifact": lambda: artifact.run(feeds), "onnxruntime": lambda: quiet.run(names, dict(feeds))}, **timing)
    spinning = _spinning_ms(model, names, feeds, timing)
    ort_ms = min(best["onnxruntime"], spinning)
    return {"artifact_ms": best["artifact"], "onnxruntime_ms": ort_ms, "ratio": best["artifact"] / ort_ms, "max_abs_diff": diff,
            "blocks": blocks, "onnxruntime_quiet_ms": best["onnxruntime"], "onnxruntime_spinning_ms": spinning}


def _spinning_ms(model: Model, names: list[str], feeds: Mapping[str, np.ndarray], timing: Mapping[str, Any]) -> float:
    """onnxruntime's default session on its own; it (and its spinning workers) is gone when this returns."""
    spinning = make_session(model)
    return in_turns({"spinning": lambda: spinning.run(names, dict(feeds))}, **timing)[0]["spinning"]


def artifact_vs_onnxruntime(model: Model, library: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The library just written, loaded from ``library`` (there is no manifest yet), against onnxruntime."""
    import tvm
    from tvm import relax

    apply_runtime_env()
    lib = tvm.runtime.load_module(str(library))
    share_thread_pool(lib)  # as optc's runners load it: its TVM kernels on oneDNN's OpenMP threads from the first run
    vm = relax.VirtualMachine(lib, tvm.cpu())
    artifact = LoadedArtifact(io_specs(model), vm, tvm.cpu())
    return {**versus_onnxruntime(artifact, model, feeds), "threads": os.environ.get("TVM_NUM_THREADS") or "all cores"}
