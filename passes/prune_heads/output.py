"""Walking forward from the heads-first tensors: the core output to the merge Reshape and the output projection
(with the per-channel ops on the way), and agent attention's channel paths from Q and V (the pooled agent tokens, the
depthwise conv)."""

from __future__ import annotations

import numpy as np
import onnx

from attnc.passes.core import constant_value, evaluate_tensors, same_dim
from attnc.passes.prune_heads.model import _ChannelOps, _Depthwise, _HeadSplit, _Projection, _Unrecognised
from attnc.passes.prune_heads.projection import _channel_reshape, _gemm_projection, _projection, _rms_norm, _squares
from attnc.passes.prune_heads.shapes import _attr, _entry_keeps, _reshape_target, _shape_entries, _shapes

# Ops that only move data or scale it by a constant: the head axis can be tracked through them.
_SCALAR_OPS = ("Mul", "Div")


def _trace_output(model, t, heads, value_dim, prod, cons, same_dims=None):
    """Walk the heads-first core output forward to the merge Reshape and output projection.

    The core's output is ``[B, H, N, Dv]`` by contract; its dims are carried through the
    Transposes so the merge works where shape inference knows nothing (fused nodes' outputs).
    Returns the merge, the output projection, its input, the terms added on the way (see
    :func:`_output_projection`), ``(Reshape, heads axis)`` of each shape-keeping Reshape on the
    way that writes the head count out (rewritten on pruning), every shape-keeping Reshape's
    verdict (:func:`_keeps_heads`) and the channel ops after the merge (:class:`_ChannelOps`).
    """
    dims: list = [None, heads, None, value_dim]
    start = dims
    head_axis = 1
    head_reshapes: list[tuple[str, int]] = []
    kept_reshapes: dict[str, str] = {}
    for _ in range(8):
        # Shape readers (the TorchScript exporter computes the merge shape from them) follow the
        # new sizes by themselves.
        users = [u for u in cons.get(t, []) if u.op_type != "Shape"]
        if len(users) != 1:
            raise _Unrecognised(f"{t}: attention output has {len(users)} consumers")
        node = users[0]
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm"))
            head_axis = perm.index(head_axis)
            dims = [dims[p] for p in perm]
            t = node.output[0]
        elif node.op_type == "Reshape" and (kept := _PROVEN_KEEPS.get(node.name) or _keeps_heads(
                model, node, head_axis, heads, same_dims if dims is start else None, prod)):
            if kept == "written":
                head_reshapes.append((node.name, head_axis))
            kept_reshapes[node.name] = kept
            t = node.output[0]
        elif node.op_type == "Reshape":
            target = _reshape_target(model, node)
            if target is None:
                raise _Unrecognised(f"{node.name}: merge Reshape target unknown")
            lead = len(target) - 1
            start = lead
            if head_axis < lead or any(not isinstance(d, int) for d in dims[lead:]):
                start = head_axis   # the token axes are merged too: [B, N, H, Dv] -> [B·N, H·Dv] (GPT-2)
                if any(not isinstance(d, int) for d in dims[start:]) or target[-1] != int(np.prod(dims[start:])):
                    start = None
            rest = dims[start:] if start is not None else []
            if len(rest) < 2 or any(not isinstance(d, int) for d in rest):
                raise _Unrecognised(f"{node.name}: merge Reshape to {target} does not merge heads with head dims")
            grid = np.moveaxis(np.arange(int(np.prod(rest))).reshape(rest), head_axis - start, 0)
            rows = grid.reshape(heads, -1)
            merge = _HeadSplit(node.name, lead, [int(np.prod(rest))], 0)
            mm, added, reshapes, channel_ops = _output_projection(model, node, len(target), rows.size, prod, cons)
            transposed = mm.op_type == "Gemm" and bool(_attr(mm, "transB", 0))
            return merge, _Projection(mm.name, mm.input[1], None, None, None, rows, transposed, reshapes), \
                mm.input[0], added, head_reshapes, kept_reshapes, channel_ops
        else:
            raise _Unrecognised(f"{node.name}: {node.op_type} after the attention core")
    raise _Unrecognised(f"{t}: output path too long")


