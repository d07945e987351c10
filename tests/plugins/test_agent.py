"""attnc::AgentAttention: ONNX function body (every bias overload) vs ``reference`` vs an
independent float64 numpy computation, and the two-``Attention``-node lowering vs the same."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from attnc.plugins import agent as plugin


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_agent(q, k, v, a, b1, b2, scale):
    """Agent attention in float64 numpy, one (batch, head) at a time, broadcasting explicitly."""
    s = scale or 1.0 / np.sqrt(q.shape[-1])
    bsz, heads, n_q, _ = q.shape
    n_a = a.shape[2]
    a = np.broadcast_to(a, (bsz, heads) + a.shape[2:])
    b1 = np.zeros((bsz, heads, n_a, k.shape[2])) + (0 if b1 is None else b1)
    b2 = np.zeros((bsz, heads, n_q, n_a)) + (0 if b2 is None else b2)
    out = np.zeros((bsz, heads, n_q, v.shape[-1]))
    for i in range(bsz):
        for h in range(heads):
            agent_v = _softmax(s * np.einsum("ad,md->am", a[i, h], k[i, h]) + b1[i, h]) @ v[i, h]
            out[i, h] = _softmax(s * np.einsum("nd,ad->na", q[i, h], a[i, h]) + b2[i, h]) @ agent_v
    return out


def _model(nodes, feeds, functions, opset, dtype=TensorProto.FLOAT):
    out_shape = plugin.output_shape([feeds["Q"].shape, feeds["K"].shape, feeds["V"].shape])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, dtype, t.shape) for n, t in feeds.items()],
                              [helper.make_tensor_value_info("o", dtype, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("attnc", 1)],
                              functions=functions)
    model.ir_version = 10
    return model


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _case(rng, b, h, n_q, n_kv, n_a, d, dv, b1_shape, b2_shape):
    q, k = rng.normal(0, 1, (b, h, n_q, d)), rng.normal(0, 1, (b, h, n_kv, d))
    v, a = rng.normal(0, 1, (b, h, n_kv, dv)), rng.normal(0, 1, (b, h, n_a, d))
    b1 = rng.normal(0, 1, b1_shape) if b1_shape else None
    b2 = rng.normal(0, 1, b2_shape) if b2_shape else None
    return q, k, v, a, b1, b2


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(1, 4), n_q=st.integers(1, 17), n_kv=st.integers(1, 17),
       n_a=st.integers(1, 9), d=st.integers(1, 9), dv=st.integers(1, 7),
       bias=st.sampled_from(["none", "agent", "query", "both"]), scale=st.sampled_from([0.0, 0.37]),
       opset=st.sampled_from([17, 23]), seed=st.integers(0, 99))
def test_function_body_matches_reference_and_numpy(b, h, n_q, n_kv, n_a, d, dv, bias, scale, opset, seed):
    b1_shape = (h, n_a, n_kv) if bias in ("agent", "both") else None       # a broadcast [*, H, n, M] table
    b2_shape = (b, h, n_q, n_a) if bias in ("query", "both") else None
    q, k, v, a, b1, b2 = _case(np.random.default_rng(seed), b, h, n_q, n_kv, n_a, d, dv, b1_shape, b2_shape)
    expected = numpy_agent(q, k, v, a, b1, b2, scale)
    torch_in = [None if t is None else torch.from_numpy(t) for t in (q, k, v, a, b1, b2)]
    np.testing.assert_allclose(plugin.reference(*torch_in, scale=scale).numpy(), expected, rtol=1e-10, atol=1e-12)

    feeds = {n: t.astype(np.float32) for n, t in zip(plugin.INPUTS, (q, k, v, a, b1, b2)) if t is not None}
    names = [n if n in feeds else "" for n in plugin.INPUTS]
    node = plugin.make_node(names, ["o"], "agent", scale=scale)
    function = plugin.function_proto(b1 is not None, b2 is not None, opset=opset)
    assert node.overload == function.overload
    model = _model([node], feeds, [function], opset)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(_run(model, feeds), expected, rtol=1e-5, atol=1e-6)

    lowered = _model(plugin.lower_to_attention_nodes(names, "o", "agent", scale), feeds, [], 23)
    np.testing.assert_allclose(_run(lowered, feeds), expected, rtol=1e-5, atol=1e-6)


def test_broadcast_agents_and_fp16():
    rng = np.random.default_rng(3)
    q, k, v, a, b1, b2 = _case(rng, 2, 3, 10, 10, 4, 8, 8, (3, 4, 10), (1, 3, 10, 4))
    a = a[:1]  # learned agents shared by the batch: [1, H, n, D]
    expected = numpy_agent(q, k, v, a, b1, b2, 0.0)
    feeds = {n: t.astype(np.float16) for n, t in zip(plugin.INPUTS, (q, k, v, a, b1, b2))}
    node = plugin.make_node(list(plugin.INPUTS), ["o"], "agent")
    model = _model([node], feeds, [plugin.function_proto(True, True)], 17, TensorProto.FLOAT16)
    np.testing.assert_allclose(_run(model, feeds).astype(np.float64), expected, rtol=1e-2, atol=2e-3)


def test_output_shape_and_node_contract():
    assert plugin.output_shape([["B", 2, 50, 8], ["B", 2, 50, 8], ["B", 2, 50, 6], ["B", 2, 4, 8]]) == ["B", 2, 50, 6]
    node = plugin.make_node(["q", "k", "v", "a", "", "b2"], ["o"], "n", scale=0.5)
    assert node.domain == "attnc" and node.overload == "query_bias" and list(node.input)[4] == ""
    assert plugin.make_node(["q", "k", "v", "a", "", ""], ["o"], "n").input[-1] == "a"
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n")
