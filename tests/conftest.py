"""Fixtures; plain helpers live in helpers.py (tests/ is on pythonpath)."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest


@pytest.fixture
def save(tmp_path):
    """Save a ModelProto under tmp_path and return its path."""

    def _save(model: onnx.ModelProto, name: str = "model.onnx") -> Path:
        path = tmp_path / name
        onnx.save_model(model, str(path))
        return path

    return _save
