"""The ``prune`` stage: dependency-aware structured channel pruning with torch-pruning.

Whole channels are removed (the tensors really shrink, unlike masks), with every layer that shares
them -- BatchNorm, the next layer's inputs, residual additions -- kept consistent by
torch-pruning's dependency graph [1]_. Optionally the pruning is done in ``iterative_steps``,
each followed by a recovery phase that distils the pruned model from the unpruned one (or a named
teacher) for ``recovery_epochs``: prune, then repair with knowledge distillation [2]_.

References
----------
.. [1] G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
.. [2] G. Hinton, O. Vinyals, J. Dean, "Distilling the Knowledge in a Neural Network", 2015.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.analysis.allocate import Allocation, Option, allocate, cost_range
from kdcompress.context import StageContext, resolve_context, stage_metric
from kdcompress.data import Task
from kdcompress.declare import Choice, Float, Int, Rule, check_arguments, spec_of, stage
from kdcompress.errors import StageError, did_you_mean
from kdcompress.layers.heads import (
    head_plan,
    head_pruner_kwargs,
    schedule_heads,
    update_head_counts,
)
from kdcompress.layers.tt import TTConv2d, TTLinear
from kdcompress.losses.functional import kd_loss
from kdcompress.placement import PRECISIONS, autocast_dtype
from kdcompress.scoring import MetricLike
from kdcompress.training import FitConfig, accuracy, fit

__all__ = ["prune", "IMPORTANCES", "ALLOCATIONS", "PRUNE_RATIOS", "channel_counts",
           "kd_recovery_loss"]

log = logging.getLogger(__name__)

#: Importance criteria: L1 / L2 weight magnitude ("magnitude" is L2), first-order Taylor
#: expansion of the loss (gradients from a few training batches), LAMP (layer-adaptive
#: magnitude, Lee et al., ICLR 2021).
IMPORTANCES = ("magnitude", "l1", "l2", "taylor", "lamp")
#: Taylor importance: gradients of this many training batches of 64.
_TAYLOR_BATCHES = 4
#: How ``ratio`` is spread over the dependency groups: the same fraction of every group, or
#: unevenly by each group's measured validation sensitivity (the same channels in total).
ALLOCATIONS = ("uniform", "sensitivity")
#: Ratios at which ``allocation="sensitivity"`` measures each group (the stage's ratio is added).
#: They reach above any ratio worth asking for: a group can only take more than the uniform cut
#: up to the ladder's top, so at a stage ratio at the top every group gets the same cut.
PRUNE_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@stage(role="prune", distributed=True, checks={
    "ratio": Float(ge=0, lt=1),
    "importance": Choice(IMPORTANCES),
    "global_pruning": Choice([True, False]),
    "iterative_steps": Int(min=1),
    "recovery_epochs": Int(min=0),
    "recovery_lr": Float(gt=0),
    "recovery_batch_size": Int(min=1, optional=True),
    "recovery_precision": Choice(PRECISIONS),
    "round_to": Int(min=1, optional=True),
    "allocation": Choice(ALLOCATIONS),
}, rules=[
    Rule(("allocation", "global_pruning"),
         lambda allocation, global_pruning: not (allocation == "sensitivity" and global_pruning),
         "allocation='sensitivity' sets each group's ratio itself and global_pruning=True ranks "
         "channels across groups: choose one"),
])
def prune(
    model: nn.Module, *, ratio: float = 0.3, importance: str = "magnitude",
    global_pruning: bool = False, iterative_steps: int = 1, recovery_epochs: int = 3,
    recovery_lr: float = 3e-3, recovery_batch_size: int | None = None,
    recovery_precision: str = "auto", teacher: nn.Module | None = None,
    round_to: int | None = None, ignored_layers: list[str] | None = None,
    allocation: str = "uniform", metric: MetricLike | None = None, data: Task | None = None,
    ctx: StageContext | None = None,
) -> nn.Module:
    """Remove a fraction of the channels of every prunable layer (or of the whole model).

    Parameters
    ----------
    model : nn.Module
        The model to prune; it is copied, never changed.
    ratio : float
        Fraction of channels to remove, ``0 <= ratio < 1``: per layer, or over the whole model
        with ``global_pruning``.
    importance : {"magnitude", "l1", "l2", "taylor", "lamp"}
        How channels are ranked; ``taylor`` uses gradients of a few training batches.
    global_pruning : bool
        Rank channels across layers (layers end up with different ratios) instead of per layer.
    iterative_steps : int
        Reach ``ratio`` in this many equal steps.
    recovery_epochs : int
        Epochs of distillation after each step (:func:`kd_recovery_loss`: KD at temperature 4
        plus cross-entropy), from ``teacher`` or, when none is given, from the unpruned model.
        0 skips recovery (the accuracy pruning costs is then not repaired).
    recovery_lr, recovery_batch_size : float, int or None
        Learning rate (AdamW, cosine decay, weight decay 1e-4) and batch size of recovery
        (None: chosen for the device, as ``train``'s ``batch_size=None``).
    recovery_precision : {"auto", "fp32", "fp16", "bf16"}
        Autocast precision of recovery, as ``train``'s ``precision`` (``"auto"``: float16 with a
        gradient scaler on CUDA, float32 on the CPU).
    teacher : nn.Module, optional
        The model to distil from during recovery.
    round_to : int, optional
        Keep channel counts multiples of this (8 or 16 suit SIMD kernels).
    ignored_layers : list of str, optional
        Qualified names of modules never pruned (``"features.conv1"``). The output layer is
        always ignored.
    allocation : {"uniform", "sensitivity"}
        ``"uniform"``: every group loses ``ratio`` of its channels. ``"sensitivity"``: the same
        number of channels in total, spread by each group's validation sensitivity
        (:func:`kdcompress.analysis.sensitivity` at :data:`PRUNE_RATIOS`, magnitude criterion,
        drops interpolated between the measured ratios) with
        :func:`kdcompress.analysis.allocate.allocate`, so that the sum of the predicted drops
        is least; the per-group ratios go to ``ctx.record("allocation", ...)``.
    metric : str or callable, optional
        What ``allocation="sensitivity"`` scores: the pipeline's metric (given by the pipeline,
        so that the stage's cache key holds it); top-1 accuracy on a direct call without it.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    nn.Module
        The pruned model, in eval mode, on the CPU.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``ratio must be < 1, but got 1.0``), or
        ``allocation="sensitivity"`` comes with ``global_pruning=True``.
    DivergedError
        Recovery produced a NaN or infinite loss; nothing is returned.

    Notes
    -----
    Under ``torchrun`` every process prunes its own copy (pruning is deterministic, so the copies
    agree; DistributedDataParallel checks their shapes) and recovery trains data-parallel.

    Examples
    --------
    >>> from kdcompress import data, models
    >>> model = models.cnn(width=16).build((1, 8, 8), 10)
    >>> small = prune(model, ratio=0.5, data=data.digits())  # doctest: +SKIP
    >>> small.features.conv2.out_channels  # doctest: +SKIP
    8
    """
    check_arguments(prune, {
        "ratio": ratio, "importance": importance, "global_pruning": global_pruning,
        "iterative_steps": iterative_steps, "recovery_epochs": recovery_epochs,
        "recovery_lr": recovery_lr, "recovery_batch_size": recovery_batch_size,
        "recovery_precision": recovery_precision, "round_to": round_to,
        "allocation": allocation})  # and its rules
    _check_model(model)
    ctx = resolve_context(ctx, "prune", data)
    recovery = FitConfig(epochs=recovery_epochs, lr=recovery_lr, batch_size=recovery_batch_size,
                         weight_decay=1e-4, precision=recovery_precision)
    if recovery_epochs:  # fp16 on a CPU is refused here, before the pruning it would follow
        autocast_dtype(recovery_precision, recovery.amp, ctx.device, ctx.name)
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(model).cpu().eval()
    if recovery_epochs:
        teacher = copy.deepcopy(teacher if teacher is not None else model).cpu().eval()
    before = channel_counts(model)
    params_before = sum(p.numel() for p in model.parameters())
    example = ctx.data.example(2).float()

    ignored = _resolve_ignored(model, ignored_layers or [])
    head = _output_layer(model, example)
    ignored[head[0]] = head[1]
    ctx.record("ignored_layers", sorted(ignored))
    ratio_dict = None
    if allocation == "sensitivity" and ratio > 0:
        ratio_dict, plan = _allocate_ratios(model, ctx, ratio, ignored, round_to,
                                            stage_metric(metric, ctx))
        ctx.record("allocation", plan)
    import torch_pruning as tp

    heads = head_plan(model, ratio, iterative_steps)  # attention heads are removed whole
    head_kwargs = head_pruner_kwargs(heads)
    with _tt_support(model) as extra:
        pruner = tp.pruner.MetaPruner(
            model, example, _importance(importance), global_pruning=global_pruning,
            pruning_ratio=ratio, pruning_ratio_dict=ratio_dict, iterative_steps=iterative_steps,
            ignored_layers=(list(ignored.values()) + extra.pop("ignored_layers", [])
                            + head_kwargs.pop("ignored_layers", [])),
            round_to=round_to, **extra, **head_kwargs)
    schedule_heads(pruner, heads)
    history = []
    for step in range(iterative_steps):
        if importance == "taylor":
            _accumulate_gradients(model, ctx)
        pruner.step()
        update_head_counts(pruner, heads)
        model.zero_grad(set_to_none=True)
        if recovery_epochs:
            _recover(model, teacher, ctx, recovery, step, iterative_steps)
        entry = {"step": step + 1, "params": sum(p.numel() for p in model.parameters())}
        if iterative_steps > 1 or recovery_epochs:
            entry["val_accuracy"] = round(accuracy(model, ctx.data, ctx.data.eval_split), 4)
        history.append(entry)
        log.info("prune step %d/%d: %s", step + 1, iterative_steps, entry)

    after = channel_counts(model)
    ctx.record("channels", {k: [before[k], after.get(k, 0)] for k in before})
    ctx.record("params_before", params_before)
    ctx.record("params_after", sum(p.numel() for p in model.parameters()))
    ctx.record("steps", history)
    if heads.attentions:
        ctx.record("heads", {a.name: [a.heads + sum(heads.removals[a.name]), a.heads]
                             for a in heads.attentions})
    if after == before and ratio > 0:
        ctx.warn("no channel was removed: every prunable layer is ignored or protected")
    return model.cpu().eval()


# ----------------------------------------------------------------------------------------------
# settings and layers


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise StageError(f"prune: expects a torch model (nn.Module), but got "
                         f"{type(model).__name__}; prune before export_onnx")


def _importance(name: str) -> Any:
    import torch_pruning as tp

    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name in ("l2", "magnitude"):
        return tp.importance.MagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.TaylorImportance()
    return tp.importance.LAMPImportance(p=2)


def channel_counts(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every Conv, Linear and TT layer, by qualified name."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, TTConv2d)):
            counts[name] = module.out_channels
        elif isinstance(module, (nn.Linear, TTLinear)):
            counts[name] = module.out_features
    return counts


def _resolve_ignored(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    ignored = {}
    for name in names:
        if name not in modules or not name:
            raise StageError(f"prune: ignored_layers names '{name}', which is not a module of "
                             f"{type(model).__name__}.{did_you_mean(name, modules)}")
        ignored[name] = modules[name]
    return ignored


def _leaf_order(model: nn.Module, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """Modules with parameters of their own, in the order one forward pass calls them."""
    order: list[tuple[str, nn.Module]] = []
    handles = []
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: order.append((name, m))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order


def _output_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module]:
    """The last Conv/Linear (or TT layer) a forward pass calls: the classifier head."""
    order = [(n, m) for n, m in _leaf_order(model, example)
             if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or _is_tt(m)]
    if not order:
        raise StageError(f"prune: {type(model).__name__} has no Conv or Linear layer to prune")
    return order[-1]


def _is_tt(module: nn.Module) -> bool:
    return isinstance(module, (TTLinear, TTConv2d))


@contextlib.contextmanager
def _tt_support(model: nn.Module) -> Iterator[dict[str, Any]]:
    """Extra MetaPruner keyword arguments that keep tensor-train layers consistent.

    The TT layers trace as one linear map (``dense_trace``) and are pruned through their own
    pruners (:mod:`kdcompress.layers.tt_prune`), so their cores are sliced, never corrupted.
    """
    if not any(_is_tt(m) for m in model.modules()):
        yield {}
        return
    from kdcompress.layers.tt_prune import dense_trace, tt_pruner_kwargs

    with dense_trace(model):
        try:
            yield dict(tt_pruner_kwargs(model))
        except ZeroDivisionError as err:  # torch-pruning's shape inference, on a version we
            tt = [n for n, m in model.named_modules() if _is_tt(m)]  # have not adapted to
            raise StageError(
                f"prune: torch-pruning could not trace {type(model).__name__} with its TT layers "
                f"{tt} (it inferred 0 channels at a reshape); prune before decompose_tt, or "
                "decompose fewer layers (decompose_tt(layers=[...]))") from err


# ----------------------------------------------------------------------------------------------
# allocation="sensitivity": per-group ratios from the measured curves


def _removed(channels: int, ratio: float, round_to: int | None) -> int:
    """Channels torch-pruning removes from a group of ``channels`` at ``ratio`` (local ranking)."""
    n = channels - int(channels * (1 - ratio))
    if n > 0 and round_to:
        kept = channels - n
        n = channels - (kept - kept % round_to)
    return max(n, 0)


def _group_channels(module: nn.Module) -> int | None:
    for attr in ("out_channels", "out_features"):
        if isinstance(getattr(module, attr, None), int):
            return getattr(module, attr)
    return None


def _curve_options(channels: int, anchors: list[tuple[int, float]], round_to: int | None
                   ) -> list[Option]:
    """One option per channel count removed up to the ladder's top, drop interpolated.

    The measured drops are made non-decreasing in the channels removed (a small cut that scores
    a little better than the unchanged model is noise, not a gain), and interpolated linearly
    between the measured ratios. ``tiebreak`` prefers removing fewer channels at equal drop.
    """
    ks, drops = [0], [0.0]
    for k, drop in sorted(anchors):
        if k > ks[-1]:
            ks.append(k)
            drops.append(max(drop, drops[-1]))
        else:
            drops[-1] = max(drops[-1], drop)
    options = []
    for k in range(0, ks[-1] + 1):
        if k and round_to and (channels - k) % round_to:
            continue
        options.append(Option(k, channels - k, float(np.interp(k, ks, drops)), tiebreak=k))
    return options


def _allocate_ratios(model: nn.Module, ctx: StageContext, ratio: float,
                     ignored: dict[str, nn.Module], round_to: int | None,
                     metric: MetricLike = "accuracy",
                     ) -> tuple[dict[nn.Module, float], dict[str, Any]]:
    """The per-group ratios of ``allocation="sensitivity"`` and the record of the choice.

    Each group's curve (drop against channels removed) comes from the sensitivity analysis;
    its cost is the parameters the group keeps, counted alone (each channel carries its own
    weights and the next layer's inputs). Pruning two adjacent groups removes their shared
    weights once, so the separable count overstates what a joint cut removes: the budget is
    searched until the pruned model holds no more parameters than the uniform
    cut at ``ratio`` does (a few Newton steps on the budget, each checked by pruning a copy).
    """
    from kdcompress.analysis.sensitivity import sensitivity

    ladder = tuple(sorted({*PRUNE_RATIOS, round(float(ratio), 6)}))
    if ratio >= PRUNE_RATIOS[-1]:
        log.warning("prune: ratio=%g is at or above the top of the sensitivity ladder (%g): no "
                    "group can be cut more than the others, so allocation='sensitivity' gives "
                    "the uniform cut", ratio, PRUNE_RATIOS[-1])
    sens = sensitivity(model, ctx.data, kinds=("prune",), ratios=ladder, metric=metric)
    groups = _group_curves(model, sens, ignored, round_to, ratio)
    if not groups:
        raise StageError("prune: allocation='sensitivity' found no prunable group to measure "
                         "(every group is ignored or protected); use allocation='uniform'")
    example = ctx.data.example(2).float()
    target = _pruned_params(model, example, ignored, {}, ratio, round_to)  # the uniform cut
    options = {root: g.options for root, g in groups.items()}
    best, params = _meet_params(model, example, ignored, groups, options, target, ratio, round_to)
    rows = [{"root": root, "channels": g.channels, "removed": best.choice[root].setting,
             "ratio": round(best.choice[root].setting / g.channels, 4),
             "predicted_drop": round(best.choice[root].drop, 4),
             "uniform_removed": g.uniform, "uniform_predicted_drop": round(g.drop_at(g.uniform), 4)}
            for root, g in groups.items()]
    for r in rows:
        log.info("prune %s: %d of %d channels (ratio %.3f), predicted drop %.2f points",
                 r["root"], r["removed"], r["channels"], r["ratio"], r["predicted_drop"])
    plan = {"method": "sensitivity", "ratio": ratio, "params_target": target,
            "params_planned": params,
            "channels_uniform": sum(g.uniform for g in groups.values()),
            "channels_removed": sum(r["removed"] for r in rows),
            "predicted_drop": round(best.drop, 4),
            "uniform_predicted_drop": round(sum(r["uniform_predicted_drop"] for r in rows), 4),
            "allocator": best.method, "ladder": list(ladder), "criterion": "magnitude",
            "baseline_accuracy": sens.baseline, "samples": sens.samples,
            "sensitivity_seconds": round(sens.seconds, 2), "groups": rows}
    return _ratios(groups, best), plan


@dataclass(frozen=True)
class _Group:
    """One dependency group's channels, curve and options for the allocator."""

    module: nn.Module
    channels: int
    uniform: int  # channels the uniform cut removes
    options: list[Option]

    def drop_at(self, removed: int) -> float:
        return next((o.drop for o in self.options if o.setting == removed), float("nan"))


def _group_curves(model: nn.Module, sens: Any, ignored: dict[str, nn.Module],
                  round_to: int | None, ratio: float) -> dict[str, _Group]:
    groups = {}
    for root in sens.layers("prune"):
        module = model.get_submodule(root)
        count = _group_channels(module)
        if count is None or any(root == n or root.startswith(n + ".") for n in ignored):
            continue
        cells = sens.curve(root, "prune")
        anchors = [(_removed(count, float(c.setting), round_to), float(c.drop)) for c in cells]
        per_channel = max((sens.params - c.params) / k for (k, _), c in zip(anchors, cells,
                                                                             strict=True) if k)
        options = [Option(o.setting, round(o.cost * per_channel), o.drop, o.tiebreak)
                   for o in _curve_options(count, anchors, round_to)]
        groups[root] = _Group(module, count, _removed(count, ratio, round_to), options)
    return groups


def _meet_params(model: nn.Module, example: torch.Tensor, ignored: dict[str, nn.Module],
                 groups: dict[str, _Group], options: dict[str, list[Option]], target: int,
                 ratio: float, round_to: int | None, steps: int = 8) -> tuple[Allocation, int]:
    """The allocation, within ``steps`` tries, whose joint cut leaves the most parameters that
    are still at most ``target``; and that count."""
    low, high = cost_range(options)
    budget = sum(g.options[0].cost for g in groups.values()) - sum(  # uniform, counted alone
        g.options[0].cost - next(o.cost for o in g.options if o.setting == g.uniform)
        for g in groups.values())
    best = allocate(options, low)  # every group at the ladder's top: fewest parameters
    best_params = _pruned_params(model, example, ignored, _ratios(groups, best), ratio, round_to)
    below, above = low, high + 1
    for _ in range(steps):
        budget = int(min(max(budget, below), above - 1))
        trial = allocate(options, budget)
        params = _pruned_params(model, example, ignored, _ratios(groups, trial), ratio,
                                round_to)
        if params <= target:
            if params >= best_params:
                best, best_params = trial, params
            below = budget
        else:
            above = budget
        if above - below <= 1 or params == target:
            break
        step = budget - (params - target)  # one parameter of budget is about one kept
        budget = step if below < step < above else (below + above) // 2
    return best, best_params


def _ratios(groups: dict[str, _Group], result: Allocation) -> dict[nn.Module, float]:
    """torch-pruning ratios that remove exactly the chosen channel counts (local ranking)."""
    return {g.module: (result.choice[root].setting - 0.5) / g.channels
            if result.choice[root].setting else 0.0 for root, g in groups.items()}


def _pruned_params(model: nn.Module, example: torch.Tensor, ignored: dict[str, nn.Module],
                   ratios: dict[nn.Module, float], ratio: float, round_to: int | None) -> int:
    """Parameters left after the stage's cut (``ratios`` per group, ``ratio`` for the others),
    done on a copy in one step."""
    import torch_pruning as tp

    index = {id(m): n for n, m in model.named_modules()}
    work = copy.deepcopy(model).eval()
    named = dict(work.named_modules())
    head = _output_layer(work, example)
    skip = [named[n] for n in ignored if n in named] + [head[1]]
    with _tt_support(work) as extra:
        pruner = tp.pruner.MetaPruner(
            work, example, tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio,
            pruning_ratio_dict={named[index[id(m)]]: r for m, r in ratios.items()} or None,
            ignored_layers=skip + extra.pop("ignored_layers", []), round_to=round_to, **extra)
    pruner.step()
    return sum(p.numel() for p in work.parameters())


# ----------------------------------------------------------------------------------------------
# gradients for Taylor importance, and the KD recovery phase


def _accumulate_gradients(model: nn.Module, ctx: StageContext) -> None:
    """Cross-entropy gradients of a few training batches, summed into ``.grad`` (Taylor)."""
    model.zero_grad(set_to_none=True)
    model.eval()  # BatchNorm statistics stay as trained; gradients still flow
    loader = ctx.data.loader("train", batch_size=64, shuffle=True, seed=ctx.seed)
    for i, (x, y) in enumerate(loader):
        if i == _TAYLOR_BATCHES:
            break
        F.cross_entropy(model(x.float()), y).backward()


def kd_recovery_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                     temperature: float = 4.0) -> Tensor:
    """Hinton's KD loss (:func:`kdcompress.losses.functional.kd_loss`) plus cross-entropy."""
    return kd_loss(student_logits, teacher_logits, temperature) + F.cross_entropy(student_logits,
                                                                                   labels)


def _recover(model: nn.Module, teacher: nn.Module, ctx: StageContext, config: FitConfig,
             step: int, steps: int) -> None:
    """Distil ``teacher`` into the freshly pruned ``model`` with :func:`fit`."""
    teacher.to(ctx.device).eval()

    def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        with torch.no_grad():
            target = teacher(x)
        return kd_recovery_loss(net(x), target, y)

    description = f"recover {step + 1}/{steps}" if steps > 1 else "recover"
    fit(model, loss_fn, ctx.data, config=config, ctx=ctx, description=description,
        data_parallel=spec_of(prune).distributed)
    model.cpu().eval()
    teacher.cpu()
