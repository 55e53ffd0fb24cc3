"""int8 lowering: QDQ regions from optc's quantize pass become integer conv2d/matmul in
Relax (int8 inputs, int32 accumulation), compiled untuned with real TVM and compared
with onnxruntime running the same QDQ model without graph optimisations.

Tolerance, "one quantisation step of the output": the outputs here are floats
produced by a lowered layer, so one step is what one input element moving by one
quantisation step does to an output, ``s_x * max|W|`` of the last layer. The
lowered sum is exact, so differences come only from an intermediate value that
rounds to the neighbouring step (float32 sums in onnxruntime vs exact integers here).
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import SAMPLE, arm_runner, make_model, onednn_or_skip, ort_run, rand, x86_cpu_runs_here
from onnx import helper

from optc.errors import TargetError
from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

X86 = {"kind": "llvm", "mcpu": "core-avx2", "num-cores": 2}


# --- models -------------------------------------------------------------------------


def _conv_model():
    """Conv (pad, bias) -> Relu -> depthwise Conv (stride 2) -> Relu -> 1x1 Conv (no bias, no padding)."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2], group=8, name="dw"),
            helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
            helper.make_node("Conv", ["r2", "W3"], ["y"], name="pw"),
        ],
        [("x", [1, 3, 12, 12])],
        [("y", [1, 6, 6, 6])],
        [("W1", rand(8, 3, 3, 3)), ("B1", rand(8, seed=1)), ("W2", rand(8, 1, 3, 3, seed=2)), ("B2", rand(8, seed=3)), ("W3", rand(6, 8, 1, 1, seed=4))],
    )


def _gemm_model():
    """Gemm (transB=1, bias) -> Relu -> MatMul on a 3-D activation -> Gemm (transB=0, bias)."""
    return make_model(
        [
            helper.make_node("Gemm", ["x", "G1", "C1"], ["g1"], transB=1, name="gemm_t"),
            helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
            helper.make_node("Reshape", ["r1", "shape"], ["r3"], name="to3d"),
            helper.make_node("MatMul", ["r3", "M"], ["m"], name="matmul"),
            helper.make_node("Reshape", ["m", "shape2"], ["m2"], name="to2d"),
            helper.make_node("Gemm", ["m2", "G2", "C2"], ["y"], transB=0, name="gemm_n"),
        ],
        [("x", [4, 32])],
        [("y", [4, 5])],
        [
            ("G1", rand(24, 32)),
            ("C1", rand(24, seed=1)),
            ("shape", np.array([2, 2, 24], np.int64)),
            ("M", rand(24, 16, seed=2)),
            ("shape2", np.array([4, 16], np.int64)),
            ("G2", rand(16, 5, seed=3)),
            ("C2", rand(5, seed=4)),
        ],
    )


def _dot_model():
    """Channels in fours, as Armv8.2's sdot takes them: Conv 3x3 (pad) -> Relu -> 1x1 Conv (stride 2) -> Relu -> 3x3 Conv
    in 2 groups of 8 -> Relu -> depthwise Conv (no sdot: one input per group) -> Relu -> Flatten -> Gemm (transB=1)."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], strides=[2, 2], name="pw"),
            helper.make_node("Relu", ["c2"], ["g"], name="relu2"),
            helper.make_node("Conv", ["g", "W4"], ["c4"], pads=[1, 1, 1, 1], group=2, name="grouped"),
            helper.make_node("Relu", ["c4"], ["r2"], name="relu4"),
            helper.make_node("Conv", ["r2", "W3", "B3"], ["c3"], pads=[1, 1, 1, 1], group=16, name="dw"),
            helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
            helper.make_node("Flatten", ["r3"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "G", "C"], ["y"], transB=1, name="fc"),
        ],
        [("x", [1, 8, 12, 12])],
        [("y", [1, 24])],
        [("W1", rand(16, 8, 3, 3)), ("B1", rand(16, seed=1)), ("W2", rand(16, 16, 1, 1, seed=2)), ("B2", rand(16, seed=3)),
         ("W3", rand(16, 1, 3, 3, seed=4)), ("B3", rand(16, seed=5)), ("G", rand(24, 576, seed=6)), ("C", rand(24, seed=7)),
         ("W4", rand(16, 8, 3, 3, seed=8) * 0.2)],
    )


def _quantize(save, tmp_path, proto, **options):
    model = load_model(save(proto))
    infer_shapes(model)
    rng = np.random.default_rng(0)
    feeds = {s.name: rng.standard_normal((64, *s.shape[1:])).astype(np.float32) for s in model.inputs}
    np.savez(tmp_path / "calib.npz", **feeds)
    calib = CalibrationSet.from_path(tmp_path / "calib.npz", model)
    return PassManager([make_pass("quantize", options)]).run(model, PassContext(calibration=calib)).model


# --- helpers ------------------------------------------------------------------------


def _lower(model, activations=None):
    from tvm.relax.frontend.onnx import from_onnx

    from optc.targets.int8_lowering import lower_int8, weight_owners

    mod = from_onnx(model.proto, keep_params_in_input=False)
    return lower_int8(mod, weight_owners(model), activations=activations)


def _compile(mod):
    import tvm
    from tvm import relax

    return relax.VirtualMachine(tvm.compile(mod, target=tvm.target.Target(X86)), tvm.cpu())


def _run(vm, x):
    import tvm

    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _calls(mod):
    """(op name, argument dtypes, result dtype) of every call in main, in order."""
    from tvm import relax

    out = []
    for block in mod["main"].body.blocks:
        for binding in block.bindings:
            value = binding.value
            if isinstance(value, relax.Call) and hasattr(value.op, "name"):
                dtypes = [str(a.ty.dtype) if hasattr(a.ty, "dtype") else "" for a in value.args]
                out.append((value.op.name, dtypes, str(value.ty.dtype)))
    return out


def _last_layer_step(model, output):
    """``s_x * max|W|`` of the quantized layer producing ``output``: one input step's effect."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers[output]
    x_dq, w_dq = producers[node.input[0]], producers[node.input[1]]
    s_x = model.initializer_array(x_dq.input[1]).item()
    w = model.initializer_array(w_dq.input[0]).astype(np.float64)
    s_w = model.initializer_array(w_dq.input[1]).astype(np.float64)
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    shape = [1] * w.ndim
    shape[axis] = -1
    return s_x * float(np.abs(w * s_w.reshape(shape)).max())


