"""NumPy 2.5 with numba-cuda 0.30.4.

numba-cuda 0.30.4 registers an overload of `np.row_stack` when it loads its NumPy typing (at the
first compile: numba/cuda/np/arrayobj.py, `overload(np.row_stack)(impl_np_vstack)` under
`numpy_version >= (2, 0)`), and NumPy 2.5 removed that alias of `np.vstack`, so the first compile
fails with "module 'numpy' has no attribute 'row_stack'".  Restoring the alias before numba-cuda
loads makes that line register its vstack overload once more, on `np.vstack` itself.

Each package of this library imports this module before anything that imports numba-cuda.
Remove it once numba-cuda guards that line (the `numpy<2.5` pin is lifted because of it).
"""
import numpy as np

if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack
