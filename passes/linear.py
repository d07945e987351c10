"""Kernelized linear attention and lightning attention -> ``attnc::KernelLinearAttention``.

With q = s·φ(Q), k = φ(K) and φ one of elu(x)+1 (``Add(Elu(x), 1)``), ``Relu`` or the
identity, the pass matches these exported forms (``[B, H, N, D]`` tensors):

- **right-associated** (non-causal): ``MatMul(q, MatMul(Transpose(k), V))``;
- **quadratic**: ``MatMul(M(q·kᵀ), V)`` where ``M`` is nothing (non-causal), a
  lower-triangular keep mask ``Where(c, 0, ·)`` / ``Where(c, ·, 0)`` (causal), or a
  multiplier ``Mul(·, W)`` with ``W`` a 0/1 triangle (causal) or a decay table
  ``W[h, t, s] = λ_h^{t−s}·[s ≤ t]`` (lightning attention, e.g. ``Exp`` of
  ``-slope·(i−j)`` masked with -inf, or a constant);
- **prefix sums** (causal): ``Squeeze(MatMul(Unsqueeze(q), CumSum(Unsqueeze(k, -1) *
  Unsqueeze(V, -2), axis=2)))`` (the RNN view);

each optionally divided by its normaliser ``(den + eps)``, where ``den`` is
``ReduceSum(M(q·kᵀ), -1)`` (quadratic), ``q·(Σ_s k_s)ᵀ`` as a MatMul or as
``ReduceSum(q * ReduceSum(k, 2), -1)`` (non-causal), or ``ReduceSum(q * CumSum(k, 2), -1)``
(prefix sums). A division whose denominator is anything else is left in the graph after
the fused node (``normalize=0``), so semantics are kept. Masks and decay tables are
*proven*: they must not read input values, and are evaluated (constant, or at two
sequence lengths under dynamic axes; see ``passes.core.evaluate_tensors``); a mask that
is not causal / a table that is not ``λ^{t−s}`` is a near-miss that cites the first
wrong entry.

The **recurrent step** (one decode token, as RetNet / TransNormerLLM / GLA inference code
writes it): ``o = q @ S'`` (or ``Einsum("bhnd,bhde->bhne")``) with ``S' = g ⊙ S + kᵀV``, the
outer product spelt ``MatMul(Transpose(k), V)``, ``Einsum("bhnd,bhne->bhde")``,
``Mul(Transpose(k), V)`` or ``ReduceSum`` / ``Squeeze`` over axis 2 of ``Unsqueeze(k, -1) *
Unsqueeze(V, -2)``, and the gate ``g`` absent or any factor of a ``Mul`` that broadcasts to
``S``. ``S'`` becomes the fused node's ``state_out`` (keeping its name, so graph outputs do).
A gate that is a per-head constant in (0, 1] (a scalar, ``[H, 1, 1]`` or ``[1, H, 1, 1]``; the
same at every input size) becomes the op's ``decay`` and ``S`` its ``state``. Any other gate
(read from the input as in GLA / Mamba2-style scalar gates, per batch, per key dim, or a
constant outside (0, 1]) keeps its ``Mul`` in the graph and ``g ⊙ S`` is the ``state``, with
no decay: over one token the decay only ever multiplies the incoming state, so that is the
same step; it must be proven not to change ``S``'s shape (the gate's dims are 1, the state's
own, or face a state dim known to be above 1), else a near-miss. Proven, else a near-miss:
q, k, V hold exactly one token (inferred, or evaluated at two input sizes: an update over
several tokens adds all their kᵀV before any query reads the state, which is not causal
attention, and a gate would need a power per token); the state is float32, or float16 /
bfloat16 cast to float32 and back around the node (the op's state is float32; a float64
state is refused rather than narrowed).
Different feature maps on q and k are passed as the mapped tensors with the identity map.
A normaliser ``z`` carried beside ``S`` is not fused: its division stays after the node.

**Blockwise lightning attention** (Lightning Attention-2's prefill loop, as MiniMax-Text-01's
code writes it, unrolled by the export; matched before the forms above): per-block outputs
``((q_i·k_iᵀ) ⊙ M)·v_i + (q_i ⊙ λ^(j+1))·KV_i`` (the intra term proven as the quadratic form,
the inter term any ``MatMul`` of the block's queries with a state; a block may lack it),
``KV_(i+1) = λ^L·KV_i + (k_i ⊙ λ^(L−1−s))ᵀv_i``, joined by a ``Concat`` along the tokens, or
written into a preallocated output (``output = torch.empty(...); output[:, :, s:e] = ...``,
MiniMax's spelling: a chain of ``ScatterND`` on one buffer, anchored on the last one, through
the Transposes dynamo puts around each write), or a lone such block (a sequence within one
block). Writes are *proven* (``_prove_writes``): their indices, evaluated at two batch sizes
along the buffer's Transposes, must set every element of the output exactly once (an element
never written would keep the buffer's content, one written twice is a block overwriting
another's rows: near-misses); a buffer that holds the output transposed (``[N, H, B, Dv]``, or
past a Transpose folded into the head merge) gets that Transpose after the fused node. The blocks' rows must be slices of one Q, K, V; block 0's
state, when it reads input values, becomes the op's ``state`` (else it must be zeros), and the
update after the last block, when the graph uses it, ``state_out``. A lone block's inter term with
a zero state that a static export folded to a constant (``(q ⊙ λ)·0``, added after the fused intra
term) is dropped with its ``Add`` (``_drop_zero_state_terms``: zero for finite queries). The chain is *proven* by
evaluation (``_prove_blockwise``): every node between Q, K, V, the state and the outputs
must be a sum, product, cast or reshape of them (a polynomial in them), everything else it
reads must not read input values; then it runs in float64 on random Q, K, V, state at every
input size (two batch sizes when dynamic) and must equal the op's semantics (its reference,
computed chunk by chunk in float64: ``_lightning_float64``) with λ read off the longest block's
decay table, to 1e-5 of the terms' magnitude (float32-rounded tables pass, a wrong power of λ,
a missing inter term or a wrong state update do not: a near-miss naming the first block that
differs); the output's layout is the transpose of ``[B, H, N, Dv]`` whose values agree. The
token count must not follow the input sizes: a loop unrolled for one length under a dynamic
sequence axis is a near-miss, not fused. A recognised chain that is not proven stays as it is
(its blocks' quadratic terms are not fused one by one).

Emits ``attnc::KernelLinearAttention(Q, K, V[, decay][, state])`` (with ``state_out`` for the
recurrent step and for a blockwise chain whose final state is used; contract and function body
in ``attnc.plugins.linear``), and gives every ``KernelLinearAttention`` node already in the
model (fla's export-time translation, with or without ``state`` / ``state_out``) its function
body. With ``apply(model,
lower_lightning_to_onnx=True)`` lightning attention (causal, identity map, no normaliser,
decay absent or constant) becomes ONNX ``LinearAttention`` (opset 27, ``update_rule="gated"``
with decay ``log λ``, or ``"linear"`` without decay): the matches (a recurrent step's state
as ``past_state`` / ``present_state``), and ``KernelLinearAttention`` nodes already in the
model, whose ``state`` / ``state_out`` become ``past_state`` / ``present_state`` (same
``[B, H, D, Dv]`` layout). The model is then converted to opset 27
(``passes.core.convert_opset``).

Tests: ``tests/passes/test_linear.py``, ``tests/passes/test_linear_blockwise.py`` (and
``tests/plugins/test_linear.py`` for the op).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from attnc import DOMAIN
from attnc.compiler.onnx_io import initializer_array
from attnc.passes.core import (Match, NearMiss, PassReport, canonical_einsum, constant_value, consumers,
                               convert_opset, default_opset, depends_on_data, evaluate_tensors,
                               named_copy, node_attribute, probe_session, producers, remove_dead_nodes,
                               scalar_constant, toposort, value_shapes, value_shapes_and_types)
from attnc.plugins import attach_function_bodies
from attnc.plugins import linear as plugin

FAMILY = "linear"
OP_TYPE = plugin.OP_TYPE
ONNX_LINEAR_ATTENTION_OPSET = 27


class _Miss(Exception):
    """Matched the structure but cannot prove the semantics; carries the reason."""


@dataclass
class _Candidate:
    anchor: str
    form: str                     # "right" | "quadratic" | "cumsum" | "recurrent" | "blockwise"
    nodes: list[str]
    q: str
    k: str
    k_perm: list[int] | None      # Transpose to apply to ``k`` first (None: as is)
    v: str
    out: str
    feature_map: str
    causal: bool = False
    normalize: bool = False
    eps: float = 0.0
    scale: float = 1.0
    decay: list[float] | None = None
    heads: int | None = None
    state: str | None = None      # recurrent form: the state before the step ...
    state_out: str | None = None  # ... and after it (the tensor name the graph keeps)
    state_type: int = TensorProto.FLOAT  # their element type; others are cast to/from float32
    mask: str | None = None       # quadratic form: the decay table M multiplying q·kᵀ (None: none / a keep mask)
    out_perm: list[int] | None = None  # blockwise: ``out`` is Transpose(O [B, H, N, Dv], out_perm) (None: O itself)


def find(model: onnx.ModelProto) -> PassReport:
    """Report every linear-attention subgraph (and near-miss); ``model`` is not changed."""
    model = named_copy(model)
    report = PassReport(FAMILY)
    for cand in _candidates(model, report):
        report.matches.append(_to_match(cand, OP_TYPE))
    return report


def apply(model: onnx.ModelProto, lower_lightning_to_onnx: bool = False
          ) -> tuple[onnx.ModelProto, PassReport]:
    """Replace each linear attention by one fused node.

    Args:
        model: the model (not modified).
        lower_lightning_to_onnx: emit ONNX ``LinearAttention`` (opset 27) for lightning
            attention matches instead of ``attnc::KernelLinearAttention``, and lower the
            lightning ``KernelLinearAttention`` nodes already in the model too.

    Returns:
        The rewritten model (the input itself when nothing changed) and the report.
    """
    original, model = model, named_copy(model)
    attached = attach_function_bodies(model)
    folded = _fold_constant_decays(model)
    report = PassReport(FAMILY)
    cands = _candidates(model, report)
    fused = _fused_lightning(model, report) if lower_lightning_to_onnx else []
    if not cands and not fused:
        if folded:
            remove_dead_nodes(model)
        return (model if attached or folded else original), report
    lower = fused or [c for c in cands if lower_lightning_to_onnx and _is_lightning(c)]
    if lower and default_opset(model) < ONNX_LINEAR_ATTENTION_OPSET:
        model = named_copy(convert_opset(model, ONNX_LINEAR_ATTENTION_OPSET))
        report = PassReport(FAMILY)
        cands = _candidates(model, report)
        fused = _fused_lightning(model, report)
    for cand in cands:
        if lower_lightning_to_onnx and _is_lightning(cand):
            _rewrite_onnx_linear_attention(model, cand)
            report.matches.append(_to_match(cand, "LinearAttention"))
        else:
            _rewrite(model, cand)
            report.matches.append(_to_match(cand, OP_TYPE))
    for lightning in fused:
        _lower_fused_node(model, lightning)
        report.matches.append(lightning.match)
    report.rewritten = len(cands) + len(fused)
    _drop_zero_state_terms(model)
    toposort(model)
    remove_dead_nodes(model)
    if fused:
        _drop_unused_functions(model)
    return model, report


def _is_lightning(c: _Candidate) -> bool:
    return c.causal and c.feature_map == "identity" and not c.normalize and c.heads is not None


# ----------------------------------------------------------------------------- matching

class _Graph:
    """Read-only view of the graph with the lookups the matchers need."""

    def __init__(self, model):
        self.model = model
        self.prod = producers(model)
        self.cons = consumers(model)
        self.shapes, self.types = value_shapes_and_types(model)
        self._scalars: dict[str, float | None] = {}
        self.claimed: set[str] = set()   # nodes of near-misses no other matcher may take apart

    def op(self, t, *types):
        node = self.prod.get(t)
        return node if node is not None and (not types or node.op_type in types) else None

    def rank(self, t):
        s = self.shapes.get(t)
        return len(s) if s is not None else None

    def ints(self, t):
        v = constant_value(self.model, t) if t else None
        return None if v is None else [int(a) for a in np.atleast_1d(v)]

    def scalar(self, t):
        """A single number: a constant, or computed from input shapes only (e.g. fla's
        ``q.shape[-1] ** -0.5`` under the TorchScript exporter), evaluated and cached."""
        if t not in self._scalars:
            value = scalar_constant(self.model, t)
            if value is None and self.op(t) is not None and self.shapes.get(t) in ([], [1]) \
                    and not depends_on_data(self.model, t):
                try:
                    runs = {float(np.asarray(r[t]).reshape(())) for r in evaluate_tensors(self.model, [t])}
                    value = runs.pop() if len(runs) == 1 else None
                except Exception:  # noqa: BLE001 - not evaluable: not a scalar we can use
                    value = None
            self._scalars[t] = value
        return self._scalars[t]

    def single_use(self, t):
        return len(self.cons.get(t, [])) == 1


def _candidates(model, report) -> list[_Candidate]:
    g = _Graph(model)
    found, used = _blockwise_candidates(g, report), set()
    for cand in found:
        used.update(cand.nodes)
    used.update(g.claimed)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Einsum") or node.name in used:
            continue
        try:
            cand = _match_recurrent(g, node)
            if cand is None and node.op_type == "MatMul":
                cand = _match_cumsum(g, node) or _match_right(g, node) or _match_quadratic(g, node)
        except _Miss as miss:
            report.near_misses.append(NearMiss(FAMILY, node.name, str(miss)))
            continue
        if cand is None or used & set(cand.nodes):
            continue
        used.update(cand.nodes)
        found.append(cand)
    return found


def _feature(g: _Graph, t: str, nodes: list[str]) -> tuple[str, str]:
    """(feature map, tensor before it) for a φ(x) tensor."""
    node = g.op(t)
    if node is not None and node.op_type == "Relu":
        nodes.append(node.name)
        return "relu", node.input[0]
    if node is not None and node.op_type == "Add":
        for side in (0, 1):
            c = scalar_constant(g.model, node.input[1 - side])
            elu = g.op(node.input[side], "Elu")
            if c == 1.0 and elu is not None and node_attribute(elu, "alpha", 1.0) == 1.0:
                nodes.extend([node.name, elu.name])
                return "elu1", elu.input[0]
    return "identity", t


def _peel_scale(g: _Graph, t: str, nodes: list[str]) -> tuple[str, float]:
    scale = 1.0
    while True:
        node = g.op(t, "Mul", "Div")
        if node is None:
            return t, scale
        c = [g.scalar(i) for i in node.input]
        if node.op_type == "Mul" and c[1] is not None:
            scale, t = scale * c[1], node.input[0]
        elif node.op_type == "Mul" and c[0] is not None:
            scale, t = scale * c[0], node.input[1]
        elif node.op_type == "Div" and c[1] is not None:
            scale, t = scale / c[1], node.input[0]
        else:
            return t, scale
        nodes.append(node.name)


def _transposed_key(g: _Graph, kt: str, nodes: list[str]) -> tuple[str, list[int] | None] | None:
    """For ``kt`` = a Transpose giving ``[.., D, N]``: (source, perm from source to [.., N, D])."""
    node = g.op(kt, "Transpose")
    if node is None:
        return None
    perm = list(node_attribute(node, "perm", []))
    if len(perm) != 4:
        return None
    k_perm = [perm[i] for i in (0, 1, 3, 2)]
    nodes.append(node.name)
    return node.input[0], (None if k_perm == [0, 1, 2, 3] else k_perm)


def _qk(g: _Graph, mm, nodes) -> dict | None:
    """Common part of φ(Q)·φ(K)ᵀ: returns q, k, perm, feature map, scale, q-feature tensor."""
    qf, scale = _peel_scale(g, mm.input[0], nodes)
    kt = _transposed_key(g, mm.input[1], nodes)
    if kt is None or g.rank(qf) not in (4, None):
        return None
    kf, k_perm = kt
    fm_q, q = _feature(g, qf, nodes)
    fm_k, k = _feature(g, kf, nodes)
    if fm_q != fm_k:
        raise _Miss(f"feature maps differ: {fm_q} on Q, {fm_k} on K")
    return dict(q=q, k=k, k_perm=k_perm, fm=fm_q, scale=scale, qf=mm.input[0], kf=kf)


def _match_right(g: _Graph, mm) -> _Candidate | None:
    """MatMul(q, MatMul(kᵀ, V)) with the optional normaliser."""
    inner = g.op(mm.input[1], "MatMul")
    if inner is None or not g.single_use(inner.output[0]):
        return None
    nodes = [mm.name, inner.name]
    kt = _transposed_key(g, inner.input[0], nodes)
    if kt is None:
        return None
    kf, k_perm = kt
    qf, scale = _peel_scale(g, mm.input[0], nodes)
    fm_q, q = _feature(g, qf, nodes)
    fm_k, k = _feature(g, kf, nodes)
    if fm_q != fm_k:
        raise _Miss(f"matched φ(Q)(φ(K)ᵀV) but the feature maps differ: {fm_q} on Q, {fm_k} on K")
    if g.rank(q) not in (4, None) or g.rank(inner.input[1]) not in (4, None):
        return None
    cand = _Candidate(mm.name, "right", nodes, q, k, k_perm, inner.input[1], mm.output[0], fm_q, scale=scale)
    _normaliser(g, cand, lambda den: _noncausal_den(g, den, mm.input[0], kf))
    return cand


def _noncausal_den(g: _Graph, den: str, qf: str, kf: str) -> list[str] | None:
    """Nodes of q·(Σ_s k_s)ᵀ computed from tensors ``qf`` and ``kf``, or None."""
    node = g.op(den)
    if node is None:
        return None
    if node.op_type == "MatMul" and node.input[0] == qf:          # q @ ksum.T
        tr = g.op(node.input[1], "Transpose")
        rs = g.op(tr.input[0], "ReduceSum") if tr is not None else None
        if rs is not None and rs.input[0] == kf and _keepdims(rs) and _axes(g, rs) in ([2], [-2]) \
                and list(node_attribute(tr, "perm", [])) == [0, 1, 3, 2]:
            return [node.name, tr.name, rs.name]
    if node.op_type == "ReduceSum" and _keepdims(node) and _axes(g, node) in ([-1], [3]):  # (q * ksum).sum(-1)
        mul = g.op(node.input[0], "Mul")
        if mul is not None and qf in mul.input:
            rs = g.op(mul.input[1 - list(mul.input).index(qf)], "ReduceSum")
            if rs is not None and rs.input[0] == kf and _keepdims(rs) and _axes(g, rs) in ([2], [-2]):
                return [node.name, mul.name, rs.name]
    return None


def _match_quadratic(g: _Graph, mm) -> _Candidate | None:
    """MatMul(M(q·kᵀ), V) with M none / causal keep mask / causal (decay) multiplier."""
    nodes = [mm.name]
    masked = mm.input[0]
    x, keep, keep_inverted, weight, scale = masked, None, False, None, 1.0
    while True:
        node = g.op(x)
        if node is None:
            return None
        if node.op_type == "MatMul":
            break
        if node.op_type == "Where":
            zeros = [scalar_constant(g.model, node.input[i]) for i in (1, 2)]
            if keep is not None or weight is not None:
                return None
            if zeros[0] == 0.0:
                keep, keep_inverted, x = node.input[0], True, node.input[2]
            elif zeros[1] == 0.0:
                keep, x = node.input[0], node.input[1]
            else:
                return None
        elif node.op_type in ("Mul", "Div"):
            c = [g.scalar(i) for i in node.input]
            if node.op_type == "Div":
                if c[1] is None:
                    return None
                scale, x = scale / c[1], node.input[0]
            elif c[0] is not None or c[1] is not None:
                side = 0 if c[1] is not None else 1
                scale, x = scale * c[1 - side], node.input[side]
            else:
                if keep is not None or weight is not None:
                    return None
                side = _scores_side(g, node)
                if side is None:
                    return None
                weight, x = node.input[1 - side], node.input[side]
        else:
            return None  # Softmax, Exp, ... : not linear attention
        if x != masked and not g.single_use(x):
            return None
        nodes.append(node.name)
    qk = g.op(x)
    parts = _qk(g, qk, nodes)
    if parts is None:
        return None
    nodes.append(qk.name)
    cand = _Candidate(mm.name, "quadratic", nodes, parts["q"], parts["k"], parts["k_perm"], mm.input[1],
                      mm.output[0], parts["fm"], scale=scale * parts["scale"])
    if keep is not None or weight is not None:
        _prove_mask(g, cand, keep, keep_inverted, weight, x)
        cand.mask = weight
    _normaliser(g, cand, lambda den: _rowsum_den(g, den, masked))
    return cand


def _scores_side(g: _Graph, mul) -> int | None:
    """Which input of a Mul carries q·kᵀ (possibly through scalar scales), the other being W."""
    def reaches_matmul(t):
        for _ in range(4):
            node = g.op(t)
            if node is None:
                return False
            if node.op_type == "MatMul":
                return True
            if node.op_type not in ("Mul", "Div"):
                return False
            consts = [g.scalar(i) for i in node.input]
            if consts[1] is not None:
                t = node.input[0]
            elif consts[0] is not None and node.op_type == "Mul":
                t = node.input[1]
            else:
                return False
        return False
    hits = [s for s in (0, 1) if reaches_matmul(mul.input[s])]
    return hits[0] if len(hits) == 1 else None


def _rowsum_den(g: _Graph, den: str, masked: str) -> list[str] | None:
    node = g.op(den, "ReduceSum")
    if node is not None and node.input[0] == masked and _keepdims(node) and _axes(g, node) in ([-1], [3]):
        return [node.name]
    return None


def _prove_mask(g: _Graph, cand: _Candidate, keep, keep_inverted, weight, scores) -> None:
    what = "keep mask" if keep is not None else "multiplier"
    form = f"matched (φQ·φKᵀ ⊙ M)·V with a {what} M"
    mask = keep if keep is not None else weight
    if depends_on_data(g.model, mask):
        raise _Miss(f"{form}, but M reads input values: not a fixed causal/decay mask")
    try:
        runs = _mask_and_scores_shapes(g, mask, scores)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
        raise _Miss(f"{form}, but M could not be evaluated: {str(exc).splitlines()[0][:200]}") from None
    decays = None
    for mask_value, scores_shape in runs:
        b, h, n, m = scores_shape
        try:
            mv = np.broadcast_to(np.asarray(mask_value), scores_shape)
        except ValueError:
            raise _Miss(f"{form}, but M of shape {np.shape(mask_value)} does not broadcast to the scores") from None
        if not np.all(mv == mv[:1]):
            raise _Miss(f"{form}, but M differs between batch entries")
        mv = mv[0]
        tril = np.tril(np.ones((n, m), dtype=bool))
        if keep is not None:
            kv = mv.astype(bool) ^ keep_inverted
            wrong = np.argwhere(kv != tril)
            if len(wrong):
                hh, t, u = wrong[0]
                raise _Miss(f"{form}, but M is not causal (entry [{hh}, {t}, {u}] should be {bool(tril[t, u])})")
            decays = [1.0] * h
            continue
        mv = mv.astype(np.float64)
        if np.all(mv == 1.0):
            return  # multiplying by ones: plain non-causal attention
        lam = mv[:, 1, 0] if n >= 2 else np.ones(h)
        dist = np.arange(n)[:, None] - np.arange(m)[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = np.where(dist >= 0, lam[:, None, None] ** np.maximum(dist, 0), 0.0)
        bad = ~np.isclose(mv, expected, rtol=1e-5, atol=1e-7)
        if (lam <= 0).any() or (lam > 1 + 1e-6).any() or bad.any():
            hh, t, u = np.argwhere(bad)[0] if bad.any() else (int(np.argmin(lam)), 1, 0)
            raise _Miss(f"{form}, but M is not a causal decay mask λ^(t−s)·[s≤t] "
                        f"(entry [{hh}, {t}, {u}] is {mv[hh, t, u]:.6g}, expected {expected[hh, t, u]:.6g})")
        if decays is not None and not np.allclose(decays, lam, rtol=1e-6):
            raise _Miss(f"{form}, but the decay changes with the sequence length")
        decays = [float(v) for v in lam]
    cand.causal = True
    cand.heads = len(decays)
    if any(abs(d - 1.0) > 1e-7 for d in decays):
        cand.decay = decays


def _mask_and_scores_shapes(g: _Graph, mask: str, scores: str, sizes: tuple[int, ...] = (5, 8)) -> list[tuple]:
    """``(M's value, the scores' shape)`` with every symbolic input dimension at each of ``sizes``.

    The scores' shape comes from shape inference when it is made of numbers and input
    dimensions, so only M is evaluated: computing the scores themselves runs the model up to
    Q and K (a blockwise chain repeats that for each block, seconds at 2k tokens).
    """
    shape = g.shapes.get(scores)
    inputs = _input_dim_names(g.model)
    if not shape or len(shape) != 4 or not all(isinstance(d, int) or d in inputs for d in shape):
        return [(run[mask], run[scores].shape) for run in evaluate_tensors(g.model, [mask, scores], sizes)]
    runs = evaluate_tensors(g.model, [mask], sizes)
    if len(runs) == 1:   # M reads no dynamic input: the same at every size
        runs = runs * len(sizes)
    return [(run[mask], tuple(d if isinstance(d, int) else size for d in shape)) for run, size in zip(runs, sizes)]


def _match_cumsum(g: _Graph, mm) -> _Candidate | None:
    """Squeeze(MatMul(Unsqueeze(q, -2), CumSum(Unsqueeze(k, -1) * Unsqueeze(V, -2), 2)), -2)."""
    cs = g.op(mm.input[1], "CumSum")
    uq = g.op(mm.input[0], "Unsqueeze")
    if cs is None or uq is None or g.ints(cs.input[1]) not in ([2], [-3]) or node_attribute(cs, "reverse", 0) \
            or node_attribute(cs, "exclusive", 0) or g.ints(uq.input[1]) not in ([3], [-2]):
        return None
    found = _unsqueezed_outer(g, cs.input[0])
    if found is None:
        return None
    outer, uk, uv = found
    sq = next((c for c in g.cons.get(mm.output[0], []) if c.op_type == "Squeeze"), None)
    if sq is None or not g.single_use(mm.output[0]) or g.ints(sq.input[1] if len(sq.input) > 1 else "") \
            not in ([3], [-2]):
        return None
    nodes = [mm.name, cs.name, uq.name, outer.name, uk.name, uv.name, sq.name]
    qf, scale = _peel_scale(g, uq.input[0], nodes)
    fm_q, q = _feature(g, qf, nodes)
    fm_k, k = _feature(g, uk.input[0], nodes)
    if fm_q != fm_k:
        raise _Miss(f"matched the prefix-sum form but the feature maps differ: {fm_q} on Q, {fm_k} on K")
    cand = _Candidate(mm.name, "cumsum", nodes, q, k, None, uv.input[0], sq.output[0], fm_q,
                      causal=True, scale=scale)
    qf_t, kf_t = uq.input[0], uk.input[0]

    def den_nodes(den):
        rs = g.op(den, "ReduceSum")
        if rs is None or not _keepdims(rs) or _axes(g, rs) not in ([-1], [3]):
            return None
        mul = g.op(rs.input[0], "Mul")
        if mul is None or qf_t not in mul.input:
            return None
        ck = g.op(mul.input[1 - list(mul.input).index(qf_t)], "CumSum")
        if ck is None or ck.input[0] != kf_t or g.ints(ck.input[1]) not in ([2], [-2]) \
                or node_attribute(ck, "reverse", 0) or node_attribute(ck, "exclusive", 0):
            return None
        return [rs.name, mul.name, ck.name]

    _normaliser(g, cand, den_nodes)
    return cand


# ----------------------------------------------------------------------------- recurrent (decode) step

_READOUT = "abcd,abde->abce"        # einsum q·S: [B, H, 1, D] x [B, H, D, Dv] -> [B, H, 1, Dv]
_OUTER = "abcd,abce->abde"          # einsum kᵀv: [B, H, 1, D] x [B, H, 1, Dv] -> [B, H, D, Dv]
_STATE_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def _match_recurrent(g: _Graph, readout) -> _Candidate | None:
    """``o = q @ S'`` with ``S' = g ⊙ S + φ(k)ᵀ v`` over one token: a decode step (the RNN view).

    ``readout`` is ``MatMul(q, S')`` or ``Einsum("bhnd,bhde->bhne", q, S')``; q, k, v hold
    exactly one token (statically). A gate ``g`` that is a per-head constant in (0, 1] becomes
    the op's ``decay`` (``S`` its ``state``); any other gate keeps its ``Mul`` in the graph and
    ``g ⊙ S`` is the ``state``, which over one token is the same step. ``S'`` is ``state_out``.
    """
    if readout.op_type == "Einsum" and (len(readout.input) != 2 or canonical_einsum(
            node_attribute(readout, "equation", "")) != _READOUT):
        return None
    add = g.op(readout.input[1], "Add")
    if add is None or readout.input[0] == readout.input[1]:
        return None
    outers = []
    for side in (0, 1):
        nodes = [readout.name, add.name]
        outer = _outer_product(g, add.input[side], nodes)
        if outer is not None:
            outers.append((side, outer, nodes))
    if not outers:
        return None
    # A gate spelt S * Transpose(g) looks like the broadcast kᵀ * v: kᵀv is the side whose v
    # holds one token.
    one_token = [o for o in outers if (g.shapes.get(o[1][1]) or [None] * 3)[2:3] == [1]]
    side, (kf, v), nodes = (one_token or outers)[0]
    form = "matched the recurrent step o = q·S', S' = λ·S + kᵀv"
    carried = add.input[1 - side]
    state, gate = _gated_state(g, carried)
    qf, scale = _peel_scale(g, readout.input[0], nodes)
    peeled = list(nodes)
    fm_q, q = _feature(g, qf, peeled)
    fm_k, k = _feature(g, kf, peeled)
    if fm_q == fm_k:
        nodes = peeled
    else:  # the maps are plain tensors to the op: pass φ(q), φ(k) with the identity map
        fm_q, q, k = "identity", qf, kf
    _prove_one_token(g, [qf, kf, v], form)
    heads = _prove_state(g, state, add.output[0], readout.input[0], v, form)
    cand = _Candidate(readout.name, "recurrent", nodes, q, k, None, v, readout.output[0], fm_q, causal=True,
                      scale=scale, state=state, state_out=add.output[0],
                      state_type=g.types.get(state, TensorProto.FLOAT))
    if gate is not None:
        try:
            lam = _prove_decay(g, gate, heads, form)
        except _Miss:
            # Not the op's decay (read from the input, per key dim, outside (0, 1], ...). With
            # one token the gate only multiplies the incoming state, so the graph's own Mul
            # computes g ⊙ S and that product is the op's state, with no decay.
            _prove_gate_keeps_state_shape(g, gate, state, carried, form)
            cand.state = carried
        else:
            cand.nodes.append(g.prod[carried].name)
            heads = len(lam)
            if any(abs(d - 1.0) > 1e-7 for d in lam):
                cand.decay = lam
    cand.heads = heads
    return cand


def _outer_product(g: _Graph, t: str, nodes: list[str]) -> tuple[str, str] | None:
    """``(k, v)`` when ``t`` is ``kᵀv`` of ``[B, H, T, D]`` / ``[B, H, T, Dv]`` tensors.

    Spellings: ``MatMul(Transpose(k), v)``, ``Einsum("bhnd,bhne->bhde")``, ``Mul(Transpose(k), v)``
    (broadcasting, one token), ``ReduceSum`` / ``Squeeze`` over axis 2 of
    ``Mul(Unsqueeze(k, -1), Unsqueeze(v, -2))``.
    """
    node = g.op(t)
    if node is None:
        return None
    if node.op_type in ("MatMul", "Mul"):
        for side in ((0, 1) if node.op_type == "Mul" else (0,)):
            tr = g.op(node.input[side], "Transpose")
            if tr is not None and list(node_attribute(tr, "perm", [])) == [0, 1, 3, 2] \
                    and g.rank(node.input[1 - side]) in (4, None):
                nodes.extend([node.name, tr.name])
                return tr.input[0], node.input[1 - side]
        if node.op_type == "MatMul":
            return None
    if node.op_type == "Einsum" and len(node.input) == 2 \
            and canonical_einsum(node_attribute(node, "equation", "")) == _OUTER:
        nodes.append(node.name)
        return node.input[0], node.input[1]
    if node.op_type in ("ReduceSum", "Squeeze"):
        axes = _axes(g, node) if node.op_type == "ReduceSum" else g.ints(node.input[1] if len(node.input) > 1
                                                                          else "")
        if axes not in ([2], [-3]) or (node.op_type == "ReduceSum" and _keepdims(node)):
            return None
        found = _unsqueezed_outer(g, node.input[0])
        if found is None:
            return None
        mul, uk, uv = found
        nodes.extend([node.name, mul.name, uk.name, uv.name])
        return uk.input[0], uv.input[0]
    return None


def _gated_state(g: _Graph, carried: str) -> tuple[str, str | None]:
    """``(S, g)`` for the carried term ``g ⊙ S`` (``g`` None when there is no gate).

    A ``Mul`` factor is the gate when it is a constant, or when it is smaller than the product
    while the other factor is not; a product of two state-sized tensors is simply the state.
    """
    mul = g.op(carried, "Mul")
    if mul is None:
        return carried, None
    out_shape = g.shapes.get(carried)
    for side in (0, 1):
        gate, state = mul.input[side], mul.input[1 - side]
        gate_shape = g.shapes.get(gate)
        if constant_value(g.model, gate) is not None or (
                gate_shape is not None and out_shape is not None and gate_shape != out_shape
                and g.shapes.get(state) == out_shape):
            return state, gate
    return carried, None


def _prove_gate_keeps_state_shape(g: _Graph, gate: str, state: str, gated: str, form: str) -> None:
    """``gated = gate ⊙ state`` has ``state``'s shape whatever the input sizes: the gate has no
    more axes than the state and each of its dims is 1, the state's own dim (the same number or
    symbol), or faces a state dim known to be above 1 (which broadcasting cannot change)."""
    s_shape, o_shape = g.shapes.get(state), g.shapes.get(gated)
    if s_shape is not None and o_shape == s_shape and None not in s_shape:
        return
    value = constant_value(g.model, gate)
    g_shape = list(np.shape(value)) if value is not None else g.shapes.get(gate)
    why = None
    if s_shape is None or g_shape is None:
        why = "their shapes are not known"
    elif len(g_shape) > len(s_shape):
        why = f"the gate's shape {g_shape} has more axes than the state's {s_shape}"
    else:
        for gd, sd in zip(g_shape[::-1], s_shape[::-1]):
            if not (gd == 1 or (gd is not None and gd == sd) or (isinstance(sd, int) and sd > 1)):
                why = f"the gate's shape {g_shape} could broadcast the state's {s_shape} to a larger one"
                break
    if why is not None:
        raise _Miss(f"{form} with a gate g = {gate} kept in the graph (g ⊙ S as the op's state), "
                    f"but g ⊙ S may not have the state's shape: {why}")


def _prove_one_token(g: _Graph, tensors: list[str], form: str) -> None:
    """Axis 2 (tokens) of ``tensors`` is 1 whatever the input sizes (inferred, else evaluated)."""
    dims = [(g.shapes.get(t) or [None] * 3)[2] if g.rank(t) in (4, None) else None for t in tensors]
    if all(d == 1 for d in dims):
        return
    over = ("a state update over several tokens adds every token's kᵀv before any query reads "
            "the state, so each token sees the chunk's later keys: not causal attention")
    for t, d in zip(tensors, dims):
        if isinstance(d, int) and d != 1:
            raise _Miss(f"{form}, but the step has {d} tokens (axis 2 of {t}), not 1: {over}")
        if isinstance(d, str) and not d.startswith("unk__") and d in _input_dim_names(g.model):
            raise _Miss(f"{form}, but the token axis is dynamic ({d!r}), not statically 1: {over}")
    # unknown after shape inference (e.g. behind a Reshape with -1): evaluate at two input sizes
    shapes = [f"{t}/attnc_shape" for t in tensors]
    probe = [helper.make_node("Shape", [t], [s], name=s) for t, s in zip(tensors, shapes)]
    g.model.graph.node.extend(probe)
    try:
        runs = evaluate_tensors(g.model, shapes)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
        raise _Miss(f"{form}, but its token axis could not be evaluated: "
                    f"{str(exc).splitlines()[0][:200]}") from None
    finally:
        for node in probe:
            g.model.graph.node.remove(node)
    counts = sorted({int(run[s][2]) for run in runs for s in shapes})
    if counts != [1]:
        raise _Miss(f"{form}, but the step has {' / '.join(map(str, counts))} tokens at different input "
                    f"sizes, not statically 1: {over}")


def _input_dim_names(model) -> set[str]:
    return {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}


def _prove_state(g: _Graph, state: str, state_out: str, qf: str, v: str, form: str) -> int | None:
    """Checks ``S`` is a ``[B, H, D, Dv]`` float32 (or fp16/bf16) tensor the update does not
    broadcast; returns H when static."""
    elem = g.types.get(state, 0)
    if elem not in _STATE_TYPES:
        name = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name if elem else "of unknown type"
        raise _Miss(f"{form}, but the state {state} is {name}; the op carries its state in float32 "
                    "(float16 / bfloat16 states are cast to it, a wider one would lose precision)")
    shape, out_shape = g.shapes.get(state), g.shapes.get(state_out)
    if shape is not None and (len(shape) != 4 or (out_shape is not None and any(
            a != b for a, b in zip(shape, out_shape) if a is not None and b is not None))):
        raise _Miss(f"{form}, but the state {state} has shape {shape}, not the update's "
                    f"[B, H, D, Dv] = {out_shape} (the op does not broadcast its state)")
    for t in (state, state_out, qf, v):
        h = (g.shapes.get(t) or [None, None])[1]
        if isinstance(h, int) and h > 0:
            return h
    return None


def _prove_decay(g: _Graph, lam: str, heads: int | None, form: str) -> list[float]:
    """λ as one value per head: constant, shaped ``[1, H, 1, 1]`` (or fewer leading axes, or
    one value for every head), each in (0, 1]."""
    what = f"{form} with λ = {lam}"
    value = _constant_arrays(g.model, [lam])[lam]
    if isinstance(value, str):
        detail = ": only a constant per-head decay is the op's" if value == _READS_INPUTS else ""
        raise _Miss(f"{what}, but λ {value}{detail}")
    value = np.asarray(value, np.float64)
    shape = [1] * (4 - value.ndim) + list(value.shape)
    if value.ndim > 4 or shape[0] != 1 or shape[2:] != [1, 1]:
        raise _Miss(f"{what}, but λ has shape {list(value.shape)}, not one value per head ([1, H, 1, 1])")
    lam_values = value.ravel()
    if len(lam_values) == 1 and heads is not None:
        lam_values = np.repeat(lam_values, heads)
    elif len(lam_values) == 1 or (heads is not None and len(lam_values) != heads):
        raise _Miss(f"{what}, but λ has {len(lam_values)} values for {heads or 'a dynamic number of'} heads")
    bad = [float(d) for d in lam_values if not 0.0 < d <= 1.0]
    if bad:
        raise _Miss(f"{what}, but λ = {bad[0]:.6g} is not in (0, 1] (the op's decay contract)")
    return [float(d) for d in lam_values]


def _unsqueezed_outer(g: _Graph, t: str):
    """``(Mul, Unsqueeze of k, Unsqueeze of V)`` for ``t = Unsqueeze(k, -1) * Unsqueeze(V, -2)``
    (the per-token outer products ``[B, H, N, D, Dv]``), else None."""
    mul = g.op(t, "Mul")
    if mul is None:
        return None
    uk, uv = g.op(mul.input[0], "Unsqueeze"), g.op(mul.input[1], "Unsqueeze")
    if uk is None or uv is None:
        return None
    if g.ints(uk.input[1]) not in ([4], [-1]):
        uk, uv = uv, uk
    if g.ints(uk.input[1]) not in ([4], [-1]) or g.ints(uv.input[1]) not in ([3], [-2]):
        return None
    return mul, uk, uv


# ----------------------------------------------------------------------------- blockwise (chunked) prefill

_BLOCKWISE = ("matched blockwise lightning attention (per block: intra ((q_i·k_iᵀ) ⊙ M)·v_i + inter "
              "(q_i ⊙ λ^(j+1))·KV)")
_BLOCKWISE_WRITES = _BLOCKWISE + " written block by block into a preallocated output (ScatterND)"
# Ops a tensor computed from Q, K, V or the state may go through inside a proven block chain, with
# the inputs that must not read them (shapes, indices, divisors, conditions): the chain is then a
# polynomial in Q, K, V and the state, so agreeing with the op on random inputs proves it equal.
_POLYNOMIAL_OPS = {
    "MatMul": (), "Mul": (), "Add": (), "Sub": (), "Neg": (), "Identity": (), "Transpose": (), "Concat": (),
    "Einsum": (), "Cast": (), "CastLike": (), "Div": (1,), "Slice": (1, 2, 3, 4), "Reshape": (1,),
    "Unsqueeze": (1,), "Squeeze": (1,), "Expand": (1,), "Split": (1,), "Tile": (1,), "Flatten": (),
    "Gather": (1,), "ReduceSum": (1,), "Where": (0,), "ScatterND": (1,),
}
_FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)
# The region is evaluated in float64; its decay tables may hold float32-rounded λ^t (a constant-folded
# export), which the op's λ^t can only match to float32 precision. A wrong power of λ < 1 - 1e-4 shifts
# a term by more than this.
_BLOCKWISE_RTOL = 1e-5


@dataclass
class _Block:
    out: str                      # the block's output rows (a Concat input, or a ScatterND's updates)
    intra: _Candidate             # ((q_i·k_iᵀ) ⊙ M)·v_i as the quadratic matcher proved it
    inter: onnx.NodeProto | None  # MatMul(q_i ⊙ λ^(j+1), KV), None when the block has none
    kv: str | None                # the state the inter term reads
    nodes: list[str]


@dataclass
class _Writes:
    """The blocks written into a preallocated output: ``ScatterND`` after ``ScatterND`` on one buffer
    (``output[:, :, s:e] = block``), with the Transposes an export puts around them."""

    buffer: str                   # the preallocated tensor the first write goes into
    steps: list                   # buffer -> out, in order: ScatterND nodes and Transpose perms
    out: str                      # the last write's result, past Transposes that are its only reader
    updates: list[str]            # each write's rows, with layout ops (_LAYOUT_OPS) and float Casts taken off
    nodes: list[str]              # the ScatterND and Transpose nodes


# What an export puts between a block's rows and the ScatterND that writes them: no arithmetic, so the
# block is found through them (a Slice too: which of its rows are written is _prove_writes' question);
# the proof evaluates them all the same.
_LAYOUT_OPS = ("Reshape", "Expand", "Transpose", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Slice")


def _blockwise_candidates(g: _Graph, report: PassReport) -> list[_Candidate]:
    """Unrolled blockwise lightning attention (Lightning Attention-2's prefill loop) -> one node each.

    Anchors: a ``Concat`` on the token axis whose inputs are blocks (at least one with an
    inter-block term), the last ``ScatterND`` of a chain writing blocks into a preallocated
    output, then a lone block ``intra + inter`` (a sequence within one block). A chain
    recognised but not proven is a near-miss whose nodes stay as they are (claimed, so the
    quadratic matcher does not fuse its intra-block terms one by one).
    """
    found, used = [], set()
    anchors = [n for n in g.model.graph.node if n.op_type == "Concat" and g.rank(n.output[0]) in (4, None)
               and node_attribute(n, "axis", None) in (2, -2)]
    anchors += [n for n in g.model.graph.node if n.op_type == "ScatterND"]
    anchors += [n for n in g.model.graph.node if n.op_type == "Add"]
    for node in anchors:
        if node.name in used or node.name in g.claimed:
            continue
        recognised: list[str] = []
        try:
            writes = _scatter_chain(g, node) if node.op_type == "ScatterND" else None
            if node.op_type == "ScatterND" and writes is None:
                continue
            blocks = _chain(g, node, writes, recognised)
            if blocks is None:
                continue
            cand = _blockwise(g, node, blocks, writes)
        except _Miss as miss:
            report.near_misses.append(NearMiss(FAMILY, node.name, str(miss)))
            g.claimed.update(recognised)
            continue
        if used & set(cand.nodes):
            continue
        used.update(cand.nodes)
        found.append(cand)
    return found


def _chain(g: _Graph, anchor, writes: _Writes | None, recognised: list[str]) -> list[_Block] | None:
    """The blocks ``anchor`` concatenates or ``writes`` writes (or the one block it is), None when it is
    not such a chain; the nodes of the blocks it recognised go to ``recognised`` (for a near-miss to claim)."""
    inputs = (writes.updates if writes else list(anchor.input) if anchor.op_type == "Concat"
              else [anchor.output[0]])
    if anchor.op_type == "Add" and _in_chain(g, anchor.output[0]):
        return None  # one block of a chain whose Concat / ScatterND was no anchor: not a whole sequence
    blocks: list[_Block | _Miss | None] = []
    for t in inputs:
        try:
            blocks.append(_block(g, t))
        except _Miss as miss:
            blocks.append(miss)
    whole = [b for b in blocks if isinstance(b, _Block)]
    if not any(b.inter is not None for b in whole) or (anchor.op_type == "Add" and len(whole) != 1):
        if anchor.op_type != "Add" and len(inputs) > 1 and any(isinstance(b, _Miss) for b in blocks):
            _refuse_if_unrolled(g, inputs)   # why its decay tables do not fit: a dynamic length
        return None
    recognised.extend([anchor.name] + (writes.nodes if writes else []) + [name for b in whole for name in b.nodes])
    if any(isinstance(b, _Miss) for b in blocks):
        _refuse_if_unrolled(g, inputs)
    for i, b in enumerate(blocks):
        if isinstance(b, _Miss):
            raise _Miss(f"{_BLOCKWISE}, but block {i}'s intra-block term is not proven: {b}")
        if b is None:
            where = f"write {i} (ScatterND updates" if writes else f"Concat input {i} ("
            raise _Miss(f"{_BLOCKWISE}, but {where} {inputs[i]}) is not a block: neither "
                        "((q_i·k_iᵀ) ⊙ M)·v_i nor that plus an inter-block term")
    return blocks


def _scatter_chain(g: _Graph, last) -> _Writes | None:
    """The writes ending in ScatterND ``last`` (None when another ScatterND writes on into its result,
    or a write is not a plain overwrite): back along the buffer through Transposes, Identities and
    float Casts to the first tensor no ScatterND made, forward through the Transposes that alone read
    the result (dynamo moves the token axis first for each write and back after it)."""
    if _written_on(g, last.output[0]):
        return None
    steps: list = []
    nodes, t = [], last.output[0]
    outputs = {o.name for o in g.model.graph.output}
    while t not in outputs and len(users := g.cons.get(t, [])) == 1 and users[0].op_type in ("Transpose",
                                                                                              "Identity"):
        if users[0].op_type == "Transpose":
            steps.append(node_attribute(users[0], "perm"))
        nodes.append(users[0].name)
        t = users[0].output[0]
    out, t, before = t, last.output[0], []
    while (node := g.op(t, "ScatterND", "Transpose", "Identity", "Cast")) is not None:
        if node.op_type == "ScatterND":
            if node_attribute(node, "reduction", b"none") not in (b"none", "none"):
                return None
            before.append(node)
        elif node.op_type == "Transpose":
            before.append(node_attribute(node, "perm"))
        elif node.op_type == "Cast" and node_attribute(node, "to", 0) not in _FLOAT_TYPES:
            break
        nodes.append(node.name)
        t = node.input[0]
    steps = before[::-1] + steps
    if any(step is None for step in steps):
        return None   # a Transpose without perm (reversing every axis): not an export's slice write
    scatters = [step for step in steps if isinstance(step, onnx.NodeProto)]
    return _Writes(t, steps, out, [_strip_layout(g, w.input[2]) for w in scatters], nodes)


def _feeds_scatter(g: _Graph, t: str, slot: int, through) -> bool:
    """Whether ``t`` reaches input ``slot`` of a ScatterND, passing only nodes ``through`` accepts."""
    stack = [t]
    while stack:
        t = stack.pop()
        for user in g.cons.get(t, []):
            if user.op_type == "ScatterND" and user.input[slot] == t:
                return True
            if through(user):
                stack.append(user.output[0])
    return False


def _written_on(g: _Graph, t: str) -> bool:
    """Whether a ScatterND writes into ``t`` (through Transposes, Identities and float Casts)."""
    return _feeds_scatter(g, t, 0, lambda user: user.op_type in ("Transpose", "Identity") or (
        user.op_type == "Cast" and node_attribute(user, "to", 0) in _FLOAT_TYPES))


def _strip_layout(g: _Graph, t: str) -> str:
    while (node := g.op(_strip_casts(g, t), *_LAYOUT_OPS)) is not None:
        t = node.input[0]
    return _strip_casts(g, t)


def _in_chain(g: _Graph, t: str) -> bool:
    """Whether ``t`` is a Concat input or (through layout ops) the rows a ScatterND writes."""
    if any(user.op_type == "Concat" for user in g.cons.get(t, [])):
        return True
    return _feeds_scatter(g, t, 2, lambda user: user.op_type in _LAYOUT_OPS or user.op_type == "Cast")


def _refuse_if_unrolled(g: _Graph, inputs: list[str]) -> None:
    """A near-miss when the rows the blocks slice (the first token-axis ``Slice`` above ``inputs``)
    have a token count that follows the input sizes: a loop unrolled for one length."""
    stack, seen = [(t, 0) for t in inputs], set()
    while stack:
        t, depth = stack.pop()
        node = g.op(t)
        if node is None or t in seen or depth > 6:
            continue
        seen.add(t)
        if node.op_type == "Slice" and g.rank(node.input[0]) == 4 and depends_on_data(g.model, node.input[0]):
            probe = helper.make_node("Shape", [node.input[0]], [node.input[0] + "/attnc_shape"])
            g.model.graph.node.append(probe)
            try:
                counts = sorted({int(run[probe.output[0]][2]) for run in evaluate_tensors(g.model, [probe.output[0]],
                                                                                          sizes=(2, 3))})
            except Exception:  # noqa: BLE001 - not evaluable: no verdict on the length
                return
            finally:
                g.model.graph.node.remove(probe)
            if len(counts) > 1:
                _unrolled(node.input[0], " / ".join(map(str, counts)) + " tokens at different input sizes",
                          inputs)
            return
        stack.extend((i, depth + 1) for i in node.input if i)


def _strip_casts(g: _Graph, t: str) -> str:
    while (node := g.op(t, "Cast", "Identity")) is not None:
        if node.op_type == "Cast" and node_attribute(node, "to", 0) not in _FLOAT_TYPES:
            break
        t = node.input[0]
    return t


def _block(g: _Graph, t: str) -> _Block | None:
    """``intra`` or ``intra + inter`` (either order, through float Casts) for one block's rows."""
    t = _strip_casts(g, t)
    node = g.op(t, "MatMul", "Add")
    if node is None:
        return None
    if node.op_type == "MatMul":
        intra = _intra(g, node)
        return None if intra is None else _Block(t, intra, None, None, list(intra.nodes))
    for side in (0, 1):
        mm = g.op(_strip_casts(g, node.input[side]), "MatMul")
        other = g.op(_strip_casts(g, node.input[1 - side]), "MatMul")
        if mm is None or other is None:
            continue
        intra = _intra(g, mm)
        if intra is None:
            continue
        # inter: MatMul(a, KV) where a is computed from the block's queries (q_i ⊙ λ^(j+1))
        if not _reaches(g, other.input[0], intra.q, depth=4):
            return None
        return _Block(t, intra, other, other.input[1], list(intra.nodes) + [node.name, other.name])
    return None


def _intra(g: _Graph, mm) -> _Candidate | None:
    cand = _match_quadratic(g, mm)
    if cand is None or cand.normalize or cand.k_perm is not None or cand.feature_map != "identity":
        return None
    return cand


def _reaches(g: _Graph, t: str, target: str, depth: int) -> bool:
    if t == target:
        return True
    node = g.op(t)
    return depth > 0 and node is not None and any(_reaches(g, i, target, depth - 1) for i in node.input if i)


def _slice_source(g: _Graph, t: str) -> str:
    node = g.op(t, "Slice")
    return t if node is None else node.input[0]


def _blockwise(g: _Graph, anchor, blocks: list[_Block], writes: _Writes | None) -> _Candidate:
    """The fused candidate for a chain of blocks, proven by :func:`_prove_writes` (when the blocks are
    written into a preallocated output) and :func:`_prove_blockwise`."""
    out = writes.out if writes else anchor.output[0]
    sources = {}
    for role in ("q", "k", "v"):
        tensors = [getattr(b.intra, role) for b in blocks]
        found = {_slice_source(g, t) for t in tensors}
        if len(found) != 1 or (len(blocks) > 1 and found == {tensors[0]}):
            raise _Miss(f"{_BLOCKWISE}, but the blocks' {role.upper()} rows are not slices of one tensor")
        sources[role] = found.pop()
    scales = {b.intra.scale for b in blocks}
    if len(scales) != 1:
        raise _Miss(f"{_BLOCKWISE}, but the blocks scale q·kᵀ differently ({sorted(scales)})")
    q, k, v = sources["q"], sources["k"], sources["v"]
    n = (g.shapes.get(q) or [None] * 3)[2]
    if isinstance(n, str) and n in _input_dim_names(g.model):
        _unrolled(q, n, blocks)
    state = blocks[0].kv if blocks[0].inter is not None else None
    if state is not None and not depends_on_data(g.model, state):
        state = None      # zeros (proven below), or not the op's state at all: the proof says which
    if state is not None and g.types.get(state) != TensorProto.FLOAT:
        raise _Miss(f"{_BLOCKWISE}, but the initial state {state} is not float32 (the op's state)")
    state_out = _final_state(g, blocks[-1])
    owner = _prove_writes(g, writes) if writes else None
    nodes, lam, perm = _prove_blockwise(g, out, state_out, [t for t in (q, k, v, state) if t], blocks,
                                        blocks[0].intra.scale, owner)
    heads = len(lam)
    cand = _Candidate(anchor.name, "blockwise", nodes, q, k, None, v, out, "identity", causal=True,
                      scale=blocks[0].intra.scale, heads=heads, state=state, state_out=state_out,
                      out_perm=None if perm == [0, 1, 2, 3] else perm)
    if any(abs(d - 1.0) > 1e-7 for d in lam):
        cand.decay = lam
    return cand


def _unrolled(q: str, n, blocks: list) -> None:
    raise _Miss(f"{_BLOCKWISE}, but the token axis of {q}, which the blocks slice, is dynamic ({n}): the "
                f"export unrolled its {len(blocks)} block(s) for one sequence length, so a fused node would be "
                "right only there; export with a static sequence length")


def _final_state(g: _Graph, last: _Block) -> str | None:
    """``λ^L·KV + (k ⊙ λ^(L−1−s))ᵀ v`` after the last block when the graph uses it (returned,
    read on): the node's ``state_out``; None when it is not computed or nothing reads it."""
    if last.kv is None:
        return None
    updates = []
    for mul in g.cons.get(last.kv, []):
        if mul.op_type != "Mul":
            continue
        for add in g.cons.get(mul.output[0], []):
            if add.op_type == "Add" and g.op(_strip_casts(g, add.input[1 - list(add.input).index(mul.output[0])]),
                                             "MatMul") is not None:
                updates.append(add.output[0])
    outputs = {o.name for o in g.model.graph.output}
    used = [u for u in updates if u in outputs or g.cons.get(u)]
    if len(used) != 1:
        return None
    if g.types.get(used[0]) != TensorProto.FLOAT:
        raise _Miss(f"{_BLOCKWISE}, but the final state {used[0]} is not float32 (the op's state_out)")
    return used[0]


def _prove_writes(g: _Graph, writes: _Writes) -> np.ndarray:
    """Which write (block) sets each element of ``writes.out``, from the ScatterNDs' indices evaluated
    at two batch sizes, with the buffer's Transposes followed. Every element must be written exactly
    once, else a near-miss: an element never written keeps the preallocated buffer's content (an
    ``empty`` tensor's, garbage), one written twice is a block overwriting another's rows."""
    scatters = [step for step in writes.steps if isinstance(step, onnx.NodeProto)]
    try:
        runs = evaluate_tensors(g.model, [writes.buffer] + [w.input[1] for w in scatters], sizes=(2, 3))
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
        raise _Miss(f"{_BLOCKWISE_WRITES}, but its indices could not be evaluated: "
                    f"{str(exc).splitlines()[0][:200]}") from None
    owner = None
    for run in runs:
        count = np.zeros(np.shape(run[writes.buffer]), np.int64)
        who = np.full(count.shape, -1)
        i = 0
        for step in writes.steps:
            if not isinstance(step, onnx.NodeProto):
                count, who = count.transpose(step), who.transpose(step)
                continue
            idx = np.asarray(run[step.input[1]])
            at = tuple(idx.reshape(-1, idx.shape[-1]).T)
            try:
                earlier = who[at]
                np.add.at(count, at, 1)
            except IndexError:
                raise _Miss(f"{_BLOCKWISE_WRITES}, but block {i}'s write ({step.name}) indexes outside the "
                            f"buffer {list(count.shape)}") from None
            twice = count[at] > 1
            if twice.any():
                prev = int(earlier[tuple(np.argwhere(twice)[0])])
                whose = f"block {prev}'s rows" if prev >= 0 else "some of its rows twice"
                raise _Miss(f"{_BLOCKWISE_WRITES}, but block {i}'s write ({step.name}) overwrites {whose}: "
                            "the writes overlap")
            who[at] = i
            i += 1
        if (count == 0).any():
            raise _Miss(f"{_BLOCKWISE_WRITES}, but {int((count == 0).sum())} elements of {writes.out} (the first "
                        f"at {np.argwhere(count == 0)[0].tolist()}) are never written and keep the buffer's "
                        "content: the writes do not cover the output")
        owner = who if owner is None else owner
    return owner


def _prove_blockwise(g: _Graph, out: str, state_out: str | None, stops: list[str], blocks: list[_Block],
                     scale: float, owner: np.ndarray | None = None) -> tuple[list[str], list[float], list[int]]:
    """Proves that the nodes computing ``out`` (and ``state_out``) from ``stops`` = Q, K, V (and the
    state) are lightning attention; returns them (the data path), λ per head and ``out``'s layout
    (the Transpose perm of ``[B, H, N, Dv]`` it holds; ``owner``: which block wrote each of its
    elements, from :func:`_prove_writes`, else the blocks are concatenated in order).

    The region between them is cut out of the graph, every tensor it reads besides Q, K, V and the
    state must not read input values (constants, shapes: those are evaluated on the model), and every
    node on the data path must be polynomial in the data (:data:`_POLYNOMIAL_OPS`). The region then
    runs in float64 on random Q, K, V (and state), twice at each input size (two batch sizes when
    dynamic), against the op's semantics (:func:`_lightning_float64`, the op's reference vectorised)
    with λ read off the longest block's decay table; a polynomial that agrees on random points is that
    polynomial. Differences must stay below ``1e-5`` of the terms' magnitude (the same attention on
    |Q|, |K|, |V|), which float32-rounded decay tables meet and a wrong power of λ, a dropped term or
    a different state do not. ``out`` may hold the output transposed (a buffer written token-axis
    first): the layout whose values agree is the one returned.
    """
    model = g.model
    index = {n.name: i for i, n in enumerate(model.graph.node)}
    inits = {i.name: i for i in model.graph.initializer}
    inputs = {i.name for i in model.graph.input}
    masks = list(dict.fromkeys(b.intra.mask for b in blocks if b.intra.mask))
    wanted = [out, *([state_out] if state_out else []), *dict.fromkeys(b.out for b in blocks)]
    region, side, seen = {}, [], set(stops)
    stack = wanted + masks
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in inits:
            continue
        node = g.prod.get(t)
        if node is None or node.op_type in ("Shape", "Size"):
            if node is None and t in inputs:
                raise _Miss(f"{_BLOCKWISE}, but it reads the input {t} besides Q, K, V and the state")
            side.append(t)
            continue
        region[node.name] = node
        stack.extend(node.input)
    nodes = sorted(region.values(), key=lambda n: index[n.name])
    data = set(stops)
    for node in nodes:
        if not any(i in data for i in node.input):
            continue
        allowed = _POLYNOMIAL_OPS.get(node.op_type)
        bad_input = allowed is not None and any(node.input[i] in data for i in allowed if i < len(node.input))
        if allowed is None or bad_input or (node.op_type == "Cast" and node_attribute(node, "to", 0)
                                             not in _FLOAT_TYPES):
            raise _Miss(f"{_BLOCKWISE}, but node {node.name} ({node.op_type}) computes on Q, K, V or the state "
                        "in a way the proof does not cover (only sums, products, casts and reshapes)")
        data.update(node.output)
    side = [t for t in side if t not in data]
    if any(depends_on_data(model, t) for t in side):
        raise _Miss(f"{_BLOCKWISE}, but the chain reads input values besides Q, K, V and the state")
    try:
        runs = evaluate_tensors(model, stops + side, sizes=(2, 3))
        types = {t: TensorProto.DOUBLE for t in stops}
        types.update({t: (TensorProto.DOUBLE if np.issubdtype(runs[0][t].dtype, np.floating)
                          else helper.np_dtype_to_tensor_dtype(runs[0][t].dtype)) for t in side})
        tables = {m: initializer_array(inits[m]).astype(np.float64) for m in masks if m in inits}
        outputs = wanted + [m for m in masks if m not in tables]
        session = _float64_session(model, nodes, types, outputs, inits)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
        raise _Miss(f"{_BLOCKWISE}, but it could not be evaluated: {str(exc).splitlines()[0][:200]}") from None
    lengths = sorted({run[stops[0]].shape[2] for run in runs})
    if len(lengths) > 1:   # Q's token axis follows the input sizes: not the length the loop unrolled for
        _unrolled(stops[0], " / ".join(map(str, lengths)) + " tokens at different input sizes", blocks)
    rng = np.random.default_rng(0)
    lam = perm = None
    for run in runs:
        for _ in range(2):
            feeds = {t: rng.standard_normal(np.shape(run[t])) for t in stops}
            feeds.update({t: np.asarray(run[t]).astype(np.float64 if types[t] == TensorProto.DOUBLE
                                                       else np.asarray(run[t]).dtype) for t in side})
            try:
                got = {**tables, **dict(zip(outputs, session.run(outputs, feeds)))}
                if lam is None:   # from the longest block's table: the most powers of λ, rounded once each
                    longest = max(blocks, key=lambda b: got[b.out].shape[2])
                    lam = _decay_from_table(got[longest.intra.mask] if longest.intra.mask else None,
                                            feeds[stops[0]].shape[1], got[longest.out].shape[2])
                perm = _compare_blockwise(got, feeds, stops, out, state_out, blocks, lam, scale, perm, owner)
            except _Miss:
                raise
            except Exception as exc:  # noqa: BLE001 - e.g. shapes the op's reference refuses: no proof
                raise _Miss(f"{_BLOCKWISE}, but it is not the op on [B, H, N, D] rows and a [B, H, D, Dv] "
                            f"state: {str(exc).splitlines()[0][:200]}") from None
    return [n.name for n in nodes if any(o in data for o in n.output)], lam, perm


def _decay_from_table(table: np.ndarray | None, heads: int, n: int) -> list[float]:
    """λ per head from a block's causal decay table ``M[h, t, s] = λ^(t−s)`` (``n`` tokens; None:
    λ = 1): ``M[h, t, 0]^(1/t)`` at the largest ``t`` whose entry is a normal float32 (a float32
    table rounds each λ^t once, so the root of a high power is the closest λ)."""
    if table is None or n < 2:
        return [1.0] * heads
    while table.ndim > 3:
        table = table[0]
    table = np.broadcast_to(table, (heads, n, n))
    lam = []
    for h in range(heads):
        col = table[h, :, 0]
        ok = [t for t in range(1, n) if col[t] >= 1e-30]
        lam.append(float(col[ok[-1]] ** (1.0 / ok[-1])) if ok else 1.0)
    return lam


def _compare_blockwise(got, feeds, stops, out, state_out, blocks, lam, scale, perm, owner) -> list[int]:
    """Raises the near-miss naming the first block that differs; returns ``out``'s layout (``perm``
    when given, else found)."""
    import torch

    q, k, v = (torch.from_numpy(feeds[t]) for t in stops[:3])
    s0 = torch.from_numpy(feeds[stops[3]]) if len(stops) > 3 else None
    decay = torch.tensor(lam, dtype=torch.float64)
    ref, ref_state = (x.numpy() for x in _lightning_float64(q, k, v, decay, s0, scale))
    mag, mag_state = (x.numpy() for x in _lightning_float64(q.abs(), k.abs(), v.abs(), decay,
                                                            None if s0 is None else s0.abs(), scale))
    tol = _BLOCKWISE_RTOL * mag + 1e-12
    o = got[out]
    perm = perm or _layout(o, ref, tol)
    o = o.transpose(np.argsort(perm))
    bad = np.abs(o - ref) > tol
    if bad.any():
        # the block that wrote each token row: the writes' owners, else the concatenation's order
        rows = (owner.transpose(np.argsort(perm))[0, 0, :, 0] if owner is not None
                else np.repeat(np.arange(len(blocks)), [got[b.out].shape[2] for b in blocks]))
        i = int(rows[np.argwhere(bad)[0][2]])
        span = np.flatnonzero(rows == i)
        start, end = int(span[0]), int(span[-1])
        err = float(np.max(np.abs(o - ref)[..., span, :] / (mag[..., span, :] + 1e-300)))
        hint = " (it has no inter-block term)" if blocks[i].inter is None and (i > 0 or s0 is not None) else ""
        raise _Miss(f"{_BLOCKWISE}, but block {i} (tokens {start}-{end}){hint} differs from "
                    f"lightning attention with λ = {[round(x, 6) for x in lam]} by up to {err:.2g} of its terms' "
                    "magnitude: a decay power, the inter-block term or the state it reads is not the blockwise form's")
    if state_out is not None:
        diff = np.abs(got[state_out] - ref_state)
        if got[state_out].shape != ref_state.shape or (diff > _BLOCKWISE_RTOL * mag_state + 1e-12).any():
            raise _Miss(f"{_BLOCKWISE}, but the state it returns ({state_out}) is not "
                        "λ^N·S0 + Σ_s λ^(N−1−s) k_sᵀv_s")
    return perm


def _layout(o: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> list[int]:
    """The perm with ``o = Transpose(ref, perm)``: of those whose shape fits (the identity first),
    the one whose values agree, else the first (for the near-miss to name the block that differs)."""
    fits = [list(p) for p in itertools.permutations(range(ref.ndim))
            if o.ndim == ref.ndim and tuple(ref.shape[a] for a in p) == o.shape]
    if not fits:
        raise _Miss(f"{_BLOCKWISE}, but its output has shape {list(o.shape)}, not Q's rows [B, H, N, Dv] = "
                    f"{list(ref.shape)} (or a transpose of them): the blocks do not cover the sequence once")
    return next((p for p in fits if not (np.abs(o - ref.transpose(p)) > tol.transpose(p)).any()), fits[0])


def _lightning_float64(q, k, v, decay, state, scale: float, chunk: int = 64):
    """The op's causal lightning attention (identity map, no normaliser) on float64 ``[B, H, N, D]``
    tensors: ``(O, state_out)`` with ``O_t = Σ_{s≤t} λ^(t−s) (s·q_t·k_s) v_s + λ^(t+1) s·q_t·S0`` and
    ``state_out = λ^N S0 + Σ_s λ^(N−1−s) k_sᵀv_s``, as :func:`attnc.plugins.linear.reference` defines them.

    That reference loops over tokens in Python (about 1.5 s per call at N = 2048, and the proof
    calls it four times per input size); this is the masked quadratic form over ``chunk`` query rows
    at a time, the state carried between chunks, so it stays O(N·chunk) in time and memory where the
    whole quadratic form would hold ``[B, H, N, N]``. Powers of λ are taken with ``pow`` in float64
    (exact at the proof's tolerance, λ = 0 included). Equal to the reference to 1e-12
    (``tests/passes/test_linear_blockwise.py``).
    """
    import torch

    b, h, n, _ = q.shape
    lam = decay.to(torch.float64).view(h, 1, 1)
    q = q * scale
    kv = q.new_zeros(b, h, q.shape[-1], v.shape[-1]) if state is None else state.to(torch.float64)
    outs = []
    for start in range(0, n, chunk):
        qc, kc, vc = q[:, :, start:start + chunk], k[:, :, start:start + chunk], v[:, :, start:start + chunk]
        m = qc.shape[2]
        j = torch.arange(m, dtype=torch.float64)
        dist = j[:, None] - j[None, :]
        table = torch.where(dist >= 0, lam ** dist.clamp(min=0), 0.0)                 # [H, m, m]
        outs.append(((qc @ kc.transpose(-1, -2)) * table) @ vc + (qc * lam ** (j[:, None] + 1)) @ kv)
        kv = lam ** m * kv + (kc * lam ** (m - 1 - j[:, None])).transpose(-1, -2) @ vc
    out = torch.cat(outs, dim=2) if outs else q.new_zeros(b, h, 0, v.shape[-1])
    return out, kv


def _float64_session(model, nodes, inputs: dict[str, int], outputs: list[str], inits: dict):
    """An ONNX Runtime session computing ``outputs`` from ``inputs`` (name -> element type) with
    ``nodes``, every float tensor (initializers, constants, casts) widened to float64."""

    def wide(tensor):
        if tensor.data_type in _FLOAT_TYPES:
            return numpy_helper.from_array(initializer_array(tensor).astype(np.float64), tensor.name)
        return tensor

    converted, used = [], set()
    for node in nodes:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(wide(attr.t))
            elif attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i in _FLOAT_TYPES:
                attr.i = TensorProto.DOUBLE
        floats = [a for a in node.attribute if a.name in ("value_float", "value_floats")]
        if node.op_type == "Constant" and floats:
            value = np.asarray(helper.get_attribute_value(floats[0]), np.float64)
            del node.attribute[:]
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(value)))
        converted.append(node)
        used.update(node.input)
    graph = helper.make_graph(
        converted, "blockwise_proof",
        [helper.make_tensor_value_info(t, elem, None) for t, elem in inputs.items()],
        [helper.make_value_info(t, onnx.TypeProto()) for t in outputs],
        initializer=[wide(inits[t]) for t in sorted(used) if t in inits])
    return probe_session(helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version))


