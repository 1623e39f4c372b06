"""The ``train`` stage: train or fine-tune a torch model with cross-entropy."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from kdcompress import distributed
from kdcompress.context import StageContext, resolve_context
from kdcompress.data import Task
from kdcompress.models import ModelSpec, as_module
from kdcompress.training import accuracy, make_optimizer

__all__ = ["train"]


@distributed.data_parallel
def train(
    model: nn.Module | ModelSpec, *, epochs: int = 10, lr: float = 2e-3, batch_size: int = 64,
    weight_decay: float = 1e-4, label_smoothing: float = 0.0, data: Task | None = None,
    ctx: StageContext | None = None,
) -> nn.Module:
    """Train ``model`` on the task's training split with cross-entropy.

    AdamW with cosine decay; the input model is copied, never changed. Under ``torchrun`` every
    process trains its shard of the data with DistributedDataParallel.

    Parameters
    ----------
    model : nn.Module or ModelSpec
        The model to train (``models.cnn()`` builds one for the data).
    epochs, lr, batch_size, weight_decay, label_smoothing
        Optimisation settings.
    data : Task, optional
        The data; given by the pipeline, needed when calling the stage directly.

    Returns
    -------
    nn.Module
        The trained model, in eval mode, on the CPU.

    Examples
    --------
    >>> from kdcompress import data, models
    >>> teacher = train(models.cnn(width=16), epochs=1, data=data.digits())  # doctest: +SKIP
    """
    ctx = resolve_context(ctx, "train", data)
    if epochs < 0:
        raise ValueError(f"train: epochs must be >= 0, but got {epochs}")
    torch.manual_seed(ctx.seed)
    model = copy.deepcopy(as_module(model, ctx.data)).to(ctx.device)
    if epochs == 0:
        return model.cpu().eval()
    net = distributed.wrap(model, ctx.device)
    train_set = ctx.data.split("train")
    steps = len(distributed.sharded_loader(train_set, batch_size=batch_size, seed=ctx.seed))
    optimizer, scheduler = make_optimizer(model.parameters(), lr=lr, weight_decay=weight_decay,
                                          epochs=epochs, steps_per_epoch=steps)
    split = ctx.data.eval_split
    for epoch in range(epochs):
        net.train()
        total, count = 0.0, 0
        for x, y in distributed.sharded_loader(train_set, batch_size=batch_size,
                                               seed=ctx.seed + epoch):
            x, y = x.to(ctx.device), y.to(ctx.device)
            loss = F.cross_entropy(net(x), y, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(x)
            count += len(x)
        acc = accuracy(model, ctx.data, split, device=ctx.device)
        ctx.report_epoch("train", epoch + 1, epochs,
                         f"loss {total / max(count, 1):.4f} {split}_acc {acc:.4f}")
    ctx.record("final_loss", total / max(count, 1))
    return model.cpu().eval()
