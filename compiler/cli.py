"""The ``attnc`` command line: export, inspect, compile, validate, report.

Every command turns an :class:`AttncError` into one line on stderr and exit code 2
(validation failures exit 1), so scripts and CI can gate on the result.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from attnc import __version__
from attnc.compiler.errors import AttncError

console = Console()
err_console = Console(stderr=True)


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AttncError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
    return wrapper


def parse_shape(text: str) -> tuple[str | None, tuple[int, ...], str]:
    """``[name:]2x3x224x224[:dtype]`` -> (name or None, shape, dtype)."""
    parts = text.split(":")
    dtype = "float32"
    if len(parts) > 1 and not parts[-1].replace("x", "").isdigit():
        dtype = parts.pop()
    name = parts[0] if len(parts) == 2 else None
    dims = parts[-1]
    try:
        shape = tuple(int(d) for d in dims.split("x"))
        if len(parts) > 2 or any(d <= 0 for d in shape):
            raise ValueError
    except ValueError:
        raise AttncError(f"cannot read input shape {text!r}",
                         "write it as NAME:2x3x224x224 (optionally :int64), dims > 0") from None
    return name, shape, dtype


def parse_dynamic(items: tuple[str, ...]) -> dict[str, dict[int, str]] | None:
    """``NAME:AXIS=SYMBOL`` items -> export dynamic_axes."""
    axes: dict[str, dict[int, str]] = {}
    for item in items:
        try:
            name, rest = item.split(":")
            axis, symbol = rest.split("=")
            axes.setdefault(name, {})[int(axis)] = symbol
        except ValueError:
            raise AttncError(f"cannot read dynamic axis {item!r}", "write it as NAME:AXIS=SYMBOL, e.g. x:0=batch") from None
    return axes or None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="attnc")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(verbose: bool) -> None:
    """attnc: compile transformers with non-standard attention to fused, validated engines.

    \b
    Typical flow:
      attnc export vit-agent-small -o model.onnx      # PyTorch -> ONNX
      attnc inspect model.onnx                        # what attention attnc finds
      attnc compile model.onnx -o out/                # passes + backend build
      attnc validate out/ --model vit-agent-small     # compare with PyTorch, write report
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@cli.command("models")
@_handle_errors
def models_cmd() -> None:
    """List the bundled reference models (usable wherever a MODEL is asked for).

    MODEL may also be MODULE:FACTORY or a local Hugging Face checkpoint directory
    (config.json and model.safetensors, as save_pretrained writes them).
    """
    from attnc.models import registry

    table = Table("name", "family", "inputs", title="bundled models")
    for name, spec in registry.SPECS.items():
        shapes = ", ".join("x".join(map(str, t.shape)) for t in spec.example_inputs())
        table.add_row(name, spec.family, shapes)
    console.print(table)
    console.print("MODEL may also be MODULE:FACTORY or a Hugging Face checkpoint directory "
                  "(config.json + model.safetensors).")


_QWEN_DEFAULT = 448   # attnc.models.hf_qwen_vl.DEFAULT_SIZE, without importing torch for --help


def _image_size(value: str | None) -> tuple[int, int] | None:
    """``--image-size``: ``HxW`` (or ``S`` for a square) in pixels."""
    if value is None:
        return None
    parts = value.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise click.BadParameter(f"{value!r} is no image size: give HxW in pixels, e.g. 448x448")
    height, width = (int(parts[0]), int(parts[-1]))
    return height, width


def _offsets(value: str | None) -> tuple[int, ...] | None:
    """``--text-before-image``: ``"5"`` (one image after 5 text tokens) or ``"5,9"`` (one per image)."""
    if value is None:
        return None
    from attnc.compiler.layout import parse_offsets

    try:
        return parse_offsets(value)
    except AttncError as exc:
        raise click.BadParameter(exc.problem) from None


