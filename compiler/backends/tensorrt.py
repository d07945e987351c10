"""TensorRT backend: fused ONNX -> ``engine.plan`` with attnc's fused nodes as plugins.

Works with NVIDIA TensorRT 10.x/11.x (``import tensorrt``) or TensorRT for RTX
(``import tensorrt_rtx``), whichever imports; :func:`import_tensorrt` picks it. The build
is plain TensorRT: strip the fused nodes' ONNX function bodies so they reach plugins
(or keep them so the parser inlines them, ``fused_ops="inline"``), check every node has an
importer, parse into a *strongly typed* network, add one optimization profile, build,
write ``engine.plan`` atomically plus ``build.log`` and ``engine.json`` (what was built,
read back by :func:`describe` and :class:`EngineRunner`).

Precision: networks are always strongly typed, so the ONNX tensor types *are* the engine's
precision; for fp16/bf16 the model's float32 tensors are converted before parsing
(:func:`convert_float_precision`). TensorRT-RTX has no other mode (its ``BuilderFlag`` has
no FP16/BF16), and TensorRT 10.12+ deprecates the weakly typed precision flags.

Everything that does not need TensorRT is a plain, tested function: profile parsing and
validation (:func:`resolve_profile`), model preparation (:func:`prepare_model`), the
parser-name check (:func:`builtin_importer_collisions`) and dtype mapping. Plugin field
encoding, shape rules and registration live in :mod:`attnc.compiler.backends.tensorrt_plugins`.
See docs/tensorrt.md for what was exercised on which TensorRT.
"""

from __future__ import annotations

import copy
import ctypes
import importlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from attnc import DOMAIN
from attnc.compiler.backends import TensorSpec, check_feeds
from attnc.compiler.backends import tensorrt_plugins as plugins
from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import (atomic_path, initializer_array, is_large, load_model,
                                    serialised_beside_weights, write_external)
from attnc.passes.core import constant_value, dim_size, dim_terms, subgraph_inputs, toposort, value_shapes
from attnc.plugins.chunked import chunks_only

log = logging.getLogger(__name__)

NAME = "tensorrt"
ARTEFACT = "engine.plan"
BUILD_LOG = "build.log"
BUILD_INFO = "engine.json"

# (module, pip extra) in the order tried: the full TensorRT first, it runs everywhere.
FLAVOURS = (("tensorrt", 'pip install "attnc[tensorrt]"'),
            ("tensorrt_rtx", 'pip install "attnc[tensorrt-rtx]"'))
INSTALL_HINT = (f'install TensorRT: {FLAVOURS[0][1]} (NVIDIA TensorRT 10/11) or '
                f'{FLAVOURS[1][1]} (TensorRT for RTX)')

# Op types TensorRT's ONNX parser imports with its own importer *whatever the node's
# domain*: it dispatches on op_type alone (onnx-tensorrt ModelImporter::parseNode), so a
# fused op named like one of these never reaches a plugin. Every default-domain ONNX op
# name collides too (see builtin_importer_collisions); these are the contrib/TensorRT ones
# checked against TensorRT-RTX 1.7's OnnxParser.supports_operator.
BUILTIN_IMPORTERS = frozenset({
    "Attention", "LinearAttention", "MultiHeadAttention", "GroupQueryAttention",
    "RotaryEmbedding", "CausalConvWithState", "MatMulNBits", "RMSNormalization",
    "LayerNormalization", "TRT_Scale", "TRT_Shuffle", "TRT_TopK_Min", "TRT_MatMul",
})


# ----------------------------------------------------------------------------- which TensorRT


def import_tensorrt():
    """``(module, flavour)``: ``tensorrt`` if importable, else ``tensorrt_rtx``.

    Raises:
        AttncError: neither imports; the message names both pip extras.
    """
    errors = []
    for module_name, _extra in FLAVOURS:
        try:
            return importlib.import_module(module_name), module_name
        except ImportError as exc:  # includes a broken install whose native libs are missing
            errors.append(f"{module_name}: {exc}")
    raise AttncError(f"TensorRT is not installed ({'; '.join(errors)})", INSTALL_HINT)


def available() -> tuple[bool, str]:
    try:
        trt, flavour = import_tensorrt()
    except AttncError as exc:
        return False, f"{exc.problem}: {exc.fix}"
    return True, f"{flavour} {trt.__version__}"


