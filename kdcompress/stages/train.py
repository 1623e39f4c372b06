"""The ``train`` stage: train or fine-tune a torch model with cross-entropy."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.augment import TRANSFORMS, Transforms, compose
from kdcompress.context import StageContext, resolve_context
from kdcompress.data import Task
from kdcompress.declare import Float, check_arguments, spec_of, stage
from kdcompress.models import ModelSpec, as_module
from kdcompress.training import FIT_CHECKS, FitConfig, fit

__all__ = ["train"]


@stage(role="train", distributed=True,
       checks={**FIT_CHECKS, "label_smoothing": Float(ge=0, lt=1), "transforms": TRANSFORMS})
def train(
    model: nn.Module | ModelSpec, *, epochs: int = 10, lr: float = 2e-3,
    batch_size: int | None = None,
    weight_decay: float = 1e-4, label_smoothing: float = 0.0, optimizer: str = "adamw",
    schedule: str = "cosine", grad_clip: float | None = None, transforms: Transforms | None = None,
    precision: str = "auto", keep_best: bool = False, data: Task | None = None,
    ctx: StageContext | None = None,
) -> nn.Module:
    """Train ``model`` on the task's training split with cross-entropy.

    One loop, :func:`kdcompress.training.fit`: AdamW with cosine decay by default, the
    validation accuracy after every epoch, a :class:`~kdcompress.errors.DivergedError` at the
    first non-finite loss. The input model is copied, never changed. Under ``torchrun`` every
    process trains its shard of the data with DistributedDataParallel.

    Parameters
    ----------
    model : nn.Module or ModelSpec
        The model to train (``models.cnn()`` builds one for the data).
    epochs, lr, batch_size, weight_decay
        Optimisation settings (:class:`~kdcompress.training.FitConfig`). ``batch_size=None``
        trains at 64 on the CPU and at a larger batch on CUDA, with ``lr`` (meant for 64)
        scaled to match; the choice is in the stage's details.
    label_smoothing : float
        Cross-entropy label smoothing, ``0 <= label_smoothing < 1``.
    optimizer : {"adamw", "sgd"}
        AdamW, or SGD with Nesterov momentum 0.9.
    schedule : {"cosine", "constant", "onecycle"}
        Learning-rate schedule, stepped once per batch.
    grad_clip : float, optional
        Clip the gradient norm to this value.
    transforms : Transform, function or list of them, optional
        Random augmentation of the training batches (:mod:`kdcompress.augment`), e.g.
        ``[RandomCrop(padding=2), Noise(0.1)]``; never applied to the batches measured.
    precision : {"auto", "fp32", "fp16", "bf16"}
        Autocast precision of the training steps: ``"auto"`` is float16 with a gradient scaler
        on CUDA and float32 on the CPU; ``"bf16"`` works on both; ``"fp16"`` needs CUDA.
    keep_best : bool
        End with the weights of the epoch with the best validation score, the starting weights
        counting as epoch 0 (``details.best_epoch`` says which), instead of the last epoch's.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    nn.Module
        The trained model, in eval mode, on the CPU.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``epochs must be an integer, got 'ten'``).
    DivergedError
        The loss became NaN or infinite; nothing is returned.

    Examples
    --------
    >>> from kdcompress import data, models
    >>> teacher = train(models.cnn(width=16), epochs=1, data=data.digits())  # doctest: +SKIP
    """
    check_arguments(train, {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                            "weight_decay": weight_decay, "label_smoothing": label_smoothing,
                            "optimizer": optimizer, "schedule": schedule, "grad_clip": grad_clip,
                            "transforms": transforms, "precision": precision,
                            "keep_best": keep_best})
    ctx = resolve_context(ctx, "train", data)
    augment = compose(transforms)
    if augment is not None:
        augment.check_input(ctx.data.input_shape, ctx.name)
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(as_module(model, ctx.data)).to(ctx.device)
    config = FitConfig(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                       optimizer=optimizer, schedule=schedule, grad_clip=grad_clip,
                       transform=augment, precision=precision, keep_best=keep_best)

    def loss_fn(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(net(x), y, label_smoothing=label_smoothing)

    result = fit(model, loss_fn, ctx.data, config=config, ctx=ctx, description="train",
                 data_parallel=spec_of(train).distributed)
    if result.history:
        ctx.record("final_loss", result.final_loss)
        ctx.record("history", [e.as_dict() for e in result.history])
    return model.cpu().eval()
