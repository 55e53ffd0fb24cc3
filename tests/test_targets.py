"""TVM targets: compile, artifact integrity, run against onnxruntime (real TVM, no mocks)."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import SAMPLE, make_model, mlp_file, ort_run, rand
from onnx import helper

from optc.cli.main import cli
from optc.errors import ConfigError, TargetError

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.fixture(scope="module")
def x86_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "sample"
    db = tmp_path_factory.mktemp("db")
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "x86", "--no-latency", "--tuning-db", db)
    assert res.exit_code == 0, res.output
    return out


def test_x86_artifact_matches_onnxruntime(x86_artifact, tmp_path):
    from optc.targets.artifact import load_artifact

    manifest = json.loads((x86_artifact / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "model.so", "report.json", "report.html"}
    assert manifest["target"]["name"] == "x86" and manifest["inputs"][0]["shape"] == [1, 1, 28, 28]
    artifact = load_artifact(x86_artifact)
    data = np.load(SAMPLE / "test.npz")
    reference = onnx.load(str(SAMPLE / "mnist_cnn.onnx"))
    correct = 0
    for i in range(20):
        x = data["input"][i : i + 1]
        got = artifact.run({"input": x})["logits"]
        np.testing.assert_allclose(got, ort_run(reference, {"input": x})["logits"], atol=1e-4, rtol=1e-4)
        correct += int(got.argmax() == data["label"][i])
    assert correct >= 18
    np.save(tmp_path / "x.npy", data["input"][:1])
    res = invoke("run", x86_artifact, "--input", f"input={tmp_path / 'x.npy'}", "--output", tmp_path / "y.npz")
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "y.npz")["logits"].shape == (1, 10)


def test_tampered_library_is_refused(x86_artifact, tmp_path):
    import shutil

    from optc.targets.artifact import load_artifact

    copy = tmp_path / "copy"
    shutil.copytree(x86_artifact, copy)
    lib = copy / "model.so"
    data = bytearray(lib.read_bytes())
    data[-1] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its SHA-256"):
        load_artifact(copy)
    res = invoke("run", copy)
    assert res.exit_code == 2 and "refusing to load" in res.output


def test_run_rejects_wrong_inputs(x86_artifact, tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((2, 1, 28, 28), np.float32))
    res = invoke("run", x86_artifact, "--input", f"input={tmp_path / 'bad.npy'}")
    assert res.exit_code == 2 and "the artifact takes float32 [1, 1, 28, 28]" in res.output


def test_run_lends_aligned_inputs_and_copies_outputs(x86_artifact):
    """run() passes a 64-byte aligned array to the VM without copying and copies any other in; either way
    the results are the same, outputs never alias the VM's memory, and a wrong array is still refused."""
    from optc.errors import ConfigError
    from optc.targets.artifact import load_artifact

    art = load_artifact(x86_artifact)
    data = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    raw = np.empty(data.nbytes + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    aligned = raw[start:start + data.nbytes].view(np.float32).reshape(data.shape)
    aligned[...] = data
    unaligned = np.empty(data.size + 1, np.float32)[1:].reshape(data.shape)
    unaligned[...] = data
    assert aligned.ctypes.data % 64 == 0 and unaligned.ctypes.data % 64 != 0
    first = art.run({"input": aligned})
    name = next(iter(first))
    second = art.run({"input": unaligned})
    np.testing.assert_array_equal(first[name], second[name])
    kept = first[name].copy()
    first[name][...] = 0  # the caller owns its outputs
    art.run({"input": np.asfortranarray(np.zeros_like(data))})
    np.testing.assert_array_equal(art.run({"input": data})[name], kept)
    with pytest.raises(ConfigError, match="the artifact takes float32"):
        art.run({"input": data.astype(np.float64)})

    # The array last passed is remembered (its DLPack view reused): the same array refilled is read anew each run.
    other = np.random.default_rng(1).standard_normal(data.shape).astype(np.float32)
    expected = art.run({"input": other.copy()})[name]
    for buffer in (aligned, unaligned):
        buffer[...] = data
        np.testing.assert_array_equal(art.run({"input": buffer})[name], kept)
        buffer[...] = other
        np.testing.assert_array_equal(art.run({"input": buffer})[name], expected)


def test_bench_reports_both(x86_artifact):
    from optc.targets.bench import bench_artifact

    result = bench_artifact(x86_artifact, repeats=5)
    assert result["tvm_ms"] > 0 and result["ort_ms"] > 0 and result["max_abs_diff"] < 1e-4


def test_dynamic_non_batch_dims_refused_before_work(tmp_path, save):
    """A dynamic batch alone is frozen to 1 (tests/test_api.py); any other dynamic dim needs --input-shape."""
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", [1, "seq", 8])], [("y", [1, "seq", 8])])
    out = tmp_path / "o"
    res = invoke("compile", save(proto), "-o", out, "--target", "x86")
    assert res.exit_code == 2 and "--input-shape x=1xSEQ" in res.output and not out.exists()
    assert len(res.output.strip().splitlines()) == 1


def test_a_shape_computed_in_the_graph_says_to_fold_it(tmp_path, save):
    """With shape folding off (pipecat's smart-turn, Whisper's Reshape to Concat(Shape(x)[1], ...)), TVM's frontend
    refuses the Reshape: one line saying how to get past it, not the page of Relax the frontend prints."""
    shape = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i1"], ["d1"], axis=0),
             helper.make_node("Concat", ["c1", "d1", "m1"], ["shape"], axis=0), helper.make_node("Reshape", ["x", "shape"], ["y"])]
    ones = [("i1", np.array([1], np.int64)), ("c1", np.array([1], np.int64)), ("m1", np.array([-1], np.int64))]
    path = save(make_model(shape, [("x", [1, 4, 6])], [("y", [1, 4, 6])], ones))
    res = invoke("compile", path, "-o", tmp_path / "o", "--target", "x86", "--pass", "fold-constants:fold_shapes=false", "--no-latency")
    assert res.exit_code == 2 and not (tmp_path / "o").exists()
    assert "Reshape requires the input new shape to be Shape" in res.output and "fold_shapes on" in res.output, res.output
    assert "Error converting operator" not in res.output and "relax" not in res.output.split("relax.TensorType")[1]
    res = invoke("compile", path, "-o", tmp_path / "folded", "--target", "x86", "--no-latency")  # the default folds it
    assert res.exit_code == 0, res.output


