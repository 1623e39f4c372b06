"""The ``distill`` stage: train a student against one or more teachers with any loss.

The loss (``kdcompress.losses``) names the features it needs; the stage captures them with forward
hooks on a copy of the student and on the teachers, builds one :class:`DistillBatch` per batch and
optimises the student together with the loss's adapters. The adapters are created from the first
batch's shapes and stay in the loss: the returned student is exactly the input architecture.

Teacher outputs are computed in eval mode under ``torch.no_grad()``, once per batch. By default
(``cache_teacher="auto"``) they are computed once per training sample, in one pass before the
first epoch, and reused in every epoch, keyed by the sample's index, so the shuffled order of each
epoch does not matter. This is only correct when a sample's input is the same in every epoch,
which kdcompress can tell for tensor data (``from_tensors``, ``from_numpy``, ``digits``,
``mnist``) and image folders (``from_folder``), and never under ``transforms=``; it is never used
with an EMA teacher, which changes every step. ``"auto"`` also skips a cache larger than
:data:`CACHE_LIMIT_BYTES` (large feature maps); ``True`` asks for it and warns when it cannot be
used; ``False`` runs the teachers on every batch. The stage's details say which happened
(``teacher_cache``).

Self-distillation (no teacher) takes the soft targets of a sample from an earlier snapshot of
the same model on that same sample: ``"born_again"`` (Furlanello et al., "Born-Again Neural
Networks", ICML 2018) trains ``generations`` re-initialised copies in turn, each against a frozen
copy of the previous one, the first against the model as given (train it first);
``"ema"`` uses a mean teacher (Tarvainen & Valpola, NeurIPS 2017), an exponential moving average
of the student's weights that sees the same batch as the student.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from kdcompress.augment import TRANSFORMS, Transforms, compose
from kdcompress.context import StageContext, resolve_context
from kdcompress.data import ImageFolder, Task
from kdcompress.declare import Check, Choice, Float, Int, Rule, check_arguments, spec_of, stage
from kdcompress.errors import LayerError, LossError
from kdcompress.hooks import FeatureCapture
from kdcompress.losses import CE, KD, DistillBatch, DistillLoss, teacher_weights
from kdcompress.models import ModelSpec, as_module
from kdcompress.placement import BASE_BATCH
from kdcompress.training import FIT_CHECKS, FitConfig, FitResult, Progress, fit

#: The largest teacher-output cache ``cache_teacher="auto"`` keeps (bytes, on the device).
CACHE_LIMIT_BYTES = 2**30
#: Samples per teacher batch while the cache is filled (inference only).
_FILL_BATCH = 512

__all__ = ["distill", "default_loss"]

_SELF_DISTILL = (None, "born_again", "ema")
_WEIGHTINGS = ("mean", "confidence")


def default_loss() -> DistillLoss:
    """``KD(temperature=1) * 0.5 + CE() * 0.5``, the loss ``distill`` uses when given none.

    Temperature 1, not Hinton's 4: the ``T^2`` factor of KD keeps the step size independent of
    ``T`` under SGD, but AdamW normalises the gradient's scale away, so at temperature ``T`` the
    student's softened outputs move about ``T`` times slower per step. Measured at ``train``'s
    learning rate on digits (small CNNs trained from scratch, two widths, 3 to 20 epochs, two
    seeds: 32 runs), KD at temperature 4 ended 24 test images (of 360) below training alone on
    average and 82 at worst; this loss 0 on average and 4 at worst. Pass
    ``loss=KD(temperature=4) * 0.9 + CE() * 0.1`` for the classic recipe (with a higher ``lr``
    or more epochs).
    """
    return KD(temperature=1.0) * 0.5 + CE() * 0.5


class _LossCheck(Check):
    """A kdcompress loss, or ``None`` for :func:`default_loss`."""

    def __call__(self, key: str, value: object) -> str | None:
        if value is None or isinstance(value, DistillLoss):
            return None
        return (f"{key} must be a kdcompress.losses loss (KD(), FitNet(...), their sums and "
                f"multiples), but got {type(value).__name__}")


def _needs_teacher(loss: object) -> bool:
    loss = default_loss() if loss is None else loss
    return isinstance(loss, DistillLoss) and loss.needs_teacher()


#: Checked when the stage is declared: a teacher given as another stage's output counts as given.
_RULES = (
    Rule(("self_distill", "teacher"),
         lambda self_distill, teacher: self_distill is None or teacher is None,
         "self_distill={self_distill} distils the student from itself; pass teacher=None, or "
         "drop self_distill to use the teacher", sees_inputs=True),
    Rule(("loss", "teacher", "self_distill"),
         lambda loss, teacher, self_distill: self_distill is not None
         or bool(_as_list(teacher)) or not _needs_teacher(loss),
         lambda loss, teacher, self_distill: (
             f"the loss {default_loss() if loss is None else loss!r} needs a teacher: pass "
             "teacher=..., or self_distill='born_again' or 'ema'"), sees_inputs=True),
)


@stage(role="distill", distributed=True, checks={
    **FIT_CHECKS,
    "teacher_weighting": Choice(_WEIGHTINGS),
    "self_distill": Choice(_SELF_DISTILL),
    "generations": Int(min=1),
    "ema_decay": Float(ge=0, lt=1),
    "cache_teacher": Choice(["auto", True, False]),
    "transforms": TRANSFORMS,
    "loss": _LossCheck(),
}, rules=_RULES)
def distill(
    student: nn.Module | ModelSpec, teacher: nn.Module | list[nn.Module] | None = None, *,
    loss: nn.Module | None = None, epochs: int = 10, lr: float = 2e-3,
    batch_size: int | None = None, weight_decay: float = 1e-4, optimizer: str = "adamw",
    schedule: str = "cosine", grad_clip: float | None = None, teacher_weighting: str = "mean",
    self_distill: str | None = None, generations: int = 1, ema_decay: float = 0.999,
    cache_teacher: bool | str = "auto", transforms: Transforms | None = None,
    precision: str = "auto", keep_best: bool = False, data: Task | None = None,
    ctx: StageContext | None = None,
) -> nn.Module:
    """Train a copy of ``student`` against ``teacher`` (or several, or itself) with ``loss``.

    Hinton et al., "Distilling the Knowledge in a Neural Network", 2015, and the losses of
    :mod:`kdcompress.losses`. The loop is :func:`kdcompress.training.fit`, with ``train``'s
    defaults (AdamW, lr 2e-3, weight decay 1e-4, cosine decay); the inputs are never changed.

    Parameters
    ----------
    student : nn.Module or ModelSpec
        The model to train (copied; a recipe is built for the data).
    teacher : nn.Module or list of nn.Module, optional
        One or several teachers (copied, eval mode, no gradient). ``None`` with ``self_distill``.
    loss : DistillLoss, optional
        Any loss of :mod:`kdcompress.losses`; default :func:`default_loss`.
    epochs, lr, batch_size, weight_decay, optimizer, schedule, grad_clip
        Optimisation settings, as for ``train`` (``epochs`` per generation for
        ``"born_again"``).
    teacher_weighting : {"mean", "confidence"}
        How several teachers' soft targets are mixed (:func:`kdcompress.losses.teacher_weights`).
    self_distill : {None, "born_again", "ema"}
        Self-distillation when ``teacher`` is None (see the module docstring).
    generations : int
        Born-again generations.
    ema_decay : float
        Decay of the EMA teacher (warmed up as ``min(decay, (1 + step) / (10 + step))``).
    cache_teacher : {"auto", True, False}
        Reuse the teachers' outputs across epochs when the data allow it (module docstring):
        ``"auto"`` when they do and the cache fits :data:`CACHE_LIMIT_BYTES`; ``True`` warns
        when it cannot.
    transforms : Transform, function or list of them, optional
        Random augmentation of the training batches (:mod:`kdcompress.augment`). The teachers
        and the student see the same augmented batch.
    precision : {"auto", "fp32", "fp16", "bf16"}
        Autocast precision of the training steps, as for ``train``.
    keep_best : bool
        End with the weights of the epoch with the best validation score, the student's starting
        weights counting as epoch 0 (``details.best_epoch``), instead of the last epoch's: a
        student that starts near its teacher is never left worse than it started.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    nn.Module
        The distilled student, in eval mode, on the CPU, without hooks or adapters.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``ema_decay must be < 1, but got 1.5``), the loss is not a
        kdcompress loss, or the settings do not go together (``self_distill`` with a teacher; a
        loss that needs a teacher without one). In a pipeline these are found when the stage is
        declared, a teacher given as another stage's output counting as given.
    LossError
        A layer the loss names does not exist, or two layers cannot be paired; raised before the
        first optimisation step, naming both layers and their shapes.
    DivergedError
        The loss became NaN or infinite; nothing is returned.

    Examples
    --------
    >>> from kdcompress import data
    >>> from kdcompress.losses import KD, CE
    >>> student_kd = distill(student, teacher, loss=KD(temperature=4) * 0.9 + CE() * 0.1,
    ...                      epochs=10, data=data.digits())  # doctest: +SKIP
    """
    check_arguments(distill, {
        "teacher": teacher, "loss": loss, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "weight_decay": weight_decay,
        "optimizer": optimizer, "schedule": schedule, "grad_clip": grad_clip,
        "teacher_weighting": teacher_weighting, "self_distill": self_distill,
        "generations": generations, "ema_decay": ema_decay, "cache_teacher": cache_teacher,
        "transforms": transforms, "precision": precision, "keep_best": keep_best})
    ctx = resolve_context(ctx, "distill", data)
    augment = compose(transforms)
    if augment is not None:
        augment.check_input(ctx.data.input_shape, ctx.name)
    loss = default_loss() if loss is None else loss
    torch.manual_seed(ctx.seed)
    student = copy.deepcopy(as_module(student, ctx.data)).to(ctx.device)
    if epochs == 0:
        return student.cpu().eval()
    config = FitConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                       optimizer=optimizer, schedule=schedule, grad_clip=grad_clip,
                       transform=augment, precision=precision, keep_best=keep_best)
    run = _Run(ctx, config, teacher_weighting=teacher_weighting, cache_teacher=cache_teacher)
    if self_distill is None:
        teachers = [_frozen(as_module(t, ctx.data), ctx.device) for t in _as_list(teacher)]
        run.fit(student, teachers, copy.deepcopy(loss))
    elif self_distill == "born_again":
        for g in range(generations):
            previous = _frozen(student, ctx.device)
            student = _reinitialised(student, ctx, seed=ctx.seed + g)
            run.fit(student, [previous], copy.deepcopy(loss),
                    description=f"distill gen {g + 1}/{generations}" if generations > 1
                    else "distill")
    else:
        ema = _frozen(student, ctx.device)
        run.fit(student, [ema], copy.deepcopy(loss), ema_decay=ema_decay)
    return student.cpu().eval()


def _as_list(teacher: nn.Module | list[nn.Module] | None) -> list[nn.Module]:
    if teacher is None:
        return []
    return list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]


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
    """Whether a sample's input is fixed (tensor data, an image folder), so teacher outputs can
    be cached."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, (TensorDataset, ImageFolder))


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

    def nbytes(self) -> int:
        """Bytes of the whole cache (allocated in full at the first batch)."""
        return sum(t.numel() * t.element_size() for t in self.store.values())


