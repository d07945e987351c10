"""Visual-token exit (passes/token_exit.py) against the torch model's own ``exit_layer``:
static rewrite of the exported graph, the torch-route export, and the dynamic ``If`` graph, whose rows each take their
own gate's branch (each row against the model on that row alone)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.export import export_onnx
from attnc.models.registry import get_spec
from attnc.passes.token_exit import (ExitGate, apply_dynamic_token_exit, apply_static_token_exit,
                                     choose_exit_layer, decoder_boundaries, dynamic_exit_forward,
                                     export_static_exit, gate_features, train_exit_gate)

ATOL = 1e-5


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run(model, feeds) -> np.ndarray:
    return _session(model).run(None, feeds)[0]


@pytest.fixture(scope="module", params=["dynamo", "torchscript"])
def vlm(request, tmp_path_factory):
    spec = get_spec("vlm-small")
    model = spec.factory()
    path = tmp_path_factory.mktemp("vlm") / f"vlm-{request.param}.onnx"
    export_onnx(model, spec.example_inputs(batch=2), path, exporter=request.param,
                dynamic_axes=spec.dynamic_axes, input_names=spec.input_names)
    return spec, model, onnx.load(str(path))


def _feeds(spec, inputs):
    return dict(zip(spec.input_names, (t.numpy() for t in inputs)))


def test_finds_the_decoder_layers(vlm):
    _, model, onnx_model = vlm
    assert len(decoder_boundaries(onnx_model)) == len(model.layers)   # the vision blocks are not counted


@pytest.mark.parametrize("exit_layer", [0, 1, 2, 3, 4])
def test_static_rewrite_equals_torch_exit(vlm, exit_layer):
    spec, model, onnx_model = vlm
    exited, report = apply_static_token_exit(onnx_model, exit_layer, model.num_visual_tokens)
    assert report.decoder_layers == 4
    for batch, text_len in ((2, 13), (1, 5)):   # dynamic batch and text length still work
        inputs = spec.example_inputs(batch=batch, seed=3, text_len=text_len)
        with torch.no_grad():
            expected = model(*inputs, exit_layer=exit_layer).numpy()
        np.testing.assert_allclose(_run(exited, _feeds(spec, inputs)), expected, atol=ATOL, rtol=ATOL)


def test_static_rewrite_shrinks_the_later_layers(vlm):
    spec, model, onnx_model = vlm
    exited, _ = apply_static_token_exit(onnx_model, 1, model.num_visual_tokens)
    boundaries = decoder_boundaries(onnx_model)
    probe = onnx.ModelProto()
    probe.CopyFrom(exited)
    # The boundary of layer 2 now carries text tokens only.
    probe.graph.output.append(onnx.helper.make_value_info(boundaries[2], onnx.TypeProto()))
    inputs = spec.example_inputs(batch=1, seed=0)
    hidden = _session(probe).run([boundaries[2]], _feeds(spec, inputs))[0]
    assert hidden.shape[1] == inputs[1].shape[1]


def test_torch_route_export_matches(tmp_path):
    spec = get_spec("vlm-small")
    model = spec.factory()
    inputs = spec.example_inputs(batch=2, seed=4)
    path = export_static_exit(model, inputs, tmp_path / "exit2.onnx", 2, dynamic_axes=spec.dynamic_axes,
                              input_names=spec.input_names)
    with torch.no_grad():
        expected = model(*inputs, exit_layer=2).numpy()
    np.testing.assert_allclose(_run(onnx.load(str(path)), _feeds(spec, inputs)), expected, atol=ATOL, rtol=ATOL)


def test_choose_exit_layer_on_agreement(vlm):
    spec, model, onnx_model = vlm
    calibration = [_feeds(spec, spec.example_inputs(batch=8, seed=s)) for s in range(2)]
    choice = choose_exit_layer(onnx_model, calibration, model.num_visual_tokens, max_accuracy_drop=0.0)
    assert [row["exit_layer"] for row in choice.table] == [0, 1, 2, 3, 4]
    assert choice.table[-1]["agreement"] == 1.0 and choice.table[-1]["ok"]
    ok = [row["exit_layer"] for row in choice.table if row["ok"] and row["exit_layer"] < 4]
    assert choice.exit_layer == (ok[0] if ok else 4)
    # Labels turn the criterion into accuracy; labels equal to the full model's answers
    # make it the same as agreement.
    labels = [model(*spec.example_inputs(batch=8, seed=s)).argmax(-1).numpy() for s in range(2)]
    assert choose_exit_layer(onnx_model, calibration, model.num_visual_tokens, labels=labels,
                             max_accuracy_drop=0.0).exit_layer == choice.exit_layer


@pytest.mark.parametrize("fires", [True, False])
def test_dynamic_if_graph_branches_equal_torch(vlm, fires):
    spec, model, onnx_model = vlm
    gate = ExitGate(2, np.zeros(32, np.float32), 50.0 if fires else -50.0)
    dynamic, report = apply_dynamic_token_exit(onnx_model, gate, model.num_visual_tokens)
    assert sum(n.op_type == "If" for n in dynamic.graph.node) == 2   # the batch's, then the rows'
    inputs = spec.example_inputs(batch=2, seed=5)
    expected, exited = dynamic_exit_forward(model, *inputs, gate)
    assert exited.tolist() == [fires] * 2
    with torch.no_grad():
        static = model(*inputs, exit_layer=2 if fires else None).numpy()
    got = _run(dynamic, _feeds(spec, inputs))
    np.testing.assert_allclose(got, static, atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(got, expected.numpy(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("batch", [3, 6])
def test_each_row_takes_its_own_branch(vlm, batch):
    """A gate whose threshold splits a batch of fresh random rows: the graph's output of each row equals the model on
    that row alone, exited before layer 2 where the row's gate fires and whole where it does not; the rows, reordered
    or run with all of them on one side, give the same. The PyTorch reference agrees."""
    spec, model, onnx_model = vlm
    inputs = spec.example_inputs(batch=batch, seed=int(np.random.default_rng().integers(1 << 30)))
    weight = np.random.default_rng(batch).standard_normal(model.norm.normalized_shape[0]).astype(np.float32)
    logits = gate_features(model, *inputs, 2).numpy().astype(np.float64) @ weight
    middle = float(np.sort(logits)[batch // 2 - 1: batch // 2 + 1].mean())   # half the rows above, half below
    gate = ExitGate(2, weight, -middle)
    fired = logits - middle > 0
    assert 0 < fired.sum() < batch
    dynamic, report = apply_dynamic_token_exit(onnx_model, gate, model.num_visual_tokens)
    assert report.gate["per_row"]
    got = _run(dynamic, _feeds(spec, inputs))
    with torch.no_grad():
        alone = np.concatenate([model(*(t[row:row + 1] for t in inputs), exit_layer=2 if fired[row] else None).numpy()
                                for row in range(batch)])
    np.testing.assert_allclose(got, alone, atol=ATOL, rtol=ATOL)
    expected, exited = dynamic_exit_forward(model, *inputs, gate)
    assert exited.tolist() == fired.tolist()
    np.testing.assert_allclose(expected.numpy(), alone, atol=ATOL, rtol=ATOL)
    # a graph deciding for the batch (an artefact of an attnc before per-row gates): no row exits unless all do
    whole, exited = dynamic_exit_forward(model, *inputs, gate, per_row=False)
    assert not exited.any()
    with torch.no_grad():
        np.testing.assert_allclose(whole.numpy(), model(*inputs).numpy(), atol=ATOL, rtol=ATOL)
    order = np.random.default_rng().permutation(batch)
    np.testing.assert_allclose(_run(dynamic, _feeds(spec, [t[order] for t in inputs])), alone[order], atol=ATOL,
                               rtol=ATOL)
    for side in (fired, ~fired):   # every row on one side: one branch alone
        rows = np.flatnonzero(side)
        np.testing.assert_allclose(_run(dynamic, _feeds(spec, [t[rows] for t in inputs])), alone[rows], atol=ATOL,
                                   rtol=ATOL)


def test_trained_gate_decision_matches_torch(vlm):
    spec, model, onnx_model = vlm
    calibration = spec.example_inputs(batch=64, seed=6)
    gate, stats = train_exit_gate(model, calibration, layer=2, min_precision=0.9)
    assert 0 <= stats["fire_rate"] <= 1
    # Centre the threshold on one test sample's logit +- margin so both decisions occur.
    dynamic_probe = spec.example_inputs(batch=1, seed=7)
    with torch.no_grad():
        logit = float((gate_features(model, *dynamic_probe, 2).numpy() @ gate.weight)[0] + gate.bias)
    for shift, fires in ((-1.0, True), (1.0, False)):
        probe_gate = ExitGate(2, gate.weight, gate.bias, threshold=float(1 / (1 + np.exp(-(logit + shift)))))
        dynamic, _ = apply_dynamic_token_exit(onnx_model, probe_gate, model.num_visual_tokens)
        expected, exited = dynamic_exit_forward(model, *dynamic_probe, probe_gate)
        assert exited.tolist() == [fires]
        np.testing.assert_allclose(_run(dynamic, _feeds(spec, dynamic_probe)), expected.numpy(), atol=ATOL, rtol=ATOL)


def test_bad_requests(vlm, tmp_path):
    _, model, onnx_model = vlm
    with pytest.raises(AttncError, match="exit_layer must be in"):
        apply_static_token_exit(onnx_model, 5, model.num_visual_tokens)
    with pytest.raises(AttncError, match="num_visual_tokens"):
        apply_static_token_exit(onnx_model, 1, 0)
    with pytest.raises(AttncError, match="gate layer"):
        apply_dynamic_token_exit(onnx_model, ExitGate(4, np.zeros(32, np.float32), 0.0), model.num_visual_tokens)
    vit = get_spec("vit-mhsa-small")
    path = tmp_path / "vit.onnx"
    export_onnx(vit.factory(), vit.example_inputs(), path, dynamic_axes=vit.dynamic_axes, input_names=vit.input_names)
    with pytest.raises(AttncError, match="integer text input"):
        apply_static_token_exit(onnx.load(str(path)), 1, 4)


def _tiny_llava(attention="eager"):
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                    num_key_value_heads=4, vocab_size=64, max_position_embeddings=128)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63,
                                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = attention   # eager: Softmax in the graph; sdpa: the default
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return transformers.LlavaForConditionalGeneration(config).eval()


class _LlavaLastToken(torch.nn.Module):
    """``(pixel_values, text ids) -> last-token logits`` with the 16 image tokens in front of the
    text: the sequence LLaVA's own merge builds for a prompt that starts with ``<image>``
    (checked against the HF forward below), without the data-dependent merge that neither
    exporter handles."""

    def __init__(self, llava, exit_layer=None):
        super().__init__()
        self.llava = llava
        self.exit_layer = exit_layer

    def forward(self, pixel_values, input_ids):
        model = self.llava.model
        features = model.get_image_features(pixel_values=pixel_values)
        features = getattr(features, "pooler_output", features)
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features)) if features[0].dim() == 2 else features[0]
        x = torch.cat([features, model.get_input_embeddings()(input_ids)], 1)
        if self.exit_layer is None:
            return self.llava.lm_head(model.language_model(inputs_embeds=x, use_cache=False).last_hidden_state[:, -1])
        # Reference exit: run the Llama layers by hand, dropping the image tokens (and their
        # rotary / mask entries) before layer ``exit_layer``.
        lm = model.language_model
        positions = torch.arange(x.shape[1])[None]
        cos, sin = lm.rotary_emb(x, positions)
        mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)[None, None]
        p = features.shape[1]
        for i, layer in enumerate(lm.layers):
            if i == self.exit_layer:
                x, cos, sin, mask = x[:, p:], cos[:, p:], sin[:, p:], mask[..., p:, p:]
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=(cos, sin))
            x = x[0] if isinstance(x, tuple) else x
        return self.llava.lm_head(lm.norm(x)[:, -1])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_static_exit_on_hf_llava(tmp_path, attention):
    llava = _tiny_llava(attention)
    pixels, ids = torch.randn(1, 3, 32, 32), torch.randint(1, 60, (1, 7))
    wrapper = _LlavaLastToken(llava)
    with torch.no_grad():
        hf = llava(input_ids=torch.cat([torch.full((1, 16), 63), ids], 1), pixel_values=pixels,
                   use_cache=False).logits[:, -1]
        np.testing.assert_allclose(wrapper(pixels, ids).numpy(), hf.numpy(), atol=1e-6)
    # Static shapes: both exporters fail on HF LLaVA with dynamic axes (see docs/shrink.md).
    export_onnx(wrapper, (pixels, ids), tmp_path / "llava.onnx", input_names=["pixel_values", "input_ids"])
    onnx_model = onnx.load(str(tmp_path / "llava.onnx"))
    assert len(decoder_boundaries(onnx_model)) == 4          # RMSNorm pre-norms, CLIP layers excluded
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
    with torch.no_grad():
        full = _LlavaLastToken(llava, 4)(pixels, ids).numpy()
        np.testing.assert_allclose(full, hf.numpy(), atol=1e-5)
    for k in (0, 1, 3):
        exited, _ = apply_static_token_exit(onnx_model, k, 16)
        with torch.no_grad():
            expected = _LlavaLastToken(llava, k)(pixels, ids).numpy()
        assert np.abs(expected - full).max() > 1e-4            # the exit does change the answer
        np.testing.assert_allclose(_run(exited, feeds), expected, atol=ATOL, rtol=ATOL)


def test_pipeline_entry_point(vlm):
    from attnc.passes import token_exit as pass_module

    spec, model, onnx_model = vlm
    calibration = [_feeds(spec, spec.example_inputs(batch=4, seed=8))]
    _, report = pass_module.apply(onnx_model, "static", model.num_visual_tokens, calibration_feeds=calibration)
    assert report.mode == "static" and 0 <= report.exit_layer <= 4
    with pytest.raises(AttncError, match="needs an exit layer"):
        pass_module.apply(onnx_model, "static", model.num_visual_tokens)
    with pytest.raises(AttncError, match="trained gate"):
        pass_module.apply(onnx_model, "dynamic", model.num_visual_tokens)
    with pytest.raises(AttncError, match="unknown token-exit mode"):
        pass_module.apply(onnx_model, "sometimes", model.num_visual_tokens)


def test_vqa_model_with_more_visual_tokens(tmp_path):
    """The benchmark's LLaVA-like proportions: 64 px images give 64 visual tokens in front of 3 text
    tokens; the training data follows the image size, and the static exit equals torch's."""
    from attnc.models.train import train_vqa_vlm

    model, train, test = train_vqa_vlm(n_train=64, n_test=8, epochs=1, img_size=64, dim=32, depth=2)
    assert model.num_visual_tokens == 64
    assert tuple(train.inputs[0].shape[1:]) == (3, 64, 64) and tuple(test.inputs[0].shape[1:]) == (3, 64, 64)
    path = tmp_path / "vlm64.onnx"
    export_onnx(model, tuple(x[:2] for x in train.inputs), path, input_names=["image", "text_ids"],
                dynamic_axes={"image": {0: "batch"}, "text_ids": {0: "batch", 1: "text_len"}})
    exited, _ = apply_static_token_exit(onnx.load(str(path)), 1, model.num_visual_tokens)
    with torch.no_grad():
        expected = model(*test.inputs, exit_layer=1).numpy()
    got = _run(exited, {"image": test.inputs[0].numpy(), "text_ids": test.inputs[1].numpy()})
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=ATOL)
