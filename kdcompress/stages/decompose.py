"""The ``decompose_tt`` stage: replace chosen layers by Tensor-Train (or SVD / Tucker) layers."""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kdcompress.analysis.allocate import Allocation, Option, allocate
from kdcompress.context import StageContext, stage_metric
from kdcompress.data import Task
from kdcompress.declare import Check, Choice, Float, Rule, check_arguments, stage
from kdcompress.errors import LayerError, StageError
from kdcompress.layers import METHODS, decompose_layer, tensorize
from kdcompress.layers.tensorize import select_layers
from kdcompress.metrics import count_macs
from kdcompress.models import ModelSpec, as_module
from kdcompress.scoring import MetricLike

__all__ = ["decompose_tt", "Ranks", "Budget", "BUDGET_BY", "BUDGET_RANKS"]

log = logging.getLogger(__name__)

#: What ``budget`` counts: the whole model's parameters, or its multiply-accumulates at batch 1.
BUDGET_BY = ("params", "macs")
#: The rank ladder ``budget`` chooses from, per layer (ranks above a layer's largest are skipped;
#: leaving the layer dense is always an option too).
BUDGET_RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
#: Methods the sensitivity analysis measures, so the ones ``budget`` supports; with
#: ``method="auto"`` the budget picks one of them per layer.
_BUDGET_METHODS = ("tt", "svd")


@dataclass(frozen=True)
class Ranks(Check):
    """A rank setting: ``None`` (full ranks), an integer >= 1, or a non-empty list of them.

    Examples
    --------
    >>> Ranks()("rank", [4, 0])
    'rank must be an integer >= 1 or a list of them (one per inner TT rank), but got [4, 0]'
    """

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if items and all(_is_rank(r) for r in items):
            return None
        return (f"{key} must be an integer >= 1 or a list of them (one per inner TT rank), but "
                f"got {value!r}")


def _is_rank(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@dataclass(frozen=True)
class Budget(Check):
    """A budget: ``None``, a fraction of the model in ``(0, 1]``, or a whole count ``> 1``.

    Examples
    --------
    >>> Budget()("budget", 0)
    'budget must be a finite number > 0, but got 0'
    >>> Budget()("budget", 0.25) is None and Budget()("budget", 60_000) is None
    True
    """

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer,
                                                             np.floating)):
            return f"{key} must be a number, got {value!r}"
        if not math.isfinite(value) or value <= 0:
            return f"{key} must be a finite number > 0, but got {value!r}"
        if value > 1 and value != int(value):
            return (f"{key} is a fraction of the model (0 < {key} <= 1) or a whole count (> 1), "
                    f"but got {value!r}; for a compression factor use ratio={value!r}")
        return None


def _budget_clash(budget: float, tol: float | None, ratio: float | None) -> str:
    clash = " and ".join(k for k, v in (("tol", tol), ("ratio", ratio)) if v is not None)
    return f"give budget or {clash}, not both (budget={budget!r}, tol={tol!r}, ratio={ratio!r})"


