"""A vision-language checkpoint through attnc: visual-token exit, validation and answering with a KV cache.

What ``attnc export CKPT --text-before-image K``, ``attnc compile --token-exit static``, ``attnc validate`` and
``attnc.runtime.generate_vision_language`` do, in one script. It exports the checkpoint's
``(pixel_values, input_ids) -> logits``, the image after the prompt's first ``--text-before-image`` tokens (a chat
template's text in front of the image; ``3,7`` for two images, the second after 7 tokens). It compiles it twice, as
it is and with its visual tokens dropped before decoder layer ``--exit-layer``, validates each against the checkpoint
doing the same in PyTorch, and times both on ONNX Runtime. Then it exports the two generation graphs
(``--first-step``: the image and the prompt, their KV cache out; ``--with-past``: the language model's later steps),
compiles and validates them, generates ``--generate``
tokens greedily for a batch of random images and prompts, and checks them against transformers' ``generate`` on
the prompt with the image's placeholder tokens in place. Last, it compiles both generation graphs with the visual
tokens dropped before ``--exit-layer`` (the later layers' caches then hold the text alone), validates them, and checks
their tokens against a greedy loop over the exited forward. Without ``--checkpoint`` it writes a random LLaVA (a CLIP
tower of ``--image-size`` px images in 8 px patches, a Llama of ``--width`` and ``--layers`` with grouped-query
attention), with ``--model qwen2-vl`` a random Qwen2-VL (its images exported at ``--image-size`` px square, a
multiple of 28), with ``--model glm4v`` a random GLM-4.1V (the same, its tower's position table resampled),
with ``--model llava-next`` a random LLaVA-NeXT (32 px tiles, its images exported at ``--image-size`` px square:
the processor's tiles of an image that size) or with ``--model gemma3`` a random Gemma 3
(a SigLIP tower of ``--image-size`` px images in 8 px patches pooled 2 × 2, the image's tokens attending to each
other both ways, a Gemma 3 text model with sliding windows of 8 tokens) or with ``--model onevision`` a random
LLaVA-OneVision (a SigLIP tower of 32 px tiles) or with ``--model mistral3`` a random Mistral 3 (a Pixtral tower of
``--image-size`` px images, 64 by default, each image's rows a run of its own) with ``save_pretrained`` first: no hub
is reached. ``--video-frames F``
(LLaVA-OneVision, LLaVA-NeXT-Video, the Qwen family) puts a clip of ``F`` frames in place of the image::

    python examples/vision_language.py
    python examples/vision_language.py --image-size 112 --width 256 --layers 8 --exit-layer 2 --json run.json
    python examples/vision_language.py --model qwen2-vl --image-size 224
    python examples/vision_language.py --model glm4v --image-size 84
    python examples/vision_language.py --model llava-next --image-size 64
    python examples/vision_language.py --model gemma3
    python examples/vision_language.py --checkpoint ./my-llava --text-before-image 5
    python examples/vision_language.py --text-before-image 3,7     # two images per prompt
    python examples/vision_language.py --model onevision --video-frames 4   # a clip of 4 frames
    python examples/vision_language.py --model qwen2-vl --video-frames 4    # 4 frames of 56 px: 2 slices
    python examples/vision_language.py --model mistral3 --image-size 48     # 3 rows of 3 tokens, a break after each
    python examples/vision_language.py --checkpoint ./my-qwen2-vl --image-size 448
    python examples/vision_language.py --checkpoint ./my-llava-v1.6 --image-size 672
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from attnc import runtime
from attnc.compiler.export import export_onnx
from attnc.compiler.pipeline import CompileOptions, compile_model, validate_artefact
from attnc.models.hf_checkpoint import (load_checkpoint, with_first_step, with_image_size, with_past,
                                        with_text_before_image, with_video_frames)
from attnc.models.hf_llava_next import is_llava_next
from attnc.models import hf_pixtral
from attnc.models.hf_qwen_vl import is_qwen_vl
from attnc.models.hf_vision_language import SIZED, TILES_BY_VALUE, interleave
from attnc.testing import exited_greedy_tokens, image_token_types, save_seeded


def _clip_and_llama(image_size: int, width: int, layers: int):
    """The random checkpoints' CLIP tower (2 layers, 8 px patches) and Llama (``width``, ``layers``, grouped-query
    attention, 256 words) configs."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=8)
    text = transformers.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                    num_attention_heads=max(2, width // 32), num_key_value_heads=max(1, width // 64),
                                    vocab_size=256, max_position_embeddings=4096)
    return vision, text


