"""Tensor-train layers, the factorisation of whole models, and TT-aware pruning.

Everything public lives here; the modules behind it are :mod:`~kdcompress.layers.tt` (the layers),
:mod:`~kdcompress.layers.tensorize` (choosing layers and ranks, TT / SVD / Tucker-2) and
:mod:`~kdcompress.layers.tt_prune` (torch-pruning support and TT-rounding).

>>> from torch import nn
>>> from kdcompress.layers import TTLinear, TT_LAYERS, tensorize
>>> tt = TTLinear.from_linear(nn.Linear(64, 32), rank=4)
>>> isinstance(tt, TT_LAYERS)
True
>>> small, records = tensorize(nn.Sequential(nn.Linear(256, 128)), rank=4)
>>> records[0]["params_after"] < records[0]["params_before"]
True
"""

from kdcompress.layers.tensorize import METHODS, decompose_layer, tensorize
from kdcompress.layers.tt import (
    TT_LAYERS,
    RankArg,
    TTConv2d,
    TTLinear,
    check_rank,
    choose_modes,
    factorize,
    materialize,
    max_ranks,
    set_module,
    tt_ranks_for_tol,
)
from kdcompress.layers.tt_prune import (
    TTConv2dPruner,
    TTLinearPruner,
    dense_trace,
    round_ranks,
    tt_pruner_kwargs,
)

__all__ = [
    # layers
    "TTLinear",
    "TTConv2d",
    "TT_LAYERS",
    # whole models
    "tensorize",
    "decompose_layer",
    "materialize",
    "METHODS",
    # pruning and rank reduction
    "round_ranks",
    "dense_trace",
    "tt_pruner_kwargs",
    "TTLinearPruner",
    "TTConv2dPruner",
    # helpers
    "RankArg",
    "factorize",
    "choose_modes",
    "tt_ranks_for_tol",
    "max_ranks",
    "check_rank",
    "set_module",
]
