"""report.html: self-contained, escaped, and rendered by a real headless browser."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import SAMPLE

from optc.reporting import render_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags for a sandboxed, offline machine: no background connections, a fresh profile.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "optc.cli.main", "compile", str(SAMPLE / "mnist_cnn.onnx"), "-o", str(out), "--pass", "canonicalize",
         "--pass", "prune-channels:ratio=0.3", "--calib", str(SAMPLE / "calib.npz"), "--eval", str(SAMPLE / "test.npz"), "--no-latency", "--verify-each"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return out


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links.extend(v for k, v in attrs if k in ("src", "href") and v)

    def handle_data(self, data):
        self.text.append(data)


def test_report_html_is_written_self_contained_and_shows_the_run(compiled):
    page = (compiled / "report.html").read_text()
    report = json.loads((compiled / "report.json").read_text())
    parsed = _Collector()
    parsed.feed(page)
    assert parsed.links == [] and "script" not in parsed.tags and "http" not in page  # nothing to fetch, nothing to run
    text = " ".join(parsed.text)
    for rec in report["passes"]:
        assert rec["pass"] in text
    assert "Summary" in text and "accuracy (1000 labelled samples)" in text and "Per-layer MACs" in text
    assert parsed.tags.count("svg") >= 3


def test_names_from_the_model_are_escaped():
    report = {"model": {"source": "<script>alert(1)</script>"}, "pipeline": ["x[/y]"], "before": {"params": 1, "param_bytes": 4, "macs": 1,
              "macs_per_node": {"<b>node</b>": 1}}, "after": {"params": 1, "param_bytes": 4, "macs": 1, "macs_per_node": {}},
              "passes": [{"pass": "p", "modified": False, "seconds": 0.1, "after": {"params": 1, "bytes": 4, "macs": 1, "nodes": 1},
                          "stats": {}, "skipped": ["<img src=x>: reason"]}], "evaluation": {}}
    page = render_html(report)
    assert "<script>" not in page and "<b>node</b>" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x&gt;" in page


def test_search_points_and_front_are_plotted():
    points = [{"strengths": {"prune-channels#1": s}, "metric": m, "bytes": b, "macs": b, "feasible": m > 0.97, "pareto": p, "chosen": c}
              for s, m, b, p, c in [(0.0, 0.98, 1000, True, False), (0.3, 0.975, 600, True, True), (0.6, 0.95, 400, True, False), (0.45, 0.94, 500, False, False)]]
    page = render_html({"search": {"points": points, "objective": "bytes", "metric": "top1"}})
    assert "Search (4 points explored)" in page and "polyline" in page and page.count("★") == 3 and "chosen" in page


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (make setup-test installs Debian's chromium where apt is available)")
def test_a_real_browser_renders_the_report(compiled, tmp_path):
    shot = tmp_path / "report.png"
    url = (compiled / "report.html").resolve().as_uri()
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0 and "prune-channels" in dom.stdout and "<svg" in dom.stdout
    subprocess.run([*common, "--window-size=1200,1600", f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000  # a blank page compresses to a few KB


@pytest.mark.parametrize(("shapes", "label"), [
    ({"input": [64, 1, 28, 28]}, "MACs/run of 64"),  # frozen at 64: the count is a whole run's (303.87M for the sample)
    ({"input": [1, 1, 64, 170]}, "MACs/sample"),
    ({}, "MACs/sample"),  # a symbolic batch counts as 1
])
def test_the_macs_column_says_what_it_counts(shapes, label):
    """The column read "MACs/sample" over a batch-64 compile's whole-run count, 64x the per-sample figure."""
    from optc.reporting.format import macs_label

    assert macs_label({"input_shapes": shapes}) == label
    report = {"model": {"source": "m.onnx"}, "input_shapes": shapes, "before": {"params": 1, "param_bytes": 4, "macs": 10, "nodes": 1},
              "after": {"params": 1, "param_bytes": 4, "macs": 10, "nodes": 1}, "passes": [], "evaluation": {}}
    assert label.replace("/", " per ") in render_html(report)
