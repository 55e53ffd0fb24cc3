"""Live progress on stderr: a spinner per pass (a line every few seconds off a terminal) and a bar while TVM tunes.

TVM's build runs with file descriptors 1 and 2 redirected (MetaSchedule's tables
and native warnings must not reach the user's terminal or the --json output),
so the tuning display writes to its own duplicate of the original stderr.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optc.passes.framework import Pass, PassContext, PassResult
from optc.passes.framework.manager import Instrument, PassRecord
from optc.targets.tuning_progress import TuneProgress, format_ms


class ProgressInstrument(Instrument):
    """Which pass runs and how far it is (stderr).

    On a terminal, a spinner line: ``[5/6] prune-channels: 12/40 layers refit``.
    Off a terminal (a CI log), one line every :data:`LOG_EVERY_S` seconds while a
    pass runs, then sparser as it goes on (at most a minute apart), so a long pass
    is never silent and a log is never flooded. Passes
    report their steps through :mod:`optc.progress`; :meth:`step` is the sink.
    """

    LOG_EVERY_S = 5.0
    display_only = True

    def __init__(self, console: Console, total: int, stream: TextIO | None = None):
        self.console = console
        self.terminal = console.is_terminal
        self.stream = stream if stream is not None else sys.stderr
        self.total = total
        self.index = 0
        self.name = ""
        self.started = 0.0
        self.steps: tuple[int, int, str] | None = None
        self.status = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.logger: threading.Thread | None = None

    def before_pass(self, p: Pass, model, ctx: PassContext) -> None:
        with self.lock:
            self.index = self.index + 1 if self.index < self.total else 1  # the default budget may run the pipeline again
            self.name, self.started, self.steps = p.name, time.monotonic(), None
        if self.terminal:
            if self.status is None:
                self.status = self.console.status("")
                self.status.start()
            self.status.update(self._line())
        elif self.logger is None:
            self.logger = threading.Thread(target=self._log_lines, name="optc-progress", daemon=True)
            self.logger.start()

    def step(self, done: int, total: int, unit: str) -> None:
        with self.lock:
            self.steps = (done, total, unit)
        if self.terminal and self.status is not None:
            self.status.update(self._line())

    def after_pass(self, p: Pass, before, result: PassResult, record: PassRecord, ctx: PassContext) -> None:
        with self.lock:
            self.name = ""
        if self.index >= self.total and self.status is not None:
            self.status.stop()
            self.status = None

    def close(self) -> None:
        """End the display (the spinner, the log thread); call once the compile is over."""
        if self.status is not None:
            self.status.stop()
            self.status = None
        self.stop.set()

    def _line(self) -> str:
        text = f"[{self.index}/{self.total}] {self.name}"
        if self.steps is not None:
            done, total, unit = self.steps
            text += f": {done}/{total} {unit}"
        return text

    def _log_lines(self) -> None:
        last = time.monotonic()
        while not self.stop.wait(0.5):
            with self.lock:
                # Every LOG_EVERY_S at first, then sparser (a fifth of the time so far, at most a minute
                # apart): a pass of many minutes should not fill a log with hundreds of lines.
                every = min(60.0, max(self.LOG_EVERY_S, (time.monotonic() - self.started) / 5))
                running = self.name and time.monotonic() - last >= every
                line = f"optc: {self._line()}, {time.monotonic() - self.started:.0f} s" if running else None
            if line is not None:
                print(line, file=self.stream, flush=True)
                last = time.monotonic()
            elif not self.name:
                last = time.monotonic()  # the clock restarts with each pass


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
