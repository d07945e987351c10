"""Greedy generation with a compiled generation step that carries its KV cache.

``attnc export CKPT --with-past`` exports a decoder-only checkpoint's step as one graph (see
:class:`attnc.models.hf_checkpoint.CachedStep`)::

    (input_ids [B, T], attention_mask [B, P+T], past_key_values.0.key [B, H, P, Dk],
     past_key_values.0.value [B, H, P, Dv], ...)
        -> (logits [B, T, vocab], present.0.key [B, H, P+T, Dk], present.0.value, ...)

The names here are that contract; :func:`generate` runs it on any backend's runner: the prompt with
an empty cache (``P = 0``), then one token per step with the cache the previous step returned, as
transformers' ``generate`` runs the model. Encoder-decoder models have two graphs: ``--first-step``
(the encoder, the start token, and the cross-attention keys and values ``cross_key_values.N.key``) and
``--with-past`` (the decoder's later steps, taking those): :func:`generate_seq2seq`. Exported with
``--with-attention-mask`` too, the first step takes the sources' ``attention_mask`` after ``input_ids`` and
the later steps take it as ``encoder_attention_mask`` after ``decoder_input_ids``. numpy only: an
application that embeds the artefacts needs neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import VisualLayout
from attnc.compiler.search import LOGITS, GenerationOptions, decode  # noqa: F401 (LOGITS: re-exported)

IDS = "input_ids"
DECODER_IDS = "decoder_input_ids"
MASK = "attention_mask"
SOURCE_MASK = "encoder_attention_mask"   # an encoder-decoder model's later steps: the sources' mask
_PAST = "past_key_values."
_PRESENT = "present."
_CROSS = "cross_key_values."


def past_name(layer: int, kind: str) -> str:
    """The input holding layer ``layer``'s cached ``kind`` (``"key"`` or ``"value"``)."""
    return f"{_PAST}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The output holding layer ``layer``'s ``kind`` cache after the step: the past and the step's tokens."""
    return f"{_PRESENT}{layer}.{kind}"


def exited_cache_lengths(past: str, visual_offset: int, visual_tokens: int) -> tuple[str, str]:
    """``(text, whole)``: how a vision-language later step whose visual tokens exited declares its caches' lengths,
    ``past`` counting the cached text after the image: ``past + K`` in the layers after the exit (the text alone),
    ``past + K + P`` in front of it (``attnc.passes.token_exit.apply_step_token_exit`` declares them, the
    checkpoint's exited spec feeds them)."""
    return (f"{past} + {visual_offset}" if visual_offset else past), f"{past} + {visual_offset + visual_tokens}"


def cross_name(layer: int, kind: str) -> str:
    """An encoder-decoder model's cross-attention ``kind`` of layer ``layer``: computed from the encoder's
    states by the first step, read by every later one."""
    return f"{_CROSS}{layer}.{kind}"


# The first inputs of a decoder-only model's step, and of an encoder-decoder model's later steps (without and
# with the sources' mask: the mask second, as in a decoder-only step, so steps exported before it are still steps).
_DECODER_ONLY_STEP = [IDS, MASK, past_name(0, "key")]
_SEQ2SEQ_STEP = [DECODER_IDS, past_name(0, "key")]
_MASKED_SEQ2SEQ_STEP = [DECODER_IDS, SOURCE_MASK, past_name(0, "key")]


def is_cached_step(input_names) -> bool:
    """Whether a graph with these inputs is a generation step with its KV cache (a decoder-only model's, or
    an encoder-decoder model's later steps, with or without ``encoder_attention_mask``)."""
    names = list(input_names)
    return names[:3] in (_DECODER_ONLY_STEP, _MASKED_SEQ2SEQ_STEP) or names[:2] == _SEQ2SEQ_STEP


