"""Stock transformers models on ONNX Runtime CPU: the export, the fused graph, and the fused graph
after pruning a quarter of the heads, side by side.

Each model is built from its transformers class at its usual width with two layers and random
weights (no hub downloads here), exported by the dynamo exporter with its default SDPA attention
at batch 1, fused (``passes.fuse_attention``: the softmax pass makes each layer one ONNX
``Attention``) and pruned (``prune_heads`` by weight scores, 25 % of the heads, whole K/V groups
for Llama). The three graphs run interleaved in one process (export, fused, pruned, export, ...);
the ratios are the numbers to read. Raw timings go to
``benchmarks/results/transformers-<date>.json``.

    python benchmarks/bench_transformers.py                       # bert, gpt2, llama at 128 and 512 tokens
    python benchmarks/bench_transformers.py --models bert --tokens 1024 --repeats 9
    python benchmarks/bench_transformers.py --models bloom mpt   # ALiBi: transformers-bloom-mpt-<date>.json
    python benchmarks/bench_transformers.py --models gpt_oss minimax   # sinks; lightning attention (static)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_fusion import machine, time_interleaved  # noqa: E402

from attnc.compiler.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.models.transformers_zoo import Output, exportable_experts  # noqa: E402
from attnc.passes import fuse_attention  # noqa: E402
from attnc.passes.prune_heads import prune_heads, score_heads  # noqa: E402

VOCAB = 1000
MODELS = ("bert", "gpt2", "llama", "bloom", "mpt", "gpt_oss", "minimax")
DEFAULT_MODELS = ["bert", "gpt2", "llama"]


def build(name: str) -> torch.nn.Module:
    """Two layers of the model at its usual width (hidden 768, 12 query heads), random weights."""
    import transformers as t

    torch.manual_seed(0)
    if name == "bert":
        return t.BertModel(t.BertConfig(num_hidden_layers=2, vocab_size=VOCAB), add_pooling_layer=False)
    if name == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(n_layer=2, vocab_size=VOCAB))
    if name == "llama":   # 12 query heads on 4 K/V heads
        return t.LlamaForCausalLM(t.LlamaConfig(num_hidden_layers=2, hidden_size=768, intermediate_size=2048,
                                                num_attention_heads=12, num_key_value_heads=4, vocab_size=VOCAB))
    if name == "bloom":   # ALiBi on flattened heads
        return t.BloomForCausalLM(t.BloomConfig(n_layer=2, hidden_size=768, n_head=12, vocab_size=VOCAB))
    if name == "mpt":     # ALiBi [H, 1, S] and a causal masked_fill
        return t.MptForCausalLM(t.MptConfig(n_layers=2, d_model=768, n_heads=12, vocab_size=VOCAB, max_seq_len=2048))
    # small experts: transformers' exportable MoE path gathers each token's expert weights ([tokens, 2·I, C])
    moe = dict(num_hidden_layers=2, hidden_size=768, intermediate_size=256, num_attention_heads=12,
               num_key_value_heads=4, head_dim=64, num_local_experts=2, num_experts_per_tok=1, vocab_size=VOCAB)
    if name == "gpt_oss":   # attention sinks; a 128-token sliding window in layer 0, full attention in layer 1
        return t.GptOssForCausalLM(exportable_experts(t.GptOssConfig(
            **moe, sliding_window=128, layer_types=["sliding_attention", "full_attention"])))
    if name == "minimax":   # lightning attention (blocks of 256: the export is static) in layer 0, softmax in 1
        return t.MiniMaxForCausalLM(exportable_experts(t.MiniMaxConfig(
            **moe, block_size=256, layer_types=["linear_attention", "full_attention"])))
    raise SystemExit(f"unknown model {name!r}: use {', '.join(MODELS)}")


def bench(name: str, tokens: int, repeats: int, threads: int) -> dict:
    model = Output(build(name)).eval()
    ids = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        exported = onnx.load(str(export_onnx(model, (ids,), Path(tmp) / "model.onnx", input_names=["ids"])))
    feeds = {"ids": ids.numpy()}
    fused, reports = fuse_attention(exported)
    scores = score_heads(exported, [feeds], method="weight")
    pruned, prune_report = prune_heads(exported, scores, ratio=0.25)
    pruned_fused, _ = fuse_attention(pruned)
    graphs = {"export": exported, "fused": fused, "pruned": pruned_fused}
    runners = {k: OnnxRuntimeRunner(g, providers=["CPUExecutionProvider"], threads=threads) for k, g in graphs.items()}
    outputs = {k: r.infer(feeds)["output"] for k, r in runners.items()}   # also the warm-up
    times, med = time_interleaved(runners, feeds, repeats)
    ref = outputs["export"]
    return {
        "model": name, "tokens": tokens, "ort_threads": threads,
        "fused": {r.family: r.rewritten for r in reports if r.rewritten},
        "nodes": {k: len(g.graph.node) for k, g in graphs.items()},
        "heads": [prune_report.heads_before, prune_report.heads_after],
        "params": [prune_report.params_before, prune_report.params_after],
        "fused_max_rel_diff": float(np.max(np.abs(outputs["fused"] - ref)) / (np.max(np.abs(ref)) + 1e-12)),
        "median_s": med, "fused_speedup": med["export"] / med["fused"],
        "pruned_speedup": med["export"] / med["pruned"], "times_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=MODELS)
    parser.add_argument("--tokens", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="a directory")
    args = parser.parse_args()
    console = Console(width=160)
    rows = []
    for name in args.models:
        for tokens in args.tokens:
            with console.status(f"{name} at {tokens} tokens"):
                rows.append(bench(name, tokens, args.repeats, args.threads))
    table = Table("model", "tokens", "fused", "export (ms)", "fused (ms)", "fused speed-up", "heads pruned",
                  "pruned+fused (ms)", "pruned speed-up", "fused max rel diff",
                  title=f"transformers models on ONNX Runtime CPU, {args.threads} thread(s) ({machine()['cpu']})")
    for r in rows:
        table.add_row(r["model"], str(r["tokens"]), ", ".join(f"{k}×{v}" for k, v in r["fused"].items()),
                      f"{r['median_s']['export'] * 1e3:.1f}", f"{r['median_s']['fused'] * 1e3:.1f}",
                      f"{r['fused_speedup']:.2f}×", f"{r['heads'][0]} → {r['heads'][1]}",
                      f"{r['median_s']['pruned'] * 1e3:.1f}", f"{r['pruned_speedup']:.2f}×",
                      f"{r['fused_max_rel_diff']:.1e}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.models == DEFAULT_MODELS else "-" + "-".join(args.models)
    path = args.out / f"transformers{tag}-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
                                "results": rows}, indent=1) + "\n")
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
