"""Per-layer sensitivity: the validation accuracy each layer loses alone, without retraining.

For every decomposable, prunable or quantizable layer and every setting of a ladder, one layer
(or one torch-pruning dependency group) at a time:

* ``"tt"`` / ``"svd"``: the layer replaced by its TT (or truncated SVD) approximation at a rank
  (:func:`kdcompress.layers.tensorize.decompose_layer`), with the relative weight error;
* ``"prune"``: a fraction of the output channels of the group's root layer removed by magnitude
  (L2) importance, the ``prune`` stage's default criterion, through torch-pruning [1]_;
* ``"int8"``: the node alone in int8 in the exported ONNX graph
  (:func:`kdcompress.analysis.int8.int8_sensitivity`).

Fast by construction (the idea of NNI's ``SensitivityAnalysis`` [2]_ without its full pass per
cell): the model is traced once with ``torch.fx``, the unchanged graph runs once over the fixed
validation samples keeping the activations later cells read, and each cell recomputes only the
nodes that depend on the changed modules (:mod:`kdcompress.analysis.record`). A model that
``torch.fx`` cannot trace is evaluated with full forward passes, said in a warning and in
:attr:`Sensitivity.incremental`.

References
----------
.. [1] G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
.. [2] H. Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017 (per-layer
   sensitivity of pruning).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from kdcompress.artifacts import OnnxModel
from kdcompress.data import Task
from kdcompress.errors import DataError, InputError
from kdcompress.layers.tensorize import LayerSpec, decompose_layer, select_layers
from kdcompress.layers.tt import TT_LAYERS
from kdcompress.metrics import MeasureConfig, count_macs, time_call
from kdcompress.scoring import Metric, MetricLike, metric_value

__all__ = ["Cell", "Sensitivity", "sensitivity", "check_settings", "KINDS", "TORCH_KINDS",
           "prune_groups", "prune_group"]

log = logging.getLogger(__name__)

#: What a cell changes: a TT or SVD approximation, channel pruning, int8 in ONNX Runtime.
KINDS = ("tt", "svd", "prune", "int8")
#: The kinds that change a torch model (the others need an ONNX graph).
TORCH_KINDS = ("tt", "svd", "prune")
#: Latency of a changed layer: at this batch size, single-threaded.
LATENCY_BATCH = 64
_TIMING = MeasureConfig(threads=1, warmup=1, repeats=3, min_seconds=0.0)


@dataclass(frozen=True)
class Cell:
    """One layer at one setting.

    Attributes
    ----------
    layer : str
        Module name (torch) or ONNX node name (int8).
    kind : str
        ``"tt"``, ``"svd"``, ``"prune"`` or ``"int8"``.
    setting : int, float or str
        TT/SVD rank, prune ratio, or ``"int8"``.
    accuracy : float
        Validation accuracy (fraction) with only this layer changed.
    drop : float
        Accuracy points below the unchanged model on the same samples (positive = worse).
    params : int
        The whole model's parameter count with this change.
    macs : int or None
        The whole model's multiply-accumulates at batch 1 with this change (torch's FLOP counter
        / 2: the unchanged model's, less the changed modules', plus their replacements');
        ``None`` if unknown.
    latency_ms : float or None
        torch: the changed module(s) alone at batch 64, one thread (median); int8: see
        :func:`~kdcompress.analysis.int8.int8_sensitivity`.
    rel_error : float or None
        Relative Frobenius error of the layer's weight (tt/svd).
    """

    layer: str
    kind: str
    setting: int | float | str
    accuracy: float
    drop: float
    params: int
    macs: int | None
    latency_ms: float | None
    rel_error: float | None = None


@dataclass
class Sensitivity:
    """The result of :func:`sensitivity`: the unchanged model and one :class:`Cell` per setting.

    Attributes
    ----------
    baseline : float
        Accuracy of the unchanged model on the same samples.
    samples : int
        Validation samples every cell was scored on (the first ones of the split).
    params, macs : int, int or None
        The unchanged model's parameters and MACs (batch 1).
    cells : list of Cell
    seconds : float
        Wall time of the analysis.
    incremental : bool
        ``True``: cells were evaluated from the changed layer onwards (torch.fx); ``False``: with
        a full forward pass each (the model could not be traced).
    dense_latency_ms : dict
        ``{kind: {layer: ms}}``: the unchanged module(s) each kind's cells time, for comparison
        with :attr:`Cell.latency_ms`.
    notes : list of str
        What the analysis had to skip or work around.
    timings : dict
        Wall seconds by part: ``"record"`` (tracing and the one pass over the samples), then
        each kind.
    metric : str
        The name of what the baseline and the cells score (``"accuracy"``: top-1).
    """

    baseline: float
    samples: int
    params: int
    macs: int | None
    cells: list[Cell]
    seconds: float
    incremental: bool = True
    dense_latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    metric: str = "accuracy"

    def curve(self, layer: str, kind: str) -> list[Cell]:
        """The cells of one layer and kind, sorted by setting."""
        return sorted((c for c in self.cells if c.layer == layer and c.kind == kind),
                      key=lambda c: (isinstance(c.setting, str), c.setting))

    def layers(self, kind: str) -> list[str]:
        """Layers with cells of ``kind``, in the order they were analysed."""
        return list(dict.fromkeys(c.layer for c in self.cells if c.kind == kind))

    def kinds(self) -> list[str]:
        """Kinds with at least one cell, in :data:`KINDS` order."""
        present = {c.kind for c in self.cells}
        return [k for k in KINDS if k in present]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sensitivity:
        """Rebuild a result from :meth:`to_dict`'s dict (or ``sensitivity.json``)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs["cells"] = [Cell(**c) for c in d["cells"]]
        return cls(**kwargs)

    def save(self, folder: str | Path, *, plot: bool = True) -> dict[str, Path]:
        """Write ``sensitivity.json``, ``sensitivity.md`` and (``plot``) ``sensitivity.png``.

        Returns the paths by extension (``{"json": ..., "md": ..., "png": ...}``).
        """
        from kdcompress.analysis.files import save

        return save(self, Path(folder), plot=plot)


