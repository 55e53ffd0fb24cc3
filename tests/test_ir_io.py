"""Loading and saving: external data safety, Constant lifting, toposort, atomic writes."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from helpers import BAD, assert_same_outputs, load_tool, make_model, ort_run, rand
from onnx import helper, numpy_helper

from optc.errors import ModelLoadError
from optc.ir import load_model, save_model
from optc.ir.model import Model


def _mlp() -> onnx.ModelProto:
    return make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [("x", [2, 64])],
        [("y", [2, 32])],
        [("W", rand(64, 32))],
    )


def test_round_trip_preserves_outputs(save, tmp_path):
    proto = _mlp()
    model = load_model(save(proto))
    out = tmp_path / "out" / "m.onnx"
    assert save_model(model, out) == [out]
    again = onnx.load(str(out))
    onnx.checker.check_model(again)
    assert_same_outputs(proto, again, {"x": rand(2, 64, seed=1)}, atol=0, rtol=0)


def test_external_data_round_trip_and_alignment(save, tmp_path):
    proto = _mlp()
    model = load_model(save(proto))
    out = tmp_path / "ext" / "m.onnx"
    files = save_model(model, out, external_data=True)
    assert files == [out, out.with_name("m.onnx.data")]
    skeleton = onnx.load(str(out), load_external_data=False)
    w = skeleton.graph.initializer[0]
    assert w.data_location == onnx.TensorProto.EXTERNAL
    info = {e.key: e.value for e in w.external_data}
    assert info["location"] == "m.onnx.data" and int(info["offset"]) % 4096 == 0
    # The in-memory model is untouched by saving with external data.
    assert model.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    assert_same_outputs(proto, load_model(out).proto, {"x": rand(2, 64, seed=2)}, atol=0, rtol=0)


def test_save_is_atomic_on_failure(save, tmp_path, monkeypatch):
    model = load_model(save(_mlp()))
    out = tmp_path / "keep.onnx"
    save_model(model, out)
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("optc.ir.io._write_file", boom)
    monkeypatch.setattr("optc.ir.io._write_streamed", boom)
    with pytest.raises(OSError):
        save_model(model, out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize(
    "location,expect",
    [("/etc/passwd", "absolute"), ("../secret.bin", "'..'"), ("sub/../../x.bin", "'..'"), ("missing.bin", "missing")],
)
def test_external_locations_refused(tmp_path, location, expect):
    proto = _mlp()
    t = proto.graph.initializer[0]
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match=expect):
        load_model(path)


def test_symlink_escape_refused(tmp_path):
    tool = load_tool("make_bad_models")
    path = tool.make_symlink_escape(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="outside the model folder"):
        load_model(path)


def test_symlink_inside_folder_is_fine(tmp_path):
    proto = _mlp()
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save_model(proto, str(folder / "m.onnx"), save_as_external_data=True, location="real.bin", size_threshold=0)
    os.rename(folder / "real.bin", folder / "data.bin")
    os.symlink(folder / "data.bin", folder / "real.bin")
    load_model(folder / "m.onnx")


def test_constant_nodes_are_lifted(save):
    w = rand(4, 3)
    proto = make_model(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w), name="cw"),
            helper.make_node("Constant", [], ["s"], value_float=2.0, name="cs"),
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Mul", ["h", "s"], ["y"], name="mul"),
        ],
        [("x", [1, 4])],
        [("y", [1, 3])],
    )
    model = load_model(save(proto))
    assert "Constant" not in model.op_histogram()
    assert model.initializer_names == {"W", "s"}
    np.testing.assert_array_equal(model.initializer_array("W"), w)
    assert any("lifted 2" in n for n in model.notes)
    assert_same_outputs(proto, model.proto, {"x": rand(1, 4)}, atol=0, rtol=0)


def test_unsorted_graph_is_toposorted(save):
    proto = make_model(
        [helper.make_node("Relu", ["h"], ["y"], name="second"), helper.make_node("Neg", ["x"], ["h"], name="first")],
        [("x", [3])],
        [("y", [3])],
    )
    model = load_model(save(proto))
    assert [n.name for n in model.graph.node] == ["first", "second"]
    x = rand(3)
    np.testing.assert_array_equal(ort_run(model.proto, {"x": x})["y"], np.maximum(-x, 0))


def test_unnamed_nodes_get_names(save):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"])], [("x", [3])], [("y", [3])])
    model = load_model(save(proto))
    assert model.graph.node[0].name == "Relu_0"


def test_subgraph_outer_scope_reads_are_not_dangling(save):
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [], [helper.make_tensor_value_info("t", 1, [3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [helper.make_tensor_value_info("e", 1, [3])])
    proto = make_model(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="if")],
        [helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, []), ("x", [3])],
        [("y", [3])],
    )
    load_model(save(proto))


def test_good_tiny_loads():
    model = load_model(BAD / "good_tiny.onnx")
    assert isinstance(model, Model) and model.opset == 17


def _concat(b_shape: list[int]) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("Concat", ["a", "b"], ["y"], axis=0, name="cat")],
        [("a", [2, 3]), ("b", b_shape)],
        [("y", ["n", 3])],
    )


@pytest.mark.parametrize(
    "proto,expect",
    [
        (_concat([2, 3, 4]), "node 'cat' (Concat): All inputs to Concat must have same rank"),
        (
            make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", [2, 3])], [("y", [2, 4])], [("W", rand(5, 4))]),
            "node 'mm' (MatMul): Incompatible dimensions",
        ),
    ],
    ids=["concat-rank", "matmul-dims"],
)
def test_inconsistent_shapes_refused_at_load(save, proto, expect):
    path = save(proto)
    with pytest.raises(ModelLoadError, match="fails ONNX shape inference at " + expect.replace("(", r"\(").replace(")", r"\)")) as info:
        load_model(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    load_model(path, check=False)  # the check is what refuses it


def test_wrong_declared_shapes_still_load(save):
    """Declared shapes that disagree with inference are annotations onnxruntime
    overrides with a warning, not inconsistencies; they must not reject the model,
    nor make a consistent node downstream look inconsistent."""
    proto = make_model(
        [
            helper.make_node("Relu", ["x"], ["h"], name="relu"),
            helper.make_node("Concat", ["h", "x"], ["y"], axis=0, name="cat"),
        ],
        [("x", [2, 3])],
        [("y", [5, 7])],  # really [4, 3]
    )
    proto.graph.value_info.append(helper.make_tensor_value_info("h", onnx.TensorProto.FLOAT, [2, 3, 4]))  # really [2, 3]
    model = load_model(save(proto))
    x = rand(2, 3)
    np.testing.assert_array_equal(ort_run(model.proto, {"x": x})["y"], np.concatenate([np.maximum(x, 0), x]))


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_initializers_are_densified_on_load(save, coordinates):
    """ONNX shape inference cannot see sparse initializers; optc densifies them, as onnxruntime does."""

    w = rand(16, 12)
    w[np.abs(w) < 1.0] = 0
    idx = np.flatnonzero(w)
    indices = np.stack(np.unravel_index(idx, w.shape), axis=1) if coordinates else idx
    sparse = onnx.helper.make_sparse_tensor(
        onnx.numpy_helper.from_array(w.ravel()[idx], "A"), onnx.numpy_helper.from_array(indices.astype(np.int64), "A_idx"), list(w.shape)
    )
    proto = make_model([onnx.helper.make_node("MatMul", ["x", "A"], ["y"], name="mm")], [("x", ["N", 16])], [("y", ["N", 12])], [])
    proto.graph.sparse_initializer.append(sparse)
    model = load_model(save(proto))
    assert not model.graph.sparse_initializer and "densified 1 sparse initializers" in model.notes
    np.testing.assert_array_equal(model.initializer_array("A"), w)
    x = rand(3, 16, seed=2)
    np.testing.assert_array_equal(ort_run(model.proto, {"x": x})["y"], ort_run(proto, {"x": x})["y"])
    onnx.checker.check_model(model.proto, full_check=True)


def test_a_dim_of_minus_one_is_read_as_dynamic(tmp_path):
    """paddle2onnx writes dynamic dims as -1 (RapidOCR's classifier): onnxruntime runs it, so optc reads it."""
    import onnx
    from helpers import make_model
    from onnx import helper

    from optc.ir import load_model

    path = tmp_path / "paddle.onnx"
    onnx.save(make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [-1, 3, 48, 192])], [("y", [-1, 3, 48, 192])]), path)
    model = load_model(path)
    assert model.inputs[0].shape[0] is None and model.inputs[0].shape[1:] == (3, 48, 192)
    assert any("read x[0], y[0] as dynamic (a dim of -1" in n for n in model.notes)
