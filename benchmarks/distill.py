"""distill benchmark: params/MACs removed vs fidelity, whitened vs plain SVD side by side.

* MiniLM (``.cache/minilm``): the 48 calibration sentences are split in half;
  the pass is fitted on the first 24 and the mean cosine of the sentence
  embeddings to the teacher's is measured on the other 24 (held out). Rows:
  ``target_reduction`` (fraction of the candidate MatMul params) for whitened
  and plain SVD. Goal: >= 30 % of MatMul weight params removed at mean
  cosine >= 0.99.
* The bundled CNN (BatchNorm folded first): MACs removed vs top-1 accuracy on
  ``test.npz``, fitted on ``calib.npz``, at several per-layer budgets.

Usage::

    python benchmarks/distill.py [--only minilm|cnn] [--damp 0.01] [--targets 0.2,0.3,0.4]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from optc.evaluation import LabelledSet, accuracy
from optc.ir import infer_shapes, load_model
from optc.ir.session import make_session
from optc.ir.stats import compute_stats
from optc.passes import CalibrationSet, PassContext, make_pass

ROOT = Path(__file__).resolve().parent.parent
MINILM = ROOT / ".cache" / "minilm"
SAMPLE = ROOT / "tests" / "models" / "sample"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _row(cells: list[str], widths: list[int]) -> str:
    return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = [_row(header, widths), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    return "\n".join(lines + [_row(r, widths) for r in rows])


def bench_minilm(targets: list[float], damp: float) -> str:
    data = np.load(MINILM / "calib.npz")
    half = len(data["input_ids"]) // 2
    tmp = Path(tempfile.mkdtemp(prefix="optc-distill-"))
    np.savez(tmp / "fit.npz", **{k: data[k][:half] for k in data.files})
    held = {k: data[k][half:] for k in data.files}
    fit = {k: data[k][:half] for k in data.files}
    model = load_model(MINILM / "minilm.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(tmp / "fit.npz", model)
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    matmul_params = sum(inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    teacher = make_session(model)
    ref_held, ref_fit = teacher.run(None, held)[0], teacher.run(None, fit)[0]
    rows = []
    for target in targets:
        for whiten in (True, False):
            start = time.perf_counter()
            result = make_pass("distill", {"target_reduction": target, "whiten": whiten, "damp": damp}).run(model, PassContext(calibration=calib))
            seconds = time.perf_counter() - start
            student = make_session(result.model)
            cos_held = _cosines(ref_held, student.run(None, held)[0])
            cos_fit = _cosines(ref_fit, student.run(None, fit)[0])
            removed = result.stats.get("params_removed", 0) / matmul_params
            rows.append([
                f"{target:.2f}", "whitened" if whiten else "plain", str(result.stats.get("replaced", 0)),
                f"{100 * removed:.1f} %", f"{cos_fit.mean():.4f}", f"{cos_held.mean():.4f}", f"{cos_held.min():.4f}", f"{seconds:.1f}",
            ])
    header = ["target", "svd", "layers", "MatMul params removed", "cos fit (mean)", "cos held-out (mean)", "held-out (min)", "pass s"]
    return f"MiniLM: {matmul_params:,} MatMul weight params; fit on {half} sentences, evaluated on {len(held['input_ids'])} held out; damp={damp}\n" + _table(header, rows)


def bench_cnn(budgets: list[float], damp: float) -> str:
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    folded = make_pass("fold-batchnorm").run(model, PassContext()).model
    infer_shapes(folded)
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", folded)
    test = LabelledSet.from_path(SAMPLE / "test.npz", folded)
    base_macs, base_acc = compute_stats(folded).macs, accuracy(folded, test)
    rows = [["teacher", "-", "0", "0.0 %", f"{100 * base_acc:.1f} %", "-"]]
    for budget in budgets:
        for whiten in (True, False):
            start = time.perf_counter()
            options = {"budget": budget, "whiten": whiten, "damp": damp, "min_reduction": 0.05, "max_batches": 8}
            result = make_pass("distill", options).run(folded, PassContext(calibration=calib))
            seconds = time.perf_counter() - start
            infer_shapes(result.model)
            removed = 1 - compute_stats(result.model).macs / base_macs
            acc = accuracy(result.model, test)
            rows.append([f"{budget:g}", "whitened" if whiten else "plain", str(result.stats.get("replaced", 0)),
                         f"{100 * removed:.1f} %", f"{100 * acc:.1f} %", f"{seconds:.1f}"])
    header = ["layer budget", "svd", "layers", "MACs removed", "accuracy", "pass s"]
    return f"CNN: {base_macs:,} MACs (BatchNorm folded); fit on 128 calib samples, accuracy on 1000 test samples\n" + _table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "cnn"])
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--targets", default="0.2,0.3,0.4")
    parser.add_argument("--budgets", default="0.005,0.02,0.05")
    args = parser.parse_args()
    if args.only in (None, "minilm"):
        print(bench_minilm([float(t) for t in args.targets.split(",")], args.damp), flush=True)
        print(flush=True)
    if args.only in (None, "cnn"):
        print(bench_cnn([float(b) for b in args.budgets.split(",")], args.damp), flush=True)


if __name__ == "__main__":
    main()
