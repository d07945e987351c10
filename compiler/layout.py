"""Where a vision-language prompt's images lie among its tokens.

A prompt of ``N`` images places image ``i``'s tokens after the first ``offsets[i]`` of its text tokens (the ids of
``input_ids``): ``text[:K1] image1 text[K1:K2] image2 ... text[Kn:]``. Each image has ``P / N`` tokens (images of one
size per export). ``offsets`` of ``(0,)`` is the image in front of the text, ``(K,)`` a chat template's ``K`` tokens
in front of it (``attnc export --text-before-image K``), ``(5, 9)`` two images (``--text-before-image 5,9``), and
equal offsets put images side by side.

The export records ``P`` and the offsets (:data:`attnc.compiler.onnx_io.VISUAL_TOKENS`, ``VISUAL_OFFSET`` as
``"5,9"``); the token-exit pass (:mod:`attnc.passes.token_exit`), the PyTorch exit of the vision-language
checkpoints (:mod:`attnc.models.hf_vision_language`) and generation (:mod:`attnc.compiler.decode`) read them through
:class:`VisualLayout`. :func:`split_prompt` reads them off a processor's prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnc.compiler.errors import AttncError


def parse_offsets(value) -> tuple[int, ...]:
    """The offsets of ``value``: an int, a sequence of ints or their text (``"5"``, ``"5,9"``: the CLI's and the
    recorded metadata's spelling).

    Raises:
        AttncError: not integers, a negative one, none, or not in increasing order.
    """
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",")]
        except ValueError:
            raise AttncError(f"the text tokens in front of each image must be integers separated by commas, got "
                             f"{value!r}", "pass e.g. --text-before-image 5 (one image) or 5,9 (two)") from None
    offsets = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    if not offsets or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) for k in offsets):
        raise AttncError(f"the text tokens in front of each image must be integers, got {value!r}")
    if any(k < 0 for k in offsets):
        raise AttncError(f"the text tokens in front of an image must be 0 or more, got {value!r}",
                         "pass how many text tokens come in front of each image")
    if any(b < a for a, b in zip(offsets, offsets[1:])):
        raise AttncError(f"the images' offsets must not decrease (image i after the first offsets[i] text tokens), "
                         f"got {value!r}", "list the images in the order they appear in the prompt")
    return tuple(int(k) for k in offsets)


def format_offsets(offsets: Sequence[int]) -> str:
    """The recorded spelling of ``offsets``: ``"5"``, ``"5,9"``."""
    return ",".join(str(int(k)) for k in offsets)


@dataclass(frozen=True)
class VisualLayout:
    """``tokens`` visual tokens (``P``, all images') split evenly among the images, image ``i`` after the first
    ``offsets[i]`` text tokens. See the module docstring."""

    tokens: int
    offsets: tuple[int, ...] = (0,)

    @classmethod
    def of(cls, tokens, offsets=0) -> VisualLayout:
        """The layout of ``tokens`` visual tokens at ``offsets`` (anything :func:`parse_offsets` takes).

        Raises:
            AttncError: ``tokens`` is not positive or does not split evenly among the images; bad offsets.
        """
        offsets = parse_offsets(offsets)
        if not isinstance(tokens, (int, np.integer)) or isinstance(tokens, bool) or tokens <= 0:
            raise AttncError(f"num_visual_tokens must be positive, got {tokens}")
        if tokens % len(offsets):
            raise AttncError(f"{tokens} visual tokens do not split evenly among {len(offsets)} images",
                             "give every image of a prompt the same size: each has the same number of tokens")
        return cls(int(tokens), offsets)

    @property
    def images(self) -> int:
        return len(self.offsets)

    @property
    def per_image(self) -> int:
        return self.tokens // len(self.offsets)

    @property
    def text_before_end(self) -> int:
        """``K``: the text tokens in front of the last image's end (the text the output's logits leave out)."""
        return self.offsets[-1]

    @property
    def end(self) -> int:
        """The sequence's index after the last image: ``K + P``."""
        return self.offsets[-1] + self.tokens

    def ranges(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]``: each image's tokens in the sequence (text and images)."""
        p = self.per_image
        return [(k + i * p, k + (i + 1) * p) for i, k in enumerate(self.offsets)]

    def text_ranges(self, n: int | None = None) -> list[tuple[int, int | None]]:
        """``[(start, stop), ...]`` of the text between, in front of and behind the images in a sequence of ``n``
        tokens (the last stop None: the end, where ``n`` is None), empty ones left out."""
        pieces, start = [], 0
        for a, b in self.ranges():
            if a > start:
                pieces.append((start, a))
            start = b
        if n is None or n > start:
            pieces.append((start, n))
        return pieces

    def text_index(self, n: int) -> np.ndarray:
        """The text's indices in a sequence of ``n`` tokens."""
        return np.flatnonzero(~self.is_visual(n))

    def is_visual(self, n: int) -> np.ndarray:
        """``[n]`` bool: which of a sequence's ``n`` tokens are an image's."""
        visual = np.zeros(n, bool)
        for a, b in self.ranges():
            visual[a:b] = True
        return visual

    def __str__(self) -> str:
        return format_offsets(self.offsets)


def tiled_image_size(family: str, size: tuple[int, int], patch: int, merge: int) -> tuple[int, int]:
    """``size`` ``(H, W)`` as an export of ``family``'s images takes it (``"Qwen-VL"``, ``"Pixtral"``): both sides
    positive multiples of ``patch × merge`` pixels, the blocks its visual tokens stand for.

    Raises:
        AttncError: a side that is not, with the nearest size that is.
    """
    step = patch * merge
    height, width = (int(d) for d in size)
    if height <= 0 or width <= 0 or height % step or width % step:
        raise AttncError(f"a {family} image of {height}x{width} pixels does not tile into {step}x{step} blocks "
                         f"(patch {patch} × merge {merge})", f"pass --image-size with both sides multiples of {step}, "
                         f"e.g. {max(step, round(height / step) * step)}x{max(step, round(width / step) * step)}")
    return height, width


def split_prompt(input_ids, image_token: int, per_image: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """``(text ids [B, T], offsets)``: a processor's prompts ``input_ids [B, N]``, each image's ``per_image``
    placeholders of ``image_token`` in place, as attnc's vision-language exports take them: without the placeholders,
    and the text tokens in front of each image (``attnc export --text-before-image``, :class:`VisualLayout`'s
    offsets). Images side by side make one run of placeholders, a multiple of ``per_image`` long. Its processor's
    prompt is how a checkpoint that cuts an image into tiles (SmolVLM: a row and column token in front of each tile,
    the whole image last) or reads a video as frames (InternVL: a frame label in front of each) lays out its
    ``pixel_values [B, N, C, H, W]``.

    Raises:
        AttncError: ``input_ids`` is not ``[B, N]``, has no placeholder, its rows place them differently, or a run of
            placeholders is no multiple of ``per_image``.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise AttncError(f"input_ids {list(ids.shape)} is no [batch, tokens] batch of prompts",
                         "pass the processor's input_ids")
    if isinstance(per_image, bool) or not isinstance(per_image, (int, np.integer)) or per_image <= 0:
        raise AttncError(f"an image's tokens must be a positive count, got {per_image!r}",
                         "pass the export's tokens per image (attnc inspect: its visual tokens over its images)")
    visual = ids == image_token
    if not visual.any():
        raise AttncError(f"the prompts hold no placeholder {image_token}", "pass the image token's id")
    if not (visual == visual[:1]).all():
        raise AttncError("the prompts place their images at different tokens (a processor's left padding moves them)",
                         "split the prompts one at a time: an export with --with-attention-mask takes prompts padded "
                         "after the text in front of their last image")
    offsets, text, run = [], 0, 0
    for is_visual in visual[0]:
        if is_visual:
            run += 1
            continue
        if run:
            offsets += [text] * _images_in(run, per_image)
            run = 0
        text += 1
    if run:
        offsets += [text] * _images_in(run, per_image)
    return ids[:, ~visual[0]], tuple(offsets)


def _images_in(run: int, per_image: int) -> int:
    if run % per_image:
        raise AttncError(f"a run of {run} placeholders is no whole number of images of {per_image} tokens",
                         "pass the export's tokens per image, or the processor's prompt for images of that size")
    return run // per_image