@stage(role="decompose", checks={
    "rank": Ranks(),
    "tol": Float(ge=0, lt=1, optional=True),
    "ratio": Float(gt=1, optional=True),
    "method": Choice((*METHODS, "auto")),
    "budget": Budget(),
    "budget_by": Choice(BUDGET_BY),
}, rules=[
    Rule(("budget", "tol", "ratio"),
         lambda budget, tol, ratio: budget is None or (tol is None and ratio is None),
         _budget_clash),
    Rule(("budget", "method"),
         lambda budget, method: budget is None or method in (*_BUDGET_METHODS, "auto"),
         "budget chooses ranks for method 'tt', 'svd' or 'auto' (either, per layer), but got "
         "method={method}"),
    Rule(("method", "budget"), lambda method, budget: method != "auto" or budget is not None,
         "method='auto' picks TT or SVD per layer from the sensitivity curves of a budget: give "
         "budget=... (e.g. 0.25), or method='tt', 'svd' or 'tucker'"),
])
def decompose_tt(
    model: nn.Module | ModelSpec, *, rank: int | list[int] | None = 8, tol: float | None = None,
    ratio: float | None = None, layers: str | type | Sequence[str | type] | None = None,
    method: str = "tt", budget: float | None = None, budget_by: str = "params",
    metric: MetricLike | None = None, data: Task | None = None,
    ctx: StageContext | None = None,
) -> nn.Module:
    """Factorise the chosen layers of ``model``, initialised from their trained weights.

    TT-SVD with tensorly (Novikov et al. 2015 for ``nn.Linear``, a 4-core TT of the kernel for
    ``nn.Conv2d``); ``method="svd"`` or ``"tucker"`` gives the classic low-rank layers instead,
    so a report can compare them on the same model. The input model is copied, never changed.
    Decomposition loses accuracy at useful compressions: distill the result.

    With ``budget``, the ranks are chosen per layer from the measured accuracy cost of each:
    the sensitivity analysis (:func:`kdcompress.analysis.sensitivity`, on the validation split)
    gives every layer's drop at each rank of :data:`BUDGET_RANKS`, and
    :func:`kdcompress.analysis.allocate.allocate` picks one rank per layer (or leaves it dense)
    so that the whole model fits the budget with the least predicted total drop.

    Parameters
    ----------
    model : nn.Module
        The trained model.
    rank : int or list of int, optional
        Maximal ranks (>= 1) of every decomposed layer (default 8); ``None`` keeps full ranks
        (exact). Ignored when ``tol`` or ``ratio`` is given.
    tol : float, optional
        Relative Frobenius error bound per layer, in ``[0, 1)``; the smallest ranks meeting it
        are chosen.
    ratio : float, optional
        Target compression (> 1) of the whole model's parameter count; ranks are searched per
        layer for the least reconstruction error.
    layers : str, type, or list of them, optional
        Qualified layer names and/or layer types. ``None``: every ``nn.Linear`` whose
        factorisation is smaller than it (convolutions only when named or given by type).
    method : {"tt", "svd", "tucker", "auto"}
        The factorisation (``budget`` takes ``"tt"`` or ``"svd"``). ``"auto"``, with
        ``budget`` only: each layer gets TT or SVD, whichever the allocation prefers at its
        rank (both curves are measured).
    budget : float, optional
        What the whole decomposed model may hold, in ``budget_by`` units: a fraction of the
        model's total when ``<= 1`` (``0.25``), a count when ``> 1`` (``60_000``). Ranks are
        then chosen per layer by validation sensitivity; ``rank`` is ignored.
    budget_by : {"params", "macs"}
        What ``budget`` counts: parameters, or multiply-accumulates of one input.
    metric : str or callable, optional
        What ``budget``'s sensitivity curves score: the pipeline's metric (given by the
        pipeline, so that the stage's cache key holds it); top-1 accuracy on a direct call
        without it. Unused without ``budget``.
    data : Task, optional
        The data (given by the pipeline); ``budget`` needs it on a direct call.
    ctx : StageContext, optional
        Given by the pipeline; the per-layer records go to ``ctx.record("layers", ...)``, and
        with ``budget`` the allocation to ``ctx.record("budget", ...)``.

    Returns
    -------
    nn.Module
        The decomposed model, in eval mode.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``rank=0``, ``tol=1.5``, ``ratio=0.5``, ``method="cp"``,
        ``budget=2.5``), ``budget`` comes with ``tol`` or ``ratio``, or ``method="auto"``
        comes without ``budget``.
    LayerError
        A named layer does not exist or cannot be decomposed, or ``ratio`` or ``budget`` is out
        of reach (the message gives the reachable range).

    Examples
    --------
    >>> student = decompose_tt(teacher, rank=8)  # doctest: +SKIP
    >>> student = decompose_tt(teacher, ratio=20, layers=["classifier.fc1"])  # doctest: +SKIP
    >>> student = decompose_tt(teacher, budget=0.25, data=task)  # doctest: +SKIP
    """
    check_arguments(decompose_tt, {"rank": rank, "tol": tol, "ratio": ratio, "method": method,
                                   "budget": budget, "budget_by": budget_by})  # and its rules
    task = ctx.data if ctx is not None else data
    model = as_module(model, task)
    if budget is not None:
        return _decompose_to_budget(model, task, budget, budget_by, layers, method, ctx,
                                    metric=stage_metric(metric, ctx))
    if tol is not None or ratio is not None:
        rank = None
    new_model, records = tensorize(model, layers=layers, rank=rank, tol=tol, ratio=ratio,
                                   method=method)
    for rec in records:
        log.info("%s: %s %s ranks %s, %d -> %d params, rel. error %.3f", rec["name"],
                 rec["kind"], rec["in_modes"], rec["ranks"], rec["params_before"],
                 rec["params_after"], rec["rel_error"])
    if ctx is not None:
        ctx.record("layers", records)
        if any(rec["rel_error"] > 0.5 for rec in records):
            ctx.warn("decomposition error above 0.5 on "
                     + ", ".join(r["name"] for r in records if r["rel_error"] > 0.5)
                     + ": distill the student (or raise the ranks) before judging accuracy")
        grown = [r for r in records if r["params_after"] >= r["params_before"]]
        if grown:
            ctx.warn("no smaller once factorised: " + ", ".join(
                f"'{r['name']}' ({r['params_before']:,} -> {r['params_after']:,} parameters as "
                f"{r['kind']} ranks {r['ranks']})" for r in grown)
                + "; leave it out of layers (layers=None skips such layers) or lower the rank")
    return new_model.eval()


