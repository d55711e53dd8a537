"""numba_fa3: FlashAttention-3 for Hopper in Python (Numba + inline PTX).

`flash_attn` and `flash_attn_varlen` are the forward pass; `reference` and `blocked` are the NumPy reference and the NumPy
model of the kernel's blocked algorithm.
"""
from ptx_inline import _numpy_compat  # noqa: F401  (first: before numba-cuda loads)
from .api import flash_attn, flash_attn_varlen  # noqa: F401
