"""Head pruning of a generation step with its KV cache (``attnc export CKPT --with-past``): the new keys and values
extend ``concat(past_key_values.N.key, k)``, so pruning K/V heads prunes the cache inputs and ``present`` outputs
too, and ``attnc compile step.onnx --prune-keep out/`` prunes the heads a plain export's ``--prune-heads`` kept
(layers found by their output projection's weights). The graphs are TorchScript's (a fraction of a second each);
the dynamo exporter's steps prune alike (checked by hand: its export takes ten seconds).

The reference is the checkpoint's torch model with the pruned heads gated to zero (``head_gates``), run without a
cache: a prompt step on an empty cache and a step of 3 more tokens give its logits, and ``attnc.runtime.generate``
gives its greedy tokens (transformers' ``generate`` on the gated model). Checkpoints: the grouped-query Llama of
``tests/compiler/test_hf_checkpoint.py`` (pruned by whole K/V groups, and by query heads inside them) and GPT-2.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from attnc import runtime
from attnc.compiler.pipeline import CompileOptions, compile_model
from attnc.models import transformers_zoo
from attnc.models.hf_checkpoint import load_checkpoint, padding_mask
from attnc.passes.prune_heads import apply_keep, gates_from_keep, head_gates, prune_heads
from attnc.testing import assert_clean_error, tiny_llama
from attnc.testing import run_cli as run

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory) -> Path:
    """4 query heads on 2 K/V heads, 2 layers, head dim 8."""
    return tiny_llama(tmp_path_factory.mktemp("hf") / "gqa_llama", kv_heads=2)


HEADS = {0: 4, 1: 4}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    transformers_zoo.build("gpt2").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(gqa_llama, gpt2, tmp_path_factory):
    """``exported(name)``, made once: ``"gqa_llama"`` and ``"gpt2"``, each checkpoint's generation step with its cache;
    ``"plain"``, the grouped-query Llama with its mask; ``"plan"``, its compile with half its heads pruned."""
    folder, made = tmp_path_factory.mktemp("exports"), {}
    checkpoints = {"gqa_llama": gqa_llama, "gpt2": gpt2}

    def get(name: str) -> Path:
        if name not in made:
            if name == "plan":
                run("compile", get("plain"), "-o", folder / "plan", "--prune-heads", "0.5")
                made[name] = folder / "plan"
            elif name == "plain":   # TorchScript exports grouped-query SDPA with a mask only
                made[name] = folder / "plain.onnx"
                run("export", gqa_llama, "-o", made[name], "--exporter", "torchscript", "--with-attention-mask")
            else:
                made[name] = folder / f"{name}-step.onnx"
                run("export", checkpoints[name], "-o", made[name], "--exporter", "torchscript", "--with-past")
        return made[name]

    return get


def _teacher_forced(step, ids: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, dict]:
    """The logits of ``ids`` [B, 9] through a compiled step: 6 tokens on an empty cache (its declared heads), then
    3 on the cache that returned; and that last step's outputs."""
    empty = {s.name: np.zeros((len(ids), s.shape[1], 0, s.shape[3]), np.float32) for s in step.input_specs[2:]}
    first = step.infer({"input_ids": ids[:, :6].numpy(), "attention_mask": mask[:, :6].numpy(), **empty})
    cache = {f"past_key_values.{k[len('present.'):]}": v for k, v in first.items() if k.startswith("present.")}
    second = step.infer({"input_ids": ids[:, 6:].numpy(), "attention_mask": mask.numpy(), **cache})
    return np.concatenate([first["logits"], second["logits"]], axis=1), second


