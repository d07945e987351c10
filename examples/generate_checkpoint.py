"""Generation from a transformers checkpoint through attnc: one cached step, exported, compiled,
validated, then decoding with ONNX Runtime next to transformers' ``generate``.

What ``attnc export CKPT --with-past && attnc compile ... && attnc validate ...`` and
``attnc.runtime.generate`` do, in one script: it exports the checkpoint's generation step with its KV cache,
compiles it (every layer's attention becomes one ONNX ``Attention``), validates it against PyTorch, generates
``--generate`` tokens greedily after a left-padded batch of random prompts, does the same with transformers'
``generate(do_sample=False)`` (beam search with ``--num-beams``), and prints whether the tokens agree and
the time per generated token of each (on a CPU only the ratio means much). An encoder-decoder checkpoint
gets its two graphs, the first step (``--first-step``: encoder, start token, cross-attention keys and
values) and the later ones, both taking the sources' padding mask, and decodes sources padded on the right
with ``attnc.runtime.generate_seq2seq``. Without ``--checkpoint`` it writes a random ``--model``, a Llama
(grouped-query attention, rotary positions) or a T5 (``--width``, ``--layers``), with ``save_pretrained``
first: no hub is reached::

    python examples/generate_checkpoint.py
    python examples/generate_checkpoint.py --model t5 --prompt 64
    python examples/generate_checkpoint.py --model t5 --num-beams 4
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
from attnc.models.hf_checkpoint import (load_checkpoint, padding_mask, with_attention_mask, with_first_step,
                                        with_past)
from attnc.models.transformers_zoo import perturbed


def random_checkpoint(kind: str, folder: Path, width: int, layers: int) -> Path:
    """A random ``LlamaForCausalLM`` (heads of 64 channels, half as many K/V heads) or
    ``T5ForConditionalGeneration`` (heads of 64 channels) saved in ``folder``, without end tokens (seeds torch)."""
    import transformers as t

    heads = max(width // 64, 2)
    torch.manual_seed(0)
    if kind == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(
            hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
            intermediate_size=4 * width, vocab_size=1000, max_position_embeddings=512, eos_token_id=None))
    else:
        model = t.T5ForConditionalGeneration(t.T5Config(
            d_model=width, d_kv=64, num_heads=heads, num_layers=layers, d_ff=4 * width, vocab_size=1000,
            decoder_start_token_id=0, eos_token_id=None))
    perturbed(model)   # nudged like attnc's test models
    if kind == "t5":
        with torch.no_grad():   # T5's fresh embeddings (std 1) swamp its decoder: it would repeat its start token
            model.get_input_embeddings().weight.mul_(0.05)
    model.save_pretrained(folder)
    return folder


def compile_and_validate(module, spec, checkpoint: Path, folder: Path, exporter: str) -> tuple[Path, bool, int]:
    """Export ``module`` (a step of the checkpoint) on ``spec``, compile it for ONNX Runtime, validate it:
    ``(artefact directory, passed, Attention nodes)``."""
    export_onnx(module, spec.example_inputs(), folder.with_suffix(".onnx"), exporter=exporter,
                dynamic_axes=spec.dynamic_axes, input_names=spec.input_names, output_names=spec.output_names)
    manifest = compile_model(folder.with_suffix(".onnx"), folder, CompileOptions(backend="onnxruntime"))
    result, _ = validate_artefact(folder, str(checkpoint))
    return folder, result.passed, manifest["ops_after"].get("Attention", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a save_pretrained directory (default: a random --model)")
    parser.add_argument("--model", choices=["llama", "t5"], default="llama", help="the random model to write")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo")
    parser.add_argument("--batch", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=12, help="prompt (or source) tokens")
    parser.add_argument("--generate", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (1: greedy)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch threads")
    parser.add_argument("--json", type=Path, help="also write the run's raw numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or random_checkpoint(args.model, tmp / args.model, args.width, args.layers)
        loaded = load_checkpoint(str(checkpoint))
        model, spec = loaded[0].model, loaded[1]
        seq2seq = "decoder_input_ids" in spec.input_names
        if seq2seq:   # sources of different lengths: both graphs take the sources' padding mask
            loaded = with_attention_mask(*loaded)
        graphs = [compile_and_validate(*with_first_step(*loaded), checkpoint, tmp / "first", args.exporter)] \
            if seq2seq else []
        graphs.append(compile_and_validate(*with_past(*loaded), checkpoint, tmp / "step", args.exporter))
        passed = all(ok for _, ok, _ in graphs)
        print(f"compiled: {' + '.join(str(n) for _, _, n in graphs)} Attention nodes; "
              f"validation {'PASS' if passed else 'FAIL'}")

        vocab = spec.inputs[0].high
        ids = torch.randint(0, vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
        mask = padding_mask(args.batch, args.prompt, "right" if seq2seq else "left")
        eos = model.generation_config.eos_token_id
        beams = {"num_beams": args.num_beams} if args.num_beams > 1 else {}
        runners = [runtime.load(folder, threads=args.threads) for folder, _, _ in graphs]
        if seq2seq:
            def ours_generate(n):
                return runtime.generate_seq2seq(*runners, ids.numpy(), spec.decoder_start, max_new_tokens=n,
                                                eos_token_id=eos, pad_token_id=0, attention_mask=mask.numpy(), **beams)

            def their_generate(n):
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                      **beams)
        else:
            def ours_generate(n):
                return runtime.generate(*runners, ids.numpy(), mask.numpy(), max_new_tokens=n, eos_token_id=eos,
                                        pad_token_id=0, **beams)

            def their_generate(n):
                return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0,
                                      **beams)

        ours_generate(2)   # warm up
        start = time.perf_counter()
        ours = ours_generate(args.generate)
        ours_s = time.perf_counter() - start
        with torch.no_grad():
            their_generate(2)
            start = time.perf_counter()
            theirs = their_generate(args.generate).numpy()
            theirs_s = time.perf_counter() - start

    same = ours.shape == theirs.shape and bool((ours == theirs).all())
    first = 1 if seq2seq else args.prompt   # where the generated tokens start
    steps = ours.shape[1] - first
    print(f"tokens equal to transformers' generate: {same} ({args.batch} rows x {steps} new tokens)")
    print(f"ms per generated token: attnc + ONNX Runtime {1e3 * ours_s / steps:.2f}, "
          f"transformers eager {1e3 * theirs_s / max(theirs.shape[1] - first, 1):.2f} "
          f"({theirs_s / ours_s:.2f}x)")
    if args.json:
        record = {"date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
                  "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "attention_nodes": [n for _, _, n in graphs], "validation_passed": passed,
                  "tokens_equal": same, "new_tokens": steps, "attnc_onnxruntime_s": ours_s,
                  "transformers_eager_s": theirs_s}
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    if not (same and passed):
        raise SystemExit(1)
    print(np.asarray(ours[:, first:])[:2])


if __name__ == "__main__":
    main()
