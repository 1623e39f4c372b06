"""Losses on intermediate features: FitNets hints and attention transfer.

Features are named by the qualified names of submodules (``"layer2"``, ``"features.3"``), as
``model.named_modules()`` lists them; the ``distill`` stage captures their outputs with forward
hooks, without editing the model. Several (student, teacher) pairs with weights give multi-level
distillation. When shapes differ, :class:`FitNet` creates adapters from the first batch's shapes
(1x1 convolution for ``(B, C, H, W)`` maps, linear for ``(B, D)`` vectors and the last axis of
``(B, L, D)`` sequences); they are trained with the student and are not part of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdcompress.errors import LossError
from kdcompress.losses import functional as KF
from kdcompress.losses.base import DistillBatch, DistillLoss

__all__ = ["FitNet", "AT", "FeatureAdapter", "make_adapter"]


class FeatureAdapter(nn.Module):
    """Maps a student feature to a teacher feature's shape.

    ``(B, C, H, W)``: 1x1 convolution over channels, then bilinear resizing to ``size`` when the
    spatial sizes differ. ``(B, D)`` and ``(B, L, D)``: a linear layer on the last axis.
    """

    def __init__(self, in_features: int, out_features: int, ndim: int,
                 size: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.ndim = int(ndim)
        self.size = None if size is None else tuple(int(s) for s in size)
        if ndim == 4:
            self.proj = nn.Conv2d(in_features, out_features, 1, bias=False) \
                if in_features != out_features else nn.Identity()
        else:
            self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        if self.size is not None and tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return x


def make_adapter(student_shape: Sequence[int], teacher_shape: Sequence[int], *,
                 student_name: str = "student", teacher_name: str = "teacher"
                 ) -> FeatureAdapter | None:
    """An adapter from ``student_shape`` to ``teacher_shape``; ``None`` when they already match.

    Raises :class:`LossError`, naming both layers and shapes, when no adapter can pair them.
    """
    s, t = tuple(student_shape), tuple(teacher_shape)
    if s == t:
        return None
    where = (f"cannot pair student layer '{student_name}' {s} with teacher layer "
             f"'{teacher_name}' {t}")
    if len(s) != len(t):
        raise LossError(f"{where}: the features have different ranks; pick layers of the same "
                        "kind (two conv maps, or two vectors)")
    if s[0] != t[0]:
        raise LossError(f"{where}: batch sizes differ")
    if len(s) == 4:
        return FeatureAdapter(s[1], t[1], 4, t[2:] if s[2:] != t[2:] else None)
    if len(s) == 2 or (len(s) == 3 and s[1] == t[1]):
        return FeatureAdapter(s[-1], t[-1], len(s))
    raise LossError(f"{where}: kdcompress adapts (B, C, H, W) maps with a 1x1 convolution and "
                    "(B, D) or (B, L, D) features with a linear layer on the last axis")


def _as_list(names: str | Sequence[str], what: str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise LossError(f"{what} must be a module name or a list of module names, but got "
                        f"{names!r}")
    return names


class _LayerPairs(DistillLoss):
    """Shared bookkeeping of losses on (student layer, teacher layer) pairs with weights."""

    def __init__(self, student: str | Sequence[str], teacher: str | Sequence[str],
                 weights: Sequence[float] | None) -> None:
        super().__init__()
        name = type(self).__name__
        self.student = _as_list(student, f"{name}(student=...)")
        self.teacher = _as_list(teacher, f"{name}(teacher=...)")
        if len(self.student) != len(self.teacher):
            raise LossError(f"{name}: {len(self.student)} student layers but "
                            f"{len(self.teacher)} teacher layers; give one teacher layer per "
                            "student layer")
        weights = [1.0] * len(self.student) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.student):
            raise LossError(f"{name}: {len(weights)} weights for {len(self.student)} layer pairs")
        self.weights = weights

    def student_layers(self) -> list[str]:
        return list(self.student)

    def teacher_layers(self) -> list[str]:
        return list(self.teacher)

    def _pairs(self, batch: DistillBatch):
        """Yield ``(pair index, teacher index, weight, student feature, teacher feature)``."""
        mix = batch.teacher_mix()
        for i, (s_name, t_name) in enumerate(zip(self.student, self.teacher, strict=True)):
            for k in range(batch.num_teachers):
                s, t = _feature(batch, s_name, None), _feature(batch, t_name, k)
                yield i, k, self.weights[i] * mix[k], s, t

    def extra_repr(self) -> str:
        return f"student={self.student}, teacher={self.teacher}, weights={self.weights}"


def _feature(batch: DistillBatch, name: str, teacher: int | None) -> Tensor:
    feats = batch.student_features if teacher is None else batch.teacher_features[teacher]
    if name not in feats:
        who = "student" if teacher is None else f"teacher {teacher}"
        raise LossError(f"{who} layer '{name}' produced no output in the forward pass; is the "
                        "module called by the model's forward()?")
    out = feats[name]
    if not hasattr(out, "shape"):
        raise LossError(f"layer '{name}' returned {type(out).__name__}, not a tensor")
    return out


class FitNet(_LayerPairs):
    """FitNets hints (Romero et al., ICLR 2015): match student features to teacher features.

    Parameters
    ----------
    student, teacher : str or list of str
        Qualified names of the paired submodules (one teacher layer per student layer).
    criterion : {"mse", "cosine"}
        See :func:`kdcompress.losses.functional.feature_loss`.
    weights : list of float, optional
        One weight per pair (multi-level distillation); 1 each by default.

    Examples
    --------
    >>> FitNet(student="layer2", teacher="layer3")
    FitNet(student=['layer2'], teacher=['layer3'], weights=[1.0], criterion='mse')
    """

    part = "fitnet"

    def __init__(self, student: str | Sequence[str], teacher: str | Sequence[str], *,
                 criterion: str = "mse", weights: Sequence[float] | None = None) -> None:
        super().__init__(student, teacher, weights)
        if criterion not in ("mse", "cosine"):
            raise LossError(f"FitNet: criterion must be 'mse' or 'cosine', but got {criterion!r}")
        self.criterion = criterion
        self.adapters = nn.ModuleDict()

    def setup(self, batch: DistillBatch) -> None:
        for i, k, _, s, t in self._pairs(batch):
            adapter = make_adapter(s.shape, t.shape, student_name=self.student[i],
                                   teacher_name=self.teacher[i])
            if adapter is not None:
                # float32 weights for float16 / bfloat16 features (autocast casts per op)
                self.adapters[f"pair{i}_teacher{k}"] = adapter.to(s.device, KF.upcast(s).dtype)

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        total = KF.upcast(batch.student_logits).new_zeros(())
        for i, k, w, s, t in self._pairs(batch):
            key = f"pair{i}_teacher{k}"
            if key in self.adapters:  # in float32 under autocast: a hint loss is small anyway
                with torch.autocast(device_type=s.device.type, enabled=False):
                    s = self.adapters[key](KF.upcast(s))
            total = total + w * KF.feature_loss(s, t, self.criterion)
        return total, {self.part: total}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, criterion={self.criterion!r}"


class AT(_LayerPairs):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017) between pairs of conv maps.

    Channel counts may differ, so no adapter is needed. Maps of different spatial sizes are
    aligned by average-pooling the larger **feature map** to the smaller size before the
    attention maps are computed (``resize="pool"``, the default: the convention of RepDistiller's
    ``distiller_zoo/AT.py`` and the code bases built on it), or by interpolating the smaller
    **attention map** to the larger size (``resize="interpolate"``). The values are small
    (normalised maps): the paper weights the loss by ``beta / 2 = 500``, e.g.
    ``AT("layer2", "layer3") * 500``. See
    :func:`kdcompress.losses.functional.attention_transfer_loss`.

    Examples
    --------
    >>> AT("layer2", "layer3", resize="interpolate")
    AT(student=['layer2'], teacher=['layer3'], weights=[1.0], p=2.0, resize='interpolate')
    """

    part = "at"

    def __init__(self, student: str | Sequence[str], teacher: str | Sequence[str], *,
                 p: float = 2.0, weights: Sequence[float] | None = None,
                 resize: str = "pool") -> None:
        super().__init__(student, teacher, weights)
        if resize not in ("pool", "interpolate"):
            raise LossError(f"AT: resize must be 'pool' (average-pool the larger feature map, "
                            f"the default) or 'interpolate', but got {resize!r}")
        self.p = float(p)
        self.resize = resize

    def setup(self, batch: DistillBatch) -> None:
        for i, _, _, s, t in self._pairs(batch):
            if s.ndim < 3 or s.ndim != t.ndim:
                raise LossError(f"AT cannot pair student layer '{self.student[i]}' "
                                f"{tuple(s.shape)} with teacher layer '{self.teacher[i]}' "
                                f"{tuple(t.shape)}: attention transfer needs two (B, C, H, W) "
                                "maps (or two (B, C, L))")

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, Tensor]]:
        total = KF.upcast(batch.student_logits).new_zeros(())
        for _, _, w, s, t in self._pairs(batch):
            total = total + w * KF.attention_transfer_loss(s, t, self.p, self.resize)
        return total, {self.part: total}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, resize={self.resize!r}"
