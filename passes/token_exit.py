"""Visual-token exit (DyVTE): drop every visual token of a vision-language model after a decoder layer.

A LLaVA-style decoder runs ``[text before the image; visual; text]`` tokens (``K``, ``P`` and ``T`` of them; ``K``
is 0 where the image comes first) through its layers. Once the text tokens have read what they need from the
image, the visual tokens only cost time; DyVTE removes them after some layer ``k``.

Static mode (one ``k`` for every input):

- :func:`choose_exit_layer` tries each ``k`` on calibration data (ONNX Runtime) and returns
  the earliest one whose accuracy (with labels) or agreement with the full model's
  predictions (without) stays within a bound, plus the whole table;
- :func:`apply_static_token_exit` rewrites an exported graph: the hidden state entering
  decoder layer ``k`` is cut to its text tokens (``Slice(x, P, ∞, axis=1)``, or the ``Concat`` of
  ``x[:, :K]`` and ``x[:, K + P:]``; several images' tokens, :class:`attnc.compiler.layout.VisualLayout`, the
  ``Concat`` of the text's slices between them), so every later layer runs on ``K + T`` instead of ``K + P + T``
  tokens (masks, rotary tables and shape vectors read after the boundary are cut alike); a
  ``Slice(·, K + P, ∞, axis=1)`` the model itself applies after the decoder (``TinyVLM`` and
  vision-language checkpoints keep the text after the image) becomes an ``Identity``, or a slice
  from ``K``. Layer boundaries are found from the graph, not from names:
  the decoder layers are the attention layers (:func:`attnc.passes.prune_heads.find_attention_layers`)
  whose input depends on the values of the integer text input, and a layer's boundary is the input of
  the ``LayerNormalization`` (or decomposed RMSNorm) in front of its value projection (pre-norm blocks);
- :func:`export_static_exit` is the torch route: export ``forward(..., exit_layer=k)``.

Dynamic mode (per input): a gate ``σ(w · mean(text tokens of x_k) + b) ≥ τ`` (:class:`ExitGate`,
trained by :func:`train_exit_gate` to predict "exiting here keeps the full model's answer")
decides at run time. :func:`apply_dynamic_token_exit` puts everything after boundary ``k``
into both branches of an ONNX ``If``: the *then* branch runs the rest on the text tokens
only, the *else* branch on all tokens. An ``If`` takes one condition, so a batch exits only
when the gate fires for every sample in it (batch 1 is the DyVTE setting). Padded prompts (an
``attention_mask`` over the text tokens) average each row's own tokens, so a prompt's gate reads
what it reads alone.

Tests: ``tests/passes/test_token_exit.py``; numbers: ``benchmarks/bench_shrink.py``; docs: ``docs/shrink.md``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import VisualLayout
from attnc.compiler.onnx_io import FIRST_EXIT_LAYER, metadata, on_stand_in_weights, ort_session
from attnc.passes.core import (constant_value, depends_on_data, dim_terms, evaluate_tensors, fold_static_shapes,
                               name_nodes, producers, remove_dead_nodes, sampled_dim, toposort, value_shapes,
                               value_shapes_and_types)

log = logging.getLogger(__name__)

_END = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------- boundaries

def decoder_boundaries(onnx_model: onnx.ModelProto) -> list[str]:
    """Hidden-state tensors entering each decoder layer, in order.

    Decoder layers are the attention layers whose input depends on an integer graph input
    (the text ids); the vision encoder's layers do not. A layer's boundary is the tensor in
    front of the pre-norm of its value projection (V, unlike Q/K, has no rotary embedding).

    Raises:
        AttncError: no attention layers, or none that reads the text input, or a layer
            without a ``LayerNormalization`` in front of its projection.
    """
    from attnc.passes.prune_heads import attention_cores, value_projection

    model = _copy(onnx_model) if not all(n.name for n in onnx_model.graph.node) else onnx_model
    prod = producers(model)
    int_inputs = {i.name for i in model.graph.input
                  if i.type.tensor_type.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    if not int_inputs:
        raise AttncError("visual-token exit needs a model with an integer text input",
                         "export the vision-language model with its text ids as an input")
    boundaries = []
    # by value, not by size: a dynamo export may take the vision tower's batch from the text's shape
    text_dependent = set(int_inputs) | {o for n in _downstream(model, *int_inputs, sizes=False) for o in n.output}
    cores = attention_cores(model)
    if not cores:
        raise AttncError("the model has no recognisable attention (no Softmax->MatMul core, Attention or "
                         "attnc node)", "visual-token exit applies to transformer decoders")
    for _, _, _, v, _ in cores:
        projection = value_projection(model, v)
        x = _norm_input(model, projection.input[0], prod) if projection is not None else None
        if x is not None and x in text_dependent:
            boundaries.append(x)
    if not boundaries:
        raise AttncError("no decoder layer found: no pre-norm attention layer reads the text input",
                         "visual-token exit supports LLaVA-style decoders with pre-norm blocks")
    return boundaries


_NORM_OPS = ("Mul", "Div", "Reciprocal", "Sqrt", "Pow", "ReduceMean", "Cast", "Sub", "Add")


def _norm_input(model, t, prod) -> str | None:
    """The residual-stream tensor in front of a pre-norm: ``LayerNormalization``'s input, or the
    input of a decomposed RMSNorm (``x · 1/sqrt(mean(x²) + ε) · w``, as Llama exports)."""
    node = prod.get(t)
    if node is not None and node.op_type in ("LayerNormalization", "SimplifiedLayerNormalization",
                                             "RMSNormalization"):
        return node.input[0]
    found: set[str] = set()
    stack, seen = [t], set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        node = prod.get(name)
        variable = [i for i in node.input if i and constant_value(model, i) is None] if node is not None else []
        # An Add/Sub of two computed tensors is the residual connection, not the norm's "+ ε".
        inside = node is not None and node.op_type in _NORM_OPS and not (
            node.op_type in ("Add", "Sub") and len(variable) > 1)
        if not inside:
            found.add(name)
        else:
            stack.extend(variable)
        if len(seen) > 32:
            return None
    return found.pop() if len(found) == 1 and t not in found else None


def _downstream(model, *names: str, sizes: bool = True) -> list[onnx.NodeProto]:
    """Nodes that depend on any of ``names``, in graph order; without ``sizes``, not through a ``Shape`` or
    ``Size`` (a dependence on the tensors' sizes alone)."""
    tainted = set(names)
    found = []
    for node in model.graph.node:
        if not sizes and node.op_type in ("Shape", "Size"):
            continue
        if any(i in tainted for i in node.input):
            found.append(node)
            tainted.update(node.output)
    return found


def _model_visual_drop(model, nodes: list[onnx.NodeProto], layout: VisualLayout) -> list[onnx.NodeProto]:
    """The model's own ``Slice(·, K + P, ∞, axis=1)`` among ``nodes`` (keeping the text after the last image at the
    end; ``K + P`` is ``layout.end``, ``K`` the text tokens in front of it)."""
    found = []
    for node in nodes:
        if node.op_type != "Slice" or len(node.input) < 4:
            continue
        starts, ends, axes = (constant_value(model, node.input[i]) for i in (1, 2, 3))
        if starts is None or ends is None or axes is None or starts.size != 1:
            continue
        if int(axes.reshape(-1)[0]) == 1 and int(starts.reshape(-1)[0]) == layout.end \
                and int(ends.reshape(-1)[0]) >= 2 ** 31 - 1:
            found.append(node)
    return found


# ----------------------------------------------------------------------------- static exit

@dataclass
class TokenExitReport:
    """What a token-exit rewrite did."""

    mode: str
    exit_layer: int
    decoder_layers: int
    num_visual_tokens: int
    boundary: str
    neutralised_slices: list[str] = field(default_factory=list)
    # dynamic mode: the gate ({"layer", "weight", "bias", "threshold"}), so validation can run it in PyTorch
    gate: dict | None = None
    # K, the text tokens in front of the image; a list of one K per image where a prompt has several
    visual_offset: int | list[int] = 0

    def to_dict(self) -> dict:
        return {"pass": "token_exit", **self.__dict__}


@on_stand_in_weights
def apply_static_token_exit(onnx_model: onnx.ModelProto, exit_layer: int, num_visual_tokens: int,
                            visual_offset: int | tuple[int, ...] = 0) -> tuple[onnx.ModelProto, TokenExitReport]:
    """Drop the ``num_visual_tokens`` visual tokens (after ``visual_offset`` text tokens; several images' after each
    one's offset, :class:`attnc.compiler.layout.VisualLayout`) before decoder layer ``exit_layer``.

    Args:
        onnx_model: exported VLM whose decoder runs on ``[visual; text]`` (not modified).
        exit_layer: in ``[0, decoder layers]``; equal to the number of layers returns the
            model unchanged.
        num_visual_tokens: ``P``, the visual tokens.
        visual_offset: ``K``, the text tokens in front of them (a chat template's ``USER:``); 0: the image first.
            Several images: one ``K`` per image (``(5, 9)``), ``P`` split evenly among them.

    Returns:
        ``(model, TokenExitReport)``.

    Raises:
        AttncError: bad ``exit_layer``/``num_visual_tokens``, or no decoder layers found.
    """
    if _takes_cache(onnx_model):
        return apply_step_token_exit(onnx_model, exit_layer, num_visual_tokens, visual_offset)
    model = _copy(onnx_model)
    boundaries = decoder_boundaries(model)
    depth = len(boundaries)
    cached = _gives_cache(model)
    if not isinstance(exit_layer, (int, np.integer)) or not int(cached) <= exit_layer <= depth:
        raise AttncError(f"exit_layer must be in [{int(cached)}, {depth}] (the decoder has {depth} layers), got "
                         f"{exit_layer}", _CACHED_FIX if cached and exit_layer == 0 else "")
    _check_first_layer(model, exit_layer)
    layout = VisualLayout.of(num_visual_tokens, visual_offset)
    report = TokenExitReport("static", int(exit_layer), depth, num_visual_tokens,
                             boundaries[exit_layer] if exit_layer < depth else "", visual_offset=_recorded(layout))
    if exit_layer == depth:
        return model, report
    x = boundaries[exit_layer]
    after = _downstream(model, x)
    prefix = f"token_exit/layer{exit_layer}"
    shapes, types = value_shapes_and_types(model)
    declared = _text_shape(shapes.get(x), types.get(x), num_visual_tokens)
    token = (shapes.get(x) or [None, None])[1]
    sliced = _slice_tokens(model, x, layout, prefix)
    _retarget_outer_tensors(model, x, after, layout, prefix, shapes)
    for node in after:
        for i, name in enumerate(node.input):
            if name == x:
                node.input[i] = sliced
    for node in _model_visual_drop(model, after, layout):
        _keep_text(model, node, layout, prefix)
        report.neutralised_slices.append(node.name)
    _finish(model, after, num_visual_tokens, token)
    if declared is not None:
        model.graph.value_info.append(helper.make_tensor_value_info(sliced, *declared))
    produced_after = {o for n in after for o in n.output}
    for output in model.graph.output:   # a first step's caches of the later layers: the text's tokens
        if output.name in produced_after:
            _declare_without(output, token, num_visual_tokens)
    log.info("token_exit: visual tokens dropped before decoder layer %d of %d", exit_layer, depth)
    return model, report


_CACHED_FIX = ("exit after layer 1 or later: a generation graph's exit before layer 0 would never read the image; "
               "prompt the text model alone instead")


@on_stand_in_weights
def apply_step_token_exit(onnx_model: onnx.ModelProto, exit_layer: int, num_visual_tokens: int,
                          visual_offset: int | tuple[int, ...] = 0) -> tuple[onnx.ModelProto, TokenExitReport]:
    """A vision-language model's later generation step (``attnc export --with-past``) reading the KV cache of a first
    step whose visual tokens exited before decoder layer ``exit_layer`` (:func:`apply_static_token_exit` of
    ``--first-step``): layers ``exit_layer:`` take caches without the image's ``P`` tokens.

    The step's new tokens are text, so nothing is cut from its hidden state. What the later layers read over the
    whole cache loses the image's columns ``[K, K + P)`` (each image's, where a prompt has several; ``K`` then counts
    the text in front of the last one's end): the attention mask (its key axis) and the shape vectors
    sized by it (a dynamo export's ``Expand`` / ``Reshape`` of grouped keys), found by running the graph at two
    sizes (an axis or entry as long as ``attention_mask`` in both). The later layers' cache inputs and outputs are
    declared ``past + K`` / ``past + K + seq`` long, the others ``past + K + P`` / ``past + K + P + seq``, the mask
    ``past + K + P + seq``: ``past`` counts the cached text after the image, and a size every term samples alike
    fits every layer (:func:`attnc.passes.core.sampled_dim`).

    Raises:
        AttncError: ``exit_layer`` is outside ``[1, decoder layers]``, the graph takes no ``attention_mask`` or a
            static cache, or a later layer reads the cache's length in a way attnc cannot cut.
    """
    from attnc.compiler.decode import MASK

    model = _copy(onnx_model)
    boundaries = decoder_boundaries(model)
    depth = len(boundaries)
    if not isinstance(exit_layer, (int, np.integer)) or not 1 <= exit_layer <= depth:
        raise AttncError(f"exit_layer must be in [1, {depth}] (the decoder has {depth} layers), got {exit_layer}",
                         _CACHED_FIX if exit_layer == 0 else "")
    _check_first_layer(model, exit_layer)
    layout = VisualLayout.of(num_visual_tokens, visual_offset)
    report = TokenExitReport("static", int(exit_layer), depth, layout.tokens,
                             boundaries[exit_layer] if exit_layer < depth else "", visual_offset=_recorded(layout))
    if exit_layer == depth:
        return model, report
    inputs = {i.name: i for i in model.graph.input}
    mask = inputs.get(MASK)
    total = mask.type.tensor_type.shape.dim[-1] if mask is not None and mask.type.tensor_type.shape.dim else None
    fix = "export the step with `attnc export CKPT --with-past`: its dynamic axes name them so"
    if total is None or not total.HasField("dim_param"):
        raise AttncError("a generation step's token exit needs its attention_mask [batch, past + seq] with a dynamic "
                         "length", fix)
    x = boundaries[exit_layer]
    after = _downstream(model, x)
    later_caches = _caches_read_by(after, inputs)
    if not later_caches:
        raise AttncError(f"no cache input (past_key_values.N.key / .value) is read by decoder layers {exit_layer}-"
                         f"{depth - 1} of the step", fix)
    cache_dim = inputs[later_caches[0]].type.tensor_type.shape.dim[2]
    past = cache_dim.dim_param if cache_dim.HasField("dim_param") else ""
    if not past or "+" in past or past not in dim_terms(total.dim_param):
        raise AttncError(f"the step's caches are not declared [batch, heads, past, dim] beside a mask [batch, past + "
                         f"seq] (cache {past or cache_dim.dim_value}, mask {total.dim_param})", fix)
    _shorten_caches(model, after, x, later_caches, past, total.dim_param, layout, f"token_exit/step{exit_layer}")
    _declare_step_caches(model, after, later_caches, past, total.dim_param, layout)
    _finish(model, after)
    log.info("token_exit: decoder layers %d-%d of the step read caches without the visual tokens", exit_layer,
             depth - 1)
    return model, report


def _caches_read_by(after: list[onnx.NodeProto], inputs: dict) -> list[str]:
    """The cache inputs (``past_key_values.N.*``) the nodes ``after`` read: the later layers'."""
    from attnc.compiler.decode import past_name

    caches = {past_name(i, kind) for i in range(len(inputs)) for kind in ("key", "value")}
    return sorted({name for n in after for name in n.input if name in caches and name in inputs})


def _shorten_caches(model, after: list[onnx.NodeProto], x: str, later_caches: list[str], past: str, whole: str,
                    layout: VisualLayout, prefix: str) -> None:
    """Rewire a step so that the nodes ``after`` (the later layers, behind boundary ``x``) read caches ``later_caches``
    without the images' tokens (``layout``): what they read over the whole cache (``whole`` long, the
    mask's dim; the caches ``past`` long) loses the image, and what the rest of the graph reads of a later cache's
    size gets it back. Lengths are told apart by running the graph where the cache and the new tokens differ."""
    inside = {id(n) for n in after}
    # a dynamo export takes one layer's cache length for every layer's: layer 0's Reshape may read layer 3's
    sizes_of_later = []
    for node in model.graph.node:
        if not any(i in later_caches for i in node.input) or id(node) in inside:
            continue
        if node.op_type != "Shape":
            raise AttncError(f"{node.op_type} node {node.name} reads a later layer's cache outside that layer, so "
                             "attnc cannot shorten the cache", "report the model to attnc")
        sizes_of_later.append(node.output[0])
    outer = _outer_reads(model, x, after, skip={*later_caches, *sizes_of_later})
    sizes, cached = (2, 3), (7, 11)
    wholes = [sampled_dim(whole, size, {past: n}) for size, n in zip(sizes, cached)]
    names = [*outer, *sizes_of_later]
    try:
        runs = evaluate_tensors(model, names, sizes=sizes, dims={past: cached}) if names else []
    except Exception as exc:   # ONNX Runtime's errors are of many types
        raise AttncError(f"the step does not run at sampled sizes ({type(exc).__name__}: {exc}), so attnc cannot "
                         "find what its later layers read over the cache", "report the model to attnc") from None
    values = {name: [np.asarray(run[name]) for run in runs] for name in names}

    def entries(name, lengths):   # where a shape vector (or a length) holds one of these lengths in every run
        v = values[name]
        if v[0].ndim > 1 or v[0].dtype.kind not in "iu" or v[1].shape != v[0].shape:
            return []
        return [j for j in range(v[0].size) if any(all(a.reshape(-1)[j] == n for a, n in zip(v, ls)) for ls in lengths)]

    def moved(name, positions, sign):
        delta = np.zeros(values[name][0].shape, dtype=values[name][0].dtype)
        delta.reshape(-1)[positions] = layout.tokens
        new = f"{prefix}/{name}/{'whole' if sign > 0 else 'text'}"
        model.graph.initializer.append(numpy_helper.from_array(delta, new + ".delta"))
        model.graph.node.append(helper.make_node("Add" if sign > 0 else "Sub", [name, new + ".delta"], [new],
                                                 name=new))
        return new

    for name in sizes_of_later:   # outside the later layers, a cache's length means the whole cache's
        positions = entries(name, [cached])
        if positions:
            new = moved(name, positions, +1)
            for node in model.graph.node:
                if id(node) not in inside and node.name != new:
                    node.input[:] = [new if i == name else i for i in node.input]
    for name, uses in outer.items():
        v = values[name]
        axes = [j for j in range(v[0].ndim) if all(a.ndim == v[0].ndim and a.shape[j] == n for a, n in zip(v, wholes))]
        positions = [] if depends_on_data(model, name) else entries(name, [wholes, cached])
        if positions:   # a shape vector (or a length) over the whole cache: P fewer
            new = moved(name, positions, -1)
        elif axes:      # the mask: without the image's columns
            new = _drop_visual(model, name, axes, layout, f"{prefix}/{name}/text", f"{prefix}/{name}/text")
        else:
            continue
        for node, i in uses:
            node.input[i] = new


def _declare_step_caches(model, after: list[onnx.NodeProto], later_caches: list[str], past: str, whole: str,
                         layout: VisualLayout) -> None:
    """Declare the step's caches ``past + K`` (``later_caches`` and the ``present`` outputs ``after`` computes) or
    ``past + K + P`` (the others) long, the mask (``whole``) ``past + K + P + seq``: ``past`` now counts the cached
    text after the image."""
    from attnc.compiler.decode import exited_cache_lengths, present_name

    produced_after = {o for n in after for o in n.output}
    whole_terms = sorted(dim_terms(whole))
    text, full = exited_cache_lengths(past, layout.text_before_end, layout.tokens)
    new_tokens = [t for t in whole_terms if t != past]
    presents = {present_name(i, kind) for i in range(len(model.graph.output)) for kind in ("key", "value")}
    for value in list(model.graph.input) + list(model.graph.output):
        later = value.name in later_caches or (value.name in produced_after and value.name in presents)
        for dim in value.type.tensor_type.shape.dim:
            terms = sorted(dim_terms(dim.dim_param))
            if terms in ([past], whole_terms):   # "seq + past" too: the exporters order terms their way
                dim.dim_param = " + ".join([text if later else full, *(new_tokens if terms != [past] else [])])


def _takes_cache(model) -> bool:
    """Whether ``model`` is a later generation step: it takes ``past_key_values.*``."""
    from attnc.compiler.decode import past_name

    return any(i.name == past_name(0, "key") for i in model.graph.input)


def _gives_cache(model) -> bool:
    """Whether ``model`` is a generation graph with a KV cache: it returns ``present.*`` (a first step) or takes
    ``past_key_values.*`` (a later step)."""
    from attnc.compiler.decode import present_name

    return any(o.name == present_name(0, "key") for o in model.graph.output) or _takes_cache(model)


def _declare_without(value: onnx.ValueInfoProto, token, num_visual_tokens: int) -> None:
    """Declare ``value`` (an output computed behind the exit) without the visual tokens: a symbolic dim with ``P``
    among its terms (``"seq + 16"``) loses that term, a static dim equal to the boundary's token count ``token``
    loses ``P``."""
    for dim in value.type.tensor_type.shape.dim:
        terms = dim_terms(dim.dim_param)
        if str(num_visual_tokens) in terms and len(terms) > 1:
            terms.remove(str(num_visual_tokens))
            dim.dim_param = " + ".join(terms)
        elif dim.HasField("dim_value") and isinstance(token, int) and dim.dim_value == token:
            dim.dim_value = token - num_visual_tokens


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    name_nodes(copy)
    fold_static_shapes(copy)   # a static trace whose shapes inference cannot follow: the token counts are read there
    return copy


def _check_first_layer(model, layer: int, what: str = "the visual tokens go") -> None:
    """Refuse ``layer`` in front of the first decoder layer a token exit may precede, as the export recorded it
    (:data:`attnc.compiler.onnx_io.FIRST_EXIT_LAYER`: Qwen3-VL adds image features to the image's hidden states after
    its first layers, its deepstack)."""
    first = _first_exit_layer(model)
    if layer < first:
        raise AttncError(f"{what} before decoder layer {layer}, but the model adds image features to the image's "
                         f"hidden states after its first {first} layers (deepstack, as the export recorded)",
                         f"exit before layer {first} or later")


def _first_exit_layer(model) -> int:
    value = metadata(model, FIRST_EXIT_LAYER)
    return int(value) if value and value.isdigit() else 0


def _recorded(layout: VisualLayout) -> int | list[int]:
    """A report's ``visual_offset``: ``K`` of one image, the list of each one's of several."""
    return layout.offsets[0] if layout.images == 1 else list(layout.offsets)


def _slice_tokens(model, x, layout: VisualLayout, prefix) -> str:
    """Add ``x`` without its visual tokens along axis 1 (``x[:, P:]``, or ``[x[:, :K]; x[:, K + P:]]`` with text in
    front of the image, the text between the images too where there are several) to the graph; return its name."""
    return _drop_visual(model, x, [1], layout, f"{prefix}/text", f"{prefix}/drop_visual_tokens")


def _drop_visual(model, name: str, axes: list[int], layout: VisualLayout, out: str, node_name: str) -> str:
    """Nodes computing ``out``: ``name`` without the visual tokens (``[K, K + P)`` of one image after ``K`` text
    tokens; each image's of several, ``layout``) along each of ``axes``: one ``Slice`` from ``P`` where one image
    comes first (``K`` = 0), else per axis the ``Concat`` of the text's slices in front of, between and behind the
    images."""
    def constant(key, value):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"{out}.{key}"))
        return f"{out}.{key}"

    pieces = layout.text_ranges()
    if len(pieces) == 1:   # the text behind the images alone
        inputs = [name, constant("starts", [pieces[0][0]] * len(axes)), constant("ends", [_END] * len(axes)),
                  constant("axes", axes)]
        model.graph.node.append(helper.make_node("Slice", inputs, [out], name=node_name))
        return out
    current = name
    for j, axis in enumerate(axes):
        target = out if j == len(axes) - 1 else f"{out}.without{axis}"
        on, parts = constant(f"axis{axis}", [axis]), []
        for i, (start, stop) in enumerate(pieces):
            part = f"{target}.text{i}"
            model.graph.node.append(helper.make_node(
                "Slice", [current, constant(f"start{axis}_{i}", [start]),
                          constant(f"stop{axis}_{i}", [_END if stop is None else stop]), on],
                [part], name=f"{node_name}/text{i}_{axis}"))
            parts.append(part)
        model.graph.node.append(helper.make_node("Concat", parts, [target], name=f"{node_name}/concat{axis}",
                                                 axis=axis))
        current = target
    return out


