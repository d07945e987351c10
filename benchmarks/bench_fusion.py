"""Fusion benchmark: ONNX node count and ONNX Runtime CPU latency before/after the passes.

For each model, the exported graph and the fused graph run side by side in one
process, interleaved (before, after, before, after, ...) so machine noise hits both
alike; the ratio is the number to read. Raw timings and the machine description go
to ``benchmarks/results/fusion-<date>.json``.

    python benchmarks/bench_fusion.py                      # every *-realistic model
    python benchmarks/bench_fusion.py na2d-realistic --repeats 20
    python benchmarks/bench_fusion.py lm-linear-realistic --size seq=2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

from attnc import passes
from attnc.compiler.backends.onnxruntime import OnnxRuntimeRunner
from attnc.compiler.export import export_onnx
from attnc.models.registry import SPECS, get_spec

DEFAULT_MODELS = [
    "na2d-realistic", "na2d-gather-realistic", "vit-agent-realistic", "vit-flow-realistic",
    "vit-linear-realistic", "vit-neighborhood-realistic", "vit-mhsa-realistic",
    "lm-linear-realistic", "lm-lightning-realistic", "lm-flow-realistic",
]


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": ort.__version__, "onnx": onnx.__version__, "platform": platform.platform()}


def time_interleaved(runners: dict, feeds: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Run every runner once per round, ``repeats`` rounds, so machine noise hits all alike:
    ``({key: seconds per run}, {key: median})``."""
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(repeats):
        for key, runner in runners.items():
            t = time.perf_counter()
            runner.infer(feeds)
            times[key].append(time.perf_counter() - t)
    return times, {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, sizes: dict[str, int], repeats: int, threads: int, exporter: str,
                lower: list[str] | None = None) -> dict:
    spec = get_spec(name)
    inputs = spec.example_inputs(batch=1, **{k: v for k, v in sizes.items() if k in spec.sizes})
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(spec.factory(), inputs, Path(tmp) / "model.onnx", exporter=exporter,
                           input_names=spec.input_names)
        before = onnx.load(str(path))
    after, reports = passes.fuse_attention(before)
    graphs = {"before": before, "after": after}
    if lower:  # the same fusion with these families lowered to standard ONNX ops, timed in the same loop
        graphs["lowered"] = passes.fuse_attention(before, lower=lower)[0]
    runners = {key: OnnxRuntimeRunner(graph, providers=["CPUExecutionProvider"], threads=threads)
               for key, graph in graphs.items()}
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, inputs)}
    outputs = {k: r.infer(feeds) for k, r in runners.items()}  # also the warm-up
    ref = outputs["before"]
    max_rel = max(float(np.max(np.abs(got[k] - ref[k])) / (np.max(np.abs(ref[k])) + 1e-12))
                  for key, got in outputs.items() if key != "before" for k in ref)
    times, med = time_interleaved(runners, feeds, repeats)
    extra = {}
    if lower:
        extra = {"lowered": lower, "nodes_lowered": len(graphs["lowered"].graph.node),
                 "median_s_lowered": med["lowered"], "lowered_vs_fused": med["after"] / med["lowered"]}
    return {**extra, 
        "model": name, "family": spec.family, "exporter": exporter, "ort_threads": threads or "default",
        "input_shapes": {n: list(t.shape) for n, t in zip(spec.input_names, inputs)},
        "nodes_before": len(before.graph.node), "nodes_after": len(after.graph.node),
        "fused": {r.family: r.rewritten for r in reports if r.rewritten},
        "median_s_before": med["before"], "median_s_after": med["after"],
        "speedup": med["before"] / med["after"], "max_rel_diff": max_rel,
        "times_s": times,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", default=DEFAULT_MODELS, help=f"from {sorted(SPECS)}")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    parser.add_argument("--size", action="append", default=[], help="override a size, e.g. seq=2048")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--lower", action="append", default=[], choices=["agent", "linear"],
                        help="also time the fused graph with this family lowered to standard ONNX ops, "
                             "interleaved with the other two (column 'lowered vs fused': > 1, lowering is faster)")
    args = parser.parse_args()
    sizes = {k: int(v) for k, v in (s.split("=") for s in args.size)}

    console = Console(width=180)
    rows = []
    for name in args.models:
        with console.status(f"{name}"):
            rows.append(bench_model(name, sizes, args.repeats, args.threads, args.exporter, args.lower))
    columns = ["model", "fused", "nodes before", "nodes after", "ORT before (ms)", "ORT after (ms)", "speed-up",
               "max rel diff"] + (["ORT lowered (ms)", "lowered vs fused"] if args.lower else [])
    table = Table(*columns, title=f"fusion on ONNX Runtime CPU ({machine()['cpu']})")
    for r in rows:
        cells = [r["model"], ", ".join(f"{k}×{v}" for k, v in r["fused"].items()) or "-",
                 str(r["nodes_before"]), str(r["nodes_after"]), f"{r['median_s_before'] * 1e3:.2f}",
                 f"{r['median_s_after'] * 1e3:.2f}", f"{r['speedup']:.2f}×", f"{r['max_rel_diff']:.1e}"]
        if args.lower:
            cells += [f"{r['median_s_lowered'] * 1e3:.2f}", f"{r['lowered_vs_fused']:.2f}×"]
        table.add_row(*cells)
    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"fusion-{time.strftime('%Y-%m-%d')}.json"
    previous = json.loads(path.read_text())["results"] if path.exists() else []
    keep = [r for r in previous if r["model"] not in {x["model"] for x in rows}]
    path.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                "repeats": args.repeats, "results": keep + rows}, indent=1) + "\n")
    console.print(f"raw results: {path}")


if __name__ == "__main__":
    main()
