"""Fuse neighborhood attention (NAT / DiNAT / NATTEN semantics) into ``attnc::NeighborhoodAttention``.

What it matches, around every ``Softmax`` over the last axis (or its ``Exp / ReduceSum / Div``
decomposition):

- **masked form**: ``Softmax(s * (Q @ Kᵀ) + bias [+ bias ...]) @ V`` and ``Where(mask, scores, -inf)``
  variants, where every bias / mask tensor depends on no input *value* (an initializer, a
  Constant, or a subgraph of shapes, ``Range`` and arithmetic that the exporter did not fold);
- **gather form**: ``Squeeze(Unsqueeze(Q) @ Transpose(Reshape(Gather(K, index, axis=2))))`` scores
  over ``[B, heads, N, window]``, the same bias / mask terms, then ``Unsqueeze(P) @ Reshape(Gather(V,
  index))``, with the same index tensor for K and V (``index_select`` / unfold of key windows).

The scale may sit on Q, on Kᵀ or on the scores (Mul or Div by a scalar, before or after the bias);
Kᵀ may be any Transpose of K. The bias / mask tensors are *evaluated* (ONNX Runtime on the subgraph
that computes them) and analysed: the allowed-key pattern must be exactly a NATTEN >= 0.20
neighborhood on a 1-D or 2-D grid (kernel size, dilation, causal per axis are recovered from it, and
for 2-D grids the H x W factorisation of N), masked entries must be ``<= -1e4`` (``-inf``, dtype
minimum, ``-1e9``: exp underflows to exactly 0), and the finite entries must be a relative positional
bias ``rpb[h, (j-i)/d + k - 1, ...]`` (the table is extracted). Then the whole dense bias is rebuilt
from the recovered parameters and compared entry by entry; anything else is a :class:`NearMiss`
with the reason. When the bias depends on a dynamic axis (a sequence or grid size), it is evaluated
and verified at two sampled sizes and the grid sizes are taken from the matching input dimensions
at run time (``Shape``); the sampling is the only non-exhaustive step.

It also completes ``attnc::NeighborhoodAttention`` nodes that the NATTEN export-time translation
(``attnc.plugins.neighborhood.natten_compat``) put in the graph, by attaching their function body.

What it emits: one ``attnc::NeighborhoodAttention`` node per match (function body from
``attnc.plugins.neighborhood``), with ``Reshape`` nodes around it for 2-D grids ([B, heads, N, D] ->
[B, heads, H, W, D] and back) and the RPB table as a new initializer; the scale is explicit. When
the grid is static the node gets the ``grid`` attribute (its ``*_static`` function overload lets
ONNX Runtime precompute every index/bias tensor). The dead subgraph (scores, mask computation) is
removed.

Not matched (near-miss): mask not a neighborhood (e.g. blocked local attention), mask that allows
every key (plain attention: left to the softmax pass), data-dependent bias, rank-3 Q/K/V, 3-D grids
in the masked form, K/V gathered with different indices.

Tests: ``tests/passes/test_neighborhood.py``; op contract: ``attnc.plugins.neighborhood``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.passes.core import (Match, NearMiss, PassReport, constant_value, consumers, name_nodes,
                               producers, remove_dead_nodes, toposort)
from attnc.plugins import neighborhood as plugin
from attnc.plugins import attach_function_bodies

FAMILY = "neighborhood"
MASKED = -1e4  # bias entries at or below this are "masked": exp(x - max) underflows to 0 in fp16/fp32
# Sizes given to dynamic input axes when a bias depends on them; distinct within a sample so a grid
# size can be traced back to exactly one input axis.
_SAMPLES = ([23, 29, 31, 37, 41, 43, 47, 53], [19, 25, 27, 33, 35, 39, 45, 51])


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
        self.shapes, self.types = _infer(model)
        self.dynamic_dims = sorted({d.dim_param or f"{i.name}:{a}"
                                    for i in self.graph_inputs.values()
                                    for a, d in enumerate(i.type.tensor_type.shape.dim) if not d.dim_value})

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

    def values(self, names: list[str], sample: int = 0) -> list[np.ndarray]:
        """Compute ``names`` (const or shape-only tensors) with ONNX Runtime at sampled input sizes."""
        import onnxruntime as ort

        direct = [constant_value(self.model, n) for n in names]
        if all(v is not None for v in direct):
            return direct
        graph = self.model.graph
        needed, nodes, seen = set(names), [], set()
        for node in reversed(graph.node):
            if any(o in needed for o in node.output) and node.name not in seen:
                seen.add(node.name)
                nodes.append(node)
                needed.update(i for i in node.input if i)
        nodes.reverse()
        inputs = [i for n, i in self.graph_inputs.items() if n in needed]
        sizes = dict(zip(self.dynamic_dims, _SAMPLES[sample]))
        feeds = {}
        for info in inputs:
            t = info.type.tensor_type
            shape = [d.dim_value or sizes[d.dim_param or f"{info.name}:{a}"] for a, d in enumerate(t.shape.dim)]
            feeds[info.name] = np.zeros(shape, dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
        outputs = [helper.make_tensor_value_info(n, self.types.get(n, onnx.TensorProto.FLOAT), None) for n in names]
        sub = helper.make_graph(nodes, "bias", inputs, outputs,
                                [i for i in graph.initializer if i.name in needed])
        model = helper.make_model(sub, opset_imports=self.model.opset_import, ir_version=self.model.ir_version)
        model.functions.extend(self.model.functions)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return session.run(names, feeds)

    def dim_sample(self, dim_name: str, sample: int) -> int:
        return dict(zip(self.dynamic_dims, _SAMPLES[sample]))[dim_name]


def _infer(model: onnx.ModelProto) -> tuple[dict[str, list], dict[str, int]]:
    """Tensor name -> shape (ints, symbolic names or None) and -> element type, from one inference."""
    try:  # no data propagation: it took seconds on graphs with large constant masks
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shapes and types are hints for matching, never a requirement
        inferred = model
    g = inferred.graph
    shapes, types = {}, {}
    for info in list(g.input) + list(g.output) + list(g.value_info):
        t = info.type.tensor_type
        types[info.name] = t.elem_type
        if t.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name], types[init.name] = list(init.dims), init.data_type
    return shapes, types


# ----------------------------------------------------------------------------- mask analysis

@dataclass
class Neighborhood:
    """What a bias tensor was proven to be."""

    grid: tuple[int, ...]
    kernel_size: list[int]
    dilation: list[int]
    is_causal: list[int]
    rpb: np.ndarray | None = None  # [heads or 1, 2k-1, ...] float64


def _axis_params(allowed: np.ndarray) -> tuple[int, int, int]:
    """(kernel_size, dilation, is_causal) of a per-axis allowed matrix ``[L, L]`` (not yet verified)."""
    counts = allowed.sum(1)
    kernel = int(counts.max())
    if kernel <= 1:
        return 1, 1, 0
    causal = int(not np.triu(allowed, 1).any())
    rows, cols = np.nonzero(allowed)
    gaps = np.abs(rows - cols)
    dilation = int(gaps[gaps > 0].min())
    return kernel, dilation, causal


def _grids(n: int):
    yield (n,)
    for rows in range(2, n // 2 + 1):
        if n % rows == 0:
            yield (rows, n // rows)


def analyse_bias(bias: np.ndarray) -> Neighborhood:
    """Prove that a dense additive bias ``[heads or 1, N, N]`` is a neighborhood mask (+ RPB).

    Raises _Mismatch with the reason when it is not.
    """
    bias = bias.astype(np.float64)
    allowed_h = bias > MASKED
    allowed = allowed_h[0]
    n = allowed.shape[-1]
    if not (allowed_h == allowed).all():
        raise _Mismatch("the mask differs between heads")
    if not allowed.any(1).all():
        raise _Mismatch("some query has every key masked")
    if allowed.all():
        raise _Mismatch("the mask allows every key (plain attention, left to the softmax pass)")
    if not (np.triu(allowed, 1).any()) and np.tril(allowed).all():
        raise _Mismatch("the mask is plain causal (every earlier key allowed), left to the softmax pass")
    first_reason = None
    for grid in _grids(n):
        try:
            found = _try_grid(allowed, grid)
        except _Mismatch as exc:
            first_reason = first_reason or str(exc)
            continue
        if found is not None:
            found.rpb = _extract_rpb(bias, allowed, found)
            return found
    raise _Mismatch(f"the mask is not a neighborhood mask on any 1-D or 2-D grid of {n} tokens"
                    + (f" (as 1-D: {first_reason})" if first_reason else ""))


def _try_grid(allowed: np.ndarray, grid: tuple[int, ...]) -> Neighborhood | None:
    if len(grid) == 1:
        axes = [allowed]
    else:
        rows, cols = grid
        m = allowed.reshape(rows, cols, rows, cols)
        axes = [m[:, 0, :, :].any(-1), m[0, :, :, :].any(1)]
    params = [_axis_params(a) for a in axes]
    ks, ds, cs = (list(p) for p in zip(*params))
    for length, k, d in zip(grid, ks, ds):
        if length < k * d:
            raise _Mismatch(f"kernel {k} x dilation {d} does not fit an axis of {length}")
    per_axis = [plugin.dense_mask_and_rel((n,), [k], [d], [c])[0] for n, k, d, c in zip(grid, ks, ds, cs)]
    counts = per_axis[0].sum(1)
    for extra in per_axis[1:]:  # O(N) pre-check before the O(N^2) comparison
        counts = np.outer(counts, extra.sum(1)).reshape(-1)
    if not np.array_equal(counts, allowed.sum(1)):
        row = int(np.argmax(counts != allowed.sum(1)))
        raise _Mismatch(f"query {row} sees {int(allowed[row].sum())} keys, a neighborhood on grid {grid} "
                        f"with kernel {ks}, dilation {ds}, causal {cs} sees {int(counts[row])}")
    expected = per_axis[0]
    for extra in per_axis[1:]:
        a, b = expected.shape[0], extra.shape[0]
        expected = (expected[:, None, :, None] & extra[None, :, None, :]).reshape(a * b, a * b)
    if not np.array_equal(expected, allowed):
        bad = np.argwhere(expected != allowed)[0]
        want = "-inf" if not expected[tuple(bad)] else "finite"
        raise _Mismatch(f"entry [{bad[0]},{bad[1]}] should be {want} for grid {grid}, kernel {ks}, "
                        f"dilation {ds}, causal {cs}")
    return Neighborhood(grid, ks, ds, cs)


def _extract_rpb(bias: np.ndarray, allowed: np.ndarray, nb: Neighborhood) -> np.ndarray | None:
    values = np.where(allowed, bias, 0.0)
    if not values.any():
        return None
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
    nodes: list[str] = field(default_factory=list)


class _Matcher:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.producer = producers(model)
        self.consumer = consumers(model)
        self.eval = _Evaluator(model)
        self.shapes = self.eval.shapes

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
        site = _Site(anchor=anchor, q="", k="", v="", output="", scale=1.0, nodes=list(names))
        scores = self.pre_softmax(site, src)
        node = self.producer.get(scores)
        if node is not None and node.op_type == "Squeeze":
            return self.match_gather(site, node, out)
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

    # -- dense bias at one sample of the dynamic sizes
    def dense_bias(self, site: _Site, sample: int) -> np.ndarray:
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


def _find_sites(model: onnx.ModelProto) -> tuple[_Matcher, list[tuple[_Site, list[Neighborhood]]], list[NearMiss]]:
    matcher = _Matcher(model)
    found, misses = [], []
    for node in list(model.graph.node):
        softmax = matcher.softmax_of(node)
        if softmax is None:
            continue
        try:
            site = matcher.match(softmax, node.name)
            if not site.biases and not site.masks and site.window_index is None:
                raise _Mismatch("no mask or bias before the softmax (plain attention)")
            samples = [0, 1] if any(matcher.eval.kind(b) == 1 for b, _ in site.biases) or any(
                matcher.eval.kind(m) == 1 for m, _ in site.masks) or (
                site.window_index and matcher.eval.kind(site.window_index) == 1) else [0]
            proofs = []
            for sample in samples:
                bias = matcher.dense_bias(site, sample)
                try:
                    proofs.append(analyse_bias(bias))
                except _Mismatch as exc:
                    raise _Mismatch(f"matched MatMul->Softmax->MatMul but {exc}") from None
            first = proofs[0]
            for other in proofs[1:]:
                if (other.kernel_size, other.dilation, other.is_causal, len(other.grid)) != (
                        first.kernel_size, first.dilation, first.is_causal, len(first.grid)) or not (
                        (other.rpb is None and first.rpb is None) or (
                        other.rpb is not None and first.rpb is not None and np.array_equal(other.rpb, first.rpb))):
                    raise _Mismatch("the mask's neighborhood changes with the input size")
            found.append((site, proofs))
        except _Mismatch as exc:
            misses.append(NearMiss(FAMILY, node.name, str(exc)))
    return matcher, found, misses


def _grid_dims(matcher: _Matcher, proofs: list[Neighborhood], site: _Site) -> list:
    """Per grid axis: an int (static) or ``(input, axis)`` read with Shape at run time."""
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
                if [matcher.eval.dim_sample(key, s) for s in range(len(proofs))] == values:
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
    for site, proofs in found:
        nb = proofs[0]
        try:
            dims = _grid_dims(matcher, proofs, site) if len(nb.grid) > 1 else (
                list(nb.grid) if len({p.grid for p in proofs}) == 1 else [(site.q, 2)])  # 1-D: Q's own axis
        except _Mismatch as exc:
            report.near_misses.append(NearMiss(FAMILY, site.anchor, str(exc)))
            continue
        attrs = {"kernel_size": nb.kernel_size, "dilation": nb.dilation, "is_causal": nb.is_causal,
                 "scale": site.scale}
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
        inputs = [q, k, v]
        out = site.output
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
