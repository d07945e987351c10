"""Which transformers architectures attnc fuses and prunes, each checked against the torch model.

For every architecture of ``attnc.models.transformers_zoo`` (two layers, four heads, built from its
config; random weights nudged away from exporter-shared values; no hub downloads), exported by the
chosen exporter(s) with dynamic batch and length (TorchScript cannot export SDPA with ``enable_gqa``:
for grouped- and multi-query models that row exports transformers' eager attention, as users would,
and says so), then

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
from attnc.models.transformers_zoo import Output, builders, dynamic_axes, example_input, perturbed  # noqa: E402
from attnc.passes import fuse_attention  # noqa: E402
from attnc.passes.prune_heads import find_attention_layers, gates_from_keep, head_gates, prune_heads  # noqa: E402

def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def _export(name: str, model: torch.nn.Module, exporter: str, tmp: Path) -> Path:
    return export_onnx(model, (example_input(name, 2, 9),), tmp / f"{name}-{exporter}.onnx",
                       exporter=exporter, input_names=["x"], dynamic_axes=dynamic_axes(name))


def check(name: str, build, exporter: str, tmp: Path) -> dict:
    """One architecture with one exporter: the row of the table (see the module docstring)."""
    row: dict = {"model": name, "exporter": exporter}
    torch.manual_seed(0)
    try:
        hf = perturbed(build())   # trained-looking: no zero biases or ones that exporters share
    except Exception as exc:  # noqa: BLE001 - e.g. a config argument a transformers upgrade renamed
        row["export"] = f"building the model failed: {_first_line(exc)}"
        return row
    model = Output(hf).eval()
    try:
        path = _export(name, model, exporter, tmp)
    except Exception as exc:  # noqa: BLE001 - a map of what works: report and go on
        if exporter != "torchscript" or "enable_gqa" not in str(exc) or not hasattr(hf, "set_attn_implementation"):
            row["export"] = _first_line(exc)
            return row
        # TorchScript cannot export SDPA with enable_gqa (grouped-query and multi-query models): users
        # export transformers' eager attention instead, and so does this row
        hf.set_attn_implementation("eager")
        row["attention"] = "eager"
        try:
            path = _export(name, model, exporter, tmp)
        except Exception as exc:  # noqa: BLE001
            row["export"] = _first_line(exc)
            return row
    exported = onnx.load(str(path))
    x = example_input(name, 3, 11, torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).numpy()
    try:   # the export itself at the check's shapes (TorchScript may bake the example's sizes in)
        error = float(np.abs(load(exported).infer({"x": x.numpy()})["output"] - reference).max())
    except Exception as exc:  # noqa: BLE001
        row["export"] = f"the export fails at another batch and length: {_first_line(exc)}"
        return row
    if not error <= 1e-4:
        row["export"] = f"the export is off by {error:.1e} at another batch and length"
        return row
    row["export"] = "ok"
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
    configs = builders()
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
        exporter = row["exporter"] + (f" ({row['attention']})" if "attention" in row else "")
        if row["export"] != "ok":
            table.add_row(row["model"], exporter, f"[dim]export failed: {row['export'][:70]}[/dim]", "")
        else:
            table.add_row(row["model"], exporter, _cell(row, "fuse"), _cell(row, "prune"))
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
