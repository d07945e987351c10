"""PyTorch -> ONNX: the dynamo exporter by default, the TorchScript exporter as fallback."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import format_offsets, parse_offsets
from attnc.compiler.onnx_io import (FIRST_EXIT_LAYER, IMAGE_OFFSETS, IMAGE_SIZE, VIDEO_FPS, VIDEO_FRAMES,
                                    VISUAL_OFFSET, VISUAL_TOKENS, save_model, set_metadata)
from attnc.compiler.validate import eval_mode, kv_cache_off
from attnc.plugins import attach_function_bodies

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript", "auto")
DEFAULT_OPSET = 18

# Export-time translations: (module, context manager) pairs that, while active, make
# calls into kernel libraries that cannot be exported (NATTEN, flash-linear-attention)
# export straight into attnc nodes. Each one patches only a library that is installed.
TRANSLATIONS = (
    ("attnc.plugins.neighborhood.natten_compat", "patch_natten"),
    ("attnc.plugins.linear.fla_compat", "translate_fla"),
)


@contextlib.contextmanager
def _translations_active() -> Iterator[None]:
    import importlib

    with contextlib.ExitStack() as stack:
        for module, name in TRANSLATIONS:
            stack.enter_context(getattr(importlib.import_module(module), name)())
        yield


def input_names_for(model: torch.nn.Module, n: int) -> list[str]:
    """Names of the first ``n`` positional arguments of ``model.forward``."""
    params = [p.name for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = params[:n]
    return names + [f"input_{i}" for i in range(len(names), n)]


def export_onnx(
    model: torch.nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    path: str | os.PathLike,
    *,
    exporter: str = "dynamo",
    opset: int = DEFAULT_OPSET,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Path:
    """Export ``model`` on ``example_inputs`` to an ONNX file, atomically.

    Args:
        model: the module to export; it runs in eval mode (restored afterwards), and the dynamo
            exporter runs a transformers model without its KV cache (``config.use_cache``, restored).
        example_inputs: one tensor or a sequence of positional tensors.
        path: where the ``.onnx`` file goes.
        exporter: ``"dynamo"`` (torch.export based), ``"torchscript"`` (tracing), or
            ``"auto"`` (dynamo, then torchscript if dynamo fails).
        opset: default-domain ONNX opset.
        dynamic_axes: ``{input_or_output_name: {axis: symbolic_name}}`` for dynamic
            batch/sequence axes.
        input_names / output_names: graph names; default to ``forward``'s argument
            names and ``output`` / ``output_1`` ...

    Returns:
        The path written.

    Raises:
        AttncError: unknown exporter, or both exporters failed.
    """
    if exporter not in EXPORTERS:
        raise AttncError(f"unknown exporter {exporter!r}", f"use one of {', '.join(EXPORTERS)}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    with eval_mode(model, kv_cache=True):
        return _export_eval(model, example_inputs, path, exporter, opset, dynamic_axes, input_names, output_names)


def _export_eval(model, example_inputs, path, exporter, opset, dynamic_axes, input_names, output_names) -> Path:
    input_names = list(input_names or input_names_for(model, len(example_inputs)))
    try:
        with torch.no_grad():
            outputs = model(*example_inputs)
    except Exception as exc:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in example_inputs)
        fix = "pass one --input-shape per forward() argument, in order"
        if isinstance(exc, IndexError) and any(not t.is_floating_point() for t in example_inputs):
            fix += "; integer inputs are token ids: --int-high at most the vocabulary size"
        raise AttncError(f"ONNX export failed: the model's forward fails on inputs of shape {shapes} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", fix) from None
    n_out = len(outputs) if isinstance(outputs, (tuple, list)) else 1
    output_names = list(output_names or (["output"] + [f"output_{i}" for i in range(1, n_out)]))

    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    errors = []
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for name in order:
        # a large model goes through a file with external data, beside the target: its weights stay there (mapped)
        # until they are copied into the target's weights file
        with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as folder:
            try:
                # dynamo: without transformers' KV cache, whose DynamicCache output torch.export cannot return
                with kv_cache_off(model) if name == "dynamo" else contextlib.nullcontext():
                    proto = _export_with(name, model, example_inputs, opset, dynamic_axes, input_names,
                                         output_names, Path(folder))
            except Exception as exc:  # exporters raise a zoo of types
                log.warning("%s exporter failed: %s", name, str(exc).splitlines()[0] if str(exc) else exc)
                errors.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                continue
            proto.producer_name = f"attnc-export[{name}]"
            record_facts(proto, model)
            attach_function_bodies(proto)  # nodes the translations emitted need their bodies
            return save_model(proto, path)   # past 2 GiB with its weights in <name>.data
    others = [f"--exporter {e}" for e in ("dynamo", "torchscript") if e not in order]
    raise AttncError("ONNX export failed: " + "; ".join(errors),
                     f"try {others[0]}, or simplify the model's forward" if others
                     else "simplify the model's forward (the message names the op neither exporter supports)")


def _speed_up_torchlib_registry() -> None:
    """Build the dynamo exporter's op registry once per opset instead of once per export.

    ``torch.onnx.export(dynamo=True)`` rebuilds its registry from torchlib on every call
    (about 2 s of a 3 s export of a small model). The registry is a dict of lists that
    an export only appends to, so a per-call copy of a cached one is equivalent. If
    torch's internals ever change shape, this does nothing and exports stay correct.
    """
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return
    registry_cls = getattr(_registration, "ONNXRegistry", None)
    original = getattr(registry_cls, "from_torchlib", None)
    if original is None or getattr(original, "_attnc_cached", False) or \
            not isinstance(getattr(registry_cls(), "functions", None), dict):
        return
    cache: dict = {}

    def from_torchlib(cls, *args, **kwargs):
        key = (cls, args, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = original.__func__(cls, *args, **kwargs)
        base = cache[key]
        registry = cls()
        registry.__dict__.update(base.__dict__)
        registry.functions = {target: list(metas) for target, metas in base.functions.items()}
        return registry

    from_torchlib._attnc_cached = True
    registry_cls.from_torchlib = classmethod(from_torchlib)


def weight_bytes(model) -> int:
    """Bytes of ``model``'s parameters and buffers (each tensor once)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def record_facts(proto: onnx.ModelProto, model: torch.nn.Module) -> None:
    """Write what the passes cannot read from the graph into its ``metadata_props``: a vision-language model's
    visual tokens (its ``num_visual_tokens``, :data:`attnc.compiler.onnx_io.VISUAL_TOKENS`) and the text tokens in front
    of them (its ``visual_offset``, :data:`attnc.compiler.onnx_io.VISUAL_OFFSET`; ``"5,9"`` for one per image of
    several), which ``attnc compile --token-exit``
    and ``attnc validate`` take, the size of its images (its ``image_size``, :data:`attnc.compiler.onnx_io.
    IMAGE_SIZE`, ``HxW``: a generation step takes no image, but its visual tokens follow the size), the frames of a
    video in its place (its ``video_frames``, :data:`attnc.compiler.onnx_io.VIDEO_FRAMES`; the rate they were sampled
    at where given, ``video_fps``, :data:`attnc.compiler.onnx_io.VIDEO_FPS`) and, where not 0,
    the first decoder layer a token exit may precede (its ``first_exit_layer``, :data:`attnc.compiler.onnx_io.
    FIRST_EXIT_LAYER`: Qwen3-VL adds image features to the first layers' outputs) and each image's ``K`` where its
    tokens lie in several runs (its ``image_offsets``, :data:`attnc.compiler.onnx_io.IMAGE_OFFSETS`: Mistral 3's
    rows)."""
    count = getattr(model, "num_visual_tokens", None)
    if isinstance(count, int) and count > 0:
        set_metadata(proto, VISUAL_TOKENS, str(count))
        set_metadata(proto, VISUAL_OFFSET, format_offsets(parse_offsets(getattr(model, "visual_offset", 0))))
        size = getattr(model, "image_size", None)
        if size is not None:
            set_metadata(proto, IMAGE_SIZE, "x".join(str(int(d)) for d in size))
        frames = getattr(model, "video_frames", None)
        if frames is not None:
            set_metadata(proto, VIDEO_FRAMES, str(frames))
        fps = getattr(model, "video_fps", None)
        if fps is not None:
            set_metadata(proto, VIDEO_FPS, repr(float(fps)))
        starts = getattr(model, "image_offsets", None)
        if starts is not None:   # Mistral 3: each image's rows are runs of their own, after K, K + 1, ...
            set_metadata(proto, IMAGE_OFFSETS, format_offsets(starts))
        first = getattr(model, "first_exit_layer", 0)
        if first:   # Qwen3-VL's deepstack: image features go into the first decoder layers' outputs
            set_metadata(proto, FIRST_EXIT_LAYER, str(first))


