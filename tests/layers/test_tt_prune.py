"""TT layers under torch-pruning: valid forward, cores unchanged or exactly sliced."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

from kdcompress import models
from kdcompress.errors import LayerError, StageError
from kdcompress.layers import tt_prune
from kdcompress.layers.tt import TTConv2d, TTLinear
from kdcompress.layers.tt_prune import (
    TTConv2dPruner,
    TTLinearPruner,
    dense_trace,
    round_ranks,
    tt_pruner_kwargs,
)
from kdcompress.recipes import SelfAttention
from kdcompress.stages import decompose_tt, prune


class SmallCNN(nn.Module):
    """Conv features (16 x 4 x 4) and a TT classifier."""

    def __init__(self, in_modes: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            TTConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), rank=4), nn.BatchNorm2d(16),
            nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        fc1 = nn.Linear(256, 64)
        out_modes = (4, 4, 4) if in_modes else None
        self.fc1 = TTLinear.from_linear(fc1, rank=4, in_modes=in_modes, out_modes=out_modes)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.features(x).flatten(1))))


def _prune(model: SmallCNN, ratio: float = 0.3) -> None:
    kwargs = tt_pruner_kwargs(model)
    kwargs["ignored_layers"] += [model.fc2]
    with dense_trace(model):
        pruner = tp.pruner.MetaPruner(model, torch.randn(2, 1, 8, 8),
                                      importance=tp.importance.MagnitudeImportance(p=2),
                                      pruning_ratio=ratio, **kwargs)
    pruner.step()


@pytest.mark.parametrize("in_modes", [None, (16, 4, 4)])
def test_metapruner_keeps_tt_layers_valid(in_modes: tuple[int, ...] | None) -> None:
    torch.manual_seed(0)
    model = SmallCNN(in_modes).eval()
    fc1_before = copy.deepcopy(model.fc1)
    _prune(model)
    assert model.features[7].out_channels < 16  # the conv feeding the TT layer was pruned
    assert model.features[3].in_channels < 8  # TTConv2d input channels sliced with conv 0
    fc1 = model.fc1
    assert fc1.in_features == model.features[7].out_channels * 16
    assert torch.equal(fc1.core1, fc1_before.core1) and torch.equal(fc1.core2, fc1_before.core2)
    if in_modes:  # each channel is one slice of the first mode: core0 sliced, no gather
        assert fc1.input_index is None and fc1.in_modes[0] == model.features[7].out_channels
    else:
        assert fc1.input_index is not None and torch.equal(fc1.core0, fc1_before.core0)
    x = torch.randn(3, 1, 8, 8)
    out = model(x)
    assert out.shape == (3, 10) and torch.isfinite(out).all()
    fc1.forward_mode = "dense"
    assert torch.allclose(model(x), out, atol=1e-5)


@pytest.mark.parametrize("pruned", [list(range(16, 48)), [0, 5, 77, 200]])
def test_pruned_ttlinear_equals_dense_with_columns_removed(pruned: list[int]) -> None:
    torch.manual_seed(0)
    dense = nn.Linear(250, 30).double()  # padded: 250 -> 256 inputs
    tt = TTLinear.from_linear(dense, in_modes=(16, 4, 4), out_modes=(2, 3, 5))
    TTLinearPruner().prune_in_channels(tt, pruned)
    keep = [i for i in range(250) if i not in pruned]
    x = torch.randn(4, len(keep), dtype=torch.float64)
    expected = x @ dense.weight[:, keep].T + dense.bias
    assert tt.in_features == len(keep)
    assert torch.allclose(tt(x), expected, atol=1e-10)
    TTLinearPruner().prune_in_channels(tt, [0, 1])  # a second round composes
    assert torch.allclose(tt(x[:, 2:]), x[:, 2:] @ dense.weight[:, keep[2:]].T + dense.bias,
                          atol=1e-10)
    with pytest.raises(LayerError, match="cannot be pruned"):
        TTLinearPruner().prune_out_channels(tt, [0])


def test_round_ranks_shrinks_tt_layers() -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    small = round_ranks(model, rank=2)
    assert max(small.fc1.ranks) == 2 and max(model.fc1.ranks) == 4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert small(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(LayerError, match="rank or tol"):
        round_ranks(model)


def test_ttconv_pruner_slices_channels_exactly() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, padding=1).double()
    tt = TTConv2d.from_conv(conv)
    TTConv2dPruner().prune_in_channels(tt, [1, 4])
    TTConv2dPruner().prune_out_channels(tt, [0, 7])
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    keep_in, keep_out = [0, 2, 3, 5], list(range(1, 7))
    expected = conv(x * torch.isin(torch.arange(6), torch.tensor(keep_in))
                    .double()[None, :, None, None])[:, keep_out]
    assert (tt.in_channels, tt.out_channels) == (4, 6)
    assert torch.allclose(tt(x[:, keep_in]), expected, atol=1e-10)


def test_prune_recognises_tt_layers_by_type_not_by_name() -> None:
    from kdcompress.stages.prune import _is_tt

    class MyTTLinear(TTLinear):  # a user's subclass, defined outside kdcompress.layers
        pass

    class TTLookalike(nn.Linear):  # named like a TT layer, but a dense one
        pass

    TTLookalike.__module__ = "kdcompress.layers.fake"
    layer = TTLinear.from_linear(nn.Linear(16, 16), rank=2)
    subclassed = MyTTLinear.from_linear(nn.Linear(16, 16), rank=2)
    assert _is_tt(layer) and _is_tt(subclassed)
    assert _is_tt(TTConv2d.from_conv(nn.Conv2d(4, 4, 3), rank=2))
    assert not _is_tt(TTLookalike(4, 4)) and not _is_tt(nn.Linear(4, 4))


# ----------------------------------------------------------------------------------------------
# through the prune stage: TT convolutions as group roots, transformers whose Linears are TT


class ConvTTConv(nn.Module):
    """conv -> TT conv -> BN -> ReLU -> conv -> mean: only the TT conv's outputs can be pruned
    once the first conv and the output conv are ignored."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.tt = TTConv2d.from_conv(nn.Conv2d(8, 16, 3, padding=1), rank=4)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 10, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.bn(self.tt(torch.relu(self.conv(x)))))).mean(dim=(2, 3))


