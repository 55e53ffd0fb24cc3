"""The typed library entry point: :func:`compile` and the :class:`Report` it returns.

Objects in, objects out; strings are the CLI's business (``optc compile``
turns its arguments into these objects and calls the same function)::

    from optc.api import CalibrationSet, compile, load_model, make_pass, named_pipeline

    model = load_model("model.onnx")
    result = compile(
        model,
        [*named_pipeline("canonicalize"), make_pass("prune-channels", {"ratio": 0.3}), make_pass("quantize")],
        calibration=CalibrationSet.from_path("calib.npz", model),
        output="out/model",
    )
    print(result.report.after.macs, result.report.evaluation.fidelity["logits"].cosine)

From the package root the same function is ``optc.compile_model`` (a name that
does not shadow the builtin ``compile``).

Order matters for users' CI jobs: everything that can be checked without
running a pass (pipeline, output folder, model file, input shapes, target,
calibration and evaluation data) is checked first, so bad input fails in a
second with nothing written. The output folder is written to a temporary
folder and swapped into place in one step (:mod:`optc.driver`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from optc import driver
from optc.data import CalibrationSet, LabelledSet
from optc.data.images import ImageFolder, ImagePreprocess
from optc.data.feeds import is_feed_source
from optc.data.sources import open_calibration, open_evaluation
from optc.errors import ConfigError
from optc.evaluation import interleaved_latency_ms
from optc.ir.bind import describe_values
from optc.ir.io import load_model, save_model
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.passes.framework import Instrument, Pass, PassContext, PassManager, PassRecord, PipelineResult, make_pass
from optc.passes.framework.instruments import DumpAfter, TimePasses, VerifyEach
from optc.passes.framework.pipeline import NAMED_PIPELINES, parse_pass_spec
from optc.reporting import render_html
from optc.reporting.format import least_fidelity
from optc.search import guard as default_budget_guard
from optc.search.run import BudgetMissed, BudgetSpec, choose_pipeline
from optc.targets.spec import TargetSpec
from optc.targets.tuning_progress import TuneProgress

__all__ = [
    "Accuracy", "BudgetSpec", "CalibrationSet", "CompileResult", "DetailedStats", "Evaluation", "FileDigest", "ImageFolder", "ImagePreprocess", "LabelledSet", "Latency",
    "Model", "ModelInfo", "OutputFidelity", "Pass", "PassReport", "Report", "Stats", "TargetReport", "TargetSpec",
    "TuningOptions", "WeightSparsity", "compile", "default_output", "load_model", "make_pass", "make_target",
    "named_pipeline", "parse_pass_spec",
]

logger = logging.getLogger(__name__)

# Input models up to this many weight bytes keep a session through the pipeline so
# the latency comparison can time both models in turns; larger ones are timed one
# after the other (a second copy of their weights would cost more than it is worth).
INTERLEAVE_MAX_BYTES = 256 << 20
LATENCY_BUDGET_S = 4.0  # about this long for the in-turns comparison
HTML_NAME = "report.html"
# Without a budget the run does as asked, but says so when the output is this far off.
FIDELITY_WARN = 0.99  # mean cosine to the input model
ACCURACY_WARN = 0.01  # one point
SLOWER_WARN = 1.1  # an artifact this much slower than onnxruntime on the same machine is said so


# --------------------------------------------------------------------------- the report
# Every section reads from and writes to report.json's dict form (``from_dict``/``to_dict``),
# so a report.json from disk loads back into the same types.


@dataclass(frozen=True)
class Stats:
    """Size and cost of a model: one schema for the pipeline's input and output and for every pass."""

    params: int
    nonzero_params: int
    param_bytes: int
    macs: int  # per sample; symbolic dims count as 1
    nodes: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Stats:
        """Either form of report.json: a pass record's (``bytes``) or the whole model's (``param_bytes``)."""
        return cls(d["params"], d["nonzero_params"], d["param_bytes"] if "param_bytes" in d else d["bytes"], d["macs"], d["nodes"])

    def to_dict(self) -> dict[str, Any]:
        """The form of a pass record in report.json (which calls the weight bytes ``bytes``)."""
        return {"params": self.params, "nonzero_params": self.nonzero_params, "bytes": self.param_bytes, "macs": self.macs, "nodes": self.nodes}


@dataclass(frozen=True)
class WeightSparsity:
    name: str
    shape: tuple[int, ...]
    zero_fraction: float


