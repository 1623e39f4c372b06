"""The ``distill`` stage: train a student against one or more teachers with any loss.

The loss (``kdcompress.losses``) names the features it needs; the stage captures them with forward
hooks on a copy of the student and on the teachers, builds one :class:`DistillBatch` per batch and
optimises the student together with the loss's adapters. The adapters are created from the first
batch's shapes and stay in the loss: the returned student is exactly the input architecture.

Teacher outputs are computed in eval mode under ``torch.no_grad()``. With ``cache_teacher=True``
they are computed once per training sample and reused in later epochs, keyed by the sample's
index, so the shuffled order of each epoch does not matter. This is only correct when a sample's
input is the same in every epoch, which kdcompress can tell for tensor data
(``from_tensors``, ``digits``, ``mnist``); for other data sets (they may augment at random) the
cache is refused with a warning, and it is never used with an EMA teacher, which changes every
step.

Self-distillation (no teacher) takes the soft targets of a sample from an earlier snapshot of
the same model on that same sample: ``"born_again"`` (Furlanello et al., "Born-Again Neural
Networks", ICML 2018) trains ``generations`` re-initialised copies in turn, each against a frozen
copy of the previous one, the first against the model as given (train it first);
``"ema"`` uses a mean teacher (Tarvainen & Valpola, NeurIPS 2017), an exponential moving average
of the student's weights that sees the same batch as the student.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdcompress import distributed
from kdcompress.context import StageContext, resolve_context
from kdcompress.data import Task
from kdcompress.errors import LayerError, LossError, StageError
from kdcompress.hooks import FeatureCapture
from kdcompress.losses import CE, KD, DistillBatch, DistillLoss, teacher_weights
from kdcompress.models import as_module
from kdcompress.training import accuracy, make_optimizer

__all__ = ["distill", "default_loss"]

_SELF_DISTILL = (None, "born_again", "ema")


def default_loss() -> DistillLoss:
    """``KD(temperature=4) * 0.9 + CE() * 0.1``, the loss ``distill`` uses when given none."""
    return KD(temperature=4.0) * 0.9 + CE() * 0.1


@distributed.data_parallel
def distill(
    student: nn.Module, teacher: nn.Module | list[nn.Module] | None = None, *,
    loss: nn.Module | None = None, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64,
    weight_decay: float = 0.0, teacher_weighting: str = "mean", self_distill: str | None = None,
    generations: int = 1, ema_decay: float = 0.999, cache_teacher: bool = False,
    data: Task | None = None, ctx: StageContext | None = None,
) -> nn.Module:
    """Train a copy of ``student`` against ``teacher`` (or several, or itself) with ``loss``.

    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, and the losses of
    :mod:`kdcompress.losses`. AdamW with cosine decay, like ``train``; the inputs are never
    changed.

    Parameters
    ----------
    student : nn.Module
        The model to train (copied).
    teacher : nn.Module or list of nn.Module, optional
        One or several teachers (copied, eval mode, no gradient). ``None`` with ``self_distill``.
    loss : DistillLoss, optional
        Any loss of :mod:`kdcompress.losses`; default :func:`default_loss`.
    epochs, lr, batch_size, weight_decay
        Optimisation settings (``epochs`` per generation for ``"born_again"``).
    teacher_weighting : {"mean", "confidence"}
        How several teachers' soft targets are mixed (:func:`kdcompress.losses.teacher_weights`).
    self_distill : {None, "born_again", "ema"}
        Self-distillation when ``teacher`` is None (see the module docstring).
    generations : int
        Born-again generations.
    ema_decay : float
        Decay of the EMA teacher (warmed up as ``min(decay, (1 + step) / (10 + step))``).
    cache_teacher : bool
        Reuse the teachers' outputs across epochs when the data allow it (module docstring).
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    nn.Module
        The distilled student, in eval mode, on the CPU, without hooks or adapters.

    Raises
    ------
    LossError
        A layer the loss names does not exist, or two layers cannot be paired; raised before the
        first optimisation step, naming both layers and their shapes.

    Examples
    --------
    >>> from kdcompress import data
    >>> from kdcompress.losses import KD, CE
    >>> student_kd = distill(student, teacher, loss=KD(temperature=4) * 0.9 + CE() * 0.1,
    ...                      epochs=10, data=data.digits())  # doctest: +SKIP
    """
    ctx = resolve_context(ctx, "distill", data)
    loss = _check_args(loss, teacher, epochs, teacher_weighting, self_distill, generations,
                       ema_decay)
    torch.manual_seed(ctx.seed)
    student = copy.deepcopy(as_module(student, ctx.data)).to(ctx.device)
    if epochs == 0:
        return student.cpu().eval()
    run = _Run(ctx, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
               teacher_weighting=teacher_weighting, cache_teacher=cache_teacher,
               generations=generations if self_distill == "born_again" else 1)
    if self_distill is None:
        teachers = [_frozen(as_module(t, ctx.data), ctx.device) for t in _as_list(teacher)]
        student = run.fit(student, teachers, copy.deepcopy(loss))
    elif self_distill == "born_again":
        for g in range(generations):
            previous = _frozen(student, ctx.device)
            student = _reinitialised(student, ctx, seed=ctx.seed + g)
            student = run.fit(student, [previous], copy.deepcopy(loss), generation=g)
    else:
        ema = _frozen(student, ctx.device)
        student = run.fit(student, [ema], copy.deepcopy(loss), ema_decay=ema_decay)
    return student.cpu().eval()


def _as_list(teacher: nn.Module | list[nn.Module] | None) -> list[nn.Module]:
    if teacher is None:
        return []
    return list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]


def _check_args(loss, teacher, epochs, teacher_weighting, self_distill, generations,
                ema_decay) -> DistillLoss:
    loss = default_loss() if loss is None else loss
    if not isinstance(loss, DistillLoss):
        raise LossError(f"distill: loss must be a kdcompress.losses loss (KD(), FitNet(...), "
                        f"their sums and multiples), but got {type(loss).__name__}")
    if epochs < 0:
        raise StageError(f"distill: epochs must be >= 0, but got {epochs}")
    if teacher_weighting not in ("mean", "confidence"):
        raise StageError(f"distill: teacher_weighting must be 'mean' or 'confidence', but got "
                         f"{teacher_weighting!r}")
    if self_distill not in _SELF_DISTILL:
        raise StageError(f"distill: self_distill must be None, 'born_again' or 'ema', but got "
                         f"{self_distill!r}")
    if self_distill is not None and teacher is not None:
        raise StageError(f"distill: self_distill={self_distill!r} distils the student from "
                         "itself; pass teacher=None, or drop self_distill to use the teacher")
    if self_distill is None and not _as_list(teacher) and loss.needs_teacher():
        raise StageError(f"distill: the loss {loss!r} needs a teacher: pass teacher=..., or "
                         "self_distill='born_again' or 'ema'")
    if generations < 1:
        raise StageError(f"distill: generations must be >= 1, but got {generations}")
    if not 0.0 <= ema_decay < 1.0:
        raise StageError(f"distill: ema_decay must be in [0, 1), but got {ema_decay}")
    return loss


def _frozen(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy in eval mode without gradients (made before any hook is registered)."""
    frozen = copy.deepcopy(model).to(device).eval()
    frozen.requires_grad_(False)
    return frozen


