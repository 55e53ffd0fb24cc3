"""Sparsify benchmark: accuracy / fidelity vs sparsity, magnitude vs OBS, per pattern.

* Sample CNN (``tests/models/sample``): top-1 accuracy on the real MNIST
  ``test.npz`` (1000 images), Hessians from ``calib.npz`` (500 images).
* MiniLM sentence model (``.cache/minilm``): mean per-sentence cosine between
  the sparsified and original embeddings on the 48 ``calib.npz`` sentences
  (the same sentences give the Hessians: an in-sample fidelity).

The layers' input Grams depend on the model and calibration set only, so they
are computed once per model and shared by every configuration
(:meth:`Sparsify.run_with_grams`); the time column is the pass without them.
Storage columns: raw weight bytes (dense ONNX, unchanged by sparsity) and the
zlib-compressed weight bytes, both in MB. Latency is not reported: the weights
stay dense and onnxruntime has no zero-skipping kernels for these ops.

Usage::

    python benchmarks/sparsify.py [--full] [--skip-minilm]

Not a pytest module: run it directly. ``--full`` adds 70 % and block:4x4 on
MiniLM (about 5 more minutes on 2 cores).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from optc.evaluation import LabelledSet, accuracy
from optc.ir import load_model
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.passes import CalibrationSet
from optc.passes.layers import find_linear_layers, input_grams
from optc.passes.sparsify import Sparsify, SparsifyConfig

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"
MINILM = ROOT / ".cache" / "minilm"

# (pattern, sparsity): N:M fixes its own level.
SWEEP = [("unstructured", 0.3), ("unstructured", 0.5), ("unstructured", 0.7), ("2:4", 0.5), ("block:4x4", 0.5)]
MINILM_QUICK = [("unstructured", 0.3), ("unstructured", 0.5), ("2:4", 0.5)]


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    got = candidate.reshape(len(candidate), -1).astype(np.float64)
    cos = (ref * got).sum(axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return float(cos.mean())


def sweep(model: Model, calib: CalibrationSet, configs, score, score_name: str, measure_bytes: bool) -> list[dict]:
    layers, _ = find_linear_layers(model)
    start = time.perf_counter()
    grams = input_grams(model, calib, layers, max_batches=32)
    print(f"  input Grams of {len(layers)} layers: {time.perf_counter() - start:.1f} s")
    base = score(model)
    rows = [{"pattern": "dense", "method": "-", "sparsity": 0.0, score_name: base, "delta": 0.0, "err": 0.0, "time": 0.0}]
    for pattern, level in configs:
        for method in ("magnitude", "obs"):
            cfg = SparsifyConfig(sparsity=level, pattern=pattern, method=method, measure_bytes=measure_bytes)
            start = time.perf_counter()
            result = Sparsify(cfg).run_with_grams(model, grams)
            elapsed = time.perf_counter() - start
            value = score(result.model)
            errs = [layer["rel_error"] for layer in result.stats["layers"]]
            rows.append({
                "pattern": pattern, "method": method, "sparsity": result.stats["sparsity"], score_name: value,
                "delta": value - base, "err": float(np.median(errs)), "time": elapsed,
                "mb_dense": result.stats["bytes_dense"] / 1e6,
                "mb_zlib_before": result.stats.get("bytes_compressed_before", float("nan")) / 1e6,
                "mb_zlib": result.stats.get("bytes_compressed", float("nan")) / 1e6,
            })
    return rows


def print_table(title: str, rows: list[dict], score_name: str, scale: float, unit: str) -> None:
    print(f"\n{title}")
    head = f"{'pattern':<13}{'method':<10}{'sparsity':>9}{score_name:>10}{'delta':>9}{'med err':>9}{'pass s':>8}{'MB dense':>10}{'MB zlib':>9}{'zlib dense':>11}"
    print(head)
    print("-" * len(head))
    for r in rows:
        size = f"{r['mb_dense']:>10.3f}{r['mb_zlib']:>9.3f}{r['mb_zlib_before']:>11.3f}" if "mb_dense" in r else ""
        print(
            f"{r['pattern']:<13}{r['method']:<10}{r['sparsity']:>9.3f}{r[score_name] * scale:>10.{unit}f}"
            f"{r['delta'] * scale:>+9.{unit}f}{r['err']:>9.4f}{r['time']:>8.1f}{size}"
        )


def run_cnn() -> None:
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    test = LabelledSet.from_path(SAMPLE / "test.npz", model)
    print("sample CNN (MNIST)")
    rows = sweep(model, calib, SWEEP, lambda m: accuracy(m, test), "acc %", measure_bytes=True)
    print_table("sample CNN: top-1 accuracy (%) on test.npz; goals: 50% unstructured OBS within 0.5 pt, 2:4 within 1 pt", rows, "acc %", 100, "2")


def run_minilm(full: bool) -> None:
    model = load_model(MINILM / "minilm.onnx")
    calib = CalibrationSet.from_path(MINILM / "calib.npz", model)
    feed = calib.take(calib.num_samples)
    output = model.outputs[0].name
    reference = make_session(model).run([output], feed)[0]

    def score(m: Model) -> float:
        return mean_cosine(reference, make_session(m).run([output], feed)[0])

    print("\nMiniLM sentence embeddings")
    configs = SWEEP if full else MINILM_QUICK
    rows = sweep(model, calib, configs, score, "cosine", measure_bytes=False)
    # One compressed-size measurement (90 MB of weights: seconds of zlib per model).
    cfg = SparsifyConfig(pattern="2:4", method="magnitude", measure_bytes=True)
    stats = Sparsify(cfg).run_with_grams(model, input_grams(model, calib, Sparsify(cfg).select_layers(model)[0], max_batches=1)).stats
    print_table("MiniLM: mean cosine to the original embeddings; goals: 50% unstructured OBS >= 0.99, 2:4 >= 0.98", rows, "cosine", 1, "4")
    print(
        f"MiniLM 2:4 storage: weights {stats['bytes_dense'] / 1e6:.1f} MB dense (unchanged), zlib {stats['bytes_compressed_before'] / 1e6:.1f} MB -> "
        f"{stats['bytes_compressed'] / 1e6:.1f} MB; COO sparse initializers (int64 indices) would be {stats['bytes_coo_estimate'] / 1e6:.1f} MB, "
        f"bitmap+values {stats['bytes_bitmap_estimate'] / 1e6:.1f} MB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole sweep on MiniLM too")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_cnn()
    if not args.skip_minilm and (MINILM / "minilm.onnx").exists():
        run_minilm(args.full)


if __name__ == "__main__":
    main()
