"""Which way TensorRT runs one agent attention: the fused plugin or two native ``Attention`` layers.

The fused TensorRT kernel (:func:`attnc.plugins.agent.kernels.agent_tiled_kernel`) does both
softmax stages in one launch and never writes ``V_A`` to memory, but each of its query tiles
recomputes stage 1: ``(T·M + N)/(M + N)`` times the minimum work for ``T = ⌈N/BLOCK_M⌉``
query tiles (:func:`work_ratio`). Lowered to two ``Attention`` nodes
(:func:`attnc.plugins.agent.lower_to_attention_nodes`) the stages run once each in TensorRT's
own attention kernels, at the price of a second launch and a ``V_A`` round trip through
memory. Which wins depends on the shape class, so ``attnc compile --backend tensorrt``
decides per node (``--lower auto``, its default there):

1. **Measured** (:data:`MEASUREMENTS`, written by ``benchmarks/bench_kernels.py
   --agent-routes`` on a GPU): the nearest measured shape class of the same dtype, head and
   value dims and bias form, within a factor of 2 in queries, keys and agents, decides by
   its timings (measurements from the GPU the compile runs on first).
2. **Work model** otherwise: fused when it does at most :data:`WORK_TOLERANCE` times the
   lowered route's work (saving a launch and the ``V_A`` round trip is assumed to pay for
   that much and no more), lowered when it would do more, or when the query count is
   dynamic (the recompute grows with it; native layers do not care).

:data:`MEASUREMENTS` holds what a lent NVIDIA H200 measured on 2026-12-04 (fp16, bf16, fp32;
``benchmarks/RESULTS.md``): two ``Attention`` layers won every class but the 64-token, one-tile
one in half precision. ``tests/plugins/test_agent_routes.py``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from attnc.compiler.onnx_io import atomic_path

MEASUREMENTS = Path(__file__).with_name("routes.json")
WORK_TOLERANCE = 1.10
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ShapeClass:
    """What the choice depends on; ``None`` for a dim that is dynamic (or unknown)."""

    dtype: str                 # "float32", "float16" or "bfloat16": what the kernel would run in
    queries: int | None        # N
    keys: int | None           # M
    agents: int | None         # n
    head_dim: int | None       # D
    value_dim: int | None      # Dv
    biases: bool               # agent_bias / query_bias present

    def describe(self) -> str:
        dims = lambda v: "?" if v is None else str(v)  # noqa: E731
        return (f"{self.dtype} N={dims(self.queries)} M={dims(self.keys)} n={dims(self.agents)} "
                f"D={dims(self.head_dim)} Dv={dims(self.value_dim)}{' +biases' if self.biases else ''}")


@dataclass(frozen=True)
class Route:
    """The choice for one node and why."""

    lowered: bool
    source: str                # "measured" or "work model"
    reason: str

    def to_dict(self) -> dict:
        return {"route": "lowered" if self.lowered else "fused", "source": self.source, "reason": self.reason}


def query_tile(shape: ShapeClass) -> int:
    """Queries per program of the fused TensorRT kernel for ``shape`` (its launch config)."""
    from attnc.plugins.agent.kernels import agent_trt_config

    return agent_trt_config(_DTYPES[shape.dtype], shape.head_dim or 64, shape.value_dim or shape.head_dim or 64)["BLOCK_M"]


def work_ratio(shape: ShapeClass) -> float | None:
    """Fused kernel's multiply-adds over the lowered route's: ``(T·M + N)/(M + N)``; both
    stages scale with ``n·(D + Dv)``, which cancels. ``None`` when N or M is dynamic."""
    if shape.queries is None or shape.keys is None:
        return None
    return (_query_tiles(shape) * shape.keys + shape.queries) / (shape.keys + shape.queries)


def _query_tiles(shape: ShapeClass) -> int:
    """``T``: the query tiles per head of the fused kernel, each recomputing stage 1."""
    return math.ceil(shape.queries / query_tile(shape))


def choose(shape: ShapeClass, measurements: Sequence[dict] | None = None, device: str | None = None) -> Route:
    """The route for one node of ``shape``: measured if a nearby class was, else the work model.

    Args:
        shape: the node's shape class.
        measurements: entries as :func:`record` writes them (default: :data:`MEASUREMENTS`).
        device: the GPU the engine is for (default: the visible CUDA device, if any);
            entries from it are preferred.
    """
    if measurements is None:
        measurements = load_measurements()
    entry = nearest_measurement(shape, measurements, device if device is not None else _cuda_device())
    if entry is not None:
        fused, lowered = entry["fused_ms"], entry["lowered_ms"]
        return Route(lowered < fused, "measured",
                     f"{'lowered' if lowered < fused else 'fused'} was faster on {entry['device']} "
                     f"({entry['date']}) at {ShapeClass(**entry['shape']).describe()}: "
                     f"fused {fused:.4g} ms, two Attention {lowered:.4g} ms")
    ratio = work_ratio(shape)
    if ratio is None:
        return Route(True, "work model", "the query count is dynamic: the fused kernel recomputes stage 1 "
                                         "per query tile, so its work grows with it; native layers' does not")
    verdict = "at most" if ratio <= WORK_TOLERANCE else "more than"
    return Route(ratio > WORK_TOLERANCE, "work model",
                 f"the fused kernel does {ratio:.2f}x the lowered route's work ({verdict} {WORK_TOLERANCE}x): "
                 f"{_query_tiles(shape)} query tile(s) each recompute stage 1")


def nearest_measurement(shape: ShapeClass, measurements: Sequence[dict], device: str | None = None) -> dict | None:
    """The measured entry closest to ``shape`` in log2 distance over (N, M, n), among entries
    with the same dtype, head/value dims and bias form and within a factor of 2 in each;
    entries from ``device`` win over closer ones from another GPU."""
    if None in (shape.queries, shape.keys, shape.agents):
        return None
    best, best_key = None, None
    for entry in measurements:
        other = ShapeClass(**entry["shape"])
        if (other.dtype, other.head_dim, other.value_dim, other.biases) != (
                shape.dtype, shape.head_dim, shape.value_dim, shape.biases):
            continue
        gaps = [abs(math.log2(a / b)) for a, b in ((shape.queries, other.queries), (shape.keys, other.keys),
                                                     (shape.agents, other.agents))]
        if max(gaps) > 1.0:
            continue
        key = (entry.get("device") != device, sum(gaps))
        if best_key is None or key < best_key:
            best, best_key = entry, key
    return best


def load_measurements(path: str | os.PathLike | None = None) -> list[dict]:
    """The measured entries in ``path`` (default :data:`MEASUREMENTS`); none if it does not exist."""
    path = Path(path or MEASUREMENTS)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if data.get("schema") != "attnc.agent-routes/1":
        raise ValueError(f"{path} is not an attnc agent-route table (schema {data.get('schema')!r})")
    return list(data["entries"])


def record(path: str | os.PathLike, shape: ShapeClass, fused_ms: float, lowered_ms: float,
           device: str, date: str) -> None:
    """Add (or replace, same shape class and device) one measurement in the table at ``path``;
    written to a temporary file and renamed, so a crash never leaves half a table."""
    path = Path(path)
    entries = [e for e in load_measurements(path)
               if not (e["shape"] == asdict(shape) and e["device"] == device)]
    entries.append({"shape": asdict(shape), "fused_ms": float(fused_ms), "lowered_ms": float(lowered_ms),
                    "device": device, "date": date})
    text = json.dumps({"schema": "attnc.agent-routes/1", "entries": entries}, indent=1) + "\n"
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(text)


def _cuda_device() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


__all__ = ["MEASUREMENTS", "WORK_TOLERANCE", "Route", "ShapeClass", "choose", "load_measurements",
           "nearest_measurement", "query_tile", "record", "work_ratio"]
