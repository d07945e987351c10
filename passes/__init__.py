"""ONNX -> ONNX passes: fusion passes (one file per attention family) and shrink passes.

``FUSION_PASSES`` lists the fusion passes in the order the pipeline runs them: the
specific families first (their subgraphs contain softmax-attention-like pieces, e.g.
agent attention's two stages), plain softmax attention last.
"""

from __future__ import annotations

import importlib
import logging

import onnx

from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import weights_standing_in, with_weights
from attnc.passes.core import Match, NearMiss, PassReport, collapse_flat_transposes, fold_static_shapes, named_copy
from attnc.plugins import attach_function_bodies

log = logging.getLogger(__name__)

# family -> module; a module missing here is simply not run (families land one by one).
FUSION_PASSES = {
    "neighborhood": "attnc.passes.neighborhood",
    "agent": "attnc.passes.agent",
    "flow": "attnc.passes.flow",
    "linear": "attnc.passes.linear",
    "softmax": "attnc.passes.softmax",
}


# family -> the pass's keyword that lowers its matches to standard ONNX ops instead of an attnc
# node (TensorRT then runs them as native layers, no plugin): agent attention as two opset-23
# ``Attention`` nodes, lightning attention as one opset-27 ``LinearAttention``.
LOWERINGS = {
    "agent": "lower_to_attention",
    "linear": "lower_lightning_to_onnx",
}
# ``lower=["auto"]``: families that choose per match, by shape class, whether to lower it
# (agent attention: fused TensorRT kernel or two native attention layers, plugins/agent/routes.py).
AUTO = "auto"
ROUTED = ("agent",)


def _load(family: str):
    try:
        return importlib.import_module(FUSION_PASSES[family])
    except KeyError:
        raise AttncError(f"unknown attention family {family!r}",
                         f"use one of {', '.join(FUSION_PASSES)}") from None
    except ModuleNotFoundError as exc:
        if exc.name == FUSION_PASSES[family]:
            return None
        raise


def available_families() -> list[str]:
    """Families whose pass module exists in this install."""
    return [f for f in FUSION_PASSES if _load(f) is not None]


def find_attention(model: onnx.ModelProto, families: list[str] | None = None,
                   lower: list[str] | None = None, precision: str | None = None,
                   input_shapes: dict[str, list[int]] | None = None) -> list[PassReport]:
    """Report what :func:`fuse_attention` would rewrite (and its near-misses); ``model`` is unchanged.

    This is a dry run of the pipeline rather than each pass's ``find`` on the input: a
    subgraph that an earlier pass consumes (agent attention's two softmax stages) is
    not also reported by a later one.
    """
    return fuse_attention(model, families, lower, precision, input_shapes)[1]


def fuse_attention(model: onnx.ModelProto, families: list[str] | None = None,
                   lower: list[str] | None = None,
                   precision: str | None = None,
                   input_shapes: dict[str, list[int]] | None = None,
                   backend: str | None = None) -> tuple[onnx.ModelProto, list[PassReport]]:
    """Run the fusion passes in order; return the rewritten model and one report per pass.

    Args:
        model: the model (not modified).
        families: the passes to run (default: every available one), in ``FUSION_PASSES`` order.
        lower: families whose matches become standard ONNX ops rather than attnc nodes
            (``LOWERINGS``); the model's opset is raised to what those ops need. ``"auto"``:
            the ``ROUTED`` families not named choose per match (the agent pass by shape class
            for TensorRT; each match's ``route`` says which way and why).
        precision: what the kernels will run in (``"fp16"``, ...); read by ``"auto"``.
        input_shapes: the shapes the model will mostly run at (TensorRT's ``opt`` profile);
            ``"auto"`` routes nodes whose token counts are dynamic by these.
        backend: what will run the model, where a pass must leave out what it cannot run
            (``"tensorrt"``: no soft-capped ``Attention``); None: anything ONNX allows.

    A near-miss whose anchor node a later pass fused (a plain softmax attention that the
    neighborhood pass looked at and the softmax pass rewrote) is dropped: it was not missed.
    """
    lower = list(lower or [])
    auto = AUTO in lower
    lower = [f for f in lower if f != AUTO]
    unknown = [f for f in lower if f not in LOWERINGS]
    if unknown:
        raise AttncError(f"attention family {unknown[0]!r} has no lowering to standard ONNX ops",
                         f"lower one of {', '.join(LOWERINGS)}, or {AUTO}")
    order = families or available_families()
    skipped = [f for f in lower if f not in order]
    if skipped:
        raise AttncError(f"--lower {skipped[0]} asks for a family that is not being fused",
                         f"add --family {skipped[0]} or drop --lower {skipped[0]}")
    with weights_standing_in(model) as work:
        # the passes copy the model several times: the copies hold stubs for its weights, which go back in last
        model, reports = _fuse(work, order, lower, auto, precision, input_shapes, backend)
        with_weights(model)
    remaining = {node.name for node in model.graph.node}
    for report in reports:
        report.near_misses = [n for n in report.near_misses if n.anchor in remaining]
    return model, reports


def _fuse(model, order, lower, auto, precision, input_shapes, backend) -> tuple[onnx.ModelProto, list[PassReport]]:
    model = named_copy(model)
    collapse_flat_transposes(model)   # the SDPA decomposition's Kᵀ, as one Transpose for every pass
    attach_function_bodies(model)
    reports = []
    for family in order:
        module = _load(family)
        if module is None:
            continue
        if family in lower:
            options = {LOWERINGS[family]: True}
        elif auto and family in ROUTED:
            options = {LOWERINGS[family]: AUTO, "precision": precision, "input_shapes": input_shapes}
        else:
            options = {}
        if family == "softmax" and backend == "tensorrt":
            options["softcap"] = False
        model, report = module.apply(model, **options)
        log.info("%s: %d rewritten, %d near-misses", family, report.rewritten, len(report.near_misses))
        reports.append(report)
    return model, reports


__all__ = ["AUTO", "FUSION_PASSES", "LOWERINGS", "ROUTED", "Match", "NearMiss", "PassReport", "available_families",
           "find_attention", "fold_static_shapes", "fuse_attention"]
