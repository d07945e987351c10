"""Standard multi-head self-attention (Vaswani et al. 2017), written out op by op.

``x [B, N, C] -> [B, N, C]``: ``softmax(Q·Kᵀ·s [+ causal mask])·V`` per head, with
``s = 1/sqrt(D)``. The scores are spelled as MatMul / Mul / Softmax rather than
``F.scaled_dot_product_attention`` because that is what most exported models contain
and what the fusion passes must recognise; ``scale_after`` picks which of the two
common algebraic forms appears in the graph:

- ``scale_after=False``: ``(Q·s)·Kᵀ`` (timm ``q = q * self.scale``, agent attention);
- ``scale_after=True``:  ``(Q·Kᵀ)·s`` (the textbook / HF-BERT form).
"""

from __future__ import annotations

import torch
from torch import nn

from attnc.models.projections import QKVProjection, merge_heads


def causal_mask(n_query: int, n_key: int, device: torch.device | None = None) -> torch.Tensor:
    """``[n_query, n_key]`` bool, True where key ``j`` is visible to query ``i`` (``j <= i``).

    Built from ``arange`` comparisons on the runtime sizes, so it follows a dynamic
    sequence axis in both ONNX exporters (a Python-side ``triu`` of a fixed size would not).
    """
    rows = torch.arange(n_query, device=device).unsqueeze(1)
    cols = torch.arange(n_key, device=device).unsqueeze(0)
    return cols <= rows


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention. ``x [B, N, C] -> [B, N, C]``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads ``H``; head dim ``D = C / H``.
        qkv_bias: bias in the q/k/v projection(s).
        fused_qkv: one ``qkv`` Linear (True) or ``q_proj``/``k_proj``/``v_proj`` (False).
        causal: mask keys after the query (``j > i``) with ``-inf`` before the softmax.
        scale_after: scale the scores (True) instead of the queries (False).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, fused_qkv: bool = True,
                 causal: bool = False, scale_after: bool = False):
        super().__init__()
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.scale = self.in_proj.head_dim ** -0.5
        self.causal = causal
        self.scale_after = scale_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x)
        if self.scale_after:
            scores = (q @ k.transpose(-2, -1)) * self.scale
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)
        if self.causal:
            visible = causal_mask(q.shape[2], k.shape[2], device=x.device)
            scores = scores.masked_fill(~visible, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(merge_heads(out))
