"""The observers every run has: measuring each finished stage, and writing the report files.

The runner emits "stage finished with artifact X" (:class:`~kdcompress.progress.StageFinished`);
:class:`Measurer` measures X into a :class:`~kdcompress.report.StageRow` and adds it to the report,
:class:`ReportFiles` rewrites ``report.json`` / ``report.md`` / ``report.png``. Neither changes what
runs.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from kdcompress.data import Task
from kdcompress.metrics import MeasureConfig, measure_with_predictions
from kdcompress.progress import Progress, StageFinished
from kdcompress.report import Report, StageRow
from kdcompress.scoring import Metric, MetricLike

__all__ = ["Measurer", "ReportFiles"]


class Measurer(Progress):
    """Measures each finished stage on ``task`` and adds its row to the report.

    The baseline's test predictions give every later row its ``agreement``, and the baseline is
    timed interleaved with each later stage, so ``faster_by`` compares the two under the same
    machine load.

    Parameters
    ----------
    task : Task
        The data the artifacts are scored on.
    config : MeasureConfig
        Timing settings.
    order : list of str
        The pipeline's stage order; rows are kept in it.
    read_test : bool
        Score on the test split; ``False`` leaves it unread (see
        :func:`~kdcompress.metrics.measure`).
    only : collection of str, optional
        Measure these stages and the baseline only; the others get no row.
    metric : str or callable or Metric
        The pipeline's metric, scored beside top-1 accuracy (``score`` / ``val_score``).
    """

    def __init__(self, task: Task, config: MeasureConfig, order: list[str], *,
                 read_test: bool = True, only: Collection[str] | None = None,
                 metric: MetricLike = "accuracy") -> None:
        self.metric = Metric.resolve(metric)
        self.task = task
        self.config = config
        self.order = order
        self.read_test = read_test
        self.only = None if only is None else frozenset(only)
        self.baseline: Any = None
        self.baseline_predictions: torch.Tensor | None = None

    def stage_finished(self, event: StageFinished) -> None:
        report = event.report
        is_baseline = event.name == report.baseline
        if self.only is not None and not is_baseline and event.name not in self.only:
            return
        started = time.perf_counter()
        metrics, predictions = measure_with_predictions(
            event.artifact, self.task, config=self.config, folder=event.folder,
            reference=None if is_baseline else self.baseline_predictions,
            baseline=None if is_baseline else self.baseline, test=self.read_test,
            metric=self.metric)
        meta = event.meta
        event.row = StageRow(
            name=event.name, function=event.function, inputs=list(event.inputs),
            format=meta["format"], role=event.role,
            seconds=round(float(meta.get("seconds", 0.0)), 3), cached=event.cached,
            details=dict(meta.get("details") or {}), warnings=list(meta.get("warnings") or []),
            **metrics)
        if is_baseline:
            self.baseline = event.artifact
            self.baseline_predictions = predictions
        event.row.measure_seconds = round(time.perf_counter() - started, 3)
        report.add(event.row, order=self.order)


class ReportFiles(Progress):
    """Rewrites the report files after every stage and after a failure.

    Parameters
    ----------
    run_dir : Path
        Where ``report.json``, ``report.md`` and ``report.png`` go.
    plot : bool
        Draw ``report.png`` (matplotlib); off in tests that do not look at it.
    """

    def __init__(self, run_dir: Path, *, plot: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.plot = plot

    def stage_finished(self, event: StageFinished) -> None:
        event.report.save(self.run_dir, plot_png=self.plot)

    def stage_failed(self, name: str, message: str, report: Report) -> None:
        report.save(self.run_dir, plot_png=self.plot)
