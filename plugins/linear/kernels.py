"""Triton kernels of ``attnc::KernelLinearAttention``.

``Q``, ``K`` ``[B, H, N, D]``, ``V`` ``[B, H, N, Dv]``, optional ``decay`` ``[H]``; semantics as
``attnc.plugins.linear`` (q = scale·φ(Q), k = φ(K)).

- Non-causal, two launches: :func:`linear_state_kernel` reads K and V once and writes the
  per-head state ``S = kᵀV`` ``[D, Dv]`` and normaliser ``z = Σ_s k_s`` ``[D]`` (fp32);
  :func:`linear_output_kernel` computes ``O = q S / (q·z + eps)`` for a tile of queries.
- Causal, one launch (:func:`linear_causal_kernel`, the chunked form of Lightning Attention-2,
  written from the paper): a program owns one head and a block of value columns and walks
  the sequence in chunks of ``C`` tokens. Inside a chunk the scores ``q kᵀ`` are masked by
  ``M[t, s] = λ^{t-s}[s <= t]`` and multiplied with V (quadratic, but only C x C); the chunk's
  past enters through the running state, ``λ^{t+1} q_t S``; then
  ``S <- λ^C S + Σ_s λ^{C-1-s} k_sᵀ v_s``. The normaliser uses the row sums of the masked
  scores and the running ``z`` the same way.

Everything after the loads is fp32: φ, states and every product (``PRECISION`` "tf32" for
half inputs, whose values tf32 holds exactly; with bf16 products the masked C x C scores and
φ(Q), φ(K) would be rounded to 8 bits and the causal output measured 1.2e-2 relative error vs
float64, against 5e-3 now). Linear attention is bandwidth-bound, so the tf32 rate costs little.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, POINTER_TYPES, KernelSpec, block_dim, check_inputs,
                                          dot, dot_precision, per_head_grid, rows_grid)

FEATURE_MAP_IDS = {"elu1": 0, "relu": 1, "identity": 2}


@triton.jit
def _feature(x, FEATURE: tl.constexpr):
    # x in fp32. 0: elu(x) + 1, 1: relu, 2: identity.
    if FEATURE == 0:
        return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
    elif FEATURE == 1:
        return tl.maximum(x, 0.0)
    else:
        return x


@triton.jit
def linear_state_kernel(
    K, V, S, Z, heads, seq_len, head_dim, value_dim,
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    FEATURE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """S[bh, :, dv-block] = φ(K)ᵀ V and Z[bh] = Σ_n φ(K_n), fp32, contiguous [BH, D, Dv] / [BH, D]."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, v_ok = offs_d < head_dim, offs_v < value_dim
    state = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    norm = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, seq_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_v[None, :],
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        phi = tl.where(n_ok[:, None] & d_ok[None, :], _feature(k.to(tl.float32), FEATURE), 0.0)
        state += dot(tl.trans(phi), v.to(tl.float32), PRECISION)
        norm += tl.sum(phi, 0)
    tl.store(S + pid_bh * head_dim * value_dim + offs_d[:, None] * value_dim + offs_v[None, :], state,
             mask=d_ok[:, None] & v_ok[None, :])
    # Only the first value-column block writes z (all compute the same).
    tl.store(Z + pid_bh * head_dim + offs_d, norm, mask=offs_d < tl.where(pid_v == 0, head_dim, 0))


@triton.jit
def linear_output_kernel(
    Q, S, Z, O, heads, seq_len, head_dim, value_dim, scale, eps,
    sq_b, sq_h, sq_n, so_b, so_h, so_n,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """O = q S [/ (q·z + eps)] for BLOCK_N queries and BLOCK_DV value columns."""
    pid_bh, pid_n, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok, d_ok, v_ok = offs_n < seq_len, offs_d < head_dim, offs_v < value_dim
    q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    phi = tl.where(d_ok[None, :], _feature(q.to(tl.float32), FEATURE), 0.0) * scale
    state = tl.load(S + pid_bh * head_dim * value_dim + offs_d[:, None] * value_dim + offs_v[None, :],
                    mask=d_ok[:, None] & v_ok[None, :], other=0.0)
    out = dot(phi, state, PRECISION)
    if NORMALIZE:
        z = tl.load(Z + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
        out = out / (tl.sum(phi * z[None, :], 1) + eps)[:, None]
    tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
             out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@triton.jit
def linear_causal_kernel(
    Q, K, V, DECAY, O, heads, seq_len, head_dim, value_dim, scale, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Chunked causal linear attention with optional per-head decay (one program per head and
    value-column block, sequential over chunks)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_c = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, v_ok = offs_d < head_dim, offs_v < value_dim
    if HAS_DECAY:
        log2_decay = tl.log2(tl.load(DECAY + h).to(tl.float32))
    else:
        log2_decay = 0.0
    # λ^{t-s} on and below the diagonal, 0 above; λ^{t+1} for the state; λ^{C-1-s} for the update.
    gap = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    intra = tl.where(offs_c[:, None] >= offs_c[None, :], tl.exp2(gap * log2_decay), 0.0)
    to_query = tl.exp2((offs_c + 1).to(tl.float32) * log2_decay)
    to_state = tl.exp2((CHUNK - 1 - offs_c).to(tl.float32) * log2_decay)
    chunk_decay = tl.exp2(CHUNK * log2_decay)
    state = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    norm = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, seq_len, CHUNK):
        offs_n = n0 + offs_c
        n_ok = offs_n < seq_len
        qk_mask = n_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=qk_mask, other=0.0)
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_v[None, :],
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        phi_q = tl.where(qk_mask, _feature(q.to(tl.float32), FEATURE), 0.0) * scale
        phi_k = tl.where(qk_mask, _feature(k.to(tl.float32), FEATURE), 0.0)
        scores = dot(phi_q, tl.trans(phi_k), PRECISION) * intra
        out = dot(scores, v, PRECISION)
        out += dot(phi_q, state, PRECISION) * to_query[:, None]
        if NORMALIZE:
            den = tl.sum(scores, 1) + tl.sum(phi_q * norm[None, :], 1) * to_query
            out = out / (den + eps)[:, None]
        tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
                 out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])
        weighted_k = phi_k * to_state[:, None]
        state = state * chunk_decay + dot(tl.trans(weighted_k), v, PRECISION)
        norm = norm * chunk_decay + tl.sum(weighted_k, 0)


