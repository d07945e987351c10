"""Which transformers architectures attnc fuses and prunes, each checked against the torch model.

For every architecture: a two-layer model with four heads built from its config (random weights
nudged away from exporter-shared values; no hub downloads), exported by the chosen exporter(s) with
dynamic batch and length, then

- **fuse**: ``passes.fuse_attention``; the families it rewrote and the largest difference between
  ONNX Runtime on the fused graph and the torch model on fresh inputs of another batch and length;
- **prune**: ``prune_heads`` of fixed heads per layer (whole K/V groups where the layer groups its
  K/V heads, query heads for multi-query layers) and the largest difference against the torch model
  with the same heads gated off (``head_gates``), where its attention modules have a gate.

A failure is reported with its first line, not raised: this is a map of what works. It prints a
table and writes ``benchmarks/results/coverage-transformers-<date>.json`` (transformers' version in
the record). ``tests/passes/test_transformers.py`` holds the architectures the project guarantees;
this is what to run after a transformers upgrade, or to see where a new architecture stands.

    python benchmarks/coverage_transformers.py                         # every architecture, both exporters
    python benchmarks/coverage_transformers.py --models gptj qwen3 --exporters dynamo
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_fusion import machine  # noqa: E402

from attnc.compiler.backends.onnxruntime import load  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.passes import fuse_attention  # noqa: E402
from attnc.passes.prune_heads import find_attention_layers, gates_from_keep, head_gates, prune_heads  # noqa: E402

_SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=64,
              max_position_embeddings=64)
IMAGE = {"vit", "deit", "beit", "clip_vision", "siglip_vision", "dinov2"}
AUDIO = {"wav2vec2"}


def _configs(t) -> dict:
    """name -> zero-argument builder (two layers, four heads, width 32)."""
    lm = dict(_SMALL)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
                  patch_size=8)
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
        "vit": lambda: t.ViTModel(t.ViTConfig(**vision), add_pooling_layer=False),
        "deit": lambda: t.DeiTModel(t.DeiTConfig(**vision), add_pooling_layer=False),
        "beit": lambda: t.BeitModel(t.BeitConfig(**vision, use_relative_position_bias=True), add_pooling_layer=False),
        "clip_vision": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**vision)),
        "siglip_vision": lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**vision)),
        "dinov2": lambda: t.Dinov2Model(t.Dinov2Config(**{k: v for k, v in vision.items()
                                                          if k != "intermediate_size"}, mlp_ratio=2)),
        "wav2vec2": lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(8, 8),
            conv_stride=(2, 2), conv_kernel=(3, 3), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)),
    }


class _Output(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, (tuple, torch.Tensor)):
            return out[0] if isinstance(out, tuple) else out
        return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _input(name: str, batch: int, tokens: int, gen=None) -> torch.Tensor:
    if name in IMAGE:
        return torch.randn(batch, 3, 16, 16, generator=gen)
    if name in AUDIO:
        return torch.randn(batch, 4 * tokens + 3, generator=gen)
    return torch.randint(0, 64, (batch, tokens), generator=gen)


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def check(name: str, build, exporter: str, tmp: Path) -> dict:
    """One architecture with one exporter: the row of the table (see the module docstring)."""
    row: dict = {"model": name, "exporter": exporter}
    torch.manual_seed(0)
    try:
        hf = build().eval()
    except Exception as exc:  # noqa: BLE001 - e.g. a config argument a transformers upgrade renamed
        row["export"] = f"building the model failed: {_first_line(exc)}"
        return row
    for p in hf.parameters():   # trained-looking: no zero biases or ones that exporters share
        p.data.add_(0.02 * torch.randn_like(p))
    model = _Output(hf).eval()
    axes = {"x": {0: "batch"}} if name in IMAGE else {"x": {0: "batch", 1: "seq"}}
    try:
        path = export_onnx(model, (_input(name, 2, 9),), tmp / f"{name}-{exporter}.onnx", exporter=exporter,
                           input_names=["x"], dynamic_axes=axes)
    except Exception as exc:  # noqa: BLE001 - a map of what works: report and go on
        row["export"] = _first_line(exc)
        return row
    row["export"] = "ok"
    exported = onnx.load(str(path))
    x = _input(name, 3, 11, torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).numpy()
    try:
        fused, reports = fuse_attention(exported)
        row["fused"] = {r.family: r.rewritten for r in reports if r.rewritten}
        row["near_misses"] = sorted({m.reason for r in reports for m in r.near_misses})[:3]
        row["fused_max_abs_diff"] = float(np.abs(load(fused).infer({"x": x.numpy()})["output"] - reference).max())
    except Exception as exc:  # noqa: BLE001
        row["fused_error"] = _first_line(exc)
    try:
        layers = find_attention_layers(exported)
        grouped = [l for l in layers if l.kv_heads not in (1, l.heads)]
        multi_query = any(l.kv_heads == 1 and l.heads > 1 for l in layers)
        keep = {l.index: ([0, 1] if l.index % 2 == 0 else [2, 3]) if grouped else
                ([0, 2] if l.index % 2 == 0 else [1, 2, 3]) for l in layers}
        pruned, report = prune_heads(exported, keep=keep, granularity="query" if multi_query else "group")
        row["heads"] = [[l.heads_before, l.heads_after] for l in report.layers]
        got = load(pruned).infer({"x": x.numpy()})["output"]
        try:
            with torch.no_grad(), head_gates(model, gates_from_keep(keep, {l.index: l.heads for l in layers})):
                gated = model(x).numpy()
            row["pruned_max_abs_diff"] = float(np.abs(got - gated).max())
        except Exception as exc:  # noqa: BLE001 - pruned, but no torch reference to check it against
            row["pruned_unchecked"] = _first_line(exc)
    except Exception as exc:  # noqa: BLE001
        row["prune_error"] = _first_line(exc)
    return row


def _cell(row: dict, kind: str) -> str:
    if kind == "fuse":
        if "fused_error" in row:
            return f"[red]{row['fused_error'][:60]}[/red]"
        if not row.get("fused"):
            return f"[yellow]none: {(row.get('near_misses') or ['no attention found'])[0][:60]}[/yellow]"
        return f"{', '.join(f'{k}×{v}' for k, v in row['fused'].items())} ({row['fused_max_abs_diff']:.0e})"
    if "prune_error" in row:
        return f"[red]{row['prune_error'][:70]}[/red]"
    heads = " ".join(f"{a}→{b}" for a, b in row["heads"])
    if "pruned_unchecked" in row:
        return f"[yellow]{heads}, no torch reference[/yellow]"
    return f"{heads} ({row['pruned_max_abs_diff']:.0e})"


def main() -> None:
    import transformers

    warnings.filterwarnings("ignore")
    configs = _configs(transformers)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(configs), choices=list(configs))
    parser.add_argument("--exporters", nargs="+", default=["dynamo", "torchscript"], choices=["dynamo", "torchscript"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="a directory")
    args = parser.parse_args()
    console = Console(width=200)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for exporter in args.exporters:
                with console.status(f"{name} ({exporter})"):
                    rows.append(check(name, configs[name], exporter, Path(tmp)))
    table = Table("model", "exporter", "fused (max |diff| vs torch)", "pruned heads per layer (max |diff|)",
                  title=f"transformers {transformers.__version__}: fusion and head pruning against torch")
    for row in rows:
        if row["export"] != "ok":
            table.add_row(row["model"], row["exporter"], f"[dim]export failed: {row['export'][:70]}[/dim]", "")
        else:
            table.add_row(row["model"], row["exporter"], _cell(row, "fuse"), _cell(row, "prune"))
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"coverage-transformers-{time.strftime('%Y-%m-%d')}.json"
    record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "transformers": transformers.__version__,
              "torch": torch.__version__, "results": rows}
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(record, indent=1) + "\n")
    tmp_path.replace(path)
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
