"""Plain multi-head softmax attention -> ONNX ``Attention`` (opset 23).

Matches, anchored at each ``Softmax`` over the last axis (or its spelled-out form
``Exp(x [- ReduceMax x]) / ReduceSum(Exp(...))``) whose probabilities feed
``MatMul(P, V)``::

    scores = MatMul(Q [·s_q], Kᵀ [·s_k])  [·s | /s]  [+ mask | Where(c, -inf, ·)]*
    out    = MatMul(Softmax(scores), V)

- the scale may sit on Q, on Kᵀ, on the scores, or several of those (all constant
  scalars; their product becomes ``scale``);
- ``Kᵀ`` is any ``Transpose`` that swaps the last two axes of K (a permute straight from
  ``[B, N, H, D]`` to ``[B, H, D, N]`` included: a new Transpose with the composed perm
  feeds ``Attention``);
- Q/K/V of rank 4 ``[B, H, S, D]`` or rank 3 ``[B·H, S, D]`` (emitted with
  ``q_num_heads = kv_num_heads = 1``);
- ``Cast``/``Identity`` between Softmax and the P·V MatMul (HF's
  ``softmax(dim=-1, dtype=float32).to(query.dtype)``) and on the scores, and the dynamo
  exporter's NaN guard from its ``scaled_dot_product_attention`` decomposition,
  ``Where(IsNaN(P), 0, P)`` (``passes.core.nan_guard``: ONNX ``Attention`` gives a fully
  masked row zeros as well);
- masks: an additive float mask, or ``Where(cond, -inf, scores)`` /
  ``Where(cond, scores, -inf)``; a mask that does not read input values is evaluated
  (as a constant, or at two sequence lengths under dynamic axes) and, when it is the
  causal lower triangle (0 / ≤ -1e30 or bool), dropped for ``is_causal=1`` (one
  evaluation per mask tensor: all layers of an LM share it); any other
  mask is passed to ``Attention`` as ``attn_mask`` (bool ``True`` = attend), so its
  semantics are kept exactly.

Emits one ``Attention`` node (default domain) per match; the model's default opset is
raised to 23 first (``passes.core.convert_opset``: the version converter, keeping the
functions earlier passes added), only when something matches.
Near-misses: a Softmax->MatMul whose scores do not come from ``MatMul(Q, Kᵀ)``, a
non-constant scale, a ``Where`` fill that is not -inf, more than one mask, unknown rank.
This pass uses no other family's pass; it runs last so that agent attention's softmax
stages are consumed by the agent pass first.

Tests: ``tests/passes/test_softmax.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from attnc.passes.core import (Match, NearMiss, PassReport, consumers, constant_value, convert_opset,
                               default_opset, depends_on_data, evaluate_tensors, named_copy,
                               node_attribute, past_probability_casts, producers, remove_dead_nodes,
                               same_dim, scalar_constant, toposort, value_shapes)

FAMILY = "softmax"
OP_TYPE = "Attention"
ATTENTION_OPSET = 23
NEG_INF_BOUND = -1e30  # fills at or below this act as -inf (finfo(float32).min ≈ -3.4e38)


class _Miss(Exception):
    """Raised inside matching with the near-miss reason."""


@dataclass
class _Candidate:
    anchor: str                      # the Softmax (or the Div of the spelled-out form)
    nodes: list[str]
    q: str
    k_src: str                       # tensor K is derived from
    k_perm: list[int] | None         # Transpose of k_src giving K [.., S, D]; None = as is
    v: str
    out: str
    rank: int
    scale: float
    mask: str | None = None          # additive float mask tensor
    keep: str | None = None          # bool tensor, True = attend
    keep_inverted: bool = False      # keep is a "masked" bool (True = drop)
    is_causal: bool = False
    expand_mask: bool = False        # the mask broadcasts over the query or key axis: spell it out


def find(model: onnx.ModelProto) -> PassReport:
    """Report every softmax-attention subgraph (and near-miss); ``model`` is not changed."""
    model = named_copy(model)
    report = PassReport(FAMILY)
    for cand in _candidates(model, report):
        report.matches.append(_to_match(cand))
    return report


def apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Replace each softmax attention by one ONNX ``Attention`` node (opset >= 23)."""
    original, model = model, named_copy(model)
    probe, causal_cache = PassReport(FAMILY), {}
    if not _candidates(model, probe, causal_cache):
        return original, probe
    if default_opset(model) < ATTENTION_OPSET:
        model = convert_opset(model, ATTENTION_OPSET)
        model = named_copy(model)
    report = PassReport(FAMILY)
    cands = _candidates(model, report, causal_cache)  # tensor names survive the conversion
    for cand in cands:
        _rewrite(model, cand)
        report.matches.append(_to_match(cand))
    report.rewritten = len(cands)
    toposort(model)
    remove_dead_nodes(model)
    return model, report