# --- tests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},  # uint8 asymmetric activations (zero point != 0 at the input: explicit pad), 7-bit weights
        {"activation_type": "int8", "reduce_range": False},
        {"symmetric_activations": True, "reduce_range": False, "bias": "float"},
    ],
    ids=["uint8", "int8", "int8-symmetric"],
)
def test_conv_regions_become_integer_convolutions(save, tmp_path, options):
    q = _quantize(save, tmp_path, _conv_model(), **options)
    mod, report = _lower(q)
    assert report.to_dict()["lowered"] == 3 and not report.left_float
    assert [r.name for r in report.lowered] == ["conv1", "dw", "pw"]
    # conv1 has 3 input channels, fewer than int8 dot products multiply at once: float32 on the 8-bit input
    assert [r.to_dict().get("computes") for r in report.lowered] == ["float32 on the 8-bit input (fewer than 4 input channels)", None, None]
    convs = [c for c in _calls(mod) if c[0] == "relax.nn.conv2d"]
    assert len(convs) == 3
    assert convs[0][1:] == (["float32", "float32"], "float32")
    for _, (x_dtype, w_dtype), out in convs[1:]:
        assert x_dtype in ("uint8", "int8") and w_dtype == "int8" and out == "int32"
    # weights are no longer dequantized; only the float biases' int32 constants may be
    weight_dq = [c for c in _calls(mod) if c[0] == "relax.dequantize" and c[2] == "float32" and c[1][0] == "int8"]
    assert not weight_dq

    vm = _compile(mod)
    step = _last_layer_step(q, "y")
    worst = 0.0
    for seed in range(5):
        x = rand(1, 3, 12, 12, seed=100 + seed)
        got, ref = _run(vm, x), ort_run(q.proto, {"x": x})["y"]
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= step, f"max |diff| {worst:.3g} > one step {step:.3g}"


def test_matmul_and_gemm_regions_become_integer_matmuls(save, tmp_path):
    q = _quantize(save, tmp_path, _gemm_model(), reduce_range=False)
    mod, report = _lower(q)
    assert [r.name for r in report.lowered] == ["gemm_t", "matmul", "gemm_n"] and not report.left_float
    matmuls = [c for c in _calls(mod) if c[0] == "relax.matmul"]
    assert len(matmuls) == 3
    for _, (x_dtype, w_dtype), out in matmuls:
        assert x_dtype == "uint8" and w_dtype == "int8" and out == "int32"
    assert not any(c[0] == "relax.permute_dims" for c in _calls(mod))  # Gemm transB=1: weight transposed at compile time

    vm = _compile(mod)
    step = _last_layer_step(q, "y")
    worst = 0.0
    for seed in range(5):
        x = rand(4, 32, seed=200 + seed)
        got, ref = _run(vm, x), ort_run(q.proto, {"x": x})["y"]
        worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= step, f"max |diff| {worst:.3g} > one step {step:.3g}"


