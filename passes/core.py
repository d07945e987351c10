"""What every pass shares: match records, near-miss records, and graph plumbing.

A *fusion pass* is a module in this package with ``FAMILY`` (e.g. ``"neighborhood"``)
and two functions::

    find(model: onnx.ModelProto) -> PassReport          # matches + near-misses, no change
    apply(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]

``apply`` returns a model ONNX Runtime can run; when nothing matches it returns the
input model unchanged. Fused nodes are in domain ``attnc`` and the model carries
their ONNX function bodies (see ``attnc.plugins``), so any backend that knows
nothing of attnc still runs them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from attnc import DOMAIN, DOMAIN_VERSION


@dataclass
class Match:
    """One subgraph a pass recognised (and, in ``apply``, replaced).

    Attributes:
        family: attention family, e.g. ``"neighborhood"``.
        op_type: the op it becomes, e.g. ``"NeighborhoodAttention"`` (domain ``attnc``)
            or ``"Attention"`` (ONNX standard).
        nodes: names of the nodes the match covers.
        inputs: role -> tensor name (``{"Q": ..., "K": ..., "V": ...}``).
        outputs: tensor names the fused node produces.
        attributes: attributes of the fused node.
        shapes: role -> shape as far as known (ints or symbolic names).
    """

    family: str
    op_type: str
    nodes: list[str]
    inputs: dict[str, str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, list] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


@dataclass
class NearMiss:
    """A place that looked like ``family`` but was left alone, and why."""

    family: str
    anchor: str
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PassReport:
    """What one pass found (and did)."""

    family: str
    matches: list[Match] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)
    rewritten: int = 0

    def to_dict(self) -> dict:
        return {"family": self.family, "rewritten": self.rewritten,
                "matches": [m.to_dict() for m in self.matches],
                "near_misses": [n.to_dict() for n in self.near_misses]}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# ----------------------------------------------------------------------------- plumbing

def constant_value(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The value of tensor ``name`` if it is an initializer or a ``Constant`` output."""
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init, base_dir="")
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
    return None


def ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    """Import ``domain`` at ``version`` (or higher) in the model."""
    for entry in model.opset_import:
        if entry.domain == domain:
            entry.version = max(entry.version, version)
            return
    model.opset_import.append(onnx.helper.make_opsetid(domain, version))


def add_function(model: onnx.ModelProto, function: onnx.FunctionProto) -> None:
    """Attach a fused op's function body to ``model`` once, with the opsets it needs."""
    key = (function.domain, function.name, function.overload)
    if any((f.domain, f.name, f.overload) == key for f in model.functions):
        return
    model.functions.append(function)
    ensure_opset(model, DOMAIN, DOMAIN_VERSION)
    for entry in function.opset_import:
        if entry.domain != DOMAIN:
            ensure_opset(model, entry.domain, entry.version)


def remove_dead_nodes(model: onnx.ModelProto) -> None:
    """Drop nodes (and initializers) that no graph output depends on any more."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
            needed.update(_subgraph_inputs(node))
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [v for v in graph.value_info if v.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(n.input)
                names.update(_subgraph_inputs(n))
    return names


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that produces it."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it."""
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            table.setdefault(name, []).append(node)
    return table


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name, so matches and near-misses can cite it."""
    seen = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def toposort(model: onnx.ModelProto) -> None:
    """Order nodes so each comes after its producers (needed after in-place inserts)."""
    graph = model.graph
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        progressed = False
        rest = []
        for node in pending:
            if all(i in available for i in node.input) and _subgraph_inputs(node) <= available | _outer_free(node):
                ordered.append(node)
                available.update(node.output)
                progressed = True
            else:
                rest.append(node)
        if not progressed:  # a cycle or a dangling input: keep the remaining order as is
            ordered.extend(rest)
            break
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def _outer_free(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs define themselves (not outer-scope references)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            names.update(i.name for i in g.input)
            names.update(i.name for i in g.initializer)
            for n in g.node:
                names.update(n.output)
    return names


def value_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Tensor name -> shape (ints, symbolic names or None) after ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception:  # shape inference is a hint for matching, never a requirement
        inferred = model
    shapes: dict[str, list] = {}
    g = inferred.graph
    for info in list(g.input) + list(g.output) + list(g.value_info):
        t = info.type.tensor_type
        if t.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                 for d in t.shape.dim]
    for init in g.initializer:
        shapes[init.name] = list(init.dims)
    return shapes
