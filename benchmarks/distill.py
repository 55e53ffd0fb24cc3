"""distill benchmark: params/MACs removed vs fidelity; whitened, ASVD and plain SVD side by side.

* MiniLM (``.cache/minilm``): fitted on ``--fit-sentences`` English sentences
  (Python's documentation topics and the system licence texts, tokenised with
  the exporter's WordPiece tokenizer into ``.cache/minilm/text_64.npz`` on the
  first run); mean cosine of the sentence embeddings to the teacher's on 256
  held-out sentences of that text and on the 48 curated export sentences (other
  text entirely). Rows: ``target_reduction`` (fraction of the candidate MatMul
  params) x students (low-rank only, or narrower MLP for the FFNs plus low-rank
  for attention) x low-rank fit. Goal: >= 30 % of MatMul weight params removed
  at mean cosine >= 0.99.
* The bundled CNN (BatchNorm folded first): MACs removed vs top-1 accuracy on
  ``test.npz``, fitted on ``calib.npz``, at several per-layer budgets and MACs
  targets (``target_reduction`` with ``reduce=macs``, common or least-total
  allocation), before and after ``distill-head`` (KD of the classifier to the
  original's logits). Goal: >= 30 % of the MACs at <= 0.5 points of accuracy lost.

Usage::

    python benchmarks/distill.py [--only minilm|cnn] [--targets 0.2,0.3,0.4] [--configs NAME,...]
                                 [--fit-sentences 1024] [--budgets 0.01,0.02,0.05] [--macs-targets 0.3,0.35]
                                 [--allocations common,least-total] [--fits whitened,asvd,plain]
                                 [--reconstruct sequential,none]
"""
from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np

from optc.data import LabelledSet
from optc.evaluation import accuracy
from optc.ir import infer_shapes, load_model
from optc.ir.session import make_session
from optc.ir.stats import compute_stats
from optc.data import CalibrationSet
from optc.passes import PassContext, make_pass
from optc.passes.distill import distill as distill_module
from optc.data.teacher import TeacherOutputs

from minilm_text import text_calibration  # benchmarks/ is the script's folder

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


class _GramMemo:
    """Every configuration fits the same layers on the same data: stream each layer's Gram once.

    Benchmark-only: the pass itself keeps no state between runs.
    """

    def __init__(self) -> None:
        self.grams: dict[str, object] = {}
        self.compute = distill_module.input_grams

    def __call__(self, model, calibration, layers, **kwargs):
        missing = [l for l in layers if l.node not in self.grams]
        if missing:
            self.grams.update(self.compute(model, calibration, missing, **kwargs))
        return {l.node: self.grams[l.node] for l in layers if l.node in self.grams}


MINILM_CONFIGS = {
    # name: distill options
    "low-rank whitened": {"students": ("matmul",), "fit": "whitened"},
    "low-rank asvd": {"students": ("matmul",), "fit": "asvd"},
    "low-rank plain": {"students": ("matmul",), "fit": "plain"},
    "mlp + low-rank whitened": {"students": ("mlp", "matmul"), "fit": "whitened"},
    "mlp + low-rank asvd": {"students": ("mlp", "matmul"), "fit": "asvd"},
    "mlp + low-rank plain": {"students": ("mlp", "matmul"), "fit": "plain"},
}


