"""``report.html``: the compile report as one self-contained page (no script, no network).

It renders what ``report.json`` holds: the summary a user checks first
(size, MACs, accuracy or fidelity, latency, the target artifact), the
per-pass table, plots of size, MACs and latency per pass, per-layer MACs,
every skipped layer with its reason, and, when the run searched, every point
explored with the Pareto front. Unknown sections are ignored, so an older or
newer report still renders.
"""
from __future__ import annotations

import json
from html import escape
from typing import Any, Mapping

from optc.reporting.format import change_words, describe_stats, drift_summary, human_bytes, human_count, least_fidelity, macs_label, params_text
from optc.reporting.svg import bar_chart, scatter

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top}
th{background:#f4f4f4;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.warn{color:#a33;font-weight:bold}.ok{color:#2a6b2a}.muted{color:#777}
.charts{display:flex;flex-wrap:wrap;gap:12px}details{margin:4px 0}code{background:#f4f4f4;padding:0 3px;overflow-wrap:anywhere}
"""


def render_html(report: Mapping[str, Any]) -> str:
    """The whole page for one compile report."""
    body = [
        f"<h1>optc report: {escape(str(report.get('model', {}).get('source', '?')))}</h1>",
        _provenance(report),
        _summary(report),
        _pass_table(report),
        _charts(report),
        _search(report),
        _layers(report),
        _skipped(report),
        _notes(report),
    ]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>optc report</title>"
            f"<style>{STYLE}</style></head><body>" + "".join(b for b in body if b) + "</body></html>\n")


def _provenance(report: Mapping[str, Any]) -> str:
    versions = report.get("versions") or {"optc": report.get("optc_version", "?")}
    items = ", ".join(f"{escape(str(k))} {escape(str(v))}" for k, v in versions.items())
    steps = "".join(f"<li><code>{escape(str(p))}</code></li>" for p in report.get("pipeline", []))
    return f'<p class="muted">{items}</p><details><summary>pipeline ({len(report.get("pipeline", []))} passes, every option)</summary><ol>{steps}</ol></details>'


def _summary(report: Mapping[str, Any]) -> str:
    before, after, ev = report.get("before", {}), report.get("after", {}), report.get("evaluation", {})
    rows = []
    if before and after:
        rows.append(_row("parameters", params_text(before), params_text(after), _ratio(before.get("params"), after.get("params"))))
        rows.append(_row("weight bytes", human_bytes(before.get("param_bytes", 0)), human_bytes(after.get("param_bytes", 0)),
                         _ratio(before.get("param_bytes"), after.get("param_bytes"))))
        rows.append(_row(macs_label(report).replace("/", " per "), human_count(before.get("macs")), human_count(after.get("macs")), _ratio(before.get("macs"), after.get("macs"))))
    if "accuracy" in ev:
        acc = ev["accuracy"]
        delta = acc["delta"] * 100
        cls = "warn" if delta < -1 else "ok"
        rows.append(_row(f"accuracy ({acc['samples']} labelled samples)", f"{acc['before'] * 100:.2f} %", f"{acc['after'] * 100:.2f} %",
                         f'<span class="{cls}">{delta:+.2f} points</span>'))
    fid = ev.get("fidelity") or {}
    if fid:
        name, cos = least_fidelity(fid)
        whose = change_words(fid, name)
        cls = "warn" if not cos >= 0.99 else "ok"
        rows.append(_row(f"fidelity to the input model ({ev.get('fidelity_samples', '?')} samples, {escape(str(ev.get('fidelity_data', '')))})",
                         "1", f"{cos:.6f}", f'<span class="{cls}">cosine{escape(whose)}</span>'))
    lat = ev.get("latency_ms")
    if lat:
        rows.append(_row(f"latency, {escape(str(lat.get('runtime', '')))} ({escape(str(lat.get('timing', '')))})",
                         f"{lat['before']:.3f} ms", f"{lat['after']:.3f} ms", f"×{lat['speedup']:.2f}" if lat.get("speedup") else ""))
    rows.extend(_target_rows(report.get("target") or {}))
    if not rows:
        return ""
    return "<h2>Summary</h2><table><tr><th></th><th>input</th><th>output</th><th>change</th></tr>" + "".join(rows) + "</table>"


def _target_rows(target: Mapping[str, Any]) -> list[str]:
    if not target or target.get("name") in (None, "none"):
        return []
    rows = []
    tuning = target.get("tuning") or {}
    what = f"{escape(str(target.get('name')))} artifact"
    if "build_seconds" in target:
        rows.append(_row(f"{what}: build", "", f"{target['build_seconds']:.1f} s", ""))
    if tuning:
        rows.append(_row(f"{what}: tuning", "", escape(json.dumps({k: v for k, v in tuning.items() if not isinstance(v, (list, dict))}, default=str)), ""))
    art = target.get("latency_ms")
    if isinstance(art, Mapping) and art.get("artifact") and art.get("onnxruntime"):
        ratio = art["artifact"] / art["onnxruntime"]
        cls = "warn" if ratio > 1 else "ok"
        rows.append(_row(f"{what}: latency vs onnxruntime", f"{art['onnxruntime']:.3f} ms", f"{art['artifact']:.3f} ms",
                         f'<span class="{cls}">{ratio:.2f}× onnxruntime</span>'))
    return rows


def _pass_table(report: Mapping[str, Any]) -> str:
    records = report.get("passes") or []
    if not records:
        return ""
    head = "<tr><th>pass</th><th>changed</th><th>params</th><th>bytes</th><th>MACs</th><th>nodes</th><th>time</th><th>drift vs previous</th><th>what it did</th></tr>"
    rows = []
    for rec in records:
        after = rec.get("after", {})
        rows.append(
            f"<tr><td>{escape(rec['pass'])}</td><td>{'yes' if rec.get('modified') else 'no'}</td>"
            f"<td class=n>{escape(params_text(after))}</td><td class=n>{human_bytes(after.get('bytes', 0))}</td>"
            f"<td class=n>{human_count(after.get('macs'))}</td><td class=n>{after.get('nodes', '')}</td>"
            f"<td class=n>{rec.get('seconds', 0):.2f} s</td><td>{escape(drift_summary(rec))}</td>"
            f"<td>{escape(describe_stats(rec.get('stats', {})) or '-')}{_count_skipped(rec)}</td></tr>"
        )
    return "<h2>Passes</h2><table>" + head + "".join(rows) + "</table>"


def _charts(report: Mapping[str, Any]) -> str:
    records = report.get("passes") or []
    before = report.get("before") or {}
    if not records or not before:
        return ""
    labels = ["(input)"] + [r["pass"] for r in records]
    kib = [before.get("param_bytes", 0) / 1024] + [r["after"].get("bytes", 0) / 1024 for r in records]
    macs = [before.get("macs", 0) / 1e6] + [r["after"].get("macs", 0) / 1e6 for r in records]
    charts = [bar_chart(labels, {"weight KiB": kib}, title="Weight bytes after each pass", unit=" KiB"),
              bar_chart(labels, {"MMACs": macs}, title="MACs per sample after each pass", unit="M")]
    lat = (report.get("evaluation") or {}).get("latency_ms")
    if lat:
        series = {"latency": [lat["before"], lat["after"]]}
        charts.append(bar_chart(["input model", "output model"], series, title=f"Latency, {lat.get('runtime', '')}", unit=" ms"))
    fid = _fidelity_points(report)
    if fid:
        charts.append(scatter(fid, title="Fidelity vs size", x_label="weight KiB", y_label="cosine to the input", highlight=fid[-1:]))
    return '<h2>Plots</h2><div class="charts">' + "".join(charts) + "</div>"


def _fidelity_points(report: Mapping[str, Any]) -> list[tuple[float, float, str]]:
    """The input (cosine 1) and the output model, plus every pass whose drift was measured."""
    before, after = report.get("before") or {}, report.get("after") or {}
    fid = (report.get("evaluation") or {}).get("fidelity") or {}
    if not fid:
        return []
    points = [(before.get("param_bytes", 0) / 1024, 1.0, "input")]
    cos = 1.0
    for rec in report.get("passes") or []:
        drift = rec.get("drift") or {}
        if drift.get("outputs"):
            cos *= min(m["cosine"] for m in drift["outputs"].values())  # a lower bound on the chained cosine's trend
            points.append((rec["after"].get("bytes", 0) / 1024, cos, f"after {rec['pass']} (chained drift)"))
    points.append((after.get("param_bytes", 0) / 1024, least_fidelity(fid)[1], "output (measured)"))
    return points


def _search(report: Mapping[str, Any]) -> str:
    search = report.get("search")
    if not search or not search.get("points"):
        return ""
    pts = search["points"]
    objective = search.get("objective", "bytes")
    metric = search.get("metric", "metric")
    xs = [(p.get(objective) or 0, p.get("metric") or 0, _point_label(p)) for p in pts]
    front = [(p.get(objective) or 0, p.get("metric") or 0) for p in pts if p.get("pareto")]
    best = [x for x, p in zip(xs, pts) if p.get("chosen")]
    chart = scatter(xs, title=f"Search: {metric} vs {objective}", x_label=objective, y_label=metric, front=front, highlight=best)
    head = "<tr><th>#</th><th>strengths</th><th>" + escape(metric) + "</th><th>bytes</th><th>MACs</th><th>latency</th><th>within budget</th><th>Pareto</th></tr>"
    rows = "".join(
        f"<tr><td>{i}</td><td>{escape(_point_label(p))}</td><td class=n>{_num(p.get('metric'))}</td><td class=n>{human_bytes(int(p.get('bytes') or 0))}</td>"
        f"<td class=n>{human_count(p.get('macs'))}</td><td class=n>{_num(p.get('latency_ms'))}</td><td>{'yes' if p.get('feasible') else 'no'}</td>"
        f"<td>{'★' if p.get('pareto') else ''}{' chosen' if p.get('chosen') else ''}</td></tr>"
        for i, p in enumerate(pts)
    )
    return f"<h2>Search ({len(pts)} points explored)</h2>" + chart + "<table>" + head + rows + "</table>"


def _layers(report: Mapping[str, Any]) -> str:
    before = (report.get("before") or {}).get("macs_per_node") or {}
    after = (report.get("after") or {}).get("macs_per_node") or {}
    if not before:
        return ""
    names = sorted(before, key=lambda n: -before[n])[:40]
    rows = "".join(
        f"<tr><td>{escape(n)}</td><td class=n>{human_count(before[n])}</td><td class=n>{human_count(after.get(n)) if n in after else '<span class=muted>removed or renamed</span>'}</td></tr>"
        for n in names
    )
    more = f'<p class="muted">{len(before) - len(names)} smaller layers not shown (report.json has them all).</p>' if len(before) > len(names) else ""
    return "<h2>Per-layer MACs</h2><table><tr><th>node</th><th>input model</th><th>output model</th></tr>" + rows + "</table>" + more


def _skipped(report: Mapping[str, Any]) -> str:
    blocks = []
    for rec in report.get("passes") or []:
        if rec.get("skipped"):
            items = "".join(f"<li>{escape(s)}</li>" for s in rec["skipped"])
            blocks.append(f"<details><summary>{escape(rec['pass'])}: {len(rec['skipped'])} left alone</summary><ul>{items}</ul></details>")
    return "<h2>Left alone, and why</h2>" + "".join(blocks) if blocks else ""


def _notes(report: Mapping[str, Any]) -> str:
    notes = list(report.get("notes") or []) + list(report.get("warnings") or [])
    if not notes:
        return ""
    return "<h2>Notes</h2><ul>" + "".join(f"<li>{escape(str(n))}</li>" for n in notes) + "</ul>"


def _row(what: str, before: str, after: str, change: str) -> str:
    return f"<tr><td>{what}</td><td class=n>{before}</td><td class=n>{after}</td><td>{change}</td></tr>"


def _ratio(before: float | None, after: float | None) -> str:
    if not before or after is None:
        return ""
    return f"{(after - before) / before * 100:+.1f} %"


def _count_skipped(rec: Mapping[str, Any]) -> str:
    return f' <span class="muted">({len(rec["skipped"])} skipped)</span>' if rec.get("skipped") else ""


def _point_label(point: Mapping[str, Any]) -> str:
    strengths = point.get("strengths") or {}
    return ", ".join(f"{k}={v}" for k, v in strengths.items()) or "input"


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else "-"
