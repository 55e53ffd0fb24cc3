"""``optc compile`` as a library call: load, run the pipeline, measure, write atomically.

Order matters for users' CI jobs: everything that can be checked without
running a pass (pipeline names and options, output folder, model file, input
shapes, calibration and evaluation data) is checked first, so bad input fails
in a second with nothing written.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from optc import __version__
from optc.errors import ConfigError
from optc.data import LabelledSet
from optc.evaluation import accuracy, interleaved_latency_ms, latency_ms
from optc.ir.io import load_model, save_model
from optc.ir.model import Model
from optc.ir.session import make_session, sample_feeds
from optc.ir.shapes import freeze_input_shapes, parse_shape_spec
from optc.passes.framework import Pass, PassContext
from optc.data.calibration import CalibrationSet
from optc.passes.framework.instruments import DumpAfter, TimePasses, VerifyEach
from optc.passes.framework.manager import Instrument, PassManager, PipelineResult
from optc.passes.framework.pipeline import CANONICALIZE, load_pipeline_file, parse_pass_specs

logger = logging.getLogger(__name__)

REPORT_NAME = "report.json"
MODEL_NAME = "model.onnx"
TARGETS = ("none", "x86", "arm", "gpu")
# Input models up to this many weight bytes keep a session through the pipeline so
# the latency comparison can time both models in turns; larger ones are timed one
# after the other (a second copy of their weights would cost more than it is worth).
INTERLEAVE_MAX_BYTES = 256 << 20
LATENCY_BUDGET_S = 4.0  # about this long for the in-turns comparison


@dataclass(frozen=True)
class CompileOptions:
    model: Path
    outdir: Path
    passes: tuple[str, ...] = ()
    pipeline_file: Path | None = None
    calib: Path | None = None
    eval_data: Path | None = None
    input_shapes: tuple[str, ...] = ()
    target: str = "none"
    verify_each: bool = False
    time_passes: bool = False
    dump_after: tuple[str, ...] = ()
    measure_latency: bool = True
    external_data: bool | None = None
    seed: int = 0
    cpu: str | None = None  # x86: LLVM CPU name instead of the host's
    arch: str | None = None  # gpu: CUDA arch such as sm_80
    tune_trials: int = 0  # MetaSchedule trials per task missing from the database
    int8_lowering: bool = True  # QDQ regions -> integer conv2d/matmul (targets/int8_lowering.py)
    weight_prepack: bool = True  # tuned kernels read weights in their own layout (targets/tuned_compile.py)
    tuning_db: Path | None = None  # default: the user cache folder
    rpc_tracker: str | None = None
    rpc_key: str | None = None


@dataclass
class CompileResult:
    report: dict[str, Any]
    files: list[Path] = field(default_factory=list)
    pipeline: PipelineResult | None = None


def build_pipeline(specs: Sequence[str], pipeline_file: Path | None) -> list[Pass]:
    """Passes from ``--pipeline`` then ``--pass`` (canonicalisation when neither is given)."""
    passes: list[Pass] = []
    if pipeline_file is not None:
        passes.extend(load_pipeline_file(pipeline_file))
    passes.extend(parse_pass_specs(list(specs)))
    return passes or parse_pass_specs(list(CANONICALIZE))


def check_outdir(outdir: Path) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise ConfigError(f"output {outdir} exists and is not a folder")
    if outdir.is_dir() and any(outdir.iterdir()) and not (outdir / REPORT_NAME).is_file():
        raise ConfigError(f"output folder {outdir} is not empty and holds no optc output; refusing to overwrite it")


def prepare_model(path: Path, shape_specs: Sequence[str]) -> Model:
    shapes = dict(parse_shape_spec(s) for s in shape_specs)
    model = load_model(path)
    if shapes and freeze_input_shapes(model, shapes):
        model.notes.append("froze input shapes: " + ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in shapes.items()))
    return model


def compile_model(
    opts: CompileOptions, extra_instruments: Sequence[Instrument] = (), on_tune_progress: Callable[[Any], None] | None = None
) -> CompileResult:
    """Run the pipeline, then (with a target) build; ``on_tune_progress`` gets a
    :class:`optc.targets.tuning_progress.TuneProgress` after every measured tuning batch."""
    if opts.target not in TARGETS:
        raise ConfigError(f"unknown target '{opts.target}'; valid targets: {', '.join(TARGETS)}")
    if opts.tune_trials < 0:
        raise ConfigError("--tune-trials must be 0 or more")
    if bool(opts.rpc_tracker) != bool(opts.rpc_key):
        raise ConfigError("--rpc-tracker and --rpc-key go together")
    passes = build_pipeline(opts.passes, opts.pipeline_file)
    names = {p.name for p in passes}
    unknown_dumps = [n for n in opts.dump_after if n != "all" and n not in names]
    if unknown_dumps:
        raise ConfigError(f"--dump-after {unknown_dumps[0]}: not in the pipeline ({', '.join(p.name for p in passes)}, or 'all')")
    check_outdir(opts.outdir)
    spec = _target_spec(opts)
    if spec is not None:
        spec.check_tuning(opts.tune_trials, opts.rpc_tracker)
    model = prepare_model(opts.model, opts.input_shapes)
    if spec is not None:
        dynamic = [s.describe() for s in model.inputs if not s.is_static]
        if dynamic:
            raise ConfigError(f"--target {opts.target} needs static input shapes; freeze them with --input-shape ({'; '.join(dynamic)})")
    calib = CalibrationSet.from_path(opts.calib, model) if opts.calib else None
    labelled = LabelledSet.from_path(opts.eval_data, model) if opts.eval_data else None
    feeds, feeds_source = _sample_feeds(model, calib, labelled, opts.seed)
    ctx = PassContext(calibration=calib, seed=opts.seed)
    PassManager(passes).check_requirements(model, ctx)

    opts.outdir.parent.mkdir(parents=True, exist_ok=True)
    staging = opts.outdir.parent / f".{opts.outdir.name}.{uuid.uuid4().hex[:8]}.tmp"
    staging.mkdir()
    try:
        instruments: list[Instrument] = list(extra_instruments)
        if opts.verify_each:
            instruments.append(VerifyEach(feeds))
        if opts.time_passes:
            instruments.append(TimePasses())
        if opts.dump_after:
            instruments.append(DumpAfter(set(opts.dump_after), staging / "dumps"))
        # Measure the input model now and let it go: holding it through the
        # pipeline would cost one more copy of the weights (see benchmarks/ir_scale.py).
        # A small model keeps an onnxruntime session instead, so that the two
        # models' latencies are taken in turns (a shared machine slows both alike).
        in_turns = opts.measure_latency and model.weight_bytes() <= INTERLEAVE_MAX_BYTES
        baseline = _measure(model, feeds, labelled, opts.measure_latency and not in_turns)
        baseline_session = make_session(model) if in_turns else None
        source = {"opsets": model.opset_imports, "notes": list(model.notes)}
        holder = [model]
        del model
        result = PassManager(passes, instruments).run(holder.pop(), ctx)
        final = _measure(result.model, feeds, labelled, opts.measure_latency and not in_turns)
        if baseline_session is not None:
            baseline.latency_ms, final.latency_ms = interleaved_latency_ms(
                [baseline_session, make_session(result.model)], feeds, blocks=10, runs=20, budget_s=LATENCY_BUDGET_S
            )
            baseline_session = None
        evaluation = _compare(baseline, final, labelled.inputs.num_samples if labelled else 0, "in turns" if in_turns else "one after the other")
        evaluation["fidelity_data"] = feeds_source
        _check_finite(baseline, final)
        files = save_model(result.model, staging / MODEL_NAME, external_data=opts.external_data)
        report = _report(opts, passes, source, result, evaluation)
        if spec is not None:
            report["target"] = _compile_target(result.model, spec, staging, opts, on_tune_progress)
            files.append(staging / "model.so")
        (staging / REPORT_NAME).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        if spec is not None:
            from optc.targets.artifact import write_manifest

            write_manifest(staging, result.model, spec)
            files.append(staging / "manifest.json")
        _publish(staging, opts.outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = [opts.outdir / f.name for f in files] + [opts.outdir / REPORT_NAME]
    return CompileResult(report, written, result)


def _target_spec(opts: CompileOptions):
    if opts.target == "none":
        return None
    from optc.targets.spec import make_target

    return make_target(opts.target, cpu=opts.cpu, arch=opts.arch)


def _compile_target(model: Model, spec, staging: Path, opts: CompileOptions, on_tune_progress=None) -> dict[str, Any]:
    """Build and export the TVM library; returns the report's target section."""
    import time

    from optc.targets.build import build, export

    from optc.targets.tuning import TuneOptions, default_tuning_db

    tune = TuneOptions(
        opts.tune_trials, opts.tuning_db or default_tuning_db(), opts.rpc_tracker, opts.rpc_key, opts.seed,
        prepack=opts.weight_prepack, on_progress=on_tune_progress
    )
    start = time.perf_counter()
    executable, tuning = build(model, spec, tune, int8=opts.int8_lowering)
    int8 = tuning.pop("int8", None)
    built = time.perf_counter()
    export(executable, staging / "model.so", spec)
    return {**spec.to_dict(), "build_seconds": built - start, "export_seconds": time.perf_counter() - built, "tuning": {**tuning, "db": str(tune.db_dir)}, "int8": int8}


