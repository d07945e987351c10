"""Triton kernels of ``attnc::FlowAttention`` (non-causal Flowformer), fused into four passes.

``Q`` ``[B, H, L, D]``, ``K`` ``[B, H, S, D]``, ``V`` ``[B, H, S, Dv]`` before the sigmoid;
semantics as ``attnc.plugins.flow``. With φ = sigmoid and ε = eps, the dependencies are a chain
of full reductions, and each pass reads only what the next one needs:

1. ``Σ_s φk`` over K and ``Σ_l φq`` over Q (:func:`flow_reduce_kernel`, ``WEIGHTED=False``,
   one launch each);
2. ``Σ_l φq_l · I_l`` over Q, with ``I_l = 1/((φq_l+ε)·(Σφk+ε))`` (same kernel, ``WEIGHTED``);
3. one pass over K and V (:func:`flow_kv_kernel`): the outgoing flow ``O_s``, the conserved
   source ``Ô_s = clip((φk_s+ε)·(Σφq·I+ε), -1, 1)``, ``e_s = exp(Ô_s)`` (no running max
   needed: ``Ô`` is clipped to [-1, 1]), and the sums ``Σ φk·O``, ``Σ e`` and
   ``kv = φKᵀ (V·e)``;
4. the output (:func:`flow_output_kernel`): ``(φq·I) kv · S/Σe · sigmoid(Î·L/S)`` with
   ``Î = (φq+ε)·(Σφk·O+ε)``.

Q is read three times, K twice, V once: the minimum, since ``Ô`` needs a full pass over Q
after a full pass over K, and the output needs a full pass over K after that. All
intermediate sums are fp32 ``[B·H, D]`` (``kv`` ``[B·H, D, Dv]``), products fp32 (tf32 for
half inputs). Passes 1-3 split each head's tokens into ranges (:func:`flow_token_splits`: with
few heads, one program per head walking every token leaves most of a GPU idle; on an H200 the
one-range form ran 0.72x of ``torch.compile`` at B8 H8 N4096); each range writes partial
sums, added in fp32 before the next pass.

Causal (:func:`flow_causal_kernel`): every sum becomes a prefix sum, so a single chunked walk
computes all of them and the causal linear-attention product at once.

TensorRT (one kernel per AOT plugin, arguments ``(*inputs, *int32 scalars, *outputs)``):
:func:`trt_launch` / :func:`kernel_for` pick :func:`flow_causal_trt` or, non-causal,
:func:`flow_global_trt`, which runs the four passes one after the other in one program per
head and value-column block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, POINTER_TYPES, TORCH_DTYPES, KernelSpec, block_dim, cdiv,
                                          check_inputs, dot, dot_precision, per_head_grid, range_length, range_splits,
                                          rows_grid, trt_entry_jit)


@triton.jit
def flow_reduce_kernel(
    X, OTHER, OUT, heads, length, head_dim, sx_b, sx_h, sx_n, eps, per_split, splits,
    WEIGHTED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT[bh, s] = Σ_n φx_n, or with WEIGHTED Σ_n φx_n / ((φx_n+ε)·(OTHER[bh]+ε)), over split
    ``s``'s ``per_split`` tokens (fp32 ``[BH, splits, D]``; the launcher sums the splits)."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if WEIGHTED:
        other = tl.load(OTHER + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    total = tl.zeros([BLOCK_D], tl.float32)
    start = pid_s * per_split
    end = tl.minimum(start + per_split, length)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = (offs_n < end)[:, None] & d_ok[None, :]
        x = tl.load(X + b * sx_b + h * sx_h + offs_n[:, None] * sx_n + offs_d[None, :], mask=ok, other=0.0)
        phi = tl.where(ok, tl.sigmoid(x.to(tl.float32)), 0.0)
        if WEIGHTED:
            flow = tl.sum(tl.where(ok, (phi + eps) * (other[None, :] + eps), 0.0), 1)
            phi = phi / tl.where(flow > 0, flow, 1.0)[:, None]
        total += tl.sum(phi, 0)
    tl.store(OUT + (pid_bh.to(tl.int64) * splits + pid_s) * head_dim + offs_d, total, mask=d_ok)


@triton.jit
def _kv_pass(K, V, b, h, start, end, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, offs_d, offs_v, d_ok, v_ok, q_sum, q_in,
             eps, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """The key/value pass of head (b, h) over keys ``[start, end)``: (φKᵀ (V·e), Σ φk·O, per-lane
    partial Σ e), fp32, with e = exp(clip(Ô, -1, 1)) and O the outgoing flow."""
    kv = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    k_out = tl.zeros([BLOCK_D], tl.float32)
    e_acc = tl.zeros([BLOCK_N], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=ok, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_v[None, :],
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        phi = tl.where(ok, tl.sigmoid(k.to(tl.float32)), 0.0)
        phi_eps = tl.where(ok, phi + eps, 0.0)
        outgoing = 1.0 / tl.sum(phi_eps * (q_sum[None, :] + eps), 1)
        source = tl.minimum(tl.maximum(tl.sum(phi_eps * (q_in[None, :] + eps), 1), -1.0), 1.0)
        e = tl.where(n_ok, tl.exp(source), 0.0)
        kv += dot(tl.trans(phi), v * e[:, None], PRECISION)
        k_out += tl.sum(phi * tl.where(n_ok, outgoing, 0.0)[:, None], 0)
        e_acc += e
    return kv, k_out, e_acc


@triton.jit
def flow_kv_kernel(
    K, V, Q_SUM, Q_INCOMING, KV, K_OUTGOING, E_SUM, heads, sources, head_dim, value_dim, eps,
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, per_split, splits,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """KV[bh, s] = φKᵀ (V·e), K_OUTGOING[bh, s] = Σ φk·O, E_SUM[bh, s] = Σ e over split ``s``'s
    ``per_split`` keys, e = exp(clip(Ô, -1, 1)); the launcher sums the splits."""
    pid_bh, pid_v, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, v_ok = offs_d < head_dim, offs_v < value_dim
    q_sum = tl.load(Q_SUM + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    q_in = tl.load(Q_INCOMING + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    start = pid_s * per_split
    kv, k_out, e_sum = _kv_pass(K, V, b, h, start, tl.minimum(start + per_split, sources), sk_b, sk_h, sk_n,
                                sv_b, sv_h, sv_n, offs_d, offs_v, d_ok, v_ok, q_sum, q_in, eps, BLOCK_N, BLOCK_D,
                                BLOCK_DV, PRECISION)
    row = pid_bh.to(tl.int64) * splits + pid_s
    tl.store(KV + row * head_dim * value_dim + offs_d[:, None] * value_dim + offs_v[None, :], kv,
             mask=d_ok[:, None] & v_ok[None, :])
    # Every value-column block computes the same per-head sums; the first one writes them.
    first = pid_v == 0
    tl.store(K_OUTGOING + row * head_dim + offs_d, k_out, mask=offs_d < tl.where(first, head_dim, 0))
    tl.store(E_SUM + row + tl.arange(0, 1), tl.sum(e_sum, 0) + tl.zeros([1], tl.float32),
             mask=tl.arange(0, 1) < tl.where(first, 1, 0))


@triton.jit
def flow_output_kernel(
    Q, K_SUM, K_OUTGOING, KV, E_SUM, O, heads, length, sources, head_dim, value_dim, eps,
    sq_b, sq_h, sq_n, so_b, so_h, so_n,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """O = (φq·I) KV · (S / Σe) · sigmoid(Î · L/S) for BLOCK_N queries."""
    pid_bh, pid_n, pid_v = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    n_ok, d_ok, v_ok = offs_n < length, offs_d < head_dim, offs_v < value_dim
    ok = n_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=ok, other=0.0)
    phi = tl.where(d_ok[None, :], tl.sigmoid(q.to(tl.float32)), 0.0)
    phi_eps = tl.where(d_ok[None, :], phi + eps, 0.0)
    k_sum = tl.load(K_SUM + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    k_out = tl.load(K_OUTGOING + pid_bh * head_dim + offs_d, mask=d_ok, other=0.0)
    incoming = 1.0 / tl.sum(phi_eps * (k_sum[None, :] + eps), 1)
    sink = tl.sum(phi_eps * (k_out[None, :] + eps), 1)
    allocation = tl.sigmoid(sink * (length * 1.0 / sources))
    kv = tl.load(KV + pid_bh * head_dim * value_dim + offs_d[:, None] * value_dim + offs_v[None, :],
                 mask=d_ok[:, None] & v_ok[None, :], other=0.0)
    e_sum = tl.sum(tl.load(E_SUM + pid_bh + tl.arange(0, 1)), 0)
    out = dot(phi * incoming[:, None], kv, PRECISION)
    out = out * (allocation * (sources / e_sum))[:, None]
    tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
             out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@triton.jit
def _phi_slice(X, base, offs_n, n_ok, stride_n, d0, head_dim, D_SLICE: tl.constexpr, EVICT: tl.constexpr):
    """φ = sigmoid of rows ``offs_n``, head-dim lanes ``d0 .. d0+D_SLICE`` (fp32, 0 where masked)."""
    offs_d = d0 + tl.arange(0, D_SLICE)
    ok = n_ok[:, None] & (offs_d < head_dim)[None, :]
    x = tl.load(X + base + offs_n[:, None] * stride_n + offs_d[None, :], mask=ok, other=0.0, eviction_policy=EVICT)
    return tl.where(ok, tl.sigmoid(x.to(tl.float32)), 0.0)


@triton.jit
def _eps_dot(phi, total, d_ok, eps):
    """Σ_d (φ_d+ε)·(total_d+ε) per row, over the unmasked lanes."""
    return tl.sum(tl.where(d_ok[None, :], phi + eps, 0.0) * (total + eps)[None, :], 1)


@triton.jit
def flow_causal_kernel(
    Q, K, V, O, heads, length, head_dim, value_dim, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D_SLICE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Causal flow attention in one chunked pass (one program per head and value-column block).

    Every cumulative sum is a prefix sum, so one walk over the sequence suffices: the chunks
    before contribute running totals, the chunk itself in-chunk prefix sums. Every in-chunk
    prefix sum the flow terms need is contracted with a ``φq+ε`` or ``φk+ε`` row right away,
    so it is a masked row or column sum of the one ``C x C`` Gram matrix ``G = φq φkᵀ``
    (``(φq_t+ε)·φk_s = G[t, s] + ε·Σφk_s``); no ``[C, D]`` prefix sum is ever built. The output
    is causal linear attention of ``φq`` and ``v' = v·competition`` (masked ``G`` plus the
    running ``[D, Dv]`` state), scaled per row by ``I/n · allocation``.

    Register pressure: the head dim is walked in ``D_SLICE``-wide slices (the state and the
    running sums are tuples of slices), so no ``tl.dot`` operand is wider than ``[C, D_SLICE]``
    (an operand holds whole K-wide rows in every warp). The in-chunk product ``tril(G)·v'`` is the
    last ``tl.dot`` of the loop on purpose: Triton gives all chained dots of a program the warp
    layout it picks for the dot it converts first, the last one, and for a ``[C, Dv]`` product that
    layout splits the value columns over the warps. Last, the ``[D_SLICE, Dv]`` state update
    picks one that splits rows once ``Dv <= D_SLICE``, which for ``C = 16`` replicates every
    ``[C, ·]`` product and the whole state operand in every warp (head dim 128, value dim 32:
    255 registers and 32 B of spills on sm_90, against 200 registers and none).
    """
    SLICES: tl.constexpr = BLOCK_D // D_SLICE
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    q_base, k_base = b * sq_b + h * sq_h, b * sk_b + h * sk_h
    offs_c = tl.arange(0, CHUNK)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < value_dim
    zeros_d = tl.zeros([D_SLICE], tl.float32)
    k_total = (zeros_d,) * SLICES          # Σ φk
    q_total = (zeros_d,) * SLICES          # Σ φq
    k_out_total = (zeros_d,) * SLICES      # Σ φk·O
    q_in_total = (zeros_d,) * SLICES       # Σ φq·I
    state = (tl.zeros([D_SLICE, BLOCK_DV], tl.float32),) * SLICES
    src_total = tl.zeros([CHUNK], tl.float32)       # Σ exp(Ô), kept as a vector (sum at use)
    causal = offs_c[:, None] >= offs_c[None, :]     # [t, s]: s <= t
    anticausal = offs_c[:, None] <= offs_c[None, :]  # [s, t]: s <= t
    for n0 in range(0, length, CHUNK):
        offs_n = n0 + offs_c
        n_ok = offs_n < length
        visible = (offs_n + 1).to(tl.float32)           # n_t
        gram = tl.zeros([CHUNK, CHUNK], tl.float32)     # [t, s] = φq_t·φk_s
        q_sum = tl.zeros([CHUNK], tl.float32)           # Σ_d φq_t
        k_sum = tl.zeros([CHUNK], tl.float32)
        q_on_k_total = tl.zeros([CHUNK], tl.float32)    # (φq_t+ε)·(Σ φk + ε) over the chunks before
        k_on_q_total = tl.zeros([CHUNK], tl.float32)
        q_on_k_out = tl.zeros([CHUNK], tl.float32)      # (φq_t+ε)·(Σ φk·O + ε)
        k_on_q_in = tl.zeros([CHUNK], tl.float32)
        for j in tl.static_range(SLICES):
            d_ok = j * D_SLICE + tl.arange(0, D_SLICE) < head_dim
            phi_q = _phi_slice(Q, q_base, offs_n, n_ok, sq_n, j * D_SLICE, head_dim, D_SLICE, "evict_last")
            phi_k = _phi_slice(K, k_base, offs_n, n_ok, sk_n, j * D_SLICE, head_dim, D_SLICE, "evict_last")
            gram += dot(phi_q, tl.trans(phi_k), PRECISION)
            q_sum += tl.sum(phi_q, 1)
            k_sum += tl.sum(phi_k, 1)
            q_on_k_total += _eps_dot(phi_q, k_total[j], d_ok, eps)
            k_on_q_total += _eps_dot(phi_k, q_total[j], d_ok, eps)
            q_on_k_out += _eps_dot(phi_q, k_out_total[j], d_ok, eps)
            k_on_q_in += _eps_dot(phi_k, q_in_total[j], d_ok, eps)
        # (φq_t+ε)·φk_s on [t, s] and (φk_t+ε)·φq_s transposed, on [s, t], both zero outside s <= t.
        q_on_k = tl.where(causal, gram + eps * k_sum[None, :], 0.0)
        k_on_q = tl.where(anticausal, gram + eps * q_sum[:, None], 0.0)
        incoming = visible / (tl.sum(q_on_k, 1) + q_on_k_total)
        outgoing = visible / (tl.sum(k_on_q, 0) + k_on_q_total)
        sink = (tl.sum(q_on_k * outgoing[None, :], 1) + q_on_k_out) / visible
        source = (tl.sum(k_on_q * incoming[:, None], 0) + k_on_q_in) / visible
        src = tl.where(n_ok, tl.exp(tl.minimum(tl.maximum(source, -1.0), 1.0)), 0.0)
        competition = src / (tl.sum(tl.where(causal, src[None, :], 0.0), 1) + tl.sum(src_total, 0)) * visible
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_v[None, :],
                    mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)
        v_scaled = v * competition[:, None]
        out = tl.zeros([CHUNK, BLOCK_DV], tl.float32)
        new_state, new_k_total, new_q_total, new_k_out, new_q_in = (), (), (), (), ()
        for j in tl.static_range(SLICES):
            # Reloaded, not kept from the loop above: cache hits instead of [C, D] live registers
            # (the loads differ in eviction policy, or the compiler merges them into one).
            phi_q = _phi_slice(Q, q_base, offs_n, n_ok, sq_n, j * D_SLICE, head_dim, D_SLICE, "evict_first")
            phi_k = _phi_slice(K, k_base, offs_n, n_ok, sk_n, j * D_SLICE, head_dim, D_SLICE, "evict_first")
            out += dot(phi_q, state[j], PRECISION)
            new_state += (state[j] + dot(tl.trans(phi_k), v_scaled, PRECISION),)
            new_k_total += (k_total[j] + tl.sum(phi_k, 0),)
            new_q_total += (q_total[j] + tl.sum(phi_q, 0),)
            new_k_out += (k_out_total[j] + tl.sum(phi_k * outgoing[:, None], 0),)
            new_q_in += (q_in_total[j] + tl.sum(phi_q * incoming[:, None], 0),)
        state, k_total, q_total, k_out_total, q_in_total = new_state, new_k_total, new_q_total, new_k_out, new_q_in
        src_total += src
        out += dot(tl.where(causal, gram, 0.0), v_scaled, PRECISION)   # the last tl.dot: see above
        out = out * (incoming / visible * tl.sigmoid(sink))[:, None]
        tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
                 out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


