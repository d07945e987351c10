"""Finding the attention layers of a graph: its cores (softmax, ONNX ``Attention``, fused ``attnc`` nodes, agent
attention's two stages, attention sinks), each traced into an :class:`AttentionLayer` or given the reason it cannot
be pruned."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from attnc.compiler.errors import AttncError
from attnc.passes import linear, softmax
from attnc.passes.core import (collapse_flat_transposes, constant_value, consumers, drops_last_key, evaluate_tensors,
                               flat_transposes, name_nodes, past_max_shift, past_probability_casts, producers,
                               sink_concat, value_shapes)
from attnc.passes.prune_heads.model import AttentionLayer, _Depthwise, _HeadSplit, _Repeat, _Unrecognised
from attnc.passes.prune_heads.output import (_SCALAR_OPS, _channel_heads, _follow_channels, _holds_heads, _size,
                                             _trace_output)
from attnc.passes.prune_heads.shapes import _SHAPES_CACHE, _dim_at, _fold, _rank, _shape_entries, _shapes
from attnc.passes.prune_heads.trace import (_check_repeat, _follows_heads, _projected_walk, _restrict_columns,
                                            _restrict_heads, _trace_input, _Walk, _walk_back)

log = logging.getLogger(__name__)

# Per-head constant inputs of fused attnc nodes: input index -> heads axis (see plugins/*).
# Negative axes count from the end: agent biases broadcast to [B, H, n, M], so a folded
# [H, n, M] table and a [1, H, n, M] one both have their heads at -3 (learned agents too).
_PER_HEAD_INPUTS = {"NeighborhoodAttention": {3: 0}, "AgentAttention": {3: -3, 4: -3, 5: -3},
                    "KernelLinearAttention": {3: 0}}


def find_attention_layers(model: onnx.ModelProto) -> list[AttentionLayer]:
    """Every attention layer whose heads can be sliced, in graph order.

    Raises:
        AttncError: the graph has no attention core at all, or none whose Q/K/V and
            output could be traced to constant projections (the reason is in the message).
    """
    layers, misses = survey_attention_layers(model)
    if not layers:
        if misses:
            raise AttncError("no prunable attention layer: " + "; ".join(misses[:3]),
                             "head pruning needs Q/K/V/output projections that are constant MatMul weights")
        raise AttncError("the model has no recognisable attention (no Softmax->MatMul core, Attention or "
                         "attnc node)", "head pruning applies to transformer models with multi-head attention")
    for miss in misses:
        log.warning("prune_heads: skipped %s", miss)
    return layers


def survey_attention_layers(model: onnx.ModelProto) -> tuple[list[AttentionLayer], list[str]]:
    """``(layers, misses)``: every attention layer whose heads can be sliced, in graph order, and for each
    other attention core why not (``"<core node>: <reason>"``). Both empty without attention."""
    model = _prepared(model)
    prod, cons = producers(model), consumers(model)
    shapes = value_shapes(model)
    _SHAPES_CACHE.clear()
    _SHAPES_CACHE[id(model)] = shapes
    layers: list[AttentionLayer] = []
    misses: list[str] = []
    cores = [(node, core) for node in model.graph.node if (core := _core(model, node, prod, cons)) is not None]
    agents = _unfused_agents(model, cores, prod, cons)
    first_stages = {stage1.name for stage1, _ in agents.values()}
    outputs, values = {core[4] for _, core in cores}, {core[3] for _, core in cores}
    for node, (kind, q, k, v, out) in cores:
        if node.name in first_stages:
            continue  # one layer with its second stage
        if node.name not in agents and (v in outputs or out in values):
            misses.append(f"{node.name}: one of two chained attention stages that are not agent attention as "
                          "passes.agent matches it (e.g. lowered to two ONNX Attention nodes: prune before lowering)")
            continue
        try:
            if node.name in agents:
                # Q and the output from the second stage, K and V from the first.
                stage1, match = agents[node.name]
                _, _, k, v, _ = _core(model, stage1, prod, cons)
                layers.append(_layer(model, len(layers), node, "agent", q, k, v, out, prod, cons, shapes,
                                     _agent_parts(model, match, q, prod)))
                continue
            layers.append(_layer(model, len(layers), node, kind, q, k, v, out, prod, cons, shapes))
        except _Unrecognised as why:
            misses.append(f"{node.name}: {why}")
    return layers, misses


def attention_cores(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, str, str, str]]:
    """``(core node, Q, K, V, output)`` of every attention core in graph order (no head analysis)."""
    _SHAPES_CACHE.clear()   # (a sink's Slice is read with the shapes of this model)
    prod, cons = producers(model), consumers(model)
    return [(node, *core[1:]) for node in model.graph.node if (core := _core(model, node, prod, cons)) is not None]


def value_projection(model: onnx.ModelProto, v: str) -> onnx.NodeProto | None:
    """The ``MatMul`` projecting the values ``v`` of an attention core, or ``None``.

    V carries no rotary embedding, so this works where Q/K cannot be traced (RoPE models).
    """
    _SHAPES_CACHE.clear()
    _SHAPES_CACHE[id(model)] = value_shapes(model)
    try:
        _, proj = _trace_input(model, v, producers(model), consumers(model))
    except _Unrecognised:
        return None
    return next(n for n in model.graph.node if n.name == proj.matmul)


@dataclass
class _AgentParts:
    """What agent attention adds to a layer: agent tokens pooled from Q, per-head biases."""

    q: str                      # heads-first Q the agents are pooled from
    agents: str                 # the agent tokens A [B, H, n, D] (or a constant)
    core_nodes: set[str]        # nodes of the core itself (not followed when walking from Q or V)
    biases: list[tuple[str, int]]   # (node, input) of each bias


def _unfused_agents(model, cores, prod, cons) -> dict[str, tuple[onnx.NodeProto, Any]]:
    """``{second-stage Softmax: (first-stage Softmax, passes.agent Match)}`` for each unfused
    agent attention: two softmax cores chained by their values, as ``passes.agent`` matches them."""
    by_out = {core[4]: node for node, core in cores}
    if not any(core[3] in by_out for _, core in cores):
        return {}  # no chained stages: skip the agent matcher's copy of the graph
    from attnc.passes import agent as agent_pass

    found = {}
    for match in agent_pass.find(model).matches:
        stage2 = by_out.get(match.outputs[0])
        stage1 = by_out.get(_core(model, stage2, prod, cons)[3]) if stage2 is not None else None
        if stage1 is not None:
            found[stage2.name] = (stage1, match)
    return found


def _agent_parts(model, match, q, prod) -> _AgentParts:
    """The agent parts of an unfused match (``passes.agent``'s roles and node list); the agents
    are followed from the second stage's queries ``q`` before their scale (a heads-first tensor,
    where the match's ``Q`` may lie before the head-split Transpose)."""
    if constant_value(model, match.inputs["A"]) is not None:
        raise _Unrecognised("learned agent tokens are constants inside both stages here; fuse the graph with "
                            "passes.agent first (the fused op's agents are sliced on their heads axis)")
    biases = [(n.name, list(n.input).index(match.inputs[role])) for role in ("agent_bias", "query_bias")
              if role in match.inputs for n in model.graph.node
              if n.name in match.nodes and match.inputs[role] in n.input]
    while (node := prod.get(q)) is not None and node.op_type in _SCALAR_OPS and node.name in match.nodes:
        q = next(i for i in node.input if constant_value(model, i) is None)
    return _AgentParts(q, match.inputs["A"], set(match.nodes), biases)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with every node named, the SDPA decomposition's Kᵀ as one Transpose
    (``passes.core.collapse_flat_transposes``; names of the tensors on Q/K/V paths stay valid) and
    attention without a core pruning can read fused (:func:`_fused_for_pruning`)."""
    if all(n.name for n in model.graph.node) and not flat_transposes(model) \
            and not softmax.has_flattened_heads(model) and not _has_lightning_blocks(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    collapse_flat_transposes(copy)
    return _fused_for_pruning(copy)


def _fused_for_pruning(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the attention that has no core pruning can read fused: softmax attention computed on
    ``[B·H, S, D]`` (BLOOM's ``baddbmm``) into ONNX ``Attention``, whose 4-D inputs hold the heads apart (the
    flat form mixes them into the batch axis), and, where the graph has lightning attention's blocks
    (:func:`_has_lightning_blocks`), linear attention into ``attnc::KernelLinearAttention`` (``passes.linear``:
    MiniMax's blockwise loop, unrolled by the export, is no layer otherwise). The tensors the layers are
    scored by (each merge and output projection) keep their names."""
    if _has_lightning_blocks(model):
        model = linear.apply(model)[0]
    return softmax.apply(model, flattened_heads_only=True)[0]


def _has_lightning_blocks(model: onnx.ModelProto) -> bool:
    """Whether some ``MatMul`` of two computed tensors is multiplied by something and the product multiplied
    by a computed tensor: the intra-block term ``((q·kᵀ) ⊙ M)·v`` of lightning attention (cheap, unproven:
    ``passes.linear`` proves each match; a gated MLP's products meet constant weights)."""
    prod = producers(model)

    def computed(x) -> bool:
        return (node := prod.get(x)) is not None and node.op_type not in ("Constant", "Identity")

    for node in model.graph.node:
        mul = prod.get(node.input[0]) if node.op_type == "MatMul" and computed(node.input[1]) else None
        if mul is not None and mul.op_type == "Mul" and any(
                (x := prod.get(i)) is not None and x.op_type == "MatMul" and all(map(computed, x.input))
                for i in mul.input):
            return True
    return False


def _core(model, node, prod, cons):
    """``(kind, Q, Kᵀ-or-K, V, out)`` if ``node`` is an attention core, else ``None``."""
    if node.domain == "attnc" and len(node.input) >= 3:
        return f"attnc::{node.op_type}", node.input[0], node.input[1], node.input[2], node.output[0]
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        return "Attention", node.input[0], node.input[1], node.input[2], node.output[0]
    if node.op_type != "Softmax":
        return None
    probs, _ = past_probability_casts(model, node.output[0], cons)
    if (sink_drop := _sink_drop(model, probs, cons)) is not None:
        probs, _ = past_probability_casts(model, sink_drop.output[0], cons)
    pv = [c for c in cons.get(probs, []) if c.op_type == "MatMul" and c.input[0] == probs]
    if len(pv) != 1:
        return None
    scores = _walk_scores(_scores_input(model, node, prod, cons), prod)
    if scores is None:
        return None
    return "softmax", scores.input[0], scores.input[1], pv[0].input[1], pv[0].output[0]


def _sink_drop(model, probs, cons) -> onnx.NodeProto | None:
    """The ``Slice(P, 0, -1)`` on the last axis that is the only reader of the probabilities ``probs``: the
    sink's column dropped before P·V (attention sinks, gpt-oss), else ``None``."""
    users = cons.get(probs, [])
    if len(users) != 1 or users[0].op_type != "Slice":
        return None
    return users[0] if drops_last_key(model, users[0], len(_shapes(model).get(probs) or []) or None) else None


def _sink_concat(model, node, prod, cons) -> onnx.NodeProto | None:
    """For a Softmax ``node`` whose last probability column is dropped (:func:`_sink_drop`): the
    ``Concat([scores, sink], -1)`` it normalises, past the max subtraction ``x - ReduceMax(x, -1)`` (gpt-oss's
    guard against overflow; a softmax does not change with a shift of its row); else ``None``."""
    if _sink_drop(model, past_probability_casts(model, node.output[0], cons)[0], cons) is None:
        return None
    rank = len(_shapes(model).get(node.input[0]) or []) or None
    x, _ = past_max_shift(model, node.input[0], prod, rank)
    return sink_concat(x, prod, rank)


def _sink_input(model, node, prod, cons) -> tuple[onnx.NodeProto, int] | None:
    """``(node, input)`` holding the sink logits of a Softmax ``node`` with attention sinks, sliced with the
    heads on axis -3: the ``[1, H, 1, 1]`` parameter an ``Expand`` broadcasts over batch and queries (its target's
    heads entry must be 1, as ``expand(B, -1, S, -1)`` exports), or the joined column itself (a static export's
    folded copy); ``None`` without sinks."""
    concat = _sink_concat(model, node, prod, cons)
    if concat is None:
        return None
    expand = prod.get(concat.input[1])
    if expand is None or expand.op_type != "Expand":
        return concat, 1
    entries = _shape_entries(model, expand.input[1], prod)
    if entries is None or len(entries) < 3 or entries[-3] != 1:
        raise _Unrecognised(f"{expand.name}: the sinks are expanded to {entries}, whose heads entry is not 1 (pruning "
                            "slices the sinks, not the shape they are expanded to)")
    return expand, 0


def _scores_input(model, node, prod, cons) -> str:
    """Where a Softmax ``node``'s scores path starts: its input, or the scores joined to the sinks."""
    concat = _sink_concat(model, node, prod, cons)
    return node.input[0] if concat is None else concat.input[0]


def _walk_scores(t, prod):
    """From the Softmax input back over mask / scale ops to ``MatMul(Q, Kᵀ)``."""
    found = _scores_path(t, prod)
    return None if found is None else found[0]


def _scores_path(t, prod) -> tuple[onnx.NodeProto, list[tuple[onnx.NodeProto, str]]] | None:
    """``(MatMul(Q, Kᵀ), [(node, the input carrying the scores)])`` from the Softmax input back over
    mask / bias / scale ops, or ``None``."""
    path = []
    for _ in range(8):
        node = prod.get(t)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node, path
        if node.op_type in ("Add", "Sub", "Mul", "Div"):
            computed = [i for i in node.input if i in prod and prod[i].op_type != "Constant"]
            matmul = [i for i in computed if prod[i].op_type in ("MatMul", "Mul", "Div", "Add", "Where", "Tanh")]
            if not matmul:
                return None
            nxt = next((i for i in matmul if prod[i].op_type == "MatMul"), matmul[0])
        elif node.op_type == "Where":
            nxt = node.input[2] if node.input[2] in prod and prod[node.input[2]].op_type != "Constant" else node.input[1]
        elif node.op_type in ("Cast", "Identity", "Tanh"):   # Tanh: Gemma 2's soft-capping
            nxt = node.input[0]
        else:
            return None
        path.append((node, nxt))
        t = nxt
    return None


def _score_terms(model, kind, node, prod, cons, heads: int) -> list[tuple[str, int, int]]:
    """``(node, input, -3)`` of each operand added to (or masking, scaling) the ``[B, H, S_q, S_kv]``
    scores that has ``heads`` entries on the heads axis: pruning gathers the kept heads from it.

    A softmax core's scores path (``_scores_path``) and an ONNX ``Attention`` node's ``attn_mask``
    are read; operands of size 1 there (HF's ``[B, 1, S, S]`` masks) or of rank < 3 broadcast.
    Where inference leaves the size unknown the operand is evaluated at two input sizes.
    """
    if kind == "softmax":
        found = _scores_path(_scores_input(model, node, prod, cons), prod)
        operands = [(n, i) for n, path in (found[1] if found else []) for i, x in enumerate(n.input)
                    if x and x != path]
    elif kind == "Attention" and len(node.input) > 3 and node.input[3]:
        operands = [(node, 3)]
    else:
        return []
    terms = []
    for owner, i in operands:
        x = owner.input[i]
        value = constant_value(model, x)
        shape = list(value.shape) if value is not None else _shapes(model).get(x)
        size = _dim_at(shape, 1, 4) if shape is None or len(shape) <= 4 else None
        if size is None:
            try:
                sizes = {_dim_at(list(r[x].shape), 1, 4) for r in evaluate_tensors(model, [x])}
            except Exception as exc:  # noqa: BLE001 - an operand that cannot be evaluated is not provably shared
                raise _Unrecognised(f"{owner.name}: cannot tell whether {x} on the scores has a heads axis "
                                    f"({type(exc).__name__})") from None
            if len(sizes) != 1:
                raise _Unrecognised(f"{owner.name}: {x} on the scores has {sorted(map(str, sizes))} entries on the "
                                    "heads axis at different input sizes")
            size = sizes.pop()
        if size in ("absent", 1):
            continue
        if size != heads:
            raise _Unrecognised(f"{owner.name}: {x} on the scores has {size} entries on the heads axis, not {heads}")
        terms.append((owner.name, i, -3))
    return terms


def _layer(model, index, node, kind, q, k, v, out, prod, cons, shapes,
           agent: _AgentParts | None = None) -> AttentionLayer:
    walks = {role: _projected_walk(_walk_back(model, t, prod), t) for role, t in (("Q", q), ("K", k), ("V", v))}
    for walk in walks.values():
        _restrict_columns(walk)
        _restrict_heads(walk)
        for node_name, entry in walk.follows:
            if not _follows_heads(model, entry, walk.path, prod):
                raise _Unrecognised(f"{node_name}: its shape's head entry {entry} is not read from the heads on the "
                                    "way to the core (pruning would not change it)")
    roles = {role: (walk.split, walk.proj) for role, walk in walks.items()}
    heads = {role: walk.proj.columns.shape[0] for role, walk in walks.items()}
    ranges = {role: walk.heads_range for role, walk in walks.items() if walk.heads_range is not None}
    h = heads["Q"]
    kv_of_head, repeats = None, []
    if heads["K"] != h or heads["V"] != h or walks["K"].repeat or walks["V"].repeat:
        kv_of_head, repeats = _grouping(model, kind, heads, walks, prod)
    elif walks["Q"].repeat:
        raise _Unrecognised(f"{walks['Q'].repeat.reshape}: the query heads are repeated")
    qd = roles["Q"][1].columns.shape[1]
    vd = roles["V"][1].columns.shape[1]
    # Tensors whose dims the core output shares on axes 0 (batch), 2 (queries) and 3 (value dim):
    # a Reshape after the core that reads its other entries from them keeps the heads axis.
    same_dims = {0: {out}, 2: {out}, 3: {out}}
    for role, axes in (("Q", (0, 2)), ("K", (0,)), ("V", (0, 3))):
        for tensor, head_axis in walks[role].path.items():
            if head_axis == 1 and _rank(model, tensor) == 4:
                for axis in axes:
                    same_dims[axis].add(tensor)
    merge, out_proj, merged, added, head_reshapes, kept_reshapes, channel_ops = _trace_output(
        model, out, h, vd, prod, cons, same_dims)
    if out_proj.columns.shape != (h, vd):
        raise _Unrecognised(f"output projection rows {out_proj.columns.shape} do not match {h} heads x {vd}")
    if kind == "attnc::AgentAttention":
        agent = _AgentParts(node.input[0], node.input[3], {node.name}, [])
    core_nodes = agent.core_nodes if agent else {prod[out].name}
    reshapes: list[_HeadSplit] = []
    depthwise: list[_Depthwise] = []
    # Terms added to the merged heads (agent attention's depthwise conv of V) lose the same channels.
    merged_heads = np.empty(h * vd, dtype=np.int64)
    for i, rows in enumerate(out_proj.columns):
        merged_heads[rows] = i
    for add, term in added:
        layout, found_reshapes, found_convs = _follow_channels(model, v, term, h, vd, core_nodes, prod, cons)
        if any(_holds_heads(axis) for axis in layout[:-1]) \
                or not np.array_equal(_channel_heads(layout[-1], term), merged_heads):
            raise _Unrecognised(f"{add}: the term added to the merged heads does not carry V's heads on the "
                                "same channels")
        reshapes += found_reshapes
        depthwise += found_convs
    per_head, folded = [], {}
    if kind == "attnc::KernelLinearAttention" and (node.input[4:5] not in ([], [""]) or
                                                   node.output[1:2] not in ([], [""])):
        raise _Unrecognised(f"{node.name} carries a recurrent state (input 4 / output 1) whose heads are part of "
                            "the model's inputs and outputs; prune the model before exporting its decode step")
    constants = [(node, i, axis) for i, axis in _PER_HEAD_INPUTS.get(node.op_type, {}).items()
                 if kind.startswith("attnc::") and i < len(node.input) and node.input[i]]
    node_by_name = {n.name: n for n in model.graph.node}
    constants += [(node_by_name[name], i, -3) for name, i in (agent.biases if agent else [])]
    if kind == "softmax" and (sink := _sink_input(model, node, prod, cons)) is not None:
        constants.append((*sink, -3))
    for owner, i, axis in constants:
        t = owner.input[i]
        value = constant_value(model, t)
        if value is None and agent is not None and t == agent.agents:
            continue  # agents pooled from Q: followed below
        computed = value is None
        if computed:
            value = _fold(model, t)
        if not -value.ndim <= axis < value.ndim:
            continue  # too few dims to reach the heads: broadcast over them
        if value.shape[axis] not in (h, 1):
            raise _Unrecognised(f"per-head input {i} of {owner.name} of shape {value.shape} does not have "
                                f"{h} heads on axis {axis}")
        if value.shape[axis] != h:
            continue  # broadcast over the heads
        per_head.append((owner.name, i, axis))
        if computed:
            folded[t] = value
    agents = None
    if agent is not None:
        a_shape = shapes.get(agent.agents) or []
        agents = a_shape[2] if len(a_shape) == 4 and isinstance(a_shape[2], int) else None
        if constant_value(model, agent.agents) is None:
            layout, found_reshapes, found_convs = _follow_channels(model, agent.q, agent.agents, h, qd,
                                                                   agent.core_nodes, prod, cons)
            # [B, H, n, D], or [B, H, D, n] where the unfused stages transpose it
            if len(layout) != 4 or layout[1] != [("h", h)] or _holds_heads(layout[0]) \
                    or sorted(_holds_heads(axis) for axis in layout[2:]) != [False, True] \
                    or [("d", qd)] not in layout[2:]:
                raise _Unrecognised(f"the agent tokens {agent.agents} do not keep Q's heads apart")
            agents = _size(next(axis for axis in layout[2:] if not _holds_heads(axis)))
            reshapes += found_reshapes
            depthwise += found_convs
    counts = (h, h if kv_of_head is None else int(kv_of_head.max()) + 1)
    for node_name, _, count in (r for walk in walks.values() for r in walk.regroups):
        if count not in counts:
            raise _Unrecognised(f"{node_name}: writes {count} heads on the Q/K/V path, neither the {counts[0]} query "
                                f"heads nor the {counts[1]} K/V heads")
    q_shape = shapes.get(q) or []
    v_shape = shapes.get(v) or []
    tokens = q_shape[2] if len(q_shape) == 4 and isinstance(q_shape[2], int) else None
    key_tokens = v_shape[2] if len(v_shape) == 4 and isinstance(v_shape[2], int) else None
    return AttentionLayer(index, node.name, kind, h, qd, vd, tokens, key_tokens, roles, merge, out_proj, per_head,
                          merged, agents, reshapes, depthwise, folded, kv_of_head=kv_of_head, repeats=repeats,
                          score_terms=_score_terms(model, kind, node, prod, cons, h), head_reshapes=head_reshapes,
                          kept_reshapes=kept_reshapes, heads_ranges=ranges, channel_ops=channel_ops,
                          head_regroups=list(dict.fromkeys((node_name, axis, role, count)
                                                           for role, walk in walks.items()
                                                           for node_name, axis, count in walk.regroups)),
                          interface=_interface(model, walks, heads, h))


def _grouping(model, kind, heads: dict[str, int], walks: dict[str, _Walk], prod
              ) -> tuple[np.ndarray, list[_Repeat]]:
    """Grouped-query attention: the KV head each query head reads, and the repeats of the K/V
    heads in front of the core (whose shape entries pruning rewrites)."""
    h, kv_heads = heads["Q"], heads["K"]
    repeat_k, repeat_v = walks["K"].repeat, walks["V"].repeat
    if heads["V"] != kv_heads or walks["Q"].repeat is not None or h % kv_heads:
        raise _Unrecognised(f"Q/K/V head counts {heads} are not grouped-query attention (query heads in whole "
                            "groups per K/V head, K and V alike)")
    group = h // kv_heads
    if repeat_k is None and repeat_v is None:
        if kind == "Attention" or (kind == "softmax" and kv_heads == 1):
            # ONNX Attention repeats each KV head g times (h // g); a MatMul broadcasts one KV head.
            return np.arange(h) // group, []
        raise _Unrecognised(f"Q/K/V head counts differ {heads} and the K/V heads are not repeated in a way "
                            "pruning can follow")
    if repeat_k is None or repeat_v is None or repeat_k.kv_major != repeat_v.kv_major:
        raise _Unrecognised(f"K and V heads are not repeated alike ({repeat_k and repeat_k.reshape}, "
                            f"{repeat_v and repeat_v.reshape})")
    for role, repeat in (("K", repeat_k), ("V", repeat_v)):
        _check_repeat(model, repeat, h, kv_heads, walks[role].path, prod)
    return (np.arange(h) // group if repeat_k.kv_major else np.arange(h) % kv_heads), [repeat_k, repeat_v]


def _interface(model, walks: dict[str, _Walk], heads: dict[str, int], h: int) -> dict[str, tuple[int, int, str]]:
    """``{name: (heads axis, head count, role)}`` of the graph inputs and outputs that hold a layer's heads: the cache
    inputs its K/V are concatenated behind (a generation step's ``past_key_values.N.key``) and the graph outputs on
    its Q/K/V paths (``present.N.key``), each holding the role's heads (``heads[role]``: the K/V heads of grouped-query
    attention) or, behind a repeat of the K/V heads, the ``h`` query heads. Pruning declares the new count there."""
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    found: dict[str, tuple[int, int, str]] = {}
    for role, walk in walks.items():
        for name, axis, behind_repeat in walk.interface:
            count = heads[role] if behind_repeat or walk.repeat is None else h
            dims = values[name].type.tensor_type.shape.dim
            declared = dims[axis].dim_value if axis < len(dims) and dims[axis].HasField("dim_value") else None
            if declared is not None and declared != count or found.get(name, (axis, count))[:2] != (axis, count):
                raise _Unrecognised(f"{name}, a graph input or output on the {role} path, declares {declared} heads "
                                    f"on axis {axis} where the path holds {count}")
            found.setdefault(name, (axis, count, role))
    return found