def test_weights_that_would_saturate_int16_pairs_stay_float_on_a_cpu_without_vnni(save, tmp_path):
    """Without VNNI, x86 int8 kernels (oneDNN's, optc's vpmaddubsw) add products in pairs into saturating int16, exact
    for weights within +-64 only. With 8-bit weights the pointwise conv and the matmuls stay float, with the reason; the
    3-channel stem computes in float already, and the depthwise conv (one input a group: no pairs) stays int8. 7-bit
    weights (quantize's reduce_range) are lowered as on any CPU."""
    for model, names in ((_conv_model(), ["conv1", "dw", "pw"]), (_gemm_model(), ["gemm_t", "matmul", "gemm_n"])):
        wide = _quantize(save, tmp_path, model, reduce_range=False)
        _, report = _lower_for(wide, 64)
        kept = [r.name for r in report.lowered]
        assert kept == (["conv1", "dw"] if "pw" in names else []), kept
        left = {r.name: r.reason for r in report.left_float}
        assert set(left) == set(names) - set(kept)
        assert all(reason.startswith("weights up to 127: on a CPU without VNNI") for reason in left.values()), left
        narrow = _quantize(save, tmp_path, model, reduce_range=True)
        _, report = _lower_for(narrow, 64)
        assert [r.name for r in report.lowered] == names and not report.left_float


def _lower_for(model, weight_max):
    from tvm.relax.frontend.onnx import from_onnx

    from optc.targets.int8_lowering import lower_int8, weight_owners

    return lower_int8(from_onnx(model.proto, keep_params_in_input=False), weight_owners(model), weight_max=weight_max)


def _saturating_conv(weight: int, groups: int = 1):
    """A QDQ 3x3 conv on 16 channels whose weights are +-``weight`` (the same sign along each filter: every pair of
    products adds up), and one random filter; inputs of 5.1 quantise to 255."""
    from onnx import TensorProto, numpy_helper

    per_group = 16 // groups
    w = np.full((16, per_group, 3, 3), weight, np.int8)
    w[1::2] = -weight
    w[2] = np.random.default_rng(0).integers(-weight, weight + 1, (per_group, 3, 3))
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.uint8), "xz"),
             numpy_helper.from_array(w, "wq"), numpy_helper.from_array(np.full(16, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(16, np.int8), "wz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["y"], pads=[1, 1, 1, 1], group=groups, name="conv")]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.slow
@pytest.mark.parametrize(("weight", "groups", "int8"), [(127, 1, False), (64, 1, True), (127, 16, True)],
                         ids=["8-bit", "7-bit", "8-bit-depthwise"])
def test_an_avx2_artifact_with_onednn_held_to_avx2_computes_exactly(tmp_path, weight, groups, int8):
    """Compiled for an AVX2 CPU (``--cpu haswell``) and run with oneDNN held to AVX2 (``ONEDNN_MAX_CPU_ISA``, as on
    Zen 3): the layer oneDNN would saturate (8-bit weights, every pair adding up: 471.8 for an exact 932.7) stays
    float; 7-bit weights and a depthwise layer run oneDNN's int8 kernel, exactly. Against onnxruntime on this CPU."""
    import json
    import subprocess
    import sys

    from click.testing import CliRunner

    from optc.cli.main import cli

    onednn_or_skip()
    if not x86_cpu_runs_here("haswell"):
        pytest.skip("this machine cannot run AVX2 code")
    model = _saturating_conv(weight, groups)
    onnx.save(model, tmp_path / "m.onnx")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(out), "--target", "x86", "--cpu", "haswell",
                                   "--kernels", "onednn", "--no-latency", "--tuning-db", str(tmp_path / "db")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())["target"]
    assert report["int8"]["lowered"] == int(int8), report["int8"]
    assert len(report["tuning"]["providers"]["offloaded"]) == 1  # oneDNN computes it, in int8 or in float
    x = np.full((1, 16, 8, 8), 5.1, np.float32)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; from pathlib import Path; from optc.targets.artifact import load_artifact; "
              "np.save(sys.argv[2], load_artifact(Path(sys.argv[1])).run({'x': np.load(sys.argv[3])})['y'])")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", script, str(out), str(tmp_path / "y.npy"), str(tmp_path / "x.npy")],
                          env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    got, ref = np.load(tmp_path / "y.npy"), ort_run(model, {"x": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize(("stored", "taken"), [("uint8", "int8"), ("int8", "uint8")], ids=["sdot", "vpdpbusd"])
def test_activations_shifted_to_the_dot_products_type_compute_the_same(save, tmp_path, stored, taken):
    """Where the target's dot product takes the other 8-bit type (sdot: int8; VNNI: uint8) the activations enter the
    integer kernels shifted by 128, zero point too: the same integers reach the float epilogue, so the output equals the
    unshifted lowering's bit for bit."""
    q = _quantize(save, tmp_path, _dot_model(), reduce_range=False, activation_type=stored)
    plain, _ = _lower(q)
    shifted, report = _lower(q, activations=taken)
    assert [r.name for r in report.lowered] == ["conv1", "pw", "grouped", "dw", "fc"] and not report.left_float
    kernels = [c for c in _calls(shifted) if c[0] in ("relax.nn.conv2d", "relax.matmul")]
    assert [c[1] for c in kernels] == [[taken, "int8"]] * 5 and all(c[2] == "int32" for c in kernels)
    assert {c[1][0] for c in _calls(plain) if c[0] in ("relax.nn.conv2d", "relax.matmul")} == {stored}
    a, b = _compile(plain), _compile(shifted)
    for seed in range(3):
        x = rand(1, 8, 12, 12, seed=300 + seed)
        np.testing.assert_array_equal(_run(b, x), _run(a, x))


def test_unlowerable_region_stays_float_with_a_reason(save):
    """Asymmetric weights (non-zero weight zero point) are not what the lowering handles."""
    w_q = np.random.default_rng(0).integers(-100, 100, (4, 8)).astype(np.int8)
    proto = make_model(
        [
            helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="qx"),
            helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"], name="dqx"),
            helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=1, name="dqw"),
            helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm"),
        ],
        [("x", [2, 4])],
        [("y", [2, 8])],
        [
            ("sx", np.array(0.02, np.float32)),
            ("zx", np.array(128, np.uint8)),
            ("wq", w_q),
            ("sw", np.full(8, 0.01, np.float32)),
            ("zw", np.full(8, 3, np.int8)),
        ],
    )
    onnx.checker.check_model(proto, full_check=True)
    mod, report = _lower(load_model(save(proto)))
    assert not report.lowered
    assert report.to_dict()["left_float"] == [{"op": "matmul", "node": "mm", "reason": "weight zero point is not 0 (asymmetric weights)"}]
    assert all(c[2] == "float32" for c in _calls(mod) if c[0] == "relax.matmul")
    x = rand(2, 4)
    np.testing.assert_allclose(_run(_compile(mod), x), ort_run(proto, {"x": x})["y"], atol=1e-5)


