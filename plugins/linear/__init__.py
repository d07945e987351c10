"""``attnc::KernelLinearAttention``: kernelized linear attention and lightning attention.

Not named ``LinearAttention``: ONNX opset 27 has a standard ``LinearAttention`` op and
TensorRT's ONNX parser routes nodes to its built-in importers by op_type whatever the
domain, so a node of that name would never reach the attnc plugin.

Contract
--------
Inputs:
    Q      ``[B, H, N, D]``  queries, *before* the feature map.
    K      ``[B, H, N, D]``  keys, before the feature map (same N as Q).
    V      ``[B, H, N, Dv]`` values (Dv may differ from D).
    decay  ``[H]`` optional, float32 (also in fp16 models), per-head decay λ_h in (0, 1];
           only meaningful with ``causal=1`` (ignored otherwise).
Output:
    O      ``[B, H, N, Dv]``.
Attributes:
    feature_map  ``"elu1"`` (elu(x)+1), ``"relu"`` or ``"identity"``; default ``"elu1"``.
    causal       int, default 0.
    normalize    int, default 1: divide by the kernel normaliser (+ ``eps``).
    eps          float, default 1e-6.
    scale        float, default 1.0: multiplies φ(Q) (so φ(Q)·scale replaces φ(Q) below).

Semantics (q = scale·φ(Q), k = φ(K), per batch and head):
    non-causal:  O = q (kᵀ V)                    [/ (q · Σ_s k_s + eps)]
    causal:      O_t = Σ_{s≤t} λ^{t−s} (q_t·k_s) v_s  [/ (Σ_{s≤t} λ^{t−s} q_t·k_s + eps)]
with λ = 1 when ``decay`` is absent. Causal + decay + identity + normalize=0 is
lightning attention (TransNormerLLM), which ONNX opset 27 ``LinearAttention``
(``update_rule="gated"``, decay ``log λ``, ``scale=1``) also computes.

ONNX function body: non-causal uses the associative form q(kᵀV) (O(N·D·Dv)); causal
uses the masked quadratic form (qkᵀ ⊙ M)V with M[t, s] = λ^{t−s}·[s ≤ t]. Measured on
ORT 1.32 CPU, 1 thread, B=1, H=4, N=2048, D=Dv=64: quadratic 0.18 s, prefix sums over
the outer products (Unsqueeze·Mul·CumSum·MatMul) 0.37 s. The prefix-sum form
materialises ``[B, H, N, D, Dv]`` (134 MB here, vs 67 MB of scores) and runs N tiny
``[1, D]×[D, Dv]`` GEMMs per head, while the quadratic form is two large GEMMs.
The feature map is picked with ``LabelEncoder`` (ai.onnx.ml) on the string attribute,
since ``Equal`` on strings needs opset 19 and attnc targets opset 17 and up; an absent
``decay`` is detected through ``Gemm``'s optional C input (λ > 0 by contract, so a 0
means "absent") to stay within opset 17 (``OptionalHasElement`` on tensors is 18+).
"""

from __future__ import annotations

import onnx
import torch
from onnx import TensorProto, helper

from attnc import DOMAIN

OP_TYPE = "KernelLinearAttention"
FEATURE_MAPS = ("elu1", "relu", "identity")
ATTRIBUTES = {"feature_map": "elu1", "causal": 0, "normalize": 1, "eps": 1e-6, "scale": 1.0}
OPSET = 17


def output_shape(input_shapes, **attrs):
    """``[B, H, N, Dv]`` from the shapes of Q, K, V (and decay)."""
    q, _, v = input_shapes[:3]
    return [q[0], q[1], q[2], v[3]]


