"""transforms= of train and distill: what each transform does, where it applies, how it is keyed."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcompress import Pipeline, augment, data, models
from kdcompress.errors import PipelineError, StageError
from kdcompress.fingerprint import fingerprint_constant, stage_fingerprint
from kdcompress.losses import CE, KD
from kdcompress.stages import distill, train
from kdcompress.training import FitConfig, fit


def _images(n: int = 6, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 1, size, size, generator=torch.Generator().manual_seed(0))


def test_random_crop_is_a_shift_of_the_replicate_padded_image():
    x = _images()
    torch.manual_seed(0)
    out = augment.compose(augment.RandomCrop(padding=2))(x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, f"sample {i} is no window of its padded image"
        shifts.add(found[0])
    assert len(shifts) > 1  # each image its own random window


def test_flip_translate_noise():
    x = _images()
    flipped = augment.compose(augment.HorizontalFlip(p=1.0))(x)
    assert torch.equal(flipped, x.flip(-1))
    constant = torch.full((4, 1, 8, 8), 0.7)
    torch.testing.assert_close(augment.compose(augment.Translate(0.25))(constant), constant)
    torch.manual_seed(0)
    moved = augment.compose(augment.Translate(0.25))(x)
    assert moved.shape == x.shape and not torch.allclose(moved, x)
    flat = torch.zeros(20000, 3)  # noise works on any input shape
    noisy = augment.compose(augment.Noise(std=0.2))(flat)
    assert abs(float(noisy.std()) - 0.2) < 0.01 and abs(float(noisy.mean())) < 0.01


def test_seeded_runs_repeat_and_a_function_joins_the_list():
    steps = [augment.RandomCrop(padding=2), augment.HorizontalFlip(), lambda x: x * 2]
    x = _images()
    torch.manual_seed(3)
    a = augment.compose(steps)(x)
    torch.manual_seed(3)
    b = augment.compose(steps)(x)
    assert torch.equal(a, b)
    assert repr(augment.compose(steps)).startswith("RandomCrop(padding=2, padding_mode='replicate')"
                                                   " + HorizontalFlip(p=0.5) + ")


def test_settings_are_in_the_fingerprint():
    crop4, crop2 = augment.RandomCrop(padding=4), augment.RandomCrop(padding=2)
    assert fingerprint_constant(crop4) == fingerprint_constant(augment.RandomCrop(padding=4))
    assert fingerprint_constant(crop4) != fingerprint_constant(crop2)
    assert fingerprint_constant(augment.Noise(0.1)) != fingerprint_constant(augment.Noise(0.2))
    assert fingerprint_constant(crop4)["kornia"] is not None

    def key(**constants):
        return stage_fingerprint(train, {"epochs": 1, **constants}, {}, data=("d", "f"), seed=0)

    assert key() != key(transforms=[crop4]) != key(transforms=[crop2])
    assert key(transforms=[crop4, augment.HorizontalFlip()]) != \
        key(transforms=[augment.HorizontalFlip(), crop4])  # order matters
    assert key(transforms=[crop4]) == key(transforms=[augment.RandomCrop(padding=4)])


def test_bad_transforms_are_refused_at_declaration(tiny_task):
    import kornia.augmentation as K

    pipeline = Pipeline("p", data=tiny_task)
    with pytest.raises(PipelineError, match=r"transforms must be kdcompress.augment transforms "
                                            r".*but got 'flip'"):
        pipeline.stage(train, out="t", model=models.cnn(width=4), transforms=["flip"])
    with pytest.raises(PipelineError, match=r"RandomHorizontalFlip is a torch module, whose "
                                            r"settings cannot be fingerprinted"):
        pipeline.stage(distill, out="s", student=models.cnn(width=4),
                       teacher=models.cnn(width=4), transforms=K.RandomHorizontalFlip())
    with pytest.raises(PipelineError, match=r"RandomCrop: padding must be an integer >= 1, but "
                                            r"got 0"):
        augment.RandomCrop(padding=0)
    with pytest.raises(PipelineError, match=r"HorizontalFlip: p must satisfy 0 < p <= 1"):
        augment.HorizontalFlip(p=1.5)
    with pytest.raises(PipelineError, match=r"padding_mode must be one of 'replicate', "
                                            r"'reflect', 'constant', but got 'edge'"):
        augment.RandomCrop(padding_mode="edge")


def test_spatial_transform_on_vectors_fails_before_training():
    task = data.from_tensors(torch.randn(16, 5), torch.arange(16) % 2, torch.randn(4, 5),
                             torch.arange(4) % 2)
    with pytest.raises(StageError, match=r"RandomCrop needs image inputs of shape \(channels, "
                                         r"height, width\), but the data's inputs have shape "
                                         r"\(5,\)"):
        train(models.mlp(hidden=(4,)), epochs=1, transforms=augment.RandomCrop(), data=task)
    model = train(models.mlp(hidden=(4,)), epochs=1, transforms=augment.Noise(0.1), data=task)
    assert isinstance(model, nn.Module)


class _Spy:
    """A batch transform that counts the samples it sees and adds noise."""

    def __init__(self) -> None:
        self.samples = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.samples += len(x)
        return x + 0.5 * torch.randn_like(x)


def test_fit_augments_training_batches_only(tiny_task):
    spy = _Spy()
    model = models.cnn(width=4, hidden=8).build(tiny_task.input_shape, tiny_task.num_classes)
    fit(model, lambda net, x, y: F.cross_entropy(net(x), y), tiny_task,
        config=FitConfig(epochs=2, batch_size=32, transform=spy))
    # 96 training samples per epoch; the per-epoch accuracy (here on the training split, tiny
    # has no val) reads the same samples again, unaugmented
    assert spy.samples == 2 * 96
    with pytest.raises(StageError, match=r"turned a batch of shape \(32, 1, 8, 8\) into "
                                         r"\(32, 1, 4, 4\); a training transform must keep"):
        fit(model, lambda net, x, y: F.cross_entropy(net(x), y), tiny_task,
            config=FitConfig(epochs=1, batch_size=32, transform=lambda x: x[..., :4, :4]))


def test_train_stage_with_transforms_repeats_and_differs(tiny_task):
    steps = [augment.RandomCrop(padding=2), augment.Noise(0.1)]
    kwargs = {"epochs": 1, "batch_size": 32, "data": tiny_task}
    a = train(models.cnn(width=4, hidden=8), transforms=steps, **kwargs)
    b = train(models.cnn(width=4, hidden=8), transforms=steps, **kwargs)
    plain = train(models.cnn(width=4, hidden=8), **kwargs)
    x = tiny_task.arrays("test")[0]
    assert torch.equal(a(x), b(x))
    assert not torch.allclose(a(x), plain(x))


class _Recorder(nn.Module):
    """Records every input it sees in ``_Recorder.seen[tag]`` (survives the stages' copies)."""

    seen: dict[str, list[torch.Tensor]] = {}

    def __init__(self, inner: nn.Module, tag: str) -> None:
        super().__init__()
        self.inner, self.tag = inner, tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _Recorder.seen.setdefault(self.tag, []).append(x.detach().clone())
        return self.inner(x)


def test_teacher_and_student_see_the_same_augmented_batch(tiny_task, caplog):
    _Recorder.seen = {}
    net = models.cnn(width=4, hidden=8)
    teacher = _Recorder(net.build(tiny_task.input_shape, tiny_task.num_classes), "teacher")
    student = _Recorder(net.build(tiny_task.input_shape, tiny_task.num_classes), "student")
    with caplog.at_level(logging.WARNING):
        distill(student, teacher, loss=KD() * 0.5 + CE() * 0.5, epochs=1, batch_size=32,
                transforms=[augment.RandomCrop(padding=2), augment.Noise(0.3)],
                cache_teacher=True, data=tiny_task)
    assert "cache_teacher ignored: transforms=RandomCrop" in caplog.text
    seen_t, seen_s = _Recorder.seen["teacher"], _Recorder.seen["student"]
    # the set-up batch, 3 training batches; the student is then measured (tiny has no val:
    # on the training split, in one batch)
    assert len(seen_t) == 1 + 3 and len(seen_s) == 1 + 3 + 1
    for t, s in zip(seen_t, seen_s[:4], strict=True):
        assert torch.equal(t, s)
    x_train = tiny_task.arrays("train")[0]
    assert torch.equal(seen_s[0], x_train[:32])  # the set-up batch is not augmented
    assert torch.equal(seen_s[4], x_train)  # nor is the measured one
    for batch in seen_s[1:4]:  # training batches are: no sample is any training input
        assert not any(torch.equal(b, x) for b in batch for x in x_train)