# Shape-keeping Reshapes proven on the unpruned graph (name -> verdict), trusted while the pruned
# graph is analysed again: pruning does not touch their other entries, but inference on the pruned
# graph may no longer name the dims that proved them.
_PROVEN_KEEPS: dict[str, str] = {}


def _keeps_heads(model, reshape, head_axis: int, heads, same_dims: dict[int, set[str]] | None, prod
                 ) -> str | None:
    """Whether ``reshape`` leaves its input's shape as it is: ``"follows"`` when it reads the heads as
    -1 (or 0), following a pruned head count by itself (transformers' ``attn_output.reshape(B, -1,
    N, Dv)`` after SDPA); ``"written"`` when it writes the head count out (rewritten on pruning; one
    other entry may then be -1: Swin's ``[-1, H, N, Dv]`` over batch × windows); else ``None``.
    The other entries are static sizes equal to the input's, or read from the shape of a tensor in
    ``same_dims[axis]`` (the core's output, Q, K, V: under dynamic axes TorchScript computes them
    so; inferred shapes then say nothing), or from a dim that inference names like the input's
    (the model input's ``batch`` / ``seq``)."""
    entries = _shape_entries(model, reshape.input[1], prod)
    before = _shapes(model).get(reshape.input[0])
    if entries is None:
        return _keeps_heads_evaluated(model, reshape, head_axis, heads, prod)
    if not entries or not before or len(entries) != len(before) or head_axis >= len(entries):
        return None
    if entries[head_axis] in (-1, 0):
        kept = "follows"
    elif isinstance(heads, int) and entries[head_axis] == heads:
        kept = "written"
    else:
        return None
    for axis, (entry, dim) in enumerate(zip(entries, before)):
        if axis == head_axis or (kept == "written" and entry == -1):
            continue
        if not _entry_keeps(model, reshape, entry, axis, dim, same_dims):
            # e.g. read from a [B, S, H, D] tensor's dims (Falcon under TorchScript)
            return _keeps_heads_evaluated(model, reshape, head_axis, heads, prod)
    return kept


def _keeps_heads_evaluated(model, reshape, head_axis: int, heads, prod) -> str | None:
    """:func:`_keeps_heads` for a target whose entries are computed in ways ``_shape_entries`` does not
    read (Wav2Vec2's ``(seq - 3) // 4`` from its convolutional front end): a ``Concat`` of one-entry
    pieces whose heads piece is a constant (-1 / 0: ``"follows"``, the head count: ``"written"``) and
    whose other entries equal the input's dims: named alike by inference, or evaluated at two input sizes."""
    concat = prod.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) <= head_axis or \
            any(_shapes(model).get(i) != [1] for i in concat.input):
        return None
    piece = constant_value(model, concat.input[head_axis])
    entry = int(piece.reshape(-1)[0]) if piece is not None and piece.size == 1 else None
    kept = "follows" if entry in (-1, 0) else "written" if isinstance(heads, int) and entry == heads else None
    if kept is None:
        return None
    before, after = _shapes(model).get(reshape.input[0]), _shapes(model).get(reshape.output[0])
    if before and after and len(before) == len(after) == len(concat.input) and all(
            same_dim(b, a) for axis, (b, a) in enumerate(zip(before, after)) if axis != head_axis):
        return kept   # inference (with data propagation) names the other dims alike on both sides
    try:
        runs = evaluate_tensors(model, [reshape.input[1], reshape.input[0]])
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        return None
    for run in runs:
        target, shape = run[reshape.input[1]].reshape(-1), run[reshape.input[0]].shape
        if len(target) != len(shape) or any(int(t) != d for a, (t, d) in enumerate(zip(target, shape))
                                            if a != head_axis):
            return None
    return kept


