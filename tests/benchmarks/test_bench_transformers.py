"""``benchmarks/bench_transformers.py``: a smoke run on one model at a few tokens."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_transformers_times_three_graphs_and_saves_them(tmp_path):
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_transformers.py"), "--models", "bloom",
                          "--tokens", "9", "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("transformers-*.json")).read_text())
    (row,) = record["results"]
    assert record["machine"] and (row["model"], row["tokens"], row["fused"]) == ("bloom", 9, {"softmax": 2})
    assert row["heads"] == [24, 18] and row["params"][1] < row["params"][0]
    assert row["fused_max_rel_diff"] < 1e-5 and row["nodes"]["fused"] < row["nodes"]["export"]
    assert all(row["median_s"][k] > 0 for k in ("export", "fused", "pruned"))
