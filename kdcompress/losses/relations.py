"""Relation losses: transfer how the samples of a batch relate, not the features themselves.

Each loss reads one student tensor and one teacher tensor per sample, flattened, so widths may
differ and no adapter is needed. By default (``student=None, teacher=None``) both are the
**logits**: that works for any classifier, including students whose last layer was replaced (a
TT layer). Name a submodule to use its output instead, e.g. the penultimate embedding
(``RKD(student="classifier.act", teacher="classifier.act")``).
"""

from __future__ import annotations

from torch import Tensor

from kdcompress.errors import LossError
from kdcompress.losses import functional as KF
from kdcompress.losses.base import DistillBatch, DistillLoss

__all__ = ["PairwiseRelation", "RKD", "SP", "Triplet", "ClassGroup"]


def _check_name(name: str | None, what: str) -> str | None:
    if name is not None and (not isinstance(name, str) or not name):
        raise LossError(f"{what} must be a module name or None (the logits), but got {name!r}")
    return name


class _Relation(DistillLoss):
    """One (student layer, teacher layer) pair, logits by default; averaged over teachers."""

    def __init__(self, student: str | None, teacher: str | None) -> None:
        super().__init__()
        name = type(self).__name__
        self.student = _check_name(student, f"{name}(student=...)")
        self.teacher = _check_name(teacher, f"{name}(teacher=...)")

    def student_layers(self) -> list[str]:
        return [] if self.student is None else [self.student]

    def teacher_layers(self) -> list[str]:
        return [] if self.teacher is None else [self.teacher]

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        """The weighted parts of this loss for one teacher."""
        raise NotImplementedError

    def setup(self, batch: DistillBatch) -> None:
        s = batch.student_feature(self.student)
        for k in range(batch.num_teachers):
            t = batch.teacher_feature(k, self.teacher)
            if not hasattr(t, "shape") or len(t) != len(s):
                raise LossError(f"{type(self).__name__} cannot pair student "
                                f"'{self.student or 'logits'}' {tuple(s.shape)} with teacher "
                                f"'{self.teacher or 'logits'}' "
                                f"{tuple(getattr(t, 'shape', ()))}: batch sizes differ")

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mix = batch.teacher_mix()
        s = batch.student_feature(self.student)
        parts: dict[str, Tensor] = {}
        for k in range(batch.num_teachers):
            t = batch.teacher_feature(k, self.teacher)
            for name, v in self.relation(s, t, batch).items():
                parts[name] = parts.get(name, 0.0) + mix[k] * v
        if not parts:
            raise LossError(f"{type(self).__name__} needs a teacher, but the batch has none")
        total = sum(parts.values())
        return total, parts

    def _names_repr(self) -> str:
        return f"student={self.student!r}, teacher={self.teacher!r}"

    def extra_repr(self) -> str:
        return self._names_repr()


class PairwiseRelation(_Relation):
    """MSE between batch relation matrices (``"cosine"``, ``"euclidean"`` or ``"dot"``).

    See :func:`kdcompress.losses.functional.pairwise_relation_loss`.
    """

    part = "pairwise"

    def __init__(self, student: str | None = None, teacher: str | None = None, *,
                 metric: str = "cosine") -> None:
        super().__init__(student, teacher)
        if metric not in ("cosine", "euclidean", "dot"):
            raise LossError(f"PairwiseRelation: metric must be 'cosine', 'euclidean' or 'dot', "
                            f"but got {metric!r}")
        self.metric = metric

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        return {self.part: KF.pairwise_relation_loss(s, t, self.metric)}

    def extra_repr(self) -> str:
        return f"{self._names_repr()}, metric={self.metric!r}"


class RKD(_Relation):
    """Relational KD (Park et al., CVPR 2019): ``distance * RKD-D + angle * RKD-A``.

    Reports ``rkd_distance`` and ``rkd_angle``. The default weights keep the paper's 1:2 ratio
    (it uses 25 and 50 for metric learning). Logits by default (see the module docstring).

    Examples
    --------
    >>> RKD()
    RKD(student=None, teacher=None, distance=1.0, angle=2.0)
    """

    part = "rkd"

    def __init__(self, student: str | None = None, teacher: str | None = None, *,
                 distance: float = 1.0, angle: float = 2.0) -> None:
        super().__init__(student, teacher)
        self.distance = float(distance)
        self.angle = float(angle)

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        parts = {}
        if self.distance:
            parts[f"{self.part}_distance"] = self.distance * KF.rkd_distance_loss(s, t)
        if self.angle:
            parts[f"{self.part}_angle"] = self.angle * KF.rkd_angle_loss(s, t)
        return parts

    def extra_repr(self) -> str:
        return f"{self._names_repr()}, distance={self.distance}, angle={self.angle}"


class SP(_Relation):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019).

    See :func:`kdcompress.losses.functional.similarity_preserving_loss`.
    """

    part = "sp"

    def __init__(self, student: str | None = None, teacher: str | None = None) -> None:
        super().__init__(student, teacher)

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        return {self.part: KF.similarity_preserving_loss(s, t)}


class Triplet(_Relation):
    """Triplet relations with margins from the teacher (after Feng et al. 2019).

    See :func:`kdcompress.losses.functional.triplet_relation_loss`.
    """

    part = "triplet"

    def __init__(self, student: str | None = None, teacher: str | None = None, *,
                 margin: float | None = None) -> None:
        super().__init__(student, teacher)
        self.margin = None if margin is None else float(margin)

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        return {self.part: KF.triplet_relation_loss(s, t, self.margin)}

    def extra_repr(self) -> str:
        return f"{self._names_repr()}, margin={self.margin}"


class ClassGroup(_Relation):
    """Relations between the class centroids of the batch.

    See :func:`kdcompress.losses.functional.class_group_relation_loss`.
    """

    part = "class_group"

    def __init__(self, student: str | None = None, teacher: str | None = None, *,
                 metric: str = "cosine") -> None:
        super().__init__(student, teacher)
        if metric not in ("cosine", "euclidean", "dot"):
            raise LossError(f"ClassGroup: metric must be 'cosine', 'euclidean' or 'dot', but got "
                            f"{metric!r}")
        self.metric = metric

    def relation(self, s: Tensor, t: Tensor, batch: DistillBatch) -> dict[str, Tensor]:
        return {self.part: KF.class_group_relation_loss(s, t, batch.labels, self.metric)}

    def extra_repr(self) -> str:
        return f"{self._names_repr()}, metric={self.metric!r}"
