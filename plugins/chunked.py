"""The causal linear product in chunks, as ONNX nodes for the fused ops' function bodies.

``causal_product`` emits nodes computing, per batch and head, ::

    out_t = Σ_{s ≤ t} λ^{t−s} (q_t · k_s) w_s        q, k [B, H, N, D], w [B, H, N, E], λ per head

which is what causal linear / lightning attention (``KernelLinearAttention``, ``w = [V | 1]``
so the normaliser comes out as the last column) and causal flow attention (``FlowAttention``)
spend their time on. ONNX Runtime runs these bodies where no GPU is (the embedded default
backend), so the form matters:

- the masked quadratic form ``(q kᵀ ⊙ M) w`` costs O(N²·(D + E)) and builds an ``[H, N, N]``
  mask every run (67 MB of scores at N = 2048, 17 GB at N = 32k);
- the chunked form (Lightning Attention-2's) cuts the sequence into chunks of ``C`` tokens:
  inside a chunk the masked quadratic form (O(N·C·(D + E))); across chunks each chunk's
  ``(k ⊙ λ^{C−1−j})ᵀ w`` state ``[D, E]``, summed over earlier chunks with one matmul by the
  ``[n_chunks, n_chunks]`` decay matrix ``λ^{C·(c−1−j)}`` (O((N/C)²·D·E)), then read by
  ``q ⊙ λ^{i+1}`` (O(N·D·E)).

``C = clamp(⌈(N·D)^{1/3}⌉, 64, N)`` balances the first two terms (64 up to N = 4096 at
D = 64, 128 at N = 32k); the sequence is padded with zero rows to a multiple of ``C`` at
its end, which no earlier query sees. Every exponent is ≥ 0, so a strong decay underflows
to 0 instead of overflowing. Up to ``SHORT`` = 192 tokens (prompts, one-token decode steps)
an ``If`` takes the masked quadratic form instead, which has fewer ops; :func:`chunks_only`
removes that switch (TensorRT). Measured: ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

MIN_CHUNK = 64
# Up to this many tokens one masked quadratic product is faster than chunks (ORT CPU, D = 64,
# benchmarks/bench_bodies.py: chunks 0.7-0.8x at 129 tokens, 0.9-1.0x at 197, 1.1-2.2x at 256).
SHORT = 192
SWITCH = "length_switch"  # the name (after the prefix) of the If choosing the short or the chunked form


def constant(name: str, value, dtype=TensorProto.FLOAT) -> onnx.NodeProto:
    """A ``Constant`` node ``name``: a scalar, or a 1-D tensor for a list or tuple ``value``."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    dims = [len(values)] if isinstance(value, (list, tuple)) else []
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, dims, values))


