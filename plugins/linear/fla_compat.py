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

Translated (fla layout ``[B, T, H, D]``; checked against fla 0.x installed here):

- ``chunk_linear_attn`` / ``fused_chunk_linear_attn(q, k, v, scale=None, initial_state=None,
  output_final_state=False, normalize=True, cu_seqlens=None)`` and
  ``fused_recurrent_linear_attn`` (same, plus ``reverse=False``; what ``fla.layers.LinearAttention``
  calls under ``no_grad`` for T ≤ 64): identity feature map (fla's layers apply theirs before),
  causal, scale default ``D^-0.5``, normaliser ``(q·scale)·cumsum(k) + 1e-10``
  (``fla.ops.linear_attn.utils.normalize_with_z_state``);
- ``chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, ...)``: causal,
  no normaliser, per-head decay ``λ_h = exp(-(8/H)(1 - layer_idx/num_layers)·h)``
  (fla's ``g_gamma``), scale default ``D^-0.5``.

Calls with ``initial_state``, ``output_final_state=True`` or ``cu_seqlens`` are not
translated: they raise ``NotImplementedError`` naming the argument (the fused op has no
recurrent state input/output).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from attnc.plugins import linear as plugin

_OP = "attnc::kernel_linear_attention"
_FLA_EPS = 1e-10


@torch.library.custom_op(_OP, mutates_args=())
def kernel_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: torch.Tensor | None,
                            feature_map: str, causal: int, normalize: int, eps: float,
                            scale: float) -> torch.Tensor:
    """``attnc.plugins.linear.reference`` as a torch op (``[B, H, N, D]`` layout)."""
    return plugin.reference(q, k, v, decay, feature_map=feature_map, causal=causal, normalize=normalize,
                            eps=eps, scale=scale).contiguous()


@kernel_linear_attention.register_fake
def _(q, k, v, decay, feature_map, causal, normalize, eps, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _torchscript_symbolic(g, q, k, v, decay, feature_map, causal, normalize, eps, scale):
    from torch.onnx import symbolic_helper as sh

    inputs = [q, k, v] + ([] if sh._is_none(decay) else [decay])
    return g.op("attnc::KernelLinearAttention", *inputs,
                feature_map_s=sh._maybe_get_const(feature_map, "s"), causal_i=sh._maybe_get_const(causal, "i"),
                normalize_i=sh._maybe_get_const(normalize, "i"), eps_f=sh._maybe_get_const(eps, "f"),
                scale_f=sh._maybe_get_const(scale, "f"))


def fused_linear_attention(q, k, v, decay=None, *, feature_map="identity", causal=1, normalize=0,
                           eps=1e-6, scale=1.0) -> torch.Tensor:
    """One KernelLinearAttention on ``[B, H, N, D]`` tensors, exportable by both exporters."""
    attrs = dict(feature_map=feature_map, causal=int(causal), normalize=int(normalize), eps=float(eps),
                 scale=float(scale))
    if torch.onnx.is_in_onnx_export() and not torch.jit.is_tracing():
        inputs = [q, k, v] + ([decay] if decay is not None else [])
        return torch.onnx.ops.symbolic("attnc::KernelLinearAttention", inputs, attrs, dtype=q.dtype,
                                       shape=(*q.shape[:-1], v.shape[-1]), version=1)
    return kernel_linear_attention(q, k, v, decay, **attrs)


def _unsupported(initial_state, output_final_state, cu_seqlens, kwargs=None):
    for name, value in (("initial_state", initial_state), ("cu_seqlens", cu_seqlens)):
        if value is not None:
            raise NotImplementedError(f"attnc's fla translation does not support {name}")
    if output_final_state:
        raise NotImplementedError("attnc's fla translation does not support output_final_state=True")
    if kwargs:
        raise NotImplementedError(f"attnc's fla translation does not support {sorted(kwargs)}")


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """Drop-in for ``fla.ops.linear_attn.chunk_linear_attn`` (``[B, T, H, D]``)."""
    _unsupported(initial_state, output_final_state, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o = fused_linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), feature_map="identity",
                               causal=1, normalize=int(normalize), eps=_FLA_EPS, scale=scale)
    return o.transpose(1, 2), None


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
    """Drop-in for ``fla.ops.lightning_attn.chunk_lightning_attn`` (``[B, T, H, D]``)."""
    kwargs.pop("chunk_size", None)  # a kernel tuning knob, no effect on the result
    _unsupported(initial_state, output_final_state, cu_seqlens, kwargs)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    decay = lightning_decay(q.shape[2], layer_idx, num_layers).to(q.device)
    o = fused_linear_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), decay,
                               feature_map="identity", causal=1, normalize=0, eps=0.0, scale=scale)
    return o.transpose(1, 2), None


_REPLACEMENTS = {
    ("fla.ops.linear_attn", "chunk_linear_attn"): chunk_linear_attn,
    ("fla.ops.linear_attn", "fused_chunk_linear_attn"): fused_chunk_linear_attn,
    ("fla.ops.linear_attn", "fused_recurrent_linear_attn"): fused_recurrent_linear_attn,
    ("fla.ops.lightning_attn", "chunk_lightning_attn"): chunk_lightning_attn,
}


@contextlib.contextmanager
def translate_fla(opset: int = 9) -> Iterator[None]:
    """Within the block, fla's chunked linear/lightning attention export as attnc nodes.

    Does nothing when fla is not installed. Restores every patched name on exit.
    """
    try:
        import importlib

        originals = {}
        for (module_name, attr), _ in _REPLACEMENTS.items():
            module = importlib.import_module(module_name)
            originals[(module_name, attr)] = getattr(module, attr)
    except ImportError:
        yield
        return
    patched: list[tuple[object, str, object]] = []
    for key, replacement in _REPLACEMENTS.items():
        original = originals[key]
        for module in list(sys.modules.values()):
            name = getattr(module, "__name__", "") or ""
            if not name.startswith("fla"):
                continue
            for attr, value in list(vars(module).items()):
                if value is original:
                    patched.append((module, attr, value))
                    setattr(module, attr, replacement)
    torch.onnx.register_custom_op_symbolic(_OP, _torchscript_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(_OP, opset)
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
