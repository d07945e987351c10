"""``attnc::KernelLinearAttention``: kernelized linear attention and lightning attention.

Not named ``LinearAttention``: ONNX opset 27 has a standard ``LinearAttention`` op and
TensorRT's ONNX parser routes nodes to its built-in importers by op_type whatever the
domain, so a node of that name would never reach the attnc plugin.

Contract
--------
Inputs (an absent optional input is ``""`` when a later one is present):
    Q      ``[B, H, N, D]``  queries, *before* the feature map.
    K      ``[B, H, N, D]``  keys, before the feature map (same N as Q).
    V      ``[B, H, N, Dv]`` values (Dv may differ from D).
    decay  ``[H]`` optional, float32 (also in fp16 models), per-head decay λ_h in (0, 1];
           only meaningful with ``causal=1`` (ignored otherwise).
    state  ``[B, H, D, Dv + normalize]`` optional, float32 (also in fp16/bf16 models), causal
           only: the recurrent state before token 0. Columns ``[:Dv]`` hold
           S = Σ λ^{..} φ(k_s) v_sᵀ; with ``normalize=1`` column ``Dv`` holds the normaliser's
           running sum z = Σ λ^{..} φ(k_s). Absent = zeros.
Outputs:
    O          ``[B, H, N, Dv]``, the dtype of Q.
    state_out  ``[B, H, D, Dv + normalize]`` optional, float32, causal only: the state after
               the last token (same layout as ``state``).
Attributes:
    feature_map  ``"elu1"`` (elu(x)+1), ``"relu"`` or ``"identity"``; default ``"elu1"``.
    causal       int, default 0.
    normalize    int, default 1: divide by the kernel normaliser (+ ``eps``).
    eps          float, default 1e-6.
    scale        float, default 1.0: multiplies φ(Q) (so φ(Q)·scale replaces φ(Q) below).

Semantics (q = scale·φ(Q), k = φ(K), per batch and head; S0, z0 from ``state``, else 0):
    non-causal:  O = q (kᵀ V)                    [/ (q · Σ_s k_s + eps)]
    causal:      O_t = q_t·(λ^{t+1} S0 + Σ_{s≤t} λ^{t−s} k_s v_sᵀ)
                       [/ (q_t·(λ^{t+1} z0 + Σ_{s≤t} λ^{t−s} k_s) + eps)]
                 state_out = [S_N | z_N],  S_N = λ^N S0 + Σ_{s<N} λ^{N−1−s} k_s v_sᵀ,  z_N likewise
with λ = 1 when ``decay`` is absent. So running the op on tokens [0, N) equals running it
on [0, m) and then on [m, N) with the first call's ``state_out`` as the second's ``state``
(prefill, then decode one token at a time). The scale is not in the state. ``state`` and
``state_out`` need ``causal=1`` (:func:`make_node` refuses them otherwise). Causal + decay
+ identity + normalize=0 is lightning attention (TransNormerLLM), which ONNX opset 27
``LinearAttention`` (``update_rule="gated"``, decay ``log λ``, ``scale=1``; ``past_state`` /
``present_state`` in the same ``[B, H, D, Dv]`` layout) also computes.

ONNX function body (what ONNX Runtime runs): non-causal uses the associative form q(kᵀV)
(O(N·D·Dv)); causal computes Σ_{s≤t} λ^{t−s}(q_t·k_s)[v_s | 1] in float32 (the last column is
the normaliser) with :func:`attnc.plugins.chunked.causal_product`: one masked quadratic product
up to 192 tokens, Lightning Attention-2's chunks beyond (O(N·C·(D+Dv)) instead of O(N²·(D+Dv)),
and no ``[H, N, N]`` mask; measured in ``benchmarks/RESULTS.md``). Before that the body used
the masked quadratic form at every length, and before that prefix sums over the outer products
(``[B, H, N, D, Dv]``, slower than both). The state adds ``(q_t·λ^{t+1}) [S0 | z0]`` to the product and
``(k_s·λ^{N−1−s})ᵀ [V | 1]`` (one GEMM for S_N and z_N) outside it, both in float32.
An absent ``decay`` is detected through ``Gemm``'s optional C input (λ > 0 by contract, so
a 0 means "absent") to stay within opset 17 (``OptionalHasElement`` on tensors is 18+).
``feature_map``, ``causal``, ``state`` and ``state_out`` select a function overload
(:func:`overload_name`, e.g. ``"identity_state_in_out"``) instead of branching inside one body:
a string attribute could only be compared with ``LabelEncoder`` (ai.onnx.ml; ``Equal`` on
strings is opset 19+), which TensorRT's parser cannot import, and ``If`` costs ONNX Runtime
time unless it folds it (and it fails to inline an ``If`` nested in a constant-folded ``If``);
ONNX Runtime also rejects a node with fewer outputs than its function ("output index 1 is out
of range"), and its function type inference fails on ``Optional`` of an absent input.
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from attnc import DOMAIN
from attnc.plugins.chunked import causal_product
from attnc.plugins.chunked import constant as _const

OP_TYPE = "KernelLinearAttention"
FEATURE_MAPS = ("elu1", "relu", "identity")
ATTRIBUTES = {"feature_map": "elu1", "causal": 0, "normalize": 1, "eps": 1e-6, "scale": 1.0}
INPUTS = ("Q", "K", "V", "decay", "state")
OUTPUTS = ("O", "state_out")
# Inputs that stay float32 in fp16 and bf16 models (the TensorRT precision conversion reads
# these): decay and state. Outputs after the first are float32 as extra_outputs declares them.
FLOAT32_INPUTS = (3, 4)
# What an absent optional input equals, where a constant does (TensorRT's inlined bodies need
# every input they read): no decay is λ = 1.
ABSENT_INPUTS = {3: 1.0}
OPSET = 17


def output_shape(input_shapes, **attrs):
    """``[B, H, N, Dv]`` (output 0) from the shapes of Q, K, V (and decay, state)."""
    q, _, v = input_shapes[:3]
    return [q[0], q[1], q[2], v[3]]


def state_shape(q_shape, value_dim, normalize) -> list:
    """``[B, H, D, Dv + normalize]``: the recurrent state (``S | z``) of a node with queries of
    shape ``q_shape`` (dims may be ints or symbolic)."""
    return [q_shape[0], q_shape[1], q_shape[3], value_dim + int(bool(normalize))]


def extra_outputs(input_shapes, **attrs) -> list[tuple[list, str]]:
    """``[(shape, dtype)]`` of output 1, ``state_out``: ``[B, H, D, Dv + normalize]``, float32."""
    q, _, v = input_shapes[:3]
    return [(state_shape(q, v[3], attrs.get("normalize", ATTRIBUTES["normalize"])), "float32")]


def overload_name(has_state: bool, has_state_out: bool, causal: bool = True, feature_map: str = "elu1") -> str:
    """The function overload for a node: its feature map, then nothing (non-causal), ``causal``,
    or causal with ``state`` and/or ``state_out`` (``state``, ``state_out``, ``state_in_out``),
    e.g. ``"relu"``, ``"identity_causal"``, ``"elu1_state_in_out"``."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if not causal:
        if has_state or has_state_out:
            raise ValueError("state / state_out need causal=1")
        return feature_map
    return feature_map + {(False, False): "_causal", (True, False): "_state", (False, True): "_state_out",
                          (True, True): "_state_in_out"}[(bool(has_state), bool(has_state_out))]


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x) for one of :data:`FEATURE_MAPS`."""
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None,
              state: torch.Tensor | None = None, *, feature_map: str = "elu1", causal: int = 0,
              normalize: int = 1, eps: float = 1e-6, scale: float = 1.0, return_state: bool = False):
    """The op's semantics in plain torch (any float dtype, float64 included).

    Written as the recurrence over t (causal) / the associative product (non-causal),
    deliberately *not* the way the ONNX function body computes it. The causal recurrence
    runs in Q's dtype promoted to at least float32 (float64 stays float64), O is returned in
    Q's dtype.

    Returns:
        O, or ``(O, state_out)`` with ``return_state=True`` (``state_out`` float32, float64
        for float64 inputs).
    """
    if (state is not None or return_state) and not causal:
        raise ValueError("state / state_out need causal=1 (non-causal attention has no recurrent state)")
    q = feature(q, feature_map) * scale
    k = feature(k, feature_map)
    if not causal:
        out = q @ (k.transpose(-2, -1) @ v)
        den = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)
        return out / (den + eps) if normalize else out
    out_dtype = q.dtype
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    b, h, n, d = q.shape
    dv = v.shape[-1]
    lam = (torch.ones(h, dtype=acc, device=q.device) if decay is None
           else decay.to(acc)).view(1, h, 1, 1)
    if state is None:
        kv, zsum = q.new_zeros(b, h, d, dv), q.new_zeros(b, h, d, 1)
    else:
        expected = state_shape(q.shape, dv, normalize)
        if list(state.shape) != expected:
            raise ValueError(f"state must be [B, H, D, Dv + normalize] = {expected}, got {list(state.shape)}")
        state = state.to(acc)
        kv = state[..., :dv]
        zsum = state[..., dv:] if normalize else q.new_zeros(b, h, d, 1)
    outs = []
    for t in range(n):
        kt, vt, qt = k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1]
        kv = lam * kv + kt.transpose(-2, -1) @ vt
        zsum = lam * zsum + kt.transpose(-2, -1)
        o = qt @ kv
        if normalize:
            o = o / (qt @ zsum + eps)
        outs.append(o)
    out = torch.cat(outs, dim=2).to(out_dtype) if outs else q.new_zeros(b, h, 0, dv).to(out_dtype)
    if not return_state:
        return out
    state_out = torch.cat([kv, zsum], dim=-1) if normalize else kv
    return out, state_out.to(torch.promote_types(acc, torch.float32))


def _has(names, index: int) -> bool:
    return len(names) > index and bool(names[index])


def add_to_model(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Attach the function overload ``node`` needs to ``model`` (and name it in ``node.overload``)."""
    from attnc.passes.core import add_function, default_opset, node_attribute

    while len(node.output) > 1 and not node.output[-1]:
        node.output.pop()  # ORT wants a node's outputs to match its function's
    has_state, has_state_out = _has(node.input, 4), _has(node.output, 1)
    causal = bool(node_attribute(node, "causal", ATTRIBUTES["causal"]))
    feature_map = node_attribute(node, "feature_map", ATTRIBUTES["feature_map"])
    feature_map = feature_map.decode() if isinstance(feature_map, bytes) else feature_map
    node.overload = overload_name(has_state, has_state_out, causal, feature_map)
    add_function(model, function_proto(max(default_opset(model), OPSET), has_state, has_state_out, causal,
                                       feature_map))


