"""Vision-language checkpoints (models/hf_vision_language.py): a LLaVA checkpoint directory (and those of the seven
other architectures attnc lays out) loads as ``(pixel_values, input_ids) -> logits of the text after the image``,
equal to transformers' own forward on a prompt with the image's placeholder tokens in front of the text or after its
first tokens; its visual-token exit equals a hand-written loop over the Llama layers that drops the image's tokens
(and their rotary and mask entries); it exports with both exporters at dynamic batch and text length, records its
visual tokens and the text in front of them, and ``attnc compile --token-exit`` (static and dynamic, with head
pruning on top) gives artefacts that ``attnc validate`` checks against the checkpoint shrunk alike in PyTorch.

References: transformers' forward (loaded apart from attnc) and the hand loop, on fresh random inputs at odd sizes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import IMAGE_SIZE, VISUAL_OFFSET, VISUAL_TOKENS, metadata, ort_session
from attnc.testing import (assert_clean_error, build_exited_engine, exited_greedy_tokens, hf_pixels,
                           image_token_types, llama_layers_by_hand, run_cli, run_model, save_seeded, shape_profile,
                           tensorrt_or_skip, tiny_llama, tiny_llava, tiny_vision_language)

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.backends.onnxruntime import load as load_onnx  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.compiler.pipeline import CompileOptions, compile_model, validate_artefact  # noqa: E402
from attnc.models.hf_checkpoint import (exited_spec, load_checkpoint, with_attention_mask,  # noqa: E402
                                        with_first_step, with_past, with_text_before_image)
from attnc.models.hf_vision_language import ARCHITECTURES  # noqa: E402
from attnc.passes import token_exit  # noqa: E402
from attnc.passes.token_exit import (ExitGate, apply_dynamic_token_exit, apply_static_token_exit,  # noqa: E402
                                     decoder_boundaries, dynamic_exit_forward, gate_features, train_exit_gate)

IMAGE_TOKEN, LAYERS = 63, 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The grouped-query LLaVA (4 query on 2 K/V heads), its module and spec, and its dynamo export."""
    folder = tiny_llava(tmp_path_factory.mktemp("llava") / "ckpt")
    module, spec = load_checkpoint(str(folder))
    path = folder.parent / "llava.onnx"
    run_cli("export", folder, "-o", path)
    return folder, module, spec, path


@pytest.fixture(scope="module")
def offset_export(checkpoint, tmp_path_factory):
    """``attnc export --text-before-image 3`` of the checkpoint (dynamo, dynamic batch and text): one export for the
    tests that read, compile or validate it."""
    path = tmp_path_factory.mktemp("offset3") / "llava.onnx"
    run_cli("export", checkpoint[0], "-o", path, "--text-before-image", 3)
    return path


def _transformers_logits(folder, pixels, ids, p, before=0):
    """transformers' forward on ``[ids[:, :before]; <image> × p; ids[:, before:]]``: the logits at the text after the
    image."""
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    prompt = torch.cat([ids[:, :before], torch.full((ids.shape[0], p), IMAGE_TOKEN), ids[:, before:]], 1)
    with torch.no_grad():
        return hf(input_ids=prompt, pixel_values=pixels).logits[:, before + p:].numpy()


def _hand_exit(module, pixels, ids, k, before=0):
    """The Llama layers run by hand, the image's tokens (and their rotary and mask entries) dropped before layer
    ``k``: written apart from the hooks ``VisionLanguageOutput`` drops them with (numpy index lists)."""
    inner, lm = module.model.model, module.model.model.language_model
    with torch.no_grad():
        out = inner.vision_tower(pixels, output_hidden_states=True)
        visual = inner.multi_modal_projector(out.hidden_states[-1][:, 1:])
        p = visual.shape[1]
        text = inner.get_input_embeddings()(ids)
        x = torch.cat([text[:, :before], visual, text[:, before:]], 1)
        x = llama_layers_by_hand(lm, x, torch.from_numpy(np.r_[0:before, before + p:x.shape[1]]), k)
        return module.model.lm_head(x[:, before:] if k < len(lm.layers) else x[:, before + p:]).numpy()


@pytest.mark.parametrize("strategy,layer,before", [("default", -1, 0), ("full", -2, 0), ("default", [-2, -1], 0),
                                                   ("default", -1, 3)])
