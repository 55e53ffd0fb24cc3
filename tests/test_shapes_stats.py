"""Shape inference, input freezing, and statistics (MACs, params, zeros)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, rand
from onnx import helper

from optc.errors import ConfigError
from optc.ir import compute_stats, freeze_input_shapes, infer_shapes, load_model, parse_shape_spec
from optc.ir.model import Model


def _conv_model(batch="N") -> onnx.ModelProto:
    w = rand(8, 3, 3, 3)
    wt = rand(8, 4, 2, 2)
    return make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("ConvTranspose", ["c", "WT"], ["u"], strides=[2, 2], name="deconv"),
            helper.make_node("GlobalAveragePool", ["u"], ["p"], name="gap"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "G"], ["g"], transB=1, name="gemm"),
            helper.make_node("MatMul", ["g", "M"], ["y"], name="mm"),
        ],
        [("x", [batch, 3, 16, 16])],
        [("y", [batch, 5])],
        [("W", w), ("WT", wt), ("G", np.zeros((6, 4), np.float32)), ("M", rand(6, 5))],
    )


def test_macs_per_node_match_hand_counts(save):
    model = load_model(save(_conv_model()))
    infer_shapes(model)
    stats = compute_stats(model)
    # symbolic batch counts as 1
    assert stats.macs_per_node == {
        "conv": 8 * 16 * 16 * 3 * 9,  # out elems x Cin x k
        "deconv": 8 * 16 * 16 * 4 * 4,  # in elems x Cout x k
        "gemm": 1 * 4 * 6,
        "mm": 1 * 6 * 5,
    }
    assert stats.macs == sum(stats.macs_per_node.values())
    assert stats.params == 8 * 27 + 8 * 16 + 24 + 30
    assert stats.param_bytes == stats.params * 4
    zero = {w.name: w.zero_fraction for w in stats.weights}
    assert zero["G"] == 1.0 and zero["W"] == 0.0
    assert stats.op_histogram["Conv"] == 1


def test_freeze_input_shapes_scales_macs(save):
    model = load_model(save(_conv_model()))
    assert freeze_input_shapes(model, {"x": (4, 3, 16, 16)})
    infer_shapes(model)
    assert model.inputs[0].shape == (4, 3, 16, 16)
    assert compute_stats(model).macs_per_node["conv"] == 4 * 8 * 16 * 16 * 27
    assert not freeze_input_shapes(model, {"x": (4, 3, 16, 16)})


@pytest.mark.parametrize(
    "shapes,msg",
    [({"nope": (1, 3, 16, 16)}, "inputs are: x"), ({"x": (1, 3, 16)}, "rank 3"), ({"x": (1, 4, 16, 16)}, "fixed to 3")],
)
def test_freeze_rejects_bad_shapes(save, shapes, msg):
    model = load_model(save(_conv_model()))
    with pytest.raises(ConfigError, match=msg):
        freeze_input_shapes(model, shapes)


def test_parse_shape_spec():
    assert parse_shape_spec("input=1x3x224x224") == ("input", (1, 3, 224, 224))
    assert parse_shape_spec("ids=2,128") == ("ids", (2, 128))
    for bad in ("input", "input=1xax2", "=1x2", "x=0x3"):
        with pytest.raises(ConfigError):
            parse_shape_spec(bad)


def test_wrong_declared_output_shape_is_reported_and_fixed(save):
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [2, 10])], [("y", [2, 1000])])
    model = load_model(save(proto), check=False)
    report = infer_shapes(model)
    assert report.output_mismatches and "declared [2,1000]" in report.output_mismatches[0]
    assert model.outputs[0].shape == (2, 10)


def test_symbolic_dims_are_kept(save):
    model = load_model(save(_conv_model()))
    infer_shapes(model)
    shapes = {vi.name: vi.type.tensor_type.shape.dim[0].dim_param for vi in model.graph.value_info}
    assert shapes["c"] == "N"


def test_shape_inference_does_not_touch_weights(save):
    model = load_model(save(_conv_model()))
    before = [t.SerializeToString() for t in model.graph.initializer]
    infer_shapes(model)
    assert [t.SerializeToString() for t in model.graph.initializer] == before


def test_model_specs(save):
    model: Model = load_model(save(_conv_model()))
    assert model.inputs[0].describe() == "x: float32 [Nx3x16x16]"
    assert not model.inputs[0].is_static
