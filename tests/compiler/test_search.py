"""Token choice (compiler/search.py) against transformers' own logits processors and warpers, on random
scores; sampling against the distribution it should draw from. Beam search and sampling through compiled
steps are checked against transformers' ``generate`` in test_hf_checkpoint.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from attnc import runtime
from attnc.compiler.errors import AttncError
from attnc.compiler.search import GenerationOptions, generation_options, process

lp = pytest.importorskip("transformers.generation.logits_process")

VOCAB = 41


def _reference(options: dict, prompt: int, max_length: int, ends: list[int], min_keep: int = 1) -> list:
    """transformers' processors for ``options``, in the order its generate applies them."""
    o = GenerationOptions(**options)
    chain = []
    if o.repetition_penalty != 1.0:
        chain.append(lp.RepetitionPenaltyLogitsProcessor(o.repetition_penalty))
    if o.no_repeat_ngram_size:
        chain.append(lp.NoRepeatNGramLogitsProcessor(o.no_repeat_ngram_size))
    if o.min_length and ends:
        chain.append(lp.MinLengthLogitsProcessor(o.min_length, ends))
    if o.min_new_tokens and ends:
        chain.append(lp.MinNewTokensLengthLogitsProcessor(prompt, o.min_new_tokens, ends))
    if o.forced_bos_token_id is not None:
        chain.append(lp.ForcedBOSTokenLogitsProcessor(o.forced_bos_token_id))
    if o.forced_eos_token_id is not None:
        chain.append(lp.ForcedEOSTokenLogitsProcessor(max_length, o.forced_eos_token_id))
    if o.suppress_tokens:
        chain.append(lp.SuppressTokensLogitsProcessor(o.suppress_tokens))
    if o.begin_suppress_tokens:
        begin = prompt + (prompt == 1 and o.forced_bos_token_id is not None)
        chain.append(lp.SuppressTokensAtBeginLogitsProcessor(o.begin_suppress_tokens, begin))
    if o.do_sample:
        if o.temperature != 1.0:
            chain.append(lp.TemperatureLogitsWarper(o.temperature))
        if o.top_k:
            chain.append(lp.TopKLogitsWarper(o.top_k, min_tokens_to_keep=min_keep))
        if o.top_p < 1.0:
            chain.append(lp.TopPLogitsWarper(o.top_p, min_tokens_to_keep=min_keep))
    return chain


CASES = {
    "repetition": dict(repetition_penalty=1.7),
    "ngrams-2": dict(no_repeat_ngram_size=2),
    "ngrams-3": dict(no_repeat_ngram_size=3, repetition_penalty=0.8),
    "min-length": dict(min_length=9),
    "min-new-tokens": dict(min_new_tokens=3),
    "forced": dict(forced_bos_token_id=5, forced_eos_token_id=[7, 8]),
    "suppress": dict(suppress_tokens=[0, 3, 40], begin_suppress_tokens=[1, 2], forced_bos_token_id=4),
    "top-k": dict(do_sample=True, top_k=6),
    "top-p": dict(do_sample=True, top_k=None, top_p=0.7, temperature=0.6),
    "all-warpers": dict(do_sample=True, top_k=9, top_p=0.85, temperature=1.4, repetition_penalty=1.2),
}


@pytest.mark.parametrize("case", CASES)
def test_processors_match_transformers(case):
    """Every processor, alone and chained, gives transformers' scores (the same -inf entries, the finite
    ones within float32 rounding), over prompts of 1 and 5 tokens at several lengths, so that the
    length-triggered ones (min length, forced tokens, suppression at the start) fire and do not."""
    options = CASES[case]
    rng = np.random.default_rng()
    for prompt in (1, 5):
        for generated in (0, 1, 2, 4, 6):
            length, max_length = prompt + generated, prompt + 7
            tokens = rng.integers(0, 6, size=(5, length))   # a small alphabet: n-grams repeat
            for min_keep in (1, 3):
                scores = rng.normal(scale=3.0, size=(5, VOCAB)).astype(np.float32)
                want = torch.from_numpy(scores.copy())
                for processor in _reference(options, prompt, max_length, [7, 2], min_keep):
                    want = processor(torch.from_numpy(tokens), want)
                got = process(scores, tokens, prompt, max_length, np.array([7, 2]), GenerationOptions(**options),
                              min_keep)
                want = want.numpy()
                np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"{case} {length}")
                finite = np.isfinite(want)
                np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-6)


