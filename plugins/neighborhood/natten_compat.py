"""NATTEN-compatible functions that export as ``attnc::NeighborhoodAttention``.

NATTEN (SHI-Labs) has no ONNX export: its ops are CUDA/CPU extension kernels. Models written
against its functional API (NATTEN >= 0.20)::

    natten.functional.na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
                           scale=None, additional_keys=None, additional_values=None, <performance options>)
    natten.functional.na2d(...)   # query/key/value [B, X, Y, heads, D] (heads-last)
    natten.functional.na3d(...)   # [B, X, Y, Z, heads, D]     (also natten.na1d/na2d/na3d)

can call :func:`na1d` / :func:`na2d` / :func:`na3d` here instead (same signatures, positional order
and layout, plus an optional keyword ``rpb``; ``stride`` becomes the op's ``stride`` attribute,
``additional_keys`` raises NotImplementedError, performance options such as ``backend`` are
ignored), or be exported inside
:func:`patch_natten`, which swaps those three into ``natten`` and ``natten.functional`` while
active (when NATTEN is installed). Behaviour:

- eager: the op's reference semantics (``attnc.plugins.neighborhood.reference``; dense, float64
  capable: a correctness path, not a fast one);
- ``torch.onnx.export(dynamo=True)``: ``torch.onnx.ops.symbolic`` emits the node directly;
- TorchScript export: an ``autograd.Function`` whose ``symbolic`` emits the node.

Either way the exported node carries no function body yet (exporters cannot attach one):
:func:`attach_functions` adds it (``attnc.passes.neighborhood.apply`` calls it, so the normal
pipeline handles it). The node works heads-first, so the graph has a Transpose on each side.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Sequence

import torch

from attnc import DOMAIN
from attnc.plugins import neighborhood as plugin


def _per_axis(value, ndim: int) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * ndim
    if len(values) != ndim:
        raise ValueError(f"need {ndim} value(s), got {value!r}")
    return [int(v) for v in values]


class _TracedNeighborhoodAttention(torch.autograd.Function):
    """TorchScript export path: ``symbolic`` emits the attnc node."""

    @staticmethod
    def forward(ctx, q, k, v, rpb, kernel_size, dilation, is_causal, scale, stride):  # noqa: D401
        return plugin.reference(q, k, v, kernel_size, dilation, is_causal, scale, rpb=rpb, stride=stride)

    @staticmethod
    def symbolic(g, q, k, v, rpb, kernel_size, dilation, is_causal, scale, stride):
        inputs = [q, k, v] + ([rpb] if rpb is not None and not _is_none(rpb) else [])
        return g.op(f"{DOMAIN}::{plugin.OP_TYPE}", *inputs, kernel_size_i=list(kernel_size),
                    dilation_i=list(dilation), is_causal_i=list(is_causal), stride_i=list(stride),
                    scale_f=float(scale))


def _is_none(value) -> bool:
    return hasattr(value, "node") and value.node().mustBeNone()


def neighborhood_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size,
                           dilation=1, is_causal=False, scale: float | None = None,
                           rpb: torch.Tensor | None = None, stride=1) -> torch.Tensor:
    """Heads-first NA: ``[B, heads, *grid, D] -> [B, heads, *grid, Dv]`` (the fused op's layout).

    Raises:
        ValueError: a ``stride`` outside ``1..kernel_size``, or one other than 1 with ``rpb``.
    """
    ndim = query.dim() - 3
    ks, ds = _per_axis(kernel_size, ndim), _per_axis(dilation, ndim)
    cs = [int(bool(c)) for c in (is_causal if isinstance(is_causal, (list, tuple)) else [is_causal] * ndim)]
    ss = plugin.strides(_per_axis(stride, ndim), ks, rpb is not None)  # refuse at trace time, not in ORT
    scale = float(scale) if scale else 0.0  # 0 -> 1/sqrt(D) (the op's default; keeps D out of the trace)
    if torch.jit.is_tracing():
        return _TracedNeighborhoodAttention.apply(query, key, value, rpb, ks, ds, cs, scale, ss)
    if torch.onnx.is_in_onnx_export():
        inputs = [query, key, value] + ([rpb] if rpb is not None else [])
        return torch.onnx.ops.symbolic(
            f"{DOMAIN}::{plugin.OP_TYPE}", inputs,
            {"kernel_size": ks, "dilation": ds, "is_causal": cs, "stride": ss, "scale": scale},
            dtype=query.dtype, shape=[*query.shape[:-1], value.shape[-1]], version=1)
    return plugin.reference(query, key, value, ks, ds, cs, scale, rpb=rpb, stride=ss)


# NATTEN's keyword arguments that choose how, not what, it computes: accepted and ignored.
_PERFORMANCE_ARGS = frozenset({
    "attention_kwargs", "backend", "q_tile_size", "kv_tile_size", "q_tile_shape", "kv_tile_shape",
    "backward_q_tile_size", "backward_kv_tile_size", "backward_q_tile_shape", "backward_kv_tile_shape",
    "backward_kv_splits", "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule",
    "torch_compile"})


def _heads_last(fn_ndim: int):
    def na(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None,
           additional_keys=None, additional_values=None, *, rpb=None, **options):
        unknown = sorted(set(options) - _PERFORMANCE_ARGS)
        if unknown:
            raise TypeError(f"na{fn_ndim}d() got unexpected keyword argument(s) {unknown}")
        if additional_keys is not None or additional_values is not None:
            raise NotImplementedError(
                "attnc's NATTEN translation does not support additional_keys/additional_values (neighborhood "
                "cross-attention); merge that attention outside the na call")
        if query.dim() != fn_ndim + 3:
            raise ValueError(f"na{fn_ndim}d expects [B, *grid({fn_ndim}), heads, D], got {tuple(query.shape)}")
        to_heads_first = [0, fn_ndim + 1, *range(1, fn_ndim + 1), fn_ndim + 2]
        back = [0, *range(2, fn_ndim + 2), 1, fn_ndim + 2]
        out = neighborhood_attention(*(t.permute(to_heads_first) for t in (query, key, value)),
                                     kernel_size, dilation, is_causal, scale, rpb, stride)
        return out.permute(back)

    na.__name__ = na.__qualname__ = f"na{fn_ndim}d"
    na.__doc__ = (f"NATTEN >= 0.20 ``na{fn_ndim}d(query, key, value, kernel_size, stride=1, dilation=1, "
                  f"is_causal=False, scale=None, ...)``: query/key/value ``[B, *grid({fn_ndim}), heads, D]`` -> "
                  f"``[B, *grid, heads, Dv]``, NATTEN's positional order. Performance options (``backend``, "
                  f"tile shapes, ...) are ignored; ``additional_keys`` raises NotImplementedError; "
                  f"``rpb`` ``[heads, 2k-1, ...]`` (keyword) is an attnc extension.")
    return na


na1d = _heads_last(1)
na2d = _heads_last(2)
na3d = _heads_last(3)


@contextlib.contextmanager
def patch_natten() -> Iterator[bool]:
    """Swap NATTEN's ``na{1,2,3}d`` for the exportable ones while active: in ``natten.functional``
    and at the package's top level (``natten.na2d``), where NATTEN >= 0.20 exports them too.

    Yields whether NATTEN was patched: only when it has been imported (a model that calls NATTEN
    imported it; importing it only to find it unused would slow every export down).
    """
    if "natten" not in sys.modules:
        yield False
        return
    try:
        modules = [importlib.import_module("natten")]
        modules.append(importlib.import_module("natten.functional"))
    except ImportError:
        yield False
        return
    names = ("na1d", "na2d", "na3d")
    saved = [(module, {name: getattr(module, name, None) for name in names}) for module in modules]
    try:
        for module in modules:
            for name, fn in zip(names, (na1d, na2d, na3d)):
                setattr(module, name, fn)
        yield True
    finally:
        for module, functions in saved:
            for name, fn in functions.items():
                if fn is None:
                    delattr(module, name)
                else:
                    setattr(module, name, fn)


__all__: Sequence[str] = ["na1d", "na2d", "na3d", "neighborhood_attention", "patch_natten"]
