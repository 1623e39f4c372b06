"""Sensitivity analysis: the incremental evaluation against brute force, files, bad input."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

from kdcompress import data
from kdcompress.analysis import Cell, Sensitivity, sensitivity
from kdcompress.analysis.sensitivity import prune_group, prune_groups
from kdcompress.errors import DataError, InputError, LayerError
from kdcompress.layers.tensorize import decompose_layer
from kdcompress.layers.tt import set_module
from kdcompress.metrics import count_macs


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        logits = torch.cat([model.eval()(x[i:i + 256]) for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).float().mean())


def _brute_force(model: nn.Module, task: data.Task, cell: Cell, samples: int
                 ) -> tuple[float, int | None]:
    """The cell's accuracy from a full forward pass of the whole changed model, and its MACs."""
    x, y = task.arrays("val")
    x, y = x[:samples], y[:samples]
    changed = _changed(model, cell, x)
    return _accuracy(changed, x, y), count_macs(changed, x[:1])


def _changed(model: nn.Module, cell: Cell, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` with the change of ``cell`` made the slow, obvious way."""
    if cell.kind == "prune":
        return prune_group(model, x[:2], cell.layer, cell.setting)
    new, _ = decompose_layer(model.get_submodule(cell.layer), method=cell.kind,
                             rank=cell.setting)
    return set_module(copy.deepcopy(model), cell.layer, new)


class Residual(nn.Module):
    """A skip connection, an in-place ReLU and a functional in-place add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem(x))
        y = self.bn(self.conv(x))
        y += x
        y = torch.nn.functional.max_pool2d(self.relu(y), 2)
        return self.fc2(torch.relu(self.fc1(y.flatten(1))))


class Branchy(Residual):
    """Control flow on the data: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = x * 1.0
        return super().forward(x)


@pytest.fixture(scope="module")
def residual(digits_task: data.Task) -> nn.Module:
    from kdcompress.stages import train

    torch.manual_seed(0)
    return train(Residual(), epochs=2, data=digits_task)


def _check_cells(model: nn.Module, task: data.Task, result: Sensitivity) -> None:
    assert result.cells
    x, y = task.arrays("val")
    assert result.baseline == pytest.approx(_accuracy(model, x[:result.samples],
                                                      y[:result.samples]), abs=1e-6)
    for cell in result.cells:
        expected, macs = _brute_force(model, task, cell, result.samples)
        assert cell.macs == macs, cell
        assert cell.accuracy == pytest.approx(expected, abs=1e-6), cell
        assert cell.drop == pytest.approx(100 * (result.baseline - expected), abs=1e-3)


def test_cnn_matches_brute_force(trained_cnn, digits_task):
    result = sensitivity(trained_cnn, digits_task, kinds=("tt", "svd", "prune"),
                         ranks=(1, 4, 16), ratios=(0.3, 0.7), samples=150,
                         layers=[nn.Linear, nn.Conv2d])
    assert result.incremental
    kinds = {c.kind for c in result.cells}
    assert kinds == {"tt", "svd", "prune"}
    assert set(result.layers("prune")) == {"features.conv1", "features.conv2",
                                           "features.conv3", "classifier.fc1"}
    assert "classifier.fc2" not in result.layers("prune")  # the output layer is never pruned
    # some cell must actually hurt, or the comparison would prove nothing
    assert max(c.drop for c in result.cells) > 10
    _check_cells(trained_cnn, digits_task, result)


def test_residual_inplace_matches_brute_force(residual, digits_task):
    result = sensitivity(residual, digits_task, kinds=("svd", "prune"), ranks=(1, 2),
                         ratios=(0.5,), samples=300, layers=[nn.Linear, nn.Conv2d])
    assert result.incremental
    # the skip connection ties stem and conv's outputs into one group
    assert any({"stem", "conv"} <= set(m) for m in prune_groups(
        residual, torch.zeros(2, 1, 8, 8)).values())
    _check_cells(residual, digits_task, result)


def test_untraceable_model_says_so(digits_task, caplog):
    torch.manual_seed(0)
    model = Branchy().eval()
    with caplog.at_level(logging.WARNING, logger="kdcompress.analysis.record"):
        result = sensitivity(model, digits_task, kinds=("svd", "prune"), ranks=(2,),
                             ratios=(0.5,), samples=100, layers=["fc1", "conv"])
    assert not result.incremental
    assert "full forward pass" in caplog.text
    assert any("full forward pass" in n for n in result.notes)
    _check_cells(model, digits_task, result)


def test_prune_cell_equals_prune_stage(trained_cnn, digits_task):
    """One group at a ratio: the same channels as the prune stage with the others ignored."""
    from kdcompress.stages import prune

    x = digits_task.arrays("val")[0][:2]
    groups = prune_groups(trained_cnn, x)
    others = [r for r in groups if r != "features.conv2"]
    staged = prune(trained_cnn, ratio=0.5, recovery_epochs=0, ignored_layers=others,
                   data=digits_task)
    mine = prune_group(trained_cnn, x, "features.conv2", 0.5)
    a, b = staged.state_dict(), mine.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mine.features.conv2.out_channels < trained_cnn.features.conv2.out_channels


def test_cells_params_errors_and_curves(trained_cnn, digits_task):
    result = sensitivity(trained_cnn, digits_task, ranks=(64, 2, 1000), ratios=(0.5,),
                         samples=100, layers=["classifier.fc1", "features.conv2"])
    fc1 = trained_cnn.classifier.fc1
    dense = sum(p.numel() for p in trained_cnn.parameters())
    assert result.params == dense
    curve = result.curve("classifier.fc1", "tt")
    assert [c.setting for c in curve] == [2, 64]  # 1000 is above the layer's maximal rank
    for c in curve:
        new, rec = decompose_layer(fc1, rank=c.setting)
        assert c.params == dense - fc1.weight.numel() - fc1.bias.numel() + rec["params_after"]
        assert c.rel_error == pytest.approx(rec["rel_error"], abs=1e-5)
        assert c.latency_ms is not None and c.latency_ms > 0
        assert c.macs is not None
    assert curve[0].rel_error > curve[1].rel_error
    pruned = result.curve("features.conv2", "prune")[0]
    assert pruned.params < dense and pruned.macs < result.macs
    assert pruned.rel_error is None
    assert result.layers("tt") == ["classifier.fc1", "features.conv2"]
    assert result.layers("prune") == ["features.conv2", "classifier.fc1"]


def test_save_writes_json_markdown_and_heatmap(trained_cnn, digits_task, tmp_path):
    result = sensitivity(trained_cnn, digits_task, ranks=(2, 8), ratios=(0.3,), samples=60)
    paths = result.save(tmp_path / "out")
    assert set(paths) == {"json", "md", "png"}
    loaded = json.loads(paths["json"].read_text())
    again = Sensitivity.from_dict(loaded)
    assert again == result
    md = paths["md"].read_text()
    assert "## TT rank" in md and "## prune ratio" in md
    assert "| classifier.fc1 |" in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    no_plot = result.save(tmp_path / "np", plot=False)
    assert "png" not in no_plot and not (tmp_path / "np" / "sensitivity.png").exists()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kinds": ("tt", "cp")}, "unknown kind 'cp'"),
    ({"kinds": "tt"}, "list of names"),
    ({"ranks": (0, 2)}, "ranks must be integers >= 1"),
    ({"ranks": ()}, "ranks must be integers >= 1"),
    ({"ratios": (0.5, 1.0)}, r"ratios must lie in \(0, 1\)"),
    ({"samples": 0}, "samples must be an integer >= 1"),
    ({"method": "tucker"}, "method must be 'tt' or 'svd'"),
])
def test_bad_settings(trained_cnn, digits_task, kwargs, match):
    with pytest.raises(InputError, match=match):
        sensitivity(trained_cnn, digits_task, **kwargs)


def test_bad_layer_and_onnx_and_no_validation(trained_cnn, cnn_onnx, digits_task):
    with pytest.raises(LayerError, match="classifier.fc1"):
        sensitivity(trained_cnn, digits_task, layers=["classifier.fc"], samples=10)
    with pytest.raises(InputError, match="need a torch model.*OnnxModel"):
        sensitivity(cnn_onnx, digits_task, samples=10)
    x, y = digits_task.arrays("train")
    no_val = data.from_tensors(x, y, x[:10], y[:10], name="noval")
    assert no_val.val is None
    with pytest.raises(DataError, match="validation split.*x_val"):
        sensitivity(trained_cnn, no_val, samples=10)


def test_full_forward_option_gives_the_same_cells(residual, digits_task):
    kwargs = {"kinds": ("tt", "prune"), "ranks": (2,), "ratios": (0.5,), "samples": 120,
              "layers": ["fc1", "conv"]}
    fast = sensitivity(residual, digits_task, **kwargs)
    full = sensitivity(residual, digits_task, incremental=False, **kwargs)
    assert fast.incremental and not full.incremental
    assert not full.notes  # asked for, not a fallback
    assert len(fast.cells) == 3  # conv is no prune root: its channels are in stem's group

    def key(c: Cell) -> tuple:
        return c.layer, c.kind, c.setting, c.accuracy, c.params, c.macs, c.rel_error

    assert [key(c) for c in fast.cells] == [key(c) for c in full.cells]


def test_int8_cells_of_an_onnx_graph(cnn_onnx, digits_task, tmp_path):
    from kdcompress.analysis import int8_sensitivity
    from kdcompress.metrics import predict

    result = sensitivity(cnn_onnx, digits_task, kinds=("int8",), samples=100)
    direct = int8_sensitivity(cnn_onnx, digits_task, samples=100)
    assert result.kinds() == ["int8"] and len(result.cells) == len(direct) > 0
    assert [(c.layer, c.accuracy) for c in result.cells] == [(c.layer, c.accuracy)
                                                             for c in direct]
    x, y = digits_task.arrays("val")
    expected = float((predict(cnn_onnx, x[:100]).argmax(1) == y[:100]).float().mean())
    assert result.baseline == pytest.approx(expected, abs=1e-6)
    assert "## int8" in result.save(tmp_path, plot=False)["md"].read_text()


def recall_of_zero(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Recall of class 0: a metric that differs from top-1 accuracy."""
    zeros = labels == 0
    return float((logits.argmax(1)[zeros] == 0).float().mean()) if zeros.any() else 1.0


def test_cells_score_the_metric_they_are_given(trained_cnn, digits_task):
    x, y = digits_task.arrays("val")
    x, y = x[:150], y[:150]
    result = sensitivity(trained_cnn, digits_task, kinds=("tt", "prune"), ranks=(1, 4),
                         ratios=(0.7,), samples=150, layers=[nn.Linear, nn.Conv2d],
                         metric=recall_of_zero)
    top1 = sensitivity(trained_cnn, digits_task, kinds=("tt", "prune"), ranks=(1, 4),
                       ratios=(0.7,), samples=150, layers=[nn.Linear, nn.Conv2d])
    assert result.metric == "recall_of_zero" and top1.metric == "accuracy"
    with torch.no_grad():
        assert result.baseline == pytest.approx(recall_of_zero(trained_cnn.eval()(x), y),
                                                abs=1e-6)
    for cell in result.cells:  # each cell's metric from a full pass of the changed model
        changed = _changed(trained_cnn, cell, x)  # torch-pruning traces with autograd
        with torch.no_grad():
            expected = recall_of_zero(changed.eval()(x), y)
        assert cell.accuracy == pytest.approx(expected, abs=1e-6), cell
        assert cell.drop == pytest.approx(100 * (result.baseline - expected), abs=1e-3)
    # the metric was used, not top-1: some cell scores differently
    assert [c.accuracy for c in result.cells] != [c.accuracy for c in top1.cells]
