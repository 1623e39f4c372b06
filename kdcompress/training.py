"""Training-loop pieces shared by the stages that train (``train``, ``distill``, ``prune``)."""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.data import Task

__all__ = ["make_optimizer", "accuracy", "predict_logits"]


def make_optimizer(
    params, *, lr: float, weight_decay: float, epochs: int, steps_per_epoch: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a cosine learning-rate decay over the whole run (stepped once per batch)."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return optimizer, scheduler


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


def accuracy(model: nn.Module, data: Task, split: str = "val", *,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of ``model`` on one split of ``data`` (0..1)."""
    x, y = data.arrays(split)
    return float((predict_logits(model, x, device=device).argmax(1) == y).float().mean())