def test_matches_the_transformers_forward(tmp_path, strategy, layer, before):
    """The image's tokens (CLS dropped or kept, one feature layer or two concatenated) in front of the text, or after
    its first 3 tokens, give transformers' logits at the text after the image, at several batch sizes and text
    lengths."""
    folder = tiny_llava(tmp_path / "ckpt", kv_heads=None, strategy=strategy, feature_layer=layer)
    module, spec = load_checkpoint(str(folder))
    assert spec.input_names == ["pixel_values", "input_ids"] and spec.kind == "vlm"
    if before:
        module, spec = with_text_before_image(module, spec, before)
        assert spec.sizes["seq"] == 16 + before and module.visual_offset == before
    p = 16 + (strategy == "full")
    assert module.num_visual_tokens == p
    for batch, seq in ((1, 5), (3, 9)):
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=batch)
        assert ids.shape == (batch, seq) and int(ids.max()) < IMAGE_TOKEN   # no image token among the words
        with torch.no_grad():
            got = module(pixels, ids).numpy()
        assert got.shape == (batch, seq - before, 64)
        np.testing.assert_allclose(got, _transformers_logits(folder, pixels, ids, p, before), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        module(pixels, ids[:, :before])


OTHERS = [a for a in ARCHITECTURES if a != "LlavaForConditionalGeneration"]
# the other architectures whose export CI checks: their language models' masks differ from LLaVA's (Gemma 3's image
# block, PaliGemma's prefix), attnc computes their image features (Idefics 3) or they pixel-shuffle them (InternVL).
# The rest put a tower and a projector in front of a Llama-like decoder, as LLaVA does: CI checks their forward and
# exit in PyTorch, the full tier their exports (about 15 s each)
EXPORTED_IN_CI = ("Gemma3ForConditionalGeneration", "PaliGemmaForConditionalGeneration",
                  "Idefics3ForConditionalGeneration", "InternVLForConditionalGeneration")
_LIKE_LLAVA = ("the export path CI checks on LLaVA and the architectures of EXPORTED_IN_CI; this one's forward and "
               "exit CI checks in PyTorch (about 15 s)")


def _other(tmp_path, architecture):
    """The tiny checkpoint of ``architecture`` with its image after 2 text tokens: folder, module, spec."""
    folder = tiny_vision_language(tmp_path / "ckpt", architecture)
    return folder, *with_text_before_image(*load_checkpoint(str(folder)), 2)


@pytest.mark.parametrize("architecture", OTHERS)
def test_other_architectures(tmp_path, architecture):
    """Each other architecture attnc lays out, with the image after 2 text tokens: transformers' logits at the text
    after the image; exited before decoder layer 1, other logits."""
    folder, module, spec = _other(tmp_path, architecture)
    assert module.num_visual_tokens == 16
    pixels, ids = spec.example_inputs(batch=2, seq=7, seed=int(np.random.default_rng().integers(1 << 16)))
    hf = getattr(transformers, architecture).from_pretrained(folder).eval()
    prompt = torch.cat([ids[:, :2], torch.full((2, 16), 120), ids[:, 2:]], 1)
    with torch.no_grad():
        types = image_token_types(architecture, prompt, 120)   # Gemma 3's, PaliGemma's
        expected = hf(input_ids=prompt, pixel_values=hf_pixels(architecture, pixels), **types).logits[:, 18:]
        np.testing.assert_allclose(module(pixels, ids).numpy(), expected, atol=2e-6, rtol=1e-5)
        assert np.abs(module(pixels, ids, exit_layer=1).numpy() - expected.numpy()).max() > 1e-3


@pytest.fixture(scope="module")
def gemma3_export(tmp_path_factory):
    """Gemma 3's tiny checkpoint with its image after 2 text tokens and its dynamo export through the CLI (which
    records them), shared by its export test and its TensorRT-RTX build: folder, module, spec, path."""
    tmp = tmp_path_factory.mktemp("gemma3")
    folder, module, spec = _other(tmp, "Gemma3ForConditionalGeneration")
    run_cli("export", folder, "-o", tmp / "gemma3.onnx", "--text-before-image", 2)
    return folder, module, spec, tmp / "gemma3.onnx"


@pytest.mark.parametrize("architecture", [a if a in EXPORTED_IN_CI else pytest.param(
    a, marks=pytest.mark.full(reason=_LIKE_LLAVA)) for a in OTHERS])
def test_other_architectures_export(tmp_path, request, architecture):
    """Each other architecture's dynamo export at another batch size and text length, compiled (its attention fused)
    as the module computes, and exited before decoder layer 1 as the module exits there (every decoder layer found,
    none of the vision tower's)."""
    if architecture == "Gemma3ForConditionalGeneration":   # the export its TensorRT-RTX build takes too
        folder, module, spec, path = request.getfixturevalue("gemma3_export")
    else:
        folder, module, spec = _other(tmp_path, architecture)
        path = tmp_path / "model.onnx"
        export_onnx(module, spec.example_inputs(), path, input_names=spec.input_names, dynamic_axes=spec.dynamic_axes)
    model = onnx.load(str(path))
    assert len(decoder_boundaries(model)) == len(module.decoder_layers)
    pixels, ids = spec.example_inputs(batch=3, seq=11, seed=2)
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
    with torch.no_grad():
        full = module(pixels, ids).numpy()
        expected = module(pixels, ids, exit_layer=1).numpy()
    assert np.abs(expected - full).max() > 1e-3
    np.testing.assert_allclose(run_model(apply_static_token_exit(model, 1, 16, 2)[0], feeds), expected, atol=1e-5,
                               rtol=1e-4)
    compile_model(path, tmp_path / "out")
    np.testing.assert_allclose(runtime.load(tmp_path / "out").infer(feeds)["output"], full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("before", [0, 3])
def test_exit_layer_drops_the_visual_tokens(checkpoint, before):
    """``forward(..., exit_layer=k)`` equals the hand loop at every k, with the image first or after 3 text tokens;
    exiting changes the logits (before the last layer) and exiting after the last layer changes nothing."""
    _, module, spec, _ = checkpoint
    module, spec = with_text_before_image(module, spec, before)
    pixels, ids = spec.example_inputs(batch=3, seq=7 + before, seed=5)
    with torch.no_grad():
        full = module(pixels, ids).numpy()
        for k in range(LAYERS + 1):
            got = module(pixels, ids, exit_layer=k).numpy()
            np.testing.assert_allclose(got, _hand_exit(module, pixels, ids, k, before), atol=2e-6, rtol=1e-5)
            assert (np.abs(got - full).max() > 1e-3) == (k < LAYERS)
        with pytest.raises(ValueError, match="exit_layer"):
            module(pixels, ids, exit_layer=LAYERS + 1)


def test_exit_keeps_the_shapes_behind_it(checkpoint):
    """A static exit keeps the shapes of the tensors behind it with the image's 16 tokens taken out of their token
    axes (``seq + 16`` -> ``seq``; none is left at ``seq + 16``), which shape inference then carries on; a dim it cannot
    rewrite for certain (a sum with another constant, a name the exporter made up) makes it forget the shape, as
    before, and so does a static token axis (a static export: which static dims behind it counted the image is
    unknown)."""
    from attnc.passes.core import name_nodes, value_shapes
    from attnc.passes.token_exit import _downstream, _text_dims

    model = onnx.load(str(checkpoint[3]))
    name_nodes(model)
    behind = {o for n in _downstream(model, decoder_boundaries(model)[2]) for o in n.output}
    declared = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in model.graph.value_info if v.name in behind}
    assert sum("seq + 16" in dims for dims in declared.values()) > 10   # the export names the token axis so
    exited = apply_static_token_exit(model, 2, 16)[0]
    kept = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in exited.graph.value_info if v.name in behind}
    assert sum("seq" in dims for dims in kept.values()) > 10
    assert not any("seq + 16" in dims for dims in kept.values())
    shapes = value_shapes(exited)
    assert shapes[exited.graph.output[0].name][1] == "seq"   # the logits of the text after the image
    for dims, holds, after in ((["batch", "seq + 16", 32], True, ["batch", "seq", 32]), (["batch", 8], True, None),
                               (["batch", "seq + 17"], False, None), (["batch", "unk__3"], False, None),
                               (["batch", "16"], False, None), (["batch", "seq + 16 + 16"], False, None)):
        value = onnx.helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, dims)
        assert _text_dims(value, {"batch", "seq"}, 16) == holds, dims
        if after:
            assert [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim] == after
    static = onnx.load(str(checkpoint[3]))   # the same graph with its dims made static: no shape behind the exit stays
    for info in (*static.graph.input, *static.graph.value_info, *static.graph.output):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_value = {"batch": 1, "seq": 6}.get(dim.dim_param, 0) or \
                    sum(int(t) if t.isdigit() else {"batch": 1, "seq": 6}[t] for t in dim.dim_param.split(" + "))
    name_nodes(static)
    exited = apply_static_token_exit(static, 2, 16)[0]
    assert not {v.name for v in exited.graph.value_info} & behind


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_runs_and_exits_at_any_size(checkpoint, tmp_path, exporter):
    """Both exporters (TorchScript on plain multi-head attention: it cannot export SDPA with grouped K/V heads):
    the graph at other batch sizes and text lengths equals the module; it records its 16 visual tokens; its decoder
    layers are the Llama's four, not the vision tower's; the static exit before each layer equals the module's."""
    if exporter == "dynamo":
        folder, module, spec, path = checkpoint
    else:
        folder = tiny_llava(tmp_path / "ckpt", kv_heads=None)
        module, spec = load_checkpoint(str(folder))
        path = tmp_path / "llava.onnx"
        run_cli("export", folder, "-o", path, "--exporter", exporter)
    model = onnx.load(str(path))
    assert metadata(model, VISUAL_TOKENS) == "16"
    assert len(decoder_boundaries(model)) == LAYERS
    exits = {k: apply_static_token_exit(model, k, 16)[0] for k in (0, 2, 3)}
    for batch, seq in ((3, 5), (1, 11)):
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=seq)
        feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
        with torch.no_grad():
            np.testing.assert_allclose(run_model(model, feeds), module(pixels, ids).numpy(), atol=1e-5, rtol=1e-4)
            for k, exited in exits.items():
                np.testing.assert_allclose(run_model(exited, feeds), module(pixels, ids, exit_layer=k).numpy(),
                                           atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("exporter,dynamic", [("dynamo", True), ("torchscript", False)])
def test_text_before_the_image(checkpoint, request, tmp_path, exporter, dynamic):
    """The image after 3 text tokens: ``attnc export --text-before-image 3`` records the offset (dynamo, dynamic
    batch and text) and a static-shape TorchScript export of the same module behaves alike (its masks and tables are
    constants there); both exits keep the text in front of the image and drop the image's tokens only: the static
    exit before each layer and the gate's two branches equal the module."""
    folder, module, spec, _ = checkpoint
    if exporter == "torchscript":
        folder = tiny_llava(tmp_path / "mha", kv_heads=None)
        module, spec = load_checkpoint(str(folder))
    module, spec = with_text_before_image(module, spec, 3)
    path = tmp_path / "llava.onnx"
    if dynamic:   # the offset_export fixture's ``attnc export --text-before-image 3``
        path = request.getfixturevalue("offset_export")
        sizes = ((3, 8), (1, 12))
    else:
        from attnc.compiler.export import export_onnx

        export_onnx(module, spec.example_inputs(batch=2, seq=9), path, exporter=exporter,
                    input_names=spec.input_names)
        sizes = ((2, 9),)
    model = onnx.load(str(path))
    assert (metadata(model, VISUAL_TOKENS), metadata(model, VISUAL_OFFSET)) == ("16", "3")
    exits = {k: apply_static_token_exit(model, k, 16, 3)[0] for k in (0, 2, 3)}
    gates = {bias > 0: apply_dynamic_token_exit(model, ExitGate(1, np.zeros(32, np.float32), bias), 16, 3)[0]
             for bias in (40.0, -40.0)}
    for batch, seq in sizes:
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=seq)
        feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
        with torch.no_grad():
            full = module(pixels, ids).numpy()
            np.testing.assert_allclose(run_model(model, feeds), full, atol=1e-5, rtol=1e-4)
            for k, exited in exits.items():
                expected = module(pixels, ids, exit_layer=k).numpy()
                assert expected.shape == (batch, seq - 3, 64) and np.abs(expected - full).max() > 1e-3
                np.testing.assert_allclose(run_model(exited, feeds), expected, atol=1e-5, rtol=1e-4)
            for fires, gated in gates.items():
                expected = module(pixels, ids, exit_layer=1 if fires else None)
                np.testing.assert_allclose(run_model(gated, feeds), expected, atol=1e-5, rtol=1e-4)


