"""What every pass shares: match records, near-miss records, and graph plumbing.

A *fusion pass* is a module in this package with ``FAMILY`` (e.g. ``"neighborhood"``)
and two functions::

    find(model: onnx.ModelProto) -> PassReport          # matches + near-misses, no change
    apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]

``apply`` returns a model ONNX Runtime can run; when nothing matches it returns the
input model unchanged. Fused nodes are in domain ``attnc`` and the model carries
their ONNX function bodies (see ``attnc.plugins``), so any backend that knows
nothing of attnc still runs them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from attnc import DOMAIN, DOMAIN_VERSION
from attnc.compiler.onnx_io import initializer_array, light_copy, light_initializer, ort_session

log = logging.getLogger(__name__)


@dataclass
class Match:
    """One subgraph a pass recognised (and, in ``apply``, replaced).

    Attributes:
        family: attention family, e.g. ``"neighborhood"``.
        op_type: the op it becomes, e.g. ``"NeighborhoodAttention"`` (domain ``attnc``)
            or ``"Attention"`` (ONNX standard).
        nodes: names of the nodes the match covers.
        inputs: role -> tensor name (``{"Q": ..., "K": ..., "V": ...}``).
        outputs: tensor names the fused node produces.
        attributes: attributes of the fused node.
        shapes: role -> shape as far as known (ints or symbolic names).
        route: for a match whose form was chosen per shape class (agent attention under
            ``lower_to_attention="auto"``): ``{"route": "fused"|"lowered", "source", "reason"}``.
    """

    family: str
    op_type: str
    nodes: list[str]
    inputs: dict[str, str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list] = field(default_factory=dict)
    route: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class NearMiss:
    """A place that looked like ``family`` but was left alone, and why."""

    family: str
    anchor: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassReport:
    """What one pass found (and did)."""

    family: str
    matches: list[Match] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    rewritten: int = 0

    def to_dict(self) -> dict:
        return {"family": self.family, "rewritten": self.rewritten,
                "matches": [m.to_dict() for m in self.matches],
                "near_misses": [n.to_dict() for n in self.near_misses]}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- plumbing

def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` if it is an initializer, a ``Constant`` output, or an ``Identity``
    of one (the TorchScript exporter shares equal initializers, e.g. zero-initialised biases, that way)."""
    for init in model.graph.initializer:
        if init.name == name:
            return initializer_array(init)   # a stand-in stub's too (fuse_attention's working copy)
    for node in model.graph.node:
        if node.op_type == "Identity" and node.output and node.output[0] == name:
            return constant_value(model, node.input[0])
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
    return None


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` (or higher) in the model."""
    for entry in model.opset_import:
        if entry.domain == domain:
            entry.version = max(entry.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def add_function(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Attach a fused op's function body to ``model`` once, with the opsets it needs."""
    key = (function.domain, function.name, function.overload)
    if any((f.domain, f.name, f.overload) == key for f in model.functions):
        return
    model.functions.append(function)
    if function.overload:  # overloaded functions need IR version 10
        model.ir_version = max(model.ir_version, 10)
    ensure_opset(model, DOMAIN, DOMAIN_VERSION)
    for entry in function.opset_import:
        if entry.domain != DOMAIN:
            ensure_opset(model, entry.domain, entry.version)


def live_nodes(nodes: Sequence[onnx.NodeProto], outputs: Sequence[str]) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes (in order) that ``outputs`` depend on, and every tensor name they read."""
    needed = set(outputs)
    keep: list[onnx.NodeProto] = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(subgraph_inputs(node))
    return keep[::-1], needed


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes (and initializers) that no graph output depends on any more."""
    graph = model.graph
    keep, needed = live_nodes(graph.node, [o.name for o in graph.output])
    del graph.node[:]
    graph.node.extend(keep)
    for index in reversed([k for k, init in enumerate(graph.initializer) if init.name not in needed]):
        del graph.initializer[index]   # in place: re-adding the live ones would copy every weight
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Every tensor name the nodes of ``node``'s subgraphs (If/Loop/Scan bodies) read."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(subgraph_inputs(n))
    return names


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that produces it."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            table.setdefault(name, []).append(node)
    return table


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so matches and near-misses can cite it."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def toposort(model: onnx.ModelProto) -> None:
    """Order nodes so each comes after its producers (needed after in-place inserts).

    Stable: each node, in the graph's order, is placed after its producers not placed yet, depth first; an ordered
    graph is left as it is, and a node a pass appended at the end moves up to just in front of its first consumer,
    the others keeping their order (a pruned encoder-decoder graph lists its layers as before). A cycle or a
    dangling input leaves the nodes involved where they are.
    """
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: j for j, node in enumerate(nodes) for out in node.output if out}

    def needs(j: int) -> list[int]:
        node = nodes[j]
        names = list(node.input) + sorted(subgraph_inputs(node) - _outer_free(node))
        return [producer[n] for n in names if n in producer and producer[n] != j]

    state = [0] * len(nodes)   # 0: not reached, 1: on the stack, 2: placed
    ordered: list[onnx.NodeProto] = []
    for root in range(len(nodes)):
        if state[root]:
            continue
        state[root] = 1
        stack = [(root, iter(needs(root)))]
        while stack:
            j, pending = stack[-1]
            for k in pending:
                if not state[k]:   # state 1: a cycle, left as it is
                    state[k] = 1
                    stack.append((k, iter(needs(k))))
                    break
            else:
                stack.pop()
                state[j] = 2
                ordered.append(nodes[j])
    del graph.node[:]
    graph.node.extend(ordered)


def _outer_free(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs define themselves (not outer-scope references)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            names.update(i.name for i in g.input)
            names.update(i.name for i in g.initializer)
            for n in g.node:
                names.update(n.output)
    return names


def value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> shape (ints, symbolic names or None) after ONNX shape inference."""
    return value_shapes_and_types(model)[0]


def value_shapes_and_types(model: onnx.ModelProto, data_prop: bool = True) -> tuple[dict[str, list], dict[str, int]]:
    """Tensor name -> shape (as :func:`value_shapes`) and -> ONNX element type, from one inference.

    ``data_prop=False`` skips data propagation, which takes seconds on graphs with large
    constant masks.
    """
    try:
        # without the data of initializers of 64 KiB and more (weights, large masks): inference reads only their
        # shapes, a model past protobuf's 2 GiB cannot be serialised with them, and a smaller one would cost a copy
        # of every weight into the inference per call
        inferred = onnx.shape_inference.infer_shapes(light_copy(model), strict_mode=False, data_prop=data_prop)
    except Exception:  # shapes and types are hints for matching, never a requirement
        inferred = model
    g = inferred.graph
    shapes, types = {}, {}
    for info in list(g.input) + list(g.output) + list(g.value_info):
        t = info.type.tensor_type
        types[info.name] = t.elem_type
        if t.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name], types[init.name] = list(init.dims), init.data_type
    return shapes, types


def with_input_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph inputs named in ``input_shapes`` have those static shapes
    (for shape inference at a given size; the copy is not meant to be run or saved).

    Raises:
        ValueError: a shape's rank differs from its input's.
    """
    pinned = light_copy(model)   # without the weights' data: an LLM's would be copied for every size
    for value in pinned.graph.input:
        shape = input_shapes.get(value.name)
        if shape is None:
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            raise ValueError(f"input {value.name!r} has rank {len(dims)}, the shape given for it {list(shape)}")
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    return pinned


# ----------------------------------------------------------------------------- evaluation
# Shared by the fusion passes that must *prove* a mask or decay table (softmax causal
# masks, linear-attention causal/decay masks): such tensors are either constants or
# computed from input shapes only (Range/Shape arithmetic under dynamic axes).

def scalar_constant(model: onnx.ModelProto, name: str) -> float | None:
    """The value of ``name`` if it is a constant holding a single number, else ``None``."""
    value = constant_value(model, name)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def same_dim(a, b) -> bool:
    """Whether two inferred dims (from :func:`value_shapes`) are known to be equal: the same positive
    int, or the same symbolic name; an unknown dim equals nothing."""
    return (isinstance(a, int) and a > 0 or isinstance(a, str) and bool(a)) and a == b


def flat_transposes(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto]]:
    """``(outer Reshape, Transpose, inner Reshape)`` of every ``Reshape(Transpose(Reshape(x), [0, 2, 1]))``
    (unproven: :func:`collapse_flat_transposes` checks the shapes)."""
    prod = producers(model)
    found = []
    for outer in model.graph.node:
        t = prod.get(outer.input[0]) if outer.op_type == "Reshape" else None
        inner = prod.get(t.input[0]) if t is not None and t.op_type == "Transpose" else None
        if inner is not None and inner.op_type == "Reshape" and list(node_attribute(t, "perm", [])) == [0, 2, 1]:
            found.append((outer, t, inner))
    return found


def collapse_flat_transposes(model: onnx.ModelProto) -> int:
    """Rewrite ``Reshape(Transpose(Reshape(x, [L, a, b]), [0, 2, 1]), [*lead, b, a])`` as a
    ``Transpose`` swapping the last two axes of ``x [*lead_x, a, b]``, in place; returns how many.

    That sandwich (leading axes flattened, a rank-3 transpose, leading axes restored) is how the
    dynamo exporter's ``scaled_dot_product_attention`` decomposition transposes K. Its shape
    constants hold ``B·H`` in static exports, which head pruning could not follow; the passes
    read a plain Transpose. When ``x``'s leading axes are not ``lead`` (the exporter merged
    ``repeat_kv``'s ``[B, H_kv, g, S, D] -> [B, H, S, D]`` into the flattening), a Reshape to
    ``[*lead, a, b]`` goes first; that needs both static. Only sandwiches whose shapes inference
    proves are rewritten: the flattened tensor keeps ``x``'s last two dims and the result ends
    in the two swapped (the Reshapes keep the element count, so the flattened axis is the
    product of the leading ones, in the same order). The new Transpose keeps the outer
    Reshape's name and output.
    """
    sandwiches = flat_transposes(model)
    if not sandwiches:
        return 0
    shapes, cons = value_shapes(model), consumers(model)
    count = 0
    for outer, t, inner in sandwiches:
        x = inner.input[0]
        xs, flat, out = shapes.get(x) or [], shapes.get(inner.output[0]) or [], shapes.get(outer.output[0]) or []
        if len(xs) < 3 or len(flat) != 3 or len(out) < 3 or len(cons.get(inner.output[0], [])) != 1 \
                or len(cons.get(t.output[0], [])) != 1:
            continue
        if not all(same_dim(a, b) for a, b in zip(list(flat[1:]) + list(out[-2:]), list(xs[-2:]) + [xs[-1], xs[-2]])):
            continue
        lead, lead_x = list(out[:-2]), list(xs[:-2])
        merge = len(lead) != len(lead_x) or not all(same_dim(a, b) for a, b in zip(lead, lead_x))
        if merge and not all(isinstance(d, int) and d > 0 for d in lead + lead_x + list(xs[-2:])):
            continue
        rank = len(out)
        perm = list(range(rank - 2)) + [rank - 1, rank - 2]
        src = x
        if merge:
            src, shape = outer.name + "/lead", outer.name + "/lead_shape"
            model.graph.initializer.append(numpy_helper.from_array(np.array(lead + list(xs[-2:]), np.int64), shape))
            model.graph.node.append(onnx.helper.make_node("Reshape", [x, shape], [src], name=outer.name + "/merge"))
        outer.CopyFrom(onnx.helper.make_node("Transpose", [src], [outer.output[0]], name=outer.name, perm=perm))
        count += 1
    if count:
        toposort(model)   # the merge Reshapes were appended
        remove_dead_nodes(model)
    return count


def nan_guard(model: onnx.ModelProto, probs: str, cons: Mapping[str, list[onnx.NodeProto]]
              ) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """``(IsNaN, Where)`` if ``probs`` is read only by ``Where(IsNaN(probs), 0, probs)``, else None.

    That guard is how the dynamo exporter's decomposition of ``scaled_dot_product_attention``
    ends its softmax: a fully masked row (all scores -inf) gives zeros instead of NaN. ONNX
    ``Attention`` (opset 23, with its errata) gives zeros for such a row too, and the fused
    ops' windows never mask a whole row, so a pass may absorb the guard. Only inputs that are
    already NaN or infinite come out differently (NaN instead of a zero row).
    """
    users = cons.get(probs, [])
    if len(users) != 2:
        return None
    isnan = next((u for u in users if u.op_type == "IsNaN"), None)
    where = next((u for u in users if u.op_type == "Where"), None)
    if isnan is None or where is None or [u.name for u in cons.get(isnan.output[0], [])] != [where.name]:
        return None
    if list(where.input) != [isnan.output[0], where.input[1], probs] or scalar_constant(model, where.input[1]) != 0:
        return None
    return isnan, where


def past_probability_casts(model: onnx.ModelProto, probs: str, cons: Mapping[str, list[onnx.NodeProto]]
                           ) -> tuple[str, list[str]]:
    """Follow softmax probabilities past what exporters put before the product with V.

    That is a ``Cast`` back to the input dtype (HF's ``softmax(dim=-1, dtype=float32).to(dtype)``),
    an ``Identity``, and the SDPA decomposition's NaN guard (``nan_guard``). Returns the tensor the
    P·V product reads and the names of the nodes passed (each read by nothing else).
    """
    passed: list[str] = []
    while True:
        users = cons.get(probs, [])
        if len(users) == 1 and users[0].op_type in ("Cast", "Identity"):
            passed.append(users[0].name)
            probs = users[0].output[0]
            continue
        guard = nan_guard(model, probs, cons)
        if guard is None:
            return probs, passed
        passed += [guard[0].name, guard[1].name]
        probs = guard[1].output[0]


def past_max_shift(model: onnx.ModelProto, t: str, prod: Mapping[str, onnx.NodeProto], rank: int | None
                   ) -> tuple[str, list[str]]:
    """``(x, [Sub, ReduceMax])`` where ``t = x - ReduceMax(x, keepdims)`` over the last axis (``rank``: x's,
    when known) or over all axes: a shift of each row, which a softmax over the last axis does not see
    (gpt-oss writes it against overflow); else ``(t, [])``."""
    sub = prod.get(t)
    mx = prod.get(sub.input[1]) if sub is not None and sub.op_type == "Sub" else None
    if mx is None or mx.op_type != "ReduceMax" or mx.input[0] != sub.input[0] or not node_attribute(mx, "keepdims", 1):
        return t, []
    if len(mx.input) > 1 and mx.input[1]:
        axes = constant_value(model, mx.input[1])
        axes = None if axes is None else [int(a) for a in np.atleast_1d(axes)]
        if axes is None:
            return t, []   # computed axes
    else:
        axes = node_attribute(mx, "axes", None)
    if axes is None or len(axes) == 0:   # all of them, unless noop_with_empty_axes
        last = not node_attribute(mx, "noop_with_empty_axes", 0)
    else:
        last = -1 in axes or (rank is not None and rank - 1 in axes)
    return (sub.input[0], [sub.name, mx.name]) if last else (t, [])


def drops_last_key(model: onnx.ModelProto, node: onnx.NodeProto, rank: int | None) -> bool:
    """``node`` is ``Slice(P, 0, -1)`` on the last axis (``rank``: P's, when known): attention sinks' column
    dropped from the probabilities (gpt-oss)."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return False
    bounds = [constant_value(model, i) if i else None for i in node.input[1:5]]
    if any(b is None for b in bounds[:3]) or (len(bounds) > 3 and bounds[3] is not None
                                              and np.any(np.asarray(bounds[3]) != 1)):
        return False
    starts, ends, axes = (np.atleast_1d(b).tolist() for b in bounds[:3])
    return starts == [0] and ends == [-1] and (axes == [-1] or (rank is not None and axes == [rank - 1]))


def sink_concat(t: str, prod: Mapping[str, onnx.NodeProto], rank: int | None) -> onnx.NodeProto | None:
    """The ``Concat([scores, sink])`` of two inputs along the last axis (``rank``: ``t``'s, when known) that
    computes ``t``: the row a softmax with attention sinks normalises; else None."""
    concat = prod.get(t)
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 2:
        return None
    return concat if node_attribute(concat, "axis", 0) in (-1, -1 if rank is None else rank - 1) else None


def depends_on_data(model: onnx.ModelProto, name: str) -> bool:
    """Whether ``name`` reads a graph input's *values* (not only its shape)."""
    produced = producers(model)
    graph_inputs = {i.name for i in model.graph.input}
    seen: set[str] = set()
    stack = [name]
    while stack:
        t = stack.pop()
        if t in seen or not t:
            continue
        seen.add(t)
        if t in graph_inputs:
            return True
        node = produced.get(t)
        if node is None or node.op_type in ("Shape", "Size"):
            continue
        stack.extend(node.input)
        stack.extend(subgraph_inputs(node))
    return False


_INTEGERS = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def fold_static_shapes(model: onnx.ModelProto) -> int:
    """In a graph of static inputs, replace the integer shape computations ONNX shape inference cannot follow by
    their values (in place), so that it knows the shapes behind them again; return how many tensors were folded.

    A TorchScript trace at static sizes keeps what Python computed from a tensor's size as ops: LLaVA-NeXT-Video's
    pooler reshapes each frame's features by ``int(math.sqrt(features.shape[1]))`` (``Shape``, ``Cast``, ``Sqrt``,
    ``Cast``). Shape inference propagates values through few ops (``Shape``, ``Gather``, ``Concat``, integer
    arithmetic), not those, so the pooled features' dims stay unknown, and every token axis behind them, the
    decoder's too: head pruning's head split and the token exit's token counts stop there. At static inputs such a
    tensor has one value: each integer tensor computed from the inputs' shapes alone (never their values) that a
    node of unknown output shape reads (OneVision's ``Tile`` of its newline token by the clip's batch) is evaluated
    (one ONNX Runtime run of what they depend on) and becomes an initializer. Nothing runs where an input is dynamic
    or no such node exists."""
    graph = model.graph
    if not graph.input or not all(d.HasField("dim_value") for i in graph.input for d in i.type.tensor_type.shape.dim):
        return 0
    shapes, types = value_shapes_and_types(model)
    fixed = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    data = {i.name for i in graph.input}   # what reads the inputs' values, in graph order
    for node in graph.node:
        reads = any(i in data for i in node.input) or subgraph_inputs(node) & data
        if node.op_type not in ("Shape", "Size") and reads:
            data.update(node.output)

    def unknown(name):
        return name not in shapes or not all(isinstance(d, int) for d in shapes[name])

    frontier = sorted({i for node in graph.node if any(unknown(o) for o in node.output if o)
                       for i in node.input if i and i not in data and i not in fixed and types.get(i) in _INTEGERS})
    if not frontier:
        return 0
    try:
        [values] = evaluate_tensors(model, frontier)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        log.info("fold_static_shapes: the shape computations do not run (%s); left as they are", exc)
        return 0
    folded = {}
    for name in frontier:
        value = np.asarray(values[name])
        if value.size <= 1024:   # shape vectors and indices, never a tensor of the model's size
            folded[name] = f"{name}/folded"
            graph.initializer.append(numpy_helper.from_array(value, folded[name]))
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in folded:
                node.input[k] = folded[name]
    stale = [v for v in graph.value_info if unknown(v.name)]   # inferred again from the folded values
    for v in stale:
        graph.value_info.remove(v)
    remove_dead_nodes(model)
    log.info("fold_static_shapes: %d shape computations folded", len(folded))
    return len(folded)


def fixed_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is a constant, or computed from constants and input *shapes* only
    with the same value at two sampled sizes (:func:`evaluate_tensors`): TorchScript's
    ``1 / sqrt(size(-1))``, a table it leaves as ops on parameters. ``None`` otherwise."""
    value = constant_value(model, name)
    if value is not None or not name or depends_on_data(model, name):
        return value
    try:
        values = [np.asarray(run[name]) for run in evaluate_tensors(model, [name])]
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        return None
    return values[0] if values and all(np.array_equal(values[0], v) for v in values[1:]) else None


def probe_session(model: onnx.ModelProto, weights_from: onnx.ModelProto | None = None):
    """A one-thread CPU ONNX Runtime session for a pass's probe of ``model``, silent on failures:
    a probe that cannot run raises, and the pass turns that into a near-miss (ONNX Runtime would
    also log each failed run as an error line)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = 1
    return ort_session(model, options, weights_from=weights_from)


def ancestry(model: onnx.ModelProto, names, produced: dict[str, onnx.NodeProto] | None = None
             ) -> tuple[set[str], list[onnx.NodeProto]]:
    """The tensors ``names`` are computed from (themselves included, and what subgraphs read from outside), and
    the nodes that compute them, in graph order. ``produced``: :func:`producers` of ``model``, where the caller
    holds it."""
    produced = producers(model) if produced is None else produced
    needed: set[str] = set()
    stack = list(names)
    while stack:
        t = stack.pop()
        if t in needed or not t:
            continue
        needed.add(t)
        node = produced.get(t)
        if node is not None:
            stack.extend(node.input)
            stack.extend(subgraph_inputs(node))
    return needed, [n for n in model.graph.node if any(o in needed for o in n.output)]


def probe_model(model: onnx.ModelProto, nodes, inputs, outputs, needed: set[str]) -> onnx.ModelProto:
    """A model of ``nodes`` alone, for a pass's probe: ``inputs`` and ``outputs`` as given, the initializers in
    ``needed`` as stubs whose data the session takes from ``model`` (``probe_session(..., weights_from=model)``:
    an LLM's embedding table is not serialised for every probe), ``model``'s opsets and functions."""
    graph = onnx.helper.make_graph(nodes, "probe", inputs, outputs, initializer=[
        light_initializer(i) for i in model.graph.initializer if i.name in needed])
    sub = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def evaluate_tensors(model: onnx.ModelProto, names: list[str], sizes: tuple[int, ...] = (5, 8),
                     dims: Mapping[str, Sequence[int]] | None = None) -> list[dict[str, np.ndarray]]:
    """Compute tensors ``names`` with ONNX Runtime on synthetic inputs.

    Every symbolic (or unknown) graph-input dimension is set to each of ``sizes`` in turn
    (one run per size; a single run when the graph has static inputs), a symbol ``dims`` names to its own size of
    that run (``{"past": (7, 11)}``: a cache's length apart from the new tokens'); a dimension named as a
    sum of others (``"past + seq"``, a generation step's mask over its cache and its new tokens)
    to that sum. Float inputs get standard-normal values, integer inputs zeros. Only the nodes
    ``names`` depend on run.
    Meant for tensors that depend on input *shapes* only (see :func:`depends_on_data`):
    it is how a pass checks that a mask is causal at several sequence lengths.
    """
    needed, nodes = ancestry(model, names)
    inputs = [i for i in model.graph.input if i.name in needed]
    sub = probe_model(model, nodes, inputs, [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in names],
                      needed)
    session = probe_session(sub, weights_from=model)
    static = all(d.HasField("dim_value") for i in inputs for d in i.type.tensor_type.shape.dim)
    rng = np.random.default_rng(0)
    results = []
    for run, size in enumerate(sizes[:1] if static else sizes):
        feeds = {}
        for info in inputs:
            t = info.type.tensor_type
            own = {symbol: values[run] for symbol, values in (dims or {}).items()}
            shape = [d.dim_value if d.HasField("dim_value") else sampled_dim(d.dim_param, size, own)
                     for d in t.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
            if np.issubdtype(dtype, np.floating):
                feeds[info.name] = rng.standard_normal(shape).astype(dtype)
            else:
                feeds[info.name] = np.zeros(shape, dtype=dtype)
        results.append(dict(zip(names, session.run(list(names), feeds))))
    return results


def dim_terms(name: str) -> list[str]:
    """The terms of a symbolic dim named as a sum (``"past + 18 + seq"`` -> ``["past", "18", "seq"]``: the dynamo
    exporter's derived dims, attnc's generation steps); ``[]`` for no name."""
    return [term.strip() for term in name.split("+")] if name else []


def dim_size(dim: int | str | None, sizes: Mapping[str, int]) -> int | None:
    """A dim's size: an int as it is, a sum of names and constants (:func:`dim_terms`) the sum of the names' sizes in
    ``sizes`` and the constants; None where a name has no size there (or the dim no name)."""
    if isinstance(dim, int):
        return dim
    terms = dim_terms(dim) if isinstance(dim, str) else []
    if not terms or not all(term.isdigit() or term in sizes for term in terms):
        return None
    return sum(int(term) if term.isdigit() else sizes[term] for term in terms)


def sampled_dim(name: str, size: int, sizes: Mapping[str, int] | None = None) -> int:
    """The size a symbolic dim ``name`` gets when every plain symbol is ``size`` (or its entry in ``sizes``): a sum
    of terms (``"past + seq"``, ``"seq + 1"``, as the dynamo exporter names derived dims) adds them up."""
    return dim_size(name, {term: (sizes or {}).get(term, size) for term in dim_terms(name)})


# ----------------------------------------------------------------------------- matching helpers
# Shared by passes that walk an exported graph backwards from a candidate output
# (agent, flow): one index built per pass run instead of rescanning the graph per lookup.

def default_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain (``ai.onnx``) opset version."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


class _Constants(dict):
    """``{name: value}`` whose initializers become numpy arrays when first read (an index over an LLM's graph would
    otherwise convert every weight up front)."""

    def __getitem__(self, name):
        value = super().__getitem__(name)
        if isinstance(value, onnx.TensorProto):
            value = initializer_array(value)
            self[name] = value
        return value

    def get(self, name, default=None):
        return self[name] if name in self else default


def named_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every node has a unique name."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    return copy


def node_attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The Python value of attribute ``name`` of ``node``, or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def canonical_einsum(equation: str | bytes) -> str:
    """``equation`` with its index letters renamed in order of appearance (``nhld,nhd->nhl``
    -> ``abcd,abd->abc``), so einsums compare by meaning, not by the letters a model used."""
    if isinstance(equation, bytes):
        equation = equation.decode()
    letters: dict[str, str] = {}
    out = []
    for ch in equation.replace(" ", ""):
        if ch.isalpha():
            out.append(letters.setdefault(ch, "abcdefghijklmnopqrstuvwxyz"[len(letters)]))
        else:
            out.append(ch)
    return "".join(out)


class GraphIndex:
    """Producers, consumers, inferred shapes and constants of one model, indexed once.

    Attributes:
        model: the indexed model (not copied: rebuild the index after editing it).
        prod / cons: tensor -> producing node / consuming nodes.
        shapes: tensor -> shape from :func:`value_shapes`.
        consts: tensor -> value for initializers and ``Constant`` outputs.
    """

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.prod = producers(model)
        self.cons = consumers(model)
        self.shapes = value_shapes(model)
        self.consts: dict[str, np.ndarray] = _Constants((i.name, i) for i in model.graph.initializer)
        for node in model.graph.node:
            if node.op_type == "Constant" and node.output:
                value = constant_value_of_node(node)
                if value is not None:
                    self.consts[node.output[0]] = value

    def node(self, tensor: str) -> onnx.NodeProto | None:
        """The node producing ``tensor``, looking through ``Identity`` nodes."""
        node = self.prod.get(tensor)
        while node is not None and node.op_type == "Identity":
            node = self.prod.get(node.input[0])
        return node

    def const(self, tensor: str) -> np.ndarray | None:
        """The value of ``tensor`` if it is constant (also through one ``Identity``/``Cast``)."""
        if tensor in self.consts:
            return self.consts[tensor]
        node = self.node(tensor)
        if node is not None and node.op_type in ("Identity", "Cast") and node.input[0] in self.consts:
            return self.consts[node.input[0]]
        return None

    def scalar(self, tensor: str) -> float | None:
        """The value of ``tensor`` if it is a constant float holding one number."""
        value = self.const(tensor)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
            return None
        return float(value.reshape(()))

    def rank(self, tensor: str) -> int | None:
        shape = self.shapes.get(tensor)
        return None if shape is None else len(shape)


def constant_value_of_node(node: onnx.NodeProto) -> np.ndarray | None:
    """The value a ``Constant`` node holds (any of its value attributes)."""
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.array(onnx.helper.get_attribute_value(attr), dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(onnx.helper.get_attribute_value(attr), dtype=np.int64)
    return None


def convert_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """``onnx.version_converter.convert_version`` that keeps the model's functions.

    The converter drops ``model.functions`` (the fused ops' bodies added by earlier passes)
    and the opset imports of their domains; they are put back unchanged, each function
    keeping the opset it declares. The converter runs on a light copy (:func:`light_copy`: a model past
    protobuf's 2 GiB cannot be serialised into it, a smaller one's weights would be copied twice); initializers
    it left alone get their data back from ``model``.
    """
    converted = onnx.version_converter.convert_version(light_copy(model), version)
    weights = {init.name: init for init in model.graph.initializer}
    for init in converted.graph.initializer:
        original = weights.get(init.name)
        if original is not None and init.data_location == onnx.TensorProto.EXTERNAL \
                and original.data_location != onnx.TensorProto.EXTERNAL and list(init.dims) == list(original.dims):
            init.CopyFrom(original)
    known = {o.domain for o in converted.opset_import}
    for entry in model.opset_import:
        if entry.domain not in known and entry.domain not in ("", "ai.onnx"):
            converted.opset_import.append(entry)
    existing = {(f.domain, f.name, f.overload) for f in converted.functions}
    for function in model.functions:
        if (function.domain, function.name, function.overload) not in existing:
            restored = converted.functions.add()
            restored.CopyFrom(function)
            _bump_function_opset(restored, version)
    return converted


# Ops whose schema changed between opsets 17 and 23 only by accepting more types or by new
# attributes/modes whose defaults keep the old behaviour: a body using them means the same
# thing at the higher opset (the ONNX checker wants a function's opset to match the model's).
_COMPATIBLE_CHANGES = {
    "Constant", "ConstantOfShape", "Cast", "CastLike", "Shape", "Size", "Reshape", "Transpose", "Squeeze",
    "Unsqueeze", "Flatten", "Identity", "If", "Loop", "Scan", "Equal", "Pad", "AveragePool", "ReduceMax",
    "ReduceMin", "Resize", "Split",
    # opset 27 added float16/bfloat16 to Range
    "Range",
    # opset 22 added bfloat16 to these
    "Elu", "Selu", "HardSigmoid", "HardSwish", "Softplus", "Softsign", "ThresholdedRelu", "Mish", "Dropout",
    "Conv", "ConvTranspose", "MaxPool", "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization",
    "LpNormalization", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
}


def _bump_function_opset(function: onnx.FunctionProto, version: int) -> None:
    """Raise a function's default-domain opset to ``version`` when its body means the same there."""
    from onnx import defs

    entry = next((o for o in function.opset_import if o.domain in ("", "ai.onnx")), None)
    if entry is None or entry.version >= version:
        return

    def unchanged(node) -> bool:
        if node.domain not in ("", "ai.onnx"):
            return True
        if node.op_type in _COMPATIBLE_CHANGES:
            return True
        try:
            return (defs.get_schema(node.op_type, entry.version).since_version
                    == defs.get_schema(node.op_type, version).since_version)
        except Exception:  # noqa: BLE001 - unknown op: leave the function as it is
            return False

    def all_nodes(nodes):
        for node in nodes:
            yield node
            for attr in node.attribute:
                for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                    yield from all_nodes(g.node)

    if all(unchanged(n) for n in all_nodes(function.node)):
        entry.version = version
