"""``benchmarks/bench_kernels.py``: its work model (FLOPs, bytes) and a smoke run.

The GPU benchmark only runs on a lent GPU, where device time is scarce, so its pure parts are
checked here: the FLOP counts against independent counts (the neighborhood mask's pairs; torch's
own ``FlopCounterMode`` on the ops' reference implementations) and one op end to end under
Triton's interpreter (``--smoke``).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("grid,kernel,dilation,causal", [
    ((13,), (5,), (1,), (0,)),
    ((29,), (7,), (3,), (1,)),
    ((9, 11), (3, 5), (1, 2), (0, 0)),
    ((10, 7), (5, 3), (2, 1), (1, 0)),
    ((4, 5, 6), (3, 3, 5), (1, 1, 1), (0, 1, 0)),
])
def test_neighborhood_pairs_match_the_dense_mask(bench, grid, kernel, dilation, causal):
    from attnc.plugins.neighborhood import dense_mask_and_rel

    cfg = dict(batch=2, heads=3, dim=16, grid=grid, kernel_size=kernel, dilation=dilation, is_causal=causal)
    flops, nbytes = bench.work("neighborhood", cfg, torch.float16)
    allowed, _ = dense_mask_and_rel(grid, kernel, dilation, causal)
    assert flops == 2 * 3 * int(allowed.sum()) * 4 * 16
    assert nbytes == 4 * 2 * 3 * int(torch.tensor(grid).prod()) * 16 * 2


def _counted(fn, *args, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("n,d", [(37, 16), (64, 32)])
def test_dense_work_matches_torch_flop_counter(bench, n, d):
    """Non-causal linear and flow attention and agent attention: the model's matrix-product FLOPs
    equal what torch counts on the ops' references (plus linear attention's normaliser product)."""
    from attnc.plugins.agent import reference as agent_reference
    from attnc.plugins.flow import reference as flow_reference
    from attnc.plugins.linear import reference as linear_reference

    b, h, agents = 2, 3, 7
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    cfg = dict(batch=b, heads=h, seq=n, dim=d, causal=0, agents=agents)
    normaliser = 2 * b * h * n * d      # the reference's φ(Q)·Σφ(K) product, left out of the model
    assert bench.work("linear", cfg, torch.float32)[0] + normaliser == _counted(linear_reference, q, k, v, causal=0)
    assert bench.work("flow", cfg, torch.float32)[0] == _counted(flow_reference, q, k, v, 0)
    agent = _counted(agent_reference, q, k, v, torch.randn(b, h, agents, d), None, None)
    assert bench.work("agent", cfg, torch.float32)[0] == agent


def test_achieved_against_ceilings(bench):
    row = bench.achieved(flops=2e12, nbytes=3e9, ms=4.0, ceilings={"matmul_tflops": 1000.0, "copy_gbps": 3000.0})
    assert row == pytest.approx({"tflops": 500.0, "gbps": 750.0, "tflops_of_peak": 0.5, "gbps_of_peak": 0.25})
    assert set(bench.achieved(1, 1, 1.0, None)) == {"tflops", "gbps"}


def test_smoke_run_of_one_op(tmp_path):
    """The script end to end on CPU (interpreter, toy sizes): every case runs and its raw results
    carry attnc's error against float64, timings of every peer and the work model."""
    table = tmp_path / "routes.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--ops", "agent", "--out", str(tmp_path),
                          "--agent-routes", str(table)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (path,) = tmp_path.glob("kernels-cpu-smoke-fp16-*.json")
    saved = json.loads(path.read_text())
    assert saved["machine"]["smoke"] and saved["machine"]["ceilings"] is None
    rows = saved["results"]
    assert [r["config"]["name"] for r in rows] == [c["name"] for c in _configs("agent")]
    for row in rows:
        assert "error" not in row and row["attnc_rel_err"] <= 1e-2, row
        assert set(row["peers_ms"]) == {"torch eager", "torch.compile", "2x sdpa", "attnc TensorRT kernel",
                                        "attnc one launch", "attnc two-phase"}   # fp16: both forms exist
        assert all(row["peers_ms"].values()), row.get("peer_errors")
        assert row["flops"] > 0 and row["achieved"]["tflops"] > 0
    # The route table attnc compile reads: one entry per distinct smoke shape class, from this run.
    from attnc.plugins.agent import routes
    entries = routes.load_measurements(table)
    classes = {(r["config"]["seq"], r["config"]["agents"], bool(r["config"].get("bias"))) for r in rows}
    assert len(entries) == len(classes)
    for entry in entries:
        assert entry["device"] == "cpu (smoke)" and entry["shape"]["dtype"] == "float16"
        match = [r for r in rows if (r["config"]["seq"], r["config"]["agents"], bool(r["config"].get("bias")))
                 == (entry["shape"]["queries"], entry["shape"]["agents"], entry["shape"]["biases"])][-1]
        assert entry["fused_ms"] == match["peers_ms"]["attnc TensorRT kernel"]
        assert entry["lowered_ms"] == match["peers_ms"]["2x sdpa"]


def test_smoke_run_times_only_the_peers_asked_for(tmp_path):
    """``--peers``: the agent route pair alone (what gpu_session.sh runs first, without the
    torch.compile peers), still recorded in the route table."""
    table = tmp_path / "routes.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--ops", "agent", "--out", str(tmp_path),
                          "--agent-routes", str(table), "--peers", "attnc TensorRT kernel", "2x sdpa"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    (path,) = tmp_path.glob("kernels-cpu-smoke-fp16-*.json")
    for row in json.loads(path.read_text())["results"]:
        assert set(row["peers_ms"]) == {"attnc TensorRT kernel", "2x sdpa"} and all(row["peers_ms"].values())
    from attnc.plugins.agent import routes
    assert routes.load_measurements(table)


def _configs(op):
    spec = importlib.util.spec_from_file_location("bench_kernels_configs", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CONFIGS[op]
