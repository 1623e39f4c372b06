"""Torch artifacts: a JSON recipe plus a weights-only state dict; nothing pickled is executed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kdcompress import models
from kdcompress.artifacts import load_module, module_spec, num_params, save_module
from kdcompress.errors import ArtifactError


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this calls _touch: what a malicious weights.pt would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def roundtrip(model: nn.Module, folder: Path, x: torch.Tensor) -> nn.Module:
    model.eval()
    save_module(model, folder)
    loaded = load_module(folder)
    assert type(loaded) is type(model)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert num_params(loaded) == num_params(model)
    return loaded


@pytest.mark.parametrize("spec", [models.cnn(width=8, hidden=16), models.mlp(hidden=(16, 8))])
def test_built_in_models_round_trip(spec, tmp_path):
    model = spec.build((1, 8, 8), 10)
    with torch.no_grad():  # non-default running stats must survive too
        model(torch.randn(16, 1, 8, 8) * 3)
    roundtrip(model, tmp_path, torch.randn(4, 1, 8, 8))


def test_hand_pruned_shapes_round_trip(tmp_path):
    model = models.cnn(width=8, hidden=16).build((1, 8, 8), 10)
    f, c = model.features, model.classifier
    keep = [0, 2, 5]  # conv3 keeps 3 of its 8 output channels; fc1 and bn3 follow
    f.conv3 = nn.Conv2d(8, 3, 3, padding=1, bias=False)
    f.bn3 = nn.BatchNorm2d(3)
    old_fc1 = c.fc1
    c.fc1 = nn.Linear(3 * 4 * 4, 5)
    with torch.no_grad():
        c.fc1.weight.copy_(old_fc1.weight.view(16, 8, 16)[:5, keep].reshape(5, -1))
    c.fc2 = nn.Linear(5, 10)
    loaded = roundtrip(model, tmp_path, torch.randn(3, 1, 8, 8))
    assert loaded.features.conv3.out_channels == 3
    assert loaded.classifier.fc1.in_features == 48 and loaded.classifier.fc1.out_features == 5


def test_class_defined_inside_a_function_is_refused(tmp_path):
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

    model = nn.Sequential(nn.Linear(2, 2), Local())
    with pytest.raises(ArtifactError, match=r"cannot save model\.1: its class "
                                            r".*<locals>\.Local is defined inside a function"):
        save_module(model, tmp_path)
    with pytest.raises(ArtifactError, match="defined inside a function"):
        module_spec(Local())


def test_unsupported_attribute_names_its_path(tmp_path):
    model = nn.Sequential(nn.Linear(2, 2))
    model[0].callback = object()
    with pytest.raises(ArtifactError, match=r"cannot save model\.0\.callback = <object"):
        save_module(model, tmp_path)


def test_recipe_naming_a_non_module_is_refused(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    recipe = json.loads((tmp_path / "module.json").read_text())
    recipe["class"] = "os:system"
    (tmp_path / "module.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="os:system is not an nn.Module subclass; refusing"):
        load_module(tmp_path)
    recipe["class"] = "kdcompress.nowhere:Thing"
    (tmp_path / "module.json").write_text(json.dumps(recipe))
    with pytest.raises(ArtifactError, match="cannot rebuild a module of class "
                                            "kdcompress.nowhere:Thing"):
        load_module(tmp_path)


def test_weights_are_loaded_without_running_pickled_code(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    marker = tmp_path / "marker.txt"
    state = {"weight": torch.zeros(2, 3), "bias": Payload(str(marker))}
    torch.save(state, tmp_path / "weights.pt")  # weights_only=False would run _touch
    with pytest.raises(ArtifactError, match="cannot load the torch model in"):
        load_module(tmp_path)
    assert not marker.exists()


def test_missing_or_incomplete_artifacts(tmp_path):
    with pytest.raises(ArtifactError, match="cannot load the torch model in"):
        load_module(tmp_path)
    save_module(nn.Linear(3, 2), tmp_path)
    torch.save({"weight": torch.zeros(2, 3)}, tmp_path / "weights.pt")
    with pytest.raises(ArtifactError, match="weights file has no tensor 'bias'"):
        load_module(tmp_path)
