"""Tuned TVM artifacts against onnxruntime on the same cores, side by side in one run.

For each model (random weights; the shapes are what matter):

* ``resnet18``: a ResNet-18-shaped CNN (BatchNorm kept, folded by optc), 1x3x224x224;
* ``bert``: a BERT-shaped encoder, 4 layers, hidden 256, 4 heads, FFN 1024,
  sequence 128 (``benchmarks/ir_scale.py``'s builder: torch-export-style
  Shape/Reshape chains that optc folds once the input shape is frozen),

the script runs ``optc compile MODEL --target x86 --tune-trials N --tuning-db DB``
as a user would (a subprocess, so the wall time includes start-up) and reports

* ``tune``: wall time of that first compile, tuning included (goal <= 15 min for ResNet-18);
* ``recompile``: wall time of the same compile again into a new folder, every
  task found in the database (goal <= 30 s);
* ``tvm ms`` / ``ort ms``: median latency, batch 1, of the tuned artifact and of
  onnxruntime (default session, all cores) on the same model.onnx and inputs,
  timed in alternating blocks (TVM, onnxruntime, TVM, ...) so that load from
  other users of the machine hits both; the lowest block median counts;
* ``ratio``: tvm / ort (goal <= 0.9, i.e. faster than onnxruntime);
* ``untuned ms`` (with ``--untuned``): the same model compiled with an empty database;
* ``no-prepack ms`` (with ``--compare-prepack``): tuned with ``--no-weight-prepack`` (its
  own database, same trials), timed in the same alternating blocks;
* ``max |Δ|``: tuned artifact vs onnxruntime on the benchmark inputs.

int8 against fp32 artifacts is measured by ``benchmarks/int8_vs_fp32.py``.

    python benchmarks/targets_vs_ort.py [--trials 16] [--models resnet18,bert] [--db DIR]
                                        [--untuned] [--compare-prepack] [--blocks 5] [--runs 10] [--json OUT.json]

With no ``--db`` a fresh database in a temporary folder is used, so the tuning
time is that of a cold start.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- models

def resnet18(path: Path, seed: int = 0) -> dict[str, str]:
    """ResNet-18 layout (torchvision's), random He-scaled weights; returns --input-shape values."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    counter = iter(range(10_000))

    def name(kind: str) -> str:
        return f"{kind}_{next(counter)}"

    def init(array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(array.astype(np.float32), name("w")))
        return inits[-1].name

    def node(op: str, inputs: list[str], **attrs) -> str:
        out = name(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv_bn(x: str, cin: int, cout: int, k: int, stride: int, relu: bool) -> str:
        w = init(rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)))
        y = node("Conv", [x, w], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4)
        bn = [init(1 + 0.1 * rng.standard_normal(cout)), init(0.1 * rng.standard_normal(cout)),
              init(0.1 * rng.standard_normal(cout)), init(1 + 0.1 * rng.random(cout))]
        y = node("BatchNormalization", [y, *bn], epsilon=1e-5)
        return node("Relu", [y]) if relu else y

    x = conv_bn("input", 3, 64, 7, 2, True)
    x = node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            y = conv_bn(x, cin, cout, 3, stride, True)
            y = conv_bn(y, cout, cout, 3, 1, False)
            shortcut = conv_bn(x, cin, cout, 1, stride, False) if stride != 1 or cin != cout else x
            x = node("Relu", [node("Add", [y, shortcut])])
            cin = cout
    x = node("Flatten", [node("GlobalAveragePool", [x])], axis=1)
    w = init(rng.standard_normal((1000, 512)) * 0.03)
    b = init(0.01 * rng.standard_normal(1000))
    nodes.append(helper.make_node("Gemm", [x, w, b], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "resnet18", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="optc-bench")
    model.ir_version = 8
    onnx.save_model(model, str(path))
    return {"input": "1x3x224x224"}


def bert(path: Path) -> dict[str, str]:
    spec = importlib.util.spec_from_file_location("optc_bench_ir_scale", ROOT / "ir_scale.py")
    ir_scale = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = ir_scale
    spec.loader.exec_module(ir_scale)
    ir_scale.build_bert(ir_scale.Config(name="bert-4x256", layers=4, hidden=256, heads=4, ffn=1024), path)
    return {"input_ids": f"1x{ir_scale.SEQ}"}


MODELS: dict[str, Callable[[Path], dict[str, str]]] = {"resnet18": resnet18, "bert": bert}


# --------------------------------------------------------------------------- measuring

def optc_compile(model: Path, out: Path, shapes: dict[str, str], trials: int, db: Path, *extra: str) -> tuple[float, dict]:
    """``optc compile`` in a subprocess; returns (wall seconds, report.json)."""
    cmd = [sys.executable, "-m", "optc.cli.main", "compile", str(model), "-o", str(out), "--target", "x86",
           "--tune-trials", str(trials), "--tuning-db", str(db), "--no-latency", *extra]
    for name, shape in shapes.items():
        cmd += ["--input-shape", f"{name}={shape}"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"optc compile {model.name} failed: {done.stderr.strip().splitlines()[-1:]}")
    return wall, json.loads((out / "report.json").read_text())


def alternate(fns: dict[str, Callable[[], object]], blocks: int, runs: int) -> dict[str, float]:
    """Lowest block median (ms) per function, ``blocks`` blocks of ``runs`` runs taken in turn."""
    from optc.targets.compare import in_turns

    return in_turns(fns, budget_s=0, max_runs=runs, min_blocks=blocks, fixed_runs=True)[0]


def bench_model(key: str, work: Path, db: Path, trials: int, untuned: bool, blocks: int, runs: int, compare_prepack: bool = False) -> dict:
    from optc.ir.io import load_model
    from optc.ir.session import make_session, sample_feeds
    from optc.targets.artifact import load_artifact

    src = work / f"{key}.onnx"
    shapes = MODELS[key](src)
    print(f"[{key}] compiling with {trials} trials per task (database {db}) ...", flush=True)
    tune_s, report = optc_compile(src, work / f"{key}-tuned", shapes, trials, db)
    tuning = report["target"]["tuning"]
    print(f"[{key}] tuned {len(tuning['tuned'])}/{tuning['tasks']} tasks in {tune_s:.0f} s; recompiling from the database ...", flush=True)
    recompile_s, again = optc_compile(src, work / f"{key}-again", shapes, trials, db)
    reused = len(again["target"]["tuning"]["reused_from_db"])

    folder = work / f"{key}-tuned"
    model = load_model(folder / "model.onnx")
    feeds = sample_feeds(model, seed=1)
    artifact = load_artifact(folder)
    session = make_session(model)
    names = [s["name"] for s in artifact.manifest["outputs"]]
    got, ref = artifact.run(feeds), dict(zip(names, session.run(names, feeds)))
    diff = max(float(np.abs(got[n].astype(np.float64) - ref[n]).max()) for n in names)
    fns: dict[str, Callable[[], object]] = {"tvm": lambda: artifact.run(feeds), "ort": lambda: session.run(names, feeds)}
    result = {"model": key, "trials_per_task": trials, "tasks": tuning["tasks"], "tuned": len(tuning["tuned"]),
              "tune_s": tune_s, "build_s": report["target"]["build_seconds"], "recompile_s": recompile_s,
              "recompile_build_s": again["target"]["build_seconds"], "reused": reused, "max_abs_diff": diff}
    if compare_prepack:
        print(f"[{key}] tuning again with --no-weight-prepack ...", flush=True)
        plain_s, _ = optc_compile(src, work / f"{key}-noprepack", shapes, trials, work / f"{key}-noprepack-db", "--no-weight-prepack")
        result["noprepack_tune_s"] = plain_s
        unpacked = load_artifact(work / f"{key}-noprepack")
        fns["noprepack"] = lambda: unpacked.run(feeds)
    if untuned:
        print(f"[{key}] compiling untuned (empty database) ...", flush=True)
        optc_compile(src, work / f"{key}-untuned", shapes, 0, work / f"{key}-empty-db")
        plain = load_artifact(work / f"{key}-untuned")
        fns["untuned"] = lambda: plain.run(feeds)
    print(f"[{key}] timing ({blocks} blocks of {runs} runs each, alternating) ...", flush=True)
    slow = {"untuned": fns.pop("untuned")} if "untuned" in fns else {}
    times = alternate(fns, blocks, runs)
    if slow:
        times.update(alternate(slow, 1, 3))
    result.update({f"{k}_ms": v for k, v in times.items()})
    result["ratio"] = times["tvm"] / times["ort"]
    print(f"[{key}] " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    return result


def print_table(results: list[dict]) -> None:
    header = f"{'model':9} {'trials':>6} {'tasks':>9} {'tune':>8} {'recompile':>10} {'tvm ms':>8} {'ort ms':>8} {'ratio':>6} {'no-prepack ms':>13} {'untuned ms':>10} {'max |Δ|':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        untuned = f"{r['untuned_ms']:.1f}" if "untuned_ms" in r else "-"
        noprepack = f"{r['noprepack_ms']:.2f}" if "noprepack_ms" in r else "-"
        print(f"{r['model']:9} {r['trials_per_task']:>6} {r['tuned']:>4}/{r['tasks']:<4} {r['tune_s']:>7.0f}s {r['recompile_s']:>9.1f}s "
              f"{r['tvm_ms']:>8.2f} {r['ort_ms']:>8.2f} {r['ratio']:>6.2f} {noprepack:>13} {untuned:>10} {r['max_abs_diff']:>8.1e}")
    print("tune/recompile: wall time of `optc compile` (start-up, passes, build and export included); "
          "recompile reuses every task from the database")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per task (default 16)")
    parser.add_argument("--models", default="resnet18,bert", help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--db", type=Path, help="tuning database (default: a fresh one per run)")
    parser.add_argument("--untuned", action="store_true", help="also time an untuned compile (slow: seconds per run)")
    parser.add_argument("--compare-prepack", action="store_true", help="also tune with --no-weight-prepack and time it alongside")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown or args.trials < 0:
        print(f"error: unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}" if unknown else "error: --trials must be 0 or more", file=sys.stderr)
        return 2
    results = []
    with tempfile.TemporaryDirectory(prefix="optc-targets-bench-") as tmp:
        work = Path(tmp)
        for key in keys:
            db = args.db or work / f"{key}-db"
            results.append(bench_model(key, work, db, args.trials, args.untuned, args.blocks, args.runs, args.compare_prepack))
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
