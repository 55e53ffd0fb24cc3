"""ARM (aarch64) artifacts: cross-compiled here, run under qemu-user, compared with onnxruntime on x86.

The emulated run uses the runner root built by ``tools/make_arm_root.py``
(TVM's aarch64 runtime from the pinned wheels plus a small C++ Relax VM
runner, cached in ``~/.cache/optc/arm64-root``). ``make setup-test`` installs
the cross compiler and qemu (Debian, where apt-get runs as root) and builds
the root; without them these tests skip and say which is missing.

Tolerance: 1e-4 absolute and relative on float32 logits. The aarch64 code
fuses multiply-adds differently from onnxruntime's x86 kernels, so results are
not bit-equal; the sample CNN differs by about 1e-6 and its argmax never.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import SAMPLE, arm_runner, broken_winograd_glue, make_model, ort_run, rand
from onnx import helper

from optc.cli.main import cli
from optc.cli.render import kernels_line

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

ATOL = RTOL = 1e-4
EM_AARCH64 = 183  # ELF e_machine


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.fixture(scope="module")
def arm_root():
    return arm_runner()


def compile_arm(model_path, out, db, *shape_args):
    res = invoke("compile", model_path, "-o", out, *shape_args, "--target", "arm", "--tune-trials", "0", "--tuning-db", db, "--no-latency", "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.slow
def test_arm_sample_cnn_under_qemu_matches_onnxruntime(arm_root, tmp_path):
    out = tmp_path / "arm"
    report = compile_arm(SAMPLE / "mnist_cnn.onnx", out, tmp_path / "db", "--input-shape", "input=8x1x28x28")
    assert report["target"]["name"] == "arm" and report["target"]["target"]["mtriple"] == "aarch64-linux-gnu"
    library = (out / "model.so").read_bytes()
    assert library[:4] == b"\x7fELF" and int.from_bytes(library[18:20], "little") == EM_AARCH64

    data = np.load(SAMPLE / "test.npz")
    x, labels = data["input"][:8], data["label"][:8]
    run = arm_root.run_artifact(out, {"input": x}, repeats=2)
    expected = ort_run(onnx.load(str(SAMPLE / "mnist_cnn.onnx")), {"input": x})["logits"]
    got = run.outputs["logits"]
    assert got.shape == (8, 10) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)
    assert (got.argmax(1) == expected.argmax(1)).all() and (got.argmax(1) == labels).sum() >= 7
    assert len(run.run_ms) == 2 and all(ms > 0 for ms in run.run_ms)


@pytest.mark.slow
def test_arm_convolutions_padded_to_whole_neon_vectors_under_qemu_match_onnxruntime(arm_root, tmp_path):
    """NEON's 4 lanes: 10 output channels were tiles of 2 (five half-vector instructions per pixel and input) and are now
    computed as 12, 6 as 8, the zero filters' outputs sliced away (tile_padding.padded_channels). The emulated aarch64
    code's outputs are onnxruntime's."""
    rng = np.random.default_rng(0)
    weights = [(n, (rng.standard_normal(s) * 0.2).astype(np.float32))
               for n, s in (("w1", (10, 8, 3, 3)), ("b1", (10,)), ("w2", (6, 10, 3, 3)), ("b2", (6,)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], pads=[1, 1, 1, 1])]
    model = make_model(nodes, [("x", [1, 8, 9, 12])], [("y", [1, 6, 9, 12])], weights)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    compile_arm(path, tmp_path / "arm", tmp_path / "db", "--kernels", "tvm")  # TVM's kernels (the default sends them to Winograd)
    x = rand(1, 8, 9, 12, seed=3)
    got = arm_root.run_artifact(tmp_path / "arm", {"x": x}).outputs["y"]
    np.testing.assert_allclose(got, ort_run(model, {"x": x})["y"], atol=ATOL, rtol=RTOL)


def winograd_model(rng):
    """3x3 convolutions of every kind optc's Winograd kernels take (channel tails, no bias, a residual, no padding, ReLU,
    a clip, sigmoid, SiLU; 256 channels, where F(4x4)'s 9.4 MB of transformed weights are over the cap), and stride-2
    and 1x1 ones they do not, batch 2."""
    def w(*shape):
        return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)

    weights = [("w1", w(44, 13, 3, 3)), ("b1", w(44, 1)[:, 0]), ("w2", w(44, 44, 3, 3)), ("w3", w(24, 44, 3, 3)), ("b3", w(24, 1)[:, 0]),
               ("w4", w(24, 24, 3, 3)), ("b4", w(24, 1)[:, 0]), ("w5", w(24, 24, 3, 3)), ("b5", w(24, 1)[:, 0]), ("w6", w(256, 24, 1, 1)),
               ("w7", w(256, 256, 3, 3)), ("b7", w(256, 1)[:, 0]), ("lo", np.array(0, np.float32)), ("hi", np.array(6, np.float32))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]), helper.make_node("Add", ["c2", "r1"], ["s2"]),
             helper.make_node("Clip", ["s2", "lo", "hi"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"]), helper.make_node("Sigmoid", ["c3"], ["r3"]),
             helper.make_node("Conv", ["r3", "w4", "b4"], ["c4"], pads=[1, 1, 1, 1]), helper.make_node("Sigmoid", ["c4"], ["g4"]),
             helper.make_node("Mul", ["c4", "g4"], ["r4"]),
             helper.make_node("Conv", ["r4", "w5", "b5"], ["r5"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["r5", "w5", "b5"], ["r6"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Conv", ["r6", "w6"], ["c6"]), helper.make_node("Conv", ["c6", "w7", "b7"], ["c7"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c7"], ["y"])]
    return make_model(nodes, [("x", [2, 13, 32, 32])], [("y", [2, 256, 8, 8])], weights)


@pytest.mark.slow
def test_arm_3x3_convolutions_by_optc_winograd_under_qemu_match_onnxruntime(arm_root, tmp_path):
    """The default ARM compile sends the 3x3 stride-1 convolutions its cost model of the board expects to pay to optc's
    Winograd kernels (winograd_glue.cc, cross-compiled and linked into model.so): F(4x4, 3x3) where the transformed
    weights fit the cap, F(2x2, 3x3) for the 256-channel layer; the stride-2 and 1x1 convolutions stay with TVM's
    kernels. The emulated aarch64 code's output is onnxruntime's to 1e-4 of its range, as TVM's kernels' is."""
    model = winograd_model(np.random.default_rng(0))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    report = compile_arm(path, tmp_path / "arm", tmp_path / "db")
    providers = report["target"]["tuning"]["providers"]
    algorithms = sorted(e["algorithm"] for e in providers["offloaded"])
    assert algorithms == ["winograd F(2x2,3x3)"] + ["winograd F(4x4,3x3)"] * 4, providers["offloaded"]
    assert sorted(e["workload"].split("/")[2] for e in providers["kept"]) == ["w24x24x3x3", "w24x24x3x3", "w256x24x1x1"]
    assert all(e["model_winograd"] * 1.4 <= e["model_direct"] for e in providers["offloaded"])
    assert providers["glue"] == "winograd" and providers["libraries"] == [] and providers["winograd_optc_bytes"] > 4 << 20
    assert kernels_line(providers).startswith("kernels: TVM for every op but 5 of 8 convolutions, 4 by optc's Winograd F(4x4,3x3), "
                                              "1 by optc's F(2x2,3x3) holding ")
    assert kernels_line(providers).endswith("(chosen by a cost model of the board: no board timed them; --rpc-tracker races them on one)")
    assert kernels_line(compile_arm(path, tmp_path / "tvm", tmp_path / "db", "--kernels", "tvm")["target"]["tuning"]["providers"]) == \
        "kernels: TVM for every op (--kernels tvm)"
    x = rand(2, 13, 32, 32, seed=4)
    want = ort_run(model, {"x": x})["y"]
    for folder in ("arm", "tvm"):
        got = arm_root.run_artifact(tmp_path / folder, {"x": x}, repeats=2).outputs["y"]
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (folder, np.abs(got - want).max())


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross compiler (Debian: g++-aarch64-linux-gnu)")
def test_arm_kernels_line_says_the_board_model_took_no_convolution(tmp_path):
    """8 channels at 20x20: the model has F(4x4, 3x3) no faster than TVM's kernel (the race here measured 0.83x at 56x56)."""
    rng = np.random.default_rng(0)
    model = make_model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], [("x", [1, 8, 20, 20])], [("y", [1, 8, 20, 20])],
                       [("w", rng.standard_normal((8, 8, 3, 3)).astype(np.float32))])
    onnx.save(model, tmp_path / "m.onnx")
    providers = compile_arm(tmp_path / "m.onnx", tmp_path / "arm", tmp_path / "db")["target"]["tuning"]["providers"]
    assert providers["offloaded"] == [] and providers["glue"] == ""
    assert kernels_line(providers) == ("kernels: TVM for every op; optc's Winograd kernels are expected to speed up none of its 1 float "
                                       "convolution (chosen by a cost model of the board: no board timed them; --rpc-tracker races them on one)")


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="no aarch64 cross compiler (Debian: g++-aarch64-linux-gnu)")
def test_arm_winograd_glue_that_does_not_build_leaves_tvm_kernels(tmp_path, monkeypatch, caplog):
    """A glue the cross compiler refuses costs optc's Winograd kernels, not the compile: built before the choice (not
    first at export), it fails with a warning naming the compiler's error, and TVM's kernels compute every op."""
    with broken_winograd_glue(tmp_path, monkeypatch):
        onnx.save(winograd_model(np.random.default_rng(0)), tmp_path / "m.onnx")
        providers = compile_arm(tmp_path / "m.onnx", tmp_path / "arm", tmp_path / "db")["target"]["tuning"]["providers"]
    assert providers["offloaded"] == [] and providers["glue"] == ""
    assert "optc's Winograd kernels not used: building the Winograd kernels' glue failed:" in caplog.text and "undeclared_name" in caplog.text
    assert (tmp_path / "arm" / "model.so").is_file()


