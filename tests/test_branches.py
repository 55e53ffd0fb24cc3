"""Passes inside If branches: each branch that holds weights is compiled as a model of its own.

The models mimic Silero VAD: the network for each sample rate sits in one branch
of an ``If`` on a rank-0 ``sr`` input, and a recurrent state holds its batch on axis 1.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ort_run, rand
from onnx import TensorProto, helper, numpy_helper

from optc import api
from optc.data import CalibrationSet
from optc.ir import load_model
from optc.ir.branches import free_names, weighty_branches
from optc.ir.shapes import infer_shapes
from optc.passes import PassContext, PassManager, make_pass

D, H, O = 32, 64, 16


def _mlp_body(name: str, scale: float, nested: bool = False) -> onnx.GraphProto:
    """x @ W1 -> Relu -> @ W2 (+ state's sum); with ``nested``, the second layer sits in an inner If on sr."""
    w1 = numpy_helper.from_array(rand(D, H, seed=1) * scale, f"{name}_W1")
    w2 = numpy_helper.from_array(rand(H, O, seed=2) * scale, f"{name}_W2")
    nodes = [helper.make_node("MatMul", ["x", w1.name], [f"{name}_h0"], name=f"{name}_mm1"),
             helper.make_node("Relu", [f"{name}_h0"], [f"{name}_h"], name=f"{name}_relu")]
    if nested:
        inner = [_leaf(f"{name}_in{i}", f"{name}_h", i + 1.0) for i in range(2)]
        nodes += [helper.make_node("Less", ["sr", f"{name}_limit"], [f"{name}_c"], name=f"{name}_less"),
                  helper.make_node("If", [f"{name}_c"], [f"{name}_y0"], name=f"{name}_inner", then_branch=inner[0], else_branch=inner[1])]
        inits = [w1, numpy_helper.from_array(np.array(20000, np.int64), f"{name}_limit")]
    else:
        nodes.append(helper.make_node("MatMul", [f"{name}_h", w2.name], [f"{name}_y0"], name=f"{name}_mm2"))
        inits = [w1, w2]
    nodes += [helper.make_node("ReduceSum", ["state", "axes01"], [f"{name}_s"], keepdims=0, name=f"{name}_sum"),
              helper.make_node("Add", [f"{name}_y0", f"{name}_s"], [f"{name}_y"], name=f"{name}_add")]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], inits)


def _leaf(name: str, source: str, scale: float) -> onnx.GraphProto:
    w = numpy_helper.from_array(rand(H, O, seed=3) * scale, f"{name}_W")
    return helper.make_graph([helper.make_node("MatMul", [source, w.name], [f"{name}_y"], name=f"{name}_mm")], name, [],
                             [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)], [w])


def vad_like(tmp_path, nested: bool = False):
    """y = If(sr == 16000, then: 16 kHz MLP, else: 8 kHz MLP); state [2, batch, O] is summed into y."""
    nodes = [helper.make_node("Equal", ["sr", "k16"], ["is16"], name="eq"),
             helper.make_node("If", ["is16"], ["y"], name="pick", then_branch=_mlp_body("wide", 1.0, nested),
                              else_branch=_mlp_body("narrow", 0.5))]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D]),
              helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", O]),
              helper.make_tensor_value_info("sr", TensorProto.INT64, [])]
    proto = make_model(nodes, inputs, [("y", ["batch", O])], [("k16", np.array(16000, np.int64)), ("axes01", np.array([0], np.int64))])
    path = tmp_path / "vad_like.onnx"
    onnx.save(proto, path)
    return path


def run_checked(name: str, model, ctx=None, **options):
    """One pass through the manager (which takes it into branches), held to the rewrite contract."""
    infer_shapes(model)  # the manager's own first step; the only change it may make to its input
    before = model.proto.SerializeToString()
    run = PassManager([make_pass(name, options)]).run(model, ctx or PassContext())
    record = run.records[0]
    assert model.proto.SerializeToString() == before, "the pass mutated its input"
    if record.modified:
        onnx.checker.check_model(run.model.proto, full_check=True)
    else:
        assert run.model is model
    return Result(run.model, record.modified, record.skipped)


class Result:
    def __init__(self, model, modified, skipped):
        self.model, self.modified, self.skipped = model, modified, skipped


def _feeds(n: int, sr: int, seed: int = 5):
    return {"x": rand(n, D, seed=seed), "state": rand(2, n, O, seed=seed + 1) * 0.1, "sr": np.array(sr, np.int64)}


