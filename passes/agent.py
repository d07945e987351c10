"""Agent attention -> one ``attnc::AgentAttention`` node (or two ONNX ``Attention`` nodes).

Matches two chained softmax-attention stages::

    V_A = MatMul(Softmax(MatMul(A·s₁, Kᵀ) [+ b₁]), V)       agent aggregation
    O   = MatMul(Softmax(MatMul(Q·s₂, Aᵀ) [+ b₂]), V_A)     agent broadcast

where the second stage's values are the first stage's output and the first stage's
queries are the second stage's keys (the agent tokens ``A``, compared after looking
through scalar scales and Transposes, so ``A`` and ``Aᵀ`` may come from different
Transposes of one pooled tensor). Every variant handled:

- ``MatMul`` or ``Einsum`` (``bhid,bhjd->bhij`` / ``bhij,bhjd->bhid``, any letters) for
  both products; ``Kᵀ``/``Aᵀ`` from any Transpose (chain) swapping the last two axes;
- the scale as constant scalar ``Mul``/``Div`` on the queries, the keys, the scores, or
  several of them (the product is the scale; both stages must agree, as the op has one);
- ``Softmax`` over the last axis or ``Exp(x [- ReduceMax x]) / ReduceSum(Exp(...))``;
- an optional additive bias per stage (any float tensor whose broadcast does not grow
  the scores' shape), which becomes the op's ``agent_bias`` / ``query_bias``;
- learned agents that constant folding split into two initializers (``s·A`` for one
  stage, ``Aᵀ`` for the other): compared by value, equal up to the scale;
- LeapLabTHU ``agent_deit.py`` (pooled queries as agents, interpolated bias tables, the
  depthwise-conv term — those stay ordinary ops) and lucidrains
  ``agent-attention-pytorch`` ``AgentSelfAttention(talking_heads=False)`` (learned agents
  scaled once and used by both stages).

Near-misses (left untouched, reported): a chained pair whose probabilities are mixed
before the value product (lucidrains' default ``talking_heads=True`` puts a 1x1 ``Conv``
over heads there), whose stages use different agent tensors, different scales, a
non-constant scale, or a non-additive mask (``Where``/masked_fill).

Emits ``attnc::AgentAttention`` (``attnc.plugins.agent``) with Transposes added where Q,
K or A are only available in another layout; with ``apply(..., lower_to_attention=True)``
the model is first converted to opset 23 and each match becomes two ONNX ``Attention``
nodes (TensorRT runs them as its native attention layers); broadcast agents and biases
get an ``Expand`` there, because ONNX Runtime's ``Attention`` does not broadcast the
batch of K/V nor the last two axes of ``attn_mask``.

Tests: ``tests/passes/test_agent.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from attnc.compiler.onnx_io import initializer_array
from attnc.passes.core import (GraphIndex, Match, NearMiss, PassReport, canonical_einsum,
                               convert_opset, default_opset, named_copy, node_attribute, remove_dead_nodes,
                               toposort, value_shapes, value_shapes_and_types, with_input_shapes)
from attnc.plugins import agent as plugin
from attnc.plugins.agent import routes

FAMILY = "agent"
ATTENTION_OPSET = 23
_SWAP_LAST = (0, 1, 3, 2)


class _Miss(Exception):
    """Raised while matching, with the near-miss reason."""


@dataclass
class _Operand:
    """A tensor seen as ``Transpose(base, perm) · factor`` (perm None = as is)."""

    base: str
    perm: tuple[int, ...] | None
    factor: float
    nodes: list[str] = field(default_factory=list)

    def key(self) -> tuple[str, tuple[int, ...]]:
        return self.base, self.perm or tuple(range(4))

    def transposed(self) -> "_Operand":
        perm = tuple((self.perm or tuple(range(4)))[i] for i in _SWAP_LAST)
        return _Operand(self.base, None if perm == tuple(range(4)) else perm, self.factor, self.nodes)


@dataclass
class _Stage:
    """One ``softmax(q kᵀ · scale + bias) v`` stage."""

    out: str
    q: _Operand
    k: _Operand           # in [B, H, M, D] layout (already un-transposed)
    v: str
    bias: str | None
    scale: float
    nodes: list[str]


@dataclass
class _Candidate:
    anchor: str
    stage1: _Stage
    stage2: _Stage

    @property
    def nodes(self) -> list[str]:
        return self.stage1.nodes + self.stage2.nodes


_EINSUM_QK = "abcd,abed->abce"   # x·yᵀ
_EINSUM_PV = "abcd,abde->abce"   # x·y


def _product(g: GraphIndex, tensor: str) -> tuple[onnx.NodeProto, str, str, bool] | None:
    """``tensor`` as a batched product: (node, left, right, right_is_transposed)."""
    node = g.node(tensor)
    if node is None:
        return None
    if node.op_type == "MatMul":
        return node, node.input[0], node.input[1], False
    if node.op_type == "Einsum":
        eq = canonical_einsum(node_attribute(node, "equation", b""))
        if eq == _EINSUM_QK:
            return node, node.input[0], node.input[1], True
        if eq == _EINSUM_PV:
            return node, node.input[0], node.input[1], False
    return None


def _operand(g: GraphIndex, tensor: str) -> _Operand:
    """Look through Transposes and constant scalar Mul/Div down to the source tensor."""
    perm: tuple[int, ...] | None = None
    factor, nodes = 1.0, []
    while True:
        node = g.node(tensor)
        if node is None:
            break
        if node.op_type == "Transpose":
            p = tuple(node_attribute(node, "perm", ()))
            if len(p) != 4:
                break
            perm = p if perm is None else tuple(p[i] for i in perm)
        elif node.op_type in ("Mul", "Div"):
            c1 = g.scalar(node.input[1])
            c0 = g.scalar(node.input[0]) if node.op_type == "Mul" else None
            if c1 is not None:
                factor = factor * c1 if node.op_type == "Mul" else factor / c1
                nodes.append(node.name)
                tensor = node.input[0]
                continue
            if c0 is not None:
                factor *= c0
                nodes.append(node.name)
                tensor = node.input[1]
                continue
            break
        else:
            break
        nodes.append(node.name)
        tensor = node.input[0]
    if perm == tuple(range(4)):
        perm = None
    return _Operand(tensor, perm, factor, nodes)


def _softmax_input(g: GraphIndex, probs: str) -> tuple[str, list[str]]:
    """The scores a last-axis softmax producing ``probs`` reads (raises _Miss otherwise)."""
    node = g.node(probs)
    if node is None:
        raise _Miss("the probabilities are a graph input")
    if node.op_type == "Softmax":
        axis = node_attribute(node, "axis", -1)
        if axis not in (-1, (g.rank(node.input[0]) or 0) - 1):
            raise _Miss(f"Softmax {node.name} is over axis {axis}, not the key axis")
        return node.input[0], [node.name]
    if node.op_type == "Div":
        num, den = g.node(node.input[0]), g.node(node.input[1])
        if num is not None and den is not None and num.op_type == "Exp" and den.op_type == "ReduceSum" \
                and den.input[0] == num.output[0]:
            axes = node_attribute(den, "axes") or (list(g.consts.get(den.input[1], [])) if len(den.input) > 1 else None)
            rank = g.rank(num.output[0]) or 4
            if not axes or [int(a) % rank for a in axes] != [rank - 1] or not node_attribute(den, "keepdims", 1):
                raise _Miss(f"ReduceSum {den.name} of the spelled-out softmax is not over the last axis")
            names, x = [node.name, num.name, den.name], num.input[0]
            sub = g.node(x)
            if sub is not None and sub.op_type == "Sub":
                mx = g.node(sub.input[1])
                if mx is not None and mx.op_type == "ReduceMax" and mx.input[0] == sub.input[0]:
                    return sub.input[0], names + [sub.name, mx.name]
            return x, names
    raise _Miss(f"the probabilities come from {node.op_type} {node.name}, not from a softmax "
                "(e.g. talking heads mix them across heads before the value product)")


def _stage(g: GraphIndex, out: str) -> _Stage:
    """Parse ``out = softmax(q kᵀ·s + b) v``; raises _Miss with the reason."""
    pv = _product(g, out)
    if pv is None or pv[3]:
        raise _Miss(f"{out!r} is not a probabilities·values product")
    pv_node, probs, v, _ = pv
    scores, nodes = _softmax_input(g, probs)
    nodes = [pv_node.name] + nodes
    bias, factor = None, 1.0
    x = scores
    while True:
        node = g.node(x)
        if node is None:
            raise _Miss("the softmax input is a graph input, not MatMul(Q, Kᵀ)")
        if _product(g, x) is not None:
            break
        if node.op_type in ("Mul", "Div") and g.scalar(node.input[1]) is not None:
            c = g.scalar(node.input[1])
            factor = factor * c if node.op_type == "Mul" else factor / c
            x = node.input[0]
        elif node.op_type == "Mul" and g.scalar(node.input[0]) is not None:
            factor *= g.scalar(node.input[0])
            x = node.input[1]
        elif node.op_type == "Add" and bias is None:
            if factor != 1.0:
                raise _Miss(f"a scale after Add {node.name} scales the bias too; only a scale before the bias is fused")
            left, right = (_product(g, i) is not None or _scaled_product(g, i) for i in node.input)
            if left == right:
                raise _Miss(f"Add {node.name} on the scores: cannot tell the scores from the bias")
            x, bias = (node.input[0], node.input[1]) if left else (node.input[1], node.input[0])
        elif node.op_type in ("Where", "Add"):
            raise _Miss(f"the scores go through {node.op_type} {node.name} "
                        "(a boolean mask or a second bias); only one additive bias is fused")
        else:
            raise _Miss(f"the scores come from {node.op_type} {node.name}, not from MatMul(Q, Kᵀ)")
        nodes.append(node.name)
    qk_node, q_in, k_in, k_is_plain = _product(g, x)
    nodes.append(qk_node.name)
    q = _operand(g, q_in)
    k = _operand(g, k_in)
    if not k_is_plain:  # MatMul takes Kᵀ: turn it back into K's layout
        k = k.transposed()
    nodes += q.nodes + k.nodes
    for role, t in (("values", v), ("queries", q.base), ("keys", k.base)):
        if g.rank(t) not in (4, None):
            raise _Miss(f"the {role} {t!r} are rank {g.rank(t)}, not [B, H, tokens, D]")
    if bias is not None:
        _check_bias(g, bias, qk_node.output[0])
    return _Stage(out, q, k, v, bias, factor * q.factor * k.factor, nodes)


def _scaled_product(g: GraphIndex, tensor: str) -> bool:
    node = g.node(tensor)
    while node is not None and node.op_type in ("Mul", "Div") and g.scalar(node.input[1]) is not None:
        tensor = node.input[0]
        node = g.node(tensor)
    return _product(g, tensor) is not None


def _check_bias(g: GraphIndex, bias: str, scores: str) -> None:
    b_shape, s_shape = g.shapes.get(bias), g.shapes.get(scores)
    if b_shape is None or s_shape is None:
        return
    if len(b_shape) > len(s_shape):
        raise _Miss(f"bias {bias!r} has rank {len(b_shape)} > the scores' rank {len(s_shape)}")
    for b, s in zip(reversed(b_shape), reversed(s_shape)):
        if isinstance(b, int) and isinstance(s, int) and b not in (1, s):
            raise _Miss(f"bias {bias!r} of shape {b_shape} does not broadcast to the scores {s_shape}")


def _candidates(g: GraphIndex, report: PassReport) -> list[_Candidate]:
    found: list[_Candidate] = []
    for node in g.model.graph.node:
        pv = _product(g, node.output[0]) if node.output else None
        if pv is None or pv[3] or pv[0] is not node:
            continue
        inner = _product(g, pv[2])
        if inner is None or inner[3] or not _reaches_softmax(g, pv[1]) or not _reaches_softmax(g, inner[1]):
            continue  # not two chained attention stages
        try:
            stage2 = _stage(g, node.output[0])
            stage1 = _stage(g, pv[2])
            if stage1.q.key() != stage2.k.key() and not _same_constant_agents(g, stage1, stage2):
                raise _Miss(f"the first stage's queries ({stage1.q.base!r}) are not the second stage's keys "
                            f"({stage2.k.base!r}): not agent tokens")
            if not np.isclose(stage1.scale, stage2.scale, rtol=1e-3, atol=0):
                raise _Miss(f"the stages use different scales ({stage1.scale:g} vs {stage2.scale:g})")
        except _Miss as miss:
            report.near_misses.append(NearMiss(FAMILY, node.name, str(miss)))
            continue
        found.append(_Candidate(node.name, stage1, stage2))
    return found


def _same_constant_agents(g: GraphIndex, stage1: _Stage, stage2: _Stage) -> bool:
    """Learned agents that constant folding split into two initializers (``s·A`` and ``Aᵀ``):
    equal up to a factor ``r`` with ``s₁·r = s₂``. On success stage 1 is rewritten to read
    stage 2's agent tensor at stage 2's scale."""
    values = [_constant_operand(g, stage1.q), _constant_operand(g, stage2.k)]
    if any(v is None for v in values) or values[0].shape != values[1].shape:
        return False
    first, second = (v.astype(np.float64) for v in values)
    norm = float((second * second).sum())
    if norm == 0.0:
        return False
    ratio = float((first * second).sum()) / norm
    if not np.allclose(first, ratio * second, rtol=1e-3, atol=1e-6 * float(np.abs(first).max())) \
            or not np.isclose(stage1.scale * ratio, stage2.scale, rtol=1e-3):
        return False
    stage1.q = stage2.k
    stage1.scale = stage2.scale
    return True


def _constant_operand(g: GraphIndex, operand: _Operand) -> np.ndarray | None:
    value = g.const(operand.base)
    if value is None or value.ndim != 4:
        return None
    return value.transpose(operand.perm) if operand.perm else value


def _reaches_softmax(g: GraphIndex, probs: str, depth: int = 3) -> bool:
    """Whether ``probs`` is (a few single-input ops away from) a softmax: a candidate stage."""
    for _ in range(depth + 1):
        node = g.node(probs)
        if node is None:
            return False
        if node.op_type in ("Softmax", "Div") and (node.op_type == "Softmax" or
                                                   (g.node(node.input[0]) is not None
                                                    and g.node(node.input[0]).op_type == "Exp")):
            return True
        probs = node.input[0] if node.input else ""
    return False


# ----------------------------------------------------------------------------- rewriting

def _tensor(model: onnx.ModelProto, operand: _Operand, name: str) -> str:
    """A tensor holding ``operand`` (unscaled) in its canonical layout, adding a Transpose if needed."""
    if operand.perm is None:
        return operand.base
    for node in model.graph.node:  # reuse the graph's own Transpose (e.g. the head split) when there is one
        if node.op_type == "Transpose" and node.input[0] == operand.base \
                and tuple(node_attribute(node, "perm", ())) == operand.perm:
            return node.output[0]
    out = f"{name}_transposed"
    init = next((i for i in model.graph.initializer if i.name == operand.base), None)
    if init is not None:  # learned agents: store them transposed instead of adding a node
        value = initializer_array(init).transpose(operand.perm)
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, out))
        return out
    model.graph.node.append(helper.make_node("Transpose", [operand.base], [out], name=f"{name}_transpose",
                                             perm=list(operand.perm)))
    return out


def _batched_agents(model: onnx.ModelProto, a: str, q: str, shapes: dict, name: str) -> str:
    """``A`` expanded to Q's batch: ``Attention`` needs equal batch sizes where
    ``AgentAttention`` (and torch's matmul) broadcast learned ``[1, H, n, D]`` agents."""
    a_shape, q_shape = shapes.get(a), shapes.get(q)
    if a_shape and q_shape and len(a_shape) == 4 and a_shape[0] == q_shape[0] and a_shape[0] is not None:
        return a
    nodes = [
        helper.make_node("Shape", [q], [f"{name}_batch"], start=0, end=1),
        helper.make_node("Shape", [a], [f"{name}_agent_dims"], start=1),
        helper.make_node("Concat", [f"{name}_batch", f"{name}_agent_dims"], [f"{name}_agent_shape"], axis=0),
        helper.make_node("Expand", [a, f"{name}_agent_shape"], [f"{name}_agents"]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{name}/expand_agents_{i}"
    model.graph.node.extend(nodes)
    return f"{name}_agents"


def _full_mask(model: onnx.ModelProto, bias: str, queries: str, keys: str, shapes: dict, name: str) -> str:
    """``bias`` expanded to ``[.., queries' tokens, keys' tokens]``: ONNX Runtime's ``Attention``
    does not broadcast ``attn_mask`` along its last two axes (the ONNX spec would)."""
    b_shape = shapes.get(bias)
    if b_shape and len(b_shape) >= 2 and all(isinstance(d, int) and d != 1 for d in b_shape[-2:]):
        return bias  # axes longer than 1 that broadcast against the scores are full already
    ones = onnx.numpy_helper.from_array(np.ones(2, dtype=np.int64), f"{name}_ones")
    nodes = [
        helper.make_node("Constant", [], [f"{name}_ones"], value=ones),
        helper.make_node("Shape", [queries], [f"{name}_rows"], start=2, end=3),
        helper.make_node("Shape", [keys], [f"{name}_cols"], start=2, end=3),
        helper.make_node("Concat", [f"{name}_ones", f"{name}_rows", f"{name}_cols"], [f"{name}_shape"], axis=0),
        helper.make_node("Expand", [bias, f"{name}_shape"], [f"{name}_full"]),
    ]
    for i, node in enumerate(nodes):
        node.name = f"{name}_{i}"
    model.graph.node.extend(nodes)
    return f"{name}_full"


def _rewrite(model: onnx.ModelProto, cand: _Candidate, lower: bool, shapes: dict) -> None:
    s1, s2 = cand.stage1, cand.stage2
    name = f"{cand.anchor}_agent"
    q = _tensor(model, s2.q, f"{name}_q")
    k = _tensor(model, s1.k, f"{name}_k")
    a = _tensor(model, s1.q, f"{name}_a")
    inputs = [q, k, s1.v, a, s1.bias or "", s2.bias or ""]
    out = s2.out
    # The old producer of the output keeps computing (under another name) until
    # remove_dead_nodes drops it with the rest of the matched chain.
    producer = next(n for n in model.graph.node if out in n.output)
    producer.output[list(producer.output).index(out)] = f"{out}_unfused"
    if lower:
        inputs[3] = _batched_agents(model, a, q, shapes, name)
        if s1.bias:
            inputs[4] = _full_mask(model, s1.bias, inputs[3], k, shapes, f"{name}/agent_bias")
        if s2.bias:
            inputs[5] = _full_mask(model, s2.bias, q, inputs[3], shapes, f"{name}/query_bias")
        model.graph.node.extend(plugin.lower_to_attention_nodes(inputs, out, name, s1.scale))
    else:
        node = plugin.make_node(inputs, [out], name, scale=s1.scale)
        plugin.add_to_model(model, node)
        model.graph.node.append(node)


def _to_match(cand: _Candidate, lowered: bool) -> Match:
    s1, s2 = cand.stage1, cand.stage2
    inputs = {"Q": s2.q.base, "K": s1.k.base, "V": s1.v, "A": s1.q.base}
    if s1.bias:
        inputs["agent_bias"] = s1.bias
    if s2.bias:
        inputs["query_bias"] = s2.bias
    return Match(FAMILY, "Attention" if lowered else plugin.OP_TYPE, cand.nodes, inputs, [s2.out],
                 {"scale": s1.scale})


def find(model: onnx.ModelProto) -> PassReport:
    """Report every agent-attention subgraph (and near-miss); ``model`` is not changed."""
    report = PassReport(FAMILY)
    for cand in _candidates(GraphIndex(named_copy(model)), report):
        report.matches.append(_to_match(cand, False))
    return report


def apply(model: onnx.ModelProto, lower_to_attention: bool | str = False,
          precision: str | None = None,
          input_shapes: Mapping[str, Sequence[int]] | None = None) -> tuple[onnx.ModelProto, PassReport]:
    """Replace each agent attention by one ``attnc::AgentAttention`` node.

    Args:
        model: the model (not modified).
        lower_to_attention: ``True``: emit two ONNX opset-23 ``Attention`` nodes per match
            instead (the model is converted to opset 23 first, only when something is
            lowered); ``"auto"``: choose per match, fused or lowered, by its shape class
            (:func:`attnc.plugins.agent.routes.choose`; each match's ``route`` says why).
        precision: ``"fp32"``/``"fp16"``/``"bf16"``, what the kernels will run in (the
            engine's precision; default: the model's Q dtype); only ``"auto"`` reads it.
        input_shapes: ``{input name: shape}`` the model will mostly run at (TensorRT's
            optimization-profile ``opt`` shapes); ``"auto"`` reads dynamic token counts at
            these, so a dynamic-resolution model is routed by its typical size.

    Returns:
        The rewritten model (``model`` itself when nothing matched) and the report.
    """
    if lower_to_attention not in (False, True, "auto"):
        raise ValueError(f"lower_to_attention must be True, False or 'auto', got {lower_to_attention!r}")
    report = PassReport(FAMILY)
    work = named_copy(model)
    cands = _candidates(GraphIndex(work), report)
    if not cands:
        return model, report
    chosen = [None] * len(cands)
    if lower_to_attention == "auto":
        at = with_input_shapes(work, input_shapes) if input_shapes else work
        (shapes, types), measured = value_shapes_and_types(at), routes.load_measurements()
        chosen = [_route(cand, shapes, types, precision, measured) for cand in cands]
    lowered = [r.lowered if r is not None else bool(lower_to_attention) for r in chosen]
    if any(lowered) and default_opset(work) < ATTENTION_OPSET:
        work = named_copy(convert_opset(work, ATTENTION_OPSET))  # keeps earlier passes' functions
        report = PassReport(FAMILY)
        cands = _candidates(GraphIndex(work), report)
    shapes = value_shapes(work)
    for cand, lower, route in zip(cands, lowered, chosen):
        _rewrite(work, cand, lower, shapes)
        match = _to_match(cand, lower)
        if route is not None:
            match.route = route.to_dict()
        report.matches.append(match)
    report.rewritten = len(cands)
    toposort(work)
    remove_dead_nodes(work)
    return work, report


_PRECISION_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _route(cand: _Candidate, shapes: dict, types: dict, precision: str | None,
           measured: list[dict]) -> routes.Route:
    """The route :mod:`attnc.plugins.agent.routes` picks for ``cand``'s shape class."""

    def dims(operand: _Operand) -> list:
        shape = shapes.get(operand.base)
        if shape is None or len(shape) != 4:
            return [None] * 4
        return [d if isinstance(d, int) and d > 0 else None for d in (shape[i] for i in operand.key()[1])]

    q, k, a = dims(cand.stage2.q), dims(cand.stage1.k), dims(cand.stage1.q)
    v = dims(_Operand(cand.stage1.v, None, 1.0))
    dtype = _PRECISION_DTYPES.get(precision or "") or {
        onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}.get(
        types.get(cand.stage2.q.base), "float32")
    shape = routes.ShapeClass(dtype, q[2], k[2], a[2], q[3] or k[3], v[3],
                              bool(cand.stage1.bias or cand.stage2.bias))
    return routes.choose(shape, measured)
