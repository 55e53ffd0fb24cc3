"""optc's register-tiled convolution kernel (targets.tiled_kernels): where it applies, tile sizes, exact results."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import arm_runner, make_model, ort_run, rand, x86_cpu_runs_here
from onnx import helper, numpy_helper

from optc.cli.main import cli
from test_providers import conv1d_silu, voice_encoder

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def _w(name, *shape, seed=0):
    return numpy_helper.from_array((np.random.default_rng(seed).standard_normal(shape) * 0.2).astype(np.float32), name)


def conv_stack() -> onnx.ModelProto:
    """The shapes the template must tile: 3x3 + bias + ReLU, a stride-2 conv on an odd width, a 1x1 conv
    joined by a residual, a weight-heavy conv (more weight than input bytes), a depthwise and a grouped conv
    (which the template tiles as well: its schedule keeps the group's channel mapping), and a one-channel head."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Conv", ["c2", "w3"], ["c3"]), helper.make_node("Add", ["c3", "c2"], ["s3"]),
        helper.make_node("Relu", ["s3"], ["r3"]),
        helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c4", "wd", "bd"], ["d4"], pads=[1, 1, 1, 1], group=96), helper.make_node("Relu", ["d4"], ["r4"]),
        helper.make_node("Conv", ["r4", "wg"], ["g4"], group=4),
        helper.make_node("Conv", ["g4", "w5"], ["y"], pads=[1, 1, 1, 1]),
    ]
    inits = [_w("w1", 24, 3, 3, 3, seed=1), _w("b1", 24, seed=2), _w("w2", 40, 24, 3, 3, seed=3), _w("b2", 40, seed=4),
             _w("w3", 40, 40, 1, 1, seed=5), _w("w4", 96, 40, 3, 3, seed=6), _w("b4", 96, seed=7), _w("w5", 1, 32, 3, 3, seed=8),
             _w("wd", 96, 1, 3, 3, seed=9), _w("bd", 96, seed=10), _w("wg", 32, 24, 1, 1, seed=11)]
    return make_model(nodes, [("x", [1, 3, 22, 26])], [("y", [1, 1, 11, 13])], inits)


def dense_stack() -> onnx.ModelProto:
    """Dense layers as transformers and LSTM steps have them: 3-D activations by a weight + bias + ReLU, a
    matrix-vector product, and Q·Kᵀ between two activations (no weight to pack)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Transpose", ["r1"], ["t1"], perm=[0, 2, 1]), helper.make_node("MatMul", ["r1", "t1"], ["s"]),
        helper.make_node("ReduceMean", ["s"], ["v"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["v", "w2"], ["y"]),
    ]
    inits = [_w("w1", 48, 64, seed=1), _w("b1", 64, seed=2), _w("w2", 24, 32, seed=3)]
    return make_model(nodes, [("x", [2, 24, 48])], [("y", [2, 32])], inits, opset=17)


def squeeze_excite() -> onnx.ModelProto:
    """A squeeze-excite gate: a 1x1 conv of the pooled vector, a sigmoid, and the product with the whole map it gates
    (FuseOps puts that product, over H x W x C, in the conv's function, after the conv's C-value tile)."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
        helper.make_node("Conv", ["p", "w2", "b2"], ["c2"]), helper.make_node("Sigmoid", ["c2"], ["g"]),
        helper.make_node("Mul", ["r1", "g"], ["y"]),
    ]
    inits = [_w("w1", 32, 8, 3, 3, seed=1), _w("b1", 32, seed=2), _w("w2", 32, 32, 1, 1, seed=3), _w("b2", 32, seed=4)]
    return make_model(nodes, [("x", [1, 8, 64, 64])], [("y", [1, 32, 64, 64])], inits)


def test_element_wise_ops_after_a_tiled_kernel_get_threads_and_vectors():
    """The gated map (64x64x32 products) in the gate conv's function is threaded and vectorised, not left scalar."""
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.providers.select import NHWC_LAYOUTS
    from optc.targets.tuned_compile import fused
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod = fused(relax.transform.ConvertLayout(NHWC_LAYOUTS)(from_onnx(squeeze_excite(), keep_params_in_input=False)), target, True)
    gates = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script()
             and [int(d) for d in f.params[-1].shape] == [1, 64, 64, 32] and int(f.params[0].shape[1]) == 1]
    assert len(gates) == 1, "FuseOps no longer puts the gated product in the gate conv's function"
    with target:
        text = schedule_function(gates[0]).script()
    assert 'T.sblock("conv2d_nhwc_update")' in text and 'T.sblock("T_multiply")' in text, text
    nest = [line for line in text[:text.index('T.sblock("T_multiply")')].splitlines() if line.strip().startswith("for ")][-3:]
    assert any("T.parallel" in line for line in nest) and any("T.vectorized" in line for line in nest), nest


