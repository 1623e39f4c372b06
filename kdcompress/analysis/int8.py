"""Int8 sensitivity: what each quantizable ONNX node costs in validation accuracy, alone in int8.

For each compute node (Conv, ConvTranspose, MatMul, Gemm) ONNX Runtime's static QDQ quantizer,
with the ``quantize_onnx`` stage's defaults (S8S8, per-channel weights, MinMax activation ranges
from 256 training inputs drawn by ``Task.calibration``), writes a graph in which that node alone
is quantized (``nodes_to_quantize=[node]``: its input, weight and output pass through
QuantizeLinear/DequantizeLinear, the pattern ONNX Runtime fuses into an int8 kernel). That graph's
accuracy on a fixed validation subset, against the fp32 graph's, is the node's cost. The
activation ranges are calibrated once and shared by every node's graph
(:class:`~kdcompress.stages.quantize.Int8Graphs`), so a node costs one quantizer pass and one
evaluation.

Convolutions with a tiny reduction (``C_in * kh * kw < 32``) get a cell like any other node; the
stage may still keep them in fp32 for speed (its ``kept_fp32``), whatever they cost.

The same costs order the nodes ``quantize_onnx(max_drop=...)`` moves back to fp32
(:func:`revert_to_budget`): the largest accuracy drop first, ties broken by the relative error
of the logits (a node whose int8 moves the logits more goes first).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from kdcompress.artifacts import OnnxModel
from kdcompress.data import Task
from kdcompress.errors import DataError, LayerError, StageError, did_you_mean
from kdcompress.metrics import predict
from kdcompress.scoring import Metric, MetricLike, metric_value

if TYPE_CHECKING:
    from kdcompress.analysis.sensitivity import Cell

__all__ = ["int8_sensitivity", "node_costs", "revert_to_budget", "score", "NodeCost", "Score",
           "Reversion"]

log = logging.getLogger(__name__)

#: The quantize_onnx stage's static defaults, which the cells use.
_CALIBRATION_SAMPLES = 256
_SEED = 0


class _Graphs(Protocol):
    """What :func:`node_costs` and :func:`revert_to_budget` need of an ``Int8Graphs``."""

    def build(self, target: Path, *, exclude: Iterable[str] = (),
              only: Iterable[str] | None = None) -> OnnxModel: ...


@dataclass(frozen=True)
class Score:
    """A graph's predictions on a fixed sample: accuracy and logit error against a reference."""

    accuracy: float
    error: float  # ||logits - reference|| / ||reference|| (0 without a reference)
    logits: torch.Tensor = field(repr=False)


def score(model: OnnxModel, x: torch.Tensor, y: torch.Tensor,
          reference: Score | None = None, metric: MetricLike = "accuracy") -> Score:
    """``metric`` (top-1 accuracy by default) of ``model`` on ``(x, y)`` and the relative error
    of its logits; ``Score.accuracy`` holds the metric's value.

    Examples
    --------
    >>> fp32 = score(onnx_fp32, x, y)  # doctest: +SKIP
    >>> score(onnx_int8, x, y, reference=fp32).error  # doctest: +SKIP
    0.013
    """
    logits = predict(model, x).float()
    accuracy = metric_value(metric, logits, y)
    error = 0.0
    if reference is not None:
        error = float(torch.linalg.norm(logits - reference.logits)
                      / torch.linalg.norm(reference.logits).clamp_min(1e-12))
    return Score(accuracy, error, logits)


