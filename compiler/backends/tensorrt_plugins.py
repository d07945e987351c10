"""TensorRT plugins for attnc's fused ops: field encoding, shape rules, registration.

Every fused op of ``attnc.plugins.FUSED_OPS`` becomes a TensorRT plugin of the same name
in plugin namespace ``attnc`` (version ``"1"``). The op's contract (``OP_TYPE``,
``ATTRIBUTES``, ``output_shape``) lives in its folder ``plugins/<op>/``; this module only
reads it, so adding a fifth family needs no edit here.

Two registration paths, chosen by what the installed TensorRT offers (see docs/tensorrt.md):

- **TensorRT 10.x/11.x** (``tensorrt.plugin`` present): a Quick Deployable Plugin with
  ``@trtp.register`` (output shape/dtype) and ``@trtp.aot_impl`` (a Triton kernel compiled
  to PTX ahead of time). TensorRT embeds the PTX in the engine, so the engine runs from
  C++ with no Python and no plugin library.
- **TensorRT-RTX** (no ``tensorrt.plugin``, no ``add_plugin_v3``): a Python
  ``IPluginCreatorV3One``/``IPluginV3`` pair registered in the plugin registry, which the
  ONNX parser's fallback importer finds by (op_type, "1", "attnc"). The engine then needs
  the same creators registered in the process that runs it.

Everything that does not need TensorRT is a plain function here and is unit-tested:
attribute <-> ``PluginField`` encoding (the exact bytes TensorRT's ONNX parser produces),
output-shape rules, launch-grid helpers and the kernel-provider interface.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import inspect
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from attnc import DOMAIN
from attnc.compiler.errors import AttncError

NAMESPACE = DOMAIN  # TensorRT plugin namespace == ONNX domain of the fused nodes
PLUGIN_VERSION = "1"

# ----------------------------------------------------------------------------- op contracts


@dataclass(frozen=True)
class PluginSpec:
    """What TensorRT needs to know about one fused op, for one input/output arity.

    A TensorRT plugin has a fixed number of inputs and outputs (Quick Deployable Plugins take
    their inputs as positional parameters; the ONNX parser's plugin importer cannot pass an
    absent optional input), while an ONNX node may leave optional inputs out. So a fused node
    becomes the plugin *variant* of the inputs it has (:func:`variant_name`): the plain op name
    when it has exactly the required inputs and one output, ``<op>_in<indices>_out<n>``
    otherwise (``KernelLinearAttention_in0124_out2``: Q, K, V, state; O and state_out).

    Attributes:
        op_type: the fused op (ONNX op type of the original node).
        fields: attribute name -> ``(kind, default)``; kind is one of ``"float"``, ``"int"``,
            ``"ints"``, ``"floats"``, ``"string"`` (the ONNX attribute kinds the parser
            turns into ``PluginField``s).
        output_shape: ``(input_shapes, **attrs) -> shape`` of output 0; dims may be ints or
            symbolic objects. ``input_shapes`` is positional over the op's inputs, ``None``
            where the node has none.
        inputs: the op's input names, in order (``INPUTS`` of its module).
        required: how many leading inputs every node has.
        present: indices of the inputs this variant takes.
        n_outputs: outputs this variant produces.
        extra_outputs: ``(input_shapes, **attrs) -> [(shape, numpy dtype name)]`` of outputs
            1, 2, ... (``extra_outputs`` of the module); output 0 has input 0's dtype.
        float32_inputs: input indices that stay float32 in fp16/bf16 engines (decay, state).
        absent_inputs: ``(input index, the scalar an absent optional input equals)`` where one
            does (``ABSENT_INPUTS`` of the module; linear attention's decay: 1.0).
    """

    op_type: str
    fields: dict[str, tuple[str, Any]]
    output_shape: Callable[..., list]
    inputs: tuple[str, ...] = ("Q", "K", "V")
    required: int = 3
    present: tuple[int, ...] = (0, 1, 2)
    n_outputs: int = 1
    extra_outputs: Callable[..., list] | None = None
    float32_inputs: tuple[int, ...] = ()
    absent_inputs: tuple[tuple[int, float], ...] = ()

    @property
    def name(self) -> str:
        """The plugin's name (== the op type of the node TensorRT parses)."""
        return variant_name(self.op_type, self.present, self.n_outputs, self.required)

    @property
    def plugin_id(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    def positional(self, values: Sequence) -> list:
        """This variant's per-input ``values`` (one per present input) spread over all of the
        op's inputs, ``None`` where the variant has none (the form kernel providers take)."""
        full = [None] * len(self.inputs)
        for index, value in zip(self.present, values):
            full[index] = value
        return full

    def output_specs(self, input_shapes: Sequence, input_dtype, float32, attrs: dict) -> list[tuple[list, Any]]:
        """``[(shape, dtype)]`` of the variant's outputs from its (present) input shapes.

        ``input_dtype`` is output 0's dtype; ``float32`` is whatever stands for float32 to the
        caller (a ``trt.DataType``, a numpy name), used for the extra outputs' declared dtype."""
        full = self.positional(input_shapes)
        outputs = [(list(self.output_shape(full, **attrs)), input_dtype)]
        if self.n_outputs > 1:
            extra = self.extra_outputs(full, **attrs)[: self.n_outputs - 1]
            for shape, dtype in extra:
                if dtype != "float32":
                    raise AttncError(f"{self.op_type} declares an output of dtype {dtype}",
                                     "extra plugin outputs are float32 or follow input 0")
                outputs.append((list(shape), float32))
        return outputs


_VARIANT = re.compile(r"(?P<op>[A-Za-z]\w*?)_in(?P<present>\d+)_out(?P<outputs>\d+)")


def variant_name(op_type: str, present: Sequence[int], n_outputs: int, required: int) -> str:
    """The plugin name of ``op_type`` with inputs ``present`` and ``n_outputs`` outputs."""
    present = tuple(present)
    if present == tuple(range(required)) and n_outputs == 1:
        return op_type
    return f"{op_type}_in{''.join(str(i) for i in present)}_out{n_outputs}"


def _kind_of(name: str, default) -> str:
    if isinstance(default, bool) or isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, str):
        return "string"
    if isinstance(default, (list, tuple)):
        return "floats" if default and isinstance(default[0], float) else "ints"
    # ``None`` defaults are per-axis integer lists (NeighborhoodAttention's kernel_size, ...).
    return "ints"


def plugin_spec(name: str, present: Sequence[int] | None = None, n_outputs: int | None = None) -> PluginSpec:
    """The :class:`PluginSpec` of a fused op or plugin variant, read from its ``plugins/<op>`` module.

    Args:
        name: an op type (``"KernelLinearAttention"``) or a variant name
            (``"KernelLinearAttention_in0124_out2"``).
        present, n_outputs: the variant's inputs and outputs, when ``name`` is an op type
            (default: the required inputs, one output).

    Raises:
        AttncError: not a registered fused op, its module lacks the contract, or the variant
            asks for inputs or outputs the op does not have.
    """
    from attnc import plugins

    op_type = name
    match = _VARIANT.fullmatch(name) if name not in plugins.FUSED_OPS else None
    if match is not None:
        op_type = match["op"]
        present, n_outputs = tuple(int(c) for c in match["present"]), int(match["outputs"])
    if op_type not in plugins.FUSED_OPS:
        raise AttncError(f"{name!r} is not an attnc fused op",
                         f"known fused ops: {', '.join(plugins.FUSED_OPS)}")
    module = plugins.plugin(op_type)
    attributes = getattr(module, "ATTRIBUTES", None)
    rule = getattr(module, "output_shape", None)
    if attributes is None or rule is None:
        raise AttncError(f"{module.__name__} does not define ATTRIBUTES and output_shape",
                         "every plugins/<op>/__init__.py must state its contract")
    inputs = tuple(getattr(module, "INPUTS", ("Q", "K", "V")))
    required = int(getattr(module, "REQUIRED_INPUTS", 3))
    outputs = tuple(getattr(module, "OUTPUTS", ("O",)))
    present = tuple(range(required)) if present is None else tuple(present)
    n_outputs = 1 if n_outputs is None else int(n_outputs)
    if (present[:required] != tuple(range(required)) or list(present) != sorted(set(present))
            or present[-1] >= len(inputs)):
        raise AttncError(f"{op_type} has inputs {', '.join(inputs)} (the first {required} required); a node "
                         f"with inputs {list(present)} does not fit", "check the node's inputs against the op's contract")
    if not 1 <= n_outputs <= len(outputs) or (n_outputs > 1 and not hasattr(module, "extra_outputs")):
        raise AttncError(f"{op_type} has outputs {', '.join(outputs)}; a node with {n_outputs} does not fit",
                         "check the node's outputs against the op's contract")
    return PluginSpec(op_type, {n: (_kind_of(n, d), d) for n, d in attributes.items()}, rule, inputs, required,
                      present, n_outputs, getattr(module, "extra_outputs", None),
                      tuple(getattr(module, "FLOAT32_INPUTS", ())),
                      tuple(sorted(getattr(module, "ABSENT_INPUTS", {}).items())))


def node_plugin_spec(node: onnx.NodeProto) -> PluginSpec:
    """The plugin variant a fused ``node`` needs, from the inputs and outputs it has.

    Raises:
        AttncError: an output is left out before a later one (TensorRT outputs are positional).
    """
    present = [i for i, name in enumerate(node.input) if name]
    outputs = list(node.output)
    while outputs and not outputs[-1]:
        outputs.pop()
    if "" in outputs:
        raise AttncError(f"node {node.name!r} ({node.op_type}) leaves out output {outputs.index('')} but "
                         "produces a later one", "give every output before the last one a name")
    return plugin_spec(node.op_type, present, len(outputs))


def registered_ops() -> list[str]:
    """Fused op types that have a plugin module (the ones TensorRT plugins exist for)."""
    from attnc import plugins

    ops = []
    for op_type in plugins.FUSED_OPS:
        try:
            plugins.plugin(op_type)
        except ImportError:
            continue
        ops.append(op_type)
    return ops


def output_shape(op_type: str, input_shapes: Sequence[Sequence], attrs: dict) -> list:
    """Output shape of a fused node (delegates to the op's own rule in ``plugins/<op>``)."""
    return list(plugin_spec(op_type).output_shape(input_shapes, **attrs))


# ----------------------------------------------------------------------------- plugin fields
# TensorRT's ONNX parser (onnx-tensorrt ``loadFields``) turns node attributes into
# PluginFields: FLOAT(S) -> kFLOAT32, INT(S) -> kINT32 (narrowed from int64), STRING(S) ->
# kCHAR with a trailing NUL per string. encode_attribute produces exactly those bytes, so
# plugin code can be tested against what the parser will hand it.

FIELD_TYPES = ("FLOAT32", "INT32", "CHAR")  # names of trt.PluginFieldType members we emit

_INT32 = np.iinfo(np.int32)


@dataclass(frozen=True)
class EncodedField:
    """One plugin field, TensorRT-free: ``type`` names a ``trt.PluginFieldType`` member."""

    name: str
    type: str
    data: bytes
    length: int  # element count as TensorRT reports it (bytes for CHAR)


def encode_attribute(attr: onnx.AttributeProto) -> EncodedField:
    """An ONNX node attribute as the ``PluginField`` TensorRT's parser builds from it.

    Raises:
        AttncError: an attribute kind plugins cannot take, or an int outside int32.
    """
    A = onnx.AttributeProto
    if attr.type in (A.FLOAT, A.FLOATS):
        values = [attr.f] if attr.type == A.FLOAT else list(attr.floats)
        return EncodedField(attr.name, "FLOAT32", np.asarray(values, "<f4").tobytes(), len(values))
    if attr.type in (A.INT, A.INTS):
        values = [attr.i] if attr.type == A.INT else list(attr.ints)
        bad = [v for v in values if not _INT32.min <= v <= _INT32.max]
        if bad:
            raise AttncError(f"attribute {attr.name!r} value {bad[0]} does not fit int32, which "
                             "is what TensorRT passes to plugins", "keep integer attributes below 2**31")
        return EncodedField(attr.name, "INT32", np.asarray(values, "<i4").tobytes(), len(values))
    if attr.type in (A.STRING, A.STRINGS):
        values = [attr.s] if attr.type == A.STRING else list(attr.strings)
        data = b"".join(v + b"\0" for v in values)
        return EncodedField(attr.name, "CHAR", data, len(data))
    raise AttncError(f"attribute {attr.name!r} has ONNX type {A.AttributeType.Name(attr.type)}, "
                     "which TensorRT cannot pass to a plugin",
                     "use float, int, string or lists of them for fused-op attributes")


def decode_field(kind: str, type_name: str, data: bytes) -> Any:
    """Back from plugin-field bytes to a Python value of attribute kind ``kind``."""
    if type_name == "FLOAT32":
        values = np.frombuffer(data, "<f4").tolist()
    elif type_name == "INT32":
        values = np.frombuffer(data, "<i4").tolist()
    elif type_name == "CHAR":
        strings = [s.decode() for s in data.split(b"\0")[:-1]] if data.endswith(b"\0") else [data.decode()]
        return strings[0] if kind == "string" else strings
    else:
        raise AttncError(f"plugin field of type {type_name} is not one attnc emits", "")
    if kind in ("float", "int"):
        return values[0] if values else None
    return values


def encode_node_fields(node: onnx.NodeProto) -> list[EncodedField]:
    """Every attribute of ``node`` that its plugin declares, encoded as the parser would."""
    spec = plugin_spec(node.op_type)
    return [encode_attribute(a) for a in node.attribute if a.name in spec.fields]


def decode_fields(op_type: str, fields: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    """``{name: (type_name, bytes)}`` from TensorRT -> attribute dict with defaults filled in."""
    spec = plugin_spec(op_type)
    attrs = {}
    for name, (kind, default) in spec.fields.items():
        attrs[name] = decode_field(kind, *fields[name]) if name in fields else default
    return attrs


# ----------------------------------------------------------------------------- kernels (AOT)


def cdiv(a, b):
    """Ceiling division that works on ints and on TensorRT's symbolic ints (``+ - //``)."""
    return (a + b - 1) // b


@dataclass(frozen=True)
class AotKernel:
    """A kernel compiled ahead of time, as ``trtp.aot_impl`` hands it to TensorRT.

    The kernel's parameters must be ``(*input_ptrs, *scalars, *output_ptrs)`` (TensorRT's
    AOT calling convention).

    Attributes:
        name: the kernel's symbol in ``ptx``.
        ptx: PTX text (TensorRT accepts PTX only for AOT plugins).
        grid: ``(output_shapes) -> (gx, gy, gz)``; shapes hold ints or symbolic dims, so use
            only ``+ - * //`` and :func:`cdiv`.
        block: threads per block ``(bx, by, bz)``.
        shared_mem: dynamic shared memory per block in bytes.
        scalars: ``(input_shapes) -> [int32 scalars]`` passed after the input pointers.
    """

    name: str
    ptx: str
    grid: Callable[[list], tuple]
    block: tuple[int, int, int] = (128, 1, 1)
    shared_mem: int = 0
    scalars: Callable[[list], list] = field(default=lambda shapes: [])


KernelProvider = Callable[..., AotKernel]
"""``kernel_for(op_type, attrs, dtypes, shapes[, n_outputs=...]) -> AotKernel``.

``dtypes`` are numpy dtype names of the inputs (``"float16"``...), ``shapes`` the input
shapes with ``None`` for dims only known at run time; both are positional over the op's
inputs, ``None`` where the node has no such input. ``n_outputs`` is passed only when the
node has more than one output. Raise :class:`AttncError` when there is no kernel for that
combination.
"""

_KERNEL_PROVIDERS: dict[str, KernelProvider] = {}


def register_kernel_provider(op_type: str, provider: KernelProvider) -> None:
    """Use ``provider`` for ``op_type``'s AOT kernel (overrides ``plugins/<op>/kernels.py``)."""
    _KERNEL_PROVIDERS[op_type] = provider


def kernel_for(op_type: str, attrs: dict, dtypes: list, shapes: list, **options) -> AotKernel:
    """The AOT kernel for one fused node: a registered provider, else ``kernel_for`` of
    ``plugins/<op>/kernels.py``.

    ``dtypes`` and ``shapes`` are positional over the op's inputs (``None`` for an input the
    node does not have); ``options`` carries ``n_outputs`` when the node has more than one
    output (the providers of single-output ops never see it).

    Raises:
        AttncError: no Triton kernel exists for the op yet.
    """
    provider = _KERNEL_PROVIDERS.get(op_type)
    if provider is None:
        from attnc import plugins

        package = plugins.FUSED_OPS[op_type]
        try:
            provider = getattr(importlib.import_module(f"{package}.kernels"), "kernel_for", None)
        except ImportError:
            provider = None
        if provider is None:
            folder = package.replace("attnc.", "").replace(".", "/")
            raise AttncError(f"no AOT kernel provider for {op_type}, so TensorRT cannot run it as a plugin",
                             f"compile with --fused-ops inline or --backend onnxruntime, or add "
                             f"kernel_for(op_type, attrs, dtypes, shapes) to {folder}/kernels.py")
    return provider(op_type, attrs, dtypes, shapes, **options)


def compile_triton_ptx(fn, signature: dict[str, str], constexprs: dict[str, Any],
                       arch: int = 90, num_warps: int = 4) -> tuple[str, str, int]:
    """Compile a ``@triton.jit`` kernel to PTX for ``sm_<arch>`` without a GPU, in the form
    ``trtp.aot_impl`` returns it (wraps ``attnc.plugins.kernels_common.compile_for``).

    Returns:
        ``(kernel_name, ptx, shared_mem_bytes)``; launch with ``num_warps * 32`` threads.
    """
    from attnc.plugins.kernels_common import compile_for

    compiled = compile_for(fn, signature, constexprs, arch, num_warps=num_warps)
    return compiled.metadata.name, compiled.asm["ptx"], int(compiled.metadata.shared)


def ptx_param_count(ptx: str, kernel_name: str) -> int:
    """Number of parameters of ``.entry kernel_name`` in ``ptx``.

    TensorRT launches an AOT kernel with exactly ``inputs + scalars + outputs`` arguments,
    while Triton >= 3.3 appends two scratch pointers (global, profile) to every kernel: a
    kernel provider must check the count (and keep both scratch sizes 0).
    """
    start = ptx.index(f".entry {kernel_name}(")
    header = ptx[start:ptx.index(")", start)]
    return header.count(".param")


# ----------------------------------------------------------------------------- TensorRT 10/11: QDP


def _static_shape(desc) -> list:
    dims = []
    for d in desc.shape_expr:
        dims.append(d.constant_value() if d.is_constant else None)
    return dims


def register_qdp(trtp, spec: PluginSpec, kernels: KernelProvider = kernel_for, float32=None) -> None:
    """Register ``spec`` with ``tensorrt.plugin`` (module ``trtp``) as an AOT Quick Deployable Plugin.

    ``trtp.register`` reads the descriptor's signature, so both functions get a real
    ``inspect.Signature`` (tensorrt.plugin's ``_validate`` rules): one ``trtp.TensorDesc`` per
    input of the variant, attributes typed by their kind, a ``TensorDesc`` return (a tuple of
    them for several outputs, which is how QDP counts outputs), and the AOT function annotated
    ``tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]``.

    Args:
        float32: the ``trt.DataType`` of float32 (extra outputs such as linear attention's
            state are float32); default ``tensorrt.DataType.FLOAT``.
    """
    import typing

    import numpy.typing as npt

    if float32 is None and spec.n_outputs > 1:
        float32 = importlib.import_module(trtp.__name__.rsplit(".", 1)[0]).DataType.FLOAT
    # QDP attribute types (tensorrt.plugin docs): int, float, str, and 1-D numpy arrays.
    py_types = {"float": float, "int": int, "string": str,
                "ints": npt.NDArray[np.int32], "floats": npt.NDArray[np.float32]}
    tensor_params = [inspect.Parameter(f"in{i}", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                       annotation=trtp.TensorDesc) for i in spec.present]
    attr_params = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=py_types[kind])
                   for name, (kind, _) in spec.fields.items()]
    returns = trtp.TensorDesc if spec.n_outputs == 1 else typing.Tuple[(trtp.TensorDesc,) * spec.n_outputs]
    desc_signature = inspect.Signature(tensor_params + attr_params, return_annotation=returns)

    def describe(*args, **kwargs):
        bound = desc_signature.bind(*args, **kwargs).arguments
        inputs = [bound[p.name] for p in tensor_params]
        attrs = {name: bound[name] for name in spec.fields if name in bound}
        outs = [trtp.from_shape_expr(trtp.ShapeExprs.from_tuple(tuple(shape)), dtype=dtype)
                for shape, dtype in spec.output_specs([list(d.shape_expr) for d in inputs], inputs[0].dtype,
                                                      float32, attrs)]
        return outs[0] if spec.n_outputs == 1 else tuple(outs)

    describe.__name__ = f"{spec.name}_desc"
    describe.__signature__ = desc_signature
    trtp.register(spec.plugin_id)(describe)

    out_param = inspect.Parameter("outputs", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    tactic_param = inspect.Parameter("tactic", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=int)
    aot_returns = typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams,
                               trtp.SymIntExprs]
    signature = inspect.Signature(tensor_params + attr_params + [out_param, tactic_param],
                                  return_annotation=aot_returns)

    def aot(*args, **kwargs):
        # Bind like the documented schema (inputs, attributes, outputs, tactic), whether
        # TensorRT passes them by position or by name.
        bound = signature.bind(*args, **kwargs).arguments
        inputs = [bound[p.name] for p in tensor_params]
        attrs = {name: bound[name] for name in spec.fields if name in bound}
        outputs = bound["outputs"]
        kernel = kernels(spec.op_type, attrs, spec.positional([trtp_dtype_name(d.dtype) for d in inputs]),
                         spec.positional([_static_shape(d) for d in inputs]),
                         **({"n_outputs": spec.n_outputs} if spec.n_outputs > 1 else {}))
        launch = trtp.KernelLaunchParams()
        out_shapes = [list(o.shape_expr) for o in outputs]
        # Providers may give a 1-, 2- or 3-D grid (as Triton launch grids are); TensorRT wants 3.
        launch.grid_x, launch.grid_y, launch.grid_z = (tuple(kernel.grid(out_shapes)) + (1, 1))[:3]
        launch.block_x, launch.block_y, launch.block_z = kernel.block
        launch.shared_mem = kernel.shared_mem
        scalars = kernel.scalars(spec.positional([list(d.shape_expr) for d in inputs]))
        extra = trtp.SymIntExprs(len(scalars))
        for i, value in enumerate(scalars):
            extra[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, launch, extra

    aot.__name__ = f"{spec.name}_aot"
    aot.__signature__ = signature
    trtp.aot_impl(spec.plugin_id)(aot)


def trtp_dtype_name(dtype) -> str:
    """numpy dtype name of a ``trt.DataType`` (works on the enum's name, no TensorRT import)."""
    return TRT_TO_NUMPY[str(dtype).split(".")[-1]]


TRT_TO_NUMPY = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


# ----------------------------------------------------------------------------- TensorRT-RTX: V3One


def register_python_plugins(trt, ops: Sequence[str]) -> list[str]:
    """Register a Python ``IPluginCreatorV3One`` for each op in ``ops`` with ``trt``'s registry.

    Used where ``tensorrt.plugin`` is missing (TensorRT-RTX). ``ops`` are plugin (variant)
    names. The creators are process-wide, but which function runs an op is not part of them:
    a plugin's ``enqueue`` calls the run function :func:`run_plugins_with` set around
    ``execute_async_v3`` (``attnc.runtime.Engine`` does, per engine), and raises without one
    (a build needs none). Returns the names registered (already-registered ones are skipped,
    so this is idempotent).
    """
    registry = trt.get_plugin_registry()
    done = []
    for name in ops:
        if registry.get_creator(name, PLUGIN_VERSION, NAMESPACE) is not None:
            done.append(name)
            continue
        creator = _make_creator(trt, plugin_spec(name))
        if not registry.register_creator(creator, NAMESPACE):
            raise AttncError(f"TensorRT refused to register the {name} plugin", "see the TensorRT log")
        _CREATORS.append(creator)  # the registry keeps a raw pointer: keep the Python object alive
        done.append(name)
    return done


@contextlib.contextmanager
def run_plugins_with(run: Callable):
    """Within this block, the Python plugins TensorRT enqueues run their op with ``run``
    (one of :data:`RUN_IMPLS`, or any function with their signature).

    ``run(name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream)``, ``name``
    being the plugin variant's. TensorRT calls a plugin's ``enqueue`` while
    ``execute_async_v3`` runs, on the calling thread, so wrapping that call is enough; the
    choice is a context variable, so engines run by other threads keep their own.
    """
    token = _PLUGIN_RUN.set(run)
    try:
        yield
    finally:
        _PLUGIN_RUN.reset(token)


_CREATORS: list = []
_PLUGIN_RUN: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("attnc_plugin_run", default=None)
_FIELD_TYPE_OF_KIND = {"float": "FLOAT32", "floats": "FLOAT32", "int": "INT32", "ints": "INT32",
                       "string": "CHAR"}


class _SymDim:
    """A ``trt.IDimensionExpr`` with ``+ - * //`` (through the ``IExprBuilder``), so the ops'
    output-shape rules (``v[3] + normalize``) run unchanged on TensorRT's symbolic dims."""

    def __init__(self, trt, builder, expr):
        self.trt, self.builder, self.expr = trt, builder, expr

    @staticmethod
    def unwrap(trt, builder, value):
        if isinstance(value, _SymDim):
            return value.expr
        return builder.constant(int(value)) if isinstance(value, int) else value

    def _op(self, name, other, reverse=False):
        other = _SymDim.unwrap(self.trt, self.builder, other)
        a, b = (other, self.expr) if reverse else (self.expr, other)
        return _SymDim(self.trt, self.builder, self.builder.operation(getattr(self.trt.DimensionOperation, name), a, b))

    def __add__(self, other):
        return self._op("SUM", other)

    __radd__ = __add__

    def __sub__(self, other):
        return self._op("SUB", other)

    def __rsub__(self, other):
        return self._op("SUB", other, reverse=True)

    def __mul__(self, other):
        return self._op("PROD", other)

    __rmul__ = __mul__

    def __floordiv__(self, other):
        return self._op("FLOOR_DIV", other)


def _make_creator(trt, spec: PluginSpec):
    def field_bytes(f) -> bytes:
        return np.asarray(f.data).tobytes()

    class Plugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attrs: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name, self.plugin_version, self.plugin_namespace = spec.name, PLUGIN_VERSION, NAMESPACE
            self.num_outputs = spec.n_outputs
            self.attrs = attrs

        def get_capability_interface(self, _type):
            return self

        def get_output_data_types(self, input_types):
            return [input_types[0]] + [trt.DataType.FLOAT] * (spec.n_outputs - 1)

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            dims = [[_SymDim(trt, expr_builder, d) for d in i] for i in inputs]
            outs = spec.output_specs(dims, None, None, self.attrs)
            return [trt.DimsExprs([_SymDim.unwrap(trt, expr_builder, d) for d in shape]) for shape, _ in outs]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            # Inputs and output 0 share Q's float type; the extra outputs (state_out) are float32,
            # and the contract's float32 inputs (decay, state) may be either.
            if pos >= num_inputs + 1:
                return desc.type == trt.DataType.FLOAT
            if pos < num_inputs and spec.present[pos] in spec.float32_inputs and desc.type == trt.DataType.FLOAT:
                return True
            return desc.type in (trt.DataType.FLOAT, trt.DataType.HALF, trt.DataType.BF16) \
                and desc.type == in_out[0].desc.type

        def configure_plugin(self, inputs, outputs):
            pass

        def on_shape_change(self, inputs, outputs):
            self.shapes = [tuple(i.dims) for i in inputs], [tuple(o.dims) for o in outputs]

        def get_workspace_size(self, inputs, outputs):
            return 0

        def get_fields_to_serialize(self):
            fields = []
            for name, value in self.attrs.items():
                if value is None:
                    continue
                kind = spec.fields[name][0]
                proto = onnx.helper.make_attribute(name, value if value is not None else [])
                enc = encode_attribute(proto)
                arr = np.frombuffer(enc.data, {"FLOAT32": np.float32, "INT32": np.int32, "CHAR": np.int8}[enc.type])
                fields.append(trt.PluginField(name, arr, getattr(trt.PluginFieldType, _FIELD_TYPE_OF_KIND[kind])))
            return trt.PluginFieldCollection(fields)

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            run = _PLUGIN_RUN.get()
            if run is None:
                raise RuntimeError(f"attnc {spec.name} plugin: no run-time implementation; run the engine with "
                                   "attnc.runtime.Engine or inside tensorrt_plugins.run_plugins_with(...)")
            run(spec.name, self.attrs, inputs, input_desc, outputs, output_desc, stream)

        def clone(self):
            return Plugin(dict(self.attrs))

    class Creator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name, self.plugin_namespace, self.plugin_version = spec.name, NAMESPACE, PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection([
                trt.PluginField(name, np.array([]), getattr(trt.PluginFieldType, _FIELD_TYPE_OF_KIND[kind]))
                for name, (kind, _) in spec.fields.items()])

        def create_plugin(self, name, fields, phase):
            raw = {}
            for f in fields:
                raw[f.name] = (str(f.type).split(".")[-1], field_bytes(f))
            return Plugin(decode_fields(spec.name, raw))

    return Creator()


# ----------------------------------------------------------------------------- Python run time
# TensorRT-RTX's Python plugins execute their op through the run function set by
# run_plugins_with: ``triton_run`` (the op's Triton launcher, ``plugins/<op>/kernels.py``'s
# ``run``) or ``torch_reference_run`` (its torch ``reference``, a per-token loop for causal
# linear attention); ``attnc.runtime.Engine(..., plugin_impl=...)`` picks one of RUN_IMPLS.


_TYPESTR = {"FLOAT": ("<f4", None), "HALF": ("<f2", None), "BF16": ("<i2", "bfloat16")}


def triton_run(name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream) -> None:
    """Run a fused op inside a Python-plugin engine with its Triton kernels on TensorRT's stream.

    TensorRT-RTX's Python plugins call this from ``enqueue`` with their variant's ``name``
    (:func:`fused_outputs` computes the outputs); TensorRT's device pointers are wrapped as
    torch tensors through ``__cuda_array_interface__`` (bf16 travels as int16).
    """
    _run_on_stream(fused_outputs, name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream)


def torch_reference_run(name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream) -> None:
    """:func:`triton_run` with the op's torch ``reference`` (:func:`reference_outputs`): slow
    (causal linear attention loops over tokens in Python), for checking the kernels."""
    _run_on_stream(reference_outputs, name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream)


RUN_IMPLS: dict[str, Callable] = {"triton": triton_run, "reference": torch_reference_run}


@functools.cache
def _cached_spec(name: str) -> PluginSpec:
    return plugin_spec(name)


def _run_on_stream(outputs_of, name, attrs, input_ptrs, input_descs, output_ptrs, output_descs, stream) -> None:
    import torch

    def wrap(ptr, desc):
        typestr, view = _TYPESTR[str(desc.type).split(".")[-1]]
        holder = type("CudaArray", (), {})()
        holder.__cuda_array_interface__ = {"shape": tuple(desc.dims), "typestr": typestr,
                                           "data": (int(ptr), False), "version": 3, "stream": None}
        tensor = torch.as_tensor(holder, device="cuda")
        return tensor.view(getattr(torch, view)) if view else tensor

    spec = _cached_spec(name)
    inputs = [wrap(p, d) for p, d in zip(input_ptrs, input_descs)]
    outs = [wrap(p, d) for p, d in zip(output_ptrs, output_descs)]
    # The whole op, not only the copies, goes on TensorRT's stream: the inputs are ready in
    # that stream's order, and the next layer reads the outputs in it. (Triton launches on
    # torch's current stream, which this context sets.)
    with torch.cuda.stream(torch.cuda.ExternalStream(int(stream))):
        results = outputs_of(spec, attrs, inputs)
        for out, result in zip(outs, results):
            out.copy_(result.to(out.dtype))


def fused_outputs(spec: PluginSpec, attrs: dict, inputs: Sequence) -> list:
    """The op's Triton launcher on a plugin variant's (present) ``inputs``: one tensor per
    output of the variant, as :func:`reference_outputs`.

    The launcher is ``run(attrs, inputs, n_outputs)`` of ``plugins/<op>/kernels.py``, which
    takes every attribute (``None`` or missing ones here get the op's defaults) and the inputs at
    their contract positions (``None`` for absent ones). An op without one (or where triton does
    not import) runs its ``reference``, with a warning once per op.
    """
    run = _kernels_run(spec.op_type)
    if run is None:
        return reference_outputs(spec, attrs, inputs)
    full = {name: default for name, (_, default) in spec.fields.items()}
    full.update({name: value for name, value in attrs.items() if value is not None})
    return list(run(full, spec.positional(inputs), spec.n_outputs))[: spec.n_outputs]


@functools.cache
def _kernels_run(op_type: str) -> Callable | None:
    from attnc import plugins as fused

    package = fused.FUSED_OPS[op_type]
    try:
        run = getattr(importlib.import_module(f"{package}.kernels"), "run", None)
        reason = f"{package}.kernels has no run(attrs, inputs, n_outputs)"
    except ImportError as exc:
        run, reason = None, f"{package}.kernels does not import ({exc})"
    if run is None:
        warnings.warn(f"attnc {op_type} plugin runs its torch reference (slow): {reason}", stacklevel=2)
    return run


def reference_outputs(spec: PluginSpec, attrs: dict, inputs: Sequence) -> list:
    """The op's torch ``reference`` on a plugin variant's (present) ``inputs``: one tensor per
    output of the variant. Inputs are matched to the reference's tensor parameters by their
    position in the op's contract; several outputs are asked for with ``return_state=True``."""
    from attnc import plugins as fused

    reference = fused.plugin(spec.op_type).reference
    params = inspect.signature(reference).parameters
    tensor_params = [n for n, p in params.items() if "Tensor" in str(p.annotation)]
    kwargs = {tensor_params[i]: t for i, t in zip(spec.present, inputs)}
    kwargs.update({k: v for k, v in attrs.items() if k in params and v is not None})
    if spec.n_outputs > 1:
        kwargs["return_state"] = True
        return list(reference(**kwargs))[: spec.n_outputs]
    return [reference(**kwargs)]