def _vision_language_layout(model_ref: str, text_before_image: tuple[int, ...] | None,
                            image_size: tuple[int, int] | None, video_frames: int | None = None,
                            video_fps: float | None = None):
    """MODEL resolved, its image after ``--text-before-image`` tokens, a video of ``--video-frames`` frames (sampled at
    ``--video-fps``) in its place and of ``--image-size`` where given."""
    from attnc.compiler.export import resolve_model

    module, spec = resolve_model(model_ref)
    # the size first (Mistral 3's rows follow it), then the offsets, then the clip (Qwen3-VL's takes one per slice)
    if image_size is not None:
        from attnc.models.hf_checkpoint import with_image_size

        module, spec = with_image_size(module, spec, image_size)
    if text_before_image is not None:
        from attnc.models.hf_checkpoint import with_text_before_image

        module, spec = with_text_before_image(module, spec, text_before_image)
    if video_fps is not None and video_frames is None:
        raise AttncError("--video-fps is the rate a clip's frames were sampled at, and no clip is asked for",
                         "pass --video-frames F with it, or drop it")
    if video_frames is not None:
        from attnc.models.hf_checkpoint import with_video_frames

        module, spec = with_video_frames(module, spec, video_frames, video_fps)
    return module, spec


@cli.command("export")
@click.argument("model_ref", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the .onnx file.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Example input, in forward()'s order: [NAME:]2x3x224x224[:int64]. "
                   "Defaults to the bundled model's (or checkpoint config's) example inputs.")
@click.option("--dynamic", multiple=True, help="Dynamic axis NAME:AXIS=SYMBOL, e.g. x:0=batch (repeatable).")
@click.option("--static", is_flag=True, help="Ignore the bundled model's dynamic axes.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript", "auto"]), default="dynamo",
              show_default=True, help="auto: dynamo, then TorchScript if dynamo fails.")
@click.option("--opset", type=int, default=18, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--int-high", type=click.IntRange(min=1), default=100, show_default=True,
              help="Random integer inputs (token ids) are drawn from [0, INT_HIGH): at most the vocabulary size.")
@click.option("--with-attention-mask", "attention_mask", is_flag=True,
              help="Text checkpoints: take attention_mask [batch, seq] (1 = token, 0 = padding) after input_ids, "
                   "for padded batches; its example rows are padded (decoder-only models on the left). "
                   "validate feeds it too. Encoder-decoder text checkpoints (T5, BART): (input_ids, "
                   "attention_mask, decoder_input_ids), sources padded on the right; with --first-step the "
                   "first step takes it, with --with-past the later steps take it as encoder_attention_mask. "
                   "Vision-language checkpoints: (pixel_values, input_ids, attention_mask), each prompt padded after "
                   "the --text-before-image tokens.")
@click.option("--with-past", "past", is_flag=True,
              help="Decoder-only text checkpoints: export one generation step with its KV cache, (input_ids, "
                   "attention_mask, past_key_values.N.key/value) -> (logits, present.N.key/value); the prompt's "
                   "step takes a cache of length 0. attnc.runtime.generate decodes with the compiled step. "
                   "Encoder-decoder checkpoints: the decoder's later steps, which take the first step's "
                   "cross_key_values.N.key/value too (see --first-step). Vision-language checkpoints: the language "
                   "model's later steps on the text alone (see --first-step).")
@click.option("--first-step", "first_step", is_flag=True,
              help="Encoder-decoder checkpoints: the first generation step, (main input, decoder_input_ids) -> "
                   "(logits, present.N.key/value, cross_key_values.N.key/value); with the --with-past graph, "
                   "attnc.runtime.generate_seq2seq decodes. Vision-language checkpoints: (pixel_values, input_ids) -> "
                   "(logits, present.N.key/value), the image in the cache; attnc.runtime.generate_vision_language "
                   "decodes with the --with-past graph.")
@click.option("--text-before-image", callback=lambda ctx, param, value: _offsets(value), default=None,
              metavar="N[,N...]",
              help="Vision-language checkpoints: the image's tokens go after the first N text tokens of input_ids "
                   "(a chat template's text in front of the image, e.g. LLaVA-1.5's 'USER:'); default 0. Several "
                   "images per prompt: one N per image, e.g. 5,9 (pixel_values [batch, images, C, H, W], images "
                   "of one size). The export records them: --token-exit and validate take them.")
