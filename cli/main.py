"""The ``optc`` command line: argument parsing and rendering only.

Exit codes: 0 success, 2 bad input or usage (one line on stderr, no
traceback unless --debug), 1 internal error.
"""
from __future__ import annotations

import json
import logging
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
            ctx.exit(EXIT_BAD_INPUT)
        except KeyboardInterrupt:
            click.echo("optc: interrupted", err=True)
            ctx.exit(130)
        except Exception as exc:  # a bug: say so, keep it to one line
            if debug:
                raise
            click.echo(f"optc: internal error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)", err=True)
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
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=Path), help="Output folder (model.onnx, report.json).")
@click.option("--pass", "passes", multiple=True, metavar="NAME[:k=v,...]", help="A pass to run, in order; repeatable. See `optc passes`.")
@click.option("--pipeline", "pipeline_file", type=click.Path(path_type=Path), help="A YAML or TOML file listing the passes.")
@click.option("--calib", type=click.Path(path_type=Path), help=".npz (arrays keyed by input name, samples first) or a folder of them.")
@click.option("--eval", "eval_data", type=click.Path(path_type=Path), help=".npz with the inputs and a 'label' array: accuracy before/after.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...", help="Freeze an input's dynamic dims; repeatable.")
@click.option("--target", type=click.Choice(["none", "x86", "arm", "gpu"]), default="none", show_default=True, help="Compile with TVM for this target (none: passes only).")
@click.option("--cpu", help="x86: LLVM CPU name (default: this machine's).")
@click.option("--arch", help="gpu: CUDA arch, e.g. sm_80 (default) or sm_90.")
@click.option("--tune-trials", default=0, show_default=True, help="MetaSchedule trials per task the tuning database lacks (x86/arm); 0 compiles with what the database holds.")
@click.option("--tuning-db", type=click.Path(path_type=Path), help="Tuning database folder (default: ~/.cache/optc/tuning).")
@click.option("--rpc-tracker", metavar="HOST:PORT", help="Measure tuning candidates on boards registered with this TVM RPC tracker.")
@click.option("--rpc-key", metavar="KEY", help="Device key of the boards at the RPC tracker.")
@click.option("--weight-prepack/--no-weight-prepack", default=True, show_default=True, help="Let tuned kernels store weights in the layout their loops read (packed at compile time).")
@click.option("--int8-lowering/--no-int8-lowering", default=True, show_default=True, help="Compile int8 QDQ regions to integer conv2d/matmul (int32 accumulation) instead of float.")
@click.option("--verify-each", is_flag=True, help="Check the model and compare with onnxruntime after every pass.")
@click.option("--time-passes", is_flag=True, help="Show the wall time of each pass.")
@click.option("--dump-after", multiple=True, metavar="PASS", help="Save the model after this pass (or 'all') into OUTDIR/dumps.")
@click.option("--no-latency", is_flag=True, help="Skip the onnxruntime latency measurement.")
@click.option("--external-data/--no-external-data", default=None, help="Store weights beside the model (default: only above 1.8 GB).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def compile_cmd(model: Path, outdir: Path, passes, pipeline_file, calib, eval_data, input_shapes, target, cpu, arch, tune_trials, tuning_db, rpc_tracker, rpc_key, weight_prepack, int8_lowering, verify_each, time_passes, dump_after, no_latency, external_data, as_json) -> None:
    """Run a pass pipeline on MODEL and write the result to OUTDIR."""
    from optc.cli.progress import ProgressInstrument, TuningView, original_stderr
    from optc.cli.render import render_compile_report
    from optc.driver import CompileOptions, build_pipeline, compile_model

    opts = CompileOptions(
        model=model,
        outdir=outdir,
        passes=tuple(passes),
        pipeline_file=pipeline_file,
        calib=calib,
        eval_data=eval_data,
        input_shapes=tuple(input_shapes),
        target=target,
        cpu=cpu,
        arch=arch,
        tune_trials=tune_trials,
        tuning_db=tuning_db,
        rpc_tracker=rpc_tracker,
        rpc_key=rpc_key,
        int8_lowering=int8_lowering,
        weight_prepack=weight_prepack,
        verify_each=verify_each,
        time_passes=time_passes,
        dump_after=tuple(dump_after),
        measure_latency=not no_latency,
        external_data=external_data,
    )
    err = Console(stderr=True)
    instruments = []
    if err.is_terminal and not as_json:
        instruments.append(ProgressInstrument(err, len(build_pipeline(opts.passes, opts.pipeline_file))))
    tuning_view = TuningView(original_stderr(), err.is_terminal) if target != "none" and tune_trials > 0 else None
    try:
        result = compile_model(opts, instruments, tuning_view)
    finally:
        if tuning_view is not None:
            tuning_view.close()
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
        return
    out = Console(width=max(Console().width, 120))
    render_compile_report(result.report, out, show_time=time_passes)
    out.print(f"wrote {', '.join(str(f) for f in result.files)}")


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDx...", help="Freeze an input's dynamic dims; repeatable.")
@click.option("--no-tvm", is_flag=True, help="Skip asking TVM's frontend which ops it can import.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
def inspect_cmd(model: Path, input_shapes, no_tvm: bool, as_json: bool) -> None:
    """Show MODEL's interface, opsets, ops, size, MACs and what blocks compilation."""
    from optc.cli.render import render_inspect
    from optc.driver import inspect_model

    info = inspect_model(model, tuple(input_shapes), check_frontend=not no_tvm)
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
            f"tvm {result['tvm_ms']:.3f} ms, onnxruntime {result['ort_ms']:.3f} ms (median of {result['repeats']}), "
            f"ratio tvm/ort {result['ratio']:.2f}; max |Δ| {result['max_abs_diff']:.2e}"
        )


def main() -> None:
    cli(prog_name="optc")


if __name__ == "__main__":
    main()
