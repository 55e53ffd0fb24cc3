"""optc's Winograd kernels without a vendor library (targets/providers/winograd_glue.cc): ARM artifacts' 3x3
convolutions, chosen by a cost model of the board, and x86 ones built without oneDNN, chosen by the race.

The glue is built here for x86-64 and checked against the float64 convolution on every case of
test_winograd_kernels.py at each width it has (16 floats: AVX-512, 8: AVX2, 4: SSE2, NEON's width), each in a fresh
process that picks it once; the aarch64 build is checked end to end under qemu in test_targets_arm.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import broken_winograd_glue, make_model, ort_run, rand
from onnx import helper
from test_winograd_kernels import CASES, case_functions, cpu_flags, reference

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def worker() -> None:
    """Every case as an F(4x4, 3x3) and an F(2x2, 3x3) call of the glue, each run twice (the second reads the
    transformed weights the first cached, and must agree bit for bit); prints each case's errors."""
    import tvm
    from optc.targets.providers import winograd_glue
    from optc.targets.providers.chains import ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43
    from tvm import relax

    bb = relax.BlockBuilder()
    data = case_functions(bb, winograd_glue.PREFIX, (ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23), np.random.default_rng(1))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.so"
        tvm.compile(bb.get(), target=tvm.target.Target({"kind": "llvm"})).export_library(str(path), addons=[str(winograd_glue.glue_object())])
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
        for i, (x, w, b, res) in enumerate(data):
            *_, pads, act, clip, _, _ = CASES[i]
            want = reference(x, w, b, res, pads, act, clip)
            inputs = [tvm.runtime.tensor(x)] + ([tvm.runtime.tensor(res)] if res is not None else [])
            errors = {}
            for algo in (ALGO_WINOGRAD_F43, ALGO_WINOGRAD_F23):
                first = vm[f"case{i}_{algo}"](*inputs).numpy()
                got = vm[f"case{i}_{algo}"](*inputs).numpy()
                errors[algo] = float(np.abs(got - want).max() / np.abs(want).max()) if np.array_equal(got, first) else float("nan")
            results.append(errors)
    print(json.dumps([[r[2], r[3]] for r in results]))


@pytest.mark.parametrize(("isa", "needs", "threads"), [
    (None, {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, 2),
    ("AVX2", {"avx2", "fma"}, 1),
    ("SSE41", set(), 2),  # 4 floats a vector, NEON's width
])
def test_winograd_glue_matches_the_convolution_at_each_width(isa, needs, threads):
    """To 2e-5 of the output's range for F(4x4, 3x3) and 5e-6 for F(2x2, 3x3), as the oneDNN glue's builds, on TVM's
    thread pool; the glue picks its width by the CPU, capped like oneDNN by ONEDNN_MAX_CPU_ISA."""
    if not needs <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(needs - cpu_flags())}")
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    env["TVM_NUM_THREADS"] = str(threads)
    if isa:
        env["ONEDNN_MAX_CPU_ISA"] = isa
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    for case, (f43, f23) in zip(CASES, json.loads(done.stdout.strip().splitlines()[-1])):
        assert f43 < 2e-5 and f23 < 5e-6, (case, f43, f23)  # nan: a second call differed from the first


