"""Helpers the test-suite shares: export a module to an in-memory ONNX model, run one.

They live in the package (like ``torch.testing``) so every test file imports the same
code; tests compare against independent references, never against these helpers.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx


def export_model(module, inputs, exporter: str = "torchscript", opset: int = 17,
                 dynamic_axes: dict | None = None, names: Sequence[str] = ("x",)) -> onnx.ModelProto:
    """Export ``module`` on ``inputs`` with :func:`attnc.compiler.export.export_onnx`, return the proto."""
    from attnc.compiler.export import export_onnx

    inputs = inputs if isinstance(inputs, (tuple, list)) else (inputs,)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(module, tuple(inputs), path, exporter=exporter, opset=opset, dynamic_axes=dynamic_axes,
                    input_names=list(names))
        return onnx.load(str(path))


def run_model(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The first output of ``model`` on ``feeds``, ONNX Runtime CPU, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def assert_fusion_preserves_outputs(model: onnx.ModelProto, fused: onnx.ModelProto, module, inputs_list,
                                    rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """For every input set: ORT on ``fused`` equals ORT on ``model`` and ``module`` in PyTorch.

    The PyTorch comparison allows ``atol`` of at least 1e-5 (the export itself rounds).
    """
    import torch

    names = [i.name for i in model.graph.input]
    for inputs in inputs_list:
        feeds = {n: t.numpy() for n, t in zip(names, inputs)}
        before, after = run_model(model, feeds), run_model(fused, feeds)
        with torch.no_grad():
            expected = module(*inputs).numpy()
        np.testing.assert_allclose(after, before, rtol=rtol, atol=atol)
        np.testing.assert_allclose(after, expected, rtol=rtol, atol=max(atol, 1e-5))


_SPEC_EXPORTS: dict[tuple[str, str, int, int], bytes] = {}


def export_spec(name: str, exporter: str, batch: int = 2, opset: int = 18):
    """``(spec, module, model)``: registry model ``name`` exported with its dynamic axes and input
    names on its example inputs at ``batch`` (seed 0).

    Registry factories are seeded, so the export is kept per process and test files exporting the
    same model share it (a dynamo export costs seconds; the suite made the same ones up to six
    times). Every call gets a fresh module and its own copy of the model to change.
    """
    from attnc.models.registry import get_spec

    spec = get_spec(name)
    module = spec.factory().eval()
    key = (name, exporter, batch, opset)
    if key not in _SPEC_EXPORTS:
        model = export_model(module, spec.example_inputs(batch=batch, seed=0), exporter=exporter, opset=opset,
                             dynamic_axes=spec.dynamic_axes, names=spec.input_names)
        _SPEC_EXPORTS[key] = model.SerializeToString()
    return spec, module, onnx.load_from_string(_SPEC_EXPORTS[key])


def assert_spec_fusion_preserves_outputs(spec, module, model: onnx.ModelProto, fused: onnx.ModelProto) -> None:
    """At batches 2 and 3 on fresh inputs: ORT on ``fused`` equals ORT on ``model`` (1e-5) and PyTorch (1e-4 rel)."""
    import torch

    from attnc.compiler.backends.onnxruntime import load

    before, after = load(model), load(fused)
    for batch, seed in ((2, 1), (3, 2)):
        fresh = spec.example_inputs(batch=batch, seed=seed)
        feeds = {n: t.numpy() for n, t in zip(spec.input_names, fresh)}
        got = after.infer(feeds)["output"]
        np.testing.assert_allclose(got, before.infer(feeds)["output"], rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            np.testing.assert_allclose(got, module(*fresh).numpy(), rtol=1e-4, atol=1e-5)


def rtx_plugin_env(directory: Path) -> dict[str, str] | None:
    """The environment of a subprocess whose TensorRT-RTX parser can add Python plugin layers:
    ``libtensorrt_rtx.so`` linked to the wheel's ``.so.1`` in ``directory``, put on LD_LIBRARY_PATH
    (docs/tensorrt.md). None unless TensorRT-RTX is the TensorRT that imports."""
    from attnc.compiler.backends import tensorrt
    from attnc.compiler.errors import AttncError

    try:
        _, flavour = tensorrt.import_tensorrt()
    except AttncError:
        return None
    if flavour != "tensorrt_rtx":
        return None
    shim = Path(directory) / "lib"
    shim.mkdir(exist_ok=True)
    libs = Path(importlib.util.find_spec("tensorrt_rtx_libs").origin).parent
    (shim / "libtensorrt_rtx.so").symlink_to(libs / "libtensorrt_rtx.so.1")
    return {**os.environ, "LD_LIBRARY_PATH": f"{shim}:{os.environ.get('LD_LIBRARY_PATH', '')}"}


def tensorrt_or_skip():
    """``(tensorrt module, flavour)`` (:func:`attnc.compiler.backends.tensorrt.import_tensorrt`), or the calling test
    skipped with why where neither TensorRT nor TensorRT-RTX imports."""
    import pytest

    from attnc.compiler.backends.tensorrt import import_tensorrt
    from attnc.compiler.errors import AttncError

    try:
        return import_tensorrt()
    except AttncError as exc:
        pytest.skip(f"needs tensorrt or tensorrt_rtx: {exc.problem}")


def shape_profile(shapes: dict[str, Sequence[Sequence[int]]]) -> list[str]:
    """``attnc compile``'s ``--min-shape`` / ``--opt-shape`` / ``--max-shape`` arguments for ``{input: (min shape, opt
    shape, max shape)}``."""
    flags = ("--min-shape", "--opt-shape", "--max-shape")
    return [arg for i, flag in enumerate(flags) for name, given in shapes.items()
            for arg in (flag, f"{name}:{'x'.join(map(str, given[i]))}")]


def build_exited_engine(path, pixel_shape: Sequence[int], text_before: int, out: Path, exit_layer: int = 2,
                        pixels: str = "pixel_values") -> dict:
    """``attnc compile``'s fp16 TensorRT engine of the vision-language export at ``path`` (``pixels [batch,
    *pixel_shape]``: ``pixel_values``, or a clip's ``pixel_values_videos``) with its image gone before decoder layer
    ``exit_layer``, at batch 1-4 and 1-64 text tokens after the ``text_before`` in front of the image, written to
    ``out``; its manifest."""
    import json

    profile = shape_profile({pixels: [(b, *pixel_shape) for b in (1, 2, 4)],
                             "input_ids": [(1, text_before + 1), (2, text_before + 16), (4, text_before + 64)]})
    run_cli("compile", path, "-o", out, "--backend", "tensorrt", "--precision", "fp16", "--token-exit", "static",
            "--exit-layer", exit_layer, *profile)
    return json.loads((out / "manifest.json").read_text())


def run_cli(*args, ok: bool = True):
    """``attnc ARGS`` in this process (click's ``CliRunner``, exceptions not caught); with ``ok``, the exit code
    must be 0."""
    from click.testing import CliRunner

    from attnc.compiler.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def check_padded_prompts(module, spec, alone) -> None:
    """``module`` (a vision-language checkpoint's, with ``spec``) on padded prompts (``--with-attention-mask``): 3
    prompts padded 0, 2 and 4 tokens after the text in front of the last image; each row's logits at its tokens must
    equal ``alone(visual, tokens)``, a reference's logits of that row's image (or clip) and its unpadded tokens."""
    import numpy as np
    import torch

    from attnc.models.hf_checkpoint import with_attention_mask

    masked, masked_spec = with_attention_mask(module, spec)
    seq = module.layout.text_before_end + 7
    visual, ids, mask = masked_spec.example_inputs(batch=3, seq=seq, seed=int(np.random.randint(1 << 30)))
    assert mask.sum(1).tolist() == [seq - n for n in (0, 2, 4)]
    with torch.no_grad():
        logits = masked(visual, ids, mask).numpy()
    for row in range(3):
        expected = alone(visual[row:row + 1], ids[row][mask[row].bool()][None])[0]
        np.testing.assert_allclose(logits[row, -expected.shape[0]:], expected, atol=2e-5, rtol=1e-4)


@contextlib.contextmanager
def naming_the_draw(draw: str):
    """Around a check on inputs drawn afresh each run: any failure, not only a mismatch, is re-raised as an
    ``AssertionError`` that starts with ``draw`` (the sizes drawn), so the CI log says which case to re-run."""
    try:
        yield
    except Exception as exc:
        raise AssertionError(f"{draw}: {type(exc).__name__}: {exc}") from exc


def assert_clean_error(result, *words: str) -> None:
    """``result`` (of :func:`run_cli`) is attnc's error for the user: exit code 2, a first line ``error: ...``, no
    traceback, and each of ``words`` in the output."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[0].startswith("error:") and "Traceback" not in result.output, result.output
    for word in words:
        assert word in result.output, result.output


# a tiny Llama's configuration (2 layers, 4 heads of 8): the checkpoints the CLI tests write
TINY_LM = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
               max_position_embeddings=64)


def tiny_llama(folder: Path, kv_heads: int | None = None) -> Path:
    """A seeded Llama causal LM of :data:`TINY_LM` (``kv_heads`` K/V heads: grouped-query attention), its weights
    perturbed off their initial values, saved as a transformers checkpoint in ``folder``."""
    import torch
    import transformers

    from attnc.models import transformers_zoo

    grouped = {"num_key_value_heads": kv_heads} if kv_heads else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers_zoo.perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_LM,
                                                                                                  **grouped)))
    model.save_pretrained(folder)
    return folder


