"""Neighborhood attention (Hassani et al., NAT / DiNAT) on 1-D, 2-D and 3-D token grids.

Shapes: :class:`NeighborhoodAttention1D` maps ``x [B, L, C] -> [B, L, C]``,
:class:`NeighborhoodAttention2D` maps ``x [B, H, W, C] -> [B, H, W, C]`` (channels last,
as in NAT), :class:`NeighborhoodAttention3D` maps ``x [B, T, H, W, C] -> [B, T, H, W, C]``
(video: frames, rows, columns). Tokens are flattened row-major over the grid. Each query
attends to a window of keys around itself, per grid axis:

- **NATTEN >= 0.20 windows.** The axis is split into ``dilation`` sub-grids
  (positions ``g, g + d, g + 2d, ...``); a query only sees keys of its own sub-grid,
  and on that sub-grid (length ``n``, query position ``p``) the window is
  ``kernel_size`` consecutive positions starting at
  ``clamp(p - k//2, 0, n - k)``, i.e. it is *shifted* at the borders so every query
  sees exactly ``kernel_size`` keys per axis. Causal axes use ``[p - k + 1, p]``
  instead (fewer keys near the start, never shifted). Every sub-grid must hold at
  least ``kernel_size`` positions: ``length >= kernel_size * dilation``.
- **Stride** (NATTEN >= 0.20, ``1 <= stride <= kernel_size`` per axis, default 1): the
  queries of a sub-grid form blocks of ``stride`` consecutive positions (``p // s``), and
  every query uses the window of its block's *leader* ``P`` instead of its own. Non-causal:
  ``P = min((p // s) * s + s // 2, n - 1)`` (the block's centre, the right one for an even
  stride), window as above with ``P`` for ``p``. Causal: ``P = min((p // s) * s + s - 1, n - 1)``
  (the block's last position) and the keys ``P - k < j <= p``: never a later key, so queries
  before their leader see fewer. Not combinable with the relative positional bias (NATTEN
  >= 0.20 has no RPB, NATTEN <= 0.17 had no stride).
- **Relative positional bias** (NAT / DiNAT with NATTEN <= 0.17): a learned
  ``rpb [heads, 2k-1]`` (1-D), ``[heads, 2k-1, 2k-1]`` (2-D) or
  ``[heads, 2k-1, 2k-1, 2k-1]`` (3-D) added to the scores;
  query ``i`` and key ``j`` use ``rpb[h, (j - i)/d + k - 1]`` per axis (the offset is
  counted in sub-grid steps, so it always lies in ``[0, 2k-2]``).
- Scores are ``(q · 1/sqrt(D)) · kᵀ``, softmax over the window, times ``v``.

Two implementations with identical results (to float rounding), selected by ``impl``:

- ``"masked"``: full ``N x N`` attention plus an additive bias that is ``-inf``
  outside the neighborhood (and the RPB inside). Quadratic, but made only of
  MatMul/Softmax and a mask, which is how people without NATTEN write it.
- ``"gather"``: key/value windows are gathered with an index tensor
  (``index_select`` -> ONNX ``Gather``) into ``[B, heads, N, K, D]`` with
  ``K = prod(kernel_size)``, then a per-query softmax over the ``K`` keys.

Both compute their index tensors in ``forward`` from the runtime grid size with
``arange`` / integer arithmetic. Both ONNX exporters turn that into a small shape
subgraph (constant-folded when the grid is static), which keeps a dynamic grid size
exportable; a buffer precomputed for one size would silently break other sizes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from attnc.models.projections import QKVProjection, merge_heads

IMPLS = ("masked", "gather")


class AxisWindow(NamedTuple):
    """Where each query's window lies on one axis, all ``[L]`` int64 tensors."""

    pos: torch.Tensor    # position of the query within its dilation sub-grid
    group: torch.Tensor  # which sub-grid (index modulo dilation)
    start: torch.Tensor  # first window position on the sub-grid (may be < 0 when causal)
    last: torch.Tensor   # last visible key position: start + k - 1, or the query's own when causal


