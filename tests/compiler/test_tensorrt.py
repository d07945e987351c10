"""TensorRT backend: pure helpers everywhere, real engine builds where TensorRT(-RTX) imports.

TensorRT-RTX builds engines on a machine without a GPU, so the build tests run in CI;
running an engine needs a GPU, which these tests only check is refused cleanly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from attnc import DOMAIN, plugins as fused_ops
from attnc.compiler.backends import tensorrt as trt_backend
from attnc.compiler.backends import tensorrt_plugins as tp
from attnc.compiler.errors import AttncError
from attnc.testing import rtx_plugin_env, tensorrt_or_skip


# ----------------------------------------------------------------------------- models


def attention_model(dtype=TensorProto.FLOAT, heads=4, tokens=16, dim=64, batch="batch") -> onnx.ModelProto:
    """One opset-23 ``Attention`` node over q, k, v ``[batch, H, N, D]``."""
    shape = [batch, heads, tokens, dim]
    inputs = [helper.make_tensor_value_info(n, dtype, shape) for n in ("q", "k", "v")]
    output = helper.make_tensor_value_info("o", dtype, shape)
    node = helper.make_node("Attention", ["q", "k", "v"], ["o"], name="attn", scale=dim ** -0.5)
    return helper.make_model(helper.make_graph([node], "attention", inputs, [output]),
                             opset_imports=[helper.make_opsetid("", 23)])


def agent_model(fused: bool, heads=2, tokens=16, agents=4, dim=64) -> onnx.ModelProto:
    """Agent attention: one fused ``attnc::AgentAttention`` node, or lowered to two ``Attention``s."""
    from attnc.plugins import agent

    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("q", f, ["batch", heads, tokens, dim]),
              helper.make_tensor_value_info("k", f, ["batch", heads, tokens, dim]),
              helper.make_tensor_value_info("v", f, ["batch", heads, tokens, dim]),
              helper.make_tensor_value_info("a", f, ["batch", heads, agents, dim])]
    output = helper.make_tensor_value_info("o", f, ["batch", heads, tokens, dim])
    if fused:
        nodes = [agent.make_node(["q", "k", "v", "a"], ["o"], "agent0", scale=dim ** -0.5)]
    else:
        nodes = agent.lower_to_attention_nodes(["q", "k", "v", "a"], "o", "agent0", scale=dim ** -0.5)
    model = helper.make_model(helper.make_graph(nodes, "agent", inputs, [output]),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    if fused:
        model.functions.append(agent.function_proto(False, False, opset=23))
        model.ir_version = 10
    return model


def flow_model(tokens=16, dim=32) -> onnx.ModelProto:
    from attnc.plugins import flow

    shape = [2, 2, tokens, dim]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    output = helper.make_tensor_value_info("o", TensorProto.FLOAT, shape)
    model = helper.make_model(
        helper.make_graph([flow.make_node(["q", "k", "v"], ["o"], "flow0")], "flow", inputs, [output]),
        opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    model.functions.append(flow.function_proto(False, opset=23))
    model.ir_version = 10
    return model


def _save(model, path) -> Path:
    onnx.save(model, str(path))
    return Path(path)


QKV = {"q": (2, 4, 16, 64), "k": (2, 4, 16, 64), "v": (2, 4, 16, 64)}
AGENT = {"q": (2, 2, 16, 64), "k": (2, 2, 16, 64), "v": (2, 2, 16, 64), "a": (2, 2, 4, 64)}

# ----------------------------------------------------------------------------- availability


def test_missing_tensorrt_names_both_extras(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # None in sys.modules -> ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    ok, why = trt_backend.available()
    assert not ok
    assert 'pip install "attnc[tensorrt]"' in why and 'pip install "attnc[tensorrt-rtx]"' in why
    with pytest.raises(AttncError, match="not installed"):
        trt_backend.build("missing.onnx", "out", "fp32")


@pytest.mark.tensorrt
def test_available_names_the_flavour():
    trt, flavour = tensorrt_or_skip()
    ok, why = trt_backend.available()
    assert ok and why == f"{flavour} {trt.__version__}"


# ----------------------------------------------------------------------------- profiles


def test_parse_shape_arg():
    assert trt_backend.parse_shape_arg("x:1x3x224x224") == ("x", (1, 3, 224, 224))
    assert trt_backend.parse_shape_arg("a:b:2x3") == ("a:b", (2, 3))
    assert trt_backend.parse_shape_arg("past:1x2x0x8") == ("past", (1, 2, 0, 8))   # an empty KV cache
    for bad in ("1x3", "x:", "x:1x-1", "x:axb"):
        with pytest.raises(AttncError, match="cannot read shape"):
            trt_backend.parse_shape_arg(bad)


def test_profile_defaults_to_static_shapes_and_fills_dynamic_dims():
    inputs = {"x": (2, 3, 8), "y": ("batch", 16, 64)}
    profile = trt_backend.resolve_profile(inputs, opt_shapes=["y:4x16x64"])
    assert profile["x"] == ((2, 3, 8),) * 3
    assert profile["y"] == ((1, 16, 64), (4, 16, 64), (4, 16, 64))
    profile = trt_backend.resolve_profile(inputs, min_shapes={"y": (2, 16, 64)}, max_shapes={"y": (8, 16, 64)})
    assert profile["y"] == ((2, 16, 64), (8, 16, 64), (8, 16, 64))


def test_profile_from_named_dim_ranges():
    """``dim_ranges`` size every input no shape flag names from its named dims, sums with constants included (an
    exited generation step's caches of two lengths and its mask); a shape flag wins for its input; an input with a
    name no range gives still needs a shape; bad and unknown ranges are refused by name."""
    inputs = {"ids": ("batch", "seq"), "mask": ("batch", "past + 18 + seq"), "early": ("batch", 2, "past + 18", 8),
              "late": ("batch", 2, "past + 2", 8), "x": (1, 3)}
    ranges = ["batch=1:2:4", "seq=1:1:8", "past=0:16:64"]
    profile = trt_backend.resolve_profile(inputs, dim_ranges=ranges)
    assert profile["mask"] == ((1, 19), (2, 35), (4, 90))
    assert profile["early"] == ((1, 2, 18, 8), (2, 2, 34, 8), (4, 2, 82, 8))
    assert profile["late"] == ((1, 2, 2, 8), (2, 2, 18, 8), (4, 2, 66, 8)) and profile["x"] == ((1, 3),) * 3
    profile = trt_backend.resolve_profile(inputs, opt_shapes=["ids:3x5"], dim_ranges={**dict(
        r.split("=") for r in ranges), "batch": 2})
    assert profile["ids"] == ((1, 1), (3, 5), (3, 5)) and profile["mask"][2] == (2, 90)
    with pytest.raises(AttncError, match="input 'mask' has dynamic dims") as err:
        trt_backend.resolve_profile(inputs, dim_ranges=["batch=1:2:4", "seq=1"])
    assert "--dim-range" in err.value.fix
    for bad, words in (("past=4:2:8", "cannot read the dim range"), ("past", "cannot read the dim range"),
                       ("heads=1:2:3", "names dim 'heads', which no model input has")):
        with pytest.raises(AttncError, match=words):
            trt_backend.resolve_profile(inputs, dim_ranges=[bad])


@pytest.mark.parametrize("kwargs, message", [
    ({"opt_shapes": ["z:1x2"]}, "input 'z', which the model does not have"),
    ({"opt_shapes": ["y:4x16"]}, "input 'y' has rank 2"),
    ({"opt_shapes": ["y:4x16x32"]}, "sets dim 2 to 32, but the model fixes it to 64"),
    ({"min_shapes": ["y:8x16x64"], "opt_shapes": ["y:4x16x64"]}, "not ordered"),
    ({}, "input 'y' has dynamic dims"),
])
def test_profile_errors_name_the_input(kwargs, message):
    with pytest.raises(AttncError, match=message):
        trt_backend.resolve_profile({"x": (2, 3), "y": ("batch", 16, 64)}, **kwargs)


def test_model_inputs_skip_initializers():
    model = attention_model()
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.zeros(1, np.float32), "k"))
    assert trt_backend.model_inputs(model) == {"q": ("batch", 4, 16, 64), "v": ("batch", 4, 16, 64)}


# ----------------------------------------------------------------------------- names and models


def test_fused_op_names_avoid_the_parsers_builtin_importers():
    assert trt_backend.builtin_importer_collisions(
        ["LinearAttention", "Attention", "MultiHeadAttention", "GroupQueryAttention", "Softmax"]) == [
        "LinearAttention", "Attention", "MultiHeadAttention", "GroupQueryAttention", "Softmax"]
    assert trt_backend.builtin_importer_collisions(fused_ops.FUSED_OPS) == []


@pytest.mark.tensorrt
def test_fused_op_names_avoid_the_live_parser():
    trt, _ = tensorrt_or_skip()
    logger = trt.Logger(trt.Logger.ERROR)
    parser = trt.OnnxParser(trt.Builder(logger).create_network(0), logger)
    assert trt_backend.builtin_importer_collisions(fused_ops.FUSED_OPS, parser.supports_operator) == []
    for name in ("LinearAttention", "Attention", "MultiHeadAttention"):
        assert parser.supports_operator(name), name
        assert name in trt_backend.BUILTIN_IMPORTERS


def test_prepare_model_strips_attnc_bodies_and_tags_plugin_nodes():
    model = agent_model(fused=True)
    other = helper.make_function("custom", "Keep", ["x"], ["y"], [helper.make_node("Identity", ["x"], ["y"])],
                                 [helper.make_opsetid("", 23)])
    model.functions.append(other)
    prepared, ops = trt_backend.prepare_model(model, "fp32")
    assert ops == ["AgentAttention"]
    assert [(f.domain, f.name) for f in prepared.functions] == [("custom", "Keep")]
    node = prepared.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"attnc" and attrs["plugin_version"] == b"1"
    assert node.overload == ""
    assert len(model.functions) == 2  # the caller's model is untouched
    inline, ops = trt_backend.prepare_model(model, "fp32", fused_ops="inline")
    # the bias-free body reads Q, K, V, A only: its function and node keep just those
    body = next(f for f in inline.functions if f.domain == DOMAIN)
    assert ops == [] and len(inline.functions) == 2 and list(body.input) == ["Q", "K", "V", "A"]
    assert list(inline.graph.node[0].input) == ["q", "k", "v", "a"]


def gated_step_model() -> onnx.ModelProto:
    """A gated one-token linear-attention step as the linear pass leaves it: the gate
    ``g = sigmoid(x @ W)`` (per batch and head, GLA / Mamba2 style) is not the op's decay, so its
    ``Mul`` stays in the graph and ``g ⊙ S`` (S a graph input) is the fused node's state; the
    decay ``Exp(-slope)`` is computed from a reshaped slope."""
    from attnc.plugins import linear

    f = TensorProto.FLOAT
    init = [onnx.numpy_helper.from_array(np.array([[0.05, 0.4]], np.float32), "slope"),
            onnx.numpy_helper.from_array(np.array([2], np.int64), "heads"),
            onnx.numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(6, 2), "w"),
            onnx.numpy_helper.from_array(np.array([1, 2, 1, 1], np.int64), "gate_shape")]
    nodes = [helper.make_node("Reshape", ["slope", "heads"], ["slope_h"]),
             helper.make_node("Neg", ["slope_h"], ["neg"]), helper.make_node("Exp", ["neg"], ["decay"]),
             helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Sigmoid", ["xw"], ["g"]),
             helper.make_node("Reshape", ["g", "gate_shape"], ["gate"]),
             helper.make_node("Mul", ["gate", "s"], ["gated"], name="gate_mul")]
    node = linear.make_node(["q", "k", "v", "decay", "gated"], ["o", "s_out"], "la", causal=1, normalize=0,
                            feature_map="identity")
    nodes.append(node)
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 1, 4]) for n in "qkv"]
    inputs += [helper.make_tensor_value_info("x", f, [1, 6]), helper.make_tensor_value_info("s", f, [1, 2, 4, 4])]
    outputs = [helper.make_tensor_value_info("o", f, [1, 2, 1, 4]),
               helper.make_tensor_value_info("s_out", f, [1, 2, 4, 4])]
    model = helper.make_model(helper.make_graph(nodes, "gated_step", inputs, outputs, init),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)])
    linear.add_to_model(model, node)
    return model


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fp16_preparation_keeps_a_gated_state_float32(precision):
    """In an fp16/bf16 gated step the state S, a graph input that reaches the node's float32
    state only through the gate's ``Mul``, stays float32 like ``state_out`` (a caller feeds the
    new state straight back): the Mul runs in float32 with the gate cast up, and nothing is cast
    in front of the node's state. The decay, computed through a ``Reshape`` (not elementwise),
    is computed in the target type and cast to float32 in front of the node. The inlined
    function body runs in ONNX Runtime and matches the float32 model."""
    import onnxruntime as ort

    model = gated_step_model()
    target = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[precision]
    f = TensorProto.FLOAT
    prepared, _ = trt_backend.prepare_model(model, precision)
    types = {v.name: v.type.tensor_type.elem_type for v in [*prepared.graph.input, *prepared.graph.output]}
    assert types == {"q": target, "k": target, "v": target, "x": target, "s": f, "o": target, "s_out": f}
    nodes = {n.name: n for n in prepared.graph.node}
    fused = nodes["la"]
    assert list(fused.input[3:]) == ["decay/float32", "gated"]
    assert list(nodes["gate_mul"].input) == ["gate/float32", "s"]
    casts = {n.output[0]: n for n in prepared.graph.node if n.op_type == "Cast"}
    assert sorted(casts) == ["decay/float32", "gate/float32"]
    assert all(helper.get_attribute_value(c.attribute[0]) == f for c in casts.values())
    initializers = {t.name: t.data_type for t in prepared.graph.initializer}
    assert initializers["slope"] == target and initializers["w"] == target
    if precision == "bf16":
        return  # ONNX Runtime's CPU kernels lack bf16 MatMul/Sigmoid
    inline, _ = trt_backend.prepare_model(model, precision, fused_ops="inline")
    gen = np.random.default_rng(3)
    feeds = {n: gen.standard_normal(shape).astype(np.float32) for n, shape in
             (("q", (1, 2, 1, 4)), ("k", (1, 2, 1, 4)), ("v", (1, 2, 1, 4)), ("x", (1, 6)), ("s", (1, 2, 4, 4)))}
    run = lambda m, fs: ort.InferenceSession(m.SerializeToString(),  # noqa: E731
                                             providers=["CPUExecutionProvider"]).run(None, fs)
    expected = run(model, feeds)
    got = run(inline, {n: (x if n == "s" else x.astype(np.float16)) for n, x in feeds.items()})
    assert got[0].dtype == np.float16 and got[1].dtype == np.float32
    for out, ref in zip(got, expected):
        np.testing.assert_allclose(out.astype(np.float32), ref, rtol=2e-2, atol=2e-2)


def test_float32_chains_stop_at_other_uses():
    """A float32 tensor stays float32 through elementwise ops only when every use leads to a
    float32 contract input: not when it is also a graph output or read by another op."""
    model = gated_step_model()
    assert {"s", "gated", "s_out"} <= trt_backend.float32_tensors(model)
    for extra in (helper.make_node("Identity", ["s"], ["s_copy"]), helper.make_node("Relu", ["s"], ["s_relu"])):
        other = gated_step_model()
        other.graph.node.append(extra)
        other.graph.output.append(helper.make_tensor_value_info(extra.output[0], TensorProto.FLOAT, [1, 2, 4, 4]))
        assert not {"s", "gated"} & trt_backend.float32_tensors(other), extra.op_type


def _shared_heads_vector() -> onnx.ModelProto:
    """``x [B, L, 8]`` and ``y [B, L, 16]`` reshaped by one vector ``[B, L, -1, 4]`` (a Concat of ``x``'s leading
    sizes and ``[-1, 4]``), and ``y`` cut to ``L - 1`` tokens reshaped by that vector minus 1 at its token entry (as
    a token exit shifts it); outputs ``a``, ``b``, ``c`` in that order. The first two readers' shapes are declared,
    as the dynamo exporter declares them (ONNX's inference cannot divide a symbolic volume), the third's not (a token
    exit forgets the shapes behind it)."""
    nodes = [helper.make_node("Shape", ["x"], ["bl"], end=2),
             helper.make_node("Concat", ["bl", "tail"], ["vector"], axis=0),
             helper.make_node("Reshape", ["x", "vector"], ["a"], name="a"),
             helper.make_node("Reshape", ["y", "vector"], ["b"], name="b"),
             helper.make_node("Slice", ["y", "one", "end", "one"], ["cut"]),
             helper.make_node("Sub", ["vector", "shift"], ["shorter"]),
             helper.make_node("Reshape", ["cut", "shorter"], ["c"], name="c")]
    inits = [helper.make_tensor("tail", TensorProto.INT64, [2], [-1, 4]),
             helper.make_tensor("shift", TensorProto.INT64, [4], [0, 1, 0, 0]),
             helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("end", TensorProto.INT64, [1], [2 ** 62])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "L", 8]),
                                           helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "L", 16])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in "abc"], inits,
                              value_info=[helper.make_tensor_value_info("a", TensorProto.FLOAT, ["B", "L", 2, 4]),
                                          helper.make_tensor_value_info("b", TensorProto.FLOAT, ["B", "L", 4, 4])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_pinned_reshape_sizes():
    """``pin_inferred_dims`` writes each Reshape's inferred head count into its own copy of a shared vector (2 for
    the width-8 input, 4 for the width-16 one); the reader through the token exit's shift takes the count of the
    unshifted reader of its width, the shift applied again. ONNX Runtime computes the same outputs before and after
    at two sizes; a pinned model has nothing left to pin."""
    import onnxruntime as ort

    model = _shared_heads_vector()
    pinned = onnx.ModelProto()
    pinned.CopyFrom(model)
    assert sorted(trt_backend.pin_inferred_dims(pinned)) == ["a", "b", "c"]
    inits = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in pinned.graph.initializer}
    assert [inits[f"{n}/pinned_shape.piece1"] for n in "abc"] == [[2, 4], [4, 4], [4, 4]]
    assert [n.op_type for n in pinned.graph.node if n.name.startswith("c/pinned_shape")] == ["Concat", "Sub"]
    rng = np.random.default_rng()
    for b, n in ((1, 3), (2, 7), (int(rng.integers(1, 5)), int(rng.integers(2, 40)))):   # the last drawn afresh
        feeds = {"x": rng.standard_normal((b, n, 8), np.float32), "y": rng.standard_normal((b, n, 16), np.float32)}
        before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
        after = ort.InferenceSession(pinned.SerializeToString()).run(None, feeds)
        assert [a.shape for a in after] == [(b, n, 2, 4), (b, n, 4, 4), (b, n - 1, 4, 4)]
        for want, got in zip(before, after):
            np.testing.assert_array_equal(got, want)
    assert trt_backend.pin_inferred_dims(pinned) == []


def test_prepare_model_rejects_nodes_without_importer_naming_them():
    model = attention_model()
    model.graph.node.append(helper.make_node("Mystery", ["o"], ["p"], name="odd", domain="acme"))
    with pytest.raises(AttncError, match=r"node 'odd' \(acme::Mystery\)"):
        trt_backend.prepare_model(model)
    model = attention_model()
    model.graph.node.append(helper.make_node("LinearAttention", ["q", "k", "v"], ["p"], name="la", domain=DOMAIN))
    with pytest.raises(AttncError, match="'LinearAttention' is named like an op"):
        trt_backend.prepare_model(model)
    model = attention_model()
    model.graph.node.append(helper.make_node("NotAnOp", ["o"], ["p"], name="nop", domain=DOMAIN))
    with pytest.raises(AttncError, match=r"node 'nop' \(attnc::NotAnOp\) has no TensorRT plugin"):
        trt_backend.prepare_model(model)


@pytest.mark.parametrize("precision, elem", [("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)])
def test_precision_is_written_into_the_onnx_types(precision, elem):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    i = helper.make_tensor_value_info("i", TensorProto.INT64, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Cast", ["i"], ["i_f"], to=TensorProto.FLOAT),
             helper.make_node("Constant", [], ["c"], value=onnx.numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Add", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "i_f"], ["u"]),
             helper.make_node("Add", ["u", "c"], ["y"])]
    w = onnx.numpy_helper.from_array(np.array([1.5, -2.0], np.float32), "w")
    model = helper.make_model(helper.make_graph(nodes, "g", [x, i], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 23)])
    out = trt_backend.convert_float_precision(model, precision)
    assert out.graph.input[0].type.tensor_type.elem_type == elem
    assert out.graph.input[1].type.tensor_type.elem_type == TensorProto.INT64
    assert out.graph.output[0].type.tensor_type.elem_type == elem
    assert out.graph.initializer[0].data_type == elem
    assert out.graph.node[0].attribute[0].i == elem
    assert out.graph.node[1].attribute[0].t.data_type == elem
    onnx.checker.check_model(out, full_check=True)
    np.testing.assert_allclose(onnx.numpy_helper.to_array(out.graph.initializer[0]).astype(np.float32), [1.5, -2.0])


def test_fp16_conversion_warns_of_finite_values_it_turns_into_infinity(caplog):
    """A mask's fill (float32's min) becomes -inf in fp16 without a word; a finite value beyond fp16's
    range is named in a warning."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    fill = onnx.numpy_helper.from_array(np.array([0.0, np.finfo(np.float32).min, -1e30], np.float32), "fill")
    big = onnx.numpy_helper.from_array(np.array([1.0, 7e4, -2e5], np.float32), "big")
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["x", "fill"], ["t"]), helper.make_node("Mul", ["t", "big"], ["y"])], "g", [x], [y],
        [fill, big]), opset_imports=[helper.make_opsetid("", 23)])
    with caplog.at_level("WARNING", logger="attnc.compiler.backends.tensorrt"):
        out = trt_backend.convert_float_precision(model, "fp16")
    values = {t.name: onnx.numpy_helper.to_array(t).astype(np.float32) for t in out.graph.initializer}
    np.testing.assert_array_equal(values["fill"], [0.0, -np.inf, -np.inf])
    np.testing.assert_array_equal(values["big"], [1.0, np.inf, -np.inf])
    assert [r.getMessage() for r in caplog.records] == [
        "big: 2 value(s) beyond fp16's range become ±inf (largest |x| 2e+05); keep this tensor float32 or build "
        "in another precision"]


