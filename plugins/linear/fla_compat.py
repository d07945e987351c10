"""Export-time translation of flash-linear-attention (``fla``) calls into ``attnc::KernelLinearAttention``.

fla's ops are Triton kernels: they neither run on CPU nor export to ONNX. Inside
:func:`translate_fla` the functions below are replaced (in ``fla.ops.*`` and in every
already-imported ``fla`` module that imported them by name, e.g. ``fla.layers``) by
versions that call the custom op ``attnc::kernel_linear_attention`` (``torch.library``;
eager value = ``attnc.plugins.linear.reference``), which exports as one
``attnc::KernelLinearAttention`` node:

- TorchScript exporter: an ONNX symbolic registered for the custom op while the context
  is active (``torch.onnx.register_custom_op_symbolic``);
- dynamo exporter: ``torch.onnx.ops.symbolic`` (the dynamo exporter emits it as the node
  itself; ``attnc.compiler.export.export_onnx`` has no ``custom_translation_table`` hook,
  and this needs none).

The exported node carries no function body yet; ``attnc.passes.linear.apply`` attaches
it (as for every ``KernelLinearAttention`` node it finds), so run the pass (or the
pipeline) before ONNX Runtime.

Translated (fla layout ``[B, T, H, D]``; checked against fla 0.6 installed here):

- ``chunk_linear_attn`` / ``fused_chunk_linear_attn(q, k, v, scale=None, initial_state=None,
  output_final_state=False, normalize=True, cu_seqlens=None)`` and
  ``fused_recurrent_linear_attn`` (same, plus ``reverse=False``; what ``fla.layers.LinearAttention``
  calls under ``no_grad`` for T ≤ 64): identity feature map (fla's layers apply theirs before),
  causal, scale default ``D^-0.5``, normaliser ``(q·scale)·(z0 + cumsum(k)) + 1e-10``
  (``fla.ops.linear_attn.utils.normalize_with_z_state``);
- ``chunk_lightning_attn`` / ``fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers,
  scale=None, ...)``: causal, no normaliser, per-head decay
  ``λ_h = exp(-(8/H)(1 - layer_idx/num_layers)·h)`` (fla's ``g_gamma``), scale default ``D^-0.5``.

Recurrent state (prefill / decode, fla's layers pass their cache's ``recurrent_state`` as
``initial_state`` and store the returned final state): ``initial_state`` becomes the node's
``state`` input and ``output_final_state=True`` its ``state_out`` output, converted between
fla's layouts and attnc's ``[B, H, D, Dv + normalize]`` (float32):

- ``normalize=False``: fla's state ``[B, H, K, V]`` float32 *is* attnc's;
- ``normalize=True``: fla's state is a tuple ``(kv [B, H, K, V], z [B, 1, H, K])``, z being the
  normaliser's running key sum (a plain tensor means kv with z = 0, as in fla, and kv may be
  None). attnc's column ``Dv`` holds z. As fla does, the result's ``z`` is returned even
  with ``output_final_state=False`` (``(None, z)``; computed beside the node as
  ``z0 + Σ_t k_t`` in k's dtype, so an unused z costs nothing after export).

``cu_seqlens`` (variable-length batches), ``reverse=True`` and unknown keyword arguments raise
``NotImplementedError`` naming the argument.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from attnc.plugins import linear as plugin

_OP = "attnc::kernel_linear_attention"
_OP_STATE = "attnc::kernel_linear_attention_state"
_FLA_EPS = 1e-10


@torch.library.custom_op(_OP, mutates_args=())
def kernel_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None,
                            state: torch.Tensor | None, feature_map: str, causal: int, normalize: int, eps: float,
                            scale: float) -> torch.Tensor:
    """``attnc.plugins.linear.reference`` as a torch op (``[B, H, N, D]`` layout)."""
    return plugin.reference(q, k, v, decay, state, feature_map=feature_map, causal=causal, normalize=normalize,
                            eps=eps, scale=scale).contiguous()


@kernel_linear_attention.register_fake
def _(q, k, v, decay, state, feature_map, causal, normalize, eps, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@torch.library.custom_op(_OP_STATE, mutates_args=())
def kernel_linear_attention_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None,
                                  state: torch.Tensor | None, feature_map: str, causal: int, normalize: int,
                                  eps: float, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernel_linear_attention` that also returns ``state_out`` (float32)."""
    o, state_out = plugin.reference(q, k, v, decay, state, feature_map=feature_map, causal=causal,
                                    normalize=normalize, eps=eps, scale=scale, return_state=True)
    return o.contiguous(), state_out.to(torch.float32).contiguous()


@kernel_linear_attention_state.register_fake
def _(q, k, v, decay, state, feature_map, causal, normalize, eps, scale):
    return (q.new_empty((*q.shape[:-1], v.shape[-1])),
            q.new_empty(plugin.state_shape(q.shape, v.shape[-1], normalize), dtype=torch.float32))