def random_llava(folder: Path, image_size: int, width: int, layers: int) -> Path:
    """A seeded random ``LlavaForConditionalGeneration`` saved in ``folder``: 256 words, the image token 255."""
    import transformers

    vision, text = _clip_and_llama(image_size, width, layers)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=255)
    return save_seeded(config, "LlavaForConditionalGeneration", folder)


def _mrope_text(width: int, layers: int, rotary: float = 1.0) -> dict:
    """A text config of ``width`` and ``layers`` (a head per 32 channels, K/V heads half as many, 256 words) with
    M-RoPE on the ``rotary`` share of each head, its frequencies split over time, rows and columns."""
    heads = max(2, width // 32)
    freqs = int(width // heads * rotary) // 2
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [freqs - 2 * (freqs // 3), freqs // 3, freqs // 3]}
    if rotary != 1.0:
        rope["partial_rotary_factor"] = rotary
    return dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), vocab_size=256, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_parameters=rope)


def random_qwen2_vl(folder: Path, width: int, layers: int) -> Path:
    """A seeded random ``Qwen2VLForConditionalGeneration`` saved in ``folder``: a 2-layer tower, 256 words, the image
    token 252."""
    import transformers

    config = transformers.Qwen2VLConfig(
        text_config=_mrope_text(width, layers),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=width, num_heads=2, mlp_ratio=2),
        image_token_id=252, video_token_id=253, vision_start_token_id=254, vision_end_token_id=255)
    return save_seeded(config, "Qwen2VLForConditionalGeneration", folder)


def random_glm4v(folder: Path, width: int, layers: int) -> Path:
    """A seeded random ``Glm4vForConditionalGeneration`` (GLM-4.1V) saved in ``folder``: a 2-layer tower with a 4 × 4
    learned position table, 256 words, the image token 250."""
    import transformers

    config = transformers.Glm4vConfig(
        text_config=_mrope_text(width, layers, rotary=0.5),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=width,
                           image_size=56),
        image_token_id=250, video_token_id=251, image_start_token_id=252, image_end_token_id=253,
        video_start_token_id=254, video_end_token_id=255)
    return save_seeded(config, "Glm4vForConditionalGeneration", folder)


def random_llava_next(folder: Path, width: int, layers: int) -> Path:
    """A seeded random ``LlavaNextForConditionalGeneration`` saved in ``folder``: :func:`random_llava`'s tower on
    32 px tiles, grid pinpoints of 1 × 2 to 2 × 2 tiles, 256 words, the image token 255."""
    import transformers

    vision, text = _clip_and_llama(32, width, layers)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=255,
                                          image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]])
    return save_seeded(config, "LlavaNextForConditionalGeneration", folder)


def random_gemma3(folder: Path, image_size: int, width: int, layers: int) -> Path:
    """A seeded random ``Gemma3ForConditionalGeneration`` saved in ``folder``: a 2-layer SigLIP tower of
    ``image_size`` px images in 8 px patches, average-pooled 2 × 2 into the image's tokens; a Gemma 3 text model of
    ``width`` and ``layers`` (grouped-query attention, every other layer in a sliding window of 8 tokens), 256
    words, the image token 255."""
    import transformers

    heads = max(2, width // 32)
    vision = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=8)
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=width // heads, vocab_size=256,
                max_position_embeddings=4096, sliding_window=8,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)])
    config = transformers.Gemma3Config(vision_config=vision, text_config=text, image_token_index=255,
                                       mm_tokens_per_image=(image_size // 16) ** 2)
    return save_seeded(config, "Gemma3ForConditionalGeneration", folder)


def random_onevision(folder: Path, width: int, layers: int) -> Path:
    """A seeded random ``LlavaOnevisionForConditionalGeneration`` saved in ``folder``: a 2-layer SigLIP tower on 32 px
    tiles in 8 px patches, grid pinpoints of 1 × 2 to 2 × 2 tiles, :func:`random_llava`'s Llama, 256 words, the image
    token 254 and the video token 255."""
    import transformers

    _, text = _clip_and_llama(32, width, layers)
    vision = transformers.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=254,
                                               video_token_index=255, image_grid_pinpoints=[[32, 64], [64, 32],
                                                                                            [64, 64]])
    return save_seeded(config, "LlavaOnevisionForConditionalGeneration", folder)


def random_mistral3(folder: Path, width: int, layers: int) -> Path:
    """A seeded random ``Mistral3ForConditionalGeneration`` saved in ``folder``: a 2-layer Pixtral tower on 8 px
    patches merged 2 × 2, a Mistral text model (``width``, ``layers``, grouped-query attention), 256 words, the image
    token 253 (its processor's break and end tokens are text: any token does in a random prompt)."""
    import transformers

    heads = max(2, width // 32)
    text = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2), head_dim=width // heads, vocab_size=256,
                max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, sliding_window=None)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                  image_size=64, patch_size=8)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=253,
                                         spatial_merge_size=2)
    return save_seeded(config, "Mistral3ForConditionalGeneration", folder)


