"""The constant projection behind a tensor's channels (``MatMul`` / ``Gemm``, bias, channel ``Split`` / ``Slice``,
elementwise activations), and the RMSNorms across the heads that pruning can keep."""

from __future__ import annotations

import numpy as np
import onnx

from attnc.passes.core import constant_value, consumers
from attnc.passes.prune_heads.model import _ChannelOps, _Projection, _Unrecognised
from attnc.passes.prune_heads.shapes import _attr, _axes, _dim_name, _fold, _rank, _shape_entries, _shapes, _split_sizes

# Elementwise ops on the Q/K/V path: passed where the other operand is constant over the heads (rotary tables).
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow")
# Ops of one input that act on each element on its own (math and activations): on the Q/K/V path they stay
# within the head (a per-head RMSNorm's rsqrt, Qwen3's q_norm / k_norm), and a projection's channels pass
# them one by one (MiniMax's SiLU over its whole qkv projection).
_UNARY = ("Cast", "Identity", "Neg", "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Erf", "Relu", "Sigmoid", "Tanh",
          "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Swish")


def _projection(model, t, columns, prod) -> _Projection:
    """Walk ``[.., C]`` back over ``Add(bias)``, a scalar ``Mul``/``Div``, channel ``Split``, Reshapes of the token axes
    and an RMSNorm across exactly these heads (:func:`_heads_norm`) to ``MatMul(x, W)`` or ``Gemm(x, W[, bias])``
    (GPT-2's ``Conv1D``: ``addmm`` on flattened tokens)."""
    bias_node = bias = split = bounds = norm = None
    offset = 0
    reshapes: list[str] = []
    for _ in range(8):
        node = prod.get(t)
        if node is None:
            break
        if node.op_type == "Reshape" and (kept := _channel_reshape(model, node, prod)):
            if kept == "written":
                reshapes.append(node.name)
            t = node.input[0]
            continue
        if node.op_type == "Unsqueeze" and (rank := _rank(model, node.output[0])) and \
                all(a % rank != rank - 1 for a in _axes(model, node, 1)):
            t = node.input[0]   # a unit token axis (GPT-BigCode's c_attn(x).unsqueeze(1))
            continue
        scalars = [i for i in node.input if (c := constant_value(model, i)) is not None and c.size == 1]
        if node.op_type in ("Mul", "Div") and len(scalars) == 1 and (node.op_type == "Mul" or node.input[1] in scalars):
            t = next(i for i in node.input if i not in scalars)   # a scale on the projection (OPT's q · scaling)
            continue
        if (source := _elementwise_source(model, t, prod)) != t:
            t = source   # an activation of every channel (MiniMax's SiLU on qkv_proj): each channel stays itself
            continue
        if split is None and norm is None and (found := _heads_norm(model, t, columns, prod)) is not None:
            t, norm = found   # OLMo2's q_norm / k_norm over all the heads: pruning keeps its divisor
            continue
        if node.op_type == "Gemm":
            gemm = _gemm_projection(model, node, bias is None)
            if gemm is None:
                break
            weight, transposed, gemm_bias = gemm
            if gemm_bias is not None:
                bias_node, bias = node.name, gemm_bias
            if bounds is not None:
                offset = _slice_offset(split[0], bounds, columns,
                                       constant_value(model, weight).shape[0 if transposed else 1])
            return _Projection(node.name, weight, bias_node, bias, split, columns + offset, transposed, tuple(reshapes),
                               norm)
        if node.op_type == "Slice" and split is None:
            bounds = _channel_slice(model, node)   # resolved against the projection's width there
            split = (node.name, -1)
            t = node.input[0]
        elif node.op_type == "Split" and split is None:
            sizes = _split_sizes(model, node)
            j = list(node.output).index(t)
            if sizes is None or _attr(node, "axis", 0) not in (-1, len(_shapes(model).get(t, [0, 0, 0])) - 1):
                raise _Unrecognised(f"{node.name}: channel Split is not along the last axis with known sizes")
            offset = int(sum(sizes[:j]))
            split = (node.name, j)
            t = node.input[0]
        elif node.op_type == "Add" and bias is None:
            consts = [i for i in node.input if constant_value(model, i) is not None]
            if len(consts) != 1 or constant_value(model, consts[0]).ndim != 1:
                break
            bias_node, bias = node.name, consts[0]
            t = next(i for i in node.input if i != bias)
        elif node.op_type == "MatMul":
            w = constant_value(model, node.input[1])
            if w is None or w.ndim != 2:
                break
            if bounds is not None:
                offset = _slice_offset(split[0], bounds, columns, w.shape[1])
            return _Projection(node.name, node.input[1], bias_node, bias, split, columns + offset,
                               reshapes=tuple(reshapes), norm=norm)
        else:
            break
    statistic = _channel_statistic(model, t, prod)
    if statistic is not None:
        raise _Unrecognised(f"{t}: {statistic.op_type} {statistic.name} is part of a normalisation across the heads "
                            "between the projection and the head split that is not an RMSNorm of exactly the heads "
                            "that follow (a statistic of all heads' channels that pruning cannot keep over the "
                            "original channel count)")
    raise _Unrecognised(f"{t}: no constant MatMul projection before the head split")