def _keep_text(model, node: onnx.NodeProto, layout: VisualLayout, prefix: str) -> None:
    """The model's own ``Slice(·, K + P, ∞)`` after the exit: ``Identity`` where the images came first, else a
    slice from ``K`` (the text in front of the last image's end stays out of the output, as before)."""
    offset = layout.text_before_end
    if offset == 0:
        _to_identity(node)
        return
    start = f"{prefix}/{node.name}/text_start"
    if all(init.name != start for init in model.graph.initializer):
        model.graph.initializer.append(numpy_helper.from_array(np.array([offset], dtype=np.int64), start))
    node.input[1] = start


def _retarget_outer_tensors(model, x, after, layout: VisualLayout, prefix,
                            shapes: dict[str, list] | None = None) -> list[str]:
    """Make tensors computed before the boundary but read after it fit the shorter sequence.

    Exporters compute some token-indexed tensors once and share them between layers: the
    causal mask ``[N, N]``, rotary tables ``[N, D]``, and (dynamo) the Reshape shape vectors
    ``[B, N, 3, H, D]``. An axis is token-indexed when its (symbolic) size equals the token
    axis of the boundary ``x``; such axes lose the visual tokens (``layout``: masks and tables keep the
    text positions' entries, as the torch model's exit does), and shape-vector entries at
    token positions are reduced by ``P``. ``shapes``: :func:`attnc.passes.core.value_shapes` of the model, where
    the caller holds them. Returns the retargeted tensor names.
    """
    shapes = value_shapes(model) if shapes is None else shapes
    num_visual_tokens = layout.tokens
    token = (shapes.get(x) or [None, None])[1]
    produced_after = {o for n in after for o in n.output}
    outer = _outer_reads(model, x, after)
    if isinstance(token, int):
        # Static export: shape vectors and tables are constants; a dimension equal to the
        # sequence length is taken as the token axis (export with a dynamic text axis to avoid
        # relying on that).
        for node in after:
            for i, name in enumerate(node.input):
                value = constant_value(model, name) if name and name != x else None
                if value is None or name in produced_after:
                    continue
                new_value = None
                if (node.op_type in ("Reshape", "Expand") and i == 1) and value.ndim == 1:
                    out_shape = shapes.get(node.output[0]) or []
                    positions = [j for j, d in enumerate(out_shape) if d == token and j < len(value)
                                 and value[j] == token]
                    if positions:
                        new_value = value.copy()
                        new_value[positions] -= num_visual_tokens
                elif value.ndim >= 1 and token in value.shape and value.dtype.kind in "fb":
                    keep = layout.text_index(token)
                    new_value = value
                    for axis, d in enumerate(value.shape):
                        if d == token:
                            new_value = np.take(new_value, keep, axis=axis)
                if new_value is not None:
                    new = f"{prefix}/{name}/text"
                    if all(init.name != new for init in model.graph.initializer):
                        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(new_value), new))
                    node.input[i] = new
    probed = None if isinstance(token, int) or not outer else \
        _probe_token_axes(model, x, list(outer), layout.text_before_end, (shapes.get(x) or [None])[0])
    if token is None and probed is None:
        raise AttncError(f"the token axis of {x} has no known size",
                         "export the model with a dynamic text axis or static shapes")
    changed = []
    for name, uses in outer.items():
        shape = shapes.get(name)
        new = None
        shape_uses = [(n, i) for n, i in uses if (n.op_type in ("Reshape", "Expand", "Tile") and i == 1)
                      or n.op_type == "ConstantOfShape"]
        if shape_uses and len(shape_uses) == len(uses):
            out_shape = shapes.get(shape_uses[0][0].output[0]) or []
            positions = probed[name][1] if probed else [j for j, d in enumerate(out_shape) if d == token]
            if positions:
                new = f"{prefix}/{name}/text"
                delta = np.zeros(probed[name][2] if probed else len(out_shape), dtype=np.int64)
                delta[positions] = num_visual_tokens
                model.graph.initializer.append(numpy_helper.from_array(delta, new + ".delta"))
                if probed:
                    # the probe saw explicit token counts at these entries
                    model.graph.node.append(helper.make_node("Sub", [name, new + ".delta"], [new], name=new))
                else:
                    # -1 (inferred) entries stay as they are; explicit token counts lose P.
                    model.graph.initializer.append(numpy_helper.from_array(np.array(0, np.int64), new + ".zero"))
                    model.graph.node.extend([
                        helper.make_node("Sub", [name, new + ".delta"], [new + ".sub"], name=new + "/sub"),
                        helper.make_node("Greater", [name, new + ".zero"], [new + ".explicit"],
                                         name=new + "/explicit"),
                        helper.make_node("Where", [new + ".explicit", new + ".sub", name], [new], name=new),
                    ])
        elif probed[name][0] if probed else shape and token in shape:
            axes = probed[name][0] if probed else [j for j, d in enumerate(shape) if d == token]
            new = _drop_visual(model, name, axes, layout, f"{prefix}/{name}/text", f"{prefix}/{name}/text")
        elif shape is None and not probed:
            log.warning("token_exit: %s (read after the exit) has no known shape; left as is", name)
        if new is not None:
            for node, i in uses:
                node.input[i] = new
            changed.append(name)
    return changed


