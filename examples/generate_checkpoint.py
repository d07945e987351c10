"""Greedy generation from a transformers checkpoint through attnc: one cached step, exported, compiled,
validated, then decoding with ONNX Runtime next to transformers' ``generate``.

What ``attnc export CKPT --with-past && attnc compile ... && attnc validate ...`` and
``attnc.runtime.generate`` do, in one script: it exports the checkpoint's generation step with its KV cache,
compiles it (every layer's attention becomes one ONNX ``Attention``), validates it against PyTorch, generates
``--generate`` tokens greedily after a left-padded batch of random prompts, does the same with transformers'
``generate(do_sample=False)``, and prints whether the tokens agree and the time per generated token of each
(on a CPU only the ratio means much). Without ``--checkpoint`` it writes a random Llama (grouped-query
attention, rotary positions; ``--width``, ``--layers``) with ``save_pretrained`` first: no hub is reached::

    python examples/generate_checkpoint.py
    python examples/generate_checkpoint.py --width 768 --layers 4 --generate 32 --threads 1 --json run.json
    python examples/generate_checkpoint.py --checkpoint ./my-finetuned-llama
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
from attnc.models.hf_checkpoint import load_checkpoint, padding_mask, with_past


def random_llama(folder: Path, width: int, layers: int) -> Path:
    """A random ``LlamaForCausalLM`` (heads of 64 channels, half as many K/V heads) saved in ``folder``."""
    import transformers

    heads = max(width // 64, 2)
    config = transformers.LlamaConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=heads // 2, intermediate_size=4 * width, vocab_size=1000,
                                      max_position_embeddings=512, eos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a save_pretrained directory (default: a random Llama)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=12)
    parser.add_argument("--generate", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads")
    parser.add_argument("--json", type=Path, help="also write the run's raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_llama(tmp / "llama", args.width, args.layers)
        step, spec = with_past(*load_checkpoint(str(checkpoint)))
        export_onnx(step, spec.example_inputs(), tmp / "step.onnx", exporter=args.exporter,
                    dynamic_axes=spec.dynamic_axes, input_names=spec.input_names, output_names=spec.output_names)
        manifest = compile_model(tmp / "step.onnx", tmp / "out", CompileOptions(backend="onnxruntime"))
        result, _ = validate_artefact(tmp / "out", str(checkpoint))
        print(f"compiled: {manifest['ops_after'].get('Attention', 0)} Attention nodes; "
              f"validation {'PASS' if result.passed else 'FAIL'}")

        model = step.model
        vocab = spec.inputs[0].high
        ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        mask = padding_mask(args.batch, args.prompt, "left")
        eos = model.generation_config.eos_token_id
        compiled = runtime.load(tmp / "out", threads=args.threads)
        runtime.generate(compiled, ids.numpy(), mask.numpy(), max_new_tokens=2)   # warm up
        start = time.perf_counter()
        ours = runtime.generate(compiled, ids.numpy(), mask.numpy(), max_new_tokens=args.generate, eos_token_id=eos,
                                pad_token_id=0)
        ours_s = time.perf_counter() - start
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
            start = time.perf_counter()
            theirs = model.generate(ids, attention_mask=mask, max_new_tokens=args.generate, do_sample=False,
                                    pad_token_id=0).numpy()
            theirs_s = time.perf_counter() - start

    same = ours.shape == theirs.shape and bool((ours == theirs).all())
    steps = ours.shape[1] - args.prompt
    print(f"tokens equal to transformers' generate: {same} ({args.batch} rows x {steps} new tokens)")
    print(f"ms per generated token: attnc + ONNX Runtime {1e3 * ours_s / steps:.2f}, "
          f"transformers eager {1e3 * theirs_s / max(theirs.shape[1] - args.prompt, 1):.2f} "
          f"({theirs_s / ours_s:.2f}x)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "attention_nodes": manifest["ops_after"].get("Attention", 0), "validation_passed": result.passed,
                  "tokens_equal": same, "new_tokens": steps, "attnc_onnxruntime_s": ours_s,
                  "transformers_eager_s": theirs_s}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if not (same and result.passed):
        raise SystemExit(1)
    print(np.asarray(ours[:, args.prompt:])[:2])


if __name__ == "__main__":
    main()
