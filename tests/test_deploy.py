"""Deploying an artifact: the runners that need only TVM's runtime, and the CPU features in the manifest.

The Python runner (``targets/deploy/run_artifact.py``) is copied alone into a temporary folder and
run by a Python that cannot import optc (``-S``: no site-packages; ``PYTHONPATH``: a folder holding
only numpy, ml_dtypes, tvm, tvm_ffi and typing_extensions). The C++ runner (``runner.cc``) is built
with this machine's g++ against the installed wheels (skipped without g++). Both are compared with
onnxruntime on the same input; the aarch64 build of ``runner.cc`` runs under qemu in
tests/test_targets_arm.py.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import ROOT, SAMPLE, make_model, ort_run
from onnx import helper

from optc.cli.main import cli
from optc.errors import TargetError

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

DEPLOY = ROOT / "targets" / "deploy"
# What `import tvm` + relax.VirtualMachine pull in besides the standard library (tvm_ffi imports torch only when present).
RUNTIME_PACKAGES = ("numpy", "ml_dtypes", "tvm", "tvm_ffi", "typing_extensions")


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "sample"
    res = invoke("compile", SAMPLE / "mnist_cnn.onnx", "-o", out, "--input-shape", "input=1x1x28x28", "--target", "x86",
                 "--no-latency", "--tuning-db", tmp_path_factory.mktemp("db"))
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """(input.npy, onnxruntime's logits for it)."""
    x = np.load(SAMPLE / "test.npz")["input"][3:4]
    path = tmp_path_factory.mktemp("in") / "x.npy"
    np.save(path, x)
    return path, ort_run(onnx.load(str(SAMPLE / "mnist_cnn.onnx")), {"input": x})["logits"]


@pytest.fixture(scope="module")
def python_runner(tmp_path_factory):
    """A command running a copy of run_artifact.py where optc cannot be imported."""
    site = tmp_path_factory.mktemp("runtime-site")
    for name in RUNTIME_PACKAGES:
        spec = importlib.util.find_spec(name)
        location = spec.submodule_search_locations[0] if spec.submodule_search_locations else spec.origin
        (site / Path(location).name).symlink_to(location)
        libs = Path(location).parent / f"{name}.libs"  # vendored shared libraries of manylinux wheels
        if libs.is_dir():
            (site / libs.name).symlink_to(libs)
    alone = tmp_path_factory.mktemp("deployed")
    shutil.copy(DEPLOY / "run_artifact.py", alone)
    from optc.targets.providers import onednn

    found = onednn.library()
    if found and found[1]:  # the onednn-cpu-gomp wheel's library, which no site-less Python finds: beside the runner
        (alone / "lib").mkdir()
        (alone / "lib" / found[1].name).symlink_to(found[1])
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HOME": str(alone)}
    cannot = subprocess.run([sys.executable, "-S", "-c", "import optc"], env=env, capture_output=True, text=True, check=False)
    assert cannot.returncode == 1 and "No module named 'optc'" in cannot.stderr
    return lambda *args: subprocess.run([sys.executable, "-S", str(alone / "run_artifact.py"), *map(str, args)], env=env,
                                        capture_output=True, text=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def cpp_runner():
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build targets/deploy/runner.cc (Debian: apt-get install g++)")
    from optc.targets.deploy.build_runner import build

    binary = build()
    return lambda *args: subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, check=False, timeout=300)


def refusal(done: subprocess.CompletedProcess) -> str:
    """The one stderr line of a run refused with exit code 2."""
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def test_python_runner_without_optc_matches_onnxruntime(artifact, sample, python_runner, tmp_path):
    x, expected = sample
    done = python_runner(artifact, "--input", f"input={x}", "--output", tmp_path / "y.npz", "--repeats", 5)
    assert done.returncode == 0, done.stderr
    np.testing.assert_allclose(np.load(tmp_path / "y.npz")["logits"], expected, atol=1e-5, rtol=1e-5)
    assert re.search(r"^median \d+\.\d+ ms over 5 runs", done.stdout, re.MULTILINE), done.stdout
    assert python_runner(artifact, "--input", f"input={x}", "--output", tmp_path / "y.npy").returncode == 0
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.load(tmp_path / "y.npz")["logits"])


