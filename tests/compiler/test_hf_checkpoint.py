"""A local Hugging Face checkpoint directory as MODEL: export -> compile -> validate through the CLI,
the example inputs built from its config, and a clean error for each directory attnc cannot load; text
checkpoints exported with their attention mask (``--with-attention-mask``), fused and run on padded batches;
encoder-decoder checkpoints (T5, BART, Whisper) exported as ``(main input, decoder_input_ids) -> logits`` and as
their two generation steps, text ones also on padded sources.

Checkpoints are tiny random models written here with ``save_pretrained``; the exports use the
TorchScript exporter (a fraction of a second for these models, the dynamo exporter several).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnc import runtime
from attnc.compiler.backends.onnxruntime import load
from attnc.compiler.errors import AttncError
from attnc.compiler.search import generation_options
from attnc.compiler.export import resolve_model
from attnc.models import transformers_zoo
from attnc.models.hf_checkpoint import for_inputs, load_checkpoint, mask_positions, padding_mask
from attnc.testing import TINY_LM, assert_clean_error, tiny_llama
from attnc.testing import run_cli as run

transformers = pytest.importorskip("transformers")

_LM = TINY_LM


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A Llama causal LM (multi-head attention: the TorchScript exporter has no grouped-query SDPA)."""
    return tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


def graph_inputs(path: Path) -> list[tuple[str, list]]:
    return [(value.name, [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim])
            for value in onnx.load(str(path)).graph.input]


def graph_input(path: Path) -> tuple[str, list]:
    (value,) = graph_inputs(path)
    return value


def test_llama_checkpoint_export_compile_validate(llama, tmp_path):
    run("export", llama, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    # the main input, token ids [2, 16] by default, dynamic in batch and sequence
    assert graph_input(tmp_path / "m.onnx") == ("input_ids", ["batch", "seq"])
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    ops = json.loads((tmp_path / "out" / "manifest.json").read_text())["ops_after"]
    assert ops.get("Attention") == 2 and "Softmax" not in ops
    run("validate", tmp_path / "out", "--model", llama)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [2, 16, 64]   # the logits
    run("validate", tmp_path / "out", "--model", llama, "--input-shape", "input_ids:3x11:int64", "--int-high", "64")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [3, 11, 64]


def test_input_shape_overrides_and_pruning_draws_ids_below_the_vocabulary(llama, tmp_path):
    """--input-shape replaces the example inputs (the input keeps its name); on a static export,
    --prune-heads scores heads on random token ids that must stay below the 64-word vocabulary
    (``token_id_bound``; attnc's default bound of 100 would index past the embedding)."""
    run("export", llama, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--static",
        "--input-shape", "input_ids:2x12:int64", "--int-high", "64")
    assert graph_input(tmp_path / "m.onnx") == ("input_ids", [2, 12])
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "pruned", "--prune-heads", "0.5")
    pruned = json.loads((tmp_path / "pruned" / "manifest.json").read_text())["shrink"]["prune_heads"]
    assert pruned["heads_after"] == pruned["heads_before"] // 2


def test_vit_checkpoint_export_compile_validate(tmp_path):
    # the zoo's ViT has no pooler, which config.json does not record: attnc loads it without one
    ckpt = save(transformers_zoo.build("vit"), tmp_path / "vit")
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    assert graph_input(tmp_path / "m.onnx") == ("pixel_values", ["batch", 3, 16, 16])   # batch only
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    ops = json.loads((tmp_path / "out" / "manifest.json").read_text())["ops_after"]
    assert ops.get("Attention") == 2 and "Softmax" not in ops
    run("validate", tmp_path / "out", "--model", ckpt, "--seed", "1")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [2, 5, 32]   # last hidden state


@pytest.mark.parametrize("name,shape,out", [
    ("wav2vec2", [2, 67], [2, 16, 32]),          # raw audio: 16 frames after the convolutions
    ("whisper_encoder", [2, 8, 32], [2, 16, 32]),  # WhisperEncoder (no top-level class), 2 * 16 mel frames
    ("bert", [2, 16], [2, 16, 32]),               # saved without a pooler
])
def test_example_inputs_from_the_config(name, shape, out, tmp_path):
    model = transformers_zoo.build(name)
    module, spec = resolve_model(str(save(model, tmp_path / name)))
    (x,) = spec.example_inputs()
    assert list(x.shape) == shape and spec.input_names == [model.main_input_name]
    with torch.no_grad():
        got, want = module(x), transformers_zoo.Output(model)(x)
    assert list(got.shape) == out and torch.equal(got, want)   # the checkpoint's weights, in eval mode


def test_half_precision_checkpoint_loads_in_float32(tmp_path):
    ckpt = save(transformers_zoo.build("gpt2").to(torch.bfloat16), tmp_path / "gpt2")
    module, spec = resolve_model(str(ckpt))
    assert {p.dtype for p in module.parameters()} == {torch.float32} and not module.training
    assert module(*spec.example_inputs()).dtype == torch.float32


@pytest.mark.parametrize("name", ["Mixtral", "AriaText"])
def test_mixture_of_experts_loads_on_the_exportable_path(tmp_path, name):
    """Mixture-of-experts checkpoints load on transformers' exportable experts path, whichever key counts their
    experts (Mixtral's num_local_experts, Aria's moe_num_experts)."""
    experts = {"Mixtral": dict(num_local_experts=2, num_experts_per_tok=1),
               "AriaText": dict(moe_num_experts=2, moe_topk=1, moe_num_shared_experts=1)}[name]
    config = getattr(transformers, f"{name}Config")(**_LM, num_key_value_heads=2, **experts)
    ckpt = save(getattr(transformers, f"{name}ForCausalLM")(config), tmp_path / name)
    assert json.loads((ckpt / "config.json").read_text()).get("_experts_implementation") is None
    module, spec = resolve_model(str(ckpt))
    assert module.model.config._experts_implementation == "batched_mm"
    assert spec.dynamic_axes["input_ids"] == {0: "batch", 1: "seq"}


