"""Whole-process stalls: start many fresh processes that each load an artifact and time it.

Issue 14: on a shared 2-core machine, an occasional process ran the MNIST sample at 40-150 ms
per inference instead of 0.1 ms, for most of its life. The cause (perf: both threads inside
libgomp's spin loop; few voluntary context switches): the scheduler had left oneDNN's two
OpenMP threads on one core (the other core busy), so each parallel region waited out the
other thread's spin, about 1-3 ms at ``GOMP_SPINCOUNT=100000``, several times per inference.
It only shows over many fresh processes and runs, so this script starts ``--procs`` processes
per artifact and setting, taken in turns (process 1 of every row, then process 2, ...) so that
a change in the machine's load hits every row alike. Each child is the C++ runner
(``python -m optc.targets.deploy.build_runner`` builds it; ``--python`` for the Python runner's
load path instead), which applies ``runtime.env`` where the setting has not set a variable,
runs the artifact ``--warmup`` times, then times ``--runs`` runs.

Per row: processes stalled (median over ``--stall-factor`` x the median of all the artifact's
processes), the median of the other processes' medians and of the stalled ones', the share of
single runs over that limit, and the mean of every run. ``--busy K`` keeps K busy-loop
processes running meanwhile (a machine busier than it already is).

    python benchmarks/process_stalls.py ARTIFACT [ARTIFACT...] [--procs 30] [--busy 1] [--runs 1000]
        [--setting NAME:VAR=VALUE,VAR=VALUE ...]

Without ``--setting``: ``manifest`` (the artifact's ``runtime.env`` alone) and single changes
to it. A setting's variables are set before the child starts (``--setting manifest:`` sets
none). Measured 2026-11-30 (2 vCPUs, load average 6-11, MNIST sample, 20 processes per row,
2000 runs each): before the glue ran small oneDNN calls on one thread, ``manifest`` had
7-12 % slow runs (mean 4.7-6.1 ms against a 0.08-0.11 ms median), and no environment setting
cured it without a worse median (``OMP_PROC_BIND=true`` mean 1.8 ms; ``OMP_WAIT_POLICY=PASSIVE``
median 0.18-0.34 ms; ``GOMP_SPINCOUNT=1000`` 0.45 ms; ``GOMP_SPINCOUNT=10000`` stalled 16/20).
After (60 processes per row, 1000 runs, ``--busy 1``, load 6.6-9.4), same model before -> after:
stalled 1/60 (80 ms) -> 0/60, slow runs 10.0 % -> 3.1 %, mean 6.6 -> 0.38 ms, median of
the others 0.110 -> 0.116 ms; its int8 build: 0/60 -> 0/60, 14 % -> 3.9 %, mean 2.1 -> 0.47 ms
(the int8 "before" build kept every chain in TVM: its compile-time measurement had timed
oneDNN during a stall, 9-12 ms per convolution).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# A setting: (name, variables set in the child's environment before it starts).
DEFAULT_SETTINGS = [
    ("manifest", {}),
    ("OMP_NUM_THREADS=1", {"OMP_NUM_THREADS": "1"}),
    ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("OMP_PROC_BIND=true", {"OMP_PROC_BIND": "true"}),
    ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"}),
]
# Variables a caller's shell may have set that would blur the comparison: cleared for every child.
THREAD_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OMP_PROC_BIND", "OMP_PLACES", "GOMP_SPINCOUNT", "OMP_DYNAMIC",
               "TVM_NUM_THREADS", "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT", "DNNL_MAX_CPU_ISA")


def child(artifact: Path, warmup: int, runs: int) -> None:
    """One process: load, warm up, time; print one JSON line."""
    from optc.targets.deploy import run_artifact as ra

    start = time.perf_counter()
    manifest = ra.read_manifest(artifact)
    ra.apply_env((manifest.get("runtime") or {}).get("env") or {})
    vm, device = ra.load_vm(artifact, manifest)
    import tvm

    rng = np.random.default_rng(0)
    args = [tvm.runtime.tensor(rng.standard_normal(spec["shape"]).astype(spec["dtype"]), device) for spec in manifest["inputs"]]
    main_fn = vm["main"]
    loaded = time.perf_counter()
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        main_fn(*args)
        device.sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    threads = []
    for task in sorted(Path("/proc/self/task").iterdir()):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
            threads.append({"tid": int(task.name), "utime": int(fields[11]), "stime": int(fields[12]),
                            "cpus": status.get("Cpus_allowed_list", "").strip(),
                            "vcsw": int(status.get("voluntary_ctxt_switches", 0)),
                            "ivcsw": int(status.get("nonvoluntary_ctxt_switches", 0))})
        except (OSError, ValueError):
            continue
    print(json.dumps({"median": statistics.median(times), "min": min(times), "p90": float(np.percentile(times, 90)),
                      "load_s": loaded - start, "threads": threads, "times": times,
                      "env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ}}))


def parse_setting(text: str) -> tuple[str, dict[str, str]]:
    """``NAME:VAR=VALUE,...``, or ``VAR=VALUE,...`` named after itself."""
    name, colon, body = text.partition(":")
    if not colon or "=" in name:
        name, body = text, text
    env = {}
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--setting {text}: expected NAME:VAR=VALUE,...")
        env[key.strip()] = value.strip()
    return name, env


def start_busy(k: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(k)]


def runner_inputs(artifact: Path, work: Path) -> list[str]:
    """``--input NAME=FILE.npy`` items for the C++ runner: the manifest's inputs, random (seed 0)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    items = []
    for i, spec in enumerate(manifest["inputs"]):
        path = work / f"{artifact.name}-{i}.npy"
        np.save(path, rng.standard_normal(spec["shape"]).astype(spec["dtype"]))
        items += ["--input", f"{spec['name']}={path}"]
    return items


