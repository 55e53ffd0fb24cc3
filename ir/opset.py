"""Opset versions: recording them, and upgrading old models with onnx's version converter.

Passes that need a newer opset (per-channel quantization needs 13 for the
``axis`` of QuantizeLinear) call :func:`upgrade_opset`; loading only checks
that a model older than :data:`MODERN_OPSET` could be upgraded, so files that
onnxruntime still runs are not refused.
"""
from __future__ import annotations

import onnx
from onnx import version_converter

from optc.errors import ModelLoadError, OptcError, first_line
from optc.ir.model import Model

# Opsets below this predate the broadcasting rules passes rely on.
MODERN_OPSET = 7


def _convert(proto: onnx.ModelProto, target: int) -> onnx.ModelProto:
    try:
        return version_converter.convert_version(proto, target)
    except Exception as exc:  # the converter raises RuntimeError, ValueError and its own types
        first = first_line(exc)
        raise OptcError(f"onnx's version converter cannot take opset {_opset(proto)} to {target}: {first}") from exc


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def check_upgradable(proto: onnx.ModelProto) -> None:
    """Raise :class:`ModelLoadError` when an old model cannot be brought to a modern opset."""
    version = _opset(proto)
    if 0 < version < MODERN_OPSET:
        try:
            _convert(proto, MODERN_OPSET)
        except OptcError as exc:
            raise ModelLoadError(f"unsupported opset {version}: {exc}") from exc


def upgrade_opset(model: Model, target: int) -> bool:
    """Bring ``model`` to at least opset ``target`` in place. Returns True when it changed."""
    if model.opset >= target:
        return False
    converted = _convert(model.proto, target)
    model.proto.CopyFrom(converted)
    model.notes.append(f"upgraded opset to {target}")
    return True
