"""A time-budgeted search over per-pass strengths for the best objective within an accuracy budget.

The space: for each lossy pass with a scalable strength, a grid of fractions
of the value asked for (0 leaves the pass out); a pass without one is on or
off. The search is greedy, as NetAdapt's is: start from the strongest
configuration asked for (kept at once if it meets the budget), else from no
lossy pass at all (which always does), and move to the neighbour, one pass one
step stronger, that lowers the objective most while meeting the budget; steps
start at a quarter of the range and halve when no neighbour qualifies. Every
point explored is kept, the Pareto front (objective vs metric) is marked, and
each time a better feasible point is found ``on_improve`` is called so the
caller can publish it: a search stopped at any moment leaves its best on disk.

Orders: with time left after the order asked for, the same greedy search runs
on the other orders of the movable lossy passes (prune, sparsify, distill:
which one sees the other's output changes what each can take), each with its
own points. ``quantize`` (and any pass that must follow the float passes) keeps
its place: int8 weights are no input for a float refit. The canonicalize
prefix is computed once for every order (the :class:`PrefixRunner`).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from optc.ir.model import Model
from optc.passes.framework import Pass, PipelineResult
from optc.search.budget import Budget, configure, measure_pipeline
from optc.search.points import Point, pareto_front
from optc.search.prefix import PrefixRunner

GRID = 8  # strengths are multiples of 1/8 of what was asked
OnImprove = Callable[[Point, Model, list[Pass]], None]


@dataclass
class ExploreResult:
    best: Point
    run: PipelineResult  # the best pipeline's run: the caller reports it rather than running it again
    passes: list[Pass]
    points: list[Point]
    front: list[Point]
    stopped: str

    @property
    def model(self) -> Model:
        return self.run.model


class _Space:
    """Configurations as one level per lossy pass: ``0..GRID`` for scalable strengths, 0/GRID otherwise."""

    def __init__(self, passes: Sequence[Pass]):
        self.passes = list(passes)
        self.lossy = [i for i, p in enumerate(passes) if not p.exact]

    def pipeline(self, levels: tuple[int, ...]) -> list[Pass]:
        out = list(self.passes)
        drop: set[int] = set()
        for i, level in zip(self.lossy, levels):
            # configure() scales a strength (0 leaves the pass out); a pass without
            # one is simply on (any level) or off (level 0).
            scaled = configure([self.passes[i]], level / GRID, off=frozenset() if level else frozenset({0}))
            if scaled:
                out[i] = scaled[0]
            else:
                drop.add(i)
        return [p for i, p in enumerate(out) if i not in drop]

    def strengths(self, levels: tuple[int, ...]) -> dict[str, object]:
        out: dict[str, object] = {}
        for i, level in zip(self.lossy, levels):
            p = self.passes[i]
            value = getattr(p.config, p.strength_option(), None) if p.strength_option() else None
            key = f"{p.name}#{i}"
            out[key] = round(value * level / GRID, 6) if isinstance(value, (int, float)) and value else ("on" if level else 0)
        return out


def explore(passes: Sequence[Pass], runner: PrefixRunner, budget: Budget, *, objective: str, time_budget_s: float,
            on_improve: OnImprove | None = None, latency_ms: Callable[[Model], float] | None = None) -> ExploreResult:
    """Search until the time budget is spent or no stronger configuration meets the budget."""
    if objective == "latency" and latency_ms is None:
        raise ValueError("objective latency needs a latency measurement")
    space = _Space(passes)  # rebound for each order searched; evaluate() reads it
    deadline = time.monotonic() + time_budget_s
    points: list[Point] = []
    seen: dict[tuple[int, ...], Point] = {}
    best: list = [None, None, None]  # point, run, passes

    def evaluate(levels: tuple[int, ...]) -> Point:
        if levels in seen:
            return seen[levels]
        pipeline = space.pipeline(levels)
        point, run = measure_pipeline(runner, budget, pipeline, space.strengths(levels), latency_ms)
        points.append(point)
        seen[levels] = point
        if point.feasible and (best[0] is None or point.cost(objective) < best[0].cost(objective)):
            best[:] = [point, run, pipeline]
            if on_improve is not None:
                on_improve(point, run.model, pipeline)
        return point

    strongest = tuple(GRID for _ in space.lossy)
    stopped = "the strongest configuration asked for meets the budget"
    if not evaluate(strongest).feasible:
        stopped = _greedy(evaluate, tuple(0 for _ in space.lossy), deadline, objective)
        for order in other_orders(passes):
            if time.monotonic() >= deadline:
                stopped = "time budget spent"
                break
            space = _Space(order)  # evaluate() reads the current space: points of each order are its own
            seen.clear()
            _greedy(evaluate, tuple(0 for _ in space.lossy), deadline, objective)
        else:
            stopped += "; every order of the float passes searched" if len(movable(passes)) > 1 else ""
    front = pareto_front(points, objective)
    best[0].chosen = True
    return ExploreResult(best[0], best[1], best[2], points, front, stopped)


# Passes that must follow every float-weight pass (a refit or a low-rank fit of int8 weights means nothing).
LAST = frozenset({"quantize", "smoothquant", "pack-sparse"})
MAX_ORDERS = 6


def movable(passes: Sequence[Pass]) -> list[int]:
    """Positions of the lossy passes whose order may change."""
    return [i for i, p in enumerate(passes) if not p.exact and p.name not in LAST]


def other_orders(passes: Sequence[Pass]) -> list[list[Pass]]:
    """The pipeline with its movable lossy passes in every other order (at most :data:`MAX_ORDERS` in all)."""
    positions = movable(passes)
    out = []
    for perm in itertools.permutations(positions):
        if list(perm) == positions:
            continue
        order = list(passes)
        for slot, source in zip(positions, perm):
            order[slot] = passes[source]
        out.append(order)
    return out[: MAX_ORDERS - 1]


def _greedy(evaluate: Callable[[tuple[int, ...]], Point], current: tuple[int, ...], deadline: float, objective: str) -> str:
    evaluate(current)
    step = GRID // 4
    while True:
        moves = []
        for k in range(len(current)):
            if current[k] >= GRID:
                continue
            if time.monotonic() >= deadline:
                return "time budget spent"
            nxt = current[:k] + (min(GRID, current[k] + step),) + current[k + 1:]
            moves.append((evaluate(nxt), nxt))
        feasible = [(p, levels) for p, levels in moves if p.feasible]
        if feasible:
            # The neighbour that lowers the objective most; ties go to the better metric.
            _, current = min(feasible, key=lambda t: (t[0].cost(objective), -t[0].metric))
            continue
        if step == 1:
            return "no stronger configuration meets the budget"
        step //= 2
