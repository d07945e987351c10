"""Autoregressive decoding of a causal lightning-attention LM through attnc.

``lm-lightning-prefill-small`` and ``lm-lightning-decode-small`` (one ``LightningLM``, same
weights) are exported with both exporters and compiled by attnc for ONNX Runtime; every
attention reaches the graph as one ``KernelLinearAttention`` with ``state`` / ``state_out``.
Prefill on the first m tokens and decoding the rest (one token at a time, or in chunks)
with the states fed back must give the logits of the model run once on the whole sequence
in float64 by :meth:`LightningLM.logits` (the masked quadratic form, no state, no
recurrence) at every position. Then: the CLI's compile + validate on the decode model, the
fp16 TensorRT preparation (state stays float32, the node becomes its plugin variant), an
engine build with TensorRT-RTX where it is installed, and ``examples/decode_lightning.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.cli import cli
from attnc.compiler.export import export_onnx
from attnc.compiler.pipeline import CompileOptions, compile_model
from attnc.testing import rtx_plugin_env, tensorrt_or_skip
from attnc.models.registry import get_spec

PREFILL, DECODE = "lm-lightning-prefill-small", "lm-lightning-decode-small"
EXPORTERS = ("dynamo", "torchscript")
N = 13
LAYERS = 2
STATE = (4, 8, 8)  # [H, D, Dv] of every layer's state
# float32 ONNX Runtime against float64 PyTorch, logits of magnitude ~2 (measured: < 2e-6)
ATOL = RTOL = 1e-5
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """``{exporter: {"prefill" | "decode": fused ONNX path}}``, exported at batch 2."""
    root = tmp_path_factory.mktemp("decode")
    paths: dict[str, dict[str, Path]] = {}
    for exporter in EXPORTERS:
        for role, name in (("prefill", PREFILL), ("decode", DECODE)):
            spec = get_spec(name)
            onnx_path = export_onnx(spec.factory(), spec.example_inputs(batch=2), root / f"{role}-{exporter}.onnx",
                                    exporter=exporter, dynamic_axes=spec.dynamic_axes,
                                    input_names=spec.input_names)
            out = root / f"{role}-{exporter}"
            manifest = compile_model(onnx_path, out, CompileOptions(backend="onnxruntime"))
            assert manifest["ops_after"].get("attnc::KernelLinearAttention") == LAYERS
            paths.setdefault(exporter, {})[role] = out / manifest["artefact"]
    return paths


@pytest.fixture(scope="module")
def reference() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{batch: (ids [batch, N], logits [batch, N, vocab] float64)}`` of the whole sequence."""
    model = get_spec(PREFILL).factory().double()
    result = {}
    for batch in (1, 3):
        ids = torch.randint(0, 97, (batch, N), generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            result[batch] = ids.numpy(), model.logits(ids).numpy()
    return result


def generate_logits(prefill, decode, ids: np.ndarray, m: int, step: int = 1) -> tuple[np.ndarray, list[np.ndarray]]:
    """Prefill ``ids[:, :m]``, decode the rest ``step`` tokens at a time; all logits and the last states."""
    out = prefill.infer({"ids": ids[:, :m]})
    logits, states = [out["output"]], [out[f"output_{i + 1}"] for i in range(LAYERS)]
    for start in range(m, ids.shape[1], step):
        feeds = {"ids": ids[:, start:start + step], **{f"state_{i}": s for i, s in enumerate(states)}}
        out = decode.infer(feeds)
        logits.append(out["output"])
        states = [out[f"output_{i + 1}"] for i in range(LAYERS)]
    return np.concatenate(logits, axis=1), states


def test_the_two_specs_share_weights_and_declare_the_state():
    prefill, decode = get_spec(PREFILL), get_spec(DECODE)
    for (key, a), (_, b) in zip(prefill.factory().state_dict().items(), decode.factory().state_dict().items(),
                                strict=True):
        assert torch.equal(a, b), key
    assert prefill.input_names == ["ids"] and decode.input_names == ["ids", "state_0", "state_1"]
    assert prefill.output_names == decode.output_names == ["output", "output_1", "output_2"]
    ids, *states = decode.example_inputs(batch=3)
    assert ids.dtype == torch.int64 and ids.shape == (3, 3)
    assert all(s.dtype == torch.float32 and s.shape == (3, *STATE) for s in states)
    assert decode.dynamic_axes["state_1"] == {0: "batch"} and decode.dynamic_axes["output_2"] == {0: "batch"}


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exported_attention_is_one_stateful_node_per_layer(compiled, exporter):
    for role in ("prefill", "decode"):
        model = onnx.load(str(compiled[exporter][role]))
        nodes = [n for n in model.graph.node if n.op_type == "KernelLinearAttention"]
        assert len(nodes) == LAYERS
        for i, node in enumerate(nodes):
            assert node.domain == "attnc" and len(node.output) == 2 and node.output[1] == f"output_{i + 1}"
            assert node.overload == ("identity_state_in_out" if role == "decode" else "identity_state_out")
            assert (node.input[4] == f"state_{i}") if role == "decode" else len(node.input) == 4
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["causal"] == 1 and attrs["normalize"] == 0 and attrs["feature_map"] == b"identity"


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("m", [1, 5, 12])
def test_prefill_then_decode_matches_the_whole_sequence_in_float64(compiled, reference, exporter, batch, m):
    prefill, decode = (load(compiled[exporter][role], threads=1) for role in ("prefill", "decode"))
    ids, expected = reference[batch]
    got, states = generate_logits(prefill, decode, ids, m)
    assert got.shape == expected.shape == (batch, N, 97)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
    # the state after the last decode step is the state of one prefill over all N tokens
    _, whole = generate_logits(prefill, decode, ids, N)
    for after_decode, after_prefill in zip(states, whole, strict=True):
        assert after_decode.dtype == np.float32 and after_decode.shape == (batch, *STATE)
        np.testing.assert_allclose(after_decode, after_prefill, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_decode_steps_of_several_tokens(compiled, reference, exporter):
    prefill, decode = (load(compiled[exporter][role], threads=1) for role in ("prefill", "decode"))
    ids, expected = reference[3]
    got, _ = generate_logits(prefill, decode, ids, 4, step=3)  # steps of 3, 3, 3
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_a_wrong_state_changes_the_logits(compiled, reference):
    """The comparison can fail: decoding from a perturbed state moves the next logits."""
    prefill, decode = (load(compiled["dynamo"][role], threads=1) for role in ("prefill", "decode"))
    ids, expected = reference[1]
    out = prefill.infer({"ids": ids[:, :5]})
    states = {f"state_{i}": out[f"output_{i + 1}"] for i in range(LAYERS)}
    states["state_1"] = states["state_1"] * 1.01
    step = decode.infer({"ids": ids[:, 5:6], **states})["output"]
    assert np.abs(step - expected[:, 5:6]).max() > 100 * ATOL


def run_cli(*args) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_cli_compiles_and_validates_the_decode_model(tmp_path):
    path = tmp_path / "decode.onnx"
    run_cli("export", DECODE, "-o", path)
    out = tmp_path / "compiled"
    run_cli("compile", path, "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ops_after"]["attnc::KernelLinearAttention"] == LAYERS
    assert [i["name"] for i in manifest["inputs"]] == ["ids", "state_0", "state_1"]
    assert [i["dtype"] for i in manifest["inputs"]] == ["int64", "float32", "float32"]
    run_cli("validate", out, "--model", DECODE, "--seed", "2")
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert [o["name"] for o in report["outputs"]] == ["output", "output_1", "output_2"]
    assert report["outputs"][1]["reference"]["shape"] == [1, *STATE]
    assert "PASS" in run_cli("report", out)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_fp16_tensorrt_preparation_keeps_the_state_float32(compiled, exporter):
    from attnc.compiler.backends.tensorrt import prepare_model

    prepared, plugin_ops = prepare_model(onnx.load(str(compiled[exporter]["decode"])), "fp16")
    # Q, K, V, decay (Exp of the slopes) and state present; O and state_out
    assert plugin_ops == ["KernelLinearAttention_in01234_out2"]
    nodes = [n for n in prepared.graph.node if n.domain == "attnc"]
    assert [n.op_type for n in nodes] == ["KernelLinearAttention_in01234_out2"] * LAYERS
    assert all(n.input[4] == f"state_{i}" for i, n in enumerate(nodes))
    assert not [f for f in prepared.functions if f.domain == "attnc"]
    types = {v.name: v.type.tensor_type.elem_type for v in [*prepared.graph.input, *prepared.graph.output]}
    f16, f32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert types == {"ids": onnx.TensorProto.INT64, "state_0": f32, "state_1": f32,
                     "output": f16, "output_1": f32, "output_2": f32}
    # the decay (computed from the slopes in the export) reaches every node as a float32 constant
    initializers = {i.name: i for i in prepared.graph.initializer}
    for node in nodes:
        decay = initializers[node.input[3]]
        assert decay.data_type == f32 and decay.dims == [4]


_RTX_BUILD = textwrap.dedent('''
    import sys
    from attnc.compiler.backends import tensorrt as backend

    model, out = sys.argv[1], sys.argv[2]
    states = [f"state_{i}" for i in range(2)]
    shapes = {name: {"ids": [b, t], **{s: [b, 4, 8, 8] for s in states}}
              for name, (b, t) in (("min_shapes", (1, 1)), ("opt_shapes", (2, 1)), ("max_shapes", (4, 8)))}
    backend.build(model, out, "fp16", **shapes)
''')


@pytest.mark.tensorrt
def test_decode_engine_builds_with_the_plugin(compiled, tmp_path):
    """TensorRT-RTX builds the decode model's fp16 engine with the stateful plugin variant
    (no GPU needed); the engine's state inputs and outputs are float32."""
    tensorrt_or_skip()
    env = rtx_plugin_env(tmp_path) or dict(os.environ)   # the Python plugins' library link, for TensorRT-RTX
    out = tmp_path / "engine"
    run = subprocess.run([sys.executable, "-c", _RTX_BUILD, str(compiled["dynamo"]["decode"]), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((out / "engine.json").read_text())
    assert info["plugins"]["ops"] == ["KernelLinearAttention_in01234_out2"]
    assert info["inputs"] == [{"name": "ids", "dtype": "int64", "shape": [-1, -1]},
                              *({"name": f"state_{i}", "dtype": "float32", "shape": [-1, *STATE]}
                                for i in range(LAYERS))]
    assert info["outputs"] == [{"name": "output", "dtype": "float16", "shape": [-1, -1, 97]},
                               *({"name": f"output_{i + 1}", "dtype": "float32", "shape": [-1, *STATE]}
                                 for i in range(LAYERS))]


def test_decode_example_generates_the_same_tokens_as_pytorch(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "examples" / "decode_lightning.py"), "--prompt", "5",
                          "--generate", "6", "--batch", "2", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "tokens equal" in run.stdout and "yes" in run.stdout.split("tokens equal")[1].splitlines()[0]
