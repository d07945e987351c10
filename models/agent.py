"""Agent attention (Han et al., "Agent Attention: On the Integration of Softmax and
Linear Attention", ECCV 2024), following LeapLabTHU ``agent_deit.py``.

``x [B, N, C] -> [B, N, C]`` with ``N = G*G`` tokens on a ``G x G`` grid, plus one
leading CLS token when ``has_cls``. Per head (``s = 1/sqrt(D)``):

- agent tokens ``A [B, heads, n, D]``: ``Q``'s grid tokens (CLS excluded) average-pooled
  to a ``sqrt(n) x sqrt(n)`` grid (``n = agent_num``, 49 in DeiT-T/S);
- agent aggregation ``V_A = softmax((A·s)·Kᵀ + b₁)·V``     (``[B, heads, n, D]``);
- agent broadcast   ``O   = softmax((Q·s)·Aᵀ + b₂)·V_A``   (``[B, heads, N, D]``);
- ``use_dwc``: a 3x3 depthwise conv of ``V`` on the grid is added to the grid tokens
  of ``O`` (not to CLS), then the output projection.

The biases (``use_bias``) are the paper's learned position tables: ``b₁[h, a, j]`` is a
``[heads, n, T, T]`` table bilinearly interpolated to the ``G x G`` grid plus separable
row/column tables ``[heads, n, G]``; ``b₂`` is the same with agents and tokens swapped;
CLS gets its own per-agent bias. Parameter names follow ``agent_deit.py``
(``an/na`` agent<->token tables, ``ah/aw`` and ``ha/wa`` row/column tables, ``ac/ca``
CLS). Unlike ``agent_deit.py`` the biases broadcast over the batch instead of being
``repeat``-ed, and the conv term is concatenated rather than written in place, because
in-place slice assignment exports as ScatterND, which the fusion passes should not
have to see through.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from attnc.models.projections import QKVProjection, merge_heads


class AgentAttention(nn.Module):
    """Agent attention over a square token grid. ``x [B, has_cls + G*G, C] -> same``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads.
        grid_size: side ``G`` of the token grid (14 for DeiT at 224 px, patch 16).
        agent_num: number of agent tokens ``n``; a square whose root divides ``G``
            (agent_deit.py's adaptive pooling then has equal bins).
        has_cls: the first token is a CLS token (pooled over nothing, no conv term).
        use_bias: learned agent position biases ``b₁``, ``b₂``.
        use_dwc: add the 3x3 depthwise conv of ``V``.
        bias_table_size: side ``T`` of the interpolated bias tables (7 in the paper).
        qkv_bias, fused_qkv: see :class:`~attnc.models.projections.QKVProjection`.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int, agent_num: int = 49, has_cls: bool = True,
                 use_bias: bool = True, use_dwc: bool = True, bias_table_size: int = 7,
                 qkv_bias: bool = True, fused_qkv: bool = True):
        super().__init__()
        pool = math.isqrt(agent_num)
        if pool * pool != agent_num:
            raise ValueError(f"agent_num must be a square, got {agent_num}")
        if grid_size % pool:
            raise ValueError(f"sqrt(agent_num) = {pool} must divide grid_size {grid_size}")
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.num_heads = num_heads
        self.scale = self.in_proj.head_dim ** -0.5
        self.grid_size = grid_size
        self.agent_num = agent_num
        self.has_cls = has_cls
        # Adaptive pooling with bins that divide the grid is a plain average pool; the
        # TorchScript exporter cannot export AdaptiveAvgPool2d once the batch is dynamic
        # ("input size not accessible"), AvgPool2d exports everywhere.
        self.pool = nn.AvgPool2d(kernel_size=grid_size // pool)
        self.dwc = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim) if use_dwc else None
        self.use_bias = use_bias
        if use_bias:
            heads, n, g, t = num_heads, agent_num, grid_size, bias_table_size
            self.an_bias = nn.Parameter(torch.empty(heads, n, t, t))
            self.na_bias = nn.Parameter(torch.empty(heads, n, t, t))
            self.ah_bias = nn.Parameter(torch.empty(heads, n, g, 1))
            self.aw_bias = nn.Parameter(torch.empty(heads, n, 1, g))
            self.ha_bias = nn.Parameter(torch.empty(heads, g, 1, n))
            self.wa_bias = nn.Parameter(torch.empty(heads, 1, g, n))
            params = [self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias]
            if has_cls:
                self.ac_bias = nn.Parameter(torch.empty(heads, n, 1))
                self.ca_bias = nn.Parameter(torch.empty(heads, 1, n))
                params += [self.ac_bias, self.ca_bias]
            for p in params:
                nn.init.trunc_normal_(p, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, dim = x.shape
        g, first = self.grid_size, int(self.has_cls)
        q, k, v = self.in_proj(x)
        agents = self._agent_tokens(q[:, :, first:])
        agent_scores = (agents * self.scale) @ k.transpose(-2, -1)
        query_scores = (q * self.scale) @ agents.transpose(-2, -1)
        if self.use_bias:
            agent_bias, query_bias = self._biases()
            agent_scores = agent_scores + agent_bias
            query_scores = query_scores + query_bias
        agent_v = agent_scores.softmax(dim=-1) @ v
        out = merge_heads(query_scores.softmax(dim=-1) @ agent_v)
        if self.dwc is not None:
            v_grid = merge_heads(v[:, :, first:]).transpose(1, 2).reshape(batch, dim, g, g)
            conv = self.dwc(v_grid).reshape(batch, dim, g * g).transpose(1, 2)
            out = torch.cat([out[:, :first], out[:, first:] + conv], dim=1) if first else out + conv
        return self.proj(out)

    def _agent_tokens(self, q_grid: torch.Tensor) -> torch.Tensor:
        """``[B, heads, G*G, D]`` grid queries -> ``[B, heads, n, D]`` pooled agent tokens."""
        batch, heads, _, head_dim = q_grid.shape
        image = q_grid.transpose(-2, -1).reshape(batch, heads * head_dim, self.grid_size, self.grid_size)
        pooled = self.pool(image).reshape(batch, heads, head_dim, self.agent_num)
        return pooled.transpose(-2, -1)

    def _biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``b₁ [heads, n, N]`` (agent -> token) and ``b₂ [heads, N, n]`` (token -> agent)."""
        heads, n, g = self.num_heads, self.agent_num, self.grid_size
        table_1 = F.interpolate(self.an_bias, size=(g, g), mode="bilinear", align_corners=False)
        agent_bias = table_1.reshape(heads, n, g * g) + (self.ah_bias + self.aw_bias).reshape(heads, n, g * g)
        table_2 = F.interpolate(self.na_bias, size=(g, g), mode="bilinear", align_corners=False)
        query_bias = (table_2.reshape(heads, n, g * g).transpose(1, 2)
                      + (self.ha_bias + self.wa_bias).reshape(heads, g * g, n))
        if self.has_cls:
            agent_bias = torch.cat([self.ac_bias, agent_bias], dim=-1)
            query_bias = torch.cat([self.ca_bias, query_bias], dim=-2)
        return agent_bias, query_bias
