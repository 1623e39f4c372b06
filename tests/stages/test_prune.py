"""The prune stage: shapes, parameter counts, KD recovery, reload, ignored layers, TT layers."""

from __future__ import annotations

import inspect
import sys

import pytest
import torch
from torch import nn

from kdcompress import Pipeline, data, models
from kdcompress.artifacts import load_module, save_module
from kdcompress.context import StageContext
from kdcompress.errors import PipelineError, StageError
from kdcompress.stages.prune import PRUNE_RATIOS, channel_counts, prune
from kdcompress.training import accuracy


@pytest.fixture(scope="module")
def task(digits_task: data.Task) -> data.Task:
    return digits_task


@pytest.fixture(scope="module")
def trained(trained_cnn: nn.Module) -> nn.Module:
    return trained_cnn


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("importance", ["magnitude", "l1", "taylor", "lamp"])
@pytest.mark.parametrize("global_pruning", [False, True])
def test_prune_keeps_output_shape_and_removes_params(trained, task, importance, global_pruning):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    pruned = prune(trained, ratio=0.5, importance=importance, global_pruning=global_pruning,
                   data=task)
    x = task.example(5)
    assert pruned(x).shape == (5, 10)
    assert n_params(pruned) < 0.8 * n_params(trained)
    assert pruned.classifier.fc2.out_features == 10  # the head keeps every class
    # the input model is untouched
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert trained.features.conv2.out_channels == 16


def test_per_layer_ratio_and_round_to(trained, task):
    ctx = StageContext.standalone("pruned", task)
    pruned = prune(trained, ratio=0.5, round_to=4, ctx=ctx)
    counts = channel_counts(pruned)
    assert counts["features.conv2"] == 8 and counts["classifier.fc1"] == 32
    assert all(c % 4 == 0 for name, c in counts.items() if name != "classifier.fc2")
    assert ctx.details["channels"]["features.conv2"] == [16, 8]
    assert ctx.details["params_after"] == n_params(pruned) < ctx.details["params_before"]
    assert "classifier.fc2" in ctx.details["ignored_layers"]


def test_ignored_layers_are_kept_and_unknown_names_rejected(trained, task):
    pruned = prune(trained, ratio=0.5, ignored_layers=["features.conv1"], data=task)
    assert pruned.features.conv1.out_channels == 8
    assert pruned.features.conv2.out_channels == 8
    with pytest.raises(StageError, match="Did you mean 'features.conv1'"):
        prune(trained, ratio=0.5, ignored_layers=["features.cnov1"], data=task)


