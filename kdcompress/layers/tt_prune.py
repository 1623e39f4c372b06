"""Make TT layers survive structured pruning with torch-pruning (``tp.pruner.MetaPruner``).

Left alone, torch-pruning traces into a TT layer's contraction (it reads the matmuls as
element-wise ops), builds corrupt groups and fails. Two pieces fix that:

* :func:`dense_trace`, a context manager used around ``MetaPruner(...)``: while it is active each
  TT layer runs as one ``F.linear`` / ``F.conv2d`` with its materialised (detached) weight, so the
  trace sees a single layer with the right input and output sizes;
* custom pruners, registered with ``customized_pruners`` (:func:`tt_pruner_kwargs` returns them,
  with the layers to protect, as keyword arguments for ``MetaPruner``).

What the pruners do, always exactly (the layer computes the same function on the kept inputs):

* :class:`TTConv2d`: input channels are columns of ``core0`` and output channels rows of
  ``core3``: both are sliced.
* :class:`TTLinear`, inputs: when the pruned features are whole slices of the first input mode
  (a conv channel ``c`` feeding ``flatten`` is features ``c*H*W .. (c+1)*H*W - 1``, whole slices
  when ``prod(in_modes[1:])`` divides ``H*W``), those slices of ``core0`` are removed. Otherwise
  the cores stay as they are and the layer gathers its inputs into place (``input_index``), with
  zeros where a feature was pruned.
* :class:`TTLinear`, outputs: protected (listed in ``ignored_layers``): a TT layer's outputs are
  not independent rows. Shrink it with :func:`round_ranks` instead.

Examples
--------
>>> import torch_pruning as tp
>>> with dense_trace(model):  # doctest: +SKIP
...     pruner = tp.pruner.MetaPruner(
...         model, example, importance=tp.importance.MagnitudeImportance(p=2),
...         pruning_ratio=0.3, **tt_pruner_kwargs(model))
>>> pruner.step()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kdcompress.errors import LayerError
from kdcompress.layers.tt import TT_LAYERS, RankArg, TTConv2d, TTLinear, set_module

__all__ = ["TTLinearPruner", "TTConv2dPruner", "tt_pruner_kwargs", "dense_trace", "round_ranks"]


class TTLinearPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler for :class:`TTLinear` (input features; outputs are protected)."""

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        pruned = sorted({int(i) for i in idxs})
        if not pruned:
            return layer
        if len(pruned) >= layer.in_features:
            raise LayerError(f"pruning would remove every input of {layer!r}")
        if layer.input_index is None and self._slice_first_mode(layer, pruned):
            return layer
        self._gather_inputs(layer, pruned)
        return layer

    def _slice_first_mode(self, layer: TTLinear, pruned: list[int]) -> bool:
        block = math.prod(layer.in_modes[1:])
        slices = sorted({i // block for i in pruned})
        whole = sum(min((s + 1) * block, layer.in_features) - s * block for s in slices)
        if whole != len(pruned) or len(slices) >= layer.in_modes[0]:
            return False
        keep = [s for s in range(layer.in_modes[0]) if s not in set(slices)]
        layer.core0 = self._prune_parameter_and_grad(layer.core0, keep, 2)
        layer.in_modes = (len(keep), *layer.in_modes[1:])
        layer.in_features -= len(pruned)
        return True

    @staticmethod
    def _gather_inputs(layer: TTLinear, pruned: list[int]) -> None:
        n_in, n_pad = layer.in_features, math.prod(layer.in_modes)
        index = layer.input_index
        if index is None:  # position p of the padded input reads feature p (n_in: zero)
            index = torch.clamp(torch.arange(n_pad), max=n_in)
        keep = torch.ones(n_in + 1, dtype=torch.bool)
        keep[pruned] = False
        new_n_in = n_in - len(pruned)
        position = torch.cumsum(keep.long(), 0) - 1  # old feature -> new feature
        position[~keep] = new_n_in
        position[n_in] = new_n_in
        layer.input_index = position[index.cpu()].to(layer.core0.device)
        layer.in_features = new_n_in

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise LayerError(f"the outputs of {layer!r} cannot be pruned: its output features are "
                         "not independent rows. Pass ignored_layers from tt_pruner_kwargs(model) "
                         "to the pruner, and shrink the layer with round_ranks()")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_features


class TTConv2dPruner(tp.pruner.BasePruningFunc):
    """torch-pruning handler for :class:`TTConv2d`: slices ``core0`` (in) and ``core3`` (out)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.out_channels)) - {int(i) for i in idxs})
        layer.core3 = self._prune_parameter_and_grad(layer.core3, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        keep = sorted(set(range(layer.in_channels)) - {int(i) for i in idxs})
        layer.core0 = self._prune_parameter_and_grad(layer.core0, keep, 1)
        layer.in_channels = len(keep)
        return layer

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels


def tt_pruner_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` handle the TT layers of ``model``.

    Returns ``{"customized_pruners": {...}, "ignored_layers": [...]}``; merge them with your own
    (concatenate ``ignored_layers``, update ``customized_pruners``), and build the pruner inside
    :func:`dense_trace`.
    """
    return {
        "customized_pruners": {TTLinear: TTLinearPruner(), TTConv2d: TTConv2dPruner()},
        "ignored_layers": [m for m in model.modules() if isinstance(m, TTLinear)],
    }


@contextlib.contextmanager
def dense_trace(model: nn.Module) -> Iterator[nn.Module]:
    """Run every TT layer of ``model`` as one dense op (detached weight) inside the block.

    Use it around the construction of a torch-pruning pruner (its dependency trace), not for
    training: the materialised weight carries no gradient to the cores.
    """
    layers = [m for m in model.modules() if isinstance(m, TT_LAYERS)]
    for layer in layers:
        layer._dense_trace = True
    try:
        yield model
    finally:
        for layer in layers:
            layer._dense_trace = False


def round_ranks(model: nn.Module, *, rank: RankArg = None, tol: float | None = None
                ) -> nn.Module:
    """A copy of ``model`` with the ranks of every TT layer truncated (TT-rounding).

    Each layer's weight is re-decomposed by TT-SVD with the new ``rank`` or ``tol``, keeping its
    modes; ranks never grow. Layers whose inputs were pruned to a gather are left as they are.
    """
    if (rank is None) == (tol is None):
        raise LayerError(f"round_ranks: give rank or tol, but got rank={rank}, tol={tol}")
    model = copy.deepcopy(model)
    for name, layer in list(model.named_modules()):
        if isinstance(layer, TTLinear) and layer.input_index is None:
            new = layer.round(rank=rank, tol=tol)
        elif isinstance(layer, TTConv2d):
            dense = layer.to_dense().double()
            new = TTConv2d.from_conv(dense, rank=rank, tol=tol).to(layer.core0.dtype)
        else:
            continue
        if all(n <= o for n, o in zip(new.ranks, layer.ranks, strict=True)):
            model = set_module(model, name, new.train(layer.training))
    return model
