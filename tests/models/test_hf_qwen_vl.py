"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V checkpoints (models/hf_qwen_vl.py): a checkpoint directory loads as
``(pixel_values [B, 3, H, W], input_ids) -> logits of the text after the image`` at the image size ``--image-size``
names, equal to transformers' forward on the processor's own patches of the same image (3-D M-RoPE positions,
Qwen2.5-VL's windows, Qwen3-VL's deepstack, GLM-4V's resampled position table); it exports (dynamo; TorchScript
with plain multi-head attention), records its image size, compiles with and without a visual-token exit, and
``attnc validate`` checks the artefacts against the checkpoint exiting alike in PyTorch; both generation graphs decode
transformers' ``generate`` tokens (a loop over the exited forward with the exit), padded prompts each row's alone.
Qwen3-VL-MoE, GLM-4.5V (MoE) and GLM-4.6V run in the ``full`` tier.

References: transformers' forward and ``generate`` on the patches ``Qwen2VLImageProcessorPil`` (GLM-4V:
``Glm4vImageProcessorPil``) cuts (not attnc's convolution), ``get_rope_index``'s positions, fresh random images and
prompts at several image sizes (square, wide, tall; Qwen2.5-VL's windows whole and ragged).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import FIRST_EXIT_LAYER, IMAGE_SIZE, VISUAL_OFFSET, VISUAL_TOKENS, metadata
from attnc.testing import (QWEN_IMAGE_TOKEN, assert_clean_error, build_exited_engine, exited_greedy_tokens,
                           naming_the_draw, run_cli, tensorrt_or_skip, tiny_llava, tiny_qwen_vl)

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.backends.onnxruntime import load as load_onnx  # noqa: E402
from attnc.models import hf_qwen_vl  # noqa: E402
from attnc.models.hf_checkpoint import (load_checkpoint, with_attention_mask, with_image_size,  # noqa: E402
                                        with_past, with_text_before_image)
from attnc.models.hf_vision_language import interleave  # noqa: E402

ARCHITECTURES = hf_qwen_vl.ARCHITECTURES
BLOCKS, BEFORE = (2, 3), 3   # the exports': 2 × 3 visual tokens (blocks of patch × merge pixels) after 3 text tokens


def _pixels(module, blocks) -> tuple[int, int]:
    """The image size of ``blocks`` rows and columns of merged patches (28 pixels for Qwen2-VL, 32 for Qwen3-VL)."""
    vision = module.model.config.vision_config
    return tuple(b * vision.patch_size * vision.spatial_merge_size for b in blocks)


@pytest.fixture(scope="module", params=[*ARCHITECTURES[:3], pytest.param(ARCHITECTURES[3], marks=pytest.mark.full(
    reason="Qwen3-VL's path, which CI checks, with mixture-of-experts text layers (transformers' batched_mm, which "
           "CI's MoE text models take); about 30 s")), ARCHITECTURES[4], *(pytest.param(a, marks=pytest.mark.full(
        reason="GLM-4.1V's tower, which CI checks, with GLM-4.5V's mixture-of-experts text layers or GLM-4.6V's "
               "wrapper; about 30 s")) for a in ARCHITECTURES[5:])])
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint of each architecture (4 query on 2 K/V heads), its module and spec at :data:`BLOCKS` with
    :data:`BEFORE` text tokens in front of the image."""
    folder = tiny_qwen_vl(tmp_path_factory.mktemp("qwen") / "ckpt", request.param)
    module, spec = load_checkpoint(str(folder))
    module, spec = with_text_before_image(*with_image_size(module, spec, _pixels(module, BLOCKS)), BEFORE)
    return folder, module, spec


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint's dynamo export through the CLI (a fixture apart: the tests in PyTorch alone skip it)."""
    folder, module, _ = checkpoint
    path = folder.parent / "model.onnx"
    run_cli("export", folder, "-o", path, "--image-size", "x".join(map(str, module.image_size)),
            "--text-before-image", BEFORE)
    return path


def _processed(vision, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's patches and grid of images already resized and normalised (it only cuts them), for a tower of
    config ``vision``."""
    glm = type(vision).__name__.startswith("Glm4v")   # each architecture's own processor cuts its patches
    processor = (transformers.Glm4vImageProcessorPil if glm else transformers.Qwen2VLImageProcessorPil)(
        do_resize=False, do_rescale=False, do_normalize=False, patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size)
    out = processor([image.numpy() for image in pixels], return_tensors="pt", input_data_format="channels_first")
    return out["pixel_values"], out["image_grid_thw"]


def _prompt(ids: torch.Tensor, p: int, before: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[ids[:, :before]; <image> × p; ids[:, before:]]`` and its token types (1 at the image)."""
    image = torch.full((ids.shape[0], p), QWEN_IMAGE_TOKEN)
    prompt = torch.cat([ids[:, :before], image, ids[:, before:]], 1)
    types = torch.zeros_like(prompt, dtype=torch.int32)
    types[:, before:before + p] = 1
    return prompt, types


def _transformers(hf, pixels, ids, p, before, **generate):
    """transformers' forward (logits of the text after the image) or, with ``generate`` options, its new tokens."""
    patches, grid = _processed(hf.config.vision_config, pixels)
    prompt, types = _prompt(ids, p, before)
    with torch.no_grad():
        if generate:
            out = hf.generate(input_ids=prompt, pixel_values=patches, image_grid_thw=grid, mm_token_type_ids=types,
                              attention_mask=torch.ones_like(prompt), do_sample=False, **generate)
            return out[:, prompt.shape[1]:].numpy()
        return hf(input_ids=prompt, pixel_values=patches, image_grid_thw=grid,
                  mm_token_type_ids=types).logits[:, before + p:].numpy()


@pytest.mark.parametrize("blocks,before,batch", [((2, 3), 0, 1), ((3, 2), 3, 3), ((4, 4), 2, 2), ((1, 2), 1, 2),
                                                 ((3, 1), 2, 1)])
def test_matches_the_transformers_forward(checkpoint, blocks, before, batch):
    """At square, wide and tall sizes, one block wide too (Qwen2.5-VL's windows of 2 × 2 merged blocks whole at 4 × 4
    blocks and one at 1 × 2, attending as a batch of windows, ragged at the others, under a block mask; Qwen3-VL's
    position table resampled to each), the image after 0-3 text tokens: the logits equal transformers' forward on the
    processor's patches, the 3-D positions ``get_rope_index``'s, and a different image changes the logits (the image
    is read)."""
    module = _check_forward(checkpoint, blocks, before, batch)
    if module.encoder.windowed:   # windows of one size (4 of 2 × 2 blocks, or one) attend as a batch, ragged ones not
        assert module.encoder.windows == {(4, 4): 4, (1, 2): 1}.get(blocks)


def test_matches_at_a_drawn_size(checkpoint):
    """The same at an image of 1-5 × 1-5 merged blocks, 0-4 text tokens in front of it and a batch of 1-3, drawn
    afresh each run (named in the failure message)."""
    rng = np.random.default_rng()
    blocks, before, batch = (int(rng.integers(1, 6)), int(rng.integers(1, 6))), int(rng.integers(0, 5)), \
        int(rng.integers(1, 4))
    with naming_the_draw(f"{blocks} blocks, {before} tokens in front, batch {batch}"):
        _check_forward(checkpoint, blocks, before, batch)


def _check_forward(checkpoint, blocks, before, batch):
    """The checkpoint's module at ``blocks`` merged blocks with ``before`` text tokens in front of the image against
    transformers' forward and ``get_rope_index`` on fresh random inputs; returns the module."""
    _, module, spec = checkpoint
    size = _pixels(module, blocks)
    module, spec = with_text_before_image(*with_image_size(module, spec, size), before)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    pixels = torch.randn(batch, 3, *size, generator=generator)
    ids = torch.randint(3, QWEN_IMAGE_TOKEN, (batch, before + 5), generator=generator)
    p = module.num_visual_tokens
    assert p == blocks[0] * blocks[1]
    with torch.no_grad():
        got = module(pixels, ids).numpy()
        other = module(torch.randn_like(pixels), ids).numpy()
    expected = _transformers(module.model, pixels, ids, p, before)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert np.abs(other - expected).max() > 1e-2
    prompt, types = _prompt(ids, p, before)
    grid = _processed(module.model.config.vision_config, pixels)[1]
    positions, _ = module.model.model.get_rope_index(prompt, mm_token_type_ids=types, image_grid_thw=grid)
    torch.testing.assert_close(module.encoder.positions(before, ids), positions, rtol=0, atol=0)
    return module


@pytest.mark.full(reason="the export of Qwen2.5-VL's windows CI checks at ragged windows (the block mask); the batch "
                         "of whole windows CI checks against transformers in PyTorch (about 16 s)")
@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[1]], indirect=True)
def test_batched_windows_export(checkpoint, tmp_path):
    """Qwen2.5-VL at 4 × 4 blocks (its windows of one size, attending as a batch of windows) exports and runs in ONNX
    Runtime at batch 1 and 3, equal to transformers' forward."""
    folder, module, spec = checkpoint
    size = _pixels(module, (4, 4))
    module, spec = with_image_size(module, spec, size)
    assert module.encoder.windows == 4
    path = tmp_path / "windows.onnx"
    run_cli("export", folder, "-o", path, "--image-size", "x".join(map(str, size)), "--text-before-image", BEFORE)
    model = load_onnx(path)
    for batch in (1, 3):
        pixels, ids = spec.example_inputs(batch=batch, seq=BEFORE + 4, seed=batch + 10)
        got = next(iter(model.infer({"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}).values()))
        np.testing.assert_allclose(got, _transformers(module.model, pixels, ids, 16, BEFORE), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("architecture", ARCHITECTURES[:2])
def test_torchscript_export(tmp_path, architecture):
    """With plain multi-head attention (TorchScript cannot export SDPA's grouped-query form), the TorchScript
    exporter's graph takes any batch and text length, equal to transformers' forward at sizes other than the
    export's, and its static exit validates."""
    folder = tiny_qwen_vl(tmp_path / "ckpt", architecture, kv_heads=4)
    module, spec = load_checkpoint(str(folder))
    size = _pixels(module, BLOCKS)
    module, spec = with_text_before_image(*with_image_size(module, spec, size), BEFORE)
    path = tmp_path / "ts.onnx"
    run_cli("export", folder, "-o", path, "--exporter", "torchscript", "--image-size", "x".join(map(str, size)),
            "--text-before-image", BEFORE)
    model = load_onnx(path)
    for batch, seq in ((1, BEFORE + 2), (3, BEFORE + 13)):
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=batch + 20)
        got = next(iter(model.infer({"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}).values()))
        np.testing.assert_allclose(got, _transformers(module.model, pixels, ids, 6, BEFORE), atol=2e-5, rtol=1e-4)
    run_cli("compile", path, "-o", tmp_path / "exit", "--token-exit", "static", "--exit-layer", 2)
    assert "PASS" in run_cli("validate", tmp_path / "exit", "--model", folder).output


def test_padded_prompts(checkpoint):
    """``--with-attention-mask``: prompts of different lengths in one batch, each padded after the text in front of the
    image; each row's logits at its tokens equal transformers' forward on that prompt alone, with the image gone
    before layer 2 the exited forward's on it alone."""
    _, module, spec = checkpoint
    masked, masked_spec = with_attention_mask(module, spec)
    pixels, ids, mask = masked_spec.example_inputs(batch=3, seq=BEFORE + 7, seed=int(np.random.randint(1 << 30)))
    assert mask.sum(1).tolist() == [BEFORE + 7 - n for n in (0, 2, 4)]
    with torch.no_grad():
        logits, exited = masked(pixels, ids, mask).numpy(), masked(pixels, ids, mask, exit_layer=2).numpy()
        for row in range(3):
            tokens = ids[row][mask[row].bool()][None]
            n = tokens.shape[1] - BEFORE
            alone = _transformers(module.model, pixels[row:row + 1], tokens, module.num_visual_tokens, BEFORE)
            np.testing.assert_allclose(logits[row, -n:], alone[0], atol=2e-5, rtol=1e-4)
            np.testing.assert_allclose(exited[row, -n:], module(pixels[row:row + 1], tokens, exit_layer=2)[0].numpy(),
                                       atol=2e-5, rtol=1e-4)


# the one-pass export's architectures in CI: Qwen2.5-VL (windows), Qwen3-VL (deepstack) and GLM-4.1V (Qwen2-VL's tower
# with a resampled position table and a merging convolution); the others in the full tier
_EXPORT_FULL = ("the one-pass export path CI checks on GLM-4.1V, whose tower is this one's with more (Qwen2-VL), or on "
                "this one's dense sibling (MoE, GLM-4.6V); its generation graphs or forward CI checks (about 15 s)")
EXPORTED_IN_CI = [a if a in (ARCHITECTURES[1], ARCHITECTURES[2], ARCHITECTURES[4]) else
                  pytest.param(a, marks=pytest.mark.full(reason=_EXPORT_FULL)) for a in ARCHITECTURES]


@pytest.mark.parametrize("checkpoint", EXPORTED_IN_CI, indirect=True)
def test_export_exit_and_validate(checkpoint, exported, tmp_path):
    """The export records ``P``, ``K`` and the image size, takes any batch and text length (ONNX Runtime equals
    transformers at sizes other than the export's); compiled as it is and with the image gone before layer 2
    (static) or a gate deciding there (dynamic, trained by ``attnc train-exit-gate``), or exited with half its heads
    pruned, each artefact passes ``attnc validate`` against the checkpoint shrunk alike, and the exits change the
    logits. Qwen3-VL records the first layer
    an exit may precede (after its deepstack layers): an earlier exit is refused, compiled and in PyTorch."""
    (folder, module, spec), path = checkpoint, exported
    model, graph = load_onnx(path), onnx.load(path)
    size = "x".join(map(str, module.image_size))
    deepstack = module.model.config.vision_config.to_dict().get("deepstack_visual_indexes", [])
    recorded = {key: metadata(graph, key) for key in (VISUAL_TOKENS, VISUAL_OFFSET, IMAGE_SIZE, FIRST_EXIT_LAYER)}
    assert recorded == {VISUAL_TOKENS: "6", VISUAL_OFFSET: str(BEFORE), IMAGE_SIZE: size,
                        FIRST_EXIT_LAYER: str(len(deepstack)) if deepstack else None}
    assert f"6 visual tokens of a {size} image after 3 text tokens" in run_cli("inspect", path).output
    for batch, seq in ((1, BEFORE + 1), (3, BEFORE + 11)):
        pixels, ids = spec.example_inputs(batch=batch, seq=seq, seed=batch)
        got = model.infer({"pixel_values": pixels.numpy(), "input_ids": ids.numpy()})
        expected = _transformers(module.model, pixels, ids, 6, BEFORE)
        np.testing.assert_allclose(next(iter(got.values())), expected, atol=2e-5, rtol=1e-4)
    calibration = tmp_path / "calib.npz"
    pixels, ids = spec.example_inputs(batch=8, seq=BEFORE + 4, seed=5)
    np.savez(calibration, pixel_values=pixels.numpy(), input_ids=ids.numpy())
    run_cli("train-exit-gate", folder, "-o", tmp_path / "gate.npz", "--layer", 2, "--calibration", calibration,
            "--steps", 20, "--image-size", size, "--text-before-image", BEFORE)
    for name, options in (("plain", ()), ("static", ("--token-exit", "static", "--exit-layer", 2)),
                          ("dynamic", ("--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz")),
                          ("pruned", ("--token-exit", "static", "--exit-layer", 2, "--prune-heads", 0.5,
                                      "--prune-method", "weight"))):
        run_cli("compile", path, "-o", tmp_path / name, *options)
        assert "PASS" in run_cli("validate", tmp_path / name, "--model", folder).output
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["passed"]
    report = json.loads((tmp_path / "static" / "report.json").read_text())
    assert report["shrink_cost"][0]["max_abs_error"] > 1e-3
    manifest = json.loads((tmp_path / "pruned" / "manifest.json").read_text())
    assert manifest["shrink"]["prune_heads"]["heads_after"] < manifest["shrink"]["prune_heads"]["heads_before"]
    if deepstack:   # Qwen3-VL: no exit in front of the layers its deepstack feeds, in ONNX or in PyTorch
        result = run_cli("compile", path, "-o", tmp_path / "early", "--token-exit", "static", "--exit-layer", 1,
                         ok=False)
        assert_clean_error(result, "deepstack", f"exit before layer {len(deepstack)} or later")
        assert not (tmp_path / "early").exists()
        with pytest.raises(AttncError, match="deepstack"):
            module(pixels, ids, exit_layer=1)
        step, step_spec = with_past(module, spec)   # nor a later step reading caches no first step leaves
        with pytest.raises(AttncError, match="deepstack"):
            step(*step_spec.example_inputs(), exit_layer=1)


@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[0], pytest.param(ARCHITECTURES[1], marks=pytest.mark.full(
    reason="the generation path CI checks on Qwen2-VL, whose later steps Qwen2.5-VL shares (about 30 s)")),
    pytest.param(ARCHITECTURES[2], marks=pytest.mark.full(
        reason="the generation path CI checks on Qwen2-VL, with Qwen3-VL's deepstack in the first step (about 30 s; "
               "CI validates its one-pass export)")),
    pytest.param(ARCHITECTURES[3], marks=pytest.mark.full(reason="Qwen3-VL's, with MoE layers")),
    pytest.param(ARCHITECTURES[4], marks=pytest.mark.full(
        reason="the generation path CI checks on Qwen2-VL, whose positions GLM-4.1V's are (about 30 s; CI validates "
               "its one-pass export)"))],
    indirect=True)
def test_generation(checkpoint, tmp_path):
    """``--first-step`` and ``--with-past`` at the export's image size compile as they are and exited before layer 2
    (the exited pair validates against the checkpoint exiting alike). The pair's greedy tokens equal transformers'
    ``generate`` (the later steps' positions shifted as M-RoPE places the text after the image), with the exit a
    greedy loop over the exited forward. Qwen2-VL's prompts are padded, each row's tokens ``generate``'s on the prompt
    alone, greedy and with beam search (which the decoder runs alike for every architecture)."""
    folder, module, spec = checkpoint
    size = ("--image-size", "x".join(map(str, module.image_size)), "--text-before-image", BEFORE)
    padded = type(module.model).__name__ == ARCHITECTURES[0]
    masked = ("--with-attention-mask",) if padded else ()
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *size, *masked)
        for tag, exit_options in (("", ()), ("_exit", ("--token-exit", "static", "--exit-layer", 2))):
            run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / f"{name}{tag}", *exit_options)
        run_cli("validate", tmp_path / f"{name}_exit", "--model", folder)
    pairs = {tag: (runtime.load(tmp_path / f"first{tag}"), runtime.load(tmp_path / f"step{tag}"))
             for tag in ("", "_exit")}
    if padded:
        masked_spec = with_attention_mask(module, spec)[1]
        pixels, ids, mask = masked_spec.example_inputs(batch=2, seq=BEFORE + 6, seed=21)   # the second row padded
        rows = [(pixels[r:r + 1], ids[r][mask[r].bool()][None]) for r in range(2)]
        extra = (mask.numpy(),)
    else:
        pixels, ids = spec.example_inputs(batch=2, seq=BEFORE + 5, seed=21)
        rows, extra = [(pixels, ids)], ()
    got = runtime.generate_vision_language(*pairs[""], pixels.numpy(), ids.numpy(), *extra, max_new_tokens=5)
    exited = runtime.generate_vision_language(*pairs["_exit"], pixels.numpy(), ids.numpy(), *extra, max_new_tokens=5)
    beams = runtime.generate_vision_language(*pairs[""], pixels.numpy(), ids.numpy(), *extra, max_new_tokens=4,
                                             num_beams=3) if padded else None
    start = ids.shape[1]
    for i, (image, tokens) in enumerate(rows):
        span = slice(i, i + 1) if padded else slice(None)
        expected = _transformers(module.model, image, tokens, 6, BEFORE, max_new_tokens=5, min_new_tokens=5)
        np.testing.assert_array_equal(got[span, start:], expected)
        if beams is not None:
            expected = _transformers(module.model, image, tokens, 6, BEFORE, max_new_tokens=4, min_new_tokens=4,
                                     num_beams=3)
            np.testing.assert_array_equal(beams[span, start:], expected)
        loop = tokens
        with torch.no_grad():
            for _ in range(5):
                loop = torch.cat([loop, module(image, loop, exit_layer=2)[:, -1].argmax(-1, keepdim=True)], 1)
        np.testing.assert_array_equal(exited[span, start:], loop[:, tokens.shape[1]:].numpy())
    assert not np.array_equal(got, exited)   # the exit changes the answer: the exited step is the one that ran


def _several(module, pixels, ids, **generate):
    """transformers' forward (logits of the text after the last image) or ``generate`` (the new tokens) on ``ids``
    with every image's placeholders where ``module``'s layout puts them, the images' patches one after the other; and
    ``get_rope_index``'s positions of that prompt."""
    layout = module.layout
    patches, grid = _processed(module.model.config.vision_config, pixels.flatten(0, 1))
    prompt = interleave(ids, torch.full((len(ids), layout.tokens), QWEN_IMAGE_TOKEN), layout)
    types = torch.as_tensor(layout.is_visual(prompt.shape[1]), dtype=torch.int32).expand(len(ids), -1)
    extra = dict(input_ids=prompt, pixel_values=patches, image_grid_thw=grid, mm_token_type_ids=types)
    with torch.no_grad():
        if generate:
            out = module.model.generate(**extra, attention_mask=torch.ones_like(prompt), do_sample=False, **generate)
            return out[:, prompt.shape[1]:].numpy()
        positions = module.model.model.get_rope_index(prompt, mm_token_type_ids=types, image_grid_thw=grid)[0]
        return module.model(**extra).logits[:, layout.end:].numpy(), positions


@pytest.mark.parametrize("blocks,offsets,batch", [((2, 3), (0, 2), 2), ((3, 2), (1, 4, 6), 1), ((1, 2), (3, 5), 3)])
def test_several_images(checkpoint, blocks, offsets, batch):
    """Two and three images of one size per prompt (``--text-before-image 0,2``: the first in front of everything;
    Qwen3-VL's deepstack features added at each image): the logits equal transformers' forward with every image's
    placeholders and patches, the positions ``get_rope_index``'s (each image placed after the text in front of it,
    the text after it from its start plus its larger side); padded rows each as alone."""
    _, module, spec = checkpoint
    module, spec = with_text_before_image(*with_image_size(module, spec, _pixels(module, blocks)), offsets)
    assert module.num_visual_tokens == len(offsets) * blocks[0] * blocks[1]
    assert spec.inputs[0].shape == ("batch", len(offsets), 3, *module.image_size)
    pixels, ids = spec.example_inputs(batch=batch, seq=offsets[-1] + 4, seed=int(torch.randint(0, 2**31, ())))
    expected, positions = _several(module, pixels, ids)
    with torch.no_grad():
        np.testing.assert_allclose(module(pixels, ids).numpy(), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(module.encoder.positions(offsets, ids), positions, rtol=0, atol=0)
    if batch > 1:   # padded after the text in front of the last image: each row's logits those of its prompt alone
        masked, masked_spec = with_attention_mask(module, spec)
        pixels, ids, mask = masked_spec.example_inputs(batch=batch, seq=offsets[-1] + 6, seed=3)
        assert (mask[1:].sum(1) < mask.shape[1]).all()   # every row but the first padded
        with torch.no_grad():
            logits = masked(pixels, ids, mask).numpy()
        for row in range(1, batch):
            tokens = ids[row][mask[row].bool()][None]
            alone = _several(module, pixels[row:row + 1], tokens)[0]
            np.testing.assert_allclose(logits[row, -alone.shape[1]:], alone[0], atol=2e-5, rtol=1e-4)


@pytest.mark.full(reason="several images' positions CI checks against get_rope_index in test_several_images; the "
                         "later steps' shift by every image here (about 30 s)")
@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[1]], indirect=True)
def test_several_images_export_and_generate(checkpoint, tmp_path):
    """Qwen2.5-VL with two images after 1 and 4 text tokens: the export exited before layer 2 validates; the
    generation pair's greedy tokens equal transformers' ``generate`` (the later steps' positions shifted by both
    images), and exited, a greedy loop's over the exited forward."""
    folder, module, spec = checkpoint
    size = "x".join(map(str, module.image_size))
    module, spec = with_text_before_image(module, spec, (1, 4))
    options = ("--image-size", size, "--text-before-image", "1,4")
    run_cli("export", folder, "-o", tmp_path / "one.onnx", *options)
    run_cli("compile", tmp_path / "one.onnx", "-o", tmp_path / "one", "--token-exit", "static", "--exit-layer", 2)
    assert "PASS" in run_cli("validate", tmp_path / "one", "--model", folder).output
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *options)
        for tag, exit_options in (("", ()), ("_exit", ("--token-exit", "static", "--exit-layer", 2))):
            run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / f"{name}{tag}", *exit_options)
    pixels, ids = spec.example_inputs(batch=2, seq=7, seed=31)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), max_new_tokens=5)
    np.testing.assert_array_equal(got[:, 7:], _several(module, pixels, ids, max_new_tokens=5, min_new_tokens=5))
    exited = runtime.generate_vision_language(runtime.load(tmp_path / "first_exit"),
                                              runtime.load(tmp_path / "step_exit"), pixels.numpy(), ids.numpy(),
                                              max_new_tokens=5)
    np.testing.assert_array_equal(exited, exited_greedy_tokens(module, spec, pixels, ids, 5, 2).numpy())


