"""int8 quantisation: the ``quantize`` pass (calibrators, QDQ placement and rewriting) and ``smoothquant``."""
from __future__ import annotations

from optc.passes.quantize.quantize import Quantize
from optc.passes.quantize.smoothquant import SmoothQuant

__all__ = ["Quantize", "SmoothQuant"]
