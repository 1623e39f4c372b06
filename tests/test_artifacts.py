"""Torch artifacts: a JSON recipe plus safetensors weights; nothing in a run folder executes."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from kdcompress import models
from kdcompress.artifacts import (
    RECIPE_FILE,
    WEIGHTS_FILE,
    build_module,
    load_module,
    module_spec,
    num_params,
    save_module,
)
from kdcompress.errors import ArtifactError
from kdcompress.layers.tensorize import tensorize
from kdcompress.layers.tt import TTConv2d, TTLinear


class Scaled(nn.Module):
    """A user's own layer, from a module that is imported (this test module)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.scale = 0.5
        self.shape = (features,)
        self.dtype = torch.float64
        self.fc = nn.Linear(features, features)
        self.register_buffer("offset", torch.arange(features, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale + self.offset.to(self.dtype).float()


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this calls _touch: what a malicious pickle would do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


def roundtrip(model: nn.Module, folder: Path, x: torch.Tensor) -> nn.Module:
    model.eval()
    save_module(model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["module.json", "weights.safetensors"]
    header, _ = read_header(folder / "weights.safetensors")
    assert set(header) - {"__metadata__"} <= set(model.state_dict())
    loaded = load_module(folder)
    assert type(loaded) is type(model)
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert num_params(loaded) == num_params(model)
    return loaded


def edit_recipe(folder: Path, edit) -> Path:
    """Apply ``edit`` to the saved recipe (a dict, edited in place) and write it back."""
    path = folder / RECIPE_FILE
    recipe = json.loads(path.read_text())
    edit(recipe)
    path.write_text(json.dumps(recipe))
    return path


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors header (JSON after a little-endian u64 length) and the data's length."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), len(raw) - 8 - length


# ---- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [models.cnn(width=8, hidden=16), models.mlp(hidden=(16, 8))])
def test_built_in_models_round_trip(spec, tmp_path):
    model = spec.build((1, 8, 8), 10)
    with torch.no_grad():  # non-default running stats must survive too
        model(torch.randn(16, 1, 8, 8) * 3)
    roundtrip(model, tmp_path, torch.randn(4, 1, 8, 8))


def test_tt_decomposed_model_round_trips(tmp_path):
    model = models.cnn(width=8, hidden=16).build((1, 8, 8), 10)
    tt, _ = tensorize(model, layers=[nn.Linear, nn.Conv2d], rank=3)
    loaded = roundtrip(tt, tmp_path, torch.randn(4, 1, 8, 8))
    assert isinstance(loaded.features.conv2, TTConv2d)
    assert isinstance(loaded.classifier.fc1, TTLinear)
    assert loaded.classifier.fc1.in_modes == tt.classifier.fc1.in_modes
    assert loaded.features.conv2.ranks == tt.features.conv2.ranks


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


def test_tied_weights_round_trip_tied(tmp_path):
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6))
    model[2].weight = model[0].weight  # tied: safetensors refuses shared storage as is
    loaded = roundtrip(model, tmp_path, torch.randn(2, 6))
    assert loaded[2].weight is loaded[0].weight
    header, _ = read_header(tmp_path / WEIGHTS_FILE)
    assert "2.weight" not in header and header["0.weight"]["shape"] == [6, 6]
    assert json.loads(header["__metadata__"]["kdcompress.tied"]) == {"2.weight": "0.weight"}


def test_partly_overlapping_tensors_are_stored_apart(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():  # the second weight is a view of the first one's rows
        model[1].weight = nn.Parameter(model[0].weight[:2])
    loaded = roundtrip(model, tmp_path, torch.randn(3, 4))
    assert loaded[1].weight is not loaded[0].weight


def test_channels_last_weights_round_trip(tmp_path):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    model = model.to(memory_format=torch.channels_last)  # strided, not contiguous
    save_module(model, tmp_path)
    loaded = load_module(tmp_path)
    torch.testing.assert_close(loaded[0].weight, model[0].weight, rtol=0, atol=0)
    x = torch.randn(2, 2, 6, 6)
    torch.testing.assert_close(loaded(x), model(x))  # another conv kernel: not bit-identical


def test_class_from_an_imported_module_loads(tmp_path):
    model = Scaled(3)
    loaded = roundtrip(model, tmp_path, torch.randn(2, 3))
    assert isinstance(loaded, Scaled) and loaded.dtype is torch.float64 and loaded.shape == (3,)
    loaded = load_module(tmp_path, trusted_modules={__name__})
    assert isinstance(loaded, Scaled)


def test_build_module_from_a_state_dict():
    model = Scaled(2).eval()
    rebuilt = build_module(module_spec(model), model.state_dict()).eval()
    x = torch.randn(4, 2)
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_weights_file_is_safetensors(tmp_path):
    model = models.cnn(width=8, hidden=16).build((1, 8, 8), 10)
    save_module(model, tmp_path)
    assert WEIGHTS_FILE == "weights.safetensors" and not (tmp_path / "weights.pt").exists()
    header, data_bytes = read_header(tmp_path / WEIGHTS_FILE)
    header.pop("__metadata__", None)
    state = model.state_dict()
    assert set(header) == set(state)
    for key, tensor in state.items():
        assert header[key]["shape"] == list(tensor.shape), key
    assert header["features.conv1.weight"]["dtype"] == "F32"
    assert header["features.bn1.num_batches_tracked"]["dtype"] == "I64"
    assert data_bytes == max(entry["data_offsets"][1] for entry in header.values())


def test_save_flushes_and_fsyncs_both_files(tmp_path, monkeypatch):
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    save_module(nn.Linear(3, 2), tmp_path / "stage")
    names = [Path(p).name for p in synced]
    assert any(WEIGHTS_FILE in n for n in names) and any(RECIPE_FILE in n for n in names)
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [RECIPE_FILE, WEIGHTS_FILE]


# ---- what a recipe may name -----------------------------------------------------------------


PAYLOAD = """\
import pathlib
pathlib.Path({marker!r}).write_text("imported")

import torch.nn


class Evil(torch.nn.Module):
    pass
"""


@pytest.mark.parametrize("name", ["evil_payload:Evil", "evil_payload.sub:Evil",
                                  "kdcompress.evil_payload:Evil", "torch.evil_payload:Evil",
                                  ".evil_payload:Evil", "evil_payload:Evil:x"])
def test_recipe_naming_an_unimported_module_imports_nothing(name, tmp_path, monkeypatch):
    marker = tmp_path / "marker.txt"
    sandbox = tmp_path / "on_sys_path"
    sandbox.mkdir()
    (sandbox / "evil_payload.py").write_text(PAYLOAD.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(sandbox))
    folder = tmp_path / "stage"
    save_module(nn.Linear(3, 2), folder)
    recipe = edit_recipe(folder, lambda r: r.update({"class": name}))
    try:
        with pytest.raises(ArtifactError, match=re.escape(str(recipe))) as info:
            load_module(folder)
        assert "evil_payload" not in sys.modules and not marker.exists()
    finally:
        sys.modules.pop("evil_payload", None)
    assert name in str(info.value)


def test_unimported_module_message_says_how_to_fix(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    recipe = edit_recipe(tmp_path, lambda r: r.update({"class": "evil_payload:Evil"}))
    with pytest.raises(ArtifactError, match=re.escape(f"{recipe}: model names class "
                                                      "evil_payload:Evil, but module evil_payload "
                                                      "is not imported")
                       + r".*import the module that defines Evil in the pipeline file"):
        load_module(tmp_path)


def test_trusted_modules_narrows_the_imported_modules(tmp_path):
    save_module(nn.Sequential(Scaled(2)), tmp_path)
    with pytest.raises(ArtifactError, match=r"model\.0 names class .*:Scaled, but module "
                                            r".* was not imported when the run began"):
        load_module(tmp_path, trusted_modules=())
    assert isinstance(load_module(tmp_path, trusted_modules={__name__})[0], Scaled)
    save_module(nn.Sequential(nn.Linear(2, 2)), tmp_path / "torch_only")
    load_module(tmp_path / "torch_only", trusted_modules=())  # torch is always trusted


def test_trusted_package_modules_meant_to_run_are_not_imported(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    edit_recipe(tmp_path, lambda r: r.update({"class": "kdcompress.__main__:Main"}))
    with pytest.raises(ArtifactError, match="refusing to import kdcompress.__main__"):
        load_module(tmp_path)
    assert "kdcompress.__main__" not in sys.modules


@pytest.mark.parametrize("name, message", [
    ("os:system", "os:system is not an nn.Module subclass; refusing"),
    ("builtins:eval", "builtins:eval is not an nn.Module subclass; refusing"),
    ("kdcompress.artifacts:nn.Linear", "is not an nn.Module subclass"),  # through a module
    ("torch.nn:Linear", "is another name for torch.nn.modules.linear:Linear"),
    ("kdcompress.nowhere:Thing", "cannot rebuild model, a module of class "
                                 "kdcompress.nowhere:Thing"),
    ("torch.nn.modules.linear:Missing", "torch.nn.modules.linear has no Missing"),
    ("torch.nn.modules.linear:Linear.<locals>.X", "is not a 'package.module:QualName' name"),
])
def test_recipe_naming_a_non_module_is_refused(name, message, tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    recipe = edit_recipe(tmp_path, lambda r: r.update({"class": name}))
    with pytest.raises(ArtifactError, match=re.escape(str(recipe)) + ".*" + re.escape(message)):
        load_module(tmp_path)


# ---- what a recipe may hold -----------------------------------------------------------------


@pytest.mark.parametrize("value, message", [
    ({"__dtype__": "load"}, "'load' is not a torch dtype"),
    ({"__dtype__": "nn"}, "'nn' is not a torch dtype"),
    ({"__dtype__": ["float32"]}, "is not a torch dtype"),
    ({"__size__": ["a"]}, "a __size__ is a list of sizes"),
    ({"__size__": [True]}, "a __size__ is a list of sizes"),
    ({"__tuple__": "abc"}, "is not an attribute value"),
    ({"__dict__": [1]}, "is not an attribute value"),
    ({"__tuple__": [], "__size__": []}, "is not an attribute value"),
    ({"plain": 1}, "is not an attribute value"),
])
def test_encoded_attributes_accept_only_their_type(value, message, tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    recipe = edit_recipe(tmp_path, lambda r: r["attrs"].update({"extra": value}))
    with pytest.raises(ArtifactError, match=re.escape(f"{recipe}: model.extra") + ".*"
                                            + re.escape(message)):
        load_module(tmp_path)


def _drop(key):
    return lambda r: r.pop(key)


def _set(key, value):
    return lambda r: r.update({key: value})


@pytest.mark.parametrize("edit, message", [
    (_drop("parameters"), "must be an object with the keys"),
    (_set("surprise", 1), "must be an object with the keys"),
    (_set("class", 5), "is not a 'package.module:QualName' name"),
    (_set("parameters", ["weight"]), "\"parameters\" must be an object"),
    (_set("parameters", {"weight": "yes", "bias": True}), "must hold bool"),
    (_set("parameters", {"a.b": True}), "has the name 'a.b'"),
    (_set("buffers", {"weight": True}), "used twice"),
    (_set("children", {"x": 3}), "must hold dict or NoneType"),
    (_set("non_persistent", "weight"), "\"non_persistent\" must list buffer names"),
    (lambda r: r["attrs"].update({"__dict__": {"__dict__": {}}}), "not attributes that"),
    (lambda r: r["attrs"].update({"_forward_hooks": {"__dict__": {}}}), "not attributes that"),
    (lambda r: r["attrs"].update({"weight": 1}), "used twice"),
    (lambda r: r.update({"children": {"c": {"class": "torch.nn.modules.linear:Linear"}}}),
     r"model\.c must be an object with the keys"),
])
def test_malformed_recipe_is_an_artifact_error_naming_it(edit, message, tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    recipe = edit_recipe(tmp_path, edit)
    with pytest.raises(ArtifactError, match=re.escape(str(recipe)) + ".*" + message):
        load_module(tmp_path)


def test_recipe_that_is_not_an_object_is_refused(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    (tmp_path / RECIPE_FILE).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"model must be an object with the keys"):
        load_module(tmp_path)
    (tmp_path / RECIPE_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match=re.escape(f"cannot read {tmp_path / RECIPE_FILE}")):
        load_module(tmp_path)


# ---- what the weights file may hold ---------------------------------------------------------


@pytest.mark.parametrize("cut", [-7, 20, 4, 0])
def test_truncated_weights_file_names_it(cut, tmp_path):
    save_module(models.mlp(hidden=(16, 8)).build((1, 8, 8), 10), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(ArtifactError, match=re.escape(f"{path} is not a complete safetensors "
                                                      "file")):
        load_module(tmp_path)


def test_corrupt_weights_file_names_it(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(ArtifactError, match=re.escape(f"{path} is not a complete")):
        load_module(tmp_path)


def test_corrupt_tied_keys_are_refused(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    state = safetensors.torch.load_file(path)
    safetensors.torch.save_file(state, path, metadata={"kdcompress.tied": '{"x": "nowhere"}'})
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: its metadata 'kdcompress.tied'")):
        load_module(tmp_path)


def test_loaded_weights_do_not_change_with_the_file(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    loaded = load_module(tmp_path)
    before = loaded.weight.detach().clone()
    path = tmp_path / WEIGHTS_FILE
    with open(path, "r+b") as f:  # rewritten in place, not replaced
        f.write(b"\0" * path.stat().st_size)
    torch.testing.assert_close(loaded.weight.detach(), before, rtol=0, atol=0)


def test_pickled_weights_are_never_unpickled(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    marker = tmp_path / "marker.txt"
    state = {"weight": torch.zeros(2, 3), "bias": Payload(str(marker))}
    torch.save(state, tmp_path / WEIGHTS_FILE)  # a pickle where safetensors belongs
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ArtifactError, match="is not a complete safetensors file"):
        load_module(tmp_path)
    assert not marker.exists()


def test_old_weights_pt_folder_says_how_to_recompute(tmp_path):
    save_module(nn.Linear(3, 2), tmp_path)
    (tmp_path / WEIGHTS_FILE).rename(tmp_path / "weights.pt")
    with pytest.raises(ArtifactError, match="weights.pt, written by an older kdcompress.*"
                                            "delete the folder"):
        load_module(tmp_path)


def test_weights_must_fit_the_recipe(tmp_path):
    with pytest.raises(ArtifactError, match="cannot load the torch model in"):
        load_module(tmp_path)
    save_module(nn.Linear(3, 2), tmp_path)
    path = tmp_path / WEIGHTS_FILE
    safetensors.torch.save_file({"weight": torch.zeros(2, 3)}, path)
    with pytest.raises(ArtifactError, match=re.escape(f"{path} has no tensor 'bias', which "
                                                      f"{tmp_path / RECIPE_FILE} needs")):
        load_module(tmp_path)
    safetensors.torch.save_file({"weight": torch.zeros(2, 5), "bias": torch.zeros(2)}, path)
    with pytest.raises(ArtifactError, match=r"tensor 'weight' has shape \(2, 5\), but .* builds "
                                            r"model\.weight with shape \(2, 3\)"):
        load_module(tmp_path)
    safetensors.torch.save_file({"weight": torch.zeros(2, 3), "bias": torch.zeros(2),
                                 "stowaway": torch.zeros(1)}, path)
    with pytest.raises(ArtifactError, match=r"holds 1 tensor\(s\) that .* does not use: "
                                            r"'stowaway'"):
        load_module(tmp_path)


def test_tt_core_shapes_are_checked(tmp_path):
    layer = TTLinear.from_linear(nn.Linear(16, 12), rank=2)
    save_module(layer, tmp_path)
    path = tmp_path / WEIGHTS_FILE
    state = safetensors.torch.load_file(path)
    state["core0"] = torch.zeros(1, 9, 9, 2)
    safetensors.torch.save_file(state, path)
    with pytest.raises(ArtifactError, match=r"tensor 'core0' has shape \(1, 9, 9, 2\)"):
        load_module(tmp_path)


# ---- what cannot be saved -------------------------------------------------------------------


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


def _gathering_tt(index: list[int]) -> TTLinear:
    """TTLinear(6 -> 4) over a padded input of 8 that gathers its inputs through ``index``."""
    layer = TTLinear(6, 4, in_modes=(2, 4), out_modes=(2, 2), ranks=(1, 2, 1))
    layer.input_index = torch.tensor(index, dtype=torch.int32)
    return layer


@pytest.mark.parametrize("index", [[0, 1, 2, 3, 4, 5, 6, 6], [0, 2, 1, 3]])  # per feature, block
def test_a_gathering_tt_layer_round_trips(index, tmp_path):
    layer = _gathering_tt(index)
    save_module(layer, tmp_path / "m")
    loaded = load_module(tmp_path / "m")
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), layer.eval()(x))


@pytest.mark.parametrize(("index", "message"), [
    ([0, 1, 2, 3, 4, 5, 6, 7], r"values must lie in \[0, 6\].*\[0, 7\]"),  # reads past the zero
    ([0, 1, 2, 3, 4, 5, 6, -1], r"values must lie in \[0, 6\].*\[-1, 6\]"),
    ([0, 2, 1, 4], r"values must lie in \[0, 3\]"),  # blocks of 2: three blocks and the zero
    ([0, 1, 2], r"3 entries, which do not divide the padded input size 8"),
])
def test_tt_input_index_values_are_checked_on_load(index, message, tmp_path):
    """An edited gather index would read another feature or fail mid-run: refused on load."""
    save_module(_gathering_tt([0, 1, 2, 3, 4, 5, 6, 6]), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    state = safetensors.torch.load_file(weights)
    state["input_index"] = torch.tensor(index, dtype=torch.int32)
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ArtifactError, match=message) as info:
        load_module(tmp_path / "m")
    assert "input_index" in str(info.value) and WEIGHTS_FILE in str(info.value)


def test_a_float_tt_input_index_is_refused(tmp_path):
    save_module(_gathering_tt([0, 1, 2, 3, 4, 5, 6, 6]), tmp_path / "m")
    weights = tmp_path / "m" / WEIGHTS_FILE
    state = safetensors.torch.load_file(weights)
    state["input_index"] = state["input_index"].float()
    safetensors.torch.save_file(state, weights)
    with pytest.raises(ArtifactError, match="int32/int64"):
        load_module(tmp_path / "m")
