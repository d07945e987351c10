"""Reading and writing ONNX files with errors that say what to do, and atomic writes.

Every file attnc produces (models, engines, reports, manifests) goes through
:func:`atomic_path` so a crash or a failed build never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import numpy as np
import onnx

from attnc import DOMAIN
from attnc.compiler.errors import AttncError

# The default-domain opsets the passes were written and tested against. Exports
# from torch land in 17..23; 24..28 appear once attnc lowers to newer standard ops
# (Attention 23/24, LinearAttention 27).
SUPPORTED_OPSETS = range(17, onnx.defs.onnx_opset_version() + 1)
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", DOMAIN, "pkg.onnxscript.torch_lib",
                  "pkg.onnxscript.torch_lib.common", "pkg.torch.onnx"}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed, so no partial output is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset for the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise AttncError("the model imports no default ONNX opset",
                     "re-export it with torch.onnx.export or `attnc export`")


def check_opset(model: onnx.ModelProto, source: str = "model") -> int:
    """Return the default opset, or raise if attnc's passes do not know it."""
    opset = default_opset(model)
    if opset not in SUPPORTED_OPSETS:
        raise AttncError(
            f"{source} uses ONNX opset {opset}, which attnc does not support "
            f"(supported: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1})",
            "re-export with an opset in that range, e.g. `attnc export --opset 18`, "
            "or convert with onnx.version_converter",
        )
    return opset


def load_model(path: str | os.PathLike, *, check: bool = True) -> onnx.ModelProto:
    """Load an ONNX model and check it is one attnc can read.

    Weights the file keeps in external data stay there: initializers of :data:`LIGHT_BYTES` and more become
    mapped stubs (:func:`map_external`) that the passes, ONNX Runtime and the writers read from the weights file,
    so a model of any size loads in the memory of its graph. Smaller external tensors are read in. A file of
    :data:`MAP_EMBEDDED_BYTES` and more maps the weights inside it the same way (:func:`_load_mapping_embedded`).

    Raises:
        AttncError: the file or its weights file is missing, is not ONNX, is truncated, fails the ONNX
            checker, or uses an unsupported opset.
    """
    path = Path(path)
    if not path.is_file():
        raise AttncError(f"{path}: no such file", "check the path")
    try:
        model = _load_mapping_embedded(path) if path.stat().st_size >= MAP_EMBEDDED_BYTES else None
        if model is None:
            model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... depending on build
        raise AttncError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})",
            "the file is corrupt, truncated or not ONNX; re-export it",
        ) from None
    if not model.graph.node and not model.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message.
        raise AttncError(f"{path} holds no ONNX graph (empty, truncated or not ONNX)",
                         "re-export it with `attnc export` or torch.onnx.export")
    map_external(model, path.parent, str(path))
    if check:
        check_opset(model, str(path))
        try:
            onnx.checker.check_model(checkable(model), full_check=False)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise AttncError(f"{path} is not a valid ONNX model: {first}",
                             "re-export it; `python -m onnx.checker` shows the details") from None
    return model


def checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """What the ONNX checker gets for ``model``: a light copy (:func:`light_copy`) whose heavy initializers (stubs,
    mapped weights) are graph inputs of their type and shape instead, so checking neither serialises the weights
    nor looks for files; the initializers' bytes were checked against their shapes when loaded."""
    light = light_copy(model)
    heavy = [init for init in light.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL]
    if not heavy:
        return light
    inputs = {i.name for i in light.graph.input}
    kept = [init for init in light.graph.initializer if init.data_location != onnx.TensorProto.EXTERNAL]
    del light.graph.initializer[:]
    light.graph.initializer.extend(kept)
    light.graph.input.extend(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
                             for init in heavy if init.name not in inputs)
    return light


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically; a large one (:func:`is_large`) with its weights in ``<name>.data`` beside it
    (:func:`write_external`). ``model`` is left as it was."""
    path = Path(path)
    if not is_large(model):
        with atomic_path(path, suffix=".onnx") as tmp:
            onnx.save_model(model, str(tmp))
        return path
    write_external(model, path)
    return path


# Protobuf serialises a message of at most 2 GiB. Past this size attnc keeps the weights out of everything it
# serialises: shape inference sees the graph without them (as it always does: :func:`light_copy`), ONNX Runtime gets
# them as arrays (:func:`ort_session`), the checker and TensorRT's parser read the model from a file with external
# data, and saved models keep their weights in ``<name>.data``.
LARGE_MODEL_BYTES = 1_800_000_000
LIGHT_BYTES = 1 << 16   # initializers this large or larger are left out of light copies
_ELSEWHERE = "attnc-weights-elsewhere"   # the external-data location of a light copy's stubs (no such file)
# initializer types ort_session hands ONNX Runtime as numpy arrays (others stay in the serialised model)
_NUMPY_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                          onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16,
                          onnx.TensorProto.UINT16, onnx.TensorProto.INT32, onnx.TensorProto.UINT32,
                          onnx.TensorProto.INT64, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL})


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is past :data:`LARGE_MODEL_BYTES` (its initializers' data, else its whole size: protobuf
    cannot even size a message past 2 GiB) or holds mapped weights (:func:`map_external`): either way its weights
    stay out of what attnc serialises."""
    if any(_mapped(init) for init in model.graph.initializer):
        return True   # its weights are in a file: it is written, checked and parsed as a model past 2 GiB is
    if sum(_data_bytes(init) for init in model.graph.initializer) > LARGE_MODEL_BYTES:
        return True
    try:
        return model.ByteSize() > LARGE_MODEL_BYTES
    except Exception:   # noqa: BLE001 - google.protobuf.message.EncodeError: over 2 GiB
        return True


def _data_bytes(init: onnx.TensorProto) -> int:
    """The size of ``init``'s raw data from its shape and type (reading ``raw_data`` would copy it, and protobuf's
    ``ByteSize`` walks it); 0 without raw data."""
    if not init.HasField("raw_data"):
        return 0
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
    except Exception:   # noqa: BLE001 - a type numpy has no dtype for: count bytes
        itemsize = 1
    return int(np.prod(init.dims, dtype=np.int64)) * itemsize


def _heavy(init: onnx.TensorProto, min_bytes: int, types: Collection[int] | None) -> bool:
    """Whether a light copy leaves ``init``'s data out: raw data of at least ``min_bytes``, of one of ``types``
    (any when None)."""
    return init.data_location != onnx.TensorProto.EXTERNAL and (types is None or init.data_type in types) \
        and _data_bytes(init) >= min_bytes


def light_initializer(init: onnx.TensorProto, min_bytes: int | None = None) -> onnx.TensorProto:
    """``init`` itself, or a stub of it (name, type, shape, no data) where it holds ``min_bytes`` of data or more:
    for a probe's subgraph, whose session then gets the data from the model (``ort_session(weights_from=...)``)."""
    return _stub(init) if _heavy(init, LIGHT_BYTES if min_bytes is None else min_bytes, _NUMPY_TYPES) else init


def _stub(init: onnx.TensorProto) -> onnx.TensorProto:
    """``init``'s name, type and shape, its data marked external at a location that does not exist."""
    stub = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims,
                            data_location=onnx.TensorProto.EXTERNAL)
    entry = stub.external_data.add()
    entry.key, entry.value = "location", _ELSEWHERE
    return stub


# Mapped stubs (map_external): an initializer whose data stays in the model's weights file. Its external data names
# the file by its absolute path, the offset and the length, and under _MAPPED the file's identity when the model was
# loaded, so a file replaced since is an error rather than other weights.
_MAPPED = "attnc-mapped"


