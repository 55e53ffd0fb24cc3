"""Sparsify benchmark: accuracy / fidelity vs sparsity, magnitude vs OBS, per pattern and allocation, bytes on disk.

* Sample CNN (``tests/models/sample``): top-1 accuracy on the real MNIST
  ``test.npz`` (1000 images), Hessians from ``calib.npz`` (500 images).
* MiniLM sentence model (``.cache/minilm``): Hessians from ``--fit-sentences``
  English sentences (``benchmarks/minilm_text.py``; padded tokens are dropped
  by the calibration set's attention mask), mean per-sentence cosine between
  the sparsified and original embeddings on 256 held-out sentences of the same
  text and on the 48 curated export sentences (other text entirely).

The layers' input Grams depend on the model and calibration set only, so they
are computed once per model and shared by every configuration
(:meth:`Sparsify.run_with_grams`); MiniLM's are cached in
``.cache/minilm/grams_fit{N}.npz`` (minutes to stream). The time column is the
pass without them. ``MB file`` is the saved ``model.onnx`` with the default
``storage=packed`` (nonzeros + bitmask, see ``passes/sparsify_storage.py``); the
dense file is on the first row. Latency is not reported: onnxruntime folds the
packed weights back to dense ones at session start and has no zero-skipping
kernels for these ops, so the gain is size only.

Usage::

    python benchmarks/sparsify.py [--only cnn|minilm] [--fit-sentences 1024] [--minilm-configs quick|staged|full]

``stages`` > 1 fits later layers on the sparser model's inputs (two calibration
passes per extra stage: about 10 minutes per MiniLM configuration on 2 cores).
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from optc.data import LabelledSet
from optc.evaluation import accuracy
from optc.ir import infer_shapes, load_model, save_model
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.data import CalibrationSet
from optc.passes.layers import InputGram, find_linear_layers, input_grams
from optc.passes.sparsify.sparsify import Sparsify, SparsifyConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_text import MINILM, text_calibration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"
HELD_OUT = 256

# (pattern, sparsity, method, allocation, stages)
CNN_CONFIGS = [
    *[(p, s, m, "uniform", 1) for p, s in [("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.8), ("2:4", 0.5), ("block:4x4", 0.5)] for m in ("magnitude", "obs")],
    *[("unstructured", s, "obs", a, 1) for s in (0.5, 0.7, 0.8) for a in ("sensitivity", "owl")],
    *[("unstructured", s, m, "global", 1) for s in (0.5, 0.7) for m in ("magnitude", "obs")],
    *[(p, s, "obs", a, 4) for p, s, a in [("unstructured", 0.5, "uniform"), ("unstructured", 0.5, "sensitivity"), ("unstructured", 0.7, "sensitivity"), ("2:4", 0.5, "uniform"), ("block:4x4", 0.5, "uniform")]],
]
MINILM_CONFIGS = {
    "quick": [
        *[(p, s, m, "uniform", 1) for p, s in [("unstructured", 0.5), ("2:4", 0.5)] for m in ("magnitude", "obs")],
        *[("unstructured", 0.5, m, "global", 1) for m in ("magnitude", "obs")],
        *[("unstructured", 0.5, "obs", a, 1) for a in ("sensitivity", "owl")],
    ],
    "staged": [
        *[(p, s, "obs", a, 6) for p, s, a in [("unstructured", 0.5, "uniform"), ("unstructured", 0.5, "sensitivity"), ("2:4", 0.5, "uniform")]],
    ],
    "full": [
        *[(p, s, m, "uniform", 1) for p, s in [("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("4:8", 0.5), ("block:4x4", 0.5)] for m in ("magnitude", "obs")],
        *[("unstructured", s, "obs", a, 1) for s in (0.5, 0.7) for a in ("sensitivity", "owl")],
    ],
}


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    got = candidate.reshape(len(candidate), -1).astype(np.float64)
    return (ref * got).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))


def file_mb(model: Model) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, Path(tmp) / "model.onnx")
        return sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e6


def sweep(model: Model, grams: dict[str, InputGram], calib: CalibrationSet, configs, scores, max_batches: int) -> list[list[str]]:
    """One row per configuration: level, scores, median layer error, pass time, file size."""
    base = scores(model)
    rows = [["dense", "-", "-", "-", "0.000", *[f"{v:.4f}" for v in base], "-", "-", f"{file_mb(model):.2f}"]]
    print(" | ".join(rows[-1]), flush=True)
    for pattern, level, method, allocation, stages in configs:
        cfg = SparsifyConfig(sparsity=level, pattern=pattern, method=method, allocation=allocation, stages=stages, max_batches=max_batches, measure_bytes=False)
        start = time.perf_counter()
        result = Sparsify(cfg).run_with_grams(model, grams, calib)
        elapsed = time.perf_counter() - start
        errs = [layer["rel_error"] for layer in result.stats["layers"]]
        levels = [layer["sparsity"] for layer in result.stats["layers"]]
        rows.append([
            pattern, method, allocation, str(stages), f"{result.stats['sparsity']:.3f} ({min(levels):.2f}-{max(levels):.2f})",
            *[f"{v:.4f}" for v in scores(result.model)], f"{np.median(errs):.4f}", f"{elapsed:.0f}", f"{file_mb(result.model):.2f}",
        ])
        print(" | ".join(rows[-1]), flush=True)
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def run_cnn() -> str:
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    test = LabelledSet.from_path(SAMPLE / "test.npz", model)
    layers, _ = find_linear_layers(model)
    grams = input_grams(model, calib, layers, max_batches=32)
    rows = sweep(model, grams, calib, CNN_CONFIGS, lambda m: [100 * accuracy(m, test)], max_batches=32)
    rows = [r[:5] + [r[5][:-2]] + r[6:] for r in rows]  # accuracy in % with two decimals
    header = ["pattern", "method", "allocation", "stages", "sparsity (layer range)", "top-1 %", "median layer err", "pass s", "MB file"]
    return ("sample CNN: top-1 on the 1000 test images, Hessians from the 500 calibration images; "
            "goals: 50% unstructured within 0.5 pt, 2:4 within 1 pt\n") + table(header, rows)


def minilm_grams(model: Model, calib: CalibrationSet, fit: int) -> dict[str, InputGram]:
    """The layers' input Grams on the first ``fit`` text sentences, cached on disk."""
    path = MINILM / f"grams_fit{fit}.npz"
    layers, _ = find_linear_layers(model)
    if not path.is_file():
        start = time.perf_counter()
        grams = input_grams(model, calib, layers, max_batches=-(-fit // 16))
        print(f"  input Grams of {len(layers)} layers on {fit} sentences: {time.perf_counter() - start:.0f} s", flush=True)
        arrays = {}
        for node, g in grams.items():
            arrays.update({f"{node}|gram": g.gram, f"{node}|total": g.total, f"{node}|rows": np.array(g.rows)})
        np.savez(path, **arrays)
    data = np.load(path)
    return {l.node: InputGram(data[f"{l.node}|gram"], data[f"{l.node}|total"], int(data[f"{l.node}|rows"])) for l in layers}


def run_minilm(fit: int, configs: str) -> str:
    text = np.load(text_calibration())
    curated = dict(np.load(MINILM / "calib.npz"))
    held = {k: text[k][fit : fit + HELD_OUT] for k in text.files}
    model = load_model(MINILM / "minilm.onnx")
    infer_shapes(model)
    tmp = tempfile.TemporaryDirectory()
    np.savez(Path(tmp.name) / "fit.npz", **{k: text[k][:fit] for k in text.files})
    calib = CalibrationSet.from_path(Path(tmp.name) / "fit.npz", model)
    grams = minilm_grams(model, calib, fit)
    teacher = make_session(model)
    ref_held, ref_cur = teacher.run(None, held)[0], teacher.run(None, curated)[0]

    def scores(m: Model) -> list[float]:
        s = make_session(m)
        h, c = cosines(ref_held, s.run(None, held)[0]), cosines(ref_cur, s.run(None, curated)[0])
        return [h.mean(), h.min(), c.mean()]

    rows = sweep(model, grams, calib, MINILM_CONFIGS[configs], scores, max_batches=-(-fit // 16))
    tmp.cleanup()
    tokens = int(text["attention_mask"][:fit].sum())
    header = ["pattern", "method", "allocation", "stages", "sparsity (layer range)", "held-out cos", "(min)", "curated cos", "median layer err", "pass s", "MB file"]
    return (f"MiniLM: Hessians from {fit} English sentences ({tokens:,} real tokens), cosine to the original embeddings on "
            f"{len(held['input_ids'])} held-out sentences and the {len(curated['input_ids'])} curated ones; "
            "goals: 50% unstructured >= 0.99, 2:4 >= 0.98\n") + table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["cnn", "minilm"])
    parser.add_argument("--fit-sentences", type=int, default=1024)
    parser.add_argument("--minilm-configs", choices=sorted(MINILM_CONFIGS), default="quick")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.only in (None, "cnn"):
        print(run_cnn(), flush=True)
    if args.only in (None, "minilm") and (MINILM / "minilm.onnx").exists():
        print(run_minilm(args.fit_sentences, args.minilm_configs), flush=True)


if __name__ == "__main__":
    main()
