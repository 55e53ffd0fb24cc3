"""Human-readable tables for the CLI (rich); JSON output bypasses this module.

Every piece of text that comes from a model or a user (names, producer,
paths, notes) goes through :func:`shown`: rich markup in it is escaped (a name
like ``[/x]`` is printed, not parsed), control and format characters become
visible escapes (``\\x1b``: a name cannot drive the terminal), and text
longer than :data:`MAX_SHOWN_CHARS` is elided.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from optc.errors import visible_text
from optc.reporting.format import describe_stats as _describe_stats
from optc.reporting.format import drift_summary as _drift
from optc.reporting.format import change_words, human_bytes, human_count, least_fidelity, macs_footnote, macs_label
from optc.reporting.format import params_text as _params

# Longer names are cut in the middle for display (JSON output keeps them whole).
MAX_SHOWN_CHARS = 200


def visible(text: Any, limit: int | None = MAX_SHOWN_CHARS) -> str:
    """``text`` with control and format characters written as escapes, and elided past ``limit`` characters."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = f"{s[: limit - 60]}...({len(s)} characters)...{s[-40:]}"
    return visible_text(s)


def shown(text: Any, limit: int | None = MAX_SHOWN_CHARS) -> str:
    """``text`` safe to print through rich: :func:`visible`, then markup escaped."""
    return escape(visible(text, limit))


def render_compile_report(report: dict[str, Any], console: Console, *, show_time: bool) -> None:
    # Off a terminal (a CI log) lines past the console's width would be cut: every
    # text column may wrap there, so the table fits and "what it did" is kept whole.
    wrap = not console.is_terminal
    table = Table(title="optc passes", title_justify="left")
    table.add_column("pass", no_wrap=True)
    table.add_column("changed")
    for col in ("params", "bytes", macs_label(report), "nodes"):
        table.add_column(col, justify="right", no_wrap=True)
    if show_time:
        table.add_column("time", justify="right", no_wrap=True)
    table.add_column("max |Δ| vs previous", no_wrap=not wrap)
    if wrap:
        table.add_column("what it did", overflow="fold", ratio=1)
    else:
        table.add_column("what it did", overflow="fold", min_width=24)
    before = report["before"]
    table.add_row("(input)", "", _params(before), human_bytes(before["param_bytes"]), human_count(before["macs"]), str(before["nodes"]), *([""] if show_time else []), "", "")
    for rec in report["passes"]:
        after = rec["after"]
        what = _describe_stats(rec["stats"])
        if rec["skipped"]:
            what += (", " if what else "") + f"{len(rec['skipped'])} skipped"
        row = [shown(rec["pass"]), "yes" if rec["modified"] else "no", _params(after), human_bytes(after["bytes"]), human_count(after["macs"]), str(after["nodes"])]
        if show_time:
            row.append(f"{rec['seconds'] * 1000:.1f} ms")
        what = shown(what or "-", limit=None)
        row += [_drift(rec), what.replace(", ", ",\n") if wrap else what]
        table.add_row(*row)
    console.print(table)
    ev = report["evaluation"]
    lines = [footnote] if (footnote := macs_footnote(report)) else []
    scaled_at = _scaled_strengths(report)
    for i, rec in enumerate(report["passes"]):  # a pass that found nothing to do says why, here and not only in report.json
        scaled = scaled_at.get(i)  # only strengths above 0: a pass left out has no record
        if not rec["modified"] and scaled:
            # the budget's search scaled it so far down that nothing was taken: that, not a skipped layer, is why
            lines.append(f"note: {shown(rec['pass'])} changed nothing at {scaled:g}, the strongest setting the budget allowed "
                         "(too little to take anything)")
        elif not rec["modified"] and rec["skipped"]:
            more = f" (and {len(rec['skipped']) - 1} more in report.json)" if len(rec["skipped"]) > 1 else ""
            lines.append(f"note: {shown(rec['pass'])} changed nothing: {shown(rec['skipped'][0])}{more}")
    lines += _left_out(report)
    fid = ev.get("fidelity", {})
    if fid:
        worst = max(m["max_abs"] for m in fid.values())
        name, least = least_fidelity(fid)
        cos = f"{least:.6f}{change_words(fid, name)}"
        data = f", {shown(ev['fidelity_data'])}" if ev.get("fidelity_data") else ""
        agree = [m["agreement"] for m in fid.values() if m.get("agreement") is not None]
        decisions = f", argmax agreement {min(agree):.4f}" if agree else ""
        lines.append(f"fidelity vs input model ({ev['fidelity_samples']} samples{data}): max |Δ| {worst:.2e}, cosine {cos}{decisions}")
    if "accuracy" in ev:
        acc = ev["accuracy"]
        lines.append(f"accuracy ({acc['samples']} labelled samples): {acc['before'] * 100:.2f}% -> {acc['after'] * 100:.2f}% ({acc['delta'] * 100:+.2f} points)")
    if "latency_ms" in ev:
        lat = ev["latency_ms"]
        how = "timed in turns" if lat.get("timing") == "in turns" else "median, timed one after the other"
        lines.append(f"latency (onnxruntime CPU, {how}): {lat['before']:.3f} ms -> {lat['after']:.3f} ms ({_faster(lat['before'], lat['after'])})")
    int8 = (report.get("target") or {}).get("int8")
    if int8 and int8.get("enabled"):
        line = f"int8 (TVM): {int8['lowered']} regions lowered to integer kernels"
        if int8["left_float"]:
            line += f"; {len(int8['left_float'])} left in float: " + "; ".join(f"{shown(r['node'])} ({shown(r['reason'])})" for r in int8["left_float"])
        lines.append(line)
    tuning = (report.get("target") or {}).get("tuning") or {}
    if tuning.get("providers"):
        lines.append(kernels_line(tuning["providers"]))
    failures = tuning.get("template_failures") or []
    if failures:
        # a shape the kernel does not cover is a known limit; any other failure is a bug of its schedule
        why = "shapes optc's kernel does not cover" if all("Untileable" in f for f in failures) else "an optc bug to report"
        lines.append(f"warning: optc's tiled kernel could not schedule {len(failures)} convolution/matmul function(s), which run TVM's "
                     f"default schedule (correct, slower; {why}): {shown(failures[0])}")
    timed = (report.get("target") or {}).get("latency")
    if timed:
        lines.append(f"artifact ({shown(report['target']['name'])}) on this machine: {timed['artifact_ms']:.3f} ms vs onnxruntime "
                     f"{timed['onnxruntime_ms']:.3f} ms ({_faster(timed['onnxruntime_ms'], timed['artifact_ms'])}, timed in turns), "
                     f"outputs within {timed['max_abs_diff']:.1e}")
    for note in report.get("notes", []):
        lines.append(f"note: {shown(note, limit=None)}")
    for line in lines:
        console.print(line)


