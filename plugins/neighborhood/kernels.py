"""Triton kernel of ``attnc::NeighborhoodAttention``: fused (flash-style) neighborhood attention.

Layout heads-first, as the op's contract: ``Q``/``K`` ``[B, heads, *grid, D]``, ``V``
``[B, heads, *grid, Dv]``, optional ``RPB`` ``[heads or 1, 2k_0-1, ...]``; 1-D, 2-D and 3-D
grids. The kernel works on a 3-D view ``X x Y x Z``: a 1-D grid runs as ``1 x 1 x L``, a 2-D
one as ``1 x X x Y`` (the length-1 axes cost one loop iteration). Semantics as
``attnc.plugins.neighborhood``.

How it works (the tiling of NATTEN's fused kernels, written from their description): a
program owns a tile of ``BX x BY x BZ`` queries of one dilation group (so every key any of them
can see lies on the same sub-grid). Window starts are monotone in the query position (with a
stride too: a query takes the window of its block's leader, and leaders are monotone), so the
union of the tile's windows is a box of at most ``(BX + kx - 1) x (BY + ky - 1) x (BZ + kz - 1)``
sub-grid keys; the program walks its ``(x, y)`` rows and each row in ``BLOCK_K``-wide key blocks
along ``z``, scores each block with one ``tl.dot``, masks the pairs outside each query's own
window (shifted at borders, causal cut, sub-grid end), adds the RPB entry of the pair's relative
offset and folds the block into an online softmax. No attention matrix is materialised; the
work wasted on masked pairs is bounded by the box/window ratio.

Launch configurations (:func:`neighborhood_config`) depend on the dtype: fp32 runs its products
on CUDA cores and gets smaller tiles and no software pipelining so that every TensorRT kernel
fits the 48 KB of shared memory a launch gets without opting in, with no register spills.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from attnc.plugins.kernels_common import (DTYPE_NAMES, LOG2E, POINTER_TYPES, TORCH_DTYPES, KernelSpec, block_dim,
                                          check_inputs, dot, dot_precision, neighborhood_grid, next_power_of_2,
                                          trt_entry_jit)
from attnc.plugins.neighborhood import _per_axis, strides  # the op's own attribute normalisers


@triton.jit
def _window_start(p, n, K: tl.constexpr, CAUSAL: tl.constexpr, S: tl.constexpr):
    # First sub-grid position of the window of a query at sub-grid position p (axis of n): the
    # window of its stride block's leader (the block's centre, or its last position when causal).
    if S != 1:
        if CAUSAL:
            p = tl.minimum((p // S) * S + (S - 1), n - 1)
        else:
            p = tl.minimum((p // S) * S + S // 2, n - 1)
    if CAUSAL:
        return p - K + 1
    else:
        return tl.minimum(tl.maximum(p - K // 2, 0), n - K)


@triton.jit
def _window_end(p, start, K: tl.constexpr, CAUSAL: tl.constexpr):
    # One past the last key position: a causal query never sees a later key, even when its
    # stride leader's window reaches further.
    if CAUSAL:
        return p + 1
    else:
        return start + K


@triton.jit
def neighborhood_attention_fwd(
    Q, K, V, RPB, O,
    sq_b, sq_h, sq_x, sq_y, sq_z, sk_b, sk_h, sk_x, sk_y, sk_z, sv_b, sv_h, sv_x, sv_y, sv_z,
    so_b, so_h, so_x, so_y, so_z, sr_h, sr_x, sr_y, sr_z,
    heads, LX, LY, LZ, DX, DY, DZ, head_dim, value_dim, qk_scale,
    KX: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr,
    CAUSAL_Z: tl.constexpr, HAS_RPB: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    SX: tl.constexpr, SY: tl.constexpr, SZ: tl.constexpr,
):
    pid_bh, pid_xy, pid_z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    # Which dilation group (gx, gy, gz) and which tile of its sub-grid this program owns; grid
    # axis 1 walks the x and y tiles (x major), see neighborhood_grid.
    tiles_x = tl.cdiv(tl.cdiv(LX, DX), BX)
    tiles_y = tl.cdiv(tl.cdiv(LY, DY), BY)
    tiles_z = tl.cdiv(tl.cdiv(LZ, DZ), BZ)
    pid_x, pid_y = pid_xy // (DY * tiles_y), pid_xy % (DY * tiles_y)
    gx, gy, gz = pid_x // tiles_x, pid_y // tiles_y, pid_z // tiles_z
    px0, py0, pz0 = (pid_x % tiles_x) * BX, (pid_y % tiles_y) * BY, (pid_z % tiles_z) * BZ
    nx, ny, nz = (LX - 1 - gx) // DX + 1, (LY - 1 - gy) // DY + 1, (LZ - 1 - gz) // DZ + 1

    offs_q = tl.arange(0, BX * BY * BZ)
    qpx, qpy, qpz = px0 + offs_q // (BY * BZ), py0 + (offs_q // BZ) % BY, pz0 + offs_q % BZ
    q_valid = (qpx < nx) & (qpy < ny) & (qpz < nz)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    q_ptrs = (Q + b * sq_b + h * sq_h + (gx + DX * qpx)[:, None] * sq_x + (gy + DY * qpy)[:, None] * sq_y
              + (gz + DZ * qpz)[:, None] * sq_z + offs_d[None, :])
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)

    start_x = _window_start(qpx, nx, KX, CAUSAL_X, SX)
    start_y = _window_start(qpy, ny, KY, CAUSAL_Y, SY)
    start_z = _window_start(qpz, nz, KZ, CAUSAL_Z, SZ)
    end_x = _window_end(qpx, start_x, KX, CAUSAL_X)
    end_y = _window_end(qpy, start_y, KY, CAUSAL_Y)
    end_z = _window_end(qpz, start_z, KZ, CAUSAL_Z)
    # Union of the tile's windows: windows only move forward with the query position.
    lo_x = tl.maximum(_window_start(px0, nx, KX, CAUSAL_X, SX), 0)
    hi_x = _window_start(tl.minimum(px0 + BX - 1, nx - 1), nx, KX, CAUSAL_X, SX) + KX
    lo_y = tl.maximum(_window_start(py0, ny, KY, CAUSAL_Y, SY), 0)
    hi_y = _window_start(tl.minimum(py0 + BY - 1, ny - 1), ny, KY, CAUSAL_Y, SY) + KY
    lo_z = tl.maximum(_window_start(pz0, nz, KZ, CAUSAL_Z, SZ), 0)
    hi_z = _window_start(tl.minimum(pz0 + BZ - 1, nz - 1), nz, KZ, CAUSAL_Z, SZ) + KZ

    # Finite floor instead of -inf: a row whose keys so far are all masked keeps m = -1e30,
    # so alpha = exp2(0) = 1 and p = exp2(-inf) = 0 (no inf - inf NaN).
    m_i = tl.full([BX * BY * BZ], -1.0e30, tl.float32)
    l_i = tl.zeros([BX * BY * BZ], tl.float32)
    acc = tl.zeros([BX * BY * BZ, BLOCK_DV], tl.float32)
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    for kpx in range(lo_x, hi_x):
        in_x = (kpx >= start_x) & (kpx < end_x)
        for kpy in range(lo_y, hi_y):
            in_xy = in_x & (kpy >= start_y) & (kpy < end_y)
            k_row = k_base + (gx + DX * kpx) * sk_x + (gy + DY * kpy) * sk_y
            v_row = v_base + (gx + DX * kpx) * sv_x + (gy + DY * kpy) * sv_y
            for kpz0 in range(lo_z, hi_z, BLOCK_K):
                kpz = kpz0 + tl.arange(0, BLOCK_K)
                k_valid = kpz < hi_z
                k = tl.load(k_row + ((gz + DZ * kpz) * sk_z)[:, None] + offs_d[None, :],
                            mask=k_valid[:, None] & (offs_d[None, :] < head_dim), other=0.0)
                s = dot(q, tl.trans(k), PRECISION) * qk_scale
                in_z = (kpz[None, :] >= start_z[:, None]) & (kpz[None, :] < end_z[:, None])
                allowed = in_xy[:, None] & in_z & k_valid[None, :]
                if HAS_RPB:
                    rel_xy = (kpx - qpx + KX - 1) * sr_x + (kpy - qpy + KY - 1) * sr_y
                    rel_z = kpz[None, :] - qpz[:, None] + KZ - 1
                    bias = tl.load(RPB + h * sr_h + rel_xy[:, None] + rel_z * sr_z,
                                   mask=allowed & q_valid[:, None], other=0.0)
                    s += bias.to(tl.float32) * 1.4426950408889634
                s = tl.where(allowed, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_row + ((gz + DZ * kpz) * sv_z)[:, None] + offs_dv[None, :],
                            mask=k_valid[:, None] & (offs_dv[None, :] < value_dim), other=0.0)
                acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION)
                m_i = m_new
    out = acc / l_i[:, None]
    o_ptrs = (O + b * so_b + h * so_h + (gx + DX * qpx)[:, None] * so_x + (gy + DY * qpy)[:, None] * so_y
              + (gz + DZ * qpz)[:, None] * so_z + offs_dv[None, :])
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_valid[:, None] & (offs_dv[None, :] < value_dim))


# TensorRT AOT entry points: TensorRT launches a plugin's kernel with (*inputs, *int32 scalars,
# *outputs) and nothing else, so these take contiguous tensors, derive the strides from the
# grid sizes and inline the kernel above. Every grid is passed as 3-D (1-D: 1 x 1 x L, 2-D:
# 1 x X x Y). Static attributes (window, dilation, stride, scale) are constexprs: a TensorRT node's
# attributes never change after the build.

@triton.jit
def _neighborhood_contiguous(
    Q, K, V, RPB, heads, LX, LY, LZ, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
    QK_SCALE: tl.constexpr, HAS_RPB: tl.constexpr, RPB_PER_HEAD: tl.constexpr, KX: tl.constexpr,
    KY: tl.constexpr, KZ: tl.constexpr, CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr,
    BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, SX: tl.constexpr, SY: tl.constexpr, SZ: tl.constexpr,
):
    """:func:`neighborhood_attention_fwd` on contiguous ``[B, H, LX, LY, LZ, D]`` tensors and a
    contiguous ``[H or 1, 2KX-1, 2KY-1, 2KZ-1]`` RPB table."""
    tokens = LX.to(tl.int64) * LY * LZ
    table_z = 2 * KZ - 1
    table_yz = (2 * KY - 1) * table_z
    neighborhood_attention_fwd(
        Q, K, V, RPB, O,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * LZ * HEAD_DIM, LZ * HEAD_DIM, HEAD_DIM,
        heads * tokens * HEAD_DIM, tokens * HEAD_DIM, LY * LZ * HEAD_DIM, LZ * HEAD_DIM, HEAD_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * LZ * VALUE_DIM, LZ * VALUE_DIM, VALUE_DIM,
        heads * tokens * VALUE_DIM, tokens * VALUE_DIM, LY * LZ * VALUE_DIM, LZ * VALUE_DIM, VALUE_DIM,
        (2 * KX - 1) * table_yz if RPB_PER_HEAD else 0, table_yz, table_z, 1,
        heads, LX, LY, LZ, DX, DY, DZ, HEAD_DIM, VALUE_DIM, QK_SCALE,
        KX, KY, KZ, CAUSAL_X, CAUSAL_Y, CAUSAL_Z, HAS_RPB, BX, BY, BZ, BLOCK_K, BLOCK_D, BLOCK_DV, PRECISION,
        SX, SY, SZ)


@trt_entry_jit("heads", "LX", "LY", "LZ")
def neighborhood_attention_trt(
    Q, K, V, heads, LX, LY, LZ, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
    QK_SCALE: tl.constexpr, KX: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr, CAUSAL_X: tl.constexpr,
    CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
    SX: tl.constexpr, SY: tl.constexpr, SZ: tl.constexpr,
):
    # No RPB input: Q stands in for the RPB pointer, which HAS_RPB=False never reads.
    _neighborhood_contiguous(Q, K, V, Q, heads, LX, LY, LZ, O, HEAD_DIM, VALUE_DIM, DX, DY, DZ, QK_SCALE, False,
                             False, KX, KY, KZ, CAUSAL_X, CAUSAL_Y, CAUSAL_Z, BX, BY, BZ, BLOCK_K, BLOCK_D,
                             BLOCK_DV, PRECISION, SX, SY, SZ)


@trt_entry_jit("heads", "LX", "LY", "LZ")
def neighborhood_attention_rpb_trt(
    Q, K, V, RPB, heads, LX, LY, LZ, O,
    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, DX: tl.constexpr, DY: tl.constexpr, DZ: tl.constexpr,
    QK_SCALE: tl.constexpr, RPB_PER_HEAD: tl.constexpr, KX: tl.constexpr, KY: tl.constexpr, KZ: tl.constexpr,
    CAUSAL_X: tl.constexpr, CAUSAL_Y: tl.constexpr, CAUSAL_Z: tl.constexpr, BX: tl.constexpr, BY: tl.constexpr,
    BZ: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # RPB excludes a stride (the op's contract): stride 1 on every axis.
    _neighborhood_contiguous(Q, K, V, RPB, heads, LX, LY, LZ, O, HEAD_DIM, VALUE_DIM, DX, DY, DZ, QK_SCALE, True,
                             RPB_PER_HEAD, KX, KY, KZ, CAUSAL_X, CAUSAL_Y, CAUSAL_Z, BX, BY, BZ, BLOCK_K, BLOCK_D,
                             BLOCK_DV, PRECISION, 1, 1, 1)

# ----------------------------------------------------------------------------- launcher

def neighborhood_config(ndim: int, kernel_size: Sequence[int], dtype: torch.dtype, head_dim: int,
                        value_dim: int, strided: bool = False, pytorch: bool = False) -> dict[str, int]:
    """Launch configuration for an ``ndim``-D grid: query tile ``BX x BY x BZ`` and key-block width
    ``BLOCK_K`` of the 3-D view, ``num_warps``, ``num_stages``; ``kernel_size`` per grid axis.

    A key row of the tile's window union spans ``BZ + kz - 1`` keys on the last axis; ``BLOCK_K``
    is the smallest block holding it, up to 64 (wider unions take several blocks). Half
    precision: 64-query tiles (1-D 64, 32 past head dim 64; 2-D 4 x 16; 3-D 2 x 4 x 8), two
    pipeline stages. fp32 multiplies on CUDA cores (``PRECISION`` "ieee"), whose ``tl.dot`` holds
    whole operand rows in registers: 32-query tiles, key blocks of at most 32 (16 past head dim
    64) and no software pipelining. With the half-precision tiles fp32 took 41-112 KB of shared memory and spilled
    registers on sm_86 at every head dim; tests/plugins/test_kernels.py checks the resources of
    the TensorRT kernels on every architecture. Strided 3-D half-precision tiles run 4 warps:
    with 8, ptxas on sm_86/89 capped the strided kernel at 128 registers and spilled 16-40 B
    (kernel 3x5x7, stride 2x3x4, head dim 128); 4 warps take 220 and spill nothing.

    ``pytorch``: the launcher's kernel (:func:`neighborhood_forward`, :func:`aot_specs`), whose
    strides and dims are run-time arguments. The same tiles, but half-precision tiles that
    TensorRT runs with 4 warps (non-strided) take 8: with 4, the 2-D 7x7 RPB kernel used 255
    registers and spilled 16-32 B on sm_80 at head dims 32 and 64; with 8, 223 and none. 1-D
    half-precision tiles take 32-key blocks: with 64, the 1-D kernel (k=7, head dim 64) spilled
    80 B on sm_86/89; with 32, 180 registers and none. fp32
    keeps TensorRT's configuration and its ptxas-budget spills (see tests/plugins/test_kernels.py
    ``_known_gap``).
    """
    half = dtype != torch.float32
    wide = max(head_dim, value_dim) > 64
    tile = {1: (1, 1, 64 if half and not wide else 32), 2: (1, 4 if half else 2, 16),
            3: (2, 4, 8) if half else (1, 4, 8)}[ndim]
    widest_k = 32 if pytorch and ndim == 1 and max(head_dim, value_dim) > 32 else 64   # see ``pytorch`` above
    block_k = min(widest_k if half else 16 if wide else 32,
                  max(16, next_power_of_2(tile[2] + list(kernel_size)[-1] - 1)))
    warps = 4 if strided and half and ndim == 3 else 8 if wide or block_k == 64 or (pytorch and half) else 4
    return dict(BX=tile[0], BY=tile[1], BZ=tile[2], BLOCK_K=block_k, num_warps=warps,
                num_stages=2 if half else 1)


def _as_3d(values: list[int], fill: int) -> list[int]:
    """Per-axis values of a 1-D or 2-D grid as the kernel's 3-D view (leading axes of length 1)."""
    return [fill] * (3 - len(values)) + list(values)


