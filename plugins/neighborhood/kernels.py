"""Triton kernel of ``attnc::NeighborhoodAttention``: fused (flash-style) neighborhood attention.

Layout heads-first, as the op's contract: ``Q``/``K`` ``[B, heads, *grid, D]``, ``V``
``[B, heads, *grid, Dv]``, optional ``RPB`` ``[heads or 1, 2k_0-1, ...]``; 1-D and 2-D grids
(a 1-D grid runs as a ``1 x L`` 2-D grid). Semantics as ``attnc.plugins.neighborhood``.

How it works (the tiling of NATTEN's fused kernels, written from their description): a
program owns a tile of ``BX x BY`` queries of one dilation group (so every key any of them can
see lies on the same sub-grid). Window starts are monotone in the query position, so the union
of the tile's windows is a box of at most ``(BX + kx - 1) x (BY + ky - 1)`` sub-grid keys; the
program walks it row by row in ``BLOCK_K``-wide key blocks, scores each block with one
``tl.dot``, masks the pairs outside each query's own window (shifted at borders, causal cut,
sub-grid end), adds the RPB entry of the pair's relative offset and folds the block into an
online softmax. No attention matrix is materialised; the work wasted on masked pairs is
bounded by the box/window ratio.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, LOG2E, POINTER_TYPES, KernelSpec, block_dim,
                                          check_inputs, dot, dot_precision, neighborhood_grid)
from attnc.plugins.neighborhood import _per_axis  # the op's own per-axis attribute normaliser


@triton.jit
def _window_start(p, n, K: tl.constexpr, CAUSAL: tl.constexpr):
    # First sub-grid position of the window of a query at sub-grid position p (axis of n).
    if CAUSAL:
        return p - K + 1
    else:
        return tl.minimum(tl.maximum(p - K // 2, 0), n - K)


@triton.jit
def neighborhood_attention_fwd(
    Q, K, V, RPB, O,
    sq_b, sq_h, sq_x, sq_y, sk_b, sk_h, sk_x, sk_y, sv_b, sv_h, sv_x, sv_y,
    so_b, so_h, so_x, so_y, sr_h, sr_x, sr_y,
    heads, LX, LY, DX, DY, head_dim, value_dim, qk_scale,
    KX: tl.constexpr, KY: tl.constexpr, CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr,
    HAS_RPB: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_bh, pid_x, pid_y = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    # Which dilation group (gx, gy) and which tile of its sub-grid this program owns.
    tiles_x = tl.cdiv(tl.cdiv(LX, DX), BX)
    tiles_y = tl.cdiv(tl.cdiv(LY, DY), BY)
    gx, gy = pid_x // tiles_x, pid_y // tiles_y
    px0, py0 = (pid_x % tiles_x) * BX, (pid_y % tiles_y) * BY
    nx, ny = (LX - 1 - gx) // DX + 1, (LY - 1 - gy) // DY + 1

    offs_q = tl.arange(0, BX * BY)
    qpx, qpy = px0 + offs_q // BY, py0 + offs_q % BY
    q_valid = (qpx < nx) & (qpy < ny)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b * sq_b + h * sq_h + (gx + DX * qpx)[:, None] * sq_x
              + (gy + DY * qpy)[:, None] * sq_y + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    start_x = _window_start(qpx, nx, KX, CAUSAL_X)
    start_y = _window_start(qpy, ny, KY, CAUSAL_Y)
    # Union of the tile's windows: windows only move forward with the query position.
    last_x = tl.minimum(px0 + BX - 1, nx - 1)
    last_y = tl.minimum(py0 + BY - 1, ny - 1)
    lo_x = tl.maximum(_window_start(px0, nx, KX, CAUSAL_X), 0)
    hi_x = _window_start(last_x, nx, KX, CAUSAL_X) + KX
    lo_y = tl.maximum(_window_start(py0, ny, KY, CAUSAL_Y), 0)
    hi_y = _window_start(last_y, ny, KY, CAUSAL_Y) + KY

    # Finite floor instead of -inf: a row whose keys so far are all masked keeps m = -1e30,
    # so alpha = exp2(0) = 1 and p = exp2(-inf) = 0 (no inf - inf NaN).
    m_i = tl.full([BX * BY], -1.0e30, tl.float32)
    l_i = tl.zeros([BX * BY], tl.float32)
    acc = tl.zeros([BX * BY, BLOCK_DV], tl.float32)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for kpx in range(lo_x, hi_x):
        in_x = (kpx >= start_x) & (kpx < start_x + KX)
        for kpy0 in range(lo_y, hi_y, BLOCK_K):
            kpy = kpy0 + tl.arange(0, BLOCK_K)
            k_valid = kpy < hi_y
            row = (gx + DX * kpx) * sk_x + (gy + DY * kpy) * sk_y
            k = tl.load(k_base + row[:, None] + offs_d[None, :],
                        mask=k_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            s = dot(q, tl.trans(k), PRECISION) * qk_scale
            in_y = (kpy[None, :] >= start_y[:, None]) & (kpy[None, :] < start_y[:, None] + KY)
            allowed = in_x[:, None] & in_y & k_valid[None, :]
            if HAS_RPB:
                rel_x = kpx - qpx + KX - 1
                rel_y = kpy[None, :] - qpy[:, None] + KY - 1
                bias = tl.load(RPB + h * sr_h + rel_x[:, None] * sr_x + rel_y * sr_y,
                               mask=allowed & q_valid[:, None], other=0.0)
                s += bias.to(tl.float32) * 1.4426950408889634
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vrow = (gx + DX * kpx) * sv_x + (gy + DY * kpy) * sv_y
            v = tl.load(v_base + vrow[:, None] + offs_dv[None, :],
                        mask=k_valid[:, None] & (offs_dv[None, :] < value_dim), other=0.0)
            acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION)
            m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = (O + b * so_b + h * so_h + (gx + DX * qpx)[:, None] * so_x
              + (gy + DY * qpy)[:, None] * so_y + offs_dv[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_valid[:, None] & (offs_dv[None, :] < value_dim))



# TensorRT AOT entry points: TensorRT launches a plugin's kernel with (*inputs, *int32 scalars,
# *outputs) and nothing else, so these take contiguous tensors, derive the strides from the
# grid sizes and inline the kernel above. Static attributes (window, dilation, scale) are
# constexprs: a TensorRT node's attributes never change after the build.

@triton.jit
def neighborhood_attention_trt(
    Q, K, V, heads, LX, LY, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, QK_SCALE: tl.constexpr,
    KX: tl.constexpr, KY: tl.constexpr, CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, BX: tl.constexpr,
    BY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    tokens = LX * LY
    neighborhood_attention_fwd(
        Q, K, V, Q, O,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * HEAD_DIM, HEAD_DIM,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * VALUE_DIM, VALUE_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * VALUE_DIM, VALUE_DIM,
        0, 0, 0, heads, LX, LY, DX, DY, HEAD_DIM, VALUE_DIM, QK_SCALE,
        KX, KY, CAUSAL_X, CAUSAL_Y, False, BX, BY, BLOCK_K, BLOCK_D, BLOCK_DV, PRECISION)


@triton.jit
def neighborhood_attention_rpb_trt(
    Q, K, V, RPB, heads, LX, LY, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, QK_SCALE: tl.constexpr,
    RPB_PER_HEAD: tl.constexpr, KX: tl.constexpr, KY: tl.constexpr, CAUSAL_X: tl.constexpr,
    CAUSAL_Y: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):
    tokens = LX * LY
    table = (2 * KX - 1) * (2 * KY - 1)
    neighborhood_attention_fwd(
        Q, K, V, RPB, O,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * HEAD_DIM, HEAD_DIM,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * VALUE_DIM, VALUE_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * VALUE_DIM, VALUE_DIM,
        table if RPB_PER_HEAD else 0, 2 * KY - 1, 1, heads, LX, LY, DX, DY, HEAD_DIM, VALUE_DIM, QK_SCALE,
        KX, KY, CAUSAL_X, CAUSAL_Y, True, BX, BY, BLOCK_K, BLOCK_D, BLOCK_DV, PRECISION)

# ----------------------------------------------------------------------------- launcher

def neighborhood_blocks(one_dimensional: bool, kernel_size: Sequence[int]) -> tuple[int, int, int]:
    """``(BX, BY, BLOCK_K)`` query-tile rows, columns and key-block width for the 2-D view.

    1-D grids (viewed as ``1 x L``): 64 queries in a row, keys in blocks of 64 (the union of their windows,
    ``63 + k`` keys, is two blocks up to k = 65). 2-D: 4 x 16 query tiles; a key row of the union
    spans ``16 + ky - 1`` columns: one block of 32 up to ky = 17, of 64 beyond.
    """
    if one_dimensional:
        return 1, 64, 64
    return 4, 16, 32 if 16 + kernel_size[1] - 1 <= 32 else 64


def neighborhood_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
                         dilation=None, is_causal=None, scale: float = 0.0,
                         rpb: torch.Tensor | None = None) -> torch.Tensor:
    """Neighborhood attention with the fused Triton kernel.

    Args:
        query, key: ``[B, heads, *grid, D]`` with 1 or 2 grid axes.
        value: ``[B, heads, *grid, Dv]``.
        kernel_size, dilation, is_causal: an int or one per grid axis (odd or even sizes).
        scale: 0 means ``1/sqrt(D)``.
        rpb: ``[heads or 1, 2k_0-1, ...]`` relative positional bias, or None.
    Returns:
        ``[B, heads, *grid, Dv]`` in the query's dtype.
    """
    check_inputs(query, key, value, rpb)
    ndim = query.dim() - 3
    if ndim not in (1, 2):
        raise NotImplementedError(f"the Triton kernel covers 1-D and 2-D grids, got {ndim}-D")
    ks, ds = _per_axis(kernel_size, ndim, 1), _per_axis(dilation, ndim, 1)
    cs = _per_axis(is_causal, ndim, 0)
    grid = list(query.shape[2:-1])
    for length, k, d in zip(grid, ks, ds):
        if length < k * d:
            raise ValueError(f"axis of length {length} is shorter than kernel_size * dilation = {k} * {d}")
    if ndim == 1:  # a 1-D grid is the 2-D grid 1 x L
        grid, ks, ds, cs = [1] + grid, [1] + ks, [1] + ds, [0] + cs
    batch, heads, head_dim, value_dim = query.shape[0], query.shape[1], query.shape[-1], value.shape[-1]
    shape5 = lambda t, last: t.contiguous().reshape(batch, heads, grid[0], grid[1], last)  # noqa: E731
    q, k, v = shape5(query, head_dim), shape5(key, head_dim), shape5(value, value_dim)
    out = torch.empty(batch, heads, grid[0], grid[1], value_dim, dtype=query.dtype, device=query.device)
    if rpb is not None:
        table = rpb.contiguous().reshape(rpb.shape[0], 2 * ks[0] - 1, 2 * ks[1] - 1)
        rpb_strides = (0 if table.shape[0] == 1 else table.stride(0), table.stride(1), table.stride(2))
    else:
        table, rpb_strides = q, (0, 0, 0)
    bx, by, block_k = neighborhood_blocks(ndim == 1, ks)
    launch = neighborhood_grid(batch, heads, grid, ds, (bx, by))
    scale = scale or head_dim ** -0.5
    neighborhood_attention_fwd[launch](
        q, k, v, table, out, *q.stride()[:4], *k.stride()[:4], *v.stride()[:4], *out.stride()[:4],
        *rpb_strides, heads, grid[0], grid[1], ds[0], ds[1], head_dim, value_dim, scale * LOG2E,
        KX=ks[0], KY=ks[1], CAUSAL_X=bool(cs[0]), CAUSAL_Y=bool(cs[1]), HAS_RPB=rpb is not None,
        BX=bx, BY=by, BLOCK_K=block_k, BLOCK_D=block_dim(head_dim), BLOCK_DV=block_dim(value_dim),
        PRECISION=dot_precision(query.dtype), num_warps=8 if max(head_dim, value_dim) > 64 else 4)
    return out.reshape(*query.shape[:-1], value_dim)


_NUMPY_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None):
    """TensorRT's AOT kernel for one ``NeighborhoodAttention`` node (``KernelProvider``).

    Args:
        attrs: the node's ``kernel_size``, ``dilation``, ``is_causal``, ``scale``.
        dtypes: numpy dtype names of the inputs; shapes: input shapes (``None``: dynamic dim).
        arch: target architecture (default :func:`~attnc.plugins.kernels_common.default_arch`).
    Returns:
        ``attnc.compiler.backends.tensorrt_plugins.AotKernel`` taking contiguous
        ``Q, K, V[, RPB], heads, LX, LY, O``.
    """
    from attnc.plugins.kernels_common import aot_kernel

    return aot_kernel(*trt_launch(attrs, dtypes, shapes), arch)


def trt_launch(attrs: dict, dtypes: list, shapes: list):
    """``(KernelSpec, grid(output_shapes), scalars(input_shapes))`` of the TensorRT entry point.

    Shared by :func:`kernel_for` and the interpreter test that runs the entry point on CPU.
    """
    from attnc.compiler.errors import AttncError

    q_shape, v_shape = list(shapes[0]), list(shapes[2])
    ndim = len(q_shape) - 3
    if ndim not in (1, 2):
        raise AttncError(f"the NeighborhoodAttention kernel covers 1-D and 2-D grids, not {ndim}-D",
                         "run the node through its ONNX function body (--fused-ops inline)")
    head_dim, value_dim = q_shape[-1], v_shape[-1]
    if head_dim is None or value_dim is None or dtypes[0] not in _NUMPY_DTYPES:
        raise AttncError(f"NeighborhoodAttention kernel needs static head dims and fp32/fp16/bf16, got "
                         f"{q_shape}, {v_shape}, {dtypes[0]}")
    ks = _per_axis(attrs.get("kernel_size"), ndim, 1)
    ds, cs = _per_axis(attrs.get("dilation"), ndim, 1), _per_axis(attrs.get("is_causal"), ndim, 0)
    if ndim == 1:
        ks, ds, cs = [1] + ks, [1] + ds, [0] + cs
    torch_dtype = _NUMPY_DTYPES[dtypes[0]]
    bx, by, block_k = neighborhood_blocks(ndim == 1, ks)
    has_rpb = len(shapes) > 3 and shapes[3] is not None
    ptr = POINTER_TYPES[torch_dtype]
    constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, DX=ds[0], DY=ds[1],
                      QK_SCALE=(float(attrs.get("scale") or 0.0) or head_dim ** -0.5) * LOG2E,
                      KX=ks[0], KY=ks[1], CAUSAL_X=bool(cs[0]), CAUSAL_Y=bool(cs[1]), BX=bx, BY=by,
                      BLOCK_K=block_k, BLOCK_D=block_dim(head_dim), BLOCK_DV=block_dim(value_dim),
                      PRECISION=dot_precision(torch_dtype))
    signature = {"Q": ptr, "K": ptr, "V": ptr, "heads": "i32", "LX": "i32", "LY": "i32", "O": ptr}
    kernel = neighborhood_attention_trt
    if has_rpb:
        kernel = neighborhood_attention_rpb_trt
        signature["RPB"] = ptr
        constexprs["RPB_PER_HEAD"] = shapes[3][0] != 1
    num_warps = 8 if max(head_dim, value_dim) > 64 else 4
    spec = KernelSpec(kernel, signature, constexprs, num_warps=num_warps)

    def grid_lengths(shape):
        return (1, shape[2]) if ndim == 1 else (shape[2], shape[3])

    def grid(output_shapes):
        out = output_shapes[0]
        return neighborhood_grid(out[0], out[1], grid_lengths(out), ds, (bx, by))

    def scalars(input_shapes):
        return [input_shapes[0][1], *grid_lengths(input_shapes[0])]

    return spec, grid, scalars


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """Representative builds: 2-D 7x7 with RPB (NAT), 1-D causal k=7."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    ints = ["sq_b", "sq_h", "sq_x", "sq_y", "sk_b", "sk_h", "sk_x", "sk_y", "sv_b", "sv_h", "sv_x",
            "sv_y", "so_b", "so_h", "so_x", "so_y", "sr_h", "sr_x", "sr_y", "heads", "LX", "LY", "DX",
            "DY", "head_dim", "value_dim"]
    signature = {"Q": ptr, "K": ptr, "V": ptr, "RPB": ptr, "O": ptr, **{n: "i32" for n in ints},
                 "qk_scale": "fp32"}
    common = {"BLOCK_D": block_dim(head_dim), "BLOCK_DV": block_dim(head_dim),
              "PRECISION": dot_precision(torch_dtype)}
    configs = [  # every constexpr branch: RPB on a 2-D grid, causal on a 1-D one
        dict(KX=7, KY=7, CAUSAL_X=False, CAUSAL_Y=False, HAS_RPB=True, BX=4, BY=16, BLOCK_K=32),
        dict(KX=1, KY=7, CAUSAL_X=False, CAUSAL_Y=True, HAS_RPB=False, BX=1, BY=64, BLOCK_K=64),
    ]
    return [KernelSpec(neighborhood_attention_fwd, signature, {**c, **common}) for c in configs]


__all__ = ["aot_specs", "kernel_for", "trt_launch", "neighborhood_attention_fwd", "neighborhood_attention_rpb_trt",
           "neighborhood_attention_trt", "neighborhood_blocks", "neighborhood_forward"]
