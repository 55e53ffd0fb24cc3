"""Structured channel pruning.

Analysis apart from application, as in Torch-Pruning: ``groups`` finds the
dependency groups of channels that must be removed together, ``criteria`` scores
them, ``apply`` removes them and refits the consumers; ``prune_channels`` is the pass.
"""
from __future__ import annotations

from optc.passes.prune.prune_channels import PruneChannels

__all__ = ["PruneChannels"]
