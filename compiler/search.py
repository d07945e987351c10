"""How the next token is chosen: greedy, sampling and beam search over a compiled step's logits.

numpy only, as :mod:`attnc.compiler.decode` that runs the steps. The options and their meaning are
transformers' (``generate(num_beams=4, length_penalty=2.0, ...)``, ``generation_config.json``), so that a
checkpoint's settings decode to the tokens transformers' ``generate`` gives for them:

* the logits processors, applied in transformers' order: ``repetition_penalty``, ``no_repeat_ngram_size``,
  ``min_new_tokens`` / ``min_length``, ``forced_bos_token_id``, ``forced_eos_token_id``, ``suppress_tokens``,
  ``begin_suppress_tokens``; with ``do_sample`` then ``temperature``, ``top_k`` and ``top_p``;
* greedy decoding and multinomial sampling (``do_sample``; ``seed`` makes it repeatable);
* beam search (``num_beams > 1``) with ``length_penalty``, ``early_stopping`` (``True``, ``False`` or
  ``"never"``) and ``num_return_sequences``, and beam sampling (``num_beams > 1`` and ``do_sample``).

A decoding loop sees the step through ``next_step(tokens, rows)``: run the step on one new token per row,
the cache of row ``i`` taken from row ``rows[i]`` of the step before (``None``: row ``i``'s own). Only the
first call may change the number of rows (beams and samples expand the prompt's); later ones reorder rows
among copies of one prompt, so what is fixed per prompt (an encoder's output) need not move.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from attnc.compiler.errors import AttncError, read_json

LOGITS = "logits"   # the steps' output the tokens are chosen from (attnc.compiler.decode's contract)
# transformers' stand-in for minus infinity in beam scores (float32, as its beam search computes them).
_NEG = np.float32(-1.0e9)


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How tokens are chosen; fields and defaults as transformers' ``GenerationConfig``.

    ``top_k`` (default 50, as transformers') and ``top_p`` and ``temperature`` act only with
    ``do_sample``. ``min_length`` counts the prompt (the decoder's start token for encoder-decoder
    models), ``min_new_tokens`` does not.
    """

    num_beams: int = 1
    num_return_sequences: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    min_length: int = 0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | Sequence[int] | None = None
    suppress_tokens: Sequence[int] | None = None
    begin_suppress_tokens: Sequence[int] | None = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.num_beams, int) or self.num_beams < 1:
            problems.append(f"num_beams={self.num_beams!r} (an int >= 1)")
        if not isinstance(self.num_return_sequences, int) or self.num_return_sequences < 1:
            problems.append(f"num_return_sequences={self.num_return_sequences!r} (an int >= 1)")
        elif self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            problems.append(f"num_return_sequences={self.num_return_sequences} (at most num_beams={self.num_beams})")
        elif self.num_beams == 1 and not self.do_sample and self.num_return_sequences != 1:
            problems.append(f"num_return_sequences={self.num_return_sequences} (greedy decoding returns one; "
                            "sample or use beams)")
        if self.early_stopping not in (True, False, "never"):
            problems.append(f"early_stopping={self.early_stopping!r} (True, False or 'never')")
        if not self.temperature > 0:
            problems.append(f"temperature={self.temperature!r} (> 0)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            problems.append(f"top_k={self.top_k!r} (an int >= 0; 0 or None: off)")
        if not 0 <= self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} (in [0, 1])")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} (> 0)")
        if not isinstance(self.no_repeat_ngram_size, int) or self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size!r} (an int >= 0)")
        if problems:
            raise AttncError("bad generation options: " + "; ".join(problems),
                             "pass values in the ranges named (they mean what transformers' GenerationConfig says)")


# generation_config.json fields that choose no token (or that generate's own arguments carry).
_NOT_OPTIONS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length",
                "max_new_tokens", "use_cache", "transformers_version", "_from_model_config", "return_dict_in_generate",
                "output_scores", "output_logits", "output_attentions", "output_hidden_states", "cache_implementation"}
# Fields whose default chooses nothing: set to these they may stay in a config.
_NEUTRAL = {"typical_p": 1.0, "diversity_penalty": 0.0, "num_beam_groups": 1, "encoder_repetition_penalty": 1.0,
            "encoder_no_repeat_ngram_size": 0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "min_p": None,
            "bad_words_ids": None, "renormalize_logits": False, "remove_invalid_values": False,
            "exponential_decay_length_penalty": None, "sequence_bias": None, "guidance_scale": None,
            "low_memory": None, "watermarking_config": None, "constraints": None, "force_words_ids": None,
            "penalty_alpha": None, "top_h": None, "token_healing": False, "dola_layers": None}


