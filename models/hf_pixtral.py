"""Mistral 3 (Mistral Small 3.1 and 3.2) and Pixtral-12B (a LLaVA with a Pixtral tower) images at one size, for
:mod:`attnc.models.hf_vision_language`.

Its processor resizes each image to its own multiple of ``patch × merge`` pixels (28), hands the tower the images
padded to the batch's largest with their ``image_sizes``, and writes the image into the prompt row by row: each row's
``[IMG]`` placeholders followed by ``[IMG_BREAK]``, the last row's by ``[IMG_END]``. The tower crops each image by
its size, packs the images into one sequence under a block mask (2-D rotary positions per image), and the projector's
patch merger cuts each image's grid into ``merge × merge`` blocks: all of it is per image and data-dependent, so none
of it exports with a dynamic batch. At one image size all of it is constant, so :class:`PixtralImageEncoder` takes
``pixel_values [B, 3, H, W]`` (resized and normalised as the processor does) and runs the tower's own layers on the
batch (each image attending within itself, as the block mask has it), the projector's norm, its merger on each image's
grid (``unfold``) and its MLP: ``[B, rows × columns, C]``, row by row. Pixtral-12B's LLaVA projector has no merger:
its rows are the patches'.

The rows are not contiguous in the prompt: a text token (the break) follows each. attnc places an image's rows as
runs of visual tokens (:class:`attnc.compiler.layout.VisualLayout`, as several images are): an image after ``K`` text
tokens puts its rows after ``K, K + 1, ..., K + rows - 1`` (:func:`row_offsets`), the break and end tokens staying in
``input_ids`` as the processor wrote them. The export records those row offsets, which the visual-token exit reads;
``--text-before-image K`` takes each image's ``K``. Tested against transformers' forward on the processor's prompt in
``tests/models/test_hf_pixtral.py``.
"""

from __future__ import annotations

import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import tiled_image_size

# config.architectures[0] of the checkpoints PixtralImageEncoder reads (and LLaVA's with a Pixtral tower, :func:`reads`)
ARCHITECTURES = ("Mistral3ForConditionalGeneration",)


def reads(config, name: str) -> bool:
    """Whether :class:`PixtralImageEncoder` reads a checkpoint of ``config`` and architecture ``name``: Mistral 3, or
    a LLaVA whose vision tower is Pixtral's (Pixtral-12B)."""
    return name in ARCHITECTURES or (name == "LlavaForConditionalGeneration" and
                                     getattr(config.vision_config, "model_type", None) == "pixtral")


def merge_size(config) -> int:
    """Patches a side each visual token merges: Mistral 3's ``spatial_merge_size``, 1 for Pixtral-12B's LLaVA."""
    return getattr(config, "spatial_merge_size", 1) if "Mistral3" in type(config).__name__ else 1