def _kept_rows(before: torch.Tensor, after: torch.Tensor) -> list[int]:
    """Indices of the rows of ``before`` that ``after`` keeps, in order."""
    return [int((before == row).all(dim=1).nonzero()[0]) for row in after.flatten(1)]


def test_ttconv_output_channels_are_pruned_exactly(digits_task) -> None:
    torch.manual_seed(0)
    model = ConvTTConv().eval()
    with torch.no_grad():  # BatchNorm statistics of a trained model, not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.1, 2.0)  # distinct magnitudes: a definite ranking
    pruned = prune(model, ratio=0.5, recovery_epochs=0, ignored_layers=["conv"],
                   data=digits_task)
    assert (pruned.tt.out_channels, pruned.bn.num_features, pruned.out.in_channels) == (8, 8, 8)
    assert pruned.tt.in_channels == 8 and torch.equal(pruned.tt.core1, model.tt.core1)
    kept = _kept_rows(model.tt.core3.flatten(1), pruned.tt.core3)
    gone = sorted(set(range(16)) - set(kept))
    assert gone == sorted(model.bn.weight.abs().argsort()[:8].tolist())  # the least important
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a removed channel reads 0 after BN and ReLU: the same function
        reference.bn.weight[gone] = 0
        reference.bn.bias[gone] = 0
    x = digits_task.example(16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)


def test_ttconv_is_a_group_root_for_torch_pruning() -> None:
    roots = tt_pruner_kwargs(nn.Sequential(nn.Linear(4, 4)))["root_module_types"]
    assert TTConv2d in roots and TTLinear in roots and nn.modules.conv._ConvNd in roots


def _vit(depth: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return models.transformer(dim=32, depth=depth, heads=4).build((1, 8, 8), 10).eval()


def test_a_vit_with_every_linear_tt_prunes_and_keeps_its_function(digits_task) -> None:
    # torch-pruning 1.6 read the class-token concatenation as a channel concatenation when no
    # nn.Linear saw tokens, inferred 0 channels at the patch embedding's flatten and divided by 0
    student = decompose_tt(_vit(), rank=4, layers=[nn.Linear])
    assert all(isinstance(m, TTLinear) for m in student.blocks[0].attn.children())
    pruned = prune(student, ratio=0.5, recovery_epochs=0, data=digits_task)
    assert pruned.blocks[0].attn.num_heads == 4  # TT outputs are protected: nothing to remove
    x = digits_task.example(8)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), student(x), atol=1e-6, rtol=1e-6)


