"""Walking Q, K and V back from the attention core through the data-movement ops to their head split and projection,
tracking the heads axis: the columns each head owns, grouped-query repeats, ranges of heads, and the shape entries
that write the head count out."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np

from attnc.passes.core import constant_value, depends_on_data, evaluate_tensors, fixed_value, producers, same_dim
from attnc.passes.prune_heads.model import _HeadSplit, _Projection, _Repeat, _Unrecognised
from attnc.passes.prune_heads.projection import _ELEMENTWISE, _UNARY, _projection
from attnc.passes.prune_heads.shapes import (_attr, _axes, _dim_at, _dim_name, _entry_keeps, _rank, _reshape_target,
                                             _shape_entries, _shape_input, _shapes, _split_sizes)

# Reductions over the head dim that keep it (a per-head norm's mean): passed on the Q/K/V path.
_HEAD_DIM_REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceSumSquare")


@dataclass
class _Walk:
    """Where one of Q/K/V comes from: its head split and projection, the repeat of its heads
    (grouped-query K/V) and each tensor on the way with its heads axis."""

    split: _HeadSplit
    proj: _Projection
    repeat: _Repeat | None
    path: dict[str, int]
    # Positions on the head split's last (within-head) axis that reach the core, where known:
    # GPT-NeoX cuts Q, K and V out of one [.., H, 3·D] split by slices of that axis.
    used: np.ndarray | None = None
    # (first, count) of the split's heads this role takes when a Slice or GatherND of the heads axis
    # picks a range of them (Falcon: Q = heads[:-2], K = heads[[-2]], V = heads[[-1]]), else None.
    heads_range: tuple[int, int] | None = None
    # Reshapes that regroup the axes inside each head and write the head count out: (node, heads
    # axis, the head count there: the query heads' or the K/V heads'); also the Expand / ConstantOfShape
    # making a part shared by all the heads (:class:`_Shared`): (node, entry of its shape, the count).
    regroups: list[tuple[str, int, int]] = field(default_factory=list)
    # Head entries computed at run time of the shapes those make: (node, the entry as _shape_entries reads it),
    # checked to follow the heads of a tensor on the path (:func:`_follows_heads`).
    follows: list[tuple[str, Any]] = field(default_factory=list)
    # Graph inputs and outputs holding the heads on the way: the inputs concatenated in front of the new tokens (a
    # generation step's KV cache, :func:`_cache_concat`), the graph outputs on the path (its new cache): (name, heads
    # axis, whether the walk had passed a repeat of the heads there, i.e. whether it holds the K/V heads).
    interface: list[tuple[str, int, bool]] = field(default_factory=list)


@dataclass
class _Shared:
    """A branch of a walk that carries no head's own values: a tensor without heads broadcast into every head
    by ``Expand`` (DeepSeek-V3's rotary key, one per token, in every head's key), or a ``ConstantOfShape`` (the
    empty key that part is written into). Only the head entries of the shapes it is made with change on
    pruning (``regroups``, ``follows`` as in :class:`_Walk`)."""

    regroups: list[tuple[str, int, int]] = field(default_factory=list)
    follows: list[tuple[str, Any]] = field(default_factory=list)
    interface: list[tuple[str, int, bool]] = field(default_factory=list)
    # Where it is a tensor of one head broadcast by Expand: the walk of that tensor as the one head of its own,
    # which it is where no other branch has heads (a layer pruned to one head; K/V of one head expanded).
    as_one_head: Callable[[], _Walk | _Shared] | None = field(default=None, repr=False)

    def resolved(self) -> _Walk | _Shared:
        """The walk of the one head it may be (``as_one_head``), else itself."""
        if self.as_one_head is None:
            return self
        try:
            walk = self.as_one_head()
        except _Unrecognised:
            return self
        walk.regroups = self.regroups + walk.regroups
        walk.follows = self.follows + walk.follows
        walk.interface = self.interface + walk.interface
        return walk


def _trace_input(model, t, prod, cons) -> tuple[_HeadSplit, _Projection]:
    """Walk a heads-first ``[B, H, ..., D]`` tensor back to its head split and projection."""
    walk = _projected_walk(_walk_back(model, t, prod), t)
    return walk.split, walk.proj


def _projected_walk(walk: _Walk | _Shared, t: str) -> _Walk:
    """``walk``, unless all that ``t`` carries is shared by the heads (no projection columns of its own)."""
    walk = walk.resolved() if isinstance(walk, _Shared) else walk
    if isinstance(walk, _Shared):
        raise _Unrecognised(f"{t}: every head's values are one tensor without heads broadcast into all of them "
                            "(no per-head projection columns)")
    return walk


def _walk_back(model, t, prod, head_axis: int = 1, fixed: dict[int, int] | None = None,
               path: dict[str, int] | None = None, budget: list[int] | None = None,
               used: np.ndarray | None | str = "start") -> _Walk | _Shared:
    """Walk ``t`` (heads on ``head_axis``) back to its head-split Reshape and projection.

    Besides the data movement of the head split, it passes the ops that act within each head:
    unary ops (``_UNARY``), ``Slice``/``Split``/``Concat`` on the last (head-dim) axis, reductions
    over that axis (a per-head RMSNorm: Qwen3's ``q_norm``), and elementwise ``Add``/``Sub``/
    ``Mul``/``Div``/``Pow`` whose other operand is a table constant over the heads axis (rotary
    embeddings: ``q·cos + rotate_half(q)·sin``; the norm's weight ``[D]``). Where several inputs carry
    the data (the two rotary terms, the halves of ``rotate_half``), each is walked and all must
    reach the same head split with the same columns. A ``Reshape`` of an ``Expand``/``Tile`` of
    an ``Unsqueeze`` next to the heads is grouped-query attention's repeat of the K/V heads. A write of
    a range of the head dim (:func:`_slice_write`) is walked like a Concat of its parts; a part that is
    an ``Expand`` of a tensor without heads or a ``ConstantOfShape`` is a :class:`_Shared` branch.
    ``fixed`` holds the q/k/v slot selected on an axis (fused ``qkv``).
    """
    fixed = dict(fixed or {})
    path = {} if path is None else path
    # nodes walked over all branches: TorchScript's eager Qwen3 takes ~60 (its q_norm, both rotary terms, the
    # repeat of the K/V heads, each op spelled out)
    budget = [96] if budget is None else budget
    repeat = None
    regroups: list[tuple[str, int, int]] = []
    heads_range = None   # (first, count) within the current tensor's heads axis
    # ``used``: "start" (all of the current tensor's last axis: nothing cut yet), positions, or None
    # (unknown). Kᵀ reaches the core transposed, so "start" is resolved at the first cut.

    def resolve(used, tensor):
        if not isinstance(used, str):
            return used
        last_dim = _last_dim(model, tensor)
        return np.arange(last_dim) if last_dim else None

    follows: list[tuple[str, Any]] = []
    interface: list[tuple[str, int, bool]] = []
    outputs = {o.name for o in model.graph.output}

    def done(walk: _Walk | _Shared) -> _Walk | _Shared:
        walk.regroups = regroups + walk.regroups
        walk.follows = follows + walk.follows
        walk.interface = interface + walk.interface
        if isinstance(walk, _Shared):
            if repeat is not None or heads_range is not None:
                raise _Unrecognised(f"{t}: a part shared by all the heads behind a repeat or a range of the heads")
            return walk
        if repeat is not None and walk.repeat is not None:
            raise _Unrecognised(f"{repeat.reshape}: the heads are repeated twice on the way to the core")
        walk.repeat = walk.repeat or repeat
        if heads_range is not None:
            if walk.heads_range is not None:
                raise _Unrecognised(f"{walk.split.node}: the heads are sliced twice on the way to the core")
            walk.heads_range = heads_range
        return walk

    while budget[0] > 0:
        budget[0] -= 1
        path[t] = head_axis
        if t in outputs:
            interface.append((t, head_axis, repeat is not None))
        node = prod.get(t)
        if node is None:
            raise _Unrecognised(f"{t} is not produced by a projection")
        op = node.op_type
        rank = _rank(model, t)
        last = None if rank is None else rank - 1
        within_head = last is not None and last != head_axis and last not in fixed
        if op in _UNARY or (op == "Concat" and len(node.input) == 1):
            t = node.input[0]
        elif op in _HEAD_DIM_REDUCTIONS and within_head and _attr(node, "keepdims", 1) \
                and [a % rank for a in _axes(model, node, 1)] == [last]:
            used = "start"   # the whole head dim is read (an RMSNorm's mean square)
            t = node.input[0]
        elif op in _ELEMENTWISE:
            data = _data_operands(model, node, head_axis, rank)
            if len(data) == 1:
                t = data[0]
                continue
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget, used) for x in data]
            return done(_same_walks(node, walks))
        elif op == "Concat" and rank is not None and _attr(node, "axis", 0) % rank not in (head_axis, last, *fixed) \
                and (cache := _cache_concat(model, node, prod)) is not None:
            # concat(past, new) along the tokens (a generation step's KV cache): the past's heads are the new
            # tokens' heads, and pruning drops them from the cache input too (the step's interface)
            t, behind = cache
            for x in behind:
                path[x] = head_axis
            interface.append((behind[-1], head_axis, repeat is not None))
        elif op == "Concat":
            if not within_head or _attr(node, "axis", 0) % rank != last:
                raise _Unrecognised(f"{node.name}: Concat on the Q/K/V path is not along the head dim (last axis)")
            if any(constant_value(model, x) is not None for x in node.input):
                raise _Unrecognised(f"{node.name}: Concat of a constant onto the Q/K/V heads")
            sizes = [_last_dim(model, x) for x in node.input]
            starts = np.cumsum([0] + sizes[:-1]) if all(isinstance(n, int) and n > 0 for n in sizes) else None
            used = resolve(used, t)
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget,
                                None if used is None or starts is None else
                                used[(used >= o) & (used < o + n)] - o)
                     for x, o, n in zip(node.input, starts if starts is not None else sizes, sizes)]
            return done(_same_walks(node, walks))
        elif op in ("Transpose", "ScatterND") and (write := _slice_write(model, node, prod)) is not None:
            # x[..., a:b] = y (DeepSeek-V3's key: its own part and the rotary part shared by the heads written
            # into an empty key): positions [a, b) of the head dim come from y, the others from x
            data, updates, a, b, perm = write
            if len(perm) != rank:
                raise _Unrecognised(f"{node.name}: the rank of the write on the Q/K/V path is not known")
            if perm[-1] != rank - 1 and not isinstance(used, str):
                used = None
            head_axis, fixed = perm[head_axis], {perm[axis]: i for axis, i in fixed.items()}
            if head_axis == rank - 1 or rank - 1 in fixed:
                raise _Unrecognised(f"{node.name}: a write into the last axis, which is not the head dim, on the Q/K/V "
                                    "path")
            used = resolve(used, data)
            parts = [(data, None if used is None else used[(used < a) | (used >= b)]),
                     (updates, None if used is None else used[(used >= a) & (used < b)] - a)]
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget, part) for x, part in parts]
            return done(_same_walks(node, walks))
        elif op in ("Expand", "ConstantOfShape"):
            # a shape that holds the heads: its entry there is rewritten or follows them (_head_entry)
            if (found := _head_entry(model, node, head_axis, rank, prod)) is not None:
                j, entry = found
                if isinstance(entry, int) and not isinstance(entry, bool) and entry > 1:
                    regroups.append((node.name, j, entry))
                elif entry != 1:
                    follows.append((node.name, entry))
            x = node.input[0]
            if op == "ConstantOfShape" or (at_heads := _dim_at(_shapes(model).get(x), head_axis, rank)) == "absent":
                return done(_Shared())   # one value everywhere, or a tensor without heads broadcast into all of them
            if at_heads == 1:   # the same, or one head (:meth:`_Shared.resolved`)
                return done(_Shared(as_one_head=lambda x=x, axis=head_axis, fixed=dict(fixed), used=used: _walk_back(
                    model, x, prod, axis, fixed, path, budget, used)))
            width = _last_dim(model, x)
            if _rank(model, x) != rank or not isinstance(used, str) and (width is None or width != _last_dim(model, t)):
                raise _Unrecognised(f"{node.name}: Expand on the Q/K/V path that is not of the batch or token axes")
            t = x
        elif op == "Transpose":
            perm = list(_attr(node, "perm"))
            if perm[-1] != len(perm) - 1 and not isinstance(used, str):
                used = None
            head_axis = perm[head_axis]
            fixed = {perm[a]: i for a, i in fixed.items()}
            t = node.input[0]
        elif op == "Squeeze":
            axes = _axes(model, node, 1)
            in_shape = _shapes(model).get(node.input[0])
            if not in_shape:
                raise _Unrecognised(f"{node.name}: Squeeze input rank unknown")
            in_rank = len(in_shape)
            axes = sorted(a % in_rank for a in axes)
            kept = [a for a in range(in_rank) if a not in axes]
            head_axis = kept[head_axis]
            fixed = {kept[a]: i for a, i in fixed.items()}
            for a in axes:
                fixed.setdefault(a, 0)
            t = node.input[0]
        elif op == "Slice":
            axes = constant_value(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is not None and within_head and all(int(a) % rank == last for a in axes):
                # a range of the head dim (rotate_half; GPT-NeoX's q/k/v): starts may be computed (D // 2)
                used = _shift_used(model, resolve(used, t), node.input[1], node.input[4] if len(node.input) > 4 else "",
                                   _last_dim(model, node.input[0]))
                t = node.input[0]
                continue
            starts = constant_value(model, node.input[1])
            ends = constant_value(model, node.input[2])
            if starts is None or ends is None or (len(node.input) > 4 and node.input[4]
                                                   and np.any(constant_value(model, node.input[4]) != 1)):
                raise _Unrecognised(f"{node.name}: non-constant or strided Slice on the Q/K/V path")
            axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
            for a, s, e in zip(axes, starts, ends):
                if a < 0:
                    if rank is None:
                        raise _Unrecognised(f"{node.name}: negative Slice axis on the Q/K/V path, rank unknown")
                    a %= rank
                if a == head_axis and heads_range is None and not fixed:
                    n = _dim_name(model, node.input[0], a)
                    heads_range = _heads_range(node, n, int(s), (int(e) if e < (n or 0) or e < 0 else None))
                    continue
                if a == head_axis or e - s != 1:
                    raise _Unrecognised(f"{node.name}: Slice of more than one slot (axis {a})")
                fixed[a] = fixed.get(a, 0) + int(s)
            t = node.input[0]
        elif op == "Gather" and heads_range is None and not fixed and _attr(node, "axis", 0) % (rank or 1) == head_axis \
                and (idx := constant_value(model, node.input[1])) is not None and idx.ndim == 1 and idx.size \
                and np.all(np.diff(idx) == 1):
            # x[:, :, [-2]] on the heads axis (Falcon's K and V under TorchScript): a range of the heads
            heads_range = _indexed_heads(node, _dim_name(model, node.input[0], head_axis), idx)
            t = node.input[0]
        elif op == "Gather":
            idx = constant_value(model, node.input[1])
            if idx is None or idx.ndim != 0:
                raise _Unrecognised(f"{node.name}: Gather on the Q/K/V path is not a constant scalar index")
            a = _attr(node, "axis", 0)
            if a < 0:
                if rank is None:
                    raise _Unrecognised(f"{node.name}: negative Gather axis on the Q/K/V path, rank unknown")
                a %= rank + 1   # the scalar index drops the axis: the input has one more
            shift = lambda x: x + 1 if x >= a else x  # noqa: E731
            head_axis = shift(head_axis)
            fixed = {shift(x): i for x, i in fixed.items()}
            fixed[a] = int(idx)
            t = node.input[0]
        elif op == "GatherND" and head_axis == 0 and heads_range is None and not fixed:
            # x[[i, ...]] on a leading heads axis (Falcon's K and V): rows of axis 0
            idx = constant_value(model, node.input[1])
            if idx is None or _attr(node, "batch_dims", 0) or idx.ndim != 2 or idx.shape[1] != 1 \
                    or np.any(np.diff(idx[:, 0]) != 1):
                raise _Unrecognised(f"{node.name}: GatherND on the Q/K/V path is not a range of the heads")
            heads_range = _indexed_heads(node, _dim_name(model, node.input[0], 0), idx[:, 0])
            t = node.input[0]
        elif op == "Split":
            if rank is None:
                raise _Unrecognised(f"{node.name}: Split on the Q/K/V path, rank unknown")
            a = _attr(node, "axis", 0) % rank   # (ModernBERT's unbind(dim=-3) under TorchScript)
            if within_head and a == last:
                sizes = _split_sizes(model, node)   # halves of the head dim (rotate_half written with chunk)
                j = list(node.output).index(t)
                used = resolve(used, t)
                used = None if used is None or sizes is None else used + int(sum(sizes[:j]))
                t = node.input[0]
                continue
            sizes = _split_sizes(model, node)
            j = list(node.output).index(t)
            if sizes is None or a == head_axis or sizes[j] != 1:
                raise _Unrecognised(f"{node.name}: Split on the Q/K/V path is not a per-slot split")
            fixed[a] = fixed.get(a, 0) + int(sum(sizes[:j]))
            t = node.input[0]
        elif op == "Unsqueeze" and rank is not None and not fixed and head_axis < rank - 1 and \
                [a % rank for a in _axes(model, node, 1)] == [head_axis]:
            # the heads axis made here: one head owning the input's channels (GPT-BigCode's multi-query
            # K/V, cut from c_attn(x).unsqueeze(1) by a Split of the channels, walked as `used`)
            if used is None:
                raise _Unrecognised(f"{node.name}: which channels of the one head it makes reach the core is not known")
            split = _HeadSplit(node.name, head_axis, [1, _channel_count(model, node)], 0)
            proj = _projection(model, node.input[0], np.arange(split.rest[1])[None, :], prod)
            return done(_Walk(split, proj, None, path, None if isinstance(used, str) else used))
        elif op == "Unsqueeze" and rank is not None and all(
                a % rank > head_axis for a in _axes(model, node, 1)) and all(a < head_axis for a in fixed):
            used = None   # a new axis inside the head (GPT-J's interleaved rotary stacks its two halves)
            t = node.input[0]
        elif op == "Reshape" and not any(a > head_axis for a in fixed) and \
                (verdict := _PROVEN_REGROUPS.get(node.name) or _regroups_head(model, node, head_axis, prod)):
            used = None   # [.., H, D/2, 2] -> [.., H, D] (GPT-J's rotate_every_two flattens its pairs)
            if verdict == "written":
                count = _dim_name(model, node.input[0], head_axis)
                if not isinstance(count, int) or count <= 0:
                    raise _Unrecognised(f"{node.name}: the head count its target writes out is not known")
                regroups.append((node.name, head_axis, count))
            t = node.input[0]
        elif op == "Reshape":
            found = _repeat_of_heads(model, node, head_axis, fixed, prod)
            if found is None:
                split, proj = _head_split(model, node, head_axis, fixed, prod)
                return done(_Walk(split, proj, None, path, None if isinstance(used, str) else used))
            if repeat is not None:
                raise _Unrecognised(f"{node.name}: the heads are repeated twice on the way to the core")
            repeat, t = found
        elif op == "ScatterND":
            raise _Unrecognised(f"{node.name}: ScatterND on the Q/K/V path that is not a write of a range of the head "
                                "dim (x[..., a:b] = y, with indices that are that range, constant over the input "
                                "sizes)")
        else:
            raise _Unrecognised(f"{node.name}: {op} on the Q/K/V path")
    raise _Unrecognised(f"{t}: Q/K/V path too long")


def _cache_concat(model, node, prod) -> tuple[str, list[str]] | None:
    """``(new, [tensors])`` where ``node`` concatenates ``new`` and one graph input, the latter reached through
    ``Identity`` or one-input ``Concat`` (``[tensors]``: those, the graph input last; TorchScript keeps
    transformers' ``cat([empty, past])`` of a ``DynamicCache`` that way): a generation step's
    ``concat(past_key_values.N.key, k)``; else None. The concat's axis is checked by the caller."""
    inputs = {i.name for i in model.graph.input} - {i.name for i in model.graph.initializer}
    found, computed = [], []
    for x in node.input:
        chain = [x]
        while (p := prod.get(chain[-1])) is not None and (p.op_type == "Identity" or
                                                          p.op_type == "Concat" and len(p.input) == 1):
            chain.append(p.input[0])
        (found if chain[-1] in inputs else computed).append(chain)
    if len(found) != 1 or len(computed) != 1:
        return None
    return computed[0][0], found[0]


def _slice_write(model, node, prod) -> tuple[str, str, int, int, list[int]] | None:
    """``(x, y, a, b, perm)`` where ``node``'s output is ``x`` with the range ``[a, b)`` of its last axis replaced by
    ``y`` (``x[..., a:b] = y``), transposed by ``perm`` (output axis ``i`` is axis ``perm[i]`` of ``x``), as exporters
    write it with ``ScatterND``, else None:

    - the dynamo exporter: ``Transpose(ScatterND(Transpose(x, p), i, Transpose(y, p)), q)`` where ``p`` brings the
      last axis to the front and the indices ``i`` ``[b - a, 1]`` are ``a, a + 1, ..`` (constant over the input sizes);
      ``q`` undoes ``p``, or does that and a transpose after it (``k.transpose(-1, -2)``): ``perm`` is ``p`` then ``q``;
    - TorchScript: ``ScatterND(x, i, y)`` whose indices are the full grid of ``x[..., a:b]``'s positions (evaluated at
      two input sizes: computed from shapes at run time, they follow pruned heads). Its ``y`` is a ``Reshape`` of
      ``Expand(y', Shape(x[..., a:b]))`` to the grid's shape, which is ``y'`` broadcast to ``x[..., a:b]``'s shape (the
      shapes agree whenever ScatterND runs): the returned ``y`` is then that ``Expand``."""
    if node.op_type == "Transpose":
        scatter = prod.get(node.input[0])
        if scatter is None or scatter.op_type != "ScatterND" or _attr(scatter, "reduction", b"none") not in (
                "none", b"none"):
            return None
        inner = [prod.get(scatter.input[i]) for i in (0, 2)]
        if any(n is None or n.op_type != "Transpose" for n in inner):
            return None
        q, p = list(_attr(node, "perm")), list(_attr(inner[0], "perm"))
        if list(_attr(inner[1], "perm")) != p or len(q) != len(p) or p[0] != len(p) - 1:
            return None
        index = fixed_value(model, scatter.input[1])
        width = _dim_name(model, inner[0].input[0], -1)
        if index is None or index.ndim != 2 or index.shape[1] != 1 or not index.size or not isinstance(width, int) \
                or np.any(np.diff(index[:, 0]) != 1) or not 0 <= index[0, 0] <= index[-1, 0] < width:
            return None
        return inner[0].input[0], inner[1].input[0], int(index[0, 0]), int(index[-1, 0]) + 1, [p[j] for j in q]
    if node.op_type != "ScatterND" or _attr(node, "reduction", b"none") not in ("none", b"none"):
        return None
    x, indices, y = node.input
    if depends_on_data(model, indices):
        return None
    try:
        runs = evaluate_tensors(model, [indices, x])
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        return None
    ranges = set()
    for run in runs:
        index, shape = run[indices], run[x].shape
        rank = len(shape)
        if index.ndim != rank + 1 or index.shape[-1] != rank or index.shape[:-2] != shape[:-1] or not index.size:
            return None
        a, n = int(index.reshape(-1, rank)[0, -1]), index.shape[-2]
        grid = np.indices((*shape[:-1], n))
        grid[-1] += a
        if not 0 <= a <= a + n <= shape[-1] or not np.array_equal(index, np.moveaxis(grid, 0, -1)):
            return None
        ranges.add((a, a + n))
    if len(ranges) != 1:
        return None
    a, b = ranges.pop()
    reshape = prod.get(y)
    expand = prod.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    shape = prod.get(expand.input[1]) if expand is not None and expand.op_type == "Expand" else None
    part = prod.get(shape.input[0]) if shape is not None and shape.op_type == "Shape" and \
        _attr(shape, "start", 0) == 0 and _attr(shape, "end") is None else None
    if part is not None and part.op_type == "Slice" and part.input[0] == x and \
            _last_axis_range(model, part) == (a, b):
        y = expand.output[0]
    return x, y, a, b, list(range(len(_shapes(model).get(x) or [])))


def _last_axis_range(model, node) -> tuple[int, int] | None:
    """``(start, stop)`` of a step-1 ``Slice`` of only the last axis of a tensor whose last axis has a static size,
    clipped to it; else None."""
    rank, width = _rank(model, node.input[0]), _dim_name(model, node.input[0], -1)
    bounds = [constant_value(model, node.input[i]) if len(node.input) > i and node.input[i] else None
              for i in range(1, 5)]
    if rank is None or not isinstance(width, int) or any(b is None for b in bounds[:3]) or bounds[2].size != 1 \
            or int(bounds[2].reshape(-1)[0]) % rank != rank - 1 or bounds[3] is not None and np.any(bounds[3] != 1):
        return None
    start, stop = (int(b.reshape(-1)[0]) for b in bounds[:2])
    start, stop = (min(max(v + width if v < 0 else v, 0), width) for v in (start, stop))
    return start, stop


def _head_entry(model, node, head_axis: int, rank: int | None, prod) -> tuple[int, Any] | None:
    """``(index, entry)`` at the heads axis of the shape an ``Expand`` broadcasts to or a ``ConstantOfShape`` makes
    (:func:`_shape_entries`' reading), or None where an ``Expand``'s shorter shape does not reach the heads."""
    entries = _shape_entries(model, node.input[_shape_input(node)], prod)
    if entries is None or rank is None:
        raise _Unrecognised(f"{node.name}: the shape it makes on the Q/K/V path cannot be read")
    j = head_axis - (rank - len(entries))
    if node.op_type == "ConstantOfShape" and len(entries) != rank:
        raise _Unrecognised(f"{node.name}: makes {len(entries)} axes where the Q/K/V path has {rank}")
    return (j, entries[j]) if j >= 0 else None


def _follows_heads(model, entry, path: dict[str, int], prod) -> bool:
    """Whether a shape ``entry`` (:func:`_shape_entries`) is the head count of a tensor on a role's ``path``
    (``{tensor: heads axis}``): that dim read from such a tensor, or from a ``Slice`` of it that leaves the heads
    alone, or from a dim that inference names as the heads of a tensor on the path."""
    if not isinstance(entry, tuple) or entry[0] != "dim":
        return False
    t, axis = entry[1], entry[2]
    while (node := prod.get(t)) is not None and node.op_type == "Slice" and len(node.input) > 3 and \
            (axes := constant_value(model, node.input[3])) is not None and (rank := _rank(model, t)) and \
            axis not in [int(a) % rank for a in axes.reshape(-1)]:
        t = node.input[0]
    if path.get(t) == axis:
        return True
    name = _dim_name(model, t, axis)
    return isinstance(name, str) and bool(name) and any(_dim_name(model, p, a) == name for p, a in path.items())


def _channel_count(model, unsqueeze) -> int:
    """The static channel count (last axis) of the input of an Unsqueeze that makes a single-head axis."""
    channels = _last_dim(model, unsqueeze.input[0])
    if channels is None:
        raise _Unrecognised(f"{unsqueeze.name}: the channel count of the single head it makes is not known")
    return channels


# Reshapes a layer's trace proved to regroup within each head and write the head count out (its ``head_regroups``),
# set while the pruned graph is traced again: its shapes, inferred afresh, may no longer prove it (a shape the token
# exit computed, sliced by the rewrite, reads no token count), and the rewrite wrote the count it reads.
_PROVEN_REGROUPS: dict[str, str] = {}


def _regroups_head(model, reshape, head_axis: int, prod) -> str | None:
    """Whether ``reshape`` keeps every axis up to the heads (and maybe more) and only regroups the last
    ones, each head's elements staying in that head (``[.., H, D/2, 2] -> [.., H, D]``; or none: Falcon's
    shape-keeping ``reshape(B, H, S, D)`` of Q under TorchScript): ``"follows"`` when its
    target reads the head count (-1, 0, the input's dim), ``"written"`` when it holds it as a constant
    (rewritten on pruning), else None. A leading axis is kept when inference names it alike on both
    sides, or the target copies it (0), reads it from the input or from a dim of the same name, or
    writes the input's static size; the regrouped sizes are static (one may be -1)."""
    shapes = _shapes(model)
    src = shapes.get(reshape.input[0])
    entries = _shape_entries(model, reshape.input[1], prod)
    if not src or not entries or len(src) <= head_axis + 1 or len(entries) <= head_axis + 1:
        return None
    dst = shapes.get(reshape.output[0]) or [None] * len(entries)

    def kept(a) -> bool:
        return same_dim(src[a], dst[a]) or (entries[a] == 0 and not _attr(reshape, "allowzero", 0)) or \
            _entry_keeps(model, reshape, entries[a], a, src[a])

    # the kept leading axes: up to the heads, then any more (Cohere regroups [B, H, S, D/2, 2] after S)
    k = head_axis + 1
    while k < min(len(src), len(entries)) - 1 and kept(k):
        k += 1
    inner_src, inner_dst = src[k:], entries[k:]
    if not all(isinstance(d, int) and d > 0 for d in inner_src) or \
            not all(isinstance(e, int) and not isinstance(e, bool) and (e > 0 or e == -1) for e in inner_dst) or \
            sum(e == -1 for e in inner_dst) > 1 or \
            (-1 not in inner_dst and int(np.prod(inner_src)) != int(np.prod(inner_dst))) or \
            not all(kept(a) for a in range(head_axis)):
        return None
    entry = entries[head_axis]
    if entry == 0 and not _attr(reshape, "allowzero", 0) or entry == -1 and -1 not in inner_dst or \
            entry == ("dim", reshape.input[0], head_axis):
        return "follows"
    return "written" if kept(head_axis) and isinstance(entry, int) and not isinstance(entry, bool) else None


def _heads_range(node, n, start: int, end: int | None) -> tuple[int, int]:
    """``(first, count)`` of the heads a Slice / GatherND takes from a heads axis of static size ``n``
    (``end`` None: to the end). Only bounds counted from the ends are taken (``start`` 0 or
    negative, ``end`` negative or the end): they still pick the same heads once pruning shrinks
    the axis (Falcon's ``[:-2]``, ``[[-2]]``, ``[[-1]]``)."""
    if not isinstance(n, int) or n <= 0 or start > 0 or (end is not None and end >= 0):
        raise _Unrecognised(f"{node.name}: {node.op_type} [{start}:{end}] of the heads axis is not counted from its "
                            "ends (or the axis size is unknown)")
    first, stop = start % n if start < 0 else 0, n if end is None else end + n
    if stop <= first:
        raise _Unrecognised(f"{node.name}: empty {node.op_type} of the heads axis")
    return first, stop - first


def _indexed_heads(node, n, index: np.ndarray) -> tuple[int, int]:
    """:func:`_heads_range` of the consecutive indices ``index`` of a heads axis of size ``n``."""
    first, count = int(index[0]), int(index.size)
    return _heads_range(node, n, first, first + count if first + count < 0 else None)


def _restrict_heads(walk: _Walk) -> None:
    """Keep the projection rows of the heads a role takes from a shared split (``heads_range``)."""
    if walk.heads_range is None:
        return
    first, count = walk.heads_range
    if first + count > walk.proj.columns.shape[0]:
        raise _Unrecognised(f"{walk.split.node}: the heads range reaches outside the split's heads")
    if walk.proj.norm is not None:
        raise _Unrecognised(f"{walk.split.node}: a norm across the heads in front of the head split covers heads "
                            "that other roles take")
    walk.proj = replace(walk.proj, columns=walk.proj.columns[first:first + count])


def _restrict_columns(walk: _Walk) -> None:
    """Keep the projection columns of the within-head positions that reach the core (``walk.used``)
    when the split's columns per head are its last axis (``[.., H, 3·D]``: GPT-NeoX's q, k and v)."""
    used, columns = walk.used, walk.proj.columns
    if used is None or len(used) == columns.shape[1] or walk.split.rest[-1] != columns.shape[1] \
            or walk.split.head_pos == len(walk.split.rest) - 1:
        return
    if used.min() < 0 or used.max() >= columns.shape[1]:
        raise _Unrecognised(f"{walk.split.node}: within-head slices reach outside the head")
    if walk.proj.norm is not None:
        raise _Unrecognised(f"{walk.split.node}: a norm across the heads in front of the head split covers channels "
                            "that other roles take")
    walk.proj = replace(walk.proj, columns=columns[:, used])


def _same_walks(node, walks: list[_Walk | _Shared]) -> _Walk | _Shared:
    """The one walk that every data input of ``node`` took (besides parts shared by all the heads:
    :class:`_Shared`), or ``_Unrecognised``."""
    if all(isinstance(w, _Shared) for w in walks):
        walks = [w.resolved() for w in walks]
    shared = [w for w in walks if isinstance(w, _Shared)]
    walks = [w for w in walks if not isinstance(w, _Shared)]
    if not walks:
        return _Shared([r for w in shared for r in w.regroups], [f for w in shared for f in w.follows],
                       [c for w in shared for c in w.interface])
    first = walks[0]
    for other in walks[1:]:
        same_repeat = (first.repeat is None) == (other.repeat is None) and \
            (first.repeat is None or first.repeat.reshape == other.repeat.reshape)
        if other.split.node != first.split.node or other.proj.matmul != first.proj.matmul \
                or not np.array_equal(other.proj.columns, first.proj.columns) or not same_repeat \
                or other.heads_range != first.heads_range:
            raise _Unrecognised(f"{node.name}: its inputs come from different heads or projections "
                                f"({first.split.node} and {other.split.node})")
    first.regroups = list(dict.fromkeys(r for w in walks + shared for r in w.regroups))
    first.follows = [f for w in walks + shared for f in w.follows]
    first.interface = list(dict.fromkeys(c for w in walks + shared for c in w.interface))
    if any(w.used is None for w in walks):
        first.used = None
    else:
        first.used = np.unique(np.concatenate([w.used for w in walks]))
    return first


def _shift_used(model, used, starts: str, steps: str, size) -> np.ndarray | None:
    """``used`` positions of a last-axis Slice's output as positions of its input (``+ start``);
    None where the start is not a constant or the step is not 1."""
    start = fixed_value(model, starts) if used is not None else None   # GPT-NeoX's chunk under TorchScript
    if used is None or start is None or start.size != 1 or (steps and np.any(constant_value(model, steps) != 1)):
        return None
    start = int(start.reshape(-1)[0])
    if start < 0:
        if not isinstance(size, int):
            return None
        start += size
    return used + start


def _data_operands(model, node, head_axis: int, rank: int | None) -> list[str]:
    """The inputs of an elementwise ``node`` on the Q/K/V path that carry the heads.

    The others are tables and must be constant over the heads axis: size 1 there (or
    broadcast), seen in the inferred shapes or, for a table computed from the input shapes
    only (rotary cos/sin from positions), in its value at two sequence lengths. A table computed
    from input values (a generation step's rotary angles, from the positions in its mask) is one
    of one entry on the heads axis where the output has more heads, or that reads no projection
    (:func:`_reads_projection`). A table with ``H`` entries on the heads axis (a per-head scale)
    is refused: slicing it is not done here.
    """
    if rank is None:
        raise _Unrecognised(f"{node.name}: rank of the {node.op_type} on the Q/K/V path is unknown")
    shapes = _shapes(model)
    out = shapes.get(node.output[0]) or []
    heads_out = out[head_axis] if len(out) == rank else None
    operands = []
    for x in node.input:
        value = constant_value(model, x)
        shape = list(value.shape) if value is not None else shapes.get(x)
        operands.append((x, value, shape, _dim_at(shape, head_axis, rank)))
    # an operand computed from the inputs' values with one entry on the heads axis is a table broadcast over them
    # where the output has more heads, or where it reads no projection, so no head's values: a generation step's
    # rotary table, computed from the positions in its mask (the head counts may be unknown, or one after pruning)
    data, tables = [], []
    for x, value, shape, at_heads in operands:
        if value is not None or not depends_on_data(model, x) or at_heads in ("absent", 1) and (
                isinstance(heads_out, int) and heads_out > 1 or not _reads_projection(model, x)):
            tables.append((x, shape, at_heads))
        else:
            data.append(x)
    if not data:
        raise _Unrecognised(f"{node.name}: no input of the {node.op_type} on the Q/K/V path carries the heads")
    for x, shape, at_heads in tables:
        if at_heads in ("absent", 1):
            continue
        if isinstance(at_heads, int):
            raise _Unrecognised(f"{node.name}: {node.op_type} by {x}, a table with {at_heads} entries on the heads "
                                "axis (only tables constant over the heads are passed)")
        if depends_on_data(model, x):
            raise _Unrecognised(f"{node.name}: cannot tell whether {x} is constant over the heads (its size there "
                                "is unknown and it is computed from the model's input values)")
        sizes = {_dim_at(list(r[x].shape), head_axis, rank) for r in evaluate_tensors(model, [x])}
        if not sizes <= {"absent", 1}:
            raise _Unrecognised(f"{node.name}: {node.op_type} by {x}, which is not constant over the heads axis")
    return data


def _reads_projection(model, t: str) -> bool:
    """Whether ``t`` is computed from a projection (``MatMul`` / ``Gemm`` by a constant weight, a ``Conv``) of any
    layer, through any inputs but those only read for their shape: whether it may carry heads' values, where a table
    of positions (rotary angles from position ids, a cached table gathered by them) does not; memoised per
    analysis."""
    memo = _shapes(model).setdefault("::reads a projection", {})
    if t not in memo:
        prod, seen, stack, found = producers(model), set(), [t], False
        while stack and not found:
            node = prod.get(stack.pop())
            if node is None or node.name in seen or node.op_type in ("Shape", "Size"):
                continue
            seen.add(node.name)
            found = node.op_type == "Conv" or node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and \
                constant_value(model, node.input[1]) is not None
            stack.extend(node.input)
        memo[t] = found
    return memo[t]


def _repeat_of_heads(model, reshape, head_axis: int, fixed, prod) -> tuple[_Repeat, str] | None:
    """``(repeat, the K/V tensor before it)`` if ``reshape`` merges a repeated axis into the heads
    axis (grouped-query attention), else ``None``.

    The pattern is ``Reshape(Expand|Tile(Unsqueeze(x, u)))`` with the new axis ``u`` next to the
    heads axis ``a`` of ``x`` and the Reshape's output of ``x``'s rank: ``u = a + 1`` gives each KV
    head's ``g`` copies one after the other (``repeat_kv``, ``repeat_interleave``: query head ``h``
    reads KV head ``h // g``), ``u = a`` tiles the KV heads (``h % H_kv``). The shape entries are
    checked against the head counts in :func:`_check_repeat`, once those are known.
    """
    src = prod.get(reshape.input[0])
    if src is None or src.op_type not in ("Expand", "Tile"):
        return None
    unsqueeze = prod.get(src.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    x = unsqueeze.input[0]
    rank, out_rank = _rank(model, x), _rank(model, reshape.output[0])
    axes = _axes(model, unsqueeze, 1)
    if rank is None or len(axes) != 1 or out_rank != rank or fixed:
        raise _Unrecognised(f"{reshape.name}: Reshape of {src.op_type}(Unsqueeze) on the Q/K/V path is not a "
                            "repeat of the heads that can be followed")
    u = axes[0] % (rank + 1)
    if u not in (head_axis, head_axis + 1):
        raise _Unrecognised(f"{reshape.name}: {src.op_type} repeats axis {u}, not next to the heads axis {head_axis}")
    kv_major = u == head_axis + 1
    kv_axis = head_axis if kv_major else head_axis + 1
    if src.op_type == "Tile":
        repeats = constant_value(model, src.input[1])
        if repeats is None or any(int(r) != 1 for j, r in enumerate(repeats) if j != u):
            raise _Unrecognised(f"{src.name}: Tile repeats {repeats} are not constant or tile more than the new axis")
        group, group_entry = int(repeats[u]), u
    else:
        entries = _shape_entries(model, src.input[1], prod)
        group = entries[u] if entries and len(entries) == rank + 1 and isinstance(entries[u], int) else None
        # Expand broadcasts from the right: a shorter shape vector holds axis u further left.
        length = len(entries) if entries is not None else (_shapes(model).get(src.input[1]) or [None])[0]
        group_entry = u - (rank + 1 - length) if isinstance(length, int) and u >= rank + 1 - length else None
    return _Repeat(src.name, reshape.name, kv_axis, head_axis, kv_major, group, group_entry), x


def _check_repeat(model, repeat: _Repeat, heads: int, kv_heads: int, path: dict[str, int], prod) -> None:
    """Check that pruning can follow ``repeat``: its group is ``heads / kv_heads`` and the
    Expand's KV-head entry and the Reshape's head entry are constants (rewritten on pruning)
    or read from the shape of a tensor on the K/V path (they follow by themselves)."""
    group = heads // kv_heads
    if heads % kv_heads or (repeat.group is not None and repeat.group != group):
        raise _Unrecognised(f"{repeat.reshape}: {kv_heads} K/V heads repeated {repeat.group} times do not make "
                            f"the {heads} query heads")
    nodes = {n.name: n for n in model.graph.node}

    def follows(entry, times: int) -> bool:
        """Whether ``entry`` is ``times`` × the heads of a tensor on the path (pruning keeps it right)."""
        if times != 1:
            return isinstance(entry, tuple) and entry[0] == "mul" and entry[2] == times and follows(entry[1], 1)
        return isinstance(entry, tuple) and entry[0] == "dim" and path.get(entry[1]) == entry[2]

    expand = nodes[repeat.expand]
    if expand.op_type == "Expand":
        entries = _shape_entries(model, expand.input[1], prod)
        entry = entries[repeat.kv_axis] if entries and repeat.kv_axis < len(entries) else None
        if entry == kv_heads and kv_heads > 1:
            repeat.rewrite_expand = True
        elif entry != 1 and not follows(entry, 1):
            raise _Unrecognised(f"{expand.name}: cannot tell how its KV-head entry ({entry}) follows pruning")
    entries = _shape_entries(model, nodes[repeat.reshape].input[1], prod)
    entry = entries[repeat.head_axis] if entries and repeat.head_axis < len(entries) else None
    repeat.reshape_infers = entry == -1
    if entry == heads:
        repeat.rewrite_reshape = True
    elif entry != -1 and not follows(entry, group) and not (group == 1 and follows(entry, 1)):
        raise _Unrecognised(f"{repeat.reshape}: cannot tell how its head entry ({entry}) follows pruning")


def _head_split(model, reshape, head_axis, fixed, prod) -> tuple[_HeadSplit, _Projection]:
    shape_out = _reshape_target(model, reshape)
    in_shape = _shapes(model).get(reshape.input[0])
    if shape_out is None or not in_shape:
        raise _Unrecognised(f"{reshape.name}: head-split Reshape shape is not known")
    lead = len(in_shape) - 1
    channels = in_shape[-1]
    if head_axis < lead:
        lead = _channel_lead(model, reshape, shape_out, channels, head_axis, prod)
    if lead is None:
        # e.g. SDPA with enable_gqa as the dynamo exporter decomposes it: [B·H, S, D] -> [B, H, S, D]
        raise _Unrecognised(f"{reshape.name}: Reshape {in_shape} -> {shape_out} takes the heads from a leading "
                            "axis, not from the projection's channels")
    rest = list(shape_out[lead:])
    unknown = [j for j, d in enumerate(rest) if not isinstance(d, int) or d <= 0]
    if unknown and not isinstance(channels, int):
        channels = _last_dim(model, reshape.input[0])
    if len(unknown) == 1 and isinstance(channels, int):
        # e.g. TorchScript's ``x.shape[-1] // num_heads``: one entry computed at run time.
        known = int(np.prod([d for j, d in enumerate(rest) if j != unknown[0]]))
        if known and channels % known == 0:
            rest[unknown[0]] = channels // known
    if any((not isinstance(d, int)) or d <= 0 for d in rest) or head_axis < lead:
        raise _Unrecognised(f"{reshape.name}: head-split Reshape to {shape_out} has dynamic channel dims")
    if isinstance(channels, int) and channels != int(np.prod(rest)):
        raise _Unrecognised(f"{reshape.name}: Reshape {in_shape} -> {shape_out} does not split the channel axis")
    head_pos = head_axis - lead
    grid = np.arange(int(np.prod(rest))).reshape(rest)
    index = [slice(None)] * len(rest)
    for a, i in fixed.items():
        if a < lead:
            raise _Unrecognised(f"{reshape.name}: slot selected on a leading axis")
        index[a - lead] = i
    picked = grid[tuple(index)]
    # Axes left after fixing slots: the head axis and the per-head (D) axes.
    remaining = [p for p in range(len(rest)) if p not in {a - lead for a in fixed}]
    picked = np.moveaxis(picked, remaining.index(head_pos), 0)
    columns = picked.reshape(rest[head_pos], -1)
    split = _HeadSplit(reshape.name, lead, [int(d) for d in rest], head_pos)
    return split, _projection(model, reshape.input[0], columns, prod)


def _channel_lead(model, reshape, target: list, channels, head_axis: int, prod) -> int | None:
    """Where the channel dims start in a head-split Reshape's ``target`` whose leading dims differ from
    its input's (GPT-BigCode's query drops a unit axis: ``[B, 1, S, C] -> [B, S, H, D]``), else None.

    That is the last start up to the heads axis whose trailing dims multiply to the input's static
    ``channels``: read as static sizes (row-major, they are then exactly the channel axis), or with one
    entry left to the Reshape (-1: TorchScript) where the leading entries are the input's leading dims
    without its unit axes (read from shapes that inference names alike)."""
    if not isinstance(channels, int) or channels <= 0:
        return None
    src = [d for d in (_shapes(model).get(reshape.input[0]) or [])[:-1] if d != 1]
    entries = _shape_entries(model, reshape.input[1], prod) or []
    for k in range(head_axis, -1, -1):
        known = [d for d in target[k:] if isinstance(d, int) and d > 0]
        if len(known) == len(target) - k and int(np.prod(known)) == channels:
            return k
        lead = [e for e in entries[:k] if e != 1]
        if len(known) == len(target) - k - 1 and channels % int(np.prod(known)) == 0 and len(entries) == len(target) \
                and len(lead) == len(src) and all(_names_dim(model, e, d) for e, d in zip(lead, src)):
            return k
    return None


def _names_dim(model, entry, dim) -> bool:
    """Whether a shape ``entry`` (:func:`_shape_entries`) is known to equal the inferred ``dim``."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return same_dim(entry, dim)
    return isinstance(entry, tuple) and entry[0] == "dim" and same_dim(_dim_name(model, entry[1], entry[2]), dim)


def _last_dim(model, t) -> int | None:
    """The size of ``t``'s last axis: inferred, or where inference does not know it (TorchScript's
    ``chunk`` outputs) evaluated at two input sizes, once per analysis; None if that varies or fails."""
    dim = _dim_name(model, t, -1)
    if isinstance(dim, int) and dim > 0:
        return dim
    memo = _shapes(model).setdefault("::evaluated last dims", {})
    if t not in memo:
        try:
            widths = {run[t].shape[-1] for run in evaluate_tensors(model, [t])}
        except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
            widths = set()
        memo[t] = int(widths.pop()) if len(widths) == 1 else None   # None: it varies, or fails
    return memo[t]