# ----------------------------------------------------------------------------------------------
# checks


def check_settings(kinds: Sequence[str], ranks: Sequence[int], ratios: Sequence[float],
                    method: str, samples: int) -> None:
    """Raise :class:`~kdcompress.errors.InputError` for settings :func:`sensitivity` refuses
    (called by it, and by the CLI before any stage runs)."""
    if isinstance(kinds, str):
        raise InputError(f"kinds must be a list of names such as ('tt', 'prune'), but got the "
                         f"string {kinds!r}")
    for kind in kinds:
        if kind not in KINDS:
            from kdcompress.errors import did_you_mean

            raise InputError(f"unknown kind {kind!r}: use some of {KINDS}."
                             f"{did_you_mean(str(kind), KINDS)}")
    if method not in ("tt", "svd"):
        raise InputError(f"method must be 'tt' or 'svd', but got {method!r}")
    if any(k in kinds for k in ("tt", "svd")):
        bad = [r for r in ranks if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if not ranks or bad:
            raise InputError(f"ranks must be integers >= 1, but got {list(ranks)}")
    if "prune" in kinds:
        bad = [r for r in ratios if isinstance(r, bool) or not isinstance(r, (int, float))
               or not 0 < r < 1]
        if not ratios or bad:
            raise InputError(f"prune ratios must lie in (0, 1), but got {list(ratios)}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be an integer >= 1, but got {samples!r}")


def _validation(data: Task, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    if data.val is None:
        raise DataError(f"sensitivity scores cells on the validation split, but task "
                        f"'{data.name}' has none: give it one (data.from_tensors(..., x_val=..., "
                        "y_val=...) or data.from_datasets(..., val=...))")
    x, y = data.arrays("val")
    if samples > len(x):
        log.info("samples=%d but the validation split holds %d: using all of them", samples,
                 len(x))
    return x[:samples].float(), y[:samples]


# ----------------------------------------------------------------------------------------------
# pruning groups (the prune stage's criterion: magnitude importance, per group)


def _leaf_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the Conv/Linear/TT modules in the order a forward pass calls them."""
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: order.append(name))
               for name, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, *TT_LAYERS))]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _meta_pruner(model: nn.Module, example: torch.Tensor, ratios: dict[nn.Module, float],
                 head: str) -> Any:
    import torch_pruning as tp

    extra: dict[str, Any] = {}
    tt = any(isinstance(m, TT_LAYERS) for m in model.modules())
    context: Any = contextlib.nullcontext()
    if tt:
        from kdcompress.layers.tt_prune import dense_trace, tt_pruner_kwargs

        extra = dict(tt_pruner_kwargs(model))
        context = dense_trace(model)
    with context:
        return tp.pruner.MetaPruner(
            model, example, tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=[model.get_submodule(head)] + extra.pop("ignored_layers", []),
            **extra)


def prune_groups(model: nn.Module, example: torch.Tensor) -> dict[str, list[str]]:
    """The dependency groups the ``prune`` stage prunes: root layer -> every module in its group,
    in the order a forward pass calls the roots.

    The output layer is never a root (the ``prune`` stage always ignores it).

    Examples
    --------
    >>> from kdcompress import models
    >>> net = models.cnn(width=16).build((1, 8, 8), 10)
    >>> groups = prune_groups(net, torch.zeros(2, 1, 8, 8))
    >>> groups["features.conv1"]
    ['features.conv1', 'features.bn1', 'features.conv2']
    """
    work = copy.deepcopy(model).eval()
    head = _leaf_order(work, example)[-1]
    pruner = _meta_pruner(work, example, {}, head)
    names = {m: n for n, m in work.named_modules()}
    groups: dict[str, list[str]] = {}
    for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                          root_module_types=pruner.root_module_types):
        root = group[0].dep.target.module
        if root not in names:
            continue
        members = [names[dep.target.module] for dep, _ in group if dep.target.module in names]
        groups[names[root]] = list(dict.fromkeys(members))
    order = {name: i for i, name in reversed(list(enumerate(_leaf_order(work, example))))}
    return dict(sorted(groups.items(), key=lambda item: order.get(item[0], len(order))))


def prune_group(model: nn.Module, example: torch.Tensor, root: str, ratio: float, *,
                head: str | None = None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of ``root``'s group removed.

    The same criterion and channel count as ``prune(model, ratio=ratio)`` applies to that group
    (L2 magnitude importance, local ranking); every other group is left as it is. ``head``,
    the output layer's name (never pruned), is found with a forward pass when not given.
    """
    work = copy.deepcopy(model).eval()
    head = head or _leaf_order(work, example)[-1]
    pruner = _meta_pruner(work, example, {work.get_submodule(root): float(ratio)}, head)
    pruner.step()
    return work.eval()


def _changed_modules(before: nn.Module, after: nn.Module) -> set[str]:
    """Parameters and buffers whose presence or shape differs, by qualified name."""
    def shapes(m: nn.Module) -> dict[str, tuple[int, ...]]:
        state = {n: tuple(p.shape) for n, p in m.named_parameters()}
        state |= {n: tuple(b.shape) for n, b in m.named_buffers()}
        return state

    a, b = shapes(before), shapes(after)
    return {n for n in a.keys() | b.keys() if a.get(n) != b.get(n)}


# ----------------------------------------------------------------------------------------------
# the analysis


def _module_macs(modules: dict[str, nn.Module], inputs: dict[str, list[Any]]) -> int | None:
    """Multiply-accumulates of the modules on their first input row (batch 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            for name, module in modules.items():
                if name in inputs:
                    module(*[a[:1] if isinstance(a, torch.Tensor) else a for a in inputs[name]])
    except Exception:  # an op the counter does not know: no number rather than a wrong one
        return None
    return int(counter.get_total_flops() // 2)


def _timed(modules: dict[str, nn.Module], inputs: dict[str, list[Any]]) -> float | None:
    """Median milliseconds of the modules alone on their inputs at batch 64, one thread."""
    total = 0.0
    previous = torch.get_num_threads()
    torch.set_num_threads(_TIMING.threads)
    try:
        for name, module in modules.items():
            args = inputs.get(name)
            if args is None:  # not called on the samples
                continue
            args = [a[:LATENCY_BATCH] if isinstance(a, torch.Tensor) else a for a in args]
            with torch.inference_mode():
                total += time_call(lambda m=module, a=args: m(*a), _TIMING)["p50"]
    finally:
        torch.set_num_threads(previous)
    return round(total, 4)


class _Run:
    """State shared by the cells of one analysis."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 progress: Callable[[str, int, int], None] | None,
                 metric: MetricLike = "accuracy") -> None:
        self.model = model
        self.x, self.y = x, y
        self.metric = metric
        self.progress = progress
        self.params = sum(p.numel() for p in model.parameters())
        self.macs = count_macs(copy.deepcopy(model), x[:1])
        self.rec: Any = None
        self.baseline = 0.0
        self.cells: list[Cell] = []
        self.dense: dict[str, dict[str, float]] = {}
        self.dense_macs: dict[tuple[str, str], int | None] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []

    def accuracy(self, logits: torch.Tensor) -> float:
        """The analysis's metric (top-1 accuracy by default) of ``logits``."""
        return metric_value(self.metric, logits, self.y)

    def add(self, layer: str, kind: str, setting: int | float | str, logits: torch.Tensor,
            params: int, macs: int | None, latency: float | None,
            rel_error: float | None = None) -> None:
        acc = self.accuracy(logits)
        self.cells.append(Cell(layer=layer, kind=kind, setting=setting, accuracy=round(acc, 6),
                               drop=round(100 * (self.baseline - acc), 4), params=int(params),
                               macs=macs, latency_ms=latency,
                               rel_error=None if rel_error is None else round(rel_error, 6)))

    def dense_latency(self, kind: str, layer: str, names: list[str]) -> None:
        """Time the unchanged modules ``names`` and count their MACs (the cells' references)."""
        modules = {n: self.rec_module(n) for n in names}
        inputs = self.rec.module_inputs(names)
        self.dense.setdefault(kind, {})[layer] = _timed(modules, inputs) or 0.0
        self.dense_macs[(kind, layer)] = _module_macs(modules, inputs)

    def macs_with(self, kind: str, layer: str, modules: dict[str, nn.Module],
                  inputs: dict[str, list[Any]]) -> int | None:
        """The whole model's MACs with ``modules`` in place of the unchanged ones."""
        before = self.dense_macs.get((kind, layer))
        after = _module_macs(modules, inputs)
        if self.macs is None or before is None or after is None:
            return None
        return self.macs - before + after

    def rec_module(self, name: str) -> nn.Module:
        holder = self.rec.gm if self.rec.incremental else self.rec.model
        return holder.get_submodule(name)


def _max_rank(layer: nn.Linear | nn.Conv2d, method: str) -> int:
    """The largest useful rank (the rule of decompose_tt's rank search)."""
    w = layer.weight
    if method == "tt" and isinstance(layer, nn.Linear):
        return max(min(w.shape), 2)
    if method == "tt":
        return max(w.shape[0], w.shape[1])
    return min(w.shape[0], w.shape[1] * w[0, 0].numel())


def _decomposition_cells(run: _Run, names: list[str], ranks: Sequence[int], method: str,
                         skip_larger: bool, counter: list[int], total: int) -> None:
    for name in names:
        layer = run.model.get_submodule(name)
        run.dense_latency(method, name, [name])
        for rank in sorted(set(ranks)):
            counter[0] += 1
            if run.progress:
                run.progress(method, counter[0], total)
            if rank > _max_rank(layer, method):
                continue
            with threadpool_limits(limits=1, user_api="blas"):  # SVDs: faster on a busy CPU
                new, rec = decompose_layer(layer, method=method, rank=rank, name=name)
            new.eval()
            if skip_larger and rec["params_after"] >= rec["params_before"]:
                continue
            captured: dict[str, list[Any]] = {}
            logits = run.rec.logits({name: new}, captured)
            run.add(name, method, rank, logits,
                    run.params - rec["params_before"] + rec["params_after"],
                    run.macs_with(method, name, {name: new}, captured),
                    _timed({name: new}, captured), rec["rel_error"])


def _prune_cells(run: _Run, groups: dict[str, list[str]], ratios: Sequence[float],
                 counter: list[int], total: int) -> None:
    example = run.x[:2]
    head = _leaf_order(copy.deepcopy(run.model), example)[-1]
    for root, members in groups.items():
        run.dense_latency("prune", root, members)
        for ratio in sorted(set(ratios)):
            counter[0] += 1
            if run.progress:
                run.progress("prune", counter[0], total)
            pruned = prune_group(run.model, example, root, ratio, head=head)
            changed = _changed_modules(run.model, pruned)
            overrides = {n: pruned.get_submodule(n) for n in members}
            captured: dict[str, list[Any]] = {}
            if all(any(c == m or c.startswith(m + ".") for m in members) for c in changed):
                logits = run.rec.logits(overrides, captured)
            else:  # the group reached beyond its modules: score the whole pruned model
                note = (f"prune {root} at {ratio}: changed {sorted(changed)[:4]} outside its "
                        "group; scored with a full forward pass")
                log.warning(note)
                run.notes.append(note)
                with torch.no_grad():
                    logits = torch.cat([pruned(run.x[i:i + 256]).float()
                                        for i in range(0, len(run.x), 256)])
            run.add(root, "prune", float(ratio), logits,
                    sum(p.numel() for p in pruned.parameters()),
                    run.macs_with("prune", root, overrides, captured),
                    _timed(overrides, captured))


def _torch_model(model: Any, data: Task) -> nn.Module:
    from kdcompress.models import ModelSpec, as_module

    if isinstance(model, ModelSpec):
        return as_module(model, data)
    if not isinstance(model, nn.Module):
        raise InputError(f"sensitivity: tt, svd and prune cells need a torch model (nn.Module), "
                         f"but got {type(model).__name__}; analyse the stage before export_onnx, "
                         "or ask kinds=('int8',) of an ONNX model")
    return model


def sensitivity(
    model: nn.Module | OnnxModel, data: Task, *, kinds: Sequence[str] = ("tt", "prune"),
    ranks: Sequence[int] = (1, 2, 4, 8, 16, 32),
    ratios: Sequence[float] = (0.1, 0.2, 0.3, 0.5, 0.7), method: str = "tt",
    layers: LayerSpec = None, samples: int = 1000, onnx: OnnxModel | None = None,
    int8: bool = False, progress: Callable[[str, int, int], None] | None = None,
    incremental: bool = True, metric: MetricLike = "accuracy",
) -> Sensitivity:
    """Validation accuracy lost by each layer alone at each setting, without retraining.

    Parameters
    ----------
    model : nn.Module or OnnxModel
        The model (never changed). An ``OnnxModel`` allows only ``kinds=("int8",)``.
    data : Task
        Its task; cells are scored on the first ``samples`` of the validation split (fixed).
    kinds : sequence of {"tt", "svd", "prune", "int8"}
        What to change. ``"tt"`` decomposes with ``method``; ``"int8"`` is the same as
        ``int8=True``.
    ranks : sequence of int
        Rank ladder of the tt/svd cells; a rank above a layer's maximal rank is skipped.
    ratios : sequence of float
        Pruning ratios in (0, 1): the fraction of a group's channels removed.
    method : {"tt", "svd"}
        The decomposition of the ``"tt"`` kind.
    layers : str, type, or list of them, optional
        Decomposable layers, as ``decompose_tt``'s ``layers`` (``None``: every ``nn.Linear``
        whose factorisation is smaller than it). When given, prune groups are limited to the
        roots it selects.
    samples : int
        Validation samples scored (the first ones of the split).
    onnx : OnnxModel, optional
        The exported graph for the int8 cells (exported with ``export_onnx`` when ``None``).
    int8 : bool
        Add one int8 cell per quantizable ONNX node.
    progress : callable, optional
        Called as ``progress(kind, done, total)`` after each cell.
    incremental : bool
        Evaluate cells from the changed layer onwards (default). ``False`` runs a full forward
        pass per cell, the brute-force reference (same numbers, slower).
    metric : str or callable
        What a cell scores (``kdcompress.scoring``): top-1 accuracy by default, or the
        pipeline's metric; the cells' ``accuracy`` and ``drop`` are in it.

    Returns
    -------
    Sensitivity
        The baseline and one :class:`Cell` per layer and setting.

    Raises
    ------
    InputError
        An unknown kind or method, an empty or invalid ladder, ``samples < 1``, or a torch kind
        asked of an ONNX model.
    LayerError
        ``layers`` names a module that does not exist or cannot be decomposed.
    DataError
        The task has no validation split.

    Examples
    --------
    >>> from kdcompress import data, models
    >>> task = data.digits()
    >>> net = models.cnn(width=16, hidden=64).build((1, 8, 8), 10)
    >>> result = sensitivity(net, task, ranks=(2, 8), ratios=(0.5,), samples=200)
    >>> [(c.layer, c.setting) for c in result.curve("classifier.fc1", "tt")]
    [('classifier.fc1', 2), ('classifier.fc1', 8)]
    >>> paths = result.save("runs/sensitivity")  # doctest: +SKIP
    """
    check_settings(kinds, ranks, ratios, method, samples)
    metric = Metric.resolve(metric)  # once: resolving a callable tries it on a tiny input
    kinds = tuple(kinds)
    int8 = int8 or "int8" in kinds
    methods = list(dict.fromkeys(method if k == "tt" else k for k in kinds if k in ("tt", "svd")))
    torch_kinds = bool(methods) or "prune" in kinds
    if isinstance(model, OnnxModel):
        if torch_kinds:
            _torch_model(model, data)
        onnx = onnx or model
    start = time.perf_counter()
    x, y = _validation(data, samples)
    cells: list[Cell] = []
    run = None
    if torch_kinds:
        run = _analyse_torch(_torch_model(model, data), x, y, methods, "prune" in kinds, ranks,
                             ratios, layers, progress, trace=incremental, metric=metric)
        cells = run.cells
    timings = dict(run.timings) if run is not None else {}
    if int8:
        started = time.perf_counter()
        cells = cells + _int8_cells(model, data, onnx, len(x), metric)
        timings["int8"] = round(time.perf_counter() - started, 2)
    if run is None:
        from kdcompress.metrics import predict

        baseline = metric_value(metric, predict(onnx, x).float(), y)
        params = onnx.num_params
        return Sensitivity(baseline=round(baseline, 6), samples=len(x), params=params, macs=None,
                           cells=cells, seconds=round(time.perf_counter() - start, 2),
                           timings=timings, metric=metric.name)
    return Sensitivity(baseline=round(run.baseline, 6), samples=len(x), params=run.params,
                       macs=run.macs, cells=cells, seconds=round(time.perf_counter() - start, 2),
                       incremental=run.rec.incremental, dense_latency_ms=run.dense,
                       timings=timings, metric=metric.name,
                       notes=run.notes + ([] if run.rec.incremental or not incremental else [
                           "torch.fx could not trace the model: every cell ran a full forward "
                           "pass"]))


def _analyse_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, methods: list[str],
                   prune: bool, ranks: Sequence[int], ratios: Sequence[float],
                   layers: LayerSpec, progress: Callable[[str, int, int], None] | None,
                   trace: bool = True, metric: MetricLike = "accuracy") -> _Run:
    from kdcompress.analysis.record import record

    model = copy.deepcopy(model).cpu().eval()
    run = _Run(model, x, y, progress, metric)
    names = select_layers(model, layers) if methods else []
    groups: dict[str, list[str]] = {}
    if prune:
        groups = prune_groups(model, x[:2])
        if layers is not None:
            chosen = set(select_layers(model, layers))
            groups = {root: m for root, m in groups.items() if root in chosen}
        if not groups:
            run.notes.append("no prunable dependency group (the output layer is never pruned)")
    if not names and methods:
        run.notes.append(f"no decomposable layer selected by layers={layers!r}")
    starts = [{n} for n in names] + [set(m) for m in groups.values()]
    started = time.perf_counter()
    run.rec = record(model, x, starts, trace=trace)
    run.baseline = run.accuracy(run.rec.baseline)
    run.timings["record"] = round(time.perf_counter() - started, 2)
    total = len(names) * len(set(ranks)) * len(methods) + len(groups) * len(set(ratios))
    counter = [0]
    for method in methods:
        started = time.perf_counter()
        _decomposition_cells(run, names, ranks, method, layers is None, counter, total)
        run.timings[method] = round(time.perf_counter() - started, 2)
    if groups:
        started = time.perf_counter()
        _prune_cells(run, groups, ratios, counter, total)
        run.timings["prune"] = round(time.perf_counter() - started, 2)
    return run


def _int8_cells(model: Any, data: Task, onnx: OnnxModel | None, samples: int,
                metric: MetricLike = "accuracy") -> list[Cell]:
    try:
        from kdcompress.analysis.int8 import int8_sensitivity
    except ImportError as exc:
        raise InputError("int8 cells need kdcompress.analysis.int8.int8_sensitivity, which this "
                         "installation lacks; leave int8 out") from exc
    if onnx is None:
        from kdcompress.stages import export_onnx

        onnx = export_onnx(model, data=data)
    return list(int8_sensitivity(onnx, data, samples=samples, metric=metric))
