"""conv3d-to-2d on hand-built graphs shaped like invisible-watermark's RivaGAN (image layers exported as
depth-1 Conv3D on [N, C, 1, H, W] frames): structure, onnxruntime equality, checker, honest ``modified``,
and the lossy passes that skipped such layers now fitting them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import assert_same_outputs, make_model, ops, rand, run_checked
from onnx import helper

from optc.data.calibration import CalibrationSet
from optc.ir import infer_shapes, load_model
from optc.passes import PassContext, make_pass


def _load(save, proto):
    model = load_model(save(proto))
    infer_shapes(model)
    return model


def _axes(op, x, y, axes, opset, name):
    if opset >= 13:
        return [helper.make_node("Constant", [], [f"{name}_axes"], value=onnx.numpy_helper.from_array(np.array(axes, np.int64))),
                helper.make_node(op, [x, f"{name}_axes"], [y], name=name)]
    return [helper.make_node(op, [x], [y], axes=axes, name=name)]


def _decoder(opset, c=6, hw=12):
    """Two depth-1 Conv3D branches (Tanh, BatchNorm, a channel softmax between Transposes) multiplied, then a
    Reshape and a mean: RivaGAN's decoder, small."""
    conv = dict(kernel_shape=[1, 3, 3], pads=[0, 1, 1, 0, 1, 1])
    rng = np.random.default_rng(0)
    bn = [(f"bn_{k}", v) for k, v in zip(("g", "b", "m", "v"), (rng.uniform(0.5, 2, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2, c)))]
    nodes = [
        helper.make_node("Conv", ["frame", "Wa", "Ba"], ["a1"], name="att0", **conv),
        helper.make_node("Tanh", ["a1"], ["a2"], name="tanh_a"),
        helper.make_node("BatchNormalization", ["a2", "bn_g", "bn_b", "bn_m", "bn_v"], ["a3"], name="bn_a"),
        helper.make_node("Conv", ["a3", "Wb", "Bb"], ["a4"], name="att1", **conv),
        helper.make_node("Transpose", ["a4"], ["a5"], perm=[0, 4, 2, 3, 1], name="to_last"),
        helper.make_node("Softmax", ["a5"], ["a6"], axis=4, name="softmax"),
        helper.make_node("Transpose", ["a6"], ["a7"], perm=[0, 4, 2, 3, 1], name="to_first"),
        helper.make_node("Conv", ["frame", "Wc"], ["c1"], name="conv0", **conv),
        helper.make_node("Relu", ["c1"], ["c2"], name="relu"),
        helper.make_node("Add", ["c2", "shift"], ["c3"], name="shift_add"),
        helper.make_node("Mul", ["c3", "a7"], ["m"], name="gate"),
        helper.make_node("Reshape", ["m", "flat"], ["r"], name="flatten"),
        helper.make_node("ReduceMean", ["r"], ["out"], axes=[2], keepdims=0, name="mean"),
    ]
    inits = [("Wa", rand(c, 3, 1, 3, 3, seed=1)), ("Ba", rand(c, seed=2)), ("Wb", rand(c, c, 1, 3, 3, seed=3)),
             ("Bb", rand(c, seed=4)), ("Wc", rand(c, 3, 1, 3, 3, seed=5)),
             ("shift", rand(1, c, 1, 1, 1, seed=6)), ("flat", np.array([0, c, -1], np.int64))]
    inits += [(k, v.astype(np.float32)) for k, v in bn]
    return make_model(nodes, [("frame", ["N", 3, 1, hw, hw])], [("out", ["N", c])], inits, opset=opset)


@pytest.mark.parametrize("opset", [10, 17])
def test_depth1_conv3d_chain_runs_in_4d_between_one_squeeze_and_one_unsqueeze(save, opset):
    proto = _decoder(opset)
    result = run_checked("conv3d-to-2d", _load(save, proto))
    assert result.modified and result.stats == {"converted": 3}
    graph = result.model.graph
    weights = {t.name: t for t in graph.initializer}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert all(len(weights[n.input[1]].dims) == 4 for n in convs)
    assert all(len(helper.get_attribute_value(a)) == 4 for n in convs for a in n.attribute if a.name == "pads")
    # One Squeeze of the frame however many convolutions read it; the unit axis comes back once, before the
    # Reshape that needs it: Tanh, BatchNorm, the Transposes, the Softmax, the constant Add and the Mul run in 4-D.
    assert ops(result.model).count("Squeeze") == 1 and ops(result.model).count("Unsqueeze") == 1
    unsqueeze = next(n for n in graph.node if n.op_type == "Unsqueeze")
    assert [n.op_type for n in graph.node if unsqueeze.output[0] in n.input] == ["Reshape"]
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    assert helper.get_attribute_value(softmax.attribute[0]) == 3
    perms = [helper.get_attribute_value(n.attribute[0]) for n in graph.node if n.op_type == "Transpose"]
    assert perms == [[0, 3, 2, 1], [0, 3, 2, 1]]
    assert_same_outputs(proto, result.model.proto, {"frame": rand(2, 3, 1, 12, 12, seed=9)})


