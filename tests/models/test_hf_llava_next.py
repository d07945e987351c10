"""LLaVA-NeXT and LLaVA-OneVision checkpoints (models/hf_llava_next.py): a checkpoint directory loads as
``(pixel_values [B, N, 3, S, S], input_ids) -> logits of the text after the image`` for original images of the size
``--image-size`` names (the processor's ``N`` tiles), equal to transformers' forward with that ``image_sizes``
(OneVision's grid shrunk where it is past its budget); it exports, records its image size, compiles with a
visual-token exit and a gate, and ``attnc validate`` checks the artefacts against the checkpoint exiting alike; both
generation graphs of padded prompts decode transformers' ``generate`` tokens (OneVision's in the ``full`` tier).

References: transformers' forward and ``generate`` on the tiles its image processor (``LlavaNextImageProcessorPil``,
``LlavaOnevisionImageProcessorPil``) cuts from fresh random images (the processor's tile count, not attnc's), at
square, wide, tall and odd sizes, and sizes drawn afresh.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import IMAGE_SIZE, VISUAL_OFFSET, VISUAL_TOKENS, metadata
from attnc.models.hf_llava_next import ARCHITECTURES
from attnc.testing import build_exited_engine, naming_the_draw, run_cli, tensorrt_or_skip, tiny_llava_next

transformers = pytest.importorskip("transformers")

from attnc import runtime  # noqa: E402
from attnc.compiler.backends.onnxruntime import load as load_onnx  # noqa: E402
from attnc.models.hf_checkpoint import (load_checkpoint, with_attention_mask, with_image_size,  # noqa: E402
                                        with_text_before_image)

PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]
SIZE, BEFORE = (40, 90), 3   # the exports': a wide image (1 × 3 tiles, as the pinpoints choose) after 3 tokens


@pytest.fixture(scope="module", params=[*ARCHITECTURES[:2], pytest.param(ARCHITECTURES[2], marks=pytest.mark.full(
    reason="LLaVA-NeXT-Video's images, which take LLaVA-NeXT's path CI checks (its video: test_hf_video.py)"))])
def checkpoint(request, tmp_path_factory):
    """The tiny checkpoint of each architecture (4 query on 2 K/V heads), its module and spec at :data:`SIZE` after
    :data:`BEFORE` tokens."""
    folder = tiny_llava_next(tmp_path_factory.mktemp("llava_next") / "ckpt", architecture=request.param)
    module, spec = load_checkpoint(str(folder))
    return folder, *with_text_before_image(*with_image_size(module, spec, SIZE), BEFORE)


@pytest.fixture(scope="module")
def exported(checkpoint):
    """The checkpoint's dynamo export through the CLI at :data:`SIZE` after :data:`BEFORE` tokens (a fixture apart:
    the tests in PyTorch alone skip it)."""
    folder = checkpoint[0]
    path = folder.parent / "model.onnx"
    run_cli("export", folder, "-o", path, "--image-size", "x".join(map(str, SIZE)), "--text-before-image", BEFORE)
    return path


def _tiles(module, size: tuple[int, int], batch: int) -> torch.Tensor:
    """The processor's ``pixel_values [batch, N, 3, 32, 32]`` of fresh random images of ``size`` ``(H, W)`` for
    ``module``'s architecture."""
    if type(module.model).__name__ != "LlavaOnevisionForConditionalGeneration":   # LLaVA-NeXT's, NeXT-Video's
        processor = transformers.LlavaNextImageProcessorPil(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32},
                                                            image_grid_pinpoints=PINPOINTS)
    else:
        processor = transformers.LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32},
                                                                 image_grid_pinpoints=PINPOINTS)
    images = [np.random.default_rng().integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(batch)]
    out = processor(images, return_tensors="pt")
    assert out["image_sizes"].tolist() == [list(size)] * batch
    return out["pixel_values"]