def _outer_reads(model, x: str, after: list[onnx.NodeProto], skip=frozenset()
                 ) -> dict[str, list[tuple[onnx.NodeProto, int]]]:
    """``{name: [(node, input index), ...]}`` of the tensors the nodes ``after`` (those behind boundary ``x``) read
    that are computed in front of them: neither ``x``, a constant, one of theirs nor in ``skip``."""
    produced_after = {o for n in after for o in n.output}
    outer: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in after:
        for i, name in enumerate(node.input):
            if name and name != x and name not in produced_after and name not in skip \
                    and constant_value(model, name) is None:
                outer.setdefault(name, []).append((node, i))
    return outer


def _probe_token_axes(model, x, names: list[str], offset: int = 0, batch=None
                      ) -> dict[str, tuple[list[int], list[int], int]] | None:
    """``{name: (token axes, token entries, length)}`` of tensors ``names`` read after boundary ``x``, found by
    running the graph at two sizes (:func:`attnc.passes.core.evaluate_tensors`): an axis is over the tokens when its
    length is ``x``'s token count in both runs, an entry of a 1-D integer tensor (a shape vector, ``length`` entries
    long; 0 for other tensors) when its value is. Symbolic shapes do not tell: shape inference names the rotary
    tables' and the hidden state's token axes apart in a TorchScript export. The sizes leave text after the ``offset``
    tokens in front of the (last) image (below them, a model slicing ``[:K]`` and ``[K:]`` computes tables whose
    lengths do not follow the hidden state's: Qwen2-VL's positions). ``batch``, the boundary's batch dim: where it
    names a batch axis of the inputs alone, it is 2 in both runs (a batch as large as the text would run the model,
    vision tower included, that many times over: seconds for two images of a thousand tokens). None when the graph
    cannot run at sampled sizes or its token count does not change."""
    pinned = {batch: (2, 2)} if _batch_symbol(model, batch) else None
    try:
        runs = evaluate_tensors(model, [x, *names], sizes=(offset + 2, offset + 3), dims=pinned)
    except Exception as exc:   # ONNX Runtime's errors are of many types
        log.info("token_exit: the graph does not run at sampled sizes (%s); symbolic shapes decide", exc)
        return None
    lengths = [run[x].shape[1] for run in runs]
    if len(runs) < 2 or lengths[0] == lengths[1]:
        return None
    found = {}
    for name in names:
        values = [np.asarray(run[name]) for run in runs]
        axes = [j for j in range(values[0].ndim)
                if all(v.ndim == values[0].ndim and v.shape[j] == n for v, n in zip(values, lengths))]
        vector = values[0].ndim == 1 and values[0].dtype.kind in "iu" and values[1].shape == values[0].shape
        entries = [j for j in range(len(values[0])) if all(v[j] == n for v, n in zip(values, lengths))] \
            if vector else []
        found[name] = (axes, entries, len(values[0]) if vector else 0)
    return found


