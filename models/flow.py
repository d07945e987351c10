"""Flow attention (Wu et al., "Flowformer: Linearizing Transformers with Conservation
Flows", ICML 2022), following thuml ``Flow_Attention.py`` (``Flow_Attention`` and
``Flow_Attention_Causal``) op for op, including its einsum formulation, so an export
looks like an export of the original.

``x [B, L, C] -> [B, L, C]`` (self-attention: ``L = S``). Per head, with
``φ = sigmoid`` applied to ``Q`` and ``K`` and ``ε = eps``:

- incoming ``I = 1 / ((φQ+ε)·(ΣφK + ε))``, outgoing ``O = 1 / ((φK+ε)·(ΣφQ + ε))``;
- conserved ``Î = (φQ+ε)·(Σ φK·O + ε)``, ``Ô = clip((φK+ε)·(Σ φQ·I + ε), -1, 1)``;
- allocation ``sigmoid(Î · L/S)``, competition ``softmax_S(Ô) · S``;
- ``out = ((φQ·I) (φKᵀ (V·competition))) · allocation``.

Causal: every sum over keys becomes a cumulative sum over positions ``≤ t``; ``I`` and
``O`` are multiplied by the position count ``t+1`` and the conserved flows divided by
it; allocation drops the ``L/S`` factor; competition is ``exp(Ô)/cumsum(exp(Ô))·(t+1)``;
the final product is the cumsum of the outer products ``φk_s ⊗ v_s``
(``[B, heads, L, D, D]``), as in thuml's ``causal_dot_product``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnc.models.projections import QKVProjection, merge_heads


class FlowAttention(nn.Module):
    """Flowformer flow attention. ``x [B, L, C] -> [B, L, C]``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads.
        causal: the ``Flow_Attention_Causal`` variant.
        eps: the ``ε`` above (1e-6 in thuml/Flowformer).
        qkv_bias, fused_qkv: see :class:`~attnc.models.projections.QKVProjection`
            (thuml uses three biased projections: ``fused_qkv=False``).
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = False, eps: float = 1e-6,
                 qkv_bias: bool = True, fused_qkv: bool = False):
        super().__init__()
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.causal = causal
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x)
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        out = self._causal(q, k, v) if self.causal else self._non_causal(q, k, v)
        return self.proj(merge_heads(out))

    def _non_causal(self, q, k, v):
        eps = self.eps
        sink_incoming = 1.0 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(dim=2) + eps)
        source_outgoing = 1.0 / torch.einsum("bhld,bhd->bhl", k + eps, q.sum(dim=2) + eps)
        conserved_sink = torch.einsum("bhld,bhd->bhl", q + eps, (k * source_outgoing[..., None]).sum(dim=2) + eps)
        conserved_source = torch.einsum("bhld,bhd->bhl", k + eps, (q * sink_incoming[..., None]).sum(dim=2) + eps)
        conserved_source = conserved_source.clamp(min=-1.0, max=1.0)
        # Self-attention: L == S, so thuml's allocation factor L/S is 1 and is left out;
        # writing it from symbolic sizes would only add a shape subgraph to the export.
        sink_allocation = torch.sigmoid(conserved_sink)
        source_competition = conserved_source.softmax(dim=-1) * k.shape[2]
        kv = torch.einsum("bhld,bhlm->bhdm", k, v * source_competition[..., None])
        return torch.einsum("bhld,bhdm->bhlm", q * sink_incoming[..., None], kv) * sink_allocation[..., None]

    def _causal(self, q, k, v):
        eps = self.eps
        sink_incoming = 1.0 / torch.einsum("bhld,bhld->bhl", q + eps, k.cumsum(dim=2) + eps)
        source_outgoing = 1.0 / torch.einsum("bhld,bhld->bhl", k + eps, q.cumsum(dim=2) + eps)
        # thuml's approximation of the conservation: scale by the number of visible tokens.
        normal = torch.arange(1, q.shape[2] + 1, dtype=q.dtype, device=q.device)
        sink_incoming = sink_incoming * normal
        source_outgoing = source_outgoing * normal
        conserved_sink = torch.einsum(
            "bhld,bhld->bhl", q + eps, (k * source_outgoing[..., None]).cumsum(dim=2) + eps) / normal
        conserved_source = torch.einsum(
            "bhld,bhld->bhl", k + eps, (q * sink_incoming[..., None]).cumsum(dim=2) + eps) / normal
        conserved_source = conserved_source.clamp(min=-1.0, max=1.0)
        sink_allocation = torch.sigmoid(conserved_sink)
        competition = torch.exp(conserved_source)
        source_competition = competition / competition.cumsum(dim=-1) * normal
        kv = torch.einsum("bhld,bhlm->bhldm", k, v * source_competition[..., None]).cumsum(dim=2)
        # Divide per position, as thuml's task code does (``normal[:, :, :, None]``); the
        # root Flow_Attention.py's ``/ normal`` broadcasts to [B, H, L, L] by mistake.
        out = torch.einsum("bhld,bhldm->bhlm", q * (sink_incoming / normal)[..., None], kv)
        return out * sink_allocation[..., None]
