"""Calibration data: validation against the model, batching, streamed activation capture."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import BAD, SAMPLE, make_model, rand
from onnx import helper

from optc.errors import ConfigError
from optc.ir import infer_shapes, load_model
from optc.passes import CalibrationSet, capture_activations

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