@click.option("--image-size", callback=lambda ctx, param, value: _image_size(value), default=None, metavar="HxW",
              help="Vision-language checkpoints whose visual tokens follow the image's size (Qwen2-VL, Qwen2.5-VL, "
                   "Qwen3-VL, GLM-4V): "
                   "the size of the images the export takes, resized and normalised as the processor does "
                   f"(default {_QWEN_DEFAULT}x{_QWEN_DEFAULT}). LLaVA-NeXT, LLaVA-OneVision: the size of the "
                   "original images, whose tiles the processor cuts (pixel_values [batch, tiles, 3, S, S]; default "
                   "one tile's size). "
                   "Others take their config's image_size.")
@click.option("--video-frames", type=click.IntRange(min=1), default=None, metavar="F",
              help="Vision-language checkpoints that read video (LLaVA-OneVision, LLaVA-NeXT-Video, the Qwen family, "
                   "GLM-4V): "
                   "a clip of F frames in place of the image, pixel_values_videos [batch, F, 3, H, W] as their video "
                   "processors give it before patches are cut (LLaVA's at the vision tower's size, Qwen's at "
                   "--image-size; Qwen3-VL's and GLM-4V's slices of 2 frames each after its own offset in "
                   "--text-before-image). "
                   "The export records F: validate takes it.")
@click.option("--video-fps", type=click.FloatRange(min=0, min_open=True), default=None, metavar="FPS",
              help="Qwen2.5-VL's clips: the rate the frames were sampled at (its video processor's fps, default 2), "
                   "which spaces the slices' positions in time. The export records it.")
@_handle_errors
def export_cmd(model_ref, output, input_shapes, dynamic, static, exporter, opset, seed, int_high,
               attention_mask, past, first_step, text_before_image, image_size, video_frames, video_fps) -> None:
    """Export MODEL (a bundled model name, a Hugging Face checkpoint directory or MODULE:FACTORY) to ONNX."""
    import torch

    from attnc.compiler.export import export_onnx

    module, spec = _vision_language_layout(model_ref, text_before_image, image_size, video_frames, video_fps)
    if past and first_step:
        raise AttncError("--with-past and --first-step export two graphs of one model",
                         "export each to its own file, one with each option")
    if attention_mask:   # before the steps: built on the masked variant, an encoder-decoder model's take the mask
        from attnc.models.hf_checkpoint import MASK, with_attention_mask

        module, spec = with_attention_mask(module, spec)
        names = [name for name in spec.input_names if name != MASK]
        if len(input_shapes) > len(names):
            shapes = f"{names[0]}' shape" if len(names) == 1 else f"the shapes of {' and '.join(names)}"
            raise AttncError(f"with --with-attention-mask, --input-shape gives {shapes} only",
                             "drop the attention_mask shape; the mask is built from input_ids' shape, padded")
    if first_step:
        from attnc.models.hf_checkpoint import with_first_step

        module, spec = with_first_step(module, spec)
    elif past:
        from attnc.models.hf_checkpoint import with_past

        module, spec = with_past(module, spec)
        if input_shapes:
            raise AttncError("--with-past builds its example inputs itself (3 new tokens after 5 cached ones)",
                             "drop --input-shape; the exported step is dynamic in batch, tokens and cache length")
    if input_shapes:
        inputs = []
        gen = torch.Generator().manual_seed(seed)
        for text in input_shapes:
            _, shape, dtype = parse_shape(text)
            if dtype.startswith("int"):
                inputs.append(torch.randint(0, int_high, shape, generator=gen, dtype=getattr(torch, dtype)))
            else:
                inputs.append(torch.randn(shape, generator=gen, dtype=getattr(torch, dtype)))
        if attention_mask:
            inputs.insert(spec.input_names.index(MASK), spec.mask_for(inputs[0]))
    elif spec is not None:
        inputs = list(spec.example_inputs(seed=seed))
    else:
        raise AttncError(f"{model_ref} is not a bundled model, so its inputs are unknown",
                         "pass --input-shape for each forward() argument")
    axes = parse_dynamic(dynamic)
    if axes is None and spec is not None and not static:
        axes = spec.dynamic_axes or None
    names = list(spec.input_names) if spec is not None and getattr(spec, "input_names", None) else None
    outputs = list(getattr(spec, "outputs", None) or []) or None   # a checkpoint's cached step names its outputs
    with console.status(f"exporting with the {exporter} exporter"):
        path = export_onnx(module, inputs, output, exporter=exporter, opset=opset,
                           dynamic_axes=axes, input_names=names, output_names=outputs)
    console.print(f"wrote [bold]{path}[/]")


