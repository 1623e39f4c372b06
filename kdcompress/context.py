"""What a running stage knows about its surroundings: the data, the device, where to write files.

A stage function that declares a ``ctx`` parameter receives a :class:`StageContext` from the
scheduler; one that declares ``data`` receives the pipeline's :class:`~kdcompress.data.Task`.
Called directly from Python, stages build a standalone context themselves
(:meth:`StageContext.standalone`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcompress.data import Task
from kdcompress.scoring import Metric, MetricLike

__all__ = ["StageContext", "ProgressFn", "EpochFn"]

log = logging.getLogger(__name__)

#: ``progress(description, completed, total, info)``: called once per epoch by training stages.
ProgressFn = Callable[[str, int, int, str], None]
#: ``on_epoch(epoch, metrics)``: called after each training epoch with its validation metrics
#: (``{"val_accuracy": ..., "loss": ...}``); it may raise to stop the stage (a search stops a
#: trial that is clearly behind this way).
EpochFn = Callable[[int, dict[str, float]], None]


@dataclass
class StageContext:
    """The surroundings of one stage run.

    Attributes
    ----------
    name : str
        The stage's output name (``"teacher"``, ``"int8"``).
    data : Task
        The pipeline's data.
    device : torch.device
        Where training happens (``cpu`` or ``cuda``).
    seed : int
        The pipeline's seed; stages seed their randomness from it.
    workdir : Path
        An empty folder the stage may write files into (ONNX graphs); it becomes the artifact's
        folder when the stage completes.
    details : dict
        Stage-specific facts for the report (per-layer ranks, quantized nodes, parity);
        fill it with :meth:`record`.
    warnings : list of str
        Messages shown in the terminal and the report; add with :meth:`warn`.
    progress : callable, optional
        Draws the progress bar (:meth:`report_epoch` calls it).
    on_epoch : callable, optional
        Receives each epoch's validation metrics (:meth:`epoch_end` calls it).
    metric : Metric
        The pipeline's metric (``Pipeline(metric=...)``): score with
        ``kdcompress.scoring.score(ctx.metric, logits, labels)``. A stage whose choices depend on
        it declares a ``metric`` parameter instead, so that its fingerprint includes it.
    """

    name: str
    data: Task
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="kdcompress-")))
    details: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    progress: ProgressFn | None = None
    on_epoch: EpochFn | None = None
    metric: Metric = field(default_factory=lambda: Metric.resolve("accuracy"))

    @classmethod
    def standalone(cls, name: str, data: Task, *, device: str | torch.device = "cpu",
                   seed: int = 0) -> StageContext:
        """A context for calling a stage function directly, outside a pipeline."""
        return cls(name=name, data=data, device=torch.device(device), seed=seed)

    def record(self, key: str, value: Any) -> None:
        """Add a JSON-serialisable fact to this stage's row of the report."""
        self.details[key] = value

    def warn(self, message: str) -> None:
        """Add a warning shown in the terminal and kept in the report."""
        if self.progress is None:  # a stage called directly: nothing else will show it
            log.warning("%s: %s", self.name, message)
        self.warnings.append(message)

    def report_epoch(self, description: str, completed: int, total: int, info: str = "") -> None:
        """Tell the progress bar that ``completed`` of ``total`` epochs are done."""
        if self.progress is not None:
            self.progress(description, completed, total, info)
        else:
            log.info("%s %s %d/%d %s", self.name, description, completed, total, info)


    def epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Tell the run that training epoch ``epoch`` (1-based) ended with ``metrics``.

        Exceptions raised by the receiver propagate: the stage stops and nothing of it is cached.
        """
        if self.on_epoch is not None:
            self.on_epoch(epoch, metrics)


def stage_metric(metric: MetricLike | None, ctx: StageContext | None) -> Metric:
    """What a stage's automatic choice scores: its ``metric`` argument (the pipeline's, which the
    runner passes so that the stage's cache key holds it), else the context's, else top-1."""
    if metric is not None:
        return Metric.resolve(metric)
    return ctx.metric if ctx is not None else Metric.resolve("accuracy")


def resolve_context(ctx: StageContext | None, name: str, data: Task | None,
                    device: str | torch.device | None = None) -> StageContext:
    """Return ``ctx`` or, for a stage called directly from Python, a standalone one."""
    if ctx is not None:
        return ctx
    if data is None:
        from kdcompress.errors import StageError

        raise StageError(f"stage '{name}' needs data: pass data=kdcompress.data.digits() "
                         "(or your own Task) when calling it outside a pipeline")
    return StageContext.standalone(name, data, device=device or "cpu")
