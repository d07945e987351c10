"""Scoring and pruning together: :func:`select_heads_iteratively` (prune a few heads, re-score the rest),
:func:`apply`, what ``attnc compile --prune-heads`` runs (with random calibration inputs when none are given), and
:func:`apply_keep`, what ``attnc compile --prune-keep`` runs: the heads another export's pruning kept
(:class:`KeepPlan`, e.g. a plain export's, for its generation step)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from attnc.compiler.errors import AttncError, read_json
from attnc.compiler.onnx_io import on_stand_in_weights
from attnc.passes.prune_heads.layers import _prepared, find_attention_layers
from attnc.passes.prune_heads.rewrite import (GRANULARITIES, PruneReport, _check_groups, _groups, _prune_count,
                                              _unit_sizes, kept_cache_feeds, kept_cache_heads, layer_fingerprint,
                                              prune_heads, select_heads)
from attnc.passes.prune_heads.scores import score_heads

log = logging.getLogger(__name__)

# Random calibration inputs (no --calibration): batch, and every other named dynamic size.
CALIBRATION_BATCH, CALIBRATION_TOKENS = 8, 16


@on_stand_in_weights
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


@on_stand_in_weights
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
    inputs = {i.name for i in model.graph.input}
    cache = next(((l, name, role) for l in layers for name, (_, _, role) in l.interface.items() if name in inputs),
                 None)
    if cache is not None and method != "weight" and not calibration_feeds:
        layer, name, role = cache
        raise AttncError(f"layer {layer.index}: its {role} extends the cache input {name!r}, so this is a generation "
                         "step: scoring its heads on random inputs would rank them by what they do with a random cache",
                         "prune the plain export (attnc compile model.onnx -o out/ --prune-heads ...) and prune the "
                         "step to the same heads: attnc compile step.onnx --prune-keep out/ (or score on real "
                         "prompts' caches: --calibration)")
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


@dataclass
class KeepPlan:
    """Heads to keep per attention layer, chosen on one export of a model for another (its generation step).

    Attributes:
        keep: ``{layer: [head, ...]}`` (layers not named keep all).
        granularity: ``"group"`` or ``"query"`` where the plan records it, else None (read from the heads kept).
        layers: the layers of the export it was made on, as a :class:`PruneReport` lists them (``index``,
            ``heads_before``, ``kv_heads_before``, ``fingerprint``), or None for a bare ``{layer: [heads]}``.
        source: where it was read from (for messages).
    """

    keep: dict[int, list[int]]
    granularity: str | None = None
    layers: list[dict] | None = None
    source: str = "the keep plan"

    @classmethod
    def from_report(cls, report: dict, source: str = "the prune report") -> KeepPlan:
        """The heads a :class:`PruneReport` (``report.to_dict()``, a manifest's ``shrink.prune_heads``) kept."""
        layers = report.get("layers")
        if not isinstance(layers, list) or not all(isinstance(l, dict) and "index" in l and "kept" in l
                                                   for l in layers):
            raise AttncError(f"{source} lists no layers with the heads they kept",
                             "pass the artefact (or manifest.json) of an `attnc compile --prune-heads`")
        return cls({int(l["index"]): [int(h) for h in l["kept"]] for l in layers}, report.get("granularity"),
                   layers, source)


def load_keep_plan(path: str | Path) -> KeepPlan:
    """A :class:`KeepPlan` from ``path``: a compiled artefact directory or its ``manifest.json`` (the heads its
    ``--prune-heads`` kept), a prune report saved as JSON (``PruneReport.to_dict()``), or JSON ``{layer: [heads]}``.

    Raises:
        AttncError: the file is missing or not JSON, the artefact was compiled without head pruning, or the JSON is
            none of those.
    """
    file, data = read_json(path, "manifest.json", "a keep plan",
                           "pass a compiled artefact directory, its manifest.json, or JSON {layer: [heads]}")
    if isinstance(data, dict) and "schema" in data:   # an artefact's manifest
        report = (data.get("shrink") or {}).get("prune_heads")
        if report is None:
            raise AttncError(f"{file} records no head pruning (compiled without --prune-heads)",
                             "pass the artefact of an `attnc compile --prune-heads` of the same model")
        return KeepPlan.from_report(report, str(file))
    if isinstance(data, dict) and data.get("pass") == "prune_heads":
        return KeepPlan.from_report(data, str(file))
    try:
        keep = {int(k): [int(h) for h in v] for k, v in data.items()}
    except (AttributeError, TypeError, ValueError):
        raise AttncError(f"{file} is no keep plan: neither an attnc manifest nor JSON {{layer: [heads]}}",
                         'write e.g. {"0": [0, 2], "1": [1, 2, 3]}, or pass a compiled artefact directory') from None
    return KeepPlan(keep, source=str(file))


@on_stand_in_weights
def apply_keep(model: onnx.ModelProto, plan: KeepPlan | dict | str | Path,
               granularity: str | None = None) -> tuple[onnx.ModelProto, PruneReport]:
    """What ``attnc compile --prune-keep PLAN`` runs: prune ``model`` to the heads ``plan`` keeps.

    The plan's layers are found in ``model`` by their fingerprint (:func:`layer_fingerprint`, the output
    projection's weights) where the plan records one: a plain export's plan then prunes the same heads of the
    model's generation step (``--with-past``), whichever exporter made either. A plan without fingerprints
    (``{layer: [heads]}``, an older manifest) is applied by layer index, after checking that a report's layers
    and head counts are ``model``'s.

    Args:
        model: the ONNX model to prune (not modified).
        plan: a :class:`KeepPlan`, ``{layer: [heads]}``, or a path :func:`load_keep_plan` reads.
        granularity: for a plan that records none: ``"group"`` or ``"query"``; default: read from the heads kept
            (whole K/V groups, else the same number of query heads in every group).

    Raises:
        AttncError: a plan layer that prunes heads matches no layer of ``model`` (a plan for another model), layer
            counts or head counts differ, or anything :func:`prune_heads` raises for the heads.
    """
    if not isinstance(plan, KeepPlan):
        plan = load_keep_plan(plan) if isinstance(plan, (str, Path)) else \
            KeepPlan({int(i): [int(h) for h in kept] for i, kept in plan.items()})
    model = _prepared(model)
    layers = find_attention_layers(model)
    keep = _matched_keep(model, layers, plan)
    granularity = plan.granularity or granularity or _granularity_of(layers, keep)
    if granularity not in GRANULARITIES:
        raise AttncError(f"{plan.source} records an unknown granularity {granularity!r}",
                         f"use one of {', '.join(GRANULARITIES)}")
    return prune_heads(model, keep=keep, granularity=granularity)


def _matched_keep(model, layers, plan: KeepPlan) -> dict[int, list[int]]:
    """``plan.keep`` keyed by ``model``'s layer indices (see :func:`apply_keep`)."""
    if not plan.layers:
        return plan.keep
    fix = "make the plan on an export of the same checkpoint (attnc compile model.onnx --prune-heads ...)"
    if not all(l.get("fingerprint") for l in plan.layers):
        planned = [l.get("heads_before") for l in plan.layers]
        ours = [l.heads for l in layers]
        if planned != ours:
            raise AttncError(f"{plan.source} was made on {len(planned)} attention layers of {planned} heads, this "
                             f"model has {len(ours)} of {ours}: it is another model's plan", fix)
        return plan.keep
    found = {}
    for l in layers:
        found.setdefault(layer_fingerprint(model, l), []).append(l)
    keep = {}
    for planned in plan.layers:
        kept = plan.keep[int(planned["index"])]
        candidates = found.get(planned["fingerprint"]) or []
        if not candidates:
            if len(kept) < int(planned.get("heads_before", len(kept))):
                raise AttncError(f"layer {planned['index']} of {plan.source} (output projection "
                                 f"{planned['fingerprint']}) matches no attention layer of this model: the plan was "
                                 "made on another model (or this one is pruned already)", fix)
            continue   # keeps all its heads: nothing to apply
        layer = candidates.pop(0)   # a module shared by several layers (ALBERT): the same fingerprint, in order
        if (layer.heads, layer.kv_heads) != (planned.get("heads_before"), planned.get("kv_heads_before")
                                             or planned.get("heads_before")):
            raise AttncError(f"layer {planned['index']} of {plan.source} has {planned.get('heads_before')} heads "
                             f"({planned.get('kv_heads_before')} K/V heads), its match in this model, layer "
                             f"{layer.index}, {layer.heads} ({layer.kv_heads})", fix)
        keep[layer.index] = kept
    unmatched = [l.index for ls in found.values() for l in ls]
    if unmatched:
        log.warning("prune_heads: attention layers %s are not in %s; they keep all their heads", unmatched,
                    plan.source)
    return keep


def _granularity_of(layers, keep: dict[int, list[int]]) -> str:
    """``"group"`` where ``keep`` keeps whole K/V groups in every grouped-query layer, else ``"query"``
    (which :func:`prune_heads` then checks)."""
    by_index = {l.index: l for l in layers}
    for i, kept in keep.items():
        if i in by_index:
            try:
                _check_groups(by_index[i], kept, "group")
            except AttncError:
                return "query"
    return "group"


def kept_cache_runs(reference: Callable[[dict], dict], infer: Callable[[dict], dict], report: dict | None
                    ) -> tuple[Callable[[dict], dict], Callable[[dict], dict]] | None:
    """``reference`` and ``infer`` (``feeds -> {output: array}``) for validating a generation step pruned as ``report``
    says against its unpruned model (:func:`kept_cache_heads`): ``infer`` gets the kept heads of the unpruned
    step's cache feeds, ``reference`` returns only the kept heads of its new cache. None where ``report`` pruned no
    cache.

    Raises:
        AttncError: (when run) a cache feed has another head count than the unpruned step's (the pruned step's
            feeds: the unpruned model cannot take them).
    """
    cache = kept_cache_heads(report)
    if not cache:
        return None

    def kept(arrays: dict) -> dict:
        out = dict(arrays)
        for name, (axis, count, heads) in cache.items():
            if name in out:
                value = out[name] = np.asarray(out[name])
                if value.ndim <= axis or value.shape[axis] != count:
                    raise AttncError(f"{name} of shape {list(value.shape)} is no cache of the unpruned step ({count} "
                                     f"heads on axis {axis}, of which the pruned step keeps {heads})",
                                     "give inputs of the checkpoint's step: validation feeds the pruned step their "
                                     "kept heads")
        return kept_cache_feeds(out, cache)

    return (lambda feeds: kept(reference(feeds))), (lambda feeds: infer(kept(feeds)))
