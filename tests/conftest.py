"""Shared test setup: the `gpu` marker skips cleanly where there is no Hopper GPU; hypothesis
without its per-example deadline."""
import functools
import os
import sys

import pytest
from hypothesis import settings

# An example's time depends on the machine's load (a 2-core CI machine compiling kernels beside
# it, a first call importing NumPy's or Numba's lazily loaded parts): the 200 ms default deadline
# failed a 0.4 ms example that took 308 ms once.  Slowness is the benchmarks' business, not the
# property tests'.
settings.register_profile("numba_fa3", deadline=None)
settings.load_profile("numba_fa3")

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
