"""oneDNN calls and OpenMP threads (issue 14): a small call runs on the calling thread alone.

On a loaded machine, two OpenMP threads the scheduler leaves on one core make every parallel
region wait out a spin (GOMP_SPINCOUNT); a model of tiny convolutions then ran hundreds of times
slower for a whole process. So the glue starts no OpenMP team for a call below its work threshold
(``kSerialMacs`` in onednn_glue.cc): a process running only such calls keeps one thread. Counted
in a fresh process (OpenMP creates its threads at the first parallel region and keeps them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import make_model, onednn_or_skip
from onnx import helper, numpy_helper
from optc.cli.main import cli

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

# A fresh process loads the artifact (argv[1]) as optc's runners do, counting its threads before.
LOAD = """
import json, os, sys
from pathlib import Path
from optc.targets.deploy import run_artifact as ra
import numpy as np, tvm
folder = Path(sys.argv[1])
manifest = ra.read_manifest(folder)
ra.apply_env(manifest["runtime"]["env"])
before = len(os.listdir("/proc/self/task"))
vm, dev = ra.load_vm(folder, manifest)
"""

# Threads this process starts while running the artifact, TVM's pool held to the calling thread
# and OpenBLAS (numpy) to one: what is left is OpenMP's.
COUNT_THREADS = LOAD + """
x = tvm.runtime.tensor(np.ones(manifest["inputs"][0]["shape"], dtype="float32"), dev)
for _ in range(3):
    vm["main"](x)
