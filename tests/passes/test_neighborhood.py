"""Neighborhood-attention fusion: export, fuse, and compare ORT before / after / PyTorch.

Models: the registry's NA specs (masked and gather forms, 1-D / 2-D / 3-D, dilation, causal, RPB,
dynamic grid), 3-D (video) grids of ``NeighborhoodAttention3D`` in both forms, static and dynamic,
an independent masked NA written here from the NATTEN docs (hypothesis sweeps), a
NAT (NATTEN <= 0.17) style ``NeighborhoodAttention2D`` with ``natten2dqkrpb`` / ``natten2dav``
written in the masked form, lucidrains' ``local-attention`` and near-miss variants.
"""

from __future__ import annotations

import copy
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.models.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnc.models.projections import merge_heads
from attnc.models.registry import get_spec
from attnc.passes import fuse_attention
from attnc.passes import neighborhood as na_pass
from attnc.passes.core import collapse_flat_transposes
from attnc.plugins import neighborhood as na_plugin
from attnc.testing import export_spec

logging.getLogger("attnc").setLevel(logging.ERROR)
OP = na_plugin.OP_TYPE


def _export(model, inputs, tmp_path, exporter="torchscript", opset=18, dynamic_axes=None, names=None):
    path = tmp_path / f"m-{exporter}-{opset}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(model, inputs, path, exporter=exporter, opset=opset, dynamic_axes=dynamic_axes,
                    input_names=names)
    return onnx.load(str(path))


def _run(model, feeds):
    return load(model, providers=["CPUExecutionProvider"]).session.run(None, feeds)[0]


def _fused_count(model) -> int:
    return sum(n.op_type == OP and n.domain == "attnc" for n in model.graph.node)


def _check_fused(model, onnx_model, input_sets, n_fused=1, rtol=1e-5, atol=1e-6, names=("x",), float64=False):
    """Fuse, then compare ORT after vs before vs PyTorch (and PyTorch in float64 with ``float64``)."""
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == n_fused, report.to_dict()
    assert _fused_count(fused) == n_fused
    assert len(fused.graph.node) < len(onnx_model.graph.node)
    matched = {name for m in report.matches for name in m.nodes}
    assert not [n.name for n in fused.graph.node if n.op_type in ("Softmax", "Exp") and n.name in matched]
    onnx.checker.check_model(fused)
    model64 = copy.deepcopy(model).double() if float64 else None
    for inputs in input_sets:
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        before, after = _run(onnx_model, feeds), _run(fused, feeds)
        with torch.no_grad():
            expected = model(*inputs).float().numpy()
        np.testing.assert_allclose(after, before, rtol=rtol, atol=atol)
        np.testing.assert_allclose(after, expected, rtol=rtol, atol=atol)
        if model64 is not None:
            with torch.no_grad():
                exact = model64(*(t.double() for t in inputs)).numpy()
            np.testing.assert_allclose(after, exact, rtol=rtol, atol=atol)
    return fused, report


def _spec_case(name, tmp_path, exporter, opset=18):
    spec, model, onnx_model = export_spec(name, exporter, opset=opset)
    sizes = [dict(batch=1), dict(batch=3)]
    if "seq" in spec.dynamic:
        sizes = [dict(batch=1, seq=23), dict(batch=3, seq=41)]
    if "height" in spec.dynamic:
        sizes = [dict(batch=1, height=7, width=13), dict(batch=2, height=12, width=9)]
    inputs = [spec.example_inputs(seed=i + 1, **s) for i, s in enumerate(sizes)]
    return model, onnx_model, inputs, spec


NA_SPECS = ["na1d-small", "na1d-gather-small", "na1d-causal-small", "na1d-causal-gather-small", "na2d-small",
            "na2d-gather-small", "na2d-rpb-small", "na2d-rpb-gather-small", "na2d-causal-small",
            "na2d-dynamic-small", "na3d-small", "na2d-strided-small"]
EXPECTED = {  # spec -> (kernel_size, dilation, is_causal)
    "na1d-small": ([7], [1], [0]), "na1d-gather-small": ([5], [2], [0]), "na1d-causal-small": ([7], [1], [1]),
    "na1d-causal-gather-small": ([5], [3], [1]), "na2d-small": ([5, 5], [1, 1], [0, 0]),
    "na2d-gather-small": ([3, 3], [2, 3], [0, 0]), "na2d-rpb-small": ([5, 5], [1, 1], [0, 0]),
    "na2d-rpb-gather-small": ([5, 3], [1, 1], [0, 0]), "na2d-causal-small": ([3, 3], [1, 1], [1, 0]),
    "na2d-dynamic-small": ([3, 3], [2, 2], [0, 0]), "na3d-small": ([3, 3, 3], [1, 2, 1], [1, 0, 0]),
    "na2d-strided-small": ([5, 3], [1, 2], [0, 0]),
}


@pytest.mark.parametrize("name", NA_SPECS)
def test_registry_models_torchscript(name, tmp_path):
    model, onnx_model, inputs, spec = _spec_case(name, tmp_path, "torchscript")
    fused, report = _check_fused(model, onnx_model, inputs, names=spec.input_names)
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == EXPECTED[name]
    # a static grid selects the overload whose index tensors ONNX Runtime can constant-fold
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert node.overload.endswith("_static") == (spec.dynamic == ("batch",))
    assert attrs["scale"] == pytest.approx(model.scale)


@pytest.mark.parametrize("name", ["na1d-causal-small", "na2d-rpb-small", "na2d-rpb-gather-small",
                                  "na2d-dynamic-small", "na3d-small", "na2d-strided-small"])
def test_registry_models_dynamo(name, tmp_path):
    model, onnx_model, inputs, spec = _spec_case(name, tmp_path, "dynamo")
    _check_fused(model, onnx_model, inputs, names=spec.input_names)


@pytest.mark.parametrize("name", ["vit-neighborhood-small", "lm-neighborhood-small"])
def test_two_block_models(name, tmp_path):
    model, onnx_model, inputs, spec = _spec_case(name, tmp_path, "torchscript")
    _check_fused(model, onnx_model, inputs, n_fused=2, names=spec.input_names)


