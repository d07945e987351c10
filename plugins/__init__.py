"""Fused ops of domain ``attnc``: one folder per op.

Each ``plugins/<op>/`` holds the op's contract (inputs, attributes, output shape
rule), its reference semantics (a float64-capable torch/numpy function), the ONNX
function body ONNX Runtime runs, its Triton kernels, and its TensorRT registration.
``FUSED_OPS`` maps op_type -> module; adding a family adds one line here.
"""

from __future__ import annotations

import importlib

FUSED_OPS = {
    "NeighborhoodAttention": "attnc.plugins.neighborhood",
    "AgentAttention": "attnc.plugins.agent",
    "FlowAttention": "attnc.plugins.flow",
    # Not "LinearAttention": TensorRT's ONNX parser routes nodes by op_type to its
    # built-in importers whatever their domain, and ONNX opset 27 has a standard
    # LinearAttention op, so a node of that name would never reach our plugin.
    "KernelLinearAttention": "attnc.plugins.linear",
}


def plugin(op_type: str):
    """The plugin module for a fused op type (``KeyError`` if there is none)."""
    return importlib.import_module(FUSED_OPS[op_type])
