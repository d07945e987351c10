"""passes/softmax.py: plain softmax attention -> ONNX Attention (opset 23).

Every test exports a PyTorch module, runs the pass, and checks ONNX Runtime after the
pass against ONNX Runtime before it and against PyTorch on fresh inputs.
"""

from __future__ import annotations

import math

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
from attnc.models.mhsa import MultiHeadSelfAttention
from attnc.passes import find_attention, fuse_attention, softmax

DYN = {"x": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}


def _export(module, inputs, tmp_path, exporter="torchscript", dynamic=False, opset=18, names=("x",)):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    path = export_onnx(module.eval(), inputs, tmp_path / f"m_{exporter}_{opset}.onnx", exporter=exporter,
                       opset=opset, dynamic_axes=DYN if dynamic else None, input_names=list(names))
    return onnx.load(path)


def _count(model, op_type):
    return sum(n.op_type == op_type for n in model.graph.node)


def _check(module, model, fused, report, n_fused, shapes, rtol=1e-5, atol=1e-6, dtype=torch.float32,
           fewer_nodes=True):
    assert report.rewritten == n_fused, report.to_dict()
    assert _count(fused, "Attention") == n_fused
    assert _count(fused, "Softmax") == max(0, _count(model, "Softmax") - n_fused)
    assert len(fused.graph.node) < len(model.graph.node) or not fewer_nodes
    assert next(o.version for o in fused.opset_import if o.domain == "") >= 23
    onnx.checker.check_model(fused)
    before, after = load(model), load(fused)
    gen = torch.Generator().manual_seed(1234)
    for shape in shapes:
        x = torch.randn(*shape, generator=gen).to(dtype)
        feeds = {"x": x.numpy()}
        ref_ort = before.infer(feeds)["output"]
        got = after.infer(feeds)["output"]
        with torch.no_grad():
            ref = module(x).float().numpy()
        np.testing.assert_allclose(got, ref_ort, rtol=rtol, atol=atol)
        np.testing.assert_allclose(got.astype(np.float32), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(scale_after=True, fused_qkv=False)],
                         ids=["causal-fusedqkv", "scaleafter-separate"])
def test_mhsa_dynamic_axes(exporter, kwargs, tmp_path):
    torch.manual_seed(0)
    module = MultiHeadSelfAttention(32, 4, **kwargs)
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    fused, report = softmax.apply(model)
    assert report.matches[0].attributes["is_causal"] == int(kwargs.get("causal", False))
    assert report.matches[0].attributes["scale"] == pytest.approx(8 ** -0.5, rel=1e-6)
    _check(module, model, fused, report, 1, [(2, 7, 32), (3, 11, 32), (1, 2, 32)])


@pytest.mark.parametrize("opset", [17, 20, 23])
def test_opsets_static(opset, tmp_path):
    torch.manual_seed(1)
    module = MultiHeadSelfAttention(24, 3, causal=True, scale_after=True)
    model = _export(module, torch.randn(2, 5, 24), tmp_path, "torchscript", opset=opset)
    fused, report = softmax.apply(model)
    _check(module, model, fused, report, 1, [(2, 5, 24)])


class _BmmAttention(nn.Module):
    """Rank-3 [B·H, N, D] attention with a spelled-out softmax and K permuted straight to [.., D, N]."""

    def __init__(self, dim=24, heads=3, mask: torch.Tensor | None = None):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("mask", mask if mask is not None else torch.zeros(1))
        self.has_mask = mask is not None

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).unbind(2)
        q = q.transpose(1, 2).reshape(b * h, n, d)
        kt = k.permute(0, 2, 3, 1).reshape(b * h, d, n)      # [B·H, D, N], no separate transpose
        v = v.transpose(1, 2).reshape(b * h, n, d)
        s = torch.bmm(q, kt) / math.sqrt(d)
        if self.has_mask:
            s = s + self.mask
        e = torch.exp(s - s.amax(-1, keepdim=True))
        p = e / e.sum(-1, keepdim=True)
        o = torch.bmm(p, v).reshape(b, h, n, d).transpose(1, 2).reshape(b, n, c)
        return self.proj(o)


