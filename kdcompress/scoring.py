"""The metric a pipeline is judged by: top-1 accuracy, top-5 accuracy, macro-F1, or your own.

One function, :func:`score`, turns logits and labels into a number in [0, 1] (higher is better)
for every automatic choice: the per-epoch validation metric of ``fit``, the search's constraint,
measurement, and stages that keep a drop within a budget. The built-in metrics are computed with
torchmetrics (``multiclass_accuracy`` with ``top_k`` 1 or 5, ``multiclass_f1_score`` with
``average="macro"``).

Examples
--------
>>> import torch
>>> logits, labels = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]]), torch.tensor([0, 1])
>>> score("accuracy", logits, labels)
0.5
>>> Metric.resolve("acuracy")
Traceback (most recent call last):
...
kdcompress.errors.PipelineError: metric 'acuracy' is not known. Did you mean 'accuracy'? ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdcompress.errors import PipelineError, did_you_mean

__all__ = ["Metric", "MetricLike", "BUILTIN", "score", "metric_value"]

#: ``fn(logits (N, C), labels (N,)) -> float`` in [0, 1], higher is better.
MetricFn = Callable[[Tensor, Tensor], Any]


def _top1(logits: Tensor, labels: Tensor) -> float:
    from torchmetrics.functional.classification import multiclass_accuracy

    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1],
                                     average="micro", top_k=1))


def _top5(logits: Tensor, labels: Tensor) -> float:
    from torchmetrics.functional.classification import multiclass_accuracy

    if logits.shape[1] < 5:
        raise PipelineError(f"metric 'top5' needs at least 5 classes, but the data has "
                            f"{logits.shape[1]}; use metric='accuracy'")
    return float(multiclass_accuracy(logits, labels, num_classes=logits.shape[1],
                                     average="micro", top_k=5))


def _macro_f1(logits: Tensor, labels: Tensor) -> float:
    from torchmetrics.functional.classification import multiclass_f1_score

    return float(multiclass_f1_score(logits, labels, num_classes=logits.shape[1],
                                     average="macro"))


#: The metrics known by name.
BUILTIN: dict[str, MetricFn] = {"accuracy": _top1, "top5": _top5, "macro_f1": _macro_f1}


@dataclass(frozen=True)
class Metric:
    """A named metric: a built-in (``"accuracy"``, ``"top5"``, ``"macro_f1"``) or a callable.

    Attributes
    ----------
    name : str
        What the report and the search call it: the built-in's name, or the callable's
        ``__name__``.
    fn : callable
        ``fn(logits, labels) -> float``.
    """

    name: str
    fn: MetricFn

    @classmethod
    def resolve(cls, metric: MetricLike, num_classes: int | None = None) -> Metric:
        """The :class:`Metric` for a name, a callable, or a :class:`Metric`.

        A callable is called once on a tiny input (4 samples of ``num_classes`` classes, 3 when
        not known) and must return a finite number in [0, 1].

        Raises
        ------
        PipelineError
            An unknown name (with "did you mean"), something that is neither a name nor a
            callable, a callable that fails or returns something else on the tiny input, or
            ``"top5"`` with fewer than 5 classes.
        """
        if isinstance(metric, Metric):
            return metric
        if isinstance(metric, str):
            if metric not in BUILTIN:
                hint = did_you_mean(metric, BUILTIN)
                raise PipelineError(f"metric {metric!r} is not known.{hint} The metrics are "
                                    f"{', '.join(map(repr, BUILTIN))}, or pass a callable "
                                    "fn(logits, labels) -> float")
            if metric == "top5" and num_classes is not None and num_classes < 5:
                raise PipelineError(f"metric 'top5' needs at least 5 classes, but the data has "
                                    f"{num_classes}; use metric='accuracy'")
            return cls(metric, BUILTIN[metric])
        if not callable(metric):
            raise PipelineError(f"metric must be one of {', '.join(map(repr, BUILTIN))} or a "
                                f"callable fn(logits, labels) -> float, but got "
                                f"{type(metric).__name__} {metric!r}")
        name = getattr(metric, "__name__", type(metric).__name__)
        c = max(int(num_classes or 3), 2)
        logits = torch.eye(c)[torch.arange(4) % c] * 3.0  # (4, C): predictions 0, 1, ...
        labels = torch.arange(4) % c
        try:
            value = float(metric(logits, labels))
        except Exception as exc:
            raise PipelineError(f"metric {name!r} failed on a tiny input (logits of shape "
                                f"{tuple(logits.shape)}, labels {labels.tolist()}): "
                                f"{type(exc).__name__}: {exc}. A metric is called as "
                                "fn(logits (N, C) tensor, labels (N,) tensor) -> float") from exc
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise PipelineError(f"metric {name!r} returned {value} on a tiny input where every "
                                "prediction is right; a metric must return a number in [0, 1], "
                                "higher is better")
        return cls(name, metric)

    def __call__(self, logits: Tensor, labels: Tensor) -> float:
        return float(self.fn(logits.detach().float().cpu(), labels.detach().cpu().long()))

    def __kdc_fingerprint__(self) -> Any:
        from kdcompress.fingerprint import fingerprint_constant

        return {"metric": self.name} if self.name in BUILTIN and self.fn is BUILTIN[self.name] \
            else {"metric": self.name, "fn": fingerprint_constant(self.fn, "metric")}

    def __repr__(self) -> str:
        return f"Metric({self.name!r})"


#: What ``metric=`` accepts.
MetricLike = str | Callable[[Tensor, Tensor], Any] | Metric


def score(metric: MetricLike, logits: Tensor, labels: Tensor) -> float:
    """``metric`` of ``logits`` (N, C) against ``labels`` (N,), in [0, 1], higher is better.

    The single function every automatic choice calls: ``score(ctx.metric, logits, labels)``.

    Examples
    --------
    >>> logits = torch.tensor([[0.1, 0.5, 0.2, 0.0, 0.3, 0.4], [0.9, 0.0, 0.1, 0.2, 0.3, 0.4]])
    >>> score("top5", logits, torch.tensor([3, 1]))
    0.0
    >>> score("top5", logits, torch.tensor([2, 0]))
    1.0
    """
    return Metric.resolve(metric)(logits, labels)


def metric_value(metric: MetricLike, logits: Tensor, labels: Tensor) -> float:
    """:func:`score`, with top-1 accuracy counted exactly (correct / total, a Python float).

    The analyses and budgets compare scores of many variants of one model on one fixed sample;
    counting top-1 keeps their differences whole samples, with no float32 rounding.

    Examples
    --------
    >>> metric_value("accuracy", torch.tensor([[2.0, 1.0], [0.0, 1.0], [1.0, 0.0]]),
    ...              torch.tensor([0, 1, 1]))
    0.6666666666666666
    """
    resolved = Metric.resolve(metric)
    if resolved.name == "accuracy" and resolved.fn is BUILTIN["accuracy"]:
        return int((logits.argmax(1) == labels.to(logits.device)).sum()) / max(len(labels), 1)
    return resolved(logits, labels)
