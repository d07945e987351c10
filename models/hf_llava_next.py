"""LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision checkpoints: any-resolution tiles, read at one image size per export.

LLaVA-NeXT's processor resizes each image to the resolution of ``config.image_grid_pinpoints`` that fits it best, pads
it, cuts it into tiles of the vision tower's size and puts the whole image, resized to one tile, in front of them:
``pixel_values [B, N, 3, S, S]`` with the original sizes ``image_sizes`` beside them. The model runs the tower on every
tile, lays the tiles' features out as the resized image's grid, cuts the padding away again (``unpad_image``, by the
original size), ends each row of features with a learned ``image_newline`` token and puts the whole image's
features in front. LLaVA-OneVision (``anyres_max_N``) shrinks the unpadded grid bilinearly where it holds more than
about ``N`` tiles' features (by more than 1.1× on a side). How many tiles and tokens an image becomes follows from
its original size, and transformers computes all of it from ``image_sizes`` with ``.tolist()`` and Python loops:
nothing of it exports.

At one original size every piece is a constant (:class:`LlavaNextImageEncoder`): the tiles' count, the grid, the
rows and columns the unpadding keeps (read from the shape transformers' own ``unpad_image`` leaves), the size
OneVision's grid shrinks to, and ``P``. ``attnc export CKPT --image-size HxW`` fixes it; the graph takes the
processor's ``pixel_values [B, N, 3, S, S]`` for images of that size (resize an image to it before the processor,
and the processor cuts the tiles the export reads). Everything built for LLaVA then works: the layout is LLaVA's
``[K text][P visual][T text]``.

Video (``attnc export --video-frames F``): LLaVA-OneVision and LLaVA-NeXT-Video read a clip of ``F`` frames at the
tower's size (``pixel_values_videos [B, F, 3, S, S]``, what their video processors give). ``get_video_features`` runs
the tower on every frame and pools each frame's features 2× on a side (OneVision bilinearly to ``ceil(side / 2)``,
NeXT-Video by its ``vision_resampler``), the frames one after the other; OneVision ends the clip with one
``image_newline``. :class:`LlavaVideoEncoder` calls it, so ``P`` (``F`` times the pooled tokens of a frame, plus
OneVision's newline) is the video's, in place of the image's: ``[K text][P video][T text]``.
"""

from __future__ import annotations

import math

import torch

from attnc.compiler.errors import AttncError

# config.architectures[0] of the checkpoints LlavaNextImageEncoder reads (checked against transformers' forward in
# tests/models/test_hf_llava_next.py)
ARCHITECTURES = ("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration",
                 "LlavaNextVideoForConditionalGeneration")
# ... those that read each image of a prompt of several whole, at the tower's size (OneVisionBaseImage) ...
BASE_WHEN_SEVERAL = ("LlavaOnevisionForConditionalGeneration",)
# ... and those LlavaVideoEncoder reads a video of (checked against transformers' forward in
# tests/models/test_hf_video.py)
VIDEO_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration", "LlavaNextVideoForConditionalGeneration")


def is_llava_next(model_or_name) -> bool:
    """Whether ``model_or_name`` (a transformers model or its class name) is one :class:`LlavaNextImageEncoder`
    reads."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    return name in ARCHITECTURES


def takes_video(model_or_name) -> bool:
    """Whether ``model_or_name`` (a transformers model or its class name) is one :class:`LlavaVideoEncoder` reads."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    return name in VIDEO_ARCHITECTURES


def video_shape(config, frames: int) -> tuple[int, int, int, int]:
    """``(F, C, S, S)``: the video processor's ``pixel_values_videos`` of one clip of ``frames`` frames at the vision
    tower's size ``S``."""
    vision = config.vision_config
    return frames, getattr(vision, "num_channels", 3), vision.image_size, vision.image_size