# ----------------------------------------------------------------------------- matching

def _candidates(model: onnx.ModelProto, report: PassReport, causal_cache: dict | None = None
                ) -> list[_Candidate]:
    prod, cons = producers(model), consumers(model)
    shapes = value_shapes(model)
    found = []
    causal_cache = {} if causal_cache is None else causal_cache
    for node in model.graph.node:
        probs = _softmax_output(model, node, prod, shapes)
        if probs is None:
            continue
        probs, passed = past_probability_casts(model, probs, cons)
        users = cons.get(probs, [])
        mm = [u for u in users if u.op_type == "MatMul" and u.input[0] == probs]
        if len(mm) != 1 or len(users) != 1:
            continue  # a softmax that does not feed exactly one P·V is not attention
        try:
            cand = _match(model, node, mm[0], prod, cons, shapes)
        except _Miss as miss:
            report.near_misses.append(NearMiss(FAMILY, node.name, str(miss)))
            continue
        if cand is not None:
            cand.nodes.extend(passed)
            _detect_causal(model, cand, causal_cache)
            found.append(cand)
    return found


def _softmax_output(model, node, prod, shapes) -> str | None:
    """The probabilities tensor if ``node`` ends a last-axis softmax, else None."""
    if node.op_type == "Softmax":
        axis = node_attribute(node, "axis", -1)
        rank = len(shapes.get(node.input[0]) or []) or None
        if axis == -1 or (rank is not None and axis == rank - 1):
            return node.output[0]
        return None
    if node.op_type == "Div":  # Exp(x) / ReduceSum(Exp(x), -1, keepdims)
        num, den = prod.get(node.input[0]), prod.get(node.input[1])
        if num is not None and den is not None and num.op_type == "Exp" and den.op_type == "ReduceSum" \
                and den.input[0] == num.output[0] and node_attribute(den, "keepdims", 1) \
                and _reduce_axes(model, den) in ([-1],) + _last(shapes, num.output[0]):
            return node.output[0]
    return None


def _last(shapes, name):
    rank = len(shapes.get(name) or [])
    return ([rank - 1],) if rank else ()


def _softmax_input(model, node, prod) -> tuple[str, list[str]]:
    if node.op_type == "Softmax":
        return node.input[0], [node.name]
    exp = prod[node.input[0]]
    den = prod[node.input[1]]
    x, names = exp.input[0], [node.name, exp.name, den.name]
    sub = prod.get(x)  # the max-subtraction does not change softmax
    if sub is not None and sub.op_type == "Sub":
        mx = prod.get(sub.input[1])
        if mx is not None and mx.op_type == "ReduceMax" and mx.input[0] == sub.input[0]:
            return sub.input[0], names + [sub.name, mx.name]
    return x, names


