"""The CLI through click's runner and as a real subprocess; the bad-input corpus."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import BAD, SAMPLE, load_tool, ort_run

from onnx import helper, numpy_helper

from optc.cli.main import cli
from optc.passes import Pass, PassResult, register_pass

MODEL_CASES = [c for c in json.loads((BAD / "cases.json").read_text()) if c["kind"] == "model"]


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def test_compile_sample_end_to_end(tmp_path):
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--calib", SAMPLE / "calib.npz", "--eval", SAMPLE / "test.npz", "--verify-each", "--time-passes", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    names = {p.name for p in out.iterdir()}
    assert {".optc-output.json", "model.onnx", "pipeline.yaml", "report.json"} <= names
    assert set(json.loads((out / ".optc-output.json").read_text())["files"]) == names - {".optc-output.json"}
    assert json.loads((out / "report.json").read_text())["passes"] == report["passes"]
    assert [p["pass"] for p in report["passes"]] == ["fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code"]
    assert report["after"]["op_histogram"].get("BatchNormalization") is None
    acc = report["evaluation"]["accuracy"]
    assert acc["samples"] == 1000 and acc["before"] > 0.95 and abs(acc["delta"]) < 1e-9
    assert all(m["max_abs"] < 1e-4 for m in report["evaluation"]["fidelity"].values())
    latency = report["evaluation"]["latency_ms"]
    assert latency["after"] > 0 and latency["timing"] == "in turns"  # a small model keeps its session
    # The written model runs and equals the original in onnxruntime.
    x = np.load(SAMPLE / "test.npz")["input"][:16]
    ref = ort_run(onnx.load(str(SAMPLE / "mnist_cnn.onnx")), {"input": x})["logits"]
    got = ort_run(onnx.load(str(out / "model.onnx")), {"input": x})["logits"]
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_compile_human_table_and_rerun_replaces_output(tmp_path):
    out = tmp_path / "out"
    first = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "fold-batchnorm")
    assert first.exit_code == 0
    assert "fold-batchnorm" in first.output and "folded=6" in first.output
    second = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "remove-identity")
    assert second.exit_code == 0
    assert json.loads((out / "report.json").read_text())["pipeline"] == ["remove-identity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_pipeline_file_and_dump_after(tmp_path):
    pipe = tmp_path / "pipe.toml"
    pipe.write_text('[[passes]]\nname = "fold-batchnorm"\n[[passes]]\nname = "remove-identity"\n')
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--pipeline", pipe, "--dump-after", "fold-batchnorm", "--no-latency")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (out / "dumps").iterdir()] == ["01-fold-batchnorm.onnx"]


def test_inspect_json():
    res = invoke("inspect", SAMPLE / "mnist_cnn.onnx", "--json", "--no-tvm")
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["inputs"] == ["input: float32 [batchx1x28x28]"]
    assert info["stats"]["op_histogram"]["Conv"] == 6
    assert info["stats"]["macs"] > 0 and info["dynamic_dims"] == {"input": ["batch"]}


def test_inspect_counts_constant_weights(tmp_path):
    from helpers import make_model
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((3, 3), np.float32))
    proto = make_model([helper.make_node("Constant", [], ["W"], value=w, name="c"), helper.make_node("MatMul", ["x", "W"], ["y"], name="m")], [("x", [1, 3])], [("y", [1, 3])])
    onnx.save_model(proto, str(tmp_path / "m.onnx"))
    info = json.loads(invoke("inspect", tmp_path / "m.onnx", "--json", "--no-tvm").output)
    assert info["weights_in_constant_nodes"] == 1 and info["stats"]["params"] == 9


def test_passes_listing():
    res = invoke("passes")
    assert res.exit_code == 0
    for name in ("fold-constants", "conv3d-to-2d", "fold-batchnorm", "remove-identity", "eliminate-dead-code", "canonicalize"):
        assert name in res.output
    described = json.loads(invoke("passes", "--describe", "fold-constants", "--json").output)["passes"][0]
    assert [o["name"] for o in described["options"]] == ["max_bytes", "fold_shapes"]
    assert "Shape" in described["doc"]


def _assert_clean_failure(res, out, expect):
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, res.output
    assert lines[0].startswith("optc: error:") and "Traceback" not in res.output
    assert expect.lower() in lines[0].lower()
    assert not out.exists()


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c["file"] for c in MODEL_CASES])
def test_bad_model_corpus(tmp_path, case):
    out = tmp_path / "out"
    res = invoke("compile", BAD / case["file"], "-o", out)
    # The file name is in the message; match the expectation on the rest.
    _assert_clean_failure(res, out, "")
    message = res.output.lower().replace(str(BAD / case["file"]).lower(), "<file>")
    assert case["expect"].lower() in message, message


def test_symlink_escape_via_cli(tmp_path):
    path = load_tool("make_bad_models").make_symlink_escape(tmp_path / "m")
    out = tmp_path / "out"
    _assert_clean_failure(invoke("compile", path, "-o", out), out, "outside the model folder")


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--pass", "no-such-pass"], "unknown pass 'no-such-pass'; valid passes:"),
        (["--pass", "fold-constants:nope=1"], "valid options: max_bytes, fold_shapes"),
        (["--calib", str(BAD / "bad_calib" / "wrong_dtype.npz")], "dtype"),
        (["--input-shape", "input=1x3x28x28"], "dim 1 is fixed to 1"),
        (["--input-shape", "nope=1x1x28x28"], "inputs are: input"),
        (["--dump-after", "prune"], "not in the pipeline"),
        (["--pipeline", "/nonexistent.yaml"], "no such file"),
        (["--eval", str(SAMPLE / "calib.npz"), "--max-drop", "0.01"], "top1 needs labelled data: give --eval with a 'label' array"),
        (["--input-shape", "input=600x1x28x28"], "500 samples, fewer than the model's fixed batch of 600"),
        (["--pass", "distill:max_backoff=-1"], "max_backoff' must be >= 0"),
        (["--pass", "distill:min_cosine=2"], "min_cosine' must be in [-1, 1]"),
    ],
)
def test_bad_options(tmp_path, args, expect):
    out = tmp_path / "out"
    calib = ["--calib", str(SAMPLE / "calib.npz")] if "--calib" not in args else []
    _assert_clean_failure(invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, *calib, *args), out, expect)


def test_refuses_to_overwrite_a_foreign_folder(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep")
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out)
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
    assert (out / "precious.txt").read_text() == "keep"


def test_usage_errors_exit_2(tmp_path):
    assert invoke("compile").exit_code == 2  # no model
    assert invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "o", "--target", "tpu").exit_code == 2


def test_default_output_folder_is_beside_the_model(tmp_path):
    model = tmp_path / "models" / "mnist_cnn.onnx"
    model.parent.mkdir()
    shutil.copy(SAMPLE / "mnist_cnn.onnx", model)
    res = invoke("compile", model, "--no-latency", "--pass", "fold-batchnorm")
    assert res.exit_code == 0, res.output
    out = tmp_path / "models" / "mnist_cnn.optc"
    assert (out / "model.onnx").is_file()
    assert f"wrote {out / 'model.onnx'}" in " ".join(res.output.split())
    assert invoke("compile", model, "--no-latency").exit_code == 0  # its own output: replaced


@pytest.mark.parametrize("setup,expect", [
    (lambda out: (out / "report.json").write_text("{}"), "has no .optc-output.json"),  # optc's old rule took this for its output
    (lambda out: (out / "notes.txt").write_text("mine"), "holds notes.txt, which optc did not write"),
    (lambda out: (out / "report.json").write_text("{}"), "has report.json changed since optc wrote it"),
    (lambda out: (out / "pipeline.yaml").unlink(), "no longer holds pipeline.yaml"),
    (lambda out: (out / "sub").mkdir(), "holds sub/, which optc did not write"),
    (lambda out: (out / ".optc-output.json").write_text("[1]"), "unreadable .optc-output.json"),
])
def test_replaces_only_its_own_unchanged_output(tmp_path, setup, expect):
    out = tmp_path / "out"
    if "no .optc-output" in expect:
        out.mkdir()
        (out / "data.csv").write_text("keep")
    else:
        assert invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "fold-batchnorm").exit_code == 0
    setup(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "remove-identity")
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert line.count("\n") == 0 and line.startswith("optc: error: output folder") and expect in line, line
    assert "refusing to overwrite it: give another -o" in line
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_that_is_a_file_or_a_link_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "file")
    assert res.exit_code == 2 and "exists and is not a folder" in res.output
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "link")
    assert res.exit_code == 2 and "is a symbolic link" in res.output
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "link").is_symlink()


def test_target_without_tvm_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tvm", None)  # import tvm fails, as where it is not installed
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--target", "arm")
    _assert_clean_failure(res, out, "--target arm needs Apache TVM, which is not installed: pip install 'optc[tvm]'")


def test_target_freezes_a_dynamic_batch_dim_only(tmp_path):
    from helpers import make_model
    from onnx import helper

    from optc.driver import prepare_model

    model, frozen = prepare_model(SAMPLE / "mnist_cnn.onnx", {}, target="x86")
    assert frozen == {"input": (1, 1, 28, 28)} and model.inputs[0].shape == (1, 1, 28, 28)
    assert "froze the leading batch dim to 1 (input=1x1x28x28)" in model.notes[-1]
    # Other dynamic dims: the error shows what to type, with the real names and known dims.
    proto = make_model([helper.make_node("Add", ["ids", "mask"], ["y"], name="add")],
                       [("ids", ["batch", "seq_len"]), ("mask", ["batch", "seq_len"])], [("y", ["batch", "seq_len"])])
    onnx.save_model(proto, str(tmp_path / "m.onnx"))
    out = tmp_path / "out"
    res = invoke("compile", tmp_path / "m.onnx", "-o", out, "--target", "x86")
    _assert_clean_failure(res, out, "give --input-shape ids=1xSEQ_LEN --input-shape mask=1xSEQ_LEN, with SEQ_LEN the size to compile for")
    res = invoke("compile", tmp_path / "m.onnx", "-o", out, "--target", "x86", "--input-shape", "ids=2x7")
    _assert_clean_failure(res, out, "(mask: float32 [batchxseq_len]): give --input-shape mask=1xSEQ_LEN")
    # A recurrent state [2, batch, 8] holds its batch on axis 1: frozen there, and shown as 1 there.
    proto = make_model([helper.make_node("ReduceSum", ["state"], ["s"], keepdims=0, name="sum"),
                        helper.make_node("Add", ["x", "s"], ["y"], name="add")],
                       [("x", ["batch", 8]), ("state", [2, "batch", 8])], [("y", ["batch", 8])])
    onnx.save_model(proto, str(tmp_path / "s.onnx"))
    model, frozen = prepare_model(tmp_path / "s.onnx", {}, target="x86")
    assert frozen == {"x": (1, 8), "state": (2, 1, 8)}
    proto.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "window"
    onnx.save_model(proto, str(tmp_path / "s2.onnx"))
    res = invoke("compile", tmp_path / "s2.onnx", "-o", out, "--target", "x86")
    _assert_clean_failure(res, out, "give --input-shape x=1xWINDOW --input-shape state=2x1x8, with WINDOW the size to compile for")


def test_terminal_output_is_not_read_as_markup(tmp_path):
    out = tmp_path / "[tvm]"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--no-latency", "--pass", "fold-batchnorm")
    assert res.exit_code == 0 and f"wrote {out / 'model.onnx'}" in " ".join(res.output.split())


@pytest.mark.slow
def test_real_subprocess(tmp_path):
    exe = shutil.which("optc") or os.path.join(os.path.dirname(sys.executable), "optc")
    out = tmp_path / "out"
    ok = subprocess.run([exe, "compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--no-latency"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (out / "model.onnx").is_file()
    bad = subprocess.run([exe, "compile", str(BAD / "truncated.onnx"), "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    debug = subprocess.run([exe, "--debug", "compile", str(BAD / "truncated.onnx"), "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_large_input_model_is_timed_one_after_the_other(tmp_path, monkeypatch):
    """Above the memory bound the input model is not kept for the timing: the report says how it was timed."""
    import optc.api

    monkeypatch.setattr(optc.api, "INTERLEAVE_MAX_BYTES", 0)
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", SAMPLE / "calib.npz")
    assert res.exit_code == 0, res.output
    assert "latency (onnxruntime CPU, median, timed one after the other)" in res.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    lat = report["evaluation"]["latency_ms"]  # one convention for times: "N.NNx faster/slower", never a bare "xN"
    ratio = lat["before"] / lat["after"]
    said = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    assert f"{lat['after']:.3f} ms ({said})" in " ".join(res.output.split())
    assert report["evaluation"]["latency_ms"]["timing"] == "one after the other"


@register_pass("test-nan-weights")
class _NanWeights(Pass):
    """Writes NaN into the first weight: a pass gone wrong that must not reach the output folder."""

    def run(self, model, ctx):
        out = model.copy()
        first = out.graph.initializer[0]
        first.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(first).shape, np.nan, np.float32), first.name))
        return PassResult(out, modified=True)


def test_a_model_computing_nan_is_not_written(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--pass", "test-nan-weights", "--no-latency"])
    assert res.exit_code == 1, res.output
    assert "internal error" in res.output and "NaN/inf on output 'logits'" in res.output and "nothing was written" in res.output
    assert "(rerun as `optc --debug compile ...` for the traceback)" in res.output  # `compile --debug` is not an option
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@register_pass("test-exact-but-wrong")
class _ExactButWrong(Pass):
    """Declared exact (the default) but scales the first weight: a canonicalisation gone wrong."""

    def run(self, model, ctx):
        out = model.copy()
        first = out.graph.initializer[0]
        first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * np.float32(1.5), first.name))
        return PassResult(out, modified=True)


@register_pass("test-lossy-scale")
class _LossyScale(_ExactButWrong):
    exact = False


def test_an_exact_pipeline_that_changes_the_outputs_is_not_written(tmp_path):
    """Exact passes must give the input model's outputs (up to float reassociation): otherwise optc has a bug, and
    says so rather than writing a model that computes something else. A lossy pass is judged by its budget instead."""
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--pass", "canonicalize",
                                   "--pass", "test-exact-but-wrong", "--no-latency"])
    assert res.exit_code == 1, res.output
    assert "internal error" in res.output and "are exact, but output 'logits' differs" in res.output and "nothing was written" in res.output
    assert "onnxruntime's own optimisations move it by" in res.output  # the sample's own float noise: far below the change
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    res = CliRunner().invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--pass", "test-lossy-scale", "--no-latency"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(tmp_path / "canon"), "--no-latency"])
    assert res.exit_code == 0, res.output  # canonicalize's folded batch norms stay within the check


def test_a_pass_with_nothing_to_do_on_an_already_quantized_model_says_why(tmp_path):
    """onnxruntime's dynamic quantization (ConvInteger, as in ddddocr's common_old.onnx) leaves no float layer: the
    lossy passes change nothing, and each says why on the terminal, not only in report.json."""
    w = numpy_helper.from_array(np.random.default_rng(0).integers(0, 255, (4, 3, 3, 3)).astype(np.uint8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("ConvInteger", ["xq", "w", "xz"], ["acc"], pads=[1, 1, 1, 1]),
             helper.make_node("Cast", ["acc"], ["accf"], to=onnx.TensorProto.FLOAT), helper.make_node("Mul", ["accf", "xs"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((32, 3, 8, 8)).astype(np.float32))
    for name in ("sparsify", "quantize", "prune-channels"):
        res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / name), "--pass", name,
                                       "--calib", str(tmp_path / "calib.npz"), "--no-latency"])
        assert res.exit_code == 0, res.output
        text = " ".join(res.output.split())
        assert f"note: {name} changed nothing: no float Conv/ConvTranspose/Gemm/MatMul layer: the model is already quantized (ConvInteger x1)" in text, text
        assert "default budget" not in text  # nothing changed, nothing held: no line saying it was within a budget


def test_fidelity_is_measured_on_data_the_passes_did_not_fit(tmp_path):
    common = ["compile", SAMPLE / "mnist_cnn.onnx", "--calib", SAMPLE / "calib.npz", "--no-latency", "--json"]
    held = json.loads(invoke(*common, "-o", tmp_path / "a", "--eval", SAMPLE / "test.npz").output)
    seen = json.loads(invoke(*common, "-o", tmp_path / "b").output)
    assert held["evaluation"]["fidelity_data"] == "evaluation data"
    assert seen["evaluation"]["fidelity_data"] == "calibration data, which the passes fitted on"
    # The default budget holds calibration samples out of the fit: the figures are measured on those.
    split = json.loads(invoke(*common, "-o", tmp_path / "c", "--pass", "quantize").output)
    assert split["evaluation"]["fidelity_data"] == "held-out calibration data, which no pass fitted on"


@pytest.mark.tvm
def test_x86_without_a_host_compiler_fails_before_any_pass(tmp_path, monkeypatch):
    """TVM links model.so with g++ (or $CXX): a machine without one is told what to install, before the passes run."""
    pytest.importorskip("tvm")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    out = tmp_path / "x86"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--target", "x86", "--pass", "prune-channels",
                 "--calib", SAMPLE / "calib.npz", "--no-latency")
    assert res.exit_code == 2 and not out.exists()
    assert "needs a C++ compiler to link model.so" in res.output and "apt-get install g++" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_pass_scaled_to_nothing_by_the_budget_says_so_not_a_skipped_layer():
    """openWakeWord's embedding: prune-channels at the budget's ratio 0.0375 removed nothing, and the note blamed
    one of its skipped layers. The strength the search chose is looked up by the pass's record."""
    from optc.cli.render import _scaled_strengths

    report = {"search": {"chosen": {"strengths": {"quantize#4": 0, "prune-channels#5": 0.0375, "sparsify#6": "as configured"}}}}
    assert _scaled_strengths(report) == {4: 0.0375}  # quantize left out: prune-channels' record is the fifth
    assert _scaled_strengths({"search": None}) == {} and _scaled_strengths({}) == {}