def test_input_attnc_cannot_build_needs_input_shape(tmp_path):
    """An audio spectrogram transformer's input_values are no raw audio: attnc asks for their shape."""
    config = transformers.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                    intermediate_size=64, max_length=16, num_mel_bins=16, frequency_stride=10,
                                    time_stride=10)
    ckpt = save(transformers.ASTModel(config), tmp_path / "ast")
    result = run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", ok=False)
    assert_clean_error(result, "input_values", "--input-shape")
    assert not (tmp_path / "m.onnx").exists()
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--input-shape", "1x16x16")
    assert graph_input(tmp_path / "m.onnx") == ("input_values", ["batch", 16, 16])


def _config_only(folder: Path, config, architecture: str | None) -> Path:
    config.architectures = [architecture] if architecture else None
    config.save_pretrained(folder)
    return folder


def test_errors_name_the_problem_and_the_fix(tmp_path):
    out = tmp_path / "m.onnx"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run("export", empty, "-o", out, ok=False), "no config.json", "save_pretrained")

    unknown = _config_only(tmp_path / "unknown", transformers.LlamaConfig(**_LM), "NoSuchForCausalLM")
    assert_clean_error(run("export", unknown, "-o", out, ok=False), "'NoSuchForCausalLM'", "unknown to transformers",
                       "upgrade transformers")

    weightless = _config_only(tmp_path / "weightless", transformers.LlamaConfig(**_LM), "LlamaForCausalLM")
    assert_clean_error(run("export", weightless, "-o", out, ok=False), "no weights", "save_pretrained")

    bad_type = tmp_path / "bad_type"
    bad_type.mkdir()
    (bad_type / "config.json").write_text(json.dumps({"model_type": "no_such_type"}))
    assert_clean_error(run("export", bad_type, "-o", out, ok=False), "cannot read", "MODULE:FACTORY")

    # weights of the base model under a config naming the LM: its head's weight is missing
    save(transformers.LlamaModel(transformers.LlamaConfig(**_LM)), tmp_path / "base")
    _config_only(tmp_path / "base", transformers.LlamaConfig(**_LM, tie_word_embeddings=False), "LlamaForCausalLM")
    assert_clean_error(run("export", tmp_path / "base", "-o", out, ok=False), "lm_head.weight")

    assert_clean_error(run("export", tmp_path / "no" / "such", "-o", out, ok=False), "no directory")
    assert not out.exists()


# --- the attention mask (padded batches) ------------------------------------------------------------


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> Path:
    """A Llama causal LM with grouped-query attention (two K/V heads): with a mask, transformers' SDPA path
    repeats the K/V heads instead of calling SDPA with ``enable_gqa``, so TorchScript exports it as it is."""
    return tiny_llama(tmp_path_factory.mktemp("hf") / "gqa_llama", kv_heads=2)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return save(transformers_zoo.build("bert"), tmp_path_factory.mktemp("hf") / "bert")


def test_padding_mask_rows():
    assert padding_mask(3, 6, "right").tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert padding_mask(2, 5, "left").tolist() == [[1] * 5, [0, 0, 1, 1, 1]]


