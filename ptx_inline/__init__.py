"""Inline-PTX intrinsics for Hopper (sm_90a), one module per PTX instruction family.

Each function is a Numba `@intrinsic` that lowers to one inline-asm statement; docstrings name
the PTX ISA section.  Import the modules, e.g. ``from numba_fa3.ptx_inline import wgmma, tma, mbarrier``.
"""
from . import _numpy_compat  # noqa: F401  (first: before numba-cuda loads)
from . import atomic, barrier, cluster, convert, mbarrier, memory, regs, special, tma, wgmma  # noqa: F401
