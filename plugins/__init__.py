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


def attach_function_bodies(model) -> int:
    """Give every ``attnc`` node of ``model`` its function body (in place); return how many were added.

    Export-time translations (``plugins/*/*_compat.py``) emit fused nodes directly, and an
    exporter cannot attach a model-local function, so ONNX Runtime could not run them
    until this has run. Nodes whose function is already there are left alone.
    """
    from attnc import DOMAIN

    added = 0
    for node in model.graph.node:
        if node.domain != DOMAIN or node.op_type not in FUSED_OPS:
            continue
        before = len(model.functions)
        plugin(node.op_type).add_to_model(model, node)
        added += len(model.functions) - before
    return added
