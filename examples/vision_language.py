"""A vision-language checkpoint through attnc: visual-token exit, validation and answering with a KV cache.

What ``attnc export CKPT --text-before-image K``, ``attnc compile --token-exit static``, ``attnc validate`` and
``attnc.runtime.generate_vision_language`` do, in one script. It exports the checkpoint's
``(pixel_values, input_ids) -> logits``, the image after the prompt's first ``--text-before-image`` tokens (a chat
template's text in front of the image). It compiles it twice, as it is and with its visual tokens dropped before
decoder layer ``--exit-layer``, validates each against the checkpoint doing the same in PyTorch, and times both on
ONNX Runtime. Then it exports the two generation graphs (``--first-step``: the image and the prompt, their KV cache
out; ``--with-past``: the language model's later steps), compiles and validates them, generates ``--generate``
tokens greedily for a batch of random images and prompts, and checks them against transformers' ``generate`` on
the prompt with the image's placeholder tokens in place. Last, it compiles both generation graphs with the visual
tokens dropped before ``--exit-layer`` (the later layers' caches then hold the text alone), validates them, and checks
their tokens against a greedy loop over the exited forward. Without ``--checkpoint`` it writes a random LLaVA (a CLIP
tower of ``--image-size`` px images in 8 px patches, a Llama of ``--width`` and ``--layers`` with grouped-query
attention) with ``save_pretrained`` first: no hub is reached::

    python examples/vision_language.py
    python examples/vision_language.py --image-size 112 --width 256 --layers 8 --exit-layer 2 --json run.json
    python examples/vision_language.py --checkpoint ./my-llava --text-before-image 5
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
from attnc.models.hf_checkpoint import load_checkpoint, with_first_step, with_past, with_text_before_image
from attnc.models.transformers_zoo import perturbed


def random_llava(folder: Path, image_size: int, width: int, layers: int) -> Path:
    """A seeded random ``LlavaForConditionalGeneration`` saved in ``folder``: 256 words, the image token 255."""
    import transformers

    vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=8)
    text = transformers.LlamaConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                    num_attention_heads=max(2, width // 32), num_key_value_heads=max(1, width // 64),
                                    vocab_size=256, max_position_embeddings=4096)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=255,
                                      architectures=["LlavaForConditionalGeneration"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        perturbed(transformers.LlavaForConditionalGeneration(config)).save_pretrained(folder)
    return folder


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
    parser.add_argument("--checkpoint", help="a LLaVA-family checkpoint directory (default: a random one)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--text-before-image", type=int, default=3)
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
        folder = Path(args.checkpoint) if args.checkpoint else random_llava(tmp / "llava", args.image_size,
                                                                            args.width, args.layers)
        module, spec = with_text_before_image(*load_checkpoint(str(folder)), args.text_before_image)
        pixels, ids = spec.example_inputs(batch=args.batch, seq=args.prompt, seed=1)
        feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
        results = {"checkpoint": spec.description, "visual_tokens": module.num_visual_tokens,
                   "text_before_image": args.text_before_image, "prompt": args.prompt, "batch": args.batch,
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
                                                  feeds["pixel_values"], feeds["input_ids"],
                                                  max_new_tokens=args.generate)
        attnc_s = time.perf_counter() - start
        hf = module.model
        k, image = args.text_before_image, hf.config.image_token_index
        prompt = torch.cat([ids[:, :k], torch.full((len(ids), module.num_visual_tokens), image), ids[:, k:]], 1)
        start = time.perf_counter()
        with torch.no_grad():
            expected = hf.generate(input_ids=prompt, pixel_values=pixels, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=args.generate, min_new_tokens=args.generate, do_sample=False)
        torch_s = time.perf_counter() - start
        results["generation"] = {"tokens_equal": bool(np.array_equal(tokens[:, args.prompt:],
                                                                     expected[:, prompt.shape[1]:].numpy())),
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
                                                         feeds["pixel_values"], feeds["input_ids"],
                                                         max_new_tokens=args.generate)
        exit_s = time.perf_counter() - start
        loop = ids   # the exited forward without a cache, one token at a time
        with torch.no_grad():
            for _ in range(args.generate):
                chosen = module(pixels, loop, exit_layer=args.exit_layer)[:, -1].argmax(-1, keepdim=True)
                loop = torch.cat([loop, chosen], 1)
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