def conv_chain(c, k, hw, batch=1, act=1, strides=(1, 1), kernel=3):
    from optc.targets.providers.chains import Chain

    w = np.zeros((k, c, kernel, kernel), np.float32)
    out = (batch, hw // strides[0], hw // strides[1], k)
    return Chain("conv2d", None, None, out, weight=w, act=act, in_shapes=((batch, hw, hw, c),),
                 conv={"strides": strides, "padding": (1, 1, 1, 1), "dilation": (1, 1), "groups": 1, "nhwc": 1})


def test_the_board_cost_model_picks_the_tile_by_work_and_weight_traffic():
    """ResNet-18's 3x3 stride-1 layers at batch 1: F(4x4, 3x3) up to 128 channels (2.4 MB of transformed weights),
    F(2x2, 3x3) at 256 channels (F(4x4)'s 9.4 MB are over the cap), TVM's direct kernel at 512 (both over it); nothing
    where the transforms and the call outweigh what a layer saves (8 channels: the race on this machine measured
    F(4x4) 0.83x of TVM's kernel), for strides, 1x1 or GELU."""
    from optc.targets.providers import winograd_glue as g
    from optc.targets.providers.chains import ACT_GELU_ERF, ALGO_WINOGRAD_F23, ALGO_WINOGRAD_F43

    assert g.choose(conv_chain(64, 64, 56)) == ALGO_WINOGRAD_F43
    assert g.choose(conv_chain(128, 128, 28)) == ALGO_WINOGRAD_F43
    assert g.transformed_bytes(conv_chain(256, 256, 14), ALGO_WINOGRAD_F43) > g.MAX_TRANSFORMED_BYTES
    assert g.choose(conv_chain(256, 256, 14)) == ALGO_WINOGRAD_F23
    assert g.choose(conv_chain(512, 512, 7)) is None
    assert g.cost(conv_chain(64, 64, 56), ALGO_WINOGRAD_F43) * 2.5 < g.cost(conv_chain(64, 64, 56), None)
    assert g.choose(conv_chain(8, 8, 56)) is None and g.choose(conv_chain(4, 4, 6)) is None
    assert g.choose(conv_chain(64, 64, 56, strides=(2, 2))) is None
    assert g.choose(conv_chain(64, 64, 56, kernel=1)) is None
    assert g.choose(conv_chain(64, 64, 56, act=ACT_GELU_ERF)) is None


def test_transformed_weights_over_the_cap_are_never_raced_on_x86():
    """ResNet-50's 512-channel layers held 36 MiB each with F(4x4, 3x3), 100 MiB in all, before the cap: both races
    (oneDNN's and, without oneDNN, TVM's) offer optc's kernels only where a layer's transformed weights fit 8 MiB."""
    from optc.cli.render import kernels_line
    from optc.targets.providers.chains import ALGO_WINOGRAD_F43
    from optc.targets.providers.select import WINOGRAD
    from optc.targets.providers.winograd_glue import over_cap

    assert over_cap(conv_chain(512, 512, 7), ALGO_WINOGRAD_F43, 32) == "36.0 MiB of transformed weights, over 8 MiB a layer"
    assert not WINOGRAD["winograd_f43"].offered(conv_chain(512, 512, 7)) and not WINOGRAD["winograd_f23"].offered(conv_chain(512, 512, 7))
    assert not WINOGRAD["winograd_f43"].offered(conv_chain(256, 256, 14)) and WINOGRAD["winograd_f23"].offered(conv_chain(256, 256, 14))
    assert WINOGRAD["winograd_f43"].offered(conv_chain(64, 64, 56)) and WINOGRAD["winograd"].offered(conv_chain(512, 512, 7))
    lost = {"mode": "auto", "onednn": {"available": False, "reason": "disabled by OPTC_DISABLE_ONEDNN"}, "chains": 3, "offloaded": [],
            "kept": [{"workload": "a", "tvm_ms": 0.1, "winograd_f43_ms": 0.2}, {"workload": "b"},
                     {"workload": "c", "tvm_ms": 0.3, "winograd_f43": "36.0 MiB of transformed weights, over 8 MiB a layer"}]}
    assert kernels_line(lost) == ("kernels: TVM for every op (1 convolution raced against optc's Winograd, which won none); "
                                  "oneDNN not used: disabled by OPTC_DISABLE_ONEDNN")



@pytest.mark.slow
def test_x86_without_onednn_races_the_build_a_narrower_target_runs(tmp_path, without_onednn):
    """``--cpu haswell`` on an AVX-512 machine: the race times the glue's AVX2 build, the one a Haswell would run."""
    from click.testing import CliRunner
    from optc.cli.main import cli

    if not {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= cpu_flags():
        pytest.skip("this CPU has no AVX-512 to hold back")
    onnx.save(conv64_model(), tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--target", "x86", "--cpu", "haswell",
                                   "--tune-trials", "0", "--tuning-db", str(tmp_path / "db"), "--no-latency", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (raced,) = [e for e in json.loads(res.stdout)["target"]["tuning"]["providers"]["offloaded"] + json.loads(res.stdout)["target"]["tuning"]["providers"]["kept"]
                if "tvm_ms" in e]
    assert raced["winograd_f43_kernel"] == raced["winograd_f23_kernel"] == "optc_winograd:avx2", raced
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") is None  # restored after the race


@pytest.mark.slow
def test_a_winograd_glue_that_does_not_build_leaves_tvm_kernels(tmp_path, monkeypatch, caplog, without_onednn):
    """Without oneDNN, a glue that fails to compile (a machine's compiler refusing it) costs the race, not the compile:
    TVM's kernels compute every op and a warning names the compiler's error."""
    from click.testing import CliRunner
    from optc.cli.main import cli
    with broken_winograd_glue(tmp_path, monkeypatch):
        onnx.save(conv64_model(), tmp_path / "m.onnx")
        res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--target", "x86", "--tune-trials", "0",
                                       "--tuning-db", str(tmp_path / "db"), "--no-latency"], catch_exceptions=False)
    said = " ".join((res.output + caplog.text).split())  # the warning reaches pytest's log capture, or the CLI's stderr
    assert res.exit_code == 0, res.output
    assert "optc's Winograd kernels not raced: building the Winograd kernels' glue failed:" in said and "undeclared_name" in said
    assert "kernels: TVM for every op; oneDNN not used: disabled by OPTC_DISABLE_ONEDNN" in said


@pytest.fixture
def without_onednn(monkeypatch):
    """OPTC_DISABLE_ONEDNN for one test: onednn.availability is cached per process, so cleared before and after."""
    from optc.targets.providers import onednn

    monkeypatch.setenv("OPTC_DISABLE_ONEDNN", "1")
    onednn.availability.cache_clear()
    yield
    monkeypatch.delenv("OPTC_DISABLE_ONEDNN")
    onednn.availability.cache_clear()


@pytest.mark.slow
def test_x86_without_onednn_races_optc_winograd_against_tvm(tmp_path, without_onednn):
    """Without oneDNN the default x86 compile times F(4x4, 3x3) and F(2x2, 3x3) against TVM's kernel for each 3x3
    stride-1 convolution and keeps the faster; 64 channels at 56x56 are F(4x4)'s on any CPU here (2.8x TVM's kernel in
    the calibration race), and the artifact is onnxruntime's to 1e-4 of its range."""
    from click.testing import CliRunner
    from optc.cli.main import cli

    model = conv64_model()
    onnx.save(model, tmp_path / "m.onnx")
    res = CliRunner().invoke(cli, ["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out"), "--target", "x86", "--tune-trials", "0",
                                   "--tuning-db", str(tmp_path / "db"), "--no-latency", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    providers = json.loads(res.stdout)["target"]["tuning"]["providers"]
    assert providers["onednn"]["reason"] == "disabled by OPTC_DISABLE_ONEDNN" and providers["glue"] == "winograd"
    assert providers["measured"] == 1 and providers["chains"] == 2
    check_conv64_race(providers, model, tmp_path / "out")


def conv64_model():
    """A 3x3 64 -> 64 convolution at 56x56 (F(4x4, 3x3) 2.8x TVM's kernel in the calibration race), then a stride-2
    one no Winograd kernel takes."""
    rng = np.random.default_rng(0)
    weights = [("w1", (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)), ("b1", rng.standard_normal(64).astype(np.float32)),
               ("w2", (rng.standard_normal((8, 64, 3, 3)) / 24).astype(np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1, 1, 1, 1], strides=[2, 2])]
    return make_model(nodes, [("x", [1, 64, 56, 56])], [("y", [1, 8, 28, 28])], weights)


def check_conv64_race(providers, model, out):
    """The race's record of conv64_model: one of optc's Winograd kernels won it (F(4x4, 3x3) on a quiet machine; which
    one moves with the load), the stride-2 convolution was not raced, and the artifact at ``out`` is onnxruntime's to
    1e-4 of its range."""
    import tvm
    from tvm import relax

    (sent,) = providers["offloaded"]
    won = {"winograd F(4x4,3x3)": "winograd_f43", "winograd F(2x2,3x3)": "winograd_f23"}[sent["algorithm"]]  # either, by load
    assert sent[f"{won}_ms"] * 1.1 < sent["tvm_ms"] and sent[f"{won}_ms"] <= min(sent["winograd_f43_ms"], sent["winograd_f23_ms"]), sent
    assert sent["winograd_f43_error"] < 1e-4 and sent["winograd_f23_error"] < 1e-4
    assert sent["winograd_f43_kernel"] in {f"optc_winograd:{b}" for b in ("avx512", "avx2", "sse2")}
    (kept,) = providers["kept"]
    assert "s2_2" in kept["workload"] and "tvm_ms" not in kept  # not a candidate: nothing raced
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(out / "model.so")), tvm.cpu())
    x = rand(1, 64, 56, 56, seed=2)
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    want = ort_run(model, {"x": x})["y"]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


if __name__ == "__main__":
    worker()