def generation_options(path: str | Path) -> dict:
    """A checkpoint's ``generation_config.json`` (or that file itself) as keyword arguments of
    :func:`attnc.compiler.decode.generate` / ``generate_seq2seq``: the :class:`GenerationOptions` fields it
    sets, ``eos_token_id``, ``pad_token_id`` and, for an encoder-decoder model, ``decoder_start_token_id``.
    ``max_length`` is left out: pass ``max_new_tokens``.

    Raises:
        AttncError: no such file, not JSON, or it sets an option attnc does not implement (named).
    """
    path = Path(path).expanduser()
    file, config = read_json(path, "generation_config.json", "generation options",
                             "pass a checkpoint directory with a generation_config.json, or that file")
    if not isinstance(config, dict):
        raise AttncError(f"{file} holds no generation options (a JSON object)", "pass a generation_config.json")
    fields = {f.name for f in dataclasses.fields(GenerationOptions)}
    unknown = sorted(k for k, v in config.items()
                     if k not in fields and k not in _NOT_OPTIONS and (k not in _NEUTRAL or v != _NEUTRAL[k]))
    if unknown:
        raise AttncError(f"{file} sets generation options attnc does not implement: "
                         + ", ".join(f"{k}={config[k]!r}" for k in unknown),
                         "remove them from a copy of the file, or decode with transformers")
    options = {k: v for k, v in config.items() if k in fields}
    GenerationOptions(**options)   # checks the values
    for key in ("eos_token_id", "pad_token_id") + (("decoder_start_token_id",) if _encoder_decoder(path) else ()):
        if config.get(key) is not None:
            options[key] = config[key]
    return options


def _encoder_decoder(path: Path) -> bool:
    """Whether the checkpoint next to ``path`` is an encoder-decoder model (its config.json says so)."""
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        return bool(json.loads(config.read_text()).get("is_encoder_decoder"))
    except (OSError, ValueError):
        return False


# ----------------------------------------------------------------------------- logits processors

def process(scores: np.ndarray, tokens: np.ndarray, prompt: int, max_length: int, ends: np.ndarray,
            options: GenerationOptions, min_keep: int = 1) -> np.ndarray:
    """The next-token ``scores [rows, vocab]`` (logits, or log-probabilities in beam search) after
    ``options``' processors, given each row's ``tokens [rows, length]`` so far (``prompt`` of them the
    prompt) and a generation ending at ``max_length`` tokens. ``min_keep``: tokens sampling filters
    keep at least (beam sampling keeps an end token and one more)."""
    scores = np.array(scores, dtype=np.float32)
    length = tokens.shape[1]
    if options.repetition_penalty != 1.0:
        seen = np.take_along_axis(scores, tokens, axis=1)
        seen = np.where(seen < 0, seen * options.repetition_penalty, seen / options.repetition_penalty)
        np.put_along_axis(scores, tokens, seen.astype(np.float32), axis=1)
    if options.no_repeat_ngram_size:
        for row, banned in enumerate(_repeated_ngrams(tokens, options.no_repeat_ngram_size)):
            scores[row, banned] = -np.inf
    if len(ends) and (length < options.min_length or length - prompt < options.min_new_tokens):
        scores[:, ends] = -np.inf
    if options.forced_bos_token_id is not None and length == 1:
        scores[:] = -np.inf
        scores[:, options.forced_bos_token_id] = 0
    forced_eos = _ids(options.forced_eos_token_id)
    if len(forced_eos) and length == max_length - 1:
        scores[:] = -np.inf
        scores[:, forced_eos] = 0
    if options.suppress_tokens:
        scores[:, _ids(options.suppress_tokens)] = -np.inf
    # transformers starts the suppression one token later when the first token is forced
    begin = prompt + (prompt == 1 and options.forced_bos_token_id is not None)
    if options.begin_suppress_tokens and length == begin:
        scores[:, _ids(options.begin_suppress_tokens)] = -np.inf
    if options.do_sample:
        scores = _warp(scores, options, min_keep)
    return scores


def _ids(value) -> np.ndarray:
    return np.array([] if value is None else np.atleast_1d(value), dtype=np.int64)