def test_float_model_is_untouched():
    from optc.targets.int8_lowering import lower_int8
    from tvm.relax.frontend.onnx import from_onnx

    proto = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], [("x", [2, 4])], [("y", [2, 3])], [("W", rand(4, 3))])
    mod = from_onnx(proto, keep_params_in_input=False)
    new, report = lower_int8(mod)
    assert report.to_dict() == {"enabled": True, "lowered": 0, "lowered_regions": [], "left_float": [], "unquantized_ops": 1}
    assert new.same_as(mod)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kernels", "quantize", "cpu"),
    [("tvm", "quantize:reduce_range=false", None), ("onednn", "quantize:reduce_range=false", None),
     ("onednn", "quantize:activation_type=int8,reduce_range=false", None),
     ("tvm", "quantize:activation_type=int8,reduce_range=false", None),  # on a VNNI CPU: shifted to uint8 for vpdpbusd
     # an AVX2 CPU without VNNI (Zen 3's kind; its code runs on this x86 too): 7-bit weights, the quantize default
     # there, so vpmaddubsw's int16 pairs cannot saturate; int8 activations shifted into its uint8
     ("tvm", "quantize", "haswell"), ("tvm", "quantize:activation_type=int8", "haswell")],
    ids=["tvm-uint8", "onednn-uint8", "onednn-int8", "tvm-int8", "tvm-avx2-uint8", "tvm-avx2-int8"],
)
def test_sample_cnn_int8_artifact_accuracy_and_report(tmp_path, kernels, quantize, cpu):
    """The bundled CNN through the CLI: every region lowered, accuracy of the int8 artifact
    vs the fp32 artifact on the 1,000 test samples, outputs vs onnxruntime within a step,
    with TVM's integer kernels and with oneDNN's (u8 and s8 activations; TVM's on a VNNI CPU shift s8 into u8), and
    with TVM's for an AVX2 CPU without VNNI (vpmaddubsw on 7-bit weights)."""
    import json

    from click.testing import CliRunner

    from optc.cli.main import cli
    from optc.targets.artifact import load_artifact

    if kernels == "onednn":
        onednn_or_skip()
    db = tmp_path / "db"
    common = ["--input-shape", "input=1x1x28x28", "--target", "x86", "--no-latency", "--tuning-db", str(db), "--kernels", kernels,
              *(["--cpu", cpu] if cpu else [])]
    if cpu and not x86_cpu_runs_here(cpu):
        pytest.skip(f"this machine cannot run {cpu}'s instructions")
    from optc.targets.presets import VNNI_FLAGS, cpu_flags

    if cpu is None and not any(flag in cpu_flags() for flag in VNNI_FLAGS):
        # without VNNI 8-bit weights would saturate int16 pairs and stay float (the test above): the 7-bit default
        quantize = quantize.replace("reduce_range=false", "reduce_range=true")
    runner = CliRunner()
    res = runner.invoke(
        cli,
        ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(tmp_path / "int8"), "--pass", "canonicalize", "--pass", quantize,
         "--calib", str(SAMPLE / "calib.npz"), *common],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert "int8 (TVM): 8 regions lowered to integer kernels" in res.output
    report = json.loads((tmp_path / "int8" / "report.json").read_text())
    assert report["target"]["int8"]["lowered"] == 8 and report["target"]["int8"]["left_float"] == []
    providers = report["target"]["tuning"]["providers"]
    if kernels == "onednn":  # every conv and matmul chain in oneDNN: the 1-channel stem in float32, the rest in int8
        workloads = [e["workload"] for e in providers["offloaded"]]
        assert len(workloads) == 8 and [w for w in workloads if "int8" not in w] == ["conv2d/1x28x28x1/w16x1x3x3/s1_1/p1_1_1_1/d1_1/g1/n1/b/relu"]
        # int8 chains whose output the next layer quantizes write it in 8 bits (the requantisation folded in; all but the logits)
        assert sum(w.endswith(("/quint8", "/qint8")) for w in workloads) == 6, providers
    else:
        assert providers["offloaded"] == []
    if "int8" in quantize:
        # on a VNNI CPU, int8 activations are shifted into vpdpbusd's uint8 only where TVM computes every layer: oneDNN
        # multiplies int8 itself, and the shift would be one more pass in front of it
        kinds = {w.split("/")[0] for w in [e["workload"] for e in providers["offloaded"]]}
        dot = report["target"]["int8"].get("dot_product", "")
        assert ("shifted by 128" in dot) == (kernels == "tvm" and ("vpdpbusd" in dot or "vpmaddubsw" in dot)), dot
        assert kernels == "tvm" or "conv2d_int8" in kinds, kinds
    if cpu:
        assert report["target"]["int8"]["dot_product"].startswith("vpmaddubsw (uint8 activations")
        stored = [onnx.numpy_helper.to_array(t) for t in load_model(tmp_path / "int8" / "model.onnx").proto.graph.initializer]
        weights = [t for t in stored if t.dtype == np.int8 and t.ndim >= 2]
        assert weights and max(int(np.abs(t.astype(np.int16)).max()) for t in weights) <= 64  # what vpmaddubsw needs
        import shutil
        import subprocess

        if shutil.which("objdump"):  # binutils, beside the C++ compiler the set-up installs
            code = subprocess.run(["objdump", "-d", str(tmp_path / "int8" / "model.so")], capture_output=True, text=True, check=True).stdout
            assert "vpmaddubsw" in code and "vpmaddwd" in code  # the kernels did take the instruction
    res = runner.invoke(cli, ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(tmp_path / "fp32"), *common], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    int8, fp32 = load_artifact(tmp_path / "int8"), load_artifact(tmp_path / "fp32")
    q = load_model(tmp_path / "int8" / "model.onnx")  # the QDQ model the artifact was compiled from
    test = np.load(SAMPLE / "test.npz")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(q.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    step = _last_layer_step(q, "logits")
    correct = {"int8": 0, "fp32": 0}
    worst = 0.0
    for i in range(len(test["label"])):
        x = test["input"][i : i + 1]
        got = int8.run({"input": x})["logits"]
        correct["int8"] += int(got.argmax() == test["label"][i])
        correct["fp32"] += int(fp32.run({"input": x})["logits"].argmax() == test["label"][i])
        if i < 200:
            worst = max(worst, float(np.abs(got - session.run(["logits"], {"input": x})[0]).max()))
    assert worst <= step, f"max |diff| vs onnxruntime {worst:.3g} > one step {step:.3g}"
    n = len(test["label"])
    assert correct["fp32"] / n >= 0.975 and correct["int8"] / n >= correct["fp32"] / n - 0.005, correct


def test_no_int8_lowering_keeps_float(save, tmp_path):
    from optc.targets.build import build
    from optc.targets.spec import make_target

    q = _quantize(save, tmp_path, _gemm_model(), reduce_range=True)
    spec = make_target("x86", cpu="core-avx2")
    _, summary = build(q, spec, None, int8=False)
    assert summary["int8"] == {"enabled": False}
    _, summary = build(q, spec, None)
    assert summary["int8"]["lowered"] == 3
    # the same layers with 8-bit weights, for this CPU without VNNI: float (int16 pairs would saturate), said why
    _, summary = build(_quantize(save, tmp_path, _gemm_model(), reduce_range=False), spec, None)
    assert summary["int8"]["lowered"] == 0 and len(summary["int8"]["left_float"]) == 3


def test_lowering_failure_is_a_target_error():
    from optc.targets.int8_lowering import lower_int8

    with pytest.raises(TargetError, match="int8 lowering failed.*--no-int8-lowering"):
        lower_int8(object())


@pytest.mark.slow
def test_int8_arm_artifact_under_qemu_matches_onnxruntime(tmp_path):
    """Integer kernels cross-compiled for aarch64, run under qemu-user, against onnxruntime on x86."""
    import json

    from click.testing import CliRunner

    from optc.cli.main import cli

    tool = arm_runner()
    out = tmp_path / "arm"
    res = CliRunner().invoke(
        cli,
        ["compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--input-shape", "input=8x1x28x28", "--pass", "canonicalize",
         "--pass", "quantize:reduce_range=false,batch_size=8", "--calib", str(SAMPLE / "calib.npz"),
         "--target", "arm", "--tuning-db", str(tmp_path / "db"), "--no-latency", "--json"],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["target"]["name"] == "arm" and report["target"]["int8"]["lowered"] == 8
    x = np.load(SAMPLE / "test.npz")["input"][:8]
    got = tool.run_artifact(out, {"input": x}, repeats=1).outputs["logits"]
    q = load_model(out / "model.onnx")
    ref = ort_run(q.proto, {"input": x})["logits"]
    step = _last_layer_step(q, "logits")
    assert got.shape == (8, 10) and float(np.abs(got - ref).max()) <= step
    assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.mark.slow
def test_arm_dot_product_kernels_under_qemu(save, tmp_path):
    """--cpu cortex-a76 (Armv8.2, dot products): the int8 convolutions (grouped too) and the Gemm whose inputs come in
    fours run on sdot; a Cortex-A53 (no dot products) gets the widening NEON kernels. Both, under qemu, give the same bits, within
    one step of onnxruntime on x86; the manifest of the first asks the board for asimddp."""
    import json
    import subprocess

    from click.testing import CliRunner

    from optc.cli.main import cli

    tool = arm_runner()
    model = tmp_path / "q.onnx"
    onnx.save_model(_quantize(save, tmp_path, _dot_model(), reduce_range=False).proto, str(model))
    x = rand(1, 8, 12, 12, seed=400)
    outputs, sdots = {}, {}
    for cpu, board in (("cortex-a76", "max"), ("cortex-a53", "cortex-a53")):
        out = tmp_path / cpu
        res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--target", "arm", "--cpu", cpu, "--tuning-db",
                                       str(tmp_path / "db"), "--no-latency", "--json"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        int8 = json.loads(res.stdout)["target"]["int8"]
        assert int8["lowered"] == 5 and ("dot_product" in int8) == (cpu == "cortex-a76")
        features = json.loads((out / "manifest.json").read_text())["runtime"]["cpu"]
        assert features["mcpu"] == cpu and ("asimddp" in features["features"]) == (cpu == "cortex-a76")
        code = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(out / "model.so")], capture_output=True, text=True, check=True).stdout
        sdots[cpu] = code.count("\tsdot\t")
        outputs[cpu] = tool.run_artifact(out, {"x": x}, cpu=board).outputs["y"]
    assert sdots["cortex-a76"] >= 4 and sdots["cortex-a53"] == 0  # conv1, pw, the grouped conv and fc; the depthwise not
    np.testing.assert_array_equal(outputs["cortex-a76"], outputs["cortex-a53"])
    q = load_model(model)
    assert float(np.abs(outputs["cortex-a76"] - ort_run(q.proto, {"x": x})["y"]).max()) <= _last_layer_step(q, "y")


