"""How figures of a report are written for people: counts, bytes, drift, a pass's statistics."""
from __future__ import annotations

import re
from typing import Any


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


def drift_summary(record: dict[str, Any]) -> str:
    """Worst absolute error and lowest cosine of a pass's outputs against the previous stage."""
    drift = record.get("drift")
    if not drift:
        return "-"
    if drift.get("unchanged"):
        return "unchanged"
    worst = max((m["max_abs"] for m in drift["outputs"].values()), default=0.0)
    cos = min((m["cosine"] for m in drift["outputs"].values()), default=1.0)
    return f"{worst:.1e} cos {cos:.6f}"


def least_fidelity(fidelity: dict[str, dict[str, Any]]) -> tuple[str, float]:
    """The output of report.json's ``evaluation.fidelity`` whose cosine is least as budgets read it (of the change, for an
    output that is an input plus a change), and that cosine; a NaN comes first."""
    judged = {n: m.get("change_cosine", m["cosine"]) for n, m in fidelity.items()}
    least = min(judged, key=lambda n: (judged[n] == judged[n], judged[n]))
    return least, judged[least]


def change_words(fidelity: dict[str, dict[str, Any]], name: str) -> str:
    """" (of what NAME adds to INPUT)" when ``name`` is judged by its change, else ""."""
    return f" (of what {name} adds to {fidelity[name]['change_of']})" if "change_of" in fidelity[name] else ""


def describe_stats(stats: dict[str, Any]) -> str:
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


def params_text(stats: dict[str, Any]) -> str:
    """Parameter count, with the nonzero count when a tenth or more are zeros (sparsified weights;
    quantised models have a few percent: zero points and weights rounded to zero)."""
    params, nonzero = stats["params"], stats.get("nonzero_params", stats["params"])
    if params and nonzero < 0.9 * params:
        return f"{human_count(params)} ({human_count(nonzero)} nz)"
    return human_count(params)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def macs_label(report: dict[str, Any]) -> str:
    """What the MACs column counts: shapes frozen with a leading dim above 1 (``--input-shape input=64x...``) are
    counted whole, a run of that batch; otherwise a symbolic batch counts as 1, a sample. Other symbolic dims
    (a sequence, an image size) also count as 1: the label then ends in ``*`` (:func:`macs_footnote`)."""
    shapes = report.get("input_shapes") or {}
    batches = {int(s[0]) for s in shapes.values() if isinstance(s, (list, tuple)) and s and isinstance(s[0], int)}
    label = f"MACs/run of {max(batches)}" if batches and max(batches) > 1 else "MACs/sample"
    symbolic = (report.get("before") or {}).get("macs_symbolic") or []
    return label + ("*" if symbolic else "")  # a sequence or image size left symbolic counts as 1: macs_footnote says so


def macs_footnote(report: dict[str, Any]) -> str | None:
    """The symbolic dims MACs counted as 1, when there are any (a count 200x too small otherwise passes unremarked)."""
    symbolic = (report.get("before") or {}).get("macs_symbolic") or []
    if not symbolic:
        return None
    # onnx's shape inference names the dims it derives from the inputs' sizes unk__0, unk__1, ...: no name of the model's
    named = [n for n in symbolic if not re.fullmatch(r"unk__\d+", n)]
    derived = len(symbolic) - len(named)
    names = ", ".join(n if len(n) <= 24 else n[:21] + "..." for n in named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")
    unnamed = f"{derived} dim{'s' if derived > 1 else ''} computed from the inputs' sizes"
    what = f"the symbolic dims {names}" + (f" and {unnamed}" if derived else "") if named else unnamed
    return f"* MACs count {what} as 1: freeze the inputs with --input-shape for the real size"