def _transformers(model, pixels, ids, p, before, size, **generate):
    """transformers' forward (logits at the text after the image) or ``generate`` (the new tokens) on
    ``[ids[:, :before]; <image> × p; ids[:, before:]]`` with ``image_sizes`` of ``size``."""
    batch = ids.shape[0]
    prompt = torch.cat([ids[:, :before], torch.full((batch, p), model.config.image_token_index), ids[:, before:]], 1)
    sizes = torch.tensor([list(size)] * batch)
    with torch.no_grad():
        if generate:
            out = model.generate(input_ids=prompt, pixel_values=pixels, image_sizes=sizes, do_sample=False,
                                 attention_mask=torch.ones_like(prompt), **generate)
            return out[:, prompt.shape[1]:].numpy()
        return model(input_ids=prompt, pixel_values=pixels, image_sizes=sizes).logits[:, before + p:].numpy()


def _check_forward(checkpoint, size, before, batch):
    """The module at ``size`` with ``before`` tokens in front of the image against transformers' forward on the
    processor's tiles of fresh random images; a different image changes the logits."""
    _, module, spec = checkpoint
    module, spec = with_text_before_image(*with_image_size(module, spec, size), before)
    pixels = _tiles(module, size, batch)
    assert tuple(pixels.shape[1:]) == spec.inputs[0].shape[1:]   # the processor's tile count is the export's
    ids = torch.randint(3, spec.inputs[1].high, (batch, before + 5))
    with torch.no_grad():
        got, other = module(pixels, ids).numpy(), module(torch.randn_like(pixels), ids).numpy()
    expected = _transformers(module.model, pixels, ids, module.num_visual_tokens, before, size)
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    assert np.abs(other - expected).max() > 1e-2


@pytest.mark.parametrize("size,before,batch", [((32, 32), 0, 1), ((40, 90), 3, 2), ((90, 40), 2, 3),
                                               ((64, 64), 1, 1), ((33, 100), 0, 2), ((100, 37), 4, 1),
                                               ((9, 146), 1, 2), ((146, 9), 2, 1)])
def test_matches_the_transformers_forward(checkpoint, size, before, batch):
    """Square (one tile's size, two tiles' and more), wide, tall and odd sizes (1 × 2, 2 × 1, 2 × 2 and 1 × 3 / 3 × 1
    tiles as the pinpoints choose, the padding cut from rows or columns; OneVision's grid shrunk at all but the
    first and the last two), long thin images whose grid keeps no row (the whole image's tokens alone) or rows of no
    column (each a newline token), the image after 0-4 tokens, batch 1-3."""
    _check_forward(checkpoint, size, before, batch)


def test_matches_at_a_drawn_size(checkpoint):
    """The same at an image of 8-160 × 8-160 pixels, 0-4 tokens in front of it and a batch of 1-3, drawn afresh each
    run (named in the failure message)."""
    rng = np.random.default_rng()
    size, before, batch = (int(rng.integers(8, 161)), int(rng.integers(8, 161))), int(rng.integers(0, 5)), \
        int(rng.integers(1, 4))
    with naming_the_draw(f"size {size}, {before} tokens in front, batch {batch}"):
        _check_forward(checkpoint, size, before, batch)


def test_export_exit_and_validate(checkpoint, exported, tmp_path):
    """The dynamo export records ``P``, ``K`` and the image size, takes any batch and text length (ONNX Runtime
    equals transformers at sizes other than the export's); compiled with the image gone before layer 2 and with a
    gate trained by ``attnc train-exit-gate`` deciding there, both pass ``attnc validate`` against the checkpoint
    exiting alike."""
    (folder, module, spec), path, size = checkpoint, exported, "x".join(map(str, SIZE))
    p = module.num_visual_tokens
    graph = onnx.load(path)
    assert {key: metadata(graph, key) for key in (VISUAL_TOKENS, VISUAL_OFFSET, IMAGE_SIZE)} == \
        {VISUAL_TOKENS: str(p), VISUAL_OFFSET: str(BEFORE), IMAGE_SIZE: size}
    assert f"{p} visual tokens of a {size} image after 3 text tokens" in run_cli("inspect", path).output
    model = load_onnx(path)
    for batch, seq in ((1, BEFORE + 1), (3, BEFORE + 11)):
        pixels, ids = _tiles(module, SIZE, batch), torch.randint(3, spec.inputs[1].high, (batch, seq))
        got = next(iter(model.infer({"pixel_values": pixels.numpy(), "input_ids": ids.numpy()}).values()))
        np.testing.assert_allclose(got, _transformers(module.model, pixels, ids, p, BEFORE, SIZE),
                                   atol=2e-5, rtol=1e-4)
    calibration = tmp_path / "calib.npz"
    pixels, ids = spec.example_inputs(batch=8, seq=BEFORE + 4, seed=5)
    np.savez(calibration, pixel_values=pixels.numpy(), input_ids=ids.numpy())
    run_cli("train-exit-gate", folder, "-o", tmp_path / "gate.npz", "--layer", 2, "--calibration", calibration,
            "--steps", 20, "--image-size", size, "--text-before-image", BEFORE)
    for name, options in (("static", ("--token-exit", "static", "--exit-layer", 2)),
                          ("dynamic", ("--token-exit", "dynamic", "--exit-gate", tmp_path / "gate.npz"))):
        run_cli("compile", path, "-o", tmp_path / name, *options)
        assert "PASS" in run_cli("validate", tmp_path / name, "--model", folder).output
    report = json.loads((tmp_path / "static" / "report.json").read_text())
    assert report["passed"] and report["shrink_cost"][0]["max_abs_error"] > 1e-3


