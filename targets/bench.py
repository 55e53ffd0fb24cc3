"""``optc bench``: the artifact against onnxruntime on the same inputs, side by side.

The reference is the artifact's own ``model.onnx`` (and its external data),
checked against the manifest and read from the private copy made of the bytes
that were checked, like the library (see :mod:`optc.targets.artifact`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from optc.errors import ConfigError
from optc.ir.io import load_model
from optc.ir.session import make_session, sample_feeds
from optc.targets.artifact import load_verified, verify_artifact
from optc.targets.compare import in_turns

MODEL = "model.onnx"


def bench_artifact(folder: Path, repeats: int = 50) -> dict[str, Any]:
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: must be 1 or more")
    with verify_artifact(folder, also_copy=_model_files(folder)) as verified:
        artifact = load_verified(verified)
        model = load_model(verified.copies[MODEL])
    feeds = sample_feeds(model)
    tvm_out = artifact.run(feeds)
    names = list(tvm_out)
    session = make_session(model)
    ort_out = dict(zip(names, session.run(names, feeds)))
    diff = max(float(np.abs(tvm_out[n].astype(np.float64) - ort_out[n]).max()) for n in names)
    # In turns, so that load from other users of the machine hits both alike (one after the other,
    # a busy spell during either run decided the ratio).
    best, blocks = in_turns({"tvm": lambda: artifact.run(feeds), "ort": lambda: session.run(names, feeds)},
                            budget_s=0, max_runs=min(repeats, 10), min_blocks=max(1, -(-repeats // 10)))
    return {"tvm_ms": best["tvm"], "ort_ms": best["ort"], "ratio": best["tvm"] / best["ort"], "repeats": repeats, "blocks": blocks,
            "max_abs_diff": diff, "target": artifact.manifest["target"]["name"]}


def _model_files(folder: Path) -> list[str]:
    """``model.onnx`` and its external data as optc writes it (``model.onnx.data``), when the manifest lists it.

    Only files the manifest lists are copied, so external data under another
    name is not found in the private copy and the model is refused, never read
    unchecked from the folder.
    """
    names = [MODEL]
    if (folder / f"{MODEL}.data").is_file():
        names.append(f"{MODEL}.data")  # verify_artifact refuses it when the manifest does not list it
    return names