def _output_projection(model, merge, rank, channels: int, prod, cons
                       ) -> tuple[onnx.NodeProto, list[tuple[str, str]], tuple[str, ...], _ChannelOps]:
    """From the merge Reshape's output ``[.., tokens, H·Dv]`` (``channels`` wide) to the constant output projection.

    On the way only the token axes may change: ``Slice`` (agent attention sets the CLS token
    apart), ``Concat`` of those pieces, and ``Add`` of a term (agent attention's depthwise conv of
    V on the grid tokens; the caller checks it carries the heads on the same channels). Each channel
    may also be scaled on its own (:func:`_channel_user`): an RMSNorm across all the channels, a
    constant ``[C]`` weight, a gate computed from a constant projection of another tensor.

    Returns:
        The output projection (``MatMul`` or ``Gemm``), ``(Add node, added tensor)`` of each term,
        the Reshapes of the token axes on the way whose channel count is written out, and the
        channel ops on the way.
    """
    merged = merge.output[0]
    inside, todo = {merged}, [merged]
    found, concats, adds, reshapes = [], [], [], []
    ops, handled = _ChannelOps(), set()
    while todo:
        t = todo.pop()
        users = [u for u in cons.get(t, []) if u.op_type != "Shape"]
        # An RMSNorm's mean square first: the Mul / Div it ends in reads t too.
        for user in users:
            if _squares(model, user, t):
                end, reduce, dtype = _rms_norm(model, user, t, cons)
                ops.norms.append((reduce, dtype))
                handled.add(end.name)
        for user in users:
            op = user.op_type
            if _squares(model, user, t) or user.output[0] in inside:
                continue
            if user.input[0] == t and (op == "MatMul" and constant_value(model, user.input[1]) is not None
                                       or op == "Gemm" and _gemm_projection(model, user, True) is not None):
                found.append(user)
                continue
            if user.name in handled:
                pass
            elif op == "Slice" and user.input[0] == t:
                axes = constant_value(model, user.input[3]) if len(user.input) > 3 and user.input[3] else None
                if axes is None or any(int(a) % rank == rank - 1 for a in axes):
                    raise _Unrecognised(f"{user.name}: Slice of the merged heads' channels")
            elif op == "Concat" and _attr(user, "axis", 0) % rank != rank - 1:
                concats.append(user)
            elif op == "Add" and list(user.input).count(t) == 1:
                adds.append((user, t))
            elif op == "Reshape" and user.input[0] == t and (kept := _channel_reshape(model, user, prod)):
                if kept == "written":   # tokens flattened for a Gemm (GPT-2's Conv1D)
                    reshapes.append(user.name)
            elif not _channel_user(model, user, t, rank, channels, merged, ops, prod):
                raise _Unrecognised(f"{merge.name}: merged heads go through {op} {user.name}, not straight "
                                    "into a constant output projection")
            inside.add(user.output[0])
            todo.append(user.output[0])
    if len(found) != 1:
        raise _Unrecognised(f"{merge.name}: merged heads feed {len(found)} constant output projections, not one")
    if any(i not in inside for c in concats for i in c.input):
        raise _Unrecognised(f"{merge.name}: merged heads are concatenated with other tokens")
    added = [(add.name, next(i for i in add.input if i != t)) for add, t in adds]
    if any(term in inside for _, term in added):
        raise _Unrecognised(f"{merge.name}: merged heads are added to themselves")
    return found[0], added, tuple(reshapes), ops


