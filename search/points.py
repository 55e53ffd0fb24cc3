"""One explored configuration and the Pareto front of a set of them."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass
class Point:
    """A pipeline configuration and what it measured.

    ``strengths`` maps ``pass#index`` to the value of its strength option (0:
    the pass left out; None: run as configured). ``metric`` is the budget's
    metric on held-out data; ``feasible`` whether it met the budget.
    """

    strengths: dict[str, Any]
    metric: float
    drop: float
    bytes: int
    macs: int
    feasible: bool
    latency_ms: float | None = None
    seconds: float = 0.0
    pareto: bool = False
    chosen: bool = False
    passes: list[str] = field(default_factory=list)

    def cost(self, objective: str) -> float:
        """What the search minimises."""
        if objective == "latency":
            return self.latency_ms if self.latency_ms is not None else float("inf")
        return float(self.macs if objective == "macs" else self.bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "strengths": self.strengths, "passes": self.passes, "metric": self.metric, "drop": self.drop, "bytes": self.bytes,
            "macs": self.macs, "latency_ms": self.latency_ms, "feasible": self.feasible, "seconds": round(self.seconds, 3),
            "pareto": self.pareto, "chosen": self.chosen,
        }


def pareto_front(points: Sequence[Point], objective: str) -> list[Point]:
    """Points no other point beats on both cost (lower) and metric (higher); marks them ``pareto``."""
    front = []
    for p in points:
        dominated = any(
            q is not p and q.cost(objective) <= p.cost(objective) and q.metric >= p.metric
            and (q.cost(objective) < p.cost(objective) or q.metric > p.metric)
            for q in points
        )
        p.pareto = not dominated
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.cost(objective))
