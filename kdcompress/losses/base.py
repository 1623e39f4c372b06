"""The call contract of every distillation loss, and composition with ``+`` and scalar ``*``.

A loss is an ``nn.Module`` whose ``forward`` takes one :class:`DistillBatch` (student logits,
each teacher's logits, labels, and the features captured by forward hooks) and returns
``(value, parts)``: a scalar and a dict of named, already-weighted parts that sum to it.
Losses that need intermediate features name the submodules (:meth:`DistillLoss.student_layers`,
:meth:`DistillLoss.teacher_layers`); the ``distill`` stage hooks exactly those.

Settings are public plain attributes (numbers, strings, lists of them) and composites keep their
terms as child modules, so a loss can be fingerprinted and printed:

>>> from kdcompress.losses import KD, CE
>>> KD(temperature=4) * 0.9 + CE() * 0.1
KD(temperature=4.0) * 0.9 + CE(label_smoothing=0.0) * 0.1
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import LossError
from kdcompress.losses.functional import upcast

__all__ = ["DistillBatch", "DistillLoss", "Scaled", "Sum", "Warmup", "teacher_weights"]


@dataclass
class DistillBatch:
    """Everything a loss sees for one batch.

    Attributes
    ----------
    student_logits : Tensor
        ``(B, num_classes)``, with gradient.
    teacher_logits : list of Tensor
        One ``(B, num_classes)`` tensor per teacher, without gradient.
    labels : Tensor
        ``(B,)`` class indices.
    student_features : dict of str to Tensor
        Outputs of the student's hooked submodules, by qualified name.
    teacher_features : list of dict of str to Tensor
        Outputs of each teacher's hooked submodules.
    teacher_weights : Tensor, optional
        ``(B, num_teachers)``, rows summing to 1: how much each teacher counts for each sample
        (see :func:`teacher_weights`). ``None`` means equal weights.
    epochs_done : float, optional
        Epochs of training completed before this batch, fractional (0.0 at the first step, 2.5
        halfway through the third epoch; the ``distill`` stage sets it); ``None`` outside a
        training loop. :class:`Warmup` reads it.
    """

    student_logits: Tensor
    teacher_logits: list[Tensor]
    labels: Tensor
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: list[dict[str, Tensor]] = field(default_factory=list)
    teacher_weights: Tensor | None = None
    epochs_done: float | None = None

    @property
    def num_teachers(self) -> int:
        """How many teachers produced this batch's targets."""
        return len(self.teacher_logits)

    def weights(self) -> Tensor:
        """``(B, num_teachers)`` per-sample teacher weights (equal when none were given)."""
        if self.teacher_weights is not None:
            return self.teacher_weights
        b, k = len(self.student_logits), self.num_teachers
        dtype = torch.promote_types(self.student_logits.dtype, torch.float32)
        return self.student_logits.new_full((b, k), 1.0 / max(k, 1), dtype=dtype).detach()

    def teacher_mix(self) -> Tensor:
        """``(num_teachers,)`` batch-level teacher weights: the per-sample weights averaged."""
        return self.weights().mean(0)

    def soft_targets(self, temperature: float) -> Tensor:
        """Logits whose softmax at ``temperature`` is the weighted mixture of the teachers'.

        ``T * log(sum_k w_k softmax(z_k / T))``: with one teacher this is its logits (up to a
        per-row constant), with several it averages the teachers' probabilities, not their logits.
        """
        if self.num_teachers == 0:
            raise LossError("this loss needs a teacher's logits, but the batch has none")
        if self.num_teachers == 1:
            return self.teacher_logits[0]
        t = temperature
        device = self.teacher_logits[0].device.type
        with torch.autocast(device_type=device, enabled=False):  # float32 under autocast
            logits = [upcast(z) for z in self.teacher_logits]
            logp = torch.stack([F.log_softmax(z / t, -1) for z in logits], 1)  # (B, K, C)
            logw = self.weights().float().clamp_min(1e-30).log()[:, :, None]
            return t * torch.logsumexp(logp + logw.to(logp.dtype), dim=1)

    def student_feature(self, name: str | None) -> Tensor:
        """The student's feature ``name``, or its logits when ``name`` is ``None``."""
        return self.student_logits if name is None else self.student_features[name]

    def teacher_feature(self, index: int, name: str | None) -> Tensor:
        """Teacher ``index``'s feature ``name``, or its logits when ``name`` is ``None``."""
        return self.teacher_logits[index] if name is None else self.teacher_features[index][name]


