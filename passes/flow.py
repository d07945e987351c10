"""Flow attention (Flowformer) -> one ``attnc::FlowAttention`` node.

Flow attention exports as a chain of ~40 small ops (sigmoid feature maps, four flow
einsums, clip, softmax or exp/cumsum competition, the final products). The pass matches
that whole chain, from the pre-sigmoid ``Q``/``K`` and ``V`` to the output, with
expression patterns written below as nested op calls (:class:`_Op`, alternatives with
:class:`_Or`, commutative ops tried both ways, shared sub-expressions bound once by name),
then verifies every constant:

- one ``ε`` for all the ``+ ε`` (any value > 0, becomes the ``eps`` attribute);
- the clip bounds are exactly ``-1`` and ``1``; the unsqueeze/reduce/cumsum axes are the
  token and feature axes;
- non-causal: the competition factor equals the number of keys ``S`` and the optional
  allocation factor equals ``L/S``; causal: every position normaliser equals
  ``[1, 2, ..., L]``. Constants are checked against static shapes; a factor read from a
  ``Shape`` dim that shape inference names like K's token axis is proven by that; any
  other shape-computed factor (``Range``, dynamic ``L/S``; a constant under dynamic axes,
  which is right at one length only) is evaluated with ONNX Runtime at two sequence
  lengths, all candidates of a model in one batch; a factor that reads input values is a
  near-miss.

Variants matched: thuml ``Flow_Attention`` / ``Flow_Attention_Causal`` as written in
``attnc.models.flow`` (einsums with any index letters), with or without the ``L/S``
allocation factor, ``1.0 / x`` exported as ``Reciprocal`` (+ ``Mul`` by 1) or ``Div``,
the competition softmax as ``Softmax`` or ``Exp(x [- ReduceMax x]) / ReduceSum``;
both exporters, opsets 17-23, static or dynamic batch/sequence, fused or separate QKV
projections, fp32 and fp16. Anything else that contains a flow-attention-like
``Clip(einsum, -1, 1)`` but fails the pattern or a constant check is left alone and
reported as a near-miss naming the first node that differs (e.g. a clip to ``[-2, 2]``,
a different ``ε`` in one place, a competition factor that is not ``S``).

Emits ``attnc::FlowAttention`` (``attnc.plugins.flow``) on the tensors the sigmoids
read. Tests: ``tests/passes/test_flow.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from attnc.passes.core import (GraphIndex, Match, NearMiss, PassReport, canonical_einsum,
                               depends_on_data, evaluate_tensors, named_copy, node_attribute,
                               remove_dead_nodes, toposort)
from attnc.plugins import flow as plugin

FAMILY = "flow"


# ----------------------------------------------------------------------------- expression patterns

class _Fail(Exception):
    """A pattern did not match; ``depth`` says how far into the chain it got."""

    def __init__(self, depth: int, message: str):
        super().__init__(message)
        self.depth = depth


@dataclass
class _State:
    """Bindings of one match attempt: named tensors, constants, nodes covered."""

    tensors: dict[str, str] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    collected: dict[str, list[str]] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)

    def copy(self) -> "_State":
        return _State(dict(self.tensors), dict(self.values),
                      {k: list(v) for k, v in self.collected.items()}, set(self.nodes))


class _Pattern:
    def match(self, g: GraphIndex, tensor: str, st: _State, depth: int) -> _State:
        raise NotImplementedError


@dataclass
class _Var(_Pattern):
    """A named sub-expression: matched (by ``inner``) the first time, the same tensor after."""

    name: str
    inner: _Pattern | None = None

    def match(self, g, tensor, st, depth):
        if self.name in st.tensors:
            if st.tensors[self.name] != tensor:
                raise _Fail(depth, f"{tensor!r} should be the same tensor as {st.tensors[self.name]!r} ({self.name})")
            return st
        if self.inner is not None:
            st = self.inner.match(g, tensor, st, depth)
        st.tensors[self.name] = tensor
        return st


@dataclass
class _Collect(_Pattern):
    """Any tensor; every occurrence is recorded under ``name`` and verified after matching."""

    name: str

    def match(self, g, tensor, st, depth):
        st.collected.setdefault(self.name, []).append(tensor)
        return st


@dataclass
class _Const(_Pattern):
    """A constant scalar: equal to ``value`` if given, else bound under ``name`` (all equal)."""

    name: str
    value: float | None = None

    def match(self, g, tensor, st, depth):
        c = g.const(tensor)
        if c is None or c.size != 1:
            raise _Fail(depth, f"{tensor!r} should be a constant scalar ({self.name})")
        v = float(c.reshape(()))
        expected = self.value if self.value is not None else st.values.get(self.name)
        if expected is not None and not np.isclose(v, expected, rtol=1e-3, atol=0):
            raise _Fail(depth, f"constant {self.name} is {v:g}, expected {expected:g}")
        st.values.setdefault(self.name, v)
        return st


@dataclass
class _Axes(_Pattern):
    """A constant int list naming one axis: ``axis`` or its negative form for rank ``rank``."""

    axis: int
    rank: int

    def match(self, g, tensor, st, depth):
        c = g.const(tensor)
        if c is None or [int(a) % self.rank for a in c.reshape(-1)] != [self.axis % self.rank]:
            raise _Fail(depth, f"{tensor!r} should name axis {self.axis} (got {None if c is None else c.tolist()})")
        return st


@dataclass
class _Or(_Pattern):
    alternatives: tuple[_Pattern, ...]

    def match(self, g, tensor, st, depth):
        best = None
        for alt in self.alternatives:
            try:
                return alt.match(g, tensor, st.copy(), depth)
            except _Fail as fail:
                best = fail if best is None or fail.depth > best.depth else best
        raise best


@dataclass
class _Op(_Pattern):
    op_type: str
    inputs: tuple[_Pattern, ...]
    commute: bool = False
    check: Callable[[onnx.NodeProto], str | None] | None = None

    def match(self, g, tensor, st, depth):
        node = g.node(tensor)
        if node is None or node.op_type != self.op_type:
            found = "a graph input or initializer" if node is None else f"{node.op_type} {node.name}"
            raise _Fail(depth, f"expected {self.op_type} producing {tensor!r}, found {found}")
        if len(node.input) < len(self.inputs):
            raise _Fail(depth, f"{node.op_type} {node.name} has too few inputs")
        if self.check is not None:
            why = self.check(node)
            if why:
                raise _Fail(depth, f"{node.op_type} {node.name}: {why}")
        orders = [list(node.input)]
        if self.commute:
            orders.append(list(reversed(node.input)))
        best = None
        for order in orders:
            trial = st.copy()
            try:
                for pattern, name in zip(self.inputs, order):
                    trial = pattern.match(g, name, trial, depth + 1)
                trial.nodes.add(node.name)
                return trial
            except _Fail as fail:
                best = fail if best is None or fail.depth > best.depth else best
        raise best


def _einsum(a: _Pattern, b: _Pattern, equation: str) -> _Op:
    def check(node):
        eq = canonical_einsum(node_attribute(node, "equation", b""))
        return None if eq == equation else f"equation {eq} is not {equation}"
    return _Op("Einsum", (a, b), check=check)


def _attrs_are(**expected) -> Callable[[onnx.NodeProto], str | None]:
    def check(node):
        for name, (value, default) in expected.items():
            got = node_attribute(node, name, default)
            if got not in (value if isinstance(value, tuple) else (value,)):
                return f"attribute {name}={got}, expected {value}"
        return None
    return check


EPS = _Const("eps")


def _add_eps(x: _Pattern) -> _Op:
    return _Op("Add", (x, EPS), commute=True)


def _mul(a: _Pattern, b: _Pattern) -> _Op:
    return _Op("Mul", (a, b), commute=True)


def _unsqueeze_last(x: _Pattern) -> _Op:      # [B, H, L] -> [B, H, L, 1]
    return _Op("Unsqueeze", (x, _Axes(-1, 4)))


def _reciprocal(x: _Pattern) -> _Pattern:     # 1.0 / x in its exported spellings
    plain = _Or((_Op("Reciprocal", (x,)), _Op("Div", (_Const("one", 1.0), x))))
    return _Or((plain, _Op("Mul", (plain, _Const("one", 1.0)), commute=True)))


def _token_sum(x: _Pattern) -> _Op:           # x.sum(dim=2) of [B, H, L, D]
    return _Op("ReduceSum", (x, _Axes(2, 4)), check=_attrs_are(keepdims=(0, 1)))


def _token_cumsum(x: _Pattern) -> _Op:
    return _Op("CumSum", (x, _Axes(2, 4)), check=_attrs_are(exclusive=(0, 0), reverse=(0, 0)))


def _reduce_last(op_type: str, x: _Pattern) -> _Pattern:
    """``op_type`` over the last axis of a ``[B, H, S]`` tensor, keepdims, axes as input or
    (ReduceMax before opset 18) as attribute."""
    def axes_attribute(node):
        axes = node_attribute(node, "axes")
        return None if axes is not None and [a % 3 for a in axes] == [2] else f"axes={axes}, expected [-1]"
    keepdims = _attrs_are(keepdims=(1, 1))
    return _Or((_Op(op_type, (x, _Axes(-1, 3)), check=keepdims),
                _Op(op_type, (x,), check=lambda n: keepdims(n) or axes_attribute(n))))


def _clip(x: _Pattern) -> _Op:
    return _Op("Clip", (x, _Const("clip_min", -1.0), _Const("clip_max", 1.0)))


PHI_Q = _Var("phi_q", _Op("Sigmoid", (_Var("Q"),)))
PHI_K = _Var("phi_k", _Op("Sigmoid", (_Var("K"),)))
Q_EPS, K_EPS = _add_eps(PHI_Q), _add_eps(PHI_K)
FLOW = "abcd,abd->abc"


def _non_causal_pattern() -> _Pattern:
    incoming = _Var("incoming", _reciprocal(_einsum(Q_EPS, _add_eps(_token_sum(PHI_K)), FLOW)))
    outgoing = _Var("outgoing", _reciprocal(_einsum(K_EPS, _add_eps(_token_sum(PHI_Q)), FLOW)))
    sink = _einsum(Q_EPS, _add_eps(_token_sum(_mul(PHI_K, _unsqueeze_last(outgoing)))), FLOW)
    q_in = _Var("q_in", _mul(PHI_Q, _unsqueeze_last(incoming)))
    source = _einsum(K_EPS, _add_eps(_token_sum(q_in)), FLOW)
    clipped = _Var("clipped", _clip(source))
    shifted = _Or((_Op("Sub", (clipped, _reduce_last("ReduceMax", clipped))), clipped))
    exp = _Var("competition_exp", _Op("Exp", (shifted,)))
    softmax = _Or((_Op("Softmax", (clipped,), check=_attrs_are(axis=(-1, 2))),
                   _Op("Div", (exp, _reduce_last("ReduceSum", exp)))))
    competition = _mul(softmax, _Collect("sources"))
    allocation = _Op("Sigmoid", (_Or((sink, _mul(sink, _Collect("ratio")))),))
    kv = _einsum(PHI_K, _mul(_Var("V"), _unsqueeze_last(competition)), "abcd,abce->abde")
    return _mul(_einsum(q_in, kv, "abcd,abde->abce"), _unsqueeze_last(allocation))


def _causal_pattern() -> _Pattern:
    normal = _Collect("normal")
    flow = "abcd,abcd->abc"
    incoming = _Var("incoming", _mul(_reciprocal(_einsum(Q_EPS, _add_eps(_token_cumsum(PHI_K)), flow)), normal))
    outgoing = _Var("outgoing", _mul(_reciprocal(_einsum(K_EPS, _add_eps(_token_cumsum(PHI_Q)), flow)), normal))
    sink = _Op("Div", (_einsum(Q_EPS, _add_eps(_token_cumsum(_mul(PHI_K, _unsqueeze_last(outgoing)))), flow),
                       normal))
    source = _Op("Div", (_einsum(K_EPS, _add_eps(_token_cumsum(_mul(PHI_Q, _unsqueeze_last(incoming)))), flow),
                         normal))
    exp = _Var("exp", _Op("Exp", (_clip(source),)))
    share = _Op("Div", (exp, _Op("CumSum", (exp, _Axes(-1, 3)), check=_attrs_are(exclusive=(0, 0),
                                                                                   reverse=(0, 0)))))
    competition = _mul(share, normal)
    kv = _token_cumsum(_einsum(PHI_K, _mul(_Var("V"), _unsqueeze_last(competition)), "abcd,abce->abcde"))
    q_in = _mul(PHI_Q, _unsqueeze_last(_Op("Div", (incoming, normal))))
    return _mul(_einsum(q_in, kv, "abcd,abcde->abce"), _unsqueeze_last(_Op("Sigmoid", (sink,))))


PATTERNS = {0: _non_causal_pattern(), 1: _causal_pattern()}


# ----------------------------------------------------------------------------- checks

@dataclass
class _Candidate:
    anchor: str
    out: str
    causal: int
    state: _State

    @property
    def inputs(self) -> dict[str, str]:
        return {r: self.state.tensors[r] for r in ("Q", "K", "V")}


def _seq_len(g: GraphIndex, tensor: str) -> int | None:
    shape = g.shapes.get(tensor)
    return shape[2] if shape and len(shape) == 4 and isinstance(shape[2], int) and shape[2] > 0 else None


_EXPECTED: dict[str, Callable[[int, int], np.ndarray]] = {
    "normal": lambda length, sources: np.arange(1, length + 1, dtype=np.float64),   # causal
    "sources": lambda length, sources: np.array(float(sources)),                    # non-causal
    "ratio": lambda length, sources: np.array(length / sources),
}


def _shape_dim(g: GraphIndex, tensor: str) -> object | None:
    """The symbolic (or int) size ``tensor`` reads when it is one dim of a ``Shape``."""
    node = g.node(tensor)
    while node is not None and node.op_type in ("Cast", "Squeeze", "Unsqueeze", "Reshape"):
        node = g.node(node.input[0])
    if node is None:
        return None
    if node.op_type == "Gather":
        shape, index = g.node(node.input[0]), g.const(node.input[1])
        if shape is None or shape.op_type != "Shape" or index is None or index.size != 1:
            return None
        axis = int(node_attribute(shape, "start", 0)) + int(index.reshape(()))
    elif node.op_type == "Shape":
        shape = node
        axis = int(node_attribute(shape, "start", 0))
        end = node_attribute(shape, "end")
        rank = g.rank(shape.input[0])
        if end is None or rank is None or (end % rank if end < 0 else end) - axis % rank != 1:
            return None
    else:
        return None
    dims = g.shapes.get(shape.input[0])
    return dims[axis] if dims and -len(dims) <= axis < len(dims) else None


def _proven_by_shapes(g: GraphIndex, cand: _Candidate, name: str, tensor: str) -> bool:
    """``sources`` read from a dim that shape inference names like K's token axis."""
    k_dims = g.shapes.get(cand.state.tensors["K"])
    if name != "sources" or not k_dims or len(k_dims) != 4 or k_dims[2] is None:
        return False
    return _shape_dim(g, tensor) == k_dims[2]