def test_dtype_mapping():
    assert tp.TRT_TO_NUMPY["HALF"] == "float16"
    assert trt_backend.numpy_dtype_name("DataType.BF16") == "bfloat16"
    with pytest.raises(AttncError):
        trt_backend.numpy_dtype_name("DataType.FP8")


# ----------------------------------------------------------------------------- plugin fields and shapes


@pytest.mark.parametrize("value, kind, type_name, data", [
    (0.125, "float", "FLOAT32", np.float32(0.125).tobytes()),
    (3, "int", "INT32", np.int32(3).tobytes()),
    ([7, 7], "ints", "INT32", np.array([7, 7], "<i4").tobytes()),
    ([0.5, 2.0], "floats", "FLOAT32", np.array([0.5, 2.0], "<f4").tobytes()),
    ("elu1", "string", "CHAR", b"elu1\0"),
])
def test_attribute_field_round_trip(value, kind, type_name, data):
    field = tp.encode_attribute(helper.make_attribute("x", value))
    assert (field.type, field.data) == (type_name, data)
    assert field.length == (len(data) if type_name == "CHAR" else len(data) // 4)
    assert tp.decode_field(kind, field.type, field.data) == value


def test_int_attributes_must_fit_int32():
    with pytest.raises(AttncError, match="does not fit int32"):
        tp.encode_attribute(helper.make_attribute("big", 2 ** 40))
    with pytest.raises(AttncError, match="cannot pass to a plugin"):
        tp.encode_attribute(helper.make_attribute("g", helper.make_graph([], "g", [], [])))


def test_every_fused_op_has_a_plugin_spec_and_node_fields_round_trip():
    assert set(tp.registered_ops()) == set(fused_ops.FUSED_OPS)
    from attnc.plugins import agent, linear, neighborhood

    nodes = [agent.make_node(["q", "k", "v", "a"], ["o"], "n", scale=0.25),
             linear.make_node(["q", "k", "v"], ["o"], "n", feature_map="relu", causal=1),
             neighborhood.make_node(["q", "k", "v"], ["o"], "n", kernel_size=[7, 5], dilation=[1, 2], stride=[3, 2])]
    for node in nodes:
        fields = tp.encode_node_fields(node)
        decoded = tp.decode_fields(node.op_type, {f.name: (f.type, f.data) for f in fields})
        for attr in node.attribute:
            value = helper.get_attribute_value(attr)
            value = value.decode() if isinstance(value, bytes) else value
            assert decoded[attr.name] == pytest.approx(value), (node.op_type, attr.name)


@pytest.mark.parametrize("op_type, shapes, attrs, expected", [
    ("AgentAttention", [[2, 4, 197, 64], [2, 4, 197, 64], [2, 4, 197, 32], [1, 4, 49, 64]], {}, [2, 4, 197, 32]),
    ("FlowAttention", [["b", 8, 128, 64]] * 3, {}, ["b", 8, 128, 64]),
    ("KernelLinearAttention", [[1, 2, 10, 16], [1, 2, 10, 16], [1, 2, 10, 8]], {}, [1, 2, 10, 8]),
    ("NeighborhoodAttention", [[1, 2, 14, 14, 32]] * 3, {"kernel_size": [7, 7]}, [1, 2, 14, 14, 32]),
])
def test_output_shape_rules(op_type, shapes, attrs, expected):
    assert tp.output_shape(op_type, shapes, attrs) == expected


def test_launch_grid_helper():
    assert tp.cdiv(1000, 128) == 8 and tp.cdiv(1024, 128) == 8


# ----------------------------------------------------------------------------- QDP (TensorRT 10/11) registration


class _FakeDim:
    """A ``trtp.ShapeExpr``: a constant or a dynamic dim (``None``), with ``+`` as QDP has."""

    def __init__(self, value):
        self.value = value
        self.is_constant = value is not None

    def constant_value(self):
        return self.value

    def __add__(self, other):
        return _FakeDim(None if self.value is None else self.value + other)


class _FakeDesc:
    def __init__(self, shape, dtype="DataType.HALF"):
        self.shape_expr = [_FakeDim(d) for d in shape]
        self.dtype = dtype


class _FakeTrtp:
    """Records what attnc hands to ``tensorrt.plugin`` (no TensorRT needed), and refuses what
    tensorrt.plugin's own validation (``tensorrt/plugin/_validate.py``) refuses: names with
    dots, unannotated or interleaved parameters, attribute types QDP cannot serialise, a
    register function without a ``TensorDesc``/``Tuple[TensorDesc, ...]`` return, an AOT function
    whose parameters are not (tensors, attributes, outputs, tactic) or that lacks the
    ``tuple[str | bytes, str | bytes, KernelLaunchParams, SymIntExprs]`` return annotation."""

    TensorDesc = _FakeDesc
    DataType = type("DataType", (), {"FLOAT": "DataType.FLOAT"})

    class KernelLaunchParams:
        pass

    class SymExprs(list):
        pass

    class SymIntExprs(SymExprs):
        def __init__(self, n):
            super().__init__([None] * n)

    class ShapeExprs(list):
        @classmethod
        def from_tuple(cls, dims):
            return cls(dims)

    def __init__(self):
        self.registered, self.aot, self.num_outputs, self.tensors = {}, {}, {}, {}
        self.SymInt32 = lambda v: ("sym", v)

    @staticmethod
    def from_shape_expr(shape_expr, dtype):
        desc = _FakeDesc([], dtype)
        desc.shape_expr = list(shape_expr)
        return desc

    @staticmethod
    def _check_id(plugin_id):
        namespace, name = plugin_id.split("::")
        assert "." not in namespace and "." not in name and namespace not in ("", "trt", "tensorrt", "std"), plugin_id

    def register(self, plugin_id):
        import inspect
        import typing

        def wrap(fn):
            self._check_id(plugin_id)
            tensors, seen_attr = [], False
            for name, param in inspect.signature(fn).parameters.items():
                assert param.annotation is not inspect.Parameter.empty, f"{name}: no type annotation"
                if param.annotation is _FakeDesc:
                    assert not seen_attr, "TensorDescs and attributes interspersed"
                    tensors.append(name)
                else:
                    seen_attr = True
                    assert name not in ("outputs", "stream", "tactic")
                    assert param.annotation in (int, float, bytes, bool, str) or "NDArray" in str(param.annotation)
            returns = inspect.signature(fn).return_annotation
            if typing.get_origin(returns) is tuple:
                assert all(arg is _FakeDesc for arg in typing.get_args(returns)), returns
                self.num_outputs[plugin_id] = len(typing.get_args(returns))
            else:
                assert returns is _FakeDesc, f"return annotation {returns}"
                self.num_outputs[plugin_id] = 1
            self.tensors[plugin_id] = tensors
            return self.registered.setdefault(plugin_id, fn)

        return wrap

    def aot_impl(self, plugin_id):
        import inspect
        import typing

        def wrap(fn):
            self._check_id(plugin_id)
            register = inspect.signature(self.registered[plugin_id]).parameters
            assert list(inspect.signature(fn).parameters) == list(register) + ["outputs", "tactic"]
            returns = inspect.signature(fn).return_annotation
            assert typing.get_origin(returns) is tuple, "aot_impl needs a return annotation"
            args = typing.get_args(returns)
            assert len(args) == 4 and args[2] is self.KernelLaunchParams and issubclass(args[3], self.SymExprs)
            for arg in args[:2]:
                assert set(typing.get_args(arg)) <= {str, bytes} if typing.get_args(arg) else arg in (str, bytes)
            return self.aot.setdefault(plugin_id, fn)

        return wrap


def test_qdp_registration_builds_signatures_and_launch_params():
    import inspect

    fake, calls = _FakeTrtp(), []

    def provider(op_type, attrs, dtypes, shapes):
        calls.append((op_type, attrs, dtypes, shapes))
        return tp.AotKernel("agent_fwd", ".version 8.0", grid=lambda outs: (outs[0][2].value, 4),
                            block=(128, 1, 1), shared_mem=1024, scalars=lambda ins: [ins[0][2].value])

    tp.register_qdp(fake, tp.plugin_spec("AgentAttention"), provider)
    desc_fn, aot_fn = fake.registered["attnc::AgentAttention"], fake.aot["attnc::AgentAttention"]
    params = list(inspect.signature(desc_fn).parameters)
    assert params == ["in0", "in1", "in2", "in3", "scale"]
    assert list(inspect.signature(aot_fn).parameters) == params + ["outputs", "tactic"]
    q, k, v, a = _FakeDesc([None, 2, 16, 64]), _FakeDesc([None, 2, 16, 64]), _FakeDesc([None, 2, 16, 32]), \
        _FakeDesc([1, 2, 4, 64])
    out = desc_fn(q, k, v, a, 0.125)
    assert [d.value for d in out.shape_expr] == [None, 2, 16, 32] and out.dtype == q.dtype
    name, ptx, launch, extra = aot_fn(q, k, v, a, 0.125, outputs=(_FakeDesc([None, 2, 16, 32]),), tactic=0)
    assert aot_fn(q, k, v, a, 0.125, (_FakeDesc([None, 2, 16, 32]),), 0)[0] == "agent_fwd"  # positional too
    assert (name, ptx) == ("agent_fwd", ".version 8.0")
    assert (launch.grid_x, launch.grid_y, launch.grid_z, launch.block_x, launch.shared_mem) == (16, 4, 1, 128, 1024)
    assert extra == [("sym", 16)]
    # dtypes and shapes are positional over the op's inputs: the absent biases are None
    assert calls[0] == ("AgentAttention", {"scale": 0.125}, ["float16"] * 4 + [None, None],
                        [[None, 2, 16, 64], [None, 2, 16, 64], [None, 2, 16, 32], [1, 2, 4, 64], None, None])


def test_plugin_variants_name_the_inputs_and_outputs_a_node_has():
    assert tp.plugin_spec("NeighborhoodAttention").name == "NeighborhoodAttention"
    rpb = tp.plugin_spec("NeighborhoodAttention", (0, 1, 2, 3))
    assert rpb.name == "NeighborhoodAttention_in0123_out1" and rpb.plugin_id == "attnc::" + rpb.name
    again = tp.plugin_spec(rpb.name)
    assert (again.op_type, again.present, again.n_outputs) == ("NeighborhoodAttention", (0, 1, 2, 3), 1)
    state = tp.plugin_spec("KernelLinearAttention_in0124_out2")
    assert (state.op_type, state.present, state.n_outputs) == ("KernelLinearAttention", (0, 1, 2, 4), 2)
    assert state.positional(["q", "k", "v", "s"]) == ["q", "k", "v", None, "s"]
    assert 3 in state.float32_inputs and 4 in state.float32_inputs
    shapes = state.output_specs([[2, 3, 5, 8], [2, 3, 5, 8], [2, 3, 5, 6], [2, 3, 8, 6]], "HALF", "FLOAT",
                                {"normalize": 0, "causal": 1})
    assert shapes == [([2, 3, 5, 6], "HALF"), ([2, 3, 8, 6], "FLOAT")]
    normalized = state.output_specs([[2, 3, 5, 8], [2, 3, 5, 8], [2, 3, 5, 6], [2, 3, 8, 7]], "HALF", "FLOAT",
                                    {"normalize": 1, "causal": 1})
    assert normalized[1] == ([2, 3, 8, 7], "FLOAT")  # S and the normaliser's running sum
    assert tp.plugin_spec("AgentAttention", (0, 1, 2, 3, 4, 5)).name == "AgentAttention_in012345_out1"
    for name, message in (("KernelLinearAttention_in013_out1", "first 3 required"),
                          ("KernelLinearAttention_in0127_out1", "does not fit"),
                          ("NeighborhoodAttention_in012_out2", "outputs O"),
                          ("Mystery_in012_out1", "not an attnc fused op")):
        with pytest.raises(AttncError, match=message):
            tp.plugin_spec(name)


def test_node_plugin_spec_reads_the_node():
    node = helper.make_node("KernelLinearAttention", ["q", "k", "v", "", "s"], ["o", "s_out"], domain=DOMAIN)
    assert tp.node_plugin_spec(node).name == "KernelLinearAttention_in0124_out2"
    node = helper.make_node("KernelLinearAttention", ["q", "k", "v", "d", ""], ["o", ""], domain=DOMAIN)
    assert tp.node_plugin_spec(node).name == "KernelLinearAttention_in0123_out1"
    node = helper.make_node("KernelLinearAttention", ["q", "k", "v"], ["", "s_out"], name="gap", domain=DOMAIN)
    with pytest.raises(AttncError, match="'gap'.*leaves out output 0"):
        tp.node_plugin_spec(node)


def test_qdp_variant_with_optional_inputs_and_two_outputs():
    """A linear attention node with decay absent, a state input and a state output: the QDP
    plugin takes exactly its four tensors, declares two outputs (the state float32 whatever Q
    is), and the kernel provider sees the inputs at their contract positions."""
    import inspect

    fake, calls = _FakeTrtp(), []

    def provider(op_type, attrs, dtypes, shapes, **options):
        calls.append((op_type, dtypes, shapes, options))
        return tp.AotKernel("linear_state", ".version 8.0", grid=lambda outs: (outs[0][1].value, 1),
                            scalars=lambda ins: [ins[0][1].value, ins[0][2].value])

    spec = tp.plugin_spec("KernelLinearAttention", (0, 1, 2, 4), 2)
    tp.register_qdp(fake, spec, provider, float32=fake.DataType.FLOAT)
    plugin_id = "attnc::KernelLinearAttention_in0124_out2"
    assert fake.num_outputs[plugin_id] == 2 and fake.tensors[plugin_id] == ["in0", "in1", "in2", "in4"]
    desc_fn, aot_fn = fake.registered[plugin_id], fake.aot[plugin_id]
    q, v, st = _FakeDesc([None, 2, 16, 64]), _FakeDesc([None, 2, 16, 32]), _FakeDesc([None, 2, 64, 33], "FLOAT")
    attrs = dict(feature_map="elu1", causal=1, normalize=1, eps=1e-6, scale=1.0)
    out, state = desc_fn(q, q, v, st, **attrs)
    assert [d.value for d in out.shape_expr] == [None, 2, 16, 32] and out.dtype == q.dtype
    assert [d.value for d in state.shape_expr] == [None, 2, 64, 33] and state.dtype == "DataType.FLOAT"
    name, _, launch, extra = aot_fn(q, q, v, st, *attrs.values(), outputs=(out, state), tactic=0)
    assert name == "linear_state" and extra == [("sym", 2), ("sym", 16)]
    op, dtypes, shapes, options = calls[0]
    assert op == "KernelLinearAttention" and options == {"n_outputs": 2}
    assert dtypes == ["float16", "float16", "float16", None, "float32"]
    assert shapes[3] is None and shapes[4] == [None, 2, 64, 33]
    assert list(inspect.signature(aot_fn).parameters)[:4] == ["in0", "in1", "in2", "in4"]


def test_prepare_model_makes_variants_and_keeps_the_state_float32():
    """Absent optional inputs are dropped from plugin nodes, each node is renamed to its
    variant, and an fp16 build keeps the contract's float32 tensors (state in and out, decay)."""
    f, nodes = TensorProto.FLOAT, []
    nodes.append(helper.make_node("KernelLinearAttention", ["q", "k", "v", "", "state"], ["o", "state_out"],
                                  name="la0", domain=DOMAIN, causal=1, normalize=0))
    nodes.append(helper.make_node("KernelLinearAttention", ["o", "k", "v", "decay"], ["y"], name="la1",
                                  domain=DOMAIN, causal=1))
    inputs = [helper.make_tensor_value_info(n, f, [1, 2, 5, 8]) for n in "qkv"]
    inputs.append(helper.make_tensor_value_info("state", f, [1, 2, 8, 8]))
    outputs = [helper.make_tensor_value_info("y", f, [1, 2, 5, 8]),
               helper.make_tensor_value_info("state_out", f, [1, 2, 8, 8])]
    decay = onnx.numpy_helper.from_array(np.array([0.9, 0.5], np.float32), "decay")
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, [decay]),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    prepared, ops = trt_backend.prepare_model(model, "fp16")
    assert ops == ["KernelLinearAttention_in0123_out1", "KernelLinearAttention_in0124_out2"]
    first, second = prepared.graph.node
    assert first.op_type == "KernelLinearAttention_in0124_out2" and list(first.input) == ["q", "k", "v", "state"]
    assert second.op_type == "KernelLinearAttention_in0123_out1" and len(second.input) == 4
    types = {v.name: v.type.tensor_type.elem_type for v in list(prepared.graph.input) + list(prepared.graph.output)}
    assert types == {"q": TensorProto.FLOAT16, "k": TensorProto.FLOAT16, "v": TensorProto.FLOAT16,
                     "state": f, "y": TensorProto.FLOAT16, "state_out": f}
    assert prepared.graph.initializer[0].data_type == f
    assert list(model.graph.node[0].input) == ["q", "k", "v", "", "state"]  # the caller's model is untouched
    inline, ops = trt_backend.prepare_model(model, "fp16", fused_ops="inline")
    assert ops == [] and inline.graph.node[0].op_type == "KernelLinearAttention"