def gpu_name() -> str | None:
    """Name and compute capability of CUDA device 0, or ``None`` without a usable GPU."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability(0)
        return f"{torch.cuda.get_device_name(0)} (sm_{major}{minor})"
    except Exception:  # a broken driver is "no GPU" as far as building goes
        return None


# ----------------------------------------------------------------------------- profiles


def parse_shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    """``NAME:1x3x224x224`` -> ``("NAME", (1, 3, 224, 224))``."""
    name, sep, dims = text.rpartition(":")
    try:
        shape = tuple(int(d) for d in dims.split("x"))
        if not sep or not name or any(d < 0 for d in shape):
            raise ValueError
    except ValueError:
        raise AttncError(f"cannot read shape {text!r}", "write it as NAME:1x3x224x224 with dims >= 0 "
                         "(0: an empty tensor, e.g. the KV cache of a prompt's step)") from None
    return name, shape


def _shape_map(shapes) -> dict[str, tuple[int, ...]]:
    """Profile shapes as given by the CLI (``["x:1x3", ...]``) or Python (``{"x": (1, 3)}``)."""
    if not shapes:
        return {}
    if isinstance(shapes, Mapping):
        return {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
    if isinstance(shapes, str):
        shapes = [shapes]
    out = {}
    for text in shapes:
        name, shape = parse_shape_arg(text)
        out[name] = shape
    return out


def _dim_range_map(ranges) -> dict[str, tuple[int, int, int]]:
    """Named dims' ranges as given by the CLI (``["past=0:16:64", "batch=2", ...]``: min:opt:max, or one size for all
    three) or Python (``{"past": (0, 16, 64)}``)."""
    if not ranges:
        return {}
    items = ranges.items() if isinstance(ranges, Mapping) else \
        [text.partition("=")[::2] for text in ([ranges] if isinstance(ranges, str) else ranges)]
    out = {}
    for name, value in items:
        try:
            sizes = tuple(int(v) for v in (value.split(":") if isinstance(value, str) else
                                           value if isinstance(value, (tuple, list)) else [value]))
            sizes = sizes * 3 if len(sizes) == 1 else sizes
            if not name or len(sizes) != 3 or sizes[0] < 0 or not sizes[0] <= sizes[1] <= sizes[2]:
                raise ValueError
        except ValueError:
            raise AttncError(f"cannot read the dim range {name}={value}",
                             "write it as NAME=MIN:OPT:MAX with 0 <= MIN <= OPT <= MAX, or NAME=SIZE") from None
        out[name] = sizes
    return out


def _from_dim_ranges(dims: tuple, ranges: Mapping[str, tuple[int, int, int]]) -> tuple | None:
    """``(min, opt, max)`` shapes of an input of ``dims`` whose named dims (each a sum of names and constants,
    ``"past + 18 + seq"``) are all in ``ranges``; None where one is not."""
    shapes = ([], [], [])
    for dim in dims:
        if isinstance(dim, int) and dim > 0:
            sizes = (dim,) * 3
        elif not dim:
            return None
        else:
            sizes = tuple(dim_size(dim, {name: r[which] for name, r in ranges.items()}) for which in range(3))
            if None in sizes:
                return None
        for which in range(3):
            shapes[which].append(sizes[which])
    return tuple(tuple(shape) for shape in shapes)


def model_inputs(model: onnx.ModelProto) -> dict[str, tuple[int | str | None, ...]]:
    """Graph inputs that are not initializers: name -> dims (int, symbol name or None)."""
    skip = {i.name for i in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in skip:
            continue
        dims = value.type.tensor_type.shape.dim
        inputs[value.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return inputs


def resolve_profile(inputs: Mapping[str, tuple], min_shapes=None, opt_shapes=None, max_shapes=None,
                    dim_ranges=None) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """min/opt/max shape of every model input, checked against the model before any build.

    Defaults: a fully static input uses its exported shape for all three. For an input with
    dynamic dims, a shape given by any flag fills the others: ``opt`` and ``max`` default to
    each other, ``min`` defaults to ``opt`` with the dynamic dims set to 1. An input no flag
    names takes its shapes from ``dim_ranges`` where those give every name its dims are made of
    (``"past + 18 + seq"``: the sum of the names' sizes and the constant): one range per named dim
    sizes every input alike, a generation step's mask and each layer's cache included.

    Args:
        inputs: :func:`model_inputs` of the model.
        min_shapes, opt_shapes, max_shapes: ``{name: shape}`` or ``["name:1x3x224x224", ...]``.
        dim_ranges: ``{dim name: (min, opt, max)}`` or ``["past=0:16:64", "batch=2", ...]``.

    Raises:
        AttncError: naming the input: unknown name, wrong rank, a static dim changed,
            min > opt > max, or a dynamic input without any shape; a dim range of a name no input has.
    """
    given = {"min": _shape_map(min_shapes), "opt": _shape_map(opt_shapes), "max": _shape_map(max_shapes)}
    for which, shapes in given.items():
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise AttncError(f"--{which}-shape names input {unknown[0]!r}, which the model does not have",
                             f"model inputs: {', '.join(inputs) or 'none'}")
    ranges = _dim_range_map(dim_ranges)
    names = {term for dims in inputs.values() for d in dims if isinstance(d, str) for term in dim_terms(d)}
    unknown = sorted(set(ranges) - names)
    if unknown:
        raise AttncError(f"--dim-range names dim {unknown[0]!r}, which no model input has",
                         f"the inputs' named dims: {', '.join(sorted(n for n in names if not n.isdigit())) or 'none'}")
    profile = {}
    for name, dims in inputs.items():
        pretty = "x".join(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in dims)
        for which, shapes in given.items():
            shape = shapes.get(name)
            if shape is None:
                continue
            if len(shape) != len(dims):
                raise AttncError(f"--{which}-shape for input {name!r} has rank {len(shape)}, the model's "
                                 f"input is rank {len(dims)} ({pretty})", "give one size per dimension")
            for axis, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise AttncError(f"--{which}-shape for input {name!r} sets dim {axis} to {got}, but the "
                                     f"model fixes it to {want} ({pretty})",
                                     "keep static dims, or re-export with that axis dynamic")
        dynamic = [axis for axis, d in enumerate(dims) if not (isinstance(d, int) and d > 0)]
        opt = given["opt"].get(name) or given["max"].get(name)
        mx = given["max"].get(name) or opt
        mn = given["min"].get(name)
        if opt is None and mn is None and dynamic and ranges:
            ranged = _from_dim_ranges(dims, ranges)
            if ranged is not None:
                profile[name] = ranged
                continue
        if opt is None and mn is None:
            if dynamic:
                raise AttncError(f"input {name!r} has dynamic dims ({pretty}) and no profile shape",
                                 f"pass --opt-shape {name}:<shape> (and --min-shape/--max-shape), or a range for "
                                 "each of its named dims, e.g. --dim-range batch=1:4:8")
            static = tuple(int(d) for d in dims)
            profile[name] = (static, static, static)
            continue
        if opt is None:
            opt = mx = mn
        if mn is None:
            mn = tuple(1 if axis in dynamic else d for axis, d in enumerate(opt))
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx)):
            raise AttncError(f"profile of input {name!r} is not ordered: min {mn}, opt {opt}, max {mx}",
                             "each dim needs min <= opt <= max")
        profile[name] = (tuple(mn), tuple(opt), tuple(mx))
    return profile


def profile_opt_shapes(model: onnx.ModelProto, min_shapes=None, opt_shapes=None,
                       max_shapes=None, dim_ranges=None) -> dict[str, list[int]]:
    """The ``opt`` shape of every input of ``model``'s profile (:func:`resolve_profile`, whose
    errors it raises): the shapes the engine is tuned for, which per-node routes are chosen at."""
    profile = resolve_profile(model_inputs(model), min_shapes, opt_shapes, max_shapes, dim_ranges)
    return {name: list(opt) for name, (_, opt, _) in profile.items()}


# ----------------------------------------------------------------------------- model preparation


def builtin_importer_collisions(op_types: Iterable[str], supports=None) -> list[str]:
    """The op types a TensorRT ONNX parser would route to a built-in importer, not a plugin.

    ``supports`` is the live parser's ``supports_operator`` when TensorRT is present.
    """
    hits = []
    for op in op_types:
        if op in BUILTIN_IMPORTERS or onnx.defs.has(op, "") or (supports is not None and supports(op)):
            hits.append(op)
    return hits


_FLOAT_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


INFINITY_STAND_IN = 1e30   # |x| at or above this is "infinity" (mask fills): ±inf in fp16 silently


def convert_float_precision(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """Retype every float32 tensor of ``model`` (in place) to fp16/bf16 for a strongly typed build.

    Initializers, graph inputs/outputs, ``Cast(to=FLOAT)``, ``Constant``/``ConstantOfShape``
    values are converted; ``value_info`` is dropped (TensorRT infers shapes itself). What a
    fused op's contract keeps float32 (linear attention's decay and recurrent state, in and
    out) stays float32, with the elementwise arithmetic that leads to it from the graph's
    inputs (:func:`float32_tensors`: a gated state ``g ⊙ S`` keeps S float32 and casts g up).
    Values beyond fp16's range become ±inf: silently for infinity stand-ins (``|x| ≥ 1e30``, a mask's
    fill), with a warning naming the tensor for any other.
    """
    target = _FLOAT_TYPES[precision]
    if target == TensorProto.FLOAT:
        return model
    keep = float32_tensors(model)

    def convert_tensor(tensor: TensorProto) -> None:
        if tensor.data_type != TensorProto.FLOAT or tensor.name in keep:
            return
        array = initializer_array(tensor).astype(np.float32)   # a mapped weight's from its file
        np_type = onnx.helper.tensor_dtype_to_np_dtype(target)
        with np.errstate(over="ignore"):   # a mask's fill (≤ -1e30, float32's min) becomes -inf, as meant
            converted = array.astype(np_type)
        lost = np.isinf(converted.astype(np.float32)) & np.isfinite(array) & (np.abs(array) < INFINITY_STAND_IN)
        if lost.any():
            log.warning("%s: %d value(s) beyond %s's range become ±inf (largest |x| %.3g); keep this tensor "
                        "float32 or build in another precision", tensor.name or "a constant", int(lost.sum()),
                        precision, float(np.abs(array[lost]).max()))
        tensor.CopyFrom(numpy_helper.from_array(converted, tensor.name))

    def convert_nodes(nodes) -> None:
        for node in nodes:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = target
                if attr.type == onnx.AttributeProto.TENSOR and not (node.op_type == "Constant"
                                                                    and node.output[0] in keep):
                    convert_tensor(attr.t)
                if attr.type == onnx.AttributeProto.GRAPH:
                    convert_graph(attr.g)

    def convert_graph(graph: onnx.GraphProto) -> None:
        for tensor in graph.initializer:
            convert_tensor(tensor)
        for value in list(graph.input) + list(graph.output):
            if value.type.tensor_type.elem_type == TensorProto.FLOAT and value.name not in keep:
                value.type.tensor_type.elem_type = target
        del graph.value_info[:]
        convert_nodes(graph.node)

    # Function bodies are left alone: they adapt to their inputs' type (CastLike), and a
    # retyped Cast inside one would clash with the float32 constants next to it.
    convert_graph(model.graph)
    _cast_float32_operands(model, keep)
    return model


# Ops that compute in the float type of their inputs, so a chain of them from the graph's
# float32 tensors to a float32-by-contract input can run in float32 (the gate of g ⊙ S).
_FLOAT32_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Exp", "Log", "Sigmoid",
                                  "Reciprocal", "Sqrt", "Identity"})


def _cast_float32_operands(model: onnx.ModelProto, keep: set[str]) -> None:
    """Put a ``Cast(to=FLOAT)`` in front of every operand that must be float32 but is not in
    ``keep`` (:func:`float32_tensors`), so was converted to the target type: a float32-by-contract
    input of a fused node (``FLOAT32_INPUTS``: decay, state) that the graph computes, which the
    plugin would read as float32 (or refuse) and the function body's float32 constants would
    clash with; and the other operands (a gate) of the elementwise ops that compute a kept
    tensor in float32."""
    casts: dict[str, str] = {}
    nodes = []
    for node in model.graph.node:
        contract = _fused_contract(node)
        if contract is not None:
            spec, positions = contract
            slots = [slot for slot, index in enumerate(positions) if index in spec.float32_inputs]
        elif node.op_type in _FLOAT32_ELEMENTWISE and node.output[0] in keep:
            slots = range(len(node.input))
        else:
            slots = []
        for slot in slots:
            name = node.input[slot]
            if not name or name in keep:
                continue
            if name not in casts:
                casts[name] = f"{name}/float32"
                nodes.append(onnx.helper.make_node("Cast", [name], [casts[name]], name=f"{name}/to_float32",
                                                   to=TensorProto.FLOAT))
            node.input[slot] = casts[name]
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def float32_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors of ``model`` that stay float32 in an fp16/bf16 build.

    Those fused nodes give as float32 by contract (every output after the first), the
    contract's float32 inputs (``FLOAT32_INPUTS`` of the op's module) that are initializers,
    ``Constant`` outputs or graph inputs, and each such float32 tensor whose every use leads
    through :data:`_FLOAT32_ELEMENTWISE` ops to float32 contract inputs only, with those ops'
    outputs: in a gated decode step ``state = g ⊙ S``, S (a graph input) stays float32 and the
    ``Mul`` runs in float32, so the engine takes the state in the type ``state_out`` gives it.
    """
    graph = model.graph
    float32_slots, names = set(), set()
    consumers: dict[str, list[tuple[int, int | None]]] = {}
    for index, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            consumers.setdefault(name, []).append((index, slot))
        for name in subgraph_inputs(node):  # used inside an If/Loop/Scan body: not elementwise
            consumers.setdefault(name, []).append((index, None))
        contract = _fused_contract(node)
        if contract is not None:
            spec, positions = contract
            float32_slots.update((index, slot) for slot, i in enumerate(positions) if i in spec.float32_inputs)
            names.update(name for name in node.output[1:] if name)
    sources = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT]
    sources += [v.name for v in graph.input if v.type.tensor_type.elem_type == TensorProto.FLOAT]
    sources += [n.output[0] for n in graph.node if n.op_type == "Constant"
                and [(a.name, a.t.data_type) for a in n.attribute] == [("value", TensorProto.FLOAT)]]
    outputs = {v.name for v in graph.output}
    for source in sources:
        if any(use in float32_slots for use in consumers.get(source, [])):
            names.add(source)  # read by a fused node itself: float32 whatever else reads it
        else:
            names |= _elementwise_chain(graph, source, consumers, float32_slots, outputs) or set()
    return names