def test_rank3_spelled_out_softmax_with_additive_mask(tmp_path):
    torch.manual_seed(2)
    mask = torch.where(torch.rand(6, 6) < 0.3, -1e9, 0.0).fill_diagonal_(0.0)  # arbitrary, not causal
    module = _BmmAttention(mask=mask)
    model = _export(module, torch.randn(2, 6, 24), tmp_path, "dynamo")
    fused, report = softmax.apply(model)
    assert report.rewritten == 1 and "attn_mask" in report.matches[0].inputs
    assert report.matches[0].attributes["is_causal"] == 0
    _check(module, model, fused, report, 1, [(2, 6, 24)], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_rank3_mask_per_flattened_head(exporter, tmp_path):
    """A mask with one [N, N] slice per batch entry and head of rank-3 attention (SAM's relative-position bias per
    window and head, GOT-OCR2's vision tower): ONNX Attention broadcasts it to [B·H, heads = 1, N, N], so it gets that
    axis (a [B·H, N, N] mask was taken for [heads, N, N] and ONNX Runtime refused the node)."""
    torch.manual_seed(3)
    module = _BmmAttention(mask=torch.randn(2 * 3, 6, 6))
    model = _export(module, torch.randn(2, 6, 24), tmp_path, exporter)
    fused, report = softmax.apply(model)
    assert report.rewritten == 1 and "attn_mask" in report.matches[0].inputs
    _check(module, model, fused, report, 1, [(2, 6, 24)], rtol=1e-5, atol=2e-6)


def test_constant_causal_additive_mask_becomes_is_causal(tmp_path):
    torch.manual_seed(3)
    mask = torch.full((6, 6), float("-inf")).triu(1)
    module = _BmmAttention(mask=mask)
    model = _export(module, torch.randn(2, 6, 24), tmp_path, "torchscript")
    fused, report = softmax.apply(model)
    assert report.matches[0].attributes["is_causal"] == 1 and "attn_mask" not in report.matches[0].inputs
    _check(module, model, fused, report, 1, [(2, 6, 24)], atol=2e-6)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_static_causal_attention_is_not_taken_for_neighborhood_attention(exporter, tmp_path):
    """With every pass on and a static sequence, the causal mask reaches the softmax pass (native
    causal ``Attention``), not the neighborhood pass as causal NA with a window of the whole
    sequence (which it had been, both exporters, until its plain-causal check was fixed)."""
    torch.manual_seed(4)
    module = MultiHeadSelfAttention(24, 3, causal=True)
    model = _export(module, torch.randn(2, 12, 24), tmp_path, exporter)
    fused, reports = fuse_attention(model)
    by_family = {r.family: r for r in reports}
    assert by_family["neighborhood"].rewritten == 0 and by_family["softmax"].rewritten == 1
    assert by_family["softmax"].matches[0].attributes["is_causal"] == 1
    assert not [n for n in fused.graph.node if n.op_type == "NeighborhoodAttention"]


class _AlibiAttention(nn.Module):
    """ALiBi attention (a per-head linear bias on the scores) with a causal ``masked_fill``.

    ``flat``: as BLOOM writes it, ``baddbmm`` on ``[B·H, S, D]`` adds the bias ``[B·H, 1, S]``
    before the scores are split into heads, the mask after, and the probabilities are flattened
    again for ``bmm`` with V. Otherwise as MPT: 4-D scores, the bias ``[H, 1, S]`` added after the
    scale, or (``bias_in_scale``) a bias ``[H, S, S]`` added before it, so the scale applies to it.
    """

    def __init__(self, dim=24, heads=3, flat=True, bias_in_scale=False, causal=True):
        super().__init__()
        self.heads, self.flat, self.bias_in_scale, self.causal = heads, flat, bias_in_scale, causal
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("slopes", 2.0 ** (-8.0 * torch.arange(1, heads + 1) / heads))

    def forward(self, x):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).reshape(b, n, 3, h, d).unbind(2)
        pos = torch.arange(n, dtype=x.dtype)
        future = torch.ones(n, n, dtype=torch.bool).triu(1)
        fill = torch.finfo(x.dtype).min
        if self.flat:
            q, v = (t.transpose(1, 2).reshape(b * h, n, d) for t in (q, v))
            kt = k.permute(0, 2, 3, 1).reshape(b * h, d, n)
            alibi = (self.slopes[:, None, None] * pos[None, None, :]).repeat(b, 1, 1)
            s = alibi.baddbmm(q, kt, beta=1.0, alpha=1 / math.sqrt(d))
            p = s.view(b, h, n, n).masked_fill(future, fill).softmax(-1).view(b * h, n, n)
            o = torch.bmm(p, v).view(b, h, n, d).transpose(1, 2)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            s = q @ k.transpose(-1, -2)
            if self.bias_in_scale:
                s = (s + self.slopes[:, None, None] * (pos[None, :] - pos[:, None])) / math.sqrt(d)
            else:
                s = s / math.sqrt(d) + self.slopes[:, None, None] * pos[None, None, :]
            o = (s.masked_fill(future, fill) if self.causal else s).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("flat,bias_in_scale,causal,dynamic", [
    (True, False, True, True), (True, False, True, False), (False, False, True, True), (False, True, True, True),
    (False, True, False, True)], ids=["bloom", "bloom-static", "mpt", "bias-in-scale", "bias-in-scale-alone"])