@pytest.mark.parametrize("out_channels", [16, 64])
def test_a_convolution_above_the_line_is_threaded_however_few_its_column_tiles(out_channels):
    """decompose_reduction fused the innermost tile loop (one or several column tiles) into the threaded loops above it,
    and the loop it made was serial: the tiled convolutions ran on one thread at any count."""
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.providers.select import NHWC_LAYOUTS
    from optc.targets.tiled_kernels import PARALLEL_MACS
    from optc.targets.tuned_compile import fused
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [("x", [32, 1, 28, 28])], [("y", [32, out_channels, 28, 28])],
                       [_w("w", out_channels, 1, 3, 3, seed=1), _w("b", out_channels, seed=2)])
    assert 32 * 28 * 28 * out_channels * 9 >= PARALLEL_MACS
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod = fused(relax.transform.ConvertLayout(NHWC_LAYOUTS)(from_onnx(model, keep_params_in_input=False)), target, True)
    (conv,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script()]
    with target:
        text = schedule_function(conv).script()
    nest = [line for line in text[:text.index('T.sblock("conv2d_nhwc_update")')].splitlines() if line.strip().startswith("for ")]
    assert any("T.parallel" in line for line in nest[-6:]), nest  # the reduction's own loop nest, not the padded copy's


def scheduled_one(model: onnx.ModelProto, marker: str, nhwc: bool = False) -> tuple[object, str]:
    """The one fused PrimFunc of ``model`` whose script holds ``marker`` (compiled for an AVX-512 target, NHWC where
    asked), and its script after the tiled template; fails where the template gives up."""
    import tvm
    from optc.targets.providers.select import NHWC_LAYOUTS
    from optc.targets.tiled_kernels import schedule_tiled
    from optc.targets.tuned_compile import fused
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod = from_onnx(model, keep_params_in_input=False)
    mod = fused(relax.transform.ConvertLayout(NHWC_LAYOUTS)(mod) if nhwc else mod, target, True)
    (func,) = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and marker in f.script()]
    scheduled = schedule_tiled(func, target)
    assert scheduled is not None, f"the template gave up on {marker}"
    return func, scheduled.script()


def _matrix_vector(k: int, n: int) -> onnx.ModelProto:
    """An LSTM step's product: one row by a [k, n] weight, plus a bias."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])]
    return make_model(nodes, [("x", [1, k])], [("y", [1, n])], [_w("w", k, n, seed=1), _w("b", n, seed=2)])


@pytest.mark.parametrize(("k", "n", "threaded"), [(512, 2048, True), (128, 512, False)],
                         ids=["4MB-of-weights", "256KB-of-weights"])
def test_a_matrix_vector_product_is_threaded_by_its_weight_bytes_not_its_multiply_adds(k, n, threaded, tmp_path):
    """An LSTM step's 1x512 @ 512x2048 is 1 M multiply-adds, under the line that keeps small calls on one thread, but
    reads 4 MB of weights: on one thread it took 190 us, threaded 105 (each core reads its own columns). A small
    one stays on the calling thread (waking the pool costs more than it saves). Outputs as onnxruntime's."""
    from optc.targets.artifact import load_artifact
    from optc.targets.tiled_kernels import PARALLEL_MACS, PARALLEL_WEIGHT_BYTES

    model = _matrix_vector(k, n)
    assert k * n < PARALLEL_MACS and (k * n * 4 >= PARALLEL_WEIGHT_BYTES) == threaded
    _, text = scheduled_one(model, 'T.sblock("matmul")')
    nest = [line for line in text[:text.index('T.sblock("matmul_update")')].splitlines() if line.strip().startswith("for ")]
    assert any("T.parallel" in line for line in nest) == threaded, nest
    out, _ = _compile_tvm_kernels(model, tmp_path)
    x = rand(1, k, seed=4)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_rows_only_one_divides_are_covered_by_guarded_tiles_not_cut_into_single_rows(tmp_path):
    """197 tokens (a ViT's): only 1 divides 197, and 1-row tiles keep 2 accumulators. Tiles of 14 cover the rows,
    the last guarded: 197x768 @ 768x768 took 4.99 ms in 1-row tiles and 1.70 in these (onnxruntime 1.5), 1 thread.
    Padding the rows instead (the input copied each call) was slower, 2.48 ms. (A reduction of 256: a shorter one keeps
    its tile on the stack, 7 rows.)"""
    from optc.targets.artifact import load_artifact

    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"])], [("x", [197, 256])], [("y", [197, 256])],
                       [_w("w", 256, 256, seed=1)])
    _, text = scheduled_one(model, 'T.sblock("matmul")')
    assert "T.unroll(T.int64(14))" in text and "< T.int64(197)" in text, text
    out, _ = _compile_tvm_kernels(model, tmp_path)
    x = rand(197, 256, seed=4)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def odd_conv() -> onnx.ModelProto:
    """A convolution over 43-pixel rows to 10 channels: tile_padding widens both to whole tiles."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    return make_model(nodes, [("x", [1, 16, 6, 43])], [("y", [1, 10, 6, 43])], [_w("w", 10, 16, 3, 3, seed=1), _w("b", 10, seed=2)])


def odd_classifier() -> onnx.ModelProto:
    """A dense layer over 1002 classes: no power-of-two vector width divides them."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    return make_model(nodes, [("x", [6, 256])], [("y", [6, 1002])], [_w("w", 256, 1002, seed=1), _w("b", 1002, seed=2)])


