"""Distillation losses as plain functions on tensors, like ``torch.nn.functional``.

Every function takes the student's tensor first and the teacher's second and returns a scalar.
The teacher side is always treated as a constant (detached): gradients flow to the student only.
Relation losses accept any ``(B, ...)`` tensors, flattened per sample, and the student and the
teacher may have different widths.

Mixed precision: every function is safe under ``torch.autocast`` (float16 or bfloat16). It turns
autocast off for its own body and computes in float32 (float64 inputs stay float64), so its
value is float32 even for float16 inputs and the gradient flows back in the input's dtype.
Formulas that cancel (distances and angles from a Gram matrix) use float64 internally, and the
scale-invariant ones rescale their inputs by an exact power of two first, so their values and
gradients stay finite for features from 1e-20 to 1e2 in magnitude and equal the unscaled formula
on normal inputs.

Examples
--------
>>> import torch
>>> from kdcompress.losses import functional as KF
>>> s, t = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10)
>>> KF.kd_loss(s, t, temperature=4.0).backward()
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from kdcompress.errors import LossError

__all__ = [
    "kd_loss",
    "dkd_loss",
    "focal_kd_loss",
    "topk_kd_loss",
    "feature_loss",
    "attention_transfer_loss",
    "attention_map",
    "pairwise_relation_loss",
    "relation_matrix",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "similarity_preserving_loss",
    "triplet_relation_loss",
    "class_group_relation_loss",
]


# ----------------------------------------------------------------------------------------------
# precision

_LOW = (torch.float16, torch.bfloat16)
_Fn = TypeVar("_Fn", bound=Callable)


def upcast(x: Tensor) -> Tensor:
    """``x`` in float32 when it is float16 or bfloat16; unchanged otherwise (float64 stays)."""
    return x.float() if isinstance(x, Tensor) and x.dtype in _LOW else x


def full_precision(fn: _Fn) -> _Fn:
    """Run ``fn`` with autocast off and its float16 / bfloat16 tensor arguments in float32.

    Autocast would otherwise run the matrix products inside a loss in half precision (overflow
    above 65504 in float16, 3 significant digits in bfloat16). Gradients flow back through the
    cast to the caller's dtype.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*(upcast(a) for a in args), **{k: upcast(v) for k, v in kwargs.items()})
    return wrapper  # type: ignore[return-value]


def _unit_scale(x: Tensor, per_sample: bool) -> Tensor:
    """``x`` divided by a power of two close to its largest magnitude (each sample's, or the
    batch's), taken as a constant: exact in floating point, so scale-invariant formulas give the
    same values, while tiny or large features no longer underflow or overflow their squares."""
    with torch.no_grad():
        flat = x.detach().abs().flatten(1) if x.ndim > 1 else x.detach().abs()[:, None]
        amax = flat.amax(1) if per_sample else flat.amax().reshape(1)
        _, exponent = torch.frexp(amax)  # amax = m * 2**exponent, 0.5 <= m < 1
        scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), exponent),
                            torch.ones_like(amax))
        scale = scale.reshape(-1, *([1] * (x.ndim - 1))) if per_sample else scale.reshape(())
    return x / scale


# ----------------------------------------------------------------------------------------------
# logits


def _check_logits(fn: str, student: Tensor, teacher: Tensor) -> None:
    if student.ndim != 2 or student.shape != teacher.shape:
        raise LossError(f"{fn}: student and teacher logits must both have shape (B, num_classes), "
                        f"but got {tuple(student.shape)} and {tuple(teacher.shape)}")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities; ``p = 0`` entries contribute 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


