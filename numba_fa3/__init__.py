"""numba_fa3: FlashAttention-3 for Hopper in Python (Numba + inline PTX).

`flash_attn` and `flash_attn_varlen` are the forward pass, `flash_attn_backward` and
`flash_attn_varlen_backward` its gradients, `flash_attn_fp8` the FP8 forward (and
`flash_attn(..., precision="fp8")`); `reference` and `blocked` are the NumPy reference and the NumPy
model of the kernel's blocked algorithm.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _mount_beside():
    """Installed, numba_fa3.ptx_inline and numba_fa3.primitives are subpackages (pyproject.toml's
    package-dir maps the repository's ptx_inline/ and primitives/ folders there, so no generic
    top-level name lands in site-packages).  In a source checkout run with
    PYTHONPATH=<repository>, those folders sit beside numba_fa3/: load them from there under the
    same names."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    for name in ("ptx_inline", "primitives"):  # ptx_inline first: primitives imports it
        full = f"{__name__}.{name}"
        init = _os.path.join(_os.path.dirname(here), name, "__init__.py")
        if full in _sys.modules or _os.path.isdir(_os.path.join(here, name)) or not _os.path.isfile(init):
            continue
        spec = _importlib_util.spec_from_file_location(full, init,
                                                       submodule_search_locations=[_os.path.dirname(init)])
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[full] = module
        globals()[name] = module
        spec.loader.exec_module(module)


_mount_beside()

from numba_fa3.ptx_inline import _numpy_compat  # noqa: E402,F401  (first: before numba-cuda loads)
from .api import (flash_attn, flash_attn_backward, flash_attn_varlen,  # noqa: E402,F401
                  flash_attn_varlen_backward)
from .api_fp8 import flash_attn_fp8, flash_attn_fp8_varlen  # noqa: E402,F401
