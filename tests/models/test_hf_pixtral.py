"""Mistral 3 and Pixtral-12B checkpoints (a Pixtral vision tower; models/hf_pixtral.py): a checkpoint directory loads as
``(pixel_values [B, 3, H, W], input_ids) -> logits of the text after the image`` at the image size ``--image-size``
names, each image's rows placed after ``K, K + 1, ...`` text tokens (the processor's ``[IMG_BREAK]`` after each row
and ``[IMG_END]`` after the last stay in ``input_ids``), equal to transformers' forward on the processor's prompt; one
image or several per prompt; ``split_prompt`` reads the offsets off that prompt; it exports, records the rows'
offsets, compiles with the image gone before a layer and passes ``attnc validate``; the first and later generation
steps decode ``generate``'s tokens.

References: transformers' forward, ``get_image_features`` and ``generate`` on the prompt the processor writes (rows of
``[IMG]`` each ended by a break token), fresh random images at several sizes (square, wide, tall, one row), offsets and
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
from attnc.compiler.onnx_io import IMAGE_OFFSETS, IMAGE_SIZE, VISUAL_OFFSET, VISUAL_TOKENS, metadata
from attnc.testing import (MISTRAL3_BREAK, MISTRAL3_END, MISTRAL3_IMAGE_TOKEN, assert_clean_error,
                           build_exited_engine, check_padded_prompts, naming_the_draw, run_cli, tensorrt_or_skip,
                           tiny_mistral3, tiny_pixtral_llava)

transformers = pytest.importorskip("transformers")

from attnc.compiler.backends.onnxruntime import load as load_onnx  # noqa: E402
from attnc.models import hf_pixtral  # noqa: E402
from attnc.models.hf_checkpoint import (load_checkpoint, with_first_step, with_image_size, with_past,  # noqa: E402
                                        with_text_before_image)
from attnc.models.hf_vision_language import interleave  # noqa: E402

SPOKEN = range(3, MISTRAL3_IMAGE_TOKEN)   # tiny_mistral3's words past pad, bos, eos and before [IMG] and the breaks


@pytest.fixture(scope="module", params=["mistral3", "pixtral-llava"])
def checkpoint(request, tmp_path_factory):
    """The tiny checkpoint's folder, module and spec: a Mistral 3 (16-pixel blocks: patch 8 merged 2 × 2) and a
    Pixtral-12B-like LLaVA (8-pixel blocks: a token a patch)."""
    build = tiny_mistral3 if request.param == "mistral3" else tiny_pixtral_llava
    folder = build(tmp_path_factory.mktemp(request.param) / "ckpt")
    return folder, *load_checkpoint(str(folder))


def _step(module) -> int:
    """Pixels a side of one visual token."""
    config = module.model.config
    return config.vision_config.patch_size * hf_pixtral.merge_size(config)


def _image(rows: int, columns: int) -> list[int]:
    """An image's placeholders as the processor writes them: each row's ``[IMG]`` then a break, ``[IMG_END]`` last."""
    return [t for r in range(rows) for t in [MISTRAL3_IMAGE_TOKEN] * columns + [
        MISTRAL3_BREAK if r < rows - 1 else MISTRAL3_END]]


def _prompt(texts: list[torch.Tensor], rows: int, columns: int) -> torch.Tensor:
    """``texts[0]``, an image, ``texts[1]``, an image, ...: the processor's prompt of ``len(texts) - 1`` images."""
    batch = texts[0].shape[0]
    image = torch.tensor(_image(rows, columns)).expand(batch, -1)
    pieces = [texts[0]]
    for text in texts[1:]:
        pieces += [image, text]
    return torch.cat(pieces, 1)


def _transformers(hf, pixels, prompt, **generate):
    """transformers' forward (the logits after the last image's placeholder) or ``generate`` (the new tokens) on the
    processor's prompt and ``pixel_values [B, N, 3, H, W]`` (one ``image_sizes`` row per image)."""
    flat = pixels.flatten(0, 1)
    sizes = torch.tensor([list(flat.shape[-2:])] * len(flat))
    last = int(np.flatnonzero(prompt[0].numpy() == MISTRAL3_IMAGE_TOKEN)[-1])
    with torch.no_grad():
        if generate:
            out = hf.generate(input_ids=prompt, pixel_values=flat, image_sizes=sizes, do_sample=False,
                              attention_mask=torch.ones_like(prompt), **generate)
            return out[:, prompt.shape[1]:].numpy()
        return hf(input_ids=prompt, pixel_values=flat, image_sizes=sizes).logits[:, last + 1:].numpy()


