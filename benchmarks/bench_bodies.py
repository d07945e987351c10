"""A fused op's ONNX function body now vs at an earlier git revision, on ONNX Runtime CPU.

The body is what ONNX Runtime (attnc's embedded CPU backend) runs for a fused node. This
times one node of ``KernelLinearAttention`` or ``FlowAttention`` built by the op module of
the working tree and by the same module at ``--rev``, side by side (interleaved runs, one
process), checks both give the same output, prints a table and saves the raw timings with
the machine description to ``benchmarks/results/bodies-<date>.json``::

    python benchmarks/bench_bodies.py --rev f4c4ca4              # before the chunked bodies
    python benchmarks/bench_bodies.py --rev HEAD~3 --tokens 197,2048 --ops linear
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnc.compiler.backends.onnxruntime import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_fusion import machine  # noqa: E402

# (label, op, node attributes, with decay)
CASES = [
    ("lightning (identity, decay)", "linear", dict(feature_map="identity", causal=1, normalize=0), True),
    ("linear elu+1 causal", "linear", dict(feature_map="elu1", causal=1, normalize=1), False),
    ("linear elu+1 non-causal", "linear", dict(feature_map="elu1", causal=0, normalize=1), False),
    ("flow causal", "flow", dict(causal=1), False),
    ("flow non-causal", "flow", dict(causal=0), False),
]


def module_at(rev: str, op: str, workdir: Path):
    """The op's plugin module (``plugins/<op>/__init__.py``) as of git revision ``rev``."""
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:plugins/{op}/__init__.py"],
                            capture_output=True, text=True, check=True).stdout
    path = workdir / f"{op}_{rev.replace('/', '_').replace('~', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"baseline_{op}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_node_model(module, op: str, tokens: int, attrs: dict, decay: bool, heads: int, dim: int):
    names = ["Q", "K", "V"] + (["decay"] if decay else [])
    shapes = {"Q": [1, heads, tokens, dim], "K": [1, heads, tokens, dim], "V": [1, heads, tokens, dim],
              "decay": [heads]}
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shapes[n]) for n in names]
    node = module.make_node(names, ["O"], "op", **attrs)
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("O", TensorProto.FLOAT, shapes["Q"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if hasattr(module, "add_to_model"):
        module.add_to_model(model, node)
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model, {n: shapes[n] for n in names}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", required=True, help="git revision of the baseline bodies")
    parser.add_argument("--ops", default="linear,flow")
    parser.add_argument("--tokens", default="197,2048,4096")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    ops = args.ops.split(",")
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        current = {op: importlib.import_module(f"attnc.plugins.{op}") for op in ops}
        baseline = {op: module_at(args.rev, op, Path(tmp)) for op in ops}
        print(f"{'case':30s} {'tokens':>7s} {args.rev + ' (ms)':>14s} {'now (ms)':>10s} {'speed-up':>9s} {'max diff':>9s}")
        for tokens in (int(t) for t in args.tokens.split(",")):
            for label, op, attrs, decay in CASES:
                if op not in ops:
                    continue
                runners, feeds = [], None
                for module in (baseline[op], current[op]):
                    model, shapes = single_node_model(module, op, tokens, attrs, decay, args.heads, args.dim)
                    runners.append(load(model, threads=args.threads))
                feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
                if decay:
                    feeds["decay"] = rng.uniform(0.9, 1.0, args.heads).astype(np.float32)
                outs = [r.infer(feeds)["O"] for r in runners]
                diff = float(np.abs(outs[0] - outs[1]).max() / max(np.abs(outs[0]).max(), 1e-30))
                times = [[], []]
                for _ in range(args.repeats):
                    for side, runner in enumerate(runners):
                        start = time.perf_counter()
                        runner.infer(feeds)
                        times[side].append(time.perf_counter() - start)
                before, after = (float(np.median(t)) for t in times)
                rows.append({"case": label, "op": op, "tokens": tokens, "attributes": attrs, "decay": decay,
                             "median_s_baseline": before, "median_s_now": after, "speedup": before / after,
                             "max_rel_diff": diff, "times_s": {"baseline": times[0], "now": times[1]}})
                print(f"{label:30s} {tokens:7d} {before * 1e3:14.2f} {after * 1e3:10.2f} {before / after:8.2f}x "
                      f"{diff:9.1e}", flush=True)
    if not args.no_save:
        args.out.mkdir(parents=True, exist_ok=True)
        date = datetime.date.today().isoformat()
        record = {"machine": machine(),
                  "date": date, "baseline_rev": args.rev, "heads": args.heads, "head_dim": args.dim,
                  "threads": args.threads, "repeats": args.repeats, "results": rows}
        path = args.out / f"bodies-{date}.json"
        path.write_text(json.dumps(record, indent=1))
        print(f"raw results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
