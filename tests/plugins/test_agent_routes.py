"""The per-shape-class choice between agent attention's fused TensorRT kernel and two native
``Attention`` layers (``attnc.plugins.agent.routes``); the agent pass's ``"auto"`` mode is
tested in ``tests/passes/test_agent.py``."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from attnc.plugins.agent import reference, routes
from attnc.plugins.agent.kernels import agent_trt_config

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _tiled_like_the_fused_kernel(q, k, v, a, tile):
    """What the TensorRT kernel computes, in its order: stage 1 again for every query tile."""
    outs = []
    for start in range(0, q.shape[2], tile):
        probs = torch.softmax(a @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, -1)
        agent_v = probs @ v
        outs.append(torch.softmax(q[:, :, start:start + tile] @ a.transpose(-2, -1) * q.shape[-1] ** -0.5, -1)
                    @ agent_v)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("dtype,n,m,agents,d,dv", [
    ("float32", 197, 197, 49, 64, 64),     # Agent-DeiT-S
    ("float32", 100, 37, 9, 96, 96),       # fp32 above head dim 64: 32-query tiles
    ("float16", 50, 300, 16, 32, 48),      # one query tile
    ("bfloat16", 1000, 64, 8, 128, 64),
])
def test_work_ratio_counts_the_fused_kernels_recompute(dtype, n, m, agents, d, dv):
    """``work_ratio`` = FLOPs of a loop that recomputes stage 1 per query tile over FLOPs of
    the reference (each stage once), both counted by torch's FlopCounterMode."""
    shape = routes.ShapeClass(dtype, n, m, agents, d, dv, False)
    tile = agent_trt_config(DTYPES[dtype], d, dv)["BLOCK_M"]
    assert routes.query_tile(shape) == tile
    gen = torch.Generator().manual_seed(n)
    q, k = torch.randn(1, 1, n, d, generator=gen), torch.randn(1, 1, m, d, generator=gen)
    v, a = torch.randn(1, 1, m, dv, generator=gen), torch.randn(1, 1, agents, d, generator=gen)
    torch.testing.assert_close(_tiled_like_the_fused_kernel(q, k, v, a, tile), reference(q, k, v, a))
    fused = _flops(lambda: _tiled_like_the_fused_kernel(q, k, v, a, tile))
    lowered = _flops(lambda: reference(q, k, v, a))
    assert routes.work_ratio(shape) == pytest.approx(fused / lowered, rel=1e-12)


def test_work_model_choices():
    one_tile = routes.choose(routes.ShapeClass("float16", 64, 4096, 49, 64, 64, True), measurements=[])
    assert not one_tile.lowered and one_tile.source == "work model" and "1.00x" in one_tile.reason
    deit = routes.choose(routes.ShapeClass("float32", 197, 197, 49, 64, 64, True), measurements=[])
    assert deit.lowered and "2.50x" in deit.reason and "4 query tile(s)" in deit.reason
    dynamic = routes.choose(routes.ShapeClass("float16", None, None, 49, 64, 64, False), measurements=[])
    assert dynamic.lowered and "dynamic" in dynamic.reason
    # Few keys, many queries: two tiles cost little extra (ratio (2*8 + 100)/108 = 1.074).
    cross = routes.ShapeClass("float16", 100, 8, 4, 32, 32, False)
    assert routes.work_ratio(cross) == pytest.approx(116 / 108)
    assert not routes.choose(cross, measurements=[]).lowered
    # The same shape in fp32 above head dim 64 has 32-query tiles: 4 tiles, (4*8 + 100)/108 > 1.1.
    assert routes.choose(routes.ShapeClass("float32", 100, 8, 4, 96, 96, False), measurements=[]).lowered


def _entry(shape, fused_ms, lowered_ms, device="NVIDIA H200"):
    return {"shape": routes.ShapeClass(*shape).__dict__, "fused_ms": fused_ms, "lowered_ms": lowered_ms,
            "device": device, "date": "2026-12-01"}


def test_measurements_override_the_work_model_nearby_only():
    deit = ("float32", 197, 197, 49, 64, 64, True)
    table = [_entry(deit, 0.10, 0.20)]             # fused measured faster, though it does 2.5x the work
    route = routes.choose(routes.ShapeClass(*deit), table, device="NVIDIA H200")
    assert not route.lowered and route.source == "measured" and "0.1 ms" in route.reason
    near = routes.ShapeClass("float32", 300, 250, 40, 64, 64, True)   # within 2x in N, M, n
    assert routes.choose(near, table).source == "measured"
    far = routes.ShapeClass("float32", 400, 197, 49, 64, 64, True)    # N more than 2x away
    assert routes.choose(far, table).source == "work model"
    for other in (("float16", 197, 197, 49, 64, 64, True), ("float32", 197, 197, 49, 32, 64, True),
                  ("float32", 197, 197, 49, 64, 64, False)):   # dtype, head dim, bias form must agree
        assert routes.choose(routes.ShapeClass(*other), table).source == "work model"
    assert routes.choose(routes.ShapeClass("float32", None, 197, 49, 64, 64, True), table).source == "work model"


def test_measurements_from_the_compiling_gpu_win():
    shape = ("float16", 1024, 1024, 64, 64, 64, False)
    close = _entry(shape, 0.5, 0.4, device="NVIDIA H100")                               # lowered wins
    mine = _entry(("float16", 1800, 1024, 64, 64, 64, False), 0.3, 0.4, device="NVIDIA H200")  # fused wins
    assert routes.nearest_measurement(routes.ShapeClass(*shape), [close, mine], "NVIDIA H100") is close
    assert routes.nearest_measurement(routes.ShapeClass(*shape), [close, mine], "NVIDIA H200") is mine
    assert routes.choose(routes.ShapeClass(*shape), [close, mine], device="NVIDIA H200").lowered is False
    assert routes.choose(routes.ShapeClass(*shape), [close, mine], device="NVIDIA H100").lowered is True


def test_record_replaces_and_load_checks_the_schema(tmp_path):
    path = tmp_path / "routes.json"
    assert routes.load_measurements(path) == []
    shape = routes.ShapeClass("float16", 197, 197, 49, 64, 64, True)
    routes.record(path, shape, 1.0, 2.0, "NVIDIA H200", "2026-12-01")
    routes.record(path, shape, 1.5, 1.2, "NVIDIA H200", "2026-12-02")   # same class and GPU: replaced
    routes.record(path, shape, 1.0, 2.0, "NVIDIA H100", "2026-12-02")
    entries = routes.load_measurements(path)
    assert len(entries) == 2 and entries[0]["lowered_ms"] == 1.2
    assert [p.name for p in tmp_path.iterdir()] == ["routes.json"]         # no temp file left
    path.write_text(json.dumps({"schema": "something/else", "entries": []}))
    with pytest.raises(ValueError, match="not an attnc agent-route table"):
        routes.load_measurements(path)


def test_the_shipped_table_is_valid():
    """The shipped ``routes.json`` (an H200's timings) loads, names its GPU, and decides the classes it
    measured by those timings: the table, not the work model, on any machine."""
    entries = routes.load_measurements()
    assert entries, f"{routes.MEASUREMENTS} is missing or empty"
    for entry in entries:
        shape = routes.ShapeClass(**entry["shape"])
        assert entry["device"] and entry["date"] and entry["fused_ms"] > 0 and entry["lowered_ms"] > 0
        route = routes.choose(shape)   # the default table, read as attnc compile reads it
        assert route.source == "measured" and route.lowered == (entry["lowered_ms"] < entry["fused_ms"]), route