def make_node(inputs, outputs, name, **attrs) -> onnx.NodeProto:
    """A ``KernelLinearAttention`` node; its ``overload`` follows ``state`` / ``state_out``.

    Args:
        inputs: ``[Q, K, V]``, ``[Q, K, V, decay]`` or ``[Q, K, V, decay, state]``
            (``decay`` may be ``""``).
        outputs: ``[O]`` or ``[O, state_out]``.
        name: the node's name.
        **attrs: any of :data:`ATTRIBUTES`; the rest take their defaults.

    Raises:
        ValueError: unknown attribute or feature map, wrong input/output count, or
            ``state`` / ``state_out`` without ``causal=1``.
    """
    unknown = set(attrs) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(ATTRIBUTES)}")
    if attrs.get("feature_map", "elu1") not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}")
    inputs, outputs = list(inputs), list(outputs)
    while len(inputs) > 3 and not inputs[-1]:
        inputs.pop()
    while len(outputs) > 1 and not outputs[-1]:
        outputs.pop()
    if not 3 <= len(inputs) <= len(INPUTS) or not all(inputs[:3]):
        raise ValueError(f"KernelLinearAttention takes inputs {', '.join(INPUTS)} (the first 3 required), "
                         f"got {inputs}")
    if not 1 <= len(outputs) <= len(OUTPUTS) or not outputs[0]:
        raise ValueError(f"KernelLinearAttention has outputs {', '.join(OUTPUTS)}, got {outputs}")
    full = {**ATTRIBUTES, **attrs}
    full["causal"], full["normalize"] = int(full["causal"]), int(full["normalize"])
    full["eps"], full["scale"] = float(full["eps"]), float(full["scale"])
    has_state, has_state_out = _has(inputs, 4), _has(outputs, 1)
    if (has_state or has_state_out) and not full["causal"]:
        raise ValueError("state / state_out need causal=1: non-causal linear attention has no recurrent "
                         "state (drop them, or set causal=1)")
    node = helper.make_node(OP_TYPE, inputs, outputs, name=name, domain=DOMAIN, **full)
    node.overload = overload_name(has_state, has_state_out, bool(full["causal"]), full["feature_map"])
    return node


