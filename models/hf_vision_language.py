"""A Hugging Face vision-language checkpoint (LLaVA and its kin) as ``(pixel_values, input_ids) -> logits``.

transformers' ``LlavaForConditionalGeneration.forward`` takes a prompt with ``<image>`` placeholder tokens and
scatters the image's features into their places (``masked_scatter`` on a data-dependent mask), which neither
exporter handles. :class:`VisionLanguageOutput` runs what that forward computes for a prompt whose image comes after
its first ``K`` text tokens (0 by default; ``attnc export --text-before-image K``, a chat template's text in front
of the image): the projected image features (``P`` tokens) between the text's embeddings, the language model over
all ``K + P + T`` tokens, and the logits of the ``T`` text tokens after the image. That is the layout visual-token
exit (:mod:`attnc.passes.token_exit`) rewrites: ``attnc compile --token-exit`` drops the ``P`` visual tokens after
a decoder layer, and ``attnc validate`` compares the artefact with this module dropping them in PyTorch
(``forward(..., exit_layer=k)``, :meth:`VisionLanguageOutput.exit_run` for a gate).

Architectures (:data:`ARCHITECTURES`) are those whose image features and language model this layout reproduces
exactly: each is checked against the transformers forward on the same prompt in
``tests/models/test_hf_vision_language.py`` (Idefics 3's and SmolVLM's image features computed here:
:func:`idefics_features`). Cached generation takes two graphs: :class:`VisionLanguageFirstStep`
(``--first-step``: the image and the prompt, their KV cache out) and the language model's later steps
(``--with-past``, :class:`VisionLanguageStep`); both compiled with the same static token exit answer with the image
gone after that layer. Prompts of different lengths go in one batch with ``--with-attention-mask``
(:class:`MaskedVisionLanguageOutput`: each padded after the text in front of the image). Qwen2-VL, Qwen2.5-VL and
Qwen3-VL, whose visual tokens follow the image's size, take images of one size per export (:mod:`attnc.models.
hf_qwen_vl`, ``attnc export --image-size``; 3-D M-RoPE positions), and so do LLaVA-NeXT and LLaVA-OneVision, whose
any-resolution tiles follow the original image's size (:mod:`attnc.models.hf_llava_next`). Gemma 3's image tokens
attend to each other both ways and PaliGemma's whole prompt does (:func:`language_masks`, handed to the decoder
layers by :func:`masking_layers`). A prompt may hold several images of one size (``attnc export
--text-before-image 5,9``: image ``i`` after the first ``K_i`` text tokens, :class:`attnc.compiler.layout.VisualLayout`;
``pixel_values [B, N, C, H, W]``) on the architectures of :data:`ARCHITECTURES` and the Qwen family's (each image's
M-RoPE positions from where the text in front of it ends); the token exit drops all of them.
LLaVA-OneVision and LLaVA-NeXT-Video take a clip of ``F`` frames in place of the image (``attnc export --video-frames
F``, ``pixel_values_videos [B, F, 3, S, S]``, :class:`attnc.models.hf_llava_next.LlavaVideoEncoder`), and so does
the Qwen family at the export's frame size (``[B, F, 3, H, W]``, :class:`attnc.models.hf_qwen_vl.QwenImageEncoder`
with ``frames``; Qwen3-VL's slices each after its own offset, as images).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable

import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import VisualLayout, format_offsets, parse_offsets
from attnc.models import hf_llava_next, hf_pixtral, hf_qwen_vl
from attnc.models.hf_checkpoint import CachedStep, config_image_size, keys_and_values, mask_positions

# config.architectures[0] of the checkpoints VisionLanguageOutput lays out (each checked against transformers' forward
# in tests/models/test_hf_vision_language.py): LLaVA's image features computed here (its own call splits them into a
# list per image, which fixes the batch in a dynamo export), the others' through their get_image_features.
ARCHITECTURES = ("LlavaForConditionalGeneration", "VipLlavaForConditionalGeneration",
                 "InternVLForConditionalGeneration", "JanusForConditionalGeneration",
                 "GotOcr2ForConditionalGeneration", "DeepseekVLForConditionalGeneration",
                 "AyaVisionForConditionalGeneration", "Cohere2VisionForConditionalGeneration",
                 "Gemma3ForConditionalGeneration", "PaliGemmaForConditionalGeneration",
                 "Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
# ... of which those whose image features attnc computes itself: transformers' drop all-zero padding images by value
# (boolean indexing, which no exporter takes), and the embeddings bucket their patch positions
TILES_BY_VALUE = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
# ... of which those whose image's tokens attend to each other both ways (transformers' token_type_ids blocks) ...
IMAGE_BLOCK = ("Gemma3ForConditionalGeneration",)
# ... those whose whole prompt does (a prefix LM: the text after it, generated, attends causally) ...
PROMPT_BLOCK = ("PaliGemmaForConditionalGeneration",)
# ... those whose positions count from 1 (every token one position further than the tokens in front of it) ...
ONE_BASED = ("PaliGemmaForConditionalGeneration",)
# ... and those whose forward soft-caps the logits by the text config's final_logit_softcapping (cap · tanh(x / cap))
CAPPED_LOGITS = ("PaliGemmaForConditionalGeneration",)
# ... and those whose images are read at one size of any (their processors tile each image at its own size)
SIZED = (*hf_qwen_vl.ARCHITECTURES, *hf_llava_next.ARCHITECTURES, *hf_pixtral.ARCHITECTURES)
EXPORTED = (*ARCHITECTURES, *SIZED)
PIXELS, VIDEOS, IDS = "pixel_values", "pixel_values_videos", "input_ids"
# the architectures that take a clip of frames in place of the image (attnc export --video-frames)
VIDEO_ARCHITECTURES = (*hf_llava_next.VIDEO_ARCHITECTURES, *hf_qwen_vl.VIDEO_ARCHITECTURES)
_VISUAL_TOKENS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # model -> P
_PATCH_POSITIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # vision embeddings -> position ids


def language_model_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder of a vision-language ``model``: ``model.model.language_model``, Idefics 3's and SmolVLM's
    ``text_model``."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def idefics_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[B, P, C]``: Idefics 3's and SmolVLM's ``get_image_features`` of real images ``pixel_values [B, 3, S, S]`` (no
    padding images, so none is dropped, and no padded pixels): the patches' embeddings with their position ids (those
    the embeddings bucket for a whole image, computed once in eager mode), the encoder, its norm and the connector's
    pixel shuffle and projection."""
    vision = model.model.vision_model
    embeddings = vision.embeddings
    if embeddings not in _PATCH_POSITIONS:   # as Idefics3VisionEmbeddings buckets a whole image's patches
        with torch.no_grad():
            n = embeddings.num_patches_per_side
            boundaries = torch.arange(1 / n, 1.0, 1 / n)
            side = pixel_values.shape[-1] // embeddings.patch_size
            coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / side), max=1.0 - 1e-6)
            bucket = torch.bucketize(coords, boundaries, right=True)
            _PATCH_POSITIONS[embeddings] = (bucket[:, None] * n + bucket[None, :]).flatten()
    patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
    x = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding(_PATCH_POSITIONS[embeddings])
    x = vision.post_layernorm(vision.encoder(inputs_embeds=x).last_hidden_state)
    return model.model.connector(x)