def _batch_symbol(model, name) -> bool:
    """Whether ``name`` is a symbol the graph's inputs use as their first axis and nowhere else (a batch)."""
    if not isinstance(name, str) or not name.isidentifier():
        return False
    axes = [j for i in model.graph.input for j, d in enumerate(i.type.tensor_type.shape.dim) if d.dim_param == name]
    return bool(axes) and set(axes) == {0}


def _to_identity(node):
    del node.input[1:]
    node.op_type = "Identity"
    del node.attribute[:]


def _text_shape(shape: list | None, elem_type: int | None, num_visual_tokens) -> tuple[int, list] | None:
    """``(element type, shape)`` of ``x[:, P:]`` for a boundary ``x`` of that ``shape`` and type, where its token
    axis is a sum of dims with the constant ``P`` among its terms (a dynamo export's ``"seq + 576"``): the text's
    tokens keep the text's dim (``"seq"``), which shape inference carries on to the later layers (it cannot subtract
    from a symbolic dim itself). The passes read token counts from those shapes instead of running every layer in
    front of them."""
    if not shape or len(shape) < 2 or elem_type is None:
        return None
    text = _without_visual(shape[1], num_visual_tokens)
    return None if text is None else (elem_type, [shape[0], text, *shape[2:]])


def _without_visual(dim, num_visual_tokens: int) -> str | None:
    """A token axis named as a sum with the constant ``P`` among its terms, without ``P`` (``"seq + 576"`` ->
    ``"seq"``); None for any other dim."""
    terms = dim_terms(dim) if isinstance(dim, str) else []
    if str(num_visual_tokens) not in terms or len(terms) < 2:
        return None
    terms.remove(str(num_visual_tokens))
    return " + ".join(terms)