def qwen_video_patches(vision, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL's video processor's ``pixel_values_videos`` and ``video_grid_thw`` of clips ``[B, F, C, H, W]``
    already resized and normalised: the last frame repeated up to a multiple of ``temporal_patch_size``, then each
    slice's patches in merge blocks row by row, a patch's values ``(C, frames, p, p)``."""
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    short = -clips.shape[1] % t
    clips = torch.cat([clips, clips[:, -1:].expand(-1, short, -1, -1, -1)], 1) if short else clips
    b, f, c, h, w = clips.shape
    x = clips.reshape(b, f // t, t, c, h // p // m, m, p, w // p // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(-1, c * t * p * p), torch.tensor([[f // t, h // p, w // p]] * b)


def transformers_generate(module, pixels: torch.Tensor, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """transformers' greedy ``generate`` on the prompt ``ids[:, :K]`` + the image's placeholders + ``ids[:, K:]``
    (each image's after its ``K``): the new tokens. Qwen takes the image as its processor's patches, with their grid
    and token types; LLaVA-NeXT its tiles with the images' original size; Gemma 3 and PaliGemma their token types; a
    clip (``--video-frames``) goes as ``pixel_values_videos`` in place of the video token's placeholders."""
    hf, layout = module.model, module.layout
    image = getattr(hf.config, "image_token_index", None) or hf.config.image_token_id
    if module.video_frames is not None:
        video = getattr(hf.config, "video_token_index", None) or hf.config.video_token_id
        prompt = interleave(ids, torch.full((len(ids), layout.tokens), video), layout)
        extra = {"pixel_values_videos": pixels}
        if is_qwen_vl(hf):   # the video processor's patches (it needs torchvision: cut here as it cuts them)
            patches, grid = qwen_video_patches(hf.config.vision_config, pixels)
            types = torch.as_tensor(layout.is_visual(prompt.shape[1]), dtype=torch.int32).expand(len(prompt), -1)
            extra = {"pixel_values_videos": patches, "video_grid_thw": grid, "mm_token_type_ids": types * 2}
        with torch.no_grad():
            out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, **extra)
        return out[:, prompt.shape[1]:]
    prompt = interleave(ids, torch.full((len(ids), layout.tokens), image), layout)
    if type(hf).__name__ in TILES_BY_VALUE:   # Idefics 3 and SmolVLM take [B, images, C, H, W]
        pixels = pixels if module.images > 1 else pixels[:, None]
    elif module.images > 1:   # the others the images one after another (Mistral 3's rows are runs, not images)
        pixels = pixels.flatten(0, 1)
    extra = {"pixel_values": pixels, **image_token_types(type(hf).__name__, prompt, image)}   # Gemma 3's, PaliGemma's
    if is_llava_next(hf) or hf_pixtral.reads(hf.config, type(hf).__name__):
        extra["image_sizes"] = torch.tensor([list(module.image_size)] * len(pixels))
    if is_qwen_vl(hf):
        import transformers

        vision = hf.config.vision_config
        processor = transformers.Qwen2VLImageProcessorPil(
            do_resize=False, do_rescale=False, do_normalize=False, patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size)
        cut = processor([image.numpy() for image in pixels], return_tensors="pt", input_data_format="channels_first")
        types = torch.as_tensor(layout.is_visual(prompt.shape[1]), dtype=torch.int32).expand(len(prompt), -1)
        extra = {"pixel_values": cut["pixel_values"], "image_grid_thw": cut["image_grid_thw"],
                 "mm_token_type_ids": types}
    with torch.no_grad():
        out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens,
                          min_new_tokens=tokens, do_sample=False, **extra)
    return out[:, prompt.shape[1]:]


