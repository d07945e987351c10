"""``benchmarks/coverage_transformers.py``: a run on one architecture, and its failure reporting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_coverage_run_checks_fusion_and_pruning_against_torch(tmp_path):
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "coverage_transformers.py"), "--models", "llama",
                          "--exporters", "dynamo", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("coverage-transformers-*.json")).read_text())
    (row,) = record["results"]
    assert record["transformers"] and record["machine"]
    assert (row["model"], row["exporter"], row["export"], row["fused"]) == ("llama", "dynamo", "ok", {"softmax": 2})
    assert row["heads"] == [[4, 2], [4, 2]]   # whole K/V groups of the grouped-query layers
    assert row["fused_max_abs_diff"] < 1e-5 and row["pruned_max_abs_diff"] < 1e-5
    assert "llama" in run.stdout and "softmax×2" in run.stdout


def test_a_failure_is_a_row_not_a_crash(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import coverage_transformers
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def broken():
        raise RuntimeError("no such config")

    row = coverage_transformers.check("x", broken, "dynamo", tmp_path)
    assert row["export"] == "building the model failed: RuntimeError: no such config" and "fused" not in row
    torch = pytest.importorskip("torch")

    class NoAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(64, 8)

        def forward(self, x):
            return self.embed(x)

    row = coverage_transformers.check("tiny", NoAttention, "dynamo", tmp_path)
    assert row["export"] == "ok" and row["fused"] == {} and "no recognisable attention" in row["prune_error"]
