"""``attnc.runtime.load``: a compiled artefact directory runs on the backend its manifest names."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc import runtime
from attnc.compiler.errors import AttncError
from attnc.compiler.pipeline import CompileOptions, compile_model
from attnc.testing import export_spec


@pytest.mark.parametrize("name", ["vit-mhsa-small", "lm-linear-small"])
def test_loaded_artefact_matches_pytorch_at_another_batch(name, tmp_path):
    spec, model, exported = export_spec(name, "torchscript")
    onnx.save(exported, tmp_path / "model.onnx")
    manifest = compile_model(tmp_path / "model.onnx", tmp_path / "out", CompileOptions(backend="onnxruntime"))
    assert any(m for r in manifest["passes"] for m in r["matches"])   # something was fused

    engine = runtime.load(tmp_path / "out", threads=1)
    assert [s.name for s in engine.input_specs] == spec.input_names and engine.output_names == ["output"]
    inputs = spec.example_inputs(batch=3, seed=7)   # fresh inputs, a batch the export never saw
    got = engine.infer({n: t.numpy() for n, t in zip(spec.input_names, inputs)})["output"]
    with torch.no_grad():
        want = model(*inputs).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_load_refuses_what_is_no_artefact(tmp_path):
    with pytest.raises(AttncError, match="not an attnc artefact"):
        runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "attnc.manifest/1", "backend": "onnxruntime",
                                                        "artefact": "model.onnx"}))
    with pytest.raises(AttncError, match="artefact model.onnx is missing"):
        runtime.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": "attnc.manifest/1", "backend": "tpu",
                                                        "artefact": "model.onnx"}))
    with pytest.raises(AttncError, match="unknown backend 'tpu'"):
        runtime.load(tmp_path)


def test_a_failing_run_is_a_clear_error(tmp_path):
    """ONNX Runtime's own failure (token ids past the embedding: its Gather's bounds check) comes back as
    an AttncError naming what to check, not onnxruntime's exception class."""
    spec, module, model = export_spec("lm-mhsa-small", "torchscript")
    onnx.save(model, tmp_path / "model.onnx")
    compile_model(tmp_path / "model.onnx", tmp_path / "out", CompileOptions(backend="onnxruntime"))
    ids = spec.example_inputs(batch=1, seed=0)[0].numpy()
    ids[0, 0] = 10 ** 6
    with pytest.raises(AttncError, match="ONNX Runtime failed running the model.*token ids below the vocabulary"):
        runtime.load(tmp_path / "out").infer({"ids": ids})