def neighborhood_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
                         dilation=None, is_causal=None, scale: float = 0.0,
                         rpb: torch.Tensor | None = None, stride=None) -> torch.Tensor:
    """Neighborhood attention with the fused Triton kernel.

    Args:
        query, key: ``[B, heads, *grid, D]`` with 1, 2 or 3 grid axes.
        value: ``[B, heads, *grid, Dv]``.
        kernel_size, dilation, is_causal: an int or one per grid axis (odd or even sizes).
        scale: 0 means ``1/sqrt(D)``.
        rpb: ``[heads or 1, 2k_0-1, ...]`` relative positional bias, or None.
        stride: an int or one per grid axis, ``1 <= stride <= kernel_size`` (not with ``rpb``).
    Returns:
        ``[B, heads, *grid, Dv]`` in the query's dtype.
    Raises:
        ValueError: a grid axis shorter than its window, a stride out of range, RPB with a stride.
    """
    check_inputs(query, key, value, rpb)
    ndim = query.dim() - 3
    if ndim not in (1, 2, 3):
        raise ValueError(f"neighborhood attention takes 1 to 3 grid axes, got {ndim}")
    ks, ds = _per_axis(kernel_size, ndim, 1), _per_axis(dilation, ndim, 1)
    cs, ss = _per_axis(is_causal, ndim, 0), strides(stride, ks, rpb is not None)
    for length, k, d in zip(query.shape[2:-1], ks, ds):
        if length < k * d:
            raise ValueError(f"axis of length {length} is shorter than kernel_size * dilation = {k} * {d}")
    batch, heads, head_dim, value_dim = query.shape[0], query.shape[1], query.shape[-1], value.shape[-1]
    grid, ks3, ds, cs, ss = (_as_3d(query.shape[2:-1], 1), _as_3d(ks, 1), _as_3d(ds, 1), _as_3d(cs, 0),
                             _as_3d(ss, 1))
    as_3d = lambda t, last: t.contiguous().reshape(batch, heads, *grid, last)  # noqa: E731
    q, k, v = as_3d(query, head_dim), as_3d(key, head_dim), as_3d(value, value_dim)
    out = torch.empty(batch, heads, *grid, value_dim, dtype=query.dtype, device=query.device)
    if rpb is not None:
        table = rpb.contiguous().reshape(rpb.shape[0], *(2 * k - 1 for k in ks3))
        rpb_strides = (0 if table.shape[0] == 1 else table.stride(0), *table.stride()[1:])
    else:
        table, rpb_strides = q, (0, 0, 0, 0)
    config = neighborhood_config(ndim, ks, query.dtype, head_dim, value_dim, strided=any(x != 1 for x in ss),
                                 pytorch=True)
    launch = neighborhood_grid(batch, heads, grid, ds, (config["BX"], config["BY"], config["BZ"]))
    scale = scale or head_dim ** -0.5
    neighborhood_attention_fwd[launch](
        q, k, v, table, out, *q.stride()[:5], *k.stride()[:5], *v.stride()[:5], *out.stride()[:5],
        *rpb_strides, heads, *grid, *ds, head_dim, value_dim, scale * LOG2E,
        KX=ks3[0], KY=ks3[1], KZ=ks3[2], CAUSAL_X=bool(cs[0]), CAUSAL_Y=bool(cs[1]), CAUSAL_Z=bool(cs[2]),
        SX=ss[0], SY=ss[1], SZ=ss[2], HAS_RPB=rpb is not None, BLOCK_D=block_dim(head_dim),
        BLOCK_DV=block_dim(value_dim), PRECISION=dot_precision(query.dtype), **config)
    return out.reshape(*query.shape[:-1], value_dim)


