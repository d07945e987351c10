"""Validation: run the PyTorch reference and a backend's runner on the same inputs and compare.

This module only sees numpy arrays and runners (``Runner.infer``), never a backend, so a
TensorRT engine and an ONNX Runtime session are checked by the same code. The pieces:

- :func:`make_inputs` / :func:`load_inputs`: the feeds (random, seeded; or from ``.npz``);
- :func:`torch_reference`: turns an ``nn.Module`` into a ``feeds -> outputs`` callable;
- :func:`compare_outputs`: per-tensor statistics and pass/fail against a :class:`Tolerance`;
- :func:`validate`: runs both sides and compares.

Tensor names are arbitrary strings, so fused-node boundary tensors (``node:<name>/<tensor>``)
go through :func:`compare_outputs` exactly like graph outputs.

The pass criterion, per element of one tensor, is numpy's ``allclose`` rule in float64::

    |actual - reference| <= atol + rtol * |reference|

and, for the whole tensor, ``cosine(actual, reference) >= min_cosine``. Any NaN/Inf in the
actual output where the reference is finite (or a reference NaN/Inf the actual does not
reproduce) fails the tensor. The statistics (errors, cosine) are computed over the elements
where both sides are finite.
"""

from __future__ import annotations

import contextlib
import fnmatch
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from attnc.compiler.backends import Runner, TensorSpec
from attnc.compiler.errors import AttncError, ValidationFailed


@dataclass(frozen=True)
class Tolerance:
    """Allowed difference between actual and reference: ``|a-r| <= atol + rtol*|r|`` per element,
    and cosine similarity of the whole tensor ``>= min_cosine``."""

    atol: float
    rtol: float
    min_cosine: float

    def __post_init__(self) -> None:
        if not (self.atol >= 0 and self.rtol >= 0 and -1 <= self.min_cosine <= 1):
            raise AttncError(f"invalid tolerance atol={self.atol}, rtol={self.rtol}, "
                             f"min_cosine={self.min_cosine}",
                             "use atol >= 0, rtol >= 0 and -1 <= min_cosine <= 1")

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


# Defaults per artefact precision. The unit roundoff u is 6e-8 (fp32), 4.9e-4 (fp16, 10-bit
# mantissa) and 3.9e-3 (bf16, 7-bit mantissa). A deployed transformer differs from PyTorch by
# reordered reductions, fused kernels (softmax/exp approximations) and, in reduced precision,
# by rounding every activation: errors grow roughly with sqrt(reduction length) * u * |terms|
# and through the layers. So fp32 allows ~1e3 u of relative slack for deep models and
# reordered matmuls (atol covers cancellation to ~0); fp16 allows ~20 u and bf16 ~8 u, i.e.
# a few roundings of O(1) activations. Cosine catches a systematically wrong tensor whose
# elements each stay inside a loose atol (e.g. small-magnitude outputs).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999),
    "bf16": Tolerance(atol=3e-2, rtol=3e-2, min_cosine=0.995),
}

