"""Data where users keep it: image folders with a declared preprocessing, Python iterables of
feeds, rank-0 and given-once inputs, labels of any storable dtype."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import SAMPLE, make_model, ort_run, rand
from onnx import TensorProto, helper

from optc import api
from optc.cli.main import cli
from optc.data import CalibrationSet, LabelledSet
from optc.data.feeds import from_feeds, labelled_from_feeds
from optc.data.images import ImageFolder, ImagePreprocess, read_images
from optc.errors import ConfigError
from optc.ir import load_model

PIL = pytest.importorskip("PIL.Image")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # how the sample's .npz files were normalised (tests/models/sample/README.md)


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def _pixels(x: np.ndarray) -> np.ndarray:
    """The sample's normalised digits back to their 0..255 pixels (exact: they came from 8-bit MNIST)."""
    return np.rint((x[:, 0] * MNIST_STD + MNIST_MEAN) * 255).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory):
    """Real MNIST test digits as PNG/JPEG-free lossless files: calib/ flat, eval/<label>/ per class."""
    root = tmp_path_factory.mktemp("digits")
    test = np.load(SAMPLE / "test.npz")
    calib = np.load(SAMPLE / "calib.npz")["input"][:96]
    for i, img in enumerate(_pixels(test["input"][:300])):
        folder = root / "eval" / str(int(test["label"][i]))
        folder.mkdir(parents=True, exist_ok=True)
        PIL.fromarray(img).save(folder / f"{i:04d}.png")
    (root / "calib").mkdir()
    for i, img in enumerate(_pixels(calib)):
        PIL.fromarray(img).save(root / "calib" / f"{i:04d}.{'bmp' if i % 2 else 'png'}")
    (root / "pipe.yaml").write_text(f"data:\n  images: {{mean: [{MNIST_MEAN}], std: [{MNIST_STD}]}}\npasses: [canonicalize, quantize]\n")
    return root


def test_image_folder_reads_what_the_npz_holds(digit_folders):
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    prep = ImagePreprocess(mean=(MNIST_MEAN,), std=(MNIST_STD,))
    arrays, labels, files = read_images(ImageFolder(digit_folders / "eval", prep), model, "evaluation", labelled=True)
    test = np.load(SAMPLE / "test.npz")
    # Files are read class by class: line them up with the .npz by their index in the name.
    order = [int(f.stem) for f in files]
    np.testing.assert_allclose(arrays["input"], test["input"][order], atol=1e-5)
    np.testing.assert_array_equal(labels, test["label"][order])
    assert arrays["input"].shape == (300, 1, 28, 28) and arrays["input"].dtype == np.float32


