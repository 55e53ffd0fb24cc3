"""optc ``quantize`` against onnxruntime's ``quantize_static`` on the bundled MNIST CNN.

Same calibration samples (tests/models/sample/calib.npz) for every quantizer;
top-1 accuracy on the 1000 real test digits, scored in onnxruntime twice: the
default session (graph optimisations on: QDQ fused into int8 kernels) and with
optimisations off (the QDQ arithmetic as written, which TVM/VNNI/ARM run).
Size is the saved .onnx file; latency is the median of single-image runs in
the default session (1 thread). onnxruntime's quantizer gets the same
BatchNorm-folded model optc quantizes (and, for reference, the original).

Usage: python benchmarks/quantize_vs_ort.py
"""
from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from optc.ir import load_model, save_model
from optc.passes import CalibrationSet, PassContext, PassManager, make_pass

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def accuracy(path: Path, optimize: bool, test) -> float:
    s = session(path, optimize)
    logits = s.run(None, {s.get_inputs()[0].name: test["input"]})[0]
    return float((logits.argmax(1) == test["label"]).mean())


def latency_ms(path: Path, x: np.ndarray, repeats: int = 200) -> float:
    s = session(path, True)
    name = s.get_inputs()[0].name
    for _ in range(10):
        s.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        s.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


class Reader(CalibrationDataReader):
    def __init__(self, x: np.ndarray, name: str, batch: int = 16):
        self.batches = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.batches, None)


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    test = np.load(SAMPLE / "test.npz")
    calib_x = np.load(SAMPLE / "calib.npz")["input"]
    tmp = Path(tempfile.mkdtemp(prefix="optc-qbench-"))
    original = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", original)
    folded = PassManager([make_pass("fold-batchnorm")]).run(original, PassContext()).model
    save_model(folded, tmp / "fp32.onnx")
    rows: list[tuple[str, Path, float]] = [("fp32 (BN folded)", tmp / "fp32.onnx", 0.0)]

    variants = {
        "optc minmax": {"calibrator": "minmax", "bias_correction": False},
        "optc minmax +bc": {"calibrator": "minmax"},
        "optc percentile": {"calibrator": "percentile", "bias_correction": False},
        "optc percentile +bc": {"calibrator": "percentile"},
        "optc entropy": {"calibrator": "entropy", "bias_correction": False},
        "optc entropy +bc": {"calibrator": "entropy"},
        "optc mse +bc": {"calibrator": "mse"},
        "optc percentile +bc +gptq": {"calibrator": "percentile", "rounding": "gptq"},
        "optc percentile +bc, 8-bit w": {"calibrator": "percentile", "reduce_range": False},
        "optc minmax, 8-bit w (ORT-like)": {"calibrator": "minmax", "bias_correction": False, "reduce_range": False},
    }
    for label, options in variants.items():
        start = time.perf_counter()
        q = PassManager([make_pass("quantize", options)]).run(folded, PassContext(calibration=calib)).model
        path = tmp / f"{label.replace(' ', '_').replace(',', '').replace('+', 'p')}.onnx"
        save_model(q, path)
        rows.append((label, path, time.perf_counter() - start))

    name = original.inputs[0].name
    for label, src in (("ORT quantize_static (folded)", tmp / "fp32.onnx"), ("ORT quantize_static (original)", SAMPLE / "mnist_cnn.onnx")):
        start = time.perf_counter()
        out = tmp / f"ort_{len(rows)}.onnx"
        quantize_static(str(src), str(out), Reader(calib_x, name), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        rows.append((label, out, time.perf_counter() - start))

    x1 = test["input"][:1]
    fp32_ms = latency_ms(tmp / "fp32.onnx", x1)
    header = f"{'model':34s} {'acc default':>11s} {'acc no-opt':>10s} {'size B':>8s} {'lat ms':>7s} {'vs fp32':>7s} {'quant s':>7s}"
    print(header)
    print("-" * len(header))
    for label, path, seconds in rows:
        ms = latency_ms(path, x1)
        print(f"{label:34s} {accuracy(path, True, test):11.3f} {accuracy(path, False, test):10.3f} {path.stat().st_size:8d} "
              f"{ms:7.3f} {fp32_ms / ms:6.2f}x {seconds:7.1f}")
    print(f"\nMNIST CNN, 1000 test digits, calibration: the same 500 samples for every quantizer; latency batch 1, 1 thread, median of 200")


if __name__ == "__main__":
    main()
