"""Losses under mixed precision and at extreme feature scales; attention transfer's sizes."""

import pytest
import torch
import torch.nn.functional as F

from kdcompress.errors import LossError
from kdcompress.losses import AT, DistillBatch, FitNet
from kdcompress.losses import functional as KF
from kdcompress.losses import robustness as R

# -- the sweep --------------------------------------------------------------------------------

#: (scale, batch) pairs of the default grid: tiny, small, normal and large features at batch
#: sizes 1 to 64; every loss and every dtype runs each of them.
_POINTS = [(1e-20, 7), (1e-6, 2), (1e-4, 1), (1.0, 64), (1e2, 16)]


@pytest.mark.parametrize("dtype", R.DTYPES, ids=str)
@pytest.mark.parametrize("name", list(R.LOSSES))
def test_loss_is_finite_and_agrees_with_float64(name, dtype):
    bad = [r for scale, batch in _POINTS if not (r := R.check(name, dtype, scale, batch)).ok]
    assert not bad, bad


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RKD distance+angle", "Triplet", "Pairwise euclidean"])
def test_relation_losses_at_batch_256(name):
    for dtype, scale in [(torch.float32, 1e-14), (torch.float16, 1e2)]:
        r = R.check(name, dtype, scale, 256)
        assert r.ok, r


def test_sweep_rejects_an_unknown_loss():
    with pytest.raises(LossError, match="no loss named 'KDD'"):
        R.check("KDD", torch.float32, 1.0, 2)


def test_value_under_autocast_is_float32_and_matches_float32():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g) * 30, torch.randn(8, 10, generator=g) * 30
    ref = KF.pairwise_relation_loss(s, t, "dot")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = KF.pairwise_relation_loss(s, t, "dot")  # bf16 matmuls without the fix
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref)


# -- the two regressions named in the issue -----------------------------------------------------


def test_rkd_angle_gradient_is_finite_for_tiny_float32_features():
    # the angle loss is scale invariant: grad at c * x is grad at x divided by c
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    tiny = (x * 1e-14).requires_grad_()
    KF.rkd_angle_loss(tiny, t).backward()
    x64 = x.double().requires_grad_()
    KF.rkd_angle_loss(x64, t.double()).backward()
    assert torch.isfinite(tiny.grad).all()
    torch.testing.assert_close(tiny.grad.double() * 1e-14, x64.grad, rtol=1e-4, atol=1e-8)


def test_nearby_distinct_samples_keep_their_distance_in_float32():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, generator=g) * 20  # norm about 80: float32's Gram loses 0.0067
    d = torch.randn(16, generator=g)
    d = d / d.norm() * 0.0067
    x = torch.stack([a, a + d, -a, torch.randn(16, generator=g) * 20])
    exact = (x[0].double() - x[1].double()).norm()
    got = KF.relation_matrix(x, "euclidean")[0, 1]
    torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=0)
    s = x.clone().requires_grad_()
    KF.rkd_distance_loss(s, torch.randn(4, 3, generator=g)).backward()
    assert torch.isfinite(s.grad).all() and s.grad[0].abs().sum() > 0


def test_identical_rows_still_count_as_one_point():
    x = torch.randn(3, 6).repeat(2, 1)
    d = KF.relation_matrix(x, "euclidean")
    assert d[0, 3].item() == 0.0 and d[0, 1].item() > 0


def test_fitnet_adapter_stays_float32_under_autocast():
    s = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    t = torch.randn(4, 6, 5, 5).to(torch.bfloat16)
    batch = DistillBatch(torch.randn(4, 10), [torch.randn(4, 10)], torch.zeros(4).long(),
                         {"f": s}, [{"f": t}])
    loss = FitNet("f", "f")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss.setup(batch)
        value, _ = loss(batch)
    assert {p.dtype for p in loss.parameters()} == {torch.float32}
    assert value.dtype == torch.float32


# -- attention transfer between maps of different sizes --------------------------------------