@dataclass(frozen=True)
class NodeCost:
    """What one compute node costs alone in int8."""

    node: str
    op: str
    accuracy: float  # validation accuracy with only this node in int8
    drop: float  # points below the fp32 graph (+ = worse)
    error: float  # relative error of the logits against the fp32 graph's

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (the stage's report details)."""
        return {"node": self.node, "op": self.op, "accuracy": round(self.accuracy, 6),
                "drop": round(self.drop, 4), "logit_error": round(self.error, 6)}


def node_costs(graphs: _Graphs, nodes: Sequence[tuple[str, str]], x: torch.Tensor,
               y: torch.Tensor, baseline: Score, metric: MetricLike = "accuracy"
               ) -> list[NodeCost]:
    """Each node of ``nodes`` alone in int8, scored on ``(x, y)`` against ``baseline``.

    Parameters
    ----------
    graphs : Int8Graphs
        Builds int8 graphs of the fp32 graph (:class:`kdcompress.stages.quantize.Int8Graphs`).
    nodes : list of (name, op_type)
        The nodes to cost, as :meth:`Int8Graphs.nodes` lists them.
    x, y : torch.Tensor
        Validation inputs and labels.
    baseline : Score
        The fp32 graph's :func:`score` on the same ``(x, y)``, with the same ``metric``.
    metric : str or callable
        What a node costs in (``kdcompress.scoring``; top-1 accuracy by default).

    Returns
    -------
    list of NodeCost
        In the order of ``nodes``.
    """
    costs = []
    with tempfile.TemporaryDirectory(prefix="kdcompress-int8-cost-") as tmp:
        for i, (name, op) in enumerate(nodes):
            graph = graphs.build(Path(tmp) / f"node{i}.onnx", only=[name])
            s = score(graph, x, y, reference=baseline, metric=metric)
            drop = round(100 * (baseline.accuracy - s.accuracy), 4)
            costs.append(NodeCost(name, op, s.accuracy, drop, s.error))
            log.debug("int8 %s (%s): accuracy %.4f, logit error %.4f", name, op, s.accuracy,
                      s.error)
    return costs


def costliest_first(costs: Iterable[NodeCost]) -> list[NodeCost]:
    """The order nodes go back to fp32: largest accuracy drop, then largest logit error."""
    return sorted(costs, key=lambda c: (-c.drop, -c.error))


@dataclass
class Reversion:
    """What :func:`revert_to_budget` did."""

    fp32: float  # validation accuracy of the fp32 graph
    int8: float  # ... of the full int8 graph
    accuracy: float  # ... of the result
    costs: list[NodeCost]  # every candidate, costliest first ([] when full int8 was within)
    reverted: list[dict[str, Any]]  # per node sent back: its cost and the accuracy after
    graph: OnnxModel | None  # the result; None when every node went back (the fp32 graph)

    @property
    def everything(self) -> bool:
        """Whether every candidate went back to fp32 (nothing of int8 is left)."""
        return self.graph is None


def revert_to_budget(fp32: OnnxModel, int8: OnnxModel, graphs: _Graphs,
                     nodes: Sequence[tuple[str, str]], x: torch.Tensor, y: torch.Tensor, *,
                     max_drop: float, folder: Path, exclude: Sequence[str] = (),
                     metric: MetricLike = "accuracy") -> Reversion:
    """Send the costliest int8 nodes back to fp32 until accuracy is within ``max_drop``.

    The nodes are ordered by :func:`node_costs` (each alone in int8) and reverted one at a time,
    each step re-quantized with the earlier ones excluded and re-scored, stopping at the first
    graph within ``max_drop`` points of ``fp32``. Reverting the last candidate leaves no int8
    compute node, so the result is then the fp32 graph itself (``graph=None``), which meets any
    budget.

    Parameters
    ----------
    fp32, int8 : OnnxModel
        The parent graph and its full int8 version (as ``graphs`` builds it, with ``exclude``).
    graphs : Int8Graphs
        Builds the int8 graphs.
    nodes : list of (name, op_type)
        The candidates: the int8 compute nodes of ``int8``.
    x, y : torch.Tensor
        Validation inputs and labels.
    max_drop : float
        Points of accuracy the result may lose against ``fp32``.
    folder : Path
        Where the candidate graphs are written.
    exclude : list of str
        Nodes already in fp32 in ``int8`` (the small convolutions the stage kept); they stay so.
    metric : str or callable
        The score the budget is in (``kdcompress.scoring``; top-1 accuracy by default); the
        ``accuracy`` fields of the result hold it.

    Returns
    -------
    Reversion
    """
    metric = Metric.resolve(metric)  # once: resolving a callable tries it on a tiny input
    base = score(fp32, x, y, metric=metric)
    full = score(int8, x, y, reference=base, metric=metric)
    result = Reversion(base.accuracy, full.accuracy, full.accuracy, [], [], int8)
    if _within(base.accuracy, full.accuracy, max_drop):
        return result
    result.costs = costliest_first(node_costs(graphs, nodes, x, y, base, metric))
    reverted: list[str] = []
    for i, cost in enumerate(result.costs):
        reverted.append(cost.node)
        if i == len(result.costs) - 1:
            result.graph, result.accuracy = None, base.accuracy
        else:
            result.graph = graphs.build(folder / f"reverted{i}.onnx",
                                        exclude=[*exclude, *reverted])
            result.accuracy = score(result.graph, x, y, metric=metric).accuracy
        result.reverted.append({**cost.to_dict(), "accuracy_after": round(result.accuracy, 6)})
        log.info("int8: %s back to fp32 (alone it cost %.2f points); accuracy %.4f",
                 cost.node, cost.drop, result.accuracy)
        if _within(base.accuracy, result.accuracy, max_drop):
            break
    return result


def _within(reference: float, accuracy: float, max_drop: float) -> bool:
    return 100 * (reference - accuracy) <= max_drop + 1e-9


def int8_sensitivity(onnx: OnnxModel, data: Task, *, samples: int = 1000,
                     nodes: Sequence[str] | None = None,
                     metric: MetricLike = "accuracy") -> list[Cell]:
    """Each quantizable node of ``onnx`` alone in int8 against the fp32 graph.

    Parameters
    ----------
    onnx : OnnxModel
        The fp32 graph (``export_onnx``'s output).
    data : Task
        Calibration inputs come from its training split (as ``quantize_onnx`` draws them), the
        accuracy from the first ``samples`` of its validation split; the test split is not read.
    samples : int
        Validation samples scored (all of them when the split is smaller).
    nodes : list of str, optional
        Node names to cost (default: every Conv/ConvTranspose/MatMul/Gemm node), as named in the
        graph after ONNX Runtime's pre-processing, the names ``nodes_to_exclude`` takes.
    metric : str or callable
        What the cells score (``kdcompress.scoring``; top-1 accuracy by default).

    Returns
    -------
    list of Cell
        ``Cell(layer=node, kind="int8", setting="int8", ...)`` in graph order; ``params`` is the
        fp32 graph's weight count (int8 stores as many weights, in a quarter of the bytes);
        ``macs`` and ``latency_ms`` are ``None``.

    Raises
    ------
    DataError
        The task has no validation split, or ``samples < 1``.
    LayerError
        A name of ``nodes`` is not a quantizable node of the graph.

    Examples
    --------
    >>> cells = int8_sensitivity(export_onnx(model, data=task), task, samples=500)
    ...     # doctest: +SKIP
    >>> max(cells, key=lambda c: c.drop).layer  # doctest: +SKIP
    'node_Conv_51'
    """
    from kdcompress.analysis.sensitivity import Cell
    from kdcompress.stages.quantize import Int8Graphs  # the stage's quantizer and defaults

    if not isinstance(onnx, OnnxModel):
        raise StageError(f"int8_sensitivity: expects an ONNX graph (export_onnx's output), but "
                         f"got {type(onnx).__name__}; export it with "
                         "kdcompress.stages.export_onnx first")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DataError(f"int8_sensitivity: samples must be an integer >= 1, but got {samples!r}")
    if data.val is None:
        raise DataError(f"int8_sensitivity: scores on the validation split, but task "
                        f"'{data.name}' has none; give it one (x_val/y_val in data.from_tensors)")
    x, y = data.arrays("val")
    x, y = x[:samples], y[:samples]
    metric = Metric.resolve(metric)  # once: resolving a callable tries it on a tiny input
    inputs = data.calibration(_CALIBRATION_SAMPLES, seed=_SEED)
    with Int8Graphs(onnx, mode="static", inputs=inputs) as graphs:
        chosen = _pick(graphs.nodes(), nodes)
        costs = node_costs(graphs, chosen, x, y, score(onnx, x, y, metric=metric), metric)
        log.info("int8 sensitivity: %d nodes, %d calibration pass(es)", len(costs),
                 graphs.calibrations)
    params = onnx.num_params
    return [Cell(layer=c.node, kind="int8", setting="int8", accuracy=c.accuracy, drop=c.drop,
                 params=params, macs=None, latency_ms=None) for c in costs]


def _pick(available: list[tuple[str, str]],
          wanted: Sequence[str] | None) -> list[tuple[str, str]]:
    if wanted is None:
        return available
    if isinstance(wanted, str):
        wanted = [wanted]
    names = [name for name, _ in available]
    for name in wanted:
        if name not in names:
            raise LayerError(f"int8_sensitivity: node {name!r} is not a quantizable node of the "
                             f"graph.{did_you_mean(name, names)} Quantizable nodes: "
                             f"{', '.join(names) or 'none'}")
    return [(name, op) for name, op in available if name in set(wanted)]