def _match(model, softmax, pv, prod, cons, shapes) -> _Candidate | None:
    x, nodes = _softmax_input(model, softmax, prod)
    scale, mask, keep, keep_inverted = 1.0, None, None, False
    while True:
        node = prod.get(x)
        if node is None:
            raise _Miss("softmax input is not computed from MatMul(Q, Kᵀ)")
        if any(c.name not in nodes for c in cons.get(x, [])):
            raise _Miss(f"intermediate scores {x!r} are used outside the attention")
        op = node.op_type
        if op == "MatMul":
            nodes.append(node.name)
            break
        if op in ("Mul", "Div"):
            c = [scalar_constant(model, i) for i in node.input]
            if op == "Mul" and (c[0] is not None or c[1] is not None):
                scale *= c[1] if c[1] is not None else c[0]
                x = node.input[0] if c[1] is not None else node.input[1]
            elif op == "Div" and c[1] is not None:
                scale /= c[1]
                x = node.input[0]
            else:
                raise _Miss(f"{op} {node.name} on the scores is not by a constant scalar")
            nodes.append(node.name)
            continue
        if op == "Add":
            side = _scores_side(node, prod)
            if side is None:
                raise _Miss(f"Add {node.name}: cannot tell the scores from the mask")
            if mask is not None or keep is not None:
                raise _Miss("more than one mask on the scores")
            mask, x = node.input[1 - side], node.input[side]
            nodes.append(node.name)
            continue
        if op == "Where":
            fills = [scalar_constant(model, node.input[1]), scalar_constant(model, node.input[2])]
            if mask is not None or keep is not None:
                raise _Miss("more than one mask on the scores")
            if fills[0] is not None and fills[0] <= NEG_INF_BOUND:
                keep, keep_inverted, x = node.input[0], True, node.input[2]
            elif fills[1] is not None and fills[1] <= NEG_INF_BOUND:
                keep, x = node.input[0], node.input[1]
            else:
                fill = fills[0] if fills[0] is not None else fills[1]
                raise _Miss(f"Where {node.name} on the scores fills with {fill}, not -inf: "
                            "fully masked rows would differ")
            nodes.append(node.name)
            continue
        if op == "Cast" or op == "Identity":
            nodes.append(node.name)
            x = node.input[0]
            continue
        raise _Miss(f"{op} {node.name} between Q·Kᵀ and Softmax is not a scale or a mask")
    qk = prod[x]
    q, scale_q = _peel_scale(model, qk.input[0], prod, cons, nodes)
    kt, scale_k = _peel_scale(model, qk.input[1], prod, cons, nodes)
    scale *= scale_q * scale_k
    rank = len(shapes.get(q) or []) or len(shapes.get(kt) or []) or None
    tnode = prod.get(kt)
    if rank is None and tnode is not None and tnode.op_type == "Transpose":
        rank = len(node_attribute(tnode, "perm", []))
    if rank not in (3, 4):
        raise _Miss(f"Q·Kᵀ of rank {rank}; ONNX Attention takes rank 3 or 4")
    swap = list(range(rank - 2)) + [rank - 1, rank - 2]
    if tnode is not None and tnode.op_type == "Transpose" and len(cons.get(kt, [])) == 1:
        perm = node_attribute(tnode, "perm", None) or list(range(rank))[::-1]
        k_perm = [perm[i] for i in swap]
        k_src = tnode.input[0]
        nodes.append(tnode.name)
    else:
        k_src, k_perm = kt, swap
    if k_perm == list(range(rank)):
        k_perm = None
    cand = _Candidate(softmax.name, nodes, q, k_src, k_perm, pv.input[1], pv.output[0], rank, scale,
                      mask, keep, keep_inverted)
    if mask is not None or keep is not None:
        cand.expand_mask = not _covers_scores(shapes.get(mask or keep), shapes.get(qk.output[0]))
    cand.nodes.append(pv.name)
    return cand


def _covers_scores(mask_shape, scores_shape) -> bool:
    """Whether the mask's last two dims are known to be the scores' ``[S_q, S_kv]``.

    ONNX Runtime's ``Attention`` takes a mask only with those two dims in full: a key-padding
    mask ``[B, 1, 1, S_kv]`` (BERT, ``F.scaled_dot_product_attention`` with a padding mask) is
    expanded over the queries first.
    """
    if not mask_shape or not scores_shape or len(mask_shape) < 2:
        return False
    return all(same_dim(a, b) for a, b in zip(mask_shape[-2:], scores_shape[-2:]))


def _scores_side(node, prod) -> int | None:
    """Which input of an Add carries the scores: the one that leads back to a MatMul."""
    hits = []
    for side in (0, 1):
        t, steps = node.input[side], 0
        while steps < 8:
            p = prod.get(t)
            if p is None:
                break
            if p.op_type == "MatMul":
                hits.append(side)
                break
            if p.op_type not in ("Mul", "Div", "Add", "Where", "Cast", "Identity"):
                break
            t = p.input[2] if p.op_type == "Where" else p.input[0]
            steps += 1
    return hits[0] if len(hits) == 1 else None


def _peel_scale(model, t, prod, cons, nodes) -> tuple[str, float]:
    scale = 1.0
    while True:
        node = prod.get(t)
        if node is None or node.op_type not in ("Mul", "Div") or len(cons.get(t, [])) != 1:
            return t, scale
        c = [scalar_constant(model, i) for i in node.input]
        if node.op_type == "Mul" and c[1] is not None:
            scale *= c[1]
            t = node.input[0]
        elif node.op_type == "Mul" and c[0] is not None:
            scale *= c[0]
            t = node.input[1]
        elif node.op_type == "Div" and c[1] is not None:
            scale /= c[1]
            t = node.input[0]
        else:
            return t, scale
        nodes.append(node.name)


