"""int8 vs fp32 TVM artifacts on this CPU: latency, agreement with onnxruntime, accuracy.

For each model the fp32 pipeline (canonicalize) and the int8 one (canonicalize +
quantize, 8-bit weights) are compiled for x86 with optc's build (the int8 one
with its QDQ regions lowered to integer kernels), optionally tuned with
MetaSchedule (``--trials`` per task, database in ``--db``), and timed in
alternation (fp32, int8, qdq_float, fp32, ...) so machine load hits all alike.
``qdq_float`` is the same QDQ model compiled with ``int8=False``: what TVM's
frontend makes of it on its own (fake quantisation, computed in float).

* ``sample``: the bundled MNIST CNN, batch 1; accuracy on its 1,000 test samples.
* ``convblock``: two 3x3 64->64 convolutions with ReLU on 1x64x56x56 (ResNet
  stage-1 shape), random weights, calibrated on random inputs.

Agreement: max |int8 artifact - onnxruntime(QDQ model, no graph optimisations)|,
in units of one quantisation step of the output (``s_x * max|W|`` of the last
layer: what one input element moving one step does to an output).

    python benchmarks/int8_vs_fp32.py [--trials 0] [--db DIR] [--models sample,convblock]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from helpers import SAMPLE, make_model, rand  # noqa: E402

from optc.ir import infer_shapes, load_model  # noqa: E402
from optc.ir.model import Model  # noqa: E402
from optc.ir.shapes import freeze_input_shapes  # noqa: E402
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass, parse_pass_specs  # noqa: E402


def convblock_model():
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1", "B1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
            helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
            helper.make_node("Conv", ["r1", "W2", "B2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
            helper.make_node("Relu", ["c2"], ["y"], name="relu2"),
        ],
        [("x", [1, 64, 56, 56])],
        [("y", [1, 64, 56, 56])],
        [("W1", rand(64, 64, 3, 3) * 0.06), ("B1", rand(64, seed=1) * 0.1), ("W2", rand(64, 64, 3, 3, seed=2) * 0.06), ("B2", rand(64, seed=3) * 0.1)],
    )


def compress(model: Model, calib_path: Path | None, folder: Path) -> tuple[Model, Model]:
    """(fp32 canonicalised, int8 QDQ) versions of ``model``."""
    fp32 = PassManager(parse_pass_specs(["canonicalize"])).run(model).model
    if calib_path is None:
        rng = np.random.default_rng(0)
        feeds = {s.name: np.maximum(rng.standard_normal((16, *s.shape[1:])), -3).astype(np.float32) for s in fp32.inputs}
        calib_path = folder / "calib.npz"
        np.savez(calib_path, **feeds)
    calib = CalibrationSet.from_path(calib_path, fp32)
    passes = [make_pass("quantize", {"reduce_range": False, "calibrator": "percentile"})]
    int8 = PassManager(passes).run(fp32, PassContext(calibration=calib)).model
    return fp32, int8


def output_step(model: Model) -> float:
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers[model.outputs[0].name]
    while node.op_type not in ("Conv", "Gemm", "MatMul"):
        node = producers[node.input[0]]
    x_dq, w_dq = producers[node.input[0]], producers[node.input[1]]
    w = model.initializer_array(w_dq.input[0]).astype(np.float64)
    s_w = model.initializer_array(w_dq.input[1]).astype(np.float64)
    axis = next((a.i for a in w_dq.attribute if a.name == "axis"), 1)
    shape = [1] * w.ndim
    shape[axis] = -1
    return model.initializer_array(x_dq.input[1]).item() * float(np.abs(w * s_w.reshape(shape)).max())


def ort_session(model: Model) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compile_vm(model: Model, trials: int, db: Path, *, int8: bool = True) -> tuple[object, dict, float]:
    import tvm
    from tvm import relax

    from optc.targets.build import build
    from optc.targets.spec import make_target
    from optc.targets.tuning import TuneOptions

    start = time.perf_counter()
    executable, summary = build(model, make_target("x86"), TuneOptions(trials, db), int8=int8)
    return relax.VirtualMachine(executable, tvm.cpu()), summary, time.perf_counter() - start


def timed(vm, args, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        vm["main"](*args)
        out.append((time.perf_counter() - start) * 1000)
    return out


def bench(name: str, model: Model, calib: Path | None, labelled: Path | None, trials: int, db: Path, repeats: int) -> dict:
    import tvm

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = compress(model, calib, Path(tmp))
    vm32, s32, t32 = compile_vm(fp32, trials, db)
    vm8, s8, t8 = compile_vm(int8, trials, db)
    vmq, sq, tq = compile_vm(int8, trials, db, int8=False)  # the QDQ model as TVM imports it: fake quantisation in float
    spec = fp32.inputs[0]
    rng = np.random.default_rng(1)
    x = np.load(labelled)[spec.name][:1] if labelled else rng.standard_normal(spec.shape).astype(np.float32)
    arg = [tvm.runtime.tensor(x)]
    for vm in (vm32, vm8, vmq):
        timed(vm, arg, 2)
    lat32, lat8, latq = [], [], []
    for _ in range(repeats):  # alternate so load hits all alike
        lat32 += timed(vm32, arg, 1)
        lat8 += timed(vm8, arg, 1)
        latq += timed(vmq, arg, 1)
    result = {
        "model": name,
        "trials_per_task": trials,
        "int8_regions_lowered": s8["int8"]["lowered"],
        "int8_left_float": s8["int8"]["left_float"],
        "compile_s": {"fp32": round(t32, 1), "int8": round(t8, 1), "qdq_float": round(tq, 1)},
        "tasks": {"fp32": s32.get("tasks"), "int8": s8.get("tasks"), "qdq_float": sq.get("tasks")},
        "latency_ms_median": {"fp32": float(np.median(lat32)), "int8": float(np.median(lat8)), "qdq_float": float(np.median(latq))},
        "int8_over_fp32": float(np.median(lat8) / np.median(lat32)),
    }
    session = ort_session(int8)
    step = output_step(int8)
    if labelled:
        data = np.load(labelled)
        inputs, labels = data[spec.name], data["label"]
        correct = {"fp32": 0, "int8": 0, "int8_ort": 0}
        worst = 0.0
        for i in range(len(labels)):
            xi = inputs[i : i + 1]
            t = [tvm.runtime.tensor(xi)]
            got8 = vm8["main"](*t).numpy()
            ref8 = session.run(None, {spec.name: xi})[0]
            worst = max(worst, float(np.abs(got8 - ref8).max()))
            correct["int8"] += int(got8.argmax() == labels[i])
            correct["int8_ort"] += int(ref8.argmax() == labels[i])
            correct["fp32"] += int(vm32["main"](*t).numpy().argmax() == labels[i])
        result["accuracy"] = {k: v / len(labels) for k, v in correct.items()}
        result["samples"] = len(labels)
    else:
        worst = 0.0
        for seed in range(5):
            xi = np.random.default_rng(10 + seed).standard_normal(spec.shape).astype(np.float32)
            got8 = vm8["main"](tvm.runtime.tensor(xi)).numpy()
            worst = max(worst, float(np.abs(got8 - session.run(None, {spec.name: xi})[0]).max()))
    result["max_abs_diff_vs_ort"] = worst
    result["output_step"] = step
    result["max_diff_in_steps"] = worst / step
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=0, help="MetaSchedule trials per task (0: untuned)")
    parser.add_argument("--db", type=Path, default=None, help="tuning database folder (default: a fresh temporary one)")
    parser.add_argument("--models", default="sample,convblock")
    parser.add_argument("--repeats", type=int, default=0, help="timed runs per artifact (default: 200 sample, 10 convblock)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        db = args.db or Path(tmp) / "db"
        for name in args.models.split(","):
            if name == "sample":
                model = load_model(SAMPLE / "mnist_cnn.onnx")
                freeze_input_shapes(model, {"input": [1, 1, 28, 28]})
                r = bench(name, model, SAMPLE / "calib.npz", SAMPLE / "test.npz", args.trials, db, args.repeats or 200)
            elif name == "convblock":
                with tempfile.TemporaryDirectory() as mtmp:
                    import onnx

                    path = Path(mtmp) / "m.onnx"
                    onnx.save_model(convblock_model(), str(path))
                    model = load_model(path)
                    infer_shapes(model)
                r = bench(name, model, None, None, args.trials, db, args.repeats or 10)
            else:
                raise SystemExit(f"unknown model '{name}' (sample, convblock)")
            print(json.dumps(r), flush=True)
            results.append(r)


if __name__ == "__main__":
    main()
