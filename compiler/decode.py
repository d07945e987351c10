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
``--with-past`` (the decoder's later steps, taking those): :func:`generate_seq2seq`. numpy only: an
application that embeds the artefacts needs neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnc.compiler.errors import AttncError

IDS = "input_ids"
DECODER_IDS = "decoder_input_ids"
MASK = "attention_mask"
LOGITS = "logits"
_PAST = "past_key_values."
_PRESENT = "present."
_CROSS = "cross_key_values."


def past_name(layer: int, kind: str) -> str:
    """The input holding layer ``layer``'s cached ``kind`` (``"key"`` or ``"value"``)."""
    return f"{_PAST}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The output holding layer ``layer``'s ``kind`` cache after the step: the past and the step's tokens."""
    return f"{_PRESENT}{layer}.{kind}"


def cross_name(layer: int, kind: str) -> str:
    """An encoder-decoder model's cross-attention ``kind`` of layer ``layer``: computed from the encoder's
    states by the first step, read by every later one."""
    return f"{_CROSS}{layer}.{kind}"


# The first inputs of a decoder-only model's step, and of an encoder-decoder model's later steps.
_DECODER_ONLY_STEP = [IDS, MASK, past_name(0, "key")]
_SEQ2SEQ_STEP = [DECODER_IDS, past_name(0, "key")]


def is_cached_step(input_names) -> bool:
    """Whether a graph with these inputs is a generation step with its KV cache (a decoder-only model's, or
    an encoder-decoder model's later steps)."""
    names = list(input_names)
    return names[:3] == _DECODER_ONLY_STEP or names[:2] == _SEQ2SEQ_STEP


def generate(runner, input_ids, attention_mask=None, max_new_tokens: int = 16,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding (the most likely token at every step) with a decoder-only model's cached step.

    Args:
        runner: a loaded artefact (:func:`attnc.runtime.load`) of a graph exported with ``--with-past``.
        input_ids: ``[B, S]`` prompts, padded on the left to one length.
        attention_mask: ``[B, S]``, 1 for tokens and 0 for padding; all ones when ``None``.
        max_new_tokens: tokens to add to every row.
        eos_token_id: end-of-sequence token(s) (transformers' ``generation_config.eos_token_id``): a row that
            produced one gets ``pad_token_id`` (default: the first end token) from then on; generation stops
            early once every row has.

    Returns:
        ``[B, S + n]`` int64: the prompts and the ``n <= max_new_tokens`` tokens generated, as
        transformers' ``generate(do_sample=False)`` returns them.

    Raises:
        AttncError: the runner is no decoder-only cached step, or the prompts and mask disagree in shape.
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
    empty = {s.name: np.zeros(_empty_cache_shape(s, len(ids)), dtype=s.dtype) for s in runner.input_specs[2:]}
    masks = [mask]

    def next_step(chosen, outputs):
        masks.append(np.ones((len(ids), 1), dtype=np.int64))
        return runner.infer({IDS: chosen[:, None], MASK: np.concatenate(masks, axis=1), **_carried(empty, outputs)})

    return _greedy(runner.infer({IDS: ids, MASK: mask, **empty}), ids, next_step, max_new_tokens, eos_token_id,
                   pad_token_id)


def generate_seq2seq(first, step, inputs, decoder_start_token_id: int, max_new_tokens: int = 16,
                     eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding with an encoder-decoder model's two compiled steps: ``first`` (``attnc export CKPT
    --first-step``: the encoder, the decoder's first token and its cross-attention keys and values), then
    ``step`` (``--with-past``) once per further token, the encoder's work cached.

    Args:
        first, step: loaded artefacts (:func:`attnc.runtime.load`) of those two graphs.
        inputs: the encoder's input (``input_ids [B, S]``, ``input_features``, ...), rows of one length.
        decoder_start_token_id: the token every row's decoding starts with (transformers'
            ``config.decoder_start_token_id``).
        max_new_tokens, eos_token_id, pad_token_id: as :func:`generate`.

    Returns:
        ``[B, 1 + n]`` int64: the start token and the ``n <= max_new_tokens`` tokens generated, as
        transformers' ``generate(do_sample=False)`` returns an encoder-decoder model's output.

    Raises:
        AttncError: the artefacts are no first step and later step of an encoder-decoder model.
    """
    names = [s.name for s in first.input_specs]
    if len(names) != 2 or names[1] != DECODER_IDS or cross_name(0, "key") not in first.output_names:
        raise AttncError(f"the first artefact takes {names} and gives {first.output_names[:3]}, not an encoder-"
                         "decoder model's first generation step", "export it with `attnc export CKPT --first-step`")
    step_names = [s.name for s in step.input_specs]
    if step_names[:2] != _SEQ2SEQ_STEP:
        raise AttncError(f"the step artefact takes {step_names[:2]}, not an encoder-decoder model's later steps",
                         "export it with `attnc export CKPT --with-past`")
    inputs = np.asarray(inputs)
    start = np.full((len(inputs), 1), decoder_start_token_id, dtype=np.int64)
    outputs = first.infer({names[0]: inputs, DECODER_IDS: start})
    cross = {name: value for name, value in outputs.items() if name.startswith(_CROSS)}
    past = [name for name in step_names if name.startswith(_PAST)]

    def next_step(chosen, outputs):
        return step.infer({DECODER_IDS: chosen[:, None], **_carried(past, outputs), **cross})

    return _greedy(outputs, start, next_step, max_new_tokens, eos_token_id, pad_token_id)


def _carried(past, outputs: dict) -> dict:
    """The next step's cache inputs (named ``past``): the ``present`` outputs of the step before."""
    return {name: outputs[_PRESENT + name[len(_PAST):]] for name in past}


def _greedy(outputs: dict, tokens: np.ndarray, next_step, max_new_tokens: int, eos_token_id, pad_token_id
            ) -> np.ndarray:
    """``tokens`` and up to ``max_new_tokens`` more: each the most likely after ``outputs``' last logits, then
    ``next_step(chosen, outputs)`` runs the step for them."""
    ends = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    pad = (ends[0] if len(ends) else 0) if pad_token_id is None else pad_token_id
    done = np.zeros(len(tokens), dtype=bool)
    for count in range(1, max_new_tokens + 1):
        chosen = outputs[LOGITS][:, -1].argmax(-1).astype(np.int64)
        if len(ends):
            chosen = np.where(done, pad, chosen)
            done |= np.isin(chosen, ends)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if done.all() or count == max_new_tokens:
            break
        outputs = next_step(chosen, outputs)
    return tokens


def _empty_cache_shape(spec, batch: int) -> tuple[int, ...]:
    """``[batch, heads, 0, dim]`` for a past input declared ``[batch, heads, past, dim]``."""
    shape = list(spec.shape)
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])) or not spec.name.startswith(_PAST):
        raise AttncError(f"input {spec.name} {shape} is no [batch, heads, past, dim] KV cache",
                         "export the checkpoint with `attnc export CKPT --with-past`")
    return batch, shape[1], 0, shape[3]