def _check(checkpoint, blocks, befores, batch):
    """``len(befores)`` images of ``blocks`` merged blocks, image ``i`` after ``befores[i]`` more text tokens: the
    processor's prompt split by ``split_prompt`` into text and the rows' offsets; the module built from those offsets
    and from the images' ``K`` alike equals transformers' forward; another image changes the logits."""
    folder, module, spec = checkpoint
    rows, columns = blocks
    size = (rows * _step(module), columns * _step(module))
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    texts = [torch.randint(3, MISTRAL3_IMAGE_TOKEN, (batch, n), generator=generator) for n in (*befores, 4)]
    prompt = _prompt(texts, rows, columns)
    pixels = torch.randn(batch, len(befores), 3, *size, generator=generator)
    text, offsets = split_prompt(prompt.numpy(), MISTRAL3_IMAGE_TOKEN, columns)
    starts = tuple(np.cumsum(befores) + rows * np.arange(len(befores)))
    assert offsets == hf_pixtral.row_offsets(starts, rows)
    expected = _transformers(module.model, pixels, prompt)
    for given in (offsets, starts):
        placed, placed_spec = with_text_before_image(*with_image_size(module, spec, size), given)
        assert placed.visual_offset == (offsets[0] if len(offsets) == 1 else offsets)
        assert placed.num_visual_tokens == len(befores) * rows * columns
        assert placed_spec.inputs[0].shape[1:] == ((3, *size) if len(befores) == 1 else (len(befores), 3, *size))
        images = pixels[:, 0] if len(befores) == 1 else pixels
        with torch.no_grad():
            got = placed(images, torch.from_numpy(text)).numpy()
            other = placed(torch.randn_like(images), torch.from_numpy(text)).numpy()
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
        assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("blocks,befores,batch", [((2, 3), (2,), 2), ((3, 2), (0,), 1), ((1, 4), (3,), 3),
                                                  ((2, 2), (1, 3), 2), ((4, 4), (2,), 1)])
def test_matches_the_transformers_forward(checkpoint, blocks, befores, batch):
    """Square, wide, tall and one-row images, after 0-3 text tokens, two images per prompt, batch 1-3."""
    _check(checkpoint, blocks, befores, batch)


def test_matches_at_a_drawn_size(checkpoint):
    """The same at 1-2 images of 1-4 × 1-4 blocks after 0-4 tokens each and a batch of 1-3, drawn afresh each run."""
    rng = np.random.default_rng()
    blocks = (int(rng.integers(1, 5)), int(rng.integers(1, 5)))
    befores, batch = tuple(int(n) for n in rng.integers(0, 5, int(rng.integers(1, 3)))), int(rng.integers(1, 4))
    with naming_the_draw(f"{blocks} blocks, images after {befores} more tokens, batch {batch}"):
        _check(checkpoint, blocks, befores, batch)


