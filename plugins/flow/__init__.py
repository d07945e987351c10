"""``attnc::FlowAttention``: Flowformer flow attention (Wu et al., ICML 2022).

Contract
--------
Inputs (heads-first layout), *before* the sigmoid feature map:

- ``Q`` ``[B, H, L, D]``, ``K`` ``[B, H, S, D]``, ``V`` ``[B, H, S, Dv]``.

Output: ``[B, H, L, Dv]``.

Attributes: ``causal`` (int, default 0; needs ``L == S``), ``eps`` (float, default 1e-6).

Semantics (thuml ``Flow_Attention.py``), ``φ = sigmoid``, ``ε = eps``, sums over the key
(source) axis or, for the query-side sums, over the query (sink) axis::

    I  = 1 / ((φQ+ε) · (Σ φK + ε))           incoming flow   [B, H, L]
    O  = 1 / ((φK+ε) · (Σ φQ + ε))           outgoing flow   [B, H, S]
    Î  = (φQ+ε) · (Σ φK·O + ε)               conserved sink
    Ô  = clip((φK+ε) · (Σ φQ·I + ε), -1, 1)  conserved source
    out = ((φQ·I) (φKᵀ (V · softmax_S(Ô)·S))) · sigmoid(Î · L/S)

Causal (``Flow_Attention_Causal``; ``n_t = t + 1``, the number of visible positions): every
sum becomes a cumulative sum over positions ``<= t``; ``I`` and ``O`` are multiplied by
``n_t``, ``Î`` and ``Ô`` divided by it; the allocation is ``sigmoid(Î)``; the competition is
``exp(Ô_t) / Σ_{s<=t} exp(Ô_s) · n_t``; and
``out_t = Σ_{s<=t} ((φq_t·I_t/n_t) · φk_s) (v_s·competition_s) · sigmoid(Î_t)``.

The function body (:func:`function_proto`, overload ``""`` or ``"causal"`` following the
``causal`` attribute) computes the same in few ops: key-side sums as one ``MatMul`` with
``φKᵀ``, and the causal dot product in float32 as one masked ``[L, L]`` product up to 128
tokens and in chunks beyond (:func:`attnc.plugins.chunked.causal_product`), instead of
thuml's ``[L, D, Dv]`` running state.

Tests: ``tests/plugins/test_flow.py``; the pass that emits the op: ``attnc.passes.flow``
(tests in ``tests/passes/test_flow.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from onnx import helper

from attnc import DOMAIN
from attnc.plugins.chunked import causal_product

OP_TYPE = "FlowAttention"
ATTRIBUTES = {"causal": 0, "eps": 1e-6}
INPUTS = ("Q", "K", "V")
OPSET = 17  # lowest default-domain opset the body is valid in; every op used is unchanged up to 28


def overload_name(causal: bool) -> str:
    return "causal" if causal else ""


def output_shape(input_shapes: Sequence[Sequence], **attrs) -> list:
    """``[B, H, L, Dv]`` from the shapes of Q, K, V (dims may be symbolic)."""
    q, v = list(input_shapes[0]), list(input_shapes[2])
    if len(q) != 4 or len(v) != 4:
        raise ValueError(f"Q and V must be rank 4 [B, H, tokens, D], got {q} and {v}")
    return q[:3] + v[3:]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: int = 0,
              eps: float = 1e-6) -> torch.Tensor:
    """The op's semantics in plain torch, written as in the paper (any float dtype)."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    if not causal:
        length, sources = q.shape[2], k.shape[2]
        incoming = 1.0 / ((q + eps) * (k.sum(2, keepdim=True) + eps)).sum(-1)
        outgoing = 1.0 / ((k + eps) * (q.sum(2, keepdim=True) + eps)).sum(-1)
        sink = ((q + eps) * ((k * outgoing[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        source = ((k + eps) * ((q * incoming[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        source = source.clamp(-1.0, 1.0)
        allocation = torch.sigmoid(sink * (length / sources))
        competition = source.softmax(-1) * sources
        kv = k.transpose(-2, -1) @ (v * competition[..., None])
        return (q * incoming[..., None]) @ kv * allocation[..., None]
    if q.shape[2] != k.shape[2]:
        raise ValueError("causal flow attention needs as many keys as queries")
    normal = torch.arange(1, q.shape[2] + 1, dtype=q.dtype, device=q.device)
    incoming = normal / ((q + eps) * (k.cumsum(2) + eps)).sum(-1)
    outgoing = normal / ((k + eps) * (q.cumsum(2) + eps)).sum(-1)
    sink = ((q + eps) * ((k * outgoing[..., None]).cumsum(2) + eps)).sum(-1) / normal
    source = ((k + eps) * ((q * incoming[..., None]).cumsum(2) + eps)).sum(-1) / normal
    allocation = torch.sigmoid(sink)
    source = torch.exp(source.clamp(-1.0, 1.0))
    competition = source / source.cumsum(-1) * normal
    weights = (q * (incoming / normal)[..., None]) @ k.transpose(-2, -1)
    weights = weights.tril()
    return weights @ (v * competition[..., None]) * allocation[..., None]


def _n(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], **attrs)


def function_proto(causal: bool = False, opset: int = OPSET) -> onnx.FunctionProto:
    """The ONNX function body ONNX Runtime runs (overload ``""`` or ``"causal"``).

    ``opset`` is the default-domain version stamped on the function; pass the model's own.
    """
    eps_attr = helper.make_node("Constant", [], ["eps_f32"])
    eps_attr.attribute.append(helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, ref_attr_name="eps"))
    nodes = [
        eps_attr,
        _n("CastLike", ["eps_f32", "Q"], "eps"),
        _n("Constant", [], "one_f32", value_float=1.0),
        _n("CastLike", ["one_f32", "Q"], "one"),
        _n("Neg", ["one"], "minus_one"),
        _n("Constant", [], "last", value_ints=[-1]),
        _n("Sigmoid", ["Q"], "phi_q"),
        _n("Sigmoid", ["K"], "phi_k"),
        _n("Add", ["phi_q", "eps"], "q_eps"),
        _n("Add", ["phi_k", "eps"], "k_eps"),
        _n("Shape", ["Q"], "length_1d", start=2, end=3),
    ]
    if not causal:
        nodes += [
            _n("Transpose", ["phi_q"], "phi_q_t", perm=[0, 1, 3, 2]),
            _n("Transpose", ["phi_k"], "phi_k_t", perm=[0, 1, 3, 2]),
            # Σ over tokens as [B, H, D, 1] columns, so each flow is one MatMul with (φ+ε).
            _n("ReduceSum", ["phi_q_t", "last"], "sum_q", keepdims=1),
            _n("ReduceSum", ["phi_k_t", "last"], "sum_k", keepdims=1),
            _n("Add", ["sum_k", "eps"], "sum_k_eps"),
            _n("Add", ["sum_q", "eps"], "sum_q_eps"),
            _n("MatMul", ["q_eps", "sum_k_eps"], "incoming_inv"),
            _n("Reciprocal", ["incoming_inv"], "incoming"),                   # [B, H, L, 1]
            _n("MatMul", ["k_eps", "sum_q_eps"], "outgoing_inv"),
            _n("Reciprocal", ["outgoing_inv"], "outgoing"),                   # [B, H, S, 1]
            _n("MatMul", ["phi_k_t", "outgoing"], "k_out"),
            _n("Add", ["k_out", "eps"], "k_out_eps"),
            _n("MatMul", ["q_eps", "k_out_eps"], "sink"),                     # [B, H, L, 1]
            _n("MatMul", ["phi_q_t", "incoming"], "q_in"),
            _n("Add", ["q_in", "eps"], "q_in_eps"),
            _n("MatMul", ["k_eps", "q_in_eps"], "source_raw"),
            _n("Clip", ["source_raw", "minus_one", "one"], "source"),         # [B, H, S, 1]
            _n("Shape", ["K"], "sources_1d", start=2, end=3),
            _n("CastLike", ["length_1d", "Q"], "length"),
            _n("CastLike", ["sources_1d", "Q"], "sources"),
            _n("Div", ["length", "sources"], "ratio"),
            _n("Mul", ["sink", "ratio"], "sink_ratio"),
            _n("Sigmoid", ["sink_ratio"], "allocation"),
            _n("Softmax", ["source"], "source_softmax", axis=2),
            _n("Mul", ["source_softmax", "sources"], "competition"),
            _n("Mul", ["V", "competition"], "v_comp"),
            _n("MatMul", ["phi_k_t", "v_comp"], "kv"),                        # [B, H, D, Dv]
            _n("Mul", ["phi_q", "incoming"], "q_weighted"),
            _n("MatMul", ["q_weighted", "kv"], "flow"),
            _n("Mul", ["flow", "allocation"], "O"),
        ]
    else:
        nodes += [
            _n("Constant", [], "axis", value_int=2),
            _n("Constant", [], "one_i64", value_int=1),
            # n_t = t + 1 as a [L, 1] column.
            _n("Squeeze", ["length_1d"], "length_scalar"),
            _n("Add", ["length_scalar", "one_i64"], "limit"),
            _n("Range", ["one_i64", "limit", "one_i64"], "positions"),
            _n("CastLike", ["positions", "Q"], "positions_f"),
            _n("Unsqueeze", ["positions_f", "last"], "normal"),
            _n("CumSum", ["phi_k", "axis"], "cum_k"),
            _n("CumSum", ["phi_q", "axis"], "cum_q"),
            _n("Add", ["cum_k", "eps"], "cum_k_eps"),
            _n("Add", ["cum_q", "eps"], "cum_q_eps"),
            _n("Mul", ["q_eps", "cum_k_eps"], "incoming_terms"),
            _n("ReduceSum", ["incoming_terms", "last"], "incoming_inv", keepdims=1),
            _n("Reciprocal", ["incoming_inv"], "incoming_raw"),               # I / n_t
            _n("Mul", ["k_eps", "cum_q_eps"], "outgoing_terms"),
            _n("ReduceSum", ["outgoing_terms", "last"], "outgoing_inv", keepdims=1),
            _n("Div", ["normal", "outgoing_inv"], "outgoing"),                # O
            _n("Mul", ["incoming_raw", "normal"], "incoming"),                # I
            _n("Mul", ["phi_k", "outgoing"], "k_out"),
            _n("CumSum", ["k_out", "axis"], "cum_k_out"),
            _n("Add", ["cum_k_out", "eps"], "cum_k_out_eps"),
            _n("Mul", ["q_eps", "cum_k_out_eps"], "sink_terms"),
            _n("ReduceSum", ["sink_terms", "last"], "sink_sum", keepdims=1),
            _n("Div", ["sink_sum", "normal"], "sink"),
            _n("Mul", ["phi_q", "incoming"], "q_in"),
            _n("CumSum", ["q_in", "axis"], "cum_q_in"),
            _n("Add", ["cum_q_in", "eps"], "cum_q_in_eps"),
            _n("Mul", ["k_eps", "cum_q_in_eps"], "source_terms"),
            _n("ReduceSum", ["source_terms", "last"], "source_sum", keepdims=1),
            _n("Div", ["source_sum", "normal"], "source_raw"),
            _n("Clip", ["source_raw", "minus_one", "one"], "source"),
            _n("Sigmoid", ["sink"], "allocation"),
            _n("Exp", ["source"], "source_exp"),
            _n("CumSum", ["source_exp", "axis"], "source_exp_cum"),
            _n("Div", ["source_exp", "source_exp_cum"], "source_share"),
            _n("Mul", ["source_share", "normal"], "competition"),
            _n("Mul", ["V", "competition"], "v_comp"),
            # Σ_{s<=t} (q_t·k_s) v_s, thuml's causal_dot_product, in chunks and float32
            # (attnc.plugins.chunked): one masked [L, L] product up to 192 tokens, beyond that
            # chunks with a [D, Dv] state between them.
            _n("Mul", ["phi_q", "incoming_raw"], "q_weighted"),
            _n("Cast", ["q_weighted"], "q_weighted32", to=onnx.TensorProto.FLOAT),
            _n("Cast", ["phi_k"], "phi_k32", to=onnx.TensorProto.FLOAT),
            _n("Cast", ["v_comp"], "v_comp32", to=onnx.TensorProto.FLOAT),
            *causal_product("q_weighted32", "phi_k32", "v_comp32", None, "flow32"),
            _n("CastLike", ["flow32", "Q"], "flow"),
            _n("Mul", ["flow", "allocation"], "O"),
        ]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), ["O"], nodes, [helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES), overload=overload_name(causal),
        doc_string="FlowAttention (Flowformer), causal" if causal else "FlowAttention (Flowformer)")


def add_to_model(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Attach the function overload ``node`` needs to ``model``, at the model's opset."""
    from attnc.passes.core import add_function, default_opset

    causal = bool(next((a.i for a in node.attribute if a.name == "causal"), ATTRIBUTES["causal"]))
    node.overload = overload_name(causal)
    add_function(model, function_proto(causal=causal, opset=default_opset(model)))


def make_node(inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> onnx.NodeProto:
    """An ``attnc::FlowAttention`` node on Q, K, V; its ``overload`` follows ``causal``."""
    unknown = set(attrs) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown FlowAttention attribute(s) {sorted(unknown)}")
    if len(inputs) != 3:
        raise ValueError("FlowAttention takes Q, K, V")
    causal = int(attrs.get("causal", ATTRIBUTES["causal"]))
    node = helper.make_node(OP_TYPE, list(inputs), list(outputs), name=name, domain=DOMAIN,
                            causal=causal, eps=float(attrs.get("eps", ATTRIBUTES["eps"])))
    node.overload = overload_name(bool(causal))
    return node


__all__ = ["ATTRIBUTES", "OP_TYPE", "function_proto", "make_node", "output_shape", "reference"]
