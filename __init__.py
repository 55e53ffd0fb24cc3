"""optc: an ONNX model-compression compiler.

Load a model with :func:`optc.ir.load_model`, run passes with
:class:`optc.passes.PassManager`, save with :func:`optc.ir.save_model`.
"""
from __future__ import annotations

__version__ = "0.1.0"
