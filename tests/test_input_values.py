"""Inputs bound to constants (``--input-value``): the model loses the input, the If it decides folds away, and data
that still holds the input is checked against the value."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from helpers import ort_run
from optc.cli.main import cli
from optc.ir import load_model
from optc.ir.bind import bind_inputs
from test_branches import _feeds, run_checked, vad_like


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def _reference(path, rate: int, n: int = 3) -> tuple[dict, dict]:
    feeds = _feeds(n, rate)
    want = ort_run(onnx.load(path), feeds)
    return {k: v for k, v in feeds.items() if k != "sr"}, want


@pytest.mark.parametrize("rate", [16000, 8000])
def test_a_bound_input_becomes_a_constant_and_its_ifs_fold_away(tmp_path, rate):
    path = vad_like(tmp_path, nested=True)  # an If on sr == 16000, and in its 16 kHz body an If on sr < 20000
    out = tmp_path / "out"
    res = invoke("compile", path, "-o", out, "--input-value", f"sr={rate}", "--input-shape", "x=3x32", "--input-shape", "state=2x3x16",
                 "--no-latency")
    assert res.exit_code == 0, res.output
    proto = onnx.load(out / "model.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["x", "state"]
    assert "If" not in {n.op_type for n in proto.graph.node}
    feeds, want = _reference(path, rate)
    got = ort_run(proto, feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6, atol=1e-6)
    notes = json.loads((out / "report.json").read_text())["notes"]
    assert any(f"'sr' bound to {rate}" in n for n in notes), notes
    assert sum("replaces it" in n for n in notes) == (2 if rate == 16000 else 1), notes  # the nested If too, on 16 kHz
    document = yaml.safe_load((out / "pipeline.yaml").read_text())
    assert document["input_values"] == {"sr": rate}
    again = tmp_path / "again"  # the recorded value replays
    res = invoke("compile", path, "-o", again, "--pipeline", out / "pipeline.yaml", "--no-latency")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(ort_run(onnx.load(again / "model.onnx"), feeds)["y"], want["y"], rtol=1e-6, atol=1e-6)


def test_data_holding_a_bound_input_must_hold_its_value(tmp_path):
    path = vad_like(tmp_path)
    feeds = _feeds(8, 16000)
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, x=feeds["x"], state=feeds["state"], sr=np.full(8, 16000, np.int64))
    np.savez(bad, x=feeds["x"], state=feeds["state"], sr=np.array([16000] * 7 + [8000], np.int64))
    common = ["--input-value", "sr=16000", "--input-shape", "x=8x32", "--input-shape", "state=2x8x16", "--no-latency"]
    res = invoke("compile", path, "-o", tmp_path / "ok", "--calib", good, *common)
    assert res.exit_code == 0, res.output
    res = invoke("compile", path, "-o", tmp_path / "no", "--calib", bad, *common)
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1 and "bound to 16000" in res.output and "8000" in res.output, res.output
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(("spec", "says"), [
    ("rate=16000", "the model's inputs are"),
    ("sr=16k", "not an integer"),
    ("sr=1.5", "not an integer"),
    ("sr=99999999999999999999", "does not fit"),
    ("sr=", "expected NAME=VALUE"),
    ("=5", "expected NAME=VALUE"),
    ("sr=1,2", "2 values"),
    ("x=1", "not static"),
])
def test_a_bad_input_value_is_one_line_and_exit_2(tmp_path, spec, says):
    path = vad_like(tmp_path)
    res = invoke("compile", path, "-o", tmp_path / "out", "--input-value", spec, "--no-latency")
    assert res.exit_code == 2, res.output
    assert len(res.output.strip().splitlines()) == 1 and says in res.output, res.output
    assert not (tmp_path / "out").exists()


def test_fold_constants_inlines_an_if_whose_condition_folds(tmp_path):
    """Held to the rewrite contract: a model whose sr is a constant loses both Ifs, outputs unchanged."""
    model = load_model(vad_like(tmp_path, nested=True))
    proto = model.proto
    sr = next(vi for vi in proto.graph.input if vi.name == "sr")
    proto.graph.input.remove(sr)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(16000, np.int64), "sr"))
    result = run_checked("fold-constants", model)
    assert result.modified and "If" not in {n.op_type for n in result.model.graph.node}
    feeds, want = _reference(vad_like(tmp_path, nested=True), 16000)
    np.testing.assert_allclose(ort_run(result.model.proto, feeds)["y"], want["y"], rtol=1e-6, atol=1e-6)


def test_binding_from_python_checks_feeds_too(tmp_path):
    """optc.api.compile(input_values=...) and an iterable of feeds that still carries the bound input."""
    from optc import api

    path = vad_like(tmp_path)
    feeds = [_feeds(1, 16000, seed=s) for s in range(4)]
    result = api.compile(path, input_values={"sr": 16000}, input_shapes={"x": [1, 32], "state": [2, 1, 16]},
                         calibration=feeds, measure_latency=False)
    assert [s.name for s in result.model.inputs] == ["x", "state"]
    with pytest.raises(Exception, match="bound to 16000"):
        api.compile(path, input_values={"sr": 16000}, input_shapes={"x": [1, 32], "state": [2, 1, 16]},
                    calibration=[_feeds(1, 8000)], measure_latency=False)
    model = load_model(path)
    assert bind_inputs(model, {"sr": ["8000"]}) and model.bound["sr"].dtype == np.int64


@pytest.mark.tvm
def test_a_bound_model_compiles_for_x86_and_matches_the_original(tmp_path):
    pytest.importorskip("tvm")
    from optc.targets.artifact import load_artifact

    path = vad_like(tmp_path, nested=True)
    out = tmp_path / "out"
    res = invoke("compile", path, "-o", out, "--target", "x86", "--input-value", "sr=16000", "--input-shape", "x=3x32",
                 "--input-shape", "state=2x3x16", "--no-latency", "--tuning-db", tmp_path / "db")
    assert res.exit_code == 0, res.output
    feeds, want = _reference(path, 16000)
    got = load_artifact(out).run(feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["x", "state"]


def test_inspect_shows_the_model_with_its_inputs_bound(tmp_path):
    path = vad_like(tmp_path, nested=True)
    res = invoke("inspect", path, "--input-value", "sr=16000", "--no-tvm", "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert [i.split(":")[0] for i in info["inputs"]] == ["x", "state"]
    assert "If" not in info["stats"]["op_histogram"], info["stats"]["op_histogram"]
    res = invoke("inspect", path, "--input-value", "sr=abc", "--no-tvm")
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1, res.output
