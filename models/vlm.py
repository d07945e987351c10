"""A tiny vision-language model (LLaVA-style layout) for the visual-token-exit pass.

``(image [B, 3, H, W], text_ids [B, T] int64) -> logits [B, vocab_size]``:

1. a small ViT (:class:`~attnc.models.blocks.VisionTransformer` without a CLS token or
   head) turns the image into ``P`` patch features;
2. a linear projector maps them to the decoder width: the visual tokens;
3. the text ids are embedded; the sequence is ``[visual; text]`` (``P + T`` tokens)
   plus a learned positional embedding;
4. ``layers``, an ``nn.ModuleList`` of pre-norm blocks with causal self-attention;
5. final LayerNorm and the head, on the last text token.

Visual-token exit (DyVTE): ``forward(..., exit_layer=k)`` runs ``layers[:k]`` on all
tokens, then drops the visual tokens and runs ``layers[k:]`` on the text tokens only.
``exit_layer=None`` (or ``len(layers)``) is the full model; ``0`` never lets the text
see the image. The text tokens keep the positions they had in ``[visual; text]``.
"""

from __future__ import annotations

import torch
from torch import nn

from attnc.models.blocks import Block, VisionTransformer
from attnc.models.mhsa import MultiHeadSelfAttention


class TinyVLM(nn.Module):
    """Vision encoder + projector + causal decoder. See the module docstring.

    Args:
        img_size, patch_size: image side and ViT patch side (``(img/patch)²`` visual tokens).
        vision_dim, vision_depth, vision_heads: the ViT encoder.
        dim, depth, num_heads: the decoder (``depth`` blocks in ``layers``).
        vocab_size: text vocabulary and head outputs.
        max_text_len: longest text the positional embedding covers.
        mlp_ratio: MLP width of every block.
    """

    def __init__(self, img_size: int = 32, patch_size: int = 8, vision_dim: int = 64, vision_depth: int = 2,
                 vision_heads: int = 2, dim: int = 64, depth: int = 4, num_heads: int = 4,
                 vocab_size: int = 1000, max_text_len: int = 64, mlp_ratio: float = 4.0):
        super().__init__()
        self.vision = VisionTransformer(img_size, patch_size, num_classes=0, dim=vision_dim, depth=vision_depth,
                                        num_heads=vision_heads, mlp_ratio=mlp_ratio, class_token=False)
        self.num_visual_tokens = (img_size // patch_size) ** 2
        self.projector = nn.Linear(vision_dim, dim)
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(self.num_visual_tokens + max_text_len, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.layers = nn.ModuleList(
            Block(dim, MultiHeadSelfAttention(dim, num_heads, causal=True), mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, image: torch.Tensor, text_ids: torch.Tensor, exit_layer: int | None = None) -> torch.Tensor:
        depth = len(self.layers)
        exit_layer = depth if exit_layer is None else exit_layer
        if not 0 <= exit_layer <= depth:
            raise ValueError(f"exit_layer must be in [0, {depth}], got {exit_layer}")
        visual = self.projector(self.vision.forward_features(image))
        x = torch.cat([visual, self.embed(text_ids)], dim=1)
        x = x + self.pos_embed[: x.shape[1]]
        for layer in self.layers[:exit_layer]:
            x = layer(x)
        x = x[:, self.num_visual_tokens:]
        for layer in self.layers[exit_layer:]:
            x = layer(x)
        return self.head(self.norm(x[:, -1]))