def test_compile_with_token_exit_validates(checkpoint, tmp_path):
    """``attnc compile --token-exit static`` takes the recorded visual tokens; ``attnc validate`` passes against the
    checkpoint exiting at the same layer (with head pruning on top too) and fails when the manifest names another
    layer; a --visual-tokens that contradicts the record is refused."""
    folder, module, spec, path = checkpoint
    for extra in ((), ("--prune-heads", "0.25")):
        out = tmp_path / f"exit{len(extra)}"
        run_cli("compile", path, "-o", out, "--token-exit", "static", "--exit-layer", 2, *extra)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["shrink"]["token_exit"]["num_visual_tokens"] == 16
        run_cli("validate", out, "--model", folder, "--seed", 3)
        report = json.loads((out / "report.json").read_text())
        assert "visual tokens dropped before decoder layer 2" in report["meta"]["reference"]
        assert ("gated to zero" in report["meta"]["reference"]) == bool(extra)
        assert report["shrink_cost"][0]["max_abs_error"] > 1e-3
    manifest["shrink"]["token_exit"]["exit_layer"] = 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("validate", out, "--model", folder, ok=False).exit_code == 1
    result = run_cli("compile", path, "-o", tmp_path / "bad", "--token-exit", "static", "--exit-layer", 2,
                     "--visual-tokens", 5, ok=False)
    assert_clean_error(result, "--visual-tokens 5 contradicts the 16", "--visual-tokens 16")
    assert not (tmp_path / "bad").exists()


