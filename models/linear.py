"""Kernelized linear attention (Katharopoulos et al., "Transformers are RNNs", 2020) and
lightning attention (Qin et al., TransNormerLLM / Lightning Attention-2, 2023-24).

Both map ``x [B, N, C] -> [B, N, C]``; per head, with ``φ`` a feature map on ``Q``, ``K``:

- :class:`LinearAttention`, non-causal: ``out = φ(Q)(φ(K)ᵀV) / (φ(Q)·Σ_s φ(k_s) + eps)``,
  the denominator only when ``normalize``. Causal: the sums run over ``s ≤ t``, written
  either as prefix sums of the outer products ``φ(k_s) ⊗ v_s`` (``causal_form="cumsum"``,
  the RNN view, ``[B, heads, N, D, D]``) or as the masked quadratic form
  ``(φ(Q)φ(K)ᵀ ⊙ tril)·V`` (``causal_form="masked"``); both appear in the wild.
- :class:`LightningAttention`: causal, no normalizer, per-head decay ``λ_h``:
  ``O_t = Σ_{s≤t} λ_h^{t−s} (q_t·k_s) v_s``, computed as TransNormerLLM does, as the
  quadratic form ``(QKᵀ ⊙ M)·V`` with ``M[t, s] = exp(−slope_h·(t−s))`` for ``s ≤ t``
  and 0 above the diagonal (``λ_h = exp(−slope_h)``, ALiBi slopes by default).
  TransNormerLLM's SiLU feature map, output norm and gate are left out: the fused op
  covers only the decayed attention itself. :meth:`LightningAttention.recurrent` is the
  same attention as an RNN step over a chunk of tokens, with the state carried in and out.
- :class:`LightningLM`: a causal LM of lightning-attention blocks for autoregressive
  decoding: ``forward(ids, *states) -> (logits, *new_states)`` is both the prefill graph
  (no states in) and the decode graph (one state per layer in).
  :class:`RecurrentLightningLM` is its one-token decode step written as plain-PyTorch
  recurrences (:meth:`LightningAttention.step`), as RetNet / TransNormerLLM inference code is.
- :class:`BlockwiseLightningAttention` / :class:`BlockwiseLightningLM`: the same attention
  computed block by block in a Python loop (Lightning Attention-2's prefill, as
  MiniMax-Text-01's Hugging Face code writes it), which an export unrolls; the blocks'
  outputs concatenated, or written into a preallocated output as MiniMax does.

No ``1/sqrt(D)`` scale is applied in either (the ONNX ``LinearAttention`` op is used
with ``scale=1``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from attnc.models.mhsa import causal_mask
from attnc.models.projections import QKVProjection, merge_heads
from attnc.plugins.linear.fla_compat import fused_linear_attention

FEATURE_MAPS = {
    "elu1": lambda x: F.elu(x) + 1.0,
    "relu": F.relu,
    "identity": lambda x: x,
}
CAUSAL_FORMS = ("cumsum", "masked")


def _feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


class LinearAttention(nn.Module):
    """Kernelized linear attention. ``x [B, N, C] -> [B, N, C]``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads.
        feature_map: ``"elu1"`` (``elu(x)+1``), ``"relu"`` or ``"identity"``.
        normalize: divide by ``φ(q_t)·Σφ(k_s) + eps``. With ``"identity"`` the
            denominator can cross zero; use it without the normalizer.
        causal: restrict to keys ``s ≤ t``.
        causal_form: ``"cumsum"`` or ``"masked"`` (see the module docstring).
        eps: added to the normalizer.
        qkv_bias, fused_qkv: see :class:`~attnc.models.projections.QKVProjection`.
    """

    def __init__(self, dim: int, num_heads: int, feature_map: str = "elu1", normalize: bool = True,
                 causal: bool = False, causal_form: str = "cumsum", eps: float = 1e-6,
                 qkv_bias: bool = True, fused_qkv: bool = True):
        super().__init__()
        if causal_form not in CAUSAL_FORMS:
            raise ValueError(f"causal_form must be one of {CAUSAL_FORMS}, got {causal_form!r}")
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.feature_map = feature_map
        self.phi = _feature_map(feature_map)
        self.normalize = normalize
        self.causal = causal
        self.causal_form = causal_form
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x)
        q, k = self.phi(q), self.phi(k)
        if not self.causal:
            out = q @ (k.transpose(-2, -1) @ v)
            norm = q @ k.sum(dim=2, keepdim=True).transpose(-2, -1) if self.normalize else None
        elif self.causal_form == "cumsum":
            kv = (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(dim=2)  # [B, heads, N, D, D]
            out = (q.unsqueeze(-2) @ kv).squeeze(-2)
            norm = (q * k.cumsum(dim=2)).sum(dim=-1, keepdim=True) if self.normalize else None
        else:
            visible = causal_mask(q.shape[2], k.shape[2], device=x.device)
            scores = (q @ k.transpose(-2, -1)).masked_fill(~visible, 0.0)
            out = scores @ v
            norm = scores.sum(dim=-1, keepdim=True) if self.normalize else None
        if norm is not None:
            out = out / (norm + self.eps)
        return self.proj(merge_heads(out))


class LightningAttention(nn.Module):
    """Causal linear attention with per-head decay. ``x [B, N, C] -> [B, N, C]``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads.
        feature_map: applied to ``Q`` and ``K``; ``"identity"`` by default.
        slopes: per-head ``slope_h`` (``λ_h = exp(−slope_h)``); defaults to the ALiBi
            slopes TransNormerLLM uses. Stored as the buffer ``slope`` so it lands in the
            ONNX file as an initializer a fusion pass can read.
        qkv_bias, fused_qkv: see :class:`~attnc.models.projections.QKVProjection`.
    """

    def __init__(self, dim: int, num_heads: int, feature_map: str = "identity",
                 slopes: Sequence[float] | None = None, qkv_bias: bool = True, fused_qkv: bool = True):
        super().__init__()
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.feature_map = feature_map
        self.phi = _feature_map(feature_map)
        slopes = alibi_slopes(num_heads) if slopes is None else list(slopes)
        if len(slopes) != num_heads:
            raise ValueError(f"need {num_heads} slopes, got {len(slopes)}")
        self.register_buffer("slope", torch.tensor(slopes, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.in_proj(x)
        q, k = self.phi(q), self.phi(k)
        n = q.shape[2]
        positions = torch.arange(n, device=x.device, dtype=q.dtype)
        distance = positions[:, None] - positions[None, :]  # t - s
        # exp(-inf) = 0 above the diagonal, so the mask needs no second multiply.
        log_decay = (-self.slope[:, None, None] * distance).masked_fill(
            ~causal_mask(n, n, device=x.device), float("-inf"))
        out = ((q @ k.transpose(-2, -1)) * torch.exp(log_decay)) @ v
        return self.proj(merge_heads(out))

    def recurrent(self, x: torch.Tensor, state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention over the chunk ``x [B, T, C]`` that follows ``state``.

        Args:
            x: the chunk's tokens (the whole prompt in prefill, one or a few tokens in decode).
            state: ``[B, H, D, D]`` float32, ``Σ_s λ_h^{..} k_s v_sᵀ`` of every earlier token;
                None before the first token.

        Returns:
            ``(out [B, T, C], state_out [B, H, D, D] float32)``. Exports as one
            ``attnc::KernelLinearAttention`` node with ``state`` / ``state_out`` (the fusion
            pass matches a hand-written recurrence only one token at a time, :meth:`step`),
            which is why this is not :meth:`forward`'s masked form.
        """
        q, k, v = self.in_proj(x)
        # decay and state are float32 by the op's contract, also in a float64 model
        decay = torch.exp(-self.slope)
        decay = decay if decay.dtype == torch.float32 else decay.float()
        out, state_out = fused_linear_attention(q, k, v, decay, state, feature_map=self.feature_map, causal=1,
                                                normalize=0, eps=0.0, scale=1.0, return_state=True)
        return self.proj(merge_heads(out)), state_out

    def step(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode token as the RNN step, in plain PyTorch (RetNet / TransNormerLLM style).

        ``S' = λ_h·S + φ(k)ᵀ v`` and ``out = φ(q)·S'``: :meth:`recurrent` for one token, written
        the way inference code spells it rather than through the attnc op. The linear-attention
        fusion pass turns the exported step back into one ``KernelLinearAttention`` node with
        ``state`` / ``state_out``.

        Args:
            x: ``[B, 1, C]``, the one new token (more tokens would let each see the chunk's
                later keys: not causal attention).
            state: ``[B, H, D, D]``, ``Σ_s λ_h^{..} k_s v_sᵀ`` of every earlier token (zeros before
                the first), in the model's dtype.

        Returns:
            ``(out [B, 1, C], state' [B, H, D, D])``.
        """
        if x.shape[1] != 1:
            raise ValueError(f"step() takes one token, got {x.shape[1]}; use recurrent() for a chunk")
        q, k, v = self.in_proj(x)
        q, k = self.phi(q), self.phi(k)
        decay = torch.exp(-self.slope).to(state.dtype)
        state = decay[:, None, None] * state + k.transpose(-2, -1) @ v
        return self.proj(merge_heads(q @ state)), state


class BlockwiseLightningAttention(LightningAttention):
    """:class:`LightningAttention` computed block by block, as prefill code writes it.

    Lightning Attention-2 (Qin et al. 2024) and MiniMax-Text-01's Hugging Face code loop over
    blocks of ``block_size`` tokens in Python: per block ``i`` with rows ``q_i, k_i, v_i`` (``L``
    of them, ``L = block_size`` but for the last block) and ``j, s`` positions in the block,

    - intra-block: ``((q_i k_iᵀ) ⊙ M) v_i`` with ``M[j, s] = λ^{j−s}·[s ≤ j]``;
    - inter-block: ``(q_i ⊙ λ^{j+1}) KV`` with ``KV`` the state of every earlier block;
    - ``KV ← λ^L KV + (k_i ⊙ λ^{L−1−s})ᵀ v_i``;

    and the output is the blocks' outputs concatenated along the tokens (``write="cat"``) or, as
    MiniMax-Text-01 writes it, each block's rows assigned into a preallocated output
    (``write="slice_assign"``: ``out = torch.empty(b, h, n, e); out[:, :, s:e] = inter + intra``,
    which the exporters turn into a chain of ``ScatterND``). The same numbers as
    :meth:`LightningAttention.forward` (same parameters, so the same seed gives the same
    weights). The loop runs in Python, so an ONNX export unrolls it for the example's
    sequence length: export with a static token axis. The linear-attention fusion pass
    rewrites the unrolled blocks into one ``attnc::KernelLinearAttention`` node.

    Args:
        dim, num_heads, feature_map, slopes, qkv_bias, fused_qkv: see :class:`LightningAttention`.
        block_size: tokens per block (MiniMax-Text-01 uses 256).
        write: ``"cat"`` (``torch.cat`` of the blocks' outputs) or ``"slice_assign"`` (each
            block written into a preallocated ``torch.empty`` output, MiniMax-Text-01's spelling).
    """

    WRITES = ("cat", "slice_assign")

    def __init__(self, dim: int, num_heads: int, block_size: int = 256, feature_map: str = "identity",
                 slopes: Sequence[float] | None = None, qkv_bias: bool = True, fused_qkv: bool = True,
                 write: str = "cat"):
        super().__init__(dim, num_heads, feature_map, slopes, qkv_bias, fused_qkv)
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        if write not in self.WRITES:
            raise ValueError(f"write must be one of {self.WRITES}, got {write!r}")
        self.block_size, self.write = block_size, write

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.recurrent(x)[0]

    def recurrent(self, x: torch.Tensor, state: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention over ``x [B, T, C]`` after ``state`` (see :meth:`LightningAttention.recurrent`),
        in plain PyTorch: ``(out [B, T, C], state_out [B, H, D, D])``, the state in ``x``'s dtype
        unless one is passed (then in its dtype)."""
        q, k, v = self.in_proj(x)
        q, k = self.phi(q), self.phi(k)
        out, state_out = self.blocks(q, k, v, state)
        return self.proj(merge_heads(out)), state_out

    def blocks(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blockwise loop on ``q, k [B, H, N, D]``, ``v [B, H, N, Dv]`` after the state ``kv
        [B, H, D, Dv]`` (zeros when None): ``(out [B, H, N, Dv], kv after the last token)``."""
        b, h, n, d = q.shape
        block = self.block_size
        slope = self.slope.to(q.dtype)[:, None, None]                          # [H, 1, 1]
        array = torch.arange(block, device=q.device, dtype=q.dtype) + 1
        q_decay = torch.exp(-slope * array[:, None])                           # λ^{j+1}
        k_decay = torch.exp(-slope * (block - array[:, None]))                 # λ^{block−1−s}
        index = array[:, None] - array[None, :]                                # j − s
        diag_decay = torch.exp(torch.where(index >= 0, -slope * index, float("-inf")))
        if kv is None:
            kv = torch.zeros(b, h, d, v.shape[-1], dtype=q.dtype, device=q.device)
        outs = []
        if self.write == "slice_assign":
            output = torch.empty(b, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
        for start in range(0, n, block):
            end = min(start + block, n)
            m = end - start
            qi, ki, vi = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
            intra = ((qi @ ki.transpose(-1, -2)) * diag_decay[:, :m, :m]) @ vi
            inter = (qi * q_decay[:, :m]).to(kv.dtype) @ kv
            if self.write == "slice_assign":
                output[:, :, start:end] = inter.to(intra.dtype) + intra
            else:
                outs.append(intra + inter.to(intra.dtype))
            # the last block may be shorter: its own length m, k_decay's last m rows (λ^{m−1−s})
            update = (ki * k_decay[:, -m:]).transpose(-1, -2) @ vi
            kv = torch.exp(-slope * m).to(kv.dtype) * kv + update.to(kv.dtype)
        return (output if self.write == "slice_assign" else torch.cat(outs, dim=2)), kv


class LightningLM(nn.Module):
    """Decoder-only LM of lightning-attention blocks, for prefill + token-by-token decode.

    ``forward(ids [B, T] int64, *states) -> (logits [B, T, vocab_size], state_0, ..., state_{L-1})``
    with ``state_i [B, H, D, D]`` float32 (``D = dim // num_heads``) the recurrent state of
    layer ``i`` after the last of ``ids``. Without states it is the prefill; with the states of
    the previous call it continues the sequence (decode), so prefill on ``ids[:, :m]`` then
    decode of ``ids[:, m:]`` gives the logits of one call on ``ids``. Every layer's attention
    exports as one fused node with state in and out (:meth:`LightningAttention.recurrent`).

    There is no positional embedding: the per-head decay is the only position signal (as in
    RetNet / TransNormerLLM), so a decode step needs no position input. :meth:`logits` runs
    the same weights on a whole sequence with the masked quadratic form and no state.

    Args:
        vocab_size: token vocabulary.
        dim, depth, num_heads, mlp_ratio: widths.
        slopes: per-head ``slope_h`` shared by every layer (ALiBi by default), see
            :class:`LightningAttention`.
    """

    def __init__(self, vocab_size: int = 32000, dim: int = 512, depth: int = 4, num_heads: int = 8,
                 mlp_ratio: float = 4.0, slopes: Sequence[float] | None = None):
        super().__init__()
        from attnc.models.blocks import Block  # blocks imports this module

        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, self._attention(dim, num_heads, slopes), mlp_ratio)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def _attention(self, dim: int, num_heads: int, slopes: Sequence[float] | None) -> LightningAttention:
        return LightningAttention(dim, num_heads, slopes=slopes)

    def forward(self, ids: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # signature: ids, state_0=None, state_1=None, ... (see below the class); the
        # TorchScript exporter passes the unused ones as None
        states = tuple(s for s in states if s is not None)
        if states and len(states) != len(self.blocks):
            raise ValueError(f"pass no states (prefill) or one per layer ({len(self.blocks)}), got {len(states)}")
        x = self.embed(ids)
        new_states = []
        for block, state in zip(self.blocks, states or (None,) * len(self.blocks)):
            attended, state_out = block.attn.recurrent(block.norm1(x), state)
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            new_states.append(state_out)
        return (self.lm_head(self.norm(x)), *new_states)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, N] -> logits [B, N, vocab_size]`` in one stateless pass (each attention's
        masked quadratic form, :meth:`LightningAttention.forward`): a reference for
        :meth:`forward` that shares none of its recurrence."""
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class BlockwiseLightningLM(LightningLM):
    """:class:`LightningLM` whose attentions run blockwise in plain PyTorch
    (:class:`BlockwiseLightningAttention`, blocks of ``block_size`` tokens), as MiniMax-Text-01's
    prefill does: ``forward(ids [B, T], *states) -> (logits, state_0', ...)`` with the same
    weights as :class:`LightningLM` for the same seed. The loop unrolls at export, so export it
    with a static ``T``; the linear-attention fusion pass makes each layer one fused node with
    ``state_out`` (and ``state`` when states are passed).

    Args:
        block_size: tokens per block; the rest as :class:`LightningLM`.
    """

    def __init__(self, vocab_size: int = 32000, dim: int = 512, depth: int = 4, num_heads: int = 8,
                 mlp_ratio: float = 4.0, slopes: Sequence[float] | None = None, block_size: int = 256):
        self._block_size = block_size   # read by _attention during LightningLM.__init__
        super().__init__(vocab_size, dim, depth, num_heads, mlp_ratio, slopes)

    def _attention(self, dim: int, num_heads: int, slopes: Sequence[float] | None) -> LightningAttention:
        return BlockwiseLightningAttention(dim, num_heads, self._block_size, slopes=slopes)


class RecurrentLightningLM(LightningLM):
    """:class:`LightningLM`'s decode step written as plain-PyTorch recurrences (no attnc op).

    ``forward(ids [B, 1] int64, state_0, ..., state_{L-1}) -> (logits [B, 1, vocab_size],
    state_0', ...)``, every layer through :meth:`LightningAttention.step`: the shape of the
    inference code users write for RetNet / TransNormerLLM-style models, which the
    linear-attention fusion pass rewrites into one fused node per layer. Same constructor and
    parameters as :class:`LightningLM` (the same seed gives the same weights), so decoding a
    sequence token by token from zero states reproduces :meth:`LightningLM.logits`.
    """

    def forward(self, ids: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = tuple(s for s in states if s is not None)
        if len(states) != len(self.blocks):
            raise ValueError(f"pass one state per layer ({len(self.blocks)}), got {len(states)}")
        x = self.embed(ids)
        new_states = []
        for block, state in zip(self.blocks, states):
            attended, state = block.attn.step(block.norm1(x), state)
            x = x + attended
            x = x + block.mlp(block.norm2(x))
            new_states.append(state)
        return (self.lm_head(self.norm(x)), *new_states)

    def zero_states(self, batch: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """The states before the first token: one ``[batch, H, D, D]`` zero tensor per layer."""
        attn = self.blocks[0].attn.in_proj
        return [torch.zeros(batch, attn.num_heads, attn.head_dim, attn.head_dim, dtype=dtype)
                for _ in self.blocks]


# torch.onnx's dynamo exporter maps dynamic_axes onto forward()'s named parameters and
# drops all but the first tensor a ``*states`` parameter collects ("Failed to convert
# 'dynamic_axes' to 'dynamic_shapes'"); naming the states state_0 ... lets it (and
# attnc.compiler.export.input_names_for) see each one as its own input. Parameters past the
# arguments given are ignored, so one signature serves every depth up to _MAX_LAYERS.
_MAX_LAYERS = 256
_P = inspect.Parameter
LightningLM.forward.__signature__ = inspect.Signature(
    [_P("self", _P.POSITIONAL_OR_KEYWORD), _P("ids", _P.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor),
     *(_P(f"state_{i}", _P.POSITIONAL_OR_KEYWORD, default=None, annotation=torch.Tensor | None)
       for i in range(_MAX_LAYERS))],
    return_annotation=tuple[torch.Tensor, ...])
RecurrentLightningLM.forward.__signature__ = LightningLM.forward.__signature__
BlockwiseLightningLM.forward.__signature__ = LightningLM.forward.__signature__


def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's per-head slopes (Press et al. 2022): a geometric sequence from ``2^(-8/n)``."""
    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return power_of_two(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return power_of_two(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]
