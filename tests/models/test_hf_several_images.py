"""Several images per prompt (``attnc export --text-before-image 2,5``, compiler/layout.py): a vision-language
checkpoint takes ``pixel_values [batch, images, C, H, W]`` and places image ``i``'s tokens after the first ``K_i`` text
tokens. Its logits equal transformers' forward on the prompt with every image's placeholders in place (LLaVA, Gemma 3
with a block per image, PaliGemma's prefix, InternVL); the visual-token exit drops every image's tokens (a hand loop
over the Llama layers with numpy index lists is the reference); both exporters, the static exit and the gate, the
CLI's compile and validate, padded prompts and cached generation (``generate``'s tokens; exited, the exited loop's).

References: transformers' forward and ``generate`` (loaded apart from attnc) and the hand loop, on fresh random
inputs at several sizes.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import format_offsets, split_prompt
from attnc.compiler.onnx_io import VISUAL_OFFSET, VISUAL_TOKENS, metadata
from attnc.testing import (assert_clean_error, build_exited_engine, exited_greedy_tokens, image_token_types,
                           llama_layers_by_hand, naming_the_draw, run_cli, run_model, tensorrt_or_skip, tiny_llava,
                           tiny_llava_next, tiny_qwen_vl, tiny_vision_language)

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.models.hf_checkpoint import load_checkpoint, with_attention_mask, with_text_before_image  # noqa: E402
from attnc.passes.token_exit import ExitGate, apply_dynamic_token_exit, apply_static_token_exit  # noqa: E402

IMAGE_TOKEN, LAYERS, P = 63, 4, 16   # tiny_llava's image token, decoder layers and tokens per image


def _prompt(ids, offsets, per_image, image_token):
    """``ids`` with ``per_image`` placeholders of ``image_token`` in front of text token ``K_i`` for each image."""
    pieces, start = [], 0
    for k in offsets:
        pieces += [ids[:, start:k], torch.full((ids.shape[0], per_image), image_token)]
        start = k
    return torch.cat([*pieces, ids[:, start:]], 1)


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """The grouped-query LLaVA checkpoint: its folder, and its module and spec with two images after 2 and 5 text
    tokens."""
    folder = tiny_llava(tmp_path_factory.mktemp("llava") / "ckpt")
    return (folder, *with_text_before_image(*load_checkpoint(str(folder)), (2, 5)))


@pytest.fixture(scope="module")
def two_images(llava, tmp_path_factory):
    """``attnc export --text-before-image 2,5`` of the LLaVA (dynamo, dynamic batch and text)."""
    path = tmp_path_factory.mktemp("two") / "llava.onnx"
    run_cli("export", llava[0], "-o", path, "--text-before-image", "2,5")
    return path


def _hand_exit(module, pixels, ids, offsets, k):
    """The Llama layers run by hand on ``[text; image; text; image; text]``, every image's tokens (and their rotary
    and mask entries) dropped before layer ``k`` by a numpy index list: apart from the hooks the module drops them
    with."""
    inner, lm = module.model.model, module.model.model.language_model
    with torch.no_grad():
        images = pixels.shape[1]
        out = inner.vision_tower(pixels.flatten(0, 1), output_hidden_states=True)
        visual = inner.multi_modal_projector(out.hidden_states[-1][:, 1:]).reshape(len(pixels), images * P, -1)
        text = inner.get_input_embeddings()(ids)
        rows, is_image, start = [], [], 0
        for i, before in enumerate(offsets):
            rows += [text[:, start:before], visual[:, i * P:(i + 1) * P]]
            is_image += [False] * (before - start) + [True] * P
            start = before
        x = torch.cat([*rows, text[:, start:]], 1)
        is_image = np.array(is_image + [False] * (ids.shape[1] - start))
        x = llama_layers_by_hand(lm, x, torch.from_numpy(np.flatnonzero(~is_image)), k)
        last = offsets[-1] if k < len(lm.layers) else offsets[-1] + images * P
        return module.model.lm_head(x[:, last:]).numpy()


@pytest.mark.parametrize("offsets", [(2, 5), (0, 0, 3), (1, 4, 4), "drawn"])
def test_llava_matches_transformers_and_the_hand_exit(llava, offsets):
    """Two images between the text, three with two side by side, the first in front of everything, or 2-4 images at
    offsets, batch sizes and text lengths drawn afresh each run: transformers' logits at the text after the last
    image, at two batch sizes and text lengths; the exit before each layer equals the hand loop, and changes the
    logits before the last layer."""
    folder, module, spec = llava
    draw, sizes = "fixed", None
    if offsets == "drawn":
        seed = int(np.random.SeedSequence().entropy % 2**32)
        rng = np.random.default_rng(seed)
        offsets = tuple(sorted(int(k) for k in rng.integers(0, 8, int(rng.integers(2, 5)))))
        sizes = [(int(rng.integers(1, 4)), offsets[-1] + int(rng.integers(1, 9))) for _ in range(2)]
        draw = f"seed {seed}: offsets {offsets}, (batch, tokens) {sizes}"
    with naming_the_draw(draw):
        _check_llava(folder, *with_text_before_image(module, spec, offsets), offsets, sizes)


def _check_llava(folder, module, spec, offsets, sizes):
    images = len(offsets)
    assert module.num_visual_tokens == images * P and spec.inputs[0].shape == ("batch", images, 3, 32, 32)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    for batch, seq in sizes or ((1, offsets[-1] + 2), (3, offsets[-1] + 6)):
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=seq)
        assert pixels.shape == (batch, images, 3, 32, 32)
        with torch.no_grad():
            full = module(pixels, ids).numpy()
            expected = hf(input_ids=_prompt(ids, offsets, P, IMAGE_TOKEN), pixel_values=pixels.flatten(0, 1)).logits
            np.testing.assert_allclose(full, expected[:, offsets[-1] + images * P:], atol=2e-6, rtol=1e-5)
            for k in range(LAYERS + 1):
                got = module(pixels, ids, exit_layer=k).numpy()
                np.testing.assert_allclose(got, _hand_exit(module, pixels, ids, offsets, k), atol=2e-6, rtol=1e-5)
                assert (np.abs(got - full).max() > 1e-3) == (k < LAYERS)
    with pytest.raises(ValueError, match=f"no \\[batch, {images}, channels"):
        module(pixels[:, 1:], ids)   # an image short


@pytest.mark.parametrize("architecture", ["Gemma3ForConditionalGeneration", *(pytest.param(a, marks=pytest.mark.full(
    reason="two images on another architecture (about 10 s); CI runs LLaVA's and Gemma 3's (a block per image)"))
    for a in ("PaliGemmaForConditionalGeneration", "InternVLForConditionalGeneration"))])
def test_other_architectures(tmp_path, architecture):
    """Two images after 1 and 4 text tokens: transformers' logits with the processor's ``token_type_ids`` (Gemma 3's
    images attend within themselves both ways, each its own block; PaliGemma's whole prompt does); the dynamo export
    at another batch and length equals the module, and so does its exit before layer 1. Gemma 3's images as one
    block would give other logits: the test tells the blocks apart; two images side by side are one block there, as
    transformers groups them."""
    folder = tiny_vision_language(tmp_path / "ckpt", architecture)
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), (1, 4))
    assert module.num_visual_tokens == 32
    pixels, ids = spec.example_inputs(batch=2, seq=7, seed=1)
    hf = getattr(transformers, architecture).from_pretrained(folder).eval()
    prompt = _prompt(ids, (1, 4), 16, 120)
    with torch.no_grad():
        types = image_token_types(architecture, prompt, 120)
        expected = hf(input_ids=prompt, pixel_values=pixels.flatten(0, 1), **types).logits[:, 4 + 32:]
        np.testing.assert_allclose(module(pixels, ids).numpy(), expected, atol=2e-6, rtol=1e-5)
        if architecture == "Gemma3ForConditionalGeneration":   # one block over both images and the text between
            joined = hf(input_ids=prompt, pixel_values=pixels.flatten(0, 1),
                        token_type_ids=torch.cat([torch.zeros(2, 1), torch.ones(2, 35), torch.zeros(2, 3)], 1).long())
            assert np.abs(joined.logits[:, 36:].numpy() - expected.numpy()).max() > 1e-3
            # images side by side: one run of image tokens, one block, as transformers groups them
            beside, _ = with_text_before_image(module, spec, (2, 2))
            prompt = _prompt(ids, (2, 2), 16, 120)
            expected = hf(input_ids=prompt, pixel_values=pixels.flatten(0, 1),
                          **image_token_types(architecture, prompt, 120)).logits[:, 2 + 32:]
            np.testing.assert_allclose(beside(pixels, ids).numpy(), expected, atol=2e-6, rtol=1e-5)
    path = tmp_path / "model.onnx"
    export_onnx(module, spec.example_inputs(), path, input_names=spec.input_names, dynamic_axes=spec.dynamic_axes)
    model = onnx.load(str(path))
    assert (metadata(model, VISUAL_TOKENS), metadata(model, VISUAL_OFFSET)) == ("32", "1,4")
    exited = apply_static_token_exit(model, 1, 32, (1, 4))[0]
    pixels, ids = spec.example_inputs(batch=3, seq=9, seed=2)
    feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
    with torch.no_grad():
        np.testing.assert_allclose(run_model(model, feeds), module(pixels, ids).numpy(), atol=1e-5, rtol=1e-4)
        np.testing.assert_allclose(run_model(exited, feeds), module(pixels, ids, exit_layer=1).numpy(), atol=1e-5,
                                   rtol=1e-4)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_exits_and_gates(llava, request, tmp_path, exporter):
    """``attnc export --text-before-image 2,5`` (dynamo, dynamic batch and text) records both offsets; a TorchScript
    export of the LLaVA on plain multi-head attention at static shapes behaves alike. The graph, the static exit before
    layers 0, 2 and 3 and the gate's two branches equal the module at every size (one drawn afresh each run)."""
    folder, module, spec = llava
    path = tmp_path / "llava.onnx"
    if exporter == "dynamo":
        path = request.getfixturevalue("two_images")
        rng = np.random.default_rng()
        sizes = ((3, 8), (1, 12), (int(rng.integers(1, 5)), int(rng.integers(6, 20))))   # the last drawn afresh
    else:
        folder = tiny_llava(tmp_path / "mha", kv_heads=None)
        module, spec = with_text_before_image(*load_checkpoint(str(folder)), (2, 5))
        export_onnx(module, spec.example_inputs(batch=2, seq=9), path, exporter=exporter,
                    input_names=spec.input_names)
        sizes = ((2, 9),)
    model = onnx.load(str(path))
    assert (metadata(model, VISUAL_TOKENS), metadata(model, VISUAL_OFFSET)) == ("32", "2,5")
    exits = {k: apply_static_token_exit(model, k, 32, (2, 5))[0] for k in (0, 2, 3)}
    gates = {bias > 0: apply_dynamic_token_exit(model, ExitGate(1, np.zeros(32, np.float32), bias), 32, (2, 5))[0]
             for bias in (40.0, -40.0)}
    for batch, seq in sizes:
        with naming_the_draw(f"batch {batch}, {seq} text tokens"):
            pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=seq)
            feeds = {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}
            with torch.no_grad():
                np.testing.assert_allclose(run_model(model, feeds), module(pixels, ids).numpy(), atol=1e-5, rtol=1e-4)
                for k, exited in exits.items():
                    expected = module(pixels, ids, exit_layer=k).numpy()
                    assert expected.shape == (batch, seq - 5, 64)
                    np.testing.assert_allclose(run_model(exited, feeds), expected, atol=1e-5, rtol=1e-4)
                for fires, gated in gates.items():
                    expected = module(pixels, ids, exit_layer=1 if fires else None)
                    np.testing.assert_allclose(run_model(gated, feeds), expected, atol=1e-5, rtol=1e-4)