# ----------------------------------------------------------------------------------------------
# ranks per layer from a budget


@dataclass(frozen=True)
class _Costs:
    """What the model and each chosen layer cost, in ``by`` units, before decomposition."""

    by: str
    total: int
    dense: dict[str, int]   # per chosen layer
    inputs: dict[str, torch.Tensor]  # one example input of each chosen layer (for MACs)

    @property
    def fixed(self) -> int:
        """What the layers left alone cost."""
        return self.total - sum(self.dense.values())

    def of(self, name: str, module: nn.Module) -> int:
        if self.by == "params":
            return sum(p.numel() for p in module.parameters())
        macs = count_macs(module, self.inputs[name])
        if macs is None:
            raise LayerError(f"decompose_tt: cannot count the MACs of layer '{name}' "
                             f"({type(module).__name__}); use budget_by='params'")
        return macs


def _costs(model: nn.Module, names: list[str], x: torch.Tensor, by: str) -> _Costs:
    inputs: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: inputs.setdefault(n, args[0].detach().clone())) for n in names]
    try:
        with torch.no_grad():
            was_training = model.training
            model.eval()(x)
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    if by == "params":
        total = sum(p.numel() for p in model.parameters())
    else:
        total = count_macs(copy.deepcopy(model), x)
        if total is None:
            raise LayerError("decompose_tt: torch's FLOP counter cannot count this model's "
                             "MACs; use budget_by='params'")
    costs = _Costs(by, int(total), {}, inputs)
    for n in names:
        costs.dense[n] = costs.of(n, model.get_submodule(n))
    return costs


def _target(budget: float, costs: _Costs) -> int:
    target = budget * costs.total if budget <= 1 else budget
    if target > costs.total:
        raise LayerError(f"decompose_tt: budget={budget:g} {costs.by} is larger than the model "
                         f"({costs.total} {costs.by}); give a fraction <= 1 or a count <= "
                         f"{costs.total}")
    return int(math.floor(target))


def _decompose_to_budget(model: nn.Module, task: Task | None, budget: float, by: str,
                         layers: Any, method: str, ctx: StageContext | None, *,
                         metric: MetricLike = "accuracy") -> nn.Module:
    """``decompose_tt(budget=...)``: sensitivity curves, allocation, then one rank per layer."""
    methods = _BUDGET_METHODS if method == "auto" else (method,)
    if task is None:
        raise StageError("decompose_tt: budget measures accuracy on the validation split: pass "
                         "data=kdcompress.data.digits() (or your own Task) on a direct call")
    names = select_layers(model, layers)
    if not names:
        raise LayerError(f"decompose_tt: no layer to decompose (layers={layers!r})")
    costs = _costs(model, names, task.example(1).float(), by)
    target = _target(budget, costs)
    floor = costs.fixed + sum(
        min([costs.dense[n]] + [costs.of(n, decompose_layer(model.get_submodule(n), method=m,
                                                            rank=BUDGET_RANKS[0], name=n)[0])
                                for m in methods])
        for n in names)
    if target < floor:
        raise LayerError(
            f"decompose_tt: budget={budget:g} allows {target} {by}, below what the rank ladder "
            f"reaches: {floor} to {costs.total} {by} (rank {BUDGET_RANKS[0]} on {names}; the "
            f"other layers hold {costs.fixed}); raise the budget or decompose more layers")
    from kdcompress.analysis.sensitivity import sensitivity

    sens = sensitivity(model, task, kinds=methods, ranks=BUDGET_RANKS, layers=names,
                       metric=metric)
    result = allocate(_options(sens, names, methods, costs), target - costs.fixed)
    chosen, spent = _top_up(model, result, costs, target - costs.fixed)
    new_model, records = model, []
    for m in methods:  # one pass per factorisation, each on the layers given to it
        ranks = {n: rank for n, (kind, rank) in chosen.items() if kind == m}
        if ranks:
            new_model, done = tensorize(new_model, rank=ranks, method=m)
            records += done
    if not chosen:
        new_model = copy.deepcopy(model)
    by_name = {r["name"]: r for r in records}
    rows = []
    for name, option in result.choice.items():
        kind, rank = chosen.get(name, (None, "dense"))
        row = {"name": name, "rank": rank, "predicted_drop": round(option.drop, 4),
               by: spent[name]}
        if name in by_name:
            row.update(by_name[name])
            row["predicted_drop"] = round(option.drop, 4)
        if kind is not None:
            row["ladder_rank"] = option.setting[1]  # what the allocation chose and measured
        rows.append(row)
        log.info("%s: %s, %s %d, predicted drop %.2f points%s", name,
                 "dense" if kind is None else f"{kind} rank {rank}", by, spent[name],
                 option.drop, f" (ladder rank {option.setting[1]}, raised into the budget's "
                 "room)" if kind is not None and rank != option.setting[1] else "")
    reached = costs.fixed + sum(spent.values())
    summary = _summary(budget, by, target, reached, costs, result, sens, method)
    if ctx is not None:
        ctx.record("layers", rows)
        ctx.record("budget", summary)
        if not chosen:
            ctx.warn(f"budget={budget:g} holds the whole model: no layer was decomposed")
    return new_model.eval()


