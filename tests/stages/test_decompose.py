"""The decompose_tt stage and tensorize: layer choice, methods, ratio search, records, errors."""

from __future__ import annotations

import copy
import importlib
import itertools
import re

import numpy as np
import pytest
import torch
from torch import nn

from kdcompress import Pipeline, models
from kdcompress.context import StageContext
from kdcompress.data import from_tensors
from kdcompress.declare import spec_of
from kdcompress.errors import LayerError, PipelineError, StageError
from kdcompress.layers import TTConv2d, TTLinear, tensorize
from kdcompress.stages import train
from kdcompress.stages.decompose import decompose_tt


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 8 * 8, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ctx() -> StageContext:
    x, y = torch.randn(8, 1, 8, 8), torch.arange(8) % 2
    return StageContext.standalone("student", from_tensors(x, y, x, y))


def test_default_decomposes_linear_layers_and_records(net: Net) -> None:
    before = copy.deepcopy(net.state_dict())
    ctx = _ctx()
    student = decompose_tt(net, rank=4, ctx=ctx)
    assert isinstance(student.fc1, TTLinear) and isinstance(student.conv, nn.Conv2d)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # input intact
    records = ctx.details["layers"]
    assert [r["name"] for r in records] == ["fc1", "fc2"] if isinstance(student.fc2, TTLinear) \
        else [r["name"] for r in records] == ["fc1"]
    rec = records[0]
    assert set(rec) == {"name", "kind", "method", "in_modes", "out_modes", "ranks",
                        "params_before", "params_after", "rel_error"}
    assert rec["params_after"] == _params(student.fc1) < rec["params_before"] == _params(net.fc1)
    assert max(rec["ranks"]) == 4 and 0 < rec["rel_error"] < 1
    assert student(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_layer_named_by_type_that_does_not_shrink_is_decomposed_and_named(net: Net) -> None:
    # fc2 is 128 -> 10: SVD rank 10 holds 10 * 138 weights + 10 biases, more than its 1,290
    ctx = _ctx()
    student = decompose_tt(net, rank=16, method="svd", layers=[nn.Linear], ctx=ctx)
    grown = [r for r in ctx.details["layers"] if r["params_after"] >= r["params_before"]]
    assert [r["name"] for r in grown] == ["fc2"] and isinstance(student.fc2, nn.Sequential)
    assert grown[0]["params_after"] == _params(student.fc2) > _params(net.fc2)
    [warning] = [w for w in ctx.warnings if "no smaller" in w]
    assert "'fc2' (1,290 -> 1,390 parameters as svd ranks [10])" in warning
    assert "fc1" not in warning and "layers=None" in warning
    ctx = _ctx()  # layers=None skips such a layer, and there is nothing to warn of
    student = decompose_tt(net, rank=16, method="svd", ctx=ctx)
    assert isinstance(student.fc2, nn.Linear)
    assert not any("no smaller" in w for w in ctx.warnings)


def test_full_rank_tt_model_is_exact(net: Net) -> None:
    model = copy.deepcopy(net).double()
    exact, records = tensorize(model, layers=["fc1", nn.Conv2d])
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    assert isinstance(exact.conv2, TTConv2d)
    assert torch.allclose(exact(x), model(x), atol=1e-10)
    assert all(r["rel_error"] < 1e-12 for r in records)


@pytest.mark.parametrize("method", ["svd", "tucker"])
def test_svd_and_tucker_methods(net: Net, method: str) -> None:
    model, records = tensorize(net, layers=["fc1", "conv2"], method=method, rank=4)
    kinds = {r["name"]: r["kind"] for r in records}
    assert kinds == {"fc1": "svd", "conv2": method}
    assert all(r["params_after"] < r["params_before"] for r in records)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    full, records = tensorize(copy.deepcopy(net).double(), layers=["conv2"], method=method)
    assert records[0]["rel_error"] < 1e-10


def test_ratio_reaches_target_with_least_error() -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    ctx = _ctx()
    student = decompose_tt(mlp, ratio=5, ctx=ctx)
    assert _params(mlp) / _params(student) >= 5
    searched = sum(r["rel_error"] ** 2 for r in ctx.details["layers"])
    for rank in (1, 2, 3, 4):  # any uniform rank that also reaches 5x has a larger error
        uniform, records = tensorize(mlp, rank=rank)
        if _params(mlp) / _params(uniform) >= 5:
            assert searched <= sum(r["rel_error"] ** 2 for r in records) + 1e-9
    with pytest.raises(LayerError, match="largest reachable ratio"):
        decompose_tt(mlp, ratio=1000, layers=["2"])


def test_tol_per_layer(net: Net) -> None:
    _, records = tensorize(net, layers=["fc1"], tol=0.5)
    assert records[0]["rel_error"] <= 0.5


def test_errors_name_layer_and_fix(net: Net) -> None:
    with pytest.raises(LayerError, match="no layer 'fc3'. Did you mean 'fc2'"):
        decompose_tt(net, layers=["fc3"])
    with pytest.raises(LayerError, match=r"'fc1' \(Linear with weight \(128, 1024\)\).*>= 1"):
        tensorize(net, rank=0, layers=["fc1"])
    with pytest.raises(LayerError, match="method must be one of"):
        tensorize(net, method="cp")
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LayerError, match="groups=2"):
        decompose_tt(grouped, layers=["0"])
    with pytest.raises(LayerError, match=r"grouped or depthwise convolutions \(0\)"):
        decompose_tt(grouped, layers=[nn.Conv2d])


