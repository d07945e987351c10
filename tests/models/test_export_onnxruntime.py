"""Every small registry spec exports with both ONNX exporters and runs in ONNX Runtime
with PyTorch's numbers, at two input shapes when the spec has dynamic axes.

The models are exported at batch 2 and checked at batch 1 and at batch 3 with every
other dynamic size grown by 4, so a graph that silently specialised to the example
shape fails. ``test_comparison_fails_on_a_flipped_weight`` proves the comparison can fail.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from attnc.compiler.backends.onnxruntime import load
from attnc.models.registry import SPECS, ModelSpec
from attnc.testing import export_spec

SMALL = sorted(name for name, spec in SPECS.items() if not spec.realistic)
EXPORTERS = ("dynamo", "torchscript")
RTOL = ATOL = 1e-4


def check_sizes(spec: ModelSpec) -> list[dict[str, int]]:
    """Batch 1, then batch 3 with every other dynamic size grown by 4."""
    grown = {dim: spec.sizes[dim] + 4 for dim in spec.dynamic if dim != "batch"}
    return [{"batch": 1}, {"batch": 3, **grown}]


def assert_matches_pytorch(proto: onnx.ModelProto, model: torch.nn.Module, spec: ModelSpec) -> None:
    runner = load(proto, threads=1)  # tiny graphs; spare the other xdist worker's core
    assert runner.output_names == spec.output_names
    for sizes in check_sizes(spec):
        inputs = spec.example_inputs(seed=1, **sizes)
        with torch.no_grad():
            expected = model(*inputs)
        got = runner.infer({name: t.numpy() for name, t in zip(spec.input_names, inputs)})
        for name, want in zip(spec.output_names, expected if isinstance(expected, tuple) else (expected,),
                              strict=True):
            assert got[name].shape == want.shape, f"{spec.name} {name} at {sizes}"
            np.testing.assert_allclose(got[name], want.numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg=f"{spec.name} {name} at {sizes}")


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", SMALL)
def test_export_matches_pytorch(name, exporter):
    spec, model, proto = export_spec(name, exporter)
    assert_matches_pytorch(proto, model, spec)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_comparison_fails_on_a_flipped_weight(exporter):
    """Flip the sign of one weight in the exported file: the same check must now fail."""
    spec, model, proto = export_spec("na2d-rpb-small", exporter)
    assert_matches_pytorch(proto, model, spec)

    weights = [init for init in proto.graph.initializer
               if init.data_type == onnx.TensorProto.FLOAT and np.prod(init.dims) > 1]
    target = max(weights, key=lambda init: np.prod(init.dims))
    values = numpy_helper.to_array(target).copy()
    flat = values.reshape(-1)
    flat[np.argmax(np.abs(flat))] *= -1
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches_pytorch(proto, model, spec)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_axes_of_a_later_input_stay_on_it(exporter, tmp_path):
    """Only the second input dynamic: its axis, not the first input's, is dynamic in the graph (the dynamo exporter
    paired ``dynamic_axes`` with the inputs by position and gave it to the first), and the graph runs at another
    length of it."""
    from attnc.compiler.export import export_onnx

    class TwoInputs(torch.nn.Module):
        def forward(self, a, b):
            return a.sum(-1, keepdim=True) + b.mean(-1, keepdim=True)

    a, b = torch.randn(2, 3), torch.randn(2, 5)
    path = export_onnx(TwoInputs(), (a, b), tmp_path / "two.onnx", exporter=exporter, input_names=["a", "b"],
                       dynamic_axes={"b": {1: "n"}})
    runner = load(str(path), threads=1)
    shapes = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in onnx.load(str(path)).graph.input}
    assert shapes == {"a": [2, 3], "b": [2, "n"]}
    longer = torch.randn(2, 9)
    np.testing.assert_allclose(runner.infer({"a": a.numpy(), "b": longer.numpy()})["output"],
                               (a.sum(-1, keepdim=True) + longer.mean(-1, keepdim=True)).numpy(), rtol=1e-6)