def _channel_user(model, user, t, rank: int, channels: int, merged: str, ops: _ChannelOps, prod) -> bool:
    """Whether ``user`` of the merged channels ``t`` acts on each channel on its own, recording what pruning
    slices in ``ops``: a float ``Cast``; ``Mul`` / ``Div`` by a scalar or a constant ``[.., C]`` (a norm's
    weight); ``Mul`` by a gate computed elementwise from a constant projection of a tensor that does not
    read the merged heads (MiniMax's ``sigmoid(output_gate(x))``: its columns go with the channels); an
    ONNX ``RMSNormalization`` over the channel axis. Other cross-channel ops are refused with the reason."""
    op = user.op_type
    if op in ("Cast", "Identity"):
        return True
    if op == "RMSNormalization" and user.input[0] == t:
        scale = constant_value(model, user.input[1]) if len(user.input) > 1 else None
        if _attr(user, "axis", -1) % rank != rank - 1 or scale is None or scale.shape[-1:] != (channels,):
            raise _Unrecognised(f"{user.name}: RMSNormalization of the merged heads over more than their channel "
                                "axis, or with a scale that is not a constant per channel")
        ops.norms.append((user.name, scale.dtype))
        return True
    if op in ("LayerNormalization", "ReduceMean", "ReduceSum", "Sub"):
        raise _Unrecognised(f"{user.name}: {op} across the merged heads' channels that is not an RMSNorm (only "
                            "an RMSNorm's mean square can be kept over the original channel count)")
    if op not in ("Mul", "Div") or list(user.input).count(t) != 1 or (op == "Div" and user.input[0] != t):
        return False
    other = next(i for i in user.input if i != t)
    value = constant_value(model, other)
    if value is not None:
        if value.size == 1:
            return True
        if value.shape[-1:] != (channels,) or value.size != channels:
            raise _Unrecognised(f"{user.name}: {op} of the merged heads by a constant of shape {value.shape}, not "
                                f"one value per channel ({channels})")
        ops.weights.append((user.name, list(user.input).index(other)))
        return True
    if op == "Div" or _reads(prod, other, merged):
        return False
    try:
        gate = _projection(model, other, np.arange(channels)[None, :], prod)
    except _Unrecognised:
        raise _Unrecognised(f"{user.name}: the merged heads are multiplied by {other}, which is not an "
                            "elementwise function of a constant projection") from None
    if gate.split is not None or gate.matrix(model).shape[1] != channels:
        raise _Unrecognised(f"{user.name}: the gate {other} on the merged heads takes {channels} of its "
                            f"projection's {gate.matrix(model).shape[1]} channels")
    ops.gates.append(gate)
    return True


def _reads(prod, t: str, target: str) -> bool:
    """Whether ``t`` is computed from ``target``."""
    seen, todo = set(), [t]
    while todo:
        x = todo.pop()
        if x == target:
            return True
        node = prod.get(x)
        if node is not None and x not in seen:
            seen.add(x)
            todo.extend(i for i in node.input if i)
    return False