def test_compile_from_image_folders_matches_npz_and_replays(digit_folders, tmp_path):
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--pipeline", digit_folders / "pipe.yaml",
                 "--calib", digit_folders / "calib", "--eval", digit_folders / "eval", "--no-latency")
    assert res.exit_code == 0, res.output
    report = api.Report.from_dict(json.loads((out / "report.json").read_text()))
    accuracy = report.evaluation.accuracy
    assert accuracy.samples == 300
    test = np.load(SAMPLE / "test.npz")
    logits = ort_run(onnx.load(SAMPLE / "mnist_cnn.onnx"), {"input": test["input"][:300]})["logits"]
    assert accuracy.before == pytest.approx(float((logits.argmax(1) == test["label"][:300]).mean()))
    assert abs(accuracy.delta) <= 0.01
    assert [f.path for f in report.calibration_files][:1] == [str(digit_folders / "calib" / "0000.png")]
    # The resolved preprocessing is in pipeline.yaml: replaying it gives the same model, byte for byte.
    text = (out / "pipeline.yaml").read_text()
    assert "images:" in text and "layout: NCHW" in text and "color: L" in text
    again = tmp_path / "again"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", again, "--pipeline", out / "pipeline.yaml",
                 "--calib", digit_folders / "calib", "--eval", digit_folders / "eval", "--no-latency")
    assert res.exit_code == 0, res.output
    assert (again / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()


def test_image_folder_without_a_declared_preprocessing_is_refused(digit_folders, tmp_path):
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "o", "--calib", digit_folders / "calib")
    assert res.exit_code == 2
    assert "holds images: say how they become inputs under data.images" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("yaml_text, message", [
    ("{mean: [0.1], stdd: [1]}", "unknown key 'stdd'"),
    ("{layout: CHWN}", "layout is 'CHWN'; use one of NCHW, NHWC"),
    ("{std: [0]}", "std holds a 0"),
    ("{size: [28]}", "size must be 2 positive integers"),
    ("{color: RGB}", "gives 3 channel(s); input 'input' in NCHW takes 1"),
    ("{mean: [0.1, 0.2]}", "mean has 2 values; give 1 or 1"),
    ("{size: [32, 32]}", "size [32, 32] but input 'input' takes 28x28"),
])
def test_bad_preprocessing_is_one_line_exit_2(digit_folders, tmp_path, yaml_text, message):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(f"data:\n  images: {yaml_text}\npasses: [canonicalize]\n")
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", tmp_path / "o", "--pipeline", pipe, "--calib", digit_folders / "calib")
    assert res.exit_code == 2, res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_damaged_linked_and_misplaced_images_are_refused(digit_folders, tmp_path):
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    prep = ImagePreprocess()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ConfigError, match=r"image a.png: not a readable image"):
        read_images(ImageFolder(broken, prep), model, "calibration", labelled=False)
    linked = tmp_path / "linked"
    linked.mkdir()
    os.symlink(digit_folders / "calib" / "0000.png", linked / "x.png")
    with pytest.raises(ConfigError, match="x.png"):
        read_images(ImageFolder(linked, prep), model, "calibration", labelled=False)
    # Labelled data needs class subfolders; an image beside them has no label.
    flat = digit_folders / "calib"
    with pytest.raises(ConfigError, match="sits outside a class subfolder"):
        read_images(ImageFolder(flat, prep), model, "evaluation", labelled=True)
    with pytest.raises(ConfigError, match="subfolder '2' is not in data.images.classes"):
        read_images(ImageFolder(digit_folders / "eval", ImagePreprocess(classes=("0", "1"))), model, "evaluation", labelled=True)


def test_rgb_resize_crop_bgr_nhwc():
    """The declared steps, in order, on one image whose expected values are computed by hand."""
    img = PIL.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))  # 6 wide, 4 high
    prep = ImagePreprocess(size=(4, 4), resize=4, layout="NHWC", color="BGR", scale=1.0, mean=(1, 2, 3), std=(2, 2, 2),
                           interpolation="nearest")
    x = prep.apply(img, np.dtype(np.float32))
    rgb = np.asarray(img, np.float32)[:, 1:5]  # shorter side already 4: a centre crop of columns 1..4
    np.testing.assert_allclose(x, ((rgb - [1, 2, 3]) / 2)[..., ::-1])
    assert x.shape == (4, 4, 3)


# ------------------------------------------------------------------ Python iterables


def _mlp(tmp_path, seq_dynamic=False):
    w = rand(8, 4, seed=1)
    x = ("x", ["batch", "seq", 8] if seq_dynamic else ["batch", 8])
    y = ("y", ["batch", "seq", 4] if seq_dynamic else ["batch", 4])
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [x], [y], [("w", w)])
    path = tmp_path / "mlp.onnx"
    onnx.save(proto, path)
    return path


def test_iterables_readers_and_varying_shapes(tmp_path):
    model = load_model(_mlp(tmp_path, seq_dynamic=True))
    feeds = [{"x": rand(2, 5, 8, seed=i)} for i in range(3)] + [{"x": rand(3, 7, 8, seed=9)}]
    calib = from_feeds(iter(feeds), model)  # a generator: read once
    assert calib.num_samples == 9
    # Two groups (seq 5 and seq 7), kept apart: no batch mixes two lengths.
    shapes = [b["x"].shape for b in calib.batches(4)]
    assert shapes == [(4, 5, 8), (2, 5, 8), (3, 7, 8)]
    fit, held = calib.hold_out(model)
    assert (fit.num_samples, held.num_samples) == (5, 4)

    class Reader:  # onnxruntime's CalibrationDataReader protocol
        def __init__(self):
            self.items = iter(feeds[:2])

        def get_next(self):
            return next(self.items, None)

    assert from_feeds(Reader(), model).num_samples == 4
    with pytest.raises(ConfigError, match="feed #2: expected a dict"):
        from_feeds([feeds[0], [1, 2]], model)
    with pytest.raises(ConfigError, match="gave no feeds"):
        from_feeds([], model)


