"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL (dense and MoE) and GLM-4V images at one size, for
:mod:`attnc.models.hf_vision_language`.

Their processors resize each image to its own multiple of ``patch × merge`` pixels (28) and hand the vision tower
the image's patches flattened into rows, with its grid ``(t, h, w)`` beside them; the tower attends within each
image (``cu_seqlens``, split with ``.tolist()``), Qwen2.5-VL's layers within windows of it, and the language model
places the image's tokens by 3-D rotary positions (M-RoPE, ``get_rope_index``: ``(K, K + row, K + column)`` for
the image after ``K`` text tokens, the text after it from ``K + max(rows, columns)``). None of that exports: all of
it is data-dependent. At one image size all of it is constant, so :class:`QwenImageEncoder` takes the processed
image as a plain ``[B, 3, H, W]`` batch (resized and normalised as the processor does, before it patchifies) and
computes the tower's output with the grid, the rotary tables, the window order and the positions fixed: the
patches as the processor cuts them (a stride-``p`` convolution with the two identical frames' kernels summed), the
tower's own weights with attention over each image's patches (its windows as a batch of windows where they are of
one size, else under a block mask), the merger, the windows
undone. :meth:`QwenImageEncoder.positions` gives the language model's 3-D positions of a prompt. Qwen3-VL adds a
learned position table (resampled to the grid: constant indices and weights) and deepstack features, which its first
decoder layers add to the image's hidden states (:meth:`QwenImageEncoder.features` returns them; a token exit must
come after those layers, :func:`deepstack_layers`).

The image size is fixed per export (``attnc export --image-size HxW``; :data:`DEFAULT_SIZE` square otherwise), so
the number of visual tokens is too: ``(H / 28) × (W / 28)`` for ``patch 14, merge 2`` (``/ 32`` for Qwen3-VL's
16-pixel patches). Tested against transformers' forward on the processor's own patches in
``tests/models/test_hf_qwen_vl.py``.

