"""The PyTorch reference of a shrunk artefact, and what shrinking changed.

A compile that prunes heads (``--prune-heads``, ``--prune-keep``) or drops visual tokens (``--token-exit``) no longer
computes the model it was exported from: its outputs differ by design. Compared with that model, a correct compile
and a broken one both fail. ``attnc validate`` therefore compares a shrunk artefact with the model shrunk the same
way in PyTorch (``reference="shrunk"``, the default), where a correct compile agrees to the precision's tolerance:

- pruned heads: the model with each pruned head's output multiplied by zero where the heads are merged, in front of
  the output projection (:func:`attnc.passes.prune_heads.head_gates`: what pruning removes). The manifest names the
  kept heads of each pruned layer and a fingerprint of its output projection; each layer's module is the attention
  module whose projection weight has that fingerprint, or, where none has (a norm between the merged heads and the
  projection) or one module serves several layers (ALBERT), the module of the layer's index in registration order.
  Either way its head count must be the layer's.
- static token exit: ``forward(*inputs, exit_layer=k)`` (the bundled vision-language models and Hugging Face
  vision-language checkpoints, :class:`attnc.models.hf_vision_language.VisionLanguageOutput`, take it);
- dynamic token exit: the gate the manifest records, run by :func:`attnc.passes.token_exit.dynamic_exit_forward`
  (the bundled ``TinyVLM`` layout, or a model with an ``exit_run`` method as vision-language checkpoints have).

Where the model cannot be shrunk so, this says why and points to ``reference="original"``: the comparison with the
unshrunk model, which then measures the change rather than checks the compile.

With the shrunk reference, :func:`shrink_cost` also measures the artefact against the unshrunk model: error
statistics and, for logits, how often the top-1 class agrees. The report carries it as ``shrink_cost``; it is not
part of the verdict.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from attnc.compiler.errors import AttncError
from attnc.compiler.validate import TOLERANCES, compare_tensor

REFERENCES = ("shrunk", "original")
_ORIGINAL_FIX = ("validate with --reference original: the unshrunk model (the report then measures what shrinking "
                 "changed instead of checking the compile)")


@dataclass(frozen=True)
class ShrunkModel:
    """``model`` shrunk as a manifest says, as a callable module for :func:`attnc.compiler.validate.torch_reference`:
    ``gates`` (``{attention module: 0/1 gate [H]}``, or None) gate the pruned heads, ``exit_layer`` / ``exit_gate``
    drop the visual tokens (``per_row``: each row as its own gate says, as the graph picks them; a manifest of an
    attnc before session 20 records no such choice: its graph decided for the batch); ``description`` says so for the
    report."""

    model: object
    gates: dict | None
    exit_layer: int | None
    exit_gate: object | None
    description: str
    per_row: bool = True

    def module(self):
        """An ``nn.Module`` whose forward runs ``model`` shrunk (the model is its submodule: eval mode and
        transformers' cache switch reach it)."""
        import torch

        shrunk = self

        class Shrunk(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = shrunk.model

            def forward(self, *args):
                return shrunk.run(*args)

        return Shrunk()

    def run(self, *args):
        from attnc.passes.prune_heads import head_gates
        from attnc.passes.token_exit import dynamic_exit_forward

        # head_gates counts the attention calls of one forward from its entry: entered per call
        with head_gates(self.model, self.gates) if self.gates else contextlib.nullcontext():
            if self.exit_gate is not None:   # (pixel_values, input_ids[, attention_mask]) of padded prompts
                return dynamic_exit_forward(self.model, *args[:2], self.exit_gate, *args[2:],
                                            per_row=self.per_row)[0]
            if self.exit_layer is not None:
                return self.model(*args, exit_layer=self.exit_layer)
            return self.model(*args)


def shrunk_model(model, shrink: Mapping) -> ShrunkModel | None:
    """``model`` shrunk as a manifest's ``shrink`` section says; None when it shrank nothing.

    Raises:
        AttncError: the model cannot be shrunk so in PyTorch: no attention module for a pruned layer (or another
            head count), a forward without ``exit_layer`` for a static token exit, a dynamic exit without its gate
            or on a model of another layout; each names :data:`_ORIGINAL_FIX` as the way out.
    """
    pruned, exited = shrink.get("prune_heads"), shrink.get("token_exit")
    if not pruned and not exited:
        return None
    said = []
    gates = None
    if pruned:
        gates = pruned_gates(model, pruned)
        said.append("the pruned heads gated to zero in front of each output projection")
    exit_layer = exit_gate = None
    if exited:
        exit_layer, exit_gate = _token_exit(model, exited)
        said.append(f"the visual tokens dropped before decoder layer {exited['exit_layer']}"
                    + (" where the exit gate fires" if exit_gate is not None else ""))
    per_row = bool(((exited or {}).get("gate") or {}).get("per_row", False))
    return ShrunkModel(model, gates, exit_layer, exit_gate, f"the PyTorch model with {' and '.join(said)}", per_row)


def pruned_gates(model, report: Mapping) -> dict:
    """``{attention module index: 0/1 gate [H]}`` for :func:`attnc.passes.prune_heads.head_gates` from a manifest's
    ``shrink.prune_heads``: 0 on the heads each layer pruned (see the module docstring for how layers find their
    modules).

    Raises:
        AttncError: the model has no attention module head pruning knows, two layers find the same module, or a
            layer's module has another head count.
    """
    from attnc.passes.prune_heads import gates_from_keep, matrix_fingerprint, torch_attention_modules

    layers = list(report.get("layers") or [])
    modules = torch_attention_modules(model)
    if not modules:
        raise AttncError(f"{type(model).__name__} has no attention module head pruning knows (a head count and an "
                         "output projection), so its pruned heads cannot be gated in PyTorch", _ORIGINAL_FIX)
    owners: dict[str, list[int]] = {}
    for i, (_, _, proj) in enumerate(modules):
        weight = getattr(proj, "weight", None)
        if weight is not None and weight.ndim == 2:
            w = weight.detach().cpu().numpy()
            for form in {matrix_fingerprint(w.T), matrix_fingerprint(w)}:   # Linear [out, in]; GPT-2's Conv1D [in, out]
                owners.setdefault(form, []).append(i)
    found = {l["index"]: owners.get(l.get("fingerprint") or "", []) for l in layers}
    by_print = {i: hits[0] for i, hits in found.items() if len(hits) == 1}
    if len(set(by_print.values())) < len(by_print):   # one module runs as several layers (ALBERT): by call order
        by_print = {}
    target = {l["index"]: by_print.get(l["index"], l["index"]) for l in layers}
    taken: dict[int, int] = {}
    for layer in layers:
        index, module = layer["index"], target[layer["index"]]
        if module in taken:
            raise AttncError(f"pruned layers {taken[module]} and {index} both find attention module {module} of "
                             f"{type(model).__name__}: this is not the model the artefact was compiled from",
                             "pass the model that was exported, or " + _ORIGINAL_FIX)
        taken[module] = index
        if module < len(modules) and modules[module][1] != layer["heads_before"]:
            raise AttncError(f"pruned layer {index} had {layer['heads_before']} heads, but attention module {module} "
                             f"of {type(model).__name__} ({type(modules[module][0]).__name__}) has "
                             f"{modules[module][1]}: this is not the model the artefact was compiled from",
                             "pass the model that was exported, or " + _ORIGINAL_FIX)
    return gates_from_keep({target[l["index"]]: l["kept"] for l in layers},
                           {target[l["index"]]: l["heads_before"] for l in layers})


def _token_exit(model, report: Mapping) -> tuple[int | None, object | None]:
    """``(exit_layer, None)`` for a static exit, ``(None, ExitGate)`` for a dynamic one."""
    from attnc.passes.token_exit import ExitGate, exits_in_torch

    k = report["exit_layer"]
    if report["mode"] == "static":
        try:
            takes = "exit_layer" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            takes = False
        if not takes:
            raise AttncError(f"{type(model).__name__}.forward takes no exit_layer, so attnc cannot drop its visual "
                             f"tokens before decoder layer {k} in PyTorch",
                             "give a model whose forward(..., exit_layer=k) drops them, or " + _ORIGINAL_FIX)
        return k, None
    gate = report.get("gate")
    if not gate or not exits_in_torch(model):
        why = "its manifest records no exit gate (compiled before attnc kept it)" if not gate else \
            f"{type(model).__name__} has no exit_run method and is not laid out as attnc's TinyVLM"
        raise AttncError(f"the dynamic token exit cannot run in PyTorch: {why}",
                         "recompile with this attnc, or " + _ORIGINAL_FIX)
    return None, ExitGate(int(gate["layer"]), np.asarray(gate["weight"], np.float32), float(gate["bias"]),
                          float(gate["threshold"]))


def shrink_cost(original: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> list[dict]:
    """How far a shrunk artefact's outputs ``actual`` are from the unshrunk model's ``original``, per output both
    have: ``max_abs_error``, ``mean_abs_error``, ``cosine`` (float64, over elements finite on both sides) and
    ``top1_agreement``: the share of rows (all axes but the last) whose largest entry on the last axis is at the same
    index on both sides, over ``rows`` rows that are not all zeros on both sides (validation zeroes padding). It is
    the top-1 agreement of class or token scores (logits); it is left out for outputs of rank 1, a last axis of one
    entry, and a generation step's KV cache (``present.*``). An output of another shape or a non-float type on one
    side is listed with a ``note`` and no numbers."""
    rows_out = []
    for name in original:
        if name not in actual:
            continue
        r, a = np.asarray(original[name]), np.asarray(actual[name])
        entry = {"name": name, "shape": list(r.shape), "max_abs_error": None, "mean_abs_error": None,
                 "cosine": None, "top1_agreement": None, "rows": None, "note": None}
        if r.shape != a.shape or r.dtype.kind not in "fc" or a.dtype.kind not in "fc":
            entry["note"] = f"not compared: {list(r.shape)} {r.dtype} against {list(a.shape)} {a.dtype}"
            rows_out.append(entry)
            continue
        stats = compare_tensor(name, r, a, TOLERANCES["fp32"], worst_k=0).stats   # over elements finite on both
        if stats is not None and stats.compared:
            entry.update(max_abs_error=stats.max_abs_error, mean_abs_error=stats.mean_abs_error, cosine=stats.cosine)
        if r.ndim >= 2 and r.shape[-1] >= 2 and not name.startswith("present"):
            r2, a2 = r.reshape(-1, r.shape[-1]), a.reshape(-1, r.shape[-1])
            live = r2.any(axis=1) | a2.any(axis=1)
            if live.any():
                entry["rows"] = int(live.sum())
                entry["top1_agreement"] = float((r2[live].argmax(1) == a2[live].argmax(1)).mean())
        rows_out.append(entry)
    return rows_out


def cost_table(cost: list[dict], title: str = "what shrinking changed: the artefact against the unshrunk model "
                                                "(not part of the verdict)"):
    """A rich table of :func:`shrink_cost`'s rows."""
    from rich.markup import escape
    from rich.table import Table

    def number(value, spec):
        return "-" if value is None else format(value, spec)

    table = Table(title=title, title_justify="left")
    for column in ("tensor", "max abs diff", "mean abs diff", "cosine", "top-1 agreement"):
        table.add_column(column, justify="left" if column == "tensor" else "right")
    for row in cost:
        agree = "-" if row["top1_agreement"] is None else f"{row['top1_agreement']:.1%} of {row['rows']}"
        table.add_row(escape(row["name"]), number(row["max_abs_error"], ".3g"), number(row["mean_abs_error"], ".3g"),
                      number(row["cosine"], ".6f"), agree if not row["note"] else escape(row["note"]))
    return table
