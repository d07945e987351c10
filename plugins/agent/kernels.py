"""Triton kernels of ``attnc::AgentAttention``: both softmax stages fused, in one launch or two.

``Q`` ``[B, H, N, D]``, ``K`` ``[B, H, M, D]``, ``V`` ``[B, H, M, Dv]``, agents ``A``
broadcastable to ``[B, H, n, D]``, optional biases ``b1`` (to ``[B, H, n, M]``) and ``b2`` (to
``[B, H, N, n]``); semantics as ``attnc.plugins.agent``::

    V_A = softmax(s A Kᵀ + b1) V        O = softmax(s Q Aᵀ + b2) V_A

The PyTorch path (:func:`agent_forward`, :func:`agent_plan` choosing) and TensorRT's entry points:

- :func:`agent_attention_kernel` (one launch): a program owns one head. Stage 1 runs
  flash-style over the M keys with the n agents as queries (n <= 256, all of them in one
  register tile; 49 in Agent-DeiT) and keeps ``V_A`` in registers (fp32); stage 2 then streams
  query tiles: their n scores fit one tile, so it is a plain softmax and one product with
  ``V_A``. When ``B·H`` programs are too few to fill the GPU the launcher splits the query
  tiles of a head over several programs (:func:`attnc.plugins.kernels_common.agent_grid`),
  each recomputing stage 1 over all M keys in one sequential loop. Its launcher opts in to more
  than 48 KB of shared memory.
- :func:`agent_stage1_kernel` + :func:`agent_stage2_kernel` (two phases, the default where one
  launch would split): stage 1 split over key ranges (``B·H·k`` programs,
  :func:`attnc.plugins.kernels_common.range_splits`), each writing its unnormalised partial
  (running max, sum, ``Σ p·V``: ``k·n·(Dv + 2)`` fp32 per head); then each query-stage program
  merges the head's ``k`` partials into ``V_A`` and runs stage 2 on its share of the query tiles.
  On an H200 (2026-12-04) the one launch ran 4-12x slower than two SDPA calls at 3136-4096
  tokens with 16 heads in all (Agent-PVT, AgentSD-like: 17 query splits, each walking all keys).
- :func:`agent_tiled_kernel` (TensorRT's entry points, which get 48 KB and no opt-in): a
  program owns one head and one query tile and streams the agents 16 at a time; each agent
  tile's stage 1 yields its ``V_A`` rows, which stage 2 folds in with an online softmax over
  the agents. No program holds more than one agent tile, so any agent count fits, and the
  score products run over 32-wide head-dim slices (fp32 ``tl.dot`` on CUDA cores holds whole
  operand rows in registers). Cost: every query tile recomputes stage 1, so a head does
  ``T·n·M·(D+Dv)`` + ``N·n·(D+Dv)`` multiply-adds for ``T = ⌈N/BLOCK_M⌉`` query tiles, against
  ``(M + N)·n·(D+Dv)`` for the two stages done once: ``(T·M + N)/(M + N)`` times the minimum,
  2.5x at Agent-DeiT's N = M = 197 with 64-query tiles (4x with fp32's 32-query tiles above
  head dim 64), and ``≈ T/2`` for long sequences (33x at N = M = 4096, AgentSD-like). There a
  single launch cannot keep ``V_A`` anywhere (no scratch memory in an AOT plugin), so the
  two-``Attention`` lowering (``attnc.plugins.agent.lower_to_attention_nodes``) is cheaper.

Neither the ``[n, M]`` nor the ``[N, n]`` probabilities nor ``V_A`` touch memory. The
probabilities are multiplied in fp32 (tf32 for half inputs): rounding them to bf16 put the two
chained stages at up to 8.5e-3 relative error vs float64, too close to the 1e-2 budget; the
agent stages are small next to the rest of the model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from attnc.plugins.kernels_common import (DTYPE_NAMES, LOG2E, POINTER_TYPES, TORCH_DTYPES, KernelSpec, agent_grid,
                                          block_dim, cdiv, check_inputs, dot, dot_precision, range_length,
                                          range_splits, trt_entry_jit)

MAX_AGENTS = 256  # agents agent_attention_kernel keeps in one register tile


@triton.jit
def _agent_head(A, pid_bh, heads, agents, head_dim, value_dim, sa_b, sa_h, sa_n,
                BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Program ``pid_bh``'s batch and head, the agent/head-dim/value-dim offsets with their masks,
    and the head's agents ``[BLOCK_A, BLOCK_D]``."""
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    a_ok, d_ok, dv_ok = offs_a < agents, offs_d < head_dim, offs_dv < value_dim
    agent = tl.load(A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :],
                    mask=a_ok[:, None] & d_ok[None, :], other=0.0)
    return b, h, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok, agent