def test_validate_rebuilds_the_text_before_the_image(checkpoint, offset_export, tmp_path):
    """An export with ``--text-before-image 3``: inspect shows what it recorded and the decoder layers an exit may
    precede; compile takes the recorded offset (a contradicting one is refused),
    the manifest keeps it, and validate rebuilds the checkpoint with the image after 3 tokens: it passes, exited or
    not, and fails when the manifest's record is taken away (the checkpoint then puts the image first)."""
    folder, path = checkpoint[0], offset_export
    inspected = json.loads(run_cli("inspect", path, "--json").output)
    assert inspected["recorded"] == {VISUAL_TOKENS: "16", VISUAL_OFFSET: "3", IMAGE_SIZE: "32x32"}
    assert inspected["decoder_layers"] == LAYERS
    assert "16 visual tokens of a 32x32 image after 3 text tokens" in run_cli("inspect", path).output
    for extra in ((), ("--token-exit", "static", "--exit-layer", 2)):
        out = tmp_path / f"out{len(extra)}"
        run_cli("compile", path, "-o", out, *extra)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["recorded"] == {VISUAL_TOKENS: "16", VISUAL_OFFSET: "3", IMAGE_SIZE: "32x32"}
        run_cli("validate", out, "--model", folder)
    assert manifest["shrink"]["token_exit"]["visual_offset"] == 3
    del manifest["recorded"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("validate", out, "--model", folder, ok=False).exit_code == 1
    result = run_cli("compile", path, "-o", tmp_path / "bad", "--token-exit", "static", "--exit-layer", 2,
                     "--text-before-image", 2, ok=False)
    assert_clean_error(result, "--text-before-image 2 contradicts the 3", "--text-before-image 3")


def test_dynamic_exit_gate(checkpoint, tmp_path):
    """A gate trained on the checkpoint (``train_exit_gate``) reads what the graph's gate reads; a gate that fires
    and one that does not each validate against the checkpoint exiting as the gate says."""
    folder, module, spec, path = checkpoint
    pixels, ids = spec.example_inputs(batch=16, seq=6, seed=7)
    gate, stats = train_exit_gate(module, (pixels, ids), 1, steps=20)
    assert stats["samples"] == 16 and gate.weight.shape == (32,)
    model = onnx.load(str(path))
    pixels, ids = spec.example_inputs(batch=1, seq=9, seed=8)
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
    for bias in (40.0, -40.0):
        fixed = ExitGate(1, gate.weight, bias)
        logits, exited = dynamic_exit_forward(module, pixels, ids, fixed)
        assert exited.tolist() == [bias > 0]
        with torch.no_grad():
            np.testing.assert_allclose(logits.numpy(), module(pixels, ids, exit_layer=1 if bias > 0 else None).numpy())
        np.testing.assert_allclose(run_model(apply_dynamic_token_exit(model, fixed, 16)[0], feeds), logits.numpy(),
                                   atol=1e-5, rtol=1e-4)
        fixed.save(tmp_path / "gate.npz")
        out = tmp_path / f"dynamic{int(bias > 0)}"
        run_cli("compile", path, "-o", out, "--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz")
        run_cli("validate", out, "--model", folder)


def test_a_gate_splitting_the_batch(checkpoint, tmp_path):
    """A gate that fires for some rows of a batch of fresh prompts and not for others: each row's logits in ONNX
    Runtime equal the checkpoint's on that prompt alone, exited before layer 1 where its gate fires; the compiled
    artefact validates against the PyTorch reference, which picks each row's branch alike."""
    folder, module, spec, path = checkpoint
    pixels, ids = spec.example_inputs(batch=4, seq=9, seed=int(np.random.default_rng().integers(1 << 30)))
    weight = np.random.default_rng(1).standard_normal(32).astype(np.float32)
    logits = gate_features(module, pixels, ids, 1).numpy().astype(np.float64) @ weight
    middle = float(np.sort(logits)[1:3].mean())
    gate = ExitGate(1, weight, -middle)
    fired = logits > middle
    assert fired.sum() == 2
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
    got = run_model(apply_dynamic_token_exit(onnx.load(str(path)), gate, 16)[0], feeds)
    with torch.no_grad():
        for row in range(4):
            alone = module(pixels[row:row + 1], ids[row:row + 1], exit_layer=1 if fired[row] else None).numpy()
            np.testing.assert_allclose(got[row:row + 1], alone, atol=1e-5, rtol=1e-4)
    expected, exited = dynamic_exit_forward(module, pixels, ids, gate)
    assert exited.tolist() == fired.tolist()
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=1e-4)
    gate.save(tmp_path / "gate.npz")
    run_cli("compile", path, "-o", tmp_path / "out", "--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["shrink"]["token_exit"]["gate"]["per_row"]
    assert "PASS" in run_cli("validate", tmp_path / "out", "--model", folder).output
    np.savez(tmp_path / "split.npz", pixel_values=pixels.numpy(), input_ids=ids.numpy())   # the batch the gate splits
    assert "PASS" in run_cli("validate", tmp_path / "out", "--model", folder, "--inputs", tmp_path / "split.npz").output
    del manifest["shrink"]["token_exit"]["gate"]["per_row"]   # as an artefact of an attnc before per-row gates says
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("validate", tmp_path / "out", "--model", folder, "--inputs", tmp_path / "split.npz", ok=False)
    assert result.exit_code == 1   # the reference then decides for the batch, which this graph does not


def test_refusals(checkpoint, tmp_path):
    """--text-before-image for other checkpoints and vision-language architectures attnc does not lay out are refused
    with the way out, before anything is written."""
    folder = checkpoint[0]
    result = run_cli("export", tiny_llama(tmp_path / "lm"), "-o", tmp_path / "x.onnx", "--text-before-image", 2,
                     ok=False)
    assert_clean_error(result, "no vision-language checkpoint", "--text-before-image")
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "next"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "ovis2",   # visual embeddings of its own
                                                   "architectures": ["Ovis2ForConditionalGeneration"]}))
    (other / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(AttncError, match="does not export yet") as err:
        load_checkpoint(str(other))
    assert "MODULE:FACTORY" in err.value.fix


@pytest.mark.parametrize("before", [0, 3])
def test_padded_prompts(checkpoint, before):
    """``--with-attention-mask``: prompts of different lengths in one batch, each padded after the ``K`` tokens in
    front of the image. Each row's logits at its tokens equal transformers' forward on that prompt alone, and with
    the image gone before layer 2 the exited forward's on it alone; the example rows are padded after ``K``. What a
    DyVTE gate reads of each row (the mean of its text tokens entering layer 2) is what it reads of the prompt alone:
    the padding is left out."""
    folder, module, spec, _ = checkpoint
    module, spec = with_text_before_image(module, spec, before)
    masked, masked_spec = with_attention_mask(module, spec)
    assert masked_spec.input_names == ["pixel_values", "input_ids", "attention_mask"]
    pixels, ids, mask = masked_spec.example_inputs(batch=3, seq=before + 7, seed=13)
    assert (mask[:, :before] == 1).all() and mask.sum(1).tolist() == [before + 7 - n for n in (0, 2, 4)]
    with torch.no_grad():
        logits, exited = masked(pixels, ids, mask).numpy(), masked(pixels, ids, mask, exit_layer=2).numpy()
        features = token_exit.exit_run(masked, pixels, ids, 2, lambda f: False, mask)[1]
        for row in range(3):
            tokens = ids[row][mask[row].bool()][None]
            n = tokens.shape[1] - before
            alone = _transformers_logits(folder, pixels[row:row + 1], tokens, 16, before)
            np.testing.assert_allclose(logits[row, -n:], alone[0], atol=2e-6, rtol=1e-5)
            alone = module(pixels[row:row + 1], tokens, exit_layer=2).numpy()
            np.testing.assert_allclose(exited[row, -n:], alone[0], atol=2e-6, rtol=1e-5)
            alone = gate_features(module, pixels[row:row + 1], tokens, 2)
            np.testing.assert_allclose(features[row].numpy(), alone[0].numpy(), atol=2e-6, rtol=1e-5)
    assert not torch.allclose(features[1:], token_exit.exit_run(masked, pixels, ids, 2, lambda f: False)[1][1:],
                              atol=1e-3)   # read without their mask the padded rows differ: the rows test it


def _llava_mistral(folder):
    """A seeded LLaVA whose text model is a 4-layer Mistral sliding every layer's window of 8 tokens (no
    ``layer_types``: Mistral's ``sliding_window`` applies to all), CLIP's 16 tokens, 64 words, the image token 63."""
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32)
    text = transformers.MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
                                      sliding_window=8)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)
    return save_seeded(config, "LlavaForConditionalGeneration", folder), 63


@pytest.mark.parametrize("architecture", ["Gemma3ForConditionalGeneration", "llava-mistral"])
def test_padded_prompts_keep_their_windows(tmp_path, architecture):
    """Padded prompts of a model with sliding windows of 8 tokens: Gemma 3 (in layers 0 and 2; its image's tokens
    attending to each other both ways) and a LLaVA on Mistral (in every layer, named by ``sliding_window`` alone).
    The padding lies between image and text, so a window of 8 *tokens* would reach less of a padded row's text than
    the prompt alone sees. Each row's one-pass logits, and those of a later step of 3 new tokens on its padded first
    step's cache, equal transformers' forward of that prompt alone (with Gemma 3's ``token_type_ids``; no cache)."""
    if architecture == "llava-mistral":
        folder, image = _llava_mistral(tmp_path / "ckpt")
    else:
        folder, image = tiny_vision_language(tmp_path / "ckpt", architecture), 120
    module, spec = with_attention_mask(*with_text_before_image(*load_checkpoint(str(folder)), 2))
    (first, _), (step, _) = with_first_step(module, spec), with_past(module, spec)
    hf = module.model
    pixels, ids, mask = spec.example_inputs(batch=3, seq=11, seed=int(np.random.default_rng().integers(1 << 16)))
    new = torch.randint(3, image, (3, 3))
    with torch.no_grad():
        logits = module(pixels, ids, mask)
        caches = first(pixels, ids, mask)[1:]
        later = step(new, torch.cat([mask[:, :2], torch.ones(3, 16, dtype=mask.dtype), mask[:, 2:],
                                     torch.ones_like(new)], 1), *caches)[0]
        for row in range(3):
            tokens = torch.cat([ids[row][mask[row].bool()][None], new[row:row + 1]], 1)
            prompt = torch.cat([tokens[:, :2], torch.full((1, 16), image), tokens[:, 2:]], 1)
            alone = hf(input_ids=prompt, pixel_values=pixels[row:row + 1],
                       **image_token_types(type(hf).__name__, prompt, image)).logits[0, 18:]
            n = tokens.shape[1] - 5   # the prompt's text after the image
            np.testing.assert_allclose(logits[row, -n:].numpy(), alone[:n].numpy(), atol=2e-6, rtol=1e-5)
            np.testing.assert_allclose(later[row].numpy(), alone[n:].numpy(), atol=2e-6, rtol=1e-5)


