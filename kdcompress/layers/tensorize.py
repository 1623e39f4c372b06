"""Replace the chosen layers of a model by factorised ones: TT, truncated SVD or Tucker-2.

:func:`tensorize` picks layers (by qualified name, by type, or every ``nn.Linear`` above a size),
factorises each with tensorly, and returns a copy of the model plus one record per layer
(modes, ranks, parameters before and after, relative reconstruction error). The ranks come from
a fixed ``rank``, a relative error bound ``tol``, or a whole-model compression ``ratio``, for
which a greedy search spends a parameter budget where it lowers the error most.

Methods, so the same model can be compared three ways:

* ``"tt"``: :class:`~kdcompress.layers.tt.TTLinear` / :class:`~kdcompress.layers.tt.TTConv2d`
  (Novikov et al. 2015; Garipov et al. 2016).
* ``"svd"``: ``Linear(in, out)`` -> ``Linear(in, r, bias=False) -> Linear(r, out)`` from the
  truncated SVD; a convolution -> ``Conv(C_in, r, k) -> Conv(r, C_out, 1)``.
* ``"tucker"``: Tucker-2 of a convolution kernel on its channel modes (Kim et al. 2016, tensorly's
  ``partial_tucker``): ``1x1 (C_in -> r_in) -> k x k (r_in -> r_out) -> 1x1 (r_out -> C_out)``.
  A matrix's Tucker-2 is its SVD, so ``Linear`` layers get the ``"svd"`` layers.

References
----------
.. [1] Y.-D. Kim et al. "Compression of Deep Convolutional Neural Networks for Fast and Low
   Power Mobile Applications", ICLR 2016.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from tensorly.tenalg.svd import svd_interface
from torch import nn

from kdcompress.errors import LayerError, did_you_mean
from kdcompress.layers.tt import TT_LAYERS, RankArg, TTConv2d, TTLinear, check_rank, set_module

__all__ = ["tensorize", "decompose_layer", "select_layers", "METHODS"]

METHODS = ("tt", "svd", "tucker")
_RANK_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 192, 256)
LayerSpec = str | type | Sequence[str | type] | None
#: ``rank`` of :func:`tensorize`: one setting for every layer, or one per layer by name.
RankSpec = RankArg | Mapping[str, RankArg]


def _rel_error(dense: torch.Tensor, approx: torch.Tensor) -> float:
    norm = float(dense.double().norm())
    return float((dense.double() - approx.double()).norm()) / norm if norm else 0.0


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tail_rank(s: np.ndarray, tol: float) -> int:
    """Smallest ``r`` with ``||s[r:]|| <= tol * ||s||``."""
    tail = np.sqrt(np.cumsum((s ** 2)[::-1]))[::-1]
    return max(1, int(np.sum(tail > tol * math.sqrt(float(np.sum(s ** 2))))))


def _svd(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    with tl.backend_context("numpy"):
        u, s, vt = svd_interface(matrix, n_eigenvecs=rank)
    return u, s, vt


def _svd_layer(layer: nn.Linear | nn.Conv2d, rank: RankArg, tol: float | None) -> nn.Module:
    w = layer.weight.detach().double()
    matrix = w.reshape(w.shape[0], -1).numpy()  # (out, in * kh * kw)
    if tol is not None:
        r = _tail_rank(np.linalg.svd(matrix, compute_uv=False), tol)
    else:
        r = int(rank) if isinstance(rank, (int, np.integer)) else min(matrix.shape)
    r = min(r, *matrix.shape)
    u, s, vt = _svd(matrix, r)
    first, second = np.sqrt(s)[:, None] * vt, u * np.sqrt(s)[None, :]  # (r, in), (out, r)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        module = nn.Sequential(nn.Linear(layer.in_features, r, bias=False),
                               nn.Linear(r, layer.out_features, bias=bias))
        shapes = [(r, layer.in_features), (layer.out_features, r)]
    else:
        module = nn.Sequential(
            nn.Conv2d(layer.in_channels, r, layer.kernel_size, stride=layer.stride,
                      padding=layer.padding, dilation=layer.dilation, bias=False),
            nn.Conv2d(r, layer.out_channels, 1, bias=bias))
        shapes = [(r, *w.shape[1:]), (layer.out_channels, r, 1, 1)]
    module = module.to(layer.weight.dtype)
    with torch.no_grad():
        for sub, value, shape in zip(module, (first, second), shapes, strict=True):
            sub.weight.copy_(torch.from_numpy(np.ascontiguousarray(value)).reshape(shape))
        if bias:
            module[-1].bias.copy_(layer.bias.detach())
    return module


def _tucker_ranks(kernel: np.ndarray, rank: RankArg, tol: float | None) -> list[int]:
    c_out, c_in = kernel.shape[:2]
    if tol is not None:
        ranks = []
        for mode in (0, 1):
            unfolding = np.moveaxis(kernel, mode, 0).reshape(kernel.shape[mode], -1)
            ranks.append(_tail_rank(np.linalg.svd(unfolding, compute_uv=False),
                                    tol / math.sqrt(2)))
        return ranks
    if rank is None:
        return [c_out, c_in]
    if isinstance(rank, (int, np.integer)):
        return [min(int(rank), c_out), min(int(rank), c_in)]
    if len(rank) != 2:
        raise LayerError(f"Tucker-2 of a convolution takes rank=int or [r_out, r_in], but got "
                         f"{rank}")
    return [min(int(rank[0]), c_out), min(int(rank[1]), c_in)]


def _tucker_layer(conv: nn.Conv2d, rank: RankArg, tol: float | None) -> nn.Module:
    kernel = conv.weight.detach().double().numpy()  # (C_out, C_in, kh, kw)
    r_out, r_in = _tucker_ranks(kernel, rank, tol)
    with tl.backend_context("numpy"):
        (core, (u_out, u_in)), _ = partial_tucker(kernel, rank=[r_out, r_in], modes=[0, 1],
                                                  init="svd", n_iter_max=20)
    module = nn.Sequential(
        nn.Conv2d(conv.in_channels, r_in, 1, bias=False),
        nn.Conv2d(r_in, r_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, bias=False),
        nn.Conv2d(r_out, conv.out_channels, 1, bias=conv.bias is not None))
    weights = [u_in.T[:, :, None, None], core, u_out[:, :, None, None]]
    module = module.to(conv.weight.dtype)
    with torch.no_grad():
        for sub, value in zip(module, weights, strict=True):
            sub.weight.copy_(torch.from_numpy(np.ascontiguousarray(value)))
        if conv.bias is not None:
            module[-1].bias.copy_(conv.bias.detach())
    return module


def _dense_weight(module: nn.Module, like: nn.Module) -> torch.Tensor:
    """The dense weight a replacement computes, read off by running it on the identity."""
    if isinstance(module, TT_LAYERS):
        return module.full_weight()
    first, *rest = list(module)
    if isinstance(like, nn.Linear):
        w = first.weight
        for sub in rest:
            w = sub.weight @ w
        return w
    if len(list(module)) == 2:  # svd conv: (r, C_in, kh, kw) then (C_out, r, 1, 1)
        return torch.einsum("or,rchw->ochw", rest[0].weight[:, :, 0, 0], first.weight)
    mid, last = rest  # tucker: (r_in, C_in, 1, 1), (r_out, r_in, kh, kw), (C_out, r_out, 1, 1)
    return torch.einsum("ob,bahw,ac->ochw", last.weight[:, :, 0, 0], mid.weight,
                        first.weight[:, :, 0, 0])


def decompose_layer(layer: nn.Linear | nn.Conv2d, *, method: str = "tt", rank: RankArg = None,
                    tol: float | None = None, name: str = "layer"
                    ) -> tuple[nn.Module, dict[str, Any]]:
    """Factorise one layer; return the replacement and its record.

    Examples
    --------
    >>> new, record = decompose_layer(nn.Linear(256, 128), rank=4)
    >>> record["kind"], record["params_after"] < record["params_before"]
    ('TTLinear', True)
    """
    where = f"layer '{name}' ({type(layer).__name__} with weight {tuple(layer.weight.shape)})"
    if method not in METHODS:
        raise LayerError(f"{where}: method must be one of {METHODS}, but got {method!r}."
                         f"{did_you_mean(str(method), METHODS)}")
    if not isinstance(layer, (nn.Linear, nn.Conv2d)) or type(layer) not in (nn.Linear,
                                                                            nn.Conv2d):
        raise LayerError(f"{where}: only nn.Linear and nn.Conv2d layers can be decomposed")
    try:
        check_rank(rank, tol, where)
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise LayerError(f"{where}: only groups=1 convolutions can be decomposed, but got "
                             f"groups={layer.groups}; leave this layer out")
        if method == "tt":
            new: nn.Module = (TTLinear.from_linear(layer, rank=rank, tol=tol)
                              if isinstance(layer, nn.Linear)
                              else TTConv2d.from_conv(layer, rank=rank, tol=tol))
        elif method == "tucker" and isinstance(layer, nn.Conv2d):
            new = _tucker_layer(layer, rank, tol)
        else:
            new = _svd_layer(layer, rank, tol)
    except LayerError as exc:
        raise LayerError(f"{exc}" if name in str(exc) else f"{where}: {exc}") from exc
    with torch.no_grad():
        error = _rel_error(layer.weight, _dense_weight(new, layer))
    if isinstance(new, TTLinear):
        in_modes, out_modes, ranks = list(new.in_modes), list(new.out_modes), list(new.ranks)
    elif isinstance(new, TTConv2d):
        in_modes, out_modes, ranks = [new.in_channels], [new.out_channels], list(new.ranks)
    else:
        in_modes, out_modes = [layer.weight.shape[1]], [layer.weight.shape[0]]
        ranks = [new[0].weight.shape[0]] if len(new) == 2 else [new[0].weight.shape[0],
                                                                new[1].weight.shape[0]]
    kind = type(new).__name__ if method == "tt" else ("tucker" if len(new) == 3 else "svd")
    record = {"name": name, "kind": kind, "method": method, "in_modes": in_modes,
              "out_modes": out_modes, "ranks": ranks, "params_before": _params(layer),
              "params_after": _params(new), "rel_error": error}
    return new, record


# ----------------------------------------------------------------------------------------------
# choosing layers


def select_layers(model: nn.Module, layers: LayerSpec = None, min_params: int = 0) -> list[str]:
    """The qualified names of the layers :func:`tensorize` decomposes for this ``layers``.

    ``None``: every ``nn.Linear`` with at least ``min_params`` weights (:func:`tensorize` then
    also skips those whose factorisation at the given rank would not be smaller). A layer type
    (``nn.Conv2d``) selects the layers of that type that can be decomposed: grouped and depthwise
    convolutions are left out (naming one is an error).

    Raises
    ------
    LayerError
        A named layer does not exist ("did you mean") or is not a Linear / Conv2d.

    Examples
    --------
    >>> select_layers(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
    ['0', '2']
    """
    return _select(model, layers, min_params)


def _select(model: nn.Module, layers: LayerSpec, min_params: int) -> list[str]:
    named = dict(model.named_modules())
    candidates = {n: m for n, m in named.items() if type(m) in (nn.Linear, nn.Conv2d)}
    if layers is None:
        return [n for n, m in candidates.items()
                if isinstance(m, nn.Linear) and m.weight.numel() >= min_params]
    items = [layers] if isinstance(layers, (str, type)) else list(layers)
    chosen: list[str] = []
    for item in items:
        if isinstance(item, type):
            chosen += [n for n, m in candidates.items()
                       if isinstance(m, item) and m.weight.numel() >= min_params
                       and getattr(m, "groups", 1) == 1]
        elif item in candidates:
            chosen.append(item)
        elif item in named:
            raise LayerError(f"layer '{item}' is a {type(named[item]).__name__}; only nn.Linear "
                             "and nn.Conv2d layers can be decomposed")
        else:
            raise LayerError(f"the model has no layer '{item}'.{did_you_mean(item, candidates)}"
                             f" Decomposable layers: {sorted(candidates)[:12]}")
    return list(dict.fromkeys(chosen))


# ----------------------------------------------------------------------------------------------
# rank search for a target compression


def _rank_candidates(layer: nn.Module, method: str) -> list[RankArg]:
    w = layer.weight
    if method == "tt" and isinstance(layer, nn.Linear):
        top = max(min(w.shape), 2)
    elif method == "tt":
        top = max(w.shape[0], w.shape[1])
    else:
        top = min(w.shape[0], w.shape[1] * (w[0, 0].numel() if method == "svd" else 1))
    return [r for r in _RANK_GRID if r <= top] or [1]


def _search_ranks(model: nn.Module, names: list[str], method: str, ratio: float
                  ) -> dict[str, RankArg]:
    """Ranks that bring the model to ``1/ratio`` of its parameters with the least error.

    Minimises the sum over layers of the squared relative errors: greedy, each step raises the
    rank of the layer that buys the largest error decrease per added parameter.
    """
    total = _params(model)
    budget = total / ratio
    options: dict[str, list[tuple[int, float, RankArg]]] = {}
    for name in names:
        layer = model.get_submodule(name)
        rows = []
        for rank in _rank_candidates(layer, method):
            _, rec = decompose_layer(layer, method=method, rank=rank, name=name)
            if rows and rec["params_after"] >= rec["params_before"]:
                break  # larger ranks only cost more than the dense layer
            rows.append((rec["params_after"], rec["rel_error"], rank))
            if rec["rel_error"] < 1e-6:
                break
        options[name] = sorted(rows, key=lambda row: (row[0], row[1]))
    fixed = total - sum(_params(model.get_submodule(n)) for n in names)
    pick = {n: 0 for n in names}
    used = fixed + sum(options[n][0][0] for n in names)
    if used > budget:
        raise LayerError(f"ratio={ratio} needs at most {budget:.0f} parameters, but even rank 1 "
                         f"on {len(names)} layer(s) leaves {used} (the other layers hold {fixed}): "
                         f"the largest reachable ratio is {total / used:.2f}; lower ratio or "
                         "decompose more layers")
    while True:
        best: tuple[float, str, int] | None = None
        for n in names:
            p0, e0, _ = options[n][pick[n]]
            for j in range(pick[n] + 1, len(options[n])):
                p1, e1, _ = options[n][j]
                gain = e0 ** 2 - e1 ** 2
                if gain <= 0 or used + p1 - p0 > budget:
                    continue
                score = gain / max(p1 - p0, 1)
                if best is None or score > best[0]:
                    best = (score, n, j)
        if best is None:
            return {n: options[n][pick[n]][2] for n in names}
        _, n, j = best
        used += options[n][j][0] - options[n][pick[n]][0]
        pick[n] = j


def tensorize(model: nn.Module, *, layers: LayerSpec = None, rank: RankSpec = None,
              tol: float | None = None, ratio: float | None = None, method: str = "tt",
              min_params: int = 0) -> tuple[nn.Module, list[dict[str, Any]]]:
    """A copy of ``model`` with the chosen layers factorised, and one record per layer.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    layers : str, type, or list of them, optional
        Qualified names (``"classifier.fc1"``) and/or types (``nn.Conv2d``). ``None``: every
        ``nn.Linear``, skipping those whose factorisation would not be smaller.
    rank : int, list of int, or dict of str to them, optional
        Ranks for every chosen layer (see :meth:`TTLinear.from_linear`), or a rank per layer
        by qualified name (``{"classifier.fc1": 8, "classifier.fc2": 4}``): then exactly the
        layers named there are decomposed (each must be among those ``layers`` selects).
    tol : float, optional
        Relative Frobenius error bound per layer.
    ratio : float, optional
        Target compression of the whole model (parameters before / after, > 1); the ranks are
        searched per layer to reach it with the least total squared relative error.
    method : {"tt", "svd", "tucker"}
        The factorisation (see the module docstring).
    min_params : int
        Type-selected layers (and ``layers=None``) with fewer weights than this are left alone.

    Give at most one of ``rank``, ``tol``, ``ratio``; none keeps full ranks (exact).

    Returns
    -------
    (nn.Module, list of dict)
        The new model and records ``{name, kind, method, in_modes, out_modes, ranks,
        params_before, params_after, rel_error}``.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
    >>> small, records = tensorize(model, layers=["0"], rank=8)
    >>> records[0]["params_after"] < records[0]["params_before"]
    True
    """
    given = [k for k, v in (("rank", rank), ("tol", tol), ("ratio", ratio)) if v is not None]
    if len(given) > 1:
        raise LayerError(f"tensorize: give one of rank, tol, ratio, but got {', '.join(given)}")
    if ratio is not None and not ratio > 1:
        raise LayerError(f"tensorize: ratio is a compression factor > 1, but got ratio={ratio}")
    if method not in METHODS:
        raise LayerError(f"tensorize: method must be one of {METHODS}, but got {method!r}."
                         f"{did_you_mean(str(method), METHODS)}")
    per_layer = isinstance(rank, Mapping)
    names = _per_layer_names(model, layers, rank) if per_layer else _select(model, layers,
                                                                            min_params)
    if not names:
        grouped = [n for n, m in model.named_modules()
                   if isinstance(m, nn.Conv2d) and m.groups != 1]
        hint = (f"; grouped or depthwise convolutions ({', '.join(grouped[:4])}) cannot be "
                "decomposed and are left out of a selection by type" if grouped else "")
        raise LayerError(f"tensorize: no layer to decompose (layers={layers!r}, "
                         f"min_params={min_params}){hint}")
    ranks: dict[str, RankArg] = dict(rank) if per_layer else {n: rank for n in names}
    if ratio is not None:
        ranks = _search_ranks(model, names, method, ratio)
    new_model = copy.deepcopy(model)
    records = []
    for name in names:
        layer = model.get_submodule(name)
        new, record = decompose_layer(layer, method=method, rank=ranks[name], tol=tol, name=name)
        if layers is None and not per_layer and record["params_after"] >= record["params_before"]:
            continue
        new.train(layer.training)
        new_model = set_module(new_model, name, new)
        records.append(record)
    return new_model, records


def _per_layer_names(model: nn.Module, layers: LayerSpec, rank: Mapping[str, RankArg]
                     ) -> list[str]:
    """The keys of a per-layer rank mapping, checked against the layers ``layers`` selects."""
    names = _select(model, list(rank), 0) if rank else []
    if layers is not None:
        allowed = set(_select(model, layers, 0))
        outside = [n for n in names if n not in allowed]
        if outside:
            raise LayerError(f"tensorize: rank names layer(s) {outside} that layers={layers!r} "
                             f"does not select; add them to layers or drop them from rank")
    return names