def tiny_llava(folder: Path, kv_heads: int | None = 2, strategy: str = "default", feature_layer=-1,
               image_size: int = 32) -> Path:
    """A seeded LLaVA (``LlavaForConditionalGeneration``: a 2-layer CLIP vision tower with 8-pixel patches, its
    projector, a 4-layer Llama of :data:`TINY_LM`'s width with ``kv_heads`` K/V heads, 64 words, the image token
    63), its weights perturbed off their initial values, saved as a transformers checkpoint in ``folder``.
    ``strategy`` and ``feature_layer`` are LLaVA's ``vision_feature_select_strategy`` and ``vision_feature_layer``
    (an int, or a list of layers whose features are concatenated)."""
    import torch
    import transformers

    from attnc.models import transformers_zoo

    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=8,
                                           projection_dim=32)
    text = transformers.LlamaConfig(**{**TINY_LM, "num_hidden_layers": 4, "max_position_embeddings": 128},
                                    num_key_value_heads=kv_heads or TINY_LM["num_attention_heads"])
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                      vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                                      architectures=["LlavaForConditionalGeneration"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers_zoo.perturbed(transformers.LlavaForConditionalGeneration(config))
    model.save_pretrained(folder)
    return folder


def tiny_llava_next(folder: Path, kv_heads: int | None = 2,
                    architecture: str = "LlavaNextForConditionalGeneration") -> Path:
    """A seeded LLaVA-NeXT (``LlavaNextForConditionalGeneration``: :func:`tiny_llava`'s CLIP tower and Llama),
    LLaVA-OneVision (``architecture`` ``LlavaOnevisionForConditionalGeneration``: a SigLIP tower, its features
    shrunk past one tile's, ``anyres_max_1``; the image token 62, the video token 63, as in its checkpoints the image
    token first) or LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``: LLaVA-NeXT's, each video frame's
    features average-pooled 2× on a side; the image token 62, the video token 63): tiles of 32 pixels, 16 tokens
    each, grid pinpoints of 1 × 2, 2 × 1,
    2 × 2, 3 × 1 and 1 × 3 tiles (LLaVA-1.6's, scaled to its tile), its ``image_newline`` and weights perturbed off
    their initial values, saved in ``folder``."""
    import transformers

    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    text = transformers.LlamaConfig(**{**TINY_LM, "num_hidden_layers": 4, "max_position_embeddings": 256},
                                    num_key_value_heads=kv_heads or TINY_LM["num_attention_heads"])
    pinpoints = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
    if architecture == "LlavaOnevisionForConditionalGeneration":
        config = transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(**tower), text_config=text, image_token_index=62,
            video_token_index=63, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_1")
    elif architecture == "LlavaNextVideoForConditionalGeneration":
        config = transformers.LlavaNextVideoConfig(
            vision_config=transformers.CLIPVisionConfig(**tower, projection_dim=32), text_config=text,
            image_token_index=62, video_token_index=63, vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
    else:
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**tower, projection_dim=32), text_config=text,
            image_token_index=63, vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
    return save_seeded(config, architecture, folder)


def tiny_vision_language(folder: Path, architecture: str) -> Path:
    """A seeded tiny checkpoint of vision-language ``architecture`` (one of
    :data:`attnc.models.hf_vision_language.ARCHITECTURES` but LLaVA, which :func:`tiny_llava` builds): a 2-layer
    vision tower whose image becomes 16 tokens, a 2-layer text model (4 for Cohere 2's) of width 32 with 4 query on 2
    K/V heads and 128 words, the image token 120; weights perturbed off their initial values, saved in ``folder``.
    Gemma 3's text model has 4 layers too, sliding windows of 8 tokens in layers 0 and 2 (its image's tokens attend to
    each other both ways), its tower's 64 patches pooled into the 16 tokens; PaliGemma's is a 4-layer Gemma 2 (logits
    soft-capped, windows of 8 tokens in layers 0 and 2; the whole prompt attends both ways). Idefics 3's and SmolVLM's
    towers read 64-pixel images in 8-pixel patches, pixel-shuffled 2 × 2 into the 16 tokens."""
    import transformers as t

    text = dict(model_type="llama", vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)
    qwen2 = dict(text, model_type="qwen2")
    cohere2 = dict(text, model_type="cohere2", num_hidden_layers=4, sliding_window=4096, logit_scale=0.0625)
    gemma3 = dict(text, model_type="gemma3_text", num_hidden_layers=4, head_dim=8, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention"] * 2)
    gemma2 = dict(gemma3, model_type="gemma2")
    siglip = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=32, patch_size=8)
    clip = dict(siglip, model_type="clip_vision_model", projection_dim=32)
    builders = {
        "VipLlavaForConditionalGeneration": lambda: t.VipLlavaConfig(
            vision_config=clip, text_config=text, image_token_index=120, vision_feature_layers=[-2, -1]),
        "InternVLForConditionalGeneration": lambda: t.InternVLConfig(
            vision_config=dict(model_type="internvl_vision", hidden_size=32, intermediate_size=64,
                               num_hidden_layers=2, num_attention_heads=4, image_size=[64, 64], patch_size=[8, 8]),
            text_config=qwen2, image_token_id=120, downsample_ratio=0.5, vision_feature_layer=-1,
            vision_feature_select_strategy="default"),
        "JanusForConditionalGeneration": lambda: t.JanusConfig(
            text_config=text, image_token_id=120,
            vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8,
                               projection_dim=32, depth=2, num_image_tokens=16, mlp_ratio=2.0),
            vq_config=dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,
                           channel_multiplier=[1, 1], num_res_blocks=1, num_patches=4, projection_dim=32,
                           image_token_embed_dim=32, num_hidden_layers=1)),
        "GotOcr2ForConditionalGeneration": lambda: t.GotOcr2Config(
            vision_config=dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=4,
                               image_size=64, patch_size=4, window_size=4, global_attn_indexes=[1], mlp_dim=64),
            text_config=qwen2, image_token_index=120, image_seq_length=16),
        "DeepseekVLForConditionalGeneration": lambda: t.DeepseekVLConfig(
            vision_config=siglip, text_config=text, image_token_id=120),
        "AyaVisionForConditionalGeneration": lambda: t.AyaVisionConfig(
            vision_config=dict(siglip, image_size=64), text_config=cohere2, image_token_index=120, downsample_factor=2,
            vision_feature_layer=-1, vision_feature_select_strategy="full"),
        "Cohere2VisionForConditionalGeneration": lambda: t.Cohere2VisionConfig(
            vision_config=dict(siglip, image_size=64), text_config=cohere2, image_token_id=120, downsample_factor=2,
            alignment_intermediate_size=64),
        "Gemma3ForConditionalGeneration": lambda: t.Gemma3Config(
            vision_config=dict(siglip, image_size=64), text_config=gemma3, image_token_index=120,
            mm_tokens_per_image=16),
        "PaliGemmaForConditionalGeneration": lambda: t.PaliGemmaConfig(
            vision_config=dict(siglip, projection_dim=32), text_config=gemma2, image_token_index=120,
            projection_dim=32),
        "Idefics3ForConditionalGeneration": lambda: t.Idefics3Config(
            vision_config=dict(siglip, model_type="idefics3_vision", image_size=64), text_config=text,
            image_token_id=120, scale_factor=2),
        "SmolVLMForConditionalGeneration": lambda: t.SmolVLMConfig(
            vision_config=dict(siglip, model_type="smolvlm_vision", image_size=64), text_config=text,
            image_token_id=120, scale_factor=2),
    }
    config = builders[architecture]()
    return save_seeded(config, architecture, folder)