def _elementwise_chain(graph: onnx.GraphProto, source: str, consumers: dict, float32_slots: set,
                       outputs: set) -> set[str] | None:
    """``source`` and the tensors computed from it when every use of them is a float32 contract
    input (``float32_slots``: ``(node index, input slot)``) or a :data:`_FLOAT32_ELEMENTWISE` op,
    and none is a graph output; ``None`` otherwise."""
    reached, todo = set(), [source]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        if name in outputs or name not in consumers:
            return None
        for index, slot in consumers[name]:
            if (index, slot) in float32_slots:
                continue
            node = graph.node[index]
            if slot is None or node.op_type not in _FLOAT32_ELEMENTWISE:
                return None
            todo.extend(node.output)
    return reached


def _fused_contract(node: onnx.NodeProto) -> tuple[plugins.PluginSpec, list[int]] | None:
    """``(PluginSpec, the op's input index of each of the node's input slots)`` of a fused node,
    or of a plugin variant (a prepared model's node); ``None`` for any other node."""
    if node.domain != DOMAIN:
        return None
    op_type = node.op_type.split(_OVERLOAD_SEPARATOR)[0]  # an inlined body's node: <op>__<overload>
    try:
        spec = plugins.plugin_spec(op_type)
    except AttncError:
        return None
    # A fused op's node lists its inputs by position ("" for absent ones); a plugin variant's
    # only the ones it has.
    return spec, list(range(len(node.input))) if op_type == spec.op_type else list(spec.present)


