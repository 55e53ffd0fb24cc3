"""x86 without oneDNN: optc's own Winograd kernels (:mod:`.winograd_glue`) raced against TVM's tiled kernel.

Where oneDNN is missing (no ``libdnnl-dev``, or ``OPTC_DISABLE_ONEDNN``), TVM's kernels compute every op, and a 3x3
convolution is a direct one. optc's Winograd kernels need no vendor library: for each fp32 3x3 stride-1 convolution
they take, F(4x4, 3x3) and F(2x2, 3x3) are timed beside TVM's kernel in one module, in alternating blocks, with the
rest of the model's memory swept between calls, as the oneDNN race does (and stored in the same ``providers.json``,
under this glue's version). A Winograd kernel whose outputs stray from TVM's by more than ``WINOGRAD_RTOL`` of the
range is not raced; one is kept only where it is ``RACE_NOISE`` faster than TVM's kernel, since it also holds its
transformed weights in memory.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43, Chain
from optc.targets.providers.offload import find_chains, provider_call
from optc.targets.providers.select import RACE_NOISE, WINOGRAD, WINOGRAD_RTOL, ProviderReport, _measured_choices, _race, reference
from optc.targets.providers.winograd_glue import PREFIX, glue_digest, glue_object, send, takes

logger = logging.getLogger(__name__)

KINDS = {"winograd_f43": ALGO_WINOGRAD_F43, "winograd_f23": ALGO_WINOGRAD_F23}  # race names, as select.WINOGRAD's
NR = 32  # output channels an AVX-512 register tile covers: the report's transformed weights are padded to it


def place_measured(mod: Any, target: Any, db_dir: Path, compile_fn: Callable[[Any], Any], report: ProviderReport) -> Any:
    """``mod`` (NHWC) with the 3x3 convolutions where optc's Winograd beat TVM's kernel sent to the glue."""
    chains = [c for c in find_chains(mod) if c.kind == "conv2d" and c.src_dtype == "float32"]
    candidates = [c for c in chains if takes(c)]
    timings: dict[str, dict[str, Any]] = {}
    if candidates:
        timings = _measured_choices(candidates, target, db_dir, compile_fn, report, version=f"optc-winograd-{glue_digest()}", timer=measure)
    picks = {id(c): fastest(timings.get(c.workload())) for c in chains}
    return send(mod, chains, picks, report, timings, NR)


def fastest(timing: dict[str, Any] | None) -> int | None:
    """The Winograd algorithm that beat TVM's kernel by ``RACE_NOISE``, the faster of the two; None for TVM's."""
    if not timing or "tvm_ms" not in timing:
        return None
    times = {name: timing[f"{name}_ms"] for name in KINDS if isinstance(timing.get(f"{name}_ms"), (int, float))}
    best = min(times, key=times.__getitem__, default=None)
    return KINDS[best] if best is not None and times[best] * (1 + RACE_NOISE) < timing["tvm_ms"] else None


def measure(chains: list[Chain], target: Any, compile_fn: Callable[[Any], Any], sweep: int = 0) -> dict[str, dict[str, Any]]:
    """Time TVM's kernel and optc's two Winograd kernels for each chain, in one module, in alternating blocks, reading
    ``sweep`` bytes of other memory before every timed call."""
    import tvm
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
    executable = compile_fn(bb.get())
    with tempfile.TemporaryDirectory(prefix="optc-winograd-") as tmp:
        path = Path(tmp) / "kernels.so"
        executable.export_library(str(path), addons=[str(glue_object())])
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        other = np.ones(sweep // 8) if sweep else None
        evict = (lambda: float(other.sum())) if other is not None else None  # noqa: E731
        results: dict[str, dict[str, Any]] = {}
        for i, chain in enumerate(chains):
            args = [tvm.runtime.tensor(a) for a in inputs[i]]
            want = vm[f"tvm_{i}"](*args).numpy().astype(np.float64)
            scale = max(float(np.abs(want).max()), 1e-30)
            fns = {"tvm_ms": lambda i=i, a=args: vm[f"tvm_{i}"](*a)}
            extra: dict[str, Any] = {}
            for name in KINDS:
                kind = WINOGRAD[name].kind
                error = float(np.abs(vm[f"{kind}_{i}"](*args).numpy() - want).max()) / scale
                if error <= WINOGRAD_RTOL:
                    fns[f"{name}_ms"] = lambda i=i, a=args, kind=kind: vm[f"{kind}_{i}"](*a)
                    extra[f"{name}_error"] = error
                else:
                    extra[name] = f"error {error:.1e} of the output range, above {WINOGRAD_RTOL:g}"
            results[chain.workload()] = {**_race(fns, evict), **extra}
            logger.info("kernels: %s  %s", chain.workload(), "  ".join(f"{k[:-3]} {v:.3f} ms" for k, v in results[chain.workload()].items()
                                                                      if k.endswith("_ms")))
        return results