def _normaliser(g: _Graph, cand: _Candidate, den_matcher) -> None:
    """Extend ``cand`` over ``out / (den + eps)`` when ``den`` is the matching normaliser."""
    users = g.cons.get(cand.out, [])
    if len(users) != 1 or users[0].op_type != "Div" or users[0].input[0] != cand.out:
        return
    div = users[0]
    den, eps, extra = div.input[1], 0.0, []
    add = g.op(den, "Add")
    if add is not None:
        for side in (0, 1):
            c = scalar_constant(g.model, add.input[1 - side])
            if c is not None:
                den, eps, extra = add.input[side], c, [add.name]
                break
    found = den_matcher(den)
    if found is None:
        return
    cand.nodes.extend([div.name] + extra + found)
    cand.out, cand.normalize, cand.eps = div.output[0], True, eps


def _axes(g: _Graph, node) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        return g.ints(node.input[1])
    axes = node_attribute(node, "axes", None)
    return list(axes) if axes is not None else None


def _keepdims(node) -> bool:
    return bool(node_attribute(node, "keepdims", 1))


# ----------------------------------------------------------------------------- rewriting

def _k_input(model, cand: _Candidate, prefix: str) -> str:
    if cand.k_perm is None:
        return cand.k
    name = prefix + "/K"
    model.graph.node.append(helper.make_node("Transpose", [cand.k], [name], name=prefix + "/k_transpose",
                                             perm=cand.k_perm))
    return name


