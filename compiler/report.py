"""Accuracy-diff reports: ``report.json`` (stable schema, docs/report-schema.md) and a
self-contained ``report.html`` (inline CSS, plots as base64 PNG) from a ValidationResult.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

import attnc
from attnc.compiler.errors import AttncError
from attnc.compiler.onnx_io import atomic_path
from attnc.compiler.validate import ErrorStats, OutputComparison, ValidationResult, json_number

SCHEMA = "attnc.report/1"
JSON_NAME = "report.json"
HTML_NAME = "report.html"
_STATS_KEYS = tuple(ErrorStats.__dataclass_fields__)
_REQUIRED = {"schema": str, "passed": bool, "created": str, "meta": dict, "tolerances": dict,
             "outputs": list}


# plots a report draws at most: every failing tensor's first, then the passing ones in order (each costs ~0.1 s; a
# generation step's report compares two caches per layer, whose plots of passing tensors say little more)
MAX_PLOTS = 12


def write_report(result: ValidationResult, out_dir: str | os.PathLike, *, meta: Mapping,
                 max_plots: int = MAX_PLOTS) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.html`` into ``out_dir``, atomically.

    Both documents are rendered in memory first and each file is renamed into place only
    once both are written, so a failure leaves neither new file behind.

    Args:
        result: what :func:`attnc.compiler.validate.validate` returned.
        out_dir: the folder (created if needed).
        meta: run facts, recorded as given (made JSON-safe): model, artefact, backend,
            precision, seed, input shapes, ... ``attnc_version`` and ``precision`` are
            filled in when absent.
        max_plots: at most this many tensors get plots: the failing ones first, then the passing ones in order.

    Returns:
        ``(json_path, html_path)``.
    """
    out_dir = Path(out_dir)
    document = report_dict(result, meta)
    json_text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    html_text = render_html(document, result, max_plots=max_plots)
    json_path, html_path = out_dir / JSON_NAME, out_dir / HTML_NAME
    with atomic_path(json_path, suffix=".json") as tmp_json, \
            atomic_path(html_path, suffix=".html") as tmp_html:
        for tmp, text in ((tmp_json, json_text), (tmp_html, html_text)):
            tmp.write_text(text, encoding="utf-8")
            tmp.chmod(0o644)  # mkstemp creates 0600; reports are meant to be shared (CI artefacts)
    return json_path, html_path


