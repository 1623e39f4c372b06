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

Two more settings make torch-pruning treat TT layers as the Conv/Linear layers they replace:

* ``root_module_types`` lists the TT classes beside torch-pruning's defaults. torch-pruning only
  starts a group at a root type, so without it a :class:`TTConv2d`'s output channels are never
  pruned, and an attention whose output projection is a :class:`TTLinear` loses no head (the
  head group is rooted at the projection's inputs).
* inside :func:`dense_trace`, a :class:`TTLinear` applied to tokens (a 3-D input) is counted as
  an ``nn.Linear`` applied to tokens. torch-pruning (1.6) turns off its reshape bookkeeping
  (``DependencyGraph._2d_4d``) only when it sees an ``nn.Linear`` on 3-D inputs; in a transformer
  whose every Linear is a TT layer it would leave it on, read the class-token concatenation as a
  channel concatenation, infer 0 channels and fail with ``ZeroDivisionError``.

An attention module whose q, k or v projection is a TT layer keeps all its heads: torch-pruning
couples q, k and v (through the two attention products) into one group, and a group holding a
protected output is left whole.

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
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from kdcompress.errors import LayerError
from kdcompress.layers.tt import TT_LAYERS, RankArg, TTConv2d, TTLinear, set_module

__all__ = ["TTLinearPruner", "TTConv2dPruner", "tt_pruner_kwargs", "dense_trace", "round_ranks",
           "root_module_types"]


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
        n_in = layer.in_features
        index = layer.feature_index().cpu()  # padded position -> feature (n_in: zero)
        keep = torch.ones(n_in + 1, dtype=torch.bool)
        keep[pruned] = False
        new_n_in = n_in - len(pruned)
        position = torch.cumsum(keep.long(), 0) - 1  # old feature -> new feature
        position[~keep] = new_n_in
        position[n_in] = new_n_in
        # int32 and per block where it can be: the index is an initializer of the exported graph
        # (a pruned conv channel feeding a flattened layer is one block of H x W features)
        layer.input_index = _per_block(position[index], new_n_in).to(torch.int32) \
            .to(layer.core0.device)
        layer.in_features = new_n_in

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        raise LayerError(f"the outputs of {layer!r} cannot be pruned: its output features are "
                         "not independent rows. Pass ignored_layers from tt_pruner_kwargs(model) "
                         "to the pruner, and shrink the layer with round_ranks()")

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_features

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_features


def _per_block(index: torch.Tensor, n_in: int) -> torch.Tensor:
    """``index`` (padded position -> feature, ``n_in``: zero) stored per block of ``b``
    positions when every block reads ``b`` consecutive features starting at a multiple of ``b``
    (or only zeros), with the largest such ``b``; else ``index`` itself."""
    n = index.numel()
    for block in sorted((b for b in range(2, math.gcd(n, n_in) + 1)
                         if n % b == 0 and n_in % b == 0), reverse=True):
        rows = index.reshape(-1, block)
        first = rows[:, :1]
        zero = (rows == n_in).all(1)
        run = (rows == first + torch.arange(block)).all(1) & (first[:, 0] % block == 0)
        if bool((zero | run).all()):
            return torch.where(zero, torch.full_like(first[:, 0], n_in // block),
                               first[:, 0] // block)
    return index


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


def root_module_types() -> list[type]:
    """torch-pruning's default group roots (Conv, Linear, LSTM) plus the TT layer classes."""
    default = inspect.signature(tp.pruner.MetaPruner).parameters["root_module_types"].default
    return [*default, *TT_LAYERS]


def tt_pruner_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments that make ``tp.pruner.MetaPruner`` handle the TT layers of ``model``.

    Returns ``{"customized_pruners": {...}, "ignored_layers": [...], "root_module_types":
    [...]}``: the TT pruners, the :class:`TTLinear` layers (outputs protected), and
    torch-pruning's group roots plus the TT classes. Merge them with your own (concatenate
    ``ignored_layers``, update ``customized_pruners``), and build the pruner inside
    :func:`dense_trace`.
    """
    return {
        "customized_pruners": {TTLinear: TTLinearPruner(), TTConv2d: TTConv2dPruner()},
        "ignored_layers": [m for m in model.modules() if isinstance(m, TTLinear)],
        "root_module_types": root_module_types(),
    }


@contextlib.contextmanager
def dense_trace(model: nn.Module) -> Iterator[nn.Module]:
    """Run every TT layer of ``model`` as one dense op (detached weight) inside the block.

    Use it around the construction of a torch-pruning pruner (its dependency trace), not for
    training: the materialised weight carries no gradient to the cores. While it is active, a
    dependency graph built by torch-pruning counts a :class:`TTLinear` on tokens (3-D input) as
    an ``nn.Linear`` on tokens (see the module docstring).
    """
    layers = [m for m in model.modules() if isinstance(m, TT_LAYERS)]
    for layer in layers:
        layer._dense_trace = True
    try:
        with _tt_linear_on_tokens(model):
            yield model
    finally:
        for layer in layers:
            layer._dense_trace = False


@contextlib.contextmanager
def _tt_linear_on_tokens(model: nn.Module) -> Iterator[None]:
    """Make torch-pruning's tracing count a TTLinear with a 3-D output as an nn.Linear with one.

    ``DependencyGraph._trace`` sets ``_2d_4d = False`` when an ``nn.Linear`` returns a 3-D
    tensor (its sign of a transformer, where reshapes are not flattened channels). The TT layers
    record their output ranks by a forward hook and the flag is cleared the same way after the
    trace. Nothing is changed when the installed torch-pruning has no such flag.
    """
    graph_cls = tp.dependency.DependencyGraph
    original = graph_cls.__dict__.get("_trace")
    linears = [m for m in model.modules() if isinstance(m, TTLinear)]
    if original is None or not linears:
        yield
        return
    ranks: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: ranks.append(out.dim()))
             for m in linears]

    def _trace(self: Any, *args: Any, **kwargs: Any) -> Any:
        ranks.clear()
        module2node = original(self, *args, **kwargs)
        if 3 in ranks and hasattr(self, "_2d_4d"):
            self._2d_4d = False
        return module2node

    graph_cls._trace = _trace
    try:
        yield
    finally:
        graph_cls._trace = original
        for h in hooks:
            h.remove()


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
