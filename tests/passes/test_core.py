"""Shared pass helpers: evaluating tensors at sampled sizes (``evaluate_tensors``), where a dim named as a
sum of others (``"past + seq"``, a generation step's mask over its cache and its new tokens) gets their sum."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnc.passes.core import evaluate_tensors, sampled_dim


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


def test_a_sum_named_dim_is_evaluated_at_the_sum():
    runs = evaluate_tensors(_concat_then_add("past + seq"), ["scores"])
    assert [r["scores"].shape for r in runs] == [(10,), (16,)]
    assert all(np.isfinite(r["scores"]).all() for r in runs)
    with pytest.raises(Exception, match="Add"):   # a plain name gets one size like the others: shapes disagree
        evaluate_tensors(_concat_then_add("total"), ["scores"])