def test_padded_prompts_through_the_cli(checkpoint, generation_graphs, tmp_path):
    """Padded prompts through the CLI (the image after 3 text tokens): both generation graphs, as they are and exited
    before layer 2, compile (the exited pair validates against the checkpoint exiting alike); greedy and beam-search
    tokens of a padded batch equal transformers' ``generate`` on each prompt alone (with the exit, greedy: a loop over
    the exited forward on each prompt alone).
    A gate in the padded first step reads each prompt's own tokens (its logits those of the prompts alone): one that
    fires for every row, barely, validates and generates the exited tokens; one that barely does not keeps the
    image. Padded prompts for a first step without a mask, and a mask that is not over the text, are refused."""
    folder, module, spec, _ = checkpoint
    module, spec = with_text_before_image(module, spec, 3)
    options = ("--with-attention-mask", "--text-before-image", 3)
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *options)
        for tag, exit_options in (("", ()), ("_exit", ("--token-exit", "static", "--exit-layer", 2))):
            run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / f"{name}{tag}", *exit_options)
        # the plain pair's tokens are checked against transformers' below
        assert "PASS" in run_cli("validate", tmp_path / f"{name}_exit", "--model", folder).output
    masked_spec = with_attention_mask(module, spec)[1]
    pixels, ids, mask = masked_spec.example_inputs(batch=3, seq=9, seed=14)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    for tag, exit_layer in (("", None), ("_exit", 2)):
        got = runtime.generate_vision_language(runtime.load(tmp_path / f"first{tag}"),
                                               runtime.load(tmp_path / f"step{tag}"), pixels.numpy(), ids.numpy(),
                                               mask.numpy(), max_new_tokens=5)
        for row in range(3):
            tokens = ids[row][mask[row].bool()][None]
            with torch.no_grad():
                if exit_layer is None:
                    prompt = torch.cat([tokens[:, :3], torch.full((1, 16), IMAGE_TOKEN), tokens[:, 3:]], 1)
                    expected = hf.generate(input_ids=prompt, pixel_values=pixels[row:row + 1], max_new_tokens=5,
                                           min_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(prompt))
                    expected = expected[0, prompt.shape[1]:]
                else:
                    loop = tokens
                    for _ in range(5):
                        chosen = module(pixels[row:row + 1], loop, exit_layer=2)[:, -1].argmax(-1, keepdim=True)
                        loop = torch.cat([loop, chosen], 1)
                    expected = loop[0, tokens.shape[1]:]
            np.testing.assert_array_equal(got[row, 9:], expected.numpy())
        if exit_layer is not None:
            exited_tokens = got
    # a gate in the first step: each row's logit that of its prompt alone, the padding left out
    with torch.no_grad():
        alone = torch.cat([gate_features(module, pixels[row:row + 1], ids[row][mask[row].bool()][None], 2)
                           for row in range(3)]).double().numpy()
    weight = np.random.default_rng().standard_normal(32)
    logits = alone @ weight
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    for margin in (0.05, -0.05):   # every row's logit just above 0 (fires), the lowest just below (does not)
        gate = ExitGate(2, weight.astype(np.float32), float(margin - logits.min()))
        gated = apply_dynamic_token_exit(onnx.load(tmp_path / "first.onnx"), gate, 16, 3)[0]
        gated.graph.output.extend([onnx.helper.make_empty_tensor_value_info("token_exit/gate2/logit")])
        session = ort_session(gated)
        out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
        np.testing.assert_allclose(out["token_exit/gate2/logit"][:, 0], logits + gate.bias, atol=1e-4)
        assert out["present.3.key"].shape[2] == 9 + (0 if margin > 0 else 16)
    gate.bias = float(0.05 - logits.min())
    gate.save(tmp_path / "gate.npz")
    run_cli("compile", tmp_path / "first.onnx", "-o", tmp_path / "gated", "--token-exit", "dynamic",
            "--exit-gate", tmp_path / "gate.npz")
    run_cli("validate", tmp_path / "gated", "--model", folder)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "gated"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=5,
                                           exit_step=runtime.load(tmp_path / "step_exit"))
    np.testing.assert_array_equal(got, exited_tokens)
    spread = onnx.load(tmp_path / "first.onnx")   # a mask declared over every token, the image's too
    spread.graph.input[2].type.tensor_type.shape.dim[1].dim_param = "seq + 16"
    with pytest.raises(AttncError, match="cannot average the text tokens of padded prompts") as err:
        apply_dynamic_token_exit(spread, gate, 16, 3)
    assert "--with-attention-mask" in err.value.fix
    # beam search over the padded batch: each row's beams are those transformers' search keeps for it alone
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=4, num_beams=3)
    for row in range(3):
        tokens = ids[row][mask[row].bool()][None]
        prompt = torch.cat([tokens[:, :3], torch.full((1, 16), IMAGE_TOKEN), tokens[:, 3:]], 1)
        with torch.no_grad():
            expected = hf.generate(input_ids=prompt, pixel_values=pixels[row:row + 1], max_new_tokens=4,
                                   min_new_tokens=4, do_sample=False, num_beams=3,
                                   attention_mask=torch.ones_like(prompt))
        np.testing.assert_array_equal(got[row, 9:], expected[0, prompt.shape[1]:].numpy())
    run_cli("compile", generation_graphs["first"], "-o", tmp_path / "unmasked")
    with pytest.raises(AttncError, match="takes no attention_mask") as err:
        runtime.generate_vision_language(runtime.load(tmp_path / "unmasked"), runtime.load(tmp_path / "step"),
                                         pixels.numpy(), ids.numpy(), mask.numpy())
    assert "--with-attention-mask" in err.value.fix


@pytest.mark.tensorrt
def test_tensorrt_builds_the_exited_gemma3(gemma3_export, tmp_path):
    """TensorRT-RTX builds an fp16 engine of Gemma 3's export (its image's tokens attending to each other both ways,
    sliding windows) with the image gone before layer 1, at dynamic batch and text length; every attention fused
    (the tower's 2 and the text model's 4)."""
    tensorrt_or_skip()
    path = gemma3_export[3]
    manifest = build_exited_engine(path, (3, 64, 64), 2, tmp_path / "engine", exit_layer=1)
    assert (tmp_path / "engine" / manifest["artefact"]).stat().st_size > 0
    assert manifest["shrink"]["token_exit"]["exit_layer"] == 1 and manifest["ops_after"]["Attention"] == 6


@pytest.mark.tensorrt
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_tensorrt_builds_the_exited_checkpoint(checkpoint, tmp_path, mode):
    """TensorRT-RTX builds fp16 engines of both exits at dynamic batch and text length (the static exit's shape
    vectors keep their head counts constant: a computed one made the parser reject grouped-query attention)."""
    tensorrt_or_skip()
    folder, module, spec, path = checkpoint
    ExitGate(1, np.zeros(32, np.float32), 1.0).save(tmp_path / "gate.npz")
    exit_options = ("--exit-layer", 2) if mode == "static" else ("--exit-gate", tmp_path / "gate.npz")
    batch = 4 if mode == "static" else 1   # the gate's If decides for the whole batch
    profile = shape_profile({"pixel_values": [(b, 3, 32, 32) for b in (1, batch, batch)],
                             "input_ids": [(1, 1), (batch, 16), (batch, 64)]})
    out = tmp_path / "engine"
    run_cli("compile", path, "-o", out, "--backend", "tensorrt", "--precision", "fp16", "--token-exit", mode,
            *exit_options, *profile)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / manifest["artefact"]).stat().st_size > 0
    assert manifest["shrink"]["token_exit"]["mode"] == mode and manifest["ops_after"]["Attention"] >= 3


@pytest.mark.tensorrt
def test_tensorrt_builds_the_gated_padded_checkpoint(checkpoint, tmp_path):
    """TensorRT-RTX builds an fp16 engine of a gated exit of padded prompts (the gate's mean over the tokens the mask
    keeps: Cast, Mul, ReduceSum, Max, Div in front of the If) at dynamic text length."""
    tensorrt_or_skip()
    folder = checkpoint[0]
    run_cli("export", folder, "-o", tmp_path / "masked.onnx", "--with-attention-mask")
    ExitGate(1, np.random.default_rng(0).standard_normal(32).astype(np.float32), 0.1).save(tmp_path / "gate.npz")
    texts = [(1, t) for t in (1, 16, 64)]   # batch 1: the gate's If decides for the whole batch
    profile = shape_profile({"pixel_values": [(1, 3, 32, 32)] * 3, "input_ids": texts, "attention_mask": texts})
    out = tmp_path / "engine"
    run_cli("compile", tmp_path / "masked.onnx", "-o", out, "--backend", "tensorrt", "--precision", "fp16",
            "--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz", *profile)
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["shrink"]["token_exit"]["mode"] == "dynamic"


