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
    plugin.add_to_model(model, node)
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


def _numpy_causal_vectorised(q, k, v, decay, feature_map, normalize, eps, scale):
    """Float64 causal linear attention as one masked product per head (for long sequences)."""
    phi = {"elu1": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0))),
           "relu": lambda x: np.maximum(x, 0.0), "identity": lambda x: x}[feature_map]
    q, k = phi(q) * scale, phi(k)
    n = q.shape[2]
    dist = np.arange(n)[:, None] - np.arange(n)[None, :]
    lam = np.ones(q.shape[1]) if decay is None else decay
    w = np.where(dist >= 0, lam[:, None, None] ** np.maximum(dist, 0), 0.0)      # [H, N, N]
    a = (q @ k.swapaxes(-1, -2)) * w
    out = a @ v
    return out / (a.sum(-1, keepdims=True) + eps) if normalize else out


@pytest.mark.parametrize("n", [193, 200, 333])
@pytest.mark.parametrize("feature_map,normalize,with_decay", [("elu1", 1, False), ("elu1", 1, True),
                                                               ("identity", 0, True), ("relu", 0, False)])
def test_function_body_long_sequences_run_in_chunks(n, feature_map, normalize, with_decay):
    """Beyond 192 tokens the causal body works in chunks (attnc.plugins.chunked): odd lengths pad
    the last chunk; strong decays (down to 0.3) underflow across chunks instead of overflowing."""
    rng = np.random.default_rng(n + 3 * normalize + with_decay)
    b, h, d, dv = 2, 3, 5, 6
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    decay = np.array([0.3, 0.9, 0.999]) if with_decay else None
    attrs = dict(feature_map=feature_map, causal=1, normalize=normalize, eps=1e-2, scale=0.5)
    expected = _numpy_causal_vectorised(q, k, v, decay, feature_map, normalize, 1e-2, 0.5)
    feeds = {"Q": q, "K": k, "V": v} | ({"decay": decay} if with_decay else {})
    got = load(_model(with_decay, 17, **attrs)).infer({x: a.astype(np.float32) for x, a in feeds.items()})["O"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_function_body_float16_long_sequence():
    """fp16 Q/K/V beyond the chunk switch: the chunks run in float32, O comes back in fp16."""
    rng = np.random.default_rng(29)
    q, k, v = (rng.standard_normal((1, 2, 260, 16)) for _ in range(3))
    decay = np.array([0.8, 0.995])
    attrs = dict(feature_map="identity", causal=1, normalize=0, eps=1e-6, scale=0.25)
    expected = _numpy_causal_vectorised(q, k, v, decay, "identity", 0, 1e-6, 0.25)
    got = load(_model(True, 17, dtype=TensorProto.FLOAT16, **attrs)).infer(
        {"Q": q.astype(np.float16), "K": k.astype(np.float16), "V": v.astype(np.float16),
         "decay": decay.astype(np.float32)})["O"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


@pytest.mark.parametrize("seed", [0, 1])
def test_function_body_long_sequences_match_fla_naive(seed):
    """Past the chunk switch, against flash-linear-attention's own naive implementations on fresh
    random shapes: lightning = ``naive_parallel_simple_gla`` with a constant log-decay per head;
    normalised elu+1 = ``naive_recurrent_linear_attn(..., normalize=True)`` on φ(Q), φ(K)."""
    pytest.importorskip("fla")
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_parallel_simple_gla

    rng = np.random.default_rng(seed)
    b, h, n, d, dv = int(rng.integers(1, 3)), int(rng.integers(1, 4)), int(rng.integers(193, 400)), \
        int(rng.integers(3, 17)), int(rng.integers(2, 13))
    q, k = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d))
    v = rng.standard_normal((b, h, n, dv))
    decay = rng.uniform(0.8, 1.0, h)
    feeds = {"Q": q, "K": k, "V": v, "decay": decay}
    bthd = [torch.from_numpy(a).transpose(1, 2).contiguous() for a in (q, k, v)]
    scale = d ** -0.5
    got = load(_model(True, 17, feature_map="identity", causal=1, normalize=0, scale=scale)).infer(
        {x: a.astype(np.float32) for x, a in feeds.items()})["O"]
    g = torch.from_numpy(np.log(decay)).view(1, 1, h).expand(b, n, h).contiguous()
    o, _ = naive_parallel_simple_gla(*bthd, g, scale=scale)
    np.testing.assert_allclose(got, o.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4 * np.abs(o.numpy()).max())
    got = load(_model(False, 17, feature_map="elu1", causal=1, normalize=1, eps=0.0)).infer(
        {x: feeds[x].astype(np.float32) for x in "QKV"})["O"]
    phi = [torch.nn.functional.elu(t) + 1.0 for t in bthd[:2]]
    o, _ = naive_recurrent_linear_attn(*phi, bthd[2], scale=1.0, normalize=True)
    np.testing.assert_allclose(got, o.transpose(1, 2).numpy(), rtol=1e-4, atol=1e-4)