def _repeated_ngrams(tokens: np.ndarray, n: int) -> list[list[int]]:
    """Per row, the tokens that would repeat an n-gram the row already holds (transformers'
    ``NoRepeatNGramLogitsProcessor``: the last ``n - 1`` tokens as prefix)."""
    banned = []
    for row in tokens.tolist():
        if len(row) + 1 < n:
            banned.append([])
            continue
        prefix = tuple(row[len(row) - n + 1:])
        banned.append([row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned


def _warp(scores: np.ndarray, options: GenerationOptions, min_keep: int) -> np.ndarray:
    """Sampling's filters, as transformers' warpers: temperature, then top-k, then top-p (nucleus)."""
    if options.temperature != 1.0:
        scores = scores / np.float32(options.temperature)
    vocab = scores.shape[-1]
    if options.top_k:
        k = min(max(options.top_k, min_keep), vocab)
        kth = -np.partition(-scores, k - 1, axis=-1)[:, k - 1:k]
        scores = np.where(scores < kth, -np.inf, scores).astype(np.float32)
    if options.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")                   # ascending
        ranked = np.take_along_axis(scores, order, axis=-1)
        cumulative = np.cumsum(_softmax(ranked), axis=-1)
        drop = cumulative <= 1 - options.top_p
        drop[:, vocab - min_keep:] = False
        removed = np.zeros_like(drop)
        np.put_along_axis(removed, order, drop, axis=-1)
        scores = np.where(removed, -np.inf, scores).astype(np.float32)
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities (computed in float64) of ``logits [rows, vocab]``."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))).astype(np.float32)


def _draw(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row, drawn from ``probabilities [rows, vocab]`` (inverse CDF)."""
    cdf = np.cumsum(probabilities, axis=-1)
    u = rng.random((len(cdf), 1)) * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), probabilities.shape[-1] - 1).astype(np.int64)


# ----------------------------------------------------------------------------- decoding loops

NextStep = Callable[[np.ndarray, "np.ndarray | None"], dict]


def decode(outputs: dict, tokens: np.ndarray, next_step: NextStep, max_new_tokens: int,
           eos_token_id=None, pad_token_id: int | None = None, options: GenerationOptions | None = None
           ) -> np.ndarray:
    """``tokens [B, prompt]`` and up to ``max_new_tokens`` more per row, chosen from the step's logits:
    ``outputs`` is the step on the prompt, ``next_step(chosen, rows)`` runs it on the chosen tokens.

    Returns ``[B * num_return_sequences, prompt + n]`` int64, each row's sequences together, as
    transformers' ``generate`` returns them."""
    options = options or GenerationOptions()
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise AttncError(f"max_new_tokens={max_new_tokens!r}", "pass an int >= 1")
    ends = _ids(eos_token_id)
    if options.num_beams > 1:
        return _beam_search(outputs, tokens, next_step, max_new_tokens, ends, pad_token_id, options)
    return _one_by_one(outputs, tokens, next_step, max_new_tokens, ends, pad_token_id, options)


def _one_by_one(outputs, tokens, next_step, max_new_tokens, ends, pad_token_id, options):
    """Greedy decoding or sampling: one token per row per step. A row that produced an end token gets
    ``pad_token_id`` (default: the first end token) from then on; decoding stops once every row has."""
    pad = (ends[0] if len(ends) else 0) if pad_token_id is None else pad_token_id
    prompt = tokens.shape[1]
    rows = None
    if options.num_return_sequences > 1:   # sampling: each prompt's sequences are drawn independently
        rows = np.repeat(np.arange(len(tokens)), options.num_return_sequences)
        tokens = tokens[rows]
    rng = np.random.default_rng(options.seed)
    logits = outputs[LOGITS][:, -1] if rows is None else outputs[LOGITS][rows, -1]
    done = np.zeros(len(tokens), dtype=bool)
    for count in range(1, max_new_tokens + 1):
        scores = process(logits, tokens, prompt, prompt + max_new_tokens, ends, options)
        chosen = _draw(_softmax(scores), rng) if options.do_sample else scores.argmax(-1).astype(np.int64)
        if len(ends):
            chosen = np.where(done, pad, chosen)
            done |= np.isin(chosen, ends)
        tokens = np.concatenate([tokens, chosen[:, None]], axis=1)
        if done.all() or count == max_new_tokens:
            break
        logits = next_step(chosen, rows)[LOGITS][:, -1]
        rows = None
    return tokens


def _beam_search(outputs, tokens, next_step, max_new_tokens, ends, pad_token_id, options):
    """transformers' beam search (``GenerationMixin._beam_search``), on numpy, in its float32 arithmetic.

    Each step keeps the ``K = max(2, 1 + ends) * beams`` best continuations of all beams (sampled
    without replacement with ``do_sample``): those that end (an end token, or ``max_length``) and rank
    among the first ``beams`` become finished hypotheses, scored by their summed log-probability over
    ``generated ** length_penalty``; the best ``beams`` that do not end run on. A row stops once its
    ``beams`` finished hypotheses cannot be beaten (``early_stopping``), every running beam ended, or
    ``max_length`` is reached."""
    batch, prompt = tokens.shape
    beams, lp, stopping = options.num_beams, options.length_penalty, options.early_stopping
    max_length = prompt + max_new_tokens
    keep = max(2, 1 + len(ends)) * beams
    # transformers' fill for finished sequences shorter than the longest returned one (`pad or eos[0]`,
    # so a pad id of 0 fills with the end token; without end tokens no sequence ends early).
    fill = (pad_token_id or ends[0]) if len(ends) else -1
    rng = np.random.default_rng(options.seed)
    running = np.repeat(tokens, beams, axis=0).reshape(batch, beams, prompt)
    running_scores = np.zeros((batch, beams), dtype=np.float32)
    running_scores[:, 1:] = _NEG     # only the first beam's continuations at the first step
    finished = np.full((batch, beams, max_length), fill, dtype=np.int64)
    finished_scores = np.full((batch, beams), _NEG, dtype=np.float32)
    finished_length = np.zeros((batch, beams), dtype=np.int64)
    is_finished = np.zeros((batch, beams), dtype=bool)
    improvable = np.ones(batch, dtype=bool)
    source_rows = np.repeat(np.arange(batch), beams)   # the prompt ran once per row: expand its cache
    logits = outputs[LOGITS][source_rows, -1]
    first_k = np.arange(keep) < beams
    for length in range(prompt, max_length):
        vocab = logits.shape[-1]
        log_probs = process(log_softmax(logits), running.reshape(batch * beams, length), prompt, max_length, ends,
                            options, min_keep=1 + max(len(ends), 1) if options.do_sample else 1)
        total = (log_probs.reshape(batch, beams, vocab) + running_scores[:, :, None]).reshape(batch, beams * vocab)
        if options.do_sample:   # Gumbel top-k: K draws without replacement from softmax(total)
            choice = _top(total.astype(np.float64) + rng.gumbel(size=total.shape), keep)
        else:
            choice = _top(total, keep)
        scores = np.take_along_axis(total, choice, axis=1)
        beam, token = choice // vocab, choice % vocab
        candidates = np.concatenate([np.take_along_axis(running, beam[:, :, None], axis=1), token[:, :, None]], axis=2)
        ends_here = np.isin(token, ends) | (length + 1 >= max_length)

        live = scores + ends_here.astype(np.float32) * _NEG
        best = _top(live, beams)
        running = np.take_along_axis(candidates, best[:, :, None], axis=1)
        running_scores = np.take_along_axis(live, best, axis=1)
        parents = np.take_along_axis(beam, best, axis=1)

        final = scores / np.float32((length + 1 - prompt) ** lp)
        final += (is_finished.all(axis=1, keepdims=True) & (stopping is True)).astype(np.float32) * _NEG
        final += (~improvable[:, None]).astype(np.float32) * _NEG
        new = ends_here & first_k
        final += (~new).astype(np.float32) * _NEG
        padded = np.full((batch, keep, max_length), fill, dtype=np.int64)
        padded[:, :, :length + 1] = candidates
        merged = np.concatenate([finished_scores, final], axis=1)
        pick = _top(merged, beams)
        finished = np.take_along_axis(np.concatenate([finished, padded], axis=1), pick[:, :, None], axis=1)
        finished_scores = np.take_along_axis(merged, pick, axis=1)
        finished_length = np.take_along_axis(
            np.concatenate([finished_length, np.full((batch, keep), length + 1)], axis=1), pick, axis=1)
        is_finished = np.take_along_axis(np.concatenate([is_finished, new], axis=1), pick, axis=1)

        # transformers' stopping heuristic: can the best running beam still beat the worst finished one?
        generated = (max_length if stopping == "never" and lp > 0 else length + 1) - prompt
        best_possible = running_scores[:, 0] / np.float32(generated ** lp)
        worst = np.where(is_finished, finished_scores.min(axis=1, keepdims=True), _NEG)
        improvable &= (best_possible[:, None] > worst).any(axis=1)
        if not improvable.any() or (is_finished.all() and stopping is True) or ends_here.all():
            break
        rows = source_rows[(np.arange(batch)[:, None] * beams + parents).ravel()]
        logits = next_step(running[:, :, -1].ravel(), rows)[LOGITS][:, -1]
        source_rows = np.arange(batch * beams)
    returned = options.num_return_sequences
    longest = finished_length[:, :returned].max()
    return finished[:, :returned, :longest].reshape(batch * returned, longest)


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's ``k`` largest scores, largest first (ties: the lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
