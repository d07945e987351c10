"""Tests for attnc.compiler.validate: statistics against independent numpy formulas, pass/fail
rules, inputs, and an end-to-end PyTorch -> ONNX -> ONNX Runtime check."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from rich.console import Console

from attnc.compiler.backends import TensorSpec
from attnc.compiler.errors import AttncError, ValidationFailed
from attnc.compiler.validate import (
    LOG10_EDGES,
    TOLERANCES,
    Tolerance,
    compare_outputs,
    load_inputs,
    make_inputs,
    torch_reference,
    validate,
)

SHAPES = [(7,), (3, 5), (2, 4, 6), (2, 3, 4, 5), (1, 1, 1)]


def _cosine_law_of_cosines(a: np.ndarray, r: np.ndarray) -> float:
    """cos = (|a|^2 + |r|^2 - |a-r|^2) / (2 |a| |r|): a different formula from a dot product."""
    a, r = a.astype(np.float64).ravel(), r.astype(np.float64).ravel()
    na2, nr2, nd2 = (np.linalg.norm(a) ** 2, np.linalg.norm(r) ** 2, np.linalg.norm(a - r) ** 2)
    return float((na2 + nr2 - nd2) / (2 * np.sqrt(na2 * nr2)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("noise_scale", [1e-7, 1e-5, 1e-3])
def test_statistics_match_independent_numpy(shape, seed, noise_scale):
    rng = np.random.default_rng(1000 + seed)
    ref = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape) * noise_scale
    act = (ref + noise).astype(np.float32)
    tol = TOLERANCES["fp32"]
    result = compare_outputs({"y": ref}, {"y": act}, precision="fp32")
    out = result.outputs[0]
    s = out.stats

    r64, a64 = ref.astype(np.float64), act.astype(np.float64)
    err = np.abs(a64 - r64)
    assert s.elements == s.compared == ref.size
    assert s.max_abs_error == pytest.approx(err.max(), rel=1e-12, abs=0)
    assert s.mean_abs_error == pytest.approx(err.sum() / err.size, rel=1e-12, abs=0)
    rel = err / (np.abs(r64) + tol.atol)
    assert s.max_rel_error == pytest.approx(rel.max(), rel=1e-12, abs=0)
    assert s.mean_rel_error == pytest.approx(rel.mean(), rel=1e-12, abs=0)
    assert s.cosine == pytest.approx(_cosine_law_of_cosines(act, ref), abs=1e-9)
    close = np.isclose(act, ref, atol=tol.atol, rtol=tol.rtol)
    assert s.violations == int((~close).sum())
    expected_pass = bool(close.all()) and _cosine_law_of_cosines(act, ref) >= tol.min_cosine
    assert out.passed is expected_pass and result.passed is expected_pass
    assert (out.reasons == []) is expected_pass
    if noise_scale == 1e-7:
        assert out.passed
    elif noise_scale == 1e-3 and shape != (1, 1, 1):
        assert not out.passed

    # Worst elements: sorted by error, and the first is the argmax of an independent |a-r|.
    worst_errs = [w.abs_error for w in out.worst]
    assert worst_errs == sorted(worst_errs, reverse=True)
    assert len(out.worst) == min(10, int((err > 0).sum()))
    if out.worst:
        assert out.worst[0].index == tuple(int(i) for i in np.unravel_index(np.argmax(err), shape))
        assert out.worst[0].reference == float(ref[out.worst[0].index])
        assert out.worst[0].actual == float(act[out.worst[0].index])

    # Histogram over decades, checked with floor(log10) instead of np.histogram.
    hist = out.histogram
    assert hist["log10_edges"] == list(LOG10_EDGES)
    assert sum(hist["counts"]) == ref.size
    decade = np.floor(np.log10(np.maximum(err, 1e-300)))
    lo, hi = LOG10_EDGES[0], LOG10_EDGES[-1]
    bins = np.clip(decade, lo, hi - 1).astype(int) - int(lo)
    expected = np.bincount(bins.ravel(), minlength=len(LOG10_EDGES) - 1)
    assert hist["counts"] == expected.tolist()
    assert hist["exact_zero"] == int((err == 0).sum())


@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("seed", [3, 4])
def test_perturbed_element_fails_and_is_the_worst(shape, seed):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(shape).astype(np.float32)
    act = ref + rng.standard_normal(shape).astype(np.float32) * 1e-6
    index = tuple(int(rng.integers(0, d)) for d in shape)
    act[index] += 3e-2
    result = compare_outputs({"logits": ref, "other": ref}, {"logits": act, "other": ref.copy()})
    bad, good = result.outputs
    assert not result.passed and not bad.passed and good.passed
    assert [o.name for o in result.failed] == ["logits"]
    assert bad.worst[0].index == index
    assert bad.worst[0].abs_error == pytest.approx(abs(float(act[index]) - float(ref[index])))
    assert bad.stats.violations == 1
    assert "max abs error" in bad.reason and str(index) in bad.reason and "atol" in bad.reason


def test_nan_and_inf_in_actual_fail_with_message():
    ref = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
    act = ref.copy()
    act[1, 2, 3] = np.nan
    act[0, 0, 1] = np.inf
    out = compare_outputs({"y": ref}, {"y": act}).outputs[0]
    assert not out.passed
    assert "NaN" in out.reason and "Inf" in out.reason and "reference is finite" in out.reason
    assert out.actual.nan == 1 and out.actual.inf == 1 and out.reference.nan == 0
    # Unmatched non-finite values lead the worst list; statistics cover the finite rest.
    assert {w.index for w in out.worst[:2]} == {(1, 2, 3), (0, 0, 1)}
    assert out.stats.compared == 22 and out.stats.max_abs_error == 0.0
    json.dumps(out.to_dict(), allow_nan=False)


def test_matching_nonfinite_values_pass_and_unreproduced_reference_nan_fails():
    ref = np.array([1.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    assert compare_outputs({"y": ref}, {"y": ref.copy()}).passed
    act = ref.copy()
    act[2] = -np.inf  # wrong sign of infinity
    out = compare_outputs({"y": ref}, {"y": act}).outputs[0]
    assert not out.passed and "reference has 1 NaN/Inf" in out.reason
    act = ref.copy()
    act[1] = 0.0
    assert not compare_outputs({"y": ref}, {"y": act}).passed


def test_shape_mismatch_is_a_failed_entry_not_an_exception():
    ref = np.zeros((2, 3), np.float32)
    result = compare_outputs({"y": ref, "z": ref}, {"y": np.zeros((3, 2), np.float32), "z": ref})
    out = result.outputs[0]
    assert not result.passed and not out.passed and "shape mismatch" in out.reason
    assert out.stats is None and out.reference.shape == (2, 3) and out.actual.shape == (3, 2)
    assert result.outputs[1].passed


def test_missing_and_extra_outputs_fail():
    ref = np.ones(4, np.float32)
    result = compare_outputs({"a": ref, "b": ref}, {"a": ref, "c": ref})
    by_name = {o.name: o for o in result.outputs}
    assert [o.name for o in result.outputs] == ["a", "b", "c"]
    assert by_name["a"].passed
    assert not by_name["b"].passed and "missing" in by_name["b"].reason and by_name["b"].actual is None
    assert not by_name["c"].passed and "lacks" in by_name["c"].reason and by_name["c"].reference is None
    assert not result.passed
    assert not compare_outputs({}, {}).passed  # comparing nothing proves nothing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fp16_tolerance_accepts_fp16_arithmetic_that_fp32_rejects(seed):
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal((64, 32)), rng.standard_normal((32, 48))
    ref = (x @ w).astype(np.float32)
    # What an fp16 engine does: fp16 inputs and weights, fp16 arithmetic.
    act = (x.astype(np.float16) @ w.astype(np.float16)).astype(np.float32)
    assert compare_outputs({"y": ref}, {"y": act}, precision="fp16").passed
    assert compare_outputs({"y": ref}, {"y": act}, precision="bf16").passed
    fp32 = compare_outputs({"y": ref}, {"y": act}, precision="fp32")
    assert not fp32.passed and "exceed atol" in fp32.outputs[0].reason


def test_cosine_catches_a_wrong_tensor_within_atol():
    rng = np.random.default_rng(5)
    ref = (rng.standard_normal(1000) * 1e-3).astype(np.float32)  # tiny activations
    act = -ref  # every element within fp16's atol 1e-2, yet the tensor is wrong
    out = compare_outputs({"y": ref}, {"y": act}, precision="fp16").outputs[0]
    assert out.stats.violations == 0 and not out.passed
    assert "cosine" in out.reason and out.stats.cosine == pytest.approx(-1.0)


def test_cosine_edge_cases():
    zeros = np.zeros(5, np.float32)
    assert compare_outputs({"y": zeros}, {"y": zeros.copy()}).outputs[0].stats.cosine == 1.0
    out = compare_outputs({"y": zeros}, {"y": np.full(5, 1e-5, np.float32)}).outputs[0]
    assert out.stats.cosine == 0.0 and not out.passed
    big = np.array([3e38, -3e38, 1e38], np.float32)  # squares overflow float32 and nearly float64
    assert compare_outputs({"y": big}, {"y": big.copy()}).outputs[0].stats.cosine == pytest.approx(1.0)


def test_integer_and_bool_outputs_compare_exactly():
    ids = np.array([[1, 2, 3]], np.int64)
    assert compare_outputs({"ids": ids}, {"ids": ids.copy()}).passed
    assert not compare_outputs({"ids": ids}, {"ids": ids + np.array([[0, 1, 0]])}).passed
    flags = np.array([True, False])
    assert not compare_outputs({"f": flags}, {"f": ~flags}).passed


def test_tolerance_overrides_by_name_and_pattern():
    ref = np.ones((4, 4), np.float32)
    act = ref + 5e-3
    reference = {"logits": ref, "node:attn0/out": ref}
    actual = {"logits": act, "node:attn0/out": act}
    assert not compare_outputs(reference, actual).passed
    loose = Tolerance(atol=1e-2, rtol=0.0, min_cosine=0.9)
    result = compare_outputs(reference, actual, tolerances={"logits": loose, "node:*": loose})
    assert result.passed
    assert result.outputs[0].tolerance == loose and result.overrides == {"logits": loose, "node:*": loose}
    partial = compare_outputs(reference, actual, tolerances={"node:*": loose})
    assert [o.passed for o in partial.outputs] == [False, True]
    with pytest.raises(AttncError, match="logit"):
        compare_outputs(reference, actual, tolerances={"logit": loose})
    with pytest.raises(AttncError, match="precision"):
        compare_outputs(reference, actual, precision="int8")
    with pytest.raises(AttncError, match="invalid tolerance"):
        Tolerance(atol=-1e-3, rtol=0.0, min_cosine=0.9)
    with pytest.raises(AttncError, match="not a Tolerance"):
        compare_outputs(reference, actual, tolerances={"logits": 1e-3})


def test_to_dict_is_plain_json_and_summary_table_renders():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 4)).astype(np.float32)
    act = ref.copy()
    act[0, 0] = np.nan
    result = compare_outputs({"y": ref, "z": ref, "<w>": ref}, {"y": act, "z": ref.astype(np.float16),
                                                                  "<w>": ref[:2]})
    doc = result.to_dict()
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text) == doc

    def walk(value):
        assert type(value) in (dict, list, str, int, float, bool, type(None)), type(value)
        for child in (value.values() if isinstance(value, dict) else value if isinstance(value, list) else []):
            walk(child)

    walk(doc)
    assert doc["outputs"][0]["worst"][0]["actual"] == "NaN"
    assert doc["tolerances"]["default"] == {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.99999}

    buf = io.StringIO()
    Console(file=buf, width=250, color_system=None).print(result.summary_table())
    rendered = buf.getvalue()
    assert "FAILED" in rendered and "<w>" in rendered and "shape mismatch" in rendered
    with pytest.raises(ValidationFailed) as info:
        result.raise_if_failed("out/report.html")
    assert info.value.exit_code == 1 and "y" in info.value.problem and "out/report.html" in info.value.fix


# --------------------------------------------------------------------------- inputs

SPECS = [
    TensorSpec("pixel_values", ("batch", 3, "height", "width"), np.dtype(np.float32)),
    TensorSpec("input_ids", ("batch", "seq"), np.dtype(np.int64)),
    TensorSpec("attention_mask", ("batch", "seq"), np.dtype(np.int64)),
    TensorSpec("flags", (4,), np.dtype(np.bool_)),
]


def test_make_inputs_resolves_shapes_dtypes_and_ranges():
    feeds = make_inputs(SPECS, seed=0, shapes={"pixel_values": (3, 3, 8, 6), "input_ids": (3, 11)},
                        int_high=7)
    assert list(feeds) == [s.name for s in SPECS]
    assert feeds["pixel_values"].shape == (3, 3, 8, 6) and feeds["pixel_values"].dtype == np.float32
    assert feeds["input_ids"].shape == (3, 11) and feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"].shape == (3, 11)  # batch and seq bound by the other inputs
    assert (feeds["attention_mask"] == 1).all()
    ids = feeds["input_ids"]
    assert ids.min() >= 0 and ids.max() < 7 and len(np.unique(ids)) > 1
    assert feeds["flags"].dtype == np.bool_ and feeds["flags"].shape == (4,)
    pixels = feeds["pixel_values"].astype(np.float64)
    assert abs(pixels.mean()) < 0.5 and 0.5 < pixels.std() < 1.5


def test_make_inputs_is_seeded_and_uses_defaults():
    specs = [TensorSpec("x", ("batch_size", "tokens", 8), np.dtype(np.float32))]
    a = make_inputs(specs, seed=1, symbolic_defaults={"tokens": 5})
    b = make_inputs(specs, seed=1, symbolic_defaults={"tokens": 5})
    c = make_inputs(specs, seed=2, symbolic_defaults={"tokens": 5})
    assert a["x"].shape == (2, 5, 8)  # batch-like dims default to 2
    np.testing.assert_array_equal(a["x"], b["x"])
    assert not np.array_equal(a["x"], c["x"])
    half = make_inputs([TensorSpec("h", (3,), np.dtype(np.float16))], seed=0)["h"]
    assert half.dtype == np.float16


def test_make_inputs_errors_name_the_input_and_flag():
    with pytest.raises(AttncError) as info:
        make_inputs(SPECS, seed=0)
    assert "pixel_values" in str(info.value) and "--input-shape pixel_values:" in info.value.fix
    with pytest.raises(AttncError, match="unnamed dynamic"):
        make_inputs([TensorSpec("x", (None, 4), np.dtype(np.float32))], seed=0)
    with pytest.raises(AttncError, match="fixed to 3"):
        make_inputs(SPECS, seed=0, shapes={"pixel_values": (1, 4, 8, 8), "input_ids": (1, 2)})
    with pytest.raises(AttncError, match="rank"):
        make_inputs(SPECS, seed=0, shapes={"pixel_values": (1, 3, 8)})
    with pytest.raises(AttncError, match="unknown inputs"):
        make_inputs(SPECS, seed=0, shapes={"pixels": (1, 3, 8, 8)})
    with pytest.raises(AttncError, match="'batch' is 1 elsewhere but 2"):
        make_inputs(SPECS, seed=0, shapes={"pixel_values": (1, 3, 8, 8), "input_ids": (2, 5)})


def test_load_inputs_round_trip_and_errors(tmp_path):
    specs = [TensorSpec("x", ("batch", 4), np.dtype(np.float32)),
             TensorSpec("ids", ("batch", "seq"), np.dtype(np.int64))]
    rng = np.random.default_rng(0)
    x, ids = rng.standard_normal((3, 4)), rng.integers(0, 9, (3, 5)).astype(np.int32)
    path = tmp_path / "in.npz"
    np.savez(path, x=x, ids=ids)
    feeds = load_inputs(path, specs)
    assert feeds["x"].dtype == np.float32 and feeds["ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds["x"], x.astype(np.float32))
    np.testing.assert_array_equal(feeds["ids"], ids)

    cases = {
        "lacks inputs": dict(x=x),
        "not model inputs": dict(x=x, ids=ids, y=x),
        "fixed to 4": dict(x=rng.standard_normal((3, 5)), ids=ids),
        "'batch' is 3 elsewhere": dict(x=x, ids=ids[:2]),
        "model takes int64": dict(x=x, ids=ids.astype(np.float32)),
    }
    for message, arrays in cases.items():
        np.savez(path, **arrays)
        with pytest.raises(AttncError, match=message):
            load_inputs(path, specs)
    with pytest.raises(AttncError, match="no such"):
        load_inputs(tmp_path / "absent.npz", specs)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(AttncError, match="not a readable .npz"):
        load_inputs(tmp_path / "junk.npz", specs)
    np.save(tmp_path / "one.npy", x)
    with pytest.raises(AttncError, match="single array"):
        load_inputs(tmp_path / "one.npy", specs)


# --------------------------------------------------------------------------- validate()


class _FakeRunner:
    def __init__(self, outputs):
        self.outputs = outputs
        self.input_specs = [TensorSpec("x", (2, 3), np.dtype(np.float32))]
        self.output_names = list(outputs)
        self.seen = None

    def infer(self, feeds):
        self.seen = feeds
        return self.outputs


def test_validate_compares_outputs_and_extra_boundary_tensors():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    runner = _FakeRunner({"y": x * 2})
    boundary = np.ones(3, np.float32)
    result = validate(lambda feeds: {"y": feeds["x"] * 2}, runner, {"x": x}, precision="fp32",
                      extra={"node:attn_0/output": (boundary, boundary + 1.0),
                             "node:attn_0/q": (boundary, boundary.copy())})
    assert runner.seen is not None and "x" in runner.seen
    assert [(o.name, o.kind, o.passed) for o in result.outputs] == [
        ("y", "output", True), ("node:attn_0/output", "extra", False), ("node:attn_0/q", "extra", True)]
    assert not result.passed
    with pytest.raises(AttncError, match="names of graph outputs"):
        validate(lambda feeds: {"y": x}, runner, {"x": x}, extra={"y": (x, x)})


class _TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.proj = torch.nn.Linear(8, 8)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x, ids):
        h = self.dropout(self.proj(x) + self.embed(ids))
        return h, (ids * 2, h.sum(-1))


def test_torch_reference_flattens_outputs_and_keeps_mode_and_dtypes():
    model = _TwoHeads().train()
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32),
             "ids": np.array([[1, 2, 3], [4, 5, 6]], np.int64)}
    ref = torch_reference(model, ["x", "ids"], ["h", "ids2", "total"])
    out = ref(feeds)
    assert model.training  # restored
    assert list(out) == ["h", "ids2", "total"]
    assert out["ids2"].dtype == np.int64 and out["h"].dtype == np.float32
    np.testing.assert_array_equal(out["ids2"], feeds["ids"] * 2)
    np.testing.assert_array_equal(ref(feeds)["h"], out["h"])  # eval: dropout is off
    with torch.no_grad():
        expected = model.eval().proj(torch.from_numpy(feeds["x"])) + model.embed(torch.from_numpy(feeds["ids"]))
    np.testing.assert_allclose(out["h"], expected.numpy(), rtol=0, atol=0)
    with pytest.raises(AttncError, match="returns 3 tensors"):
        torch_reference(model, ["x", "ids"], ["h"])(feeds)
    with pytest.raises(AttncError, match="ids"):
        torch_reference(model, ["x", "ids"], ["h", "a", "b"])({"x": feeds["x"]})


# --------------------------------------------------------------------------- end to end


class _TinyAttention(torch.nn.Module):
    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // self.heads) ** -0.5, dim=-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, d))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from attnc.compiler.export import export_onnx

    torch.manual_seed(0)
    model = _TinyAttention().eval()
    path = tmp_path_factory.mktemp("e2e") / "tiny.onnx"
    export_onnx(model, torch.randn(2, 5, 16), path, exporter="dynamo",
                dynamic_axes={"x": {0: "batch", 1: "seq"}})
    return model, path


def test_end_to_end_passes_then_fails_with_a_perturbed_weight(tiny_export, tmp_path):
    from attnc.compiler.backends.onnxruntime import load

    model, path = tiny_export
    runner = load(path)
    feeds = make_inputs(runner.input_specs, seed=7, symbolic_defaults={"seq": 6})
    assert feeds["x"].shape == (2, 6, 16)
    reference = torch_reference(model, [s.name for s in runner.input_specs], runner.output_names)
    result = validate(reference, runner, feeds, precision="fp32")
    assert result.passed, result.outputs[0].reason
    assert result.outputs[0].stats.max_abs_error < 1e-5

    proto = onnx.load(str(path))
    weights = max((init for init in proto.graph.initializer if init.data_type == onnx.TensorProto.FLOAT),
                  key=lambda init: int(np.prod(init.dims)))
    array = numpy_helper.to_array(weights).copy()
    array.flat[3] += 0.05
    weights.CopyFrom(numpy_helper.from_array(array, weights.name))
    bad = tmp_path / "perturbed.onnx"
    onnx.save(proto, str(bad))
    result = validate(reference, load(bad), feeds, precision="fp32")
    assert not result.passed and "exceed atol" in result.outputs[0].reason


def test_token_id_bound_looks_through_a_reshape_of_the_ids(tmp_path):
    """GPT-2 views its ids as ``[-1, seq]`` before the embedding: the bound is still its 64 rows (before,
    none was found, random ids went up to 100 and ``--prune-heads`` without calibration crashed ONNX
    Runtime's Gather); a model without an embedding has none."""
    from attnc.compiler.export import export_onnx
    from attnc.compiler.validate import token_id_bound
    from attnc.models.transformers_zoo import Output, build

    path = export_onnx(Output(build("gpt2")).eval(), torch.randint(0, 64, (2, 9)), tmp_path / "gpt2.onnx",
                       exporter="torchscript", input_names=["x"])
    model = onnx.load(str(path))
    assert any(n.op_type == "Reshape" and n.input[0] == "x" for n in model.graph.node)
    assert token_id_bound(model) == 64
    linear = export_onnx(torch.nn.Linear(4, 3), torch.randn(2, 4), tmp_path / "linear.onnx", exporter="torchscript")
    assert token_id_bound(onnx.load(str(linear))) is None