@cli.command("inspect")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--lower", "lower", multiple=True, type=click.Choice(["agent", "linear", "auto"]),
              help="As for compile: preview lowerings; auto shows the route each agent attention would "
                   "take in a TensorRT build, and why.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default=None,
              help="The engine precision --lower auto decides for (default: the model's dtype).")
@click.option("--opt-shape", "opt_shapes", multiple=True, metavar="NAME:1x3x224x224",
              help="The shape --lower auto decides dynamic inputs at, as compile's TensorRT --opt-shape.")
@click.option("--dim-range", "dim_ranges", multiple=True, metavar="NAME=MIN:OPT:MAX",
              help="As compile's: the OPT size of a named dim --lower auto decides the inputs not given "
                   "--opt-shape at.")
@click.option("--heads", "show_heads", is_flag=True,
              help="Also list the attention layers --prune-heads can prune (heads, K/V heads, head dims) and why "
                   "the others cannot.")
@_handle_errors
def inspect_cmd(model_path, as_json, lower, precision, opt_shapes, dim_ranges, show_heads) -> None:
    """List the attention subgraphs attnc finds in an ONNX model, near-misses and op counts."""
    from attnc import passes
    from attnc.compiler import onnx_io
    from attnc.compiler.backends import tensorrt
    from attnc.passes.core import value_shapes

    model = onnx_io.load_model(model_path)
    passes.fold_static_shapes(model)   # as compile does: the passes then see the shapes compile's see
    at = tensorrt.profile_opt_shapes(model, opt_shapes=list(opt_shapes), dim_ranges=list(dim_ranges)) \
        if opt_shapes or dim_ranges else None
    reports = passes.find_attention(model, lower=list(lower), precision=precision, input_shapes=at)
    shapes = value_shapes(model)
    for match in (m for r in reports for m in r.matches):
        for role, tensor in match.inputs.items():
            if not match.shapes.get(role):
                match.shapes[role] = shapes.get(tensor)
    data = {
        "model": str(model_path),
        "opset": onnx_io.default_opset(model),
        "nodes": len(model.graph.node),
        "ops": onnx_io.op_counts(model),
        "families_checked": [r.family for r in reports],
        "matches": [m.to_dict() for r in reports for m in r.matches],
        "near_misses": [n.to_dict() for r in reports for n in r.near_misses],
    }
    if show_heads:
        data["heads"] = _prunable_heads(model)
    data["recorded"] = {p.key: p.value for p in model.metadata_props if p.key.startswith("attnc.")}
    if onnx_io.VISUAL_TOKENS in data["recorded"]:
        from attnc.passes.token_exit import decoder_boundaries

        try:
            data["decoder_layers"] = len(decoder_boundaries(model))
        except AttncError as exc:
            data["decoder_layers"] = None
            data["token_exit_problem"] = exc.problem
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console.print(f"[bold]{model_path}[/]: opset {data['opset']}, {data['nodes']} nodes")
    if onnx_io.VISUAL_TOKENS in data["recorded"]:
        layers = (f"{data['decoder_layers']} decoder layers (--exit-layer 0..{data['decoder_layers']})"
                  if data["decoder_layers"] is not None else f"no decoder layers found: {data['token_exit_problem']}")
        size = data["recorded"].get(onnx_io.IMAGE_SIZE)
        offsets = data["recorded"].get(onnx_io.VISUAL_OFFSET, "0")
        runs = len(offsets.split(","))
        starts = data["recorded"].get(onnx_io.IMAGE_OFFSETS)   # Mistral 3: each image's rows are runs of their own
        images = runs if starts is None else len(starts.split(","))
        frames = data["recorded"].get(onnx_io.VIDEO_FRAMES)
        noun = f"{size} image" if size else "image"
        of = (f"of a {noun} " if size else "") if images == 1 else f"of {images} {noun}s "
        if starts is not None:
            of += f"in {runs // images} rows each "
        if frames:
            fps = data["recorded"].get(onnx_io.VIDEO_FPS)
            of = f"of a video of {frames} {size} frames " + ("" if fps is None else f"at {float(fps):g} a second ") \
                + ("" if images == 1 else f"in {images} slices each ")
        console.print(f"vision-language: {data['recorded'][onnx_io.VISUAL_TOKENS]} visual tokens {of}after "
                      f"{offsets} text tokens (recorded by attnc export); token exit: {escape(layers)}")
    table = Table("family", "fused op", "nodes", "inputs", "attributes", title="attention subgraphs")
    for m in data["matches"]:
        table.add_row(m["family"], m["op_type"], str(len(m["nodes"])),
                      escape(", ".join(f"{k}={_dims(m['shapes'].get(k))}" for k in m["inputs"])),
                      escape(", ".join(f"{k}={v}" for k, v in m["attributes"].items())))
    console.print(table if data["matches"] else "no attention subgraphs found")
    routed = [m for m in data["matches"] if m["route"]]
    if routed:
        routes = Table("family", "at node", "route", "why", title="routes (--lower auto)")
        for m in routed:
            routes.add_row(m["family"], escape(m["nodes"][0]), f"{m['route']['route']} ({m['route']['source']})",
                           escape(m["route"]["reason"]))
        console.print(routes)
    if data["near_misses"]:
        near = Table("family", "at node", "why not", title="near-misses (left unchanged)")
        for n in data["near_misses"]:
            near.add_row(n["family"], escape(n["anchor"]), escape(n["reason"]))
        console.print(near)
    if show_heads:
        heads = Table("layer", "at node", "core", "heads", "K/V heads", "head dim", "value dim",
                      title="attention layers --prune-heads can prune")
        for layer in data["heads"]["layers"]:
            heads.add_row(str(layer["index"]), escape(layer["anchor"]), escape(layer["core"]), str(layer["heads"]),
                          str(layer["kv_heads"]), str(layer["head_dim"]), str(layer["value_dim"]))
        console.print(heads if data["heads"]["layers"] else "no attention layer head pruning can prune")
        if data["heads"]["not_prunable"]:
            refused = Table("why not", title="attention head pruning leaves alone")
            for reason in data["heads"]["not_prunable"]:
                refused.add_row(escape(reason))
            console.print(refused)
    ops = Table("op", "count", title="op counts")
    for op, count in data["ops"].items():
        ops.add_row(op, str(count))
    console.print(ops)


