"""Named model configurations: small ones for tests, realistic ones for benchmarks.

Every entry of :data:`SPECS` is a :class:`ModelSpec`: a seeded zero-argument factory,
example-input generation, and the input names / dynamic axes to export it with::

    spec = get_spec("na2d-rpb-small")
    model = spec.factory()                       # same weights on every call
    inputs = spec.example_inputs(batch=2, seed=0)
    export_onnx(model, inputs, "m.onnx", dynamic_axes=spec.dynamic_axes, input_names=spec.input_names)

Each factory is also a module-level function named after the spec with ``-`` -> ``_``,
so the CLI can load ``attnc.models.registry:vit_agent_small``.

Small configs (``*-small``) use widths 32-64, 2-4 heads, odd token counts (37-token
sequences, 9x9 / 9x11 grids, a 4x6x5 video grid); each exports in seconds and runs in
milliseconds. Realistic configs (``*-realistic``) are DeiT-Tiny-sized classifiers (224
px / 16 -> 14x14 tokens, dim 192, 3 heads, 12 blocks) with each attention family, a
NAT-Mini first stage (56x56 tokens, kernel 7, RPB), 4-block causal LMs at 4096 tokens
(dynamic, up to 8192), and a VLM with a DeiT-Tiny-wide encoder.

``lm-lightning-prefill-small`` and ``lm-lightning-decode-small`` are one
:class:`~attnc.models.linear.LightningLM` (same seed, same weights) exported two ways:
``ids -> (logits, state_0, state_1)`` and ``(ids, state_0, state_1) -> (logits, state_0',
state_1')``; their outputs are ``output``, ``output_1``, ... (:attr:`ModelSpec.output_names`).
``lm-lightning-step-small`` is the same LM's one-token decode step written as plain-PyTorch
recurrences (:class:`~attnc.models.linear.RecurrentLightningLM`), which the linear pass fuses;
``lm-lightning-blockwise-prefill-small`` is its prefill computed block by block
(:class:`~attnc.models.linear.BlockwiseLightningLM`, static sequence length), which it fuses too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnc.compiler.errors import AttncError
from attnc.models.agent import AgentAttention
from attnc.models.blocks import VIT_ATTENTIONS, CausalLM, VisionTransformer
from attnc.models.flow import FlowAttention
from attnc.models.linear import (BlockwiseLightningAttention, BlockwiseLightningLM, LightningAttention, LightningLM,
                                 LinearAttention, RecurrentLightningLM)
from attnc.models.mhsa import MultiHeadSelfAttention
from attnc.models.neighborhood import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D
from attnc.models.vlm import TinyVLM

SEED = 0


def _dim_size(dim: int | str, values: Mapping[str, int]) -> int:
    """A shape entry's size: an int as it is, a size name's value, a sum of size names and constants (``"past + seq"``,
    ``"past + 18"``) their sum."""
    if isinstance(dim, int):
        return dim
    if dim in values:
        return values[dim]
    parts = [part.strip() for part in dim.split("+")]
    if len(parts) == 1 and dim.isdigit():   # a constant term: "past + 18"
        return int(dim)
    return sum(_dim_size(part, values) for part in parts)


@dataclass(frozen=True)
class InputSpec:
    """One model input: ``shape`` holds ints and size names (looked up in ``ModelSpec.sizes``)."""

    name: str
    shape: tuple[int | str, ...]
    dtype: torch.dtype = torch.float32
    high: int | None = None  # exclusive upper bound of integer inputs (token ids)


@dataclass(frozen=True)
class ModelSpec:
    """A named, reproducible model configuration.

    Attributes:
        name: registry key, e.g. ``"na2d-rpb-small"``.
        family: the attention family the fusion passes look for (``"mhsa"``,
            ``"agent"``, ``"flow"``, ``"neighborhood"``, ``"linear"``).
        kind: ``"attention"`` (one module), ``"vit"``, ``"lm"`` or ``"vlm"``.
        factory: zero-argument callable returning the module in eval mode, with
            weights seeded by :data:`SEED` (the caller's RNG state is left alone).
        inputs: the forward's positional inputs.
        sizes: default value of every size name used in ``inputs`` (``batch`` included).
        dynamic: the size names exported as dynamic axes.
        output_axes: size names of the output's axes, for its dynamic axes.
        more_output_axes: the same for each further output (``output_1``, ``output_2``, ...).
        realistic: benchmark-sized (True) or test-sized (False).
        description: the constructor call the factory makes, for listings.
    """

    name: str
    family: str
    kind: str
    factory: Callable[[], nn.Module]
    inputs: tuple[InputSpec, ...]
    sizes: Mapping[str, int]
    dynamic: tuple[str, ...] = ("batch",)
    output_axes: tuple[int | str, ...] = ()
    realistic: bool = False
    description: str = field(default="", compare=False)
    more_output_axes: tuple[tuple[int | str, ...], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self.inputs]

    @property
    def output_names(self) -> list[str]:
        """``output``, ``output_1``, ...: the names ``export_onnx`` gives the outputs by default."""
        return ["output"] + [f"output_{i}" for i in range(1, 1 + len(self.more_output_axes))]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{input_or_output_name: {axis: size_name}}`` for :func:`attnc.compiler.export.export_onnx`."""
        axes = {}
        outputs = zip(self.output_names, (self.output_axes, *self.more_output_axes))
        for name, shape in [(i.name, i.shape) for i in self.inputs] + list(outputs):
            dyn = {axis: dim for axis, dim in enumerate(shape) if dim in self.dynamic}
            if dyn:
                axes[name] = dyn
        return axes

    def example_inputs(self, batch: int | None = None, seed: int = 0, **sizes: int) -> tuple[torch.Tensor, ...]:
        """Random inputs at the default sizes, overridden by ``batch`` and ``sizes``; a dim named as a sum
        of sizes (``"past + seq"``) is their sum.

        Float inputs are standard normal, integer inputs uniform in ``[0, high)``;
        the same ``seed`` and sizes give the same tensors.
        """
        unknown = set(sizes) - set(self.sizes)
        if unknown:
            raise AttncError(f"{self.name} has no size(s) {sorted(unknown)}", f"use {sorted(self.sizes)}")
        values = {**self.sizes, **sizes, **({"batch": batch} if batch is not None else {})}
        gen = torch.Generator().manual_seed(seed)
        tensors = []
        for spec in self.inputs:
            shape = tuple(_dim_size(d, values) for d in spec.shape)
            if spec.dtype.is_floating_point:
                tensors.append(torch.randn(shape, generator=gen, dtype=spec.dtype))
            else:
                tensors.append(torch.randint(0, spec.high, shape, generator=gen, dtype=spec.dtype))
        return tuple(tensors)


def _factory(name: str, cls: type[nn.Module], kwargs: dict[str, Any], description: str) -> Callable[[], nn.Module]:
    def factory() -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return cls(**kwargs).eval()

    factory.__name__ = factory.__qualname__ = name.replace("-", "_")
    factory.__doc__ = f"The ``{name}`` model, seeded: ``{description}``."
    return factory


SPECS: dict[str, ModelSpec] = {}


def _add(name: str, family: str, kind: str, cls: type[nn.Module], kwargs: dict[str, Any],
         inputs: tuple[InputSpec, ...], sizes: dict[str, int], dynamic: tuple[str, ...],
         output_axes: tuple[int | str, ...], more_output_axes: tuple[tuple[int | str, ...], ...] = ()) -> None:
    description = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
    SPECS[name] = ModelSpec(name, family, kind, _factory(name, cls, kwargs, description), inputs, sizes, dynamic,
                            output_axes, realistic=name.endswith("-realistic"), description=description,
                            more_output_axes=more_output_axes)


def _sequence(name: str, family: str, cls: type[nn.Module], dim: int = 32, seq: int = 37, **kwargs: Any) -> None:
    """An attention module on ``x [batch, seq, dim]``, dynamic in batch and seq."""
    shape = ("batch", "seq", dim)
    _add(name, family, "attention", cls, {"dim": dim, **kwargs}, (InputSpec("x", shape),),
         {"batch": 1, "seq": seq}, ("batch", "seq"), shape)


def _tokens(name: str, family: str, cls: type[nn.Module], dim: int, tokens: int, **kwargs: Any) -> None:
    """An attention module on a fixed token grid ``x [batch, tokens, dim]``, dynamic in batch."""
    shape = ("batch", tokens, dim)
    _add(name, family, "attention", cls, {"dim": dim, **kwargs}, (InputSpec("x", shape),),
         {"batch": 1}, ("batch",), shape)


def _grid(name: str, cls: type[nn.Module], dim: int, grid: tuple[int, ...], dynamic_grid: bool = False,
          **kwargs: Any) -> None:
    """2-D / 3-D neighborhood attention on ``x [batch, H, W, dim]`` / ``x [batch, T, H, W, dim]``."""
    axes = ("frames", "height", "width")[-len(grid):]
    shape = ("batch", *axes, dim) if dynamic_grid else ("batch", *grid, dim)
    dynamic = ("batch", *axes) if dynamic_grid else ("batch",)
    _add(name, "neighborhood", "attention", cls, {"dim": dim, **kwargs}, (InputSpec("x", shape),),
         {"batch": 1, **dict(zip(axes, grid))} if dynamic_grid else {"batch": 1}, dynamic, shape)


def _vit(name: str, attention: str, img_size: int, **kwargs: Any) -> None:
    _add(name, attention, "vit", VisionTransformer, {"img_size": img_size, "attention": attention, **kwargs},
         (InputSpec("image", ("batch", 3, img_size, img_size)),), {"batch": 1}, ("batch",), ("batch", "classes"))


def _lm(name: str, family: str, attention: str, vocab_size: int, seq: int, **kwargs: Any) -> None:
    _add(name, family, "lm", CausalLM, {"vocab_size": vocab_size, "attention": attention, **kwargs},
         (InputSpec("ids", ("batch", "seq"), torch.int64, vocab_size),), {"batch": 1, "seq": seq},
         ("batch", "seq"), ("batch", "seq", "vocab"))


def _lightning_lm(name: str, vocab_size: int, seq: int, decode: bool, dim: int, depth: int, num_heads: int,
                  **kwargs: Any) -> None:
    """A :class:`LightningLM`'s prefill (``ids``) or decode (``ids`` and one state per layer) graph."""
    state = ("batch", num_heads, dim // num_heads, dim // num_heads)
    states = tuple(InputSpec(f"state_{i}", state) for i in range(depth)) if decode else ()
    _add(name, "linear", "lm", LightningLM,
         {"vocab_size": vocab_size, "dim": dim, "depth": depth, "num_heads": num_heads, **kwargs},
         (InputSpec("ids", ("batch", "seq"), torch.int64, vocab_size), *states), {"batch": 1, "seq": seq},
         ("batch", "seq"), ("batch", "seq", "vocab"), (state,) * depth)


def _lightning_step(name: str, vocab_size: int, dim: int, depth: int, num_heads: int) -> None:
    """A :class:`RecurrentLightningLM` decode step: one token and one state per layer, in plain PyTorch."""
    state = ("batch", num_heads, dim // num_heads, dim // num_heads)
    _add(name, "linear", "lm", RecurrentLightningLM,
         {"vocab_size": vocab_size, "dim": dim, "depth": depth, "num_heads": num_heads},
         (InputSpec("ids", ("batch", 1), torch.int64, vocab_size),
          *(InputSpec(f"state_{i}", state) for i in range(depth))),
         {"batch": 1}, ("batch",), ("batch", 1, "vocab"), (state,) * depth)


def _blockwise_lightning_lm(name: str, vocab_size: int, seq: int, dim: int, depth: int, num_heads: int,
                            block_size: int) -> None:
    """A :class:`BlockwiseLightningLM`'s prefill ``ids -> (logits, state_0, ...)``; the block loop
    unrolls at export, so the sequence length is static (dynamic in batch only)."""
    state = ("batch", num_heads, dim // num_heads, dim // num_heads)
    _add(name, "linear", "lm", BlockwiseLightningLM,
         {"vocab_size": vocab_size, "dim": dim, "depth": depth, "num_heads": num_heads, "block_size": block_size},
         (InputSpec("ids", ("batch", seq), torch.int64, vocab_size),), {"batch": 1}, ("batch",),
         ("batch", seq, "vocab"), (state,) * depth)


def _vlm(name: str, img_size: int, text_len: int, vocab_size: int, **kwargs: Any) -> None:
    _add(name, "mhsa", "vlm", TinyVLM, {"img_size": img_size, "vocab_size": vocab_size, **kwargs},
         (InputSpec("image", ("batch", 3, img_size, img_size)),
          InputSpec("text_ids", ("batch", "text_len"), torch.int64, vocab_size)),
         {"batch": 1, "text_len": text_len}, ("batch", "text_len"), ("batch", "vocab"))


# --- small: one module per family and variant, small composite models --------------
_sequence("mhsa-small", "mhsa", MultiHeadSelfAttention, num_heads=4)
_sequence("mhsa-causal-small", "mhsa", MultiHeadSelfAttention, num_heads=4, causal=True, fused_qkv=False,
          scale_after=True)
_sequence("mhsa-scale-after-small", "mhsa", MultiHeadSelfAttention, num_heads=2, scale_after=True, qkv_bias=False)

_tokens("agent-small", "agent", AgentAttention, 48, 1 + 81, num_heads=3, grid_size=9, agent_num=9)
_tokens("agent-nobias-small", "agent", AgentAttention, 48, 81, num_heads=3, grid_size=9, agent_num=9,
        has_cls=False, use_bias=False, fused_qkv=False)
_tokens("agent-nocls-small", "agent", AgentAttention, 32, 49, num_heads=2, grid_size=7, agent_num=49,
        has_cls=False, use_dwc=False, bias_table_size=5)

_sequence("flow-small", "flow", FlowAttention, num_heads=4)
_sequence("flow-causal-small", "flow", FlowAttention, num_heads=4, causal=True, fused_qkv=True)

_sequence("na1d-small", "neighborhood", NeighborhoodAttention1D, num_heads=4, kernel_size=7)
_sequence("na1d-gather-small", "neighborhood", NeighborhoodAttention1D, num_heads=4, kernel_size=5, dilation=2,
          rpb=True, impl="gather")
_sequence("na1d-causal-small", "neighborhood", NeighborhoodAttention1D, num_heads=4, kernel_size=7,
          is_causal=True, rpb=True)
_sequence("na1d-causal-gather-small", "neighborhood", NeighborhoodAttention1D, num_heads=2, kernel_size=5,
          dilation=3, is_causal=True, impl="gather", fused_qkv=False)
_grid("na2d-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=5)
_grid("na2d-gather-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=3, dilation=(2, 3),
      impl="gather")
_grid("na2d-rpb-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=5, rpb=True)
_grid("na2d-rpb-gather-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=(5, 3), rpb=True,
      impl="gather", fused_qkv=False)
_grid("na2d-causal-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=3,
      is_causal=(True, False), rpb=True)
_grid("na2d-dynamic-small", NeighborhoodAttention2D, 32, (9, 11), dynamic_grid=True, num_heads=2, kernel_size=3,
      dilation=2)
# NATTEN >= 0.20 strided NA: blocks of 2 x 3 queries share their leader's window
_grid("na2d-strided-small", NeighborhoodAttention2D, 32, (9, 11), num_heads=2, kernel_size=(5, 3), dilation=(1, 2),
      stride=(2, 3))
# video-like: 4 frames of 6x5 tokens, causal in time
_grid("na3d-small", NeighborhoodAttention3D, 32, (4, 6, 5), num_heads=2, kernel_size=3, dilation=(1, 2, 1),
      is_causal=(True, False, False), rpb=True)

_sequence("linear-elu-small", "linear", LinearAttention, num_heads=4, feature_map="elu1")
_sequence("linear-identity-small", "linear", LinearAttention, num_heads=4, feature_map="identity",
          normalize=False, fused_qkv=False)
_sequence("linear-relu-causal-small", "linear", LinearAttention, num_heads=4, feature_map="relu", causal=True,
          causal_form="masked")
_sequence("linear-elu-causal-small", "linear", LinearAttention, num_heads=4, feature_map="elu1", causal=True,
          causal_form="cumsum")
_sequence("lightning-small", "linear", LightningAttention, num_heads=4)
# Lightning Attention-2's blockwise prefill loop (MiniMax-Text-01 style): 37 tokens in blocks of 16,
# the last one partial; the loop unrolls at export, so the token count is static
_tokens("lightning-blockwise-small", "linear", BlockwiseLightningAttention, 32, 37, num_heads=4, block_size=16)
# the same loop as MiniMax-Text-01's code writes it: each block assigned into a preallocated output
# (output[:, :, s:e] = ..., a ScatterND chain)
_tokens("lightning-blockwise-inplace-small", "linear", BlockwiseLightningAttention, 32, 37, num_heads=4,
        block_size=16, write="slice_assign")

# ViT classifiers with every attention family, small (9x9 tokens) and DeiT-Tiny sized
# (14x14 tokens); 2-D neighborhood attention has no CLS token.
_VIT = {
    "small": (36, {"patch_size": 4, "num_classes": 10, "dim": 48, "depth": 2, "num_heads": 3},
              {"agent": {"agent_num": 9}, "neighborhood": {"kernel_size": 5, "rpb": True}}),
    "realistic": (224, {"patch_size": 16, "num_classes": 1000, "dim": 192, "depth": 12, "num_heads": 3},
                  {"agent": {"agent_num": 49}, "neighborhood": {"kernel_size": 7, "rpb": True}}),
}
for _size, (_img, _widths, _options) in _VIT.items():
    for _family in VIT_ATTENTIONS:
        _vit(f"vit-{_family}-{_size}", _family, _img, **_widths, class_token=_family != "neighborhood",
             attention_options=_options.get(_family))

_SMALL_LM = {"dim": 32, "depth": 2, "num_heads": 4, "max_seq_len": 64}
_lm("lm-mhsa-small", "mhsa", "mhsa", 97, 37, **_SMALL_LM)
_lm("lm-linear-small", "linear", "linear", 97, 37, **_SMALL_LM, attention_options={"feature_map": "elu1"})
_lm("lm-lightning-small", "linear", "lightning", 97, 37, **_SMALL_LM)
_lm("lm-flow-small", "flow", "flow", 97, 37, **_SMALL_LM)
_lm("lm-neighborhood-small", "neighborhood", "neighborhood", 97, 37, **_SMALL_LM,
    attention_options={"kernel_size": 7})
# autoregressive decoding: prefill on 13 tokens, decode steps of 3 (an export example of 1
# token would let torch.export specialise the step length to 1)
_lightning_lm("lm-lightning-prefill-small", 97, 13, decode=False, dim=32, depth=2, num_heads=4)
_lightning_lm("lm-lightning-decode-small", 97, 3, decode=True, dim=32, depth=2, num_heads=4)
# the same LM's decode step as users write it (S' = λS + kᵀv, o = q·S' per layer), which the
# linear pass fuses; one token, so the token axis is static
_lightning_step("lm-lightning-step-small", 97, dim=32, depth=2, num_heads=4)
# the same LM's prefill computed blockwise (blocks of 4 over 13 tokens), each layer's final state returned
_blockwise_lightning_lm("lm-lightning-blockwise-prefill-small", 97, 13, dim=32, depth=2, num_heads=4, block_size=4)

_vlm("vlm-small", 32, 13, 97, patch_size=8, vision_dim=32, vision_depth=2, vision_heads=2, dim=32, depth=4,
     num_heads=4, max_text_len=32)

# --- realistic: benchmark sizes (the DeiT-Tiny ViTs are above) ----------------------
# NAT-Mini's first stage: 224 px / 4 -> 56x56 tokens, dim 64, 2 heads, kernel 7, RPB.
_grid("na2d-realistic", NeighborhoodAttention2D, 64, (56, 56), num_heads=2, kernel_size=7, rpb=True)
_grid("na2d-gather-realistic", NeighborhoodAttention2D, 64, (56, 56), num_heads=2, kernel_size=7, rpb=True,
      impl="gather")
# video: 8 frames of 14x14 tokens, kernel 3x7x7 (NATTEN 3-D, no RPB)
_grid("na3d-realistic", NeighborhoodAttention3D, 64, (8, 14, 14), num_heads=2, kernel_size=(3, 7, 7))
_grid("na3d-gather-realistic", NeighborhoodAttention3D, 64, (8, 14, 14), num_heads=2, kernel_size=(3, 7, 7),
      impl="gather")
# One causal attention layer of an LLM (dim 512, 8 heads of 64), 2048 tokens: what the causal
# bodies' chunks are measured on (benchmarks/bench_fusion.py), without an LM head's cost around it
_sequence("lightning-realistic", "linear", LightningAttention, dim=512, seq=2048, num_heads=8)
_sequence("linear-causal-realistic", "linear", LinearAttention, dim=512, seq=2048, num_heads=8, feature_map="elu1",
          causal=True, causal_form="masked")
_sequence("flow-causal-realistic", "flow", FlowAttention, dim=512, seq=2048, num_heads=8, causal=True)

_LM = {"dim": 512, "depth": 4, "num_heads": 8, "max_seq_len": 8192}
_lm("lm-mhsa-realistic", "mhsa", "mhsa", 32000, 4096, **_LM)
_lm("lm-linear-realistic", "linear", "linear", 32000, 4096, **_LM,
    attention_options={"feature_map": "elu1", "causal_form": "masked"})
_lm("lm-lightning-realistic", "linear", "lightning", 32000, 4096, **_LM)
_lm("lm-flow-realistic", "flow", "flow", 32000, 4096, **_LM)

_vlm("vlm-realistic", 224, 64, 32000, patch_size=16, vision_dim=192, vision_depth=6, vision_heads=3, dim=512,
     depth=8, num_heads=8, max_text_len=256)

# Module-level factories for `attnc export attnc.models.registry:<name>`.
globals().update({spec.factory.__name__: spec.factory for spec in SPECS.values()})


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name``; ``AttncError`` listing the valid names otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise AttncError(f"unknown model spec {name!r}", f"use one of: {', '.join(sorted(SPECS))}") from None
