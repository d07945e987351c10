"""Triton kernel of ``attnc::AgentAttention``: both softmax stages in one launch.

``Q`` ``[B, H, N, D]``, ``K`` ``[B, H, M, D]``, ``V`` ``[B, H, M, Dv]``, agents ``A``
broadcastable to ``[B, H, n, D]``, optional biases ``b1`` (to ``[B, H, n, M]``) and ``b2`` (to
``[B, H, N, n]``); semantics as ``attnc.plugins.agent``::

    V_A = softmax(s A Kᵀ + b1) V        O = softmax(s Q Aᵀ + b2) V_A

A program owns one head. Stage 1 runs flash-style over the M keys with the n agents as queries
(n <= 256, all of them in one register tile; 49 in Agent-DeiT) and keeps ``V_A`` in registers
(fp32); stage 2 then streams query tiles: their n scores fit one tile, so it is a plain
softmax and one product with ``V_A``. Neither the ``[n, M]`` nor the ``[N, n]`` probabilities
nor ``V_A`` touch memory. The probabilities are multiplied in fp32 (tf32 for half inputs):
rounding them to bf16 put the two chained stages at up to 8.5e-3 relative error vs float64,
too close to the 1e-2 budget; the agent stages are small next to the rest of the model.

When ``B·H`` programs are too few to fill the GPU the launcher splits the query tiles of a
head over several programs (:func:`attnc.plugins.kernels_common.agent_grid`), each
recomputing stage 1 (cost ``n·M·D``, small next to ``N·n·D`` per split).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, LOG2E, POINTER_TYPES, KernelSpec, agent_grid,
                                          block_dim, cdiv, check_inputs, dot, dot_precision)

MAX_AGENTS = 256


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
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    offs_a = tl.arange(0, BLOCK_A)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    a_ok, d_ok, dv_ok = offs_a < agents, offs_d < head_dim, offs_dv < value_dim
    agent = tl.load(A + b * sa_b + h * sa_h + offs_a[:, None] * sa_n + offs_d[None, :],
                    mask=a_ok[:, None] & d_ok[None, :], other=0.0)

    # Stage 1: V_A = softmax(s A Kᵀ + b1) V, online softmax over key blocks (base 2).
    m_i = tl.full([BLOCK_A], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_A], tl.float32)
    agent_v = tl.zeros([BLOCK_A, BLOCK_DV], tl.float32)
    for n0 in range(0, keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < keys
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
    agent_v = agent_v / tl.where(a_ok, l_i, 1.0)[:, None]

    # Stage 2: O = softmax(s Q Aᵀ + b2) V_A; the n agent scores of a query fit one tile.
    tiles = tl.cdiv(queries, BLOCK_M)
    for tile in range(pid_split, tiles, splits):
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



# TensorRT AOT entry points: TensorRT launches a plugin's kernel with (*inputs, *int32 scalars,
# *outputs) only, so these take contiguous tensors and derive every stride from the sizes;
# which of A / the biases broadcast over batch or heads is static (constexpr) in a built engine.

@triton.jit
def _agent_trt_body(Q, K, V, A, B1, B2, heads, queries, keys, O, splits,
                    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr, QK_SCALE: tl.constexpr,
                    A_BATCH: tl.constexpr, A_HEADS: tl.constexpr, B1_BATCH: tl.constexpr, B1_HEADS: tl.constexpr,
                    B2_BATCH: tl.constexpr, B2_HEADS: tl.constexpr, HAS_BIASES: tl.constexpr,
                    BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    a_head = AGENTS * HEAD_DIM if A_HEADS else 0
    b1_head = AGENTS * keys if B1_HEADS else 0
    b2_head = queries * AGENTS if B2_HEADS else 0
    agent_attention_kernel(
        Q, K, V, A, B1, B2, O,
        heads * queries * HEAD_DIM, queries * HEAD_DIM, HEAD_DIM,
        heads * keys * HEAD_DIM, keys * HEAD_DIM, HEAD_DIM,
        heads * keys * VALUE_DIM, keys * VALUE_DIM, VALUE_DIM,
        (heads * AGENTS * HEAD_DIM if A_HEADS else AGENTS * HEAD_DIM) if A_BATCH else 0, a_head, HEAD_DIM,
        (heads * AGENTS * keys if B1_HEADS else AGENTS * keys) if B1_BATCH else 0, b1_head, keys, 1,
        (heads * queries * AGENTS if B2_HEADS else queries * AGENTS) if B2_BATCH else 0, b2_head, AGENTS, 1,
        heads * queries * VALUE_DIM, queries * VALUE_DIM, VALUE_DIM,
        heads, queries, keys, AGENTS, HEAD_DIM, VALUE_DIM, QK_SCALE, splits,
        HAS_BIASES, HAS_BIASES, BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)


@triton.jit
def agent_attention_trt(Q, K, V, A, heads, queries, keys, O,
                        HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr,
                        QK_SCALE: tl.constexpr, A_BATCH: tl.constexpr, A_HEADS: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    _agent_trt_body(Q, K, V, A, Q, Q, heads, queries, keys, O, tl.cdiv(queries, BLOCK_M),
                    HEAD_DIM, VALUE_DIM, AGENTS, QK_SCALE, A_BATCH, A_HEADS, False, False, False, False, False,
                    BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)


@triton.jit
def agent_attention_biases_trt(Q, K, V, A, B1, B2, heads, queries, keys, O,
                               HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, AGENTS: tl.constexpr,
                               QK_SCALE: tl.constexpr, A_BATCH: tl.constexpr, A_HEADS: tl.constexpr,
                               B1_BATCH: tl.constexpr, B1_HEADS: tl.constexpr, B2_BATCH: tl.constexpr,
                               B2_HEADS: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                               PRECISION: tl.constexpr):
    _agent_trt_body(Q, K, V, A, B1, B2, heads, queries, keys, O, tl.cdiv(queries, BLOCK_M),
                    HEAD_DIM, VALUE_DIM, AGENTS, QK_SCALE, A_BATCH, A_HEADS, B1_BATCH, B1_HEADS, B2_BATCH,
                    B2_HEADS, True, BLOCK_A, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION)

# ----------------------------------------------------------------------------- launcher

def agent_blocks(agents: int, head_dim: int, value_dim: int) -> dict[str, int]:
    return {"BLOCK_A": block_dim(agents), "BLOCK_M": 64, "BLOCK_N": 64,
            "BLOCK_D": block_dim(head_dim), "BLOCK_DV": block_dim(value_dim)}


def _strides4(t: torch.Tensor | None, shape) -> tuple[int, int, int, int]:
    # Broadcast dims get stride 0, so a [1, H, n, D] agent table or a [H, N, n] bias is read in place.
    return (0, 0, 0, 0) if t is None else tuple(t.expand(*shape).stride())


def agent_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
                  agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
                  scale: float = 0.0, splits: int | None = None) -> torch.Tensor:
    """Agent attention with the fused Triton kernel.

    Args:
        q: ``[B, H, N, D]``; k: ``[B, H, M, D]``; v: ``[B, H, M, Dv]``.
        a: agents, broadcastable to ``[B, H, n, D]`` (n <= 256).
        agent_bias: broadcastable to ``[B, H, n, M]``; query_bias: to ``[B, H, N, n]``.
        scale: 0 means ``1/sqrt(D)``.
        splits: programs per head (default :func:`agent_grid`'s choice).
    Returns:
        ``[B, H, N, Dv]`` in q's dtype.
    """
    check_inputs(q, k, v, a, agent_bias, query_bias)
    batch, heads, queries, head_dim = q.shape
    keys, value_dim, agents = k.shape[2], v.shape[-1], a.shape[-2]
    if agents > MAX_AGENTS:
        raise ValueError(f"the fused agent kernel holds at most {MAX_AGENTS} agents in registers, got {agents}")
    tensors = [t if t is None or t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
               for t in (q, k, v, a, agent_bias, query_bias)]
    q, k, v, a, agent_bias, query_bias = tensors
    blocks = agent_blocks(agents, head_dim, value_dim)
    grid = agent_grid(batch, heads, queries, blocks["BLOCK_M"])
    if splits is not None:
        grid = (grid[0], max(1, int(splits)))
    out = torch.empty(batch, heads, queries, value_dim, dtype=q.dtype, device=q.device)
    sa = _strides4(a, (batch, heads, agents, head_dim))[:3]
    s1 = _strides4(agent_bias, (batch, heads, agents, keys))
    s2 = _strides4(query_bias, (batch, heads, queries, agents))
    scale = scale or head_dim ** -0.5
    agent_attention_kernel[grid](
        q, k, v, a, agent_bias if agent_bias is not None else q, query_bias if query_bias is not None else q,
        out, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *sa, *s1, *s2, *out.stride()[:3],
        heads, queries, keys, agents, head_dim, value_dim, scale * LOG2E, grid[1],
        HAS_B1=agent_bias is not None, HAS_B2=query_bias is not None, PRECISION=dot_precision(q.dtype),
        num_warps=4, **blocks)
    return out


_NUMPY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None):
    """TensorRT's AOT kernel for one ``AgentAttention`` node (``KernelProvider``): inputs
    ``Q, K, V, A`` or ``Q, K, V, A, agent_bias, query_bias`` (contiguous; A and the biases may
    broadcast over batch and heads), int32 scalars ``heads, queries, keys``, output ``O``."""
    from attnc.plugins.kernels_common import aot_kernel

    return aot_kernel(*trt_launch(attrs, dtypes, shapes), arch)


def trt_launch(attrs: dict, dtypes: list, shapes: list):
    """``(KernelSpec, grid(output_shapes), scalars(input_shapes))`` of the TensorRT entry point.

    Every program takes one query tile (``splits`` = query tiles): a TensorRT grid cannot
    depend on the batch through ``min``/``max``, and one tile per program keeps small batches
    busy at the price of recomputing the agent stage per tile.
    """
    from attnc.compiler.errors import AttncError

    present = [s for s in shapes if s is not None]
    if len(present) not in (4, 6) or dtypes[0] not in _NUMPY_DTYPES:
        raise AttncError("the AgentAttention kernel takes Q, K, V, A with both biases or none, in fp32/fp16/bf16",
                         "run the node through its ONNX function body or lower it to two Attention nodes")
    q_shape, v_shape, a_shape = list(shapes[0]), list(shapes[2]), list(shapes[3])
    head_dim, value_dim, agents = q_shape[-1], v_shape[-1], a_shape[-2]
    if None in (head_dim, value_dim, agents) or agents > MAX_AGENTS:
        raise AttncError(f"AgentAttention kernel needs static head dims and <= {MAX_AGENTS} static agents")

    def broadcast_flags(shape):  # (varies over batch, varies over heads) of a rank-2..4 tensor
        full = [1] * (4 - len(shape)) + list(shape)
        return full[0] != 1, full[1] != 1

    torch_dtype = _NUMPY_DTYPES[dtypes[0]]
    ptr = POINTER_TYPES[torch_dtype]
    blocks = agent_blocks(agents, head_dim, value_dim)
    # 48 KB of shared memory without opting in, no register spills: fp32 (CUDA-core products holding
    # whole operand rows in registers) and wide heads get 32-row query/key tiles, 8 warps and one
    # stage. Measured with 64-row tiles, 4 warps, two stages at 49 agents: fp32 took
    # 56-128 KB and spilled at every head dim (sm_86), fp16 spilled at head dim 128 (sm_86) and
    # took 64 KB there with two stages and 8 warps (sm_90).
    launch = dict(num_warps=4, num_stages=2)
    if torch_dtype == torch.float32 or max(head_dim, value_dim) > 64:
        blocks.update(BLOCK_M=32, BLOCK_N=32)
        launch = dict(num_warps=8, num_stages=1)
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
    """Agent-DeiT's shape class: 49 agents, both biases (the bias-free form compiles a subset)."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    ints = [f"s{t}_{a}" for t in "qkva" for a in ("b", "h", "n")]
    ints += ["s1_b", "s1_h", "s1_a", "s1_m", "s2_b", "s2_h", "s2_n", "s2_a", "so_b", "so_h", "so_n",
             "heads", "queries", "keys", "agents", "head_dim", "value_dim"]
    signature = {**{n: ptr for n in ("Q", "K", "V", "A", "B1", "B2", "O")}, **{n: "i32" for n in ints},
                 "qk_scale": "fp32", "splits": "i32"}
    blocks = agent_blocks(49, head_dim, head_dim)
    precision = dot_precision(torch_dtype)
    return [KernelSpec(agent_attention_kernel, signature,
                       {**blocks, "HAS_B1": True, "HAS_B2": True, "PRECISION": precision})]


__all__ = ["MAX_AGENTS", "agent_attention_biases_trt", "agent_attention_kernel", "agent_attention_trt",
           "agent_blocks", "agent_forward", "aot_specs", "kernel_for", "trt_launch"]
