"""The ``optc`` command line: argument parsing and rendering only.

Exit codes: 0 success, 2 bad input or usage (one line on stderr, no
traceback unless --debug), 1 internal error.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from optc import __version__
from optc.errors import OptcError

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 1


class OptcGroup(click.Group):
    """Turns optc errors into one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except OptcError as exc:
            if debug:
                raise
            click.echo(f"optc: error: {_one_line(exc)}", err=True)
            ctx.exit(getattr(exc, "exit_code", EXIT_BAD_INPUT))  # 3: an accuracy budget missed
        except KeyboardInterrupt as exc:  # optc.driver.Interrupted for SIGTERM and SIGHUP; the output folder is untouched
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo(f"optc: interrupted ({signal.Signals(signum).name})", err=True)
            ctx.exit(128 + signum)
        except Exception as exc:  # a bug: say so, keep it to one line
            if debug:
                raise
            click.echo(f"optc: internal error: {type(exc).__name__}: {_one_line(exc)} (rerun as `optc --debug {ctx.invoked_subcommand or 'COMMAND'} ...` for the traceback)", err=True)
            ctx.exit(EXIT_INTERNAL)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 600 else text[:597] + "..."


@click.group(cls=OptcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="optc")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(debug: bool, verbose: bool) -> None:
    """optc: compress ONNX models with graph-rewriting passes, then compile them."""
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormat("%(name)s: %(message)s" if debug else "%(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class _LogFormat(logging.Formatter):
    """``optc: warning: ...``, like the error lines (with --debug, the logger's name too)."""

    def format(self, record: logging.LogRecord) -> str:
        return f"optc: {record.levelname.lower()}: {super().format(record)}"


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outdir", type=click.Path(path_type=Path),
              help="Output folder (model.onnx, report.json, pipeline.yaml); default: <MODEL's folder>/<MODEL's stem>.optc.")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="A pass to run, in order; repeatable. See `optc passes`.")
@click.option("--pipeline", "pipeline_file", type=click.Path(path_type=Path),
              help="A YAML or TOML file listing the passes (an output's pipeline.yaml replays that run).")
@click.option("--calib", type=click.Path(path_type=Path), help=".npz (arrays keyed by input name, samples first), a folder of them, or a folder of images (with data.images in --pipeline).")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help=".npz with the inputs and a 'label' array, or image folders per class (with data.images in --pipeline): accuracy before/after.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...", help="Freeze an input's dynamic dims; repeatable.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V[,V...]", help="Bind an input to a constant (a setting such as a sample rate: sr=16000); what it decides folds away and the artifact no longer takes it; repeatable.")
@click.option("--seed", type=int, help="Seed for sample inputs and tuning (default: the --pipeline file's, else 0).")
@click.option("--target", type=click.Choice(["none", "x86", "arm", "gpu"]), default="none", show_default=True,
              help="Compile with TVM for this target (none: passes only); a dynamic batch dim is frozen to 1.")
