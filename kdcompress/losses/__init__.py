"""Distillation losses: logits, features, relations; composable with ``+`` and scalar ``*``.

Every loss is an ``nn.Module`` called with a :class:`DistillBatch` and returning
``(value, parts)``. The formulas also exist as plain functions in
:mod:`kdcompress.losses.functional`.

Examples
--------
>>> from kdcompress.losses import KD, RKD, CE
>>> loss = KD(temperature=4) * 0.9 + RKD() * 0.1 + CE() * 0.1
"""

from kdcompress.losses import functional
from kdcompress.losses.base import (
    DistillBatch,
    DistillLoss,
    Scaled,
    Sum,
    Warmup,
    teacher_weights,
)
from kdcompress.losses.features import AT, FeatureAdapter, FitNet, make_adapter
from kdcompress.losses.logits import CE, DKD, KD, FocalKD, TopKKD
from kdcompress.losses.relations import RKD, SP, ClassGroup, PairwiseRelation, Triplet

__all__ = [
    "functional",
    "DistillBatch",
    "DistillLoss",
    "Scaled",
    "Sum",
    "Warmup",
    "teacher_weights",
    "KD",
    "DKD",
    "FocalKD",
    "TopKKD",
    "CE",
    "FitNet",
    "AT",
    "FeatureAdapter",
    "make_adapter",
    "PairwiseRelation",
    "RKD",
    "SP",
    "Triplet",
    "ClassGroup",
]
