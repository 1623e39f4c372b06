"""Where a training run's batches live, and the batch size and precision it trains at.

Three decisions :func:`kdcompress.training.fit` takes once per run, recorded in the stage's
details and logged:

- **Placement** (:func:`decide_placement`). A training split held as tensors
  (:class:`~torch.utils.data.TensorDataset`) that fits in the device's free memory (at most
  :data:`RESIDENT_FRACTION` of it) is moved to the device once, and every batch is gathered
  there (:class:`ResidentBatches`): no per-batch host-to-device copy, no per-sample Python
  calls. On the CPU such tensors are already where the compute is. A split read sample by sample
  (an image folder, a user's data set), or one too large for the device, goes through a
  DataLoader with the task's workers, pinned memory and non-blocking copies on CUDA.
  Both paths draw the same samples in the same order: one seeded sampler (or, under torchrun,
  :class:`~torch.utils.data.DistributedSampler`) feeds either.
- **Batch size** (:func:`auto_batch`). ``batch_size=None`` (the training stages' default) is
  :data:`BASE_BATCH` on the CPU; on CUDA it grows by powers of two, up to
  :data:`MAX_BATCH_SCALE` times, while an epoch keeps at least :data:`MIN_STEPS` steps, and the
  learning rate, given for :data:`BASE_BATCH`, grows with it: linearly for SGD (Goyal et al.,
  2017), with the square root for AdamW (Malladi et al., 2022). A scaled learning rate is reached
  by a linear warm-up from the given one over the first epoch (at most a quarter of the run:
  :func:`warmup_steps`), Goyal et al.'s remedy for the early steps of a large batch. A batch size
  the user sets is used as it is, with the learning rate as given and no warm-up.
- **Precision** (:data:`PRECISIONS`): ``"auto"`` is float16 autocast with a gradient scaler on
  CUDA and float32 on the CPU; ``"bf16"`` is bfloat16 autocast on either device (no scaler: its
  range is float32's); ``"fp16"`` needs CUDA; ``"fp32"`` turns autocast off.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, RandomSampler, Sampler, TensorDataset

from kdcompress.errors import StageError

__all__ = ["Placement", "decide_placement", "ResidentBatches", "make_sampler", "auto_batch",
           "warmup_steps", "BatchChoice", "PRECISIONS", "autocast_dtype", "RESIDENT_FRACTION",
           "BASE_BATCH", "MIN_STEPS", "MAX_BATCH_SCALE"]

log = logging.getLogger(__name__)

#: The largest share of the device's free memory a training split may take to be kept there.
RESIDENT_FRACTION = 0.5
#: The batch size ``batch_size=None`` means on the CPU, and the one a given ``lr`` is meant for.
BASE_BATCH = 64
#: Fewest optimiser steps per epoch an automatic batch size leaves.
MIN_STEPS = 100
#: Most an automatic batch size grows over :data:`BASE_BATCH` (64 x 8 = 512).
MAX_BATCH_SCALE = 8
#: Training precisions: ``"auto"``, ``"fp32"``, ``"fp16"`` (CUDA), ``"bf16"``.
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


# ---- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where the training batches come from.

    Attributes
    ----------
    resident : bool
        The split's tensors sit on the training device and batches are gathered there.
    device : str
        The training device.
    data_bytes : int or None
        Bytes of the split's tensors (None: not tensor data).
    free_bytes : int or None
        The device's free memory when decided (None on the CPU).
    reason : str
        The decision in one sentence, as logged.
    """

    resident: bool
    device: str
    data_bytes: int | None
    free_bytes: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """The decision for a stage's details (JSON)."""
        return asdict(self)


def _tensors(dataset: Dataset) -> tuple[Tensor, ...] | None:
    return tuple(dataset.tensors) if isinstance(dataset, TensorDataset) else None


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def decide_placement(dataset: Dataset, device: torch.device | str, *,
                     free_bytes: int | None = None,
                     fraction: float = RESIDENT_FRACTION) -> Placement:
    """Decide whether ``dataset`` is kept on ``device`` for a whole training run.

    Parameters
    ----------
    dataset : Dataset
        The training split.
    device : torch.device or str
        The training device.
    free_bytes : int, optional
        The device's free memory; read from ``torch.cuda.mem_get_info`` on CUDA when not given.
    fraction : float
        The largest share of ``free_bytes`` the split may take.

    Returns
    -------
    Placement
    """
    device = torch.device(device)
    tensors = _tensors(dataset)
    if tensors is None:
        return Placement(False, str(device), None, free_bytes,
                         f"the training split ({type(dataset).__name__}) is read sample by "
                         "sample: a DataLoader with the task's workers"
                         + (", pinned memory and non-blocking copies" if device.type == "cuda"
                            else ""))
    size = sum(t.numel() * t.element_size() for t in tensors)
    if device.type == "cpu":
        return Placement(True, str(device), size, None,
                         f"the training split is {_gib(size)} of tensors in memory: batches are "
                         "gathered from them directly")
    if free_bytes is None and device.type == "cuda":
        free_bytes = int(torch.cuda.mem_get_info(device)[0])
    if free_bytes is not None and size <= fraction * free_bytes:
        return Placement(True, str(device), size, free_bytes,
                         f"the training split ({_gib(size)}) fits in {device}'s free memory "
                         f"({_gib(free_bytes)}): kept there, batches gathered on the device")
    free = _gib(free_bytes) if free_bytes is not None else "unknown"
    return Placement(False, str(device), size, free_bytes,
                     f"the training split ({_gib(size)}) is over {fraction:.0%} of {device}'s "
                     f"free memory ({free}): a DataLoader with pinned memory and non-blocking "
                     "copies")