def upsampling() -> onnx.ModelProto:
    """DBNet's head: a 3x3 convolution, then a 2x2 stride-2 ConvTranspose (its windows never overlap) and a sigmoid."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("ConvTranspose", ["r", "wt", "bt"], ["u"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Sigmoid", ["u"], ["y"])]
    return make_model(nodes, [("x", [1, 8, 10, 12])], [("y", [1, 16, 20, 24])],
                      [_w("w", 24, 8, 3, 3, seed=1), _w("b", 24, seed=2), _w("wt", 24, 16, 2, 2, seed=3), _w("bt", 16, seed=4)])


def test_an_upsampling_conv_transpose_is_a_tiled_matmul_with_tvms_kernels_too(tmp_path):
    """Without oneDNN (ARM, or --kernels tvm) a 2x2 stride-2 ConvTranspose becomes the matmul and pixel shuffle it is,
    as it did for oneDNN: TVM's conv2d_transpose has no tiled kernel and took 54 of RapidOCR's detector's 73 ms."""
    model = upsampling()
    out, _ = _compile_tvm_kernels(model, tmp_path)
    assert json.loads((out / "report.json").read_text())["target"]["tuning"]["template_failures"] == []
    code = (out / "model.so").read_bytes()
    assert b"conv2d_transpose" not in code and re.search(rb"__tvm_ffi_(fused_)?matmul\w*_prepacked", code)
    from optc.targets.artifact import load_artifact

    x = rand(1, 8, 10, 12, seed=5)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_dense_layer_whose_columns_no_vector_divides_is_padded_not_left_scalar(tmp_path):
    """A classifier's 8210 classes: no power-of-two tile divides them, and TVM's default lowering of ddddocr's
    22x1024 @ 1024x8210 took 350 ms (oneDNN 5; on ARM there is no oneDNN). The weight is padded with zero columns
    to two vectors at compile time; the padded outputs are never written (an epilogue inlined into the tile wrote
    them past each row's end, into the next row)."""
    from optc.targets.artifact import load_artifact

    model = odd_classifier()
    _, text = scheduled_one(model, 'T.sblock("matmul")')
    assert "layout_rewrite_preproc" in text and "T.vectorized(T.int64(32))" in text and "T.int64(1024)" in text, text
    out, _ = _compile_tvm_kernels(model, tmp_path)
    for seed in (4, 5):  # the last row too: a write past a row's end lands in the next one, or past the buffer
        x = rand(6, 256, seed=seed)
        np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("lanes", "registers", "width", "channels", "tile"), [
    (16, 32, 56, 64, (14, 32)),  # AVX-512: two vectors of channels, 14 pixels: 28 accumulators
    (8, 16, 56, 64, (4, 16)),    # AVX2: 16 registers leave room for 6 pixels of two vectors; 4 divides 56
    (4, 32, 28, 64, (14, 8)),    # NEON
    (16, 32, 13, 1, (13, 1)),    # a one-channel head: one accumulator per pixel
    (16, 32, 7, 512, (7, 32)),
    (16, 32, 28, 64, (14, 16)),  # grouped, 16 output channels a group: a tile stays inside one group
    (16, 32, 43, 192, (11, 32)),  # only 1 divides 43: four tiles of 11 cover it, the last guarded
    (16, 32, 85, 24, (5, 8)),    # 5 divides 85 and keeps enough accumulators busy: no guard
    (8, 16, 7, 16, (4, 16)),     # AVX2, a 7-pixel row: two tiles of 4
])
def test_register_tiles_fit_the_vector_registers(lanes, registers, width, channels, tile):
    from optc.targets.tiled_kernels import SPARE_REGISTERS, tiles

    tw, tc = tiles(width, channels, lanes, registers, 16 if tile == (14, 16) else None)
    assert (tw, tc) == tile
    assert channels % tc == 0 and tw * max(1, tc // lanes) <= registers - SPARE_REGISTERS
    covered = -(-width // tw) * tw
    assert width % tw == 0 or covered - width < -(-width // tw)  # a guarded row computes under one pixel a tile more


@pytest.mark.parametrize(("in_channels", "pixels"), [(8, 7), (64, 14)])
def test_a_short_reductions_accumulators_fit_the_stack(in_channels, pixels, tmp_path):
    """The tile's accumulators are a "global" buffer: TVM puts one under 1024 bytes on the stack, where LLVM keeps it
    in registers. A "local" one, or a larger one, was taken from TVM's workspace pool on every tile (two calls, a memset,
    the accumulators stored and read back). Where the reduction is short (8 -> 32 channels, 3x3: 72 multiply-adds) the
    tile is cut to fit (7 pixels x 32 channels, 896 bytes); a long one (64 input channels) keeps 14 pixels."""
    from optc.targets.artifact import load_artifact
    from optc.targets.tiled_kernels import STACK_BYTES

    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    model = make_model(nodes, [("x", [1, in_channels, 6, 28])], [("y", [1, 32, 6, 28])],
                       [_w("w", 32, in_channels, 3, 3, seed=1), _w("b", 32, seed=2)])
    _, text = scheduled_one(model, "conv2d_nhwc", nhwc=True)
    accumulators = re.search(r"T\.writes\((\w+)\[", text[text.index('conv2d_nhwc_init")'):]).group(1)
    (alloc,) = [line for line in text.splitlines() if line.strip().startswith(f"{accumulators} = T.sblock_alloc_buffer(")]
    assert "local" not in alloc, alloc
    assert f"T.unroll(T.int64({pixels}))" in text[text.index('conv2d_nhwc_update")') - 400:], text
    # compiled: the 14-pixel tile (1792 bytes) is taken from the workspace pool, the 7-pixel one (896) is not
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    ll = tvm.compile(tvm.IRModule({"main": tvm.script.from_source(text).with_attr("global_symbol", "main")}),
                     target=target).mod.inspect_source("ll")
    pool = set(re.findall(r"(%\d+) = load ptr, ptr @__TVMBackendAllocWorkspace", ll))
    taken = [int(m.group(2)) for m in re.finditer(r"call ptr (%\d+)\(i32 [^,]+, i32 [^,]+, i64 (\d+)", ll) if m.group(1) in pool]
    assert taken, ll[:2000]  # the padded input is always taken from it: the pattern finds the calls
    tile = pixels * 32 * 4
    assert (tile in taken) == (tile >= STACK_BYTES), (taken, tile)
    out, _ = _compile_tvm_kernels(model, tmp_path)
    x = rand(1, in_channels, 6, 28, seed=3)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def test_template_schedules_every_nhwc_convolution():
    import tvm
    from optc.targets.tiled_kernels import schedule_tiled
    from optc.targets.providers.select import NHWC_LAYOUTS
    from optc.targets.tuned_compile import fused
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    mod = fused(relax.transform.ConvertLayout(NHWC_LAYOUTS)(from_onnx(conv_stack(), keep_params_in_input=False)), target, True)
    convs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script()]
    assert len(convs) == 7
    for func in convs:
        scheduled = schedule_tiled(func, target)
        assert scheduled is not None and scheduled.attrs["tir.is_scheduled"]
        text = scheduled.script()
        assert "meta_schedule.layout_rewrite_preproc" in text and "T.vectorized" in text


def test_template_packs_weights_and_reads_activations_as_they_are():
    import tvm
    from optc.targets.tiled_kernels import schedule_tiled
    from optc.targets.tuned_compile import fused
    from tvm.relax.frontend.onnx import from_onnx

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "num-cores": 2})
    mod = fused(from_onnx(dense_stack(), keep_params_in_input=False), target, True)
    matmuls = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and 'T.sblock("matmul")' in f.script()]
    tiled = [schedule_tiled(f, target) for f in matmuls]
    assert len(matmuls) == 3 and all(f is not None for f in tiled)
    # the two by a weight read it packed; Q·Kᵀ reads its two activations as they are
    assert sorted("layout_rewrite_preproc" in f.script() for f in tiled) == [False, True, True]


