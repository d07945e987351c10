"""``benchmarks/bench_large.py``: a smoke run, the working tree against the committed attnc (HEAD)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_large_runs_both_sides_and_saves_them(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_large.py"), "--smoke", "--rev", "HEAD",
                          "--external", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("large-smoke-*.json")).read_text())
    assert record["baseline_rev"] == "HEAD" and record["machine"]["cpus"] and record["external"]
    [row] = record["rows"]
    steps = {"inspect", "compile", "validate", "prune", "validate_pruned"}
    assert set(row["now"]) == steps and set(row["baseline"]) == steps - {"validate_pruned"}
    for side in ("now", "baseline"):
        for step, got in row[side].items():
            assert got["exit"] == 0 and got["seconds"] > 0 and got["peak_rss_mb"] > 0, (side, step)
    # each side ran its own attnc: the working tree's, and the one assembled from git
    assert {got["attnc"] for got in row["now"].values()} == {str(ROOT / "attnc")}
    assert all(got["attnc"] != str(ROOT / "attnc") for got in row["baseline"].values())
    assert set(row["side_by_side"]) == {"infer_serialised", "infer_light", "session_serialised", "session_arrays"}