def kernels_line(p: dict[str, Any]) -> str:
    """Who computes the heavy ops, and why (the report's ``target.tuning.providers``)."""
    dnnl = p.get("onednn") or {}
    if p.get("mode") == "tvm" and not dnnl.get("reason"):
        return "kernels: TVM for every op (--kernels tvm)"
    if p.get("glue") == "winograd":  # no oneDNN: optc's own Winograd kernels beside TVM's
        how = shown(p.get("unmeasured") or p.get("board") or "measured")
        why = f"; oneDNN not used: {shown(dnnl['reason'])}" if dnnl.get("reason") and not p.get("unmeasured") else ""
        return (f"kernels: TVM for every op but {len(p.get('offloaded') or [])} of {p.get('chains', 0)} convolutions, "
                f"{', '.join(_winograd_counts(p))} ({how}){why}")
    if p.get("cost_model"):  # an ARM target where the board's cost model expects no Winograd kernel to pay
        if not p.get("chains"):
            return "kernels: TVM for every op (no float convolution for optc's Winograd kernels)"
        return (f"kernels: TVM for every op; optc's Winograd kernels are expected to speed up none of its {p['chains']} float "
                f"convolution{'s' if p['chains'] > 1 else ''} ({shown(p['unmeasured'])})")
    if not dnnl.get("available"):
        # convolutions where optc's Winograd was timed against TVM's kernel (not left out by its memory cap), and lost
        raced = sum(1 for e in p.get("kept") or [] if "tvm_ms" in e and ("winograd_f43_ms" in e or "winograd_f23_ms" in e))
        lost = f" ({raced} convolution{'s' if raced > 1 else ''} raced against optc's Winograd, which won none)" if raced else ""
        return f"kernels: TVM for every op{lost}; oneDNN not used: {shown(dnnl.get('reason') or 'unavailable')}"
    total, sent = p.get("chains", 0), len(p.get("offloaded") or [])
    how = shown(p["unmeasured"]) if p.get("unmeasured") else "measured" if p.get("mode") == "auto" else "as asked"
    by = _winograd_counts(p)
    layout = f"layout {p.get('layout')}" + (f"; {', '.join(by)}" if by else "")
    line = f"kernels: {sent}/{total} op chains to oneDNN {dnnl.get('version')} ({how}; {layout})"
    if p.get("measured"):
        line += f", {p['measured']} workloads timed in {p.get('measure_seconds', 0):.1f} s"
    if p.get("reused"):
        line += f", {p['reused']} choices from the tuning database"
    return line


def _winograd_counts(p: dict[str, Any]) -> list[str]:
    """"N by <kernel>" for each Winograd kernel the offloaded chains ask for, the last with the memory optc's own hold
    for their transformed weights (the artifact's resident size grows by it)."""
    algorithms = [e.get("algorithm") for e in p.get("offloaded") or []]
    by = [f"{n} by {who}" for n, who in ((algorithms.count("winograd"), "oneDNN's Winograd"),
                                          (algorithms.count("winograd F(4x4,3x3)"), "optc's Winograd F(4x4,3x3)"),
                                          (algorithms.count("winograd F(2x2,3x3)"), "optc's F(2x2,3x3)")) if n]
    if by and p.get("winograd_optc_bytes"):
        by[-1] += f" holding {p['winograd_optc_bytes'] / (1 << 20):.1f} MiB of transformed weights"
    return by


