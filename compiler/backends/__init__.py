"""Backends: each turns an ONNX file into an artefact and runs artefacts.

A backend is a module in this package exposing ``NAME``, ``available() -> (bool, why)``,
``build(model_path, out_dir, precision, **options) -> artefact_path`` and
``load(artefact_path) -> Runner``. A runner has ``input_specs`` and
``infer(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]``. Validation only
talks to runners, so it never knows which backend produced the outputs. Adding a
backend means adding a module and a line in ``_BACKENDS``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from attnc.compiler.errors import AttncError

_BACKENDS = {
    "onnxruntime": "attnc.compiler.backends.onnxruntime",
    "tensorrt": "attnc.compiler.backends.tensorrt",
}
NAMES = tuple(_BACKENDS)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints or symbolic names) and numpy dtype of one graph input/output."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype


class Runner(Protocol):
    input_specs: list[TensorSpec]
    output_names: list[str]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def get_backend(name: str):
    """Import and return the backend module called ``name``."""
    if name not in _BACKENDS:
        raise AttncError(f"unknown backend {name!r}", f"use one of {', '.join(_BACKENDS)}")
    return importlib.import_module(_BACKENDS[name])


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Raise a clear error when ``feeds`` miss an input or have the wrong rank/static dims."""
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        raise AttncError(f"missing inputs {missing}; the model takes {[s.name for s in specs]}",
                         "name every model input (see `attnc inspect`)")
    for spec in specs:
        shape = np.shape(feeds[spec.name])
        bad = len(shape) != len(spec.shape) or any(
            isinstance(want, int) and want != got for want, got in zip(spec.shape, shape))
        if bad:
            pretty = "x".join(str(d) if isinstance(d, int) else str(d or "?") for d in spec.shape)
            raise AttncError(
                f"input {spec.name!r} has shape {tuple(shape)}, but the model expects [{pretty}]",
                "pass inputs of the exported shape, or re-export with dynamic axes")
