"""Human-readable tables for the CLI (rich); JSON output bypasses this module."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def human_count(n: float | int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _drift(record: dict[str, Any]) -> str:
    drift = record.get("drift")
    if not drift:
        return "-"
    if drift.get("unchanged"):
        return "unchanged"
    worst = max((m["max_abs"] for m in drift["outputs"].values()), default=0.0)
    cos = min((m["cosine"] for m in drift["outputs"].values()), default=1.0)
    return f"{worst:.1e} cos {cos:.6f}"


def _describe_stats(stats: dict[str, Any]) -> str:
    """Top-level scalar figures and small counters; per-layer detail stays in report.json."""
    parts = []
    for key, value in stats.items():
        if isinstance(value, dict):
            if len(value) <= 4 and all(isinstance(v, (int, float)) for v in value.values()):
                parts.extend(f"{key}.{k}={_fmt(v)}" for k, v in value.items() if v)
        elif isinstance(value, (bool, int, float, str)) and not isinstance(value, bool) and value not in (0, ""):
            parts.append(f"{key}={_fmt(value)}")
        elif isinstance(value, bool):
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def _params(stats: dict[str, Any]) -> str:
    """Parameter count, with the nonzero count when a tenth or more are zeros (sparsified weights;
    quantised models have a few percent: zero points and weights rounded to zero)."""
    params, nonzero = stats["params"], stats.get("nonzero_params", stats["params"])
    if params and nonzero < 0.9 * params:
        return f"{human_count(params)} ({human_count(nonzero)} nz)"
    return human_count(params)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_compile_report(report: dict[str, Any], console: Console, *, show_time: bool) -> None:
    table = Table(title="optc passes", title_justify="left")
    table.add_column("pass", no_wrap=True)
    table.add_column("changed")
    for col in ("params", "bytes", "MACs/sample", "nodes"):
        table.add_column(col, justify="right", no_wrap=True)
    if show_time:
        table.add_column("time", justify="right", no_wrap=True)
    table.add_column("max |Δ| vs previous", no_wrap=True)
    table.add_column("what it did", overflow="fold", min_width=24)
    before = report["before"]
    table.add_row("(input)", "", _params(before), human_bytes(before["param_bytes"]), human_count(before["macs"]), str(before["nodes"]), *([""] if show_time else []), "", "")
    for rec in report["passes"]:
        after = rec["after"]
        what = _describe_stats(rec["stats"])
        if rec["skipped"]:
            what += (", " if what else "") + f"{len(rec['skipped'])} skipped"
        row = [rec["pass"], "yes" if rec["modified"] else "no", _params(after), human_bytes(after["bytes"]), human_count(after["macs"]), str(after["nodes"])]
        if show_time:
            row.append(f"{rec['seconds'] * 1000:.1f} ms")
        row += [_drift(rec), what or "-"]
        table.add_row(*row)
    console.print(table)
    ev = report["evaluation"]
    lines = []
    fid = ev.get("fidelity", {})
    if fid:
        worst = max(m["max_abs"] for m in fid.values())
        cos = min(m["cosine"] for m in fid.values())
        data = f", {ev['fidelity_data']}" if ev.get("fidelity_data") else ""
        lines.append(f"fidelity vs input model ({ev['fidelity_samples']} samples{data}): max |Δ| {worst:.2e}, cosine {cos:.6f}")
    if "accuracy" in ev:
        acc = ev["accuracy"]
        lines.append(f"accuracy ({acc['samples']} labelled samples): {acc['before'] * 100:.2f}% -> {acc['after'] * 100:.2f}% ({acc['delta'] * 100:+.2f} points)")
    if "latency_ms" in ev:
        lat = ev["latency_ms"]
        how = "timed in turns" if lat.get("timing") == "in turns" else "median, timed one after the other"
        lines.append(f"latency (onnxruntime CPU, {how}): {lat['before']:.3f} ms -> {lat['after']:.3f} ms (x{lat['speedup']:.2f})")
    int8 = (report.get("target") or {}).get("int8")
    if int8 and int8.get("enabled"):
        line = f"int8 (TVM): {int8['lowered']} regions lowered to integer kernels"
        if int8["left_float"]:
            line += f"; {len(int8['left_float'])} left in float: " + "; ".join(f"{r['node']} ({r['reason']})" for r in int8["left_float"])
        lines.append(line)
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    for line in lines:
        console.print(line)


def render_inspect(info: dict[str, Any], console: Console) -> None:
    stats = info["stats"]
    console.print(f"[bold]{info['model']}[/bold]  (IR {info['ir_version']}, producer '{info['producer']}')")
    console.print("opsets: " + ", ".join(f"{k} {v}" for k, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            console.print(f"{kind[:-1]:>6}: {s}")
    if info["dynamic_dims"]:
        console.print("dynamic dims: " + "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in info["dynamic_dims"].items()) + "  (freeze with --input-shape)")
    console.print(f"params: {_params(stats)} ({human_bytes(stats['param_bytes'])}), MACs: {human_count(stats['macs'])} per sample, nodes: {stats['nodes']}, weight zeros: {stats['weight_zero_fraction'] * 100:.2f}%")
    if stats["macs_unknown"]:
        console.print(f"MACs unknown (shapes not inferred) for {len(stats['macs_unknown'])} nodes: {', '.join(stats['macs_unknown'][:5])}")
    if info["weights_in_constant_nodes"]:
        console.print(f"weights held in Constant nodes: {info['weights_in_constant_nodes']} (lifted into initializers on load)")
    for msg in info["shape_mismatches"]:
        console.print(f"[yellow]shape: {msg}[/yellow]")
    ops = Table(title="op histogram", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in stats["op_histogram"].items():
        ops.add_row(op, str(count))
    console.print(ops)
    fe = info.get("tvm_frontend")
    if fe is not None:
        if not fe["checked"]:
            console.print(f"TVM frontend check: not run ({fe['reason']})")
        elif fe["unsupported_ops"]:
            for op, nodes in fe["unsupported_ops"].items():
                console.print(f"[red]blocks TVM compilation[/red]: {op} at {', '.join(nodes[:5])}{' ...' if len(nodes) > 5 else ''}")
        else:
            console.print("TVM frontend: every op is supported")


def render_passes(passes: list[dict[str, Any]], console: Console) -> None:
    for p in passes:
        console.print(f"[bold]{p['name']}[/bold]  {p['summary']}{'  (lossy)' if not p['exact'] else ''}")
        if p["requires"]:
            console.print(f"    requires: {', '.join(p['requires'])}")
        for opt in p["options"]:
            console.print(f"    {opt['name']} ({opt['type']}, default {opt['default']!r}): {opt['help']}")
