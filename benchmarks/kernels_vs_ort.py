"""The default x86 artifact (kernel providers chosen by measurement) against onnxruntime, at 1 and 2 threads.

Models: ``resnet18`` and ``bert`` (``targets_vs_ort.py``'s builders, random weights), and
``sample`` (the bundled MNIST CNN). For each, ``optc compile MODEL --target x86`` runs as a
user would, with no tuning flags:

* ``cold``: wall time with an empty tuning database (providers measured);
* ``warm``: the same compile again (choices read from ``providers.json``);
* for each thread count N, in a fresh process with ``TVM_NUM_THREADS=OMP_NUM_THREADS=N`` and
  onnxruntime's ``intra_op_num_threads=N``: median latency of the artifact and of onnxruntime
  on the same inputs, in alternating blocks; the lowest block median counts; ``ratio`` = optc / ort.
  onnxruntime's figure is the faster of a non-spinning session timed in turns with the artifact and
  its default (spinning) session timed alone: the spinning workers would take the artifact's cores.

``--product`` adds the product path on the sample: ``prune-channels`` + ``quantize`` then
``--target x86``, timed against onnxruntime running the *original* fp32 model, at each batch
of ``--product-batch`` (default 1 and 64: at batch 1 the 0.05 ms model is mostly per-call
costs, at 64 mostly its kernels). The passes run at their defaults held to the default
budget on 500 of the test digits drawn at random (``--eval``: one point of top-1, as a user
with labels runs it); accuracy is reported on the other 500, which nothing fitted or chose on.

``--int8`` adds, per model, ``canonicalize`` + ``quantize`` compiled for x86 and timed against
that model's fp32 artifact (and onnxruntime's fp32) in the same blocks.

``--avx2`` measures as on a CPU with AVX2 and FMA but neither AVX-512 nor VNNI (the issue's Zen 3), on this one:
every compile gets ``--cpu haswell`` and oneDNN runs under ``ONEDNN_MAX_CPU_ISA=AVX2``, in the compile's provider
race and in the timings. onnxruntime cannot be held to AVX2 so: its figures stay this CPU's, and only the
int8-over-fp32 ratios are the AVX2 machine's. ``--kernels tvm`` compiles with TVM's kernels only. ``--no-onednn``
compiles as where oneDNN is missing (``OPTC_DISABLE_ONEDNN``): TVM's kernels, and optc's Winograd where it wins.

``--families`` prints, per model (and its int8 build), what each provider gave per op family, from the cold compile's
own race (``op_families.py``).

    python benchmarks/kernels_vs_ort.py [--models resnet18,bert,sample] [--threads 1,2] [--product] [--product-batch 1,64] [--int8] [--avx2] [--kernels tvm] [--no-onednn] [--families]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT.parent / "tests" / "models" / "sample"
sys.path.insert(0, str(ROOT))
# set by main: flags every compile gets, and the environment of compiles and timings
COMPILE_FLAGS: list[str] = []
ENV: dict[str, str] = {}


def build_model(key: str, work: Path) -> tuple[Path, dict[str, str]]:
    import targets_vs_ort as t

    if key == "sample":
        return SAMPLE / "mnist_cnn.onnx", {"input": "1x1x28x28"}
    path = work / f"{key}.onnx"
    return path, t.MODELS[key](path)


def compile_(model: Path, out: Path, shapes: dict[str, str], db: Path, *extra: str) -> float:
    cmd = [sys.executable, "-m", "optc.cli.main", "compile", str(model), "-o", str(out), "--target", "x86",
           "--tuning-db", str(db), "--no-latency", *COMPILE_FLAGS, *extra]
    for name, shape in shapes.items():
        cmd += ["--input-shape", f"{name}={shape}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **ENV})
    if done.returncode != 0:
        raise SystemExit(f"optc compile {model.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def time_child(folder: Path, reference: Path, threads: int, blocks: int, runs: int, other: Path | None = None) -> dict:
    """Runs in a fresh process: thread counts are read once, when the runtimes start.
    ``other``: a second artifact (the fp32 one, for int8 rows) timed in the same blocks."""
    from optc.ir.io import load_model
    from optc.ir.session import make_session, sample_feeds
    from optc.targets.artifact import load_artifact
    from targets_vs_ort import alternate

    artifact = load_artifact(folder)
    feeds = sample_feeds(load_model(folder / "model.onnx"), seed=1)
    original = load_model(reference)

    # As optc.targets.compare.versus_onnxruntime: onnxruntime's spinning workers would take the artifact's
    # cores, so the artifact runs in turns with a sleeping session and the default one is timed on its own.
    quiet = make_session(original, threads=threads, spinning=False)
    fns = {"optc": lambda: artifact.run(feeds), "ort": lambda: quiet.run(None, feeds)}
    if other is not None:
        second = load_artifact(other)
        fns["fp32"] = lambda: second.run(feeds)
    times = alternate(fns, blocks, runs)
    default = make_session(original, threads=threads)
    spinning = alternate({"ort": lambda: default.run(None, feeds)}, blocks, runs)["ort"]
    return {**times, "ort_quiet": times["ort"], "ort_spinning": spinning, "ort": min(times["ort"], spinning), "load": os.getloadavg()[0]}


def timed(folder: Path, reference: Path, threads: int, blocks: int, runs: int, other: Path | None = None) -> dict:
    env = {**os.environ, **ENV, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", str(folder), str(reference), str(threads), str(blocks), str(runs), str(other or "")]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"timing {folder.name} at {threads} threads failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def accuracy(run, data: dict[str, np.ndarray], batch: int = 1) -> float:
    """Top-1 on ``data``, ``batch`` images per run (the last run padded with zeros, their predictions dropped)."""
    preds = []
    for start in range(0, len(data["input"]), batch):
        x = data["input"][start:start + batch]
        padded = np.concatenate([x, np.zeros((batch - len(x), *x.shape[1:]), x.dtype)]) if len(x) < batch else x
        preds.extend(np.argmax(run({"input": padded}), axis=-1)[:len(x)].tolist())
    return float(np.mean(np.asarray(preds) == data["label"]))


def product(work: Path, threads: list[int], blocks: int, runs: int, batches: list[int]) -> list[dict]:
    import onnxruntime as ort
    from optc.targets.artifact import load_artifact

    everything = dict(np.load(SAMPLE / "test.npz"))
    # a random half: the file's first and second halves differ (the original scores 97.0 % and 99.0 % on them)
    order = np.random.default_rng(7).permutation(len(everything["label"]))
    half = len(order) // 2
    np.savez(work / "budget.npz", input=everything["input"][order[:half]], label=everything["label"][order[:half]])
    test = {k: v[order[half:]] for k, v in everything.items()}  # held out from the budget too
    session = ort.InferenceSession(str(SAMPLE / "mnist_cnn.onnx"), providers=["CPUExecutionProvider"])
    acc_ort = accuracy(lambda f: session.run(None, f)[0], test)
    rows = []
    for batch in batches:
        out = work / f"product-{batch}"
        cmd = [sys.executable, "-m", "optc.cli.main", "compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out),
               "--pass", "canonicalize", "--pass", "prune-channels", "--pass", "quantize", "--calib", str(SAMPLE / "calib.npz"),
               "--eval", str(work / "budget.npz"), "--input-shape", f"input={batch}x1x28x28", "--target", "x86", "--no-latency",
               "--tuning-db", str(work / "product-db"), *COMPILE_FLAGS]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, env={**os.environ, **ENV})
        if done.returncode != 0:
            raise SystemExit(f"product compile failed: {done.stderr.strip().splitlines()[-1:]}")
        artifact = load_artifact(out)
        acc_optc = accuracy(lambda f: next(iter(artifact.run(f).values())), test, batch)
        report = json.loads((out / "report.json").read_text())
        macs_cut = 1 - report["after"]["macs"] / report["before"]["macs"]
        for n in threads:
            t = timed(out, SAMPLE / "mnist_cnn.onnx", n, blocks, runs)
            rows.append({"model": f"sample b{batch}: prune+int8 vs fp32 ort", "threads": n, **t, "ratio": t["optc"] / t["ort"],
                         "acc_optc": acc_optc, "acc_ort": acc_ort, "samples": len(test["label"]), "macs_cut": macs_cut})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def int8_rows(key: str, model: Path, shapes: dict[str, str], work: Path, threads: list[int], blocks: int, runs: int) -> list[dict]:
    """``canonicalize`` + ``quantize`` then x86; timed against the fp32 artifact (``{key}-b``) in the same blocks.
    Calibration: the sample's own data; random normal inputs for the random-weight models (speed only)."""
    if key == "sample":
        calib = SAMPLE / "calib.npz"
    else:
        from optc.ir.io import load_model
        from optc.ir.session import sample_feeds

        fp32 = load_model(work / f"{key}-b" / "model.onnx")
        feeds = [sample_feeds(fp32, seed=s) for s in range(16)]
        calib = work / f"{key}-calib.npz"
        np.savez(calib, **{name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]})
    compile_(model, work / f"{key}-int8", shapes, work / f"{key}-db", "--pass", "canonicalize", "--pass", "quantize", "--calib", str(calib))
    out = []
    for n in threads:
        t = timed(work / f"{key}-int8", work / f"{key}-b" / "model.onnx", n, blocks, runs, other=work / f"{key}-b")
        out.append({"model": f"{key} int8 (vs fp32 artifact)", "threads": n, **t, "ratio": t["optc"] / t["ort"],
                    "int8_speedup": t["fp32"] / t["optc"]})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        folder, reference, threads, blocks, runs, other = sys.argv[2:8]
        print(json.dumps(time_child(Path(folder), Path(reference), int(threads), int(blocks), int(runs), Path(other) if other else None)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18,bert,sample")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--product", action="store_true")
    parser.add_argument("--product-batch", default="1,64", help="batches the product path is compiled and timed at")
    parser.add_argument("--int8", action="store_true", help="also quantize each model and time its int8 artifact against the fp32 one")
    parser.add_argument("--avx2", action="store_true", help="compile and run as on an AVX2 CPU without AVX-512 or VNNI")
    parser.add_argument("--kernels", choices=("auto", "tvm", "onednn"), default="auto")
    parser.add_argument("--no-onednn", action="store_true", help="compile as without oneDNN (OPTC_DISABLE_ONEDNN)")
    parser.add_argument("--families", action="store_true", help="also print what each provider gave per op family (op_families.py)")
    args = parser.parse_args(argv)
    if args.no_onednn:
        ENV.update(OPTC_DISABLE_ONEDNN="1")
    if args.avx2:
        COMPILE_FLAGS.extend(["--cpu", "haswell"])
        ENV.update(ONEDNN_MAX_CPU_ISA="AVX2", DNNL_MAX_CPU_ISA="AVX2")
    if args.kernels != "auto":
        COMPILE_FLAGS.extend(["--kernels", args.kernels])
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="optc-kernels-bench-") as tmp:
        work = Path(tmp)
        for key in args.models.split(","):
            model, shapes = build_model(key, work)
            db = work / f"{key}-db"
            cold = compile_(model, work / f"{key}-a", shapes, db)
            warm = compile_(model, work / f"{key}-b", shapes, db)
            providers = json.loads((work / f"{key}-b" / "report.json").read_text())["target"]["tuning"]["providers"]
            for n in threads:
                t = timed(work / f"{key}-b", work / f"{key}-b" / "model.onnx", n, args.blocks, args.runs)
                rows.append({"model": key, "threads": n, "cold_s": cold, "warm_s": warm, **t, "ratio": t["optc"] / t["ort"],
                             "offloaded": len(providers["offloaded"]), "chains": providers["chains"],
                             "to": "optc's Winograd" if providers.get("glue") == "winograd" else "oneDNN"})
                print(json.dumps(rows[-1]), flush=True)
            if args.int8:
                rows += int8_rows(key, model, shapes, work, threads, args.blocks, args.runs)
        if args.product:
            rows += product(work, threads, args.blocks, args.runs, [int(b) for b in args.product_batch.split(",")])
        if args.families:
            from op_families import table

            for key in args.models.split(","):
                for name, label in ((f"{key}-a", key), (f"{key}-int8", f"{key} int8")):
                    if (work / name / "report.json").is_file():
                        print("\n" + table(label, json.loads((work / name / "report.json").read_text())["target"]["tuning"]["providers"]))
    print(f"\n{'model':32} {'thr':>3} {'cold':>6} {'warm':>6} {'optc ms':>8} {'ort ms':>8} {'ratio':>6} {'load':>5}  notes")
    for r in rows:
        if "chains" in r:
            notes = f"{r['offloaded']}/{r['chains']} chains to {r['to']}"
        elif "int8_speedup" in r:
            notes = f"fp32 artifact {r['fp32']:.2f} ms: int8 x{r['int8_speedup']:.2f} faster"
        else:
            notes = f"top-1 {100 * r['acc_optc']:.2f}% vs {100 * r['acc_ort']:.2f}% ({r['samples']} held-out test images), MACs -{r['macs_cut']:.0%}"
        cold = f"{r['cold_s']:.0f}s" if "cold_s" in r else "-"
        warm = f"{r['warm_s']:.0f}s" if "warm_s" in r else "-"
        print(f"{r['model']:32} {r['threads']:>3} {cold:>6} {warm:>6} {r['optc']:>8.2f} {r['ort']:>8.2f} {r['ratio']:>6.2f} {r['load']:>5.1f}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
