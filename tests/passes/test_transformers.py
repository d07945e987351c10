"""Stock transformers architectures as users export them (default attention, trained-looking
random weights): the fusion passes and head pruning, each against the torch model.

Per architecture what it exercises: T5 (a per-head relative position bias on the scores,
gathered to the kept heads), OPT (the query scaled after its projection), Phi (a Reshape after
the core that reads the sizes from the model input, ``dense`` output projection), GPT-NeoX (Q,
K and V cut from one ``[.., H, 3·D]`` split by slices of its last axis; partial rotary), Falcon
(multi-query: Q, K and V as ranges of one split's heads, ``[:-2]``, ``[[-2]]``, ``[[-1]]``), DistilBERT
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
also read by Shape nodes for the views, a scale computed from ``size(-1)``). Models that need more are in docs/shrink.md.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.passes import fuse_attention, neighborhood
from attnc.passes.prune_heads import find_attention_layers, gates_from_keep, head_gates, prune_heads

transformers = pytest.importorskip("transformers")

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
              max_position_embeddings=64)


def _build(name):
    t = transformers
    if name == "t5":
        return t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64))
    if name == "opt":
        return t.OPTForCausalLM(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                            vocab_size=64, max_position_embeddings=64, word_embed_proj_dim=32))
    if name == "phi":
        return t.PhiForCausalLM(t.PhiConfig(**_SMALL))
    if name == "gpt_neox":
        return t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**_SMALL))
    if name == "falcon":
        return t.FalconForCausalLM(t.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                  vocab_size=64, new_decoder_architecture=False, multi_query=True))
    if name == "distilbert":
        return t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=64,
                                                    max_position_embeddings=64))
    if name == "qwen2":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**_SMALL, num_key_value_heads=2))
    if name == "mistral":
        return t.MistralForCausalLM(t.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=4))
    if name == "clip_text":
        return t.CLIPTextModel(t.CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=64, max_position_embeddings=64))
    if name == "qwen3":
        return t.Qwen3ForCausalLM(t.Qwen3Config(**_SMALL, num_key_value_heads=2, head_dim=8))
    if name == "phi3":
        return t.Phi3ForCausalLM(t.Phi3Config(**_SMALL, pad_token_id=0))
    if name == "gptj":
        return t.GPTJForCausalLM(t.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                              rotary_dim=4))
    if name == "cohere":
        return t.CohereForCausalLM(t.CohereConfig(**_SMALL, num_key_value_heads=2))
    if name == "gemma2":
        return t.Gemma2ForCausalLM(t.Gemma2Config(**_SMALL, num_key_value_heads=2, head_dim=8))
    if name == "wav2vec2":
        return t.Wav2Vec2Model(t.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, conv_dim=(8, 8), conv_stride=(2, 2),
                                                conv_kernel=(3, 3), num_conv_pos_embeddings=4,
                                                num_conv_pos_embedding_groups=2))
    if name == "deberta_v2":
        return t.DebertaV2Model(t.DebertaV2Config(**_SMALL))
    if name == "bloom":
        return t.BloomForCausalLM(t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64))
    if name == "mpt":
        return t.MptForCausalLM(t.MptConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64, max_seq_len=64,
                                            expansion_ratio=2))
    return t.DeiTModel(t.DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    image_size=16, patch_size=8), add_pooling_layer=False)


def _input(name, batch, tokens, gen=None):
    """Token ids, a 16×16 image (DeiT) or raw audio giving about ``tokens`` frames (Wav2Vec2)."""
    if name == "deit":
        return torch.randn(batch, 3, 16, 16, generator=gen)
    if name == "wav2vec2":
        return torch.randn(batch, 4 * tokens + 3, generator=gen)
    return torch.randint(0, 64, (batch, tokens), generator=gen)


class _Output(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# name -> exporters, fused family, heads to keep per layer
CASES = {
    "t5": (["dynamo", "torchscript"], "softmax", {0: [0, 2, 3], 1: [1]}),
    "opt": (["dynamo"], "softmax", {0: [1, 2], 1: [0, 1, 3]}),
    "phi": (["dynamo"], "softmax", {0: [3], 1: [0, 2]}),
    "gpt_neox": (["dynamo", "torchscript"], "softmax", {0: [0, 3], 1: [1, 2, 3]}),
    "falcon": (["dynamo", "torchscript"], "softmax", {0: [0, 2, 3], 1: [1]}),   # multi-query: query heads
    "distilbert": (["torchscript"], "softmax", {0: [0, 1], 1: [2, 3]}),
    "qwen2": (["dynamo"], "softmax", {0: [2, 3], 1: [0, 1]}),
    "mistral": (["dynamo"], "neighborhood", {0: [0, 1], 1: [2, 3]}),
    "clip_text": (["dynamo"], "softmax", {0: [1, 2, 3], 1: [0]}),
    "deit": (["torchscript"], "softmax", {0: [0, 3], 1: [1, 2]}),
    "bloom": (["dynamo", "torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3]}),
    "mpt": (["dynamo", "torchscript"], "softmax", {0: [3], 1: [0, 1]}),
    "qwen3": (["dynamo"], "softmax", {0: [0, 1], 1: [2, 3]}),   # K/V groups of 2
    "phi3": (["torchscript"], "softmax", {0: [1, 2], 1: [0, 3]}),
    "gptj": (["dynamo", "torchscript"], "softmax", {0: [0, 2], 1: [1, 2, 3]}),
    "cohere": (["dynamo"], "softmax", {0: [2, 3], 1: [0, 1]}),   # K/V groups of 2
    "gemma2": (["dynamo"], "softmax", {0: [0, 1], 1: [2, 3]}),
    "wav2vec2": (["dynamo", "torchscript"], "softmax", {0: [1, 3], 1: [0, 1, 2]}),
    "deberta_v2": (["dynamo", "torchscript"], "softmax", {0: [0, 1, 3], 1: [2]}),
}


@pytest.mark.parametrize("name,exporter", [(n, e) for n, (exporters, _, _) in CASES.items() for e in exporters])
def test_fuses_and_prunes(name, exporter, tmp_path):
    _, family, keep = CASES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = _build(name).eval()
        for p in hf.parameters():   # trained-looking: no zero biases or ones shared by the exporters
            p.data.add_(0.02 * torch.randn_like(p))
    model = _Output(hf).eval()
    image = name == "deit"
    example = _input(name, 2, 9)
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, (example,), path, exporter=exporter, input_names=["x"],
                dynamic_axes={"x": {0: "batch"}} if image else {"x": {0: "batch", 1: "seq"}})
    onnx_model = onnx.load(str(path))
    gen = torch.Generator().manual_seed(1)
    x = _input(name, 3, 11, gen)

    fused, reports = fuse_attention(onnx_model)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {family: 2}
    with torch.no_grad():
        np.testing.assert_allclose(load(fused).infer({"x": x.numpy()})["output"], model(x).numpy(),
                                   rtol=1e-4, atol=1e-5)

    layers = find_attention_layers(onnx_model)
    assert [l.heads for l in layers] == [4, 4]
    pruned, report = prune_heads(onnx_model, keep=keep, granularity="query" if name == "falcon" else "group")
    assert [l.heads_after for l in report.layers] == [len(keep[0]), len(keep[1])]
    got = load(pruned).infer({"x": x.numpy()})["output"]

    def masked(kept):
        with torch.no_grad(), head_gates(model, gates_from_keep(kept, {l.index: l.heads for l in layers})):
            return model(x).numpy()

    np.testing.assert_allclose(got, masked(keep), rtol=1e-4, atol=2e-5)
    other = {i: [h for h in range(4) if h not in kept] for i, kept in keep.items()}
    assert not np.allclose(got, masked(other), atol=1e-3)


def test_a_mask_onnx_runtime_cannot_evaluate_is_a_near_miss(tmp_path):
    """Falcon with ALiBi builds its bias in bfloat16, which ONNX Runtime's CPU kernels do not compute:
    the neighborhood pass, which evaluates masks to prove windows, reported that as a crash of
    ``fuse_attention``; it is a near-miss naming the failure, and the softmax pass fuses both layers."""
    torch.manual_seed(0)
    hf = transformers.FalconForCausalLM(transformers.FalconConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, alibi=True,
        new_decoder_architecture=False, multi_query=False)).eval()
    path = export_onnx(_Output(hf).eval(), (torch.randint(0, 64, (2, 9)),), tmp_path / "falcon.onnx",
                       input_names=["x"], dynamic_axes={"x": {0: "batch", 1: "seq"}})
    model = onnx.load(str(path))
    misses = neighborhood.find(model).near_misses
    assert len(misses) == 2 and all("cannot be computed at sampled sizes" in m.reason for m in misses), misses
    _, reports = fuse_attention(model)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {"softmax": 2}