def test_kernel_for_without_a_provider_says_where_it_goes(monkeypatch):
    from attnc.plugins import flow

    monkeypatch.setitem(sys.modules, "attnc.plugins.flow.kernels", None)
    monkeypatch.setitem(sys.modules, "attnc.plugins.flow.triton", None)
    monkeypatch.delattr(flow, "kernels", raising=False)
    with pytest.raises(AttncError, match="plugins/flow/kernels.py"):
        tp.kernel_for("FlowAttention", {}, ["float16"] * 3, [[1, 2, 16, 64]] * 3)
    calls = []
    monkeypatch.setitem(tp._KERNEL_PROVIDERS, "FlowAttention", lambda *args: calls.append(args) or "kernel")
    assert tp.kernel_for("FlowAttention", {"eps": 1e-6}, ["float16"], [[1]]) == "kernel"
    assert calls == [("FlowAttention", {"eps": 1e-6}, ["float16"], [[1]])]


_TRIVIAL_KERNEL = textwrap.dedent('''
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, y_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)
''')


def test_triton_kernel_compiles_to_sm90_ptx_without_a_gpu(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    (tmp_path / "trivial_kernel.py").write_text(_TRIVIAL_KERNEL)  # @triton.jit needs a source file
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    from trivial_kernel import add_one

    name, ptx, shared = tp.compile_triton_ptx(add_one, {"x_ptr": "*fp32", "n": "i32", "y_ptr": "*fp32"},
                                              {"BLOCK": 256}, arch=90)
    assert name == "add_one" and ".target sm_90" in ptx and f".entry {name}(" in ptx
    # Triton >= 3.3 appends global/profile scratch pointers after the kernel's own params.
    assert tp.ptx_param_count(ptx, name) == 3 + 2


# ----------------------------------------------------------------------------- Python plugins' run time (RTX)

# Plugin variants run by fused_outputs and reference_outputs on the same fresh random CPU
# inputs under Triton's interpreter: (variant, attributes, shapes of the present inputs, dtype).
# Inputs named "decay" / "state" are float32 whatever Q is, as in an fp16 engine.
_RUN_CASES = [
    ("NeighborhoodAttention", {"kernel_size": [3]}, [[1, 2, 9, 8]] * 3, "float32"),
    ("NeighborhoodAttention", {"kernel_size": [3, 3], "dilation": [1, 2], "is_causal": [0, 1], "stride": [2, 1]},
     [[1, 2, 6, 7, 8]] * 3, "float32"),
    ("NeighborhoodAttention_in0123_out1", {"kernel_size": [3, 3], "dilation": [2, 1], "scale": 0.3},
     [[1, 2, 6, 5, 8]] * 3 + [[2, 5, 5]], "float32"),
    ("NeighborhoodAttention_in0123_out1", {"kernel_size": [5], "is_causal": [1]}, [[2, 1, 11, 8]] * 3 + [[1, 9]],
     "float32"),
    ("AgentAttention", {}, [[1, 2, 10, 8], [1, 2, 12, 8], [1, 2, 12, 4], [1, 2, 5, 8]], "float32"),
    ("AgentAttention_in012345_out1", {"scale": 0.3},
     [[1, 2, 10, 8], [1, 2, 12, 8], [1, 2, 12, 8], [1, 2, 5, 8], [2, 5, 12], [1, 2, 10, 5]], "float32"),
    ("AgentAttention_in01234_out1", {}, [[1, 2, 10, 8], [1, 2, 12, 8], [1, 2, 12, 8], [1, 2, 5, 8], [2, 5, 12]],
     "float32"),
    ("AgentAttention_in01235_out1", {}, [[1, 2, 10, 8], [1, 2, 12, 8], [1, 2, 12, 8], [1, 2, 5, 8], [1, 2, 10, 5]],
     "float32"),
    # more agents than the register kernel holds: agent_forward streams them (the TensorRT entry kernel)
    ("AgentAttention", {}, [[1, 1, 3, 8], [1, 1, 4, 8], [1, 1, 4, 8], [1, 1, 257, 8]], "float32"),
    ("FlowAttention", {}, [[1, 2, 9, 8], [1, 2, 11, 8], [1, 2, 11, 4]], "float32"),
    ("FlowAttention", {"causal": 1, "eps": 1e-5}, [[1, 2, 10, 8], [1, 2, 10, 8], [1, 2, 10, 8]], "float32"),
    ("KernelLinearAttention", {}, [[1, 2, 9, 8], [1, 2, 9, 8], [1, 2, 9, 4]], "float32"),
    ("KernelLinearAttention_in0123_out1", {"causal": 1, "feature_map": "relu", "scale": 0.5},
     [[1, 2, 11, 8]] * 3 + [[2]], "float32"),
    ("KernelLinearAttention_in01234_out2", {"causal": 1},
     [[1, 2, 11, 8], [1, 2, 11, 8], [1, 2, 11, 4], [2], [1, 2, 8, 5]], "float32"),
    ("KernelLinearAttention_in012_out2", {"causal": 1, "normalize": 0}, [[1, 2, 9, 8]] * 3, "float32"),
    ("KernelLinearAttention_in01234_out2", {"causal": 1},
     [[1, 2, 11, 8], [1, 2, 11, 8], [1, 2, 11, 4], [2], [1, 2, 8, 5]], "float16"),
]

_FUSED_OUTPUTS_SCRIPT = textwrap.dedent("""
    import json, os, sys, time, warnings
    import torch
    from onnx import helper
    from attnc.compiler.backends import tensorrt_plugins as tp

    warnings.simplefilter("ignore")  # masked padding rows divide 0/0 in the interpreter's numpy
    seed = int(os.environ.get("ATTNC_RUN_SEED") or time.time_ns() % 2 ** 31)
    for index, (name, given, shapes, dtype) in enumerate(json.loads(sys.argv[1])):
        gen = torch.Generator().manual_seed(seed + index)
        spec = tp.plugin_spec(name)
        # the attributes as the plugin gets them: through the parser's PluginFields, defaults filled in
        fields = [tp.encode_attribute(helper.make_attribute(k, v)) for k, v in given.items()]
        attrs = tp.decode_fields(name, {f.name: (f.type, f.data) for f in fields})
        inputs = []
        for position, shape in zip(spec.present, shapes):
            role = spec.inputs[position]
            if role == "decay":
                inputs.append(0.7 + 0.3 * torch.rand(shape, generator=gen))
            elif role == "state":  # S | z of earlier tokens: the normaliser's sums are positive
                inputs.append(torch.rand(shape, generator=gen))
            else:
                inputs.append(torch.randn(shape, generator=gen).to(getattr(torch, dtype)))
        start = time.perf_counter()
        fused = tp.fused_outputs(spec, attrs, inputs)
        # half inputs: the reference runs on their float32 values
        reference = tp.reference_outputs(spec, attrs, [t.float() for t in inputs])
        errors = []
        for f, r in zip(fused, reference):
            error = float((f.double() - r.double()).abs().max())
            errors.append([error, error / float(r.double().abs().max())])
        print(json.dumps({"case": [name, given, dtype], "seed": seed, "errors": errors,
                          "dtypes": [str(f.dtype) for f in fused], "n": len(fused),
                          "seconds": round(time.perf_counter() - start, 2)}), flush=True)
""")


def test_fused_outputs_match_the_reference_outputs_interpreted():
    """Every op through the Triton launcher TensorRT-RTX's Python plugins run (``fused_outputs``)
    equals its torch reference (``reference_outputs``): plugin variants with and without optional
    inputs, several outputs, attributes through the PluginField round trip. One process under
    TRITON_INTERPRET=1 (triton decides interpreted or compiled at import)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", _FUSED_OUTPUTS_SCRIPT, json.dumps(_RUN_CASES)], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    records = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert run.returncode == 0 and len(records) == len(_RUN_CASES), run.stderr[-3000:]
    failures = []
    for record, (name, _, _, dtype) in zip(records, _RUN_CASES):
        spec = tp.plugin_spec(name)
        tol = 1e-2 if dtype == "float16" else 1e-4  # max abs error / max abs reference
        if record["n"] != spec.n_outputs or max(rel for _, rel in record["errors"]) > tol:
            failures.append(f"{record['case']}: {record['n']} outputs, [abs, rel] errors {record['errors']}")
        assert record["dtypes"] == [f"torch.{dtype}"] + ["torch.float32"] * (spec.n_outputs - 1)
    assert not failures, f"ATTNC_RUN_SEED={records[0]['seed']}:\n" + "\n".join(failures)


def _fake_rtx(ops_of_engine: dict):
    """A stand-in for ``tensorrt_rtx`` just deep enough for :class:`EngineRunner` and the Python
    plugins: a plugin registry, and engines (no I/O tensors) whose ``execute_async_v3`` enqueues
    one plugin per op listed in ``ops_of_engine[plan bytes]``, created from the registry's
    creators as TensorRT does when it deserializes an engine."""
    import types

    def interface(name):
        return type(name, (), {"__init__": lambda self, *args: None})

    creators = {}

    class Registry:
        def get_creator(self, name, version, namespace):
            return creators.get((name, version, namespace))

        def register_creator(self, creator, namespace):
            creators[(creator.name, creator.plugin_version, namespace)] = creator
            return True

    class Context:
        def __init__(self, plugins):
            self.plugins = plugins

        def execute_async_v3(self, stream):
            for plugin in self.plugins:
                plugin.enqueue([], [], [], [], 0, stream)
            return True

    class Engine:
        num_io_tensors = 0

        def __init__(self, ops):
            self.plugins = [creators[(op, tp.PLUGIN_VERSION, tp.NAMESPACE)].create_plugin(op, [], "RUNTIME")
                            for op in ops]

        def create_execution_context(self):
            return Context([plugin.attach_to_context(None) for plugin in self.plugins])

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan):
            return Engine(ops_of_engine[plan])

    kinds = types.SimpleNamespace(FLOAT32="FLOAT32", INT32="INT32", CHAR="CHAR")
    trt = types.SimpleNamespace(__version__="1.7", ILogger=interface("ILogger"), Runtime=Runtime,
                                get_plugin_registry=Registry, PluginFieldType=kinds, PluginFieldCollection=list,
                                PluginField=lambda name, data, kind: (name, kind),
                                **{name: interface(name) for name in ("IPluginV3", "IPluginV3OneCore",
                                                                      "IPluginV3OneBuild", "IPluginV3OneRuntime",
                                                                      "IPluginCreatorV3One")})
    return trt, creators


def test_engines_in_one_process_run_their_plugins_with_their_own_implementation(tmp_path, monkeypatch):
    """Two TensorRT-RTX (Python plugin) engines loaded side by side, one with ``triton_run``
    and one with ``plugin_impl="reference"``: each engine's plugins run with its own choice,
    whichever was loaded last, and the creators are registered once."""
    import types

    import torch

    from attnc.runtime import Engine

    linear_ops = ["KernelLinearAttention_in0124_out2", "NeighborhoodAttention"]
    engines = {"triton": (tmp_path / "a", b"plan a", linear_ops),
               "reference": (tmp_path / "b", b"plan b", ["NeighborhoodAttention"])}
    for folder, plan, ops in engines.values():
        folder.mkdir()
        (folder / trt_backend.ARTEFACT).write_bytes(plan)
        (folder / trt_backend.BUILD_INFO).write_text(json.dumps({"plugins": {"mode": "python-v3", "ops": ops}}))
    fake, creators = _fake_rtx({plan: ops for _, plan, ops in engines.values()})
    calls = []
    for impl in tp.RUN_IMPLS:
        monkeypatch.setitem(tp.RUN_IMPLS, impl, lambda name, *args, impl=impl: calls.append((impl, name)))
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda: (fake, "tensorrt_rtx"))
    monkeypatch.setattr(trt_backend, "gpu_name", lambda: "a GPU")
    stream = types.SimpleNamespace(cuda_stream=7, wait_stream=lambda other: None, synchronize=lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)

    triton = Engine(engines["triton"][0])
    reference = Engine(engines["reference"][0], plugin_impl="reference")
    assert sorted(name for name, _, _ in creators) == sorted(linear_ops)
    for _ in range(2):
        assert triton.infer({}) == {} and reference.infer({}) == {}
    assert calls == [("triton", op) for op in linear_ops] + [("reference", "NeighborhoodAttention")] \
        + [("triton", op) for op in linear_ops] + [("reference", "NeighborhoodAttention")]
    # outside an Engine's infer (a build, another runner) no implementation is chosen
    plugin = creators[("NeighborhoodAttention", tp.PLUGIN_VERSION, tp.NAMESPACE)].create_plugin("n", [], "RUNTIME")
    with pytest.raises(RuntimeError, match="no run-time implementation"):
        plugin.enqueue([], [], [], [], 0, 7)
    with tp.run_plugins_with(tp.RUN_IMPLS["reference"]):
        plugin.enqueue([], [], [], [], 0, 7)
    assert calls[-1] == ("reference", "NeighborhoodAttention")
    with pytest.raises(AttncError, match="plugin_impl='numpy'"):
        Engine(engines["triton"][0], plugin_impl="numpy")


# ----------------------------------------------------------------------------- real builds (TensorRT-RTX on CPU)


@pytest.mark.tensorrt
def test_build_attention_engine_and_describe(tmp_path):
    trt, flavour = tensorrt_or_skip()
    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    t0 = time.perf_counter()
    engine = trt_backend.build(model_path, tmp_path / "out", "fp16", opt_shapes=QKV, workspace=1 << 28)
    elapsed = time.perf_counter() - t0
    assert engine == tmp_path / "out" / "engine.plan" and engine.stat().st_size > 1000
    info = trt_backend.describe(engine)
    assert info["flavour"] == flavour and info["version"] == trt.__version__
    assert info["precision"] == "fp16" and info["strongly_typed"]
    assert info["inputs"][0] == {"name": "q", "dtype": "float16", "shape": [-1, 4, 16, 64]}
    assert info["outputs"][0]["dtype"] == "float16"
    assert info["profiles"] == [{n: {"min": [1, 4, 16, 64], "opt": [2, 4, 16, 64], "max": [2, 4, 16, 64]}
                                 for n in "qkv"}]
    assert info["plugins"]["ops"] == [] and info["workspace"] == 1 << 28
    if trt_backend.gpu_name() is None:
        assert info["gpu"].startswith("none: built for ") and "by TensorRT-RTX on CPU" in info["gpu"]
    assert "Attention" in (tmp_path / "out" / "build.log").read_text()
    print(f"attention fp16 engine build: {elapsed:.2f} s")


@pytest.mark.tensorrt
def test_exported_mhsa_lowered_by_the_softmax_pass_builds(tmp_path):
    """PyTorch MHSA -> ONNX -> softmax pass (one opset-23 ``Attention``) -> TensorRT engine."""
    tensorrt_or_skip()
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model
    from attnc.models.mhsa import MultiHeadSelfAttention

    torch.manual_seed(0)
    path = export_onnx(MultiHeadSelfAttention(128, num_heads=2).eval(), [torch.randn(2, 16, 128)],
                       tmp_path / "mhsa.onnx", exporter="torchscript", opset=18, input_names=["x"])
    manifest = compile_model(path, tmp_path / "out", CompileOptions(backend="tensorrt", precision="fp16",
                                                                    families=["softmax"]))
    assert manifest["ops_after"].get("Attention") == 1 and "Softmax" not in manifest["ops_after"]
    assert manifest["backend_info"]["inputs"] == [{"name": "x", "dtype": "float16", "shape": [2, 16, 128]}]
    assert manifest["backend_info"]["profiles"] == [{"x": {"min": [2, 16, 128], "opt": [2, 16, 128],
                                                           "max": [2, 16, 128]}}]


@pytest.mark.tensorrt
def test_soft_capped_attention_stays_unfused_for_tensorrt(tmp_path):
    """TensorRT's attention layer has no soft-capping (its parser rejects ``Attention`` with
    ``softcap``): for this backend the softmax pass leaves Gemma 2-style capped scores as plain ops,
    says why, and the engine builds; ONNX Runtime gets the fused node."""
    tensorrt_or_skip()
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model

    class Capped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            s = 30.0 * torch.tanh(q @ k.transpose(-1, -2) / 8 ** 0.5 / 30.0)
            s = s + torch.full((n, n), float("-inf")).triu(1)
            return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    path = export_onnx(Capped().eval(), [torch.randn(2, 9, 32)], tmp_path / "capped.onnx", input_names=["x"])
    manifest = compile_model(path, tmp_path / "trt", CompileOptions(backend="tensorrt", families=["softmax"]))
    (report,) = manifest["passes"]
    assert report["rewritten"] == 0 and any("no soft-capping" in m["reason"] for m in report["near_misses"])
    assert "Attention" not in manifest["ops_after"] and (tmp_path / "trt" / "engine.plan").stat().st_size > 0
    manifest = compile_model(path, tmp_path / "ort", CompileOptions(backend="onnxruntime", families=["softmax"]))
    assert manifest["ops_after"].get("Attention") == 1


@pytest.mark.tensorrt
def test_attention_sinks_build(tmp_path):
    """gpt-oss-style sinks reach TensorRT's attention layer as one more (zero) key whose mask column holds
    the sink logits: the layer takes the ``[B, H, S_q, S_kv + 1]`` float mask and the engine builds."""
    tensorrt_or_skip()
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model

    class Sinks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(32, 96), torch.nn.Linear(32, 32)
            self.sinks = torch.nn.Parameter(torch.randn(4))

        def forward(self, x):
            b, n, c = x.shape
            q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
            s = q @ k.transpose(-1, -2) / 8 ** 0.5 + torch.full((n, n), float("-inf")).triu(1)
            s = torch.cat([s, self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)], dim=-1)
            return self.proj((s.softmax(-1)[..., :-1] @ v).transpose(1, 2).reshape(b, n, c))

    torch.manual_seed(0)
    path = export_onnx(Sinks().eval(), [torch.randn(2, 9, 32)], tmp_path / "sinks.onnx", input_names=["x"])
    manifest = compile_model(path, tmp_path / "trt", CompileOptions(backend="tensorrt", families=["softmax"]))
    assert manifest["passes"][0]["rewritten"] == 1 and manifest["ops_after"].get("Attention") == 1
    assert (tmp_path / "trt" / "engine.plan").stat().st_size > 0


@pytest.mark.tensorrt
def test_transformers_bert_with_padding_mask_builds(tmp_path):
    """transformers' BertModel with its default SDPA attention and a padding-mask input, exported by
    dynamo with dynamic batch and length -> two ``Attention`` layers reading the padding mask -> a
    TensorRT engine."""
    tensorrt_or_skip()
    transformers = pytest.importorskip("transformers")
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model

    class Bert(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
            self.model = transformers.BertModel(config, add_pooling_layer=False)

        def forward(self, ids, mask):
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    torch.manual_seed(0)
    axes = {n: {0: "batch", 1: "seq"} for n in ("ids", "mask")}
    path = export_onnx(Bert().eval(), (torch.randint(0, 64, (2, 9)), torch.ones(2, 9, dtype=torch.int64)),
                       tmp_path / "bert.onnx", exporter="dynamo", dynamic_axes=axes, input_names=["ids", "mask"])
    shapes = {f"{kind}_shapes": {n: s for n in ("ids", "mask")}
              for kind, s in (("min", [1, 4]), ("opt", [2, 9]), ("max", [4, 16]))}
    manifest = compile_model(path, tmp_path / "out", CompileOptions(backend="tensorrt", backend_options=shapes))
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    fused = onnx.load(str(tmp_path / "out" / "model.fused.onnx"))
    assert [len(n.input) for n in fused.graph.node if n.op_type == "Attention"] == [4, 4]   # with the padding mask
    assert manifest["backend_info"]["profiles"] == [{n: {"min": [1, 4], "opt": [2, 9], "max": [4, 16]}
                                                     for n in ("ids", "mask")}]


@pytest.mark.tensorrt
def test_pruned_transformers_t5_builds(tmp_path):
    """transformers' T5 encoder with half its heads pruned (its per-head relative position bias gets a
    Gather of the kept heads; dynamic batch and length) and fused -> a TensorRT engine."""
    tensorrt_or_skip()
    transformers = pytest.importorskip("transformers")
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model

    class T5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=64)
            self.model = transformers.T5EncoderModel(config)

        def forward(self, ids):
            return self.model(ids).last_hidden_state

    torch.manual_seed(0)
    path = export_onnx(T5().eval(), (torch.randint(0, 64, (2, 9)),), tmp_path / "t5.onnx", exporter="dynamo",
                       dynamic_axes={"ids": {0: "batch", 1: "seq"}}, input_names=["ids"])
    np.savez(tmp_path / "calib.npz", ids=np.random.default_rng(0).integers(0, 64, (2, 9)))
    shapes = {f"{kind}_shapes": {"ids": s} for kind, s in (("min", [1, 4]), ("opt", [2, 9]), ("max", [4, 16]))}
    manifest = compile_model(path, tmp_path / "out", CompileOptions(
        backend="tensorrt", backend_options=shapes, prune_heads="0.5", calibration=str(tmp_path / "calib.npz")))
    assert manifest["shrink"]["prune_heads"]["heads_after"] == 4 and manifest["ops_after"].get("Attention") == 2
    fused = onnx.load(str(tmp_path / "out" / "model.fused.onnx"))
    assert sum(n.op_type == "Gather" and "heads.pruned" in n.name for n in fused.graph.node) == 2


def _llama_generation_step(tmp_path) -> tuple[Path, Any, dict]:
    """A transformers Llama checkpoint's generation step with its KV cache, exported by TorchScript: ``(its
    path, its spec, a TensorRT profile from an empty cache to 64 cached tokens)``."""
    pytest.importorskip("transformers")
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.models import transformers_zoo
    from attnc.models.hf_checkpoint import load_checkpoint, with_past

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers_zoo.build("llama").save_pretrained(tmp_path / "llama")
    step, spec = with_past(*load_checkpoint(str(tmp_path / "llama")))
    path = export_onnx(step, spec.example_inputs(), tmp_path / "step.onnx", exporter="torchscript",
                       dynamic_axes=spec.dynamic_axes, input_names=spec.input_names, output_names=spec.output_names)
    sizes = {"min": (1, 1, 0), "opt": (2, 1, 16), "max": (4, 32, 64)}   # batch, new tokens, cached tokens
    shapes = {f"{kind}_shapes": {"input_ids": (b, t), "attention_mask": (b, p + t),
                                 **{s.name: (b, s.shape[1], p, s.shape[3]) for s in spec.inputs[2:]}}
              for kind, (b, t, p) in sizes.items()}
    return path, spec, shapes


@pytest.mark.tensorrt
def test_transformers_llama_generation_step_builds(tmp_path):
    """A transformers Llama checkpoint's generation step with its KV cache (``attnc export --with-past``: GQA,
    rotary, the cache concatenated in front of the new keys) -> one ``Attention`` per layer -> an fp16 engine
    whose profile runs from an empty cache (the prompt's step) to 64 cached tokens."""
    tensorrt_or_skip()
    from attnc.compiler.pipeline import CompileOptions, compile_model

    path, spec, shapes = _llama_generation_step(tmp_path)
    manifest = compile_model(path, tmp_path / "out", CompileOptions(backend="tensorrt", precision="fp16",
                                                                    backend_options=shapes))
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    info = trt_backend.describe(tmp_path / "out" / "engine.plan")
    assert [o["name"] for o in info["outputs"]] == spec.output_names
    assert info["profiles"][0]["past_key_values.1.value"]["min"] == [1, 2, 0, 8]


@pytest.mark.tensorrt
def test_pruned_transformers_bloom_builds(tmp_path):
    """transformers' BLOOM (ALiBi attention on flattened heads, TorchScript export: the merge reads
    B·H from the output's shape) with half its heads pruned -> ``Attention`` layers whose mask sums
    the kept heads' ALiBi bias and the causal mask -> a TensorRT engine."""
    tensorrt_or_skip()
    transformers = pytest.importorskip("transformers")
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.compiler.pipeline import CompileOptions, compile_model

    class Bloom(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = transformers.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)
            self.model = transformers.BloomForCausalLM(config)

        def forward(self, ids):
            return self.model(ids).logits

    torch.manual_seed(0)
    path = export_onnx(Bloom().eval(), (torch.randint(0, 64, (2, 9)),), tmp_path / "bloom.onnx",
                       exporter="torchscript", dynamic_axes={"ids": {0: "batch", 1: "seq"}}, input_names=["ids"])
    np.savez(tmp_path / "calib.npz", ids=np.random.default_rng(0).integers(0, 64, (2, 9)))
    shapes = {f"{kind}_shapes": {"ids": s} for kind, s in (("min", [1, 4]), ("opt", [2, 9]), ("max", [4, 16]))}
    manifest = compile_model(path, tmp_path / "out", CompileOptions(
        backend="tensorrt", backend_options=shapes, prune_heads="0.5", calibration=str(tmp_path / "calib.npz")))
    assert manifest["shrink"]["prune_heads"]["heads_after"] == 4 and manifest["ops_after"].get("Attention") == 2
    assert "Softmax" not in manifest["ops_after"] and (tmp_path / "out" / "engine.plan").stat().st_size > 0


@pytest.mark.tensorrt
def test_timing_cache_option(tmp_path):
    trt, flavour = tensorrt_or_skip()
    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    cache = tmp_path / "trt.cache"
    engine = trt_backend.build(model_path, tmp_path / "out", "fp16", opt_shapes=QKV, timing_cache=cache)
    if flavour == "tensorrt_rtx":  # RTX engines do not use it, and it would need a GPU
        assert not cache.exists() and trt_backend.describe(engine)["timing_cache"] is None
        assert "timing cache" in (tmp_path / "out" / "build.log").read_text()
    else:
        assert cache.stat().st_size > 0 and trt_backend.describe(engine)["timing_cache"] == str(cache)


def _run_isolated(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a build in its own process: a TensorRT-RTX SIGSEGV fails one test, not the run."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != -11, "TensorRT segfaulted building the engine (see unshare_attention_scales)"
    assert run.returncode == 0, run.stderr[-2000:]
    return run


_CLI_SCRIPT = "from attnc.compiler.cli import cli; cli()"   # `attnc ARGS...` in its own process

_COMPILE_SCRIPT = """
    import json, sys
    from attnc.compiler.pipeline import CompileOptions, compile_model

    options = CompileOptions(backend="tensorrt", precision="fp16", **json.loads(sys.argv[3]))
    compile_model(sys.argv[1], sys.argv[2], options)
"""


@pytest.mark.tensorrt
def test_shared_scaled_inputs_are_moved_to_the_other_side():
    """Agent attention reads the agent tokens ``a`` as Q of one ``Attention`` and K of the
    other; the parser scales both by the same sqrt(scale), which TensorRT-RTX merges into
    one shared product and then crashes on. The second layer must read ``a`` unscaled."""
    trt, _ = tensorrt_or_skip()
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(trt_backend.prepare_model(agent_model(fused=False), "fp16")[0].SerializeToString())
    attention = trt_backend._attention_layers(trt, network)
    assert len(attention) == 2
    assert trt_backend.unshare_attention_scales(trt, network, attention) == (1, [])
    first, second = (layer.attention for layer in attention)
    assert second.get_input(1).name == "a"  # K: the raw input, no product left to share
    producers = {network.get_layer(i).get_output(0).name: network.get_layer(i) for i in range(network.num_layers)}
    query = producers[second.get_input(0).name]
    assert query.type == trt.LayerType.ELEMENTWISE and query.get_input(0).name == "q"
    factor = producers[query.get_input(1).name]
    assert factor.type == trt.LayerType.ELEMENTWISE and tuple(factor.get_output(0).shape) == (1, 1, 1, 1)
    assert first.get_input(0).name != "a" and first.get_input(1).name != "k"  # left as parsed


@pytest.mark.tensorrt
def test_build_agent_attention_lowered_to_two_attention_nodes(tmp_path):
    """Agent attention as two ``Attention`` layers builds (issue #5), and the manifest says so."""
    trt, flavour = tensorrt_or_skip()
    model_path = _save(agent_model(fused=False), tmp_path / "agent.onnx")
    options = {"fuse": False, "backend_options": {"opt_shapes": [f"{n}:{'x'.join(map(str, s))}"
                                                                 for n, s in AGENT.items()]}}
    _run_isolated(_COMPILE_SCRIPT, str(model_path), str(tmp_path / "out"), json.dumps(options))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["artefact"] == "engine.plan" and manifest["backend"] == "tensorrt"
    assert manifest["ops_after"]["Attention"] == 2
    info = manifest["backend_info"]
    assert info["flavour"] == flavour and info["version"] == trt.__version__
    assert info["attention_layers"] == 2 and info["attention_scales_moved"] == 1
    assert info["decomposable_attention_layers"] == 2
    assert [t["name"] for t in info["inputs"]] == ["q", "k", "v", "a"]
    assert info["outputs"] == [{"name": "o", "dtype": "float16", "shape": [-1, 2, 16, 64]}]
    assert info["profiles"][0]["a"] == {"min": [1, 2, 4, 64], "opt": [2, 2, 4, 64], "max": [2, 2, 4, 64]}
    assert (tmp_path / "out" / "engine.plan").stat().st_size == info["engine_bytes"] > 1000


def _shared_input_attention_model(layout: str) -> tuple[onnx.ModelProto, int]:
    """Opset-23 ``Attention`` nodes that share Q or K: ``chained`` (o0 -> Q of the next, one K),
    ``parallel`` (three over one Q and K), ``3d`` (chained, [B, N, H*D] inputs), ``causal``."""
    f = TensorProto.FLOAT
    shape, heads = ([2, 16, 256], {"q_num_heads": 4, "kv_num_heads": 4}) if layout == "3d" else ([2, 4, 16, 64], {})
    extra = {"is_causal": 1} if layout == "causal" else {}
    count = 3 if layout == "parallel" else 2
    nodes = [helper.make_node("Attention", ["q" if layout == "parallel" or i == 0 else f"o{i - 1}", "k", "v"],
                              [f"o{i}"], name=f"attn{i}", **heads, **extra) for i in range(count)]
    outputs = [f"o{i}" for i in range(count)] if layout == "parallel" else [f"o{count - 1}"]
    model = helper.make_model(
        helper.make_graph(nodes, layout, [helper.make_tensor_value_info(n, f, shape) for n in "qkv"],
                          [helper.make_tensor_value_info(o, f, shape) for o in outputs]),
        opset_imports=[helper.make_opsetid("", 23)])
    return model, count


@pytest.mark.tensorrt
def test_attention_layers_sharing_inputs_build(tmp_path):
    """Layouts that each crashed TensorRT-RTX 1.7 on CPU before the scales were moved."""
    tensorrt_or_skip()
    layouts = {layout: _shared_input_attention_model(layout) for layout in ("chained", "parallel", "3d", "causal")}
    for layout, (model, _) in layouts.items():
        _save(model, tmp_path / f"{layout}.onnx")
    script = """
        import sys
        from attnc.compiler.backends import tensorrt as t
        for layout in sys.argv[2:]:
            t.build(f"{sys.argv[1]}/{layout}.onnx", f"{sys.argv[1]}/{layout}", "fp16")
    """
    _run_isolated(script, str(tmp_path), *layouts)
    for layout, (model, count) in layouts.items():
        info = trt_backend.describe(tmp_path / layout / "engine.plan")
        assert info["attention_layers"] == count and info["attention_scales_moved"] == count - 1, layout
        assert len(info["outputs"]) == len(model.graph.output), layout


@pytest.mark.tensorrt
def test_attention_layers_that_cannot_be_separated_are_refused(tmp_path, monkeypatch):
    """Four layers over one Q and K: every form of the scaled product is taken."""
    trt, flavour = tensorrt_or_skip()
    if flavour != "tensorrt_rtx" or trt_backend.gpu_name() is not None:
        pytest.skip("the refusal is for TensorRT-RTX without a GPU")
    monkeypatch.setattr(trt.Builder, "build_serialized_network",
                        lambda *a: pytest.fail("this build segfaults; attnc must refuse it first"))
    f = TensorProto.FLOAT
    nodes = [helper.make_node("Attention", ["q", "k", "v"], [f"o{i}"], name=f"attn{i}") for i in range(4)]
    model = helper.make_model(
        helper.make_graph(nodes, "four", [helper.make_tensor_value_info(n, f, [2, 4, 16, 64]) for n in "qkv"],
                          [helper.make_tensor_value_info(f"o{i}", f, [2, 4, 16, 64]) for i in range(4)]),
        opset_imports=[helper.make_opsetid("", 23)])
    with pytest.raises(AttncError, match="could not separate attn3"):
        trt_backend.build(_save(model, tmp_path / "four.onnx"), tmp_path / "out", "fp16")
    assert not (tmp_path / "out" / "engine.plan").exists()


@pytest.mark.tensorrt
def test_two_layer_mhsa_lowered_by_the_softmax_pass_builds(tmp_path):
    """A 2-layer transformer: the softmax pass emits two ``Attention`` nodes; both build."""
    tensorrt_or_skip()
    import torch

    from attnc.compiler.export import export_onnx
    from attnc.models.mhsa import MultiHeadSelfAttention

    torch.manual_seed(0)
    layers = torch.nn.Sequential(MultiHeadSelfAttention(128, num_heads=2), MultiHeadSelfAttention(128, num_heads=2))
    path = export_onnx(layers.eval(), [torch.randn(2, 16, 128)], tmp_path / "mhsa2.onnx", exporter="torchscript",
                       opset=18, input_names=["x"])
    _run_isolated(_COMPILE_SCRIPT, str(path), str(tmp_path / "out"), json.dumps({"families": ["softmax"]}))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    info = manifest["backend_info"]
    assert info["attention_layers"] == 2 and info["attention_scales_moved"] == 0  # nothing shared
    assert info["outputs"][0]["dtype"] == "float16" and info["outputs"][0]["shape"] == [2, 16, 128]


@pytest.mark.tensorrt
def test_compile_pipeline_writes_tensorrt_manifest(tmp_path):
    tensorrt_or_skip()
    from attnc.compiler.pipeline import CompileOptions, compile_model

    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    options = CompileOptions(backend="tensorrt", precision="fp16", fuse=False,
                             backend_options={"opt_shapes": [f"{n}:2x4x16x64" for n in "qkv"]})
    manifest = compile_model(model_path, tmp_path / "out", options)
    assert manifest["artefact"] == "engine.plan" and manifest["backend"] == "tensorrt"
    info = manifest["backend_info"]
    assert {"flavour", "version", "gpu", "plugins", "profiles", "precision"} <= set(info)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "build.log", "engine.json", "engine.plan", "manifest.json", "model.fused.onnx"]


@pytest.mark.tensorrt
def test_failed_build_leaves_no_engine(tmp_path):
    trt, flavour = tensorrt_or_skip()
    if flavour != "tensorrt_rtx":
        pytest.skip("uses a TensorRT-RTX target limitation to make the build fail")
    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    with pytest.raises(AttncError, match="could not build the engine"):
        trt_backend.build(model_path, tmp_path / "out", "bf16", opt_shapes=QKV, compute_capabilities=["SM75"])
    assert not (tmp_path / "out" / "engine.plan").exists()
    assert not list((tmp_path / "out").glob(".engine.plan*"))
    assert "ERROR" in (tmp_path / "out" / "build.log").read_text()


@pytest.mark.tensorrt
def test_parser_errors_are_reported(tmp_path):
    tensorrt_or_skip()
    bad = attention_model()
    bad.graph.node[0].input[2] = "missing_tensor"
    with pytest.raises(AttncError, match="ONNX parser rejected the model"):
        trt_backend.build(_save(bad, tmp_path / "bad.onnx"), tmp_path / "out", "fp16", opt_shapes=QKV)
    assert not (tmp_path / "out" / "engine.plan").exists()


@pytest.mark.tensorrt
def test_profile_errors_happen_before_the_build(tmp_path, monkeypatch):
    trt, _ = tensorrt_or_skip()
    monkeypatch.setattr(trt, "Builder", lambda *a: pytest.fail("the builder must not start"))
    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    with pytest.raises(AttncError, match="input 'q'"):
        trt_backend.build(model_path, tmp_path / "out", "fp16", opt_shapes={"q": (2, 4, 16, 32)})
    assert not (tmp_path / "out" / "build.log").exists()


@pytest.mark.tensorrt
def test_inline_mode_builds_a_fused_node_from_its_function_body(tmp_path):
    tensorrt_or_skip()
    engine = trt_backend.build(_save(flow_model(), tmp_path / "flow.onnx"), tmp_path / "out", "fp16",
                               fused_ops="inline")
    assert trt_backend.describe(engine)["fused_ops"] == "inline"


def _mixed_overloads_model() -> onnx.ModelProto:
    """Causal and non-causal flow and linear attention on one Q, K, V (dynamic tokens): four
    nodes, four function overloads, two of each name."""
    from attnc.plugins import flow, linear

    shape = [1, 2, "n", 8]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n in ("q", "k", "v")]
    nodes = [flow.make_node(["q", "k", "v"], ["flow_causal"], "f1", causal=1),
             flow.make_node(["q", "k", "v"], ["flow_full"], "f0", causal=0),
             linear.make_node(["q", "k", "v"], ["lin_causal"], "l1", feature_map="relu", causal=1, normalize=1),
             linear.make_node(["q", "k", "v"], ["lin_full"], "l0", feature_map="relu", causal=0, normalize=1)]
    outputs = [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, shape) for n in nodes]
    model = helper.make_model(helper.make_graph(nodes, "mixed", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    for node in nodes:
        (flow if node.op_type == "FlowAttention" else linear).add_to_model(model, node)
    return model


def test_inline_bodies_get_one_name_per_overload_and_run_in_chunks():
    """TensorRT's parser finds a local function by name alone, so two overloads of one op would
    both run the first body: inline mode names each overload apart. Its causal products always
    run in chunks (no length switch), which must still compute the op: checked with ONNX
    Runtime against the float64 references at one chunk and at several (odd) chunks."""
    import torch

    from attnc.compiler.backends.onnxruntime import load
    from attnc.plugins import flow, linear

    model = _mixed_overloads_model()
    assert sorted((f.name, f.overload) for f in model.functions) == [
        ("FlowAttention", ""), ("FlowAttention", "causal"), ("KernelLinearAttention", "relu"),
        ("KernelLinearAttention", "relu_causal")]
    prepared, ops = trt_backend.prepare_model(model, "fp32", fused_ops="inline")
    assert ops == []
    names = [f.name for f in prepared.functions]
    assert sorted(names) == ["FlowAttention", "FlowAttention__causal", "KernelLinearAttention__relu",
                             "KernelLinearAttention__relu_causal"]
    assert not any(f.overload for f in prepared.functions) and not any(n.overload for n in prepared.graph.node)
    assert [n.op_type for n in prepared.graph.node] == ["FlowAttention__causal", "FlowAttention",
                                                        "KernelLinearAttention__relu_causal",
                                                        "KernelLinearAttention__relu"]
    assert not any(n.op_type == "If" and n.name.endswith("length_switch") for f in prepared.functions for n in f.node)
    rng = np.random.default_rng(4)
    for tokens in (5, 150):
        q, k, v = (rng.standard_normal((1, 2, tokens, 8)) for _ in range(3))
        got = load(prepared).infer({"q": q.astype(np.float32), "k": k.astype(np.float32), "v": v.astype(np.float32)})
        t = [torch.from_numpy(x) for x in (q, k, v)]
        expected = {"flow_causal": flow.reference(*t, causal=1), "flow_full": flow.reference(*t, causal=0),
                    "lin_causal": linear.reference(*t, feature_map="relu", causal=1),
                    "lin_full": linear.reference(*t, feature_map="relu", causal=0)}
        for name, want in expected.items():
            np.testing.assert_allclose(got[name], want.numpy(), rtol=1e-4, atol=1e-5, err_msg=f"{name} N={tokens}")


def _inline_case(name: str):
    """(node, input shapes, op module, profile) for :func:`test_inline_mode_builds_each_fused_op`."""
    from attnc.plugins import agent, flow, linear, neighborhood

    qkv = lambda shape: {x: shape for x in "qkv"}  # noqa: E731
    return {
        # the causal product's chunked form, a dynamic token count
        "flow_causal": (flow.make_node(["q", "k", "v"], ["o"], "n", causal=1), qkv([1, 2, "n", 8]), flow,
                        {"min_shapes": qkv((1, 2, 1, 8)), "opt_shapes": qkv((1, 2, 200, 8)),
                         "max_shapes": qkv((1, 2, 512, 8))}),
        # decay and a recurrent state in and out; no string attribute or ai.onnx.ml op in the body
        "linear_state": (linear.make_node(["q", "k", "v", "decay", "state"], ["o", "state_out"], "n", causal=1,
                                          normalize=0, feature_map="identity"),
                         {**qkv([2, 2, 16, 32]), "decay": [2], "state": [2, 2, 32, 32]}, linear, {}),
        # the bias-free overload: its unread bias inputs are dropped (RTX rejects trailing "" inputs)
        "agent_nobias": (agent.make_node(["q", "k", "v", "a"], ["o"], "n"), {**qkv([2, 2, 16, 32]), "a": [2, 2, 4, 32]},
                         agent, {}),
        # a state without decay: the absent decay (read by the body) becomes the constant λ = 1
        "linear_state_nodecay": (linear.make_node(["q", "k", "v", "", "state"], ["o", "state_out"], "n", causal=1,
                                                  normalize=1, feature_map="elu1"),
                                 {**qkv([2, 2, 16, 32]), "state": [2, 2, 32, 33]}, linear, {}),
        # the agent bias absent before a present query bias: unread by that overload, dropped
        "agent_query_bias": (agent.make_node(["q", "k", "v", "a", "", "qb"], ["o"], "n"),
                             {**qkv([2, 2, 16, 32]), "a": [2, 2, 4, 32], "qb": [1, 2, 16, 4]}, agent, {}),
        "na2d_rpb": (neighborhood.make_node(["q", "k", "v", "rpb"], ["o"], "n", kernel_size=[3, 5], dilation=[1, 2]),
                     {**qkv([1, 2, 8, 10, 32]), "rpb": [2, 5, 9]}, neighborhood, {}),
    }[name]


def _inline_model(case: str):
    """(one-node model with its function body, node, input shapes, profile) of :func:`_inline_case`."""
    node, shapes, module, profile = _inline_case(case)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in shapes.items()]
    outputs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output]
    model = helper.make_model(helper.make_graph([node], case, inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid(DOMAIN, 1)])
    module.add_to_model(model, node)
    return model, node, shapes, profile