def prepare_model(model: onnx.ModelProto, precision: str = "fp32", fused_ops: str = "plugin",
                  supports=None) -> tuple[onnx.ModelProto, list[str]]:
    """The model TensorRT parses, and the plugins (variant names) it needs.

    ``fused_ops="plugin"``: attnc's function bodies are removed so the fused nodes reach
    the plugin registry; each node becomes the plugin variant of the inputs and outputs it
    has (``tensorrt_plugins.node_plugin_spec``: absent optional inputs dropped, op type
    ``<op>_in<indices>_out<n>`` unless it has just the required inputs and one output), and
    gets ``plugin_namespace``/``plugin_version`` attributes
    (parsers before TensorRT 10.10 read the namespace only from there, later ones also from
    the domain). ``fused_ops="inline"``: bodies stay and the parser inlines them as ordinary
    layers (no plugins needed; slower, but it runs anywhere).

    Raises:
        AttncError: naming the node, when a node is neither a default-domain op, a node
            with a local function, an op the parser knows, nor an attnc op with a plugin, or
            when a fused op's name would be captured by a built-in importer.
    """
    if fused_ops not in ("plugin", "inline"):
        raise AttncError(f"unknown fused_ops mode {fused_ops!r}", "use 'plugin' or 'inline'")
    model = copy.deepcopy(model)
    pin_inferred_dims(model)
    fused = sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN})
    collisions = builtin_importer_collisions(fused, supports)
    if collisions:
        raise AttncError(f"fused op {collisions[0]!r} is named like an op TensorRT's ONNX parser imports "
                         "itself, so it would never reach the attnc plugin",
                         "rename the fused op (see attnc.plugins.FUSED_OPS)")
    if fused_ops == "plugin":
        kept = [f for f in model.functions if f.domain != DOMAIN]
        del model.functions[:]
        model.functions.extend(kept)
    else:
        _inline_ready_functions(model)
    local = {(f.domain, f.name) for f in model.functions}
    arity = {(f.domain, f.name, f.overload): len(f.input) for f in model.functions}
    with_plugins = set(plugins.registered_ops())
    variants: set[str] = set()
    for index, node in enumerate(model.graph.node):
        label = f"node {node.name or index!r} ({node.domain or 'ai.onnx'}::{node.op_type})"
        if node.domain in ("", "ai.onnx") or (node.domain, node.op_type) in local:
            # TensorRT's LocalFunctionImporter wants every function input present, though
            # ONNX lets a node drop trailing optional inputs: pad them with "".
            missing = arity.get((node.domain, node.op_type, node.overload), 0) - len(node.input)
            node.input.extend([""] * max(missing, 0))
            continue
        if node.domain == DOMAIN:
            if node.op_type not in with_plugins:
                raise AttncError(f"{label} has no TensorRT plugin", "compile with --backend onnxruntime, "
                                 "or add the op to attnc.plugins.FUSED_OPS with its plugin")
            if fused_ops == "plugin":
                # A plugin takes a fixed set of inputs and outputs: the node becomes the plugin
                # variant of the ones it has, absent optional inputs dropped.
                spec = plugins.node_plugin_spec(node)
                variants.add(spec.name)
                kept_inputs = [name for name in node.input if name]
                del node.input[:]
                node.input.extend(kept_inputs)
                del node.output[spec.n_outputs:]   # trailing unnamed outputs: not the variant's
                node.op_type = spec.name
            node.ClearField("overload")
            names = {a.name for a in node.attribute}
            if "plugin_namespace" not in names:
                node.attribute.append(onnx.helper.make_attribute("plugin_namespace", plugins.NAMESPACE))
            if "plugin_version" not in names:
                node.attribute.append(onnx.helper.make_attribute("plugin_version", plugins.PLUGIN_VERSION))
            continue
        if supports is not None and supports(node.op_type):
            continue
        raise AttncError(f"{label} is not a standard ONNX op and has no TensorRT plugin or function body",
                         "remove it before compiling, or compile with --backend onnxruntime")
    plugin_ops = sorted(variants)
    return convert_float_precision(model, precision), plugin_ops