def _drop_producer(model, tensor: str) -> None:
    for n in [n for n in model.graph.node if tensor in n.output]:
        model.graph.node.remove(n)


def _output(model, cand: _Candidate, prefix: str) -> str:
    """The tensor the fused node writes ``O [B, H, N, Dv]`` to: ``cand.out`` (its producer dropped), or,
    when ``cand.out`` holds O transposed (a preallocated buffer's layout), a new tensor behind a
    Transpose that makes ``cand.out``."""
    _drop_producer(model, cand.out)
    if cand.out_perm is None:
        return cand.out
    model.graph.node.append(helper.make_node("Transpose", [prefix + "/O"], [cand.out], name=prefix + "/o_transpose",
                                             perm=cand.out_perm))
    return prefix + "/O"


def _rewrite(model, cand: _Candidate) -> None:
    prefix = cand.anchor + "/attnc_linear"
    out = _output(model, cand, prefix)
    k = _k_input(model, cand, prefix)
    inputs = [cand.q, k, cand.v, ""]
    if cand.decay is not None:
        inputs[3] = prefix + "/decay"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(cand.decay, np.float32), inputs[3]))
    state, state_out = _float32_state(model, cand, prefix)
    node = plugin.make_node(
        inputs + [state], [out, state_out], prefix, feature_map=cand.feature_map, causal=int(cand.causal),
        normalize=int(cand.normalize), eps=float(cand.eps), scale=float(cand.scale))
    model.graph.node.append(node)
    plugin.add_to_model(model, node)


