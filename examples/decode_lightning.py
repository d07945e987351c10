"""Greedy generation with a lightning-attention LM: prefill + decode through attnc and ONNX Runtime.

Exports the LM's prefill (``ids -> logits, states``) and decode step (``ids, states -> logits,
states``) graphs, compiles both with attnc (ONNX Runtime backend; each lightning attention becomes one
``KernelLinearAttention`` node with its recurrent state in and out), generates ``--generate``
tokens greedily after a random prompt, does the same with PyTorch eager, and prints whether the
tokens agree, how far each side's logits are from the float64 model run once on the whole generated
sequence, and the time per decoded token (on a CPU only the ratio means much). The LMs
(``--model``):

- ``attnc``: the project's ``lm-lightning-prefill-small`` / ``lm-lightning-decode-small``;
- ``minimax``: transformers' ``MiniMaxForCausalLM``, a lightning-attention layer then a softmax one as
  MiniMax-Text-01 interleaves them (``attnc.models.transformers_zoo.MiniMaxDecoder``): the lightning
  layer's prefill computed block by block as transformers writes it (exported at the prompt's length),
  its decode step on MiniMax's linear cache, the softmax layer's keys and values in and out (its KV
  cache, dynamic in length); the softmax layer becomes ONNX ``Attention``::

    python examples/decode_lightning.py --prompt 9 --generate 24 --batch 1
    python examples/decode_lightning.py --model minimax --prompt 9 --generate 24
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.export import export_onnx
from attnc.compiler.pipeline import CompileOptions, compile_model
from attnc.models import transformers_zoo
from attnc.models.registry import get_spec

PREFILL, DECODE = "lm-lightning-prefill-small", "lm-lightning-decode-small"
ATTENTION_OPS = ("KernelLinearAttention", "Attention")


def lightning_lm(name: str, prompt: int,
                 minimax_layers: tuple[str, ...] = ("linear_attention", "full_attention")):
    """The ``--model`` LM (``forward(ids, *states) -> logits, *states`` and ``logits(ids)``), its
    vocabulary size, and its prefill and decode graphs as ``(name, module to export, example inputs,
    input names, dynamic axes)``. ``minimax_layers``: the MiniMax model's layer types."""
    if name == "attnc":
        specs = [get_spec(n) for n in (PREFILL, DECODE)]
        graphs = [(s.name, s.factory(), s.example_inputs(batch=2), s.input_names, s.dynamic_axes) for s in specs]
        model = specs[0].factory()
        return model, model.lm_head.out_features, graphs
    model = transformers_zoo.MiniMaxDecoder(transformers_zoo.minimax_lm(minimax_layers)).eval()
    config = model.model.config
    states, axes = [], []   # decode inputs after ids: a lightning layer's state, a softmax layer's K and V
    for kind in config.layer_types:
        if kind == "linear_attention":
            states.append(torch.zeros(2, config.num_attention_heads, config.head_dim, config.head_dim))
            axes.append({0: "batch"})
        else:
            states += [torch.zeros(2, config.num_key_value_heads, prompt, config.head_dim) for _ in "kv"]
            axes += [{0: "batch", 2: "past"}] * 2
    names = ["ids", *(f"state_{i}" for i in range(len(states)))]
    batch = {"ids": {0: "batch"}}
    graphs = [("minimax-prefill", model, (torch.zeros(2, prompt, dtype=torch.int64),), names[:1], batch),
              ("minimax-decode", model, (torch.zeros(2, 1, dtype=torch.int64), *states), names,
               {**batch, **dict(zip(names[1:], axes))})]
    return model, config.vocab_size, graphs


def compile_for_onnxruntime(graphs, workdir: Path, exporter: str, threads: int):
    """Export and compile the prefill and decode graphs; their ONNX Runtime runners, and the attention
    ops in each compiled graph (``{op type: count}``)."""
    runners, fused = [], []
    for name, module, example_inputs, input_names, dynamic_axes in graphs:
        path = export_onnx(module, example_inputs, workdir / f"{name}.onnx", exporter=exporter,
                           dynamic_axes=dynamic_axes, input_names=input_names)
        manifest = compile_model(path, workdir / name, CompileOptions(backend="onnxruntime"))
        runners.append(load(workdir / name / manifest["artefact"], threads=threads))
        ops = [n.op_type for n in onnx.load(str(workdir / name / manifest["artefact"])).graph.node]
        fused.append({op: ops.count(op) for op in ATTENTION_OPS if op in ops})
    return runners, fused