def test_compile_with_python_feeds_through_the_default_budget(tmp_path):
    """A generator is read once; the default budget's re-run must not find it exhausted."""
    path = _mlp(tmp_path)

    def feeds():
        for i in range(8):
            yield {"x": rand(16, 8, seed=i)}

    pairs = ((f, np.array(["a"] * 16)) for f in feeds())  # string labels: fine for the report, no top-1
    result = api.compile(path, [api.make_pass("sparsify")], calibration=feeds(), evaluation=pairs)
    assert result.report.evaluation.accuracy is None  # labels are not class indices
    assert result.report.evaluation.fidelity["y"].cosine > 0.98


def test_labels_of_any_storable_dtype(tmp_path):
    model = load_model(_mlp(tmp_path))
    x = rand(6, 8)
    for labels in (np.arange(6), np.linspace(0, 1, 6), np.array(list("abcdef")), np.zeros((6, 3), bool)):
        assert LabelledSet.from_arrays({"x": x}, labels, model).labels.dtype == labels.dtype
    np.savez(tmp_path / "e.npz", x=x, label=np.array(["cat", "dog"] * 3))
    assert not LabelledSet.from_path(tmp_path / "e.npz", model).class_indices
    with pytest.raises(ConfigError, match="of integers, floats, booleans or fixed-width strings; got complex128"):
        LabelledSet.from_arrays({"x": x}, np.zeros(6, complex), model)
    with pytest.raises(ConfigError, match="5 labels for 6 samples"):
        LabelledSet.from_arrays({"x": x}, np.arange(5), model)
    pairs = [({"x": x[:3]}, [0, 1, 2]), ({"x": x[3:]}, 4)]
    with pytest.raises(ConfigError, match="feed #2: 1 labels for 3 samples"):
        labelled_from_feeds(pairs, model)


# ------------------------------------------------------------------ rank-0 and given-once inputs


def _scaled(tmp_path):
    """y = (x @ w) * float(sr) / 16000 + state: a rank-0 sample rate and a recurrent state, as Silero VAD takes."""
    w = rand(8, 4, seed=2)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Div", ["srf", "k"], ["f"], name="div"),
        helper.make_node("Mul", ["h", "f"], ["g"], name="mul"),
        helper.make_node("Add", ["g", "state"], ["y"], name="add"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, []),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 4])]
    proto = make_model(nodes, inputs, [("y", ["batch", 4])], [("w", w), ("k", np.array(16000, np.float32))])
    path = tmp_path / "scaled.onnx"
    onnx.save(proto, path)
    return path


def test_rank0_inputs_given_once_or_per_sample(tmp_path):
    path = _scaled(tmp_path)
    model = load_model(path)
    x = rand(10, 8)
    state = np.zeros((1, 4), np.float32)  # one sample: the same for all
    once = CalibrationSet.from_arrays({"x": x, "sr": np.array(16000), "state": state}, model)
    batches = list(once.batches(4))
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2]
    assert all(b["sr"].shape == () and b["state"].shape == (len(b["x"]), 4) for b in batches)
    per_sample = np.array([16000] * 6 + [8000] * 4)
    mixed = CalibrationSet.from_arrays({"x": x, "sr": per_sample, "state": state}, model)
    # A batch never mixes two sample rates: the model takes one per run.
    assert [(len(b["x"]), int(b["sr"])) for b in mixed.batches(4)] == [(4, 16000), (2, 16000), (4, 8000)]
    np.savez(tmp_path / "c.npz", x=x, sr=np.array(16000), state=state)
    assert CalibrationSet.from_path(tmp_path / "c.npz", model).num_samples == 10
    with pytest.raises(ConfigError, match="the input is a scalar"):
        CalibrationSet.from_arrays({"x": x, "sr": np.zeros((10, 1), np.int64), "state": state}, model)
    with pytest.raises(ConfigError, match=r"different sample counts \(x: 10, sr: 3"):
        CalibrationSet.from_arrays({"x": x, "sr": np.zeros(3, np.int64), "state": state}, model)


