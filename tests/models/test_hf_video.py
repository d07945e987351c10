"""Video in place of the image (``attnc export --video-frames F``, models/hf_llava_next.py ``LlavaVideoEncoder``):
LLaVA-OneVision and LLaVA-NeXT-Video take ``pixel_values_videos [batch, F, 3, S, S]`` and place the clip's ``P`` tokens
(each frame's features pooled 2× on a side, OneVision's newline after the last) after the first ``K`` text tokens.
Their logits equal transformers' forward on the prompt with ``P`` video placeholders; the visual-token exit drops the
clip (a hand loop over the Llama layers with a numpy index list is the reference); both exporters record ``F``, the
static exit and the gate compile and ``attnc validate`` rebuilds the checkpoint with the clip; cached generation gives
transformers' ``generate`` tokens, exited the exited loop's; padded prompts each row's alone; NeXT-Video's pooling
modes and odd frame sizes count ``P`` as transformers places it; what cannot be read is refused by name.

References: transformers' forward and ``generate`` on the placeholders, and the hand loop, on fresh random clips at
several frame counts, offsets and batches (one drawn afresh each run).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.onnx_io import IMAGE_SIZE, VIDEO_FRAMES, VISUAL_OFFSET, VISUAL_TOKENS, metadata
from attnc.models.hf_llava_next import VIDEO_ARCHITECTURES
from attnc.testing import (assert_clean_error, build_exited_engine, exited_greedy_tokens, llama_layers_by_hand,
                           naming_the_draw, run_cli, run_model, save_seeded, tensorrt_or_skip, tiny_llava,
                           tiny_llava_next)

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.models.hf_checkpoint import (load_checkpoint, with_attention_mask, with_image_size,  # noqa: E402
                                        with_text_before_image, with_video_frames)
from attnc.passes.token_exit import ExitGate, apply_dynamic_token_exit, apply_static_token_exit  # noqa: E402

VIDEO_TOKEN, LAYERS = 63, 4   # tiny_llava_next's video token and decoder layers
FRAMES, BEFORE = 3, 2   # the exports': a clip of 3 frames after 2 text tokens
# one frame's tokens: 4 × 4 patch features pooled to 2 × 2 (OneVision's clip ends with a newline token)
PER_FRAME = 4

_NEXT_VIDEO_EXPORT = ("the export path CI checks on OneVision; NeXT-Video's differs only in its encoder, which CI "
                      "checks against transformers in PyTorch (about 10 s each)")
ONEVISION_ONLY_IN_CI = [VIDEO_ARCHITECTURES[0], pytest.param(VIDEO_ARCHITECTURES[1], marks=pytest.mark.full(
    reason=_NEXT_VIDEO_EXPORT))]


@pytest.fixture(scope="module", params=VIDEO_ARCHITECTURES)
def checkpoint(request, tmp_path_factory):
    """The tiny checkpoint of each architecture (4 query on 2 K/V heads): its folder, and its module and spec on a
    clip of :data:`FRAMES` frames after :data:`BEFORE` tokens."""
    folder = tiny_llava_next(tmp_path_factory.mktemp("video") / "ckpt", architecture=request.param)
    return folder, *with_video_frames(*with_text_before_image(*load_checkpoint(str(folder)), BEFORE), FRAMES)


def _tokens(module, frames: int) -> int:
    """``P`` of a clip of ``frames`` frames, counted here apart from the encoder."""
    return frames * PER_FRAME + (type(module.model).__name__ == "LlavaOnevisionForConditionalGeneration")


def _prompt(ids, before: int, p: int):
    """``ids`` with ``p`` video placeholders in front of text token ``before``."""
    return torch.cat([ids[:, :before], torch.full((ids.shape[0], p), VIDEO_TOKEN), ids[:, before:]], 1)


def _transformers(model, video, ids, before, p, **generate):
    """transformers' forward (logits at the text after the clip) or ``generate`` (the new tokens) on the prompt with
    the clip's placeholders in front of text token ``before``."""
    prompt = _prompt(ids, before, p)
    with torch.no_grad():
        if generate:
            out = model.generate(input_ids=prompt, pixel_values_videos=video, do_sample=False,
                                 attention_mask=torch.ones_like(prompt), **generate)
            return out[:, prompt.shape[1]:].numpy()
        return model(input_ids=prompt, pixel_values_videos=video).logits[:, before + p:].numpy()


