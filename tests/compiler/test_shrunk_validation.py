"""``attnc validate`` of shrunk artefacts (compiler/reference.py): a compile with head pruning or token exit is
compared with the model shrunk alike in PyTorch, so a correct compile passes and one that pruned other heads, or
dropped the tokens elsewhere, fails; the report's ``shrink_cost`` measures the artefact against the unshrunk model
and is checked here against numpy on the artefact's and the unshrunk torch model's outputs.

Bundled models with both exporters (plain attention, agent attention with its conv channels, a causal LM), fresh
random inputs of odd sizes, models whose attention modules are registered in another order than they run (found
by their projection's fingerprint), a model with other head counts (refused by name), static and dynamic token
exit, and the refusals where PyTorch cannot shrink the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.errors import AttncError
from attnc.compiler.reference import shrink_cost, shrunk_model
from attnc.models.registry import get_spec
from attnc.testing import run_cli as run


def _artefact_outputs(out: Path, feeds: dict) -> dict:
    manifest = json.loads((out / "manifest.json").read_text())
    return load(str(out / manifest["artefact"])).infer(dict(feeds))


def _torch_outputs(model, feeds: dict, names: list[str], **kwargs) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(*(torch.from_numpy(feeds[n]) for n in names), **kwargs).numpy()


def _expected_cost(original: np.ndarray, actual: np.ndarray) -> dict:
    """max abs, cosine and last-axis argmax agreement, in numpy, written apart from shrink_cost."""
    r, a = original.astype(np.float64).ravel(), actual.astype(np.float64).ravel()
    agree = original.reshape(-1, original.shape[-1]).argmax(-1) == actual.reshape(-1, actual.shape[-1]).argmax(-1)
    return {"max_abs_error": np.abs(a - r).max(), "cosine": r @ a / np.sqrt((r @ r) * (a @ a)),
            "top1_agreement": agree.mean()}


def _random_feeds(spec, rng, batch: int) -> dict:
    """Fresh inputs of ``spec``'s model at ``batch`` (odd sizes along the dynamic axes the spec has)."""
    feeds = {}
    for name, example in zip(spec.input_names, spec.example_inputs(seed=0)):
        shape = list(example.shape)
        shape[0] = batch
        if name == "ids":
            shape[1] = 23
            feeds[name] = rng.integers(0, 64, shape).astype(np.int64)
        else:
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


@pytest.mark.parametrize("name,exporter", [("vit-mhsa-small", "torchscript"), ("vit-mhsa-small", "dynamo"),
                                           ("agent-small", "dynamo"), ("lm-mhsa-small", "torchscript")])