def generate(runner, input_ids, attention_mask=None, max_new_tokens: int = 16,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             **options) -> np.ndarray:
    """Decoding with a decoder-only model's cached step: greedy (the most likely token at every step) by
    default, or as ``options`` say (:class:`attnc.compiler.search.GenerationOptions`: ``num_beams``,
    ``do_sample``, ``top_p``, ``repetition_penalty``, ...; :func:`attnc.compiler.search.generation_options`
    reads a checkpoint's).

    Args:
        runner: a loaded artefact (:func:`attnc.runtime.load`) of a graph exported with ``--with-past``.
        input_ids: ``[B, S]`` prompts, padded on the left to one length.
        attention_mask: ``[B, S]``, 1 for tokens and 0 for padding; all ones when ``None``.
        max_new_tokens: tokens to add to every row.
        eos_token_id: end-of-sequence token(s) (transformers' ``generation_config.eos_token_id``): a row that
            produced one gets ``pad_token_id`` (default: the first end token) from then on; generation stops
            early once every row has.
        options: :class:`~attnc.compiler.search.GenerationOptions` fields, as transformers' ``generate``
            takes them.

    Returns:
        ``[B * num_return_sequences, S + n]`` int64: the prompts and the ``n <= max_new_tokens`` tokens
        generated, as transformers' ``generate`` returns them for the same options.

    Raises:
        AttncError: the runner is no decoder-only cached step, the prompts and mask disagree in shape, or an
            option is unknown or out of range.
    """
    names = [s.name for s in runner.input_specs]
    if names[:3] != _DECODER_ONLY_STEP:
        raise AttncError(f"this artefact takes {names[:3]}, not a decoder-only generation step with its KV cache",
                         "export the checkpoint with `attnc export CKPT --with-past` and compile that (an "
                         "encoder-decoder model decodes with generate_seq2seq)")
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise AttncError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} are no [batch, seq] pair",
                         "pass prompts [batch, seq], padded on the left, and their mask of the same shape")
    search = _options(options)
    empty = {s.name: np.zeros(_empty_cache_shape(s, len(ids)), dtype=s.dtype) for s in runner.input_specs[2:]}
    outputs = runner.infer({IDS: ids, MASK: mask, **empty})
    return decode(outputs, ids, _decoder_steps(runner, list(empty), mask, outputs), max_new_tokens, eos_token_id,
                  pad_token_id, search)


def _decoder_steps(runner, past: list[str], mask: np.ndarray, outputs: dict):
    """``next_step(chosen, rows)`` for :func:`attnc.compiler.search.decode` with a decoder-only cached step: the
    chosen tokens, the mask one column longer, the cache ``past`` from the step before (rows reordered as
    ``rows`` says); ``mask`` and ``outputs`` are the prompt's."""
    state = {"mask": mask, "outputs": outputs}

    def next_step(chosen, rows):
        before = state["mask"] if rows is None else state["mask"][rows]
        state["mask"] = np.concatenate([before, np.ones((len(chosen), 1), dtype=np.int64)], axis=1)
        state["outputs"] = runner.infer({IDS: chosen[:, None], MASK: state["mask"],
                                         **_carried(past, state["outputs"], rows)})
        return state["outputs"]

    return next_step


def _options(options: dict) -> GenerationOptions:
    """``generate``'s keyword options as :class:`GenerationOptions`, unknown ones refused by name."""
    known = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise AttncError(f"unknown generation option(s): {', '.join(unknown)}",
                         f"pass options among {', '.join(sorted(known))} (transformers' GenerationConfig names)")
    return GenerationOptions(**options)