def _prunable_heads(model) -> dict:
    """``inspect --heads``: the layers head pruning finds, and why it leaves each other attention alone."""
    from attnc.passes.prune_heads import survey_attention_layers

    layers, misses = survey_attention_layers(model)
    return {"layers": [{"index": l.index, "anchor": l.anchor, "core": l.core, "heads": l.heads,
                        "kv_heads": l.kv_heads, "head_dim": l.head_dim, "value_dim": l.value_dim} for l in layers],
            "not_prunable": misses}


def _dims(shape) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


@cli.command("compile")
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory (replaced only when the compile succeeds).")
@click.option("--backend", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime",
              show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True)
@click.option("--family", "families", multiple=True,
              help="Only run these fusion passes (repeatable); default: all.")
@click.option("--no-fuse", is_flag=True, help="Skip the fusion passes.")
@click.option("--lower", "lower", multiple=True, type=click.Choice(["agent", "linear", "auto", "none"]),
              help="Emit standard ONNX ops for this family instead of an attnc node (repeatable): agent "
                   "attention as two Attention nodes, lightning attention as LinearAttention; TensorRT "
                   "then runs native layers, no plugin. auto: each agent attention takes whichever of its "
                   "plugin and two Attention layers wins for its shape class (the default for TensorRT "
                   "plugins); none: lower nothing.")
@click.option("--prune-heads", metavar="RATIO|COUNT",
              help="Prune attention heads: a ratio in (0, 1) (0.25) or a number of heads (4).")
@click.option("--prune-method", type=click.Choice(["activation", "weight"]), default="activation",
              show_default=True, help="How heads are scored (gradient scores: Python API).")
