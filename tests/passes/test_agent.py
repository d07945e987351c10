"""attnc.passes.agent: export agent-attention models, fuse, compare ONNX Runtime before/after
and PyTorch; near-misses for look-alikes whose semantics differ."""

from __future__ import annotations

import math

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
from attnc.models.registry import get_spec
from attnc.passes import agent, fuse_attention

RTOL, ATOL = 1e-5, 1e-6


def count(model, op_type, domain="attnc"):
    return sum(n.op_type == op_type and n.domain == domain for n in model.graph.node)


def check_fused(model, fused, module, inputs_list, n_fused, op_type="AgentAttention", domain="attnc",
                rtol=RTOL, atol=ATOL, fewer_nodes=True):
    assert count(fused, op_type, domain) == n_fused
    assert count(fused, "Softmax", "") == 0
    if fewer_nodes:
        assert len(fused.graph.node) < len(model.graph.node)
    onnx.checker.check_model(fused, full_check=True)
    assert_fusion_preserves_outputs(model, fused, module, inputs_list, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- registry models

@pytest.mark.parametrize("name", ["agent-small", "agent-nobias-small", "agent-nocls-small"])
@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), ("dynamo", 18), ("torchscript", 23)])
def test_registry_agent_modules(name, exporter, opset):
    spec = get_spec(name)
    module = spec.factory()
    model = export(module, spec.example_inputs(batch=2), exporter, opset, spec.dynamic_axes, spec.input_names)
    fused, report = agent.apply(model)
    assert report.rewritten == 1 and not report.near_misses
    bias = name == "agent-small" or name == "agent-nocls-small"
    node = next(n for n in fused.graph.node if n.op_type == "AgentAttention")
    assert bool(node.input[4:] and node.input[4]) == bias
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert math.isclose(attrs["scale"], module.scale, rel_tol=1e-6)
    check_fused(model, fused, module, [spec.example_inputs(batch=b, seed=b) for b in (1, 3)], 1)