def image_size_of(config, name: str, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of the images an export of architecture ``name`` takes: its vision config's ``image_size``; for
    an architecture whose token count follows the image's size (:data:`SIZED`: :mod:`attnc.models.hf_qwen_vl`,
    :mod:`attnc.models.hf_llava_next`) ``size`` or its default."""
    if hf_qwen_vl.is_qwen_vl(name):
        return hf_qwen_vl.image_size(config.vision_config, size)
    if hf_llava_next.is_llava_next(name):
        return hf_llava_next.image_size(config, size)
    if hf_pixtral.reads(config, name):
        return hf_pixtral.image_size(config, size)
    return config_image_size(config.vision_config)


def pixel_shape(config, name: str, size: tuple[int, int] | None = None, images: int = 1,
                frames: int | None = None) -> tuple[int, ...]:
    """The shape of one prompt's ``pixel_values`` (after the batch axis) an export of architecture ``name`` takes
    for images of ``size`` (:func:`image_size_of`): ``(C, H, W)``, ``(N, C, H, W)`` for ``N`` images per prompt;
    LLaVA-NeXT's ``(N, C, S, S)``, the processor's ``N`` tiles of the vision tower's size ``S``; of a clip of
    ``frames`` frames, ``pixel_values_videos``' ``(F, C, S, S)``."""
    if frames is not None and not hf_qwen_vl.is_qwen_vl(name):
        return hf_llava_next.video_shape(config, frames)
    size = image_size_of(config, name, size)
    if frames is not None:   # Qwen's video processor resizes the frames as its image processor does the images
        return frames, getattr(config.vision_config, "num_channels", 3), *size
    if hf_llava_next.is_llava_next(name) and not (images > 1 and name in hf_llava_next.BASE_WHEN_SEVERAL):
        return hf_llava_next.pixel_shape(config, size)
    one = (getattr(config.vision_config, "num_channels", 3), *size)
    return one if images == 1 else (images, *one)


def is_vision_language(config) -> bool:
    """Whether ``config`` is a vision-language model's: a ``vision_config`` beside its ``text_config``."""
    return getattr(config, "vision_config", None) is not None and getattr(config, "text_config", None) is not None


def check_supported(config, name: str) -> None:
    """Raise an :class:`AttncError` unless attnc exports ``name`` (an architecture of a vision-language
    ``config``) as :class:`VisionLanguageOutput`."""
    if name not in EXPORTED:
        raise AttncError(f"{name} is a vision-language model attnc does not export yet (it exports "
                         f"{', '.join(sorted(EXPORTED))})",
                         "export it through MODULE:FACTORY with a module whose forward takes the inputs in order, "
                         "e.g. (pixel_values, input_ids) with the image's tokens in front of the text")