def one_output() -> onnx.ModelProto:
    """A 1-D convolution down to one value (Silero's voice-activity head): a 1x1 tile, one column; TVM refused to
    vectorise its column loop and the template was reported failed."""
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Sigmoid", ["c"], ["y"])]
    return make_model(nodes, [("x", [1, 64, 1])], [("y", [1, 1, 1])], [_w("w", 1, 64, 1, seed=1), _w("b", 1, seed=2)])


def _compile_tvm_kernels(model, tmp_path):
    """``optc compile --target x86 --kernels tvm`` of ``model``: (output folder, CLI result)."""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--target", "x86", "--kernels", "tvm", "--no-latency",
                                   "--tuning-db", str(tmp_path / "db")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, res


@pytest.mark.parametrize("build", [conv_stack, dense_stack, voice_encoder, conv1d_silu, squeeze_excite, one_output],
                         ids=["conv", "dense", "conv1d", "width-one", "squeeze-excite", "one-output"])
def test_tvm_kernels_match_onnxruntime(build, tmp_path):
    """``--kernels tvm``: convolutions and dense layers run optc's template (no provider), within float rounding of onnxruntime."""
    from optc.targets.artifact import load_artifact

    model = build()
    out, _ = _compile_tvm_kernels(model, tmp_path)
    tuning = json.loads((out / "report.json").read_text())["target"]["tuning"]
    providers = tuning["providers"]
    assert providers["layout"] == ("NCHW" if build is dense_stack else "NHWC") and not providers["offloaded"]
    assert tuning["template_failures"] == []  # every convolution and matmul got the template
    x = rand(*[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim], seed=4)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("build", [conv_stack, odd_classifier, odd_conv, upsampling],
                         ids=["conv", "odd-columns", "odd-rows-and-channels", "upsampling"])
