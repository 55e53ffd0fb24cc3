"""Canonicalisation: exact rewrites that leave outputs equal (the ``canonicalize`` pipeline)."""
from __future__ import annotations

from optc.passes.canonicalize.conv3d_to_2d import Conv3dTo2d
from optc.passes.canonicalize.eliminate_dead_code import EliminateDeadCode
from optc.passes.canonicalize.fold_batchnorm import FoldBatchNorm
from optc.passes.canonicalize.fold_constants import FoldConstants
from optc.passes.canonicalize.remove_identity import RemoveIdentity

__all__ = ["Conv3dTo2d", "EliminateDeadCode", "FoldBatchNorm", "FoldConstants", "RemoveIdentity"]