@triton.jit
def _agent_stage1(K, V, B1, b, h, agent, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                  sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s1_b, s1_h, s1_a, s1_m, start, end, qk_scale,
                  HAS_B1: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Stage 1 over keys ``[start, end)`` (``start`` a multiple of ``BLOCK_N``), flash-style with
    the agents as queries: the running max ``m`` (base 2), the sum ``l`` and ``Σ p·V``, unnormalised."""
    m_i = tl.full([BLOCK_A], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    agent_v = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot(agent, tl.trans(k), PRECISION) * qk_scale
        if HAS_B1:
            bias = tl.load(B1 + b * s1_b + h * s1_h + offs_a[:, None] * s1_a + offs_n[None, :] * s1_m,
                           mask=a_ok[:, None] & n_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_dv[None, :],
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        agent_v = agent_v * alpha[:, None] + dot(p, v, PRECISION)
        m_i = m_new
    return m_i, l_i, agent_v


@triton.jit
def _agent_stage2(Q, B2, O, b, h, agent, agent_v, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                  sq_b, sq_h, sq_n, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n, queries, qk_scale, first, step,
                  HAS_B2: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """Stage 2 on query tiles ``first, first + step, ...``: the n agent scores of a query fit one
    tile, so a plain softmax and one product with the normalised ``V_A``."""
    tiles = tl.cdiv(queries, BLOCK_M)
    for tile in range(first, tiles, step):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < queries
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        s = dot(q, tl.trans(agent), PRECISION) * qk_scale
        if HAS_B2:
            bias = tl.load(B2 + b * s2_b + h * s2_h + offs_m[:, None] * s2_n + offs_a[None, :] * s2_a,
                           mask=m_ok[:, None] & a_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(a_ok[None, :], s, float("-inf"))
        p = tl.exp2(s - tl.max(s, 1)[:, None])
        out = dot(p, agent_v, PRECISION) / tl.sum(p, 1)[:, None]
        tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_dv[None, :],
                 out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


@triton.jit
def agent_attention_kernel(
    Q, K, V, A, B1, B2, O,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sa_b, sa_h, sa_n,
    s1_b, s1_h, s1_a, s1_m, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n,
    heads, queries, keys, agents, head_dim, value_dim, qk_scale, splits,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh, pid_split = tl.program_id(0), tl.program_id(1)
    b, h, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok, agent = _agent_head(
        A, pid_bh, heads, agents, head_dim, value_dim, sa_b, sa_h, sa_n, BLOCK_A, BLOCK_D, BLOCK_DV)
    # Stage 1: V_A = softmax(s A Kᵀ + b1) V, online softmax over key blocks (base 2).
    m_i, l_i, agent_v = _agent_stage1(K, V, B1, b, h, agent, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                                      sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s1_b, s1_h, s1_a, s1_m, 0, keys,
                                      qk_scale, HAS_B1, BLOCK_A, BLOCK_N, BLOCK_DV, PRECISION)
    agent_v = agent_v / tl.where(a_ok, l_i, 1.0)[:, None]
    # Stage 2: O = softmax(s Q Aᵀ + b2) V_A.
    _agent_stage2(Q, B2, O, b, h, agent, agent_v, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                  sq_b, sq_h, sq_n, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n, queries, qk_scale, pid_split, splits,
                  HAS_B2, BLOCK_M, PRECISION)


@triton.jit
def agent_stage1_kernel(
    K, V, A, B1, PART_M, PART_L, PART_V,
    sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sa_b, sa_h, sa_n, s1_b, s1_h, s1_a, s1_m,
    heads, keys, agents, head_dim, value_dim, qk_scale, keys_per_split, key_splits,
    HAS_B1: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Two-phase path, phase 1: program ``(b·h, s)`` runs stage 1 over its ``keys_per_split`` keys
    and writes its unnormalised partial (``m``, ``l``, ``Σ p·V``; fp32) to row ``b·h·key_splits + s``."""
    pid_bh, pid_s = tl.program_id(0), tl.program_id(1)
    b, h, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok, agent = _agent_head(
        A, pid_bh, heads, agents, head_dim, value_dim, sa_b, sa_h, sa_n, BLOCK_A, BLOCK_D, BLOCK_DV)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, keys)
    m_i, l_i, part = _agent_stage1(K, V, B1, b, h, agent, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                                   sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s1_b, s1_h, s1_a, s1_m, start, end,
                                   qk_scale, HAS_B1, BLOCK_A, BLOCK_N, BLOCK_DV, PRECISION)
    rows = (pid_bh.to(tl.int64) * key_splits + pid_s) * agents + offs_a
    tl.store(PART_M + rows, m_i, mask=a_ok)
    tl.store(PART_L + rows, l_i, mask=a_ok)
    tl.store(PART_V + rows[:, None] * value_dim + offs_dv[None, :], part, mask=a_ok[:, None] & dv_ok[None, :])


