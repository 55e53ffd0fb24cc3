"""How distill's ``target_reduction`` is shared out between the candidate subgraphs.

Every candidate knows, without touching the data again, the relative error
``e_i`` and the params removed ``p_i`` of each admissible student size
(``tradeoff()``). Savings are counted in params, or in MACs (a student's MACs
shrink in proportion to its params: both stages see the same positions), so
candidate ``c`` saves ``p_i * w_c`` with ``w_c`` 1 or its MACs per param.

* ``common``: one relative-error budget for every subgraph, the smallest that
  reaches the target (bisection; removed amounts grow with the budget). It
  evens out the errors, i.e. it minimises the worst one.
* ``least-total``: the sizes with the least *summed* relative error that reach
  the target. Layer errors add up at the model outputs (measured on MiniLM:
  the cosine loss of sparsifying all blocks is the sum of the blocks' losses),
  so the sum is the better proxy; it is also what lets a MACs target favour
  the layers that are cheap in error per MAC saved. Solved by a Lagrange
  multiplier: for ``lam`` each candidate picks ``argmax lam * saved - error``
  over its sizes and the teacher itself (0, 0); the smallest ``lam`` that
  reaches the target is found by bisection. The greedy solution is optimal on
  the convex hull of each candidate's curve, which is what a multiplier can reach.

Measured (``benchmarks/distill.py``): on the sample CNN with ``reduce=macs``,
least-total removes 40.0 % of the MACs at 97.6 % top-1 where the common budget
removes 40.3 % at 96.7 % (teacher 98.0 %): it leaves the stem and the 1x1
convolution alone and cuts the 3x3 convolutions that hold the MACs. On MiniLM
(30 % of the params, narrower MLPs) the two are within noise (held-out cosine
0.951 vs 0.955), so ``common`` stays the default.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np

KEEP = -1.0  # budget meaning "no student for this candidate"


class Tradeoff(Protocol):
    key: str
    params: int

    def removed(self, budget: float) -> int: ...

    def tradeoff(self) -> tuple[np.ndarray, np.ndarray]: ...


def allocate(candidates: Sequence[Tradeoff], weights: Mapping[str, float], target: float, strategy: str) -> dict[str, float]:
    """Per candidate key, the relative-error budget its student is planned with (``KEEP``: none).

    ``target`` is in the units of ``removed * weight`` (params, or MACs).
    """
    if strategy == "common":
        budget = common_budget(candidates, weights, target)
        return {c.key: budget for c in candidates}
    if strategy == "least-total":
        return least_total_budgets(candidates, weights, target)
    raise ValueError(f"unknown allocation {strategy!r}")


def common_budget(candidates: Sequence[Tradeoff], weights: Mapping[str, float], target: float) -> float:
    """The smallest common budget under which the candidates save ``target``; the loosest (1.0) if none does."""

    def saved(budget: float) -> float:
        return sum(c.removed(budget) * weights[c.key] for c in candidates)

    lo, hi = -12.0, 0.0  # log10 budget
    if saved(10**hi) < target:
        return 1.0
    for _ in range(50):
        mid = (lo + hi) / 2
        if saved(10**mid) >= target:
            hi = mid
        else:
            lo = mid
    return 10**hi


def least_total_budgets(candidates: Sequence[Tradeoff], weights: Mapping[str, float], target: float) -> dict[str, float]:
    """Per candidate, the error of its size in the least-summed-error choice saving ``target`` (``KEEP``: the teacher)."""
    curves = []
    for c in candidates:
        errors, removed = c.tradeoff()
        # The teacher itself is an option: no error, nothing saved.
        curves.append((np.concatenate([[0.0], errors]), np.concatenate([[0.0], removed * weights[c.key]])))

    def choose(lam: float) -> list[int]:
        return [int(np.argmax(lam * saved - errors)) for errors, saved in curves]

    def total(choice: list[int]) -> float:
        return sum(float(saved[i]) for (_, saved), i in zip(curves, choice))

    # lam is error per unit saved: bracket it in log space around the curves' own ratios.
    lo, hi = -30.0, 10.0
    if total(choose(10**hi)) < target:
        lo = hi  # unreachable: save what can be saved
    else:
        for _ in range(80):
            mid = (lo + hi) / 2
            if total(choose(10**mid)) >= target:
                hi = mid
            else:
                lo = mid
    choice = choose(10**hi)
    return {c.key: (float(errors[i]) if i > 0 else KEEP) for c, (errors, _), i in zip(candidates, curves, choice)}
