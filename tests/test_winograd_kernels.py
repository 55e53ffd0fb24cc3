"""optc's own Winograd kernels, F(4x4, 3x3) and F(2x2, 3x3) (targets/providers/winograd_tile.h, called through the oneDNN glue).

Each case runs in a fresh process: the glue picks the kernel's instruction set once, capped like oneDNN by
``ONEDNN_MAX_CPU_ISA`` (AVX-512, AVX2, or none: then the request computes oneDNN's direct convolution)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import onednn_or_skip

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

# (N, H, W, C, K, pads top/left/bottom/right, activation code, clip, bias, residual), as optc hands them over
CASES = [
    (1, 13, 13, 20, 24, (1, 1, 1, 1), 1, (0.0, 0.0), True, False),  # channels no vector divides, odd sides
    (2, 9, 17, 64, 40, (0, 0, 0, 0), 0, (0.0, 0.0), False, False),  # batch 2, no padding, no bias, no activation
    (1, 8, 8, 16, 32, (2, 1, 0, 1), 2, (0.0, 6.0), True, True),  # uneven padding, a clip, a residual
    (1, 6, 6, 4, 4, (1, 1, 1, 1), 1, (0.0, 0.0), True, True),  # smaller than one register tile
    (1, 30, 30, 64, 64, (1, 1, 1, 1), 1, (0.0, 0.0), True, True),  # threaded, tiles in blocks
    (1, 14, 14, 64, 64, (1, 1, 1, 1), 1, (0.0, 0.0), True, False),  # threaded, blocks evened out (8 + 8, 5 x 9 + 4)
    (1, 14, 14, 160, 300, (1, 1, 1, 1), 1, (0.0, 0.0), True, False),  # 1.7 MB of transformed weights: staged
    (1, 11, 11, 24, 48, (1, 1, 1, 1), 5, (0.0, 0.0), True, False),  # SiLU (YOLO-style)
    (1, 10, 10, 32, 20, (1, 1, 1, 1), 3, (0.0, 0.0), True, True),  # sigmoid after a residual
]


def reference(x, w, b, res, pads, act, clip):
    """The convolution in float64: NHWC x, OIHW w."""
    t, l, bo, r = pads
    xp = np.pad(x.astype(np.float64), ((0, 0), (t, bo), (l, r), (0, 0)))
    oh, ow = xp.shape[1] - 2, xp.shape[2] - 2
    y = np.zeros((x.shape[0], oh, ow, w.shape[0]))
    for i in range(3):
        for j in range(3):
            y += np.einsum("nhwc,kc->nhwk", xp[:, i:i + oh, j:j + ow], w[:, :, i, j].astype(np.float64))
    if b is not None:
        y += b
    if res is not None:
        y += res
    if act == 1:
        y = np.maximum(y, 0)
    elif act == 2:
        y = np.clip(y, *clip)
    elif act == 3:
        y = 1 / (1 + np.exp(-y))
    elif act == 5:
        y = y / (1 + np.exp(-y))
    return y


def case_functions(bb, prefix: str, algos, rng) -> list[tuple]:
    """One function ``case{i}_{algo}`` in ``bb`` per case and algorithm, calling the glue whose functions start with
    ``prefix``; each case's data (x, w, b, res), random from ``rng``."""
    from tvm import relax

    def bits(v: float) -> int:
        return int(np.array(v, np.float32).view(np.int32))

    data = []
    for i, (n, h, wd, c, k, pads, act, clip, has_b, has_r) in enumerate(CASES):
        oh, ow = h + pads[0] + pads[2] - 2, wd + pads[1] + pads[3] - 2
        w = (rng.standard_normal((k, c, 3, 3)) * 0.2).astype(np.float32)
        b = rng.standard_normal(k).astype(np.float32) if has_b else None
        x = rng.standard_normal((n, h, wd, c)).astype(np.float32)
        res = rng.standard_normal((n, oh, ow, k)).astype(np.float32) if has_r else None
        data.append((x, w, b, res))
        for algo in algos:
            xv = relax.Var("x", relax.TensorType(list(x.shape), "float32"))
            params = [xv] + ([relax.Var("r", relax.TensorType(list(res.shape), "float32"))] if has_r else [])
            attrs = relax.ShapeExpr([1, 1, *pads, 1, 1, 1, act, bits(clip[0]), bits(clip[1]), 1, algo])
            name = f"{prefix}_conv2d_sum" if has_r else f"{prefix}_conv2d" if has_b else f"{prefix}_conv2d_nobias"
            args = [xv, relax.const(w)] + ([relax.const(b)] if has_b else []) + params[1:] + [attrs]
            with bb.function(f"case{i}_{algo}", params):
                with bb.dataflow():
                    out = bb.emit_output(bb.emit(relax.call_dps_packed(name, args, relax.TensorType([n, oh, ow, k], "float32"))))
                bb.emit_func_output(out)
    return data