class VisionLanguageOutput(torch.nn.Module):
    """``(pixel_values [B, C, H, W], input_ids [B, T]) -> logits [B, T - K, vocab]``: the image's ``P`` tokens
    after the first ``K`` text tokens (``text_before_image``, 0: the image first), as the transformers forward
    computes a prompt ``input_ids[:, :K]`` + ``<image>×P`` + ``input_ids[:, K:]``; the logits are those of the
    text after the image. ``K`` is fixed per export: a chat template's text in front of the image (LLaVA-1.5's
    ``USER:``), the same for every prompt.

    ``forward(..., exit_layer=k)`` drops the visual tokens before decoder layer ``k`` (DyVTE's static exit):
    layers ``k:`` run on the text tokens alone, with the text's entries of the causal mask and the rotary
    tables. The language model runs with ``use_cache=True`` (its cache is neither read nor returned): without
    one, transformers checks the positions for packed sequences with ``aten::diff``, which TorchScript does
    not export.
    """

    def __init__(self, model: torch.nn.Module, text_before_image: int | tuple[int, ...] = 0,
                 image_size: tuple[int, int] | None = None, video_frames: int | None = None,
                 video_fps: float | None = None):
        super().__init__()
        offsets = parse_offsets(text_before_image)
        self.model = model
        # K as given: an int for one image, a tuple of one K per image for several (the export records it)
        self.visual_offset = offsets[0] if len(offsets) == 1 else offsets
        self.images = len(offsets)
        self.video_frames = video_frames   # a clip of F frames in place of the image (attnc export --video-frames)
        self.video_fps = video_fps   # the rate its frames were sampled at (--video-fps; Qwen2.5-VL's positions)
        vision = model.config.vision_config
        if video_fps is not None and (video_frames is None or not hf_qwen_vl.reads_frame_rate(vision)):
            raise AttncError(f"{type(model).__name__}'s positions do not read a frame rate"
                             + ("" if video_frames is not None else ": it takes no clip here"),
                             "drop --video-fps: Qwen2.5-VL's clips take it (the rate the frames were sampled at)")
        self.first_exit_layer = hf_qwen_vl.deepstack_layers(vision)   # the export records it for the exit pass
        if video_frames is not None:
            self._video(image_size)
            return
        self.image_size = image_size_of(model.config, type(model).__name__, image_size)
        if image_size is not None and tuple(image_size) != self.image_size:   # an architecture of one size
            raise AttncError(f"{type(model).__name__} takes images of {self.image_size[0]}x{self.image_size[1]} "
                             f"pixels (its vision config's image_size), not {image_size[0]}x{image_size[1]}",
                             "resize the images to its size and drop --image-size")
        if hf_pixtral.reads(model.config, type(model).__name__):   # P follows from the size; rows are runs
            self._rows(offsets)
            return
        if type(model).__name__ in SIZED:   # P follows from the size
            qwen = hf_qwen_vl.is_qwen_vl(model)
            if self.images > 1 and type(model).__name__ in hf_llava_next.BASE_WHEN_SEVERAL:
                self._base_images(image_size)
                return
            if self.images > 1 and not qwen:
                raise AttncError(f"attnc exports {type(model).__name__} with one image per prompt, not "
                                 f"{self.images}", "export it with one offset in --text-before-image; several "
                                 "images per prompt work on " + ", ".join(
                                     (*ARCHITECTURES, *hf_qwen_vl.ARCHITECTURES, *hf_llava_next.BASE_WHEN_SEVERAL)))
            if qwen and len(set(offsets)) < len(offsets):
                raise AttncError(f"{type(model).__name__}'s images cannot lie side by side (offsets "
                                 f"{format_offsets(offsets)}): its processor puts delimiters around each (Qwen's "
                                 "<|vision_start|> and <|vision_end|>, GLM-4V's <|begin_of_image|> and "
                                 "<|end_of_image|>), and its positions follow each image",
                                 "count those tokens in the offsets: each image after the text tokens in front of it, "
                                 "its own delimiters included")
            encoder = hf_qwen_vl.QwenImageEncoder if qwen else hf_llava_next.LlavaNextImageEncoder
            self.encoder = encoder(model, self.image_size)
            self.num_visual_tokens = self.encoder.num_visual_tokens * self.images
            return
        self.encoder = None
        # P as a Python int (one run of the vision tower on a blank image): the graph then slices the text's logits
        # at a constant, which the token-exit pass recognises (a traced image size would be a computed start). Once
        # per model: every variant (--text-before-image, --with-attention-mask, the steps) wraps the same one.
        if model not in _VISUAL_TOKENS:
            with torch.no_grad():
                blank = torch.zeros(1, getattr(vision, "num_channels", 3), *self.image_size)
                _VISUAL_TOKENS[model] = int(self._features(blank).shape[1])
        self.num_visual_tokens = _VISUAL_TOKENS[model] * self.images   # P: every image's tokens

    def _rows(self, offsets: tuple[int, ...]) -> None:
        """Mistral 3's images row by row, a break token after each row (:mod:`attnc.models.hf_pixtral`): the layout's
        runs are the rows, after :func:`~attnc.models.hf_pixtral.row_offsets` of each image's ``K`` (``offsets`` are
        the images' ``K``, or already the rows' offsets, as an export records them)."""
        self.encoder = hf_pixtral.PixtralImageEncoder(self.model, self.image_size)
        rows = self.encoder.rows
        starts = hf_pixtral.image_starts(offsets, rows) or offsets
        placed = hf_pixtral.row_offsets(starts, rows)
        if any(b < a + rows for a, b in zip(starts, starts[1:])):
            raise AttncError(f"images of {rows} rows after {format_offsets(starts)} text tokens overlap: each row of "
                             "one is followed by a break token, so the next image comes at least as many tokens later",
                             f"pass each image's K with at least {rows} tokens between them (the breaks counted)")
        self.image_offsets, self.images = starts, len(starts)
        self.visual_offset = placed[0] if len(placed) == 1 else placed
        self.num_visual_tokens = self.encoder.num_visual_tokens * self.images

    def _base_images(self, image_size: tuple[int, int] | None) -> None:
        """Take several whole images at the tower's size, as LLaVA-OneVision reads a prompt of several
        (:class:`attnc.models.hf_llava_next.OneVisionBaseImage`)."""
        self.encoder = hf_llava_next.OneVisionBaseImage(self.model)
        self.image_size = self.encoder.image_size
        if image_size is not None and tuple(image_size) != self.image_size:
            raise AttncError(f"{type(self.model).__name__} reads each image of a prompt of several at "
                             f"{self.image_size[0]}x{self.image_size[1]} pixels (its vision tower's size, no tiles), "
                             f"not {image_size[0]}x{image_size[1]}", "drop --image-size: pass each image's first "
                             "tile (the whole image resized), pixel_values [batch, images, 3, S, S]")
        self.num_visual_tokens = self.encoder.num_visual_tokens * self.images

    def _video(self, image_size: tuple[int, int] | None) -> None:
        """Take one clip of ``video_frames`` frames at the tower's size in place of the image
        (:class:`attnc.models.hf_llava_next.LlavaVideoEncoder`)."""
        name = type(self.model).__name__
        if hf_qwen_vl.is_qwen_vl(name):
            self._qwen_video(image_size)
            return
        if self.images > 1:
            raise AttncError(f"attnc exports {name} with one video per prompt, not {self.images}",
                             "export it with one offset in --text-before-image")
        if not hf_llava_next.takes_video(name):
            raise AttncError(f"attnc reads no video of {name}",
                             f"export it without --video-frames; video works on {', '.join(VIDEO_ARCHITECTURES)}")
        self.encoder = hf_llava_next.LlavaVideoEncoder(self.model, self.video_frames)
        self.image_size = self.encoder.image_size
        if image_size is not None and tuple(image_size) != self.image_size:
            raise AttncError(f"{name} reads a video's frames at {self.image_size[0]}x{self.image_size[1]} pixels (its "
                             f"vision tower's size), not {image_size[0]}x{image_size[1]}",
                             "drop --image-size: the video processor resizes the frames to the tower's size")
        self.num_visual_tokens = self.encoder.num_visual_tokens

    def _qwen_video(self, image_size: tuple[int, int] | None) -> None:
        """The Qwen family's clip: frames of ``image_size`` (its default), the tower's slices one after the other
        (:class:`attnc.models.hf_qwen_vl.QwenImageEncoder` with ``frames``), after one offset (Qwen2-VL, Qwen2.5-VL)
        or each after its own (Qwen3-VL, whose processor puts a timestamp in front of each slice)."""
        name, vision = type(self.model).__name__, self.model.config.vision_config
        hf_llava_next.check_video_frames(self.video_frames)
        slices = hf_qwen_vl.slices(vision, self.video_frames)
        if name in hf_qwen_vl.SLICES_APART and self.images != slices:
            raise AttncError(
                f"{name}'s processor writes each slice of {vision.temporal_patch_size} frames apart, between its "
                f"own delimiters and timestamp (Qwen3-VL's <0.5 seconds><|vision_start|>...<|vision_end|>, GLM-4V's "
                f"<|begin_of_image|>...<|end_of_image|>0): {self.video_frames} frames make {slices} slices, "
                f"so the prompt takes {slices} offsets, not {self.images}",
                f"pass --text-before-image with the text tokens in front of each slice ({slices} counts, the "
                "timestamps and delimiters counted; attnc.compiler.layout.split_prompt reads them off the processor's "
                "prompt with its video token)")
        if name not in hf_qwen_vl.SLICES_APART and self.images > 1:
            raise AttncError(f"attnc exports {name} with one video per prompt, not {self.images}",
                             "export it with one offset in --text-before-image")
        self.image_size = hf_qwen_vl.image_size(vision, image_size)
        self.encoder = hf_qwen_vl.QwenImageEncoder(self.model, self.image_size, self.video_frames, self.video_fps)
        self.num_visual_tokens = self.encoder.num_visual_tokens

    @property
    def placement(self) -> tuple:
        """``(visual_offset, image_size, video_frames, video_fps)``: the arguments after the model that build this
        module's layout again (every variant of an export wraps the model with them; Mistral 3's images' ``K``, not
        its rows')."""
        offsets = getattr(self, "image_offsets", None)
        offsets = self.visual_offset if offsets is None else (offsets[0] if len(offsets) == 1 else offsets)
        return offsets, self.image_size, self.video_frames, self.video_fps

    @property
    def visual_input(self) -> str:
        """The name of the graph's visual input: :data:`VIDEOS` for a clip, else :data:`PIXELS`."""
        return PIXELS if self.video_frames is None else VIDEOS

    @property
    def layout(self) -> VisualLayout:
        """Where the images' tokens lie among the text's (:class:`attnc.compiler.layout.VisualLayout`)."""
        return VisualLayout.of(self.num_visual_tokens, self.visual_offset)

    @property
    def language_model(self) -> torch.nn.Module:
        return language_model_of(self.model)

    @property
    def decoder_layers(self) -> torch.nn.ModuleList:
        return self.language_model.layers

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected image tokens ``[B, P, C]``: for LLaVA ``LlavaModel.get_image_features`` without its split
        into a list per image (which fixes the batch in a dynamo export), for the others their own. Several images
        per prompt (``pixel_values [B, N, C, H, W]``): each image's tokens, one image after the other."""
        if self.images > 1:
            if pixel_values.dim() != 5 or pixel_values.shape[1] != self.images:
                raise ValueError(f"pixel_values {list(pixel_values.shape)} is no [batch, {self.images}, channels, "
                                 "height, width] batch of images")
            features = self._features(pixel_values.flatten(0, 1))
            return features.reshape(pixel_values.shape[0], -1, features.shape[-1])
        return self._features(pixel_values)

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The projected tokens ``[B, P, C]`` of one image per row ``pixel_values [B, ...]``."""
        inner = self.model.model
        if self.encoder is not None:
            return self.encoder(pixel_values)
        if type(self.model).__name__ in TILES_BY_VALUE:
            return idefics_features(self.model, pixel_values)
        if type(self.model).__name__ != "LlavaForConditionalGeneration":
            features = inner.get_image_features(pixel_values=pixel_values)
            features = getattr(features, "pooler_output", features)
            if isinstance(features, (list, tuple)):
                features = torch.stack(list(features))   # one [P, C] per image
            return features.reshape(pixel_values.shape[0], -1, features.shape[-1])
        return hf_llava_next.tower_features(self.model, pixel_values)

    def _encoded(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``([B, P, C], deepstack)`` of an encoder (:data:`SIZED`, a video): each image's tokens one image after the
        other (``pixel_values [B, N, C, H, W]`` for several), and so each of Qwen3-VL's deepstack features."""
        if self.images == 1 or self.video_frames is not None:   # a clip: its slices, each after its offset
            return self.encoder.features(pixel_values)
        if pixel_values.dim() != 5 or pixel_values.shape[1] != self.images:
            raise ValueError(f"pixel_values {list(pixel_values.shape)} is no [batch, {self.images}, channels, "
                             "height, width] batch of images")
        batch = pixel_values.shape[0]
        visual, deepstack = self.encoder.features(pixel_values.flatten(0, 1))
        return visual.reshape(batch, -1, visual.shape[-1]), [d.reshape(batch, -1, d.shape[-1]) for d in deepstack]

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, exit_layer: int | None = None):
        return self._logits(pixel_values, input_ids, None, exit_layer)

    def _logits(self, pixel_values, input_ids, attention_mask, exit_layer):
        if exit_layer is not None and not 0 <= exit_layer <= len(self.decoder_layers):
            raise ValueError(f"exit_layer must be in [0, {len(self.decoder_layers)}], got {exit_layer}")
        return self.exit_run(pixel_values, input_ids, exit_layer, attention_mask=attention_mask)[0]

    def exit_run(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, layer: int | None,
                 decide: Callable[[torch.Tensor], bool] | None = None, cache=None,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """``(logits [B, T - K, vocab], features [B, C], exited)``: the visual tokens dropped before decoder layer
        ``layer`` when ``decide(features)`` says so (always without ``decide``; never with ``layer`` None).
        ``features`` is the mean over the text tokens (in front of and after the image; not the padding) of the
        hidden state entering that layer (what a DyVTE gate reads, :class:`attnc.passes.token_exit.ExitGate`).
        ``cache``: a transformers ``DynamicCache`` the language model fills (a new one it drops when None).
        ``attention_mask`` ``[B, T]``: 0 at padding (:class:`MaskedVisionLanguageOutput`)."""
        layout = self.layout
        if input_ids.shape[1] <= layout.text_before_end:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens: fewer than the {layout.text_before_end} in "
                             "front of the image and one after it")
        inner = self.model.model
        visual, deepstack = self._encoded(pixel_values) if self.encoder is not None else \
            (self.image_features(pixel_values), [])
        p, k = layout.tokens, layout.text_before_end   # P, and K: the text in front of the last image's end
        x = interleave(inner.get_input_embeddings()(input_ids), visual, layout)
        state: dict = {"exited": False, "features": None}
        layers = self.decoder_layers
        _check_after_deepstack(self.model, len(deepstack), layer)

        def add_deepstack(features, module, args, output):   # as transformers' _deepstack_process, at the images
            hidden = output[0] if isinstance(output, tuple) else output
            pieces, start, per = [], 0, layout.per_image
            for i, (a, b) in enumerate(layout.ranges()):   # the text as it is, each image's tokens + its features
                pieces += [hidden[:, start:a], hidden[:, a:b] + features[:, i * per:(i + 1) * per]]
                start = b
            hidden = torch.cat([*pieces, hidden[:, start:]], 1)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        extra = {} if cache is None else {"past_key_values": cache}
        one = int(type(self.model).__name__ in ONE_BASED)
        if attention_mask is not None:   # the image's tokens are no padding; positions count the tokens before each
            whole = interleave(attention_mask, attention_mask.new_ones(x.shape[0], p), layout)
            extra.update(attention_mask=whole, position_ids=mask_positions(whole) + one)
        elif one:
            extra.update(position_ids=torch.arange(x.shape[1], device=x.device)[None] + one)
        if isinstance(self.encoder, hf_qwen_vl.QwenImageEncoder):   # M-RoPE: the images' tokens by row and column
            extra.update(position_ids=self.encoder.positions(layout.offsets, input_ids, attention_mask))
        hooks = [layers[i].register_forward_hook(functools.partial(add_deepstack, features))
                 for i, features in enumerate(deepstack)]
        hooks += masking_layers(self.model, language_masks(self.model, x, extra, layout))
        if layer is not None and layer < len(layers):   # after the masks: their image's entries go too
            def drop(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                if module is layers[layer]:
                    state["features"] = text_mean(text_of(hidden, 1, layout), attention_mask)
                    state["exited"] = True if decide is None else bool(decide(state["features"]))
                return text_only(args, kwargs, layout, x.shape[1]) if state["exited"] else None

            hooks += [m.register_forward_pre_hook(drop, with_kwargs=True) for m in layers[layer:]]
        try:
            hidden = self.language_model(inputs_embeds=x, use_cache=True, **extra).last_hidden_state
        finally:
            for hook in hooks:
                hook.remove()
        logits = self.model.lm_head(hidden[:, k:] if state["exited"] else hidden[:, k + p:])
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None and type(self.model).__name__ in CAPPED_LOGITS:
            logits = cap * torch.tanh(logits / cap)
        return logits, state["features"], state["exited"]


class MaskedVisionLanguageOutput(VisionLanguageOutput):
    """``(pixel_values, input_ids [B, T], attention_mask [B, T]) -> logits [B, T - K, vocab]``: prompts of different
    lengths in one batch (``attnc export --with-attention-mask``). Each row is padded after the ``K`` text tokens in
    front of the image (a chat template's, the same in every prompt): ``[K tokens][padding][its text]``, the mask 0
    at the padding. The image's tokens are never masked, and positions count the tokens in front of each one (as
    ``generate`` computes them from the mask), so each row's logits at its tokens are those it gets alone, as
    transformers gives a prompt padded on the left. No query attends to padding alone: the padding's own outputs are
    defined too.
    """

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                exit_layer: int | None = None):
        return self._logits(pixel_values, input_ids, attention_mask, exit_layer)


