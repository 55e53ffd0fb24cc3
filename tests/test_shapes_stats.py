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


def _branch(name: str, width: int) -> onnx.GraphProto:
    """A subgraph computing x @ W (W: 8 x width) from the outer scope's x."""
    w = onnx.numpy_helper.from_array(rand(8, width, seed=width), f"W_{name}")
    return helper.make_graph([helper.make_node("MatMul", ["x", f"W_{name}"], [f"y_{name}"], name="mm")], name, [],
                             [helper.make_tensor_value_info(f"y_{name}", onnx.TensorProto.FLOAT, [1, width])], [w],
                             value_info=[])


def test_macs_inside_if_and_loop_bodies():
    """A VAD model whose network sits in an If read 0 MACs: the costlier branch counts; a Loop its body x trips."""
    cond = helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, [])
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])
    if_node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=_branch("then", 4), else_branch=_branch("else", 16))
    body_x = helper.make_tensor_value_info("acc_in", onnx.TensorProto.FLOAT, [1, 8])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["acc_in", "L"], ["acc_out"], name="mm"), helper.make_node("Identity", ["c_in"], ["c_out"], name="id")],
        "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []), helper.make_tensor_value_info("c_in", onnx.TensorProto.BOOL, []), body_x],
        [helper.make_tensor_value_info("c_out", onnx.TensorProto.BOOL, []), helper.make_tensor_value_info("acc_out", onnx.TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(rand(8, 8, seed=3), "L")])
    loop = helper.make_node("Loop", ["trips", "", "x"], ["z"], name="loop", body=body)
    proto = make_model([if_node, loop], [cond, x], [("y", [1, 16]), ("z", [1, 8])], [("trips", np.array(5, np.int64))])
    model = Model(proto)
    stats = compute_stats(model)
    assert stats.macs_per_node == {"if/else_branch/mm": 8 * 16, "loop/body/mm": 5 * 8 * 8}
    assert stats.macs == 8 * 16 + 5 * 64 and stats.macs_unknown == []
    # A trip count computed at run time: one iteration counted, and said so.
    dynamic = helper.make_node("Loop", ["n", "", "x"], ["z"], name="loop", body=body)
    n = helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [])
    stats = compute_stats(Model(make_model([if_node, dynamic], [cond, x, n], [("y", [1, 16]), ("z", [1, 8])])))
    assert stats.macs_per_node["loop/body/mm"] == 64 and any("trip count not constant" in u for u in stats.macs_unknown)


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple]:
    return {vi.name: tuple(d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim)
            for vi in list(proto.graph.value_info) + list(proto.graph.output)}


def test_constant_subgraphs_are_typed_as_with_full_data_propagation():
    """A pack-sparse-decoded weight (cut off before data propagation) and a shape computed from
    constants (kept for it) type exactly as onnx's own inference with data propagation types them."""
    from optc.passes.sparsify.pack_sparse import pack_sparse_weights

    w = rand(64, 48)
    w[np.abs(w) < 0.7] = 0
    proto = make_model(
        [
            helper.make_node("Concat", ["d0", "d1"], ["shape"], axis=0, name="cat"),
            helper.make_node("Reshape", ["x", "shape"], ["r"], name="reshape"),
            helper.make_node("MatMul", ["r", "w"], ["y"], name="mm"),
        ],
        [("x", ["n", 8, 8])],
        [("y", None)],
        [("d0", np.array([-1], np.int64)), ("d1", np.array([64], np.int64)), ("w", w)],
    )
    model = pack_sparse_weights(Model(proto), ["w"]).model
    expected = onnx.shape_inference.infer_shapes(model.proto, strict_mode=False, data_prop=True)
    infer_shapes(model)
    got = _shapes(model.proto)
    assert got["y"][1:] == (48,) and got["r"][1:] == (64,)
    assert got == _shapes(expected)


@pytest.mark.parametrize("op,gates,direction", [("LSTM", 4, "forward"), ("GRU", 3, "bidirectional"), ("RNN", 1, "forward")])
def test_recurrent_layers_count_their_macs(save, op, gates, direction):
    """Resemblyzer keeps 96 % of its weights in 3 LSTMs and read 65.5k MACs a sample against about 216M."""
    from onnx import helper as h

    from optc.ir import infer_shapes, load_model
    from optc.ir.stats import compute_stats

    steps, features, hidden = 7, 5, 6
    dirs = 2 if direction == "bidirectional" else 1
    w = np.zeros((dirs, gates * hidden, features), np.float32)
    r = np.zeros((dirs, gates * hidden, hidden), np.float32)
    graph = h.make_graph([h.make_node(op, ["x", "W", "R"], ["y"], hidden_size=hidden, direction=direction, name="rnn")], "g",
                         [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [steps, "batch", features])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [steps, dirs, "batch", hidden])],
                         [onnx.numpy_helper.from_array(w, "W"), onnx.numpy_helper.from_array(r, "R")])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 14)])
    model = load_model(save(proto))
    infer_shapes(model)
    stats = compute_stats(model)
    assert stats.macs == steps * dirs * gates * hidden * (features + hidden)  # per sample: the batch counts as 1
    assert stats.macs_symbolic == [] and stats.macs_unknown == []


def test_freezing_an_input_drops_the_exporters_fixed_output_dims(save, tmp_path):
    """A tracer writes the output dims of its example: LORE's table model (the lineless-table-rec wheel) takes
    [1, cells, 256] and declares its outputs [batch, 54, 4] (54 cells in the trace). onnxruntime runs the original;
    frozen at 16 cells, onnxruntime refused the model ("Concat_354 ... Inferred=16 Declared=54"), so no --input-shape
    but 54 cells could compile it. Freezing now forgets every output dim, fixed or named, and the outputs take the
    inferred ones. (This small model does not reach onnxruntime's strict merge that LORE's opset-9 graph does, checked
    by hand there: the frozen model runs and matches the original within 2e-6; here the dims are checked.)"""
    import onnxruntime as ort
    from click.testing import CliRunner

    from optc.cli.main import cli

    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", [1, "cells", 8])], [("y", [1, 54, 4])],
                       [("W", rand(8, 4))])
    path = save(model)
    frozen = load_model(path)
    assert freeze_input_shapes(frozen, {"x": (1, 16, 8)})
    assert [d.HasField("dim_value") or d.HasField("dim_param") for d in frozen.graph.output[0].type.tensor_type.shape.dim] == [False] * 3
    x = np.random.default_rng(0).standard_normal((1, 16, 8)).astype(np.float32)
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # the original runs
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(tmp_path / "out"), "--input-shape", "x=1x16x8",
                                   "--pass", "canonicalize", "--no-latency"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    written = onnx.load(str(tmp_path / "out" / "model.onnx"))
    onnx.checker.check_model(written, full_check=True)
    assert [d.dim_value for d in written.graph.output[0].type.tensor_type.shape.dim] == [1, 16, 4]
    got = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
