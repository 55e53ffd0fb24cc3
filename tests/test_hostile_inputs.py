"""Hostile inputs: small files that ask for unbounded memory or time, escape the
model folder, or break the one-line error contract (the corpus's first cases;
by class, the rest are in ``test_hostile_models``, ``_data``, ``_pipeline_files``,
``_cli`` and ``_artifacts``).

Every case is built in ``tmp_path`` (bombs are small on disk) and run through
the real CLI, under the contract and limits of :mod:`hostile`: exit code 2,
exactly one line on stderr (``optc: error: ...``), no traceback, nothing left
behind, within :data:`hostile.TIME_LIMIT_S` and :data:`hostile.MEMORY_LIMIT`.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import SAMPLE, make_model
from hostile import (
    YAML_BOMB,
    assert_bad_input,
    deflate_bomb,
    external_model,
    invoke,
    loop_model,
    npy_header,
    run_optc,
    sample_npz_member,
    save,
    set_dims,
    sparse_model,
    tiny_model,
    write_zip,
)
from onnx import TensorProto, helper
from optc.cli.main import cli

# --------------------------------------------------------------------------- resource bombs (subprocess, limited)


def test_npz_deflate_bomb_is_refused_from_its_directory(tmp_path):
    """3.5 MB on disk, 3.5 GB declared (over the memory limit): refused before decompression."""
    n = 1_198_372  # samples of [1, 28, 28] float32: 3.76e9 bytes
    bomb = deflate_bomb(tmp_path / "bomb.npz", "input.npy", npy_header("<f4", (n, 1, 28, 28)), n * 3136)
    assert bomb.stat().st_size < 8 << 20
    result = run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", bomb, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "split the data into a folder")


def test_npz_member_inflating_past_its_declared_size_is_bounded(tmp_path):
    """The directory declares 8 samples; the stream inflates to 3.5 GB. zipfile stops at the declared size."""
    header = npy_header("<f4", (8, 1, 28, 28))
    bomb = deflate_bomb(tmp_path / "liar.npz", "input.npy", header, 224 * (1 << 24), declared=len(header) + 8 * 3136)
    result = run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", bomb, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "cannot be read")


def test_npz_header_declaring_petabytes(tmp_path):
    npz = write_zip(tmp_path / "huge.npz", {"input.npy": npy_header("<f4", (10**11, 1, 28, 28))})
    assert_bad_input(run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", npz, workdir=tmp_path), "declares")


@pytest.mark.parametrize("kind", ["symlink-to-dev-zero", "fifo"])
def test_calibration_folder_reads_only_regular_files(tmp_path, kind):
    folder = tmp_path / "calib"
    folder.mkdir()
    shutil.copy(SAMPLE / "calib.npz", folder / "a.npz")
    if kind == "fifo":
        os.mkfifo(folder / "b.npz")
    else:
        os.symlink("/dev/zero", folder / "b.npz")
    result = run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", folder, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "b.npz")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_device_or_fifo_given_directly(tmp_path, target):
    if target == "fifo":
        target = tmp_path / "pipe.npz"
        os.mkfifo(target)
    assert_bad_input(run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", target, workdir=tmp_path), "regular file")


@pytest.mark.parametrize("target", ["/dev/zero", "fifo"])
def test_model_path_that_is_a_device_or_fifo(tmp_path, target):
    if target == "fifo":
        target = tmp_path / "pipe.onnx"
        os.mkfifo(target)
    assert_bad_input(run_optc("inspect", "--no-tvm", target, workdir=tmp_path), "regular file")


def test_yaml_alias_bomb(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(YAML_BOMB)
    assert len(YAML_BOMB) < 1024
    assert_bad_input(run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--pipeline", path, workdir=tmp_path), "anchors")


def test_pipeline_file_that_is_a_fifo(tmp_path):
    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    assert_bad_input(run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--pipeline", path, workdir=tmp_path), "pipeline file")


def test_input_name_of_100000_characters(tmp_path):
    name = "a" * 100_000
    proto = make_model([helper.make_node("Relu", [name], ["y"], name="r")], [(name, [1, 4])], [("y", [1, 4])])
    assert_bad_input(run_optc("inspect", "--no-tvm", save(proto, tmp_path / "m.onnx"), workdir=tmp_path), "4096")


def test_nested_loop_of_10_to_the_18_iterations_is_compiled_without_running_it(tmp_path):
    """A valid model optc will not run: written, with fidelity and latency skipped and the reason in the report."""
    model = save(loop_model(1000, 6), tmp_path / "loop.onnx")
    result = run_optc("compile", model, "-o", tmp_path / "out", "--verify-each", workdir=tmp_path)
    assert result.code == 0, result.stderr
    assert "--verify-each not measured: Loop node" in result.stderr and "Traceback" not in result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "beyond optc's limit" in report["evaluation"]["fidelity_data"]
    assert report["evaluation"]["fidelity"] == {}


def test_data_driven_pass_on_a_loop_it_cannot_run_is_refused(tmp_path):
    model = save(loop_model(1000, 6), tmp_path / "loop.onnx")
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones(8, np.float32))
    result = run_optc("compile", model, "-o", tmp_path / "out", "--calib", calib, "--pass", "quantize", workdir=tmp_path)
    assert_bad_input(result, "optc does not run such a model")


def test_input_shape_beyond_int64(tmp_path):
    result = run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--input-shape", f"input={2**63}x1x28x28", workdir=tmp_path)
    assert_bad_input(result, "at most")


def test_input_shape_too_large_for_sample_inputs(tmp_path):
    """Valid, but random inputs would take 6 GB: written, with fidelity skipped and why (bounded, not refused)."""
    result = run_optc("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--input-shape", "input=2000000x1x28x28", "--no-latency", workdir=tmp_path)
    assert result.code == 0, result.stderr
    assert "random sample inputs would take over" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["compile"], ["inspect"], ["compile", "--bogus"], ["nosuch"], ["inspect", "--input-shape"]])
def test_usage_errors_are_one_line(args):
    assert_bad_input(run_optc(*args), "")


# --------------------------------------------------------------------------- malformed models (in process)


def _typed(proto: onnx.ModelProto, edit: Callable[[onnx.TensorProto], None]) -> onnx.ModelProto:
    edit(proto.graph.initializer[0])
    return proto


def _negative_input() -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [-2, 4])], [("y", [-2, 4])])  # -1 is read as dynamic (paddle2onnx)


def _unknown_input_type() -> onnx.ModelProto:
    proto = tiny_model()
    proto.graph.input[0].type.tensor_type.elem_type = 99
    return proto


MODEL_CASES = {
    "data-type-99": (lambda: _typed(tiny_model(), lambda t: setattr(t, "data_type", 99)), "data type 99"),
    "input-type-99": (_unknown_input_type, "element type 99"),
    "negative-dims": (lambda: _typed(tiny_model(), lambda t: set_dims(t, [-4, -3])), "negative"),
    "negative-input-dim": (_negative_input, "negative dim"),
    "dims-without-data": (lambda: _typed(tiny_model(), lambda t: set_dims(t, [1 << 20, 1 << 20])), "need"),
    "dims-overflowing-int64": (lambda: _typed(tiny_model(), lambda t: set_dims(t, [1 << 32, 1 << 32])), "need"),
    "sparse-count-mismatch": (lambda: sparse_model(np.ones(3, np.float32), np.array([0, 5], np.int64), [4, 3]), "do not match"),
    "sparse-index-out-of-range": (lambda: sparse_model(np.ones(2, np.float32), np.array([0, 99], np.int64), [4, 3]), "outside"),
    "sparse-exabyte": (lambda: sparse_model(np.ones(2, np.float32), np.array([0, 5], np.int64), [1 << 30, 1 << 30]), "limit"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_malformed_models(tmp_path, case):
    build, expect = MODEL_CASES[case]
    assert_bad_input(invoke("inspect", "--no-tvm", save(build(), tmp_path / "m.onnx"), workdir=tmp_path), expect)


def test_node_limit(tmp_path, monkeypatch):
    import optc.ir.validate

    monkeypatch.setattr(optc.ir.validate, "MAX_NODES", 100)
    nodes = [helper.make_node("Relu", [f"t{i}"], [f"t{i + 1}"], name=f"n{i}") for i in range(101)]
    proto = make_model(nodes, [("t0", [1, 4])], [("t101", [1, 4])])
    assert_bad_input(invoke("inspect", "--no-tvm", save(proto, tmp_path / "m.onnx"), workdir=tmp_path), "more than 100 nodes")


def test_ort_refuses_at_session_creation(tmp_path):
    """Relu on int16 passes onnx's checker; onnxruntime has no kernel for it (NOT_IMPLEMENTED, not Fail).

    With the user's data the error stands (with random inputs fidelity is skipped instead, see driver.measure_input).
    """
    proto = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.INT16, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.INT16, ["N", 2])],
    )
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((4, 2), np.int16))
    result = invoke("compile", save(proto, tmp_path / "m.onnx"), "-o", tmp_path / "out", "--calib", calib, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "onnxruntime")


def test_ort_fails_while_running(tmp_path):
    """A Gather index beyond its data passes every static check; onnxruntime fails on it at run time (INVALID_ARGUMENT)."""
    proto = make_model(
        [helper.make_node("Gather", ["x", "idx"], ["y"], name="g", axis=1)], [("x", ["N", 4])], [("y", ["N", 1])], [("idx", np.array([10], np.int64))]
    )
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.ones((4, 4), np.float32))
    result = invoke("compile", save(proto, tmp_path / "m.onnx"), "-o", tmp_path / "out", "--calib", calib, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "onnxruntime")


# --------------------------------------------------------------------------- external data containment


def test_hard_link_to_a_file_outside_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"s" * 48)
    path = external_model(tmp_path / "m", "w.bin")
    os.link(secret, tmp_path / "m" / "w.bin")
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), "hard links")


def test_directory_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "w.bin").write_bytes(np.ones((4, 3), np.float32).tobytes())
    path = external_model(tmp_path / "m", "sub/w.bin")
    os.symlink(tmp_path / "outside", tmp_path / "m" / "sub")
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), "outside the model folder")


def test_relative_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "w.bin").write_bytes(np.ones((4, 3), np.float32).tobytes())
    path = external_model(tmp_path / "m", "w.bin")
    os.symlink("../w.bin", tmp_path / "m" / "w.bin")
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), "outside the model folder")


def test_symlink_loop(tmp_path):
    path = external_model(tmp_path / "m", "loop.bin")
    os.symlink("loop.bin", tmp_path / "m" / "loop.bin")
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), "loop")


def test_nul_byte_in_location(tmp_path):
    assert_bad_input(invoke("inspect", "--no-tvm", external_model(tmp_path / "m", "a\0b.bin"), workdir=tmp_path), "nul byte")


def test_fifo_as_external_data(tmp_path):
    path = external_model(tmp_path / "m", "w.bin")
    os.mkfifo(tmp_path / "m" / "w.bin")
    assert_bad_input(run_optc("inspect", "--no-tvm", path, workdir=tmp_path), "not a regular file")


def test_external_length_disagreeing_with_dims(tmp_path):
    path = external_model(tmp_path / "m", "w.bin", write_data=True)
    with open(tmp_path / "m" / "w.bin", "ab") as f:
        f.write(b"\0" * 16)
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "length":
            entry.value = "64"
    save(proto, path)
    assert_bad_input(invoke("inspect", "--no-tvm", path, workdir=tmp_path), "need 48")


def test_symlinks_inside_the_folder_still_load(tmp_path):
    path = external_model(tmp_path / "m", "sub/w.bin")
    (tmp_path / "m" / "real").mkdir()
    (tmp_path / "m" / "real" / "data.bin").write_bytes(np.ones((4, 3), np.float32).tobytes())
    os.symlink("real", tmp_path / "m" / "sub")
    os.symlink("data.bin", tmp_path / "m" / "real" / "w.bin")
    result = invoke("inspect", "--no-tvm", path, workdir=tmp_path)
    assert result.code == 0, result.stderr


# --------------------------------------------------------------------------- calibration archives


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


NPZ_CASES = {
    "object-array": ({"input.npy": _npy(np.array([None, 1], dtype=object))}, "only plain numeric"),
    "pickled-member": ({"input.npy": b"\x80\x04\x95" + b"\0" * 40}, "no readable .npy header"),
    "bad-header": ({"input.npy": b"\x93NUMPY\x01\x00\x10\x00{'descr': 'zz', }\n"}, "no readable .npy header"),
    "not-npy-member": ({"input.npy": sample_npz_member(), "notes.txt": b"hello"}, "not an .npy array"),
    "short-member": ({"input.npy": sample_npz_member()[:-100]}, "its member holds"),
    "scalar": ({"input.npy": _npy(np.float32(1))}, "scalar"),
    "structured": ({"input.npy": _npy(np.zeros(3, "f4,i4"))}, "only plain numeric"),
}


@pytest.mark.parametrize("case", sorted(NPZ_CASES))
def test_malformed_npz(tmp_path, case):
    members, expect = NPZ_CASES[case]
    npz = write_zip(tmp_path / "c.npz", members)
    result = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", npz, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, expect)


def test_object_labels_in_evaluation_data(tmp_path):
    npz = write_zip(tmp_path / "e.npz", {"input.npy": sample_npz_member(), "label.npy": _npy(np.array(["cat"] * 8, dtype=object))})
    result = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--eval", npz, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "only plain numeric")


def test_corrupt_deflate_stream(tmp_path):
    npz = write_zip(tmp_path / "c.npz", {"input.npy": sample_npz_member()})
    raw = bytearray(npz.read_bytes())
    raw[200:260] = b"\xff" * 60  # inside the compressed data, after the header
    npz.write_bytes(bytes(raw))
    result = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "out", "--calib", npz, "--no-latency", workdir=tmp_path)
    assert_bad_input(result, "c.npz")


# --------------------------------------------------------------------------- display


def test_markup_and_escape_sequences_in_names_are_shown_not_obeyed(tmp_path):
    proto = make_model([helper.make_node("Relu", ["[/x]"], ["[bold]y\x1b[31m"], name="[/n]")], [("[/x]", ["[b]", 4])], [("[bold]y\x1b[31m", ["[b]", 4])])
    proto.producer_name = "[/p]\x1b]0;title\x07"
    res = CliRunner().invoke(cli, ["inspect", "--no-tvm", str(save(proto, tmp_path / "m.onnx"))], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout
    assert "[/x]: float32 [[b]x4]" in res.stdout
    assert "[bold]y\\x1b[31m" in res.stdout and "[/p]\\x1b]0;title\\x07" in res.stdout


def test_sample_input_shape_is_shown():
    res = CliRunner().invoke(cli, ["inspect", "--no-tvm", str(SAMPLE / "mnist_cnn.onnx")], catch_exceptions=False)
    assert "input: float32 [batchx1x28x28]" in res.stdout


def test_pass_table_wraps_off_a_terminal(tmp_path):
    res = CliRunner().invoke(
        cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(tmp_path / "out"), "--no-latency", "--time-passes",
              "--pass", "canonicalize", "--pass", "quantize", "--calib", str(SAMPLE / "calib.npz")], catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    table = [line for line in res.stdout.splitlines() if line.startswith(("┃", "│", "┏", "└"))]
    assert table and all(line.endswith(("┃", "│", "┓", "┘")) for line in table)  # no line cut at the right edge
    what_it_did = "".join(line.split("│")[-2].strip() for line in table if line.startswith("│"))
    assert "weight_bytes_after=" in what_it_did  # whole, if folded


def test_escape_sequences_in_error_lines_are_shown_not_obeyed(tmp_path):
    name = "\x1b]0;owned\x07\x1b[2J"
    proto = make_model(
        [helper.make_node("Relu", ["x"], [name], name="a"), helper.make_node("Relu", ["x"], [name], name="b")], [("x", [1])], [(name, [1])]
    )
    result = invoke("inspect", "--no-tvm", save(proto, tmp_path / "m.onnx"), workdir=tmp_path)
    assert_bad_input(result, "duplicate")
    assert "\x1b" not in result.stderr and "\x07" not in result.stderr and "\\x1b]0;owned\\x07" in result.stderr


def test_calibration_file_replaced_after_validation(tmp_path):
    from optc.data import CalibrationSet
    from optc.errors import ConfigError
    from optc.ir import load_model

    model = load_model(SAMPLE / "mnist_cnn.onnx")
    path = tmp_path / "c.npz"
    np.savez(path, input=np.zeros((8, 1, 28, 28), np.float32))
    calib = CalibrationSet.from_path(path, model)
    np.savez(tmp_path / "other.npz", input=np.zeros((9, 1, 28, 28), np.float32))
    os.replace(tmp_path / "other.npz", path)
    with pytest.raises(ConfigError, match="changed after it was checked"):
        next(calib.batches(4))
