"""The ``decompose_tt`` stage: replace chosen layers by Tensor-Train (or SVD / Tucker) layers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from kdcompress.context import StageContext
from kdcompress.declare import Check, Choice, Float, check_arguments, stage
from kdcompress.layers import METHODS, tensorize
from kdcompress.models import ModelSpec, as_module

__all__ = ["decompose_tt", "Ranks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Ranks(Check):
    """A rank setting: ``None`` (full ranks), an integer >= 1, or a non-empty list of them.

    Examples
    --------
    >>> Ranks()("rank", [4, 0])
    'rank must be an integer >= 1 or a list of them (one per inner TT rank), but got [4, 0]'
    """

    def __call__(self, key: str, value: Any) -> str | None:
        if value is None:
            return None
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if items and all(_is_rank(r) for r in items):
            return None
        return (f"{key} must be an integer >= 1 or a list of them (one per inner TT rank), but "
                f"got {value!r}")


def _is_rank(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


@stage(role="decompose", checks={
    "rank": Ranks(),
    "tol": Float(ge=0, lt=1, optional=True),
    "ratio": Float(gt=1, optional=True),
    "method": Choice(METHODS),
})
def decompose_tt(
    model: nn.Module | ModelSpec, *, rank: int | list[int] | None = 8, tol: float | None = None,
    ratio: float | None = None, layers: str | type | Sequence[str | type] | None = None,
    method: str = "tt", ctx: StageContext | None = None,
) -> nn.Module:
    """Factorise the chosen layers of ``model``, initialised from their trained weights.

    TT-SVD with tensorly (Novikov et al. 2015 for ``nn.Linear``, a 4-core TT of the kernel for
    ``nn.Conv2d``); ``method="svd"`` or ``"tucker"`` gives the classic low-rank layers instead,
    so a report can compare them on the same model. The input model is copied, never changed.
    Decomposition loses accuracy at useful compressions: distill the result.

    Parameters
    ----------
    model : nn.Module
        The trained model.
    rank : int or list of int, optional
        Maximal ranks (>= 1) of every decomposed layer (default 8); ``None`` keeps full ranks
        (exact). Ignored when ``tol`` or ``ratio`` is given.
    tol : float, optional
        Relative Frobenius error bound per layer, in ``[0, 1)``; the smallest ranks meeting it
        are chosen.
    ratio : float, optional
        Target compression (> 1) of the whole model's parameter count; ranks are searched per
        layer for the least reconstruction error.
    layers : str, type, or list of them, optional
        Qualified layer names and/or layer types. ``None``: every ``nn.Linear`` whose
        factorisation is smaller than it (convolutions only when named or given by type).
    method : {"tt", "svd", "tucker"}
        The factorisation.
    ctx : StageContext, optional
        Given by the pipeline; the per-layer records go to ``ctx.record("layers", ...)``.

    Returns
    -------
    nn.Module
        The decomposed model, in eval mode.

    Raises
    ------
    PipelineError
        A setting breaks its rule (``rank=0``, ``tol=1.5``, ``ratio=0.5``, ``method="cp"``).
    LayerError
        A named layer does not exist or cannot be decomposed, or ``ratio`` is out of reach.

    Examples
    --------
    >>> student = decompose_tt(teacher, rank=8)  # doctest: +SKIP
    >>> student = decompose_tt(teacher, ratio=20, layers=["classifier.fc1"])  # doctest: +SKIP
    """
    check_arguments(decompose_tt, {"rank": rank, "tol": tol, "ratio": ratio, "method": method})
    model = as_module(model, ctx.data if ctx is not None else None)
    if tol is not None or ratio is not None:
        rank = None
    new_model, records = tensorize(model, layers=layers, rank=rank, tol=tol, ratio=ratio,
                                   method=method)
    for rec in records:
        log.info("%s: %s %s ranks %s, %d -> %d params, rel. error %.3f", rec["name"],
                 rec["kind"], rec["in_modes"], rec["ranks"], rec["params_before"],
                 rec["params_after"], rec["rel_error"])
    if ctx is not None:
        ctx.record("layers", records)
        if any(rec["rel_error"] > 0.5 for rec in records):
            ctx.warn("decomposition error above 0.5 on "
                     + ", ".join(r["name"] for r in records if r["rel_error"] > 0.5)
                     + ": distill the student (or raise the ranks) before judging accuracy")
    return new_model.eval()
