"""Head pruning: score attention heads on calibration data, then slice them out of the ONNX weights.

Finds every attention layer in an exported graph, whatever its core looks like:

- the decomposed form ``MatMul(Q, Kᵀ) [·s] [+mask] -> Softmax -> MatMul(P, V)`` (both exporters);
- the same with attention sinks (gpt-oss): ``softmax(concat([scores, sink], -1) [- max])[..., :-1] · V``, the
  probabilities' last column dropped by a ``Slice`` before P·V, the scores reached through the sink ``Concat``
  (and the subtraction of the row's ``ReduceMax``); the sink logits are a per-head constant sliced with the
  heads (the ``[1, H, 1, 1]`` parameter an ``Expand`` broadcasts over batch and queries, its target's heads entry
  checked to be 1, or a static export's folded column), so the pruned graph still fuses (``passes/softmax.py``);
- an ONNX ``Attention`` node with 4-D ``[B, H, S, D]`` inputs (what ``passes/softmax.py`` emits);
- a fused ``attnc::*`` node (heads-first ``[B, H, ..., D]`` Q/K/V and output, see ``plugins/``);
- agent attention unfused: two softmax cores chained through the agent tokens, as
  ``passes.agent`` matches them, taken as one layer;
- lightning attention's blockwise loop (MiniMax's prefill, unrolled by the export at a static length),
  which has no core of its own: where the graph has its intra-block term ``((q·kᵀ) ⊙ M)·v``,
  ``passes.linear`` fuses the graph's linear attention first (in :func:`find_attention_layers` and
  :func:`prune_heads`, so the pipeline's prune-before-fuse order finds it; the pruned graph holds the
  fused ``attnc::KernelLinearAttention``, its per-head decay sliced).

From the core, Q, K and V are walked back to their projection (``MatMul`` by a constant
weight ``[C_in, C_out]``, optional bias ``Add``, optional channel ``Split``, elementwise activations of
all its channels: MiniMax's SiLU on ``qkv_proj``, exported as ``x·Sigmoid(x)``) through the
data-movement ops exporters emit for the head split (``Reshape`` to ``[.., (3,) H, D]``,
``Transpose``, ``Slice``/``Gather``/``Split``/``Squeeze`` of the q/k/v slot, scalar ``Mul``/``Div``)
and the ops that act within each head: rotary embeddings ``q·cos + rotate_half(q)·sin`` (``Neg``,
``Slice``/``Split``/``Concat`` on the last, head-dim axis, elementwise ops with a table that is
constant over the heads axis — checked in the shapes, or by evaluating a table computed from
shapes only). Where several inputs carry the data, each is walked and all must reach the same
head split. Tracking the head axis through that chain gives, for every head, the projection
columns it owns, whatever the layout (fused ``qkv`` as ``[3, H, D]``, separate q/k/v, heads-outer
``[H, 3, D]``). The head split may also drop unit axes (GPT-BigCode's query: ``[B, 1, S, C] -> [B, S,
H, D]``, the channel dims being the trailing target dims that multiply to ``C``), or be an
``Unsqueeze`` that makes a heads axis of one (GPT-BigCode's multi-query K/V, cut from
``c_attn(x).unsqueeze(1)`` beside the query). An RMSNorm across all the heads between the projection and
the head split (OLMo2's ``q_norm`` / ``k_norm`` over all ``H·D`` channels) is passed: its weight is sliced
with the heads and it keeps dividing by the original width, as the norm across merged heads below (the
pruned heads' projection channels count as zeros in front of it; :func:`head_gates` gates the norm's input so);
any other statistic across the heads there (a LayerNorm) is refused with that reason. A write of a range of the
head dim, ``x[..., a:b] = y`` (a ``ScatterND``: dynamo's between Transposes with a constant index range,
TorchScript's with the full grid of the range's positions, evaluated), is walked like a ``Concat`` of its
parts. A part without heads of its own, ``Expand`` of a tensor with one entry on the heads axis (DeepSeek-V3's
multi-head latent attention: one rotary key per token in every head's key) or a ``ConstantOfShape`` (the empty
key written into), is shared by all the heads: only its shape's head entry changes, rewritten where constant
(each write gets its own copy of a source another write shares: the dynamo exporter shares the empty key
between layers) or checked to be read from the heads on the path. The output is walked forward
(``Transpose``, ``Reshape`` to ``[.., H·D]``) to the output projection, whose input rows per head
follow the same way (through Slice/Concat on the token axis and the Add of a term computed from V).

Between the merged heads and the output projection, ops that act on each channel on its own are
followed and sliced with the heads: a constant ``[C]`` weight (a norm's), a gate computed elementwise
from a constant projection of another tensor (its columns go; MiniMax's lightning attention is
``out_proj(norm(o) · sigmoid(output_gate(x)))``), and an RMSNorm across all the channels (decomposed:
``ReduceMean`` of the square, ``+ eps``, ``Sqrt``, divide; or ONNX ``RMSNormalization``). Semantics: a
pruned head's output is zero where the heads are merged, in front of the norm, and the norm keeps
dividing by the original channel count ``C``: its ``ReduceMean``, now over the ``C'`` kept channels, is
multiplied by ``C'/C``; an ``RMSNormalization`` reads its input times ``√(C'/C)`` with its scale divided by
that. The torch reference is the norm's input with those heads zeroed, which :func:`head_gates` does
for modules with such a ``norm``. A LayerNorm (or any other statistic) across the merged heads is refused.

Grouped-query attention (K/V with ``H_kv = H / g`` heads) is found from the repeat of the K/V heads
in front of the core (``Reshape(Expand|Tile(Unsqueeze))`` next to the heads axis: ``repeat_kv``,
``repeat_interleave``), an ONNX ``Attention`` with fewer K/V heads, or one K/V head broadcast by
the score ``MatMul`` (or made by an ``Unsqueeze``: GPT-BigCode). Heads are indexed per query head;
what goes is chosen by a ``granularity``: ``"group"`` (default) prunes whole groups (a K/V head
with its ``g`` query heads; a group scores the sum of its heads' scores), ``"query"`` keeps every
K/V head and drops the same ``r`` query heads from each group (``g -> g' = g - r``; the r-th heads
to go are each group's r-th lowest, scored as one unit of ``H_kv`` heads), the only way to prune a
multi-query layer. The repeat's constant head counts are rewritten; entries computed from the K/V
shape are checked to follow it, and where the group size itself changes the Expand/Tile group entry
becomes ``g'`` and the merge Reshape's head entry the constant ``H'`` (unless it is ``-1``). A
tiled repeat (query head ``h`` reads ``h % H_kv``) keeps that mapping by reordering the kept query
heads slot-major in the Q projection columns and output-projection rows.

Agent attention keeps heads on channel axes outside the core too: its agent tokens are Q's
grid average-pooled per channel, and a depthwise conv of V's grid is added to the merged
heads. Both paths are walked from Q / V tracking which factors (head, head dim, other) each
axis is made of, which gives the Reshape entries holding the heads and the conv channels of
each head; bias tables are sliced on their heads axis (folded first when TorchScript left
them computed from parameters).

:func:`prune_heads` keeps the columns/rows of the kept heads *in their original order*,
which keeps every layout valid with ``H`` replaced by ``H'``, and rewrites the head-count
entry of each head-split ``Reshape`` (and the ``H·D`` entry of the merge ``Reshape``). Shape
tensors shared between layers are never edited in place: each rewritten ``Reshape`` gets
its own shape (``Concat(original[:lead], constants)`` when the leading dims are dynamic). What it adds is
named after the layer with a prefix no name in the graph holds yet (``pruned``, then ``pruned2_``, ...), so a
pruned model can be pruned again.

:func:`score_heads` ranks heads: ``"activation"`` (ONNX route, any exported model): the
norm of each head's contribution through the output projection, ``‖O_h · W_o[h]‖``, from the
output projection's input exposed as an extra graph output and run in ONNX Runtime;
``"gradient"`` (Michel et al. 2019, torch route): ``Σ_x |∂L/∂g_h(x)|`` for a per-sample gate
``g_h = 1`` multiplied into each head's output by a forward pre-hook on the output projection;
``"ablation"`` (torch route): the rise of the calibration loss with the head gated off;
``"weight"``: ``‖W_o[h]‖`` (data-free baseline). :func:`select_heads_iteratively` prunes a
few heads at a time and re-scores the rest with those gone (Michel et al.'s iterative pruning).

Tests: ``tests/passes/test_prune_heads.py``; numbers: ``benchmarks/bench_shrink.py``; docs: ``docs/shrink.md``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.compiler.errors import AttncError
from attnc.compiler.validate import eval_mode
from attnc.passes import linear, softmax
from attnc.passes.core import (collapse_flat_transposes, constant_value, consumers, depends_on_data, evaluate_tensors,
                               drops_last_key, fixed_value, flat_transposes, name_nodes, same_dim, past_max_shift,
                               past_probability_casts, producers, remove_dead_nodes, sink_concat, toposort,
                               value_shapes)

log = logging.getLogger(__name__)

METHODS = ("activation", "gradient", "ablation", "weight")
# What grouped-query layers lose: whole K/V groups, or the same number of query heads in every group.
GRANULARITIES = ("group", "query")
# Random calibration inputs (no --calibration): batch, and every other named dynamic size.
CALIBRATION_BATCH, CALIBRATION_TOKENS = 8, 16
# Ops that only move data or scale it by a constant: the head axis can be tracked through them.
_SCALAR_OPS = ("Mul", "Div")
# Elementwise ops on the Q/K/V path: passed where the other operand is constant over the heads (rotary tables).
_ELEMENTWISE = ("Add", "Sub", "Mul", "Div", "Pow")
# Ops of one input that act on each element on its own (math and activations): on the Q/K/V path they stay
# within the head (a per-head RMSNorm's rsqrt, Qwen3's q_norm / k_norm), and a projection's channels pass
# them one by one (MiniMax's SiLU over its whole qkv projection).
_UNARY = ("Cast", "Identity", "Neg", "Sqrt", "Reciprocal", "Abs", "Exp", "Log", "Erf", "Relu", "Sigmoid", "Tanh",
          "Gelu", "Elu", "Selu", "LeakyRelu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish", "Swish")
# Reductions over the head dim that keep it (a per-head norm's mean): passed on the Q/K/V path.
_HEAD_DIM_REDUCTIONS = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceL2", "ReduceSumSquare")
# Per-head constant inputs of fused attnc nodes: input index -> heads axis (see plugins/*).
# Negative axes count from the end: agent biases broadcast to [B, H, n, M], so a folded
# [H, n, M] table and a [1, H, n, M] one both have their heads at -3 (learned agents too).
_PER_HEAD_INPUTS = {"NeighborhoodAttention": {3: 0}, "AgentAttention": {3: -3, 4: -3, 5: -3},
                    "KernelLinearAttention": {3: 0}}
_AGENT_CORES = ("agent", "attnc::AgentAttention")


class _Unrecognised(Exception):
    """A walk left the shapes it understands; the message says where."""


# ----------------------------------------------------------------------------- layer model

@dataclass
class _Projection:
    """A ``MatMul`` by a constant weight (+ bias) whose output columns feed one role."""

    matmul: str                 # node name (a MatMul, or a Gemm: HF's Conv1D in GPT-2)
    weight: str                 # initializer / constant name, [C_in, C_out] ([C_out, C_in] if transposed)
    bias_node: str | None
    bias: str | None
    split: tuple[str, int] | None  # (Split node, output index) between projection and reshape
    columns: np.ndarray         # [H, D]: projection output columns of each head (after the split offset)
    transposed: bool = False    # a Gemm with transB=1
    reshapes: tuple[str, ...] = ()  # Reshapes of the token axes between it and the heads whose channel
                                    # entry is written out (set to the new channel count on pruning)
    # An RMSNorm across all this role's heads between the projection and the head split (OLMo2's q_norm /
    # k_norm over H·D): its channel c is column ``columns.min() + c`` (it covers exactly these columns).
    norm: _ChannelOps | None = None

    def matrix(self, model: onnx.ModelProto) -> np.ndarray:
        """The weight as ``[C_in, C_out]``."""
        w = constant_value(model, self.weight)
        return w.T if self.transposed else w

    def set_matrix(self, model: onnx.ModelProto, node: onnx.NodeProto, w: np.ndarray, name: str) -> None:
        """Point the projection ``node`` at a new ``[C_in', C_out']`` weight."""
        _replace_input(model, node, 1, w.T if self.transposed else w, name)


@dataclass
class _HeadSplit:
    """The ``Reshape`` that turns ``[.., C]`` into ``[.., *rest]`` with a head axis in ``rest``."""

    node: str
    lead: int                   # leading dims kept from the input ([B, N] -> 2)
    rest: list[int]             # static trailing dims, e.g. [3, H, D]
    head_pos: int               # index of H in ``rest``


@dataclass
class _Depthwise:
    """A depthwise ``Conv`` over channels that belong to heads (agent attention's conv of V)."""

    node: str
    channel_heads: np.ndarray   # [C]: the head each channel belongs to
    positions: int | None       # output positions per channel (FLOPs), when static


@dataclass
class _ChannelOps:
    """What acts on each merged channel ``[.., H·Dv]`` between the core and the output projection besides
    moving it (MiniMax's lightning attention: ``out_proj(norm(o) · sigmoid(output_gate(x)))``)."""

    # (ReduceMean of an RMSNorm's mean square or an ONNX RMSNormalization, its float type): across all the heads
    norms: list[tuple[str, np.dtype]] = field(default_factory=list)
    weights: list[tuple[str, int]] = field(default_factory=list)  # (Mul / Div, input): a constant [.., C]
    gates: list[_Projection] = field(default_factory=list)  # projections of other tensors multiplied in;
                                                            # columns [1, C]: the column of each channel

    def weight_names(self, node_by_name: dict[str, onnx.NodeProto]) -> list[str]:
        """The per-channel weights and ``RMSNormalization`` scales (not the gates' projections)."""
        return [node_by_name[node].input[i] for node, i in self.weights] + \
            [node_by_name[node].input[1] for node, _ in self.norms if node_by_name[node].op_type == "RMSNormalization"]


@dataclass
class _Repeat:
    """Grouped-query attention's repeat of the K/V heads in front of the core: an ``Unsqueeze``
    next to the heads axis, ``Expand`` (or ``Tile``) of that axis to the group size ``g`` and a
    ``Reshape`` merging the two (transformers' ``repeat_kv``, ``repeat_interleave``)."""

    expand: str                 # the Expand / Tile node
    reshape: str                # the merge Reshape
    kv_axis: int                # axis of the KV heads in the Expand's output
    head_axis: int              # axis of the merged heads in the Reshape's output
    kv_major: bool              # query head h reads KV head h // g (repeat_kv), else h % H_kv (tiled)
    group: int | None           # g where the graph states it as a constant
    group_entry: int | None = None  # index of g in the Expand's shape / Tile's repeats (known once checked)
    rewrite_expand: bool = False    # the Expand's KV-head entry is a constant H_kv (rewritten on pruning)
    rewrite_reshape: bool = False   # the Reshape's head entry is a constant H (rewritten on pruning)
    reshape_infers: bool = False    # the Reshape's head entry is -1 (follows a new group size by itself)


@dataclass
class AttentionLayer:
    """One attention layer as found in the graph.

    Attributes:
        index: position in graph order (the key used by scores / keep dicts).
        anchor: name of the core node (``Softmax``, ``Attention`` or the fused node; the
            second stage's ``Softmax`` for unfused agent attention).
        core: ``"softmax"``, ``"Attention"``, ``"attnc::<Op>"`` or ``"agent"`` (agent
            attention's two chained softmax stages, unfused).
        heads: number of heads ``H``.
        head_dim: ``D`` of Q/K; ``value_dim``: ``Dv``.
        tokens: query tokens when static, else ``None``.
        agents: agent tokens ``n`` of agent attention (FLOPs), else ``None``.
    """

    index: int
    anchor: str
    core: str
    heads: int
    head_dim: int
    value_dim: int
    tokens: int | None
    key_tokens: int | None
    roles: dict[str, tuple[_HeadSplit, _Projection]] = field(default_factory=dict, repr=False)
    out_merge: _HeadSplit | None = field(default=None, repr=False)
    out_proj: _Projection | None = field(default=None, repr=False)
    per_head_constants: list[tuple[str, int, int]] = field(default_factory=list, repr=False)  # (node, input, axis)
    merged: str = ""   # the output projection's input [.., H·Dv] (what activation scoring exposes)
    agents: int | None = None
    # Outside the core, heads on a channel axis (agent attention: pooled agent tokens, conv of V):
    channel_reshapes: list[_HeadSplit] = field(default_factory=list, repr=False)  # rest[0]: heads × other dims
    depthwise: list[_Depthwise] = field(default_factory=list, repr=False)
    folded: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # computed per-head inputs, folded
    # Grouped-query attention: the K/V head each query head reads ([H]), None when K/V have H heads.
    kv_of_head: np.ndarray | None = field(default=None, repr=False)
    repeats: list[_Repeat] = field(default_factory=list, repr=False)  # repeats of the K/V heads to rewrite
    # Per-head terms on the scores (T5's / Swin's relative position bias, a per-head mask): (node,
    # input, heads axis), each gathered to the kept heads at run time (they may follow the length).
    score_terms: list[tuple[str, int, int]] = field(default_factory=list, repr=False)
    # Reshapes after the core that keep its shape but write the head count out: (node, heads axis).
    head_reshapes: list[tuple[str, int]] = field(default_factory=list, repr=False)
    kept_reshapes: dict[str, str] = field(default_factory=dict, repr=False)   # name -> _keeps_heads verdict
    heads_ranges: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # role -> (first, count)
    # Reshapes regrouping the axes inside each head on a role's path that write the head count out:
    # (node, heads axis, role, the head count there: H or H_kv, see _Walk.regroups).
    head_regroups: list[tuple[str, int, str, int]] = field(default_factory=list, repr=False)
    channel_ops: _ChannelOps = field(default_factory=_ChannelOps, repr=False)

    @property
    def kv_heads(self) -> int:
        """K/V heads: ``H_kv`` for grouped-query attention, else ``H``."""
        return self.heads if self.kv_of_head is None else int(self.kv_of_head.max()) + 1

    def kv_groups(self) -> list[list[int]] | None:
        """The query heads of each K/V head (pruned together), or ``None`` without grouping."""
        if self.kv_of_head is None:
            return None
        return [[int(h) for h in np.flatnonzero(self.kv_of_head == j)] for j in range(self.kv_heads)]

    def params(self, model: onnx.ModelProto) -> int:
        """Weights + biases of the projections, depthwise convs, per-head constants and per-channel ops
        (gate projections, norm weights) of this layer."""
        names = set()
        node_by_name = {n.name: n for n in model.graph.node}
        for _, proj in self.roles.values():
            names.update(n for n in (proj.weight, proj.bias) if n)
            names.update(proj.norm.weight_names(node_by_name) if proj.norm else ())
        names.update(n for n in (self.out_proj.weight, self.out_proj.bias) if n)
        for conv in self.depthwise:
            names.update(node_by_name[conv.node].input[1:3])
        ops = self.channel_ops
        names.update(n for gate in ops.gates for n in (gate.weight, gate.bias) if n)
        names.update(ops.weight_names(node_by_name))
        total = sum(int(np.prod(constant_value(model, n).shape)) for n in names if n)
        for node, i, _ in self.per_head_constants:
            total += int(self._per_head_value(model, node_by_name[node].input[i]).size)
        return total

    def _per_head_value(self, model: onnx.ModelProto, name: str) -> np.ndarray:
        value = self.folded.get(name)
        return constant_value(model, name) if value is None else value

    def flops(self, model: onnx.ModelProto, heads: int | None = None, tokens: int | None = None) -> int | None:
        """Multiply-adds ×2 of projections (gate projections of the merged heads too) and core at ``heads``
        heads (default: all).

        The core is ``N·M`` scores per head, or for agent attention its two stages through
        ``n`` agents (``n·M + N·n`` scores) plus the depthwise conv of V.
        """
        n = tokens or self.tokens
        m = tokens if tokens and self.key_tokens == self.tokens else (self.key_tokens or n)
        if n is None:
            return None
        h = self.heads if heads is None else heads
        h_kv = h * self.kv_heads // self.heads  # whole K/V groups go with their query heads
        projections = sum(proj.matrix(model).shape[0] * proj.columns.shape[1] * (h if role == "Q" else h_kv)
                          for role, (_, proj) in self.roles.items())
        projections += sum(gate.matrix(model).shape[0] for gate in self.channel_ops.gates) * h * self.value_dim
        c_out = self.out_proj.matrix(model).shape[1]
        scores = n * m
        if self.core in _AGENT_CORES:
            if self.agents is None:
                return None
            scores = self.agents * (m + n)
        convs = 0
        for conv in self.depthwise:
            if conv.positions is None:
                return None
            weight = constant_value(model, next(x for x in model.graph.node if x.name == conv.node).input[1])
            convs += 2 * conv.positions * int(np.prod(weight.shape[2:])) * len(conv.channel_heads) * h // self.heads
        return int(2 * n * projections + 2 * scores * h * (self.head_dim + self.value_dim)
                   + 2 * n * h * self.value_dim * c_out + convs)


# ----------------------------------------------------------------------------- finding layers

def find_attention_layers(model: onnx.ModelProto) -> list[AttentionLayer]:
    """Every attention layer whose heads can be sliced, in graph order.

    Raises:
        AttncError: the graph has no attention core at all, or none whose Q/K/V and
            output could be traced to constant projections (the reason is in the message).
    """
    layers, misses = survey_attention_layers(model)
    if not layers:
        if misses:
            raise AttncError("no prunable attention layer: " + "; ".join(misses[:3]),
                             "head pruning needs Q/K/V/output projections that are constant MatMul weights")
        raise AttncError("the model has no recognisable attention (no Softmax->MatMul core, Attention or "
                         "attnc node)", "head pruning applies to transformer models with multi-head attention")
    for miss in misses:
        log.warning("prune_heads: skipped %s", miss)
    return layers


def survey_attention_layers(model: onnx.ModelProto) -> tuple[list[AttentionLayer], list[str]]:
    """``(layers, misses)``: every attention layer whose heads can be sliced, in graph order, and for each
    other attention core why not (``"<core node>: <reason>"``). Both empty without attention."""
    model = _prepared(model)
    prod, cons = producers(model), consumers(model)
    shapes = value_shapes(model)
    _SHAPES_CACHE.clear()
    _SHAPES_CACHE[id(model)] = shapes
    layers: list[AttentionLayer] = []
    misses: list[str] = []
    cores = [(node, core) for node in model.graph.node if (core := _core(model, node, prod, cons)) is not None]
    agents = _unfused_agents(model, cores, prod, cons)
    first_stages = {stage1.name for stage1, _ in agents.values()}
    outputs, values = {core[4] for _, core in cores}, {core[3] for _, core in cores}
    for node, (kind, q, k, v, out) in cores:
        if node.name in first_stages:
            continue  # one layer with its second stage
        if node.name not in agents and (v in outputs or out in values):
            misses.append(f"{node.name}: one of two chained attention stages that are not agent attention as "
                          "passes.agent matches it (e.g. lowered to two ONNX Attention nodes: prune before lowering)")
            continue
        try:
            if node.name in agents:
                # Q and the output from the second stage, K and V from the first.
                stage1, match = agents[node.name]
                _, _, k, v, _ = _core(model, stage1, prod, cons)
                layers.append(_layer(model, len(layers), node, "agent", q, k, v, out, prod, cons, shapes,
                                     _agent_parts(model, match, q, prod)))
                continue
            layers.append(_layer(model, len(layers), node, kind, q, k, v, out, prod, cons, shapes))
        except _Unrecognised as why:
            misses.append(f"{node.name}: {why}")
    return layers, misses


def attention_cores(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, str, str, str, str]]:
    """``(core node, Q, K, V, output)`` of every attention core in graph order (no head analysis)."""
    _SHAPES_CACHE.clear()   # (a sink's Slice is read with the shapes of this model)
    prod, cons = producers(model), consumers(model)
    return [(node, *core[1:]) for node in model.graph.node if (core := _core(model, node, prod, cons)) is not None]


