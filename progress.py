"""Progress of a long pass, reported from wherever the work is done.

A pass can run for minutes (pruning a detector, distilling an audio model), and
its loops sit deep in helpers that never see the :class:`PassContext`:
calibration captures, per-layer refits. They call :func:`step` with how far
they are; whoever runs the pipeline (the CLI) installs a sink with
:func:`reporting_to` and shows it: a bar on a terminal, a line every few
seconds in a log. Without a sink, :func:`step` costs one context-variable read.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

Sink = Callable[[int, int, str], None]

_sink: ContextVar[Sink | None] = ContextVar("optc_pass_progress", default=None)


def step(done: int, total: int, unit: str) -> None:
    """``done`` of ``total`` ``unit`` (e.g. "layers refit") are finished in the running pass."""
    sink = _sink.get()
    if sink is not None:
        sink(done, total, unit)


@contextmanager
def reporting_to(sink: Sink) -> Iterator[None]:
    """Send every :func:`step` made inside this block (in this thread or context) to ``sink``."""
    token = _sink.set(sink)
    try:
        yield
    finally:
        _sink.reset(token)
