"""int8 chains: Conv outputs and the Add/pooling between quantized layers get QDQ, so onnxruntime's
default session fuses every layer into an integer kernel; transformer residuals stay float."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from helpers import make_model, ort_run, rand
from onnx import helper

from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass


def _residual_cnn():
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Add", ["c2", "r1"], ["s"], name="join"),
            helper.make_node("Relu", ["s"], ["r2"], name="relu2"),
            helper.make_node("MaxPool", ["r2"], ["m"], kernel_shape=[2, 2], strides=[2, 2], name="maxpool"),
            helper.make_node("Conv", ["m", "W3", "B3"], ["c3"], pads=[1, 1, 1, 1], name="conv3"),
            helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
            helper.make_node("GlobalAveragePool", ["r3"], ["p"], name="gap"),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1, name="fc"),
        ],
        [("x", ["N", 3, 16, 16])],
        [("y", ["N", 10])],
        [
            ("W1", 0.3 * rand(16, 3, 3, 3, seed=1)), ("B1", 0.1 * rand(16, seed=2)),
            ("W2", 0.1 * rand(16, 16, 3, 3, seed=3)), ("B2", 0.1 * rand(16, seed=4)),
            ("W3", 0.1 * rand(16, 16, 3, 3, seed=5)), ("B3", 0.1 * rand(16, seed=6)),
            ("G", 0.3 * rand(10, 16, seed=7)), ("C", 0.1 * rand(10, seed=8)),
        ],
    )


def _quantize(save, tmp_path, proto, x, **options):
    model = load_model(save(proto))
    infer_shapes(model)
    np.savez(tmp_path / "calib.npz", x=x)
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    result = PassManager([make_pass("quantize", options)]).run(model, PassContext(calibration=calib))
    onnx.checker.check_model(result.model.proto, full_check=True)
    return result.model, result.records[0]


def _ort_kernels(proto, tmp_path) -> list[str]:
    """Op types onnxruntime's default CPU session actually runs (its optimised graph)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "ort_optimized.onnx")).graph.node]


def _default_session(proto, feeds):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_chains_put_qdq_between_layers(save, tmp_path):
    proto = _residual_cnn()
    x = np.random.default_rng(0).uniform(-1, 1, (64, 3, 16, 16)).astype(np.float32)
    q, record = _quantize(save, tmp_path, proto, x)
    assert sorted(record.stats["int8_chain_nodes"]) == ["gap", "join", "maxpool"]
    quantized = {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"}
    # Layer inputs (x, r1, m, f), Conv outputs after Relu (r1, r3), the Add's other input (c2), the join and pool outputs.
    assert quantized == {"x", "r1", "c2", "r2", "m", "r3", "p", "f"}
    for n in q.graph.node:  # no float reader is left on a quantized tensor
        if n.op_type not in ("QuantizeLinear",):
            assert not set(n.input) & quantized, n.name
    test = np.random.default_rng(1).uniform(-1, 1, (32, 3, 16, 16)).astype(np.float32)
    ref = ort_run(proto, {"x": test})["y"]
    for got in (ort_run(q.proto, {"x": test})["y"], _default_session(q.proto, {"x": test})):
        assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()  # declared budget: 5 % of the output range


def test_onnxruntime_runs_int8_kernels_back_to_back(save, tmp_path):
    proto = _residual_cnn()
    x = np.random.default_rng(0).uniform(-1, 1, (64, 3, 16, 16)).astype(np.float32)
    chained, _ = _quantize(save, tmp_path, proto, x)
    kernels = _ort_kernels(chained.proto, tmp_path)
    assert kernels.count("QLinearConv") == 3 and "QLinearAdd" in kernels and "QLinearGlobalAveragePool" in kernels
    assert not {"Conv", "FusedConv", "Add", "DequantizeLinear"} & set(kernels), kernels
    inputs_only, _ = _quantize(save, tmp_path, proto, x, int8_chains=False)
    assert {"Conv", "FusedConv"} & set(_ort_kernels(inputs_only.proto, tmp_path))  # the float Conv that made int8 slow


def test_transformer_residual_and_bias_adds_stay_float(save, tmp_path):
    # LN -> MatMul -> +bias -> +residual(LN output) -> LN: only the MatMul input is quantized.
    proto = make_model(
        [
            helper.make_node("LayerNormalization", ["x", "g1", "b1"], ["h"], axis=-1, name="ln1"),
            helper.make_node("MatMul", ["h", "W"], ["a"], name="mm"),
            helper.make_node("Add", ["a", "bias"], ["ab"], name="bias_add"),
            helper.make_node("Add", ["ab", "h"], ["s"], name="residual"),
            helper.make_node("LayerNormalization", ["s", "g2", "b2"], ["y"], axis=-1, name="ln2"),
        ],
        [("x", ["N", 8, 32])],
        [("y", ["N", 8, 32])],
        [("g1", np.ones(32, np.float32)), ("b1", np.zeros(32, np.float32)), ("W", 0.2 * rand(32, 32, seed=1)),
         ("bias", rand(32, seed=2)), ("g2", np.ones(32, np.float32)), ("b2", np.zeros(32, np.float32))],
    )
    x = rand(64, 8, 32)
    q, record = _quantize(save, tmp_path, proto, x)
    assert record.stats["int8_chain_nodes"] == []
    assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"h"}
    residual = next(n for n in q.graph.node if n.name == "residual")
    assert "h" in residual.input  # the residual reads the float LayerNorm output
    ref, got = ort_run(proto, {"x": x[:8]})["y"], ort_run(q.proto, {"x": x[:8]})["y"]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert "MatMulIntegerToFloat" in _ort_kernels(q.proto, tmp_path)


def test_shape_arithmetic_is_never_quantized(save, tmp_path):
    # A dynamic flatten: Shape -> Slice/ReduceProd -> Concat (int64) -> Reshape's shape input -> Gemm.
    # The Concat "reaches" the Gemm's input only through the Reshape's shape operand.
    proto = make_model(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("Shape", ["r"], ["sh"], name="shape"),
            helper.make_node("Slice", ["sh", "s0", "s1"], ["batch"], name="slice_batch"),
            helper.make_node("Slice", ["sh", "s1", "s4"], ["rest"], name="slice_rest"),
            helper.make_node("ReduceProd", ["rest"], ["features"], keepdims=1, name="prod"),
            helper.make_node("Concat", ["batch", "features"], ["target"], axis=0, name="concat_shape"),
            helper.make_node("Reshape", ["r", "target"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "G"], ["y"], transB=1, name="fc"),
        ],
        [("x", ["N", 2, 4, 4])],
        [("y", ["N", 5])],
        [("W", 0.3 * rand(4, 2, 3, 3, seed=1)), ("B", 0.1 * rand(4, seed=2)), ("G", 0.2 * rand(5, 64, seed=3)),
         ("s0", np.array([0], np.int64)), ("s1", np.array([1], np.int64)), ("s4", np.array([4], np.int64))],
    )
    x = rand(32, 2, 4, 4)
    q, record = _quantize(save, tmp_path, proto, x)
    assert "concat_shape" not in record.stats["int8_chain_nodes"]
    assert {n.input[0] for n in q.graph.node if n.op_type == "QuantizeLinear"} == {"x", "r", "f"}
    ref = ort_run(proto, {"x": x[:4]})["y"]
    got = _default_session(q.proto, {"x": x[:4]})
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
