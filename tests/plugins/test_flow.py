"""attnc::FlowAttention: ONNX function body vs ``reference`` vs an independent float64 numpy
computation (thuml's formulas with an explicit running state for the causal case), and
``reference`` vs the ``attnc.models.flow`` module the pass is written against."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from attnc.plugins import flow as plugin


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_flow(q, k, v, causal, eps):
    """Flowformer in float64 numpy, one (batch, head) at a time."""
    b, h, length, _ = q.shape
    sources = k.shape[2]
    out = np.zeros(q.shape[:3] + v.shape[3:])
    for bi in range(b):
        for hi in range(h):
            fq, fk, vv = _sigmoid(q[bi, hi]), _sigmoid(k[bi, hi]), v[bi, hi]
            if not causal:
                inc = 1.0 / ((fq + eps) @ (fk.sum(0) + eps))
                outg = 1.0 / ((fk + eps) @ (fq.sum(0) + eps))
                sink = (fq + eps) @ ((fk * outg[:, None]).sum(0) + eps)
                src = np.clip((fk + eps) @ ((fq * inc[:, None]).sum(0) + eps), -1, 1)
                alloc = _sigmoid(sink * length / sources)
                comp = np.exp(src - src.max()) / np.exp(src - src.max()).sum() * sources
                out[bi, hi] = ((fq * inc[:, None]) @ (fk.T @ (vv * comp[:, None]))) * alloc[:, None]
                continue
            n = np.arange(1, length + 1, dtype=np.float64)
            inc = n / np.einsum("ld,ld->l", fq + eps, np.cumsum(fk, 0) + eps)
            outg = n / np.einsum("ld,ld->l", fk + eps, np.cumsum(fq, 0) + eps)
            sink = np.einsum("ld,ld->l", fq + eps, np.cumsum(fk * outg[:, None], 0) + eps) / n
            src = np.einsum("ld,ld->l", fk + eps, np.cumsum(fq * inc[:, None], 0) + eps) / n
            e = np.exp(np.clip(src, -1, 1))
            comp = e / np.cumsum(e) * n
            state = np.zeros((q.shape[3], v.shape[3]))
            for t in range(length):
                state += np.outer(fk[t], vv[t] * comp[t])
                out[bi, hi, t] = (fq[t] * inc[t] / n[t]) @ state * _sigmoid(sink[t])
    return out


def run_function(q, k, v, causal, eps, opset=17):
    dtype = TensorProto.FLOAT if q.dtype == np.float32 else TensorProto.FLOAT16
    node = plugin.make_node(["q", "k", "v"], ["o"], "flow", causal=causal, eps=eps)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, dtype, t.shape)
                                            for n, t in zip("qkv", (q, k, v))],
                              [helper.make_tensor_value_info("o", dtype,
                                                             plugin.output_shape([q.shape, k.shape, v.shape]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("attnc", 1)],
                              functions=[plugin.function_proto(causal=bool(causal), opset=opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"q": q, "k": k, "v": v})[0]


def _inputs(rng, b, h, length, sources, d, dv, spread=2.0):
    return (rng.normal(0, spread, (b, h, length, d)), rng.normal(0, spread, (b, h, sources, d)),
            rng.normal(0, 1, (b, h, sources, dv)))


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), length=st.integers(1, 13), d=st.integers(1, 9),
       dv=st.integers(1, 7), causal=st.booleans(), cross=st.integers(0, 5),
       eps=st.sampled_from([1e-6, 1e-3]), opset=st.sampled_from([17, 23]), seed=st.integers(0, 99))
def test_function_body_matches_reference_and_numpy(b, h, length, d, dv, causal, cross, eps, opset, seed):
    sources = length if causal else length + cross
    q, k, v = _inputs(np.random.default_rng(seed), b, h, length, sources, d, dv)
    expected = numpy_flow(q, k, v, causal, eps)
    ref = plugin.reference(*(torch.from_numpy(t) for t in (q, k, v)), causal=causal, eps=eps).numpy()
    np.testing.assert_allclose(ref, expected, rtol=1e-10, atol=1e-12)
    got = run_function(*(t.astype(np.float32) for t in (q, k, v)), causal, eps, opset)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_models_flow(causal):
    from attnc.models.flow import FlowAttention

    torch.manual_seed(0)
    module = FlowAttention(24, 3, causal=causal).double()
    q, k, v = (torch.randn(2, 3, 11, 8, dtype=torch.float64) * 2 for _ in range(3))
    expected = (module._causal if causal else module._non_causal)(torch.sigmoid(q), torch.sigmoid(k), v)
    torch.testing.assert_close(plugin.reference(q, k, v, causal=int(causal)), expected, rtol=1e-10, atol=1e-12)


def test_fp16_body_runs():
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, 1, 2, 9, 9, 8, 8, spread=1.0)
    for causal in (0, 1):
        got = run_function(*(t.astype(np.float16) for t in (q, k, v)), causal, 1e-6)
        np.testing.assert_allclose(got.astype(np.float64), numpy_flow(q, k, v, causal, 1e-6), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("length,dtype", [(193, np.float32), (261, np.float32), (200, np.float16)])
def test_causal_body_on_long_sequences_runs_in_chunks(length, dtype):
    """Beyond 192 tokens the causal dot product runs in chunks (attnc.plugins.chunked), odd lengths
    padding the last one; against thuml's running state in float64."""
    rng = np.random.default_rng(length)
    q, k, v = _inputs(rng, 2, 2, length, length, 6, 5, spread=1.0)
    got = run_function(*(t.astype(dtype) for t in (q, k, v)), 1, 1e-6)
    tol = 2e-5 if dtype == np.float32 else 2e-2
    np.testing.assert_allclose(got.astype(np.float64), numpy_flow(q, k, v, 1, 1e-6), rtol=tol, atol=tol / 10)


def test_output_shape_and_node_contract():
    assert plugin.output_shape([["B", 2, "L", 8], ["B", 2, "S", 8], ["B", 2, "S", 5]]) == ["B", 2, "L", 5]
    node = plugin.make_node(["q", "k", "v"], ["o"], "n", causal=1, eps=1e-5)
    assert node.domain == "attnc" and node.overload == "causal"
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n", kernel=3)
