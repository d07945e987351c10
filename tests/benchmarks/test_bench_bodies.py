"""``benchmarks/bench_bodies.py``: a smoke run against the committed bodies (HEAD)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_bodies_times_both_revisions_and_saves_them(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_bodies.py"), "--rev", "HEAD",
                          "--tokens", "3,200", "--repeats", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    record = json.loads(next(tmp_path.glob("bodies-*.json")).read_text())
    assert record["baseline_rev"] == "HEAD" and record["machine"]
    rows = record["results"]
    assert {(r["case"], r["tokens"]) for r in rows} == {(case, n) for case in {r["case"] for r in rows}
                                                        for n in (3, 200)}
    assert len({r["case"] for r in rows}) == 5
    for row in rows:  # HEAD's bodies and the working tree's compute the same op
        assert row["max_rel_diff"] < 1e-5 and row["median_s_now"] > 0 and row["median_s_baseline"] > 0
