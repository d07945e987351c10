"""Reading the graph's shapes for the head tracing: inferred shapes (cached per analysis), Reshape targets and the
entries of shape tensors, node attributes and axes, tensors folded from constants."""

from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from attnc.passes.core import constant_value, fixed_value, producers, value_shapes
from attnc.passes.prune_heads.model import _Unrecognised

_SHAPES_CACHE: dict[int, dict] = {}


def _shapes(model) -> dict:
    """Inferred shapes of ``model``, computed once per analysis (find_attention_layers resets it)."""
    key = id(model)
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE.clear()
        _SHAPES_CACHE[key] = value_shapes(model)
    return _SHAPES_CACHE[key]


def _dim_name(model, tensor: str, axis: int):
    """The inferred size of ``tensor`` on ``axis`` (an int, a symbolic name, or None)."""
    shape = _shapes(model).get(tensor) or []
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def _rank(model, t) -> int | None:
    shape = _shapes(model).get(t)
    return None if shape is None else len(shape)


def _dim_at(shape, axis: int, rank: int):
    """Size of ``shape`` broadcast to ``rank`` dims at ``axis``: an int, ``"absent"`` (broadcast
    from fewer dims), or ``None`` when unknown."""
    if shape is None:
        return None
    offset = rank - len(shape)
    if axis < offset:
        return "absent"
    d = shape[axis - offset]
    return d if isinstance(d, int) and d > 0 else None


def _reshape_target(model, node) -> list | None:
    """The Reshape's target shape: constant entries as ints, dynamic ones as ``None``; -1/0 resolved
    from the inferred output shape when known."""
    out = _shapes(model).get(node.output[0])
    value = constant_value(model, node.input[1])
    if value is not None:
        target = [int(d) for d in value]
    else:
        target = _concat_entries(model, node.input[1])
    if target is None:
        return out
    if out and len(out) == len(target):
        target = [o if isinstance(o, int) and (d is None or d <= 0) else d for d, o in zip(target, out)]
    return target


def _concat_entries(model, name) -> list | None:
    prod = producers(model)
    node = prod.get(name)
    if node is None or node.op_type != "Concat":
        return None
    shapes = _shapes(model)
    entries: list = []
    for i in node.input:
        value = constant_value(model, i)
        if value is not None:
            entries.extend(int(d) for d in value.reshape(-1))
        else:
            n = (shapes.get(i) or [None])[0]
            if not isinstance(n, int):
                return None
            entries.extend([None] * n)
    return entries


def _shape_input(node) -> int:
    """The input holding the shape a ``Reshape`` / ``Expand`` / ``ConstantOfShape`` makes."""
    return 0 if node.op_type == "ConstantOfShape" else 1


def _shape_entries(model, name: str, prod, depth: int = 0) -> list | None:
    """The entries of a 1-D shape tensor as far as they can be read from the graph: ints where
    constant, ``("dim", tensor, axis)`` where read from a tensor's shape, ``("mul", entry, k)``,
    booleans for comparisons, ``None`` where unknown; ``None`` when even the length is unknown.

    Enough for the shape arithmetic exporters emit around ``repeat_kv``: constants, ``Shape``,
    ``Gather``/``Slice`` of it, ``Concat``, ``Mul`` by a constant and TorchScript's
    ``Where(Equal(s, -1), 1, s)`` over ``ConstantOfShape``.
    """
    value = constant_value(model, name)
    if value is not None:
        return [v.item() if v.dtype.kind != "b" else bool(v) for v in value.reshape(-1)]
    node = prod.get(name)
    if node is None or depth > 12:
        return None
    op, args = node.op_type, node.input
    entries = lambda i: _shape_entries(model, args[i], prod, depth + 1) if len(args) > i and args[i] else None  # noqa: E731
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return entries(0)
    if op == "Shape":
        as_vector = entries(0)
        if as_vector is not None:
            return [len(as_vector)]  # the shape of a shape vector
        rank = _rank(model, args[0])
        if rank is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", rank)
        return [("dim", args[0], a) for a in range(rank)[start:end]]
    if op == "Concat":
        parts = [_shape_entries(model, i, prod, depth + 1) for i in args]
        # a part computed some other way (the dynamo exporter's `past + seq` as an Add): unknown entries of its length
        parts = [[None] * n if p is None and isinstance(n := (_shapes(model).get(i) or [None])[0], int) else p
                 for i, p in zip(args, parts)]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Gather":
        data, idx = entries(0), constant_value(model, args[1])
        if data is None or idx is None:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    if op == "Slice":
        data = entries(0)
        starts, ends = constant_value(model, args[1]), constant_value(model, args[2])
        steps = constant_value(model, args[4]) if len(args) > 4 and args[4] else None
        if data is None or starts is None or ends is None or (steps is not None and np.any(steps != 1)):
            return None
        n = len(data)
        return data[slice(*(int(np.clip(v if v >= 0 else v + n, 0, n)) for v in (starts[0], ends[0])))]
    if op == "ConstantOfShape":
        length = entries(0)
        fill = _attr(node, "value", None)
        fill = numpy_helper.to_array(fill).reshape(-1)[0].item() if fill is not None else 0.0
        return [fill] * length[0] if length and len(length) == 1 and isinstance(length[0], int) else None
    if op in ("Mul", "Equal", "Add", "Sub"):   # Sub: the token exit's text-only shapes (the visual tokens' count off)
        a, b = entries(0), entries(1)
        if a is None or b is None or min(len(a), len(b)) != 1 and len(a) != len(b):
            return None
        n = max(len(a), len(b))
        a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
        return [_entry_op(op, x, y) for x, y in zip(a, b)]
    if op == "Where":
        c, x, y = entries(0), entries(1), entries(2)
        if c is None or x is None or y is None:
            return None
        n = max(len(c), len(x), len(y))
        c, x, y = ([e] * n if len(e) == 1 else e for e in (c, x, y))
        return [None if not isinstance(ci, bool) else (xi if ci else yi) for ci, xi, yi in zip(c, x, y)]
    return None


