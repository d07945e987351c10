"""Choosing the heads to keep and slicing the others out of the graph: :func:`select_heads`, :func:`prune_heads`, its
:class:`PruneReport`, and the edits of weights, shapes and splits per layer."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import on_stand_in_weights
from attnc.passes.core import (collapse_flat_transposes, constant_value, consumers, name_nodes, producers,
                               remove_dead_nodes, toposort)
from attnc.passes.prune_heads.layers import _fused_for_pruning, find_attention_layers
from attnc.passes.prune_heads.model import AttentionLayer, _ChannelOps, _Projection, _replace_input
from attnc.passes.prune_heads.output import _PROVEN_KEEPS
from attnc.passes.prune_heads.shapes import _SHAPES_CACHE, _shape_entries, _shape_input, _shapes, _split_sizes
from attnc.passes.prune_heads.trace import _PROVEN_REGROUPS

log = logging.getLogger(__name__)

# What grouped-query layers lose: whole K/V groups, or the same number of query heads in every group.
GRANULARITIES = ("group", "query")


@dataclass
class LayerPrune:
    """One layer in a :class:`PruneReport`."""

    index: int
    anchor: str
    core: str
    heads_before: int
    heads_after: int
    kept: list[int]
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None
    kv_heads_before: int | None = None   # grouped-query attention: K/V heads (groups of heads / kv_heads)
    kv_heads_after: int | None = None
    # The layer's output projection before pruning (:func:`layer_fingerprint`): finds this layer in another export of
    # the model (its generation step) to prune the same heads there (:func:`attnc.passes.prune_heads.apply_keep`).
    fingerprint: str = ""
    # A generation step's KV cache: {graph input / output: {"axis": heads axis, "heads": the unpruned count there,
    # "kept": the heads of the unpruned tensor it keeps, in its order}} (``past_key_values.N.key``, ``present.N.key``).
    cache: dict[str, dict] | None = None


@dataclass
class PruneReport:
    """What :func:`prune_heads` did; ``flops`` are attention FLOPs (projections + core)."""

    layers: list[LayerPrune]
    params_before: int
    params_after: int
    tokens: int | None
    granularity: str = "group"   # what grouped-query layers lost: whole K/V groups or query heads in them

    @property
    def heads_before(self) -> int:
        return sum(l.heads_before for l in self.layers)

    @property
    def heads_after(self) -> int:
        return sum(l.heads_after for l in self.layers)

    @property
    def attention_flops_before(self) -> int | None:
        values = [l.flops_before for l in self.layers]
        return None if None in values else sum(values)

    @property
    def attention_flops_after(self) -> int | None:
        values = [l.flops_after for l in self.layers]
        return None if None in values else sum(values)

    def to_dict(self) -> dict:
        return {"pass": "prune_heads", "heads_before": self.heads_before, "heads_after": self.heads_after,
                "params_before": self.params_before, "params_after": self.params_after, "tokens": self.tokens,
                "granularity": self.granularity,
                "attention_flops_before": self.attention_flops_before,
                "attention_flops_after": self.attention_flops_after,
                "layers": [asdict(l) for l in self.layers]}


def select_heads(layers_heads: dict[int, int], scores: dict[int, np.ndarray], ratio: float | None = None,
                 count: int | None = None, normalise: bool = True,
                 groups: dict[int, np.ndarray] | None = None, granularity: str = "group") -> dict[int, list[int]]:
    """Heads to keep: drop the globally lowest-scoring units, at least one unit per layer.

    With ``normalise`` scores are divided by their layer's L2 norm (as Michel et al. do) so
    layers with larger activations do not keep all their heads by scale alone; ``"ablation"``
    scores are loss differences, comparable across layers as they are (``normalise=False``).

    ``groups`` (``{layer: [H] K/V head of each query head}``, grouped-query layers) sets a
    layer's units. ``granularity="group"``: its K/V groups; a group scores the sum of its query
    heads' scores and is kept or dropped whole; each layer keeps one group. ``"query"``: rank
    slices across the groups: slice ``k`` holds each group's ``k``-th lowest-scoring query head
    and scores their sum, so dropping ``r`` slices drops each group's ``r`` lowest heads (the
    slices' scores only grow with ``k``, so they go in order); each group keeps one head. Layers
    without grouping (or with one query head per K/V head) have one unit per head either way.

    Raises:
        AttncError: a bad ratio, count or granularity, or a count that is not a whole number of
            units.
    """
    _check_granularity(granularity)
    groups = groups or {}
    units = []   # (score, layer, order within the layer, heads)
    for i, h in layers_heads.items():
        s = np.asarray(scores.get(i), dtype=np.float64)
        if s.shape != (h,):
            raise AttncError(f"scores for layer {i} have shape {s.shape}, the layer has {h} heads",
                             "score with score_heads() on the same model")
        norm = (np.linalg.norm(s) or 1.0) if normalise else 1.0
        owner = np.asarray(groups[i]) if i in groups else np.arange(h)
        members = [[int(j) for j in np.flatnonzero(owner == g)] for g in dict.fromkeys(owner.tolist())]
        if granularity == "query" and i in groups:
            # a grouped layer stays grouped at one query head per K/V head: its one slice is all of
            # its heads, so it can lose no more (its single heads would be whole K/V groups)
            if len({len(m) for m in members}) != 1:
                raise AttncError(f"layer {i}: K/V groups of unequal sizes {[len(m) for m in members]} cannot lose "
                                 "the same number of query heads each", "keep= the same number per group")
            ranked = [sorted(m, key=lambda j: (s[j], j)) for m in members]
            members = [sorted(column) for column in zip(*ranked)]
            units += [(float(s[m].sum()) / norm, i, k, m) for k, m in enumerate(members)]
        else:
            units += [(float(s[m].sum()) / norm, i, m[0], m) for m in members]
    sizes = {i: [len(u[3]) for u in units if u[1] == i] for i in layers_heads}
    count = _prune_count(layers_heads, ratio, count, sizes, granularity)
    units.sort(key=lambda u: u[:3])
    left = {i: sum(u[1] == i for u in units) for i in layers_heads}
    dropped: set[tuple[int, int]] = set()
    for _, i, _, members in units:
        if len(dropped) == count:
            break
        if left[i] > 1 and len(dropped) + len(members) <= count:
            dropped.update((i, j) for j in members)
            left[i] -= 1
    if len(dropped) != count:   # the lowest units overshoot (layers of different unit sizes): search exactly
        dropped = _exact_drop(units, count) or dropped
    if len(dropped) != count:
        unit = ("whole K/V groups (grouped-query layers drop a K/V head with all its query heads)"
                if granularity == "group" else "units of one query head per K/V group")
        raise AttncError(f"cannot prune exactly {count} heads in {unit}", f"prune {len(dropped)} heads, or pass keep=")
    return {i: [j for j in range(h) if (i, j) not in dropped] for i, h in layers_heads.items()}


def _exact_drop(units: list, count: int) -> set[tuple[int, int]] | None:
    """The ``(layer, head)`` pairs of the units (``(score, layer, order, heads)``) to drop whose heads add up
    to exactly ``count`` at the least total score, each layer keeping one unit; None if no choice does.
    For when the lowest-scoring units overshoot: a layer of single heads beside one of K/V groups of two
    (MiniMax's lightning and softmax layers) can drop 4 heads as 2 + 2, not as the 3 lowest singles + 2."""
    layers: dict[int, list] = {}
    for unit in units:
        layers.setdefault(unit[1], []).append(unit)
    best: dict[int, tuple[float, list]] = {0: (0.0, [])}   # heads dropped so far -> (score, units)
    for layer_units in layers.values():
        options: dict[tuple[int, int], tuple[float, list]] = {(0, 0): (0.0, [])}   # (heads, units) in the layer
        for unit in layer_units:
            for (heads, n), (score, chosen) in list(options.items()):
                key = (heads + len(unit[3]), n + 1)
                if key[0] <= count and key[1] < len(layer_units) and \
                        (key not in options or score + unit[0] < options[key][0]):
                    options[key] = (score + unit[0], chosen + [unit])
        combined: dict[int, tuple[float, list]] = {}
        for total, (score, chosen) in best.items():
            for (heads, _), (more, picked) in options.items():
                key = total + heads
                if key <= count and (key not in combined or score + more < combined[key][0]):
                    combined[key] = (score + more, chosen + picked)
        best = combined
    if count not in best:
        return None
    return {(unit[1], j) for unit in best[count][1] for j in unit[3]}


def _prune_count(layers_heads: dict[int, int], ratio: float | None, count: int | None,
                 unit_sizes: dict[int, list[int]] | None = None, granularity: str = "group") -> int:
    """Heads to remove for ``ratio`` (of all heads) or ``count``, a multiple of the units' common
    size; each layer keeps one unit (``unit_sizes``: a head, or in grouped-query layers a K/V group
    of query heads, or with ``granularity="query"`` one query head of each group)."""
    total = sum(layers_heads.values())
    unit_sizes = unit_sizes or {i: [1] * h for i, h in layers_heads.items()}
    unit = int(np.gcd.reduce([n for sizes in unit_sizes.values() for n in sizes]))
    most = total - sum(min(sizes) for sizes in unit_sizes.values())
    grouped = granularity == "group" and any(n > 1 for sizes in unit_sizes.values() for n in sizes)
    other_mode = "; or granularity='query' (--prune-granularity query) to drop query heads inside the groups" \
        if grouped else ""
    if (ratio is None) == (count is None):
        raise AttncError("give exactly one of ratio and count", "e.g. ratio=0.25 or count=4")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise AttncError(f"prune ratio must be in (0, 1), got {ratio}", "e.g. 0.25 prunes a quarter of the heads")
        count = int(round(ratio * total / unit)) * unit   # whole units
    # most == 0: nothing can go at this granularity (a multi-query model pruned by whole groups)
    if not isinstance(count, (int, np.integer)) or count < 0 or count > most or (ratio is not None and most == 0):
        kept = {"group": " K/V group", "query": " query head per K/V group"}[granularity] if unit > 1 else ""
        amount = count if ratio is None else f"a ratio {ratio:g}"
        raise AttncError(f"cannot prune {amount} of {total} heads in {len(layers_heads)} layers",
                         f"prune between 0 and {most} heads (each layer keeps one{kept}){other_mode}")
    if count % unit:
        unit_text = (f"whole K/V groups of {unit} query heads" if granularity == "group" else
                     f"the same number of query heads from each K/V group, in units of {unit} heads")
        raise AttncError(f"cannot prune {count} heads: grouped-query attention prunes {unit_text}",
                         f"prune a multiple of {unit} heads, e.g. {count // unit * unit or unit} "
                         f"or {(count // unit + 1) * unit}{other_mode}")
    return int(count)


@on_stand_in_weights
def prune_heads(onnx_model: onnx.ModelProto, scores: dict[int, np.ndarray] | None = None, *,
                keep: dict[int, list[int]] | None = None, ratio: float | None = None,
                count: int | None = None, tokens: int | None = None,
                granularity: str = "group") -> tuple[onnx.ModelProto, PruneReport]:
    """Physically remove attention heads from an ONNX model.

    Args:
        onnx_model: the model (not modified).
        scores: ``{layer: scores [H]}`` from :func:`score_heads`; with ``ratio`` or
            ``count``, the globally lowest-scoring heads go (see :func:`select_heads`).
        keep: ``{layer: [head, ...]}`` to keep, instead of scores (layers not named keep all).
        ratio: fraction of all heads to remove, in ``(0, 1)``.
        count: number of heads to remove.
        tokens: sequence length for FLOP counts when the graph's is dynamic.
        granularity: what grouped-query layers (``H`` query heads on ``H_kv`` K/V heads, groups
            of ``g``) lose. ``"group"``: whole K/V groups, a K/V head with its ``g`` query heads
            (K/V projections and K/V cache shrink too). ``"query"``: every K/V head stays and each
            group loses the same number of its query heads (``g -> g'``; K/V projections
            untouched; a multi-query layer, ``H_kv = 1``, can only be pruned this way). Layers
            without grouping lose single heads either way.

    Returns:
        ``(pruned model, PruneReport)``; ONNX Runtime runs the pruned model with the same
        inputs and outputs, except that a generation step's KV cache inputs and outputs
        (``past_key_values.N.key``, ``present.N.key``) hold the kept K/V heads (``"query"``: all
        of them), as their declared shapes say (``LayerPrune.cache``: which heads, per layer).

    Raises:
        AttncError: no recognisable attention, a bad ratio/count/granularity, a layer pruned to
            zero heads, head indices out of range, a ``keep`` that is not whole groups / the same
            number of query heads in every group (``"query"``: one group size for the repeat), a
            pruned layer whose cache input another layer reads too.
    """
    _check_granularity(granularity)
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    name_nodes(model)
    collapse_flat_transposes(model)   # so no B·H shape constant stays behind in the pruned model
    model = _fused_for_pruning(model)
    prefix = _name_prefix(model)
    if _unshare_written_sources(model, prefix):
        toposort(model)
    layers = find_attention_layers(model)
    by_index = {l.index: l for l in layers}
    if keep is None:
        if scores is None:
            raise AttncError("prune_heads needs scores (with ratio or count) or keep",
                             "score heads with score_heads() first")
        keep = select_heads({l.index: l.heads for l in layers}, scores, ratio, count, groups=_groups(layers),
                            granularity=granularity)
    elif ratio is not None or count is not None:
        raise AttncError("give keep or ratio/count, not both")
    for i, kept in keep.items():
        if i not in by_index:
            raise AttncError(f"no attention layer {i}", f"layers are 0..{len(layers) - 1}")
        h = by_index[i].heads
        if not kept:
            raise AttncError(f"layer {i} would have no heads left", "keep at least one head per layer")
        if len(set(kept)) != len(kept) or not all(0 <= j < h for j in kept):
            raise AttncError(f"layer {i}: heads to keep {kept} are not distinct indices in [0, {h})")
        _check_groups(by_index[i], kept, granularity)
    _check_shared_interface(layers, keep)
    params_before = _param_count(model)
    report_layers = []
    fingerprints = {l.index: layer_fingerprint(model, l) for l in layers}
    caches = {l.index: _cache_heads(l, sorted(keep.get(l.index, range(l.heads)))) for l in layers}
    layer_params = {l.index: l.params(model) for l in layers}
    layer_flops = {l.index: l.flops(model, tokens=tokens) for l in layers}
    for l in layers:
        kept = sorted(keep.get(l.index, range(l.heads)))
        if len(kept) < l.heads:
            _prune_layer(model, l, kept, prefix)
    _SHAPES_CACHE.clear()
    toposort(model)
    remove_dead_nodes(model)
    del model.graph.value_info[:]  # inferred shapes before pruning would contradict the new ones
    _PROVEN_KEEPS.update({name: kept for l in layers for name, kept in l.kept_reshapes.items()})
    _PROVEN_REGROUPS.update({name: "written" for l in layers for name, *_ in l.head_regroups})
    try:
        after = find_attention_layers(model)
    finally:
        _PROVEN_KEEPS.clear()
        _PROVEN_REGROUPS.clear()
    if [l.heads for l in after] != [len(keep.get(l.index, range(l.heads))) for l in layers]:
        raise AttncError("internal error: the pruned graph's heads do not match the request",
                         "please report this model")
    for l, new in zip(layers, after):
        kept = sorted(keep.get(l.index, range(l.heads)))
        grouped = l.kv_of_head is not None
        report_layers.append(LayerPrune(
            l.index, l.anchor, l.core, l.heads, len(kept), kept, layer_params[l.index], new.params(model),
            layer_flops[l.index], new.flops(model, tokens=tokens), l.kv_heads if grouped else None,
            new.kv_heads if grouped else None, fingerprints[l.index], caches[l.index]))
    report = PruneReport(report_layers, params_before, _param_count(model), tokens or layers[0].tokens, granularity)
    log.info("prune_heads: %d -> %d heads, %d -> %d parameters", report.heads_before, report.heads_after,
             report.params_before, report.params_after)
    return model, report


def layer_fingerprint(model: onnx.ModelProto, layer: AttentionLayer) -> str:
    """A short hash of ``layer``'s output projection matrix (its values, shape and type): the same layer of one model
    in any of its exports (plain, with its attention mask, its generation step; either exporter), another layer or
    model otherwise."""
    return matrix_fingerprint(layer.out_proj.matrix(model))


def matrix_fingerprint(matrix: np.ndarray) -> str:
    """:func:`layer_fingerprint` of an output projection's weight as ``[C_in, C_out]``, from wherever it comes (the
    graph, or a torch module: validation finds the pruned layers' modules by it)."""
    matrix = np.ascontiguousarray(matrix)
    digest = hashlib.sha256(f"{matrix.dtype.str}{matrix.shape}".encode())
    digest.update(matrix.tobytes())
    return digest.hexdigest()[:16]


def _cache_heads(layer: AttentionLayer, kept: list[int]) -> dict[str, dict] | None:
    """What pruning ``layer`` to ``kept`` keeps of each graph input and output holding its heads (a generation step's
    KV cache): ``{name: {"axis": heads axis, "heads": count, "kept": [head of the unpruned tensor, ...]}}``; None
    without any."""
    if not layer.interface:
        return None
    kept_kv = kept if layer.kv_of_head is None else sorted({int(layer.kv_of_head[h]) for h in kept})
    order = _query_order(layer, kept)
    # count is H or H_kv: the query heads (behind a repeat of the K/V heads) where it is not the K/V heads'
    return {name: {"axis": axis, "heads": count, "kept": order if count != layer.kv_heads else kept_kv}
            for name, (axis, count, _) in layer.interface.items()}


def kept_cache_heads(report: dict | None) -> dict[str, tuple[int, int, list[int]]]:
    """``{graph input or output: (heads axis, unpruned head count, kept heads)}`` of the KV cache of a generation
    step pruned as ``report`` (a manifest's ``shrink.prune_heads``) says: which heads of the unpruned step's
    ``past_key_values.N.key`` / ``present.N.key`` the pruned step holds, in its order (validation feeds it those
    heads of the checkpoint's cache and compares those of its new cache, re-scoring feeds it those of the calibration
    caches: :func:`kept_cache_feeds`). Empty for other models."""
    return {name: (int(kept["axis"]), int(kept["heads"]), [int(h) for h in kept["kept"]])
            for layer in (report or {}).get("layers", []) for name, kept in (layer.get("cache") or {}).items()}


def kept_cache_feeds(feeds: dict, cache: dict[str, tuple[int, int, list[int]]]) -> dict:
    """``feeds`` with each cache input :func:`kept_cache_heads` names cut to the heads the pruned step keeps."""
    return {name: np.take(value, cache[name][2], axis=cache[name][0]) if name in cache else value
            for name, value in feeds.items()}


def _check_shared_interface(layers: list[AttentionLayer], keep: dict[int, list[int]]) -> None:
    """Refuse to prune a layer whose cache input or output another layer reads too (a KV cache shared across
    layers): its head count would change under the other layer."""
    owners: dict[str, list[AttentionLayer]] = {}
    for l in layers:
        for name in l.interface:
            owners.setdefault(name, []).append(l)
    for name, sharing in owners.items():
        pruned = [l.index for l in sharing if len(keep.get(l.index, range(l.heads))) < l.heads]
        if len(sharing) > 1 and pruned:
            raise AttncError(f"{name} holds the heads of attention layers {[l.index for l in sharing]} (a cache shared "
                             f"across layers): pruning layer {pruned[0]} would change it under the others",
                             "keep every head of the layers that share a cache")


def _declare_interface_heads(model: onnx.ModelProto, layer: AttentionLayer, kept: list[int],
                             kept_kv: list[int]) -> None:
    """The kept head count on the graph inputs and outputs holding ``layer``'s heads (a generation step's KV cache,
    ``past_key_values.N.key`` / ``present.N.key``): the step's cache holds the kept heads from now on."""
    values = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for name, (axis, count, _) in layer.interface.items():
        dims = values[name].type.tensor_type.shape.dim
        if axis < len(dims):
            dims[axis].Clear()
            dims[axis].dim_value = len(kept) if count != layer.kv_heads else len(kept_kv)


def _unshare_written_sources(model: onnx.ModelProto, prefix: str) -> int:
    """Give each ``ScatterND`` its own copy of what its data or updates are made from where that starts at a
    ``ConstantOfShape`` or ``Expand`` (through Transpose / Reshape / Cast / Identity) and another ``ScatterND``
    reads it: the dynamo exporter shares DeepSeek-V3's empty key between layers, whose head counts pruning rewrites
    layer by layer (:class:`_Shared`). Returns how many it copied; the copies are appended (toposort after)."""
    prod, cons = producers(model), consumers(model)
    copied = 0
    for scatter in [n for n in model.graph.node if n.op_type == "ScatterND"]:
        for i in (0, 2):
            chain, t = [], scatter.input[i]
            while (node := prod.get(t)) is not None and node.op_type in ("Transpose", "Reshape", "Cast", "Identity"):
                chain.append(node)
                t = node.input[0]
            if node is None or node.op_type not in ("ConstantOfShape", "Expand") or not any(
                    c.op_type == "ScatterND" and c is not scatter
                    for n in chain + [node] for c in cons.get(n.output[0], [])):
                continue
            copied += 1
            renamed: dict[str, str] = {}
            for original in reversed(chain + [node]):
                copy = onnx.NodeProto()
                copy.CopyFrom(original)
                copy.name = f"{original.name}.{prefix}copy{copied}"
                copy.input[0] = renamed.get(copy.input[0], copy.input[0])
                renamed[original.output[0]] = copy.output[0] = f"{original.output[0]}.{prefix}copy{copied}"
                model.graph.node.append(copy)
            scatter.input[i] = renamed[scatter.input[i]]
    return copied


def _groups(layers: list[AttentionLayer]) -> dict[int, np.ndarray]:
    """``{layer: K/V head of each query head}`` of the grouped-query layers (for :func:`select_heads`)."""
    return {l.index: l.kv_of_head for l in layers if l.kv_of_head is not None}


def _unit_sizes(layers: list[AttentionLayer], granularity: str = "group") -> dict[int, list[int]]:
    """``{layer: heads in each unit pruned at once}``: K/V groups in grouped-query layers (with
    ``granularity="query"``: ``g`` units of one query head per group), else 1s."""
    _check_granularity(granularity)
    sizes = {}
    for l in layers:
        if granularity == "query" and l.kv_of_head is not None:
            sizes[l.index] = [l.kv_heads] * (l.heads // l.kv_heads)
        else:
            sizes[l.index] = [len(g) for g in l.kv_groups() or [[h] for h in range(l.heads)]]
    return sizes


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise AttncError(f"unknown pruning granularity {granularity!r}", f"use one of {', '.join(GRANULARITIES)}")


def _check_groups(layer: AttentionLayer, kept, granularity: str) -> None:
    """What a grouped-query layer may keep: whole K/V groups (``"group"``), or every K/V head
    with the same number of its query heads (``"query"``): the repeat of the K/V heads in front
    of the core has one group size."""
    groups = layer.kv_groups()
    if groups is None:
        return
    g = layer.heads // layer.kv_heads
    counts = [len(set(group) & set(kept)) for group in groups]
    if granularity == "group" or g == 1:
        split = [group for group, n in zip(groups, counts) if 0 < n < len(group)]
        if split:
            whole = [h for group, n in zip(groups, counts) if n for h in group]
            raise AttncError(
                f"layer {layer.index}: keeping heads {sorted(kept)} splits the K/V groups {split} (grouped-query "
                f"attention: {layer.kv_heads} K/V heads, each read by {g} query heads)",
                f"keep or prune whole groups, e.g. keep {whole}, or pass granularity='query' to keep every K/V "
                "head and the same number of query heads in each group")
        return
    if len(set(counts)) != 1 or counts[0] == 0:
        n = max(1, min(counts))
        even = sorted(h for group in groups
                      for h in ([j for j in group if j in kept] + [j for j in group if j not in kept])[:n])
        raise AttncError(
            f"layer {layer.index}: keeping heads {sorted(kept)} keeps {counts} query heads of its K/V groups "
            f"{groups}; granularity='query' keeps every K/V head and the same number of query heads in each group "
            f"(one group size for the repeat of the K/V heads)",
            f"keep e.g. {even}, or pass granularity='group' to prune whole groups")


def _name_prefix(model: onnx.ModelProto) -> str:
    """The prefix of the names pruning adds (``<weight>.pruned0``, ``<node>.shape.pruned0``): ``pruned``, or
    where some name in ``model`` already contains it (a model pruned before) the first of ``pruned2_``,
    ``pruned3_``, ... that none contains: the same names again would add a second initializer of a name,
    and readers take the first round's (the old shapes and weights)."""
    graph = model.graph
    names = {n.name for n in graph.node} | {t for n in graph.node for t in (*n.input, *n.output)} \
        | {i.name for i in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    text = "\n".join(names)
    prefix, round_ = "pruned", 1
    while prefix in text:
        round_ += 1
        prefix = f"pruned{round_}_"
    return prefix


def _param_count(model) -> int:
    """Float weights (initializers and Constant nodes); int64 shape constants are not parameters."""
    total = sum(int(np.prod(i.dims)) for i in model.graph.initializer
                if onnx.helper.tensor_dtype_to_np_dtype(i.data_type).kind == "f")
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = constant_value(model, node.output[0])
            if value is not None and value.dtype.kind == "f":
                total += int(value.size)
    return total


def _prune_layer(model: onnx.ModelProto, layer: AttentionLayer, kept: list[int], prefix: str = "pruned") -> None:
    """Slice ``layer`` to its ``kept`` heads; the tensors and nodes added are named with ``prefix`` and the
    layer's index (see :func:`_name_prefix`)."""
    nodes = {n.name: n for n in model.graph.node}
    tag = f"{prefix}{layer.index}"
    # Grouped-query attention: K and V keep the KV heads of the kept query heads (whole groups;
    # all of them when query heads go inside the groups).
    kept_kv = kept if layer.kv_of_head is None else sorted({int(layer.kv_of_head[h]) for h in kept})
    role_kept = {role: kept if role == "Q" else kept_kv for role in layer.roles}
    order = _query_order(layer, kept)
    q_proj = layer.roles["Q"][1]
    # Input projections: one weight may serve several roles (fused qkv).
    columns: dict[str, list[np.ndarray]] = {}
    all_columns: dict[str, list[np.ndarray]] = {}
    projections: dict[str, _Projection] = {}
    new_columns: dict[str, np.ndarray] = {}
    for role, (split, proj) in layer.roles.items():
        columns.setdefault(proj.matmul, []).append(proj.columns[role_kept[role]].reshape(-1))
        all_columns.setdefault(proj.matmul, []).append(proj.columns.reshape(-1))
        projections[proj.matmul] = proj
    for mm, proj in projections.items():
        w = proj.matrix(model)
        owned = np.concatenate(all_columns[mm])
        if sorted(owned.tolist()) != list(range(w.shape[1])):
            raise AttncError(f"layer {layer.index}: projection {proj.weight} has columns that are not "
                             "Q/K/V heads", "cannot slice it safely")
        cols = np.sort(np.concatenate(columns[mm]))
        if mm == q_proj.matmul:
            cols = _reordered(cols, q_proj.columns, kept, order)
        proj.set_matrix(model, nodes[mm], w[:, cols], f"{proj.weight}.{tag}")
        new_columns[mm] = cols
        for reshape in proj.reshapes:
            _set_shape_entries(model, nodes[reshape], {_last_entry(model, nodes[reshape]): len(cols)}, tag)
        if proj.bias:
            b = constant_value(model, proj.bias)
            _replace_input(model, nodes[proj.bias_node], list(nodes[proj.bias_node].input).index(proj.bias),
                           b[cols], f"{proj.bias}.{tag}")
    for role, (_, proj) in layer.roles.items():
        if proj.norm is not None:   # an RMSNorm across the role's heads, after any split: the role's kept columns
            own, cols = proj.columns.reshape(-1), new_columns[proj.matmul]
            _prune_channel_ops(model, proj.norm, cols[np.isin(cols, own)] - own.min(), own.size, nodes,
                               f"{tag}.{role.lower()}")
    # (every role's: one projection may reach its Split in some roles only, GPT-BigCode's Q)
    for split_node in {p.split[0] for _, p in layer.roles.values() if p.split and p.split[1] >= 0}:
        _resize_split(model, nodes[split_node], layer, role_kept, tag)
    for _, proj in layer.roles.values():
        if proj.split and proj.split[1] == -1:   # a channel Slice: its bounds among the kept columns
            cols = new_columns[proj.matmul]
            bounds = [int(np.sum(cols < proj.columns.min())), int(np.sum(cols <= proj.columns.max()))]
            node = nodes[proj.split[0]]
            for i, bound in zip((1, 2), bounds):
                _replace_input(model, node, i, np.array([bound], dtype=np.int64), f"{node.name}.bound{i}.{tag}")
    for split, role in {split.node: (split, role) for role, (split, _) in layer.roles.items()}.values():
        if nodes[split.node].op_type == "Unsqueeze":
            continue   # a single K/V head made by an Unsqueeze: it stays one
        rest = list(split.rest)
        sliced = [r for r, (other, _) in layer.roles.items() if other.node == split.node and r in layer.heads_ranges]
        if sliced:   # roles take ranges of this split's heads (Falcon): it loses what they lose
            rest[split.head_pos] -= sum(layer.heads_ranges[r][1] - len(role_kept[r]) for r in sliced)
        else:
            rest[split.head_pos] = len(role_kept[role])
        _set_reshape(model, nodes[split.node], split.lead, rest, tag)
    # The repeat of the K/V heads: constant K/V-head and head counts are rewritten, computed ones
    # follow the K/V shapes; a new group size (query heads pruned inside the groups) is written into
    # the Expand/Tile and, unless -1, the merge Reshape's head entry (computed as H_kv · g there).
    group, new_group = layer.heads // layer.kv_heads, len(kept) // len(kept_kv)
    for repeat in layer.repeats:
        expand = nodes[repeat.expand]
        if expand.op_type == "Tile":
            if new_group != group:
                repeats = constant_value(model, expand.input[1]).astype(np.int64)
                repeats[repeat.group_entry] = new_group
                _replace_input(model, expand, 1, repeats, f"{expand.name}.repeats.{tag}")
        else:
            entries = {repeat.kv_axis: len(kept_kv)} if repeat.rewrite_expand else {}
            if new_group != group:
                entries[repeat.group_entry] = new_group
            if entries:
                _set_shape_entries(model, expand, entries, tag)
        if repeat.rewrite_reshape or (new_group != group and not repeat.reshape_infers):
            _set_shape_entries(model, nodes[repeat.reshape], {repeat.head_axis: len(kept)}, tag)
    # Output side: merge Reshape and output-projection rows.
    _set_reshape(model, nodes[layer.out_merge.node], layer.out_merge.lead, [len(kept) * layer.value_dim], tag)
    rows = _reordered(np.sort(layer.out_proj.columns[kept].reshape(-1)), layer.out_proj.columns, kept, order)
    w_o = layer.out_proj.matrix(model)
    layer.out_proj.set_matrix(model, nodes[layer.out_proj.matmul], w_o[rows], f"{layer.out_proj.weight}.{tag}")
    for reshape in layer.out_proj.reshapes:
        _set_shape_entries(model, nodes[reshape], {_last_entry(model, nodes[reshape]): len(rows)}, tag)
    _prune_channel_ops(model, layer.channel_ops, rows, w_o.shape[0], nodes, tag)
    for node_name, axis in layer.head_reshapes:
        _set_shape_entries(model, nodes[node_name], {axis: len(kept)}, tag)
    for node_name, axis, role, there in layer.head_regroups:
        # the query heads' count (Q; K/V after their repeat) or the K/V heads' (before it, or broadcast)
        count = len(kept) if there == layer.heads else len(kept_kv)
        _set_shape_entries(model, nodes[node_name], {axis: count}, tag)
    _declare_interface_heads(model, layer, kept, kept_kv)
    for node_name, i, axis in layer.score_terms:
        node, gathered = nodes[node_name], f"{nodes[node_name].input[i]}.heads.{tag}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(order, dtype=np.int64), gathered + ".index"))
        model.graph.node.append(helper.make_node("Gather", [node.input[i], gathered + ".index"], [gathered],
                                                 name=gathered + "/gather", axis=axis))
        node.input[i] = gathered
    for node_name, i, axis in layer.per_head_constants:
        node = nodes[node_name]
        value = layer._per_head_value(model, node.input[i])
        _replace_input(model, node, i, np.take(value, order, axis=axis), f"{node.input[i]}.{tag}")
    # Agent attention outside the core: Reshapes around the pooling and the conv, conv channels.
    for split in layer.channel_reshapes:
        _set_reshape(model, nodes[split.node], split.lead, [split.rest[0] // layer.heads * len(kept), *split.rest[1:]],
                     tag)
    for conv in layer.depthwise:
        node = nodes[conv.node]
        channels = np.flatnonzero(np.isin(conv.channel_heads, kept))
        for i in range(1, min(3, len(node.input))):
            if node.input[i]:
                _replace_input(model, node, i, constant_value(model, node.input[i])[channels], f"{node.input[i]}.{tag}")
        next(a for a in node.attribute if a.name == "group").i = len(channels)


def _prune_channel_ops(model, ops: _ChannelOps, rows: np.ndarray, channels: int, nodes, tag: str) -> None:
    """Keep the merged channels ``rows`` (of ``channels``) in the ops between the merge and the output
    projection: the columns of each gate's projection, the entries of each per-channel weight; and keep
    each RMSNorm over the original channel count, the pruned heads' channels counting as zeros: the mean
    square's ``ReduceMean`` (over the ``C'`` kept channels now) is multiplied by ``C'/C``, an ONNX
    ``RMSNormalization`` reads its input times ``a = √(C'/C)`` (its mean square then is the sum over ``C``) and a
    scale divided by ``a``."""
    for name, i in ops.weights:
        node = nodes[name]
        value = constant_value(model, node.input[i])
        _replace_input(model, node, i, value[..., rows], f"{node.input[i]}.{tag}")
    for gate in ops.gates:
        cols = gate.columns[0][rows]
        gate.set_matrix(model, nodes[gate.matmul], gate.matrix(model)[:, cols], f"{gate.weight}.{tag}")
        if gate.bias:
            node = nodes[gate.bias_node]
            _replace_input(model, node, list(node.input).index(gate.bias), constant_value(model, gate.bias)[cols],
                           f"{gate.bias}.{tag}")
        for reshape in gate.reshapes:
            _set_shape_entries(model, nodes[reshape], {_last_entry(model, nodes[reshape]): len(rows)}, tag)
    ratio = len(rows) / channels
    for name, dtype in ops.norms:
        node = nodes[name]
        if node.op_type == "RMSNormalization":
            scale = constant_value(model, node.input[1])
            a = np.sqrt(ratio)
            _replace_input(model, node, 1, (scale[..., rows] / a).astype(dtype), f"{node.input[1]}.{tag}")
            scaled = f"{node.input[0]}.scaled.{tag}"
            model.graph.initializer.append(numpy_helper.from_array(np.array(a, dtype=dtype), scaled + ".a"))
            model.graph.node.append(helper.make_node("Mul", [node.input[0], scaled + ".a"], [scaled],
                                                     name=f"{name}/scale.{tag}"))
            node.input[0] = scaled
            continue
        out = node.output[0]
        node.output[0] = f"{out}.kept.{tag}"
        model.graph.initializer.append(numpy_helper.from_array(np.array(ratio, dtype=dtype), f"{out}.ratio.{tag}"))
        model.graph.node.append(helper.make_node("Mul", [node.output[0], f"{out}.ratio.{tag}"], [out],
                                                 name=f"{name}/rescale.{tag}"))


def _query_order(layer: AttentionLayer, kept: list[int]) -> list[int]:
    """The kept query heads (sorted) in the order the pruned layer holds them: the same order,
    except under a tiled repeat (query head ``h`` reads K/V head ``h % H_kv``) where groups that
    keep different query heads need them slot-major for ``h % H_kv`` to hold again."""
    if layer.kv_of_head is None or np.array_equal(layer.kv_of_head,
                                                  np.arange(layer.heads) // (layer.heads // layer.kv_heads)):
        return kept
    groups = [kept_heads for group in layer.kv_groups() if (kept_heads := [h for h in group if h in kept])]
    return [group[slot] for slot in range(len(groups[0])) for group in groups]


def _reordered(index: np.ndarray, head_index: np.ndarray, kept: list[int], order: list[int]) -> np.ndarray:
    """``index`` (the sorted projection columns / rows of the ``kept`` heads, ``head_index[h]``
    being head ``h``'s) with head ``order[k]``'s entries where head ``kept[k]``'s were: the heads
    move, the layout (which positions hold head ``k`` after slicing) stays."""
    if order == kept:
        return index
    moved = dict(zip(head_index[kept].reshape(-1).tolist(), head_index[order].reshape(-1).tolist()))
    return np.array([moved.get(int(i), int(i)) for i in index])


def _last_entry(model, reshape) -> int:
    """Index of the last entry of ``reshape``'s target shape (the channel entry)."""
    out = _shapes(model).get(reshape.output[0])
    if out:
        return len(out) - 1
    entries = _shape_entries(model, reshape.input[1], producers(model))
    if entries is None:
        raise AttncError(f"{reshape.name}: the length of its target shape is unknown", "please report this model")
    return len(entries) - 1


def _set_reshape(model, node, lead: int, rest: list[int], tag: str) -> None:
    """Point ``node`` (a Reshape) at its own shape ``[original[:lead], *rest]``."""
    base = f"{node.name}.shape.{tag}"
    value = constant_value(model, node.input[1])
    if value is not None:
        _replace_input(model, node, 1, np.array([*value[:lead], *rest], dtype=np.int64), base)
        return
    starts, ends, tail = base + ".starts", base + ".ends", base + ".tail"
    for name, v in ((starts, [0]), (ends, [lead]), (tail, rest)):
        model.graph.initializer.append(numpy_helper.from_array(np.array(v, dtype=np.int64), name))
    model.graph.node.extend([
        helper.make_node("Slice", [node.input[1], starts, ends], [base + ".lead"], name=base + "/lead"),
        helper.make_node("Concat", [base + ".lead", tail], [base], name=base + "/concat", axis=0),
    ])
    node.input[1] = base


def _set_shape_entries(model, node, entries: dict[int, int], tag: str) -> None:
    """Point ``node`` (a Reshape, Expand or ConstantOfShape) at its own shape with ``entries`` replaced: a new
    constant, or ``Concat`` of slices of the computed shape and the new constants."""
    base = f"{node.name}.shape.{tag}"
    shape = _shape_input(node)
    value = constant_value(model, node.input[shape])
    if value is not None:
        value = value.copy()
        for j, v in entries.items():
            value[j] = v
        _replace_input(model, node, shape, value.astype(np.int64), base)
        return
    pieces, start = [], 0
    for j in sorted(entries) + [None]:
        end = j if j is not None else np.iinfo(np.int64).max
        if j is None or j > start:
            name = f"{base}.{start}"
            for suffix, v in ((".starts", [start]), (".ends", [end])):
                model.graph.initializer.append(numpy_helper.from_array(np.array(v, dtype=np.int64), name + suffix))
            model.graph.node.append(helper.make_node("Slice", [node.input[shape], name + ".starts", name + ".ends"],
                                                     [name], name=name + "/slice"))
            pieces.append(name)
        if j is not None:
            model.graph.initializer.append(numpy_helper.from_array(np.array([entries[j]], dtype=np.int64),
                                                                   f"{base}.{j}.value"))
            pieces.append(f"{base}.{j}.value")
            start = j + 1
    model.graph.node.append(helper.make_node("Concat", pieces, [base], name=base + "/concat", axis=0))
    node.input[shape] = base


def _resize_split(model, node, layer: AttentionLayer, role_kept: dict[str, list[int]], tag: str) -> None:
    sizes = _split_sizes(model, node)
    new_sizes = list(sizes)
    for role, (_, proj) in layer.roles.items():
        if proj.split and proj.split[0] == node.name:
            j = proj.split[1]
            new_sizes[j] = int(proj.columns[role_kept[role]].size)
    name = f"{node.name}.split.{tag}"
    if len(node.input) > 1 and node.input[1]:
        model.graph.initializer.append(numpy_helper.from_array(np.array(new_sizes, dtype=np.int64), name))
        node.input[1] = name
    else:
        for a in node.attribute:
            if a.name == "split":
                del a.ints[:]
                a.ints.extend(new_sizes)
                return
        if _opset(model) >= 13:
            model.graph.initializer.append(numpy_helper.from_array(np.array(new_sizes, dtype=np.int64), name))
            for i, a in reversed(list(enumerate(node.attribute))):
                if a.name == "num_outputs":   # opset 18: a split input and num_outputs exclude each other
                    del node.attribute[i]
            if len(node.input) == 1:
                node.input.append(name)
            else:
                node.input[1] = name
        else:
            node.attribute.append(helper.make_attribute("split", new_sizes))


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
