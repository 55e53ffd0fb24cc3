"""prune-channels benchmark: accuracy / fidelity vs MACs removed, per criterion, with and without refit.

* Sample CNN (``tests/models/sample``): top-1 accuracy on the real MNIST
  ``test.npz`` (1000 images); Grams from ``calib.npz`` (500 images). The
  weight criteria run after fold-batchnorm; ``bn`` runs on the unfolded model
  (it needs the BatchNorm scales) and the pass slices the BatchNorms.
  Latency: onnxruntime, one thread, batch 32, the pruned and the original
  sessions taking turns in blocks (lowest block median,
  :func:`optc.evaluation.interleaved_latency_ms`), so machine noise hits both alike.
* MiniLM sentence model (``.cache/minilm``, made by ``tools/export_minilm.py``):
  FFN width pruned, fitted on ``--fit-sentences`` English sentences
  (:mod:`minilm_text`); mean (min) cosine of the sentence embeddings to the
  original on 100 held-out sentences of that text and on the 48 curated
  export sentences (casual sentences: another kind of text).

Usage::

    python benchmarks/prune.py [--skip-minilm] [--quick] [--fit-sentences 1024]

Not a pytest module: run it directly (CNN about 10 minutes on 2 cores; each
MiniLM row several minutes: its 1536-wide Grams over 1024 sentences).
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from optc.data import LabelledSet
from optc.evaluation import accuracy, interleaved_latency_ms
from optc.ir import load_model
from optc.ir.model import Model
from optc.ir.session import make_session
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"
MINILM = ROOT / ".cache" / "minilm"

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)
CRITERIA = ("l1", "l2", "bn", "activation", "thinet", "forward")
REFITS = ("none", "lstsq", "sequential")


def prune(model: Model, calib: CalibrationSet, fold: bool, **options):
    passes = ([make_pass("fold-batchnorm", {})] if fold else []) + [make_pass("prune-channels", {k: str(v) for k, v in options.items()})]
    return PassManager(passes).run(model, PassContext(calibration=calib))


def run_cnn(quick: bool) -> None:
    model = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", model)
    test = LabelledSet.from_path(SAMPLE / "test.npz", model)
    feeds = test.inputs.take(32)
    base_acc = accuracy(model, test)
    folded = PassManager([make_pass("fold-batchnorm", {})]).run(model, PassContext()).model
    base_macs = PassManager([]).run(folded).final.macs
    print(f"sample CNN (MNIST): fp32 accuracy {base_acc:.2%}, {base_macs / 1e6:.2f} M MACs/sample after BatchNorm folding; round_to=8")
    head = f"{'criterion':<11}{'refit':<11}{'ratio':>6}{'MACs -%':>9}{'params -%':>10}{'acc %':>8}{'delta':>8}{'ms orig':>9}{'ms pruned':>10}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    ratios = (0.3, 0.5) if quick else RATIOS
    for criterion in CRITERIA:
        for reconstruct in REFITS:
            if quick and reconstruct == "lstsq":
                continue
            for ratio in ratios:
                result = prune(model, calib, fold=criterion != "bn", ratio=ratio, criterion=criterion, reconstruct=reconstruct)
                acc = accuracy(result.model, test)
                macs = 1 - result.final.macs / base_macs
                params = 1 - result.final.params / result.initial.params
                ms_orig, ms_new = interleaved_latency_ms([make_session(folded, threads=1), make_session(result.model, threads=1)], feeds) if reconstruct == "sequential" else (float("nan"),) * 2
                print(
                    f"{criterion:<11}{reconstruct:<11}{ratio:>6.2f}{macs * 100:>9.1f}{params * 100:>10.1f}{acc * 100:>8.2f}"
                    f"{(acc - base_acc) * 100:>+8.2f}{ms_orig:>9.3f}{ms_new:>10.3f}{ms_orig / ms_new:>9.2f}",
                    flush=True,
                )


def run_minilm(quick: bool, fit_sentences: int) -> None:
    from minilm_text import text_calibration

    model = load_model(MINILM / "minilm.onnx")
    with np.load(text_calibration(64)) as data:
        text = {k: data[k] for k in data.files}
    with np.load(MINILM / "calib.npz") as data:
        curated = {k: data[k] for k in data.files}
    held = {k: v[-100:] for k, v in text.items()}
    fit = min(fit_sentences, len(text["input_ids"]) - 100)
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "fit.npz", **{k: v[:fit] for k, v in text.items()})
        calib = CalibrationSet.from_path(Path(tmp) / "fit.npz", model)
        output = model.outputs[0].name
        session = make_session(model)
        refs = {"text": session.run([output], held)[0], "curated": session.run([output], curated)[0]}
        tokens = int(text["attention_mask"][:fit].sum())
        print(f"\nMiniLM: FFN width pruned (6 groups of 1536), fit on {fit} English sentences ({tokens:,} real tokens); "
              "mean (min) cosine to the original embeddings")
        head = f"{'criterion':<11}{'refit':<11}{'ratio':>6}{'params -%':>10}{'MACs -%':>9}{'held-out text':>16}{'curated':>16}{'pass s':>8}"
        print(head)
        print("-" * len(head))
        configs = [("thinet", "none"), ("thinet", "lstsq"), ("forward", "lstsq")] + ([] if quick else [("l2", "lstsq"), ("forward", "sequential")])
        for criterion, reconstruct in configs:
            for ratio in (0.3,) if quick else (0.3, 0.5):
                start = time.perf_counter()
                result = prune(model, calib, fold=False, ratio=ratio, criterion=criterion, reconstruct=reconstruct, max_batches=10_000)
                seconds = time.perf_counter() - start
                pruned = make_session(result.model)
                cells = []
                for name, feeds in (("text", held), ("curated", curated)):
                    got, ref = pruned.run([output], feeds)[0], refs[name]
                    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1))
                    cells.append(f"{cos.mean():.4f} ({cos.min():.3f})")
                print(
                    f"{criterion:<11}{reconstruct:<11}{ratio:>6.2f}{(1 - result.final.params / result.initial.params) * 100:>10.1f}"
                    f"{(1 - result.final.macs / result.initial.macs) * 100:>9.1f}{cells[0]:>16}{cells[1]:>16}{seconds:>8.0f}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer ratios and configurations")
    parser.add_argument("--fit-sentences", type=int, default=1024, help="MiniLM: English sentences the refit is fitted on")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    run_cnn(args.quick)
    if not args.skip_minilm and (MINILM / "minilm.onnx").exists():
        run_minilm(args.quick, args.fit_sentences)


if __name__ == "__main__":
    main()
