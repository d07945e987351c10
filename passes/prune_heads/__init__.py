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

A generation step with its KV cache (``attnc export CKPT --with-past``) appends each layer's new keys and values
to cache inputs, ``Concat(past_key_values.N.key, k)`` along the tokens, and returns that as ``present.N.key``. The
walk from K / V passes such a ``Concat`` of one graph input (through ``Identity`` or one-input ``Concat``s:
TorchScript's copy of transformers' ``DynamicCache``) and records the graph inputs and outputs holding the layer's
heads (:attr:`AttentionLayer.interface`); pruning declares the kept head count on them (the K/V heads a ``"group"``
prune keeps; a ``"query"`` prune leaves them), so the pruned step takes and returns a cache of the kept heads, and
its report names them per layer (``LayerPrune.cache``: which heads of the unpruned cache it keeps). A rotary table
computed from the step's mask (positions from the mask) has one entry on the heads axis and reads no weight matrix:
it is passed as a table. Scoring a step's heads needs real caches: :func:`apply` refuses random calibration there;
:func:`apply_keep` prunes the heads a plain export's pruning kept (:class:`KeepPlan`, layers matched by
:func:`layer_fingerprint`, a hash of the output projection's weights).

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

Modules, each on those before it: ``model`` (the layer model), ``shapes`` (reading shapes and shape tensors),
``projection`` (the constant projection behind a tensor, RMSNorms across the heads), ``trace`` (Q/K/V back to their
head split and projection), ``output`` (the core output forward to the output projection, agent attention's channel
paths), ``layers`` (finding the layers), ``rewrite`` (selecting heads, slicing them out), ``scores`` (scoring heads)
and ``pipeline`` (iterative selection, :func:`apply`, keep plans and :func:`apply_keep`).

Tests: ``tests/passes/test_prune_heads.py``; numbers: ``benchmarks/bench_shrink.py``; docs: ``docs/shrink.md``.
"""

from __future__ import annotations

from attnc.passes.prune_heads.layers import (attention_cores, find_attention_layers, survey_attention_layers,
                                             value_projection)
from attnc.passes.prune_heads.model import AttentionLayer
from attnc.passes.prune_heads.pipeline import (CALIBRATION_BATCH, CALIBRATION_TOKENS, KeepPlan, apply, apply_keep,
                                               kept_cache_heads, kept_cache_runs, load_keep_plan,
                                               select_heads_iteratively)
from attnc.passes.prune_heads.rewrite import (GRANULARITIES, LayerPrune, PruneReport, layer_fingerprint,
                                              matrix_fingerprint, prune_heads, select_heads)
from attnc.passes.prune_heads.scores import METHODS, gates_from_keep, head_gates, score_heads, torch_attention_modules

__all__ = ["CALIBRATION_BATCH", "CALIBRATION_TOKENS", "GRANULARITIES", "METHODS", "AttentionLayer", "KeepPlan",
           "LayerPrune", "PruneReport", "apply", "apply_keep", "attention_cores", "find_attention_layers",
           "gates_from_keep", "head_gates", "kept_cache_heads", "kept_cache_runs", "layer_fingerprint",
           "load_keep_plan", "matrix_fingerprint", "prune_heads", "score_heads", "select_heads",
           "select_heads_iteratively", "survey_attention_layers", "torch_attention_modules", "value_projection"]