def _requant_model():
    """Every post-op a requantised oneDNN output folds: ReLU6 (a clip), none (a non-zero output zero point), ReLU, and
    a Gemm whose output the next layer quantizes."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"], name="relu6"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="plain"),
            helper.make_node("Conv", ["c2", "W3", "B3"], ["c3"], strides=[2, 2], name="conv3"),
            helper.make_node("Relu", ["c3"], ["r3"], name="relu"),
            helper.make_node("Flatten", ["r3"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "G1", "C1"], ["g1"], transB=1, name="fc1"),
            helper.make_node("Gemm", ["g1", "G2", "C2"], ["y"], transB=1, name="fc2"),
        ],
        [("x", [1, 8, 12, 12])],
        [("y", [1, 10])],
        # weights scaled by about 1/sqrt(fan-in): activations of order one, so ReLU6's bound clips some of them
        [("W1", rand(16, 8, 3, 3) * 0.3), ("B1", rand(16, seed=1)), ("lo", np.array(0.0, np.float32)), ("hi", np.array(6.0, np.float32)),
         ("W2", rand(16, 16, 3, 3, seed=2) * 0.1), ("B2", rand(16, seed=3)), ("W3", rand(32, 16, 1, 1, seed=4) * 0.25),
         ("B3", rand(32, seed=5)), ("G1", rand(24, 1152, seed=6) * 0.03), ("C1", rand(24, seed=7)), ("G2", rand(10, 24, seed=8) * 0.2),
         ("C2", rand(10, seed=9))],
    )


@pytest.mark.slow
def test_onednn_writes_requantised_outputs_within_a_step(save, tmp_path):
    """oneDNN's int8 convolutions and matmuls write the next layer's 8-bit input themselves (scale, zero point and
    clip folded into their own); the artifact stays with onnxruntime's execution of the QDQ model and with TVM's
    integer kernels, which quantize in a kernel of their own."""
    import json

    from click.testing import CliRunner

    from optc.cli.main import cli
    from optc.targets.artifact import load_artifact
    onednn_or_skip()
    model = tmp_path / "q.onnx"
    q = _quantize(save, tmp_path, _requant_model(), reduce_range=False)
    onnx.save_model(q.proto, str(model))
    outputs = {}
    for kernels in ("onednn", "tvm"):
        out = tmp_path / kernels
        res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--target", "x86", "--kernels", kernels,
                                       "--tuning-db", str(tmp_path / "db"), "--no-latency"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        offloaded = json.loads((out / "report.json").read_text())["target"]["tuning"]["providers"]["offloaded"]
        if kernels == "onednn":
            tags = sorted(e["workload"].rsplit("/", 1)[-1] for e in offloaded)
            assert tags == ["b", "quint8", "quint8", "quint8", "quint8"], offloaded  # fc2's float logits end the model
        artifact = load_artifact(out)
        outputs[kernels] = np.concatenate([artifact.run({"x": rand(1, 8, 12, 12, seed=500 + i)})["y"] for i in range(8)])
    ref = np.concatenate([ort_run(q.proto, {"x": rand(1, 8, 12, 12, seed=500 + i)})["y"] for i in range(8)])
    step = _last_layer_step(q, "y")
    for got in outputs.values():
        cos = float((got * ref).sum() / (np.linalg.norm(got) * np.linalg.norm(ref)))
        # a requantisation landing on a .5 boundary can round one step apart (float rounding); it moves the logits little
        assert cos > 0.99999 and float(np.abs(got - ref).max()) <= 2 * step, (cos, float(np.abs(got - ref).max()), step)
    # measured: both kernels 0.0176 from onnxruntime at most, one step being 0.024 (logits up to 4.5)
    assert float(np.abs(outputs["onednn"] - outputs["tvm"]).max()) <= 2 * step


@pytest.mark.slow
def test_onednn_requantises_in_a_model_without_convolutions(save, tmp_path):
    """Without a convolution no layout rewrite runs and the next layer's quantize stays the frontend's R.quantize:
    a matmul chain absorbs that one too."""
    import json

    from click.testing import CliRunner

    from optc.cli.main import cli
    from optc.targets.artifact import load_artifact
    onednn_or_skip()
    mlp = make_model(
        [helper.make_node("Gemm", ["x", "G1", "C1"], ["g1"], transB=1, name="fc1"), helper.make_node("Relu", ["g1"], ["r1"], name="relu"),
         helper.make_node("Gemm", ["r1", "G2", "C2"], ["g2"], transB=1, name="fc2"),
         helper.make_node("Gemm", ["g2", "G3", "C3"], ["y"], transB=1, name="fc3")],
        [("x", [4, 32])],
        [("y", [4, 5])],
        [("G1", rand(24, 32) * 0.2), ("C1", rand(24, seed=1)), ("G2", rand(16, 24, seed=2) * 0.2), ("C2", rand(16, seed=3)),
         ("G3", rand(5, 16, seed=4) * 0.25), ("C3", rand(5, seed=5))],
    )
    q = _quantize(save, tmp_path, mlp, reduce_range=False)
    model = tmp_path / "q.onnx"
    onnx.save_model(q.proto, str(model))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--target", "x86", "--kernels", "onednn",
                                   "--tuning-db", str(tmp_path / "db"), "--no-latency"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    offloaded = json.loads((out / "report.json").read_text())["target"]["tuning"]["providers"]["offloaded"]
    assert sorted(e["workload"].rsplit("/", 1)[-1] for e in offloaded) == ["b", "quint8", "quint8"], offloaded  # ReLU; none
    artifact = load_artifact(out)
    step = _last_layer_step(q, "y")
    for seed in range(5):
        x = rand(4, 32, seed=700 + seed)
        assert float(np.abs(artifact.run({"x": x})["y"] - ort_run(q.proto, {"x": x})["y"]).max()) <= step


def _residual_model(channels: int = 24):
    """A stem conv, then a residual block (conv -> ReLU -> conv, plus the block's input, -> ReLU) and a 1x1 conv, whose
    quantised input makes the residual's sum a quantised output; 8 x 14 x 14 images."""
    return make_model(
        [
            helper.make_node("Conv", ["x", "W0", "B0"], ["c0"], pads=[1, 1, 1, 1], name="stem"),
            helper.make_node("Relu", ["c0"], ["r0"], name="relu_stem"),
            helper.make_node("Conv", ["r0", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="a"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu_a"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="b"),
            helper.make_node("Add", ["c2", "r0"], ["s"], name="skip"),
            helper.make_node("Relu", ["s"], ["r"], name="relu"),
            helper.make_node("Conv", ["r", "W3"], ["y"], name="head"),
        ],
        [("x", [8, 8, 14, 14])],
        [("y", [8, 16, 14, 14])],
        [("W0", rand(channels, 8, 3, 3) * 0.2), ("B0", rand(channels, seed=4)),
         ("W1", rand(channels, channels, 3, 3) * 0.1), ("B1", rand(channels, seed=1)),
         ("W2", rand(channels, channels, 3, 3, seed=2) * 0.1), ("B2", rand(channels, seed=3)),
         ("W3", rand(16, channels, 1, 1, seed=5) * 0.2)],
    )


def test_a_residual_add_after_an_int8_convolution_runs_on_its_tile(save, tmp_path, monkeypatch):
    """The residual add also reads the skip connection dequantised (cast, subtract, multiply: blocks of their own),
    and TVM inlines a consumer only where it reads one buffer computed in the function: the add, ReLU and requantise
    ran as a loop of their own over the whole output, reading back the convolution's result written as float. Now the
    skip's dequantise is inlined first and the whole epilogue runs on the tile, with 24 channels (padded to 32 where
    the CPU has AVX-512: the epilogue under the tile loop) and 32 (inlined into the write-back). Outputs within a step
    of onnxruntime's execution of the QDQ model."""
    import re

    import tvm
    from click.testing import CliRunner

    import optc.targets.tuned_compile as tuned_compile
    from optc.cli.main import cli
    from optc.targets.artifact import load_artifact

    scheduled = []

    def keeping(mod):  # the functions as the build schedules them
        mod, count = default_schedules(mod)
        scheduled.extend(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        return mod, count

    default_schedules = tuned_compile.default_schedules
    monkeypatch.setattr(tuned_compile, "default_schedules", keeping)
    for channels in (24, 32):
        q = _quantize(save, tmp_path, _residual_model(channels), reduce_range=False)
        model = tmp_path / f"q{channels}.onnx"
        onnx.save_model(q.proto, str(model))
        out = tmp_path / f"art{channels}"
        scheduled.clear()
        res = CliRunner().invoke(cli, ["compile", str(model), "-o", str(out), "--target", "x86", "--kernels", "tvm",
                                       "--tuning-db", str(tmp_path / f"db{channels}"), "--no-latency"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        # the second convolution of the block: it reads its input and the skip connection, both 8-bit
        found = {f.script(): f for f in scheduled if "conv2d_nhwc_update" in f.script() and sum(str(p.dtype) == "uint8" for p in f.params[:-1]) >= 2}
        assert len(found) == 1, [f.params for f in found.values()]
        (text, func), = found.items()
        output = func.params[-1].name
        pieces = re.split(r"\n    for ", text)  # the function's top-level loop nests
        nests = [n for n in pieces if "conv2d_nhwc_update" in n]
        assert len(pieces) > 2 and len(nests) == 1 and f"T.writes({output}[" in nests[0], text  # written on the tile
        artifact = load_artifact(out)
        step = _last_layer_step(q, "y")
        for seed in (7, 8):
            x = rand(8, 8, 14, 14, seed=seed)
            diff = np.abs(artifact.run({"x": x})["y"] - ort_run(q.proto, {"x": x})["y"])
            # Where the residual's requantisation lands on a .5 boundary it can round one step apart from onnxruntime's;
            # the head then moves that pixel's outputs by up to two of its steps. Measured: 0 to 0.7 % of the outputs,
            # 1.9 steps at most, the same with the epilogue as a loop of its own.
            assert float((diff > 1e-4).mean()) < 0.02 and float(diff.max()) <= 2 * step, (channels, float(diff.max()), step)