@click.option("--prune-granularity", type=click.Choice(["group", "query"]), default="group", show_default=True,
              help="Grouped-query attention: prune whole K/V groups (a K/V head with its query heads), or the "
                   "same number of query heads inside every group, keeping all K/V heads (query; the only way "
                   "to prune a multi-query model).")
@click.option("--prune-keep", metavar="PLAN",
              help="Prune the heads another compile's --prune-heads kept (instead of --prune-heads): its output "
                   "directory or manifest.json, or JSON {layer: [heads]}. Layers are found by their weights, so a "
                   "plain export's plan prunes its --with-past step alike, KV cache included.")
@click.option("--calibration", type=click.Path(dir_okay=False),
              help="Calibration inputs (.npz keyed by input name) for head scores / the exit layer.")
@click.option("--token-exit", type=click.Choice(["static", "dynamic"]),
              help="Drop all visual tokens of a vision-language model after a layer (DyVTE).")
@click.option("--visual-tokens", type=int,
              help="Number of visual tokens the image became (token exit; default: the number attnc export "
                   "recorded in the model).")
@click.option("--text-before-image", "visual_offset", callback=lambda ctx, param, value: _offsets(value),
              metavar="N[,N...]",
              help="Token exit: text tokens in front of the visual tokens, one N per image (default: what attnc "
                   "export recorded, else 0).")
@click.option("--exit-layer", type=int, help="Static token exit: the decoder layer (default: chosen on --calibration).")
@click.option("--exit-gate", type=click.Path(dir_okay=False),
              help="Dynamic token exit: a gate saved with ExitGate.save.")
@click.option("--min-shape", "min_shapes", multiple=True, metavar="NAME:1x3x224x224",
              help="TensorRT profile: smallest shape of a dynamic input (repeatable).")
@click.option("--opt-shape", "opt_shapes", multiple=True, metavar="NAME:1x3x224x224",
              help="TensorRT profile: shape to tune for (repeatable).")
@click.option("--max-shape", "max_shapes", multiple=True, metavar="NAME:1x3x224x224",
              help="TensorRT profile: largest shape (repeatable).")
@click.option("--dim-range", "dim_ranges", multiple=True, metavar="NAME=MIN:OPT:MAX",
              help="TensorRT profile by named dim (repeatable): every input no --*-shape names takes its shapes "
                   "from these, a dim named 'past + 18 + seq' the sum, e.g. --dim-range batch=1:2:4 --dim-range "
                   "seq=1:1:8 --dim-range past=0:64:512 for a generation step. NAME=SIZE fixes a dim.")
@click.option("--workspace", type=int, metavar="MIB", help="TensorRT workspace memory limit in MiB.")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path),
              help="TensorRT timing cache file, loaded before and saved after the build.")
@click.option("--fused-ops", type=click.Choice(["plugin", "inline"]), default="plugin", show_default=True,
              help="TensorRT: run fused nodes as attnc plugins, or inline their ONNX function bodies.")
@_handle_errors
def compile_cmd(model_path, out_dir, backend, precision, families, no_fuse, lower, prune_heads, prune_method,
                prune_granularity, prune_keep, calibration, token_exit, visual_tokens, visual_offset, exit_layer,
                exit_gate, min_shapes, opt_shapes, max_shapes, dim_ranges, workspace, timing_cache, fused_ops) -> None:
    """Run the pass pipeline on an ONNX model and build a BACKEND artefact in OUT_DIR."""
    from attnc.compiler.pipeline import CompileOptions, compile_model

    backend_options = {}
    if backend == "tensorrt":
        backend_options = {"min_shapes": list(min_shapes), "opt_shapes": list(opt_shapes),
                           "max_shapes": list(max_shapes), "dim_ranges": list(dim_ranges), "fused_ops": fused_ops,
                           "workspace": workspace << 20 if workspace else None, "timing_cache": timing_cache}
    if "none" in lower and len(lower) > 1:
        raise click.UsageError("--lower none cannot be combined with other --lower values")
    options = CompileOptions(backend=backend, precision=precision, fuse=not no_fuse,
                             families=list(families) or None,
                             lower=None if not lower else [f for f in lower if f != "none"],
                             backend_options=backend_options, prune_heads=prune_heads, prune_method=prune_method,
                             prune_granularity=prune_granularity, prune_keep=prune_keep, calibration=calibration,
                             token_exit=token_exit, visual_tokens=visual_tokens, visual_offset=visual_offset,
                             exit_layer=exit_layer, exit_gate=exit_gate)
    with console.status("compiling") as status:
        manifest = compile_model(model_path, out_dir, options, progress=status.update)
    table = Table("family", "rewritten", "near-misses", title="fusion passes")
    for report in manifest["passes"]:
        table.add_row(report["family"], str(report["rewritten"]), str(len(report["near_misses"])))
    if manifest["passes"]:
        console.print(table)
    pruned = manifest["shrink"].get("prune_heads")
    if pruned:
        console.print(f"head pruning: parameters {pruned['params_before']} -> {pruned['params_after']}")
    exited = manifest["shrink"].get("token_exit")
    if exited:
        console.print(f"token exit ({exited['mode']}): visual tokens dropped before decoder layer "
                      f"{exited['exit_layer']} of {exited['decoder_layers']}")
    before, after = sum(manifest["ops_before"].values()), sum(manifest["ops_after"].values())
    console.print(f"nodes {before} -> {after}; wrote [bold]{out_dir / manifest['artefact']}[/] "
                  f"and {out_dir / 'manifest.json'}")


