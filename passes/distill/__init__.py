"""Distilled-subgraph replacement: ``distill`` (low-rank and narrower-MLP students, allocation) and ``distill-head``."""
from __future__ import annotations

from optc.passes.distill.distill import Distill
from optc.passes.distill.distill_head import DistillHead

__all__ = ["Distill", "DistillHead"]