def every_input(dynamic_axes: dict | None, input_names: Sequence[str]) -> dict | None:
    """``dynamic_axes`` with an entry for every input, in order (``{}`` for a static one), then the outputs'. The
    dynamo exporter (torch 2.13) pairs its ``dynamic_axes`` with the forward's inputs by position: without the
    entry of a static input in front, a later input's dynamic axes went to it (``{"b": {1: "n"}}`` made ``a``'s
    axis 1 dynamic and ``b``'s static)."""
    if not dynamic_axes:
        return dynamic_axes
    return {**{name: dict(dynamic_axes.get(name, {})) for name in input_names},
            **{name: axes for name, axes in dynamic_axes.items() if name not in input_names}}


def _export_with(exporter, model, inputs, opset, dynamic_axes, input_names, output_names, folder: Path
                 ) -> onnx.ModelProto:
    """The exported model. A model whose weights come near protobuf's 2 GiB is exported into ``folder`` with
    external data (a message past 2 GiB cannot be serialised) and loaded with its weights mapped from there
    (:func:`attnc.compiler.onnx_io.load_model`): ``folder`` must outlive the model's use."""
    from attnc.compiler.onnx_io import LARGE_MODEL_BYTES, load_model

    _speed_up_torchlib_registry()
    large = weight_bytes(model) > LARGE_MODEL_BYTES
    path = folder / "model.onnx"
    with _translations_active(), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(
                model, inputs, dynamo=True, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_axes=every_input(dynamic_axes, input_names), verbose=False,
                optimize=True, external_data=False,
            )
            if not large:
                return program.model_proto
            program.save(str(path), external_data=True)
            del program
            return load_model(path, check=False)
        target = str(path) if large else io.BytesIO()   # torch writes external data only for a str path
        torch.onnx.export(
            model, inputs, target, dynamo=False, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True, external_data=large,
        )
        return load_model(path, check=False) if large else onnx.load_from_string(target.getvalue())


