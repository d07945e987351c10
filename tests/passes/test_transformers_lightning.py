"""Lightning attention as transformers writes it: ``MiniMaxForCausalLM`` (MiniMax-Text-01's
architecture at a small config: grouped-query attention, a mixture of experts), fused and checked
against the torch model through ``examples/decode_lightning.py``'s functions:

- ``examples/decode_lightning.py --model minimax`` (a lightning layer, then a softmax layer with its KV
  cache; dynamo), and the same with lightning attention in both layers (TorchScript): the prefill graph
  (blockwise, each lightning layer's final state out, the softmax layer's keys and values out) and the
  one-token decode graph (MiniMax's recurrent path on its cache, the softmax layer's keys and values in
  with a dynamic length) are fused (a ``KernelLinearAttention`` with its state per lightning layer, an
  ``Attention`` per softmax layer), and greedy generation through attnc and ONNX Runtime gives the tokens
  PyTorch gives, with logits within 1e-5 of the float64 model run once on the whole sequence. The prefill
  loop over blocks of 4 tokens, unrolled by the export at 7 tokens (blocks of 4 and 3), becomes one node
  with MiniMax's per-head decay.
- The hybrid decode step as an fp16 TensorRT engine (TensorRT-RTX builds it on this CPU machine).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnc.compiler.export import export_onnx
from attnc.testing import rtx_plugin_env

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[2]


def _example():
    spec = importlib.util.spec_from_file_location("decode_lightning", REPO / "examples" / "decode_lightning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_one_block_prompt_fuses_to_the_bare_node(tmp_path):
    """A prompt within one block at a static batch: the export folds MiniMax's zero initial state to a
    constant, so the block's ``(q ⊙ decay) · S₀`` is a MatMul by zeros added to the attention. That Add
    goes with the fusion: the fused node's output is the layer's (head pruning finds the layer there), and
    the output still matches torch."""
    from attnc.compiler.backends.onnxruntime import load
    from attnc.models.transformers_zoo import Output, build
    from attnc.passes import fuse_attention
    from attnc.passes.core import constant_value
    from attnc.passes.prune_heads import find_attention_layers

    model = Output(build("minimax", seed=4)).eval()   # blocks of 4 tokens
    x = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(0))
    exported = onnx.load(str(export_onnx(model, (x,), tmp_path / "one_block.onnx", input_names=["x"])))
    assert any(n.op_type == "MatMul" and any((c := constant_value(exported, i)) is not None and not c.any()
                                             for i in n.input) for n in exported.graph.node), \
        "the export no longer adds a product with the zero state: this test checks nothing"
    fused, reports = fuse_attention(exported)
    assert {r.family: r.rewritten for r in reports if r.rewritten} == {"linear": 1, "softmax": 1}
    (node,) = [n for n in fused.graph.node if n.op_type == "KernelLinearAttention"]
    assert "Add" not in [n.op_type for n in fused.graph.node if node.output[0] in n.input]
    assert [layer.core for layer in find_attention_layers(exported)] == ["attnc::KernelLinearAttention", "softmax"]
    with torch.no_grad():
        np.testing.assert_allclose(load(fused).infer({"x": x.numpy()})["output"], model(x).numpy(),
                                   rtol=1e-4, atol=1e-5)


HYBRID, LIGHTNING = ("linear_attention", "full_attention"), ("linear_attention", "linear_attention")


@pytest.mark.parametrize("exporter,layers", [("dynamo", HYBRID), ("torchscript", LIGHTNING)],
                         ids=["dynamo-hybrid", "torchscript-lightning"])
def test_minimax_prefill_and_decode_generate_the_pytorch_tokens(exporter, layers, tmp_path):
    example = _example()
    model, vocab, graphs = example.lightning_lm("minimax", prompt=7, minimax_layers=layers)
    (prefill, decode), ops = example.compile_for_onnxruntime(graphs, tmp_path, exporter, threads=1)
    expected = {"KernelLinearAttention": layers.count("linear_attention")}
    if "full_attention" in layers:
        expected["Attention"] = layers.count("full_attention")
    assert ops == [expected, expected]
    prefill_graph = onnx.load(str(tmp_path / "minimax-prefill" / "model.fused.onnx"))
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in prefill_graph.graph.initializer}
    for layer, node in enumerate(n for n in prefill_graph.graph.node if n.op_type == "KernelLinearAttention"):
        slopes = model.model.model.layers[layer].self_attn.slope_rate.flatten()
        np.testing.assert_allclose(initializers[node.input[3]].flatten(), torch.exp(-slopes).numpy(), rtol=1e-6)
    prompt = np.random.default_rng(5).integers(0, vocab, (3, 7), dtype=np.int64)
    tokens, logits, _ = example.generate_onnxruntime(prefill, decode, prompt, steps=6)
    torch_tokens, torch_logits, _ = example.generate_torch(model, prompt, steps=6)
    np.testing.assert_array_equal(tokens, torch_tokens)
    np.testing.assert_allclose(logits, torch_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits, example.float64_logits(model, prompt, tokens), rtol=1e-4, atol=1e-5)


_BUILD = """
import json, sys
from attnc.compiler.pipeline import CompileOptions, compile_model

def shapes(batch, past):
    return {"ids": [batch, 1], "state_0": [batch, 4, 8, 8], "state_1": [batch, 2, past, 8],
            "state_2": [batch, 2, past, 8]}

options = CompileOptions(backend="tensorrt", precision="fp16", backend_options={
    "min_shapes": shapes(1, 1), "opt_shapes": shapes(2, 16), "max_shapes": shapes(4, 64)})
manifest = compile_model(sys.argv[1], sys.argv[2], options)
print(json.dumps(manifest["ops_after"]))
"""


@pytest.mark.tensorrt
def test_minimax_decode_engine_builds(tmp_path):
    """The hybrid decode step (lightning layer with its state, softmax layer with its KV cache of dynamic
    length) as an fp16 TensorRT engine: the lightning layer the stateful plugin (state in and out float32),
    the softmax layer TensorRT's attention layer (built by TensorRT-RTX on this CPU machine)."""
    env = rtx_plugin_env(tmp_path)
    if env is None:
        pytest.skip("needs TensorRT-RTX")
    example = _example()
    _, _, graphs = example.lightning_lm("minimax", prompt=5)
    name, module, inputs, names, axes = graphs[1]
    path = export_onnx(module, inputs, tmp_path / f"{name}.onnx", input_names=names, dynamic_axes=axes)
    run = subprocess.run([sys.executable, "-c", _BUILD, str(path), str(tmp_path / "engine")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    ops = json.loads(run.stdout.strip().splitlines()[-1])
    assert ops.get("attnc::KernelLinearAttention") == 1 and ops.get("Attention") == 1
    info = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert info["plugins"]["ops"] == ["KernelLinearAttention_in01234_out2"]
    dtypes = {t["name"]: t["dtype"] for t in info["inputs"] + info["outputs"]}
    assert dtypes["state_0"] == dtypes["output_1"] == "float32"
    assert dtypes["state_1"] == dtypes["output"] == "float16"