print(json.dumps({"started": len(os.listdir("/proc/self/task")) - before}))
"""


def conv_model(channels: int, size: int) -> onnx.ModelProto:
    w = (np.random.default_rng(1).standard_normal((channels, channels, 3, 3)) * 0.1).astype(np.float32)
    b = np.zeros(channels, np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])]
    shape = [1, channels, size, size]
    return make_model(nodes, [("x", shape)], [("y", shape)], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def run_compiled(model: onnx.ModelProto, tmp_path, script: str, *args: str, **env: str) -> dict:
    """``model`` compiled for x86 with every chain sent to oneDNN, then ``script`` run on the artifact in a
    fresh process (TVM's pool held to the calling thread, OpenBLAS to one, ``env`` on top); its last line as JSON."""
    return run_script(compile_onednn(model, tmp_path), script, *args, **env)


def compile_onednn(model: onnx.ModelProto, tmp_path):
    onednn_or_skip()
    path, out = tmp_path / "m.onnx", tmp_path / "out"
    onnx.save(model, path)
    res = CliRunner().invoke(cli, ["compile", str(path), "-o", str(out), "--target", "x86", "--kernels", "onednn",
                                   "--no-latency", "--tuning-db", str(tmp_path / "db")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out


def run_script(artifact, script: str, *args: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_", "TVM_", "OPTC_THREAD"))}
    clean.update({"TVM_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **env})
    done = subprocess.run([sys.executable, "-c", script, str(artifact), *args], env=clean, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def threads_started(model: onnx.ModelProto, tmp_path) -> int:
    return run_compiled(model, tmp_path, COUNT_THREADS)["started"]


def test_small_convolution_starts_no_openmp_thread(tmp_path):
    # 8 -> 8 channels, 3x3, 14x14: 0.11 M multiply-adds, below kSerialMacs (2 M).
    assert threads_started(conv_model(8, 14), tmp_path) == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: OpenMP starts no thread anyway")
def test_large_convolution_still_uses_openmp_threads(tmp_path):
    # 64 -> 64 channels, 3x3, 32x32: 38 M multiply-adds, threaded as before.
    assert threads_started(conv_model(64, 32), tmp_path) >= 1


PACED_RUNS = """
import json, sys
from pathlib import Path
import numpy as np, tvm
from optc.targets.deploy import run_artifact as ra
folder = Path(sys.argv[1])
manifest = ra.read_manifest(folder)
ra.apply_env(manifest["runtime"]["env"])
vm, dev = ra.load_vm(folder, manifest)
x = np.random.default_rng(2).standard_normal(manifest["inputs"][0]["shape"]).astype(np.float32)
outs = [vm["main"](tvm.runtime.tensor(x, dev)).numpy() for _ in range(200)]
spread = max(float(np.abs(o - outs[0]).max()) for o in outs)
np.save(sys.argv[2], outs[0])
np.save(sys.argv[3], x)
print(json.dumps({"pacing": str(vm.module.get_function("optc_dnnl_pacing", query_imports=True)()), "spread": spread}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: nothing to pace")
def test_large_call_also_runs_on_one_thread_with_the_same_results(tmp_path):
    """A call above kSerialMacs learns whether all threads pay (on an oversubscribed machine they do not) by
    running on one thread now and then: both kernels must give the same numbers as onnxruntime."""
    from helpers import ort_run

    model = conv_model(64, 32)
    result = run_compiled(model, tmp_path, PACED_RUNS, str(tmp_path / "y.npy"), str(tmp_path / "x.npy"), OMP_NUM_THREADS="2")
    runs = dict(part.split("=") for part in result["pacing"].split())
    assert int(runs["serial"]) >= 3 and int(runs["parallel"]) >= 3, result  # both kernels ran
    assert result["spread"] <= 1e-5, result
    want = ort_run(model, {"x": np.load(tmp_path / "x.npy")})["y"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=1e-4, atol=1e-4)


# The artifact's TVM kernels and oneDNN on one pool (openmp_pool.h): which pool, how many threads the runs
# started, and the output.
SHARED_POOL = LOAD + """
x = np.load(sys.argv[3])
outs = [vm["main"](tvm.runtime.tensor(x, dev)).numpy() for _ in range(40)]
np.save(sys.argv[2], outs[0])
print(json.dumps({"pool": str(vm.module.get_function("optc_dnnl_thread_pool", query_imports=True)()),
                  "started": len(os.listdir("/proc/self/task")) - before,
                  "spread": max(float(np.abs(o - outs[0]).max()) for o in outs)}))
"""


def conv_pool_model() -> onnx.ModelProto:
    """A convolution oneDNN runs (85 M multiply-adds: paced, threaded) and a 3x3 max-pool TVM threads (147 K outputs,
    above cpu_schedule.PARALLEL_MIN): both kinds of parallel region in one inference."""
    w = (np.random.default_rng(3).standard_normal((64, 64, 3, 3)) * 0.05).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    shape = [1, 64, 48, 48]
    return make_model(nodes, [("x", shape)], [("y", shape)], [numpy_helper.from_array(w, "w")])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no pool to share")
def test_tvm_kernels_run_on_onednn_openmp_threads(tmp_path):
    """TVM's parallel loops run on OpenMP's threads, so an inference that calls oneDNN starts OpenMP's one extra
    thread and no TVM worker; OPTC_THREAD_POOL=tvm keeps TVM's own pool, which starts its own. Same outputs,
    run after run, as onnxruntime's."""
    from helpers import ort_run

    model = conv_pool_model()
    x = np.random.default_rng(4).standard_normal((1, 64, 48, 48)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    want = ort_run(model, {"x": x})["y"]
    artifact, results = compile_onednn(model, tmp_path), {}
    for pool in ("openmp", "tvm"):
        out = tmp_path / f"y_{pool}.npy"
        results[pool] = run_script(artifact, SHARED_POOL, str(out), str(tmp_path / "x.npy"),
                                   OMP_NUM_THREADS="2", TVM_NUM_THREADS="2", OPTC_THREAD_POOL=pool)
        assert results[pool]["spread"] <= 1e-5, results
        np.testing.assert_allclose(np.load(out), want, rtol=1e-4, atol=1e-4)
    assert results["openmp"]["pool"] == "openmp" and results["tvm"]["pool"] == "tvm", results
    assert results["openmp"]["started"] == 1, results  # OpenMP's second thread; TVM's pool never started
    assert results["tvm"]["started"] > results["openmp"]["started"], results


# Two copies of one artifact in one process (as a compile holds its kernel race's library and then its artifact).
TWO_COPIES = LOAD + """
second, _ = ra.load_vm(folder, manifest)
x = tvm.runtime.tensor(np.ones(manifest["inputs"][0]["shape"], dtype="float32"), dev)
for lib in (vm, second):
    for _ in range(20):
        lib["main"](x)
print(json.dumps({"pools": [str(v.module.get_function("optc_dnnl_thread_pool", query_imports=True)()) for v in (vm, second)],
                  "started": len(os.listdir("/proc/self/task")) - before}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no pool to share")
def test_two_libraries_in_one_process_each_share_the_pool(tmp_path):
    """Each library repoints its own TVM kernels (openmp_pool.h finds its own symbols): both report the shared pool,
    and running both starts OpenMP's one extra thread and no TVM worker."""
    result = run_compiled(conv_pool_model(), tmp_path, TWO_COPIES, OMP_NUM_THREADS="2", TVM_NUM_THREADS="2")
    assert result == {"pools": ["openmp", "openmp"], "started": 1}, result


# After 20 inferences, the CPU time the process spends in a half-second sleep: OpenMP's idle workers spin for as long as
# GOMP_SPINCOUNT says ("infinite": the whole sleep), then block.
SPIN = """
import json, resource, sys, time
from pathlib import Path
import numpy as np
loader, folder, x = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if loader == "optc":
    from optc.targets import artifact
    artifact.RUNTIME_ENV = {"GOMP_SPINCOUNT": "infinite"}
    loaded = artifact.load_artifact(folder)
    for _ in range(20):
        loaded.run({"x": np.load(x)})
else:
    from optc.targets.deploy import run_artifact as ra
    ra.run(folder, [f"x={x}"], repeats=20)
start = resource.getrusage(resource.RUSAGE_SELF).ru_utime
time.sleep(0.5)
print(json.dumps({"spun_s": resource.getrusage(resource.RUSAGE_SELF).ru_utime - start}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: no OpenMP worker to spin")
def test_the_runtime_env_reaches_openmp_in_optc_and_the_python_runner(tmp_path):
    """libgomp reads GOMP_SPINCOUNT once, when it loads, and loading oneDNN loads it: the loaders used to load oneDNN to
    check it before setting the artifact's environment, which then never reached OpenMP. Set to "infinite", an idle
    worker now spins through the sleep."""
    artifact = compile_onednn(conv_model(64, 56), tmp_path)
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["runtime"]["env"] = {"GOMP_SPINCOUNT": "infinite"}  # not hashed: the runner's refusals are about the files
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    np.save(tmp_path / "x.npy", np.ones((1, 64, 56, 56), np.float32))
    for loader in ("optc", "python runner"):
        spun = run_script(artifact, SPIN.replace("sys.argv[1], Path(sys.argv[2]), sys.argv[3]", f"{loader!r}, Path(sys.argv[1]), sys.argv[2]"),
                          str(tmp_path / "x.npy"), OMP_NUM_THREADS="2")["spun_s"]
        assert spun > 0.1, (loader, spun)
