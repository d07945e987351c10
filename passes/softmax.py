"""Plain multi-head softmax attention -> ONNX ``Attention`` (opset 23).

Matches, anchored at each ``Softmax`` over the last axis (or its spelled-out form
``Exp(x [- ReduceMax x]) / ReduceSum(Exp(...))``) whose probabilities feed
``MatMul(P, V)``::

    scores = MatMul(Q [·s_q], Kᵀ [·s_k])  ([·s | /s] | [+ mask | Where(c, -inf, ·)])*
    out    = MatMul(Softmax(scores), V)

- the scale may sit on Q, on Kᵀ, on the scores, or several of those (all constant
  scalars; their product becomes ``scale``); a scale applied after a mask scales that mask
  (``(QKᵀ + bias) / √d``: the bias goes in times ``1/√d``);
- any number of masks (ALiBi plus a causal fill, as BLOOM and MPT write them): one mask goes
  to ``Attention`` as it is, several are summed into one float ``attn_mask`` (each ``Where``
  keeping its own fill);
- soft-capped scores, ``cap · tanh(s / cap)`` before the masks (Gemma 2), become ``softcap``
  (not for TensorRT: ``apply(..., softcap=False)``, which ``attnc compile --backend tensorrt`` runs);
- attention on flattened heads (BLOOM's ``baddbmm`` on ``[B·H, S, D]``): a ``Reshape`` of the
  scores to ``[B, H, S_q, S_kv]`` before the softmax and of the probabilities back before
  ``bmm`` with V. That split is proven at sampled sizes (``evaluate_tensors``, once for all
  layers); Q, K, V go to ``Attention`` as the ``[B, H, S, D]`` tensors the export flattened
  (or split by the same ``[B, H]``), masks added before the split are split like the scores,
  and the output writes the export's view back to ``[B, H, S_q, D_v]`` where there is one;
- ``Kᵀ`` is any ``Transpose`` that swaps the last two axes of K (a permute straight from
  ``[B, N, H, D]`` to ``[B, H, D, N]`` included: a new Transpose with the composed perm
  feeds ``Attention``);
- attention sinks (gpt-oss): a learned logit per head joined to every row of the scores,
  ``softmax([scores, sink])[..., :-1]``, become one more key: K and V get a row of zeros (a zero key
  scores 0 at any scale) and the mask a column holding the sinks, spelled out to
  ``[B, H, S_q, S_kv + 1]`` (never ``is_causal``, whose key range would drop that column); the
  sink values are proven constant over batch and queries, per head;
- a max subtracted before the softmax (over its axis, or all axes) is dropped: it changes nothing;
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
  causal lower triangle (0 / ≤ -1e30 or bool) and the only mask, dropped for ``is_causal=1`` (one
  evaluation per mask tensor: all layers of an LM share it); any other
  mask is passed to ``Attention`` as ``attn_mask`` (bool ``True`` = attend), so its
  semantics are kept exactly.

Emits one ``Attention`` node (default domain) per match; the model's default opset is
raised to 23 first (``passes.core.convert_opset``: the version converter, keeping the
functions earlier passes added), only when something matches.
Near-misses: a Softmax->MatMul whose scores do not come from ``MatMul(Q, Kᵀ)``, a
non-constant scale, a ``Where`` fill that is not -inf, unknown rank, a rank 3 -> 4 Reshape of
the scores that is not a split of the batch into heads.
This pass uses no other family's pass; it runs last so that agent attention's softmax
stages are consumed by the agent pass first.

Tests: ``tests/passes/test_softmax.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.passes.core import (Match, NearMiss, PassReport, consumers, constant_value, convert_opset,
                               default_opset, depends_on_data, drops_last_key, evaluate_tensors, fixed_value,
                               named_copy, node_attribute, past_max_shift, past_probability_casts, producers,
                               remove_dead_nodes, same_dim, scalar_constant, sink_concat, toposort, value_shapes)

FAMILY = "softmax"
OP_TYPE = "Attention"
ATTENTION_OPSET = 23
NEG_INF_BOUND = -1e30  # fills at or below this act as -inf (finfo(float32).min ≈ -3.4e38)


class _Miss(Exception):
    """Raised inside matching with the near-miss reason."""


@dataclass
class _Term:
    """One mask on the scores: an additive tensor, or a ``Where`` that fills with -inf."""
    tensor: str
    keep: bool = False           # ``tensor`` is a bool condition, True = attend ...
    inverted: bool = False       # ... or True = drop
    fill: str | None = None      # a keep term's fill (≤ NEG_INF_BOUND)
    factor: float = 1.0          # the constant scale the scores get after this term (it scales the term too)
    flat: bool = False           # applied to the [B·H, S_q, S_kv] scores, before the heads split


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
    terms: list[_Term] = field(default_factory=list)
    is_causal: bool = False
    softcap: float = 0.0             # cap · tanh(scores / cap) before the masks (Gemma 2); 0 = none
    sink: np.ndarray | None = None   # attention sinks (gpt-oss): a logit per head, [1, H, 1, 1], joins each row
    expand_mask: bool = False        # the mask broadcasts over the query or key axis: spell it out
    # flattened heads (BLOOM: ``baddbmm`` on [B·H, S, D]): the scores' split to [B, H, S_q, S_kv]
    heads_shape: str | None = None   # that Reshape's shape input (its first two entries are B, H)
    allowzero: int = 0
    flat: tuple[str, str, str] | None = None   # (scores [B·H, ..], scores [B, H, ..], P [B·H, ..]) to prove
    # q/k/v: the [B, H, ..] tensor it flattens; "out": the Reshape of the output back to [B, H, S_q, D_v];
    # a flat mask term: "heads" (leads with B·H) or "broadcast" (1)
    split_sources: dict[str, str | int | None] = field(default_factory=dict)


def find(model: onnx.ModelProto) -> PassReport:
    """Report every softmax-attention subgraph (and near-miss); ``model`` is not changed."""
    model = named_copy(model)
    report = PassReport(FAMILY)
    for cand in _candidates(model, report):
        report.matches.append(_to_match(cand))
    return report


def apply(model: onnx.ModelProto, flattened_heads_only: bool = False,
          softcap: bool = True) -> tuple[onnx.ModelProto, PassReport]:
    """Replace each softmax attention by one ONNX ``Attention`` node (opset >= 23).

    ``flattened_heads_only``: only attention computed on ``[B·H, S, D]`` (BLOOM's): head pruning
    fuses those first, since their heads are separate tensors only in ``Attention``'s 4-D form.
    ``softcap=False``: soft-capped scores (Gemma 2) are near-misses (TensorRT's attention layer,
    which the parser maps ``Attention`` to, has no soft-capping).
    """
    if flattened_heads_only and not has_flattened_heads(model):
        return model, PassReport(FAMILY)
    original, model = model, named_copy(model)
    probe, cache = PassReport(FAMILY), {}
    if not _candidates(model, probe, cache, flattened_heads_only, softcap):
        return original, probe
    if default_opset(model) < ATTENTION_OPSET:
        model = convert_opset(model, ATTENTION_OPSET)
        model = named_copy(model)
    report = PassReport(FAMILY)
    cands = _candidates(model, report, cache, flattened_heads_only, softcap)  # names survive the conversion
    for cand in cands:
        _rewrite(model, cand)
        report.matches.append(_to_match(cand))
    report.rewritten = len(cands)
    toposort(model)
    remove_dead_nodes(model)
    return model, report


def _only_shape_readers_of_merge(model, probs: str, prod, cons) -> bool:
    """Whether ``probs`` is read by one Reshape plus ``Shape`` nodes that feed nothing but that Reshape's
    target (DeBERTa's ``probs.view(-1, probs.size(-2), probs.size(-1))`` under TorchScript): those
    readers die with the merge once the attention is fused."""
    users = cons.get(probs, [])
    merges = [u for u in users if u.op_type == "Reshape" and u.input[0] == probs]
    return len(merges) == 1 and _read_for_target(model, [u for u in users if u is not merges[0]], merges[0],
                                                 prod, cons)


def _read_for_target(model, readers, reshape, prod, cons) -> bool:
    """Whether ``readers`` are ``Shape`` nodes whose outputs feed nothing but ``reshape``'s target."""
    if any(r.op_type != "Shape" for r in readers):
        return False
    target, stack = set(), [reshape.input[1]]
    while stack:   # the nodes computing the target
        node = prod.get(stack.pop())
        if node is not None and node.name not in target:
            target.add(node.name)
            stack.extend(i for i in node.input if i)
    stack = list(readers)
    while stack:   # everything the readers feed must be part of it
        node = stack.pop()
        if node.name not in target:
            return False
        stack.extend(c for o in node.output for c in cons.get(o, []) if c is not reshape)
    return True


def has_flattened_heads(model: onnx.ModelProto) -> bool:
    """Whether some ``Softmax``'s scores are reshaped on their way from a MatMul (the sign of attention
    on flattened heads; cheap, unproven: :func:`apply` proves each match)."""
    prod = producers(model)
    for node in model.graph.node:
        x = node.input[0] if node.op_type == "Softmax" else None
        for _ in range(8):
            step = prod.get(x) if x else None
            if step is None or step.op_type == "MatMul":
                break
            if step.op_type == "Reshape":
                return True
            if step.op_type == "Add":
                side = _scores_side(step, prod)
                x = step.input[side] if side is not None else None
            elif step.op_type == "Where":
                x = step.input[2] if step.input[2] in prod else step.input[1]
            elif step.op_type in ("Mul", "Div"):
                x = next((i for i in step.input if scalar_constant(model, i) is None), None)
            elif step.op_type in ("Cast", "Identity"):
                x = step.input[0]
            else:
                break
    return False


# ----------------------------------------------------------------------------- matching

def _candidates(model: onnx.ModelProto, report: PassReport, cache: dict | None = None,
                flattened_heads_only: bool = False, softcap: bool = True) -> list[_Candidate]:
    """Every match, after its proofs; ``cache`` keeps the evaluations between the calls of one apply."""
    prod, cons = producers(model), consumers(model)
    shapes = value_shapes(model)
    found = []
    cache = {} if cache is None else cache
    for node in model.graph.node:
        probs = _softmax_output(model, node, prod, shapes)
        if probs is None:
            continue
        probs, passed = past_probability_casts(model, probs, cons)
        merge, sink_drop = None, None
        users = cons.get(probs, [])
        if len(users) == 1 and drops_last_key(model, users[0], len(shapes.get(probs) or []) or None):
            sink_drop = users[0]   # softmax over [scores, sink], the sink's column dropped (gpt-oss)
            probs, more = past_probability_casts(model, sink_drop.output[0], cons)
            passed += [sink_drop.name] + more
            users = cons.get(probs, [])
        if len(users) > 1 and _only_shape_readers_of_merge(model, probs, prod, cons):
            users = [u for u in users if u.op_type != "Shape"]   # TorchScript reads P's shape for the merge
        if len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == probs:
            merge = users[0]  # P [B, H, S_q, S_kv] -> [B·H, S_q, S_kv] (BLOOM)
            probs, more = past_probability_casts(model, merge.output[0], cons)
            passed += [merge.name] + more
            users = cons.get(probs, [])
        mm = [u for u in users if u.op_type == "MatMul" and u.input[0] == probs]
        if len(mm) != 1 or len(users) != 1:
            continue  # a softmax that does not feed exactly one P·V is not attention
        try:
            cand = _match(model, node, mm[0], merge, prod, cons, shapes, softcap, cache, sink_drop is not None)
        except _Miss as miss:
            report.near_misses.append(NearMiss(FAMILY, node.name, str(miss)))
            continue
        cand.nodes.extend(passed)
        if cand.flat is not None or not flattened_heads_only:
            found.append(cand)
    found = _prove_heads_splits(model, found, report, cache)
    for cand in found:
        if cand.sink is None:   # (a causal key range would drop the sink's key, which comes last)
            _detect_causal(model, cand, cache)
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


def _softmax_input(model, node, prod, shapes) -> tuple[str, list[str]]:
    if node.op_type == "Softmax":
        x, names = node.input[0], [node.name]
    else:
        exp, den = prod[node.input[0]], prod[node.input[1]]
        x, names = exp.input[0], [node.name, exp.name, den.name]
    x, shift = past_max_shift(model, x, prod, len(shapes.get(x) or []) or None)
    return x, names + shift


def _match(model, softmax, pv, merge, prod, cons, shapes, allow_softcap: bool = True,
           cache: dict | None = None, sink: bool = False) -> _Candidate:
    x, nodes = _softmax_input(model, softmax, prod, shapes)
    scale, terms, split, softcap = 1.0, [], None, 0.0
    if sink:
        sink, x = _sink(model, x, prod, shapes, nodes)
    else:
        sink = None
    while True:
        node = prod.get(x)
        if node is None:
            raise _Miss("softmax input is not computed from MatMul(Q, Kᵀ)")
        outside = [c for c in cons.get(x, []) if c.name not in nodes]
        if outside and not (split is not None and _read_for_target(model, outside, split, prod, cons)):
            raise _Miss(f"intermediate scores {x!r} are used outside the attention")
        op = node.op_type
        if op == "MatMul":
            nodes.append(node.name)
            break
        if op == "Mul" and (cap := _softcap(model, node, prod, cons)) is not None:
            if scale != 1.0 or softcap:
                raise _Miss(f"Mul {node.name}: the soft-capped scores are scaled again (or capped twice)")
            if not allow_softcap:
                raise _Miss(f"Mul {node.name}: soft-capped scores (cap · tanh(s / cap)); TensorRT's attention "
                            "layer has no soft-capping, so they stay as they are for this backend")
            softcap, x, capping = cap
            nodes.extend(n.name for n in capping)
            continue
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
            if softcap:
                raise _Miss(f"Add {node.name}: a mask inside the soft-capping (ONNX Attention adds it after)")
            # a scale met before this term (applied after it) scales the term too
            terms.append(_Term(node.input[1 - side], factor=scale, flat=split is not None))
            x = node.input[side]
            nodes.append(node.name)
            continue
        if op == "Where":
            fills = [scalar_constant(model, node.input[1]), scalar_constant(model, node.input[2])]
            if fills[0] is not None and fills[0] <= NEG_INF_BOUND:
                term = _Term(node.input[0], keep=True, inverted=True, fill=node.input[1])
                x = node.input[2]
            elif fills[1] is not None and fills[1] <= NEG_INF_BOUND:
                term = _Term(node.input[0], keep=True, fill=node.input[2])
                x = node.input[1]
            else:
                fill = fills[0] if fills[0] is not None else fills[1]
                raise _Miss(f"Where {node.name} on the scores fills with {fill}, not -inf: "
                            "fully masked rows would differ")
            if scale <= 0 or softcap:
                raise _Miss(f"Where {node.name}'s -inf fill is scaled by {scale} or soft-capped after it")
            term.flat = split is not None
            terms.append(term)
            nodes.append(node.name)
            continue
        if op == "Cast" or op == "Identity":
            nodes.append(node.name)
            x = node.input[0]
            continue
        if op == "Reshape" and split is None:
            ranks = (_rank(shapes, node.input[0]), _rank(shapes, node.output[0]) or _rank(shapes, node.input[1], 0))
            if ranks != (3, 4):
                raise _Miss(f"Reshape {node.name} takes the scores from rank {ranks[0]} to {ranks[1]}, "
                            "not [B·H, S_q, S_kv] to [B, H, S_q, S_kv]")
            split = node
            nodes.append(node.name)
            x = node.input[0]
            continue
        raise _Miss(f"{op} {node.name} between Q·Kᵀ and Softmax is not a scale, a mask or a heads split")
    if split is None and merge is not None:
        raise _Miss("the probabilities are reshaped before the product with V but the scores were not split "
                    "into heads")
    if split is not None and merge is None and _rank(shapes, pv.input[1]) != 4:
        raise _Miss("the scores are split into heads, but neither the probabilities are flattened again nor "
                    "is V [B, H, S, D]")
    qk = prod[x]
    q, scale_q = _peel_scale(model, qk.input[0], prod, cons, nodes, cache)
    kt, scale_k = _peel_scale(model, qk.input[1], prod, cons, nodes, cache)
    scale *= scale_q * scale_k
    rank = _rank(shapes, q) or _rank(shapes, kt)
    tnode = prod.get(kt)
    if rank is None and tnode is not None and tnode.op_type == "Transpose":
        rank = len(node_attribute(tnode, "perm", []))
    if rank not in (3, 4) or (split is not None and rank != 3):
        raise _Miss(f"Q·Kᵀ of rank {rank}; ONNX Attention takes rank 3 or 4"
                    + (" (3 before a heads split)" if split is not None else ""))
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
    if sink is not None and (rank != 4 or split is not None or softcap):
        raise _Miss("attention sinks on scores of rank 3, flattened heads or soft-capped scores")
    cand = _Candidate(softmax.name, nodes, q, k_src, k_perm, pv.input[1], pv.output[0], rank, scale, terms,
                      softcap=softcap, sink=sink)
    if split is not None:
        cand.rank, cand.heads_shape = 4, split.input[1]
        cand.allowzero = node_attribute(split, "allowzero", 0)
        # without the merge (a static export folded it away) P·V is 4-D already: V and the output are [B, H, ..]
        cand.flat = (split.input[0], split.output[0], merge.output[0] if merge is not None else None)
    if terms:
        cand.expand_mask = not any(_covers_scores(shapes.get(t.tensor), shapes.get(qk.output[0])) for t in terms)
    cand.nodes.append(pv.name)
    return cand


def _sink(model, x, prod, shapes, nodes) -> tuple[np.ndarray, str]:
    """``x = Concat([scores, sink], -1)``: the sink logits as ``[1, H, 1, 1]`` (or ``[1, 1, 1, 1]``) and the
    scores. The sink column must be a constant (or computed from shapes only) that varies with the heads
    axis alone: a per-head parameter expanded over batch and queries, or a static export's folded copy."""
    concat = sink_concat(x, prod, len(shapes.get(x) or []) or None)
    if concat is None:
        raise _Miss("the softmax's last key column is dropped, but its row is not [scores, sink]")
    sink = concat.input[1]
    expand = prod.get(sink)
    value = fixed_value(model, expand.input[0] if expand is not None and expand.op_type == "Expand" else sink)
    if value is None or value.ndim > 4 or value.shape[-1:] != (1,):
        raise _Miss(f"Concat {concat.name}: the column joined to the scores is not a constant sink per head "
                    f"({'computed from the inputs' if value is None else f'shape {list(value.shape)}'})")
    value = value.reshape((1,) * (4 - value.ndim) + value.shape)
    reduced = value[:1, :, :1, :]
    if not np.array_equal(np.broadcast_to(reduced, value.shape), value):
        raise _Miss(f"Concat {concat.name}: the sink column varies over the batch or the queries")
    nodes.append(concat.name)
    return reduced, concat.input[0]


def _softcap(model, mul, prod, cons) -> tuple[float, str, list] | None:
    """``(cap, x, [Mul, Tanh, Div])`` when ``mul`` is ``cap · Tanh(x / cap)`` (``x · (1/cap)`` too), each
    step read only by the next: Gemma 2's logit soft-capping, ONNX ``Attention``'s ``softcap``."""
    found = _softcap_nodes(mul, prod)
    if found is None or any(len(cons.get(n.output[0], [])) != 1 for n in found[1:]):
        return None
    _, tanh, div = found
    cap = next((c for i in mul.input if (c := scalar_constant(model, i)) is not None), None)
    consts = [scalar_constant(model, i) for i in div.input]
    if div.op_type == "Div" and consts[1] is not None:
        divisor, x = consts[1], div.input[0]
    elif div.op_type == "Mul" and any(c for c in consts):
        k = 1 if consts[1] else 0
        divisor, x = 1.0 / consts[k], div.input[1 - k]
    else:
        return None
    if cap is None or cap <= 0 or not np.isclose(divisor, cap, rtol=1e-6):
        return None
    return float(cap), x, found


def _softcap_nodes(mul, prod) -> list | None:
    """``[Mul, Tanh, Div-or-Mul]`` of a soft-capping ending at ``mul`` (unchecked), else None."""
    data = [prod.get(i) for i in mul.input]
    tanh = next((p for p in data if p is not None and p.op_type == "Tanh"), None)
    div = prod.get(tanh.input[0]) if tanh is not None else None
    if div is None or div.op_type not in ("Div", "Mul"):
        return None
    return [mul, tanh, div]


def _rank(shapes, name, entry=None) -> int | None:
    """The rank of ``name`` from inferred shapes (or, with ``entry``, that dim of a shape tensor's shape)."""
    shape = shapes.get(name)
    if entry is not None:
        return shape[entry] if shape and isinstance(shape[entry], int) and shape[entry] > 0 else None
    return len(shape) if shape else None


def _prove_heads_splits(model, cands: list[_Candidate], report: PassReport, cache: dict) -> list[_Candidate]:
    """Keep the flattened-heads candidates whose split is proven at sampled sizes.

    ``Reshape(scores [N, S_q, S_kv]) -> [B, H, S_q, S_kv]`` with ``N = B·H``, the probabilities
    reshaped back to ``[N, S_q, S_kv]``, and Q, K, V each with ``N`` leading (no batch broadcast in
    the MatMuls): then Q, K and V split by the same ``[B, H]`` give the same attention. Inferred
    shapes rarely prove it (``4*b`` against ``b, 4``), so it is evaluated, once for all layers.
    Where Q, K or V is a Reshape of a tensor that is already ``[B, H, ..]`` (the exporters' view
    before ``bmm``), ``Attention`` reads that tensor instead of splitting it again.
    """
    prod, cons = producers(model), consumers(model)

    def source(t):
        p = prod.get(t)
        return p.input[0] if p is not None and p.op_type == "Reshape" else None

    def transposed_source(t):
        """(the [B, H, ..] tensor, its flattened view, the rank-3 perm) of ``t = Transpose(Reshape(x))``."""
        p = prod.get(t)
        perm = list(node_attribute(p, "perm", [])) if p is not None and p.op_type == "Transpose" else []
        src = source(p.input[0]) if perm[:1] == [0] and len(perm) == 3 else None
        return (src, p.input[0], perm) if src is not None else None

    flat = [c for c in cands if c.flat is not None and ("heads", c.flat) not in cache]
    if flat:
        names = {n for c in flat for n in (*c.flat, c.q, c.k_src, c.v, c.heads_shape)} - {None}
        names |= {t.tensor for c in flat for t in c.terms if t.flat}
        names |= {source(t) for c in flat for t in (c.q, c.k_src, c.v)} - {None}
        names |= {n for c in flat if (via := transposed_source(c.k_src)) for n in via[:2]}
        names |= {c.out for c in flat} | {u.output[0] for c in flat for u in cons.get(c.out, [])
                                          if u.op_type == "Reshape"}
        try:
            runs = evaluate_tensors(model, sorted(names))
            error = None
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
            runs, error = [], str(exc).splitlines()[0][:160]
        for c in flat:
            failed = error or _heads_split_error(c, runs)
            sources = {}
            if c.flat[2] is None:
                sources["v"] = c.v   # P·V on [B, H, ..] already
            for role, t in (("q", c.q), ("k", c.k_src), ("v", c.v)):
                src = source(t) if role not in sources else None
                if not failed and src is not None and all(
                        run[src].shape == run[c.flat[1]].shape[:2] + run[t].shape[1:] for run in runs):
                    sources[role] = src
                elif role == "k" and (via := transposed_source(t)) is not None and not failed and all(
                        run[via[0]].shape == run[c.flat[1]].shape[:2] + run[via[1]].shape[1:] for run in runs):
                    sources["k"], sources["k_perm"] = via[0], via[2]   # Kᵀ of a flattened view (DeBERTa)
            users = cons.get(c.out, [])
            views = [u for u in users if u.op_type == "Reshape" and u.input[0] == c.out]
            counts = {run[c.flat[1]].shape[1] for run in runs}
            if not failed and c.flat[2] is not None and len(views) == 1 and all(u.op_type == "Shape" for u in users if u is not views[0]) \
                    and (len(users) == 1 or len(counts) == 1) \
                    and all(run[views[0].output[0]].shape == run[c.flat[1]].shape[:2] + run[c.out].shape[1:]
                            for run in runs):
                sources["out"] = views[0].name  # the export's view back to [B, H, S_q, D_v]: Attention writes it
                sources["heads"] = counts.pop() if len(counts) == 1 else None
            for term in c.terms:
                if term.flat and not failed:  # its [B·H | 1, .., S_kv] lead, kept per term
                    leads = {run[term.tensor].shape[0] == run[c.flat[0]].shape[0] for run in runs}
                    ones = {run[term.tensor].shape[0] == 1 for run in runs}
                    if leads == {True}:
                        sources[term.tensor] = "heads"
                    elif ones == {True}:
                        sources[term.tensor] = "broadcast"
                    else:
                        failed = f"the mask {term.tensor!r} on the flattened scores leads with neither B·H nor 1"
            if not failed and not c.allowzero and any(
                    0 in np.asarray(run[c.heads_shape]).reshape(-1)[:2] for run in runs):
                failed = "the split's B or H entry is 0 (copied from the input)"
            cache["heads", c.flat] = (failed, sources)
    kept = []
    for c in cands:
        error, c.split_sources = cache["heads", c.flat] if c.flat is not None else (None, {})
        if error:
            report.near_misses.append(NearMiss(FAMILY, c.anchor, f"the scores' heads split is not proven: {error}"))
        else:
            kept.append(c)
    return kept


def _heads_split_error(c: _Candidate, runs) -> str | None:
    scores, heads, probs = c.flat
    for run in runs:
        n, split = run[scores].shape, run[heads].shape
        k_batch = run[c.k_src].shape[c.k_perm[0] if c.k_perm else 0]
        if len(split) != 4 or split[0] * split[1] != n[0] or split[2:] != n[1:]:
            return f"{list(n)} -> {list(split)} is not [B·H, S_q, S_kv] -> [B, H, S_q, S_kv]"
        if probs is None:   # V [B, H, S_kv, D_v]
            if run[c.v].shape[:2] != split[:2]:
                return f"V is {list(run[c.v].shape)}, not [B, H, ..] with [B, H] = {list(split[:2])}"
        elif run[probs].shape != n:
            return f"the probabilities go back to {list(run[probs].shape)}, not {list(n)}"
        v_batch = n[0] if probs is None else run[c.v].shape[0]
        if (run[c.q].shape[0], k_batch, v_batch) != (n[0],) * 3:
            return f"Q, K, V lead with {run[c.q].shape[0]}, {k_batch}, {v_batch}, not B·H = {n[0]}"
    return None


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
            if p.op_type not in ("Mul", "Div", "Add", "Where", "Cast", "Identity", "Reshape", "Tanh"):
                break
            t = p.input[2] if p.op_type == "Where" else p.input[0]
            steps += 1
    return hits[0] if len(hits) == 1 else None


def _peel_scale(model, t, prod, cons, nodes, cache: dict | None = None) -> tuple[str, float]:
    scale = 1.0
    while True:
        node = prod.get(t)
        if node is None or node.op_type not in ("Mul", "Div") or len(cons.get(t, [])) != 1:
            return t, scale
        c = [_fixed_scalar(model, i, cache) for i in node.input]
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


def _fixed_scalar(model, name: str, cache: dict | None) -> float | None:
    """A constant scalar, or one computed from input shapes only that is the same at two sampled sizes
    (TorchScript's ``1 / sqrt(head_dim · factor)`` from ``size(-1)``: DeBERTa); evaluated once per tensor."""
    value = scalar_constant(model, name)
    if value is not None or cache is None or not name:
        return value
    key = ("scalar", name)
    if key not in cache:   # an unevaluated scale stays part of Q or K
        found = fixed_value(model, name)
        cache[key] = float(found.reshape(-1)[0]) if found is not None and found.size == 1 else None
    return cache[key]


def _detect_causal(model, cand: _Candidate, cache: dict) -> None:
    """Turn a provably causal mask into ``is_causal=1`` (ONNX Attention aligns it top-left for S_q == S_kv).

    Only a candidate's single mask: the mask alone is evaluated (cached per tensor: every
    layer of an LM shares one); a causal mask is a full ``[.., S, S]`` lower triangle,
    identical over leading axes.
    """
    if len(cand.terms) != 1 or cand.terms[0].flat or cand.terms[0].factor <= 0:
        return  # (a positive scale keeps a 0 / -inf mask what it is)
    term = cand.terms[0]
    key = (term.tensor, term.keep, term.inverted)
    if key not in cache:
        cache[key] = _is_causal_mask(model, term.tensor, term.keep, term.inverted)
    if cache[key]:
        cand.is_causal, cand.terms = True, []


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

    def add(op, inputs, name, **attrs) -> str:
        new.append(helper.make_node(op, inputs, [f"{prefix}/{name}"], name=f"{prefix}/{name}", **attrs))
        return new[-1].output[0]

    def const(name, value, dtype=np.int64) -> str:
        g.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), f"{prefix}/{name}"))
        return g.initializer[-1].name

    q, k, v = cand.q, cand.k_src, cand.v
    sources, k_perm = cand.split_sources, cand.k_perm
    heads = None
    if cand.heads_shape is not None:
        # [B·H, ..] -> [B, H, ..] by the scores' own split (its first two entries), or the [B, H, ..]
        # tensor the export flattened
        heads = add("Slice", [cand.heads_shape, const("zero", [0]), const("two", [2])], "heads")

        def split(t, tag):
            rest = add("Shape", [t], f"{tag}_rest", start=1)
            return add("Reshape", [t, add("Concat", [heads, rest], f"{tag}_shape", axis=0)], f"{tag}4",
                       allowzero=cand.allowzero)

        q = sources.get("q") or split(q, "q")
        v = sources.get("v") or split(v, "v")
        composed = None
        if "k" in sources:   # K = k_src through k_perm, k_src = the source's view through k_perm's own perm
            inner = sources.get("k_perm", [0, 1, 2])
            composed = [inner[i] for i in (k_perm or [0, 1, 2])]
        if composed is not None and composed[0] == 0:
            k, k_perm = sources["k"], None if composed == [0, 1, 2] else [0, 1] + [p + 1 for p in composed[1:]]
        else:
            if k_perm is not None:
                k, k_perm = add("Transpose", [k], "K3", perm=k_perm), None
            k = split(k, "k")
    if k_perm is not None:
        k = add("Transpose", [k], "K", perm=k_perm)

    def placed(term, tag):
        if not term.flat:
            return term.tensor
        if sources[term.tensor] == "broadcast":
            return add("Unsqueeze", [term.tensor, const(f"{tag}_axis", [0])], f"{tag}4")
        return split(term.tensor, tag)

    mask = _emit_mask(cand, add, const, placed)
    if mask is not None and cand.rank == 3:
        # 3-D Q/K/V are [N, S, one head's D]: ONNX Attention broadcasts the mask to [N, heads = 1, S_q, S_kv], so a
        # mask [N, S_q, S_kv] per batch entry (SAM's relative-position bias per window and head) gets its heads axis
        mask = add("Unsqueeze", [mask, const("mask_heads_axis", [-3])], "mask_heads")
    if cand.sink is not None:
        sink = const("sink", cand.sink, cand.sink.dtype)
        k, v, mask = _sink_key(sink, q, k, v, mask, add, const)
    elif mask is not None and cand.expand_mask:
        # [*mask lead, S_q, S_kv]: the mask's leading dims, Q's and K's sequence lengths
        parts = [add("Shape", [source], part, start=start, end=end)
                 for part, source, start, end in (("lead", mask, 0, -2), ("rows", q, -2, -1), ("cols", k, -2, -1))]
        mask = add("Expand", [mask, add("Concat", parts, "mask_shape", axis=0)], "mask")
    inputs = [q, k, v] + ([mask] if mask is not None else [])
    attrs = {"scale": float(cand.scale), "is_causal": int(cand.is_causal)}
    if cand.softcap:
        attrs["softcap"] = float(cand.softcap)
    if cand.rank == 3:
        attrs.update(q_num_heads=1, kv_num_heads=1)
    flat_out = heads is not None and cand.flat[2] is not None   # P·V was [B·H, S_q, D_v]
    out, replaced = cand.out, {cand.out}
    if "out" in sources:  # write the export's [B, H, S_q, D_v] view of the output directly
        view = next(n for n in g.node if n.name == sources["out"])
        out = view.output[0]
        replaced.add(out)
    elif flat_out:
        out = f"{prefix}/out4"
    new.append(helper.make_node(OP_TYPE, inputs, [out], name=prefix, **attrs))
    readers = [n for n in g.node if n.op_type == "Shape" and n.input[0] == cand.out]
    if "out" in sources and readers:
        # The flat output's other readers read its shape [B·H, S_q, D_v], to compute B as B·H // H (BLOOM's
        # _merge_heads). They get B·H with H the model's head count as a constant: the same value, and
        # still B after head pruning, which changes H but not these readers' constants.
        flat = add("Concat", [add("Mul", [add("Shape", [out], "out_b", end=1), const("h", [sources["heads"]])],
                                  "out_bh"), add("Shape", [out], "out_rest", start=2)], "out_flat_shape", axis=0)
        for i, reader in enumerate(readers):
            bounds = [const(f"shape{i}_start", [node_attribute(reader, "start", 0)]),
                      const(f"shape{i}_end", [node_attribute(reader, "end", np.iinfo(np.int64).max)])]
            g.node.remove(reader)
            new.append(helper.make_node("Slice", [flat, *bounds], list(reader.output), name=reader.name))
    elif flat_out:  # [B, H, S_q, D_v] -> [B·H, S_q, D_v], as P·V was
        shape = add("Concat", [const("minus_one", [-1]), add("Shape", [out], "out_rest", start=2)], "out_shape", axis=0)
        new.append(helper.make_node("Reshape", [out, shape], [cand.out], name=f"{prefix}/out"))
    # the old P·V MatMul (and the view) wrote these: drop them so each tensor has one producer
    old = [n for n in g.node if replaced & set(n.output)]
    for n in old:
        g.node.remove(n)
    g.node.extend(new)


