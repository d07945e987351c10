"""``attnc::AgentAttention``: the two chained softmax stages of agent attention.

Contract
--------
Inputs (heads-first layout, as exported graphs have it after the head split):

- ``Q`` ``[B, H, N, D]``   queries.
- ``K`` ``[B, H, M, D]``   keys.
- ``V`` ``[B, H, M, Dv]``  values.
- ``A`` ``[B, H, n, D]``   agent tokens (any tensor broadcastable to that shape, e.g.
  ``[1, H, n, D]`` for learned agents).
- ``agent_bias`` (optional, ``""`` when absent) ``b1`` broadcastable to ``[B, H, n, M]``.
- ``query_bias`` (optional, ``""`` when absent) ``b2`` broadcastable to ``[B, H, N, n]``.

Output: ``[B, H, N, Dv]``.

Attribute ``scale`` (float, default 0 -> ``1/sqrt(D)``). With ``s = scale``::

    V_A = softmax(s * A Kᵀ + b1) V            # agent aggregation  [B, H, n, Dv]
    O   = softmax(s * Q Aᵀ + b2) V_A          # agent broadcast    [B, H, N, Dv]

(Han et al., ECCV 2024; LeapLabTHU ``agent_deit.py``). How ``A`` is made (pooled queries,
learned parameters), the interpolated bias tables and the depthwise-conv term of V stay
outside the node as ordinary ops. Each stage is exactly ONNX opset-23 ``Attention`` with an
additive ``attn_mask``; :func:`lower_to_attention_nodes` writes that form.

The function body is overloaded on which biases are present (``overload`` ``""``,
``"agent_bias"``, ``"query_bias"``, ``"biases"``): an ONNX function body cannot test whether
an optional input was given. :func:`make_node` picks the overload from its inputs.

Tests: ``tests/plugins/test_agent.py`` (function body vs :func:`reference` vs float64 numpy);
the pass that emits the op: ``attnc.passes.agent`` (tests in ``tests/passes/test_agent.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from onnx import TensorProto, helper

from attnc import DOMAIN

OP_TYPE = "AgentAttention"
ATTRIBUTES = {"scale": 0.0}
INPUTS = ("Q", "K", "V", "A", "agent_bias", "query_bias")
REQUIRED_INPUTS = 4  # the biases are optional
OPSET = 17  # lowest default-domain opset the body is valid in; every op used is unchanged up to 28


def overload_name(has_agent_bias: bool, has_query_bias: bool) -> str:
    """The function overload for a bias combination."""
    return {(False, False): "", (True, False): "agent_bias", (False, True): "query_bias",
            (True, True): "biases"}[(bool(has_agent_bias), bool(has_query_bias))]


def output_shape(input_shapes: Sequence[Sequence], **attrs) -> list:
    """``[B, H, N, Dv]`` from the shapes of Q, K, V (dims may be symbolic)."""
    q, v = list(input_shapes[0]), list(input_shapes[2])
    if len(q) != 4 or len(v) != 4:
        raise ValueError(f"Q and V must be rank 4 [B, H, tokens, D], got {q} and {v}")
    return q[:3] + v[3:]


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor,
              agent_bias: torch.Tensor | None = None, query_bias: torch.Tensor | None = None,
              scale: float = 0.0) -> torch.Tensor:
    """The op's semantics in plain torch (any float dtype, float64 included)."""
    s = scale or q.shape[-1] ** -0.5
    agent_scores = s * a @ k.transpose(-2, -1)
    if agent_bias is not None:
        agent_scores = agent_scores + agent_bias
    agent_v = agent_scores.softmax(dim=-1) @ v
    query_scores = s * q @ a.transpose(-2, -1)
    if query_bias is not None:
        query_scores = query_scores + query_bias
    return query_scores.softmax(dim=-1) @ agent_v


def _scale_nodes(query: str, prefix: str = "") -> list[onnx.NodeProto]:
    """Nodes computing ``{prefix}s``: the ``scale`` attribute, or ``1/sqrt(D)`` when it is 0."""
    attr = helper.make_attribute_ref("value_float", onnx.AttributeProto.FLOAT, ref_attr_name="scale")
    scale_attr = helper.make_node("Constant", [], [f"{prefix}scale_attr"])
    scale_attr.attribute.append(attr)
    return [
        scale_attr,
        helper.make_node("Constant", [], [f"{prefix}zero"], value_float=0.0),
        helper.make_node("Shape", [query], [f"{prefix}d_shape"], start=-1),
        helper.make_node("Cast", [f"{prefix}d_shape"], [f"{prefix}d"], to=TensorProto.FLOAT),
        helper.make_node("Sqrt", [f"{prefix}d"], [f"{prefix}sqrt_d"]),
        helper.make_node("Reciprocal", [f"{prefix}sqrt_d"], [f"{prefix}default"]),
        helper.make_node("Equal", [f"{prefix}scale_attr", f"{prefix}zero"], [f"{prefix}is_default"]),
        helper.make_node("Where", [f"{prefix}is_default", f"{prefix}default", f"{prefix}scale_attr"],
                         [f"{prefix}s_f32"]),
        helper.make_node("CastLike", [f"{prefix}s_f32", query], [f"{prefix}s"]),
    ]


