"""``attnc.runtime.load``: a compiled artefact directory runs on the backend its manifest names."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnc import runtime
from attnc.compiler.errors import AttncError
from attnc.compiler.export import export_onnx
from attnc.compiler.pipeline import CompileOptions, compile_model
from attnc.models.registry import get_spec


@pytest.mark.parametrize("name", ["vit-mhsa-small", "lm-linear-small"])
def test_loaded_artefact_matches_pytorch_at_another_batch(name, tmp_path):
    spec = get_spec(name)
    model = spec.factory()
    export_onnx(model, spec.example_inputs(), tmp_path / "model.onnx", exporter="torchscript",
                dynamic_axes=spec.dynamic_axes, input_names=spec.input_names)
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