def causal_product(q: str, k: str, w: str, log_decay: str | None, out: str, prefix: str = "cp_"
                   ) -> list[onnx.NodeProto]:
    """Nodes computing ``out`` = the chunked causal product of ``q``, ``k``, ``w`` (see the module).

    Args:
        q, k: ``[B, H, N, D]`` float32 tensors (the feature-mapped, scaled queries and keys).
        w: ``[B, H, N, E]`` float32.
        log_decay: ``[H, 1, 1]`` float32 ``log λ`` (0 for no decay), or None for λ = 1.
        out: the output's name, ``[B, H, N, E]`` float32.
        prefix: prepended to every intermediate name (unique within the function body).
    """
    def p(name: str) -> str:
        return prefix + name

    outer = {"$q": q, "$k": k, "$w": w, "$log_decay": log_decay}

    def n(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
        """A node whose input names are intermediates (prefixed) or ``$q``-style outer names."""
        return helper.make_node(op, [outer[x] if x in outer else p(x) for x in inputs], [p(output)], **attrs)

    def const(name: str, values, dtype=TensorProto.INT64) -> onnx.NodeProto:
        return constant(p(name), values, dtype)

    nodes = [
        const("i0", 0), const("i1", 1), const("ax0", [0]), const("ax2", [2]), const("min_c", MIN_CHUNK),
        const("f0", 0.0, TensorProto.FLOAT), const("f1", 1.0, TensorProto.FLOAT), const("rest", [-1]),
        n("Shape", ["$q"], "q_shape"),
        n("Gather", ["q_shape", "ax2"], "n_1", axis=0),                        # [1]
        n("Squeeze", ["n_1", "ax0"], "n"),
        const("short", SHORT), n("Greater", ["n", "short"], "long"),
    ]
    if log_decay is not None:
        # log λ [H, 1, 1] -> [H, 1, 1, 1], broadcast over (B,) H, chunks, rows, columns
        nodes.append(n("Unsqueeze", ["$log_decay", "rest"], "log_lam"))
    chunked = [
        const("third", 1.0 / 3.0, TensorProto.FLOAT),
        # the chunk size C = clamp(ceil((N*D)^(1/3)), 64, N)
        n("Shape", ["$q"], "d_1", start=3, end=4),
        n("Mul", ["n_1", "d_1"], "nd_1"),
        n("Cast", ["nd_1"], "nd_f", to=TensorProto.FLOAT),
        n("Pow", ["nd_f", "third"], "root_f"),
        n("Ceil", ["root_f"], "root_c"),
        n("Cast", ["root_c"], "root_1", to=TensorProto.INT64),
        n("Squeeze", ["root_1", "ax0"], "root"),
        n("Max", ["root", "min_c"], "c_big"),
        n("Min", ["c_big", "n"], "c_n"),
        n("Max", ["c_n", "i1"], "c"),
        # chunks: n_chunks = ceil(N / C), padded length P = n_chunks * C
        n("Add", ["n", "c"], "n_c"), n("Sub", ["n_c", "i1"], "n_c1"),
        n("Div", ["n_c1", "c"], "chunks"),
        n("Mul", ["chunks", "c"], "padded"),
        n("Sub", ["padded", "n"], "pad"),
        n("Unsqueeze", ["pad", "ax0"], "pad_1"),
        const("pads_head", [0, 0, 0, 0, 0, 0]), const("pads_tail", [0]),
        n("Concat", ["pads_head", "pad_1", "pads_tail"], "pads", axis=0),      # [0,0,0,0, 0,0,pad,0]
        n("Unsqueeze", ["chunks", "ax0"], "chunks_1"), n("Unsqueeze", ["c", "ax0"], "c_1"),
        const("keep2", [0, 0]),
        n("Concat", ["keep2", "chunks_1", "c_1", "rest"], "chunk_shape", axis=0),  # [0, 0, nC, C, -1]
    ]
    for name in ("q", "k", "w"):
        chunked += [n("Pad", [f"${name}", "pads"], f"{name}_pad"),
                  n("Reshape", [f"{name}_pad", "chunk_shape"], f"{name}_c")]          # [B, H, nC, C, *]
    # positions i in a chunk, chunk indices c, as float32 columns/rows
    chunked += [
        n("Range", ["i0", "c", "i1"], "pos_i"), n("Cast", ["pos_i"], "pos", to=TensorProto.FLOAT),
        n("Unsqueeze", ["pos", "rest"], "pos_col"), n("Unsqueeze", ["pos", "ax0"], "pos_row"),
        n("Sub", ["pos_col", "pos_row"], "dist"),                                 # [C, C]: i - j
        n("GreaterOrEqual", ["dist", "f0"], "visible"),
        n("Range", ["i0", "chunks", "i1"], "chunk_i"), n("Cast", ["chunk_i"], "chunk_f", to=TensorProto.FLOAT),
        n("Unsqueeze", ["chunk_f", "rest"], "chunk_col"), n("Unsqueeze", ["chunk_f", "ax0"], "chunk_row"),
        n("Sub", ["chunk_col", "chunk_row"], "chunk_dist"),                       # [nC, nC]: c - j
        n("Sub", ["chunk_dist", "f1"], "chunk_age"),                              # c - 1 - j
        n("GreaterOrEqual", ["chunk_age", "f0"], "chunk_before"),                 # j < c
        n("Cast", ["c"], "c_f", to=TensorProto.FLOAT),
        n("Sub", ["c_f", "f1"], "c_last"),
        n("Sub", ["c_last", "pos"], "k_age"),                                     # C - 1 - j
        n("Add", ["pos", "f1"], "q_age"),                                         # i + 1
    ]
    if log_decay is None:
        chunked += [
            n("Cast", ["visible"], "mask", to=TensorProto.FLOAT),                 # [C, C]
            n("Cast", ["chunk_before"], "chunk_decay", to=TensorProto.FLOAT),     # [nC, nC]
            n("Identity", ["k_c"], "k_w"), n("Identity", ["q_c"], "q_w"),
        ]
    else:
        chunked += [
            n("Mul", ["log_lam", "dist"], "log_m"), n("Exp", ["log_m"], "m_raw"),
            n("Where", ["visible", "m_raw", "f0"], "mask"),                       # [H, 1, C, C]
            n("Mul", ["c_f", "chunk_age"], "chunk_steps"),
            n("Mul", ["$log_decay", "chunk_steps"], "log_cd"), n("Exp", ["log_cd"], "cd_raw"),
            n("Where", ["chunk_before", "cd_raw", "f0"], "chunk_decay"),          # [H, nC, nC]
            n("Unsqueeze", ["k_age", "rest"], "k_age_col"),
            n("Mul", ["log_lam", "k_age_col"], "log_kw"), n("Exp", ["log_kw"], "kw"),  # [H, 1, C, 1]
            n("Mul", ["k_c", "kw"], "k_w"),
            n("Unsqueeze", ["q_age", "rest"], "q_age_col"),
            n("Mul", ["log_lam", "q_age_col"], "log_qw"), n("Exp", ["log_qw"], "qw"),
            n("Mul", ["q_c", "qw"], "q_w"),
        ]
    chunked += [
        # inside each chunk: the masked quadratic form
        n("Transpose", ["k_c"], "k_ct", perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q_c", "k_ct"], "scores"),                                   # [B, H, nC, C, C]
        n("Mul", ["scores", "mask"], "scores_m"),
        n("MatMul", ["scores_m", "w_c"], "intra"),                                # [B, H, nC, C, E]
        # across chunks: each chunk's state, the decayed sum over earlier chunks, read by q
        n("Transpose", ["k_w"], "k_wt", perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["k_wt", "w_c"], "kv"),                                       # [B, H, nC, D, E]
        n("Shape", ["kv"], "kv_shape"),
        const("flat_shape", [0, 0, 0, -1]),
        n("Reshape", ["kv", "flat_shape"], "kv_flat"),                            # [B, H, nC, D*E]
        n("MatMul", ["chunk_decay", "kv_flat"], "before_flat"),
        n("Reshape", ["before_flat", "kv_shape"], "before"),                      # state before chunk c
        n("MatMul", ["q_w", "before"], "inter"),                                  # [B, H, nC, C, E]
        n("Add", ["intra", "inter"], "chunked"),
        const("seq_shape", [0, 0, -1]),
        n("Shape", ["$w"], "e_1", start=3, end=4),
        n("Concat", ["seq_shape", "e_1"], "out_shape", axis=0),
        n("Reshape", ["chunked", "out_shape"], "padded_out"),                     # [B, H, P, E]
        n("Slice", ["padded_out", "ax0", "n_1", "ax2"], "long_out"),
    ]
    # up to SHORT tokens (prompts, decode steps): the masked quadratic form, fewer ops
    short = [
        n("Range", ["i0", "n", "i1"], "s_pos_i"), n("Cast", ["s_pos_i"], "s_pos", to=TensorProto.FLOAT),
        n("Unsqueeze", ["s_pos", "rest"], "s_pos_col"), n("Unsqueeze", ["s_pos", "ax0"], "s_pos_row"),
        n("Sub", ["s_pos_col", "s_pos_row"], "s_dist"),                           # [N, N]: t - s
        n("GreaterOrEqual", ["s_dist", "f0"], "s_visible"),
    ]
    if log_decay is None:
        short += [n("Cast", ["s_visible"], "s_mask", to=TensorProto.FLOAT)]
    else:
        short += [n("Mul", ["$log_decay", "s_dist"], "s_log_m"), n("Exp", ["s_log_m"], "s_m_raw"),
                  n("Where", ["s_visible", "s_m_raw", "f0"], "s_mask")]               # [H, N, N]
    short += [
        n("Transpose", ["$k"], "s_kt", perm=[0, 1, 3, 2]),
        n("MatMul", ["$q", "s_kt"], "s_scores"),
        n("Mul", ["s_scores", "s_mask"], "s_scores_m"),
        n("MatMul", ["s_scores_m", "$w"], "short_out"),
    ]
    def branch(name: str, body: list[onnx.NodeProto], result: str) -> onnx.GraphProto:
        return helper.make_graph(body, p(name), [], [helper.make_value_info(p(result), onnx.TypeProto())])

    nodes.append(helper.make_node("If", [p("long")], [out], name=p(SWITCH),
                                  then_branch=branch("chunked", chunked, "long_out"),
                                  else_branch=branch("short", short, "short_out")))
    return nodes


def chunks_only(function: onnx.FunctionProto) -> onnx.FunctionProto:
    """A copy of ``function`` whose :func:`causal_product` s always run in chunks: their
    length switch (an ``If``) replaced by its chunked branch.

    For TensorRT's inlined bodies: TensorRT-RTX 1.7's builder crashes (segfault, CPU-only
    build) on the switch's ``IIfConditionalLayer``, while either branch alone builds; and on a
    GPU the chunks also keep long sequences from materialising ``[H, N, N]`` masks.
    """
    out = onnx.FunctionProto()
    out.CopyFrom(function)
    nodes = []
    for node in function.node:
        if node.op_type != "If" or not node.name.endswith(SWITCH):
            nodes.append(node)
            continue
        chunked = next(a.g for a in node.attribute if a.name == "then_branch")
        nodes += list(chunked.node)
        nodes.append(helper.make_node("Identity", [chunked.output[0].name], [node.output[0]]))
    del out.node[:]
    out.node.extend(nodes)
    return out