@click.option("--cpu", help="LLVM CPU name. x86: default this machine's; arm: the board's (default a generic Armv8-A with NEON; a core with dot products, such as cortex-a55/a76 or neoverse-n1, gets sdot int8 kernels).")
@click.option("--arch", help="gpu: CUDA arch, e.g. sm_80 (default) or sm_90.")
@click.option("--tune-trials", default=0, show_default=True, help="MetaSchedule trials per task the tuning database lacks (x86/arm); 0 compiles with what the database holds.")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="Tuning database folder (default: ~/.cache/optc/tuning).")
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Measure tuning candidates on boards registered with this TVM RPC tracker.")
@click.option("--rpc-key", metavar="KEY", help="Device key of the boards at the RPC tracker.")
@click.option("--default-budget/--no-default-budget", default=True, show_default=True, help="Hold lossy passes left at their default strength to one point of --eval's metric (else output cosine 0.99, and argmax agreement 0.99 on outputs holding class scores, on held-out calibration samples); a default that misses is scaled down.")
@click.option("--kernels", type=click.Choice(["auto", "tvm", "onednn"]), default="auto", show_default=True, help="Who computes convolutions and matmuls: auto measures oneDNN against TVM's kernel per op on x86 and keeps the faster (without oneDNN, or on a board behind --rpc-tracker, optc's Winograd kernels race TVM's for 3x3 convolutions; for arm a cost model of the board chooses them); tvm never offloads.")
@click.option("--weight-prepack/--no-weight-prepack", default=True, show_default=True, help="Let tuned kernels store weights in the layout their loops read (packed at compile time).")
@click.option("--int8-lowering/--no-int8-lowering", default=True, show_default=True, help="Compile int8 QDQ regions to integer conv2d/matmul (int32 accumulation) instead of float.")
@click.option("--verify-each", is_flag=True, help="Check the model and compare with onnxruntime after every pass.")
@click.option("--time-passes", is_flag=True, help="Show the wall time of each pass.")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Save the model after this pass (or 'all') into OUTDIR/dumps.")
@click.option("--no-latency", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option("--external-data/--no-external-data", default=None, help="Store weights beside the model (default: only above 1.8 GB).")
@click.option("--metric", metavar="NAME|FILE.py:FUNC", help="The budget's metric on --eval: top1 (default), top5, cosine, fidelity (cosine and argmax agreement), or your function f(outputs, labels) -> float.")
@click.option("--max-drop", type=float, help="Largest drop of --metric from the input model the run may accept (0.01: one point); lossy passes take the most that stays within it. Exit 3 when missed.")
@click.option("--min-fidelity", type=float, help="Floor of the mean cosine to the input model's outputs on --eval (instead of --max-drop).")
@click.option("--time-budget", type=float, metavar="SECONDS", help="With a budget: search per-pass strengths for the best --objective for this long; the best model so far is always in OUTDIR.")
@click.option("--objective", type=click.Choice(["size", "macs", "latency"]), default="size", show_default=True, help="What --time-budget minimises (latency: onnxruntime on this machine).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def compile_cmd(model: Path, outdir: Path | None, passes, pipeline_file, calib, eval_data, input_shapes, input_values, seed, target, cpu, arch, tune_trials, tuning_db, rpc_tracker, rpc_key, default_budget, kernels, weight_prepack, int8_lowering, verify_each, time_passes, dump_after, no_latency, external_data, metric, max_drop, min_fidelity, time_budget, objective, as_json) -> None:
    """Run a pass pipeline on MODEL and write the result to an output folder (-o)."""
    from rich.markup import escape

    from optc import api
    from optc.cli.progress import ProgressInstrument, TuningView, original_stderr
    from optc.cli.render import render_compile_report
    from optc import progress
    from optc.data.images import holds_images
    from optc.driver import MAX_SEED, parse_shape_spec, read_pipeline_file
    from optc.errors import ConfigError
    from optc.ir.bind import parse_value_spec
    from optc.passes import parse_pass_specs

    # Strings become objects here; everything else is optc.api.compile, as for library users.
    pipeline = read_pipeline_file(pipeline_file) if pipeline_file is not None else None
    pass_list = (pipeline.passes if pipeline else []) + parse_pass_specs(list(passes))
    pass_list = pass_list or api.named_pipeline("canonicalize")
    shapes = dict(pipeline.input_shapes) if pipeline else {}
    shapes.update(parse_shape_spec(s) for s in input_shapes)
    values = dict(pipeline.input_values) if pipeline else {}
    values.update(parse_value_spec(s) for s in input_values)
    if seed is None:
        seed = pipeline.seed if pipeline is not None and pipeline.seed is not None else 0
    elif not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed}: must be from 0 to {MAX_SEED}")
    images = pipeline.images if pipeline is not None else None
    calib, eval_data = (api.ImageFolder(d, images) if images is not None and d is not None and holds_images(d) else d
                        for d in (calib, eval_data))
    budget = api.BudgetSpec(metric=metric, max_drop=max_drop, min_fidelity=min_fidelity, time_budget_s=time_budget, objective=objective)
    tuning = api.TuningOptions(trials_per_task=tune_trials, database=tuning_db, rpc_tracker=rpc_tracker, rpc_key=rpc_key, weight_prepack=weight_prepack, kernels=kernels)
    spec = api.make_target(target, cpu=cpu, arch=arch) if target != "none" else None
    err = Console(stderr=True)
    # Off a terminal (a CI log) progress lines go to stderr even with --json: stdout stays JSON.
    shown = ProgressInstrument(err, len(pass_list)) if not (err.is_terminal and as_json) else None
    instruments = [shown] if shown is not None else []
    tuning_view = TuningView(original_stderr(), err.is_terminal) if spec is not None and tune_trials > 0 else None
    if tuning_view is not None:
        tuning = dataclasses.replace(tuning, on_progress=tuning_view)
    try:
        with progress.reporting_to(shown.step if shown is not None else lambda *_: None):
            result = api.compile(
                model,
                pass_list,
                calibration=calib,
                evaluation=eval_data,
                target=spec,
                input_shapes=shapes,
                input_values=values,
                output=outdir if outdir is not None else api.default_output(model),
                instruments=instruments,
                seed=seed,
                tuning=tuning,
                int8_lowering=int8_lowering,
                verify_each=verify_each,
                time_passes=time_passes,
                dump_after=dump_after,
                measure_latency=not no_latency,
                external_data=external_data,
                budget=budget,
                default_budget=default_budget,
                held_out=pipeline.held_out if pipeline is not None else None,
            )
    finally:
        if tuning_view is not None:
            tuning_view.close()
        if shown is not None:
            shown.close()
    report = result.report.to_dict()
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    out = Console(width=max(Console().width, 120))
    render_compile_report(report, out, show_time=time_passes)
    out.print(f"wrote {escape(', '.join(str(f) for f in result.files))}")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...", help="Freeze an input's dynamic dims; repeatable.")
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V[,V...]", help="Bind an input to a constant, as compile does; repeatable.")
@click.option("--no-tvm", is_flag=True, help="Skip asking TVM's frontend which ops it can import.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def inspect_cmd(model: Path, input_shapes, input_values, no_tvm: bool, as_json: bool) -> None:
    """Show MODEL's interface, opsets, ops, size, MACs and what blocks compilation."""
    from optc.cli.render import render_inspect
    from optc.driver import inspect_model

    info = inspect_model(model, tuple(input_shapes), check_frontend=not no_tvm, value_specs=tuple(input_values))
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
    else:
        render_inspect(info, Console(width=max(Console().width, 100)))


@cli.command("passes")
@click.option("--describe", "name", metavar="NAME", help="Show one pass in full.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def passes_cmd(name: str | None, as_json: bool) -> None:
    """List the registered passes with their options."""
    from optc.cli.render import render_passes
    from optc.passes.framework import pass_class, registered_passes
    from optc.passes.framework.options import option_docs
    from optc.passes.framework.pipeline import NAMED_PIPELINES

    classes = {name: pass_class(name)} if name else registered_passes()
    described = []
    for pname, cls in classes.items():
        doc = (cls.__doc__ or "").strip()
        module_doc = (sys.modules[cls.__module__].__doc__ or "").strip()
        described.append({
            "name": pname,
            "summary": doc.splitlines()[0] if doc else "",
            "doc": module_doc if name else "",
            "exact": cls.exact,
            "requires": [r.value for r in cls.requires],
            "options": option_docs(cls.config_class),
        })
    if as_json:
        click.echo(json.dumps({"passes": described, "pipelines": {k: list(v) for k, v in NAMED_PIPELINES.items()}}, indent=2, default=str))
        return
    console = Console()
    render_passes(described, console)
    if name:
        console.print()
        console.print(described[0]["doc"])
    else:
        for pipe, members in NAMED_PIPELINES.items():
            console.print(f"[bold]{pipe}[/bold]  (pipeline) {' -> '.join(members)}")


@cli.command("run")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILE.npy", help="An input array; repeatable.")
@click.option("--output", type=click.Path(path_type=Path), help="Write the outputs to this .npz.")
def run_cmd(artifact: Path, inputs, output: Path | None) -> None:
    """Run a compiled ARTIFACT folder (its hashes are checked before it is loaded)."""
    from optc.targets.artifact import run_artifact_files

    for line in run_artifact_files(artifact, inputs, output):
        click.echo(line)


@cli.command("bench")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--repeats", default=50, show_default=True, help="Timed runs of each.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def bench_cmd(artifact: Path, repeats: int, as_json: bool) -> None:
    """Median latency of ARTIFACT and of onnxruntime on its model.onnx, same inputs."""
    from optc.targets.bench import bench_artifact

    result = bench_artifact(artifact, repeats=repeats)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(
            f"tvm {result['tvm_ms']:.3f} ms, onnxruntime {result['ort_ms']:.3f} ms (lowest block median, {result['blocks']} blocks in turns), "
            f"ratio tvm/ort {result['ratio']:.2f}; max |Δ| {result['max_abs_diff']:.2e}"
        )


def main() -> None:
    """The ``optc`` entry point: click's usage errors become one ``optc: error:`` line too (exit 2)."""
    try:
        code = cli.main(prog_name="optc", standalone_mode=False)
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        click.echo(f"optc: error: {_one_line(exc.format_message())}{where}", err=True)
        sys.exit(EXIT_BAD_INPUT)
    except click.ClickException as exc:
        click.echo(f"optc: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("optc: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