def test_compile_and_validate_through_the_cli(llava, two_images, tmp_path):
    """inspect shows both offsets; compile takes them from the export (a contradicting --text-before-image is
    refused), the manifest keeps them, and validate rebuilds the checkpoint with both images: it passes exited and
    not, and fails when the record is taken away (the checkpoint then takes one image in front of the text)."""
    folder, path = llava[0], two_images
    assert "32 visual tokens of 2 32x32 images after 2,5 text tokens" in run_cli("inspect", path).output
    for extra in ((), ("--token-exit", "static", "--exit-layer", 2)):
        out = tmp_path / f"out{len(extra)}"
        run_cli("compile", path, "-o", out, *extra)
        assert json.loads((out / "manifest.json").read_text())["recorded"][VISUAL_OFFSET] == "2,5"
        assert "PASS" in run_cli("validate", out, "--model", folder).output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shrink"]["token_exit"]["visual_offset"] == [2, 5]
    del manifest["recorded"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("validate", out, "--model", folder, ok=False).exit_code != 0
    for given, words in (("2,6", "--text-before-image 2,6 contradicts the 2,5"), ("5,2", "must not decrease")):
        result = run_cli("compile", path, "-o", tmp_path / "bad", "--token-exit", "static", "--exit-layer", 2,
                         "--text-before-image", given, ok=False)
        assert words in result.output
        assert not (tmp_path / "bad").exists()


def test_the_exit_probes_at_a_small_batch(two_images, monkeypatch):
    """The exit runs the graph at two sizes to find what the later layers read over the tokens: at a batch of 2 both
    times, its text past the 5 tokens in front of the last image. It ran at a batch as large as that text (7 and 8
    rows of two images each: seconds where the images have a thousand tokens); a graph whose batch axis is not one
    the inputs share alone keeps the old sizes."""
    from attnc.passes import token_exit

    seen = []
    evaluate = token_exit.evaluate_tensors

    def spy(model, names, **kwargs):
        runs = evaluate(model, names, **kwargs)
        seen.append([run[names[0]].shape for run in runs])
        return runs

    monkeypatch.setattr(token_exit, "evaluate_tensors", spy)
    model = onnx.load(str(two_images))
    apply_static_token_exit(model, 2, 32, (2, 5))
    assert seen == [[(2, 5 + 2 + 32, 32), (2, 5 + 3 + 32, 32)]]   # the boundary: [batch, tokens, width]
    for i in model.graph.input:   # the batch axis named apart on each input: no axis the inputs share alone
        i.type.tensor_type.shape.dim[0].dim_param = f"{i.name}_batch"
    seen.clear()
    apply_static_token_exit(model, 2, 32, (2, 5))
    assert [shape[0] for shape in seen[0]] == [7, 8]


def test_padded_prompts(llava):
    """Prompts of different lengths, each padded after the text in front of the last image: each row's logits at its
    tokens equal transformers' forward on that prompt alone, and exited before layer 2 the exited forward's on it
    alone."""
    folder, module, spec = llava
    masked, masked_spec = with_attention_mask(module, spec)
    pixels, ids, mask = masked_spec.example_inputs(batch=3, seq=11, seed=13)
    assert (mask[:, :5] == 1).all() and mask.sum(1).tolist() == [11, 9, 7]
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        logits, exited = masked(pixels, ids, mask).numpy(), masked(pixels, ids, mask, exit_layer=2).numpy()
        for row in range(3):
            tokens = ids[row][mask[row].bool()][None]
            n = tokens.shape[1] - 5
            alone = hf(input_ids=_prompt(tokens, (2, 5), P, IMAGE_TOKEN), pixel_values=pixels[row]).logits[:, -n:]
            np.testing.assert_allclose(logits[row, -n:], alone[0].numpy(), atol=2e-6, rtol=1e-5)
            alone = module(pixels[row:row + 1], tokens, exit_layer=2).numpy()
            np.testing.assert_allclose(exited[row, -n:], alone[0], atol=2e-6, rtol=1e-5)


def test_generation(llava, tmp_path):
    """Both generation graphs with two images (dynamo, through the CLI): ``generate_vision_language`` gives
    transformers' ``generate`` tokens, greedy and with beam search. Both compiled with ``--token-exit static
    --exit-layer 2`` validate and give the tokens of a greedy loop over the exited forward; the later step's cache
    lengths count the text in front of the last image."""
    folder, module, spec = llava
    graphs = {}
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        graphs[name] = tmp_path / f"{name}.onnx"
        run_cli("export", folder, "-o", graphs[name], option, "--text-before-image", "2,5")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(folder).eval()
    pixels, ids = spec.example_inputs(batch=2, seq=8, seed=6)
    prompt = _prompt(ids, (2, 5), P, IMAGE_TOKEN)
    for extra in ((), ("--token-exit", "static", "--exit-layer", 2)):
        for name, path in graphs.items():
            run_cli("compile", path, "-o", tmp_path / f"{name}{len(extra)}", *extra)
            if extra:   # the plain pair's tokens are checked against transformers' below
                assert "PASS" in run_cli("validate", tmp_path / f"{name}{len(extra)}", "--model", folder).output
        first, step = runtime.load(tmp_path / f"first{len(extra)}"), runtime.load(tmp_path / f"step{len(extra)}")
        if extra:
            got = runtime.generate_vision_language(first, step, pixels.numpy(), ids.numpy(), max_new_tokens=5)
            np.testing.assert_array_equal(got, exited_greedy_tokens(module, spec, pixels, ids, 5, 2).numpy())
            later = {s.name: s.shape for s in step.input_specs}
            assert later["past_key_values.3.key"][2] == "past + 5"
            assert later["past_key_values.1.key"][2] == "past + 37"
            continue
        for options in ({}, {"num_beams": 3}):
            got = runtime.generate_vision_language(first, step, pixels.numpy(), ids.numpy(), max_new_tokens=5,
                                                   **options)
            with torch.no_grad():
                expected = hf.generate(input_ids=prompt, pixel_values=pixels.flatten(0, 1),
                                       attention_mask=torch.ones_like(prompt), max_new_tokens=5, min_new_tokens=5,
                                       do_sample=False, **options)
            np.testing.assert_array_equal(got[:, 8:], expected[:, prompt.shape[1]:].numpy())


@pytest.mark.tensorrt
def test_tensorrt_builds_the_exited_two_images(two_images, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the two-image export with both images gone before layer 2 (the text's
    three slices joined), at dynamic batch and text length, every attention fused (the tower's 2 and the Llama's 4)."""
    tensorrt_or_skip()
    manifest = build_exited_engine(two_images, (2, 3, 32, 32), 5, tmp_path / "engine")
    assert (tmp_path / "engine" / manifest["artefact"]).stat().st_size > 0
    assert manifest["shrink"]["token_exit"]["visual_offset"] == [2, 5] and manifest["ops_after"]["Attention"] == 6


def test_one_image_architectures_refuse_several(tmp_path):
    """LLaVA-NeXT (its tiles follow each image's size) takes one image per prompt: two offsets are refused by name,
    with the architectures that take several; Qwen2-VL's images side by side (no <|vision_start|> between them) are
    refused too."""
    folder = tiny_llava_next(tmp_path / "next")
    module, spec = load_checkpoint(str(folder))
    with pytest.raises(AttncError, match="with one image per prompt, not 2") as err:
        with_text_before_image(module, spec, (1, 3))
    assert "LlavaForConditionalGeneration" in err.value.fix and "Qwen2VLForConditionalGeneration" in err.value.fix
    result = run_cli("export", folder, "-o", tmp_path / "m.onnx", "--text-before-image", "1,3", ok=False)
    assert_clean_error(result, "one image per prompt")
    qwen = tiny_qwen_vl(tmp_path / "qwen")
    result = run_cli("export", qwen, "-o", tmp_path / "m.onnx", "--text-before-image", "1,1", ok=False)
    assert_clean_error(result, "cannot lie side by side", "<|vision_start|>")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.full(reason="the example's path with two images (about 40 s); what it runs, export, exits, validation and "
                         "both generation graphs of a two-image LLaVA, CI checks above")
def test_example_with_two_images(tmp_path):
    """examples/vision_language.py with ``--text-before-image 2,4``: every artefact validates, the tokens are
    transformers' ``generate``'s on the prompt with both images' placeholders, and exited the exited loop's."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "vision_language.py"
    spec = importlib.util.spec_from_file_location("vision_language", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--image-size", "32", "--width", "32", "--layers", "2", "--generate", "4", "--reps", "3",
                            "--prompt", "7", "--text-before-image", "2,4", "--json", str(tmp_path / "run.json")])
    assert results["visual_tokens"] == 32 and results["full"]["validation_passed"]
    assert results["exit"]["validation_passed"] and results["exit"]["vs_full_max_abs"] > 1e-3
    assert results["generation"]["tokens_equal"] and results["generation_exit"]["tokens_equal"]
    assert results["first_step_exit_validation_passed"] and results["step_step_exit_validation_passed"]
    assert json.loads((tmp_path / "run.json").read_text())["text_before_image"] == [2, 4]


@pytest.mark.parametrize("architecture", ["SmolVLMForConditionalGeneration", pytest.param(
    "Idefics3ForConditionalGeneration", marks=pytest.mark.full(reason="SmolVLM's path, which CI checks (about 15 s)"))])
def test_tiles_of_one_image(tmp_path, architecture):
    """SmolVLM's and Idefics 3's processors cut an image into tiles, each behind its own row and column tokens, the
    whole image last behind its own: a prompt of several images to attnc, its offsets read off the processor's prompt
    (``split_prompt``). The logits equal transformers' forward on that prompt (``pixel_values [B, tiles, 3, S, S]``);
    the export recorded with the read offsets compiles exited before layer 1 and validates."""
    folder = tiny_vision_language(tmp_path / "ckpt", architecture)
    batch, rng = 2, np.random.default_rng()
    # <fake><row_1_col_1><image>×16 <fake><row_1_col_2><image>×16 (two newlines) <fake><global-img><image>×16
    # <fake> and the question
    pieces = [rng.integers(3, 100, (batch, n)) for n in (3, 2, 4, int(rng.integers(2, 6)))]
    image = np.full((batch, 16), 120)
    prompt = torch.from_numpy(np.concatenate([pieces[0], image, pieces[1], image, pieces[2], image, pieces[3]], 1))
    ids, offsets = split_prompt(prompt.numpy(), 120, 16)
    assert offsets == (3, 5, 9)
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), offsets)
    pixels = torch.randn(batch, 3, 3, 64, 64)
    with torch.no_grad():
        expected = module.model(input_ids=prompt, pixel_values=pixels).logits[:, 9 + 48:].numpy()
        np.testing.assert_allclose(module(pixels, torch.from_numpy(ids)).numpy(), expected, atol=2e-6, rtol=1e-5)
    path = tmp_path / "tiles.onnx"
    run_cli("export", folder, "-o", path, "--text-before-image", format_offsets(offsets))
    run_cli("compile", path, "-o", tmp_path / "out", "--token-exit", "static", "--exit-layer", 1)
    assert "PASS" in run_cli("validate", tmp_path / "out", "--model", folder).output


