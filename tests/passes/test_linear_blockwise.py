"""passes/linear.py on blockwise (chunked) lightning attention: Lightning Attention-2's prefill loop,
unrolled by the export, -> one attnc::KernelLinearAttention.

The module is :class:`attnc.models.linear.BlockwiseLightningAttention`, its blocks joined with
``torch.cat`` or written into a preallocated output as MiniMax-Text-01 does (``write="slice_assign"``,
a ScatterND chain), first checked in float64 against :class:`LightningAttention`, an independent
numpy loop and the op's reference; each test exports it with a static sequence length (dynamic
batch), runs the pass, and compares ONNX Runtime after the pass with ONNX Runtime before it and with
the module in float64 at batches 2 and 3. Near-misses (one block wrong, writes that overlap or
leave rows unwritten) must leave the graph as it was.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper
import pytest
import torch
from torch import nn

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.models.linear import BlockwiseLightningAttention, LightningAttention
from attnc.passes import fuse_attention, linear
from attnc.plugins import linear as plugin
from attnc.testing import export_spec

OP = "KernelLinearAttention"
DIM, HEADS, BLOCK = 24, 3, 8
NO_DECAY = [0.0] * HEADS   # slopes 0: λ = 1
WRITES = BlockwiseLightningAttention.WRITES


def _count(model, op_type=OP):
    return sum(n.op_type == op_type for n in model.graph.node)


class _Prefill(nn.Module):
    """``attn.recurrent`` as the exported graph: ``x[, state] -> (out, state_out)``."""

    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, state=None):
        return self.attn.recurrent(x, state)


def _export(module, args, tmp_path, exporter, names=("x",), dynamic_tokens=False):
    outputs = ["output", "output_1"][:len(names) + (isinstance(module, _Prefill) and len(names) == 1)]
    axes = {name: {0: "batch", **({1: "seq"} if dynamic_tokens and name in ("x", "output") else {})}
            for name in (*names, *outputs)}
    path = export_onnx(module.eval(), args, tmp_path / f"m_{exporter}.onnx", exporter=exporter, opset=18,
                       dynamic_axes=axes, input_names=list(names))
    return onnx.load(path)


def _numpy_lightning(q, k, v, lam, s0=None):
    """O_t = Σ_{s≤t} λ^{t−s} (q_t·k_s) v_s + λ^{t+1} q_t·S0 and the final state, token by token."""
    b, h, n, d = q.shape
    out = np.zeros((b, h, n, v.shape[-1]))
    lam = np.asarray(lam)[None, :, None, None]
    state = np.zeros((b, h, d, v.shape[-1])) if s0 is None else s0.copy()
    for t in range(n):
        state = lam * state + np.einsum("bhd,bhe->bhde", k[:, :, t], v[:, :, t])
        out[:, :, t] = np.einsum("bhd,bhde->bhe", q[:, :, t], state)
    return out, state


# ----------------------------------------------------------------------------- the reference module

@pytest.mark.parametrize("n", [1, 5, 8, 16, 21])
@pytest.mark.parametrize("slopes", [None, NO_DECAY], ids=["alibi", "no-decay"])
@pytest.mark.parametrize("write", WRITES)
def test_blockwise_module_equals_lightning_attention(n, slopes, write):
    torch.manual_seed(n)
    blockwise = BlockwiseLightningAttention(DIM, HEADS, BLOCK, slopes=slopes, write=write).double()
    quadratic = LightningAttention(DIM, HEADS, slopes=slopes).double()
    quadratic.load_state_dict(blockwise.state_dict())
    x = torch.randn(2, n, DIM, dtype=torch.float64)
    with torch.no_grad():
        np.testing.assert_allclose(blockwise(x).numpy(), quadratic(x).numpy(), rtol=1e-12, atol=1e-12)
        q, k, v = blockwise.in_proj(x)
        state = torch.randn(2, HEADS, DIM // HEADS, DIM // HEADS, dtype=torch.float64)
        out, state_out = blockwise.blocks(q, k, v, state)
    lam = torch.exp(-blockwise.slope.double())
    want, want_state = _numpy_lightning(q.numpy(), k.numpy(), v.numpy(), lam.numpy(), state.numpy())
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state_out.numpy(), want_state, rtol=1e-12, atol=1e-12)
    ref, ref_state = plugin.reference(q, k, v, lam, state, feature_map="identity", causal=1, normalize=0,
                                      return_state=True)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state_out.numpy(), ref_state.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 65, 150])
@pytest.mark.parametrize("decay", ["alibi", "none", "zero"])
@pytest.mark.parametrize("state", [False, True])
def test_proof_expectation_equals_the_op_reference(n, decay, state):
    """The proof's float64 lightning attention (chunked masked quadratic form, for speed at N in the
    thousands) is the op's token-by-token reference, across chunk edges, with and without a state."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, HEADS, n, dv, dtype=torch.float64, generator=gen) for dv in (5, 5, 4))
    s0 = torch.randn(2, HEADS, 5, 4, dtype=torch.float64, generator=gen) if state else None
    lam = {"alibi": torch.tensor([0.5, 0.9, 0.999]), "none": torch.ones(HEADS),
           "zero": torch.tensor([0.0, 0.7, 1.0])}[decay].double()
    want, want_state = plugin.reference(q, k, v, lam, s0, feature_map="identity", causal=1, normalize=0, eps=0.0,
                                        scale=0.7, return_state=True)
    for chunk in (1, 8, 64):
        got, got_state = linear._lightning_float64(q, k, v, lam, s0, 0.7, chunk=chunk)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got_state.numpy(), want_state.numpy(), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- fused