@pytest.mark.parametrize("case", ["linear_state_nodecay", "agent_query_bias"])
def test_inline_inputs_absent_or_unread_keep_the_op(case):
    """The inline preparation's input edits (an unread input dropped, an absent one read as its
    declared constant) leave what the node computes unchanged: ONNX Runtime, before and after."""
    from attnc.compiler.backends.onnxruntime import load

    model, node, shapes, _ = _inline_model(case)
    prepared, _ = trt_backend.prepare_model(model, "fp32", fused_ops="inline")
    assert "" not in prepared.graph.node[0].input
    rng = np.random.default_rng(8)
    feeds = {n: rng.uniform(0.1, 1.0, s).astype(np.float32) for n, s in shapes.items()}
    want, got = load(model).infer(feeds), load(prepared).infer(feeds)
    for name in node.output:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


@pytest.mark.tensorrt
@pytest.mark.parametrize("case", ["flow_causal", "linear_state", "linear_state_nodecay", "agent_nobias",
                                  "agent_query_bias", "na2d_rpb"])
def test_inline_mode_builds_each_fused_op(tmp_path, case):
    """``--fused-ops inline`` (no plugin) builds every op's body with TensorRT-RTX's parser.
    Before: causal flow's length switch crashed the build, linear attention's body used a string
    ``Constant`` and ``LabelEncoder``, and agent attention without biases was an "Invalid Node".
    (fp32: RTX's CPU build targets Turing, where the float32 GEMMs these bodies keep in fp16
    engines "are not supported".)"""
    tensorrt_or_skip()
    model, _, _, profile = _inline_model(case)
    engine = trt_backend.build(_save(model, tmp_path / "m.onnx"), tmp_path / "out", "fp32", fused_ops="inline",
                               **profile)
    info = trt_backend.describe(engine)
    assert info["fused_ops"] == "inline" and not info.get("plugins", {}).get("ops")