@pytest.mark.tensorrt
def test_tensorrt_builds_the_exited_step(generation_graphs, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the later step exited before layer 2 (its caches of two lengths: the
    image's 16 tokens in layers 0-1, the text alone in layers 2-3), its profile from the first decoding step (1 text
    token after the image) to 64, given by named dim (``--dim-range``)."""
    from attnc.compiler.backends.tensorrt import describe

    tensorrt_or_skip()
    # by named dim: batch, new tokens, the cached text after the image (each layer's cache and the mask follow)
    profile = ("--dim-range", "batch=1:2:4", "--dim-range", "seq=1:1:8", "--dim-range", "past=1:16:64")
    out = tmp_path / "engine"
    run_cli("compile", generation_graphs["step"], "-o", out, "--backend", "tensorrt", "--precision", "fp16",
            "--token-exit", "static", "--exit-layer", 2, *profile)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["ops_after"]["Attention"] == LAYERS and manifest["shrink"]["token_exit"]["exit_layer"] == 2
    info = describe(out / manifest["artefact"])
    assert info["profiles"][0]["past_key_values.3.key"]["max"] == [4, 2, 66, 8]
    assert info["profiles"][0]["past_key_values.1.key"]["max"] == [4, 2, 82, 8]


def test_train_exit_gate_from_the_cli(checkpoint, offset_export, tmp_path):
    """``attnc train-exit-gate`` trains on a calibration .npz (with the image after 3 text tokens): its gate equals
    ``train_exit_gate``'s on the same inputs, and compiles into a dynamic exit that validates; a layer past the
    decoder, a file without the inputs and a model without visual tokens are refused by name."""
    folder, module, spec, _ = checkpoint
    module, spec = with_text_before_image(module, spec, 3)
    pixels, ids = spec.example_inputs(batch=12, seq=8, seed=4)
    np.savez(tmp_path / "calib.npz", pixel_values=pixels.numpy(), input_ids=ids.numpy())
    result = run_cli("train-exit-gate", folder, "-o", tmp_path / "gate.npz", "--layer", 1, "--calibration",
                     tmp_path / "calib.npz", "--text-before-image", 3, "--steps", 30)
    assert "exit gate before decoder layer 1" in result.output
    gate = ExitGate.load(tmp_path / "gate.npz")
    expected, stats = train_exit_gate(module, (pixels, ids), 1, steps=30)
    np.testing.assert_allclose(gate.weight, expected.weight, rtol=1e-5, atol=1e-7)
    assert gate.layer == 1 and stats["samples"] == 12
    run_cli("compile", offset_export, "-o", tmp_path / "out", "--token-exit", "dynamic", "--exit-gate",
            tmp_path / "gate.npz")
    run_cli("validate", tmp_path / "out", "--model", folder)
    for layer, calibration, words in ((LAYERS, "calib.npz", "exit layer must be in [0, 4)"),
                                      (1, "gate.npz", "lacks inputs ['pixel_values', 'input_ids']")):
        result = run_cli("train-exit-gate", folder, "-o", tmp_path / "bad.npz", "--layer", layer, "--calibration",
                         tmp_path / calibration, "--text-before-image", 3, ok=False)
        assert_clean_error(result, words)
    result = run_cli("train-exit-gate", "vit-mhsa-small", "-o", tmp_path / "bad.npz", "--layer", 0,
                     "--calibration", tmp_path / "calib.npz", ok=False)
    assert_clean_error(result, "cannot drop its visual tokens")
    assert not (tmp_path / "bad.npz").exists()


@pytest.fixture(scope="module")
def generation_graphs(checkpoint, tmp_path_factory):
    """The checkpoint's two generation graphs, the image after 2 text tokens: ``{"first": path, "step": path}``."""
    folder = checkpoint[0]
    out = tmp_path_factory.mktemp("generation")
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", out / f"{name}.onnx", option, "--text-before-image", 2)
    return {name: out / f"{name}.onnx" for name in ("first", "step")}


def test_generation_with_the_image(checkpoint, generation_graphs, tmp_path):
    """``--first-step`` (the image after 2 text tokens, the prompt's KV cache out) and ``--with-past`` (the language
    model's step) compile and validate; ``generate_vision_language`` gives transformers' ``generate`` tokens for the
    prompt with the image's placeholders in place, greedy and with beam search."""
    folder, module, spec, _ = checkpoint
    for name, path in generation_graphs.items():
        run_cli("compile", path, "-o", tmp_path / name)
        run_cli("validate", tmp_path / name, "--model", folder)
    first, step = runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step")
    assert first.output_names[:2] == ["logits", "present.0.key"]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    pixels, ids = spec.example_inputs(batch=2, seq=7, seed=6)
    prompt = torch.cat([ids[:, :2], torch.full((2, 16), IMAGE_TOKEN), ids[:, 2:]], 1)
    for options in ({}, {"num_beams": 3}):
        got = runtime.generate_vision_language(first, step, pixels.numpy(), ids.numpy(), max_new_tokens=6, **options)
        with torch.no_grad():
            expected = hf.generate(input_ids=prompt, pixel_values=pixels, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=6, min_new_tokens=6, do_sample=False, **options)
        np.testing.assert_array_equal(got[:, :7], ids.numpy())
        np.testing.assert_array_equal(got[:, 7:], expected[:, prompt.shape[1]:].numpy())
    with pytest.raises(AttncError, match="not a vision-language"):
        runtime.generate_vision_language(step, step, pixels.numpy(), ids.numpy())


@pytest.mark.parametrize("before", [0, 3])
def test_exited_caches_continue_the_exited_forward(checkpoint, before):
    """A first step whose visual tokens exit before layer ``k`` caches the text alone from layer ``k`` on; the later
    step with the same exit, on those caches and 4 new tokens, gives the logits of the exited forward (no cache) on
    the whole sequence, which ``test_exit_layer_drops_the_visual_tokens`` checks against a hand loop: at every ``k``,
    with the image first or after 3 text tokens. An exit before layer 0 is refused (it never reads the image)."""
    _, module, spec = checkpoint[:3]
    module, spec = with_text_before_image(module, spec, before)
    (first, _), (step, _) = with_first_step(module, spec), with_past(module, spec)
    p = module.num_visual_tokens
    pixels, ids = spec.example_inputs(batch=3, seq=before + 5, seed=11)
    new = torch.randint(0, IMAGE_TOKEN, (3, 4), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        for k in range(1, LAYERS + 1):
            caches = first(pixels, ids, exit_layer=k)[1:]
            assert [c.shape[2] for c in caches[::2]] == [before + 5 + (p if i < k else 0) for i in range(LAYERS)]
            mask = torch.ones(3, caches[0].shape[2] + 4, dtype=torch.int64)
            logits = step(new, mask, *caches, exit_layer=k)[0]
            expected = module(pixels, torch.cat([ids, new], 1), exit_layer=k)[:, -4:]
            np.testing.assert_allclose(logits.numpy(), expected.numpy(), atol=2e-6, rtol=1e-5)
        for wrapper, args in ((first, (pixels, ids)), (step, (new, mask, *caches))):
            with pytest.raises(AttncError, match="must come after a decoder layer"):
                wrapper(*args, exit_layer=0)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_step_token_exit_pass(checkpoint, request, tmp_path, exporter):
    """``apply_static_token_exit`` of a later step (``apply_step_token_exit``) at every exit layer, both exporters
    (dynamo: the ``generation_graphs`` fixture's ``attnc export --with-past``, the image after 2 text tokens;
    TorchScript: exported here, the image after 3): on the caches the exited first step returns (PyTorch), the ONNX
    step's logits equal the exited forward's on the whole sequence and its caches the PyTorch step's, at several batch
    sizes, prompt lengths and new-token counts (one case drawn afresh each run);
    the later layers' caches are declared without the image's tokens (``past`` counts the text after the image)."""
    _, module, spec = checkpoint[:3]
    before = 2 if exporter == "dynamo" else 3
    module, spec = with_text_before_image(module, spec, before)
    (first, _), (step, step_spec) = with_first_step(module, spec), with_past(module, spec)
    if exporter == "dynamo":   # the same module's dynamo export, through the CLI
        path = request.getfixturevalue("generation_graphs")["step"]
    else:
        path = export_onnx(step, step_spec.example_inputs(), tmp_path / "step.onnx", exporter=exporter,
                           input_names=step_spec.input_names, output_names=step_spec.output_names,
                           dynamic_axes=step_spec.dynamic_axes)
    model = onnx.load(path)
    gen = torch.Generator().manual_seed(21)
    drawn = np.random.default_rng()   # one more case a run: fresh batch, prompt and new-token counts
    sizes = [(1, 4, 1), (3, 9, 5), tuple(int(n) for n in (drawn.integers(1, 5), drawn.integers(before + 1, 14),
                                                           drawn.integers(1, 7)))]
    for k in (1, 3, LAYERS):
        exited, report = apply_static_token_exit(model, k, 16, visual_offset=before)
        assert report.exit_layer == k
        dims = {i.name: i.type.tensor_type.shape.dim[2].dim_param for i in exited.graph.input if "past" in i.name}
        assert dims == {f"past_key_values.{i}.{kind}": "past" if k == LAYERS else f"past + {before}" if i >= k
                        else f"past + {before + 16}"
                        for i in range(LAYERS) for kind in ("key", "value")}   # after the last layer: unchanged
        for batch, prompt, count in sizes:
            pixels, ids = spec.example_inputs(batch=batch, seq=prompt, seed=batch)
            new = torch.randint(0, IMAGE_TOKEN, (batch, count), generator=gen)
            with torch.no_grad():
                caches = first(pixels, ids, exit_layer=k)[1:]
                mask = torch.ones(batch, caches[0].shape[2] + count, dtype=torch.int64)
                expected = step(new, mask, *caches, exit_layer=k)
                whole = module(pixels, torch.cat([ids, new], 1), exit_layer=k)[:, -count:]
            got = load_onnx(exited).infer({"input_ids": new.numpy(), "attention_mask": mask.numpy(),
                                           **{s.name: c.numpy() for s, c in zip(step_spec.inputs[2:], caches)}})
            where = f"exit {k}, batch {batch}, prompt {prompt}, {count} new tokens"
            np.testing.assert_allclose(got["logits"], whole.numpy(), atol=3e-6, rtol=1e-5, err_msg=where)
            for name, reference in zip(step_spec.output_names[1:], expected[1:]):
                np.testing.assert_allclose(got[name], reference.numpy(), atol=3e-6, rtol=1e-5, err_msg=where)
        # what attnc validate feeds: random caches of the exited lengths (exited_spec), 4 text tokens cached
        feeds = exited_spec(step, step_spec, k).example_inputs(batch=2, past=4, seq=3, seed=k)
        assert [f.shape[2] for f in feeds[2::2]] == [4 + before + (16 if i < k else 0) for i in range(LAYERS)]
        with torch.no_grad():
            expected = step(*feeds, exit_layer=k)[0]
        got = load_onnx(exited).infer(dict(zip(step_spec.input_names, (f.numpy() for f in feeds))))
        np.testing.assert_allclose(got["logits"], expected.numpy(), atol=3e-6, rtol=1e-5)
    model.graph.input[1].type.tensor_type.shape.dim[1].dim_value = 40   # a static mask: no cache length to read
    with pytest.raises(AttncError, match="dynamic length") as err:
        apply_static_token_exit(model, 1, 16, visual_offset=before)
    assert "--with-past" in err.value.fix


def test_generation_with_a_token_exit(checkpoint, generation_graphs, tmp_path):
    """Both generation graphs compiled with ``--token-exit static --exit-layer 2`` validate against the checkpoint
    exiting alike in PyTorch, and decode the tokens of a greedy loop over the exited forward (no cache); a step
    compiled without the exit, or for another offset of the image, is refused by ``generate_vision_language`` with
    the way out, as are an exit before layer 0 and ``--reference original`` of the exited step; the exited step pruned
    to half its heads validates too. A first step with a gate (``--token-exit dynamic``) validates, and its caches
    choose the later step: the exited one where the gate fires (the exited loop's tokens), the plain one where it
    does not (the plain loop's); a gate in a later step or before layer 0 is refused."""
    folder, module, spec, _ = checkpoint
    module, spec = with_text_before_image(module, spec, 2)
    exit_options = ("--token-exit", "static", "--exit-layer", 2)
    for name, path in generation_graphs.items():
        run_cli("compile", path, "-o", tmp_path / name, *exit_options)
        run_cli("validate", tmp_path / name, "--model", folder)
    first, step = runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step")
    pixels, ids = spec.example_inputs(batch=2, seq=6, seed=8)
    got = runtime.generate_vision_language(first, step, pixels.numpy(), ids.numpy(), max_new_tokens=6)
    tokens = ids
    with torch.no_grad():
        for _ in range(6):
            chosen = module(pixels, tokens, exit_layer=2)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, chosen], 1)
    np.testing.assert_array_equal(got, tokens.numpy())
    result = run_cli("validate", tmp_path / "step", "--model", folder, "--reference", "original", ok=False)
    assert_clean_error(result, "--reference original cannot run this step", "shrunk reference")
    # head pruning on top of the exit: the step validates against the checkpoint exiting and gated alike
    run_cli("compile", generation_graphs["step"], "-o", tmp_path / "pruned", *exit_options, "--prune-heads", 0.5,
            "--prune-method", "weight")
    assert "PASS" in run_cli("validate", tmp_path / "pruned", "--model", folder).output
    run_cli("compile", generation_graphs["step"], "-o", tmp_path / "plain")
    # the image first: K = 0 (TorchScript: quicker, and what is refused is read from the manifest alone)
    run_cli("export", folder, "-o", tmp_path / "k0.onnx", "--with-past", "--exporter", "torchscript")
    run_cli("compile", tmp_path / "k0.onnx", "-o", tmp_path / "k0", *exit_options)
    for other, words in (("plain", "the image's tokens in every layer"), ("k0", "after 0 text tokens")):
        with pytest.raises(AttncError, match="compiled to read") as err:
            runtime.generate_vision_language(first, runtime.load(tmp_path / other), pixels.numpy(), ids.numpy())
        assert words in err.value.problem and "same --token-exit" in err.value.fix
    # a gate in the first step (DyVTE's dynamic exit): the caches it returns choose the later step
    plain, whole = runtime.load(tmp_path / "plain"), ids
    with torch.no_grad():
        for _ in range(6):   # the greedy loop with the image in every layer
            whole = torch.cat([whole, module(pixels, whole)[:, -1].argmax(-1, keepdim=True)], 1)
    assert not torch.equal(whole, tokens)   # the two loops answer apart: the step chosen shows
    for bias, fires in ((10.0, True), (-10.0, False)):   # a gate that always fires, one that never does
        ExitGate(2, np.zeros(32, np.float32), bias).save(tmp_path / "gate.npz")
        run_cli("compile", generation_graphs["first"], "-o", tmp_path / f"gated{fires}", "--token-exit", "dynamic",
                "--exit-gate", tmp_path / "gate.npz")
        run_cli("validate", tmp_path / f"gated{fires}", "--model", folder)
        gated = runtime.load(tmp_path / f"gated{fires}")
        got = runtime.generate_vision_language(gated, plain, pixels.numpy(), ids.numpy(), exit_step=step,
                                               max_new_tokens=6)
        np.testing.assert_array_equal(got, (tokens if fires else whole).numpy())
        if fires:
            with pytest.raises(AttncError, match="compiled to read") as err:   # no step for the exited caches
                runtime.generate_vision_language(gated, plain, pixels.numpy(), ids.numpy())
            assert "exit_step=" in err.value.fix
    ExitGate(0, np.zeros(32, np.float32), 1.0).save(tmp_path / "gate0.npz")
    for path, options, words in (
            (generation_graphs["step"], ("--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz"),
             "no gate of its own"),
            (generation_graphs["first"], ("--token-exit", "dynamic", "--exit-gate", tmp_path / "gate0.npz"),
             "after layer 1 or later"),
            *((path, ("--token-exit", "static", "--exit-layer", 0), "after layer 1 or later")
              for path in generation_graphs.values())):
        result = run_cli("compile", path, "-o", tmp_path / "bad", *options, ok=False)
        assert_clean_error(result, words)
        assert not (tmp_path / "bad").exists()