def _finish(model, after: list[onnx.NodeProto], num_visual_tokens: int | None = None, token=None):
    """Sort, drop dead nodes, and forget the shapes of what ``after`` (the nodes behind the boundary) computes: their
    sequence lengths changed. The others' shapes stay: a dynamo export names the token axis ``"seq + P"``, which
    shape inference cannot derive from a ``Concat`` again. Given ``num_visual_tokens`` and a boundary whose token axis
    ``token`` is named as a sum with ``P`` among its terms (a one-pass graph's exit, dynamic in its text), the shapes
    of ``after``'s tensors are kept with ``P`` taken out of such names (:func:`_text_dims`): later passes then read the
    text's token counts from the shapes instead of running the graph up to each attention (the neighborhood pass's
    check of every masked attention: seconds per exit of a model with a thousand visual tokens). A static token axis
    says nothing of which static dims behind it counted the image (a ``[B * S, C]`` flattening): those shapes go."""
    stale = {o for n in after for o in n.output}
    toposort(model)
    remove_dead_nodes(model)
    inputs = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.dim_param}
    named = isinstance(token, str) and str(num_visual_tokens) in dim_terms(token)
    kept = [v for v in model.graph.value_info if v.name not in stale or
            named and _text_dims(v, inputs, num_visual_tokens)]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)


def _text_dims(value: onnx.ValueInfoProto, inputs: set[str], num_visual_tokens: int) -> bool:
    """Rewrite ``value``'s shape (a tensor computed behind a one-pass exit whose token axis is named ``"seq + P"``)
    for the text's tokens and say whether it holds: every dim named as a sum of input dims and ``P`` loses ``P``
    (``"seq + 576"`` -> ``"seq"``); a dim named by input dims alone and a static dim stay (the text is dynamic: no
    static size counts its tokens). Any other dim (a sum with another constant, a name the exporter or shape
    inference made up) may or may not have held the image's tokens: False, and the caller forgets the shape."""
    dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") and \
        value.type.tensor_type.HasField("shape") else None
    if dims is None:
        return False
    names = []
    for dim in dims:
        if dim.HasField("dim_value"):
            names.append(None)
            continue
        terms = dim_terms(dim.dim_param)
        constants = [t for t in terms if t.isdigit()]
        if not terms or not all(t.isdigit() or t in inputs for t in terms) or \
                constants not in ([], [str(num_visual_tokens)]) or constants and len(terms) < 2:
            return False
        names.append(" + ".join(t for t in terms if t != str(num_visual_tokens)))
    for dim, name in zip(dims, names):
        if name is not None:
            dim.dim_param = name
    return True


def export_static_exit(torch_model, example_inputs, path, exit_layer: int, **export_kwargs):
    """Torch route: export ``torch_model(image, text_ids, exit_layer=exit_layer)`` with attnc's exporter."""
    import torch

    from attnc.compiler.export import export_onnx, input_names_for

    class _Exit(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch_model

        # Named arguments, not *args: the dynamo exporter maps dynamic_axes onto them.
        def forward(self, image, text_ids):
            return self.model(image, text_ids, exit_layer=exit_layer)

    names = export_kwargs.pop("input_names", None) or input_names_for(torch_model, len(example_inputs))
    return export_onnx(_Exit(), example_inputs, path, input_names=names, **export_kwargs)


@dataclass
class ExitChoice:
    """Result of :func:`choose_exit_layer`: the layer and the per-layer table it was chosen from."""

    exit_layer: int
    table: list[dict]
    criterion: str


@on_stand_in_weights
def choose_exit_layer(onnx_model: onnx.ModelProto, calibration_feeds: list[dict[str, np.ndarray]],
                      num_visual_tokens: int, labels: list[np.ndarray] | None = None,
                      max_accuracy_drop: float = 0.01, atol: float | None = None,
                      visual_offset: int | tuple[int, ...] = 0
                      ) -> ExitChoice:
    """The earliest decoder layer after which the visual tokens can go.

    Every candidate ``k`` is applied with :func:`apply_static_token_exit` and run in ONNX
    Runtime on ``calibration_feeds``. With ``labels`` (one array per batch), ``k`` qualifies
    when its accuracy is at least the full model's minus ``max_accuracy_drop``; without,
    when its top-1 predictions agree with the full model's on at least
    ``1 - max_accuracy_drop`` of the samples (of the text tokens, for a model with logits per token,
    as vision-language checkpoints have). ``atol`` additionally bounds the max abs
    difference of the outputs.
    """
    full = _run(onnx_model, calibration_feeds)
    depth = len(decoder_boundaries(onnx_model))
    table = []
    chosen = depth
    for k in range(_first_exit_layer(onnx_model), depth + 1):
        model, _ = apply_static_token_exit(onnx_model, k, num_visual_tokens, visual_offset)
        outs = full if k == depth else _run(model, calibration_feeds)
        pred = np.concatenate([o.argmax(-1) for o in outs])
        ref = np.concatenate([o.argmax(-1) for o in full])
        row = {"exit_layer": k, "agreement": float((pred == ref).mean()),
               "max_abs_diff": float(max(np.abs(a - b).max() for a, b in zip(outs, full)))}
        if labels is not None:
            truth = np.concatenate(labels)
            row["accuracy"] = float((pred == truth).mean())
            row["full_accuracy"] = float((ref == truth).mean())
            ok = row["accuracy"] >= row["full_accuracy"] - max_accuracy_drop
        else:
            ok = row["agreement"] >= 1 - max_accuracy_drop
        if atol is not None:
            ok = ok and row["max_abs_diff"] <= atol
        row["ok"] = bool(ok)
        table.append(row)
        if ok and chosen == depth and k < depth:
            chosen = k
    criterion = (f"accuracy within {max_accuracy_drop}" if labels is not None
                 else f"agreement >= {1 - max_accuracy_drop}") + (f", outputs within {atol}" if atol else "")
    return ExitChoice(chosen, table, criterion)


def _run(model, feeds_list) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort_session(model, options)
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, {n: f[n] for n in names})[0] for f in feeds_list]


