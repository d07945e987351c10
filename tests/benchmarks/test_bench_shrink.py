"""``benchmarks/bench_shrink.py --only llava|llava_vqa --smoke``: the LLaVA sections run end to end at toy sizes, every
exit artefact validates against the checkpoint exiting in PyTorch, and the raw file and table carry each exit's
latency beside the full model's (the numbers themselves mean nothing at these sizes)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_shrink.py"


def _smoke(section: str, folder: Path) -> dict:
    """``bench_shrink.main`` of one section at toy sizes: its raw file's record."""
    spec = importlib.util.spec_from_file_location("bench_shrink", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--only", section, "--smoke", "--reps", "4", "--out", str(folder)]) == 0
    [raw] = folder.glob(f"shrink-{section}-smoke-*.json")
    return json.loads(raw.read_text())


def test_llava_smoke(tmp_path, capsys):
    result = _smoke("llava", tmp_path)["exit_llava"]
    assert result["visual_tokens"] == 16 and result["smoke"]
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"full", "exit1", "exit2"}
    assert all(r["validation_passed"] and r["validation_max_abs_error"] < 1e-4 for r in rows.values())
    assert rows["full"]["shrink_cost"] is None and rows["exit1"]["shrink_cost"]["max_abs_error"] > 1e-3
    assert set(result["latency_ms"]["1"]) == set(rows)
    assert "Visual-token exit on a transformers LLaVA checkpoint" in capsys.readouterr().out


def test_llava_vqa_smoke(tmp_path):
    """``--only llava_vqa --smoke``: a LLaVA trained (one toy epoch) on the VQA task goes through export, static exits
    before every layer, a gate trained by ``attnc train-exit-gate`` and the dynamic exit; every artefact validates, and
    the rows carry test accuracy and latency beside the full model's, for plain and exit-aware training."""
    results = _smoke("llava_vqa", tmp_path)["exit_llava_vqa"]
    assert [r["exit_aware_training"] for r in results] == [False, True]
    for result in results:
        rows = {r["artefact"]: r for r in result["rows"]}
        assert set(rows) == {"full", "exit0", "exit1", "exit2", "exit3", "dynamic"}
        assert all(r["validation_passed"] and 0 <= r["test_accuracy"] <= 1 for r in rows.values())
        assert set(result["latency_ms"]["1"]) == set(rows) - {"dynamic"}
        assert set(result["latency_b1_test_mean_ms"]) == {"full", "dynamic"}