def _float32_state(model, cand: _Candidate, prefix: str) -> tuple[str, str]:
    """The recurrent form's ``(state, state_out)`` for the op (``("", "")`` for the others).

    ``state_out`` takes over the update's tensor name, so graph outputs keep theirs. The op's
    state is float32: a float16 / bfloat16 state is cast to float32 on the way in and back on
    the way out, so the update itself runs in float32 and rounds once per step, as the
    model's own ``λ·S + kᵀv`` does.
    """
    if cand.state_out is None:
        return cand.state or "", ""
    _drop_producer(model, cand.state_out)
    if cand.state_type == TensorProto.FLOAT:
        return cand.state or "", cand.state_out
    state, state_out = prefix + "/state_f32", prefix + "/state_out_f32"
    model.graph.node.extend([
        helper.make_node("Cast", [cand.state], [state], name=prefix + "/state_cast", to=TensorProto.FLOAT),
        helper.make_node("Cast", [state_out], [cand.state_out], name=prefix + "/state_out_cast",
                         to=cand.state_type)])
    return state, state_out


def _rewrite_onnx_linear_attention(model, cand: _Candidate) -> None:
    """A lightning match as ONNX ``LinearAttention``."""
    prefix = cand.anchor + "/onnx_linear_attention"
    out = _output(model, cand, prefix)
    state, state_out = _float32_state(model, cand, prefix)
    _emit_onnx_linear_attention(model, prefix, cand.q, _k_input(model, cand, prefix), cand.v, out,
                                cand.heads, cand.decay, cand.scale, state, state_out)