@pytest.mark.full(reason="the example end to end (about 22 s a model); each of its steps on each model (export, exits, "
                         "validate, both generation graphs' tokens) CI checks in tests/models")
@pytest.mark.parametrize("model", ["llava", "qwen2-vl", "glm4v", "llava-next", "gemma3", "mistral3"])
def test_vision_language_example(tmp_path, model):
    """examples/vision_language.py end to end on a random LLaVA (a random Qwen2-VL, LLaVA-NeXT, Gemma 3 and Mistral 3
    in the ``full`` tier): both one-pass artefacts (as it is and exited) and both generation steps validate, as it is
    and exited, the exit changes the logits, the generated tokens are transformers' ``generate``'s, and with the exit
    those of the exited forward, from a smaller cache."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "vision_language.py"
    spec = importlib.util.spec_from_file_location("vision_language", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    size = {"llava": 32, "qwen2-vl": 56, "glm4v": 84, "llava-next": 40, "gemma3": 64, "mistral3": 48}[model]
    results = example.main(["--model", model, "--image-size", str(size), "--width", "32", "--layers", "2",
                            "--generate", "4", "--reps", "3", "--prompt", "6", "--json", str(tmp_path / "run.json")])
    assert results["full"]["validation_passed"] and results["exit"]["validation_passed"]
    assert results["first_step_validation_passed"] and results["step_step_validation_passed"]
    assert results["generation"]["tokens_equal"]
    tokens = {"llava": 16, "qwen2-vl": 4, "glm4v": 9, "llava-next": 88, "gemma3": 16, "mistral3": 9}
    assert results["visual_tokens"] == tokens[model]
    assert results["first_step_exit_validation_passed"] and results["step_step_exit_validation_passed"]
    cache = results["generation_exit"]["prompt_cache_bytes"]
    assert results["generation_exit"]["tokens_equal"] and cache["exit"] < cache["full"]
    assert results["exit"]["vs_full_max_abs"] > 1e-3
    assert json.loads((tmp_path / "run.json").read_text())["text_before_image"] == 3


def _export_generation_graphs(module, spec, folder) -> dict:
    """The checkpoint's first step and later step exported (dynamo) into ``folder``: ``{"first": path, "step":
    path}``."""
    paths = {}
    for name, (step_module, step_spec) in {"first": with_first_step(module, spec),
                                           "step": with_past(module, spec)}.items():
        paths[name] = export_onnx(step_module, step_spec.example_inputs(), folder / f"{name}.onnx",
                                  input_names=step_spec.input_names, output_names=step_spec.output_names,
                                  dynamic_axes=step_spec.dynamic_axes)
    return paths


@pytest.mark.full(reason="the generation path CI checks on LLaVA, for each other architecture (about 20 s each)")
@pytest.mark.parametrize("architecture", OTHERS)
def test_other_architectures_generate(tmp_path, architecture):
    """Each other architecture's two generation graphs (the image after 2 text tokens), compiled, decode transformers'
    greedy ``generate`` tokens; compiled with the visual tokens gone before layer 1, the tokens of a greedy loop over
    the exited forward (no cache; for a prefix LM, PaliGemma, whose prompt attends both ways and generated tokens
    causally, over the exited PyTorch steps)."""
    folder = tiny_vision_language(tmp_path / "ckpt", architecture)
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), 2)
    exited = CompileOptions(token_exit="static", exit_layer=1)
    for name, path in _export_generation_graphs(module, spec, tmp_path).items():
        compile_model(path, tmp_path / name)
        compile_model(path, tmp_path / f"{name}_exit", exited)
    pixels, ids = spec.example_inputs(batch=2, seq=7, seed=2)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), max_new_tokens=5)
    prompt = torch.cat([ids[:, :2], torch.full((2, 16), 120), ids[:, 2:]], 1)
    with torch.no_grad():
        expected = module.model.generate(input_ids=prompt, pixel_values=hf_pixels(architecture, pixels),
                                         attention_mask=torch.ones_like(prompt),
                                         **image_token_types(architecture, prompt, 120),
                                         max_new_tokens=5, min_new_tokens=5, do_sample=False)
    np.testing.assert_array_equal(got[:, 7:], expected[:, prompt.shape[1]:].numpy())
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first_exit"), runtime.load(tmp_path / "step_exit"),
                                           pixels.numpy(), ids.numpy(), max_new_tokens=5)
    np.testing.assert_array_equal(got, exited_greedy_tokens(module, spec, pixels, ids, 5, 1).numpy())


@pytest.mark.full(reason="the padded generation CI checks on LLaVA, for each other architecture (about 20 s each)")
@pytest.mark.parametrize("architecture", OTHERS)
def test_other_architectures_generate_padded(tmp_path, architecture):
    """Each other architecture's two generation graphs of padded prompts (``--with-attention-mask``, the image after 2
    text tokens) validate, and greedy tokens of a padded batch equal transformers' ``generate`` on each prompt
    alone."""
    folder = tiny_vision_language(tmp_path / "ckpt", architecture)
    module, spec = with_attention_mask(*with_text_before_image(*load_checkpoint(str(folder)), 2))
    for name, path in _export_generation_graphs(module, spec, tmp_path).items():
        compile_model(path, tmp_path / name)
        assert validate_artefact(tmp_path / name, str(folder))[0].passed
    pixels, ids, mask = spec.example_inputs(batch=3, seq=8, seed=2)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=4)
    for row in range(3):
        tokens = ids[row][mask[row].bool()][None]
        prompt = torch.cat([tokens[:, :2], torch.full((1, module.num_visual_tokens), 120), tokens[:, 2:]], 1)
        with torch.no_grad():
            alone = hf_pixels(architecture, pixels[row:row + 1])
            expected = module.model.generate(input_ids=prompt, pixel_values=alone, max_new_tokens=4,
                                             **image_token_types(architecture, prompt, 120),
                                             min_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt))
        np.testing.assert_array_equal(got[row, 8:], expected[0, prompt.shape[1]:].numpy())