def test_alibi_bias_and_causal_mask(exporter, flat, bias_in_scale, causal, dynamic, tmp_path):
    """Two masks on the scores (ALiBi and the causal fill) become one ``attn_mask``; a bias inside
    the scaled expression is scaled with the scores (alone, it was not, before: 0.7 off); BLOOM's
    flattened heads are split for ``Attention`` and joined again after it (a static dynamo export
    folds P·V into 4-D: only the scores are split there)."""
    torch.manual_seed(5)
    module = _AlibiAttention(flat=flat, bias_in_scale=bias_in_scale, causal=causal)
    model = _export(module, torch.randn(2, 7, 24), tmp_path, exporter, dynamic=dynamic)
    fused, report = softmax.apply(model)
    assert report.matches[0].attributes["is_causal"] == 0
    assert ("attn_mask1" in report.matches[0].inputs) == causal and "attn_mask" in report.matches[0].inputs
    # TorchScript's shapes do not prove that a mask covers [S_q, S_kv]: its Expand is spelled out (more
    # small shape nodes than the export had, one attention op)
    _check(module, model, fused, report, 1, [(2, 7, 24), (3, 5, 24), (1, 12, 24)] if dynamic else [(2, 7, 24)],
           rtol=1e-5, atol=2e-6, fewer_nodes=flat or exporter == "dynamo")


class _SoftcapAttention(MultiHeadSelfAttention):
    """Causal attention with Gemma 2's logit soft-capping, ``cap · tanh(s / cap)`` of the scaled
    scores, before the mask (``inside``: the mask added before the capping, which ONNX ``Attention``
    cannot express: its ``softcap`` comes before ``attn_mask``)."""

    def __init__(self, *a, cap=2.0, inside=False, **kw):
        super().__init__(*a, **kw)
        self.cap, self.inside = cap, inside

    def forward(self, x):
        q, k, v = self.in_proj(x)
        s = (q @ k.transpose(-2, -1)) * self.scale
        n = x.shape[1]
        mask = torch.full((n, n), float("-inf")).triu(1)
        s = self.cap * torch.tanh((s + mask if self.inside else s) / self.cap)
        s = s if self.inside else s + mask
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_soft_capped_scores(exporter, tmp_path):
    """Soft-capping becomes ``Attention``'s ``softcap`` (the causal mask after it: ``is_causal``); for
    TensorRT (``softcap=False``), whose attention layer has none, and with the mask inside the
    capping, the graph stays as it is with a near-miss that says why."""
    torch.manual_seed(7)
    module = _SoftcapAttention(32, 4, cap=1.5)
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    fused, report = softmax.apply(model)
    assert report.matches[0].attributes == {"scale": pytest.approx(module.scale), "is_causal": 1, "softcap": 1.5}
    _check(module, model, fused, report, 1, [(2, 7, 32), (3, 5, 32), (1, 12, 32)], rtol=1e-5, atol=2e-6)
    kept, report = softmax.apply(model, softcap=False)
    assert report.rewritten == 0 and kept is model
    assert any("no soft-capping" in m.reason for m in report.near_misses), report.to_dict()
    inside = _export(_SoftcapAttention(32, 4, inside=True), torch.randn(2, 7, 32), tmp_path, exporter)
    kept, report = softmax.apply(inside)
    assert report.rewritten == 0 and any("inside the soft-capping" in m.reason for m in report.near_misses)


