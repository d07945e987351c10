"""Test-session settings shared by every test module."""

from __future__ import annotations

import os


def pytest_configure(config):
    """Give each pytest-xdist worker its share of the cores for torch's intra-op pool.

    Each worker's torch would otherwise start one thread per core, and on CI's 2 cores two
    workers' spinning pools slow training-based tests (the digits ViT) by 20x or more.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """Run ``slow``-marked tests first: under pytest-xdist the multi-minute ones (the kernels'
    ahead-of-time compiles) then overlap with the rest instead of queueing at the end.

    ``full``-marked tests run with ``ATTNC_FULL_TESTS=1`` only: each repeats, with the other exporter,
    a case CI already checks with one (a dynamo export of a transformers model costs 10-25 s on CI's
    cores), so that the CI suite stays well under its 15 minutes. Run them before a release, or when
    a change touches what the exporters emit."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if os.environ.get("ATTNC_FULL_TESTS") != "1":
        import pytest

        skip = pytest.mark.skip(reason="full tier: the other exporter of a case CI checks; ATTNC_FULL_TESTS=1 runs it")
        for item in items:
            if item.get_closest_marker("full"):
                item.add_marker(skip)


# ----------------------------------------------------------------------------- export memo

_MEMO: dict[str, tuple[bytes, float]] = {}
_MEMO_ON = {"test": False}
_MEMO_COUNTS = {"served": 0, "exported": 0, "not keyable": 0, "test patches": 0, "seconds saved": 0}


def pytest_runtest_setup(item):
    """The export memo serves a test unless it patches anything (``monkeypatch``): a patched function
    that the export traces would not be in the memo's key."""
    _MEMO_ON["test"] = os.environ.get("ATTNC_TEST_EXPORT_MEMO", "1") != "0" and \
        "monkeypatch" not in getattr(item, "fixturenames", ())


def pytest_sessionstart(session):
    """Export each distinct (model, inputs, options) once per test process.

    Exports are more than half of the suite's time (dynamo's alone about 3.5 s each), and a third of
    them repeat one another's: the same small model exported by several tests (a fixture's model
    fused by one test, pruned by the next). ``_export_with`` is a pure function of the module's code,
    weights, settings and the export's arguments, so a repeat gets a copy of the first result. The
    key (:func:`_export_key`) hashes every parameter and buffer in full, every submodule's class and
    plain attributes (a transformers config as JSON), the inputs' bytes and every argument; objects
    it cannot serialise enter by identity, so they can only make a miss, not a false hit. Exceptions
    are not memoised. ``ATTNC_TEST_EXPORT_MEMO=0`` turns it off.
    """
    import time

    import onnx

    from attnc.compiler import export

    original = export._export_with

    def memoised(exporter, model, inputs, opset, dynamic_axes, input_names, output_names):
        key = _export_key(exporter, model, inputs, opset, dynamic_axes, input_names, output_names) \
            if _MEMO_ON["test"] else None
        if key is None or key not in _MEMO:
            _MEMO_COUNTS["exported" if key else "not keyable" if _MEMO_ON["test"] else "test patches"] += 1
            start = time.perf_counter()
            proto = original(exporter, model, inputs, opset, dynamic_axes, input_names, output_names)
            if key is not None:
                _MEMO[key] = proto.SerializeToString(), time.perf_counter() - start
            return proto
        _MEMO_COUNTS["served"] += 1
        _MEMO_COUNTS["seconds saved"] += round(_MEMO[key][1])
        return onnx.load_from_string(_MEMO[key][0])

    export._export_with = memoised


class _Unkeyable(Exception):
    """A value the memo's key cannot capture by content: that export is not memoised."""


def _export_key(exporter, model, inputs, *args) -> str | None:
    """A digest of everything an export reads (see :func:`pytest_sessionstart`), or None when some
    attribute is an object it cannot capture by content (then the export runs)."""
    import enum
    import functools
    import hashlib
    import types

    import torch

    digest = hashlib.sha256(repr((exporter, args)).encode())

    def add(value, depth=0):
        if depth > 6:
            raise _Unkeyable
        if isinstance(value, torch.Tensor):
            digest.update(f"T{value.dtype}{tuple(value.shape)}".encode())
            flat = value.detach().cpu().contiguous().reshape(-1)   # 0-d tensors cannot be viewed as bytes
            digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
            digest.update(f"{type(value).__name__}{len(value)}".encode())
            for item in items:
                add(item, depth + 1)
        elif isinstance(value, dict):
            digest.update(f"{type(value).__name__}".encode())
            for k in sorted(value, key=repr):
                digest.update(repr(k).encode())
                add(value[k], depth + 1)
        elif value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum, torch.dtype,
                                                 torch.device, torch.Size, type(...))):
            digest.update(repr(value).encode())
        elif isinstance(value, type):
            digest.update(f"C{value.__module__}.{value.__qualname__}".encode())
        elif isinstance(value, types.FunctionType):
            code = value.__code__
            digest.update(f"F{value.__module__}.{value.__qualname__}".encode() + code.co_code + repr(code.co_consts).encode())
            add(value.__defaults__, depth + 1)
            add([cell.cell_contents for cell in value.__closure__ or ()], depth + 1)
        elif isinstance(value, (types.BuiltinFunctionType, types.MethodWrapperType)) or \
                type(value).__module__.startswith("torch._ops"):
            digest.update(f"B{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}".encode())
        elif isinstance(value, functools.partial):
            add((value.func, value.args, value.keywords), depth + 1)
        elif isinstance(value, torch.nn.Module):   # a submodule held outside _modules: its content
            for name, tensor in [*value.named_parameters(), *value.named_buffers()]:
                digest.update(name.encode())
                add(tensor, depth + 1)
            digest.update(f"M{type(value).__qualname__}".encode())
        elif hasattr(value, "to_json_string"):   # a transformers config, attention implementation included
            digest.update(value.to_json_string().encode())
            digest.update(repr(getattr(value, "_attn_implementation", None)).encode())
        else:
            raise _Unkeyable

    try:
        add(inputs)
        for name, module in model.named_modules():
            digest.update(f"M{name}:{type(module).__module__}.{type(module).__qualname__}".encode())
            for attr, value in sorted(vars(module).items()):
                if attr not in ("_parameters", "_buffers", "_modules"):
                    digest.update(attr.encode())
                    add(value)
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            digest.update(name.encode())
            add(tensor)
    except _Unkeyable:
        return None
    return digest.hexdigest()


def pytest_terminal_summary(terminalreporter):
    if sum(_MEMO_COUNTS.values()):
        terminalreporter.write_line("export memo (this process): " +
                                    ", ".join(f"{v} {k}" for k, v in _MEMO_COUNTS.items()))
