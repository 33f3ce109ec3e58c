"""How long-running work reports where it is: one interface for every driver.

Drivers (export, loading, eval, bench, analyze, the op-library build) take a
:class:`Progress` and call ``stage`` for each step and ``start`` / ``advance``
where the work has a known size. The CLI passes :func:`console_progress`: a live
bar on a terminal, and on anything else (a log file, CI) one plain timestamped
line per stage on stderr, so a long run shows where it is as it goes.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Protocol


class Progress(Protocol):
    """What a driver reports."""

    def stage(self, message: str) -> None:
        """A new step begins (shown at once)."""

    def start(self, total: int | None) -> None:
        """The current step has ``total`` units of work (None: unknown)."""

    def advance(self, count: int = 1) -> None:
        """``count`` more units of the current step are done."""


class Silent:
    """Reports nothing: the default for library callers."""

    def stage(self, message: str) -> None:
        pass

    def start(self, total: int | None) -> None:
        pass

    def advance(self, count: int = 1) -> None:
        pass


def or_silent(progress: Progress | None) -> Progress:
    return progress if progress is not None else Silent()


class Lines:
    """One line per stage on a stream, with the seconds since the start: for logs."""

    def __init__(self, stream=None) -> None:  # noqa: ANN001 - any text stream
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.total: int | None = None
        self.done = 0
        self.label = ""
        self.last_report = 0.0

    def _write(self, text: str) -> None:
        self.stream.write(f"[{time.perf_counter() - self.started:6.0f} s] {text}\n")
        self.stream.flush()

    def stage(self, message: str) -> None:
        self.label = message
        self._write(message)

    def start(self, total: int | None) -> None:
        self.total, self.done = total, 0
        self.last_report = time.perf_counter()  # the first heartbeat comes 30 s in, not at once

    def advance(self, count: int = 1) -> None:
        self.done += count
        now = time.perf_counter()
        if self.total and now - self.last_report >= 30:  # a heartbeat, not a line per unit
            self.last_report = now
            self._write(f"{self.label}: {self.done}/{self.total}")


class _RichBar:
    """A live rich progress bar (spinner, description, bar, counts, times) on a terminal."""

    def __init__(self, bar, echo: bool) -> None:  # noqa: ANN001 - rich.progress.Progress
        self.bar = bar
        self.task = bar.add_task("starting", total=None)
        self.echo = echo

    def stage(self, message: str) -> None:
        self.bar.update(self.task, description=message)
        if self.echo:
            self.bar.console.print(f"  {message}", style="dim", highlight=False, markup=False)

    def start(self, total: int | None) -> None:
        self.bar.update(self.task, total=total, completed=0)

    def advance(self, count: int = 1) -> None:
        self.bar.advance(self.task, count)


@contextlib.contextmanager
def console_progress(console, echo: bool = False) -> Iterator[Progress]:  # noqa: ANN001 - rich Console
    """The CLI's progress: a live bar on a terminal, else :class:`Lines` on the console's
    stream. ``echo`` keeps each stage's message in the terminal's scrollback too."""
    if not console.is_terminal:
        yield Lines(console.file)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    columns = (
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )  # fmt: skip
    with RichProgress(*columns, console=console, transient=not echo) as bar:
        yield _RichBar(bar, echo)
