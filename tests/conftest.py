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
    cores), or runs at a size CI checks scaled down (a model past 2 GiB: two minutes and 11 GB), so
    that the CI suite stays well under its 15 minutes. Run them before a release, or when a change
    touches what the exporters emit or how models are read and written. ``full(reason=...)`` says why
    a test is in that tier."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if os.environ.get("ATTNC_FULL_TESTS") != "1":
        import pytest

        for item in items:
            marker = item.get_closest_marker("full")
            if marker:
                why = marker.kwargs.get("reason", "the other exporter of a case CI checks")
                item.add_marker(pytest.mark.skip(reason=f"full tier: {why}; ATTNC_FULL_TESTS=1 runs it"))

