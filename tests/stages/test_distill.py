"""The distill stage on digits: it teaches, never mutates its inputs, fails early and clearly."""

import copy
import inspect
import math

import pytest
import torch
from torch import nn

from kdcompress import Pipeline
from kdcompress.context import StageContext
from kdcompress.errors import DivergedError, LossError, PipelineError, StageError
from kdcompress.losses import AT, CE, KD, RKD, FitNet
from kdcompress.stages.distill import _FILL_BATCH, _ema_update, distill
from kdcompress.stages.train import train
from kdcompress.training import accuracy


class Net(nn.Module):
    """A small CNN for 8x8 digits with named blocks."""

    def __init__(self, width: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(width * 16, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.fc(self.embed(self.pool(self.conv(x))))


@pytest.fixture(scope="module")
def task(digits_task):
    return digits_task


@pytest.fixture(scope="module")
def teacher(task):
    torch.manual_seed(0)
    model = Net(width=8, hidden=64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = task.arrays("train")
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    assert accuracy(model, task, "val") > 0.9
    return model


def _ctx(task, seed=0):
    events = []
    ctx = StageContext.standalone("student_kd", task, seed=seed)
    ctx.progress = lambda *args: events.append(args)
    return ctx, events


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_kd_teaches_a_small_student_and_leaves_inputs_alone(task, teacher):
    torch.manual_seed(1)
    student = Net(width=4, hidden=16)
    s_state, t_state = _state(student), _state(teacher)
    student.train()
    before = accuracy(student, task, "val")
    ctx, events = _ctx(task)
    out = distill(student, teacher, loss=KD(temperature=4) * 0.9 + CE() * 0.1, epochs=4, lr=1e-2,
                  ctx=ctx)
    assert accuracy(out, task, "test") > max(0.8, before + 0.5)
    assert out is not student and not out.training
    assert next(out.parameters()).device.type == "cpu"
    for k, v in student.state_dict().items():
        assert torch.equal(v, s_state[k])
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, t_state[k])
    assert student.training and not teacher.training
    for m in list(out.modules()) + list(teacher.modules()):
        assert not m._forward_hooks
    assert [e[1:3] for e in events] == [(i, 4) for i in range(1, 5)]
    assert "kd " in events[-1][3] and "ce " in events[-1][3] and "val_acc" in events[-1][3]
    assert set(ctx.details["loss_parts"]) == {"loss", "kd", "ce"}


def test_feature_loss_adapters_stay_out_of_the_student(task, teacher):
    student = Net(width=4, hidden=16)
    loss = KD() + FitNet(["conv", "embed"], ["conv", "embed"]) + AT("conv", "conv") * 100
    out = distill(student, teacher, loss=loss, epochs=1, data=task)
    assert type(out) is Net
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in student.parameters())
    assert len(loss.leaves()[1].adapters) == 0, "the caller's loss must not be changed"


def test_unknown_layer_is_a_loss_error_with_a_suggestion(task, teacher):
    with pytest.raises(LossError, match="student.*no submodule 'embd'.*Did you mean 'embed'"):
        distill(Net(), teacher, loss=FitNet("embd", "embed"), epochs=1, data=task)


def test_impossible_pairing_fails_before_training(task, teacher):
    student = Net()
    steps = []
    student.register_full_backward_hook(lambda *a: steps.append(1))
    with pytest.raises(LossError, match=r"student layer 'conv' \(64, 8, 8, 8\).*teacher "
                                        r"layer 'embed' \(64, 64\)"):
        distill(student, teacher, loss=FitNet("conv", "embed"), epochs=1, data=task)
    assert not steps


def test_several_teachers_with_confidence_weights(task, teacher):
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.fc.weight.mul_(-1)  # a bad teacher
    acc = {}
    for weighting in ("mean", "confidence"):
        ctx, _ = _ctx(task)
        out = distill(Net(width=4, hidden=16), [teacher, other], loss=KD() * 0.9 + RKD() * 0.1
                      + CE() * 0.1, epochs=2, lr=1e-2, teacher_weighting=weighting, ctx=ctx)
        acc[weighting] = accuracy(out, task, "test")
    assert acc["confidence"] > acc["mean"] + 0.1
    assert {"rkd_distance", "rkd_angle"} <= set(ctx.details["loss_parts"])


def test_keep_best_starts_from_the_student_and_records_the_epoch_kept(task, teacher):
    """distill(keep_best=True) hands the setting to fit: the student's starting weights are
    scored as epoch 0 (here a copy of the teacher, so the teacher's validation accuracy), and the
    student returned scores what the epoch kept scored."""
    ctx, _ = _ctx(task)
    kept = distill(copy.deepcopy(teacher), teacher, epochs=2, lr=0.05, keep_best=True, ctx=ctx)
    best = ctx.details["best_epoch"]
    x, y = task.arrays("val")
    with torch.no_grad():
        teacher_score = float((teacher.eval()(x).argmax(1) == y).float().mean())
        kept_score = float((kept.eval()(x).argmax(1) == y).float().mean())
    assert best["start_val_score"] == pytest.approx(teacher_score, abs=1e-6)
    assert kept_score == pytest.approx(best["val_score"], abs=1e-6)
    assert best["val_score"] >= best["start_val_score"] and best["epoch"] in (0, 1, 2)


def test_teacher_cache_gives_the_same_student_with_one_teacher_pass(task, teacher):
    calls = []
    counted = copy.deepcopy(teacher)
    counted.register_forward_hook(lambda *a: calls.append(1))
    loss = KD() + FitNet("embed", "embed")
    student = Net()
    ctx, _ = _ctx(task)
    cached = distill(student, counted, loss=loss, epochs=3, ctx=ctx)  # "auto" caches tensor data
    assert ctx.details["teacher_cache"].startswith("on: ")
    n_batches = math.ceil(len(task.split("train")) / _FILL_BATCH)
    live = distill(student, teacher, loss=loss, epochs=3, cache_teacher=False, data=task)
    for a, b in zip(cached.parameters(), live.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert len(calls) == n_batches


def test_born_again_generation_learns_from_a_snapshot_of_itself(task, teacher):
    ctx, events = _ctx(task)
    out = distill(teacher, None, self_distill="born_again", generations=2, epochs=2, lr=1e-2,
                  ctx=ctx)
    assert [e[:3] for e in events] == [(f"distill gen {g}/2", e, 2) for g in (1, 2)
                                       for e in (1, 2)]
    assert not torch.equal(out.fc.weight, teacher.fc.weight)
    assert accuracy(out, task, "test") > 0.8


def test_ema_self_distillation_runs(task):
    out = distill(Net(), None, self_distill="ema", ema_decay=0.9, epochs=2, lr=1e-2,
                  loss=KD() * 0.5 + CE(), data=task)
    assert accuracy(out, task, "test") > 0.6


def test_ema_update_averages_weights():
    ema, model = nn.Linear(2, 2), nn.Linear(2, 2)
    old = ema.weight.detach().clone()
    _ema_update(ema, model, 0.75)
    torch.testing.assert_close(ema.weight, 0.75 * old + 0.25 * model.weight.detach())


def test_bad_arguments(task, teacher):
    with pytest.raises(PipelineError, match="distill: the loss .*needs a teacher"):
        distill(Net(), None, data=task)
    with pytest.raises(PipelineError, match="self_distill='ema'.*pass teacher=None"):
        distill(Net(), teacher, self_distill="ema", data=task)
    with pytest.raises(PipelineError, match="loss must be a kdcompress.losses loss.*MSELoss"):
        distill(Net(), teacher, loss=nn.MSELoss(), data=task)
    with pytest.raises(StageError, match="needs data"):
        distill(Net(), teacher)


BAD = [
    ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    ({"lr": -1.0}, "lr must be > 0, but got -1.0"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
    ({"teacher_weighting": "max"}, "teacher_weighting must be one of 'mean', 'confidence'"),
    ({"self_distill": "born-again"}, "self_distill must be one of None, 'born_again', 'ema'.*"
                                     "Did you mean 'born_again'"),
    ({"generations": 0}, "generations must be >= 1, but got 0"),
    ({"ema_decay": 1.0}, "ema_decay must be < 1, but got 1.0"),
    ({"cache_teacher": "yes"}, "cache_teacher must be one of"),
    ({"keep_best": "yes"}, "keep_best must be one of True, False, but got 'yes'"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[next(iter(k)) for k, _ in BAD])
def test_bad_settings_fail_at_declaration_and_on_direct_calls(task, teacher, kwargs, match):
    pipeline = Pipeline("p", data=task)
    with pytest.raises(PipelineError, match=f"stage 's' \\(distill\\): {match}"):
        pipeline.stage(distill, out="s", student=Net(), teacher=teacher, **kwargs)
    with pytest.raises(PipelineError, match=f"distill: {match}"):
        distill(Net(), teacher, data=task, **kwargs)


def test_defaults_are_train_defaults_and_distilling_is_not_worse_than_training(task, teacher):
    """With nothing but the epochs given, distilling a small student from a good teacher ends at
    least as accurate as training it alone (one test image of slack out of 360)."""
    for key in ("epochs", "lr", "batch_size", "weight_decay", "optimizer", "schedule"):
        assert (inspect.signature(distill).parameters[key].default
                == inspect.signature(train).parameters[key].default), key
    torch.manual_seed(2)
    student = Net(width=8, hidden=32)
    alone = accuracy(train(student, epochs=5, data=task), task, "test")
    taught = accuracy(distill(student, teacher, epochs=5, data=task), task, "test")
    assert taught >= alone - 1 / 360, (taught, alone)


def test_a_diverging_distillation_names_the_stage_and_returns_nothing(task, teacher):
    ctx, _ = _ctx(task)
    with pytest.raises(DivergedError, match=r"stage 'student_kd' diverged at epoch 1/2, step \d+"
                                            r".*lr=1e\+06"):
        distill(Net(), teacher, epochs=2, lr=1e6, ctx=ctx)
    assert "loss_parts" not in ctx.details


class _ProgressRecorder(CE):
    """Cross-entropy that records ``epochs_done`` of every batch it is given."""

    seen: list = []

    def forward(self, batch):
        type(self).seen.append(batch.epochs_done)
        return super().forward(batch)


def test_losses_see_how_far_training_is(task, teacher):
    _ProgressRecorder.seen = []
    distill(Net(), teacher, loss=KD() + _ProgressRecorder(), epochs=3, batch_size=64,
            ctx=_ctx(task)[0])
    seen = _ProgressRecorder.seen
    per_epoch = len(seen) // 3
    assert len(seen) == 3 * per_epoch and per_epoch > 1
    # step i (from 0) of epoch e (from 1): e - 1 + i / steps per epoch
    expected = [e + i / per_epoch for e in range(3) for i in range(per_epoch)]
    assert seen == pytest.approx(expected)