def generate_seq2seq(first, step, inputs, decoder_start_token_id: int, max_new_tokens: int = 16,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                     attention_mask=None, **options) -> np.ndarray:
    """Decoding with an encoder-decoder model's two compiled steps: ``first`` (``attnc export CKPT
    --first-step``: the encoder, the decoder's first token and its cross-attention keys and values), then
    ``step`` (``--with-past``) once per further token, the encoder's work cached. Greedy by default, or as
    ``options`` say (as :func:`generate`'s: beam search, sampling, ...).

    Args:
        first, step: loaded artefacts (:func:`attnc.runtime.load`) of those two graphs, both exported with
            ``--with-attention-mask`` or both without.
        inputs: the encoder's input (``input_ids [B, S]``, ``input_features``, ...); rows of one length, or
            token ids padded (on the right, as tokenizers pad) when the artefacts take a mask.
        decoder_start_token_id: the token every row's decoding starts with (transformers'
            ``config.decoder_start_token_id``).
        max_new_tokens, eos_token_id, pad_token_id: as :func:`generate`.
        attention_mask: ``[B, S]``, 1 for the sources' tokens and 0 for padding (``first`` takes it as
            ``attention_mask``, every later step as ``encoder_attention_mask``); all ones when ``None`` and
            the artefacts take one.
        options: :class:`~attnc.compiler.search.GenerationOptions` fields, as transformers' ``generate``
            takes them.

    Returns:
        ``[B * num_return_sequences, 1 + n]`` int64: the start token and the ``n <= max_new_tokens`` tokens
        generated, as transformers' ``generate(input_ids, attention_mask=..., **options)`` returns an
        encoder-decoder model's output.

    Raises:
        AttncError: the artefacts are no first step and later step of an encoder-decoder model, one takes the
            sources' mask and the other does not, a mask is given to artefacts that take none, or the mask's
            shape is not the inputs' ``[B, S]``, or an option is unknown or out of range.
    """
    search = _options(options)
    names = [s.name for s in first.input_specs]
    if names[1:] not in ([DECODER_IDS], [MASK, DECODER_IDS]) or cross_name(0, "key") not in first.output_names:
        raise AttncError(f"the first artefact takes {names} and gives {first.output_names[:3]}, not an encoder-"
                         "decoder model's first generation step", "export it with `attnc export CKPT --first-step`")
    step_names = [s.name for s in step.input_specs]
    if step_names[:3] != _MASKED_SEQ2SEQ_STEP and step_names[:2] != _SEQ2SEQ_STEP:
        raise AttncError(f"the step artefact takes {step_names[:3]}, not an encoder-decoder model's later steps",
                         "export it with `attnc export CKPT --with-past`")
    masked = MASK in names
    if masked != (SOURCE_MASK in step_names):
        raise AttncError(f"the first step {'takes' if masked else 'takes no'} attention mask over the sources and "
                         f"the later steps {'take none' if masked else 'take one (encoder_attention_mask)'}",
                         "export --first-step and --with-past both with --with-attention-mask, or both without")
    if attention_mask is not None and not masked:
        raise AttncError("an attention_mask was given to artefacts that take none (exported without "
                         "--with-attention-mask: sources of one length)",
                         "export --first-step and --with-past with --with-attention-mask for padded sources, "
                         "or pass no attention_mask")
    inputs = np.asarray(inputs)
    first_mask, fixed = {}, {}   # the sources' mask by the name each graph takes it; fixed: every later step's
    if masked:
        mask = np.ones(inputs.shape[:2], np.int64) if attention_mask is None else np.asarray(attention_mask, np.int64)
        if inputs.ndim != 2 or mask.shape != inputs.shape:
            raise AttncError(f"input_ids {list(inputs.shape)} and attention_mask {list(mask.shape)} are no "
                             "[batch, seq] pair", "pass token ids [batch, seq], padded on the right, and their "
                             "mask of the same shape")
        first_mask, fixed = {MASK: mask}, {SOURCE_MASK: mask}
    start = np.full((len(inputs), 1), decoder_start_token_id, dtype=np.int64)
    state = {"outputs": first.infer({names[0]: inputs, DECODER_IDS: start, **first_mask}), "rows": len(start)}
    fixed.update((name, value) for name, value in state["outputs"].items() if name.startswith(_CROSS))
    past = [name for name in step_names if name.startswith(_PAST)]

    def next_step(chosen, rows):
        if rows is not None and len(rows) != state["rows"]:   # the first step's rows expanded (beams, samples)
            fixed.update((name, value[rows]) for name, value in fixed.items())
            state["rows"] = len(rows)
        # rows otherwise reorder copies of one source: its mask and cross-attention cache stay as they are
        state["outputs"] = step.infer({DECODER_IDS: chosen[:, None], **_carried(past, state["outputs"], rows),
                                       **fixed})
        return state["outputs"]

    return decode(state["outputs"], start, next_step, max_new_tokens, eos_token_id, pad_token_id, search)


PIXELS, VIDEOS = "pixel_values", "pixel_values_videos"