def bench_minilm(targets: list[float], damp: float, fit_count: int, configs: list[str], allocations: list[str], reconstructs: list[str]) -> str:
    """Fit on ``fit_count`` tokenised English sentences; cosine on the rest and on the 48 curated export sentences."""
    text = np.load(text_calibration())
    curated = dict(np.load(MINILM / "calib.npz"))
    tmp = Path(tempfile.mkdtemp(prefix="optc-distill-"))
    np.savez(tmp / "fit.npz", **{k: text[k][:fit_count] for k in text.files})
    held = {k: text[k][fit_count : fit_count + 256] for k in text.files}
    model = load_model(MINILM / "minilm.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(tmp / "fit.npz", model)
    inits = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    matmul_params = sum(inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits)
    memo = _GramMemo()
    distill_module.input_grams = memo
    try:
        teacher = make_session(model)
        ref_held, ref_curated = teacher.run(None, held)[0], teacher.run(None, curated)[0]
        rows = []
        for target, name, allocation, reconstruct in itertools.product(targets, configs, allocations, reconstructs):
            start = time.perf_counter()
            options = {"target_reduction": target, "damp": damp, "allocation": allocation, "reconstruct": reconstruct, **MINILM_CONFIGS[name]}
            result = make_pass("distill", options).run(model, PassContext(calibration=calib))
            seconds = time.perf_counter() - start
            student = make_session(result.model)
            cos_held = _cosines(ref_held, student.run(None, held)[0])
            cos_cur = _cosines(ref_curated, student.run(None, curated)[0])
            removed = result.stats.get("params_removed", 0) / matmul_params
            kinds = [l["student"] for l in result.stats.get("layers", [])]
            rows.append([
                f"{target:.2f}", name, f"{allocation} / {reconstruct}", f"{kinds.count('mlp')}+{kinds.count('lowrank')}", f"{100 * removed:.1f} %",
                f"{cos_held.mean():.4f}", f"{cos_held.min():.4f}", f"{cos_cur.mean():.4f}", f"{cos_cur.min():.4f}", f"{seconds:.0f}",
            ])
            print(_row(rows[-1], [len(c) for c in rows[-1]]), flush=True)
    finally:
        distill_module.input_grams = memo.compute
    header = ["target", "students / fit", "allocation / reconstruct", "mlp+lowrank", "MatMul params removed", "held-out cos (mean)", "(min)",
              "curated cos (mean)", "(min)", "pass s"]
    tokens = int(text["attention_mask"][:fit_count].sum())
    return (f"MiniLM: {matmul_params:,} MatMul weight params; fit on {fit_count} English sentences ({tokens:,} real tokens), "
            f"cosine on {len(held['input_ids'])} held-out sentences and on the {len(curated['input_ids'])} curated export sentences; "
            f"damp={damp}\n") + _table(header, rows)


def cnn_settings(budgets: list[float], macs_targets: list[float], allocations: list[str]) -> list[tuple[str, dict]]:
    """Row label and distill options: per-layer budgets, then MACs targets under each allocation."""
    rows = [(f"budget {b:g}", {"budget": b}) for b in budgets]
    return rows + [(f"MACs {100 * t:g} % {a}", {"target_reduction": t, "reduce": "macs", "allocation": a}) for t in macs_targets for a in allocations]


def bench_cnn(settings: list[tuple[str, dict]], damp: float, fits: list[str], reconstructs: list[str]) -> str:
    """fold-batchnorm, distill, then distill-head fitted to the original model's logits."""
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    infer_shapes(model)
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    test = LabelledSet.from_path(SAMPLE / "test.npz", model)
    folded = make_pass("fold-batchnorm").run(model, PassContext()).model
    infer_shapes(folded)
    base_macs, base_acc = compute_stats(folded).macs, accuracy(folded, test)
    rows = [["teacher", "-", "0", "0.0 %", f"{100 * base_acc:.1f} %", "-", "-", "-"]]
    # What PassManager gives a pass that requires TEACHER: the pipeline input's outputs.
    ctx = PassContext(calibration=calib, teacher=TeacherOutputs.capture(model, calib))
    for label, options in settings:
        for fit, reconstruct in [(f, r) for f in fits for r in reconstructs]:
            start = time.perf_counter()
            distill = make_pass("distill", {**options, "fit": fit, "damp": damp, "min_reduction": 0.05, "reconstruct": reconstruct})
            student = distill.run(folded, PassContext(calibration=calib))
            head = make_pass("distill-head", {"mode": "kd", "temperature": 4.0}).run(student.model, ctx)
            seconds = time.perf_counter() - start
            infer_shapes(head.model)
            macs = compute_stats(head.model).macs
            removed = 1 - macs / base_macs
            (report,) = head.stats.get("heads", [{}]) or [{}]
            kd = f"{report.get('kd_before', float('nan')):.3f} -> {report.get('kd_after', float('nan')):.3f}" + ("" if head.modified else " (not kept)")
            rows.append([label, f"{fit} / {reconstruct}", str(student.stats.get("replaced", 0)), f"{100 * removed:.1f} %",
                         f"{100 * accuracy(student.model, test):.1f} %", f"{100 * accuracy(head.model, test):.1f} %", kd, f"{seconds:.1f}"])
            print(_row(rows[-1], [len(c) for c in rows[-1]]), flush=True)
    header = ["layer budget / MACs target", "fit / reconstruct", "layers", "MACs removed", "accuracy", "+ distill-head", "held-out KD loss", "passes s"]
    return (f"CNN: {base_macs:,} MACs (BatchNorm folded); fit on the {calib.num_samples} calibration samples, accuracy on "
            f"{test.inputs.num_samples} test samples; distill-head: kd, T=4, a quarter of the calibration samples held out\n") + _table(header, rows)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["minilm", "cnn"])
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--targets", default="0.2,0.3,0.4")
    parser.add_argument("--fit-sentences", type=int, default=1024)
    parser.add_argument("--configs", default=",".join(MINILM_CONFIGS), help="MiniLM configurations, comma-separated")
    parser.add_argument("--budgets", default="0.01,0.02,0.05", help="CNN: per-layer budgets, comma-separated (empty: none)")
    parser.add_argument("--macs-targets", default="0.3,0.35", help="CNN: target_reduction of the MACs, comma-separated (empty: none)")
    parser.add_argument("--allocations", default="common,least-total", help="allocations for the targets (MiniLM's params, the CNN's MACs)")
    parser.add_argument("--minilm-reconstruct", default="sequential", help="MiniLM: distill's reconstruct settings, comma-separated")
    parser.add_argument("--fits", default="whitened,asvd,plain", help="low-rank fits for the CNN, comma-separated")
    parser.add_argument("--reconstruct", default="sequential,none", help="CNN: distill's reconstruct settings, comma-separated")
    args = parser.parse_args()
    if args.only in (None, "minilm"):
        print(bench_minilm(_floats(args.targets), args.damp, args.fit_sentences, args.configs.split(","), args.allocations.split(","),
                           args.minilm_reconstruct.split(",")), flush=True)
        print(flush=True)
    if args.only in (None, "cnn"):
        settings = cnn_settings(_floats(args.budgets), _floats(args.macs_targets), args.allocations.split(","))
        print(bench_cnn(settings, args.damp, args.fits.split(","), args.reconstruct.split(",")), flush=True)


if __name__ == "__main__":
    main()