def value_projection(model: onnx.ModelProto, v: str) -> onnx.NodeProto | None:
    """The ``MatMul`` projecting the values ``v`` of an attention core, or ``None``.

    V carries no rotary embedding, so this works where Q/K cannot be traced (RoPE models).
    """
    _SHAPES_CACHE.clear()
    _SHAPES_CACHE[id(model)] = value_shapes(model)
    try:
        _, proj = _trace_input(model, v, producers(model), consumers(model))
    except _Unrecognised:
        return None
    return next(n for n in model.graph.node if n.name == proj.matmul)


@dataclass
class _AgentParts:
    """What agent attention adds to a layer: agent tokens pooled from Q, per-head biases."""

    q: str                      # heads-first Q the agents are pooled from
    agents: str                 # the agent tokens A [B, H, n, D] (or a constant)
    core_nodes: set[str]        # nodes of the core itself (not followed when walking from Q or V)
    biases: list[tuple[str, int]]   # (node, input) of each bias


def _unfused_agents(model, cores, prod, cons) -> dict[str, tuple[onnx.NodeProto, Any]]:
    """``{second-stage Softmax: (first-stage Softmax, passes.agent Match)}`` for each unfused
    agent attention: two softmax cores chained by their values, as ``passes.agent`` matches them."""
    by_out = {core[4]: node for node, core in cores}
    if not any(core[3] in by_out for _, core in cores):
        return {}  # no chained stages: skip the agent matcher's copy of the graph
    from attnc.passes import agent as agent_pass

    found = {}
    for match in agent_pass.find(model).matches:
        stage2 = by_out.get(match.outputs[0])
        stage1 = by_out.get(_core(model, stage2, prod, cons)[3]) if stage2 is not None else None
        if stage1 is not None:
            found[stage2.name] = (stage1, match)
    return found


def _agent_parts(model, match, q, prod) -> _AgentParts:
    """The agent parts of an unfused match (``passes.agent``'s roles and node list); the agents
    are followed from the second stage's queries ``q`` before their scale (a heads-first tensor,
    where the match's ``Q`` may lie before the head-split Transpose)."""
    if constant_value(model, match.inputs["A"]) is not None:
        raise _Unrecognised("learned agent tokens are constants inside both stages here; fuse the graph with "
                            "passes.agent first (the fused op's agents are sliced on their heads axis)")
    biases = [(n.name, list(n.input).index(match.inputs[role])) for role in ("agent_bias", "query_bias")
              if role in match.inputs for n in model.graph.node
              if n.name in match.nodes and match.inputs[role] in n.input]
    while (node := prod.get(q)) is not None and node.op_type in _SCALAR_OPS and node.name in match.nodes:
        q = next(i for i in node.input if constant_value(model, i) is None)
    return _AgentParts(q, match.inputs["A"], set(match.nodes), biases)


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy with every node named, the SDPA decomposition's Kᵀ as one Transpose
    (``passes.core.collapse_flat_transposes``; names of the tensors on Q/K/V paths stay valid) and
    attention without a core pruning can read fused (:func:`_fused_for_pruning`)."""
    if all(n.name for n in model.graph.node) and not flat_transposes(model) \
            and not softmax.has_flattened_heads(model) and not _has_lightning_blocks(model):
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    collapse_flat_transposes(copy)
    return _fused_for_pruning(copy)


def _fused_for_pruning(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the attention that has no core pruning can read fused: softmax attention computed on
    ``[B·H, S, D]`` (BLOOM's ``baddbmm``) into ONNX ``Attention``, whose 4-D inputs hold the heads apart (the
    flat form mixes them into the batch axis), and, where the graph has lightning attention's blocks
    (:func:`_has_lightning_blocks`), linear attention into ``attnc::KernelLinearAttention`` (``passes.linear``:
    MiniMax's blockwise loop, unrolled by the export, is no layer otherwise). The tensors the layers are
    scored by (each merge and output projection) keep their names."""
    if _has_lightning_blocks(model):
        model = linear.apply(model)[0]
    return softmax.apply(model, flattened_heads_only=True)[0]


def _has_lightning_blocks(model: onnx.ModelProto) -> bool:
    """Whether some ``MatMul`` of two computed tensors is multiplied by something and the product multiplied
    by a computed tensor: the intra-block term ``((q·kᵀ) ⊙ M)·v`` of lightning attention (cheap, unproven:
    ``passes.linear`` proves each match; a gated MLP's products meet constant weights)."""
    prod = producers(model)

    def computed(x) -> bool:
        return (node := prod.get(x)) is not None and node.op_type not in ("Constant", "Identity")

    for node in model.graph.node:
        mul = prod.get(node.input[0]) if node.op_type == "MatMul" and computed(node.input[1]) else None
        if mul is not None and mul.op_type == "Mul" and any(
                (x := prod.get(i)) is not None and x.op_type == "MatMul" and all(map(computed, x.input))
                for i in mul.input):
            return True
    return False


def _core(model, node, prod, cons):
    """``(kind, Q, Kᵀ-or-K, V, out)`` if ``node`` is an attention core, else ``None``."""
    if node.domain == "attnc" and len(node.input) >= 3:
        return f"attnc::{node.op_type}", node.input[0], node.input[1], node.input[2], node.output[0]
    if node.op_type == "Attention" and node.domain in ("", "ai.onnx"):
        return "Attention", node.input[0], node.input[1], node.input[2], node.output[0]
    if node.op_type != "Softmax":
        return None
    probs, _ = past_probability_casts(model, node.output[0], cons)
    if (sink_drop := _sink_drop(model, probs, cons)) is not None:
        probs, _ = past_probability_casts(model, sink_drop.output[0], cons)
    pv = [c for c in cons.get(probs, []) if c.op_type == "MatMul" and c.input[0] == probs]
    if len(pv) != 1:
        return None
    scores = _walk_scores(_scores_input(model, node, prod, cons), prod)
    if scores is None:
        return None
    return "softmax", scores.input[0], scores.input[1], pv[0].input[1], pv[0].output[0]


def _sink_drop(model, probs, cons) -> onnx.NodeProto | None:
    """The ``Slice(P, 0, -1)`` on the last axis that is the only reader of the probabilities ``probs``: the
    sink's column dropped before P·V (attention sinks, gpt-oss), else ``None``."""
    users = cons.get(probs, [])
    if len(users) != 1 or users[0].op_type != "Slice":
        return None
    return users[0] if drops_last_key(model, users[0], len(_shapes(model).get(probs) or []) or None) else None


def _sink_concat(model, node, prod, cons) -> onnx.NodeProto | None:
    """For a Softmax ``node`` whose last probability column is dropped (:func:`_sink_drop`): the
    ``Concat([scores, sink], -1)`` it normalises, past the max subtraction ``x - ReduceMax(x, -1)`` (gpt-oss's
    guard against overflow; a softmax does not change with a shift of its row); else ``None``."""
    if _sink_drop(model, past_probability_casts(model, node.output[0], cons)[0], cons) is None:
        return None
    rank = len(_shapes(model).get(node.input[0]) or []) or None
    x, _ = past_max_shift(model, node.input[0], prod, rank)
    return sink_concat(x, prod, rank)


def _sink_input(model, node, prod, cons) -> tuple[onnx.NodeProto, int] | None:
    """``(node, input)`` holding the sink logits of a Softmax ``node`` with attention sinks, sliced with the
    heads on axis -3: the ``[1, H, 1, 1]`` parameter an ``Expand`` broadcasts over batch and queries (its target's
    heads entry must be 1, as ``expand(B, -1, S, -1)`` exports), or the joined column itself (a static export's
    folded copy); ``None`` without sinks."""
    concat = _sink_concat(model, node, prod, cons)
    if concat is None:
        return None
    expand = prod.get(concat.input[1])
    if expand is None or expand.op_type != "Expand":
        return concat, 1
    entries = _shape_entries(model, expand.input[1], prod)
    if entries is None or len(entries) < 3 or entries[-3] != 1:
        raise _Unrecognised(f"{expand.name}: the sinks are expanded to {entries}, whose heads entry is not 1 (pruning "
                            "slices the sinks, not the shape they are expanded to)")
    return expand, 0


def _scores_input(model, node, prod, cons) -> str:
    """Where a Softmax ``node``'s scores path starts: its input, or the scores joined to the sinks."""
    concat = _sink_concat(model, node, prod, cons)
    return node.input[0] if concat is None else concat.input[0]


def _walk_scores(t, prod):
    """From the Softmax input back over mask / scale ops to ``MatMul(Q, Kᵀ)``."""
    found = _scores_path(t, prod)
    return None if found is None else found[0]


def _scores_path(t, prod) -> tuple[onnx.NodeProto, list[tuple[onnx.NodeProto, str]]] | None:
    """``(MatMul(Q, Kᵀ), [(node, the input carrying the scores)])`` from the Softmax input back over
    mask / bias / scale ops, or ``None``."""
    path = []
    for _ in range(8):
        node = prod.get(t)
        if node is None:
            return None
        if node.op_type == "MatMul":
            return node, path
        if node.op_type in ("Add", "Sub", "Mul", "Div"):
            computed = [i for i in node.input if i in prod and prod[i].op_type != "Constant"]
            matmul = [i for i in computed if prod[i].op_type in ("MatMul", "Mul", "Div", "Add", "Where", "Tanh")]
            if not matmul:
                return None
            nxt = next((i for i in matmul if prod[i].op_type == "MatMul"), matmul[0])
        elif node.op_type == "Where":
            nxt = node.input[2] if node.input[2] in prod and prod[node.input[2]].op_type != "Constant" else node.input[1]
        elif node.op_type in ("Cast", "Identity", "Tanh"):   # Tanh: Gemma 2's soft-capping
            nxt = node.input[0]
        else:
            return None
        path.append((node, nxt))
        t = nxt
    return None


def _score_terms(model, kind, node, prod, cons, heads: int) -> list[tuple[str, int, int]]:
    """``(node, input, -3)`` of each operand added to (or masking, scaling) the ``[B, H, S_q, S_kv]``
    scores that has ``heads`` entries on the heads axis: pruning gathers the kept heads from it.

    A softmax core's scores path (``_scores_path``) and an ONNX ``Attention`` node's ``attn_mask``
    are read; operands of size 1 there (HF's ``[B, 1, S, S]`` masks) or of rank < 3 broadcast.
    Where inference leaves the size unknown the operand is evaluated at two input sizes.
    """
    if kind == "softmax":
        found = _scores_path(_scores_input(model, node, prod, cons), prod)
        operands = [(n, i) for n, path in (found[1] if found else []) for i, x in enumerate(n.input)
                    if x and x != path]
    elif kind == "Attention" and len(node.input) > 3 and node.input[3]:
        operands = [(node, 3)]
    else:
        return []
    terms = []
    for owner, i in operands:
        x = owner.input[i]
        value = constant_value(model, x)
        shape = list(value.shape) if value is not None else _shapes(model).get(x)
        size = _dim_at(shape, 1, 4) if shape is None or len(shape) <= 4 else None
        if size is None:
            try:
                sizes = {_dim_at(list(r[x].shape), 1, 4) for r in evaluate_tensors(model, [x])}
            except Exception as exc:  # noqa: BLE001 - an operand that cannot be evaluated is not provably shared
                raise _Unrecognised(f"{owner.name}: cannot tell whether {x} on the scores has a heads axis "
                                    f"({type(exc).__name__})") from None
            if len(sizes) != 1:
                raise _Unrecognised(f"{owner.name}: {x} on the scores has {sorted(map(str, sizes))} entries on the "
                                    "heads axis at different input sizes")
            size = sizes.pop()
        if size in ("absent", 1):
            continue
        if size != heads:
            raise _Unrecognised(f"{owner.name}: {x} on the scores has {size} entries on the heads axis, not {heads}")
        terms.append((owner.name, i, -3))
    return terms