def generate_vision_language(first, step, pixel_values, input_ids, attention_mask=None, exit_step=None,
                             max_new_tokens: int = 16, eos_token_id: int | Sequence[int] | None = None,
                             pad_token_id: int | None = None, **options) -> np.ndarray:
    """Answering about an image with a vision-language checkpoint's two compiled steps: ``first`` (``attnc export
    CKPT --first-step [--text-before-image K]``: the image and the prompt, their KV cache), then ``step``
    (``--with-past``: the language model alone) once per further token. Greedy by default, or as ``options`` say
    (as :func:`generate`'s: beam search, sampling, ...).

    Args:
        first, step: loaded artefacts (:func:`attnc.runtime.load`) of those two graphs.
        pixel_values: ``[B, C, H, W]`` one image per prompt (``[B, N, C, H, W]``: ``N``; a first step exported with
            ``--video-frames F`` takes its ``pixel_values_videos [B, F, C, S, S]`` here).
        input_ids: ``[B, T]`` prompts, the image going after their first ``K`` tokens as ``first`` was exported.
        attention_mask: ``[B, T]``, 0 at padding, for prompts of different lengths (``first`` exported with
            ``--with-attention-mask``): each row padded after its first ``K`` tokens, ``[K tokens][padding][text]``.
            None: every token counts.
        exit_step: for a ``first`` compiled with ``--token-exit dynamic`` (a gate decides per call whether the
            image leaves after the gate's layer): the later step compiled with ``--token-exit static --exit-layer``
            at that layer, which reads the caches of a call whose gate fired; ``step`` reads the others.
        max_new_tokens, eos_token_id, pad_token_id, options: as :func:`generate`.

    Returns:
        ``[B * num_return_sequences, T + n]`` int64: the prompts and the ``n <= max_new_tokens`` tokens generated,
        the tokens transformers' ``generate`` adds to the prompt with the image's placeholder tokens in its place.

    Both compiled with the same ``--token-exit static --exit-layer k`` answer with the image gone after layer ``k``
    (the later layers' caches hold the text alone); a step whose manifest says it reads other caches than the first
    step returned (another exit layer, image size or text in front of the image, or no exit) is refused.

    Raises:
        AttncError: the artefacts are no vision-language first step and decoder-only step, were compiled with
            different token exits, the inputs are no ``[batch, ...]`` pair of one batch, or an option is unknown or
            out of range.
    """
    names = [s.name for s in first.input_specs]
    if names[:1] not in ([PIXELS], [VIDEOS]) or names[1:] not in ([IDS], [IDS, MASK]) or \
            present_name(0, "key") not in first.output_names:
        raise AttncError(f"the first artefact takes {names} and gives {first.output_names[:2]}, not a vision-language "
                         "checkpoint's first generation step", "export it with `attnc export CKPT --first-step`")
    for later in (step, exit_step) if exit_step is not None else (step,):
        step_names = [s.name for s in later.input_specs]
        if step_names[:3] != _DECODER_ONLY_STEP:
            raise AttncError(f"the step artefact takes {step_names[:3]}, not a decoder-only generation step",
                             "export it with `attnc export CKPT --with-past`")
    pixels, ids = np.asarray(pixel_values, dtype=np.float32), np.asarray(input_ids, dtype=np.int64)
    if ids.ndim != 2 or pixels.ndim < 2 or len(pixels) != len(ids):
        raise AttncError(f"pixel_values {list(pixels.shape)} and input_ids {list(ids.shape)} are no pair of one batch",
                         "pass each prompt's images ([C, H, W], or [N, C, H, W] for N per prompt; a video's frames "
                         "[F, C, H, W]) and the prompts [batch, tokens]")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if mask.shape != ids.shape:
        raise AttncError(f"attention_mask {list(mask.shape)} is not input_ids' shape {list(ids.shape)}",
                         "pass a mask [batch, tokens], 0 at padding")
    if MASK not in names and not mask.all():
        raise AttncError("the prompts are padded, but the first step takes no attention_mask",
                         "export the first step with `attnc export CKPT --first-step --with-attention-mask`")
    search = _options(options)
    outputs = first.infer({names[0]: pixels, IDS: ids, **({MASK: mask} if MASK in names else {})})
    if exit_step is not None and _cache_exit(outputs, ids.shape[1]) is not None:
        step = exit_step   # the first step's gate fired: its later layers cache the text alone
    _check_exits(outputs, ids.shape[1], step)
    past = [s.name for s in step.input_specs[2:]]
    # the cache's mask: the image's tokens (never padding) after the K tokens in front of them
    before = ids.shape[1] - outputs[LOGITS].shape[1]
    image = outputs[present_name(0, "key")].shape[2] - ids.shape[1]
    mask = np.concatenate([mask[:, :before], np.ones((len(ids), image), np.int64), mask[:, before:]], axis=1)
    return decode(outputs, ids, _decoder_steps(step, past, mask, outputs), max_new_tokens, eos_token_id, pad_token_id,
                  search)