class _SinkAttention(MultiHeadSelfAttention):
    """Attention sinks as gpt-oss writes them: a learned logit per head joins every row of the (masked)
    scores, the softmax runs over both (its max subtracted first), and the sink's column is dropped."""

    def __init__(self, *a, mask="none", **kw):
        super().__init__(*a, **kw)
        self.mask = mask
        self.sinks = nn.Parameter(1.5 + torch.randn(self.in_proj.num_heads))   # large: the sink takes much of each row

    def forward(self, x):
        q, k, v = self.in_proj(x)
        s = (q @ k.transpose(-2, -1)) * self.scale
        i = torch.arange(x.shape[1])
        if self.mask == "causal":
            s = s + torch.full((x.shape[1],) * 2, float("-inf")).triu(1)
        elif self.mask == "band":   # a bool window, both sides: neighborhood-like, but sinks keep it softmax
            s = s.masked_fill((i[:, None] - i[None, :]).abs() > 2, float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(x.shape[0], -1, x.shape[1], -1)
        logits = torch.cat([s, sinks], dim=-1)
        probs = (logits - logits.max(dim=-1, keepdim=True).values).softmax(-1)[..., :-1]
        return self.proj((probs @ v).transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("mask", ["none", "causal", "band"])
def test_attention_sinks(exporter, mask, tmp_path):
    """Sinks become a zero key and value with the sink logit in the mask's extra column: one
    ``Attention``, on several shapes against torch (a band mask is not taken for neighborhood attention,
    which has no sinks; it is exported static, where the expanded sinks are folded to a constant)."""
    torch.manual_seed(11)
    module = _SinkAttention(32, 4, mask=mask)
    dynamic = mask != "band"
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=dynamic)
    fused, reports = fuse_attention(model)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {"softmax": 1}
    attributes = next(r for r in reports if r.family == "softmax").matches[0].attributes
    assert attributes["is_causal"] == 0
    np.testing.assert_allclose(attributes["sinks"], module.sinks.detach().numpy(), rtol=1e-6)
    _check(module, model, fused, next(r for r in reports if r.family == "softmax"), 1,
           [(2, 7, 32), (3, 5, 32), (1, 12, 32)] if dynamic else [(2, 7, 32)], rtol=1e-5, atol=2e-6,
           fewer_nodes=False)


class _GroupedSoftmax(nn.Module):
    """Flat [B·H, S, S] scores reshaped to rank 4 for a softmax over halves of each row: a rank
    3 -> 4 Reshape that is not a heads split, so not attention ``Attention`` can compute."""

    def forward(self, x):
        b, n, d = x.shape
        s = torch.bmm(x, x.transpose(1, 2)).reshape(b, n, 2, n // 2)
        return torch.bmm(s.softmax(-1).reshape(b, n, n), x)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_rank4_reshape_of_flat_scores_that_is_no_heads_split_is_a_near_miss(exporter, tmp_path):
    model = _export(_GroupedSoftmax(), torch.randn(2, 6, 4), tmp_path, exporter)
    fused, report = softmax.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any("heads split is not proven" in nm.reason for nm in report.near_misses), report.to_dict()


class _FiniteFillAttention(MultiHeadSelfAttention):
    """Causal attention that fills with -1e4: fully masked rows would differ from -inf."""

    def forward(self, x):
        q, k, v = self.in_proj(x)
        s = (q * self.scale) @ k.transpose(-2, -1)
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e4)
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))


class _PerHeadScale(MultiHeadSelfAttention):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.register_buffer("head_scale", torch.linspace(0.1, 0.5, 4).view(1, 4, 1, 1))

    def forward(self, x):
        q, k, v = self.in_proj(x)
        s = (q @ k.transpose(-2, -1)) * self.head_scale
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("module_cls,reason", [(_FiniteFillAttention, "not -inf"),
                                               (_PerHeadScale, "not by a constant scalar")])
def test_near_misses_leave_the_graph_untouched(module_cls, reason, tmp_path):
    module = module_cls(32, 4)
    model = _export(module, torch.randn(2, 5, 32), tmp_path, "torchscript")
    fused, report = softmax.apply(model)
    assert report.rewritten == 0 and _count(fused, "Attention") == 0
    assert _count(fused, "Softmax") == 1
    assert any(reason in nm.reason for nm in report.near_misses), report.to_dict()
    assert fused is model  # returned unchanged when nothing matched


def test_find_reports_without_changing(tmp_path):
    model = _export(MultiHeadSelfAttention(16, 2, causal=True), torch.randn(1, 4, 16), tmp_path)
    before = model.SerializeToString()
    report = softmax.find(model)
    assert len(report.matches) == 1 and report.rewritten == 0
    assert model.SerializeToString() == before
    assert [r.family for r in find_attention(model, ["softmax"])] == ["softmax"]