def _hand_exit(module, video, ids, before, k):
    """The Llama layers run by hand on ``[text; clip; text]`` (the clip's tokens from transformers'
    ``get_video_features``), the clip's tokens and their rotary and mask entries dropped before layer ``k`` by a numpy
    index list: apart from the hooks the module drops them with."""
    model = module.model
    inner, lm, config = model.model, model.model.language_model, model.config
    with torch.no_grad():
        visual = inner.get_video_features(video, vision_feature_layer=config.vision_feature_layer,
                                          vision_feature_select_strategy=config.vision_feature_select_strategy,
                                          return_dict=True).pooler_output
        text = inner.get_input_embeddings()(ids)
        x = torch.cat([text[:, :before], visual, text[:, before:]], 1)
        p = visual.shape[1]
        keep = np.flatnonzero(np.r_[np.zeros(before, bool), np.ones(p, bool), np.zeros(ids.shape[1] - before, bool)]
                              == 0)
        hidden = llama_layers_by_hand(lm, x, torch.from_numpy(keep), k)
        return model.lm_head(hidden[:, before:] if k < LAYERS else hidden[:, before + p:]).numpy()


def _check(checkpoint, frames, before, batch, exits=(0, 1, 3)):
    """The module on a clip of ``frames`` frames after ``before`` tokens against transformers' forward on fresh random
    frames (another clip changes the logits), and exited before each of ``exits`` against the hand loop."""
    folder, module, spec = checkpoint
    module, spec = with_video_frames(*with_text_before_image(module, spec, before), frames)
    p = _tokens(module, frames)
    assert module.num_visual_tokens == p and spec.inputs[0].name == "pixel_values_videos"
    assert spec.inputs[0].shape == ("batch", frames, 3, 32, 32)
    video, ids = torch.randn(batch, frames, 3, 32, 32), torch.randint(3, spec.inputs[1].high, (batch, before + 5))
    with torch.no_grad():
        got, other = module(video, ids).numpy(), module(torch.randn_like(video), ids).numpy()
        expected = _transformers(module.model, video, ids, before, p)
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
        assert np.abs(other - expected).max() > 1e-2
        for k in exits:
            exited = module(video, ids, exit_layer=k).numpy()
            assert exited.shape == (batch, 5, 64)   # the text after the clip
            np.testing.assert_allclose(exited, _hand_exit(module, video, ids, before, k), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("frames,before,batch", [(1, 0, 1), (3, 2, 2), (5, 4, 3), (8, 1, 1)])
def test_matches_transformers_and_the_hand_exit(checkpoint, frames, before, batch):
    """One frame and several, the clip first or after 1-4 tokens, batch 1-3: transformers' forward, and the exits
    before layers 0, 1 and 3 the hand loop."""
    _check(checkpoint, frames, before, batch)


def test_matches_at_a_drawn_size(checkpoint):
    """The same at 1-10 frames after 0-5 tokens and a batch of 1-3, drawn afresh each run (named on failure)."""
    rng = np.random.default_rng()
    frames, before, batch = int(rng.integers(1, 11)), int(rng.integers(0, 6)), int(rng.integers(1, 4))
    exit_layer = int(rng.integers(0, LAYERS + 1))
    with naming_the_draw(f"{frames} frames after {before} tokens, batch {batch}, exit before layer {exit_layer}"):
        _check(checkpoint, frames, before, batch, exits=(exit_layer,))


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint's dynamo export through the CLI, a clip of :data:`FRAMES` frames after :data:`BEFORE` tokens
    (shared by the tests that read it: a fixture apart, so the tests in PyTorch alone skip it)."""
    folder = checkpoint[0]
    path = folder.parent / "video.onnx"
    run_cli("export", folder, "-o", path, "--text-before-image", BEFORE, "--video-frames", FRAMES)
    return path


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("checkpoint", ONEVISION_ONLY_IN_CI, indirect=True)
def test_export_exits_and_gates(checkpoint, request, tmp_path, exporter):
    """``attnc export --video-frames`` (dynamo, dynamic batch and text) records ``F`` beside ``P``, ``K`` and the
    frames' size, and inspect says so; a TorchScript export (of the checkpoint on plain multi-head attention) at static
    shapes behaves alike. The graph, the static
    exit before layers 0 and 2 and the gate's two branches equal the module (ONNX Runtime; dynamo at a batch and
    text drawn afresh)."""
    folder, module, spec = checkpoint
    p, path = module.num_visual_tokens, tmp_path / "video.onnx"
    if exporter == "dynamo":
        path = request.getfixturevalue("exported")
        rng = np.random.default_rng()
        sizes = ((1, BEFORE + 1), (int(rng.integers(1, 4)), int(rng.integers(BEFORE + 1, 16))))
        assert f"{p} visual tokens of a video of {FRAMES} 32x32 frames after {BEFORE} text tokens" in \
            " ".join(run_cli("inspect", path).output.split())   # as one line: the console wraps it
    else:   # on plain multi-head attention: TorchScript does not export SDPA's grouped-query form
        folder = tiny_llava_next(tmp_path / "mha", kv_heads=None, architecture=type(module.model).__name__)
        module, spec = with_video_frames(*with_text_before_image(*load_checkpoint(str(folder)), BEFORE), FRAMES)
        export_onnx(module, spec.example_inputs(batch=2, seq=7), path, exporter=exporter,
                    input_names=spec.input_names)
        sizes = ((2, 7),)
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["pixel_values_videos", "input_ids"]
    assert {key: metadata(model, key) for key in (VISUAL_TOKENS, VISUAL_OFFSET, IMAGE_SIZE, VIDEO_FRAMES)} == \
        {VISUAL_TOKENS: str(p), VISUAL_OFFSET: str(BEFORE), IMAGE_SIZE: "32x32", VIDEO_FRAMES: str(FRAMES)}
    exits = {k: apply_static_token_exit(model, k, p, BEFORE)[0] for k in (0, 2)}
    gates = {bias > 0: apply_dynamic_token_exit(model, ExitGate(1, np.zeros(32, np.float32), bias), p, BEFORE)[0]
             for bias in (40.0, -40.0)}
    for batch, seq in sizes:
        with naming_the_draw(f"batch {batch}, {seq} text tokens"):
            video, ids = spec.example_inputs(batch=batch, seq=seq, seed=seq)
            feeds = {"pixel_values_videos": video.numpy(), "input_ids": ids.numpy()}
            with torch.no_grad():
                np.testing.assert_allclose(run_model(model, feeds), _transformers(module.model, video, ids, BEFORE, p),
                                           atol=2e-5, rtol=1e-4)
                for k, exited in exits.items():
                    np.testing.assert_allclose(run_model(exited, feeds), module(video, ids, exit_layer=k).numpy(),
                                               atol=2e-5, rtol=1e-4)
                for fires, gated in gates.items():
                    expected = module(video, ids, exit_layer=1 if fires else None).numpy()
                    np.testing.assert_allclose(run_model(gated, feeds), expected, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpoint", ONEVISION_ONLY_IN_CI, indirect=True)
def test_compile_validate_and_a_trained_gate(checkpoint, exported, tmp_path):
    """``attnc train-exit-gate --video-frames`` trains on clips keyed ``pixel_values_videos``; the static exit and the
    gate compile from the export and pass ``attnc validate``, which rebuilds the checkpoint with the recorded clip
    (without the record it fails: the checkpoint then takes an image)."""
    (folder, _, spec), path = checkpoint, exported
    video, ids = spec.example_inputs(batch=8, seq=BEFORE + 4, seed=5)
    np.savez(tmp_path / "calib.npz", pixel_values_videos=video.numpy(), input_ids=ids.numpy())
    run_cli("train-exit-gate", folder, "-o", tmp_path / "gate.npz", "--layer", 2, "--calibration",
            tmp_path / "calib.npz", "--steps", 20, "--text-before-image", BEFORE, "--video-frames", FRAMES)
    for name, options in (("static", ("--token-exit", "static", "--exit-layer", 2)),
                          ("dynamic", ("--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz"))):
        run_cli("compile", path, "-o", tmp_path / name, *options)
        assert "PASS" in run_cli("validate", tmp_path / name, "--model", folder).output
    report = json.loads((tmp_path / "static" / "report.json").read_text())
    assert report["passed"] and report["shrink_cost"][0]["max_abs_error"] > 1e-3
    manifest = json.loads((tmp_path / "static" / "manifest.json").read_text())
    assert manifest["recorded"][VIDEO_FRAMES] == str(FRAMES)
    del manifest["recorded"][VIDEO_FRAMES]
    (tmp_path / "static" / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("validate", tmp_path / "static", "--model", folder, ok=False).exit_code != 0


_NEXT_VIDEO_GENERATION = ("the generation path CI checks on OneVision; NeXT-Video's differs only in its encoder, which "
                          "CI checks in the one-pass export")


@pytest.mark.full(reason="the generation path CI checks on images (test_hf_vision_language.py), which a clip takes "
                         "unchanged once encoded (about 30 s)")
@pytest.mark.parametrize("checkpoint", [VIDEO_ARCHITECTURES[0], pytest.param(
    VIDEO_ARCHITECTURES[1], marks=pytest.mark.full(reason=_NEXT_VIDEO_GENERATION))], indirect=True)
def test_generation(checkpoint, tmp_path):
    """``--first-step`` and ``--with-past`` on a clip compile and validate; their greedy and beam tokens equal
    transformers' ``generate``; both compiled with the clip gone before layer 2, the exited loop's tokens."""
    folder, module, spec = checkpoint
    options = ("--text-before-image", BEFORE, "--video-frames", FRAMES)
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *options)
        for out, extra in ((name, ()), (f"{name}-exit", ("--token-exit", "static", "--exit-layer", 2))):
            run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / out, *extra)
            assert "PASS" in run_cli("validate", tmp_path / out, "--model", folder).output
    video, ids = spec.example_inputs(batch=2, seq=BEFORE + 4, seed=23)
    first, step = runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step")
    p = module.num_visual_tokens
    for search in ({}, {"num_beams": 2}):
        got = runtime.generate_vision_language(first, step, video.numpy(), ids.numpy(), max_new_tokens=5, **search)
        expected = _transformers(module.model, video, ids, BEFORE, p, max_new_tokens=5, min_new_tokens=5, **search)
        np.testing.assert_array_equal(got[:, ids.shape[1]:], expected)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first-exit"), runtime.load(tmp_path / "step-exit"),
                                           video.numpy(), ids.numpy(), max_new_tokens=5)
    np.testing.assert_array_equal(got, exited_greedy_tokens(module, spec, video, ids, 5, exit_layer=2).numpy())


def test_images_of_llava_next_video(tmp_path):
    """LLaVA-NeXT-Video reads images as LLaVA-NeXT does (its any-resolution tiles, ``--image-size``): transformers'
    forward at a wide image after 2 tokens."""
    folder = tiny_llava_next(tmp_path / "ckpt", architecture=VIDEO_ARCHITECTURES[1])
    module, spec = with_text_before_image(*with_image_size(*load_checkpoint(str(folder)), (40, 90)), 2)
    assert spec.inputs[0].name == "pixel_values" and spec.inputs[0].shape == ("batch", 4, 3, 32, 32)
    pixels, ids = torch.randn(2, 4, 3, 32, 32), torch.randint(3, 62, (2, 7))
    p = module.num_visual_tokens
    prompt = torch.cat([ids[:, :2], torch.full((2, p), 62), ids[:, 2:]], 1)
    with torch.no_grad():
        expected = module.model(input_ids=prompt, pixel_values=pixels,
                                image_sizes=torch.tensor([[40, 90]] * 2)).logits[:, 2 + p:]
        np.testing.assert_allclose(module(pixels, ids).numpy(), expected.numpy(), atol=2e-5, rtol=1e-4)


def test_refusals(checkpoint, tmp_path):
    """A video where none is read (LLaVA), several clips, another frame size and no frames are refused by name with
    the fix, in the CLI (nothing written) and in Python; a clip of the wrong frame count too."""
    folder, module, spec = checkpoint
    llava = tiny_llava(tmp_path / "llava")
    result = run_cli("export", llava, "-o", tmp_path / "a.onnx", "--video-frames", 2, ok=False)
    assert_clean_error(result, "attnc reads no video of LlavaForConditionalGeneration", "without --video-frames",
                       "Qwen3VLForConditionalGeneration")
    for extra, words in ((("--text-before-image", "1,3"), ("per prompt, not 2", "one offset in --text-before-image")),
                         (("--image-size", "40x90"), ("frames at 32x32 pixels", "drop --image-size"))):
        result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--video-frames", 2, *extra, ok=False)
        assert_clean_error(result, *words)
    result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--video-frames", 0, ok=False)
    assert result.exit_code == 2 and "--video-frames" in result.output
    assert not any(tmp_path.glob("*.onnx"))
    with pytest.raises(ValueError, match=r"no \[batch, 3, channels"):
        module(torch.randn(1, 2, 3, 32, 32), torch.randint(0, 60, (1, 5)))


@pytest.mark.tensorrt
@pytest.mark.parametrize("checkpoint", ONEVISION_ONLY_IN_CI, indirect=True)
def test_tensorrt_builds_the_exited_clip(checkpoint, exported, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the statically exited video export (the frames' pooling a Resize or an
    AveragePool) at dynamic batch and text length, every attention fused."""
    tensorrt_or_skip()
    (_, _, spec), path = checkpoint, exported
    out = tmp_path / "engine"
    manifest = build_exited_engine(path, spec.inputs[0].shape[1:], BEFORE, out, pixels="pixel_values_videos")
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] >= 4


