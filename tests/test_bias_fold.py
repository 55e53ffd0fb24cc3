"""Folding a per-output shift into a linear layer's bias: every placement, checked in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import load_model
from optc.ir.graph import GraphEditor
from optc.passes.layers.bias_fold import add_to_bias

DELTA = np.array([0.5, -1.0, 2.0], np.float32)


def gemm(with_bias):
    inputs = ["x", "w", "b"] if with_bias else ["x", "w"]
    node = helper.make_node("Gemm", inputs, ["y"], name="layer", alpha=2.0, beta=0.5, transB=1)
    inits = [("w", rand(3, 4, seed=1))] + ([("b", rand(3, seed=2))] if with_bias else [])
    return make_model([node], [("x", [5, 4])], [("y", [5, 3])], inits), 1


def matmul_add():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="layer"), helper.make_node("Add", ["m", "b"], ["y"], name="bias")]
    return make_model(nodes, [("x", [5, 4])], [("y", [5, 3])], [("w", rand(4, 3, seed=1)), ("b", rand(3, seed=2))]), 1


def matmul_output():
    return make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], [("x", [5, 4])], [("y", [5, 3])], [("w", rand(4, 3, seed=1))]), 1


def conv_no_bias():
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="layer", pads=[1, 1, 1, 1])
    return make_model([node], [("x", [2, 2, 4, 4])], [("y", [2, 3, 4, 4])], [("w", rand(3, 2, 3, 3, seed=1))]), 1


@pytest.mark.parametrize("build", [lambda: gemm(True), lambda: gemm(False), matmul_add, matmul_output, conv_no_bias],
                         ids=["gemm-bias", "gemm-no-bias", "matmul-add", "matmul-graph-output", "conv-no-bias"])
def test_the_output_moves_by_delta_exactly(save, build):
    proto, axis = build()
    model = load_model(save(proto))
    editor = GraphEditor(model)
    add_to_bias(editor, next(n for n in editor.nodes if n.name == "layer"), DELTA)
    new = editor.commit()
    onnx.checker.check_model(new.proto, full_check=True)
    x = rand(*[d for d in model.inputs[0].shape], seed=3)
    before, after = ort_run(model.proto, {"x": x})["y"], ort_run(new.proto, {"x": x})["y"]
    shape = [1] * before.ndim
    shape[axis] = 3
    # Gemm: delta is in units of x W, so it is scaled by alpha like the product.
    scale = 2.0 if proto.graph.node[0].op_type == "Gemm" else 1.0
    np.testing.assert_allclose(after - before, np.broadcast_to(scale * DELTA.reshape(shape), before.shape), atol=1e-5)
    assert [o.name for o in new.graph.output] == ["y"]
