"""Run compiled artefacts from Python: ``attnc.runtime.Engine("out/engine.plan").infer(feeds)``.

``Engine`` is the TensorRT backend's runner (:class:`attnc.compiler.backends.tensorrt.EngineRunner`):
it needs TensorRT and an NVIDIA GPU, takes numpy arrays or torch tensors and returns numpy
(or CUDA torch tensors with ``as_torch=True``). The fused ops of a TensorRT-RTX engine (Python
plugins) run with their Triton kernels; ``Engine(path, plugin_impl="reference")`` runs them with
their torch reference instead (slow; to check the kernels). The choice is per engine: engines
loaded with different ones run side by side in one process.
"""

from attnc.compiler.backends.tensorrt import EngineRunner as Engine

__all__ = ["Engine"]