@full_precision
def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Knowledge distillation: ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``.

    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015. Both
    distributions are softmaxes of the logits divided by ``T``; the ``T^2`` factor keeps the
    gradient's scale independent of ``T``. Averaged over the batch.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        ``(B, num_classes)``.
    temperature : float
        Softening temperature ``T > 0``.

    Examples
    --------
    >>> s = torch.tensor([[1.0, 0.0]]); kd_loss(s, s).item()
    0.0
    """
    _check_logits("kd_loss", student_logits, teacher_logits)
    t = temperature
    log_q = F.log_softmax(student_logits / t, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return _kl_rows(log_p, log_q).mean() * t * t


@full_precision
def _dkd_parts(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
               temperature: float) -> tuple[Tensor, Tensor]:
    """Target-class (TCKD) and non-target-class (NCKD) terms of DKD, each already times T^2."""
    _check_logits("dkd_loss", student_logits, teacher_logits)
    b, c = student_logits.shape
    if c < 2:
        raise LossError(f"dkd_loss needs at least 2 classes, but got {c}")
    t = temperature
    target = F.one_hot(labels, c).bool()  # (B, C)
    s, z = student_logits / t, teacher_logits.detach() / t
    log_s, log_z = F.log_softmax(s, -1), F.log_softmax(z, -1)
    # binary (target, rest) distributions, in log space: log(1 - p_target) = logsumexp(rest) - lse
    s_rest, z_rest = s[~target].view(b, c - 1), z[~target].view(b, c - 1)
    bin_s = torch.stack([log_s[target], torch.logsumexp(s_rest, -1) - torch.logsumexp(s, -1)], -1)
    bin_z = torch.stack([log_z[target], torch.logsumexp(z_rest, -1) - torch.logsumexp(z, -1)], -1)
    tckd = _kl_rows(bin_z, bin_s).mean() * t * t
    nckd = _kl_rows(F.log_softmax(z_rest, -1), F.log_softmax(s_rest, -1)).mean() * t * t
    return tckd, nckd


@full_precision
def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> Tensor:
    """Decoupled knowledge distillation: ``alpha * TCKD + beta * NCKD``.

    Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. TCKD is the KL divergence
    between the binary distributions (target class, all other classes) of teacher and student;
    NCKD is the KL divergence between their distributions over the non-target classes only
    (renormalised). Both at temperature ``T``, times ``T^2``, averaged over the batch. The
    paper's warm-up of the loss weight is left to the caller.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor
        ``(B, num_classes)``.
    labels : Tensor
        ``(B,)`` class indices.
    alpha, beta : float
        Weights of TCKD and NCKD.
    temperature : float
        Softening temperature.
    """
    tckd, nckd = _dkd_parts(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


@full_precision
def focal_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
                  gamma: float = 2.0) -> Tensor:
    """KD with each sample weighted by how far the student is from the teacher's answer.

    The focusing factor of the focal loss (Lin et al., "Focal Loss for Dense Object Detection",
    ICCV 2017) applied to Hinton et al.'s per-sample KD term: sample ``i`` is weighted by
    ``(1 - q_i[c_i])^gamma`` where ``c_i`` is the teacher's top class and ``q_i`` the student's
    softmax at temperature 1. Samples the student already answers like the teacher count less, so
    the gradient concentrates on the hard ones. The weight is treated as a constant (detached);
    ``gamma = 0`` gives :func:`kd_loss`.
    """
    _check_logits("focal_kd_loss", student_logits, teacher_logits)
    t = temperature
    teacher_logits = teacher_logits.detach()
    top = teacher_logits.argmax(-1, keepdim=True)  # (B, 1)
    q_top = F.softmax(student_logits.detach(), -1).gather(-1, top).squeeze(-1)
    weight = (1.0 - q_top).clamp_min(0.0) ** gamma  # (B,)
    per_sample = _kl_rows(F.log_softmax(teacher_logits / t, -1),
                          F.log_softmax(student_logits / t, -1))
    return (weight * per_sample).mean() * t * t


@full_precision
def topk_kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0,
                 k: int = 5) -> Tensor:
    """KD on the teacher's ``k`` most likely classes plus one bin that merges all the others.

    Hinton et al.'s KD term with the teacher's tail collapsed: both distributions (at temperature
    ``T``) keep the teacher's top-``k`` classes of each sample and sum the rest into one bin, the
    way DKD (Zhao et al., CVPR 2022) merges the non-target classes. The many tiny and noisy
    probabilities of the tail then cannot outweigh the classes the teacher actually considers,
    while the distributions stay normalised. ``k >= num_classes - 1`` gives :func:`kd_loss`.
    """
    _check_logits("topk_kd_loss", student_logits, teacher_logits)
    if k < 1:
        raise LossError(f"topk_kd_loss: k must be >= 1, but got {k}")
    c = student_logits.shape[-1]
    if k >= c - 1:
        return kd_loss(student_logits, teacher_logits, temperature)
    t = temperature
    log_p = F.log_softmax(teacher_logits.detach() / t, -1)
    log_q = F.log_softmax(student_logits / t, -1)
    top = log_p.topk(k, dim=-1).indices  # (B, k)
    rest = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top, False)
    b = log_p.shape[0]

    def binned(log_x: Tensor) -> Tensor:  # (B, k + 1)
        tail = torch.logsumexp(log_x[rest].view(b, c - k), -1, keepdim=True)
        return torch.cat([log_x.gather(-1, top), tail], -1)

    return _kl_rows(binned(log_p), binned(log_q)).mean() * t * t


# ----------------------------------------------------------------------------------------------
# features


@full_precision
def feature_loss(student_feature: Tensor, teacher_feature: Tensor,
                 criterion: str = "mse") -> Tensor:
    """FitNets hint loss between a (adapted) student feature and a teacher feature.

    Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. ``"mse"``: mean squared error
    over all elements; ``"cosine"``: ``1 - cos`` between the flattened features of each sample,
    averaged over the batch. Shapes must match: adapt the student's first (the ``FitNet`` module
    does it with a 1x1 convolution or a linear layer).
    """
    if student_feature.shape != teacher_feature.shape:
        raise LossError(f"feature_loss: shapes differ, student {tuple(student_feature.shape)} vs "
                        f"teacher {tuple(teacher_feature.shape)}; adapt the student feature first")
    teacher_feature = teacher_feature.detach()
    if criterion == "mse":
        return F.mse_loss(student_feature, teacher_feature)
    if criterion == "cosine":
        s = _unit_scale(student_feature.flatten(1), per_sample=True)
        t = _unit_scale(teacher_feature.flatten(1), per_sample=True)
        return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
    raise LossError(f"feature_loss: criterion must be 'mse' or 'cosine', but got {criterion!r}")


_POOL = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}
_INTERPOLATE = {1: "linear", 2: "bilinear", 3: "trilinear"}


@full_precision
def attention_map(feature: Tensor, p: float = 2.0, size: tuple[int, ...] | None = None) -> Tensor:
    """Spatial attention ``mean_c |F|^p`` of a ``(B, C, *spatial)`` map, L2-normalised.

    Returns ``(B, prod(spatial))``. Zagoruyko & Komodakis, ICLR 2017. With ``size``, the map is
    resized to ``size`` by interpolation (linear, bilinear or trilinear) after the channel mean;
    :func:`attention_transfer_loss` pools the features instead by default.
    """
    if feature.ndim < 3:
        raise LossError(f"attention transfer needs (B, C, H, W) or (B, C, L) maps, but got shape "
                        f"{tuple(feature.shape)}")
    if feature.ndim > 5:
        raise LossError(f"attention transfer handles 1 to 3 spatial axes, but got shape "
                        f"{tuple(feature.shape)}")
    feature = _unit_scale(feature, per_sample=True)  # the normalised map does not change
    amap = feature.abs().pow(p).mean(1, keepdim=True)  # (B, 1, *spatial)
    if size is not None and tuple(amap.shape[2:]) != tuple(size):
        amap = F.interpolate(amap, size=tuple(size), mode=_INTERPOLATE[len(size)],
                             align_corners=False)
    return F.normalize(amap.flatten(1), dim=1)


def _pool_to(feature: Tensor, size: tuple[int, ...]) -> Tensor:
    """Average-pool ``(B, C, *spatial)`` to ``size`` (adaptive pooling; identity at that size)."""
    if tuple(feature.shape[2:]) == size:
        return feature
    return _POOL[len(size)](feature, size)


@full_precision
def attention_transfer_loss(student_feature: Tensor, teacher_feature: Tensor, p: float = 2.0,
                            resize: str = "pool") -> Tensor:
    """Attention transfer: squared distance between L2-normalised spatial attention maps.

    Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. Each map is
    ``mean_c |F|^p`` over the channels, flattened and L2-normalised; the loss is the mean over the
    batch and the map of the squared difference (as in the authors' code; the paper's
    ``beta / 2`` factor, 1000 / 2 there, is left to the caller's weight). Channel counts may
    differ.

    Spatial sizes that differ are aligned as ``resize`` says:

    - ``"pool"`` (default): the larger **feature map** is average-pooled
      (``adaptive_avg_pool1d/2d/3d``) to the smaller size before the attention maps are
      computed, each spatial axis to the smaller of the two sizes. This is the convention of the
      widely used KD code bases: RepDistiller's ``distiller_zoo/AT.py`` (Tian et al., CRD,
      ICLR 2020) pools the larger of ``f_s``, ``f_t`` with ``F.adaptive_avg_pool2d`` to the other's
      height, and mdistiller's ``distillers/AT.py`` does the same (torchdistill's ``ATLoss``
      expects maps of one size).
    - ``"interpolate"``: the smaller **attention map** is interpolated (bilinear for 2-D maps,
      ``align_corners=False``) to the larger size, after the channel mean.

    Parameters
    ----------
    student_feature, teacher_feature : Tensor
        ``(B, C_s, *spatial_s)`` and ``(B, C_t, *spatial_t)`` with 1 to 3 spatial axes.
    p : float
        Exponent of the attention map.
    resize : {"pool", "interpolate"}
        How maps of different spatial sizes are aligned (see above).
    """
    if student_feature.ndim != teacher_feature.ndim or student_feature.ndim < 3:
        raise LossError(f"attention_transfer_loss: need two (B, C, *spatial) maps of one rank, "
                        f"but got {tuple(student_feature.shape)} and "
                        f"{tuple(teacher_feature.shape)}")
    if resize not in ("pool", "interpolate"):
        raise LossError(f"attention_transfer_loss: resize must be 'pool' or 'interpolate', but "
                        f"got {resize!r}")
    teacher_feature = teacher_feature.detach()
    s_size, t_size = tuple(student_feature.shape[2:]), tuple(teacher_feature.shape[2:])
    if resize == "pool":
        size = tuple(min(a, b) for a, b in zip(s_size, t_size, strict=True))
        qs = attention_map(_pool_to(student_feature, size), p)
        qt = attention_map(_pool_to(teacher_feature, size), p)
    else:
        size = s_size if math.prod(s_size) >= math.prod(t_size) else t_size
        qs = attention_map(student_feature, p, size)
        qt = attention_map(teacher_feature, p, size)
    return (qs - qt).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# relations between the samples of a batch


def _flat_pair(fn: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    if student.ndim < 1 or teacher.ndim < 1 or len(student) != len(teacher):
        raise LossError(f"{fn}: student and teacher need the same batch size, but got shapes "
                        f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    return student.flatten(1), teacher.detach().flatten(1)


def _gram(x: Tensor) -> Tensor:
    """Gram matrix of the batch centred on its mean (distances and angles do not change), in
    float64: ``|x_i - x_j|^2 = G_ii + G_jj - 2 G_ij`` cancels, and float32 would lose the
    distance between nearby samples (0.0067 apart at norm 60) in its rounding."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def _coincident(x: Tensor, g: Tensor) -> Tensor:
    """``(B, B)`` mask of the pairs whose distance counts as zero: the diagonal, rows that are
    equal element for element, and pairs whose squared distance is within float64 rounding of
    their Gram entries (they differ by less than float32 can tell apart)."""
    with torch.no_grad():
        _, group = torch.unique(x.detach().flatten(1), dim=0, return_inverse=True)
        same = group[:, None] == group[None, :]
        diag = g.diagonal()
        sq = diag[:, None] + diag[None, :] - 2.0 * g
        tol = 8 * torch.finfo(g.dtype).eps * (diag[:, None] + diag[None, :])
        return same | (sq <= tol)