def test_sampling_draws_the_warped_distribution():
    """Tokens drawn by the decoding loop (one step, many rows) follow softmax of transformers' warped
    scores: each frequency within 5 standard errors, and no token outside top-k/top-p ever drawn."""
    from attnc.compiler.search import decode

    rng = np.random.default_rng()
    logits = rng.normal(scale=2.0, size=(1, 1, VOCAB)).astype(np.float32)
    rows = 40000
    options = dict(do_sample=True, top_k=8, top_p=0.9, temperature=0.8, seed=int(rng.integers(1 << 30)))
    drawn = decode({"logits": np.repeat(logits, rows, axis=0)}, np.zeros((rows, 1), np.int64), None, 1,
                   options=GenerationOptions(**options))[:, 1]
    want = torch.from_numpy(logits[0].copy())
    for processor in _reference(options, 1, 2, []):
        want = processor(None, want)
    p = torch.softmax(want, -1)[0].double().numpy()
    freq = np.bincount(drawn, minlength=VOCAB) / rows
    assert (freq[p == 0] == 0).all(), "drew a token the warpers remove"
    bound = 5 * np.sqrt(p * (1 - p) / rows) + 1e-12
    assert (np.abs(freq - p) <= bound).all(), np.c_[freq, p][np.abs(freq - p) > bound]
    again = decode({"logits": np.repeat(logits, 64, axis=0)}, np.zeros((64, 1), np.int64), None, 1,
                   options=GenerationOptions(**options))
    first = decode({"logits": np.repeat(logits, 64, axis=0)}, np.zeros((64, 1), np.int64), None, 1,
                   options=GenerationOptions(**options))
    np.testing.assert_array_equal(again, first)   # a seed repeats the draws


def test_generation_options_read_a_checkpoints_file(tmp_path):
    """A generation_config.json (transformers writes it with save_pretrained) becomes generate's keyword
    arguments; options attnc does not implement are refused by name, neutral values pass."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GenerationConfig(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3, min_length=5,
                                           early_stopping=True, forced_bos_token_id=0, eos_token_id=2,
                                           pad_token_id=1, decoder_start_token_id=2, max_length=142)
    config.save_pretrained(tmp_path)
    options = generation_options(tmp_path)
    assert options == dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3, min_length=5, early_stopping=True,
                           forced_bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (tmp_path / "config.json").write_text(json.dumps({"is_encoder_decoder": True}))
    assert generation_options(tmp_path / "generation_config.json")["decoder_start_token_id"] == 2
    transformers.GenerationConfig(typical_p=0.9, do_sample=True).save_pretrained(tmp_path)
    with pytest.raises(AttncError, match="typical_p=0.9"):
        generation_options(tmp_path)
    with pytest.raises(AttncError, match="cannot read generation options"):
        generation_options(tmp_path / "missing")


@pytest.mark.parametrize("options,words", [
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=2, num_return_sequences=3), "at most num_beams=2"),
    (dict(num_return_sequences=2), "greedy decoding returns one"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
])
def test_bad_options_are_refused(options, words):
    with pytest.raises(AttncError, match=words):
        GenerationOptions(**options)


def test_generate_refuses_unknown_options():
    class Step:   # a decoder-only step's inputs: generate checks the options before it runs anything
        input_specs = [type("S", (), {"name": n}) for n in ("input_ids", "attention_mask", "past_key_values.0.key")]

    with pytest.raises(AttncError, match="unknown generation option.*beam_width"):
        runtime.generate(Step(), np.zeros((1, 2), np.int64), beam_width=3)
