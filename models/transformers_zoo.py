"""Small transformers models built from their configs: the architectures attnc is checked on.

Two layers, four heads, width 32 (random weights; no hub downloads), one builder per
architecture. ``tests/passes/test_transformers.py`` fuses and prunes a chosen set of them against
the torch model; ``benchmarks/coverage_transformers.py`` maps all of them with both exporters.
transformers is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
           max_position_embeddings=64)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
               patch_size=8)
IMAGE = frozenset({"vit", "deit", "beit", "clip_vision", "siglip_vision", "dinov2"})   # x: [B, 3, 16, 16]
AUDIO = frozenset({"wav2vec2"})                                                       # x: raw audio [B, T]


def builders() -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> zero-argument builder of the transformers model (not wrapped, train mode)."""
    import transformers as t

    lm = _LM
    return {
        "bert": lambda: t.BertModel(t.BertConfig(**lm), add_pooling_layer=False),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**lm), add_pooling_layer=False),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(embedding_size=32, **lm)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(embedding_size=32, **lm), add_pooling_layer=False),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                   vocab_size=64, max_position_embeddings=64)),
        "deberta_v2": lambda: t.DebertaV2Model(t.DebertaV2Config(**lm)),
        "t5": lambda: t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                  vocab_size=64)),
        "bart_encoder": lambda: t.BartModel(t.BartConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=64)).encoder,
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64)),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                                                       rotary_dim=4)),
        "gpt_neox": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**lm)),
        "gpt_bigcode": lambda: t.GPTBigCodeForCausalLM(t.GPTBigCodeConfig(n_embd=32, n_layer=2, n_head=4,
                                                                          vocab_size=64, n_positions=64)),
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                    ffn_dim=64, vocab_size=64, max_position_embeddings=64,
                                                    word_embed_proj_dim=32)),
        "bloom": lambda: t.BloomForCausalLM(t.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)),
        "mpt": lambda: t.MptForCausalLM(t.MptConfig(d_model=32, n_layers=2, n_heads=4, vocab_size=64,
                                                    max_seq_len=64, expansion_ratio=2)),
        "falcon": lambda: t.FalconForCausalLM(t.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, vocab_size=64,
                                                             new_decoder_architecture=False, multi_query=True)),
        "phi": lambda: t.PhiForCausalLM(t.PhiConfig(**lm)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**lm, pad_token_id=0)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**lm, num_key_value_heads=2)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**lm, num_key_value_heads=2, sliding_window=4)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**lm, num_key_value_heads=2)),
        "qwen3": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**lm, num_key_value_heads=2, head_dim=8)),
        "gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**lm, num_key_value_heads=2, head_dim=8)),
        "gemma2": lambda: t.Gemma2ForCausalLM(t.Gemma2Config(**lm, num_key_value_heads=2, head_dim=8)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**lm, num_key_value_heads=2)),
        "starcoder2": lambda: t.Starcoder2ForCausalLM(t.Starcoder2Config(**lm, num_key_value_heads=2)),
        "olmo": lambda: t.OlmoForCausalLM(t.OlmoConfig(**lm, pad_token_id=0)),
        "granite": lambda: t.GraniteForCausalLM(t.GraniteConfig(**lm, num_key_value_heads=2)),
        "clip_text": lambda: t.CLIPTextModel(t.CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              vocab_size=64, max_position_embeddings=64)),
        "vit": lambda: t.ViTModel(t.ViTConfig(**_VISION), add_pooling_layer=False),
        "deit": lambda: t.DeiTModel(t.DeiTConfig(**_VISION), add_pooling_layer=False),
        "beit": lambda: t.BeitModel(t.BeitConfig(**_VISION, use_relative_position_bias=True),
                                    add_pooling_layer=False),
        "clip_vision": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**_VISION)),
        "siglip_vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**_VISION)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**{k: v for k, v in _VISION.items()
                                                          if k != "intermediate_size"}, mlp_ratio=2)),
        "wav2vec2": lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(8, 8),
            conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)),
    }


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode with its weights nudged (``0.02 · N(0, 1)``, from the current torch seed) so
    they look trained: no zero biases, no equal tensors that an exporter would share."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def build(name: str, seed: int = 0) -> torch.nn.Module:
    """The ``name`` model, :func:`perturbed` from ``seed`` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturbed(builders()[name]())


def example_input(name: str, batch: int, tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Token ids in ``[0, 64)``, a 16×16 image, or raw audio giving about ``tokens`` frames."""
    if name in IMAGE:
        return torch.randn(batch, 3, 16, 16, generator=generator)
    if name in AUDIO:
        return torch.randn(batch, 4 * tokens + 3, generator=generator)
    return torch.randint(0, 64, (batch, tokens), generator=generator)


def dynamic_axes(name: str, input_name: str = "x") -> dict[str, dict[int, str]]:
    """Dynamic batch, and dynamic length except for images."""
    return {input_name: {0: "batch"} if name in IMAGE else {0: "batch", 1: "seq"}}


class Output(torch.nn.Module):
    """A transformers model as ``x -> tensor``: its logits, else its last hidden state (a tuple's first
    element, a tensor as it is)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, torch.Tensor):
            return out
        if isinstance(out, tuple):
            return out[0]
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
