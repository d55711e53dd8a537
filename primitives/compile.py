"""Compiling kernels for sm_90a, with or without a GPU.

`cuda.compile_ptx` works without a GPU, but Numba compiles the *device functions* a kernel calls
for "the current device", which needs a driver.  On a machine without one (CI), `compile_ptx`
here tells Numba the current device is an sm_90a part for the duration of the call; the device
functions' LLVM IR is linked into the kernel and compiled once, for the kernel's target.
"""
import contextlib
import functools
import os
import re
import shutil
import subprocess
import tempfile
from types import SimpleNamespace

from numba import cuda

#: The only target this library builds for: Hopper with the arch-specific features (wgmma,
#: setmaxnreg) that plain sm_90 lacks.
HOPPER = (9, 0, "a")


@functools.lru_cache(maxsize=None)
def _have_driver():
    try:
        return cuda.is_available()
    except Exception:  # pragma: no cover - any driver failure means "no"
        return False


@contextlib.contextmanager
def _assume_hopper():
    if _have_driver():
        yield
        return
    from numba.cuda import dispatcher
    real = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=HOPPER)
    try:
        yield
    finally:
        dispatcher.get_current_device = real


def compile_ptx(fn, signature, threads):
    """PTX of kernel `fn` for sm_90a with launch bounds (threads, 1): the register cap that
    setmaxnreg needs."""
    with _assume_hopper():
        ptx, _ = cuda.compile_ptx(fn, signature, cc=HOPPER, launch_bounds=(threads, 1))
    return ptx


def find_ptxas():
    """ptxas from the nvidia-cuda-nvcc wheel (same 13.0 as the driver) or else from PATH."""
    try:
        import nvidia.cu13 as cu13  # nvidia-cuda-nvcc 13.x installs under nvidia/cu13
        for root in cu13.__path__:  # a namespace package: no __file__
            cand = os.path.join(root, "bin", "ptxas")
            if os.path.exists(cand):
                return cand
    except ImportError:
        pass
    return shutil.which("ptxas")


_STATS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def ptxas_report(ptx, cubin=None):
    """Assemble PTX for sm_90a; return dict(registers, stack, spill_stores, spill_loads,
    warnings=[lines], log=str).  Raises if ptxas rejects the PTX.  `cubin`: a path to keep the
    assembled cubin at (for `bench sass`)."""
    exe = find_ptxas()
    if exe is None:
        raise RuntimeError("ptxas not found: install nvidia-cuda-nvcc==13.0.* (see README)")
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), cubin or os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([exe, "-arch=sm_90a", "-v", src, "-o", out], capture_output=True, text=True)
    log = r.stdout + r.stderr
    if r.returncode:
        raise RuntimeError(f"ptxas failed:\n{log}")
    stats = _STATS.search(log)
    regs = _REGS.search(log)
    return dict(registers=int(regs.group(1)) if regs else None,
                stack=int(stats.group(1)), spill_stores=int(stats.group(2)),
                spill_loads=int(stats.group(3)),
                warnings=[ln for ln in log.splitlines() if _is_warning(ln)], log=log)


def _is_warning(line):
    """A ptxas warning, or one of its performance notes (C75xx: wgmma serialized, e.g. C7510 for
    a wgmma pipeline crossing a function boundary, C7512 for too few registers), which ptxas
    prints as info lines."""
    return "warning" in line.lower() or "Performance Loss" in line
