"""The default budget (optc.search.guard): lossy passes left at their default strength may not cost
more than a point (or output cosine 0.99 on held-out calibration samples); strengths the user wrote
run as asked."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import SAMPLE

from optc.cli.main import cli
from optc.data import CalibrationSet
from optc.errors import ConfigError
from optc.ir.io import load_model
from optc.passes import make_pass, parse_pass_spec
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig
from optc.search.guard import at_default_strength

MODEL, CALIB, TEST = SAMPLE / "mnist_cnn.onnx", SAMPLE / "calib.npz", SAMPLE / "test.npz"


def compile_(tmp_path, name, *args):
    out = tmp_path / name
    res = CliRunner().invoke(cli, ["compile", str(MODEL), "-o", str(out), "--pass", "canonicalize", "--calib", str(CALIB),
                                   "--no-latency", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads((out / "report.json").read_text()), res.output


def test_which_passes_run_at_default_strength():
    assert at_default_strength(make_pass("sparsify"))
    assert at_default_strength(parse_pass_spec("sparsify:method=magnitude")[0])  # a detail, not how much
    assert not at_default_strength(parse_pass_spec("sparsify:sparsity=0.5")[0])  # the default value, but written
    assert not at_default_strength(parse_pass_spec("sparsify:pattern=2:4")[0])
    assert at_default_strength(make_pass("quantize")) and not at_default_strength(parse_pass_spec("quantize:max_drop=0.02")[0])
    assert at_default_strength(make_pass("distill")) and not at_default_strength(parse_pass_spec("distill:budget=0.1")[0])
    assert not at_default_strength(Sparsify(SparsifyConfig()))  # built in Python: every option chosen
    assert not at_default_strength(make_pass("fold-constants"))  # exact


def test_hold_out_splits_off_the_last_quarter_and_refuses_what_it_cannot_split(tmp_path):
    model = load_model(MODEL)
    fit, held = CalibrationSet.from_path(CALIB, model).hold_out(model)
    with np.load(CALIB) as data:
        everything = data["input"]
    assert fit.num_samples + held.num_samples == len(everything) and held.num_samples == 64
    np.testing.assert_array_equal(held.take(64)["input"], everything[-64:])
    np.savez(tmp_path / "few.npz", input=everything[:7])
    with pytest.raises(ConfigError, match="too few to hold 4 out"):
        CalibrationSet.from_path(tmp_path / "few.npz", model).hold_out(model)


@pytest.mark.slow
def test_default_that_misses_is_scaled_down_and_held_on_the_test_set(tmp_path):
    """distill's defaults take 2 points of the sample CNN: held to one point, from --eval."""
    report, output = compile_(tmp_path, "auto", "--pass", "distill", "--eval", TEST)
    assert "misses the default budget" in output
    search = report["search"]
    assert search["max_drop"] == pytest.approx(0.01) and search["metric"] == "top1"
    chosen = search["chosen"]
    assert chosen["feasible"] and 0 < chosen["strengths"]["distill#4"] < 0.05  # some distillation kept, less than asked
    acc = report["evaluation"]["accuracy"]
    assert acc["before"] - acc["after"] <= 0.01 + 1e-9
    assert report["after"]["macs"] < report["before"]["macs"]

    asked, _ = compile_(tmp_path, "asked", "--pass", "distill:budget=0.05", "--eval", TEST)  # written: as asked
    assert asked.get("search") is None
    assert asked["evaluation"]["accuracy"]["before"] - asked["evaluation"]["accuracy"]["after"] > 0.01
    off, _ = compile_(tmp_path, "off", "--pass", "distill", "--eval", TEST, "--no-default-budget")
    assert off.get("search") is None and off["after"]["macs"] == asked["after"]["macs"]


@pytest.mark.slow
def test_without_eval_the_default_is_held_on_held_out_calibration_samples(tmp_path):
    report, output = compile_(tmp_path, "q", "--pass", "quantize")
    assert report.get("search") is None  # int8 of the sample keeps cosine 0.99: nothing searched
    assert any("within the default budget (output cosine at least 0.99 on 64 held-out calibration samples)" in n for n in report["notes"])
    report, _ = compile_(tmp_path, "mf", "--pass", "prune-channels:ratio=0.6", "--min-fidelity", "0.995")
    assert report["search"]["metric"] == "cosine" and report["search"]["samples"] == 64
    assert report["search"]["chosen"]["strengths"]["prune-channels#4"] < 0.6


def test_weights_that_grow_are_said_so():
    """A 'compression' that leaves the weights bigger is never kept silently."""
    from types import SimpleNamespace

    from optc.api import _size_warnings

    record = SimpleNamespace(name="sparsify", before={"bytes": 1000}, after={"bytes": 3000})
    grown = SimpleNamespace(initial=SimpleNamespace(param_bytes=1000), final=SimpleNamespace(param_bytes=3000), records=[record])
    (line,) = _size_warnings(grown, [make_pass("sparsify")])
    assert line.startswith("the weights grew from 1.0 KiB to 2.9 KiB (sparsify)")
    shrunk = SimpleNamespace(initial=SimpleNamespace(param_bytes=3000), final=SimpleNamespace(param_bytes=1000), records=[])
    assert _size_warnings(shrunk, [make_pass("sparsify")]) == []
    assert _size_warnings(grown, [make_pass("fold-constants")]) == []  # exact passes only: not a compression claim


def test_a_model_made_slower_is_said_so():
    """quantize made a face-landmark CNN 2.3x slower in onnxruntime: that is never kept silently either."""
    from optc.api import Evaluation, Latency, _speed_warnings

    def evaluation(before, after):
        return Evaluation({}, 8, "evaluation data", None, Latency(before, after, before / after, "onnxruntime CPU", "in turns"))

    (line,) = _speed_warnings(evaluation(1.0, 2.3), [make_pass("quantize")])
    assert line.startswith("the compressed model is 2.30x slower in onnxruntime on this machine (1.000 -> 2.300 ms")
    assert _speed_warnings(evaluation(1.0, 1.05), [make_pass("quantize")]) == []  # within timing noise
    assert _speed_warnings(evaluation(1.0, 2.3), [make_pass("fold-constants")]) == []
