"""GraphEditor: constants keep their shape, commit survives folded Constant nodes
and omitted optional inputs/outputs."""
from __future__ import annotations

import numpy as np
import onnx
from helpers import assert_same_outputs, make_model, ops, ort_run, rand, run_checked
from onnx import helper, numpy_helper

from optc.ir import infer_shapes, load_model
from optc.ir.graph import GraphEditor


def _relu(shape=(2, 3)) -> onnx.ModelProto:
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [("x", list(shape))], [("y", list(shape))])


def test_add_constant_keeps_0d_scalars(save):
    model = load_model(save(_relu()))
    editor = GraphEditor(model)
    x = editor.tensor("x")
    scale = editor.add_constant("scale", np.array(0.05, dtype=np.float32))
    zero = editor.add_constant("zero", np.uint8(128))
    matrix = editor.add_constant("m", np.arange(6, dtype=np.float32).reshape(2, 3).T)  # not C-contiguous
    assert scale.values.shape == () and zero.values.shape == ()
    assert matrix.values.shape == (3, 2) and matrix.values.flags.c_contiguous
    q = editor.add_node("QuantizeLinear", [x, scale, zero]).outputs[0]
    editor.graph.nodes[0].inputs[0] = editor.add_node("DequantizeLinear", [q, scale, zero]).outputs[0]
    committed = editor.commit()
    dims = {t.name: list(t.dims) for t in committed.graph.initializer}
    assert dims[scale.name] == [] and dims[zero.name] == []
    onnx.checker.check_model(committed.proto, full_check=True)
    xv = rand(2, 3)
    expected = np.maximum((np.clip(np.round(xv / 0.05) + 128, 0, 255) - 128) * np.float32(0.05), 0)
    np.testing.assert_allclose(ort_run(committed.proto, {"x": xv})["y"], expected, atol=1e-6)


def _lstm_with_omitted_optionals() -> onnx.ModelProto:
    """An LSTM with an omitted input (sequence_lens) and output (Y_h), a Clip without
    ``min``, and weights and axes held in Constant nodes whose ``value`` tensors are
    unnamed, as onnx's version converter and most exporters write them."""
    hidden, feat = 4, 3
    w, r = rand(1, 4 * hidden, feat, seed=1), rand(1, 4 * hidden, hidden, seed=2)

    def const(out: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [out], value=numpy_helper.from_array(value), name=f"const_{out}")

    nodes = [
        const("axes", np.array([0], dtype=np.int64)),
        const("w_half", w / 2),
        const("hi", np.array(0.5, dtype=np.float32)),
        helper.make_node("Add", ["w_half", "w_half"], ["W"], name="w_sum"),  # folds
        helper.make_node("Unsqueeze", ["h0_2d", "axes"], ["h0"], name="unsq"),
        helper.make_node("LSTM", ["x", "W", "R", "", "", "h0"], ["Y", "", "Y_c"], hidden_size=hidden, name="lstm"),
        helper.make_node("Clip", ["Y", "", "hi"], ["y"], name="clip"),
        helper.make_node("Dropout", ["Y_c"], ["c"], name="drop"),  # mask output omitted
    ]
    return make_model(
        nodes,
        [("x", [5, 2, feat]), ("h0_2d", [2, hidden])],
        [("y", [5, 1, 2, hidden]), ("c", [1, 2, hidden])],
        [("R", r)],
    )


def test_fold_constants_commit_with_unnamed_constant_values_and_omitted_optionals(save):
    proto = _lstm_with_omitted_optionals()
    model = load_model(save(proto), lift_constants=False)
    infer_shapes(model)
    result = run_checked("fold-constants", model)
    assert result.modified
    assert "Constant" not in ops(result.model) and "Add" not in ops(result.model)
    lstm = next(n for n in result.model.graph.node if n.op_type == "LSTM")
    assert lstm.input[3:5] == ["", ""] and lstm.output[1] == ""
    assert next(n for n in result.model.graph.node if n.op_type == "Clip").input[1] == ""
    names = [t.name for t in result.model.graph.initializer]
    assert "" not in names and len(names) == len(set(names))
    feeds = {"x": rand(5, 2, 3, seed=3), "h0_2d": rand(2, 4, seed=4)}
    assert_same_outputs(proto, result.model.proto, feeds, atol=0, rtol=0)
    # The committed model is saved and loaded like any other.
    again = load_model(save(result.model.proto, "folded.onnx"))
    assert_same_outputs(proto, again.proto, feeds, atol=0, rtol=0)


def test_commit_leaves_the_source_model_untouched(save):
    proto = _lstm_with_omitted_optionals()
    model = load_model(save(proto), lift_constants=False)
    before = model.proto.SerializeToString()
    editor = GraphEditor(model)
    editor.graph.fold_constants()
    editor.commit()
    assert model.proto.SerializeToString() == before
    assert all(t.name == "" for n in model.graph.node if n.op_type == "Constant" for t in [n.attribute[0].t])


def test_fold_constants_leaves_tensor_attributes_of_the_input_untouched(save):
    """gs's exporter names every tensor attribute in place (an unnamed ConstantOfShape
    value gets ``name: ""``); the input model must not change (checked by run_checked)."""
    proto = make_model(
        [
            helper.make_node("Shape", ["x"], ["shape"], name="shape"),
            helper.make_node("ConstantOfShape", ["shape"], ["ones"], value=numpy_helper.from_array(np.ones(1, np.float32)), name="ones"),
            helper.make_node("Neg", ["b"], ["neg_b"], name="neg"),  # folds
            helper.make_node("Add", ["x", "ones"], ["h"], name="add"),
            helper.make_node("Add", ["h", "neg_b"], ["y"], name="add_b"),
        ],
        [("x", ["n", 3])],
        [("y", ["n", 3])],
        [("b", rand(3))],
    )
    model = load_model(save(proto))
    infer_shapes(model)
    result = run_checked("fold-constants", model)
    assert result.modified and ops(result.model) == ["Shape", "ConstantOfShape", "Add", "Add"]
    x = rand(5, 3, seed=1)
    assert_same_outputs(proto, result.model.proto, {"x": x}, atol=0, rtol=0)
