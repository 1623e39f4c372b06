"""A small Vision Transformer: patch embedding, pre-norm blocks of multi-head self-attention and
an MLP, a class token or mean pooling.

Attention is written with four ``nn.Linear`` layers (``q``, ``k``, ``v``, ``proj``) and two
MatMuls, so ``decompose_tt`` can factorise each projection, ``prune`` can remove whole heads
(:mod:`kdcompress.layers.heads`) and ONNX Runtime quantizes the projections as MatMuls.

References
----------
.. [1] A. Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition
   at Scale", ICLR 2021.
.. [2] A. Vaswani et al., "Attention Is All You Need", NeurIPS 2017.
"""

from __future__ import annotations

import torch
from torch import nn

from kdcompress.errors import PipelineError
from kdcompress.recipes._shapes import image_shape

__all__ = ["ViT", "ViTBlock", "SelfAttention", "MLPBlock", "PatchEmbedding", "choose_patch",
           "POOLS", "MAX_TOKENS"]

#: How the tokens become one vector: the class token's output, or the mean of the patch tokens.
POOLS = ("cls", "mean")
#: ``choose_patch`` picks the smallest patch giving at most this many tokens (a 7x7 grid).
MAX_TOKENS = 49


def choose_patch(h: int, w: int) -> int:
    """The smallest patch size giving at most :data:`MAX_TOKENS` patches of an ``h x w`` image.

    Patch sizes dividing both sides are preferred (no pixel is dropped): 8x8 -> 2 (16 tokens),
    28x28 -> 4 (49 tokens), 32x32 -> 8 (16 tokens).
    """
    sizes = range(1, max(h, w) + 1)
    fits = [p for p in sizes if (h // p) * (w // p) <= MAX_TOKENS and min(h, w) >= p]
    exact = [p for p in fits if h % p == 0 and w % p == 0]
    return (exact or fits or [min(h, w)])[0]


class PatchEmbedding(nn.Module):
    """Non-overlapping ``patch x patch`` patches, each mapped to ``dim`` features by one conv.

    A border narrower than a patch is dropped (stride = kernel = ``patch``).
    """

    def __init__(self, channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N, dim)
        return self.proj(x).flatten(2).transpose(1, 2)


class SelfAttention(nn.Module):
    """Multi-head scaled dot-product self-attention [2]_ with separate q, k, v projections.

    The head count is read off the projections' width (``q.out_features // head_dim``), so a
    model whose heads were pruned runs without any change; ``num_heads`` records it.

    Parameters
    ----------
    dim : int
        Token width.
    num_heads : int
        Number of heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, H * d) -> (B, H, N, d)
        b, n, _ = x.shape
        return x.reshape(b, n, -1, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, dim)
        b, n, _ = x.shape
        q = self._heads(self.q(x)) * self.scale
        k, v = self._heads(self.k(x)), self._heads(self.v(x))
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, N, N)
        out = (attn @ v).transpose(1, 2).reshape(b, n, -1)  # (B, N, H * d)
        return self.proj(out)


class MLPBlock(nn.Module):
    """``fc1 -> GELU -> fc2``, the transformer's position-wise feed-forward network."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, dim)
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, dim) -> (B, N, dim)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def check_vit(dim: object, heads: object, pool: object) -> None:
    """A :class:`PipelineError` when ``heads`` does not divide ``dim`` or ``pool`` is unknown."""
    if not (isinstance(dim, int) and isinstance(heads, int) and heads >= 1 and dim >= 1
            and dim % heads == 0):
        raise PipelineError(f"transformer: heads must divide dim (each head gets dim // heads "
                            f"features), but got dim={dim!r}, heads={heads!r}")
    if pool not in POOLS:
        raise PipelineError(f"transformer: pool must be one of {POOLS}, but got {pool!r}")


class ViT(nn.Module):
    """A Vision Transformer [1]_ sized for small images.

    Patches of ``patch x patch`` pixels (by default the smallest giving at most a 7x7 grid, see
    :func:`choose_patch`) become tokens of width ``dim`` with a learned position embedding; then
    ``depth`` :class:`ViTBlock` layers, a final LayerNorm and a Linear head on the class token
    (``pool="cls"``) or on the mean of the tokens (``pool="mean"``).

    Parameters
    ----------
    input_shape : tuple of int
        ``(channels, height, width)`` of one input.
    num_classes : int
        Number of output logits.
    dim : int
        Token width.
    depth : int
        Number of transformer blocks.
    heads : int
        Attention heads per block; must divide ``dim``.
    mlp_ratio : float
        Hidden width of the MLP blocks, as a multiple of ``dim``.
    patch : int, optional
        Patch size; chosen from the image size when not given.
    pool : {"cls", "mean"}
        The class token, or mean pooling of the tokens.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, patch: int | None = None,
                 pool: str = "cls") -> None:
        super().__init__()
        c, h, w = image_shape("transformer", input_shape)
        check_vit(dim, heads, pool)
        patch = choose_patch(h, w) if patch is None else int(patch)
        if not 1 <= patch <= min(h, w):
            raise PipelineError(f"transformer: patch must be between 1 and the image side "
                                f"{min(h, w)}, but got {patch}")
        self.pool = pool
        self.patch = patch
        tokens = (h // patch) * (w // patch) + (1 if pool == "cls" else 0)
        self.embed = PatchEmbedding(c, dim, patch)
        if pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        hidden = max(1, round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        x = self.embed(x)  # (B, N, dim)
        if self.pool == "cls":
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.blocks(x + self.pos_embed)
        x = self.norm(x)
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(dim=1))