def _ref(attr_name: str, ref: str, attr_type) -> onnx.AttributeProto:
    return helper.make_attribute_ref(attr_name, attr_type, ref_attr_name=ref)


def function_proto(opset: int = OPSET, has_state: bool = False, has_state_out: bool = False,
                   causal: bool = False, feature_map: str = "elu1") -> onnx.FunctionProto:
    """The op's body in standard ONNX (no ``If`` but the causal product's length switch, no
    string or ``ai.onnx.ml`` op: TensorRT's parser inlines it too).

    Args:
        opset: default-domain opset the body declares; pass the model's own (17 or
            higher: the ops used have the same semantics from 17 to 23+), since the
            ONNX checker rejects a function whose opset differs from the model's
            where an op's schema changed in between (e.g. ``Constant`` at 21).
        has_state: the overload that reads input ``state``.
        has_state_out: the overload with output ``state_out``.
        causal: the causal body (implied by ``has_state`` / ``has_state_out``).
        feature_map: the body's feature map.

    The overload, not the node's ``causal`` and ``feature_map`` attributes, decides which body
    runs: :func:`make_node` and :func:`add_to_model` name the overload matching the attributes.
    """
    from attnc.passes.core import live_nodes  # passes import this module

    causal = bool(causal or has_state or has_state_out)
    if opset < OPSET:
        raise ValueError(f"KernelLinearAttention's body needs opset >= {OPSET}, got {opset}")
    A = onnx.AttributeProto
    n = helper.make_node

    def phi(x: str, out: str) -> list[onnx.NodeProto]:
        if feature_map == "elu1":
            return [n("Elu", [x], [out + "_elu"], alpha=1.0), n("Add", [out + "_elu", "one_t"], [out])]
        return [n("Relu" if feature_map == "relu" else "Identity", [x], [out])]

    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    nodes = [
        # attributes as tensors
        _attr_const("normalize_i", "value_int", "normalize", A.INT),
        _attr_const("eps_f", "value_float", "eps", A.FLOAT),
        _attr_const("scale_f", "value_float", "scale", A.FLOAT),
        _const("one", 1.0), _const("zero", 0.0),
        _const("i0", 0, TensorProto.INT64), _const("i1", 1, TensorProto.INT64),
        _const("i2", 2, TensorProto.INT64),
        _const("ax_m1", [-1], TensorProto.INT64), _const("ax_m2", [-2], TensorProto.INT64),
        _const("ax_zero", [0], TensorProto.INT64), _const("ax_3", [3], TensorProto.INT64),
        # dtype-following constants (fp16 models): CastLike to Q
        n("CastLike", ["one", "Q"], ["one_t"]), n("CastLike", ["zero", "Q"], ["zero_t"]),
        n("CastLike", ["eps_f", "Q"], ["eps_t"]), n("CastLike", ["scale_f", "Q"], ["scale_t"]),
        *phi("Q", "q_phi"), *phi("K", "kf"),
        n("Mul", ["q_phi", "scale_t"], ["qf"]),
        *_decay_and_positions(),
    ]
    nodes += [n("Shape", ["V"], ["dv"], start=3, end=4)]                      # [1]: Dv
    if has_state:
        nodes += _state_columns()
    nodes += [
        *(_causal_nodes(has_state) if causal else _noncausal_nodes()),
        # normalize=0 divides by one: a Where on the [B, H, N, 1] normaliser, not an If
        n("Cast", ["normalize_i"], ["is_norm"], to=TensorProto.BOOL),
        n("Add", ["den", "eps_t"], ["den_eps"]),
        n("Where", ["is_norm", "den_eps", "one_t"], ["divisor"]),
        n("Div", ["num", "divisor"], ["O"]),
    ]
    if has_state_out:
        nodes += _state_out(has_state)
    defaults = [helper.make_attribute(k, v) for k, v in ATTRIBUTES.items()]
    outputs = list(OUTPUTS) if has_state_out else ["O"]
    # the pieces the overloads share are written once, for the overload that reads most of them:
    # each overload keeps only what its outputs read
    return helper.make_function(
        DOMAIN, OP_TYPE, list(INPUTS), outputs, live_nodes(nodes, outputs)[0],
        [helper.make_opsetid("", opset)],
        attribute_protos=defaults, overload=overload_name(has_state, has_state_out, causal, feature_map),
        doc_string="attnc KernelLinearAttention; see attnc.plugins.linear")


