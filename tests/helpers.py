"""Shared helpers for optc's tests: tiny model builders and onnxruntime references."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "tests" / "models"
SAMPLE = MODELS / "sample"
BAD = MODELS / "bad"
TORCH_MODELS = MODELS / "torch"


def make_model(nodes, inputs, outputs, initializers=(), opset=17, ir_version=8) -> onnx.ModelProto:
    """A model from helper-made nodes; inputs/outputs are (name, shape) or ValueInfoProtos."""

    def vi(x, elem=TensorProto.FLOAT):
        if isinstance(x, onnx.ValueInfoProto):
            return x
        name, shape = x
        return helper.make_tensor_value_info(name, elem, shape)

    inits = [t if isinstance(t, onnx.TensorProto) else numpy_helper.from_array(np.asarray(t[1]), t[0]) for t in initializers]
    graph = helper.make_graph(list(nodes), "test", [vi(i) for i in inputs], [vi(o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, feeds, atol=1e-5, rtol=1e-5) -> None:
    ra, rb = ort_run(a, feeds), ort_run(b, feeds)
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_allclose(rb[k], ra[k], atol=atol, rtol=rtol, err_msg=k)


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def load_tool(name: str):
    """Import a script from tools/ (not a package) by path."""
    path = ROOT / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"optc_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def arm_runner():
    """tools/make_arm_root.py, which runs aarch64 artifacts under qemu-user; a skip saying what is missing without it."""
    import pytest

    tool = load_tool("make_arm_root")
    reason = tool.unusable_reason()
    if reason:
        pytest.skip(f"ARM check under qemu not possible here: {reason}")
    return tool


def run_checked(name: str, model, ctx=None, **options):
    """Run one pass the way every rewrite test does: the input must stay untouched,
    a change must pass the full checker, and "no change" must return the same model."""
    from optc.passes import PassContext, make_pass

    before = model.proto.SerializeToString()
    result = make_pass(name, options).run(model, ctx or PassContext())
    assert model.proto.SerializeToString() == before, "the pass mutated its input"
    if result.modified:
        onnx.checker.check_model(result.model.proto, full_check=True)
    else:
        assert result.model is model
    return result


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def mlp_file(tmp_path):
    """A MatMul -> Relu model (x [4, 64] -> y [4, 32]) saved to ``tmp_path``; returns (path, proto)."""
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [("x", [4, 64])],
        [("y", [4, 32])],
        [("W", rand(64, 32))],
    )
    path = tmp_path / "mlp.onnx"
    onnx.save_model(proto, str(path))
    return path, proto


def onednn_or_skip():
    """A skip saying why when artifacts cannot call oneDNN here. In CI on x86-64 Linux, `make test` installs it (the
    tvm extra's onednn-cpu-gomp wheels): its absence there is a broken set-up (the Makefile once lost it), so it fails
    instead of skipping."""
    import platform

    import pytest

    from optc.targets.providers import onednn

    avail = onednn.availability()
    if avail.ok:
        return
    x86_linux = sys.platform == "linux" and platform.machine() == "x86_64"
    if os.environ.get("CI") == "true" and x86_linux and not os.environ.get("OPTC_DISABLE_ONEDNN"):
        pytest.fail(f"oneDNN provider unavailable in CI, where make test installs it: {avail.reason}")
    pytest.skip(f"oneDNN provider unavailable: {avail.reason}")


def x86_cpu_runs_here(cpu: str) -> bool:
    """Whether this machine has every feature an artifact compiled for LLVM's ``cpu`` (e.g. haswell) requires: the
    manifest's check (``required_cpu`` against /proc/cpuinfo, not LLVM's name for this CPU: a VM hides some features)."""
    import platform

    from optc.targets.cpu_features import required_cpu
    from optc.targets.deploy.run_artifact import host_cpu_features
    from optc.targets.spec import make_target

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    return set(required_cpu(make_target("x86", cpu=cpu))["features"]) <= host_cpu_features("x86_64")


@contextlib.contextmanager
def broken_winograd_glue(tmp_path: Path, monkeypatch):
    """optc's Winograd glue replaced by a source no compiler accepts (``undeclared_name``), built into a cache of
    its own: for the tests that a glue failing to build costs the kernels, never the compile."""
    from optc.targets.providers import winograd_glue

    broken = tmp_path / "glue.cc"
    broken.write_text("int f() { return undeclared_name; }\n")
    monkeypatch.setattr(winograd_glue, "GLUE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    winograd_glue.glue_digest.cache_clear()
    try:
        yield
    finally:
        winograd_glue.glue_digest.cache_clear()
