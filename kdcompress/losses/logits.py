"""Losses on the logits: KD, DKD, focal KD, top-k KD, and plain cross-entropy.

With several teachers, the soft targets are the (averaged or confidence-weighted) mixture of the
teachers' probabilities at the loss's temperature (:meth:`DistillBatch.soft_targets`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcompress.losses import functional as KF
from kdcompress.losses.base import DistillBatch, DistillLoss

__all__ = ["KD", "DKD", "FocalKD", "TopKKD", "CE"]


class KD(DistillLoss):
    """Hinton et al. 2015 knowledge distillation: ``T^2 * KL(p_teacher || p_student)``.

    See :func:`kdcompress.losses.functional.kd_loss`.

    Examples
    --------
    >>> KD(temperature=4) * 0.9 + CE() * 0.1
    KD(temperature=4.0) * 0.9 + CE(label_smoothing=0.0) * 0.1
    """

    part = "kd"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = float(temperature)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        value = KF.kd_loss(batch.student_logits, batch.soft_targets(self.temperature),
                           self.temperature)
        return value, {self.part: value}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class DKD(DistillLoss):
    """Decoupled KD (Zhao et al., CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    Reports the two parts as ``dkd_tckd`` and ``dkd_nckd``. See
    :func:`kdcompress.losses.functional.dkd_loss`. The reference code ramps the loss up over the
    first epochs; so does ``Warmup(DKD(), epochs=...) + CE()`` (:class:`~kdcompress.losses.
    Warmup`). Without it, on a short schedule, the non-target term swamps a student that has not
    learnt the classes yet: 10 epochs on 10,000 MNIST images (``benchmarks/distill_table.py``)
    ended at 68.6% test accuracy without the ramp and 96.6% with a 3-epoch one.
    """

    part = "dkd"

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.temperature = float(temperature)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        tckd, nckd = KF._dkd_parts(batch.student_logits, batch.soft_targets(self.temperature),
                                   batch.labels, self.temperature)
        tc, nc = self.alpha * tckd, self.beta * nckd
        return tc + nc, {f"{self.part}_tckd": tc, f"{self.part}_nckd": nc}

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"


class FocalKD(DistillLoss):
    """KD weighted per sample by ``(1 - q[teacher's class])^gamma`` (focal-loss focusing).

    See :func:`kdcompress.losses.functional.focal_kd_loss`.
    """

    part = "focal_kd"

    def __init__(self, temperature: float = 4.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.gamma = float(gamma)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        value = KF.focal_kd_loss(batch.student_logits, batch.soft_targets(self.temperature),
                                 self.temperature, self.gamma)
        return value, {self.part: value}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gamma={self.gamma}"


class TopKKD(DistillLoss):
    """KD on the teacher's top-``k`` classes plus one merged bin for the rest.

    See :func:`kdcompress.losses.functional.topk_kd_loss`.
    """

    part = "topk_kd"

    def __init__(self, temperature: float = 4.0, k: int = 5) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.k = int(k)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        value = KF.topk_kd_loss(batch.student_logits, batch.soft_targets(self.temperature),
                                self.temperature, self.k)
        return value, {self.part: value}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, k={self.k}"


class CE(DistillLoss):
    """Cross-entropy of the student on the true labels (the hard-target term of KD)."""

    part = "ce"

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        logits = batch.student_logits
        with torch.autocast(device_type=logits.device.type, enabled=False):
            value = F.cross_entropy(KF.upcast(logits), batch.labels,
                                    label_smoothing=self.label_smoothing)
        return value, {self.part: value}

    def needs_teacher(self) -> bool:
        return False

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