def _attr_const(out: str, const_attr: str, ref: str, attr_type) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(_ref(const_attr, ref, attr_type))
    return node


def _decay_and_positions() -> list[onnx.NodeProto]:
    """``log_lam`` [H, 1, 1] (0 without decay), ``seq`` (N, int64 scalar) and ``pos`` (0..N-1, float32)."""
    n = helper.make_node
    return [
        # decay: Gemm's optional C gives λ (> 0) when the input is present, 0 when absent
        _const("one_i", [1], TensorProto.INT64),
        _const("one_11", [1.0]), _const("two_ones", [1, 1], TensorProto.INT64),
        n("Shape", ["Q"], ["q_shape"]),
        n("Gather", ["q_shape", "i1"], ["heads"], axis=0),
        n("Gather", ["q_shape", "i2"], ["seq"], axis=0),
        n("Unsqueeze", ["heads", "ax_zero"], ["heads_1"]),
        n("Concat", ["one_i", "heads_1"], ["row_shape"], axis=0),
        n("ConstantOfShape", ["row_shape"], ["zeros_row"]),                      # [1, H] float32 0
        n("Reshape", ["one_11", "two_ones"], ["a11"]),
        n("Gemm", ["a11", "zeros_row", "decay"], ["lam_or_0"]),
        n("Greater", ["lam_or_0", "zero"], ["has_lam"]),
        n("Where", ["has_lam", "lam_or_0", "one"], ["lam"]),                      # [1, H]
        n("Log", ["lam"], ["log_lam_row"]),
        _const("hw_shape", [-1, 1, 1], TensorProto.INT64),
        n("Reshape", ["log_lam_row", "hw_shape"], ["log_lam"]),                 # [H, 1, 1]
        n("Range", ["i0", "seq", "i1"], ["pos_i"]),
        n("Cast", ["pos_i"], ["pos"], to=TensorProto.FLOAT),                    # [N]
        n("Unsqueeze", ["pos", "ax_m1"], ["pos_col"]),                           # [N, 1]
    ]