def _entry_op(op: str, x, y):
    """``x * y``, ``x + y``, ``x - y`` or ``x == y`` for one shape entry (a dim read from a shape is never
    negative); a dim plus or minus anything but 0 is unknown."""
    known = lambda e: isinstance(e, (int, float)) and not isinstance(e, bool)  # noqa: E731
    if op in ("Add", "Sub"):
        if known(x) and known(y):
            return x + y if op == "Add" else x - y
        if known(y) and y == 0 and not isinstance(x, bool):
            return x
        return y if op == "Add" and known(x) and x == 0 and not isinstance(y, bool) else None
    if op == "Mul":
        if known(x) and known(y):
            return x * y
        if x is not None and known(y) and not isinstance(x, bool):
            return ("mul", x, int(y)) if y != 1 else x
        if y is not None and known(x) and not isinstance(y, bool):
            return ("mul", y, int(x)) if x != 1 else y
        return None
    if known(x) and known(y):
        return x == y
    if isinstance(x, tuple) and known(y) and y < 0 or isinstance(y, tuple) and known(x) and x < 0:
        return False
    return None


def _entry_keeps(model, reshape, entry, axis: int, dim, same_dims: dict[int, set[str]] | None = None) -> bool:
    """Whether a Reshape's target ``entry`` (from :func:`_shape_entries`) gives axis ``axis`` the input's
    size ``dim``: that static size, or read from the input's shape there, from a tensor in
    ``same_dims[axis]``, or from a dim that inference names like ``dim`` (the model input's ``batch``)."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry > 0 and entry == dim
    return isinstance(entry, tuple) and entry[0] == "dim" and (entry[2] == axis and (
        entry[1] == reshape.input[0] or same_dims is not None and entry[1] in same_dims.get(axis, ()))
        or isinstance(dim, str) and bool(dim) and _dim_name(model, entry[1], entry[2]) == dim)


def _split_sizes(model, node) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = constant_value(model, node.input[1])
        return None if value is None else [int(v) for v in value]
    split = _attr(node, "split", None)
    if split is not None:
        return list(split)
    shape = _shapes(model).get(node.input[0])
    axis = _attr(node, "axis", 0)
    if shape and isinstance(shape[axis], int):
        n = len(node.output)
        return [shape[axis] // n] * n
    return None


def _axes(model, node, input_index) -> list[int]:
    if len(node.input) > input_index and node.input[input_index]:
        value = constant_value(model, node.input[input_index])
        if value is None:
            raise _Unrecognised(f"{node.name}: non-constant axes")
        return [int(a) for a in value.reshape(-1)]
    axes = _attr(node, "axes", None)
    if axes is None:
        raise _Unrecognised(f"{node.name}: Squeeze without axes")
    return list(axes)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _fold(model, name) -> np.ndarray:
    """The value of ``name`` computed from constants only, e.g. the agent bias tables that the
    TorchScript exporter leaves as Resize/Reshape/Concat of parameters (dynamo folds them)."""
    value = fixed_value(model, name)
    if value is None:
        raise _Unrecognised(f"{name} is computed from the model's inputs")
    return value