# ----------------------------------------------------------------------------- launcher

def linear_blocks(head_dim: int, value_dim: int) -> dict[str, int]:
    """Tile sizes: value columns split in blocks of at most 64 (a [D, 64] fp32 state per program)."""
    return {"BLOCK_N": 64, "CHUNK": 64, "BLOCK_D": block_dim(head_dim),
            "BLOCK_DV": min(64, block_dim(value_dim))}


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None, *,
                   feature_map: str = "elu1", causal: int = 0, normalize: int = 1, eps: float = 1e-6,
                   scale: float = 1.0) -> torch.Tensor:
    """Kernelized linear attention with the Triton kernels.

    Args:
        q, k: ``[B, H, N, D]`` before the feature map; v: ``[B, H, N, Dv]``.
        decay: ``[H]`` per-head λ in (0, 1], used only when ``causal``.
        feature_map: ``"elu1"``, ``"relu"`` or ``"identity"``.
    Returns:
        ``[B, H, N, Dv]`` in q's dtype.
    """
    check_inputs(q, k, v)
    if feature_map not in FEATURE_MAP_IDS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAP_IDS)}, got {feature_map!r}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, seq_len, head_dim = q.shape
    value_dim = v.shape[-1]
    blocks = linear_blocks(head_dim, value_dim)
    out = torch.empty(batch, heads, seq_len, value_dim, dtype=q.dtype, device=q.device)
    common = dict(FEATURE=FEATURE_MAP_IDS[feature_map], BLOCK_D=blocks["BLOCK_D"],
                  BLOCK_DV=blocks["BLOCK_DV"], PRECISION=dot_precision(q.dtype))
    if causal:
        lam = (decay.to(device=q.device, dtype=torch.float32).contiguous() if decay is not None else q)
        linear_causal_kernel[per_head_grid(batch, heads, value_dim, blocks["BLOCK_DV"])](
            q, k, v, lam, out, heads, seq_len, head_dim, value_dim, float(scale), float(eps),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            NORMALIZE=bool(normalize), HAS_DECAY=decay is not None, CHUNK=blocks["CHUNK"], **common)
        return out
    state = torch.empty(batch * heads, head_dim, value_dim, dtype=torch.float32, device=q.device)
    norm = torch.empty(batch * heads, head_dim, dtype=torch.float32, device=q.device)
    linear_state_kernel[per_head_grid(batch, heads, value_dim, blocks["BLOCK_DV"])](
        k, v, state, norm, heads, seq_len, head_dim, value_dim, *k.stride()[:3], *v.stride()[:3],
        BLOCK_N=blocks["BLOCK_N"], **common)
    linear_output_kernel[rows_grid(batch, heads, seq_len, blocks["BLOCK_N"], value_dim, blocks["BLOCK_DV"])](
        q, state, norm, out, heads, seq_len, head_dim, value_dim, float(scale), float(eps),
        *q.stride()[:3], *out.stride()[:3], NORMALIZE=bool(normalize), BLOCK_N=blocks["BLOCK_N"], **common)
    return out


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """The state, output and causal kernels (causal with decay), elu1 features."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    blocks = linear_blocks(head_dim, head_dim)
    common = dict(FEATURE=0, BLOCK_D=blocks["BLOCK_D"], BLOCK_DV=blocks["BLOCK_DV"],
                  PRECISION=dot_precision(torch_dtype))
    dims = {n: "i32" for n in ("heads", "seq_len", "head_dim", "value_dim")}
    strides = lambda *names: {f"s{t}_{a}": "i32" for t in names for a in "bhn"}  # noqa: E731
    return [
        KernelSpec(linear_state_kernel, {"K": ptr, "V": ptr, "S": "*fp32", "Z": "*fp32", **dims,
                                         **strides("k", "v")},
                   {**common, "BLOCK_N": blocks["BLOCK_N"]}),
        KernelSpec(linear_output_kernel, {"Q": ptr, "S": "*fp32", "Z": "*fp32", "O": ptr, **dims,
                                          "scale": "fp32", "eps": "fp32", **strides("q", "o")},
                   {**common, "NORMALIZE": True, "BLOCK_N": blocks["BLOCK_N"]}),
        KernelSpec(linear_causal_kernel, {"Q": ptr, "K": ptr, "V": ptr, "DECAY": "*fp32", "O": ptr, **dims,
                                          "scale": "fp32", "eps": "fp32", **strides("q", "k", "v", "o")},
                   {**common, "NORMALIZE": True, "HAS_DECAY": True, "CHUNK": blocks["CHUNK"]}),
    ]


__all__ = ["FEATURE_MAP_IDS", "aot_specs", "linear_blocks", "linear_causal_kernel", "linear_forward",
           "linear_output_kernel", "linear_state_kernel"]
