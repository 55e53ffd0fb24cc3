"""Reports people read: shared figure formatting and the self-contained ``report.html``.

The terminal table (``cli/render.py``) and the HTML page render the same
``report.json`` with the same formatting, so a figure reads alike in both.
"""
from __future__ import annotations

from optc.reporting.format import describe_stats, drift_summary, human_bytes, human_count, params_text
from optc.reporting.html import render_html

__all__ = ["describe_stats", "drift_summary", "human_bytes", "human_count", "params_text", "render_html"]