def hf_pixels(architecture: str, pixels):
    """``pixels`` as transformers' forward of ``architecture`` takes them: Idefics 3's and SmolVLM's ``[B, N, C, H, W]``
    (their processors' tiles, one for a single image), every other's as they are."""
    from attnc.models.hf_vision_language import TILES_BY_VALUE

    return pixels[:, None] if architecture in TILES_BY_VALUE and pixels.dim() == 4 else pixels


def image_token_types(architecture: str, prompt, image_token: int) -> dict:
    """What transformers' forward and ``generate`` take beside a ``prompt`` (its image as ``image_token``
    placeholders) for ``architecture`` to attend as its processor has it attend; causally without them: Gemma 3's
    ``token_type_ids`` (1 at the image: its tokens attend to each other both ways), PaliGemma's (0 at the whole
    prompt, a prefix attending both ways); nothing for the others."""
    import torch

    from attnc.models.hf_vision_language import IMAGE_BLOCK, PROMPT_BLOCK

    if architecture in IMAGE_BLOCK:
        return {"token_type_ids": (prompt == image_token).long()}
    return {"token_type_ids": torch.zeros_like(prompt)} if architecture in PROMPT_BLOCK else {}


def llama_layers_by_hand(language_model, x, keep, k: int):
    """The final-normed hidden state of a Llama ``language_model`` run by hand over embeddings ``x [B, N, C]``, causal
    with positions ``0..N-1``; before layer ``k`` the tokens are cut to the indices ``keep`` (a 1-D tensor), the
    rotary tables, positions and mask with them: the reference the token-exit tests hold the hooks against."""
    import torch

    positions = torch.arange(x.shape[1])[None]
    cos, sin = language_model.rotary_emb(x, positions)
    mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(language_model.layers):
        if i == k:
            x, cos, sin, positions = x[:, keep], cos[:, keep], sin[:, keep], positions[:, keep]
            mask = mask[..., keep, :][..., keep]
        x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
        x = x[0] if isinstance(x, tuple) else x
    return language_model.norm(x)