def _check_against_masked_torch(step, ckpt: Path, keep: dict[int, list[int]], kv_heads: dict[int, int]) -> None:
    """The pruned step's cache of layer ``i`` has ``kv_heads[i]`` heads (declared and returned); its logits over a
    left-padded prompt and 3 later tokens are the gated torch model's uncached forward's (and not the ungated
    one's); ``runtime.generate`` gives transformers' greedy tokens of the gated model."""
    assert {s.name: s.shape[1] for s in step.input_specs[2:]} == {
        f"past_key_values.{i}.{kind}": kv_heads[i] for i in range(2) for kind in ("key", "value")}
    whole, _ = load_checkpoint(str(ckpt), attention_mask=True)
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = padding_mask(3, 9, "left")
    mask[:, 6:] = 1
    got, last = _teacher_forced(step, ids, mask)
    assert [last[f"present.{i}.value"].shape for i in range(2)] == [(3, kv_heads[i], 9, 8) for i in range(2)]
    tokens = mask.bool().numpy()
    with torch.no_grad():
        unpruned = whole(ids, mask).numpy()
        with head_gates(whole, gates_from_keep(keep, HEADS)):
            want = whole(ids, mask).numpy()
    np.testing.assert_allclose(got[tokens], want[tokens], rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[tokens], unpruned[tokens], atol=1e-2)

    model = whole.model
    model.generation_config.eos_token_id = None
    prompt, prompt_mask = ids[:, :7], padding_mask(3, 7, "left")
    ours = runtime.generate(step, prompt.numpy(), prompt_mask.numpy(), max_new_tokens=8)
    with torch.no_grad(), head_gates(model, gates_from_keep(keep, HEADS)):
        theirs = model.generate(prompt, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_step_pruned_to_the_heads_of_a_pruned_plain_export(gqa_llama, exported, tmp_path):
    """``attnc compile step.onnx --prune-keep plan/`` with a plain export's compile as the plan: the same heads
    (whole K/V groups), the cache inputs and outputs declared with the kept K/V head, one Attention per layer; the
    compiled step against the gated torch model; ``attnc validate`` compares it with the gated checkpoint (the
    checkpoint's cache cut to the kept heads) and measures it against the unpruned one."""
    plan = json.loads((exported("plan") / "manifest.json").read_text())["shrink"]["prune_heads"]
    keep = {l["index"]: l["kept"] for l in plan["layers"]}
    assert [len(k) for k in keep.values()] == [2, 2] and plan["params_after"] < plan["params_before"]

    result = run("compile", exported("gqa_llama"), "-o", tmp_path / "step", "--prune-keep", exported("plan"))
    assert "head pruning: parameters" in result.output
    manifest = json.loads((tmp_path / "step" / "manifest.json").read_text())
    pruned = manifest["shrink"]["prune_heads"]
    assert {l["index"]: l["kept"] for l in pruned["layers"]} == keep
    assert (pruned["params_before"], pruned["params_after"]) == (plan["params_before"], plan["params_after"])
    shapes = {s["name"]: s["shape"] for s in manifest["inputs"] + manifest["outputs"]}
    assert shapes["past_key_values.1.value"] == ["batch", 1, "past", 8]
    assert shapes["present.0.key"] == ["batch", 1, "past + seq", 8]
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    _check_against_masked_torch(runtime.load(tmp_path / "step"), gqa_llama, keep, {0: 1, 1: 1})

    run("validate", tmp_path / "step", "--model", gqa_llama)
    report = json.loads((tmp_path / "step" / "report.json").read_text())
    assert [o["name"] for o in report["outputs"]] == ["logits"] + [f"present.{i}.{kv}" for i in (0, 1)
                                                                   for kv in ("key", "value")]
    assert report["meta"]["inputs"]["past_key_values.0.key"]["shape"] == [2, 2, 5, 8]   # the checkpoint's cache
    assert "kept heads of the checkpoint's" in report["meta"]["input_source"]
    assert "gated to zero" in report["meta"]["reference"]
    assert report["meta"]["compile"]["prune_heads"]["heads_after"] == 4
    cost = {row["name"]: row for row in report["shrink_cost"]}
    assert cost["logits"]["max_abs_error"] > 1e-3 and cost["logits"]["top1_agreement"] is not None
    assert cost["present.0.key"]["max_abs_error"] < 1e-6 and cost["present.0.key"]["top1_agreement"] is None

    # Against the unpruned checkpoint: layer 0's new cache, which pruning leaves as it is, passes; the rest not.
    result = run("validate", tmp_path / "step", "--model", gqa_llama, "--reference", "original", ok=False)
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "step" / "report.json").read_text())
    passed = {o["name"]: o["passed"] for o in report["outputs"]}
    assert passed == {"logits": False, "present.0.key": True, "present.0.value": True, "present.1.key": False,
                      "present.1.value": False}


