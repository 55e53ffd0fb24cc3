"""Live progress on stderr: a spinner per pass and a bar while TVM tunes.

TVM's build runs with file descriptors 1 and 2 redirected (MetaSchedule's tables
and native warnings must not reach the user's terminal or the --json output),
so the tuning display writes to its own duplicate of the original stderr.
"""
from __future__ import annotations

import os
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optc.passes.framework import Pass, PassContext, PassResult
from optc.passes.framework.manager import Instrument, PassRecord
from optc.targets.tuning_progress import TuneProgress, format_ms


class ProgressInstrument(Instrument):
    """A spinner line per pass while a pipeline runs (stderr, only on a terminal)."""

    def __init__(self, console: Console, total: int):
        self.console = console
        self.total = total
        self.index = 0
        self.status = None

    def before_pass(self, p: Pass, model, ctx: PassContext) -> None:
        self.index += 1
        if self.status is None:
            self.status = self.console.status("")
            self.status.start()
        self.status.update(f"[{self.index}/{self.total}] {p.name}")

    def after_pass(self, p: Pass, before, result: PassResult, record: PassRecord, ctx: PassContext) -> None:
        if self.index == self.total and self.status is not None:
            self.status.stop()
            self.status = None


def original_stderr() -> TextIO:
    """A stream on a duplicate of fd 2, unaffected by later redirections of fd 2."""
    return open(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")


class TuningView:
    """Tuning progress: a bar on a terminal, one line per finished task otherwise (CI logs).

    Call it with each :class:`TuneProgress`; ``close`` when the compile ends.
    """

    def __init__(self, stream: TextIO, terminal: bool):
        self.stream = stream
        self.terminal = terminal
        self.progress: Progress | None = None
        self.task_id = None
        self.done = 0

    def __call__(self, p: TuneProgress) -> None:
        if self.terminal:
            self._bar(p)
        elif p.tasks_done > self.done or (p.trials == 0 and self.done == 0):
            self.done = p.tasks_done
            last = ""
            if p.task:
                last = f" (last: {p.task[:60]}, {format_ms(p.task_best_ms) if p.task_best_ms is not None else 'no candidate ran'})"
            print(f"tuning: {p.describe()}{last}", file=self.stream, flush=True)

    def _bar(self, p: TuneProgress) -> None:
        status = f"tasks {p.tasks_done}/{p.tasks}  best {format_ms(p.estimated_ms)}" if p.estimated_ms is not None else f"tasks {p.tasks_done}/{p.tasks}"
        if p.failed:
            status += f"  failed {p.failed}"
        if self.progress is None:
            console = Console(file=self.stream, force_terminal=True)
            self.progress = Progress(
                TextColumn("tuning"), BarColumn(), MofNCompleteColumn(), TextColumn("trials  {task.fields[status]}"),
                TimeElapsedColumn(), console=console, transient=False,
            )
            self.progress.start()
            self.task_id = self.progress.add_task("tuning", total=p.trials_total, status=status)
        self.progress.update(self.task_id, completed=p.trials, status=status)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        self.stream.close()
