"""``benchmarks/bench_shrink.py --only llava|llava_vqa|llava_decode|qwen|llava_next --smoke``: the LLaVA, Qwen2-VL and
LLaVA-NeXT sections run end to end at toy sizes, every exit artefact validates against the checkpoint exiting in
PyTorch, and the raw file and table carry each exit's latency beside the full model's (the numbers themselves mean
nothing at these sizes)."""

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


@pytest.mark.parametrize("section,kind,visual,model", [
    ("llava", "LLaVA", 16, "Llava"),
    pytest.param("qwen", "Qwen2-VL", 4, "56x56", marks=pytest.mark.full(
        reason="the bench path CI runs on LLaVA, on a Qwen2-VL exported at its image size (about 11 s; "
               "tests/models/test_hf_qwen_vl.py checks its exits in CI)")),
    pytest.param("llava_next", "LLaVA-NeXT", 88, "112x112", marks=pytest.mark.full(
        reason="the bench path CI runs on LLaVA, on a LLaVA-NeXT exported at its image size (about 20 s; "
               "tests/models/test_hf_llava_next.py checks its exits in CI)")),
    pytest.param("gemma3", "Gemma 3", 16, "Gemma3", marks=pytest.mark.full(
        reason="the bench path CI runs on LLaVA, on a Gemma 3 (tests/models/test_hf_vision_language.py "
               "checks its exits in CI)")),
    pytest.param("llava_images", "LLaVA (two images per prompt)", 32, "two images after 2 and 6",
                 marks=pytest.mark.full(reason="the bench path CI runs on LLaVA, on two images per prompt "
                                               "(tests/models/test_hf_several_images.py checks their exits in CI)")),
    pytest.param("onevision_video", "LLaVA-OneVision (a video of 2 frames)", 9, "2 frames of 56 px",
                 marks=pytest.mark.full(reason="the bench path CI runs on LLaVA, on a OneVision video "
                                               "(tests/models/test_hf_video.py checks its exits in CI)")),
    pytest.param("qwen_video", "Qwen2-VL (a video of 3 frames)", 12, "3 frames of 56x84",
                 marks=pytest.mark.full(reason="the bench path CI runs on LLaVA, on a Qwen2-VL video "
                                               "(tests/models/test_hf_qwen_video.py checks its exits in CI)"))])
def test_exit_smoke(tmp_path, capsys, section, kind, visual, model):
    """``--only llava`` / ``qwen`` / ``llava_next`` / ``gemma3`` / ``llava_images`` / ``onevision_video`` /
    ``qwen_video`` ``--smoke``: the checkpoint (Qwen2-VL and LLaVA-NeXT exported at their image size; two images per
    prompt; a clip of 2 frames, Qwen2-VL's of 3) exited before layers 1 and 2;
    every artefact validates against the checkpoint exiting in PyTorch and is timed beside the full model at batch 1
    and 4."""
    result = _smoke(section, tmp_path)[f"exit_{section}"]
    assert result["visual_tokens"] == visual and result["smoke"] and model in result["model"]
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"full", "exit1", "exit2"}
    assert all(r["validation_passed"] and r["validation_max_abs_error"] < 1e-4 for r in rows.values())
    assert rows["full"]["shrink_cost"] is None and rows["exit1"]["shrink_cost"]["max_abs_error"] > 1e-3
    assert set(result["latency_ms"]) == {"1", "4"}
    assert all(set(lat) == set(rows) for lat in result["latency_ms"].values())
    assert f"Visual-token exit on a transformers {kind} checkpoint" in capsys.readouterr().out


def test_llava_vqa_smoke(tmp_path):
    """``--only llava_vqa --smoke``: a LLaVA (3 decoder layers) trained (one toy epoch) on the VQA task goes through
    export, static exits before every layer, a gate trained by ``attnc train-exit-gate`` and the dynamic exit; every
    artefact validates, and the rows carry test accuracy and latency beside the full model's, for plain and
    exit-aware training."""
    results = _smoke("llava_vqa", tmp_path)["exit_llava_vqa"]
    assert [r["exit_aware_training"] for r in results] == [False, True]
    for result in results:
        rows = {r["artefact"]: r for r in result["rows"]}
        assert set(rows) == {"full", "exit0", "exit1", "exit2", "dynamic"}   # 3 decoder layers at --smoke
        assert all(r["validation_passed"] and 0 <= r["test_accuracy"] <= 1 for r in rows.values())
        assert set(result["latency_ms"]["1"]) == set(rows) - {"dynamic"}
        assert set(result["latency_b1_test_mean_ms"]) == {"full", "dynamic"}


@pytest.mark.full(reason="the bench's script path (about 30 s); what it runs, both generation graphs of a LLaVA as "
                         "they are and exited, validated and token-equal, CI checks in test_hf_vision_language.py")
def test_llava_decode_smoke(tmp_path, capsys):
    """``--only llava_decode --smoke``: both generation graphs of a LLaVA, as they are and exited before layer 2,
    validate; each pair's greedy tokens equal a loop over the (exited) forward without a cache; the exit's prompt
    cache is smaller (16 visual tokens gone from the last of 3 layers), and every artefact is timed."""
    result = _smoke("llava_decode", tmp_path)["exit_llava_decode"]
    rows = {r["model"]: r for r in result["rows"]}
    assert set(rows) == {"full", "exit2"} and result["smoke"]
    assert all(r["first_validation_passed"] and r["step_validation_passed"] and r["tokens_equal_uncached_loop"]
               for r in rows.values())
    assert rows["full"]["cache_lengths"] == [24] * 3 and rows["exit2"]["cache_lengths"] == [24, 24, 8]
    assert rows["exit2"]["prompt_cache_bytes"] / rows["full"]["prompt_cache_bytes"] == pytest.approx(56 / 72)
    assert all(set(lat[what]) == set(rows) for lat in result["latency_ms"].values() for what in lat)
    assert "Answering with the visual tokens gone" in capsys.readouterr().out