@pytest.mark.tensorrt
def test_rtx_plugin_build_without_loadable_lib_is_an_error_not_an_abort(tmp_path):
    trt, flavour = tensorrt_or_skip()
    if flavour != "tensorrt_rtx" or trt_backend._rtx_can_add_plugins(trt)[0]:
        pytest.skip("needs TensorRT-RTX without a loadable libtensorrt_rtx.so")
    with pytest.raises(AttncError, match="libtensorrt_rtx.so is not loadable"):
        trt_backend.build(_save(agent_model(fused=True), tmp_path / "agent.onnx"), tmp_path / "out", "fp16",
                          opt_shapes=AGENT)


_ALL_OPS_SCRIPT = textwrap.dedent('''
    import json, sys
    import onnx
    from onnx import TensorProto as T, helper as h
    from attnc.compiler.backends import tensorrt as backend, tensorrt_plugins as tp
    from attnc.plugins import agent, flow, linear, neighborhood

    seen = []
    decode = tp.decode_fields
    tp.decode_fields = lambda op, fields: seen.append((op, decode(op, fields))) or seen[-1][1]
    cases = {
        "agent": (agent.make_node(["q", "k", "v", "a"], ["o"], "n0", scale=0.1),
                  {"q": ["b", 2, 16, 64], "k": ["b", 2, 16, 64], "v": ["b", 2, 16, 32], "a": ["b", 2, 4, 64]},
                  ["b", 2, 16, 32]),
        "flow": (flow.make_node(["q", "k", "v"], ["o"], "n0", eps=1e-5),
                 {"q": [2, 2, 16, 64], "k": [2, 2, 8, 64], "v": [2, 2, 8, 32]}, [2, 2, 16, 32]),
        "linear": (linear.make_node(["q", "k", "v"], ["o"], "n0", feature_map="relu", causal=1),
                   {"q": [2, 2, 16, 64], "k": [2, 2, 16, 64], "v": [2, 2, 16, 32]}, [2, 2, 16, 32]),
        "neighborhood": (neighborhood.make_node(["q", "k", "v"], ["o"], "n0", kernel_size=[3, 5], dilation=[1, 2]),
                         {n: [1, 2, 8, 10, 32] for n in "qkv"}, [1, 2, 8, 10, 32]),
        # plugin variants: an optional input (RPB), and linear attention's state in and out with
        # decay left out (float32 state next to fp16 Q, K, V)
        "neighborhood_rpb": (neighborhood.make_node(["q", "k", "v", "rpb"], ["o"], "n0", kernel_size=[3, 5]),
                             {**{n: [1, 2, 8, 10, 32] for n in "qkv"}, "rpb": [2, 5, 9]}, [1, 2, 8, 10, 32]),
        # normalize=1: the state carries the normaliser's sum as column Dv (Dv + 1 through
        # TensorRT's expression builder)
        "linear_state": (h.make_node("KernelLinearAttention", ["q", "k", "v", "", "state"], ["o", "state_out"],
                                     "n0", domain="attnc", causal=1, normalize=1, feature_map="elu1"),
                         {"q": [2, 2, 16, 64], "k": [2, 2, 16, 64], "v": [2, 2, 16, 32], "state": [2, 2, 64, 33]},
                         [2, 2, 16, 32]),
    }
    out_dir = sys.argv[1]
    for name, (node, shapes, out_shape) in cases.items():
        inputs = [h.make_tensor_value_info(n, T.FLOAT, s) for n, s in shapes.items()]
        outputs = [h.make_tensor_value_info("o", T.FLOAT, out_shape)]
        if len(node.output) > 1:
            outputs.append(h.make_tensor_value_info("state_out", T.FLOAT, shapes["state"]))
        model = h.make_model(h.make_graph([node], name, inputs, outputs),
                             opset_imports=[h.make_opsetid("", 23), h.make_opsetid("attnc", 1)])
        onnx.save(model, f"{out_dir}/{name}.onnx")
        profile = {"opt_shapes": {n: [2] + s[1:] for n, s in shapes.items()}} if name == "agent" else {}
        backend.build(f"{out_dir}/{name}.onnx", f"{out_dir}/{name}", "fp16", **profile)
    print(json.dumps(seen))
''')


