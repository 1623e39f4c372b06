"""The built-in recipes (resnet, mobilenet, transformer, cnn1d) and users' own residual and
attention models: shapes, saving, and every stage from train to int8."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from kdcompress import OnnxModel, data, models
from kdcompress.artifacts import load_module, num_params, save_module
from kdcompress.errors import PipelineError
from kdcompress.layers import TT_LAYERS
from kdcompress.losses import CE, KD
from kdcompress.stages import decompose_tt, distill, export_onnx, prune, quantize_onnx, train
from kdcompress.stages.quantize import quantized_nodes

# ----------------------------------------------------------------------------------------------
# users' own models, unknown to kdcompress (module level: artifacts rebuild them by class name)


class UserBlock(nn.Module):
    """A residual block as users write it: conv-BN-ReLU-conv-BN, plus the input."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(channels)
        self.conv_b = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.conv_a(x)))
        return torch.relu(x + self.bn_b(self.conv_b(y)))


class UserResNet(nn.Module):
    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(UserBlock(channels), UserBlock(channels))
        self.out = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(torch.relu(self.stem(x))).mean(dim=(2, 3)))


class UserAttention(nn.Module):
    """Hugging Face's layout: q_proj/k_proj/v_proj/o_proj, ``self.num_heads`` read in forward."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o_proj((weights @ v).transpose(1, 2).reshape(b, n, -1))


class UserTransformer(nn.Module):
    """Rows of an 8x8 image as 8 tokens, two attention layers with an MLP, mean pooling."""

    def __init__(self, dim: int = 32, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.layers = nn.ModuleList([UserAttention(dim, heads) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2))  # (B, 1, 8, 8) -> (B, 8, 8) -> (B, 8, dim)
        for norm, attn in zip(self.norms, self.layers, strict=True):
            x = x + attn(norm(x))
        x = x + self.mlp(x)
        return self.classifier(x.mean(dim=1))


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def small_digits(digits_task: data.Task) -> data.Task:
    """400 training images of digits: enough for one epoch to learn something."""
    return data.limit_train(digits_task, 400)


@pytest.fixture(scope="module")
def sequence_task() -> data.Task:
    """Two-channel sequences of length 32 in 3 classes: sines of three frequencies in noise."""
    g = torch.Generator().manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 3
        t = torch.linspace(0, 1, 32)
        phase = torch.rand(n, 1, generator=g) * 6.28
        wave = torch.sin(6.28 * (y.view(-1, 1) + 1) * 2 * t + phase)
        x = torch.stack([wave, torch.cos(6.28 * t + phase)], dim=1)  # (n, 2, 32)
        return x + 0.3 * torch.randn(x.shape, generator=g), y

    x, y = make(300)
    xt, yt = make(90)
    xv, yv = make(60)
    return data.from_tensors(x, y, xt, yt, x_val=xv, y_val=yv, name="waves")


RECIPES = {
    "resnet": models.resnet(depth=8, width=8),
    "mobilenet": models.mobilenet(width=8, expansion=2),
    "transformer": models.transformer(dim=32, depth=2, heads=4),
    "cnn1d": models.cnn1d(width=16, hidden=32),
}


# ----------------------------------------------------------------------------------------------
# shapes and declaration errors


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer"])
def test_image_recipes_adapt_to_the_input(name: str, shape: tuple[int, ...]) -> None:
    model = RECIPES[name].build(shape, 7).eval()
    assert model(torch.zeros(3, *shape)).shape == (3, 7)


def test_downsampling_and_patches_follow_the_image_size() -> None:
    def last_size(model: nn.Module, shape: tuple[int, ...]) -> int:
        sizes = []
        model.stages.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
        model(torch.zeros(1, *shape))
        return sizes[0]

    assert last_size(models.resnet(depth=8).build((1, 8, 8), 10).eval(), (1, 8, 8)) == 4
    assert last_size(models.resnet(depth=8).build((1, 28, 28), 10).eval(), (1, 28, 28)) == 7
    assert models.transformer().build((1, 8, 8), 10).patch == 2  # 4x4 tokens
    assert models.transformer().build((1, 28, 28), 10).patch == 4  # 7x7 tokens
    assert models.transformer().build((1, 28, 28), 10).pos_embed.shape == (1, 50, 64)


def test_cnn1d_adapts_to_sequences(sequence_task: data.Task) -> None:
    model = models.cnn1d(width=16).build(sequence_task.input_shape, sequence_task.num_classes)
    assert model(sequence_task.example(5)).shape == (5, 3)
    assert model.classifier.fc1.in_features == 16 * 16  # length 32 pooled once to 16
    assert models.cnn1d().build((4, 128), 2).classifier.fc1.in_features == 64 * 16


def test_recipes_refuse_the_wrong_kind_of_input() -> None:
    with pytest.raises(PipelineError, match=r"resnet needs image inputs .* \(2, 32\); use "
                                            r"models.cnn1d\(\)"):
        models.resnet().build((2, 32), 3)
    with pytest.raises(PipelineError, match=r"cnn1d needs sequence inputs .* \(1, 8, 8\)"):
        models.cnn1d().build((1, 8, 8), 10)


def test_bad_settings_fail_at_declaration() -> None:
    with pytest.raises(PipelineError, match=r"depth must be 6n\+2 .* but got 10 \(nearest: 8\)"):
        models.resnet(depth=10)
    with pytest.raises(PipelineError, match=r"heads must divide dim .* dim=64, heads=3"):
        models.transformer(heads=3)
    with pytest.raises(PipelineError, match=r"pool must be one of \('cls', 'mean'\), but got "
                                            r"'max'"):
        models.transformer(pool="max")


# ----------------------------------------------------------------------------------------------
# artifacts


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_round_trip_through_artifacts(name: str, tmp_path) -> None:
    shape = (2, 32) if name == "cnn1d" else (1, 8, 8)
    model = RECIPES[name].build(shape, 10)
    model.train()(torch.randn(8, *shape))  # BatchNorm statistics move away from their init
    model.eval()
    save_module(model, tmp_path)
    loaded = load_module(tmp_path)
    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert type(loaded) is type(model)


# ----------------------------------------------------------------------------------------------
# every stage


def _check_onnx(onnx_model: OnnxModel, model: nn.Module, x: torch.Tensor, atol: float) -> None:
    """ONNX Runtime matches PyTorch at batch 1 and 7 (one graph, dynamic batch)."""
    with torch.no_grad():
        expected = model(x[:7]).numpy()
    for batch in (1, 7):
        got = onnx_model.predict(x[:batch]).numpy()
        assert got.shape == (batch, expected.shape[1])
        np.testing.assert_allclose(got, expected[:batch], atol=atol, rtol=0)


def _check_int8(int8: OnnxModel, fp32: OnnxModel, x: torch.Tensor) -> None:
    """int8 mostly agrees with fp32 (a broken graph agrees ~1/classes of the time; models
    trained one epoch have close logits, so some flips are expected)."""
    agree = (int8.predict(x).argmax(1) == fp32.predict(x).argmax(1)).float().mean()
    assert float(agree) >= 0.75


def _pipeline(model, task: data.Task, layers, epochs: int = 1, mode: str = "auto") -> dict:
    teacher = train(model, epochs=epochs, data=task)
    student = decompose_tt(teacher, rank=4, layers=layers)
    student = distill(student=student, teacher=teacher, loss=KD(temperature=4) * 0.9 + CE() * 0.1,
                      epochs=1, data=task)
    pruned = prune(student, ratio=0.25, recovery_epochs=0, data=task)
    fp32 = export_onnx(pruned, data=task)
    int8 = quantize_onnx(fp32, mode=mode, samples=64, data=task)
    return {"teacher": teacher, "student": student, "pruned": pruned, "fp32": fp32, "int8": int8}


def _layers_to_decompose(name: str, model: nn.Module) -> list[str] | None:
    """What the recipes' pipelines decompose: dense convs of conv nets, MLP blocks of the ViT
    (its attention projections stay dense so that heads can be pruned), Linears of cnn1d."""
    if name == "transformer":
        return [n for n, _ in model.named_modules() if n.endswith(("mlp.fc1", "mlp.fc2"))]
    if name == "cnn1d":
        return None
    return [n for n, m in model.named_modules()
            if type(m) is nn.Conv2d and m.groups == 1 and m.in_channels > 1]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_every_stage_handles_the_recipe(name: str, small_digits, sequence_task) -> None:
    task = sequence_task if name == "cnn1d" else small_digits
    layers = _layers_to_decompose(name, RECIPES[name].build(task.input_shape, task.num_classes))
    vit = name == "transformer"  # its patch-embedding Conv makes "auto" pick static: see README
    out = _pipeline(RECIPES[name], task, layers, epochs=3 if vit else 1,
                    mode="dynamic" if vit else "auto")
    assert any(isinstance(m, TT_LAYERS) for m in out["pruned"].modules())
    x, _ = task.arrays("val")
    _check_onnx(out["fp32"], out["pruned"], x, atol=1e-3)
    assert num_params(out["pruned"]) < num_params(out["student"])
    assert sum(quantized_nodes(out["int8"])["quantized"].values()) > 0
    assert out["int8"].predict(x).shape == (len(x), task.num_classes)
    if vit:  # a tiny ViT learns little in a few steps: its logits are too close to compare
        assert quantized_nodes(out["int8"])["quantized"].get("MatMulInteger", 0) >= 6
    else:
        _check_int8(out["int8"], out["fp32"], x)


@pytest.mark.slow
@pytest.mark.parametrize("user_model", [UserResNet, UserTransformer])
def test_a_users_own_model_goes_through_every_stage(user_model, small_digits, tmp_path) -> None:
    torch.manual_seed(0)
    model = user_model()
    layers = (["body.0.conv_b", "body.1.conv_b"] if user_model is UserResNet
              else ["mlp.0", "mlp.2"])
    out = _pipeline(model, small_digits, layers, epochs=3)
    pruned = out["pruned"]
    if user_model is UserTransformer:  # one of four heads removed, attribute updated
        assert [(a.num_heads, a.q_proj.out_features) for a in pruned.layers] == [(3, 24)] * 2
    else:  # the residual adds stayed consistent: block outputs match the stem's width
        assert pruned.body[0].bn_b.num_features == pruned.stem.out_channels
    assert num_params(pruned) < num_params(out["student"])
    save_module(pruned, tmp_path)
    x, _ = small_digits.arrays("val")
    with torch.no_grad():
        torch.testing.assert_close(load_module(tmp_path)(x), pruned(x))
    _check_onnx(out["fp32"], pruned, x, atol=1e-3)
    _check_int8(out["int8"], out["fp32"], x)