@pytest.mark.parametrize("checkpoint", [ARCHITECTURES[0], pytest.param(ARCHITECTURES[1], marks=pytest.mark.full(
    reason="the generation path CI checks on LLaVA-NeXT, whose image encoder OneVision's shares but for its shrink, "
           "which CI checks in the one-pass export (about 25 s)"))], indirect=True)
def test_generation_of_padded_prompts(checkpoint, tmp_path):
    """``--first-step`` and ``--with-past`` of padded prompts at the export's image size compile; the pair's greedy
    tokens of a padded batch equal transformers' ``generate`` on each prompt alone."""
    folder, module, spec = checkpoint
    options = ("--image-size", "x".join(map(str, SIZE)), "--text-before-image", BEFORE, "--with-attention-mask")
    for name, option in (("first", "--first-step"), ("step", "--with-past")):
        run_cli("export", folder, "-o", tmp_path / f"{name}.onnx", option, *options)
        run_cli("compile", tmp_path / f"{name}.onnx", "-o", tmp_path / name)   # checked by its tokens below
    _, ids, mask = with_attention_mask(module, spec)[1].example_inputs(batch=2, seq=BEFORE + 6, seed=21)
    pixels = _tiles(module, SIZE, 2)
    got = runtime.generate_vision_language(runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step"),
                                           pixels.numpy(), ids.numpy(), mask.numpy(), max_new_tokens=5)
    assert mask[1].sum() < mask[0].sum()   # the second row is padded
    for row in range(2):
        tokens = ids[row][mask[row].bool()][None]
        expected = _transformers(module.model, pixels[row:row + 1], tokens, module.num_visual_tokens, BEFORE, SIZE,
                                 max_new_tokens=5, min_new_tokens=5)
        np.testing.assert_array_equal(got[row, ids.shape[1]:], expected[0])


def test_image_size_refusals(checkpoint, tmp_path):
    """An image with no pixels is refused by name with the fix, in the CLI (nothing written) and in Python."""
    folder, module, spec = checkpoint
    result = run_cli("export", folder, "-o", tmp_path / "a.onnx", "--image-size", "0x90", ok=False)
    assert result.exit_code == 2 and "no image size" in result.output
    with pytest.raises(AttncError, match="has no pixels") as err:
        with_image_size(*load_checkpoint(str(folder)), (-4, 90))
    assert "--image-size" in err.value.fix
    assert not any(tmp_path.glob("*.onnx"))


@pytest.mark.tensorrt
def test_tensorrt_builds_the_exited_checkpoint(checkpoint, exported, tmp_path):
    """TensorRT-RTX builds an fp16 engine of the statically exited export (the tiles' grid sliced at constants, the
    newline tokens, OneVision's shrink a Resize) at dynamic batch and text length."""
    tensorrt_or_skip()
    (_, _, spec), path = checkpoint, exported
    out = tmp_path / "engine"
    manifest = build_exited_engine(path, spec.inputs[0].shape[1:], BEFORE, out)
    assert (out / manifest["artefact"]).stat().st_size > 0 and manifest["ops_after"]["Attention"] >= 4