def _sink_key(sink: str, q: str, k: str, v: str, mask: str | None, add, const) -> tuple[str, str, str]:
    """Attention sinks as one more key: K and V get a row of zeros, the mask a column holding each head's
    sink logit. A zero key scores 0 whatever the scale, so that column's score is exactly the sink, and
    its zero value adds nothing: ``softmax([scores, sink])[..., :-1] · V``, as exported. The mask (a
    float one: ``_emit_mask`` does not hand out a bool mask here) is spelled out to ``[B, H, S_q, S_kv]``."""
    one = const("one", [1])

    def zero_row(t, tag):
        shape = add("Concat", [add("Shape", [t], f"{tag}_lead", end=-2), one,
                               add("Shape", [t], f"{tag}_width", start=-1)], f"{tag}_zero_shape", axis=0)
        zeros = add("CastLike", [add("ConstantOfShape", [shape], f"{tag}_zeros_f32"), t], f"{tag}_zeros")
        return add("Concat", [t, zeros], f"{tag}_sink", axis=-2)

    rows = add("Shape", [q], "sink_rows", end=-1)   # [B, H, S_q]
    scores = add("Concat", [rows, add("Shape", [k], "sink_keys", start=-2, end=-1)], "scores_shape", axis=0)
    if mask is None:
        mask = add("CastLike", [add("ConstantOfShape", [scores], "mask_f32"), q], "mask_zeros")
    else:
        mask = add("Expand", [mask, scores], "mask_full")
    column = add("Expand", [add("CastLike", [sink, mask], "sink_cast"),
                            add("Concat", [rows, one], "sink_shape", axis=0)], "sink_column")
    return zero_row(k, "k"), zero_row(v, "v"), add("Concat", [mask, column], "mask_sink", axis=-1)