def test_float16_export(tmp_path):
    torch.manual_seed(4)
    module = MultiHeadSelfAttention(32, 4, causal=True).half()
    model = _export(module, torch.randn(2, 6, 32).half(), tmp_path, "torchscript")
    fused, report = softmax.apply(model)
    assert report.rewritten == 1
    x = torch.randn(2, 6, 32).half()
    got = load(fused).infer({"x": x.numpy()})["output"].astype(np.float32)
    before = load(model).infer({"x": x.numpy()})["output"].astype(np.float32)
    with torch.no_grad():
        ref = module.float()(x.float()).numpy()
    np.testing.assert_allclose(got, before, rtol=1e-2, atol=2e-3)
    np.testing.assert_allclose(got, ref, rtol=1e-2, atol=5e-3)


@settings(max_examples=6, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 9), causal=st.booleans(), scale_after=st.booleans(),
       fused_qkv=st.booleans(), n=st.integers(2, 9), dynamic=st.booleans())
def test_random_configs(heads, head_dim, causal, scale_after, fused_qkv, n, dynamic, tmp_path_factory):
    torch.manual_seed(heads * 100 + head_dim)
    dim = heads * head_dim
    module = MultiHeadSelfAttention(dim, heads, causal=causal, scale_after=scale_after, fused_qkv=fused_qkv)
    model = _export(module, torch.randn(2, n, dim), tmp_path_factory.mktemp("h"), "torchscript", dynamic=dynamic)
    fused, report = softmax.apply(model)
    assert report.matches[0].attributes["is_causal"] == int(causal)
    shapes = [(2, n, dim)] + ([(1, n + 3, dim)] if dynamic else [])
    _check(module, model, fused, report, 1, shapes, atol=2e-6)


# ----------------------------------------------------------------------------- registry models

@pytest.mark.parametrize("name,n_fused", [("mhsa-causal-small", 1), ("lm-mhsa-small", 2), ("vit-mhsa-small", 2)])
def test_registry_models_through_pipeline(name, n_fused):
    spec, module, model = export_spec(name, "dynamo")
    fused, reports = fuse_attention(model, ["softmax"])
    assert reports[0].rewritten == n_fused and _count(fused, "Attention") == n_fused
    assert_spec_fusion_preserves_outputs(spec, module, model, fused)


# ----------------------------------------------------------------------------- transformers (third-party proof)