def test_arm_artifact_with_the_tiled_kernels_matches_onnxruntime_under_qemu(build, tmp_path):
    """On ARM (no vendor provider) the tiled kernels compute every convolution and dense layer, a padded one too;
    checked under qemu-user."""
    tool = arm_runner()
    model = build()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    out = tmp_path / "arm"
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--target", "arm", "--no-latency", "--json",
                                   "--tuning-db", str(tmp_path / "db")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    tuning = json.loads(res.stdout)["target"]["tuning"]
    assert tuning["providers"]["layout"] == ("NCHW" if build is odd_classifier else "NHWC") and tuning["template_failures"] == []
    x = rand(*[d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim], seed=4)
    run = tool.run_artifact(out, {"x": x})
    np.testing.assert_allclose(run.outputs["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)


def _int8_conv(channels: int, out_channels: int, groups: int, dtype: str = "uint8", size: tuple[int, int] = (6, 7),
               weight_max: int = 127):
    """An 8-bit NHWC convolution into int32 as the int8 lowering emits it: 1 x size x C (7 pixels: a guarded last tile),
    3x3, int8 weights within +-weight_max (each bound reached)."""
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, *size, channels], dtype))
    w = np.random.default_rng(0).integers(-weight_max, weight_max + 1, (out_channels, 3, 3, channels // groups)).astype(np.int8)
    # one pair of products with the same sign at the bound (input channels 0 and 1 of a filter: one vpmaddubsw pair)
    w[0, 0, 0, :2], w[1, 0, 0, :2] = weight_max, -weight_max
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), padding=[1, 1, 1, 1], groups=groups, data_layout="NHWC",
                                           kernel_layout="OHWI", out_dtype="int32"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), w


