"""Whole-head pruning of attention: which modules count, the plan, and exactness of the result."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from kdcompress import models
from kdcompress.errors import LayerError
from kdcompress.layers.heads import find_attention, head_plan
from kdcompress.recipes import SelfAttention
from kdcompress.stages import prune


class FusedAttention(nn.Module):
    """timm's layout: one qkv projection."""

    def __init__(self, dim: int = 16, num_heads: int = 2) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)


class BadHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.n_heads = 3
        self.query, self.key, self.value = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


def test_attention_modules_are_found_by_layout() -> None:
    vit = models.transformer(dim=32, depth=2, heads=4).build((1, 8, 8), 10)
    found = find_attention(vit)
    assert [a.name for a in found] == ["blocks.0.attn", "blocks.1.attn"]
    assert [(a.heads, a.head_dim, a.fused) for a in found] == [(4, 8, False)] * 2
    fused = find_attention(nn.Sequential(FusedAttention()))
    assert [(a.name, a.heads, a.head_dim, a.fused) for a in fused] == [("0", 2, 8, True)]
    assert find_attention(models.cnn(width=8).build((1, 8, 8), 10)) == []


def test_a_head_count_that_does_not_divide_the_width_is_named() -> None:
    with pytest.raises(LayerError, match=r"attention '0': n_heads=3 must divide the width of "
                                         r"its projections \(\[8\]\)"):
        find_attention(nn.Sequential(BadHeads()))


def test_the_plan_rounds_keeps_one_head_and_spreads_over_steps() -> None:
    vit = models.transformer(dim=32, depth=1, heads=4).build((1, 8, 8), 10)
    assert head_plan(vit, 0.3).removals == {"blocks.0.attn": [1]}  # round(1.2)
    assert head_plan(vit, 0.9).removals == {"blocks.0.attn": [3]}  # one head kept
    assert head_plan(vit, 0.5, iterative_steps=3).removals == {"blocks.0.attn": [1, 0, 1]}
    fused = nn.Sequential(FusedAttention())
    assert head_plan(fused, 0.5).pruned == []


def _removed_heads(before: nn.Linear, after: nn.Linear, head_dim: int) -> list[int]:
    """Heads of ``before`` whose rows are not in ``after`` (rows kept in order)."""
    kept = []
    for row in after.weight:
        kept.append(int((before.weight == row).all(dim=1).nonzero()[0]))
    heads = sorted({i // head_dim for i in kept})
    assert len(kept) == len(heads) * head_dim  # whole heads only
    return [h for h in range(before.out_features // head_dim) if h not in heads]


@pytest.mark.parametrize("steps", [1, 2])
def test_pruned_heads_are_whole_and_the_rest_of_the_model_is_exact(digits_task, steps) -> None:
    torch.manual_seed(0)
    vit = models.transformer(dim=32, depth=2, heads=4).build((1, 8, 8), 10).eval()
    keep = ["embed.proj", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]  # prune heads, nothing else
    pruned = prune(vit, ratio=0.5, recovery_epochs=0, iterative_steps=steps, ignored_layers=keep,
                   data=digits_task)
    reference = copy.deepcopy(vit)
    for (name, before), after in zip(
            [(n, m) for n, m in vit.named_modules() if isinstance(m, SelfAttention)],
            [m for m in pruned.modules() if isinstance(m, SelfAttention)], strict=True):
        assert after.num_heads == 2
        assert {after.q.out_features, after.k.out_features, after.v.out_features,
                after.proj.in_features} == {2 * before.head_dim}
        gone = _removed_heads(before.q, after.q, before.head_dim)
        assert gone == _removed_heads(before.k, after.k, before.head_dim)
        assert gone == _removed_heads(before.v, after.v, before.head_dim)
        with torch.no_grad():  # a removed head contributes nothing: zero its output columns
            proj = reference.get_submodule(name).proj
            for h in gone:
                proj.weight[:, h * before.head_dim:(h + 1) * before.head_dim] = 0
    x = digits_task.example(16)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), reference(x), atol=1e-5, rtol=1e-5)