@pytest.mark.parametrize("checkpoint,padding", [("gqa_llama", "left"), ("bert", "right")])
def test_attention_mask_export_compile_validate(checkpoint, padding, request, tmp_path):
    """Exported with the mask, fused into one Attention per layer, validated on padded example inputs
    without repeating the option; then fused and unfused graph and torch on a padded batch of another
    size, one of whose rows is all padding."""
    ckpt = request.getfixturevalue(checkpoint)
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--with-attention-mask")
    assert graph_inputs(tmp_path / "m.onnx") == [("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "seq"])]
    module, spec = load_checkpoint(str(ckpt), attention_mask=True)
    ids, mask = spec.example_inputs()
    assert spec.padding == padding and torch.equal(mask, padding_mask(2, 16, padding)) and not mask.all()
    assert torch.equal(ids, resolve_model(str(ckpt))[1].example_inputs()[0])   # the unmasked spec's ids

    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    assert not any(p["near_misses"] for p in manifest["passes"])
    run("validate", tmp_path / "out", "--model", ckpt)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["meta"]["inputs"]["attention_mask"]["shape"] == [2, 16]

    ids = torch.randint(0, 64, (4, 11), generator=torch.Generator().manual_seed(1))
    mask = padding_mask(4, 11, padding)
    mask[3] = 0   # a row of padding only: every query attends to nothing
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    fused = load(tmp_path / "out" / "model.fused.onnx").infer(feeds)["output"]
    unfused = load(tmp_path / "m.onnx").infer(feeds)["output"]
    # the fused graph computes what the export does everywhere, the queries that attend to nothing included
    # (TorchScript's SDPA fills the mask with -inf and zeroes the NaN rows, as ONNX Runtime's Attention
    # does; a mask filled with finfo.min does not agree there: test_validate_compares_the_outputs_at_tokens)
    np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        want = module(ids, mask).numpy()
    tokens = mask.bool().numpy()   # the outputs at padding mean nothing: those at tokens are the model's
    np.testing.assert_allclose(fused[tokens], want[tokens], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_left_padded_prompt_gets_the_logits_it_gets_alone(name, tmp_path):
    """Decoder-only models pad on the left: GPT-2's learned positions come from the mask (as transformers'
    generate computes them), Llama's rotary ones from the sequence (rotary scores see distances only)."""
    module, spec = load_checkpoint(str(save(transformers_zoo.build(name), tmp_path / name)), attention_mask=True)
    assert spec.padding == "left" and module.positions_from_mask == (name == "gpt2")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = padding_mask(2, 12, "left")
    with torch.no_grad():
        padded = module(ids, mask)[1, 6:]
        alone = module.model(ids[1:, 6:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_attention_mask_with_a_static_shape_and_pruning(gqa_llama, tmp_path):
    """--input-shape gives input_ids' shape, the mask is built from it; --prune-heads then scores the heads
    on random token ids and masks of ones."""
    run("export", gqa_llama, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--with-attention-mask",
        "--static", "--input-shape", "input_ids:3x12:int64", "--int-high", "64")
    assert graph_inputs(tmp_path / "m.onnx") == [("input_ids", [3, 12]), ("attention_mask", [3, 12])]
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "pruned", "--prune-heads", "0.5")
    pruned = json.loads((tmp_path / "pruned" / "manifest.json").read_text())["shrink"]["prune_heads"]
    assert pruned["heads_after"] == pruned["heads_before"] // 2


def test_attention_mask_errors(bert, tmp_path):
    out = tmp_path / "m.onnx"
    vit = save(transformers_zoo.build("vit"), tmp_path / "vit")
    assert_clean_error(run("export", vit, "-o", out, "--with-attention-mask", ok=False), "'pixel_values'",
                       "text models")
    assert_clean_error(run("export", "lm-mhsa-small", "-o", out, "--with-attention-mask", ok=False),
                       "no Hugging Face checkpoint")
    assert_clean_error(run("export", bert, "-o", out, "--with-attention-mask", "--input-shape", "input_ids:2x8:int64",
                           "--input-shape", "attention_mask:2x8:int64", ok=False), "input_ids' shape only")
    assert not out.exists()


def test_validate_compares_the_outputs_at_tokens(tmp_path):
    """Gemma 2's eager attention gives a query that attends to nothing (the padding in front of a left-padded
    row) uniform weights, ONNX Runtime's Attention zeros: validate compares the outputs at tokens only."""
    ckpt = save(transformers_zoo.build("gemma2"), tmp_path / "gemma2")
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript", "--with-attention-mask")
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    run("validate", tmp_path / "out", "--model", ckpt)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and "at padding (attention_mask 0) not compared" in report["meta"]["input_source"]

    module, spec = load_checkpoint(str(ckpt), attention_mask=True)
    ids, mask = spec.example_inputs()
    fused = load(tmp_path / "out" / "model.fused.onnx").infer({"input_ids": ids.numpy(),
                                                                "attention_mask": mask.numpy()})["output"]
    with torch.no_grad():
        want = module(ids, mask).numpy()
    padding = ~mask.bool().numpy()
    assert not np.allclose(fused[padding], want[padding], atol=1e-2)   # what validate leaves out


# --- one generation step with its KV cache (--with-past) ----------------------------------------------

def graph_outputs(path: Path) -> list[str]:
    return [o.name for o in onnx.load(str(path)).graph.output]


@pytest.mark.parametrize("checkpoint,exporter", [("gqa_llama", "torchscript"), ("gqa_llama", "dynamo"),
                                                 ("bloom", "torchscript")])
def test_cached_step_export_compile_validate(checkpoint, exporter, request, tmp_path):
    """A generation step with its cache: named inputs and outputs, dynamic in batch, new tokens and cache
    length; one Attention per layer (reading the cache and the new keys), validated on padded example inputs
    without repeating the option, the new cache compared at its tokens too. BLOOM's ALiBi attention on
    flattened heads fuses once its split is proven at sampled sizes: the mask's dim is named ``past + seq``."""
    if checkpoint == "bloom":
        ckpt, heads = save(transformers_zoo.build("bloom"), tmp_path / "bloom"), 4
    else:
        ckpt, heads = request.getfixturevalue(checkpoint), 2
    run("export", ckpt, "-o", tmp_path / "step.onnx", "--exporter", exporter, "--with-past")
    inputs = graph_inputs(tmp_path / "step.onnx")
    assert inputs[:3] == [("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "past + seq"]),
                          ("past_key_values.0.key", ["batch", heads, "past", 8])]
    assert [name for name, _ in inputs[3:]] == ["past_key_values.0.value", "past_key_values.1.key",
                                               "past_key_values.1.value"]
    assert graph_outputs(tmp_path / "step.onnx") == ["logits", "present.0.key", "present.0.value", "present.1.key",
                                                     "present.1.value"]
    run("compile", tmp_path / "step.onnx", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    run("validate", tmp_path / "out", "--model", ckpt)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and {o["name"] for o in report["outputs"]} == set(graph_outputs(tmp_path / "step.onnx"))
    assert report["meta"]["inputs"]["attention_mask"]["shape"] == [2, 8]
    assert report["meta"]["inputs"]["past_key_values.1.value"]["shape"] == [2, heads, 5, 8]


@pytest.mark.parametrize("checkpoint", ["gqa_llama", "gpt2"])
def test_cached_steps_give_the_logits_of_one_uncached_pass(checkpoint, request, tmp_path):
    """A left-padded prompt with an empty cache (length 0, which the export never saw), then three tokens
    after it with the cache it returned, through the compiled step on ONNX Runtime: the logits one pass over
    all the tokens gives without a cache (GPT-2's learned positions from the mask, Llama's rotary ones)."""
    ckpt = request.getfixturevalue(checkpoint) if checkpoint != "gpt2" else \
        save(transformers_zoo.build("gpt2"), tmp_path / "gpt2")
    run("export", ckpt, "-o", tmp_path / "step.onnx", "--exporter", "torchscript", "--with-past")
    run("compile", tmp_path / "step.onnx", "-o", tmp_path / "out")
    step = runtime.load(tmp_path / "out")
    whole, spec = load_checkpoint(str(ckpt), attention_mask=True)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = padding_mask(3, 9, "left")
    mask[:, 6:] = 1   # the last row's prompt is 3 tokens long, its padding all in the prompt
    heads = {s.name: s.shape for s in step.input_specs}["past_key_values.0.key"]
    empty = {s.name: np.zeros((3, heads[1], 0, heads[3]), np.float32) for s in step.input_specs[2:]}
    first = step.infer({"input_ids": ids[:, :6].numpy(), "attention_mask": mask[:, :6].numpy(), **empty})
    cache = {f"past_key_values.{k[len('present.'):]}": v for k, v in first.items() if k.startswith("present.")}
    assert cache["past_key_values.1.key"].shape[2] == 6
    second = step.infer({"input_ids": ids[:, 6:].numpy(), "attention_mask": mask.numpy(), **cache})
    with torch.no_grad():
        want = whole(ids, mask).numpy()
    got = np.concatenate([first["logits"], second["logits"]], axis=1)
    tokens = mask.bool().numpy()
    np.testing.assert_allclose(got[tokens], want[tokens], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("checkpoint", ["gqa_llama", "gpt2"])
def test_generate_with_the_compiled_step_gives_transformers_tokens(checkpoint, request, tmp_path):
    """attnc.runtime.generate on the compiled step against transformers' greedy generate, on a left-padded
    batch: the same tokens; with an end-of-sequence token, rows that reached it padded as generate pads them."""
    ckpt = request.getfixturevalue(checkpoint) if checkpoint != "gpt2" else \
        save(transformers_zoo.build("gpt2"), tmp_path / "gpt2")
    run("export", ckpt, "-o", tmp_path / "step.onnx", "--exporter", "torchscript", "--with-past")
    run("compile", tmp_path / "step.onnx", "-o", tmp_path / "out")
    step = runtime.load(tmp_path / "out")
    model = load_checkpoint(str(ckpt))[0].model
    model.generation_config.eos_token_id = None   # no end token: ten tokens in every row
    ids = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(5))
    mask = padding_mask(3, 7, "left")

    def theirs(**options):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0,
                                  **options).numpy()

    ours = runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=10)
    assert ours.shape == (3, 17)
    np.testing.assert_array_equal(ours, theirs())
    # row 0 ends at its third new token, the others when they reach it or the token after it, if they do
    ends = [int(ours[0, 9]), int(ours[1, 12])]
    ended = runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=10, eos_token_id=ends, pad_token_id=0)
    np.testing.assert_array_equal(ended, theirs(eos_token_id=ends))
    assert (ended[0, 10:] == 0).all() and (ended[1, 13:] == 0).all()

    # beam search (the cache and the mask reordered and expanded by beam) and logits processors; the beams'
    # three most frequent tokens as end tokens finish beams early
    beams = runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=10, num_beams=4, num_return_sequences=4)
    np.testing.assert_array_equal(beams, theirs(num_beams=4, num_return_sequences=4))
    ends = [token for token, _ in Counter(beams[:, 7:].ravel().tolist()).most_common(3)]
    lengths = set()
    for options in (dict(num_beams=3, num_return_sequences=2), dict(num_beams=4, length_penalty=-1.0),
                    dict(num_beams=3, early_stopping=True, no_repeat_ngram_size=2),
                    dict(num_beams=2, early_stopping="never", length_penalty=2.0, min_new_tokens=3),
                    dict(repetition_penalty=1.5, no_repeat_ngram_size=3, min_length=12)):
        got = runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=10, eos_token_id=ends, pad_token_id=0,
                               **options)
        np.testing.assert_array_equal(got, theirs(eos_token_id=ends, **options), err_msg=str(options))
        lengths.add(got.shape[1])
    assert min(lengths) < 17, "no beam search ended before its last token"

    # sampling: each token among the 3 most likely of an uncached forward on its prefix; top-k 1 is greedy
    sampled = runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=6, do_sample=True, top_k=3,
                               temperature=3.0, num_return_sequences=2, seed=1)
    rows = np.concatenate([np.repeat(mask.numpy(), 2, axis=0), np.ones((6, 5), np.int64)], axis=1)
    with torch.no_grad():
        logits = model(torch.from_numpy(sampled[:, :-1]), attention_mask=torch.from_numpy(rows),
                       position_ids=mask_positions(torch.from_numpy(rows))).logits.numpy()
    top3 = np.argsort(-logits[:, 6:], axis=-1)[..., :3]
    assert (top3 == sampled[:, 7:, None]).any(-1).all()
    assert (sampled[0::2] != sampled[1::2]).any(), "two samples of each prompt, both greedy"
    np.testing.assert_array_equal(runtime.generate(step, ids.numpy(), mask.numpy(), max_new_tokens=10,
                                                   do_sample=True, top_k=1), theirs())


