"""``benchmarks/bench_qwen_windows.py --smoke``: a random Qwen2.5-VL at 224 px (4 windows) exported twice, its
windowed layers as a batch of windows and under the block mask; both equal transformers' forward, and the raw file and
table carry both latencies (the numbers themselves mean nothing at this size)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_qwen_windows.py"


@pytest.mark.full(reason="the bench's smoke run (two dynamo exports, about 30 s); CI checks both forms of the encoder "
                         "against transformers in tests/models/test_hf_qwen_vl.py")
def test_smoke_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_qwen_windows", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke", "--reps", "3", "--out", str(tmp_path)]) == 0
    [raw] = tmp_path.glob("qwen-windows-smoke-*.json")
    result = json.loads(raw.read_text())
    assert (result["image"], result["windows"], result["patches"]) == (224, 4, 256)
    assert [r["form"] for r in result["rows"]] == ["windows", "mask"]
    assert all(r["max_abs_error_vs_transformers"] < 1e-4 for r in result["rows"])
    assert all(set(lat) == {"windows", "mask"} for lat in result["latency_ms"].values())
    assert "256 patches in 4 windows" in capsys.readouterr().out