class _LastHidden(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _hf(name, attention="eager"):
    """A small transformers model with ``attention`` as its attention implementation ("sdpa" is
    transformers' default: ``F.scaled_dot_product_attention``, which the dynamo exporter decomposes
    with a NaN guard after the softmax and a flattened transpose of K)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "vit":
        cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                     image_size=16, patch_size=8, num_channels=3)
        cfg._attn_implementation = attention
        return transformers.ViTModel(cfg, add_pooling_layer=False), torch.randn(2, 3, 16, 16), False
    if name == "llama":
        cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        cfg._attn_implementation = attention
        return transformers.LlamaForCausalLM(cfg), torch.randint(0, 50, (2, 9)), True
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg._attn_implementation = attention
    return transformers.GPT2LMHeadModel(cfg), torch.randint(0, 50, (2, 9)), True


@pytest.mark.parametrize("name,exporter,attention", [
    ("vit", "dynamo", "eager"), ("vit", "torchscript", "eager"), ("llama", "dynamo", "eager"),
    ("llama", "torchscript", "eager"), ("gpt2", "dynamo", "eager"),
    # transformers' default attention (SDPA); TorchScript cannot export transformers 5's Llama mask (aten::diff)
    ("vit", "dynamo", "sdpa"), ("vit", "torchscript", "sdpa"), ("llama", "dynamo", "sdpa"),
    ("gpt2", "dynamo", "sdpa"), ("gpt2", "torchscript", "sdpa")])
def test_transformers_attention(name, exporter, attention, tmp_path):
    hf, x, causal = _hf(name, attention)
    module = _LastHidden(hf).eval()
    dynamic = causal and exporter == "torchscript"   # the causal mask then comes from Range/Shape arithmetic
    model = _export(module, x, tmp_path, exporter, dynamic=dynamic)
    fused, report = softmax.apply(model)
    assert report.rewritten == 2 and _count(fused, "Attention") == 2, report.to_dict()
    assert _count(fused, "Softmax") == _count(fused, "IsNaN") == 0
    assert all(m.attributes["is_causal"] == int(causal) for m in report.matches)
    gen = torch.Generator().manual_seed(7)
    for shape in [tuple(x.shape)] + ([(3, 5)] if dynamic else []):
        x = torch.randint(0, 50, shape, generator=gen) if causal else torch.randn(shape, generator=gen)
        got = load(fused).infer({"x": x.numpy()})["output"]
        np.testing.assert_allclose(got, load(model).infer({"x": x.numpy()})["output"], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-4, atol=1e-5)


class _SDPA(nn.Module):
    """Attention written with ``F.scaled_dot_product_attention``: a key-padding mask read from the
    input (``pad``: the keys whose first channel is below 0; a sample may mask every key), causal,
    or grouped-query by ``enable_gqa``."""

    def __init__(self, dim=32, heads=4, kv_heads=4, mode="pad"):
        super().__init__()
        self.heads, self.kv_heads, self.mode, self.d = heads, kv_heads, mode, dim // heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.d)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, self.heads, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.kv_heads, self.d).permute(2, 0, 3, 1, 4)
        f = nn.functional.scaled_dot_product_attention
        if self.mode == "pad":
            o = f(q, k, v, attn_mask=(x[..., 0] >= 0)[:, None, None, :])
        else:
            o = f(q, k, v, is_causal=self.mode == "causal", enable_gqa=self.kv_heads != self.heads)
        return self.o(o.transpose(1, 2).reshape(b, n, -1))


@pytest.mark.parametrize("exporter,mode,kv_heads", [
    ("dynamo", "pad", 4), ("torchscript", "pad", 4), ("dynamo", "causal", 4), ("torchscript", "causal", 4),
    ("dynamo", "gqa", 2)])   # TorchScript does not export enable_gqa
def test_scaled_dot_product_attention(exporter, mode, kv_heads, tmp_path):
    """F.scaled_dot_product_attention with a data-dependent key-padding mask ``[B, 1, 1, S]`` (expanded
    over the queries for ONNX Runtime's ``Attention``; one sample masks every key, and the fused
    node gives its rows zeros, as PyTorch does), causal, and grouped-query (``enable_gqa``); both
    exporters, dynamic batch and length."""
    torch.manual_seed(3)
    module = _SDPA(kv_heads=kv_heads, mode=mode).eval()
    model = _export(module, torch.randn(2, 7, 32), tmp_path, exporter, dynamic=True)
    fused, report = softmax.apply(model)
    assert report.rewritten == 1 and _count(fused, "Softmax") == _count(fused, "IsNaN") == 0, report.to_dict()
    assert report.matches[0].attributes["is_causal"] == int(mode == "causal")
    before, after = load(model), load(fused)
    gen = torch.Generator().manual_seed(11)
    for shape in [(2, 7, 32), (3, 12, 32), (1, 1, 32)]:
        x = torch.randn(*shape, generator=gen)
        if mode == "pad":
            x[0, :, 0] = -1.0 - x[0, :, 0].abs()   # sample 0: every key masked
        got = after.infer({"x": x.numpy()})["output"]
        with torch.no_grad():
            ref = module(x).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        # ONNX Runtime's Softmax gives a row of -inf uniform weights rather than NaN, so the exported
        # graph's guard never fires and its fully masked rows differ from PyTorch's zeros.
        live = slice(1, None) if mode == "pad" else slice(None)
        np.testing.assert_allclose(got[live], before.infer({"x": x.numpy()})["output"][live], rtol=1e-5, atol=1e-6)
        if mode == "pad":   # a zero row of attention leaves the output projection's bias
            np.testing.assert_allclose(got[0], np.broadcast_to(module.o.bias.detach().numpy(), got[0].shape),
                                       atol=1e-6)


def test_opset_conversion_keeps_earlier_fused_functions(tmp_path):
    """A hybrid model: the linear pass adds an attnc function, then this pass converts to opset 23.

    ``onnx.version_converter`` drops model functions; ``passes.core.convert_opset`` restores
    them (and raises their opset where the body means the same) so the checker and ORT accept it.
    """
    from attnc.models.linear import LinearAttention

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = LinearAttention(32, 4, causal=True), MultiHeadSelfAttention(32, 4, causal=True)

        def forward(self, x):
            return self.b(self.a(x))

    torch.manual_seed(9)
    module = Hybrid()
    model = _export(module, torch.randn(2, 7, 32), tmp_path, "torchscript", dynamic=True)
    fused, reports = fuse_attention(model, ["linear", "softmax"])
    assert [r.rewritten for r in reports] == [1, 1]
    assert [f.name for f in fused.functions] == ["KernelLinearAttention"]
    _check(module, model, fused, reports[1], 1, [(2, 7, 32), (1, 4, 32)], atol=2e-6)