def test_generate_example_gives_transformers_tokens(monkeypatch, capsys):
    """examples/generate_checkpoint.py end to end: a random Llama saved, exported with its cache, compiled,
    validated, and decoded through ONNX Runtime to transformers' tokens (it exits 1 otherwise)."""
    example = importlib.util.spec_from_file_location("generate_checkpoint",
                                                     Path(__file__).parents[2] / "examples" / "generate_checkpoint.py")
    module = importlib.util.module_from_spec(example)
    example.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["generate_checkpoint.py", "--exporter", "torchscript", "--width", "128",
                                      "--generate", "6", "--batch", "2", "--prompt", "5"])
    threads = torch.get_num_threads()
    try:
        module.main()   # exits 1 when the tokens differ or validation fails
    finally:
        torch.set_num_threads(threads)   # the example sets its --threads
    out = capsys.readouterr().out
    assert "validation PASS" in out and "tokens equal to transformers' generate: True (2 rows x 6" in out


def test_cached_step_errors(bert, llama, tmp_path):
    out = tmp_path / "step.onnx"
    assert_clean_error(run("export", bert, "-o", out, "--with-past", ok=False), "no decoder-only text model")
    assert_clean_error(run("export", "lm-mhsa-small", "-o", out, "--with-past", ok=False), "no Hugging Face checkpoint")
    assert_clean_error(run("export", llama, "-o", out, "--with-past", "--input-shape", "input_ids:2x8:int64",
                           ok=False), "builds its example inputs")
    assert not out.exists()
    run("export", llama, "-o", tmp_path / "plain.onnx", "--exporter", "torchscript")
    run("compile", tmp_path / "plain.onnx", "-o", tmp_path / "plain")
    with pytest.raises(AttncError, match="not a decoder-only generation step with its KV cache"):
        runtime.generate(runtime.load(tmp_path / "plain"), np.zeros((1, 4), np.int64))
    run("export", llama, "-o", tmp_path / "step.onnx", "--exporter", "torchscript", "--with-past")
    assert_clean_error(run("compile", tmp_path / "step.onnx", "-o", tmp_path / "pruned", "--prune-heads", "0.5",
                           ok=False), "its K extends the cache input 'past_key_values.0.key'")
    assert not (tmp_path / "pruned").exists()
    with pytest.raises(AttncError, match="not an encoder-decoder model's first generation step"):
        runtime.generate_seq2seq(runtime.load(tmp_path / "plain"), runtime.load(tmp_path / "plain"),
                                 np.zeros((1, 4), np.int64), 0)


