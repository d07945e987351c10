"""Shared pass helpers: evaluating tensors at sampled sizes (``evaluate_tensors``), where a dim named as a
sum of others (``"past + seq"``, a generation step's mask over its cache and its new tokens) gets their sum; the
stable topological sort passes run after inserting nodes; the folding of a static trace's shape arithmetic that shape
inference cannot follow."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnc.passes.core import (dim_size, dim_terms, evaluate_tensors, fold_static_shapes, sampled_dim, toposort,
                               value_shapes)
from attnc.testing import run_model


def _concat_then_add(total: str) -> onnx.ModelProto:
    """``concat([past, new]) + mask`` over ``[past]``, ``[seq]`` and ``[total]``: only right where
    ``total = past + seq``."""
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [d]) for n, d in
              (("past", "past"), ("new", "seq"), ("mask", total))]
    nodes = [helper.make_node("Concat", ["past", "new"], ["keys"], axis=0),
             helper.make_node("Add", ["keys", "mask"], ["scores"])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_sampled_dim_adds_up_the_terms():
    assert sampled_dim("seq", 5) == 5
    assert sampled_dim("past + seq", 5) == 10
    assert sampled_dim("seq + 1", 8) == 9
    assert sampled_dim("a+b+c", 3) == 9
    assert sampled_dim("past + 18 + seq", 2, {"past": 7}) == 27   # a symbol of its own size, constants added


def test_dim_size_needs_every_name():
    assert dim_terms("past + 18 + seq") == ["past", "18", "seq"] and dim_terms("") == []
    assert dim_size("past + 18 + seq", {"past": 4, "seq": 3}) == 25 and dim_size(7, {}) == 7
    assert dim_size("past + seq", {"past": 4}) is None and dim_size("", {}) is None and dim_size(None, {}) is None


def test_a_symbol_gets_its_own_sizes():
    """``dims`` sets one symbol per run apart from the others (a cache's length apart from its new tokens'); the
    dims that name it as a term follow."""
    runs = evaluate_tensors(_concat_then_add("past + seq"), ["scores"], sizes=(2, 3), dims={"past": (7, 11)})
    assert [r["scores"].shape for r in runs] == [(9,), (14,)]


def test_a_sum_named_dim_is_evaluated_at_the_sum():
    runs = evaluate_tensors(_concat_then_add("past + seq"), ["scores"])
    assert [r["scores"].shape for r in runs] == [(10,), (16,)]
    assert all(np.isfinite(r["scores"]).all() for r in runs)
    with pytest.raises(Exception, match="Add"):   # a plain name gets one size like the others: shapes disagree
        evaluate_tensors(_concat_then_add("total"), ["scores"])


def _chain_model(order: list[int], appended: list[onnx.NodeProto]) -> onnx.ModelProto:
    """Two independent chains ``x -> a0 -> a1 -> a2`` and ``x -> b0 -> b1`` interleaved as ``order`` (node ``i``
    of the chain list), then ``appended`` (nodes a pass inserted at the end)."""
    chain = [("a0", "x"), ("b0", "x"), ("a1", "a0"), ("b1", "b0"), ("a2", "a1")]
    nodes = [helper.make_node("Relu", [chain[i][1]], [chain[i][0]], name=chain[i][0]) for i in order]
    graph = helper.make_graph(nodes + appended, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2]) for n in ("a2", "b1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_toposort_is_stable():
    """An ordered graph keeps its order; a node appended after its consumer moves to just in front of it, the rest
    keeping theirs (the old sort moved the consumer and everything after it to the end instead, which reordered a
    pruned encoder-decoder graph's layers); a subgraph's outer-scope read counts as an input; the result checks."""
    model = _chain_model([0, 1, 2, 3, 4], [])
    toposort(model)
    assert [n.name for n in model.graph.node] == ["a0", "b0", "a1", "b1", "a2"]

    # a1 now reads "w", made by a node appended at the end
    model = _chain_model([0, 1, 2, 3, 4], [helper.make_node("Neg", ["a0"], ["w"], name="w")])
    model.graph.node[2].input[0] = "w"
    toposort(model)
    assert [n.name for n in model.graph.node] == ["a0", "b0", "w", "a1", "b1", "a2"]
    onnx.checker.check_model(model)

    # an If (reading a2 in its branch) in front of everything and b1 in front of its producer: each pulls its
    # producers in front of it, depth first
    branch = helper.make_graph([helper.make_node("Identity", ["a2"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    cond = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True]),
                            name="c")
    model = _chain_model([3, 0, 1, 2, 4], [])
    node_if = helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch, name="if")
    model.graph.node.insert(0, node_if)
    model.graph.node.append(cond)
    toposort(model)
    names = [n.name for n in model.graph.node]
    assert names == ["c", "a0", "a1", "a2", "if", "b0", "b1"], names
    onnx.checker.check_model(model)


def _pooled(tokens, width: int, batch=2) -> onnx.ModelProto:
    """``x [batch, tokens, width]`` reshaped to ``[batch, s, s, width]`` by ``s = int(sqrt(tokens))`` computed from its
    shape (``Shape``, ``Cast``, ``Sqrt``, ``Cast``: LLaVA-NeXT-Video's pooler as TorchScript traces it), then
    ``[batch, s * s * width]`` by a ``Tile`` of a learned row by the batch read from the shape, the two concatenated
    and scaled by ``x``'s mean."""
    const = lambda name, value: helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(  # noqa
        np.array(value, np.int64)))
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("one", [1]), const("zero", [0]),
             const("rest", [-1]), const("w", [width]),
             helper.make_node("Gather", ["shape", "one"], ["n"]), helper.make_node("Gather", ["shape", "zero"], ["b"]),
             helper.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), helper.make_node("Sqrt", ["nf"], ["sf"]),
             helper.make_node("Cast", ["sf"], ["s"], to=TensorProto.INT64),
             helper.make_node("Concat", ["b", "s", "s", "w"], ["grid"], axis=0),
             helper.make_node("Reshape", ["x", "grid"], ["pooled"]),
             helper.make_node("Concat", ["b", "rest"], ["flat"], axis=0),
             helper.make_node("Reshape", ["pooled", "flat"], ["rows"]),
             helper.make_node("Concat", ["b", "one"], ["repeats"], axis=0),
             helper.make_node("Tile", ["row", "repeats"], ["rows2"]),
             helper.make_node("Concat", ["rows", "rows2"], ["both"], axis=1),
             helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["both", "mean"], ["y"])]
    row = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((1, 3)).astype(np.float32), "row")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens,
                                                                                                      width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[row])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("tokens,width", [(16, 4), (49, 3), (9, 5)])
def test_static_shape_arithmetic_is_folded(tokens, width):
    """A static graph whose reshape sizes come through ``Sqrt`` (and a ``Tile`` by the batch): shape inference leaves
    the output's dims unknown; folded, every shape is known, and the graph computes what it did on fresh inputs. A
    graph of dynamic inputs is left as it is."""
    model = _pooled(tokens, width)
    before = value_shapes(model)
    assert not all(isinstance(d, int) for d in before["y"])   # what the passes could not read
    x = np.random.default_rng().standard_normal((2, tokens, width)).astype(np.float32)
    expected = run_model(model, {"x": x})
    assert fold_static_shapes(model) == 3   # the shapes of both reshapes and the tile's repeats
    assert value_shapes(model)["y"] == [2, tokens * width + 3]
    assert not any(n.op_type in ("Sqrt", "Cast", "Shape") for n in model.graph.node)
    np.testing.assert_allclose(run_model(model, {"x": x}), expected, rtol=1e-6)
    assert fold_static_shapes(model) == 0   # nothing left to fold
    dynamic = _pooled("tokens", width, batch="batch")
    assert fold_static_shapes(dynamic) == 0 and any(n.op_type == "Sqrt" for n in dynamic.graph.node)