@dataclass(frozen=True)
class DetailedStats(Stats):
    """:class:`Stats` plus the detail kept for the pipeline's input and output."""

    macs_per_node: Mapping[str, int]
    macs_unknown: tuple[str, ...]  # compute nodes whose shapes are not known
    weight_zero_fraction: float
    weights: tuple[WeightSparsity, ...]
    op_histogram: Mapping[str, int]
    macs_symbolic: tuple[str, ...] = ()  # symbolic dims past the batch that MACs count as 1 (ir.stats)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetailedStats:
        return cls(
            d["params"], d["nonzero_params"], d["param_bytes"], d["macs"], d["nodes"], dict(d["macs_per_node"]), tuple(d["macs_unknown"]),
            d["weight_zero_fraction"], tuple(WeightSparsity(w["name"], tuple(w["shape"]), w["zero_fraction"]) for w in d["weights"]),
            dict(d["op_histogram"]), tuple(d.get("macs_symbolic", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "param_bytes": self.param_bytes,
            "macs": self.macs,
            "macs_per_node": dict(self.macs_per_node),
            "macs_unknown": list(self.macs_unknown),
            "macs_symbolic": list(self.macs_symbolic),
            "weight_zero_fraction": self.weight_zero_fraction,
            "weights": [{"name": w.name, "shape": list(w.shape), "zero_fraction": w.zero_fraction} for w in self.weights],
            "op_histogram": dict(self.op_histogram),
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class PassReport:
    """What one pass did. ``stats`` are the pass's own figures (keys differ by pass)."""

    name: str
    options: Mapping[str, Any]
    modified: bool
    seconds: float
    before: Stats
    after: Stats
    stats: Mapping[str, Any]
    skipped: tuple[str, ...]  # "node: reason"
    drift: Mapping[str, Any] | None  # outputs against the previous stage (with verify_each)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PassReport:
        return cls(d["pass"], dict(d["options"]), d["modified"], d["seconds"], Stats.from_dict(d["before"]), Stats.from_dict(d["after"]),
                   dict(d["stats"]), tuple(d["skipped"]), d["drift"])

    @classmethod
    def from_record(cls, r: PassRecord) -> PassReport:
        return cls.from_dict(r.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.name, "options": dict(self.options), "modified": self.modified, "seconds": self.seconds,
            "before": self.before.to_dict(), "after": self.after.to_dict(), "stats": dict(self.stats),
            "skipped": list(self.skipped), "drift": self.drift,
        }


@dataclass(frozen=True)
class OutputFidelity:
    """One output of the compiled model against the input model's, on the same inputs."""

    max_abs: float
    max_rel: float  # relative to the reference's largest magnitude
    cosine: float
    shape_changed: bool = False
    agreement: float | None = None  # outputs holding class scores: share of positions with the input model's argmax
    change_of: str | None = None  # an output that is this input plus a change (a watermark encoder's marked frame)
    change_cosine: float | None = None  # ... and the cosine of that change, which is what the model does

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OutputFidelity:
        return cls(d["max_abs"], d["max_rel"], d["cosine"], bool(d.get("shape_changed")), d.get("agreement"),
                   d.get("change_of"), d.get("change_cosine"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_abs": self.max_abs, "max_rel": self.max_rel, "cosine": self.cosine}
        if self.agreement is not None:
            out["agreement"] = self.agreement
        if self.change_of is not None:
            out.update(change_of=self.change_of, change_cosine=self.change_cosine)
        return {**out, "shape_changed": 1.0} if self.shape_changed else out


@dataclass(frozen=True)
class Accuracy:
    samples: int
    before: float
    after: float
    delta: float


@dataclass(frozen=True)
class Latency:
    """onnxruntime CPU latency of the input and the compiled model, in milliseconds."""

    before_ms: float
    after_ms: float
    speedup: float | None
    runtime: str
    timing: str  # "in turns" or "one after the other"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Latency:
        return cls(d["before"], d["after"], d["speedup"], d["runtime"], d["timing"])

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before_ms, "after": self.after_ms, "speedup": self.speedup, "runtime": self.runtime, "timing": self.timing}


@dataclass(frozen=True)
class Evaluation:
    fidelity: Mapping[str, OutputFidelity]  # by output name
    fidelity_samples: int
    fidelity_data: str  # which inputs: evaluation data, calibration data or random
    accuracy: Accuracy | None = None  # with labelled evaluation data
    latency: Latency | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Evaluation:
        return cls(
            {k: OutputFidelity.from_dict(v) for k, v in d["fidelity"].items()}, d["fidelity_samples"], d["fidelity_data"],
            Accuracy(**d["accuracy"]) if "accuracy" in d else None, Latency.from_dict(d["latency_ms"]) if "latency_ms" in d else None,
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"fidelity": {k: v.to_dict() for k, v in self.fidelity.items()}, "fidelity_samples": self.fidelity_samples}
        if self.accuracy is not None:
            out["accuracy"] = dataclasses.asdict(self.accuracy)
        if self.latency is not None:
            out["latency_ms"] = self.latency.to_dict()
        out["fidelity_data"] = self.fidelity_data
        return out


@dataclass(frozen=True)
class TargetReport:
    """``name`` is ``none`` without a target; the rest is filled when a TVM library was built."""

    name: str
    target: Mapping[str, Any] | None = None  # the TVM target dict
    host: Mapping[str, Any] | None = None
    device: str | None = None
    cross_compiler: str | None = None
    build_seconds: float | None = None
    export_seconds: float | None = None
    tuning: Mapping[str, Any] | None = None
    int8: Mapping[str, Any] | None = None  # regions lowered to integer kernels, and those left float
    latency: Mapping[str, Any] | None = None  # the artifact vs onnxruntime on this machine (targets.compare), when it runs here
    lowered: Sequence[str] | None = None  # ops written out in plain ops for TVM's frontend (recurrent layers unrolled)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TargetReport:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        if self.target is None:
            return {"name": self.name}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class ModelInfo:
    """The input model, and the compiled model's interface."""

    source: str | None  # the file it was loaded from
    sha256: str | None  # of that file
    opsets: Mapping[str, int]
    inputs: tuple[str, ...]  # "name: dtype [dims]"
    outputs: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelInfo:
        return cls(d["source"], d.get("sha256"), dict(d["opsets"]), tuple(d["inputs"]), tuple(d["outputs"]))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "opsets": dict(self.opsets), "inputs": list(self.inputs), "outputs": list(self.outputs)}


@dataclass(frozen=True)
class FileDigest:
    path: str
    sha256: str


@dataclass(frozen=True)
class Report:
    """What a compile did; ``to_dict`` is report.json."""

    model: ModelInfo
    notes: tuple[str, ...]
    target: TargetReport
    pipeline: tuple[str, ...]  # each pass as a --pass value that parses back to it
    passes: tuple[PassReport, ...]
    before: DetailedStats
    after: DetailedStats
    evaluation: Evaluation
    versions: Mapping[str, str | None]  # optc, python, onnx, onnxruntime, tvm (None: not installed)
    seed: int
    input_shapes: Mapping[str, tuple[int, ...]]  # the input dims frozen for this run
    calibration_files: tuple[FileDigest, ...] = ()
    evaluation_files: tuple[FileDigest, ...] = ()
    warnings: tuple[str, ...] = ()  # quality flags a user must see (also printed on stderr)
    search: Mapping[str, Any] | None = None  # with an accuracy budget: every point explored

    @property
    def optc_version(self) -> str:
        return str(self.versions.get("optc"))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        data = d.get("data") or {}
        return cls(
            ModelInfo.from_dict(d["model"]), tuple(d["notes"]), TargetReport.from_dict(d["target"]), tuple(d["pipeline"]),
            tuple(PassReport.from_dict(p) for p in d["passes"]), DetailedStats.from_dict(d["before"]), DetailedStats.from_dict(d["after"]),
            Evaluation.from_dict(d["evaluation"]), dict(d.get("versions") or {"optc": d.get("optc_version")}), d.get("seed", 0),
            {k: tuple(v) for k, v in (d.get("input_shapes") or {}).items()},
            tuple(FileDigest(**f) for f in data.get("calibration", [])), tuple(FileDigest(**f) for f in data.get("evaluation", [])),
            tuple(d.get("warnings", ())), d.get("search"),
        )

    def to_dict(self) -> dict[str, Any]:
        """report.json's content as plain JSON values (lists, not tuples)."""
        report = {
            "optc_version": self.optc_version,
            "model": self.model.to_dict(),
            "notes": list(self.notes),
            "target": self.target.to_dict(),
            "pipeline": list(self.pipeline),
            "passes": [p.to_dict() for p in self.passes],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "evaluation": self.evaluation.to_dict(),
            "versions": dict(self.versions),
            "seed": self.seed,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "data": {
                "calibration": [dataclasses.asdict(f) for f in self.calibration_files],
                "evaluation": [dataclasses.asdict(f) for f in self.evaluation_files],
            },
        }
        if self.warnings:
            report["warnings"] = list(self.warnings)
        if self.search is not None:
            report["search"] = dict(self.search)
        return json.loads(driver.to_json(report))

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(driver.to_json(self.to_dict(), indent=2) + "\n")


@dataclass(frozen=True)
class CompileResult:
    model: Model  # the compiled model
    report: Report
    output: Path | None  # the output folder, None when nothing was written
    files: tuple[Path, ...]  # what was written there (the marker and dumps aside)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True, kw_only=True)
class TuningOptions:
    """MetaSchedule tuning for CPU targets (``optc compile --tune-trials ...``)."""

    trials_per_task: int = 0  # for each task the database lacks; 0 compiles with what it holds
    database: Path | None = None  # default: ~/.cache/optc/tuning ($XDG_CACHE_HOME)
    rpc_tracker: str | None = None  # HOST:PORT: measure candidates on boards registered there
    rpc_key: str | None = None
    weight_prepack: bool = True  # tuned kernels read weights in their own layout
    kernels: str = "auto"  # heavy ops: auto (provider chosen by measurement), tvm, onednn
    on_progress: Callable[[TuneProgress], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.trials_per_task < 0:
            raise ConfigError("--tune-trials must be 0 or more")
        if bool(self.rpc_tracker) != bool(self.rpc_key):
            raise ConfigError("--rpc-tracker and --rpc-key go together")
        if self.kernels not in ("auto", "tvm", "onednn"):
            raise ConfigError(f"--kernels must be auto, tvm or onednn, not {self.kernels!r}")


def make_target(name: str, *, cpu: str | None = None, arch: str | None = None) -> TargetSpec:
    """The spec of ``x86``, ``arm`` or ``gpu``; without TVM installed, a ConfigError that gives the install command.

    Args:
        cpu: LLVM CPU name. x86: default this machine's; arm: the board's, which decides its instructions
            (``cortex-a76`` has the dot products int8 kernels use; default a generic Armv8-A with NEON).
        arch: gpu: CUDA arch such as ``sm_80`` (the default).
    """
    driver.require_tvm(name)
    from optc.targets.spec import make_target as spec_for

    return spec_for(name, cpu=cpu, arch=arch)


def named_pipeline(name: str) -> list[Pass]:
    """The passes of a named pipeline (``canonicalize``), configured with their defaults."""
    if name not in NAMED_PIPELINES:
        raise ConfigError(f"unknown pipeline '{name}'; named pipelines: {', '.join(NAMED_PIPELINES)}")
    return [make_pass(n) for n in NAMED_PIPELINES[name]]


def default_output(model_path: str | os.PathLike[str]) -> Path:
    """Where ``optc compile`` writes without ``-o``: ``<model dir>/<model stem>.optc``."""
    path = Path(model_path)
    return path.parent / f"{path.stem}.optc"


# --------------------------------------------------------------------------- compile


def compile(  # noqa: A001 - the library's entry point; optc.compile_model from the package root
    model: Model | str | os.PathLike[str],
    passes: Sequence[Pass] | None = None,
    *,
    calibration: CalibrationSet | ImageFolder | str | os.PathLike[str] | Iterable[Mapping[str, Any]] | None = None,
    evaluation: LabelledSet | ImageFolder | str | os.PathLike[str] | Iterable[tuple[Mapping[str, Any], Any]] | None = None,
    target: TargetSpec | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    instruments: Sequence[Instrument] = (),
    seed: int = 0,
    tuning: TuningOptions | None = None,
    int8_lowering: bool = True,
    verify_each: bool = False,
    time_passes: bool = False,
    dump_after: Sequence[str] = (),
    measure_latency: bool = True,
    external_data: bool | None = None,
    budget: BudgetSpec | None = None,
    default_budget: bool = True,
    held_out: int | None = None,
    _notes: Sequence[str] = (),
    _ran: tuple[Sequence[Pass], PipelineResult] | None = None,
) -> CompileResult:
    """Run ``passes`` on ``model``, measure the result against the input, and (with ``target``) build it with TVM.

    Args:
        model: an ``.onnx`` file, or a :class:`Model` from :func:`load_model`. A Model
            is not changed, except that shape inference may add value infos.
        passes: configured passes, in order (:func:`make_pass`, :func:`named_pipeline`,
            or pass classes with their configs); None runs ``canonicalize``, ``[]`` no pass.
        calibration: data for the data-driven passes: a path (an ``.npz`` or a folder of
            them), an :class:`ImageFolder` (images and their preprocessing), any iterable of
            feed dicts or a ``CalibrationDataReader``, or a :class:`CalibrationSet` opened on
            this model (see :mod:`optc.data.sources`).
        evaluation: labelled data in the same forms (from an iterable: ``(feed, labels)``
            pairs; an image folder: one subfolder per class): accuracy before and after, and
            the fidelity figures (else calibration or random inputs).
        target: compile the result for this :func:`make_target` spec (needs ``output``).
            A target needs static shapes: a dynamic leading batch dim is frozen to 1
            (with a note); other dynamic dims must be given in ``input_shapes``.
        input_shapes: input name -> dims, freezing dynamic dims before any pass.
        input_values: input name -> a number or a list of numbers: the input becomes a constant of the model
            (``--input-value``; :mod:`optc.ir.bind`), and what it decides folds away (an ``If`` on a sample rate).
            Data that still holds the input must hold that value.
        output: a folder for ``model.onnx``, ``report.json``, ``pipeline.yaml`` (and
            the TVM library). Written to a temporary folder and swapped into place;
            an existing folder is replaced only when it is optc's own, unchanged output.
            None: nothing is written.
        instruments: hooks around every pass, run before the built-in ones.
        seed: for everything random (sample inputs, tuning).
        tuning: MetaSchedule tuning for CPU targets.
        int8_lowering: compile int8 QDQ regions to integer kernels (targets only).
        verify_each: check the model and compare it with onnxruntime after every pass.
        time_passes: log each pass's wall time.
        dump_after: pass names (or ``all``) whose output model is saved under ``output/dumps``.
        measure_latency: time both models in onnxruntime.
        external_data: store weights beside ``model.onnx`` (None: only above 1.8 GB).
        budget: an accuracy budget on ``evaluation`` (:class:`BudgetSpec`): every lossy
            pass's strength becomes the most it may take and the run keeps the strongest
            pipeline within the budget (with ``time_budget_s``, a search for the best
            ``objective``; the best model so far is always in ``output``).
            ``--min-fidelity`` without ``evaluation`` measures on calibration samples
            split off before any pass runs.
        default_budget: without ``budget``, hold lossy passes whose strength the user did
            not set (``make_pass``/``--pass`` without ``ratio=``, ``sparsity=``, ...) to a
            default budget on held-out data (:mod:`optc.search.guard`: one point of
            ``evaluation``'s metric, else output cosine 0.99 and, on outputs holding class
            scores, argmax agreement 0.99): the pipeline runs as asked,
            and only when it misses are the strengths searched. False runs as asked.
        held_out: the last ``held_out`` calibration samples are held out and no pass fits on
            them, as in the run whose ``pipeline.yaml`` records it (``data.held_out``): a
            replay then fits on the same samples; 0 holds none out. None: a budget measured on
            calibration samples holds a quarter of them out, and so do lossy passes without
            ``evaluation`` (their fidelity figures are measured on them) when they can spare them.

    Raises:
        OptcError: bad input (a one-line message saying what and where); nothing is written.
        BudgetMissed: the compiled model misses ``budget`` (exit code 3); nothing is written.
    """
    call = dict(locals())  # the arguments as given: a run that misses the default budget is redone from them
    passes = list(passes) if passes is not None else named_pipeline("canonicalize")
    tuning = tuning or TuningOptions()
    shapes = {name: tuple(int(d) for d in dims) for name, dims in (input_shapes or {}).items()}
    outdir = Path(output) if output is not None else None
    names = {p.name for p in passes}
    unknown_dumps = [n for n in dump_after if n != "all" and n not in names]
    if unknown_dumps:
        raise ConfigError(f"--dump-after {unknown_dumps[0]}: not in the pipeline ({', '.join(p.name for p in passes)}, or 'all')")
    if outdir is None and (target is not None or dump_after):
        raise ConfigError(f"{'a target' if target is not None else '--dump-after'} needs an output folder")
    if outdir is not None:
        driver.check_output_folder(outdir)
    if target is not None:
        driver.require_tvm(target.name)
        target.check_toolchain()
        target.check_tuning(tuning.trials_per_task, tuning.rpc_tracker)
    source_path = Path(model) if not isinstance(model, Model) else model.source
    model, shapes = driver.prepare_model(model, shapes, target=target.name if target is not None else None, values=input_values)
    calib = open_calibration(calibration, model)
    labelled = open_evaluation(evaluation, model)
    data_section = _data_section(model, calibration, evaluation)
    # A re-run (default budget missed) gets the opened sets: an iterable of feeds may be read only once.
    call.update({k: v for k, v, given in (("calibration", calib, calibration), ("evaluation", labelled, evaluation)) if is_feed_source(given)})
    guard, run_notes = None, list(_notes)
    passes = _target_presets(passes, target, run_notes)
    budget_data = labelled
    split = False  # whether passes fit on calibration data less held-out samples: pipeline.yaml records how many
    if budget is not None and budget.active:
        if labelled is None and not budget.resolve()[0].needs_labels:
            # --min-fidelity (or --metric fidelity) without --eval
            calib, budget_data = default_budget_guard.held_out(calib, model, held_out or None)
            split = True
    elif default_budget:
        guard, calib, skipped = default_budget_guard.plan(passes, model, calib, labelled, budget.named_metric() if budget is not None else None,
                                                          held_out or None)
        split = guard is not None and guard.data.split_from_calibration
        if skipped:
            logger.warning(skipped)
            run_notes.append(skipped)
    held: CalibrationSet | None = None  # calibration samples no pass fits on: the fidelity figures are measured on them
    if split:
        held = (budget_data or guard.data).inputs  # type: ignore[union-attr]
    elif held_out and calib is not None:
        calib, held = calib.hold_out(model, held_out)
    elif held_out is None and labelled is None and calib is not None and any(not p.exact for p in passes):
        calib, held = _hold_out_to_measure(passes, model, calib, seed)
    if held is not None:
        data_section = {**(data_section or {}), "held_out": held.num_samples}
    elif calib is not None and any(not p.exact for p in passes):
        data_section = {**(data_section or {}), "held_out": 0}  # a replay without --eval fits on every sample too
    feeds, feeds_source = driver.sample_feeds(model, calib, labelled, seed, held)
    ctx = PassContext(calibration=calib, seed=seed)
    try:
        PassManager(passes).check_requirements(model, ctx)
    except ConfigError as exc:
        if held is None or calib is None:
            raise
        raise ConfigError(f"{exc}: {held.num_samples} of the {held.num_samples + calib.num_samples} calibration samples are held out "
                          "to measure the result on (give more, or --eval)") from None
    search_section, searched = None, None
    if budget is not None and budget.active:
        interim = _publish_interim(outdir) if budget.time_budget_s is not None and outdir is not None else None
        chosen = choose_pipeline(passes, model, ctx, budget_data, budget, on_improve=interim, ran=_ran)
        passes, search_section, searched = chosen.passes, chosen.section, chosen.run
        del chosen
    # Hashed before any work, while the files are the ones validated.
    digests = (driver.file_digest(source_path) if source_path is not None and source_path.is_file() else None,
               _digests(calib.files or calib.sources if calib else ()),
               _digests(labelled.inputs.files or labelled.inputs.sources if labelled else ()))

    try:
        return _run(passes, model, ctx, feeds, feeds_source, labelled, guard, run_notes, search_section, searched, digests,
                    source_path, shapes, outdir, target, tuning, int8_lowering, seed, instruments, verify_each, time_passes,
                    dump_after, measure_latency, external_data, data_section)
    except _DefaultBudgetMissed as missed:
        logger.warning(missed.message)
        # A default held to the default budget: strengths to 1/8 of the default are precise enough, in 3 steps.
        implicit = BudgetSpec(metric=missed.guard.runner.metric, max_drop=missed.guard.max_drop, search_steps=3, hold=missed.guard.runner.hold,
                              search_limit_s=default_budget_guard.SEARCH_LIMIT_S)
        # The redo opens the same data and splits it the same way, so the run that missed is the search's
        # first point as it stands: the search need not run every pass of it again.
        ran, missed.ran = missed.ran, None
        return compile(**{**call, "budget": implicit, "default_budget": False, "_notes": [*_notes, missed.message], "_ran": ran})


def _hold_out_to_measure(passes: Sequence[Pass], model: Model, calib: CalibrationSet, seed: int) -> tuple[CalibrationSet, CalibrationSet | None]:
    """Lossy passes at strengths the user set, without --eval: calibration samples split off for the fidelity figures,
    which on the samples a pass fitted on say nothing (prune-channels:ratio=0.0375 refit a keyword model's 32 samples
    and read cosine 1.000000; 128 others read 0.947). Kept whole, as before, when a pass could not fit on the rest or
    there are too few to split: the fidelity line then says the passes fitted on them."""
    try:
        fit, held = calib.hold_out(model)
        PassManager(passes).check_requirements(model, PassContext(calibration=fit, seed=seed))
    except ConfigError:
        return calib, None
    return fit, held


class _DefaultBudgetMissed(Exception):
    """The pipeline as asked missed the default budget: redo the run searching within it."""

    def __init__(self, guard: default_budget_guard.Guard, figures: str, drop: float, ran: tuple[Sequence[Pass], PipelineResult]):
        self.guard = guard
        self.ran: tuple[Sequence[Pass], PipelineResult] | None = ran  # the pipeline that missed and its run, for the search
        shown = "" if "upper bound" in figures else f" (drop {drop:.4f})"  # a bounded labelled figure says its drops
        self.message = (f"{', '.join(guard.passes)} at default strength: {figures} on held-out data"
                        f"{shown} misses the default budget ({guard.describe()}); searching for the strongest "
                        "setting within it (set the strength to run as asked, or give --max-drop / --min-fidelity)")
        super().__init__(self.message)


def _target_presets(passes: list[Pass], target: TargetSpec | None, notes: list[str]) -> list[Pass]:
    """Options that follow the target and this CPU unless the user set them (optc.targets.presets)."""
    from optc.targets.presets import reduce_range_for

    out = []
    for p in passes:
        given = p.options_given
        if p.name == "quantize" and given is not None and "reduce_range" not in given:
            named = str(target.target.get("mcpu")) if target is not None and target.cpu_from_user and target.name == "x86" else None
            preset = reduce_range_for(target.name if target is not None else None, named)
            if preset is not None and preset[0] != p.config.reduce_range:
                replaced = type(p)(dataclasses.replace(p.config, reduce_range=preset[0]))
                replaced.options_given = given
                notes.append(f"quantize: reduce_range={str(preset[0]).lower()} ({preset[1]}; set reduce_range= to choose)")
                p = replaced
        out.append(p)
    return out


def _run(passes, model, ctx, feeds, feeds_source, labelled, guard, run_notes, search_section, searched, digests,  # noqa: PLR0913
         source_path, shapes, outdir, target, tuning, int8_lowering, seed, instruments, verify_each, time_passes,
         dump_after, measure_latency, external_data, data_section) -> CompileResult:
    """The pipeline, its measurements, the report and the files: everything after the checks.

    ``searched``: ``passes`` as a budget search already ran them on ``model`` with ``ctx`` (None: run them here).
    """
    with driver.Staging(outdir) as staging:
        all_instruments: list[Instrument] = list(instruments)
        if time_passes:
            all_instruments.append(TimePasses())
        if dump_after:
            all_instruments.append(DumpAfter(set(dump_after), staging.path / "dumps"))
        # Measure the input model now and let it go when optc loaded it: holding it through
        # the pipeline would cost one more copy of the weights (see benchmarks/ir_scale.py).
        # A small model keeps an onnxruntime session instead, so that the two models'
        # latencies are taken in turns (a shared machine slows both alike).
        in_turns = measure_latency and model.weight_bytes() <= INTERLEAVE_MAX_BYTES
        baseline, feeds, feeds_source = driver.measure_input(model, feeds, feeds_source, labelled, measure_latency and not in_turns)
        if not feeds:
            in_turns, skipped_note = False, f"fidelity, latency{' and --verify-each' if verify_each else ''} {feeds_source}"
            logger.warning(skipped_note)
            run_notes = [*run_notes, skipped_note]
        elif verify_each:
            all_instruments.insert(len(instruments), VerifyEach(feeds[0]))
        baseline_session = make_session(model) if in_turns else None
        # the input model's own float noise, for check_exact, measured while the model is here (it is let go below)
        noise = driver.float_noise(model, feeds, baseline) if feeds and driver.exact_only(passes) else None
        opsets, notes, bound_values = model.opset_imports, list(model.notes), describe_values(model)
        holder = [model]
        del model
        if searched is not None and all(i.display_only for i in all_instruments):
            # The search ran this pipeline on this model and context and measured it within the budget: its run
            # is what running the passes again would give (same bytes, records and stats), without the time.
            # Instruments (verify, timing, dumps, the caller's) are there to see passes run, so with any of
            # them the passes run again; one that only shows progress (the CLI's) is not.
            result = searched
            holder.clear()
        else:
            result = PassManager(passes, all_instruments).run(holder.pop(), ctx)
            if searched is not None and result.model.fingerprint() != searched.model.fingerprint():
                # A pass bounded by time (quantize's fallback) may choose otherwise the second time: the budget
                # held the model the search measured, so that one is written.
                notes.append("the passes ran again for --verify-each / --time-passes / --dump-after and gave another model "
                             "(a fallback bounded by time chose otherwise); the model the budget measured was written, "
                             "and those figures are of the second run")
                result = searched
        notes += run_notes
        # A guarded pass that changed nothing has nothing to hold: its note says why, and no budget line claims it held.
        if guard is not None and not any(r.modified for r in result.records if r.name in guard.passes):
            guard = None
        if guard is not None:
            _, drop, within, figures = guard.check(result.model)
            if not within:
                raise _DefaultBudgetMissed(guard, figures, drop, (passes, result))
            notes.append(f"{', '.join(guard.passes)} at default strength within the default budget ({guard.describe()}): {figures}")
        final = driver.measure(result.model, feeds, labelled, measure_latency and not in_turns and bool(feeds))
        if baseline_session is not None:
            baseline.latency_ms, final.latency_ms = interleaved_latency_ms(
                [baseline_session, make_session(result.model)], feeds[0], blocks=10, runs=20, budget_s=LATENCY_BUDGET_S
            )
            baseline_session = None
        driver.check_finite(baseline, final)
        notes += driver.check_exact(passes, baseline, final, noise)
        evaluation_section = Evaluation.from_dict(
            driver.compare(baseline, final, labelled.inputs.num_samples if labelled else 0, "in turns" if in_turns else "one after the other", feeds_source,
                           feeds)
        )
        warnings = _quality_warnings(evaluation_section, feeds_source) + _size_warnings(result, passes) + _speed_warnings(evaluation_section, passes, result)
        for line in warnings:
            logger.warning(line)
        if search_section is not None:
            _check_budget(search_section)
        report = Report(
            model=ModelInfo(
                source=str(source_path) if source_path is not None else None,
                sha256=digests[0],
                opsets=opsets,
                inputs=tuple(s.describe() for s in result.model.inputs),
                outputs=tuple(s.describe() for s in result.model.outputs),
            ),
            notes=tuple(notes + [n for n in result.model.notes if n not in notes]),
            target=TargetReport(target.name if target is not None else "none"),
            pipeline=tuple(repr(p) for p in passes),
            passes=tuple(PassReport.from_record(r) for r in result.records),
            before=DetailedStats.from_dict(result.initial.to_dict()),
            after=DetailedStats.from_dict(result.final.to_dict()),
            evaluation=evaluation_section,
            versions=driver.versions(),
            seed=seed,
            input_shapes=shapes,
            calibration_files=digests[1],
            evaluation_files=digests[2],
            warnings=tuple(warnings),
            search=search_section,
        )
        files: list[Path] = []
        if staging.path is not None:
            files = save_model(result.model, staging.path / driver.MODEL_NAME, external_data=external_data)
            if target is not None:
                built = _build_target(result.model, target, staging.path, tuning, int8_lowering, seed)
                if measure_latency:
                    built = _time_artifact(built, result.model, target, staging.path, feeds[0]) if feeds else built
                report = dataclasses.replace(report, target=built, notes=(*report.notes, *cpu_notes(target, built)))
                if built.latency and built.latency["ratio"] > SLOWER_WARN:
                    slower = (f"the {target.name} artifact is {built.latency['ratio']:.2f}x slower than onnxruntime on this machine "
                              f"({built.latency['artifact_ms']:.3f} vs {built.latency['onnxruntime_ms']:.3f} ms): onnxruntime serves this model better here")
                    logger.warning(slower)
                    report = dataclasses.replace(report, warnings=(*report.warnings, slower))
                files.append(staging.path / "model.so")
            report.write(staging.path / driver.REPORT_NAME)
            (staging.path / HTML_NAME).write_text(render_html(report.to_dict()))
            files += [staging.path / driver.REPORT_NAME, staging.path / HTML_NAME]
            if target is not None:
                from optc.targets.artifact import write_manifest
                from optc.targets.build import linked_libraries

                tuning_section = dict((report.target.tuning if report.target else None) or {})
                write_manifest(staging.path, result.model, target, linked_libraries(tuning_section))
                files.append(staging.path / "manifest.json")
            # After the manifest: the artifact's manifest covers what `optc run` loads.
            (staging.path / driver.PIPELINE_NAME).write_text(driver.pipeline_document(passes, seed, shapes, data_section, bound_values))
            files.append(staging.path / driver.PIPELINE_NAME)
            staging.publish()
    written = tuple(outdir / f.relative_to(staging.path) for f in files) if outdir is not None and staging.path is not None else ()
    return CompileResult(result.model, report, outdir, written)


def _quality_warnings(evaluation: Evaluation, feeds_source: str) -> list[str]:
    """One line each when the output lost more than a user would accept without being told."""
    out = []
    least, worst = least_fidelity({n: f.to_dict() for n, f in evaluation.fidelity.items()}) if evaluation.fidelity else (None, 1.0)
    if least is not None and not worst >= FIDELITY_WARN:
        change = evaluation.fidelity[least].change_of
        what = f"cosine of what '{least}' adds to '{change}'" if change else "cosine"
        out.append(f"fidelity to the input model is {worst:.4f} ({what}, {evaluation.fidelity_samples} samples of {feeds_source}), "
                   f"below {FIDELITY_WARN}: check accuracy on your data, or give --max-drop / --min-fidelity")
    agreements = {name: f.agreement for name, f in evaluation.fidelity.items() if f.agreement is not None}
    if agreements and not min(agreements.values()) >= FIDELITY_WARN:
        name = min(agreements, key=agreements.__getitem__)
        out.append(f"the argmax of output '{name}' agrees with the input model's at {agreements[name]:.4f} of positions "
                   f"({evaluation.fidelity_samples} samples of {feeds_source}), below {FIDELITY_WARN}: check accuracy on your data, "
                   "or give --max-drop / --metric fidelity")
    acc = evaluation.accuracy
    if acc is not None and acc.delta < -ACCURACY_WARN:
        out.append(f"accuracy fell {-acc.delta * 100:.2f} points ({acc.before * 100:.2f}% -> {acc.after * 100:.2f}%), "
                   f"more than {ACCURACY_WARN * 100:g}: give --max-drop to hold a budget")
    return out


def _speed_warnings(evaluation: Evaluation, passes: Sequence[Pass], result: Any) -> list[str]:
    """One line when lossy passes left the model slower in onnxruntime (QDQ int8 on a CPU whose kernels do not pay).
    None when no lossy pass changed the model: its two timings differ by noise alone (g2p's byte-identical model read
    1.30x and 1.56x slower in two runs, and was told to keep the input model)."""
    latency = evaluation.latency
    changed = {r.name for r in result.records if r.modified}
    if latency is None or not any(not p.exact and p.name in changed for p in passes) or latency.after_ms <= latency.before_ms * SLOWER_WARN:
        return []
    return [f"the compressed model is {latency.after_ms / latency.before_ms:.2f}x slower in onnxruntime on this machine "
            f"({latency.before_ms:.3f} -> {latency.after_ms:.3f} ms, timed {latency.timing}): keep the input model if speed "
            "in onnxruntime is what you need"]


def _size_warnings(result: Any, passes: Sequence[Pass]) -> list[str]:
    """One line when lossy passes left the weights bigger than they came in (a compression that is not one)."""
    before, after = result.initial.param_bytes, result.final.param_bytes
    lossy = [p.name for p in passes if not p.exact]
    if not lossy or after <= before * 1.01:
        return []
    grew = [r.name for r in result.records if r.after.get("bytes", 0) > r.before.get("bytes", 0) * 1.01]
    return [f"the weights grew from {before / 1024:.1f} KiB to {after / 1024:.1f} KiB"
            + (f" ({', '.join(dict.fromkeys(grew))})" if grew else "")
            + ": nothing was compressed in size; keep the input model if size is what you need"]


def _check_budget(section: Mapping[str, Any]) -> None:
    """The pipeline the search chose was measured within the budget; say so loudly if it is not."""
    chosen = section.get("chosen") or {}
    if not chosen.get("feasible", False):
        raise BudgetMissed(f"no pipeline found meets the budget ({section['metric']} drop at most {section['max_drop']:g}); nothing was written")


def _publish_interim(outdir: Path) -> Callable[[Any, Model, list[Pass]], None]:
    """For a search: put each better model into ``outdir`` at once, so a search stopped at any moment leaves its best."""

    def publish(point: Any, model: Model, passes: list[Pass]) -> None:
        with driver.Staging(outdir) as staging:
            assert staging.path is not None
            save_model(model, staging.path / driver.MODEL_NAME)
            (staging.path / "search-best.json").write_text(driver.to_json({"point": point.to_dict(), "pipeline": [repr(p) for p in passes]}, indent=2) + "\n")
            staging.publish()

    return publish


def _data_section(model: Model, *sources: Any) -> dict[str, Any] | None:
    """``pipeline.yaml``'s ``data`` section: the image preprocessing a replay needs, resolved on this model."""
    folder = next((d for d in sources if isinstance(d, ImageFolder)), None)
    return None if folder is None else {"images": folder.preprocess.resolve(model)[0].to_dict()}


def _digests(files: Sequence[Path]) -> tuple[FileDigest, ...]:
    return tuple(FileDigest(str(f), driver.file_digest(f)) for f in files)


def cpu_notes(spec: TargetSpec, built: TargetReport) -> list[str]:
    """What the compile could not do as on the target's CPU (:func:`optc.targets.compare.cpu_notes`)."""
    from optc.targets.compare import cpu_notes as notes

    providers = (built.tuning or {}).get("providers") or {}
    return notes(spec, bool(providers.get("offloaded")), built.latency is not None)


def _time_artifact(built: TargetReport, model: Model, spec: TargetSpec, folder: Path, feeds: Mapping[str, Any]) -> TargetReport:
    """The report's target section with the artifact timed against onnxruntime, where this machine runs it."""
    from optc.targets.compare import artifact_vs_onnxruntime, runs_here

    if not runs_here(spec):
        return built
    return dataclasses.replace(built, latency=artifact_vs_onnxruntime(model, folder / "model.so", feeds))


def _build_target(model: Model, spec: TargetSpec, folder: Path, tuning: TuningOptions, int8: bool, seed: int) -> TargetReport:
    """Build and export the TVM library into ``folder``; returns the report's target section."""
    from optc.targets.build import build, export, linked_libraries, own_kernels
    from optc.targets.tuning import TuneOptions, default_tuning_db

    tune = TuneOptions(
        tuning.trials_per_task, tuning.database or default_tuning_db(), tuning.rpc_tracker, tuning.rpc_key, seed,
        prepack=tuning.weight_prepack, kernels=tuning.kernels, on_progress=tuning.on_progress,
    )
    start = time.perf_counter()
    executable, summary = build(model, spec, tune, int8=int8)
    int8_section = summary.pop("int8", None)
    lowered = summary.pop("lowered", None)
    built = time.perf_counter()
    export(executable, folder / "model.so", spec, linked_libraries(summary), own_kernels(summary))
    return TargetReport.from_dict({
        **spec.to_dict(), "build_seconds": built - start, "export_seconds": time.perf_counter() - built,
        "tuning": {**summary, "db": str(tune.db_dir)}, "int8": int8_section, "lowered": lowered or None,
    })