# --- encoder-decoder models ---------------------------------------------------------------------------

_SEQ2SEQ = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, decoder_layers=2, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _seq2seq(name: str) -> torch.nn.Module:
    """Two encoder and two decoder layers of each: T5's relative position bias (bidirectional in the encoder,
    causal in the decoder), BART's learned positions, Whisper's convolutional audio front end."""
    t = transformers
    build = {
        "t5": lambda: t.T5ForConditionalGeneration(t.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                                              vocab_size=64, decoder_start_token_id=0)),
        "bart": lambda: t.BartForConditionalGeneration(t.BartConfig(**_SEQ2SEQ, max_position_embeddings=64,
                                                                    decoder_start_token_id=2)),
        "whisper": lambda: t.WhisperForConditionalGeneration(t.WhisperConfig(
            **_SEQ2SEQ, num_mel_bins=8, max_source_positions=16, max_target_positions=16, decoder_start_token_id=3,
            use_cache=False)),   # saved without a cache: attnc turns it on (TorchScript cannot export the mask without)
    }[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers_zoo.perturbed(build())
    with torch.no_grad():
        # Fresh embeddings (std 1) swamp a random decoder's residual stream: greedy decoding would repeat the
        # start token (the tied output layer's best match). Scaled down, each step picks another token.
        model.get_input_embeddings().weight.mul_(0.05)
        if name == "bart":
            # BART's random decoder barely reads its encoder (the same tokens for every source): its cross-attention
            # output scaled up, the sources (and their padding) steer the tokens.
            for layer in model.model.decoder.layers:
                layer.encoder_attn.out_proj.weight.mul_(10)
    return model


@pytest.fixture(scope="module")
def seq2seq(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seq2seq")
    return lambda name: save(_seq2seq(name), folder / name) if not (folder / name).is_dir() else folder / name


def attention_roles(path: Path) -> dict[str, int]:
    """The fused Attention nodes in ``path`` by the layer they replace, read from the exporter's node names:
    ``cross`` (a decoder layer's attention over the encoder output), ``decoder`` and ``encoder`` (self-attention),
    with `` causal`` where the node's ``is_causal`` is set."""
    roles = Counter()
    for node in (n for n in onnx.load(str(path)).graph.node if n.op_type == "Attention"):
        role = "cross" if any(k in node.name for k in ("encoder_attn", "EncDecAttention")) else \
            "decoder" if "/decoder/" in node.name else "encoder"
        causal = any(a.name == "is_causal" and a.i for a in node.attribute)
        roles[role + " causal" * causal] += 1
    return dict(roles)


@pytest.mark.parametrize("name", ["t5", "bart"])
def test_seq2seq_export_compile_validate(name, seq2seq, tmp_path):
    """One graph (input_ids, decoder_input_ids) -> logits: the encoder's self-attention, the decoder's causal
    self-attention and its cross-attention fuse into one Attention each per layer; validate feeds both inputs
    (the decoder's starting with decoder_start_token_id); the fused graph matches torch at other sizes."""
    ckpt = seq2seq(name)
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    assert graph_inputs(tmp_path / "m.onnx") == [("input_ids", ["batch", "seq"]), ("decoder_input_ids", ["batch", "tgt"])]
    module, spec = load_checkpoint(str(ckpt))
    ids, decoder_ids = spec.example_inputs()
    start = {"t5": 0, "bart": 2}[name]
    assert list(decoder_ids.shape) == [2, 8] and (decoder_ids[:, 0] == start).all() and decoder_ids.max() < 64

    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "Softmax" not in manifest["ops_after"] and not any(p["near_misses"] for p in manifest["passes"])
    # T5's causal mask is added to its relative position bias: an additive mask, no is_causal
    causal = {"t5": "decoder", "bart": "decoder causal"}[name]
    assert attention_roles(tmp_path / "out" / "model.fused.onnx") == {"encoder": 2, causal: 2, "cross": 2}
    run("validate", tmp_path / "out", "--model", ckpt)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [2, 8, 64]   # the logits
    assert report["meta"]["inputs"]["decoder_input_ids"]["shape"] == [2, 8]

    gen = torch.Generator().manual_seed(1)
    ids, decoder_ids = torch.randint(0, 64, (3, 11), generator=gen), torch.randint(0, 64, (3, 5), generator=gen)
    fused = load(tmp_path / "out" / "model.fused.onnx").infer(
        {"input_ids": ids.numpy(), "decoder_input_ids": decoder_ids.numpy()})["output"]
    with torch.no_grad():
        want = module(ids, decoder_ids).numpy()
    assert fused.shape == (3, 5, 64)
    np.testing.assert_allclose(fused, want, rtol=1e-4, atol=1e-5)


def test_whisper_export_compile_validate(seq2seq, tmp_path):
    """WhisperForConditionalGeneration: (input_features, decoder_input_ids) -> logits, the features' frames
    static (2 * max_source_positions), the decoder tokens dynamic."""
    ckpt = seq2seq("whisper")
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    assert graph_inputs(tmp_path / "m.onnx") == [("input_features", ["batch", 8, 32]),
                                                 ("decoder_input_ids", ["batch", "tgt"])]
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out")
    assert attention_roles(tmp_path / "out" / "model.fused.onnx") == {"encoder": 2, "decoder causal": 2, "cross": 2}
    run("validate", tmp_path / "out", "--model", ckpt)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["outputs"][0]["actual"]["shape"] == [2, 8, 64]

    module, spec = load_checkpoint(str(ckpt))
    features = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(1))
    decoder_ids = torch.tensor([[3, 5, 9, 60, 7]] * 3)
    fused = load(tmp_path / "out" / "model.fused.onnx").infer(
        {"input_features": features.numpy(), "decoder_input_ids": decoder_ids.numpy()})["output"]
    with torch.no_grad():
        np.testing.assert_allclose(fused, module(features, decoder_ids).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["t5", "whisper"])
def test_seq2seq_pruned_unevenly_validates_against_the_gated_checkpoint(name, seq2seq, tmp_path):
    """An encoder-decoder graph pruned to a different head count per layer keeps its layers in order (before,
    pruning moved the decoder's first layer in front of the encoder's second and refused its own result, "the
    pruned graph's heads do not match the request"); ``attnc validate`` passes against the checkpoint with the same
    heads gated, on two input draws, and not against the unpruned checkpoint."""
    from attnc.passes.prune_heads import find_attention_layers, prune_heads

    ckpt = seq2seq(name)
    run("export", ckpt, "-o", tmp_path / "m.onnx", "--exporter", "torchscript")
    layers = find_attention_layers(onnx.load(str(tmp_path / "m.onnx")))
    keep = {l.index: list(range(l.heads))[l.index % 2: l.index % 2 + 1 + l.index % 3] for l in layers}
    assert len({len(k) for k in keep.values()}) == 3
    pruned, _ = prune_heads(onnx.load(str(tmp_path / "m.onnx")), keep=keep)
    assert [(l.anchor, l.heads) for l in find_attention_layers(pruned)] == \
        [(l.anchor, len(keep[l.index])) for l in layers]

    (tmp_path / "keep.json").write_text(json.dumps(keep))
    run("compile", tmp_path / "m.onnx", "-o", tmp_path / "out", "--prune-keep", tmp_path / "keep.json")
    for seed in (0, 1):
        run("validate", tmp_path / "out", "--model", ckpt, "--seed", seed)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["passed"] and report["shrink_cost"][0]["cosine"] < 0.9999
    assert run("validate", tmp_path / "out", "--model", ckpt, "--reference", "original", ok=False).exit_code == 1


def test_seq2seq_base_model_and_the_decoder_start_token(tmp_path):
    """A base model without an LM head gives the decoder's last hidden state; the decoder ids start with
    the token generate starts with: config.json's decoder_start_token_id, else generation_config.json's,
    else bos_token_id."""
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, vocab_size=64)
    model = transformers.T5Model(config).eval()
    module, spec = load_checkpoint(str(save(model, tmp_path / "t5")))
    ids, decoder_ids = spec.example_inputs(batch=3, seq=7, tgt=4)
    assert spec.decoder_start is None   # T5Config has none: random ids throughout
    with torch.no_grad():
        got = module(ids, decoder_ids)
        want = model(ids, decoder_input_ids=decoder_ids).last_hidden_state
    assert list(got.shape) == [3, 4, 32] and torch.equal(got, want)

    (tmp_path / "t5" / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 5}))
    assert load_checkpoint(str(tmp_path / "t5"))[1].example_inputs()[1][:, 0].tolist() == [5, 5]
    config.bos_token_id = 7
    save(transformers.T5Model(config), tmp_path / "t5_bos")
    assert load_checkpoint(str(tmp_path / "t5_bos"))[1].example_inputs()[1][:, 0].tolist() == [7, 7]