def _sample_feeds(model: Model, calib: CalibrationSet | None, labelled: LabelledSet | None, seed: int) -> tuple[dict, str]:
    """Inputs for --verify-each, fidelity and latency, and where they come from.

    Evaluation data first: the passes never saw it, so fidelity on it is not
    flattered by what they fitted. Then calibration data (seen by the passes),
    then random inputs.
    """
    if labelled is not None:
        return labelled.inputs.take(8), "evaluation data"
    if calib is not None:
        return calib.take(8), "calibration data, which the passes fitted on"
    return sample_feeds(model, seed=seed), "random inputs"


def _check_finite(before: _Measurement, after: _Measurement) -> None:
    """Refuse to write a model that turns finite outputs into NaN/inf (a pass went wrong)."""
    for name, ref in before.outputs.items():
        got = after.outputs.get(name)
        if got is None or not np.issubdtype(got.dtype, np.floating):
            continue
        if np.isfinite(ref).all() and not np.isfinite(got).all():
            raise RuntimeError(f"the compressed model computes NaN/inf on output '{name}' where the input model does not; nothing was written")


@dataclass
class _Measurement:
    outputs: dict[str, Any]
    accuracy: float | None
    latency_ms: float | None


def _measure(model: Model, feeds, labelled: LabelledSet | None, measure_latency: bool) -> _Measurement:
    from optc.ir.session import run

    return _Measurement(
        outputs=run(model, feeds),
        accuracy=accuracy(model, labelled) if labelled is not None else None,
        latency_ms=latency_ms(model, feeds) if measure_latency else None,
    )