def _state_columns() -> list[onnx.NodeProto]:
    """``state_aug`` [B, H, D, Dv + 1] float32: ``[S0 | z0]``, z0 = 0 when ``normalize=0``."""
    n = helper.make_node
    return [
        _const("pad_last", [0, 0, 0, 0, 0, 0, 0, 1], TensorProto.INT64),
        n("Pad", ["state", "pad_last"], ["state_pad"]),                          # one zero column
        n("Add", ["dv", "one_i"], ["dv_1"]),
        n("Slice", ["state_pad", "ax_zero", "dv_1", "ax_3"], ["state_aug"]),
    ]


def _state_out(has_state: bool) -> list[onnx.NodeProto]:
    """``state_out`` = [S_N | z_N] in float32: one GEMM of λ^{N−1−s}-weighted keys by [V | 1]."""
    n = helper.make_node
    nodes = [
        n("Cast", ["seq"], ["n_f"], to=TensorProto.FLOAT),
        n("Sub", ["n_f", "one"], ["last_f"]),
        n("Sub", ["last_f", "pos_col"], ["age"]),                                # [N, 1]: N-1-s
        n("Mul", ["log_lam", "age"], ["log_w"]),
        n("Exp", ["log_w"], ["w"]),                                              # [H, N, 1]
        n("Cast", ["kf"], ["k32"], to=TensorProto.FLOAT),
        n("Mul", ["k32", "w"], ["kw"]),
        n("Transpose", ["kw"], ["kw_t"], perm=[0, 1, 3, 2]),
        n("Cast", ["V"], ["v32"], to=TensorProto.FLOAT),
        _const("pad_last_out", [0, 0, 0, 0, 0, 0, 0, 1], TensorProto.INT64),
        n("Pad", ["v32", "pad_last_out", "one"], ["v_ones"]),                    # [V | 1]
        n("MatMul", ["kw_t", "v_ones"], ["s_new"]),                              # [B, H, D, Dv + 1]
    ]
    if has_state:
        nodes += [
            n("Mul", ["log_lam", "n_f"], ["log_lam_n"]),
            n("Exp", ["log_lam_n"], ["lam_n"]),                                  # [H, 1, 1]
            n("Mul", ["state_aug", "lam_n"], ["s_carried"]),
            n("Add", ["s_new", "s_carried"], ["s_all"]),
        ]
    else:
        nodes += [n("Identity", ["s_new"], ["s_all"])]
    nodes += [
        n("Unsqueeze", ["normalize_i", "ax_zero"], ["norm_1"]),
        n("Add", ["dv", "norm_1"], ["width"]),                                   # Dv + normalize
        n("Slice", ["s_all", "ax_zero", "width", "ax_3"], ["state_out"]),
    ]
    return nodes