def teacher_weights(teacher_logits: list[Tensor], labels: Tensor, mode: str = "mean") -> Tensor:
    """Per-sample weights of several teachers, ``(B, num_teachers)``, rows summing to 1.

    ``"mean"``: equal weights. ``"confidence"``: the confidence-aware weights of CA-MKD (Zhang,
    Chen & Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022):
    ``w_k = (1 - exp(CE_k) / sum_j exp(CE_j)) / (K - 1)`` with ``CE_k`` the cross-entropy of
    teacher ``k`` on the sample's label, so a teacher that is wrong on a sample counts less there.
    """
    k = len(teacher_logits)
    b = len(labels)
    if mode == "mean" or k == 1:
        if mode not in ("mean", "confidence"):
            raise LossError(f"teacher_weighting must be 'mean' or 'confidence', but got {mode!r}")
        return teacher_logits[0].new_full((b, k), 1.0 / k,
                                          dtype=torch.promote_types(teacher_logits[0].dtype,
                                                                    torch.float32))
    if mode != "confidence":
        raise LossError(f"teacher_weighting must be 'mean' or 'confidence', but got {mode!r}")
    with torch.autocast(device_type=labels.device.type, enabled=False):
        ce = torch.stack([F.cross_entropy(upcast(z.detach()), labels, reduction="none")
                          for z in teacher_logits], 1)  # (B, K), float32
    return (1.0 - F.softmax(ce, dim=1)) / (k - 1)


