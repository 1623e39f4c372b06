"""Loss modules: composition arithmetic, named parts, several teachers, adapters, fingerprints."""

import copy

import pytest
import torch
from torch import nn

from kdcompress.artifacts import module_spec
from kdcompress.errors import LossError
from kdcompress.hooks import FeatureCapture
from kdcompress.losses import (
    AT,
    CE,
    DKD,
    KD,
    RKD,
    SP,
    ClassGroup,
    DistillBatch,
    FitNet,
    FocalKD,
    PairwiseRelation,
    TopKKD,
    Triplet,
    Warmup,
    teacher_weights,
)
from kdcompress.losses import functional as KF


def _batch(b=8, c=10, teachers=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return DistillBatch(
        student_logits=torch.randn(b, c, generator=g).requires_grad_(),
        teacher_logits=[torch.randn(b, c, generator=g) for _ in range(teachers)],
        labels=torch.randint(0, c, (b,), generator=g),
    )


def test_composition_weights_and_parts_sum_to_the_total():
    batch = _batch()
    loss = KD(temperature=4) * 0.9 + RKD() * 0.1 + CE() * 0.1
    value, parts = loss(batch)
    assert set(parts) == {"kd", "rkd_distance", "rkd_angle", "ce"}
    torch.testing.assert_close(sum(parts.values()), value)
    kd = KF.kd_loss(batch.student_logits, batch.teacher_logits[0], 4.0)
    torch.testing.assert_close(parts["kd"], 0.9 * kd)
    ce = nn.functional.cross_entropy(batch.student_logits, batch.labels)
    torch.testing.assert_close(parts["ce"], 0.1 * ce)
    rkd = (KF.rkd_distance_loss(batch.student_logits, batch.teacher_logits[0])
           + 2 * KF.rkd_angle_loss(batch.student_logits, batch.teacher_logits[0]))
    torch.testing.assert_close(parts["rkd_distance"] + parts["rkd_angle"], 0.1 * rkd)


def test_scalar_arithmetic_flattens_and_multiplies():
    loss = 2 * (KD() * 0.5 + CE())
    assert len(loss.leaves()) == 2
    nested = (KD() * 0.5) * 3
    assert nested.weight == pytest.approx(1.5)
    assert repr(loss) == ("(KD(temperature=4.0) * 0.5 + CE(label_smoothing=0.0)) * 2")
    assert len((KD() + CE() + SP()).terms) == 3
    with pytest.raises(TypeError):
        KD() * "0.5"
    with pytest.raises(TypeError):
        KD() + 1.0


def test_duplicate_part_names_are_numbered():
    _, parts = (KD(temperature=2) + KD(temperature=8))(_batch())
    assert set(parts) == {"kd", "kd_2"}


def test_dkd_reports_both_parts():
    batch = _batch()
    value, parts = DKD(alpha=1, beta=8)(batch)
    assert set(parts) == {"dkd_tckd", "dkd_nckd"}
    torch.testing.assert_close(value, KF.dkd_loss(batch.student_logits, batch.teacher_logits[0],
                                                  batch.labels))


@pytest.mark.parametrize("loss", [KD(), DKD(), FocalKD(), TopKKD(k=3), CE(), RKD(), SP(),
                                  PairwiseRelation(metric="euclidean"), Triplet(), ClassGroup()])
def test_every_loss_backpropagates_to_the_student(loss):
    batch = _batch()
    value, parts = loss(batch)
    value.backward()
    assert torch.isfinite(value) and batch.student_logits.grad.abs().sum() > 0
    torch.testing.assert_close(sum(parts.values()), value.detach(), check_dtype=False)


def test_fingerprint_spec_holds_settings_and_children():
    loss = KD(temperature=3) * 0.9 + FitNet("a", "b", weights=[2.0]) * 0.1
    spec = module_spec(loss)
    terms = spec["children"]["terms"]["children"]
    assert terms["0"]["attrs"]["weight"] == 0.9
    assert terms["0"]["children"]["loss"]["attrs"] == {"temperature": 3.0}
    fit = terms["1"]["children"]["loss"]["attrs"]
    assert fit["student"] == ["a"] and fit["teacher"] == ["b"] and fit["weights"] == [2.0]
    assert module_spec(KD(temperature=4)) == module_spec(KD(temperature=4.0))
    assert module_spec(KD(temperature=4)) != module_spec(KD(temperature=2))


def test_several_teachers_mix_probabilities():
    batch = _batch(teachers=2)
    mixed = batch.soft_targets(2.0)
    p = (torch.softmax(batch.teacher_logits[0] / 2, -1)
         + torch.softmax(batch.teacher_logits[1] / 2, -1)) / 2
    torch.testing.assert_close(torch.softmax(mixed / 2, -1), p)


def test_confidence_weights_favour_the_teacher_that_is_right():
    labels = torch.tensor([0, 1])
    right = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    wrong = torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    w = teacher_weights([right, wrong], labels, "confidence")
    assert (w[:, 0] > 0.9).all()
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    torch.testing.assert_close(teacher_weights([right, wrong], labels, "mean"),
                               torch.full((2, 2), 0.5))
    with pytest.raises(LossError, match="'mean' or 'confidence'"):
        teacher_weights([right, wrong], labels, "vote")


def _feature_batch(s_shape, t_shape, b=4):
    batch = _batch(b=b)
    batch.student_features = {"s": torch.randn(b, *s_shape, requires_grad=True)}
    batch.teacher_features = [{"t": torch.randn(b, *t_shape)}]
    return batch


@pytest.mark.parametrize("s_shape,t_shape,adapter", [
    ((4, 6, 6), (8, 6, 6), nn.Conv2d), ((4, 6, 6), (8, 3, 3), nn.Conv2d),
    ((5,), (12,), nn.Linear), ((7, 5), (7, 12), nn.Linear), ((8, 3, 3), (8, 3, 3), None)])
def test_fitnet_adapters_from_first_batch_shapes(s_shape, t_shape, adapter):
    batch = _feature_batch(s_shape, t_shape)
    loss = FitNet("s", "t")
    loss.setup(batch)
    if adapter is None:
        assert len(loss.adapters) == 0
    else:
        assert isinstance(loss.adapters["pair0_teacher0"].proj, adapter)
    value, _ = loss(batch)
    value.backward()
    assert batch.student_features["s"].grad is not None


def test_fitnet_impossible_pairing_names_both_layers_and_shapes():
    batch = _feature_batch((4, 6, 6), (12,))
    with pytest.raises(LossError, match=r"student layer 's' \(4, 4, 6, 6\).*teacher layer 't' "
                                        r"\(4, 12\)"):
        FitNet("s", "t").setup(batch)
    with pytest.raises(LossError, match="AT cannot pair"):
        AT("s", "t").setup(batch)


def test_fitnet_multi_level_weights():
    batch = _batch()
    batch.student_features = {"a": torch.randn(8, 3), "b": torch.randn(8, 3)}
    batch.teacher_features = [{"x": torch.randn(8, 3), "y": torch.randn(8, 3)}]
    value, _ = FitNet(["a", "b"], ["x", "y"], weights=[1.0, 3.0])(batch)
    expected = (KF.feature_loss(batch.student_features["a"], batch.teacher_features[0]["x"])
                + 3 * KF.feature_loss(batch.student_features["b"], batch.teacher_features[0]["y"]))
    torch.testing.assert_close(value, expected)
    with pytest.raises(LossError, match="2 student layers but 1 teacher"):
        FitNet(["a", "b"], "x")


def test_the_user_loss_is_not_changed_by_setup_on_a_copy():
    loss = FitNet("s", "t")
    before = module_spec(loss)
    working = copy.deepcopy(loss)
    working.setup(_feature_batch((4,), (6,)))
    assert len(working.adapters) == 1 and module_spec(loss) == before


def test_hooks_capture_features_without_editing_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 36, 10))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [type(m) for m in model.modules()]
    x = torch.randn(2, 1, 8, 8)
    reference = model(x)
    with FeatureCapture(model, ["0", "3"]) as capture:
        out = model(x)
        feats = capture.pop()
    assert feats["0"].shape == (2, 4, 6, 6) and feats["3"].shape == (2, 10)
    assert (feats["0"] < 0).any(), "the in-place ReLU must not change the captured map"
    torch.testing.assert_close(out, reference)
    assert not model[0]._forward_hooks and not model[3]._forward_hooks
    assert [type(m) for m in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_hooks_unknown_name_suggests_the_closest():
    from kdcompress.errors import LayerError

    model = nn.Sequential()
    model.add_module("features", nn.Linear(2, 2))
    with pytest.raises(LayerError, match="no submodule 'featurse'.*Did you mean 'features'"):
        FeatureCapture(model, ["featurse"], role="student")


def test_warmup_ramps_linearly_and_scales_every_part():
    # min(epochs done / warm-up epochs, 1), continuous; full weight outside training
    loss = Warmup(DKD(), epochs=4)
    plain_value, plain_parts = DKD()(_batch())
    for done, weight in ((0.0, 0.0), (0.5, 0.125), (1.0, 0.25), (3.0, 0.75), (4.0, 1.0),
                         (9.5, 1.0), (None, 1.0)):
        batch = _batch()
        batch.epochs_done = done
        value, parts = loss(batch)
        torch.testing.assert_close(value, weight * plain_value)
        assert set(parts) == set(plain_parts) == {"dkd_tckd", "dkd_nckd"}
        for name in parts:
            torch.testing.assert_close(parts[name], weight * plain_parts[name])
    batch = _batch()
    batch.epochs_done = 1.0
    value, parts = (Warmup(DKD(), epochs=2) + CE())(batch)
    torch.testing.assert_close(sum(parts.values()), value)
    torch.testing.assert_close(parts["ce"], nn.functional.cross_entropy(batch.student_logits,
                                                                        batch.labels))


def test_warmup_passes_layers_through_and_is_fingerprinted_with_its_epochs():
    loss = Warmup(FitNet("a", "b"), epochs=3) + CE()
    assert loss.student_layers() == ["a"] and loss.teacher_layers() == ["b"]
    assert loss.needs_teacher() and not Warmup(CE(), epochs=3).needs_teacher()
    spec = module_spec(loss)["children"]["terms"]["children"]["0"]
    assert spec["attrs"]["epochs"] == 3
    assert repr(Warmup(KD(), epochs=2)) == "Warmup(KD(temperature=4.0), epochs=2)"


@pytest.mark.parametrize("loss, epochs", [(CE(), 0), (CE(), 1.5), (CE(), True),
                                          (nn.Linear(2, 2), 2)])
def test_warmup_refuses_bad_settings(loss, epochs):
    with pytest.raises(LossError, match="Warmup"):
        Warmup(loss, epochs=epochs)