def _emit_onnx_linear_attention(model, prefix: str, q: str, k: str, v: str, out: str, heads: int,
                                decay: list[float] | None, scale: float, state: str = "",
                                state_out: str = "") -> None:
    """ONNX ``LinearAttention`` on ``[B, H, N, D]`` tensors (packed to its 3-D ``[B, T, H·D]``
    layout and back); ``state`` / ``state_out`` are its 4-D ``past_state`` / ``present_state``."""
    nodes, inits = [], []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), prefix + "/" + name))
        return prefix + "/" + name

    packed_shape = const("packed_shape", np.array([0, 0, -1], np.int64))
    packed = []
    for role, t in (("q", q), ("k", k), ("v", v)):
        nodes.append(helper.make_node("Transpose", [t], [f"{prefix}/{role}_bthd"], perm=[0, 2, 1, 3],
                                      name=f"{prefix}/{role}_transpose"))
        nodes.append(helper.make_node("Reshape", [f"{prefix}/{role}_bthd", packed_shape], [f"{prefix}/{role}_packed"],
                                      name=f"{prefix}/{role}_pack"))
        packed.append(f"{prefix}/{role}_packed")
    inputs = packed + [state, ""]
    rule = "linear"
    if decay is not None and any(abs(d - 1.0) > 1e-7 for d in decay):
        rule = "gated"
        log_decay = const("log_decay", np.log(np.asarray(decay, np.float64)).astype(np.float32))
        nodes += [
            helper.make_node("Shape", [packed[0]], [prefix + "/q_shape"], end=2, name=prefix + "/shape"),
            helper.make_node("Concat", [prefix + "/q_shape", const("heads", np.array([heads], np.int64))],
                             [prefix + "/decay_shape"], axis=0, name=prefix + "/decay_shape"),
            helper.make_node("Expand", [log_decay, prefix + "/decay_shape"], [prefix + "/decay32"],
                             name=prefix + "/decay_expand"),
            helper.make_node("CastLike", [prefix + "/decay32", packed[0]], [prefix + "/decay"],
                             name=prefix + "/decay_cast"),
        ]
        inputs[4] = prefix + "/decay"
    while inputs[-1] == "":
        inputs.pop()
    # present_state is a required output in the schema even when nothing reads it
    nodes.append(helper.make_node("LinearAttention", inputs, [prefix + "/y", state_out or prefix + "/present_state"],
                                  name=prefix, q_num_heads=heads, kv_num_heads=heads, update_rule=rule,
                                  scale=float(scale)))
    unpack_shape = const("unpack_shape", np.array([0, 0, heads, -1], np.int64))
    nodes.append(helper.make_node("Reshape", [prefix + "/y", unpack_shape], [prefix + "/y4"], name=prefix + "/unpack"))
    nodes.append(helper.make_node("Transpose", [prefix + "/y4"], [out], perm=[0, 2, 1, 3],
                                  name=prefix + "/y_transpose"))
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)