# Histogram of |a - r| per tensor, over decades: edge i is 10**LOG10_EDGES[i]. Errors below
# the first edge (exact zeros included) count in the first bin, at or above the last edge in
# the last bin, so the bins of every tensor in every report line up.
LOG10_EDGES: tuple[float, ...] = tuple(float(e) for e in range(-12, 3))
_SCATTER_POINTS = 2000
_BATCH_LIKE = {"b", "bs", "batch", "batch_size", "batchsize", "n_batch", "num_batches"}
DEFAULT_BATCH = 2


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and non-finite counts of one side of a comparison."""

    shape: tuple[int, ...]
    dtype: str
    nan: int
    inf: int

    def to_dict(self) -> dict:
        return {"shape": [int(d) for d in self.shape], "dtype": self.dtype,
                "nan": int(self.nan), "inf": int(self.inf)}


@dataclass(frozen=True)
class ErrorStats:
    """Error statistics over the ``compared`` elements where both sides are finite.

    The error fields and ``cosine`` are None when no element could be compared (an empty
    tensor, or one that is entirely NaN/Inf on both sides).
    ``max_rel_error``/``mean_rel_error`` use ``|a-r| / (|r| + tiny)`` with ``tiny`` = the
    tensor's atol: near-zero references, whose pass/fail is governed by atol anyway, do not
    blow the statistic up, and for ``|r| >> atol`` it is the plain relative error.
    ``max_rel_error <= rtol`` implies every element passes the allclose rule (for rtol <= 1).
    """

    elements: int
    compared: int
    violations: int
    max_abs_error: float | None
    mean_abs_error: float | None
    max_rel_error: float | None
    mean_rel_error: float | None
    cosine: float | None

    def to_dict(self) -> dict:
        return {k: json_number(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class WorstElement:
    """One element with a large error: its multi-index and both values."""

    index: tuple[int, ...]
    reference: float
    actual: float
    abs_error: float
    rel_error: float

    def to_dict(self) -> dict:
        return {"index": [int(i) for i in self.index], "reference": json_number(self.reference),
                "actual": json_number(self.actual), "abs_error": json_number(self.abs_error),
                "rel_error": json_number(self.rel_error)}


@dataclass
class OutputComparison:
    """The comparison of one named tensor (a graph output, or an extra tensor such as a
    fused node's boundary ``node:<name>/<tensor>``).

    ``reference``/``actual`` are None for the side that lacks the tensor; ``stats``,
    ``worst`` and ``histogram`` are empty when the shapes could not be compared.
    ``sample`` holds up to 2,000 (reference, actual) value pairs for the report's scatter
    plot; it is not part of :meth:`to_dict`.
    """

    name: str
    kind: str
    passed: bool
    reasons: list[str]
    tolerance: Tolerance
    reference: TensorInfo | None = None
    actual: TensorInfo | None = None
    stats: ErrorStats | None = None
    worst: list[WorstElement] = field(default_factory=list)
    histogram: dict | None = None
    sample: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "passed": bool(self.passed),
            "reasons": list(self.reasons),
            "tolerance": self.tolerance.to_dict(),
            "reference": self.reference.to_dict() if self.reference else None,
            "actual": self.actual.to_dict() if self.actual else None,
            # Flat, so consumers read out["max_abs_error"]; all null when nothing was compared.
            **(self.stats.to_dict() if self.stats else dict.fromkeys(ErrorStats.__dataclass_fields__)),
            "worst": [w.to_dict() for w in self.worst],
            "histogram": dict(self.histogram) if self.histogram else None,
        }


@dataclass
class ValidationResult:
    """All comparisons of one validation run; ``passed`` only if every tensor passed. ``shrink_cost`` (a shrunk
    artefact validated against the model shrunk alike: :func:`attnc.compiler.reference.shrink_cost`) measures the
    artefact against the unshrunk model; it is not part of the verdict."""

    precision: str
    default_tolerance: Tolerance
    overrides: dict[str, Tolerance]
    outputs: list[OutputComparison]
    shrink_cost: list[dict] | None = None

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    @property
    def failed(self) -> list[OutputComparison]:
        return [o for o in self.outputs if not o.passed]

    def to_dict(self) -> dict:
        """JSON-safe dict (plain floats/ints/str/lists); the ``outputs`` part of report.json."""
        return {
            "passed": self.passed,
            "precision": self.precision,
            "tolerances": {"default": self.default_tolerance.to_dict(),
                           "overrides": {k: v.to_dict() for k, v in self.overrides.items()}},
            "outputs": [o.to_dict() for o in self.outputs],
            **({"shrink_cost": [{k: json_number(v) if isinstance(v, float) else v for k, v in row.items()}
                                for row in self.shrink_cost]} if self.shrink_cost is not None else {}),
        }

    def summary_table(self):
        """A rich table: one row per tensor with its key statistics and PASS/FAIL."""
        from rich.markup import escape
        from rich.table import Table

        verdict = "[bold green]PASSED[/]" if self.passed else "[bold red]FAILED[/]"
        table = Table(title=f"attnc validation ({self.precision}): {verdict}", title_justify="left")
        for column in ("tensor", "shape", "max abs err", "max rel err", "cosine", "atol / rtol / cos",
                       "result"):
            table.add_column(column, justify="left" if column in ("tensor", "result") else "right")
        for out in self.outputs:
            stats = out.stats
            side = out.reference or out.actual
            tol = out.tolerance
            result = "[green]pass[/]" if out.passed else f"[red]FAIL[/] {escape(out.reason)}"
            table.add_row(
                escape(out.name),
                _shape_str(side.shape) if side else "-",
                _fmt(stats.max_abs_error) if stats else "-",
                _fmt(stats.max_rel_error) if stats else "-",
                _fmt_cos(stats.cosine) if stats else "-",
                f"{tol.atol:.0e} / {tol.rtol:.0e} / {tol.min_cosine:g}",
                result,
            )
        if not self.outputs:
            table.add_row("(none)", "", "", "", "", "", "[red]FAIL[/] no tensors were compared")
        return table

    def raise_if_failed(self, where: str = "") -> None:
        """Raise :class:`ValidationFailed` (exit code 1) naming the failing tensors."""
        if self.passed:
            return
        names = [o.name for o in self.failed] or ["(no tensors compared)"]
        first = self.failed[0].reason if self.failed else "nothing to compare"
        raise ValidationFailed(
            f"validation failed for {len(names)} tensor(s): {', '.join(names[:5])}"
            f"{' ...' if len(names) > 5 else ''} (first: {first})",
            f"see {where}" if where else "see the accuracy report for the worst elements",
        )


# --------------------------------------------------------------------------- inputs


def token_id_bound(model) -> int | None:
    """The fewest rows among the constant tables that a ``Gather`` indexes with an integer graph input,
    as it is or only reshaped (GPT-2 views its ids as ``[-1, seq]`` first): an embedding's vocabulary,
    so random token ids below it are valid ids. ``None`` without such a table."""
    from onnx import TensorProto

    from attnc.passes.core import constant_value, node_attribute

    ints = {i.name for i in model.graph.input
            if i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)}
    for node in model.graph.node:   # graph order: a reshape's input is reached before the reshape
        if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast") and node.input[0] in ints:
            ints.add(node.output[0])
    rows = []
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in ints:
            table = constant_value(model, node.input[0])
            if table is not None and table.ndim:
                rows.append(table.shape[node_attribute(node, "axis", 0)])
    return min(rows) if rows else None


def make_inputs(
    specs: Sequence[TensorSpec],
    *,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    symbolic_defaults: Mapping[str, int] | None = None,
    int_high: int = 100,
) -> dict[str, np.ndarray]:
    """Random feeds for a model's inputs, reproducible from ``seed``.

    Floating inputs are standard normal; integer inputs are uniform in ``[0, int_high)``
    (token ids for a vocabulary of at least ``int_high``); inputs whose name contains
    ``mask`` are all ones (attend everywhere); bool inputs are random.

    Args:
        specs: the model's inputs (``runner.input_specs``).
        seed: seed of the numpy generator; inputs are drawn in ``specs`` order.
        shapes: full shapes for some inputs, ``{name: (1, 3, 224, 224)}``; they must match
            the static dims, and they bind the inputs' symbolic dims for the other inputs.
        symbolic_defaults: sizes for symbolic dims by name, e.g. ``{"seq": 128}``.
        int_high: exclusive upper bound of integer inputs.

    Returns:
        ``{name: array}`` in ``specs`` order, with each spec's dtype.

    Raises:
        AttncError: a dim cannot be resolved (the message names the input and the
            ``--input-shape`` flag), ``shapes`` names an unknown input or contradicts the
            model, or symbolic dims get two different sizes.
    """
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {s.name for s in specs})
    if unknown:
        raise AttncError(f"--input-shape names unknown inputs {unknown}; the model takes "
                         f"{[s.name for s in specs]}", "use the input names shown by `attnc inspect`")
    bindings = {str(k): int(v) for k, v in (symbolic_defaults or {}).items()}
    resolved: dict[str, tuple[int, ...]] = {}
    # Explicit shapes first: they bind symbols that other inputs share (batch, seq, ...).
    for spec in specs:
        if spec.name in shapes:
            resolved[spec.name] = _bind_shape(spec, tuple(int(d) for d in shapes[spec.name]),
                                              bindings, explicit=True, source="--input-shape")
    for spec in specs:
        if spec.name not in resolved:
            resolved[spec.name] = _resolve_symbolic(spec, bindings)

    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in specs:
        feeds[spec.name] = _random_tensor(rng, spec, resolved[spec.name], int_high)
    return feeds


def _pretty(shape: Sequence) -> str:
    return "x".join(str(d) if isinstance(d, int) and d > 0 else str(d or "?") for d in shape)


def _is_static(dim) -> bool:
    return isinstance(dim, (int, np.integer)) and dim > 0


def _bind_shape(spec: TensorSpec, shape: tuple[int, ...], bindings: dict[str, int], *,
                explicit: bool, source: str) -> tuple[int, ...]:
    """Check ``shape`` against ``spec`` and record the sizes of its symbolic dims."""
    if len(shape) != len(spec.shape):
        raise AttncError(f"{source} gives input {spec.name!r} shape {_pretty(shape)}, but the model "
                         f"expects rank {len(spec.shape)} [{_pretty(spec.shape)}]",
                         f"give {len(spec.shape)} dims, e.g. --input-shape {spec.name}:"
                         + "x".join(str(d) if _is_static(d) else "1" for d in spec.shape))
    for axis, (want, got) in enumerate(zip(spec.shape, shape)):
        if got < 0 or (got == 0 and explicit):
            raise AttncError(f"{source} gives input {spec.name!r} a non-positive size {got} "
                             f"on axis {axis}", "use positive sizes, e.g. 1x3x224x224")
        if _is_static(want) and want != got:
            raise AttncError(f"{source} gives input {spec.name!r} shape {_pretty(shape)}, but axis "
                             f"{axis} is fixed to {want} in the model [{_pretty(spec.shape)}]",
                             "keep the model's static dims, or re-export with a dynamic axis there")
        if isinstance(want, str) and want:
            if want in bindings and bindings[want] != got:
                raise AttncError(f"symbolic dim {want!r} is {bindings[want]} elsewhere but {got} on "
                                 f"axis {axis} of input {spec.name!r} ({source})",
                                 "give inputs that share a symbolic dim the same size")
            bindings[want] = got
    return tuple(shape)


def _resolve_symbolic(spec: TensorSpec, bindings: dict[str, int]) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(spec.shape):
        if _is_static(dim):
            shape.append(int(dim))
            continue
        name = dim if isinstance(dim, str) and dim else None
        if name is not None and name in bindings:
            shape.append(bindings[name])
        elif name is not None and (name.lower() in _BATCH_LIKE or "batch" in name.lower()):
            bindings[name] = DEFAULT_BATCH
            shape.append(DEFAULT_BATCH)
        else:
            label = f"symbolic dim {name!r}" if name else "an unnamed dynamic dim"
            example = "x".join(str(d) if _is_static(d) else str(bindings.get(d, 16)) if isinstance(d, str)
                               else "16" for d in spec.shape)
            raise AttncError(
                f"cannot choose a size for input {spec.name!r} [{_pretty(spec.shape)}]: axis {axis} "
                f"is {label}",
                f"pass its shape with --input-shape {spec.name}:{example} (sizes of your choice)")
    return tuple(shape)


def _random_tensor(rng: np.random.Generator, spec: TensorSpec, shape: tuple[int, ...],
                   int_high: int) -> np.ndarray:
    dtype = np.dtype(spec.dtype)
    if "mask" in spec.name.lower() and dtype.kind in "biuf":
        return np.ones(shape, dtype=dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        high = min(int(int_high), int(np.iinfo(dtype).max) + 1)
        if high < 1:
            raise AttncError(f"int_high must be >= 1 for integer input {spec.name!r}, got {int_high}",
                             "pass a vocabulary size of at least 1")
        return rng.integers(0, high, size=shape, dtype=dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    raise AttncError(f"cannot make random values for input {spec.name!r} of dtype {dtype}",
                     "pass the inputs in an .npz file (--inputs)")


def load_inputs(npz_path: str | Path, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Read feeds from a ``.npz`` (one array per model input, keyed by input name).

    Arrays are cast to each input's dtype when the cast keeps their kind (float64 to
    float32, int32 to int64); other casts are refused.

    Raises:
        AttncError: missing/unreadable file, missing or unknown names, a rank or static
            dim that differs from the model, inconsistent symbolic dims, or a dtype that
            cannot be cast safely.
    """
    path = Path(npz_path)
    if not path.is_file():
        raise AttncError(f"{path}: no such inputs file", "check the --inputs path")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise AttncError(f"{path} holds a single array, not an .npz of named inputs",
                             "save the inputs with np.savez(path, **{name: array})")
        with data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AttncError(f"{path} is not a readable .npz file ({type(exc).__name__}: {str(exc)[:120]})",
                         "save the inputs with np.savez(path, **{name: array})") from None
    names = [s.name for s in specs]
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    if missing or extra:
        parts = ([f"lacks inputs {missing}"] if missing else []) + (
            [f"has arrays {extra} that are not model inputs"] if extra else [])
        raise AttncError(f"{path} {' and '.join(parts)}; the model takes {names}",
                         "key each array by the model's input name (see `attnc inspect`)")
    bindings: dict[str, int] = {}
    feeds = {}
    for spec in specs:
        array = arrays[spec.name]
        _bind_shape(spec, tuple(array.shape), bindings, explicit=False, source=str(path))
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            if not np.can_cast(array.dtype, want, casting="same_kind"):
                raise AttncError(f"{path}: input {spec.name!r} is {array.dtype}, the model takes {want}",
                                 f"save {spec.name!r} as {want}")
            array = array.astype(want)
        feeds[spec.name] = array
    return feeds


# --------------------------------------------------------------------------- comparison


def json_number(x: float | None) -> float | str | None:
    """A float for JSON: non-finite values become the strings "NaN", "Infinity", "-Infinity"."""
    if x is None:
        return None
    x = float(x)
    if np.isnan(x):
        return "NaN"
    if np.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return x


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}" if x == 0 else f"{x:.2e}"


