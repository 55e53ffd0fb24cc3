"""optc's Winograd kernels at NEON's width (targets/providers/neon_glue.cc), the ARM artifacts' 3x3 convolutions.

The glue's source is built here for x86-64 too (SSE's 4 floats a vector, as NEON's) and checked against the
float64 convolution on every case of test_winograd_kernels.py, without a cross compiler or qemu; the aarch64 build
is checked end to end under qemu in test_targets_arm.py."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_winograd_kernels import CASES, reference

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def bits(v: float) -> int:
    return int(np.array(v, np.float32).view(np.int32))


def test_neon_winograd_matches_the_convolution_on_every_case():
    """To 2e-5 of the output's range for F(4x4, 3x3) and 5e-6 for F(2x2, 3x3), as the x86 builds; each call twice
    (the second reads the transformed weights the first cached), on TVM's thread pool."""
    import tvm
    from optc.targets.providers import neon
    from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43
    from tvm import relax

    rng = np.random.default_rng(1)
    bb = relax.BlockBuilder()
    data = []
    for i, (n, h, wd, c, k, pads, act, clip, has_b, has_r) in enumerate(CASES):
        oh, ow = h + pads[0] + pads[2] - 2, wd + pads[1] + pads[3] - 2
        w = (rng.standard_normal((k, c, 3, 3)) * 0.2).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32) if has_b else None
        x = rng.standard_normal((n, h, wd, c)).astype(np.float32)
        res = rng.standard_normal((n, oh, ow, k)).astype(np.float32) if has_r else None
        data.append((x, w, b, res))
        for algo in (ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23):
            xv = relax.Var("x", relax.TensorType(list(x.shape), "float32"))
            params = [xv] + ([relax.Var("r", relax.TensorType(list(res.shape), "float32"))] if has_r else [])
            attrs = relax.ShapeExpr([1, 1, *pads, 1, 1, 1, act, bits(clip[0]), bits(clip[1]), 1, algo])
            name = f"{neon.PREFIX}_conv2d_sum" if has_r else f"{neon.PREFIX}_conv2d" if has_b else f"{neon.PREFIX}_conv2d_nobias"
            args = [xv, relax.const(w)] + ([relax.const(b)] if has_b else []) + params[1:] + [attrs]
            with bb.function(f"case{i}_{algo}", params):
                with bb.dataflow():
                    out = bb.emit_output(bb.emit(relax.call_dps_packed(name, args, relax.TensorType([n, oh, ow, k], "float32"))))
                bb.emit_func_output(out)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.so"
        tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})).export_library(
            str(path), addons=[str(neon.glue_object("g++", "x86_64"))])
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        for i, (x, w, b, res) in enumerate(data):
            *_, pads, act, clip, _, _ = CASES[i]
            want = reference(x, w, b, res, pads, act, clip)
            inputs = [tvm.runtime.tensor(x)] + ([tvm.runtime.tensor(res)] if res is not None else [])
            for algo, bound in ((ALGO_WINOGRAD_F43, 2e-5), (ALGO_WINOGRAD_F23, 5e-6)):
                first = vm[f"case{i}_{algo}"](*inputs).numpy()
                got = vm[f"case{i}_{algo}"](*inputs).numpy()
                np.testing.assert_array_equal(got, first)
                error = float(np.abs(got - want).max() / np.abs(want).max())
                assert error < bound, (CASES[i], algo, error)


def conv_chain(c, k, hw, batch=1, act=1, strides=(1, 1), kernel=3):
    from optc.targets.providers.chains import Chain

    w = np.zeros((k, c, kernel, kernel), np.float32)
    out = (batch, hw // strides[0], hw // strides[1], k)
    return Chain("conv2d", None, None, out, weight=w, act=act, in_shapes=((batch, hw, hw, c),),
                 conv={"strides": strides, "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1, "nhwc": 1})


def test_the_board_cost_model_picks_the_tile_by_work_and_weight_traffic():
    """ResNet-18's 3x3 stride-1 layers at batch 1: F(4x4, 3x3) up to 128 channels (2.4 MB of transformed weights),
    F(2x2, 3x3) at 256 channels (F(4x4)'s 9.4 MB are over the cap), TVM's direct kernel at 512 (both over it); nothing
    where the call's own cost outweighs what a small layer saves, for strides, 1x1 or GELU."""
    from optc.targets.providers import neon
    from optc.targets.providers.chains import ACT_GELU_ERF, ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43

    assert neon.choose(conv_chain(64, 64, 56)) == ALGO_WINOGRAD_F43
    assert neon.choose(conv_chain(128, 128, 28)) == ALGO_WINOGRAD_F43
    assert neon.transformed_bytes(conv_chain(256, 256, 14), ALGO_WINOGRAD_F43) > neon.MAX_TRANSFORMED_BYTES
    assert neon.choose(conv_chain(256, 256, 14)) == ALGO_WINOGRAD_F23
    assert neon.choose(conv_chain(512, 512, 7)) is None
    assert neon.cost(conv_chain(64, 64, 56), ALGO_WINOGRAD_F43) * 3 < neon.cost(conv_chain(64, 64, 56), None)
    assert neon.choose(conv_chain(4, 4, 6)) is None  # 5 k multiply-adds: the call costs more than it saves
    assert neon.choose(conv_chain(64, 64, 56, strides=(2, 2))) is None
    assert neon.choose(conv_chain(64, 64, 56, kernel=1)) is None
    assert neon.choose(conv_chain(64, 64, 56, act=ACT_GELU_ERF)) is None
