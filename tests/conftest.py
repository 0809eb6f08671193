"""Shared test configuration.

* ``FASTSWIN_CHECK_FINITE`` defaults to 1 under pytest, so NaN inputs raise.
* ``gpu``-marked tests are skipped with a reason when no CUDA device is present.
* ``triton``-marked tests need a CUDA device or ``TRITON_INTERPRET=1`` (set by
  ``scripts/run_tests.sh`` before any Triton import on CPU machines).
"""
import os

import pytest
import torch

os.environ.setdefault("FASTSWIN_CHECK_FINITE", "1")


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(reason="needs a CUDA device or TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not (has_cuda or interp):
            item.add_marker(skip_triton)


@pytest.fixture
def seed(request):
    """A fresh, reproducible seed per test (from its node id), so cases draw different inputs."""
    import zlib

    s = zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    torch.manual_seed(s)
    return s