# ----------------------------------------------------------------------------- TensorRT AOT entry points
# TensorRT launches a plugin's kernel with (*inputs, *int32 scalars, *outputs) and nothing else, so
# these take contiguous tensors, derive the strides from the sizes and inline the kernels above;
# eps is a constexpr (AOT plugins cannot take float scalars; a node's attributes never change).

@triton.jit
def _flow_global(
    Q, K, V, O, heads, length, sources, head_dim, value_dim, eps,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Non-causal flow attention in one program per head and value-column block: the four passes
    of the Python launcher (reductions, weighted reduction, key/value pass, output) run one after
    the other in the same program, every intermediate sum in registers. One launch instead of
    five, at ``B·H·⌈Dv/BLOCK_DV⌉`` programs (the launcher's output pass also tiles the queries)."""
    pid_bh, pid_v = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok, v_ok = offs_d < head_dim, offs_v < value_dim
    # 1. Σ φk over the keys.
    k_sum = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, sources, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = (offs_n < sources)[:, None] & d_ok[None, :]
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=ok, other=0.0)
        k_sum += tl.sum(tl.where(ok, tl.sigmoid(k.to(tl.float32)), 0.0), 0)
    # 2. Σ φq and Σ φq·I over the queries (I needs Σ φk only).
    q_sum = tl.zeros([BLOCK_D], tl.float32)
    q_in = tl.zeros([BLOCK_D], tl.float32)
    for n0 in range(0, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        ok = (offs_n < length)[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=ok, other=0.0)
        phi = tl.where(ok, tl.sigmoid(q.to(tl.float32)), 0.0)
        flow = tl.sum(tl.where(ok, (phi + eps) * (k_sum[None, :] + eps), 0.0), 1)
        q_sum += tl.sum(phi, 0)
        q_in += tl.sum(phi / tl.where(flow > 0, flow, 1.0)[:, None], 0)
    # 3. Keys and values: kv = φKᵀ (V·e), Σ φk·O, Σ e (as flow_kv_kernel).
    kv, k_out, e_acc = _kv_pass(K, V, b, h, 0, sources, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, offs_d, offs_v, d_ok,
                                v_ok, q_sum, q_in, eps, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)
    e_sum = tl.sum(e_acc, 0)
    # 4. The output (as flow_output_kernel).
    for n0 in range(0, length, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < length
        ok = n_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b * sq_b + h * sq_h + offs_n[:, None] * sq_n + offs_d[None, :], mask=ok, other=0.0)
        phi = tl.where(d_ok[None, :], tl.sigmoid(q.to(tl.float32)), 0.0)
        phi_eps = tl.where(d_ok[None, :], phi + eps, 0.0)
        incoming = 1.0 / tl.sum(phi_eps * (k_sum[None, :] + eps), 1)
        sink = tl.sum(phi_eps * (k_out[None, :] + eps), 1)
        allocation = tl.sigmoid(sink * (length * 1.0 / sources))
        out = dot(phi * incoming[:, None], kv, PRECISION)
        out = out * (allocation * (sources / e_sum))[:, None]
        tl.store(O + b * so_b + h * so_h + offs_n[:, None] * so_n + offs_v[None, :],
                 out.to(O.dtype.element_ty), mask=n_ok[:, None] & v_ok[None, :])


@trt_entry_jit("heads", "length", "sources")
def flow_global_trt(
    Q, K, V, heads, length, sources, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    queries, keys = length.to(tl.int64), sources.to(tl.int64)
    _flow_global(
        Q, K, V, O, heads, length, sources, HEAD_DIM, VALUE_DIM, EPS,
        heads * queries * HEAD_DIM, queries * HEAD_DIM, HEAD_DIM, heads * keys * HEAD_DIM, keys * HEAD_DIM, HEAD_DIM,
        heads * keys * VALUE_DIM, keys * VALUE_DIM, VALUE_DIM, heads * queries * VALUE_DIM, queries * VALUE_DIM,
        VALUE_DIM, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)


@trt_entry_jit("heads", "length")
def flow_causal_trt(
    Q, K, V, heads, length, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, EPS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D_SLICE: tl.constexpr, PRECISION: tl.constexpr,
):
    tokens = length.to(tl.int64)
    flow_causal_kernel(
        Q, K, V, O, heads, length, HEAD_DIM, VALUE_DIM, EPS,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM, heads * tokens * HEAD_DIM, tokens * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, VALUE_DIM, heads * tokens * VALUE_DIM, tokens * VALUE_DIM,
        VALUE_DIM, CHUNK, BLOCK_D, BLOCK_DV, D_SLICE, PRECISION)


# ----------------------------------------------------------------------------- launcher

def flow_config(kernel: str, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of one PyTorch-path kernel (:func:`flow_forward` and
    :func:`aot_specs`): ``kernel`` is ``"reduce"`` (:func:`flow_reduce_kernel`), ``"kv"``
    (:func:`flow_kv_kernel`), ``"output"`` (:func:`flow_output_kernel`) or ``"causal"``
    (:func:`flow_causal_kernel`). The non-causal kernels pass their sums through memory, so each
    takes its own tiles. None needs more than 48 KB of shared memory.

    Measured with ``kernels_common.resource_usage`` on sm_80 and sm_90, value dim = head dim = 32,
    64, 128. The launcher's former 64-token blocks, 64 value columns and 4 warps spilled in the
    key/value pass (fp32 0.5-14 KB, half 32 B-1.5 KB from head dim 64 on) and the output pass
    (fp32 0.9-9 KB from head dim 64 on, half 216-264 B at 128). Now:

    - key/value (a ``[BLOCK_N, D]`` φ tile, its flow row sums and the ``[D, BLOCK_DV]`` product
      live at once): fp32 (CUDA-core ``tl.dot``) 16-token blocks, 32 value columns, 8 warps (with
      32 tokens 8-32 B spilled on sm_90); half 64-token blocks (32 past head dim 64) and 8 warps.
    - output: 32 value columns and 8 warps in fp32, 64-token tiles (32 past head dim 64: 64 with
      16 columns spilled 72 B on sm_90); half keeps 64 x 64 tiles with 8 warps (4 spilled 8 B on
      sm_86/89 at head dim 64 and 216-264 B on sm_80/90 at 128).
    - causal: :func:`flow_trt_config`'s (the same kernel as TensorRT's), but 32 value columns
      for half precision past head dim 64: with 64, this kernel (run-time strides and dims) spilled
      24 B on sm_90 at head dim 128.
    - reductions: 64-token blocks, 4 warps (no products, few registers).
    """
    half, wide = dtype != torch.float32, max(head_dim, value_dim) > 64
    if kernel == "causal":
        config = flow_trt_config(True, dtype, head_dim, value_dim)
        return {**config, "BLOCK_DV": min(32, config["BLOCK_DV"])} if half and wide else config
    config = {"BLOCK_D": block_dim(head_dim), "num_stages": 2}
    if kernel == "reduce":
        return {**config, "BLOCK_N": 64, "num_warps": 4}
    block_dv = lambda most: min(most, block_dim(value_dim))  # noqa: E731
    if kernel == "kv":
        if half:
            return {**config, "BLOCK_N": 32 if wide else 64, "BLOCK_DV": block_dv(64), "num_warps": 8}
        return {**config, "BLOCK_N": 16, "BLOCK_DV": block_dv(32), "num_warps": 8}
    if kernel == "output":
        if half:
            return {**config, "BLOCK_N": 64, "BLOCK_DV": block_dv(64), "num_warps": 8}
        return {**config, "BLOCK_N": 32 if wide else 64, "BLOCK_DV": block_dv(32), "num_warps": 8}
    raise ValueError(f"flow_config: no kernel {kernel!r}")


def flow_trt_config(causal: bool, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of the TensorRT kernels (one launch, no opt-in to
    more than 48 KB of shared memory, no register spills); the launcher's causal kernel starts from
    them (:func:`flow_config`).

    Causal: 16-token chunks, 8 warps, one stage; the head dim in 32-wide slices (16 in fp32, whose
    ``tl.dot`` runs on CUDA cores and holds whole operand rows in registers) and 64 value columns
    per program (32 in fp32). Measured with ``kernels_common.resource_usage`` for head dims 32, 64,
    96 and 128 (value dims the same, and 32) on sm_80 and sm_90 in every dtype: at most 204
    registers, no spills, 4-5 KB of shared memory.
    Without the slices (one ``[C, D]`` operand) the kernel spilled 24 B-8 KB from head dim 64 on;
    fp32 with 32-wide slices and 32 value columns still spilled 24-56 B at head dims 64 and 128;
    the launcher's former 32-token chunks and 4 warps spilled 40 B (fp16) to 1.8 KB (fp32) at
    head dim 64.

    Non-causal: measured on sm_86 with 32-token blocks and two stages, fp32 took 49-98 KB of shared
    memory from head dim 64 on and spilled registers at head dim 128; hence 16-token blocks and
    one stage in fp32, and fewer value columns per program in fp32 above head dim 64.
    """
    half = dtype != torch.float32
    block_d = block_dim(head_dim)
    if causal:
        # BLOCK_D: the head dim padded to whole slices only (96 = 3 x 32, not 4), no all-masked slice.
        d_slice = min(32 if half else 16, block_d)
        return {"BLOCK_D": d_slice * cdiv(head_dim, d_slice), "BLOCK_DV": min(64 if half else 32, block_dim(value_dim)),
                "CHUNK": 16, "D_SLICE": d_slice, "num_warps": 8, "num_stages": 1}
    wide = max(head_dim, value_dim) > 64
    config = {"BLOCK_D": block_d, "BLOCK_DV": min(64 if half else 16 if wide else 32, block_dim(value_dim))}
    if half:
        return {**config, "BLOCK_N": 32, "num_warps": 8 if wide else 4, "num_stages": 2}
    return {**config, "BLOCK_N": 16, "num_warps": 8, "num_stages": 1}


def flow_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: int = 0,
                 eps: float = 1e-6, token_splits: int | None = None) -> torch.Tensor:
    """Flow attention with the Triton kernels (four passes; causal: one chunked pass).

    Args:
        q: ``[B, H, L, D]``, k: ``[B, H, S, D]``, v: ``[B, H, S, Dv]``, before the sigmoid.
        token_splits: non-causal only: ranges each head's token reductions (the passes over K,
            Q, then K and V) split into, their partial sums added in fp32 after each pass (1: one
            program per head walks all tokens). Default :func:`flow_token_splits`.
    Returns:
        ``[B, H, L, Dv]`` in q's dtype.
    """
    check_inputs(q, k, v)
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, heads, length, head_dim = q.shape
    sources, value_dim = k.shape[2], v.shape[-1]
    if causal:
        if sources != length:
            raise ValueError("causal flow attention needs as many keys as queries")
        out = torch.empty(batch, heads, length, value_dim, dtype=q.dtype, device=q.device)
        config = flow_config("causal", q.dtype, head_dim, value_dim)
        flow_causal_kernel[per_head_grid(batch, heads, value_dim, config["BLOCK_DV"])](
            q, k, v, out, heads, length, head_dim, value_dim, eps, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *out.stride()[:3], PRECISION=dot_precision(q.dtype), **config)
        return out
    rows = batch * heads
    reduce = flow_config("reduce", q.dtype, head_dim, value_dim)
    kv_config = flow_config("kv", q.dtype, head_dim, value_dim)
    q_splits = flow_token_splits(rows, length, reduce["BLOCK_N"], token_splits)
    k_splits = flow_token_splits(rows, sources, reduce["BLOCK_N"], token_splits)
    kv_splits = flow_token_splits(rows * cdiv(value_dim, kv_config["BLOCK_DV"]), sources, kv_config["BLOCK_N"],
                                  token_splits)
    f32 = dict(dtype=torch.float32, device=q.device)

    def merged(part):   # [rows, splits, ...] partial sums -> [rows, ...]
        return part[:, 0] if part.shape[1] == 1 else part.sum(1)

    def reduce_pass(x, other, tokens, splits, weighted):
        part = torch.empty(rows, splits, head_dim, **f32)
        flow_reduce_kernel[(rows, splits)](x, other, part, heads, tokens, head_dim, *x.stride()[:3], eps,
                                           range_length(tokens, splits, reduce["BLOCK_N"]), splits,
                                           WEIGHTED=weighted, **reduce)
        return merged(part)

    k_sum = reduce_pass(k, k, sources, k_splits, False)
    q_sum = reduce_pass(q, q, length, q_splits, False)
    q_incoming = reduce_pass(q, k_sum, length, q_splits, True)
    kv = torch.empty(rows, kv_splits, head_dim, value_dim, **f32)
    k_outgoing, e_sum = torch.empty(rows, kv_splits, head_dim, **f32), torch.empty(rows, kv_splits, **f32)
    precision = dot_precision(q.dtype)
    per_split = range_length(sources, kv_splits, kv_config["BLOCK_N"])
    flow_kv_kernel[(*per_head_grid(batch, heads, value_dim, kv_config["BLOCK_DV"]), kv_splits)](
        k, v, q_sum, q_incoming, kv, k_outgoing, e_sum, heads, sources, head_dim, value_dim, eps,
        *k.stride()[:3], *v.stride()[:3], per_split, kv_splits, PRECISION=precision, **kv_config)
    kv, k_outgoing, e_sum = merged(kv), merged(k_outgoing), merged(e_sum)
    out = torch.empty(batch, heads, length, value_dim, dtype=q.dtype, device=q.device)
    config = flow_config("output", q.dtype, head_dim, value_dim)
    flow_output_kernel[rows_grid(batch, heads, length, config["BLOCK_N"], value_dim, config["BLOCK_DV"])](
        q, k_sum, k_outgoing, kv, e_sum, out, heads, length, sources, head_dim, value_dim, eps,
        *q.stride()[:3], *out.stride()[:3], PRECISION=precision, **config)
    return out


def flow_token_splits(programs: int, tokens: int, block: int, token_splits: int | None = None) -> int:
    """Token ranges per head of one non-causal pass: enough that ``programs`` (heads, times value
    tiles for the key/value pass) times them covers two waves of an H100, never a range under one
    ``block`` (:func:`~attnc.plugins.kernels_common.range_splits`); ``token_splits`` fixes the
    count, capped at one block per range."""
    if token_splits is not None:
        return max(1, min(int(token_splits), cdiv(tokens, block)))
    return range_splits(programs, tokens, block)


def run(attrs: dict, inputs: list, n_outputs: int = 1) -> list[torch.Tensor]:
    """One ``FlowAttention`` node with :func:`flow_forward` (what TensorRT-RTX's Python plugins
    run, ``tensorrt_plugins.fused_outputs``).

    Args:
        attrs: ``causal`` and ``eps`` (``fused_outputs`` fills in the defaults).
        inputs: ``[Q, K, V]``.
        n_outputs: 1 (the op has one output).
    Returns:
        ``[O]``.
    """
    q, k, v = inputs
    return [flow_forward(q, k, v, causal=int(attrs["causal"]), eps=float(attrs["eps"]))]


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None):
    """TensorRT's AOT kernel for one ``FlowAttention`` node (``KernelProvider``).

    Args:
        attrs: the node's ``causal`` and ``eps``.
        dtypes: numpy dtype names of the inputs; shapes: input shapes (``None``: dynamic dim).
        arch: target architecture (default :func:`~attnc.plugins.kernels_common.default_arch`).
    Returns:
        ``attnc.compiler.backends.tensorrt_plugins.AotKernel`` taking contiguous ``Q, K, V``, int32
        ``heads, length`` (causal) or ``heads, length, sources`` (non-causal), and ``O``.
    """
    from attnc.plugins.kernels_common import aot_kernel

    return aot_kernel(*trt_launch(attrs, dtypes, shapes), arch)


def trt_launch(attrs: dict, dtypes: list, shapes: list):
    """``(KernelSpec, grid(output_shapes), scalars(input_shapes))`` of the TensorRT entry point.

    Causal: :func:`flow_causal_trt` (the launcher's single chunked pass). Non-causal:
    :func:`flow_global_trt`, the launcher's five launches fused into one program per head and
    value-column block. Shared by :func:`kernel_for` and the interpreter test.
    """
    from attnc.compiler.errors import AttncError

    if len(shapes) != 3 or dtypes[0] not in TORCH_DTYPES:
        raise AttncError(f"the FlowAttention kernel takes Q, K, V in fp32/fp16/bf16, got {len(shapes)} inputs of "
                         f"{dtypes[0] if dtypes else None}",
                         "run the node through its ONNX function body (--fused-ops inline)")
    q_shape, k_shape, v_shape = list(shapes[0]), list(shapes[1]), list(shapes[2])
    head_dim, value_dim = q_shape[-1], v_shape[-1]
    if len(q_shape) != 4 or head_dim is None or value_dim is None:
        raise AttncError(f"FlowAttention kernel needs [B, H, tokens, D] inputs with static head dims, got "
                         f"{q_shape}, {v_shape}", "export the model with static head dims")
    causal = bool(attrs.get("causal") or 0)
    if causal and None not in (q_shape[2], k_shape[2]) and q_shape[2] != k_shape[2]:
        raise AttncError(f"causal FlowAttention needs as many keys as queries, got {q_shape[2]} and {k_shape[2]}")
    eps = attrs.get("eps")
    torch_dtype = TORCH_DTYPES[dtypes[0]]
    ptr = POINTER_TYPES[torch_dtype]
    blocks = flow_trt_config(causal, torch_dtype, head_dim, value_dim)
    constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, EPS=float(1e-6 if eps is None else eps),
                      BLOCK_D=blocks["BLOCK_D"], BLOCK_DV=blocks["BLOCK_DV"], PRECISION=dot_precision(torch_dtype))
    signature = {"Q": ptr, "K": ptr, "V": ptr, "heads": "i32", "length": "i32"}
    if causal:
        kernel = flow_causal_trt
        constexprs.update(CHUNK=blocks["CHUNK"], D_SLICE=blocks["D_SLICE"])
    else:
        kernel = flow_global_trt
        constexprs["BLOCK_N"] = blocks["BLOCK_N"]
        signature["sources"] = "i32"
    signature["O"] = ptr
    spec = KernelSpec(kernel, signature, constexprs, num_warps=blocks["num_warps"], num_stages=blocks["num_stages"])

    def grid(output_shapes):
        out = output_shapes[0]
        return (out[0] * out[1], cdiv(value_dim, blocks["BLOCK_DV"]), 1)

    def scalars(input_shapes):
        extra = [] if causal else [input_shapes[1][2]]
        return [input_shapes[0][1], input_shapes[0][2], *extra]

    return spec, grid, scalars


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """The reduction (plain and weighted), key/value, causal and output kernels, in
    :func:`flow_config`'s launch configurations (value dim = head dim)."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    strides = lambda *names: {f"s{t}_{a}": "i32" for t in names for a in "bhn"}  # noqa: E731

    def spec(kernel, name, signature, **constexprs):
        config = flow_config(name, torch_dtype, head_dim, head_dim)
        launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
        if name != "reduce":
            constexprs["PRECISION"] = dot_precision(torch_dtype)
        return KernelSpec(kernel, signature, {**config, **constexprs}, **launch)

    ranges = {"per_split": "i32", "splits": "i32"}
    reduce_sig = {"X": ptr, "OTHER": "*fp32", "OUT": "*fp32", "heads": "i32", "length": "i32",
                  "head_dim": "i32", **strides("x"), "eps": "fp32", **ranges}
    return [
        spec(flow_reduce_kernel, "reduce", reduce_sig, WEIGHTED=False),
        spec(flow_reduce_kernel, "reduce", reduce_sig, WEIGHTED=True),
        spec(flow_kv_kernel, "kv", {"K": ptr, "V": ptr, "Q_SUM": "*fp32", "Q_INCOMING": "*fp32", "KV": "*fp32",
                                    "K_OUTGOING": "*fp32", "E_SUM": "*fp32", "heads": "i32", "sources": "i32",
                                    "head_dim": "i32", "value_dim": "i32", "eps": "fp32", **strides("k", "v"),
                                    **ranges}),
        spec(flow_causal_kernel, "causal", {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "heads": "i32", "length": "i32",
                                            "head_dim": "i32", "value_dim": "i32", "eps": "fp32",
                                            **strides("q", "k", "v", "o")}),
        spec(flow_output_kernel, "output", {"Q": ptr, "K_SUM": "*fp32", "K_OUTGOING": "*fp32", "KV": "*fp32",
                                            "E_SUM": "*fp32", "O": ptr, "heads": "i32", "length": "i32",
                                            "sources": "i32", "head_dim": "i32", "value_dim": "i32",
                                            "eps": "fp32", **strides("q", "o")}),
    ]


__all__ = ["aot_specs", "flow_causal_kernel", "flow_config", "flow_causal_trt", "flow_forward", "flow_global_trt",
           "flow_trt_config", "flow_kv_kernel", "flow_output_kernel", "flow_reduce_kernel", "flow_token_splits",
           "kernel_for", "trt_launch"]
