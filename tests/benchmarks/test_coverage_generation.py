"""``benchmarks/coverage_generation.py``: a row of one architecture, and a refused cache as a row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def coverage_generation():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import coverage_generation
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return coverage_generation


def test_a_run_fuses_and_generates_the_transformers_tokens(coverage_generation, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["coverage_generation.py", "--models", "gpt2", "--exporters", "torchscript",
                                      "--out", str(tmp_path)])
    coverage_generation.main()
    record = json.loads(next(tmp_path.glob("coverage-generation-*.json")).read_text())
    (row,) = record["rows"]
    assert record["transformers"] and record["machine"]
    assert (row["model"], row["exporter"], row["attention_nodes"], row["same_tokens"]) == ("gpt2", "torchscript", 2,
                                                                                          True)
    assert row["fuse_err"] < 1e-5
    assert "gpt2" in capsys.readouterr().out


def test_a_refused_cache_is_a_row_not_a_crash(coverage_generation, tmp_path):
    from attnc.models import transformers_zoo

    row = coverage_generation.check("minimax", transformers_zoo.build("minimax"), "torchscript", tmp_path)
    assert row["export"].startswith("AttncError: MiniMaxForCausalLM does not run with a transformers DynamicCache")
    assert "fuse_err" not in row
