"""The zoo's int8 models on ARM, with and without Armv8.2's dot products, run under qemu-user.

For each model built by ``python tools/zoo build``:

1. ``optc compile MODEL --pass canonicalize --pass quantize --calib calib.npz`` (the default budget decides what
   stays int8), giving the QDQ model;
2. that model compiled with ``--target arm --cpu cortex-a76`` (dot products: ``sdot`` kernels) and ``--cpu
   cortex-a53`` (none: widening NEON multiply-accumulates);
3. both artifacts run under qemu (``-cpu max`` and ``-cpu cortex-a53``) on the first evaluation samples, against
   onnxruntime running the QDQ model on x86.

One row per model: regions lowered, ``sdot`` / ``smlal`` instructions in each library, the largest difference between
the two artifacts (the shift to int8 changes no integer: expect 0), and each one's largest difference and lowest cosine
against onnxruntime. qemu's timings say nothing about a board's speed and are not printed.

Usage: python benchmarks/zoo_arm_int8.py [--cache DIR] [--only NAME,...] [--samples 2] [--timeout 900]
Needs the aarch64 cross compiler and qemu-user-static (``make setup-test`` as root); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests"))

from zoo import scoring  # noqa: E402
from zoo.sources import cache_root  # noqa: E402

OPTC = str(Path(sys.executable).with_name("optc"))
CORES = {"cortex-a76": "max", "cortex-a53": "cortex-a53"}  # --cpu -> qemu -cpu that runs it


def _optc(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["nice", OPTC, "compile", *cmd], capture_output=True, text=True, timeout=timeout)


def _count(library: Path, mnemonic: str) -> int:
    code = subprocess.run(["aarch64-linux-gnu-objdump", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    return code.count(f"\t{mnemonic}\t") + code.count(f"\t{mnemonic}2\t")


def row(entry: scoring.Entry, tool, samples: int, timeout: float) -> dict:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="optc-zoo-arm-") as tmp:
        tmp = Path(tmp)
        shapes = entry.target_options()
        proc = _optc([str(entry.model), "-o", str(tmp / "q"), "--pass", "canonicalize", "--pass", "quantize",
                      "--calib", str(entry.calib), "--no-latency", *shapes], timeout)
        if proc.returncode != 0:
            return {"model": entry.name, "error": proc.stderr.strip().splitlines()[-1]}
        qdq = tmp / "q" / "model.onnx"
        data = np.load(entry.eval)
        session = ort.InferenceSession(str(qdq))
        names = [i.name for i in session.get_inputs()]
        arrays = {n: data[n] for n in names}
        feeds = [scoring.sample_feed(entry, arrays, i) for i in range(samples)]  # one at a time: the batch may be frozen
        ref = [dict(zip([o.name for o in session.get_outputs()], session.run(None, f))) for f in feeds]
        out: dict = {"model": entry.name}
        got = {}
        for cpu, board in CORES.items():
            folder = tmp / cpu
            proc = _optc([str(qdq), "-o", str(folder), "--pass", "canonicalize", "--target", "arm", "--cpu", cpu,
                          "--no-latency", "--json", *shapes], timeout)
            if proc.returncode != 0:
                return {**out, "error": f"{cpu}: {proc.stderr.strip().splitlines()[-1]}"}
            out["lowered"] = json.loads(proc.stdout)["target"]["int8"].get("lowered", 0)
            out[f"sdot {cpu}"] = _count(folder / "model.so", "sdot")
            out[f"smlal {cpu}"] = _count(folder / "model.so", "smlal")
            got[cpu] = [tool.run_artifact(folder, f, cpu=board).outputs for f in feeds]
            diffs, cosines = [], []
            for outputs, expected in zip(got[cpu], ref):
                for name, value in expected.items():
                    a, b = np.asarray(outputs[name], np.float64).ravel(), np.asarray(value, np.float64).ravel()
                    diffs.append(float(np.abs(a - b).max()))
                    cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
            out[f"vs ort {cpu}"] = f"max {max(diffs):.3g}, min cos {min(cosines):.5f}"
        out["a76 vs a53"] = max(float(np.abs(np.asarray(x[n], np.float64) - np.asarray(y[n], np.float64)).max())
                                for x, y in zip(*got.values()) for n in x)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=cache_root())
    parser.add_argument("--only", default="")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    from helpers import load_tool

    tool = load_tool("make_arm_root")
    reason = tool.unusable_reason()
    if reason:
        sys.exit(f"cannot run ARM artifacts here: {reason}")
    for entry in scoring.chosen_entries(args.cache, args.only):
        try:
            result = row(entry, tool, args.samples, args.timeout)
        except subprocess.TimeoutExpired:
            result = {"model": entry.name, "error": f"timeout after {args.timeout:.0f} s"}
        except Exception as exc:  # noqa: BLE001 - one model's failure (under qemu, or onnxruntime's) is its row
            result = {"model": entry.name, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
