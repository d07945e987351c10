"""Greedy generation with a compiled generation step that carries its KV cache.

``attnc export CKPT --with-past`` exports a decoder-only checkpoint's step as one graph (see
:class:`attnc.models.hf_checkpoint.CachedStep`)::

    (input_ids [B, T], attention_mask [B, P+T], past_key_values.0.key [B, H, P, Dk],
     past_key_values.0.value [B, H, P, Dv], ...)
        -> (logits [B, T, vocab], present.0.key [B, H, P+T, Dk], present.0.value, ...)

The names here are that contract; :func:`generate` runs it on any backend's runner: the prompt with
an empty cache (``P = 0``), then one token per step with the cache the previous step returned, as
transformers' ``generate`` runs the model. numpy only: an application that embeds the artefact needs
neither torch nor transformers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from attnc.compiler.errors import AttncError

IDS = "input_ids"
MASK = "attention_mask"
LOGITS = "logits"
_PAST = "past_key_values."
_PRESENT = "present."


def past_name(layer: int, kind: str) -> str:
    """The input holding layer ``layer``'s cached ``kind`` (``"key"`` or ``"value"``)."""
    return f"{_PAST}{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    """The output holding layer ``layer``'s ``kind`` cache after the step: the past and the step's tokens."""
    return f"{_PRESENT}{layer}.{kind}"


def is_cached_step(input_names) -> bool:
    """Whether a graph with these inputs is a generation step with its KV cache."""
    names = list(input_names)
    return names[:3] == [IDS, MASK, past_name(0, "key")]


def generate(runner, input_ids, attention_mask=None, max_new_tokens: int = 16,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
    """Greedy decoding (the most likely token at every step) with a cached-step artefact.

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
        AttncError: the runner is no cached step, or the prompts and mask disagree in shape.
    """
    names = [s.name for s in runner.input_specs]
    if not is_cached_step(names):
        raise AttncError(f"this artefact takes {names[:3]}, not a generation step with its KV cache",
                         "export the checkpoint with `attnc export CKPT --with-past` and compile that")
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
    if ids.ndim != 2 or mask.shape != ids.shape:
        raise AttncError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} are no [batch, seq] pair",
                         "pass prompts [batch, seq], padded on the left, and their mask of the same shape")
    ends = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id), dtype=np.int64)
    pad = (ends[0] if len(ends) else 0) if pad_token_id is None else pad_token_id
    past = {s.name: np.zeros(_empty_cache_shape(s, len(ids)), dtype=s.dtype) for s in runner.input_specs[2:]}
    tokens, step, done = ids, ids, np.zeros(len(ids), dtype=bool)
    for _ in range(max_new_tokens):
        outputs = runner.infer({IDS: step, MASK: mask, **past})
        chosen = outputs[LOGITS][:, -1].argmax(-1).astype(np.int64)
        if len(ends):
            chosen = np.where(done, pad, chosen)
            done |= np.isin(chosen, ends)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), dtype=np.int64)], axis=1)
        past = {name: outputs[_PRESENT + name[len(_PAST):]] for name in past}
        step = chosen[:, None]
        if done.all():
            break
    return tokens


def _empty_cache_shape(spec, batch: int) -> tuple[int, ...]:
    """``[batch, heads, 0, dim]`` for a past input declared ``[batch, heads, past, dim]``."""
    shape = list(spec.shape)
    if len(shape) != 4 or not all(isinstance(d, int) for d in (shape[1], shape[3])) or not spec.name.startswith(_PAST):
        raise AttncError(f"input {spec.name} {shape} is no [batch, heads, past, dim] KV cache",
                         "export the checkpoint with `attnc export CKPT --with-past`")
    return batch, shape[1], 0, shape[3]