def _body(proto: onnx.ModelProto, attribute: str) -> onnx.GraphProto:
    node = next(n for n in proto.graph.node if n.op_type == "If")
    return next(a.g for a in node.attribute if a.name == attribute)


def _quantized(graph: onnx.GraphProto) -> bool:
    return any(n.op_type in ("DequantizeLinear", "MatMulInteger", "QLinearMatMul") for n in graph.node)


def test_weighty_branches_and_what_they_read(tmp_path):
    model = load_model(vad_like(tmp_path))
    branches = weighty_branches(model)
    assert sorted((b.label, b.taken_when, b.condition) for b in branches) == [("pick/else_branch", False, "is16"), ("pick/then_branch", True, "is16")]
    assert set(branches[0].free) == {"x", "state", "axes01"}
    assert free_names(_body(model.proto, "then_branch")) == {"x", "state", "axes01"}


def test_quantize_reaches_the_branch_the_data_takes_and_says_why_not_the_other(tmp_path):
    path = vad_like(tmp_path)
    model = load_model(path)
    calib = CalibrationSet.from_arrays({"x": rand(64, D, seed=7), "state": rand(2, 64, O, seed=8) * 0.1,
                                        "sr": np.full(64, 16000, np.int64)}, model)
    result = run_checked("quantize", model, PassContext(calibration=calib))
    assert result.modified
    assert _quantized(_body(result.model.proto, "then_branch"))
    assert _body(result.model.proto, "else_branch") == _body(model.proto, "else_branch")  # untouched, weights and all
    assert any("pick/else_branch: no calibration sample takes this branch (is16 is never false)" in s for s in result.skipped)
    for sr in (16000, 8000):
        want, got = ort_run(model.proto, _feeds(16, sr))["y"], ort_run(result.model.proto, _feeds(16, sr))["y"]
        if sr == 8000:
            np.testing.assert_array_equal(got, want)
        else:
            assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.999


def test_samples_of_both_rates_reach_both_branches_through_the_cli_budget(tmp_path):
    path = vad_like(tmp_path)
    n = 96
    sr = np.array([16000] * 48 + [8000] * 48, np.int64)
    np.savez(tmp_path / "calib.npz", x=rand(n, D, seed=9), state=rand(2, n, O, seed=10) * 0.1, sr=sr)
    # held_out=0: every sample fits (the last quarter, held out to measure on, would be half the 8000 Hz ones)
    result = api.compile(path, [api.make_pass("sparsify", {"sparsity": 0.3, "storage": "dense"}), api.make_pass("quantize")],
                         calibration=tmp_path / "calib.npz", measure_latency=False, default_budget=False, held_out=0)
    proto = result.model.proto
    onnx.checker.check_model(proto, full_check=True)
    assert _quantized(_body(proto, "then_branch")) and _quantized(_body(proto, "else_branch"))
    sparsify = next(p for p in result.report.passes if p.name == "sparsify")
    assert sparsify.modified and not any("no calibration sample" in s for s in sparsify.skipped)
    assert result.report.after.param_bytes < result.report.before.param_bytes
    assert result.report.after.nonzero_params < 0.8 * result.report.before.nonzero_params
    for rate in (16000, 8000):
        want, got = ort_run(onnx.load(path), _feeds(8, rate))["y"], ort_run(proto, _feeds(8, rate))["y"]
        cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cos > 0.95, rate  # random weights: 30 % of them zeroed, then int8


def test_a_nested_if_is_reached_with_values_computed_in_its_parent(tmp_path):
    """The inner If reads h, computed in the outer branch: its calibration data is captured by onnxruntime."""
    path = vad_like(tmp_path, nested=True)
    model = load_model(path)
    calib = CalibrationSet.from_arrays({"x": rand(48, D, seed=11), "state": rand(2, 48, O, seed=12) * 0.1,
                                        "sr": np.full(48, 16000, np.int64)}, model)
    result = run_checked("quantize", model, PassContext(calibration=calib))
    outer = _body(result.model.proto, "then_branch")
    inner = next(n for n in outer.node if n.op_type == "If")
    taken = next(a.g for a in inner.attribute if a.name == "then_branch")  # 16000 < 20000
    left = next(a.g for a in inner.attribute if a.name == "else_branch")
    assert _quantized(outer) and _quantized(taken) and not _quantized(left)
    assert any("wide_inner/else_branch: no calibration sample" in s for s in result.skipped)
    want, got = ort_run(model.proto, _feeds(16, 16000))["y"], ort_run(result.model.proto, _feeds(16, 16000))["y"]
    assert float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)) > 0.999