@pytest.mark.parametrize("checkpoint,keep,granularity", [
    ("gpt2", {0: [0, 2], 1: [3]}, None),             # multi-head: the layers' caches keep 2 and 1 heads
    ("gqa_llama", {0: [1, 2], 1: [0, 3]}, "query"),  # query heads inside the groups: the caches keep both K/V heads
])
def test_step_pruned_by_an_explicit_keep(checkpoint, keep, granularity, request, exported, tmp_path):
    """A TorchScript step pruned by a JSON plan (``apply_keep``) or ``prune_heads(keep=...)``, compiled (fused after
    pruning) and run against the gated torch model; GPT-2's layers keep caches of different head counts, each
    built empty from its input's declared heads."""
    step = onnx.load(str(exported(checkpoint)))
    if granularity:
        pruned, report = prune_heads(step, keep=keep, granularity=granularity)
    else:
        (tmp_path / "keep.json").write_text(json.dumps(keep))
        pruned, report = apply_keep(step, tmp_path / "keep.json")
    assert {l.index: l.kept for l in report.layers} == keep
    kept_kv = {0: [0, 2], 1: [3]} if checkpoint == "gpt2" else {0: [0, 1], 1: [0, 1]}
    assert {l.index: l.cache[f"past_key_values.{l.index}.value"]["kept"] for l in report.layers} == kept_kv
    onnx.save(pruned, str(tmp_path / "pruned.onnx"))
    manifest = compile_model(tmp_path / "pruned.onnx", tmp_path / "out", CompileOptions())
    assert manifest["ops_after"].get("Attention") == 2 and "Softmax" not in manifest["ops_after"]
    _check_against_masked_torch(runtime.load(tmp_path / "out"), request.getfixturevalue(checkpoint), keep,
                                {i: len(k) for i, k in kept_kv.items()})


def test_keep_plan_refusals(exported, tmp_path):
    """Plans that do not fit the step, and scores on a random cache, are refused with the reason."""
    step = exported("gqa_llama")
    compile_step = lambda *args: run("compile", step, "-o", tmp_path / "out", *args, ok=False)  # noqa: E731
    # random calibration would rank heads by a random cache; a count and a plan at once
    assert_clean_error(compile_step("--prune-heads", "0.5"), "extends the cache input 'past_key_values.0.key'",
                       "--prune-keep")
    assert_clean_error(compile_step("--prune-heads", "0.5", "--prune-keep", exported("plan")), "both choose")
    # another model's plan (a report whose layer 0 has another output projection)
    plan = json.loads((exported("plan") / "manifest.json").read_text())["shrink"]["prune_heads"]
    (tmp_path / "other.json").write_text(json.dumps(dict(plan, layers=[dict(plan["layers"][0], fingerprint="0" * 16),
                                                                        plan["layers"][1]])))
    assert_clean_error(compile_step("--prune-keep", tmp_path / "other.json"),
                       "layer 0 of", "matches no attention layer of this model")
    # a manifest without fingerprints (older attnc) of another layer count
    manifest = json.loads((exported("plan") / "manifest.json").read_text())
    layers = manifest["shrink"]["prune_heads"]["layers"]
    layers.append(dict(layers[-1], index=2))
    for layer in layers:
        del layer["fingerprint"]
    (tmp_path / "old.json").write_text(json.dumps(manifest))
    assert_clean_error(compile_step("--prune-keep", tmp_path / "old.json"), "3 attention layers of [4, 4, 4] heads",
                       "another model's plan")
    # heads that split a K/V group (a bare plan: its granularity read from the heads), an artefact not pruned
    (tmp_path / "split.json").write_text(json.dumps({"0": [0, 2, 3]}))
    assert_clean_error(compile_step("--prune-keep", tmp_path / "split.json"), "granularity='query'")
    (tmp_path / "unpruned.json").write_text(json.dumps({"schema": "attnc.manifest/1", "shrink": {}}))
    assert_clean_error(compile_step("--prune-keep", tmp_path / "unpruned.json"), "records no head pruning")
    assert not (tmp_path / "out").exists()