def _heads_norm(model, t, columns, prod) -> tuple[str, _ChannelOps] | None:
    """``(x, the norm)`` where ``t`` is an RMSNorm of ``x`` over its last axis (OLMo2's ``q_norm`` / ``k_norm``
    over all the heads' ``H·D`` channels), times a constant weight per channel or not, whose channels are exactly
    the ``columns`` of the heads that follow; else None. Decomposed as :func:`_rms_norm` reads it (Casts around the
    weight), or an ONNX ``RMSNormalization`` of the last axis with a constant scale. Pruning keeps its divisor over
    the original channel count (:func:`_prune_channel_ops`): the pruned heads' channels count as zeros."""
    def past_casts(x):
        while (node := prod.get(x)) is not None and node.op_type in ("Cast", "Identity"):
            x = node.input[0]
        return x, node

    width = columns.size
    t, node = past_casts(t)
    if node is None or node.op_type not in ("RMSNormalization", "Mul", "Div") or _dim_name(model, t, -1) != width \
            or sorted(columns.reshape(-1).tolist()) != list(range(width)):
        return None
    ops = _ChannelOps()
    if node.op_type == "RMSNormalization":
        scale = constant_value(model, node.input[1]) if len(node.input) > 1 else None
        rank = _rank(model, node.input[0])
        if rank is None or _attr(node, "axis", -1) % rank != rank - 1 or scale is None or scale.shape != (width,):
            return None
        ops.norms.append((node.name, scale.dtype))
        return node.input[0], ops
    if node.op_type == "Mul":
        weights = [i for i, x in enumerate(node.input) if constant_value(model, x) is not None]
        if len(weights) == 1 and constant_value(model, node.input[weights[0]]).shape[-1:] == (width,) \
                and constant_value(model, node.input[weights[0]]).size == width:
            ops.weights.append((node.name, weights[0]))
            t, node = past_casts(node.input[1 - weights[0]])
    if node is None or node.op_type not in ("Mul", "Div"):
        return None
    cons = consumers(model)
    for x in node.input:
        for square in [u for u in cons.get(x, []) if _squares(model, u, x)]:
            try:
                end, reduce, dtype = _rms_norm(model, square, x, cons)
            except _Unrecognised:
                continue
            if end.name == node.name:
                ops.norms.append((reduce, dtype))
                return x, ops
    return None


def _channel_statistic(model, t, prod) -> onnx.NodeProto | None:
    """A reduction over the channel (last) axis, or a Layer / RMS normalisation, that ``t`` is computed
    from through elementwise ops: ``t`` divides channels by a statistic of all of them."""
    todo, seen = [t], set()
    while todo and len(seen) < 16:
        node = prod.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("LayerNormalization", "RMSNormalization"):
            return node
        if node.op_type.startswith("Reduce") and (rank := _rank(model, node.input[0])):
            given = len(node.input) > 1 and node.input[1]
            axes = constant_value(model, node.input[1]) if given else _attr(node, "axes")
            if not given and axes is None or axes is not None and (rank - 1) in [int(a) % rank
                                                                                for a in np.atleast_1d(axes)]:
                return node   # no axes: all of them
        if node.op_type in _ELEMENTWISE + _UNARY:
            todo.extend(i for i in node.input if constant_value(model, i) is None)
    return None