def render_inspect(info: dict[str, Any], console: Console) -> None:
    stats = info["stats"]
    console.print(f"[bold]{shown(info['model'], limit=None)}[/bold]  (IR {info['ir_version']}, producer '{shown(info['producer'])}')")
    console.print("opsets: " + ", ".join(f"{shown(k)} {v}" for k, v in info["opsets"].items()))
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            console.print(f"{kind[:-1]:>6}: {shown(s, limit=2 * MAX_SHOWN_CHARS)}")
    if info["dynamic_dims"]:
        dims = "; ".join(f"{shown(k)}: {', '.join(shown(d) for d in v)}" for k, v in info["dynamic_dims"].items())
        console.print(f"dynamic dims: {dims}  (freeze with --input-shape)")
    console.print(f"params: {_params(stats)} ({human_bytes(stats['param_bytes'])}), MACs: {human_count(stats['macs'])} per sample, nodes: {stats['nodes']}, weight zeros: {stats['weight_zero_fraction'] * 100:.2f}%")
    if stats["macs_unknown"]:
        console.print(f"MACs unknown (shapes not inferred) for {len(stats['macs_unknown'])} nodes: {', '.join(shown(n) for n in stats['macs_unknown'][:5])}")
    if info["weights_in_constant_nodes"]:
        console.print(f"weights held in Constant nodes: {info['weights_in_constant_nodes']} (lifted into initializers on load)")
    for msg in info["shape_mismatches"]:
        console.print(f"[yellow]shape: {shown(msg, limit=None)}[/yellow]")
    ops = Table(title="op histogram", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in stats["op_histogram"].items():
        ops.add_row(shown(op), str(count))
    console.print(ops)
    fe = info.get("tvm_frontend")
    if fe is not None:
        if not fe["checked"]:
            console.print(f"TVM frontend check: not run ({shown(fe['reason'], limit=None)})")
        elif fe["unsupported_ops"]:
            for op, nodes in fe["unsupported_ops"].items():
                console.print(f"[red]blocks TVM compilation[/red]: {shown(op)} at {', '.join(shown(n) for n in nodes[:5])}{' ...' if len(nodes) > 5 else ''}")
        else:
            console.print("TVM frontend: every op is supported")


def render_passes(passes: list[dict[str, Any]], console: Console) -> None:
    for p in passes:
        console.print(f"[bold]{shown(p['name'])}[/bold]  {shown(p['summary'], limit=None)}{'  (lossy)' if not p['exact'] else ''}")
        if p["requires"]:
            console.print(f"    requires: {', '.join(p['requires'])}")
        for opt in p["options"]:
            kind = f"{opt['type']} {opt['range']}" if opt.get("range") else opt["type"]  # "float in [0, 1)", "int >= 1"
            console.print(shown(f"    {opt['name']} ({kind}, default {opt['default']!r}): {opt['help']}", limit=None))


def _faster(reference_ms: float, measured_ms: float) -> str:
    """How ``measured_ms`` compares with ``reference_ms`` in words: one convention for every time the summary
    shows (the latency line printed a speed-up and the artifact line a ratio of times, both as "xN")."""
    if reference_ms <= 0 or measured_ms <= 0:
        return "not comparable"
    ratio = reference_ms / measured_ms
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _left_out(report: dict[str, Any]) -> list[str]:
    """One note per pass a budget search scaled to nothing: the least strength tried and what it measured (the search's
    own note says only how far the strengths were scaled)."""
    search = report.get("search") or {}
    chosen = (search.get("chosen") or {}).get("strengths") or {}
    out = []
    for key, value in chosen.items():
        if value != 0:
            continue
        tried = [(p["strengths"][key], p["metric"]) for p in search.get("points") or []
                 if isinstance(p.get("strengths", {}).get(key), (int, float)) and p["strengths"][key] > 0]
        name = key.rpartition("#")[0]
        if tried:
            strength, metric = min(tried)
            out.append(f"note: {name} left out by the budget: its least strength tried, {strength:g}, "
                       f"measured {search.get('metric', 'metric')} {metric:.4f}")
        else:  # a pass without a scalable strength (quantize): the search's own note says why
            out += [f"note: {n}" for n in search.get("notes") or [] if n.startswith(f"{name}: left out")][:1]
    return out


def _scaled_strengths(report: dict[str, Any]) -> dict[int, float]:
    """Record index -> the strength a budget search chose for that pass (``name#index`` counts the pipeline as
    asked; a pass the search left out, at 0, has no record, so those after it move up one)."""
    strengths = ((report.get("search") or {}).get("chosen") or {}).get("strengths") or {}
    keyed = sorted((int(k.rpartition("#")[2]), v) for k, v in strengths.items() if k.rpartition("#")[2].isdigit())
    out, left_out = {}, 0
    for index, value in keyed:
        if value == 0:
            left_out += 1
        elif isinstance(value, (int, float)):
            out[index - left_out] = float(value)
    return out
