"""Small transformers models built from their configs: the architectures attnc is checked on.

Two layers (ModernBERT three: one global in every three), four heads, width 32 (random weights; no
hub downloads), one builder per architecture. ``tests/passes/test_transformers.py`` fuses and prunes a
chosen set of them against the torch model; ``benchmarks/coverage_transformers.py`` maps all of them with
both exporters. transformers is imported only when a model is built.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
           max_position_embeddings=64)
_VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
               patch_size=8)
IMAGE = frozenset({"vit", "deit", "beit", "clip_vision", "siglip_vision", "dinov2", "swin"})   # x: [B, 3, 16, 16]
AUDIO = frozenset({"wav2vec2"})                                                       # x: raw audio [B, T]
MEL = frozenset({"whisper_encoder"})        # x: a log-mel spectrogram [B, 8, 32] (Whisper wants exactly 32 frames)
# Exported at one length: MiniMax's lightning attention loops over blocks of 4 tokens in Python, which an
# export unrolls for the length it sees (``STATIC_TOKENS`` tokens: blocks of 4, 4 and 1).
STATIC_LENGTH = frozenset({"minimax"})
STATIC_TOKENS = 9


def exportable_experts(config):
    """``config`` with the mixture-of-experts layers on transformers' ``batched_mm`` path: the default
    path calls a custom op that no ONNX exporter translates."""
    config._experts_implementation = "batched_mm"
    return config


def builders() -> dict[str, Callable[[], torch.nn.Module]]:
    """name -> zero-argument builder of the transformers model (not wrapped, train mode)."""
    import transformers as t

    lm = _LM
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)   # within the small vocabularies
    sliding = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"])
    return {
        "bert": lambda: t.BertModel(t.BertConfig(**lm), add_pooling_layer=False),
        "roberta": lambda: t.RobertaModel(t.RobertaConfig(**lm), add_pooling_layer=False),
        "electra": lambda: t.ElectraModel(t.ElectraConfig(embedding_size=32, **lm)),
        "albert": lambda: t.AlbertModel(t.AlbertConfig(embedding_size=32, **lm), add_pooling_layer=False),
        "distilbert": lambda: t.DistilBertModel(t.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                                   vocab_size=64, max_position_embeddings=64)),
        "deberta_v2": lambda: t.DebertaV2Model(t.DebertaV2Config(**lm)),
        "xlm_roberta": lambda: t.XLMRobertaModel(t.XLMRobertaConfig(**lm), add_pooling_layer=False),
        # local (sliding-window, both sides) attention in two layers of three, global in the third
        "modernbert": lambda: t.ModernBertModel(t.ModernBertConfig(
            **{**lm, "num_hidden_layers": 3}, local_attention=4, global_attn_every_n_layers=3, cls_token_id=1,
            sep_token_id=2, **ids)),
        "t5": lambda: t.T5EncoderModel(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                  vocab_size=64)),
        "bart_encoder": lambda: t.BartModel(t.BartConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, max_position_embeddings=64)).encoder,
        "whisper_encoder": lambda: t.WhisperModel(t.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=1, decoder_attention_heads=4,
            encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, num_mel_bins=8, max_source_positions=16,
            max_target_positions=16, decoder_start_token_id=1, **ids)).encoder,
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
        "gemma3": lambda: t.Gemma3ForCausalLM(t.Gemma3TextConfig(**lm, num_key_value_heads=2, head_dim=8,
                                                                 **sliding)),
        "cohere": lambda: t.CohereForCausalLM(t.CohereConfig(**lm, num_key_value_heads=2)),
        "cohere2": lambda: t.Cohere2ForCausalLM(t.Cohere2Config(**lm, num_key_value_heads=2, **sliding)),
        "starcoder2": lambda: t.Starcoder2ForCausalLM(t.Starcoder2Config(**lm, num_key_value_heads=2)),
        "olmo": lambda: t.OlmoForCausalLM(t.OlmoConfig(**lm, pad_token_id=0)),
        "granite": lambda: t.GraniteForCausalLM(t.GraniteConfig(**lm, num_key_value_heads=2)),
        "olmo2": lambda: t.Olmo2ForCausalLM(t.Olmo2Config(**lm, num_key_value_heads=2, pad_token_id=0)),
        "smollm3": lambda: t.SmolLM3ForCausalLM(t.SmolLM3Config(**lm, num_key_value_heads=2, pad_token_id=0)),
        "helium": lambda: t.HeliumForCausalLM(t.HeliumConfig(**lm, num_key_value_heads=2, head_dim=8)),
        "nemotron": lambda: t.NemotronForCausalLM(t.NemotronConfig(**lm, num_key_value_heads=2, head_dim=8)),
        "mixtral": lambda: t.MixtralForCausalLM(exportable_experts(t.MixtralConfig(
            **lm, num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=1))),
        # attention sinks: a learned logit per head joins each softmax row, then its column is dropped
        "gpt_oss": lambda: t.GptOssForCausalLM(exportable_experts(t.GptOssConfig(
            **lm, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, **sliding))),
        # multi-head latent attention: Q and K/V from low-rank projections, a rotary part shared by the heads
        "deepseek_v3": lambda: t.DeepseekV3ForCausalLM(exportable_experts(t.DeepseekV3Config(
            **lm, num_key_value_heads=4, n_routed_experts=2, num_experts_per_tok=1, n_shared_experts=1,
            moe_intermediate_size=16, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=2, n_group=1, topk_group=1))),
        # lightning attention (linear, per-head decay, blocks of 4 tokens) in layer 0, softmax in layer 1
        "minimax": lambda: t.MiniMaxForCausalLM(exportable_experts(t.MiniMaxConfig(
            **lm, num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, block_size=4,
            layer_types=["linear_attention", "full_attention"]))),
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
        "swin": lambda: t.SwinModel(t.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[2],
                                                 num_heads=[4], window_size=4), add_pooling_layer=False),
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
    """Token ids in ``[0, 64)`` (``STATIC_TOKENS`` of them for ``STATIC_LENGTH`` models), a 16×16 image, a
    spectrogram, or raw audio giving about ``tokens`` frames."""
    if name in IMAGE:
        return torch.randn(batch, 3, 16, 16, generator=generator)
    if name in MEL:
        return torch.randn(batch, 8, 32, generator=generator)
    if name in AUDIO:
        return torch.randn(batch, 4 * tokens + 3, generator=generator)
    return torch.randint(0, 64, (batch, STATIC_TOKENS if name in STATIC_LENGTH else tokens), generator=generator)


def dynamic_axes(name: str, input_name: str = "x") -> dict[str, dict[int, str]]:
    """Dynamic batch, and dynamic length except for inputs of one size (images, spectrograms) and
    ``STATIC_LENGTH`` models."""
    fixed = name in IMAGE | MEL | STATIC_LENGTH
    return {input_name: {0: "batch"} if fixed else {0: "batch", 1: "seq"}}


class Output(torch.nn.Module):
    """A transformers model as ``x -> tensor``: its logits, else its last hidden state (a tuple's first
    element, a tensor as it is)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return first_output(self.model(x))