def test_rank0_model_runs_through_every_lossy_pass(tmp_path):
    path = _scaled(tmp_path)
    x = rand(64, 8)
    np.savez(tmp_path / "c.npz", x=x, sr=np.array(16000), state=np.zeros((1, 4), np.float32))
    for spec in ("quantize", "sparsify", "prune-channels", "distill"):
        out = tmp_path / spec
        res = invoke("compile", path, "-o", out, "--pass", spec, "--calib", tmp_path / "c.npz", "--no-latency")
        assert res.exit_code == 0, (spec, res.output)
        feeds = {"x": x[:8], "sr": np.array(16000), "state": np.zeros((8, 4), np.float32)}
        got = ort_run(onnx.load(out / "model.onnx"), feeds)["y"]
        want = ort_run(onnx.load(path), feeds)["y"]
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.98, spec


def _state_model(tmp_path, state_shape):
    """y = x + sum(state, axis 0): a recurrent state shaped like Silero VAD's [2, batch, 128]."""
    state = helper.make_tensor_value_info("state", TensorProto.FLOAT, state_shape)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Add", ["x", "s"], ["y"], name="add")]
    proto = make_model(nodes, [x, state], [("y", [1, 4])], [("axes", np.array([0], np.int64))])
    path = tmp_path / "state.onnx"
    onnx.save(proto, path)
    return load_model(path)


def test_a_state_with_its_batch_on_axis_1_is_given_once_or_per_sample(tmp_path):
    """Silero VAD's state is [2, batch, 128]: frozen to [2, 1, 128], its samples sit on axis 1."""
    model = _state_model(tmp_path, [2, 1, 4])
    x = rand(12, 4)
    once = CalibrationSet.from_arrays({"x": x, "state": np.ones((2, 1, 4), np.float32)}, model)
    assert once.num_samples == 12
    feeds = list(once.batches(4))
    assert len(feeds) == 12 and all(f["state"].shape == (2, 1, 4) and f["x"].shape == (1, 4) for f in feeds)

    states = rand(2, 12, 4)  # one state per sample, on axis 1
    per_sample = CalibrationSet.from_arrays({"x": x, "state": states}, model)
    feeds = list(per_sample.batches(4))
    assert per_sample.num_samples == 12 and len(feeds) == 12
    for i, feed in enumerate(feeds):
        np.testing.assert_array_equal(feed["state"], states[:, i:i + 1])
        np.testing.assert_array_equal(feed["x"], x[i:i + 1])
    fit, held = per_sample.hold_out(model)
    assert (fit.num_samples, held.num_samples) == (8, 4)
    np.testing.assert_array_equal(np.concatenate([f["state"] for f in held.batches(1)], axis=1), states[:, [1, 4, 7, 10]])
    np.testing.assert_array_equal(np.concatenate([f["state"] for f in fit.batches(1)], axis=1), states[:, [0, 2, 3, 5, 6, 8, 9, 11]])
    assert len(per_sample.first_samples(3)) == 3

    # Python feeds, one run each, join along the state's sample axis.
    joined = from_feeds([{"x": x[i:i + 1], "state": states[:, i:i + 1]} for i in range(12)], model)
    np.testing.assert_array_equal(np.concatenate([f["state"] for f in joined.batches(1)], axis=1), states)

    np.savez(tmp_path / "c.npz", x=x, state=states)
    assert CalibrationSet.from_path(tmp_path / "c.npz", model).num_samples == 12
    with pytest.raises(ConfigError, match=r"input 'state' \[2x1x4\] holds its samples on axis 1 .* give \[2, N, 4\] for N samples, not \[12, 1, 4\]"):
        CalibrationSet.from_arrays({"x": x, "state": np.ones((12, 1, 4), np.float32)}, model)
    with pytest.raises(ConfigError, match=r"different sample counts \(x: 12, state: 5\)"):
        CalibrationSet.from_arrays({"x": x, "state": rand(2, 5, 4)}, model)
    with pytest.raises(ConfigError, match=r"shape \[2, 12, 3\] has 3 on axis 2, the model expects 4"):
        CalibrationSet.from_arrays({"x": x, "state": rand(2, 12, 3)}, model)


