"""ONNX Runtime CPU latency of neighborhood attention before and after fusion (issue #3).

Exports the registry's ``na2d-realistic`` model (NAT-Mini first stage: 56x56 tokens, dim 64,
2 heads, kernel 7, RPB, written as full attention + additive neighborhood mask) and, with
``--gather``, its gather-form twin; fuses it with ``attnc.passes.neighborhood``; then times both
graphs side by side in one process (interleaved runs, same inputs, same thread count) and prints::

    model | nodes before -> after | median ms before | median ms after | speed-up

Raw numbers and a machine description go to ``benchmarks/results/neighborhood_fusion_<date>.json``.

    python benchmarks/bench_neighborhood_fusion.py [--threads 1] [--runs 20] [--gather] [--video]

``--video`` times the 3-D models instead (``na3d-realistic``: 8 frames of 14x14 tokens,
kernel 3x7x7, dim 64, 2 heads).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from attnc.compiler.export import export_onnx
from attnc.models.registry import get_spec
from attnc.passes import neighborhood

RESULTS = Path(__file__).resolve().parent / "results"


def _session(model: onnx.ModelProto, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def bench(spec_name: str, exporter: str, threads: int, runs: int, batch: int) -> dict:
    spec = get_spec(spec_name)
    model = spec.factory().eval()
    x = spec.example_inputs(batch=batch, seed=0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "model.onnx"
        export_onnx(model, x, path, exporter=exporter, dynamic_axes=spec.dynamic_axes,
                    input_names=spec.input_names)
        original = onnx.load(str(path))
    start = time.perf_counter()
    fused, report = neighborhood.apply(original)
    pass_s = time.perf_counter() - start
    if report.rewritten != 1:
        raise SystemExit(f"{spec_name}: expected one fusion, got {report.to_dict()}")
    feeds = {n: t.numpy() for n, t in zip(spec.input_names, x)}
    sessions = {"before": _session(original, threads), "after": _session(fused, threads)}
    outputs = {k: s.run(None, feeds)[0] for k, s in sessions.items()}  # also the warm-up
    with torch.no_grad():
        expected = model(*x).numpy()
    times: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(runs):  # interleaved, so drift of a shared machine hits both alike
        for key, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds)
            times[key].append((time.perf_counter() - t0) * 1e3)
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "model": spec_name, "exporter": exporter, "batch": batch, "threads": threads, "runs": runs,
        "input_shape": list(x[0].shape), "attributes": report.matches[0].attributes,
        "nodes_before": len(original.graph.node), "nodes_after": len(fused.graph.node),
        "pass_seconds": pass_s,
        "median_ms_before": median["before"], "median_ms_after": median["after"],
        "speedup": median["before"] / median["after"],
        "max_abs_err_after_vs_before": float(np.abs(outputs["after"] - outputs["before"]).max()),
        "max_abs_err_after_vs_torch": float(np.abs(outputs["after"] - expected).max()),
        "ms_before": times["before"], "ms_after": times["after"],
    }


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": ort.__version__, "onnx": onnx.__version__,
            "torch": torch.__version__, "load_average": list(os.getloadavg())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=1)
    # dynamo folds the mask to a constant: the fair "masked full attention" baseline. TorchScript keeps
    # the mask computation in the graph (before is then ~5x slower still).
    parser.add_argument("--exporter", default="dynamo", choices=["torchscript", "dynamo"])
    parser.add_argument("--gather", action="store_true", help="also time the gather-form model")
    parser.add_argument("--video", action="store_true",
                        help="the 3-D models instead: na3d-realistic (8x14x14 tokens, kernel 3x7x7, dim 64)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    stem = "na3d" if args.video else "na2d"
    names = [f"{stem}-realistic"] + ([f"{stem}-gather-realistic"] if args.gather else [])
    rows = [bench(n, args.exporter, args.threads, args.runs, args.batch) for n in names]
    print(f"{'model':24} {'nodes':>11} {'before ms':>10} {'after ms':>9} {'speed-up':>8}  max|err|")
    for r in rows:
        print(f"{r['model']:24} {r['nodes_before']:>4} -> {r['nodes_after']:<4} {r['median_ms_before']:>10.2f} "
              f"{r['median_ms_after']:>9.2f} {r['speedup']:>7.2f}x  {r['max_abs_err_after_vs_torch']:.1e}")
    out = args.out or RESULTS / f"neighborhood_fusion{'_3d' if args.video else ''}_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "results": rows}, indent=1))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