def test_exact_passes_keep_outputs_inside_branches(tmp_path):
    """canonicalize's passes run in every branch too, calibration or not, and change no output."""
    path = vad_like(tmp_path, nested=True)
    result = api.compile(path, None, measure_latency=False, verify_each=True)
    for rate in (16000, 8000, 22050):
        want, got = ort_run(onnx.load(path), _feeds(4, rate))["y"], ort_run(result.model.proto, _feeds(4, rate))["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _shared_weight_model(tmp_path):
    """A Constant weight read by two Ifs whose condition folds: folding them would store W twice."""
    w = rand(4 * H, 4 * O, seed=4)
    def body(name, k):
        return helper.make_graph([helper.make_node("Unsqueeze", ["W", "ax0"], [f"{name}_u"], name=f"{name}_unsq"),
                                  helper.make_node("Mul", [f"{name}_u", f"{name}_k"], [f"{name}_y"], name=f"{name}_mul")],
                                 name, [], [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, None)],
                                 [numpy_helper.from_array(np.array(k, np.float32), f"{name}_k")])
    nodes = [helper.make_node("Constant", [], ["W"], name="w", value=numpy_helper.from_array(w, "W")),
             helper.make_node("Constant", [], ["t"], name="t", value=numpy_helper.from_array(np.array(True), "t"))]
    for i in range(2):
        nodes += [helper.make_node("If", ["t"], [f"w{i}"], name=f"if{i}", then_branch=body(f"a{i}", 1.0 + i), else_branch=body(f"b{i}", -1.0)),
                  helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"mm{i}")]
    nodes.append(helper.make_node("Add", ["y0", "y1"], ["y"], name="add"))
    proto = make_model(nodes, [("x", [1, 4, 4 * H])], [("y", [1, 4, 4 * O])], [("ax0", np.array([0], np.int64))])
    path = tmp_path / "shared.onnx"
    onnx.save(proto, path)
    return path


def test_fold_constants_does_not_copy_a_shared_weight_per_use(tmp_path):
    path = _shared_weight_model(tmp_path)
    model = load_model(path)
    result = run_checked("fold-constants", model)
    assert result.model.weight_bytes() <= model.weight_bytes() * 1.02 + 16384
    assert any("folding everything would grow the weights" in n for n in result.model.notes)
    x = rand(1, 4, 4 * H, seed=6)
    np.testing.assert_allclose(ort_run(result.model.proto, {"x": x})["y"], ort_run(model.proto, {"x": x})["y"], rtol=1e-6)


@pytest.mark.parametrize("rate", [16000, 8000])
def test_a_branch_model_keeps_its_names_unique_after_a_pass(tmp_path, rate):
    """Two branches with the same layer names: what a pass defines in one must not clash with the other."""
    path = vad_like(tmp_path)
    model = load_model(path)
    for attr in ("then_branch", "else_branch"):  # the same names in both bodies (valid: sibling scopes)
        body = _body(model.proto, attr)
        for node in body.node:
            node.name = node.name.replace("wide", "net").replace("narrow", "net")
    calib = CalibrationSet.from_arrays({"x": rand(32, D), "state": rand(2, 32, O) * 0.1, "sr": np.full(32, rate, np.int64)}, model)
    result = run_checked("quantize", model, PassContext(calibration=calib))
    assert result.modified


def test_a_pass_failing_inside_a_branch_leaves_that_branch_and_says_so(tmp_path, monkeypatch):
    """New ground for every pass: an internal error on a branch keeps the branch as it was, with a note,
    and the rest of the run goes on (an error in the main graph still fails the run, exit 1)."""
    from optc.passes.framework import branches

    path = vad_like(tmp_path)
    model = load_model(path)
    calib = CalibrationSet.from_arrays({"x": rand(32, D), "state": rand(2, 32, O) * 0.1, "sr": np.full(32, 16000, np.int64)}, model)
    real = branches.run_with_branches

    def failing_inside(p, m, ctx, run):
        if m is not model:
            raise RuntimeError("boom")
        return real(p, m, ctx, run)

    monkeypatch.setattr(branches, "run_with_branches", failing_inside)
    result = run_checked("quantize", model, PassContext(calibration=calib))
    assert not result.modified
    assert any("pick/then_branch: kept as it was after an internal error in quantize (RuntimeError: boom)" in s for s in result.skipped)