def _pdist(x: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``x`` (B, D), in float64; exact zeros on the
    diagonal and for coincident rows, with a zero (not NaN) gradient there."""
    g = _gram(x)
    diag = g.diagonal()
    sq = (diag[:, None] + diag[None, :] - 2.0 * g).clamp_min(0.0)
    zero = _coincident(x, g)
    return torch.where(zero, torch.zeros_like(sq), sq.masked_fill(zero, 1.0).sqrt())


@full_precision
def relation_matrix(x: Tensor, metric: str = "cosine") -> Tensor:
    """The ``(B, B)`` relation matrix of a batch of ``(B, ...)`` samples.

    ``"cosine"``: cosine similarities; ``"euclidean"``: distances; ``"dot"``: inner products.
    """
    x = x.flatten(1)
    if metric == "cosine":
        x = F.normalize(_unit_scale(x, per_sample=True), dim=1)
        return x @ x.T
    if metric == "dot":
        return x @ x.T
    if metric == "euclidean":
        return _pdist(x).to(x.dtype)
    raise LossError(f"metric must be 'cosine', 'euclidean' or 'dot', but got {metric!r}")


@full_precision
def pairwise_relation_loss(student: Tensor, teacher: Tensor, metric: str = "cosine") -> Tensor:
    """Mean squared error between the student's and the teacher's batch relation matrices.

    The pairwise-similarity form of relational distillation (Park et al., "Relational Knowledge
    Distillation", CVPR 2019; Liu et al., "Knowledge Distillation via Instance Relationship
    Graph", CVPR 2019): only how samples relate to each other is transferred, so widths may differ.
    """
    s, t = _flat_pair("pairwise_relation_loss", student, teacher)
    return F.mse_loss(relation_matrix(s, metric), relation_matrix(t, metric))


def _normalised_pdist(x: Tensor) -> Tensor:
    b = len(x)
    d = _pdist(x)  # float64
    mean = d.sum() / max(b * (b - 1), 1)  # mean over distinct (ordered) pairs
    return d / mean.clamp_min(torch.finfo(d.dtype).tiny)


@full_precision
def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """RKD distance loss: Huber distance between normalised pairwise-distance matrices.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, eq. (5)-(6): each
    distance is divided by the mean distance over distinct pairs of the batch; the loss is the
    smooth L1 (Huber, delta 1) between student and teacher, averaged over all ``B x B`` entries as
    in the authors' code. The teacher side has no gradient.
    """
    s, t = _flat_pair("rkd_distance_loss", student, teacher)
    with torch.no_grad():
        dt = _normalised_pdist(t)
    return F.smooth_l1_loss(_normalised_pdist(s), dt, beta=1.0).to(s.dtype)


def _safe_inv_norms(x: Tensor, g: Tensor) -> Tensor:
    """``1 / |x_b - x_a|`` from a Gram matrix; 0 where the two samples coincide (and a == b)."""
    diag = g.diagonal()
    sq = diag[:, None] + diag[None, :] - 2.0 * g
    zero = _coincident(x, g)
    return torch.where(zero, torch.zeros_like(sq), sq.masked_fill(zero, 1.0).rsqrt())


def _angles(g: Tensor, inv: Tensor, a: slice) -> Tensor:
    """cos of the angle at vertex ``a`` of triangles (b, a, c): (A, B, B) for a chunk of ``a``.

    ``<x_b - x_a, x_c - x_a> = G_bc - G_ab - G_ac + G_aa``.
    """
    ga = g[a]  # (A, B)
    num = g[None] - ga[:, :, None] - ga[:, None, :] + g.diagonal()[a][:, None, None]
    ia = inv[a]
    return num * ia[:, :, None] * ia[:, None, :]


class _RKDAngle(torch.autograd.Function):
    """Huber loss between angle tensors built chunk by chunk from two Gram matrices.

    Neither the ``(B, B, D)`` difference tensor nor the full ``(B, B, B)`` angle tensor is ever
    stored: forward and backward both loop over chunks of the apex index.
    """

    @staticmethod
    def forward(ctx, gs: Tensor, gt: Tensor, inv_s: Tensor, inv_t: Tensor,  # noqa: D102
                chunk: int) -> Tensor:
        b = len(gs)
        total = gs.new_zeros(())
        for start in range(0, b, chunk):
            a = slice(start, min(start + chunk, b))
            diff = _angles(gs, inv_s, a) - _angles(gt, inv_t, a)
            total += F.smooth_l1_loss(diff, torch.zeros_like(diff), reduction="sum", beta=1.0)
        ctx.save_for_backward(gs, gt, inv_s, inv_t)
        ctx.chunk = chunk
        return total / b**3

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        gs, gt, inv_s, inv_t = ctx.saved_tensors
        b = len(gs)
        d_g = torch.zeros_like(gs)
        d_inv = torch.zeros_like(gs)
        scale = grad / b**3
        for start in range(0, b, ctx.chunk):
            a = slice(start, min(start + ctx.chunk, b))
            ia = inv_s[a]  # (A, B)
            ga = gs[a]
            num = gs[None] - ga[:, :, None] - ga[:, None, :] + gs.diagonal()[a][:, None, None]
            cos = num * ia[:, :, None] * ia[:, None, :]
            r = (cos - _angles(gt, inv_t, a)).clamp_(-1.0, 1.0).mul_(scale)  # dL/dcos
            # cos_abc = inv_ab * inv_ac * N_abc, symmetric in (b, c)
            d_inv[a] += 2.0 * torch.einsum("abc,abc,ac->ab", r, num, ia)
            p = r.mul_(ia[:, :, None]).mul_(ia[:, None, :])  # dL/dN
            d_g += p.sum(0)  # + G_bc
            row = p.sum(2)  # (A, B)
            d_g[a] -= 2.0 * row  # - G_ab - G_ac (symmetric)
            idx = torch.arange(start, a.stop, device=gs.device)
            d_g[idx, idx] += row.sum(1)  # + G_aa
        # inv_ab = sq_ab^(-1/2), sq_ab = G_aa + G_bb - 2 G_ab
        d_sq = d_inv * (-0.5) * inv_s.pow(3)
        d_g += -2.0 * d_sq
        d_g += torch.diag(d_sq.sum(1) + d_sq.sum(0))
        return d_g, None, None, None, None


@full_precision
def rkd_angle_loss(student: Tensor, teacher: Tensor, *, chunk: int | None = None) -> Tensor:
    """RKD angle loss: Huber distance between the angles of all triplets of the batch.

    Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019, eq. (7)-(8): for every
    ordered triplet (i, j, k) the cosine of the angle at ``x_j`` between ``x_i - x_j`` and
    ``x_k - x_j``; the loss is the smooth L1 (Huber, delta 1) between student and teacher
    cosines, averaged over all ``B^3`` triplets as in the authors' code (degenerate triplets have
    cosine 0 on both sides). No sampling and no Python loop over triplets: the cosines come from
    the Gram matrix, ``<x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj``, in chunks of
    ``chunk`` apexes, so neither the ``(B, B, D)`` difference tensor nor the whole ``(B, B, B)``
    angle tensor is stored, and the gradient is computed analytically. The teacher side has no
    gradient.
    """
    s, t = _flat_pair("rkd_angle_loss", student, teacher)
    b = len(s)
    if chunk is None:
        chunk = max(1, (1 << 20) // max(b * b, 1))  # about 8 MiB per float64 temporary
    gs = _gram(s)  # float64
    with torch.no_grad():
        gt = _gram(t)
        inv_s, inv_t = _safe_inv_norms(s, gs.detach()), _safe_inv_norms(t, gt)
    return _RKDAngle.apply(gs, gt, inv_s, inv_t, int(chunk)).to(s.dtype)


@full_precision
def similarity_preserving_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving KD: squared Frobenius distance of row-normalised batch Gram matrices.

    Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019:
    ``|| norm(F_s F_s^T) - norm(F_t F_t^T) ||_F^2 / B^2`` with each row L2-normalised.
    """
    s, t = _flat_pair("similarity_preserving_loss", student, teacher)
    s, t = _unit_scale(s, per_sample=False), _unit_scale(t, per_sample=False)
    gs = F.normalize(s @ s.T, dim=1)
    gt = F.normalize(t @ t.T, dim=1)
    return (gs - gt).pow(2).sum() / len(s) ** 2


@full_precision
def triplet_relation_loss(student: Tensor, teacher: Tensor, margin: float | None = None) -> Tensor:
    """Triplet relations: the student keeps, for every anchor, which of two samples is closer.

    After Feng et al., "Triplet Distillation for Deep Face Recognition", 2019 (arXiv:1905.04457),
    whose margins come from the teacher. For every ordered triplet (a, p, n) of distinct samples
    with ``d_t(a, p) < d_t(a, n)`` (distances normalised by their mean over distinct pairs, as in
    RKD), the hinge ``max(0, d_s(a, p) - d_s(a, n) + m)`` with the adaptive margin
    ``m = d_t(a, n) - d_t(a, p)`` (or a fixed ``margin``), averaged over those triplets.
    """
    s, t = _flat_pair("triplet_relation_loss", student, teacher)
    ds = _normalised_pdist(s)
    with torch.no_grad():
        dt = _normalised_pdist(t)
        gap = dt[:, None, :] - dt[:, :, None]  # (a, p, n): d_t(a, n) - d_t(a, p)
        b = len(s)
        eye = torch.eye(b, dtype=torch.bool, device=s.device)
        distinct = ~(eye[:, :, None] | eye[:, None, :] | eye[None, :, :])
        mask = (gap > 0) & distinct
        m = gap if margin is None else torch.full_like(gap, float(margin))
    hinge = (ds[:, :, None] - ds[:, None, :] + m).clamp_min(0.0)
    return ((hinge * mask).sum() / mask.sum().clamp_min(1)).to(s.dtype)


@full_precision
def class_group_relation_loss(student: Tensor, teacher: Tensor, labels: Tensor,
                              metric: str = "cosine") -> Tensor:
    """Relations between the class centroids of the batch, student against teacher.

    The relational idea of Park et al. (CVPR 2019) lifted from samples to classes: the samples of
    each class present in the batch are averaged into a centroid, and the loss is the MSE between
    the student's and the teacher's centroid relation matrices (see :func:`relation_matrix`).
    Zero when fewer than two classes are present.
    """
    s, t = _flat_pair("class_group_relation_loss", student, teacher)
    if labels.shape != (len(s),):
        raise LossError(f"class_group_relation_loss: labels must have shape ({len(s)},), but got "
                        f"{tuple(labels.shape)}")
    classes, inverse = labels.unique(return_inverse=True)
    if len(classes) < 2:
        return s.sum() * 0.0
    onehot = F.one_hot(inverse, len(classes)).to(s.dtype)  # (B, K)
    weights = onehot / onehot.sum(0, keepdim=True)
    cs, ct = weights.T @ s, weights.T.to(t.dtype) @ t  # (K, D)
    return F.mse_loss(relation_matrix(cs, metric), relation_matrix(ct, metric))