Qwen2-VL and Qwen2.5-VL read a video the same way (``attnc export --video-frames F``, ``pixel_values_videos [B, F, 3,
H, W]``, the video processor's frames before it patchifies): each ``temporal_patch_size`` frames (2; an odd count
repeats the last, as the processor does) make one slice of the grid, embedded by the tower's 3-D convolution itself;
the tower attends within each slice (the processor's grid ``(F / 2, h, w)`` splits ``cu_seqlens`` by slice), so the
slices run through it as a batch of images, their tokens one slice after the other; M-RoPE places slice ``t`` at
temporal position ``K + t × interval`` (Qwen2.5-VL's ``tokens_per_second`` times the seconds a slice covers, ``2 /
fps`` at the frame rate ``attnc export --video-fps`` records, 2 by default; Qwen2-VL's 1) and the text after it from
``K + max(rows, columns)``. Qwen3-VL's processor writes each slice after its own timestamp in text (``<0.5
seconds><|vision_start|>`` the slice's tokens ``<|vision_end|>``) and places each as an image (``get_rope_index``
splits the grid by slice): its clip is a prompt of several images, one per slice (:data:`SLICES_APART`;
``--text-before-image`` one offset per slice), computed by one run of the tower on the clip. Tested in
``tests/models/test_hf_qwen_video.py``.

GLM-4.1V, GLM-4.5V and GLM-4.6V (:data:`GLM`) are Qwen2-VL's design (processor layout, tower attending within each
image, M-RoPE positions); their tower adds a learned position table resampled bicubically to the grid (at one size a
constant matrix, :func:`bicubic_matrix`), RMSNorms after the patches and after the blocks, and a stride-``m``
convolution merging each block in front of the merger. Their clips place each slice apart, as Qwen3-VL's.
"""

from __future__ import annotations

import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import tiled_image_size

# config.architectures[0] of the checkpoints QwenImageEncoder reads (their vision towers differ in norms, MLPs and
# Qwen2.5-VL's windows, which the encoder reuses or rebuilds; their language models take [3, B, L] positions)
QWEN = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
        "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
# GLM-4.1V, GLM-4.5V (its MoE text model) and GLM-4.6V: Qwen2-VL's tower and positions, with a learned position table
# resampled bicubically to the grid, norms after the patches and after the blocks, and a convolution merging each
# block in front of the merger
GLM = ("Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm46VForConditionalGeneration")
ARCHITECTURES = (*QWEN, *GLM)
DEFAULT_SIZE = 448   # pixels a side: 256 visual tokens at patch 14, merge 2 (LLaVA-1.5 has 576)
# the architectures whose clip of frames QwenImageEncoder reads, all; of which those whose processors put each slice
# of a clip after its own timestamp, placed as an image of its own (Qwen3-VL's)
VIDEO_ARCHITECTURES = ARCHITECTURES
SLICES_APART = (*QWEN[2:], *GLM)


def is_qwen_vl(model_or_name) -> bool:
    """Whether ``model_or_name`` (a transformers model or its class name) is one :class:`QwenImageEncoder` reads."""
    name = model_or_name if isinstance(model_or_name, str) else type(model_or_name).__name__
    return name in ARCHITECTURES


def image_size(vision_config, size: tuple[int, int] | None = None) -> tuple[int, int]:
    """``(H, W)`` of the images a Qwen-VL export takes: ``size``, else :data:`DEFAULT_SIZE` square.

    Raises:
        AttncError: a side that is no positive multiple of the patch size times the merge size.
    """
    return tiled_image_size("Qwen-VL", size or (DEFAULT_SIZE, DEFAULT_SIZE), vision_config.patch_size,
                            vision_config.spatial_merge_size)


def deepstack_layers(vision_config) -> int:
    """How many decoder layers take deepstack features (Qwen3-VL adds its tower's features of
    ``deepstack_visual_indexes`` to the image's hidden states after the first that many): no token exit before them."""
    return len(getattr(vision_config, "deepstack_visual_indexes", None) or [])


def slices(vision_config, frames: int | None) -> int:
    """The slices of the tower's grid a clip of ``frames`` frames makes (``ceil(F / temporal_patch_size)``: the
    processor repeats the last frame up to a multiple); 1 for an image (``frames`` None)."""
    return 1 if frames is None else -(-frames // vision_config.temporal_patch_size)


def reads_frame_rate(vision_config) -> bool:
    """Whether the architecture's M-RoPE spaces a clip's slices by the seconds they cover (Qwen2.5-VL's
    ``tokens_per_second``)."""
    return hasattr(vision_config, "tokens_per_second")


def time_interval(vision_config, fps: float | None = None) -> int | torch.Tensor:
    """How far apart M-RoPE places a clip's slices in time: Qwen2.5-VL's ``tokens_per_second`` times the seconds a
    slice covers (``second_per_grid_ts`` = ``temporal_patch_size / fps``, the video processor's; at its default 2
    frames a second, or without ``fps``: 1, which is also what transformers takes without one), in float32 as
    transformers multiplies it (a 0-d tensor where ``fps`` is given); Qwen2-VL's 1."""
    per_second = int(getattr(vision_config, "tokens_per_second", 1))
    if fps is None or not reads_frame_rate(vision_config):
        return per_second
    return per_second * torch.tensor(vision_config.temporal_patch_size / fps, dtype=torch.float32)


def slice_times(vision_config, count: int, fps: float | None = None) -> torch.Tensor:
    """M-RoPE's temporal positions of a clip's ``count`` slices from its start: ``t × interval``, truncated as
    transformers' ``get_vision_position_ids`` truncates them."""
    return (torch.arange(count) * time_interval(vision_config, fps)).long()


def position_shift(vision_config, size: tuple[int, int] | None, frames: int | None = None,
                   fps: float | None = None) -> int:
    """How far M-RoPE places the text after an image of ``size`` (a clip of ``frames`` such frames) from where 1-D
    positions would (``max(rows, columns) - slices × rows × columns`` merged blocks): what a later generation step
    adds to the positions it counts.

    Raises:
        AttncError: a clip whose last slice lies in time past the text after it (``(slices - 1) × interval >
            max(rows, columns)``): transformers' later steps then continue from that slice's position (its
            ``rope_deltas``), which depends on the text's length and which attnc's steps do not carry.
    """
    height, width = image_size(vision_config, size)
    step = vision_config.patch_size * vision_config.spatial_merge_size
    rows, columns = height // step, width // step
    t = slices(vision_config, frames)
    times = slice_times(vision_config, t, fps)
    if t > 1 and int(times[-1]) > max(rows, columns):
        most = int((times <= max(rows, columns)).sum())
        raise AttncError(
            f"a clip of {frames} frames at {height}x{width} pixels makes {t} slices whose last lies {int(times[-1])} "
            f"positions on in time: past the text after the clip ({max(rows, columns)} positions on), so the steps "
            "after the prompt continue from it by an offset that depends on the prompt's length, which attnc's "
            "generation steps do not carry", f"export the steps with at most {most * vision_config.temporal_patch_size}"
            f" frames at this size, or a size of more blocks a side (each {step} pixels); the one-pass export "
            "takes this clip")
    return max(rows, columns) - t * rows * columns


def bicubic_matrix(table_size: int, positions: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[N, S²]``: GLM-4V's position table of ``S × S`` entries (``table_size = S²``) resampled to patches at
    ``positions [N, 2]`` (row, column) of a ``grid`` of patches (rows, columns), as a matrix the table multiplies:
    what its ``Glm4vVisionEmbeddings`` computes with ``grid_sample`` (bicubic, border padding, not aligned at
    corners) for one image, constant at one image size (``grid_sample`` is linear in the table, so resampling the
    identity gives each patch's weights)."""
    side = int(round(table_size ** 0.5))
    rows, columns = positions[:, 0].float(), positions[:, 1].float()
    height, width = grid
    grid = torch.stack([(columns + 0.5) / width * 2 - 1, (rows + 0.5) / height * 2 - 1], -1)[None, :, None]
    identity = torch.eye(table_size).reshape(1, table_size, side, side)
    weights = torch.nn.functional.grid_sample(identity, grid, mode="bicubic", align_corners=False,
                                              padding_mode="border")   # [1, S², N, 1]
    return weights[0, :, :, 0].T.contiguous()


class QwenImageEncoder(torch.nn.Module):
    """``pixel_values [B, 3, H, W] -> [B, P, C]``: what ``get_image_features`` computes from the processor's patches
    of each image at ``image_size`` (the processor's resized and normalised image, before ``patchify``), ``P =
    (H / (p·m)) × (W / (p·m))`` tokens of the language model's width, in the processor's order (row by row over
    the merged ``m × m`` blocks).

    The tower's weights are the model's (``model.model.visual``); its attention runs batched over each image's
    ``N = (H / p) × (W / p)`` patches, which is what ``cu_seqlens`` splits a batch of one-frame images into.
    """

    def __init__(self, model: torch.nn.Module, image_size: tuple[int, int], frames: int | None = None,
                 fps: float | None = None):
        super().__init__()
        from transformers.vision_utils import (get_vision_interpolation_indices_and_weights, get_vision_position_ids,
                                               get_vision_window_index)

        visual, config = model.model.visual, model.config.vision_config
        self.visual = visual
        self.windowed = hasattr(visual, "fullatt_block_indexes")   # Qwen2.5-VL
        p, m = config.patch_size, config.spatial_merge_size
        self.patch, self.merge, self.heads = p, m, config.num_heads
        self.image_size = tuple(image_size)
        self.grid = (self.image_size[0] // p, self.image_size[1] // p)   # patches per column, per row
        self.merged = (self.grid[0] // m, self.grid[1] // m)               # visual tokens per column, per row
        self.num_patches = self.grid[0] * self.grid[1]
        self.slice_tokens = self.merged[0] * self.merged[1]   # one image's, or one slice's of a clip
        # a clip (``frames``): its slices of temporal_patch_size frames each, one after the other
        self.frames, self.slices = frames, slices(config, frames)
        self.temporal_patch, self.fps, self.vision_config = config.temporal_patch_size, fps, config
        # Qwen3-VL's slices each after its own timestamp: each placed as an image (positions() takes one offset each)
        self.slices_apart = frames is not None and type(model).__name__ in SLICES_APART
        self.num_visual_tokens = self.slices * self.slice_tokens
        grid = torch.tensor([[1, *self.grid]])
        weight = visual.patch_embed.proj.weight.detach()   # Conv3d [E, C, frames, p, p]
        # the processor repeats a still image over the tower's frames: one convolution with the frames' kernels summed
        self.register_buffer("kernel", weight.sum(2), persistent=False)
        bias = visual.patch_embed.proj.bias
        self.register_buffer("kernel_bias", None if bias is None else bias.detach(), persistent=False)
        self.register_buffer("video_kernel", weight if frames is not None else None, persistent=False)
        with torch.no_grad():
            positions = get_vision_position_ids(grid, m)   # [N, 2]: each patch's row and column
            cos, sin = visual.rotary_pos_emb(weight.new_zeros(1), positions)   # [N, D]
        unit = m * m
        self.windows = None
        if self.windowed:   # the tower runs on the merged blocks in window order; each window attends within itself
            order, bounds = get_vision_window_index(grid, spatial_merge_size=m, window_size=visual.window_size,
                                                    patch_size=p)
            cos, sin = (t.reshape(self.slice_tokens, unit, -1)[order].reshape(self.num_patches, -1)
                        for t in (cos, sin))
            lengths = set((bounds[1:] - bounds[:-1]).tolist())
            # windows of one size (sides multiples of the window) attend as a batch of windows; ragged ones (the
            # image's last row and column of windows cut short) under a block mask over the whole image, N² work
            self.windows = len(bounds) - 1 if len(lengths) == 1 else None
            same_window = None
            if self.windows is None:
                window = torch.zeros(self.num_patches, dtype=torch.int64)
                for i, (start, end) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
                    window[start:end] = i
                same_window = window[:, None] == window[None, :]
            self.register_buffer("window_order", order, persistent=False)
            self.register_buffer("window_undo", torch.argsort(order), persistent=False)
            self.register_buffer("same_window", same_window, persistent=False)
            self.full_attention = set(visual.fullatt_block_indexes)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.learned_positions = hasattr(visual, "pos_embed")   # Qwen3-VL: a table resampled to the grid
        self.glm = hasattr(visual, "downsample")   # GLM-4V: a table resampled bicubically, a norm, a merging conv
        if self.glm:
            table = visual.embeddings.position_embedding.num_embeddings
            self.register_buffer("table_matrix", bicubic_matrix(table, positions, self.grid), persistent=False)
        elif self.learned_positions:
            index, weight = get_vision_interpolation_indices_and_weights(
                grid, num_grid_per_side=visual.num_grid_per_side, mode="bilinear", align_corners=True,
                spatial_merge_size=m)
            self.register_buffer("table_index", index, persistent=False)
            self.register_buffer("table_weight", weight, persistent=False)
        # Qwen3-VL's deepstack: features of these tower layers go into the first decoder layers' output
        self.deepstack = list(getattr(visual, "deepstack_visual_indexes", None) or [])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.features(pixel_values)[0]

    def _embedded(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch embedding ``[B', E, gh, gw]`` of images ``[B, 3, H, W]`` (``B' = B``) or of clips ``[B, F, 3,
        H, W]`` (``B' = B × slices``, each clip's slices one after the other)."""
        if self.frames is None:
            return torch.nn.functional.conv2d(pixel_values.to(self.kernel.dtype), self.kernel, self.kernel_bias,
                                              stride=self.patch)
        if pixel_values.dim() != 5 or pixel_values.shape[1] != self.frames:
            raise ValueError(f"pixel_values_videos {list(pixel_values.shape)} is no [batch, {self.frames}, channels, "
                             "height, width] batch of clips")
        short = self.slices * self.temporal_patch - self.frames   # the processor repeats the last frame
        if short:
            pixel_values = torch.cat([pixel_values, pixel_values[:, -1:].expand(-1, short, -1, -1, -1)], 1)
        x = torch.nn.functional.conv3d(pixel_values.transpose(1, 2).to(self.video_kernel.dtype), self.video_kernel,
                                       self.kernel_bias, stride=(self.temporal_patch, self.patch, self.patch))
        return x.transpose(1, 2).flatten(0, 1)   # [B, E, slices, gh, gw] -> [B × slices, E, gh, gw]

    def features(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``([B, P, C], deepstack)``: the image's tokens and, for Qwen3-VL, the features of its deepstack layers
        (``[B, P, C]`` each, which the first decoder layers add to the image's hidden states; none before). A clip's
        slices run through the tower as a batch of images; their tokens come one slice after the other."""
        clips = pixel_values.shape[0]
        x = self._embedded(pixel_values)   # [B', E, gh, gw]
        batch, (gh, gw), m = x.shape[0], self.grid, self.merge
        # patches in the processor's order: each m × m merge block's patches together, blocks row by row
        x = x.reshape(batch, -1, gh // m, m, gw // m, m).permute(0, 2, 4, 3, 5, 1)
        # contiguous: at one block a row and batch 1 the reshape is a view in the permuted layout, which the
        # elementwise ops below keep and Qwen3-VL's mergers' ``view`` refuses
        x = x.reshape(batch, self.num_patches, -1).contiguous()
        if self.glm:   # its norm of the patches, then its table resampled to the grid (in float32)
            x = self.visual.post_conv_layernorm(x)
            table = self.visual.embeddings.position_embedding.weight.float()
            x = x + (self.table_matrix @ table).to(x.dtype)
        elif self.learned_positions:
            x = x + (self.visual.pos_embed(self.table_index) * self.table_weight[:, :, None]).sum(1).to(x.dtype)
        unit = m * m
        if self.windowed:
            x = x.reshape(batch, self.slice_tokens, unit, -1)[:, self.window_order]
            x = x.reshape(batch, self.num_patches, -1)
        deepstack = []

        def merged(merger, x):   # a merger reads each block's m × m patches as one row: row-wise, any batch
            return merger(x.reshape(batch * self.num_patches, -1)).reshape(batch, self.slice_tokens, -1)

        for i, block in enumerate(self.visual.blocks):
            windowed = self.windowed and i not in self.full_attention
            x = x + self._attention(block.attn, block.norm1(x), windowed)
            x = x + block.mlp(block.norm2(x))
            if i in self.deepstack:
                deepstack.append(merged(self.visual.deepstack_merger_list[self.deepstack.index(i)], x))
        if self.glm:   # a norm, each m × m block's patches merged by a stride-m convolution, the merger row-wise
            x = self.visual.post_layernorm(x).reshape(batch * self.slice_tokens, m, m, -1).permute(0, 3, 1, 2)
            out = self.visual.merger(self.visual.downsample(x).reshape(batch, self.slice_tokens, -1))
        else:
            out = merged(self.visual.merger, x)
        out = out[:, self.window_undo] if self.windowed else out
        return out.reshape(clips, -1, out.shape[-1]), [d.reshape(clips, -1, d.shape[-1]) for d in deepstack]

    def _attention(self, attn: torch.nn.Module, x: torch.Tensor, windowed: bool) -> torch.Tensor:
        """The tower's attention (``qkv``, 2-D rotary, ``proj``) over each image's patches ``x [B, N, D]``, or within
        each window of them (``windowed``: Qwen2.5-VL's layers but its ``fullatt_block_indexes``)."""
        batch, n, width = x.shape
        q, k, v = attn.qkv(x).reshape(batch, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)   # [B, h, N, d]

        def rotate(t):   # as transformers' apply_rotary_pos_emb_vision: in float32
            half = t.shape[-1] // 2
            turned = torch.cat([-t[..., half:], t[..., :half]], -1)
            return (t.float() * self.cos + turned.float() * self.sin).to(t.dtype)

        q, k = rotate(q), rotate(k)
        if windowed and self.windows:   # [B, h, W·S, d] -> [B·W, h, S, d]: the windows lie one after the other
            def split(t):
                return t.reshape(batch, self.heads, self.windows, n // self.windows, -1).transpose(1, 2).reshape(
                    batch * self.windows, self.heads, n // self.windows, -1)

            out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=attn.scaling)
            out = out.reshape(batch, self.windows, self.heads, n // self.windows, -1).transpose(1, 2)
            out = out.reshape(batch, self.heads, n, -1)
        else:
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=self.same_window if windowed else None, scale=attn.scaling)
        return attn.proj(out.transpose(1, 2).reshape(batch, n, width))

    def positions(self, offsets, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """``[3, B, K + P + T']``: the M-RoPE positions (temporal, row, column) ``get_rope_index`` gives a prompt of
        ``input_ids [B, K + T']`` with an image after its first ``K`` tokens (``offsets``: an int, or one ``K`` per
        image, none side by side): ``i`` on every axis for the text in front, ``(s, s + row, s + column)`` for the
        image's tokens where ``s`` is the position it starts at (a clip's slice ``t`` at ``s + t × interval`` in
        time; Qwen3-VL's slices each at its own offset, as images), and the text after it from ``s + max(rows,
        columns)`` on. ``attention_mask [B, K + T']`` (0 at padding,
        which comes after the text in front of the last image): the text after it counts its tokens, not its
        padding."""
        offsets = (offsets,) if isinstance(offsets, int) else tuple(offsets)
        rows, columns = self.merged
        device, batch = input_ids.device, input_ids.shape[0]
        together = 1 if self.slices_apart else self.slices   # the slices each offset places
        row = torch.arange(rows, device=device).repeat_interleave(columns).repeat(together)
        column = torch.arange(columns, device=device).repeat(rows * together)
        time = slice_times(self.vision_config, together, self.fps).to(device).repeat_interleave(rows * columns)
        image = torch.stack([time, row, column])   # a clip's slices one after the other, each later in time
        pieces, start, taken = [], 0, 0   # start: the next position; taken: the text tokens placed
        for k in offsets:
            pieces.append(torch.arange(k - taken, device=device).expand(3, batch, -1) + start)
            start += k - taken
            pieces.append((image + start)[:, None].expand(3, batch, -1))
            start, taken = start + max(rows, columns), k
        if attention_mask is None:
            after = (torch.arange(input_ids.shape[1] - taken, device=device) + start).expand(batch, -1)
        else:   # padding takes the next token's position: it is masked, any position does
            after = (attention_mask[:, taken:].cumsum(-1) - 1).clamp(min=0) + start
        return torch.cat([*pieces, after.expand(3, -1, -1)], 2)