def map_external(model: onnx.ModelProto, folder: str | os.PathLike, source: str = "the model") -> onnx.ModelProto:
    """Resolve ``model``'s external data (files relative to ``folder``), in place: main-graph initializers of
    :data:`LIGHT_BYTES` and more become mapped stubs, read from their file when used (:func:`initializer_array`,
    :func:`ort_session`, :func:`write_external`); every other tensor stored outside is read in.

    Raises:
        AttncError: a location outside ``folder``, a missing weights file, or a range the file does not hold.
    """
    folder = Path(folder).absolute()
    for tensor, initializer in _tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL or _is_stub(tensor) or _mapped(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise AttncError(f"{source}: tensor {tensor.name!r} names its data file {location!r}, which is not a "
                             "path inside the model's folder", "re-export the model with its weights file beside it")
        file = Path(os.path.normpath(folder / location))
        if not file.is_file():
            raise AttncError(f"{source}: the weights file {location!r} of tensor {tensor.name!r} is not in {folder}",
                             "keep the weights file the exporter wrote (ONNX names it relative to the model's "
                             "folder) beside the model")
        stat = file.stat()
        offset = int(info.get("offset") or 0)
        length = int(info["length"]) if info.get("length") else stat.st_size - offset
        try:
            needed = int(np.prod(tensor.dims, dtype=np.int64)) * \
                onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:   # noqa: BLE001 - a type numpy has no dtype for: the file's range is all there is
            needed = length
        if offset < 0 or length != needed or offset + length > stat.st_size:
            raise AttncError(f"{source}: tensor {tensor.name!r} needs {needed} bytes at offset {offset} of "
                             f"{location!r}, which holds {stat.st_size} (length {length})",
                             "the weights file is truncated or belongs to another export of the model; re-export it")
        if initializer and tensor.data_type in _NUMPY_TYPES and length >= LIGHT_BYTES:
            _point_at(tensor, str(file), offset, length, _identity(stat))
        else:
            with open(file, "rb") as f:
                f.seek(offset)
                tensor.raw_data = f.read(length)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return model


# An .onnx file this large has the heavy initializers inside it mapped too, where they lie in the file, rather than
# read by protobuf (which would hold them, and copy them again on every read of ``raw_data``).
MAP_EMBEDDED_BYTES = 256 << 20
_GRAPH, _INITIALIZER, _RAW_DATA, _DATA_LOCATION = 7, 5, 9, 14   # ModelProto.graph, GraphProto.initializer, TensorProto


def _load_mapping_embedded(path: Path) -> onnx.ModelProto | None:
    """``path``'s model with each main-graph initializer whose ``raw_data`` holds :data:`LIGHT_BYTES` or more (of
    a numpy type) a mapped stub pointing at those bytes inside the ``.onnx`` file: the file's protobuf encoding
    is walked (ModelProto.graph -> GraphProto.initializer -> TensorProto.raw_data), and protobuf parses a copy
    without those fields. None where the file is not laid out so (protobuf's own parse then reports it)."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            graphs = [fld for fld in _fields(buf, 0, len(buf)) if fld[0] == _GRAPH and fld[1] == 2]
            if len(graphs) != 1:
                return None
            _, _, graph_at, graph_start, graph_end = graphs[0]
            parts, ranges = [], []
            for field, wire, at, start, end in _fields(buf, graph_start, graph_end):
                if field == _INITIALIZER and wire == 2:
                    tensor = list(_fields(buf, start, end))
                    raw = [t for t in tensor if t[0] == _RAW_DATA and t[1] == 2]
                    types = [_varint(buf, t[3])[0] for t in tensor if t[0] == 2 and t[1] == 0]  # data_type
                    if len(raw) == 1 and len(types) == 1 and types[0] in _NUMPY_TYPES \
                            and raw[0][4] - raw[0][3] >= LIGHT_BYTES \
                            and not any(t[0] == _DATA_LOCATION for t in tensor):
                        kept = b"".join(buf[t[2]:t[4]] for t in tensor if t is not raw[0])
                        parts.append(_key(field, 2) + _encode_varint(len(kept)) + kept)
                        ranges.append((raw[0][3], raw[0][4] - raw[0][3]))   # the bytes' offset and length
                        continue
                    ranges.append(None)
                parts.append(buf[at:end])
            graph = b"".join(parts)
            head, tail = buf[:graph_at], buf[graph_end:]
        except (IndexError, ValueError):
            return None
    model = onnx.ModelProto.FromString(head + _key(_GRAPH, 2) + _encode_varint(len(graph)) + graph + tail)
    if len(model.graph.initializer) != len(ranges):
        return None
    identity = _identity(path.stat())
    for init, where in zip(model.graph.initializer, ranges):
        if where is not None:
            _point_at(init, str(path.absolute()), *where, identity)
    return model


def _varint(buf, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The protobuf fields encoded in ``buf[start:end]``: ``(number, wire type, where the field starts, where its
    payload starts, where it ends)``."""
    pos = start
    while pos < end:
        key, payload = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            stop = _varint(buf, payload)[1]
        elif wire == 1:
            stop = payload + 8
        elif wire == 2:
            length, payload = _varint(buf, payload)
            stop = payload + length
        elif wire == 5:
            stop = payload + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if stop > end:
            raise ValueError("a field runs past its message")
        yield key >> 3, wire, pos, payload, stop
        pos = stop


def _identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int, identity: str | None = None) -> None:
    """Make ``tensor`` ONNX external data at ``location``'s byte range, in place; with the file's ``identity``, a
    mapped stub (:func:`map_external`)."""
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entries = [("location", location), ("offset", str(offset)), ("length", str(length))]
    for key, value in entries + ([(_MAPPED, identity)] if identity is not None else []):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _mapped(init: onnx.TensorProto) -> bool:
    return init.data_location == onnx.TensorProto.EXTERNAL and any(e.key == _MAPPED for e in init.external_data)