def teacher_forced(first, step, sources: dict, tokens: np.ndarray) -> np.ndarray:
    """The logits of the target ``tokens [B, 5]`` through an encoder-decoder model's compiled steps: 2 through the
    first step (the encoder on ``sources``), then 1 and 2 through the later steps, each on the caches the step
    before returned (and the sources' ``attention_mask`` as ``encoder_attention_mask`` where ``sources`` has one)."""
    outputs = first.infer({**sources, "decoder_input_ids": tokens[:, :2]})
    fixed = {k: v for k, v in outputs.items() if k.startswith("cross_key_values.")}
    fixed.update({"encoder_attention_mask": sources["attention_mask"]} if "attention_mask" in sources else {})
    logits = [outputs["logits"]]
    for new in (tokens[:, 2:3], tokens[:, 3:]):
        cache = {k.replace("present.", "past_key_values."): v for k, v in outputs.items() if k.startswith("present.")}
        outputs = step.infer({"decoder_input_ids": new, **cache, **fixed})
        logits.append(outputs["logits"])
    assert outputs["present.1.value"].shape[2] == 5
    return np.concatenate(logits, axis=1)


@pytest.fixture(scope="module")
def seq2seq_first_steps(seq2seq, tmp_path_factory):
    """``name -> folder`` holding the checkpoint's first step (``attnc export --first-step``, TorchScript) as
    ``first.onnx`` and compiled and validated in ``first/``: once per checkpoint, for each exporter of its later steps
    (the exporter parameter of ``test_seq2seq_cached_generation`` changes the later steps only)."""
    folders = {}

    def first_step(name: str) -> Path:
        if name not in folders:
            ckpt, folder = seq2seq(name), tmp_path_factory.mktemp(f"{name}-first")
            run("export", ckpt, "-o", folder / "first.onnx", "--exporter", "torchscript", "--first-step")
            run("compile", folder / "first.onnx", "-o", folder / "first")
            run("validate", folder / "first", "--model", ckpt)
            folders[name] = folder
        return folders[name]
    return first_step


