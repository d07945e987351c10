"""The Qwen family's and GLM-4.1V's video (``attnc export --video-frames F``, models/hf_qwen_vl.py):
``pixel_values_videos [batch, F, 3, H, W]`` at the export's frame size, each two frames one slice of the tower's grid
(an odd count repeats the last), the slices' tokens one after the other after the first ``K`` text tokens (Qwen3-VL's
and GLM-4V's each slice after its own). The logits equal transformers'
forward on the video processor's own patch layout with ``video_grid_thw``, the 3-D positions ``get_rope_index``'s
(Qwen2.5-VL's slices ``tokens_per_second`` apart in time); the export records ``F``, runs in ONNX Runtime at other
batches and lengths, compiles with the clip gone before layer 2 and passes ``attnc validate``; both generation graphs
give ``generate``'s tokens (the later steps' positions shifted as transformers' ``rope_deltas``); a clip whose slices
outrun the text after it is refused for the steps, by name.

References: transformers' forward, ``get_rope_index`` and ``generate`` on patches cut here with numpy in the video
processor's layout (not attnc's convolution), fresh random clips at several frame counts, sizes, offsets and
batches (one drawn afresh each run).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import split_prompt
from attnc.compiler.onnx_io import IMAGE_SIZE, VIDEO_FPS, VIDEO_FRAMES, VISUAL_TOKENS, metadata
from attnc.testing import (QWEN_IMAGE_TOKEN, assert_clean_error, build_exited_engine, check_padded_prompts,
                           naming_the_draw, run_cli, tensorrt_or_skip, tiny_qwen_vl)

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.backends.onnxruntime import load as load_onnx  # noqa: E402
from attnc.models import hf_qwen_vl  # noqa: E402
from attnc.models.hf_checkpoint import (load_checkpoint, with_first_step, with_image_size, with_past,  # noqa: E402
                                        with_text_before_image, with_video_frames)
from attnc.models.hf_vision_language import interleave  # noqa: E402

VIDEO_TOKEN, VOCAB = 251, 256   # tiny_qwen_vl's video_token_id and vocabulary
SPOKEN = range(3, QWEN_IMAGE_TOKEN)   # its tokens past pad, bos, eos and before the image, video and delimiters
ARCHITECTURES = hf_qwen_vl.VIDEO_ARCHITECTURES
FRAMES, BEFORE = 3, 2   # the exports': a clip of 3 frames (2 slices, the last frame repeated) after 2 text tokens


@pytest.fixture(scope="module", params=[*ARCHITECTURES[:3], pytest.param(ARCHITECTURES[3], marks=pytest.mark.full(
    reason="Qwen3-VL's clip, which CI checks, with mixture-of-experts text layers (about 10 s)")), ARCHITECTURES[4]])
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint of each architecture (Qwen2.5-VL's slices ``tokens_per_second`` = 4 positions apart), its
    folder, module and spec."""
    folder = tiny_qwen_vl(tmp_path_factory.mktemp("qwen_video") / "ckpt", request.param)
    return folder, *load_checkpoint(str(folder))


def _size(module, blocks) -> tuple[int, int]:
    """The frame size of ``blocks`` rows and columns of merged patches."""
    vision = module.model.config.vision_config
    return tuple(b * vision.patch_size * vision.spatial_merge_size for b in blocks)


def _offsets(module, frames: int, before: int):
    """The clip after ``before`` text tokens: Qwen3-VL's and GLM-4V's each slice after 3 more (its timestamp and
    delimiters)."""
    if type(module.model).__name__ not in hf_qwen_vl.SLICES_APART:
        return before
    return tuple(before + 3 * i for i in range(hf_qwen_vl.slices(module.model.config.vision_config, frames)))


def _clip(checkpoint, frames, blocks, before):
    """The checkpoint's module and spec on a clip of ``frames`` frames of ``blocks`` after ``before`` tokens (Qwen3-VL's
    slices each after 3 more, :func:`_offsets`)."""
    _, module, spec = checkpoint
    placed = with_text_before_image(module, spec, _offsets(module, frames, before))
    return with_image_size(*with_video_frames(*placed, frames), _size(module, blocks))