def exited_greedy_tokens(module, spec, pixels, ids, new: int, exit_layer: int):
    """``ids`` followed by ``new`` greedy tokens of vision-language ``module`` (a loaded checkpoint's wrapper,
    ``spec`` its spec) with the image gone before decoder layer ``exit_layer``, in PyTorch: a loop over the exited
    forward without a cache; for a prefix LM (:data:`attnc.models.hf_vision_language.PROMPT_BLOCK`: its prompt attends
    both ways, its answer causally, which a forward over the whole sequence would not do) the exited first step, then
    the exited later steps."""
    import torch

    from attnc.models.hf_checkpoint import with_first_step, with_past
    from attnc.models.hf_vision_language import PROMPT_BLOCK

    tokens = ids
    with torch.no_grad():
        if type(module.model).__name__ not in PROMPT_BLOCK:
            for _ in range(new):
                chosen = module(pixels, tokens, exit_layer=exit_layer)[:, -1].argmax(-1, keepdim=True)
                tokens = torch.cat([tokens, chosen], 1)
            return tokens
        (first, _), (step, _) = with_first_step(module, spec), with_past(module, spec)
        logits, *caches = first(pixels, ids, exit_layer=exit_layer)
        for i in range(new):
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], 1)
            if i + 1 < new:
                mask = torch.ones(len(ids), caches[0].shape[2] + 1, dtype=torch.int64)
                logits, *caches = step(tokens[:, -1:], mask, *caches, exit_layer=exit_layer)
    return tokens