# ----------------------------------------------------------------------------- fused nodes -> LinearAttention

@dataclass
class _FusedLightning:
    """A ``KernelLinearAttention`` node that is lightning attention, ready to lower."""

    node: onnx.NodeProto
    heads: int
    decay: list[float] | None
    scale: float
    match: Match


def _fused_lightning(model, report: PassReport) -> list[_FusedLightning]:
    """``KernelLinearAttention`` nodes ONNX ``LinearAttention`` computes; near-misses say why not."""
    found, shapes = [], None
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type != OP_TYPE:
            continue
        attrs = {**plugin.ATTRIBUTES, **{a.name: helper.get_attribute_value(a) for a in node.attribute}}
        feature_map = attrs["feature_map"].decode() if isinstance(attrs["feature_map"], bytes) else attrs["feature_map"]
        if not (int(attrs["causal"]) and feature_map == "identity" and not int(attrs["normalize"])):
            continue  # not lightning attention: stays a fused node, nothing to report
        miss = f"{OP_TYPE} is lightning attention but stays fused (not ONNX LinearAttention): "
        decay, decay_name = None, node.input[3] if len(node.input) > 3 else ""
        if decay_name:
            decay = _constant_vector(model, decay_name)
            if decay is None:
                report.near_misses.append(NearMiss(FAMILY, node.name, miss + "its decay is not a constant"))
                continue
            if any(not 0.0 < d <= 1.0 for d in decay):
                report.near_misses.append(NearMiss(FAMILY, node.name, miss + f"its decay {decay} is not in (0, 1]"))
                continue
        scale = float(attrs["scale"])
        if scale == 0.0:  # LinearAttention reads scale=0 as 1/sqrt(d_k)
            report.near_misses.append(NearMiss(FAMILY, node.name, miss + "its scale is 0"))
            continue
        heads = len(decay) if decay is not None else None
        if heads is None:
            shapes = value_shapes(model) if shapes is None else shapes
            heads = _static_heads(shapes, [node.input[0], *node.input[4:5], *node.output[1:2]])
        if heads is None:
            report.near_misses.append(NearMiss(FAMILY, node.name, miss + "its number of heads (Q's axis 1) is "
                                               "not static; LinearAttention needs it as an attribute"))
            continue
        match_attrs = {"feature_map": "identity", "causal": 1, "normalize": 0, "eps": float(attrs["eps"]),
                       "scale": scale, "form": "fused"}
        if decay is not None:
            match_attrs["decay"] = decay
        inputs = {"Q": node.input[0], "K": node.input[1], "V": node.input[2]}
        if len(node.input) > 4 and node.input[4]:
            inputs["state"] = node.input[4]
        match = Match(FAMILY, "LinearAttention", [node.name], inputs, [o for o in node.output if o], match_attrs)
        found.append(_FusedLightning(node, heads, decay, scale, match))
    return found


