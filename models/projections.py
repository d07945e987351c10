"""The q/k/v and output projections every attention family in ``attnc.models`` shares.

Models in the wild write the input projection two ways, and the fusion passes must
match both: one ``Linear(C, 3C)`` whose output is split into q, k, v (timm / DeiT
``qkv``), or three ``Linear(C, C)`` (HF-style ``q_proj``/``k_proj``/``v_proj``, thuml
Flowformer). :class:`QKVProjection` offers both under one switch, so weights are
always found under the same names.
"""

from __future__ import annotations

import torch
from torch import nn


class QKVProjection(nn.Module):
    """``x [B, N, C] -> (q, k, v)``, each ``[B, heads, N, C // heads]``.

    Args:
        dim: model width ``C``; must be divisible by ``num_heads``.
        num_heads: number of heads.
        qkv_bias: whether the projection(s) have a bias.
        fused_qkv: one ``Linear(C, 3C)`` named ``qkv`` (rows ordered q, k, v, each
            head-major) if True; three ``Linear(C, C)`` named ``q_proj``, ``k_proj``,
            ``v_proj`` if False.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, fused_qkv: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        if self.fused_qkv:
            # The timm layout: [B, N, 3, heads, D] -> [3, B, heads, N, D].
            qkv = self.qkv(x).reshape(batch, -1, 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        return (split_heads(self.q_proj(x), self.num_heads), split_heads(self.k_proj(x), self.num_heads),
                split_heads(self.v_proj(x), self.num_heads))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``[B, N, C] -> [B, heads, N, C // heads]``."""
    return x.reshape(x.shape[0], -1, num_heads, x.shape[-1] // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, D] -> [B, N, heads * D]``."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, x.shape[1] * x.shape[3])
