"""What each kernel provider gave, per op family: read from the compile's own race (``report.json``'s
``target.tuning.providers``), not timed again.

For every op chain the race timed, the family it belongs to (3x3 stride-1, strided, 1x1, depthwise or
grouped convolutions, matmuls, batch matmuls, softmax, layer norm, and their int8 forms), who computes
it in the artifact (TVM's kernel: optc's tiled template or TVM's schedule; oneDNN's direct kernel;
oneDNN's or optc's Winograd kernels), and two sums of the race's medians at the compile's thread
count: TVM's kernel for every chain of the family, and the kernel the artifact runs. Their ratio is what
the providers gained over TVM's kernels on that family. Chains whose choice came from the tuning
database carry the figures stored with it.

    python benchmarks/op_families.py ARTIFACT [ARTIFACT ...]     # or kernels_vs_ort.py --families
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

# The race's figure for each algorithm an offloaded chain may run (entries without "algorithm": oneDNN's direct kernel).
CHOSEN_MS = {None: "onednn_ms", "direct": "onednn_ms", "winograd": "winograd_ms",
             "winograd F(4x4,3x3)": "winograd_f43_ms", "winograd F(2x2,3x3)": "winograd_f23_ms"}
WHO = {None: "oneDNN direct", "direct": "oneDNN direct", "winograd": "oneDNN Winograd",
       "winograd F(4x4,3x3)": "optc Winograd F(4x4)", "winograd F(2x2,3x3)": "optc Winograd F(2x2)"}


def family(workload: str) -> str:
    """``conv2d/1x14x14x32/w32x32x3x3/s1_1/...`` -> ``conv 3x3 s1``; int8 kinds keep their dtype (``conv2d_uint8`` ...)."""
    base, dtype = re.fullmatch(r"(.*?)(_u?int8)?", workload.split("/", 1)[0]).groups()
    suffix = " int8" if dtype else ""
    if not base.startswith("conv2d"):
        return base.replace("_", " ") + suffix
    w = re.search(r"/w(\d+)x(\d+)x(\d+)x(\d+)", workload)
    s = re.search(r"/s(\d+)_(\d+)", workload)
    g = re.search(r"/g(\d+)", workload)
    if not w:
        return base + suffix
    out, per_group, kh, kw = map(int, w.groups())
    groups = int(g.group(1)) if g else 1
    if base == "conv2d_transpose":
        return "deconv" + suffix
    if groups > 1:
        return ("conv depthwise" if per_group == 1 and groups == out else "conv grouped") + suffix
    stride = "s1" if not s or s.groups() == ("1", "1") else "strided"
    return f"conv {kh}x{kw} {stride}" + suffix


def rows(providers: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (family, provider): chains, multiply-adds, and the summed race figures (TVM's, and chosen)."""
    acc: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"chains": 0, "macs": 0, "tvm_ms": 0.0, "chosen_ms": 0.0, "timed": 0})
    for entry, sent in [(e, True) for e in providers.get("offloaded") or []] + [(e, False) for e in providers.get("kept") or []]:
        algo = entry.get("algorithm")
        who = WHO.get(algo, str(algo)) if sent else "TVM"
        row = acc[(family(entry["workload"]), who)]
        row["chains"] += 1
        row["macs"] += int(entry.get("macs") or 0)
        tvm, chosen = entry.get("tvm_ms"), entry.get(CHOSEN_MS.get(algo, "onednn_ms")) if sent else entry.get("tvm_ms")
        if isinstance(tvm, float) and isinstance(chosen, float):
            row["tvm_ms"] += tvm
            row["chosen_ms"] += chosen
            row["timed"] += 1
    return [{"family": f, "provider": p, **r} for (f, p), r in sorted(acc.items())]


def table(title: str, providers: dict[str, Any]) -> str:
    lines = [f"{title}: per op family (the compile's race, medians at its thread count)",
             f"  {'family':22} {'provider':22} {'chains':>6} {'MMACs':>8} {'TVM ms':>8} {'chosen ms':>9} {'gain':>6}"]
    for r in rows(providers):
        gain = f"{r['tvm_ms'] / r['chosen_ms']:.2f}x" if r["timed"] and r["chosen_ms"] > 0 else "-"
        timed = "" if r["timed"] == r["chains"] else f"  ({r['timed']} timed)"
        lines.append(f"  {r['family']:22} {r['provider']:22} {r['chains']:>6} {r['macs'] / 1e6:>8.1f} {r['tvm_ms']:>8.3f} "
                     f"{r['chosen_ms']:>9.3f} {gain:>6}{timed}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or any(a.startswith("-") for a in argv):
        print("usage: python benchmarks/op_families.py ARTIFACT [ARTIFACT ...]  (folders written by optc compile --target x86)",
              file=sys.stderr)
        return 2
    for folder in map(Path, argv):
        try:
            providers = json.loads((folder / "report.json").read_text())["target"]["tuning"]["providers"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "no kernel providers in it" if isinstance(exc, (KeyError, TypeError)) else "not JSON"
            print(f"op_families: {folder / 'report.json'}: {why} (an artifact folder of optc compile --target x86?)", file=sys.stderr)
            return 2
        print(table(str(folder), providers))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