def report_dict(result: ValidationResult, meta: Mapping) -> dict:
    """The ``attnc.report/1`` document (see docs/report-schema.md)."""
    body = result.to_dict()
    meta = {str(k): _plain(v) for k, v in dict(meta).items()}
    meta.setdefault("attnc_version", attnc.__version__)
    meta.setdefault("precision", result.precision)
    return {
        "schema": SCHEMA,
        "passed": body["passed"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "meta": meta,
        "tolerances": {"precision": body["precision"], **body["tolerances"]},
        "outputs": body["outputs"],
        **({"shrink_cost": body["shrink_cost"]} if "shrink_cost" in body else {}),
    }


def load_report(path: str | os.PathLike) -> dict:
    """Read a ``report.json`` and check it is an ``attnc.report/1`` document.

    Raises:
        AttncError: missing file, not JSON, or not (this version of) an attnc report.
    """
    path = Path(path)
    if path.is_dir():
        path = path / JSON_NAME
    if not path.is_file():
        raise AttncError(f"{path}: no such report", "pass the report.json written by `attnc validate`")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AttncError(f"{path} is not JSON ({exc})", "pass the report.json written by `attnc validate`") from None
    if not isinstance(document, dict) or "schema" not in document:
        raise AttncError(f"{path} is not an attnc report (no 'schema' field)",
                         "pass the report.json written by `attnc validate`")
    schema = document["schema"]
    if schema != SCHEMA:
        known = isinstance(schema, str) and schema.startswith("attnc.report/")
        raise AttncError(
            f"{path} has schema {schema!r}; this attnc reads {SCHEMA!r}",
            "re-run validation with this attnc version" if known else "pass an attnc report.json")
    for key, kind in _REQUIRED.items():
        if not isinstance(document.get(key), kind):
            raise AttncError(f"{path} is a malformed {SCHEMA} report: {key!r} is missing or not a "
                             f"{kind.__name__}", "re-run validation to rewrite it")
    for i, output in enumerate(document["outputs"]):
        if not (isinstance(output, dict) and isinstance(output.get("name"), str)
                and isinstance(output.get("passed"), bool)):
            raise AttncError(f"{path} is a malformed {SCHEMA} report: outputs[{i}] lacks name/passed",
                             "re-run validation to rewrite it")
    return document


def _plain(value):
    """JSON-safe copy of ``value``: paths and unknown objects as str, numpy as Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return json_number(value)
    return str(value)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1200px;
color:#1b1f23;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0 16px}th,td{border:1px solid #d0d7de;padding:3px 8px;
text-align:right;font-variant-numeric:tabular-nums}th{background:#f6f8fa}td.l,th.l{text-align:left}
code{font:13px ui-monospace,Menlo,Consolas,monospace}.pass{background:#dafbe1;color:#116329}
.fail{background:#ffebe9;color:#a40e26;font-weight:600}.badge{padding:2px 10px;border-radius:10px}
ul.reasons{color:#a40e26}img{max-width:100%}.muted{color:#6e7781}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _num(value, fmt: str = ".3e") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "NaN", "Infinity", "-Infinity"
        return _e(value)
    return "0" if value == 0 else format(value, fmt)


def _shape(side: dict | None) -> str:
    if side is None:
        return "absent"
    return ("x".join(str(d) for d in side["shape"]) or "scalar") + f" {side['dtype']}"


def render_html(document: dict, result: ValidationResult | None = None, *, max_plots: int = MAX_PLOTS) -> str:
    """The self-contained HTML page for a report document (plots need ``result``'s samples: of ``max_plots``
    tensors at most, the failing ones first)."""
    samples = {o.name: o for o in result.outputs} if result is not None else {}
    verdict = "PASSED" if document["passed"] else "FAILED"
    css_class = "pass" if document["passed"] else "fail"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>attnc accuracy report: {_e(verdict)}</title><style>{_CSS}</style></head><body>",
        f"<h1>attnc accuracy report <span class='badge {css_class}'>{_e(verdict)}</span></h1>",
        f"<p class='muted'>{_e(document['created'])} &middot; schema <code>{_e(document['schema'])}</code></p>",
        "<h2>Run</h2><table>",
    ]
    for key, value in document["meta"].items():
        shown = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"<tr><th class='l'>{_e(key)}</th><td class='l'><code>{_e(shown)}</code></td></tr>")
    parts.append("</table>")

    tol = document["tolerances"]
    parts.append(f"<p>Tolerance ({_e(tol['precision'])}): an element passes when "
                 f"<code>|actual &minus; ref| &le; atol + rtol&middot;|ref|</code>, a tensor when every "
                 f"element passes, none is NaN/Inf unless the reference is too, and cosine &ge; min_cosine. "
                 f"Default atol {_num(tol['default']['atol'], 'g')}, rtol {_num(tol['default']['rtol'], 'g')}, "
                 f"min_cosine {_num(tol['default']['min_cosine'], 'g')}.")
    if tol["overrides"]:
        parts.append(" Overrides: " + ", ".join(
            f"<code>{_e(k)}</code> (atol {_num(v['atol'], 'g')}, rtol {_num(v['rtol'], 'g')}, "
            f"min_cosine {_num(v['min_cosine'], 'g')})" for k, v in tol["overrides"].items()) + ".")
    parts.append("</p>")

    parts.append("<h2>Summary</h2><table><tr><th class='l'>tensor</th><th class='l'>kind</th>"
                 "<th class='l'>reference</th><th class='l'>actual</th><th>max abs err</th>"
                 "<th>mean abs err</th><th>max rel err</th><th>cosine</th><th>violations</th>"
                 "<th class='l'>result</th></tr>")
    for i, out in enumerate(document["outputs"]):
        cls = "pass" if out["passed"] else "fail"
        parts.append(
            f"<tr><td class='l'><a href='#t{i}'><code>{_e(out['name'])}</code></a></td>"
            f"<td class='l'>{_e(out['kind'])}</td><td class='l'>{_e(_shape(out['reference']))}</td>"
            f"<td class='l'>{_e(_shape(out['actual']))}</td><td>{_num(out['max_abs_error'])}</td>"
            f"<td>{_num(out['mean_abs_error'])}</td><td>{_num(out['max_rel_error'])}</td>"
            f"<td>{_num(out['cosine'], '.7f')}</td><td>{_num(out['violations'], 'd')}</td>"
            f"<td class='l {cls}'>{'pass' if out['passed'] else 'FAIL'}</td></tr>")
    if not document["outputs"]:
        parts.append("<tr><td class='l fail' colspan='10'>no tensors were compared</td></tr>")
    parts.append("</table>")

    if document.get("shrink_cost"):
        parts.append(_cost_section(document["shrink_cost"]))
    plottable = [i for i, out in enumerate(document["outputs"]) if out["compared"]]
    plotted = set(sorted(plottable, key=lambda i: document["outputs"][i]["passed"])[:max_plots])   # stable: in order
    for i, out in enumerate(document["outputs"]):
        parts.append(_tensor_section(i, out, samples.get(out["name"]), plot=i in plotted))
    if len(plottable) > len(plotted):
        parts.append(f"<p class='muted'>Plots are drawn for {len(plotted)} of the {len(plottable)} tensors compared: "
                     "every failing one first, then the passing ones in order.</p>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _cost_section(cost: list[dict]) -> str:
    """The artefact against the unshrunk model (``shrink_cost``): what pruning or token exit changed."""
    parts = ["<h2>What shrinking changed</h2><p class='muted'>The artefact against the unshrunk PyTorch model, "
             "on the same inputs. Not part of the verdict: the verdict compares it with the model shrunk alike.</p>",
             "<table><tr><th class='l'>tensor</th><th>max abs diff</th><th>mean abs diff</th><th>cosine</th>"
             "<th>top-1 agreement</th><th>rows</th><th class='l'>note</th></tr>"]
    for row in cost:
        agree = row.get("top1_agreement")
        parts.append(f"<tr><td class='l'><code>{_e(row['name'])}</code></td><td>{_num(row.get('max_abs_error'))}</td>"
                     f"<td>{_num(row.get('mean_abs_error'))}</td><td>{_num(row.get('cosine'), '.6f')}</td>"
                     f"<td>{'-' if agree is None else _e(format(agree, '.1%'))}</td>"
                     f"<td>{_num(row.get('rows'), 'd')}</td><td class='l'>{_e(row.get('note') or '')}</td></tr>")
    parts.append("</table>")
    return "\n".join(parts)


def _tensor_section(i: int, out: dict, comparison: OutputComparison | None, *, plot: bool) -> str:
    cls = "pass" if out["passed"] else "fail"
    parts = [f"<h2 id='t{i}'><code>{_e(out['name'])}</code> "
             f"<span class='badge {cls}'>{'pass' if out['passed'] else 'FAIL'}</span></h2>"]
    if out["reasons"]:
        parts.append("<ul class='reasons'>" + "".join(f"<li>{_e(r)}</li>" for r in out["reasons"]) + "</ul>")
    tol = out["tolerance"]
    parts.append(f"<p>atol {_num(tol['atol'], 'g')}, rtol {_num(tol['rtol'], 'g')}, "
                 f"min_cosine {_num(tol['min_cosine'], 'g')} &middot; reference {_e(_shape(out['reference']))}"
                 f" &middot; actual {_e(_shape(out['actual']))}</p>")
    stats = {k: out[k] for k in _STATS_KEYS} if out["elements"] is not None else None
    if stats:
        nonfinite = "".join(
            f"<tr><th class='l'>NaN / Inf in {side}</th><td>{out[side]['nan']} / {out[side]['inf']}</td></tr>"
            for side in ("reference", "actual"))
        rows = "".join(f"<tr><th class='l'>{_e(k.replace('_', ' '))}</th><td>"
                       f"{_num(v, '.7f') if k == 'cosine' else v if isinstance(v, int) else _num(v)}</td></tr>"
                       for k, v in stats.items())
        parts.append(f"<table>{rows}{nonfinite}</table>")
    if plot and comparison is not None and out["compared"]:
        parts.append(f'<img src="data:image/png;base64,{_plot_png(out, comparison)}" '
                     f'alt="error plots for {_e(out["name"])}">')
    if out["worst"]:
        parts.append("<table><tr><th class='l'>worst index</th><th>reference</th><th>actual</th>"
                     "<th>abs err</th><th>rel err</th></tr>")
        for w in out["worst"]:
            parts.append(f"<tr><td class='l'><code>{_e(tuple(w['index']))}</code></td>"
                         f"<td>{_num(w['reference'], '.6g')}</td><td>{_num(w['actual'], '.6g')}</td>"
                         f"<td>{_num(w['abs_error'])}</td><td>{_num(w['rel_error'])}</td></tr>")
        parts.append("</table>")
    return "\n".join(parts)


def _plot_png(out: dict, comparison: OutputComparison) -> str:
    """Base64 PNG: histogram of log10 |error| and, when sampled, actual vs reference."""
    # The object API with an explicit Agg canvas never touches pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    has_scatter = comparison.sample is not None and len(comparison.sample[0]) > 0
    # margins fixed by hand: a constrained layout solves them on every draw, a third of a plot's time
    fig = Figure(figsize=(9 if has_scatter else 4.5, 3.0), dpi=80)
    fig.subplots_adjust(left=0.09 if has_scatter else 0.17, right=0.98, bottom=0.2, top=0.9, wspace=0.28)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_scatter else 1, squeeze=False)[0]
    hist = out["histogram"]
    edges = hist["log10_edges"]
    ax = axes[0]
    ax.bar(edges[:-1], hist["counts"], width=1.0, align="edge", color="#4c72b0")
    ax.axvline(math.log10(max(out["tolerance"]["atol"], 1e-12)), color="#c44e52", ls="--", lw=1, label="atol")
    ax.set_yscale("log")  # a handful of outliers must stay visible next to millions of tiny errors
    ax.set_ylim(bottom=0.5)
    ax.set_xlabel(f"log10 |actual - reference|\n(the first bin holds < 1e{edges[0]:.0f} and zeros)", fontsize=8)
    ax.set_ylabel("elements")
    ax.set_title("abs error", fontsize=10)
    ax.legend(fontsize=8)
    if has_scatter:
        ref, act = comparison.sample
        ax = axes[1]
        tol = out["tolerance"]
        bad = np.abs(act - ref) > tol["atol"] + tol["rtol"] * np.abs(ref)
        ax.scatter(ref[~bad], act[~bad], s=6, alpha=0.5, color="#4c72b0", linewidths=0, label="within tol")
        if bad.any():
            ax.scatter(ref[bad], act[bad], s=14, color="#c44e52", linewidths=0, label="out of tol")
        ax.legend(fontsize=8)
        lo, hi = float(min(ref.min(), act.min())), float(max(ref.max(), act.max()))
        ax.plot([lo, hi], [lo, hi], color="#c44e52", lw=1)
        ax.set_xlabel("reference")
        ax.set_ylabel("actual")
        ax.set_title(f"actual vs reference ({len(ref)} points)", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")