def resolve_model(ref: str):
    """Turn a CLI model reference into ``(module, spec)``.

    ``ref`` is a registry name from ``attnc.models.registry`` (``vit-agent-small``), a local
    Hugging Face checkpoint directory (``config.json`` + weights, see
    :mod:`attnc.models.hf_checkpoint`), or ``package.module:attr`` where ``attr`` is an
    ``nn.Module``, a zero-argument factory returning one, or a registry ``ModelSpec``. ``spec``
    is the ModelSpec when there is one (it knows example inputs and dynamic axes), else ``None``.
    A registry name wins over a directory of the same name.
    """
    import importlib

    from attnc.models import registry

    if ref in registry.SPECS:
        spec = registry.SPECS[ref]
        return spec.factory(), spec
    if Path(ref).expanduser().is_dir():
        from attnc.models.hf_checkpoint import load_checkpoint

        return load_checkpoint(ref)
    if ":" not in ref:
        if "/" in ref or "\\" in ref or ref.startswith((".", "~")) or Path(ref).expanduser().exists():
            raise AttncError(f"{ref} is no directory, registry name or MODULE:FACTORY",
                             "pass a checkpoint directory (config.json + weights), a name from "
                             "`attnc models`, or MODULE:FACTORY")
        spec = registry.get_spec(ref)
        return spec.factory(), spec
    module_name, _, attr = ref.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except ImportError as exc:
        raise AttncError(f"cannot import {module_name!r}: {exc}",
                         "check MODULE:FACTORY and that the module is on PYTHONPATH") from None
    except AttributeError:
        raise AttncError(f"{module_name!r} has no attribute {attr!r}", "check MODULE:FACTORY") from None
    spec = obj if isinstance(obj, registry.ModelSpec) else None
    if spec is None:
        spec = next((s for s in registry.SPECS.values() if s.factory is obj), None)
    if spec is not None:
        return spec.factory(), spec
    module = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(module, torch.nn.Module):
        raise AttncError(f"{ref} gave a {type(module).__name__}, not a torch.nn.Module",
                         "point MODULE:FACTORY at a module or a function returning one")
    return module, None