def _check(module, model, fused, report, n, state=False, n_fused=1):
    assert report.rewritten == n_fused and _count(fused) == n_fused, report.to_dict()
    assert all(m.attributes["form"] == "blockwise" for m in report.matches)
    assert len(fused.graph.node) < len(model.graph.node) and not report.near_misses
    onnx.checker.check_model(fused)
    before, after = load(model), load(fused)
    gen = torch.Generator().manual_seed(7)
    for batch in (2, 3):
        x = torch.randn(batch, n, DIM, generator=gen)
        args = (x, torch.randn(batch, HEADS, DIM // HEADS, DIM // HEADS, generator=gen)) if state else (x,)
        feeds = dict(zip(["x", "state"], (a.numpy() for a in args)))
        got, unfused = after.infer(feeds), before.infer(feeds)
        with torch.no_grad():
            want = module.double()(*(a.double() for a in args))
        module.float()
        for name, w in zip(["output", "output_1"], want if isinstance(want, tuple) else (want,)):
            np.testing.assert_allclose(got[name], unfused[name], rtol=1e-5, atol=5e-6)
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-5, atol=5e-6)


FUSE_CASES = [(21, None), (16, NO_DECAY), (5, None)]   # N: partial last block, whole blocks, one short block


@pytest.mark.parametrize("n,slopes", FUSE_CASES, ids=["21-alibi", "16-no-decay", "5-alibi"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("write", WRITES)
def test_blockwise_prefill_fuses_into_one_node(n, slopes, exporter, write, tmp_path):
    torch.manual_seed(n)
    module = BlockwiseLightningAttention(DIM, HEADS, BLOCK, slopes=slopes, write=write)
    model = _export(module, (torch.randn(2, n, DIM),), tmp_path, exporter)
    fused, report = linear.apply(model)
    assert _count(fused, "ScatterND") == 0
    attrs = report.matches[0].attributes
    assert {k: attrs[k] for k in ("feature_map", "causal", "normalize", "scale")} == \
        {"feature_map": "identity", "causal": 1, "normalize": 0, "scale": 1.0}
    if slopes is None:
        np.testing.assert_allclose(attrs["decay"], torch.exp(-module.slope).numpy(), rtol=1e-6)
    else:
        assert "decay" not in attrs
    _check(module, model, fused, report, n)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("write", WRITES)
def test_blockwise_with_initial_state_fuses_with_state_in_and_out(exporter, write, tmp_path):
    torch.manual_seed(3)
    module = _Prefill(BlockwiseLightningAttention(DIM, HEADS, BLOCK, write=write))
    x, s0 = torch.randn(2, 19, DIM), torch.randn(2, HEADS, DIM // HEADS, DIM // HEADS)
    model = _export(module, (x, s0), tmp_path, exporter, names=("x", "state"))
    fused, report = linear.apply(model)
    assert report.matches[0].inputs["state"] == "state"
    assert report.matches[0].outputs[1] == "output_1"
    node = next(n for n in fused.graph.node if n.op_type == OP)
    assert node.input[4] == "state" and node.output[1] == "output_1"
    _check(module, model, fused, report, 19, state=True)


@pytest.mark.parametrize("write,exporter", [("cat", "torchscript"), ("slice_assign", "dynamo")])
def test_blockwise_lowered_to_onnx_linear_attention(write, exporter, tmp_path):
    torch.manual_seed(4)
    module = _Prefill(BlockwiseLightningAttention(DIM, HEADS, BLOCK, write=write))
    model = _export(module, (torch.randn(2, 13, DIM),), tmp_path, exporter)
    fused, report = linear.apply(model, lower_lightning_to_onnx=True)
    assert report.rewritten == 1 and _count(fused, "LinearAttention") == 1 and _count(fused) == 0
    x = np.random.default_rng(0).standard_normal((3, 13, DIM)).astype(np.float32)
    got, want = load(fused).infer({"x": x}), load(model).infer({"x": x})
    for name in ("output", "output_1"):   # output_1: the final state, LinearAttention's present_state
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=5e-6)


def _fold_transposes(model):
    """``model`` as a graph optimiser leaves dynamo's slice writes: Identities bypassed, a Transpose
    of a Transpose composed into one (the inner one kept while a Shape still reads it) and identity
    ones dropped, so the blocks are written into one ``[N, H, B, Dv]`` buffer whose last Transpose is
    folded into the head merge's (``[2, 0, 1, 3]``)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph, outputs = model.graph, {o.name for o in model.graph.output}

    def perm(node):
        return next(list(a.ints) for a in node.attribute if a.name == "perm")

    changed = True
    while changed:
        changed = False
        producer = {o: n for n in graph.node for o in n.output}
        for node in list(graph.node):
            first = producer.get(node.input[0]) if node.input else None
            if node.output[0] in outputs or node.op_type not in ("Identity", "Transpose"):
                continue
            if node.op_type == "Identity" or perm(node) == sorted(perm(node)):
                for other in graph.node:
                    other.input[:] = [node.input[0] if i == node.output[0] else i for i in other.input]
                graph.node.remove(node)
            elif first is not None and first.op_type == "Transpose":
                composed = [perm(first)[a] for a in perm(node)]
                node.input[0] = first.input[0]
                del node.attribute[:]
                node.attribute.append(helper.make_attribute("perm", composed))
                if not any(first.output[0] in n.input for n in graph.node) and first.output[0] not in outputs:
                    graph.node.remove(first)
            else:
                continue
            changed = True
            break
    return model


def test_blockwise_inplace_into_a_transposed_buffer_fuses_with_a_transpose(tmp_path):
    """dynamo's slice writes with their Transposes folded: a ``[N, H, B, Dv]`` buffer, read through one
    ``[2, 0, 1, 3]`` Transpose; the fused node's output goes through the Transpose that matches."""
    torch.manual_seed(6)
    module = BlockwiseLightningAttention(DIM, HEADS, BLOCK, write="slice_assign")
    model = _fold_transposes(_export(module, (torch.randn(2, 21, DIM),), tmp_path, "dynamo"))
    last = [n for n in model.graph.node if n.op_type == "ScatterND"][-1]
    (reader,) = [n for n in model.graph.node if last.output[0] in n.input]
    assert reader.op_type == "Transpose" and list(reader.attribute[0].ints) == [2, 0, 1, 3]
    fused, report = linear.apply(model)
    node = next(n for n in fused.graph.node if n.op_type == OP)
    (after,) = [n for n in fused.graph.node if node.output[0] in n.input]
    assert after.op_type == "Transpose" and list(after.attribute[0].ints) == [0, 2, 1, 3]
    _check(module, model, fused, report, 21)


def test_blockwise_inplace_registry_model_fuses():
    spec, module, model = export_spec("lightning-blockwise-inplace-small", "torchscript")
    fused, report = linear.apply(model)
    assert report.rewritten == 1 and _count(fused) == 1 and _count(fused, "ScatterND") == 0, report.to_dict()
    x = spec.example_inputs(batch=3, seed=1)[0]
    with torch.no_grad():
        want = module(x).numpy()
    got, unfused = load(fused).infer({"x": x.numpy()})["output"], load(model).infer({"x": x.numpy()})["output"]
    np.testing.assert_allclose(got, unfused, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_blockwise_lm_prefill_fuses_every_layer():
    spec, module, model = export_spec("lm-lightning-blockwise-prefill-small", "torchscript")
    fused, reports = fuse_attention(model, ["linear"])
    assert reports[0].rewritten == 2 and _count(fused) == 2 and not reports[0].near_misses
    assert sorted(m.outputs[1] for m in reports[0].matches) == ["output_1", "output_2"]
    before, after = load(model), load(fused)
    for batch, seed in ((1, 1), (3, 2)):
        ids = spec.example_inputs(batch=batch, seed=seed)
        got, unfused = after.infer({"ids": ids[0].numpy()}), before.infer({"ids": ids[0].numpy()})
        with torch.no_grad():
            want = module(*ids)
        for name, w in zip(spec.output_names, want, strict=True):
            np.testing.assert_allclose(got[name], unfused[name], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got[name], w.numpy(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- near-misses

class _Faulty(BlockwiseLightningAttention):
    """The blockwise loop (written out again) with one mistake in block ``at``:

    - ``q_power``: the inter-block term reads ``q_i ⊙ λ^j`` instead of ``λ^(j+1)``;
    - ``no_inter``: the block has no inter-block term;
    - ``intra_power``: its intra-block table is ``λ^(j−s+1)``;
    - ``k_decay_end``: its state update takes ``λ^(Bs−1−s)``'s first rows instead of the last
      (the same for a whole block, wrong for the short last one: only the final state differs);
    - ``shifted`` (``write="slice_assign"``): the block is written one row late, over the next
      block's first row, and its own first row is never written;
    - ``short`` (``write="slice_assign"``): the block's last row is not written.
    """

    def __init__(self, fault: str, at: int, write: str = "cat"):
        super().__init__(DIM, HEADS, BLOCK, write=write)
        self.fault, self.at = fault, at

    def blocks(self, q, k, v, kv=None):
        b, h, n, d = q.shape
        block, slope = self.block_size, self.slope[:, None, None]
        array = torch.arange(block, dtype=q.dtype) + 1
        q_decay = torch.exp(-slope * array[:, None])
        k_decay = torch.exp(-slope * (block - array[:, None]))
        index = array[:, None] - array[None, :]
        diag_decay = torch.exp(torch.where(index >= 0, -slope * index, float("-inf")))
        kv = torch.zeros(b, h, d, v.shape[-1]) if kv is None else kv
        outs, output = [], torch.empty(b, h, n, v.shape[-1])
        for i, start in enumerate(range(0, n, block)):
            end = min(start + block, n)
            m, wrong = end - start, i == self.at
            qi, ki, vi = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
            diag = diag_decay[:, :m, :m] * (torch.exp(-slope) if wrong and self.fault == "intra_power" else 1.0)
            out = ((qi @ ki.transpose(-1, -2)) * diag) @ vi
            if not (wrong and self.fault == "no_inter"):
                qd = torch.exp(-slope * array[:m, None]) / torch.exp(-slope) if wrong and self.fault == "q_power" \
                    else q_decay[:, :m]
                out = out + (qi * qd) @ kv
            kd = k_decay[:, :m] if wrong and self.fault == "k_decay_end" else k_decay[:, -m:]
            kv = torch.exp(-slope * m) * kv + (ki * kd).transpose(-1, -2) @ vi
            outs.append(out)
            if wrong and self.fault == "shifted":
                output[:, :, start + 1:end + 1] = out
            elif wrong and self.fault == "short":
                output[:, :, start:end - 1] = out[:, :, :-1]
            else:
                output[:, :, start:end] = out
        return (output if self.write == "slice_assign" else torch.cat(outs, dim=2)), kv


NEAR_MISSES = [  # fault, block, write, exporters, reason
    ("q_power", 1, "cat", ["dynamo", "torchscript"], "block 1 (tokens 8-15) differs from lightning attention"),
    ("no_inter", 1, "cat", ["torchscript"], "block 1 (tokens 8-15) (it has no inter-block term) differs"),
    ("intra_power", 2, "cat", ["torchscript"], "block 2's intra-block term is not proven"),
    ("k_decay_end", 2, "cat", ["torchscript"], "the state it returns (output_1) is not"),
    ("no_inter", 1, "slice_assign", ["dynamo"], "block 1 (tokens 8-15) (it has no inter-block term) differs"),
    ("shifted", 1, "slice_assign", ["dynamo", "torchscript"], "overwrites block 1's rows: the writes overlap"),
    ("short", 1, "slice_assign", ["torchscript"], "are never written and keep the buffer's content"),
]
NEAR_MISS_CASES = [(f, a, w, e, r) for f, a, w, exporters, r in NEAR_MISSES for e in exporters]


@pytest.mark.parametrize("fault,at,write,exporter,reason", NEAR_MISS_CASES,
                         ids=[f"{f}-{w}-{e}" for f, _, w, e, _ in NEAR_MISS_CASES])
def test_blockwise_near_misses_leave_the_graph_alone(fault, at, write, exporter, reason, tmp_path):
    torch.manual_seed(5)
    module = _Prefill(_Faulty(fault, at, write))
    model = _export(module, (torch.randn(2, 21, DIM),), tmp_path, exporter)
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and _count(fused) == 0 and fused is model, report.to_dict()
    assert any(reason in nm.reason for nm in report.near_misses), report.to_dict()


@pytest.mark.parametrize("write", WRITES)
def test_blockwise_with_dynamic_sequence_length_is_not_fused(write, tmp_path):
    """The loop unrolled for 21 tokens; under a dynamic ``seq`` axis the graph is right only there."""
    module = BlockwiseLightningAttention(DIM, HEADS, BLOCK, write=write)
    model = _export(module, (torch.randn(2, 21, DIM),), tmp_path, "torchscript", dynamic_tokens=True)
    fused, report = linear.apply(model)
    assert report.rewritten == 0 and _count(fused) == 0, report.to_dict()
    assert any("is dynamic (2 / 3 tokens at different input sizes)" in nm.reason for nm in report.near_misses)