def _follow_channels(model, start, stop, heads, head_dim, core_nodes, prod, cons
                     ) -> tuple[list[list[tuple[str, int | None]]], list[_HeadSplit], list[_Depthwise]]:
    """Walk from the heads-first ``start`` ``[B, H, N, D]`` forward to ``stop`` (not through the
    attention core's ``core_nodes``) over ops that keep each head's channels to themselves:
    Transpose, Reshape, Slice of other axes, scalar Mul/Div, pooling and depthwise Conv.

    Agent attention does this twice: Q's grid tokens average-pooled to the agent tokens, and
    V's grid tokens through a depthwise conv added to the merged heads. Each axis is tracked as
    the factors it is made of, major first (``("h", H)``, ``("d", D)``, ``("x", size or None)``
    for anything else), which says which Reshape entry holds the heads and which head each
    conv channel belongs to.

    Returns:
        (the axes' factors at ``stop``, the Reshapes (``lead`` = the entry holding the heads,
        ``rest`` = the static entries from there on), the convs).
    """
    shapes = _shapes(model)
    dims = shapes.get(start) or [None] * 4
    if len(dims) != 4:
        raise _Unrecognised(f"{start}: not a heads-first [B, H, N, D] tensor")
    layout = [[("x", _static(dims[0]))], [("h", heads)], [("x", _static(dims[2]))], [("d", head_dim)]]
    # The path may leave before the head-split Transpose (TorchScript cancels transpose pairs):
    # it starts at the one tensor up the Transposes with a consumer off the way to the core.
    t, towards_core, branches = start, None, []
    while True:
        branches += [(t, layout, u) for u in cons.get(t, [])
                     if u.op_type != "Shape" and u.name not in core_nodes and u is not towards_core]
        node = prod.get(t)
        if node is None or node.op_type not in ("Transpose", "Cast", "Identity"):
            break
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm"))
            layout = [layout[perm.index(a)] for a in range(len(perm))]
        t, towards_core = node.input[0], node
    if len(branches) != 1 or branches[0][2].input[0] != branches[0][0]:
        raise _Unrecognised(f"{start}: {len(branches)} paths leave it on the way to {stop}")
    t, layout, first = branches[0]
    reshapes, convs = [], []
    for _ in range(32):
        if t == stop:
            return layout, reshapes, convs
        users = [first] if first is not None else \
            [u for u in cons.get(t, []) if u.op_type != "Shape" and u.name not in core_nodes]
        first = None
        if len(users) != 1 or users[0].input[0] != t:
            raise _Unrecognised(f"{t}: {len(users)} consumers on the way to {stop}")
        node = users[0]
        op = node.op_type
        out_dims = shapes.get(node.output[0]) or []
        static = [_static(out_dims[a]) if a < len(out_dims) else None for a in range(len(layout))]
        if op in ("Cast", "Identity"):
            pass
        elif op in _SCALAR_OPS:
            value = constant_value(model, node.input[1])
            if value is None or value.size != 1:
                raise _Unrecognised(f"{node.name}: {op} by a non-scalar on the way to {stop}")
        elif op == "Transpose":
            layout = [layout[p] for p in _attr(node, "perm")]
        elif op == "Slice":
            axes = constant_value(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is None or any(_holds_heads(layout[int(a) % len(layout)]) for a in axes):
                raise _Unrecognised(f"{node.name}: Slice across the heads on the way to {stop}")
            for a in axes:
                layout[int(a) % len(layout)] = [("x", static[int(a) % len(layout)])]
        elif op in ("AveragePool", "MaxPool", "Conv"):
            if any(_holds_heads(axis) for a, axis in enumerate(layout) if a != 1):
                raise _Unrecognised(f"{node.name}: {op} does not have the heads on its channel axis")
            if op == "Conv":
                weight = constant_value(model, node.input[1])
                channels = _size(layout[1])
                if weight is None or channels is None or _attr(node, "group", 1) != channels \
                        or tuple(weight.shape[:2]) != (channels, 1):
                    raise _Unrecognised(f"{node.name}: Conv over the heads' channels is not depthwise")
                positions = int(np.prod(static[2:])) if None not in static[2:] else None
                convs.append(_Depthwise(node.name, _channel_heads(layout[1], node.name), positions))
            layout = layout[:2] + [[("x", d)] for d in static[2:]]
        elif op == "Reshape":
            target = _reshape_target(model, node)
            groups = None if target is None else _regroup(
                [f for axis in layout for f in axis], [d if isinstance(d, int) and d > 0 else None for d in target])
            if groups is None:
                raise _Unrecognised(f"{node.name}: Reshape to {target} splits a head on the way to {stop}")
            # The entry holding the heads is rewritten as a constant, and with it everything after:
            # TorchScript computes it from the layer input's width (``x.shape[-1]``), which pruning keeps.
            lead = next(j for j, axis in enumerate(groups) if _holds_heads(axis, "h"))
            if any(_size(axis) is None for axis in groups[lead:]):
                raise _Unrecognised(f"{node.name}: Reshape to {target} has dynamic dims after the heads")
            reshapes.append(_HeadSplit(node.name, lead, [_size(axis) for axis in groups[lead:]], 0))
            layout = groups
        else:
            raise _Unrecognised(f"{node.name}: {op} on the way from {start} to {stop}")
        t = node.output[0]
    raise _Unrecognised(f"{start}: path to {stop} too long")


def _regroup(factors, target) -> list[list[tuple[str, int | None]]] | None:
    """A Reshape's input factors grouped into its output axes (``target``: ints, ``None`` when
    unknown), or ``None`` when an output axis would cut a head or head-dim factor.

    Factors are matched from both ends; dims of unknown size (batch, TorchScript's token
    counts) pair one to one, and whatever stays unmatched in the middle goes to the one dim
    left there, or must be plain ``x`` when several are left.
    """
    left = _match_from_start(list(factors), list(target))
    if left is None:
        return None
    groups, rest, rest_target = left
    right = _match_from_start(rest[::-1], rest_target[::-1])
    if right is None:
        return None
    tail, middle, middle_target = right
    middle, middle_target = middle[::-1], middle_target[::-1]
    tail = [g[::-1] for g in tail[::-1]]
    # A token count of unknown size at an end of the middle becomes the known dims at that end
    # (TorchScript: [B, H, D, N] -> [B, H·D, G, G] with N and H·D computed at run time).
    if len(middle) > 1 and middle[-1] == ("x", None) and middle_target and middle_target[-1] is not None:
        known = len(middle_target) - next(j for j in range(len(middle_target), 0, -1) if middle_target[j - 1] is None)
        middle, tail = middle[:-1], [[("x", d)] for d in middle_target[-known:]] + tail
        middle_target = middle_target[:-known]
    elif len(middle) > 1 and middle[0] == ("x", None) and middle_target and middle_target[0] is not None:
        known = next(j for j, d in enumerate(middle_target + [None]) if d is None)
        middle, groups = middle[1:], groups + [[("x", d)] for d in middle_target[:known]]
        middle_target = middle_target[known:]
    if len(middle_target) == 1:  # one dim takes whatever is left
        return groups + [middle] + tail
    if any(tag != "x" for tag, _ in middle) or (not middle_target and any(n != 1 for _, n in middle)):
        return None
    return groups + [[("x", d)] for d in middle_target] + tail


def _match_from_start(factors, target):
    """Group leading ``factors`` into leading ``target`` dims while sizes are known.

    Returns ``(groups, factors left, target dims left)``, or ``None`` when a dim would cut a
    head or head-dim factor (``x`` factors may be split).
    """
    groups = []
    for j, dim in enumerate(target):
        if dim is None:
            if factors and factors[0] == ("x", None):
                groups.append([factors.pop(0)])
                continue
            return groups, factors, target[j:]
        group, size = [], 1
        if dim == 1 and factors and factors[0][1] == 1:
            group.append(factors.pop(0))  # a single head (or agent, or token) keeps its own axis
        while size < dim:
            if not factors or factors[0][1] is None:
                return groups, group + factors, target[j:]
            tag, n = factors[0]
            need = dim // size
            if need % n == 0:
                group.append(factors.pop(0))
                size *= n
            elif tag == "x" and n % need == 0:
                group.append(("x", need))
                factors[0] = ("x", n // need)
                size = dim
            else:
                return None
        groups.append(group)
    return groups, factors, []


def _holds_heads(axis, tags: str = "hd") -> bool:
    return any(tag in tags for tag, _ in axis)


def _size(axis) -> int | None:
    sizes = [n for _, n in axis]
    return None if None in sizes else int(np.prod(sizes))


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _channel_heads(axis, where: str) -> np.ndarray:
    """The head of each channel of an axis made of ``axis`` factors (exactly one ``h``)."""
    tags = [tag for tag, _ in axis]
    sizes = [n for _, n in axis]
    if tags.count("h") != 1 or None in sizes:
        raise _Unrecognised(f"{where}: channels are not one head axis times known sizes")
    return np.indices(sizes)[tags.index("h")].reshape(-1)
