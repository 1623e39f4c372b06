"""Each formula of kdcompress.losses.functional against an independent reference (float64)."""

import itertools

import pytest
import torch

from kdcompress.errors import LossError
from kdcompress.losses import functional as KF


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _data(b=6, ds=5, dt=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, ds, generator=g).requires_grad_()
    t = torch.randn(b, dt, generator=g) * 2
    return s, t


def _same(fn, ref, s, *rest):
    """Values and student gradients of ``fn`` and ``ref`` agree."""
    a = fn(s, *rest)
    (ga,) = torch.autograd.grad(a, s)
    b = ref(s, *rest)
    (gb,) = torch.autograd.grad(b, s)
    assert torch.isfinite(a) and torch.isfinite(ga).all()
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-7, atol=1e-12)


# -- references, written from the papers with loops and explicit sums -------------------------

def _softmax(z, t):
    m = max(float(v.detach()) for v in z)
    e = [torch.exp((v - m) / t) for v in z]
    total = sum(e)
    return [v / total for v in e]


def ref_kd(s, t, temperature):
    out = 0.0
    for zs, zt in zip(s, t, strict=True):
        p, q = _softmax(zt, temperature), _softmax(zs, temperature)
        out = out + sum(pi * (torch.log(pi) - torch.log(qi)) for pi, qi in zip(p, q, strict=True))
    return out / len(s) * temperature**2


def ref_dkd(s, t, labels, alpha, beta, temperature):
    tckd = nckd = 0.0
    for zs, zt, y in zip(s, t, labels, strict=True):
        p, q = _softmax(zt, temperature), _softmax(zs, temperature)
        y = int(y)
        bp, bq = [p[y], 1 - p[y]], [q[y], 1 - q[y]]
        tckd = tckd + sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(bp, bq, strict=True))
        rest = [c for c in range(len(p)) if c != y]
        pr, qr = _softmax(zt[rest], temperature), _softmax(zs[rest], temperature)
        nckd = nckd + sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(pr, qr, strict=True))
    n = len(s)
    return (alpha * tckd + beta * nckd) / n * temperature**2


def ref_pdist(x):
    b = len(x)
    d = torch.zeros(b, b)
    for i, j in itertools.product(range(b), repeat=2):
        if i != j:
            d[i, j] = torch.sqrt(((x[i] - x[j]) ** 2).sum())
    return d


def huber(x):
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


def ref_rkd_distance(s, t):
    b = len(s)
    ds, dt = ref_pdist(s.flatten(1)), ref_pdist(t.flatten(1))
    ds = ds / (ds.sum() / (b * (b - 1)))
    dt = dt / (dt.sum() / (b * (b - 1)))
    return huber(ds - dt).sum() / b**2


def ref_angle(x, i, j, k):
    u, v = x[i] - x[j], x[k] - x[j]
    nu, nv = torch.sqrt((u * u).sum()), torch.sqrt((v * v).sum())
    if nu == 0 or nv == 0:
        return torch.zeros(())
    return (u * v).sum() / (nu * nv)


def ref_rkd_angle(s, t):
    b = len(s)
    s, t = s.flatten(1), t.flatten(1)
    total = 0.0
    for i, j, k in itertools.product(range(b), repeat=3):
        total = total + huber(ref_angle(s, i, j, k) - ref_angle(t, i, j, k))
    return total / b**3


def ref_sp(s, t):
    def g(x):
        x = x.flatten(1)
        m = x @ x.T
        return m / torch.sqrt((m * m).sum(1, keepdim=True))
    return ((g(s) - g(t)) ** 2).sum() / len(s) ** 2


def ref_at(s, t, p):
    def q(x):
        a = (x.abs() ** p).mean(1).flatten(1)
        return a / torch.sqrt((a * a).sum(1, keepdim=True))
    return ((q(s) - q(t)) ** 2).mean()


# -- logits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_hinton(temperature):
    s, t = _data(4, 6, 6)
    _same(KF.kd_loss, ref_kd, s, t, temperature)


def test_kd_loss_is_zero_when_student_equals_teacher():
    z = torch.randn(3, 5)
    assert KF.kd_loss(z, z).item() == pytest.approx(0.0, abs=1e-12)


def test_dkd_loss_matches_zhao():
    s, t = _data(5, 6, 6)
    labels = torch.tensor([0, 5, 2, 2, 1])
    _same(KF.dkd_loss, ref_dkd, s, t, labels, 1.0, 8.0, 4.0)


