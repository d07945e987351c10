"""One compile: load -> fusion passes -> shrink passes -> backend build -> manifest.

Everything is written into a temporary sibling of the output directory and moved
into place at the very end, so a failed compile never leaves a half-built artefact.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

import attnc
from attnc.compiler import onnx_io
from attnc.compiler.backends import get_backend
from attnc.compiler.errors import AttncError
from attnc.compiler.layout import format_offsets, parse_offsets
from attnc import passes

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
MANIFEST = "manifest.json"
FUSED_MODEL = "model.fused.onnx"


@dataclass
class CompileOptions:
    """What ``compile_model`` does; every field has a CLI flag of the same name."""

    backend: str = "onnxruntime"
    precision: str = "fp32"
    fuse: bool = True
    families: list[str] | None = None  # None: every available fusion pass
    # Families lowered to standard ONNX ops (passes.LOWERINGS), "auto" (agent attention picks
    # per node, plugins/agent/routes.py); None: the backend's default (default_lowering).
    lower: list[str] | None = None
    backend_options: dict = field(default_factory=dict)
    # Shrink passes (docs/shrink.md); they run before fusion, on the exported graph.
    prune_heads: str | None = None      # a ratio ("0.25") or a head count ("4")
    prune_method: str = "activation"
    prune_granularity: str = "group"    # grouped-query layers: "group" (whole K/V groups) or "query"
    prune_keep: str | None = None       # the heads another compile kept: its artefact dir / manifest, or JSON
    calibration: str | None = None      # .npz of calibration inputs (one batch), keyed by input name
    token_exit: str | None = None       # "static" or "dynamic"
    visual_tokens: int | None = None
    # text tokens in front of the visual ones, one per image (None: as the export recorded)
    visual_offset: int | tuple[int, ...] | None = None
    exit_layer: int | None = None       # static: None lets calibration choose
    exit_gate: str | None = None        # dynamic: .npz written by ExitGate.save


def compile_model(model_path: str | os.PathLike, out_dir: str | os.PathLike,
                  options: CompileOptions | None = None,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Compile the ONNX model at ``model_path`` into ``out_dir``; return the manifest.

    ``out_dir`` ends up holding ``model.fused.onnx`` (the model after the passes),
    the backend's artefact and ``manifest.json``. An existing ``out_dir`` is replaced
    only once the new one is complete.

    Raises:
        AttncError: bad model, unknown backend/precision, backend unavailable or the
            build failed.
    """
    options = options or CompileOptions()
    step = progress or (lambda message: log.info(message))
    if options.precision not in PRECISIONS:
        raise AttncError(f"unknown precision {options.precision!r}", f"use one of {', '.join(PRECISIONS)}")
    backend = get_backend(options.backend)
    ok, why = backend.available()
    if not ok:
        raise AttncError(f"the {options.backend} backend is not available", why)

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    step(f"loading {model_path}")
    model = onnx_io.load_model(model_path)
    ops_before = onnx_io.op_counts(model)
    source_opset = onnx_io.default_opset(model)
    passes.fold_static_shapes(model)   # a static trace's shape arithmetic that shape inference cannot follow
    timings["load_s"] = time.perf_counter() - t0

    shrink = _shrink(model, options, step)
    model = shrink.pop("model")

    reports = []
    lowering = default_lowering(options) if options.lower is None else list(options.lower)
    if options.fuse:
        t = time.perf_counter()
        step("running fusion passes")
        model, reports = passes.fuse_attention(model, options.families, lowering, options.precision,
                                               route_shapes(model, options) if passes.AUTO in lowering else None,
                                               backend=options.backend)
        timings["passes_s"] = time.perf_counter() - t

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fused_path = onnx_io.save_model(model, staging / FUSED_MODEL)
        t = time.perf_counter()
        step(f"building the {options.backend} artefact ({options.precision})")
        artefact = backend.build(fused_path, staging, options.precision, **options.backend_options)
        timings["build_s"] = time.perf_counter() - t
        manifest = {
            "schema": "attnc.manifest/1",
            "attnc_version": attnc.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "source": {"path": str(Path(model_path).resolve()), "sha256": _sha256(model_path),
                       "opset": source_opset, **_external_data_hashes(model_path)},
            "backend": options.backend,
            "precision": options.precision,
            "artefact": Path(artefact).name,
            "fused_model": FUSED_MODEL,
            "inputs": _io_specs(model.graph.input, model.graph.initializer),
            "outputs": _io_specs(model.graph.output, []),
            "ops_before": ops_before,
            "ops_after": onnx_io.op_counts(model),
            "passes": [r.to_dict() for r in reports],
            "lowered": sorted(lowering) if options.fuse else [],
            "shrink": shrink,
            # what the export recorded of the model (attnc.compiler.export.record_facts): validate rebuilds it so
            "recorded": {p.key: p.value for p in model.metadata_props if p.key.startswith("attnc.")},
            "backend_info": getattr(backend, "describe", lambda _p: {})(artefact),
            "timings": {k: round(v, 4) for k, v in timings.items()},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def default_lowering(options: CompileOptions) -> list[str]:
    """What ``lower=None`` means: TensorRT running fused nodes as plugins picks per agent
    attention node between its plugin and two native attention layers (``["auto"]``);
    otherwise nothing is lowered (ONNX Runtime and ``fused_ops="inline"`` run the ops' ONNX
    function bodies, where the choice buys nothing)."""
    if options.backend == "tensorrt" and options.backend_options.get("fused_ops", "plugin") == "plugin":
        return [passes.AUTO]
    return []


def route_shapes(model: onnx.ModelProto, options: CompileOptions) -> dict[str, list[int]] | None:
    """The input shapes per-node routes are chosen at: TensorRT's ``opt`` profile shapes (the
    engine is tuned for them), or ``None`` when the backend has no profile or the profile is
    incomplete (the build reports that itself, naming the input)."""
    if options.backend != "tensorrt":
        return None
    from attnc.compiler.backends import tensorrt

    given = {k: options.backend_options.get(k) for k in ("min_shapes", "opt_shapes", "max_shapes", "dim_ranges")}
    try:
        return tensorrt.profile_opt_shapes(model, **given)
    except AttncError:
        return None


def _shrink(model: onnx.ModelProto, options: CompileOptions, step) -> dict:
    """Token exit, then head pruning; returns ``{"model": ..., <pass>: report}``."""
    result: dict = {"model": model}
    if options.prune_heads and options.prune_keep:
        raise AttncError("--prune-heads and --prune-keep both choose the heads to prune",
                         "give one: a ratio or count to score heads, or a keep plan to prune the heads it names")
    calibration = None
    if options.calibration:
        from attnc.compiler import validate
        from attnc.compiler.backends.onnxruntime import load

        calibration = [validate.load_inputs(options.calibration, load(model).input_specs)]
    if options.token_exit:
        from attnc.passes import token_exit

        visual_tokens = _recorded(model, onnx_io.VISUAL_TOKENS, options.visual_tokens, "--visual-tokens")
        if not visual_tokens:
            raise AttncError("--token-exit needs the number of visual tokens, and the model records none",
                             "pass --visual-tokens N (the tokens in front of the text), or export the model with "
                             "attnc export, which records a vision-language model's")
        given = None if options.visual_offset is None else parse_offsets(options.visual_offset)
        offset = _recorded(model, onnx_io.VISUAL_OFFSET, given, "--text-before-image", parse_offsets,
                           format_offsets) or (0,)
        gate = token_exit.ExitGate.load(options.exit_gate) if options.exit_gate else None
        step(f"visual-token exit ({options.token_exit})")
        result["model"], report = token_exit.apply(
            result["model"], options.token_exit, visual_tokens, exit_layer=options.exit_layer,
            calibration_feeds=calibration, gate=gate, visual_offset=offset)
        result["token_exit"] = report.to_dict()
    if options.prune_heads:
        from attnc.passes import prune_heads

        step(f"pruning heads ({options.prune_heads}, {options.prune_method} scores, "
             f"{options.prune_granularity} granularity)")
        result["model"], report = prune_heads.apply(result["model"], options.prune_heads,
                                                    calibration_feeds=calibration, method=options.prune_method,
                                                    granularity=options.prune_granularity)
        result["prune_heads"] = report.to_dict()
    if options.prune_keep:
        from attnc.passes import prune_heads

        step(f"pruning heads to those {options.prune_keep} keeps")
        result["model"], report = prune_heads.apply_keep(result["model"], options.prune_keep)
        result["prune_heads"] = report.to_dict()
    return result


def _count(value: str):
    return int(value) if value.isdigit() else None


def _recorded(model: onnx.ModelProto, key: str, given, option: str, read=_count, spell=str):
    """``given`` (an option's value) or what the export recorded under ``key``, read by ``read`` (a count; the
    offsets of ``--text-before-image``); both must agree, ``spell`` writing them in the error."""
    value = onnx_io.metadata(model, key)
    recorded = read(value) if value else None
    if given is not None and recorded is not None and given != recorded:
        raise AttncError(f"{option} {spell(given)} contradicts the {spell(recorded)} the model's export recorded",
                         f"pass {option} {spell(recorded)}, or leave it out")
    return given if given is not None else recorded


def load_manifest(artefact_dir: str | os.PathLike) -> dict:
    """Read ``manifest.json`` of a compiled artefact directory."""
    path = Path(artefact_dir) / MANIFEST
    if not path.is_file():
        raise AttncError(f"{artefact_dir} is not an attnc artefact (no {MANIFEST})",
                         "pass the output directory of `attnc compile`")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != "attnc.manifest/1":
        raise AttncError(f"{path} has an unknown schema {manifest.get('schema')!r}",
                         "recompile with this version of attnc")
    return manifest


def load_artefact(artefact_dir: str | os.PathLike, **options):
    """The runner of a compiled artefact directory, on the backend its manifest names.

    ``options`` go to that backend's ``load`` (ONNX Runtime: ``providers``, ``threads``; TensorRT:
    ``plugin_impl``). The runner has ``input_specs``, ``output_names``, ``infer(feeds)`` and ``manifest`` (the
    artefact's ``manifest.json``).
    """
    return _runner(artefact_dir, load_manifest(artefact_dir), **options)


def _runner(artefact_dir, manifest: dict, **options):
    """:func:`load_artefact` of an artefact whose manifest is read."""
    backend = get_backend(manifest["backend"])
    ok, why = backend.available()
    if not ok:
        raise AttncError(f"{artefact_dir} was compiled for the {manifest['backend']} backend, which is "
                         "unavailable here", why)
    artefact = Path(artefact_dir) / manifest["artefact"]
    if not artefact.is_file():
        raise AttncError(f"{artefact_dir}: the manifest's artefact {manifest['artefact']} is missing",
                         "recompile with `attnc compile`")
    runner = backend.load(artefact, **options)
    runner.manifest = manifest   # what the compile did: the generation functions check their steps agree
    return runner


def _io_specs(values, initializers) -> list[dict]:
    skip = {i.name for i in initializers}
    specs = []
    for v in values:
        if v.name in skip:
            continue
        t = v.type.tensor_type
        specs.append({
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name if t.elem_type else None,
            "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim],
        })
    return specs


def _external_data_hashes(model_path) -> dict:
    """``{"external_data": {file: sha256}}`` of the weight files an ONNX model names (a large model's
    ``<name>.data``), or nothing: the model file's own hash does not cover them."""
    files = onnx_io.external_data_files(model_path)
    folder = Path(model_path).parent
    return {"external_data": {name: _sha256(folder / name) for name in files}} if files else {}


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate_artefact(artefact_dir: str | os.PathLike, model_ref: str, *,
                      inputs_npz: str | os.PathLike | None = None,
                      shapes: dict[str, tuple[int, ...]] | None = None, seed: int = 0,
                      atol: float | None = None, rtol: float | None = None,
                      report_dir: str | os.PathLike | None = None, int_high: int = 100,
                      reference: str = "shrunk"):
    """Run a compiled artefact and the PyTorch model ``model_ref`` on the same inputs.

    Inputs come from ``inputs_npz``, else from random ``shapes``, else from the bundled
    model's example inputs (seeded). A checkpoint's artefact is compared with the checkpoint as it
    runs it (``attnc export --with-attention-mask``, ``--with-past``, ``--first-step``); one taking
    ``attention_mask`` on padded example inputs, at the tokens only (``attention_mask`` 1: what a
    query that attends to nothing gets is up to the kernels). Random integer inputs (token ids) are
    drawn from ``[0, int_high)``. Writes ``report.json`` and ``report.html`` into ``report_dir`` (default
    ``artefact_dir``).

    An artefact compiled with head pruning or token exit is compared with the model shrunk the same way in PyTorch
    (``reference="shrunk"``, :mod:`attnc.compiler.reference`), and the result's ``shrink_cost`` measures it against
    the unshrunk model; ``reference="original"`` compares it with the unshrunk model instead.

    Returns:
        ``(ValidationResult, (json_path, html_path))``.
    """
    import dataclasses
    import types

    import numpy as np

    from attnc.compiler import validate
    from attnc.compiler.export import resolve_model
    from attnc.compiler.reference import REFERENCES, shrink_cost, shrunk_model
    from attnc.compiler.report import write_report
    from attnc.models.hf_checkpoint import (MASK, CheckpointSpec, exited_spec, for_inputs, with_image_size,
                                            with_text_before_image, with_video_frames)
    from attnc.passes.prune_heads import kept_cache_runs

    if reference not in REFERENCES:
        raise AttncError(f"unknown reference {reference!r}", f"use one of {', '.join(REFERENCES)}")
    manifest = load_manifest(artefact_dir)
    runner = _runner(artefact_dir, manifest)
    module, spec = resolve_model(model_ref)
    # in the CLI's order: the size (Mistral 3's rows follow it), the offsets, the clip (Qwen3-VL's: one offset a slice)
    size = manifest.get("recorded", {}).get(onnx_io.IMAGE_SIZE)
    if isinstance(spec, CheckpointSpec) and spec.kind == "vlm" and size:
        module, spec = with_image_size(module, spec, tuple(int(d) for d in size.split("x")))   # --image-size
    offset = manifest.get("recorded", {}).get(onnx_io.VISUAL_OFFSET)
    if isinstance(spec, CheckpointSpec) and spec.kind == "vlm" and offset:
        module, spec = with_text_before_image(module, spec, offset)   # exported with --text-before-image
    frames = manifest.get("recorded", {}).get(onnx_io.VIDEO_FRAMES)
    fps = manifest.get("recorded", {}).get(onnx_io.VIDEO_FPS)
    if isinstance(spec, CheckpointSpec) and spec.kind == "vlm" and frames:   # --video-frames (and --video-fps)
        module, spec = with_video_frames(module, spec, int(frames), None if fps is None else float(fps))
    # exported with --with-attention-mask, --with-past or --first-step: the checkpoint as the artefact runs it
    module, spec = for_inputs(module, spec, [s.name for s in runner.input_specs], runner.output_names)
    shrink = manifest.get("shrink", {})
    shrunk = shrunk_model(module, shrink) if reference == "shrunk" else None
    shorter_caches = False   # a vision-language model's later step after a token exit: the unshrunk model cannot run
    unshrunk = spec   # the outputs of the unshrunk model are laid out as before any exit
    if isinstance(spec, CheckpointSpec) and shrink.get("token_exit", {}).get("mode") == "static":
        # a vision-language generation graph's later layers cache the text alone: the example caches are shorter
        exited = exited_spec(module, spec, shrink["token_exit"]["exit_layer"])
        shorter_caches = exited.inputs != spec.inputs
        if shorter_caches and reference == "original":
            raise AttncError("--reference original cannot run this step: after its token exit, its later layers' "
                             "caches lack the image's tokens, which the unshrunk model reads",
                             "validate it with the shrunk reference, the default")
        spec = exited if reference == "shrunk" else spec

    if inputs_npz is not None:
        feeds = validate.load_inputs(inputs_npz, runner.input_specs)
        source = str(inputs_npz)
    elif shapes is None and spec is not None:
        examples = spec.example_inputs(seed=seed)
        feeds = {s.name: t.numpy() for s, t in zip(runner.input_specs, examples)}
        source = f"example inputs of {spec.name}, seed {seed}"
    else:
        feeds = validate.make_inputs(runner.input_specs, seed=seed, shapes=shapes, int_high=int_high)
        source = f"random, seed {seed}"

    precision = manifest["precision"]
    tolerances = None
    if atol is not None or rtol is not None:
        base = validate.TOLERANCES[precision]
        tol = dataclasses.replace(base, **{k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None})
        tolerances = {name: tol for name in runner.output_names}
    names = [s.name for s in runner.input_specs], runner.output_names
    original = validate.torch_reference(module, *names)
    truth = validate.torch_reference(shrunk.module(), *names) if shrunk else original
    infer = runner.infer
    runs = kept_cache_runs(truth, infer, shrink.get("prune_heads"))
    if runs:
        # A generation step pruned with its KV cache holds the kept heads of the checkpoint's cache: it gets those
        # of the cache the checkpoint gets, and its new cache is compared with those of the reference's.
        truth, infer = runs
        original = kept_cache_runs(original, runner.infer, shrink.get("prune_heads"))[0]
        source += "; the pruned KV cache: the kept heads of the checkpoint's"
    axes = spec.token_axes() if isinstance(spec, CheckpointSpec) and spec.padding else {}
    if axes:
        # A query that attends to nothing (padding in front of a causal row, a row of padding) has no defined
        # output: torch gives it zeros or uniform weights by attention implementation, ONNX Runtime's Attention
        # zeros, other kernels NaN. Outputs at padding are zeroed on both sides before the comparison (an
        # encoder-decoder model's logits are over its targets, all tokens: compared everywhere).
        truth, infer = (tokens_only(run, feeds[MASK], axes) for run in (truth, infer))
        original = tokens_only(original, feeds[MASK], unshrunk.token_axes())
        source += f"; {', '.join(axes)} at padding (attention_mask 0) not compared"
    seen: dict = {}

    def artefact(run_feeds):
        seen.update(infer(run_feeds))
        return seen

    result = validate.validate(truth, types.SimpleNamespace(infer=artefact), feeds, precision=precision,
                               tolerances=tolerances)
    if shrunk:
        # the unshrunk model on the same feeds; a later step after a token exit has no such run (shorter caches)
        result.shrink_cost = None if shorter_caches else shrink_cost(original(dict(feeds)), seen)
    described = "the PyTorch model"
    if shrink.get("prune_heads") or shrink.get("token_exit"):
        described = shrunk.description if shrunk else \
            "the unshrunk PyTorch model (reference original: the differences are what shrinking changed)"
    meta = {
        "model": model_ref,
        "artefact": str(Path(artefact_dir).resolve()),
        "backend": manifest["backend"],
        "precision": precision,
        "reference": described,
        "inputs": {name: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)} for name, v in feeds.items()},
        "input_source": source,
        "seed": seed,
        "fused_ops": {k: v for k, v in manifest["ops_after"].items() if k.startswith("attnc::")},
        # What the compile changed, so the report shows the model before/after next to the errors.
        "compile": {
            "nodes_before": sum(manifest["ops_before"].values()),
            "nodes_after": sum(manifest["ops_after"].values()),
            "rewritten": {r["family"]: r["rewritten"] for r in manifest["passes"] if r["rewritten"]},
            **{name: {k: v for k, v in report.items() if k not in ("layers", "gate")}
               for name, report in shrink.items()},
        },
        "attnc_version": attnc.__version__,
    }
    paths = write_report(result, report_dir or artefact_dir, meta=meta)
    return result, paths


def tokens_only(run: Callable, mask, token_axes: dict[str, int]) -> Callable:
    """``run`` (``feeds -> {name: array}``) with its outputs zeroed at padding: output ``name``'s axis
    ``token_axes[name]`` (length ``n``) runs over the last ``n`` columns of ``mask`` ``[batch, seq]``
    (all of them, or a cached step's new tokens), 0 at padding."""
    import numpy as np

    keep = np.asarray(mask) != 0

    def at_tokens(feeds):
        outputs = {name: np.asarray(value) for name, value in run(feeds).items()}
        for name, axis in token_axes.items():
            value = outputs[name]
            shape = [1] * value.ndim
            shape[0], shape[axis] = keep.shape[0], value.shape[axis]
            outputs[name] = np.where(keep[:, keep.shape[1] - value.shape[axis]:].reshape(shape), value, 0)
        return outputs

    return at_tokens