QWEN_IMAGE_TOKEN = 250


def tiny_qwen_vl(folder: Path, architecture: str = "Qwen2VLForConditionalGeneration", kv_heads: int = 2) -> Path:
    """A seeded Qwen2-VL, Qwen2.5-VL, Qwen3-VL or Qwen3-VL-MoE checkpoint (``architecture``): a 2-layer vision tower
    with 14-pixel patches merged 2 × 2 (Qwen2.5-VL's first layer attending within windows of 2 × 2 merged blocks, its
    second over the whole image; Qwen3-VL's 3 layers of 16-pixel patches, a learned 4 × 4 position table, deepstack
    features of its first two layers), a 4-layer text model of width 64 with 4 query on ``kv_heads`` K/V heads and
    M-RoPE sections ``[2, 3, 3]`` (Qwen3-VL's ``[4, 2, 2]``, interleaved; the MoE's layers of 4 experts, 2 per
    token), 256 words, the image token :data:`QWEN_IMAGE_TOKEN`; weights perturbed off their initial values, saved in
    ``folder``."""
    import transformers as t

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=kv_heads, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 3, 3]})
    tokens = dict(image_token_id=QWEN_IMAGE_TOKEN, video_token_id=251, vision_start_token_id=252,
                  vision_end_token_id=253)
    if architecture == "Qwen2VLForConditionalGeneration":
        config = t.Qwen2VLConfig(text_config=text, **tokens, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2))
    elif architecture == "Qwen2_5_VLForConditionalGeneration":
        config = t.Qwen2_5_VLConfig(text_config=text, **tokens, vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]))
    elif architecture.startswith("Qwen3VL"):   # 16-pixel patches; deepstack after decoder layers 0, 1
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [4, 2, 2], "mrope_interleaved": True}
        moe = "Moe" in architecture   # 4 experts of width 32, 2 per token, in every layer
        experts = dict(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        config = (t.Qwen3VLMoeConfig if moe else t.Qwen3VLConfig)(
            text_config={**text, "head_dim": 16, **(experts if moe else {})}, **tokens, vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[0, 1]))
    elif architecture.startswith("Glm4"):   # a 4 × 4 position table; rotary on half the head dim
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [1, 1, 2], "partial_rotary_factor": 0.5}
        moe = "Moe" in architecture   # 4 routed experts of width 32, 2 per token, and a shared one, after layer 0
        experts = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=1, topk_group=1)
        config = (t.Glm4vMoeConfig if moe else t.Glm46VConfig if "46V" in architecture else t.Glm4vConfig)(
            text_config={**text, **(experts if moe else {})}, image_token_id=QWEN_IMAGE_TOKEN, video_token_id=251,
            image_start_token_id=252, image_end_token_id=253, video_start_token_id=254, video_end_token_id=255,
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                               patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=56))
    else:
        raise ValueError(f"no tiny {architecture}")
    return save_seeded(config, architecture, folder)


