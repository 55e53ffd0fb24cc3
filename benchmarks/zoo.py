"""Every pass at its documented defaults on every zoo model, through the real CLI.

For each model built by ``python tools/zoo build`` and each pipeline
``canonicalize`` and ``canonicalize`` + one of ``prune-channels``, ``sparsify``,
``quantize``, ``distill`` (no options: the defaults), this runs::

    optc compile MODEL -o OUT --pass canonicalize [--pass P] --calib calib.npz
        [--eval eval.npz (labelled models)] [--input-shape ...] --no-latency

as a niced subprocess under ``/usr/bin/time -v`` with a timeout, then scores
``OUT/model.onnx`` against the original on the held-out ``eval.npz`` (accuracy
points for labelled models, mean per-sample output cosine for all; see
tools/zoo/scoring.py), and prints one table row: exit code, the pass's params /
bytes / MACs before -> after (report.json), metric drop, the pass's time, the
run's peak RSS, and the failure or "nothing changed" reason verbatim.

Usage: python benchmarks/zoo.py [--cache DIR] [--only NAME,...] [--passes P,...]
       [--timeout 600] [--results FILE.json] [--resume] [--by-pass]
Results accumulate in FILE.json (default DIR/bench/results.json); ``--resume``
keeps rows already there. Nothing is downloaded: a missing cache prints how to build it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from zoo import scoring  # noqa: E402
from zoo.sources import cache_root  # noqa: E402

LOSSY = ("prune-channels", "sparsify", "quantize", "distill")
from optc.passes.framework.pipeline import CANONICALIZE as CANON  # noqa: E402
OPTC = [str(Path(sys.executable).with_name("optc"))]


def run_optc(cmd: list[str], timeout: float) -> dict:
    """Run under ``/usr/bin/time -v`` and ``nice``; exit code, seconds, peak RSS, optc's own stderr."""
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    start = time.perf_counter()
    proc = subprocess.Popen([*timer, "nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        code = "timeout"
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", err)
    own = err.split("\tCommand being timed:")[0].strip()
    lines = [ln for ln in own.splitlines() if ln.startswith("optc:")] or own.splitlines()[-1:]
    return {"exit": code, "wall_s": round(time.perf_counter() - start, 1), "peak_rss_mb": round(int(rss.group(1)) / 1024) if rss else None,
            "message": lines[-1] if code != 0 and lines else ""}


def summarise_report(report: dict, pass_name: str) -> dict:
    records = report["passes"]
    mine = [r for r in records if (r["pass"] in CANON if pass_name == "canonicalize" else r["pass"] == pass_name)]
    if not mine:  # a budget left the pass out: the run's notes say why
        return {"modified": False, "skipped": [], "notes": report.get("notes", [])}
    before, after = mine[0]["before"], mine[-1]["after"]
    rec = mine[-1]
    skipped = [f"{s.get('node', s.get('group', '?'))}: {s.get('reason', s)}" if isinstance(s, dict) else str(s) for s in rec.get("skipped", [])]
    acc = report.get("evaluation", {}).get("accuracy")
    return {
        "modified": any(r["modified"] for r in mine),
        "pass_s": round(sum(r["seconds"] for r in mine), 1),
        "before": before, "after": after,
        "stats": rec.get("stats", {}),
        "skipped": skipped,
        "optc_accuracy": acc,
        "notes": report.get("notes", []),
    }


def bench_one(entry: scoring.Entry, pass_name: str, timeout: float, work: Path) -> dict:
    outdir = work / f"{entry.name}-{pass_name}"
    shutil.rmtree(outdir, ignore_errors=True)
    cmd = scoring.optc_command(OPTC, entry, pass_name, outdir)
    row = {"model": entry.name, "pass": pass_name, "command": " ".join(cmd[1:]), **run_optc(cmd, timeout)}
    if row["exit"] == 0:
        report = json.loads((outdir / "report.json").read_text())
        row.update(summarise_report(report, pass_name))
        try:
            row["score"] = scoring.compare(entry, outdir / "model.onnx")
        except Exception as exc:  # the written model does not run: a finding, not a benchmark crash
            row["score"] = {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
    shutil.rmtree(outdir, ignore_errors=True)
    return row


def _si(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.3g}"


def _change(row: dict, key: str) -> str:
    if "before" not in row:
        return ""
    b, a = row["before"][key], row["after"][key]
    return f"{_si(b)}→{_si(a)} ({100 * (a - b) / b:+.0f}%)" if b else f"{_si(b)}→{_si(a)}"


def _metric(row: dict) -> str:
    s = row.get("score")
    if not s:
        return ""
    if "error" in s:
        return f"output model fails: {s['error'][:80]}"
    if "drop_points" in s:
        return f"{100 * s['before']:.1f}→{100 * s['after']:.1f} ({0.0 - s['drop_points']:+.2f} pt), cos {s['cosine']:.4f}"
    return f"cos {s['cosine']:.4f}"


def _outcome(row: dict) -> str:
    if row["exit"] == "timeout":
        return f"timeout after {row['wall_s']} s"
    if row["exit"] != 0:
        return row["message"]
    if row["pass"] == "canonicalize":
        s = row.get("score", {})
        return "written model does not run" if "error" in s else "" if row.get("modified") else "unchanged"
    if not row.get("modified"):
        return _unchanged(row, 3)
    s = row.get("score", {})
    if "error" in s:
        return "written model does not run"
    return "meets goal" if scoring.meets_goal(s) else "misses goal"


def _unchanged(row: dict, most: int) -> str:
    """Why a pass changed nothing: what it skipped, else the run's notes that name it (a budget that left it out)."""
    why = row.get("skipped", [])[:most] or [n for n in row.get("notes", []) if row["pass"] in n][:most]
    return "nothing changed" + (f": {'; '.join(why)}" if why else " (no reason given)")


def table(rows: list[dict]) -> str:
    head = "| model | pass | exit | nonzero params | bytes | MACs | metric (held-out) | pass s | peak MB | outcome |"
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pass']} | {r['exit']} | {_change(r, 'nonzero_params')} | {_change(r, 'bytes')} | {_change(r, 'macs')} | "
                     f"{_metric(r)} | {r.get('pass_s', '')} | {r.get('peak_rss_mb', '')} | {_outcome(r).replace('|', '/')} |")
    return "\n".join(lines)


def known_failures(rows: list[dict]) -> dict[tuple[str, str], str]:
    """The rows that miss the goal, as tests/test_zoo.py's ``KNOWN`` wants them: (model, pass) -> measured figure."""
    out = {}
    for r in rows:
        s = r.get("score", {})
        if r["exit"] == "timeout":
            why = f"timeout after {r['wall_s']:.0f} s (benchmark limit)"
        elif r["exit"] != 0:
            why = f"exit {r['exit']}: {r['message']}"
        elif "error" in s:
            why = f"written model does not run: {s['error']}"
        elif r["pass"] == "canonicalize":
            if s.get("cosine", 1) >= 0.99999:
                continue
            why = f"outputs changed: cosine {s['cosine']:.6f}"
        elif not r.get("modified"):
            why = _unchanged(r, 2)
        elif not scoring.meets_goal(s):
            why = _metric(r)
        else:
            continue
        out[(r["model"], r["pass"])] = why[:300]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, help="zoo cache (default: $OPTC_ZOO_CACHE or ~/.cache/optc/zoo)")
    ap.add_argument("--only", help="comma-separated model names")
    ap.add_argument("--passes", default=",".join(("canonicalize",) + LOSSY))
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per optc run")
    ap.add_argument("--results", type=Path, help="JSON file the rows accumulate in")
    ap.add_argument("--resume", action="store_true", help="keep rows already in the results file")
    ap.add_argument("--by-pass", action="store_true", help="run one pass over every model before the next pass")
    ap.add_argument("--known", action="store_true", help="print the results file's misses as tests/test_zoo.py's KNOWN entries")
    ap.add_argument("--table-only", action="store_true", help="print the table of the results file and stop")
    args = ap.parse_args(argv)
    cache = cache_root(args.cache)
    results_path = args.results or cache / "bench" / "results.json"
    rows: list[dict] = json.loads(results_path.read_text()) if results_path.is_file() and (args.resume or args.table_only or args.known) else []
    if args.table_only:
        print(table(rows))
        return 0
    if args.known:
        for key, why in known_failures(rows).items():
            print(f"    {key!r}: {why!r},")
        return 0
    found = scoring.entries(cache)
    if not found:
        print(f"no zoo in {cache}: run `python tools/zoo fetch && python tools/zoo build` first")
        return 0
    only = set(args.only.split(",")) if args.only else None
    done = {(r["model"], r["pass"]) for r in rows}
    results_path.parent.mkdir(parents=True, exist_ok=True)
    chosen = [e for e in found if not only or e.name in only]
    passes = args.passes.split(",")
    runs = [(e, p) for p in passes for e in chosen] if args.by_pass else [(e, p) for e in chosen for p in passes]
    with tempfile.TemporaryDirectory(prefix="optc-zoo-") as tmp:
        for entry, pass_name in runs:
            if (entry.name, pass_name) in done:
                continue
            row = bench_one(entry, pass_name, args.timeout, Path(tmp))
            rows = [r for r in rows if (r["model"], r["pass"]) != (entry.name, pass_name)] + [row]
            results_path.write_text(json.dumps(rows, indent=1, default=str))
            print(f"{entry.name} {pass_name}: exit {row['exit']} {row['wall_s']} s {_metric(row)} {_outcome(row)}", flush=True)
    order = {e.name: i for i, e in enumerate(found)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), passes.index(r["pass"]) if r["pass"] in passes else 99))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