# ----------------------------------------------------------------------------- dynamic exit

@dataclass
class ExitGate:
    """``exit = σ(w · mean_text(x_k) + b) ≥ threshold`` at decoder layer ``layer``.

    ``x_k`` is the hidden state entering decoder layer ``layer``; the mean is over the
    text tokens (positions ``P:``).
    """

    layer: int
    weight: np.ndarray       # [C]
    bias: float
    threshold: float = 0.5

    @property
    def logit_threshold(self) -> float:
        t = min(max(self.threshold, 1e-12), 1 - 1e-12)
        return math.log(t / (1 - t))

    def fires(self, features: np.ndarray) -> np.ndarray:
        """Per-sample decision from ``features [B, C]``."""
        return features.astype(np.float64) @ self.weight.astype(np.float64) + self.bias > self.logit_threshold

    def save(self, path) -> None:
        """Write the gate to an ``.npz`` (what ``attnc compile --exit-gate`` reads)."""
        from attnc.compiler.onnx_io import atomic_path

        with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, layer=self.layer, weight=self.weight, bias=self.bias, threshold=self.threshold)

    @classmethod
    def load(cls, path) -> "ExitGate":
        try:
            data = np.load(path)
            return cls(int(data["layer"]), np.asarray(data["weight"], np.float32), float(data["bias"]),
                       float(data["threshold"]))
        except (OSError, KeyError, ValueError) as exc:
            raise AttncError(f"{path} is not an exit gate ({exc})",
                             "save one with ExitGate.save after train_exit_gate") from None


def vlm_hidden(model, image, text_ids, layer: int):
    """``TinyVLM``: the hidden state ``[B, P + T, C]`` entering decoder layer ``layer``."""
    import torch

    visual = model.projector(model.vision.forward_features(image))
    x = torch.cat([visual, model.embed(text_ids)], dim=1)
    x = x + model.pos_embed[: x.shape[1]]
    for block in model.layers[:layer]:
        x = block(x)
    return x


def vlm_finish(model, x, layer: int, exit_now: bool):
    """``TinyVLM``: run decoder layers ``layer:`` on ``x`` (text tokens only if ``exit_now``) to logits."""
    x = x[:, model.num_visual_tokens:] if exit_now else x
    for block in model.layers[layer:]:
        x = block(x)
    if not exit_now:
        x = x[:, model.num_visual_tokens:]
    return model.head(model.norm(x[:, -1]))


def is_tiny_vlm(model) -> bool:
    """Laid out as attnc's ``TinyVLM`` (:func:`vlm_hidden` and :func:`vlm_finish` walk its layers)."""
    return all(hasattr(model, n) for n in ("vision", "projector", "embed", "pos_embed", "layers", "norm", "head",
                                           "num_visual_tokens"))


def exits_in_torch(model) -> bool:
    """Whether :func:`exit_run` can run ``model``: a ``TinyVLM``, or a module with its own ``exit_run`` (a
    vision-language checkpoint, :class:`attnc.models.hf_vision_language.VisionLanguageOutput`)."""
    return callable(getattr(model, "exit_run", None)) or is_tiny_vlm(model)


def exit_run(model, image, text_ids, layer: int, decide, attention_mask=None):
    """``(output, features [B, C], exited)``: ``model`` on ``(image, text_ids)``, its visual tokens dropped before
    decoder ``layer`` when ``decide(features)`` is true, ``features`` the mean over the text tokens of the hidden
    state entering that layer (what an :class:`ExitGate` reads). ``attention_mask [B, T]`` (0 at padding: a
    vision-language checkpoint's padded prompts) goes to the model's ``exit_run``; the mean leaves the padding out.

    Raises:
        AttncError: the model is neither a ``TinyVLM`` nor has an ``exit_run`` method, or a mask for a ``TinyVLM``.
    """
    depth = len(model.decoder_layers) if hasattr(model, "decoder_layers") else \
        len(model.layers) if is_tiny_vlm(model) else None
    if depth is not None and not 0 <= layer < depth:
        raise AttncError(f"the exit layer must be in [0, {depth}) (the decoder has {depth} layers), got {layer}",
                         f"pick a decoder layer below {depth}")
    if callable(getattr(model, "exit_run", None)):
        return model.exit_run(image, text_ids, layer, decide) if attention_mask is None else \
            model.exit_run(image, text_ids, layer, decide, attention_mask=attention_mask)
    if not is_tiny_vlm(model):
        raise AttncError(f"{type(model).__name__} cannot drop its visual tokens in PyTorch: it has no exit_run "
                         "method and is not laid out as attnc's TinyVLM",
                         "give the model exit_run(image, text_ids, layer, decide) -> (output, features, exited), "
                         "as attnc.models.hf_vision_language.VisionLanguageOutput has")
    if attention_mask is not None:
        raise AttncError("attnc's TinyVLM takes no attention_mask", "run it on prompts of one length")
    x = vlm_hidden(model, image, text_ids, layer)
    features = x[:, model.num_visual_tokens:].mean(dim=1)
    exited = bool(decide(features))
    return vlm_finish(model, x, layer, exited), features, exited


def gate_features(model, image, text_ids, layer: int):
    """Mean over the text tokens of the hidden state entering ``layer``: ``[B, C]``."""
    import torch

    with torch.no_grad():
        return exit_run(model, image, text_ids, layer, lambda f: False)[1]


def dynamic_exit_forward(model, image, text_ids, gate: ExitGate, attention_mask=None, per_row: bool = True):
    """Torch reference of the dynamic graph: ``(output, exited [B] bool)``, the output the model's (logits; a
    vision-language first step's ``(logits, present.0.key, ...)``). Each row exits where its own gate fires (each
    reading its own tokens, not the padding ``attention_mask`` marks 0), so its output is the one it gets alone; a
    first step's batch exits only where every row's gate fires (exited, the later layers' caches are shorter: one
    length for the batch), and so does every batch with ``per_row`` False (a graph whose report says it decides for
    the batch: :func:`apply_dynamic_token_exit`'s ``gate["per_row"]``)."""
    import torch

    with torch.no_grad():
        full, features, _ = exit_run(model, image, text_ids, gate.layer, lambda f: False, attention_mask)
        fired = np.asarray(gate.fires(features.numpy()), dtype=bool).reshape(-1)
        if isinstance(full, tuple) or not per_row:
            fired = np.full(len(fired), bool(fired.all()))
        if not fired.any():
            return full, fired
        exited = exit_run(model, image, text_ids, gate.layer, lambda f: True, attention_mask)[0]
        if fired.all():
            return exited, fired
        rows = torch.from_numpy(fired).reshape(-1, *[1] * (full.dim() - 1))
        return torch.where(rows, exited, full), fired


def _answers(output):
    """Top-1 answers ``[B]``: of the last token where the output holds logits per token ``[B, T, vocab]``."""
    return (output[:, -1] if output.dim() == 3 else output).argmax(-1)


def train_exit_gate(model, inputs: tuple, layer: int, min_precision: float = 0.99, steps: int = 300,
                    seed: int = 0) -> tuple[ExitGate, dict]:
    """Fit a logistic gate at decoder ``layer`` on calibration ``inputs`` (``(images, text_ids)``, or with an
    ``attention_mask`` third for a vision-language checkpoint's padded prompts, each padded after the text in front of
    the image: their last token is the text's).

    Label of a sample: exiting at ``layer`` gives the same top-1 answer as the full model (of the last text
    token, for a model whose output holds logits per token). The threshold is the smallest one whose precision on
    the calibration data (fraction of fired samples that keep the answer) is at least ``min_precision``; with
    none, the gate never fires. ``model`` is one :func:`exit_run` runs. Returns ``(gate, stats)``.
    """
    import torch

    image, text, *mask = inputs
    mask = mask[0] if mask else None
    with torch.no_grad():
        full, features, _ = exit_run(model, image, text, layer, lambda f: False, mask)
        early = exit_run(model, image, text, layer, lambda f: True, mask)[0]
    target = (_answers(full) == _answers(early)).float()
    mean, std = features.mean(0), features.std(0) + 1e-6
    z = (features - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(z.shape[1], generator=gen) * 0.01).requires_grad_()
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        # Fold the standardisation into the gate so the graph sees raw features.
        weight = (w / std).numpy()
        bias = float(b - (w * mean / std).sum())
        prob = torch.sigmoid(z @ w + b).numpy()
    labels = target.numpy().astype(bool)
    threshold = 1.0
    for t in np.unique(prob):
        fired = prob >= t
        if fired.any() and labels[fired].mean() >= min_precision:
            threshold = float(t) - 1e-9
            break
    gate = ExitGate(layer, weight.astype(np.float32), bias, threshold)
    fired = gate.fires(features.numpy())
    stats = {"layer": layer, "samples": len(labels), "exit_keeps_answer": float(labels.mean()),
             "fire_rate": float(fired.mean()),
             "precision": float(labels[fired].mean()) if fired.any() else None, "threshold": threshold}
    return gate, stats