class _Run:
    """One distillation run's settings; :meth:`fit` trains one student with hooks attached."""

    def __init__(self, ctx: StageContext, config: FitConfig, *, teacher_weighting: str,
                 cache_teacher: bool | str) -> None:
        self.ctx, self.config = ctx, config
        self.teacher_weighting, self.cache_teacher = teacher_weighting, cache_teacher

    def fit(self, student: nn.Module, teachers: list[nn.Module], loss: DistillLoss, *,
            ema_decay: float | None = None, description: str = "distill") -> FitResult:
        """Train ``student`` in place against ``teachers``; hooks are removed on return."""
        loss = loss.to(self.ctx.device)
        captures: list[FeatureCapture] = []
        try:
            captures.append(_capture(student, loss.student_layers(), "student", loss))
            captures += [_capture(t, loss.teacher_layers(), f"teacher {k}", loss)
                         for k, t in enumerate(teachers)]
            return self._fit(student, teachers, loss, captures, ema_decay, description)
        finally:
            for capture in captures:
                capture.remove()

    def _fit(self, student, teachers, loss, captures, ema_decay, description) -> FitResult:
        ctx = self.ctx
        s_capture, t_captures = captures[0], captures[1:]
        names = loss.teacher_layers()
        cache = self._fill_cache(teachers, t_captures, names) \
            if self._use_cache(ema_decay) else None

        def batch_of(net: nn.Module, x: Tensor, y: Tensor, index: Tensor,
                     epochs_done: float | None = None) -> DistillBatch:
            logits, feats = self._teacher_outputs(x, index, teachers, t_captures, cache, names)
            s_capture.clear()
            return DistillBatch(
                student_logits=net(x), teacher_logits=logits, labels=y,
                student_features=s_capture.pop(), teacher_features=feats,
                teacher_weights=teacher_weights(logits, y, self.teacher_weighting)
                if len(logits) > 1 else None, epochs_done=epochs_done)

        self._setup(student, loss, batch_of)
        progress = Progress()  # for losses that change over training (Warmup)

        def loss_fn(net: nn.Module, x: Tensor, y: Tensor, index: Tensor):
            return loss(batch_of(net, x, y, index, progress.epochs))

        result = fit(student, loss_fn, ctx.data, config=self.config, ctx=ctx,
                     params=list(loss.parameters()), with_index=True,
                     on_step=None if ema_decay is None else _ema_follower(teachers[0], student,
                                                                          ema_decay),
                     progress=progress, description=description,
                     data_parallel=spec_of(distill).distributed)
        s_capture.clear()
        if result.history:
            last = result.history[-1]
            ctx.record("loss_parts", {"loss": last.loss, **last.parts})
            ctx.record("history", [e.as_dict() for e in result.history])
        return result

    def _setup(self, student: nn.Module, loss: DistillLoss, batch_of) -> None:
        """Run the first ``batch_size`` training samples through the models once (eval mode, no
        gradient): checks every hooked layer and lets the loss create its adapters before the
        optimiser is built."""
        first = next(iter(DataLoader(self.ctx.data.split("train"),
                                     batch_size=self.config.batch_size or BASE_BATCH,
                                     generator=torch.Generator())))  # global RNG left alone
        x, y = first[0].to(self.ctx.device), first[1].to(self.ctx.device)
        student.eval()
        with torch.no_grad():
            batch = batch_of(student, x, y, torch.arange(len(x)))
        student.train()
        _setup(loss, batch)

    def _use_cache(self, ema_decay: float | None) -> bool:
        if self.cache_teacher is False:
            self.ctx.record("teacher_cache", "off (cache_teacher=False)")
            return False
        reason = None
        if ema_decay is not None:
            reason = "the EMA teacher changes at every step"
        elif self.config.transform is not None:
            reason = (f"transforms={self.config.transform!r} change each training sample at "
                      "random, so the teacher must see each augmented batch")
        elif not _index_cacheable(self.ctx.data.split("train")):
            reason = ("the training split is not tensor data, so a sample may differ between "
                      "epochs (random augmentation)")
        if reason is None:
            return True
        self.ctx.record("teacher_cache", f"off: {reason}")
        if self.cache_teacher is True:
            self.ctx.warn(f"cache_teacher ignored: {reason}")
        return False

    def _fill_cache(self, teachers, captures, names) -> _TeacherCache | None:
        """One pass of the teachers over the whole training split, in order; None when
        ``"auto"`` finds the cache would exceed :data:`CACHE_LIMIT_BYTES`."""
        train = self.ctx.data.split("train")
        cache = _TeacherCache(len(train))  # type: ignore[arg-type]
        in_order = DataLoader(train, batch_size=_FILL_BATCH,
                              generator=torch.Generator())  # leaves the global RNG alone
        start = 0
        for x, _ in in_order:
            index = torch.arange(start, start + len(x))
            start += len(x)
            self._teacher_outputs(x.to(self.ctx.device), index, teachers, captures, cache, names)
            if start == len(x):  # after the first batch the cache's full size is known
                need = cache.nbytes()
                if self.cache_teacher == "auto" and need > CACHE_LIMIT_BYTES:
                    self.ctx.record("teacher_cache", f"off: the teachers' outputs take "
                                    f"{need / 2**20:.0f} MiB, over the {CACHE_LIMIT_BYTES >> 20} "
                                    "MiB of cache_teacher='auto' (set cache_teacher=True)")
                    return None
        self.ctx.record("teacher_cache", f"on: {cache.nbytes() / 2**20:.2f} MiB for "
                        f"{len(train)} samples, computed once")  # type: ignore[arg-type]
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


def _ema_follower(ema: nn.Module, model: nn.Module, decay: float) -> Callable[[int], None]:
    """``on_step`` for :func:`fit`: after step ``n`` the mean teacher moves towards the student
    with decay ``min(decay, (1 + n) / (10 + n))`` (warm-up, Tarvainen & Valpola)."""
    def step(n: int) -> None:
        _ema_update(ema, model, min(decay, (1 + n) / (10 + n)))

    return step


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * model`` for parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(p.detach(), 1.0 - decay)
    for be, b in zip(ema.buffers(), model.buffers(), strict=True):
        be.copy_(b)
