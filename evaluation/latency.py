"""Latency of onnxruntime sessions on the CPU: one model alone, or several in turns."""
from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from optc.ir.model import Model
from optc.ir.session import make_session


def latency_ms(model: Model, feeds: Mapping[str, np.ndarray], *, repeats: int = 30, budget_s: float = 3.0, threads: int | None = None) -> float:
    """Median wall time of one run in milliseconds (after two warm-up runs)."""
    session = make_session(model, threads=threads)
    feeds = dict(feeds)
    for _ in range(2):
        session.run(None, feeds)
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < repeats and (len(times) < 5 or time.perf_counter() < deadline):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def interleaved_latency_ms(sessions: Sequence[Any], feeds: Mapping[str, np.ndarray], *, blocks: int = 5, runs: int = 40, warmup: int = 5,
                           budget_s: float | None = None) -> list[float]:
    """Per session, the lowest of ``blocks`` medians of ``runs`` timed runs, in milliseconds.

    For comparisons on a shared machine: the sessions (anything with
    onnxruntime's ``run(None, feeds)``) take turns block by block, so a
    neighbour's job slows them alike, and the lowest block median drops the
    disturbed blocks. Ratios of the results are what to quote. With
    ``budget_s`` the runs per block (at most ``runs``, at least 3) are sized
    from the warm-up times so the whole measurement takes about that long; a
    model so slow that 3 runs a block do not fit gets fewer blocks (at least 2)
    and runs, and only the warm-up that sized them (RivaGAN's decoder on 16
    frames of 256x256, 7.6 s a round: 10 blocks of 3 runs and 5 warm-ups took
    270 s of a 4 s budget).
    """
    feeds = dict(feeds)
    spent, rounds = 0.0, 0
    for i in range(warmup):
        for s in sessions:
            start = time.perf_counter()
            s.run(None, feeds)
            if i:  # the first run pays for allocations
                spent += time.perf_counter() - start
        rounds += bool(i)
        if budget_s is not None and rounds and spent / rounds * (3 * blocks) > budget_s:
            break  # a slow model: what it costs is known, and more warm-up is more of the budget
    if budget_s is not None and spent > 0:
        affordable = budget_s / (spent / rounds)  # rounds (one run of every session) within the budget
        blocks = int(np.clip(affordable // 3, 2, blocks))
        runs = int(np.clip(affordable / blocks, 1 if affordable < 3 * blocks else 3, runs))
    medians: list[list[float]] = [[] for _ in sessions]
    for _ in range(blocks):
        for s, block in zip(sessions, medians):
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - start)
            block.append(float(np.median(times)))
    return [1000 * min(m) for m in medians]