@on_stand_in_weights
def apply_dynamic_token_exit(onnx_model: onnx.ModelProto, gate: ExitGate, num_visual_tokens: int,
                             visual_offset: int | tuple[int, ...] = 0) -> tuple[onnx.ModelProto, TokenExitReport]:
    """Put the decoder after ``gate.layer`` under an ``If``: text tokens only when the gate fires (the
    ``num_visual_tokens`` after ``visual_offset`` text tokens dropped, as :func:`apply_static_token_exit` drops them).

    The gate (the mean over the text tokens, ``MatMul``, ``Add``, ``Greater``) runs in the main graph, once per row.
    Where every row's gate fires (``ReduceMin``), the decoder runs on the text alone; where none does, on every token;
    where the rows disagree, both run and each output's rows are picked (``Where``): each row's output is the one it
    gets alone, whatever the batch (:func:`dynamic_exit_forward` is the PyTorch reference). A first generation step
    (its caches out) exits only where every row's gate fires: exited, its later layers' caches are shorter, one length
    for the batch. The branches read the main graph's tensors
    (outer-scope references) and produce the graph outputs that depend on the boundary. Padded prompts (a graph
    input ``attention_mask [B, K + T]``, 0 at padding, over the text tokens in their order: attnc's vision-language
    exports ``--with-attention-mask``) average each row's tokens where the mask is 1, so a prompt's gate reads what
    it reads alone.
    """
    model = _copy(onnx_model)
    boundaries = decoder_boundaries(model)
    depth = len(boundaries)
    if not 0 <= gate.layer < depth:
        raise AttncError(f"gate layer must be in [0, {depth}), got {gate.layer}")
    _check_first_layer(model, gate.layer, "the gate lets the visual tokens go")
    layout = VisualLayout.of(num_visual_tokens, visual_offset)
    x = boundaries[gate.layer]
    prefix = f"token_exit/gate{gate.layer}"
    after = _downstream(model, x)
    after_names = {n.name for n in after}
    text = _slice_tokens(model, x, layout, prefix)
    g = model.graph
    g.initializer.extend([
        numpy_helper.from_array(np.array([1], dtype=np.int64), f"{prefix}/token_axis"),
        numpy_helper.from_array(gate.weight.reshape(-1, 1).astype(np.float32), f"{prefix}/weight"),
        numpy_helper.from_array(np.array(gate.bias, dtype=np.float32), f"{prefix}/bias"),
        numpy_helper.from_array(np.array(gate.logit_threshold, dtype=np.float32), f"{prefix}/threshold"),
    ])
    _text_mean(model, x, text, num_visual_tokens, prefix)
    g.node.extend([
        helper.make_node("MatMul", [f"{prefix}/mean", f"{prefix}/weight"], [f"{prefix}/score"],
                         name=f"{prefix}/score"),
        helper.make_node("Add", [f"{prefix}/score", f"{prefix}/bias"], [f"{prefix}/logit"], name=f"{prefix}/logit"),
        helper.make_node("ReduceMin", [f"{prefix}/logit"], [f"{prefix}/min_logit"], name=f"{prefix}/min_logit",
                         keepdims=0),
        helper.make_node("Greater", [f"{prefix}/min_logit", f"{prefix}/threshold"], [f"{prefix}/exit"],
                         name=f"{prefix}/exit"),
    ])
    # The exit branch reads retargeted copies of token-indexed outer tensors (made in the main graph).
    original_inputs = {n.name: list(n.input) for n in after}
    shapes = value_shapes(model)
    _retarget_outer_tensors(model, x, after, layout, prefix, shapes)
    exit_inputs = {n.name: list(n.input) for n in after}
    for node in after:
        del node.input[:]
        node.input.extend(original_inputs[node.name])
    produced_after = {o for n in after for o in n.output}
    outputs = [o for o in g.output if o.name in produced_after]
    drops = {n.name for n in _model_visual_drop(model, after, layout)}

    def branch_nodes(tag: str, exit_now: bool) -> tuple[list[onnx.NodeProto], dict[str, str]]:
        rename = {o: f"{prefix}/{tag}/{o}" for o in produced_after}
        nodes = []
        for node in after:
            new = onnx.NodeProto()
            new.CopyFrom(node)
            new.name = f"{prefix}/{tag}/{node.name}"
            if exit_now:
                del new.input[:]
                new.input.extend(exit_inputs[node.name])
            for i, name in enumerate(new.input):
                if name == x and exit_now:
                    new.input[i] = text
                elif name in rename:
                    new.input[i] = rename[name]
            for i, name in enumerate(new.output):
                new.output[i] = rename[name]
            if exit_now and node.name in drops:
                _keep_text(model, new, layout, prefix)
            nodes.append(new)
        return nodes, rename

    def branch(tag: str, exit_now: bool) -> onnx.GraphProto:
        nodes, rename = branch_nodes(tag, exit_now)
        outs = [helper.make_tensor_value_info(rename[o.name], o.type.tensor_type.elem_type, None) for o in outputs]
        return helper.make_graph(nodes, f"{prefix}/{tag}", [], outs)

    ranks = _row_ranks(model, outputs, (shapes.get(x) or [None])[0])
    whole = [o.name for o in outputs] if ranks is None else [f"{prefix}/batch/{o.name}" for o in outputs]
    if_nodes = [helper.make_node("If", [f"{prefix}/exit"], whole, name=f"{prefix}/if",
                                 then_branch=branch("exit", True), else_branch=branch("full", False))]
    if ranks is not None:   # each row as its gate says (a first step's caches are one length for the batch: not it)
        if_nodes += _mixed_rows(model, prefix, branch_nodes, outputs, ranks, whole)
    kept = [n for n in g.node if n.name not in after_names]
    del g.node[:]
    g.node.extend(kept + if_nodes)
    _finish(model, after)
    for output in outputs:   # a first step's later caches: the image's tokens in them or not, as the gate says
        for dim in output.type.tensor_type.shape.dim:
            if str(num_visual_tokens) in dim_terms(dim.dim_param):
                dim.ClearField("dim_param")
    report = TokenExitReport("dynamic", gate.layer, depth, num_visual_tokens, x, sorted(drops),
                             gate={"layer": gate.layer, "weight": [float(w) for w in gate.weight],
                                   "bias": float(gate.bias), "threshold": float(gate.threshold),
                                   "per_row": ranks is not None},
                             visual_offset=_recorded(layout))
    return model, report


def _row_ranks(model, outputs: list[onnx.ValueInfoProto], batch) -> list[int] | None:
    """Each output's rank where every row of a batch can take its own branch: outputs whose first axis is the batch
    (``batch``, the boundary's first dim), none a cache (a first step's: exited, its later layers' caches are shorter
    for every row); else None."""
    if _gives_cache(model) or batch is None:
        return None
    ranks = []
    for output in outputs:
        tensor = output.type.tensor_type
        dims = tensor.shape.dim if tensor.HasField("shape") else []
        first = (dims[0].dim_param or None) if dims and not dims[0].HasField("dim_value") else \
            (dims[0].dim_value if dims else None)
        if first != batch:
            return None
        ranks.append(len(dims))
    return ranks