def _layer(model, index, node, kind, q, k, v, out, prod, cons, shapes,
           agent: _AgentParts | None = None) -> AttentionLayer:
    walks = {role: _projected_walk(_walk_back(model, t, prod), t) for role, t in (("Q", q), ("K", k), ("V", v))}
    for walk in walks.values():
        _restrict_columns(walk)
        _restrict_heads(walk)
        for node_name, entry in walk.follows:
            if not _follows_heads(model, entry, walk.path, prod):
                raise _Unrecognised(f"{node_name}: its shape's head entry {entry} is not read from the heads on the "
                                    "way to the core (pruning would not change it)")
    roles = {role: (walk.split, walk.proj) for role, walk in walks.items()}
    heads = {role: walk.proj.columns.shape[0] for role, walk in walks.items()}
    ranges = {role: walk.heads_range for role, walk in walks.items() if walk.heads_range is not None}
    h = heads["Q"]
    kv_of_head, repeats = None, []
    if heads["K"] != h or heads["V"] != h or walks["K"].repeat or walks["V"].repeat:
        kv_of_head, repeats = _grouping(model, kind, heads, walks, prod)
    elif walks["Q"].repeat:
        raise _Unrecognised(f"{walks['Q'].repeat.reshape}: the query heads are repeated")
    qd = roles["Q"][1].columns.shape[1]
    vd = roles["V"][1].columns.shape[1]
    # Tensors whose dims the core output shares on axes 0 (batch), 2 (queries) and 3 (value dim):
    # a Reshape after the core that reads its other entries from them keeps the heads axis.
    same_dims = {0: {out}, 2: {out}, 3: {out}}
    for role, axes in (("Q", (0, 2)), ("K", (0,)), ("V", (0, 3))):
        for tensor, head_axis in walks[role].path.items():
            if head_axis == 1 and _rank(model, tensor) == 4:
                for axis in axes:
                    same_dims[axis].add(tensor)
    merge, out_proj, merged, added, head_reshapes, kept_reshapes, channel_ops = _trace_output(
        model, out, h, vd, prod, cons, same_dims)
    if out_proj.columns.shape != (h, vd):
        raise _Unrecognised(f"output projection rows {out_proj.columns.shape} do not match {h} heads x {vd}")
    if kind == "attnc::AgentAttention":
        agent = _AgentParts(node.input[0], node.input[3], {node.name}, [])
    core_nodes = agent.core_nodes if agent else {prod[out].name}
    reshapes: list[_HeadSplit] = []
    depthwise: list[_Depthwise] = []
    # Terms added to the merged heads (agent attention's depthwise conv of V) lose the same channels.
    merged_heads = np.empty(h * vd, dtype=np.int64)
    for i, rows in enumerate(out_proj.columns):
        merged_heads[rows] = i
    for add, term in added:
        layout, found_reshapes, found_convs = _follow_channels(model, v, term, h, vd, core_nodes, prod, cons)
        if any(_holds_heads(axis) for axis in layout[:-1]) \
                or not np.array_equal(_channel_heads(layout[-1], term), merged_heads):
            raise _Unrecognised(f"{add}: the term added to the merged heads does not carry V's heads on the "
                                "same channels")
        reshapes += found_reshapes
        depthwise += found_convs
    per_head, folded = [], {}
    if kind == "attnc::KernelLinearAttention" and (node.input[4:5] not in ([], [""]) or
                                                   node.output[1:2] not in ([], [""])):
        raise _Unrecognised(f"{node.name} carries a recurrent state (input 4 / output 1) whose heads are part of "
                            "the model's inputs and outputs; prune the model before exporting its decode step")
    constants = [(node, i, axis) for i, axis in _PER_HEAD_INPUTS.get(node.op_type, {}).items()
                 if kind.startswith("attnc::") and i < len(node.input) and node.input[i]]
    node_by_name = {n.name: n for n in model.graph.node}
    constants += [(node_by_name[name], i, -3) for name, i in (agent.biases if agent else [])]
    if kind == "softmax" and (sink := _sink_input(model, node, prod, cons)) is not None:
        constants.append((*sink, -3))
    for owner, i, axis in constants:
        t = owner.input[i]
        value = constant_value(model, t)
        if value is None and agent is not None and t == agent.agents:
            continue  # agents pooled from Q: followed below
        computed = value is None
        if computed:
            value = _fold(model, t)
        if not -value.ndim <= axis < value.ndim:
            continue  # too few dims to reach the heads: broadcast over them
        if value.shape[axis] not in (h, 1):
            raise _Unrecognised(f"per-head input {i} of {owner.name} of shape {value.shape} does not have "
                                f"{h} heads on axis {axis}")
        if value.shape[axis] != h:
            continue  # broadcast over the heads
        per_head.append((owner.name, i, axis))
        if computed:
            folded[t] = value
    agents = None
    if agent is not None:
        a_shape = shapes.get(agent.agents) or []
        agents = a_shape[2] if len(a_shape) == 4 and isinstance(a_shape[2], int) else None
        if constant_value(model, agent.agents) is None:
            layout, found_reshapes, found_convs = _follow_channels(model, agent.q, agent.agents, h, qd,
                                                                   agent.core_nodes, prod, cons)
            # [B, H, n, D], or [B, H, D, n] where the unfused stages transpose it
            if len(layout) != 4 or layout[1] != [("h", h)] or _holds_heads(layout[0]) \
                    or sorted(_holds_heads(axis) for axis in layout[2:]) != [False, True] \
                    or [("d", qd)] not in layout[2:]:
                raise _Unrecognised(f"the agent tokens {agent.agents} do not keep Q's heads apart")
            agents = _size(next(axis for axis in layout[2:] if not _holds_heads(axis)))
            reshapes += found_reshapes
            depthwise += found_convs
    counts = (h, h if kv_of_head is None else int(kv_of_head.max()) + 1)
    for node_name, _, count in (r for walk in walks.values() for r in walk.regroups):
        if count not in counts:
            raise _Unrecognised(f"{node_name}: writes {count} heads on the Q/K/V path, neither the {counts[0]} query "
                                f"heads nor the {counts[1]} K/V heads")
    q_shape = shapes.get(q) or []
    v_shape = shapes.get(v) or []
    tokens = q_shape[2] if len(q_shape) == 4 and isinstance(q_shape[2], int) else None
    key_tokens = v_shape[2] if len(v_shape) == 4 and isinstance(v_shape[2], int) else None
    return AttentionLayer(index, node.name, kind, h, qd, vd, tokens, key_tokens, roles, merge, out_proj, per_head,
                          merged, agents, reshapes, depthwise, folded, kv_of_head=kv_of_head, repeats=repeats,
                          score_terms=_score_terms(model, kind, node, prod, cons, h), head_reshapes=head_reshapes,
                          kept_reshapes=kept_reshapes, heads_ranges=ranges, channel_ops=channel_ops,
                          head_regroups=list(dict.fromkeys((node_name, axis, role, count)
                                                           for role, walk in walks.items()
                                                           for node_name, axis, count in walk.regroups)))


