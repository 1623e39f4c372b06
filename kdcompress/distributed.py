"""Data-parallel training under ``torchrun``: process group, sharded loaders, DDP wrapping.

``torchrun --nproc-per-node N -m kdcompress run FILE`` starts N processes. Stages declared
data-parallel (``@stage(distributed=True)`` in :mod:`kdcompress.declare`: ``train``, ``distill``,
``prune``) run on every process, training through :func:`kdcompress.training.fit` with
:class:`~torch.nn.parallel.DistributedDataParallel` and a
:class:`~torch.utils.data.DistributedSampler` (:func:`kdcompress.placement.make_sampler`);
every other stage runs on rank 0 while the others wait. Rank 0 alone writes artifacts and
reports. Gloo on the CPU, NCCL on CUDA.
Outside ``torchrun`` every function here is a no-op.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
from torch import nn

__all__ = ["init_from_env", "is_distributed", "rank", "world_size", "is_main", "barrier",
           "all_gather", "mean", "wrap", "average_gradients"]


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside torchrun)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 outside torchrun)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes artifacts and reports."""
    return rank() == 0


def init_from_env(device: str) -> torch.device:
    """Join the process group torchrun describes (if any); return this process's device."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=4))
    if device == "cuda" and is_distributed():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def barrier() -> None:
    """Wait for every process."""
    if is_distributed():
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (a one-element list outside torchrun)."""
    if not is_distributed():
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over every process (``value`` itself outside torchrun).

    Every process must call it at the same point: a per-step loss, so that all of them see the
    same number (and stop together when it is not finite).
    """
    if not is_distributed():
        return value
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total)
    return total / dist.get_world_size()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` under torchrun, ``model`` otherwise."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def average_gradients(params: Any) -> None:
    """All-reduce and average the gradients of parameters outside a DDP wrapper (adapters)."""
    if not is_distributed():
        return
    import torch.distributed as dist

    size = dist.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= size

