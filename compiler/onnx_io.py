"""Reading and writing ONNX files with errors that say what to do, and atomic writes.

Every file attnc produces (models, engines, reports, manifests) goes through
:func:`atomic_path` so a crash or a failed build never leaves a half-written file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
    """Load an ONNX model (external data included) and check it is one attnc can read.

    Raises:
        AttncError: the file is missing, is not ONNX, is truncated, fails the ONNX
            checker, or uses an unsupported opset.
    """
    path = Path(path)
    if not path.is_file():
        raise AttncError(f"{path}: no such file", "check the path")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, RuntimeError, ... depending on build
        raise AttncError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:120]})",
            "the file is corrupt, truncated or not ONNX; re-export it",
        ) from None
    if not model.graph.node and not model.graph.output:
        # protobuf happily parses many non-ONNX byte strings into an empty message.
        raise AttncError(f"{path} holds no ONNX graph (empty, truncated or not ONNX)",
                         "re-export it with `attnc export` or torch.onnx.export")
    if check:
        check_opset(model, str(path))
        try:
            onnx.checker.check_model(model, full_check=False)
        except onnx.checker.ValidationError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise AttncError(f"{path} is not a valid ONNX model: {first}",
                             "re-export it; `python -m onnx.checker` shows the details") from None
    return model


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write ``model`` atomically; weights above 1.8 GB go to an external data file."""
    path = Path(path)
    large = model.ByteSize() > 1_800_000_000
    with atomic_path(path, suffix=".onnx") as tmp:
        if large:
            onnx.save_model(model, str(tmp), save_as_external_data=True,
                            location=path.name + ".data", all_tensors_to_one_file=True)
        else:
            onnx.save_model(model, str(tmp))
    return path


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Count nodes in the main graph by ``domain::op_type`` (plain op_type for ONNX ops)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
