"""The default x86 artifact of every zoo model against onnxruntime, through the real CLI.

For each model built by ``python tools/zoo build`` this runs::

    optc compile MODEL -o OUT --target x86 [--input-shape ...] [--input-value ...]

(the default pipeline, ``canonicalize``; kernel providers chosen by measurement,
no tuning) and prints one row from OUT/report.json: the artifact's latency and
onnxruntime's on the same cores, timed in turns in one process (see
optc/targets/compare.py), their ratio, the output difference, how many op
chains went to oneDNN and in which layout, and the compile time. A model the
compile refuses prints its one-line error. A model with a rank-0 setting (Silero VAD's
sample rate) is compiled with it bound to the first evaluation sample's value, one sample's shapes. The zoo's models were never used to
fit a provider or a schedule: this is the check on models the kernels were not
written for.

``--int8`` compiles ``--pass canonicalize --pass quantize --calib calib.npz``
instead (the default budget may leave quantize out: the int8 column says how many
regions were lowered to integer kernels); onnxruntime then runs the same QDQ
model, with its own int8 kernels.

``--avx2`` compiles as for a CPU with AVX2 but neither AVX-512 nor VNNI (``--cpu haswell``, oneDNN held to
``ONEDNN_MAX_CPU_ISA=AVX2``), on this one; onnxruntime keeps this CPU's kernels, so read the ratio as indicative
and the output difference as the check. ``--kernels tvm`` compiles with TVM's kernels only. ``--no-onednn`` compiles
as where oneDNN is missing (``OPTC_DISABLE_ONEDNN``): TVM's kernels, and optc's Winograd where it wins the race (the
chains column then counts the convolutions sent to optc's Winograd).

Usage: python benchmarks/zoo_x86.py [--cache DIR] [--only NAME,...] [--timeout 900] [--int8] [--avx2] [--kernels tvm] [--no-onednn]
Nothing is downloaded: a missing cache prints how to build it.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from zoo import scoring  # noqa: E402
from zoo.sources import cache_root  # noqa: E402

OPTC = str(Path(sys.executable).with_name("optc"))


def row(entry: scoring.Entry, timeout: float, int8: bool = False, flags: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="optc-zoo-x86-") as tmp:
        out = Path(tmp) / "out"
        cmd = [OPTC, "compile", str(entry.model), "-o", str(out), "--target", "x86", *flags]
        if int8:
            cmd += ["--pass", "canonicalize", "--pass", "quantize", "--calib", str(entry.calib)]
        cmd += entry.target_options()
        start = time.perf_counter()
        try:
            proc = subprocess.run(["nice", *cmd], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        except subprocess.TimeoutExpired:
            return {"model": entry.name, "error": f"timeout after {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.startswith("optc: error")]
            return {"model": entry.name, "error": (lines[-1] if lines else proc.stderr.strip()[-300:]), "exit": proc.returncode}
        report = json.loads((out / "report.json").read_text())
    target = report["target"]
    latency = target.get("latency") or {}
    providers = (target.get("tuning") or {}).get("providers") or {}
    return {
        "model": entry.name, "seconds": round(seconds, 1), "artifact_ms": latency.get("artifact_ms"),
        "onnxruntime_ms": latency.get("onnxruntime_ms"), "ratio": latency.get("ratio"), "max_abs_diff": latency.get("max_abs_diff"),
        "offloaded": len(providers.get("offloaded", [])), "chains": len(providers.get("offloaded", [])) + len(providers.get("kept", [])),
        "layout": providers.get("layout"), "int8_regions": (target.get("int8") or {}).get("lowered", 0),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="zoo cache (default: $OPTC_ZOO_CACHE or ~/.cache/optc/zoo)")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per compile")
    parser.add_argument("--int8", action="store_true", help="quantize first (canonicalize + quantize with the zoo's calib.npz)")
    parser.add_argument("--avx2", action="store_true", help="compile as for an AVX2 CPU without AVX-512 or VNNI")
    parser.add_argument("--kernels", choices=("auto", "tvm", "onednn"), default="auto")
    parser.add_argument("--no-onednn", action="store_true", help="compile as without oneDNN (OPTC_DISABLE_ONEDNN)")
    args = parser.parse_args()
    flags = (*(("--cpu", "haswell") if args.avx2 else ()), *(("--kernels", args.kernels) if args.kernels != "auto" else ()))
    env = {"ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"} if args.avx2 else {}
    if args.no_onednn:
        env["OPTC_DISABLE_ONEDNN"] = "1"
    entries = scoring.chosen_entries(args.cache or cache_root(), args.only)
    load = os.getloadavg()
    print(f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print("| model | artifact ms | onnxruntime ms | ratio | max abs diff | chains to oneDNN | layout | compile s |"
          + (" int8 regions |" if args.int8 else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|" if args.int8 else ""))
    for entry in entries:
        r = row(entry, args.timeout, args.int8, flags, env)
        if "error" in r:
            print(f"| {r['model']} | {r['error']} | | | | | | |" + (" |" if args.int8 else ""), flush=True)
            continue
        print(f"| {r['model']} | {r['artifact_ms']:.3f} | {r['onnxruntime_ms']:.3f} | x{r['ratio']:.2f} | {r['max_abs_diff']:.1e} "
              f"| {r['offloaded']}/{r['chains']} | {r['layout']} | {r['seconds']} |" + (f" {r['int8_regions']} |" if args.int8 else ""), flush=True)
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