def _elementwise_source(model, t, prod, depth: int = 0) -> str:
    """The one tensor ``t`` is computed from element by element, with scalar constants only (an activation:
    ``_UNARY``, SiLU exported as ``x · Sigmoid(x)``, GELU's ``x · (1 + erf(x / √2)) / 2``), else ``t``:
    slicing its channels slices that tensor's alike."""
    node = prod.get(t)
    if node is None or depth > 8:
        return t
    if node.op_type in _UNARY and node.domain in ("", "ai.onnx", "com.microsoft"):
        return _elementwise_source(model, node.input[0], prod, depth + 1)
    if node.op_type not in _ELEMENTWISE:
        return t
    data = [i for i in node.input if (c := constant_value(model, i)) is None or c.size != 1]
    if any(constant_value(model, i) is not None for i in data):
        return t   # a constant with more than one value (a bias): not elementwise with scalars
    sources = {_elementwise_source(model, i, prod, depth + 1) for i in data}
    return sources.pop() if len(sources) == 1 else t


def _channel_slice(model, node) -> tuple[int, int | None]:
    """``(start, end)`` of a ``Slice`` taking one role's channels from a fused projection's last axis
    (``qkv(x).chunk(3, -1)`` exported by TorchScript: bounds computed from the projection's shape,
    which fold to constants here). ``end`` may exceed the width (an open slice): see :func:`_slice_offset`."""
    if len(node.input) < 3:
        raise _Unrecognised(f"{node.name}: an opset < 10 Slice (bounds as attributes) before the head split")
    bounds = [node.input[i] if i < len(node.input) and node.input[i] else None for i in range(1, 5)]
    bounds = [None if b is None else _fold(model, b) for b in bounds]
    starts, ends, axes, steps = (None if b is None else np.atleast_1d(np.asarray(b)).astype(np.int64).tolist()
                                 for b in bounds)
    rank = len(_shapes(model).get(node.input[0]) or [])
    if starts is None or ends is None or len(starts) != 1 or (axes or [0])[0] not in (-1, rank - 1) or (
            axes is None and rank != 1) or (steps or [1]) != [1]:
        raise _Unrecognised(f"{node.name}: a Slice before the head split that is not a step-1 slice of the "
                            "channel axis")
    return starts[0], ends[0]


def _slice_offset(name: str, bounds: tuple[int, int], columns: np.ndarray, width: int) -> int:
    """The start of channel Slice ``name`` (``bounds`` from :func:`_channel_slice`) in the projection's
    ``width`` channels, after checking that it takes exactly the channels of the heads that follow it."""
    start, end = (min(max(b + width if b < 0 else b, 0), width) for b in bounds)
    if end - start != columns.size or columns.max() >= columns.size:
        raise _Unrecognised(f"{name}: the Slice [{start}, {end}) of the projection's {width} channels is not "
                            f"the {columns.size} channels of the heads that follow it")
    return start


def _channel_reshape(model, reshape, prod) -> str | None:
    """Whether ``reshape`` only regroups the token axes, its last (channel) axis keeping its size:
    ``"follows"`` when its channel entry is -1 or read from the input's last axis (TorchScript under
    dynamic axes), ``"written"`` when it spells the count out (pruning must write the new count;
    the sizes are then static and equal), else ``None``."""
    shapes = _shapes(model)
    before, after = shapes.get(reshape.input[0]), shapes.get(reshape.output[0])
    entries = _shape_entries(model, reshape.input[1], prod)
    last = entries[-1] if entries else None
    read = bool(before) and last == ("dim", reshape.input[0], len(before) - 1)
    if before and after and isinstance(before[-1], int) and before[-1] > 0 and before[-1] == after[-1]:
        return "follows" if read or last == -1 else "written"
    return "follows" if read else None