def _patches(vision, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The video processor's ``pixel_values_videos`` and ``video_grid_thw`` of clips ``[B, F, C, H, W]`` already
    resized and normalised: the last frame repeated up to a multiple of ``temporal_patch_size``, each slice's patches
    in merge blocks row by row, a patch's values ``(C, frames, p, p)``."""
    p, m, t = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    v = video.numpy()
    if -v.shape[1] % t:
        v = np.concatenate([v, np.repeat(v[:, -1:], -v.shape[1] % t, 1)], 1)
    b, f, c, h, w = v.shape
    x = v.reshape(b, f // t, t, c, h // p // m, m, p, w // p // m, m, p).transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    grid = torch.tensor([[f // t, h // p, w // p]] * b)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(-1, c * t * p * p)), grid


def _inputs(module, video, ids):
    """transformers' keyword inputs of the prompt with the clip's placeholders where ``module``'s layout puts them."""
    layout = module.layout
    # GLM-4V's processor writes a clip's placeholders with its image token (the token types tell them apart)
    placeholder = QWEN_IMAGE_TOKEN if type(module.model).__name__ in hf_qwen_vl.GLM else VIDEO_TOKEN
    prompt = interleave(ids, torch.full((ids.shape[0], layout.tokens), placeholder), layout)
    types = torch.as_tensor(layout.is_visual(prompt.shape[1]), dtype=torch.int32).expand(len(ids), -1) * 2
    vision = module.model.config.vision_config
    patches, grid = _patches(vision, video)
    inputs = dict(input_ids=prompt, pixel_values_videos=patches, video_grid_thw=grid, mm_token_type_ids=types)
    if module.video_fps is not None:   # what Qwen2.5-VL's processor passes: the seconds each slice covers
        inputs["second_per_grid_ts"] = torch.tensor([vision.temporal_patch_size / module.video_fps] * len(ids))
    return inputs


def _rope(module, inputs):
    """``get_rope_index``'s positions and ``rope_deltas`` of transformers' inputs."""
    extra = {k: inputs[k] for k in ("second_per_grid_ts",) if k in inputs}
    return module.model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             video_grid_thw=inputs["video_grid_thw"], **extra)


def _transformers(module, video, ids, **generate):
    """transformers' forward (the logits of the text after the clip) or ``generate`` (the new tokens)."""
    inputs = _inputs(module, video, ids)
    with torch.no_grad():
        if generate:
            out = module.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), do_sample=False,
                                        **generate)
            return out[:, inputs["input_ids"].shape[1]:].numpy()
        return module.model(**inputs).logits[:, module.layout.end:].numpy()


