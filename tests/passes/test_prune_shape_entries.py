"""Shape entries the head-pruning trace reads off a computed Reshape target (passes/prune_heads/shapes.py): the
token exit's text-only layers compute theirs as the full prompt's shape minus the visual tokens (``Sub``), whose
head entry must still read as the head count (GLM-4V's interleaved rotary regroups each head under such a target)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from attnc.passes.prune_heads.shapes import _SHAPES_CACHE, _shape_entries


def _target(op: str, delta: list[int], heads: int) -> onnx.ModelProto:
    """``Reshape(x, target)`` of ``x [B, heads, S, 8]``, ``target = Concat(Shape(x)[0:1], [heads], Shape(x)[2:3], [8])
    op delta`` the graph's output."""
    consts = {"s0": [0], "e1": [1], "s2": [2], "e3": [3], "heads": [heads], "eight": [8], "delta": delta}
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "s0", "e1"], ["batch"]),
             helper.make_node("Slice", ["shape", "s2", "e3"], ["seq"]),
             helper.make_node("Concat", ["batch", "heads", "seq", "eight"], ["full"], axis=0),
             helper.make_node(op, ["full", "delta"], ["target"]),
             helper.make_node("Reshape", ["x", "target"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", heads, "S", 8])],
        [helper.make_tensor_value_info("target", TensorProto.INT64, [4])],
        [numpy_helper.from_array(np.array(v, dtype=np.int64), k) for k, v in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("op,delta,expected", [
    ("Sub", [0, 0, 5, 0], [("dim", "x", 0), 4, None, 8]),      # the exit's: the visual tokens off the sequence
    ("Sub", [0, 1, 0, 3], [("dim", "x", 0), 3, ("dim", "x", 2), 5]),
    ("Add", [0, 2, 0, 0], [("dim", "x", 0), 6, ("dim", "x", 2), 8]),
    ("Add", [1, 0, 0, 0], [None, 4, ("dim", "x", 2), 8]),       # a dim plus anything but 0 is unknown
])
def test_entries_through_add_and_sub(op, delta, expected):
    model = _target(op, delta, 4)
    _SHAPES_CACHE.clear()
    prod = {o: n for n in model.graph.node for o in n.output}
    entries = _shape_entries(model, "target", prod)
    assert entries == expected
    # every entry read (a constant, or a dim of x) is what ONNX Runtime computes, at fresh random batch and length
    import onnxruntime as ort

    rng = np.random.default_rng()
    shape = (int(rng.integers(1, 5)), 4, int(rng.integers(6, 40)), 8)
    shape_only = onnx.ModelProto()   # the target's computation alone: ONNX Runtime runs every node, the Reshape too
    shape_only.CopyFrom(model)
    del shape_only.graph.node[-1]
    session = ort.InferenceSession(shape_only.SerializeToString(), providers=["CPUExecutionProvider"])
    computed = session.run(["target"], {"x": np.zeros(shape, np.float32)})[0]
    read = [e if isinstance(e, int) else shape[e[2]] if isinstance(e, tuple) else None for e in entries]
    assert all(r is None or r == c for r, c in zip(read, computed)), (shape, computed)