def test_cpp_runner_matches_onnxruntime_and_the_python_runner(artifact, sample, cpp_runner, python_runner, tmp_path):
    x, expected = sample
    done = cpp_runner(artifact, "--input", f"input={x}", "--output-dir", tmp_path, "--repeats", 3)
    assert done.returncode == 0, done.stderr
    assert len(re.findall(r"^run_ms \d", done.stdout, re.MULTILINE)) == 3 and re.search(r"^median_ms \d", done.stdout, re.MULTILINE)
    assert "output_0.npy logits float32 [1, 10]" in done.stdout
    got = np.load(tmp_path / "output_0.npy")
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert python_runner(artifact, "--input", f"input={x}", "--output", tmp_path / "py.npy").returncode == 0
    np.testing.assert_array_equal(got, np.load(tmp_path / "py.npy"))  # the same library on the same input


def test_tampered_library_is_refused_by_both_runners(artifact, sample, python_runner, cpp_runner, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "model.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.so").write_bytes(bytes(data))
    for run in (python_runner, cpp_runner):
        line = refusal(run(copy, "--input", f"input={sample[0]}"))
        assert line.endswith(f"{copy}: 'model.so' does not match its SHA-256 in the manifest; refusing to load it")


@pytest.mark.parametrize("case", ["shape", "dtype", "missing", "unknown", "not npy", "no file", "twice"])
def test_bad_input_is_one_line_and_exit_2(artifact, sample, python_runner, cpp_runner, tmp_path, case):
    np.save(tmp_path / "shape.npy", np.zeros((2, 1, 28, 28), np.float32))
    np.save(tmp_path / "dtype.npy", np.zeros((1, 1, 28, 28), np.float64))
    (tmp_path / "text.npy").write_text("not an array")
    args, expected = {
        "shape": ([f"input={tmp_path / 'shape.npy'}"], "input 'input': got float32 [2, 1, 28, 28], the artifact takes float32 [1, 1, 28, 28]"),
        "dtype": ([f"input={tmp_path / 'dtype.npy'}"], "input 'input': got float64 [1, 1, 28, 28], the artifact takes float32 [1, 1, 28, 28]"),
        "missing": ([], "missing input 'input'; the artifact takes input"),
        "unknown": ([f"input={sample[0]}", f"other={sample[0]}"], "unknown input 'other'; the artifact takes input"),
        "not npy": ([f"input={tmp_path / 'text.npy'}"], "text.npy"),
        "no file": ([f"input={tmp_path / 'absent.npy'}"], "absent.npy"),
        "twice": ([f"input={sample[0]}", f"input={sample[0]}"], "--input input is given twice"),
    }[case]
    inputs = [a for item in args for a in ("--input", item)]
    for run in (python_runner, cpp_runner):
        assert expected in refusal(run(artifact, *inputs))


def test_manifest_records_the_cpu_features_of_the_target(artifact):
    from optc.targets.deploy.run_artifact import host_cpu_features

    manifest = json.loads((artifact / "manifest.json").read_text())
    cpu = manifest["runtime"]["cpu"]
    assert cpu["arch"] == "x86_64" and cpu["mcpu"] == manifest["target"]["target"]["mcpu"]
    assert {"sse2", "ssse3", "sse4_2"} <= set(cpu["features"]) <= host_cpu_features("x86_64")  # compiled for this CPU