def _torchscript_symbolic(g, q, k, v, decay, state, feature_map, causal, normalize, eps, scale, outputs=1):
    from torch.onnx import symbolic_helper as sh

    inputs = [q, k, v, decay, state]
    while len(inputs) > 3 and sh._is_none(inputs[-1]):
        inputs.pop()
    # an absent decay before a present state: the exporter writes the placeholder as ""
    inputs = [sh._optional_input_placeholder_tensor(g) if sh._is_none(t) else t for t in inputs]
    return g.op("attnc::KernelLinearAttention", *inputs,
                feature_map_s=sh._maybe_get_const(feature_map, "s"), causal_i=sh._maybe_get_const(causal, "i"),
                normalize_i=sh._maybe_get_const(normalize, "i"), eps_f=sh._maybe_get_const(eps, "f"),
                scale_f=sh._maybe_get_const(scale, "f"), outputs=outputs)


def _torchscript_symbolic_state(g, *args):
    return _torchscript_symbolic(g, *args, outputs=2)


def fused_linear_attention(q, k, v, decay=None, state=None, *, feature_map="identity", causal=1, normalize=0,
                           eps=1e-6, scale=1.0, return_state=False):
    """One KernelLinearAttention on ``[B, H, N, D]`` tensors, exportable by both exporters.

    Returns:
        O, or ``(O, state_out)`` with ``return_state=True`` (the node's second output).
    """
    attrs = dict(feature_map=feature_map, causal=int(causal), normalize=int(normalize), eps=float(eps),
                 scale=float(scale))
    if (state is not None or return_state) and not causal:
        raise ValueError("state / state_out need causal=1")
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        inputs = [q, k, v, decay, state]
        while len(inputs) > 3 and inputs[-1] is None:
            inputs.pop()
        out_shape = (*q.shape[:-1], v.shape[-1])
        if not return_state:
            return torch.onnx.ops.symbolic("attnc::KernelLinearAttention", inputs, attrs, dtype=q.dtype,
                                           shape=out_shape, version=1)
        o, state_out = torch.onnx.ops.symbolic_multi_out(
            "attnc::KernelLinearAttention", inputs, attrs, dtypes=(q.dtype, torch.float32),
            shapes=(out_shape, tuple(plugin.state_shape(q.shape, v.shape[-1], normalize))), version=1)
        return o, state_out
    if return_state:
        return kernel_linear_attention_state(q, k, v, decay, state, **attrs)
    return kernel_linear_attention(q, k, v, decay, state, **attrs)


def _refuse(cu_seqlens, kwargs=None):
    if cu_seqlens is not None:
        raise NotImplementedError("attnc's fla translation does not support cu_seqlens (variable-length "
                                  "batches): pad the batch instead")
    if kwargs:
        raise NotImplementedError(f"attnc's fla translation does not support {sorted(kwargs)}")


def _float32(t: torch.Tensor) -> torch.Tensor:
    # no-op casts would be traced into the graph as Cast nodes in front of the state input
    return t if t.dtype == torch.float32 else t.float()


def _attnc_state(initial_state, normalize: bool, q, v):
    """fla's ``initial_state`` as attnc's ``state`` ``[B, H, D, Dv + normalize]`` float32, or None;
    and fla's z0 (``[B, 1, H, K]``) when it gave one."""
    if not normalize:
        if isinstance(initial_state, tuple):
            raise TypeError("fla's initial_state is a tensor [B, H, K, V] when normalize=False, got a tuple")
        return (None if initial_state is None else _float32(initial_state)), None
    kv, z = initial_state if isinstance(initial_state, tuple) else (initial_state, None)
    if kv is None and z is None:
        return None, None
    b, _, h, d = q.shape
    kv = q.new_zeros(b, h, d, v.shape[-1], dtype=torch.float32) if kv is None else _float32(kv)
    z_col = q.new_zeros(b, h, d, 1, dtype=torch.float32) if z is None else _float32(z[:, 0].unsqueeze(-1))
    return torch.cat([kv, z_col], dim=-1), z


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """Drop-in for ``fla.ops.linear_attn.chunk_linear_attn`` (``[B, T, H, D]``)."""
    _refuse(cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state, z0 = _attnc_state(initial_state, normalize, q, v)
    result = fused_linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, state,
                                    feature_map="identity", causal=1, normalize=int(normalize), eps=_FLA_EPS,
                                    scale=scale, return_state=bool(output_final_state))
    o, state_out = result if output_final_state else (result, None)
    o = o.transpose(1, 2)
    if not normalize:
        return o, state_out
    # fla returns the normaliser's running sum (z0 + Σ_t k_t, k's dtype) with or without the final state
    z = k.float().sum(dim=1, keepdim=True)
    z = (z if z0 is None else z + z0.float()).to(k.dtype)
    return o, (None if state_out is None else state_out[..., :v.shape[-1]], z)