def _mapped_file(init: onnx.TensorProto) -> tuple[str, int, int]:
    """A mapped stub's ``(path, offset, length)``, once its file is checked to be the one loaded."""
    info = {e.key: e.value for e in init.external_data}
    path = info["location"]
    try:
        same = _identity(os.stat(path)) == info[_MAPPED]
    except OSError:
        same = False
    if not same:
        raise AttncError(f"the weights file {path} changed or went away while attnc was reading the model's "
                         f"weights (tensor {init.name!r})",
                         "leave the model's files as they are until the command ends, then run it again")
    return path, int(info["offset"]), int(info["length"])


def _mapped_array(init: onnx.TensorProto) -> np.ndarray:
    """A read-only array over a mapped stub's data in its file (pages are read when touched; unaligned where the
    data lies inside a ``.onnx`` file, which numpy handles)."""
    path, offset, _ = _mapped_file(init)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(init.dims)).view(np.ndarray)


def _raw_array(init: onnx.TensorProto) -> np.ndarray:
    """An initializer's data as an array without conversion: mapped from its file, or over its raw data."""
    if _mapped(init):
        return _mapped_array(init)
    return np.frombuffer(init.raw_data, onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).reshape(
        tuple(init.dims))


def _tensors(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """Every tensor ``model`` holds, with whether it is a main-graph initializer: initializers of its graphs and
    tensor attributes of their nodes and of its functions' nodes, subgraphs included."""

    def nodes(node_list) -> Iterator[tuple[onnx.TensorProto, bool]]:
        for node in node_list:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t, False
                for tensor in attr.tensors:
                    yield tensor, False
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    yield from walk(graph, False)

    def walk(graph: onnx.GraphProto, main: bool) -> Iterator[tuple[onnx.TensorProto, bool]]:
        for init in graph.initializer:
            yield init, main
        yield from nodes(graph.node)

    yield from walk(model.graph, True)
    for function in model.functions:
        yield from nodes(function.node)


def _embed_mapped_attributes(model: onnx.ModelProto) -> None:
    """Mapped tensors that a pass moved out of the initializers (into a node's attribute) get their data, in
    place: a file or a session gets ONNX's own external data for initializers only."""
    from onnx import numpy_helper

    for tensor, initializer in list(_tensors(model)):
        if not initializer and _mapped(tensor):
            tensor.CopyFrom(numpy_helper.from_array(_mapped_array(tensor), tensor.name))


# stand-in stubs (weights_standing_in): token -> the initializer a working copy's stub stands for; the tokens of
# each open block, innermost last (with_weights resolves its own block's only)
_STANDING_IN: dict[str, onnx.TensorProto] = {}
_OPEN: list[set[str]] = []
_TOKEN = "attnc-stands-for"


def _token(init: onnx.TensorProto) -> str | None:
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return next((e.value for e in init.external_data if e.key == _TOKEN), None)


def _standing_for(init: onnx.TensorProto) -> onnx.TensorProto | None:
    """The initializer a stand-in stub (:func:`weights_standing_in`) stands for; None for any other tensor."""
    token = _token(init)
    return _STANDING_IN.get(token) if token else None


def initializer_array(init: onnx.TensorProto) -> np.ndarray:
    """``init``'s value as numpy, also where it is a stand-in stub (the data of the initializer it stands for) or a
    mapped one (read-only, over its file)."""
    from onnx import numpy_helper

    init = _standing_for(init) or init
    return _mapped_array(init) if _mapped(init) else numpy_helper.to_array(init, base_dir="")


@contextlib.contextmanager
def weights_standing_in(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """A working copy of ``model`` whose initializers of :data:`LIGHT_BYTES` and more are stubs standing for
    ``model``'s own (no weight is copied; ``model`` must stay as it is while the block runs). Inside, the passes
    read a stub's value through :func:`initializer_array` (``passes.core.constant_value``) and ONNX Runtime gets its
    data (:func:`ort_session`), so copying the working model costs its graph only; :func:`with_weights` puts the
    data into a result before the block ends. Blocks nest: a stub of an outer block (and a mapped weight) stays as
    it is in an inner block's copy and its result."""
    light = light_copy(model, types=_NUMPY_TYPES)
    originals = {init.name: init for init in model.graph.initializer}
    tokens: set[str] = set()
    for stub in light.graph.initializer:
        if _is_stub(stub) and _token(stub) is None:
            token = f"{id(light):x}/{stub.name}"
            _STANDING_IN[token] = originals[stub.name]
            tokens.add(token)
            entry = stub.external_data.add()
            entry.key, entry.value = _TOKEN, token
    _OPEN.append(tokens)
    try:
        yield light
    finally:
        _OPEN.remove(tokens)
        for token in tokens:
            _STANDING_IN.pop(token, None)


def with_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (in place) with every stub standing in for the innermost open :func:`weights_standing_in` block
    replaced by a copy of the initializer it stands for: among its graphs' initializers and its nodes' tensor
    attributes, in subgraphs and functions too (a pass may have moved a weight into a node)."""
    own = _OPEN[-1] if _OPEN else set()
    for tensor, _ in list(_tensors(model)):
        token = _token(tensor)
        if token in own:
            name = tensor.name
            tensor.CopyFrom(_STANDING_IN[token])
            tensor.name = name
    return model


def on_stand_in_weights(fn: Callable) -> Callable:
    """Run the pass ``fn(model, ...)`` on a working copy of ``model`` with stand-in weights
    (:func:`weights_standing_in`); a model it returns (alone, or first in a tuple) gets the data back
    (:func:`with_weights`). Its own copies of the model then cost the graph only, and inside another such pass
    nothing is stood in twice."""

    @functools.wraps(fn)
    def run(model: onnx.ModelProto, *args, **kwargs):
        with weights_standing_in(model) as work:
            result = fn(work, *args, **kwargs)
            out = result[0] if isinstance(result, tuple) and result else result
            if isinstance(out, onnx.ModelProto):
                with_weights(out)
        return result

    return run


def _is_stub(init: onnx.TensorProto) -> bool:
    return init.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == _ELSEWHERE for e in init.external_data)


def light_copy(model: onnx.ModelProto, min_bytes: int | None = None, types: Collection[int] | None = None
               ) -> onnx.ModelProto:
    """A copy of ``model`` whose main-graph initializers of at least ``min_bytes`` (default :data:`LIGHT_BYTES`; of
    ``types``) are stubs: name, type and shape, no data (marked as external data that is nowhere). Built field by
    field, the weights' data is never copied: for shape inference of a model of any size, or the model ONNX
    Runtime gets the weights of apart (:func:`ort_session`). It cannot be checked or saved as it is. Tensors
    already outside (stubs, mapped weights) stay as they are."""
    min_bytes = LIGHT_BYTES if min_bytes is None else min_bytes
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _set(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _set(light.graph, field, value)
    light.graph.initializer.extend(_stub(i) if _heavy(i, min_bytes, types) else i for i in model.graph.initializer)
    return light


def _set(message, field, value) -> None:
    if field.is_repeated:
        getattr(message, field.name).extend(value)
    elif field.message_type is not None:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def write_external(model: onnx.ModelProto, path: str | os.PathLike, min_bytes: int = 1024) -> Path:
    """Write ``model`` to ``path`` with the data of its initializers of at least ``min_bytes`` in ``<name>.data``
    beside it (offsets aligned to 4 KiB), each file atomically, mapped weights (:func:`map_external`) with them;
    ``model`` is left as it is (``onnx.save_model``'s external data clears the weights of the model it saves)."""
    path = Path(path)
    location = path.name + ".data"
    light = light_copy(model, min_bytes)
    _embed_mapped_attributes(light)
    originals = {init.name: init for init in model.graph.initializer}
    with atomic_path(path.with_name(location), suffix=".data") as data_tmp, \
            atomic_path(path, suffix=".onnx") as model_tmp:
        offset = 0
        with open(data_tmp, "wb") as data:
            for stub in light.graph.initializer:
                if not (_is_stub(stub) or _mapped(stub)):
                    continue
                offset += -offset % 4096
                data.seek(offset)
                length = _write_data(data, stub if _mapped(stub) else originals[stub.name])
                _point_at(stub, location, offset, length)
                offset += length
        with open(model_tmp, "wb") as f:
            f.write(light.SerializeToString())
    return path


def _write_data(out, init: onnx.TensorProto, chunk: int = 1 << 26) -> int:
    """Write ``init``'s data to the file ``out``: a mapped stub's copied from its file (in pieces, not read into
    memory as a whole), another's raw data. Returns the bytes written."""
    if not _mapped(init):
        raw = init.raw_data
        out.write(raw)
        return len(raw)
    path, offset, length = _mapped_file(init)
    with open(path, "rb") as source:
        source.seek(offset)
        left = length
        while left:
            piece = source.read(min(chunk, left))
            if not piece:
                raise AttncError(f"the weights file {path} ended inside tensor {init.name!r}",
                                 "leave the model's files as they are until the command ends, then run it again")
            out.write(piece)
            left -= len(piece)
    return length


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The weights files an ONNX file names for its initializers' external data (relative to its folder)."""
    path = Path(path)
    # a large file's own weights are mapped where they lie, not parsed (stubs that name no weights file)
    header = _load_mapping_embedded(path) if path.stat().st_size >= MAP_EMBEDDED_BYTES else None
    header = header or onnx.load(str(path), load_external_data=False)
    return sorted({entry.value for init in header.graph.initializer if not _mapped(init)
                   for entry in init.external_data if entry.key == "location"})


def _mapped_folder(model: onnx.ModelProto) -> tuple[str | None, dict[str, tuple[str, int, int]]]:
    """The folder holding most of ``model``'s mapped weights (by bytes), and ``{name: (path, offset, length)}`` of
    those in it."""
    files = {init.name: _mapped_file(init) for init in model.graph.initializer if _mapped(init)}
    folders: dict[str, int] = {}
    for path, _, length in files.values():
        folders[os.path.dirname(path)] = folders.get(os.path.dirname(path), 0) + length
    folder = max(folders, key=folders.__getitem__) if folders else None
    return folder, {name: where for name, where in files.items() if os.path.dirname(where[0]) == folder}


def _relative(model: onnx.ModelProto, in_folder: dict[str, tuple[str, int, int]]) -> None:
    """In place: the mapped weights ``in_folder`` (:func:`_mapped_folder`) become plain ONNX external data relative
    to their folder (for a reader told that folder: ONNX Runtime's external-initializers folder, TensorRT's model
    path); others stay as they are."""
    for init in model.graph.initializer:
        if init.name in in_folder:
            path, offset, length = in_folder[init.name]
            _point_at(init, os.path.basename(path), offset, length)


def serialised_beside_weights(model: onnx.ModelProto) -> tuple[bytes, Path] | None:
    """``model`` serialised with its mapped weights as ONNX external data relative to their folder, and a model
    path in that folder from which a reader (TensorRT's parser) finds them: no weight copied. None when nothing
    is mapped, when they lie in more than one folder, or when the rest is past :data:`LARGE_MODEL_BYTES`; only
    then is ``model`` left as it was (else its mapped weights are relative now)."""
    folder, in_folder = _mapped_folder(model)
    if folder is None or any(_mapped(i) and i.name not in in_folder for i in model.graph.initializer) \
            or sum(_data_bytes(init) for init in model.graph.initializer) > LARGE_MODEL_BYTES:
        return None
    _relative(model, in_folder)
    _embed_mapped_attributes(model)   # a weight a pass moved into a node: the parser reads initializers' files only
    return model.SerializeToString(), Path(folder) / "model.onnx"


def ort_session(model: onnx.ModelProto | str | os.PathLike, options=None, providers: list[str] | None = None, *,
                weights_from: onnx.ModelProto | None = None):
    """An ONNX Runtime session of ``model``: a path, or a ModelProto of any size.

    A ModelProto's initializers of :data:`LIGHT_BYTES` and more reach ONNX Runtime as arrays over their data
    (``SessionOptions.add_external_initializers``), not inside the serialised model: a model past protobuf's 2 GiB
    loads, and a pass's probe of an LLM's graph does not serialise and parse its embedding table each time. A stub
    (:func:`light_initializer`) gets the data of ``weights_from``'s initializer of its name. Mapped weights
    (:func:`map_external`) stay ONNX external data that ONNX Runtime maps from their file itself (the session's
    external-initializers folder), no copy made; those of a second folder, if any, are arrays too. ``options``
    (default: new ones) gets those initializers and that folder.
    """
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    options = options or ort.SessionOptions()
    if not isinstance(model, onnx.ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    source = {i.name: i for i in weights_from.graph.initializer} if weights_from is not None else {}

    def data(init):   # the tensor holding the data: a stub's original (stand-in or from weights_from), or itself
        for _ in range(3):
            if not _is_stub(init):
                return init
            init = _standing_for(init) or source.get(init.name)
            if init is None:
                break
        raise AttncError("an ONNX Runtime session got a weight stub whose data attnc does not hold",
                         "internal error: please report the model")

    # mapped weights of one folder (the one holding most of them) are ONNX Runtime's to map from their files
    folder, mapped = _mapped_folder(model)
    heavy = [init for init in model.graph.initializer if init.name not in mapped
             and (_is_stub(init) or _mapped(init) or _heavy(init, LIGHT_BYTES, _NUMPY_TYPES))]
    arrays = [np.require(_raw_array(data(init)), requirements="A") for init in heavy]   # aligned for ONNX Runtime
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
    if heavy:
        # add_external_initializers copies the arrays when the session is made; what it cannot map, it must
        options.add_external_initializers([init.name for init in heavy], values)
    if heavy or mapped:
        model = light_copy(model, LIGHT_BYTES, _NUMPY_TYPES)
        _relative(model, mapped)
        for init in model.graph.initializer:
            if _mapped(init):
                init.CopyFrom(_stub(init))
        _embed_mapped_attributes(model)
    if mapped:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    session._attnc_weights = (arrays, values)   # kept as long as the session, as ONNX Runtime asks
    return session


# metadata_props keys (attnc.compiler.export.record_facts): a vision-language model's visual tokens, the text
# tokens in front of them, the size of its images (HxW) and, for a video in place of the image, its frames
VISUAL_TOKENS = "attnc.visual_tokens"
VISUAL_OFFSET = "attnc.visual_offset"
IMAGE_SIZE = "attnc.image_size"
VIDEO_FRAMES = "attnc.video_frames"
VIDEO_FPS = "attnc.video_fps"   # the rate a clip's frames were sampled at, where given (Qwen2.5-VL's positions)
FIRST_EXIT_LAYER = "attnc.first_exit_layer"   # the first decoder layer a token exit may precede, where not 0
IMAGE_OFFSETS = "attnc.image_offsets"   # each image's K where its tokens lie in several runs (Mistral 3's rows)


def set_metadata(model: onnx.ModelProto, key: str, value: str) -> None:
    """Set ``key`` of ``model.metadata_props`` to ``value``."""
    for entry in model.metadata_props:
        if entry.key == key:
            entry.value = value
            return
    model.metadata_props.add(key=key, value=value)


def metadata(model: onnx.ModelProto, key: str) -> str | None:
    """``key``'s value in ``model.metadata_props``, or None."""
    return next((entry.value for entry in model.metadata_props if entry.key == key), None)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count nodes in the main graph by ``domain::op_type`` (plain op_type for ONNX ops)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
