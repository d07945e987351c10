"""Shrink passes measured on small real tasks: head pruning (digits ViT, digits Llama) and visual-token exit (VQA VLM).

    python benchmarks/bench_shrink.py [--reps 200] [--threads 1] [--out benchmarks/results]
                                      [--skip SECTION] [--only SECTION] [--smoke]
                                      [--tag NAME]

Sections: ``prune`` trains two digits ViTs (4 x 4 and 6 x 8 heads); ``exit`` four VQA VLMs (16 and
64 visual tokens, plain and exit-aware), together about 9 minutes on a shared 2-core CPU; ``llama``
(about 11 minutes) a transformers ``LlamaForCausalLM`` (RoPE, 8 query heads on 4 K/V heads) on the
digits as 65-token sequences, pruned by whole K/V groups (25 % and 50 % of the query heads) and by
query heads inside the groups (``granularity="query"``: the same ratios, and the ratio whose attention
FLOPs match the groups' 50 %); ``llava`` (about 2 minutes) a transformers LLaVA checkpoint of LLaVA-1.5's token
proportions (576 visual + 32 text tokens, 8 decoder layers, random weights) compiled with static token exit before
several layers, each exit validated against the checkpoint exiting in PyTorch, latencies side by side;
``llava_decode`` (about 2.5 minutes) the same checkpoint answering: its two generation graphs (the image after 5 text
tokens) compiled as they are and with each exit, validated, their greedy tokens checked against a loop over the
exited forward without a cache, the prompt's KV cache size and the first and later steps' latencies; ``qwen``
a transformers Qwen2-VL checkpoint exported at a 448-pixel square (256 visual + 32 text tokens, 8 decoder layers,
random weights), exited and validated as ``llava`` is; ``llava_next`` a transformers LLaVA-NeXT checkpoint exported at
a 448-pixel square in 224-pixel tiles (1312 visual + 32 text tokens, 8 decoder layers, random weights), alike;
``gemma3`` a transformers Gemma 3 checkpoint (256 visual tokens attending to each other both ways + 32 text tokens,
8 decoder layers, random weights), alike; ``llava_images`` ``llava``'s checkpoint with two images per prompt (after 5
and 9 text tokens: 1152 visual + 32 text tokens), alike; ``onevision_video`` a transformers LLaVA-OneVision checkpoint
reading a clip of 8 frames of 384 pixels (``--video-frames 8``: 8 × 196 pooled tokens and a newline, 1569 visual + 32
text tokens, 8 decoder layers, random weights), alike; ``qwen_video`` ``qwen``'s checkpoint on a clip of 16 frames of
336 × 448 pixels (8 slices of 12 × 16 blocks: 1536 visual + 32 text tokens), alike. The passes
are applied (pruning: weight, activation, gradient and ablation scores, one-shot and iterative, with and without a
short fine-tune) and the tables printed: accuracy, parameters, attention FLOPs and ONNX Runtime CPU latency
before/after. Latencies of a "before" and its "after" are measured side by
side (runs interleaved round-robin in the same process, median of ``--reps``). Raw numbers go to
``<out>/shrink-<date>.json`` with the machine description (a run of some sections only:
``shrink-<sections>-<date>.json``, e.g. ``shrink-llama-<date>.json``; ``--tag granularity``:
``shrink-llama-granularity-<date>.json``, to keep an earlier run of the same day). ``--smoke`` runs the
``llama`` and LLaVA sections at toy sizes (about a minute and 20-40 s; their numbers mean nothing).

Issue #6 targets: 25 % of heads pruned keeps accuracy within 1 point and cuts attention
FLOPs by >= 20 %; token exit cuts VLM latency by >= 30 % with accuracy within 1 point.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

from attnc.compiler.export import export_onnx
from attnc.models.train import accuracy, fit, train_digits_vit, train_vqa_vlm
from attnc.passes.prune_heads import (find_attention_layers, gates_from_keep, head_gates, prune_heads,
                                      score_heads, select_heads, select_heads_iteratively)
from attnc.passes.token_exit import (apply_dynamic_token_exit, apply_static_token_exit, choose_exit_layer,
                                     train_exit_gate)


def session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def side_by_side(models: dict[str, onnx.ModelProto], feeds: dict, reps: int, threads: int,
                 own_feeds: dict[str, dict] | None = None) -> dict[str, float]:
    """Median latency (ms) of each model, runs interleaved round-robin so load hits all equally; on ``feeds``, or on
    ``own_feeds[name]`` where given (generation steps whose caches differ in length)."""
    sessions = {k: session(m, threads) for k, m in models.items()}
    inputs = {k: (own_feeds or {}).get(k, feeds) for k in sessions}
    for k, s in sessions.items():
        for _ in range(5):
            s.run(None, inputs[k])
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, inputs[k])
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def onnx_accuracy(model, feeds: dict, labels: np.ndarray, threads: int) -> float:
    return float((session(model, threads).run(None, feeds)[0].argmax(-1) == labels).mean())


def export(model, inputs, path, names, dynamic_axes) -> onnx.ModelProto:
    export_onnx(model, inputs, path, input_names=names, dynamic_axes=dynamic_axes)
    return onnx.load(str(path))


# Digits ViTs: the 4 x 4-head model of the first measurement (almost no redundant heads), and
# one with 8 heads per layer, where 25 % means two heads of every layer on average.
PRUNE_MODELS = {
    "tiny": {"size": {"dim": 32, "depth": 4, "num_heads": 4}, "epochs": 12, "lr": 4e-3},
    "base": {"size": {"dim": 64, "depth": 6, "num_heads": 8}, "epochs": 30, "lr": 1e-3},
}


def bench_pruning(tmp: Path, reps: int, threads: int, name: str) -> dict:
    config = PRUNE_MODELS[name]
    t0 = time.perf_counter()
    model, train, test = train_digits_vit(epochs=config["epochs"], lr=config["lr"], **config["size"])
    train_s = time.perf_counter() - t0
    axes = {"image": {0: "batch"}}
    base = export(model, train.inputs[0][:4], tmp / f"digits-{name}.onnx", ["image"], axes)
    test_feeds = {"image": test.inputs[0].numpy()}
    labels = test.labels.numpy()
    acc_before = onnx_accuracy(base, test_feeds, labels, threads)
    calibration = [{"image": train.inputs[0][i:i + 128].numpy(), "labels": train.labels[i:i + 128].numpy()}
                   for i in range(0, 512, 128)]
    loss = lambda out, feeds: torch.nn.functional.cross_entropy(out, torch.from_numpy(feeds["labels"]))  # noqa: E731
    heads = {l.index: l.heads for l in find_attention_layers(base)}
    # Short fine-tune: 2 epochs at a quarter of the training peak learning rate. The same
    # fine-tune of the unpruned model is the control (what the recipe alone does).
    finetune_lr = config["lr"] / 4
    control = copy.deepcopy(model)
    fit(control, train, 2, lr=finetune_lr)
    acc_control = onnx_accuracy(export(control, train.inputs[0][:4], tmp / f"control-{name}.onnx", ["image"], axes),
                                test_feeds, labels, threads)
    rows = []
    for method, selection in [("weight", "one-shot"), ("activation", "one-shot"), ("activation", "iterative"),
                              ("gradient", "one-shot"), ("gradient", "iterative"), ("ablation", "one-shot"),
                              ("ablation", "iterative")]:
        t = time.perf_counter()
        if selection == "iterative":
            keep = select_heads_iteratively(base, calibration, ratio=0.25, step=1, method=method,
                                            torch_model=model, loss_fn=loss)
        else:
            scores = score_heads(base, calibration, method=method, torch_model=model, loss_fn=loss)
            keep = select_heads(heads, scores, ratio=0.25, normalise=method != "ablation")
        select_s = time.perf_counter() - t
        pruned, report = prune_heads(base, keep=keep)
        acc_pruned = onnx_accuracy(pruned, test_feeds, labels, threads)
        tuned = copy.deepcopy(model)
        with head_gates(tuned, gates_from_keep(keep, heads)):
            fit(tuned, train, 2, lr=finetune_lr)
        recovered, _ = prune_heads(export(tuned, train.inputs[0][:4], tmp / f"tuned-{name}-{method}-{selection}.onnx",
                                          ["image"], axes), keep=keep)
        acc_recovered = onnx_accuracy(recovered, test_feeds, labels, threads)
        if method == "gradient" and selection == "iterative":
            timed = pruned
        rows.append({
            "method": method, "selection": selection, "select_seconds": select_s,
            "keep": {str(k): v for k, v in keep.items()},
            "heads_before": report.heads_before, "heads_after": report.heads_after,
            "accuracy_before": acc_before, "accuracy_after": acc_pruned, "accuracy_after_finetune": acc_recovered,
            "params_before": report.params_before, "params_after": report.params_after,
            "attention_flops_before": report.attention_flops_before,
            "attention_flops_after": report.attention_flops_after, "report": report.to_dict(),
        })
    # Latency depends little on which heads go (every layer has the same width): measured
    # once, for the gradient-iterative pruned model.
    latency = {}
    for batch in (1, 64):
        feeds = {"image": test.inputs[0][:batch].numpy()}
        latency[batch] = side_by_side({"before": base, "after": timed}, feeds, reps, threads)
    size = config["size"]
    return {"name": name, "task": "digits (sklearn, 8x8, 10 classes; 1348 train / 449 test)",
            "model": f"VisionTransformer(img 8, patch 2, 1 channel, dim {size['dim']}, depth {size['depth']}, "
                     f"heads {size['num_heads']}, mhsa)",
            "train": f"{config['epochs']} epochs, lr {config['lr']}", "train_seconds": train_s, "prune_ratio": 0.25,
            "finetune": f"2 epochs, lr {finetune_lr:g}, pruned heads masked", "accuracy_unpruned_finetune": acc_control,
            "iterative_step": 1,
            "latency_ms": {str(b): v for b, v in latency.items()}, "latency_of": "gradient, iterative", "rows": rows}


# TinyVLMs on the generated VQA task: the first measurement's (16 visual + 3 text tokens, the
# decoder no wider than the vision tokens' share), and one closer to LLaVA's proportions (far
# more visual than text tokens: 64 + 3, a wider decoder that dominates the cost).
VLM_CONFIGS = {
    "tiny": {"size": {}, "n_train": 8000, "epochs": 6},
    "base": {"size": {"img_size": 64, "dim": 64, "depth": 4}, "n_train": 4000, "epochs": 6},
}


def bench_token_exit(tmp: Path, reps: int, threads: int, name: str, exit_aware: bool) -> dict:
    config = VLM_CONFIGS[name]
    t0 = time.perf_counter()
    model, train, test = train_vqa_vlm(n_train=config["n_train"], epochs=config["epochs"], exit_aware=exit_aware,
                                       **config["size"])
    train_s = time.perf_counter() - t0
    names = ["image", "text_ids"]
    axes = {"image": {0: "batch"}, "text_ids": {0: "batch", 1: "text_len"}}
    base = export(model, (train.inputs[0][:2], train.inputs[1][:2]), tmp / f"vlm-{name}-{exit_aware}.onnx", names, axes)
    p = model.num_visual_tokens
    calib_n = 512
    calibration = [{"image": train.inputs[0][i:i + 128].numpy(), "text_ids": train.inputs[1][i:i + 128].numpy()}
                   for i in range(0, calib_n, 128)]
    labels = [train.labels[i:i + 128].numpy() for i in range(0, calib_n, 128)]
    choice = choose_exit_layer(base, calibration, p, labels=labels, max_accuracy_drop=0.01)
    static, _ = apply_static_token_exit(base, choice.exit_layer, p)
    test_feeds = {"image": test.inputs[0].numpy(), "text_ids": test.inputs[1].numpy()}
    truth = test.labels.numpy()
    acc_full = onnx_accuracy(base, test_feeds, truth, threads)
    acc_static = onnx_accuracy(static, test_feeds, truth, threads)
    # Dynamic: a gate at the earliest decoder layer, 99 % precision on the calibration set.
    gate_layer = 1
    gate, gate_stats = train_exit_gate(model, tuple(x[:calib_n] for x in train.inputs), gate_layer,
                                       min_precision=0.99)
    dynamic, _ = apply_dynamic_token_exit(base, gate, p)
    # Batch 1 over the whole test set: each sample takes its own branch, so the dynamic model's
    # expected latency is this mean (the fixed-input medians below time one sample's branch).
    n_dyn = len(test)
    sessions = {"full": session(base, threads), "static": session(static, threads),
                "dynamic": session(dynamic, threads)}
    for s in sessions.values():
        for _ in range(5):
            s.run(None, {k: v[:1] for k, v in test_feeds.items()})
    per_sample = {k: [] for k in sessions}
    correct = 0
    for i in range(n_dyn):
        feeds = {k: v[i:i + 1] for k, v in test_feeds.items()}
        outputs = {}
        for k, s in sessions.items():
            t = time.perf_counter()
            outputs[k] = s.run(None, feeds)[0]
            per_sample[k].append(time.perf_counter() - t)
        correct += int(outputs["dynamic"].argmax(-1)[0] == truth[i])
    with torch.no_grad():
        from attnc.passes.token_exit import gate_features
        fire_rate = float(gate.fires(gate_features(model, test.inputs[0][:n_dyn], test.inputs[1][:n_dyn],
                                                   gate_layer).numpy()).mean())
    latency = {}
    for batch in (1, 32):
        feeds = {k: v[:batch] for k, v in test_feeds.items()}
        latency[batch] = side_by_side({"full": base, "static": static, "dynamic": dynamic}, feeds, reps, threads)
    size = {"img_size": 32, "dim": 32, "depth": 4, **config["size"]}
    return {"name": name, "task": f"generated VQA: 4 objects (square/cross x 4 colours) per {size['img_size']} px "
                                  f"image, questions [BOS, colour|shape, quadrant]; {config['n_train']} train / "
                                  f"{len(test)} test, {config['epochs']} epochs",
            "model": f"TinyVLM(img {size['img_size']}, patch 8 -> {p} visual tokens, vision dim 32 x1, "
                     f"decoder dim {size['dim']} x{size['depth']}, heads 4)",
            "exit_aware_training": exit_aware, "train_seconds": train_s, "text_tokens": 3, "visual_tokens": p,
            "torch_accuracy_by_exit_layer": {str(k): accuracy(model, test, exit_layer=k)
                                             for k in range(len(model.layers) + 1)},
            "choice": {"exit_layer": choice.exit_layer, "criterion": choice.criterion, "table": choice.table},
            "accuracy_full": acc_full, "accuracy_static": acc_static,
            "dynamic": {"gate": gate_stats, "accuracy_batch1": correct / n_dyn, "fire_rate_test": fire_rate,
                        "samples": n_dyn},
            "latency_b1_test_mean_ms": {k: float(np.mean(v) * 1e3) for k, v in per_sample.items()},
            "latency_ms": {str(b): v for b, v in latency.items()}}


# A Llama-style decoder (transformers' LlamaForCausalLM: RoPE, RMSNorm, SwiGLU, grouped-query
# attention) on the digits as a token sequence: the 64 pixels (0..16, already integers in
# scikit-learn's data) in raster order, then a query token; the class is read from the LM head's
# logits of the ten class tokens at the last position. 8 query heads on 4 K/V heads: pruning goes
# by whole K/V groups of 2 query heads, or (granularity="query") by one query head of every group.
LLAMA_PIXEL_LEVELS = 17
LLAMA_QUERY = LLAMA_PIXEL_LEVELS
LLAMA_CLASSES = slice(LLAMA_QUERY + 1, LLAMA_QUERY + 11)
LLAMA_CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4, "epochs": 20, "lr": 3e-3}
LLAMA_SMOKE = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "epochs": 1, "lr": 3e-3}


class DigitsLlama(torch.nn.Module):
    """``ids [B, 65] -> class logits [B, 10]``: a causal LM's logits of the class tokens at the last position."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids).logits[:, -1, LLAMA_CLASSES]


