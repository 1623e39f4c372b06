"""The train stage: declared once, its settings checked early, trained by fit, stops on NaN."""

from __future__ import annotations

import pytest
import torch

from kdcompress import Pipeline, distributed, models
from kdcompress.context import StageContext
from kdcompress.declare import spec_of
from kdcompress.errors import DivergedError, PipelineError
from kdcompress.stages import distill, prune, train

BAD = [
    ({"epochs": "ten"}, "epochs must be an integer, got 'ten'"),
    ({"epochs": -1}, "epochs must be >= 0, but got -1"),
    ({"lr": 0}, "lr must be > 0, but got 0"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"batch_size": 0}, "batch_size must be >= 1, but got 0"),
    ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
    ({"label_smoothing": 1.0}, "label_smoothing must be < 1, but got 1.0"),
    ({"optimizer": "adam"}, "optimizer must be one of 'adamw', 'sgd'.*Did you mean 'adamw'"),
    ({"schedule": "cos"}, "schedule must be one of 'cosine', 'constant', 'onecycle'"),
    ({"grad_clip": 0.0}, "grad_clip must be > 0, but got 0.0"),
    ({"keep_best": 1}, "keep_best must be one of True, False, but got 1"),
]


def test_training_stages_are_declared_with_their_role_and_data_parallel():
    assert (spec_of(train).role, spec_of(train).distributed) == ("train", True)
    assert (spec_of(distill).role, spec_of(distill).distributed) == ("distill", True)
    assert (spec_of(prune).role, spec_of(prune).distributed) == ("prune", True)
    assert not hasattr(distributed, "data_parallel")


@pytest.mark.parametrize(("kwargs", "match"), BAD,
                         ids=[f"{k}={v!r}" for kw, _ in BAD for k, v in kw.items()])
def test_bad_settings_fail_at_declaration_and_on_direct_calls(tiny_task, kwargs, match):
    pipeline = Pipeline("p", data=tiny_task)
    with pytest.raises(PipelineError, match=f"stage 't' \\(train\\): {match}"):
        pipeline.stage(train, out="t", model=models.cnn(), **kwargs)
    with pytest.raises(PipelineError, match=f"train: {match}"):
        train(models.cnn(), data=tiny_task, **kwargs)


def test_train_learns_and_records_its_last_epoch(digits_task):
    ctx = StageContext.standalone("teacher", digits_task)
    model = train(models.cnn(width=8, hidden=32), epochs=3, ctx=ctx)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    assert [e["epoch"] for e in ctx.details["history"]] == [1, 2, 3]
    assert ctx.details["history"][-1]["val_accuracy"] > 0.7
    assert ctx.details["final_loss"] < 1.5  # ln(10) = 2.3 untrained


def test_train_passes_its_optimiser_settings_to_fit(tiny_task):
    def weights(**settings) -> torch.Tensor:
        model = train(models.cnn(width=4, hidden=8), epochs=1, data=tiny_task, **settings)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    base = weights()
    assert torch.equal(weights(), base)
    for settings in ({"optimizer": "sgd"}, {"schedule": "constant"}, {"grad_clip": 1e-3}):
        assert not torch.allclose(weights(**settings), base), settings


def test_a_diverging_train_raises_and_returns_nothing(tiny_task):
    ctx = StageContext.standalone("teacher", tiny_task)
    with pytest.raises(DivergedError, match=r"stage 'teacher' diverged at epoch \d/3, step \d+.*"
                                            r"the learning rate lr=1e\+06 is too high"):
        train(models.cnn(width=4, hidden=8), epochs=3, lr=1e6, ctx=ctx)
    assert "final_loss" not in ctx.details