@triton.jit
def agent_stage2_kernel(
    Q, A, B2, PART_M, PART_L, PART_V, O,
    sq_b, sq_h, sq_n, sa_b, sa_h, sa_n, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n,
    heads, queries, agents, head_dim, value_dim, qk_scale, key_splits, splits,
    HAS_B2: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    """Two-phase path, phase 2: program ``(b·h, split)`` merges the head's ``key_splits`` partials
    into ``V_A`` (the online softmax's rescaling, once per partial) and runs stage 2 on its share
    of the query tiles."""
    pid_bh, pid_split = tl.program_id(0), tl.program_id(1)
    b, h, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok, agent = _agent_head(
        A, pid_bh, heads, agents, head_dim, value_dim, sa_b, sa_h, sa_n, BLOCK_A, BLOCK_D, BLOCK_DV)
    m_i = tl.full([BLOCK_A], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    agent_v = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for split in range(0, key_splits):
        rows = (pid_bh.to(tl.int64) * key_splits + split) * agents + offs_a
        m_s = tl.load(PART_M + rows, mask=a_ok, other=-1.0e30)
        m_new = tl.maximum(m_i, m_s)
        alpha, beta = tl.exp2(m_i - m_new), tl.exp2(m_s - m_new)
        l_i = l_i * alpha + tl.load(PART_L + rows, mask=a_ok, other=0.0) * beta
        part = tl.load(PART_V + rows[:, None] * value_dim + offs_dv[None, :], mask=a_ok[:, None] & dv_ok[None, :],
                       other=0.0)
        agent_v = agent_v * alpha[:, None] + part * beta[:, None]
        m_i = m_new
    agent_v = agent_v / tl.where(a_ok, l_i, 1.0)[:, None]
    _agent_stage2(Q, B2, O, b, h, agent, agent_v, offs_a, a_ok, offs_d, d_ok, offs_dv, dv_ok,
                  sq_b, sq_h, sq_n, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n, queries, qk_scale, pid_split, splits,
                  HAS_B2, BLOCK_M, PRECISION)


@triton.jit
def _scores(X, offs_x, x_ok, sx, Y, offs_y, y_ok, sy, head_dim, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
            PRECISION: tl.constexpr):
    """``X[offs_x] · Y[offs_y]ᵀ`` (fp32 ``[len(offs_x), len(offs_y)]``), ``BLOCK_DK`` head-dim
    columns at a time: fp32 ``tl.dot`` runs on CUDA cores and holds a thread's operand rows
    across the whole reduction dim in registers, so 128-wide rows spilled."""
    s = tl.zeros([offs_x.shape[0], offs_y.shape[0]], tl.float32)
    for d0 in tl.static_range(0, BLOCK_D, BLOCK_DK):
        offs_k = d0 + tl.arange(0, BLOCK_DK)
        k_ok = offs_k < head_dim
        x = tl.load(X + offs_x[:, None] * sx + offs_k[None, :], mask=x_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(Y + offs_y[:, None] * sy + offs_k[None, :], mask=y_ok[:, None] & k_ok[None, :], other=0.0)
        s += dot(x, tl.trans(y), PRECISION)
    return s


@triton.jit
def agent_tiled_kernel(
    Q, K, V, A, B1, B2, O,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sa_b, sa_h, sa_n,
    s1_b, s1_h, s1_a, s1_m, s2_b, s2_h, s2_n, s2_a, so_b, so_h, so_n,
    heads, queries, keys, agents, head_dim, value_dim, qk_scale,
    HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Both stages for one query tile, streaming the agents ``BLOCK_A`` at a time.

    Per agent tile, stage 1 (flash-style over the keys) yields that tile's rows of ``V_A``,
    which stage 2 folds in at once with an online softmax over the agents; so a program holds
    one agent tile and its ``V_A`` rows, whatever the agent count. Scores are summed over
    ``BLOCK_DK``-wide slices of the head dim (:func:`_scores`).
    """
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    q_head, k_head = Q + b * sq_b + h * sq_h, K + b * sk_b + h * sk_h
    a_head = A + b * sa_b + h * sa_h
    # Stage 1's loop matches agent_attention_kernel's but for the sliced scores: sharing it made
    # that kernel reload its resident agents per key block (fp32 spills 1.5 KB -> 5-7 KB).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok, dv_ok = offs_m < queries, offs_dv < value_dim
    m_q = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_q = tl.zeros([BLOCK_M], tl.float32)
    out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for a0 in range(0, agents, BLOCK_A):
        offs_a = a0 + tl.arange(0, BLOCK_A)
        a_ok = offs_a < agents
        # Stage 1 for this tile: its V_A rows, online softmax over key blocks (base 2).
        m_a = tl.full([BLOCK_A], -1.0e30, tl.float32)
        l_a = tl.zeros([BLOCK_A], tl.float32)
        agent_v = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
        for n0 in range(0, keys, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_ok = offs_n < keys
            s = _scores(a_head, offs_a, a_ok, sa_n, k_head, offs_n, n_ok, sk_n, head_dim, BLOCK_D, BLOCK_DK,
                        PRECISION) * qk_scale
            if HAS_B1:
                bias = tl.load(B1 + b * s1_b + h * s1_h + offs_a[:, None] * s1_a + offs_n[None, :] * s1_m,
                               mask=a_ok[:, None] & n_ok[None, :], other=0.0)
                s += bias.to(tl.float32) * 1.4426950408889634
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_a, tl.max(s, 1))
            alpha = tl.exp2(m_a - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_a = l_a * alpha + tl.sum(p, 1)
            v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_dv[None, :],
                        mask=n_ok[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
            agent_v = agent_v * alpha[:, None] + dot(p, v, PRECISION)
            m_a = m_new
        # Padding agents (a_ok false) have finite rows; stage 2 gives them zero weight.
        agent_v = agent_v / tl.where(a_ok, l_a, 1.0)[:, None]
        # Stage 2: fold the tile into the queries' online softmax over the agents.
        s = _scores(q_head, offs_m, m_ok, sq_n, a_head, offs_a, a_ok, sa_n, head_dim, BLOCK_D, BLOCK_DK,
                    PRECISION) * qk_scale
        if HAS_B2:
            bias = tl.load(B2 + b * s2_b + h * s2_h + offs_m[:, None] * s2_n + offs_a[None, :] * s2_a,
                           mask=m_ok[:, None] & a_ok[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        s = tl.where(a_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_q, tl.max(s, 1))
        alpha = tl.exp2(m_q - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_q = l_q * alpha + tl.sum(p, 1)
        out = out * alpha[:, None] + dot(p, agent_v, PRECISION)
        m_q = m_new
    out = out / l_q[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


# TensorRT AOT entry points: TensorRT launches a plugin's kernel with (*inputs, *int32 scalars,
# *outputs) only, so these take contiguous tensors and derive every stride from the sizes;
# which of A / the biases broadcast over batch or heads is static (constexpr) in a built engine.

@triton.jit
def _agent_trt_body(Q, K, V, A, B1, B2, heads, queries, keys, O,
                    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr, QK_SCALE: tl.constexpr,
                    A_BATCH: tl.constexpr, A_HEADS: tl.constexpr, B1_BATCH: tl.constexpr, B1_HEADS: tl.constexpr,
                    B2_BATCH: tl.constexpr, B2_HEADS: tl.constexpr, HAS_BIASES: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    a_head = AGENTS * HEAD_DIM if A_HEADS else 0
    b1_head = AGENTS * keys if B1_HEADS else 0
    b2_head = queries * AGENTS if B2_HEADS else 0
    agent_tiled_kernel(
        Q, K, V, A, B1, B2, O,
        heads * queries * HEAD_DIM, queries * HEAD_DIM, HEAD_DIM,
        heads * keys * HEAD_DIM, keys * HEAD_DIM, HEAD_DIM,
        heads * keys * VALUE_DIM, keys * VALUE_DIM, VALUE_DIM,
        (heads * AGENTS * HEAD_DIM if A_HEADS else AGENTS * HEAD_DIM) if A_BATCH else 0, a_head, HEAD_DIM,
        (heads * AGENTS * keys if B1_HEADS else AGENTS * keys) if B1_BATCH else 0, b1_head, keys, 1,
        (heads * queries * AGENTS if B2_HEADS else queries * AGENTS) if B2_BATCH else 0, b2_head, AGENTS, 1,
        heads * queries * VALUE_DIM, queries * VALUE_DIM, VALUE_DIM,
        heads, queries, keys, AGENTS, HEAD_DIM, VALUE_DIM, QK_SCALE,
        HAS_BIASES, HAS_BIASES, BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, BLOCK_DV, PRECISION)


@trt_entry_jit("heads", "queries", "keys")
def agent_attention_trt(Q, K, V, A, heads, queries, keys, O,
                        HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr,
                        QK_SCALE: tl.constexpr, A_BATCH: tl.constexpr, A_HEADS: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    _agent_trt_body(Q, K, V, A, Q, Q, heads, queries, keys, O,
                    HEAD_DIM, VALUE_DIM, AGENTS, QK_SCALE, A_BATCH, A_HEADS, False, False, False, False, False,
                    BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, BLOCK_DV, PRECISION)


@trt_entry_jit("heads", "queries", "keys")
def agent_attention_biases_trt(Q, K, V, A, B1, B2, heads, queries, keys, O,
                               HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr,
                               QK_SCALE: tl.constexpr, A_BATCH: tl.constexpr, A_HEADS: tl.constexpr,
                               B1_BATCH: tl.constexpr, B1_HEADS: tl.constexpr, B2_BATCH: tl.constexpr,
                               B2_HEADS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                               BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    _agent_trt_body(Q, K, V, A, B1, B2, heads, queries, keys, O,
                    HEAD_DIM, VALUE_DIM, AGENTS, QK_SCALE, A_BATCH, A_HEADS, B1_BATCH, B1_HEADS, B2_BATCH,
                    B2_HEADS, True, BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, BLOCK_DV, PRECISION)

# ----------------------------------------------------------------------------- launcher

def agent_config(agents: int, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of :func:`agent_attention_kernel` (the PyTorch path:
    :func:`agent_forward` and :func:`aot_specs`; its launcher may opt in to more than 48 KB).

    All ``n`` agents (``BLOCK_A``) and their fp32 ``V_A`` rows stay in registers through both
    stages, so the key (``BLOCK_N``) and query (``BLOCK_M``) tiles take what is left. The former
    64 x 64 tiles with 4 warps spilled 136 B-11 KB per thread in fp32 and 192-696 B in half
    precision (49 agents, sm_80/90, head dims 32-128). Measured with
    ``kernels_common.resource_usage`` at 49 agents (value dim = head dim), 8 warps, no spills:
    half 64-key/64-query tiles up to head dim 32, 32 x 64 up to 64 (64 x 64 spilled 96 B on
    sm_80), 32 x 32 past 64 (32 x 64 spilled 112 B on sm_80); fp32 (CUDA-core ``tl.dot``) 32 x 32
    up to head dim 32, 16 x 32 up to 64 (32 x 32 spilled 72 B on sm_90) and 16 x 16 with one stage
    past 64 (16 x 32 spilled 344-752 B on sm_80), at most 72 KB of shared memory. More agents
    than 64 leave less: 128 agents fit at head dim 64 in fp16, 256 spilled ~700 B there.
    """
    half, widest = dtype != torch.float32, max(head_dim, value_dim)
    if half:
        tiles = (64, 64, 2) if widest <= 32 else (32, 64, 2) if widest <= 64 else (32, 32, 2)
    else:
        tiles = (32, 32, 2) if widest <= 32 else (16, 32, 2) if widest <= 64 else (16, 16, 1)
    return {"BLOCK_A": block_dim(agents), "BLOCK_N": tiles[0], "BLOCK_M": tiles[1], "BLOCK_D": block_dim(head_dim),
            "BLOCK_DV": block_dim(value_dim), "num_warps": 8, "num_stages": tiles[2]}


def agent_phase_config(agents: int, dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int] | None:
    """Tiles, ``num_warps`` and ``num_stages`` of the two-phase path (:func:`agent_stage1_kernel`,
    :func:`agent_stage2_kernel`), or None where it has none that keeps every register (fp32 past
    head dim 64: it falls back to the one-launch kernel).

    Half precision takes :func:`agent_config`'s (no spills on sm_80/90 at head dims 32-128). fp32
    (CUDA-core ``tl.dot``) needs 16 warps and one stage: with 8 warps the merge loop's fp32 ``V_A``
    partials spilled 8-384 B (sm_80/90, head dims 32-128); with 16 warps 32-key/32-query tiles
    fit up to head dim 64 (64-122 registers), and past it every tile and warp count tried still
    spilled 8-16 B in one of the two kernels.
    """
    config = agent_config(agents, dtype, head_dim, value_dim)
    if dtype != torch.float32:
        return config
    if max(head_dim, value_dim) > 64:
        return None
    return {**config, "BLOCK_N": 32, "BLOCK_M": 32, "num_warps": 16, "num_stages": 1}


def agent_trt_config(dtype: torch.dtype, head_dim: int, value_dim: int) -> dict[str, int]:
    """Tiles, ``num_warps`` and ``num_stages`` of :func:`agent_tiled_kernel` in a TensorRT engine
    (48 KB of shared memory without opting in, no register spills), for any agent count.

    16-agent tiles (``tl.dot``'s smallest) keep one tile's agents and fp32 ``V_A`` rows small;
    scores are summed over 32-wide head-dim slices; the query tile is as large as fits, since
    every query tile recomputes stage 1. Measured on sm_80-90 at head dim 96/128: whole
    128-wide rows in the score products spilled 150-270 B in fp32 (CUDA-core ``tl.dot``), 4
    warps spilled in every dtype, 32-agent tiles took 52-68 KB and 64-query tiles 49-58 KB in
    fp32; 32 x 32 (fp32, head dims > 64) or 64 x 32 query x key tiles with 8 warps fit with room.
    Two pipeline stages only where they fit (half precision, head dims <= 64).
    """
    wide = max(head_dim, value_dim) > 64
    half = dtype != torch.float32
    return {"BLOCK_A": 16, "BLOCK_M": 32 if wide and not half else 64, "BLOCK_N": 64 if half and not wide else 32,
            "BLOCK_D": block_dim(head_dim), "BLOCK_DK": min(32, block_dim(head_dim)),
            "BLOCK_DV": block_dim(value_dim), "num_warps": 8, "num_stages": 2 if half and not wide else 1}


def _strides4(t: torch.Tensor | None, shape) -> tuple[int, int, int, int]:
    # Broadcast dims get stride 0, so a [1, H, n, D] agent table or a [H, N, n] bias is read in place.
    return (0, 0, 0, 0) if t is None else tuple(t.expand(*shape).stride())


def agent_plan(batch: int, heads: int, queries: int, keys: int, agents: int, dtype: torch.dtype, head_dim: int,
               value_dim: int, splits: int | None = None, key_splits: int | None = None):
    """How :func:`agent_forward` launches (up to :data:`MAX_AGENTS` agents): ``(config, grid,
    key_splits)``, ``key_splits`` 0 for one launch of :func:`agent_attention_kernel`, else the
    two-phase path's key ranges per head; ``grid`` is the query stage's ``(B·H, splits)``.

    By default two phases where one launch would split a head's queries over several programs
    (each recomputing stage 1) and the keys span more than one tile, and the dtype and head dims
    have a two-phase configuration (:func:`agent_phase_config`)."""
    config = agent_config(agents, dtype, head_dim, value_dim)
    phase_config = agent_phase_config(agents, dtype, head_dim, value_dim)
    if key_splits is None:
        two_phase = (phase_config is not None and keys > phase_config["BLOCK_N"]
                     and agent_grid(batch, heads, queries, config["BLOCK_M"])[1] > 1)
        key_splits = range_splits(batch * heads, keys, phase_config["BLOCK_N"]) if two_phase else 0
    if key_splits:
        config = phase_config or config   # fp32 past head dim 64 has none that never spills
    grid = agent_grid(batch, heads, queries, config["BLOCK_M"])
    if splits is not None:
        grid = (grid[0], max(1, int(splits)))
    return config, grid, int(key_splits)


def agent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                  scale: float = 0.0, splits: int | None = None, key_splits: int | None = None) -> torch.Tensor:
    """Agent attention with the fused Triton kernels.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H, M, D]``; v: ``[B, H, M, Dv]``.
        a: agents, broadcastable to ``[B, H, n, D]``. Up to :data:`MAX_AGENTS` they stay in
            registers (:func:`agent_attention_kernel`); more, or more than the GPU's shared
            memory holds, run the streaming kernel (:func:`agent_tiled_kernel`).
        agent_bias: broadcastable to ``[B, H, n, M]``; query_bias: to ``[B, H, N, n]``.
        scale: 0 means ``1/sqrt(D)``.
        splits: programs per head of the query stage (default :func:`agent_grid`'s choice).
        key_splits: 0 runs both stages in one launch (:func:`agent_attention_kernel`; each of a
            head's ``splits`` programs recomputes stage 1); ``k >= 1`` runs the two-phase path,
            stage 1 split over ``k`` key ranges (:func:`agent_stage1_kernel`) and merged by the
            query-stage programs (:func:`agent_stage2_kernel`). Default: :func:`agent_plan`'s.
    Returns:
        ``[B, H, N, Dv]`` in q's dtype.
    """
    check_inputs(q, k, v, a, agent_bias, query_bias)
    batch, heads, queries, head_dim = q.shape
    keys, value_dim, agents = k.shape[2], v.shape[-1], a.shape[-2]
    if agents > MAX_AGENTS:
        return _agent_streamed(q, k, v, a, agent_bias, query_bias, scale)
    tensors = [t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
               for t in (q, k, v, a, agent_bias, query_bias)]
    q, k, v, a, agent_bias, query_bias = tensors
    config, grid, key_splits = agent_plan(batch, heads, queries, keys, agents, q.dtype, head_dim, value_dim,
                                          splits, key_splits)
    out = torch.empty(batch, heads, queries, value_dim, dtype=q.dtype, device=q.device)
    sa = _strides4(a, (batch, heads, agents, head_dim))[:3]
    s1 = _strides4(agent_bias, (batch, heads, agents, keys))
    s2 = _strides4(query_bias, (batch, heads, queries, agents))
    scale = scale or head_dim ** -0.5
    b1 = agent_bias if agent_bias is not None else q
    b2 = query_bias if query_bias is not None else q
    flags = dict(PRECISION=dot_precision(q.dtype), BLOCK_A=config["BLOCK_A"], BLOCK_D=config["BLOCK_D"],
                 BLOCK_DV=config["BLOCK_DV"], num_warps=config["num_warps"], num_stages=config["num_stages"])
    try:
        if key_splits:
            rows = batch * heads * key_splits
            part_m = torch.empty(rows, agents, dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_v = torch.empty(rows, agents, value_dim, dtype=torch.float32, device=q.device)
            per_split = range_length(keys, key_splits, config["BLOCK_N"])
            agent_stage1_kernel[(batch * heads, key_splits)](
                k, v, a, b1, part_m, part_l, part_v, *k.stride()[:3], *v.stride()[:3], *sa, *s1,
                heads, keys, agents, head_dim, value_dim, scale * LOG2E, per_split, key_splits,
                HAS_B1=agent_bias is not None, BLOCK_N=config["BLOCK_N"], **flags)
            agent_stage2_kernel[grid](
                q, a, b2, part_m, part_l, part_v, out, *q.stride()[:3], *sa, *s2, *out.stride()[:3],
                heads, queries, agents, head_dim, value_dim, scale * LOG2E, key_splits, grid[1],
                HAS_B2=query_bias is not None, BLOCK_M=config["BLOCK_M"], **flags)
        else:
            agent_attention_kernel[grid](
                q, k, v, a, b1, b2, out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *sa, *s1, *s2,
                *out.stride()[:3], heads, queries, keys, agents, head_dim, value_dim, scale * LOG2E, grid[1],
                HAS_B1=agent_bias is not None, HAS_B2=query_bias is not None, BLOCK_N=config["BLOCK_N"],
                BLOCK_M=config["BLOCK_M"], **flags)
    except OutOfResources:
        # n agents' register tiles need more shared memory than this GPU has (256 agents at
        # head dim 128 in fp16 take 262 KB): the streaming kernel fits any agent count, at the
        # price of recomputing stage 1 per query tile.
        return _agent_streamed(q, k, v, a, agent_bias, query_bias, scale)
    return out


def _agent_streamed(q, k, v, a, agent_bias, query_bias, scale: float) -> torch.Tensor:
    """:func:`agent_forward` with the TensorRT entry point's kernel (:func:`agent_tiled_kernel`),
    which streams the agents 16 at a time: any agent count, within 48 KB and without spills,
    where :func:`agent_attention_kernel` would keep them all in registers. It takes contiguous
    tensors and both biases or none (an absent one is a zero table that broadcasts)."""
    from attnc.plugins.kernels_common import launch_trt_entry

    queries, keys, agents = q.shape[2], k.shape[2], a.shape[-2]
    if (agent_bias is None) != (query_bias is None):
        agent_bias = agent_bias if agent_bias is not None else q.new_zeros(agents, keys)
        query_bias = query_bias if query_bias is not None else q.new_zeros(queries, agents)

    def rows_by_columns(bias, rows, cols):
        # The entry kernel broadcasts a bias over batch and heads only: its last two dims are whole.
        return bias.expand(*bias.shape[:-2], rows, cols).contiguous()

    inputs = [t.contiguous() for t in (q, k, v, a)]
    inputs += [None, None] if agent_bias is None else [rows_by_columns(agent_bias, agents, keys),
                                                       rows_by_columns(query_bias, queries, agents)]
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    return launch_trt_entry(trt_launch, {"scale": scale}, inputs, out)


def run(attrs: dict, inputs: list, n_outputs: int = 1) -> list[torch.Tensor]:
    """One ``AgentAttention`` node with :func:`agent_forward` (what TensorRT-RTX's Python plugins
    run, ``tensorrt_plugins.fused_outputs``); any combination of the two biases.

    Args:
        attrs: ``scale`` (0: ``1/sqrt(D)``; ``fused_outputs`` fills in the default).
        inputs: ``[Q, K, V, A, agent_bias, query_bias]`` at their contract positions, ``None``
            for an absent bias.
        n_outputs: 1 (the op has one output).
    Returns:
        ``[O]``.
    """
    q, k, v, a, agent_bias, query_bias = inputs
    return [agent_forward(q, k, v, a, agent_bias, query_bias, scale=float(attrs["scale"]))]


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None):
    """TensorRT's AOT kernel for one ``AgentAttention`` node (``KernelProvider``): inputs
    ``Q, K, V, A`` or ``Q, K, V, A, agent_bias, query_bias`` (contiguous; A and the biases may
    broadcast over batch and heads), int32 scalars ``heads, queries, keys``, output ``O``.
    Any static agent count."""
    from attnc.plugins.kernels_common import aot_kernel

    return aot_kernel(*trt_launch(attrs, dtypes, shapes), arch)


def trt_launch(attrs: dict, dtypes: list, shapes: list):
    """``(KernelSpec, grid(output_shapes), scalars(input_shapes))`` of the TensorRT entry point.

    :func:`agent_tiled_kernel`, one program per head and query tile: a TensorRT grid cannot
    depend on the batch through ``min``/``max``, and one tile per program keeps small batches
    busy at the price of recomputing stage 1 per tile (see the module docstring). Any agent
    count: the kernel streams them 16 at a time.
    """
    from attnc.compiler.errors import AttncError

    present = [s for s in shapes if s is not None]
    if len(present) not in (4, 6) or dtypes[0] not in TORCH_DTYPES:
        raise AttncError("the AgentAttention kernel takes Q, K, V, A with both biases or none, in fp32/fp16/bf16",
                         "run the node through its ONNX function body or lower it to two Attention nodes")
    q_shape, v_shape, a_shape = list(shapes[0]), list(shapes[2]), list(shapes[3])
    head_dim, value_dim, agents = q_shape[-1], v_shape[-1], a_shape[-2]
    if None in (head_dim, value_dim, agents):
        raise AttncError(f"AgentAttention kernel needs static head dims and a static agent count, got "
                         f"{q_shape}, {v_shape}, {a_shape}", "export the model with static agent and head dims")

    def broadcast_flags(shape):  # (varies over batch, varies over heads) of a rank-2..4 tensor
        full = [1] * (4 - len(shape)) + list(shape)
        return full[0] != 1, full[1] != 1

    torch_dtype = TORCH_DTYPES[dtypes[0]]
    ptr = POINTER_TYPES[torch_dtype]
    blocks = agent_trt_config(torch_dtype, head_dim, value_dim)
    launch = {key: blocks.pop(key) for key in ("num_warps", "num_stages")}
    a_batch, a_heads = broadcast_flags(a_shape)
    constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, AGENTS=agents,
                      QK_SCALE=(float(attrs.get("scale") or 0.0) or head_dim ** -0.5) * LOG2E,
                      A_BATCH=a_batch, A_HEADS=a_heads, PRECISION=dot_precision(torch_dtype), **blocks)
    signature = {"Q": ptr, "K": ptr, "V": ptr, "A": ptr}
    kernel = agent_attention_trt
    if len(present) == 6:
        kernel = agent_attention_biases_trt
        signature.update(B1=ptr, B2=ptr)
        constexprs["B1_BATCH"], constexprs["B1_HEADS"] = broadcast_flags(shapes[4])
        constexprs["B2_BATCH"], constexprs["B2_HEADS"] = broadcast_flags(shapes[5])
    signature.update(heads="i32", queries="i32", keys="i32", O=ptr)
    spec = KernelSpec(kernel, signature, constexprs, **launch)

    def grid(output_shapes):
        out = output_shapes[0]
        return (out[0] * out[1], cdiv(out[2], blocks["BLOCK_M"]))

    def scalars(input_shapes):
        return [input_shapes[0][1], input_shapes[0][2], input_shapes[1][2]]

    return spec, grid, scalars


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """Agent-DeiT's shape class: 49 agents, both biases (the bias-free form compiles a subset), in
    :func:`agent_config`'s launch configuration (value dim = head dim)."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    ints = [f"s{t}_{a}" for t in "qkva" for a in ("b", "h", "n")]
    ints += ["s1_b", "s1_h", "s1_a", "s1_m", "s2_b", "s2_h", "s2_n", "s2_a", "so_b", "so_h", "so_n",
             "heads", "queries", "keys", "agents", "head_dim", "value_dim"]
    signature = {**{n: ptr for n in ("Q", "K", "V", "A", "B1", "B2", "O")}, **{n: "i32" for n in ints},
                 "qk_scale": "fp32", "splits": "i32"}
    config = agent_config(49, torch_dtype, head_dim, head_dim)
    launch = {key: config.pop(key) for key in ("num_warps", "num_stages")}
    flags = {"HAS_B1": True, "HAS_B2": True, "PRECISION": dot_precision(torch_dtype)}
    specs = [KernelSpec(agent_attention_kernel, signature, {**config, **flags}, **launch)]
    phase = agent_phase_config(49, torch_dtype, head_dim, head_dim)
    if phase is None:
        return specs
    # The two-phase path's kernels take the subsets of the one-launch kernel's parameters they read.
    launch = {key: phase.pop(key) for key in ("num_warps", "num_stages")}
    phase_signature = {**signature, **{n: "*fp32" for n in ("PART_M", "PART_L", "PART_V")},
                       "keys_per_split": "i32", "key_splits": "i32"}
    for kernel, drop in ((agent_stage1_kernel, ("BLOCK_M", "HAS_B2")), (agent_stage2_kernel, ("BLOCK_N", "HAS_B1"))):
        names = set(kernel.arg_names)
        specs.append(KernelSpec(kernel, {n: t for n, t in phase_signature.items() if n in names},
                                {n: v for n, v in {**phase, **flags}.items() if n not in drop}, **launch))
    return specs


__all__ = ["MAX_AGENTS", "agent_attention_biases_trt", "agent_attention_kernel", "agent_attention_trt",
           "agent_config", "agent_forward", "agent_phase_config", "agent_plan", "agent_stage1_kernel",
           "agent_stage2_kernel", "agent_tiled_kernel", "agent_trt_config", "aot_specs", "kernel_for", "trt_launch"]