@pytest.mark.tensorrt
def test_tensorrt_builds_exited_tiles(tmp_path):
    """TensorRT-RTX builds an fp16 engine of SmolVLM's export with two tiles and the whole image (three runs of 16
    tokens behind their row and column tokens) exited before layer 1, every attention fused."""
    tensorrt_or_skip()
    folder = tiny_vision_language(tmp_path / "ckpt", "SmolVLMForConditionalGeneration")
    path = tmp_path / "tiles.onnx"
    run_cli("export", folder, "-o", path, "--text-before-image", "3,5,9")
    manifest = build_exited_engine(path, (3, 3, 64, 64), 9, tmp_path / "engine", exit_layer=1)
    assert (tmp_path / "engine" / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] >= 2


@pytest.mark.parametrize("offsets,batch", [((1, 4), 2), ((0, 3, 3), 1)])
def test_onevision_reads_each_image_whole(tmp_path, offsets, batch):
    """LLaVA-OneVision reads each image of a prompt of several whole, at the tower's size (its processor's first tile;
    ``batch_num_images`` above 1: no tiles), 16 tokens and a newline each: the logits equal transformers' forward with
    ``batch_num_images``, two images and three (two side by side). The export exited before layer 2 validates; an
    image size other than the tower's is refused by name."""
    folder = tiny_llava_next(tmp_path / "ckpt", architecture="LlavaOnevisionForConditionalGeneration")
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), offsets)
    images = len(offsets)
    assert module.num_visual_tokens == 17 * images and spec.inputs[0].shape == ("batch", images, 3, 32, 32)
    pixels, ids = spec.example_inputs(batch=batch, seq=offsets[-1] + 4, seed=int(np.random.default_rng().integers(99)))
    prompt = _prompt(ids, offsets, 17, 62)
    with torch.no_grad():
        expected = module.model(input_ids=prompt, pixel_values=pixels.flatten(0, 1)[:, None],
                                image_sizes=torch.tensor([[32, 32]] * (batch * images)),
                                batch_num_images=torch.tensor([images] * batch)).logits[:, offsets[-1] + 17 * images:]
        np.testing.assert_allclose(module(pixels, ids).numpy(), expected.numpy(), atol=2e-5, rtol=1e-4)
    if images == 2:
        path = tmp_path / "two.onnx"
        run_cli("export", folder, "-o", path, "--text-before-image", format_offsets(offsets))
        run_cli("compile", path, "-o", tmp_path / "out", "--token-exit", "static", "--exit-layer", 2)
        assert "PASS" in run_cli("validate", tmp_path / "out", "--model", folder).output
        result = run_cli("export", folder, "-o", tmp_path / "bad.onnx", "--text-before-image", "1,4", "--image-size",
                         "40x90", ok=False)
        assert_clean_error(result, "at 32x32 pixels", "drop --image-size")
