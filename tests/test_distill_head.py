"""distill-head: the head pattern, exact recovery with least squares, KD refits that win back
agreement with the teacher, the hold-out gate, and the teacher captured by the pass manager."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import make_model, ops, ort_run, rand, run_checked
from onnx import helper

from optc.ir import infer_shapes, load_model
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass
from optc.data.teacher import TeacherOutputs


def _classifier(w1, w2, b2, head="gemm"):
    nodes = [helper.make_node("Gemm", ["x", "W1"], ["h"], name="fc1"), helper.make_node("Relu", ["h"], ["a"], name="relu")]
    inits = [("W1", w1)]
    if head == "gemm":
        nodes.append(helper.make_node("Gemm", ["a", "W2", "b2"], ["logits"], transB=1, alpha=0.5, name="fc2"))
        inits += [("W2", np.ascontiguousarray(w2.T / 0.5)), ("b2", b2)]
    elif head == "matmul_add":
        nodes += [helper.make_node("MatMul", ["a", "W2"], ["z"], name="fc2"), helper.make_node("Add", ["z", "b2"], ["logits"], name="fc2_bias")]
        inits += [("W2", w2), ("b2", b2)]
    else:
        nodes.append(helper.make_node("MatMul", ["a", "W2"], ["logits"], name="fc2"))
        inits.append(("W2", w2))
    return make_model(nodes, [("x", ["N", w1.shape[0]])], [("logits", ["N", w2.shape[1]])], inits)


def _load(proto, save, name, calib):
    path = save(proto, name)
    model = load_model(path)
    infer_shapes(model)
    # One file per model: a calibration set refuses a file rewritten after it was checked.
    np.savez(path.with_name(f"{name}.calib.npz"), **calib)
    return model, CalibrationSet.from_path(path.with_name(f"{name}.calib.npz"), model)


def _teacher_and_student(save, head="gemm", noise=0.0, head_noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    w1, w2, b2 = rand(16, 32, seed=seed), rand(32, 10, seed=seed + 1), rand(10, seed=seed + 2)
    teacher_proto = _classifier(w1, w2, b2, head)
    w1s = (w1 + noise * rng.standard_normal(w1.shape)).astype(np.float32)
    w2s = (w2 + head_noise * rng.standard_normal(w2.shape)).astype(np.float32)
    student_proto = _classifier(w1s, w2s, b2 + np.float32(head_noise), head)
    x = rand(400, 16, seed=seed + 3)
    teacher, calib = _load(teacher_proto, save, "teacher.onnx", {"x": x})
    student, _ = _load(student_proto, save, "student.onnx", {"x": x})
    return teacher, student, calib, teacher_proto, student_proto


@pytest.mark.parametrize("head", ["gemm", "matmul_add", "matmul"])
def test_lsq_recovers_a_perturbed_head_exactly(save, head):
    teacher, student, calib, teacher_proto, _ = _teacher_and_student(save, head, head_noise=0.3)
    ctx = PassContext(calibration=calib, teacher=TeacherOutputs.capture(teacher, calib))
    result = run_checked("distill-head", student, ctx, mode="lsq", ridge=0.0)
    assert result.modified and result.stats["refit"] == 1
    assert ops(result.model) == {"gemm": ["Gemm", "Relu", "Gemm"], "matmul_add": ["Gemm", "Relu", "MatMul", "Add"],
                                 "matmul": ["Gemm", "Relu", "MatMul", "Add"]}[head]
    x = rand(50, 16, seed=9)
    np.testing.assert_allclose(ort_run(result.model.proto, {"x": x})["logits"], ort_run(teacher_proto, {"x": x})["logits"], atol=1e-3)


def test_kd_wins_back_agreement_with_the_teacher(save):
    teacher, student, calib, teacher_proto, student_proto = _teacher_and_student(save, noise=0.4, seed=3)
    ctx = PassContext(calibration=calib, teacher=TeacherOutputs.capture(teacher, calib))
    result = run_checked("distill-head", student, ctx, mode="kd", temperature=2.0)
    assert result.modified
    (report,) = result.stats["heads"]
    assert report["kd_after"] < 0.5 * report["kd_before"] and report["samples_held_out"] == 100
    assert report["steps"] > 0
    x = rand(2000, 16, seed=11)  # fresh inputs: the refit generalises
    t = ort_run(teacher_proto, {"x": x})["logits"].argmax(1)
    before = (ort_run(student_proto, {"x": x})["logits"].argmax(1) == t).mean()
    after = (ort_run(result.model.proto, {"x": x})["logits"].argmax(1) == t).mean()
    assert after >= before


def test_no_change_when_the_head_is_already_the_teachers(save):
    teacher, _, calib, _, _ = _teacher_and_student(save)
    ctx = PassContext(calibration=calib, teacher=TeacherOutputs.capture(teacher, calib))
    result = run_checked("distill-head", teacher, ctx)
    assert not result.modified and result.model is teacher
    assert any("refit not kept" in s for s in result.skipped)


def test_without_teacher_or_head_nothing_changes(save):
    teacher, _, calib, _, _ = _teacher_and_student(save)
    result = run_checked("distill-head", teacher, PassContext(calibration=calib))
    assert not result.modified and "no teacher outputs" in result.skipped[-1]
    proto = make_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [("x", ["N", 4])], [("y", ["N", 4])])
    model, calib = _load(proto, save, "relu.onnx", {"x": rand(8, 4)})
    result = run_checked("distill-head", model, PassContext(calibration=calib, teacher=TeacherOutputs.capture(model, calib)))
    assert not result.modified and result.skipped == ["y: not produced by a MatMul/Gemm with a constant weight"]


def test_pipeline_gives_the_original_model_as_teacher(save):
    teacher, _, calib, teacher_proto, _ = _teacher_and_student(save, seed=5)
    passes = [make_pass("distill", {"budget": 0.05, "students": ("gemm",), "min_reduction": 0.05}),
              make_pass("distill-head", {"temperature": 2.0})]
    out = PassManager(passes).run(teacher, PassContext(calibration=calib))
    distill, head = out.records
    assert distill.modified and distill.stats["params_removed"] > 0
    (report,) = head.stats["heads"]
    # Measured against the original: against distill's own output the loss would start at 0.
    assert report["kd_before"] > 0.1 and report["agreement_before"] < 1
    # Here the rank-7 features cannot generalise the refit (300 fitted samples, 330 parameters): the gate says so.
    assert head.modified == (report["kd_after"] < report["kd_before"])
    onnx.checker.check_model(out.model.proto, full_check=True)
    with pytest.raises(Exception, match="needs calibration data"):
        PassManager([make_pass("distill-head")]).run(teacher, PassContext())