def _adaptive_avg_pool_ref(x, size):
    """Adaptive average pooling written out: bin i spans [floor(i n / m), ceil((i + 1) n / m))."""
    out = x
    for axis, m in enumerate(size, start=2):
        n = out.shape[axis]
        bins = [out.narrow(axis, (i * n) // m, -(-((i + 1) * n) // m) - (i * n) // m)
                .mean(axis, keepdim=True) for i in range(m)]
        out = torch.cat(bins, axis)
    return out


def _at_ref(s, t, p):
    def q(x):
        a = (x.abs() ** p).mean(1).flatten(1)
        return a / torch.sqrt((a * a).sum(1, keepdim=True))
    return ((q(s) - q(t)) ** 2).mean()


@pytest.mark.parametrize("s_size,t_size", [((8, 8), (4, 4)), ((3, 3), (7, 7)), ((6, 5), (4, 8)),
                                           ((9,), (4,))])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attention_transfer_pools_the_larger_map_by_default(s_size, t_size, p):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(3, 4, *s_size, generator=g, dtype=torch.float64).requires_grad_()
    t = torch.randn(3, 6, *t_size, generator=g, dtype=torch.float64)
    size = tuple(min(a, b) for a, b in zip(s_size, t_size, strict=True))
    got = KF.attention_transfer_loss(s, t, p)
    (g_got,) = torch.autograd.grad(got, s)
    ref = _at_ref(_adaptive_avg_pool_ref(s, size), _adaptive_avg_pool_ref(t, size), p)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_got, g_ref, rtol=1e-8, atol=1e-14)


def test_attention_transfer_pool_matches_repdistiller_on_square_maps():
    # RepDistiller (distiller_zoo/AT.py): adaptive_avg_pool2d of the larger f to the other's H,
    # then F.normalize(f.pow(2).mean(1).view(B, -1)) and the mean squared difference
    s, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.randn(2, 5, 4, 4,
                                                                      dtype=torch.float64)
    def at(f):
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))
    ref = (at(F.adaptive_avg_pool2d(s, (4, 4))) - at(t)).pow(2).mean()
    torch.testing.assert_close(KF.attention_transfer_loss(s, t), ref)


def test_attention_transfer_interpolates_attention_maps_on_request():
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 8, 8,
                                                                      dtype=torch.float64)
    a_s = (s.abs() ** 2).mean(1, keepdim=True)
    a_s = F.interpolate(a_s, size=(8, 8), mode="bilinear", align_corners=False).flatten(1)
    a_t = (t.abs() ** 2).mean(1).flatten(1)
    ref = ((a_s / a_s.norm(dim=1, keepdim=True) - a_t / a_t.norm(dim=1, keepdim=True)) ** 2).mean()
    got = KF.attention_transfer_loss(s, t, resize="interpolate")
    torch.testing.assert_close(got, ref)
    assert not torch.allclose(got, KF.attention_transfer_loss(s, t))  # the options differ


def test_at_module_passes_resize_and_rejects_unknown_modes():
    assert AT("a", "b").resize == "pool"
    with pytest.raises(LossError, match="resize must be 'pool'.*but got 'bilinear'"):
        AT("a", "b", resize="bilinear")
    with pytest.raises(LossError, match="resize must be 'pool' or 'interpolate'"):
        KF.attention_transfer_loss(torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), resize="x")
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    batch = DistillBatch(torch.randn(2, 4), [torch.randn(2, 4)], torch.zeros(2).long(),
                         {"a": s}, [{"b": t}])
    for resize in ("pool", "interpolate"):
        value, _ = AT("a", "b", resize=resize)(batch)
        torch.testing.assert_close(value, KF.attention_transfer_loss(s, t, resize=resize))


def test_sweep_grid_covers_the_issue_range():
    assert min(R.SCALES) == 1e-20 and max(R.SCALES) == 1e2
    assert min(R.BATCHES) == 1 and max(R.BATCHES) == 256
