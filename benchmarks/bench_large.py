"""What compiling a large model costs: time and peak memory of ``attnc inspect``, ``compile --prune-heads`` and
``validate`` on the bundled ``lm-mhsa-small`` grown to a few sizes, and why (shape inference and an ONNX Runtime
session of the model with its weights serialised, against attnc's weight-free copy and arrays, side by side).

    python benchmarks/bench_large.py [--sizes 0.25 0.5 1 2.1] [--rev 59be35d] [--out benchmarks/results] [--smoke]
                                     [--tag NAME] [--external] [--baseline-max-gib 2]
                                     [--export [--exporter torchscript]]

With ``--rev``, every command also runs with attnc as of that git revision (its package assembled from ``git
archive`` and put first on ``PYTHONPATH``), interleaved with the working tree's, so the ratios come from one run.
The commands: (with ``--export``) ``export`` of the PyTorch model grown alike (``grown_lm``: its token table
grown to the size; ``--exporter``), ``inspect``, ``compile`` (fusion), ``validate`` of that artefact,
``compile --prune-heads 0.5`` and (working tree only: before session 12 a pruned artefact was compared with the
unpruned model) its ``validate``.
The baseline does not run on models past ``--baseline-max-gib`` (default 2: before session 12 attnc could not
serialise them, and its copies would exhaust memory).

The model: ``lm-mhsa-small`` exported with TorchScript, its token and position tables grown (zeros in the new rows,
which no token id or position reads) to half the size each, saved with ``attnc.compiler.onnx_io.save_model``
(external data past 1.8 GB; with ``--external`` at every size, as torch's dynamo exporter saves models by
default). Each CLI command runs in its own process; its wall time and peak resident memory
(``VmHWM``) are recorded. Validation compares with the PyTorch model (token ids below its vocabulary), so the
grown model must still compute what it did. The side-by-side part times, in this process, ONNX shape inference
and the creation of an ONNX Runtime session from the model as it is and from attnc's light copy / arrays
(``light_copy``, ``ort_session``; sizes below 2 GiB only: past it, the model as it is cannot be serialised), with
the two interleaved and the median of 3 taken. Raw numbers: ``<out>/large-<date>.json`` with the machine.
``--smoke``: one tiny size (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def package_at(rev: str, folder: Path) -> Path:
    """A folder holding attnc as of git revision ``rev`` as an importable ``attnc`` package (the repository's
    top-level compiler/, passes/, plugins/ and models/ as its sub-packages, as setup.py maps them)."""
    import shutil

    tree = folder / "tree"
    tree.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = folder / "pkg" / "attnc"
    shutil.copytree(tree / "attnc", package)
    for sub in ("compiler", "passes", "plugins", "models"):
        shutil.copytree(tree / sub, package / sub)
    return folder / "pkg"


ROOT = Path(__file__).resolve().parents[1]


def child(args: list[str], report: str) -> None:
    """Run one attnc CLI command in this process; write its wall time, exit code and peak memory to ``report``."""
    from attnc.compiler.cli import cli

    t = time.perf_counter()
    try:
        cli.main(args=args, prog_name="attnc", standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    except Exception as exc:   # noqa: BLE001 - recorded, not raised: the table shows it
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        code = 1
    import attnc

    Path(report).write_text(json.dumps({"seconds": time.perf_counter() - t, "exit": code,
                                        "peak_rss_mb": _peak_rss_mb(), "attnc": str(Path(attnc.__file__).parent)}))


def grown_model(gib: float, folder: Path, external: bool = False) -> Path:
    """lm-mhsa-small with its token and position tables grown to ``gib`` GiB together, saved in ``folder`` (with
    its weights in ``<name>.data`` when ``external``, else only past 1.8 GB)."""
    import onnx
    from onnx import numpy_helper

    from attnc.compiler import onnx_io
    from attnc.compiler.export import export_onnx
    from attnc.models.registry import get_spec

    spec = get_spec("lm-mhsa-small")
    small = export_onnx(spec.factory(), spec.example_inputs(seed=0), folder / "small.onnx", exporter="torchscript",
                        input_names=spec.input_names, dynamic_axes=spec.dynamic_axes)
    model = onnx.load(str(small))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.input[1] == "ids")
    for name in (gather.input[0], "pos_embed"):
        init = next(i for i in model.graph.initializer if i.name == name)
        table = numpy_helper.to_array(init)
        rows = max(table.shape[0], int(gib * 2 ** 30 / 2) // (table.shape[-1] * 4))
        grown = np.zeros((rows, table.shape[-1]), np.float32)
        grown[: table.shape[0]] = table
        init.CopyFrom(numpy_helper.from_array(grown, name))
        del grown
    path = folder / f"lm-{gib:g}gib.onnx"
    if external:
        onnx_io.write_external(model, path)
    else:
        onnx_io.save_model(model, path)
    return path


def grown_lm():
    """``attnc export bench_large:grown_lm``: lm-mhsa-small whose token table holds ``ATTNC_BENCH_GIB`` GiB (rows past
    its vocabulary are zeros no token id reads)."""
    import torch

    from attnc.models.registry import get_spec

    model = get_spec("lm-mhsa-small").factory()
    embedding = next(m for m in model.modules() if isinstance(m, torch.nn.Embedding))
    table = embedding.weight.data
    rows = max(table.shape[0], int(float(os.environ["ATTNC_BENCH_GIB"]) * 2 ** 30) // (table.shape[1] * 4))
    grown = torch.zeros(rows, table.shape[1])
    grown[: table.shape[0]] = table
    embedding.weight = torch.nn.Parameter(grown, requires_grad=False)
    return model


def side_by_side(path: Path, reps: int = 3) -> dict | None:
    """Shape inference and ONNX Runtime session creation, with the weights serialised and attnc's way."""
    import onnx
    import onnxruntime as ort

    from attnc.compiler.onnx_io import is_large, light_copy, ort_session

    model = onnx.load(str(path))
    if is_large(model):
        return None
    runs = {"infer_serialised": [], "infer_light": [], "session_serialised": [], "session_arrays": []}
    for _ in range(reps):
        for name, fn in (("infer_serialised", lambda: onnx.shape_inference.infer_shapes(model)),
                         ("infer_light", lambda: onnx.shape_inference.infer_shapes(light_copy(model))),
                         ("session_serialised", lambda: ort.InferenceSession(model.SerializeToString(),
                                                                           providers=["CPUExecutionProvider"])),
                         ("session_arrays", lambda: ort_session(model))):
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    return {name: statistics.median(times) for name, times in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1.0, 2.1], help="model sizes, GiB")
    parser.add_argument("--rev", help="also run every command with attnc as of this git revision")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", help="name the raw file large-TAG-<date>.json (keeps an earlier run of the day)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--external", action="store_true", help="save every size with its weights in <name>.data")
    parser.add_argument("--export", action="store_true", help="also time `attnc export` of the grown torch model")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"], help="for --export")
    parser.add_argument("--baseline-max-gib", type=float, default=2.0,
                        help="run the --rev side on models up to this size only")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[1:], args.child[0])
        return
    sizes = [0.01] if args.smoke else args.sizes
    rows = []
    with tempfile.TemporaryDirectory(prefix="attnc-bench-large-") as tmp:
        sides = {"now": None}
        if args.rev:
            sides["baseline"] = package_at(args.rev, Path(tmp) / "baseline")
        for gib in sizes:
            folder = Path(tmp) / f"{gib:g}"
            folder.mkdir()
            path = grown_model(gib, folder, args.external)
            files = sum(p.stat().st_size for p in folder.glob(f"{path.name}*"))
            row = {"gib": gib, "file_bytes": files, **{side: {} for side in sides}}
            steps = ((("export", ["export", "bench_large:grown_lm", "-o", "{out}/exported.onnx", "--exporter",
                                  args.exporter, *VALIDATE[2:]]),) if args.export else ()) + (
                     ("inspect", ["inspect", "{model}"]),
                     ("compile", ["compile", "{model}", "-o", "{out}/fused"]),
                     ("validate", ["validate", "{out}/fused", *VALIDATE]),
                     ("prune", ["compile", "{model}", "-o", "{out}/pruned", "--prune-heads", "0.5"]),
                     ("validate_pruned", ["validate", "{out}/pruned", *VALIDATE]))
            for step, template in steps:
                for side, package in sides.items():
                    if side == "baseline" and (step == "validate_pruned" or files > args.baseline_max_gib * 2 ** 30):
                        continue   # before session 12 attnc could not serialise a model past 2 GiB: not run (memory)
                    out = folder / side
                    cli_args = [a.format(model=path, out=out) for a in template]
                    report = folder / f"{side}-{step}.json"
                    env = dict(os.environ, ATTNC_BENCH_GIB=str(gib),
                               **({"PYTHONPATH": str(package)} if package else {}))
                    subprocess.run([sys.executable, __file__, "--child", str(report), *cli_args], check=False,
                                   stdout=subprocess.DEVNULL, env=env)
                    row[side][step] = json.loads(report.read_text())
            row["side_by_side"] = side_by_side(path)
            rows.append(row)
            shutil_rmtree(folder)
            _print(rows[-1:], header=len(rows) == 1, sides=list(sides))
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "python": sys.version.split()[0]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"-{t}" for t in ("smoke" if args.smoke else None, args.tag) if t)
    target = out / f"large{tag}-{time.strftime('%Y-%m-%d')}.json"
    target.write_text(json.dumps({"machine": machine, "date": time.strftime("%Y-%m-%d"), "baseline_rev": args.rev,
                                  "external": args.external, "rows": rows}, indent=2) + "\n")
    print(f"raw numbers: {target}")