def _reinitialised(model: nn.Module, ctx: StageContext, *, seed: int) -> nn.Module:
    """A copy with fresh weights: ``reset_parameters()`` on every module that has it."""
    torch.manual_seed(seed)
    fresh = copy.deepcopy(model)
    kept = []
    for name, module in fresh.named_modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
        elif any(True for _ in module.parameters(recurse=False)):
            kept.append(name or type(module).__name__)
    if kept:
        ctx.warn(f"born-again: {', '.join(kept)} have no reset_parameters(); their weights are "
                 "carried over to the new generation")
    fresh.requires_grad_(True)
    return fresh.train()


def _index_cacheable(dataset: Dataset) -> bool:
    """Whether a sample's input is fixed (tensor data), so teacher outputs can be cached."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        x, y = self.dataset[i]
        return x, y, i


class _TeacherCache:
    """Teacher logits and features per training sample, filled on first sight."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.filled = torch.zeros(size, dtype=torch.bool)
        self.store: dict[tuple[int, str | None], Tensor] = {}

    def get(self, index: Tensor, num_teachers: int, names: list[str]):
        if not bool(self.filled[index].all()):
            return None
        logits = [self.store[(k, None)][index] for k in range(num_teachers)]
        feats = [{n: self.store[(k, n)][index] for n in names} for k in range(num_teachers)]
        return logits, feats

    def put(self, index: Tensor, logits: list[Tensor], feats: list[dict[str, Tensor]]) -> None:
        for k, (z, f) in enumerate(zip(logits, feats, strict=True)):
            for key, value in [((k, None), z)] + [((k, n), v) for n, v in f.items()]:
                if key not in self.store:
                    self.store[key] = value.new_zeros((self.size,) + tuple(value.shape[1:]))
                self.store[key][index.to(value.device)] = value
        self.filled[index] = True