def feature(x: torch.Tensor, feature_map: str) -> torch.Tensor:
    """φ(x) for one of :data:`FEATURE_MAPS`."""
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1.0
    if feature_map == "relu":
        return torch.relu(x)
    if feature_map == "identity":
        return x
    raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None = None, *,
              feature_map: str = "elu1", causal: int = 0, normalize: int = 1, eps: float = 1e-6,
              scale: float = 1.0) -> torch.Tensor:
    """The op's semantics in plain torch (any float dtype, float64 included).

    Written as the recurrence over t (causal) / the associative product (non-causal),
    deliberately *not* the way the ONNX function body computes it.
    """
    q = feature(q, feature_map) * scale
    k = feature(k, feature_map)
    if not causal:
        out = q @ (k.transpose(-2, -1) @ v)
        den = q @ k.sum(dim=-2, keepdim=True).transpose(-2, -1)
        return out / (den + eps) if normalize else out
    b, h, n, d = q.shape
    lam = (torch.ones(h, dtype=q.dtype, device=q.device) if decay is None
           else decay.to(q.dtype)).view(1, h, 1, 1)
    state = q.new_zeros(b, h, d, v.shape[-1])
    zsum = q.new_zeros(b, h, d, 1)
    outs = []
    for t in range(n):
        kt, vt, qt = k[:, :, t:t + 1], v[:, :, t:t + 1], q[:, :, t:t + 1]
        state = lam * state + kt.transpose(-2, -1) @ vt
        zsum = lam * zsum + kt.transpose(-2, -1)
        o = qt @ state
        if normalize:
            o = o / (qt @ zsum + eps)
        outs.append(o)
    return torch.cat(outs, dim=2)


def add_to_model(model: onnx.ModelProto, node: onnx.NodeProto | None = None) -> None:
    """Attach the (single, attribute-driven) function body to ``model``."""
    from attnc.passes.core import add_function, default_opset

    add_function(model, function_proto(max(default_opset(model), OPSET)))


def make_node(inputs, outputs, name, **attrs) -> onnx.NodeProto:
    """A ``KernelLinearAttention`` node; ``inputs`` = [Q, K, V] or [Q, K, V, decay]."""
    unknown = set(attrs) - set(ATTRIBUTES)
    if unknown:
        raise ValueError(f"unknown attributes {sorted(unknown)}; known: {sorted(ATTRIBUTES)}")
    if attrs.get("feature_map", "elu1") not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}")
    full = {**ATTRIBUTES, **attrs}
    full["causal"], full["normalize"] = int(full["causal"]), int(full["normalize"])
    full["eps"], full["scale"] = float(full["eps"]), float(full["scale"])
    return helper.make_node(OP_TYPE, list(inputs), list(outputs), name=name, domain=DOMAIN, **full)


def _ref(attr_name: str, ref: str, attr_type) -> onnx.AttributeProto:
    return helper.make_attribute_ref(attr_name, attr_type, ref_attr_name=ref)


def _const(name, value, dtype=TensorProto.FLOAT):
    vals = value if isinstance(value, (list, tuple)) else [value]
    dims = [len(vals)] if isinstance(value, (list, tuple)) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, vals))


def function_proto(opset: int = OPSET) -> onnx.FunctionProto:
    """The op's body in standard ONNX, plus ai.onnx.ml for LabelEncoder.

    Args:
        opset: default-domain opset the body declares; pass the model's own (17 or
            higher: the ops used have the same semantics from 17 to 23+), since the
            ONNX checker rejects a function whose opset differs from the model's
            where an op's schema changed in between (e.g. ``Constant`` at 21).
    """
    if opset < OPSET:
        raise ValueError(f"KernelLinearAttention's body needs opset >= {OPSET}, got {opset}")
    A = onnx.AttributeProto
    n = helper.make_node
    nodes = [
        # attributes as tensors
        _attr_const("fm_name", "value_string", "feature_map", A.STRING),
        n("LabelEncoder", ["fm_name"], ["fm_id"], domain="ai.onnx.ml",
          keys_strings=list(FEATURE_MAPS), values_int64s=[0, 1, 2], default_int64=-1),
        _attr_const("causal_i", "value_int", "causal", A.INT),
        _attr_const("normalize_i", "value_int", "normalize", A.INT),
        _attr_const("eps_f", "value_float", "eps", A.FLOAT),
        _attr_const("scale_f", "value_float", "scale", A.FLOAT),
        _const("one", 1.0), _const("zero", 0.0),
        _const("i0", 0, TensorProto.INT64), _const("i1", 1, TensorProto.INT64),
        _const("i2", 2, TensorProto.INT64),
        _const("ax_m1", [-1], TensorProto.INT64), _const("ax_m2", [-2], TensorProto.INT64),
        # dtype-following constants (fp16 models): CastLike to Q
        n("CastLike", ["one", "Q"], ["one_t"]), n("CastLike", ["zero", "Q"], ["zero_t"]),
        n("CastLike", ["eps_f", "Q"], ["eps_t"]), n("CastLike", ["scale_f", "Q"], ["scale_t"]),
        # feature maps: Where over the three candidates (elementwise, cheap next to the GEMMs)
        n("Equal", ["fm_id", "i0"], ["is_elu"]), n("Equal", ["fm_id", "i1"], ["is_relu"]),
        n("Elu", ["Q"], ["q_elu0"], alpha=1.0), n("Add", ["q_elu0", "one_t"], ["q_elu"]),
        n("Relu", ["Q"], ["q_relu"]),
        n("Where", ["is_relu", "q_relu", "Q"], ["q_nr"]), n("Where", ["is_elu", "q_elu", "q_nr"], ["q_phi"]),
        n("Elu", ["K"], ["k_elu0"], alpha=1.0), n("Add", ["k_elu0", "one_t"], ["k_elu"]),
        n("Relu", ["K"], ["k_relu"]),
        n("Where", ["is_relu", "k_relu", "K"], ["k_nr"]), n("Where", ["is_elu", "k_elu", "k_nr"], ["kf"]),
        n("Mul", ["q_phi", "scale_t"], ["qf"]),
        n("Cast", ["causal_i"], ["is_causal"], to=TensorProto.BOOL),
        n("If", ["is_causal"], ["num", "den"], then_branch=_causal_branch(), else_branch=_noncausal_branch()),
        n("Add", ["den", "eps_t"], ["den_eps"]), n("Div", ["num", "den_eps"], ["normed"]),
        n("Cast", ["normalize_i"], ["is_norm"], to=TensorProto.BOOL),
        n("Where", ["is_norm", "normed", "num"], ["O"]),
    ]
    defaults = [helper.make_attribute(k, v) for k, v in ATTRIBUTES.items()]
    return helper.make_function(
        DOMAIN, OP_TYPE, ["Q", "K", "V", "decay"], ["O"], nodes,
        [helper.make_opsetid("", opset), helper.make_opsetid("ai.onnx.ml", 2)],
        attribute_protos=defaults, doc_string="attnc KernelLinearAttention; see attnc.plugins.linear")


