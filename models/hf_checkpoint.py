"""A local Hugging Face checkpoint directory (``config.json`` + weights, as ``save_pretrained`` writes
it) as an attnc model: :func:`load_checkpoint` gives ``(module, spec)`` like a bundled model.

The module is the class ``config.architectures[0]`` names (the ``AutoModel`` class of the config
when it names none), loaded in float32 and eval mode from local files only (attnc never reaches the
hub), wrapped to return one tensor (:class:`~attnc.models.transformers_zoo.Output`: logits, else the
last hidden state). The spec's one input is the model's ``main_input_name``:

- ``input_ids`` ``[batch=2, seq=16]`` below ``vocab_size``, dynamic in batch and sequence (sequence
  static for :data:`~attnc.models.transformers_zoo.STATIC_LENGTH` models);
- ``pixel_values`` ``[batch=2, num_channels, H, W]`` from ``image_size``, dynamic in batch;
- ``input_values`` raw audio (wav2vec2-style convolutional front end: about 16 frames of samples),
  dynamic in batch and samples;
- ``input_features`` a Whisper-style log-mel spectrogram ``[batch=2, num_mel_bins,
  2 * max_source_positions]`` (Whisper takes exactly that many frames), dynamic in batch.

Any other input gets a spec whose example inputs raise an :class:`AttncError` asking for
``--input-shape`` (names and dynamic batch still come from the spec). transformers is imported only
when a directory is loaded.

Encoder-decoder models (T5, BART, Marian, Whisper: a forward taking ``decoder_input_ids``) export as one
graph ``(main input, decoder_input_ids) -> logits [batch, tgt, vocab]`` (the decoder's last hidden state
for a base model such as ``T5Model``) through :class:`Seq2SeqOutput`: the full forward a non-cached
greedy decode step runs, the encoder included. ``decoder_input_ids`` ``[batch=2, tgt=8]`` are dynamic in
batch and target length, drawn below the decoder's vocabulary and starting with
``config.decoder_start_token_id`` as ``generate`` starts them.

Text models also export with their padding mask (``attnc export --with-attention-mask``,
:func:`with_attention_mask`): ``(input_ids, attention_mask)`` through :class:`MaskedOutput`, the mask
``[batch, seq]`` int64 (1 = token, 0 = padding) dynamic like the ids, its example rows padded (:func:`padding_mask`)
at the end for encoders and at the start for decoder-only models.

Decoder-only text models also export as one generation step with their KV cache (``attnc export
--with-past``, :func:`with_past`): ``(input_ids, attention_mask, past_key_values.0.key, ...) -> (logits,
present.0.key, ...)`` through :class:`CachedStep`, the contract :mod:`attnc.compiler.decode` names and
:func:`attnc.compiler.decode.generate` decodes with. Encoder-decoder models decode with two graphs: the
first step (``--first-step``, :func:`with_first_step`, :class:`Seq2SeqFirstStep`) and the later steps
(``--with-past``, :class:`Seq2SeqStep`), :func:`attnc.compiler.decode.generate_seq2seq`.

Encoder-decoder text models (T5, BART) take padded sources with ``--with-attention-mask``: ``(input_ids,
attention_mask, decoder_input_ids)`` (:class:`MaskedSeq2SeqOutput`, the example sources padded on the right),
the first step the same inputs (:class:`MaskedSeq2SeqFirstStep`), and the later steps
``(decoder_input_ids, encoder_attention_mask [batch, source], past_key_values..., cross_key_values...)``
(:class:`MaskedSeq2SeqStep`). Audio models (Whisper) take no source mask.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from attnc.compiler import decode
from attnc.compiler.errors import AttncError
from attnc.compiler.layout import format_offsets, parse_offsets
from attnc.models.registry import InputSpec, ModelSpec
from attnc.models.transformers_zoo import STATIC_LENGTH, Output, exportable_experts, first_output

BATCH = 2
TOKENS = 16
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_SAVE_FIX = "pass the directory save_pretrained() wrote (config.json and model.safetensors)"


MASK = decode.MASK
SOURCE_MASK = decode.SOURCE_MASK
DECODER = decode.DECODER_IDS
TARGET = 8   # decoder tokens of the example inputs: fewer than the source's, so cross-attention is not square
# A cached step's example: 3 new tokens after 5 cached ones (8 in the mask). Sizes apart from each other
# and from 0/1, which the dynamo exporter would take for one dim or specialise on.
STEP, PAST = 3, 5
# The dim of a cached step's mask (and new cache): the dim name says how it is made, for the passes that
# evaluate the graph at sampled sizes (attnc.passes.core.sampled_dim) and for people reading the graph.
TOTAL = "past + seq"


@dataclass(frozen=True)
class CheckpointSpec(ModelSpec):
    """A :class:`ModelSpec` whose example inputs may be unknown: ``unsupported`` says why, and
    :meth:`example_inputs` then raises it with the ``--input-shape`` to pass instead.

    ``padding`` is ``"left"`` or ``"right"`` when the spec takes ``attention_mask`` after ``input_ids``
    (:func:`with_attention_mask`): the side its example rows are padded on (:func:`padding_mask`).
    ``decoder_start`` is the token the example ``decoder_input_ids`` of an encoder-decoder model start
    with (``config.decoder_start_token_id``), ``None`` when they are random throughout.
    """

    unsupported: str = ""
    padding: str = ""
    decoder_start: int | None = None
    outputs: tuple[str, ...] = ()
    padded_after: int = 0   # the example rows' padding goes after this many tokens (a vision-language prompt's K)

    @property
    def output_names(self) -> list[str]:
        """``outputs`` where the spec names them (a cached step's ``logits``, ``present.0.key``, ...), else
        :attr:`ModelSpec.output_names`."""
        return list(self.outputs) or super().output_names

    def example_inputs(self, batch: int | None = None, seed: int = 0, **sizes: int) -> tuple[torch.Tensor, ...]:
        """As :meth:`ModelSpec.example_inputs`; with the mask, ``input_ids`` are the unmasked spec's (same
        seed and sizes) and the mask is :func:`padding_mask`. Token ids under the padding stay random: the
        mask alone must hide them. A cached step's mask spans the ``past`` and the ``seq`` new tokens (its dim
        ``"past + seq"``); an encoder-decoder model's later steps take the sources' mask
        (``encoder_attention_mask``), padded on the right as the first step's sources are."""
        if self.unsupported:
            name = self.inputs[0].name
            raise AttncError(f"{self.name}: {self.unsupported}",
                             f"pass the input's shape, e.g. --input-shape {name}:2x16 (your sizes)")
        tensors = list(super().example_inputs(batch, seed, **sizes))
        if self.decoder_start is not None:
            tensors[self.input_names.index(DECODER)][:, 0] = self.decoder_start
        for name, side in ((MASK, self.padding), (SOURCE_MASK, "right")):
            if side and name in self.input_names:
                mask = self.input_names.index(name)
                tensors[mask] = self._padded(*tensors[mask].shape, side) if name == MASK else \
                    padding_mask(*tensors[mask].shape, side)
        return tuple(tensors)

    def _padded(self, batch: int, seq: int, side: str) -> torch.Tensor:
        """:func:`padding_mask` of the tokens after the first :attr:`padded_after`, which are never padding."""
        keep = min(self.padded_after, seq)
        return torch.cat([torch.ones(batch, keep, dtype=torch.int64), padding_mask(batch, seq - keep, side)], 1)

    def token_axes(self) -> dict[str, int]:
        """``{output: axis}`` of the outputs with an axis over tokens (``seq``, or a cached step's ``past + seq``;
        an encoder-decoder first step's cross-attention keys and values over the sources): the last ``n``
        columns of ``attention_mask`` tell which of its ``n`` entries are tokens."""
        shapes = zip(self.output_names, (self.output_axes, *self.more_output_axes))
        return {name: shape.index(dim) for name, shape in shapes for dim in ("seq", TOTAL) if dim in shape}

    def mask_for(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The example ``attention_mask`` for token ids ``[batch, seq]``, padded on ``padding``'s side."""
        if input_ids.dim() != 2:
            raise AttncError(f"{self.name}: input_ids of shape {list(input_ids.shape)} are no [batch, seq]",
                             "give input_ids two dims, e.g. --input-shape input_ids:2x16:int64")
        return self._padded(*input_ids.shape, self.padding)


def padding_mask(batch: int, seq: int, side: str) -> torch.Tensor:
    """``[batch, seq]`` int64, 1 for tokens and 0 for padding: row ``i`` has ``i·seq // batch`` padding
    tokens on ``side`` (``"left"`` or ``"right"``), so row 0 is a full-length prompt and the last one the
    shortest, at least ``seq // batch`` tokens long."""
    lengths = seq - torch.arange(batch) * seq // batch
    positions = torch.arange(seq)
    keep = positions >= (seq - lengths)[:, None] if side == "left" else positions < lengths[:, None]
    return keep.to(torch.int64)


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position as transformers' ``generate`` computes ``position_ids`` from the mask: the count
    of tokens before it (padding at 0)."""
    count = attention_mask.to(torch.int64).cumsum(-1) - 1
    return count.masked_fill(attention_mask == 0, 0)


class MaskedOutput(torch.nn.Module):
    """A transformers text model as ``(input_ids, attention_mask) -> tensor``: its logits, else its last
    hidden state, as :class:`~attnc.models.transformers_zoo.Output` returns them.

    With ``positions_from_mask`` (left-padded decoder-only models with position embeddings of their own,
    e.g. GPT-2's), each token's position is the count of tokens before it, as transformers' ``generate``
    computes ``position_ids`` (:func:`mask_positions`): a left-padded prompt then gets the logits it gets
    alone.
    """

    def __init__(self, model: torch.nn.Module, positions_from_mask: bool = False):
        super().__init__()
        self.model = model
        self.positions_from_mask = positions_from_mask

    def forward(self, input_ids, attention_mask):
        positions = {"position_ids": mask_positions(attention_mask)} if self.positions_from_mask else {}
        return first_output(self.model(input_ids, attention_mask=attention_mask, **positions))


class Seq2SeqOutput(torch.nn.Module):
    """A transformers encoder-decoder model as ``(inputs, decoder_input_ids) -> tensor``: its logits
    ``[batch, tgt, vocab]``, else the decoder's last hidden state.

    The forward runs with ``use_cache=True`` (unless the model has no cache), whatever ``config.use_cache``
    says (the dynamo export turns it off): without a cache, transformers 5 checks the decoder's positions
    for packed sequences when it builds the causal mask (Whisper's decoder), with ``aten::diff`` that
    TorchScript does not export. The cache it fills is neither read nor returned: the graph stays the
    full forward, and both exporters fuse its attention.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.cache = {"use_cache": True} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, inputs, decoder_input_ids):
        return self._run(inputs, None, decoder_input_ids)

    def _run(self, inputs, attention_mask, decoder_input_ids):
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        return first_output(self.model(inputs, decoder_input_ids=decoder_input_ids, **mask, **self.cache))


class MaskedSeq2SeqOutput(Seq2SeqOutput):
    """:class:`Seq2SeqOutput` on padded sources: ``(input_ids [B, S], attention_mask [B, S],
    decoder_input_ids [B, T]) -> logits [B, T, vocab]``, the mask 1 for the sources' tokens and 0 for padding
    (the encoder's self-attention and the decoder's cross-attention read no padding)."""

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self._run(input_ids, attention_mask, decoder_input_ids)


def load_checkpoint(directory: str, attention_mask: bool = False) -> tuple[torch.nn.Module, CheckpointSpec]:
    """The checkpoint in ``directory`` as ``(Output(model), spec)``, or with ``attention_mask`` as
    :func:`with_attention_mask` gives it.

    Raises:
        AttncError: transformers is not installed, the directory has no ``config.json`` or no
            weights, the config or architecture is unknown to the installed transformers, or loading
            the weights fails or leaves weights missing; or ``attention_mask`` for a model that takes
            none or an encoder-decoder model.
    """
    path = Path(directory).expanduser()
    config = _config(path)
    cls = _model_class(config, path)
    spec = _spec(path, config, cls)
    module = spec.factory()
    return with_attention_mask(module, spec) if attention_mask else (module, spec)


def with_attention_mask(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[MaskedOutput, CheckpointSpec]:
    """A loaded text checkpoint (``load_checkpoint(dir)``) taking ``attention_mask`` too: the same weights
    as :class:`MaskedOutput`, and its spec with the mask input (dynamic in batch and sequence like the
    token ids) and padded example inputs.

    Decoder-only models (a causal-LM class and no masked-LM class for the config) are padded on the left,
    as transformers' ``generate`` pads them: every row's next token is then read at the last position,
    and a KV cache grows at the end of every row. Their positions come from the mask unless their
    embedding is rotary: rotary scores depend on the distance between two tokens only, which the
    padding in front of a row leaves as it is, and positions from ``arange`` keep the rotary angles
    independent of the inputs (one constant table per length, which head pruning reads through).
    Encoders are padded on the right, as tokenizers pad by default, and so are an encoder-decoder model's
    sources (:func:`_seq2seq_masked`). A vision-language checkpoint's prompts are padded after the text in front of
    the image (:func:`_vision_language_masked`).

    Raises:
        AttncError: ``spec`` is no checkpoint's, its model takes no ``input_ids`` (images, audio; Whisper's
            log-mel features), or its forward has no ``attention_mask``.
    """
    if not isinstance(spec, CheckpointSpec):
        raise AttncError(f"{spec.name if spec else 'this model'} is no Hugging Face checkpoint directory: "
                         "--with-attention-mask is for those", "export the mask through MODULE:FACTORY, "
                         "with a module whose forward takes (input_ids, attention_mask)")
    if spec.padding:
        return module, spec
    if spec.kind == "vlm":
        return _vision_language_masked(module, spec)
    model = module.model
    name = type(model).__name__
    seq2seq = DECODER in spec.input_names
    if seq2seq and spec.input_names[0] != "input_ids":
        raise AttncError(f"{name} takes {spec.input_names[0]!r}, not token ids: its encoder reads every input at one "
                         "length and masks none of it (Whisper's ignores attention_mask)",
                         "export it without --with-attention-mask, its inputs padded as its feature extractor "
                         "pads them (Whisper: to 2 x max_source_positions frames)")
    if not seq2seq and spec.input_names != ["input_ids"]:
        raise AttncError(f"{name} takes {spec.input_names[0]!r}, not token ids: an attention mask over "
                         "padded text is for text models", "export it without --with-attention-mask")
    params = inspect.signature(model.forward).parameters
    if MASK not in params:
        raise AttncError(f"{name}.forward takes no {MASK}", "export it without --with-attention-mask")
    if seq2seq:
        return _seq2seq_masked(module, spec)
    left = decoder_only(model)
    rotary = any("rotary" in type(m).__name__.lower() for m in model.modules())
    positions = left and not rotary and "position_ids" in params
    ids = spec.inputs[0]
    return MaskedOutput(model, positions).eval(), dataclasses.replace(
        spec, inputs=(ids, dataclasses.replace(ids, name=MASK, high=2)), padding="left" if left else "right",
        output_axes=("batch", "seq"), factory=functools.partial(_rewrapped, spec.factory, MaskedOutput, positions))


def _vision_language_masked(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[torch.nn.Module, CheckpointSpec]:
    """:func:`with_attention_mask` of a vision-language checkpoint: :class:`~attnc.models.hf_vision_language.
    MaskedVisionLanguageOutput`, its inputs ``(pixel_values, input_ids, attention_mask)``, the example rows padded
    on the left of their text after the ``K`` tokens in front of the image."""
    from attnc.models import hf_vision_language

    wrapper = hf_vision_language.MaskedVisionLanguageOutput
    ids = spec.inputs[spec.input_names.index("input_ids")]
    return wrapper(module.model, *module.placement).eval(), dataclasses.replace(
        spec, inputs=(*spec.inputs, dataclasses.replace(ids, name=MASK, high=2)), padding="left",
        padded_after=module.layout.text_before_end,
        factory=functools.partial(_rewrapped, spec.factory, wrapper, *module.placement))


def _seq2seq_masked(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[MaskedSeq2SeqOutput, CheckpointSpec]:
    """:func:`with_attention_mask` of an encoder-decoder checkpoint: :class:`MaskedSeq2SeqOutput`, its spec's
    inputs ``(input_ids, attention_mask, decoder_input_ids)``, the example sources padded on the right. The
    decoder's tokens are all tokens (``generate`` pads no target), so its logits are compared everywhere; of
    a first step's outputs, the cross-attention keys and values at the sources' padding are not
    (:meth:`CheckpointSpec.token_axes`: no later step reads them)."""
    ids = spec.inputs[0]
    return MaskedSeq2SeqOutput(module.model).eval(), dataclasses.replace(
        spec, inputs=(ids, dataclasses.replace(ids, name=MASK, high=2), *spec.inputs[1:]), padding="right",
        factory=functools.partial(_rewrapped, spec.factory, MaskedSeq2SeqOutput))


def with_text_before_image(module: torch.nn.Module, spec: CheckpointSpec, tokens
                           ) -> tuple[torch.nn.Module, CheckpointSpec]:
    """A loaded vision-language checkpoint with its image after the first ``tokens`` text tokens (``attnc export
    --text-before-image``): :class:`~attnc.models.hf_vision_language.VisionLanguageOutput` on the same weights,
    its example ``input_ids`` that many tokens longer. Several images: ``tokens`` a sequence (or ``"5,9"``) of one
    ``K`` per image (:class:`attnc.compiler.layout.VisualLayout`), ``pixel_values [batch, N, C, H, W]``.

    Raises:
        AttncError: the checkpoint is no vision-language model's, ``tokens`` is negative or decreasing, or several
            images are asked of an architecture that takes one.
    """
    from attnc.models import hf_vision_language

    if not isinstance(spec, CheckpointSpec) or spec.kind != "vlm":
        raise AttncError(f"{spec.name if spec else 'this model'} is no vision-language checkpoint: "
                         "--text-before-image places text in front of an image", "export it without the option")
    offsets = parse_offsets(tokens)
    wrapper = type(module) if isinstance(module, hf_vision_language.VisionLanguageOutput) else \
        hf_vision_language.VisionLanguageOutput   # padded prompts stay padded, after the new K
    if offsets == parse_offsets(getattr(module, "visual_offset", 0)):
        return module, spec
    before, offset = module.layout.text_before_end, offsets[0] if len(offsets) == 1 else offsets
    placed = wrapper(module.model, offset, *module.placement[1:]).eval()
    where = f"after {offsets[0]} text tokens" if len(offsets) == 1 else \
        f"and {len(offsets) - 1} more images after {format_offsets(offsets)} text tokens"
    return placed, dataclasses.replace(
        spec, inputs=_visual_input(placed, spec), sizes={**spec.sizes, "seq": spec.sizes["seq"] - before + offsets[-1]},
        padded_after=offsets[-1], factory=functools.partial(_rewrapped, spec.factory, wrapper, *placed.placement),
        description=spec.description.replace("in front of the text", where))


def _visual_input(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[InputSpec, ...]:
    """``spec``'s inputs with the visual one (``pixel_values``, or ``pixel_values_videos``) named and shaped as
    ``module`` (a :class:`~attnc.models.hf_vision_language.VisionLanguageOutput`) takes it."""
    from attnc.models import hf_vision_language

    shape = ("batch", *hf_vision_language.pixel_shape(module.model.config, type(module.model).__name__,
                                                      module.image_size, module.images, module.video_frames))
    visual = (hf_vision_language.PIXELS, hf_vision_language.VIDEOS)
    return tuple(dataclasses.replace(s, name=module.visual_input, shape=shape) if s.name in visual else s
                 for s in spec.inputs)


def with_video_frames(module: torch.nn.Module, spec: CheckpointSpec, frames: int, fps: float | None = None
                      ) -> tuple[torch.nn.Module, CheckpointSpec]:
    """A loaded vision-language checkpoint taking a clip of ``frames`` frames in place of its image (``attnc export
    --video-frames``; LLaVA-OneVision and LLaVA-NeXT-Video, :class:`attnc.models.hf_llava_next.LlavaVideoEncoder`;
    Qwen2-VL and Qwen2.5-VL, :class:`attnc.models.hf_qwen_vl.QwenImageEncoder`): the same wrapper on the video, its
    ``pixel_values_videos [batch, F, C, S, S]`` at the vision tower's size ``S`` (Qwen's ``[batch, F, C, H, W]`` at
    the export's image size) in place of ``pixel_values``. ``fps``: the rate the frames were sampled at (``attnc
    export --video-fps``; Qwen2.5-VL's positions space the slices by the seconds they cover; default its processor's
    2).

    Raises:
        AttncError: the checkpoint is no vision-language model's, reads no video, ``frames`` is below 1, or ``fps``
            is given to an architecture whose positions do not read it.
    """
    from attnc.models import hf_vision_language

    if not isinstance(spec, CheckpointSpec) or spec.kind != "vlm" or \
            not isinstance(module, hf_vision_language.VisionLanguageOutput):
        raise AttncError(f"{spec.name if spec else 'this model'} is no vision-language checkpoint: --video-frames "
                         "sets the frames of the video it takes", "export it without the option")
    if frames == module.video_frames and fps == module.video_fps:
        return module, spec
    wrapper = type(module)
    # the size as set (--image-size comes first): Qwen's frames take it, LLaVA's refuse any but the tower's
    clip = wrapper(module.model, module.placement[0], module.image_size, frames, fps).eval()
    return clip, dataclasses.replace(
        spec, inputs=_visual_input(clip, spec),
        factory=functools.partial(_rewrapped, spec.factory, wrapper, *clip.placement),
        description=spec.description.replace("the image", f"a video of {frames} frames"))


def with_image_size(module: torch.nn.Module, spec: CheckpointSpec, size: tuple[int, int]
                    ) -> tuple[torch.nn.Module, CheckpointSpec]:
    """A loaded vision-language checkpoint taking images of ``size`` ``(H, W)`` pixels (``attnc export
    --image-size``): for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and GLM-4V (:mod:`attnc.models.hf_qwen_vl`) and LLaVA-NeXT and
    LLaVA-OneVision (:mod:`attnc.models.hf_llava_next`: the original images' size), whose visual tokens follow the
    image's size, the same wrapper at that size and its ``pixel_values`` shape; any other's size is its config's.

    Raises:
        AttncError: the checkpoint is no vision-language model's, takes images of one size only and ``size`` is
            another, the patches do not tile ``size`` (Qwen) or it has no pixels.
    """
    from attnc.models import hf_vision_language

    if not isinstance(spec, CheckpointSpec) or spec.kind != "vlm" or \
            not isinstance(module, hf_vision_language.VisionLanguageOutput):
        raise AttncError(f"{spec.name if spec else 'this model'} is no vision-language checkpoint: --image-size sets "
                         "the size of the images it takes", "export it without the option")
    size = tuple(int(d) for d in size)
    if size == module.image_size:
        return module, spec
    wrapper = type(module)
    resized = wrapper(module.model, module.placement[0], size, *module.placement[2:]).eval()   # the images' K
    return resized, dataclasses.replace(spec, inputs=_visual_input(resized, spec), factory=functools.partial(
        _rewrapped, spec.factory, wrapper, *resized.placement))


def _rewrapped(factory, wrapper: type, *args) -> torch.nn.Module:
    """``wrapper`` (``MaskedOutput``, ``CachedStep``, ...) around the model that ``factory`` loads, in eval mode:
    a variant's spec loads its own module as the checkpoint's spec does."""
    return wrapper(factory().model, *args).eval()


def decoder_only(model: torch.nn.Module) -> bool:
    """A causal-LM class and no masked-LM class for the model's config (GPT-2, Llama; not BERT)."""
    transformers = _transformers()
    config = type(model.config)
    return config in transformers.MODEL_FOR_CAUSAL_LM_MAPPING and config not in transformers.MODEL_FOR_MASKED_LM_MAPPING


class CachedStep(torch.nn.Module):
    """A transformers decoder-only LM as one generation step with its KV cache, as ``generate`` runs it::

        (input_ids [B, T], attention_mask [B, P+T], past_key_values.0.key [B, H, P, Dk],
         past_key_values.0.value [B, H, P, Dv], ...)   # layer by layer
            -> (logits [B, T, vocab], present.0.key [B, H, P+T, Dk], present.0.value, ...)

    (the last hidden state for a model without an LM head). The prompt's step takes an empty cache
    (``P = 0``); every later step the cache the one before returned. The cache is transformers'
    ``DynamicCache`` of full layers (a sliding-window layer masks its window over it), so the graph's
    attention reads ``concat(past, new)``: what the softmax pass fuses into ``Attention``. Positions come
    from the mask as ``generate`` computes them (:func:`mask_positions`), for every model whose forward
    takes ``position_ids``.
    """

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers
        self.positions = "position_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids, attention_mask, *past):
        # signature: input_ids, attention_mask, past_0=None, ... (below the class); the TorchScript exporter
        # passes the unused ones as None
        from transformers import DynamicCache

        past = [p for p in past if p is not None]
        if len(past) != 2 * self.layers:
            raise ValueError(f"pass a key and a value per layer ({2 * self.layers} tensors), got {len(past)}")
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        extra = {"position_ids": self.step_positions(attention_mask, input_ids.shape[1])} if self.positions else {}
        out = self.model(input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True, **extra)
        return (first_output(out), *keys_and_values(cache, self.layers))

    def step_positions(self, attention_mask: torch.Tensor, new: int) -> torch.Tensor:
        """``[B, new]``: the positions of the ``new`` tokens, as ``generate`` computes them from the mask."""
        return mask_positions(attention_mask)[:, -new:]


# The dynamo exporter maps dynamic axes to forward()'s named parameters, not to *past ("Failed to convert
# 'dynamic_axes' to 'dynamic_shapes'"): past_0, past_1, ... (a layer's key, then its value) name them.
_MAX_LAYERS = 256


def _step_signature(*names: str, caches: int) -> inspect.Signature:
    """``(self, *names, past_0=None, ..., past_{caches - 1}=None)``: a step's forward as the exporters see it."""
    param = inspect.Parameter
    return inspect.Signature([param(name, param.POSITIONAL_OR_KEYWORD) for name in ("self", *names)] +
                             [param(f"past_{i}", param.POSITIONAL_OR_KEYWORD, default=None) for i in range(caches)])


CachedStep.forward.__signature__ = _step_signature("input_ids", MASK, caches=2 * _MAX_LAYERS)


def with_past(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[torch.nn.Module, CheckpointSpec]:
    """A loaded decoder-only text checkpoint (``load_checkpoint(dir)``) as one generation step with its KV
    cache (an encoder-decoder checkpoint: its decoder's step, :func:`with_first_step`'s docstring says more):
    :class:`CachedStep` on the same weights, and its spec: ``input_ids [batch, seq]``,
    ``attention_mask [batch, past + seq]`` (example rows padded on the left), and per layer
    ``past_key_values.N.key`` / ``.value`` ``[batch, H, past, D]``, all dynamic; outputs ``logits`` and
    ``present.N.key`` / ``.value`` ``[batch, H, past + seq, D]``. The example inputs are 3 new tokens
    after 5 cached ones, the cache random (standard normal): validation compares the graph with PyTorch on
    the same cache, whatever its values.

    On :func:`with_attention_mask`'s variant of an encoder-decoder checkpoint, the decoder's step takes the
    sources' mask too (:func:`_seq2seq_step`). A vision-language checkpoint's later steps are its language model's
    on the text alone (the image is in the cache :func:`with_first_step` gives).

    Raises:
        AttncError: ``spec`` is no checkpoint's, the model is no decoder-only text model, its forward takes
            no cache or mask, or it keeps its cache other than as one key and one value per layer
            ``[B, H, T, D]`` (linear-attention and state-space layers).
    """
    if not isinstance(spec, CheckpointSpec):
        raise AttncError(f"{spec.name if spec else 'this model'} is no Hugging Face checkpoint directory: "
                         "--with-past is for those", "export a step with its cache through MODULE:FACTORY")
    if isinstance(module, (CachedStep, Seq2SeqStep)):
        return module, spec
    if DECODER in spec.input_names:
        return _seq2seq_step(module, spec)
    vision_language = spec.kind == "vlm"   # its later steps are its language model's, on the text alone
    if vision_language:
        spec = dataclasses.replace(spec, inputs=spec.inputs[1:])
    model = module.model
    name = type(model).__name__
    params = inspect.signature(model.forward).parameters
    if spec.inputs[0].name != "input_ids" or not (vision_language or decoder_only(model)):
        raise AttncError(f"{name} is no decoder-only text model: --with-past exports a causal LM's generation step",
                         "export it without --with-past")
    if "past_key_values" not in params or MASK not in params:
        raise AttncError(f"{name}.forward takes no past_key_values and attention_mask", "export it without --with-past")
    layers = _cache_layout(model)
    ids = dataclasses.replace(spec.inputs[0], shape=("batch", "seq"))
    past = _cache_inputs(decode.past_name, layers, "past")
    wrapper, known = CachedStep, ()
    if vision_language:   # P and K: the export records them, a token exit reads them
        from attnc.models import hf_vision_language

        wrapper = hf_vision_language.VisionLanguageStep
        known = (module.num_visual_tokens, module.visual_offset, *module.placement[1:])
    return wrapper(model, len(layers), *known).eval(), dataclasses.replace(
        spec, inputs=(ids, InputSpec(MASK, ("batch", TOTAL), torch.int64, 2), *past),
        sizes={"batch": BATCH, "seq": STEP, "past": PAST}, dynamic=("batch", "seq", "past", TOTAL),
        padding="left", output_axes=("batch", "seq"), more_output_axes=_grown(past),
        outputs=(decode.LOGITS, *_cache_names(decode.present_name, len(layers))),
        factory=functools.partial(_rewrapped, spec.factory, wrapper, len(layers), *known))


def _cache_names(name_of, layers: int) -> list[str]:
    """``name_of(layer, kind)`` of every layer's key, then value: the steps' cache order."""
    return [name_of(i, kind) for i in range(layers) for kind in ("key", "value")]


def _cache_inputs(name_of, layout, length: str) -> tuple[InputSpec, ...]:
    """A cache as inputs: every layer's key and value ``[batch, heads, length, dim]``, named by ``name_of``,
    from the layer's ``(heads, key dim, value dim, tokens)`` (:func:`_kv_layout`)."""
    return tuple(InputSpec(name_of(i, kind), ("batch", heads, length, dim))
                 for i, (heads, key, value, _) in enumerate(layout) for kind, dim in (("key", key), ("value", value)))


def _grown(past: tuple[InputSpec, ...]) -> tuple[tuple[int | str, ...], ...]:
    """The axes of the ``present`` outputs a step returns for its ``past`` inputs: ``past + seq`` tokens."""
    return tuple(("batch", s.shape[1], TOTAL, s.shape[3]) for s in past)


def _cache_layout(model: torch.nn.Module) -> list[tuple[int, int, int, int]]:
    """``(heads, key dim, value dim, tokens)`` of every layer's cache (:func:`_kv_layout`), read from a 2-token
    forward that fills a transformers ``DynamicCache``."""
    from transformers import DynamicCache

    name = type(model).__name__
    cache, tokens = DynamicCache(), 2
    fix = "export it without --with-past, or export its step with its own cache through MODULE:FACTORY"
    try:
        with torch.no_grad():
            model(torch.zeros(1, tokens, dtype=torch.int64), past_key_values=cache, use_cache=True)
    except Exception as exc:
        raise AttncError(f"{name} does not run with a transformers DynamicCache ({type(exc).__name__}: "
                         f"{_first_line(exc)})", fix) from None
    layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    layout = _kv_layout(cache.layers, tokens)
    if layout is None or (layers is not None and len(layout) != layers):
        raise AttncError(f"{name} keeps {len(cache.layers)} cache layer(s) for {layers} layers, not one key and one "
                         "value [batch, heads, tokens, dim] per layer (linear-attention or state-space layers?)", fix)
    return layout


def _kv_layout(layers, tokens: int | None) -> list[tuple[int, int, int, int]] | None:
    """``(heads, key dim, value dim, tokens)`` of every cache layer of a one-row forward, ``None`` unless each
    holds a key and a value ``[1, heads, tokens, dim]`` (of ``tokens`` tokens where given)."""
    pairs = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in layers]
    if not pairs or not all(isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == v.dim() == 4
                            and k.shape[:3] == v.shape[:3] and k.shape[0] == 1 and tokens in (None, k.shape[2])
                            for k, v in pairs):
        return None
    return [(k.shape[1], k.shape[3], v.shape[3], k.shape[2]) for k, v in pairs]


class Seq2SeqFirstStep(torch.nn.Module):
    """A transformers encoder-decoder model's first generation step: the encoder, then the decoder on the
    start tokens, with the caches the decoder's later steps (:class:`Seq2SeqStep`) take::

        (inputs, decoder_input_ids [B, T])
            -> (logits [B, T, vocab], present.N.key / .value [B, H, T, D],        # decoder self-attention
                cross_key_values.N.key / .value [B, H, S, D])                    # cross-attention, S source tokens
    """

    def __init__(self, model: torch.nn.Module, layers: int):
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, inputs, decoder_input_ids):
        return self._run(inputs, None, decoder_input_ids)

    def _run(self, inputs, attention_mask, decoder_input_ids):
        from transformers import DynamicCache, EncoderDecoderCache

        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        out = self.model(inputs, decoder_input_ids=decoder_input_ids, past_key_values=cache, use_cache=True, **mask)
        return (first_output(out), *keys_and_values(cache.self_attention_cache, self.layers),
                *keys_and_values(cache.cross_attention_cache, self.layers))


class MaskedSeq2SeqFirstStep(Seq2SeqFirstStep):
    """:class:`Seq2SeqFirstStep` on padded sources, ``(input_ids [B, S], attention_mask [B, S],
    decoder_input_ids [B, T])``, with the same outputs. The cross-attention keys and values at the padding
    are the projections of the encoder's states there: every later step masks them
    (:class:`MaskedSeq2SeqStep`'s ``encoder_attention_mask``)."""

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        return self._run(input_ids, attention_mask, decoder_input_ids)


class Seq2SeqStep(torch.nn.Module):
    """A transformers encoder-decoder model's later generation steps, the encoder's work cached::

        (decoder_input_ids [B, T], past_key_values.N.key / .value [B, H, P, D],   # layer by layer
         cross_key_values.N.key / .value [B, H, S, D])                          # from the first step
            -> (logits [B, T, vocab], present.N.key / .value [B, H, P+T, D])

    Cross-attention reads its keys and values from the cache (transformers skips their projection once
    the cross-attention cache holds them), so the encoder's states never enter the graph: the model gets
    zeros of their shape, which only sizes its masks.
    """

    def __init__(self, model: torch.nn.Module, layers: int, width: int):
        super().__init__()
        self.model = model
        self.layers = layers
        self.width = width

    def forward(self, decoder_input_ids, *caches):
        # signature: decoder_input_ids, past_0=None, ... (below the class), as CachedStep's
        return self._run(decoder_input_ids, None, caches)

    def _run(self, decoder_input_ids, encoder_attention_mask, caches):
        from transformers import DynamicCache, EncoderDecoderCache

        caches = [c for c in caches if c is not None]
        if len(caches) != 4 * self.layers:
            raise ValueError(f"pass a self- and a cross-attention key and value per layer ({4 * self.layers} "
                             f"tensors), got {len(caches)}")
        own, cross = DynamicCache(), DynamicCache()
        for layer in range(self.layers):
            own.update(caches[2 * layer], caches[2 * layer + 1], layer)
            cross.update(caches[2 * (self.layers + layer)], caches[2 * (self.layers + layer) + 1], layer)
        key = caches[2 * self.layers]
        encoder = key.new_zeros(key.shape[0], key.shape[2], self.width)
        # the model hands its attention_mask to the decoder's cross-attention when it gets the encoder's outputs
        mask = {} if encoder_attention_mask is None else {"attention_mask": encoder_attention_mask}
        out = self.model(encoder_outputs=(encoder,), decoder_input_ids=decoder_input_ids,
                         past_key_values=EncoderDecoderCache(own, cross), use_cache=True, **mask)
        return (first_output(out), *keys_and_values(own, self.layers))


class MaskedSeq2SeqStep(Seq2SeqStep):
    """:class:`Seq2SeqStep` over padded sources: ``encoder_attention_mask [B, S]`` (the first step's
    ``attention_mask``, 1 for the sources' tokens) after ``decoder_input_ids``, the cross-attention reading
    no padding; the same outputs."""

    def forward(self, decoder_input_ids, encoder_attention_mask, *caches):
        # signature: decoder_input_ids, encoder_attention_mask, past_0=None, ... (below the class)
        return self._run(decoder_input_ids, encoder_attention_mask, caches)


Seq2SeqStep.forward.__signature__ = _step_signature(DECODER, caches=4 * _MAX_LAYERS)
MaskedSeq2SeqStep.forward.__signature__ = _step_signature(DECODER, SOURCE_MASK, caches=4 * _MAX_LAYERS)


def keys_and_values(cache, layers: int) -> list[torch.Tensor]:
    """A transformers cache's tensors, layer by layer: key, then value (the steps' output order)."""
    return [t for layer in cache.layers[:layers] for t in (layer.keys, layer.values)]


def with_first_step(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[Seq2SeqFirstStep, CheckpointSpec]:
    """A loaded encoder-decoder checkpoint as its first generation step (``attnc export --first-step``):
    :class:`Seq2SeqFirstStep` on the same weights, its spec the checkpoint's (main input and
    ``decoder_input_ids``) with outputs ``logits``, ``present.N.key`` / ``.value`` and
    ``cross_key_values.N.key`` / ``.value``. Its later steps are :func:`with_past`'s graph; together they
    decode with :func:`attnc.compiler.decode.generate_seq2seq`. On :func:`with_attention_mask`'s module and
    spec, the step takes the sources' mask too, :class:`MaskedSeq2SeqFirstStep`. A vision-language checkpoint's first
    step is :class:`~attnc.models.hf_vision_language.VisionLanguageFirstStep` (the image and the prompt, their KV
    cache out; :func:`attnc.compiler.decode.generate_vision_language`).

    Raises:
        AttncError: the checkpoint is no encoder-decoder or vision-language model, or its caches are not transformers'
            ``EncoderDecoderCache`` of one key and one value per layer.
    """
    from attnc.models import hf_vision_language

    if isinstance(module, (Seq2SeqFirstStep, hf_vision_language.VisionLanguageFirstStep)):
        return module, spec
    if isinstance(spec, CheckpointSpec) and spec.kind == "vlm":
        return _vision_language_first_step(module, spec)
    if not isinstance(spec, CheckpointSpec) or DECODER not in spec.input_names:
        raise AttncError(f"{spec.name if spec else 'this model'} is no encoder-decoder checkpoint: --first-step is "
                         "the first generation step of one (T5, BART, Whisper)",
                         "export a decoder-only model's step with --with-past alone")
    own, cross = _seq2seq_cache_layout(module.model, spec)
    outputs = _cache_names(decode.present_name, len(own)) + _cache_names(decode.cross_name, len(cross))
    source = "seq" if spec.inputs[0].shape[1:2] == ("seq",) else None   # text: as long as the source, else static
    axes = [("batch", h, "tgt", d) for h, k, v, _ in own for d in (k, v)] + \
        [("batch", h, source or s, d) for h, k, v, s in cross for d in (k, v)]
    cls = MaskedSeq2SeqFirstStep if MASK in spec.input_names else Seq2SeqFirstStep
    return cls(module.model, len(own)).eval(), dataclasses.replace(
        spec, output_axes=("batch", "tgt"), more_output_axes=tuple(axes), outputs=(decode.LOGITS, *outputs),
        factory=functools.partial(_rewrapped, spec.factory, cls, len(own)))


def _vision_language_first_step(module: torch.nn.Module, spec: CheckpointSpec
                                ) -> tuple[torch.nn.Module, CheckpointSpec]:
    """:func:`with_first_step` of a vision-language checkpoint: :class:`~attnc.models.hf_vision_language.
    VisionLanguageFirstStep` (the image after the first ``K`` text tokens as the module has it), its outputs
    ``logits [batch, text, vocab]`` and ``present.N.key`` / ``.value`` ``[batch, H, seq + P, D]``."""
    from attnc.models import hf_vision_language

    masked = MASK in spec.input_names
    wrapper = hf_vision_language.MaskedVisionLanguageFirstStep if masked else hf_vision_language.VisionLanguageFirstStep
    layers = _cache_layout(module.model)
    axes = tuple(("batch", h, f"seq + {module.num_visual_tokens}", d) for h, k, v, _ in layers for d in (k, v))
    return wrapper(module.model, *module.placement).eval(), dataclasses.replace(
        spec, outputs=(decode.LOGITS, *_cache_names(decode.present_name, len(layers))), more_output_axes=axes,
        factory=functools.partial(_rewrapped, spec.factory, wrapper, *module.placement))


def exited_spec(module: torch.nn.Module, spec: CheckpointSpec, exit_layer: int) -> CheckpointSpec:
    """The spec of a vision-language checkpoint's generation graph (``module``: its first or later step) compiled with
    ``--token-exit static --exit-layer exit_layer``: the caches of layers ``exit_layer:`` without the image's ``P``
    tokens, named as :func:`attnc.passes.token_exit.apply_step_token_exit` declares them (``past`` the cached text
    after the image; a first step's later caches ``seq`` long); ``spec`` unchanged for any other module."""
    from attnc.models import hf_vision_language

    first = isinstance(module, hf_vision_language.VisionLanguageFirstStep)
    if not (first or isinstance(module, hf_vision_language.VisionLanguageStep)):
        return spec
    k, p = module.layout.text_before_end, module.num_visual_tokens
    layers = len(spec.more_output_axes) // 2
    if first:
        axes = tuple(("batch", h, "seq" if i // 2 >= exit_layer else dim, d)
                     for i, (_, h, dim, d) in enumerate(spec.more_output_axes))
        return dataclasses.replace(spec, more_output_axes=axes)
    text, full = decode.exited_cache_lengths("past", k, p)
    caches = _cache_names(decode.past_name, layers)   # a layer's key, then its value
    lengths = {name: text if i // 2 >= exit_layer else full for i, name in enumerate(caches)}
    inputs = tuple(dataclasses.replace(s, shape=(s.shape[0], f"{full} + seq")) if s.name == MASK else
                   dataclasses.replace(s, shape=(*s.shape[:2], lengths[s.name], *s.shape[3:])) if s.name in lengths
                   else s for s in spec.inputs)
    axes = tuple((*a[:2], f"{text if i // 2 >= exit_layer else full} + seq", *a[3:])
                 for i, a in enumerate(spec.more_output_axes))
    return dataclasses.replace(spec, inputs=inputs, more_output_axes=axes)


def _seq2seq_step(module: torch.nn.Module, spec: CheckpointSpec) -> tuple[Seq2SeqStep, CheckpointSpec]:
    """:func:`with_past` of an encoder-decoder checkpoint: its decoder's step, :class:`Seq2SeqStep`; the
    example inputs are 3 new tokens after 5 cached ones over a cache of the example source's length. On
    :func:`with_attention_mask`'s module and spec, :class:`MaskedSeq2SeqStep`: ``encoder_attention_mask
    [batch, source]`` after the ids, its example rows padded on the right. The step's outputs are the
    decoder's, all at tokens: compared everywhere (no ``padding``)."""
    model = module.model
    own, cross = _seq2seq_cache_layout(model, spec)
    ids = dataclasses.replace(spec.inputs[spec.input_names.index(DECODER)], shape=("batch", "seq"))
    masked = MASK in spec.input_names
    mask = (InputSpec(SOURCE_MASK, ("batch", "source"), torch.int64, 2),) if masked else ()
    past = _cache_inputs(decode.past_name, own, "past")
    source = _cache_inputs(decode.cross_name, cross, "source")
    width = model.config.get_text_config(decoder=True).d_model
    cls = MaskedSeq2SeqStep if masked else Seq2SeqStep
    return cls(model, len(own), width).eval(), dataclasses.replace(
        spec, inputs=(ids, *mask, *past, *source),
        sizes={"batch": BATCH, "seq": STEP, "past": PAST, "source": cross[0][3]},
        dynamic=("batch", "seq", "past", "source", TOTAL), padding="", decoder_start=None, output_axes=("batch", "seq"),
        more_output_axes=_grown(past), outputs=(decode.LOGITS, *_cache_names(decode.present_name, len(own))),
        factory=functools.partial(_rewrapped, spec.factory, cls, len(own), width))


def _seq2seq_cache_layout(model: torch.nn.Module, spec: CheckpointSpec
                          ) -> tuple[list[tuple[int, int, int, int]], list[tuple[int, int, int, int]]]:
    """``(heads, key dim, value dim, tokens)`` of every decoder layer's self-attention cache and of its
    cross-attention cache (source tokens), read from one forward on the example inputs."""
    from transformers import DynamicCache, EncoderDecoderCache

    name = type(model).__name__
    fix = "export it without --with-past / --first-step, or its steps through MODULE:FACTORY"
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    examples = dict(zip(spec.input_names, spec.example_inputs(batch=1)))   # one row: no padding to mask
    inputs, decoder = examples[spec.input_names[0]], examples[DECODER]
    try:
        with torch.no_grad():
            model(inputs, decoder_input_ids=decoder, past_key_values=cache, use_cache=True)
    except Exception as exc:
        raise AttncError(f"{name} does not run with a transformers EncoderDecoderCache ({type(exc).__name__}: "
                         f"{_first_line(exc)})", fix) from None
    own = _kv_layout(cache.self_attention_cache.layers, decoder.shape[1])
    cross = _kv_layout(cache.cross_attention_cache.layers, None)
    if own is None or cross is None or len(own) != len(cross):
        raise AttncError(f"{name} keeps no [batch, heads, tokens, dim] key and value per decoder layer in its "
                         "self- and cross-attention caches", fix)
    return own, cross


def for_inputs(module: torch.nn.Module, spec, input_names: list[str], output_names: list[str] = ()):
    """The variant of a loaded checkpoint whose inputs are ``input_names`` (and outputs ``output_names``):
    as loaded, with its attention mask (``--with-attention-mask``: the mask after the main input), as a
    cached generation step (``--with-past``) or an encoder-decoder model's first step (``--first-step``),
    each of an encoder-decoder model's also with the sources' mask; ``(module, spec)`` unchanged for
    anything else."""
    if not isinstance(spec, CheckpointSpec):
        return module, spec
    input_names = list(input_names)
    if decode.is_cached_step(input_names):
        if SOURCE_MASK in input_names:
            module, spec = with_attention_mask(module, spec)
        return with_past(module, spec)
    masked = [*spec.input_names, MASK] if spec.kind == "vlm" else [spec.input_names[0], MASK, *spec.input_names[1:]]
    if input_names == masked:
        module, spec = with_attention_mask(module, spec)
    elif input_names != spec.input_names:
        return module, spec
    first = decode.present_name(0, "key") if spec.kind == "vlm" else decode.cross_name(0, "key")
    return with_first_step(module, spec) if first in output_names else (module, spec)


def _transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise AttncError("loading a Hugging Face checkpoint directory needs transformers",
                         "pip install transformers") from None


def _config(path: Path):
    if not (path / "config.json").is_file():
        raise AttncError(f"{path} has no config.json, so it is no Hugging Face checkpoint",
                         f"{_SAVE_FIX}, a bundled model name or MODULE:FACTORY")
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:   # unknown model_type (ValueError), unreadable JSON (OSError), ...
        raise AttncError(f"transformers {transformers.__version__} cannot read {path / 'config.json'} "
                         f"({type(exc).__name__}: {_first_line(exc)})",
                         "check its model_type, or upgrade transformers; attnc runs no checkpoint code "
                         "(trust_remote_code): export such a model through MODULE:FACTORY") from None
    if _is_mixture_of_experts(config):
        exportable_experts(config)
    return config


def _is_mixture_of_experts(config) -> bool:
    text = config.get_text_config()
    return any(getattr(text, key, None) for key in ("num_local_experts", "n_routed_experts", "num_experts",
                                                    "moe_num_experts"))   # the last: Aria's


def _model_class(config, path: Path) -> type:
    transformers = _transformers()
    names = getattr(config, "architectures", None) or []
    if not names:
        try:
            return transformers.AutoModel._model_mapping[type(config)]
        except KeyError:
            raise AttncError(f"{path / 'config.json'} names no architecture and transformers "
                             f"{transformers.__version__} has no AutoModel for {type(config).__name__}",
                             "add the model class to its \"architectures\" list") from None
    name = names[0]
    cls = getattr(transformers, name, None)
    if cls is None:   # classes not exported at the top level, e.g. WhisperEncoder
        module = f"transformers.models.{config.model_type}.modeling_{config.model_type}"
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise AttncError(f"architecture {name!r} of {path / 'config.json'} is unknown to transformers "
                         f"{transformers.__version__}",
                         "upgrade transformers or fix \"architectures\"; attnc runs no checkpoint code "
                         "(trust_remote_code): export such a model through MODULE:FACTORY")
    params = [p for p in inspect.signature(cls.forward).parameters if p != "self"]
    if params[:1] != [cls.main_input_name]:
        raise AttncError(f"{name}.forward takes {params[:1]} first, not its main input {cls.main_input_name!r}",
                         "export it through MODULE:FACTORY with a module that takes the inputs in order")
    return cls


def _load(cls: type, config, path: Path) -> torch.nn.Module:
    """``cls`` from the weights in ``path``: float32, eval mode, every weight present."""
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise AttncError(f"{path} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])})", _SAVE_FIX)
    # Output returns logits or the last hidden state, never the pooled output: a pooler whose weights a
    # checkpoint lacks (saved with add_pooling_layer=False, which config.json does not record) is not built
    pooler = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters \
        else {}
    try:
        with _quiet(_transformers()):
            model, info = cls.from_pretrained(path, config=config, local_files_only=True, dtype=torch.float32,
                                              output_loading_info=True, **pooler)
    except Exception as exc:   # corrupt files, shapes that do not fit the config, ...
        raise AttncError(f"cannot load {cls.__name__} from {path} ({type(exc).__name__}: {_first_line(exc)})",
                         f"check that the weights belong to this config; {_SAVE_FIX}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise AttncError(f"{path} lacks {len(missing)} weight(s) of {cls.__name__}, e.g. {', '.join(missing[:3])}",
                         "save the whole model with save_pretrained(), or name the class the weights belong "
                         "to in config.json's \"architectures\"")
    return model.eval()


@contextlib.contextmanager
def _quiet(transformers) -> Iterator[None]:
    """Without transformers' progress bars and load report: missing weights are checked here, and an
    unused pooler's weights are expected to be left over."""
    logging, bars = transformers.utils.logging, transformers.utils.logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _spec(path: Path, config, cls: type) -> CheckpointSpec:
    from attnc.models import hf_vision_language

    if hf_vision_language.is_vision_language(config):
        return _vision_language_spec(path, config, cls)
    main = cls.main_input_name
    inputs, sizes, dynamic, unsupported = _inputs(main, config)
    text = config.get_text_config()
    family = "linear" if "linear_attention" in (getattr(text, "layer_types", None) or ()) else "mhsa"
    kind = {"input_ids": "lm", "pixel_values": "vit"}.get(main, "audio")
    seq2seq = DECODER in inspect.signature(cls.forward).parameters
    spec = CheckpointSpec(
        name=str(path), family=family, kind=kind,
        factory=functools.partial(_wrapped, cls, config, path, Seq2SeqOutput if seq2seq else Output),
        inputs=inputs, sizes=sizes, dynamic=dynamic, output_axes=("batch",),
        description=f"{cls.__name__}.from_pretrained({str(path)!r})", unsupported=unsupported)
    return _with_decoder_input(spec, config, path) if seq2seq else spec


def _vision_language_spec(path: Path, config, cls: type) -> CheckpointSpec:
    """A vision-language checkpoint's spec (:mod:`attnc.models.hf_vision_language`): ``pixel_values [batch, C, H,
    W]`` (LLaVA-NeXT's ``[batch, N, C, S, S]``, its processor's tiles) and ``input_ids [batch, seq]``, dynamic in
    batch and text length, the ids below the text vocabulary and below the image token (LLaVA's
    ``image_token_index`` sits past the text's words); logits ``[batch, text, vocab]`` of the text tokens after the
    image (``text`` = ``seq`` - the tokens in front of it)."""
    from attnc.models import hf_vision_language

    hf_vision_language.check_supported(config, cls.__name__)
    text = config.get_text_config()
    vocab = text.vocab_size
    image = next((v for k in ("image_token_index", "image_token_id") if isinstance(v := getattr(config, k, None), int)),
                 None)
    high = image if image is not None and 0 < image < vocab else vocab
    positions = _first_size(text, ("max_position_embeddings",), TOKENS)
    return CheckpointSpec(
        name=str(path), family="mhsa", kind="vlm",
        factory=functools.partial(_wrapped, cls, config, path, hf_vision_language.VisionLanguageOutput),
        inputs=(InputSpec(hf_vision_language.PIXELS, ("batch", *hf_vision_language.pixel_shape(config, cls.__name__))),
                InputSpec(hf_vision_language.IDS, ("batch", "seq"), torch.int64, high)),
        sizes={"batch": BATCH, "seq": max(1, min(TOKENS, positions // 2))}, dynamic=("batch", "seq", "text"),
        output_axes=("batch", "text"),   # the text after the image: seq - K tokens (with_text_before_image)
        description=f"{cls.__name__}.from_pretrained({str(path)!r}) with the image in front of the text")


def _with_decoder_input(spec: CheckpointSpec, config, path: Path) -> CheckpointSpec:
    """An encoder-decoder model's spec: ``decoder_input_ids [batch, tgt]`` after the main input, below the
    decoder's vocabulary (Marian's ``decoder_vocab_size`` may differ from the encoder's), at most as many
    as the decoder has positions (``max_target_positions``, else ``max_position_embeddings``), starting
    with the token ``generate`` starts with: ``decoder_start_token_id`` of ``config.json``, else of
    ``generation_config.json``, else ``bos_token_id`` (random when none is below the vocabulary)."""
    decoder = config.get_text_config(decoder=True)
    vocab = getattr(config, "decoder_vocab_size", None) or getattr(decoder, "vocab_size", None)
    limit = _first_size(decoder, ("max_target_positions", "max_position_embeddings", "n_positions"), TARGET)
    generation = path / "generation_config.json"
    generation = json.loads(generation.read_text()) if generation.is_file() else {}
    start = next((v for v in (getattr(config, "decoder_start_token_id", None),
                              generation.get("decoder_start_token_id"), getattr(decoder, "bos_token_id", None))
                  if v is not None), None)
    unsupported = spec.unsupported or ("" if vocab else "its config has no vocab_size to draw decoder token ids below")
    return dataclasses.replace(
        spec, inputs=(*spec.inputs, InputSpec(DECODER, ("batch", "tgt"), torch.int64, vocab)),
        sizes={**spec.sizes, "tgt": min(TARGET, limit)}, dynamic=(*spec.dynamic, "tgt"),
        output_axes=("batch", "tgt"), unsupported=unsupported,
        decoder_start=start if isinstance(start, int) and vocab and 0 <= start < vocab else None)


def _wrapped(cls: type, config, path: Path, wrapper: type) -> torch.nn.Module:
    return wrapper(_load(cls, config, path)).eval()


def _inputs(main: str, config) -> tuple[tuple[InputSpec, ...], dict[str, int], tuple[str, ...], str]:
    """``(inputs, sizes, dynamic size names, why example inputs are unknown or "")`` for ``main``."""
    if main == "input_ids":
        text = config.get_text_config()
        positions = _first_size(text, ("max_position_embeddings", "n_positions", "max_seq_len"), TOKENS)
        vocab = getattr(text, "vocab_size", None)
        if not vocab:
            return (InputSpec(main, ("batch", "seq"), torch.int64),), {"batch": BATCH}, ("batch", "seq"), \
                "its config has no vocab_size to draw token ids below"
        static = config.model_type in STATIC_LENGTH
        shape = ("batch", min(TOKENS, positions)) if static else ("batch", "seq")
        return (InputSpec(main, shape, torch.int64, vocab),), {"batch": BATCH, "seq": min(TOKENS, positions)}, \
            ("batch",) if static else ("batch", "seq"), ""
    if main == "pixel_values" and getattr(config, "image_size", None):
        height, width = config_image_size(config)
        channels = getattr(config, "num_channels", 3)
        return (InputSpec(main, ("batch", channels, height, width)),), {"batch": BATCH}, ("batch",), ""
    if main == "input_values" and getattr(config, "conv_stride", None) and getattr(config, "conv_kernel", None):
        # the samples a convolutional front end turns into TOKENS frames: its receptive field, then a hop per frame
        hop = math.prod(config.conv_stride)
        field = 1 + sum((k - 1) * math.prod(config.conv_stride[:i]) for i, k in enumerate(config.conv_kernel))
        return (InputSpec(main, ("batch", "samples")),), {"batch": BATCH, "samples": field + (TOKENS - 1) * hop}, \
            ("batch", "samples"), ""
    if main == "input_features" and getattr(config, "num_mel_bins", None) and \
            getattr(config, "max_source_positions", None):
        frames = 2 * config.max_source_positions   # Whisper's encoder halves the frames with a stride-2 conv
        return (InputSpec(main, ("batch", config.num_mel_bins, frames)),), {"batch": BATCH}, ("batch",), ""
    return (InputSpec(main, ("batch",)),), {"batch": BATCH}, ("batch",), \
        f"attnc cannot build example {main!r} inputs from a {config.model_type} config"


def config_image_size(config) -> tuple[int, int]:
    """``(H, W)`` of a (vision) config's ``image_size`` (an int for square images)."""
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)[-2:]


def _first_size(config, keys: tuple[str, ...], default: int) -> int:
    """The first of ``config``'s attributes ``keys`` that is a positive int (a position limit), else ``default``."""
    return next((v for k in keys if isinstance(v := getattr(config, k, None), int) and v > 0), default)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