def test_the_host_target_drops_features_a_virtual_cpu_hides_and_adds_ones_the_name_lacks():
    """LLVM names this CPU by its model; a VM may hide some of its features (AMX, often), and a CPU newer than
    LLVM gets an older name. The host target follows /proc/cpuinfo, as clang's -march=native does."""
    from optc.targets.cpu_features import X86_FLAGS, host_x86_mattr, required_cpu
    from optc.targets.spec import TargetSpec

    sapphire = frozenset(flag for flags in X86_FLAGS.values() for flag in flags) - {"amx_tile", "amx_int8", "amx_bf16", "fma4",
                                                                                     "avx512_vp2intersect"}
    mattr = host_x86_mattr("sapphirerapids", sapphire)
    assert mattr == ["-amx-tile", "-amx-int8", "-amx-bf16"]
    spec = TargetSpec("x86", {"kind": "llvm", "mcpu": "sapphirerapids", "mattr": mattr, "num-cores": 1})
    features = set(required_cpu(spec)["features"])
    assert not features & {"amx_tile", "amx_int8", "amx_bf16"} and {"avx512_vnni", "avx512_fp16", "avx512_bf16"} <= features

    assert host_x86_mattr("x86-64", frozenset({"sse", "sse2", "avx", "avx2", "fma"})) == ["+avx", "+avx2", "+fma"]
    assert host_x86_mattr("haswell", frozenset()) == []  # no /proc/cpuinfo: LLVM's name is all there is


def test_the_default_x86_target_uses_only_what_this_cpu_has():
    from optc.targets.cpu_features import required_cpu
    from optc.targets.deploy.run_artifact import host_cpu_features
    from optc.targets.spec import make_target

    assert set(required_cpu(make_target("x86", cores=1))["features"]) <= host_cpu_features("x86_64")


def test_arm_targets_record_their_mattr_features():
    from optc.targets.cpu_features import required_cpu
    from optc.targets.spec import make_target

    assert required_cpu(make_target("arm", cores=1))["features"] == ["asimd", "fp"]
    dotprod = required_cpu(make_target("arm", arm_dotprod=True, cores=1))
    assert dotprod["arch"] == "aarch64" and dotprod["mattr"] == ["+neon", "+v8.2a", "+dotprod"]
    assert {"asimd", "asimddp", "atomics", "asimdrdm", "crc32"} <= set(dotprod["features"])


def test_every_recorded_aarch64_feature_is_checked_by_both_runners():
    """A name the runners cannot read from HWCAP would refuse every board: the tables must agree."""
    from optc.targets.cpu_features import AARCH64_FLAGS
    from optc.targets.deploy.run_artifact import AARCH64_HWCAP

    assert {flag for flags in AARCH64_FLAGS.values() for flag in flags} <= set(AARCH64_HWCAP)
    source = (DEPLOY / "runner.cc").read_text()
    in_cpp = {name: (int(word), int(bit)) for name, word, bit in re.findall(r'\{"(\w+)", (\d), (\d+)\}', source)}
    assert in_cpp == AARCH64_HWCAP


def test_check_cpu_refuses_another_arch_and_missing_features():
    from optc.targets.deploy.run_artifact import Refused, check_cpu

    manifest = {"runtime": {"cpu": {"arch": "x86_64", "mcpu": "skylake-avx512", "mattr": [], "features": ["avx2", "avx512f", "avx512bw"]}}}
    check_cpu(manifest, "x86_64", frozenset({"avx2", "avx512f", "avx512bw", "sse2"}))
    with pytest.raises(Refused, match=r"^this CPU lacks avx512f, avx512bw, which the artifact's code uses \(compiled for skylake-avx512\); "
                                      r"compile it for this CPU \(optc compile --target x86 on this machine, or --cpu naming it\)$"):
        check_cpu(manifest, "x86_64", frozenset({"avx2", "fma"}))
    with pytest.raises(Refused, match="^this artifact is for x86_64; this machine is aarch64$"):
        check_cpu(manifest, "aarch64", frozenset())
    check_cpu({"runtime": {"libraries": []}}, "aarch64", frozenset())  # manifests from before runtime.cpu load anywhere


