"""Hostile command lines: options out of range, of the wrong type, or pointing where optc must not write.

Each case is one ``optc`` command on the sample model; see :mod:`hostile` for
the contract. Click's own usage errors go through a real process, where
``optc.cli.main.main`` turns them into one line.
"""
from __future__ import annotations

import pytest
from helpers import SAMPLE
from hostile import assert_bad_input, invoke, run_optc

MODEL = SAMPLE / "mnist_cnn.onnx"
CALIB = SAMPLE / "calib.npz"

# name -> (arguments after "compile MODEL -o OUT", what the one line must say)
COMPILE_CASES: dict[str, tuple[list[str], str]] = {
    "shape-no-equals": (["--input-shape", "input"], "NAME=DxDx"),
    "shape-empty-dims": (["--input-shape", "input="], "input"),
    "shape-zero-dim": (["--input-shape", "input=0x1x28x28"], "input"),
    "shape-negative-dim": (["--input-shape", "input=-1x1x28x28"], "input"),
    "shape-float-dim": (["--input-shape", "input=1.5x1x28x28"], "input"),
    "shape-unknown-input": (["--input-shape", "nope=1x1x28x28"], "nope"),
    "shape-wrong-rank": (["--input-shape", "input=1x28x28"], "input"),
    "shape-changing-a-fixed-dim": (["--input-shape", "input=1x3x28x28"], "input"),
    "unknown-pass": (["--pass", "make-it-faster"], "make-it-faster"),
    "pass-option-syntax": (["--pass", "quantize:percentile"], "percentile"),
    "pass-option-nan": (["--pass", "quantize:percentile=nan", "--calib", str(CALIB)], "percentile"),
    "pass-option-inf-int": (["--pass", "quantize:bins=inf", "--calib", str(CALIB)], "bins"),
    "pass-option-unknown": (["--pass", "quantize:turbo=1", "--calib", str(CALIB)], "turbo"),
    "data-pass-without-data": (["--pass", "quantize"], "calib"),
    "max-drop-nan": (["--max-drop", "nan", "--eval", str(CALIB)], "max-drop"),
    "max-drop-negative": (["--max-drop", "-1", "--eval", str(CALIB)], "max-drop"),
    "min-fidelity-above-one": (["--min-fidelity", "2", "--eval", str(CALIB)], "min-fidelity"),
    "both-budgets": (["--max-drop", "0.01", "--min-fidelity", "0.9", "--eval", str(CALIB)], ""),
    "time-budget-negative": (["--time-budget", "-1", "--max-drop", "0.01", "--eval", str(CALIB)], "time"),
    "time-budget-nan": (["--time-budget", "nan", "--max-drop", "0.01", "--eval", str(CALIB)], "time"),
    "metric-missing-file": (["--metric", "nosuch.py:f", "--max-drop", "0.01", "--eval", str(CALIB)], "nosuch.py"),
    "metric-not-python": (["--metric", "/etc/passwd:f", "--max-drop", "0.01", "--eval", str(CALIB)], "metric"),
    "tune-trials-negative": (["--tune-trials", "-1"], "tune-trials"),
    "dump-after-unknown": (["--dump-after", "quantize"], "dump-after"),
    "calib-missing": (["--calib", "/nonexistent/c.npz"], "no such file"),
    "eval-is-the-model": (["--eval", str(MODEL)], "mnist_cnn.onnx"),
    "seed-2-70": (["--seed", str(2**70)], "seed"),
    "seed-negative": (["--seed", "-1"], "seed"),
    "shape-2-31": (["--input-shape", f"input={2**31}x1x28x28"], "at most"),
}


@pytest.mark.parametrize("case", sorted(COMPILE_CASES))
def test_hostile_compile_options(tmp_path, case):
    args, expect = COMPILE_CASES[case]
    assert_bad_input(invoke("compile", MODEL, "-o", tmp_path / "out", "--no-latency", *args, workdir=tmp_path), expect)


@pytest.mark.parametrize("where", ["/proc/optc-out", "/dev/null", "/sys/kernel/optc", "model-file"])
def test_output_folder_optc_cannot_or_must_not_write(tmp_path, where):
    out = tmp_path / "m.onnx" if where == "model-file" else where
    (tmp_path / "m.onnx").write_bytes(MODEL.read_bytes())
    result = invoke("compile", tmp_path / "m.onnx", "-o", out, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, str(out))
    assert (tmp_path / "m.onnx").read_bytes() == MODEL.read_bytes()


def test_output_folder_holding_user_files_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    (out / "train.py").write_text("print('mine')\n")
    result = invoke("compile", MODEL, "-o", out, "--no-latency")
    assert result.code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert (out / "train.py").read_text() == "print('mine')\n"


# Click parses these: a real process, where main() makes them one line.
USAGE_CASES: dict[str, tuple[list[str], str]] = {
    "tune-trials-text": (["compile", str(MODEL), "--tune-trials", "many"], "tune-trials"),
    "seed-float": (["compile", str(MODEL), "--seed", "1.5"], "seed"),
    "target-bogus": (["compile", str(MODEL), "--target", "tpu"], "target"),
    "kernels-bogus": (["compile", str(MODEL), "--kernels", "cuda"], "kernels"),
    "objective-bogus": (["compile", str(MODEL), "--objective", "beauty"], "objective"),
    "max-drop-text": (["compile", str(MODEL), "--max-drop", "lots"], "max-drop"),
    "bench-repeats-text": (["bench", "somewhere", "--repeats", "x"], "repeats"),
    "run-without-artifact": (["run"], "artifact"),
    "passes-describe-missing-value": (["passes", "--describe"], "describe"),
    "option-twice-equals": (["compile", str(MODEL), "--seed=1=2"], "seed"),
}


@pytest.mark.parametrize("case", sorted(USAGE_CASES))
def test_usage_errors(tmp_path, case):
    args, expect = USAGE_CASES[case]
    assert_bad_input(run_optc(*args, workdir=tmp_path), expect)


@pytest.mark.parametrize("repeats", ["0", "-5"])
def test_bench_repeats_out_of_range(tmp_path, repeats):
    assert_bad_input(invoke("bench", tmp_path, "--repeats", repeats, workdir=tmp_path), "repeats")


def test_passes_describe_unknown(tmp_path):
    assert_bad_input(invoke("passes", "--describe", "make-it-faster", workdir=tmp_path), "make-it-faster")