def digit_tokens(split):
    """Digits images ``[N, 1, 8, 8]`` in [0, 1] as ``[N, 65]`` token ids: 64 pixel levels, then the query token."""
    from attnc.models.train import Split

    pixels = (split.inputs[0][:, 0] * (LLAMA_PIXEL_LEVELS - 1)).round().long().reshape(len(split), 64)
    return Split((torch.cat([pixels, torch.full((len(split), 1), LLAMA_QUERY)], 1),), split.labels)


def train_digits_llama(config: dict, seed: int = 0):
    """Train :class:`DigitsLlama` on the digits token sequences; returns ``(model, train, test)``."""
    import transformers

    from attnc.models.train import digits_data

    size = {k: v for k, v in config.items() if k not in ("epochs", "lr")}
    lm_config = transformers.LlamaConfig(vocab_size=LLAMA_QUERY + 11, max_position_embeddings=1024, **size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train, test = (digit_tokens(s) for s in digits_data(seed=seed))
        model = DigitsLlama(transformers.LlamaForCausalLM(lm_config))
        model.lm.set_attn_implementation("sdpa")    # same numbers, faster training
        fit(model, train, config["epochs"], lr=config["lr"], seed=seed)
    # Eager attention exports the decomposed MatMul -> Softmax -> MatMul core the pass reads.
    model.lm.set_attn_implementation("eager")
    return model.eval(), train, test


def llama_attention_counts(model: DigitsLlama, keep: dict[int, list[int]], tokens: int) -> tuple[int, int]:
    """Attention parameters and FLOPs (projections + dense core) counted from the torch modules'
    shapes, with each layer's kept query heads ``keep`` and the K/V heads they read (``repeat_kv``:
    query head ``j`` reads K/V head ``j // g``), whole groups or query heads inside the groups."""
    params = flops = 0
    for i, layer in enumerate(model.lm.model.layers):
        attn = layer.self_attn
        heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
        kept = keep.get(i, range(heads))
        h, h_kv = len(kept), len({j // (heads // kv_heads) for j in kept})
        c, d = attn.q_proj.in_features, attn.head_dim
        p = c * d * (2 * h + 2 * h_kv)
        params += p
        flops += 2 * tokens * p + 2 * tokens * tokens * h * 2 * d
    return params, flops


def bench_llama(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    config = LLAMA_SMOKE if smoke else LLAMA_CONFIG
    t0 = time.perf_counter()
    model, train, test = train_digits_llama(config)
    train_s = time.perf_counter() - t0
    tokens = train.inputs[0].shape[1]
    axes = {"ids": {0: "batch", 1: "seq"}}
    base = export(model, train.inputs[0][:2], tmp / "digits-llama.onnx", ["ids"], axes)
    test_feeds = {"ids": test.inputs[0].numpy()}
    labels = test.labels.numpy()
    acc_before = onnx_accuracy(base, test_feeds, labels, threads)
    calib_n, calib_b = (64, 32) if smoke else (256, 128)
    calibration = [{"ids": train.inputs[0][i:i + calib_b].numpy(), "labels": train.labels[i:i + calib_b].numpy()}
                   for i in range(0, calib_n, calib_b)]
    loss = lambda out, feeds: torch.nn.functional.cross_entropy(out, torch.from_numpy(feeds["labels"]))  # noqa: E731
    layers = find_attention_layers(base)
    heads = {l.index: l.heads for l in layers}
    groups = {l.index: l.kv_of_head for l in layers if l.kv_of_head is not None}
    if len(groups) != len(layers):
        raise RuntimeError(f"grouped-query attention not found in {len(layers) - len(groups)} of {len(layers)} layers")
    finetune_lr = config["lr"] / 4
    finetune_epochs = 1 if smoke else 2
    control = copy.deepcopy(model)
    fit(control, train, finetune_epochs, lr=finetune_lr)
    acc_control = onnx_accuracy(export(control, train.inputs[0][:2], tmp / "control-llama.onnx", ["ids"], axes),
                                test_feeds, labels, threads)
    params_torch, flops_torch = llama_attention_counts(model, {}, tokens)
    one_shot = [("activation", "one-shot"), ("gradient", "one-shot"), ("ablation", "one-shot")]
    selections = one_shot + ([("activation", "iterative")] if smoke else
                             [("activation", "iterative"), ("ablation", "iterative")])
    # Whole K/V groups at 25 % and 50 % of the query heads; query heads inside the groups at the
    # same ratios (fewer FLOPs go: the K/V projections stay). With groups of 2 query heads, 50 %
    # is the most query granularity can remove, so no ratio of it matches the groups' FLOPs.
    settings = [(g, r, selections) for g in ("group", "query") for r in (0.25, 0.5)]
    check_ids = test.inputs[0][:64]
    rows, timed = [], {}
    for granularity, ratio, setting_selections in settings:
        for method, selection in setting_selections:
            t = time.perf_counter()
            if selection == "iterative":
                # step 1 rounds up to one unit per round: a K/V group (2 query heads), or with
                # granularity="query" one query head in every K/V group of a layer.
                keep = select_heads_iteratively(base, calibration, ratio=ratio, step=1, method=method,
                                                torch_model=model, loss_fn=loss, granularity=granularity)
            else:
                scores = score_heads(base, calibration, method=method, torch_model=model, loss_fn=loss,
                                     granularity=granularity)
                keep = select_heads(heads, scores, ratio=ratio, normalise=method != "ablation", groups=groups,
                                    granularity=granularity)
            select_s = time.perf_counter() - t
            pruned, report = prune_heads(base, keep=keep, tokens=tokens, granularity=granularity)
            acc_pruned = onnx_accuracy(pruned, test_feeds, labels, threads)
            # The gates act on o_proj's input, one slice per query head, so gating the dropped
            # query heads is the torch counterpart of either granularity (a dropped group is all
            # of its query heads; under "query" the K/V heads stay and keep their gradients).
            tuned = copy.deepcopy(model)
            gates = gates_from_keep(keep, heads)
            with head_gates(tuned, gates):
                fit(tuned, train, finetune_epochs, lr=finetune_lr)
            path = tmp / f"tuned-llama-{granularity}-{ratio}-{method}-{selection}.onnx"
            recovered, _ = prune_heads(export(tuned, train.inputs[0][:2], path, ["ids"], axes), keep=keep,
                                       granularity=granularity)
            with torch.no_grad(), head_gates(tuned, gates):
                masked = tuned(check_ids).numpy()
            recovered_error = float(np.abs(session(recovered, threads).run(None, {"ids": check_ids.numpy()})[0]
                                           - masked).max())
            if recovered_error > 1e-4:
                raise RuntimeError(f"{granularity} {ratio:g} {method} {selection}: the pruned fine-tuned ONNX model "
                                   f"differs from the masked torch model by {recovered_error:.2e}")
            acc_recovered = onnx_accuracy(recovered, test_feeds, labels, threads)
            if (method, selection) == ("ablation", "one-shot"):
                timed[f"{granularity} {100 * ratio:g}%"] = pruned
            params_after_torch, flops_after_torch = llama_attention_counts(model, keep, tokens)
            attention_params = (sum(l.params_before for l in report.layers), sum(l.params_after for l in report.layers))
            flops = (report.attention_flops_before, report.attention_flops_after)
            if attention_params != (params_torch, params_after_torch) or flops != (flops_torch, flops_after_torch):
                raise RuntimeError(f"prune report {attention_params}, {report.attention_flops_before} -> "
                                   f"{report.attention_flops_after} FLOPs disagrees with the torch module's count "
                                   f"{params_torch} -> {params_after_torch}, {flops_torch} -> {flops_after_torch}")
            rows.append({
                "granularity": granularity, "ratio": ratio, "method": method, "selection": selection,
                "select_seconds": select_s, "keep": {str(k): v for k, v in keep.items()},
                "heads_before": report.heads_before, "heads_after": report.heads_after,
                "kv_heads_before": sum(l.kv_heads_before for l in report.layers),
                "kv_heads_after": sum(l.kv_heads_after for l in report.layers),
                "accuracy_before": acc_before, "accuracy_after": acc_pruned, "accuracy_after_finetune": acc_recovered,
                "finetuned_onnx_vs_masked_torch": recovered_error,
                "params_before": report.params_before, "params_after": report.params_after,
                "attention_params_before": attention_params[0], "attention_params_after": attention_params[1],
                "attention_flops_before": report.attention_flops_before,
                "attention_flops_after": report.attention_flops_after, "report": report.to_dict(),
            })
    # Latency: unpruned and every pruned model (ablation one-shot selections) in one interleaved
    # loop, at the task's length (64 pixels + query) and at a longer prompt-like length.
    shapes = [(1, tokens), (32, tokens), (1, 512)] if not smoke else [(1, tokens), (4, tokens)]
    latency = {}
    gen = torch.Generator().manual_seed(0)
    for batch, seq in shapes:
        ids = (test.inputs[0][:batch] if seq == tokens
               else torch.randint(0, LLAMA_QUERY + 1, (batch, seq), generator=gen))
        latency[f"b{batch}-s{seq}"] = side_by_side({"before": base, **timed}, {"ids": ids.numpy()}, reps, threads)
    size = {k: v for k, v in config.items() if k not in ("epochs", "lr")}
    return {"task": f"digits (sklearn, 8x8, 10 classes; {len(train)} train / {len(test)} test) as {tokens} tokens: "
                    f"64 pixel levels 0..16 in raster order + a query token; class = LM logits of 10 class tokens "
                    f"at the last position",
            "model": f"transformers LlamaForCausalLM(vocab {LLAMA_QUERY + 11}, hidden {size['hidden_size']}, "
                     f"MLP {size['intermediate_size']}, {size['num_hidden_layers']} layers, "
                     f"{size['num_attention_heads']} query / {size['num_key_value_heads']} K/V heads, RoPE, eager "
                     f"attention for export)",
            "train": f"{config['epochs']} epochs, lr {config['lr']}, AdamW one-cycle, batch 64",
            "train_seconds": train_s,
            "tokens": tokens, "calibration": f"{calib_n} training sequences",
            "finetune": f"{finetune_epochs} epochs, lr {finetune_lr:g}, pruned heads masked",
            "accuracy_unpruned_finetune": acc_control,
            "selection": "global over layers; granularity group: whole K/V groups, query: one query head in every "
                         "K/V group of a layer per unit (rank slices)",
            "counts_checked_against_torch": True,
            "latency_ms": latency, "latency_of": "ablation, one-shot", "rows": rows}


# A LLaVA checkpoint of LLaVA-1.5's proportions in tokens (336 px images in 14 px patches: 576 visual tokens, in
# front of 32 text tokens) at a small width: what visual-token exit costs and saves where the image dominates.
LLAVA = {"image": 336, "patch": 14, "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                               "num_attention_heads": 2},
         "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 1024},
         "text_tokens": 32, "exit_layers": (1, 2, 4, 6), "before": 5, "generate": 16}
LLAVA_SMOKE = {**LLAVA, "image": 56, "text": {**LLAVA["text"], "hidden_size": 64, "intermediate_size": 128,
                                              "num_hidden_layers": 3, "num_attention_heads": 4,
                                              "num_key_value_heads": 2},
               "text_tokens": 8, "exit_layers": (1, 2), "decode_exit_layers": (2,), "before": 2, "generate": 3}


def llava_checkpoint(folder: Path, c: dict) -> Path:
    """A seeded LLaVA checkpoint of config ``c`` (:data:`LLAVA`), saved in ``folder``; a LLaVA-NeXT one where ``c``
    has grid pinpoints (:data:`LLAVA_NEXT`: ``c["image"]`` is then its tiles' size)."""
    import transformers

    from attnc.testing import save_seeded

    vision = transformers.CLIPVisionConfig(**c["vision"], image_size=c["image"], patch_size=c["patch"])
    parts = dict(vision_config=vision, text_config=transformers.LlamaConfig(**c["text"]),
                 image_token_index=c["text"]["vocab_size"] - 1)
    if "pinpoints" in c:
        config = transformers.LlavaNextConfig(**parts, image_grid_pinpoints=c["pinpoints"])
        return save_seeded(config, "LlavaNextForConditionalGeneration", folder)
    return save_seeded(transformers.LlavaConfig(**parts), "LlavaForConditionalGeneration", folder)


def bench_llava(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """A transformers LLaVA checkpoint (random weights, :data:`LLAVA`) through the CLI's path: ``attnc export``'s
    module, ``compile_model`` without and with ``--token-exit static`` before several layers, ``validate_artefact``
    of each exit against the checkpoint exiting in PyTorch, and ONNX Runtime latency side by side."""
    from attnc.models.hf_checkpoint import load_checkpoint

    c = LLAVA_SMOKE if smoke else LLAVA
    module, spec = load_checkpoint(str(llava_checkpoint(tmp / "llava", c)))
    return {"model": f"LlavaForConditionalGeneration (CLIP {c['vision']}, Llama {c['text']})",
            **_exits(tmp, tmp / "llava", module, spec, c, reps, threads), "smoke": smoke}


def bench_llava_images(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """:func:`bench_llava`'s checkpoint with two images per prompt, after ``c["before"]`` and 4 more text tokens
    (``attnc export --text-before-image 5,9``)."""
    from attnc.models.hf_checkpoint import load_checkpoint, with_text_before_image

    c = LLAVA_SMOKE if smoke else LLAVA
    offsets = (c["before"], c["before"] + 4)
    folder = llava_checkpoint(tmp / "llava_images", c)
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), offsets)
    return {"model": f"LlavaForConditionalGeneration (CLIP {c['vision']}, Llama {c['text']}), two images after "
                     f"{offsets[0]} and {offsets[1]} text tokens",
            **_exits(tmp, folder, module, spec, c, reps, threads), "smoke": smoke}


# LLaVA-OneVision reading a video at its proportions, scaled: 8 frames of 384 pixels in 14-pixel patches (27 × 27
# features a frame, pooled bilinearly to 14 × 14 = 196 tokens) and one newline token: 1569 visual tokens after 5 text
# tokens, in front of 32 text tokens, a SigLIP tower and a Qwen2 text model at LLAVA's widths.
ONEVISION_VIDEO = {**LLAVA, "image": 384, "frames": 8}
ONEVISION_VIDEO_SMOKE = {**LLAVA_SMOKE, "image": 56, "frames": 2}


def bench_onevision_video(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """A transformers LLaVA-OneVision checkpoint (random weights, :data:`ONEVISION_VIDEO`) exported on a clip of
    ``c["frames"]`` frames after ``c["before"]`` text tokens (``--video-frames``), then as :func:`bench_llava`."""
    import transformers

    from attnc.models.hf_checkpoint import load_checkpoint, with_text_before_image, with_video_frames
    from attnc.testing import save_seeded

    c = ONEVISION_VIDEO_SMOKE if smoke else ONEVISION_VIDEO
    vocab, side = c["text"]["vocab_size"], c["image"]
    config = transformers.LlavaOnevisionConfig(
        vision_config=transformers.SiglipVisionConfig(**c["vision"], image_size=side, patch_size=c["patch"]),
        text_config=transformers.Qwen2Config(**c["text"]), image_token_index=vocab - 2, video_token_index=vocab - 1,
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]])   # its images' tiles
    folder = save_seeded(config, "LlavaOnevisionForConditionalGeneration", tmp / "onevision_video")
    module, spec = with_text_before_image(*with_video_frames(*load_checkpoint(str(folder)), c["frames"]), c["before"])
    return {"model": f"LlavaOnevisionForConditionalGeneration on {c['frames']} frames of {c['image']} px (SigLIP "
                     f"{c['vision']}, Qwen2 {c['text']}) after {c['before']} text tokens",
            **_exits(tmp, folder, module, spec, c, reps, threads), "frames": c["frames"], "smoke": smoke}


# Qwen2-VL at a 448-pixel square (its processor's tiles: 32 × 32 patches of 14 pixels merged 2 × 2, 256 visual tokens)
# in front of 32 text tokens, at a small width: the exits where visual tokens follow the image's size.
QWEN = {"image": 448, "vision": {"depth": 2, "embed_dim": 64, "num_heads": 2, "mlp_ratio": 2},
        "text": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                 "num_key_value_heads": 4, "vocab_size": 1000, "max_position_embeddings": 2048},
        "mrope_section": [4, 6, 6], "text_tokens": 32, "exit_layers": (1, 2, 4, 6)}
QWEN_SMOKE = {**QWEN, "image": 56, "text": {**QWEN["text"], "hidden_size": 64, "intermediate_size": 128,
                                            "num_hidden_layers": 3, "num_attention_heads": 4,
                                            "num_key_value_heads": 2},
              "mrope_section": [2, 3, 3], "text_tokens": 8, "exit_layers": (1, 2)}


def qwen_checkpoint(folder: Path, c: dict) -> Path:
    """A transformers Qwen2-VL checkpoint of config ``c`` (random weights) saved in ``folder``."""
    import transformers

    from attnc.testing import save_seeded

    text = {**c["text"], "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                             "mrope_section": c["mrope_section"]}}
    vocab = c["text"]["vocab_size"]
    config = transformers.Qwen2VLConfig(
        text_config=text, vision_config={**c["vision"], "hidden_size": c["text"]["hidden_size"]},
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1, architectures=["Qwen2VLForConditionalGeneration"])
    return save_seeded(config, "Qwen2VLForConditionalGeneration", folder)


def bench_qwen(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """A transformers Qwen2-VL checkpoint (random weights, :data:`QWEN`) exported at its image size
    (``--image-size``), then as :func:`bench_llava`."""
    from attnc.models.hf_checkpoint import load_checkpoint, with_image_size

    c = QWEN_SMOKE if smoke else QWEN
    folder = qwen_checkpoint(tmp / "qwen", c)
    module, spec = with_image_size(*load_checkpoint(str(folder)), (c["image"], c["image"]))
    return {"model": f"Qwen2VLForConditionalGeneration at {c['image']}x{c['image']} (vision {c['vision']}, "
                     f"text {c['text']})", **_exits(tmp, folder, module, spec, c, reps, threads), "smoke": smoke}


# Qwen2-VL on a clip of 16 frames of 336 × 448 px (its processor's default 2 frames a second: 8 seconds), 2 frames a
# slice: 8 slices of 12 × 16 merged blocks, 1536 visual tokens in front of 32 text tokens, at QWEN's widths.
QWEN_VIDEO = {**QWEN, "size": (336, 448), "frames": 16}
QWEN_VIDEO_SMOKE = {**QWEN_SMOKE, "size": (56, 84), "frames": 3}


def bench_qwen_video(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """The Qwen2-VL checkpoint of :func:`bench_qwen` exported on a clip (``--video-frames``, :data:`QWEN_VIDEO`), then
    as :func:`bench_llava`."""
    from attnc.models.hf_checkpoint import load_checkpoint, with_image_size, with_video_frames

    c = QWEN_VIDEO_SMOKE if smoke else QWEN_VIDEO
    folder = qwen_checkpoint(tmp / "qwen_video", c)
    module, spec = with_image_size(*with_video_frames(*load_checkpoint(str(folder)), c["frames"]), c["size"])
    size = "x".join(map(str, c["size"]))
    return {"model": f"Qwen2VLForConditionalGeneration on {c['frames']} frames of {size} (vision {c['vision']}, "
                     f"text {c['text']})", **_exits(tmp, folder, module, spec, c, reps, threads),
            "frames": c["frames"], "smoke": smoke}


# LLaVA-NeXT at LLaVA-1.6's layout, scaled: 224-pixel tiles of 14-pixel patches (256 tokens each) and a 448-pixel
# square image, which its processor cuts into 2 × 2 tiles beside the whole image: 256 + 32 × 33 = 1312 visual tokens
# (the grid's rows ended by image_newline) in front of 32 text tokens, at LLAVA's widths.
LLAVA_NEXT = {**LLAVA, "image": 224, "original": (448, 448),
              "pinpoints": [[224, 448], [448, 224], [448, 448], [672, 224], [224, 672]]}
LLAVA_NEXT_SMOKE = {**LLAVA_SMOKE, "image": 56, "original": (112, 112),
                    "pinpoints": [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]}


def bench_llava_next(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """A transformers LLaVA-NeXT checkpoint (random weights, :data:`LLAVA_NEXT`) exported at its original image size
    (``--image-size``: the processor's tiles), then as :func:`bench_llava`."""
    from attnc.models.hf_checkpoint import load_checkpoint, with_image_size

    c = LLAVA_NEXT_SMOKE if smoke else LLAVA_NEXT
    module, spec = with_image_size(*load_checkpoint(str(llava_checkpoint(tmp / "llava_next", c))), c["original"])
    size = "x".join(map(str, c["original"]))
    return {"model": f"LlavaNextForConditionalGeneration at {size} ({c['image']}-pixel tiles; CLIP {c['vision']}, "
                     f"Llama {c['text']})", **_exits(tmp, tmp / "llava_next", module, spec, c, reps, threads),
            "smoke": smoke}


# Gemma 3 at its token proportions, scaled: a 448-pixel image of 14-pixel patches (32 × 32) average-pooled into 256
# tokens that attend to each other both ways, 32 text tokens, 8 decoder layers (5 of every 6 in sliding windows of
# 1024) at LLAVA's widths: the exits of a model whose image attends both ways.
GEMMA3 = {**LLAVA, "image": 448, "tokens": 256, "sliding_window": 1024}
GEMMA3_SMOKE = {**LLAVA_SMOKE, "image": 56, "tokens": 16, "sliding_window": 8}


def bench_gemma3(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """A transformers Gemma 3 checkpoint (random weights, :data:`GEMMA3`: SigLIP, a Gemma 3 text model of
    :data:`LLAVA`'s widths), then as :func:`bench_llava`."""
    import transformers

    from attnc.models.hf_checkpoint import load_checkpoint
    from attnc.testing import save_seeded

    c = GEMMA3_SMOKE if smoke else GEMMA3
    text = {**c["text"], "head_dim": c["text"]["hidden_size"] // c["text"]["num_attention_heads"],
            "sliding_window": c["sliding_window"]}
    vision = {**c["vision"], "image_size": c["image"], "patch_size": c["patch"]}
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=c["tokens"],
                                       image_token_index=c["text"]["vocab_size"] - 1)
    module, spec = load_checkpoint(str(save_seeded(config, "Gemma3ForConditionalGeneration", tmp / "gemma3")))
    return {"model": f"Gemma3ForConditionalGeneration (SigLIP {c['vision']} at {c['image']} px, Gemma 3 {text})",
            **_exits(tmp, tmp / "gemma3", module, spec, c, reps, threads), "smoke": smoke}


def _exits(tmp: Path, folder: Path, module, spec, c: dict, reps: int, threads: int) -> dict:
    """The checkpoint in ``folder`` (loaded: ``module``, ``spec``) exported, compiled as it is and with a static exit
    before each of ``c["exit_layers"]``, each artefact validated against it in PyTorch, and timed side by side."""
    from attnc.compiler.pipeline import CompileOptions, compile_model, validate_artefact

    t = time.perf_counter()
    graph = tmp / f"{folder.name}.onnx"
    export_onnx(module, spec.example_inputs(seq=c["text_tokens"]), graph, input_names=spec.input_names,
                dynamic_axes=spec.dynamic_axes)
    export_s = time.perf_counter() - t
    models, rows = {}, []
    for k in (None, *c["exit_layers"]):
        name = "full" if k is None else f"exit{k}"
        options = CompileOptions() if k is None else CompileOptions(token_exit="static", exit_layer=k)
        t = time.perf_counter()
        compile_model(graph, tmp / name, options)
        compile_s = time.perf_counter() - t
        result, _ = validate_artefact(tmp / name, str(folder), seed=1)
        models[name] = onnx.load(str(tmp / name / "model.fused.onnx"))
        worst = max(o.to_dict()["max_abs_error"] for o in result.outputs)
        rows.append({"model": name, "exit_layer": k, "compile_s": compile_s, "validation_passed": result.passed,
                     "validation_max_abs_error": worst,
                     "shrink_cost": result.shrink_cost[0] if result.shrink_cost else None})
    latency = {}
    for batch in (1, 4):
        pixels, ids = spec.example_inputs(batch=batch, seq=c["text_tokens"], seed=2)
        latency[str(batch)] = side_by_side(models, {spec.inputs[0].name: pixels.numpy(), "input_ids": ids.numpy()},
                                           max(5, reps // 10 if batch > 1 else reps // 4), threads)
    return {"visual_tokens": module.num_visual_tokens, "text_tokens": c["text_tokens"],
            "decoder_layers": c["text"]["num_hidden_layers"], "export_s": export_s, "rows": rows,
            "latency_ms": latency}


def bench_llava_decode(tmp: Path, reps: int, threads: int, smoke: bool = False) -> dict:
    """Answering with the visual tokens gone: the :data:`LLAVA` checkpoint's two generation graphs (the image after
    ``before`` text tokens, a chat template's), compiled as they are and with ``--token-exit static`` before several
    layers, both steps validated against the checkpoint exiting alike in PyTorch; greedy tokens through
    ``generate_vision_language`` against a loop over the (exited) forward without a cache; the prompt's KV cache
    size, and ONNX Runtime latency side by side of the first step (the image and the prompt) and of one later step
    (one token after the prompt's cache) at batch 1 and 8."""
    from attnc import runtime
    from attnc.compiler.pipeline import CompileOptions, compile_model, validate_artefact
    from attnc.models.hf_checkpoint import load_checkpoint, with_first_step, with_past, with_text_before_image

    c = LLAVA_SMOKE if smoke else LLAVA
    folder = llava_checkpoint(tmp / "llava_decode", c)
    module, spec = with_text_before_image(*load_checkpoint(str(folder)), c["before"])
    for name, (step, step_spec) in {"first": with_first_step(module, spec), "step": with_past(module, spec)}.items():
        export_onnx(step, step_spec.example_inputs(seq=c["text_tokens"]), tmp / f"{name}.onnx",
                    input_names=step_spec.input_names, output_names=step_spec.output_names,
                    dynamic_axes=step_spec.dynamic_axes)
    new_tokens = c["generate"]
    pixels, ids = spec.example_inputs(batch=1, seq=c["text_tokens"], seed=3)
    rows, firsts, steps, step_feeds = [], {}, {}, {}
    for k in (None, *c.get("decode_exit_layers", c["exit_layers"])):
        name = "full" if k is None else f"exit{k}"
        options = CompileOptions() if k is None else CompileOptions(token_exit="static", exit_layer=k)
        row = {"model": name, "exit_layer": k}
        for graph in ("first", "step"):
            compile_model(tmp / f"{graph}.onnx", tmp / f"{name}_{graph}", options)
            result, _ = validate_artefact(tmp / f"{name}_{graph}", str(folder), seed=1)
            row[f"{graph}_validation_passed"] = result.passed
            row[f"{graph}_validation_max_abs_error"] = max(o.to_dict()["max_abs_error"] for o in result.outputs)
        first, step = runtime.load(tmp / f"{name}_first"), runtime.load(tmp / f"{name}_step")
        tokens = runtime.generate_vision_language(first, step, pixels.numpy(), ids.numpy(), max_new_tokens=new_tokens)
        loop = ids
        with torch.no_grad():
            for _ in range(new_tokens):
                loop = torch.cat([loop, module(pixels, loop, exit_layer=k)[:, -1].argmax(-1, keepdim=True)], 1)
        row["tokens_equal_uncached_loop"] = bool(np.array_equal(tokens, loop.numpy()))
        row["new_tokens"] = tokens[0, ids.shape[1]:].tolist()
        firsts[name] = onnx.load(str(tmp / f"{name}_first" / "model.fused.onnx"))
        steps[name] = onnx.load(str(tmp / f"{name}_step" / "model.fused.onnx"))
        outputs = first.infer({"pixel_values": pixels.numpy(), "input_ids": ids.numpy()})
        row["prompt_cache_bytes"] = int(sum(v.nbytes for key, v in outputs.items() if key.startswith("present.")))
        row["cache_lengths"] = [int(outputs[f"present.{i}.key"].shape[2])
                                for i in range(c["text"]["num_hidden_layers"])]
        step_feeds[name] = outputs
        rows.append(row)
    latency = {}
    for batch in (1, 8):
        px, tx = spec.example_inputs(batch=batch, seq=c["text_tokens"], seed=4)
        feeds = {"pixel_values": px.numpy(), "input_ids": tx.numpy()}
        prefill = side_by_side(firsts, feeds, max(3, reps // 20), threads)
        own = {}
        for name in steps:
            outputs = runtime.load(tmp / f"{name}_first").infer(feeds)
            caches = {f"past_key_values.{key[len('present.'):]}": v for key, v in outputs.items()
                      if key.startswith("present.")}
            own[name] = {"input_ids": tx[:, -1:].numpy(), "attention_mask": np.ones(
                (batch, outputs["present.0.key"].shape[2] + 1), np.int64), **caches}
        decode = side_by_side(steps, {}, max(5, reps // 4), threads, own_feeds=own)
        latency[str(batch)] = {"first_step": prefill, "later_step": decode}
    return {"model": f"LlavaForConditionalGeneration (CLIP {c['vision']}, Llama {c['text']})",
            "visual_tokens": module.num_visual_tokens, "text_tokens": c["text_tokens"], "before": c["before"],
            "decoder_layers": c["text"]["num_hidden_layers"], "generated": new_tokens, "rows": rows,
            "latency_ms": latency, "smoke": smoke}


def llava_decode_table(p: dict) -> list[str]:
    lines = [f"Answering with the visual tokens gone, a transformers LLaVA checkpoint: {p['visual_tokens']} visual "
             f"tokens after {p['before']} of {p['text_tokens']} text tokens, {p['decoder_layers']} decoder layers "
             f"(random weights); {p['generated']} greedy tokens",
             f"  {'artefact':<9}{'validation':>11}{'max abs err':>13}{'tokens = loop':>15}{'cache MB':>10}{'ratio':>7}"
             + "".join(f"{'b' + b + ' ' + what + ' ms':>18}{'ratio':>7}" for b in p["latency_ms"]
                       for what in ("first", "step"))]
    full = next(r for r in p["rows"] if r["model"] == "full")
    for r in p["rows"]:
        passed = r["first_validation_passed"] and r["step_validation_passed"]
        worst = max(r["first_validation_max_abs_error"], r["step_validation_max_abs_error"])
        line = (f"  {r['model']:<9}{'pass' if passed else 'FAIL':>11}{worst:>13.2e}"
                f"{'yes' if r['tokens_equal_uncached_loop'] else 'NO':>15}{r['prompt_cache_bytes'] / 1e6:>10.2f}"
                f"{r['prompt_cache_bytes'] / full['prompt_cache_bytes']:>7.2f}")
        for lat in p["latency_ms"].values():
            for what in ("first_step", "later_step"):
                line += f"{lat[what][r['model']]:>18.2f}{lat[what][r['model']] / lat[what]['full']:>7.2f}"
        lines.append(line)
    lines.append("")
    return lines


LLAVA_VQA = {"vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "image_size": 32, "patch_size": 8},
             "text": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 64},
             "n_train": 8000, "n_test": 1000, "epochs": 6, "lr": 2e-3, "calibration": 512}
LLAVA_VQA_SMOKE = {**LLAVA_VQA, "text": {**LLAVA_VQA["text"], "num_hidden_layers": 3}, "n_train": 128, "n_test": 32,
                   "epochs": 1, "calibration": 32}


def bench_llava_vqa(tmp: Path, reps: int, threads: int, exit_aware: bool, smoke: bool = False) -> dict:
    """A transformers LLaVA trained on the generated VQA task, then shrunk through the CLI as a user would: the
    checkpoint saved, ``attnc export --text-before-image 1`` (the question's BOS in front of the image, as a chat
    template's text), ``attnc compile --token-exit static`` before every layer, ``attnc train-exit-gate`` and
    ``--token-exit dynamic``, each artefact validated against the checkpoint exiting alike; test accuracy (the last
    token's top-1 answer) and ONNX Runtime latency side by side."""
    import transformers

    from attnc.compiler.pipeline import validate_artefact
    from attnc.models.hf_vision_language import VisionLanguageOutput
    from attnc.models.train import VQA_VOCAB, vqa_data
    from attnc.testing import run_cli

    c = LLAVA_VQA_SMOKE if smoke else LLAVA_VQA
    train, test = vqa_data(c["n_train"], seed=0), vqa_data(c["n_test"], seed=1)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**c["vision"]),
        text_config=transformers.LlamaConfig(**c["text"], vocab_size=VQA_VOCAB + 1), image_token_index=VQA_VOCAB,
        architectures=["LlavaForConditionalGeneration"])
    layers = c["text"]["num_hidden_layers"]

    def loss_fn(model, inputs, labels):
        loss = torch.nn.functional.cross_entropy(model(*inputs)[:, -1], labels)
        if exit_aware:
            k = int(torch.randint(1, layers, ()))
            loss = loss + torch.nn.functional.cross_entropy(model(*inputs, exit_layer=k)[:, -1], labels)
        return loss

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = VisionLanguageOutput(transformers.LlavaForConditionalGeneration(config), 1)
        fit(module, train, c["epochs"], lr=c["lr"], loss_fn=loss_fn)
    train_s = time.perf_counter() - t0
    folder = tmp / f"llava-vqa-{exit_aware}"
    module.model.save_pretrained(folder)
    onnx_path = tmp / f"llava-vqa-{exit_aware}.onnx"
    run_cli("export", folder, "-o", onnx_path, "--text-before-image", 1)
    n = c["calibration"]
    np.savez(tmp / "calibration.npz", pixel_values=train.inputs[0][:n].numpy(), input_ids=train.inputs[1][:n].numpy())
    run_cli("train-exit-gate", folder, "--layer", 1, "--calibration", tmp / "calibration.npz", "-o", tmp / "gate.npz",
            "--text-before-image", 1)
    from attnc.passes.token_exit import ExitGate, gate_features

    gate = ExitGate.load(tmp / "gate.npz")
    artefacts = {"full": ()}
    artefacts.update({f"exit{k}": ("--token-exit", "static", "--exit-layer", k) for k in range(layers)})
    artefacts["dynamic"] = ("--token-exit", "dynamic", "--exit-gate", tmp / "gate.npz")
    test_feeds = {"pixel_values": test.inputs[0].numpy(), "input_ids": test.inputs[1].numpy()}
    truth = test.labels.numpy()
    rows, models = [], {}
    for name, options in artefacts.items():
        out = tmp / f"llava-vqa-{exit_aware}-{name}"
        run_cli("compile", onnx_path, "-o", out, *options)
        result, _ = validate_artefact(out, str(folder), seed=1)
        models[name] = onnx.load(str(out / "model.fused.onnx"))
        if name == "dynamic":   # its If decides for the whole batch: one sample at a time, as DyVTE runs, timed
            # against the full model's run on the same sample (interleaved)
            one = {"full": session(models["full"], threads), "dynamic": session(models[name], threads)}
            per_sample, answers = {k: [] for k in one}, []
            for i in range(len(test)):
                feeds = {k: v[i:i + 1] for k, v in test_feeds.items()}
                for k, s in one.items():
                    t = time.perf_counter()
                    got = s.run(None, feeds)[0]
                    per_sample[k].append(time.perf_counter() - t)
                answers.append(got[:, -1].argmax(-1))
            answers = np.concatenate(answers)
            batch1_mean = {k: float(np.mean(v[5:]) * 1e3) for k, v in per_sample.items()}   # 5 warm-up samples
        else:
            answers = session(models[name], threads).run(None, test_feeds)[0][:, -1].argmax(-1)
        rows.append({"artefact": name, "validation_passed": result.passed,
                     "validation_max_abs_error": max(o.to_dict()["max_abs_error"] for o in result.outputs),
                     "test_accuracy": float((answers == truth).mean())})
    with torch.no_grad():
        fires = gate.fires(gate_features(module, *test.inputs, 1).numpy())
    latency = {}
    for batch in (1, 32):
        feeds = {k: v[:batch] for k, v in test_feeds.items()}
        latency[str(batch)] = side_by_side({k: m for k, m in models.items() if k != "dynamic"}, feeds,
                                           max(5, reps // 4), threads)
    return {"model": f"LlavaForConditionalGeneration (CLIP {c['vision']}, Llama {c['text']}), 16 visual tokens after "
                     "the question's BOS, 2 text tokens after them",
            "exit_aware_training": exit_aware, "train_seconds": train_s,
            "task": f"generated VQA (models/train.py vqa_data): {c['n_train']} train / {c['n_test']} test, "
                    f"{c['epochs']} epochs", "rows": rows, "gate_fire_rate_test": float(fires.mean()),
            "latency_ms": latency, "latency_b1_test_mean_ms": batch1_mean, "smoke": smoke}


def llava_vqa_table(results: list[dict]) -> list[str]:
    lines = []
    for p in results:
        lines.append(f"Visual-token exit on a transformers LLaVA trained on the VQA task "
                     f"({'exit-aware' if p['exit_aware_training'] else 'plain'} training, {p['train_seconds']:.0f} s); "
                     f"the dynamic gate at layer 1 fires on {p['gate_fire_rate_test']:.0%} of test inputs")
        lines.append(f"  {'artefact':<9}{'validation':>12}{'max abs err':>13}{'test acc':>10}"
                     + "".join(f"{'b' + b + ' ms':>10}{'ratio':>7}" for b in p["latency_ms"]))
        for r in p["rows"]:
            line = (f"  {r['artefact']:<9}{'pass' if r['validation_passed'] else 'FAIL':>12}"
                    f"{r['validation_max_abs_error']:>13.2e}{r['test_accuracy']:>10.1%}")
            for lat in p["latency_ms"].values():
                line += (f"{lat[r['artefact']]:>10.3f}{lat[r['artefact']] / lat['full']:>7.2f}"
                         if r["artefact"] in lat else f"{'-':>10}{'':>7}")
            lines.append(line)
        mean = p["latency_b1_test_mean_ms"]
        lines.append(f"  batch 1, mean over the test inputs one at a time: full {mean['full']:.3f} ms, dynamic "
                     f"{mean['dynamic']:.3f} ms ({mean['dynamic'] / mean['full']:.2f}x)")
        lines.append("")
    return lines


def llava_table(p: dict, kind: str = "LLaVA") -> list[str]:
    lines = [f"Visual-token exit on a transformers {kind} checkpoint: {p['visual_tokens']} visual + {p['text_tokens']} "
             f"text tokens, {p['decoder_layers']} decoder layers (random weights: the exits' cost to answers is not "
             "measured here)",
             f"  {'artefact':<9}{'compile s':>10}{'validation':>12}{'max abs err':>13}{'vs full: max abs':>18}"
             + "".join(f"{'b' + b + ' ms':>10}{'ratio':>7}" for b in p["latency_ms"])]
    for r in p["rows"]:
        cost = r["shrink_cost"] or {}
        line = (f"  {r['model']:<9}{r['compile_s']:>10.1f}{'pass' if r['validation_passed'] else 'FAIL':>12}"
                f"{r['validation_max_abs_error']:>13.2e}{cost.get('max_abs_error', 0.0):>18.3g}")
        for lat in p["latency_ms"].values():
            line += f"{lat[r['model']]:>10.2f}{lat[r['model']] / lat['full']:>7.2f}"
        lines.append(line)
    lines.append("")
    return lines


def machine() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "python": sys.version.split()[0],
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}


SECTIONS = ("prune", "exit", "llama", "llava", "llava_vqa", "llava_decode", "qwen", "llava_next", "gemma3",
            "llava_images", "onevision_video", "qwen_video")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--skip", choices=SECTIONS, action="append", default=[])
    parser.add_argument("--only", choices=SECTIONS, action="append", default=[],
                        help="run these sections only (repeatable)")
    parser.add_argument("--smoke", action="store_true",
                        help="the Llama section at toy sizes (seconds; checks it runs, numbers mean nothing)")
    parser.add_argument("--tag", default="", help="added to the raw file's name: shrink-<sections>-<tag>-<date>.json")
    args = parser.parse_args(argv)
    sections = [s for s in SECTIONS if s not in args.skip and (not args.only or s in args.only)]
    torch.set_num_threads(args.threads)
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine(), "reps": args.reps,
               "threads": args.threads, "sections": sections}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if "prune" in sections:
            results["prune_heads"] = [bench_pruning(Path(tmp), args.reps, args.threads, name)
                                      for name in PRUNE_MODELS]
        if "exit" in sections:
            results["token_exit"] = [bench_token_exit(Path(tmp), args.reps, args.threads, name, aware)
                                     for name in VLM_CONFIGS for aware in (False, True)]
        if "llama" in sections:
            results["prune_llama"] = bench_llama(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "llava" in sections:
            results["exit_llava"] = bench_llava(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "llava_vqa" in sections:
            results["exit_llava_vqa"] = [bench_llava_vqa(Path(tmp), args.reps, args.threads, aware, smoke=args.smoke)
                                         for aware in (False, True)]
        if "llava_decode" in sections:
            results["exit_llava_decode"] = bench_llava_decode(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "qwen" in sections:
            results["exit_qwen"] = bench_qwen(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "llava_next" in sections:
            results["exit_llava_next"] = bench_llava_next(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "gemma3" in sections:
            results["exit_gemma3"] = bench_gemma3(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "llava_images" in sections:
            results["exit_llava_images"] = bench_llava_images(Path(tmp), args.reps, args.threads, smoke=args.smoke)
        if "onevision_video" in sections:
            results["exit_onevision_video"] = bench_onevision_video(Path(tmp), args.reps, args.threads,
                                                                    smoke=args.smoke)
        if "qwen_video" in sections:
            results["exit_qwen_video"] = bench_qwen_video(Path(tmp), args.reps, args.threads, smoke=args.smoke)
    results["seconds"] = time.perf_counter() - t0
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # A partial run gets its own file (shrink-llama-<date>.json) rather than replacing a full one.
    part = "" if len(sections) == len(SECTIONS) else "-".join(sections) + "-"
    tag = f"{args.tag}-" if args.tag else ""
    path = out / f"shrink-{part}{tag}{'smoke-' if args.smoke else ''}{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"\nraw numbers: {path}")
    return 0


def table(results: dict) -> str:
    lines = [f"machine: {results['machine']['processor']}, {results['machine']['cpu_count']} CPUs, "
             f"load {results['machine']['load_avg'][0]:.1f}; ORT CPU, {results['threads']} thread(s), "
             f"median of {results['reps']} interleaved runs", ""]
    for p in results.get("prune_heads", []):
        r0 = p["rows"][0]
        lat = p["latency_ms"]
        lines.append(f"Head pruning, 25 % of heads ({r0['heads_before']} -> {r0['heads_after']}), {p['model']}: "
                     f"params {r0['params_before']} -> {r0['params_after']}, attention MFLOPs/image "
                     f"{r0['attention_flops_before'] / 1e6:.2f} -> {r0['attention_flops_after'] / 1e6:.2f}; "
                     f"latency ({p['latency_of']}) b1 {lat['1']['before']:.3f} -> {lat['1']['after']:.3f} ms, "
                     f"b64 {lat['64']['before']:.2f} -> {lat['64']['after']:.2f} ms")
        lines.append(f"  fine-tune: {p['finetune']}; the unpruned model after the same fine-tune: "
                     f"{r0['accuracy_before']:.1%} -> {p['accuracy_unpruned_finetune']:.1%}")
        lines.append(f"  {'score':<11}{'selection':<11}{'acc before':>11}{'after':>8}{'delta':>7}"
                     f"{'+2ep ft':>9}{'delta':>7}{'select s':>10}  kept per layer")
        for r in p["rows"]:
            lines.append(
                f"  {r['method']:<11}{r['selection']:<11}{r['accuracy_before']:>10.1%}{r['accuracy_after']:>9.1%}"
                f"{100 * (r['accuracy_after'] - r['accuracy_before']):>+7.1f}{r['accuracy_after_finetune']:>9.1%}"
                f"{100 * (r['accuracy_after_finetune'] - r['accuracy_before']):>+7.1f}{r['select_seconds']:>10.1f}  "
                + " ".join(str(len(k)) for k in r["keep"].values()))
        lines.append("")
    for r in results.get("token_exit", []):
        lines.append(f"Visual-token exit, {r['model']} ({'exit-aware' if r['exit_aware_training'] else 'plain'} "
                     f"training; {r['visual_tokens']} visual + {r['text_tokens']} text tokens, "
                     f"trained in {r['train_seconds']:.0f} s):")
        lines.append("  torch accuracy by exit layer: "
                     + ", ".join(f"{k}: {v:.1%}" for k, v in r["torch_accuracy_by_exit_layer"].items()))
        lines.append(f"  static exit after layer {r['choice']['exit_layer']} ({r['choice']['criterion']}): accuracy "
                     f"{r['accuracy_full']:.1%} -> {r['accuracy_static']:.1%}")
        d = r["dynamic"]
        lines.append(f"  dynamic gate at layer {d['gate']['layer']}: fires on {d['fire_rate_test']:.0%} of test "
                     f"inputs, batch-1 accuracy {d['accuracy_batch1']:.1%} ({d['samples']} samples)")
        lat = r["latency_b1_test_mean_ms"]
        lines.append(f"  latency batch 1, mean over the {d['samples']} test inputs: full {lat['full']:.3f} ms, "
                     f"static {lat['static']:.3f} ms ({lat['static'] / lat['full'] - 1:+.0%}), dynamic "
                     f"{lat['dynamic']:.3f} ms ({lat['dynamic'] / lat['full'] - 1:+.0%})")
        for b, lat in r["latency_ms"].items():
            lines.append(f"  latency batch {b}, first test input(s), median: full {lat['full']:.3f} ms, "
                         f"static {lat['static']:.3f} ms ({lat['static'] / lat['full'] - 1:+.0%}), "
                         f"dynamic {lat['dynamic']:.3f} ms "
                         f"({lat['dynamic'] / lat['full'] - 1:+.0%})")
        lines.append("")
    if "prune_llama" in results:
        lines.extend(llama_table(results["prune_llama"]))
    if "exit_llava" in results:
        lines.extend(llava_table(results["exit_llava"]))
    if "exit_llava_vqa" in results:
        lines.extend(llava_vqa_table(results["exit_llava_vqa"]))
    if "exit_llava_decode" in results:
        lines.extend(llava_decode_table(results["exit_llava_decode"]))
    if "exit_qwen" in results:
        lines.extend(llava_table(results["exit_qwen"], "Qwen2-VL"))
    if "exit_llava_next" in results:
        lines.extend(llava_table(results["exit_llava_next"], "LLaVA-NeXT"))
    if "exit_gemma3" in results:
        lines.extend(llava_table(results["exit_gemma3"], "Gemma 3"))
    if "exit_llava_images" in results:
        lines.extend(llava_table(results["exit_llava_images"], "LLaVA (two images per prompt)"))
    if "exit_onevision_video" in results:
        video = results["exit_onevision_video"]
        lines.extend(llava_table(video, f"LLaVA-OneVision (a video of {video['frames']} frames)"))
    if "exit_qwen_video" in results:
        video = results["exit_qwen_video"]
        lines.extend(llava_table(video, f"Qwen2-VL (a video of {video['frames']} frames)"))
    return "\n".join(lines)


def llama_table(p: dict) -> list[str]:
    r0 = p["rows"][0]
    lines = [f"Head pruning by K/V groups and by query heads inside them, {p['model']}, trained in "
             f"{p['train_seconds']:.0f} s; {p['tokens']} tokens; fine-tune: {p['finetune']}; the unpruned model after "
             f"the same fine-tune: {r0['accuracy_before']:.1%} -> {p['accuracy_unpruned_finetune']:.1%}",
             f"  {'unit':<7}{'pruned':<8}{'score':<11}{'selection':<11}{'acc before':>11}{'after':>8}{'delta':>7}"
             f"{'+ft':>8}{'delta':>7}{'select s':>10}{'heads':>9}{'kv':>7}{'attn params':>17}{'attn MFLOPs':>15}"
             f"{'':>6}  kept per layer"]
    for r in p["rows"]:
        flops_change = r["attention_flops_after"] / r["attention_flops_before"] - 1
        lines.append(
            f"  {r.get('granularity', 'group'):<7}{100 * r['ratio']:<8.3g}{r['method']:<11}{r['selection']:<11}"
            f"{r['accuracy_before']:>10.1%}"
            f"{r['accuracy_after']:>9.1%}{100 * (r['accuracy_after'] - r['accuracy_before']):>+7.1f}"
            f"{r['accuracy_after_finetune']:>8.1%}{100 * (r['accuracy_after_finetune'] - r['accuracy_before']):>+7.1f}"
            f"{r['select_seconds']:>10.1f}{r['heads_before']:>4}->{r['heads_after']:<3}"
            f"{r['kv_heads_before']:>3}->{r['kv_heads_after']:<3}"
            f"{r['attention_params_before']:>8}->{r['attention_params_after']:<7}"
            f"{r['attention_flops_before'] / 1e6:>7.2f}->{r['attention_flops_after'] / 1e6:<6.2f}{flops_change:>+6.1%}  "
            + " ".join(str(len(k)) for k in r["keep"].values()))
    lines.append(f"  params (whole model) {r0['params_before']} -> "
                 + ", ".join(f"{r['params_after']} ({r.get('granularity', 'group')} {100 * r['ratio']:g}%)"
                             for r in p["rows"] if r["method"] == "ablation" and r["selection"] == "one-shot"))
    for shape, lat in p["latency_ms"].items():
        lines.append(f"  latency {shape} ({p['latency_of']} selections), median: before {lat['before']:.3f} ms, "
                     + ", ".join(f"{k} pruned {v:.3f} ms ({v / lat['before']:.2f}x)" for k, v in lat.items()
                                 if k != "before"))
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