def test_pruned_artefact_passes_against_the_gated_model(name, exporter, tmp_path):
    """Half the heads pruned: validation passes against the gated model, the cost section equals numpy's numbers
    on the artefact and the unpruned model, ``--reference original`` fails, and an artefact whose manifest names
    other kept heads than its graph has fails too."""
    spec = get_spec(name)
    rng = np.random.default_rng(sum(map(ord, name + exporter)))
    feeds = _random_feeds(spec, rng, batch=5)
    np.savez(tmp_path / "inputs.npz", **feeds)
    run("export", name, "-o", tmp_path / "model.onnx", "--exporter", exporter)
    out = tmp_path / "pruned"
    run("compile", tmp_path / "model.onnx", "-o", out, "--prune-heads", "0.5")

    result = run("validate", out, "--model", name, "--inputs", tmp_path / "inputs.npz")
    assert "what shrinking changed" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and "gated to zero" in report["meta"]["reference"]
    [cost] = report["shrink_cost"]
    expected = _expected_cost(_torch_outputs(spec.factory(), feeds, spec.input_names),
                              _artefact_outputs(out, feeds)["output"])
    for key, value in expected.items():
        assert cost[key] == pytest.approx(float(value), rel=1e-6, abs=1e-9), key
    assert cost["max_abs_error"] > 1e-2 and cost["cosine"] < 0.9999   # half the heads: the outputs moved
    assert "What shrinking changed" in (out / "report.html").read_text()
    assert "what shrinking changed" in run("report", out).output

    result = run("validate", out, "--model", name, "--inputs", tmp_path / "inputs.npz", "--reference", "original",
                 ok=False)
    assert result.exit_code == 1, result.output
    report = json.loads((out / "report.json").read_text())
    assert "shrink_cost" not in report and "unshrunk" in report["meta"]["reference"]

    # The manifest's kept heads are what the reference gates: name the pruned ones instead and validation fails.
    manifest = json.loads((out / "manifest.json").read_text())
    for layer in manifest["shrink"]["prune_heads"]["layers"]:
        layer["kept"] = [h for h in range(layer["heads_before"]) if h not in layer["kept"]] or layer["kept"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run("validate", out, "--model", name, "--inputs", tmp_path / "inputs.npz", ok=False)
    assert result.exit_code == 1, result.output


_FACTORIES = """
import torch
from attnc.models.mhsa import MultiHeadSelfAttention


class Reordered(torch.nn.Module):
    '''Two attention layers registered in the other order than they run, with 4 and 2 heads.'''

    def __init__(self, heads=(2, 4)):
        super().__init__()
        torch.manual_seed(0)
        self.second = MultiHeadSelfAttention(32, heads[0])
        self.first = MultiHeadSelfAttention(32, heads[1])

    def forward(self, x):
        x = x + self.first(x)
        return x + self.second(x)


def reordered():
    return Reordered()


def other_heads():
    return Reordered((4, 2))
"""


def test_layers_find_their_modules_by_fingerprint(tmp_path, monkeypatch):
    """The graph's layer 0 is the module registered second: its projection's fingerprint finds it (by index it would
    be the 2-head module). A model whose modules have other head counts is refused by name, as is an artefact
    whose layers lack fingerprints and whose order differs from registration."""
    (tmp_path / "shrink_factories.py").write_text(_FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 19, 32)).astype(np.float32)
    np.savez(tmp_path / "inputs.npz", x=x)
    run("export", "shrink_factories:reordered", "-o", tmp_path / "model.onnx", "--input-shape", "x:2x19x32",
        "--dynamic", "x:0=batch")
    out = tmp_path / "pruned"
    run("compile", tmp_path / "model.onnx", "-o", out, "--prune-heads", "3")
    layers = json.loads((out / "manifest.json").read_text())["shrink"]["prune_heads"]["layers"]
    assert [l["heads_before"] for l in layers] == [4, 2]
    run("validate", out, "--model", "shrink_factories:reordered", "--inputs", tmp_path / "inputs.npz")

    result = run("validate", out, "--model", "shrink_factories:other_heads", "--inputs", tmp_path / "inputs.npz",
                 ok=False)
    assert result.exit_code == 2 and "had 4 heads" in result.output and "--reference original" in result.output

    manifest = json.loads((out / "manifest.json").read_text())
    for layer in manifest["shrink"]["prune_heads"]["layers"]:
        del layer["fingerprint"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run("validate", out, "--model", "shrink_factories:reordered", "--inputs", tmp_path / "inputs.npz",
                 ok=False)
    assert result.exit_code == 2 and "had 4 heads, but attention module 0" in result.output


def test_static_token_exit_validates_against_the_exiting_model(tmp_path):
    """``--token-exit static``: validation runs ``forward(..., exit_layer=k)``; with head pruning on top as well."""
    spec = get_spec("vlm-small")
    module = spec.factory()
    rng = np.random.default_rng(11)
    feeds = {"image": rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
             "text_ids": rng.integers(0, 50, (4, 9)).astype(np.int64)}
    np.savez(tmp_path / "inputs.npz", **feeds)
    run("export", "vlm-small", "-o", tmp_path / "vlm.onnx", "--exporter", "torchscript")
    for extra in ((), ("--prune-heads", "0.25")):
        out = tmp_path / f"exit{len(extra)}"
        run("compile", tmp_path / "vlm.onnx", "-o", out, "--token-exit", "static", "--visual-tokens",
            module.num_visual_tokens, "--exit-layer", 1, *extra)
        run("validate", out, "--model", "vlm-small", "--inputs", tmp_path / "inputs.npz")
        report = json.loads((out / "report.json").read_text())
        assert "visual tokens dropped before decoder layer 1" in report["meta"]["reference"]
        assert ("gated to zero" in report["meta"]["reference"]) == bool(extra)
        [cost] = report["shrink_cost"]
        expected = _expected_cost(_torch_outputs(module, feeds, spec.input_names), _artefact_outputs(out, feeds)["output"])
        assert cost["max_abs_error"] == pytest.approx(float(expected["max_abs_error"]), rel=1e-6)
        assert cost["top1_agreement"] == pytest.approx(float(expected["top1_agreement"]))
    # Exiting before another layer than the artefact did fails.
    manifest = json.loads((tmp_path / "exit0" / "manifest.json").read_text())
    manifest["shrink"]["token_exit"]["exit_layer"] = 2
    (tmp_path / "exit0" / "manifest.json").write_text(json.dumps(manifest))
    assert run("validate", tmp_path / "exit0", "--model", "vlm-small", "--inputs", tmp_path / "inputs.npz",
               ok=False).exit_code == 1


@pytest.mark.parametrize("fires", [True, False])
def test_dynamic_token_exit_validates_against_the_gate(tmp_path, fires):
    """``--token-exit dynamic``: the manifest records the gate and validation runs it in PyTorch, both ways it can
    decide; a manifest without the gate (an older compile) is refused with the fix."""
    from attnc.passes.token_exit import ExitGate

    module = get_spec("vlm-small").factory()
    run("export", "vlm-small", "-o", tmp_path / "vlm.onnx", "--exporter", "torchscript")
    weight = np.random.default_rng(3).standard_normal(module.norm.normalized_shape[0]).astype(np.float32) * 0.01
    ExitGate(2, weight, 40.0 if fires else -40.0).save(tmp_path / "gate.npz")
    out = tmp_path / "exited"
    run("compile", tmp_path / "vlm.onnx", "-o", out, "--token-exit", "dynamic", "--visual-tokens",
        module.num_visual_tokens, "--exit-gate", tmp_path / "gate.npz")
    gate = json.loads((out / "manifest.json").read_text())["shrink"]["token_exit"]["gate"]
    assert gate["layer"] == 2 and np.array_equal(np.asarray(gate["weight"], np.float32), weight)
    run("validate", out, "--model", "vlm-small", "--seed", "4")
    report = json.loads((out / "report.json").read_text())
    assert "where the exit gate fires" in report["meta"]["reference"]
    assert (report["shrink_cost"][0]["max_abs_error"] > 1e-4) == fires   # the full branch is the full model

    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["shrink"]["token_exit"]["gate"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = run("validate", out, "--model", "vlm-small", ok=False)
    assert result.exit_code == 2 and "records no exit gate" in result.output
    result = run("validate", out, "--model", "vlm-small", "--reference", "original", ok=False)
    assert result.exit_code == (1 if fires else 0), result.output


def test_refusals_name_the_way_out():
    """A static exit on a forward without ``exit_layer``, a dynamic exit on another layout, pruning a model without
    attention modules: each error names ``--reference original``."""
    mhsa = get_spec("vit-mhsa-small").factory()
    static = {"token_exit": {"mode": "static", "exit_layer": 1}}
    with pytest.raises(AttncError, match="takes no exit_layer") as err:
        shrunk_model(mhsa, static)
    assert "--reference original" in err.value.fix
    dynamic = {"token_exit": {"mode": "dynamic", "exit_layer": 1,
                              "gate": {"layer": 1, "weight": [0.0], "bias": 0.0, "threshold": 0.5}}}
    with pytest.raises(AttncError, match="not laid out as attnc's TinyVLM"):
        shrunk_model(mhsa, dynamic)
    pruned = {"prune_heads": {"layers": [{"index": 0, "heads_before": 2, "kept": [0], "fingerprint": None}]}}
    with pytest.raises(AttncError, match="no attention module head pruning knows"):
        shrunk_model(torch.nn.Linear(3, 3), pruned)
    assert shrunk_model(mhsa, {}) is None


def test_shrink_cost_rows():
    """Top-1 agreement skips rows that are zero on both sides (padding), KV caches and rank-1 outputs; other shapes
    get a note."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    moved = logits.copy()
    moved[0, 1] = -moved[0, 1]           # row (0, 1): its argmax changes
    logits[1, :2] = moved[1, :2] = 0.0   # two padding rows
    cache = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    rows = {r["name"]: r for r in shrink_cost(
        {"logits": logits, "present.0.key": cache, "score": np.ones(3, np.float32), "other": np.ones((2, 2))},
        {"logits": moved, "present.0.key": cache, "score": np.ones(3, np.float32), "other": np.ones((3, 2))})}
    assert rows["logits"]["rows"] == 8 and rows["logits"]["top1_agreement"] == pytest.approx(7 / 8)
    assert rows["logits"]["max_abs_error"] == pytest.approx(2 * np.abs(logits[0, 1]).max())
    assert rows["present.0.key"]["top1_agreement"] is None and rows["present.0.key"]["cosine"] == pytest.approx(1.0)
    assert rows["score"]["top1_agreement"] is None and rows["score"]["max_abs_error"] == 0
    assert rows["other"]["note"].startswith("not compared") and rows["other"]["cosine"] is None