def _check_runs(name: str, tensor: str, runs) -> str | None:
    for got, length, sources in runs:
        want = _EXPECTED[name](length, sources).reshape(-1)
        got = np.asarray(got, dtype=np.float64)
        # broadcast against [B, H, L]: only the last axis may be longer than 1
        laid_out = all(d == 1 for d in got.shape[:-1]) and got.ndim <= 3
        if not laid_out or got.size != want.size or not np.allclose(got.reshape(-1), want, rtol=1e-3):
            return (f"the {name} factor {tensor!r} is {got.reshape(-1)[:6].tolist()} (shape {list(got.shape)}), "
                    f"expected {want[:6].tolist()} for L={length}, S={sources}")
    return None


def _verify(g: GraphIndex, cands: list[_Candidate]) -> dict[str, str]:
    """Check every candidate's constants; returns anchor -> near-miss reason for the failures.

    Shape-computed factors that neither constants nor shape inference settle are evaluated
    with ONNX Runtime in one batch (one run per probe size for all candidates together).
    """
    misses: dict[str, str] = {}
    pending: list[tuple[_Candidate, str, str]] = []
    for cand in cands:
        eps = cand.state.values["eps"]
        if not eps > 0:
            misses[cand.anchor] = f"eps is {eps:g}; flow attention needs eps > 0"
            continue
        q, k = cand.state.tensors["Q"], cand.state.tensors["K"]
        for name in ("normal",) if cand.causal else ("sources", "ratio"):
            for tensor in dict.fromkeys(cand.state.collected.get(name, [])):
                value, length, sources = g.const(tensor), _seq_len(g, q), _seq_len(g, k)
                if value is not None and length is not None and sources is not None:
                    why = _check_runs(name, tensor, [(value, length, sources)])
                    if why:
                        misses.setdefault(cand.anchor, why)
                elif depends_on_data(g.model, tensor):
                    misses.setdefault(cand.anchor, f"the {name} factor {tensor!r} depends on input values")
                elif not _proven_by_shapes(g, cand, name, tensor):
                    pending.append((cand, name, tensor))
    pending = [p for p in pending if p[0].anchor not in misses]
    if pending:
        names = list(dict.fromkeys(t for c, _, t in pending for t in (t, c.state.tensors["Q"], c.state.tensors["K"])))
        try:
            results = evaluate_tensors(g.model, names)
        except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
            results = None
            for cand, name, tensor in pending:
                misses.setdefault(cand.anchor, f"cannot evaluate the {name} factor {tensor!r}: {exc}")
        for cand, name, tensor in pending if results is not None else []:
            q, k = cand.state.tensors["Q"], cand.state.tensors["K"]
            why = _check_runs(name, tensor, [(r[tensor], r[q].shape[2], r[k].shape[2]) for r in results])
            if why:
                misses.setdefault(cand.anchor, why)
    return misses


