"""Scoring heads: :func:`score_heads` by activation, gradient, ablation or weight norm, and the torch gates
(:func:`head_gates`) the gradient and ablation scores use."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import on_stand_in_weights, ort_session
from attnc.compiler.validate import eval_mode
from attnc.passes.prune_heads.layers import find_attention_layers
from attnc.passes.prune_heads.rewrite import (_check_granularity, kept_cache_feeds, kept_cache_heads,
                                              prune_heads)

log = logging.getLogger(__name__)

METHODS = ("activation", "gradient", "ablation", "weight")


@on_stand_in_weights
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
    pruned, report = prune_heads(onnx_model, keep={i: [int(j) for j in np.flatnonzero(m)] for i, m in masks.items()},
                                 granularity=granularity)
    # a generation step's pruned cache inputs take the kept heads of the calibration caches
    cache = kept_cache_heads(report.to_dict())
    feeds = [kept_cache_feeds(f, cache) for f in calibration_feeds]
    left = _activation_scores(pruned, find_attention_layers(pruned), feeds)
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
    session = ort_session(probe, options)
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