def first_output(out) -> torch.Tensor:
    """A transformers model's output as one tensor: its logits, else its last hidden state (a tuple's first
    element, a tensor as it is)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def minimax_lm(layer_types: tuple[str, ...] = ("linear_attention", "full_attention"), seed: int = 0
               ) -> torch.nn.Module:
    """A transformers ``MiniMaxForCausalLM`` with these layers (``"linear_attention"``: lightning attention,
    ``"full_attention"``: softmax attention; MiniMax-Text-01 has seven of the first to one of the second),
    configured as the zoo's ``minimax`` and :func:`perturbed` from ``seed``: the model :class:`MiniMaxDecoder`
    runs."""
    import transformers as t

    config = exportable_experts(t.MiniMaxConfig(
        **{**_LM, "num_hidden_layers": len(layer_types)}, num_key_value_heads=2, head_dim=8, num_local_experts=2,
        num_experts_per_tok=1, block_size=4, layer_types=list(layer_types)))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return perturbed(t.MiniMaxForCausalLM(config))


class MiniMaxDecoder(torch.nn.Module):
    """A transformers MiniMax LM (:func:`minimax_lm`) as prefill and decode graphs:
    ``ids -> (logits, state_0, ...)`` on a prompt (lightning layers on their blockwise path: export at the
    prompt's length), ``(ids [B, 1], state_0, ...) -> (logits, state_0', ...)`` for one token (lightning
    layers on their recurrent path). The states, layer by layer: a lightning layer's decayed ``Σ kᵀv``
    ``[B, H, D, D]`` (MiniMax's linear cache), a softmax layer's keys and values ``[B, H_kv, P, D]`` (its
    KV cache, ``P`` tokens so far)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.layer_types = list(model.config.layer_types)

    def forward(self, ids, *states):
        from transformers.models.minimax.modeling_minimax import MiniMaxCache

        cache, given, past = MiniMaxCache(), iter(states), 0
        for layer, kind in enumerate(self.layer_types if states else []):
            if kind == "linear_attention":
                cache.set_linear_cache(layer, next(given))
            else:
                keys, values = next(given), next(given)
                cache.update(keys, values, layer)
                past = keys.shape[2]
        # positions from the KV cache (transformers reads the first layer's, a lightning layer's here)
        positions = torch.arange(ids.shape[1]).unsqueeze(0) + past
        logits = self.model(ids, past_key_values=cache, position_ids=positions, use_cache=True).logits
        out = []
        for layer, kind in enumerate(self.layer_types):
            out += [cache.linear_cache[layer]] if kind == "linear_attention" else \
                [cache.layers[layer].keys, cache.layers[layer].values]
        return (logits, *out)

    def logits(self, ids):
        """The logits of one pass over ``ids`` without a cache."""
        return self.model(ids, use_cache=False).logits


def _named_states():
    from attnc.models.linear import LightningLM

    # state_0, state_1, ... as forward()'s parameters, for the dynamo exporter (see attnc.models.linear)
    MiniMaxDecoder.forward.__signature__ = LightningLM.forward.__signature__


_named_states()