def test_unsupported_ops_listed_before_compilation(save):
    from optc.ir import load_model
    from optc.targets.build import check_compilable

    # (LSTM, GRU and RNN, which TVM's frontend also lacks, are unrolled by optc first: tests/test_recurrent.py)
    proto = make_model(
        [helper.make_node("Det", ["x"], ["y"], name="det1")],
        [("x", [2, 3, 3])],
        [("y", [2])],
    )
    with pytest.raises(TargetError, match=r"cannot import: Det \(det1\)"):
        check_compilable(load_model(save(proto)))


@pytest.mark.slow
def test_gpu_library_is_produced_without_a_gpu(tmp_path):
    out = tmp_path / "gpu"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "gpu", "--arch", "sm_80", "--no-latency")
    assert res.exit_code == 0, res.output
    assert (out / "model.so").stat().st_size > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"]["device"] == "cuda" and manifest["target"]["target"]["arch"] == "sm_80"


@pytest.mark.slow
def test_tuning_database_is_reused(tmp_path, capfd):
    from optc.targets.artifact import load_artifact

    path, proto = mlp_file(tmp_path)
    db = tmp_path / "db"
    first = invoke("compile", path, "-o", tmp_path / "a", "--target", "x86", "--tune-trials", "4", "--kernels", "tvm", "--tuning-db", db, "--json", "--no-latency")
    assert first.exit_code == 0, first.output
    tuning = json.loads(first.stdout)["target"]["tuning"]
    tasks = tuning["tasks"]
    assert tasks >= 1 and len(tuning["tuned"]) == tasks and tuning["reused_from_db"] == []
    assert (db / "records.json").stat().st_size > 0
    assert tuning["untunable"] == [] and tuning["failed_trials"] == 0 and tuning["estimated_ms"] > 0
    # Not a terminal: one progress line at the start and one per finished task, on the real stderr.
    progress = [line for line in capfd.readouterr().err.splitlines() if line.startswith("tuning: ")]
    assert progress[0] == f"tuning: 0/{tasks} tasks, 0/{4 * tasks} trials; best estimate none yet"
    assert progress[-1].startswith(f"tuning: {tasks}/{tasks} tasks, ") and "best estimate" in progress[-1] and " over " in progress[-1]
    second = invoke("compile", path, "-o", tmp_path / "b", "--target", "x86", "--tune-trials", "4", "--kernels", "tvm", "--tuning-db", db, "--json", "--no-latency")
    again = json.loads(second.stdout)["target"]["tuning"]
    assert again["tuned"] == [] and sorted(again["reused_from_db"]) == sorted(tuning["tuned"])
    x = rand(4, 64, seed=3)
    got = load_artifact(tmp_path / "b").run({"x": x})["y"]
    np.testing.assert_allclose(got, ort_run(proto, {"x": x})["y"], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_untunable_task_is_not_tuned_again(tmp_path, save):
    """An embedding lookup fed MetaSchedule's random indices fails every candidate: it gets
    default schedules, is remembered, and a second compile tunes nothing."""
    table = rand(50, 16)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"), helper.make_node("Relu", ["e"], ["y"], name="relu")]
    ids_info = helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 8])
    proto = make_model(nodes, [ids_info], [("y", [1, 8, 16])], [("table", table)])
    path, db = save(proto), tmp_path / "db"
    first = invoke("compile", path, "-o", tmp_path / "a", "--target", "x86", "--tune-trials", "2", "--tuning-db", db, "--json", "--no-latency")
    assert first.exit_code == 0, first.output
    tuning = json.loads(first.stdout)["target"]["tuning"]
    assert tuning["untunable"] and set(tuning["untunable"]) <= set(tuning["tuned"]) and tuning["failed_trials"] >= 1
    second = invoke("compile", path, "-o", tmp_path / "b", "--target", "x86", "--tune-trials", "2", "--tuning-db", db, "--json", "--no-latency")
    again = json.loads(second.stdout)["target"]["tuning"]
    assert again["tuned"] == [] and sorted(again["untunable"]) == sorted(tuning["untunable"])
    from optc.targets.artifact import load_artifact

    ids = np.array([[0, 3, 49, 7, 7, 1, 2, 40]], dtype=np.int64)
    np.testing.assert_array_equal(load_artifact(tmp_path / "b").run({"ids": ids})["y"], np.maximum(table[ids], 0))