class VisionLanguageFirstStep(VisionLanguageOutput):
    """The first step of generating an answer about an image (``attnc export --first-step``)::

        (pixel_values, input_ids [B, T]) -> (logits [B, T - K, vocab], present.N.key / .value [B, H, K + P + T, D])

    the prompt with its image run once, its KV cache (image tokens included) handed to the later steps, which are the
    checkpoint's text-only step (``--with-past``, :class:`VisionLanguageStep`);
    :func:`attnc.compiler.decode.generate_vision_language` decodes with the two.
    """

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, exit_layer: int | None = None):
        """``exit_layer=k`` drops the visual tokens before decoder layer ``k`` (``attnc compile --token-exit static
        --exit-layer k`` of this graph): the caches of layers ``k:`` then hold the text's ``K + T`` tokens, those
        in front of it all ``K + P + T``; :class:`VisionLanguageStep` with the same ``exit_layer`` reads them."""
        return self._first_step(pixel_values, input_ids, None, exit_layer)

    def _first_step(self, pixel_values, input_ids, attention_mask, exit_layer):
        _check_cached_exit(exit_layer, len(self.decoder_layers))
        return self.exit_run(pixel_values, input_ids, exit_layer, attention_mask=attention_mask)[0]

    def exit_run(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, layer: int | None,
                 decide: Callable[[torch.Tensor], bool] | None = None, cache=None,
                 attention_mask: torch.Tensor | None = None) -> tuple[tuple, torch.Tensor | None, bool]:
        """:meth:`VisionLanguageOutput.exit_run` whose first item is the step's outputs, ``(logits, present.0.key,
        ...)``: a gate (``decide``) chooses per call whether the later layers' caches hold the text alone
        (``--token-exit dynamic`` of this graph; the later steps are then compiled both ways)."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else cache
        logits, features, exited = super().exit_run(pixel_values, input_ids, layer, decide, cache, attention_mask)
        return (logits, *keys_and_values(cache, len(self.decoder_layers))), features, exited


class MaskedVisionLanguageFirstStep(VisionLanguageFirstStep):
    """:class:`VisionLanguageFirstStep` of padded prompts (``--first-step --with-attention-mask``): ``(pixel_values,
    input_ids, attention_mask)``, padded as :class:`MaskedVisionLanguageOutput` says; the cache holds the padding's
    entries, which the later steps' mask (0 there) hides."""

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                exit_layer: int | None = None):
        return self._first_step(pixel_values, input_ids, attention_mask, exit_layer)