def test_dkd_tckd_plus_nckd_decomposes_kd():
    # Zhao et al., eq. (4): KD = TCKD + (1 - p_t^T) NCKD, checked per sample with B = 1
    s, t = torch.randn(1, 5), torch.randn(1, 5)
    y = torch.tensor([3])
    tckd = KF.dkd_loss(s, t, y, alpha=1.0, beta=0.0, temperature=2.0)
    nckd = KF.dkd_loss(s, t, y, alpha=0.0, beta=1.0, temperature=2.0)
    pt = torch.softmax(t / 2.0, -1)[0, 3]
    torch.testing.assert_close(KF.kd_loss(s, t, 2.0), tckd + (1 - pt) * nckd)


def test_focal_kd_reduces_to_kd_with_gamma_zero_and_weights_hard_samples():
    s, t = _data(6, 10, 10)
    torch.testing.assert_close(KF.focal_kd_loss(s, t, 4.0, gamma=0.0), KF.kd_loss(s, t, 4.0))
    q = torch.softmax(s.detach(), -1).gather(1, t.argmax(1, keepdim=True)).squeeze(1)

    def ref(s_, t_, temperature, gamma):
        per = torch.stack([ref_kd(s_[i:i + 1], t_[i:i + 1], temperature) for i in range(len(s_))])
        return ((1 - q) ** gamma * per).mean()
    _same(KF.focal_kd_loss, ref, s, t, 4.0, 2.0)


def test_topk_kd_merges_the_tail_into_one_bin():
    s, t = _data(4, 8, 8)

    def ref(s_, t_, temperature, k):
        out = 0.0
        for zs, zt in zip(s_, t_, strict=True):
            p, q = _softmax(zt, temperature), _softmax(zs, temperature)
            top = sorted(range(len(p)), key=lambda c: -float(p[c]))[:k]
            rest = [c for c in range(len(p)) if c not in top]
            bp = [p[c] for c in top] + [sum(p[c] for c in rest)]
            bq = [q[c] for c in top] + [sum(q[c] for c in rest)]
            out = out + sum(a * (torch.log(a) - torch.log(b)) for a, b in zip(bp, bq, strict=True))
        return out / len(s_) * temperature**2
    _same(KF.topk_kd_loss, ref, s, t, 3.0, 3)
    torch.testing.assert_close(KF.topk_kd_loss(s, t, 3.0, k=7), KF.kd_loss(s, t, 3.0))


def test_logit_losses_reject_mismatched_classes():
    with pytest.raises(LossError, match=r"\(4, 3\) and \(4, 5\)"):
        KF.kd_loss(torch.randn(4, 3), torch.randn(4, 5))


# -- features -------------------------------------------------------------------------------


def test_feature_loss_mse_and_cosine():
    s, t = _data(4, 6, 6)
    _same(lambda a, b: KF.feature_loss(a, b, "mse"), lambda a, b: ((a - b) ** 2).mean(), s, t)

    def ref_cos(a, b):
        return torch.stack([1 - (a[i] * b[i]).sum() / (a[i].norm() * b[i].norm())
                            for i in range(len(a))]).mean()
    _same(lambda a, b: KF.feature_loss(a, b, "cosine"), ref_cos, s, t)
    with pytest.raises(LossError, match="adapt the student feature"):
        KF.feature_loss(torch.randn(2, 3), torch.randn(2, 4))


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attention_transfer_matches_zagoruyko(p):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, 5, 5, generator=g).requires_grad_()
    t = torch.randn(3, 9, 5, 5, generator=g)  # different channel counts
    _same(KF.attention_transfer_loss, ref_at, s, t, p)


def test_attention_transfer_aligns_spatial_sizes():
    s = torch.randn(2, 4, 4, 4, requires_grad=True)
    t = torch.randn(2, 8, 8, 8)
    loss = KF.attention_transfer_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and s.grad.abs().sum() > 0
    same = torch.nn.functional.interpolate(t, size=(4, 4), mode="bilinear")
    assert KF.attention_transfer_loss(same, same).item() == pytest.approx(0.0, abs=1e-12)


# -- relations ------------------------------------------------------------------------------


def test_rkd_distance_matches_park():
    s, t = _data(6, 5, 7)
    _same(KF.rkd_distance_loss, ref_rkd_distance, s, t)


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_rkd_angle_matches_park_over_all_triplets(chunk):
    s, t = _data(6, 5, 7)
    _same(lambda a, b: KF.rkd_angle_loss(a, b, chunk=chunk), ref_rkd_angle, s, t)