# --- artifacts load only what was verified -------------------------------------------


def _copy_artifact(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_library_replaced_after_verification_is_not_run(x86_artifact, tmp_path):
    """Verify, then replace model.so on disk before the load: the verified bytes are loaded."""
    from optc.targets.artifact import load_verified, verify_artifact

    copy = _copy_artifact(x86_artifact, tmp_path / "copy")
    x = np.load(SAMPLE / "test.npz")["input"][:1]
    with verify_artifact(copy) as verified:
        assert verified.library_fd is not None  # a sealed memfd on Linux: not even this process can change it
        with pytest.raises(PermissionError):
            os.pwrite(verified.library_fd, b"x", 0)
        (copy / "model.so").write_bytes(b"\x7fELF not a library" * 100)
        (copy / "model.so").chmod(0o755)
        artifact = load_verified(verified)
    got = artifact.run({"input": x})["logits"]
    reference = onnx.load(str(SAMPLE / "mnist_cnn.onnx"))
    np.testing.assert_allclose(got, ort_run(reference, {"input": x})["logits"], atol=1e-4, rtol=1e-4)
    # the garbage on disk is refused at the next load
    with pytest.raises(ConfigError, match="'model.so' does not match its SHA-256"):
        verify_artifact(copy)


def test_unlisted_file_is_refused(x86_artifact, tmp_path):
    from optc.targets.artifact import load_artifact

    copy = _copy_artifact(x86_artifact, tmp_path / "copy")
    (copy / "libextra.so").write_bytes(b"planted")
    with pytest.raises(ConfigError, match="'libextra.so' is not listed in the manifest"):
        load_artifact(copy)
    res = invoke("run", copy)
    assert res.exit_code == 2 and "'libextra.so' is not listed in the manifest" in res.output
    assert len(res.output.strip().splitlines()) == 1
    (copy / "libextra.so").unlink()
    (copy / "sub").mkdir()
    with pytest.raises(ConfigError, match="'sub/' is not listed"):
        load_artifact(copy)
    (copy / "sub").rmdir()
    (copy / "model.so").rename(copy / "real.so")
    (copy / "model.so").symlink_to("real.so")
    with pytest.raises(ConfigError, match="symbolic link|not listed"):
        load_artifact(copy)


def test_bench_refuses_a_tampered_model(x86_artifact, tmp_path):
    from optc.targets.bench import bench_artifact

    copy = _copy_artifact(x86_artifact, tmp_path / "copy")
    onnx_bytes = bytearray((copy / "model.onnx").read_bytes())
    onnx_bytes[-1] ^= 0xFF
    (copy / "model.onnx").write_bytes(bytes(onnx_bytes))
    with pytest.raises(ConfigError, match="'model.onnx' does not match its SHA-256"):
        bench_artifact(copy, repeats=1)
    res = invoke("bench", copy, "--repeats", "1")
    assert res.exit_code == 2 and "'model.onnx' does not match its SHA-256" in res.output


def test_model_copy_is_the_verified_bytes(x86_artifact, tmp_path):
    from optc.targets.artifact import verify_artifact

    copy = _copy_artifact(x86_artifact, tmp_path / "copy")
    original = (copy / "model.onnx").read_bytes()
    with verify_artifact(copy, also_copy=["model.onnx"]) as verified:
        (copy / "model.onnx").write_bytes(b"replaced")
        assert verified.copies["model.onnx"].read_bytes() == original
        assert oct(verified.private.stat().st_mode & 0o777) == "0o700"
    assert not verified.private.exists()


@pytest.mark.parametrize("repeats", ["0", "-3"])
def test_bench_refuses_no_repeats(x86_artifact, repeats):
    from optc.targets.bench import bench_artifact

    with pytest.raises(ConfigError, match="--repeats .*must be 1 or more"):
        bench_artifact(x86_artifact, repeats=int(repeats))
    res = invoke("bench", x86_artifact, "--repeats", repeats)
    assert res.exit_code == 2 and "must be 1 or more" in res.output


def test_missing_tvm_is_a_target_error(x86_artifact):
    """Without TVM, a target build and `optc run` fail with the install command (exit 2), not an internal error."""
    import subprocess
    import sys

    script = f"""
import sys
sys.modules["tvm"] = None  # as if apache-tvm were not installed
from optc.errors import TargetError
from optc.targets.spec import make_target
try:
    make_target("x86")
except TargetError as exc:
    print("spec:", exc)
from optc.cli.main import main
sys.argv = ["optc", "run", {str(x86_artifact)!r}]
main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "spec: " in done.stdout and "pip install 'optc[tvm]'" in done.stdout, done.stdout + done.stderr
    assert done.returncode == 2, done.stderr
    assert "pip install 'optc[tvm]'" in done.stderr and "internal error" not in done.stderr


def test_run_reads_inputs_only_from_regular_files_of_honest_size(x86_artifact, tmp_path):
    """`optc run --input` cannot be made to hang (a FIFO) or to allocate what a header claims (a lying .npy)."""
    import os

    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    res = invoke("run", x86_artifact, "--input", f"input={fifo}")
    assert res.exit_code == 2 and ("not a regular file" in res.output or "FIFO" in res.output), res.output
    lie = tmp_path / "lie.npy"
    with open(lie, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)})
        f.write(b"0" * 16)
    res = invoke("run", x86_artifact, "--input", f"input={lie}")
    assert res.exit_code == 2 and "more than the file holds" in res.output
    ok = tmp_path / "x.npy"
    np.save(ok, np.zeros((1, 1, 28, 28), np.float32))
    res = invoke("run", x86_artifact, "--input", f"input={ok}")
    assert res.exit_code == 0 and "logits" in res.output


def test_compile_report_times_the_artifact_against_onnxruntime(tmp_path):
    """Without --no-latency an x86 compile times the artifact it built against onnxruntime, in turns."""
    out = tmp_path / "o"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "x86", "--tuning-db", tmp_path / "db")
    assert res.exit_code == 0, res.output
    timed = json.loads((out / "report.json").read_text())["target"]["latency"]
    assert timed["artifact_ms"] > 0 and timed["onnxruntime_ms"] > 0 and timed["blocks"] >= 3
    assert timed["ratio"] == pytest.approx(timed["artifact_ms"] / timed["onnxruntime_ms"])
    # onnxruntime at its better setting: its sleeping session (timed in turns with the artifact) or its
    # default, spinning one (timed alone, so that its workers never take the artifact's cores)
    assert timed["onnxruntime_ms"] == min(timed["onnxruntime_quiet_ms"], timed["onnxruntime_spinning_ms"])
    assert timed["max_abs_diff"] < 1e-4
    assert "artifact (x86) on this machine:" in res.output
    ratio = timed["onnxruntime_ms"] / timed["artifact_ms"]
    said = f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"
    assert f"({said}, timed in turns)" in " ".join(res.output.split())
    arm = tmp_path / "arm"
    if __import__("shutil").which("aarch64-linux-gnu-g++"):
        res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", arm, "--input-shape", "input=1x1x28x28", "--target", "arm", "--tuning-db", tmp_path / "db")
        assert res.exit_code == 0, res.output
        assert json.loads((arm / "report.json").read_text())["target"].get("latency") is None  # not runnable here