def test_heads_go_whole_through_a_tt_output_projection(digits_task) -> None:
    vit = _vit(depth=2)
    layers = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.proj", "mlp.fc2")]
    student = decompose_tt(vit, rank=4, layers=layers)  # TT proj/fc2: the residual stream stays
    pruned = prune(student, ratio=0.5, recovery_epochs=0, data=digits_task,
                   ignored_layers=["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"])  # heads only
    reference = copy.deepcopy(student)
    for i in range(2):
        before, after = student.blocks[i].attn, pruned.blocks[i].attn
        assert isinstance(after, SelfAttention) and isinstance(after.proj, TTLinear)
        assert (after.num_heads, after.proj.in_features) == (2, 16)
        kept = _kept_rows(before.v.weight, after.v.weight)
        assert kept == _kept_rows(before.q.weight, after.q.weight)
        heads = sorted({k // 8 for k in kept})
        assert kept == [h * 8 + j for h in heads for j in range(8)]  # whole heads, in order
        with torch.no_grad():  # a removed head's values are 0: it adds nothing through proj
            for h in set(range(4)) - set(heads):
                reference.blocks[i].attn.v.weight[h * 8:(h + 1) * 8] = 0
                reference.blocks[i].attn.v.bias[h * 8:(h + 1) * 8] = 0
    x = digits_task.example(16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)


def test_a_trace_torch_pruning_cannot_read_is_a_stage_error(digits_task, monkeypatch) -> None:
    monkeypatch.setattr(tt_prune, "_tt_linear_on_tokens", lambda model: contextlib.nullcontext())
    student = decompose_tt(_vit(), rank=4, layers=[nn.Linear])
    with pytest.raises(StageError, match=r"could not trace ViT with its TT layers "
                                         r"\[.*'blocks.0.attn.q'.*\] .*0 channels.*; prune before "
                                         r"decompose_tt"):
        prune(student, ratio=0.5, recovery_epochs=0, data=digits_task)


def test_pruned_channels_gather_per_block() -> None:
    """Pruning whole channels of a flattened feature map (blocks of H x W inputs) stores the
    gather per block, H x W times smaller, and computes what the dense layer with those columns
    removed computes; a second round composes."""
    torch.manual_seed(0)
    dense = nn.Linear(16 * 49, 30).double()  # 16 channels of 7 x 7, modes 16*49 = 784
    tt = TTLinear.from_linear(dense, in_modes=(4, 14, 14), out_modes=(2, 3, 5))
    channels = [1, 6, 7, 12]
    pruned = [c * 49 + k for c in channels for k in range(49)]
    TTLinearPruner().prune_in_channels(tt, pruned)
    assert tt.input_index.numel() == 784 // 49 and tt.input_index.dtype == torch.int32
    keep = [i for i in range(784) if i not in set(pruned)]
    x = torch.randn(3, len(keep), dtype=torch.float64)
    assert torch.allclose(tt(x), x @ dense.weight[:, keep].T + dense.bias, atol=1e-10)
    assert torch.allclose(tt.full_weight(), dense.weight[:, keep], atol=1e-10)
    TTLinearPruner().prune_in_channels(tt, list(range(49)))  # channel 0 goes too
    keep2 = keep[49:]
    assert tt.input_index.numel() == 16
    assert torch.allclose(tt(x[:, 49:]), x[:, 49:] @ dense.weight[:, keep2].T + dense.bias,
                          atol=1e-10)
    TTLinearPruner().prune_in_channels(tt, [3])  # one feature: back to a per-feature gather
    assert tt.input_index.numel() == 784


def test_pruned_ttlinear_gather_exports_int32(tmp_path) -> None:
    """The gather left by input pruning is an int32 initializer of the ONNX graph (half the
    bytes of int64) and ONNX Runtime computes the same outputs."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from kdcompress.stages.export import _export, _narrow_gather_indices

    torch.manual_seed(0)
    tt = TTLinear.from_linear(nn.Linear(250, 30), in_modes=(16, 4, 4), out_modes=(2, 3, 5))
    TTLinearPruner().prune_in_channels(tt, [0, 5, 77, 200])
    assert tt.input_index.dtype == torch.int32
    x = torch.randn(3, 246)
    path = tmp_path / "tt.onnx"
    _export(tt.eval(), x, path, None)
    proto = onnx.load(path)
    assert _narrow_gather_indices(proto) == 1
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    indices = [numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer
               if t.data_type in (onnx.TensorProto.INT32, onnx.TensorProto.INT64)
               and numpy_helper.to_array(t).size == 256]
    assert indices and all(a.dtype == "int32" for a in indices)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), tt(x).detach(), atol=1e-5)