@pytest.mark.parametrize(("groups", "dot"), [(1, True), (2, True), (16, False)], ids=["plain", "two-groups", "depthwise"])
def test_int8_convolutions_use_sdot_where_the_core_has_it(groups, dot):
    """On a core with dot products an int8 x int8 NHWC convolution is tensorized with sdot, grouped ones too (8 inputs a
    group); a depthwise one (one input a group) keeps the widening kernel, and so does a core without them."""
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.tuned_compile import fused

    conv_mod, _ = _int8_conv(16, 16, groups, "int8", (10, 10))
    for cpu, has in (("cortex-a76", dot), ("cortex-a53", False)):
        target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": cpu, "num-cores": 2})
        mod = fused(conv_mod, target, True)
        conv = next(f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script())
        with target:
            text = schedule_function(conv).script()
        assert ("llvm.aarch64.neon.sdot" in text) == has, (cpu, groups)


def _int8_conv_reference(x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    xp = np.pad(x.astype(np.int64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((*x.shape[:3], w.shape[0]), np.int64)
    per_in, per_out = x.shape[-1] // groups, w.shape[0] // groups
    for g in range(groups):
        for kh in range(3):
            for kw in range(3):
                patch = xp[:, kh:kh + x.shape[1], kw:kw + x.shape[2], g * per_in:(g + 1) * per_in]
                out[..., g * per_out:(g + 1) * per_out] += patch @ w[g * per_out:(g + 1) * per_out, kh, kw].astype(np.int64).T
    return out


@pytest.mark.parametrize(("channels", "out_channels", "groups", "cpu", "weight_max", "instruction", "lanes"), [
    (32, 32, 1, "icelake-server", 127, "vpdpbusd", 16),  # AVX512-VNNI: 16-lane accumulators, two per tile
    (24, 24, 1, "icelake-server", 127, "vpdpbusd", 16),  # 24 channels padded to 32: two full zmm, not three half ones
    (16, 32, 2, "icelake-server", 127, "vpdpbusd", 16),  # two groups of 8 inputs
    (32, 32, 1, "alderlake", 127, "vpdpbusd", 8),  # AVX-VNNI without AVX-512: 256-bit
    (32, 32, 1, "skylake-avx512", 64, "vpmaddubsw", 16),  # AVX-512 without VNNI, 7-bit weights: pairs into int16
    (32, 32, 1, "haswell", 64, "vpmaddubsw", 8),  # AVX2 (Zen 3's kind), 7-bit weights
    (24, 24, 1, "haswell", 64, "vpmaddubsw", 8),
    (32, 32, 1, "skylake-avx512", 127, None, 0),  # 8-bit weights would saturate int16 pairs: the widening kernel
    (32, 32, 1, "haswell", 65, None, 0),  # one step past the bound is enough
    (16, 16, 16, "icelake-server", 127, None, 0),  # depthwise: one input a group, nothing to take 4 at a time
], ids=["zmm", "zmm-24", "grouped", "avx-vnni", "avx512-7bit", "avx2-7bit", "avx2-24", "avx512-8bit", "avx2-65", "depthwise"])
def test_int8_convolutions_use_the_cores_dot_product(channels, out_channels, groups, cpu, weight_max, instruction, lanes):
    """On an x86 core with VNNI an int8 NHWC convolution (uint8 activations by int8 weights) is tensorized with
    vpdpbusd, as wide as the tile allows. Without VNNI, vpmaddubsw + vpmaddwd, but only where every weight is within
    +-64: its int16 pairs saturate past that, so 8-bit weights keep the widening kernel, exact for any. A depthwise one
    keeps it too. Where this machine can run the code, its output equals the exact integer convolution, on inputs that
    reach 255 where the pairs would saturate with wider weights."""
    import tvm
    from optc.targets.cpu_schedule import schedule_function
    from optc.targets.tiled_kernels import PAIRS_FIT_ATTR, dot_product
    from optc.targets.tuned_compile import fused
    from tvm import relax

    mod, w = _int8_conv(channels, out_channels, groups, weight_max=weight_max)
    target = tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": 2})
    mod = fused(mod, target, True)
    gvar, conv = next((g, f) for g, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_nhwc" in f.script())
    marked = conv.attrs is not None and bool(conv.attrs.get(PAIRS_FIT_ATTR, False))  # weight_bounds, x86 without VNNI
    assert marked == (instruction == "vpmaddubsw"), conv.attrs
    with target:
        scheduled = schedule_function(conv)
    text = scheduled.script()
    names = {"vpdpbusd": f"llvm.x86.avx512.vpdpbusd.{32 * lanes}",
             "vpmaddubsw": {16: "llvm.x86.avx512.pmaddubs.w.512", 8: "llvm.x86.avx2.pmadd.ub.sw"}.get(lanes)}
    for name in ("llvm.x86.avx512.vpdpbusd", "pmaddubs.w.512", "pmadd.ub.sw"):
        assert (name in text) == (instruction is not None and name in names[instruction]), (name, text)
    have = dot_product(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    assert instruction is None or (have is not None and have.name == instruction)
    if not x86_cpu_runs_here(cpu):
        return  # this machine cannot run that CPU's instructions: the schedule's structure is what is checked here
    mod[gvar] = scheduled
    vm = relax.VirtualMachine(tvm.compile(mod, target=target), tvm.cpu())  # the TIR as scheduled, for that CPU
    x = np.random.default_rng(1).integers(0, 256, (1, 6, 7, channels)).astype(np.uint8)
    x[0, :3] = 255  # the pairs' extreme: 255 x (64 + 64) fits int16, 255 x (65 + 65) would not
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x)).numpy(), _int8_conv_reference(x, w, groups))


@pytest.mark.parametrize(("target", "bound"), [
    ({"kind": "llvm", "mcpu": "haswell"}, 64), ({"kind": "llvm", "mcpu": "znver3"}, 64),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 64), ({"kind": "llvm", "mcpu": "x86-64"}, 64),  # SSE only: oneDNN too
    ({"kind": "llvm", "mcpu": "icelake-server"}, None), ({"kind": "llvm", "mcpu": "alderlake"}, None),  # VNNI: int32
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"}, None), ({"kind": "cuda"}, None),
], ids=["haswell", "zen3", "skylake", "sse", "icelake", "alderlake", "arm", "cuda"])
def test_which_targets_int8_kernels_saturate_8_bit_weights(target, bound):
    """The bound the int8 lowering holds weights to: x86 without VNNI adds products in int16 pairs (oneDNN and optc's
    vpmaddubsw alike); VNNI, Arm's dot products and CUDA accumulate in int32."""
    import tvm
    from optc.targets.tiled_kernels import pair_weight_max

    assert pair_weight_max(tvm.target.Target(target)) == bound


def test_a_matmul_the_template_cannot_tile_is_reported_with_why(tmp_path):
    """Attention scores over 13 tokens: Q·Kᵀ's columns are an activation's 13 tokens, which no vector tile divides and
    no weight padding can widen. It keeps TVM's default loop, correct, and the report says so instead of nothing."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]), helper.make_node("MatMul", ["x", "t"], ["y"])]
    model = make_model(nodes, [("x", [1, 13, 32])], [("y", [1, 13, 13])], [], opset=17)
    out, res = _compile_tvm_kernels(model, tmp_path)
    failures = json.loads((out / "report.json").read_text())["target"]["tuning"]["template_failures"]
    assert len(failures) == 1 and "Untileable: no vector tile divides an activation's 13 columns" in failures[0], failures
    assert "(correct, slower; shapes optc's kernel does not cover)" in " ".join(res.output.split())  # a limit, not a bug
    from optc.targets.artifact import load_artifact

    x = rand(1, 13, 32, seed=3)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)


def test_a_template_failure_is_reported_not_silent(tmp_path, monkeypatch):
    """A convolution the tiled template matched but could not schedule still compiles (TVM's default schedule), and
    the report and the terminal say so: such a failure once cost every ARM int8 convolution its tiling unseen."""
    import optc.targets.tiled_kernels as tk

    def broken(*args, **kwargs):
        raise RuntimeError("tile broken for the test")

    monkeypatch.setattr(tk, "_tiled", broken)
    model = conv_stack()
    out, res = _compile_tvm_kernels(model, tmp_path)
    failures = json.loads((out / "report.json").read_text())["target"]["tuning"]["template_failures"]
    assert len(failures) == 7 and all("RuntimeError: tile broken for the test" in f for f in failures), failures
    assert "warning: optc's tiled kernel could not schedule 7 convolution/matmul function(s)" in " ".join(res.output.split())
    from optc.targets.artifact import load_artifact

    x = rand(1, 3, 22, 26, seed=4)
    np.testing.assert_allclose(load_artifact(out).run({"x": x})["y"], ort_run(model, {"x": x})["y"], rtol=1e-4, atol=1e-4)
