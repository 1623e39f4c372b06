"""A numerical robustness sweep of the distillation losses under mixed precision.

For each loss, dtype (float32, or float16 / bfloat16 under ``torch.autocast``), feature scale and
batch size, :func:`check` builds random logits and features of that magnitude, computes the
loss and its gradient with respect to the student's tensors, and reports whether both are
finite and whether the value agrees with the same loss computed in float64 on the same
(rounded) inputs. ``tests/losses/test_robustness.py`` runs a representative grid and
``benchmarks/loss_robustness.py`` the full one.

Examples
--------
>>> r = check("KD", torch.bfloat16, scale=1e-20, batch=4)
>>> r.ok, r.value_finite, r.grad_finite
(True, True, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kdcompress.errors import LossError
from kdcompress.losses.base import DistillBatch, DistillLoss, teacher_weights
from kdcompress.losses.features import AT, FitNet
from kdcompress.losses.logits import CE, DKD, KD, FocalKD, TopKKD
from kdcompress.losses.relations import RKD, SP, ClassGroup, PairwiseRelation, Triplet

__all__ = ["LOSSES", "DTYPES", "SCALES", "BATCHES", "Result", "check", "sweep"]

#: Every loss family, built fresh for each check (adapters are created from the first batch).
LOSSES: dict[str, Callable[[], DistillLoss]] = {
    "KD": lambda: KD(temperature=4.0),
    "KD (2 teachers, confidence)": lambda: KD(temperature=4.0),
    "DKD": lambda: DKD(),
    "FocalKD": lambda: FocalKD(),
    "TopKKD": lambda: TopKKD(k=3),
    "CE": lambda: CE(label_smoothing=0.1),
    "FitNet mse": lambda: FitNet("feat", "feat", criterion="mse"),
    "FitNet cosine": lambda: FitNet("feat", "feat", criterion="cosine"),
    "AT pool": lambda: AT("feat", "feat", resize="pool"),
    "AT interpolate": lambda: AT("feat", "feat", resize="interpolate"),
    "Pairwise cosine": lambda: PairwiseRelation(metric="cosine"),
    "Pairwise euclidean": lambda: PairwiseRelation(metric="euclidean"),
    "Pairwise dot": lambda: PairwiseRelation(metric="dot"),
    "RKD distance+angle": lambda: RKD(),
    "SP": lambda: SP("feat", "feat"),
    "Triplet": lambda: Triplet(),
    "ClassGroup euclidean": lambda: ClassGroup(metric="euclidean"),
}

#: float32 runs without autocast; float16 and bfloat16 under ``torch.autocast``.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Feature magnitudes: the standard deviation of the random logits and features.
SCALES = (1e-20, 1e-14, 1e-8, 1e-4, 1e-2, 1.0, 1e2)
#: Batch sizes.
BATCHES = (1, 2, 7, 64, 256)

_CLASSES = 10


@dataclass(frozen=True)
class Result:
    """One point of the sweep: what was computed and whether it is sound."""

    loss: str
    dtype: str
    scale: float
    batch: int
    value: float
    value_finite: bool
    grad_finite: bool
    grad_nan: bool
    #: The exact gradient (float64, same rounded inputs) fits the dtype's range: a float16
    #: gradient above 65504 cannot be represented, whatever the loss does (GradScaler's case).
    grad_in_range: bool
    #: ``|value - float64 value| <= 1e-3 * |float64 value| + 1e-4``, on the same rounded inputs.
    agrees: bool

    @property
    def ok(self) -> bool:
        """Finite value that agrees with float64; a finite gradient wherever the exact one fits
        the dtype, and never a NaN."""
        grad_ok = self.grad_finite or (not self.grad_in_range and not self.grad_nan)
        return self.value_finite and self.agrees and grad_ok


def _inputs(name: str, scale: float, batch: int, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g) * scale

    out = {"s_logits": rand(batch, _CLASSES), "t_logits": rand(batch, _CLASSES),
           "t2_logits": rand(batch, _CLASSES),
           "labels": torch.randint(0, _CLASSES, (batch,), generator=g)}
    if name.startswith("AT"):
        out["s_feat"], out["t_feat"] = rand(batch, 4, 8, 8), rand(batch, 6, 4, 4)
    elif name.startswith("FitNet"):
        out["s_feat"], out["t_feat"] = rand(batch, 4, 5, 5), rand(batch, 6, 5, 5)
    elif name == "SP":
        out["s_feat"], out["t_feat"] = rand(batch, 12), rand(batch, 20)
    return out


def _run(name: str, inputs: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The loss value and the gradient of the student's tensors (concatenated, float32)."""
    low = dtype in (torch.float16, torch.bfloat16)
    leaves = {k: inputs[k].clone().requires_grad_() for k in ("s_logits", "s_feat")
              if k in inputs}
    cast = (lambda x: x.to(dtype)) if low else (lambda x: x)
    teachers = [cast(inputs["t_logits"])]
    if name.startswith("KD (2"):
        teachers.append(cast(inputs["t2_logits"]))
    batch = DistillBatch(
        student_logits=cast(leaves["s_logits"]), teacher_logits=teachers,
        labels=inputs["labels"],
        student_features={"feat": cast(leaves["s_feat"])} if "s_feat" in leaves else {},
        teacher_features=[{"feat": cast(inputs["t_feat"])}] * len(teachers)
        if "t_feat" in inputs else [{}] * len(teachers))
    if name.startswith("KD (2"):
        batch.teacher_weights = teacher_weights(teachers, batch.labels, "confidence")
    torch.manual_seed(0)  # the adapters' initial weights
    loss = LOSSES[name]()
    with torch.autocast("cpu", dtype=dtype, enabled=low):
        loss.setup(batch)
        value, _ = loss(batch)
    grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    grad = torch.cat([gr.flatten().double() for gr in grads if gr is not None] or
                     [torch.zeros(1, dtype=torch.float64)])
    return value.detach(), grad


def check(name: str, dtype: torch.dtype, scale: float, batch: int, seed: int = 0) -> Result:
    """Run loss ``name`` at one ``dtype``, feature ``scale`` and ``batch`` size.

    Raises
    ------
    LossError
        ``name`` is not a key of :data:`LOSSES`.
    """
    if name not in LOSSES:
        raise LossError(f"no loss named {name!r} in the sweep; the losses are {sorted(LOSSES)}")
    inputs = _inputs(name, scale, batch, seed)
    value, grad = _run(name, inputs, dtype)
    # the same loss in float64 on the inputs as rounded to ``dtype``
    rounded = {k: (v.to(dtype).double() if v.is_floating_point() else v)
               for k, v in inputs.items()}
    ref, ref_grad = _run(name, rounded, torch.float64)
    v, r = float(value), float(ref)
    agrees = math.isfinite(v) and abs(v - r) <= 1e-3 * abs(r) + 1e-4
    in_range = bool(ref_grad.abs().max() < torch.finfo(dtype).max)
    return Result(name, str(dtype).removeprefix("torch."), scale, batch, v,
                  math.isfinite(v), bool(torch.isfinite(grad).all()),
                  bool(torch.isnan(grad).any()), in_range, agrees)


def sweep(losses=None, dtypes=DTYPES, scales=SCALES, batches=BATCHES) -> list[Result]:
    """:func:`check` over the grid (all of :data:`LOSSES` by default)."""
    return [check(name, dtype, scale, batch) for name in (losses or list(LOSSES))
            for dtype in dtypes for scale in scales for batch in batches]
