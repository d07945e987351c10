"""The CLI end to end on bundled models, and every bad input the foundation promises to handle.

Each bad input must give one line naming the problem and the fix, exit code 2, and
leave no partial output behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from attnc.compiler.cli import parse_shape
from attnc.compiler.export import export_onnx
from attnc.models.registry import get_spec
from attnc.testing import run_cli as run

MODEL = "mhsa-small"


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "model.onnx"
    run("export", MODEL, "-o", path, "--exporter", "torchscript")
    return path


def leftovers(folder: Path) -> list[str]:
    """Temporary files attnc may have left behind (they all start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_export_inspect_compile_validate_report(exported, tmp_path):
    inspected = run("inspect", exported, "--json")
    data = json.loads(inspected.output)
    model = onnx.load(str(exported))
    assert data["nodes"] == len(model.graph.node)
    assert sum(data["ops"].values()) == len(model.graph.node)
    assert data["ops"].get("MatMul", 0) >= 2

    out = tmp_path / "compiled"
    run("compile", exported, "-o", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "onnxruntime" and manifest["precision"] == "fp32"
    assert (out / manifest["artefact"]).is_file()
    assert manifest["source"]["sha256"]
    assert [i["name"] for i in manifest["inputs"]] == list(get_spec(MODEL).input_names)

    run("validate", out, "--model", MODEL, "--seed", "3")
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True
    assert (out / "report.html").read_text().count("<img") >= 1
    assert "PASS" in run("report", out).output
    assert leftovers(out) == [] and leftovers(tmp_path) == []


def test_validate_fails_on_a_perturbed_artefact(exported, tmp_path):
    out = tmp_path / "compiled"
    run("compile", exported, "-o", out)
    artefact = out / json.loads((out / "manifest.json").read_text())["artefact"]
    model = onnx.load(str(artefact))
    weights = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    array = onnx.numpy_helper.to_array(weights).copy()
    array.flat[0] += 0.5
    weights.CopyFrom(onnx.numpy_helper.from_array(array, weights.name))
    onnx.save(model, str(artefact))
    result = run("validate", out, "--model", MODEL, ok=False)
    assert result.exit_code == 1
    assert json.loads((out / "report.json").read_text())["passed"] is False


def test_validate_with_npz_inputs_and_dynamic_batch(tmp_path):
    spec = get_spec(MODEL)
    path = tmp_path / "dyn.onnx"
    run("export", MODEL, "-o", path, "--exporter", "dynamo")
    out = tmp_path / "compiled"
    run("compile", path, "-o", out)
    rng = np.random.default_rng(7)
    example = spec.example_inputs()[0].numpy()
    feeds = {spec.input_names[0]: rng.standard_normal((3, *example.shape[1:])).astype(np.float32)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    run("validate", out, "--model", MODEL, "--inputs", tmp_path / "inputs.npz")
    meta = json.loads((out / "report.json").read_text())["meta"]
    assert meta["inputs"][spec.input_names[0]]["shape"][0] == 3


# ------------------------------------------------------------------------------ bad input

def assert_clean_error(result, *words: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert text.startswith("error:") and len(text.splitlines()) <= 2, text  # rich may wrap once
    for word in words:
        assert word.lower() in text.lower(), (word, text)


def test_not_onnx(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    assert_clean_error(run("inspect", bad, ok=False), "not", "onnx")
    assert_clean_error(run("compile", bad, "-o", tmp_path / "out", ok=False), "onnx")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_truncated_onnx(exported, tmp_path):
    data = exported.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 3])
    assert_clean_error(run("compile", bad, "-o", tmp_path / "out", ok=False), "onnx", "re-export")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_missing_file(tmp_path):
    assert_clean_error(run("inspect", tmp_path / "nope.onnx", ok=False), "no such file")


@pytest.mark.parametrize("opset", [11, 99])
def test_unknown_opset(exported, tmp_path, opset):
    model = onnx.load(str(exported))
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = opset
    bad = tmp_path / f"opset{opset}.onnx"
    onnx.save(model, str(bad))
    assert_clean_error(run("compile", bad, "-o", tmp_path / "out", ok=False), f"opset {opset}", "--opset")
    assert not (tmp_path / "out").exists()


def test_input_shape_mismatch(exported, tmp_path):
    out = tmp_path / "compiled"
    run("compile", exported, "-o", out)
    name = get_spec(MODEL).input_names[0]
    result = run("validate", out, "--model", MODEL, "--input-shape", f"{name}:2x37x5", ok=False)
    assert_clean_error(result, name, "shape")
    assert not (out / "report.json").exists()


def test_npz_with_wrong_shape(exported, tmp_path):
    out = tmp_path / "compiled"
    run("compile", exported, "-o", out)
    name = get_spec(MODEL).input_names[0]
    np.savez(tmp_path / "bad.npz", **{name: np.zeros((2, 3), np.float32)})
    assert_clean_error(run("validate", out, "--model", MODEL, "--inputs", tmp_path / "bad.npz", ok=False), name)


def test_missing_optional_backend(exported, tmp_path, monkeypatch):
    import attnc.compiler.backends as backends

    module = backends.get_backend("tensorrt")
    monkeypatch.setattr(module, "available", lambda: (False, 'install it: pip install "attnc[tensorrt]"'))
    result = run("compile", exported, "-o", tmp_path / "out", "--backend", "tensorrt", ok=False)
    assert_clean_error(result, "tensorrt", "pip install")
    assert not (tmp_path / "out").exists()


def test_unsupported_precision_for_backend(exported, tmp_path):
    result = run("compile", exported, "-o", tmp_path / "out", "--precision", "fp16", ok=False)
    assert_clean_error(result, "fp16", "--backend tensorrt")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_compile_keeps_previous_artefact(exported, tmp_path):
    out = tmp_path / "compiled"
    run("compile", exported, "-o", out)
    before = (out / "manifest.json").read_text()
    run("compile", exported, "-o", out, "--precision", "fp16", ok=False)
    assert (out / "manifest.json").read_text() == before
    assert leftovers(tmp_path) == []


def test_unknown_model_reference(tmp_path):
    assert_clean_error(run("export", "no-such-model", "-o", tmp_path / "m.onnx", ok=False), "no-such-model")
    assert_clean_error(run("export", "attnc.models.registry:nothing", "-o", tmp_path / "m.onnx", ok=False),
                       "nothing")
    assert not (tmp_path / "m.onnx").exists()


def test_export_failure_leaves_no_file(tmp_path):
    # A MODULE:FACTORY with the wrong number of example inputs cannot be traced by either exporter.
    result = run("export", "attnc.models.registry:mhsa_small", "-o", tmp_path / "m.onnx",
                 "--input-shape", "2x5", "--exporter", "torchscript", ok=False)
    assert_clean_error(result, "export failed")
    assert not (tmp_path / "m.onnx").exists() and leftovers(tmp_path) == []


def test_export_int_high_bounds_token_ids(tmp_path):
    """Random token ids beyond a small vocabulary (97) fail the forward with a hint naming
    --int-high; within it the export and a validation on random ids of another shape pass."""
    result = run("export", "lm-mhsa-small", "-o", tmp_path / "m.onnx", "--input-shape", "2x60:int64",
                 "--seed", "1", ok=False)
    assert_clean_error(result, "--int-high")
    assert not (tmp_path / "m.onnx").exists()
    run("export", "lm-mhsa-small", "-o", tmp_path / "m.onnx", "--input-shape", "2x60:int64", "--int-high", "97")
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    run("validate", tmp_path / "out", "--model", "lm-mhsa-small", "--input-shape", "ids:3x41:int64",
        "--int-high", "97")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [3, 41, 97]


_HF_FACTORIES = """
import torch, transformers

def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)
"""


def test_transformers_lm_as_it_is(tmp_path, monkeypatch):
    """A transformers LM straight from its class (KV cache on, ModelOutput): export (the cache is
    switched off for it and restored), compile with the softmax pass, validate on other shapes."""
    pytest.importorskip("transformers")
    (tmp_path / "hf_factories.py").write_text(_HF_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    run("export", "hf_factories:gpt2", "-o", tmp_path / "gpt2.onnx", "--input-shape", "input_ids:2x9:int64",
        "--int-high", "64", "--dynamic", "input_ids:0=batch", "--dynamic", "input_ids:1=seq")
    run("compile", tmp_path / "gpt2.onnx", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    run("validate", tmp_path / "out", "--model", "hf_factories:gpt2", "--input-shape", "input_ids:3x13:int64",
        "--int-high", "64")
    import hf_factories
    import torch

    model = hf_factories.gpt2().train()
    export_onnx(model, (torch.zeros(1, 4, dtype=torch.long),), tmp_path / "again.onnx")
    assert model.training and model.config.use_cache   # both restored after the export


def test_export_failure_names_the_other_exporter(tmp_path):
    """TorchScript cannot export SDPA with ``enable_gqa``: the fix offered is the other exporter."""
    import torch

    from attnc.compiler.errors import AttncError

    class GQA(torch.nn.Module):
        def forward(self, q, k):
            return torch.nn.functional.scaled_dot_product_attention(q, k, k, enable_gqa=True)

    with pytest.raises(AttncError) as info:
        export_onnx(GQA(), (torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)), tmp_path / "m.onnx",
                    exporter="torchscript")
    assert "enable_gqa" in str(info.value) and "--exporter dynamo" in str(info.value)
    assert "--exporter torchscript" not in str(info.value) and not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("text,expected", [
    ("x:2x3x224x224", ("x", (2, 3, 224, 224), "float32")),
    ("2x37", (None, (2, 37), "float32")),
    ("ids:1x16:int64", ("ids", (1, 16), "int64")),
])
def test_parse_shape(text, expected):
    assert parse_shape(text) == expected


@pytest.mark.parametrize("text", ["x:2xax3", "x:0x3", "a:b:2x3:int64"])
def test_parse_shape_rejects(text):
    from attnc.compiler.errors import AttncError

    with pytest.raises(AttncError):
        parse_shape(text)


def test_export_python_api_roundtrip(tmp_path):
    """export_onnx on both exporters keeps forward()'s input names and the dynamic axes."""
    spec = get_spec(MODEL)
    for exporter in ("dynamo", "torchscript"):
        path = export_onnx(spec.factory(), spec.example_inputs(), tmp_path / f"{exporter}.onnx",
                           exporter=exporter, dynamic_axes=spec.dynamic_axes)
        model = onnx.load(str(path))
        assert [i.name for i in model.graph.input] == list(spec.input_names)
        dims = model.graph.input[0].type.tensor_type.shape.dim
        assert any(d.dim_param for d in dims)


# ------------------------------------------------------------------------------ shrink flags

def test_compile_prunes_heads(exported, tmp_path):
    spec = get_spec(MODEL)
    np.savez(tmp_path / "calib.npz", **{spec.input_names[0]: spec.example_inputs(batch=4, seed=1)[0].numpy()})
    out = tmp_path / "pruned"
    result = run("compile", exported, "-o", out, "--prune-heads", "0.5", "--calibration", tmp_path / "calib.npz")
    assert "head pruning" in result.output
    pruned = json.loads((out / "manifest.json").read_text())["shrink"]["prune_heads"]
    # The accuracy report of a pruned artefact states what pruning removed next to the errors (the verdict:
    # against the model with those heads gated, tests/compiler/test_shrunk_validation.py).
    run("validate", out, "--model", MODEL)
    meta = json.loads((out / "report.json").read_text())["meta"]["compile"]
    assert meta["prune_heads"]["params_after"] == pruned["params_after"]
    assert meta["nodes_after"] <= meta["nodes_before"]
    assert pruned["heads_after"] == pruned["heads_before"] // 2
    # One head of q, k, v rows and output-projection columns per pruned head is gone.
    assert pruned["params_after"] < pruned["params_before"]
    runner_model = onnx.load(str(out / json.loads((out / "manifest.json").read_text())["artefact"]))
    from attnc.compiler.backends.onnxruntime import load

    outputs = load(runner_model).infer({spec.input_names[0]: spec.example_inputs(seed=2)[0].numpy()})
    assert np.isfinite(outputs["output"]).all()


@pytest.mark.parametrize("amount", ["1.5", "0", "-2", "half"])
def test_compile_rejects_bad_prune_amount(exported, tmp_path, amount):
    result = run("compile", exported, "-o", tmp_path / "out", "--prune-heads", amount, ok=False)
    assert_clean_error(result, "prune")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compile_static_token_exit(tmp_path):
    import torch

    spec = get_spec("vlm-small")
    path = tmp_path / "vlm.onnx"
    run("export", "vlm-small", "-o", path, "--exporter", "torchscript")
    module = spec.factory()
    out = tmp_path / "exited"
    result = run("compile", path, "-o", out, "--token-exit", "static",
                 "--visual-tokens", module.num_visual_tokens, "--exit-layer", 1)
    assert "token exit" in result.output
    from attnc.compiler.backends.onnxruntime import load

    manifest = json.loads((out / "manifest.json").read_text())
    inputs = spec.example_inputs(seed=4)
    got = load(str(out / manifest["artefact"])).infer(dict(zip(spec.input_names, (t.numpy() for t in inputs))))
    with torch.no_grad():
        expected = module(*inputs, exit_layer=1).numpy()
    np.testing.assert_allclose(got["output"], expected, rtol=1e-4, atol=1e-5)


def test_token_exit_needs_visual_tokens(tmp_path):
    """attnc export records a VLM's visual tokens, so compile asks only for the exit layer; a graph without the record
    needs --visual-tokens."""
    import onnx

    path = tmp_path / "vlm.onnx"
    run("export", "vlm-small", "-o", path, "--exporter", "torchscript")
    assert_clean_error(run("compile", path, "-o", tmp_path / "out", "--token-exit", "static", ok=False),
                       "exit layer", "--exit-layer")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    assert_clean_error(run("compile", path, "-o", tmp_path / "out", "--token-exit", "static", "--exit-layer", 1,
                           ok=False), "--visual-tokens")


@pytest.mark.parametrize("fires", [True, False])
def test_compile_dynamic_token_exit_with_saved_gate(tmp_path, fires):
    """--token-exit dynamic reads a gate saved with ExitGate.save; both If branches equal torch."""
    from attnc.passes.token_exit import ExitGate, dynamic_exit_forward

    spec = get_spec("vlm-small")
    module = spec.factory()
    path = tmp_path / "vlm.onnx"
    run("export", "vlm-small", "-o", path, "--exporter", "torchscript")
    rng = np.random.default_rng(3)
    weight = rng.standard_normal(module.norm.normalized_shape[0]).astype(np.float32) * 0.01
    gate = ExitGate(2, weight, 40.0 if fires else -40.0)
    gate.save(tmp_path / "gate.npz")
    assert ExitGate.load(tmp_path / "gate.npz").layer == 2
    out = tmp_path / "exited"
    run("compile", path, "-o", out, "--token-exit", "dynamic", "--visual-tokens", module.num_visual_tokens,
        "--exit-gate", tmp_path / "gate.npz")
    from attnc.compiler.backends.onnxruntime import load

    manifest = json.loads((out / "manifest.json").read_text())
    inputs = spec.example_inputs(seed=5)
    got = load(str(out / manifest["artefact"])).infer(dict(zip(spec.input_names, (t.numpy() for t in inputs))))
    expected, exited = dynamic_exit_forward(module, *inputs, gate)
    assert exited.all() == fires and exited.any() == fires
    np.testing.assert_allclose(got["output"], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_compile_auto_lowering_records_each_nodes_route(tmp_path):
    """``--lower auto``: the agent node's route (fused or two ``Attention``) is chosen by its
    shape class and written to the manifest with the reason; the op counts follow it."""
    path = tmp_path / "agent.onnx"
    run("export", "agent-small", "-o", path)
    out = tmp_path / "auto"
    run("compile", path, "-o", out, "--lower", "auto", "--precision", "fp32")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lowered"] == ["auto"]
    (match,) = next(r for r in manifest["passes"] if r["family"] == "agent")["matches"]
    assert match["route"]["source"] == "work model" and match["route"]["reason"]
    lowered = match["route"]["route"] == "lowered"
    assert manifest["ops_after"].get("Attention", 0) == (2 if lowered else 0)
    assert manifest["ops_after"].get("AgentAttention", 0) == (0 if lowered else 1)
    run("validate", out, "--model", "agent-small", "--seed", "2")
    assert json.loads((out / "report.json").read_text())["passed"] is True


def test_inspect_previews_agent_routes(tmp_path):
    """``inspect --lower auto`` shows the route compile would take, and why, in the table and
    the JSON; without ``--lower`` no route is chosen."""
    path = tmp_path / "agent.onnx"
    run("export", "vit-agent-small", "-o", path)
    data = json.loads(run("inspect", path, "--json", "--lower", "auto", "--precision", "fp16").output)
    routes = [m["route"] for m in data["matches"] if m["family"] == "agent"]
    assert [r["route"] for r in routes] == ["lowered", "lowered"] and "1.50x" in routes[0]["reason"]
    table = run("inspect", path, "--lower", "auto").output
    assert "routes (--lower auto)" in table and "lowered (work model)" in table
    plain = json.loads(run("inspect", path, "--json").output)
    assert all(not m["route"] for m in plain["matches"])


def test_inspect_lists_the_heads_pruning_can_prune(tmp_path):
    """``inspect --heads``: each prunable layer with its heads (grouped-query K/V heads apart) and head
    dims, and why pruning leaves other attention alone (a decode step's recurrent state)."""
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.models.transformers_zoo import Output, build

    lm = tmp_path / "qwen2.onnx"   # 4 query heads on 2 K/V heads, head dim 8
    export_onnx(Output(build("qwen2")).eval(), torch.randint(0, 64, (2, 9)), lm, exporter="dynamo",
                input_names=["x"])
    data = json.loads(run("inspect", lm, "--json", "--heads").output)
    assert [(l["index"], l["heads"], l["kv_heads"], l["head_dim"], l["value_dim"]) for l in data["heads"]["layers"]] \
        == [(0, 4, 2, 8, 8), (1, 4, 2, 8, 8)]
    assert data["heads"]["not_prunable"] == []
    assert "attention layers --prune-heads can prune" in run("inspect", lm, "--heads").output
    assert "heads" not in json.loads(run("inspect", lm, "--json").output)

    step = tmp_path / "step.onnx"
    run("export", "lm-lightning-decode-small", "-o", step, "--exporter", "torchscript")
    data = json.loads(run("inspect", step, "--json", "--heads").output)
    assert data["heads"]["layers"] == [] and len(data["heads"]["not_prunable"]) == 2
    assert all("recurrent state" in why for why in data["heads"]["not_prunable"])
    table = run("inspect", step, "--heads").output
    assert "no attention layer head pruning can prune" in table and "recurrent state" in table


def test_dynamic_token_counts_are_routed_at_the_opt_shape(tmp_path):
    """A sequence-dynamic agent model: ``inspect --opt-shape`` (or ``--dim-range``) and the TensorRT compile path
    (``route_shapes``, from the profile flags) decide at the shape the engine is tuned for."""
    from attnc.compiler import onnx_io
    from attnc.compiler.pipeline import CompileOptions, route_shapes

    path = tmp_path / "agent.onnx"
    run("export", "agent-small", "-o", path, "--exporter", "torchscript", "--dynamic", "x:0=batch",
        "--dynamic", "x:1=seq")
    routes = {}
    for tokens in (40, 200):
        data = json.loads(run("inspect", path, "--json", "--lower", "auto", "--precision", "fp16",
                              "--opt-shape", f"x:1x{tokens}x48").output)
        routes[tokens] = [m["route"]["route"] for m in data["matches"] if m["route"]]
    assert routes == {40: ["fused"], 200: ["lowered"]}
    data = json.loads(run("inspect", path, "--json", "--lower", "auto", "--precision", "fp16", "--dim-range",
                          "batch=1", "--dim-range", "seq=1:200:300").output)   # by named dim: its OPT size
    assert [m["route"]["route"] for m in data["matches"] if m["route"]] == routes[200]
    assert "model fixes it to 48" in run("inspect", path, "--lower", "auto", "--opt-shape", "x:1x40x47",
                                         ok=False).output
    model = onnx_io.load_model(path)
    tensorrt = lambda **shapes: CompileOptions(backend="tensorrt", backend_options=shapes)  # noqa: E731
    assert route_shapes(model, tensorrt(opt_shapes=["x:2x40x48"])) == {"x": [2, 40, 48]}
    assert route_shapes(model, tensorrt(max_shapes=["x:4x300x48"])) == {"x": [4, 300, 48]}  # opt defaults to max
    assert route_shapes(model, tensorrt(dim_ranges=["batch=1:2:4", "seq=40"])) == {"x": [2, 40, 48]}
    assert route_shapes(model, tensorrt()) is None   # no profile: the build says so, naming the input
    assert route_shapes(model, CompileOptions(backend="onnxruntime")) is None


def test_lower_none_stands_alone(tmp_path):
    path = tmp_path / "agent.onnx"
    run("export", "agent-small", "-o", path)
    result = run("compile", path, "-o", tmp_path / "out", "--lower", "none", "--lower", "agent", ok=False)
    assert "--lower none cannot be combined" in result.output
    assert not (tmp_path / "out").exists()


def test_default_lowering_per_backend():
    from attnc.compiler.pipeline import CompileOptions, default_lowering

    assert default_lowering(CompileOptions()) == []
    assert default_lowering(CompileOptions(backend="tensorrt")) == ["auto"]
    assert default_lowering(CompileOptions(backend="tensorrt", backend_options={"fused_ops": "inline"})) == []


def test_exit_gate_file_must_be_a_gate(tmp_path):
    path = tmp_path / "vlm.onnx"
    run("export", "vlm-small", "-o", path, "--exporter", "torchscript")
    np.savez(tmp_path / "notgate.npz", x=np.zeros(3))
    result = run("compile", path, "-o", tmp_path / "out", "--token-exit", "dynamic", "--visual-tokens", 16,
                 "--exit-gate", tmp_path / "notgate.npz", ok=False)
    assert_clean_error(result, "not an exit gate")


def test_compile_lowers_agent_attention_and_validates(tmp_path):
    """``--lower agent``: each agent attention becomes two ONNX ``Attention`` nodes (no attnc
    node left), and the artefact still matches the PyTorch model."""
    path = tmp_path / "agent.onnx"
    run("export", "agent-small", "-o", path)
    out = tmp_path / "lowered"
    run("compile", path, "-o", out, "--lower", "agent")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["lowered"] == ["agent"]
    assert manifest["ops_after"].get("Attention") == 2 and "AgentAttention" not in manifest["ops_after"]
    agent_report = next(r for r in manifest["passes"] if r["family"] == "agent")
    assert agent_report["rewritten"] == 1
    run("validate", out, "--model", "agent-small", "--seed", "5")
    assert json.loads((out / "report.json").read_text())["passed"] is True


def test_lowering_a_family_that_is_not_fused_is_an_error(exported, tmp_path):
    result = run("compile", exported, "-o", tmp_path / "out", "--family", "softmax", "--lower", "agent", ok=False)
    assert result.exit_code == 2 and "--lower agent" in result.output and "--family agent" in result.output
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_train_exit_gate_on_a_bundled_vlm(tmp_path):
    """``attnc train-exit-gate vlm-small``: the gate it writes is ``train_exit_gate``'s on the calibration inputs."""
    import numpy as np

    from attnc.passes.token_exit import ExitGate, train_exit_gate

    spec = get_spec("vlm-small")
    images, ids = spec.example_inputs(batch=16, seed=3)
    np.savez(tmp_path / "calib.npz", image=images.numpy(), text_ids=ids.numpy())
    run("train-exit-gate", "vlm-small", "--layer", 2, "--calibration", tmp_path / "calib.npz", "-o",
        tmp_path / "gate.npz", "--steps", 40)
    gate = ExitGate.load(tmp_path / "gate.npz")
    expected, _ = train_exit_gate(spec.factory(), (images, ids), 2, steps=40)
    assert gate.layer == 2 and gate.threshold == pytest.approx(expected.threshold)
    np.testing.assert_allclose(gate.weight, expected.weight, rtol=1e-5, atol=1e-7)