def _emit_mask(cand: _Candidate, add, const, placed) -> str | None:
    """One ``attn_mask`` for all of the candidate's terms (None without any).

    A single unscaled term goes in as it is (a bool keep term, negated if it marks the dropped
    positions). Several become one float mask: the additive terms (each times the scale the
    scores get after it) summed, then each keep term's ``Where`` with its own fill. ``placed``
    gives a term's tensor in ``[B, H, ..]`` layout (one added to flattened-heads scores is split).
    """
    terms = cand.terms
    if not terms:
        return None
    if len(terms) == 1 and (terms[0].keep or terms[0].factor == 1.0) and not (cand.sink is not None and terms[0].keep):
        term = terms[0]
        value = placed(term, "term0")
        return add("Not", [value], "keep") if term.inverted else value
    mask = None
    for i, term in enumerate(t for t in terms if not t.keep):
        value = placed(term, f"term{i}")
        if term.factor != 1.0:
            factor = add("CastLike", [const(f"factor{i}", term.factor, np.float32), value], f"factor{i}_cast")
            value = add("Mul", [value, factor], f"term{i}_scaled")
        mask = value if mask is None else add("Add", [mask, value], f"sum{i}")
    for i, term in enumerate(t for t in terms if t.keep):
        cond = placed(term, f"keep{i}")
        if mask is None:
            mask = add("CastLike", [const(f"zero{i}", 0.0, np.float32), term.fill], f"zero{i}_cast")
        branches = [term.fill, mask] if term.inverted else [mask, term.fill]
        mask = add("Where", [cond, *branches], f"keep{i}_where")
    return mask


def _to_match(cand: _Candidate) -> Match:
    inputs = {"Q": cand.q, "K": cand.k_src, "V": cand.v}
    for i, term in enumerate(cand.terms):
        inputs["attn_mask" if i == 0 else f"attn_mask{i}"] = term.tensor
    attributes = {"scale": cand.scale, "is_causal": int(cand.is_causal)}
    if cand.softcap:
        attributes["softcap"] = cand.softcap
    if cand.sink is not None:
        attributes["sinks"] = cand.sink.flatten().tolist()
    return Match(FAMILY, OP_TYPE, cand.nodes, inputs, [cand.out], attributes)