def test_a_pass_the_budget_left_out_says_what_its_least_strength_measured():
    """EfficientWord-Net's ResNet-50: the search scaled prune-channels to 0 and the only line said it 'took the
    strongest setting within' the budget, with no prune row in the table."""
    from optc.cli.render import _left_out

    points = [{"strengths": {"prune-channels#0": s}, "metric": m} for s, m in ((0.3, 0.4963), (0.15, 0.7410), (0.0375, 0.9160), (0.0, 1.0))]
    report = {"search": {"metric": "fidelity", "points": points, "chosen": {"strengths": {"prune-channels#0": 0.0}}}}
    assert _left_out(report) == ["note: prune-channels left out by the budget: its least strength tried, 0.0375, measured fidelity 0.9160"]
    kept = {"search": {"metric": "fidelity", "points": points, "chosen": {"strengths": {"prune-channels#0": 0.0375}}}}
    assert _left_out(kept) == [] and _left_out({}) == []
    fixed = {"search": {"points": [{"strengths": {"quantize#0": "as configured"}, "metric": 0.9}], "chosen": {"strengths": {"quantize#0": 0}},
                        "notes": ["quantize: its most sensitive layers fall back (max_drop=0.005)",
                                  "quantize: left out, the budget cannot hold with it (metric 1.0000 without it)"]}}
    # DNSMOS: the search's own reason, which the terminal did not show (only 'searching for the strongest setting')
    assert _left_out(fixed) == ["note: quantize: left out, the budget cannot hold with it (metric 1.0000 without it)"]


