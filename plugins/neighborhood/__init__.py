"""``attnc::NeighborhoodAttention``: neighborhood attention on a 1-D, 2-D or 3-D token grid.

Contract
--------
Inputs (layout heads-first, the layout exported graphs already have after the head split):

- ``Q``  ``[B, heads, *grid, D]``   queries; ``grid`` has 1, 2 or 3 axes (``X``, ``X, Y``, ``X, Y, Z``).
- ``K``  ``[B, heads, *grid, D]``   keys.
- ``V``  ``[B, heads, *grid, Dv]``  values.
- ``RPB`` (optional 4th input) ``[heads or 1, 2k_0-1, ..., 2k_{n-1}-1]``: relative positional
  bias (NAT / DiNAT, NATTEN <= 0.17); a leading 1 broadcasts over heads.

Output: ``[B, heads, *grid, Dv]``.

Attributes (one entry per grid axis):

- ``kernel_size`` (ints, required) window size ``k`` per axis, ``1 <= k``, every axis needs
  ``length >= k * dilation`` at run time.
- ``dilation`` (ints, default all 1).
- ``is_causal`` (ints, default all 0).
- ``stride`` (ints, default all 1): NATTEN's strided NA, ``1 <= s <= k`` per axis; queries in blocks
  of ``s`` share the window of the block's leader (below). RPB with a stride other than 1 is refused
  (NATTEN >= 0.20 has no RPB, and NATTEN <= 0.17 had no stride).
- ``scale`` (float, default 0 -> ``1/sqrt(D)``).
- ``grid`` (ints, optional): the grid sizes when they are static; must equal Q's grid dims. Only a
  performance hint (index tensors become constants a runtime can fold); semantics unchanged.

Semantics (NATTEN >= 0.20): per axis of length ``L`` a query at index ``i`` lives on the
dilation sub-grid ``g = i mod d`` at position ``p = i div d``; the sub-grid has
``n = (L - 1 - g) div d + 1`` positions. Its window is the ``k`` consecutive sub-grid positions
starting at ``clamp(p - k//2, 0, n - k)`` (shifted at the borders, so every query sees exactly ``k``
keys), or ``p - k + 1 .. p`` when the axis is causal (fewer keys near the start).
With stride ``s`` the queries form blocks of ``s`` consecutive sub-grid positions (``p div s``) and
each uses the window of its block's *leader* ``P``: non-causal ``P = min((p div s) s + s div 2, n - 1)``
(the block's centre, the right one for even ``s``) and the window above with ``P`` in place of ``p``;
causal ``P = min((p div s) s + s - 1, n - 1)`` (the block's last position) and the keys
``P - k < j <= p`` (never a later key; fewer than ``k`` for queries before the leader). Stride 1
gives ``P = p``. The neighborhood of a query is the product of its per-axis windows. The output is
``softmax_j(scale * q_i . k_j + rpb[h, r_0, ..., r_{n-1}]) v_j`` over the neighborhood, where the RPB
index per axis is ``r = p_j - p_i + k - 1`` (the offset in sub-grid steps, in ``[0, 2k-2]``).

Implementation in ONNX (:func:`function_proto`): the *windowed* algorithm, not masked full
attention. Index tensors ``[N, K]`` (``N`` tokens, ``K = prod(k)`` window size) are computed in the
graph from the runtime grid sizes and the node's attributes (attribute references, so one function
serves every node), keys/values are gathered into ``[B, heads, N, K, D]`` windows and a softmax over
the ``K`` window entries follows. Cost ``O(N K D)`` instead of ``O(N^2 D)``.

The function is overloaded per grid rank, RPB presence and static grid (``overload`` ``"1d"``,
``"2d_rpb"``, ``"2d_rpb_static"``, ...): an ONNX function body has a fixed number of inputs and fixed
tensor ranks.

Tests: ``tests/plugins/test_neighborhood.py`` (function body vs :func:`reference` vs an independent
numpy loop); the fusion pass that emits this op is ``attnc.passes.neighborhood``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from attnc import DOMAIN

OP_TYPE = "NeighborhoodAttention"
ATTRIBUTES = {"kernel_size": None, "dilation": None, "is_causal": None, "stride": None, "scale": 0.0}
INPUTS = ("Q", "K", "V", "RPB")  # RPB optional
BLOCK = 28  # queries per block on the last grid axis (2-D/3-D); divides NAT's 56/28 grids at 224 px
OPSET = 18  # default-domain opset of the body; any of 15..23 works (the body uses no op that changed since 15)


# ----------------------------------------------------------------------------- contract helpers

def _per_axis(value, ndim: int, default: int) -> list[int]:
    if value is None:
        return [default] * ndim
    values = list(value) if isinstance(value, (list, tuple)) else [value] * ndim
    if len(values) != ndim:
        raise ValueError(f"need {ndim} value(s) per grid axis, got {value!r}")
    return [int(v) for v in values]


def strides(stride, kernel_size: Sequence[int], has_rpb: bool = False) -> list[int]:
    """Per-axis ``stride`` (default all 1) checked against ``kernel_size``: ``1 <= s <= k``, and no
    RPB unless every stride is 1.

    Raises:
        ValueError: a stride out of range, or RPB with a stride other than 1.
    """
    ks = list(kernel_size)
    ss = _per_axis(stride, len(ks), 1)
    bad = [(s, k) for s, k in zip(ss, ks) if not 1 <= s <= k]
    if bad:
        raise ValueError(f"stride must satisfy 1 <= stride <= kernel_size per axis, got stride={ss} "
                         f"for kernel_size={ks}")
    if has_rpb and any(s != 1 for s in ss):
        raise ValueError(f"relative positional bias with stride {ss} is not defined (NATTEN >= 0.20 has "
                         "no RPB, NATTEN <= 0.17 no stride); use stride 1 or drop the RPB")
    return ss


def output_shape(input_shapes: Sequence[Sequence], **attrs) -> list:
    """``[B, heads, *grid, Dv]`` from the shapes of Q, K, V (and RPB); dims may be symbolic."""
    q, v = list(input_shapes[0]), list(input_shapes[2])
    ndim = len(q) - 3
    if ndim not in (1, 2, 3):
        raise ValueError(f"Q must be [B, heads, *grid, D] with 1-3 grid axes, got rank {len(q)}")
    if len(attrs.get("kernel_size") or [0] * ndim) != ndim:
        raise ValueError(f"kernel_size needs {ndim} entries for a rank-{len(q)} Q")
    return q[:-1] + [v[-1]]


def axis_windows(length: int, kernel_size: int, dilation: int, is_causal: bool, stride: int = 1):
    """Per-axis window of every query: ``(key_index [L, k], valid [L, k], rel [L, k])`` numpy arrays.

    ``key_index`` holds the key's axis index (clamped to 0 where ``valid`` is False: causal
    queries near the start have fewer than ``k`` keys, strided causal queries before their
    leader too); ``rel`` the RPB index ``p_j - p_i + k - 1``.
    """
    strides([stride], [kernel_size])
    if length < kernel_size * dilation:
        raise ValueError(f"axis of length {length} is shorter than kernel_size * dilation "
                         f"= {kernel_size} * {dilation}")
    i = np.arange(length)
    group, pos = i % dilation, i // dilation
    n = (length - 1 - group) // dilation + 1
    block = (pos // stride) * stride
    if is_causal:
        leader = np.minimum(block + stride - 1, n - 1)
        start = leader - kernel_size + 1
    else:
        leader = np.minimum(block + stride // 2, n - 1)
        start = np.minimum(np.maximum(leader - kernel_size // 2, 0), n - kernel_size)
    key_pos = start[:, None] + np.arange(kernel_size)[None, :]
    valid = (key_pos >= 0) & (key_pos <= pos[:, None]) if is_causal else key_pos >= 0
    key_index = group[:, None] + dilation * np.maximum(key_pos, 0)
    rel = np.maximum(key_pos, 0) - pos[:, None] + kernel_size - 1
    return key_index, valid, rel


def dense_mask_and_rel(grid: Sequence[int], kernel_size, dilation=None, is_causal=None, stride=None):
    """``allowed [N, N]`` (bool) and ``rel [N, N, ndim]`` (RPB index per axis) for a grid.

    The dense form of the op: what masked full attention must add to be this op. Used by the
    fusion pass to *verify* a mask it found and by :func:`reference`.
    """
    ndim = len(grid)
    ks, ds = _per_axis(kernel_size, ndim, 1), _per_axis(dilation, ndim, 1)
    cs, ss = _per_axis(is_causal, ndim, 0), strides(stride, ks)
    allowed = np.ones((1, 1), dtype=bool)
    rel = np.zeros((1, 1, 0), dtype=np.int64)
    for length, k, d, c, st in zip(grid, ks, ds, cs, ss):
        index, valid, r = axis_windows(length, k, d, bool(c), st)
        axis_allowed = np.zeros((length, length), dtype=bool)
        axis_rel = np.zeros((length, length), dtype=np.int64)
        rows = np.repeat(np.arange(length)[:, None], k, axis=1)
        axis_allowed[rows[valid], index[valid]] = True
        axis_rel[rows[valid], index[valid]] = r[valid]
        a, b = allowed.shape[0], length
        allowed = (allowed[:, None, :, None] & axis_allowed[None, :, None, :]).reshape(a * b, a * b)
        rel = np.concatenate([
            np.broadcast_to(rel[:, None, :, None, :], (a, b, a, b, rel.shape[-1])),
            np.broadcast_to(axis_rel[None, :, None, :, None], (a, b, a, b, 1)),
        ], axis=-1).reshape(a * b, a * b, -1)
    return allowed, rel


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
              dilation=None, is_causal=None, scale: float | None = 0.0,
              rpb: torch.Tensor | None = None, stride=None) -> torch.Tensor:
    """The op in plain torch (any float dtype, float64 included): dense masked attention.

    ``query``/``key`` ``[B, heads, *grid, D]``, ``value`` ``[B, heads, *grid, Dv]``,
    ``rpb`` ``[heads or 1, 2k-1, ...]`` -> ``[B, heads, *grid, Dv]``; ``stride`` per axis (default 1,
    not with ``rpb``).
    """
    grid = tuple(int(s) for s in query.shape[2:-1])  # int(): sizes may be traced values
    batch, heads, head_dim = query.shape[0], query.shape[1], query.shape[-1]
    strides(stride, _per_axis(kernel_size, len(grid), 1), rpb is not None)
    allowed, rel = dense_mask_and_rel(grid, kernel_size, dilation, is_causal, stride)
    scale = scale or 1.0 / math.sqrt(head_dim)
    q = query.reshape(batch, heads, -1, head_dim)
    k = key.reshape(batch, heads, -1, head_dim)
    v = value.reshape(batch, heads, -1, value.shape[-1])
    scores = (q * scale) @ k.transpose(-1, -2)
    if rpb is not None:
        flat = np.ravel_multi_index(tuple(np.moveaxis(rel, -1, 0)), rpb.shape[1:])
        scores = scores + rpb.reshape(rpb.shape[0], -1)[:, torch.from_numpy(flat)].to(scores.dtype)
    scores = scores.masked_fill(~torch.from_numpy(allowed).to(scores.device), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.reshape(*query.shape[:-1], value.shape[-1])


# ----------------------------------------------------------------------------- ONNX function body

class _Body:
    """Emits function-body nodes with unique output names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def __call__(self, op: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"_{op.lower()}{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype=np.int64) -> str:
        return self("Constant", value=onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attr_const(self, attr: str, kind: int) -> str:
        """A Constant whose value is the calling node's attribute ``attr`` (attribute reference)."""
        field = {onnx.AttributeProto.INTS: "value_ints", onnx.AttributeProto.FLOAT: "value_float"}[kind]
        name = f"_attr_{attr}"
        ref = helper.make_attribute_ref(field, kind)
        ref.ref_attr_name = attr
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(ref)
        self.nodes.append(node)
        return name


def overload_name(ndim: int, has_rpb: bool, static_grid: bool = False) -> str:
    return f"{ndim}d" + ("_rpb" if has_rpb else "") + ("_static" if static_grid else "")


def function_proto(ndim: int = 2, has_rpb: bool = False, opset: int = OPSET,
                   static_grid: bool = False) -> onnx.FunctionProto:
    """The op's body in standard ONNX ops for one grid rank, with or without RPB.

    ``opset`` must equal the model's default-domain opset (ONNX requires a function and its
    model to import the same version). ``static_grid`` reads the grid sizes from the node's
    ``grid`` attribute instead of Q's shape, so ONNX Runtime constant-folds every index, mask and
    RPB tensor at session creation (it does not fold a ``Shape`` whose input has a dynamic batch).

    Two windowed algorithms, neither materialises an ``N x N`` tensor:

    - 1-D: gather each query's ``k`` keys/values (``Gather`` with an ``[L, k]`` index) and take a
      softmax over them.
    - 2-D/3-D (*blocked rows*): the leading axes are windowed by gathering whole rows, the last
      axis (length ``Z``) is cut into blocks of ``T = min(BLOCK, Z)`` queries that share one key
      range of width ``W = T + 2 d (k - 1)``. Each (block, query row) pair is one small dense
      MatMul against ``K_lead * W`` keys, and a band mask (plus the RPB) keeps each query's own
      window. That is ``K_lead * W`` scores per query instead of ``prod(k)``, but in dense MatMuls
      fed by gathers that copy ``W * D``-element pieces: on ORT CPU at 56x56 tokens, kernel 7, it
      ran ~2x faster than gathering each query's 49 keys (128-byte copies per key dominated).
    The bias (RPB + masks) is built by one MatMul of a one-hot matrix with a per-row table; with a
    static grid (``grid`` attribute) ONNX Runtime folds it, and every index tensor, at session
    creation.
    """
    b = _Body()
    one, zero, two = b.const([1]), b.const([0]), b.const([2])
    ks = b.attr_const("kernel_size", onnx.AttributeProto.INTS)
    ds = b.attr_const("dilation", onnx.AttributeProto.INTS)
    cs = b.attr_const("is_causal", onnx.AttributeProto.INTS)
    ss = b.attr_const("stride", onnx.AttributeProto.INTS)
    scale_attr = b.attr_const("scale", onnx.AttributeProto.FLOAT)
    # Sizes come from Shape(Q, start=2) = [*grid, D] only, never from the batch: then ONNX Runtime
    # constant-folds every index, mask and RPB tensor at session creation when the grid is static,
    # even with a dynamic batch (it cannot fold a Shape whose sliced dims are unknown).
    grid_d = b("Shape", "Q", start=2)
    if static_grid:
        grid_d = b("Concat", b.attr_const("grid", onnx.AttributeProto.INTS), b.const([0]), axis=0)
    last = b.const([-1])
    head_dim, v_dim = b("Shape", "Q", start=-1), b("Shape", "V", start=-1)

    def axis_scalar(vec: str, axis: int) -> str:  # [1]-shaped slice of an ints vector
        return b("Slice", vec, b.const([axis]), b.const([axis + 1]))

    def axis_window(axis: int) -> dict:
        k, d, s = axis_scalar(ks, axis), axis_scalar(ds, axis), axis_scalar(ss, axis)
        causal = b("Cast", axis_scalar(cs, axis), to=TensorProto.BOOL)
        length = axis_scalar(grid_d, axis)
        i = b("Range", b.const(0), b("Squeeze", length, zero), b.const(1))       # [L]
        group, pos = b("Mod", i, d), b("Div", i, d)
        subgrid = b("Add", b("Div", b("Sub", b("Sub", length, one), group), d), one)
        # Stride: the window is the one of the block's leader (stride 1: the query itself).
        offset = b("Where", causal, b("Sub", s, one), b("Div", s, two))
        leader = b("Min", b("Add", b("Mul", b("Div", pos, s), s), offset), b("Sub", subgrid, one))
        centred = b("Max", b("Sub", leader, b("Div", k, two)), zero)
        start = b("Where", causal, b("Add", b("Sub", leader, k), one), b("Min", centred, b("Sub", subgrid, k)))
        # Last key position: a causal query never sees a later key (past it only with stride).
        last_key = b("Where", causal, pos, b("Sub", b("Add", start, k), one))
        return dict(k=k, d=d, length=length, group=group, pos=pos, start=start, last_key=last_key)

    def gathered(w: dict) -> tuple[str, str, str]:
        """(key index [L, k], valid [L, k], rpb index [L, k]) of one axis."""
        k = w["k"]
        key_pos = b("Add", b("Unsqueeze", w["start"], one),
                    b("Unsqueeze", b("Range", b.const(0), b("Squeeze", k, zero), b.const(1)), zero))
        clamped = b("Max", key_pos, zero)
        index = b("Add", b("Unsqueeze", w["group"], one), b("Mul", w["d"], clamped))
        rel = b("Add", b("Sub", clamped, b("Unsqueeze", w["pos"], one)), b("Sub", k, one))
        valid = b("And", b("GreaterOrEqual", key_pos, zero),
                  b("LessOrEqual", key_pos, b("Unsqueeze", w["last_key"], one)))
        return index, valid, rel

    def combine(acc, new, op, factor=None):
        """Row-major flattening of two axes: [A, X] (x) [L, k] -> [A*L, X*k]."""
        left = b("Unsqueeze", acc, b.const([1, 3]))
        if factor is not None:
            left = b("Mul", left, factor)
        merged = b(op, left, b("Unsqueeze", new, b.const([0, 2])))
        rows = b("Mul", b("Slice", b("Shape", merged), zero, one), b("Slice", b("Shape", merged), one, two))
        return b("Reshape", merged, b("Concat", rows, last, axis=0))

    lead_axes = [0] if ndim == 1 else list(range(ndim - 1))
    index = valid = rel = None
    for axis in lead_axes:
        w = axis_window(axis)
        axis_index, axis_valid, axis_rel = gathered(w)
        if index is None:
            index, valid, rel = axis_index, axis_valid, axis_rel
        else:
            index = combine(index, axis_index, "Add", w["length"])
            valid = combine(valid, axis_valid, "And")
            rel = combine(rel, axis_rel, "Add", b("Sub", b("Mul", w["k"], two), one))

    # scale 0 means 1/sqrt(D); computed in float32 and cast to Q's type.
    is_default = b("Equal", scale_attr, b.const(0.0, np.float32))
    scale = b("Where", is_default, b("Reciprocal", b("Sqrt", b("Cast", head_dim, to=TensorProto.FLOAT))),
              scale_attr)
    neg_inf = b("CastLike", b.const(-np.inf, np.float32), "Q")

    if ndim == 1:
        q = b("Mul", "Q", b("CastLike", scale, "Q"))                   # [B, H, L, D]
        k_win = b("Gather", "K", index, axis=2)                        # [B, H, L, k, D]
        v_win = b("Gather", "V", index, axis=2)                        # [B, H, L, k, Dv]
        scores = b("MatMul", b("Unsqueeze", q, b.const([3])),
                   b("Transpose", k_win, perm=[0, 1, 2, 4, 3]))        # [B, H, L, 1, k]
        if has_rpb:
            # GatherElements, not Gather: Gather copies one element per index (a memcpy each),
            # measured 35x slower on ORT CPU for an [H, N*K] bias.
            heads = b("Slice", b("Shape", "RPB"), zero, one)
            flat_rel = b("Expand", b("Reshape", rel, b.const([1, -1])),
                         b("Concat", heads, b("Shape", b("Reshape", rel, last)), axis=0))
            bias = b("Reshape", b("GatherElements", "RPB", flat_rel, axis=1),
                     b("Concat", heads, b("Shape", rel), axis=0))       # [H, L, k]
            scores = b("Add", scores, b("CastLike", b("Unsqueeze", bias, two), "Q"))
        scores = b("Where", b("Unsqueeze", valid, one), scores, neg_inf)  # causal: keys before 0
        out = b("MatMul", b("Softmax", scores, axis=-1), v_win)        # [B, H, L, 1, Dv]
    else:
        wz = axis_window(ndim - 1)
        z_len = axis_scalar(grid_d, ndim - 1)
        # Query blocks on the last axis: T consecutive queries share one key range of width
        # W = T + 2 d (k-1) (every key lies within d (k-1) of its query, borders included). The last
        # block is shifted back to end at Z (it recomputes a few queries; out_index picks one copy).
        tile = b("Min", b.const([BLOCK]), z_len)
        reach = b("Mul", wz["d"], b("Sub", wz["k"], one))
        width = b("Min", b("Add", tile, b("Mul", reach, two)), z_len)
        n_blocks = b("Div", b("Sub", b("Add", z_len, tile), one), tile)
        blocks = b("Range", b.const(0), b("Squeeze", n_blocks, zero), b.const(1))
        q0 = b("Min", b("Mul", blocks, tile), b("Sub", z_len, tile))                    # [nb] first query
        c0 = b("Min", b("Max", b("Sub", q0, reach), zero), b("Sub", z_len, width))      # [nb] first key
        zq = b("Add", b("Unsqueeze", q0, one),
               b("Unsqueeze", b("Range", b.const(0), b("Squeeze", tile, zero), b.const(1)), zero))   # [nb, T]
        zk = b("Add", b("Unsqueeze", c0, one),
               b("Unsqueeze", b("Range", b.const(0), b("Squeeze", width, zero), b.const(1)), zero))  # [nb, W]
        z_range = b("Range", b.const(0), b("Squeeze", z_len, zero), b.const(1))
        out_block = b("Min", b("Div", z_range, tile), b("Sub", n_blocks, one))
        # Band of the last axis on the blocks: allowed [nb, T, W] and RPB index [nb, T, W].
        q_start = b("Unsqueeze", b("Gather", wz["start"], zq), two)
        k_pos = b("Unsqueeze", b("Gather", wz["pos"], zk), one)
        same_group = b("Equal", b("Unsqueeze", b("Gather", wz["group"], zq), two),
                       b("Unsqueeze", b("Gather", wz["group"], zk), one))
        in_window = b("And", b("GreaterOrEqual", k_pos, q_start),
                      b("LessOrEqual", k_pos, b("Unsqueeze", b("Gather", wz["last_key"], zq), two)))
        band = b("And", same_group, in_window)
        rel_z = b("Add", b("Sub", k_pos, b("Unsqueeze", b("Gather", wz["pos"], zq), two)), b("Sub", wz["k"], one))
        # Keys of (block b, query row n): the key range [c0_b, c0_b + W) of each of n's Kl lead rows.
        # Two gathers that copy large contiguous pieces (a per-key Gather of D-sized rows was the
        # slowest node): rows cut into the nb key ranges ("units" of W*D), then the units.
        # Batch order is (nb, Nl) and key order (kl, w).
        n_lead = b("Slice", b("Shape", index), zero, one)                                # Nl
        lead_range = b("Range", b.const(0), b("Squeeze", n_lead, zero), b.const(1))
        unit_index = b("Add", b("Unsqueeze", b("Mul", index, n_blocks), zero),
                       b("Unsqueeze", blocks, b.const([1, 2])))                           # [nb, Nl, Kl]

        def key_blocks(name: str, dim: str) -> str:
            rows = b("Reshape", name, b("Concat", b.const([0, 0, -1]), z_len, dim, axis=0))   # [B, H, Nl, Z, D]
            units = b("Reshape", b("Gather", rows, zk, axis=3),
                      b("Concat", b.const([0, 0, -1]), b("Mul", width, dim), axis=0))      # [B, H, Nl*nb, W*D]
            return b("Reshape", b("Gather", units, unit_index, axis=2),
                     b("Concat", b.const([0, 0, 0, 0, -1]), dim, axis=0))                 # [B, H, nb, Nl, Kl*W, D]

        q_index = b("Add", b("Unsqueeze", b("Mul", lead_range, z_len), b.const([0, 2])),
                    b("Unsqueeze", zq, one))                                              # [nb, Nl, T]
        q = b("Mul", b("Reshape", "Q", b("Concat", b.const([0, 0, -1]), head_dim, axis=0)),
              b("CastLike", scale, "Q"))
        q = b("Gather", q, q_index, axis=2)                                               # [B, H, nb, Nl, T, D]
        k_blocks, v_blocks = key_blocks("K", head_dim), key_blocks("V", v_dim)
        scores = b("MatMul", q, b("Transpose", k_blocks, perm=[0, 1, 2, 3, 5, 4]))        # [B, H, nb, Nl, T, Kl*W]
        # The whole additive bias [H, Nl, nb, T, W*Kl] (RPB and both masks) as ONE MatMul of a
        # one-hot [nb*T*W, R_z + 1] matrix (column r: in the band with last-axis RPB index r; column
        # R_z: outside the band) with a per-query table [H, Nl, R_z + 1, Kl]. Broadcasting
        # elementwise ops on tensors of this size were the slowest nodes on ORT CPU. Computed in
        # float32 with a finite "masked" value (0 * -inf would be NaN in the MatMul), cast to Q's
        # type at the end, where fp16 turns it into -inf.
        masked = b.const([-1e30], np.float32)
        span = b("Sub", b("Mul", wz["k"], two), one)                                   # R_z = 2k_z - 1
        if has_rpb:
            rpb_shape = b("Shape", "RPB")
            table = b("Reshape", b("Cast", "RPB", to=TensorProto.FLOAT),
                      b("Concat", b("Slice", rpb_shape, zero, one), last, span, axis=0))  # [H, R_lead, R_z]
            lead_table = b("Gather", table, rel, axis=1)                                 # [H, Nl, Kl, R_z]
        else:
            lead_table = b("Expand", b.const([0.0], np.float32),
                           b("Concat", one, b("Shape", valid), span, axis=0))            # [1, Nl, Kl, R_z]
        lead_table = b("Where", b("Unsqueeze", valid, b.const([0, 3])), lead_table, masked)  # causal lead axes
        outside = b("Expand", masked, b("Concat", b("Slice", b("Shape", lead_table), zero, b.const([3])), one,
                                        axis=0))
        lead_table = b("Transpose", b("Concat", lead_table, outside, axis=3), perm=[0, 1, 3, 2])
        column = b("Reshape", b("Where", band, rel_z, span), b.const([-1, 1]))         # [nb*T*W, 1]
        columns = b("Range", b.const(0), b("Squeeze", b("Add", span, one), zero), b.const(1))
        one_hot = b("Cast", b("Equal", column, b("Unsqueeze", columns, zero)), to=TensorProto.FLOAT)
        bias = b("MatMul", one_hot, lead_table)                                          # [H, Nl, nb*T*W, Kl]
        bias = b("Reshape", bias, b("Concat", b.const([0, 0]), n_blocks, tile, width, last, axis=0))
        # To the scores' (nb, Nl) batch and (kl, w) key order; with a static grid ONNX Runtime folds
        # all of this at session creation.
        bias = b("Reshape", b("Transpose", bias, perm=[0, 2, 1, 3, 5, 4]), b.const([0, 0, 0, 0, -1]))
        bias = b("CastLike", bias, "Q")                                                   # [H, nb, Nl, T, Kl*W]
        out = b("MatMul", b("Softmax", b("Add", scores, bias), axis=-1), v_blocks)       # [B, H, nb, Nl, T, Dv]
        # Back to [B, H, Nl, Z, Dv]: query z of lead row n is row (block(z), n, z - q0[block(z)]).
        out_index = b("Add", b("Unsqueeze", b("Mul", b("Mul", out_block, n_lead), tile), zero),
                      b("Unsqueeze", b("Add", b("Mul", lead_range, tile), zero), one))     # [Nl, Z] (partial)
        out_index = b("Add", out_index, b("Unsqueeze", b("Sub", z_range, b("Gather", q0, out_block)), zero))
        out = b("Gather", b("Reshape", out, b("Concat", b.const([0, 0, -1]), v_dim, axis=0)), out_index, axis=2)

    out_shape = b("Concat", b.const([0, 0]), b("Slice", grid_d, zero, last), v_dim, axis=0)
    b.nodes.append(helper.make_node("Reshape", [out, out_shape], ["O"]))

    inputs = ["Q", "K", "V"] + (["RPB"] if has_rpb else [])
    fn = helper.make_function(DOMAIN, OP_TYPE, inputs, ["O"], b.nodes,
                              [helper.make_opsetid("", opset)],
                              attributes=["kernel_size", "dilation", "is_causal", "stride", "scale"]
                              + (["grid"] if static_grid else []))
    fn.overload = overload_name(ndim, has_rpb, static_grid)
    fn.doc_string = f"NeighborhoodAttention on a {ndim}-D grid{' with RPB' if has_rpb else ''} (windowed)."
    return fn


def make_node(inputs: Sequence[str], outputs: Sequence[str], name: str, *, kernel_size, ndim: int | None = None,
              dilation=None, is_causal=None, stride=None, scale: float = 0.0, grid=None) -> onnx.NodeProto:
    """A ``NeighborhoodAttention`` node; ``inputs`` is ``[Q, K, V]`` or ``[Q, K, V, RPB]``.

    ``ndim`` (grid rank) defaults to ``len(kernel_size)``; with ``grid`` (the static grid sizes,
    which must equal Q's) it selects the ``*_static`` function overload.

    Raises:
        ValueError: a ``stride`` outside ``1..kernel_size``, or one other than 1 with an RPB input.
    """
    ndim = ndim or len(kernel_size)
    has_rpb = len(inputs) > 3 and bool(inputs[3])
    ks = _per_axis(kernel_size, ndim, 1)
    node = helper.make_node(
        OP_TYPE, list(inputs), list(outputs), name=name, domain=DOMAIN,
        kernel_size=ks, dilation=_per_axis(dilation, ndim, 1), is_causal=_per_axis(is_causal, ndim, 0),
        stride=strides(stride, ks, has_rpb), scale=float(scale))
    if grid is not None:
        node.attribute.append(helper.make_attribute("grid", [int(g) for g in grid]))
    node.overload = overload_name(ndim, has_rpb, grid is not None)
    return node


def add_to_model(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Attach the function overload ``node`` needs (and the opsets it uses) to ``model``."""
    from attnc.passes.core import add_function

    ndim = len(next(a.ints for a in node.attribute if a.name == "kernel_size"))
    # The body reads every per-axis attribute; a node written before ``stride`` existed lacks it.
    present = {a.name for a in node.attribute}
    for name, default in (("dilation", 1), ("is_causal", 0), ("stride", 1)):
        if name not in present:
            node.attribute.append(helper.make_attribute(name, [default] * ndim))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), OPSET)
    static = any(a.name == "grid" for a in node.attribute)
    has_rpb = len(node.input) > 3 and bool(node.input[3])
    node.overload = overload_name(ndim, has_rpb, static)
    add_function(model, function_proto(ndim, has_rpb, max(opset, 15), static))