def image_size(config, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of the original images a LLaVA-NeXT export takes: ``size``, else one tile's (the vision tower's
    ``image_size``, square).

    Raises:
        AttncError: a side that is not positive.
    """
    side = config.vision_config.image_size
    height, width = size or (side, side)
    if height <= 0 or width <= 0:
        raise AttncError(f"an image of {height}x{width} pixels has no pixels", "pass --image-size HxW, both positive")
    return int(height), int(width)


def pixel_shape(config, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(N, C, S, S)``: the processor's ``pixel_values`` of one image of original ``size`` ``(H, W)``: ``N`` tiles
    (the whole image first) of the tower's size ``S``."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    vision = config.vision_config
    tiles = image_size_to_num_patches(list(size), config.image_grid_pinpoints, vision.image_size)
    return tiles, getattr(vision, "num_channels", 3), vision.image_size, vision.image_size


def tower_features(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``[N, p, C]``: LLaVA's (and LLaVA-NeXT's) image features of ``pixel_values [N, 3, S, S]``: the vision tower's
    hidden states of ``vision_feature_layer`` (several concatenated), the CLS token dropped under the ``"default"``
    strategy, through the projector; as ``get_image_features`` computes them before splitting them per image."""
    inner, config = model.model, model.config
    out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
    layer = config.vision_feature_layer
    layers = [layer] if isinstance(layer, int) else list(layer)
    default = config.vision_feature_select_strategy == "default"
    states = [out.hidden_states[i][:, 1:] if default else out.hidden_states[i] for i in layers]
    return inner.multi_modal_projector(torch.cat(states, -1))