BAD = [
    ({"ratio": 1.0}, "ratio must be < 1, but got 1.0"),
    ({"ratio": -0.1}, "ratio must be >= 0, but got -0.1"),
    ({"importance": "tailor"}, "importance must be one of .*Did you mean 'taylor'"),
    ({"global_pruning": 1}, "global_pruning must be one of True, False, but got 1"),
    ({"iterative_steps": 0}, "iterative_steps must be >= 1, but got 0"),
    ({"recovery_epochs": 1.5}, "recovery_epochs must be an integer, got 1.5"),
    ({"recovery_epochs": -1}, "recovery_epochs must be >= 0, but got -1"),
    ({"recovery_lr": 0.0}, "recovery_lr must be > 0, but got 0.0"),
    ({"recovery_batch_size": 0}, "recovery_batch_size must be >= 1, but got 0"),
    ({"round_to": 0}, "round_to must be >= 1, but got 0"),
    ({"recovery_precision": "bf61"}, "recovery_precision must be one of .*Did you mean 'bf16'"),
    ({"allocation": "sensitive"}, "allocation must be one of 'uniform', 'sensitivity', but got "
                                  "'sensitive'. Did you mean 'sensitivity'"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD,
                         ids=[f"{k}={v!r}" for kw, _ in BAD for k, v in kw.items()])
def test_bad_settings_fail_at_declaration_and_on_direct_calls(trained, task, kwargs, match):
    pipeline = Pipeline("p", data=task)
    with pytest.raises(PipelineError, match=f"stage 'p' \\(prune\\): {match}"):
        pipeline.stage(prune, out="p", model=trained, **kwargs)
    with pytest.raises(PipelineError, match=f"prune: {match}"):
        prune(trained, data=task, **kwargs)
    with pytest.raises(StageError, match="expects a torch model"):
        prune("model.onnx", data=task)


def test_recovery_runs_in_the_precision_asked_for(trained, task, monkeypatch):
    """``recovery_precision`` reaches recovery's training loop (bfloat16 autocast runs on the
    CPU too), and fp16, which needs CUDA, is refused on the CPU before any pruning."""
    from kdcompress.context import StageContext

    ctx = StageContext.standalone("p", task)
    prune(trained, ratio=0.3, recovery_epochs=1, recovery_precision="bf16", ctx=ctx)
    assert ctx.details["precision"] == "bfloat16"
    plain = StageContext.standalone("p", task)
    prune(trained, ratio=0.3, recovery_epochs=1, ctx=plain)
    assert plain.details["precision"] == "float32"
    prune_module = sys.modules["kdcompress.stages.prune"]

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned before refusing fp16 on the CPU")

    monkeypatch.setattr(prune_module, "channel_counts", no_pruning)
    with pytest.raises(StageError, match="precision='fp16' needs CUDA"):
        prune(trained, ratio=0.3, recovery_epochs=1, recovery_precision="fp16", data=task)


def test_pruned_model_reloads_identically(trained, task, tmp_path):
    pruned = prune(trained, ratio=0.4, round_to=2, data=task)
    save_module(pruned, tmp_path)
    reloaded = load_module(tmp_path)
    x, _ = task.arrays("test")
    with torch.no_grad():
        assert torch.equal(pruned(x), reloaded(x))
    assert reloaded.features.conv3.out_channels == pruned.features.conv3.out_channels < 16


def test_iterative_pruning_with_kd_recovery_recovers_accuracy(trained, task):
    base = accuracy(trained, task, "test")
    ratio = 0.5
    blunt = accuracy(prune(trained, ratio=ratio, recovery_epochs=0, data=task), task, "test")
    ctx = StageContext.standalone("pruned", task)
    repaired = prune(trained, ratio=ratio, iterative_steps=2, recovery_epochs=3, ctx=ctx)
    acc = accuracy(repaired, task, "test")
    assert blunt < base - 0.2  # pruning this much without repair hurts ...
    assert acc > base - 0.03, (base, blunt, acc)  # ... and KD recovery wins most of it back
    steps = ctx.details["steps"]
    assert [s["step"] for s in steps] == [1, 2] and steps[0]["params"] > steps[1]["params"]
    assert n_params(repaired) == n_params(prune(trained, ratio=ratio, recovery_epochs=0,
                                                data=task))


def test_default_prune_recovers_with_kd_from_the_unpruned_model(trained, task):
    """A user who passes only the ratio gets a few epochs of KD recovery, not a bare cut."""
    assert inspect.signature(prune).parameters["recovery_epochs"].default == 3
    bare = accuracy(prune(trained, ratio=0.5, recovery_epochs=0, data=task), task, "test")
    ctx = StageContext.standalone("pruned", task)
    default = accuracy(prune(trained, ratio=0.5, ctx=ctx), task, "test")
    assert default > bare + 0.05, (bare, default)
    assert ctx.details["steps"][0]["val_accuracy"] > 0.9


def test_tt_layer_in_classifier_is_protected(trained, task, tmp_path):
    tt = pytest.importorskip("kdcompress.layers.tt")
    model = models.cnn(width=16, hidden=64).build((1, 8, 8), 10).eval()
    model.load_state_dict(trained.state_dict())
    model.classifier.fc1 = tt.TTLinear.from_linear(model.classifier.fc1, rank=4)
    x, _ = task.arrays("test")
    pruned = prune(model, ratio=0.5, data=task)
    assert pruned(x[:3]).shape == (3, 10)
    assert n_params(pruned) < n_params(model)
    assert pruned.features.conv1.out_channels == 4
    fc1 = pruned.classifier.fc1
    assert fc1(torch.zeros(2, fc1.in_features)).shape == (2, fc1.out_features)
    save_module(pruned, tmp_path)
    with torch.no_grad():
        assert torch.equal(pruned(x), load_module(tmp_path)(x))


# ----------------------------------------------------------------------------------------------
# allocation="sensitivity": the same ratio spread by each group's measured sensitivity


def test_uniform_allocation_is_todays_behaviour(trained, task):
    ctx = StageContext.standalone("pruned", task)
    default = prune(trained, ratio=0.4, recovery_epochs=0, data=task)
    uniform = prune(trained, ratio=0.4, recovery_epochs=0, allocation="uniform", ctx=ctx)
    assert default.state_dict().keys() == uniform.state_dict().keys()
    assert all(torch.equal(v, uniform.state_dict()[k]) for k, v in default.state_dict().items())
    assert "allocation" not in ctx.details


def test_sensitivity_allocation_matches_uniform_params_and_records_groups(trained, task):
    ratio = 0.4
    uniform = prune(trained, ratio=ratio, recovery_epochs=0, data=task)
    ctx = StageContext.standalone("pruned", task)
    spread = prune(trained, ratio=ratio, recovery_epochs=0, allocation="sensitivity", ctx=ctx)
    plan = ctx.details["allocation"]
    counts, before = channel_counts(spread), channel_counts(trained)
    # the same size as the uniform cut, within the parameters of one channel of some group
    from kdcompress.analysis.sensitivity import prune_group

    one_channel = max(n_params(trained) - n_params(prune_group(
        trained, task.example(2), g["root"], 0.5 / g["channels"])) for g in plan["groups"])
    assert plan["params_target"] == n_params(uniform)
    assert plan["params_planned"] == n_params(spread) <= n_params(uniform)
    assert n_params(uniform) - n_params(spread) < one_channel
    for g in plan["groups"]:  # the record says what happened to every group
        assert counts[g["root"]] == before[g["root"]] - g["removed"] == g["channels"] - g["removed"]
        assert g["ratio"] == pytest.approx(g["removed"] / g["channels"], abs=1e-4)
    assert {g["root"] for g in plan["groups"]} == set(before) - {"classifier.fc2"}
    assert len({g["ratio"] for g in plan["groups"]}) > 1  # spread unevenly
    assert plan["predicted_drop"] == pytest.approx(sum(g["predicted_drop"]
                                                       for g in plan["groups"]), abs=1e-3)
    # on these digits the measured spread costs less accuracy than the uniform cut
    assert plan["predicted_drop"] < plan["uniform_predicted_drop"]
    assert accuracy(spread, task, "val") > accuracy(uniform, task, "val")
    assert spread(task.example(3)).shape == (3, 10)


def test_sensitivity_allocation_can_cut_a_group_beyond_a_high_ratio(trained, task):
    # at ratio 0.8 the ladder reaches above it, so the allocation is free to differ from uniform
    ctx = StageContext.standalone("pruned", task)
    prune(trained, ratio=0.8, recovery_epochs=0, allocation="sensitivity", ctx=ctx)
    plan = ctx.details["allocation"]
    assert max(plan["ladder"]) > 0.8
    assert max(g["ratio"] for g in plan["groups"]) > 0.8


def test_sensitivity_allocation_at_the_ladders_top_says_it_is_uniform(trained, task, caplog):
    with caplog.at_level("WARNING", logger="kdcompress"):
        prune(trained, ratio=PRUNE_RATIOS[-1], recovery_epochs=0, allocation="sensitivity",
              data=task)
    assert "top of the sensitivity ladder" in caplog.text


def test_sensitivity_allocation_rejects_global_pruning(trained, task):
    with pytest.raises(PipelineError, match="allocation='sensitivity' .* global_pruning=True"):
        prune(trained, ratio=0.3, allocation="sensitivity", global_pruning=True, data=task)