def language_masks(model: torch.nn.Module, x: torch.Tensor, extra: dict, layout: VisualLayout | None
                   ) -> dict | None:
    """The masks by attention type (``{"full_attention": ..., "sliding_attention": ...}``, which
    :func:`masking_layers` hands to the decoder layers) of a prompt's tokens ``x [B, N, C]`` whose images' tokens
    (``layout``) attend to each other both ways, each image to itself (:data:`IMAGE_BLOCK`: Gemma 3's, as its
    multimodal forward has them attend from ``token_type_ids``), whose whole prompt does (:data:`PROMPT_BLOCK`:
    PaliGemma's prefix), or whose sliding-window layers see padded prompts; None where transformers' own masks are
    those. ``extra``: the language model's other arguments (``attention_mask [B, N]`` and ``position_ids`` of padded
    prompts, ``past_key_values``); ``layout`` None for a later step's text alone.

    A padded prompt's padding lies between its image and its text, not in front of everything, so a window of ``W``
    *tokens* would reach less of its text than the prompt alone sees: each sliding-window layer's window is ``W``
    *positions* instead (the count of tokens in front, as ``generate`` computes positions from the mask), the same
    as transformers' window for a prompt alone or padded on the left."""
    from transformers.masking_utils import blockwise_overlay, create_causal_mask, sliding_window_overlay

    config = model.config.get_text_config()
    types = set(layer_types(config))
    name = type(model).__name__
    image, prompt = name in IMAGE_BLOCK and layout is not None, name in PROMPT_BLOCK and layout is not None
    window = config.sliding_window if "sliding_attention" in types else None
    mask = extra.get("attention_mask")
    if (not (image or prompt) and (window is None or mask is None)) or types - {"full_attention", "sliding_attention"}:
        return None
    common = dict(config=config, inputs_embeds=x, attention_mask=mask, past_key_values=extra.get("past_key_values"),
                  position_ids=extra.get("position_ids"))
    index = torch.arange(x.shape[1], device=x.device)
    image_block = prompt_block = None
    if image:   # a block per run of image tokens, inside each window (Gemma 3's AND(window, OR(causal, image)))
        runs = []   # images side by side are one run, as transformers groups them
        for start, stop in layout.ranges():
            if runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], stop)
            else:
                runs.append((start, stop))
        block = torch.full_like(index, -1)   # by comparisons: the export's token count is symbolic
        for i, (start, stop) in enumerate(runs):
            block = torch.where((index >= start) & (index < stop), i, block)
        image_block = blockwise_overlay(block.expand(x.shape[0], -1))
    if prompt:   # one block, the whole prompt, past any window (PaliGemma's OR(AND(causal, window), prompt))
        prompt_block = torch.zeros_like(index).expand(x.shape[0], -1)
    masks = {"full_attention": create_causal_mask(**common, or_mask_function=image_block,
                                                  block_sequence_ids=prompt_block)}
    if window is not None:
        if mask is None:
            inside = sliding_window_overlay(window)
        else:
            positions = mask_positions(mask)

            def inside(batch, head, query, key):   # by positions: the padding between image and text counts none
                return positions[batch, key] > positions[batch, query] - window
        masks["sliding_attention"] = create_causal_mask(**common, or_mask_function=image_block,
                                                        and_mask_function=inside, block_sequence_ids=prompt_block)
    return masks


