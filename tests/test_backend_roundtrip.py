"""IR round trip on a peer's suite: the models with test data that ship in the onnx wheel.

Each model is loaded and saved through optc, then run in onnxruntime; the
outputs must equal what onnxruntime gives for the original file. Models that
onnxruntime itself cannot run are skipped (and the skip says why).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from optc.ir import load_model, save_model

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
SUITES = ("pytorch-converted", "pytorch-operator", "simple")
CASES = sorted(p.parent for s in SUITES for p in (DATA / s).glob("*/model.onnx") if (p.parent / "test_data_set_0").is_dir())


def _inputs(case: Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    files = sorted((case / "test_data_set_0").glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    inits = {t.name for t in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    feeds = {}
    for name, f in zip(names, files):
        t = onnx.TensorProto()
        t.ParseFromString(f.read_bytes())
        feeds[name] = numpy_helper.to_array(t)
    return feeds


def _run(path: Path, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def test_suite_is_present():
    assert len(CASES) >= 100, f"only {len(CASES)} backend models found under {DATA}"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_round_trip_equals_original(case: Path, tmp_path):
    original = onnx.load(str(case / "model.onnx"))
    feeds = _inputs(case, original)
    try:
        expected = _run(case / "model.onnx", feeds)
    except Exception as exc:  # onnxruntime's own limits, not optc's
        pytest.skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}")
    out = tmp_path / "model.onnx"
    save_model(load_model(case / "model.onnx"), out)
    got = _run(out, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.parent.name}/{c.name}" for c in CASES])
def test_compile_with_defaults_writes_every_runnable_model(case: Path, tmp_path):
    """`optc compile MODEL -o OUT` on every model onnxruntime runs: where random inputs cannot be valid
    (a shape tensor, a split size, strings) the fidelity check is skipped with the reason, and the model written."""
    from optc import api

    original = onnx.load(str(case / "model.onnx"))
    try:
        _run(case / "model.onnx", _inputs(case, original))
    except Exception as exc:  # onnxruntime's own limits, not optc's
        pytest.skip(f"onnxruntime cannot run the original: {str(exc).splitlines()[0][:120]}")
    result = api.compile(case / "model.onnx", output=tmp_path / "out", measure_latency=False)
    assert (tmp_path / "out" / "model.onnx").is_file()
    evaluation = result.report.evaluation
    if evaluation.fidelity_samples == 0:
        assert evaluation.fidelity_data.startswith("not measured: random inputs cannot be valid")
        assert any("not measured" in n for n in result.report.notes)
    else:
        assert all(f.max_abs <= 1e-4 or f.cosine >= 0.9999 for f in evaluation.fidelity.values())


def test_a_model_onnxruntime_cannot_load_is_still_refused_without_data(tmp_path):
    """Skipping fidelity is for random inputs that cannot be valid, not for a model onnxruntime refuses to load."""
    from helpers import make_model
    from onnx import TensorProto, helper

    from optc import api
    from optc.errors import OptcError

    x = helper.make_tensor_value_info("x", TensorProto.INT16, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.INT16, [2, 3])
    path = tmp_path / "relu_int16.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [x], [y]), path)  # no int16 Relu kernel
    with pytest.raises(OptcError, match="onnxruntime"):
        api.compile(path, output=tmp_path / "out", measure_latency=False)
    assert not (tmp_path / "out").exists()