def _mixed_rows(model, prefix: str, branch_nodes, outputs, ranks: list[int], whole: list[str]
                ) -> list[onnx.NodeProto]:
    """Nodes giving each output's rows their own gate's branch, after the ``If`` that decides for the whole batch (its
    outputs ``whole``: exited where every row's gate fired, else all tokens'). Where the rows disagree, a second
    ``If`` runs the exited branch too (else it passes ``whole`` on), and each output takes the exited rows where the
    row's gate fired (``Where``). The rows of a one-pass graph do not read each other, so each row's output is the one
    it gets alone. Two ``If`` nodes one after the other, not one inside the other: TensorRT-RTX 1.7's builder fails
    on the nested form (a Myelin check)."""
    g = model.graph
    fires, mixed = f"{prefix}/fires", f"{prefix}/mixed"
    g.initializer.extend(numpy_helper.from_array(np.array([-1] + [1] * (rank - 1), dtype=np.int64),
                                                 f"{prefix}/rows{rank}.shape") for rank in sorted(set(ranks)))
    nodes = [
        helper.make_node("Greater", [f"{prefix}/logit", f"{prefix}/threshold"], [fires], name=fires),
        helper.make_node("ReduceMax", [f"{prefix}/logit"], [f"{prefix}/max_logit"], name=f"{prefix}/max_logit",
                         keepdims=0),
        helper.make_node("Greater", [f"{prefix}/max_logit", f"{prefix}/threshold"], [f"{prefix}/any"],
                         name=f"{prefix}/any"),
        helper.make_node("Not", [f"{prefix}/exit"], [f"{prefix}/not_all"], name=f"{prefix}/not_all"),
        helper.make_node("And", [f"{prefix}/any", f"{prefix}/not_all"], [mixed], name=mixed),
    ]
    exited, names = branch_nodes("mixed_exit", True)
    then = helper.make_graph(exited, f"{prefix}/mixed_exit", [], [
        helper.make_tensor_value_info(names[o.name], o.type.tensor_type.elem_type, None) for o in outputs])
    passed = [helper.make_node("Identity", [w], [f"{prefix}/passed/{o.name}"], name=f"{prefix}/passed/{o.name}")
              for o, w in zip(outputs, whole)]
    otherwise = helper.make_graph(passed, f"{prefix}/passed", [], [
        helper.make_tensor_value_info(n.output[0], o.type.tensor_type.elem_type, None)
        for n, o in zip(passed, outputs)])
    rows_exited = [f"{prefix}/rows_exited/{o.name}" for o in outputs]
    nodes.append(helper.make_node("If", [mixed], rows_exited, name=f"{prefix}/if_mixed", then_branch=then,
                                  else_branch=otherwise))
    for output, rank, w, e in zip(outputs, ranks, whole, rows_exited):   # fires [B, 1] as [B, 1, ..., 1]
        rows = f"{prefix}/rows{rank}"
        if all(n.output[0] != rows for n in nodes):
            nodes.append(helper.make_node("Reshape", [fires, f"{rows}.shape"], [rows], name=rows))
        nodes.append(helper.make_node("Where", [rows, e, w], [output.name], name=f"{prefix}/pick/{output.name}"))
    return nodes


def _text_mean(model, x: str, text: str, num_visual_tokens: int, prefix: str) -> None:
    """Nodes computing ``{prefix}/mean [B, C]``: the mean of ``text [B, K + T, C]`` (boundary ``x`` without its visual
    tokens) over its tokens; with an ``attention_mask`` input over those tokens only where it is 1 (the sum over
    them divided by their count, at least 1).

    Raises:
        AttncError: the mask's token axis is not the text's (declared sizes that differ).
    """
    from attnc.compiler.decode import MASK

    axis = f"{prefix}/token_axis"
    mask = next((i for i in model.graph.input if i.name == MASK), None)
    if mask is None:
        model.graph.node.append(helper.make_node("ReduceMean", [text, axis], [f"{prefix}/mean"],
                                                 name=f"{prefix}/mean", keepdims=0))
        return
    dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
            for d in mask.type.tensor_type.shape.dim]
    token = (value_shapes(model).get(x) or [None, None])[1]
    length = token - num_visual_tokens if isinstance(token, int) else _without_visual(token, num_visual_tokens)
    if len(dims) != 2 or (dims[1] is not None and length is not None and dims[1] != length):
        raise AttncError(f"the gate cannot average the text tokens of padded prompts: {MASK} is "
                         f"{dims} where the text tokens (the boundary without its {num_visual_tokens} visual tokens) "
                         f"are [batch, {length}]",
                         f"export with an {MASK} [batch, tokens] over the prompt's text tokens (attnc export CKPT "
                         "--with-attention-mask), or compile with --token-exit static")
    weight, count = f"{prefix}/mask_weight", f"{prefix}/mask_count"
    model.graph.initializer.extend([numpy_helper.from_array(np.array(1, dtype=np.float32), f"{prefix}/one"),
                                    numpy_helper.from_array(np.array([2], dtype=np.int64), f"{prefix}/channel_axis")])
    model.graph.node.extend([
        helper.make_node("Cast", [MASK], [f"{prefix}/mask"], name=f"{prefix}/mask", to=onnx.TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [f"{prefix}/mask", f"{prefix}/channel_axis"], [weight], name=weight),
        helper.make_node("Mul", [text, weight], [f"{prefix}/masked"], name=f"{prefix}/masked"),
        helper.make_node("ReduceSum", [f"{prefix}/masked", axis], [f"{prefix}/sum"], name=f"{prefix}/sum",
                         keepdims=0),
        helper.make_node("ReduceSum", [f"{prefix}/mask", axis], [f"{prefix}/tokens"], name=f"{prefix}/tokens",
                         keepdims=1),
        helper.make_node("Max", [f"{prefix}/tokens", f"{prefix}/one"], [count], name=count),
        helper.make_node("Div", [f"{prefix}/sum", count], [f"{prefix}/mean"], name=f"{prefix}/mean"),
    ])


@on_stand_in_weights
def apply(model: onnx.ModelProto, mode: str, num_visual_tokens: int, *, exit_layer: int | None = None,
          calibration_feeds: list[dict] | None = None, labels: list[np.ndarray] | None = None,
          gate: ExitGate | None = None, max_accuracy_drop: float = 0.01,
          visual_offset: int | tuple[int, ...] = 0) -> tuple[onnx.ModelProto, TokenExitReport]:
    """What ``attnc compile --token-exit static|dynamic`` runs (``visual_offset``: the text tokens in front of the
    image; one per image of several).

    ``static``: ``exit_layer``, or the one :func:`choose_exit_layer` picks on
    ``calibration_feeds`` (required then). ``dynamic``: a trained :class:`ExitGate`
    (:func:`train_exit_gate` needs the torch model, so the CLI must load one).
    """
    if _takes_cache(model) and mode == "dynamic":
        raise AttncError("a later generation step has no gate of its own: the first step's gate decides, and the "
                         "caches it returns say which step reads them",
                         "compile the later steps twice, as they are and with --token-exit static --exit-layer K (the "
                         "gate's layer), and pass both to generate_vision_language (step=, exit_step=)")
    if _gives_cache(model) and mode == "static" and exit_layer is None:
        raise AttncError("a generation graph's token exit needs its exit layer",
                         "compile the first step and the later steps with --token-exit static --exit-layer K, the "
                         "same K: the later steps read caches whose lengths the first step's exit fixed")
    if _gives_cache(model) and mode == "dynamic" and gate is not None and gate.layer == 0:
        raise AttncError("the gate sits before decoder layer 0", _CACHED_FIX)
    if mode == "static":
        if exit_layer is None:
            if not calibration_feeds:
                raise AttncError("static token exit needs an exit layer or calibration data to choose one",
                                 "pass --exit-layer K or calibration inputs")
            exit_layer = choose_exit_layer(model, calibration_feeds, num_visual_tokens, labels=labels,
                                           max_accuracy_drop=max_accuracy_drop, visual_offset=visual_offset).exit_layer
        return apply_static_token_exit(model, exit_layer, num_visual_tokens, visual_offset)
    if mode == "dynamic":
        if gate is None:
            raise AttncError("dynamic token exit needs a trained gate",
                             "train one with attnc.passes.token_exit.train_exit_gate on the PyTorch model")
        return apply_dynamic_token_exit(model, gate, num_visual_tokens, visual_offset)
    raise AttncError(f"unknown token-exit mode {mode!r}", "use static or dynamic")