def _top_up(model: nn.Module, result: Allocation, costs: _Costs, room: int
            ) -> tuple[dict[str, tuple[str, int]], dict[str, int]]:
    """Raise each decomposed layer's rank above the ladder rank it was given, one at a time and
    short of the ladder's next rank, while the budget has room: the allocation can only choose
    the ladder's ranks, and a rank in between costs more but truncates less (each SVD keeps
    more singular values). Layers with the largest predicted drop go first; the predicted drop
    stays the measured one of the ladder rank. Returns each decomposed layer's
    ``(method, rank)`` and every layer's cost."""
    chosen = {n: o.setting for n, o in result.choice.items() if o.setting != "dense"}
    spent = {n: int(o.cost) for n, o in result.choice.items()}
    left = room - sum(spent.values())
    for name in sorted(chosen, key=lambda n: -result.choice[n].drop):
        method, rank = chosen[name]
        above = [r for r in BUDGET_RANKS if r > rank]
        for candidate in range(rank + 1, above[0] if above else rank + 1):
            layer, record = decompose_layer(model.get_submodule(name), method=method,
                                            rank=candidate, name=name)
            if max(record["ranks"]) < candidate:  # the layer's largest rank: no higher one
                break
            cost = costs.of(name, layer)
            if cost >= costs.dense[name] or cost - spent[name] > left:
                break
            left -= cost - spent[name]
            spent[name], chosen[name] = cost, (method, candidate)
    return chosen, spent


def _options(sens: Any, names: list[str], methods: Sequence[str], costs: _Costs
             ) -> dict[str, list[Option]]:
    """Each layer's choices: dense (no drop), or ``(method, rank)`` of the ladder with its
    measured drop (>= 0)."""
    base = sens.params if costs.by == "params" else sens.macs
    if base is None:
        raise LayerError("decompose_tt: the sensitivity analysis counted no MACs for this "
                         "model; use budget_by='params'")
    options: dict[str, list[Option]] = {}
    for name in names:
        dense = costs.dense[name]
        rows = [Option("dense", dense, 0.0)]
        for method in methods:
            for cell in sens.curve(name, method):
                whole = cell.params if costs.by == "params" else cell.macs
                cost = dense + whole - base
                if cost < dense:  # a factorisation no smaller than the layer buys nothing
                    # a rank scoring above the unchanged model is sampling noise, not a gain
                    rows.append(Option((method, int(cell.setting)), cost,
                                       max(float(cell.drop), 0.0),
                                       float(cell.rel_error or 0.0)))
        options[name] = rows
    return options


def _summary(budget: float, by: str, target: int, reached: int, costs: _Costs,
             result: Allocation, sens: Any, method: str) -> dict[str, Any]:
    return {"by": by, "budget": budget, "target": target, "total_before": costs.total,
            "total_after": reached, "met": reached <= target,
            "predicted_drop": round(result.drop, 4), "bound": round(result.bound, 4),
            "allocator": result.method, "method": method, "ladder": list(BUDGET_RANKS),
            "baseline_accuracy": sens.baseline, "samples": sens.samples,
            "sensitivity_seconds": round(sens.seconds, 2)}