def worker() -> None:
    """Builds one module with every case as the direct, the F(4x4, 3x3) and the F(2x2, 3x3) call, runs them, prints the errors."""
    import tempfile
    from pathlib import Path

    import tvm
    from optc.targets.providers import onednn
    from optc.targets.providers.chains import ALGO_DIRECT, ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43
    from tvm import relax

    bb = relax.BlockBuilder()
    data = case_functions(bb, "optc_dnnl", (ALGO_DIRECT, ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23), np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.so"
        tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})).export_library(
            str(path), addons=[str(onednn.glue_object())], options=onednn.link_options())
        lib = tvm.runtime.load_module(str(path))
        vm = relax.VirtualMachine(lib, tvm.cpu())
        results = []
        for i, (x, w, b, res) in enumerate(data):
            *_, pads, act, clip, _, _ = CASES[i]
            want = reference(x, w, b, res, pads, act, clip)
            inputs = [tvm.runtime.tensor(x)] + ([tvm.runtime.tensor(res)] if res is not None else [])
            errors = []
            for algo in (ALGO_DIRECT, ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23):
                for _ in range(2):  # the second call runs the kernel the first one made
                    got = vm[f"case{i}_{algo}"](*inputs).numpy()
                errors.append(float(np.abs(got - want).max() / np.abs(want).max()))
            kernels = [str(lib.get_function("optc_wino_impl", query_imports=True)(list(w.shape), [1, 1, *pads, 1, 1, 1, act, 0, 0, 1, algo]))
                       for algo in (ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23)]
            results.append({"direct": errors[0], "f43": errors[1], "f23": errors[2], "kernels": kernels})
    print(json.dumps(results))


def run_cases(isa: str | None, threads: int) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env.update({"OMP_NUM_THREADS": str(threads), "TVM_NUM_THREADS": str(threads)})
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@pytest.mark.parametrize(("isa", "needs", "isa_name", "threads"), [
    (None, {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "avx512", 2),
    ("AVX2", {"avx2", "fma"}, "avx2", 1),
    ("SSE41", set(), None, 2),  # the request computes oneDNN's direct convolution
])
def test_optc_winograd_matches_the_convolution_at_each_instruction_set(isa, needs, isa_name, threads):
    """Against the float64 convolution, on every case (padding, channel tails, epilogues, tiles in blocks and staged),
    to 2e-5 of the output's range for F(4x4, 3x3) and 5e-6 for F(2x2, 3x3): their transforms round more than the direct
    kernel (1e-6) but far less than the race's WINOGRAD_RTOL (1e-4)."""
    onednn_or_skip()
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    for case, got in zip(CASES, run_cases(isa, threads)):
        want = [f"optc_wino_4x3:{isa_name}", f"optc_wino_2x3:{isa_name}"] if isa_name else ["no AVX2 or AVX-512 here"] * 2
        assert all(k.startswith(w) for k, w in zip(got["kernels"], want)), got
        assert got["direct"] < 2e-6, (case, got)
        assert got["f43"] < 2e-5 and got["f23"] < 5e-6, (case, got)
        if not isa_name:
            assert got["f43"] == got["direct"] == got["f23"], (case, got)  # the same kernel ran


def test_optc_winograd_is_offered_for_nhwc_3x3_stride_1_chains_with_epilogues_it_applies():
    from optc.targets.providers.chains import ACT_CLIP, ACT_GELU_ERF, ACT_RELU, ACT_SWISH, Chain

    def chain(act=ACT_RELU, nhwc=1, strides=(1, 1), kernel=3):
        w = np.zeros((16, 16, kernel, kernel), np.float32)
        return Chain("conv2d", None, None, (1, 8, 8, 16), weight=w, act=act, in_shapes=((1, 8, 8, 16),),
                     conv={"strides": strides, "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1, "nhwc": nhwc})

    assert chain().optc_winograd_candidate() and chain(act=ACT_CLIP).optc_winograd_candidate() and chain(act=ACT_SWISH).optc_winograd_candidate()
    assert not chain(act=ACT_GELU_ERF).optc_winograd_candidate()  # an epilogue it does not apply: oneDNN's kernels keep it
    assert not chain(nhwc=0).optc_winograd_candidate()
    assert not chain(strides=(2, 2)).optc_winograd_candidate()
    assert not chain(kernel=1).optc_winograd_candidate()


if __name__ == "__main__":
    worker()