def _gemm_projection(model, gemm, bias_allowed: bool) -> tuple[str, bool, str | None] | None:
    """``(weight, transposed, bias or None)`` if ``gemm`` is ``x·W [+ b]``: constant 2-D ``W``, no
    transA, alpha = beta = 1, and ``b`` absent or a constant vector over the output channels."""
    w = constant_value(model, gemm.input[1])
    if w is None or w.ndim != 2 or _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1.0:
        return None
    transposed = bool(_attr(gemm, "transB", 0))
    if len(gemm.input) < 3 or not gemm.input[2]:
        return gemm.input[1], transposed, None
    b = constant_value(model, gemm.input[2])
    if not bias_allowed or b is None or b.shape != (w.shape[0 if transposed else 1],) \
            or _attr(gemm, "beta", 1.0) != 1.0:
        return None
    return gemm.input[1], transposed, gemm.input[2]


def _squares(model, node, t) -> bool:
    """Whether ``node`` squares ``t``: ``Pow(t, 2)`` or ``Mul(t, t)``."""
    if node.op_type == "Mul":
        return list(node.input) == [t, t]
    return node.op_type == "Pow" and node.input[0] == t and (e := constant_value(model, node.input[1])) is not None \
        and e.size == 1 and float(e.reshape(-1)[0]) == 2.0


def _rms_norm(model, square, t, cons) -> tuple[onnx.NodeProto, str, np.dtype]:
    """``(the node dividing t by its RMS, the ReduceMean, eps's float type)`` of an RMSNorm of ``t`` over its
    last axis, from its ``square`` of ``t``: ``ReduceMean`` of it over the last axis (keepdims), scalar
    ``Mul``s and Casts (a rescale written by pruning), ``Add`` of a scalar ``eps``, ``Sqrt``, then ``Div(t, ·)``,
    or ``Reciprocal`` / ``Div(1, ·)`` and ``Mul(t, ·)``; each step read by the next alone. Else
    ``_Unrecognised``: a statistic of all the heads' channels that pruning cannot keep."""
    def only_user(x):
        users = [u for u in cons.get(x, []) if u.op_type != "Shape"]
        if len(users) != 1:
            raise _Unrecognised(f"{square.name}: the mean square of the merged heads is read by {len(users)} nodes, "
                                "not by one RMSNorm")
        return users[0]

    def scalar(x) -> bool:
        return (c := constant_value(model, x)) is not None and c.size == 1

    node = only_user(square.output[0])
    rank = _rank(model, t)
    axes = (node.input[1:2] or [""])[0] or _attr(node, "axes") is not None   # none: every axis
    if node.op_type != "ReduceMean" or not _attr(node, "keepdims", 1) or rank is None or not axes \
            or [a % rank for a in _axes(model, node, 1)] != [rank - 1]:
        raise _Unrecognised(f"{square.name}: the merged heads are squared into {node.op_type} {node.name}, not the "
                            "mean over their channels of an RMSNorm")
    reduce = node.name
    node = only_user(node.output[0])
    while node.op_type in ("Mul", "Cast") and (node.op_type == "Cast" or any(scalar(i) for i in node.input)):
        node = only_user(node.output[0])
    eps = next((constant_value(model, i) for i in node.input if scalar(i)), None) if node.op_type == "Add" else None
    if eps is not None and eps.dtype.kind == "f" and (node := only_user(node.output[0])).op_type == "Sqrt":
        x, node = node.output[0], only_user(node.output[0])
        if node.op_type == "Div" and list(node.input) == [t, x]:
            return node, reduce, eps.dtype
        if node.op_type == "Reciprocal" or node.op_type == "Div" and node.input[1] == x and scalar(node.input[0]) \
                and float(constant_value(model, node.input[0]).reshape(-1)[0]) == 1.0:
            x, node = node.output[0], only_user(node.output[0])
            if node.op_type == "Mul" and sorted(node.input) == sorted([t, x]):
                return node, reduce, eps.dtype
    raise _Unrecognised(f"{square.name}: the mean square of the merged heads reaches {node.op_type} {node.name}, "
                        "not an RMSNorm of them (mean + eps, sqrt, divide)")