def _compare(before: _Measurement, after: _Measurement, samples_labelled: int = 0, timing: str = "one after the other") -> dict[str, Any]:
    from optc.evaluation import compare_outputs

    samples = len(next(iter(before.outputs.values()))) if before.outputs else 0
    out: dict[str, Any] = {"fidelity": compare_outputs(before.outputs, after.outputs), "fidelity_samples": samples}
    if before.accuracy is not None and after.accuracy is not None:
        out["accuracy"] = {"samples": samples_labelled, "before": before.accuracy, "after": after.accuracy, "delta": after.accuracy - before.accuracy}
    if before.latency_ms is not None and after.latency_ms is not None:
        out["latency_ms"] = {
            "before": before.latency_ms,
            "after": after.latency_ms,
            "speedup": before.latency_ms / after.latency_ms if after.latency_ms else None,
            "runtime": "onnxruntime CPU",
            "timing": timing,
        }
    return out


def _report(opts: CompileOptions, passes: Sequence[Pass], source: dict[str, Any], result: PipelineResult, evaluation: dict[str, Any]) -> dict[str, Any]:
    return {
        "optc_version": __version__,
        "model": {
            "source": str(opts.model),
            "opsets": source["opsets"],
            "inputs": [s.describe() for s in result.model.inputs],
            "outputs": [s.describe() for s in result.model.outputs],
        },
        "notes": source["notes"] + [n for n in result.model.notes if n not in source["notes"]],
        "target": {"name": opts.target},
        "pipeline": [repr(p) for p in passes],
        "passes": [r.to_dict() for r in result.records],
        "before": result.initial.to_dict(),
        "after": result.final.to_dict(),
        "evaluation": evaluation,
    }


def _publish(staging: Path, outdir: Path) -> None:
    """Swap the finished folder into place; an earlier output survives until then."""
    if outdir.exists():
        old = outdir.parent / f".{outdir.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(outdir, old)
        os.replace(staging, outdir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, outdir)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def inspect_model(path: Path, shape_specs: Sequence[str] = (), *, check_frontend: bool = True) -> dict[str, Any]:
    """What ``optc inspect`` shows: interface, opsets, ops, size, MACs, blockers."""
    from optc.ir.constants import count_constant_weights
    from optc.ir.shapes import infer_shapes
    from optc.ir.stats import compute_stats
    from optc.targets.support import frontend_support

    raw = load_model(path, lift_constants=False)
    constant_weights = count_constant_weights(raw)
    del raw
    model = prepare_model(path, shape_specs)
    shapes = infer_shapes(model)
    stats = compute_stats(model)
    dynamic = {s.name: [d for d in (s.shape or ()) if not isinstance(d, int)] for s in model.inputs if not s.is_static}
    info: dict[str, Any] = {
        "model": str(path),
        "ir_version": model.proto.ir_version,
        "producer": f"{model.proto.producer_name} {model.proto.producer_version}".strip(),
        "opsets": model.opset_imports,
        "inputs": [s.describe() for s in model.inputs],
        "outputs": [s.describe() for s in model.outputs],
        "dynamic_dims": dynamic,
        "weights_in_constant_nodes": constant_weights,
        "notes": model.notes,
        "shape_mismatches": shapes.output_mismatches,
        "stats": stats.to_dict(),
    }
    if check_frontend:
        info["tvm_frontend"] = frontend_support(model).to_dict()
    return info
