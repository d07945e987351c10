"""attnc.passes.flow: export flow-attention models, fuse, compare ONNX Runtime before/after and
PyTorch; look-alikes with different constants must stay untouched with a near-miss."""

from __future__ import annotations


import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attnc.testing import export_model as export
from attnc.testing import export_spec
from attnc.testing import assert_fusion_preserves_outputs
from attnc.testing import run_model as run
from attnc.models.flow import FlowAttention
from attnc.models.registry import get_spec
from attnc.passes import flow, fuse_attention

RTOL, ATOL = 1e-5, 1e-6


def fused_nodes(model):
    return [n for n in model.graph.node if n.op_type == "FlowAttention" and n.domain == "attnc"]


def check_fused(model, fused, module, inputs_list, n_fused, rtol=RTOL, atol=ATOL):
    assert len(fused_nodes(fused)) == n_fused
    assert len(fused.graph.node) < len(model.graph.node)
    onnx.checker.check_model(fused, full_check=True)
    assert_fusion_preserves_outputs(model, fused, module, inputs_list, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- registry models

@pytest.mark.parametrize("name", ["flow-small", "flow-causal-small"])
@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), ("dynamo", 18), ("torchscript", 23)])
def test_registry_flow_modules(name, exporter, opset):
    spec, module, model = export_spec(name, exporter, opset=opset)
    fused, report = flow.apply(model)
    assert report.rewritten == 1 and not report.near_misses
    assert report.matches[0].attributes["causal"] == int(module.causal)
    assert np.isclose(report.matches[0].attributes["eps"], module.eps)
    check_fused(model, fused, module, [spec.example_inputs(batch=1, seq=13, seed=1),
                                       spec.example_inputs(batch=3, seq=6, seed=2)], 1)


@pytest.mark.parametrize("name,exporter", [("vit-flow-small", "torchscript"), ("vit-flow-small", "dynamo"),
                                           ("lm-flow-small", "torchscript")])
def test_models_end_to_end(name, exporter):
    spec, module, model = export_spec(name, exporter)
    fused, reports = fuse_attention(model)
    assert {r.family: r for r in reports}["flow"].rewritten == 2  # depth 2: every block
    sizes = [{"batch": 1}, {"batch": 3}] if "seq" not in spec.sizes else [{"batch": 1, "seq": 11},
                                                                           {"batch": 2, "seq": 20}]
    check_fused(model, fused, module, [spec.example_inputs(seed=i, **s) for i, s in enumerate(sizes)], 2,
                rtol=1e-4, atol=1e-5)


def test_fp16_export():
    # flow-small: tracing the causal module's arange(dtype=half) fails in the TorchScript exporter
    spec = get_spec("flow-small")
    module = spec.factory()
    x = spec.example_inputs(batch=2)[0]
    model = export(module.half(), (x.half(),), "torchscript", 17)
    fused, report = flow.apply(model)
    assert report.rewritten == 1, report.near_misses
    feeds = {"x": x.half().numpy()}
    after = run(fused, feeds).astype(np.float64)
    expected = spec.factory().double()(x.double()).detach().numpy()
    np.testing.assert_allclose(after, expected, rtol=3e-2, atol=3e-3)


# ----------------------------------------------------------------------------- thuml-style variants

