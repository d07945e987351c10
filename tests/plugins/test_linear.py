"""attnc::KernelLinearAttention: ONNX function body vs ``reference`` vs an independent numpy float64 computation."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from attnc.compiler.backends.onnxruntime import load
from attnc.passes.core import add_function
from attnc.plugins import linear as plugin


def _numpy_linear_attention(q, k, v, decay, feature_map, causal, normalize, eps, scale):
    """Float64, quadratic with an explicit weight matrix: shares no code path with the plugin."""
    phi = {"elu1": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0))),
           "relu": lambda x: np.maximum(x, 0.0), "identity": lambda x: x}[feature_map]
    q, k = phi(q) * scale, phi(k)
    b, h, n, _ = q.shape
    out = np.zeros(v.shape[:-2] + (n, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            lam = 1.0 if decay is None else float(decay[hi])
            w = np.ones((n, n)) if not causal else np.array(
                [[lam ** (t - s) if s <= t else 0.0 for s in range(n)] for t in range(n)])
            a = (q[bi, hi] @ k[bi, hi].T) * w
            o = a @ v[bi, hi]
            if normalize:
                o = o / (a.sum(-1, keepdims=True) + eps)
            out[bi, hi] = o
    return out


def _model(with_decay: bool, opset: int, dtype=TensorProto.FLOAT, **attrs) -> onnx.ModelProto:
    names = ["Q", "K", "V"] + (["decay"] if with_decay else [])
    shapes = {"Q": ["b", "h", "n", "d"], "K": ["b", "h", "n", "d"], "V": ["b", "h", "n", "dv"], "decay": ["h"]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n == "decay" else dtype, shapes[n]) for n in names]
    node = plugin.make_node(names, ["O"], "kla", **attrs)
    graph = helper.make_graph([node], "kla", inputs, [helper.make_tensor_value_info("O", dtype, ["b", "h", "n", "dv"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    add_function(model, plugin.function_proto(opset))
    onnx.checker.check_model(model)
    return model


CONFIGS = [(fm, causal, norm, dec) for fm in plugin.FEATURE_MAPS for causal in (0, 1) for norm in (0, 1)
           for dec in ((False, True) if causal else (False,)) if not (fm == "identity" and norm)]


@pytest.mark.parametrize("feature_map,causal,normalize,with_decay", CONFIGS)
def test_function_body_matches_reference_and_numpy(feature_map, causal, normalize, with_decay):
    rng = np.random.default_rng(hash((feature_map, causal, normalize, with_decay)) % 2**32)
    q, k = rng.standard_normal((2, 3, 7, 5)), rng.standard_normal((2, 3, 7, 5))
    v = rng.standard_normal((2, 3, 7, 6))
    decay = rng.uniform(0.5, 1.0, 3) if with_decay else None
    attrs = dict(feature_map=feature_map, causal=causal, normalize=normalize, eps=1e-3, scale=0.7)
    expected = _numpy_linear_attention(q, k, v, decay, **attrs)
    ref = plugin.reference(*(torch.from_numpy(a) for a in (q, k, v)),
                           None if decay is None else torch.from_numpy(decay), **attrs).numpy()
    np.testing.assert_allclose(ref, expected, rtol=1e-10, atol=1e-12)
    feeds = {"Q": q, "K": k, "V": v} | ({"decay": decay} if with_decay else {})
    got = load(_model(with_decay, 17, **attrs)).infer({n: a.astype(np.float32) for n, a in feeds.items()})["O"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 4), n=st.integers(1, 13), d=st.integers(1, 9), dv=st.integers(1, 9),
       fm=st.sampled_from(plugin.FEATURE_MAPS), causal=st.booleans(), with_decay=st.booleans(),
       opset=st.sampled_from([17, 18, 21, 23]), seed=st.integers(0, 2**16))
def test_function_body_random_shapes(b, h, n, d, dv, fm, causal, with_decay, opset, seed):
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    normalize = int(fm != "identity")
    with_decay = with_decay and causal
    decay = rng.uniform(0.3, 1.0, h) if with_decay else None
    attrs = dict(feature_map=fm, causal=int(causal), normalize=normalize, eps=1e-2, scale=0.5)
    expected = _numpy_linear_attention(q, k, v, decay, **attrs)
    feeds = {"Q": q, "K": k, "V": v} | ({"decay": decay} if with_decay else {})
    got = load(_model(with_decay, opset, **attrs)).infer({n_: a.astype(np.float32) for n_, a in feeds.items()})["O"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert list(got.shape) == plugin.output_shape([list(q.shape), list(k.shape), list(v.shape)], **attrs)


def test_function_body_float16():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 2, 9, 8)) for _ in range(3))
    decay = np.array([0.9, 0.99])
    attrs = dict(feature_map="identity", causal=1, normalize=0, eps=1e-6, scale=0.25)
    expected = _numpy_linear_attention(q, k, v, decay, **attrs)
    model = _model(True, 17, dtype=TensorProto.FLOAT16, **attrs)
    got = load(model).infer({"Q": q.astype(np.float16), "K": k.astype(np.float16), "V": v.astype(np.float16),
                             "decay": decay.astype(np.float32)})["O"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-2, atol=2e-2)


def test_make_node_validates_and_fills_defaults():
    node = plugin.make_node(["q", "k", "v"], ["o"], "n", causal=1)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "attnc" and node.op_type == "KernelLinearAttention"
    assert attrs["feature_map"] == b"elu1" and attrs["causal"] == 1 and attrs["normalize"] == 1
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n", window=3)
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n", feature_map="softmax")


def test_one_function_serves_nodes_with_different_attributes():
    """Attribute references: two nodes, one FunctionProto, each computes its own semantics."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)) for _ in range(3))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 6, 4]) for n in "QKV"]
    nodes = [plugin.make_node(["Q", "K", "V"], ["A"], "a", feature_map="relu", causal=1),
             plugin.make_node(["Q", "K", "V"], ["B"], "b", feature_map="elu1", causal=0, scale=2.0)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 6, 4]) for n in "AB"]
    model = helper.make_model(helper.make_graph(nodes, "two", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 23)])
    add_function(model, plugin.function_proto(23))
    add_function(model, plugin.function_proto(23))
    onnx.checker.check_model(model)
    assert len(model.functions) == 1
    got = load(model).infer({"Q": q.astype(np.float32), "K": k.astype(np.float32), "V": v.astype(np.float32)})
    np.testing.assert_allclose(got["A"], _numpy_linear_attention(q, k, v, None, "relu", 1, 1, 1e-6, 1.0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["B"], _numpy_linear_attention(q, k, v, None, "elu1", 0, 1, 1e-6, 2.0),
                               rtol=1e-4, atol=1e-5)