class _Run:
    """One distillation run's settings and its training loop."""

    def __init__(self, ctx: StageContext, *, epochs: int, lr: float, batch_size: int,
                 weight_decay: float, teacher_weighting: str, cache_teacher: bool,
                 generations: int) -> None:
        self.ctx, self.epochs, self.lr, self.batch_size = ctx, epochs, lr, batch_size
        self.weight_decay, self.teacher_weighting = weight_decay, teacher_weighting
        self.cache_teacher, self.generations = cache_teacher, generations

    def loader(self, epoch: int) -> DataLoader:
        """The shuffled training loader of one epoch; the last, smaller batch is dropped when the
        split holds more than a batch (relation losses and BatchNorm need >= 2 samples)."""
        train = self.ctx.data.split("train")
        return distributed.sharded_loader(train, batch_size=self.batch_size,
                                          seed=self.ctx.seed + epoch,
                                          drop_last=len(train) > self.batch_size)  # type: ignore[arg-type]

    def batches(self, epoch: int, indexed: bool) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        """``(x, y, index)`` batches of one epoch; ``index`` only when ``indexed``."""
        loader = self.loader(epoch)
        if not indexed:
            for x, y in loader:
                yield x, y, None
            return
        same_order = DataLoader(_Indexed(loader.dataset), batch_size=loader.batch_size,
                                sampler=loader.sampler, drop_last=loader.drop_last,
                                generator=loader.generator)
        yield from same_order

    def fit(self, student: nn.Module, teachers: list[nn.Module], loss: DistillLoss, *,
            generation: int = 0, ema_decay: float | None = None) -> nn.Module:
        """Train ``student`` in place against ``teachers``; hooks are removed on return."""
        ctx = self.ctx
        loss = loss.to(ctx.device)
        captures: list[FeatureCapture] = []
        try:
            captures.append(_capture(student, loss.student_layers(), "student", loss))
            captures += [_capture(t, loss.teacher_layers(), f"teacher {k}", loss)
                         for k, t in enumerate(teachers)]
            self._loop(student, teachers, loss, captures, generation, ema_decay)
        finally:
            for capture in captures:
                capture.remove()
        return student

    def _use_cache(self, ema_decay: float | None) -> bool:
        if not self.cache_teacher:
            return False
        if ema_decay is not None:
            self.ctx.warn("cache_teacher ignored: the EMA teacher changes at every step")
            return False
        if not _index_cacheable(self.ctx.data.split("train")):
            self.ctx.warn("cache_teacher ignored: the training split is not tensor data, so a "
                          "sample may differ between epochs (random augmentation)")
            return False
        return True

    def _loop(self, student, teachers, loss, captures, generation, ema_decay) -> None:
        ctx = self.ctx
        s_capture, t_captures = captures[0], captures[1:]
        cache = self._fill_cache(teachers, t_captures, loss.teacher_layers()) \
            if self._use_cache(ema_decay) else None
        optimizer = scheduler = None
        steps = 0
        split = ctx.data.eval_split
        net = distributed.wrap(student, ctx.device)  # the hooks stay on the inner student
        for epoch in range(self.epochs):
            net.train()
            sums: dict[str, float] = {}
            count = 0
            for x, y, index in self.batches(epoch, indexed=cache is not None):
                x, y = x.to(ctx.device), y.to(ctx.device)
                logits, feats = self._teacher_outputs(x, index, teachers, t_captures, cache,
                                                      loss.teacher_layers())
                s_capture.clear()
                batch = DistillBatch(
                    student_logits=net(x), teacher_logits=logits, labels=y,
                    student_features=s_capture.pop(), teacher_features=feats,
                    teacher_weights=teacher_weights(logits, y, self.teacher_weighting)
                    if len(logits) > 1 else None)
                if optimizer is None:
                    _setup(loss, batch)
                    params = list(student.parameters()) + list(loss.parameters())
                    n_batches = len(self.loader(0))
                    optimizer, scheduler = make_optimizer(
                        params, lr=self.lr, weight_decay=self.weight_decay, epochs=self.epochs,
                        steps_per_epoch=n_batches)
                value, parts = loss(batch)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                distributed.average_gradients(loss.parameters())
                optimizer.step()
                scheduler.step()
                steps += 1
                if ema_decay is not None:
                    _ema_update(teachers[0], student, min(ema_decay, (1 + steps) / (10 + steps)))
                for name, v in {"loss": value, **parts}.items():
                    sums[name] = sums.get(name, 0.0) + float(v.detach()) * len(x)
                count += len(x)
            means = {k: v / max(count, 1) for k, v in sums.items()}
            acc = accuracy(student, ctx.data, split, device=ctx.device)
            s_capture.clear()
            info = " ".join(f"{k} {v:.4f}" for k, v in means.items()) + f" {split}_acc {acc:.4f}"
            ctx.report_epoch("distill", generation * self.epochs + epoch + 1,
                             self.generations * self.epochs, info)
        ctx.record("loss_parts", means)
        ctx.record(f"{split}_acc", acc)

    def _fill_cache(self, teachers, captures, names) -> _TeacherCache:
        """One pass of the teachers over the whole training split, in order."""
        train = self.ctx.data.split("train")
        cache = _TeacherCache(len(train))  # type: ignore[arg-type]
        in_order = DataLoader(_Indexed(train), batch_size=self.batch_size,
                              generator=torch.Generator())  # leaves the global RNG alone
        for x, _, index in in_order:
            self._teacher_outputs(x.to(self.ctx.device), index, teachers, captures, cache, names)
        return cache

    @torch.no_grad()
    def _teacher_outputs(self, x, index, teachers, captures, cache, names):
        if cache is not None:
            hit = cache.get(index, len(teachers), names)
            if hit is not None:
                return hit
        logits, feats = [], []
        for teacher, capture in zip(teachers, captures, strict=True):
            capture.clear()
            logits.append(teacher(x))
            feats.append(capture.pop())
        if cache is not None:
            cache.put(index, logits, feats)
        return logits, feats


def _capture(model: nn.Module, names: list[str], role: str, loss: DistillLoss) -> FeatureCapture:
    try:
        return FeatureCapture(model, names, role=role)
    except LayerError as exc:
        raise LossError(f"the loss {loss!r} reads layers the {role} does not have: {exc}") \
            from exc


def _setup(loss: DistillLoss, batch: DistillBatch) -> None:
    """Check that every named layer produced a tensor, then let the loss build its adapters."""
    found = [("student", batch.student_features, loss.student_layers())]
    found += [(f"teacher {k}", f, loss.teacher_layers())
              for k, f in enumerate(batch.teacher_features)]
    for role, feats, names in found:
        for name in names:
            if not isinstance(feats.get(name), Tensor):
                raise LossError(f"{role} layer '{name}' produced no tensor in the forward pass "
                                f"(is the module called by forward()?); the loss is {loss!r}")
    loss.setup(batch)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)
