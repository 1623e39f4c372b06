"""fit: one loop for every training stage; options that change the run, divergence, callbacks."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kdcompress import data as kd_data
from kdcompress.context import StageContext
from kdcompress.errors import DivergedError, StageError
from kdcompress.training import FitConfig, fit, make_optimizer


def ce(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def small_net(seed: int = 0, classes: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, classes))


def context(task: kd_data.Task, name: str = "teacher") -> tuple[StageContext, list[tuple]]:
    events: list[tuple] = []
    ctx = StageContext.standalone(name, task)
    ctx.progress = lambda *args: events.append(args)
    return ctx, events


@pytest.fixture(scope="module")
def task() -> kd_data.Task:
    """160 training, 40 validation and 40 test images of 4 classes around random centres."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 1, 8, 8, generator=g)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 4
        return torch.randn(n, 1, 8, 8, generator=g) + centres[y], y

    (xt, yt), (xv, yv), (xs, ys) = split(160), split(40), split(40)
    return kd_data.from_tensors(xt, yt, xs, ys, x_val=xv, y_val=yv, name="blobs")


def test_fit_learns_and_reports_validation_accuracy_every_epoch(task):
    ctx, events = context(task)
    seen: list[tuple[int, dict]] = []
    observed: list[tuple[int, dict]] = []
    ctx.on_epoch = lambda epoch, metrics: observed.append((epoch, metrics))
    model = small_net()
    result = fit(model, ce, task, config=FitConfig(epochs=3, lr=1e-2), ctx=ctx,
                 on_epoch=lambda epoch, metrics: seen.append((epoch, metrics)))
    assert result.model is model and not model.training
    assert [e for e, _ in seen] == [1, 2, 3]
    assert all(set(m) == {"loss", "val_accuracy", "val_score"} for _, m in seen)
    assert [m["val_accuracy"] for _, m in seen] == [h.val_accuracy for h in result.history]
    assert [m["val_score"] for _, m in seen] == [m["val_accuracy"] for _, m in seen]  # top-1
    assert [m for _, m in seen] == [m for _, m in observed]  # the run's observers see the same
    assert result.split == "val" and result.val_accuracy > 0.9
    assert result.history[-1].loss < result.history[0].loss
    assert result.final_loss == result.history[-1].loss
    assert result.steps == 3 * 3 and not result.stopped_early  # 160 = 2 x 64 + 32 (kept)
    assert [e[:3] for e in events] == [("train", i, 3) for i in (1, 2, 3)]
    assert "val_acc" in events[-1][3]


def test_on_epoch_returning_true_stops_training_early(task):
    result = fit(small_net(), ce, task, config=FitConfig(epochs=5, lr=1e-2),
                 on_epoch=lambda epoch, metrics: epoch == 2)
    assert [h.epoch for h in result.history] == [1, 2]
    assert result.stopped_early and result.steps == 2 * 3


def _val_accuracy(model: nn.Module, task: kd_data.Task) -> float:
    x, y = task.arrays("val")
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