def _static_heads(shapes: dict, tensors: list[str]) -> int | None:
    """Axis 1 (heads) of the first ``[B, H, ., .]`` tensor whose axis 1 is a number."""
    for t in tensors:
        shape = shapes.get(t) or []
        if len(shape) == 4 and isinstance(shape[1], int) and shape[1] > 0:
            return shape[1]
    return None


def _drop_zero_state_terms(model) -> int:
    """Drop the ``Add`` of ``x · Z`` to a fused node's output where ``Z`` is a constant of zeros: lightning
    attention's first (or only) block adds ``(q ⊙ decay) · S₀`` for the initial state, which a static export
    folds to zeros when it is ``torch.zeros`` (MiniMax at fewer tokens than a block). That term is zero for
    finite ``x``, and the Add only kept the fused node from being the layer's core (head pruning reads the
    layer from it). Only where the Add's output has the fused output's inferred shape (no broadcast).
    Returns how many were dropped."""
    prod = producers(model)
    outputs = {n.output[0] for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE}
    found = []   # (Add, the fused output it reads)
    for node in model.graph.node:
        if node.op_type != "Add" or len(set(node.input) & outputs) != 1 or node.input[0] == node.input[1]:
            continue
        fused = next(i for i in node.input if i in outputs)
        term = prod.get(next(i for i in node.input if i != fused))
        zeros = constant_value(model, term.input[1]) if term is not None and term.op_type == "MatMul" else None
        if zeros is not None and not np.any(zeros != 0):
            found.append((node, fused))
    if not found:
        return 0
    cons, shapes = consumers(model), value_shapes(model)   # shape inference only where there is such a term
    graph_outputs = {o.name for o in model.graph.output}
    dropped = 0
    for node, fused in found:
        shape = shapes.get(fused)
        if not shape or shapes.get(node.output[0]) != shape or not all(isinstance(d, int) for d in shape):
            continue
        if node.output[0] in graph_outputs:
            node.op_type = "Identity"
            del node.input[:]
            node.input.append(fused)
        else:   # its readers read the fused output (the Add is dead code then)
            for user in cons.get(node.output[0], []):
                user.input[:] = [fused if i == node.output[0] else i for i in user.input]
        dropped += 1
    return dropped


