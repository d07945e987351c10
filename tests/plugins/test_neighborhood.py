"""``attnc::NeighborhoodAttention``: function body (ORT) vs ``reference`` (torch) vs a numpy loop.

The numpy oracle below is written from the NATTEN >= 0.20 docs' *centre* formulation
(centre = clamp(p, left, n-1-right), window = centre-left .. centre+right on the dilation sub-grid),
not from the plugin's start-index formula, so the three can disagree. Stride (NATTEN >= 0.20's
strided NA) enters it as the definition states it: a query takes the window of its block's leader.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from attnc.plugins import neighborhood as na
from attnc.plugins.neighborhood import natten_compat


def _axis_keys(i: int, length: int, k: int, d: int, causal: bool, stride: int = 1) -> list[int]:
    g, p = i % d, i // d
    n = len(range(g, length, d))
    block = list(range(p - p % stride, p - p % stride + stride))   # the query's stride block
    if causal:
        leader = min(block[-1], n - 1)
        return [g + d * s for s in range(max(0, leader - k + 1), p + 1)]
    leader = min(block[len(block) // 2], n - 1)     # centre; the right one of two
    left, right = k // 2, k // 2 + k % 2 - 1
    centre = min(max(leader, left), n - 1 - right)
    return [g + d * s for s in range(centre - left, centre + right + 1)]


def numpy_oracle(q, k, v, kernel, dilation, causal, scale=None, rpb=None, stride=None):
    """Float64 loops over every query of a ``[B, H, *grid, D]`` problem."""
    grid = q.shape[2:-1]
    scale = scale or 1 / np.sqrt(q.shape[-1])
    stride = stride or [1] * len(grid)
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for idx in itertools.product(*(range(n) for n in grid)):
        per_axis = [_axis_keys(i, n, kk, dd, cc, ss)
                    for i, n, kk, dd, cc, ss in zip(idx, grid, kernel, dilation, causal, stride)]
        keys = list(itertools.product(*per_axis))
        for b in range(q.shape[0]):
            for h in range(q.shape[1]):
                s = np.array([scale * q[(b, h, *idx)] @ k[(b, h, *j)] for j in keys], dtype=np.float64)
                if rpb is not None:
                    s += np.array([rpb[(h % rpb.shape[0], *((jj // dd) - (ii // dd) + kk - 1
                                                             for ii, jj, kk, dd in zip(idx, j, kernel, dilation)))]
                                   for j in keys])
                w = np.exp(s - s.max())
                w /= w.sum()
                out[(b, h, *idx)] = sum(wi * v[(b, h, *j)] for wi, j in zip(w, keys))
    return out


def _session(ndim: int, has_rpb: bool, attrs: dict, dtype=TensorProto.FLOAT) -> ort.InferenceSession:
    """One-node model; ``attrs`` may hold ``grid`` (the static-grid overload)."""
    names = ["q", "k", "v"] + (["rpb"] if has_rpb else [])
    node = na.make_node(names, ["o"], "na", **attrs)
    inputs = [helper.make_tensor_value_info(n, dtype, [None] * (3 + ndim)) for n in names[:3]]
    if has_rpb:
        inputs.append(helper.make_tensor_value_info("rpb", dtype, [None] * (1 + ndim)))
    graph = helper.make_graph([node], "na", inputs, [helper.make_tensor_value_info("o", dtype, [None] * (3 + ndim))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    na.add_to_model(model, node)
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _check(grid, kernel, dilation, causal, has_rpb, heads=2, head_dim=5, v_dim=None, scale=0.0, seed=0,
           static=False, stride=None):
    rng = np.random.default_rng(seed)
    ndim = len(grid)
    q, k = (rng.standard_normal((2, heads, *grid, head_dim)) for _ in range(2))
    v = rng.standard_normal((2, heads, *grid, v_dim or head_dim))
    rpb = rng.standard_normal((heads, *(2 * x - 1 for x in kernel))) if has_rpb else None
    attrs = dict(kernel_size=kernel, dilation=dilation, is_causal=causal, stride=stride, scale=scale)
    if static:
        attrs["grid"] = list(grid)
    feeds = {"q": q, "k": k, "v": v} | ({"rpb": rpb} if has_rpb else {})
    got = _session(ndim, has_rpb, attrs).run(None, {n: x.astype(np.float32) for n, x in feeds.items()})[0]
    ref = na.reference(*(torch.from_numpy(x) for x in (q, k, v)), kernel, dilation, causal, scale,
                       rpb=None if rpb is None else torch.from_numpy(rpb), stride=stride).numpy()
    oracle = numpy_oracle(q, k, v, kernel, dilation, causal, scale, rpb, stride)
    np.testing.assert_allclose(ref, oracle, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got, oracle, rtol=1e-5, atol=2e-6)
    assert got.shape == tuple(na.output_shape([q.shape, k.shape, v.shape], **attrs))


@pytest.mark.parametrize("grid,kernel,dilation,causal,rpb", [
    ((13,), [5], [2], [0], False),
    ((13,), [5], [2], [1], True),
    ((11,), [11], [1], [0], True),             # window = whole axis
    ((9, 11), [3, 5], [2, 1], [1, 0], True),
    ((7, 9), [7, 3], [1, 3], [0, 0], False),
    ((5, 6, 7), [3, 3, 3], [1, 2, 1], [0, 0, 1], True),
    # last axis longer than na.BLOCK: several query blocks, the last one shifted back
    ((3, 61), [3, 5], [1, 3], [0, 1], True),
    ((3, 45), [3, 7], [1, 2], [1, 0], False),
    ((2, 3, 31), [1, 3, 5], [1, 1, 2], [0, 0, 0], True),
])
@pytest.mark.parametrize("static", [False, True], ids=["shape-grid", "static-grid"])
def test_function_matches_reference_and_oracle(grid, kernel, dilation, causal, rpb, static):
    _check(grid, kernel, dilation, causal, rpb, static=static)


@pytest.mark.parametrize("grid,kernel,dilation,causal,stride", [
    ((13,), [5], [1], [0], [2]),               # even stride: right centre of each block
    ((13,), [5], [2], [1], [3]),               # causal: keys from the block's last position's window
    ((11,), [3], [1], [1], [3]),               # stride == kernel
    ((17,), [7], [2], [0], [7]),               # stride == kernel, dilation, partial last block
    ((9, 11), [3, 5], [2, 1], [1, 0], [2, 3]),
    ((7, 13), [5, 3], [1, 3], [0, 1], [4, 2]),
    ((5, 6, 7), [3, 3, 3], [1, 2, 1], [0, 1, 1], [3, 2, 1]),
    ((3, 61), [3, 5], [1, 3], [1, 0], [1, 4]),  # several query blocks on the last axis
    ((3, 45), [3, 7], [1, 2], [0, 1], [2, 5]),
])
@pytest.mark.parametrize("static", [False, True], ids=["shape-grid", "static-grid"])
def test_strided_function_matches_reference_and_oracle(grid, kernel, dilation, causal, stride, static):
    _check(grid, kernel, dilation, causal, False, stride=stride, static=static)


def test_stride_one_is_the_unstrided_op():
    allowed, _ = na.dense_mask_and_rel((9, 11), [3, 5], [2, 1], [1, 0])
    same, _ = na.dense_mask_and_rel((9, 11), [3, 5], [2, 1], [1, 0], [1, 1])
    strided, _ = na.dense_mask_and_rel((9, 11), [3, 5], [2, 1], [1, 0], [1, 2])
    assert (allowed == same).all() and not (allowed == strided).all()


def test_stride_validation():
    with pytest.raises(ValueError, match="1 <= stride <= kernel_size"):
        na.make_node(["q", "k", "v"], ["o"], "n", kernel_size=[3, 5], stride=[4, 1])
    with pytest.raises(ValueError, match="1 <= stride <= kernel_size"):
        na.dense_mask_and_rel((9,), [3], stride=[0])
    with pytest.raises(ValueError, match="positional bias with stride"):
        na.make_node(["q", "k", "v", "rpb"], ["o"], "n", kernel_size=[3, 5], stride=[2, 1])
    q = torch.zeros(1, 2, 9, 4)
    with pytest.raises(ValueError, match="positional bias with stride"):
        na.reference(q, q, q, [3], rpb=torch.zeros(2, 5), stride=[2])


def test_node_without_stride_gets_the_default():
    """Nodes written before ``stride`` existed: add_to_model fills in the per-axis defaults."""
    node = na.make_node(["q", "k", "v"], ["o"], "na", kernel_size=[3])
    del node.attribute[:]
    node.attribute.extend([helper.make_attribute("kernel_size", [3]), helper.make_attribute("scale", 0.0)])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, 7, 4]) for n in "qkv"]
    model = helper.make_model(helper.make_graph([node], "na", inputs,
                                                [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)]),
                              opset_imports=[helper.make_opsetid("", 18)])
    node = model.graph.node[0]  # the graph holds a copy
    na.add_to_model(model, node)
    assert list(helper.get_attribute_value(next(a for a in node.attribute if a.name == "stride"))) == [1]
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 7, 4)) for _ in range(3))
    got = ort.InferenceSession(model.SerializeToString()).run(None, {n: x.astype(np.float32)
                                                                     for n, x in zip("qkv", (q, k, v))})[0]
    np.testing.assert_allclose(got, numpy_oracle(q, k, v, [3], [1], [0]), rtol=1e-5, atol=2e-6)


def test_explicit_scale_and_value_dim():
    _check((10,), [3], [1], [0], False, head_dim=4, v_dim=7, scale=0.3)


def test_fp16_body_runs():
    sess = _session(2, True, dict(kernel_size=[3, 3]), dtype=TensorProto.FLOAT16)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 6, 7, 8)) for _ in range(3))
    rpb = rng.standard_normal((2, 5, 5)) * 0.1
    got = sess.run(None, {"q": q.astype(np.float16), "k": k.astype(np.float16), "v": v.astype(np.float16),
                          "rpb": rpb.astype(np.float16)})[0]
    np.testing.assert_allclose(got, numpy_oracle(q, k, v, [3, 3], [1, 1], [0, 0], rpb=rpb), atol=1e-2)


@settings(max_examples=8, deadline=None)
@given(st.data())
def test_random_configs(data):
    ndim = data.draw(st.sampled_from([1, 2]))
    kernel = [data.draw(st.integers(1, 4)) * 2 - 1 for _ in range(ndim)]
    dilation = [data.draw(st.integers(1, 3)) for _ in range(ndim)]
    grid = tuple(k * d + data.draw(st.integers(0, 4)) for k, d in zip(kernel, dilation))
    if ndim == 2 and data.draw(st.booleans()):  # a last axis with several query blocks
        grid = (grid[0], grid[1] + na.BLOCK + data.draw(st.integers(0, na.BLOCK)))
    causal = [int(data.draw(st.booleans())) for _ in range(ndim)]
    _check(grid, kernel, dilation, causal, data.draw(st.booleans()), heads=data.draw(st.integers(1, 3)),
           head_dim=data.draw(st.sampled_from([3, 8])), seed=data.draw(st.integers(0, 99)),
           static=data.draw(st.booleans()))


def test_rejects_grid_smaller_than_window():
    with pytest.raises(ValueError, match="shorter than kernel_size"):
        na.axis_windows(5, 3, 2, False)


# ----------------------------------------------------------------------------- NATTEN translation

def _heads_first(t):
    return np.moveaxis(t, -2, 1)


@pytest.mark.parametrize("ndim,grid,kernel,dilation,causal", [
    (1, (11,), 5, 2, True), (2, (7, 9), 3, (1, 2), (True, False)), (2, (6, 6), 5, 1, False)])
def test_natten_functions_eager(ndim, grid, kernel, dilation, causal):
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((2, *grid, 3, 4)) for _ in range(3))  # heads-last [B, *grid, heads, D]
    fn = {1: natten_compat.na1d, 2: natten_compat.na2d}[ndim]
    got = fn(*(torch.from_numpy(t) for t in (q, k, v)), kernel_size=kernel, dilation=dilation, is_causal=causal)
    def per_axis(x):
        return list(x) if isinstance(x, tuple) else [x] * ndim

    oracle = numpy_oracle(*(_heads_first(t) for t in (q, k, v)), per_axis(kernel), per_axis(dilation),
                          [int(c) for c in per_axis(causal)])
    np.testing.assert_allclose(got.numpy(), np.moveaxis(oracle, 1, -2), rtol=1e-10, atol=1e-12)


class _NattenBlock(torch.nn.Module):
    def __init__(self, strided: bool = False):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)
        self.strided = strided

    def forward(self, x):
        b, rows, cols, c = x.shape
        q, k, v = self.qkv(x).reshape(b, rows, cols, 3, 2, 8).unbind(3)
        if self.strided:  # NATTEN's positional order: kernel_size 5, stride 2
            out = natten_compat.na2d(q, k, v, 5, 2, (1, 2), (False, True))
        else:
            out = natten_compat.na2d(q, k, v, kernel_size=3, dilation=(1, 2), is_causal=(True, False))
        return out.reshape(b, rows, cols, c)


@pytest.mark.parametrize("strided", [False, True], ids=["stride1", "stride2"])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_natten_translation_exports_the_fused_node(exporter, strided, tmp_path):
    import warnings

    from attnc.compiler.export import export_onnx
    from attnc.passes import neighborhood as na_pass

    torch.manual_seed(0)
    model = _NattenBlock(strided).eval()
    grid = (9, 11) if strided else (7, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, (torch.randn(2, *grid, 16),), tmp_path / "m.onnx", exporter=exporter,
                    dynamic_axes={"x": {0: "batch"}}, input_names=["x"])
    exported = onnx.load(str(tmp_path / "m.onnx"))
    assert [n.op_type for n in exported.graph.node if n.domain == "attnc"] == [na.OP_TYPE]
    fused, _ = na_pass.apply(exported)
    onnx.checker.check_model(fused)
    node = next(n for n in fused.graph.node if n.op_type == na.OP_TYPE)
    stride = next(list(a.ints) for a in node.attribute if a.name == "stride")
    assert stride == ([2, 2] if strided else [1, 1])
    for batch in (1, 3):
        x = torch.randn(batch, *grid, 16)
        got = ort.InferenceSession(fused.SerializeToString()).run(None, {"x": x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_patch_natten_swaps_and_restores(monkeypatch):
    import sys
    import types

    natten, functional = types.ModuleType("natten"), types.ModuleType("natten.functional")
    original = object()
    functional.na2d = original
    natten.functional = functional
    monkeypatch.setitem(sys.modules, "natten", natten)
    monkeypatch.setitem(sys.modules, "natten.functional", functional)
    with natten_compat.patch_natten() as found:
        assert found and functional.na2d is natten_compat.na2d and functional.na1d is natten_compat.na1d
        assert natten.na2d is natten_compat.na2d and natten.na3d is natten_compat.na3d   # top level too
    assert functional.na2d is original and not hasattr(functional, "na1d") and not hasattr(natten, "na2d")


def test_natten_positional_order_and_options():
    """NATTEN >= 0.20's order is (q, k, v, kernel_size, stride, dilation, is_causal, scale): a
    positional call must mean what it means to NATTEN. Performance options are ignored; what
    attnc cannot compute (neighborhood cross-attention) is refused, not approximated."""
    rng = np.random.default_rng(8)
    q, k, v = (torch.from_numpy(rng.standard_normal((2, 7, 9, 3, 4))) for _ in range(3))
    got = natten_compat.na2d(q, k, v, 3, 1, (1, 2), (True, False), 0.3, backend="cutlass-fna",
                             q_tile_shape=(8, 8), torch_compile=False)
    oracle = numpy_oracle(*(_heads_first(t.numpy()) for t in (q, k, v)), [3, 3], [1, 2], [1, 0], scale=0.3)
    np.testing.assert_allclose(got.numpy(), np.moveaxis(oracle, 1, -2), rtol=1e-10, atol=1e-12)
    same = natten_compat.na2d(q, k, v, kernel_size=3, stride=(1, 1), dilation=(1, 2), is_causal=(True, False),
                              scale=0.3)
    torch.testing.assert_close(same, got, rtol=0, atol=0)
    strided = natten_compat.na2d(q, k, v, 3, (2, 3), (1, 2), (True, False), 0.3)
    oracle = numpy_oracle(*(_heads_first(t.numpy()) for t in (q, k, v)), [3, 3], [1, 2], [1, 0], scale=0.3,
                          stride=[2, 3])
    np.testing.assert_allclose(strided.numpy(), np.moveaxis(oracle, 1, -2), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="1 <= stride <= kernel_size"):
        natten_compat.na2d(q, k, v, 3, (4, 1))
    with pytest.raises(NotImplementedError, match="additional_keys"):
        natten_compat.na2d(q, k, v, 3, additional_keys=k[:, :1, :1].flatten(1, 2),
                           additional_values=v[:, :1, :1].flatten(1, 2))
    with pytest.raises(TypeError, match="dilatoin"):
        natten_compat.na2d(q, k, v, 3, dilatoin=2)