@pytest.mark.full(reason="the example's path on a clip (about 15 s); what it runs, export, exits, validation and both "
                         "generation graphs of a OneVision clip and a Qwen2-VL one, CI checks above and in "
                         "test_hf_qwen_video.py")
@pytest.mark.parametrize("model,tokens", [("onevision", 3 * PER_FRAME + 1), ("qwen2-vl", 2 * 4)])
def test_example_with_a_video(tmp_path, model, tokens):
    """examples/vision_language.py ``--model onevision --video-frames 3`` (and ``qwen2-vl``: 2 slices of 2 × 2
    blocks): every artefact validates, the tokens are transformers' ``generate``'s on the clip's placeholders, and
    exited the exited loop's from a smaller cache."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "vision_language.py"
    spec = importlib.util.spec_from_file_location("vision_language", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--model", model, "--video-frames", "3", "--width", "32", "--layers", "2",
                            "--generate", "4", "--reps", "3", "--prompt", "6", "--json", str(tmp_path / "run.json")])
    assert results["visual_tokens"] == tokens and results["video_frames"] == 3
    assert results["full"]["validation_passed"] and results["exit"]["validation_passed"]
    assert results["exit"]["vs_full_max_abs"] > 1e-3
    assert results["generation"]["tokens_equal"] and results["generation_exit"]["tokens_equal"]
    cache = results["generation_exit"]["prompt_cache_bytes"]
    assert cache["exit"] < cache["full"] and results["first_step_exit_validation_passed"]
    assert json.loads((tmp_path / "run.json").read_text())["video_frames"] == 3


@pytest.mark.parametrize("mode,stride,side", [("max", 2, 4), ("conv", 2, 4), ("average", 4, 4), ("average", 2, 5)])
def test_llava_next_video_pooling(tmp_path, mode, stride, side):
    """LLaVA-NeXT-Video's ``vision_resampler`` in each of its modes and strides, and a frame of an odd number of
    patches a side (5 × 5, pooled to 2 × 2): ``P`` counted without the tower is the one transformers' forward places,
    and the logits are its."""
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 image_size=8 * side, patch_size=8)
    text = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    vocab_size=64, max_position_embeddings=256, num_key_value_heads=2)
    tile = 8 * side
    config = transformers.LlavaNextVideoConfig(
        vision_config=transformers.CLIPVisionConfig(**tower, projection_dim=32), text_config=text,
        image_token_index=62, video_token_index=63, vision_feature_layer=-2, spatial_pool_mode=mode,
        spatial_pool_stride=stride, image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile]])
    folder = save_seeded(config, VIDEO_ARCHITECTURES[1], tmp_path / "ckpt")
    module, spec = with_video_frames(*with_text_before_image(*load_checkpoint(str(folder)), 2), 3)
    assert module.num_visual_tokens == 3 * (side // stride) ** 2
    video, ids = torch.randn(2, 3, 3, tile, tile), torch.randint(3, 62, (2, 6))
    with torch.no_grad():
        np.testing.assert_allclose(module(video, ids).numpy(),
                                   _transformers(module.model, video, ids, 2, module.num_visual_tokens),
                                   atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("side", [5, 7])
def test_onevision_odd_frames(tmp_path, side):
    """LLaVA-OneVision on frames of an odd number of patches a side (5 × 5 and 7 × 7, pooled bilinearly to 3 × 3 and
    4 × 4, ``ceil(side / 2)``): ``P`` and the logits are transformers'."""
    tile = 8 * side
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=tile,
                 patch_size=8)
    text = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    vocab_size=64, max_position_embeddings=256, num_key_value_heads=2)
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**tower), text_config=text, image_token_index=62,
        video_token_index=63, image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile]])
    folder = save_seeded(config, VIDEO_ARCHITECTURES[0], tmp_path / "ckpt")
    module, spec = with_video_frames(*with_text_before_image(*load_checkpoint(str(folder)), 1), 2)
    assert module.num_visual_tokens == 2 * ((side + 1) // 2) ** 2 + 1
    video, ids = torch.randn(2, 2, 3, tile, tile), torch.randint(3, 62, (2, 5))
    with torch.no_grad():
        np.testing.assert_allclose(module(video, ids).numpy(),
                                   _transformers(module.model, video, ids, 1, module.num_visual_tokens),
                                   atol=2e-5, rtol=1e-4)


def test_padded_clips(checkpoint):
    """Prompts of different lengths after a clip (``--with-attention-mask``): each row's logits at its tokens equal
    transformers' forward on that prompt alone, as they are and with the clip gone before layer 2 the exited
    forward's on it alone."""
    folder, module, spec = checkpoint
    masked, masked_spec = with_attention_mask(module, spec)
    assert masked_spec.input_names == ["pixel_values_videos", "input_ids", "attention_mask"]
    video, ids, mask = masked_spec.example_inputs(batch=3, seq=BEFORE + 7, seed=13)
    assert mask.sum(1).tolist() == [BEFORE + 7 - n for n in (0, 2, 4)]
    p = module.num_visual_tokens
    with torch.no_grad():
        logits, exited = masked(video, ids, mask).numpy(), masked(video, ids, mask, exit_layer=2).numpy()
        for row in range(3):
            tokens = ids[row][mask[row].bool()][None]
            n = tokens.shape[1] - BEFORE
            alone = _transformers(module.model, video[row:row + 1], tokens, BEFORE, p)
            np.testing.assert_allclose(logits[row, -n:], alone[0], atol=2e-5, rtol=1e-4)
            alone = module(video[row:row + 1], tokens, exit_layer=2).numpy()
            np.testing.assert_allclose(exited[row, -n:], alone[0], atol=2e-5, rtol=1e-4)
