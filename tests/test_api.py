"""The typed library API: the same compile as the CLI, from objects; replayable runs."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import SAMPLE

import optc
from optc import api
from optc.api import CalibrationSet, LabelledSet, Report, load_model, make_pass, named_pipeline
from optc.cli.main import cli
from optc.errors import ConfigError
from optc.passes import parse_pass_spec, registered_passes
from optc.passes.prune.prune_channels import PruneChannels, PruneChannelsConfig

HEADLINE = ["--pass", "canonicalize", "--pass", "prune-channels:ratio=0.3", "--pass", "quantize"]


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def without_timings(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    for record in report["passes"]:
        record.pop("seconds")
    report["evaluation"].pop("latency_ms", None)
    return report


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, *HEADLINE, "--calib", SAMPLE / "calib.npz", "--eval", SAMPLE / "test.npz", "--no-latency")
    assert res.exit_code == 0, res.output
    return out


@pytest.mark.slow
def test_compile_from_objects_equals_the_cli(cli_output, tmp_path):
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    result = api.compile(
        model,
        [*named_pipeline("canonicalize"), PruneChannels(PruneChannelsConfig(ratio=0.3)), make_pass("quantize")],
        calibration=CalibrationSet.from_path(SAMPLE / "calib.npz", model),
        evaluation=LabelledSet.from_path(SAMPLE / "test.npz", model),
        output=tmp_path / "api",
        measure_latency=False,
    )
    assert (tmp_path / "api" / "model.onnx").read_bytes() == (cli_output / "model.onnx").read_bytes()
    cli_report = json.loads((cli_output / "report.json").read_text())
    assert without_timings(result.report.to_dict()) == without_timings(cli_report)
    assert json.loads((tmp_path / "api" / "report.json").read_text()) == result.report.to_dict()
    # Typed: one schema for sizes (param_bytes everywhere), sections as attributes.
    report = result.report
    assert report.passes[-1].name == "quantize" and report.passes[-1].after.param_bytes == report.after.param_bytes
    assert report.before.param_bytes == report.passes[0].before.param_bytes > report.after.param_bytes
    assert report.evaluation.accuracy is not None and report.evaluation.accuracy.samples == 1000
    assert report.evaluation.latency is None and report.target.name == "none"
    assert {"model.onnx", "report.json", "pipeline.yaml"} <= {f.name for f in result.files} and all(f.is_file() for f in result.files)
    assert result.model.op_histogram()["QuantizeLinear"] > 0
    # report.json loads back into the same types.
    assert Report.from_dict(cli_report).to_dict() == cli_report


def test_report_records_versions_and_input_digests(tmp_path):
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--pass", "fold-batchnorm", "--calib", SAMPLE / "calib.npz",
                 "--eval", SAMPLE / "test.npz", "--no-latency")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report["versions"]) == {"optc", "python", "onnx", "onnxruntime", "tvm"}
    assert report["versions"]["optc"] == report["optc_version"] == optc.__version__ and report["versions"]["onnx"]

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert report["model"]["sha256"] == sha(SAMPLE / "mnist_cnn.onnx")
    assert report["data"]["calibration"] == [{"path": str(SAMPLE / "calib.npz"), "sha256": sha(SAMPLE / "calib.npz")}]
    assert report["data"]["evaluation"] == [{"path": str(SAMPLE / "test.npz"), "sha256": sha(SAMPLE / "test.npz")}]
    assert report["seed"] == 0 and report["input_shapes"] == {}


def _replay(output: Path, out: Path) -> None:
    """``output``'s pipeline.yaml replayed on the sample with its calibration data into ``out``, which must write
    the same model.onnx. In a fresh process: passes remember results within one (prune-channels' AnalysisCache),
    and a replay that read them would not show that the passes are deterministic."""
    res = subprocess.run([sys.executable, "-m", "optc.cli.main", "compile", str(SAMPLE / "mnist_cnn.onnx"), "--pipeline",
                          str(output / "pipeline.yaml"), "--calib", str(SAMPLE / "calib.npz"), "-o", str(out), "--no-latency"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (out / "model.onnx").read_bytes() == (output / "model.onnx").read_bytes()


@pytest.mark.slow
def test_pipeline_yaml_replays_the_same_model(cli_output, tmp_path):
    out = tmp_path / "replay"
    _replay(cli_output, out)
    first = json.loads((cli_output / "report.json").read_text())
    again = json.loads((out / "report.json").read_text())
    assert again["pipeline"] == first["pipeline"] and [p["options"] for p in again["passes"]] == [p["options"] for p in first["passes"]]


@pytest.mark.slow
def test_report_pipeline_strings_are_valid_pass_values(cli_output):
    """The pipeline in report.json, given back as --pass values, is the same pipeline."""
    pipeline = json.loads((cli_output / "report.json").read_text())["pipeline"]
    replayed = [p for spec in pipeline for p in parse_pass_spec(spec)]
    assert [repr(p) for p in replayed] == pipeline


@pytest.mark.slow
def test_pipeline_yaml_replays_a_run_that_held_calibration_samples_out(tmp_path):
    """Without --eval the default budget holds the last quarter of --calib out and passes fit on the rest; the
    replay, whose strengths are written (so no budget applies), fits on the same samples and gives the same bytes."""
    first = tmp_path / "first"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", first, "--pass", "canonicalize", "--pass", "quantize",
                 "--calib", SAMPLE / "calib.npz", "--no-latency")
    assert res.exit_code == 0, res.output
    from optc.driver import read_pipeline_file

    assert read_pipeline_file(first / "pipeline.yaml").held_out == 64 and "held_out: 64" in (first / "pipeline.yaml").read_text()
    again = tmp_path / "again"
    _replay(first, again)
    assert read_pipeline_file(again / "pipeline.yaml").held_out == 64  # and a replay of the replay does the same

    # What the file cannot mean is refused in one line, before any work.
    for value, message in (("-1", "data.held_out must be a number of samples (0: none)"), ("100000", "cannot hold the last 100000 out")):
        bad = tmp_path / f"bad{value}.yaml"
        bad.write_text((first / "pipeline.yaml").read_text().replace("held_out: 64", f"held_out: {value}"))
        res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / f"out{value}", "--pipeline", bad,
                     "--calib", SAMPLE / "calib.npz", "--no-latency")
        assert res.exit_code == 2 and message in res.output and not (tmp_path / f"out{value}").exists(), res.output


@pytest.mark.slow
def test_lossy_passes_at_strengths_set_are_measured_on_samples_they_did_not_fit(tmp_path):
    """Without --eval the fidelity line read the calibration samples a pass fitted on: prune-channels:ratio=0.0375 refit
    a keyword model's 32 samples and read cosine 1.000000 where 128 others read 0.947. A quarter is held out now; a
    replay of the run fits on the same samples, and one that held none out (0) holds none out again."""
    from optc.driver import read_pipeline_file

    first = tmp_path / "first"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", first, "--pass", "prune-channels:ratio=0.5",
                 "--calib", SAMPLE / "calib.npz", "--no-latency")
    assert res.exit_code == 0, res.output
    assert "held-out calibration data, which no pass fitted on" in " ".join(res.output.split())
    assert read_pipeline_file(first / "pipeline.yaml").held_out == 64
    _replay(first, tmp_path / "again")
    whole = tmp_path / "whole"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", whole, "--pass", "prune-channels:ratio=0.5", "--calib", SAMPLE / "calib.npz",
                 "--eval", SAMPLE / "test.npz", "--no-latency")
    assert res.exit_code == 0, res.output
    assert read_pipeline_file(whole / "pipeline.yaml").held_out == 0  # --eval measured it: every sample fitted
    _replay(whole, tmp_path / "whole_again")


def test_pipeline_yaml_records_seed_and_frozen_shapes(tmp_path):
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=4x1x28x28", "--seed", "7", "--no-latency",
                 "--pass", "fold-batchnorm")
    assert res.exit_code == 0, res.output
    from optc.driver import read_pipeline_file

    recorded = read_pipeline_file(out / "pipeline.yaml")
    assert recorded.seed == 7 and recorded.input_shapes == {"input": (4, 1, 28, 28)}
    assert [repr(p) for p in recorded.passes] == ["fold-batchnorm"]
    report = json.loads((out / "report.json").read_text())
    assert report["seed"] == 7 and report["input_shapes"] == {"input": [4, 1, 28, 28]}
    # --seed and --input-shape given with --pipeline win over the file's.
    again = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "again", "--pipeline", out / "pipeline.yaml", "--seed", "3", "--no-latency", "--json")
    assert json.loads(again.output)["seed"] == 3 and json.loads(again.output)["input_shapes"] == {"input": [4, 1, 28, 28]}


def _list_fields(cls) -> list[str]:
    hints = typing.get_type_hints(cls.config_class)
    return [f.name for f in dataclasses.fields(cls.config_class) if typing.get_origin(hints[f.name]) in (tuple, list)]


def _non_default_lists(name: str, cls) -> list[dict]:
    """Option sets changing each list option: two items, one item, empty."""
    variants = []
    for field_name in _list_fields(cls):
        default = tuple(getattr(cls().config, field_name))
        for value in (("node_a", "node_b"), default[::-1], default[:1], ()):
            try:
                make_pass(name, {field_name: value})
            except ConfigError:
                continue  # not a value this option allows (a list of known rule names)
            variants.append({field_name: value})
    return variants


@pytest.mark.parametrize("name", list(registered_passes()))
def test_every_pass_repr_parses_back_to_the_same_pass(name):
    cls = registered_passes()[name]
    configured = [cls()] + [make_pass(name, options) for options in _non_default_lists(name, cls)]
    for p in configured:
        (back,) = parse_pass_spec(repr(p))
        assert type(back) is cls and back.config == p.config, repr(p)
        assert repr(back) == repr(p)


def test_list_options_round_trip_in_particular():
    p = make_pass("prune-channels", {"exclude": ("conv1", "conv2")})
    assert "exclude=conv1|conv2" in repr(p)
    assert parse_pass_spec(repr(make_pass("prune-channels")))[0].config.exclude == ()
    q = make_pass("quantize", {"op_types": ()})
    assert parse_pass_spec(repr(q))[0].config.op_types == ()  # empty, not the default


def test_compile_without_output_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = api.compile(SAMPLE / "mnist_cnn.onnx", [make_pass("fold-batchnorm")], measure_latency=False)
    assert result.output is None and result.files == () and list(tmp_path.iterdir()) == []
    assert result.report.pipeline == ("fold-batchnorm",) and result.report.passes[0].modified
    assert result.report.model.source == str(SAMPLE / "mnist_cnn.onnx")
    none = api.compile(SAMPLE / "mnist_cnn.onnx", [], measure_latency=False)
    assert none.report.passes == () and math.isclose(none.report.evaluation.fidelity["logits"].max_abs, 0.0)


def test_data_opened_on_other_input_shapes_is_refused():
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    with pytest.raises(ConfigError, match="calibration set was opened on inputs"):
        api.compile(model, [make_pass("fold-batchnorm")], calibration=calib, input_shapes={"input": [1, 1, 28, 28]}, measure_latency=False)
    # A path is opened on the model as compiled.
    result = api.compile(model, [make_pass("fold-batchnorm")], calibration=SAMPLE / "calib.npz", input_shapes={"input": [1, 1, 28, 28]},
                         measure_latency=False)
    assert result.report.model.inputs == ("input: float32 [1x1x28x28]",)
    assert load_model(SAMPLE / "mnist_cnn.onnx").inputs == model.inputs  # the caller's model is not frozen


def test_package_root_exports():
    assert optc.compile_model is api.compile and optc.CompileResult is api.CompileResult and optc.Report is api.Report
    with pytest.raises(AttributeError):
        optc.no_such_name  # noqa: B018


def test_options_are_checked_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="--tune-trials must be 0 or more"):
        api.TuningOptions(trials_per_task=-1)
    with pytest.raises(ConfigError, match="go together"):
        api.TuningOptions(rpc_tracker="127.0.0.1:9190")
    with pytest.raises(ConfigError, match="--dump-after quantize: not in the pipeline"):
        api.compile(SAMPLE / "mnist_cnn.onnx", [make_pass("fold-batchnorm")], dump_after=["quantize"], output=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    assert api.default_output("models/resnet.onnx") == Path("models/resnet.optc")
