"""The runner's events and the terminal that shows them: a growing table and a progress bar.

The runner reports events to a list of observers, each a :class:`Progress`: measuring
(:class:`kdcompress.observers.Measurer`) fills the stage's row, the report files
(:class:`kdcompress.observers.ReportFiles`) are rewritten, then the terminal draws it
(:class:`RichProgress` with rich; :class:`NullProgress` only logs, for library use and tests).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcompress.context import ProgressFn
from kdcompress.report import Report, StageRow

__all__ = ["Progress", "StageFinished", "NullProgress", "RichProgress", "make_console"]

log = logging.getLogger(__name__)


def make_console(**kwargs: Any) -> Any:
    """A rich console; when output is not a terminal (logs, pipes), wide enough for the table."""
    from rich.console import Console

    console = Console(**kwargs)
    if not console.is_terminal:
        console = Console(width=240, **kwargs)
    return console


@dataclass
class StageFinished:
    """A stage completed (or was loaded from the cache) with ``artifact``.

    Attributes
    ----------
    name, function, inputs, role : str, str, list of str, str
        The stage as declared.
    artifact : nn.Module or OnnxModel
        What it produced, as it lives in the run folder.
    folder : Path
        Its folder in the run folder.
    meta : dict
        Its ``meta.json`` (seconds, details, warnings).
    cached : bool
        Loaded from the run folder instead of run.
    report : Report
        The run's report, which observers earlier in the list may have updated.
    row : StageRow, optional
        The measured row, once the measuring observer has seen the event.
    """

    name: str
    function: str
    inputs: list[str]
    role: str
    artifact: Any
    folder: Path
    meta: dict[str, Any]
    cached: bool
    report: Report
    row: StageRow | None = field(default=None)


class Progress:
    """Receives the runner's events; every method is optional to override."""

    def start(self, pipeline: str, planned: list[str]) -> None:
        """The run starts with these stages."""

    def stage_started(self, name: str, function: str, cached: bool) -> None:
        """A stage starts (or is loaded from the cache)."""

    def epoch_callback(self, name: str) -> ProgressFn | None:
        """A function the stage calls after each epoch, or ``None``."""
        return None

    def epoch_end(self, name: str, epoch: int, metrics: dict[str, float]) -> None:
        """Training epoch ``epoch`` of stage ``name`` ended with these validation metrics; raise
        to stop the stage."""

    def stage_finished(self, event: StageFinished) -> None:
        """A stage completed (``event.row`` is set once measured)."""

    def stage_failed(self, name: str, message: str, report: Report) -> None:
        """A stage raised; ``report`` records the failure."""

    def warn(self, name: str, message: str) -> None:
        """A stage left a warning."""

    def stop(self) -> None:
        """The run ended (successfully or not)."""


class NullProgress(Progress):
    """Logs events through :mod:`logging` and draws nothing."""

    def stage_finished(self, event: StageFinished) -> None:
        if event.row is not None:
            log.info("%s: accuracy %s, validation %s, %d bytes", event.name, event.row.accuracy,
                     event.row.val_accuracy, event.row.size_bytes)

    def warn(self, name: str, message: str) -> None:
        log.warning("%s: %s", name, message)


class RichProgress(Progress):
    """Draws the per-stage table as it grows, with a progress bar for training epochs.

    On a terminal the table and the bar are live; elsewhere (CI logs, pipes) each finished stage
    prints one line and the whole table is printed at the end.
    """

    def __init__(self, console: Any = None) -> None:
        self.console = console or make_console()
        self.live: Any = None
        self.bar: Any = None
        self.task_id: Any = None
        self.report: Any = None

    def start(self, pipeline: str, planned: list[str]) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console.print(f"[bold]{pipeline}[/]: {' -> '.join(planned)}")
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                            console=self.console, transient=True)
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._renderable(), console=self.console, refresh_per_second=8)
            self.live.start()

    def _renderable(self) -> Any:
        from rich.console import Group

        from kdcompress.report import render_table

        parts = [render_table(self.report)] if self.report is not None and self.report.stages \
            else []
        return Group(*parts, self.bar)

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._renderable())

    def stage_started(self, name: str, function: str, cached: bool) -> None:
        if self.task_id is not None:
            self.bar.remove_task(self.task_id)
        what = "loading from cache" if cached else "running"
        self.task_id = self.bar.add_task(f"{name} ({function}): {what}", total=None, info="")
        self._refresh()

    def epoch_callback(self, name: str) -> ProgressFn | None:
        def update(description: str, completed: int, total: int, info: str = "") -> None:
            self.bar.update(self.task_id, description=f"{name} ({description})",
                            completed=completed, total=total, info=info)
            if self.live is None:  # logs: one line per epoch
                self.console.print(f"  {name}: {description} {completed}/{total} {info}",
                                   highlight=False)

        return update

    def stage_finished(self, event: StageFinished) -> None:
        self.report = event.report
        row = event.row
        if row is None:
            return
        if self.live is None:
            lat = (row.batch_latency() or {}).get("p50")
            self.console.print(
                f"[green]done[/] {row.name}: {row.params} params, {row.size_bytes} "
                f"bytes, b64 {lat} ms, {_scores(row)}" + (" (cached)" if row.cached else ""),
                highlight=False)
        for flag in row.flags:
            self.console.print(f"[yellow]note[/] {row.name}: {flag}", highlight=False)
        self._refresh()

    def stage_failed(self, name: str, message: str, report: Report) -> None:
        self.console.print(f"[red bold]stage '{name}' failed:[/] {message}")

    def warn(self, name: str, message: str) -> None:
        self.console.print(f"[yellow]warning[/] {name}: {message}")

    def stop(self) -> None:
        if self.task_id is not None:
            self.bar.remove_task(self.task_id)
            self.task_id = None
        if self.live is not None:
            self.live.update(self._renderable())
            self.live.stop()
            self.live = None
        elif self.report is not None and self.report.stages:
            from kdcompress.report import render_table

            self.console.print(render_table(self.report))


def _scores(row: StageRow) -> str:
    """``"accuracy 98.33%"``; the validation accuracy alone when the test split was left unread."""
    if row.accuracy is not None:
        return f"accuracy {100 * row.accuracy:.2f}%"
    if row.val_accuracy is not None:
        return f"validation accuracy {100 * row.val_accuracy:.2f}%"
    return "no accuracy measured"