def test_function_body_chunk_size_grows_with_the_sequence():
    """N·D > 64³ picks chunks longer than 64 tokens (here 66: N = 1100, D = 256), still exact."""
    rng = np.random.default_rng(17)
    q, k = rng.standard_normal((1, 1, 1100, 256)) * 0.2, rng.standard_normal((1, 1, 1100, 256)) * 0.2
    v = rng.standard_normal((1, 1, 1100, 3))
    decay = np.array([0.995])
    attrs = dict(feature_map="identity", causal=1, normalize=0, eps=1e-6, scale=0.1)
    expected = _numpy_causal_vectorised(q, k, v, decay, "identity", 0, 1e-6, 0.1)
    got = load(_model(True, 17, **attrs)).infer({"Q": q.astype(np.float32), "K": k.astype(np.float32),
                                                 "V": v.astype(np.float32), "decay": decay.astype(np.float32)})["O"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_make_node_validates_and_fills_defaults():
    node = plugin.make_node(["q", "k", "v"], ["o"], "n", causal=1)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert node.domain == "attnc" and node.op_type == "KernelLinearAttention"
    assert attrs["feature_map"] == b"elu1" and attrs["causal"] == 1 and attrs["normalize"] == 1
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n", window=3)
    with pytest.raises(ValueError):
        plugin.make_node(["q", "k", "v"], ["o"], "n", feature_map="softmax")


def test_one_function_per_overload_serves_nodes_with_different_attributes():
    """One FunctionProto per overload (feature map, causal or not), attribute references for the
    rest: each node computes its own semantics."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 2, 6, 4)) for _ in range(3))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 6, 4]) for n in "QKV"]
    nodes = [plugin.make_node(["Q", "K", "V"], ["A"], "a", feature_map="relu", causal=1),
             plugin.make_node(["Q", "K", "V"], ["B"], "b", feature_map="elu1", causal=0, scale=2.0),
             plugin.make_node(["Q", "K", "V"], ["C"], "c", feature_map="identity", causal=1, normalize=0)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 2, 6, 4]) for n in "ABC"]
    model = helper.make_model(helper.make_graph(nodes, "three", inputs, outs),
                              opset_imports=[helper.make_opsetid("", 23)])
    for node in nodes:
        plugin.add_to_model(model, node)
    onnx.checker.check_model(model)
    assert sorted(f.overload for f in model.functions) == ["elu1", "identity_causal", "relu_causal"]
    assert [n.overload for n in nodes] == ["relu_causal", "elu1", "identity_causal"]
    got = load(model).infer({"Q": q.astype(np.float32), "K": k.astype(np.float32), "V": v.astype(np.float32)})
    np.testing.assert_allclose(got["A"], _numpy_linear_attention(q, k, v, None, "relu", 1, 1, 1e-6, 1.0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["B"], _numpy_linear_attention(q, k, v, None, "elu1", 0, 1, 1e-6, 2.0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["C"], _numpy_linear_attention(q, k, v, None, "identity", 1, 0, 1e-6, 1.0),
                               rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- recurrent state

def _numpy_with_state(q, k, v, decay, state, feature_map, normalize, eps, scale):
    """Float64 closed form of the contract (explicit λ powers, no recurrence): (O, state_out)."""
    phi = {"elu1": lambda x: np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0))),
           "relu": lambda x: np.maximum(x, 0.0), "identity": lambda x: x}[feature_map]
    q, k = phi(q) * scale, phi(k)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    out, state_out = np.zeros((b, h, n, dv)), np.zeros((b, h, d, dv + normalize))
    for bi in range(b):
        for hi in range(h):
            lam = 1.0 if decay is None else float(decay[hi])
            s0 = np.zeros((d, dv)) if state is None else state[bi, hi, :, :dv]
            z0 = np.zeros(d) if state is None or not normalize else state[bi, hi, :, dv]
            for t in range(n):
                w = np.array([lam ** (t - s) for s in range(t + 1)])
                kv = lam ** (t + 1) * s0 + (k[bi, hi, :t + 1] * w[:, None]).T @ v[bi, hi, :t + 1]
                o = q[bi, hi, t] @ kv
                if normalize:
                    o = o / (q[bi, hi, t] @ (lam ** (t + 1) * z0 + (k[bi, hi, :t + 1] * w[:, None]).sum(0)) + eps)
                out[bi, hi, t] = o
            w = np.array([lam ** (n - 1 - s) for s in range(n)])
            state_out[bi, hi, :, :dv] = lam ** n * s0 + (k[bi, hi] * w[:, None]).T @ v[bi, hi]
            if normalize:
                state_out[bi, hi, :, dv] = lam ** n * z0 + (k[bi, hi] * w[:, None]).sum(0)
    return out, state_out


def _state_model(with_decay, with_state, with_state_out, opset=17, dtype=TensorProto.FLOAT, **attrs):
    """One node with the given optional inputs/outputs; decay and state are float32 in every model."""
    inputs = ["Q", "K", "V", "decay" if with_decay else "", "state" if with_state else ""]
    shapes = {"Q": ["b", "h", "n", "d"], "K": ["b", "h", "n", "d"], "V": ["b", "h", "n", "dv"], "decay": ["h"],
              "state": ["b", "h", "d", "w"]}
    infos = [helper.make_tensor_value_info(n, TensorProto.FLOAT if n in ("decay", "state") else dtype, shapes[n])
             for n in inputs if n]
    outputs = ["O"] + (["state_out"] if with_state_out else [])
    node = plugin.make_node(inputs, outputs, "kla", **attrs)
    out_infos = [helper.make_tensor_value_info("O", dtype, ["b", "h", "n", "dv"])]
    if with_state_out:
        out_infos.append(helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["b", "h", "d", "w"]))
    model = helper.make_model(helper.make_graph([node], "kla", infos, out_infos),
                              opset_imports=[helper.make_opsetid("", opset)])
    plugin.add_to_model(model, node)
    onnx.checker.check_model(model)
    return model


STATE_CONFIGS = [("elu1", 1, True), ("relu", 1, False), ("identity", 0, True), ("identity", 0, False),
                 ("elu1", 0, False), ("relu", 0, True)]


@pytest.mark.parametrize("feature_map,normalize,with_decay", STATE_CONFIGS)
@pytest.mark.parametrize("n", [1, 7, 37])
def test_reference_with_state_matches_numpy(feature_map, normalize, with_decay, n):
    rng = np.random.default_rng(n * 7 + normalize)
    b, h, d, dv = 2, 3, 5, 4
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    decay = rng.uniform(0.6, 1.0, h) if with_decay else None
    state = rng.standard_normal((b, h, d, dv + normalize))
    if normalize:
        state[..., dv] = rng.uniform(0.5, 2.0, (b, h, d))   # a running sum of positive φ(k)
    attrs = dict(feature_map=feature_map, causal=1, normalize=normalize, eps=1e-3, scale=0.6)
    expected, expected_state = _numpy_with_state(q, k, v, decay, state, feature_map, normalize, 1e-3, 0.6)
    o, state_out = plugin.reference(*(torch.from_numpy(a) for a in (q, k, v)),
                                    None if decay is None else torch.from_numpy(decay), torch.from_numpy(state),
                                    return_state=True, **attrs)
    assert o.dtype == state_out.dtype == torch.float64
    np.testing.assert_allclose(o.numpy(), expected, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(state_out.numpy(), expected_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("feature_map,normalize,with_decay", STATE_CONFIGS)
@pytest.mark.parametrize("with_state,with_state_out", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("opset,n", [(17, 7), (23, 7), (17, 210)])
def test_function_body_with_state_matches_numpy(feature_map, normalize, with_decay, with_state, with_state_out,
                                                opset, n):
    rng = np.random.default_rng(hash((feature_map, normalize, with_decay, with_state, with_state_out, n)) % 2**32)
    b, h, d, dv = 2, 3, 5, 3
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    decay = rng.uniform(0.5, 1.0, h) if with_decay else None
    state = rng.uniform(0.0, 1.0, (b, h, d, dv + normalize)) if with_state else None
    attrs = dict(feature_map=feature_map, causal=1, normalize=normalize, eps=1e-2, scale=0.8)
    expected, expected_state = _numpy_with_state(q, k, v, decay, state, feature_map, normalize, 1e-2, 0.8)
    model = _state_model(with_decay, with_state, with_state_out, opset, **attrs)
    feeds = {"Q": q, "K": k, "V": v} | ({"decay": decay} if with_decay else {}) | ({"state": state} if with_state else {})
    got = load(model).infer({name: a.astype(np.float32) for name, a in feeds.items()})
    np.testing.assert_allclose(got["O"], expected, rtol=1e-4, atol=1e-4)
    if with_state_out:
        assert got["state_out"].dtype == np.float32
        assert list(got["state_out"].shape) == plugin.extra_outputs([q.shape, k.shape, v.shape], **attrs)[0][0]
        np.testing.assert_allclose(got["state_out"], expected_state, rtol=1e-4, atol=1e-4)


def _run_in_pieces(session, feeds, splits, with_decay):
    """Run ``session`` on tokens [0, s1), [s1, s2), ... passing state_out on as state; (O, last state)."""
    outs, state = [], None
    bounds = [0, *splits, feeds["Q"].shape[2]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        piece = {name: feeds[name][:, :, lo:hi] for name in ("Q", "K", "V")}
        if with_decay:
            piece["decay"] = feeds["decay"]
        run = session["first" if state is None else "next"].infer(piece | ({} if state is None else {"state": state}))
        outs.append(run["O"])
        state = run["state_out"]
    return np.concatenate(outs, axis=2), state


@pytest.mark.parametrize("feature_map,normalize,with_decay", STATE_CONFIGS)
def test_prefill_then_decode_equals_one_shot(feature_map, normalize, with_decay):
    """The contract's key property through ONNX Runtime: [0, m) then [m, N) with the state == [0, N),
    for several m, and token by token (N = 1 calls) from the first token."""
    rng = np.random.default_rng(11 + normalize)
    b, h, n, d, dv = 2, 2, 37, 6, 5
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    decay = rng.uniform(0.7, 1.0, h) if with_decay else None
    attrs = dict(feature_map=feature_map, causal=1, normalize=normalize, eps=1e-2, scale=0.5)
    expected, expected_state = _numpy_with_state(q, k, v, decay, None, feature_map, normalize, 1e-2, 0.5)
    session = {"first": load(_state_model(with_decay, False, True, **attrs)),
               "next": load(_state_model(with_decay, True, True, **attrs))}
    feeds = {"Q": q, "K": k, "V": v} | ({"decay": decay} if with_decay else {})
    feeds = {name: a.astype(np.float32) for name, a in feeds.items()}
    # identity without normaliser over 37 tokens: values grow to ~1e2, so compare relative to the scale
    atol = 1e-4 * max(1.0, np.abs(expected).max())
    for splits in ([1], [17], [36], [30, 31, 32, 33, 34, 35, 36], list(range(1, n))):
        got, state = _run_in_pieces(session, feeds, splits, with_decay)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol, err_msg=f"splits {splits}")
        np.testing.assert_allclose(state, expected_state, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected_state).max()))


@pytest.mark.parametrize("feature_map,normalize,with_decay", [("elu1", 1, True), ("identity", 0, True)])
def test_long_prefill_then_decode_equals_one_shot(feature_map, normalize, with_decay):
    """The state across the chunked (> 192 tokens) and the short bodies: a long prefill then short
    pieces, a short prefill then a long piece."""
    rng = np.random.default_rng(23 + normalize)
    b, h, n, d, dv = 1, 2, 300, 4, 3
    q, k, v = rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, d)), rng.standard_normal((b, h, n, dv))
    decay = np.array([0.95, 0.999])
    attrs = dict(feature_map=feature_map, causal=1, normalize=normalize, eps=1e-2, scale=0.5)
    expected, expected_state = _numpy_with_state(q, k, v, decay, None, feature_map, normalize, 1e-2, 0.5)
    session = {"first": load(_state_model(with_decay, False, True, **attrs)),
               "next": load(_state_model(with_decay, True, True, **attrs))}
    feeds = {name: a.astype(np.float32) for name, a in {"Q": q, "K": k, "V": v, "decay": decay}.items()}
    atol = 1e-4 * max(1.0, np.abs(expected).max())
    for splits in ([200], [200, 201, 202], [5], [193, 194]):
        got, state = _run_in_pieces(session, feeds, splits, with_decay)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol, err_msg=f"splits {splits}")
        np.testing.assert_allclose(state, expected_state, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(expected_state).max()))


def test_function_body_float16_with_float32_state():
    """fp16 Q/K/V, float32 decay/state/state_out: prefill + token-by-token decode."""
    rng = np.random.default_rng(13)
    b, h, n, d, dv = 1, 2, 9, 8, 6
    q, k, v = (rng.standard_normal((b, h, n, dd)) for dd in (d, d, dv))
    decay = np.array([0.9, 0.99])
    attrs = dict(feature_map="elu1", causal=1, normalize=1, eps=1e-4, scale=0.25)
    expected, expected_state = _numpy_with_state(q, k, v, decay, None, "elu1", 1, 1e-4, 0.25)
    session = {"first": load(_state_model(True, False, True, dtype=TensorProto.FLOAT16, **attrs)),
               "next": load(_state_model(True, True, True, dtype=TensorProto.FLOAT16, **attrs))}
    feeds = {"Q": q.astype(np.float16), "K": k.astype(np.float16), "V": v.astype(np.float16),
             "decay": decay.astype(np.float32)}
    got, state = _run_in_pieces(session, feeds, [5, 6, 7, 8], with_decay=True)
    assert got.dtype == np.float16 and state.dtype == np.float32
    np.testing.assert_allclose(got.astype(np.float64), expected, rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(state, expected_state, rtol=1e-2, atol=1e-2)


def test_state_contract_errors_and_overloads():
    for inputs, outputs in ((["q", "k", "v", "", "s"], ["o"]), (["q", "k", "v"], ["o", "s_out"])):
        with pytest.raises(ValueError, match="causal=1"):
            plugin.make_node(inputs, outputs, "n", causal=0)
    with pytest.raises(ValueError, match="causal=1"):
        plugin.reference(*(torch.zeros(1, 1, 2, 2) for _ in range(3)), state=torch.zeros(1, 1, 2, 3), causal=0)
    with pytest.raises(ValueError, match="outputs"):
        plugin.make_node(["q", "k", "v"], ["o", "s", "x"], "n", causal=1)
    with pytest.raises(ValueError, match="state must be"):
        plugin.reference(*(torch.zeros(1, 1, 2, 2) for _ in range(3)), state=torch.zeros(1, 1, 2, 2), causal=1)
    overloads = {(tuple(i), tuple(o)): plugin.make_node(i, o, "n", causal=1).overload
                 for i, o in ((["q", "k", "v"], ["o"]), (["q", "k", "v", "d", ""], ["o", ""]),
                              (["q", "k", "v", "", "s"], ["o"]), (["q", "k", "v", "d"], ["o", "so"]),
                              (["q", "k", "v", "", "s"], ["o", "so"]))}
    assert list(overloads.values()) == ["elu1_causal", "elu1_causal", "elu1_state", "elu1_state_out",
                                        "elu1_state_in_out"]
    assert plugin.make_node(["q", "k", "v"], ["o"], "n", causal=0, feature_map="relu").overload == "relu"
    node = plugin.make_node(["q", "k", "v", "d", ""], ["o", ""], "n", causal=1)
    assert list(node.input) == ["q", "k", "v", "d"] and list(node.output) == ["o"]
    assert plugin.extra_outputs([["B", 2, "N", 5], ["B", 2, "N", 5], ["B", 2, "N", 4]], normalize=1) == \
        [(["B", 2, 5, 5], "float32")]
    assert plugin.extra_outputs([[1, 2, 3, 5], [1, 2, 3, 5], [1, 2, 3, 4]], normalize=0)[0][0] == [1, 2, 5, 4]
    assert plugin.INPUTS[plugin.FLOAT32_INPUTS[1]] == "state"
    assert plugin.OUTPUTS[1] == "state_out"


def test_reference_keeps_dtype_and_accumulates_state_in_float32():
    q, k, v = (torch.randn(1, 2, 5, 4).half() for _ in range(3))
    o, state = plugin.reference(q, k, v, causal=1, normalize=0, feature_map="relu", return_state=True)
    assert o.dtype == torch.float16 and state.dtype == torch.float32 and state.shape == (1, 2, 4, 4)
    o64 = plugin.reference(q.double(), k.double(), v.double(), causal=1, normalize=0, feature_map="relu")
    np.testing.assert_allclose(o.double().numpy(), o64.numpy(), rtol=1e-2, atol=1e-2)