def layer_types(config) -> list[str]:
    """Each decoder layer's attention type in text ``config``: its ``layer_types``; without them every layer slides
    where it names a ``sliding_window`` (Mistral's, Phi-3's), else none does."""
    kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
    return list(getattr(config, "layer_types", None) or [kind] * config.num_hidden_layers)


def masking_layers(model: torch.nn.Module, masks) -> list:
    """Forward pre-hooks that hand each decoder layer of ``model``'s language model its mask by its attention type
    (``config.layer_types``) from ``masks``: a mapping (:func:`language_masks`), or a function of the first layer's
    hidden state and keyword arguments returning one (called once per forward: a later step's masks need the cache
    the layers see); none for None. The language model's own masks are then left unread: not every one takes
    masks by type."""
    if masks is None:
        return []
    layers = language_model_of(model).layers
    types = layer_types(model.config.get_text_config())
    made: dict = {}

    def give(kind, module, args, kwargs):
        if module is layers[0]:
            made["masks"] = masks(args[0] if args else kwargs["hidden_states"], kwargs) if callable(masks) else masks
        return None if made["masks"] is None else (args, {**kwargs, "attention_mask": made["masks"][kind]})

    return [layer.register_forward_pre_hook(functools.partial(give, kind), with_kwargs=True)
            for layer, kind in zip(layers, types)]