RANK_RULE = "rank must be an integer >= 1 or a list of them (one per inner TT rank), but got "
BAD_SETTINGS = [
    ({"rank": 0}, RANK_RULE + "0"),
    ({"rank": [4, 0, 4]}, RANK_RULE + "[4, 0, 4]"),
    ({"rank": []}, RANK_RULE + "[]"),
    ({"rank": 2.5}, RANK_RULE + "2.5"),
    ({"rank": True}, RANK_RULE + "True"),
    ({"tol": 1.5}, "tol must be < 1, but got 1.5"),
    ({"tol": -0.1}, "tol must be >= 0, but got -0.1"),
    ({"ratio": 0.5}, "ratio must be > 1, but got 0.5"),
    ({"ratio": "5x"}, "ratio must be a number, got '5x'"),
    ({"method": "tuker"}, "method must be one of 'tt', 'svd', 'tucker', 'auto', but got 'tuker'. "
                          "Did you mean 'tucker'?"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_bad_setting_fails_at_declaration_and_on_direct_call(net: Net, kwargs: dict,
                                                             message: str) -> None:
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError,
                       match=r"^stage 's' \(decompose_tt\): " + re.escape(message) + "$"):
        pipeline.stage(decompose_tt, out="s", model=teacher, **kwargs)
    assert "s" not in pipeline.stages
    with pytest.raises(PipelineError, match="^decompose_tt: " + re.escape(message) + "$"):
        decompose_tt(net, **kwargs)


@pytest.mark.parametrize("kwargs", [{"rank": 4}, {"rank": np.int64(4)}, {"rank": [2, 3]},
                                    {"rank": (2, 3)}, {"rank": None}, {"tol": 0.0},
                                    {"tol": 0.3}, {"ratio": 1.5}, {"ratio": 20},
                                    {"method": "svd"}])
def test_declaration_accepts_every_documented_form(kwargs: dict) -> None:
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    pipeline.stage(decompose_tt, out="s", model=teacher, **kwargs)
    assert spec_of(decompose_tt).role == "decompose" and spec_of(decompose_tt).compresses


def test_rank_list_on_a_direct_call_is_used(net: Net) -> None:
    ctx = _ctx()
    decompose_tt(net, rank=[2, 3], layers=["fc2"], ctx=ctx)
    assert ctx.details["layers"][0]["ranks"] == [1, 2, 3, 1]


def test_tensorize_takes_a_rank_per_layer(net: Net) -> None:
    model, records = tensorize(net, rank={"fc1": 2, "conv2": 4})
    assert [r["name"] for r in records] == ["fc1", "conv2"]  # exactly the named layers
    assert max(records[0]["ranks"]) == 2 and max(records[1]["ranks"]) == 4
    assert isinstance(model.fc1, TTLinear) and isinstance(model.conv2, TTConv2d)
    assert type(model.fc2) is nn.Linear and type(model.conv) is nn.Conv2d
    alone, rec = tensorize(net, layers=["fc1"], rank=2)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.fc1.full_weight(), alone.fc1.full_weight())
    assert model(x).shape == (2, 10)
    with pytest.raises(LayerError, match="no layer 'fc3'. Did you mean 'fc2'"):
        tensorize(net, rank={"fc3": 2})
    with pytest.raises(LayerError, match=r"rank names layer\(s\) \['conv2'\] that layers="):
        tensorize(net, layers=[nn.Linear], rank={"conv2": 2})


