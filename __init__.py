"""optc: an ONNX model-compression compiler.

The library entry point is :func:`optc.api.compile`, also here as
``optc.compile_model`` (a name that does not shadow the builtin ``compile``)::

    from optc import compile_model
    from optc.api import make_pass, named_pipeline

    result = compile_model("model.onnx", [*named_pipeline("canonicalize"), make_pass("prune-channels", {"ratio": 0.3})],
                           calibration="calib.npz", output="out/model")
    print(result.report.after.macs)

The pieces: :func:`optc.ir.load_model`, :class:`optc.passes.PassManager`, :func:`optc.ir.save_model`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["CompileResult", "Report", "__version__", "compile_model"]

if TYPE_CHECKING:
    from optc.api import CompileResult, Report
    from optc.api import compile as compile_model

_LAZY = ("CompileResult", "Report", "compile_model")


def __getattr__(name: str) -> Any:
    # Imported on first use, so that `import optc` (and `optc --help`) does not load numpy and onnx.
    if name in _LAZY:
        from optc import api

        return api.compile if name == "compile_model" else getattr(api, name)
    raise AttributeError(f"module 'optc' has no attribute {name!r}")