@pytest.mark.slow
def test_arm_two_outputs_under_qemu(arm_root, tmp_path):
    """A model with two outputs comes back as a tuple from the VM; both must match."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [("x", [4, 64])],
        [("h", [4, 32]), ("y", [4, 32])],
        [("W", rand(64, 32))],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save_model(proto, str(path))
    report = compile_arm(path, tmp_path / "arm", tmp_path / "db")
    x = rand(4, 64, seed=5)
    run = arm_root.run_artifact(tmp_path / "arm", {"x": x})
    assert kernels_line(report["target"]["tuning"]["providers"]) == "kernels: TVM for every op (no float convolution for optc's Winograd kernels)"
    expected = ort_run(proto, {"x": x})
    for name in ("h", "y"):
        np.testing.assert_allclose(run.outputs[name], expected[name], atol=ATOL, rtol=RTOL)
    assert (run.outputs["y"] >= 0).all() and (run.outputs["h"] < 0).any()


@pytest.mark.slow
def test_tampered_arm_library_is_not_run(arm_root, tmp_path):
    from optc.errors import ConfigError

    out = tmp_path / "arm"
    compile_arm(SAMPLE / "mnist_cnn.onnx", out, tmp_path / "db", "--input-shape", "input=1x1x28x28")
    res = invoke("run", out)
    assert res.exit_code == 2 and "this artifact is for aarch64" in res.output
    lib = out / "model.so"
    data = bytearray(lib.read_bytes())
    data[-1] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match="does not match its SHA-256"):
        arm_root.run_artifact(out, {"input": np.zeros((1, 1, 28, 28), np.float32)})


@pytest.mark.slow
def test_arm_cpu_lacking_a_recorded_feature_is_refused(arm_root, tmp_path):
    """The runner reads the emulated CPU's HWCAP bits (qemu shows the host's /proc/cpuinfo): a Cortex-A53 has NEON but no dot products."""
    out = tmp_path / "arm"
    compile_arm(SAMPLE / "mnist_cnn.onnx", out, tmp_path / "db", "--input-shape", "input=1x1x28x28")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runtime"]["cpu"] == {"arch": "aarch64", "mcpu": "", "mattr": ["+neon"], "features": ["asimd", "fp"]}
    x = np.zeros((1, 1, 28, 28), np.float32)
    assert arm_root.run_artifact(out, {"input": x}, cpu="cortex-a53").outputs["logits"].shape == (1, 10)
    manifest["runtime"]["cpu"]["features"].append("asimddp")  # what a +dotprod compile records (tests/test_deploy.py)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(arm_root.ArmRootError, match=r"exit 2\): optc-runner: error: this CPU lacks asimddp, which the artifact's code uses"):
        arm_root.run_artifact(out, {"input": x}, cpu="cortex-a53")
    assert arm_root.run_artifact(out, {"input": x}, cpu="max").outputs["logits"].shape == (1, 10)


def test_arm_without_cross_compiler_fails_before_compiling(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty PATH: no aarch64-linux-gnu-g++
    out = tmp_path / "arm"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "arm", "--no-latency", "--tuning-db", tmp_path / "db")
    assert res.exit_code == 2 and not out.exists()
    assert "needs the cross compiler 'aarch64-linux-gnu-g++'" in res.output and len(res.output.strip().splitlines()) == 1


def test_arm_tuning_without_a_board_is_refused(tmp_path):
    """Candidates for aarch64 cannot be timed on this x86 machine: tuning needs an RPC board."""
    import platform

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is an ARM board")
    out = tmp_path / "arm"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "arm",
                 "--tune-trials", "4", "--no-latency", "--tuning-db", tmp_path / "db")
    assert res.exit_code == 2 and not out.exists() and len(res.output.strip().splitlines()) == 1
    assert "tuning for aarch64-linux-gnu measures candidates on such a board: add --rpc-tracker" in res.output


@pytest.mark.parametrize("target", ["arm", "x86"])
def test_unknown_cpu_is_one_line_exit_2(tmp_path, target):
    """LLVM only warns about a CPU it does not know and compiles for a generic one: optc refuses it first."""
    out = tmp_path / "out"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", target,
                 "--cpu", "cortex-a99", "--no-latency", "--tuning-db", tmp_path / "db")
    assert res.exit_code == 2 and not out.exists() and len(res.output.strip().splitlines()) == 1
    assert f"--cpu cortex-a99: not a CPU LLVM knows for --target {target}" in res.output