def _check_exits(outputs: dict, prompt: int, step) -> None:
    """Raise an :class:`AttncError` unless ``step`` reads the cache the first step returned (``outputs`` for a prompt
    of ``prompt`` tokens): a first step compiled with ``--token-exit static --exit-layer k`` caches the text alone
    from layer ``k`` on, which a step compiled with the same exit, the same ``P`` image tokens and the same ``K`` text
    tokens in front of them reads (its manifest says; a runner without one is taken at its word)."""
    manifest = getattr(step, "manifest", None)
    if not isinstance(manifest, dict):
        return
    found = _cache_exit(outputs, prompt)
    report = manifest.get("shrink", {}).get("token_exit") or {}
    exits = report.get("mode") == "static" and report.get("exit_layer") != report.get("decoder_layers")
    # K: the text in front of the last image's end (a prompt of several images has one offset per image)
    expected = (report["exit_layer"], report["num_visual_tokens"], VisualLayout.of(
        report["num_visual_tokens"], report["visual_offset"]).text_before_end) if exits else None
    if expected != found:
        def cache(exit):
            return "the image's tokens in every layer" if exit is None else \
                (f"the text alone from layer {exit[0]} on (the image's {exit[1]} tokens after {exit[2]} text tokens "
                 "gone)")
        raise AttncError(f"the first step's cache holds {cache(found)}, but the step was compiled to read "
                         f"{cache(expected)}", "compile both steps with the same --token-exit static --exit-layer K, "
                         "or both without it, exported with the same --text-before-image (a first step with a gate: "
                         "pass the later step compiled both ways, step= and exit_step=)")


def _cache_exit(outputs: dict, prompt: int) -> tuple[int, int, int] | None:
    """``(exit layer, P, K)`` of a first step's caches (``outputs``, for a prompt of ``prompt`` tokens) that lack the
    image's ``P`` tokens from a layer on, ``K`` the text tokens in front of the image; None where every layer holds
    the same tokens."""
    lengths = [outputs[name].shape[2] for name in (present_name(i, "key") for i in range(len(outputs)))
               if name in outputs]
    layer = next((i for i, n in enumerate(lengths) if n < lengths[0]), None)
    return None if layer is None else (layer, lengths[0] - lengths[layer], prompt - outputs[LOGITS].shape[1])


def _carried(past, outputs: dict, rows: np.ndarray | None = None) -> dict:
    """The next step's cache inputs (named ``past``): the ``present`` outputs of the step before, row ``i``
    from its row ``rows[i]`` (beam search reorders and expands them)."""
    if rows is None:
        return {name: outputs[_PRESENT + name[len(_PAST):]] for name in past}
    return {name: outputs[_PRESENT + name[len(_PAST):]][rows] for name in past}


def _empty_cache_shape(spec, batch: int) -> tuple[int, ...]:
    """``[batch, heads, 0, dim]`` for a past input declared ``[batch, heads, past, dim]``."""
    shape = list(spec.shape)
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])) or not spec.name.startswith(_PAST):
        raise AttncError(f"input {spec.name} {shape} is no [batch, heads, past, dim] KV cache",
                         "export the checkpoint with `attnc export CKPT --with-past`")
    return batch, shape[1], 0, shape[3]
