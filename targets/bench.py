"""``optc bench``: the artifact against onnxruntime on the same inputs, side by side.

The reference is the artifact's own ``model.onnx`` (and its external data),
checked against the manifest and read from the private copy made of the bytes
that were checked, like the library (see :mod:`optc.targets.artifact`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from optc.errors import ConfigError
from optc.ir.io import load_model
from optc.ir.session import sample_feeds
from optc.targets.artifact import load_verified, verify_artifact
from optc.targets.compare import versus_onnxruntime

MODEL = "model.onnx"


def bench_artifact(folder: Path, repeats: int = 50) -> dict[str, Any]:
    if repeats < 1:
        raise ConfigError(f"--repeats {repeats}: must be 1 or more")
    with verify_artifact(folder, also_copy=_model_files(folder)) as verified:
        artifact = load_verified(verified)
        model = load_model(verified.copies[MODEL])
    result = versus_onnxruntime(artifact, model, sample_feeds(model), budget_s=0, max_runs=min(repeats, 10),
                                min_blocks=max(1, -(-repeats // 10)))
    return {"tvm_ms": result["artifact_ms"], "ort_ms": result["onnxruntime_ms"], "ratio": result["ratio"], "repeats": repeats,
            "blocks": result["blocks"], "max_abs_diff": result["max_abs_diff"], "target": artifact.manifest["target"]["name"]}


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