def _candidates(g: GraphIndex, report: PassReport) -> list[_Candidate]:
    matched: list[_Candidate] = []
    covered: set[str] = set()
    best_failures: list[tuple[int, str, str]] = []
    for node in g.model.graph.node:
        if node.op_type != "Mul" or node.name in covered:
            continue
        failure = None
        for causal, pattern in PATTERNS.items():
            try:
                state = pattern.match(g, node.output[0], _State(), 0)
            except _Fail as fail:
                if failure is None or fail.depth > failure.depth:
                    failure = fail
                continue
            matched.append(_Candidate(node.name, node.output[0], causal, state))
            covered |= state.nodes
            break
        else:
            if failure is not None and failure.depth >= 3:
                best_failures.append((failure.depth, node.name, str(failure)))
    misses = _verify(g, matched)
    report.near_misses.extend(NearMiss(FAMILY, anchor, why) for anchor, why in misses.items())
    found = [c for c in matched if c.anchor not in misses]
    # A flow-looking Clip(·, -1, 1)-style node that no match covered is a near-miss; cite the
    # attempt that got furthest.
    clips = [n for n in g.model.graph.node if n.op_type == "Clip" and n.name not in covered
             and g.node(n.input[0]) is not None and g.node(n.input[0]).op_type in ("Einsum", "Div", "MatMul")]
    if clips and best_failures:
        depth, anchor, reason = max(best_failures)
        for clip in clips:
            report.near_misses.append(NearMiss(FAMILY, clip.name, f"matched flow attention up to depth {depth} "
                                               f"from {anchor}, then: {reason}"))
    return found