class LlavaNextImageEncoder(torch.nn.Module):
    """``pixel_values [B, N, 3, S, S] -> [B, P, C]``: what ``get_image_features`` and ``pack_image_features`` compute
    for images of original size ``image_size`` ``(H, W)``: the whole image's ``p`` tokens, then the tiles' features
    as the image's grid (rows of tiles, each tile's rows), its padding cut away (OneVision's grid then shrunk to
    its ``anyres_max_N`` budget), each row ended by ``image_newline``."""

    def __init__(self, model: torch.nn.Module, image_size: tuple[int, int]):
        super().__init__()
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        config = model.config
        vision = config.vision_config
        self.model = [model]   # not a submodule: VisionLanguageOutput holds it
        self.image_size = tuple(image_size)
        self.tiles = pixel_shape(config, self.image_size)[0]
        side = vision.image_size // vision.patch_size   # a tile's features: side × side (the CLS token aside)
        rows, columns = get_anyres_image_grid_shape(list(self.image_size), config.image_grid_pinpoints,
                                                    vision.image_size)
        if rows * columns != self.tiles - 1:
            raise AttncError(f"{type(model).__name__}'s grid pinpoints give {rows} x {columns} tiles for a "
                             f"{self.image_size[0]}x{self.image_size[1]} image, but {self.tiles - 1} tiles",
                             "check the checkpoint's image_grid_pinpoints")
        self.grid, self.side = (rows, columns), side
        # the rows and columns unpad_image keeps of the grid's features: transformers' own function on the grid, which
        # cuts as many from either end of one axis (all of them from a long, thin image's: no row, or rows of no
        # column, each still ended by image_newline)
        height, width = rows * side, columns * side
        kept_rows, kept_columns = unpad_image(torch.zeros(1, height, width), list(self.image_size)).shape[1:]
        self.kept_rows = ((height - kept_rows) // 2, (height + kept_rows) // 2)
        self.kept_columns = ((width - kept_columns) // 2, (width + kept_columns) // 2)
        self.shrunk = None   # OneVision: (rows, columns) of the bilinearly shrunk grid, as pack_image_features sizes it
        budget = getattr(config, "vision_aspect_ratio", None)
        if budget is not None:
            ratio = math.sqrt(kept_rows * kept_columns / (int(budget.strip("anyres_max_")) * side ** 2))
            if ratio > 1.1:
                self.shrunk = kept_rows, kept_columns = int(kept_rows // ratio), int(kept_columns // ratio)
        self.num_visual_tokens = side * side + kept_rows * (kept_columns + 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)[0]

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``([B, P, C], [])``: the image's tokens (no deepstack features: :class:`~attnc.models.hf_qwen_vl.
        QwenImageEncoder`'s interface)."""
        model = self.model[0]
        batch = pixel_values.shape[0]
        (rows, columns), side = self.grid, self.side
        features = tower_features(model, pixel_values.reshape(-1, *pixel_values.shape[2:]))
        features = features.reshape(batch, self.tiles, side * side, features.shape[-1])
        width = features.shape[-1]
        whole, tiles = features[:, 0], features[:, 1:]
        # [B, rows, columns, side, side, C] -> [B, C, rows·side, columns·side]: the resized image's grid of features
        grid = tiles.reshape(batch, rows, columns, side, side, width).permute(0, 5, 1, 3, 2, 4)
        grid = grid.reshape(batch, width, rows * side, columns * side)
        grid = grid[:, :, self.kept_rows[0]:self.kept_rows[1], self.kept_columns[0]:self.kept_columns[1]]
        if self.shrunk is not None:
            grid = torch.nn.functional.interpolate(grid, list(self.shrunk), mode="bilinear")
        newline = model.model.image_newline.to(grid.dtype)[None, :, None, None]
        grid = torch.cat([grid, newline.expand(batch, width, grid.shape[2], 1)], -1)
        return torch.cat([whole, grid.flatten(2).transpose(1, 2)], 1), []


def check_video_frames(frames) -> None:
    """Raise an :class:`AttncError` unless ``frames`` (``--video-frames``) is a whole count of at least 1."""
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise AttncError(f"a video of {frames!r} frames has no frames", "pass --video-frames F, F at least 1")


class LlavaVideoEncoder(torch.nn.Module):
    """``pixel_values_videos [B, F, 3, S, S] -> [B, P, C]``: what ``get_video_features`` computes for a clip of
    ``frames`` frames (transformers' own function: it exports as it is): each frame's tower features pooled 2× on a
    side, the frames one after the other, LLaVA-OneVision's ``image_newline`` after the last. ``P`` is a Python int,
    counted without running the tower: the pooling of one frame's ``side × side`` features, times ``F``."""

    def __init__(self, model: torch.nn.Module, frames: int):
        super().__init__()
        if not takes_video(model):
            raise AttncError(f"attnc reads no video of {type(model).__name__}",
                             f"export it without --video-frames; video works on {', '.join(VIDEO_ARCHITECTURES)}")
        check_video_frames(frames)
        self.model = [model]   # not a submodule: VisionLanguageOutput holds it
        self.frames = frames
        config, inner = model.config, model.model
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.image_size = (vision.image_size, vision.image_size)   # the video processor's frames: the tower's size
        with torch.no_grad():   # one frame's pooled tokens, from blank features of the width the pooling reads
            if hasattr(inner, "apply_pooling"):   # OneVision: pooled after the projector, one newline per clip
                per_frame = inner.apply_pooling(torch.zeros(1, side * side, config.text_config.hidden_size)).shape[1]
                newline = 1
            else:   # NeXT-Video: its vision_resampler pools the tower's features before the projector
                per_frame = inner.vision_resampler(torch.zeros(1, side * side, vision.hidden_size)).shape[1]
                newline = 0
        self.num_visual_tokens = frames * int(per_frame) + newline

    def forward(self, pixel_values_videos: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values_videos)[0]

    def features(self, pixel_values_videos: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``([B, P, C], [])``: the clip's tokens (no deepstack features: :class:`~attnc.models.hf_qwen_vl.
        QwenImageEncoder`'s interface)."""
        model = self.model[0]
        if pixel_values_videos.dim() != 5 or pixel_values_videos.shape[1] != self.frames:
            raise ValueError(f"pixel_values_videos {list(pixel_values_videos.shape)} is no [batch, {self.frames}, "
                             "channels, height, width] batch of clips")
        config = model.config
        out = model.model.get_video_features(pixel_values_videos, vision_feature_layer=config.vision_feature_layer,
                                             vision_feature_select_strategy=config.vision_feature_select_strategy,
                                             return_dict=True)
        return out.pooler_output, []


class OneVisionBaseImage(torch.nn.Module):
    """``pixel_values [B, 3, S, S] -> [B, side² + 1, C]``: LLaVA-OneVision's image of a prompt of several
    (``get_image_features`` with ``batch_num_images`` above 1: no tiles, only the whole image at the tower's size,
    what its processor's first tile of each image holds), its features through the projector and one
    ``image_newline`` after them. ``P`` per image is ``side² + 1``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = [model]   # not a submodule: VisionLanguageOutput holds it
        vision = model.config.vision_config
        self.image_size = (vision.image_size, vision.image_size)
        self.num_visual_tokens = (vision.image_size // vision.patch_size) ** 2 + 1

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)[0]

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``([B, P, C], [])`` (:class:`LlavaNextImageEncoder`'s interface)."""
        model = self.model[0]
        features = tower_features(model, pixel_values)
        newline = model.model.image_newline.to(features.dtype)[None, None].expand(features.shape[0], 1, -1)
        return torch.cat([features, newline], 1), []
