"""Recurrent layers unrolled for TVM's frontend (targets.recurrent): exact against onnxruntime's own LSTM/GRU/RNN."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import ort_run
from onnx import TensorProto, helper, numpy_helper

from optc.errors import TargetError
from optc.ir.model import Model
from optc.targets.recurrent import unroll_recurrent

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def recurrent_model(op, *, steps=5, batch=2, features=3, hidden=4, direction="forward", layout=0, states=True, peepholes=False,
                    lengths=None, seed=0, **attrs) -> onnx.ModelProto:
    """One recurrent layer with random weights and biases; Y goes through a Relu so a consumer reads it."""
    rng = np.random.default_rng(seed)
    dirs, gates = (2 if direction == "bidirectional" else 1), GATES[op]

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.5).astype(np.float32), name)

    inits = [weight("W", dirs, gates * hidden, features), weight("R", dirs, gates * hidden, hidden), weight("B", dirs, 2 * gates * hidden)]
    x_shape = [steps, batch, features] if layout == 0 else [batch, steps, features]
    state_shape = [dirs, batch, hidden] if layout == 0 else [batch, dirs, hidden]
    inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    names = ["X", "W", "R", "B", ""]
    if lengths is not None:
        inits.append(numpy_helper.from_array(np.asarray(lengths, np.int32), "lens"))
        names[4] = "lens"
    for state in (("h0", "c0") if op == "LSTM" else ("h0",)):
        if states:
            inputs.append(helper.make_tensor_value_info(state, TensorProto.FLOAT, state_shape))
        names.append(state if states else "")
    if peepholes:
        inits.append(weight("P", dirs, 3 * hidden))
        names.append("P")
    while names[-1] == "":
        names.pop()
    outs = ["Y", "Y_h"] + (["Y_c"] if op == "LSTM" else [])
    y_shape = [steps, dirs, batch, hidden] if layout == 0 else [batch, steps, dirs, hidden]
    layer = helper.make_node(op, names, outs, name="rnn", hidden_size=hidden, direction=direction, **({"layout": 1} if layout else {}),
                             **attrs)
    graph = helper.make_graph([layer, helper.make_node("Relu", ["Y"], ["y"])], "g", inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, shape) for o, shape in
                               zip(["y", *outs[1:]], [y_shape, state_shape, state_shape])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])


def feeds_for(model: onnx.ModelProto, seed=1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32) for i in model.graph.input}


CASES = {
    "lstm": ("LSTM", {}),
    "lstm-bidirectional": ("LSTM", {"direction": "bidirectional"}),
    "lstm-reverse": ("LSTM", {"direction": "reverse"}),
    "lstm-peepholes-clip-bidirectional": ("LSTM", {"peepholes": True, "clip": 0.5, "direction": "bidirectional"}),
    "lstm-no-states": ("LSTM", {"states": False}),
    "lstm-no-states-peepholes": ("LSTM", {"states": False, "peepholes": True, "direction": "bidirectional"}),
    "gru-no-states": ("GRU", {"states": False}),
    "gru-no-states-linear-before-reset": ("GRU", {"states": False, "linear_before_reset": 1}),
    "rnn-no-states": ("RNN", {"states": False}),
    "lstm-input-forget": ("LSTM", {"input_forget": 1}),
    "lstm-full-lengths": ("LSTM", {"lengths": [5, 5]}),
    "lstm-activations": ("LSTM", {"activations": ["HardSigmoid", "Tanh", "Softsign"], "activation_alpha": [0.3], "activation_beta": [0.4]}),
    "gru": ("GRU", {}),
    "gru-linear-before-reset": ("GRU", {"linear_before_reset": 1, "direction": "bidirectional"}),
    "gru-clip": ("GRU", {"clip": 0.7}),
    "gru-scaled-tanh": ("GRU", {"activations": ["Sigmoid", "ScaledTanh"], "activation_alpha": [0.7], "activation_beta": [1.3]}),
    "rnn": ("RNN", {}),
    "rnn-relu-leaky-bidirectional": ("RNN", {"direction": "bidirectional", "activations": ["Relu", "LeakyRelu"], "activation_alpha": [0.2]}),
}


@pytest.mark.parametrize("case", CASES)
def test_unrolled_layer_matches_onnxruntime(case):
    op, options = CASES[case]
    model = recurrent_model(op, **options)
    unrolled, notes = unroll_recurrent(Model(model))
    onnx.checker.check_model(unrolled.proto)
    ops = [n.op_type for n in unrolled.graph.node]
    dirs = 2 if options.get("direction") == "bidirectional" else 1
    assert op not in ops
    # one MatMul for the input projection per direction, one per step for H·Rᵀ (two for GRU's default reset form)
    per_step = 2 if op == "GRU" and not options.get("linear_before_reset") else 1
    # (from a zero initial state the first step has none: H·Rᵀ is zero)
    stepping = 5 if options.get("states", True) else 4
    assert ops.count("MatMul") == dirs * (1 + stepping * per_step)
    assert "Gather" not in ops
    assert len(notes) == 1 and "over 5 steps, hidden 4" in notes[0]
    feeds = feeds_for(model)
    want, got = ort_run(model, feeds), ort_run(unrolled.proto, feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_batch_major_layout_matches_the_time_major_layer(op):
    """onnxruntime refuses layout=1, so the reference is the same layer time-major, its inputs and outputs transposed."""
    time_major, batch_major = recurrent_model(op, direction="bidirectional"), recurrent_model(op, direction="bidirectional", layout=1)
    feeds = feeds_for(time_major)
    want = ort_run(time_major, feeds)
    unrolled, _ = unroll_recurrent(Model(batch_major))
    got = ort_run(unrolled.proto, {k: np.ascontiguousarray(v.transpose(1, 0, 2)) for k, v in feeds.items()})
    np.testing.assert_allclose(got["y"], want["y"].transpose(2, 0, 1, 3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["Y_h"], want["Y_h"].transpose(1, 0, 2), rtol=1e-5, atol=1e-5)


def test_a_model_without_recurrent_layers_is_returned_as_it_is():
    model = Model(helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])))
    assert unroll_recurrent(model) == (model, [])


@pytest.mark.parametrize(("build", "message"), [
    (lambda: recurrent_model("LSTM", lengths=[5, 3]), "not every sequence's full length"),
    (lambda: recurrent_model("GRU", activations=["Sigmoid", "Gelu"]), "activation 'Gelu'"),
    (lambda: _dynamic(recurrent_model("RNN")), "--input-shape"),
])
def test_what_cannot_be_unrolled_is_a_clear_error(build, message):
    with pytest.raises(TargetError, match=message) as err:
        unroll_recurrent(Model(build()))
    assert "RNN 'rnn'" in str(err.value) or "LSTM 'rnn'" in str(err.value) or "GRU 'rnn'" in str(err.value)


def _dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "T"
    return model


@pytest.mark.tvm
def test_lstm_model_compiles_for_x86_and_matches_onnxruntime(tmp_path):
    """A conv front end and a bidirectional LSTM (an OCR model's shape) through the CLI: the report says what was unrolled."""
    pytest.importorskip("tvm")
    from optc.cli.main import cli
    from optc.targets.artifact import load_artifact

    model = recurrent_model("LSTM", steps=6, batch=1, features=8, hidden=16, direction="bidirectional", states=False)
    path = tmp_path / "lstm.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--target", "x86", "--no-latency", "--tuning-db", str(tmp_path / "db")],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["lowered"] == ["LSTM 'rnn': forward/reverse over 6 steps, hidden 16, unrolled into plain ops (TVM's ONNX frontend has no recurrent layers)"]
    feeds = feeds_for(model)
    got, want = load_artifact(out).run(feeds), ort_run(model, feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_leading_time_axis_is_not_frozen_as_the_batch(tmp_path):
    """``--target`` freezes a dynamic leading batch dim to 1, but a time-major sequence's leading dim is its
    length: frozen to 1 it compiled a one-step model with exit 0. Now the error names the layer and the shape to give."""
    from optc.driver import prepare_model
    from optc.errors import ConfigError
    from optc.targets.recurrent import time_axes

    model = _dynamic(recurrent_model("LSTM", batch=1, states=False))  # X: [T, 1, 3]
    with pytest.raises(ConfigError, match=r"dim 0 of X is the sequence length of LSTM rnn\): give --input-shape X=Tx1x3, with T"):
        prepare_model(Model(model), {}, target="x86")
    assert prepare_model(Model(model), {"X": (7, 1, 3)}, target="x86")[1] == {"X": (7, 1, 3)}

    batch_major = recurrent_model("GRU", batch=2, states=False, layout=1)  # X: [N, T, 3], the batch leads
    batch_major.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    assert time_axes(Model(batch_major)) == {"X": (1, "GRU rnn")}
    assert prepare_model(Model(batch_major), {}, target="x86")[1] == {"X": (1, 5, 3)}

    # X reaches the layer through a Transpose and a Cast: batch-major in the graph's input, time-major at the layer.
    through = recurrent_model("RNN", batch=1, states=False)
    through.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    through.graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    through.graph.input[0].name = "frames"
    through.graph.node.insert(0, helper.make_node("Transpose", ["frames"], ["tm"], perm=[1, 0, 2]))
    through.graph.node.insert(1, helper.make_node("Cast", ["tm"], ["X"], to=TensorProto.FLOAT))
    assert time_axes(Model(through)) == {"frames": (1, "RNN rnn")}
    with pytest.raises(ConfigError, match=r"give --input-shape frames=1xTx3"):
        prepare_model(Model(through), {}, target="x86")
