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
  scores and the running ``z`` the same way. The running ``S | z`` is the op's recurrent state
  (prefill, then decode): optionally loaded before the first chunk and stored after the last,
  fp32 ``[B, H, D, Dv + normalize]``.
- TensorRT (one kernel per AOT plugin, arguments ``(*inputs, *int32 scalars, *outputs)``):
  :func:`trt_launch` / :func:`kernel_for` pick :func:`linear_causal_trt` or, non-causal,
  :func:`linear_global_trt`, which runs the state and output passes in one program. Absent
  optional tensors are ``None`` constexprs, which are no kernel parameters.

Everything after the loads is fp32: φ, states and every product (``PRECISION`` "tf32" for
half inputs, whose values tf32 holds exactly; with bf16 products the masked C x C scores and
φ(Q), φ(K) would be rounded to 8 bits and the causal output measured 1.2e-2 relative error vs
float64, against 5e-3 now). Linear attention is bandwidth-bound, so the tf32 rate costs little.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, POINTER_TYPES, TORCH_DTYPES, KernelSpec, block_dim,
                                          check_inputs, dot, dot_precision, per_head_grid, rows_grid, trt_entry_jit)
from attnc.plugins.linear import state_shape  # the op's contract

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
def _state_pass(K, V, b, h, seq_len, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, offs_d, offs_v, d_ok, v_ok,
                FEATURE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr):
    """(φ(K)ᵀ V for one value-column block, Σ_n φ(K_n)) of head (b, h), fp32."""
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
    return state, norm


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
    state, norm = _state_pass(K, V, b, h, seq_len, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, offs_d, offs_v, d_ok, v_ok,
                              FEATURE, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
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
    Q, K, V, DECAY, STATE, O, STATE_OUT, heads, seq_len, head_dim, value_dim, scale, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_STATE: tl.constexpr,
    STORE_STATE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Chunked causal linear attention with optional per-head decay (one program per head and
    value-column block, sequential over chunks), starting from ``STATE`` (``HAS_STATE``, else
    zeros) and writing the state after the last token to ``STATE_OUT`` (``STORE_STATE``). Both
    are contiguous fp32 ``[B, H, D, Dv + NORMALIZE]``: ``S`` in the first ``Dv`` columns, ``z``
    in the last when ``NORMALIZE``."""
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
    # λ^{t-s} on and below the diagonal, 0 above; λ^{t+1} for the state.
    gap = (offs_c[:, None] - offs_c[None, :]).to(tl.float32)
    intra = tl.where(offs_c[:, None] >= offs_c[None, :], tl.exp2(gap * log2_decay), 0.0)
    to_query = tl.exp2((offs_c + 1).to(tl.float32) * log2_decay)
    # The state rows of this head: row stride Dv + NORMALIZE (z is the extra column).
    state_row = value_dim + NORMALIZE
    state_head = pid_bh.to(tl.int64) * head_dim * state_row + offs_d * state_row
    state_block = state_head[:, None] + offs_v[None, :]
    if HAS_STATE:
        state = tl.load(STATE + state_block, mask=d_ok[:, None] & v_ok[None, :], other=0.0)
        if NORMALIZE:   # every value-column block needs all of z for its normaliser
            norm = tl.load(STATE + state_head + value_dim, mask=d_ok, other=0.0)
        else:
            norm = tl.zeros([BLOCK_D], tl.float32)
    else:
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
        # S <- λ^L S + Σ_s λ^{L-1-s} k_sᵀ v_s over the chunk's L valid tokens: L < C in the last
        # chunk, where λ^C would decay the state past the sequence's end (wrong state out). The
        # clamp keeps λ^{-...} of the padding rows (whose k is 0) from overflowing to 0 * inf.
        steps = tl.minimum(seq_len - n0, CHUNK)
        weighted_k = phi_k * tl.exp2(tl.maximum(steps - 1 - offs_c, 0).to(tl.float32) * log2_decay)[:, None]
        chunk_decay = tl.exp2(steps.to(tl.float32) * log2_decay)
        state = state * chunk_decay + dot(tl.trans(weighted_k), v, PRECISION)
        norm = norm * chunk_decay + tl.sum(weighted_k, 0)
    if STORE_STATE:
        tl.store(STATE_OUT + state_block, state, mask=d_ok[:, None] & v_ok[None, :])
        if NORMALIZE:   # all blocks hold the same z: the first one writes it
            tl.store(STATE_OUT + state_head + value_dim, norm, mask=offs_d < tl.where(pid_v == 0, head_dim, 0))


# ----------------------------------------------------------------------------- TensorRT AOT entry points
# TensorRT launches a plugin's kernel with (*inputs, *int32 scalars, *outputs) and nothing else, so
# these take contiguous tensors, derive the strides from the sizes and inline the kernels above.
# The node's attributes are constexprs (a TensorRT node's attributes never change after the build;
# AOT plugins cannot take float scalars): feature map, normalize, scale, eps.

@triton.jit
def _linear_global(
    Q, K, V, O, heads, seq_len, head_dim, value_dim, scale, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Non-causal linear attention in one program per head and value-column block: the state pass
    (as :func:`linear_state_kernel`) then the output pass (as :func:`linear_output_kernel`) over
    the same head, the state kept in registers. One launch instead of two, but only
    ``B·H·⌈Dv/BLOCK_DV⌉`` programs walk the output (the two-launch path tiles the queries too)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, v_ok = offs_d < head_dim, offs_v < value_dim
    state, norm = _state_pass(K, V, b, h, seq_len, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, offs_d, offs_v, d_ok, v_ok,
                              FEATURE, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    for n0 in range(0, seq_len, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq_len
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        phi = tl.where(d_ok[None, :], _feature(q.to(tl.float32), FEATURE), 0.0) * scale
        out = dot(phi, state, PRECISION)
        if NORMALIZE:
            out = out / (tl.sum(phi * norm[None, :], 1) + eps)[:, None]
        tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
                 out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@trt_entry_jit("heads", "seq_len")
def linear_causal_trt(
    Q, K, V, DECAY, STATE, heads, seq_len, O, STATE_OUT,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """:func:`linear_causal_kernel` on contiguous ``[B, H, N, D]`` tensors (TensorRT's layout).

    ``DECAY``, ``STATE`` and ``STATE_OUT`` are ``None`` (constexpr) when the node lacks them:
    triton then drops them from the compiled kernel's parameters, so this one function has
    TensorRT's ``(present inputs, scalars, outputs)`` order for all eight combinations."""
    tokens = seq_len.to(tl.int64)
    linear_causal_kernel(
        Q, K, V, DECAY, STATE, O, STATE_OUT, heads, seq_len, HEAD_DIM, VALUE_DIM, SCALE, EPS,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM, heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, VALUE_DIM, heads * tokens * VALUE_DIM, tokens * VALUE_DIM,
        VALUE_DIM, FEATURE, NORMALIZE, DECAY is not None, STATE is not None, STATE_OUT is not None, CHUNK, BLOCK_D,
        BLOCK_DV, PRECISION)


@trt_entry_jit("heads", "seq_len")
def linear_global_trt(
    Q, K, V, DECAY, heads, seq_len, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, SCALE: tl.constexpr, EPS: tl.constexpr,
    FEATURE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """:func:`_linear_global` on contiguous tensors. ``DECAY``: ``None`` (constexpr) without a
    decay input; with one, TensorRT still passes the pointer, which the non-causal op ignores."""
    tokens = seq_len.to(tl.int64)
    _linear_global(
        Q, K, V, O, heads, seq_len, HEAD_DIM, VALUE_DIM, SCALE, EPS,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM, heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, VALUE_DIM, heads * tokens * VALUE_DIM, tokens * VALUE_DIM,
        VALUE_DIM, FEATURE, NORMALIZE, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)


# ----------------------------------------------------------------------------- launcher

def linear_config(causal: bool, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of the PyTorch path's kernels (:func:`linear_forward`
    and :func:`aot_specs`): causal :func:`linear_causal_kernel`, or non-causal
    :func:`linear_state_kernel` and :func:`linear_output_kernel` (one configuration for both).
    Its launcher may opt in to more than 48 KB of shared memory; none of these needs it.

    Causal: :func:`linear_trt_config`'s 16-token chunks (the same kernel as TensorRT's), with
    more registers' worth of room: this kernel takes its strides and dims at run time, and with
    TensorRT's tiles it spilled 24-136 B (half precision, head dims 64-128) and 8 B (fp32, head
    dim 32, sm_80). So half precision runs 8 warps, 32 value columns past head dim 64 (64 spilled
    24-136 B) and 32-token chunks with 4 warps up to head dim 32 (220-229 registers; at head dim
    64 they spilled 88 B with 64 value columns); fp32 up to head dim 32 runs 4 warps, two stages.
    The launcher's former 64-token chunks with 4 warps spilled 0.6-2.3 KB per thread in half
    precision and 1.4-25 KB in fp32 (sm_80/90, head dims 32-128); fp32 32-token chunks with 8 warps
    still spilled 0.5 KB at head dim 64. More shared memory does not help: the chunk's operands
    and the ``[D, BLOCK_DV]`` state live in registers.

    Non-causal: 64-token blocks. Half precision keeps 64 value columns, 4 warps and two stages (no
    spills, <= 64 KB). fp32 multiplies on CUDA cores, whose ``tl.dot`` holds whole operand rows in
    registers: with 64 value columns and 4 warps both kernels spilled 0.7-10 KB from head dim 64 on;
    8 warps with 32 value columns (16 past head dim 64) spill nothing, at 2-4x the programs of the
    state pass. Measured with ``kernels_common.resource_usage`` on sm_80 and sm_90 (value dim =
    head dim = 32, 64, 128).
    """
    half, widest = dtype != torch.float32, max(head_dim, value_dim)
    if causal:
        config = linear_trt_config(True, dtype, head_dim, value_dim)
        if half and widest <= 32:
            return {**config, "CHUNK": 32, "num_warps": 4, "num_stages": 2}
        if half:
            return {**config, "BLOCK_DV": min(32 if widest > 64 else 64, config["BLOCK_DV"]), "num_warps": 8}
        return {**config, "num_warps": 4, "num_stages": 2} if widest <= 32 else config
    block_d = block_dim(head_dim)
    if half:
        return {"BLOCK_D": block_d, "BLOCK_DV": min(64, block_dim(value_dim)), "BLOCK_N": 64, "num_warps": 4,
                "num_stages": 2}
    return {"BLOCK_D": block_d, "BLOCK_DV": min(16 if widest > 64 else 32, block_dim(value_dim)), "BLOCK_N": 64,
            "num_warps": 8, "num_stages": 2}


def linear_trt_config(causal: bool, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of the TensorRT kernels (one launch, no opt-in to
    more than 48 KB of shared memory).

    The ``[D, BLOCK_DV]`` fp32 state lives in registers next to the chunk's operands; fp32 inputs
    multiply on CUDA cores, whose ``tl.dot`` holds whole operand rows in registers. Measured on
    sm_86 with the PyTorch path's tiles (64-token chunks/blocks, two stages): fp32 took 45-115 KB
    of shared memory with register spills from head dim 64 on, fp16 spilled at head dim 128.
    Hence 16-token chunks, one stage and 8 warps for fp32 and wide causal heads, and
    16 value columns per program for fp32 past head dim 64. Half-precision causal heads of dim
    <= 64 (4 warps, two stages) also take 16-token chunks: with 32 at head dim 64, ptxas used all
    255 registers and spilled 16-72 B on sm_90, and 56-144 B on sm_80/90 once the kernel stores
    its recurrent state; with 16, 206-248 registers and no spills.
    """
    wide = max(head_dim, value_dim) > 64
    half = dtype != torch.float32
    config = {"BLOCK_D": block_dim(head_dim), "BLOCK_DV": min(64 if half or not wide else 16, block_dim(value_dim))}
    if causal:
        return {**config, "CHUNK": 16, "num_warps": 4 if half and not wide else 8,
                "num_stages": 2 if half and not wide else 1}
    if wide:
        return {**config, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1}
    return {**config, "BLOCK_N": 64, "num_warps": 4 if half else 8, "num_stages": 2}


def linear_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None, *,
                   feature_map: str = "elu1", causal: int = 0, normalize: int = 1, eps: float = 1e-6,
                   scale: float = 1.0, state: torch.Tensor | None = None,
                   return_state: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Kernelized linear attention with the Triton kernels.

    Args:
        q, k: ``[B, H, N, D]`` before the feature map; v: ``[B, H, N, Dv]``.
        decay: ``[H]`` per-head λ in (0, 1], used only when ``causal``.
        feature_map: ``"elu1"``, ``"relu"`` or ``"identity"``.
        state: causal only, float32 ``[B, H, D, Dv + normalize]``: the recurrent state before
            token 0 (``S`` in columns ``[:Dv]``, ``z`` in column ``Dv`` when ``normalize``), e.g.
            the ``state_out`` of the call on the previous tokens. None: zeros.
        return_state: causal only: also return the state after the last token, same layout.
    Returns:
        ``O`` ``[B, H, N, Dv]`` in q's dtype, or ``(O, state_out)`` when ``return_state``.
    """
    if (state is not None or return_state) and not causal:
        raise ValueError("linear_forward: state and return_state need causal=1 (a non-causal node has no "
                         "recurrent state); pass causal=1 or drop them")
    batch, heads, seq_len, head_dim = q.shape
    value_dim = v.shape[-1]
    state_dims = state_shape(q.shape, value_dim, normalize)
    if state is not None and (list(state.shape) != state_dims or state.dtype != torch.float32):
        raise ValueError(f"linear_forward: state must be float32 {state_dims} ([B, H, D, Dv + normalize]), got "
                         f"{state.dtype} {list(state.shape)}; pass the state_out of the previous call "
                         f"(return_state=True), or None for zeros")
    check_inputs(q, k, v, state)
    if feature_map not in FEATURE_MAP_IDS:
        raise ValueError(f"feature_map must be one of {tuple(FEATURE_MAP_IDS)}, got {feature_map!r}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    state = None if state is None else state.contiguous()
    config = linear_config(bool(causal), q.dtype, head_dim, value_dim)
    launch = dict(num_warps=config["num_warps"], num_stages=config["num_stages"])
    out = torch.empty(batch, heads, seq_len, value_dim, dtype=q.dtype, device=q.device)
    common = dict(FEATURE=FEATURE_MAP_IDS[feature_map], BLOCK_D=config["BLOCK_D"],
                  BLOCK_DV=config["BLOCK_DV"], PRECISION=dot_precision(q.dtype), **launch)
    if causal:
        state_out = torch.empty(state_dims, dtype=torch.float32, device=q.device) if return_state else None
        lam = (decay.to(device=q.device, dtype=torch.float32).contiguous() if decay is not None else q)
        # Absent pointers: q stands in (never read, the HAS_/STORE_ constexprs are False).
        linear_causal_kernel[per_head_grid(batch, heads, value_dim, config["BLOCK_DV"])](
            q, k, v, lam, q if state is None else state, out, q if state_out is None else state_out,
            heads, seq_len, head_dim, value_dim, float(scale), float(eps),
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            NORMALIZE=bool(normalize), HAS_DECAY=decay is not None, HAS_STATE=state is not None,
            STORE_STATE=return_state, CHUNK=config["CHUNK"], **common)
        return (out, state_out) if return_state else out
    state = torch.empty(batch * heads, head_dim, value_dim, dtype=torch.float32, device=q.device)
    norm = torch.empty(batch * heads, head_dim, dtype=torch.float32, device=q.device)
    linear_state_kernel[per_head_grid(batch, heads, value_dim, config["BLOCK_DV"])](
        k, v, state, norm, heads, seq_len, head_dim, value_dim, *k.stride()[:3], *v.stride()[:3],
        BLOCK_N=config["BLOCK_N"], **common)
    linear_output_kernel[rows_grid(batch, heads, seq_len, config["BLOCK_N"], value_dim, config["BLOCK_DV"])](
        q, state, norm, out, heads, seq_len, head_dim, value_dim, float(scale), float(eps),
        *q.stride()[:3], *out.stride()[:3], NORMALIZE=bool(normalize), BLOCK_N=config["BLOCK_N"], **common)
    return out


def run(attrs: dict, inputs: list, n_outputs: int = 1) -> list[torch.Tensor]:
    """One ``KernelLinearAttention`` node with :func:`linear_forward` (what TensorRT-RTX's Python
    plugins run, ``tensorrt_plugins.fused_outputs``).

    Args:
        attrs: ``feature_map``, ``causal``, ``normalize``, ``eps``, ``scale``, every one given
            (``fused_outputs`` fills in the defaults).
        inputs: ``[Q, K, V, decay, state]`` at their contract positions, ``None`` where the
            node has no such input.
        n_outputs: 1 (``O``) or 2 (``O, state_out``; causal only).
    Returns:
        ``[O]`` or ``[O, state_out]`` (``state_out`` float32).
    """
    q, k, v, decay, state = inputs
    # TensorRT may hand a float32-by-contract state over in Q's half dtype (the plugin accepts
    # either); the kernel's running state is float32.
    state = None if state is None else state.float()
    result = linear_forward(q, k, v, decay, feature_map=attrs["feature_map"], causal=int(attrs["causal"]),
                            normalize=int(attrs["normalize"]), eps=float(attrs["eps"]), scale=float(attrs["scale"]),
                            state=state, return_state=n_outputs > 1)
    return list(result) if n_outputs > 1 else [result]


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None, *,
               n_outputs: int = 1):
    """TensorRT's AOT kernel for one ``KernelLinearAttention`` node (``KernelProvider``).

    Args:
        attrs: the node's ``feature_map``, ``causal``, ``normalize``, ``eps``, ``scale``.
        dtypes, shapes: numpy dtype names and shapes (``None``: dynamic dim) of the inputs
            ``Q, K, V[, decay[, state]]``, positional: ``None`` for an absent optional input.
        arch: target architecture (default :func:`~attnc.plugins.kernels_common.default_arch`).
        n_outputs: 1 (``O``) or 2 (``O, state_out``; causal only).
    Returns:
        ``attnc.compiler.backends.tensorrt_plugins.AotKernel`` taking contiguous
        ``Q, K, V[, decay][, state], heads, seq_len, O[, state_out]`` (one launch, causal or not).
    """
    from attnc.plugins.kernels_common import aot_kernel

    return aot_kernel(*trt_launch(attrs, dtypes, shapes, n_outputs=n_outputs), arch)


def trt_launch(attrs: dict, dtypes: list, shapes: list, *, n_outputs: int = 1):
    """``(KernelSpec, grid(output_shapes), scalars(input_shapes))`` of the TensorRT entry point.

    Causal: :func:`linear_causal_trt`, specialised to the node's inputs (``decay`` read as its own
    dtype, float32 by contract; ``state`` float32) and outputs (``n_outputs`` 2: ``state_out``,
    float32). Non-causal: :func:`linear_global_trt`, the state and output passes fused into one
    program per head and value-column block (the Python launcher's two launches do not fit
    TensorRT's one kernel per AOT plugin); ``decay`` is ignored without ``causal``, as the op's
    contract says, and a recurrent state is refused. ``dtypes``/``shapes`` are positional, ``None``
    for an absent optional input (3 or 4 entries: no state). Shared by :func:`kernel_for` and the
    interpreter test.
    """
    from attnc.compiler.errors import AttncError
    from attnc.plugins.kernels_common import cdiv

    shapes = list(shapes) + [None] * (5 - len(shapes))
    dtypes = list(dtypes) + [None] * (5 - len(dtypes))
    if len(shapes) > 5 or None in shapes[:3] or dtypes[0] not in TORCH_DTYPES or n_outputs not in (1, 2):
        raise AttncError(f"the KernelLinearAttention kernel takes Q, K, V[, decay][, state] in fp32/fp16/bf16 and "
                         f"returns O[, state_out], got inputs {shapes} of {dtypes[0]} and {n_outputs} outputs",
                         "run the node through its ONNX function body (--fused-ops inline)")
    q_shape, v_shape = list(shapes[0]), list(shapes[2])
    head_dim, value_dim = q_shape[-1], v_shape[-1]
    if len(q_shape) != 4 or head_dim is None or value_dim is None:
        raise AttncError(f"KernelLinearAttention kernel needs [B, H, N, D] inputs with static head dims, got "
                         f"{q_shape}, {v_shape}", "export the model with static head dims")
    feature_map = attrs.get("feature_map") or "elu1"
    if feature_map not in FEATURE_MAP_IDS:
        raise AttncError(f"KernelLinearAttention feature_map {feature_map!r} has no kernel",
                         f"use one of {tuple(FEATURE_MAP_IDS)}")
    causal = bool(attrs.get("causal") or 0)
    normalize = bool(1 if attrs.get("normalize") is None else attrs.get("normalize"))
    eps, scale = attrs.get("eps"), attrs.get("scale")
    has_decay, has_state, store_state = shapes[3] is not None, shapes[4] is not None, n_outputs == 2
    if (has_state or store_state) and not causal:
        raise AttncError("KernelLinearAttention: state / state_out need causal=1",
                         "drop the state input and output, or export the node with causal=1")
    decay_dtype = dtypes[3] or "float32"
    if has_decay and decay_dtype not in TORCH_DTYPES:
        raise AttncError(f"KernelLinearAttention decay of dtype {decay_dtype} has no kernel",
                         "give decay as float32 (the op's contract)")
    if has_state:
        want = state_shape(q_shape, value_dim, normalize)
        if dtypes[4] != "float32" or len(shapes[4]) != 4 or any(
                got not in (None, dim) for got, dim in zip(shapes[4][2:], want[2:])):
            raise AttncError(f"KernelLinearAttention state must be float32 {want}, got {dtypes[4]} {shapes[4]}",
                             "give the state as float32 [B, H, D, Dv + normalize] (the op's contract)")
    torch_dtype = TORCH_DTYPES[dtypes[0]]
    ptr = POINTER_TYPES[torch_dtype]
    blocks = linear_trt_config(causal, torch_dtype, head_dim, value_dim)
    constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, SCALE=float(1.0 if scale is None else scale),
                      EPS=float(1e-6 if eps is None else eps), FEATURE=FEATURE_MAP_IDS[feature_map],
                      NORMALIZE=normalize, BLOCK_D=blocks["BLOCK_D"], BLOCK_DV=blocks["BLOCK_DV"],
                      PRECISION=dot_precision(torch_dtype))
    signature = {"Q": ptr, "K": ptr, "V": ptr, "heads": "i32", "seq_len": "i32", "O": ptr}
    # TensorRT passes decay whenever the node has one (read only when causal).
    optional = {"DECAY": POINTER_TYPES[TORCH_DTYPES[decay_dtype]] if has_decay else None}
    if causal:
        kernel = linear_causal_trt
        constexprs["CHUNK"] = blocks["CHUNK"]
        optional.update(STATE="*fp32" if has_state else None, STATE_OUT="*fp32" if store_state else None)
    else:
        kernel = linear_global_trt
        constexprs["BLOCK_N"] = blocks["BLOCK_N"]
    for name, pointer in optional.items():
        # An absent tensor is a None constexpr, which is no parameter of the compiled kernel.
        if pointer is None:
            constexprs[name] = None
        else:
            signature[name] = pointer
    spec = KernelSpec(kernel, signature, constexprs, num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])

    def grid(output_shapes):
        out = output_shapes[0]
        return (out[0] * out[1], cdiv(value_dim, blocks["BLOCK_DV"]), 1)

    def scalars(input_shapes):
        return [input_shapes[0][1], input_shapes[0][2]]

    return spec, grid, scalars


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """The state, output and causal kernels (causal with decay, state in and out), elu1 features,
    in :func:`linear_config`'s launch configurations (value dim = head dim)."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    dims = {n: "i32" for n in ("heads", "seq_len", "head_dim", "value_dim")}
    strides = lambda *names: {f"s{t}_{a}": "i32" for t in names for a in "bhn"}  # noqa: E731

    def spec(kernel, signature, causal, **constexprs):
        config = linear_config(causal, torch_dtype, head_dim, head_dim)
        tiles = {k: config[k] for k in (("CHUNK",) if causal else ("BLOCK_N",)) + ("BLOCK_D", "BLOCK_DV")}
        return KernelSpec(kernel, signature, {"FEATURE": 0, "PRECISION": dot_precision(torch_dtype), **tiles,
                                              **constexprs},
                          num_warps=config["num_warps"], num_stages=config["num_stages"])

    return [
        spec(linear_state_kernel, {"K": ptr, "V": ptr, "S": "*fp32", "Z": "*fp32", **dims, **strides("k", "v")},
             False),
        spec(linear_output_kernel, {"Q": ptr, "S": "*fp32", "Z": "*fp32", "O": ptr, **dims, "scale": "fp32",
                                    "eps": "fp32", **strides("q", "o")}, False, NORMALIZE=True),
        spec(linear_causal_kernel, {"Q": ptr, "K": ptr, "V": ptr, "DECAY": "*fp32", "STATE": "*fp32", "O": ptr,
                                    "STATE_OUT": "*fp32", **dims, "scale": "fp32", "eps": "fp32",
                                    **strides("q", "k", "v", "o")},
             True, NORMALIZE=True, HAS_DECAY=True, HAS_STATE=True, STORE_STATE=True),
    ]


__all__ = ["FEATURE_MAP_IDS", "aot_specs", "kernel_for", "linear_causal_kernel", "linear_causal_trt", "linear_config",
           "linear_forward", "linear_global_trt", "linear_output_kernel", "linear_state_kernel", "linear_trt_config",
           "state_shape", "trt_launch"]