def _rtx_plugin_env(tmp_path) -> dict:
    """The environment of a subprocess whose TensorRT-RTX parser can add Python plugin layers:
    ``libtensorrt_rtx.so`` linked to the wheel's ``.so.1`` on LD_LIBRARY_PATH (docs/tensorrt.md);
    skips unless TensorRT-RTX is what imports."""
    tensorrt_or_skip()
    env = rtx_plugin_env(tmp_path)
    if env is None:
        pytest.skip("TensorRT-RTX specific")
    return env


@pytest.mark.tensorrt
def test_rtx_python_plugin_engines_build_with_the_library_link(tmp_path):
    """Each fused op reaches a Python IPluginV3 through TensorRT-RTX's parser, gets its
    attributes back from the parser's PluginFields, and the engine builds."""
    run = subprocess.run([sys.executable, "-c", _ALL_OPS_SCRIPT, str(tmp_path)], env=_rtx_plugin_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    decoded = {op: attrs for op, attrs in json.loads(run.stdout.strip().splitlines()[-1])}
    assert decoded["AgentAttention"] == {"scale": pytest.approx(0.1)}
    assert decoded["FlowAttention"] == {"causal": 0, "eps": pytest.approx(1e-5)}
    assert decoded["KernelLinearAttention"] == {"feature_map": "relu", "causal": 1, "normalize": 1,
                                                "eps": pytest.approx(1e-6), "scale": 1.0}
    assert decoded["NeighborhoodAttention"] == {"kernel_size": [3, 5], "dilation": [1, 2], "is_causal": [0, 0],
                                                "stride": [1, 1], "scale": 0.0}
    assert decoded["NeighborhoodAttention_in0123_out1"]["kernel_size"] == [3, 5]
    assert decoded["KernelLinearAttention_in0124_out2"]["normalize"] == 1
    expected = {"agent": [-1, 2, 16, 32], "flow": [2, 2, 16, 32], "linear": [2, 2, 16, 32],
                "neighborhood": [1, 2, 8, 10, 32], "neighborhood_rpb": [1, 2, 8, 10, 32],
                "linear_state": [2, 2, 16, 32]}
    for name, shape in expected.items():
        info = json.loads((tmp_path / name / "engine.json").read_text())
        assert info["plugins"]["mode"] == "python-v3" and info["plugins"]["namespace"] == "attnc"
        assert info["outputs"][0]["shape"] == shape and info["outputs"][0]["dtype"] == "float16"
        assert "PLUGIN_V3" in (tmp_path / name / "build.log").read_text()
    info = json.loads((tmp_path / "linear_state" / "engine.json").read_text())
    assert info["plugins"]["ops"] == ["KernelLinearAttention_in0124_out2"]
    assert {"name": "state", "dtype": "float32", "shape": [2, 2, 64, 33]} in info["inputs"]
    assert info["outputs"][1] == {"name": "state_out", "dtype": "float32", "shape": [2, 2, 64, 33]}


@pytest.mark.tensorrt
def test_rtx_builds_a_gated_step_with_float32_state_in_and_out(tmp_path):
    """The fp16 engine of a gated one-token step takes its state in float32 and gives the new
    state in float32, so a caller feeds ``s_out`` straight back as ``s``."""
    model = _save(gated_step_model(), tmp_path / "step.onnx")
    script = "import sys; from attnc.compiler.backends import tensorrt as b; b.build(sys.argv[1], sys.argv[2], 'fp16')"
    run = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path / "out")],
                         env=_rtx_plugin_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    info = json.loads((tmp_path / "out" / "engine.json").read_text())
    assert info["plugins"]["ops"] == ["KernelLinearAttention_in01234_out2"]
    assert {t["name"]: t["dtype"] for t in info["inputs"]} == {
        "q": "float16", "k": "float16", "v": "float16", "x": "float16", "s": "float32"}
    assert {t["name"]: t["dtype"] for t in info["outputs"]} == {"o": "float16", "s_out": "float32"}


