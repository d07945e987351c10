"""Fuse neighborhood attention (NAT / DiNAT / NATTEN semantics) into ``attnc::NeighborhoodAttention``.

What it matches, around every ``Softmax`` over the last axis (or its ``Exp / ReduceSum / Div``
decomposition):

- **masked form**: ``Softmax(s * (Q @ Kᵀ) + bias [+ bias ...]) @ V`` and ``Where(mask, scores, -inf)``
  variants, where every bias / mask tensor depends on no input *value* (an initializer, a
  Constant, or a subgraph of shapes, ``Range`` and arithmetic that the exporter did not fold);
- **gather form**: ``Squeeze(Unsqueeze(Q) @ Transpose(Reshape(Gather(K, index, axis=2))))`` scores
  over ``[B, heads, N, window]``, the same bias / mask terms, then ``Unsqueeze(P) @ Reshape(Gather(V,
  index))``, with the same index tensor for K and V (``index_select`` / unfold of key windows);
- **bucketed form** (lucidrains' ``local-attention``): ``Einsum(bq, bk)`` scores of query buckets
  ``[.., windows, w, D]`` against looked-around key buckets ``[.., windows, S, D]``, the same mask
  terms, ``Einsum(P, bv)``, reshaped (and un-padded) back. Q/K/V are the tensors the buckets are cut
  from by element-moving ops only (reshape, pad, slice, gather); ONNX Runtime runs that subgraph on
  index probes (``offset + flat index`` fed into Q, K, V and the bucketed output, at two offsets so
  that copies and padding constants separate), which shows exactly which key (and value) each live
  slot of each output query holds. That per-query key set becomes the dense bias below and is
  verified like the masked form. ``[B*heads, N, D]`` Q/K/V get an ``Unsqueeze`` to one head.
  NA-equivalent: ``causal=True, exact_windowsize=True`` (k = window_size * look_backward + 1),
  causal ``window_size=1``, and its default causal blocks (``exact_windowsize=False``: strided
  causal NA, k = window_size * (look_backward + 1), stride window_size, on lengths that are
  multiples of the window); non-causal configurations clip their windows at the borders where NA
  shifts them (near-miss). A
  dynamic token axis that the bucketing cannot reshape at the sampled sizes (no autopad) is sampled
  at 7 and 11 buckets instead. The same path proves masked NA written with ``einsum`` (no buckets).

The scale may sit on Q, on Kᵀ or on the scores (Mul or Div by a scalar, before or after the bias);
Kᵀ may be any Transpose of K. The bias / mask tensors are *evaluated* (ONNX Runtime on the subgraph
that computes them) and analysed: the allowed-key pattern must be exactly a NATTEN >= 0.20
neighborhood on a 1-D, 2-D or 3-D grid (kernel size, dilation, causal and stride per axis are
recovered from it, the stride as the smallest whose per-axis window pattern is the mask's exactly,
and the H x W or T x H x W factorisation of N: every factorisation is a candidate, cheap O(N) checks
reject most, and the first on which the mask is exactly a neighborhood is taken), masked entries
must be ``<= -1e4`` (``-inf``, dtype minimum, ``-1e9``: exp underflows to exactly 0), and the finite
entries must be a relative positional bias ``rpb[h, (j-i)/d + k - 1, ...]`` (the table is
extracted; only with every stride 1: the op refuses an RPB with a stride). Then the whole dense bias
is rebuilt from the recovered parameters and compared entry by entry; anything else is a
:class:`NearMiss` with the reason (for a mask that is no neighborhood, the closest candidate grid and
the first query it gets wrong). When the bias depends on a dynamic axis (a sequence or grid size), it
is evaluated and verified at two sampled sizes (smaller ones, fitting kernel * dilation <= 7 per axis,
when the default ones would give more than 8192 tokens, as a dynamic 3-D grid does) and the grid
sizes are taken from the matching input dimensions at run time (``Shape``); the sampling is the only
non-exhaustive step.

It also completes ``attnc::NeighborhoodAttention`` nodes that the NATTEN export-time translation
(``attnc.plugins.neighborhood.natten_compat``) put in the graph, by attaching their function body.

What it emits: one ``attnc::NeighborhoodAttention`` node per match (function body from
``attnc.plugins.neighborhood``), with ``Reshape`` nodes around it for 2-D and 3-D grids
([B, heads, N, D] -> [B, heads, *grid, D] and back) and the RPB table as a new initializer; the
scale is explicit and ``stride`` is the recovered one. When the grid is static the node gets the
``grid`` attribute (its ``*_static`` function overload lets ONNX Runtime precompute every index/bias
tensor). The dead subgraph (scores, mask computation) is removed.

Not matched (near-miss): mask not a neighborhood (e.g. blocked local attention, non-causal
local-attention windows, which are clipped at the borders where NA shifts them), strided mask with
finite non-zero bias entries (an RPB with a stride, which the op refuses), mask that allows
every key (plain attention: left to the softmax pass), data-dependent bias, rank-3 Q/K/V outside the
bucketed form, K/V gathered with different indices, buckets computed by more than element moves
(rotary embeddings after bucketing), bucketed graphs that are not float32, size-dependent masks with
more than 8192 tokens even at the small sampled sizes (dynamic frames of large static planes).

Tests: ``tests/passes/test_neighborhood.py``; op contract: ``attnc.plugins.neighborhood``.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.compiler.onnx_io import ort_session
from attnc.passes.core import (Match, NearMiss, PassReport, ancestry, canonical_einsum, constant_value, consumers,
                               dim_size, name_nodes, past_probability_casts, probe_model, producers,
                               remove_dead_nodes, toposort, value_shapes_and_types)
from attnc.plugins import neighborhood as plugin
from attnc.plugins import attach_function_bodies

FAMILY = "neighborhood"
MASKED = -1e4  # bias entries at or below this are "masked": exp(x - max) underflows to 0 in fp16/fp32
# Sizes given to dynamic input axes when a bias depends on them; distinct within a sample and
# different between the two samples of a pair, so a grid size traces back to exactly one input axis.
# Samples 0/1 by default; 2/3 when sample 0 has more than _MAX_SAMPLED_TOKENS tokens (a dynamic 3-D
# grid: 29 x 31 x 37 tokens would make a 4 GB dense bias); they fit kernel * dilation <= 7 per axis.
_SAMPLES = ([23, 29, 31, 37, 41, 43, 47, 53], [19, 25, 27, 33, 35, 39, 45, 51],
            [7, 9, 11, 13, 8, 10, 12, 14], [8, 10, 12, 7, 9, 11, 13, 15])
_MAX_SAMPLED_TOKENS = 8192  # dense [N, N] bias of a sample: 512 MB in float64


class _Mismatch(Exception):
    """Raised inside the matcher with the near-miss reason."""


# ----------------------------------------------------------------------------- evaluation of bias subgraphs

class _Evaluator:
    """Classifies tensors as const / shape-only / data-dependent and computes the first two with ORT."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = producers(model)
        self.inits = {i.name for i in model.graph.initializer}
        self.graph_inputs = {i.name: i for i in model.graph.input if i.name not in self.inits}
        self._kind: dict[str, int] = {}
        # no data propagation: it took seconds on graphs with large constant masks
        self.shapes, self.types = value_shapes_and_types(model, data_prop=False)
        self.dynamic_dims = sorted({d.dim_param or f"{i.name}:{a}"
                                    for i in self.graph_inputs.values()
                                    for a, d in enumerate(i.type.tensor_type.shape.dim) if not d.dim_value})
        self._tokens: dict[tuple[str, int], int] = {}

    def kind(self, name: str) -> int:
        """0: constant, 1: depends on input shapes only, 2: depends on input values."""
        stack = [name]
        while stack:  # iterative post-order so deep shape subgraphs do not hit the recursion limit
            cur = stack.pop()
            if cur in self._kind or cur == "":
                continue
            if cur in self.inits:
                self._kind[cur] = 0
                continue
            if cur in self.graph_inputs:
                self._kind[cur] = 2
                continue
            node = self.producer.get(cur)
            if node is None:
                self._kind[cur] = 2
                continue
            pending = [i for i in node.input if i and i not in self._kind]
            if pending:
                stack.append(cur)
                stack.extend(pending)
                continue
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                k = 2
            elif node.op_type in ("Shape", "Size"):
                k = min(1, max([self._kind[i] for i in node.input if i] or [0]))
            elif node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"):
                k = 2
            else:
                k = max([self._kind[i] for i in node.input if i] or [0])
            for out in node.output:
                self._kind[out] = k
        return self._kind[name]

    def values(self, names: list[str], sample: int = 0, probes: tuple[str, ...] = (),
               offset: float = 1.0, sizes: dict[str, int] | None = None) -> list[np.ndarray]:
        """Compute ``names`` (const or shape-only tensors) with ONNX Runtime at sampled input sizes.

        ``probes``: tensors replaced, for every node that reads their values, by an index probe of the
        same shape and type (``offset + flat index``); ``names`` may then be data tensors computed from
        the probes, and ``f"{probe}{_SHAPE}"`` names the probe's shape.
        """
        import onnxruntime as ort

        requested, names, probes = names, list(dict.fromkeys(names)), tuple(dict.fromkeys(probes))
        if len(names) < len(requested):
            found = dict(zip(names, self.values(names, sample, probes, offset, sizes)))
            return [found[n] for n in requested]
        direct = [None if probes else constant_value(self.model, n) for n in names]
        if all(v is not None for v in direct):
            return direct
        needed, nodes = ancestry(self.model, [n for n in names if not n.endswith(_SHAPE)] + list(probes),
                                 self.producer)
        if probes:
            nodes = [_reading(n, probes) for n in nodes] + [
                node for x in probes for node in _index_probe(x, self.types.get(x, onnx.TensorProto.FLOAT), offset)]
        inputs = [i for n, i in self.graph_inputs.items() if n in needed]
        sizes = {**dict(zip(self.dynamic_dims, _SAMPLES[sample])), **(sizes or {})}
        feeds = {}
        for info in inputs:
            t = info.type.tensor_type
            shape = [d.dim_value or sizes[d.dim_param or f"{info.name}:{a}"] for a, d in enumerate(t.shape.dim)]
            feeds[info.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        outputs = [helper.make_tensor_value_info(n, onnx.TensorProto.INT64 if n.endswith(_SHAPE) else
                                                 self.types.get(n, onnx.TensorProto.FLOAT), None) for n in names]
        model = probe_model(self.model, nodes, inputs, outputs, needed)
        if probes:
            toposort(model)
        options = ort.SessionOptions()
        options.log_severity_level = 4 if probes else 3  # a failing probe becomes a near-miss, not a log line
        options.intra_op_num_threads = 1
        try:
            return ort_session(model, options, weights_from=self.model).run(names, feeds)
        except Exception as exc:  # noqa: BLE001  (ORT's errors subclass Exception only)
            # e.g. a bfloat16 ALiBi table (Falcon's), which ONNX Runtime's CPU kernels do not compute
            error = str(exc).splitlines()[0][:160]
            what = ", ".join(n.removesuffix(_SHAPE) for n in requested)[:80]
            raise _Mismatch(f"{what} cannot be computed at sampled sizes: {error}") from None

    def dim_sample(self, dim_name: str, sample: int) -> int:
        return dict(zip(self.dynamic_dims, _SAMPLES[sample]))[dim_name]

    def tokens(self, name: str, sample: int) -> int:
        """Size of the token axis (-2) of ``name`` ``[.., N, D]`` at a sample: from its inferred shape where that
        is a static size or a sum of input dims and constants (``"seq + 576"``), else computed from zero inputs
        (which runs every layer in front of it: seconds per attention layer of a large model)."""
        inferred = self._inferred_tokens(name, sample)
        if inferred is not None:
            return inferred
        if (name, sample) not in self._tokens:
            self.compute_tokens([name], sample)
        return self._tokens[name, sample]

    def _inferred_tokens(self, name: str, sample: int) -> int | None:
        shape = self.shapes.get(name) or []
        dim = shape[-2] if len(shape) >= 2 else None
        sizes = dict(zip(self.dynamic_dims, _SAMPLES[sample]))
        if isinstance(dim, int) and dim > 0:
            return dim
        return dim_size(dim, sizes) if isinstance(dim, str) else None

    def compute_tokens(self, names: list[str], sample: int) -> None:
        """Compute the token counts of ``names`` whose shapes do not tell them at a sample, in one run (each computed
        apart would run the layers in front of it again: quadratic in the layers), for :meth:`tokens`."""
        names = [n for n in dict.fromkeys(names)
                 if (n, sample) not in self._tokens and self._inferred_tokens(n, sample) is None]
        if names:
            shapes = self.values([n + _SHAPE for n in names], sample, probes=tuple(names))
            self._tokens.update({(n, sample): int(shape[-2]) for n, shape in zip(names, shapes)})


_SHAPE = "::probe_shape"
_PROBE = "::probe"
# Ops that only move or copy elements (which element lands where never depends on values): the
# bucketed form's data paths must consist of these for an index probe to prove what they compute.
_MOVES = {"Reshape", "Pad", "Slice", "Gather", "Squeeze", "Unsqueeze", "Expand", "Identity", "Flatten"}


def _reading(node: onnx.NodeProto, probes: tuple[str, ...]) -> onnx.NodeProto:
    """``node`` reading the index probe of every probed tensor (``Shape`` / ``Size`` keep the tensor)."""
    if node.op_type in ("Shape", "Size") or not set(node.input) & set(probes):
        return node
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    for i, name in enumerate(copy.input):
        if name in probes:
            copy.input[i] = name + _PROBE
    return copy


def _index_probe(x: str, elem_type: int, offset: float) -> list[onnx.NodeProto]:
    """Nodes computing ``x + _PROBE = offset + arange(x.size).reshape(x.shape)`` in ``x``'s type."""
    def c(name, value):
        return helper.make_node("Constant", [], [f"{x}::{name}"],
                                value=numpy_helper.from_array(np.asarray(value, dtype=np.float64)))
    p = f"{x}::"
    return [helper.make_node("Shape", [x], [x + _SHAPE]), helper.make_node("Size", [x], [p + "size"]),
            helper.make_node("Cast", [p + "size"], [p + "n"], to=onnx.TensorProto.DOUBLE),
            c("offset", offset), c("one", 1.0),
            helper.make_node("Add", [p + "n", p + "offset"], [p + "end"]),
            helper.make_node("Range", [p + "offset", p + "end", p + "one"], [p + "flat"]),
            helper.make_node("Cast", [p + "flat"], [p + "typed"], to=elem_type),
            helper.make_node("Reshape", [p + "typed", x + _SHAPE], [x + _PROBE])]


# ----------------------------------------------------------------------------- mask analysis

@dataclass
class Neighborhood:
    """What a bias tensor was proven to be."""

    grid: tuple[int, ...]
    kernel_size: list[int]
    dilation: list[int]
    is_causal: list[int]
    rpb: np.ndarray | None = None  # [heads or 1, 2k-1, ...] float64
    stride: list[int] = field(default_factory=list)  # per axis; empty means all 1

    def __post_init__(self):
        self.stride = list(self.stride) or [1] * len(self.grid)


def _axis_params(allowed: np.ndarray) -> tuple[int, int, int, int]:
    """(kernel_size, dilation, is_causal, stride) of a per-axis allowed matrix ``[L, L]``.

    The stride is the smallest one whose window pattern is ``allowed`` exactly (stride 1 first, so
    every mask that has a stride-1 reading keeps it); 1 when none is, and the caller's verification
    then names the difference. Even kernels take strides too: lucidrains' causal blocked local
    attention (``exact_windowsize=False``, its default) is exactly causal NA with kernel
    ``w * (look_backward + 1)`` and stride ``w`` (every query of a block sees from the start of the
    block ``look_backward`` blocks back up to itself).
    """
    counts = allowed.sum(1)
    kernel = int(counts.max())
    if kernel <= 1:
        return 1, 1, 0, 1
    causal = int(not np.triu(allowed, 1).any())
    rows, cols = np.nonzero(allowed)
    gaps = np.abs(rows - cols)
    dilation = int(gaps[gaps > 0].min())
    length = len(allowed)
    if length < kernel * dilation:
        return kernel, dilation, causal, 1
    first_key = allowed.argmax(1)
    last_key = length - 1 - allowed[:, ::-1].argmax(1)
    if not np.array_equal(last_key - first_key, dilation * (counts - 1)):
        return kernel, dilation, causal, 1  # some row is no run of sub-grid keys: no stride fits
    for stride in range(1, kernel + 1):
        # O(L k) screen (first key and key count per query) before the exact O(L^2) comparison
        index, valid, _ = plugin.axis_windows(length, kernel, dilation, bool(causal), stride)
        if not (np.array_equal(index[:, 0], first_key) and np.array_equal(valid.sum(1), counts)):
            continue
        mask = plugin.dense_mask_and_rel((length,), [kernel], [dilation], [causal], stride=[stride])[0]
        if np.array_equal(mask, allowed):
            return kernel, dilation, causal, stride
    return kernel, dilation, causal, 1


def _grids(n: int):
    """Every grid of ``n`` tokens, row-major: ``(n,)``, then ``(H, W)``, then ``(T, H, W)``, axes >= 2."""
    yield (n,)
    for rows in range(2, n // 2 + 1):
        if n % rows == 0:
            yield (rows, n // rows)
    for frames in range(2, n // 4 + 1):
        if n % frames == 0:
            plane = n // frames
            for rows in range(2, plane // 2 + 1):
                if plane % rows == 0:
                    yield (frames, rows, plane // rows)


class _GridMiss(_Mismatch):
    """A grid that ``allowed`` is not a neighborhood on; ``distance`` (the share of the queries that
    were seen to differ) picks the candidate a near-miss reports, e.g. the true grid of a mask with
    one entry flipped (one query of N) rather than a wrong factorization."""

    def __init__(self, reason: str, distance: float):
        super().__init__(reason)
        self.distance = distance


def analyse_bias(bias: np.ndarray) -> Neighborhood:
    """Prove that a dense additive bias ``[heads or 1, N, N]`` is a neighborhood mask (+ RPB).

    Raises _Mismatch with the reason when it is not.
    """
    bias = bias.astype(np.float64)
    allowed_h = bias > MASKED
    allowed = allowed_h[0]
    n = allowed.shape[-1]
    if allowed.shape != (n, n):
        # a generation step's queries see the cache as well: fewer queries than keys
        raise _Mismatch(f"the mask is {allowed.shape[0]} queries by {n} keys, not one key per query")
    if not (allowed_h == allowed).all():
        raise _Mismatch("the mask differs between heads")
    if not allowed.any(1).all():
        raise _Mismatch("some query has every key masked")
    if allowed.all():
        raise _Mismatch("the mask allows every key (plain attention, left to the softmax pass)")
    if not np.triu(allowed, 1).any() and allowed[np.tril_indices(n)].all():
        raise _Mismatch("the mask is plain causal (every earlier key allowed), left to the softmax pass")
    key_counts = allowed.sum(1)
    closest, rpb_miss = None, None
    for grid in _grids(n):
        try:
            found = _try_grid(allowed, key_counts, grid)
        except _GridMiss as miss:
            closest = miss if closest is None or miss.distance < closest.distance else closest
            continue
        try:
            found.rpb = _extract_rpb(bias, allowed, found)
        except _Mismatch as exc:
            # A kernel-1 axis lets the same mask be a neighborhood on a coarser grid too (frames x
            # (H*W) for a per-frame 2-D window), where the bias's offsets collide; a finer grid may
            # still carry it.
            rpb_miss = rpb_miss or f"{exc} on grid {grid}"
            continue
        return found
    if rpb_miss:
        raise _Mismatch(rpb_miss)
    raise _Mismatch(f"the mask is not a neighborhood mask on any 1-D, 2-D or 3-D grid of {n} tokens"
                    + (f" (closest: {closest})" if closest else ""))


def _try_grid(allowed: np.ndarray, key_counts: np.ndarray, grid: tuple[int, ...]) -> Neighborhood:
    """The neighborhood that ``allowed [N, N]`` is on ``grid``, proven entry by entry, or _GridMiss.

    The per-axis parameters are read off the queries on the grid lines through the origin; a
    candidate must then pass two O(N) checks (keys per query; the rows of the grid's corner, edge
    and centre queries) before the O(N^2) comparison, which wrong factorizations rarely reach.
    """
    ndim = len(grid)
    m = allowed.reshape(grid + grid)
    axes = []
    for axis in range(ndim):
        line = m[tuple(slice(None) if a == axis else 0 for a in range(ndim))]  # [L_axis, *grid]
        axes.append(line.any(axis=tuple(1 + a for a in range(ndim) if a != axis)) if ndim > 1 else line)
    ks, ds, cs, ss = (list(p) for p in zip(*(_axis_params(a) for a in axes)))
    for length, k, d in zip(grid, ks, ds):
        if length < k * d:
            raise _GridMiss(f"kernel {k} x dilation {d} does not fit an axis of {length} of grid {grid}", 1.0)
    per_axis = [plugin.dense_mask_and_rel((length,), [k], [d], [c], stride=[st])[0]
                for length, k, d, c, st in zip(grid, ks, ds, cs, ss)]
    described = f"grid {grid} with kernel {ks}, dilation {ds}, causal {cs}" + (
        f", stride {ss}" if any(st != 1 for st in ss) else "")
    counts = per_axis[0].sum(1)
    for extra in per_axis[1:]:
        counts = np.outer(counts, extra.sum(1)).reshape(-1)
    corners = np.meshgrid(*([0, length // 2, length - 1] for length in grid), indexing="ij")
    spots = np.unique(np.ravel_multi_index(tuple(c.reshape(-1) for c in corners), grid))
    coords = np.unravel_index(spots, grid)
    rows = per_axis[0][coords[0]]  # the spot queries' rows of the candidate's mask, [len(spots), N]
    for mask, coord in zip(per_axis[1:], coords[1:]):
        rows = (rows[:, :, None] & mask[coord][:, None, :]).reshape(len(spots), -1)
    # both shares rank the candidate: on the true grid of a mask with one flipped entry one count
    # differs and (usually) no spot row, while grids that only share the counts differ in spot rows
    miscounted, spot_differs = counts != key_counts, (rows != allowed[spots]).any(1)
    if miscounted.any():
        row = int(np.argmax(miscounted))
        raise _GridMiss(f"query {row} sees {int(key_counts[row])} keys, a neighborhood on {described} "
                        f"sees {int(counts[row])}", float(miscounted.mean() + spot_differs.mean()))
    _raise_on_difference(rows, allowed[spots], spots, described)
    expected = per_axis[0]
    for extra in per_axis[1:]:
        a, b = expected.shape[0], extra.shape[0]
        expected = (expected[:, None, :, None] & extra[None, :, None, :]).reshape(a * b, a * b)
    _raise_on_difference(expected, allowed, np.arange(len(allowed)), described)
    return Neighborhood(grid, ks, ds, cs, stride=ss)


def _raise_on_difference(expected: np.ndarray, allowed: np.ndarray, queries: np.ndarray, described: str) -> None:
    """_GridMiss naming the first entry where the ``expected`` rows of ``queries`` differ from ``allowed``."""
    differ = (expected != allowed).any(1)
    if differ.any():
        row = int(np.argmax(differ))
        key = int(np.argmax(expected[row] != allowed[row]))
        raise _GridMiss(f"entry [{int(queries[row])},{key}] should be {'finite' if expected[row, key] else '-inf'} "
                        f"for {described}", float(differ.mean()))


def _extract_rpb(bias: np.ndarray, allowed: np.ndarray, nb: Neighborhood) -> np.ndarray | None:
    values = np.where(allowed, bias, 0.0)
    if not values.any():
        return None
    if any(st != 1 for st in nb.stride):
        raise _Mismatch(f"the mask is strided NA (stride {nb.stride}) but has finite non-zero bias entries: the "
                        "op refuses a relative positional bias with a stride other than 1")
    _, rel = plugin.dense_mask_and_rel(nb.grid, nb.kernel_size, nb.dilation, nb.is_causal)
    spans = [2 * k - 1 for k in nb.kernel_size]
    flat = np.ravel_multi_index(tuple(np.moveaxis(rel, -1, 0)), spans)[allowed]
    table = np.zeros((bias.shape[0], int(np.prod(spans))))
    table[:, flat] = values[:, allowed]
    if not np.array_equal(table[:, flat], values[:, allowed]):
        raise _Mismatch("the finite bias entries are not a relative positional bias "
                        "(two pairs with the same offset have different values)")
    return table.reshape(bias.shape[0], *spans)


# ----------------------------------------------------------------------------- graph matching

@dataclass
class _Site:
    anchor: str
    q: str
    k: str                    # [B, heads, N, D] (maybe after an inserted Transpose)
    v: str
    output: str
    scale: float
    biases: list[tuple[str, float]] = field(default_factory=list)   # (tensor, multiplier)
    masks: list[tuple[str, bool]] = field(default_factory=list)     # (bool tensor, True where allowed)
    k_perm: tuple[str, list[int]] | None = None                     # K = Transpose(src, perm) to insert
    window_index: str | None = None                                 # gather form: [N*K] key index
    window: int | None = None
    bucket: _Buckets | None = None                                  # bucketed form (local-attention)
    nodes: list[str] = field(default_factory=list)


@dataclass
class _Buckets:
    """Bucketed (blocked local) attention: scores ``Einsum(bq, bk)`` over ``[..., rows, slots]``."""

    bq: str        # query buckets before the scale [*prefix, rows, D]
    bk: str        # key buckets [*prefix, slots, D]
    bv: str        # value buckets [*prefix, slots, Dv]
    pv: str        # Einsum(P, bv) output [*prefix, rows, Dv], probed to trace where rows go
    rank: int      # rank of Q / K / V / output: 4 ([B, heads, N, D]) or 3 ([B*heads, N, D])


class _Matcher:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = producers(model)
        self.consumer = consumers(model)
        self.eval = _Evaluator(model)
        self.shapes = self.eval.shapes
        # proofs by the tensors their bias is made of: every decoder layer of a transformers export reads one mask
        self._proofs: dict[tuple, Neighborhood | _Mismatch] = {}

    def scalar(self, name: str) -> float | None:
        if self.eval.kind(name) == 2:
            return None
        value = self.eval.values([name])[0]
        return float(value.reshape(-1)[0]) if value.size == 1 else None

    def only_consumer(self, name: str, op: str) -> onnx.NodeProto:
        users = self.consumer.get(name, [])
        if len(users) != 1 or users[0].op_type != op:
            raise _Mismatch(f"{name} feeds {[u.op_type for u in users]}, expected one {op}")
        return users[0]

    def softmax_of(self, node: onnx.NodeProto):
        """(input, output, nodes) when ``node`` starts a softmax over the last axis."""
        if node.op_type == "Softmax":
            axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
            rank = self.rank(node.input[0])
            if axis != -1 and (rank is None or axis != rank - 1):
                return None
            return node.input[0], node.output[0], [node.name]
        if node.op_type == "Exp":  # x -> [Sub(x, ReduceMax(x))] -> Exp -> Div(e, ReduceSum(e))
            users = self.consumer.get(node.output[0], [])
            div = next((u for u in users if u.op_type == "Div" and u.input[0] == node.output[0]), None)
            red = next((u for u in users if u.op_type == "ReduceSum"), None)
            if div is None or red is None or div.input[1] != red.output[0] or not self._last_axis(red):
                return None
            names = [node.name, red.name, div.name]
            src = node.input[0]
            sub = self.producer.get(src)
            if sub is not None and sub.op_type == "Sub":
                mx = self.producer.get(sub.input[1])
                if mx is not None and mx.op_type == "ReduceMax" and mx.input[0] == sub.input[0]:
                    names += [sub.name, mx.name]
                    src = sub.input[0]
            return src, div.output[0], names
        return None

    def _last_axis(self, node) -> bool:
        axes = next((list(a.ints) for a in node.attribute if a.name == "axes"), None)
        if axes is None and len(node.input) > 1:
            value = constant_value(self.model, node.input[1])
            axes = None if value is None else value.reshape(-1).tolist()
        rank = self.rank(node.input[0])
        return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))

    def rank(self, name: str) -> int | None:
        shape = self.shapes.get(name)
        return None if shape is None else len(shape)

    # -- the chain between the scores matmul and the softmax
    def pre_softmax(self, site: _Site, name: str) -> str:
        mult = 1.0
        while True:
            node = self.producer.get(name)
            if node is None:
                raise _Mismatch(f"softmax input {name} is not computed from a MatMul")
            op = node.op_type
            if op in ("Add", "Mul", "Div", "Sub", "Where"):
                live = [i for i in node.input if self.eval.kind(i) == 2]
                if len(live) != 1:
                    if op == "Add" and len(live) == 2:
                        raise _Mismatch(f"{node.name} adds a data-dependent bias")
                    raise _Mismatch(f"{node.name} ({op}) has no single data input")
                other = [i for i in node.input if i != live[0]]
                if op == "Add":
                    site.biases.append((other[0], mult))
                elif op == "Sub" and node.input[0] == live[0]:
                    site.biases.append((other[0], -mult))
                elif op in ("Mul", "Div") and (node.input[0] == live[0] or op == "Mul"):
                    c = self.scalar(other[0])
                    if c is None or c == 0:
                        raise _Mismatch(f"{node.name} scales the scores by a non-scalar or zero")
                    mult = mult * c if op == "Mul" else mult / c
                elif op == "Where" and node.input[0] != live[0]:
                    fill_is_else = node.input[1] == live[0]
                    fill = node.input[2] if fill_is_else else node.input[1]
                    fill_value = self.eval.values([fill])[0] if self.eval.kind(fill) == 0 else None
                    if fill_value is None or (fill_value > MASKED).any():
                        raise _Mismatch(f"{node.name} fills masked scores with a value above {MASKED:g}")
                    site.masks.append((node.input[0], fill_is_else))
                else:
                    raise _Mismatch(f"{node.name} ({op}) is not a bias, mask or scale")
                site.nodes.append(node.name)
                name = live[0]
                continue
            if op == "Cast":
                raise _Mismatch(f"{node.name} casts the scores (mixed-precision softmax is not fused)")
            if mult <= 0:
                raise _Mismatch("the scores are scaled by a negative factor")
            site.scale *= mult
            return name

    def strip_scale(self, site: _Site, name: str) -> str:
        while True:
            node = self.producer.get(name)
            if node is None or node.op_type not in ("Mul", "Div") or len(self.consumer.get(name, [])) != 1:
                return name
            live = [i for i in node.input if self.eval.kind(i) == 2]
            if len(live) != 1 or (node.op_type == "Div" and node.input[0] != live[0]):
                return name
            c = self.scalar([i for i in node.input if i != live[0]][0])
            if c is None or c == 0:
                return name
            site.scale = site.scale * c if node.op_type == "Mul" else site.scale / c
            site.nodes.append(node.name)
            name = live[0]

    def key_from_transposed(self, site: _Site, kt: str, rank: int) -> None:
        """Find K [.., N, D] from Kᵀ [.., D, N]: undo a Transpose, or plan one."""
        kt = self.strip_scale(site, kt)
        swap = list(range(rank - 2)) + [rank - 1, rank - 2]
        node = self.producer.get(kt)
        if node is not None and node.op_type == "Transpose":
            perm = list(next(a.ints for a in node.attribute if a.name == "perm"))
            composed = [perm[s] for s in swap]
            src = self.strip_scale(site, node.input[0])
            site.nodes.append(node.name)
            if composed == list(range(rank)):
                site.k = src
            else:
                site.k_perm = (src, composed)
            return
        site.k_perm = (kt, swap)

    def match(self, softmax: tuple, anchor: str) -> _Site:
        src, out, names = softmax
        out, passed = past_probability_casts(self.model, out, self.consumer)   # SDPA's NaN guard, casts
        site = _Site(anchor=anchor, q="", k="", v="", output="", scale=1.0, nodes=list(names) + passed)
        scores = self.pre_softmax(site, src)
        node = self.producer.get(scores)
        if node is not None and node.op_type == "Squeeze":
            return self.match_gather(site, node, out)
        if node is not None and node.op_type == "Einsum":
            return self.match_bucketed(site, node, out)
        if node is None or node.op_type != "MatMul":
            raise _Mismatch(f"the scores come from {node.op_type if node else 'an input'}, not a MatMul")
        site.nodes.append(node.name)
        rank = self.rank(node.input[0])
        if rank != 4:
            raise _Mismatch(f"q/k/v have rank {rank}, only [B, heads, N, D] (rank 4) is fused")
        site.q = self.strip_scale(site, node.input[0])
        self.key_from_transposed(site, node.input[1], rank)
        pv = self.only_consumer(out, "MatMul")
        if pv.input[0] != out:
            raise _Mismatch(f"{pv.name} multiplies the probabilities from the right")
        site.nodes.append(pv.name)
        site.v, site.output = pv.input[1], pv.output[0]
        return site

    def match_gather(self, site: _Site, squeeze: onnx.NodeProto, out: str) -> _Site:
        mm = self.producer.get(squeeze.input[0])
        if mm is None or mm.op_type != "MatMul":
            raise _Mismatch(f"{squeeze.name} does not squeeze a MatMul")
        unsq = self.producer.get(mm.input[0])
        if unsq is None or unsq.op_type != "Unsqueeze":
            raise _Mismatch(f"{mm.name}'s query is not unsqueezed (not a per-query window product)")
        site.nodes += [squeeze.name, mm.name, unsq.name]
        site.q = self.strip_scale(site, unsq.input[0])
        if self.rank(site.q) != 4:
            raise _Mismatch(f"q has rank {self.rank(site.q)}, only [B, heads, N, D] is fused")
        t = self.producer.get(mm.input[1])
        if t is None or t.op_type != "Transpose" or list(t.attribute[0].ints) != [0, 1, 2, 4, 3]:
            raise _Mismatch(f"{mm.name}'s key windows are not transposed [.., K, D] -> [.., D, K]")
        site.nodes.append(t.name)
        k_index, k_src = self.window_gather(site, t.input[0])
        site.k = k_src
        # probabilities: Unsqueeze -> MatMul with the value windows -> Squeeze
        u = self.only_consumer(out, "Unsqueeze")
        pv = self.only_consumer(u.output[0], "MatMul")
        sq = self.only_consumer(pv.output[0], "Squeeze")
        site.nodes += [u.name, pv.name, sq.name]
        v_index, site.v = self.window_gather(site, pv.input[1])
        if v_index != k_index:
            a, b = self.eval.values([k_index, v_index])
            if not np.array_equal(a, b):
                raise _Mismatch("keys and values are gathered with different window indices")
        site.window_index, site.output = k_index, sq.output[0]
        return site

    def window_gather(self, site: _Site, windows: str) -> tuple[str, str]:
        reshape = self.producer.get(windows)
        gather = self.producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
        if gather is None or gather.op_type != "Gather" or next(
                (a.i for a in gather.attribute if a.name == "axis"), 0) != 2:
            raise _Mismatch(f"{windows} is not a Reshape of a Gather along the token axis")
        if self.eval.kind(gather.input[1]) == 2:
            raise _Mismatch(f"{gather.name} gathers with a data-dependent index")
        site.nodes += [reshape.name, gather.name]
        shape = self.shapes.get(windows)
        if shape is not None and len(shape) == 5 and isinstance(shape[3], int) and shape[3] > 0:
            site.window = shape[3]
        elif self.eval.kind(reshape.input[1]) < 2:  # the exporter computed the shape from Shape ops
            target = self.eval.values([reshape.input[1]])[0].reshape(-1)
            if len(target) != 5 or target[3] <= 0:
                raise _Mismatch(f"window tensor {windows} is not [B, heads, N, K, D]: reshape to {target}")
            site.window = int(target[3])
        else:
            raise _Mismatch(f"window tensor {windows} has unknown window size: shape {shape}")
        return gather.input[1], gather.input[0]

    # -- bucketed form (lucidrains' local-attention: blocks of queries against looked-around key blocks)
    def match_bucketed(self, site: _Site, einsum: onnx.NodeProto, out: str) -> _Site:
        if len(einsum.input) != 2 or (self.rank(einsum.input[0]) or 0) < 3:
            raise _Mismatch(f"the scores come from {einsum.name} (Einsum) that is not a batched Q·Kᵀ")
        rank = self.rank(einsum.input[0])
        prefix = "abcdefgh"[:rank - 2]
        equation = canonical_einsum(next(a.s for a in einsum.attribute if a.name == "equation"))
        if equation != canonical_einsum(f"{prefix}iy,{prefix}jy->{prefix}ij"):
            raise _Mismatch(f"the scores come from Einsum {equation}, not a batched Q·Kᵀ")
        pv = self.only_consumer(out, "Einsum")
        pv_eq = canonical_einsum(next(a.s for a in pv.attribute if a.name == "equation"))
        if pv.input[0] != out or pv_eq != canonical_einsum(f"{prefix}ij,{prefix}jy->{prefix}iy"):
            raise _Mismatch(f"{pv.name} (Einsum {pv_eq}) is not probabilities · values")
        site.nodes += [einsum.name, pv.name]
        bq = self.strip_scale(site, einsum.input[0])
        bk, bv = einsum.input[1], pv.input[1]
        site.q, site.k, site.v = (self.bucket_source(b, role) for b, role in ((bq, "query"), (bk, "key"),
                                                                             (bv, "value")))
        unbucketed = [(role, b) for role, b, src in (("query", bq, site.q), ("key", bk, site.k), ("value", bv, site.v))
                      if b == src]
        if 0 < len(unbucketed) < 3:  # some sides are cut into buckets, these are not (or not only)
            role, name = unbucketed[0]
            node = self.producer.get(name)
            what = f"{node.op_type} ({node.name})" if node is not None else "a graph input"
            raise _Mismatch(f"the {role} buckets are computed by {what}, not only cut from a [B, heads, N, D] "
                            "tensor by reshapes, padding and gathers (e.g. rotary embeddings after bucketing)")
        ranks = {self.rank(site.q), self.rank(site.k), self.rank(site.v)}
        if len(ranks) != 1:
            raise _Mismatch(f"q/k/v before bucketing have different ranks {sorted(ranks, key=str)}")
        site.output = self.unbucketed_output(pv.output[0], ranks.pop())
        site.bucket = _Buckets(bq, bk, bv, pv.output[0], self.rank(site.q))
        return site

    def bucket_source(self, bucketed: str, role: str) -> str:
        """The [B, heads, N, D] (or [B*heads, N, D]) tensor the ``role`` buckets are cut from.

        Walks back through element-moving ops (reshapes, padding, the look-around Gather) and takes
        the furthest rank-3/4 tensor; a Transpose ends the walk (it is where heads are split). The
        probe in :meth:`bucketed_dense` proves what the chosen tensor is; this only picks it.
        """
        name, best = bucketed, bucketed if self.rank(bucketed) in (3, 4) else None
        while True:
            node = self.producer.get(name)
            if node is None or node.op_type not in _MOVES or any(
                    self.eval.kind(i) == 2 for i in node.input[1:] if i):
                break
            name = node.input[0]
            if self.rank(name) in (3, 4):
                best = name
        if best is None:
            what = f"{node.op_type} ({node.name})" if node is not None else "a graph input"
            raise _Mismatch(f"the {role} buckets are computed by {what}, not only cut from a [B, heads, N, D] "
                            "tensor by reshapes, padding and gathers (e.g. rotary embeddings after bucketing)")
        return best

    def unbucketed_output(self, pv: str, rank: int) -> str:
        """The last tensor of ``rank`` in the chain of element-moving ops after the bucketed output."""
        name, best = pv, pv if self.rank(pv) == rank else None
        while True:
            users = self.consumer.get(name, [])
            if len(users) != 1 or users[0].op_type not in _MOVES or users[0].input[0] != name or any(
                    self.eval.kind(i) == 2 for i in users[0].input[1:] if i):
                break
            name = users[0].output[0]
            if self.rank(name) == rank:
                best = name
        if best is None:
            raise _Mismatch(f"the bucketed output {pv} is not reshaped back to rank {rank}")
        return best

    def bucketed_dense(self, site: _Site, sample: int) -> np.ndarray:
        """Dense bias [1, N, N] that the bucketed subgraph applies, proven with index probes.

        Every data path between Q/K/V and their buckets, and between the bucketed output and the
        output, consists of element-moving ops (checked while walking), so feeding ``offset + flat
        index`` into Q, K, V and the bucketed output and reading the buckets and the output back
        shows exactly which element lands where. Two offsets separate copied elements (shifted by
        the offset change) from padding constants (unchanged).
        """
        b = site.bucket
        probes = (site.q, site.k, site.v, b.pv)
        terms = [n for n, _ in site.biases] + [m for m, _ in site.masks]
        # a tensor that is itself probed (no bucketing on that side: plain einsum attention) reads as its probe
        names = [x + _PROBE if x in probes else x for x in (b.bq, b.bk, b.bv, site.output)]
        names += [*terms, *(p + _SHAPE for p in probes)]
        for p in probes:
            if self.eval.types.get(p, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                raise _Mismatch(f"{p} is not float32 (the bucketed form is only proven for float32 graphs)")
        # Without autopad only multiples of the bucket size run: a dynamic token axis is then
        # sampled at multiples of it instead.
        token = (self.shapes.get(site.q) or [None, None])[-2]
        bucket = (self.shapes.get(b.bq) or [None, None])[-2]
        if isinstance(token, str) and not isinstance(bucket, int):  # dynamo names the bucket count (seq//w)
            found = re.search(rf"\({re.escape(token)}//(\d+)\)", " ".join(map(str, self.shapes.get(b.bq) or [])))
            bucket = int(found.group(1)) if found else None
        retry = {token: (7, 11)[sample] * bucket} if isinstance(token, str) and isinstance(bucket, int) else None
        for sizes in (None, retry):
            try:
                runs = [self.eval.values(names, sample, probes, offset, sizes) for offset in (1.0, 3.0)]
                break
            # ORT's errors subclass Exception only; e.g. a sampled length the buckets cannot reshape
            except Exception as exc:  # noqa: BLE001
                error = f"{str(exc).splitlines()[0][:160]}"
                if sizes is not None or retry is None:
                    size = {**dict(zip(self.eval.dynamic_dims, _SAMPLES[sample])), **(sizes or {})}
                    raise _Mismatch(f"the bucketed subgraph does not run at sampled sizes {size}: {error}") from None
        first, second = runs
        shapes = [tuple(int(d) for d in v) for v in first[-4:]]
        if max(int(np.prod(sh)) for sh in shapes) >= 2 ** 24:
            raise _Mismatch("the bucketed tensors are too large to probe exactly in float32")

        def origin(i: int, source: tuple[int, ...]) -> np.ndarray:
            """Per element of output ``i``: flat index into the probed ``source`` tensor, -1 if not copied."""
            a, z = first[i].astype(np.float64), second[i].astype(np.float64)
            copied = z - a == 2.0
            if not ((z == a) | copied).all():
                raise _Mismatch(f"{names[i]} is not an element copy of the probed tensors")
            flat = np.where(copied, a - 1.0, -1).astype(np.int64)
            if (flat >= int(np.prod(source))).any():
                raise _Mismatch(f"{names[i]} copies from a tensor other than the one probed")
            return flat

        def rows(i: int, source: tuple[int, ...], what: str) -> np.ndarray:
            """Per row (last axis dropped) of output ``i``: row index into ``source`` [rows, D], -1 if padding."""
            flat = origin(i, source)
            d = source[-1]
            if flat.shape[-1] != d:
                raise _Mismatch(f"{what} buckets have {flat.shape[-1]} channels, the source has {d}")
            row = np.where(flat >= 0, flat // d, -1)
            lane = np.where(flat >= 0, flat % d, np.arange(d))
            if not (lane == np.arange(d)).all() or not (row == row[..., :1]).all():
                raise _Mismatch(f"the {what} buckets do not copy whole rows of the {what} tensor")
            return row[..., 0]

        sq, sk, sv, spv = shapes
        if not (sq[:-1] == sk[:-1] == sv[:-1]):
            raise _Mismatch(f"q/k/v shapes differ before bucketing: {sq}, {sk}, {sv}")
        n = sq[-2]
        q_rows, k_rows, v_rows = rows(0, sq, "query"), rows(1, sk, "key"), rows(2, sv, "value")
        if q_rows.shape[:-1] != k_rows.shape[:-1] or k_rows.shape != v_rows.shape:
            raise _Mismatch(f"bucket shapes do not line up: {q_rows.shape}, {k_rows.shape}, {v_rows.shape}")
        # output: every element must be a copy of the bucketed output at the same channel
        out_flat = origin(3, spv)
        if first[3].shape != (*sq[:-1], spv[-1]):
            raise _Mismatch(f"the output {first[3].shape} is not [*q.shape[:-1], Dv]")
        dv = spv[-1]
        if (out_flat < 0).any() or not (out_flat % dv == np.arange(dv)).all():
            raise _Mismatch("the output is not a row copy of the bucketed output")
        out_rows = (out_flat // dv)[..., 0].reshape(-1)            # per output row: bucketed row
        query_of = q_rows.reshape(-1)[out_rows]                     # which query that bucketed row holds
        if not np.array_equal(query_of, np.arange(len(out_rows))):
            raise _Mismatch("the output rows are not the bucketed rows of the same queries")
        total = np.zeros((1,), dtype=np.float64)
        for (_, mult), value in zip(site.biases, first[4:4 + len(site.biases)]):
            total = total + mult * value.astype(np.float64)
        for (_, keep_if_true), value in zip(site.masks, first[4 + len(site.biases):4 + len(terms)]):
            allowed = value.astype(bool) if keep_if_true else ~value.astype(bool)
            total = np.where(allowed, total, -np.inf)
        groups, slots = k_rows.shape[:-1], k_rows.shape[-1]
        try:
            total = np.broadcast_to(total, (*groups, q_rows.shape[-1], slots))
        except ValueError:
            raise _Mismatch(f"the mask {total.shape} does not broadcast over the scores") from None
        # only rows that reach the output matter (autopad's extra query rows see padded keys)
        total = total.reshape(-1, slots)[out_rows]                              # [B*heads*N, slots]
        group = out_rows // q_rows.shape[-1]
        keys, values = k_rows.reshape(-1, slots)[group], v_rows.reshape(-1, slots)[group]
        live = total > MASKED
        if not (keys[live] >= 0).all():
            row = int(np.argwhere(live & (keys < 0))[0, 0])
            raise _Mismatch(f"query {row % n} (of {n}) has an unmasked slot that holds padding, not a key "
                            "(e.g. autopad's zero keys, which non-causal local attention does not mask)")
        if not np.array_equal(keys[live], values[live]):
            raise _Mismatch("an unmasked slot pairs a key with the value of another token")
        query = np.broadcast_to(np.arange(len(out_rows))[:, None], live.shape)[live]
        if not np.array_equal(keys[live] // n, query // n):
            raise _Mismatch("a query attends to keys of another head or batch entry")
        # every head / batch entry must see the same relative structure: compare the per-row
        # (key, bias) lists, then build the dense bias of the first one only
        per_head_keys = np.where(live, keys % n, -1).reshape(-1, n, slots)
        per_head_bias = np.where(live, total, -np.inf).reshape(-1, n, slots)
        if not ((per_head_keys == per_head_keys[:1]).all() and (per_head_bias == per_head_bias[:1]).all()):
            raise _Mismatch("the bucketed mask differs between heads or batch entries")
        first_live = live[:n]
        rows_of = np.broadcast_to(np.arange(n)[:, None], first_live.shape)[first_live]
        cols = keys[:n][first_live]
        hits = np.zeros((n, n), dtype=int)
        np.add.at(hits, (rows_of, cols), 1)
        if (hits > 1).any():
            raise _Mismatch("a query's buckets hold the same key twice")
        dense = np.full((1, n, n), -np.inf)
        dense[0, rows_of, cols] = total[:n][first_live]
        return dense

    # -- dense bias at one sample of the dynamic sizes
    def proof(self, site: _Site, sample: int) -> Neighborhood:
        """:func:`analyse_bias` of the site's dense bias at a sample, worked out once per set of tensors the bias is
        made of (each site sharing them gets its own copy, and the same mismatch).

        Raises:
            _Mismatch: the bias cannot be computed, or it is no neighborhood's ("matched ... but ...").
        """
        key = (tuple(site.biases), tuple(site.masks), site.window_index, site.window, sample)
        proofs = {} if site.bucket is not None else self._proofs   # a bucketed site's scores are its own
        if key not in proofs:
            bias = self.dense_bias(site, sample)   # a bias that cannot be computed: its own mismatch
            try:
                proofs[key] = analyse_bias(bias)
            except _Mismatch as exc:
                form = "bucketed Einsum->Softmax->Einsum" if site.bucket else "MatMul->Softmax->MatMul"
                proofs[key] = _Mismatch(f"matched {form} but {exc}")
        if isinstance(proofs[key], _Mismatch):
            raise _Mismatch(str(proofs[key]))
        return copy.deepcopy(proofs[key])

    def dense_bias(self, site: _Site, sample: int) -> np.ndarray:
        if site.bucket is not None:
            return self.bucketed_dense(site, sample)
        names = [b for b, _ in site.biases] + [m for m, _ in site.masks]
        if site.window_index:
            names.append(site.window_index)
        values = self.eval.values(names, sample) if names else []
        nb = len(site.biases)
        total = np.zeros((1, 1, 1), dtype=np.float64)
        for (_, mult), value in zip(site.biases, values[:nb]):
            total = total + mult * value.astype(np.float64)
        for (_, keep_if_true), value in zip(site.masks, values[nb:nb + len(site.masks)]):
            allowed = value.astype(bool) if keep_if_true else ~value.astype(bool)
            total = np.where(allowed, total, -np.inf)
        total = total.reshape((-1,) + total.shape[-2:]) if total.ndim > 3 else total
        if total.ndim == 2:
            total = total[None]
        if total.ndim == 4:  # [1, heads, N, N]: a batch dimension must broadcast
            if total.shape[0] != 1:
                raise _Mismatch("the bias differs across the batch")
            total = total[0]
        if site.window_index is None:
            return total
        index = values[-1].reshape(-1, site.window)  # [N, K] key index per window slot
        n = index.shape[0]
        total = np.broadcast_to(total, (total.shape[0], n, site.window))
        dense = np.full((total.shape[0], n, n), -np.inf)
        rows = np.repeat(np.arange(n)[:, None], site.window, 1)
        live = total[0] > MASKED
        taken = np.zeros((n, n), dtype=int)
        np.add.at(taken, (rows[live], index[live]), 1)
        if (taken > 1).any():
            raise _Mismatch("a query's window holds the same key twice")
        dense[:, rows[live], index[live]] = total[:, live]
        return dense


def _find_sites(model: onnx.ModelProto) -> tuple[_Matcher, list[tuple[_Site, list[int], list[Neighborhood]]],
                                                  list[NearMiss]]:
    """Every proven site with the samples it was evaluated at and one proof per sample, and the near-misses."""
    matcher = _Matcher(model)
    found, misses, sites = [], [], []
    for node in list(model.graph.node):
        softmax = matcher.softmax_of(node)
        if softmax is None:
            continue
        try:
            site = matcher.match(softmax, node.name)
            if not site.biases and not site.masks and site.window_index is None and site.bucket is None:
                raise _Mismatch("no mask or bias before the softmax (plain attention)")
            sites.append((node, site))
        except _Mismatch as exc:
            misses.append(NearMiss(FAMILY, node.name, str(exc)))
    try:
        matcher.eval.compute_tokens([site.q for _, site in sites if _sampled(matcher.eval, site)], 0)
    except _Mismatch:
        pass   # each site meets its own error below
    for node, site in sites:
        try:
            samples = _samples(matcher, site)
            proofs = [matcher.proof(site, sample) for sample in samples]
            first = proofs[0]
            for other in proofs[1:]:
                if (other.kernel_size, other.dilation, other.is_causal, other.stride, len(other.grid)) != (
                        first.kernel_size, first.dilation, first.is_causal, first.stride, len(first.grid)) or not (
                        (other.rpb is None and first.rpb is None) or (
                        other.rpb is not None and first.rpb is not None and np.array_equal(other.rpb, first.rpb))):
                    raise _Mismatch("the mask's neighborhood changes with the input size")
            found.append((site, samples, proofs))
        except _Mismatch as exc:
            misses.append(NearMiss(FAMILY, node.name, str(exc)))
    return matcher, found, misses


def _samples(matcher: _Matcher, site: _Site) -> list[int]:
    """Which samples of the dynamic sizes (``_SAMPLES``) the site's dense bias is evaluated at.

    One when the bias is a constant; otherwise a pair, the smaller one when the default pair would
    make a dense bias of more than ``_MAX_SAMPLED_TOKENS`` squared entries and the smaller sizes
    shrink it (a static token count is evaluated at its own size, as large as the graph's own mask).
    """
    ev = matcher.eval
    if not _sampled(ev, site):
        return [0]
    if site.bucket is not None:
        return [0, 1]
    tokens = ev.tokens(site.q, 0)
    if tokens <= _MAX_SAMPLED_TOKENS:
        return [0, 1]
    small = ev.tokens(site.q, 2)
    if small == tokens:
        return [0, 1]
    if small > _MAX_SAMPLED_TOKENS:
        raise _Mismatch(f"the mask depends on the input sizes and has {small} tokens even at the small "
                        f"sampled sizes, too many to prove it on a dense [{small}, {small}] mask")
    return [2, 3]


def _sampled(ev: _Evaluator, site: _Site) -> bool:
    """Whether the site's dense bias depends on the input sizes (bucketed, or a bias, mask or window index computed
    from shapes): it is then evaluated at two samples."""
    return bool((site.bucket is not None and ev.dynamic_dims) or any(ev.kind(b) == 1 for b, _ in site.biases) or any(
        ev.kind(m) == 1 for m, _ in site.masks) or (site.window_index and ev.kind(site.window_index) == 1))


def _grid_dims(matcher: _Matcher, samples: list[int], proofs: list[Neighborhood]) -> list:
    """Per grid axis: an int (static) or ``(input, axis)`` read with Shape at run time.

    A grid axis whose size changes between the samples must be the input dimension that took
    exactly those sizes (``_SAMPLES`` makes that dimension unique).
    """
    dims = []
    for axis in range(len(proofs[0].grid)):
        values = [p.grid[axis] for p in proofs]
        if len(set(values)) == 1:
            dims.append(values[0])
            continue
        hit = None
        for info in matcher.eval.graph_inputs.values():
            for a, d in enumerate(info.type.tensor_type.shape.dim):
                if d.dim_value:
                    continue
                key = d.dim_param or f"{info.name}:{a}"
                if [matcher.eval.dim_sample(key, s) for s in samples] == values:
                    hit = (info.name, a)
        if hit is None:
            raise _Mismatch(f"grid axis {axis} of the mask ({values} at sampled sizes) is no input dimension")
        dims.append(hit)
    return dims


def _run(model: onnx.ModelProto, rewrite: bool) -> tuple[onnx.ModelProto, PassReport]:
    report = PassReport(FAMILY)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_nodes(work)
    matcher, found, misses = _find_sites(work)
    report.near_misses.extend(misses)
    new_nodes, new_inits = [], []
    types = matcher.eval.types
    for site, samples, proofs in found:
        nb = proofs[0]
        try:
            dims = _grid_dims(matcher, samples, proofs) if len(nb.grid) > 1 else (
                list(nb.grid) if len({p.grid for p in proofs}) == 1 else  # 1-D: Q's own token axis
                [(site.q, 1 if site.bucket is not None and site.bucket.rank == 3 else 2)])
        except _Mismatch as exc:
            report.near_misses.append(NearMiss(FAMILY, site.anchor, str(exc)))
            continue
        attrs = {"kernel_size": nb.kernel_size, "dilation": nb.dilation, "is_causal": nb.is_causal,
                 "scale": site.scale}
        if any(st != 1 for st in nb.stride):  # stride-1 reports keep the keys they always had
            attrs["stride"] = nb.stride
        prefix = f"{site.anchor}/neighborhood"
        report.matches.append(Match(FAMILY, plugin.OP_TYPE, sorted(set(site.nodes)),
                                    {"Q": site.q, "K": site.k or site.k_perm[0], "V": site.v},
                                    [site.output], attrs, {"grid": [d if isinstance(d, int) else list(d)
                                                                    for d in dims]}))
        if not rewrite:
            continue
        nodes = []
        k = site.k
        if site.k_perm is not None:
            k = f"{prefix}/K"
            nodes.append(helper.make_node("Transpose", [site.k_perm[0]], [k], name=f"{prefix}/transpose_k",
                                          perm=site.k_perm[1]))
        q, v = site.q, site.v
        out = site.output
        if site.bucket is not None and site.bucket.rank == 3:  # [B*heads, N, D]: one head per batch entry
            axis = _const(new_inits, f"{prefix}/head_axis", [1])
            for role in ("q", "k", "v"):
                name = {"q": q, "k": k, "v": v}[role]
                nodes.append(helper.make_node("Unsqueeze", [name, axis], [f"{prefix}/{role}4"],
                                              name=f"{prefix}/unsqueeze_{role}"))
            q, k, v, out = f"{prefix}/q4", f"{prefix}/k4", f"{prefix}/v4", f"{prefix}/out4"
        inputs = [q, k, v]
        if len(nb.grid) > 1:
            if all(isinstance(d, int) for d in dims):
                grid_shape = _const(new_inits, f"{prefix}/grid_shape", [0, 0, *dims, -1])
            else:
                parts = []
                for axis, d in enumerate(dims):
                    part = f"{prefix}/grid{axis}"
                    if isinstance(d, int):
                        _const(new_inits, part, [d])
                    else:
                        nodes.append(helper.make_node("Shape", [d[0]], [part], name=part, start=d[1], end=d[1] + 1))
                    parts.append(part)
                grid_shape = f"{prefix}/grid_shape"
                nodes.append(helper.make_node(
                    "Concat", [_const(new_inits, f"{prefix}/lead", [0, 0]), *parts,
                               _const(new_inits, f"{prefix}/tail", [-1])], [grid_shape], name=grid_shape, axis=0))
            for role, name in (("Q", q), ("K", k), ("V", v)):
                nodes.append(helper.make_node("Reshape", [name, grid_shape], [f"{prefix}/{role}_grid"],
                                              name=f"{prefix}/reshape_{role}"))
            inputs = [f"{prefix}/Q_grid", f"{prefix}/K_grid", f"{prefix}/V_grid"]
            out = f"{prefix}/O_grid"
        if nb.rpb is not None:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(types.get(site.q, onnx.TensorProto.FLOAT))
            rpb_name = f"{prefix}/rpb"
            new_inits.append(numpy_helper.from_array(nb.rpb.astype(dtype), rpb_name))
            inputs.append(rpb_name)
        static = all(isinstance(d, int) for d in dims)
        fused = plugin.make_node(inputs, [out], f"{prefix}/fused", **attrs, grid=dims if static else None)
        nodes.append(fused)
        if len(nb.grid) > 1:
            v_dim = (matcher.shapes.get(v) or [None])[-1]
            if isinstance(v_dim, int) and v_dim > 0:
                flat = _const(new_inits, f"{prefix}/tokens_shape", [0, 0, -1, v_dim])
            else:
                shape_v, flat = f"{prefix}/shape_v", f"{prefix}/tokens_shape"
                nodes.append(helper.make_node("Shape", [v], [shape_v], name=shape_v, start=-1))
                nodes.append(helper.make_node("Concat", [_const(new_inits, f"{prefix}/lead3", [0, 0, -1]), shape_v],
                                              [flat], name=flat, axis=0))
            nodes.append(helper.make_node("Reshape", [out, flat], [site.output], name=f"{prefix}/reshape_O"))
        elif out != site.output:
            nodes.append(helper.make_node("Squeeze", [out, f"{prefix}/head_axis"], [site.output],
                                          name=f"{prefix}/squeeze_O"))
        new_nodes.append((site, nodes, fused))
    if not rewrite:
        return model, report
    # Nodes that the NATTEN translation (plugins/neighborhood/natten_compat.py) emitted at export
    # time have no function body yet: exporters cannot attach one.
    attached = attach_function_bodies(work)
    if not new_nodes:
        return (work, report) if attached else (model, report)
    produced = {o for site, _, _ in new_nodes for o in [site.output]}
    keep = [n for n in work.graph.node if not (set(n.output) & produced)]
    del work.graph.node[:]
    work.graph.node.extend(keep)
    for _, nodes, fused in new_nodes:
        work.graph.node.extend(nodes)
        plugin.add_to_model(work, fused)
    work.graph.initializer.extend(new_inits)
    toposort(work)
    remove_dead_nodes(work)
    report.rewritten = len(new_nodes)
    return work, report


def _const(inits: list, name: str, values: list[int]) -> str:
    inits.append(numpy_helper.from_array(np.asarray(values, dtype=np.int64), name))
    return name


def find(model: onnx.ModelProto) -> PassReport:
    """Report every neighborhood-attention subgraph (and near-miss) without changing ``model``."""
    return _run(model, rewrite=False)[1]


def apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Replace every proven neighborhood-attention subgraph by one ``attnc::NeighborhoodAttention`` node."""
    return _run(model, rewrite=True)


fuse_neighborhood_attention = apply
