"""Transformer blocks and the small end-to-end models built from them.

- :class:`Block`: pre-norm block ``x + attn(LN(x))``, then ``x + MLP(LN(x))``, over
  ``[B, N, C]`` tokens, for any attention module mapping ``[B, N, C]`` to itself.
- :class:`VisionTransformer`: ViT / DeiT classifier, ``image [B, 3, H, W] -> logits
  [B, classes]`` (patch-embedding conv, optional CLS token, learned positional
  embedding, blocks, LayerNorm, linear head on the CLS token or the token mean).
- :class:`CausalLM`: ``token ids [B, T] int64 -> logits [B, T, vocab]`` with a causal
  attention in every block.

``make_attention`` maps the family names used across attnc (``"mhsa"``, ``"agent"``,
``"flow"``, ``"linear"``, ``"lightning"``, ``"neighborhood"``) onto modules.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnc.models.agent import AgentAttention
from attnc.models.flow import FlowAttention
from attnc.models.linear import LightningAttention, LinearAttention
from attnc.models.mhsa import MultiHeadSelfAttention
from attnc.models.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D

VIT_ATTENTIONS = ("mhsa", "agent", "flow", "linear", "neighborhood")
LM_ATTENTIONS = ("mhsa", "linear", "lightning", "flow", "neighborhood")


class Mlp(nn.Module):
    """``Linear -> GELU -> Linear``. ``[..., C] -> [..., C]``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block around ``attn``. ``x [B, N, C] -> [B, N, C]``."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GridAttention(nn.Module):
    """Runs a channels-last 2-D attention (``[B, H, W, C]``) on a ``[B, H*W, C]`` token sequence."""

    def __init__(self, attn: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.attn = attn
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n, dim = x.shape
        return self.attn(x.reshape(batch, self.grid[0], self.grid[1], dim)).reshape(batch, n, dim)


def make_attention(kind: str, dim: int, num_heads: int, *, causal: bool = False,
                   grid: tuple[int, int] | None = None, has_cls: bool = False, **options: Any) -> nn.Module:
    """Build the attention module of family ``kind`` for ``[B, N, C]`` tokens.

    Args:
        kind: ``"mhsa"``, ``"agent"``, ``"flow"``, ``"linear"``, ``"lightning"`` or
            ``"neighborhood"``.
        dim, num_heads: width and heads.
        causal: causal variant (LMs); agent attention has none, lightning is always causal.
        grid: ``(H, W)`` token grid; required by agent attention and by 2-D
            neighborhood attention (which then runs through :class:`GridAttention`).
            Without a grid, neighborhood attention is 1-D.
        has_cls: tokens start with a CLS token (agent attention only).
        options: passed to the module's constructor (e.g. ``kernel_size``, ``feature_map``).
    """
    if kind == "mhsa":
        return MultiHeadSelfAttention(dim, num_heads, causal=causal, **options)
    if kind == "flow":
        return FlowAttention(dim, num_heads, causal=causal, **options)
    if kind == "linear":
        return LinearAttention(dim, num_heads, causal=causal, **options)
    if kind == "lightning":
        if not causal:
            raise ValueError("lightning attention is causal only")
        return LightningAttention(dim, num_heads, **options)
    if kind == "agent":
        if causal or grid is None or grid[0] != grid[1]:
            raise ValueError("agent attention needs a square token grid and is not causal")
        return AgentAttention(dim, num_heads, grid_size=grid[0], has_cls=has_cls, **options)
    if kind == "neighborhood":
        if grid is None:
            return NeighborhoodAttention1D(dim, num_heads, is_causal=causal, **options)
        if has_cls:
            raise ValueError("2-D neighborhood attention has no place for a CLS token")
        return GridAttention(NeighborhoodAttention2D(dim, num_heads, is_causal=causal, **options), grid)
    raise ValueError(f"unknown attention {kind!r}; use one of {sorted(set(VIT_ATTENTIONS + LM_ATTENTIONS))}")


class VisionTransformer(nn.Module):
    """ViT / DeiT classifier. ``image [B, in_chans, H, W] -> logits [B, num_classes]``.

    Args:
        img_size: square input side (the positional embedding is fixed to it).
        patch_size: side of the non-overlapping patches; ``img_size / patch_size`` tokens per side.
        in_chans: image channels.
        num_classes: head outputs; 0 leaves the head out (``forward`` returns pooled features).
        dim, depth, num_heads, mlp_ratio: the usual ViT widths (DeiT-Tiny: 192, 12, 3, 4).
        attention: family of every block's attention, one of ``VIT_ATTENTIONS``.
        attention_options: passed to the attention constructor (see :func:`make_attention`).
        class_token: prepend a CLS token and classify from it; otherwise average the
            tokens. Not available with ``"neighborhood"``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 attention: str = "mhsa", attention_options: dict[str, Any] | None = None,
                 class_token: bool = True):
        super().__init__()
        if attention not in VIT_ATTENTIONS:
            raise ValueError(f"unknown ViT attention {attention!r}; use one of {VIT_ATTENTIONS}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        side = img_size // patch_size
        self.grid = (side, side)
        self.patch_embed = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, side * side + int(class_token), dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if class_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        grid = self.grid if attention in ("agent", "neighborhood") else None
        self.blocks = nn.ModuleList(
            Block(dim, make_attention(attention, dim, num_heads, grid=grid, has_cls=class_token,
                                      **(attention_options or {})), mlp_ratio)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """``[B, in_chans, H, W] -> [B, (1 +) tokens, dim]``, after the final LayerNorm."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(image)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(pooled)


class CausalLM(nn.Module):
    """Decoder-only language model. ``ids [B, T] int64 -> logits [B, T, vocab_size]``.

    Args:
        vocab_size: token vocabulary.
        dim, depth, num_heads, mlp_ratio: widths.
        max_seq_len: length of the learned positional embedding; ``T <= max_seq_len``.
        attention: family of every block's (causal) attention, one of ``LM_ATTENTIONS``
            (``"neighborhood"`` is causal 1-D neighborhood attention).
        attention_options: passed to the attention constructor.
    """

    def __init__(self, vocab_size: int = 32000, dim: int = 512, depth: int = 4, num_heads: int = 8,
                 mlp_ratio: float = 4.0, max_seq_len: int = 8192, attention: str = "mhsa",
                 attention_options: dict[str, Any] | None = None):
        super().__init__()
        if attention not in LM_ATTENTIONS:
            raise ValueError(f"unknown LM attention {attention!r}; use one of {LM_ATTENTIONS}")
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(max_seq_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block(dim, make_attention(attention, dim, num_heads, causal=True, **(attention_options or {})),
                  mlp_ratio)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos_embed[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))