def shutil_rmtree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


VALIDATE = ["--model", "lm-mhsa-small", "--input-shape", "ids:2x17:int64", "--int-high", "90"]
STEPS = ("export", "inspect", "compile", "validate", "prune", "validate_pruned")


def _print(rows: list[dict], header: bool, sides: list[str]) -> None:
    if header:
        print(f"{'GiB':>5} {'side':>8} | " + " | ".join(f"{s:>15} s / GB" for s in STEPS)
              + " | infer: serialised / light | session: serialised / arrays")
    for r in rows:
        for side in sides:
            cells = []
            for step in STEPS:
                got = r[side].get(step)
                cells.append(" " * 22 if got is None else
                             f"{got['seconds']:>15.1f} / {got['peak_rss_mb'] / 1024:>4.1f}" if got["exit"] == 0 else
                             f"{'FAILED':>22}")
            sbs = r["side_by_side"]
            extra = ("cannot serialise past 2 GiB" if not sbs else
                     f"{sbs['infer_serialised']:.2f} / {sbs['infer_light']:.3f} s | "
                     f"{sbs['session_serialised']:.2f} / {sbs['session_arrays']:.2f} s") if side == "now" else ""
            print(f"{r['gib']:>5g} {side:>8} | " + " | ".join(cells) + f" | {extra}")


if __name__ == "__main__":
    main()