MISTRAL3_IMAGE_TOKEN, MISTRAL3_BREAK, MISTRAL3_END = 250, 251, 252   # tiny_mistral3's [IMG], [IMG_BREAK], [IMG_END]


def tiny_mistral3(folder: Path) -> Path:
    """A seeded Mistral 3 checkpoint: a 2-layer Pixtral tower of width 32 on 8-pixel patches (64-pixel images by
    default) merged 2 × 2, a 4-layer Mistral text model of width 64 with 4 query on 2 K/V heads, 256 words, the image
    token :data:`MISTRAL3_IMAGE_TOKEN`; weights perturbed off their initial values, saved in ``folder``."""
    import transformers as t

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, sliding_window=None)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                  image_size=64, patch_size=8)
    config = t.Mistral3Config(text_config=text, vision_config=vision, image_token_index=MISTRAL3_IMAGE_TOKEN,
                              spatial_merge_size=2)
    return save_seeded(config, "Mistral3ForConditionalGeneration", folder)


def tiny_pixtral_llava(folder: Path) -> Path:
    """A seeded Pixtral-12B-like checkpoint: a ``LlavaForConditionalGeneration`` with :func:`tiny_mistral3`'s Pixtral
    tower (a token a patch: no merger) and Mistral text model, every feature kept (``vision_feature_select_strategy``
    ``full``), the image token :data:`MISTRAL3_IMAGE_TOKEN`; saved in ``folder``."""
    import transformers as t

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, sliding_window=None, model_type="mistral")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                  image_size=64, patch_size=8, model_type="pixtral")
    config = t.LlavaConfig(text_config=text, vision_config=vision, image_token_index=MISTRAL3_IMAGE_TOKEN,
                           vision_feature_select_strategy="full", vision_feature_layer=-1)
    return save_seeded(config, "LlavaForConditionalGeneration", folder)


def save_seeded(config, architecture: str, folder: Path) -> Path:
    """transformers' ``architecture`` built from ``config`` under seed 0, its weights perturbed, saved in ``folder``
    (the tiny checkpoints here, the benchmarks' random ones)."""
    import torch
    import transformers

    from attnc.models import transformers_zoo

    config.architectures = [architecture]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers_zoo.perturbed(getattr(transformers, architecture)(config))
    model.save_pretrained(folder)
    return folder