@pytest.mark.tensorrt
def test_engines_need_a_gpu_to_load(tmp_path):
    tensorrt_or_skip()
    if trt_backend.gpu_name() is not None:
        pytest.skip("a GPU is present")
    engine = trt_backend.build(_save(attention_model(), tmp_path / "a.onnx"), tmp_path / "out", "fp16",
                               opt_shapes=QKV)
    with pytest.raises(AttncError, match="need an NVIDIA GPU"):
        trt_backend.load(engine)
    from attnc.runtime import Engine

    with pytest.raises(AttncError, match="need an NVIDIA GPU"):
        Engine(engine.parent)


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("name", ["attention", "agent"])
def test_engine_runs_and_matches_onnxruntime(tmp_path, name):
    """On a GPU: the engine's output equals ONNX Runtime's on the same model (fp32); for
    lowered agent attention this checks the moved scale (unshare_attention_scales) too."""
    tensorrt_or_skip()
    if trt_backend.gpu_name() is None:
        pytest.skip("needs an NVIDIA GPU")
    from attnc.compiler.backends.onnxruntime import OnnxRuntimeRunner

    model, shapes = (attention_model(), QKV) if name == "attention" else (agent_model(fused=False), AGENT)
    engine = trt_backend.build(_save(model, tmp_path / "a.onnx"), tmp_path / "out", "fp32", opt_shapes=shapes)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(shape).astype(np.float32) for n, shape in shapes.items()}
    got = trt_backend.load(engine).infer(feeds)["o"]
    want = OnnxRuntimeRunner(model).infer(feeds)["o"]
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_generation_step_engine_decodes_like_onnxruntime(tmp_path):
    """On a GPU: a transformers Llama's generation step with its KV cache as an fp32 engine (profile from an
    empty cache) decodes, through attnc.runtime.generate, the tokens the same fused step gives on ONNX
    Runtime (needs transformers on the device)."""
    tensorrt_or_skip()
    if trt_backend.gpu_name() is None:
        pytest.skip("needs an NVIDIA GPU")
    from attnc import runtime
    from attnc.compiler.pipeline import CompileOptions, compile_model
    from attnc.models.hf_checkpoint import padding_mask

    path, _, shapes = _llama_generation_step(tmp_path)
    compile_model(path, tmp_path / "engine", CompileOptions(backend="tensorrt", precision="fp32", backend_options=shapes))
    compile_model(path, tmp_path / "ort", CompileOptions(backend="onnxruntime"))
    engine, ort = runtime.load(tmp_path / "engine"), runtime.load(tmp_path / "ort")
    ids = np.random.default_rng(0).integers(0, 64, (3, 7))
    mask = padding_mask(3, 7, "left").numpy()
    np.testing.assert_array_equal(runtime.generate(engine, ids, mask, max_new_tokens=12),
                                  runtime.generate(ort, ids, mask, max_new_tokens=12))


