"""Whole-head pruning of multi-head attention with torch-pruning (``tp.pruner.MetaPruner``).

Left alone, torch-pruning removes single feature dimensions of the q/k/v projections, which
splits heads apart (a reshape to ``(heads, head_dim)`` then mixes features of different heads).
Given the head count of each projection (``num_heads``) it removes whole heads instead: the same
heads from q, k and v, and the matching input columns of the output projection. This module
finds the attention modules of a model and returns those settings:

* an attention module is one with an integer head count attribute (``num_heads``,
  ``num_attention_heads``, ``n_heads``, ``n_head`` or ``heads``) and three ``nn.Linear`` children
  named ``q/k/v``, ``query/key/value``, ``q_proj/k_proj/v_proj`` or ``to_q/to_k/to_v`` (the
  layout of :class:`kdcompress.recipes.SelfAttention`, of Hugging Face's and of many others);
* a fused ``qkv`` projection (one ``nn.Linear`` of ``3 * dim`` outputs, timm's layout) is
  protected: its outputs are not pruned, so its heads stay whole;
* ``round(ratio * heads)`` heads of each module are removed (at least one is kept), spread over
  ``iterative_steps``; the head dimension never changes;
* after each step, :func:`update_head_counts` writes the new count back into the module's
  attribute, so a ``forward`` that reads ``self.num_heads`` keeps working.

Examples
--------
>>> import torch_pruning as tp
>>> plan = head_plan(model, ratio=0.25)  # doctest: +SKIP
>>> pruner = tp.pruner.MetaPruner(model, example, importance, pruning_ratio=0.25,
...                               **head_pruner_kwargs(plan))  # doctest: +SKIP
>>> schedule_heads(pruner, plan)  # doctest: +SKIP
>>> pruner.step(); update_head_counts(pruner, plan)  # doctest: +SKIP

References
----------
.. [1] P. Michel, O. Levy, G. Neubig, "Are Sixteen Heads Really Better than One?", NeurIPS 2019.
.. [2] G. Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from kdcompress.errors import LayerError

__all__ = ["Attention", "HeadPlan", "find_attention", "head_plan", "head_pruner_kwargs",
           "schedule_heads", "update_head_counts", "HEAD_ATTRS", "QKV_NAMES"]

#: Attributes read as a module's head count, in this order.
HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")
#: Names of separate q, k, v projections.
QKV_NAMES = (("q", "k", "v"), ("query", "key", "value"), ("q_proj", "k_proj", "v_proj"),
             ("to_q", "to_k", "to_v"))


@dataclass
class Attention:
    """One attention module: its name, head-count attribute, heads and projections."""

    name: str
    module: nn.Module
    attr: str
    heads: int
    qkv: tuple[nn.Linear, ...]  # (q, k, v), or (qkv,) when fused
    head_dim: int  # features per head of each projection; pruning never changes it
    fused: bool = False


@dataclass
class HeadPlan:
    """The attention modules of a model and how many heads each loses at each step."""

    attentions: list[Attention]
    removals: dict[str, list[int]] = field(default_factory=dict)  # name -> heads per step

    @property
    def pruned(self) -> list[Attention]:
        """Attention modules that lose at least one head."""
        return [a for a in self.attentions if not a.fused and sum(self.removals[a.name])]


def _head_count(module: nn.Module) -> tuple[str, int] | None:
    for attr in HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return attr, value
    return None


def find_attention(model: nn.Module) -> list[Attention]:
    """The attention modules of ``model`` (see the module docstring for what counts as one).

    Raises
    ------
    LayerError
        A module's head count does not divide its projections' width.
    """
    found = []
    for name, module in model.named_modules():
        count = _head_count(module)
        if count is None:
            continue
        children = dict(module.named_children())
        fused = isinstance(children.get("qkv"), nn.Linear)
        layers = ((children["qkv"],) if fused else next(
            (tuple(children[n] for n in names) for names in QKV_NAMES
             if all(isinstance(children.get(n), nn.Linear) for n in names)), None))
        if layers is None:
            continue
        attr, heads = count
        widths = {lin.out_features // (3 if fused else 1) for lin in layers}
        if heads < 1 or len(widths) != 1 or next(iter(widths)) % heads:
            raise LayerError(f"attention '{name}': {attr}={heads} must divide the width of its "
                             f"projections ({sorted(widths)}); fix the module's {attr}")
        found.append(Attention(name or type(model).__name__, module, attr, heads, layers,
                               next(iter(widths)) // heads, fused))
    return found


def head_plan(model: nn.Module, ratio: float, iterative_steps: int = 1) -> HeadPlan:
    """How many heads each attention module of ``model`` loses at each of ``iterative_steps``.

    ``round(ratio * heads)`` in all, at least one head kept, reached step by step as the channel
    ratio is (linearly).
    """
    attentions = find_attention(model)
    removals = {}
    for att in attentions:
        total = 0 if att.fused else min(att.heads - 1, round(ratio * att.heads))
        reached = [round(total * t / iterative_steps) for t in range(iterative_steps + 1)]
        removals[att.name] = [b - a for a, b in zip(reached, reached[1:], strict=False)]
    return HeadPlan(attentions, removals)


def head_pruner_kwargs(plan: HeadPlan) -> dict[str, Any]:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` prune whole heads of ``plan``.

    Returns ``{}`` for a model without attention; else ``num_heads``, ``prune_num_heads=True``,
    ``prune_head_dims=False`` and ``ignored_layers`` (fused qkv projections). Merge
    ``ignored_layers`` with your own, and call :func:`schedule_heads` on the pruner.
    """
    if not plan.attentions:
        return {}
    num_heads = {lin: att.heads for att in plan.attentions if not att.fused for lin in att.qkv}
    return {
        "num_heads": num_heads,
        "prune_num_heads": True,
        "prune_head_dims": False,
        "ignored_layers": [att.qkv[0] for att in plan.attentions if att.fused],
    }


def schedule_heads(pruner: Any, plan: HeadPlan) -> None:
    """Set the pruner's per-step head ratios so that each step removes exactly the planned heads.

    torch-pruning removes ``ceil(r_t * heads_now)`` heads at step ``t``; ``r_t`` is set to
    ``(n_t - 0.5) / heads_now`` for the ``n_t`` heads planned (0 when none), which rounds to
    ``n_t`` whatever the floating-point error.
    """
    schedule = pruner.head_pruning_ratio_dict  # module -> ratio per step (index 0 unused)
    for att in plan.attentions:
        if att.fused:
            continue
        heads, ratios = att.heads, [0.0]
        for n in plan.removals[att.name]:
            ratios.append((n - 0.5) / heads if n else 0.0)
            heads -= n
        for lin in att.qkv:
            schedule[lin] = ratios


def update_head_counts(pruner: Any, plan: HeadPlan) -> None:
    """Write each attention module's head count after a step back into its attribute.

    Raises
    ------
    LayerError
        The projections were cut to a width that is not a whole number of heads (a bug: the
        plan's heads are removed whole).
    """
    for att in plan.attentions:
        if att.fused:
            continue
        heads = pruner.num_heads[att.qkv[0]]
        widths = {lin.out_features for lin in att.qkv}
        if len(widths) != 1 or widths != {heads * att.head_dim}:
            raise LayerError(f"attention '{att.name}': after pruning q/k/v have widths "
                             f"{sorted(widths)}, not {heads} heads of {att.head_dim}")
        setattr(att.module, att.attr, heads)
        att.heads = heads