def _fold_constant_decays(model) -> int:
    """Give every ``KernelLinearAttention`` whose ``decay`` is computed from constants (an
    export's ``Exp(-slope)``) a float32 initializer of its values instead, as the op's contract
    has it: an fp16 engine then keeps λ in float32 (λ near 1 loses ~2e-4 per token in fp16).
    Returns how many inputs were replaced; the computation left unused is dead code."""
    initializers = {i.name for i in model.graph.initializer}
    nodes = [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE and len(n.input) > 3
             and n.input[3] and n.input[3] not in initializers]
    values = _constant_arrays(model, [n.input[3] for n in nodes])   # one evaluation for every layer
    folded = 0
    for node in nodes:
        value = values[node.input[3]]
        if isinstance(value, str):
            continue
        name = f"{node.name or node.output[0]}/decay_float32"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).ravel(), name))
        node.input[3] = name
        folded += 1
    return folded


_READS_INPUTS = "reads input values"


def _constant_arrays(model, names: list[str]) -> dict[str, np.ndarray | str]:
    """For each of ``names``: its value when it reads no input values and is the same at every
    input size (constants, or evaluated at two sizes, all names in one evaluation), else why not:
    ``"reads input values"``, ``"could not be evaluated: ..."`` or ``"changes with the input sizes"``."""
    found: dict[str, np.ndarray | str] = {}
    pending = []
    for name in dict.fromkeys(names):
        value = constant_value(model, name)
        if value is not None:
            found[name] = value
        elif depends_on_data(model, name):
            found[name] = _READS_INPUTS
        else:
            pending.append(name)
    if not pending:
        return found
    try:
        runs = evaluate_tensors(model, pending)
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot prove"
        if len(pending) > 1:   # one name's failure must not cost the others theirs
            return {**found, **{name: _constant_arrays(model, [name])[name] for name in pending}}
        return {**found, pending[0]: f"could not be evaluated: {str(exc).splitlines()[0][:200]}"}
    for name in pending:
        values = [np.asarray(run[name]) for run in runs]
        same = all(v.shape == values[0].shape and np.array_equal(v, values[0]) for v in values)
        found[name] = values[0] if same else "changes with the input sizes"
    return found


def _constant_vector(model, name: str) -> list[float] | None:
    """The values of ``name`` when it reads no input values (the same at every input shape)."""
    value = _constant_arrays(model, [name])[name]
    return None if isinstance(value, str) else [float(v) for v in np.asarray(value, np.float64).ravel()]


def _lower_fused_node(model, lightning: _FusedLightning) -> None:
    node = lightning.node
    inputs, outputs = list(node.input) + [""] * 5, list(node.output) + [""]
    prefix = node.name + "/onnx_linear_attention"
    model.graph.node.remove(node)
    _emit_onnx_linear_attention(model, prefix, inputs[0], inputs[1], inputs[2], outputs[0], lightning.heads,
                                lightning.decay, lightning.scale, state=inputs[4], state_out=outputs[1])


def _drop_unused_functions(model) -> None:
    """Remove ``KernelLinearAttention`` function bodies no node calls any more."""
    used = {(n.domain, n.op_type, n.overload) for n in model.graph.node}
    keep = [f for f in model.functions
            if (f.domain, f.name) != (DOMAIN, OP_TYPE) or (f.domain, f.name, f.overload) in used]
    del model.functions[:]
    model.functions.extend(keep)


def _to_match(cand: _Candidate, op_type: str) -> Match:
    inputs = {"Q": cand.q, "K": cand.k, "V": cand.v, **({"state": cand.state} if cand.state else {})}
    attrs = {"feature_map": cand.feature_map, "causal": int(cand.causal), "normalize": int(cand.normalize),
             "eps": cand.eps, "scale": cand.scale, "form": cand.form}
    if cand.decay is not None:
        attrs["decay"] = cand.decay
    return Match(FAMILY, op_type, cand.nodes, inputs, [cand.out] + ([cand.state_out] if cand.state_out else []),
                 attrs)