def _attr_const(out: str, const_attr: str, ref: str, attr_type) -> onnx.NodeProto:
    node = helper.make_node("Constant", [], [out])
    node.attribute.append(_ref(const_attr, ref, attr_type))
    return node


def _graph(name, nodes, outputs):
    return helper.make_graph(nodes, name, [], [helper.make_value_info(o, onnx.TypeProto()) for o in outputs])


def _noncausal_branch() -> onnx.GraphProto:
    n = helper.make_node
    return _graph("noncausal", [
        n("Transpose", ["kf"], ["kf_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["kf_t", "V"], ["kv"]),                       # [B, H, D, Dv]
        n("MatMul", ["qf", "kv"], ["nc_num"]),
        n("ReduceSum", ["kf", "ax_m2"], ["ksum"], keepdims=1),      # [B, H, 1, D]
        n("Transpose", ["ksum"], ["ksum_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["qf", "ksum_t"], ["nc_den"]),                 # [B, H, N, 1]
    ], ["nc_num", "nc_den"])


def _causal_branch() -> onnx.GraphProto:
    n = helper.make_node
    return _graph("causal", [
        # decay: Gemm's optional C gives λ (> 0) when the input is present, 0 when absent
        _const("ax_zero", [0], TensorProto.INT64), _const("one_i", [1], TensorProto.INT64),
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
        # distance t - s, mask M[t, s] = λ^{t-s} for s <= t, else 0
        n("Range", ["i0", "seq", "i1"], ["pos_i"]),
        n("Cast", ["pos_i"], ["pos"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["pos", "ax_m1"], ["pos_col"]), n("Unsqueeze", ["pos", "ax_zero"], ["pos_row"]),
        n("Sub", ["pos_col", "pos_row"], ["dist"]),                              # [N, N]
        n("GreaterOrEqual", ["dist", "zero"], ["visible"]),
        n("Mul", ["log_lam", "dist"], ["log_m"]),
        n("Exp", ["log_m"], ["m_raw"]),
        n("Where", ["visible", "m_raw", "zero"], ["m32"]),                       # [H, N, N]
        n("CastLike", ["m32", "Q"], ["m"]),
        n("Transpose", ["kf"], ["kf_t"], perm=[0, 1, 3, 2]),
        n("MatMul", ["qf", "kf_t"], ["scores"]),
        n("Mul", ["scores", "m"], ["p"]),
        n("MatMul", ["p", "V"], ["c_num"]),
        n("ReduceSum", ["p", "ax_m1"], ["c_den"], keepdims=1),
    ], ["c_num", "c_den"])