def test_rkd_angle_gradcheck():
    t = torch.randn(5, 3)
    x = torch.randn(5, 4, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: KF.rkd_angle_loss(a, t, chunk=2), (x,))


def test_rkd_angle_matches_the_bmm_formula_on_larger_batches():
    s, t = _data(24, 16, 32, seed=3)

    def bmm_formula(a, b):
        def angles(x):
            d = torch.nn.functional.normalize(x[None] - x[:, None], dim=2)
            return torch.bmm(d, d.transpose(1, 2))
        return torch.nn.functional.smooth_l1_loss(angles(a), angles(b))
    _same(KF.rkd_angle_loss, bmm_formula, s, t)


def test_similarity_preserving_matches_tung_mori():
    s, t = _data(5, 4, 9)
    _same(KF.similarity_preserving_loss, ref_sp, s, t)


@pytest.mark.parametrize("metric", ["cosine", "euclidean", "dot"])
def test_pairwise_relation(metric):
    s, t = _data(5, 4, 9)

    def rel(x):
        if metric == "euclidean":
            return ref_pdist(x)
        if metric == "cosine":
            x = x / x.norm(dim=1, keepdim=True)
        return x @ x.T
    _same(lambda a, b: KF.pairwise_relation_loss(a, b, metric),
          lambda a, b: ((rel(a) - rel(b)) ** 2).mean(), s, t)


def test_triplet_relation_with_teacher_margins():
    s, t = _data(5, 4, 6)

    def ref(a, b):
        ds, dt = ref_pdist(a), ref_pdist(b)
        n = len(a)
        ds, dt = ds / (ds.sum() / (n * (n - 1))), dt / (dt.sum() / (n * (n - 1)))
        terms = [torch.clamp(ds[i, j] - ds[i, k] + dt[i, k] - dt[i, j], min=0)
                 for i, j, k in itertools.permutations(range(n), 3) if dt[i, j] < dt[i, k]]
        return sum(terms) / len(terms)
    _same(KF.triplet_relation_loss, ref, s, t)


def test_class_group_relation_uses_class_centroids():
    s, t = _data(6, 4, 6)
    labels = torch.tensor([0, 1, 1, 2, 0, 2])

    def ref(a, b, y):
        def rel(x):
            c = torch.stack([x[y == k].mean(0) for k in (0, 1, 2)])
            c = c / c.norm(dim=1, keepdim=True)
            return c @ c.T
        return ((rel(a) - rel(b)) ** 2).mean()
    _same(KF.class_group_relation_loss, ref, s, t, labels)
    one_class = KF.class_group_relation_loss(s, t, torch.zeros(6, dtype=torch.long))
    assert one_class.item() == 0.0


# -- edge cases -----------------------------------------------------------------------------

RELATIONS = [KF.rkd_distance_loss, KF.rkd_angle_loss, KF.similarity_preserving_loss,
             KF.pairwise_relation_loss, KF.triplet_relation_loss,
             lambda s, t: KF.pairwise_relation_loss(s, t, "euclidean")]


@pytest.mark.parametrize("fn", RELATIONS)
def test_relations_on_a_batch_of_two(fn):
    s, t = _data(2, 3, 8)
    loss = fn(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("fn", RELATIONS + [KF.kd_loss])
def test_identical_samples_give_no_nan(fn):
    s = torch.ones(4, 6).requires_grad_()
    t = torch.randn(1, 6).repeat(4, 1)
    loss = fn(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_rkd_angle_with_duplicated_samples_matches_reference_value():
    x, t = _data(3, 4, 5)
    s = torch.cat([x.detach(), x.detach()]).requires_grad_()
    t = torch.cat([t, t])
    torch.testing.assert_close(KF.rkd_angle_loss(s, t), ref_rkd_angle(s, t))


def test_relations_accept_feature_maps_of_different_widths():
    s = torch.randn(4, 3, 2, 2, requires_grad=True)
    t = torch.randn(4, 16)
    for fn in RELATIONS:
        assert torch.isfinite(fn(s, t))


def test_teacher_side_gets_no_gradient():
    s, _ = _data(5, 4, 4)
    t = torch.randn(5, 6, requires_grad=True)
    for fn in RELATIONS:
        fn(s, t).backward()
    assert t.grad is None


def test_relations_reject_different_batch_sizes():
    with pytest.raises(LossError, match="same batch size"):
        KF.rkd_angle_loss(torch.randn(4, 3), torch.randn(5, 3))
