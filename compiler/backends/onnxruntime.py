"""ONNX Runtime backend: the embedded default, runs attnc nodes through their function bodies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx

from attnc.compiler.backends import TensorSpec, check_feeds
from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import atomic_path, external_data_files, ort_session

NAME = "onnxruntime"
ARTEFACT = "model.onnx"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}


def available() -> tuple[bool, str]:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False, "onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu"
    return True, ""


def build(model_path: str | os.PathLike, out_dir: str | os.PathLike, precision: str = "fp32",
          **_options) -> Path:
    """The ONNX Runtime artefact is the fused ONNX file itself."""
    if precision != "fp32":
        raise AttncError(f"the onnxruntime backend runs fp32 models; {precision} was asked for",
                         "use --precision fp32, or --backend tensorrt for fp16/bf16 engines")
    model_path, out_dir = Path(model_path), Path(out_dir)
    if model_path.parent.resolve() == out_dir.resolve():
        return model_path  # the pipeline already wrote the fused model into the artefact dir
    target = out_dir / ARTEFACT
    for name in external_data_files(model_path):   # a large model's weights files, by the names the model gives
        with atomic_path(out_dir / name, suffix=".data") as tmp:
            shutil.copyfile(model_path.parent / name, tmp)
    with atomic_path(target, suffix=".onnx") as tmp:
        shutil.copyfile(model_path, tmp)
    return target


def load(artefact: str | os.PathLike | onnx.ModelProto, providers: list[str] | None = None,
         threads: int | None = None) -> "OnnxRuntimeRunner":
    return OnnxRuntimeRunner(artefact, providers=providers, threads=threads)


class OnnxRuntimeRunner:
    """Runs an ONNX model (path or ModelProto) with ONNX Runtime.

    Args:
        model: path to a ``.onnx`` file or an in-memory ``onnx.ModelProto``.
        providers: execution providers; default CUDA when available, else CPU.
        threads: intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, model, providers: list[str] | None = None, threads: int | None = None):
        ok, why = available()
        if not ok:
            raise AttncError("the onnxruntime backend is unavailable", why)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                         if p in ort.get_available_providers()]
        try:
            self.session = ort_session(model, options, providers)   # a ModelProto past 2 GiB too
        except Exception as exc:
            raise AttncError(f"ONNX Runtime cannot load the model: {str(exc).splitlines()[0][:300]}",
                             "check the model with `attnc inspect`; re-export if it is malformed") from None
        self.input_specs = [
            TensorSpec(i.name, tuple(i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32)))
            for i in self.session.get_inputs()
        ]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; ``feeds`` must name every graph input."""
        check_feeds(self.input_specs, feeds)
        cast = {s.name: np.ascontiguousarray(feeds[s.name], dtype=s.dtype) for s in self.input_specs}
        try:
            outputs = self.session.run(self.output_names, cast)
        except Exception as exc:   # onnxruntime's errors (Fail, InvalidArgument, ...) subclass Exception only
            raise AttncError(f"ONNX Runtime failed running the model: {str(exc).splitlines()[0][:300]}",
                             "check the inputs' values and sizes (token ids below the vocabulary, sizes the "
                             "model was exported for)") from exc
        return dict(zip(self.output_names, outputs))
