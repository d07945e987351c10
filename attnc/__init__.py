"""attnc: a deployment compiler for transformers with non-standard attention.

The pipeline reads like the package: ``attnc.compiler.export`` (PyTorch -> ONNX),
``attnc.passes`` (ONNX -> fused/shrunk ONNX), ``attnc.compiler.backends`` (ONNX ->
runnable artefact), ``attnc.compiler.validate`` (artefact vs PyTorch -> report).
"""

__version__ = "0.1.0"

# The fused ops' ONNX domain and the TensorRT plugin namespace share one name.
DOMAIN = "attnc"
DOMAIN_VERSION = 1