def generate_onnxruntime(prefill, decode, prompt: np.ndarray, steps: int):
    """Greedy tokens ``[B, steps]``, the logits that chose them, and seconds per decode step."""
    out = prefill.infer({"ids": prompt})
    layers = len(out) - 1
    logits = [out["output"][:, -1]]
    states = [out[f"output_{i + 1}"] for i in range(layers)]
    tokens = [logits[-1].argmax(-1)]
    start = time.perf_counter()
    for _ in range(steps - 1):
        out = decode.infer({"ids": tokens[-1][:, None], **{f"state_{i}": s for i, s in enumerate(states)}})
        states = [out[f"output_{i + 1}"] for i in range(layers)]
        logits.append(out["output"][:, -1])
        tokens.append(logits[-1].argmax(-1))
    per_token = (time.perf_counter() - start) / max(steps - 1, 1)
    return np.stack(tokens, 1), np.stack(logits, 1), per_token


@torch.no_grad()
def generate_torch(model, prompt: np.ndarray, steps: int):
    """:func:`generate_onnxruntime` with the PyTorch module in eager mode."""
    out, *states = model(torch.from_numpy(prompt))
    logits = [out[:, -1]]
    tokens = [logits[-1].argmax(-1)]
    start = time.perf_counter()
    for _ in range(steps - 1):
        out, *states = model(tokens[-1][:, None], *states)
        logits.append(out[:, -1])
        tokens.append(logits[-1].argmax(-1))
    per_token = (time.perf_counter() - start) / max(steps - 1, 1)
    return torch.stack(tokens, 1).numpy(), torch.stack(logits, 1).numpy(), per_token


@torch.no_grad()
def float64_logits(model, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """The logits that chose each generated token, from one stateless float64 pass."""
    ids = torch.from_numpy(np.concatenate([prompt, tokens[:, :-1]], axis=1))
    return model.double().logits(ids)[:, prompt.shape[1] - 1:].numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="attnc", choices=("attnc", "minimax"), help="the LM (see above)")
    parser.add_argument("--prompt", type=int, default=9, help="prompt length")
    parser.add_argument("--generate", type=int, default=24, help="tokens to generate")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch intra-op threads")
    parser.add_argument("--workdir", type=Path, help="where the ONNX files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.prompt < 1 or args.generate < 1:
        parser.error("--prompt and --generate must be at least 1")
    if args.model == "minimax" and args.exporter == "torchscript":
        parser.error("--model minimax exports with dynamo only: TorchScript does not trace transformers' KV cache "
                     "of its softmax layer")
    torch.set_num_threads(args.threads)

    model, vocab, graphs = lightning_lm(args.model, args.prompt)
    prompt = np.random.default_rng(args.seed).integers(0, vocab, (args.batch, args.prompt), dtype=np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        (prefill, decode), fused = compile_for_onnxruntime(graphs, workdir, args.exporter, args.threads)
        ort_tokens, ort_logits, ort_time = generate_onnxruntime(prefill, decode, prompt, args.generate)
    torch_tokens, torch_logits, torch_time = generate_torch(model, prompt, args.generate)
    exact = float64_logits(model, prompt, torch_tokens)

    same = np.array_equal(ort_tokens, torch_tokens)
    print(f"lightning LM ({args.model}): batch {args.batch}, prompt {args.prompt}, {args.generate} tokens generated "
          f"({args.exporter} export, {args.threads} thread(s))")
    print(f"attention ops           prefill {fused[0]}, decode {fused[1]}")
    print(f"tokens equal            {'yes' if same else 'NO'}")
    print(f"max |logit diff|        {np.abs(ort_logits - torch_logits).max():.2e} (ONNX Runtime vs PyTorch)")
    print(f"{'':24}{'ms/token':>10}{'max |logit - fp64|':>20}")
    for label, per_token, logits in (("attnc + ONNX Runtime", ort_time, ort_logits),
                                     ("PyTorch eager", torch_time, torch_logits)):
        error = f"{np.abs(logits - exact).max():.2e}" if same or label == "PyTorch eager" else "-"
        print(f"{label:24}{per_token * 1e3:>10.3f}{error:>20}")
    print(f"PyTorch / ONNX Runtime time per token: {torch_time / ort_time:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
