"""Head pruning (passes/prune_heads.py) against an independent torch reference: the same
model with the pruned heads' outputs multiplied by zero (a forward pre-hook on the output
projection), on a ViT trained on scikit-learn's digits and on the registry's MHSA models."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.export import export_onnx
from attnc.models.registry import get_spec
from attnc.models.train import accuracy, fit, train_digits_vit
from attnc.passes.prune_heads import (find_attention_layers, gates_from_keep, head_gates, prune_heads,
                                      score_heads, select_heads)

# Documented in docs/shrink.md (measured: 94.0 % -> 83.3 % and 90.4 % -> 93.3 %):
# 25 % of the digits ViT's heads by activation score, no fine-tuning, cost at most
ACTIVATION_BOUND = 0.15
# and by gradient score followed by two epochs of fine-tuning with the heads masked, at most
RECOVERED_BOUND = 0.02


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: feeds[n] for n in names})[0]


def _export(model, inputs, tmp_path, exporter="dynamo", spec=None) -> onnx.ModelProto:
    path = tmp_path / f"model-{exporter}.onnx"
    kwargs = {"dynamic_axes": spec.dynamic_axes, "input_names": spec.input_names} if spec else \
        {"dynamic_axes": {"image": {0: "batch"}}, "input_names": ["image"]}
    export_onnx(model, inputs, path, exporter=exporter, **kwargs)
    return onnx.load(str(path))


def _masked_reference(torch_model, keep: dict[int, list[int]], layers, inputs) -> np.ndarray:
    gates = gates_from_keep(keep, {l.index: l.heads for l in layers})
    with torch.no_grad(), head_gates(torch_model, gates):
        return torch_model(*inputs).numpy()


def _sliced_params(layer, removed: int) -> int:
    """Weights one head owns: its Q/K/V columns (+ biases) and its output-projection rows."""
    c_in = c_out = layer.heads * layer.value_dim  # the registry/digits models keep width = H * D
    per_head = 2 * (c_in * layer.head_dim + layer.head_dim) + (c_in * layer.value_dim + layer.value_dim)
    return removed * (per_head + layer.value_dim * c_out)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    torch.manual_seed(0)
    model, train, test = train_digits_vit()
    path = tmp_path_factory.mktemp("digits")
    onnx_model = _export(model, train.inputs[0][:4], path)
    return model, train, test, onnx_model


def test_digits_vit_trains(digits):
    model, _, test, _ = digits
    assert accuracy(model, test) > 0.9


def test_prune_quarter_of_heads_by_activation(digits):
    model, train, test, onnx_model = digits
    calibration = [{"image": train.inputs[0][i:i + 128].numpy()} for i in range(0, 512, 128)]
    scores = score_heads(onnx_model, calibration, method="activation")
    layers = find_attention_layers(onnx_model)
    assert [l.heads for l in layers] == [4, 4, 4, 4]
    assert {k: v.shape for k, v in scores.items()} == {i: (4,) for i in range(4)}

    pruned, report = prune_heads(onnx_model, scores, ratio=0.25)
    assert report.heads_before == 16 and report.heads_after == 12
    assert all(l.heads_after >= 1 for l in report.layers)
    # Parameters drop by exactly what was sliced.
    expected = sum(_sliced_params(layer, l.heads_before - l.heads_after) for layer, l in zip(layers, report.layers))
    assert report.params_before - report.params_after == expected
    # Attention FLOPs (projections + core, 17 tokens) drop by at least the head fraction.
    assert report.attention_flops_after <= 0.8 * report.attention_flops_before

    # Equal to the torch model with the same heads zeroed (independent reference).
    keep = {l.index: l.kept for l in report.layers}
    images = test.inputs[0][:64]
    expected_out = _masked_reference(model, keep, layers, (images,))
    got = _ort(pruned, {"image": images.numpy()})
    np.testing.assert_allclose(got, expected_out, atol=1e-5, rtol=1e-5)

    # Accuracy stays within the documented bound.
    assert _onnx_accuracy(pruned, test) >= accuracy(model, test) - ACTIVATION_BOUND


def _onnx_accuracy(model, split) -> float:
    logits = _ort(model, {"image": split.inputs[0].numpy()})
    return float((logits.argmax(-1) == split.labels.numpy()).mean())


def test_gradient_scores_and_recovery(digits, tmp_path):
    model, train, test, onnx_model = digits
    calibration = [{"image": train.inputs[0][i:i + 128].numpy(), "labels": train.labels[i:i + 128].numpy()}
                   for i in range(0, 512, 128)]
    loss = lambda out, feeds: torch.nn.functional.cross_entropy(out, torch.from_numpy(feeds["labels"]))  # noqa: E731
    scores = score_heads(onnx_model, calibration, method="gradient", torch_model=model, loss_fn=loss)
    assert all(s.shape == (4,) and np.all(s >= 0) and s.sum() > 0 for s in scores.values())
    layers = find_attention_layers(onnx_model)
    keep = select_heads({l.index: l.heads for l in layers}, scores, ratio=0.25)
    # Recover: fine-tune the torch model with the pruned heads masked, re-export, prune.
    tuned = copy.deepcopy(model)
    with head_gates(tuned, gates_from_keep(keep, {l.index: l.heads for l in layers})):
        fit(tuned, train, 2, lr=1e-3)
    pruned, report = prune_heads(_export(tuned, train.inputs[0][:4], tmp_path), keep=keep)
    assert report.heads_after == 12
    images = test.inputs[0][:32]
    np.testing.assert_allclose(_ort(pruned, {"image": images.numpy()}),
                               _masked_reference(tuned, keep, layers, (images,)), atol=1e-5, rtol=1e-5)
    assert _onnx_accuracy(pruned, test) >= accuracy(model, test) - RECOVERED_BOUND


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("name, keep", [
    ("vit-mhsa-small", {0: [1], 1: [0, 2]}),                       # fused qkv, 3 heads, CLS
    ("lm-mhsa-small", {0: [0, 3], 1: [1, 2, 3]}),                  # causal, dynamic sequence
    ("mhsa-causal-small", {0: [2]}),                               # separate q/k/v, scale after
    ("mhsa-scale-after-small", {0: [1]}),                          # no qkv bias
])
def test_registry_models_match_masked_torch(tmp_path, exporter, name, keep):
    spec = get_spec(name)
    model = spec.factory()
    inputs = spec.example_inputs(batch=2, seed=1)
    onnx_model = _export(model, inputs, tmp_path, exporter, spec)
    layers = find_attention_layers(onnx_model)
    pruned, report = prune_heads(onnx_model, keep=keep)
    assert [l.heads_after for l in report.layers] == [len(keep.get(l.index, range(l.heads))) for l in layers]
    feeds = dict(zip(spec.input_names, (t.numpy() for t in inputs)))
    np.testing.assert_allclose(_ort(pruned, feeds), _masked_reference(model, keep, layers, inputs),
                               atol=1e-5, rtol=1e-5)
    if "seq" in spec.sizes:  # the dynamic sequence axis still works after pruning
        other = spec.example_inputs(batch=1, seed=2, seq=11)
        feeds = dict(zip(spec.input_names, (t.numpy() for t in other)))
        np.testing.assert_allclose(_ort(pruned, feeds), _masked_reference(model, keep, layers, other),
                                   atol=1e-5, rtol=1e-5)


def test_prunes_after_softmax_fusion(tmp_path):
    softmax = pytest.importorskip("attnc.passes.softmax")
    spec = get_spec("lm-mhsa-small")
    model = spec.factory()
    inputs = spec.example_inputs(batch=2, seed=1)
    fused, fusion = softmax.apply(_export(model, inputs, tmp_path, "dynamo", spec))
    if fusion.rewritten == 0:
        pytest.skip("the softmax fusion pass did not fire on this export")
    layers = find_attention_layers(fused)
    assert {l.core for l in layers} == {"Attention"}
    keep = {0: [1, 2], 1: [3]}
    pruned, _ = prune_heads(fused, keep=keep)
    assert sum(n.op_type == "Attention" for n in pruned.graph.node) == 2
    feeds = {"ids": inputs[0].numpy()}
    np.testing.assert_allclose(_ort(pruned, feeds), _masked_reference(model, keep, layers, inputs),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, family", [
    ("vit-flow-small", "flow"),                 # attnc::FlowAttention
    ("lm-linear-small", "linear"),              # attnc::KernelLinearAttention
    ("lm-lightning-small", "linear"),           # ... with a per-head decay input (sliced)
    ("na1d-causal-small", "neighborhood"),      # attnc::NeighborhoodAttention with a per-head RPB (sliced)
])
def test_prunes_fused_attnc_nodes(tmp_path, name, family):
    import importlib

    spec = get_spec(name)
    model = spec.factory()
    inputs = spec.example_inputs(batch=2, seed=1)
    try:
        fused, fusion = importlib.import_module(f"attnc.passes.{family}").apply(
            _export(model, inputs, tmp_path, "dynamo", spec))
    except Exception as exc:  # another family's pass, in progress: not what this test checks
        pytest.skip(f"the {family} fusion pass failed: {type(exc).__name__}: {exc}")
    if fusion.rewritten == 0:
        pytest.skip(f"the {family} fusion pass did not fire")
    layers = find_attention_layers(fused)
    assert all(l.core.startswith("attnc::") for l in layers)
    keep = {l.index: [l.heads - 1] for l in layers}
    pruned, _ = prune_heads(fused, keep=keep)
    feeds = dict(zip(spec.input_names, (t.numpy() for t in inputs)))
    np.testing.assert_allclose(_ort(pruned, feeds), _masked_reference(model, keep, layers, inputs),
                               atol=1e-5, rtol=1e-5)


def test_agent_attention_is_refused_with_a_reason(tmp_path):
    agent = pytest.importorskip("attnc.passes.agent")
    spec = get_spec("vit-agent-small")
    fused, _ = agent.apply(_export(spec.factory(), spec.example_inputs(batch=2), tmp_path, "dynamo", spec))
    # The depthwise conv on V is added to the merged heads before the output projection.
    with pytest.raises(AttncError, match="output projection"):
        prune_heads(fused, keep={0: [0]})


def test_select_heads_is_global_and_keeps_one_per_layer():
    scores = {0: np.array([1.0, 0.0, 0.0, 0.0]), 1: np.array([1.0, 1.0, 1.0, 1.0])}
    keep = select_heads({0: 4, 1: 4}, scores, count=4)
    assert keep[0] == [0] and len(keep[1]) == 3   # layer 0 keeps its one strong head
    keep = select_heads({0: 2, 1: 2}, {0: np.array([0.0, 0.0]), 1: np.array([1.0, 1.0])}, count=2)
    assert all(len(k) >= 1 for k in keep.values())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.5, 1.5])
def test_bad_ratio(digits, ratio):
    onnx_model = digits[3]
    scores = score_heads(onnx_model, [], method="weight")
    with pytest.raises(AttncError, match="ratio"):
        prune_heads(onnx_model, scores, ratio=ratio)


def test_bad_requests(digits):
    onnx_model = digits[3]
    scores = score_heads(onnx_model, [], method="weight")
    with pytest.raises(AttncError, match="no heads left"):
        prune_heads(onnx_model, keep={0: []})
    with pytest.raises(AttncError, match="not distinct indices"):
        prune_heads(onnx_model, keep={0: [0, 7]})
    with pytest.raises(AttncError, match="no attention layer 9"):
        prune_heads(onnx_model, keep={9: [0]})
    with pytest.raises(AttncError, match="cannot prune"):
        prune_heads(onnx_model, scores, count=16)
    with pytest.raises(AttncError, match="scores or keep|needs scores"):
        prune_heads(onnx_model)
    with pytest.raises(AttncError, match="unknown head-scoring method"):
        score_heads(onnx_model, [], method="taylor")
    with pytest.raises(AttncError, match="PyTorch model and a loss"):
        score_heads(onnx_model, [{"image": np.zeros((1, 1, 8, 8), np.float32)}], method="gradient")
    with pytest.raises(AttncError, match="calibration data"):
        score_heads(onnx_model, [], method="activation")


def test_model_without_attention(tmp_path):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    path = tmp_path / "mlp.onnx"
    export_onnx(mlp, (torch.randn(2, 8),), path, dynamic_axes={"input": {0: "batch"}}, input_names=["input"])
    with pytest.raises(AttncError, match="no recognisable attention"):
        prune_heads(onnx.load(str(path)), keep={0: [0]})


def test_pipeline_entry_point(tmp_path):
    from attnc.passes import prune_heads as pass_module

    spec = get_spec("vit-mhsa-small")
    onnx_model = _export(spec.factory(), spec.example_inputs(batch=2), tmp_path, "dynamo", spec)
    assert pass_module.apply(onnx_model, "0.25")[1].heads_after == 4          # ratio: round(0.25 * 6) = 2 go
    assert pass_module.apply(onnx_model, "1", method="weight")[1].heads_after == 5   # a count
    with pytest.raises(AttncError, match="ratio or a head count"):
        pass_module.apply(onnx_model, "a quarter")
