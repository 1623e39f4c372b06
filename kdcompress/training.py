"""One training loop, :func:`fit`, for ``train``, ``distill``, ``prune``'s recovery and your stages.

The loss is a parameter: ``loss_fn(net, x, y)`` returns a scalar tensor, or a scalar and a dict of
named parts shown in the progress bar. Everything else is the same for every caller: the
optimiser and its learning-rate schedule (:class:`FitConfig`), gradient clipping, mixed precision
on CUDA, data-parallel sharding under ``torchrun``, a finiteness check of the loss at every step
(:class:`~kdcompress.errors.DivergedError` at the first NaN or inf), and the validation accuracy
after every epoch, sent to the progress bar, to the run's observers (``ctx.epoch_end``) and to an
``on_epoch`` callback that may stop the run.

>>> import torch.nn.functional as F
>>> from kdcompress import data, models
>>> task = data.digits()
>>> model = models.cnn(width=8).build(task.input_shape, task.num_classes)
>>> result = fit(model, lambda net, x, y: F.cross_entropy(net(x), y), task,
...              config=FitConfig(epochs=1))  # doctest: +SKIP
>>> result.val_accuracy  # doctest: +SKIP
0.74
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from kdcompress import distributed
from kdcompress.context import StageContext
from kdcompress.data import Task
from kdcompress.declare import Check, Choice, Float, Int
from kdcompress.errors import DivergedError, StageError
from kdcompress.placement import (
    PRECISIONS,
    ResidentBatches,
    auto_batch,
    autocast_dtype,
    decide_placement,
    make_sampler,
    warmup_steps,
)

__all__ = ["fit", "FitConfig", "FitResult", "Progress", "EpochStats", "LossFn", "OPTIMIZERS",
           "SCHEDULES", "FIT_CHECKS", "make_optimizer", "accuracy", "predict_logits",
           "predict_split"]

#: ``"adamw"`` (AdamW) or ``"sgd"`` (momentum 0.9, Nesterov).
OPTIMIZERS = ("adamw", "sgd")
#: ``"cosine"`` decay to zero over the run, ``"constant"``, or ``"onecycle"`` (Smith & Topin,
#: "Super-Convergence", 2019: warm-up to ``lr`` then annealing); all stepped once per batch.
SCHEDULES = ("cosine", "constant", "onecycle")

#: Rules for the optimisation settings; the training stages declare them for their keywords too.
FIT_CHECKS: dict[str, Check] = {
    "epochs": Int(min=0),
    "lr": Float(gt=0),
    "batch_size": Int(min=1, optional=True),
    "weight_decay": Float(ge=0),
    "optimizer": Choice(OPTIMIZERS),
    "schedule": Choice(SCHEDULES),
    "grad_clip": Float(gt=0, optional=True),
    "precision": Choice(PRECISIONS),
    "keep_best": Choice([True, False]),
}

#: ``loss_fn(net, x, y)`` (or ``loss_fn(net, x, y, index)`` with ``with_index=True``) returns the
#: loss, or ``(loss, {"part": tensor, ...})``.
LossFn = Callable[..., "Tensor | tuple[Tensor, Mapping[str, Tensor]]"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitConfig:
    """Optimisation settings of one :func:`fit` run.

    Parameters
    ----------
    epochs : int
        Passes over the training split (0 trains nothing).
    lr : float
        Peak learning rate.
    batch_size : int, optional
        Samples per step (per process under ``torchrun``). None: 64 on the CPU, larger on CUDA
        with ``lr`` scaled to match (:func:`kdcompress.placement.auto_batch`); the choice is
        in the stage's details (``batch``).
    weight_decay : float
        Decoupled weight decay (AdamW) or L2 penalty (SGD).
    optimizer : {"adamw", "sgd"}
        See :data:`OPTIMIZERS`.
    schedule : {"cosine", "constant", "onecycle"}
        See :data:`SCHEDULES`.
    grad_clip : float, optional
        Clip the global gradient norm to this value before each step.
    amp : bool
        Automatic mixed precision (float16 autocast with a gradient scaler) when training on
        CUDA with ``precision="auto"``; ignored on the CPU.
    precision : {"auto", "fp32", "fp16", "bf16"}
        ``"auto"``: as ``amp`` says on CUDA, float32 on the CPU; ``"bf16"``: bfloat16 autocast
        on the CPU or CUDA; ``"fp16"``: float16 autocast with a gradient scaler (CUDA only);
        ``"fp32"``: no autocast.
    transform : callable, optional
        ``transform(x) -> x`` applied to every training batch on the training device, without
        gradient, before ``loss_fn`` sees it (random augmentation, :mod:`kdcompress.augment`);
        never to the batches that are measured. It must keep the batch's shape.
    keep_best : bool
        End with the weights of the epoch whose validation score (``ctx.metric`` on
        ``data.eval_split``) was highest, the starting weights counting as epoch 0, instead of
        the last epoch's: training can only keep or improve what the model started with.

    Raises
    ------
    StageError
        A setting breaks its rule (:data:`FIT_CHECKS`), e.g. ``lr must be > 0, but got 0``.
    """

    epochs: int = 10
    lr: float = 2e-3
    batch_size: int | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    grad_clip: float | None = None
    amp: bool = True
    transform: Callable[[Tensor], Tensor] | None = None
    precision: str = "auto"
    keep_best: bool = False

    def __post_init__(self) -> None:
        for key, check in {**FIT_CHECKS, "amp": Choice([True, False])}.items():
            problem = check(key, getattr(self, key))
            if problem:
                raise StageError(f"FitConfig: {problem}")
        if self.transform is not None and not callable(self.transform):
            raise StageError(f"FitConfig: transform must be a callable on batches, but got "
                             f"{type(self.transform).__name__}")


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: mean training loss (and its parts) and the validation accuracy."""

    epoch: int
    loss: float
    val_accuracy: float
    parts: dict[str, float] = field(default_factory=dict)
    #: The pipeline's metric (``ctx.metric``) on the same split; top-1 accuracy by default.
    val_score: float | None = None

    def as_dict(self) -> dict[str, float]:
        """``{"epoch", "loss", "val_accuracy", "val_score"}`` for a report (JSON)."""
        return {"epoch": self.epoch, "loss": self.loss, "val_accuracy": self.val_accuracy,
                "val_score": self.val_score}


