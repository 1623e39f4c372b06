"""What runs alongside one trial: its heartbeat, and the observer of its runner's events."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kdcompress.progress import Progress, StageFinished

if TYPE_CHECKING:
    from kdcompress.search.study import Search

__all__ = ["Heartbeat", "TrialObserver"]


class Heartbeat:
    """Records ``time.time()`` in a running trial's ``heartbeat`` attribute every ``interval``
    seconds, from a thread, until stopped."""

    def __init__(self, trial: Any, interval: float) -> None:
        self.trial, self.interval = trial, interval
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial.number}",
                                       daemon=True)

    def _beat(self) -> None:
        while not self.stop_event.wait(self.interval):
            with contextlib.suppress(Exception):  # a missed beat is only a later one
                self.trial.set_user_attr("heartbeat", time.time())

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop_event.set()
        self.thread.join()


class TrialObserver(Progress):
    """The runner's events for one trial: which stages ran or came from the cache, their
    artifacts, each epoch's validation accuracy (the pruner's input)."""

    def __init__(self, search: Search, number: int, trial: Any = None,
                 references: list[dict[str, dict[str, float]]] | None = None,
                 recipes: Mapping[str, str] | None = None) -> None:
        self.search, self.number, self.trial = search, number, trial
        self.references = references or []
        self.recipes = dict(recipes or {})
        self.planned: set[str] = set()
        self.ran: list[str] = []
        self.cached: list[str] = []
        self.fingerprints: dict[str, str] = {}
        self.artifacts: dict[str, Any] = {}
        self.curves: dict[str, dict[str, float]] = {}

    def start(self, pipeline: str, planned: list[str]) -> None:
        self.planned = set(planned)

    def stage_started(self, name: str, function: str, cached: bool) -> None:
        if name in self.planned:
            (self.cached if cached else self.ran).append(name)
        self.search.progress.stage_started(self.number, name, cached)

    def epoch_callback(self, name: str) -> Any:
        def update(description: str, completed: int, total: int, info: str = "") -> None:
            self.search.progress.epoch(self.number, name, description, completed, total, info)

        return update

    def epoch_end(self, name: str, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics.get("val_score", metrics.get("val_accuracy"))  # the pipeline's metric
        if value is None or self.trial is None:
            return  # no validation accuracy to judge by (or measuring the front)
        # curves are compared between runs of one stage with the same settings (epochs,
        # learning rate...): only its inputs differ
        key = f"{name}@{self.recipes[name]}"
        self.curves.setdefault(key, {})[str(epoch)] = float(value)
        self.trial.set_user_attr("curves", self.curves)
        reason = self.search.prune_reason(name, key, epoch, float(value), self.references)
        if reason is not None:
            import optuna

            raise optuna.TrialPruned(reason)

    def stage_finished(self, event: StageFinished) -> None:
        self.fingerprints[event.name] = str(event.meta.get("fingerprint"))
        self.artifacts[event.name] = event.artifact