def _detect_causal(model, cand: _Candidate, cache: dict) -> None:
    """Turn a provably causal mask into ``is_causal=1`` (ONNX Attention aligns it top-left for S_q == S_kv).

    The mask alone is evaluated (cached per tensor: every layer of an LM shares one); a
    causal mask is a full ``[.., S, S]`` lower triangle, identical over leading axes.
    """
    mask = cand.mask or cand.keep
    if mask is None:
        return
    key = (mask, cand.keep is not None, cand.keep_inverted)
    if key not in cache:
        cache[key] = _is_causal_mask(model, mask, cand.keep is not None, cand.keep_inverted)
    if cache[key]:
        cand.is_causal, cand.mask, cand.keep = True, None, None


def _is_causal_mask(model, mask: str, is_bool: bool, inverted: bool) -> bool:
    if depends_on_data(model, mask):
        return False
    try:
        runs = evaluate_tensors(model, [mask])
    except Exception:  # noqa: BLE001 - evaluation is best effort: an unprovable mask stays an attn_mask
        return False
    for run in runs:
        m = np.asarray(run[mask])
        if m.ndim < 2 or m.shape[-1] != m.shape[-2] or m.shape[-1] < 2:
            return False
        tril = np.tril(np.ones(m.shape[-2:], dtype=bool))
        if is_bool:
            ok = np.all((m.astype(bool) ^ inverted) == tril)
        else:
            ok = np.all(m[..., tril] == 0) and np.all(m[..., ~tril] <= NEG_INF_BOUND)
        if not ok:
            return False
    return True


def _reduce_axes(model, node) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        v = constant_value(model, node.input[1])
        return None if v is None else [int(a) for a in np.atleast_1d(v)]
    axes = node_attribute(node, "axes", None)
    return list(axes) if axes is not None else None


# ----------------------------------------------------------------------------- rewriting

def _rewrite(model: onnx.ModelProto, cand: _Candidate) -> None:
    g = model.graph
    prefix = cand.anchor + "/attnc_attention"
    new = []
    k = cand.k_src
    if cand.k_perm is not None:
        k = prefix + "/K"
        new.append(helper.make_node("Transpose", [cand.k_src], [k], name=prefix + "/k_transpose", perm=cand.k_perm))
    inputs = [cand.q, k, cand.v]
    mask = cand.mask
    if cand.keep is not None:
        mask = cand.keep
        if cand.keep_inverted:
            mask = prefix + "/keep"
            new.append(helper.make_node("Not", [cand.keep], [mask], name=prefix + "/not"))
    if mask is not None and cand.expand_mask:
        # [*mask lead, S_q, S_kv]: the mask's leading dims, Q's and K's sequence lengths
        parts = []
        for part, source, start, end in (("lead", mask, 0, -2), ("rows", cand.q, -2, -1), ("cols", k, -2, -1)):
            parts.append(f"{prefix}/{part}")
            new.append(helper.make_node("Shape", [source], [parts[-1]], name=parts[-1], start=start, end=end))
        new.append(helper.make_node("Concat", parts, [prefix + "/mask_shape"], name=prefix + "/mask_shape", axis=0))
        new.append(helper.make_node("Expand", [mask, prefix + "/mask_shape"], [prefix + "/mask"],
                                    name=prefix + "/mask_expand"))
        mask = prefix + "/mask"
    if mask is not None:
        inputs.append(mask)
    attrs = {"scale": float(cand.scale), "is_causal": int(cand.is_causal)}
    if cand.rank == 3:
        attrs.update(q_num_heads=1, kv_num_heads=1)
    new.append(helper.make_node(OP_TYPE, inputs, [cand.out], name=prefix, **attrs))
    # the old P·V MatMul wrote cand.out: drop it so the tensor has one producer
    old = [n for n in g.node if cand.out in n.output]
    for n in old:
        g.node.remove(n)
    g.node.extend(new)


def _to_match(cand: _Candidate) -> Match:
    inputs = {"Q": cand.q, "K": cand.k_src, "V": cand.v}
    if cand.mask or cand.keep:
        inputs["attn_mask"] = cand.mask or cand.keep
    return Match(FAMILY, OP_TYPE, cand.nodes, inputs, [cand.out],
                 {"scale": cand.scale, "is_causal": int(cand.is_causal)})