def test_missing_cpu_feature_refused_everywhere(artifact, sample, python_runner, cpp_runner, tmp_path):
    """load_artifact, optc run, optc bench and both runners refuse a CPU lacking a feature the manifest lists."""
    from optc.targets.artifact import load_artifact
    from optc.targets.deploy.run_artifact import host_cpu_features

    copy = tmp_path / "copy"
    shutil.copytree(artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    absent = next(f for f in ("amx_tile", "avx512_fp16", "avx512_vp2intersect", "fma4") if f not in host_cpu_features("x86_64"))
    manifest["runtime"]["cpu"]["features"].append(absent)
    (copy / "manifest.json").write_text(json.dumps(manifest))  # the manifest lists the files, not itself: nothing to re-hash
    cpu = manifest["runtime"]["cpu"]
    compiled_for = " ".join(filter(None, [cpu["mcpu"], ",".join(cpu["mattr"])]))  # the host's name, and what this CPU lacks of it
    message = f"this CPU lacks {absent}, which the artifact's code uses (compiled for {compiled_for})"
    with pytest.raises(TargetError, match=re.escape(message)):
        load_artifact(copy)
    for args in (["run", copy, "--input", f"input={sample[0]}"], ["bench", copy]):
        res = invoke(*args)
        assert res.exit_code == 2 and message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    for run in (python_runner, cpp_runner):
        assert message in refusal(run(copy, "--input", f"input={sample[0]}"))

    del manifest["runtime"]["cpu"]  # an artifact from before optc recorded its CPU still loads
    (copy / "manifest.json").write_text(json.dumps(manifest))
    np.testing.assert_allclose(load_artifact(copy).run({"input": np.load(sample[0])})["logits"], sample[1], atol=1e-5, rtol=1e-5)
    assert python_runner(copy, "--input", f"input={sample[0]}").returncode == 0
    assert cpp_runner(copy, "--input", f"input={sample[0]}").returncode == 0


def test_cpp_runner_reads_an_output_dim_shape_inference_could_not_tell(cpp_runner, tmp_path):
    """RapidOCR's classifier (paddle2onnx) writes its output as [-1, 2]: optc reads -1 as dynamic, and the manifest
    then holds a null dim, which the C++ runner once failed on ("Cannot convert from type None to str")."""
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", [-1, 4])], [("y", [-1, 2])])
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = -1  # no size shape inference can restore
    path = tmp_path / "paddle.onnx"
    onnx.save(proto, path)
    out = tmp_path / "art"
    res = invoke("compile", path, "-o", out, "--target", "x86", "--no-latency", "--tuning-db", tmp_path / "db", "--kernels", "tvm")
    assert res.exit_code == 0, res.output
    x = np.arange(-2, 2, dtype=np.float32).reshape(1, 4)
    np.save(tmp_path / "x.npy", x)
    done = cpp_runner(out, "--input", f"x={tmp_path / 'x.npy'}", "--output-dir", tmp_path)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "output_0.npy"), np.maximum(x, 0))


def test_a_library_the_loader_cannot_find_is_loaded_from_the_environments_wheels(tmp_path, monkeypatch):
    """The runners' vendor libraries: the loader's own search first, then where pip puts a wheel's libraries (the
    onednn-cpu-gomp wheel's libdnnl.so.2 in <env>/lib), kept loaded so that model.so's dependency on the soname
    resolves to that copy."""
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build a probe library")
    from optc.targets.deploy import run_artifact as ra

    lib = tmp_path / "env" / "lib"
    lib.mkdir(parents=True)
    (tmp_path / "probe.c").write_text("int optc_probe(void) { return 42; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,liboptcprobe.so.1", str(tmp_path / "probe.c"), "-o",
                    str(lib / "liboptcprobe.so.1")], check=True)
    with pytest.raises(OSError):
        ra.load_library("liboptcprobe.so.1")
    monkeypatch.setattr(ra, "wheel_library_dirs", lambda: [tmp_path / "nowhere", lib])
    handle, path = ra.load_library("liboptcprobe.so.1")
    assert path == lib / "liboptcprobe.so.1" and handle.optc_probe() == 42
    assert ra.load_library("liboptcprobe.so.1")[0] is handle  # loaded once
    with pytest.raises(ra.Refused, match=r"needs probe 1.0 \(liboptcprobe.so.2\), which cannot be loaded here"):
        ra.check_libraries({"runtime": {"libraries": [{"name": "probe", "version": "1.0", "soname": "liboptcprobe.so.2"}]}})