@pytest.mark.parametrize("name,exporter", [("t5", "torchscript"), ("bart", "torchscript"), ("whisper", "torchscript"),
                                           ("bart", "dynamo")])
def test_seq2seq_cached_generation(name, exporter, seq2seq, seq2seq_first_steps, tmp_path):
    """An encoder-decoder model's two generation graphs: the first step (encoder, start token, cross-attention
    keys and values out) and the later steps (the decoder alone on both caches, the encoder never again), each
    fused (one Attention per attention) and validated; on ONNX Runtime, steps of 2, 1 and 2 tokens give the
    logits of one uncached pass, and greedy decoding gives the tokens of a torch loop that runs the whole
    model, uncached, for every token (and T5's generate's)."""
    ckpt = seq2seq(name)
    # the dynamo case exports the later steps with dynamo (the first step is the plain export's graph plus outputs,
    # exported with TorchScript, compiled and validated once per checkpoint by the seq2seq_first_steps fixture)
    first_folder = seq2seq_first_steps(name)
    run("export", ckpt, "-o", tmp_path / "step.onnx", "--exporter", exporter, "--with-past")
    run("compile", tmp_path / "step.onnx", "-o", tmp_path / "step")
    run("validate", tmp_path / "step", "--model", ckpt)
    for folder in (first_folder / "first", tmp_path / "step"):
        assert json.loads((folder / "report.json").read_text())["passed"]
    step = onnx.load(str(tmp_path / "step.onnx"))
    assert [i.name for i in step.graph.input][:2] == ["decoder_input_ids", "past_key_values.0.key"]
    assert "cross_key_values.1.value" in [i.name for i in step.graph.input]
    # two decoder layers' self- and cross-attention (no encoder in the later steps); the first step has the
    # encoder's too
    assert json.loads((tmp_path / "step" / "manifest.json").read_text())["ops_after"].get("Attention") == 4
    assert json.loads((first_folder / "first" / "manifest.json").read_text())["ops_after"].get("Attention") == 6
    module, spec = load_checkpoint(str(ckpt))
    model = module.model
    inputs = spec.example_inputs(batch=3, seed=4)[0]
    first, step = runtime.load(first_folder / "first"), runtime.load(tmp_path / "step")

    tokens = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(6))
    tokens[:, 0] = spec.decoder_start
    with torch.no_grad():
        want = model(inputs, decoder_input_ids=tokens, use_cache=False).logits.numpy()
    got = teacher_forced(first, step, {spec.input_names[0]: inputs.numpy()}, tokens.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)

    ours = runtime.generate_seq2seq(first, step, inputs.numpy(), spec.decoder_start, max_new_tokens=8)
    assert len(np.unique(ours[:, 1:])) > 2   # not the start token over and over
    with pytest.raises(AttncError, match="given to artefacts that take none"):
        runtime.generate_seq2seq(first, step, inputs.numpy(), spec.decoder_start, attention_mask=np.ones((3, 16)))
    tokens = torch.full((3, 1), spec.decoder_start)
    with torch.no_grad():
        for _ in range(8):
            logits = model(inputs, decoder_input_ids=tokens, use_cache=False).logits
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_array_equal(ours, tokens.numpy())
    if name == "t5":   # no forced or suppressed tokens in its generation config
        with torch.no_grad():
            theirs = model.generate(inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False).numpy()
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name,exporter", [("t5", "torchscript"), ("bart", "dynamo")])
def test_seq2seq_padded_sources(name, exporter, seq2seq, tmp_path):
    """Sources of different lengths padded on the right, --with-attention-mask: the full forward (input_ids,
    attention_mask, decoder_input_ids) -> logits, the first step taking the mask and the later steps taking it as
    encoder_attention_mask, each fused and validated on padded example rows (the dynamo case exports the later
    steps with dynamo). On ONNX Runtime, 3 sources of 10, 7 and 4 tokens: teacher-forced steps give the logits
    of transformers' uncached masked forward, and greedy decoding its generate's tokens, each row those it gets
    alone, unpadded (and not those it gets with its padding read)."""
    ckpt = seq2seq(name)
    # the full forward's example inputs from --input-shape: the mask goes between the ids
    shapes = ("--input-shape", "input_ids:3x12:int64", "--input-shape", "decoder_input_ids:3x5:int64", "--int-high", 64)
    for graph, options, by in (("full", shapes, "torchscript"), ("first", ("--first-step",), "torchscript"),
                               ("step", ("--with-past",), exporter)):
        run("export", ckpt, "-o", tmp_path / f"{graph}.onnx", "--exporter", by, "--with-attention-mask", *options)
        run("compile", tmp_path / f"{graph}.onnx", "-o", tmp_path / graph)
        run("validate", tmp_path / graph, "--model", ckpt)
        assert json.loads((tmp_path / graph / "report.json").read_text())["passed"], graph
    # the logits are over targets, all tokens: compared everywhere; the cross-attention cache at source tokens
    source = {graph: json.loads((tmp_path / graph / "report.json").read_text())["meta"]["input_source"]
              for graph in ("full", "first")}
    assert "not compared" not in source["full"] and "cross_key_values.0.key" in source["first"]
    masked = [("input_ids", ["batch", "seq"]), ("attention_mask", ["batch", "seq"]),
              ("decoder_input_ids", ["batch", "tgt"])]
    assert graph_inputs(tmp_path / "full.onnx") == graph_inputs(tmp_path / "first.onnx") == masked
    step_inputs = dict(graph_inputs(tmp_path / "step.onnx"))
    assert list(step_inputs)[:3] == ["decoder_input_ids", "encoder_attention_mask", "past_key_values.0.key"]
    assert step_inputs["encoder_attention_mask"] == ["batch", "source"]
    assert step_inputs["cross_key_values.1.value"] == ["batch", 4, "source", 8]
    causal = {"t5": "decoder", "bart": "decoder causal"}[name]
    for graph in ("full", "first"):
        assert attention_roles(tmp_path / graph / "model.fused.onnx") == {"encoder": 2, causal: 2, "cross": 2}
    assert json.loads((tmp_path / "step" / "manifest.json").read_text())["ops_after"].get("Attention") == 4
    # validate fed padded rows (16 and 8 tokens) to the first step and the later steps
    module, spec = resolve_model(str(ckpt))
    first, step = runtime.load(tmp_path / "first"), runtime.load(tmp_path / "step")
    for runner, mask_name in ((first, "attention_mask"), (step, "encoder_attention_mask")):
        _, variant = for_inputs(module, spec, [s.name for s in runner.input_specs], runner.output_names)
        examples = dict(zip(variant.input_names, variant.example_inputs()))
        assert torch.equal(examples[mask_name], padding_mask(2, 16, "right")), mask_name

    model = module.model
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = padding_mask(3, 10, "right")   # 10, 7 and 4 tokens; the ids under the padding stay random
    tokens = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(6))
    tokens[:, 0] = spec.decoder_start
    got = teacher_forced(first, step, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, tokens.numpy())
    with torch.no_grad():
        want = model(ids, attention_mask=mask, decoder_input_ids=tokens, use_cache=False).logits.numpy()
        unmasked = model(ids, decoder_input_ids=tokens, use_cache=False).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    for row in (1, 2):   # what the padded rows get with their padding read: out of that tolerance
        assert not np.allclose(got[row], unmasked[row], rtol=1e-4, atol=1e-5)

    # the checkpoint's generation_config.json: start, end and pad tokens (BART's also forces its end token last)
    options = generation_options(ckpt)
    assert options["decoder_start_token_id"] == spec.decoder_start
    beams = dict(num_beams=3, num_return_sequences=2, length_penalty=0.7)
    with torch.no_grad():
        theirs = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8).numpy()
        their_beams = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, **beams).numpy()
    ours = runtime.generate_seq2seq(first, step, ids.numpy(), max_new_tokens=8, attention_mask=mask.numpy(),
                                    **options)
    np.testing.assert_array_equal(ours, theirs)
    assert len(np.unique(ours[:, 1:])) > 2
    # beam search: each source's cross-attention cache and mask expanded to its beams
    np.testing.assert_array_equal(runtime.generate_seq2seq(first, step, ids.numpy(), max_new_tokens=8,
                                                           attention_mask=mask.numpy(), **options, **beams),
                                  their_beams)
    for row, length in enumerate(mask.sum(1).tolist()):
        alone = runtime.generate_seq2seq(first, step, ids[row:row + 1, :length].numpy(), max_new_tokens=8,
                                         **options)[0]   # no mask: all ones
        np.testing.assert_array_equal(ours[row, :len(alone)], alone)
        assert (ours[row, len(alone):] == options["pad_token_id"]).all()
    # the padding read as tokens changes the padded rows' tokens: what the comparison above rules out
    read = runtime.generate_seq2seq(first, step, ids.numpy(), max_new_tokens=8, **options)
    assert (read[1:] != ours[1:]).any(axis=1).all()

    run("export", ckpt, "-o", tmp_path / "plain_step.onnx", "--exporter", "torchscript", "--with-past")
    with pytest.raises(AttncError, match="both with --with-attention-mask, or both without"):
        runtime.generate_seq2seq(first, load(tmp_path / "plain_step.onnx"), ids.numpy(), spec.decoder_start)


def test_seq2seq_errors(seq2seq, gqa_llama, tmp_path):
    out = tmp_path / "m.onnx"
    for step in ((), ("--first-step",)):
        assert_clean_error(run("export", seq2seq("whisper"), "-o", out, "--with-attention-mask", *step, ok=False),
                           "takes 'input_features', not token ids", "without --with-attention-mask")
    assert_clean_error(run("export", gqa_llama, "-o", out, "--first-step", ok=False), "no encoder-decoder checkpoint")
    assert_clean_error(run("export", seq2seq("t5"), "-o", out, "--first-step", "--with-past", ok=False),
                       "two graphs")
    assert not out.exists()
