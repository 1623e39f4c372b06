"""A search's events and the terminal that shows them: a live table of trials.

:class:`SearchProgress` receives the events (every method optional); :class:`RichSearchProgress`
draws a table that grows by one row per trial, with a line for the trial and stage running now;
off a terminal (logs, pipes) it prints one line per trial and the front at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdcompress.search.front import SearchResult, TrialSummary, render_front, trial_cells
from kdcompress.search.space import Param, values_text

__all__ = ["SearchProgress", "RichSearchProgress"]

log = logging.getLogger(__name__)


class SearchProgress:
    """Receives a search's events; every method is optional to override."""

    def start(self, pipeline: str, params: Mapping[str, Param], run_dir: Path,
              trials: list[TrialSummary], settings: Mapping[str, Any]) -> None:
        """The search starts in ``run_dir``; ``trials`` are those of earlier runs."""

    def trial_started(self, number: int, values: Mapping[str, Any]) -> None:
        """Trial ``number`` runs the pipeline with these parameter values."""

    def stage_started(self, number: int, name: str, cached: bool) -> None:
        """A stage of trial ``number`` starts (or is loaded from the cache); ``number`` is -1
        while the front is measured on the test split."""

    def epoch(self, number: int, stage: str, description: str, completed: int, total: int,
              info: str) -> None:
        """A training epoch of the trial's stage ended."""

    def trial_finished(self, trial: TrialSummary) -> None:
        """A trial ended (complete, pruned or failed)."""

    def retiming(self, count: int) -> None:
        """The trials are over; the final models of ``count`` of them, within the budget, are
        timed again side by side before the front is chosen."""

    def front_started(self, count: int) -> None:
        """The trials are over; ``count`` front pipelines are measured on the test split."""

    def finished(self, result: SearchResult) -> None:
        """The search ended; ``result`` holds the front (empty while other workers run)."""

    def warn(self, message: str) -> None:
        """Something the user should know."""
        log.warning("%s", message)


class RichSearchProgress(SearchProgress):
    """The live table of trials in the terminal.

    Parameters
    ----------
    console : rich.console.Console, optional
        Where to draw; a console on standard output by default.
    """

    def __init__(self, console: Any = None) -> None:
        from kdcompress.progress import make_console

        self.console = console or make_console()
        self.live: Any = None
        self.doc: dict[str, Any] = {}
        self.trials: list[TrialSummary] = []
        self.status = ""

    def start(self, pipeline: str, params: Mapping[str, Param], run_dir: Path,
              trials: list[TrialSummary], settings: Mapping[str, Any]) -> None:
        self.doc = {"objectives": list(settings["objectives"])}
        self.trials = list(trials)
        self.console.print(f"[bold]search[/] {pipeline} in {run_dir}: "
                           + ", ".join(f"{k} = {p!r}" for k, p in params.items()),
                           highlight=False)
        self.console.print(f"objectives {', '.join(settings['objectives'])} of stage "
                           f"'{settings['target']}'; budget {settings['max_drop']:g} validation "
                           f"points below '{settings['baseline']}'"
                           + (f"; {len(trials)} trials from earlier runs" if trials else ""),
                           highlight=False)
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._renderable(), console=self.console, refresh_per_second=4)
            self.live.start()

    def _table(self) -> Any:
        from dataclasses import asdict

        from rich.table import Table

        header, rows = trial_cells({**self.doc, "trials": [asdict(t) for t in self.trials]})
        table = Table(title="trials", show_lines=False)
        for h in header:
            table.add_column(h, justify="left" if h in ("trial", "state", "note") else "right",
                             overflow="fold")
        for r in rows[-30:]:  # the newest trials; frontier.md keeps them all
            table.add_row(*r)
        return table

    def _renderable(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        return Group(self._table(), Text(self.status))

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._renderable())

    def trial_started(self, number: int, values: Mapping[str, Any]) -> None:
        self.status = f"trial {number}: {values_text(values)}"
        self._refresh()

    def stage_started(self, number: int, name: str, cached: bool) -> None:
        self.status = (f"{_who(number)}: {name} "
                       + ("(loading from cache)" if cached else "(running)"))
        self._refresh()

    def epoch(self, number: int, stage: str, description: str, completed: int, total: int,
              info: str) -> None:
        self.status = f"{_who(number)}: {stage} ({description}) {completed}/{total} {info}"
        self._refresh()

    def trial_finished(self, trial: TrialSummary) -> None:
        self.trials.append(trial)
        self.status = ""
        if self.live is None:
            from dataclasses import asdict

            header, rows = trial_cells({**self.doc, "trials": [asdict(trial)]})
            self.console.print("  ".join(f"{h} {c}" for h, c in zip(header, rows[0], strict=True)
                                         if c not in ("", "-")), highlight=False)
        self._refresh()

    def retiming(self, count: int) -> None:
        self.status = f"timing the {count} models within the budget again, side by side"
        self._refresh()

    def front_started(self, count: int) -> None:
        self.status = f"measuring the front ({count} pipelines) on the test split"
        self._refresh()

    def close(self) -> None:
        """Stop drawing (the search ended, or was interrupted)."""
        if self.live is not None:
            self.status = ""
            self.live.update(self._renderable())
            self.live.stop()
            self.live = None

    def finished(self, result: SearchResult) -> None:
        self.close()
        doc = result.to_dict()
        if doc["front"] or doc.get("baseline_point"):
            self.console.print(render_front(doc))
        self.console.print(result.summary(), highlight=False, soft_wrap=True)
        for note in result.notes:
            self.console.print(f"[yellow]note[/] {note}", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning[/] {message}", highlight=False)


def _who(number: int) -> str:
    return f"trial {number}" if number >= 0 else "measuring on the test split"
