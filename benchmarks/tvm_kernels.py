"""What a target without a vendor library gets (ARM's case), measured on this x86 machine.

An aarch64 board cannot be timed here (qemu-user emulates NEON through per-lane
helpers, so its timings say nothing about a board). The ARM path is TVM's
kernels only, so this times that path on x86: each model compiled with
``--kernels tvm`` twice,

* ``untiled``: TVM's untuned lowering in NCHW, as every op compiled before optc's
  tiled kernels (the child process switches them off: a benchmark's own patch, no
  option of the product);
* ``tiled``: optc's register-tiled kernels for convolutions and dense layers, in NHWC;

and both artifacts timed in alternating blocks in one process with onnxruntime
(a non-spinning session, as targets/compare.py does), at the thread count asked.
The code LLVM emits for aarch64 comes from the same schedules with 4-lane vectors.

    python benchmarks/tvm_kernels.py [--models resnet18,bert,sample] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))


def compile_child(model: str, out: str, db: str, shapes: str, tiled: str) -> None:
    """In a fresh process: ``optc compile --kernels tvm``, with the tiled kernels switched off unless ``tiled``."""
    from click.testing import CliRunner

    from optc.cli.main import cli

    if tiled != "1":
        import optc.targets.cpu_schedule as schedule
        import optc.targets.providers.select as select

        schedule.tile = lambda sch, target: False
        select.to_nhwc = lambda mod, target, report: mod
    args = ["compile", model, "-o", out, "--target", "x86", "--kernels", "tvm", "--no-latency", "--tuning-db", db]
    for shape in filter(None, shapes.split(",")):
        args += ["--input-shape", shape]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    if res.exit_code != 0:
        raise SystemExit(res.output)


def time_child(untiled: str, tiled: str, threads: str) -> None:
    from optc.ir.io import load_model
    from optc.ir.session import make_session, sample_feeds
    from optc.targets.artifact import load_artifact
    from optc.targets.compare import in_turns

    model = load_model(Path(tiled) / "model.onnx")
    feeds = sample_feeds(model, seed=1)
    a, b = load_artifact(Path(untiled)), load_artifact(Path(tiled))
    ort = make_session(model, threads=int(threads), spinning=False)
    times, blocks = in_turns({"untiled": lambda: a.run(feeds), "tiled": lambda: b.run(feeds), "ort": lambda: ort.run(None, feeds)},
                             budget_s=20.0)
    print(json.dumps({**times, "blocks": blocks, "load": os.getloadavg()[0]}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,bert,sample")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from kernels_vs_ort import build_model

    env = {**os.environ, "TVM_NUM_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)}
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs, {args.threads} threads")
    print("| model | untiled ms | tiled ms | onnxruntime ms | tiled / untiled | tiled / onnxruntime | blocks |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for key in args.models.split(","):
            model, shapes = build_model(key, work)
            spec = ",".join(f"{k}={v}" for k, v in shapes.items())
            folders = {}
            for tiled in ("0", "1"):
                out = work / f"{key}-{tiled}"
                subprocess.run([sys.executable, __file__, "--compile", str(model), str(out), str(work / f"db{tiled}"), spec, tiled],
                               check=True, capture_output=True, text=True, env=env)
                folders[tiled] = out
            done = subprocess.run([sys.executable, __file__, "--time", str(folders["0"]), str(folders["1"]), str(args.threads)],
                                  check=True, capture_output=True, text=True, env=env)
            t = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {key} | {t['untiled']:.3f} | {t['tiled']:.3f} | {t['ort']:.3f} | x{t['tiled'] / t['untiled']:.3f} | "
                  f"x{t['tiled'] / t['ort']:.2f} | {t['blocks']} |", flush=True)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--compile":
        compile_child(*sys.argv[2:7])
    elif len(sys.argv) > 1 and sys.argv[1] == "--time":
        time_child(*sys.argv[2:5])
    else:
        sys.exit(main())