def image_size(config, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of the images a Mistral 3 export takes: ``size``, else the vision config's ``image_size`` square
    (the processor's longest edge).

    Raises:
        AttncError: a side that is no positive multiple of the patch size times the merge size.
    """
    vision = config.vision_config
    side = vision.image_size if isinstance(vision.image_size, int) else max(vision.image_size)
    return tiled_image_size("Pixtral", size or (side, side), vision.patch_size, merge_size(config))


def grid(config, size: tuple[int, int]) -> tuple[int, int]:
    """``(rows, columns)`` of visual tokens an image of ``size`` makes (merged blocks)."""
    step = config.vision_config.patch_size * merge_size(config)
    return size[0] // step, size[1] // step


def row_offsets(starts: tuple[int, ...], rows: int) -> tuple[int, ...]:
    """Each row's offset (the text tokens in front of it) of images after ``starts`` text tokens: an image after ``K``
    puts row ``r`` after ``K + r`` (the breaks in front of it are text)."""
    return tuple(k + r for k in starts for r in range(rows))


def image_starts(offsets: tuple[int, ...], rows: int) -> tuple[int, ...] | None:
    """The images' ``K`` of ``offsets`` that are already :func:`row_offsets` (each image's ``rows`` offsets one apart),
    else None."""
    if rows <= 1:   # each image one run: its K is its row's offset
        return tuple(offsets)
    if len(offsets) % rows:
        return None
    groups = [offsets[i:i + rows] for i in range(0, len(offsets), rows)]
    if all(list(g) == list(range(g[0], g[0] + rows)) for g in groups):
        return tuple(g[0] for g in groups)
    return None


class PixtralImageEncoder(torch.nn.Module):
    """``pixel_values [B, 3, H, W] -> [B, rows × columns, C]``: what ``get_image_features`` computes for images of
    ``image_size`` (the processor's resized and normalised images), row by row.

    The tower's weights are the model's (``model.model.vision_tower``); its layers run batched over each image's
    patches (the block mask's blocks), with the 2-D rotary tables of the image's grid fixed. The features are the
    hidden states of ``vision_feature_layer`` (several concatenated, as transformers does), through the projector's
    norm, its patch merger on each image's grid and its MLP (Pixtral-12B's LLaVA projector: its MLP alone).

    Raises:
        AttncError: a LLaVA that drops the first feature (``vision_feature_select_strategy="default"``, a CLS token
            Pixtral's tower has not).
    """

    def __init__(self, model: torch.nn.Module, image_size: tuple[int, int]):
        super().__init__()
        config, tower = model.config, model.model.vision_tower
        self.tower, self.projector = tower, model.model.multi_modal_projector
        self.patch, self.merge = config.vision_config.patch_size, merge_size(config)
        if getattr(config, "vision_feature_select_strategy", "full") == "default":
            raise AttncError(f"{type(model).__name__} drops its Pixtral tower's first feature as a CLS token "
                             "(vision_feature_select_strategy 'default'), which would cut a patch off each image",
                             "set vision_feature_select_strategy to 'full' in its config, as Pixtral-12B's is")
        self.image_size = tuple(image_size)
        self.patches = (self.image_size[0] // self.patch, self.image_size[1] // self.patch)
        self.rows, self.columns = grid(config, self.image_size)
        self.num_visual_tokens = self.rows * self.columns
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        depth = len(tower.transformer.layers)
        # hidden state i: after i layers (0: the embeddings), negatives counted from the last, as transformers does
        self.states = [i if i >= 0 else depth + 1 + i for i in self.feature_layers]
        h, w = self.patches
        rows, columns = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        positions = torch.stack([rows.flatten(), columns.flatten()], -1)
        with torch.no_grad():
            weight = tower.patch_conv.weight
            cos, sin = tower.patch_positional_embedding(weight.new_zeros(1, h * w, weight.shape[0]), positions)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)[0]

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list]:
        """``([B, rows × columns, C], [])``: the images' tokens row by row (no deepstack features)."""
        batch, (h, w), m = pixel_values.shape[0], self.patches, self.merge
        x = self.tower.patch_conv(pixel_values.to(self.tower.patch_conv.weight.dtype))   # [B, D, h, w]
        x = self.tower.ln_pre(x.flatten(2).transpose(1, 2))   # [B, h × w, D], row by row
        states = [x]
        for layer in self.tower.transformer.layers[:max(self.states)]:
            states.append(layer(states[-1], None, position_embeddings=(self.cos, self.sin)))
        x = torch.cat([states[i] for i in self.states], -1)
        projector = self.projector
        if not hasattr(projector, "patch_merger"):   # Pixtral-12B's LLaVA: a token a patch, row by row
            return projector(x), []
        x = projector.norm(x)
        blocks = torch.nn.functional.unfold(x.reshape(batch, h, w, -1).permute(0, 3, 1, 2), kernel_size=m, stride=m)
        x = projector.patch_merger.merging_layer(blocks.transpose(1, 2))   # [B, rows × columns, D]
        return projector.linear_2(projector.act(projector.linear_1(x))), []