fused_chunk_linear_attn = chunk_linear_attn


def fused_recurrent_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                                normalize=False, cu_seqlens=None):
    """Drop-in for ``fla.ops.linear_attn.fused_recurrent_linear_attn`` (same semantics, recurrent kernel)."""
    if reverse:
        raise NotImplementedError("attnc's fla translation does not support reverse=True")
    return chunk_linear_attn(q, k, v, scale, initial_state, output_final_state, normalize, cu_seqlens)


def lightning_decay(num_heads: int, layer_idx: int, num_layers: int) -> torch.Tensor:
    """fla's per-head decay λ_h = exp(g_gamma_h) for lightning attention."""
    g_gamma = -(8 / num_heads * (1 - layer_idx / num_layers)) * torch.arange(num_heads, dtype=torch.float)
    return torch.exp(g_gamma)


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None, **kwargs):
    """Drop-in for ``fla.ops.lightning_attn.chunk_lightning_attn`` (``[B, T, H, D]``; state ``[B, H, K, V]``)."""
    kwargs.pop("chunk_size", None)  # a kernel tuning knob, no effect on the result
    _refuse(cu_seqlens, kwargs)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    decay = lightning_decay(q.shape[2], layer_idx, num_layers).to(q.device)
    state = None if initial_state is None else _float32(initial_state)
    result = fused_linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), decay, state,
                                    feature_map="identity", causal=1, normalize=0, eps=0.0, scale=scale,
                                    return_state=bool(output_final_state))
    o, state_out = result if output_final_state else (result, None)
    return o.transpose(1, 2), state_out


def fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                                   output_final_state=False, reverse=False, cu_seqlens=None):
    """Drop-in for ``fla.ops.lightning_attn.fused_recurrent_lightning_attn`` (same semantics)."""
    if reverse:
        raise NotImplementedError("attnc's fla translation does not support reverse=True")
    return chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale, initial_state, output_final_state,
                                cu_seqlens)


_REPLACEMENTS = {
    ("fla.ops.linear_attn", "chunk_linear_attn"): chunk_linear_attn,
    ("fla.ops.linear_attn", "fused_chunk_linear_attn"): fused_chunk_linear_attn,
    ("fla.ops.linear_attn", "fused_recurrent_linear_attn"): fused_recurrent_linear_attn,
    ("fla.ops.lightning_attn", "chunk_lightning_attn"): chunk_lightning_attn,
    ("fla.ops.lightning_attn", "fused_recurrent_lightning_attn"): fused_recurrent_lightning_attn,
}


@contextlib.contextmanager
def translate_fla(opset: int = 9) -> Iterator[None]:
    """Within the block, fla's chunked linear/lightning attention export as attnc nodes, and so do
    calls of the ``attnc::kernel_linear_attention*`` custom ops (TorchScript symbolics registered).

    fla itself is patched only once it has been imported: a model that calls fla imported it (a
    function that imports fla inside ``forward`` is not translated), and importing fla only to find
    it unused cost every export 10-40 s. Restores every patched name on exit.
    """
    patched = _patch_fla() if "fla" in sys.modules else []
    # Nested blocks share one registration: an inner block's exit must not take the outer
    # block's TorchScript symbolics away.
    if _SYMBOLIC_DEPTH.get(opset, 0) == 0:
        torch.onnx.register_custom_op_symbolic(_OP, _torchscript_symbolic, opset)
        torch.onnx.register_custom_op_symbolic(_OP_STATE, _torchscript_symbolic_state, opset)
    _SYMBOLIC_DEPTH[opset] = _SYMBOLIC_DEPTH.get(opset, 0) + 1
    try:
        yield
    finally:
        _SYMBOLIC_DEPTH[opset] -= 1
        if _SYMBOLIC_DEPTH[opset] == 0:
            torch.onnx.unregister_custom_op_symbolic(_OP_STATE, opset)
            torch.onnx.unregister_custom_op_symbolic(_OP, opset)
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)


def _patch_fla() -> list[tuple[object, str, object]]:
    """Point every fla module's name for a replaced op at its translation; ``(module, name,
    original)`` of each name changed."""
    import importlib

    originals = {}
    try:
        for module_name, attr in _REPLACEMENTS:
            original = getattr(importlib.import_module(module_name), attr, None)
            if original is not None:  # an fla release without this op
                originals[(module_name, attr)] = original
    except ImportError:
        return []
    patched = []
    for key, original in originals.items():
        replacement = _REPLACEMENTS[key]
        for module in list(sys.modules.values()):
            name = getattr(module, "__name__", "") or ""
            if not name.startswith("fla"):
                continue
            for attr, value in list(vars(module).items()):
                if value is original:
                    patched.append((module, attr, value))
                    setattr(module, attr, replacement)
    return patched


_SYMBOLIC_DEPTH: dict[int, int] = {}
