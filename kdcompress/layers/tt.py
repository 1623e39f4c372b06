"""Tensor-Train layers: a dense ``nn.Linear`` or ``nn.Conv2d`` stored as a chain of small cores.

:class:`TTLinear` is the TT-matrix layer of Novikov et al. 2015. The weight ``W`` of shape
``(out_features, in_features)`` is padded to ``(M, N)`` with ``M = prod(out_modes)``,
``N = prod(in_modes)`` and reshaped to a tensor with indices ``(i_1..i_d, j_1..j_d)``
(``i`` the output modes ``m_k``, ``j`` the input modes ``n_k``, row-major). Core ``k`` has shape
``(r_{k-1}, m_k, n_k, r_k)`` with ``r_0 = r_d = 1``, and::

    W[i_1..i_d, j_1..j_d] = G_1[:, i_1, j_1, :] @ G_2[:, i_2, j_2, :] @ ... @ G_d[:, i_d, j_d, :]

:class:`TTConv2d` follows Garipov et al. 2016 with the spatial kernel as cores of their own: the
kernel, read as a tensor ``(C_in, k_h, k_w, C_out)``, is a 4-core TT and the layer runs as the
convolution chain ``1x1 -> k_h x 1 -> 1 x k_w -> 1x1``, which is exactly the dense convolution at
full rank and exports to ONNX as four plain ``Conv`` nodes.

Both layers keep their structure in public plain attributes (modes, ranks as tuples of ints) and
their cores as parameters ``core0``, ``core1``, ..., so :mod:`kdcompress.artifacts` saves and
rebuilds them without pickling. The forward pass uses only reshape, transpose and matmul (conv for
:class:`TTConv2d`), which ONNX exports as ``MatMul``/``Reshape``/``Transpose`` nodes with a
dynamic batch axis and which ONNX Runtime quantizes to int8.

References
----------
.. [1] A. Novikov, D. Podoprikhin, A. Osokin, D. Vetrov. "Tensorizing Neural Networks",
   NeurIPS 2015.
.. [2] T. Garipov, D. Podoprikhin, A. Novikov, D. Vetrov. "Ultimate tensorization: compressing
   convolutional and FC layers alike", NeurIPS workshop 2016.
.. [3] I. Oseledets. "Tensor-train decomposition", SIAM J. Sci. Comput. 33(5), 2011.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorly as tl
import torch
import torch.nn.functional as F
from tensorly.decomposition import tensor_train, tensor_train_matrix
from torch import nn

from kdcompress.errors import LayerError

__all__ = [
    "TTLinear",
    "TTConv2d",
    "TT_LAYERS",
    "RankArg",
    "factorize",
    "choose_modes",
    "materialize",
    "tt_ranks_for_tol",
    "max_ranks",
    "check_rank",
    "set_module",
]

RankArg = int | Sequence[int] | None


# ----------------------------------------------------------------------------------------------
# mode factorisation


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def factorize(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors as equal as possible, arranged small-large-small.

    The factors minimise the largest factor (then the spread); the largest ones go to the middle,
    because the boundary TT ranks are capped by the boundary modes, which keeps them cheap.

    Examples
    --------
    >>> factorize(1024, 4)
    (4, 8, 8, 4)
    >>> factorize(784, 3)
    (7, 14, 8)
    """
    if n < 1 or d < 1:
        raise LayerError(f"cannot factorize {n} into {d} modes: both must be >= 1")
    best: tuple[int, ...] | None = None

    def search(rest: int, k: int, low: int, acc: tuple[int, ...]) -> None:
        nonlocal best
        if k == 1:
            if rest >= low:
                cand = (*acc, rest)
                key = (max(cand), sum(math.log(f) ** 2 for f in cand))
                if best is None or key < (max(best), sum(math.log(f) ** 2 for f in best)):
                    best = cand
            return
        for f in _divisors(rest):
            if f >= low and f ** k <= rest:
                search(rest // f, k - 1, f, (*acc, f))

    search(n, d, 1, ())
    assert best is not None
    ascending = sorted(best)
    arranged: list[int] = [0] * d
    left, right = 0, d - 1
    for i, f in enumerate(ascending):  # small at the ends, large in the middle
        if i % 2 == 0:
            arranged[left] = f
            left += 1
        else:
            arranged[right] = f
            right -= 1
    return tuple(arranged)


def _padded_factorize(n: int, d: int) -> tuple[int, ...]:
    """Balanced factors of the smallest ``n' >= n`` whose largest factor is at most twice the ideal.

    Sizes with a large prime factor (``1021``, or ``10`` into 3 modes) would otherwise get one huge
    mode; padding the layer with zero rows or columns up to ``n'`` keeps the modes balanced.
    """
    bound = 2 * math.ceil(n ** (1.0 / d) - 1e-9)
    size = n
    while True:
        modes = factorize(size, d)
        if max(modes) <= max(bound, 2):
            return modes
        size += 1


def choose_modes(in_features: int, out_features: int,
                 d: int | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input and output modes for a ``out_features x in_features`` weight.

    ``d`` (the number of cores) defaults to ``ceil(log2(max size) / 3)`` clipped to [2, 6], so that
    modes are around 8. Each side is factorised by :func:`factorize`; a size whose balanced
    factorisation has a mode more than twice the ideal ``size**(1/d)`` is rounded up to the next
    size that factorises well, and the layer zero-pads (inputs) or drops (outputs) the extra
    entries.

    Examples
    --------
    >>> choose_modes(1024, 1024)
    ((4, 8, 8, 4), (4, 8, 8, 4))
    """
    if d is None:
        d = min(6, max(2, math.ceil(math.log2(max(in_features, out_features, 2)) / 3)))
    return _padded_factorize(in_features, d), _padded_factorize(out_features, d)


# ----------------------------------------------------------------------------------------------
# TT-SVD helpers (tensorly on float64 numpy arrays)


def check_rank(rank: RankArg, tol: float | None, where: str) -> None:
    """Check a layer's ``rank`` / ``tol`` pair before factorising it.

    Parameters
    ----------
    rank : int, list of int or None
        Maximal TT ranks: one for every bond, or one per bond; ``None`` for full ranks.
    tol : float or None
        Relative Frobenius error bound in ``[0, 1)``; exclusive with ``rank``.
    where : str
        Names the layer in the error (``"'fc1' (Linear with weight (128, 1024))"``).

    Raises
    ------
    LayerError
        Both given, a rank that is not an integer >= 1, or ``tol`` outside ``[0, 1)``.
    """
    if rank is not None and tol is not None:
        raise LayerError(f"{where}: give rank or tol, not both (got rank={rank}, tol={tol})")
    ranks = [rank] if isinstance(rank, int) else list(rank or [])
    if any((not isinstance(r, (int, np.integer))) or r < 1 for r in ranks):
        raise LayerError(f"{where}: ranks must be integers >= 1, but got rank={rank}")
    if tol is not None and not 0 <= tol < 1:
        raise LayerError(f"{where}: tol is a relative error in [0, 1), but got tol={tol}")


def tt_ranks_for_tol(tensor: np.ndarray, tol: float) -> list[int]:
    """Smallest TT ranks whose TT-SVD has relative Frobenius error at most ``tol``.

    Implements the delta-truncation of Oseledets' TT-SVD (each of the ``d - 1`` SVDs may drop
    ``tol / sqrt(d - 1)`` of the norm), which bounds the total error by ``tol``.
    """
    shape = tensor.shape
    d = len(shape)
    if d == 1:
        return [1, 1]
    delta = tol * float(np.linalg.norm(tensor)) / math.sqrt(d - 1)
    ranks = [1]
    unfolding = tensor
    for k in range(d - 1):
        unfolding = unfolding.reshape(ranks[-1] * shape[k], -1)
        u, s, vt = np.linalg.svd(unfolding, full_matrices=False)
        tail = np.sqrt(np.cumsum((s ** 2)[::-1]))[::-1]  # tail[i] = norm of s[i:]
        keep = int(np.sum(tail > delta)) or 1
        ranks.append(keep)
        unfolding = s[:keep, None] * vt[:keep]
    ranks.append(1)
    return ranks


def _full_rank_list(rank: RankArg, d: int, caps: list[int], where: str) -> list[int]:
    """``rank`` as ``[1, r_1, ..., r_{d-1}, 1]`` clipped to what the sizes allow."""
    if isinstance(rank, (int, np.integer)):
        inner = [int(rank)] * (d - 1)
    elif rank is None:
        inner = caps[1:-1]
    else:
        inner = [int(r) for r in rank]
        if len(inner) == d + 1:
            if inner[0] != 1 or inner[-1] != 1:
                raise LayerError(f"{where}: the boundary ranks must be 1, but got rank={rank}")
            inner = inner[1:-1]
        if len(inner) != d - 1:
            raise LayerError(f"{where}: a rank list for {d} cores has {d - 1} inner ranks (or "
                             f"{d + 1} with the boundary 1s), but got {len(list(rank))}: {rank}")
    return [1, *[min(r, m) for r, m in zip(inner, caps[1:-1], strict=True)], 1]


def max_ranks(sizes: Sequence[int]) -> list[int]:
    """The largest TT ranks ``[1, r_1, ..., r_{d-1}, 1]`` of a tensor with these mode sizes.

    Bond ``k`` cannot exceed the smaller of the products of the sizes on either side of it: at
    these ranks a TT-SVD is exact.

    Examples
    --------
    >>> max_ranks([4, 8, 8, 4])
    [1, 4, 32, 4, 1]
    """
    return [1, *[min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))],
            1]


# ----------------------------------------------------------------------------------------------
# TTLinear


def _in_eager() -> bool:
    return not (torch.jit.is_tracing() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


def _fill(layer: Any, cores: Sequence[np.ndarray], bias: torch.Tensor | None,
          like: torch.Tensor) -> Any:
    """Copy factor arrays and a bias into a new layer, with ``like``'s dtype and device."""
    layer = layer.to(like.dtype)
    with torch.no_grad():
        for core, array in zip(layer.cores, cores, strict=True):
            core.copy_(torch.from_numpy(np.ascontiguousarray(array)).to(like.dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach())
    return layer.to(like.device)


class TTLinear(nn.Module):
    """A linear layer whose weight is a TT-matrix (Novikov et al. 2015).

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output, as in :class:`torch.nn.Linear`.
    in_modes, out_modes : tuple of int
        Factorisations with ``prod(in_modes) >= in_features`` and ``prod(out_modes) >=
        out_features`` (equal length ``d``); the excess is zero padding.
    ranks : tuple of int
        ``(1, r_1, ..., r_{d-1}, 1)``.
    bias : bool
        Whether the layer has a bias.

    Attributes
    ----------
    forward_mode : str
        ``"auto"`` (default) contracts the input with the cores, or rebuilds ``W`` and does one
        matmul when that needs fewer multiply-adds for the batch at hand (a contraction MAC
        counted as :attr:`FACTORIZED_MAC_COST` dense ones); ``"factorized"`` and
        ``"dense"`` force one path. While exported or traced, ``"auto"`` is ``"factorized"``.

    Examples
    --------
    >>> layer = TTLinear.from_linear(nn.Linear(784, 512), rank=8)
    >>> layer(torch.randn(2, 784)).shape
    torch.Size([2, 512])
    >>> layer.in_modes, layer.out_modes
    ((4, 7, 7, 4), (4, 4, 8, 4))
    """

    #: A multiply-add of the contraction costs about this many of one large dense matmul (its
    #: matmuls are skinny and memory-bound; measured with ``benchmarks/bench_tt.py`` on CPU).
    FACTORIZED_MAC_COST = 2.0

    def __init__(self, in_features: int, out_features: int, *, in_modes: Sequence[int],
                 out_modes: Sequence[int], ranks: Sequence[int], bias: bool = True) -> None:
        super().__init__()
        in_modes, out_modes, ranks = tuple(in_modes), tuple(out_modes), tuple(ranks)
        where = f"TTLinear({in_features}, {out_features})"
        if len(in_modes) != len(out_modes) or len(ranks) != len(in_modes) + 1:
            raise LayerError(f"{where}: in_modes and out_modes need the same length d and ranks "
                             f"length d + 1, but got {in_modes}, {out_modes}, {ranks}")
        if math.prod(in_modes) < in_features or math.prod(out_modes) < out_features:
            raise LayerError(f"{where}: the modes must cover the sizes (prod(in_modes) >= "
                             f"in_features), but got in_modes={in_modes}, out_modes={out_modes}")
        if ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise LayerError(f"{where}: ranks must be >= 1 with boundary ranks 1, but got {ranks}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.in_modes = tuple(int(n) for n in in_modes)
        self.out_modes = tuple(int(m) for m in out_modes)
        self.ranks = tuple(int(r) for r in ranks)
        self.forward_mode = "auto"
        # Variance of W ~ 1 / (3 in_features), like nn.Linear's default init.
        std = (1.0 / (3 * in_features * math.prod(ranks))) ** (1.0 / (2 * self.order))
        for k in range(self.order):
            shape = (ranks[k], self.out_modes[k], self.in_modes[k], ranks[k + 1])
            self.register_parameter(f"core{k}", nn.Parameter(torch.randn(shape) * std))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("input_index", None)

    # ---- structure ------------------------------------------------------------------------

    @property
    def order(self) -> int:
        """Number of cores ``d``."""
        return len(self.in_modes)

    @property
    def cores(self) -> list[torch.Tensor]:
        """The cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)``."""
        return [getattr(self, f"core{k}") for k in range(self.order)]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
                f"bias={self.bias is not None}")

    def num_core_params(self) -> int:
        """``sum_k r_{k-1} m_k n_k r_k``."""
        r, m, n = self.ranks, self.out_modes, self.in_modes
        return sum(r[k] * m[k] * n[k] * r[k + 1] for k in range(self.order))

    def macs(self, batch: int = 1) -> dict[str, int]:
        """Multiply-adds of each forward path for ``batch`` samples.

        Returns ``factorized`` (the cheaper contraction order), ``left``/``right`` (both orders),
        ``dense`` (rebuild ``W`` then one matmul) and ``linear`` (the matmul alone, as
        ``nn.Linear``).
        """
        r, m, n, d = self.ranks, self.out_modes, self.in_modes, self.order
        left = sum(r[k] * n[k] * m[k] * r[k + 1] * math.prod(m[:k]) * math.prod(n[k + 1:])
                   for k in range(d))
        right = sum(r[k] * n[k] * m[k] * r[k + 1] * math.prod(m[k + 1:]) * math.prod(n[:k])
                    for k in range(d))
        build = sum(math.prod(m[:k]) * math.prod(n[:k]) * r[k] * m[k] * n[k] * r[k + 1]
                    for k in range(1, d))
        linear = batch * self.out_features * self.in_features
        return {"factorized": batch * min(left, right), "left": batch * left,
                "right": batch * right, "dense": build + linear, "linear": linear}

    # ---- forward --------------------------------------------------------------------------

    def _expand_input(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_features) -> (B, N): zero padding, or the gather left by input pruning.

        ``input_index`` holds, for each position of the padded input, the input feature it
        reads (``in_features``: zero); or, when its length is ``N / b``, the same for blocks of
        ``b`` consecutive features (a pruned channel of a flattened feature map), ``b`` times
        smaller.
        """
        n_pad = math.prod(self.in_modes)
        if self.input_index is not None:
            block = n_pad // self.input_index.numel()
            if block == 1:
                return F.pad(x, (0, 1)).index_select(1, self.input_index)
            blocks = F.pad(x.reshape(x.shape[0], -1, block), (0, 0, 0, 1))
            return blocks.index_select(1, self.input_index).reshape(x.shape[0], n_pad)
        if n_pad > self.in_features:
            return F.pad(x, (0, n_pad - self.in_features))
        return x

    def feature_index(self) -> torch.Tensor:
        """``input_index`` per padded input position (``in_features``: zero), expanded from
        blocks when it is stored per block."""
        index = self.input_index
        if index is None:
            return torch.clamp(torch.arange(math.prod(self.in_modes)), max=self.in_features)
        block = math.prod(self.in_modes) // index.numel()
        if block == 1:
            return index.long()
        features = (index.long()[:, None] * block + torch.arange(block, device=index.device))
        return torch.clamp(features.reshape(-1), max=self.in_features)

    def _contract_left(self, x: torch.Tensor) -> torch.Tensor:
        # state (B, M_{<k}, r_{k-1}, n_k, N_{>k}): core k multiplies the (r_{k-1} n_k) axis in
        # place, one (batched) matmul per core and no transpose of the state
        r, m, n = self.ranks, self.out_modes, self.in_modes
        t = x
        for k, core in enumerate(self.cores):
            a = core.permute(1, 3, 0, 2).reshape(m[k] * r[k + 1], r[k] * n[k])
            rest = math.prod(n[k + 1:])
            if rest == 1:
                t = t.reshape(-1, r[k] * n[k]) @ a.t()  # (B M_{<k}, m_k r_k)
            else:
                t = torch.matmul(a, t.reshape(-1, r[k] * n[k], rest))  # (B M_{<k}, m_k r_k, N)
        return t.reshape(-1, math.prod(m))

    def _contract_right(self, x: torch.Tensor) -> torch.Tensor:
        # from the last core: state (M_{>k}, B, N_{<k}, n_k r_k), one 2-D transpose + matmul each
        r, m, n, d = self.ranks, self.out_modes, self.in_modes, self.order
        t = x
        for k in range(d - 1, -1, -1):
            a = self.cores[k].permute(2, 3, 0, 1).reshape(n[k] * r[k + 1], r[k] * m[k])
            t = t.reshape(-1, n[k] * r[k + 1]) @ a  # (M_{>k} B N_{<k}, r_{k-1} m_k)
            if k:
                t = t.reshape(-1, m[k]).transpose(0, 1)
        return t.reshape(math.prod(m[1:]), -1).transpose(0, 1).reshape(-1, math.prod(m))

    def full_weight(self) -> torch.Tensor:
        """``W`` of shape ``(out_features, in_features)`` rebuilt from the cores."""
        # w (M_{<=k}, N_{<=k}, r_k) kept in W's own layout: one matmul per core, then m_k is
        # moved next to M_{<k} by a 4-D transpose (no 2d-dimensional permute of the full W)
        m, n, r = self.out_modes, self.in_modes, self.ranks
        w = self.core0  # (1, m_1, n_1, r_1)
        for k in range(1, self.order):
            rows, cols = math.prod(m[:k]), math.prod(n[:k])
            w = w.reshape(rows * cols, r[k]) @ self.cores[k].reshape(r[k], -1)
            w = w.reshape(rows, cols, m[k], n[k] * r[k + 1]).transpose(1, 2)
        w = w.reshape(math.prod(m), math.prod(n))[: self.out_features]  # (out, N)
        if self.input_index is not None:
            cols = w.new_zeros(self.out_features, self.in_features + 1)
            return cols.index_add(1, self.feature_index(), w)[:, : self.in_features]
        return w[:, : self.in_features]

    def _plan(self) -> tuple[bool, int, int, int]:
        """(left order cheaper, MACs per sample factorised, MACs to rebuild W, MACs per sample
        of the dense matmul), computed once per structure."""
        key = (self.in_modes, self.out_modes, self.ranks, self.in_features, self.out_features)
        cached = getattr(self, "_plan_cache", None)
        if cached is None or cached[0] != key:
            macs = self.macs(1)
            plan = (macs["left"] <= macs["right"], macs["factorized"],
                    macs["dense"] - macs["linear"], macs["linear"])
            self._plan_cache = cached = (key, plan)
        return cached[1]

    def _use_dense(self, batch: int, eager: bool = True) -> bool:
        if self.forward_mode == "dense" or getattr(self, "_dense_trace", False):
            return True
        if self.forward_mode == "factorized" or not eager:
            return False
        _, fact, build, linear = self._plan()
        return build + batch * linear < self.FACTORIZED_MAC_COST * batch * fact

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eager = _in_eager()
        batch = x.numel() // self.in_features if eager else 1
        if self._use_dense(batch, eager):
            weight = self.full_weight()
            if getattr(self, "_dense_trace", False):
                weight = weight.detach()
            return F.linear(x, weight, self.bias)
        lead = x.shape[:-1]
        xe = self._expand_input(x.reshape(-1, self.in_features))  # (B, N)
        y = self._contract_left(xe) if self._plan()[0] else self._contract_right(xe)
        if y.shape[-1] != self.out_features:
            y = y[:, : self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    # ---- conversion -----------------------------------------------------------------------

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: RankArg = None, tol: float | None = None,
                    in_modes: Sequence[int] | None = None,
                    out_modes: Sequence[int] | None = None) -> TTLinear:
        """A TT layer initialised from ``linear`` by TT-SVD (tensorly's ``tensor_train_matrix``).

        Parameters
        ----------
        linear : nn.Linear
            The dense layer; it is not modified.
        rank : int or list of int, optional
            Maximal TT ranks (one int for all, or ``d - 1`` inner ranks). ``None`` with ``tol``
            ``None`` keeps full ranks: an exact copy.
        tol : float, optional
            Relative Frobenius error bound; the smallest ranks that meet it are chosen.
        in_modes, out_modes : list of int, optional
            Factorisations of the sizes (products may exceed them: zero padding); chosen by
            :func:`choose_modes` when not given.
        """
        where = f"TTLinear.from_linear(Linear({linear.in_features}, {linear.out_features}))"
        check_rank(rank, tol, where)
        if (in_modes is None) != (out_modes is None):
            auto_in, auto_out = choose_modes(linear.in_features, linear.out_features,
                                             len(in_modes or out_modes or ()))
            in_modes, out_modes = in_modes or auto_in, out_modes or auto_out
        elif in_modes is None:
            in_modes, out_modes = choose_modes(linear.in_features, linear.out_features)
        in_modes, out_modes = tuple(in_modes), tuple(out_modes)
        d = len(in_modes)
        n_pad, m_pad = math.prod(in_modes), math.prod(out_modes)
        if len(out_modes) != d or n_pad < linear.in_features or m_pad < linear.out_features:
            raise LayerError(f"{where}: in_modes {in_modes} and out_modes {out_modes} must have "
                             "equal length and products at least the layer's sizes")
        w = np.zeros((m_pad, n_pad))
        w[: linear.out_features, : linear.in_features] = linear.weight.detach().double().numpy()
        sizes = [m * n for m, n in zip(out_modes, in_modes, strict=True)]
        if tol is not None:
            interleaved = w.reshape(*out_modes, *in_modes).transpose(
                [i for k in range(d) for i in (k, d + k)]).reshape(sizes)
            ranks = tt_ranks_for_tol(interleaved, tol)
        else:
            ranks = _full_rank_list(rank, d, max_ranks(sizes), where)
        with tl.backend_context("numpy"):
            factors = tensor_train_matrix(w.reshape(*out_modes, *in_modes), list(ranks)).factors
        ranks = [1, *[f.shape[-1] for f in factors]]
        layer = cls(linear.in_features, linear.out_features, in_modes=in_modes,
                    out_modes=out_modes, ranks=ranks, bias=linear.bias is not None)
        return _fill(layer, factors, linear.bias, linear.weight)

    def to_dense(self) -> nn.Linear:
        """The equivalent ``nn.Linear`` (same weight and bias)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            layer.weight.copy_(self.full_weight())
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.to(self.core0.device, self.core0.dtype)

    def round(self, *, rank: RankArg = None, tol: float | None = None) -> TTLinear:
        """A copy with truncated ranks (TT-rounding by re-running TT-SVD on this layer's weight).

        Examples
        --------
        >>> small = TTLinear.from_linear(nn.Linear(64, 64), rank=8).round(rank=4)
        >>> small.ranks
        (1, 4, 1)
        """
        dense = self.to_dense().double()
        new = TTLinear.from_linear(dense, rank=rank, tol=tol, in_modes=self.in_modes,
                                   out_modes=self.out_modes)
        new.forward_mode = self.forward_mode
        return new.to(self.core0.dtype)


# ----------------------------------------------------------------------------------------------
# TTConv2d


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)  # type: ignore[return-value]


class TTConv2d(nn.Module):
    """A 2-D convolution whose kernel ``(C_in, k_h, k_w, C_out)`` is a 4-core TT.

    Runs as ``1x1 (C_in -> r_1) -> k_h x 1 (r_1 -> r_2) -> 1 x k_w (r_2 -> r_3) -> 1x1
    (r_3 -> C_out, + bias)``; stride, padding and dilation are split between the two spatial
    convolutions, so at full rank the chain equals the dense convolution (Garipov et al. 2016,
    with the spatial kernel as its own cores). The cores are stored directly as the four
    convolution weights ``core0..core3`` (shapes ``(r_1, C_in, 1, 1)``, ``(r_2, r_1, k_h, 1)``,
    ``(r_3, r_2, 1, k_w)``, ``(C_out, r_3, 1, 1)``), so the ONNX graph is four ``Conv`` nodes
    whose weights are initializers.

    Examples
    --------
    >>> conv = nn.Conv2d(64, 128, 3, padding=1)
    >>> tt = TTConv2d.from_conv(conv, rank=16)
    >>> tt(torch.randn(1, 64, 8, 8)).shape
    torch.Size([1, 128, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int], *,
                 ranks: Sequence[int], stride: int | Sequence[int] = 1,
                 padding: int | Sequence[int] | str = 0, dilation: int | Sequence[int] = 1,
                 bias: bool = True) -> None:
        super().__init__()
        ranks = tuple(int(r) for r in ranks)
        if len(ranks) != 5 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
            raise LayerError(f"TTConv2d({in_channels}, {out_channels}): ranks are (1, r1, r2, "
                             f"r3, 1) with r >= 1, but got {ranks}")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size = _pair(kernel_size)
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        if isinstance(padding, str) and padding not in ("same", "valid"):
            raise LayerError(f"TTConv2d: padding is an int, a pair, 'same' or 'valid', "
                             f"but got {padding!r}")
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.ranks = ranks
        kh, kw = self.kernel_size
        _, r1, r2, r3, _ = ranks
        shapes = [(r1, in_channels, 1, 1), (r2, r1, kh, 1), (r3, r2, 1, kw),
                  (out_channels, r3, 1, 1)]
        fan = [in_channels, r1 * kh, r2 * kw, r3]
        for k, (shape, f) in enumerate(zip(shapes, fan, strict=True)):
            self.register_parameter(f"core{k}",
                                    nn.Parameter(torch.randn(shape) / math.sqrt(3 * f)))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def cores(self) -> list[torch.Tensor]:
        """The four convolution weights, in execution order."""
        return [self.core0, self.core1, self.core2, self.core3]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, ranks={self.ranks}")

    def num_core_params(self) -> int:
        """Parameters of the four cores."""
        return sum(c.numel() for c in self.cores)

    def _axis_padding(self) -> tuple[Any, Any]:
        if isinstance(self.padding, str):
            return self.padding, self.padding
        return (self.padding[0], 0), (0, self.padding[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W)
        if getattr(self, "_dense_trace", False):  # one conv, for torch-pruning's trace
            return F.conv2d(x, self.full_weight().detach(), self.bias, self.stride,
                            self.padding, self.dilation)
        (sh, sw), (dh, dw) = self.stride, self.dilation
        pad_h, pad_w = self._axis_padding()
        x = F.conv2d(x, self.core0)  # (B, r1, H, W)
        x = F.conv2d(x, self.core1, stride=(sh, 1), padding=pad_h, dilation=(dh, 1))
        x = F.conv2d(x, self.core2, stride=(1, sw), padding=pad_w, dilation=(1, dw))
        return F.conv2d(x, self.core3, self.bias)  # (B, C_out, H', W')

    def full_weight(self) -> torch.Tensor:
        """The dense kernel ``(C_out, C_in, k_h, k_w)``."""
        g0 = self.core0[:, :, 0, 0]  # (r1, C_in)
        g1 = self.core1[:, :, :, 0]  # (r2, r1, kh)
        g2 = self.core2[:, :, 0, :]  # (r3, r2, kw)
        g3 = self.core3[:, :, 0, 0]  # (C_out, r3)
        return torch.einsum("ac,bai,ebj,oe->ocij", g0, g1, g2, g3)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, rank: RankArg = None,
                  tol: float | None = None) -> TTConv2d:
        """A TT convolution initialised from ``conv`` by TT-SVD (tensorly's ``tensor_train``).

        ``rank`` is one int or the inner ranks ``(r1, r2, r3)``; ``tol`` a relative Frobenius
        error bound; neither keeps full ranks (exact). Only ``groups=1`` and zero padding.
        """
        c_out, c_in, kh, kw = conv.weight.shape
        where = f"TTConv2d.from_conv(Conv2d({c_in}, {c_out}, kernel_size=({kh}, {kw})))"
        if conv.groups != 1:
            raise LayerError(f"{where}: only groups=1 convolutions can be TT-decomposed, but "
                             f"got groups={conv.groups}; leave this layer out")
        if conv.padding_mode != "zeros":
            raise LayerError(f"{where}: only padding_mode='zeros' is supported, but got "
                             f"{conv.padding_mode!r}")
        if conv.padding == "same" and tuple(conv.stride) != (1, 1):
            raise LayerError(f"{where}: padding='same' needs stride 1, but got {conv.stride}")
        check_rank(rank, tol, where)
        kernel = conv.weight.detach().double().permute(1, 2, 3, 0).numpy()  # (C_in, kh, kw, C_out)
        if tol is not None:
            ranks = tt_ranks_for_tol(kernel, tol)
        else:
            ranks = _full_rank_list(rank, 4, max_ranks(kernel.shape), where)
        with tl.backend_context("numpy"):
            f0, f1, f2, f3 = tensor_train(np.ascontiguousarray(kernel), list(ranks)).factors
        ranks = [1, f0.shape[-1], f1.shape[-1], f2.shape[-1], 1]
        layer = cls(c_in, c_out, (kh, kw), ranks=ranks, stride=conv.stride,
                    padding=conv.padding, dilation=conv.dilation, bias=conv.bias is not None)
        weights = [f0[0].T[:, :, None, None], f1.transpose(2, 0, 1)[..., None],
                   f2.transpose(2, 0, 1)[:, :, None, :], f3[..., 0].T[:, :, None, None]]
        return _fill(layer, weights, conv.bias, conv.weight)

    def to_dense(self) -> nn.Conv2d:
        """The equivalent ``nn.Conv2d``."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation,
                         bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(self.full_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv.to(self.core0.device, self.core0.dtype)


#: The tensor-train layer classes; ``isinstance(module, TT_LAYERS)`` tells whether a module is one.
TT_LAYERS: tuple[type[nn.Module], ...] = (TTLinear, TTConv2d)


# ----------------------------------------------------------------------------------------------
# materialize: choose factorised or dense per layer for deployment


def _compare_times(layer: nn.Module, dense: nn.Module, x: torch.Tensor, device: torch.device,
                   repeats: int = 15) -> tuple[float, float]:
    """Median seconds of ``layer`` (factorised) and ``dense`` on ``x``, timed interleaved on
    ``device`` (synchronised after every call on CUDA)."""
    from kdcompress.metrics import MeasureConfig, time_calls

    factorized = copy.deepcopy(layer).to(device).eval()
    if hasattr(factorized, "forward_mode"):
        factorized.forward_mode = "factorized"
    dense = copy.deepcopy(dense).to(device).eval()
    x = x.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad():
        fact_ms, dense_ms = time_calls([lambda: factorized(x), lambda: dense(x)],
                                       MeasureConfig(warmup=3, repeats=repeats, min_seconds=0.0),
                                       sync)
    return fact_ms["p50"] / 1e3, dense_ms["p50"] / 1e3


def set_module(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at the qualified ``name`` inside ``model`` (in place) and return ``model``.

    An empty ``name`` means the model itself, so ``module`` is returned instead.

    Examples
    --------
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    >>> set_module(model, "1", nn.Tanh())[1]
    Tanh()
    """
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
    return model


def _layer_inputs(model: nn.Module, names: list[str], example_input: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            seen.setdefault(name, args[0].detach())
        return record

    hooks = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
    return seen


def materialize(model: nn.Module, mode: str = "auto", example_input: torch.Tensor | None = None,
                threads: int = 1, size_budget: int | None = None,
                device: torch.device | str = "cpu") -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` with TT layers kept factorised or replaced by dense ones.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    mode : {"auto", "factorized", "dense"}
        ``"factorized"`` keeps every TT layer; ``"dense"`` replaces each by its ``to_dense()``;
        ``"auto"`` times, for each TT layer on its own input captured from ``example_input``,
        the factorised forward against the dense layer (PyTorch on ``device``, ``threads``
        threads, the two interleaved, median of 15 runs each) and makes dense the layers where
        dense is faster, most time saved first, while the extra weights stay within
        ``size_budget``.
    example_input : Tensor, optional
        A batch like the deployment batch; required for ``"auto"``.
    threads : int
        Threads used for the timing.
    size_budget : int, optional
        Most extra bytes (float32) that dense layers may add in ``"auto"``; ``None`` for no limit.
    device : torch.device or str
        Where ``"auto"`` times the layers: the device the model will be served on (many small
        kernels cost more on a GPU than on a CPU, so the choice differs).

    Returns
    -------
    (nn.Module, list of str)
        The copy (in eval mode) and the qualified names of the layers made dense.

    Examples
    --------
    >>> deployed, dense_names = materialize(student, "auto", example_input=x)  # doctest: +SKIP
    """
    if mode not in ("auto", "factorized", "dense"):
        raise LayerError(f"materialize: mode is 'auto', 'factorized' or 'dense', but got {mode!r}")
    model = copy.deepcopy(model).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, TT_LAYERS)]
    if mode == "factorized" or not names:
        return model, []
    if mode == "dense":
        chosen = names
    else:
        if example_input is None:
            raise LayerError("materialize(mode='auto') needs example_input, a batch of the size "
                             "the model will be run with")
        inputs = _layer_inputs(model, names, example_input)
        saved_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        gains = []
        try:
            for name in names:
                if name not in inputs:
                    continue
                layer = model.get_submodule(name)
                dense = layer.to_dense().eval()
                t_fact, t_dense = _compare_times(layer, dense, inputs[name], torch.device(device))
                extra = 4 * (dense.weight.numel() - layer.num_core_params())
                if t_dense < t_fact:
                    gains.append((t_fact - t_dense, extra, name))
        finally:
            torch.set_num_threads(saved_threads)
        chosen, spent = [], 0
        for _, extra, name in sorted(gains, reverse=True):
            if size_budget is None or spent + extra <= size_budget:
                chosen.append(name)
                spent += extra
    for name in chosen:
        model = set_module(model, name, model.get_submodule(name).to_dense())
    return model.eval(), sorted(chosen)
