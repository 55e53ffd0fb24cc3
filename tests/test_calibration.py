"""Calibration data: validation against the model, batching, streamed activation capture."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import BAD, SAMPLE, make_model, rand
from onnx import TensorProto, helper

from optc.errors import ConfigError
from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet, capture_activations

CASES = [c for c in json.loads((BAD / "cases.json").read_text()) if c["kind"] == "calib"]


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_bad_calibration_files_are_refused(case):
    model = load_model(BAD / case["model"])
    with pytest.raises(ConfigError) as err:
        CalibrationSet.from_path(BAD / case["file"], model)
    message = str(err.value).lower().replace(case["file"].split("/")[-1].lower(), "<file>")
    assert case["expect"].lower() in message


def test_good_calibration_and_batches():
    model = load_model(BAD / "good_tiny.onnx")
    calib = CalibrationSet.from_path(BAD / "bad_calib" / "good.npz", model)
    assert calib.num_samples == 16
    sizes = [len(b["x"]) for b in calib.batches(5)]
    assert sizes == [5, 5, 5, 1]
    assert len(calib.take(4)["x"]) == 4


def test_folder_of_files_and_fixed_batch(tmp_path, save):
    model = load_model(save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2, 3])], [("y", [2, 3])])))
    np.savez(tmp_path / "a.npz", x=rand(5, 3))
    np.savez(tmp_path / "b.npz", x=rand(4, 3))
    calib = CalibrationSet.from_path(tmp_path, model)
    assert calib.num_samples == 9
    # The model's batch is fixed to 2: every batch has exactly 2 samples.
    assert [len(b["x"]) for b in calib.batches(16)] == [2, 2, 2, 2]


def test_fewer_samples_than_the_fixed_batch_are_refused(tmp_path, save):
    model = load_model(save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [8, 3])], [("y", [8, 3])])))
    np.savez(tmp_path / "a.npz", x=rand(16, 3))
    np.savez(tmp_path / "b.npz", x=rand(5, 3))  # enough in total, not in this file: batches never span files
    with pytest.raises(ConfigError, match=r"b.npz: 5 samples, fewer than the model's fixed batch of 8"):
        CalibrationSet.from_path(tmp_path, model)


def test_missing_path_and_empty_folder(tmp_path):
    model = load_model(BAD / "good_tiny.onnx")
    with pytest.raises(ConfigError, match="no such file"):
        CalibrationSet.from_path(tmp_path / "nope.npz", model)
    with pytest.raises(ConfigError, match="no .npz files"):
        CalibrationSet.from_path(tmp_path, model)


def test_capture_activations_streams_in_groups():
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    convs = [n.output[0] for n in model.graph.node if n.op_type == "Conv"]
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}

    def reduce(name, value):
        sums[name] = sums.get(name, 0.0) + float(np.abs(value).sum())
        counts[name] = counts.get(name, 0) + len(value)

    # A tiny budget forces one tensor per onnxruntime session.
    capture_activations(model, calib, convs, reduce, batch_size=50, max_batches=2, max_bytes_per_run=1, tensor_bytes={c: 10 for c in convs})
    assert set(sums) == set(convs)
    assert all(counts[c] == 100 for c in convs)
    assert all(v > 0 for v in sums.values())


def test_capture_activations_sizes_batches_by_the_inferred_shapes():
    """No sizes given: they are read from the shapes, and a tensor too large for the batch asked is captured in
    smaller ones (DNSMOS: 74 MB a clip per tensor, quantize killed at 20.9 GB with 16 clips a run)."""
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    first = next(n.output[0] for n in model.graph.node if n.op_type == "Conv")
    per_sample = 4 * int(np.prod(np.load(SAMPLE / "calib.npz")["input"].shape[1:]))  # below the conv output's size: 3 samples a run at most
    seen: list[int] = []
    capture_activations(model, calib, [first], lambda name, value: seen.append(len(value)), batch_size=16,
                        max_bytes_per_run=3 * per_sample)
    assert sum(seen) == calib.num_samples and max(seen) < 16
    seen.clear()
    capture_activations(model, calib, [first], lambda name, value: seen.append(len(value)), batch_size=16, max_batches=2,
                        max_bytes_per_run=3 * per_sample)
    assert sum(seen) == 32  # max_batches counts batches of the size asked


def test_samples_a_run_takes_follow_the_largest_activation():
    from optc.data.calibration import samples_per_run

    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    assert samples_per_run(model, 64) == 64  # a small model: as asked
    one = 4 * 28 * 28  # its input alone, a lower bound of its largest activation
    assert samples_per_run(model, 64, max_bytes=3 * one * 8) <= 8
    assert samples_per_run(model, 64, max_bytes=1) == 1


def _token_model(save):
    """ids [b, s] float features, attention_mask [b, s] int64; y = x * 2 per token."""
    nodes = [helper.make_node("Mul", ["x", "two"], ["y"], name="m")]
    two = helper.make_tensor("two", 1, [1], [2.0])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["b", 3])
    return load_model(save(make_model(nodes, [("x", ["b", 3, 2]), mask], [("y", ["b", 3, 2])], [two])))


def test_padding_rows_are_dropped_under_the_token_mask(tmp_path, save):
    model = _token_model(save)
    x = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    np.savez(tmp_path / "c.npz", x=x, attention_mask=mask)
    seen = []
    calib = CalibrationSet.from_path(tmp_path / "c.npz", model)
    assert calib.token_mask == "attention_mask"
    capture_activations(model, calib, ["y"], lambda n, v: seen.append(v))
    np.testing.assert_array_equal(seen[0], (x[mask.astype(bool)] * 2)[None])
    # Masking off: every row, padded or not.
    seen.clear()
    capture_activations(model, CalibrationSet.from_path(tmp_path / "c.npz", model, token_mask=None), ["y"], lambda n, v: seen.append(v))
    np.testing.assert_array_equal(seen[0], x * 2)


def test_a_token_mask_must_be_a_rank_2_model_input(tmp_path, save):
    model = _token_model(save)
    np.savez(tmp_path / "c.npz", x=np.zeros((1, 3, 2), np.float32), attention_mask=np.ones((1, 3), np.int64))
    with pytest.raises(ConfigError, match="not a model input"):
        CalibrationSet.from_path(tmp_path / "c.npz", model, token_mask="mask")
    with pytest.raises(ConfigError, match="rank 3"):
        CalibrationSet.from_path(tmp_path / "c.npz", model, token_mask="x")


def test_sets_from_arrays_in_memory_match_the_same_data_from_a_file(tmp_path):
    """Python users bring arrays: the set checks them as it checks files, and yields the same batches."""
    from optc.data import LabelledSet

    model = load_model(SAMPLE / "mnist_cnn.onnx")
    with np.load(SAMPLE / "calib.npz") as f:
        x = f["input"][:40]
    in_memory = CalibrationSet.from_arrays({"input": x}, model)
    np.savez(tmp_path / "c.npz", input=x)
    on_disk = CalibrationSet.from_path(tmp_path / "c.npz", model)
    assert in_memory.num_samples == on_disk.num_samples == 40 and in_memory.files == ()
    for a, b in zip(in_memory.batches(16), on_disk.batches(16), strict=True):
        np.testing.assert_array_equal(a["input"], b["input"])
    with pytest.raises(ConfigError, match="dtype float64, the model expects float32"):
        CalibrationSet.from_arrays({"input": x.astype(np.float64)}, model)
    with pytest.raises(ConfigError, match="no array for model input 'input'"):
        CalibrationSet.from_arrays({"x": x}, model)
    labelled = LabelledSet.from_arrays({"input": x}, np.arange(40) % 10, model)
    assert labelled.inputs.num_samples == 40
    with pytest.raises(ConfigError, match="39 labels for 40 samples"):
        LabelledSet.from_arrays({"input": x}, np.arange(39), model)