def function_proto(has_agent_bias: bool = True, has_query_bias: bool = True,
                   opset: int = OPSET) -> onnx.FunctionProto:
    """The ONNX function body ONNX Runtime runs for one bias combination.

    ``opset`` is the default-domain version stamped on the function; pass the model's own
    (a function may not import a different version of a domain than its model).
    """
    nodes = _scale_nodes("Q")
    nodes += [
        # s·Q·Aᵀ = Q·(s·A)ᵀ: one scaled copy of the agents serves both stages.
        helper.make_node("Mul", ["A", "s"], ["A_scaled"]),
        helper.make_node("Transpose", ["K"], ["K_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["A_scaled", "K_t"], ["agent_logits" if has_agent_bias else "agent_scores"]),
    ]
    if has_agent_bias:
        nodes.append(helper.make_node("Add", ["agent_logits", "agent_bias"], ["agent_scores"]))
    nodes += [
        helper.make_node("Softmax", ["agent_scores"], ["agent_probs"], axis=-1),
        helper.make_node("MatMul", ["agent_probs", "V"], ["agent_v"]),
        helper.make_node("Transpose", ["A_scaled"], ["A_t"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["Q", "A_t"], ["query_logits" if has_query_bias else "query_scores"]),
    ]
    if has_query_bias:
        nodes.append(helper.make_node("Add", ["query_logits", "query_bias"], ["query_scores"]))
    nodes += [
        helper.make_node("Softmax", ["query_scores"], ["query_probs"], axis=-1),
        helper.make_node("MatMul", ["query_probs", "agent_v"], ["O"]),
    ]
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), ["O"], nodes, [helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES), overload=overload_name(has_agent_bias, has_query_bias),
        doc_string="AgentAttention: softmax(Q (sA)^T + b2) softmax((sA) K^T + b1) V")


def add_to_model(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Attach the function overload ``node`` needs to ``model``, at the model's opset."""
    from attnc.passes.core import add_function, default_opset

    padded = list(node.input) + [""] * (len(INPUTS) - len(node.input))
    node.overload = overload_name(bool(padded[4]), bool(padded[5]))
    add_function(model, function_proto(bool(padded[4]), bool(padded[5]), opset=default_opset(model)))


def make_node(inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs) -> onnx.NodeProto:
    """An ``attnc::AgentAttention`` node; ``inputs`` = Q, K, V, A[, agent_bias[, query_bias]]
    with ``""`` for an absent bias. Its ``overload`` names the function body it needs."""
    inputs = list(inputs) + [""] * (len(INPUTS) - len(inputs))
    while inputs and inputs[-1] == "":
        inputs.pop()
    if len(inputs) < 4:
        raise ValueError("AgentAttention needs Q, K, V and A")
    padded = inputs + [""] * (len(INPUTS) - len(inputs))
    unknown = set(attrs) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown AgentAttention attribute(s) {sorted(unknown)}")
    node = helper.make_node(OP_TYPE, inputs, list(outputs), name=name, domain=DOMAIN,
                            scale=float(attrs.get("scale", ATTRIBUTES["scale"])))
    node.overload = overload_name(bool(padded[4]), bool(padded[5]))
    return node


def lower_to_attention_nodes(inputs: Sequence[str], output: str, name: str,
                             scale: float) -> list[onnx.NodeProto]:
    """The op as two ONNX opset-23 ``Attention`` nodes (biases become ``attn_mask``).

    TensorRT imports each as its native fused attention layer.
    """
    q, k, v, a, agent_bias, query_bias = (list(inputs) + [""] * 6)[:6]
    agent_v = f"{name}/agent_v"
    # Attention's own default scale is 1/sqrt(D) too, so scale 0 simply leaves it out.
    scale_attr = {"scale": float(scale)} if scale else {}
    stage1 = helper.make_node("Attention", [a, k, v] + ([agent_bias] if agent_bias else []), [agent_v],
                              name=f"{name}/agent_aggregation", **scale_attr)
    stage2 = helper.make_node("Attention", [q, a, agent_v] + ([query_bias] if query_bias else []), [output],
                              name=f"{name}/agent_broadcast", **scale_attr)
    return [stage1, stage2]


__all__ = ["ATTRIBUTES", "OP_TYPE", "function_proto", "lower_to_attention_nodes", "make_node",
           "output_shape", "overload_name", "reference"]