def _grouping(model, kind, heads: dict[str, int], walks: dict[str, _Walk], prod
              ) -> tuple[np.ndarray, list[_Repeat]]:
    """Grouped-query attention: the KV head each query head reads, and the repeats of the K/V
    heads in front of the core (whose shape entries pruning rewrites)."""
    h, kv_heads = heads["Q"], heads["K"]
    repeat_k, repeat_v = walks["K"].repeat, walks["V"].repeat
    if heads["V"] != kv_heads or walks["Q"].repeat is not None or h % kv_heads:
        raise _Unrecognised(f"Q/K/V head counts {heads} are not grouped-query attention (query heads in whole "
                            "groups per K/V head, K and V alike)")
    group = h // kv_heads
    if repeat_k is None and repeat_v is None:
        if kind == "Attention" or (kind == "softmax" and kv_heads == 1):
            # ONNX Attention repeats each KV head g times (h // g); a MatMul broadcasts one KV head.
            return np.arange(h) // group, []
        raise _Unrecognised(f"Q/K/V head counts differ {heads} and the K/V heads are not repeated in a way "
                            "pruning can follow")
    if repeat_k is None or repeat_v is None or repeat_k.kv_major != repeat_v.kv_major:
        raise _Unrecognised(f"K and V heads are not repeated alike ({repeat_k and repeat_k.reshape}, "
                            f"{repeat_v and repeat_v.reshape})")
    for role, repeat in (("K", repeat_k), ("V", repeat_v)):
        _check_repeat(model, repeat, h, kv_heads, walks[role].path, prod)
    return (np.arange(h) // group if repeat_k.kv_major else np.arange(h) % kv_heads), [repeat_k, repeat_v]


def _fold(model, name) -> np.ndarray:
    """The value of ``name`` computed from constants only, e.g. the agent bias tables that the
    TorchScript exporter leaves as Resize/Reshape/Concat of parameters (dynamo folds them)."""
    value = fixed_value(model, name)
    if value is None:
        raise _Unrecognised(f"{name} is computed from the model's inputs")
    return value


@dataclass
class _Walk:
    """Where one of Q/K/V comes from: its head split and projection, the repeat of its heads
    (grouped-query K/V) and each tensor on the way with its heads axis."""

    split: _HeadSplit
    proj: _Projection
    repeat: _Repeat | None
    path: dict[str, int]
    # Positions on the head split's last (within-head) axis that reach the core, where known:
    # GPT-NeoX cuts Q, K and V out of one [.., H, 3·D] split by slices of that axis.
    used: np.ndarray | None = None
    # (first, count) of the split's heads this role takes when a Slice or GatherND of the heads axis
    # picks a range of them (Falcon: Q = heads[:-2], K = heads[[-2]], V = heads[[-1]]), else None.
    heads_range: tuple[int, int] | None = None
    # Reshapes that regroup the axes inside each head and write the head count out: (node, heads
    # axis, the head count there: the query heads' or the K/V heads'); also the Expand / ConstantOfShape
    # making a part shared by all the heads (:class:`_Shared`): (node, entry of its shape, the count).
    regroups: list[tuple[str, int, int]] = field(default_factory=list)
    # Head entries computed at run time of the shapes those make: (node, the entry as _shape_entries reads it),
    # checked to follow the heads of a tensor on the path (:func:`_follows_heads`).
    follows: list[tuple[str, Any]] = field(default_factory=list)


@dataclass
class _Shared:
    """A branch of a walk that carries no head's own values: a tensor without heads broadcast into every head
    by ``Expand`` (DeepSeek-V3's rotary key, one per token, in every head's key), or a ``ConstantOfShape`` (the
    empty key that part is written into). Only the head entries of the shapes it is made with change on
    pruning (``regroups``, ``follows`` as in :class:`_Walk`)."""

    regroups: list[tuple[str, int, int]] = field(default_factory=list)
    follows: list[tuple[str, Any]] = field(default_factory=list)
    # Where it is a tensor of one head broadcast by Expand: the walk of that tensor as the one head of its own,
    # which it is where no other branch has heads (a layer pruned to one head; K/V of one head expanded).
    as_one_head: Callable[[], _Walk | _Shared] | None = field(default=None, repr=False)

    def resolved(self) -> _Walk | _Shared:
        """The walk of the one head it may be (``as_one_head``), else itself."""
        if self.as_one_head is None:
            return self
        try:
            walk = self.as_one_head()
        except _Unrecognised:
            return self
        walk.regroups = self.regroups + walk.regroups
        walk.follows = self.follows + walk.follows
        return walk


def _trace_input(model, t, prod, cons) -> tuple[_HeadSplit, _Projection]:
    """Walk a heads-first ``[B, H, ..., D]`` tensor back to its head split and projection."""
    walk = _projected_walk(_walk_back(model, t, prod), t)
    return walk.split, walk.proj


def _projected_walk(walk: _Walk | _Shared, t: str) -> _Walk:
    """``walk``, unless all that ``t`` carries is shared by the heads (no projection columns of its own)."""
    walk = walk.resolved() if isinstance(walk, _Shared) else walk
    if isinstance(walk, _Shared):
        raise _Unrecognised(f"{t}: every head's values are one tensor without heads broadcast into all of them "
                            "(no per-head projection columns)")
    return walk


def _walk_back(model, t, prod, head_axis: int = 1, fixed: dict[int, int] | None = None,
               path: dict[str, int] | None = None, budget: list[int] | None = None,
               used: np.ndarray | None | str = "start") -> _Walk | _Shared:
    """Walk ``t`` (heads on ``head_axis``) back to its head-split Reshape and projection.

    Besides the data movement of the head split, it passes the ops that act within each head:
    unary ops (``_UNARY``), ``Slice``/``Split``/``Concat`` on the last (head-dim) axis, reductions
    over that axis (a per-head RMSNorm: Qwen3's ``q_norm``), and elementwise ``Add``/``Sub``/
    ``Mul``/``Div``/``Pow`` whose other operand is a table constant over the heads axis (rotary
    embeddings: ``q·cos + rotate_half(q)·sin``; the norm's weight ``[D]``). Where several inputs carry
    the data (the two rotary terms, the halves of ``rotate_half``), each is walked and all must
    reach the same head split with the same columns. A ``Reshape`` of an ``Expand``/``Tile`` of
    an ``Unsqueeze`` next to the heads is grouped-query attention's repeat of the K/V heads. A write of
    a range of the head dim (:func:`_slice_write`) is walked like a Concat of its parts; a part that is
    an ``Expand`` of a tensor without heads or a ``ConstantOfShape`` is a :class:`_Shared` branch.
    ``fixed`` holds the q/k/v slot selected on an axis (fused ``qkv``).
    """
    fixed = dict(fixed or {})
    path = {} if path is None else path
    # nodes walked over all branches: TorchScript's eager Qwen3 takes ~60 (its q_norm, both rotary terms, the
    # repeat of the K/V heads, each op spelled out)
    budget = [96] if budget is None else budget
    repeat = None
    regroups: list[tuple[str, int, int]] = []
    heads_range = None   # (first, count) within the current tensor's heads axis
    # ``used``: "start" (all of the current tensor's last axis: nothing cut yet), positions, or None
    # (unknown). Kᵀ reaches the core transposed, so "start" is resolved at the first cut.

    def resolve(used, tensor):
        if not isinstance(used, str):
            return used
        last_dim = _last_dim(model, tensor)
        return np.arange(last_dim) if last_dim else None

    follows: list[tuple[str, Any]] = []

    def done(walk: _Walk | _Shared) -> _Walk | _Shared:
        walk.regroups = regroups + walk.regroups
        walk.follows = follows + walk.follows
        if isinstance(walk, _Shared):
            if repeat is not None or heads_range is not None:
                raise _Unrecognised(f"{t}: a part shared by all the heads behind a repeat or a range of the heads")
            return walk
        if repeat is not None and walk.repeat is not None:
            raise _Unrecognised(f"{repeat.reshape}: the heads are repeated twice on the way to the core")
        walk.repeat = walk.repeat or repeat
        if heads_range is not None:
            if walk.heads_range is not None:
                raise _Unrecognised(f"{walk.split.node}: the heads are sliced twice on the way to the core")
            walk.heads_range = heads_range
        return walk

    while budget[0] > 0:
        budget[0] -= 1
        path[t] = head_axis
        node = prod.get(t)
        if node is None:
            raise _Unrecognised(f"{t} is not produced by a projection")
        op = node.op_type
        rank = _rank(model, t)
        last = None if rank is None else rank - 1
        within_head = last is not None and last != head_axis and last not in fixed
        if op in _UNARY or (op == "Concat" and len(node.input) == 1):
            t = node.input[0]
        elif op in _HEAD_DIM_REDUCTIONS and within_head and _attr(node, "keepdims", 1) \
                and [a % rank for a in _axes(model, node, 1)] == [last]:
            used = "start"   # the whole head dim is read (an RMSNorm's mean square)
            t = node.input[0]
        elif op in _ELEMENTWISE:
            data = _data_operands(model, node, head_axis, rank)
            if len(data) == 1:
                t = data[0]
                continue
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget, used) for x in data]
            return done(_same_walks(node, walks))
        elif op == "Concat":
            if not within_head or _attr(node, "axis", 0) % rank != last:
                raise _Unrecognised(f"{node.name}: Concat on the Q/K/V path is not along the head dim (last axis)")
            if any(constant_value(model, x) is not None for x in node.input):
                raise _Unrecognised(f"{node.name}: Concat of a constant onto the Q/K/V heads")
            sizes = [_last_dim(model, x) for x in node.input]
            starts = np.cumsum([0] + sizes[:-1]) if all(isinstance(n, int) and n > 0 for n in sizes) else None
            used = resolve(used, t)
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget,
                                None if used is None or starts is None else
                                used[(used >= o) & (used < o + n)] - o)
                     for x, o, n in zip(node.input, starts if starts is not None else sizes, sizes)]
            return done(_same_walks(node, walks))
        elif op in ("Transpose", "ScatterND") and (write := _slice_write(model, node, prod)) is not None:
            # x[..., a:b] = y (DeepSeek-V3's key: its own part and the rotary part shared by the heads written
            # into an empty key): positions [a, b) of the head dim come from y, the others from x
            data, updates, a, b, perm = write
            if len(perm) != rank:
                raise _Unrecognised(f"{node.name}: the rank of the write on the Q/K/V path is not known")
            if perm[-1] != rank - 1 and not isinstance(used, str):
                used = None
            head_axis, fixed = perm[head_axis], {perm[axis]: i for axis, i in fixed.items()}
            if head_axis == rank - 1 or rank - 1 in fixed:
                raise _Unrecognised(f"{node.name}: a write into the last axis, which is not the head dim, on the Q/K/V "
                                    "path")
            used = resolve(used, data)
            parts = [(data, None if used is None else used[(used < a) | (used >= b)]),
                     (updates, None if used is None else used[(used >= a) & (used < b)] - a)]
            walks = [_walk_back(model, x, prod, head_axis, fixed, path, budget, part) for x, part in parts]
            return done(_same_walks(node, walks))
        elif op in ("Expand", "ConstantOfShape"):
            # a shape that holds the heads: its entry there is rewritten or follows them (_head_entry)
            if (found := _head_entry(model, node, head_axis, rank, prod)) is not None:
                j, entry = found
                if isinstance(entry, int) and not isinstance(entry, bool) and entry > 1:
                    regroups.append((node.name, j, entry))
                elif entry != 1:
                    follows.append((node.name, entry))
            x = node.input[0]
            if op == "ConstantOfShape" or (at_heads := _dim_at(_shapes(model).get(x), head_axis, rank)) == "absent":
                return done(_Shared())   # one value everywhere, or a tensor without heads broadcast into all of them
            if at_heads == 1:   # the same, or one head (:meth:`_Shared.resolved`)
                return done(_Shared(as_one_head=lambda x=x, axis=head_axis, fixed=dict(fixed), used=used: _walk_back(
                    model, x, prod, axis, fixed, path, budget, used)))
            width = _last_dim(model, x)
            if _rank(model, x) != rank or not isinstance(used, str) and (width is None or width != _last_dim(model, t)):
                raise _Unrecognised(f"{node.name}: Expand on the Q/K/V path that is not of the batch or token axes")
            t = x
        elif op == "Transpose":
            perm = list(_attr(node, "perm"))
            if perm[-1] != len(perm) - 1 and not isinstance(used, str):
                used = None
            head_axis = perm[head_axis]
            fixed = {perm[a]: i for a, i in fixed.items()}
            t = node.input[0]
        elif op == "Squeeze":
            axes = _axes(model, node, 1)
            in_shape = _shapes(model).get(node.input[0])
            if not in_shape:
                raise _Unrecognised(f"{node.name}: Squeeze input rank unknown")
            in_rank = len(in_shape)
            axes = sorted(a % in_rank for a in axes)
            kept = [a for a in range(in_rank) if a not in axes]
            head_axis = kept[head_axis]
            fixed = {kept[a]: i for a, i in fixed.items()}
            for a in axes:
                fixed.setdefault(a, 0)
            t = node.input[0]
        elif op == "Slice":
            axes = constant_value(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is not None and within_head and all(int(a) % rank == last for a in axes):
                # a range of the head dim (rotate_half; GPT-NeoX's q/k/v): starts may be computed (D // 2)
                used = _shift_used(model, resolve(used, t), node.input[1], node.input[4] if len(node.input) > 4 else "",
                                   _last_dim(model, node.input[0]))
                t = node.input[0]
                continue
            starts = constant_value(model, node.input[1])
            ends = constant_value(model, node.input[2])
            if starts is None or ends is None or (len(node.input) > 4 and node.input[4]
                                                   and np.any(constant_value(model, node.input[4]) != 1)):
                raise _Unrecognised(f"{node.name}: non-constant or strided Slice on the Q/K/V path")
            axes = list(range(len(starts))) if axes is None else [int(a) for a in axes]
            for a, s, e in zip(axes, starts, ends):
                if a < 0:
                    if rank is None:
                        raise _Unrecognised(f"{node.name}: negative Slice axis on the Q/K/V path, rank unknown")
                    a %= rank
                if a == head_axis and heads_range is None and not fixed:
                    n = _dim_name(model, node.input[0], a)
                    heads_range = _heads_range(node, n, int(s), (int(e) if e < (n or 0) or e < 0 else None))
                    continue
                if a == head_axis or e - s != 1:
                    raise _Unrecognised(f"{node.name}: Slice of more than one slot (axis {a})")
                fixed[a] = fixed.get(a, 0) + int(s)
            t = node.input[0]
        elif op == "Gather" and heads_range is None and not fixed and _attr(node, "axis", 0) % (rank or 1) == head_axis \
                and (idx := constant_value(model, node.input[1])) is not None and idx.ndim == 1 and idx.size \
                and np.all(np.diff(idx) == 1):
            # x[:, :, [-2]] on the heads axis (Falcon's K and V under TorchScript): a range of the heads
            heads_range = _indexed_heads(node, _dim_name(model, node.input[0], head_axis), idx)
            t = node.input[0]
        elif op == "Gather":
            idx = constant_value(model, node.input[1])
            if idx is None or idx.ndim != 0:
                raise _Unrecognised(f"{node.name}: Gather on the Q/K/V path is not a constant scalar index")
            a = _attr(node, "axis", 0)
            if a < 0:
                if rank is None:
                    raise _Unrecognised(f"{node.name}: negative Gather axis on the Q/K/V path, rank unknown")
                a %= rank + 1   # the scalar index drops the axis: the input has one more
            shift = lambda x: x + 1 if x >= a else x  # noqa: E731
            head_axis = shift(head_axis)
            fixed = {shift(x): i for x, i in fixed.items()}
            fixed[a] = int(idx)
            t = node.input[0]
        elif op == "GatherND" and head_axis == 0 and heads_range is None and not fixed:
            # x[[i, ...]] on a leading heads axis (Falcon's K and V): rows of axis 0
            idx = constant_value(model, node.input[1])
            if idx is None or _attr(node, "batch_dims", 0) or idx.ndim != 2 or idx.shape[1] != 1 \
                    or np.any(np.diff(idx[:, 0]) != 1):
                raise _Unrecognised(f"{node.name}: GatherND on the Q/K/V path is not a range of the heads")
            heads_range = _indexed_heads(node, _dim_name(model, node.input[0], 0), idx[:, 0])
            t = node.input[0]
        elif op == "Split":
            if rank is None:
                raise _Unrecognised(f"{node.name}: Split on the Q/K/V path, rank unknown")
            a = _attr(node, "axis", 0) % rank   # (ModernBERT's unbind(dim=-3) under TorchScript)
            if within_head and a == last:
                sizes = _split_sizes(model, node)   # halves of the head dim (rotate_half written with chunk)
                j = list(node.output).index(t)
                used = resolve(used, t)
                used = None if used is None or sizes is None else used + int(sum(sizes[:j]))
                t = node.input[0]
                continue
            sizes = _split_sizes(model, node)
            j = list(node.output).index(t)
            if sizes is None or a == head_axis or sizes[j] != 1:
                raise _Unrecognised(f"{node.name}: Split on the Q/K/V path is not a per-slot split")
            fixed[a] = fixed.get(a, 0) + int(sum(sizes[:j]))
            t = node.input[0]
        elif op == "Unsqueeze" and rank is not None and not fixed and head_axis < rank - 1 and \
                [a % rank for a in _axes(model, node, 1)] == [head_axis]:
            # the heads axis made here: one head owning the input's channels (GPT-BigCode's multi-query
            # K/V, cut from c_attn(x).unsqueeze(1) by a Split of the channels, walked as `used`)
            if used is None:
                raise _Unrecognised(f"{node.name}: which channels of the one head it makes reach the core is not known")
            split = _HeadSplit(node.name, head_axis, [1, _channel_count(model, node)], 0)
            proj = _projection(model, node.input[0], np.arange(split.rest[1])[None, :], prod)
            return done(_Walk(split, proj, None, path, None if isinstance(used, str) else used))
        elif op == "Unsqueeze" and rank is not None and all(
                a % rank > head_axis for a in _axes(model, node, 1)) and all(a < head_axis for a in fixed):
            used = None   # a new axis inside the head (GPT-J's interleaved rotary stacks its two halves)
            t = node.input[0]
        elif op == "Reshape" and not any(a > head_axis for a in fixed) and \
                (verdict := _regroups_head(model, node, head_axis, prod)):
            used = None   # [.., H, D/2, 2] -> [.., H, D] (GPT-J's rotate_every_two flattens its pairs)
            if verdict == "written":
                count = _dim_name(model, node.input[0], head_axis)
                if not isinstance(count, int) or count <= 0:
                    raise _Unrecognised(f"{node.name}: the head count its target writes out is not known")
                regroups.append((node.name, head_axis, count))
            t = node.input[0]
        elif op == "Reshape":
            found = _repeat_of_heads(model, node, head_axis, fixed, prod)
            if found is None:
                split, proj = _head_split(model, node, head_axis, fixed, prod)
                return done(_Walk(split, proj, None, path, None if isinstance(used, str) else used))
            if repeat is not None:
                raise _Unrecognised(f"{node.name}: the heads are repeated twice on the way to the core")
            repeat, t = found
        elif op == "ScatterND":
            raise _Unrecognised(f"{node.name}: ScatterND on the Q/K/V path that is not a write of a range of the head "
                                "dim (x[..., a:b] = y, with indices that are that range, constant over the input "
                                "sizes)")
        else:
            raise _Unrecognised(f"{node.name}: {op} on the Q/K/V path")
    raise _Unrecognised(f"{t}: Q/K/V path too long")


def _slice_write(model, node, prod) -> tuple[str, str, int, int, list[int]] | None:
    """``(x, y, a, b, perm)`` where ``node``'s output is ``x`` with the range ``[a, b)`` of its last axis replaced by
    ``y`` (``x[..., a:b] = y``), transposed by ``perm`` (output axis ``i`` is axis ``perm[i]`` of ``x``), as exporters
    write it with ``ScatterND``, else None:

    - the dynamo exporter: ``Transpose(ScatterND(Transpose(x, p), i, Transpose(y, p)), q)`` where ``p`` brings the
      last axis to the front and the indices ``i`` ``[b - a, 1]`` are ``a, a + 1, ..`` (constant over the input sizes);
      ``q`` undoes ``p``, or does that and a transpose after it (``k.transpose(-1, -2)``): ``perm`` is ``p`` then ``q``;
    - TorchScript: ``ScatterND(x, i, y)`` whose indices are the full grid of ``x[..., a:b]``'s positions (evaluated at
      two input sizes: computed from shapes at run time, they follow pruned heads). Its ``y`` is a ``Reshape`` of
      ``Expand(y', Shape(x[..., a:b]))`` to the grid's shape, which is ``y'`` broadcast to ``x[..., a:b]``'s shape (the
      shapes agree whenever ScatterND runs): the returned ``y`` is then that ``Expand``."""
    if node.op_type == "Transpose":
        scatter = prod.get(node.input[0])
        if scatter is None or scatter.op_type != "ScatterND" or _attr(scatter, "reduction", b"none") not in (
                "none", b"none"):
            return None
        inner = [prod.get(scatter.input[i]) for i in (0, 2)]
        if any(n is None or n.op_type != "Transpose" for n in inner):
            return None
        q, p = list(_attr(node, "perm")), list(_attr(inner[0], "perm"))
        if list(_attr(inner[1], "perm")) != p or len(q) != len(p) or p[0] != len(p) - 1:
            return None
        index = fixed_value(model, scatter.input[1])
        width = _dim_name(model, inner[0].input[0], -1)
        if index is None or index.ndim != 2 or index.shape[1] != 1 or not index.size or not isinstance(width, int) \
                or np.any(np.diff(index[:, 0]) != 1) or not 0 <= index[0, 0] <= index[-1, 0] < width:
            return None
        return inner[0].input[0], inner[1].input[0], int(index[0, 0]), int(index[-1, 0]) + 1, [p[j] for j in q]
    if node.op_type != "ScatterND" or _attr(node, "reduction", b"none") not in ("none", b"none"):
        return None
    x, indices, y = node.input
    if depends_on_data(model, indices):
        return None
    try:
        runs = evaluate_tensors(model, [indices, x])
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        return None
    ranges = set()
    for run in runs:
        index, shape = run[indices], run[x].shape
        rank = len(shape)
        if index.ndim != rank + 1 or index.shape[-1] != rank or index.shape[:-2] != shape[:-1] or not index.size:
            return None
        a, n = int(index.reshape(-1, rank)[0, -1]), index.shape[-2]
        grid = np.indices((*shape[:-1], n))
        grid[-1] += a
        if not 0 <= a <= a + n <= shape[-1] or not np.array_equal(index, np.moveaxis(grid, 0, -1)):
            return None
        ranges.add((a, a + n))
    if len(ranges) != 1:
        return None
    a, b = ranges.pop()
    reshape = prod.get(y)
    expand = prod.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    shape = prod.get(expand.input[1]) if expand is not None and expand.op_type == "Expand" else None
    part = prod.get(shape.input[0]) if shape is not None and shape.op_type == "Shape" and \
        _attr(shape, "start", 0) == 0 and _attr(shape, "end") is None else None
    if part is not None and part.op_type == "Slice" and part.input[0] == x and \
            _last_axis_range(model, part) == (a, b):
        y = expand.output[0]
    return x, y, a, b, list(range(len(_shapes(model).get(x) or [])))


def _last_axis_range(model, node) -> tuple[int, int] | None:
    """``(start, stop)`` of a step-1 ``Slice`` of only the last axis of a tensor whose last axis has a static size,
    clipped to it; else None."""
    rank, width = _rank(model, node.input[0]), _dim_name(model, node.input[0], -1)
    bounds = [constant_value(model, node.input[i]) if len(node.input) > i and node.input[i] else None
              for i in range(1, 5)]
    if rank is None or not isinstance(width, int) or any(b is None for b in bounds[:3]) or bounds[2].size != 1 \
            or int(bounds[2].reshape(-1)[0]) % rank != rank - 1 or bounds[3] is not None and np.any(bounds[3] != 1):
        return None
    start, stop = (int(b.reshape(-1)[0]) for b in bounds[:2])
    start, stop = (min(max(v + width if v < 0 else v, 0), width) for v in (start, stop))
    return start, stop


def _head_entry(model, node, head_axis: int, rank: int | None, prod) -> tuple[int, Any] | None:
    """``(index, entry)`` at the heads axis of the shape an ``Expand`` broadcasts to or a ``ConstantOfShape`` makes
    (:func:`_shape_entries`' reading), or None where an ``Expand``'s shorter shape does not reach the heads."""
    entries = _shape_entries(model, node.input[_shape_input(node)], prod)
    if entries is None or rank is None:
        raise _Unrecognised(f"{node.name}: the shape it makes on the Q/K/V path cannot be read")
    j = head_axis - (rank - len(entries))
    if node.op_type == "ConstantOfShape" and len(entries) != rank:
        raise _Unrecognised(f"{node.name}: makes {len(entries)} axes where the Q/K/V path has {rank}")
    return (j, entries[j]) if j >= 0 else None


def _shape_input(node) -> int:
    """The input holding the shape a ``Reshape`` / ``Expand`` / ``ConstantOfShape`` makes."""
    return 0 if node.op_type == "ConstantOfShape" else 1


def _follows_heads(model, entry, path: dict[str, int], prod) -> bool:
    """Whether a shape ``entry`` (:func:`_shape_entries`) is the head count of a tensor on a role's ``path``
    (``{tensor: heads axis}``): that dim read from such a tensor, or from a ``Slice`` of it that leaves the heads
    alone, or from a dim that inference names as the heads of a tensor on the path."""
    if not isinstance(entry, tuple) or entry[0] != "dim":
        return False
    t, axis = entry[1], entry[2]
    while (node := prod.get(t)) is not None and node.op_type == "Slice" and len(node.input) > 3 and \
            (axes := constant_value(model, node.input[3])) is not None and (rank := _rank(model, t)) and \
            axis not in [int(a) % rank for a in axes.reshape(-1)]:
        t = node.input[0]
    if path.get(t) == axis:
        return True
    name = _dim_name(model, t, axis)
    return isinstance(name, str) and bool(name) and any(_dim_name(model, p, a) == name for p, a in path.items())


def _channel_count(model, unsqueeze) -> int:
    """The static channel count (last axis) of the input of an Unsqueeze that makes a single-head axis."""
    channels = _last_dim(model, unsqueeze.input[0])
    if channels is None:
        raise _Unrecognised(f"{unsqueeze.name}: the channel count of the single head it makes is not known")
    return channels


def _regroups_head(model, reshape, head_axis: int, prod) -> str | None:
    """Whether ``reshape`` keeps every axis up to the heads (and maybe more) and only regroups the last
    ones, each head's elements staying in that head (``[.., H, D/2, 2] -> [.., H, D]``; or none: Falcon's
    shape-keeping ``reshape(B, H, S, D)`` of Q under TorchScript): ``"follows"`` when its
    target reads the head count (-1, 0, the input's dim), ``"written"`` when it holds it as a constant
    (rewritten on pruning), else None. A leading axis is kept when inference names it alike on both
    sides, or the target copies it (0), reads it from the input or from a dim of the same name, or
    writes the input's static size; the regrouped sizes are static (one may be -1)."""
    shapes = _shapes(model)
    src = shapes.get(reshape.input[0])
    entries = _shape_entries(model, reshape.input[1], prod)
    if not src or not entries or len(src) <= head_axis + 1 or len(entries) <= head_axis + 1:
        return None
    dst = shapes.get(reshape.output[0]) or [None] * len(entries)

    def kept(a) -> bool:
        return same_dim(src[a], dst[a]) or (entries[a] == 0 and not _attr(reshape, "allowzero", 0)) or \
            _entry_keeps(model, reshape, entries[a], a, src[a])

    # the kept leading axes: up to the heads, then any more (Cohere regroups [B, H, S, D/2, 2] after S)
    k = head_axis + 1
    while k < min(len(src), len(entries)) - 1 and kept(k):
        k += 1
    inner_src, inner_dst = src[k:], entries[k:]
    if not all(isinstance(d, int) and d > 0 for d in inner_src) or \
            not all(isinstance(e, int) and not isinstance(e, bool) and (e > 0 or e == -1) for e in inner_dst) or \
            sum(e == -1 for e in inner_dst) > 1 or \
            (-1 not in inner_dst and int(np.prod(inner_src)) != int(np.prod(inner_dst))) or \
            not all(kept(a) for a in range(head_axis)):
        return None
    entry = entries[head_axis]
    if entry == 0 and not _attr(reshape, "allowzero", 0) or entry == -1 and -1 not in inner_dst or \
            entry == ("dim", reshape.input[0], head_axis):
        return "follows"
    return "written" if kept(head_axis) and isinstance(entry, int) and not isinstance(entry, bool) else None


def _heads_range(node, n, start: int, end: int | None) -> tuple[int, int]:
    """``(first, count)`` of the heads a Slice / GatherND takes from a heads axis of static size ``n``
    (``end`` None: to the end). Only bounds counted from the ends are taken (``start`` 0 or
    negative, ``end`` negative or the end): they still pick the same heads once pruning shrinks
    the axis (Falcon's ``[:-2]``, ``[[-2]]``, ``[[-1]]``)."""
    if not isinstance(n, int) or n <= 0 or start > 0 or (end is not None and end >= 0):
        raise _Unrecognised(f"{node.name}: {node.op_type} [{start}:{end}] of the heads axis is not counted from its "
                            "ends (or the axis size is unknown)")
    first, stop = start % n if start < 0 else 0, n if end is None else end + n
    if stop <= first:
        raise _Unrecognised(f"{node.name}: empty {node.op_type} of the heads axis")
    return first, stop - first


def _indexed_heads(node, n, index: np.ndarray) -> tuple[int, int]:
    """:func:`_heads_range` of the consecutive indices ``index`` of a heads axis of size ``n``."""
    first, count = int(index[0]), int(index.size)
    return _heads_range(node, n, first, first + count if first + count < 0 else None)


def _restrict_heads(walk: _Walk) -> None:
    """Keep the projection rows of the heads a role takes from a shared split (``heads_range``)."""
    if walk.heads_range is None:
        return
    first, count = walk.heads_range
    if first + count > walk.proj.columns.shape[0]:
        raise _Unrecognised(f"{walk.split.node}: the heads range reaches outside the split's heads")
    if walk.proj.norm is not None:
        raise _Unrecognised(f"{walk.split.node}: a norm across the heads in front of the head split covers heads "
                            "that other roles take")
    walk.proj = replace(walk.proj, columns=walk.proj.columns[first:first + count])


def _restrict_columns(walk: _Walk) -> None:
    """Keep the projection columns of the within-head positions that reach the core (``walk.used``)
    when the split's columns per head are its last axis (``[.., H, 3·D]``: GPT-NeoX's q, k and v)."""
    used, columns = walk.used, walk.proj.columns
    if used is None or len(used) == columns.shape[1] or walk.split.rest[-1] != columns.shape[1] \
            or walk.split.head_pos == len(walk.split.rest) - 1:
        return
    if used.min() < 0 or used.max() >= columns.shape[1]:
        raise _Unrecognised(f"{walk.split.node}: within-head slices reach outside the head")
    if walk.proj.norm is not None:
        raise _Unrecognised(f"{walk.split.node}: a norm across the heads in front of the head split covers channels "
                            "that other roles take")
    walk.proj = replace(walk.proj, columns=columns[:, used])


def _same_walks(node, walks: list[_Walk | _Shared]) -> _Walk | _Shared:
    """The one walk that every data input of ``node`` took (besides parts shared by all the heads:
    :class:`_Shared`), or ``_Unrecognised``."""
    if all(isinstance(w, _Shared) for w in walks):
        walks = [w.resolved() for w in walks]
    shared = [w for w in walks if isinstance(w, _Shared)]
    walks = [w for w in walks if not isinstance(w, _Shared)]
    if not walks:
        return _Shared([r for w in shared for r in w.regroups], [f for w in shared for f in w.follows])
    first = walks[0]
    for other in walks[1:]:
        same_repeat = (first.repeat is None) == (other.repeat is None) and \
            (first.repeat is None or first.repeat.reshape == other.repeat.reshape)
        if other.split.node != first.split.node or other.proj.matmul != first.proj.matmul \
                or not np.array_equal(other.proj.columns, first.proj.columns) or not same_repeat \
                or other.heads_range != first.heads_range:
            raise _Unrecognised(f"{node.name}: its inputs come from different heads or projections "
                                f"({first.split.node} and {other.split.node})")
    first.regroups = list(dict.fromkeys(r for w in walks + shared for r in w.regroups))
    first.follows = [f for w in walks + shared for f in w.follows]
    if any(w.used is None for w in walks):
        first.used = None
    else:
        first.used = np.unique(np.concatenate([w.used for w in walks]))
    return first


def _shift_used(model, used, starts: str, steps: str, size) -> np.ndarray | None:
    """``used`` positions of a last-axis Slice's output as positions of its input (``+ start``);
    None where the start is not a constant or the step is not 1."""
    start = fixed_value(model, starts) if used is not None else None   # GPT-NeoX's chunk under TorchScript
    if used is None or start is None or start.size != 1 or (steps and np.any(constant_value(model, steps) != 1)):
        return None
    start = int(start.reshape(-1)[0])
    if start < 0:
        if not isinstance(size, int):
            return None
        start += size
    return used + start


def _data_operands(model, node, head_axis: int, rank: int | None) -> list[str]:
    """The inputs of an elementwise ``node`` on the Q/K/V path that carry the heads.

    The others are tables and must be constant over the heads axis: size 1 there (or
    broadcast), seen in the inferred shapes or, for a table computed from the input shapes
    only (rotary cos/sin from positions), in its value at two sequence lengths. A table with
    ``H`` entries on the heads axis (a per-head scale) is refused: slicing it is not done here.
    """
    if rank is None:
        raise _Unrecognised(f"{node.name}: rank of the {node.op_type} on the Q/K/V path is unknown")
    shapes = _shapes(model)
    out = shapes.get(node.output[0]) or []
    heads_out = out[head_axis] if len(out) == rank else None
    data, tables = [], []
    for x in node.input:
        value = constant_value(model, x)
        shape = list(value.shape) if value is not None else shapes.get(x)
        at_heads = _dim_at(shape, head_axis, rank)
        if value is not None or not depends_on_data(model, x) or \
                (at_heads in ("absent", 1) and isinstance(heads_out, int) and heads_out > 1):
            tables.append((x, shape, at_heads))
        else:
            data.append(x)
    if not data:
        raise _Unrecognised(f"{node.name}: no input of the {node.op_type} on the Q/K/V path carries the heads")
    for x, shape, at_heads in tables:
        if at_heads in ("absent", 1):
            continue
        if isinstance(at_heads, int):
            raise _Unrecognised(f"{node.name}: {node.op_type} by {x}, a table with {at_heads} entries on the heads "
                                "axis (only tables constant over the heads are passed)")
        if depends_on_data(model, x):
            raise _Unrecognised(f"{node.name}: cannot tell whether {x} is constant over the heads (its size there "
                                "is unknown and it is computed from the model's input values)")
        sizes = {_dim_at(list(r[x].shape), head_axis, rank) for r in evaluate_tensors(model, [x])}
        if not sizes <= {"absent", 1}:
            raise _Unrecognised(f"{node.name}: {node.op_type} by {x}, which is not constant over the heads axis")
    return data


def _dim_at(shape, axis: int, rank: int):
    """Size of ``shape`` broadcast to ``rank`` dims at ``axis``: an int, ``"absent"`` (broadcast
    from fewer dims), or ``None`` when unknown."""
    if shape is None:
        return None
    offset = rank - len(shape)
    if axis < offset:
        return "absent"
    d = shape[axis - offset]
    return d if isinstance(d, int) and d > 0 else None


def _rank(model, t) -> int | None:
    shape = _shapes(model).get(t)
    return None if shape is None else len(shape)


def _repeat_of_heads(model, reshape, head_axis: int, fixed, prod) -> tuple[_Repeat, str] | None:
    """``(repeat, the K/V tensor before it)`` if ``reshape`` merges a repeated axis into the heads
    axis (grouped-query attention), else ``None``.

    The pattern is ``Reshape(Expand|Tile(Unsqueeze(x, u)))`` with the new axis ``u`` next to the
    heads axis ``a`` of ``x`` and the Reshape's output of ``x``'s rank: ``u = a + 1`` gives each KV
    head's ``g`` copies one after the other (``repeat_kv``, ``repeat_interleave``: query head ``h``
    reads KV head ``h // g``), ``u = a`` tiles the KV heads (``h % H_kv``). The shape entries are
    checked against the head counts in :func:`_check_repeat`, once those are known.
    """
    src = prod.get(reshape.input[0])
    if src is None or src.op_type not in ("Expand", "Tile"):
        return None
    unsqueeze = prod.get(src.input[0])
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze":
        return None
    x = unsqueeze.input[0]
    rank, out_rank = _rank(model, x), _rank(model, reshape.output[0])
    axes = _axes(model, unsqueeze, 1)
    if rank is None or len(axes) != 1 or out_rank != rank or fixed:
        raise _Unrecognised(f"{reshape.name}: Reshape of {src.op_type}(Unsqueeze) on the Q/K/V path is not a "
                            "repeat of the heads that can be followed")
    u = axes[0] % (rank + 1)
    if u not in (head_axis, head_axis + 1):
        raise _Unrecognised(f"{reshape.name}: {src.op_type} repeats axis {u}, not next to the heads axis {head_axis}")
    kv_major = u == head_axis + 1
    kv_axis = head_axis if kv_major else head_axis + 1
    if src.op_type == "Tile":
        repeats = constant_value(model, src.input[1])
        if repeats is None or any(int(r) != 1 for j, r in enumerate(repeats) if j != u):
            raise _Unrecognised(f"{src.name}: Tile repeats {repeats} are not constant or tile more than the new axis")
        group, group_entry = int(repeats[u]), u
    else:
        entries = _shape_entries(model, src.input[1], prod)
        group = entries[u] if entries and len(entries) == rank + 1 and isinstance(entries[u], int) else None
        # Expand broadcasts from the right: a shorter shape vector holds axis u further left.
        length = len(entries) if entries is not None else (_shapes(model).get(src.input[1]) or [None])[0]
        group_entry = u - (rank + 1 - length) if isinstance(length, int) and u >= rank + 1 - length else None
    return _Repeat(src.name, reshape.name, kv_axis, head_axis, kv_major, group, group_entry), x


def _check_repeat(model, repeat: _Repeat, heads: int, kv_heads: int, path: dict[str, int], prod) -> None:
    """Check that pruning can follow ``repeat``: its group is ``heads / kv_heads`` and the
    Expand's KV-head entry and the Reshape's head entry are constants (rewritten on pruning)
    or read from the shape of a tensor on the K/V path (they follow by themselves)."""
    group = heads // kv_heads
    if heads % kv_heads or (repeat.group is not None and repeat.group != group):
        raise _Unrecognised(f"{repeat.reshape}: {kv_heads} K/V heads repeated {repeat.group} times do not make "
                            f"the {heads} query heads")
    nodes = {n.name: n for n in model.graph.node}

    def follows(entry, times: int) -> bool:
        """Whether ``entry`` is ``times`` × the heads of a tensor on the path (pruning keeps it right)."""
        if times != 1:
            return isinstance(entry, tuple) and entry[0] == "mul" and entry[2] == times and follows(entry[1], 1)
        return isinstance(entry, tuple) and entry[0] == "dim" and path.get(entry[1]) == entry[2]

    expand = nodes[repeat.expand]
    if expand.op_type == "Expand":
        entries = _shape_entries(model, expand.input[1], prod)
        entry = entries[repeat.kv_axis] if entries and repeat.kv_axis < len(entries) else None
        if entry == kv_heads and kv_heads > 1:
            repeat.rewrite_expand = True
        elif entry != 1 and not follows(entry, 1):
            raise _Unrecognised(f"{expand.name}: cannot tell how its KV-head entry ({entry}) follows pruning")
    entries = _shape_entries(model, nodes[repeat.reshape].input[1], prod)
    entry = entries[repeat.head_axis] if entries and repeat.head_axis < len(entries) else None
    repeat.reshape_infers = entry == -1
    if entry == heads:
        repeat.rewrite_reshape = True
    elif entry != -1 and not follows(entry, group) and not (group == 1 and follows(entry, 1)):
        raise _Unrecognised(f"{repeat.reshape}: cannot tell how its head entry ({entry}) follows pruning")


def _shape_entries(model, name: str, prod, depth: int = 0) -> list | None:
    """The entries of a 1-D shape tensor as far as they can be read from the graph: ints where
    constant, ``("dim", tensor, axis)`` where read from a tensor's shape, ``("mul", entry, k)``,
    booleans for comparisons, ``None`` where unknown; ``None`` when even the length is unknown.

    Enough for the shape arithmetic exporters emit around ``repeat_kv``: constants, ``Shape``,
    ``Gather``/``Slice`` of it, ``Concat``, ``Mul`` by a constant and TorchScript's
    ``Where(Equal(s, -1), 1, s)`` over ``ConstantOfShape``.
    """
    value = constant_value(model, name)
    if value is not None:
        return [v.item() if v.dtype.kind != "b" else bool(v) for v in value.reshape(-1)]
    node = prod.get(name)
    if node is None or depth > 12:
        return None
    op, args = node.op_type, node.input
    entries = lambda i: _shape_entries(model, args[i], prod, depth + 1) if len(args) > i and args[i] else None  # noqa: E731
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity", "Reshape"):
        return entries(0)
    if op == "Shape":
        as_vector = entries(0)
        if as_vector is not None:
            return [len(as_vector)]  # the shape of a shape vector
        rank = _rank(model, args[0])
        if rank is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", rank)
        return [("dim", args[0], a) for a in range(rank)[start:end]]
    if op == "Concat":
        parts = [_shape_entries(model, i, prod, depth + 1) for i in args]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op == "Gather":
        data, idx = entries(0), constant_value(model, args[1])
        if data is None or idx is None:
            return None
        return [data[int(i)] for i in idx.reshape(-1)]
    if op == "Slice":
        data = entries(0)
        starts, ends = constant_value(model, args[1]), constant_value(model, args[2])
        steps = constant_value(model, args[4]) if len(args) > 4 and args[4] else None
        if data is None or starts is None or ends is None or (steps is not None and np.any(steps != 1)):
            return None
        n = len(data)
        return data[slice(*(int(np.clip(v if v >= 0 else v + n, 0, n)) for v in (starts[0], ends[0])))]
    if op == "ConstantOfShape":
        length = entries(0)
        fill = _attr(node, "value", None)
        fill = numpy_helper.to_array(fill).reshape(-1)[0].item() if fill is not None else 0.0
        return [fill] * length[0] if length and len(length) == 1 and isinstance(length[0], int) else None
    if op in ("Mul", "Equal"):
        a, b = entries(0), entries(1)
        if a is None or b is None or min(len(a), len(b)) != 1 and len(a) != len(b):
            return None
        n = max(len(a), len(b))
        a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
        return [_entry_op(op, x, y) for x, y in zip(a, b)]
    if op == "Where":
        c, x, y = entries(0), entries(1), entries(2)
        if c is None or x is None or y is None:
            return None
        n = max(len(c), len(x), len(y))
        c, x, y = ([e] * n if len(e) == 1 else e for e in (c, x, y))
        return [None if not isinstance(ci, bool) else (xi if ci else yi) for ci, xi, yi in zip(c, x, y)]
    return None


def _entry_op(op: str, x, y):
    """``x * y`` or ``x == y`` for one shape entry (a dim read from a shape is never negative)."""
    known = lambda e: isinstance(e, (int, float)) and not isinstance(e, bool)  # noqa: E731
    if op == "Mul":
        if known(x) and known(y):
            return x * y
        if x is not None and known(y) and not isinstance(x, bool):
            return ("mul", x, int(y)) if y != 1 else x
        if y is not None and known(x) and not isinstance(y, bool):
            return ("mul", y, int(x)) if x != 1 else y
        return None
    if known(x) and known(y):
        return x == y
    if isinstance(x, tuple) and known(y) and y < 0 or isinstance(y, tuple) and known(x) and x < 0:
        return False
    return None


def _head_split(model, reshape, head_axis, fixed, prod) -> tuple[_HeadSplit, _Projection]:
    shape_out = _reshape_target(model, reshape)
    in_shape = _shapes(model).get(reshape.input[0])
    if shape_out is None or not in_shape:
        raise _Unrecognised(f"{reshape.name}: head-split Reshape shape is not known")
    lead = len(in_shape) - 1
    channels = in_shape[-1]
    if head_axis < lead:
        lead = _channel_lead(model, reshape, shape_out, channels, head_axis, prod)
    if lead is None:
        # e.g. SDPA with enable_gqa as the dynamo exporter decomposes it: [B·H, S, D] -> [B, H, S, D]
        raise _Unrecognised(f"{reshape.name}: Reshape {in_shape} -> {shape_out} takes the heads from a leading "
                            "axis, not from the projection's channels")
    rest = list(shape_out[lead:])
    unknown = [j for j, d in enumerate(rest) if not isinstance(d, int) or d <= 0]
    if unknown and not isinstance(channels, int):
        channels = _last_dim(model, reshape.input[0])
    if len(unknown) == 1 and isinstance(channels, int):
        # e.g. TorchScript's ``x.shape[-1] // num_heads``: one entry computed at run time.
        known = int(np.prod([d for j, d in enumerate(rest) if j != unknown[0]]))
        if known and channels % known == 0:
            rest[unknown[0]] = channels // known
    if any((not isinstance(d, int)) or d <= 0 for d in rest) or head_axis < lead:
        raise _Unrecognised(f"{reshape.name}: head-split Reshape to {shape_out} has dynamic channel dims")
    if isinstance(channels, int) and channels != int(np.prod(rest)):
        raise _Unrecognised(f"{reshape.name}: Reshape {in_shape} -> {shape_out} does not split the channel axis")
    head_pos = head_axis - lead
    grid = np.arange(int(np.prod(rest))).reshape(rest)
    index = [slice(None)] * len(rest)
    for a, i in fixed.items():
        if a < lead:
            raise _Unrecognised(f"{reshape.name}: slot selected on a leading axis")
        index[a - lead] = i
    picked = grid[tuple(index)]
    # Axes left after fixing slots: the head axis and the per-head (D) axes.
    remaining = [p for p in range(len(rest)) if p not in {a - lead for a in fixed}]
    picked = np.moveaxis(picked, remaining.index(head_pos), 0)
    columns = picked.reshape(rest[head_pos], -1)
    split = _HeadSplit(reshape.name, lead, [int(d) for d in rest], head_pos)
    return split, _projection(model, reshape.input[0], columns, prod)


def _channel_lead(model, reshape, target: list, channels, head_axis: int, prod) -> int | None:
    """Where the channel dims start in a head-split Reshape's ``target`` whose leading dims differ from
    its input's (GPT-BigCode's query drops a unit axis: ``[B, 1, S, C] -> [B, S, H, D]``), else None.

    That is the last start up to the heads axis whose trailing dims multiply to the input's static
    ``channels``: read as static sizes (row-major, they are then exactly the channel axis), or with one
    entry left to the Reshape (-1: TorchScript) where the leading entries are the input's leading dims
    without its unit axes (read from shapes that inference names alike)."""
    if not isinstance(channels, int) or channels <= 0:
        return None
    src = [d for d in (_shapes(model).get(reshape.input[0]) or [])[:-1] if d != 1]
    entries = _shape_entries(model, reshape.input[1], prod) or []
    for k in range(head_axis, -1, -1):
        known = [d for d in target[k:] if isinstance(d, int) and d > 0]
        if len(known) == len(target) - k and int(np.prod(known)) == channels:
            return k
        lead = [e for e in entries[:k] if e != 1]
        if len(known) == len(target) - k - 1 and channels % int(np.prod(known)) == 0 and len(entries) == len(target) \
                and len(lead) == len(src) and all(_names_dim(model, e, d) for e, d in zip(lead, src)):
            return k
    return None


def _names_dim(model, entry, dim) -> bool:
    """Whether a shape ``entry`` (:func:`_shape_entries`) is known to equal the inferred ``dim``."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return same_dim(entry, dim)
    return isinstance(entry, tuple) and entry[0] == "dim" and same_dim(_dim_name(model, entry[1], entry[2]), dim)


def _last_dim(model, t) -> int | None:
    """The size of ``t``'s last axis: inferred, or where inference does not know it (TorchScript's
    ``chunk`` outputs) evaluated at two input sizes, once per analysis; None if that varies or fails."""
    dim = _dim_name(model, t, -1)
    if isinstance(dim, int) and dim > 0:
        return dim
    memo = _shapes(model).setdefault("::evaluated last dims", {})
    if t not in memo:
        try:
            widths = {run[t].shape[-1] for run in evaluate_tensors(model, [t])}
        except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
            widths = set()
        memo[t] = int(widths.pop()) if len(widths) == 1 else None   # None: it varies, or fails
    return memo[t]


def _projection(model, t, columns, prod) -> _Projection:
    """Walk ``[.., C]`` back over ``Add(bias)``, a scalar ``Mul``/``Div``, channel ``Split``, Reshapes of the token axes
    and an RMSNorm across exactly these heads (:func:`_heads_norm`) to ``MatMul(x, W)`` or ``Gemm(x, W[, bias])``
    (GPT-2's ``Conv1D``: ``addmm`` on flattened tokens)."""
    bias_node = bias = split = bounds = norm = None
    offset = 0
    reshapes: list[str] = []
    for _ in range(8):
        node = prod.get(t)
        if node is None:
            break
        if node.op_type == "Reshape" and (kept := _channel_reshape(model, node, prod)):
            if kept == "written":
                reshapes.append(node.name)
            t = node.input[0]
            continue
        if node.op_type == "Unsqueeze" and (rank := _rank(model, node.output[0])) and \
                all(a % rank != rank - 1 for a in _axes(model, node, 1)):
            t = node.input[0]   # a unit token axis (GPT-BigCode's c_attn(x).unsqueeze(1))
            continue
        scalars = [i for i in node.input if (c := constant_value(model, i)) is not None and c.size == 1]
        if node.op_type in ("Mul", "Div") and len(scalars) == 1 and (node.op_type == "Mul" or node.input[1] in scalars):
            t = next(i for i in node.input if i not in scalars)   # a scale on the projection (OPT's q · scaling)
            continue
        if (source := _elementwise_source(model, t, prod)) != t:
            t = source   # an activation of every channel (MiniMax's SiLU on qkv_proj): each channel stays itself
            continue
        if split is None and norm is None and (found := _heads_norm(model, t, columns, prod)) is not None:
            t, norm = found   # OLMo2's q_norm / k_norm over all the heads: pruning keeps its divisor
            continue
        if node.op_type == "Gemm":
            gemm = _gemm_projection(model, node, bias is None)
            if gemm is None:
                break
            weight, transposed, gemm_bias = gemm
            if gemm_bias is not None:
                bias_node, bias = node.name, gemm_bias
            if bounds is not None:
                offset = _slice_offset(split[0], bounds, columns,
                                       constant_value(model, weight).shape[0 if transposed else 1])
            return _Projection(node.name, weight, bias_node, bias, split, columns + offset, transposed, tuple(reshapes),
                               norm)
        if node.op_type == "Slice" and split is None:
            bounds = _channel_slice(model, node)   # resolved against the projection's width there
            split = (node.name, -1)
            t = node.input[0]
        elif node.op_type == "Split" and split is None:
            sizes = _split_sizes(model, node)
            j = list(node.output).index(t)
            if sizes is None or _attr(node, "axis", 0) not in (-1, len(_shapes(model).get(t, [0, 0, 0])) - 1):
                raise _Unrecognised(f"{node.name}: channel Split is not along the last axis with known sizes")
            offset = int(sum(sizes[:j]))
            split = (node.name, j)
            t = node.input[0]
        elif node.op_type == "Add" and bias is None:
            consts = [i for i in node.input if constant_value(model, i) is not None]
            if len(consts) != 1 or constant_value(model, consts[0]).ndim != 1:
                break
            bias_node, bias = node.name, consts[0]
            t = next(i for i in node.input if i != bias)
        elif node.op_type == "MatMul":
            w = constant_value(model, node.input[1])
            if w is None or w.ndim != 2:
                break
            if bounds is not None:
                offset = _slice_offset(split[0], bounds, columns, w.shape[1])
            return _Projection(node.name, node.input[1], bias_node, bias, split, columns + offset,
                               reshapes=tuple(reshapes), norm=norm)
        else:
            break
    statistic = _channel_statistic(model, t, prod)
    if statistic is not None:
        raise _Unrecognised(f"{t}: {statistic.op_type} {statistic.name} is part of a normalisation across the heads "
                            "between the projection and the head split that is not an RMSNorm of exactly the heads "
                            "that follow (a statistic of all heads' channels that pruning cannot keep over the "
                            "original channel count)")
    raise _Unrecognised(f"{t}: no constant MatMul projection before the head split")


def _heads_norm(model, t, columns, prod) -> tuple[str, _ChannelOps] | None:
    """``(x, the norm)`` where ``t`` is an RMSNorm of ``x`` over its last axis (OLMo2's ``q_norm`` / ``k_norm``
    over all the heads' ``H·D`` channels), times a constant weight per channel or not, whose channels are exactly
    the ``columns`` of the heads that follow; else None. Decomposed as :func:`_rms_norm` reads it (Casts around the
    weight), or an ONNX ``RMSNormalization`` of the last axis with a constant scale. Pruning keeps its divisor over
    the original channel count (:func:`_prune_channel_ops`): the pruned heads' channels count as zeros."""
    def past_casts(x):
        while (node := prod.get(x)) is not None and node.op_type in ("Cast", "Identity"):
            x = node.input[0]
        return x, node

    width = columns.size
    t, node = past_casts(t)
    if node is None or node.op_type not in ("RMSNormalization", "Mul", "Div") or _dim_name(model, t, -1) != width \
            or sorted(columns.reshape(-1).tolist()) != list(range(width)):
        return None
    ops = _ChannelOps()
    if node.op_type == "RMSNormalization":
        scale = constant_value(model, node.input[1]) if len(node.input) > 1 else None
        rank = _rank(model, node.input[0])
        if rank is None or _attr(node, "axis", -1) % rank != rank - 1 or scale is None or scale.shape != (width,):
            return None
        ops.norms.append((node.name, scale.dtype))
        return node.input[0], ops
    if node.op_type == "Mul":
        weights = [i for i, x in enumerate(node.input) if constant_value(model, x) is not None]
        if len(weights) == 1 and constant_value(model, node.input[weights[0]]).shape[-1:] == (width,) \
                and constant_value(model, node.input[weights[0]]).size == width:
            ops.weights.append((node.name, weights[0]))
            t, node = past_casts(node.input[1 - weights[0]])
    if node is None or node.op_type not in ("Mul", "Div"):
        return None
    cons = consumers(model)
    for x in node.input:
        for square in [u for u in cons.get(x, []) if _squares(model, u, x)]:
            try:
                end, reduce, dtype = _rms_norm(model, square, x, cons)
            except _Unrecognised:
                continue
            if end.name == node.name:
                ops.norms.append((reduce, dtype))
                return x, ops
    return None


def _channel_statistic(model, t, prod) -> onnx.NodeProto | None:
    """A reduction over the channel (last) axis, or a Layer / RMS normalisation, that ``t`` is computed
    from through elementwise ops: ``t`` divides channels by a statistic of all of them."""
    todo, seen = [t], set()
    while todo and len(seen) < 16:
        node = prod.get(todo.pop())
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.op_type in ("LayerNormalization", "RMSNormalization"):
            return node
        if node.op_type.startswith("Reduce") and (rank := _rank(model, node.input[0])):
            given = len(node.input) > 1 and node.input[1]
            axes = constant_value(model, node.input[1]) if given else _attr(node, "axes")
            if not given and axes is None or axes is not None and (rank - 1) in [int(a) % rank
                                                                                for a in np.atleast_1d(axes)]:
                return node   # no axes: all of them
        if node.op_type in _ELEMENTWISE + _UNARY:
            todo.extend(i for i in node.input if constant_value(model, i) is None)
    return None


def _elementwise_source(model, t, prod, depth: int = 0) -> str:
    """The one tensor ``t`` is computed from element by element, with scalar constants only (an activation:
    ``_UNARY``, SiLU exported as ``x · Sigmoid(x)``, GELU's ``x · (1 + erf(x / √2)) / 2``), else ``t``:
    slicing its channels slices that tensor's alike."""
    node = prod.get(t)
    if node is None or depth > 8:
        return t
    if node.op_type in _UNARY and node.domain in ("", "ai.onnx", "com.microsoft"):
        return _elementwise_source(model, node.input[0], prod, depth + 1)
    if node.op_type not in _ELEMENTWISE:
        return t
    data = [i for i in node.input if (c := constant_value(model, i)) is None or c.size != 1]
    if any(constant_value(model, i) is not None for i in data):
        return t   # a constant with more than one value (a bias): not elementwise with scalars
    sources = {_elementwise_source(model, i, prod, depth + 1) for i in data}
    return sources.pop() if len(sources) == 1 else t


def _channel_slice(model, node) -> tuple[int, int | None]:
    """``(start, end)`` of a ``Slice`` taking one role's channels from a fused projection's last axis
    (``qkv(x).chunk(3, -1)`` exported by TorchScript: bounds computed from the projection's shape,
    which fold to constants here). ``end`` may exceed the width (an open slice): see :func:`_slice_offset`."""
    if len(node.input) < 3:
        raise _Unrecognised(f"{node.name}: an opset < 10 Slice (bounds as attributes) before the head split")
    bounds = [node.input[i] if i < len(node.input) and node.input[i] else None for i in range(1, 5)]
    bounds = [None if b is None else _fold(model, b) for b in bounds]
    starts, ends, axes, steps = (None if b is None else np.atleast_1d(np.asarray(b)).astype(np.int64).tolist()
                                 for b in bounds)
    rank = len(_shapes(model).get(node.input[0]) or [])
    if starts is None or ends is None or len(starts) != 1 or (axes or [0])[0] not in (-1, rank - 1) or (
            axes is None and rank != 1) or (steps or [1]) != [1]:
        raise _Unrecognised(f"{node.name}: a Slice before the head split that is not a step-1 slice of the "
                            "channel axis")
    return starts[0], ends[0]


def _slice_offset(name: str, bounds: tuple[int, int], columns: np.ndarray, width: int) -> int:
    """The start of channel Slice ``name`` (``bounds`` from :func:`_channel_slice`) in the projection's
    ``width`` channels, after checking that it takes exactly the channels of the heads that follow it."""
    start, end = (min(max(b + width if b < 0 else b, 0), width) for b in bounds)
    if end - start != columns.size or columns.max() >= columns.size:
        raise _Unrecognised(f"{name}: the Slice [{start}, {end}) of the projection's {width} channels is not "
                            f"the {columns.size} channels of the heads that follow it")
    return start


def _channel_reshape(model, reshape, prod) -> str | None:
    """Whether ``reshape`` only regroups the token axes, its last (channel) axis keeping its size:
    ``"follows"`` when its channel entry is -1 or read from the input's last axis (TorchScript under
    dynamic axes), ``"written"`` when it spells the count out (pruning must write the new count;
    the sizes are then static and equal), else ``None``."""
    shapes = _shapes(model)
    before, after = shapes.get(reshape.input[0]), shapes.get(reshape.output[0])
    entries = _shape_entries(model, reshape.input[1], prod)
    last = entries[-1] if entries else None
    read = bool(before) and last == ("dim", reshape.input[0], len(before) - 1)
    if before and after and isinstance(before[-1], int) and before[-1] > 0 and before[-1] == after[-1]:
        return "follows" if read or last == -1 else "written"
    return "follows" if read else None


def _last_entry(model, reshape) -> int:
    """Index of the last entry of ``reshape``'s target shape (the channel entry)."""
    out = _shapes(model).get(reshape.output[0])
    if out:
        return len(out) - 1
    entries = _shape_entries(model, reshape.input[1], producers(model))
    if entries is None:
        raise AttncError(f"{reshape.name}: the length of its target shape is unknown", "please report this model")
    return len(entries) - 1


def _gemm_projection(model, gemm, bias_allowed: bool) -> tuple[str, bool, str | None] | None:
    """``(weight, transposed, bias or None)`` if ``gemm`` is ``x·W [+ b]``: constant 2-D ``W``, no
    transA, alpha = beta = 1, and ``b`` absent or a constant vector over the output channels."""
    w = constant_value(model, gemm.input[1])
    if w is None or w.ndim != 2 or _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1.0:
        return None
    transposed = bool(_attr(gemm, "transB", 0))
    if len(gemm.input) < 3 or not gemm.input[2]:
        return gemm.input[1], transposed, None
    b = constant_value(model, gemm.input[2])
    if not bias_allowed or b is None or b.shape != (w.shape[0 if transposed else 1],) \
            or _attr(gemm, "beta", 1.0) != 1.0:
        return None
    return gemm.input[1], transposed, gemm.input[2]


def _trace_output(model, t, heads, value_dim, prod, cons, same_dims=None):
    """Walk the heads-first core output forward to the merge Reshape and output projection.

    The core's output is ``[B, H, N, Dv]`` by contract; its dims are carried through the
    Transposes so the merge works where shape inference knows nothing (fused nodes' outputs).
    Returns the merge, the output projection, its input, the terms added on the way (see
    :func:`_output_projection`), ``(Reshape, heads axis)`` of each shape-keeping Reshape on the
    way that writes the head count out (rewritten on pruning), every shape-keeping Reshape's
    verdict (:func:`_keeps_heads`) and the channel ops after the merge (:class:`_ChannelOps`).
    """
    dims: list = [None, heads, None, value_dim]
    start = dims
    head_axis = 1
    head_reshapes: list[tuple[str, int]] = []
    kept_reshapes: dict[str, str] = {}
    for _ in range(8):
        # Shape readers (the TorchScript exporter computes the merge shape from them) follow the
        # new sizes by themselves.
        users = [u for u in cons.get(t, []) if u.op_type != "Shape"]
        if len(users) != 1:
            raise _Unrecognised(f"{t}: attention output has {len(users)} consumers")
        node = users[0]
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm"))
            head_axis = perm.index(head_axis)
            dims = [dims[p] for p in perm]
            t = node.output[0]
        elif node.op_type == "Reshape" and (kept := _PROVEN_KEEPS.get(node.name) or _keeps_heads(
                model, node, head_axis, heads, same_dims if dims is start else None, prod)):
            if kept == "written":
                head_reshapes.append((node.name, head_axis))
            kept_reshapes[node.name] = kept
            t = node.output[0]
        elif node.op_type == "Reshape":
            target = _reshape_target(model, node)
            if target is None:
                raise _Unrecognised(f"{node.name}: merge Reshape target unknown")
            lead = len(target) - 1
            start = lead
            if head_axis < lead or any(not isinstance(d, int) for d in dims[lead:]):
                start = head_axis   # the token axes are merged too: [B, N, H, Dv] -> [B·N, H·Dv] (GPT-2)
                if any(not isinstance(d, int) for d in dims[start:]) or target[-1] != int(np.prod(dims[start:])):
                    start = None
            rest = dims[start:] if start is not None else []
            if len(rest) < 2 or any(not isinstance(d, int) for d in rest):
                raise _Unrecognised(f"{node.name}: merge Reshape to {target} does not merge heads with head dims")
            grid = np.moveaxis(np.arange(int(np.prod(rest))).reshape(rest), head_axis - start, 0)
            rows = grid.reshape(heads, -1)
            merge = _HeadSplit(node.name, lead, [int(np.prod(rest))], 0)
            mm, added, reshapes, channel_ops = _output_projection(model, node, len(target), rows.size, prod, cons)
            transposed = mm.op_type == "Gemm" and bool(_attr(mm, "transB", 0))
            return merge, _Projection(mm.name, mm.input[1], None, None, None, rows, transposed, reshapes), \
                mm.input[0], added, head_reshapes, kept_reshapes, channel_ops
        else:
            raise _Unrecognised(f"{node.name}: {node.op_type} after the attention core")
    raise _Unrecognised(f"{t}: output path too long")


# Shape-keeping Reshapes proven on the unpruned graph (name -> verdict), trusted while the pruned
# graph is analysed again: pruning does not touch their other entries, but inference on the pruned
# graph may no longer name the dims that proved them.
_PROVEN_KEEPS: dict[str, str] = {}


def _keeps_heads(model, reshape, head_axis: int, heads, same_dims: dict[int, set[str]] | None, prod
                 ) -> str | None:
    """Whether ``reshape`` leaves its input's shape as it is: ``"follows"`` when it reads the heads as
    -1 (or 0), following a pruned head count by itself (transformers' ``attn_output.reshape(B, -1,
    N, Dv)`` after SDPA); ``"written"`` when it writes the head count out (rewritten on pruning; one
    other entry may then be -1: Swin's ``[-1, H, N, Dv]`` over batch × windows); else ``None``.
    The other entries are static sizes equal to the input's, or read from the shape of a tensor in
    ``same_dims[axis]`` (the core's output, Q, K, V: under dynamic axes TorchScript computes them
    so; inferred shapes then say nothing), or from a dim that inference names like the input's
    (the model input's ``batch`` / ``seq``)."""
    entries = _shape_entries(model, reshape.input[1], prod)
    before = _shapes(model).get(reshape.input[0])
    if entries is None:
        return _keeps_heads_evaluated(model, reshape, head_axis, heads, prod)
    if not entries or not before or len(entries) != len(before) or head_axis >= len(entries):
        return None
    if entries[head_axis] in (-1, 0):
        kept = "follows"
    elif isinstance(heads, int) and entries[head_axis] == heads:
        kept = "written"
    else:
        return None
    for axis, (entry, dim) in enumerate(zip(entries, before)):
        if axis == head_axis or (kept == "written" and entry == -1):
            continue
        if not _entry_keeps(model, reshape, entry, axis, dim, same_dims):
            # e.g. read from a [B, S, H, D] tensor's dims (Falcon under TorchScript)
            return _keeps_heads_evaluated(model, reshape, head_axis, heads, prod)
    return kept


def _entry_keeps(model, reshape, entry, axis: int, dim, same_dims: dict[int, set[str]] | None = None) -> bool:
    """Whether a Reshape's target ``entry`` (from :func:`_shape_entries`) gives axis ``axis`` the input's
    size ``dim``: that static size, or read from the input's shape there, from a tensor in
    ``same_dims[axis]``, or from a dim that inference names like ``dim`` (the model input's ``batch``)."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return entry > 0 and entry == dim
    return isinstance(entry, tuple) and entry[0] == "dim" and (entry[2] == axis and (
        entry[1] == reshape.input[0] or same_dims is not None and entry[1] in same_dims.get(axis, ()))
        or isinstance(dim, str) and bool(dim) and _dim_name(model, entry[1], entry[2]) == dim)


def _keeps_heads_evaluated(model, reshape, head_axis: int, heads, prod) -> str | None:
    """:func:`_keeps_heads` for a target whose entries are computed in ways ``_shape_entries`` does not
    read (Wav2Vec2's ``(seq - 3) // 4`` from its convolutional front end): a ``Concat`` of one-entry
    pieces whose heads piece is a constant (-1 / 0: ``"follows"``, the head count: ``"written"``) and
    whose other entries equal the input's dims: named alike by inference, or evaluated at two input sizes."""
    concat = prod.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) <= head_axis or \
            any(_shapes(model).get(i) != [1] for i in concat.input):
        return None
    piece = constant_value(model, concat.input[head_axis])
    entry = int(piece.reshape(-1)[0]) if piece is not None and piece.size == 1 else None
    kept = "follows" if entry in (-1, 0) else "written" if isinstance(heads, int) and entry == heads else None
    if kept is None:
        return None
    before, after = _shapes(model).get(reshape.input[0]), _shapes(model).get(reshape.output[0])
    if before and after and len(before) == len(after) == len(concat.input) and all(
            same_dim(b, a) for axis, (b, a) in enumerate(zip(before, after)) if axis != head_axis):
        return kept   # inference (with data propagation) names the other dims alike on both sides
    try:
        runs = evaluate_tensors(model, [reshape.input[1], reshape.input[0]])
    except Exception:  # noqa: BLE001 - ONNX Runtime's errors subclass Exception only
        return None
    for run in runs:
        target, shape = run[reshape.input[1]].reshape(-1), run[reshape.input[0]].shape
        if len(target) != len(shape) or any(int(t) != d for a, (t, d) in enumerate(zip(target, shape))
                                            if a != head_axis):
            return None
    return kept


def _dim_name(model, tensor: str, axis: int):
    """The inferred size of ``tensor`` on ``axis`` (an int, a symbolic name, or None)."""
    shape = _shapes(model).get(tensor) or []
    return shape[axis] if -len(shape) <= axis < len(shape) else None


def _output_projection(model, merge, rank, channels: int, prod, cons
                       ) -> tuple[onnx.NodeProto, list[tuple[str, str]], tuple[str, ...], _ChannelOps]:
    """From the merge Reshape's output ``[.., tokens, H·Dv]`` (``channels`` wide) to the constant output projection.

    On the way only the token axes may change: ``Slice`` (agent attention sets the CLS token
    apart), ``Concat`` of those pieces, and ``Add`` of a term (agent attention's depthwise conv of
    V on the grid tokens; the caller checks it carries the heads on the same channels). Each channel
    may also be scaled on its own (:func:`_channel_user`): an RMSNorm across all the channels, a
    constant ``[C]`` weight, a gate computed from a constant projection of another tensor.

    Returns:
        The output projection (``MatMul`` or ``Gemm``), ``(Add node, added tensor)`` of each term,
        the Reshapes of the token axes on the way whose channel count is written out, and the
        channel ops on the way.
    """
    merged = merge.output[0]
    inside, todo = {merged}, [merged]
    found, concats, adds, reshapes = [], [], [], []
    ops, handled = _ChannelOps(), set()
    while todo:
        t = todo.pop()
        users = [u for u in cons.get(t, []) if u.op_type != "Shape"]
        # An RMSNorm's mean square first: the Mul / Div it ends in reads t too.
        for user in users:
            if _squares(model, user, t):
                end, reduce, dtype = _rms_norm(model, user, t, cons)
                ops.norms.append((reduce, dtype))
                handled.add(end.name)
        for user in users:
            op = user.op_type
            if _squares(model, user, t) or user.output[0] in inside:
                continue
            if user.input[0] == t and (op == "MatMul" and constant_value(model, user.input[1]) is not None
                                       or op == "Gemm" and _gemm_projection(model, user, True) is not None):
                found.append(user)
                continue
            if user.name in handled:
                pass
            elif op == "Slice" and user.input[0] == t:
                axes = constant_value(model, user.input[3]) if len(user.input) > 3 and user.input[3] else None
                if axes is None or any(int(a) % rank == rank - 1 for a in axes):
                    raise _Unrecognised(f"{user.name}: Slice of the merged heads' channels")
            elif op == "Concat" and _attr(user, "axis", 0) % rank != rank - 1:
                concats.append(user)
            elif op == "Add" and list(user.input).count(t) == 1:
                adds.append((user, t))
            elif op == "Reshape" and user.input[0] == t and (kept := _channel_reshape(model, user, prod)):
                if kept == "written":   # tokens flattened for a Gemm (GPT-2's Conv1D)
                    reshapes.append(user.name)
            elif not _channel_user(model, user, t, rank, channels, merged, ops, prod):
                raise _Unrecognised(f"{merge.name}: merged heads go through {op} {user.name}, not straight "
                                    "into a constant output projection")
            inside.add(user.output[0])
            todo.append(user.output[0])
    if len(found) != 1:
        raise _Unrecognised(f"{merge.name}: merged heads feed {len(found)} constant output projections, not one")
    if any(i not in inside for c in concats for i in c.input):
        raise _Unrecognised(f"{merge.name}: merged heads are concatenated with other tokens")
    added = [(add.name, next(i for i in add.input if i != t)) for add, t in adds]
    if any(term in inside for _, term in added):
        raise _Unrecognised(f"{merge.name}: merged heads are added to themselves")
    return found[0], added, tuple(reshapes), ops


def _channel_user(model, user, t, rank: int, channels: int, merged: str, ops: _ChannelOps, prod) -> bool:
    """Whether ``user`` of the merged channels ``t`` acts on each channel on its own, recording what pruning
    slices in ``ops``: a float ``Cast``; ``Mul`` / ``Div`` by a scalar or a constant ``[.., C]`` (a norm's
    weight); ``Mul`` by a gate computed elementwise from a constant projection of a tensor that does not
    read the merged heads (MiniMax's ``sigmoid(output_gate(x))``: its columns go with the channels); an
    ONNX ``RMSNormalization`` over the channel axis. Other cross-channel ops are refused with the reason."""
    op = user.op_type
    if op in ("Cast", "Identity"):
        return True
    if op == "RMSNormalization" and user.input[0] == t:
        scale = constant_value(model, user.input[1]) if len(user.input) > 1 else None
        if _attr(user, "axis", -1) % rank != rank - 1 or scale is None or scale.shape[-1:] != (channels,):
            raise _Unrecognised(f"{user.name}: RMSNormalization of the merged heads over more than their channel "
                                "axis, or with a scale that is not a constant per channel")
        ops.norms.append((user.name, scale.dtype))
        return True
    if op in ("LayerNormalization", "ReduceMean", "ReduceSum", "Sub"):
        raise _Unrecognised(f"{user.name}: {op} across the merged heads' channels that is not an RMSNorm (only "
                            "an RMSNorm's mean square can be kept over the original channel count)")
    if op not in ("Mul", "Div") or list(user.input).count(t) != 1 or (op == "Div" and user.input[0] != t):
        return False
    other = next(i for i in user.input if i != t)
    value = constant_value(model, other)
    if value is not None:
        if value.size == 1:
            return True
        if value.shape[-1:] != (channels,) or value.size != channels:
            raise _Unrecognised(f"{user.name}: {op} of the merged heads by a constant of shape {value.shape}, not "
                                f"one value per channel ({channels})")
        ops.weights.append((user.name, list(user.input).index(other)))
        return True
    if op == "Div" or _reads(prod, other, merged):
        return False
    try:
        gate = _projection(model, other, np.arange(channels)[None, :], prod)
    except _Unrecognised:
        raise _Unrecognised(f"{user.name}: the merged heads are multiplied by {other}, which is not an "
                            "elementwise function of a constant projection") from None
    if gate.split is not None or gate.matrix(model).shape[1] != channels:
        raise _Unrecognised(f"{user.name}: the gate {other} on the merged heads takes {channels} of its "
                            f"projection's {gate.matrix(model).shape[1]} channels")
    ops.gates.append(gate)
    return True


def _squares(model, node, t) -> bool:
    """Whether ``node`` squares ``t``: ``Pow(t, 2)`` or ``Mul(t, t)``."""
    if node.op_type == "Mul":
        return list(node.input) == [t, t]
    return node.op_type == "Pow" and node.input[0] == t and (e := constant_value(model, node.input[1])) is not None \
        and e.size == 1 and float(e.reshape(-1)[0]) == 2.0


def _rms_norm(model, square, t, cons) -> tuple[onnx.NodeProto, str, np.dtype]:
    """``(the node dividing t by its RMS, the ReduceMean, eps's float type)`` of an RMSNorm of ``t`` over its
    last axis, from its ``square`` of ``t``: ``ReduceMean`` of it over the last axis (keepdims), scalar
    ``Mul``s and Casts (a rescale written by pruning), ``Add`` of a scalar ``eps``, ``Sqrt``, then ``Div(t, ·)``,
    or ``Reciprocal`` / ``Div(1, ·)`` and ``Mul(t, ·)``; each step read by the next alone. Else
    ``_Unrecognised``: a statistic of all the heads' channels that pruning cannot keep."""
    def only_user(x):
        users = [u for u in cons.get(x, []) if u.op_type != "Shape"]
        if len(users) != 1:
            raise _Unrecognised(f"{square.name}: the mean square of the merged heads is read by {len(users)} nodes, "
                                "not by one RMSNorm")
        return users[0]

    def scalar(x) -> bool:
        return (c := constant_value(model, x)) is not None and c.size == 1

    node = only_user(square.output[0])
    rank = _rank(model, t)
    axes = (node.input[1:2] or [""])[0] or _attr(node, "axes") is not None   # none: every axis
    if node.op_type != "ReduceMean" or not _attr(node, "keepdims", 1) or rank is None or not axes \
            or [a % rank for a in _axes(model, node, 1)] != [rank - 1]:
        raise _Unrecognised(f"{square.name}: the merged heads are squared into {node.op_type} {node.name}, not the "
                            "mean over their channels of an RMSNorm")
    reduce = node.name
    node = only_user(node.output[0])
    while node.op_type in ("Mul", "Cast") and (node.op_type == "Cast" or any(scalar(i) for i in node.input)):
        node = only_user(node.output[0])
    eps = next((constant_value(model, i) for i in node.input if scalar(i)), None) if node.op_type == "Add" else None
    if eps is not None and eps.dtype.kind == "f" and (node := only_user(node.output[0])).op_type == "Sqrt":
        x, node = node.output[0], only_user(node.output[0])
        if node.op_type == "Div" and list(node.input) == [t, x]:
            return node, reduce, eps.dtype
        if node.op_type == "Reciprocal" or node.op_type == "Div" and node.input[1] == x and scalar(node.input[0]) \
                and float(constant_value(model, node.input[0]).reshape(-1)[0]) == 1.0:
            x, node = node.output[0], only_user(node.output[0])
            if node.op_type == "Mul" and sorted(node.input) == sorted([t, x]):
                return node, reduce, eps.dtype
    raise _Unrecognised(f"{square.name}: the mean square of the merged heads reaches {node.op_type} {node.name}, "
                        "not an RMSNorm of them (mean + eps, sqrt, divide)")


def _reads(prod, t: str, target: str) -> bool:
    """Whether ``t`` is computed from ``target``."""
    seen, todo = set(), [t]
    while todo:
        x = todo.pop()
        if x == target:
            return True
        node = prod.get(x)
        if node is not None and x not in seen:
            seen.add(x)
            todo.extend(i for i in node.input if i)
    return False


def _follow_channels(model, start, stop, heads, head_dim, core_nodes, prod, cons
                     ) -> tuple[list[list[tuple[str, int | None]]], list[_HeadSplit], list[_Depthwise]]:
    """Walk from the heads-first ``start`` ``[B, H, N, D]`` forward to ``stop`` (not through the
    attention core's ``core_nodes``) over ops that keep each head's channels to themselves:
    Transpose, Reshape, Slice of other axes, scalar Mul/Div, pooling and depthwise Conv.

    Agent attention does this twice: Q's grid tokens average-pooled to the agent tokens, and
    V's grid tokens through a depthwise conv added to the merged heads. Each axis is tracked as
    the factors it is made of, major first (``("h", H)``, ``("d", D)``, ``("x", size or None)``
    for anything else), which says which Reshape entry holds the heads and which head each
    conv channel belongs to.

    Returns:
        (the axes' factors at ``stop``, the Reshapes (``lead`` = the entry holding the heads,
        ``rest`` = the static entries from there on), the convs).
    """
    shapes = _shapes(model)
    dims = shapes.get(start) or [None] * 4
    if len(dims) != 4:
        raise _Unrecognised(f"{start}: not a heads-first [B, H, N, D] tensor")
    layout = [[("x", _static(dims[0]))], [("h", heads)], [("x", _static(dims[2]))], [("d", head_dim)]]
    # The path may leave before the head-split Transpose (TorchScript cancels transpose pairs):
    # it starts at the one tensor up the Transposes with a consumer off the way to the core.
    t, towards_core, branches = start, None, []
    while True:
        branches += [(t, layout, u) for u in cons.get(t, [])
                     if u.op_type != "Shape" and u.name not in core_nodes and u is not towards_core]
        node = prod.get(t)
        if node is None or node.op_type not in ("Transpose", "Cast", "Identity"):
            break
        if node.op_type == "Transpose":
            perm = list(_attr(node, "perm"))
            layout = [layout[perm.index(a)] for a in range(len(perm))]
        t, towards_core = node.input[0], node
    if len(branches) != 1 or branches[0][2].input[0] != branches[0][0]:
        raise _Unrecognised(f"{start}: {len(branches)} paths leave it on the way to {stop}")
    t, layout, first = branches[0]
    reshapes, convs = [], []
    for _ in range(32):
        if t == stop:
            return layout, reshapes, convs
        users = [first] if first is not None else \
            [u for u in cons.get(t, []) if u.op_type != "Shape" and u.name not in core_nodes]
        first = None
        if len(users) != 1 or users[0].input[0] != t:
            raise _Unrecognised(f"{t}: {len(users)} consumers on the way to {stop}")
        node = users[0]
        op = node.op_type
        out_dims = shapes.get(node.output[0]) or []
        static = [_static(out_dims[a]) if a < len(out_dims) else None for a in range(len(layout))]
        if op in ("Cast", "Identity"):
            pass
        elif op in _SCALAR_OPS:
            value = constant_value(model, node.input[1])
            if value is None or value.size != 1:
                raise _Unrecognised(f"{node.name}: {op} by a non-scalar on the way to {stop}")
        elif op == "Transpose":
            layout = [layout[p] for p in _attr(node, "perm")]
        elif op == "Slice":
            axes = constant_value(model, node.input[3]) if len(node.input) > 3 and node.input[3] else None
            if axes is None or any(_holds_heads(layout[int(a) % len(layout)]) for a in axes):
                raise _Unrecognised(f"{node.name}: Slice across the heads on the way to {stop}")
            for a in axes:
                layout[int(a) % len(layout)] = [("x", static[int(a) % len(layout)])]
        elif op in ("AveragePool", "MaxPool", "Conv"):
            if any(_holds_heads(axis) for a, axis in enumerate(layout) if a != 1):
                raise _Unrecognised(f"{node.name}: {op} does not have the heads on its channel axis")
            if op == "Conv":
                weight = constant_value(model, node.input[1])
                channels = _size(layout[1])
                if weight is None or channels is None or _attr(node, "group", 1) != channels \
                        or tuple(weight.shape[:2]) != (channels, 1):
                    raise _Unrecognised(f"{node.name}: Conv over the heads' channels is not depthwise")
                positions = int(np.prod(static[2:])) if None not in static[2:] else None
                convs.append(_Depthwise(node.name, _channel_heads(layout[1], node.name), positions))
            layout = layout[:2] + [[("x", d)] for d in static[2:]]
        elif op == "Reshape":
            target = _reshape_target(model, node)
            groups = None if target is None else _regroup(
                [f for axis in layout for f in axis], [d if isinstance(d, int) and d > 0 else None for d in target])
            if groups is None:
                raise _Unrecognised(f"{node.name}: Reshape to {target} splits a head on the way to {stop}")
            # The entry holding the heads is rewritten as a constant, and with it everything after:
            # TorchScript computes it from the layer input's width (``x.shape[-1]``), which pruning keeps.
            lead = next(j for j, axis in enumerate(groups) if _holds_heads(axis, "h"))
            if any(_size(axis) is None for axis in groups[lead:]):
                raise _Unrecognised(f"{node.name}: Reshape to {target} has dynamic dims after the heads")
            reshapes.append(_HeadSplit(node.name, lead, [_size(axis) for axis in groups[lead:]], 0))
            layout = groups
        else:
            raise _Unrecognised(f"{node.name}: {op} on the way from {start} to {stop}")
        t = node.output[0]
    raise _Unrecognised(f"{start}: path to {stop} too long")


def _regroup(factors, target) -> list[list[tuple[str, int | None]]] | None:
    """A Reshape's input factors grouped into its output axes (``target``: ints, ``None`` when
    unknown), or ``None`` when an output axis would cut a head or head-dim factor.

    Factors are matched from both ends; dims of unknown size (batch, TorchScript's token
    counts) pair one to one, and whatever stays unmatched in the middle goes to the one dim
    left there, or must be plain ``x`` when several are left.
    """
    left = _match_from_start(list(factors), list(target))
    if left is None:
        return None
    groups, rest, rest_target = left
    right = _match_from_start(rest[::-1], rest_target[::-1])
    if right is None:
        return None
    tail, middle, middle_target = right
    middle, middle_target = middle[::-1], middle_target[::-1]
    tail = [g[::-1] for g in tail[::-1]]
    # A token count of unknown size at an end of the middle becomes the known dims at that end
    # (TorchScript: [B, H, D, N] -> [B, H·D, G, G] with N and H·D computed at run time).
    if len(middle) > 1 and middle[-1] == ("x", None) and middle_target and middle_target[-1] is not None:
        known = len(middle_target) - next(j for j in range(len(middle_target), 0, -1) if middle_target[j - 1] is None)
        middle, tail = middle[:-1], [[("x", d)] for d in middle_target[-known:]] + tail
        middle_target = middle_target[:-known]
    elif len(middle) > 1 and middle[0] == ("x", None) and middle_target and middle_target[0] is not None:
        known = next(j for j, d in enumerate(middle_target + [None]) if d is None)
        middle, groups = middle[1:], groups + [[("x", d)] for d in middle_target[:known]]
        middle_target = middle_target[known:]
    if len(middle_target) == 1:  # one dim takes whatever is left
        return groups + [middle] + tail
    if any(tag != "x" for tag, _ in middle) or (not middle_target and any(n != 1 for _, n in middle)):
        return None
    return groups + [[("x", d)] for d in middle_target] + tail


def _match_from_start(factors, target):
    """Group leading ``factors`` into leading ``target`` dims while sizes are known.

    Returns ``(groups, factors left, target dims left)``, or ``None`` when a dim would cut a
    head or head-dim factor (``x`` factors may be split).
    """
    groups = []
    for j, dim in enumerate(target):
        if dim is None:
            if factors and factors[0] == ("x", None):
                groups.append([factors.pop(0)])
                continue
            return groups, factors, target[j:]
        group, size = [], 1
        if dim == 1 and factors and factors[0][1] == 1:
            group.append(factors.pop(0))  # a single head (or agent, or token) keeps its own axis
        while size < dim:
            if not factors or factors[0][1] is None:
                return groups, group + factors, target[j:]
            tag, n = factors[0]
            need = dim // size
            if need % n == 0:
                group.append(factors.pop(0))
                size *= n
            elif tag == "x" and n % need == 0:
                group.append(("x", need))
                factors[0] = ("x", n // need)
                size = dim
            else:
                return None
        groups.append(group)
    return groups, factors, []


def _holds_heads(axis, tags: str = "hd") -> bool:
    return any(tag in tags for tag, _ in axis)


def _size(axis) -> int | None:
    sizes = [n for _, n in axis]
    return None if None in sizes else int(np.prod(sizes))


def _static(dim) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


def _channel_heads(axis, where: str) -> np.ndarray:
    """The head of each channel of an axis made of ``axis`` factors (exactly one ``h``)."""
    tags = [tag for tag, _ in axis]
    sizes = [n for _, n in axis]
    if tags.count("h") != 1 or None in sizes:
        raise _Unrecognised(f"{where}: channels are not one head axis times known sizes")
    return np.indices(sizes)[tags.index("h")].reshape(-1)


_SHAPES_CACHE: dict[int, dict] = {}


def _shapes(model) -> dict:
    """Inferred shapes of ``model``, computed once per analysis (find_attention_layers resets it)."""
    key = id(model)
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE.clear()
        _SHAPES_CACHE[key] = value_shapes(model)
    return _SHAPES_CACHE[key]


def _reshape_target(model, node) -> list | None:
    """The Reshape's target shape: constant entries as ints, dynamic ones as ``None``; -1/0 resolved
    from the inferred output shape when known."""
    out = _shapes(model).get(node.output[0])
    value = constant_value(model, node.input[1])
    if value is not None:
        target = [int(d) for d in value]
    else:
        target = _concat_entries(model, node.input[1])
    if target is None:
        return out
    if out and len(out) == len(target):
        target = [o if isinstance(o, int) and (d is None or d <= 0) else d for d, o in zip(target, out)]
    return target


def _concat_entries(model, name) -> list | None:
    prod = producers(model)
    node = prod.get(name)
    if node is None or node.op_type != "Concat":
        return None
    shapes = _shapes(model)
    entries: list = []
    for i in node.input:
        value = constant_value(model, i)
        if value is not None:
            entries.extend(int(d) for d in value.reshape(-1))
        else:
            n = (shapes.get(i) or [None])[0]
            if not isinstance(n, int):
                return None
            entries.extend([None] * n)
    return entries


def _split_sizes(model, node) -> list[int] | None:
    if len(node.input) > 1 and node.input[1]:
        value = constant_value(model, node.input[1])
        return None if value is None else [int(v) for v in value]
    split = _attr(node, "split", None)
    if split is not None:
        return list(split)
    shape = _shapes(model).get(node.input[0])
    axis = _attr(node, "axis", 0)
    if shape and isinstance(shape[axis], int):
        n = len(node.output)
        return [shape[axis] // n] * n
    return None


def _axes(model, node, input_index) -> list[int]:
    if len(node.input) > input_index and node.input[input_index]:
        value = constant_value(model, node.input[input_index])
        if value is None:
            raise _Unrecognised(f"{node.name}: non-constant axes")
        return [int(a) for a in value.reshape(-1)]
    axes = _attr(node, "axes", None)
    if axes is None:
        raise _Unrecognised(f"{node.name}: Squeeze without axes")
    return list(axes)


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


# ----------------------------------------------------------------------------- scoring

def score_heads(onnx_model: onnx.ModelProto, calibration_feeds: list[dict[str, np.ndarray]],
                method: str = "activation", torch_model=None,
                loss_fn: Callable[[Any, dict], Any] | None = None,
                keep: dict[int, list[int]] | None = None, granularity: str = "group") -> dict[int, np.ndarray]:
    """Importance of every head of every prunable layer (higher = more important).

    Args:
        onnx_model: the exported model.
        calibration_feeds: batches as ``{graph_input_name: array}``; extra keys (labels)
            are ignored by the ONNX route and handed to ``loss_fn``.
        method: ``"activation"``: mean over batches of ``‖O_h · W_o[h]‖`` per sample
            (ONNX Runtime, works on any exported model); ``"gradient"``: ``Σ |∂L/∂g_h|``
            over samples (Michel et al. 2019) with a unit gate per sample on each head's output
            in ``torch_model``; ``"ablation"``: the rise of the mean calibration loss when the
            head alone is gated off in ``torch_model`` (one pass over the data per head; in
            loss units, so select with ``normalise=False``; with ``granularity="group"`` a
            grouped-query layer's whole K/V group is gated off at once and each of the group's
            heads scores an equal share); ``"weight"``: ``‖W_o[h]‖_F`` (no data).
        torch_model: the PyTorch model the ONNX file was exported from (``"gradient"``, ``"ablation"``);
            its attention modules must expose ``num_heads`` (directly or via ``in_proj``)
            and an output projection (``proj`` / ``o_proj`` / ``out_proj`` / GPT-2's ``c_proj``), in the graph's
            layer order, or run once per layer in that order where layers share a module (ALBERT; see
            :func:`head_gates`).
        loss_fn: ``loss_fn(output, feeds) -> scalar tensor``, the batch mean (``"gradient"``, ``"ablation"``).
        keep: ``{layer: [head, ...]}`` still present (layers not named keep all): the
            other heads are scored as already pruned — ``"activation"`` runs the model
            pruned to ``keep``, ``"gradient"`` gates them to zero — and score 0. This is
            the re-scoring step of :func:`select_heads_iteratively`.
        granularity: the unit pruning will remove in grouped-query layers (see
            :func:`prune_heads`): what ``keep`` may look like and what ``"ablation"`` gates off.

    Returns:
        ``{layer_index: scores [H]}`` keyed like :func:`find_attention_layers`.

    Raises:
        AttncError: unknown method, missing torch model / loss, no calibration data, no
            attention in the model, or a ``keep`` that is not a head subset of each layer.
    """
    if method not in METHODS:
        raise AttncError(f"unknown head-scoring method {method!r}", f"use one of {', '.join(METHODS)}")
    _check_granularity(granularity)
    layers = find_attention_layers(onnx_model)
    masks = _keep_masks(layers, keep)
    if method == "weight":
        return {l.index: masks[l.index] * np.linalg.norm(
            l.out_proj.matrix(onnx_model)[l.out_proj.columns], axis=(1, 2)) for l in layers}
    if not calibration_feeds:
        raise AttncError("head scoring needs calibration data", "pass at least one batch of inputs")
    if method in ("gradient", "ablation"):
        if torch_model is None or loss_fn is None:
            raise AttncError(f"{method} head scoring needs the PyTorch model and a loss function",
                             "pass torch_model= and loss_fn=, or use method='activation'")
        if method == "gradient":
            scores = _gradient_scores(onnx_model, layers, calibration_feeds, torch_model, loss_fn, masks)
        else:
            scores = _ablation_scores(onnx_model, layers, calibration_feeds, torch_model, loss_fn, masks,
                                      granularity)
        return {i: s * masks[i] for i, s in scores.items()}
    if all(m.all() for m in masks.values()):
        return _activation_scores(onnx_model, layers, calibration_feeds)
    # Score what is left on the model pruned to `keep` (kept heads stay in order), then put
    # each score back at its head's original index.
    pruned, _ = prune_heads(onnx_model, keep={i: [int(j) for j in np.flatnonzero(m)] for i, m in masks.items()},
                            granularity=granularity)
    left = _activation_scores(pruned, find_attention_layers(pruned), calibration_feeds)
    scores = {i: np.zeros(len(m)) for i, m in masks.items()}
    for i, m in masks.items():
        scores[i][m] = left[i]
    return scores


def _keep_masks(layers, keep: dict[int, list[int]] | None) -> dict[int, np.ndarray]:
    """``{layer: bool [H]}``, True on the heads ``keep`` keeps (all of them when ``keep`` is None)."""
    masks = {l.index: np.ones(l.heads, dtype=bool) for l in layers}
    for i, kept in (keep or {}).items():
        if i not in masks:
            raise AttncError(f"no attention layer {i}", f"layers are 0..{len(layers) - 1}")
        h = len(masks[i])
        if not kept or not all(0 <= j < h for j in kept):
            raise AttncError(f"layer {i}: heads to keep {list(kept)} are not a non-empty subset of [0, {h})")
        masks[i][:] = False
        masks[i][list(kept)] = True
    return masks


def _activation_scores(model, layers, feeds_list) -> dict[int, np.ndarray]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for l in layers:
        if l.merged not in existing:
            probe.graph.output.append(helper.make_value_info(l.merged, onnx.TypeProto()))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    weights = {l.index: l.out_proj.matrix(model) for l in layers}
    totals = {l.index: np.zeros(l.heads) for l in layers}
    count = 0
    for feeds in feeds_list:
        merged = session.run([l.merged for l in layers], {k: feeds[k] for k in inputs})
        for l, x in zip(layers, merged):
            x = x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float64)   # [B, tokens, H*Dv]
            w = weights[l.index]
            for h, rows in enumerate(l.out_proj.columns):
                contribution = x[..., rows] @ w[rows]                     # [B, tokens, C_out]
                totals[l.index][h] += np.linalg.norm(contribution, axis=(1, 2)).sum()
        count += next(iter(merged)).shape[0]
    return {i: t / count for i, t in totals.items()}


def torch_attention_modules(torch_model) -> list[tuple[Any, int, Any]]:
    """``(module, num_heads, output_projection)`` of each attention module, in registration order.

    A module counts when it has a head count (``num_heads``, ``n_heads``, ``in_proj.num_heads``, for
    transformers' attention with a ``q_proj`` / ``qkv_proj`` (Phi-3) / ``query_key_value`` / ``Wqkv``
    (ModernBERT) its ``config.num_attention_heads``, ALBERT's ``num_attention_heads`` beside ``query``) and an
    output projection (``proj``, ``o_proj``, ``out_proj``, ``c_proj`` (GPT-2), ``out_lin`` (DistilBERT),
    ``dense`` (Phi, GPT-NeoX), ``o`` (T5), ``Wo`` (ModernBERT)); BERT-style attention (Swin's too) counts as the
    ``BertAttention`` holding ``self`` (with ``num_attention_heads``) and ``output.dense``. Where a ``norm`` as wide as the output
    projection's input normalises the merged heads in front of it (MiniMax's lightning attention,
    ``num_attention_heads`` beside ``qkv_proj``), that norm takes the projection's place: pruning zeroes a
    head where the heads are merged, in front of the norm (see :func:`prune_heads`). A module shared by several
    layers (ALBERT's) is listed once: :func:`head_gates` maps layers to its calls.
    """
    found = []
    for module in torch_model.modules():
        heads = next((h for h in (getattr(module, "num_heads", None), getattr(module, "n_heads", None),
                                  getattr(getattr(module, "in_proj", None), "num_heads", None)) if isinstance(h, int)),
                     None)
        if heads is None and any(hasattr(module, n) for n in ("q_proj", "qkv_proj", "query_key_value", "Wqkv")):
            # transformers (MiniMax's lightning attention keeps its own count: it has no config)
            heads = getattr(module, "num_attention_heads", None) or \
                getattr(getattr(module, "config", None), "num_attention_heads", None)
        if heads is None and hasattr(module, "query") and hasattr(module, "dense"):   # ALBERT: all in one module
            heads = getattr(module, "num_attention_heads", None)
        proj = next((getattr(module, n) for n in ("proj", "o_proj", "out_proj", "c_proj", "out_lin", "dense", "o", "Wo")
                     if hasattr(module, n)), None)
        norm = getattr(module, "norm", None)
        if proj is not None and getattr(getattr(norm, "weight", None), "shape", None) == (proj.weight.shape[-1],):
            proj = norm   # a norm across the merged heads (MiniMax's lightning attention): pruning zeroes a head in
                          # front of it
        inner = getattr(module, "self", None)   # BERT-style: BertAttention(self=BertSelfAttention, output.dense)
        if heads is None and inner is not None and hasattr(getattr(module, "output", None), "dense"):
            heads, proj = getattr(inner, "num_attention_heads", None), module.output.dense
        if isinstance(heads, int) and heads > 0 and proj is not None and hasattr(proj, "weight"):
            found.append((module, heads, proj))
    return found


def head_gates(torch_model, gates: dict[int, Any]):
    """Context manager multiplying head ``h`` of attention layer ``i`` by ``gates[i][h]``.

    Layer ``i`` is attention module ``i`` of :func:`torch_attention_modules` (registration order) while each
    module runs once per forward of ``torch_model``. Where one module runs several times in a forward (ALBERT's
    layers share one attention module), layer ``i`` is the forward's ``i``-th attention call, in execution order,
    which is the ONNX graph's layer order: the gate of each call is that call's layer's (the count restarts at
    each call of ``torch_model``). The modules' first calls must then run in registration order, so that the
    calls before the first repeat mean the same layers either way; otherwise this raises.

    The gate acts on the output projection's input ``[.., H·Dv]`` (heads-major), which is
    exactly what pruning removes: a zero gate is the torch reference for a pruned head. For
    agent attention that input is the head's attention output plus its channels of the
    depthwise conv of V, and pruning removes both.
    A gate ``[B, H]`` gates each sample separately (the batch on the input's first axis).

    Where a module normalises its q / k projection across all the heads before the head split (OLMo2's
    ``q_norm`` / ``k_norm``, as wide as ``H`` or ``H_kv`` heads of ``head_dim``), the gate also multiplies that
    norm's input, per query head for ``q_norm`` and per K/V head for ``k_norm`` (``1 - Π(1 - g)`` over the
    head's group ``h // g``: 0 when all its query heads are gated off): pruning removes the heads' projection
    channels there and keeps the norm's divisor over all of them (:func:`prune_heads`).

    Raises:
        AttncError: (when ``torch_model`` runs) a gate for a layer the forward did not run, or a module run
            twice in a forward whose modules ran out of registration order before.
    """
    import contextlib

    def channel_gate(gate, heads: int, x, what: str = "the tensor they gate"):
        """``gate`` ``[H]`` or ``[B, H]`` as a multiplier of ``x`` ``[.., heads·D]``: each head's channels alike."""
        if gate.ndim == 2:
            if x.ndim < 2 or x.shape[0] != gate.shape[0]:
                raise AttncError(f"per-sample head gates {tuple(gate.shape)} do not match {what} "
                                 f"{tuple(x.shape)} (batch first)")
            gate = gate.reshape(gate.shape[0], *([1] * (x.ndim - 2)), heads)
        return (gate.unsqueeze(-1) * x.new_ones(x.shape[-1] // heads)).flatten(-2).to(x.dtype)

    @contextlib.contextmanager
    def active():
        modules = torch_attention_modules(torch_model)
        calls: list[int] = []   # the module (registration index) of each attention call of this forward
        shared = [False]        # a module has run twice in this forward
        # the gate of each module's call being made; a module that runs once keeps its own layer's
        current = {k: gates.get(k) for k in range(len(modules))}

        def start(_module, _args):
            calls.clear()
            shared[0] = False

        def call(_module, _args, k):
            n = len(calls)
            if k in calls and not shared[0]:
                if calls != list(range(n)):
                    raise AttncError(f"attention module {k} runs twice in one forward, after the modules ran in "
                                     f"another order than registration ({calls}): the layers cannot be gated apart")
                shared[0] = True   # from here on the n-th call is layer n (the calls so far agree: call j = module j)
            calls.append(k)
            current[k] = gates.get(n if shared[0] else k)

        def finish(_module, _args, _output):
            missing = [i for i in gates if i >= (len(calls) if shared[0] else len(modules))]
            if missing:
                raise AttncError(f"no attention module {missing[0]} in the PyTorch model ({len(modules)} found"
                                 + (f", called {len(calls)} times in its forward)" if shared[0] else ")"))

        handles = [torch_model.register_forward_pre_hook(start), torch_model.register_forward_hook(finish)]
        for k, (module, heads, proj) in enumerate(modules):
            handles.append(module.register_forward_pre_hook(lambda m, args, k=k: call(m, args, k)))
            for norm, width_heads in _norms_across_heads(module, heads):
                def norm_hook(_module, args, k=k, width_heads=width_heads, heads=heads):
                    gate = current[k]
                    if gate is None:
                        return None
                    g = gate if width_heads == heads else 1 - (1 - gate).unflatten(-1, (width_heads, -1)).prod(-1)
                    return (args[0] * channel_gate(g, width_heads, args[0]), *args[1:])

                handles.append(norm.register_forward_pre_hook(norm_hook))

            def pre_hook(_module, args, k=k, heads=heads):
                gate = current[k]
                if gate is None:
                    return None
                return (args[0] * channel_gate(gate, heads, args[0], "the output projection's input"), *args[1:])

            handles.append(proj.register_forward_pre_hook(pre_hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    return active()


def _norms_across_heads(module, heads: int) -> list[tuple[Any, int]]:
    """``(norm, the heads it spans)`` of each norm of ``module``'s q / k projection across all its heads in front of
    the head split: OLMo2's ``q_norm`` (``H·D`` wide) and ``k_norm`` (``H_kv·D``), not Qwen3's per-head ones
    (``D``)."""
    head_dim = getattr(module, "head_dim", None)
    found = []
    for name in ("q_norm", "k_norm"):
        width = getattr(getattr(getattr(module, name, None), "weight", None), "shape", (None,))[-1]
        if isinstance(head_dim, int) and isinstance(width, int) and width != head_dim and width % head_dim == 0 \
                and heads % (width // head_dim) == 0 and (name == "k_norm" or width // head_dim == heads):
            found.append((getattr(module, name), width // head_dim))
    return found


def gates_from_keep(keep: dict[int, list[int]], heads: dict[int, int]) -> dict[int, Any]:
    """``{layer: 0/1 gate tensor [H]}`` for :func:`head_gates`: 1 on kept heads, 0 on pruned ones."""
    import torch

    gates = {}
    for i, h in heads.items():
        gate = torch.zeros(h)
        gate[list(keep.get(i, range(h)))] = 1.0
        gates[i] = gate
    return gates


def _torch_inputs(model, layers, torch_model, feeds: dict) -> list[str]:
    """The graph inputs ``torch_model`` takes, in order, after checking its attention matches the graph's layers:
    one module per layer, or, where there are fewer modules than layers, modules that run once per layer (ALBERT's
    shared one), counted on a forward of ``feeds``."""
    import torch

    names = [i.name for i in model.graph.input if i.name not in {x.name for x in model.graph.initializer}]
    modules = torch_attention_modules(torch_model)
    heads = [h for _, h, _ in modules]
    runs = ""
    if len(modules) < len(layers):
        calls = _attention_calls(torch_model, modules, [torch.from_numpy(np.asarray(feeds[n])) for n in names])
        heads, runs = [heads[k] for k in calls], f" called {len(calls)} times in a forward"
    if heads != [l.heads for l in layers]:
        raise AttncError(f"the PyTorch model has {len(modules)} attention modules "
                         f"({[m[1] for m in modules]} heads){runs}, the ONNX graph {len(layers)} layers "
                         f"({[l.heads for l in layers]} heads)", "pass the model the ONNX file was exported from")
    return names


def _attention_calls(torch_model, modules, args) -> list[int]:
    """The module (index into ``modules``) of each attention call of one forward of ``torch_model`` on ``args``."""
    import torch

    calls: list[int] = []
    handles = [m.register_forward_pre_hook(lambda *_, k=k: calls.append(k)) for k, (m, _, _) in enumerate(modules)]
    try:
        with eval_mode(torch_model), torch.no_grad():
            torch_model(*args)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _ablation_scores(model, layers, feeds_list, torch_model, loss_fn, masks, granularity) -> dict[int, np.ndarray]:
    import torch

    input_names = _torch_inputs(model, layers, torch_model, feeds_list[0])
    batches = [([torch.from_numpy(np.asarray(feeds[n])) for n in input_names], feeds) for feeds in feeds_list]
    gates = {i: torch.tensor(masks[l.index], dtype=torch.float32) for i, l in enumerate(layers)}
    scores = {l.index: np.zeros(l.heads) for l in layers}
    # The hooks read the gate tensors at call time: flipping one entry ablates that head.
    with eval_mode(torch_model), torch.no_grad(), head_gates(torch_model, gates):
        def mean_loss() -> float:
            return float(np.mean([float(loss_fn(torch_model(*args), feeds)) for args, feeds in batches]))

        reference = mean_loss()
        for i, l in enumerate(layers):
            # Grouped-query layers pruned by group lose a K/V head with all its query heads, so a
            # group is ablated as a whole; each of its heads gets an equal share of the rise, which
            # makes the group's summed score (what select_heads ranks) the loss of pruning it.
            units = (granularity == "group" and l.kv_groups()) or [[h] for h in range(l.heads)]
            for unit in units:
                live = [j for j in unit if masks[l.index][j]]
                if not live:
                    continue
                gates[i][live] = 0.0
                scores[l.index][live] = (mean_loss() - reference) / len(live)
                gates[i][live] = 1.0
    return scores


def _gradient_scores(model, layers, feeds_list, torch_model, loss_fn, masks) -> dict[int, np.ndarray]:
    import torch

    input_names = _torch_inputs(model, layers, torch_model, feeds_list[0])
    totals = {l.index: np.zeros(l.heads) for l in layers}
    per_sample = True
    with eval_mode(torch_model):
        for feeds in feeds_list:
            args = [torch.from_numpy(np.asarray(feeds[n])) for n in input_names]
            # One gate per sample and head: the score sums |∂L/∂g| over samples (Michel et al.'s
            # E_x |∂L(x)/∂ξ_h|). A gate shared by the batch would sum signed per-sample gradients
            # first, which nearly cancel on the data a model was trained on.
            batch = args[0].shape[0] if per_sample and args and args[0].ndim else None
            gates = {i: torch.tensor(np.broadcast_to(masks[l.index], (batch, l.heads)) if batch else masks[l.index],
                                     dtype=torch.float32, requires_grad=True) for i, l in enumerate(layers)}
            try:
                with head_gates(torch_model, gates):
                    loss = loss_fn(torch_model(*args), feeds)
            except AttncError as exc:
                if not batch:
                    raise
                log.warning("gradient head scores: %s; falling back to one gate per batch", exc.problem)
                per_sample = False
                gates = {i: torch.tensor(masks[l.index], dtype=torch.float32, requires_grad=True)
                         for i, l in enumerate(layers)}
                with head_gates(torch_model, gates):
                    loss = loss_fn(torch_model(*args), feeds)
            grads = torch.autograd.grad(loss, [gates[i] for i in range(len(layers))])
            for l, g in zip(layers, grads):
                totals[l.index] += g.abs().reshape(-1, l.heads).sum(0).detach().numpy()
    return totals


# ----------------------------------------------------------------------------- pruning

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
        inputs and outputs.

    Raises:
        AttncError: no recognisable attention, a bad ratio/count/granularity, a layer pruned to
            zero heads, head indices out of range, a ``keep`` that is not whole groups / the same
            number of query heads in every group (``"query"``: one group size for the repeat).
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
    params_before = _param_count(model)
    report_layers = []
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
    try:
        after = find_attention_layers(model)
    finally:
        _PROVEN_KEEPS.clear()
    if [l.heads for l in after] != [len(keep.get(l.index, range(l.heads))) for l in layers]:
        raise AttncError("internal error: the pruned graph's heads do not match the request",
                         "please report this model")
    for l, new in zip(layers, after):
        kept = sorted(keep.get(l.index, range(l.heads)))
        grouped = l.kv_of_head is not None
        report_layers.append(LayerPrune(
            l.index, l.anchor, l.core, l.heads, len(kept), kept, layer_params[l.index], new.params(model),
            layer_flops[l.index], new.flops(model, tokens=tokens), l.kv_heads if grouped else None,
            new.kv_heads if grouped else None))
    report = PruneReport(report_layers, params_before, _param_count(model), tokens or layers[0].tokens, granularity)
    log.info("prune_heads: %d -> %d heads, %d -> %d parameters", report.heads_before, report.heads_after,
             report.params_before, report.params_after)
    return model, report


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


def _replace_input(model, node, i, value: np.ndarray, name: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    node.input[i] = name


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
