"""Imports every pass module of this package so that their @register_pass decorators run.

Discovery (rather than a hand-kept list) lets each pass live in its own module
without a shared file to edit.
"""
from __future__ import annotations

import importlib
import pkgutil

import optc.passes as _package

# Framework and numerical modules hold no passes; every other module may.
_FRAMEWORK = {"base", "builtin", "calibration", "instruments", "manager", "options", "pipeline", "layers", "lowrank", "sparsity_patterns", "calibrators", "qdq"}

for _info in pkgutil.iter_modules(_package.__path__):
    if _info.name not in _FRAMEWORK and not _info.name.startswith("_"):
        importlib.import_module(f"optc.passes.{_info.name}")
