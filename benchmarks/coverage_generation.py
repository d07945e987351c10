"""Which transformers decoder-only architectures export, fuse and generate as a cached step.

For every causal LM of ``attnc.models.transformers_zoo`` (two layers, four heads, random weights nudged
away from exporter-shared values; no hub downloads), saved with ``save_pretrained`` and loaded back as
``attnc export DIR --with-past`` loads it (:func:`attnc.models.hf_checkpoint.with_past`), exported by
the chosen exporter(s), then

- **fuse**: ``passes.fuse_attention`` (what ``attnc compile`` runs); the ``Attention`` nodes it made
  per layer, and the largest difference between ONNX Runtime on the fused step and the torch step at
  other sizes than the export's (a left-padded 6-token prompt with an empty cache, then one token
  after 7 cached ones, batch 3), at the tokens (``attention_mask`` 1);
- **generate**: greedy decoding of up to 8 tokens from a left-padded batch of prompts through the fused
  step (:func:`attnc.compiler.decode.generate`, with the model's end-of-sequence tokens) against
  transformers' ``generate(do_sample=False)``: whether every token is the same.

A failure is reported with its first line, not raised: this is a map of what works. It prints a table
and writes ``benchmarks/results/coverage-generation-<date>.json`` (transformers' version in the record).
``tests/compiler/test_hf_checkpoint.py`` holds the architectures the project guarantees.

    python benchmarks/coverage_generation.py                         # every causal LM, both exporters
    python benchmarks/coverage_generation.py --models llama gpt2 --exporters torchscript
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from bench_fusion import machine  # noqa: E402

from attnc.compiler import decode  # noqa: E402
from attnc.compiler.backends.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.compiler.pipeline import tokens_only  # noqa: E402
from attnc.models.hf_checkpoint import decoder_only, load_checkpoint, padding_mask, with_past  # noqa: E402
from attnc.models.transformers_zoo import builders, perturbed  # noqa: E402
from attnc.passes import fuse_attention  # noqa: E402

NEW_TOKENS = 8


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def step_error(runner, step, spec, batch: int, past: int, seq: int, seed: int) -> float:
    """The largest difference between ``runner`` and the torch ``step`` at the tokens, on ``spec``'s
    example inputs at these sizes (``past = 0``: a prompt's step)."""
    inputs = spec.example_inputs(batch=batch, seed=seed, past=past, seq=seq)
    feeds = {name: t.numpy() for name, t in zip(spec.input_names, inputs)}
    with torch.no_grad():
        expected = dict(zip(spec.output_names, (t.numpy() for t in step(*inputs))))
    got, want = (tokens_only(run, feeds[decode.MASK], spec.token_axes())(feeds)
                 for run in (runner.infer, lambda _: expected))
    return max(float(np.abs(got[name] - want[name]).max()) for name in want)


def check(name: str, model: torch.nn.Module, exporter: str, tmp: Path) -> dict:
    """One architecture with one exporter: the row of the table (see the module docstring)."""
    row: dict = {"model": name, "exporter": exporter}
    folder = tmp / name
    if not folder.exists():
        model.save_pretrained(folder)
    try:
        start = time.perf_counter()
        step, spec = with_past(*load_checkpoint(str(folder)))
        path = export_onnx(step, spec.example_inputs(), tmp / f"{name}-{exporter}.onnx", exporter=exporter,
                           dynamic_axes=spec.dynamic_axes, input_names=spec.input_names,
                           output_names=spec.output_names)
        row["export_s"] = round(time.perf_counter() - start, 1)
    except Exception as exc:
        row["export"] = _first_line(exc)
        return row
    try:
        fused, _ = fuse_attention(onnx.load(str(path)))
        ops = Counter(n.op_type for n in fused.graph.node)
        row["attention_nodes"] = sum(count for op, count in ops.items() if op.endswith("Attention"))
        runner = OnnxRuntimeRunner(fused, threads=1)
        row["fuse_err"] = max(step_error(runner, step, spec, 3, 0, 6, seed=1),
                              step_error(runner, step, spec, 3, 7, 1, seed=2))
    except Exception as exc:
        row["fuse"] = _first_line(exc)
        return row
    try:
        ids = torch.randint(0, spec.inputs[0].high, (3, 7), generator=torch.Generator().manual_seed(3))
        mask = padding_mask(3, 7, "left")
        eos = step.model.generation_config.eos_token_id
        ours = decode.generate(runner, ids.numpy(), mask.numpy(), max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                               pad_token_id=0)
        with torch.no_grad():
            theirs = step.model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                                         pad_token_id=0).numpy()
        row["same_tokens"] = bool(ours.shape == theirs.shape and (ours == theirs).all())
    except Exception as exc:
        row["generate"] = _first_line(exc)
    return row


def _cell(row: dict) -> tuple[str, str, str]:
    if "export" in row:
        return f"[red]{row['export'][:70]}[/]", "", ""
    if "fuse" in row:
        return f"{row['export_s']} s", f"[red]{row['fuse'][:60]}[/]", ""
    fuse = f"{row['attention_nodes']} nodes, {row['fuse_err']:.1e}"
    if "generate" in row:
        return f"{row['export_s']} s", fuse, f"[red]{row['generate'][:60]}[/]"
    return f"{row['export_s']} s", fuse, "[green]same[/]" if row["same_tokens"] else "[red]differ[/]"


def main() -> None:
    import transformers

    configs = builders()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, choices=list(configs), help="default: every causal LM")
    parser.add_argument("--exporters", nargs="+", default=["dynamo", "torchscript"], choices=["dynamo", "torchscript"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="a directory")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    console, rows = Console(), []
    table = Table("model", "exporter", "export", "fused (Attention nodes, max |diff|)", "greedy tokens vs generate")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list(configs):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                try:
                    model = perturbed(configs[name]()).eval()
                except Exception as exc:
                    console.print(f"{name}: cannot build ({_first_line(exc)})")
                    continue
            if model.main_input_name != "input_ids" or not decoder_only(model):   # what --with-past takes
                continue
            for exporter in args.exporters:
                row = check(name, model, exporter, Path(tmp))
                rows.append(row)
                table.add_row(name, exporter, *_cell(row))
                console.print(f"{name} {exporter}: {row}")
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"coverage-generation-{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps({"machine": machine(), "transformers": transformers.__version__, "rows": rows},
                               indent=1) + "\n")
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