@cli.command("validate")
@click.argument("artefact_dir", type=click.Path(path_type=Path))
@click.option("--model", "model_ref", required=True,
              help="The PyTorch model: bundled name, Hugging Face checkpoint directory or MODULE:FACTORY.")
@click.option("--inputs", "inputs_npz", type=click.Path(dir_okay=False, path_type=Path),
              help="Inputs as a .npz keyed by input name (default: random with --seed).")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Shape of random inputs: NAME:2x3x224x224 (default: the bundled model's or checkpoint's "
                   "example).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--int-high", type=click.IntRange(min=1), default=100, show_default=True,
              help="Random integer inputs (token ids) are drawn from [0, INT_HIGH): at most the vocabulary size.")
@click.option("--atol", type=float, help="Override the precision's absolute tolerance.")
@click.option("--rtol", type=float, help="Override the precision's relative tolerance.")
@click.option("--report-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where report.json/report.html go (default: ARTEFACT_DIR).")
@click.option("--reference", type=click.Choice(["shrunk", "original"]), default="shrunk", show_default=True,
              help="An artefact compiled with --prune-heads/--prune-keep/--token-exit: compare it with the model "
                   "shrunk alike in PyTorch (pruned heads gated to zero, visual tokens dropped), and report what "
                   "shrinking changed beside; or with the unshrunk model.")
@_handle_errors
def validate_cmd(artefact_dir, model_ref, inputs_npz, input_shapes, seed, int_high, atol, rtol, report_dir,
                 reference) -> None:
    """Run a compiled artefact and its PyTorch model on the same inputs; write the accuracy-diff report.

    Exits 1 when any output is outside tolerance.
    """
    from attnc.compiler.pipeline import validate_artefact
    from attnc.compiler.reference import cost_table

    result, paths = validate_artefact(
        artefact_dir, model_ref, inputs_npz=inputs_npz,
        shapes={n: s for n, s, _ in map(parse_shape, input_shapes) if n} or None,
        seed=seed, atol=atol, rtol=rtol, report_dir=report_dir, int_high=int_high, reference=reference)
    console.print(result.summary_table())
    if result.shrink_cost:
        console.print(cost_table(result.shrink_cost))
    console.print(f"report: {paths[0]} and {paths[1]}")
    result.raise_if_failed(str(paths[1]))
    console.print("[bold green]PASS[/]")


