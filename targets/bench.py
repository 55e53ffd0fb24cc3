"""``optc bench``: the artifact against onnxruntime on the same inputs, side by side."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from optc.evaluation import latency_ms
from optc.ir.io import load_model
from optc.ir.session import make_session, sample_feeds
from optc.targets.artifact import load_artifact


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def bench_artifact(folder: Path, repeats: int = 50) -> dict[str, Any]:
    artifact = load_artifact(folder)
    model = load_model(folder / "model.onnx")
    feeds = sample_feeds(model)
    tvm_out = artifact.run(feeds)
    names = list(tvm_out)
    ort_out = dict(zip(names, make_session(model).run(names, feeds)))
    diff = max(float(np.abs(tvm_out[n].astype(np.float64) - ort_out[n]).max()) for n in names)
    tvm_ms = _median_ms(lambda: artifact.run(feeds), repeats)
    ort_ms = latency_ms(model, feeds, repeats=repeats, budget_s=60)
    return {"tvm_ms": tvm_ms, "ort_ms": ort_ms, "ratio": tvm_ms / ort_ms, "repeats": repeats, "max_abs_diff": diff, "target": artifact.manifest["target"]["name"]}