def _noncausal_nodes() -> list[onnx.NodeProto]:
    """``num`` = q (kᵀ V), ``den`` = q Σ_s k_s."""
    n = helper.make_node
    return [
        n("Transpose", ["kf"], ["kf_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["kf_t", "V"], ["kv"]),                       # [B, H, D, Dv]
        n("MatMul", ["qf", "kv"], ["num"]),
        n("ReduceSum", ["kf", "ax_m2"], ["ksum"], keepdims=1),      # [B, H, 1, D]
        n("Transpose", ["ksum"], ["ksum_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["qf", "ksum_t"], ["den"]),                    # [B, H, N, 1]
    ]


def _causal_nodes(has_state: bool) -> list[onnx.NodeProto]:
    """Σ_{s≤t} λ^{t−s} (q_t·k_s) [v_s | 1] in chunks (:func:`attnc.plugins.chunked.causal_product`),
    in float32 whatever Q's dtype; with ``state``, plus the carried ``(q_t·λ^{t+1}) [S0 | z0]``."""
    n = helper.make_node
    nodes = [
        n("Cast", ["qf"], ["cq32"], to=TensorProto.FLOAT),
        n("Cast", ["kf"], ["ck32"], to=TensorProto.FLOAT),
        n("Cast", ["V"], ["cv32"], to=TensorProto.FLOAT),
        _const("c_pad_last", [0, 0, 0, 0, 0, 0, 0, 1], TensorProto.INT64),
        n("Pad", ["cv32", "c_pad_last", "one"], ["cv_ones"]),                   # [V | 1]
        *causal_product("cq32", "ck32", "cv_ones", "log_lam", "prod32"),        # [B, H, N, Dv + 1]
    ]
    if has_state:
        nodes += [
            # the carried state, seen by token t through λ^{t+1}
            n("Add", ["pos_col", "one"], ["pos_1"]),
            n("Mul", ["log_lam", "pos_1"], ["log_q_decay"]),
            n("Exp", ["log_q_decay"], ["q_decay"]),                              # [H, N, 1]
            n("Mul", ["cq32", "q_decay"], ["q_carry"]),
            n("MatMul", ["q_carry", "state_aug"], ["carry32"]),                 # [B, H, N, Dv + 1]
            n("Add", ["prod32", "carry32"], ["total32"]),
        ]
    else:
        nodes += [n("Identity", ["prod32"], ["total32"])]
    nodes += [
        n("CastLike", ["total32", "Q"], ["total"]),
        n("Slice", ["total", "ax_zero", "dv", "ax_m1"], ["num"]),
        n("Add", ["dv", "one_i"], ["c_dv_1"]),
        n("Slice", ["total", "dv", "c_dv_1", "ax_m1"], ["den"]),
    ]
    return nodes