@dataclass
class Progress:
    """Where a running :func:`fit` is, updated before every step (a loss that changes over
    training reads it).

    Attributes
    ----------
    epochs : float
        Epochs completed before the current step, fractional: 0.0 at the first step, 2.5
        halfway through the third epoch.
    """

    epochs: float = 0.0


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`.

    Attributes
    ----------
    model : nn.Module
        The trained model (the one passed in, trained in place), in eval mode.
    history : list of EpochStats
        One entry per completed epoch.
    split : str
        The split ``val_accuracy`` is measured on (``data.eval_split``: ``"val"`` when there is
        one, else ``"train"``).
    steps : int
        Optimisation steps taken.
    stopped_early : bool
        Whether ``on_epoch`` stopped the run before its last epoch.
    best_epoch : int, optional
        With ``FitConfig.keep_best``: the epoch whose weights the model ends with (0: the
        starting weights).
    """

    model: nn.Module
    history: list[EpochStats]
    split: str
    steps: int
    stopped_early: bool = False
    best_epoch: int | None = None

    @property
    def final_loss(self) -> float:
        """Mean training loss of the last epoch (NaN when no epoch ran)."""
        return self.history[-1].loss if self.history else math.nan

    @property
    def val_accuracy(self) -> float:
        """Accuracy on :attr:`split` after the last epoch (NaN when no epoch ran)."""
        return self.history[-1].val_accuracy if self.history else math.nan


def fit(
    model: nn.Module, loss_fn: LossFn, data: Task, *, config: FitConfig | None = None,
    ctx: StageContext | None = None, params: Iterable[nn.Parameter] = (),
    with_index: bool = False, on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool | None] | None = None,
    description: str = "train", data_parallel: bool = False, progress: Progress | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data``'s training split by minimising ``loss_fn``.

    Each step: ``loss_fn`` under autocast (``config.precision``), a finiteness check, the
    backward pass, the gradients of ``params`` averaged across processes, gradient clipping, the
    optimiser and schedule steps, then ``on_step``. After each epoch the accuracy on
    ``data.eval_split`` goes to the progress bar (``ctx.report_epoch``), to the run's observers
    (``ctx.epoch_end``) and to ``on_epoch``. With ``data_parallel`` under ``torchrun`` the model
    is wrapped in DistributedDataParallel and every process trains on its shard. A last batch
    smaller than half ``batch_size`` is dropped (a batch of one breaks BatchNorm; relation losses
    need several samples).

    Parameters
    ----------
    model : nn.Module
        Trained in place (copy it first to keep the original) and moved to ``ctx.device``.
        Parameters with ``requires_grad=False`` stay as they are.
    loss_fn : callable
        ``loss_fn(net, x, y)`` returning a scalar tensor or ``(scalar, {"name": tensor})``;
        ``net`` is ``model`` or its DDP wrapper: call it, not ``model``, for the forward pass.
        With ``with_index=True`` it is called as ``loss_fn(net, x, y, index)``, ``index`` the
        positions of the batch's samples in the training split (to cache per-sample targets).
    data : Task
        Trains on ``data.split("train")``, measures on ``data.eval_split``.
    config : FitConfig, optional
        Optimisation settings; ``FitConfig()`` by default.
    ctx : StageContext, optional
        The calling stage's context: its name (used in errors), device, seed and progress bar.
        A standalone CPU context named ``description`` when not given.
    params : iterable of nn.Parameter
        Extra parameters optimised with the model's, e.g. a distillation loss's adapters.
    with_index : bool
        Pass the samples' indices to ``loss_fn``.
    on_step : callable, optional
        ``on_step(step)`` after each optimiser step, ``step`` counting from 1 (an EMA update).
    on_epoch : callable, optional
        ``on_epoch(epoch, metrics)`` after each epoch, ``epoch`` counting from 1 and ``metrics``
        holding ``"loss"``, the loss parts, ``"val_accuracy"`` (top-1, on ``data.eval_split``)
        and ``"val_score"`` (the pipeline's metric, ``ctx.metric``, on the same split), as
        ``ctx.epoch_end`` receives them. Return ``True`` to stop training after this epoch
        (``FitResult.stopped_early``, the model is kept); an exception it raises (a search's
        ``optuna.TrialPruned``) propagates out of ``fit`` unchanged and abandons the run.
    progress : Progress, optional
        Kept up to date before every step (``progress.epochs``), for a ``loss_fn`` whose loss
        changes over training (:class:`kdcompress.losses.Warmup`).
    description : str
        What the progress bar shows for this run (``"train"``, ``"distill"``).
    data_parallel : bool
        Every process of a ``torchrun`` job calls ``fit`` at this point (the calling stage is
        declared ``@stage(distributed=True)``): train with DistributedDataParallel on shards of
        the data. Leave it ``False`` in a stage that runs on rank 0 alone. No effect outside
        ``torchrun``.

    Returns
    -------
    FitResult
        The model, the per-epoch history and the number of steps.

    Raises
    ------
    DivergedError
        At the first step whose loss is NaN or infinite, naming the stage, epoch, step, loss and
        the likely cause (inputs that are not finite, or the learning rate); the model's weights
        are then unusable.
    StageError
        ``loss_fn`` returned something other than a scalar tensor, or nothing is trainable.
    """
    config = config or FitConfig()
    ctx = ctx or StageContext.standalone(description, data)
    parallel = data_parallel and distributed.is_distributed()
    loop = _Loop(model, loss_fn, data, config, ctx, list(params), with_index, on_step, parallel,
                 progress)
    split = data.eval_split
    history: list[EpochStats] = []
    stopped = False
    best = _Best(model, data, split, ctx, parallel) if config.keep_best else None
    for epoch in range(1, config.epochs + 1):
        means = loop.epoch(epoch)
        acc, val_score = _validate(model, data, split, ctx)
        history.append(EpochStats(epoch, means.pop("loss"), acc, means, val_score))
        if best is not None:
            best.offer(epoch, val_score)
        metrics = {"loss": history[-1].loss, **means}
        info = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        named = "" if ctx.metric.name == "accuracy" else \
            f" {split}_{ctx.metric.name} {val_score:.4f}"
        ctx.report_epoch(description, epoch, config.epochs,
                         f"{info} {split}_acc {acc:.4f}{named}")
        if _end_epoch(ctx, on_epoch, epoch,
                      {**metrics, "val_accuracy": acc, "val_score": val_score}, parallel) \
                and epoch < config.epochs:
            stopped = True
            break
    if best is not None:
        best.restore()
    return FitResult(model.eval(), history, split, loop.steps, stopped,
                     None if best is None else best.epoch)


def _validate(model: nn.Module, data: Task, split: str, ctx: StageContext) -> tuple[float, float]:
    """Top-1 accuracy and the pipeline's metric (``ctx.metric``) of ``model`` on ``split``."""
    logits, labels = predict_split(model, data, split, device=ctx.device)
    return float((logits.argmax(1) == labels).float().mean()), ctx.metric(logits, labels)


class _Best:
    """The weights of the best epoch so far by validation score (``FitConfig.keep_best``).

    Under ``torchrun`` every process scores the same replicated weights; rank 0's verdict is the
    one all of them follow, so the processes end with the same epoch's weights.
    """

    def __init__(self, model: nn.Module, data: Task, split: str, ctx: StageContext,
                 parallel: bool) -> None:
        self.model, self.ctx, self.parallel = model, ctx, parallel
        _, self.score = _validate(model, data, split, ctx)
        self.start = self.score
        self.epoch = 0
        self.state = self._copy()

    def _copy(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}

    def offer(self, epoch: int, score: float) -> None:
        better = score > self.score
        if self.parallel:
            better = distributed.all_gather(better)[0]
        if better:
            self.score, self.epoch, self.state = score, epoch, self._copy()

    def restore(self) -> None:
        self.model.load_state_dict(self.state)
        self.ctx.record("best_epoch", {"epoch": self.epoch, "val_score": round(self.score, 6),
                                       "start_val_score": round(self.start, 6)})


def _end_epoch(ctx: StageContext, on_epoch: Callable[[int, dict[str, float]], bool | None] | None,
               epoch: int, metrics: dict[str, float], parallel: bool) -> bool:
    """Tell the observers and ``on_epoch``; whether to stop. Processes decide together: an
    exception on any of them stops all, rank 0's return value counts."""
    error: BaseException | None = None
    stop = False
    try:
        ctx.epoch_end(epoch, metrics)
        stop = bool(on_epoch(epoch, metrics)) if on_epoch is not None else False
    except Exception as exc:  # re-raised below, after the other processes know
        error = exc
    if not parallel:
        if error is not None:
            raise error
        return stop
    decisions = distributed.all_gather((error is not None, stop))
    if error is not None:
        raise error
    if any(failed for failed, _ in decisions):
        raise StageError(f"stage '{ctx.name}' stopped after epoch {epoch}: another process's "
                         "epoch callback raised (see its error)")
    return decisions[0][1]


class _Loop:
    """The optimiser, schedule, scaler and loader of one :func:`fit` run, and its step."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Task, config: FitConfig,
                 ctx: StageContext, extra: list[nn.Parameter], with_index: bool,
                 on_step: Callable[[int], None] | None, parallel: bool,
                 progress: Progress | None = None) -> None:
        self.model, self.loss_fn, self.ctx = model, loss_fn, ctx
        self.progress = progress
        self.extra, self.with_index, self.on_step = extra, with_index, on_step
        self.parallel = parallel
        self.autocast, scaled = autocast_dtype(config.precision, config.amp, ctx.device, ctx.name)
        model.to(ctx.device)
        self.trainable = [p for p in model.parameters() if p.requires_grad] + extra
        if not self.trainable:
            raise StageError(f"stage '{ctx.name}': nothing to train: no parameter of "
                             f"{type(model).__name__} requires a gradient")
        train_set: Dataset = data.split("train")
        choice = auto_batch(config.batch_size, config.lr, samples=len(train_set),  # type: ignore[arg-type]
                            device=ctx.device, optimizer=config.optimizer,
                            world_size=distributed.world_size() if parallel else 1)
        self.config = dataclasses.replace(config, batch_size=choice.batch_size, lr=choice.lr)
        placement = decide_placement(train_set, ctx.device)
        ctx.record("batch", choice.as_dict())
        ctx.record("data_placement", placement.as_dict())
        ctx.record("precision", str(self.autocast).replace("torch.", "") if self.autocast
                   else "float32")
        log.info("%s: batch %d (%s); %s", ctx.name, choice.batch_size, choice.rule,
                 placement.reason)
        self.resident = tuple(t.to(ctx.device) for t in train_set.tensors) \
            if placement.resident else None  # type: ignore[attr-defined]
        self.train_set = _Indexed(train_set) if with_index else train_set
        self.options = data.loader_options(train_set)  # DataLoader workers, pinned memory
        if ctx.device.type == "cuda":
            self.options["pin_memory"] = True
        per_epoch = len(self.loader(ctx.seed))
        total = self.config.epochs * per_epoch
        warmup = 0 if self.config.schedule == "onecycle" else \
            warmup_steps(choice, steps_per_epoch=per_epoch, total_steps=total)
        if warmup:
            ctx.record("lr_warmup", {"steps": warmup, "from_lr": config.lr,
                                     "to_lr": choice.lr})
        self.optimizer, self.scheduler = make_optimizer(
            self.trainable, self.config, total_steps=total, warmup=warmup,
            warmup_from=1.0 / choice.lr_factor)
        self.scaler = torch.amp.GradScaler("cuda") if scaled else None
        self.net = distributed.wrap(model, ctx.device) if parallel else model
        self.steps = 0

    def loader(self, seed: int) -> DataLoader | ResidentBatches:
        """The shuffled batches of one epoch (of this process's shard when data-parallel),
        gathered on the device when the split is kept there; a last batch under half
        ``batch_size`` is dropped."""
        size = self.config.batch_size
        assert size is not None
        sampler = make_sampler(self.train_set, seed=seed, parallel=self.parallel)
        n = len(sampler)  # type: ignore[arg-type]
        drop_last = n > size and 0 < n % size < size / 2
        if drop_last and self.parallel:  # shards of equal length, as DDP needs
            sampler = make_sampler(self.train_set, seed=seed, parallel=True, drop_last=True)
        if self.resident is not None:
            return ResidentBatches(self.resident, sampler, batch_size=size, drop_last=drop_last,
                                   with_index=self.with_index)
        return DataLoader(self.train_set, batch_size=size, sampler=sampler, drop_last=drop_last,
                          generator=torch.Generator().manual_seed(seed), **self.options)

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train one epoch (counted from 1); the mean loss and parts over its samples."""
        self.net.train()
        sums: dict[str, float] = {}
        count = 0
        batches = self.loader(self.ctx.seed + epoch - 1)
        for i, batch in enumerate(batches, 1):
            if self.progress is not None:
                self.progress.epochs = epoch - 1 + (i - 1) / len(batches)
            x = batch[0].to(self.ctx.device, non_blocking=True)
            y = batch[1].to(self.ctx.device, non_blocking=True)
            if self.config.transform is not None:
                x = self._augmented(x)
            index = batch[2] if self.with_index else None
            for name, value in self.step(x, y, index, epoch=epoch, step=i).items():
                sums[name] = sums.get(name, 0.0) + value * len(x)
            count += len(x)
        return {k: v / max(count, 1) for k, v in sums.items()}

    def _augmented(self, x: Tensor) -> Tensor:
        """``config.transform`` of a training batch; a StageError if it changes the shape."""
        with torch.no_grad():
            out = self.config.transform(x)  # type: ignore[misc]
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise StageError(f"stage '{self.ctx.name}': transforms={self.config.transform!r} "
                             f"turned a batch of shape {tuple(x.shape)} into {got}; a training "
                             "transform must keep the batch's shape (crop back to the input "
                             "size)")
        return out

    def step(self, x: Tensor, y: Tensor, index: Tensor | None, *, epoch: int,
             step: int) -> dict[str, float]:
        """One optimisation step; the loss (mean over processes) and its parts."""
        args = (self.net, x, y) if index is None else (self.net, x, y, index)
        with torch.autocast(self.ctx.device.type, dtype=self.autocast) if self.autocast \
                else contextlib.nullcontext():
            value, parts = _as_loss(self.loss_fn(*args), self.ctx.name)
        loss = _checked(value, self, epoch=epoch, step=step, x=x)
        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(value) if self.scaler else value).backward()
        if self.parallel:
            distributed.average_gradients(self.extra)
        if self.config.grad_clip is not None:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.config.grad_clip)
        stepped = True
        if self.scaler:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)  # skipped when float16 gradients overflowed
            self.scaler.update()
            stepped = self.scaler.get_scale() >= scale  # the scale drops after a skipped step
        else:
            self.optimizer.step()
        if stepped:
            self.scheduler.step()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.steps)
        return {"loss": loss, **{k: float(v.detach()) for k, v in parts.items()}}


def make_optimizer(
    params: Iterable[nn.Parameter], config: FitConfig, *, total_steps: int, warmup: int = 0,
    warmup_from: float = 1.0,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and learning-rate schedule of ``config`` for a run of ``total_steps`` steps.

    ``warmup`` > 0 steps first ramp the learning rate linearly from ``warmup_from`` x
    ``config.lr`` to ``config.lr`` (a scaled batch's warm-up), then the schedule runs over the
    remaining steps; ``"onecycle"`` has its own warm-up and takes none.

    Examples
    --------
    >>> opt, sched = make_optimizer(nn.Linear(2, 2).parameters(), FitConfig(optimizer="sgd"),
    ...                             total_steps=10)
    >>> type(opt).__name__, opt.param_groups[0]["nesterov"]
    ('SGD', True)
    """
    params = list(params)
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    if warmup > 0 and config.schedule != "onecycle" and total_steps > warmup:
        ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=warmup_from,
                                                 end_factor=1.0, total_iters=warmup)
        rest = _schedule(optimizer, config, total_steps - warmup)
        return optimizer, torch.optim.lr_scheduler.SequentialLR(
            optimizer, [ramp, rest], milestones=[warmup])
    return optimizer, _schedule(optimizer, config, total_steps)


def _schedule(optimizer: torch.optim.Optimizer, config: FitConfig,
              total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    total = max(1, total_steps)
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                   total_steps=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


# ----------------------------------------------------------------------------------------------
# batches, losses, divergence


class _Indexed(Dataset):
    """``(x, y, index)`` samples of a data set."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i]
        return x, y, i


def _as_loss(out: Any, stage: str) -> tuple[Tensor, Mapping[str, Tensor]]:
    value, parts = out if isinstance(out, tuple) and len(out) == 2 else (out, {})
    if not isinstance(value, Tensor) or value.numel() != 1 or not isinstance(parts, Mapping):
        raise StageError(f"stage '{stage}': loss_fn must return a scalar tensor or (scalar, "
                         f"dict of tensors), but returned {type(out).__name__}"
                         + (f" of shape {tuple(value.shape)}" if isinstance(value, Tensor)
                            else ""))
    return value.reshape(()), parts


def _checked(value: Tensor, loop: _Loop, *, epoch: int, step: int, x: Tensor) -> float:
    """The loss as a float (its mean over processes); DivergedError when it is not finite."""
    local = float(value.detach())
    mean = float(distributed.mean(value.detach().float())) if loop.parallel else local
    if math.isfinite(mean):
        return mean
    config = loop.config
    where = (f"stage '{loop.ctx.name}' diverged at epoch {epoch}/{config.epochs}, step {step} "
             f"(step {loop.steps + 1} of the run): the loss is {local}")
    raise DivergedError(f"{where}. {_likely_cause(local, x, loop)}")


def _likely_cause(local: float, x: Tensor, loop: _Loop) -> str:
    config = loop.config
    if math.isfinite(local):
        return "It is finite here but not on another process: see that process's error"
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        return (f"Likely cause: the batch's inputs hold {bad} NaN/inf value(s); clean the data "
                "(the learning rate is not at fault)")
    if loop.steps == 0:
        return ("Likely cause: the model or the loss function, since the loss is not finite "
                "before any update and the inputs are finite; check the initial weights and "
                "the loss")
    weights = " (the weights are no longer finite)" if any(
        not bool(torch.isfinite(p).all()) for p in loop.trainable) else ""
    clip = "" if config.grad_clip is not None else " or clip gradients (grad_clip=1.0)"
    fp16 = ("; under mixed precision the low-precision activations may overflow too: try "
            "precision='fp32'") if loop.autocast is not None else ""
    return (f"Likely cause: the learning rate lr={config.lr:g} is too high{weights}; lower it "
            f"(e.g. lr={config.lr / 10:g}){clip}{fp16}")


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 512,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Logits of ``model`` (in eval mode) on ``x``, computed in batches, returned on the CPU."""
    was_training = model.training
    model.eval()
    outs = [model(x[i:i + batch_size].to(device)).float().cpu()
            for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs)


@torch.no_grad()
def predict_split(model: nn.Module, data: Task, split: str = "val", *, batch_size: int = 512,
                  device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` (in eval mode) on one split and its labels, both on the CPU.

    The split is streamed in batches (:meth:`~kdcompress.data.Task.batches`): its inputs are
    never all in memory at once, only the logits and labels are kept.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in data.batches(split, batch_size=batch_size):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def accuracy(model: nn.Module, data: Task, split: str = "val", *,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on one split of ``data`` (0..1), streamed in batches."""
    logits, y = predict_split(model, data, split, device=device)
    return float((logits.argmax(1) == y).float().mean())