class DistillLoss(nn.Module):
    """Base class of the distillation losses: composition, parts, features, adapters.

    Subclasses implement :meth:`forward` and, when they need intermediate features,
    :meth:`student_layers` / :meth:`teacher_layers` and :meth:`setup` (adapters).
    """

    #: Name of this loss's part in logs and reports (``"kd"``, ``"ce"``).
    part: str = "loss"

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Return ``(value, parts)``; the parts are weighted and sum to ``value``."""
        raise NotImplementedError

    def student_layers(self) -> list[str]:
        """Qualified names of the student submodules whose outputs this loss reads."""
        return []

    def teacher_layers(self) -> list[str]:
        """Qualified names of the teacher submodules whose outputs this loss reads."""
        return []

    def needs_teacher(self) -> bool:
        """Whether this loss reads any teacher output (``CE`` does not)."""
        return True

    def setup(self, batch: DistillBatch) -> None:
        """Check shapes and create adapters from the first batch (called once, before training).

        Raises :class:`~kdcompress.errors.LossError` for an impossible pairing.
        """

    def leaves(self) -> list[DistillLoss]:
        """The elementary losses of this (possibly composite) loss."""
        return [self]

    def __add__(self, other: object) -> Sum:
        if not isinstance(other, DistillLoss):
            return NotImplemented
        return Sum(self, other)

    def __radd__(self, other: object) -> DistillLoss:
        if isinstance(other, numbers.Number) and other == 0:  # sum([...]) starts at 0
            return self
        return NotImplemented

    def __mul__(self, weight: object) -> Scaled:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            return NotImplemented
        return Scaled(self, float(weight))

    __rmul__ = __mul__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class _Wrapper(DistillLoss):
    """A loss around one other loss (``self.loss``): layers, teacher need, set-up and leaves
    are the inner loss's."""

    loss: DistillLoss

    def _times(self, batch: DistillBatch, factor: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The inner loss on ``batch``, its value and every part multiplied by ``factor``."""
        value, parts = self.loss(batch)
        return value * factor, {k: v * factor for k, v in parts.items()}

    def student_layers(self) -> list[str]:
        return self.loss.student_layers()

    def teacher_layers(self) -> list[str]:
        return self.loss.teacher_layers()

    def needs_teacher(self) -> bool:
        return self.loss.needs_teacher()

    def setup(self, batch: DistillBatch) -> None:
        self.loss.setup(batch)

    def leaves(self) -> list[DistillLoss]:
        return self.loss.leaves()


class Scaled(_Wrapper):
    """A loss times a constant weight: ``KD() * 0.9``."""

    def __init__(self, loss: DistillLoss, weight: float) -> None:
        super().__init__()
        if isinstance(loss, Scaled):
            weight, loss = weight * loss.weight, loss.loss
        self.loss = loss
        self.weight = float(weight)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return self._times(batch, self.weight)

    def __repr__(self) -> str:
        inner = repr(self.loss)
        return f"({inner}) * {self.weight:g}" if isinstance(self.loss, Sum) else \
            f"{inner} * {self.weight:g}"


class Sum(DistillLoss):
    """A sum of losses: ``KD() * 0.9 + CE() * 0.1``. Parts with the same name get ``_2``, ..."""

    def __init__(self, *losses: DistillLoss) -> None:
        super().__init__()
        if not losses:
            raise LossError("Sum needs at least one loss")
        flat: list[DistillLoss] = []
        for loss in losses:
            if not isinstance(loss, DistillLoss):
                raise LossError(f"can only add distillation losses, but got {type(loss).__name__}")
            flat.extend(loss.terms if isinstance(loss, Sum) else [loss])
        self.terms = nn.ModuleList(flat)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for term in self.terms:
            value, term_parts = term(batch)
            total = value if total is None else total + value
            for name, v in term_parts.items():
                key, n = name, 1
                while key in parts:
                    n += 1
                    key = f"{name}_{n}"
                parts[key] = v
        assert total is not None
        return total, parts

    def student_layers(self) -> list[str]:
        return list(dict.fromkeys(n for t in self.terms for n in t.student_layers()))

    def teacher_layers(self) -> list[str]:
        return list(dict.fromkeys(n for t in self.terms for n in t.teacher_layers()))

    def needs_teacher(self) -> bool:
        return any(t.needs_teacher() for t in self.terms)

    def setup(self, batch: DistillBatch) -> None:
        for term in self.terms:
            term.setup(batch)

    def leaves(self) -> list[DistillLoss]:
        return [leaf for t in self.terms for leaf in t.leaves()]

    def __repr__(self) -> str:
        return " + ".join(repr(t) for t in self.terms)


class Warmup(_Wrapper):
    """A loss whose weight grows linearly from 0 to 1 over the first ``epochs`` epochs.

    The loss is multiplied by ``min(t / epochs, 1)``, ``t`` the epochs completed so far
    (fractional, step by step): the warm-up of the DKD reference code (Zhao et al. 2022,
    ``mdistiller``: ``warmup=20`` of 240 epochs), whose strong non-target term otherwise swamps
    a student that has not learnt the classes yet. The reference steps once per epoch
    (``min(epoch / warmup, 1)``, epoch counted from 1, so its first epoch already has
    ``1 / warmup``); here the ramp is continuous and starts at 0, which matters only for short
    runs: distilling the 25.6k-parameter CNN of ``benchmarks/distill_table.py`` for 3 epochs on
    10,000 MNIST images with a 3-epoch warm-up, the reference's steps (1/3, 2/3, 1) still let DKD
    swamp the student (51.7% validation accuracy), the continuous ramp does not (89.1%; 48.0%
    with no warm-up). Outside a training loop (``batch.epochs_done is None``) the full loss is
    returned.

    Parameters
    ----------
    loss : DistillLoss
        The loss to ramp up (``DKD()``); add the unramped terms outside:
        ``Warmup(DKD(), epochs=2) + CE()``.
    epochs : int
        Epochs until the full weight (>= 1).

    Raises
    ------
    LossError
        ``loss`` is not a distillation loss, or ``epochs`` is not an integer >= 1.

    Examples
    --------
    >>> from kdcompress.losses import CE, DKD
    >>> Warmup(DKD(), epochs=2) + CE()
    Warmup(DKD(alpha=1.0, beta=8.0, temperature=4.0), epochs=2) + CE(label_smoothing=0.0)
    """

    def __init__(self, loss: DistillLoss, epochs: int) -> None:
        super().__init__()
        if not isinstance(loss, DistillLoss):
            raise LossError(f"Warmup: can only ramp a distillation loss, but got "
                            f"{type(loss).__name__}")
        if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
            raise LossError(f"Warmup: epochs must be an integer >= 1 (epochs until the full "
                            f"weight), got {epochs!r}")
        self.loss = loss
        self.epochs = int(epochs)

    def factor(self, epochs_done: float | None) -> float:
        """The multiplier after ``epochs_done`` epochs of training (1 outside training)."""
        return 1.0 if epochs_done is None else min(epochs_done / self.epochs, 1.0)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return self._times(batch, self.factor(batch.epochs_done))

    def __repr__(self) -> str:
        return f"Warmup({self.loss!r}, epochs={self.epochs})"