# ----------------------------------------------------------------------------- C++ example

CPP_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpp"


def _tensorrt_headers() -> Path | None:
    """An include dir with NvInfer.h: $TENSORRT_ROOT/include, or $ATTNC_TENSORRT_INCLUDE."""
    for candidate in (os.environ.get("ATTNC_TENSORRT_INCLUDE"),
                      os.environ.get("TENSORRT_ROOT") and os.path.join(os.environ["TENSORRT_ROOT"], "include")):
        if candidate and (Path(candidate) / "NvInfer.h").is_file():
            return Path(candidate)
    return None


def test_cpp_example_compiles_against_tensorrt_headers(tmp_path):
    headers = _tensorrt_headers()
    if headers is None:
        pytest.skip("no NvInfer.h: the tensorrt/tensorrt_rtx pip wheels ship no headers; set TENSORRT_ROOT "
                    "or ATTNC_TENSORRT_INCLUDE (e.g. NVIDIA/TensorRT's include/) to run this")
    cuda = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    run = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wno-deprecated-declarations", "-c",
                          str(CPP_EXAMPLE / "main.cpp"), f"-I{headers}", f"-I{cuda}", "-o", str(tmp_path / "m.o")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_cpp_example_cmake_says_when_headers_are_missing(tmp_path):
    import shutil

    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    if _tensorrt_headers() is not None:
        pytest.skip("TensorRT headers are present")
    env = {k: v for k, v in os.environ.items() if k != "TENSORRT_ROOT"}
    run = subprocess.run(["cmake", "-S", str(CPP_EXAMPLE), "-B", str(tmp_path / "build"),
                          f"-DTENSORRT_ROOT={tmp_path / 'nowhere'}"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode != 0
    if "CUDAToolkit" in run.stderr and "NvInfer.h" not in run.stderr:
        pytest.skip("no CUDA toolkit for CMake to find")
    assert "TensorRT headers (NvInfer.h) not found" in " ".join(run.stderr.split())


# ----------------------------------------------------------------------------- CLI


@pytest.mark.tensorrt
def test_cli_compile_with_tensorrt_flags(tmp_path):
    tensorrt_or_skip()
    from click.testing import CliRunner

    from attnc.compiler.cli import cli

    model_path = _save(attention_model(), tmp_path / "attention.onnx")
    shapes = [arg for n in "qkv" for arg in ("--opt-shape", f"{n}:2x4x16x64", "--min-shape", f"{n}:1x4x16x64")]
    result = CliRunner().invoke(cli, ["compile", str(model_path), "-o", str(tmp_path / "out"), "--backend",
                                      "tensorrt", "--precision", "fp16", "--workspace", "64", *shapes])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "out" / "manifest.json").read_text())["backend_info"]
    assert info["workspace"] == 64 << 20 and info["profiles"][0]["q"]["min"] == [1, 4, 16, 64]
    result = CliRunner().invoke(cli, ["compile", str(model_path), "-o", str(tmp_path / "bad"), "--backend",
                                      "tensorrt", "--opt-shape", "q:2x4x16x64"])
    assert result.exit_code == 2 and "input 'k' has dynamic dims" in result.output
    assert not (tmp_path / "bad").exists()


@pytest.mark.tensorrt
@pytest.mark.parametrize("model_name, lower, attention_layers", [
    ("vit-mhsa-small", [], 2),             # softmax pass -> one Attention per layer
    ("vit-agent-small", [], 4),            # agent pass, auto route: 82 tokens, lowered -> two Attention per layer
])
def test_cli_compiles_exported_vits_to_engines(tmp_path, model_name, lower, attention_layers):
    """``attnc export`` + ``attnc compile --backend tensorrt`` on the bundled 2-layer ViTs: every
    attention reaches TensorRT as a native layer (no plugin), with a dynamic-batch profile. The
    agent ViT gets there by the default per-node route (``--lower auto``): at 82 tokens the fused
    kernel would recompute stage 1 for two query tiles."""
    trt, flavour = tensorrt_or_skip()
    model = tmp_path / "model.onnx"
    _run_isolated(_CLI_SCRIPT, "export", model_name, "-o", str(model))
    _run_isolated(_CLI_SCRIPT, "compile", str(model), "-o", str(tmp_path / "out"), "--backend", "tensorrt",
                  "--precision", "fp16", "--opt-shape", "image:2x3x36x36", "--max-shape", "image:4x3x36x36",
                  *[arg for family in lower for arg in ("--lower", family)])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["lowered"] == (lower or ["auto"])
    routes = [m["route"] for r in manifest["passes"] if r["family"] == "agent" for m in r["matches"]]
    assert [r["route"] for r in routes] == (["lowered"] * 2 if model_name == "vit-agent-small" else [])
    assert manifest["ops_after"]["Attention"] == attention_layers
    assert not [op for op in manifest["ops_after"] if op in ("Softmax", "AgentAttention")]
    info = manifest["backend_info"]
    assert info["flavour"] == flavour and info["attention_layers"] == attention_layers
    assert info["plugins"]["ops"] == []
    assert info["profiles"] == [{"image": {"min": [1, 3, 36, 36], "opt": [2, 3, 36, 36], "max": [4, 3, 36, 36]}}]
    assert (tmp_path / "out" / "engine.plan").stat().st_size == info["engine_bytes"]
