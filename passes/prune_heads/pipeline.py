"""Scoring and pruning together: :func:`select_heads_iteratively` (prune a few heads, re-score the rest) and
:func:`apply`, what ``attnc compile --prune-heads`` runs (with random calibration inputs when none are given)."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import onnx

from attnc.compiler.errors import AttncError
from attnc.passes.prune_heads.layers import _prepared, find_attention_layers
from attnc.passes.prune_heads.rewrite import PruneReport, _groups, _prune_count, _unit_sizes, prune_heads, select_heads
from attnc.passes.prune_heads.scores import score_heads

log = logging.getLogger(__name__)

# Random calibration inputs (no --calibration): batch, and every other named dynamic size.
CALIBRATION_BATCH, CALIBRATION_TOKENS = 8, 16


def select_heads_iteratively(onnx_model: onnx.ModelProto, calibration_feeds: list[dict[str, np.ndarray]],
                             ratio: float | None = None, count: int | None = None, *, step: int = 1,
                             method: str = "activation", torch_model=None,
                             loss_fn: Callable[[Any, dict], Any] | None = None,
                             granularity: str = "group") -> dict[int, list[int]]:
    """Heads to keep, pruned ``step`` at a time with re-scoring in between (Michel et al. 2019, §4).

    Each round scores the heads still present with the ones already dropped pruned
    (:func:`score_heads` with ``keep=``), then drops the ``step`` globally lowest of them
    (:func:`select_heads`: per-layer normalised except ``"ablation"``, each layer keeps one
    head). A head that takes over a dropped head's job is re-ranked before it goes, which
    one-shot selection cannot do. Costs one scoring pass per round (``"ablation"``: one
    pass over the calibration data per remaining head, i.e. greedy backward elimination).

    Args:
        onnx_model, calibration_feeds, method, torch_model, loss_fn: as for :func:`score_heads`.
        ratio, count: how many heads to remove in all, as for :func:`select_heads`.
        step: heads removed per round (``1``: re-score after every head; rounded up to whole
            units in grouped-query models: a K/V group, or with ``granularity="query"`` one
            query head per group).
        granularity: ``"group"`` or ``"query"``, as for :func:`prune_heads`.

    Returns:
        ``{layer: [head, ...]}`` to keep, for ``prune_heads(onnx_model, keep=...)``.

    Raises:
        AttncError: a bad ratio/count/step, or anything :func:`score_heads` raises.
    """
    layers = find_attention_layers(onnx_model)
    layers_heads = {l.index: l.heads for l in layers}
    groups = _groups(layers)
    sizes = _unit_sizes(layers, granularity)
    target = _prune_count(layers_heads, ratio, count, sizes, granularity)
    if not isinstance(step, (int, np.integer)) or step < 1:
        raise AttncError(f"step must be a whole number of heads >= 1, got {step!r}", "e.g. step=1")
    unit = int(np.gcd.reduce([n for s in sizes.values() for n in s]))
    step = -(-step // unit) * unit   # whole units per round
    keep = {i: list(range(h)) for i, h in layers_heads.items()}
    dropped = 0
    while dropped < target:
        n = min(step, target - dropped)
        scores = score_heads(onnx_model, calibration_feeds, method, torch_model, loss_fn, keep=keep,
                             granularity=granularity)
        left = select_heads({i: len(k) for i, k in keep.items()}, {i: scores[i][k] for i, k in keep.items()}, count=n,
                            normalise=method != "ablation",
                            groups={i: np.asarray(g)[keep[i]] for i, g in groups.items()}, granularity=granularity)
        keep = {i: [keep[i][j] for j in left[i]] for i in keep}
        dropped += n
        log.debug("select_heads_iteratively: %d of %d heads dropped, keep %s", dropped, target, keep)
    return keep


def apply(model: onnx.ModelProto, amount: str | float | int, calibration_feeds: list[dict] | None = None,
          method: str = "activation", seed: int = 0,
          granularity: str = "group") -> tuple[onnx.ModelProto, PruneReport]:
    """What ``attnc compile --prune-heads RATIO|COUNT [--prune-granularity group|query]`` runs.

    Args:
        amount: a ratio in ``(0, 1)`` (``"0.25"``) or a whole number of heads (``"4"``).
        calibration_feeds: batches for scoring; without them, four random batches of 8
            (:func:`attnc.compiler.validate.make_inputs`, logged as a warning: random inputs
            rank heads far worse than real data).
        method: see :func:`score_heads` (``"gradient"`` needs the torch model: not from the CLI).
        granularity: ``"group"`` or ``"query"``, see :func:`prune_heads`.
    """
    text = str(amount).strip()
    try:
        value = float(text)
    except ValueError:
        raise AttncError(f"--prune-heads takes a ratio or a head count, got {amount!r}",
                         "e.g. --prune-heads 0.25 or --prune-heads 4") from None
    ratio, count = (value, None) if not value.is_integer() or "." in text else (None, int(value))
    if (ratio is not None and not 0 < ratio < 1) or (count is not None and count < 1):
        raise AttncError(f"--prune-heads {text} prunes nothing or everything",
                         "give a ratio in (0, 1) such as 0.25, or a head count of at least 1")
    # Prepared once: finding, scoring and pruning each prepare what they get, and fusing MiniMax's blockwise
    # loop proves every block in float64 (seconds per layer); a prepared model passes through as it is.
    model = _prepared(model)
    layers = find_attention_layers(model)   # a count that splits K/V groups fails here, before scoring
    _prune_count({l.index: l.heads for l in layers}, ratio, count, _unit_sizes(layers, granularity), granularity)
    if method != "weight" and not calibration_feeds:
        calibration_feeds = _random_calibration(model, seed)
    scores = score_heads(model, calibration_feeds or [], method=method, granularity=granularity)
    return prune_heads(model, scores, ratio=ratio, count=count, granularity=granularity)


def _random_calibration(model: onnx.ModelProto, seed: int) -> list[dict[str, np.ndarray]]:
    """Four random batches for scoring heads without calibration data: ``batch`` 8 and every other named
    dynamic size (a sequence length, an image grid) 16, token ids below the embedding's rows, masks all
    ones (:func:`attnc.compiler.validate.make_inputs`)."""
    from attnc.compiler.backends.onnxruntime import load
    from attnc.compiler.validate import make_inputs, token_id_bound

    specs = load(model).input_specs
    sizes = {d: CALIBRATION_BATCH if d == "batch" else CALIBRATION_TOKENS
             for spec in specs for d in spec.shape if isinstance(d, str)}
    log.warning("prune_heads: no calibration data, scoring heads on random inputs (%s)",
                ", ".join(f"{d}={n}" for d, n in sizes.items()) or "static shapes")
    int_high = min(100, token_id_bound(model) or 100)   # token ids within the embedding's vocabulary
    try:
        return [make_inputs(specs, seed=seed + i, symbolic_defaults=sizes, int_high=int_high) for i in range(4)]
    except AttncError as exc:
        raise AttncError(f"head scoring needs inputs, and random ones cannot be made for this model ({exc.problem})",
                         "pass calibration inputs: --calibration inputs.npz (keyed by input name)") from None