def pin_inferred_dims(model: onnx.ModelProto) -> list[str]:
    """Write in the size of a ``Reshape``'s ``-1`` where shape inference knows it, in place; returns the ``Reshape``
    nodes changed.

    A projection's ``view(B, L, -1, head_dim)`` exports as a shape vector concatenated at run time from ``B``, ``L``
    and the constants ``[-1, head_dim]``. TensorRT's parser derives the ``-1`` from the input's volume, which it
    cannot always simplify (a prompt concatenated around an image: ``B·(3 + 6 + (S - 3))·64 / (B·(S + 6)·16)``); its
    attention layer then refuses grouped-query heads it cannot prove divisible ("query number of heads must be
    divisible by key/value number of heads").

    Where the ``-1`` sits in a constant piece of the ``Concat`` and ONNX shape inference gives the ``Reshape``'s output
    a static size on that axis, the node reads a copy of the vector with that size in its place (the vector itself
    is shared: queries and grouped keys read one ``[B, L, -1, D]``). A vector shifted by constants on its way (a token
    exit's ``Sub`` of ``P`` at the token entry, after which shape inference loses the sizes) takes the size a
    ``Reshape`` reading it unshifted gives an input of the same trailing size, the shift applied again on the copy.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    shapes = None
    plans = []
    for node in list(model.graph.node):
        if node.op_type != "Reshape" or len(node.input) < 2 or constant_value(model, node.input[1]) is not None:
            continue
        shifts, concat = [], producer.get(node.input[1])
        while concat is not None and concat.op_type in ("Add", "Sub") and len(concat.input) == 2 and \
                constant_value(model, concat.input[1]) is not None:
            shifts.append(concat)
            concat = producer.get(concat.input[0])
        if concat is None or concat.op_type != "Concat":
            continue
        pieces = [constant_value(model, name) for name in concat.input]
        if not any(p is not None and p.ndim == 1 and (p == -1).any() for p in pieces):
            continue
        shapes = value_shapes(model) if shapes is None else shapes
        lengths = [p.size if p is not None else (shapes.get(name) or [None])[0]
                   for p, name in zip(pieces, concat.input)]
        if not all(isinstance(n, int) for n in lengths):
            continue
        plans.append((node, shifts, concat, pieces, lengths))
    if not plans:
        return []

    def width(reshape):   # the input's static trailing size, which decides the -1 with the other entries
        dims = shapes.get(reshape.input[0]) or [None]
        return dims[-1] if isinstance(dims[-1], int) else None

    known: dict[tuple[str, int | None], list] = {}   # (vector, input width) -> output shape of an unshifted reader
    for node, shifts, concat, _, lengths in plans:
        out = shapes.get(node.output[0])
        if not shifts and out and len(out) == sum(lengths):
            known.setdefault((concat.output[0], width(node)), out)
    changed = []
    for node, shifts, concat, pieces, lengths in plans:
        out = known.get((concat.output[0], width(node))) if shifts else shapes.get(node.output[0])
        if not out or len(out) != sum(lengths) or (shifts and width(node) is None):
            continue
        offsets = [np.broadcast_to(constant_value(model, s.input[1]), (len(out),)) for s in shifts]
        inputs, start = list(concat.input), 0
        for i, (piece, length) in enumerate(zip(pieces, lengths)):
            if piece is not None and piece.ndim == 1 and (piece == -1).any():
                pinned = piece.copy()
                for j in np.flatnonzero(piece == -1):
                    if isinstance(out[start + j], int) and all(o[start + j] == 0 for o in offsets):
                        pinned[j] = out[start + j]
                if (pinned != piece).any():
                    inputs[i] = f"{node.name or node.output[0]}/pinned_shape.piece{i}"
                    model.graph.initializer.append(numpy_helper.from_array(pinned.astype(piece.dtype), inputs[i]))
            start += length
        if inputs == list(concat.input):
            continue
        name = f"{node.name or node.output[0]}/pinned_shape"
        model.graph.node.append(onnx.helper.make_node("Concat", inputs, [name], name=name, axis=0))
        for k, shift in enumerate(reversed(shifts)):   # the same shifts on the copy
            model.graph.node.append(onnx.helper.make_node(shift.op_type, [name, shift.input[1]], [f"{name}/{k}"],
                                                          name=f"{name}/{k}"))
            name = f"{name}/{k}"
        node.input[1] = name
        changed.append(node.name)
    if changed:
        toposort(model)
        log.info("pinned the inferred sizes of %d Reshape nodes for TensorRT's parser", len(changed))
    return changed


_OVERLOAD_SEPARATOR = "__"


def _inline_ready_functions(model: onnx.ModelProto) -> None:
    """Ready attnc's function bodies for the parser's ``LocalFunctionImporter``.

    - It looks a function up by name alone (onnx-tensorrt's ``importLocalFunctions`` keys them
      by ``name()``, the first one kept): each overload gets its own name (``<op>__<overload>``)
      and its nodes that name.
    - It wants a node with as many inputs as its function, and RTX's rejects a node with an
      empty (``""``) input ("Invalid Node"): inputs a body never reads (the state of an
      overload without one, agent attention's absent biases) go from the function and its
      nodes; an absent input a body does read gets the constant the op's module declares it
      equals (``ABSENT_INPUTS``: linear attention's decay, λ = 1).
    - Causal products always run in chunks (:func:`attnc.plugins.chunked.chunks_only`).
    """
    renamed, kept = {}, {}
    for index, function in enumerate(model.functions):
        if function.domain != DOMAIN:
            continue
        function = chunks_only(function)
        read = set().union(*(set(node.input) | subgraph_inputs(node) for node in function.node))
        kept[(function.name, function.overload)] = [i for i, name in enumerate(function.input) if name in read]
        names = [name for name in function.input if name in read]
        del function.input[:]
        function.input.extend(names)
        if function.overload:
            renamed[(function.name, function.overload)] = function.name + _OVERLOAD_SEPARATOR + function.overload
            function.name = renamed[(function.name, function.overload)]
            function.ClearField("overload")
        model.functions[index].CopyFrom(function)
    for node in model.graph.node:
        key = (node.op_type, node.overload)
        if node.domain != DOMAIN or key not in kept:
            continue
        given = list(node.input) + [""] * (max(kept[key], default=-1) + 1 - len(node.input))
        if any(name for i, name in enumerate(given) if i not in kept[key]):
            raise AttncError(f"node {node.name!r} ({node.op_type}) has inputs its function body does not read",
                             "re-run the fusion pass that made it (the node and its overload disagree)")
        spec = plugins.plugin_spec(node.op_type)
        absent = dict(spec.absent_inputs)
        inputs = []
        for i in kept[key]:
            if not given[i]:
                if i not in absent:
                    raise AttncError(f"node {node.name!r} ({node.op_type}) leaves out input {spec.inputs[i]!r}, and "
                                     "TensorRT's parser rejects an inlined node with an absent input",
                                     "give the input a value, or build with --fused-ops plugin")
                given[i] = f"{node.name}/absent_{spec.inputs[i]}"
                model.graph.initializer.append(onnx.numpy_helper.from_array(
                    np.array([absent[i]], np.float32), given[i]))
            inputs.append(given[i])
        del node.input[:]
        node.input.extend(inputs)
        if key in renamed:
            node.op_type = renamed[key]
            node.ClearField("overload")


# ----------------------------------------------------------------------------- build


class _Log:
    """A TensorRT ILogger that keeps every message (``build.log``) and the errors."""

    def __init__(self, trt):
        self.lines: list[str] = []
        self.errors: list[str] = []
        outer = self

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)

            def log(self, severity, msg):
                level = str(severity).split(".")[-1]
                outer.lines.append(f"[{level}] {msg}")
                if level in ("ERROR", "INTERNAL_ERROR"):
                    outer.errors.append(msg)

        self.logger = Logger()

    def write(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text("\n".join(self.lines) + "\n")


def _rtx_can_add_plugins(trt) -> tuple[bool, str]:
    """TensorRT-RTX's ONNX parser dlopen()s ``libtensorrt_rtx.so`` (unversioned) when it adds
    a plugin layer; the pip wheel ships only ``libtensorrt_rtx.so.1``, and the failed dlopen
    throws inside a noexcept function: std::terminate (see docs/tensorrt.md). Check first."""
    try:
        libs = Path(importlib.import_module("tensorrt_rtx_libs").__file__).parent
    except ImportError:
        libs = None
    if libs is not None and (libs / "libtensorrt_rtx.so").exists():
        return True, ""
    try:
        ctypes.CDLL("libtensorrt_rtx.so")
        return True, ""
    except OSError:
        pass
    target = f"{libs}/libtensorrt_rtx.so.1" if libs else "libtensorrt_rtx.so.1"
    return False, (f"make libtensorrt_rtx.so loadable: `ln -s {target} <dir>/libtensorrt_rtx.so` and start "
                   "Python with LD_LIBRARY_PATH=<dir> (or link it next to the .so.1), or build with "
                   "fused_ops='inline'")


def _register_plugins(trt, flavour: str, ops: list[str]) -> str:
    """Register the plugins ``ops`` need; returns how ("qdp-aot" or "python-v3")."""
    if not ops:
        return "none"
    try:
        trtp = importlib.import_module(f"{flavour}.plugin")
    except ImportError:
        trtp = None  # TensorRT-RTX 1.7: the shim imports tensorrt_rtx_bindings.plugin, which is not shipped
    if trtp is not None:
        for op in ops:
            spec = plugins.plugin_spec(op)
            if spec.plugin_id not in _QDP_DONE:
                plugins.register_qdp(trtp, spec)
                _QDP_DONE.add(spec.plugin_id)
        return "qdp-aot"
    ok, fix = _rtx_can_add_plugins(trt) if flavour == "tensorrt_rtx" else (True, "")
    if not ok:
        raise AttncError(f"{flavour}'s ONNX parser would abort the process when adding the "
                         f"{', '.join(ops)} plugin layer(s): libtensorrt_rtx.so is not loadable", fix)
    plugins.register_python_plugins(trt, ops)
    return "python-v3"


_QDP_DONE: set[str] = set()


def _parse(parser, model: onnx.ModelProto, model_path) -> bool:
    """``parser.parse`` of ``model`` (modified: it is the prepared copy). Mapped weights of one folder reach the
    parser as external data relative to that folder, which it reads itself (``parse``'s ``path``: a model file
    there); a model past protobuf's 2 GiB otherwise, or with weights it cannot find so, goes through a temporary
    copy with its weights in external data (``parse_from_file``)."""
    beside = serialised_beside_weights(model)
    if beside is not None:
        return parser.parse(beside[0], str(beside[1]))
    if not is_large(model):
        return parser.parse(model.SerializeToString(), str(Path(model_path).resolve()))
    with tempfile.TemporaryDirectory(prefix="attnc-large-") as tmp:
        return parser.parse_from_file(str(write_external(model, Path(tmp) / "model.onnx")))


def _attention_layers(trt, network) -> list:
    """The network's attention layers, as ``IAttentionOutputLayer`` (the parser hands back
    plain ``ILayer``s; re-classing them exposes ``.attention``)."""
    kind = getattr(trt.LayerType, "ATTENTION_OUTPUT", None)
    layers = []
    for index in range(network.num_layers if kind is not None else 0):
        layer = network.get_layer(index)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionOutputLayer
            layers.append(layer)
    return layers


def _scale_mul(trt, producers: dict, tensor):
    """The ``x * scalar`` layer producing ``tensor`` (how the ONNX parser applies ``Attention``'s
    scale: ``sqrt(scale)`` on Q and on K), or ``None``."""
    layer = producers.get(tensor.name)
    if layer is None or layer.type != trt.LayerType.ELEMENTWISE:
        return None
    layer.__class__ = trt.IElementWiseLayer
    if layer.op != trt.ElementWiseOperation.PROD or any(d != 1 for d in layer.get_input(1).shape):
        return None
    return layer


def _origin(trt, producers: dict, tensor) -> str:
    """The tensor ``tensor`` reshapes: the parser reshapes 3-D Q/K to 4-D for each node
    separately, and the builder merges equal reshapes of one tensor like equal products."""
    layer = producers.get(tensor.name)
    while layer is not None and layer.type in (trt.LayerType.SHUFFLE, trt.LayerType.IDENTITY):
        tensor = layer.get_input(0)
        layer = producers.get(tensor.name)
    return tensor.name


def unshare_attention_scales(trt, network, attention) -> tuple[int, list[str]]:
    """Rewire attention layers so no scaled Q/K tensor would be shared by two of them.

    Why: TensorRT-RTX 1.7's builder (Myelin) folds a ``x * scalar`` that feeds an attention
    layer's Q or K into the attention, and breaks when that product has more than one
    consumer: a SIGSEGV in ``build_serialized_network`` when two attention layers read it,
    ``MyelinCheckException ... op->input_size()`` when an attention and another layer do
    (docs/tensorrt.md). The ONNX parser scales Q and K of every ``Attention`` by
    ``sqrt(scale)``, so two nodes that read the same tensor (agent attention's agent tokens,
    a shared K in a chain, parallel heads over one Q) get identical multiplies, which the
    builder merges into one shared product. Scalars commute, so a layer whose product would
    collide gets both factors on its other input instead (``(q*a)·(k*b)ᵀ = (q*(a*b))·kᵀ``),
    a product nothing else computes. Layers that collide with nothing are left alone.

    Args:
        attention: the network's attention layers (:func:`_attention_layers`).

    Returns:
        How many layers were rewired, and the names of layers whose products still collide
        (every form already taken; e.g. four attention layers over the same Q and K).
    """
    producers = {}
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        for out in range(layer.num_outputs):
            producers[layer.get_output(out).name] = layer
    # Keys are conservative: products of the same source with different scales would not
    # collide, but the scale may be computed (default 1/sqrt(D)), so it is not compared.
    taken: set[tuple[str, str]] = set()
    moved, unresolved = 0, []
    for layer in attention:
        att = layer.attention
        muls = [_scale_mul(trt, producers, att.get_input(slot)) for slot in (0, 1)]
        if None in muls:
            continue
        sources = [mul.get_input(0) for mul in muls]
        origins = [_origin(trt, producers, source) for source in sources]
        as_parsed = {(origins[0], "parser"), (origins[1], "parser")}
        if len(as_parsed) == 2 and not as_parsed & taken:
            taken |= as_parsed
            continue
        for keep in (0, 1):
            key = (origins[keep], "both factors")
            if key in taken:
                continue
            other = 1 - keep
            factor = network.add_elementwise(muls[keep].get_input(1), muls[other].get_input(1),
                                             trt.ElementWiseOperation.PROD)
            scaled = network.add_elementwise(sources[keep], factor.get_output(0), trt.ElementWiseOperation.PROD)
            scaled.name = f"{att.name}/scale_{'query' if keep == 0 else 'key'}"
            att.set_input(keep, scaled.get_output(0))
            att.set_input(other, sources[other])
            taken.add(key)
            moved += 1
            break
        else:
            unresolved.append(att.name)
    return moved, unresolved


def build(model_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32", *,
          min_shapes=None, opt_shapes=None, max_shapes=None, dim_ranges=None, workspace: int | None = None,
          timing_cache: str | os.PathLike | None = None, fused_ops: str = "plugin",
          decomposable_attention: bool = True, optimization_level: int | None = None,
          compute_capabilities: Iterable[str] | None = None, allow_rtx_cpu_crash: bool = False,
          **unknown) -> Path:
    """Build ``out_dir/engine.plan`` from the ONNX model at ``model_path``.

    Args:
        precision: fp32, fp16 or bf16 (converted into the ONNX types, see module doc).
        min_shapes, opt_shapes, max_shapes, dim_ranges: optimization profile (:func:`resolve_profile`).
        workspace: workspace memory-pool limit in bytes (default: TensorRT's).
        timing_cache: file to load before and save after the build (TensorRT only; ignored
            by TensorRT-RTX, whose engines do not depend on it and which would need a GPU).
        fused_ops: ``"plugin"`` or ``"inline"`` (:func:`prepare_model`).
        decomposable_attention: let attention layers fall back to unfused kernels.
        optimization_level: builder optimization level 0-5.
        compute_capabilities: TensorRT-RTX targets, e.g. ``["SM89", "SM120"]``; default the
            current GPU, or every supported one when there is none.
        allow_rtx_cpu_crash: build even where TensorRT-RTX 1.7 is known to segfault (attention
            layers sharing a scaled Q/K that :func:`unshare_attention_scales` cannot separate,
            no GPU); for checking newer TensorRT-RTX releases.

    Writes ``build.log`` (always) and ``engine.json``; a failed build leaves no engine.

    Raises:
        AttncError: bad profile (before building), unsupported node, parser errors, build failure.
    """
    if precision not in _FLOAT_TYPES:
        raise AttncError(f"unknown precision {precision!r}", "use fp32, fp16 or bf16")
    if unknown:
        raise AttncError(f"unknown TensorRT backend option(s) {sorted(unknown)}",
                         "see attnc.compiler.backends.tensorrt.build for the options")
    trt, flavour = import_tensorrt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path, check=False)   # weights kept in a file stay there (mapped)
    profile = resolve_profile(model_inputs(model), min_shapes, opt_shapes, max_shapes, dim_ranges)

    log = _Log(trt)
    t0 = time.perf_counter()
    try:
        builder = trt.Builder(log.logger)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        if hasattr(trt.NetworkDefinitionCreationFlag, "PREFER_AOT_PYTHON_PLUGINS"):  # TensorRT >= 10.9
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.PREFER_AOT_PYTHON_PLUGINS)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, log.logger)
        prepared, plugin_ops = prepare_model(model, precision, fused_ops, supports=parser.supports_operator)
        plugin_mode = _register_plugins(trt, flavour, plugin_ops)
        if not _parse(parser, prepared, model_path):
            errors = [_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
            raise AttncError(f"TensorRT's ONNX parser rejected the model: {'; '.join(errors[:5])}",
                             f"see {out_dir / BUILD_LOG}; unsupported nodes need a plugin or --backend onnxruntime")
        attention = _attention_layers(trt, network)
        moved, unresolved = unshare_attention_scales(trt, network, attention)
        if unresolved and flavour == "tensorrt_rtx" and gpu_name() is None and not allow_rtx_cpu_crash:
            # Seen on CPU only; a GPU build may fail the same way. A clear error beats a dead process.
            raise AttncError(f"TensorRT-RTX {trt.__version__} crashes (SIGSEGV) building attention layers "
                             f"that share a scaled query/key tensor, and attnc could not separate "
                             f"{', '.join(unresolved)}",
                             "give those attention layers distinct query or key tensors, build on the "
                             "target GPU, or pass allow_rtx_cpu_crash=True to try anyway")
        # Lets TensorRT fall back to unfused kernels where no fused attention kernel fits
        # (fp32, small head dims); without it those builds fail in Myelin.
        for layer in attention if decomposable_attention else []:
            layer.attention.decomposable = True
        decomposed = len(attention) if decomposable_attention else 0
        config = builder.create_builder_config()
        if workspace:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace))
        if optimization_level is not None:
            config.builder_optimization_level = int(optimization_level)
        trt_profile = builder.create_optimization_profile()
        for name, (mn, opt, mx) in profile.items():
            trt_profile.set_shape(name, mn, opt, mx)
        config.add_optimization_profile(trt_profile)
        gpu = gpu_name()
        targets = _set_compute_capabilities(trt, config, flavour, gpu, compute_capabilities, precision)
        cache = _load_timing_cache(config, flavour, timing_cache, log)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise AttncError(f"TensorRT could not build the engine: {(log.errors or ['no error logged'])[-1][:400]}",
                             f"see {out_dir / BUILD_LOG}")
        build_s = time.perf_counter() - t0
        engine_path = out_dir / ARTEFACT
        with atomic_path(engine_path, suffix=".plan") as tmp:
            with open(tmp, "wb") as f:
                f.write(plan)
        if cache is not None:
            with atomic_path(Path(timing_cache)) as tmp:
                tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
        info = {
            "flavour": flavour,
            "version": trt.__version__,
            "gpu": gpu or f"none: built for {', '.join(targets)} by TensorRT-RTX on CPU" if flavour == "tensorrt_rtx"
            else gpu,
            "compute_capabilities": targets,
            "precision": precision,
            "strongly_typed": True,
            "fused_ops": fused_ops,
            "plugins": {"mode": plugin_mode, "namespace": plugins.NAMESPACE, "ops": plugin_ops},
            "profiles": [{name: {"min": list(mn), "opt": list(opt), "max": list(mx)}
                          for name, (mn, opt, mx) in profile.items()}],
            "inputs": [_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
            "layers": network.num_layers,
            "attention_layers": len(attention),
            "attention_scales_moved": moved,
            "decomposable_attention_layers": decomposed,
            "workspace": workspace,
            "timing_cache": str(timing_cache) if cache is not None else None,
            "engine_bytes": engine_path.stat().st_size,
            "build_s": round(build_s, 3),
        }
        with atomic_path(out_dir / BUILD_INFO, suffix=".json") as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        return engine_path
    finally:
        log.write(out_dir / BUILD_LOG)


def _parser_error(error) -> str:
    try:
        where = f"node {error.node_name() or error.node()} ({error.node_operator()})"
        return f"{where}: {error.desc()}"
    except Exception:
        return str(error)


def _tensor_info(tensor) -> dict:
    return {"name": tensor.name, "dtype": numpy_dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def numpy_dtype_name(trt_dtype) -> str:
    """numpy dtype name of a ``trt.DataType`` (``DataType.HALF`` -> ``"float16"``)."""
    name = str(trt_dtype).split(".")[-1]
    if name not in plugins.TRT_TO_NUMPY:
        raise AttncError(f"TensorRT data type {name} has no numpy equivalent in attnc", "")
    return plugins.TRT_TO_NUMPY[name]


def _set_compute_capabilities(trt, config, flavour: str, gpu: str | None, wanted, precision: str) -> list[str]:
    if flavour != "tensorrt_rtx" or not hasattr(trt, "ComputeCapability"):
        return [gpu.rsplit("(", 1)[-1].rstrip(")")] if gpu else []
    members = [m for m in trt.ComputeCapability.__members__ if m not in ("NONE", "CURRENT")]
    if wanted:
        targets = [str(w).upper() for w in wanted]
        bad = [t for t in targets if t not in members]
        if bad:
            raise AttncError(f"TensorRT-RTX cannot target {bad[0]}", f"choose from {', '.join(members)}")
    else:
        # TensorRT-RTX 1.7 builds neither bf16 nor fp32 GEMMs for Turing ("FP32 GEMM is not
        # supported" / "HW-specific datatypes: b16"), so sm75 is a default target for fp16 only.
        targets = ["CURRENT"] if gpu else [m for m in members if precision == "fp16" or m != "SM75"]
    config.num_compute_capabilities = len(targets)
    for index, target in enumerate(targets):
        config.set_compute_capability(getattr(trt.ComputeCapability, target), index)
    return targets


def _load_timing_cache(config, flavour: str, path, log: _Log):
    if path is None:
        return None
    if flavour == "tensorrt_rtx":
        # TensorRT-RTX release notes (1.0-1.3): a timing cache forces the ahead-of-time step
        # to query the GPU (no CPU-only builds) and has no effect on the engine.
        log.lines.append(f"[attnc] timing cache {path} ignored: TensorRT-RTX engines do not use it")
        return None
    path = Path(path)
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def describe(artefact: str | os.PathLike) -> dict:
    """Build facts for the manifest (``backend_info``): flavour, version, GPU, plugins, profiles."""
    info_path = Path(artefact).with_name(BUILD_INFO)
    if not info_path.is_file():
        return {}
    return json.loads(info_path.read_text())


# ----------------------------------------------------------------------------- run


def load(artefact: str | os.PathLike, plugin_impl: str = "triton") -> "EngineRunner":
    return EngineRunner(artefact, plugin_impl=plugin_impl)


_TORCH_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "int32": "int32",
                 "int64": "int64", "int8": "int8", "uint8": "uint8", "bool": "bool"}


class EngineRunner:
    """Runs a serialized TensorRT engine on the GPU with torch CUDA tensors.

    Args:
        engine: path to ``engine.plan`` or a directory holding it.
        plugin_impl: how the fused ops of a TensorRT-RTX engine (Python plugins) run:
            ``"triton"``, their Triton kernels, or ``"reference"``, their torch reference
            (slow; for checking the kernels). Chosen per engine: the plugin creators are
            process-wide, but :meth:`infer` tells the plugins which implementation to run
            (``tensorrt_plugins.run_plugins_with``), so engines loaded with different
            choices run side by side. Ignored for engines without Python plugins (TensorRT
            10/11 embeds the kernels).

    ``infer(feeds)`` takes numpy arrays or torch tensors (any device) keyed by input name,
    sets the input shapes (dynamic profiles), binds addresses with ``set_tensor_address``
    and runs ``execute_async_v3`` on a CUDA stream. Outputs come back as numpy (bf16 as
    float32) or, with ``as_torch=True``, as CUDA torch tensors.

    Raises:
        AttncError: no TensorRT, no GPU, or an engine this TensorRT cannot deserialize.
    """

    def __init__(self, engine: str | os.PathLike, plugin_impl: str = "triton"):
        if plugin_impl not in plugins.RUN_IMPLS:
            raise AttncError(f"plugin_impl={plugin_impl!r} is not one of {', '.join(plugins.RUN_IMPLS)}",
                             'use "triton" (the kernels) or "reference" (the torch reference, slow)')
        trt, flavour = import_tensorrt()
        path = Path(engine)
        if path.is_dir():
            path = path / ARTEFACT
        if not path.is_file():
            raise AttncError(f"{path}: no such engine file", "pass the engine.plan an `attnc compile` wrote")
        if gpu_name() is None:
            raise AttncError("TensorRT engines need an NVIDIA GPU to run, and none is visible",
                             "run on a machine with a GPU and driver, or compile with --backend onnxruntime")
        import torch

        info = describe(path)
        plugin_ops = info.get("plugins", {}).get("ops", [])
        if info.get("plugins", {}).get("mode") == "python-v3":
            plugins.register_python_plugins(trt, plugin_ops)
        self._plugin_run = plugins.RUN_IMPLS[plugin_impl]
        self._trt, self._torch = trt, torch
        self._log = _Log(trt)
        self._runtime = trt.Runtime(self._log.logger)
        self.engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise AttncError(f"{flavour} {trt.__version__} cannot load {path}: "
                             f"{(self._log.errors or ['unknown error'])[-1][:300]}",
                             "rebuild the engine with this TensorRT version on this GPU")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_specs = [
            TensorSpec(n, tuple(d if d >= 0 else None for d in self.engine.get_tensor_shape(n)),
                       _numpy_dtype(numpy_dtype_name(self.engine.get_tensor_dtype(n))))
            for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        self._dtypes = {n: numpy_dtype_name(self.engine.get_tensor_dtype(n)) for n in names}

    def infer(self, feeds: Mapping, as_torch: bool = False) -> dict:
        """Run once; ``feeds`` must name every input. Returns ``{output name: array}``."""
        torch = self._torch
        check_feeds(self.input_specs, {k: _shape_only(v) for k, v in feeds.items()})
        keep = []
        for spec in self.input_specs:
            tensor = _to_cuda(torch, feeds[spec.name], self._dtypes[spec.name])
            keep.append(tensor)
            self.context.set_input_shape(spec.name, tuple(tensor.shape))
            self.context.set_tensor_address(spec.name, tensor.data_ptr())
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise AttncError(f"output {name!r} has a data-dependent shape {shape}",
                                 "attnc's runner needs output shapes known from input shapes")
            dtype = getattr(torch, _TORCH_DTYPES[self._dtypes[name]])
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())
        # Python plugins enqueue their op during execute_async_v3, on this thread, with this
        # engine's implementation; the block ends once the stream has run it.
        with plugins.run_plugins_with(self._plugin_run):
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise AttncError(f"TensorRT failed to run the engine: {(self._log.errors or ['?'])[-1][:300]}", "")
            self.stream.synchronize()
        if as_torch:
            return outputs
        return {k: (v.float() if v.dtype == torch.bfloat16 else v).cpu().numpy() for k, v in outputs.items()}


def _numpy_dtype(name: str) -> np.dtype:
    return np.dtype(np.float32) if name == "bfloat16" else np.dtype(name)


def _shape_only(value):
    return np.empty(tuple(value.shape), dtype=np.uint8) if hasattr(value, "shape") else value


def _to_cuda(torch, value, dtype_name: str):
    dtype = getattr(torch, _TORCH_DTYPES[dtype_name])
    tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(value))
    return tensor.to(device="cuda", dtype=dtype).contiguous()
