"""The layer model: what head pruning records about an attention layer it finds (the projections, head splits, repeats
and channel ops of its heads), and the exception a walk raises where it cannot read the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from attnc.passes.core import constant_value

_AGENT_CORES = ("agent", "attnc::AgentAttention")


class _Unrecognised(Exception):
    """A walk left the shapes it understands; the message says where."""


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
    # Graph inputs and outputs holding this layer's heads, {name: (heads axis, H or H_kv there, role)}: a generation
    # step's KV cache (``past_key_values.N.key`` concatenated in front of the new keys, ``present.N.key``), whose
    # declared head count pruning rewrites: the step's cache then holds the kept heads only.
    interface: dict[str, tuple[int, int, str]] = field(default_factory=dict, repr=False)

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


def _replace_input(model, node, i, value: np.ndarray, name: str) -> None:
    model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
    node.input[i] = name
