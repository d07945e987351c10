"""passes/linear.py: kernelized linear / lightning attention -> attnc::KernelLinearAttention.

Each test exports a PyTorch module, runs the pass, and checks ONNX Runtime after the pass
against ONNX Runtime before it and against PyTorch on fresh inputs (odd sizes, two
batch/sequence sizes for dynamic exports).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.testing import assert_spec_fusion_preserves_outputs, export_spec
from attnc.models.linear import LightningAttention, LinearAttention
from attnc.models.mhsa import MultiHeadSelfAttention
from attnc.models.projections import merge_heads
from attnc.passes import fuse_attention, linear

DYN = {"x": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}
OP = "KernelLinearAttention"


def _export(module, x, tmp_path, exporter="torchscript", dynamic=False, opset=18):
    path = export_onnx(module.eval(), (x,), tmp_path / f"m_{exporter}_{opset}.onnx", exporter=exporter, opset=opset,
                       dynamic_axes=DYN if dynamic else None, input_names=["x"])
    return onnx.load(path)


def _count(model, op_type):
    return sum(n.op_type == op_type for n in model.graph.node)


def _check(module, model, fused, report, shapes, n_fused=1, op_type=OP, rtol=1e-5, atol=1e-6):
    assert report.rewritten == n_fused, report.to_dict()
    assert _count(fused, op_type) == n_fused
    assert len(fused.graph.node) < len(model.graph.node) or op_type != OP
    onnx.checker.check_model(fused)
    before, after = load(model), load(fused)
    gen = torch.Generator().manual_seed(4321)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen)
        got = after.infer({"x": x.numpy()})["output"]
        np.testing.assert_allclose(got, before.infer({"x": x.numpy()})["output"], rtol=rtol, atol=atol)
        with torch.no_grad():
            np.testing.assert_allclose(got, module(x).numpy(), rtol=rtol, atol=atol)


CASES = [
    ("dynamo", dict(feature_map="elu1"), dict(feature_map="elu1", causal=0, normalize=1, form="right")),
    ("dynamo", dict(feature_map="elu1", causal=True), dict(causal=1, normalize=1, form="cumsum")),
    ("torchscript", dict(feature_map="relu", causal=True, causal_form="masked"),
     dict(feature_map="relu", causal=1, normalize=1, form="quadratic")),
    ("torchscript", dict(feature_map="relu", normalize=False, fused_qkv=False),
     dict(feature_map="relu", causal=0, normalize=0)),
    ("torchscript", dict(feature_map="identity", normalize=False, causal=True),
     dict(feature_map="identity", causal=1, normalize=0, form="cumsum")),
]


@pytest.mark.parametrize("exporter,kwargs,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_linear_attention_dynamic_axes(exporter, kwargs, expected, tmp_path):
    torch.manual_seed(0)
    module = LinearAttention(32, 4, **kwargs)
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    fused, report = linear.apply(model)
    attrs = report.matches[0].attributes
    assert {k: attrs[k] for k in expected} == expected
    _check(module, model, fused, report, [(2, 7, 32), (3, 11, 32)], atol=2e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_lightning_attention_decay_from_exp_arithmetic(exporter, tmp_path):
    torch.manual_seed(1)
    module = LightningAttention(32, 4)
    model = _export(module, torch.randn(2, 9, 32), tmp_path, exporter, dynamic=True)
    fused, report = linear.apply(model)
    decay = report.matches[0].attributes["decay"]
    np.testing.assert_allclose(decay, torch.exp(-module.slope).numpy(), rtol=1e-6)
    _check(module, model, fused, report, [(2, 9, 32), (1, 13, 32)], rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_lightning_lowered_to_onnx_linear_attention(exporter, tmp_path):
    torch.manual_seed(2)
    module = LightningAttention(32, 4)
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    fused, report = linear.apply(model, lower_lightning_to_onnx=True)
    assert next(o.version for o in fused.opset_import if o.domain == "") == 27
    node = next(n for n in fused.graph.node if n.op_type == "LinearAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["update_rule"] == b"gated" and attrs["scale"] == 1.0 and attrs["q_num_heads"] == 4
    assert not any(f.name == OP for f in fused.functions)
    _check(module, model, fused, report, [(2, 7, 32), (3, 12, 32)], op_type="LinearAttention", atol=5e-6)


def test_causal_no_decay_lowered_with_linear_update_rule(tmp_path):
    torch.manual_seed(2)
    module = LinearAttention(32, 4, feature_map="identity", normalize=False, causal=True, causal_form="masked")
    model = _export(module, torch.randn(2, 7, 32), tmp_path, "torchscript", dynamic=True)
    fused, report = linear.apply(model, lower_lightning_to_onnx=True)
    node = next(n for n in fused.graph.node if n.op_type == "LinearAttention")
    assert onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "update_rule")) == b"linear"
    _check(module, model, fused, report, [(2, 7, 32), (3, 12, 32)], op_type="LinearAttention", atol=5e-6)


# ----------------------------------------------------------------------------- hand-written variants

class _Variants(nn.Module):
    """Forms people write that models/linear.py does not: (φQφKᵀ)V with K permuted straight
    to [B, H, D, N], the sum-form normaliser with a scale on φ(Q), a constant decay table."""

    def __init__(self, form: str, dim=24, heads=3, n=6):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        lam = torch.tensor([0.5, 0.8, 0.95])[:heads]
        t = torch.arange(n)
        dist = (t[:, None] - t[None, :]).float()
        self.register_buffer("table", torch.where(dist >= 0, lam[:, None, None] ** dist.clamp(min=0), 0.0))

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).unbind(2)
        v = v.transpose(1, 2)
        if self.form == "left":
            q, k = torch.relu(q.transpose(1, 2)), torch.relu(k)    # k stays [B, N, H, D]
            s = q @ k.permute(0, 2, 3, 1)                            # straight to [B, H, D, N]
            return merge_heads((s @ v) / (s.sum(-1, keepdim=True) + 1e-4))
        if self.form == "sumnorm":
            q = (torch.nn.functional.elu(q.transpose(1, 2)) + 1) * 0.5
            kf = torch.nn.functional.elu(k.transpose(1, 2)) + 1
            out = q @ (kf.transpose(-2, -1) @ v)
            den = (q * kf.sum(dim=2, keepdim=True)).sum(-1, keepdim=True)
            return merge_heads(out / (den + 1e-6))
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        return merge_heads(((q @ k.transpose(-2, -1)) * self.table) @ v)   # "decay": constant table


@pytest.mark.parametrize("form,expected", [
    ("left", dict(feature_map="relu", normalize=1, causal=0, form="quadratic")),
    ("sumnorm", dict(feature_map="elu1", normalize=1, causal=0, form="right", scale=0.5)),
    ("decay", dict(feature_map="identity", normalize=0, causal=1, form="quadratic")),
])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_handwritten_variants(form, expected, exporter, tmp_path):
    torch.manual_seed(3)
    module = _Variants(form)
    model = _export(module, torch.randn(2, 6, 24), tmp_path, exporter)
    fused, report = linear.apply(model)
    attrs = report.matches[0].attributes
    assert {k: attrs[k] for k in expected} == expected
    if form == "decay":
        np.testing.assert_allclose(attrs["decay"], [0.5, 0.8, 0.95], rtol=1e-6)
    _check(module, model, fused, report, [(2, 6, 24), (2, 6, 24)], atol=2e-6)


@pytest.mark.parametrize("opset", [17, 21, 23])
def test_opsets(opset, tmp_path):
    torch.manual_seed(4)
    module = LinearAttention(24, 3, feature_map="elu1", causal=True, causal_form="masked")
    model = _export(module, torch.randn(1, 5, 24), tmp_path, "torchscript", opset=opset)
    fused, report = linear.apply(model)
    assert next(o.version for o in fused.opset_import if o.domain == "") == opset
    _check(module, model, fused, report, [(1, 5, 24)])


# ----------------------------------------------------------------------------- near-misses

class _WrongMask(nn.Module):
    """Quadratic linear attention whose mask/decay is not causal: must not be fused."""

    def __init__(self, kind, n=6):
        super().__init__()
        self.kind, self.qkv = kind, nn.Linear(16, 48)
        t = torch.arange(n)
        dist = (t[:, None] - t[None, :]).float()
        if kind == "window":       # sliding window of 3: not causal attention
            self.register_buffer("m", ((dist >= 0) & (dist < 3)).float())
        elif kind == "harmonic":   # 1/(1+t-s): decays, but not geometrically
            self.register_buffer("m", torch.where(dist >= 0, 1.0 / (1.0 + dist.clamp(min=0)), 0.0))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
        s = torch.relu(q) @ torch.relu(k).transpose(-2, -1)
        if self.kind == "data":    # mask read from the input values
            s = s * (x[:, None, :, :1] > 0).float().transpose(-2, -1)
        else:
            s = s * self.m
        return merge_heads(s @ v)


@pytest.mark.parametrize("kind,reason", [("window", "not a causal decay mask"),
                                         ("harmonic", "not a causal decay mask"),
                                         ("data", "reads input values")])
def test_near_misses(kind, reason, tmp_path):
    model = _export(_WrongMask(kind), torch.randn(2, 6, 16), tmp_path, "torchscript")
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and _count(fused, OP) == 0
    assert fused is model  # returned unchanged
    assert any(reason in nm.reason for nm in report.near_misses), report.to_dict()


def test_softmax_attention_is_not_linear_attention(tmp_path):
    model = _export(MultiHeadSelfAttention(16, 2, causal=True), torch.randn(1, 5, 16), tmp_path)
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and not report.near_misses
    assert _count(fused, "Softmax") == 1


def test_float16_export(tmp_path):
    torch.manual_seed(5)
    module = LinearAttention(32, 4, feature_map="relu", causal=True, causal_form="masked").half()
    model = _export(module, torch.randn(2, 6, 32).half(), tmp_path, "torchscript")
    fused, report = linear.apply(model)
    assert report.rewritten == 1
    x = torch.randn(2, 6, 32).half()
    got = load(fused).infer({"x": x.numpy()})["output"].astype(np.float32)
    np.testing.assert_allclose(got, load(model).infer({"x": x.numpy()})["output"].astype(np.float32),
                               rtol=1e-2, atol=5e-3)
    with torch.no_grad():
        np.testing.assert_allclose(got, module.float()(x.float()).numpy(), rtol=2e-2, atol=1e-2)


@settings(max_examples=6, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 7), fm=st.sampled_from(["elu1", "relu", "identity"]),
       causal=st.booleans(), form=st.sampled_from(["cumsum", "masked"]), normalize=st.booleans(),
       n=st.integers(2, 9), lightning=st.booleans())
def test_random_configs(heads, head_dim, fm, causal, form, normalize, n, lightning, tmp_path_factory):
    torch.manual_seed(heads * 10 + head_dim)
    dim = heads * head_dim
    if lightning:
        module = LightningAttention(dim, heads)
    else:
        module = LinearAttention(dim, heads, feature_map=fm, normalize=normalize and fm != "identity",
                                 causal=causal, causal_form=form)
    model = _export(module, torch.randn(2, n, dim), tmp_path_factory.mktemp("h"), "torchscript", dynamic=True)
    fused, report = linear.apply(model)
    _check(module, model, fused, report, [(2, n, dim), (1, n + 2, dim)], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- registry models

@pytest.mark.parametrize("name,n_fused", [("linear-elu-causal-small", 1), ("lm-lightning-small", 2),
                                          ("vit-linear-small", 2)])
def test_registry_models_through_pipeline(name, n_fused):
    spec, module, model = export_spec(name, "torchscript")
    fused, reports = fuse_attention(model, ["linear", "softmax"])
    assert reports[0].rewritten == n_fused and _count(fused, OP) == n_fused
    assert reports[1].rewritten == 0
    assert_spec_fusion_preserves_outputs(spec, module, model, fused)


# ----------------------------------------------------------------------------- flash-linear-attention

fla = pytest.importorskip("fla")


class _FlaModule(nn.Module):
    """[B, T, H, D] q/k/v from one projection, then one fla call."""

    def __init__(self, kind, heads=4, head_dim=8):
        super().__init__()
        self.kind, self.heads, self.head_dim = kind, heads, head_dim
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim)
        from attnc.plugins.linear.fla_compat import lightning_decay
        self.register_buffer("g_gamma", torch.log(lightning_decay(heads, 1, 4)))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        if self.kind == "naive_parallel_simple_gla":
            from fla.ops.simple_gla.naive import naive_parallel_simple_gla
            o, _ = naive_parallel_simple_gla(q, k, v, self.g_gamma.expand(b, t, self.heads))
        elif self.kind == "chunk_linear_attn":
            import fla.ops.linear_attn as fl
            # fla's layers apply the feature map before the op; elu+1 keeps the normaliser away from 0
            fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
            o, _ = fl.chunk_linear_attn(fq, fk, v, normalize=True)
        else:
            from fla.ops.lightning_attn import chunk_lightning_attn
            o, _ = chunk_lightning_attn(q, k, v, layer_idx=1, num_layers=4)
        return o.reshape(b, t, c)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_naive_parallel_simple_gla_is_fused(exporter, tmp_path):
    torch.manual_seed(6)
    module = _FlaModule("naive_parallel_simple_gla")
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter)
    fused, report = linear.apply(model)
    attrs = report.matches[0].attributes
    assert attrs["feature_map"] == "identity" and attrs["causal"] == 1 and attrs["scale"] == pytest.approx(8 ** -0.5)
    np.testing.assert_allclose(attrs["decay"], torch.exp(module.g_gamma).numpy(), rtol=1e-6)
    _check(module, model, fused, report, [(2, 7, 32)], atol=2e-6)


def _fla_reference(kind, module, x):
    """fla's own naive implementations (independent of attnc) on the module's projections."""
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn
    from fla.ops.simple_gla.naive import naive_parallel_simple_gla
    b, t, c = x.shape
    q, k, v = module.qkv(x).view(b, t, 3, module.heads, module.head_dim).unbind(2)
    if kind == "chunk_linear_attn":
        fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        o, _ = naive_recurrent_linear_attn(fq, fk, v, normalize=True)
    else:
        o, _ = naive_parallel_simple_gla(q, k, v, module.g_gamma.expand(b, t, module.heads))
    return o.reshape(b, t, c)


@pytest.mark.parametrize("kind", ["chunk_linear_attn", "chunk_lightning_attn"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_translation_exports_fused_node(kind, exporter, tmp_path):
    from attnc.plugins.linear.fla_compat import translate_fla
    torch.manual_seed(7)
    module = _FlaModule(kind).eval()
    with translate_fla():
        model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    # export_onnx attaches the function body itself, so the exported model already runs.
    assert _count(model, OP) == 1 and len(model.functions) == 1
    fused, _ = linear.apply(model)
    assert len(fused.functions) == 1
    onnx.checker.check_model(fused)
    session = load(fused)
    for shape in ((2, 7, 32), (3, 10, 32)):
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = _fla_reference(kind, module, x).numpy()
            with translate_fla():
                eager = module(x).numpy()
        np.testing.assert_allclose(eager, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(session.infer({"x": x.numpy()})["output"], expected, rtol=1e-4, atol=1e-5)
    import fla.ops.linear_attn as fl
    assert fl.chunk_linear_attn.__module__.startswith("fla")  # restored on exit


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_linear_attention_layer_exports_fused_node(exporter, tmp_path):
    """fla.layers.LinearAttention (hedgehog feature map, fla normaliser) through translate_fla.

    ``output_norm="identity"``: fla's RMSNorm is a Triton kernel with no CPU path.
    Under ``no_grad`` with T <= 64 the layer calls ``fused_recurrent_linear_attn``.
    """
    from fla.layers import LinearAttention as FlaLinearAttention

    from attnc.plugins.linear.fla_compat import translate_fla

    torch.manual_seed(8)
    layer = FlaLinearAttention(mode="chunk", hidden_size=32, num_heads=4, feature_map="hedgehog",
                               output_norm="identity", do_feature_map_norm=True)

    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return self.layer(x)[0]

    module = First().eval()
    x = torch.randn(2, 8, 32)
    with translate_fla():
        model = _export(module, x, tmp_path, exporter)
        with torch.no_grad():
            expected = module(x).numpy()
    fused, _ = linear.apply(model)
    assert _count(fused, OP) == 1
    node = next(n for n in fused.graph.node if n.op_type == OP)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["causal"] == 1 and attrs["normalize"] == 1 and attrs["feature_map"] == b"identity"
    np.testing.assert_allclose(load(fused).infer({"x": x.numpy()})["output"], expected, rtol=1e-4, atol=1e-5)