def run(attrs: dict, inputs: list, n_outputs: int = 1) -> list[torch.Tensor]:
    """One ``NeighborhoodAttention`` node with :func:`neighborhood_forward` (what TensorRT-RTX's
    Python plugins run, ``tensorrt_plugins.fused_outputs``).

    Args:
        attrs: the node's attributes, every one given (``fused_outputs`` fills in the
            defaults; ``scale`` 0 means ``1/sqrt(D)``).
        inputs: ``[Q, K, V, RPB]`` at their contract positions, ``None`` for an absent RPB.
        n_outputs: 1 (the op has one output).
    Returns:
        ``[O]``.
    """
    query, key, value, rpb = inputs
    return [neighborhood_forward(query, key, value, attrs["kernel_size"], attrs["dilation"], attrs["is_causal"],
                                 attrs["scale"] or 0.0, rpb=rpb, stride=attrs["stride"])]


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, arch: int | None = None):
    """TensorRT's AOT kernel for one ``NeighborhoodAttention`` node (``KernelProvider``).

    Args:
        attrs: the node's ``kernel_size``, ``dilation``, ``is_causal``, ``stride``, ``scale``.
        dtypes: numpy dtype names of the inputs; shapes: input shapes (``None``: dynamic dim).
        arch: target architecture (default :func:`~attnc.plugins.kernels_common.default_arch`).
    Returns:
        ``attnc.compiler.backends.tensorrt_plugins.AotKernel`` taking contiguous
        ``Q, K, V[, RPB]``, int32 ``heads, LX, LY, LZ`` (the grid as 3-D: ``1, 1, L`` for 1-D,
        ``1, X, Y`` for 2-D) and ``O``.
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
    if ndim not in (1, 2, 3):
        raise AttncError(f"the NeighborhoodAttention kernel covers 1-D to 3-D grids, not {ndim}-D",
                         "run the node through its ONNX function body (--fused-ops inline)")
    head_dim, value_dim = q_shape[-1], v_shape[-1]
    if head_dim is None or value_dim is None or dtypes[0] not in TORCH_DTYPES:
        raise AttncError(f"NeighborhoodAttention kernel needs static head dims and fp32/fp16/bf16, got "
                         f"{q_shape}, {v_shape}, {dtypes[0]}")
    ks = _per_axis(attrs.get("kernel_size"), ndim, 1)
    ds, cs = _per_axis(attrs.get("dilation"), ndim, 1), _per_axis(attrs.get("is_causal"), ndim, 0)
    has_rpb = len(shapes) > 3 and shapes[3] is not None
    try:
        ss = _as_3d(strides(attrs.get("stride"), ks, has_rpb), 1)
    except ValueError as exc:
        raise AttncError(f"NeighborhoodAttention: {exc}", "fix the node's stride attribute") from exc
    torch_dtype = TORCH_DTYPES[dtypes[0]]
    config = neighborhood_config(ndim, ks, torch_dtype, head_dim, value_dim, strided=any(x != 1 for x in ss))
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    ks, ds, cs = _as_3d(ks, 1), _as_3d(ds, 1), _as_3d(cs, 0)
    ptr = POINTER_TYPES[torch_dtype]
    constexprs = dict(HEAD_DIM=head_dim, VALUE_DIM=value_dim, DX=ds[0], DY=ds[1], DZ=ds[2],
                      QK_SCALE=(float(attrs.get("scale") or 0.0) or head_dim ** -0.5) * LOG2E,
                      KX=ks[0], KY=ks[1], KZ=ks[2], CAUSAL_X=bool(cs[0]), CAUSAL_Y=bool(cs[1]),
                      CAUSAL_Z=bool(cs[2]), BLOCK_D=block_dim(head_dim), BLOCK_DV=block_dim(value_dim),
                      PRECISION=dot_precision(torch_dtype), **config)
    signature = {"Q": ptr, "K": ptr, "V": ptr, "heads": "i32", "LX": "i32", "LY": "i32", "LZ": "i32", "O": ptr}
    kernel = neighborhood_attention_trt
    if has_rpb:  # stride 1 (strides() refused anything else): the RPB entry point has none
        kernel = neighborhood_attention_rpb_trt
        signature["RPB"] = ptr
        constexprs["RPB_PER_HEAD"] = shapes[3][0] != 1
    else:
        constexprs.update(SX=ss[0], SY=ss[1], SZ=ss[2])
    spec = KernelSpec(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages)

    def grid_lengths(shape):
        return _as_3d(list(shape[2:-1]), 1)

    def grid(output_shapes):
        out = output_shapes[0]
        return neighborhood_grid(out[0], out[1], grid_lengths(out), ds, (config["BX"], config["BY"], config["BZ"]))

    def scalars(input_shapes):
        return [input_shapes[0][1], *grid_lengths(input_shapes[0])]

    return spec, grid, scalars


def aot_specs(dtype: str, head_dim: int = 64) -> list[KernelSpec]:
    """Representative builds of the PyTorch path's kernel in :func:`neighborhood_config`'s
    launch configurations (``pytorch=True``, value dim = head dim): 2-D 7x7 with RPB (NAT), 1-D
    causal k=7, 3-D 3x3x5 with RPB."""
    torch_dtype = DTYPE_NAMES[dtype]
    ptr = POINTER_TYPES[torch_dtype]
    ints = [f"s{t}_{a}" for t in "qkvo" for a in ("b", "h", "x", "y", "z")]
    ints += ["sr_h", "sr_x", "sr_y", "sr_z", "heads", "LX", "LY", "LZ", "DX", "DY", "DZ", "head_dim", "value_dim"]
    signature = {"Q": ptr, "K": ptr, "V": ptr, "RPB": ptr, "O": ptr, **{n: "i32" for n in ints},
                 "qk_scale": "fp32"}
    common = {"BLOCK_D": block_dim(head_dim), "BLOCK_DV": block_dim(head_dim),
              "PRECISION": dot_precision(torch_dtype)}
    specs = []
    for ndim, ks, causal, rpb in [(2, (7, 7), (0, 0), True), (1, (7,), (1,), False), (3, (3, 3, 5), (0, 0, 1), True)]:
        config = neighborhood_config(ndim, ks, torch_dtype, head_dim, head_dim, pytorch=True)
        launch = dict(num_warps=config.pop("num_warps"), num_stages=config.pop("num_stages"))
        ks3, cs3 = _as_3d(list(ks), 1), _as_3d(list(causal), 0)
        constexprs = dict(KX=ks3[0], KY=ks3[1], KZ=ks3[2], CAUSAL_X=bool(cs3[0]), CAUSAL_Y=bool(cs3[1]),
                          CAUSAL_Z=bool(cs3[2]), HAS_RPB=rpb, SX=1, SY=1, SZ=1, **config, **common)
        specs.append(KernelSpec(neighborhood_attention_fwd, signature, constexprs, **launch))
    return specs


__all__ = ["aot_specs", "kernel_for", "trt_launch", "neighborhood_attention_fwd", "neighborhood_attention_rpb_trt",
           "neighborhood_attention_trt", "neighborhood_config", "neighborhood_forward"]