def test_encoder_matches_get_image_features(checkpoint):
    """The encoder's tokens equal transformers' ``get_image_features`` (the tower on the packed images under its block
    mask, the projector's merger per image), row by row."""
    _, module, _ = checkpoint
    encoder = hf_pixtral.PixtralImageEncoder(module.model, (48, 32))
    pixels, config = torch.randn(3, 3, 48, 32), module.model.config
    strategy = {} if "Mistral3" in type(module.model).__name__ else {
        "vision_feature_select_strategy": config.vision_feature_select_strategy}
    with torch.no_grad():
        got = encoder(pixels)
        expected = module.model.model.get_image_features(pixel_values=pixels, image_sizes=torch.tensor([[48, 32]] * 3),
                                                         vision_feature_layer=config.vision_feature_layer, **strategy)
    torch.testing.assert_close(got, torch.stack(list(expected.pooler_output)), atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint's dynamo export through the CLI: a 32 × 48 image (2 rows of 3 tokens) after 2 text tokens."""
    folder = checkpoint[0]
    path = folder.parent / "model.onnx"
    run_cli("export", folder, "-o", path, "--image-size", "32x48", "--text-before-image", 2)
    return path


EXPORT_IN_CI = ["mistral3", pytest.param("pixtral-llava", marks=pytest.mark.full(
    reason="the export path CI checks on Mistral 3; Pixtral-12B's LLaVA lacks its merger, which CI checks against "
           "transformers in PyTorch (about 20 s)"))]


@pytest.mark.parametrize("checkpoint", EXPORT_IN_CI, indirect=True)
def test_export_exit_and_validate(checkpoint, exported, tmp_path):
    """The dynamo export records the rows' offsets, ``P`` and the image size; ONNX Runtime equals transformers at batch
    1 and 3 and other text lengths; compiled with the image gone before layer 2 (static, and a gate trained by ``attnc
    train-exit-gate`` deciding there) it passes ``attnc validate`` (rebuilt from the recorded rows), and the exit
    changes the logits."""
    (folder, module, spec), path = checkpoint, exported
    graph = onnx.load(path)
    rows, columns = 32 // _step(module), 48 // _step(module)   # Mistral 3: 2 × 3; Pixtral-12B's LLaVA: 4 × 6
    offsets = ",".join(str(2 + r) for r in range(rows))
    assert {key: metadata(graph, key) for key in (VISUAL_TOKENS, VISUAL_OFFSET, IMAGE_SIZE, IMAGE_OFFSETS)} == \
        {VISUAL_TOKENS: str(rows * columns), VISUAL_OFFSET: offsets, IMAGE_SIZE: "32x48", IMAGE_OFFSETS: "2"}
    said = " ".join(run_cli("inspect", path).output.split())   # as one line: the console wraps it
    assert f"{rows * columns} visual tokens of a 32x48 image in {rows} rows each after {offsets} text tokens" in said
    model = load_onnx(path)
    for batch, after in ((1, 1), (3, 9)):
        texts = [torch.randint(3, MISTRAL3_IMAGE_TOKEN, (batch, n)) for n in (2, after)]
        prompt = _prompt(texts, rows, columns)
        pixels = torch.randn(batch, 1, 3, 32, 48)
        text = split_prompt(prompt.numpy(), MISTRAL3_IMAGE_TOKEN, columns)[0]
        got = next(iter(model.infer({"pixel_values": pixels[:, 0].numpy(), "input_ids": text}).values()))
        np.testing.assert_allclose(got, _transformers(module.model, pixels, prompt), atol=2e-5, rtol=1e-4)
    run_cli("compile", path, "-o", tmp_path / "exit", "--token-exit", "static", "--exit-layer", 2)
    assert "PASS" in run_cli("validate", tmp_path / "exit", "--model", folder).output
    report = json.loads((tmp_path / "exit" / "report.json").read_text())
    assert report["passed"] and report["shrink_cost"][0]["max_abs_error"] > 1e-3
    # a gate trained by attnc train-exit-gate (it averages the text, the breaks between rows included) decides there
    placed, placed_spec = with_text_before_image(*with_image_size(module, spec, (32, 48)), 2)
    pixels, ids = placed_spec.example_inputs(batch=8, seq=placed.layout.text_before_end + 4, seed=5)
    np.savez(tmp_path / "calib.npz", pixel_values=pixels.numpy(), input_ids=ids.numpy())
    run_cli("train-exit-gate", folder, "-o", tmp_path / "gate.npz", "--layer", 2, "--calibration",
            tmp_path / "calib.npz", "--steps", 20, "--image-size", "32x48", "--text-before-image", 2)
    run_cli("compile", path, "-o", tmp_path / "gated", "--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz")
    assert "PASS" in run_cli("validate", tmp_path / "gated", "--model", folder).output


@pytest.mark.parametrize("blocks,befores", [((2, 3), (2,)), ((2, 2), (1, 3))])
def test_steps_in_pytorch(checkpoint, blocks, befores):
    """The first step and the later steps in PyTorch decode ``generate``'s greedy tokens, each step's logits
    transformers' forward's over the prompt and the tokens so far."""
    folder, module, spec = checkpoint
    rows, columns = blocks
    size = (rows * _step(module), columns * _step(module))
    texts = [torch.randint(3, MISTRAL3_IMAGE_TOKEN, (2, n)) for n in (*befores, 4)]
    prompt, pixels = _prompt(texts, rows, columns), torch.randn(2, len(befores), 3, *size)
    text, offsets = split_prompt(prompt.numpy(), MISTRAL3_IMAGE_TOKEN, columns)
    placed, placed_spec = with_text_before_image(*with_image_size(module, spec, size), offsets)
    (first, _), (step, _) = with_first_step(placed, placed_spec), with_past(placed, placed_spec)
    images, tokens = (pixels[:, 0] if len(befores) == 1 else pixels), torch.from_numpy(text)
    mask, steps, new = torch.ones(2, prompt.shape[1], dtype=torch.int64), [], []
    with torch.no_grad():
        logits, *cache = first(images, tokens)
        for _ in range(5):   # no end of text, nor an [IMG] or break token (the forward would read it)
            chosen = logits[:, -1, SPOKEN].argmax(-1, keepdim=True) + SPOKEN.start
            new.append(chosen)
            mask = torch.cat([mask, torch.ones_like(chosen)], 1)
            logits, *cache = step(chosen, mask, *cache)
            steps.append(logits[:, -1])
    new = torch.cat(new, 1)
    expected = _transformers(module.model, pixels, prompt, max_new_tokens=5, min_new_tokens=5,
                             suppress_tokens=[t for t in range(256) if t not in SPOKEN])
    np.testing.assert_array_equal(new.numpy(), expected)
    forward = _transformers(module.model, pixels, torch.cat([prompt, new], 1))
    np.testing.assert_allclose(torch.stack(steps, 1).numpy(), forward[:, -5:], atol=2e-5, rtol=1e-4)


def test_padded_prompts(checkpoint):
    """``--with-attention-mask``: prompts of different lengths in one batch, padded after the text in front of the last
    row (as the layout of several images pads); each row's logits at its tokens equal transformers' forward on that
    prompt alone."""
    _, module, spec = checkpoint
    placed, placed_spec = with_text_before_image(*with_image_size(module, spec, (32, 48)), 2)

    def alone(pixels, tokens):
        prompt = interleave(tokens, torch.full((1, placed.layout.tokens), MISTRAL3_IMAGE_TOKEN), placed.layout)
        return _transformers(module.model, pixels[:, None], prompt)

    check_padded_prompts(placed, placed_spec, alone)


def test_refusals(checkpoint, tmp_path):
    """A size the merged blocks do not tile, and images whose rows would overlap, are refused by name with the fix, in
    the CLI (nothing written) and in Python; a video is refused."""
    folder, module, spec = checkpoint
    step = _step(module)
    result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--image-size", "36x48", ok=False)
    assert_clean_error(result, f"36x48 pixels does not tile into {step}x{step} blocks", "e.g. 32x48")
    with pytest.raises(AttncError, match="overlap") as caught:
        with_text_before_image(*with_image_size(module, spec, (32, 48)), (2, 3, 4))
    assert f"at least {32 // step} tokens between them" in caught.value.fix
    result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--video-frames", 2, ok=False)
    assert_clean_error(result, f"attnc reads no video of {type(module.model).__name__}")
    assert not any(tmp_path.glob("*.onnx"))


@pytest.mark.tensorrt
@pytest.mark.parametrize("checkpoint", EXPORT_IN_CI, indirect=True)
def test_tensorrt_builds_the_exited_checkpoint(checkpoint, exported, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the statically exited export (the tower's 2-D rotary tables, Mistral 3's
    merger's ``unfold``) at dynamic batch and text length, every attention fused (the tower's 2, the text model's 4)."""
    tensorrt_or_skip()
    out = tmp_path / "engine"
    rows = 32 // _step(checkpoint[1])
    manifest = build_exited_engine(exported, (3, 32, 48), 2 + rows - 1, out)   # the text in front of the last row
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] == 6