@pytest.mark.parametrize("exporter,opset", [("torchscript", 17), ("dynamo", 18)])
def test_lower_to_two_attention_nodes(exporter, opset):
    spec = get_spec("agent-small")
    module = spec.factory()
    model = export(module, spec.example_inputs(batch=2), exporter, opset, spec.dynamic_axes, spec.input_names)
    lowered, report = agent.apply(model, lower_to_attention=True)
    assert report.rewritten == 1 and report.matches[0].op_type == "Attention"
    assert any(o.domain in ("", "ai.onnx") and o.version >= 23 for o in lowered.opset_import)
    assert count(lowered, "AgentAttention") == 0
    check_fused(model, lowered, module, [spec.example_inputs(batch=b, seed=b) for b in (1, 3)], 2, "Attention", "")
    fused, _ = agent.apply(model)
    feeds = {"x": spec.example_inputs(batch=2, seed=7)[0].numpy()}
    np.testing.assert_allclose(run(lowered, feeds), run(fused, feeds), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_vit_agent_end_to_end(exporter):
    spec, module, model = export_spec("vit-agent-small", exporter)
    fused, reports = fuse_attention(model)
    by_family = {r.family: r for r in reports}
    assert by_family["agent"].rewritten == 2  # depth 2: every block
    if "softmax" in by_family:
        assert by_family["softmax"].rewritten == 0  # the agent stages are gone before the softmax pass
    check_fused(model, fused, module, [spec.example_inputs(batch=b, seed=b) for b in (1, 3)], 2)


def test_fp16_export():
    spec = get_spec("agent-small")
    module = spec.factory().half()
    x = spec.example_inputs(batch=2)[0].half()
    model = export(module, (x,), "torchscript", 17)
    fused, report = agent.apply(model)
    assert report.rewritten == 1
    feeds = {"x": x.numpy()}
    before, after = run(model, feeds).astype(np.float32), run(fused, feeds).astype(np.float32)
    expected = spec.factory().double()(x.double()).detach().numpy()
    np.testing.assert_allclose(after, expected, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(after, before, rtol=2e-2, atol=2e-3)


# ----------------------------------------------------------------------------- third party: lucidrains

def _lucidrains(talking_heads, gate=True, seed=0):
    from agent_attention_pytorch import AgentSelfAttention

    torch.manual_seed(seed)
    return AgentSelfAttention(dim=32, num_agent_tokens=6, dim_head=8, heads=3, talking_heads=talking_heads,
                              gate=gate).eval()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_lucidrains_without_talking_heads_fuses(exporter):
    module = _lucidrains(talking_heads=False)
    x = torch.randn(2, 11, 32)
    model = export(module, (x,), exporter, 18, {"x": {0: "batch", 1: "seq"}})
    fused, report = agent.apply(model)
    assert report.rewritten == 1, report.near_misses
    assert math.isclose(report.matches[0].attributes["scale"], 8 ** -0.5, rel_tol=1e-6)
    check_fused(model, fused, module, [(torch.randn(1, 7, 32),), (torch.randn(3, 13, 32),)], 1)


def test_lucidrains_key_mask_is_a_near_miss():
    """``mask`` becomes ``masked_fill`` (Where) on the agent->key scores: not an additive bias."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _lucidrains(talking_heads=False, gate=False)

        def forward(self, x, mask):
            return self.inner(x, mask=mask > 0)

    x, mask = torch.randn(2, 11, 32), torch.ones(2, 11)
    model = export(Masked().eval(), (x, mask), "torchscript", 17, names=("x", "mask"))
    fused, report = agent.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any("Where" in m.reason for m in report.near_misses), report.near_misses


def test_lucidrains_talking_heads_is_a_near_miss():
    module = _lucidrains(talking_heads=True)
    model = export(module, (torch.randn(2, 11, 32),), "torchscript", 17)
    fused, report = agent.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any("Conv" in m.reason and "talking heads" in m.reason for m in report.near_misses), report.near_misses


# ----------------------------------------------------------------------------- variants and near-misses

class TinyAgent(nn.Module):
    """Agent attention on ``[B, H, N, D]`` tensors, written in several export-relevant styles."""

    def __init__(self, heads=2, head_dim=8, agents=4, style="matmul", scale_at="query", bias=False,
                 second_scale=None, other_agents=False, expand_agents=True):
        super().__init__()
        self.agents = nn.Parameter(torch.randn(1, heads, agents, head_dim))
        self.other = nn.Parameter(torch.randn(1, heads, agents, head_dim)) if other_agents else None
        self.b1 = nn.Parameter(torch.randn(heads, agents, 1) * 0.5) if bias else None
        self.b2 = nn.Parameter(torch.randn(heads, 1, agents) * 0.5) if bias else None
        self.scale = head_dim ** -0.5
        self.second_scale = second_scale or self.scale
        self.style, self.scale_at, self.expand_agents = style, scale_at, expand_agents

    def _scores(self, q, k, scale):
        if self.style == "einsum":
            s = torch.einsum("bhid,bhjd->bhij", q, k)
            return s * scale
        if self.scale_at == "query":
            return (q * scale) @ k.transpose(-2, -1)
        if self.scale_at == "key":
            return q @ (k.transpose(-2, -1) * scale)
        return (q @ k.transpose(-2, -1)) / (1.0 / scale)

    def _softmax(self, x):
        if self.style == "exp":
            e = torch.exp(x - x.amax(-1, keepdim=True))
            return e / e.sum(-1, keepdim=True)
        return x.softmax(-1)

    def forward(self, q, k, v):
        a = self.agents.expand(q.shape[0], -1, -1, -1) if self.expand_agents else self.agents
        if self.style == "sdpa":   # both stages as F.scaled_dot_product_attention, the biases as float masks
            a2 = a if self.other is None else self.other.expand(q.shape[0], -1, -1, -1)
            sdpa = nn.functional.scaled_dot_product_attention
            agent_v = sdpa(a, k, v, attn_mask=self.b1, scale=self.scale)
            return sdpa(q, a2, agent_v, attn_mask=self.b2, scale=self.second_scale)
        s1 = self._scores(a, k, self.scale)
        if self.b1 is not None:
            s1 = s1 + self.b1
        agent_v = self._softmax(s1) @ v
        a2 = a if self.other is None else self.other.expand(q.shape[0], -1, -1, -1)
        s2 = self._scores(q, a2, self.second_scale)
        if self.b2 is not None:
            s2 = s2 + self.b2
        return self._softmax(s2) @ agent_v


def _qkv(b, heads, n, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, heads, n, d, generator=gen) for _ in range(3))


QKV_AXES = {name: {0: "batch", 2: "seq"} for name in "qkv"}


@pytest.mark.parametrize("style,scale_at", [("matmul", "key"), ("matmul", "scores"), ("einsum", "query"),
                                            ("exp", "query")])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_variants(style, scale_at, exporter):
    torch.manual_seed(1)
    module = TinyAgent(style=style, scale_at=scale_at, bias=True).eval()
    model = export(module, _qkv(2, 2, 9, 8), exporter, 18, QKV_AXES, names="qkv")
    fused, report = agent.apply(model)
    assert report.rewritten == 1, report.near_misses
    check_fused(model, fused, module, [_qkv(1, 2, 5, 8, 1), _qkv(3, 2, 11, 8, 2)], 1)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_written_with_scaled_dot_product_attention(exporter, bias):
    """Both stages as ``F.scaled_dot_product_attention`` (the biases as float masks): the dynamo
    exporter's decomposition splits the scale over both operands and transposes through a flattened
    batch, which ``fuse_attention`` collapses first."""
    torch.manual_seed(2)
    module = TinyAgent(style="sdpa", bias=bias).eval()
    model = export(module, _qkv(2, 2, 9, 8), exporter, 18, QKV_AXES, names="qkv")
    fused, reports = fuse_attention(model, ["agent"])
    assert reports[0].rewritten == 1, reports[0].near_misses
    assert set(reports[0].matches[0].inputs) >= ({"agent_bias", "query_bias"} if bias else set())
    check_fused(model, fused, module, [_qkv(1, 2, 5, 8, 1), _qkv(3, 2, 11, 8, 2)], 1)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_broadcast_learned_agents_both_forms(exporter):
    """Learned ``[1, H, n, D]`` agents used without ``expand``: the fused op broadcasts them,
    the ``Attention`` lowering gets an ``Expand`` to the batch."""
    torch.manual_seed(5)
    module = TinyAgent(bias=True, expand_agents=False).eval()
    model = export(module, _qkv(2, 2, 9, 8), exporter, 18, QKV_AXES, names="qkv")
    inputs = [_qkv(1, 2, 5, 8, 1), _qkv(3, 2, 11, 8, 2)]
    fused, report = agent.apply(model)
    assert report.rewritten == 1, report.near_misses
    check_fused(model, fused, module, inputs, 1)
    lowered, report = agent.apply(model, lower_to_attention=True)
    assert report.rewritten == 1
    # broadcast agents and biases need Expand plumbing for Attention: the 11-node graph may grow
    check_fused(model, lowered, module, inputs, 2, "Attention", "", fewer_nodes=False)


@pytest.mark.parametrize("kind,reason", [("other_agents", "not the second stage's keys"),
                                         ("second_scale", "different scales")])
def test_near_misses(kind, reason):
    torch.manual_seed(2)
    module = TinyAgent(other_agents=kind == "other_agents", second_scale=0.5 if kind == "second_scale" else None)
    model = export(module.eval(), _qkv(2, 2, 9, 8), "torchscript", 17, names="qkv")
    fused, report = agent.apply(model)
    assert report.rewritten == 0 and fused is model
    assert any(reason in m.reason for m in report.near_misses), report.near_misses
    assert agent.find(model).near_misses


@settings(max_examples=8, deadline=None)
@given(heads=st.integers(1, 4), head_dim=st.integers(1, 9), agents=st.integers(1, 7), n=st.integers(1, 13),
       style=st.sampled_from(["matmul", "einsum", "exp"]), scale_at=st.sampled_from(["query", "key", "scores"]),
       bias=st.booleans(), opset=st.sampled_from([17, 18, 23]), seed=st.integers(0, 50))
def test_random_configs(heads, head_dim, agents, n, style, scale_at, bias, opset, seed):
    torch.manual_seed(seed)
    module = TinyAgent(heads, head_dim, agents, style, scale_at, bias).eval()
    model = export(module, _qkv(2, heads, n, head_dim, seed), "torchscript", opset, QKV_AXES, names="qkv")
    fused, report = agent.apply(model)
    assert report.rewritten == 1, report.near_misses
    check_fused(model, fused, module, [_qkv(1, heads, n + 2, head_dim, seed + 1),
                                       _qkv(3, heads, max(1, n - 1), head_dim, seed + 2)], 1)


# ----------------------------------------------------------------------------- the pass's "auto" mode

class TwoAgentAttentions(torch.nn.Module):
    """Agent attention over all N tokens and over the first 40 only: two shape classes in one graph."""

    def __init__(self, heads=2, head_dim=8, agents=4):
        super().__init__()
        self.long, self.short = (TinyAgent(heads, head_dim, agents, bias=True) for _ in range(2))

    def forward(self, q, k, v):
        return self.long(q, k, v), self.short(q[:, :, :40], k[:, :, :40], v[:, :, :40])


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_auto_routes_each_node_by_its_shape_class(exporter):
    """N = 200 needs 4 query tiles (lowered: two Attention nodes), N = 40 one (fused); the
    model still computes what the module does, and each match says why."""
    torch.manual_seed(3)
    module = TwoAgentAttentions().eval()
    gen = torch.Generator().manual_seed(4)
    qkv = tuple(torch.randn(2, 2, 200, 8, generator=gen) for _ in range(3))
    model = export(module, qkv, exporter, 18, names=["q", "k", "v"])
    routed, report = agent.apply(model, lower_to_attention="auto", precision="fp16")
    assert report.rewritten == 2
    by_route = {m.route["route"]: m for m in report.matches}
    assert set(by_route) == {"fused", "lowered"}
    assert by_route["fused"].op_type == "AgentAttention" and by_route["lowered"].op_type == "Attention"
    assert "4 query tile(s)" in by_route["lowered"].route["reason"]
    assert count(routed, "AgentAttention") == 1 and count(routed, "Attention", "") == 2
    assert count(routed, "Softmax", "") == 0
    onnx.checker.check_model(routed, full_check=True)
    feeds = {name: t.numpy() for name, t in zip("qkv", qkv)}
    sess_out = _run_all(routed, feeds)
    with torch.no_grad():
        expected = module.double()(*(t.double() for t in qkv))
    for out, ref in zip(sess_out, expected):
        np.testing.assert_allclose(out, ref.numpy(), rtol=1e-4, atol=1e-5)


def _run_all(model, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_auto_reads_the_engine_precision():
    """Head dim 96, N = 48: one 64-query tile in fp16, two 32-query tiles in fp32 (1.5x the work)."""
    torch.manual_seed(6)
    module = TinyAgent(heads=1, head_dim=96, agents=4).eval()
    qkv = tuple(torch.randn(1, 1, 48, 96) for _ in range(3))
    model = export(module, qkv, "torchscript", 17, names=["q", "k", "v"])
    fp16 = agent.apply(model, lower_to_attention="auto", precision="fp16")[1].matches[0].route
    fp32 = agent.apply(model, lower_to_attention="auto", precision="fp32")[1].matches[0].route
    default = agent.apply(model, lower_to_attention="auto")[1].matches[0].route   # the model's dtype: fp32
    assert fp16["route"] == "fused" and fp32["route"] == "lowered" and default == fp32


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_auto_routes_dynamic_token_counts_at_the_given_shapes(exporter):
    """With N dynamic the work model cannot tell (lowered, "dynamic"); at TensorRT's opt shape it
    can: 40 tokens is one query tile (fused), 200 is four (lowered)."""
    torch.manual_seed(8)
    module = TinyAgent(bias=True).eval()
    qkv = tuple(torch.randn(1, 2, 40, 8) for _ in range(3))
    model = export(module, qkv, exporter, 18, QKV_AXES, names=["q", "k", "v"])
    unknown = agent.apply(model, lower_to_attention="auto", precision="fp16")[1].matches[0].route
    assert unknown["route"] == "lowered" and "dynamic" in unknown["reason"]
    at = lambda n: {name: [1, 2, n, 8] for name in "qkv"}  # noqa: E731
    short, report = agent.apply(model, lower_to_attention="auto", precision="fp16", input_shapes=at(40))
    assert report.matches[0].route["route"] == "fused" and count(short, "AgentAttention") == 1
    long = fuse_attention(model, ["agent"], ["auto"], "fp16", input_shapes=at(200))[1][0].matches[0].route
    assert long["route"] == "lowered" and "4 query tile(s)" in long["reason"]
    # the fused model stays dynamic: it runs at other sizes and matches the module
    feeds = [tuple(torch.randn(b, 2, n, 8) for _ in range(3)) for b, n in ((2, 23), (1, 71))]
    for qkv in feeds:
        with torch.no_grad():
            expected = module.double()(*(t.double() for t in qkv))
        out = _run_all(short, {name: t.numpy() for name, t in zip("qkv", qkv)})[0]
        np.testing.assert_allclose(out, expected.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="rank 4"):
        agent.apply(model, lower_to_attention="auto", input_shapes={"q": [1, 40]})


def test_fuse_attention_auto_and_forced_lowering():
    torch.manual_seed(7)
    module = TinyAgent(bias=True).eval()
    qkv = tuple(torch.randn(1, 2, 200, 8) for _ in range(3))
    model = export(module, qkv, "torchscript", 18, names=["q", "k", "v"])
    auto = {r.family: r for r in fuse_attention(model, ["agent"], ["auto"])[1]}["agent"]
    assert auto.matches[0].route["route"] == "lowered"
    forced = {r.family: r for r in fuse_attention(model, ["agent"], ["agent", "auto"])[1]}["agent"]
    assert forced.matches[0].op_type == "Attention" and not forced.matches[0].route   # forced: no choice made
    plain = {r.family: r for r in fuse_attention(model, ["agent"])[1]}["agent"]
    assert plain.matches[0].op_type == "AgentAttention" and not plain.matches[0].route
    with pytest.raises(ValueError, match="True, False or 'auto'"):
        agent.apply(model, lower_to_attention="sometimes")