@cli.command("train-exit-gate")
@click.argument("model_ref", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the gate (.npz), for compile --token-exit dynamic --exit-gate.")
@click.option("--layer", type=click.IntRange(min=0), required=True,
              help="The decoder layer in front of which the gate decides (and the visual tokens go).")
@click.option("--calibration", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Calibration inputs: a .npz keyed by the model's input names (images and text ids), one sample "
                   "per row.")
@click.option("--text-before-image", callback=lambda ctx, param, value: _offsets(value), default=None,
              metavar="N[,N...]", help="Vision-language checkpoints: as given to attnc export.")
@click.option("--image-size", callback=lambda ctx, param, value: _image_size(value), default=None, metavar="HxW",
              help="Vision-language checkpoints: as given to attnc export.")
@click.option("--video-frames", type=click.IntRange(min=1), default=None, metavar="F",
              help="Vision-language checkpoints: as given to attnc export.")
@click.option("--video-fps", type=click.FloatRange(min=0, min_open=True), default=None, metavar="FPS",
              help="Qwen2.5-VL's clips: as given to attnc export.")
@click.option("--min-precision", type=click.FloatRange(0, 1), default=0.99, show_default=True,
              help="Of the calibration samples the gate lets exit, the share whose answer must stay the full "
                   "model's.")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True)
@_handle_errors
def train_exit_gate_cmd(model_ref, output, layer, calibration, text_before_image, image_size, video_frames,
                        video_fps, min_precision, steps) -> None:
    """Train a DyVTE exit gate for MODEL on calibration inputs (attnc.passes.token_exit.train_exit_gate).

    A sample's label is whether exiting before LAYER keeps the full model's top-1 answer (of the last text
    token); the threshold is the lowest with MIN_PRECISION on the calibration data.
    """
    import numpy as np
    import torch

    from attnc.compiler.backends import TensorSpec
    from attnc.compiler.validate import load_inputs
    from attnc.passes.token_exit import exits_in_torch, train_exit_gate

    module, spec = _vision_language_layout(model_ref, text_before_image, image_size, video_frames, video_fps)
    if spec is None or not exits_in_torch(module) or len(spec.inputs) != 2:
        raise AttncError(f"{model_ref} cannot drop its visual tokens in PyTorch, so no gate can be trained on it",
                         "pass a bundled vision-language model or a vision-language checkpoint directory")
    # read as validate reads inputs: names, ranks, static sizes (the image's) and shared dims (batch) checked
    specs = [TensorSpec(i.name, i.shape, np.dtype(torch.empty(0, dtype=i.dtype).numpy().dtype)) for i in spec.inputs]
    arrays = load_inputs(calibration, specs)
    inputs = tuple(torch.from_numpy(np.ascontiguousarray(arrays[i.name])) for i in spec.inputs)
    with console.status(f"training the exit gate at layer {layer}"):
        gate, stats = train_exit_gate(module, inputs, layer, min_precision=min_precision, steps=steps)
    gate.save(output)
    table = Table("samples", "exit keeps the answer", "gate fires", "precision", "threshold",
                  title=f"exit gate before decoder layer {layer}")
    table.add_row(str(stats["samples"]), f"{stats['exit_keeps_answer']:.1%}", f"{stats['fire_rate']:.1%}",
                  "-" if stats["precision"] is None else f"{stats['precision']:.1%}", f"{stats['threshold']:.4g}")
    console.print(table)
    console.print(f"wrote [bold]{output}[/]")


@cli.command("report")
@click.argument("report_path", type=click.Path(path_type=Path))
@_handle_errors
def report_cmd(report_path) -> None:
    """Summarise an existing report.json (or the report in an artefact directory)."""
    from attnc.compiler.report import load_report

    if report_path.is_dir():
        report_path = report_path / "report.json"
    data = load_report(report_path)
    def number(value, spec: str) -> str:
        return "-" if value is None or isinstance(value, str) else format(value, spec)

    table = Table("output", "pass", "max abs", "max rel", "cosine", "why", title=str(report_path))
    for out in data["outputs"]:
        table.add_row(out["name"], "[green]yes[/]" if out["passed"] else "[red]no[/]",
                      number(out.get("max_abs_error"), ".3g"), number(out.get("max_rel_error"), ".3g"),
                      number(out.get("cosine"), ".8f"), escape("; ".join(out.get("reasons") or [])))
    console.print(table)
    if data.get("shrink_cost"):
        from attnc.compiler.reference import cost_table

        console.print(cost_table(data["shrink_cost"]))
    console.print("[bold green]PASS[/]" if data["passed"] else "[bold red]FAIL[/]")
    if not data["passed"]:
        sys.exit(1)


def main() -> None:
    cli(prog_name="attnc")


if __name__ == "__main__":
    main()