def test_image_size_refusals(tmp_path):
    """An image size the patches do not tile, a malformed one, and one a fixed-size architecture (LLaVA) does not take
    are refused by name with the fix; nothing is written."""
    folder = tiny_qwen_vl(tmp_path / "qwen")
    result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--image-size", "50x84", ok=False)
    assert_clean_error(result, "50x84", "does not tile into 28x28", "multiples of 28", "56x84")
    result = run_cli("export", folder, "-o", tmp_path / "b.onnx", "--image-size", "56by84", ok=False)
    assert result.exit_code == 2 and "no image size" in result.output
    llava = tiny_llava(tmp_path / "llava")
    result = run_cli("export", llava, "-o", tmp_path / "c.onnx", "--image-size", "64x64", ok=False)
    assert_clean_error(result, "takes images of 32x32", "drop --image-size")
    assert not any(tmp_path.glob("*.onnx"))
    with pytest.raises(AttncError, match="no vision-language checkpoint"):
        module, spec = load_checkpoint(str(llava))
        with_image_size(module, None, (64, 64))


@pytest.mark.tensorrt
@pytest.mark.parametrize("checkpoint", EXPORTED_IN_CI, indirect=True)
def test_tensorrt_builds_the_exited_checkpoint(checkpoint, exported, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the statically exited export at dynamic batch and text length."""
    tensorrt_or_skip()
    (_, _, spec), path = checkpoint, exported
    out = tmp_path / "engine"
    manifest = build_exited_engine(path, spec.inputs[0].shape[1:], BEFORE, out)
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] >= 4
