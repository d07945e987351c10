"""Tests for attnc.compiler.report: the JSON schema (as docs/report-schema.md describes it),
the self-contained HTML page, and atomic writing."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

import attnc
from attnc.compiler import report as report_module
from attnc.compiler.errors import AttncError
from attnc.compiler.report import SCHEMA, load_report, write_report
from attnc.compiler.validate import Tolerance, compare_outputs

# The documented schema, written out independently of the implementation.
TOP_KEYS = {"schema", "passed", "created", "meta", "tolerances", "outputs"}
OUTPUT_KEYS = {"name", "kind", "passed", "reasons", "tolerance", "reference", "actual", "worst", "histogram",
               "elements", "compared", "violations", "max_abs_error", "mean_abs_error", "max_rel_error",
               "mean_rel_error", "cosine"}
TOLERANCE_KEYS = {"atol", "rtol", "min_cosine"}
SIDE_KEYS = {"shape", "dtype", "nan", "inf"}
STATS_KEYS = {"elements", "compared", "violations", "max_abs_error", "mean_abs_error", "max_rel_error",
              "mean_rel_error", "cosine"}
WORST_KEYS = {"index", "reference", "actual", "abs_error", "rel_error"}
NUMBER = (int, float)
NONFINITE = {"NaN", "Infinity", "-Infinity"}


def _check_schema(doc: dict) -> None:
    assert set(doc) == TOP_KEYS
    assert doc["schema"] == "attnc.report/1" and isinstance(doc["passed"], bool)
    assert datetime.fromisoformat(doc["created"]).tzinfo is not None
    assert {"attnc_version", "precision"} <= set(doc["meta"])
    assert set(doc["tolerances"]) == {"precision", "default", "overrides"}
    assert set(doc["tolerances"]["default"]) == TOLERANCE_KEYS
    for out in doc["outputs"]:
        assert set(out) == OUTPUT_KEYS
        assert isinstance(out["name"], str) and out["kind"] in ("output", "extra")
        assert isinstance(out["passed"], bool) and all(isinstance(r, str) for r in out["reasons"])
        assert out["passed"] == (out["reasons"] == [])
        assert set(out["tolerance"]) == TOLERANCE_KEYS
        for side in ("reference", "actual"):
            assert out[side] is None or (set(out[side]) == SIDE_KEYS and isinstance(out[side]["shape"], list))
        for key in STATS_KEYS:
            assert out[key] is None or isinstance(out[key], NUMBER), key
        if out["reference"] is None or out["actual"] is None or out["reference"]["shape"] != out["actual"]["shape"]:
            assert all(out[key] is None for key in STATS_KEYS) and out["histogram"] is None
        for w in out["worst"]:
            assert set(w) == WORST_KEYS and all(isinstance(i, int) for i in w["index"])
            for key in ("reference", "actual", "abs_error", "rel_error"):
                assert isinstance(w[key], NUMBER) or w[key] in NONFINITE
        if out["histogram"] is not None:
            hist = out["histogram"]
            assert set(hist) == {"log10_edges", "counts", "exact_zero"}
            assert len(hist["counts"]) == len(hist["log10_edges"]) - 1
            assert sum(hist["counts"]) == out["compared"]
    assert doc["passed"] == (bool(doc["outputs"]) and all(o["passed"] for o in doc["outputs"]))


def _result(seed: int = 0, *, fail: bool = True):
    rng = np.random.default_rng(seed)
    ref = {"logits": rng.standard_normal((2, 10)).astype(np.float32),
           "node:attn<0>/out": rng.standard_normal((2, 3, 4)).astype(np.float32),
           "hidden": rng.standard_normal((2, 4)).astype(np.float32)}
    act = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 1e-7 for k, v in ref.items()}
    if fail:
        act["logits"][1, 3] = np.nan
        act["hidden"] = act["hidden"][:1]
        act["surplus"] = np.zeros(3, np.float32)
    return compare_outputs(ref, act, precision="fp32",
                           tolerances={"node:*": Tolerance(1e-3, 1e-2, 0.999)})


META = {"model": Path("models/tiny.onnx"), "artefact": "out/model.onnx", "backend": "onnxruntime",
        "seed": np.int64(3), "input_shapes": {"x": (2, 5, 16)}, "threshold": np.float32(0.5)}


@pytest.mark.parametrize("fail", [False, True])
def test_json_round_trips_and_matches_the_schema(tmp_path, fail):
    result = _result(fail=fail)
    json_path, html_path = write_report(result, tmp_path / "out", meta=META)
    assert json_path == tmp_path / "out" / "report.json" and html_path == tmp_path / "out" / "report.html"
    doc = load_report(json_path)
    assert doc == json.loads(json_path.read_text())
    assert load_report(tmp_path / "out") == doc  # a report folder works too
    _check_schema(doc)
    assert doc["passed"] is (not fail) is result.passed
    assert doc["outputs"] == result.to_dict()["outputs"]
    assert doc["meta"]["model"] == "models/tiny.onnx" and doc["meta"]["seed"] == 3
    assert doc["meta"]["input_shapes"] == {"x": [2, 5, 16]} and doc["meta"]["threshold"] == 0.5
    assert doc["meta"]["attnc_version"] == attnc.__version__ and doc["meta"]["precision"] == "fp32"
    assert doc["tolerances"]["overrides"] == {"node:*": {"atol": 1e-3, "rtol": 1e-2, "min_cosine": 0.999}}
    # Strict JSON: no NaN/Infinity literals even though an output holds a NaN.
    json.loads(json_path.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard constant {c}"))
    if fail:
        names = {o["name"]: o for o in doc["outputs"]}
        assert names["logits"]["worst"][0]["actual"] == "NaN"
        assert names["hidden"]["max_abs_error"] is None and "shape mismatch" in names["hidden"]["reasons"][0]
        assert names["surplus"]["reference"] is None and not names["surplus"]["passed"]


def test_html_is_self_contained_with_plots_and_escaped_names(tmp_path):
    result = _result()
    _, html_path = write_report(result, tmp_path, meta={**META, "note": "<script>alert(1)</script>"})
    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    for name in ("logits", "hidden", "surplus", "node:attn&lt;0&gt;/out"):
        assert name in page
    assert "attn<0>" not in page and "<script>" not in page and "&lt;script&gt;" in page
    assert "FAILED" in page and "class='l fail'" in page and "class='l pass'" in page
    assert '<img src="data:image/png;base64,' in page
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2  # logits and node:...; no plot without comparable elements
    assert all(base64.b64decode(img).startswith(b"\x89PNG\r\n\x1a\n") for img in images)
    assert not re.search(r"(src|href)=['\"](https?:)?//", page)  # nothing fetched from outside


@pytest.mark.parametrize("failing", [[], [13], [0, 6, 13]])
def test_plots_go_to_the_failing_tensors_first(tmp_path, failing):
    """Of 14 tensors compared, with a budget of 4 plots: every failing tensor gets one wherever it stands, the passing
    ones in order take what is left, and the page says so."""
    rng = np.random.default_rng()
    reference = {f"t{i}": rng.standard_normal((3, 7)).astype(np.float32) for i in range(14)}
    actual = {name: value + (0.5 if int(name[1:]) in failing else 0.0) for name, value in reference.items()}
    page = write_report(compare_outputs(reference, actual), tmp_path, meta={}, max_plots=4)[1].read_text()
    plotted = re.findall(r'alt="error plots for (t\d+)"', page)
    expected = sorted(failing + [i for i in range(14) if i not in failing][:4 - len(failing)])
    assert plotted == [f"t{i}" for i in expected]
    assert "Plots are drawn for 4 of the 14 tensors compared" in page


def test_no_temp_files_left_and_overwrite(tmp_path):
    write_report(_result(0), tmp_path, meta={})
    write_report(_result(1, fail=False), tmp_path, meta={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]
    assert load_report(tmp_path / "report.json")["passed"] is True


@pytest.mark.parametrize("stage", ["render", "write_html"])
def test_a_failed_write_leaves_no_report_files(tmp_path, monkeypatch, stage):
    if stage == "render":
        def broken(*args, **kwargs):
            raise RuntimeError("matplotlib exploded")
        monkeypatch.setattr(report_module, "render_html", broken)
    else:
        real_write_text = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name.startswith(".report.html"):
                real_write_text(self, text[:100], *args, **kwargs)  # half-written, then the disk fills
                raise OSError(28, "No space left on device")
            return real_write_text(self, text, *args, **kwargs)
        monkeypatch.setattr(Path, "write_text", write_text)
    out = tmp_path / "out"
    with pytest.raises((RuntimeError, OSError)):
        write_report(_result(), out, meta={})
    assert not out.exists() or list(out.iterdir()) == []


def test_load_report_rejects_other_files(tmp_path):
    cases = {
        "absent.json": None,
        "text.json": "this is not json",
        "list.json": "[1, 2]",
        "other.json": json.dumps({"schema": "polygraphy/9"}),
        "future.json": json.dumps({"schema": "attnc.report/2", "passed": True}),
        "broken.json": json.dumps({"schema": SCHEMA, "passed": "yes", "created": "", "meta": {},
                                   "tolerances": {}, "outputs": []}),
        "bad_output.json": json.dumps({"schema": SCHEMA, "passed": True, "created": "", "meta": {},
                                       "tolerances": {}, "outputs": [{"passed": True}]}),
    }
    messages = {"absent.json": "no such", "text.json": "not JSON", "list.json": "not an attnc report",
                "other.json": "polygraphy/9", "future.json": "attnc.report/2", "broken.json": "'passed'",
                "bad_output.json": r"outputs\[0\]"}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(AttncError, match=messages[name]):
            load_report(tmp_path / name)


def test_documented_example_matches_the_schema():
    doc_path = Path(__file__).resolve().parents[2] / "docs" / "report-schema.md"
    example = re.search(r"```json\n(.*?)```", doc_path.read_text(), re.S).group(1)
    _check_schema(json.loads(example))