def run_one(artifact: Path, env_over: dict[str, str], args: argparse.Namespace, inputs: list[str]) -> dict:
    """One fresh process: the C++ runner when ``args.runner`` is set, else :func:`child` in Python."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(env_over)
    if args.runner:
        cmd = [str(args.runner), str(artifact), *inputs, "--repeats", str(args.warmup + args.runs), "--output-dir", str(args.work)]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(artifact), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"median": float("inf"), "error": "timeout"}
    if done.returncode != 0:
        return {"median": float("nan"), "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    if not args.runner:
        return json.loads(done.stdout.strip().splitlines()[-1])
    times = [float(line.split()[1]) for line in done.stdout.splitlines() if line.startswith("run_ms ")][args.warmup:]
    return {"median": statistics.median(times), "min": min(times), "p90": float(np.percentile(times, 90)), "times": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", nargs="*", type=Path)
    parser.add_argument("--procs", type=int, default=30, help="fresh processes per setting and artifact")
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--busy", type=int, default=0, help="busy-loop processes kept running meanwhile")
    parser.add_argument("--setting", action="append", default=[], help="NAME:VAR=VALUE,VAR=VALUE (repeatable)")
    parser.add_argument("--stall-factor", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per child")
    parser.add_argument("--json", type=Path, help="write every process's record here")
    parser.add_argument("--runner", type=Path, help="the C++ runner (default: the one build_runner made, if any)")
    parser.add_argument("--python", action="store_true", help="children in Python (the deployed run_artifact.py path)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.warmup, args.runs)
        return
    if not args.artifacts:
        parser.error("give at least one artifact folder")
    settings = [parse_setting(s) for s in args.setting] or DEFAULT_SETTINGS
    if args.runner is None and not args.python:
        from optc.targets.deploy.build_runner import default_root

        built = default_root() / "optc-runner"
        args.runner = built if built.exists() else None
    args.work = Path(tempfile.mkdtemp(prefix="optc-stalls-"))
    inputs = {a: runner_inputs(a, args.work) if args.runner else [] for a in args.artifacts}
    print(f"children: {args.runner or 'python (optc.targets.deploy.run_artifact)'}", file=sys.stderr)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below (busy loops, temp files)
    busy = start_busy(args.busy)
    records: dict[tuple[str, str], list[dict]] = {}
    try:
        load0 = os.getloadavg()[0]
        for i in range(args.procs):
            for artifact in args.artifacts:
                for name, env in settings:
                    rec = run_one(artifact, env, args, inputs[artifact])
                    records.setdefault((artifact.name, name), []).append(rec)
            print(f"  {i + 1}/{args.procs} rounds, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
        load1 = os.getloadavg()[0]
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
        for p in busy:
            p.kill()
            p.wait()
    print(f"load average (1 min) {load0:.2f} at start, {load1:.2f} at end; {args.busy} extra busy-loop processes; "
          f"{args.procs} processes per row, {args.runs} timed runs each")
    for artifact in args.artifacts:
        meds = [r["median"] for (a, _), rs in records.items() if a == artifact.name for r in rs if np.isfinite(r["median"])]
        ref = statistics.median(meds) if meds else float("nan")
        print(f"\n{artifact}  (stall: median > {args.stall_factor:g} x {ref:.3f} ms; slow run: one run over that)")
        print(f"  {'setting':<34} {'stalled':>9} {'median ok':>10} {'median stalled':>15} {'slow runs':>10} {'mean ms':>8} {'errors':>7}")
        for name, _ in settings:
            rs = records[(artifact.name, name)]
            limit = args.stall_factor * ref
            ok = [r["median"] for r in rs if r["median"] <= limit]
            bad = [r["median"] for r in rs if r["median"] > limit]
            times = [t for r in rs for t in r.get("times", ())]
            slow = sum(t > limit for t in times) / len(times) if times else float("nan")
            mean = statistics.fmean(times) if times else float("nan")
            errors = sum(1 for r in rs if "error" in r)
            fmt = (lambda xs: f"{statistics.median(xs):.3f}" if xs else "-")
            print(f"  {name:<34} {len(bad):>4}/{len(rs):<4} {fmt(ok):>10} {fmt(bad):>15} {slow:>9.2%} {mean:>8.3f} {errors:>7}")
    if args.json:
        args.json.write_text(json.dumps({f"{a}|{n}": rs for (a, n), rs in records.items()}, indent=1))


if __name__ == "__main__":
    main()
