"""Stock transformers architectures as users export them (default attention, trained-looking
random weights): the fusion passes and head pruning, each against the torch model.

Per architecture what it exercises: T5 (a per-head relative position bias on the scores,
gathered to the kept heads), OPT (the query scaled after its projection), Phi (a Reshape after
the core that reads the sizes from the model input, ``dense`` output projection), GPT-NeoX (Q,
K and V cut from one ``[.., H, 3·D]`` split by slices of its last axis; partial rotary), Falcon
(multi-query: Q, K and V as ranges of one split's heads, ``[:-2]``, ``[[-2]]``, ``[[-1]]``), GPT-BigCode
(multi-query: the query heads split off ``c_attn(x).unsqueeze(1)`` by a Reshape that drops the unit axis,
one K/V head without a heads axis of its own, cut from the same projection; TorchScript exports its
eager attention, SDPA with ``enable_gqa`` being beyond it), DistilBERT
(``n_heads`` / ``out_lin``), Qwen2 (Q/K/V biases, grouped-query attention), Mistral (its sliding
window is causal 1-D neighborhood attention; grouped-query attention), CLIP's text tower (causal
mask), DeiT (distillation token), BLOOM (ALiBi on flattened heads: ``baddbmm`` on ``[B·H, S, D]``, the
causal mask after the split into heads), MPT (ALiBi ``[H, 1, S]`` and a causal ``masked_fill``: two
masks; TorchScript cuts its fused QKV projection by ``Slice``), Qwen3 (an RMSNorm of each head's Q and
K, ``q_norm`` / ``k_norm``), Phi-3 (a fused ``qkv_proj``), GPT-J (interleaved partial rotary: each head's
pairs stacked and flattened by a Reshape that writes the head count out) and Cohere (the same after
the sequence axis, grouped-query attention), Gemma 2 (logit soft-capping: ``Attention``'s ``softcap``),
Wav2Vec2 (raw audio; a Reshape after the core whose length entry is computed from the convolutional
front end's arithmetic), DeBERTa-v2 (TorchScript: flattened heads whose scores and probabilities are
also read by Shape nodes for the views, a scale computed from ``size(-1)``), gpt-oss (attention sinks: a
logit per head joined to the scores and its column dropped after the softmax, sliced with the heads; the
pruned graph fused again; grouped-query attention), ModernBERT (three layers, ``Wqkv`` / ``Wo``, local attention
in two; TorchScript splits its fused QKV with ``unbind(dim=-3)``: a negative axis), Swin (windows, a relative
position bias per head; BERT-style modules), OLMo2 (``q_norm`` / ``k_norm``: RMSNorms over all the heads' channels
before the head split, kept over the original width; the torch reference zeroes the pruned heads' channels at the
norms' inputs), DeepSeek-V3 (multi-head latent attention: each head's key part and value from ``kv_b_proj``, one
rotary key part per token broadcast into every head and written into an empty key by ``ScatterND``, dynamo's and
TorchScript's forms), ALBERT (one attention module shared by both layers, each layer's copy in the graph pruned
to other heads; the torch reference gates each call of the module with its layer's heads). Models that need more
are in docs/shrink.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.compiler.reference import pruned_gates
from attnc.models.transformers_zoo import Output, build, dynamic_axes, example_input
from attnc.passes import fuse_attention, neighborhood
from attnc.passes.prune_heads import find_attention_layers, gates_from_keep, head_gates, prune_heads

transformers = pytest.importorskip("transformers")

# name -> exporters, fused family, heads to keep per layer
CASES = {
    "t5": (["dynamo", "torchscript"], "softmax", {0: [0, 2, 3], 1: [1]}),
    "opt": (["dynamo"], "softmax", {0: [1, 2], 1: [0, 1, 3]}),
    "phi": (["dynamo"], "softmax", {0: [3], 1: [0, 2]}),
    "gpt_neox": (["dynamo", "torchscript"], "softmax", {0: [0, 3], 1: [1, 2, 3]}),
    "falcon": (["dynamo", "torchscript"], "softmax", {0: [0, 2, 3], 1: [1]}),   # multi-query: query heads
    "gpt_bigcode": (["dynamo", "torchscript"], "softmax", {0: [1, 3], 1: [0, 2, 3]}),   # multi-query: query heads
    "distilbert": (["torchscript"], "softmax", {0: [0, 1], 1: [2, 3]}),
    "qwen2": (["dynamo"], "softmax", {0: [2, 3], 1: [0, 1]}),
    "mistral": (["dynamo"], "neighborhood", {0: [0, 1], 1: [2, 3]}),
    "clip_text": (["dynamo"], "softmax", {0: [1, 2, 3], 1: [0]}),
    "deit": (["torchscript"], "softmax", {0: [0, 3], 1: [1, 2]}),
    "bloom": (["dynamo", "torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3]}),
    "mpt": (["dynamo", "torchscript"], "softmax", {0: [3], 1: [0, 1]}),
    "qwen3": (["dynamo", "torchscript"], "softmax", {0: [0, 1], 1: [2, 3]}),   # K/V groups of 2
    "phi3": (["torchscript"], "softmax", {0: [1, 2], 1: [0, 3]}),
    "gptj": (["dynamo", "torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3]}),
    "cohere": (["dynamo"], "softmax", {0: [2, 3], 1: [0, 1]}),   # K/V groups of 2
    "gemma2": (["dynamo"], "softmax", {0: [0, 1], 1: [2, 3]}),
    "wav2vec2": (["dynamo", "torchscript"], "softmax", {0: [1, 3], 1: [0, 1, 2]}),
    "deberta_v2": (["dynamo", "torchscript"], "softmax", {0: [0, 1, 3], 1: [2]}),
    "gpt_oss": (["dynamo", "torchscript"], "softmax", {0: [2, 3], 1: [0, 1]}),   # sinks; K/V groups of 2
    # (both exporters in benchmarks/coverage_transformers.py; here the one each fix was for)
    "modernbert": (["torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3], 2: [3]}),   # three layers
    "swin": (["dynamo"], "softmax", {0: [1, 3], 1: [0, 1, 2]}),
    # (dynamo's forms of these two: tests/passes/test_prune_heads.py, on hand-written layers)
    "olmo2": (["torchscript"], "softmax", {0: [2, 3], 1: [0, 1]}),   # q/k norms across the heads; K/V groups of 2
    "deepseek_v3": (["torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3]}),   # a key part shared by the heads
    "albert": (["torchscript"], "softmax", {0: [0, 3], 1: [1, 2, 3]}),   # one attention module run as both layers
}
# Multi-query layers (one K/V head) can only lose query heads.
MULTI_QUERY = {"falcon", "gpt_bigcode"}
# Models whose pruned graph is fused again and checked: gpt-oss's sinks, sliced with the heads, stay a
# constant per head that the softmax pass folds into the fused attention; DeepSeek-V3's key, its shared part
# broadcast into the kept heads.
FUSE_PRUNED = {"gpt_oss", "deepseek_v3"}
# (name, exporter) -> the attention implementation to export: TorchScript cannot export SDPA with
# enable_gqa, which transformers uses for grouped- and multi-query attention (GPT-BigCode's one K/V head,
# Qwen3's groups): those export transformers' eager attention, as users would.
IMPLEMENTATION = {("gpt_bigcode", "torchscript"): "eager", ("qwen3", "torchscript"): "eager",
                  ("olmo2", "torchscript"): "eager"}


# The second exporter of these runs in the full tier only (ATTNC_FULL_TESTS=1): each costs 10-20 s of dynamo export
# on CI's cores, and the architecture's TorchScript graph is checked in CI.
FULL_TIER = {("gpt_neox", "dynamo"), ("falcon", "dynamo"), ("gpt_bigcode", "dynamo"), ("bloom", "dynamo"),
             ("mpt", "dynamo"), ("gptj", "dynamo"), ("wav2vec2", "dynamo"), ("deberta_v2", "dynamo")}


@pytest.mark.parametrize("name,exporter", [
    pytest.param(n, e, marks=[pytest.mark.full] if (n, e) in FULL_TIER else [])
    for n, (exporters, _, _) in CASES.items() for e in exporters])
def test_fuses_and_prunes(name, exporter, tmp_path):
    _, family, keep = CASES[name]
    hf = build(name)   # trained-looking weights: no zero biases or ones the exporters share
    if (name, exporter) in IMPLEMENTATION:
        hf.set_attn_implementation(IMPLEMENTATION[name, exporter])
    model = Output(hf).eval()
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (example_input(name, 2, 9),), path, exporter=exporter, input_names=["x"],
                dynamic_axes=dynamic_axes(name))
    onnx_model = onnx.load(str(path))
    x = example_input(name, 3, 11, torch.Generator().manual_seed(1))

    fused, reports = fuse_attention(onnx_model)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {family: len(keep)}
    with torch.no_grad():
        np.testing.assert_allclose(load(fused).infer({"x": x.numpy()})["output"], model(x).numpy(),
                                   rtol=1e-4, atol=1e-5)

    layers = find_attention_layers(onnx_model)
    assert [l.heads for l in layers] == [4] * len(keep)
    pruned, report = prune_heads(onnx_model, keep=keep, granularity="query" if name in MULTI_QUERY else "group")
    assert [l.heads_after for l in report.layers] == [len(keep[i]) for i in range(len(keep))]
    got = load(pruned).infer({"x": x.numpy()})["output"]

    def masked(kept):
        with torch.no_grad(), head_gates(model, gates_from_keep(kept, {l.index: l.heads for l in layers})):
            return model(x).numpy()

    np.testing.assert_allclose(got, masked(keep), rtol=1e-4, atol=2e-5)
    # `attnc validate` finds the same modules from the manifest (by projection fingerprint or order)
    found = pruned_gates(model, report.to_dict())
    expected = gates_from_keep(keep, {l.index: l.heads for l in layers})
    assert found.keys() == expected.keys() and all(torch.equal(found[i], expected[i]) for i in expected)
    other = {i: [h for h in range(4) if h not in kept] for i, kept in keep.items()}
    assert not np.allclose(got, masked(other), atol=1e-3)
    if name in FUSE_PRUNED:
        fused, reports = fuse_attention(pruned)
        assert {r.family: r.rewritten for r in reports if r.rewritten} == {family: len(keep)}
        np.testing.assert_allclose(load(fused).infer({"x": x.numpy()})["output"], got, rtol=1e-4, atol=1e-5)


def test_a_mask_onnx_runtime_cannot_evaluate_is_a_near_miss(tmp_path):
    """Falcon with ALiBi builds its bias in bfloat16, which ONNX Runtime's CPU kernels do not compute:
    the neighborhood pass, which evaluates masks to prove windows, reported that as a crash of
    ``fuse_attention``; it is a near-miss naming the failure, and the softmax pass fuses both layers."""
    torch.manual_seed(0)
    hf = transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, alibi=True,
        new_decoder_architecture=False, multi_query=False)).eval()
    path = export_onnx(Output(hf).eval(), (torch.randint(0, 64, (2, 9)),), tmp_path / "falcon.onnx",
                       input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    misses = neighborhood.find(model).near_misses
    assert len(misses) == 2 and all("cannot be computed at sampled sizes" in m.reason for m in misses), misses
    _, reports = fuse_attention(model)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {"softmax": 2}
