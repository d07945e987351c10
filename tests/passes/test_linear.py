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

@pytest.fixture
def fla():
    """flash-linear-attention, imported before the test exports (``translate_fla`` patches it only once it
    is imported), or the test skips: without fla only these tests skip, not the whole module."""
    return pytest.importorskip("fla")


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
def test_fla_naive_parallel_simple_gla_is_fused(exporter, tmp_path, fla):
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


def test_nested_fla_translations_keep_the_outer_symbolics(tmp_path, fla):
    """export_onnx enters translate_fla itself, usually inside a caller's block: leaving the
    inner block must leave the outer one's TorchScript symbolics registered."""
    from torch.onnx import _internal

    from attnc.plugins.linear.fla_compat import translate_fla

    registry = _internal.torchscript_exporter.registration.registry
    torch.manual_seed(7)
    module = _FlaModule("chunk_lightning_attn").eval()
    with translate_fla():
        with translate_fla():
            pass
        assert registry.is_registered_op("attnc::kernel_linear_attention", 9)
        model = _export(module, torch.randn(2, 7, 32), tmp_path, "torchscript", dynamic=True)
    assert _count(model, OP) == 1
    assert not registry.is_registered_op("attnc::kernel_linear_attention", 9)


def test_an_export_without_fla_does_not_import_it():
    """translate_fla patches fla only once a model imported it: importing fla (10-40 s here) for
    every export, as each did before, made every ``attnc export`` and CLI test pay for it. The
    decode step calls attnc's own custom op, whose TorchScript symbolic must be there without fla
    (this test process imported fla, so only a fresh one shows that)."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from attnc.testing import export_spec\n"
            "_, _, model = export_spec('lm-lightning-decode-small', 'torchscript')\n"
            "print([n.op_type for n in model.graph.node].count('KernelLinearAttention'))\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fla', 'natten')))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-2:] == ["2", "[]"]


@pytest.mark.parametrize("kind", ["chunk_linear_attn", "chunk_lightning_attn"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_translation_exports_fused_node(kind, exporter, tmp_path, fla):
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
def test_fla_linear_attention_layer_exports_fused_node(exporter, tmp_path, fla):
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


# ----------------------------------------------------------------------------- recurrent state (prefill / decode)

def _numpy_fla(q, k, v, scale, s0=None, z0=None, normalize=False, decay=None):
    """fla's semantics (``[B, T, H, D]``) as a float64 recurrence written from fla's source:
    o_t = scale·q_t·S_t, S_t = λ S_{t-1} + k_t v_tᵀ (S_{-1} = s0); with ``normalize`` divided by
    scale·q_t·(z0 + Σ_{s≤t} k_s) + 1e-10. Returns (o, S_T, z_T [B, 1, H, D])."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t_len, h, d = q.shape
    lam = np.ones(h) if decay is None else np.asarray(decay, np.float64)
    s = np.zeros((b, h, d, v.shape[-1])) if s0 is None else np.asarray(s0, np.float64).copy()
    z = np.zeros((b, h, d)) if z0 is None else np.asarray(z0, np.float64)[:, 0].copy()
    o = np.zeros((b, t_len, h, v.shape[-1]))
    for t in range(t_len):
        s = lam[None, :, None, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        o[:, t] = scale * np.einsum("bhd,bhdv->bhv", q[:, t], s)
        if normalize:
            o[:, t] /= scale * np.einsum("bhd,bhd->bh", q[:, t], z)[..., None] + 1e-10
    return o, s, z[:, None]


class _FlaStep(nn.Module):
    """One fla call with an explicit state in and out (what a decode step exports)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, s, z=None):
        if self.kind == "chunk_linear_attn":           # normalize=True: state (kv, z)
            import fla.ops.linear_attn as fl
            o, (s2, z2) = fl.chunk_linear_attn(q, k, v, initial_state=(s, z), output_final_state=True)
            return o, s2, z2
        if self.kind == "fused_recurrent_linear_attn":
            import fla.ops.linear_attn as fl
            return fl.fused_recurrent_linear_attn(q, k, v, scale=0.3, initial_state=s, output_final_state=True)
        import fla.ops.lightning_attn as fa
        op = fa.chunk_lightning_attn if self.kind == "chunk_lightning_attn" else fa.fused_recurrent_lightning_attn
        return op(q, k, v, layer_idx=1, num_layers=4, initial_state=s, output_final_state=True)


FLA_STEP_KINDS = ["chunk_linear_attn", "fused_recurrent_linear_attn", "chunk_lightning_attn",
                  "fused_recurrent_lightning_attn"]


def _fla_inputs(kind, b, t, h, d, dv, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, d, generator=gen), torch.randn(b, t, h, d, generator=gen)
    if kind == "chunk_linear_attn":   # fla's layers apply a positive feature map before a normalised op
        q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    return q, k, torch.randn(b, t, h, dv, generator=gen)


def _fla_expected(kind, q, k, v, s0=None, z0=None):
    from attnc.plugins.linear.fla_compat import lightning_decay
    d = q.shape[-1]
    if kind == "chunk_linear_attn":
        return _numpy_fla(q, k, v, d ** -0.5, s0, z0, normalize=True)
    if kind == "fused_recurrent_linear_attn":
        return _numpy_fla(q, k, v, 0.3, s0)
    return _numpy_fla(q, k, v, d ** -0.5, s0, decay=lightning_decay(q.shape[2], 1, 4).double().numpy())


@pytest.mark.parametrize("kind", FLA_STEP_KINDS)
def test_fla_state_translation_eager_matches_numpy(kind, fla):
    from attnc.plugins.linear.fla_compat import translate_fla
    b, t, h, d, dv = 2, 7, 3, 5, 4
    q, k, v = _fla_inputs(kind, b, t, h, d, dv, seed=21)
    s0 = torch.randn(b, h, d, dv)
    z0 = torch.rand(b, 1, h, d) + 0.5
    with torch.no_grad(), translate_fla():
        got = _FlaStep(kind)(q, k, v, s0, z0)
    expected = _fla_expected(kind, q, k, v, s0, z0)
    assert len(got) == (3 if kind == "chunk_linear_attn" else 2)
    assert got[1].dtype == torch.float32 and tuple(got[1].shape) == (b, h, d, dv)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-5)


def test_fla_normalised_state_forms(fla):
    """fla's normalised ops: a plain tensor state is kv with z = 0, (None, z) is z alone, and the
    result carries z even without output_final_state (fla's chunk ops return (None, z) then)."""
    import fla.ops.linear_attn as fl
    from fla.ops.linear_attn.naive import naive_recurrent_linear_attn

    from attnc.plugins.linear.fla_compat import translate_fla
    q, k, v = _fla_inputs("chunk_linear_attn", 1, 6, 2, 3, 5, seed=22)
    s0, z0 = torch.randn(1, 2, 3, 5), torch.rand(1, 1, 2, 3) + 0.5
    scale = 3 ** -0.5
    with torch.no_grad(), translate_fla():
        o, (s_none, z) = fl.fused_chunk_linear_attn(q, k, v, initial_state=s0)
        np.testing.assert_allclose(o.numpy(), _numpy_fla(q, k, v, scale, s0, None, True)[0], rtol=1e-5, atol=1e-6)
        assert s_none is None
        np.testing.assert_allclose(z.numpy(), k.sum(1, keepdim=True).numpy(), rtol=1e-6)
        o, (s1, z1) = fl.fused_recurrent_linear_attn(q, k, v, initial_state=(None, z0), output_final_state=True,
                                                     normalize=True)
        expected = _numpy_fla(q, k, v, scale, None, z0, True)
        for g, e in zip((o, s1, z1), expected):
            np.testing.assert_allclose(g.numpy(), e, rtol=1e-5, atol=1e-6)
        # fla's own naive recurrence agrees where it returns the state
        o, (s2, z2) = fl.chunk_linear_attn(q, k, v, initial_state=(s0, z0), output_final_state=True)
    o_fla, (s_fla, z_fla) = naive_recurrent_linear_attn(q, k, v, initial_state=(s0, z0), output_final_state=True,
                                                         normalize=True)
    for g, e in ((o, o_fla), (s2, s_fla), (z2, z_fla)):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)


def test_fla_state_refusals(fla):
    import fla.ops.lightning_attn as fa
    import fla.ops.linear_attn as fl

    from attnc.plugins.linear.fla_compat import translate_fla
    q = torch.randn(1, 4, 2, 3)
    with translate_fla():
        with pytest.raises(NotImplementedError, match="cu_seqlens"):
            fl.chunk_linear_attn(q, q, q, initial_state=torch.zeros(1, 2, 3, 3), cu_seqlens=torch.tensor([0, 4]))
        with pytest.raises(NotImplementedError, match="reverse"):
            fa.fused_recurrent_lightning_attn(q, q, q, 0, 2, reverse=True)
        with pytest.raises(TypeError, match="normalize=False"):
            fl.chunk_linear_attn(q, q, q, initial_state=(torch.zeros(1, 2, 3, 3), None), normalize=False)


def _export_fla_step(kind, exporter, tmp_path, b=2, h=3, d=5, dv=4):
    from attnc.plugins.linear.fla_compat import translate_fla
    q, k, v = _fla_inputs(kind, b, 5, h, d, dv, seed=23)
    names = ["q", "k", "v", "s"] + (["z"] if kind == "chunk_linear_attn" else [])
    outputs = ["o", "s_out"] + (["z_out"] if kind == "chunk_linear_attn" else [])
    args = (q, k, v, torch.zeros(b, h, d, dv)) + ((torch.zeros(b, 1, h, d),) if kind == "chunk_linear_attn" else ())
    dynamic = {n: {0: "batch", 1: "seq"} for n in ("q", "k", "v", "o")} | {n: {0: "batch"} for n in names[3:] + outputs[1:]}
    with translate_fla():
        path = export_onnx(_FlaStep(kind).eval(), args, tmp_path / f"{kind}_{exporter}.onnx", exporter=exporter,
                           input_names=names, output_names=outputs, dynamic_axes=dynamic)
    return onnx.load(path)


def _decode_in_pieces(session, kind, q, k, v, splits):
    """Run the exported step on [0, s1), [s1, s2), ... (first from a zero state); (o, state, z)."""
    b, _, h, d = q.shape
    s, z = np.zeros((b, h, d, v.shape[-1]), np.float32), np.zeros((b, 1, h, d), np.float32)
    outs = []
    bounds = [0, *splits, q.shape[1]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        feeds = {"q": q[:, lo:hi].numpy(), "k": k[:, lo:hi].numpy(), "v": v[:, lo:hi].numpy(), "s": s}
        if kind == "chunk_linear_attn":
            feeds["z"] = z
        run = session.infer(feeds)
        outs.append(run["o"])
        s, z = run["s_out"], run.get("z_out")
    return np.concatenate(outs, axis=1), s, z


@pytest.mark.parametrize("kind", FLA_STEP_KINDS)
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_state_exports_and_decodes(kind, exporter, tmp_path, fla):
    """One node with state in / state_out; through ONNX Runtime, prefill [0, m) + decode equals
    fla's semantics over [0, N) in one shot, for several m and token by token."""
    model = _export_fla_step(kind, exporter, tmp_path)
    nodes = [n for n in model.graph.node if n.op_type == OP]
    assert len(nodes) == 1 and len(nodes[0].input) == 5 and len(nodes[0].output) == 2
    fused, _ = linear.apply(model)
    assert nodes[0].overload.endswith("_state_in_out") or next(
        n for n in fused.graph.node if n.op_type == OP).overload.endswith("_state_in_out")
    onnx.checker.check_model(fused)
    session = load(fused)
    q, k, v = _fla_inputs(kind, 2, 37, 3, 5, 4, seed=24)
    expected = _fla_expected(kind, q, k, v)
    for splits in ([1], [16], [36], list(range(1, 37))):
        o, s, z = _decode_in_pieces(session, kind, q, k, v, splits)
        np.testing.assert_allclose(o, expected[0], rtol=1e-4, atol=1e-4, err_msg=f"splits {splits}")
        np.testing.assert_allclose(s, expected[1], rtol=1e-4, atol=1e-4 * np.abs(expected[1]).max())
        if kind == "chunk_linear_attn":
            np.testing.assert_allclose(z, expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fla_linear_attention_layer_decode_step(exporter, tmp_path, fla):
    """fla.layers.LinearAttention with its cache (``past_key_values``, ``use_cache=True``): the
    layer's recurrent_state (kv, z) goes in and out of one node; prefill + token-by-token decode
    through ONNX Runtime equals the layer's one-shot output."""
    from fla.layers import LinearAttention as FlaLinearAttention
    from fla.models.utils import Cache

    from attnc.plugins.linear.fla_compat import translate_fla

    torch.manual_seed(25)
    layer = FlaLinearAttention(mode="chunk", hidden_size=32, num_heads=4, feature_map="hedgehog",
                               output_norm="identity", do_feature_map_norm=True, layer_idx=0)

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, s, z):
            cache = Cache()
            cache.update(recurrent_state=(s, z), layer_idx=0, offset=0)
            o, _, cache = self.layer(x, past_key_values=cache, use_cache=True)
            s_out, z_out = cache[0]["recurrent_state"]
            return o, s_out, z_out

    module = Step().eval()
    s0, z0 = torch.zeros(2, 4, 16, 8), torch.zeros(2, 1, 4, 16)     # hedgehog doubles the key dim
    x = torch.randn(2, 11, 32)
    dynamic = {"x": {0: "batch", 1: "seq"}, "o": {0: "batch", 1: "seq"}} | {n: {0: "batch"} for n in ("s", "z")}
    with translate_fla():
        # a contiguous example: a sliced one exports its strides (aten.sym_stride has no ONNX function)
        path = export_onnx(module, (x[:, :3].contiguous(), s0, z0), tmp_path / "layer.onnx", exporter=exporter,
                           input_names=["x", "s", "z"], output_names=["o", "s_out", "z_out"], dynamic_axes=dynamic)
        with torch.no_grad():
            expected = module(x, s0, z0)
    fused, _ = linear.apply(onnx.load(path))
    assert [len(n.output) for n in fused.graph.node if n.op_type == OP] == [2]
    session = load(fused)
    s, z, outs = s0.numpy(), z0.numpy(), []
    for lo, hi in [(0, 6)] + [(t, t + 1) for t in range(6, 11)]:
        run = session.infer({"x": x[:, lo:hi].numpy(), "s": s, "z": z})
        outs.append(run["o"])
        s, z = run["s_out"], run["z_out"]
    np.testing.assert_allclose(np.concatenate(outs, axis=1), expected[0].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, expected[1].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z, expected[2].numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["chunk_lightning_attn", "fused_recurrent_linear_attn"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_fused_lightning_node_with_state_lowered_to_onnx_linear_attention(kind, exporter, tmp_path, fla):
    """--lower linear: a KernelLinearAttention node (fla's export) with state becomes ONNX
    LinearAttention with past_state / present_state; prefill + decode still equals one shot."""
    model = _export_fla_step(kind, exporter, tmp_path)
    lowered, report = linear.apply(model, lower_lightning_to_onnx=True)
    assert report.rewritten == 1 and report.matches[0].op_type == "LinearAttention", report.to_dict()
    assert _count(lowered, OP) == 0 and not any(f.name == OP for f in lowered.functions)
    node = next(n for n in lowered.graph.node if n.op_type == "LinearAttention")
    rule = onnx.helper.get_attribute_value(next(a for a in node.attribute if a.name == "update_rule"))
    assert rule == (b"gated" if kind == "chunk_lightning_attn" else b"linear")
    assert node.input[3] == "s" and node.output[1] == "s_out"
    assert next(o.version for o in lowered.opset_import if o.domain == "") == 27
    onnx.checker.check_model(lowered)
    session = load(lowered)
    q, k, v = _fla_inputs(kind, 2, 23, 3, 5, 4, seed=26)
    expected = _fla_expected(kind, q, k, v)
    for splits in ([9], list(range(1, 23))):
        o, s, _ = _decode_in_pieces(session, kind, q, k, v, splits)
        np.testing.assert_allclose(o, expected[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(s, expected[1], rtol=1e-4, atol=1e-4)


def test_lowering_fused_nodes_keeps_the_others_fused():
    """Of three fused nodes only the lightning one with a constant decay is lowered; the
    normalised one keeps its function overload, the one with a decay read from an input stays
    fused with a near-miss saying why. ONNX Runtime gives the same outputs before and after."""
    from onnx import TensorProto, helper, numpy_helper

    from attnc.plugins import linear as plugin

    h, d, dv = 3, 4, 5
    qkv = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", h, "n", dd]) for n, dd in
           (("Q", d), ("K", d), ("V", dv))]
    states = [helper.make_tensor_value_info(f"s{i}", TensorProto.FLOAT, ["b", h, d, dv + (i == 1)]) for i in range(3)]
    nodes = [plugin.make_node(["Q", "K", "V", "lam", "s0"], ["o0", "so0"], "lightning", feature_map="identity",
                              causal=1, normalize=0, scale=0.5),
             plugin.make_node(["Q", "K", "V", "lam", "s1"], ["o1", "so1"], "normalised", causal=1),
             plugin.make_node(["Q", "K", "V", "lam_in", "s2"], ["o2"], "input_decay", feature_map="identity",
                              causal=1, normalize=0)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in
            (("o0", ["b", h, "n", dv]), ("so0", ["b", h, d, dv]), ("o1", ["b", h, "n", dv]),
             ("so1", ["b", h, d, dv + 1]), ("o2", ["b", h, "n", dv]))]
    graph = helper.make_graph(nodes, "three", qkv + states + [helper.make_tensor_value_info("lam_in", TensorProto.FLOAT, [h])],
                              outs, initializer=[numpy_helper.from_array(np.array([0.9, 0.7, 0.5], np.float32), "lam")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    lowered, report = linear.apply(model, lower_lightning_to_onnx=True)
    assert report.rewritten == 1
    assert any("decay is not a constant" in nm.reason for nm in report.near_misses), report.to_dict()
    assert _count(lowered, "LinearAttention") == 1 and _count(lowered, OP) == 2
    assert sorted(f.overload for f in lowered.functions if f.name == OP) == ["elu1_state_in_out", "identity_state"]
    onnx.checker.check_model(lowered)
    rng = np.random.default_rng(27)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("Q", (2, h, 7, d)), ("K", (2, h, 7, d)), ("V", (2, h, 7, dv)), ("s0", (2, h, d, dv)),
              ("s1", (2, h, d, dv + 1)), ("s2", (2, h, d, dv)))}
    feeds["s1"][..., dv] = np.abs(feeds["s1"][..., dv]) + 1.0
    feeds["lam_in"] = np.array([0.9, 0.8, 0.6], np.float32)
    fused, _ = linear.apply(model)
    before, after = load(fused).infer(feeds), load(lowered).infer(feeds)
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-5, atol=1e-5, err_msg=name)


# ----------------------------------------------------------------------------- recurrent decode step in plain PyTorch

class _RecurrentStep(nn.Module):
    """One decode step ``S' = g ⊙ S + φ(k)ᵀv``, ``o = (φ(q)·scale)·S'`` in the spellings
    inference code uses; ``forward(q, k, v, s[, x])`` on ``[B, H, T, D]`` tensors.

    The gate ``g`` is the constant ``decay`` (per head, or one float), or with ``gate="head"``
    ``sigmoid(x @ W)`` per batch and head (``[B, H, 1, 1]``, x a ``[B, C]`` input), with
    ``gate="key"`` ``sigmoid(k @ W)`` per key dim (``[B, H, D, 1]``, GLA-style)."""

    def __init__(self, spelling, feature_map="identity", decay=(0.9, 0.75, 0.5), scale=1.0, gate=None):
        super().__init__()
        from attnc.models.linear import FEATURE_MAPS
        self.spelling, self.phi, self.scale, self.gate = spelling, FEATURE_MAPS[feature_map], scale, gate
        self.register_buffer("decay", None if decay is None or isinstance(decay, float) else torch.tensor(decay))
        self.scalar_decay = decay if isinstance(decay, float) else None
        gen = torch.Generator().manual_seed(3)
        size = {"head": (STEP_C, STEP_H), "key": (STEP_D, STEP_D)}.get(gate, (1, 1))
        self.w = nn.Parameter(torch.randn(*size, generator=gen))

    def forward(self, q, k, v, s, x=None):
        if self.gate == "head":
            carried = torch.sigmoid(x @ self.w)[:, :, None, None] * s
        elif self.gate == "key":
            carried = s * torch.sigmoid(k @ self.w).transpose(-1, -2)
        elif self.scalar_decay is not None:
            carried = self.scalar_decay * s
        elif self.decay is None:
            carried = s
        elif self.decay.dim() == 4:
            carried = s * self.decay
        elif self.spelling in ("matmul", "einsum"):
            carried = s * self.decay.view(1, -1, 1, 1)
        else:
            carried = self.decay[:, None, None] * s
        q, k = self.phi(q), self.phi(k)
        if self.scale != 1.0:
            q = q * self.scale
        if self.spelling == "matmul":
            kv = k.transpose(-1, -2) @ v
        elif self.spelling == "outer_sum":
            kv = (k.unsqueeze(-1) * v.unsqueeze(-2)).sum(2)
        elif self.spelling == "outer_squeeze":
            kv = (k.unsqueeze(-1) * v.unsqueeze(-2)).squeeze(2)
        elif self.spelling == "broadcast":
            kv = k.transpose(-1, -2) * v
        else:
            kv = torch.einsum("bhnd,bhne->bhde", k, v)
        s = carried + kv
        o = torch.einsum("bhnd,bhde->bhne", q, s) if self.spelling == "einsum" else q @ s
        return o, s


STEP_H, STEP_D, STEP_DV, STEP_C = 3, 5, 4, 6


def _step_args(b, t=1, dtype=torch.float32, seed=0, gate=None):
    gen = torch.Generator().manual_seed(seed)
    args = [torch.randn(b, STEP_H, t, STEP_D, generator=gen), torch.randn(b, STEP_H, t, STEP_D, generator=gen),
            torch.randn(b, STEP_H, t, STEP_DV, generator=gen), torch.randn(b, STEP_H, STEP_D, STEP_DV, generator=gen)]
    if gate == "head":
        args.append(torch.randn(b, STEP_C, generator=gen))
    return [a.to(dtype) for a in args]


def _export_step(module, exporter, tmp_path, t=1, dtype=torch.float32, dynamic_tokens=False):
    names = ["q", "k", "v", "s"] + (["x"] if module.gate == "head" else [])
    dynamic = {n: {0: "batch"} for n in names + ["o", "s_out"]}
    if dynamic_tokens:
        for n in ("q", "k", "v", "o"):
            dynamic[n][2] = "tokens"
    path = export_onnx(module.eval().to(dtype), _step_args(2, t, dtype, gate=module.gate),
                       tmp_path / f"step_{exporter}.onnx", exporter=exporter, input_names=names,
                       output_names=["o", "s_out"], dynamic_axes=dynamic)
    return onnx.load(path)


STEP_CASES = [  # spelling, feature map, decay, scale
    ("matmul", "identity", (0.9, 0.75, 0.5), 0.5),
    ("outer_sum", "elu1", (0.9, 0.75, 0.5), 1.0),
    ("outer_squeeze", "relu", None, 1.0),
    ("einsum", "relu", (0.95, 1.0, 0.25), STEP_D ** -0.5),
    ("broadcast", "identity", 0.875, 1.0),
]


@pytest.mark.parametrize("spelling,feature_map,decay,scale", STEP_CASES)
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_step_fuses_with_state(spelling, feature_map, decay, scale, exporter, tmp_path):
    """One fused node with ``state`` in and ``state_out`` out (the graph's names kept); ONNX
    Runtime equals the step in float64 on fresh inputs and states at batch 1 and 3 (D != Dv)."""
    module = _RecurrentStep(spelling, feature_map, decay, scale)
    model = _export_step(module, exporter, tmp_path)
    fused, report = linear.apply(model)
    assert report.rewritten == 1 and not report.near_misses, report.to_dict()
    assert [n.op_type for n in fused.graph.node] == [OP]
    node = fused.graph.node[0]
    assert list(node.input)[:3] == ["q", "k", "v"] and node.input[4] == "s" and list(node.output) == ["o", "s_out"]
    assert node.overload.endswith("_state_in_out")
    assert [o.name for o in fused.graph.output] == ["o", "s_out"]
    attrs = report.matches[0].attributes
    assert attrs["feature_map"] == feature_map and attrs["causal"] == 1 and attrs["normalize"] == 0
    assert attrs["form"] == "recurrent" and attrs["scale"] == pytest.approx(scale, rel=1e-6)
    lam = [decay] * STEP_H if isinstance(decay, float) else decay
    if lam is None or all(d == 1.0 for d in lam):
        assert "decay" not in attrs and not node.input[3]
    else:
        np.testing.assert_allclose(attrs["decay"], lam, rtol=1e-6)
    onnx.checker.check_model(fused)
    session = load(fused)
    reference = _RecurrentStep(spelling, feature_map, decay, scale).double()
    for b, seed in ((1, 11), (3, 12)):
        args = _step_args(b, seed=seed)
        got = session.infer({n: a.numpy() for n, a in zip("qkvs", args)})
        with torch.no_grad():
            want = reference(*(a.double() for a in args))
        for name, w in zip(("o", "s_out"), want):
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{name} at batch {b}")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_float16_state_is_cast_around_the_node(exporter, tmp_path):
    """A float16 step keeps its float16 graph; the op's float32 state is cast in and out."""
    module = _RecurrentStep("matmul", "elu1", (0.9, 0.75, 0.5), 0.5)
    model = _export_step(module, exporter, tmp_path, dtype=torch.float16)
    fused, report = linear.apply(model)
    assert report.rewritten == 1 and sorted(n.op_type for n in fused.graph.node) == ["Cast", "Cast", OP]
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert node.input[4] != "s" and node.output[1] != "s_out"
    onnx.checker.check_model(fused)
    args = _step_args(3, seed=13)
    got = load(fused).infer({n: a.half().numpy() for n, a in zip("qkvs", args)})
    with torch.no_grad():
        want = _RecurrentStep("matmul", "elu1", (0.9, 0.75, 0.5), 0.5).double()(*(a.half().double() for a in args))
    for name, w in zip(("o", "s_out"), want):
        assert got[name].dtype == np.float16
        np.testing.assert_allclose(got[name].astype(np.float64), w.numpy(), rtol=2e-3, atol=2e-3)


GATED_CASES = [  # gate (see _RecurrentStep), constant decay, spelling, feature map
    ("head", None, "matmul", "elu1"),           # sigmoid(x @ W): [B, H, 1, 1], read from an input
    ("key", None, "einsum", "relu"),            # sigmoid(k @ W)ᵀ: [B, H, D, 1] (GLA-style)
    (None, (0.9, 1.25, 0.5), "matmul", "identity"),  # a constant outside the op's (0, 1]
    (None, 1.25, "broadcast", "identity"),      # one constant for every head, outside (0, 1]
]


@pytest.mark.parametrize("gate,decay,spelling,feature_map", GATED_CASES)
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_gated_step_keeps_its_gate(gate, decay, spelling, feature_map, exporter, tmp_path):
    """A gate that is not the op's decay stays in the graph as its ``Mul``: over one token the
    step is the op with no decay and ``g ⊙ S`` as its state. ONNX Runtime equals the step in
    float64 at batch 1 and 3."""
    module = _RecurrentStep(spelling, feature_map, decay, gate=gate)
    model = _export_step(module, exporter, tmp_path)
    fused, report = linear.apply(model)
    assert report.rewritten == 1 and not report.near_misses, report.to_dict()
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert _count(fused, OP) == 1 and list(node.input)[:4] == ["q", "k", "v", ""], node
    assert list(node.output) == ["o", "s_out"] and node.overload.endswith("_state_in_out")
    gated = next(n for n in fused.graph.node if node.input[4] in n.output)
    assert gated.op_type == "Mul" and "s" in gated.input
    assert "decay" not in report.matches[0].attributes and report.matches[0].inputs["state"] == node.input[4]
    onnx.checker.check_model(fused)
    session = load(fused)
    reference = _RecurrentStep(spelling, feature_map, decay, gate=gate).double()
    names = "qkvsx"
    for b, seed in ((1, 11), (3, 12)):
        args = _step_args(b, seed=seed, gate=gate)
        got = session.infer({n: a.numpy() for n, a in zip(names, args)})
        with torch.no_grad():
            want = reference(*(a.double() for a in args))
        for name, w in zip(("o", "s_out"), want):
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-5, atol=1e-5, err_msg=f"{name} at batch {b}")


NEAR_MISSES = [  # what the export does differently, the reason the pass gives
    ("two_tokens", "has 2 tokens"),
    ("dynamic_tokens", "token axis is dynamic"),
    ("gated_two_tokens", "has 2 tokens"),
    ("float64_state", "float64"),
]


@pytest.mark.parametrize("case,reason", NEAR_MISSES)
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_step_near_misses_leave_the_graph_alone(case, reason, exporter, tmp_path):
    """A step over several (or a dynamic number of) tokens is not causal attention (with a gate
    from the input neither: each token would need its own power of it); a float64 state
    would lose precision."""
    module = _RecurrentStep("matmul", "identity", gate="head" if case == "gated_two_tokens" else None)
    model = _export_step(module, exporter, tmp_path, t=1 if case == "float64_state" else 2,
                         dynamic_tokens=case == "dynamic_tokens",
                         dtype=torch.float64 if case == "float64_state" else torch.float32)
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and fused is model and _count(fused, OP) == 0
    assert len(report.near_misses) == 1 and reason in report.near_misses[0].reason, report.to_dict()
    assert "recurrent step" in report.near_misses[0].reason
    assert linear.find(model).near_misses[0].reason == report.near_misses[0].reason


def test_recurrent_gate_that_may_widen_the_state_is_a_near_miss(tmp_path):
    """A gate kept in the graph must not change the state's shape: with the state's dims unknown,
    a ``[1, H, 1, 1]`` gate would broadcast a one-head state to H heads, so ``g ⊙ S`` cannot be
    proven to be the state (near-miss); the same graph with an in-range decay (the op's own
    input, no Mul kept) still fuses."""
    def export(decay):
        model = _export_step(_RecurrentStep("matmul", "identity", decay), "torchscript", tmp_path)
        for value in [*model.graph.input, *model.graph.output]:
            if value.name in ("s", "s_out"):
                for dim in value.type.tensor_type.shape.dim:
                    dim.Clear()
        return model

    model = export((0.9, 1.25, 0.5))
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and fused is model and len(report.near_misses) == 1, report.to_dict()
    assert "g ⊙ S may not have the state's shape: the gate's shape [1, 3, 1, 1] could broadcast the state's " \
           "[None, None, None, None]" in report.near_misses[0].reason
    fused, report = linear.apply(export((0.9, 0.75, 0.5)))
    assert report.rewritten == 1 and report.matches[0].attributes["decay"] == pytest.approx([0.9, 0.75, 0.5])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_lm_decode_step_fuses_every_layer(exporter, tmp_path):
    """``lm-lightning-step-small`` (RecurrentLightningLM, plain-PyTorch steps): one fused node per
    layer; ONNX Runtime equals the step in float64 at batch 1 and 3; decoding a sequence token
    by token from zero states through the fused graph equals LightningLM.logits (the masked
    quadratic form, float64) on the whole sequence."""
    from attnc.models.linear import LightningLM
    from attnc.models.registry import get_spec

    spec = get_spec("lm-lightning-step-small")
    step = spec.factory()
    path = export_onnx(step, spec.example_inputs(batch=2), tmp_path / f"lm_step_{exporter}.onnx", exporter=exporter,
                       dynamic_axes=spec.dynamic_axes, input_names=spec.input_names)
    fused, report = linear.apply(onnx.load(path))
    depth = len(step.blocks)
    assert report.rewritten == depth and _count(fused, OP) == depth and not report.near_misses, report.to_dict()
    assert [o.name for o in fused.graph.output] == spec.output_names
    assert {n.output[1] for n in fused.graph.node if n.op_type == OP} == set(spec.output_names[1:])
    assert all(m.attributes["decay"] for m in report.matches)
    onnx.checker.check_model(fused)
    session = load(fused)
    step64 = spec.factory().double()
    for b in (1, 3):
        inputs = spec.example_inputs(batch=b, seed=b)
        got = session.infer({n: t.numpy() for n, t in zip(spec.input_names, inputs)})
        with torch.no_grad():
            want = step64(inputs[0], *(s.double() for s in inputs[1:]))
        for name, w in zip(spec.output_names, want):
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-5, atol=2e-5, err_msg=f"{name} at batch {b}")

    lm = LightningLM(vocab_size=97, dim=32, depth=depth, num_heads=4).double().eval()
    lm.load_state_dict(step64.state_dict())
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = lm.logits(ids).numpy()
    states, logits = [s.numpy() for s in step.zero_states(3)], []
    for t in range(ids.shape[1]):
        run = session.infer({"ids": ids[:, t:t + 1].numpy(), **dict(zip(spec.input_names[1:], states))})
        logits.append(run["output"])
        states = [run[n] for n in spec.output_names[1:]]
    np.testing.assert_allclose(np.concatenate(logits, axis=1), full, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_recurrent_lm_decode_step_lowered_to_onnx_linear_attention(exporter, tmp_path):
    """--lower linear: each layer's step becomes ONNX LinearAttention with past_state /
    present_state under the graph's state names, with the plain step's numbers."""
    from attnc.models.registry import get_spec

    spec = get_spec("lm-lightning-step-small")
    step = spec.factory()
    path = export_onnx(step, spec.example_inputs(batch=2), tmp_path / f"lm_step_{exporter}.onnx", exporter=exporter,
                       dynamic_axes=spec.dynamic_axes, input_names=spec.input_names)
    lowered, report = linear.apply(onnx.load(path), lower_lightning_to_onnx=True)
    nodes = [n for n in lowered.graph.node if n.op_type == "LinearAttention"]
    assert report.rewritten == len(nodes) == len(step.blocks) and _count(lowered, OP) == 0, report.to_dict()
    assert sorted((n.input[3], n.output[1]) for n in nodes) == [("state_0", "output_1"), ("state_1", "output_2")]
    onnx.checker.check_model(lowered)
    inputs = spec.example_inputs(batch=3, seed=6)
    got = load(lowered).infer({n: t.numpy() for n, t in zip(spec.input_names, inputs)})
    with torch.no_grad():
        want = spec.factory().double()(inputs[0], *(s.double() for s in inputs[1:]))
    for name, w in zip(spec.output_names, want):
        np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-5, atol=2e-5, err_msg=name)