# ----------------------------------------------------------------------------------------------
# budget: ranks per layer from the validation sensitivity


@pytest.fixture
def spy_sensitivity(monkeypatch: pytest.MonkeyPatch) -> list:
    """Every Sensitivity the stage computes, so a test can check the allocation against it."""
    module = importlib.import_module("kdcompress.analysis.sensitivity")  # not the function

    seen: list = []
    real = module.sensitivity

    def spy(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(module, "sensitivity", spy)
    return seen


def _budget_options(sens, rows: list[dict], by: str) -> dict[str, list[tuple]]:
    """(rank, cost, drop) per layer, rebuilt from the sensitivity cells: dense, or a cheaper TT."""
    base = sens.params if by == "params" else sens.macs
    options = {}
    for row in rows:
        dense = row[by] if row["rank"] == "dense" else None
        cells = sens.curve(row["name"], "tt")
        if dense is None:  # the chosen cell tells the dense cost
            cell = next(c for c in cells if c.setting == row["rank"])
            dense = row[by] - ((cell.params if by == "params" else cell.macs) - base)
        options[row["name"]] = [("dense", dense, 0.0)] + [
            (c.setting, dense + (c.params if by == "params" else c.macs) - base, max(c.drop, 0))
            for c in cells if (c.params if by == "params" else c.macs) - base < 0]
    return options


def test_budget_in_params_is_met_with_the_least_predicted_drop(trained_cnn, digits_task,
                                                               spy_sensitivity) -> None:
    ctx = StageContext.standalone("student", digits_task)
    total = _params(trained_cnn)
    student = decompose_tt(trained_cnn, budget=0.5, ctx=ctx)
    summary, rows = ctx.details["budget"], ctx.details["layers"]
    target = int(0.5 * total)
    assert summary["target"] == target and summary["total_before"] == total
    assert _params(student) == summary["total_after"] <= target and summary["met"]
    # brute force over every allocation the ladder offers: none predicts a smaller drop
    sens = spy_sensitivity[-1]
    options = _budget_options(sens, rows, "params")
    fixed = total - sum(opts[0][1] for opts in options.values())
    feasible = [combo for combo in itertools.product(*options.values())
                if fixed + sum(o[1] for o in combo) <= target]
    best = min(sum(o[2] for o in combo) for combo in feasible)
    assert summary["predicted_drop"] == pytest.approx(best, abs=1e-6)
    assert sum(r["predicted_drop"] for r in rows) == pytest.approx(best, abs=1e-6)
    # within one rank step: no layer can take its next cheaper-than-dense option in the budget
    # and lower the predicted drop
    used = summary["total_after"]
    for row in rows:
        here = next(o for o in options[row["name"]] if o[0] == row.get("ladder_rank", row["rank"]))
        assert not any(o[2] < here[2] and used - here[1] + o[1] <= target
                       for o in options[row["name"]])
    decomposed = {r["name"]: r for r in rows if r["rank"] != "dense"}
    assert decomposed and all(max(r["ranks"]) <= r["rank"] for r in decomposed.values())
    assert isinstance(student.classifier.fc1, TTLinear)
    # the prediction is the sensitivity of each layer alone, here measured on the same samples
    assert summary["samples"] == sens.samples and summary["baseline_accuracy"] == sens.baseline


def test_budget_with_method_auto_picks_tt_or_svd_per_layer(trained_cnn, digits_task,
                                                           spy_sensitivity) -> None:
    """Both curves are measured; the allocation is the least predicted drop over every
    (method, rank) of every layer, and each layer gets the factorisation it chose."""
    ctx = StageContext.standalone("student", digits_task)
    total = _params(trained_cnn)
    target = int(0.3 * total)
    student = decompose_tt(trained_cnn, budget=0.3, method="auto", ctx=ctx)
    summary, rows = ctx.details["budget"], ctx.details["layers"]
    sens = spy_sensitivity[-1]
    assert summary["method"] == "auto" and {c.kind for c in sens.cells} == {"tt", "svd"}
    assert _params(student) == summary["total_after"] <= target
    dense = {name: sum(p.numel() for p in trained_cnn.get_submodule(name).parameters())
             for name in (r["name"] for r in rows)}
    options = {name: [("dense", cost, 0.0)] + [
        ((kind, c.setting), cost + c.params - sens.params, max(c.drop, 0.0))
        for kind in ("tt", "svd") for c in sens.curve(name, kind) if c.params < sens.params]
        for name, cost in dense.items()}
    fixed = total - sum(dense.values())
    best = min(sum(o[2] for o in combo) for combo in itertools.product(*options.values())
               if fixed + sum(o[1] for o in combo) <= target)
    assert summary["predicted_drop"] == pytest.approx(best, abs=1e-6)
    assert any(r.get("method") == "svd" for r in rows)  # on this model SVD wins somewhere
    kinds = {TTLinear: "tt", nn.Sequential: "svd"}  # SVD: Linear(in, r) -> Linear(r, out)
    for row in rows:
        layer = student.get_submodule(row["name"])
        if row["rank"] == "dense":
            assert isinstance(layer, nn.Linear)
        else:
            assert kinds[type(layer)] == row["method"] and max(row["ranks"]) <= row["rank"]
    assert student(digits_task.example(2).float()).shape == (2, 10)


def test_budget_raises_ranks_into_the_room_the_ladder_leaves(trained_cnn, digits_task,
                                                            spy_sensitivity) -> None:
    """The ladder holds 12 and 16; a budget with room for SVD rank 14 on fc1 gets rank 14 (the
    allocation's 12, raised), one below it gets 13, and the predicted drop stays rank 12's."""
    from kdcompress.layers import decompose_layer

    fc1 = trained_cnn.get_submodule("classifier.fc1")
    assert fc1.in_features > 16 and fc1.out_features > 16  # ranks up to 16 exist

    def cost(rank: int) -> int:
        layer, _ = decompose_layer(fc1, method="svd", rank=rank, name="classifier.fc1")
        return sum(p.numel() for p in layer.parameters())

    fixed = _params(trained_cnn) - sum(p.numel() for p in fc1.parameters())
    for room, expected in ((cost(14), 14), (cost(14) - 1, 13), (cost(12), 12)):
        ctx = StageContext.standalone("student", digits_task)
        student = decompose_tt(trained_cnn, budget=fixed + room, method="svd",
                               layers=["classifier.fc1"], ctx=ctx)
        (row,) = ctx.details["layers"]
        summary = ctx.details["budget"]
        assert (row["ladder_rank"], row["rank"], row["ranks"]) == (12, expected, [expected])
        assert _params(student) == summary["total_after"] == fixed + cost(expected)
        assert summary["total_after"] <= summary["target"] and summary["met"]
        rank12 = next(c for c in spy_sensitivity[-1].curve("classifier.fc1", "svd")
                      if c.setting == 12)
        assert row["predicted_drop"] == pytest.approx(max(rank12.drop, 0.0), abs=1e-4)


def test_budget_in_macs_over_convolutions(trained_cnn, digits_task) -> None:
    from kdcompress.metrics import count_macs

    x = digits_task.example(1).float()
    macs = count_macs(trained_cnn, x)
    ctx = StageContext.standalone("student", digits_task)
    student = decompose_tt(trained_cnn, budget=int(0.85 * macs), budget_by="macs",
                           layers=[nn.Conv2d, nn.Linear], ctx=ctx)
    summary = ctx.details["budget"]
    assert summary["by"] == "macs" and summary["target"] == int(0.85 * macs)
    assert count_macs(student, x) == summary["total_after"] <= summary["target"]
    assert {r["name"] for r in ctx.details["layers"]} >= {"features.conv2", "classifier.fc1"}
    assert student(x).shape == (1, 10)


def test_budget_errors_come_before_any_analysis(trained_cnn, digits_task, monkeypatch) -> None:
    module = importlib.import_module("kdcompress.analysis.sensitivity")  # not the function

    def fail(*args, **kwargs):
        raise AssertionError("the sensitivity analysis ran")

    monkeypatch.setattr(module, "sensitivity", fail)
    total = _params(trained_cnn)
    with pytest.raises(LayerError, match=rf"budget={total + 1} params is larger than the model "
                                         rf"\({total} params\)"):
        decompose_tt(trained_cnn, budget=total + 1, data=digits_task)
    with pytest.raises(LayerError, match=r"budget=0.01 allows 207 params, below what the rank "
                                         r"ladder reaches: \d+ to 20706 params"):
        decompose_tt(trained_cnn, budget=0.01, data=digits_task)
    with pytest.raises(PipelineError, match="give budget or ratio, not both"):
        decompose_tt(trained_cnn, budget=0.5, ratio=4, data=digits_task)
    with pytest.raises(PipelineError, match="method 'tt', 'svd' or 'auto' \\(either, per "
                                            "layer\\), but got method='tucker'"):
        decompose_tt(trained_cnn, budget=0.5, method="tucker", data=digits_task)
    with pytest.raises(PipelineError, match="method='auto' picks TT or SVD per layer from the "
                                            "sensitivity curves of a budget: give budget="):
        decompose_tt(trained_cnn, method="auto", data=digits_task)
    with pytest.raises(StageError, match="pass data="):
        decompose_tt(trained_cnn, budget=0.5)


BAD_BUDGETS = [
    ({"budget": 2.5}, "budget is a fraction of the model (0 < budget <= 1) or a whole count "
                      "(> 1), but got 2.5; for a compression factor use ratio=2.5"),
    ({"budget": 0}, "budget must be a finite number > 0, but got 0"),
    ({"budget": "25%"}, "budget must be a number, got '25%'"),
    ({"budget_by": "flops"}, "budget_by must be one of 'params', 'macs', but got 'flops'"),
]


@pytest.mark.parametrize("kwargs, message", BAD_BUDGETS)
def test_bad_budget_fails_at_declaration(net: Net, kwargs: dict, message: str) -> None:
    pipeline = Pipeline("p")
    teacher = pipeline.stage(train, out="teacher", model=models.cnn(width=8), epochs=1)
    with pytest.raises(PipelineError,
                       match=r"^stage 's' \(decompose_tt\): " + re.escape(message)):
        pipeline.stage(decompose_tt, out="s", model=teacher, **kwargs)
    with pytest.raises(PipelineError, match="^decompose_tt: " + re.escape(message)):
        decompose_tt(net, **kwargs)
    pipeline.stage(decompose_tt, out="ok", model=teacher, budget=0.25, budget_by="macs")
    pipeline.stage(decompose_tt, out="ok2", model=teacher, budget=60_000)