def _fmt_cos(x: float | None) -> str:
    return "-" if x is None else f"{x:.7f}"


def _tolerance_for(name: str, default: Tolerance, overrides: Mapping[str, Tolerance]) -> Tolerance:
    if name in overrides:
        return overrides[name]
    for pattern, tol in overrides.items():
        if fnmatch.fnmatchcase(name, pattern):
            return tol
    return default


def _info(array: np.ndarray) -> TensorInfo:
    if array.dtype.kind in "fc":
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    else:
        nan = inf = 0
    return TensorInfo(tuple(int(d) for d in array.shape), str(array.dtype), nan, inf)


def _cosine(a: np.ndarray, r: np.ndarray) -> float:
    """Cosine similarity in float64; scaled first so huge values cannot overflow the dot."""
    scale = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(r), initial=0.0)))
    if scale == 0.0:
        return 1.0  # both all-zero: identical
    a, r = a / scale, r / scale
    na, nr = float(np.sqrt(np.dot(a, a))), float(np.sqrt(np.dot(r, r)))
    if na == 0.0 or nr == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, r) / (na * nr), -1.0, 1.0))


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _index(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(int(i) for i in np.unravel_index(int(flat), shape)) if shape else ()


def compare_tensor(name: str, reference, actual, tolerance: Tolerance, *, worst_k: int = 10,
                   kind: str = "output") -> OutputComparison:
    """Compare one tensor pair (see the module docstring for the rule)."""
    ref, act = np.asarray(reference), np.asarray(actual)
    out = OutputComparison(name=name, kind=kind, passed=False, reasons=[], tolerance=tolerance,
                           reference=_info(ref), actual=_info(act))
    for side, array in (("reference", ref), ("actual", act)):
        if array.dtype.kind not in "biuf":
            out.reasons.append(f"the {side} tensor has dtype {array.dtype}, which attnc does not compare")
    if ref.shape != act.shape:
        out.reasons.append(f"shape mismatch: reference {_shape_str(ref.shape)} vs actual {_shape_str(act.shape)}")
    if out.reasons:
        return out

    r = ref.astype(np.float64).ravel()
    a = act.astype(np.float64).ravel()
    r_fin, a_fin = np.isfinite(r), np.isfinite(a)
    both = r_fin & a_fin
    # Non-finite values match only exactly: NaN with NaN, +Inf with +Inf, -Inf with -Inf.
    same_nonfinite = ~both & ((np.isnan(r) & np.isnan(a)) | (np.isinf(r) & (r == a)))
    bad_actual = r_fin & ~a_fin
    bad_reference = ~r_fin & ~same_nonfinite
    mismatch_flat = np.flatnonzero(bad_actual | bad_reference)
    if bad_actual.any():
        n_nan = int(np.isnan(a[bad_actual]).sum())
        n_inf = int(bad_actual.sum()) - n_nan
        what = " and ".join(p for p in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if p)
        first = _index(np.flatnonzero(bad_actual)[0], ref.shape)
        out.reasons.append(f"actual has {what} where the reference is finite (first at index {first})")
    if bad_reference.any():
        first_flat = np.flatnonzero(bad_reference)[0]
        out.reasons.append(f"reference has {int(bad_reference.sum())} NaN/Inf value(s) the actual does "
                           f"not reproduce (first at index {_index(first_flat, ref.shape)}: "
                           f"reference {r[first_flat]}, actual {a[first_flat]})")

    tiny = max(tolerance.atol, np.finfo(np.float64).tiny)
    compared = np.flatnonzero(both)
    rc, ac = r[compared], a[compared]
    diff = np.abs(ac - rc)
    rel = diff / (np.abs(rc) + tiny)
    allowed = tolerance.atol + tolerance.rtol * np.abs(rc)
    over = diff > allowed
    n = compared.size
    cosine = _cosine(ac, rc) if n else None
    out.stats = ErrorStats(
        elements=int(r.size), compared=int(n), violations=int(over.sum()) + int(mismatch_flat.size),
        max_abs_error=float(diff.max()) if n else None, mean_abs_error=float(diff.mean()) if n else None,
        max_rel_error=float(rel.max()) if n else None, mean_rel_error=float(rel.mean()) if n else None,
        cosine=cosine,
    )
    if over.any():
        # Name the element that breaks the rule by the largest factor, with its allowance.
        with np.errstate(divide="ignore", invalid="ignore"):  # atol = rtol = 0 is allowed
            ratio = diff / allowed
        j = int(np.argmax(np.where(over, ratio, -np.inf)))
        out.reasons.append(
            f"{int(over.sum())} of {r.size} elements exceed atol {tolerance.atol:.0e} + rtol "
            f"{tolerance.rtol:.0e}·|ref| (max abs error {diff.max():.2e}; worst at index "
            f"{_index(compared[j], ref.shape)}: |{ac[j]:.6g} - {rc[j]:.6g}| = {diff[j]:.2e} > {allowed[j]:.2e})")
    if cosine is not None and cosine < tolerance.min_cosine:
        out.reasons.append(f"cosine similarity {cosine:.7f} < min_cosine {tolerance.min_cosine:g}")

    # Worst elements: unmatched NaN/Inf first, then the largest finite absolute errors
    # (ties broken by position, so the order is reproducible).
    top = np.argpartition(-diff, worst_k - 1)[:worst_k] if n > worst_k > 0 else np.arange(min(n, worst_k))
    top = top[np.lexsort((compared[top], -diff[top]))]
    top = top[diff[top] > 0]  # an exact match is not a "worst" element
    worst = [WorstElement(_index(flat, ref.shape), float(r[flat]), float(a[flat]), float("inf"), float("inf"))
             for flat in mismatch_flat[:worst_k]]
    worst += [WorstElement(_index(compared[j], ref.shape), float(rc[j]), float(ac[j]), float(diff[j]),
                           float(rel[j])) for j in top[:max(worst_k - len(worst), 0)]]
    out.worst = worst

    log_err = np.log10(np.clip(diff, 10.0 ** LOG10_EDGES[0], 10.0 ** LOG10_EDGES[-1]))
    counts = np.histogram(log_err, bins=LOG10_EDGES)[0]
    out.histogram = {"log10_edges": list(LOG10_EDGES), "counts": [int(c) for c in counts],
                     "exact_zero": int((diff == 0).sum())}
    if n:
        pick = np.union1d(np.linspace(0, n - 1, min(n, _SCATTER_POINTS)).astype(np.int64), top)
        out.sample = (rc[pick], ac[pick])
    out.passed = not out.reasons
    return out


def compare_outputs(
    reference: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
    *,
    precision: str = "fp32",
    tolerances: Mapping[str, Tolerance] | None = None,
    worst_k: int = 10,
    kind: str = "output",
) -> ValidationResult:
    """Compare every tensor of ``actual`` against ``reference``, by name.

    Args:
        reference: ``{name: array}`` from PyTorch (the truth).
        actual: ``{name: array}`` from the artefact.
        precision: ``fp32``/``fp16``/``bf16``: picks the default :data:`TOLERANCES` entry.
        tolerances: per-tensor overrides, keyed by exact name or an ``fnmatch`` pattern
            (``"node:*"``); exact names win, then the first matching pattern.
        worst_k: how many worst elements to keep per tensor.
        kind: label stored on each comparison (``"output"``; ``"extra"`` for boundary tensors).

    Returns:
        A :class:`ValidationResult`: reference names in order, then names only in ``actual``.
        A name missing from either side is a failed entry, as is a shape mismatch.

    Raises:
        AttncError: unknown precision, or a tolerance override that names no tensor.
    """
    default = _default_tolerance(precision)
    overrides = dict(tolerances or {})
    result = ValidationResult(precision, default, overrides, [])
    _check_overrides(overrides, list(reference) + list(actual))
    result.outputs = _compare_all(reference, actual, default, overrides, worst_k, kind)
    return result


def _default_tolerance(precision: str) -> Tolerance:
    if precision not in TOLERANCES:
        raise AttncError(f"unknown precision {precision!r}", f"use one of {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]


def _check_overrides(overrides: Mapping[str, Tolerance], names: Sequence[str]) -> None:
    for key, tol in overrides.items():
        if not isinstance(tol, Tolerance):
            raise AttncError(f"tolerance for {key!r} is {type(tol).__name__}, not a Tolerance",
                             "build it with attnc.compiler.validate.Tolerance(atol, rtol, min_cosine)")
        if key not in names and not any(fnmatch.fnmatchcase(n, key) for n in names):
            raise AttncError(f"a tolerance is given for {key!r}, which names no compared tensor "
                             f"(tensors: {sorted(set(names))[:10]})", "check the output name")


def _compare_all(reference, actual, default, overrides, worst_k, kind) -> list[OutputComparison]:
    comparisons = []
    for name in reference:
        tol = _tolerance_for(name, default, overrides)
        if name not in actual:
            comparisons.append(OutputComparison(
                name, kind, False, [f"{name!r} is missing from the artefact's outputs"], tol,
                reference=_info(np.asarray(reference[name]))))
            continue
        comparisons.append(compare_tensor(name, reference[name], actual[name], tol,
                                          worst_k=worst_k, kind=kind))
    for name in actual:
        if name not in reference:
            comparisons.append(OutputComparison(
                name, kind, False, [f"the artefact has an output {name!r} that the reference lacks"],
                _tolerance_for(name, default, overrides), actual=_info(np.asarray(actual[name]))))
    return comparisons


# --------------------------------------------------------------------------- running both sides


def validate(
    reference_fn: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    runner: Runner,
    feeds: dict[str, np.ndarray],
    *,
    precision: str = "fp32",
    tolerances: Mapping[str, Tolerance] | None = None,
    extra: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    worst_k: int = 10,
) -> ValidationResult:
    """Run ``reference_fn`` and ``runner`` on ``feeds`` and compare their outputs.

    Args:
        reference_fn: ``feeds -> {output_name: array}``, e.g. :func:`torch_reference`.
        runner: any backend's runner (``runner.infer(feeds)``).
        feeds: the inputs, e.g. from :func:`make_inputs` or :func:`load_inputs`.
        precision: the artefact's precision; picks the default tolerance.
        tolerances: per-tensor overrides (exact name or ``fnmatch`` pattern).
        extra: more tensors to compare, ``{name: (reference, actual)}``, e.g. fused-node
            boundaries named ``node:<name>/<tensor>``; they get ``kind="extra"``.
        worst_k: worst elements kept per tensor.

    Returns:
        The :class:`ValidationResult` (graph outputs first, then ``extra``).
    """
    default = _default_tolerance(precision)
    reference = {k: np.asarray(v) for k, v in reference_fn(dict(feeds)).items()}
    actual = {k: np.asarray(v) for k, v in runner.infer(dict(feeds)).items()}
    extra = dict(extra or {})
    clash = sorted(set(extra) & (set(reference) | set(actual)))
    if clash:
        raise AttncError(f"extra tensors {clash} have the names of graph outputs",
                         "prefix boundary tensors, e.g. node:<name>/<tensor>")
    overrides = dict(tolerances or {})
    _check_overrides(overrides, list(reference) + list(actual) + list(extra))
    outputs = _compare_all(reference, actual, default, overrides, worst_k, "output")
    outputs += _compare_all({k: v[0] for k, v in extra.items()}, {k: v[1] for k, v in extra.items()},
                            default, overrides, worst_k, "extra")
    return ValidationResult(precision, default, overrides, outputs)


@contextlib.contextmanager
def eval_mode(module, kv_cache: bool = False):
    """Run the block with ``module.eval()``, then restore its train/eval mode; unless ``kv_cache``,
    also without transformers' KV cache (:func:`kv_cache_off`)."""
    was_training = module.training
    module.eval()
    try:
        with contextlib.nullcontext() if kv_cache else kv_cache_off(module):
            yield module
    finally:
        module.train(was_training)


@contextlib.contextmanager
def kv_cache_off(module):
    """Run the block with every transformers ``config.use_cache`` in ``module`` switched off.

    With it on, a transformers model's forward returns its ``past_key_values``: a ``DynamicCache``
    that torch.export cannot return and that is no output of a prefill graph. (TorchScript needs
    it on: without a cache, transformers 5 builds its mask with ``aten::diff``, which TorchScript
    does not export.)
    """
    configs = {id(c): c for m in module.modules() if getattr(c := getattr(m, "config", None), "use_cache", False)}
    for config in configs.values():
        config.use_cache = False
    try:
        yield module
    finally:
        for config in configs.values():
            config.use_cache = True


def torch_reference(model, input_names: Sequence[str], output_names: Sequence[str]
                    ) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Wrap an ``nn.Module`` as ``feeds -> {output_name: array}`` for :func:`validate`.

    The module runs in eval mode under ``torch.no_grad`` (its training flag is restored
    afterwards), with the feeds as positional arguments in ``input_names`` order, converted
    to tensors of the same dtype on the module's device. Nested tuple/list/dict outputs are
    flattened in order (as the ONNX exporters do) and mapped onto ``output_names``;
    bfloat16 outputs come back as float32 (numpy has no bfloat16).

    Raises:
        AttncError: a feed is missing, or the model returns a different number of tensors
            than ``output_names``.
    """
    import torch

    input_names, output_names = list(input_names), list(output_names)

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in input_names if n not in feeds]
        if missing:
            raise AttncError(f"the reference model needs inputs {missing} that the feeds lack",
                             f"pass every input: {input_names}")
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in input_names]
        with eval_mode(model), torch.no_grad():
            result = model(*args)
        tensors = _flatten(result)
        if len(tensors) != len(output_names):
            raise AttncError(f"the PyTorch model returns {len(tensors)} tensors but the artefact has "
                             f"{len(output_names)} outputs {output_names}",
                             "compare against the module that was exported, with the same forward")
        return {name: _to_numpy(t) for name, t in zip(output_names, tensors)}

    return run


def _flatten(value) -> list:
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return [] if value is None else [value]


def _to_numpy(tensor) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        return np.asarray(tensor)
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy()
