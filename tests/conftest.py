"""Shared test setup: the `gpu` marker skips cleanly where there is no Hopper GPU."""
import functools
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@functools.lru_cache(maxsize=None)
def hopper_available():
    try:
        from numba import cuda
        return cuda.is_available() and cuda.get_current_device().compute_capability == (9, 0)
    except Exception:
        return False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an sm_90 (Hopper) GPU; skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if hopper_available():
        return
    skip = pytest.mark.skip(reason="no Hopper (sm_90) GPU here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
