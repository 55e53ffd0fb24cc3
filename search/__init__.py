"""Compression under an accuracy budget: how strong each lossy pass may be, found by measuring.

* ``prefix``: runs pipelines that share a prefix once (a pass configured the
  same on the same input gives the same model), so exploring strengths re-runs
  only what changed;
* ``budget``: the most compression within ``--max-drop`` / ``--min-fidelity``
  (bisection on the strength of every lossy pass, then per-pass back-off);
* ``explore``: a time-budgeted search over per-pass strengths for the best
  ``--objective`` (size, MACs or latency), with every point and the Pareto front.
"""
from __future__ import annotations

from optc.search.budget import Budget, BudgetResult, fit_to_budget
from optc.search.explore import ExploreResult, explore
from optc.search.points import Point, pareto_front
from optc.search.prefix import PrefixRunner

__all__ = ["Budget", "BudgetResult", "ExploreResult", "Point", "PrefixRunner", "explore", "fit_to_budget", "pareto_front"]