def _check(checkpoint, frames, blocks, before, batch):
    """The module on fresh random clips against transformers' forward and ``get_rope_index``; another clip, and the
    frames in another order, change the logits."""
    module, _ = _clip(checkpoint, frames, blocks, before)
    slices = -(-frames // 2)
    assert module.num_visual_tokens == slices * blocks[0] * blocks[1]
    video = torch.randn(batch, frames, 3, *_size(module, blocks))
    ids = torch.randint(3, QWEN_IMAGE_TOKEN, (batch, module.layout.text_before_end + 5))
    expected = _transformers(module, video, ids)
    with torch.no_grad():
        np.testing.assert_allclose(module(video, ids).numpy(), expected, atol=2e-5, rtol=1e-4)
        assert np.abs(module(torch.randn_like(video), ids).numpy() - expected).max() > 1e-2
        if frames > 1:
            assert np.abs(module(video.flip(1), ids).numpy() - expected).max() > 1e-3
    inputs = _inputs(module, video, ids)
    positions = _rope(module, inputs)[0]
    torch.testing.assert_close(module.encoder.positions(module.layout.offsets, ids), positions, rtol=0, atol=0)


@pytest.mark.parametrize("frames,blocks,before,batch", [(4, (2, 3), 2, 2), (3, (1, 2), 0, 1), (1, (4, 4), 1, 1),
                                                        (6, (3, 1), 3, 3)])
def test_matches_the_transformers_forward(checkpoint, frames, blocks, before, batch):
    """Clips of 1-6 frames (odd counts the last repeated), square, wide and tall frames (Qwen2.5-VL's windows whole
    at 4 × 4 blocks, ragged elsewhere), 0-3 tokens in front, batch 1-3."""
    _check(checkpoint, frames, blocks, before, batch)


def test_matches_at_a_drawn_size(checkpoint):
    """The same at 1-7 frames of 1-4 × 1-4 blocks, 0-4 tokens in front and a batch of 1-3, drawn afresh each run."""
    rng = np.random.default_rng()
    frames, blocks = int(rng.integers(1, 8)), (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    before, batch = int(rng.integers(0, 5)), int(rng.integers(1, 4))
    with naming_the_draw(f"{frames} frames of {blocks} blocks, {before} tokens in front, batch {batch}"):
        _check(checkpoint, frames, blocks, before, batch)


BLOCKS = (2, 3)   # the one-pass export's frames: 2 × 3 merged blocks
_EXPORT_FULL = ("the export path CI checks on Qwen2-VL; this one's differs in its tower or in its positions, which CI "
                "checks against transformers in PyTorch (about 30 s)")
EXPORT_IN_CI = [ARCHITECTURES[0], *(pytest.param(a, marks=pytest.mark.full(reason=_EXPORT_FULL))
                                    for a in (*ARCHITECTURES[1:3], ARCHITECTURES[4]))]


def _placement(module, frames: int = FRAMES, blocks=BLOCKS) -> tuple:
    """The CLI options of the clip :func:`_clip` builds."""
    offsets = _offsets(module, frames, BEFORE)
    return ("--video-frames", frames, "--text-before-image", ",".join(map(str, np.atleast_1d(offsets))),
            "--image-size", "x".join(map(str, _size(module, blocks))))


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint's dynamo export of a clip of :data:`FRAMES` frames of :data:`BLOCKS` after :data:`BEFORE`
    tokens, through the CLI."""
    folder = checkpoint[0]
    path = folder.parent / "video.onnx"
    run_cli("export", folder, "-o", path, *_placement(checkpoint[1]))
    return path


@pytest.mark.parametrize("checkpoint", EXPORT_IN_CI, indirect=True)
def test_export_exit_and_validate(checkpoint, exported, tmp_path):
    """The dynamo export records ``F``, ``P`` and the frame size; ONNX Runtime equals transformers at batch 1 and 3
    and other text lengths; compiled with the clip gone before layer 2 it passes ``attnc validate`` (which rebuilds
    the checkpoint with the recorded clip) and the exit changes the logits."""
    folder, path = checkpoint[0], exported
    module, spec = _clip(checkpoint, FRAMES, BLOCKS, BEFORE)
    size = "x".join(map(str, module.image_size))
    graph = onnx.load(path)
    assert {key: metadata(graph, key) for key in (VIDEO_FRAMES, VISUAL_TOKENS, IMAGE_SIZE)} == \
        {VIDEO_FRAMES: str(FRAMES), VISUAL_TOKENS: "12", IMAGE_SIZE: size}
    apart = type(module.model).__name__ in hf_qwen_vl.SLICES_APART   # Qwen3-VL: each slice after its own offset
    said = " ".join(run_cli("inspect", path).output.split())   # as one line: the console wraps it
    assert f"12 visual tokens of a video of {FRAMES} {size} frames {'in 2 slices each ' if apart else ''}after" in said
    model, front = load_onnx(path), module.layout.text_before_end
    for batch, seq in ((1, front + 1), (3, front + 9)):
        video, ids = spec.example_inputs(batch=batch, seq=seq, seed=batch + 40)
        got = next(iter(model.infer({"pixel_values_videos": video.numpy(), "input_ids": ids.numpy()}).values()))
        np.testing.assert_allclose(got, _transformers(module, video, ids), atol=2e-5, rtol=1e-4)
    run_cli("compile", path, "-o", tmp_path / "exit", "--token-exit", "static", "--exit-layer", 2)
    assert "PASS" in run_cli("validate", tmp_path / "exit", "--model", folder).output
    report = json.loads((tmp_path / "exit" / "report.json").read_text())
    assert report["passed"] and report["shrink_cost"][0]["max_abs_error"] > 1e-3


@pytest.mark.parametrize("frames,blocks", [(3, (2, 4)), (4, (4, 1)), (2, (2, 3)), (1, (1, 1))])
def test_steps_in_pytorch(checkpoint, frames, blocks):
    """The first step and the later steps in PyTorch (the graphs' modules) decode ``generate``'s greedy tokens on clips
    of 1-4 frames whose last slice lies at most as far in time as the text after the clip starts (Qwen2.5-VL's
    second slice 4 positions on at 4 blocks: exactly there), each step's logits transformers' forward's over the
    prompt and the tokens so far, the steps' shift ``get_rope_index``'s ``rope_deltas``."""
    _check_steps(*_clip(checkpoint, frames, blocks, BEFORE))


def _check_steps(module, spec):
    """The first step and the later steps of ``module`` in PyTorch against ``generate`` and the forward (above)."""
    (first, _), (step, _) = with_first_step(module, spec), with_past(module, spec)
    video, ids = spec.example_inputs(batch=2, seq=module.layout.text_before_end + 4,
                                     seed=int(np.random.default_rng().integers(1 << 16)))
    inputs = _inputs(module, video, ids)
    deltas = _rope(module, inputs)[1]
    assert deltas.ravel().tolist() == [step.position_shift] * 2
    tokens, mask, steps = ids, torch.ones(2, inputs["input_ids"].shape[1], dtype=torch.int64), []
    with torch.no_grad():
        logits, *cache = first(video, ids)
        for _ in range(5):   # no end of text, nor an image, video or delimiter token (the forward would read it)
            chosen = logits[:, -1, SPOKEN].argmax(-1, keepdim=True) + SPOKEN.start
            tokens, mask = torch.cat([tokens, chosen], 1), torch.cat([mask, torch.ones_like(chosen)], 1)
            logits, *cache = step(chosen, mask, *cache)
            steps.append(logits[:, -1])
    expected = _transformers(module, video, ids, max_new_tokens=5, min_new_tokens=5,
                             suppress_tokens=[t for t in range(VOCAB) if t not in SPOKEN])
    np.testing.assert_array_equal(tokens[:, ids.shape[1]:].numpy(), expected)
    forward = _transformers(module, video, tokens)   # every step's logits, the new tokens' positions counted
    np.testing.assert_allclose(torch.stack(steps, 1).numpy(), forward[:, -5:], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[1]], indirect=True)
@pytest.mark.parametrize("fps,frames,blocks", [(3.0, 3, (2, 3)), (0.5, 1, (2, 2)), (1.0, 3, (3, 4)), (4.0, 5, (2, 3)),
                                               (6.0, 7, (3, 3))])
def test_frame_rate(checkpoint, fps, frames, blocks):
    """Qwen2.5-VL's clip sampled at ``fps`` (``--video-fps``: the processor's ``second_per_grid_ts`` = 2 / fps, the
    slices ``tokens_per_second × 2 / fps`` apart, truncated in float32 as transformers truncates them): the logits
    equal transformers' forward given those seconds and the positions ``get_rope_index``'s; where the last slice
    stays within the text after it, the steps decode ``generate``'s tokens with its ``rope_deltas``, else they are
    refused by name."""
    module, spec = with_video_frames(*_clip(checkpoint, frames, blocks, BEFORE), frames, fps)
    assert module.video_fps == fps and module.placement[3] == fps
    video = torch.randn(2, frames, 3, *_size(module, blocks))
    ids = torch.randint(3, QWEN_IMAGE_TOKEN, (2, module.layout.text_before_end + 5))
    with torch.no_grad():
        np.testing.assert_allclose(module(video, ids).numpy(), _transformers(module, video, ids), atol=2e-5, rtol=1e-4)
    positions = _rope(module, _inputs(module, video, ids))[0]
    torch.testing.assert_close(module.encoder.positions(module.layout.offsets, ids), positions, rtol=0, atol=0)
    last = int(hf_qwen_vl.slice_times(module.model.config.vision_config, -(-frames // 2), fps)[-1])
    if last <= max(blocks):
        _check_steps(module, spec)
    else:
        with pytest.raises(AttncError, match="past the text after the clip"):
            with_past(module, spec)


@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[1]], indirect=True)
def test_frame_rate_recorded(checkpoint, tmp_path):
    """``attnc export --video-fps 3`` records the rate (``inspect`` says it); the exited export passes ``attnc
    validate``, which rebuilds the checkpoint at that rate: without the record (the default 2 frames a second) it
    fails, the slices' positions being others. Qwen2-VL, whose positions read no rate, and a rate without a clip are
    refused by name."""
    folder = checkpoint[0]
    path = tmp_path / "video.onnx"
    run_cli("export", folder, "-o", path, *_placement(checkpoint[1], frames=5), "--video-fps", 3)
    assert metadata(onnx.load(path), VIDEO_FPS) == "3.0"
    assert "frames at 3 a second" in " ".join(run_cli("inspect", path).output.split())
    run_cli("compile", path, "-o", tmp_path / "exit", "--token-exit", "static", "--exit-layer", 2)
    assert "PASS" in run_cli("validate", tmp_path / "exit", "--model", folder).output
    manifest = json.loads((tmp_path / "exit" / "manifest.json").read_text())
    del manifest["recorded"][VIDEO_FPS]
    (tmp_path / "exit" / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("validate", tmp_path / "exit", "--model", folder, ok=False).exit_code != 0
    qwen2 = tiny_qwen_vl(tmp_path / "qwen2")
    for options, words in ((("--video-frames", 3, "--video-fps", 1), ("positions do not read a frame rate",)),
                           (("--video-fps", 1), ("no clip is asked for", "--video-frames F"))):
        assert_clean_error(run_cli("export", qwen2, "-o", tmp_path / "a.onnx", *options, ok=False), *words)
    assert not (tmp_path / "a.onnx").exists()


@pytest.mark.full(reason="the generation graphs CI exports and decodes on Qwen2-VL's images (test_hf_qwen_vl.py); a "
                         "clip changes the first step's encoder, which CI exports in the one-pass graph, and the later "
                         "steps' shift, which CI checks in PyTorch (test_steps_in_pytorch; about 40 s)")
def test_generation(checkpoint, tmp_path):
    """``--first-step`` and ``--with-past`` on a clip of 3 frames of 2 × 4 blocks (Qwen2.5-VL's 2 slices 4 positions
    apart, within the text after it) compile; the pair's greedy and beam tokens equal transformers' ``generate``, whose
    later steps continue from ``rope_deltas``."""
    folder = checkpoint[0]
    module, spec = _clip(checkpoint, FRAMES, (2, 4), BEFORE)
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *_placement(module, blocks=(2, 4)))
        run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / name)
    first, step = runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step")
    video, ids = spec.example_inputs(batch=2, seq=module.layout.text_before_end + 4, seed=31)
    # transformers' beam search of GLM-4V fails on a clip (its _expand_multimodal_outputs of the video's features)
    searches = ({}, 6), ({"num_beams": 2}, 4)
    for search, new in searches[:1] if type(module.model).__name__ in hf_qwen_vl.GLM else searches:
        got = runtime.generate_vision_language(first, step, video.numpy(), ids.numpy(), max_new_tokens=new, **search)
        expected = _transformers(module, video, ids, max_new_tokens=new, min_new_tokens=new, **search)
        np.testing.assert_array_equal(got[:, ids.shape[1]:], expected)


def test_padded_prompts(checkpoint):
    """``--with-attention-mask``: prompts of different lengths in one batch, each padded after the text in front of the
    clip; each row's logits at its tokens equal transformers' forward on that prompt alone."""
    module, spec = _clip(checkpoint, FRAMES, BLOCKS, BEFORE)
    check_padded_prompts(module, spec, lambda video, tokens: _transformers(module, video, tokens))


@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[2]], indirect=True)
def test_offsets_read_off_the_processors_prompt(checkpoint):
    """Qwen3-VL's prompt as its processor writes it (each slice's placeholders after its timestamp and delimiters):
    ``split_prompt`` with the video token and one slice's tokens gives the text and the offsets its export takes, and
    the module on them equals transformers' forward on that prompt."""
    module, spec = _clip(checkpoint, 5, (1, 2), 1)
    layout = module.layout
    video, ids = spec.example_inputs(batch=2, seq=layout.text_before_end + 3, seed=3)
    prompt = _inputs(module, video, ids)["input_ids"]
    text, offsets = split_prompt(prompt.numpy(), VIDEO_TOKEN, layout.per_image)
    assert offsets == layout.offsets == (1, 4, 7) and np.array_equal(text, ids.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(module(video, torch.from_numpy(text)).numpy(), _transformers(module, video, ids),
                                   atol=2e-5, rtol=1e-4)


def test_refusals(checkpoint, tmp_path):
    """The steps of a clip whose last slice lies past the text after it (Qwen2.5-VL: 2 slices 4 apart at 2 × 3
    blocks; Qwen2-VL: 5 slices 1 apart) are refused by name with the fix, in Python and in the CLI (nothing written);
    the one-pass module takes it. Qwen3-VL's clip without an offset for each slice is refused alike. A clip of the
    wrong frame count is refused."""
    folder, module, spec = checkpoint
    if type(module.model).__name__ in hf_qwen_vl.SLICES_APART:   # each slice after its own timestamp
        with pytest.raises(AttncError, match="so the prompt takes 2 offsets, not 1") as caught:
            with_video_frames(*with_text_before_image(module, spec, BEFORE), FRAMES)
        assert "split_prompt" in caught.value.fix
        result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--video-frames", FRAMES, "--text-before-image",
                         "1,4,7", ok=False)
        assert_clean_error(result, "3 frames make 2 slices", "takes 2 offsets, not 3", "--text-before-image")
        assert not any(tmp_path.glob("*.onnx"))
        return
    frames = FRAMES if type(module.model).__name__ == ARCHITECTURES[1] else 9
    clip, spec = _clip(checkpoint, frames, (2, 3), BEFORE)
    with pytest.raises(AttncError, match="past the text after the clip") as caught:
        with_past(clip, spec)
    assert "the one-pass export takes this clip" in caught.value.fix
    size = "x".join(map(str, clip.image_size))
    result = run_cli("export", folder, "-o", tmp_path / "step.onnx", "--with-past", "--video-frames", frames,
                     "--text-before-image", BEFORE, "--image-size", size, ok=False)
    assert_clean_error(result, f"a clip of {frames} frames at {size} pixels", "at most")
    assert not any(tmp_path.glob("*.onnx"))
    with pytest.raises(ValueError, match=rf"no \[batch, {frames}, channels"):
        clip(torch.randn(1, frames + 1, 3, *clip.image_size), torch.randint(3, 200, (1, BEFORE + 2)))


@pytest.mark.tensorrt
@pytest.mark.full(reason="TensorRT-RTX's build of a clip CI checks on LLaVA-OneVision's (test_hf_video.py) and of "
                         "Qwen's tower on its images (test_hf_qwen_vl.py); this adds the 3-D patch convolution (about "
                         "20 s)")
@pytest.mark.parametrize("checkpoint", ARCHITECTURES[:5], indirect=True)
def test_tensorrt_builds_the_exited_clip(checkpoint, exported, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the statically exited export (the tower's 3-D patch convolution) at
    dynamic batch and text length, every attention fused."""
    tensorrt_or_skip()
    module, spec = _clip(checkpoint, FRAMES, BLOCKS, BEFORE)
    out = tmp_path / "engine"
    manifest = build_exited_engine(exported, spec.inputs[0].shape[1:], module.layout.text_before_end, out,
                                   pixels="pixel_values_videos")
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] >= 4