class ThumlFlow(nn.Module):
    """thuml ``Flow_Attention`` / ``Flow_Attention_Causal`` on separate queries/keys/values
    ``[B, L|S, C]`` (cross attention allowed when not causal), with knobs that change the
    semantics for near-miss tests."""

    def __init__(self, dim=24, heads=3, causal=False, eps=1e-6, clip=1.0, eps_sink=None, competition_extra=0.0,
                 normal_offset=1.0, spelled_softmax=False):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.heads, self.causal, self.eps, self.clip = heads, causal, eps, clip
        self.eps_sink = eps if eps_sink is None else eps_sink
        self.competition_extra, self.normal_offset = competition_extra, normal_offset
        self.spelled_softmax = spelled_softmax

    def forward(self, queries, keys, values):
        b, length, _ = queries.shape
        s = keys.shape[1]
        q = torch.sigmoid(self.q(queries).view(b, length, self.heads, -1).transpose(1, 2))
        k = torch.sigmoid(self.k(keys).view(b, s, self.heads, -1).transpose(1, 2))
        v = self.v(values).view(b, s, self.heads, -1).transpose(1, 2)
        out = self._causal(q, k, v) if self.causal else self._non_causal(q, k, v)
        return out.transpose(1, 2).reshape(b, length, -1)

    def _non_causal(self, queries, keys, values):
        eps = self.eps
        sink_incoming = 1.0 / torch.einsum("nhld,nhd->nhl", queries + eps, keys.sum(dim=2) + eps)
        source_outgoing = 1.0 / torch.einsum("nhld,nhd->nhl", keys + eps, queries.sum(dim=2) + eps)
        conserved_sink = torch.einsum("nhld,nhd->nhl", queries + self.eps_sink,
                                      (keys * source_outgoing[:, :, :, None]).sum(dim=2) + eps)
        conserved_source = torch.einsum("nhld,nhd->nhl", keys + eps,
                                        (queries * sink_incoming[:, :, :, None]).sum(dim=2) + eps)
        conserved_source = torch.clamp(conserved_source, min=-self.clip, max=self.clip)
        sink_allocation = torch.sigmoid(conserved_sink * (float(queries.shape[2]) / float(keys.shape[2])))
        if self.spelled_softmax:
            e = torch.exp(conserved_source - conserved_source.amax(-1, keepdim=True))
            competition = e / e.sum(-1, keepdim=True)
        else:
            competition = torch.softmax(conserved_source, dim=-1)
        source_competition = competition * (float(keys.shape[2]) + self.competition_extra)
        kv = torch.einsum("nhld,nhlm->nhdm", keys, values * source_competition[:, :, :, None])
        qkv = torch.einsum("nhld,nhdm->nhlm", queries * sink_incoming[:, :, :, None], kv)
        return qkv * sink_allocation[:, :, :, None]

    def _causal(self, queries, keys, values):
        eps = self.eps
        sink_incoming = 1.0 / torch.einsum("nhld,nhld->nhl", queries + eps, keys.cumsum(dim=2) + eps)
        source_outgoing = 1.0 / torch.einsum("nhld,nhld->nhl", keys + eps, queries.cumsum(dim=2) + eps)
        normal = (torch.arange(queries.shape[2]).float() + self.normal_offset)[None, None, :]
        sink_incoming = sink_incoming * normal
        source_outgoing = source_outgoing * normal
        conserved_sink = torch.einsum("nhld,nhld->nhl", queries + self.eps_sink,
                                      (keys * source_outgoing[:, :, :, None]).cumsum(dim=2) + eps) / normal
        conserved_source = torch.einsum("nhld,nhld->nhl", keys + eps,
                                        (queries * sink_incoming[:, :, :, None]).cumsum(dim=2) + eps) / normal
        conserved_source = torch.clamp(conserved_source, min=-self.clip, max=self.clip)
        sink_allocation = torch.sigmoid(conserved_sink)
        conserved_source = torch.exp(conserved_source)
        source_competition = (conserved_source / conserved_source.cumsum(dim=-1)) * normal
        kv = torch.einsum("nhld,nhlm->nhldm", keys, values * source_competition[:, :, :, None]).cumsum(dim=2)
        qkv = torch.einsum("nhld,nhldm->nhlm", queries * (sink_incoming / normal)[:, :, :, None], kv)
        return qkv * sink_allocation[:, :, :, None]


def _xs(b, length, s, dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, length, dim, generator=gen), torch.randn(b, s, dim, generator=gen),
            torch.randn(b, s, dim, generator=gen))