def test_batchnorm_after_a_converted_conv_then_folds(save):
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"], kernel_shape=[1, 3, 3], pads=[0, 1, 1, 0, 1, 1], name="conv"),
         helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")],
        [("x", [1, 4, 1, 8, 8])], [("y", [1, 5, 1, 8, 8])],
        [("W", rand(5, 4, 1, 3, 3)), ("g", np.full(5, 2, np.float32)), ("b", rand(5, seed=1)),
         ("m", rand(5, seed=2)), ("v", np.ones(5, np.float32))],
    )
    model = _load(save, proto)
    converted = run_checked("conv3d-to-2d", model)
    folded = run_checked("fold-batchnorm", converted.model)
    assert folded.stats == {"folded": 1}
    assert ops(folded.model) == ["Squeeze", "Conv", "Unsqueeze"]
    # The graph output keeps its name and its 5-D shape.
    assert [o.name for o in folded.model.graph.output] == ["y"]
    assert_same_outputs(proto, folded.model.proto, {"x": rand(1, 4, 1, 8, 8, seed=3)})


@pytest.mark.parametrize("kernel,depth,pads,why", [
    ([3, 3, 3], 1, [1, 1, 1, 1, 1, 1], "depth-3 kernel"),
    ([1, 3, 3], 4, [0, 1, 1, 0, 1, 1], "over a depth of 4"),
    ([1, 3, 3], "D", [0, 1, 1, 0, 1, 1], "over a depth of 'D' (a 2-D one only at depth 1: freeze it with --input-shape"),
])
def test_other_3d_convolutions_are_left_alone_saying_why(save, kernel, depth, pads, why):
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=kernel, pads=pads, name="conv")],
        [("x", [1, 2, depth, 6, 6])], [("y", [1, 3, depth, 6, 6])], [("W", rand(3, 2, *kernel))],
    )
    result = run_checked("conv3d-to-2d", _load(save, proto))
    assert not result.modified and result.stats == {"converted": 0}
    assert len(result.skipped) == 1 and why in result.skipped[0]


def test_a_model_without_3d_convolutions_is_untouched(save):
    """The Unsqueeze -> Relu here is the model's own: only the pass's Unsqueezes sink."""
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
         helper.make_node("Unsqueeze", ["c"], ["u"], axes=[2], name="u"),
         helper.make_node("Relu", ["u"], ["y"], name="relu")],
        [("x", [1, 2, 6, 6])], [("y", [1, 3, 1, 4, 4])], [("W", rand(3, 2, 3, 3))], opset=11,
    )
    model = _load(save, proto)
    result = run_checked("conv3d-to-2d", model)
    assert not result.modified and result.model is model and result.skipped == []


def test_lossy_passes_fit_the_converted_layers_and_say_how_to_before(save, tmp_path):
    proto = _decoder(13, c=16, hw=16)
    model = _load(save, proto)
    np.savez(tmp_path / "calib.npz", frame=np.random.default_rng(1).uniform(-1, 1, (32, 3, 1, 16, 16)).astype(np.float32))
    ctx = PassContext(calibration=CalibrationSet.from_path(tmp_path / "calib.npz", model))
    before = make_pass("sparsify", {"sparsity": 0.5, "storage": "dense"}).run(model, ctx)
    assert not before.modified
    assert any("run conv3d-to-2d (in canonicalize) before this pass" in s for s in before.skipped)
    converted = run_checked("conv3d-to-2d", model).model
    infer_shapes(converted)
    after = run_checked("sparsify", converted, ctx, sparsity=0.5, storage="dense")
    assert after.modified
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in after.model.graph.initializer}
    convs = [n for n in after.model.graph.node if n.op_type == "Conv"]
    zeros = [float(np.mean(weights[n.input[1]] == 0)) for n in convs]
    assert len(zeros) == 3 and all(0.45 <= z <= 0.55 for z in zeros), zeros