@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), ("torchscript", 20), ("dynamo", 23)])
def test_opsets(exporter, opset, tmp_path):
    model, onnx_model, inputs, spec = _spec_case("na2d-causal-small", tmp_path, exporter, opset)
    _check_fused(model, onnx_model, inputs, names=spec.input_names)


def test_fp16_export(tmp_path):
    spec = get_spec("na2d-rpb-small")
    model = spec.factory().eval().half()
    x = spec.example_inputs(batch=2, seed=0)[0].half()
    onnx_model = _export(model, (x,), tmp_path, "torchscript", 18, spec.dynamic_axes, ["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 1 and _fused_count(fused) == 1
    xs = spec.example_inputs(batch=3, seed=5)[0]
    before, after = _run(onnx_model, {"x": xs.half().numpy()}), _run(fused, {"x": xs.half().numpy()})
    with torch.no_grad():
        expected = spec.factory().eval()(xs).numpy()  # fp32 PyTorch
    np.testing.assert_allclose(after.astype(np.float32), expected, atol=5e-3, rtol=1e-2)
    np.testing.assert_allclose(after.astype(np.float32), before.astype(np.float32), atol=5e-3, rtol=1e-2)


def test_pipeline_runs_the_pass(tmp_path):
    model, onnx_model, inputs, spec = _spec_case("na2d-rpb-small", tmp_path, "torchscript")
    fused, reports = fuse_attention(onnx_model, ["neighborhood"])
    assert _fused_count(fused) == 1 and reports[0].family == "neighborhood"
    assert na_pass.find(onnx_model).matches[0].shapes["grid"] == [9, 11]


# ----------------------------------------------------------------------------- independent models

def _oracle_mask(grid, kernel, dilation, causal, stride=None):
    """Allowed [N, N] from the NATTEN docs' centre formula: per-axis key sets with Python loops; a key
    is allowed when each of its coordinates (row-major ``unravel_index``) is in the query's set. With
    ``stride`` (NATTEN >= 0.20) a query uses the window of its block's leader, causal keys never after
    the query."""
    def keys(i, n, k, d, c, step):
        g, p = i % d, i // d
        m = len(range(g, n, d))
        block = (p // step) * step
        if c:
            leader = min(block + step - 1, m - 1)
            return {g + d * s for s in range(max(0, leader - k + 1), p + 1)}
        leader = min(block + step // 2, m - 1)
        left, right = k // 2, k // 2 + k % 2 - 1
        centre = min(max(leader, left), m - 1 - right)
        return {g + d * s for s in range(centre - left, centre + right + 1)}
    coords = np.unravel_index(np.arange(int(np.prod(grid))), grid)
    allowed = np.ones((len(coords[0]),) * 2, dtype=bool)
    for a, (n, k, d, c, step) in enumerate(zip(grid, kernel, dilation, causal, stride or [1] * len(grid))):
        axis = np.array([[j in keys(i, n, k, d, c, step) for j in range(n)] for i in range(n)])
        allowed &= axis[coords[a][:, None], coords[a][None, :]]
    return allowed


class MaskedNA(nn.Module):
    """NA written the way people without NATTEN do: separate q/k/v, scale after the matmul, mask buffer."""

    def __init__(self, dim, heads, grid, kernel, dilation, causal, scale_after=True, manual_softmax=False,
                 stride=None, sdpa=None):
        super().__init__()
        self.heads, self.grid, self.scale_after, self.manual_softmax = heads, grid, scale_after, manual_softmax
        self.sdpa = sdpa   # "bool" / "float": F.scaled_dot_product_attention with the window as its attn_mask
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        mask = _oracle_mask(grid, kernel, dilation, causal, stride)
        self.register_buffer("mask", torch.zeros(mask.shape).masked_fill(torch.from_numpy(~mask), float("-inf")))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        if self.sdpa:
            mask = self.mask == 0 if self.sdpa == "bool" else self.mask
            return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, c)
        s = (c // self.heads) ** -0.5
        scores = (q @ k.transpose(-1, -2)) * s if self.scale_after else (q * s) @ k.transpose(-1, -2)
        scores = scores + self.mask
        if self.manual_softmax:  # exports as ReduceMax / Sub / Exp / ReduceSum / Div
            e = (scores - scores.amax(-1, keepdim=True)).exp()
            probs = e / e.sum(-1, keepdim=True)
        else:
            probs = scores.softmax(-1)
        out = probs @ v
        return out.transpose(1, 2).reshape(b, n, c)


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_random_masked_configs(tmp_path_factory, data):
    ndim = data.draw(st.sampled_from([1, 2]))
    kernel = [data.draw(st.sampled_from([1, 3, 5])) for _ in range(ndim)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(ndim)]
    grid = tuple(k * d + data.draw(st.integers(0, 3)) for k, d in zip(kernel, dilation))
    causal = [int(data.draw(st.booleans())) for _ in range(ndim)]
    heads = data.draw(st.sampled_from([1, 2]))
    allowed = _oracle_mask(grid, kernel, dilation, causal)
    torch.manual_seed(0)
    model = MaskedNA(8 * heads, heads, grid, kernel, dilation, causal, data.draw(st.booleans())).eval()
    n = int(np.prod(grid))
    onnx_model = _export(model, (torch.randn(2, n, 8 * heads),), tmp_path_factory.mktemp("m"),
                         dynamic_axes={"x": {0: "batch"}}, names=["x"])
    if allowed.all() or (allowed[np.tril_indices(len(allowed))].all() and not np.triu(allowed, 1).any()):
        # the window covers the whole grid: plain (causal) attention, left to the softmax pass
        report = na_pass.find(onnx_model)
        assert not report.matches and "plain" in report.near_misses[0].reason
        return
    _check_fused(model, onnx_model, [(torch.randn(1, n, 8 * heads),), (torch.randn(3, n, 8 * heads),)])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_decomposed_softmax_and_scale_on_scores(exporter, tmp_path):
    torch.manual_seed(0)
    model = MaskedNA(16, 2, (6, 7), [3, 5], [2, 1], [0, 1], scale_after=True, manual_softmax=True).eval()
    onnx_model = _export(model, (torch.randn(2, 42, 16),), tmp_path, exporter, dynamic_axes={"x": {0: "batch"}},
                         names=["x"])
    _, report = _check_fused(model, onnx_model, [(torch.randn(1, 42, 16),), (torch.randn(3, 42, 16),)])
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == ([3, 5], [2, 1], [0, 1])
    assert report.matches[0].shapes["grid"] == [6, 7]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("mask", ["bool", "float"])
def test_written_with_scaled_dot_product_attention(exporter, mask, tmp_path):
    """NA as ``F.scaled_dot_product_attention`` with the window as its mask: the dynamo exporter's
    decomposition adds a NaN guard after the softmax (absorbed: no window is empty) and transposes K
    through a flattened batch."""
    torch.manual_seed(0)
    model = MaskedNA(16, 2, (7, 6), [3, 5], [2, 1], [0, 1], sdpa=mask).eval()
    onnx_model = _export(model, (torch.randn(2, 42, 16),), tmp_path, exporter, dynamic_axes={"x": {0: "batch"}},
                         names=["x"])
    collapse_flat_transposes(onnx_model)   # as fuse_attention does before every pass
    fused, report = _check_fused(model, onnx_model, [(torch.randn(1, 42, 16),), (torch.randn(3, 42, 16),)])
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == ([3, 5], [2, 1], [0, 1])
    assert not any(n.op_type in ("IsNaN", "Softmax") for n in fused.graph.node)


def test_rows_longer_than_a_query_block(tmp_path):
    torch.manual_seed(0)
    model = MaskedNA(16, 2, (3, 37), [3, 5], [1, 2], [1, 0]).eval()
    onnx_model = _export(model, (torch.randn(2, 111, 16),), tmp_path, dynamic_axes={"x": {0: "batch"}}, names=["x"])
    _check_fused(model, onnx_model, [(torch.randn(1, 111, 16),), (torch.randn(2, 111, 16),)])


def natten2dqkrpb(q, k, rpb, kernel, dilation):
    """NATTEN <= 0.17 ``natten2dqkrpb`` as dense masked scores (q, k: [B, heads, H, W, D])."""
    b, h, rows, cols, d = q.shape
    # int(): under tracing the sizes are traced values; the mask is a constant of the static grid.
    allowed, rel = na_plugin.dense_mask_and_rel((int(rows), int(cols)), [kernel] * 2, [dilation] * 2)
    flat = torch.from_numpy(rel[..., 0] * (2 * kernel - 1) + rel[..., 1])
    bias = rpb.reshape(h, -1)[:, flat].masked_fill(~torch.from_numpy(allowed), float("-inf"))
    return q.reshape(b, h, rows * cols, d) @ k.reshape(b, h, rows * cols, d).transpose(-1, -2) + bias


def natten2dav(attn, v):
    b, h, rows, cols, d = v.shape
    return (attn @ v.reshape(b, h, rows * cols, d)).reshape(b, h, rows, cols, d)


class NATNeighborhoodAttention2D(nn.Module):
    """The NAT / NATTEN <= 0.17 module: qkv Linear, rpb [heads, 2k-1, 2k-1], channels-last x [B, H, W, C]."""

    def __init__(self, dim, num_heads, kernel_size, dilation=1):
        super().__init__()
        self.num_heads, self.kernel_size, self.dilation = num_heads, kernel_size, dilation
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.rpb = nn.Parameter(torch.randn(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1) * 0.1)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, rows, cols, c = x.shape
        qkv = self.qkv(x).reshape(b, rows, cols, 3, self.num_heads, self.head_dim).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = q * self.scale
        attn = natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
        x = natten2dav(attn, v).permute(0, 2, 3, 1, 4).reshape(b, rows, cols, c)
        return self.proj(x)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_nat_style_module(exporter, tmp_path):
    torch.manual_seed(0)
    model = NATNeighborhoodAttention2D(32, 2, 5, dilation=2).eval()
    x = torch.randn(2, 11, 12, 32)
    onnx_model = _export(model, (x,), tmp_path, exporter, dynamic_axes={"x": {0: "batch"}}, names=["x"])
    _, report = _check_fused(model, onnx_model, [(torch.randn(1, 11, 12, 32),), (torch.randn(3, 11, 12, 32),)])
    attrs = report.matches[0].attributes
    assert attrs["kernel_size"] == [5, 5] and attrs["dilation"] == [2, 2]


class EinsumNA(MaskedNA):
    """The masked NA above with its two products written as ``torch.einsum`` (exported as Einsum)."""

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (f(x).view(b, n, self.heads, -1).permute(0, 2, 1, 3) for f in (self.q, self.k, self.v))
        scores = torch.einsum("bhid,bhjd->bhij", q * (c // self.heads) ** -0.5, k) + self.mask
        out = torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)
        return out.transpose(1, 2).reshape(b, n, c)


def test_masked_na_written_with_einsum(tmp_path):
    torch.manual_seed(0)
    model = EinsumNA(16, 2, (5, 6), [3, 3], [1, 2], [0, 1]).eval()
    onnx_model = _export(model, (torch.randn(2, 30, 16),), tmp_path, dynamic_axes={"x": {0: "batch"}}, names=["x"])
    _, report = _check_fused(model, onnx_model, [(torch.randn(1, 30, 16),), (torch.randn(3, 30, 16),)])
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == ([3, 3], [1, 2], [0, 1])


# ----------------------------------------------------------------------------- 3-D (video) grids

NA3D = {  # id -> (grid, NeighborhoodAttention3D options, impl, dynamic axes of x, exporters)
    "masked-odd-grid": ((3, 5, 7), dict(kernel_size=(3, 3, 5)), "masked", (), ("torchscript",)),
    "masked-dilated-rpb": ((5, 7, 6), dict(kernel_size=3, dilation=(1, 2, 2), rpb=True), "masked", (),
                           ("torchscript", "dynamo")),
    "masked-causal-time-dynamic-frames": ((4, 6, 5), dict(kernel_size=3, dilation=(1, 2, 1),
                                                          is_causal=(True, False, False), rpb=True),
                                          "masked", (1,), ("torchscript", "dynamo")),
    "masked-dynamic-grid": ((4, 5, 6), dict(kernel_size=(3, 3, 5), is_causal=(False, False, True)), "masked",
                            (1, 2, 3), ("torchscript",)),
    "gather-causal-rpb": ((5, 4, 6), dict(kernel_size=(3, 3, 5), is_causal=(True, True, False), rpb=True),
                          "gather", (), ("torchscript", "dynamo")),
    "gather-dilated-dynamic-grid": ((4, 5, 6), dict(kernel_size=3, dilation=(1, 1, 2),
                                                    is_causal=(False, True, False)),
                                    "gather", (1, 2, 3), ("torchscript", "dynamo")),
}


def _na3d_case(case, exporter, tmp_path):
    grid, options, impl, dynamic, _ = NA3D[case]
    torch.manual_seed(0)
    model = NeighborhoodAttention3D(16, 2, impl=impl, **options).eval()
    if model.rpb is not None:
        with torch.no_grad():
            model.rpb.normal_(0, 0.5)  # visible next to the scores (init std is 0.02)
    axes = {0: "batch", **{a: ("frames", "height", "width")[a - 1] for a in dynamic}}
    onnx_model = _export(model, (torch.randn(2, *grid, 16),), tmp_path, exporter,
                         dynamic_axes={"x": axes, "output": axes}, names=["x"])
    other = tuple(n + (-1, 2, 1)[a] if a + 1 in dynamic else n for a, n in enumerate(grid))
    return model, onnx_model, [(torch.randn(1, *grid, 16),), (torch.randn(3, *other, 16),)]


@pytest.mark.parametrize("case,exporter", [(c, e) for c, v in NA3D.items() for e in v[-1]])
def test_3d_grids(case, exporter, tmp_path):
    """One NeighborhoodAttention node with the module's parameters; ORT equals PyTorch (float32 and
    float64) at the export grid and, for a dynamic grid, at another grid."""
    model, onnx_model, inputs = _na3d_case(case, exporter, tmp_path)
    fused, report = _check_fused(model, onnx_model, inputs, float64=True)
    assert not [n for n in fused.graph.node if n.op_type == "Softmax"]
    match = report.matches[0]
    attrs = match.attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == (
        list(model.kernel_size), list(model.dilation), [int(c) for c in model.is_causal])
    assert attrs["scale"] == pytest.approx(model.scale)
    grid, dynamic = NA3D[case][0], NA3D[case][3]
    assert match.shapes["grid"] == [["x", a + 1] if a + 1 in dynamic else n for a, n in enumerate(grid)]
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert node.overload == na_plugin.overload_name(3, model.rpb is not None, static_grid=not dynamic)


@pytest.mark.parametrize("case,attribute,wrong", [
    ("masked-odd-grid", "kernel_size", [3, 3, 3]), ("masked-odd-grid", "kernel_size", [1, 3, 5]),
    ("masked-dilated-rpb", "dilation", [1, 1, 2]), ("masked-dilated-rpb", "is_causal", [1, 0, 0]),
])
def test_3d_comparison_catches_a_wrong_fused_node(case, attribute, wrong, tmp_path):
    """The comparison the 3-D tests make fails when the fused node has one wrong attribute."""
    model, onnx_model, inputs = _na3d_case(case, "torchscript", tmp_path)
    fused, _ = _check_fused(model, onnx_model, inputs)
    node = next(n for n in fused.graph.node if n.op_type == OP)
    next(a for a in node.attribute if a.name == attribute).ints[:] = wrong
    x = inputs[1][0]
    with torch.no_grad():
        expected = model(x).numpy()
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        np.testing.assert_allclose(_run(fused, {"x": x.numpy()}), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_3d_mask_written_without_natten(exporter, tmp_path):
    """A 3-D mask buffer from the NATTEN docs' formula on flat tokens [B, T*H*W, C] (scale after the
    matmul, decomposed softmax) fuses into a node on the T x H x W grid."""
    torch.manual_seed(0)
    model = MaskedNA(16, 2, (4, 6, 5), [3, 3, 3], [1, 2, 1], [1, 0, 0], manual_softmax=True).eval()
    onnx_model = _export(model, (torch.randn(2, 120, 16),), tmp_path, exporter, dynamic_axes={"x": {0: "batch"}},
                         names=["x"])
    _, report = _check_fused(model, onnx_model, [(torch.randn(1, 120, 16),), (torch.randn(3, 120, 16),)],
                             float64=True)
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"]) == ([3, 3, 3], [1, 2, 1], [1, 0, 0])
    assert report.matches[0].shapes["grid"] == [4, 6, 5]


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_3d_masks_are_proven_exactly(data):
    """``analyse_bias`` on random 3-D neighborhood masks (+ RPB): it recovers the configuration, and
    the bias rebuilt from what it found is the input, entry for entry."""
    kernel = [data.draw(st.sampled_from([1, 3, 5])) for _ in range(3)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(3)]
    grid = tuple(max(2, k * d + data.draw(st.integers(0, 2))) for k, d in zip(kernel, dilation))
    causal = [int(data.draw(st.booleans())) for _ in range(3)]
    allowed = _oracle_mask(grid, kernel, dilation, causal)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    table = rng.normal(size=(2, *(2 * k - 1 for k in kernel)))
    _, rel = na_plugin.dense_mask_and_rel(grid, kernel, dilation, causal)
    bias = np.where(allowed, table[(slice(None), *np.moveaxis(rel, -1, 0))], -np.inf)
    if allowed.all() or (allowed[np.tril_indices(len(allowed))].all() and not np.triu(allowed, 1).any()):
        with pytest.raises(na_pass._Mismatch, match="plain"):
            na_pass.analyse_bias(bias)
        return
    found = na_pass.analyse_bias(bias)
    if min(kernel) > 1:  # a kernel-1 axis can merge into a neighbour as a dilation: same mask, other grid
        assert (found.grid, found.kernel_size, found.dilation, found.is_causal) == (grid, kernel, dilation, causal)
    again, rel = na_plugin.dense_mask_and_rel(found.grid, found.kernel_size, found.dilation, found.is_causal)
    rebuilt = np.where(again, found.rpb[(slice(None), *np.moveaxis(rel, -1, 0))], -np.inf)
    np.testing.assert_array_equal(rebuilt, bias)


# ----------------------------------------------------------------------------- strided NA (NATTEN >= 0.20)

_BOTH = ("torchscript", "dynamo")
# Every stride here is the smallest giving its windows (on 4 rows, kernel 3, strides 1 and 2 give the same
# ones, and the pass reports the smaller), so the fused node must carry the module's stride.
STRIDED = {  # id -> (module class, grid, options, impl, dynamic grid axes of x, exporters)
    "1d-masked-dilated-even": (NeighborhoodAttention1D, (13,), dict(kernel_size=5, dilation=2, stride=2), "masked",
                               (), _BOTH),
    "1d-gather-causal-stride-is-kernel": (NeighborhoodAttention1D, (14,), dict(kernel_size=5, is_causal=True,
                                                                               stride=5), "gather", (), _BOTH),
    "2d-masked-dilated-causal": (NeighborhoodAttention2D, (9, 11), dict(kernel_size=(3, 5), dilation=(2, 1),
                                                                        is_causal=(True, False), stride=(3, 2)),
                                 "masked", (), _BOTH),
    "2d-gather-odd": (NeighborhoodAttention2D, (7, 9), dict(kernel_size=3, dilation=(1, 2), stride=(2, 3)), "gather",
                      (), _BOTH),
    "2d-masked-dynamic-grid": (NeighborhoodAttention2D, (9, 11), dict(kernel_size=(3, 5), stride=(2, 5)), "masked",
                               (1, 2), ("torchscript",)),
    "3d-masked-causal-time": (NeighborhoodAttention3D, (4, 5, 7), dict(kernel_size=(3, 3, 5), stride=(2, 3, 4),
                                                                       is_causal=(True, False, False)),
                              "masked", (), ("torchscript",)),
    "3d-gather-dilated": (NeighborhoodAttention3D, (5, 5, 7), dict(kernel_size=3, dilation=(1, 1, 2),
                                                                   stride=(3, 2, 1)), "gather", (), ("dynamo",)),
}


def _strided_case(case, exporter, tmp_path):
    cls, grid, options, impl, dynamic, _ = STRIDED[case]
    torch.manual_seed(0)
    model = cls(16, 2, impl=impl, **options).eval()
    names = ("frames", "height", "width")[-len(grid):]
    axes = {0: "batch", **{a: names[a - 1] for a in dynamic}}
    onnx_model = _export(model, (torch.randn(2, *grid, 16),), tmp_path, exporter,
                         dynamic_axes={"x": axes, "output": axes}, names=["x"])
    other = tuple(n + (2, -1, 1)[a] if a + 1 in dynamic else n for a, n in enumerate(grid))
    return model, onnx_model, [(torch.randn(1, *grid, 16),), (torch.randn(3, *other, 16),)]


def _op_reference(model, x: torch.Tensor) -> np.ndarray:
    """The module's projections around the op's float64 ``reference`` (dense masked attention)."""
    m = copy.deepcopy(model).double()
    grid = x.shape[1:-1]
    with torch.no_grad():
        q, k, v = m.in_proj(x.double().reshape(x.shape[0], -1, x.shape[-1]))
        q, k, v = (t.reshape(*t.shape[:2], *grid, t.shape[-1]) for t in (q, k, v))
        out = na_plugin.reference(q, k, v, list(m.kernel_size), list(m.dilation), [int(c) for c in m.is_causal],
                                  m.scale, stride=list(m.stride))
        return m.proj(merge_heads(out.reshape(*out.shape[:2], -1, out.shape[-1]))).reshape(x.shape).numpy()


def _node_attr(node, name):
    return list(next(a for a in node.attribute if a.name == name).ints)


@pytest.mark.parametrize("case,exporter", [(c, e) for c, v in STRIDED.items() for e in v[-1]])
def test_strided(case, exporter, tmp_path):
    """A strided module (masked or gather form) fuses into one node with the module's stride; ORT
    equals PyTorch (float32 and float64) and the op's float64 reference, also at another grid size."""
    model, onnx_model, inputs = _strided_case(case, exporter, tmp_path)
    fused, report = _check_fused(model, onnx_model, inputs, float64=True)
    attrs = report.matches[0].attributes
    assert (attrs["kernel_size"], attrs["dilation"], attrs["is_causal"], attrs["stride"]) == (
        list(model.kernel_size), list(model.dilation), [int(c) for c in model.is_causal], list(model.stride))
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert _node_attr(node, "stride") == list(model.stride)
    assert node.overload.endswith("_static") == (not STRIDED[case][4])
    for (x,) in inputs:
        np.testing.assert_allclose(_run(fused, {"x": x.numpy()}), _op_reference(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["2d-masked-dilated-causal", "1d-gather-causal-stride-is-kernel"])
def test_strided_comparison_catches_a_wrong_stride(case, tmp_path):
    """The strided comparison fails when the fused node carries stride 1 or a smaller stride."""
    model, onnx_model, inputs = _strided_case(case, "torchscript", tmp_path)
    fused, _ = _check_fused(model, onnx_model, inputs)
    node = next(n for n in fused.graph.node if n.op_type == OP)
    stride = next(a for a in node.attribute if a.name == "stride")
    x = inputs[1][0]
    with torch.no_grad():
        expected = model(x).numpy()
    for wrong in ([1] * len(stride.ints), [max(1, s - 1) for s in model.stride]):
        stride.ints[:] = wrong
        with pytest.raises(AssertionError, match="Not equal to tolerance"):
            np.testing.assert_allclose(_run(fused, {"x": x.numpy()}), expected, rtol=1e-5, atol=1e-6)


def test_stride_one_reports_no_stride(tmp_path):
    """Stride 1 everywhere (here with a kernel-1 axis) keeps today's report (no ``stride`` key) and
    node (stride all 1)."""
    torch.manual_seed(0)
    model = NeighborhoodAttention2D(16, 2, kernel_size=(1, 3), stride=(1, 1)).eval()
    onnx_model = _export(model, (torch.randn(2, 5, 7, 16),), tmp_path, dynamic_axes={"x": {0: "batch"}},
                         names=["x"])
    fused, report = _check_fused(model, onnx_model, [(torch.randn(1, 5, 7, 16),), (torch.randn(3, 5, 7, 16),)])
    assert "stride" not in report.matches[0].attributes
    assert _node_attr(next(n for n in fused.graph.node if n.op_type == OP), "stride") == [1] * len(
        report.matches[0].attributes["kernel_size"])


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_strided_masks_are_proven_exactly(data):
    """``analyse_bias`` on random strided 1-D/2-D/3-D masks from the oracle: the stride it recovers
    is the smallest one giving the same mask, and the mask rebuilt from what it found is the input."""
    ndim = data.draw(st.integers(1, 3))
    kernel = [data.draw(st.sampled_from([3, 5])) for _ in range(ndim)]
    dilation = [data.draw(st.integers(1, 2)) for _ in range(ndim)]
    stride = [data.draw(st.integers(1, k)) for k in kernel]
    grid = tuple(k * d + data.draw(st.integers(0, 4)) for k, d in zip(kernel, dilation))
    causal = [int(data.draw(st.booleans())) for _ in range(ndim)]
    allowed = _oracle_mask(grid, kernel, dilation, causal, stride)
    if allowed.all() or (allowed[np.tril_indices(len(allowed))].all() and not np.triu(allowed, 1).any()):
        return  # the window covers the whole grid: plain (causal) attention
    found = na_pass.analyse_bias(np.where(allowed, 0.0, -np.inf)[None])
    assert found.rpb is None
    again = na_plugin.dense_mask_and_rel(found.grid, found.kernel_size, found.dilation, found.is_causal,
                                         found.stride)[0]
    np.testing.assert_array_equal(again, allowed)
    if found.grid == grid:
        smallest = [next(t for t in range(1, s + 1) if np.array_equal(
            _oracle_mask((n,), [k], [d], [c], [t]), _oracle_mask((n,), [k], [d], [c], [s])))
            for n, k, d, c, s in zip(grid, kernel, dilation, causal, stride)]
        assert (found.kernel_size, found.dilation, found.is_causal, found.stride) == (
            kernel, dilation, causal, smallest)


def test_near_miss_on_strided_mask_with_a_bias(tmp_path):
    """A strided mask with finite non-zero entries (an RPB-like bias): the op has no RPB with a stride."""
    model = MaskedNA(16, 2, (5, 7), [3, 3], [1, 1], [0, 0], stride=[2, 3]).eval()
    model.mask[model.mask == 0] = 0.25
    onnx_model = _export(model, (torch.randn(2, 35, 16),), tmp_path, names=["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0 and fused is onnx_model
    assert "refuses a relative positional bias with a stride" in report.near_misses[0].reason, report.to_dict()
    model.mask[model.mask == 0.25] = 0.0  # the same mask without the bias fuses
    onnx_model = _export(model, (torch.randn(2, 35, 16),), tmp_path, names=["x"])
    assert na_pass.find(onnx_model).matches[0].attributes["stride"] == [2, 3]


# ----------------------------------------------------------------------------- near-misses

class SharedMaskStack(nn.Module):
    """Three :class:`MaskedNA` layers (residual) reading one mask tensor, as a transformers export's decoder layers
    read one causal mask."""

    def __init__(self, *args, layers: int = 3, block: type = MaskedNA):
        super().__init__()
        self.layers = nn.ModuleList(block(*args) for _ in range(layers))
        for layer in self.layers[1:]:
            layer.mask = self.layers[0].mask

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


@pytest.mark.parametrize("block", ["na", "wrong"])
def test_layers_sharing_a_mask_are_proven_once(block, tmp_path, monkeypatch):
    """Layers that read one mask tensor have it proven once per sampled size (the rest take copies of the proof): each
    layer fuses and the stack computes what it did, or each gets the same near-miss when the mask is no
    neighborhood's."""
    calls = []
    analyse = na_pass.analyse_bias
    monkeypatch.setattr(na_pass, "analyse_bias", lambda bias: calls.append(bias.shape) or analyse(bias))
    model = SharedMaskStack(16, 2, (5, 6), [3, 3], [1, 1], [0, 0], block=MaskedNA if block == "na" else WrongMaskNA)
    onnx_model = _export(model.eval(), (torch.randn(2, 30, 16),), tmp_path, names=["x"])
    masks = [i for i in onnx_model.graph.initializer if list(i.dims) == [30, 30]]
    assert len(masks) == 1   # the export keeps one mask tensor
    if block == "na":
        _check_fused(model, onnx_model, [(torch.randn(2, 30, 16),) for _ in range(2)], n_fused=3)
    else:
        fused, report = na_pass.apply(onnx_model)
        assert report.rewritten == 0 and len(report.near_misses) == 3
        assert len({m.reason for m in report.near_misses}) == 1 and "not a neighborhood mask" in \
            report.near_misses[0].reason
    assert len(calls) == 1   # a constant mask: one sample, one proof for the three layers


class WrongMaskNA(MaskedNA):
    """A neighborhood mask with one extra key allowed: looks like NA, is not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.mask[3, 17] = 0.0


def test_near_miss_on_corrupted_mask(tmp_path):
    model = WrongMaskNA(16, 2, (5, 6), [3, 3], [1, 1], [0, 0]).eval()
    onnx_model = _export(model, (torch.randn(2, 30, 16),), tmp_path, names=["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0 and fused is onnx_model
    assert report.near_misses and "not a neighborhood mask" in report.near_misses[0].reason


@pytest.mark.parametrize("allow", [True, False])
def test_near_miss_on_3d_mask_with_one_flipped_entry(allow, tmp_path):
    """One key allowed or masked too many on a 3-D mask: unchanged, and the reason names the query
    and the grid the mask nearly is a neighborhood on."""
    model = MaskedNA(16, 2, (4, 6, 5), [3, 3, 3], [1, 2, 1], [1, 0, 0]).eval()
    query = 66  # (2, 1, 1): key 61 (2, 0, 1) is on the other row sub-grid (dilation 2), key 36 (1, 1, 1) is not
    assert model.mask[query, 61] == float("-inf") and model.mask[query, 36] == 0
    model.mask[query, 61 if allow else 36] = 0.0 if allow else float("-inf")
    onnx_model = _export(model, (torch.randn(2, 120, 16),), tmp_path, names=["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0 and fused is onnx_model
    reason = report.near_misses[0].reason
    assert "not a neighborhood mask on any 1-D, 2-D or 3-D grid of 120 tokens" in reason, reason
    assert f"query {query} sees {9 * 3 + (1 if allow else -1)} keys" in reason, reason
    assert "grid (4, 6, 5) with kernel [3, 3, 3], dilation [1, 2, 1], causal [1, 0, 0]" in reason, reason


def test_near_miss_on_dynamic_frames_too_large_to_sample(tmp_path):
    """A mask computed from dynamic frames of a large static plane: too many tokens to evaluate densely
    even at the small sampled sizes, so a near-miss (before any N x N tensor is computed)."""
    torch.manual_seed(0)
    model = NeighborhoodAttention3D(8, 1, kernel_size=3, is_causal=(True, False, False)).eval()
    onnx_model = _export(model, (torch.randn(1, 3, 32, 32, 8),), tmp_path,
                         dynamic_axes={"x": {0: "batch", 1: "frames"}}, names=["x"])
    report = na_pass.find(onnx_model)
    assert not report.matches
    assert "tokens even at the small sampled sizes" in report.near_misses[0].reason


def test_near_miss_on_rpb_that_is_not_relative(tmp_path):
    model = MaskedNA(16, 2, (5, 6), [3, 3], [1, 1], [0, 0]).eval()
    model.mask[0, 1] = 0.5  # an absolute-position bias on one pair: not a function of the offset
    onnx_model = _export(model, (torch.randn(2, 30, 16),), tmp_path, names=["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0
    assert "not a relative positional bias" in report.near_misses[0].reason


def test_plain_attention_left_alone(tmp_path):
    model = MaskedNA(16, 2, (5, 6), [3, 3], [1, 1], [0, 0]).eval()
    model.mask.zero_()
    onnx_model = _export(model, (torch.randn(2, 30, 16),), tmp_path, names=["x"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0 and "allows every key" in report.near_misses[0].reason


class LocalAttn(nn.Module):
    def __init__(self, **options):
        super().__init__()
        from local_attention import LocalAttention

        self.attn = LocalAttention(**{"use_rotary_pos_emb": False, **options})

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def _local_attention_allowed(n, **options):
    v = torch.eye(n)[None, None]
    with torch.no_grad():
        a = LocalAttn(**options).eval()(torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8), v)[0, 0]
    return (a > 0).numpy()


def test_local_attention_semantics():
    """Blocked local attention is NA only when causal (look_forward=0): with exact_windowsize=True
    causal NA with k = w*lb + 1; by default (blocks) strided causal NA with k = w*(lb + 1), s = w."""
    n = 24
    for options in [dict(window_size=4, causal=False, look_backward=1, look_forward=1),
                    dict(window_size=3, causal=False, look_backward=1, look_forward=1, exact_windowsize=True)]:
        allowed = _local_attention_allowed(n, **options)
        with pytest.raises(na_pass._Mismatch):
            na_pass.analyse_bias(np.where(allowed, 0.0, -np.inf)[None])
    allowed = _local_attention_allowed(n, window_size=4, causal=True, look_backward=1, exact_windowsize=True)
    found = na_pass.analyse_bias(np.where(allowed, 0.0, -np.inf)[None])
    assert (found.grid, found.kernel_size, found.is_causal, found.stride) == ((n,), [5], [1], [1])
    for window, back in [(4, 1), (3, 2), (2, 3)]:
        allowed = _local_attention_allowed(n, window_size=window, causal=True, look_backward=back)
        found = na_pass.analyse_bias(np.where(allowed, 0.0, -np.inf)[None])
        assert (found.grid, found.kernel_size, found.is_causal, found.stride) == (
            (n,), [window * (back + 1)], [1], [window])


def test_plain_causal_mask_is_left_to_the_softmax_pass():
    """A causal mask that allows every earlier key is plain causal attention, which the softmax
    pass turns into a native ``Attention`` (is_causal); reading it as NA with k = N would not help."""
    n = 12
    causal = np.where(np.tril(np.ones((n, n), bool)), 0.0, -np.inf)[None]
    with pytest.raises(na_pass._Mismatch, match="plain causal"):
        na_pass.analyse_bias(causal)
    causal[0, n - 1, 0] = -np.inf   # the last query misses its first key: a causal window of n - 1
    assert na_pass.analyse_bias(causal).kernel_size == [n - 1]


def test_a_mask_with_fewer_queries_than_keys_is_no_neighborhood():
    """A generation step's causal mask over its cache and its new tokens (3 queries, 10 keys, each query
    seeing the 7 cached keys and the new ones up to itself) is a near-miss, not a crash."""
    past, new = 7, 3
    allowed = np.arange(past + new)[None, :] <= past + np.arange(new)[:, None]
    with pytest.raises(na_pass._Mismatch, match="3 queries by 10 keys"):
        na_pass.analyse_bias(np.where(allowed, 0.0, -np.inf)[None])


def test_local_attention_matches_the_op_reference():
    """The NA-equivalent configuration computes the op's reference exactly (float64), also with autopad
    on lengths that are no multiple of the window (down to the kernel size, the op's minimum), and
    w = 1 without exact_windowsize."""
    from local_attention import LocalAttention

    torch.manual_seed(0)
    for window, back, length, exact in [(4, 2, 22, True), (4, 2, 9, True), (3, 1, 31, True), (1, 3, 17, False)]:
        attn = LocalAttention(window_size=window, causal=True, look_backward=back, exact_windowsize=exact,
                              autopad=True, use_rotary_pos_emb=False)
        q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64) for _ in range(3))
        expected = na_plugin.reference(q, k, v, [window * back + 1], [1], [1])
        torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-12, atol=1e-12)
    # Its default blocks (exact_windowsize=False) on lengths that are multiples of the window:
    # strided causal NA, kernel w * (lb + 1), stride w.
    for window, back, length in [(4, 1, 24), (3, 2, 30), (2, 3, 18)]:
        attn = LocalAttention(window_size=window, causal=True, look_backward=back, use_rotary_pos_emb=False)
        q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64) for _ in range(3))
        expected = na_plugin.reference(q, k, v, [window * (back + 1)], [1], [1], stride=[window])
        torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-12, atol=1e-12)


LOCAL_NA = {  # id -> (options, example shape, dynamic token axis or None, token lengths to check)
    "heads-first-autopad-dynamic": (dict(window_size=4, look_backward=2, exact_windowsize=True, autopad=True),
                                    (2, 2, 22, 8), 2, [22, 9, 33]),
    "flat-heads-autopad-dynamic": (dict(window_size=3, look_backward=2, exact_windowsize=True, autopad=True),
                                   (4, 20, 8), 1, [20, 7, 31]),
    "heads-first-static": (dict(window_size=4, look_backward=1, exact_windowsize=True), (2, 2, 24, 8), None, [24]),
    "dynamic-without-autopad": (dict(window_size=4, look_backward=1, exact_windowsize=True), (2, 2, 24, 8), 2,
                                [24, 32, 8]),
    "window-1-not-exact": (dict(window_size=1, look_backward=3), (3, 16, 8), None, [16]),
    # the default blocks: strided causal NA (kernel w * (lb + 1), stride w)
    "blocks-heads-first-static": (dict(window_size=4, look_backward=1), (2, 2, 24, 8), None, [24]),
    "blocks-flat-heads-static": (dict(window_size=3, look_backward=2), (4, 21, 8), None, [21]),
}


@pytest.mark.parametrize("case", list(LOCAL_NA))
def test_local_attention_na_config_fuses(case, tmp_path):
    options, shape, axis, lengths = LOCAL_NA[case]
    torch.manual_seed(0)
    model = LocalAttn(causal=True, **options).eval()
    names = ["q", "k", "v"]
    dynamic = {n: {axis: "seq"} for n in names} if axis is not None else None
    onnx_model = _export(model, tuple(torch.randn(shape) for _ in names), tmp_path, "dynamo", names=names,
                         dynamic_axes=dynamic)
    sized = [shape[:-2] + (n,) + shape[-1:] for n in lengths]
    inputs = [tuple(torch.randn(s) for _ in names) for s in sized]
    _, report = _check_fused(model, onnx_model, inputs, names=names)
    attrs = report.matches[0].attributes
    window, back = options["window_size"], options["look_backward"]
    if options.get("exact_windowsize") or window == 1:
        assert attrs["kernel_size"] == [window * back + 1] and attrs.get("stride", [1]) == [1]
    else:
        assert attrs["kernel_size"] == [window * (back + 1)] and attrs["stride"] == [window]
    assert attrs["is_causal"] == [1] and attrs["dilation"] == [1]
    assert attrs["scale"] == pytest.approx(shape[-1] ** -0.5)


@pytest.mark.parametrize("options,reason", [
    (dict(window_size=4, causal=False, look_backward=1, look_forward=1), "not a neighborhood mask"),
    (dict(window_size=3, causal=False, look_backward=1, look_forward=1, exact_windowsize=True),
     "not a neighborhood mask"),  # clipped at the borders: NA shifts its window there
    (dict(window_size=4, causal=True, look_backward=1, exact_windowsize=True, use_rotary_pos_emb=True, dim=8),
     "computed by"),  # rotary embeddings rotate the buckets
])
def test_local_attention_other_configs_are_left_alone(options, reason, tmp_path):
    model = LocalAttn(**options).eval()
    q, k, v = (torch.randn(2, 2, 24, 8) for _ in range(3))
    # TorchScript cannot export its look-around (Unfold of a padded tensor); dynamo can.
    onnx_model = _export(model, (q, k, v), tmp_path, "dynamo", names=["q", "k", "v"])
    fused, report = na_pass.apply(onnx_model)
    assert report.rewritten == 0 and fused is onnx_model
    assert report.near_misses and reason in report.near_misses[0].reason, report.to_dict()
    feeds = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(_run(fused, feeds), model(q, k, v).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,exporter", [("vlm-small", "dynamo"), ("vlm-small", "torchscript"),
                                           ("na2d-dynamic-small", "dynamo"), ("lm-neighborhood-small", "dynamo")])
def test_token_counts_from_inferred_shapes_equal_the_computed_ones(name, exporter):
    """The evaluator reads a query's token count at a sample from its inferred shape where that is a sum of input
    dims and constants (a VLM's ``text + 16``), instead of running every layer in front of it; the count equals the
    one computed from zero inputs at every sample (a grid's product of dims is computed; all queries' counts in one
    run give the same), and the VLM's dynamo export takes the inferred path."""
    _, _, model = export_spec(name, exporter)
    matcher = na_pass._Matcher(model)
    queries = []
    for node in model.graph.node:
        softmax = matcher.softmax_of(node)
        if softmax is not None:
            try:
                queries.append(matcher.match(softmax, node.name).q)
            except na_pass._Mismatch:
                continue
    assert queries
    ev = matcher.eval
    together = na_pass._Matcher(model).eval   # every query's count computed in one run per sample
    inferred = 0
    for sample in range(len(na_pass._SAMPLES)):
        together.compute_tokens(queries, sample)
    for q in queries:
        dim = ev.shapes[q][-2]
        inferred += isinstance(dim, int) or all(t.strip().isdigit() or t.strip() in ev.dynamic_dims
                                                for t in str(dim).split("+"))
        for sample in range(len(na_pass._SAMPLES)):
            computed = int(ev.values([q + na_pass._SHAPE], sample, probes=(q,))[0][-2])
            assert ev.tokens(q, sample) == computed == together.tokens(q, sample), (q, sample, dim)
    assert inferred == len(queries) or (name, exporter) != ("vlm-small", "dynamo")