def axis_window(length, kernel_size: int, dilation: int, is_causal: bool, stride: int = 1,
                device: torch.device | None = None) -> AxisWindow:
    """The NATTEN >= 0.20 window of every query on an axis of ``length`` tokens.

    With ``stride`` > 1 a query takes the window of its block's leader (module docstring).
    ``length`` may be a Python int, a SymInt (dynamo export) or a traced size
    (TorchScript export); only tensor arithmetic touches it.
    """
    index = torch.arange(length, device=device)
    group = index % dilation
    pos = torch.div(index, dilation, rounding_mode="floor")
    subgrid_len = torch.div(length - 1 - group, dilation, rounding_mode="floor") + 1
    leader = pos  # stride 1 adds no ops to the exported graph
    if stride != 1:
        block = torch.div(pos, stride, rounding_mode="floor") * stride
        leader = torch.minimum(block + (stride - 1 if is_causal else stride // 2), subgrid_len - 1)
    if is_causal:
        return AxisWindow(pos, group, leader - (kernel_size - 1), pos)
    start = torch.minimum((leader - kernel_size // 2).clamp(min=0), subgrid_len - kernel_size)
    return AxisWindow(pos, group, start, start + (kernel_size - 1))


def _outer(first: torch.Tensor, second: torch.Tensor, op) -> torch.Tensor:
    """Combine ``[A, X]`` and ``[B, Y]`` into ``[A*B, X*Y]`` (row-major grid flattening)."""
    combined = op(first[:, None, :, None], second[None, :, None, :])
    return combined.reshape(combined.shape[0] * combined.shape[1], -1)


class _NeighborhoodAttention(nn.Module):
    """Shared body of the 1-D, 2-D and 3-D modules; ``ndim`` is the number of grid axes."""

    ndim: int

    def __init__(self, dim: int, num_heads: int, kernel_size, dilation=1, is_causal=False,
                 rpb: bool = False, impl: str = "masked", qkv_bias: bool = True, fused_qkv: bool = True,
                 stride=1):
        super().__init__()
        self.kernel_size = _per_axis(kernel_size, self.ndim, "kernel_size")
        self.dilation = _per_axis(dilation, self.ndim, "dilation")
        self.is_causal = tuple(bool(c) for c in _per_axis(is_causal, self.ndim, "is_causal"))
        self.stride = tuple(int(s) for s in _per_axis(stride, self.ndim, "stride"))
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if any(d < 1 for d in self.dilation):
            raise ValueError(f"dilation must be positive, got {self.dilation}")
        if not all(1 <= s <= k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size per axis, got stride={self.stride} "
                             f"for kernel_size={self.kernel_size}")
        if rpb and any(s != 1 for s in self.stride):
            raise ValueError(f"relative positional bias with stride {self.stride} is not defined (NATTEN >= 0.20 "
                             "has no RPB, NATTEN <= 0.17 no stride)")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self.in_proj = QKVProjection(dim, num_heads, qkv_bias, fused_qkv)
        self.proj = nn.Linear(dim, dim)
        self.scale = self.in_proj.head_dim ** -0.5
        if rpb:
            self.rpb = nn.Parameter(torch.empty(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            nn.init.trunc_normal_(self.rpb, std=0.02)
        else:
            self.rpb = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = x.shape[1:-1]
        for length, ks, dil in zip(grid, self.kernel_size, self.dilation):
            # Only checkable on concrete sizes; under export the sizes are symbolic.
            if isinstance(length, int) and length < ks * dil:
                raise ValueError(f"grid {tuple(grid)} is smaller than kernel_size * dilation "
                                 f"{tuple(a * b for a, b in zip(self.kernel_size, self.dilation))}")
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        q, k, v = self.in_proj(tokens)
        q = q * self.scale
        windows = [axis_window(length, ks, dil, causal, st, device=x.device) for length, ks, dil, causal, st
                   in zip(grid, self.kernel_size, self.dilation, self.is_causal, self.stride)]
        if self.impl == "masked":
            out = self._masked(q, k, v, windows)
        else:
            out = self._gather(q, k, v, windows)
        return self.proj(merge_heads(out)).reshape(x.shape)

    def _rpb_bias(self, rel: list[torch.Tensor]) -> torch.Tensor:
        """Gather the RPB at per-axis offset indices ``rel`` (each ``[L_a, X_a]``) -> ``[heads, N, X]``."""
        flat = rel[0]
        for axis in range(1, self.ndim):
            span = 2 * self.kernel_size[axis] - 1
            flat = _outer(flat, rel[axis], lambda a, b, span=span: a * span + b)
        table = self.rpb.reshape(self.rpb.shape[0], -1)
        return table[:, flat.reshape(-1)].reshape(table.shape[0], flat.shape[0], flat.shape[1])

    def _masked(self, q, k, v, windows: list[AxisWindow]) -> torch.Tensor:
        allowed, rel = [], []
        for w, ks in zip(windows, self.kernel_size):
            key = w.pos[None, :]
            allowed.append((w.group[:, None] == w.group[None, :]) & (key >= w.start[:, None])
                           & (key <= w.last[:, None]))
            rel.append((w.pos[None, :] - w.pos[:, None] + ks - 1).clamp(0, 2 * ks - 2))
        mask = allowed[0]
        for axis in range(1, self.ndim):
            mask = _outer(mask, allowed[axis], torch.logical_and)
        bias = self._rpb_bias(rel) if self.rpb is not None else torch.zeros((), dtype=q.dtype, device=q.device)
        bias = torch.where(mask, bias, float("-inf"))
        scores = q @ k.transpose(-2, -1) + bias
        return scores.softmax(dim=-1) @ v

    def _gather(self, q, k, v, windows: list[AxisWindow]) -> torch.Tensor:
        index, valid, rel = [], [], []
        for w, ks, dil in zip(windows, self.kernel_size, self.dilation):
            key_pos = w.start[:, None] + torch.arange(ks, device=q.device)[None, :]
            index.append(w.group[:, None] + dil * key_pos.clamp(min=0))
            valid.append((key_pos >= 0) & (key_pos <= w.last[:, None]))
            rel.append((key_pos - w.pos[:, None] + ks - 1).clamp(0, 2 * ks - 2))
        key_index, key_valid = index[0], valid[0]
        for axis in range(1, self.ndim):
            row_len = windows[axis].pos.shape[0]
            key_index = _outer(key_index, index[axis], lambda a, b, n=row_len: a * n + b)
            key_valid = _outer(key_valid, valid[axis], torch.logical_and)
        batch, heads, n_tok, head_dim = k.shape
        n_win = key_index.shape[1]
        k_win = k.index_select(2, key_index.reshape(-1)).reshape(batch, heads, n_tok, n_win, head_dim)
        v_win = v.index_select(2, key_index.reshape(-1)).reshape(batch, heads, n_tok, n_win, head_dim)
        scores = (q.unsqueeze(3) @ k_win.transpose(-2, -1)).squeeze(3)  # [B, heads, N, K]
        if self.rpb is not None:
            scores = scores + self._rpb_bias(rel)
        if any(self.is_causal):
            scores = scores.masked_fill(~key_valid, float("-inf"))
        return (scores.softmax(dim=-1).unsqueeze(3) @ v_win).squeeze(3)


class NeighborhoodAttention1D(_NeighborhoodAttention):
    """1-D neighborhood attention. ``x [B, L, C] -> [B, L, C]``.

    Args:
        dim: model width ``C``.
        num_heads: number of heads.
        kernel_size: odd window size ``k``.
        dilation: dilation ``d``; ``L >= k * d``.
        is_causal: key ``j`` visible only when ``j <= i`` (the last ``k`` keys of the sub-grid).
        stride: NATTEN >= 0.20 stride ``s``, ``1 <= s <= k``: blocks of ``s`` queries share their
            leader's window (see the module docstring); not with ``rpb``.
        rpb: learn a relative positional bias ``rpb [heads, 2k-1]``.
        impl: ``"masked"`` or ``"gather"`` (see the module docstring).
        qkv_bias, fused_qkv: see :class:`~attnc.models.projections.QKVProjection`.
    """

    ndim = 1


class NeighborhoodAttention2D(_NeighborhoodAttention):
    """2-D neighborhood attention. ``x [B, H, W, C] -> [B, H, W, C]``.

    Arguments as :class:`NeighborhoodAttention1D`; ``kernel_size``, ``dilation``, ``stride`` and
    ``is_causal`` take one value or a ``(rows, cols)`` pair, and ``rpb`` has shape
    ``[heads, 2k_r - 1, 2k_c - 1]``.
    """

    ndim = 2


class NeighborhoodAttention3D(_NeighborhoodAttention):
    """3-D neighborhood attention. ``x [B, T, H, W, C] -> [B, T, H, W, C]``.

    Arguments as :class:`NeighborhoodAttention1D`; ``kernel_size``, ``dilation``, ``stride`` and
    ``is_causal`` take one value or a ``(frames, rows, cols)`` triple (``is_causal=(True,
    False, False)`` is the usual causal-in-time video setting), and ``rpb`` has shape
    ``[heads, 2k_t - 1, 2k_r - 1, 2k_c - 1]``.
    """

    ndim = 3


def _per_axis(value, ndim: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * ndim
    if len(values) != ndim:
        raise ValueError(f"{name} needs {ndim} value(s), got {value!r}")
    return values