def test_keep_best_never_ends_below_the_start_and_records_the_epoch(task):
    """A trained model pushed uphill by a loss that unlearns it (negative cross-entropy) ends
    worse without keep_best and exactly where it started with it (epoch 0)."""
    trained = fit(small_net(), ce, task, config=FitConfig(epochs=4, lr=1e-2)).model
    start = _val_accuracy(trained, task)

    def unlearn(net, x, y):
        return -F.cross_entropy(net(x), y)

    plain = fit(copy.deepcopy(trained), unlearn, task, config=FitConfig(epochs=2, lr=1e-2))
    assert plain.best_epoch is None and _val_accuracy(plain.model, task) < start - 0.2
    ctx = StageContext.standalone("distill", task)
    kept = fit(copy.deepcopy(trained), unlearn, task, ctx=ctx,
               config=FitConfig(epochs=2, lr=1e-2, keep_best=True))
    assert kept.best_epoch == 0
    for a, b in zip(kept.model.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert ctx.details["best_epoch"] == {"epoch": 0, "val_score": round(start, 6),
                                         "start_val_score": round(start, 6)}


def test_keep_best_keeps_the_first_epoch_with_the_highest_validation_score(task):
    """Training from scratch with a constant, too-large learning rate wanders; the model ends with
    the weights of the first epoch whose validation score was the highest of the run."""
    ctx = StageContext.standalone("teacher", task)
    result = fit(small_net(seed=3), ce, task, ctx=ctx,
                 config=FitConfig(epochs=6, lr=3.0, optimizer="sgd", schedule="constant",
                                   keep_best=True))
    scores = [h.val_score for h in result.history]
    assert scores[-1] < max(scores)  # so ending with the last epoch's weights would fail below
    best = 1 + scores.index(max(scores))
    assert result.best_epoch == best
    assert _val_accuracy(result.model, task) == pytest.approx(scores[best - 1])
    assert ctx.details["best_epoch"]["epoch"] == best


def test_on_epoch_exception_propagates_unchanged(task):
    class Pruned(Exception):
        pass

    def prune_trial(epoch: int, metrics: dict) -> None:
        if metrics["val_accuracy"] < 2.0:  # always
            raise Pruned(f"epoch {epoch}")

    with pytest.raises(Pruned, match="epoch 1"):
        fit(small_net(), ce, task, config=FitConfig(epochs=3), on_epoch=prune_trial)
    ctx, events = context(task)
    ctx.on_epoch = prune_trial  # a run's observer (a search) stops the stage the same way
    with pytest.raises(Pruned, match="epoch 1"):
        fit(small_net(), ce, task, config=FitConfig(epochs=3), ctx=ctx)
    assert len(events) == 1


def test_diverging_learning_rate_names_stage_epoch_step_and_lr(task):
    ctx, events = context(task, "teacher")
    with pytest.raises(DivergedError) as info:
        fit(small_net(), ce, task, config=FitConfig(epochs=3, lr=1e6), ctx=ctx)
    message = str(info.value)
    assert re.search(r"stage 'teacher' diverged at epoch \d/3, step \d+ \(step \d+ of the run\)",
                     message)
    assert re.search(r"the loss is (nan|inf)", message)
    assert "the learning rate lr=1e+06 is too high" in message
    assert "inputs" not in message


class Standardised(Dataset):
    """Each image divided by its own standard deviation: a constant image becomes NaN."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] - self.x[i].mean()
        return x / x.std(), self.y[i]


def test_nan_in_the_inputs_is_blamed_on_the_data_not_the_learning_rate():
    x, y = torch.randn(100, 1, 8, 8), torch.arange(100) % 4
    x[37] = 1.0  # a blank image: 0 / 0 after standardisation
    train = Standardised(x, y)
    task = kd_data.from_datasets(train, Standardised(x[:8], y[:8]), fingerprint="dirty",
                                 num_classes=4)
    with pytest.raises(DivergedError, match=r"epoch 1/2, step \d.*inputs hold 64 NaN/inf"):
        fit(small_net(), ce, task, config=FitConfig(epochs=2, batch_size=16))


def test_nan_injected_into_the_loss_stops_at_that_step(task):
    calls = []

    def loss_fn(net, x, y):
        calls.append(1)
        loss = ce(net, x, y)
        return loss * float("nan") if len(calls) == 5 else loss

    with pytest.raises(DivergedError, match=r"epoch 2/4, step 2 \(step 5 of the run\): the "
                                            r"loss is nan.*learning rate lr=0.002 is too high"):
        fit(small_net(), loss_fn, task, config=FitConfig(epochs=4))
    assert len(calls) == 5  # nothing ran after the first non-finite loss


def test_non_finite_loss_before_any_update_blames_the_model_or_loss(task):
    with pytest.raises(DivergedError, match="step 1 .*before any update"):
        fit(small_net(), lambda net, x, y: net(x).sum() * math.inf, task)


def test_optimizers_and_schedules_differ(task):
    params = [nn.Parameter(torch.zeros(1))]
    sgd, _ = make_optimizer(params, FitConfig(optimizer="sgd", lr=0.1), total_steps=10)
    assert type(sgd).__name__ == "SGD"
    assert sgd.param_groups[0]["momentum"] == 0.9 and sgd.param_groups[0]["nesterov"]
    lrs = {}
    for schedule in ("cosine", "constant", "onecycle"):
        opt, sched = make_optimizer(params, FitConfig(schedule=schedule, lr=0.1), total_steps=10)
        trace = []
        for _ in range(10):
            trace.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs[schedule] = trace
    assert lrs["constant"] == [0.1] * 10
    assert lrs["cosine"][0] == 0.1 and lrs["cosine"][-1] < 0.01
    assert lrs["onecycle"][0] < 0.01 and max(lrs["onecycle"]) == pytest.approx(0.1, rel=0.05)

    def weights(**settings) -> torch.Tensor:
        model = fit(small_net(), ce, task, config=FitConfig(epochs=2, **settings)).model
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    base = weights()
    for settings in ({"optimizer": "sgd", "lr": 0.05}, {"schedule": "constant"},
                     {"schedule": "onecycle"}, {"weight_decay": 0.5}):
        assert not torch.allclose(weights(**settings), base), settings
    assert torch.equal(weights(), base)  # the same settings repeat exactly


def test_grad_clip_bounds_the_gradient_norm(task):
    def norms(grad_clip: float | None) -> list[float]:
        model = small_net()
        seen = []

        def on_step(step: int) -> None:  # the gradients the optimiser just used
            seen.append(float(torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters()]))))

        fit(model, ce, task, config=FitConfig(epochs=2, grad_clip=grad_clip), on_step=on_step)
        return seen

    free, clipped = norms(None), norms(0.05)
    assert max(free) > 0.2
    assert len(clipped) == 6 and max(clipped) <= 0.05 * (1 + 1e-5)


def test_extra_params_are_optimised_and_parts_reported(task):
    scale = nn.Parameter(torch.ones(()))
    ctx, events = context(task)

    def loss_fn(net, x, y):
        main = ce(net, x, y)
        penalty = (scale - 3.0) ** 2
        return main + penalty, {"ce": main, "penalty": penalty}

    result = fit(small_net(), loss_fn, task, config=FitConfig(epochs=3, lr=0.1), ctx=ctx,
                 params=[scale])
    assert 1.3 < float(scale.detach()) < 3.0  # optimised towards 3, from 1
    assert set(result.history[-1].parts) == {"ce", "penalty"}
    assert "penalty " in events[-1][3]


def test_with_index_gives_every_training_sample_once_per_epoch(task):
    seen: list[torch.Tensor] = []

    def loss_fn(net, x, y, index):
        seen.append(index)
        return ce(net, x, y)

    fit(small_net(), loss_fn, task, config=FitConfig(epochs=1), with_index=True)
    x, _ = task.arrays("train")
    assert sorted(torch.cat(seen).tolist()) == list(range(len(x)))


def test_a_last_batch_under_half_the_batch_size_is_dropped():
    x, y = torch.randn(70, 1, 8, 8), torch.arange(70) % 4
    task = kd_data.from_tensors(x, y, x[:8], y[:8], name="odd")
    sizes: list[int] = []
    fit(small_net(), lambda net, x, y: sizes.append(len(x)) or ce(net, x, y), task,
        config=FitConfig(epochs=1))
    assert sizes == [64]  # 6 left over: dropped


def test_amp_is_a_no_op_on_the_cpu(task):
    on = fit(small_net(), ce, task, config=FitConfig(epochs=1, amp=True)).model
    off = fit(small_net(), ce, task, config=FitConfig(epochs=1, amp=False)).model
    for a, b in zip(on.parameters(), off.parameters(), strict=True):
        assert torch.equal(a, b)


def test_zero_epochs_and_bad_settings(task):
    model = small_net()
    before = [p.detach().clone() for p in model.parameters()]
    result = fit(model, ce, task, config=FitConfig(epochs=0))
    assert result.history == [] and result.steps == 0 and math.isnan(result.final_loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(StageError, match="FitConfig: lr must be > 0, but got 0"):
        FitConfig(lr=0)
    with pytest.raises(StageError, match="optimizer must be one of .*Did you mean 'sgd'"):
        FitConfig(optimizer="sdg")
    with pytest.raises(StageError, match="loss_fn must return a scalar tensor.*shape \\(64, 4\\)"):
        fit(small_net(), lambda net, x, y: net(x), task)
    frozen = small_net().requires_grad_(False)
    with pytest.raises(StageError, match="stage 'train': nothing to train"):
        fit(frozen, ce, task)


def test_a_scaled_learning_rate_is_warmed_up_from_the_given_one_then_follows_its_schedule():
    config = FitConfig(epochs=10, lr=1e-3, schedule="cosine")
    scaled = dataclasses.replace(config, lr=4e-3)  # batch x 16, square-root rule
    opt, sched = make_optimizer([nn.Parameter(torch.zeros(2))], scaled, total_steps=100,
                                warmup=10, warmup_from=0.25)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3)  # the given learning rate
    assert lrs[:11] == pytest.approx([1e-3 + 3e-4 * i for i in range(11)])  # linear ramp
    # then the cosine schedule over the 90 steps left, from the scaled rate
    assert lrs[10:] == pytest.approx([2e-3 * (1 + math.cos(math.pi * t / 90)) for t in range(90)])
    plain = make_optimizer([nn.Parameter(torch.zeros(2))], config, total_steps=100)[1]
    assert type(plain).__name__ == "CosineAnnealingLR"  # no warm-up unless asked


def test_fit_warms_up_only_a_learning_rate_scaled_for_a_larger_batch(task, monkeypatch):
    from kdcompress import training
    from kdcompress.placement import BatchChoice

    seen: list[float] = []
    ctx, _ = context(task)
    model = small_net()
    probe = {}

    def on_step(step: int) -> None:
        seen.append(probe["opt"].param_groups[0]["lr"])

    real = training.make_optimizer

    def spy(*args, **kwargs):
        probe["opt"], sched = real(*args, **kwargs)
        return probe["opt"], sched

    monkeypatch.setattr(training, "make_optimizer", spy)
    monkeypatch.setattr(training, "auto_batch", lambda *a, **k: BatchChoice(
        32, 4e-2, "32 on cuda (test)", lr_factor=4.0))
    fit(model, ce, task, config=FitConfig(epochs=4, lr=1e-2, schedule="constant"), ctx=ctx,
        on_step=on_step)
    # 160 samples at batch 32: 5 steps per epoch, 20 in all; one epoch of warm-up from 1e-2
    assert ctx.details["lr_warmup"] == {"steps": 5, "from_lr": 1e-2, "to_lr": 4e-2}
    assert seen[:6] == pytest.approx([1e-2 + 6e-3 * i for i in range(1, 6)] + [4e-2])
    assert seen[5:] == pytest.approx([4e-2] * 15)
    monkeypatch.setattr(training, "auto_batch", lambda *a, **k: BatchChoice(32, 1e-2, "user"))
    ctx2, _ = context(task)
    fit(small_net(), ce, task, config=FitConfig(epochs=1, lr=1e-2), ctx=ctx2)
    assert "lr_warmup" not in ctx2.details