def latency_ms(runner, feeds: dict, reps: int) -> float:
    runner.infer(feeds)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        runner.infer(feeds)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a vision-language checkpoint directory attnc exports (default: a random "
                                             "one)")
    parser.add_argument("--model", choices=["llava", "qwen2-vl", "glm4v", "llava-next", "gemma3", "onevision",
                                            "mistral3"],
                        default="llava",
                        help="the random checkpoint's architecture (without --checkpoint)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="pixels a side: the random LLaVA's and Gemma 3's (default 64); Qwen's and GLM-4V's "
                             "exported size (default 56); LLaVA-NeXT's exported image size (default one tile's)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-before-image", default="3",
                        help="the prompt's tokens in front of the image; one count per image for several, e.g. 3,7")
    parser.add_argument("--video-frames", type=int, default=None,
                        help="a clip of this many frames in place of the image (LLaVA-OneVision, LLaVA-NeXT-Video, "
                             "Qwen2-VL)")
    parser.add_argument("--exit-layer", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=12, help="prompt tokens, the image's not counted")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--generate", type=int, default=8)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.checkpoint:
            folder = Path(args.checkpoint)
        elif args.model == "qwen2-vl":
            folder = random_qwen2_vl(tmp / "qwen2-vl", args.width, args.layers)
        elif args.model == "glm4v":
            folder = random_glm4v(tmp / "glm4v", args.width, args.layers)
        elif args.model == "llava-next":
            folder = random_llava_next(tmp / "llava-next", args.width, args.layers)
        elif args.model == "onevision":
            folder = random_onevision(tmp / "onevision", args.width, args.layers)
        elif args.model == "mistral3":
            folder = random_mistral3(tmp / "mistral3", args.width, args.layers)
        elif args.model == "gemma3":
            folder = random_gemma3(tmp / "gemma3", args.image_size or 64, args.width, args.layers)
        else:
            folder = random_llava(tmp / "llava", args.image_size or 64, args.width, args.layers)
        module, spec = load_checkpoint(str(folder))
        # as the CLI does: the size (Mistral 3's rows follow it), the offsets, the clip (Qwen3-VL's: one offset a slice)
        if type(module.model).__name__ in SIZED and (args.video_frames is None or is_qwen_vl(module.model)):
            # its visual tokens follow the image's (Qwen's frames') size: one size per export
            size = args.image_size or (56 if is_qwen_vl(module.model) else None)
            if size is not None:
                module, spec = with_image_size(module, spec, (size, size))
        module, spec = with_text_before_image(module, spec, args.text_before_image)
        if args.video_frames is not None:
            module, spec = with_video_frames(module, spec, args.video_frames)
        pixels, ids = spec.example_inputs(batch=args.batch, seq=args.prompt, seed=1)
        feeds = {spec.input_names[0]: pixels.numpy(), "input_ids": ids.numpy()}   # pixel_values(_videos)
        results = {"checkpoint": spec.description, "visual_tokens": module.num_visual_tokens,
                   "text_before_image": module.placement[0], "video_frames": module.video_frames,
                   "prompt": args.prompt, "batch": args.batch,
                   "machine": platform.processor() or platform.machine(), "threads": args.threads}

        # one pass, as it is and with the visual tokens dropped before --exit-layer
        export_onnx(module, spec.example_inputs(), tmp / "model.onnx", input_names=spec.input_names,
                    dynamic_axes=spec.dynamic_axes)
        for name, options in (("full", CompileOptions()),
                              ("exit", CompileOptions(token_exit="static", exit_layer=args.exit_layer))):
            compile_model(tmp / "model.onnx", tmp / name, options)
            result, _ = validate_artefact(tmp / name, str(folder), seed=2)
            results[name] = {"validation_passed": result.passed,
                             "max_abs_error": max(o.to_dict()["max_abs_error"] for o in result.outputs),
                             "latency_ms": latency_ms(runtime.load(tmp / name, threads=args.threads), feeds,
                                                      args.reps)}
        if result.shrink_cost:
            results["exit"]["vs_full_max_abs"] = result.shrink_cost[0]["max_abs_error"]

        # answering: the first step with the image, then the language model's steps
        steps = {"first": with_first_step(module, spec), "step": with_past(module, spec)}
        for name, (step_module, step_spec) in steps.items():
            export_onnx(step_module, step_spec.example_inputs(), tmp / f"{name}.onnx",
                        input_names=step_spec.input_names, output_names=step_spec.output_names,
                        dynamic_axes=step_spec.dynamic_axes)
            compile_model(tmp / f"{name}.onnx", tmp / name)
            result, _ = validate_artefact(tmp / name, str(folder), seed=3)
            results[f"{name}_step_validation_passed"] = result.passed
        start = time.perf_counter()
        tokens = runtime.generate_vision_language(runtime.load(tmp / "first", threads=args.threads),
                                                  runtime.load(tmp / "step", threads=args.threads),
                                                  pixels.numpy(), feeds["input_ids"],
                                                  max_new_tokens=args.generate)
        attnc_s = time.perf_counter() - start
        start = time.perf_counter()
        expected = transformers_generate(module, pixels, ids, args.generate)
        torch_s = time.perf_counter() - start
        results["generation"] = {"tokens_equal": bool(np.array_equal(tokens[:, args.prompt:], expected.numpy())),
                                 "new_tokens": tokens[:, args.prompt:].tolist(), "attnc_s": attnc_s,
                                 "transformers_s": torch_s}

        # answering with the visual tokens gone after --exit-layer: both steps compiled with the same exit
        exit_options = CompileOptions(token_exit="static", exit_layer=args.exit_layer)
        for name in steps:
            compile_model(tmp / f"{name}.onnx", tmp / f"{name}_exit", exit_options)
            result, _ = validate_artefact(tmp / f"{name}_exit", str(folder), seed=3)
            results[f"{name}_step_exit_validation_passed"] = result.passed
        first = runtime.load(tmp / "first_exit", threads=args.threads)
        start = time.perf_counter()
        exited_tokens = runtime.generate_vision_language(first, runtime.load(tmp / "step_exit", threads=args.threads),
                                                         pixels.numpy(), feeds["input_ids"],
                                                         max_new_tokens=args.generate)
        exit_s = time.perf_counter() - start
        # the exited forward without a cache, one token at a time (a prefix LM: the exited PyTorch steps)
        loop = exited_greedy_tokens(module, spec, pixels, ids, args.generate, args.exit_layer)
        cache_bytes = {name: sum(v.nbytes for key, v in runner.infer(feeds).items() if key.startswith("present."))
                       for name, runner in (("full", runtime.load(tmp / "first")), ("exit", first))}
        results["generation_exit"] = {"tokens_equal": bool(np.array_equal(exited_tokens, loop.numpy())),
                                      "same_as_full": bool(np.array_equal(exited_tokens, tokens)),
                                      "attnc_s": exit_s, "prompt_cache_bytes": cache_bytes}
    full, exited, gen, gen_exit = results["full"], results["exit"], results["generation"], results["generation_exit"]
    print(f"{results['checkpoint']}: {results['visual_tokens']} visual tokens after {args.text_before_image} text "
          "tokens")
    print(f"  full:   validation {'pass' if full['validation_passed'] else 'FAIL'} "
          f"({full['max_abs_error']:.1e}), {full['latency_ms']:.2f} ms")
    print(f"  exit before layer {args.exit_layer}: validation {'pass' if exited['validation_passed'] else 'FAIL'} "
          f"({exited['max_abs_error']:.1e}), {exited['latency_ms']:.2f} ms "
          f"({exited['latency_ms'] / full['latency_ms']:.2f}x)")
    steps_pass = results["first_step_validation_passed"] and results["step_step_validation_passed"]
    print(f"  generation: steps validate {steps_pass}, "
          f"{args.generate} tokens {'equal' if gen['tokens_equal'] else 'DIFFER from'} transformers' generate "
          f"({gen['attnc_s']:.2f} s against {gen['transformers_s']:.2f} s)")
    steps_pass = results["first_step_exit_validation_passed"] and results["step_step_exit_validation_passed"]
    cache = gen_exit["prompt_cache_bytes"]
    print(f"  generation with the exit: steps validate {steps_pass}, {args.generate} tokens "
          f"{'equal' if gen_exit['tokens_equal'] else 'DIFFER from'} the exited forward's, "
          f"{'the same as' if gen_exit['same_as_full'] else 'other than'} without the exit; "
          f"the prompt's cache {cache['exit'] / cache['full']:.2f}x the size ({gen_exit['attnc_s']:.2f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