def text_mean(text: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, C]``: the mean of ``text [B, N, C]`` over its tokens, those where ``attention_mask [B, N]`` is 1 alone
    when given (over at least one: what the dynamic token exit's gate computes in the graph)."""
    if attention_mask is None:
        return text.mean(1)
    weight = attention_mask.to(text.dtype)[..., None]
    return (text * weight).sum(1) / weight.sum(1).clamp(min=1)


def _check_cached_exit(exit_layer: int | None, depth: int) -> None:
    """A token exit of a cached generation graph leaves at least one layer with the image's tokens in its cache (an
    exit before layer 0 never reads the image: its steps' mask would be the text's alone)."""
    if exit_layer is not None and not 1 <= exit_layer <= depth:
        raise AttncError(f"a generation step's token exit must come after a decoder layer, in [1, {depth}], got "
                         f"{exit_layer}", "exit after layer 1 or later: an exit before layer 0 never reads the "
                         "image, so prompt the text model alone instead")


def _check_after_deepstack(model: torch.nn.Module, first: int, exit_layer: int | None) -> None:
    """Refuse a token exit before decoder layer ``first``, the first after those that add Qwen3-VL's deepstack
    features to the image's hidden states."""
    if exit_layer is not None and exit_layer < first:
        raise AttncError(f"{type(model).__name__} adds image features to the image's hidden states after its first "
                         f"{first} decoder layers (deepstack), so its visual tokens cannot go before layer "
                         f"{exit_layer}", f"exit before layer {first} or later")


class VisionLanguageStep(CachedStep):
    """A vision-language checkpoint's later generation steps: :class:`attnc.models.hf_checkpoint.CachedStep` on its
    language model (``attnc export --with-past``), which knows the image's ``P`` tokens after the first ``K`` of the
    cache (``num_visual_tokens``, ``visual_offset``: the export records them; several images' after one ``K`` each).

    ``forward(..., exit_layer=k)`` reads the cache a first step exited before layer ``k`` left
    (:class:`VisionLanguageFirstStep`): layers ``k:`` take caches without the images' tokens and see the mask
    without their columns (``[K, K + P)`` of one image; a forward pre-hook on each), the layers in front of them the
    whole cache.
    Positions stay those of the whole sequence, as the exited first step keeps them.
    """

    def __init__(self, model: torch.nn.Module, layers: int, num_visual_tokens: int,
                 visual_offset: int | tuple[int, ...] = 0, image_size: tuple[int, int] | None = None,
                 video_frames: int | None = None, video_fps: float | None = None):
        super().__init__(model, layers)
        self.num_visual_tokens, self.visual_offset = num_visual_tokens, visual_offset
        self.layout = VisualLayout.of(num_visual_tokens, visual_offset)
        # recorded beside P: Qwen2-VL's P follows the image size, a video's the frames
        self.image_size, self.video_frames, self.video_fps = image_size, video_frames, video_fps
        self.first_exit_layer = hf_qwen_vl.deepstack_layers(model.config.vision_config)
        if hf_pixtral.reads(model.config, type(model).__name__):   # the images' K (the layout's runs: their rows)
            rows = hf_pixtral.grid(model.config, hf_pixtral.image_size(model.config, image_size))[0]
            self.image_offsets = hf_pixtral.image_starts(self.layout.offsets, rows)
        # M-RoPE places the text after the image max(rows, columns) after its front, not P: every later token as far;
        # PaliGemma's positions count from 1
        apart = type(model).__name__ in hf_qwen_vl.SLICES_APART   # Qwen3-VL's slices each placed as an image
        self.position_shift = hf_qwen_vl.position_shift(model.config.vision_config, image_size,
                                                        None if apart else video_frames, video_fps) \
            * self.layout.images \
            if hf_qwen_vl.is_qwen_vl(model) else int(type(model).__name__ in ONE_BASED)

    def step_positions(self, attention_mask: torch.Tensor, new: int) -> torch.Tensor:
        return super().step_positions(attention_mask, new) + self.position_shift

    def forward(self, input_ids, attention_mask, *past, exit_layer: int | None = None):
        decoder = language_model_of(self.model).layers
        _check_cached_exit(exit_layer, len(decoder))
        _check_after_deepstack(self.model, self.first_exit_layer, exit_layer)   # as the first step checks it

        exits = exit_layer is not None and exit_layer < len(decoder)
        layout, total = self.layout, attention_mask.shape[-1]
        if exits and total < layout.end + input_ids.shape[1]:
            raise ValueError(f"attention_mask covers {total} tokens: fewer than the {layout.end} in front of the "
                             f"image's end and the {input_ids.shape[1]} new ones")

        def masks(hidden, kwargs):   # the new tokens' (a sliding window by positions), once the cache is known
            extra = {"attention_mask": attention_mask, "position_ids": kwargs.get("position_ids"),
                     "past_key_values": kwargs.get("past_key_values")}
            return language_masks(self.model, hidden, extra, None)

        hooks = masking_layers(self.model, masks)
        if exits:   # after the masks: their image's columns go too
            def drop(module, args, kwargs):
                mask = kwargs.get("attention_mask")
                if isinstance(mask, torch.Tensor) and mask.shape[-1] == total:
                    kwargs = {**kwargs, "attention_mask": text_of(mask, -1, layout)}
                return args, kwargs

            hooks += [m.register_forward_pre_hook(drop, with_kwargs=True) for m in decoder[exit_layer:]]
        try:
            return super().forward(input_ids, attention_mask, *past)
        finally:
            for hook in hooks:
                hook.remove()


# the exporters see CachedStep's named caches (past_0, ...); exit_layer, keyword-only, is the PyTorch reference's
VisionLanguageStep.forward.__signature__ = CachedStep.forward.__signature__.replace(parameters=[
    *CachedStep.forward.__signature__.parameters.values(),
    inspect.Parameter("exit_layer", inspect.Parameter.KEYWORD_ONLY, default=None)])


# Keyword arguments of a decoder layer and their token axes: (query, key) for the mask, the last for positions.
_TOKEN_AXES = {"attention_mask": (-2, -1), "position_ids": (-1,), "cache_position": (-1,),
               "position_embeddings": (-2,)}
_PASSED = ("past_key_values", "past_key_value", "use_cache", "output_attentions", "layer_idx")


def interleave(text: torch.Tensor, visual: torch.Tensor, layout: VisualLayout) -> torch.Tensor:
    """``text [B, T, ...]`` with the images' tokens ``visual [B, P, ...]`` (one image's after the other's) in their
    places along axis 1 (``layout``): ``[text[:, :K1], image 1, text[:, K1:K2], image 2, ..., text[:, Kn:]]``."""
    pieces, start, p = [], 0, layout.per_image
    for i, k in enumerate(layout.offsets):
        if k > start:
            pieces.append(text[:, start:k])
        pieces.append(visual[:, i * p:(i + 1) * p] if layout.images > 1 else visual)
        start = k
    return torch.cat([*pieces, text[:, start:] if start else text], 1)


def text_of(value: torch.Tensor, axis: int, layout: VisualLayout) -> torch.Tensor:
    """``value`` without the images' tokens (``layout``) along ``axis``: the text's, in their order."""
    n = value.shape[axis]
    return torch.cat([value.narrow(axis, a, (n if b is None else b) - a) for a, b in layout.text_ranges(n)], axis)


def text_only(args: tuple, kwargs: dict, layout: VisualLayout, n: int) -> tuple[tuple, dict]:
    """A decoder layer's ``(args, kwargs)`` without the images' visual tokens (``layout``) of the sequence's ``n``
    tokens: the hidden state (the first argument, unless the layer before dropped them already), the causal
    mask's query and key axes, the positions and the rotary tables (``position_embeddings``, a ``(cos, sin)`` pair
    ``[..., n, D]``), which the language model computes once for all its layers.

    Raises:
        AttncError: the layer takes a tensor over the tokens attnc does not know the token axis of.
    """
    def cut(value, axes):
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v, axes) for v in value)
        if not isinstance(value, torch.Tensor):
            return value
        for axis in axes:
            if value.shape[axis] == n:
                value = text_of(value, axis, layout)
        return value

    if args:
        args = (cut(args[0], (1,)), *args[1:])
    out = {}
    for name, value in kwargs.items():
        if name == "hidden_states":
            out[name] = cut(value, (1,))
        elif name in _TOKEN_AXES:
            out[name] = cut(value, _TOKEN_AXES[name])
        elif name in _PASSED or not _over_tokens(value, n):
            out[name] = value
        else:
            raise AttncError(f"a decoder layer takes {name!r}, a tensor over the tokens whose token axis attnc "
                             "does not know, so it cannot drop the visual tokens in PyTorch",
                             "validate with --reference original, or report the architecture to attnc")
    return args, out


def _over_tokens(value, n: int) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_over_tokens(v, n) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() > 0 and n in value.shape[1:]