def make_sampler(dataset: Dataset, *, seed: int, parallel: bool,
                 drop_last: bool = False) -> Sampler:
    """The seeded shuffling sampler of one epoch: this process's shard under torchrun."""
    if parallel:
        from torch.utils.data import DistributedSampler

        return DistributedSampler(dataset, shuffle=True, seed=seed, drop_last=drop_last)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


class ResidentBatches:
    """Batches gathered from tensors already on the training device.

    Yields exactly what a DataLoader over ``TensorDataset(*tensors)`` with the same
    ``sampler``, ``batch_size`` and ``drop_last`` yields (the same samples, in the same order,
    stacked the same way), plus, with ``with_index``, the samples' positions as a CPU int64
    tensor.

    Parameters
    ----------
    tensors : sequence of Tensor
        The split's tensors, on the device.
    sampler : Sampler
        Sample order, e.g. :func:`make_sampler`.
    batch_size : int
    drop_last : bool
    with_index : bool
    """

    def __init__(self, tensors: tuple[Tensor, ...], sampler: Sampler, *, batch_size: int,
                 drop_last: bool = False, with_index: bool = False) -> None:
        self.tensors = tensors
        self.sampler = sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        device = self.tensors[0].device
        for indices in self.batch_sampler:
            index = torch.as_tensor(indices, dtype=torch.int64)
            on_device = index.to(device, non_blocking=True)
            batch = tuple(t.index_select(0, on_device) for t in self.tensors)
            yield (*batch, index) if self.with_index else batch


# ---- batch size ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchChoice:
    """The batch size and learning rate a run trains at, and why."""

    batch_size: int
    lr: float
    rule: str
    #: ``lr`` over the learning rate the user gave (1.0: not scaled, no warm-up).
    lr_factor: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        """For a stage's details (JSON)."""
        return asdict(self)


def auto_batch(batch_size: int | None, lr: float, *, samples: int, device: torch.device | str,
               optimizer: str, world_size: int = 1) -> BatchChoice:
    """The batch size and learning rate for ``batch_size`` (``None``: decide for the device).

    Parameters
    ----------
    batch_size : int or None
        The user's batch size (used as it is), or None.
    lr : float
        The learning rate, meant for :data:`BASE_BATCH` when ``batch_size`` is None.
    samples : int
        Training samples (all processes together).
    device : torch.device or str
        The training device; the batch grows only on CUDA.
    optimizer : {"adamw", "sgd"}
        Sets the learning-rate rule: square root (AdamW), linear (SGD).
    world_size : int
        Processes under torchrun; the batch is per process, the steps count all of them.

    Returns
    -------
    BatchChoice
    """
    if batch_size is not None:
        return BatchChoice(int(batch_size), float(lr), "set by the user")
    device = torch.device(device)
    if device.type != "cuda":
        return BatchChoice(BASE_BATCH, float(lr), f"{BASE_BATCH} on {device.type}")
    scale = 1
    while scale * 2 <= MAX_BATCH_SCALE \
            and samples / (BASE_BATCH * scale * 2 * world_size) >= MIN_STEPS:
        scale *= 2
    if scale == 1:
        return BatchChoice(BASE_BATCH, float(lr),
                           f"{BASE_BATCH} on cuda: {samples} samples leave no room for a larger "
                           f"batch with {MIN_STEPS} steps per epoch")
    if optimizer == "sgd":
        factor, how = float(scale), "linear rule for SGD"
    else:
        factor, how = math.sqrt(scale), "square-root rule for AdamW"
    steps = samples // (BASE_BATCH * scale * world_size)
    return BatchChoice(BASE_BATCH * scale, float(lr) * factor,
                       f"{BASE_BATCH} x {scale} on cuda ({steps} steps per epoch); lr x "
                       f"{factor:g} ({how}), warmed up linearly from the given lr",
                       lr_factor=float(factor))


def warmup_steps(choice: BatchChoice, *, steps_per_epoch: int, total_steps: int) -> int:
    """Steps of linear warm-up to a scaled learning rate: one epoch, at most a quarter of the run.

    Goyal et al. (2017) ramp a large batch's learning rate up from the small batch's over the
    first epochs; the runs here are tens of epochs, so one epoch. Zero when the learning rate
    was not scaled.

    Examples
    --------
    >>> choice = BatchChoice(512, 2e-3 * 8 ** 0.5, "scaled", lr_factor=8 ** 0.5)
    >>> warmup_steps(choice, steps_per_epoch=107, total_steps=20 * 107)
    107
    >>> warmup_steps(choice, steps_per_epoch=107, total_steps=2 * 107)
    53
    >>> warmup_steps(BatchChoice(64, 2e-3, "64 on cpu"), steps_per_epoch=859, total_steps=8590)
    0
    """
    if choice.lr_factor <= 1.0:
        return 0
    return max(1, min(int(steps_per_epoch), int(total_steps) // 4))


# ---- precision -----------------------------------------------------------------------------


def autocast_dtype(precision: str, amp: bool, device: torch.device, stage: str
                   ) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, use a gradient scaler)`` for ``precision`` on ``device``.

    Raises
    ------
    StageError
        ``precision`` is unknown, or ``"fp16"`` on a device other than CUDA.
    """
    if precision not in PRECISIONS:
        raise StageError(f"stage '{stage}': precision must be one of {', '.join(PRECISIONS)}, "
                         f"but got {precision!r}")
    cuda = device.type == "cuda"
    if precision == "fp32" or (precision == "auto" and not (amp and cuda)):
        return None, False
    if precision == "bf16":
        return torch.bfloat16, False
    if not cuda:
        raise StageError(f"stage '{stage}': precision='fp16' needs CUDA (float16 training needs "
                         f"a gradient scaler on a GPU), but the device is {device}; use "
                         "precision='bf16' or 'fp32' on the CPU")
    return torch.float16, True