def test_an_input_without_a_sample_axis_is_given_whole(tmp_path):
    """A fixed [2, 3, 4] table beside a batch-1 input has no dim for samples: given once, for every run."""
    model = _state_model(tmp_path, [2, 3, 4])
    calib = CalibrationSet.from_arrays({"x": rand(12, 4), "state": np.ones((2, 3, 4), np.float32)}, model)
    assert calib.num_samples == 12
    assert all(f["state"].shape == (2, 3, 4) for f in calib.batches(4))
    fit, held = calib.hold_out(model)
    assert (fit.num_samples, held.num_samples) == (8, 4)
    with pytest.raises(ConfigError, match=r"has no sample axis .* give it once, as one run takes it, not \[12, 3, 4\]"):
        CalibrationSet.from_arrays({"x": rand(12, 4), "state": np.ones((12, 3, 4), np.float32)}, model)
    # Feeds that give the table once each join only when they give the same table.
    table = np.ones((2, 3, 4), np.float32)
    feeds = [{"x": rand(1, 4), "state": table} for _ in range(4)] + [{"x": rand(1, 4), "state": table * 2}]
    assert [f["state"][0, 0, 0] for f in from_feeds(feeds, model).batches(1)] == [1, 1, 1, 1, 2]


def test_fidelity_is_measured_on_several_runs_when_the_batch_is_fixed_at_1(tmp_path):
    """One calibration sample gave a cosine of 0.005-0.49 on a real OCR detector: measure 8, one run each."""
    path = _mlp(tmp_path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rand(40, 8))
    for data, source in ((calib, "held-out calibration data"), (None, "random inputs")):  # the default budget held 10 out
        result = api.compile(path, [api.make_pass("quantize")] if data else None, calibration=data,
                             input_shapes={"x": (1, 8)}, measure_latency=False)
        evaluation = result.report.evaluation
        assert evaluation.fidelity_samples == 8 and evaluation.fidelity_data.startswith(source)


def test_a_fixed_batch_model_is_evaluated_on_every_sample(tmp_path):
    """Frozen to batch 64, 100 labelled digits are a full feed and 36 left over. The leftovers were dropped (and the
    top-1 metric failed: 'cannot reshape array of size 640 into shape (100, newaxis)'); they now come in one padded
    feed whose padding is cut off, so accuracy and outputs equal the dynamic model's on all 100."""
    from optc.data.labelled import LabelledSet
    from optc.driver import freeze_input_shapes
    from optc.evaluation import accuracy, load_metric
    from optc.evaluation.metrics import model_outputs

    dynamic = load_model(SAMPLE / "mnist_cnn.onnx")
    fixed = dynamic.copy()
    freeze_input_shapes(fixed, {"input": (64, 1, 28, 28)})
    with np.load(SAMPLE / "test.npz") as data:
        x, labels = data["input"][:100], data["label"][:100]
    sets = [LabelledSet.from_arrays({"input": x}, labels, m) for m in (dynamic, fixed)]
    assert [n for _, n in sets[1].inputs.padded_batches(16)] == [64, 36]
    outs = [model_outputs(m, s.inputs) for m, s in zip((dynamic, fixed), sets)]
    assert len(outs[1]["logits"]) == 100
    np.testing.assert_allclose(outs[1]["logits"], outs[0]["logits"], rtol=1e-5, atol=1e-5)
    assert accuracy(fixed, sets[1]) == accuracy(dynamic, sets[0]) and 0.9 < accuracy(fixed, sets[1]) < 1
    top1 = load_metric("top1")
    assert top1(outs[1], labels) == top1(outs[0], labels) == accuracy(dynamic, sets[0])


def test_outputs_that_do_not_lead_with_the_batch_are_kept_whole(tmp_path):
    """A CTC OCR model at a fixed batch of 1 returns [T, 1, C]: trimming every output to the feed's real samples cut
    it to its first time step, and the default budget compared one frame of ddddocr's 22."""
    from optc.evaluation.metrics import model_outputs

    shape = onnx.numpy_helper.from_array(np.array([3, 1, 2], np.int64), "shape")
    model_proto = helper.make_model(helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 1, 2])], [shape]), opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model_proto, tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx")
    x = rand(5, 6)
    out = model_outputs(model, CalibrationSet.from_arrays({"x": x}, model))["y"]
    assert out.shape == (15, 1, 2)
    np.testing.assert_array_equal(out, x.reshape(5, 3, 1, 2).reshape(15, 1, 2))
