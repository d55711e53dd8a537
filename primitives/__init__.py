"""Kernel building blocks (see the README); the NumPy compatibility step comes first."""
from numba_fa3.ptx_inline import _numpy_compat  # noqa: F401  (first: before numba-cuda loads)
