"""optc ``quantize`` against onnxruntime's ``quantize_static`` on every zoo model, same calibration data.

The issue's goal: int8 within 0.5 points of fp32 (or held-out cosine 0.99) and never
below onnxruntime's ``quantize_static`` on the same calibration data. For each model
built by ``python tools/zoo build`` this writes three int8 candidates and scores each
on the zoo's held-out ``eval.npz`` (tools/zoo/scoring.py, as ``benchmarks/zoo.py``):

* ``optc``: ``optc compile MODEL --pass canonicalize --pass quantize --calib calib.npz``
  (``--eval`` for labelled models), the default budget on: it may keep layers float or
  leave quantize out when int8 costs more than a point;
* ``optc as asked``: the same with ``--no-default-budget`` (every layer optc quantizes);
* ``ort``: onnxruntime's ``quantize_static`` with its defaults (QDQ, per-channel int8
  weights, uint8 activations, MinMax) on the model optc's ``canonicalize`` wrote (BatchNorm
  folded: the float model optc's quantize starts from) brought to opset 13, as optc's
  quantize does (per-channel DequantizeLinear; onnxruntime's tool writes its ``axis``
  into older opsets, which onnxruntime then refuses), fed the same calibration samples
  one at a time.

Each row: the metric before, after each candidate (points for labelled models, else the
mean per-sample output cosine), and the file size. A candidate that fails prints its error.

Usage: python benchmarks/zoo_quantize_vs_ort.py [--cache DIR] [--only NAME,...] [--timeout 600]
Nothing is downloaded: a missing cache prints how to build it.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from zoo import scoring  # noqa: E402
from zoo.sources import cache_root  # noqa: E402

OPTC = str(Path(sys.executable).with_name("optc"))


def optc(entry: scoring.Entry, out: Path, timeout: float, *passes: str, budget: bool = True) -> str | None:
    """Run optc's CLI into ``out``; None when it wrote a model, else its error line."""
    cmd = [OPTC, "compile", str(entry.model), "-o", str(out), "--no-latency", "--pass", "canonicalize"]
    for p in passes:
        cmd += ["--pass", p, "--calib", str(entry.calib)]
    if passes and entry.metric in ("top1", "pitch50"):
        cmd += ["--eval", str(entry.eval)]
    if not budget:
        cmd.append("--no-default-budget")
    for shape in entry.input_shapes:
        cmd += ["--input-shape", shape]
    try:
        proc = subprocess.run(["nice", *cmd], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timeout after {timeout:.0f} s"
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("optc: error")]
        return lines[-1] if lines else proc.stderr.strip()[-200:]
    return None


def ort_quantize(entry: scoring.Entry, float_model: Path, out: Path) -> str | None:
    """onnxruntime's quantize_static with its defaults on ``float_model``; None on success, else the error."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    batch_axes = entry.meta.get("batch_axes", {})
    scalars = set(entry.meta.get("scalars", []))
    with np.load(entry.calib, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    n = min(len(v) if k not in batch_axes else v.shape[batch_axes[k]] for k, v in arrays.items() if k not in scalars)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.i = 0

        def get_next(self):  # noqa: ANN201 - onnxruntime's interface
            if self.i >= n:
                return None
            feed = scoring.sample_feed(entry, arrays, self.i)
            self.i += 1
            return feed

    from optc.ir import load_model, save_model
    from optc.ir.opset import upgrade_opset

    try:
        model = load_model(float_model)
        upgrade_opset(model, 13)
        save_model(model, out.with_name("float13.onnx"))
        quantize_static(str(out.with_name("float13.onnx")), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's quantizer raises many kinds; the row says which
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    return None


def figure(entry: scoring.Entry, path: Path) -> str:
    try:
        result = scoring.compare(entry, path)
    except Exception as exc:  # noqa: BLE001 - a candidate onnxruntime cannot run: the row says so
        return f"does not run: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
    if "drop_points" in result:
        return f"{100 * result['after']:.2f} % ({-result['drop_points']:+.2f} pt), cos {result['cosine']:.4f}"
    return f"cos {result['cosine']:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="zoo cache (default: $OPTC_ZOO_CACHE or ~/.cache/optc/zoo)")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per optc run")
    args = parser.parse_args()
    import logging

    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer advises pre-processing on every model
    entries = scoring.chosen_entries(args.cache or cache_root(), args.only)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| model | fp32 | optc quantize (default budget) | optc as asked | onnxruntime quantize_static | KiB fp32 / optc / as asked / ort |")
    print("|---|---|---|---|---|---|")
    for entry in entries:
        with tempfile.TemporaryDirectory(prefix="optc-zoo-q-") as tmp:
            work = Path(tmp)
            cells, sizes = [], []
            err = optc(entry, work / "float", args.timeout)
            base = f"{100 * scoring.compare(entry, entry.model)['before']:.2f} %" if entry.metric in scoring.ACCURACY_METRICS else "-"
            sizes.append(entry.model.stat().st_size)
            for name, kwargs in (("optc", {}), ("asked", {"budget": False})):
                e = optc(entry, work / name, args.timeout, "quantize", **kwargs)
                cells.append(e or figure(entry, work / name / "model.onnx"))
                sizes.append(None if e else (work / name / "model.onnx").stat().st_size)
            e = err or ort_quantize(entry, work / "float" / "model.onnx", work / "ort.onnx")
            cells.append(e or figure(entry, work / "ort.onnx"))
            sizes.append(None if e else (work / "ort.onnx").stat().st_size)
        kib = " / ".join("-" if s is None else f"{s / 1024:.0f}" for s in sizes)
        print(f"| {entry.name} | {base} | {' | '.join(cells)} | {kib} |", flush=True)
    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