def test_macs_counted_with_a_symbolic_length_at_1_say_so(tmp_path):
    """openWakeWord's melspectrogram read 271k MACs per sample with its `samples` dim counted as 1 (53.5M at 32,000
    samples): the table marks the column and a footnote names the dims; a frozen shape needs no footnote."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 1, 16)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[4])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 1, "samples"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 8, "frames"])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "a"), "--no-latency"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "MACs/sample*" in text and "* MACs count the symbolic dims samples, frames as 1: freeze the inputs with --input-shape" in text, text
    assert json.loads((tmp_path / "a" / "report.json").read_text())["before"]["macs_symbolic"] == ["samples", "frames"]
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "b"), "--no-latency", "--input-shape", "x=1x1x400"])
    assert res.exit_code == 0 and "MACs count the symbolic" not in res.output and "MACs/sample*" not in res.output, res.output


def test_an_exact_pipeline_within_the_models_own_float_noise_is_written_with_a_note():
    """RapidTable's SLANet decoder amplifies float reassociation: canonicalize moved an output by 0.018 where
    onnxruntime's own graph optimisations move it by 0.0097, and optc refused the model as its own bug (exit 1). A
    difference within twice the input model's own noise is written, and said; one beyond it is still refused."""
    from types import SimpleNamespace

    from optc.driver import Measurement, check_exact

    exact = [SimpleNamespace(name="fold-batchnorm", exact=True)]

    ref = {"y": np.array([[0.0, 1.0, 0.5]])}
    moved = Measurement({"y": np.array([[0.0, 1.0, 0.518]])}, None, None)
    notes = check_exact(exact, Measurement(ref, None, None), moved, {"y": 0.0097})
    assert len(notes) == 1 and "within its own float noise" in notes[0] and "by up to 0.018" in notes[0]
    with pytest.raises(RuntimeError, match="onnxruntime's own optimisations move it by 0.002"):
        check_exact(exact, Measurement(ref, None, None), moved, {"y": 0.002})
    assert check_exact(exact, Measurement(ref, None, None), Measurement(ref, None, None), {"y": 0.0}) == []


def test_the_macs_footnote_does_not_name_dims_shape_inference_made_up():
    """onnx's shape inference names the dims it derives from the inputs' sizes unk__0, unk__1: no name a user knows
    (LORE's detector read "MACs count the symbolic dims unk__0", a dim its model calls DynamicDimension.0)."""
    from optc.reporting.format import macs_footnote

    assert macs_footnote({"before": {"macs_symbolic": ["unk__0"]}}) == \
        "* MACs count 1 dim computed from the inputs' sizes as 1: freeze the inputs with --input-shape for the real size"
    assert macs_footnote({"before": {"macs_symbolic": ["frames", "unk__3", "unk__7"]}}) == \
        "* MACs count the symbolic dims frames and 2 dims computed from the inputs' sizes as 1: freeze the inputs with --input-shape for the real size"
    assert macs_footnote({"before": {"macs_symbolic": []}}) is None