# ----------------------------------------------------------------------------- rewriting

def _to_match(cand: _Candidate) -> Match:
    return Match(FAMILY, plugin.OP_TYPE, sorted(cand.state.nodes), cand.inputs, [cand.out],
                 {"causal": cand.causal, "eps": cand.state.values["eps"]})


def find(model: onnx.ModelProto) -> PassReport:
    """Report every flow-attention subgraph (and near-miss); ``model`` is not changed."""
    report = PassReport(FAMILY)
    for cand in _candidates(GraphIndex(named_copy(model)), report):
        report.matches.append(_to_match(cand))
    return report


def apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Replace each flow attention by one ``attnc::FlowAttention`` node.

    Returns the rewritten model (``model`` itself when nothing matched) and the report.
    """
    report = PassReport(FAMILY)
    work = named_copy(model)
    cands = _candidates(GraphIndex(work), report)
    if not cands:
        return model, report
    for cand in cands:
        producer = next(n for n in work.graph.node if cand.out in n.output)
        producer.output[list(producer.output).index(cand.out)] = f"{cand.out}_unfused"
        ins = cand.inputs
        node = plugin.make_node([ins["Q"], ins["K"], ins["V"]], [cand.out], f"{cand.anchor}_flow",
                                causal=cand.causal, eps=cand.state.values["eps"])
        plugin.add_to_model(work, node)
        work.graph.node.append(node)
        report.matches.append(_to_match(cand))
    report.rewritten = len(cands)
    toposort(work)
    remove_dead_nodes(work)
    return work, report