AXES = {"queries": {0: "batch", 1: "L"}, "keys": {0: "batch", 1: "S"}, "values": {0: "batch", 1: "S"}}
NAMES = ("queries", "keys", "values")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("exporter,dynamic", [("torchscript", False), ("torchscript", True), ("dynamo", False)])
def test_thuml_original(causal, exporter, dynamic):
    """thuml's own formulation: the L/S allocation factor, float arange + 1 normaliser, and
    (non-causal) cross attention with L != S."""
    if exporter == "torchscript" and dynamic and not causal:
        pytest.skip("traced float(keys.shape[2]) is a constant: see test_traced_key_count_is_a_near_miss")
    torch.manual_seed(3)
    module = ThumlFlow(causal=causal).eval()
    s_len = 9 if causal else 12
    model = export(module, _xs(2, 9, s_len), exporter, 17, AXES if dynamic else None, NAMES)
    fused, report = flow.apply(model)
    assert report.rewritten == 1, report.near_misses
    sizes = [(2, 9, s_len)] if not dynamic else [(1, 7, 7 if causal else 10), (3, 11, 11 if causal else 5)]
    check_fused(model, fused, module, [_xs(*size, seed=i) for i, size in enumerate(sizes)], 1)


@pytest.mark.parametrize("opset", [17, 18])
def test_spelled_out_competition_softmax(opset):
    """``exp(x - max) / sum`` instead of Softmax; ReduceMax takes its axes as an attribute
    before opset 18 and as an input from 18."""
    torch.manual_seed(6)
    module = ThumlFlow(spelled_softmax=True).eval()
    model = export(module, _xs(2, 9, 12), "torchscript", opset, None, NAMES)
    fused, report = flow.apply(model)
    assert report.rewritten == 1, report.near_misses
    check_fused(model, fused, module, [_xs(2, 9, 12, seed=1)], 1)


@pytest.mark.parametrize("knobs,causal,reason", [
    ({"clip": 2.0}, False, "clip_min is -2"),
    ({"eps_sink": 1e-3}, False, "constant eps is 0.001"),
    ({"competition_extra": 1.0}, False, "sources factor"),
    ({"normal_offset": 2.0}, True, "normal factor"),
    ({"clip": 0.5}, True, "clip_min is -0.5"),
])
def test_near_misses(knobs, causal, reason):
    torch.manual_seed(4)
    module = ThumlFlow(causal=causal, **knobs).eval()
    model = export(module, _xs(2, 9, 9), "torchscript", 17, AXES, NAMES)
    fused, report = flow.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any(reason in m.reason for m in report.near_misses), report.near_misses


def test_traced_key_count_is_a_near_miss():
    """thuml writes the competition factor as ``float(keys.shape[2])``: the TorchScript exporter
    freezes it to the export-time S even with dynamic axes, so the exported graph is only
    flow attention at that S. The pass must prove S, find a constant 12, and refuse."""
    module = ThumlFlow().eval()
    model = export(module, _xs(2, 9, 12), "torchscript", 17, AXES, NAMES)
    fused, report = flow.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any("sources factor" in m.reason and "is [12.0]" in m.reason for m in report.near_misses), report


@settings(max_examples=8, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 8), seq=st.integers(2, 12), causal=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-4, 1e-2]), fused_qkv=st.booleans(), opset=st.sampled_from([17, 18, 23]),
       seed=st.integers(0, 50))
def test_random_configs(heads, head_dim, seq, causal, eps, fused_qkv, opset, seed):
    torch.manual_seed(seed)
    module = FlowAttention(heads * head_dim, heads, causal=causal, eps=eps, fused_qkv=fused_qkv).eval()
    dim = heads * head_dim
    axes = {"x": {0: "batch", 1: "seq"}}
    model = export(module, (torch.randn(2, seq, dim),), "torchscript", opset, axes)
    fused, report = flow.apply(model)
    assert report.rewritten == 1, report.near_misses
    assert np.isclose(report.matches[0].attributes["eps"], eps, rtol=1e-6)
    check_fused(model, fused, module, [(torch.randn(1, seq + 3, dim),), (torch.randn(3, seq - 1, dim),)], 1)
