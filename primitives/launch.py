"""Compiling a kernel for this GPU and launching it with little Python in between.

Kernels in this library take only scalars (addresses, sizes), so a launch is: normalize the
stream, call the compiled kernel.  Going to the compiled overload directly skips the dispatcher's
per-call type resolution and its small-grid warning (persistent grids are small on purpose).
"""
import functools

from numba import cuda

from .compile import HOPPER


def as_stream(stream):
    """cuda.core stream from None/0 (legacy default), an int handle, a Numba stream, or any object
    with `.cuda_stream` (torch.cuda.Stream, CuPy streams)."""
    from numba.cuda.cudadrv import driver
    if not stream:
        return driver._to_core_stream(0)
    if isinstance(stream, int):
        return driver.ExperimentalStream.from_handle(stream)
    handle = getattr(stream, "cuda_stream", None)
    if handle is not None:
        return driver.ExperimentalStream.from_handle(int(handle))
    return driver._to_core_stream(stream)


def stream_handle(stream):
    """The raw CUstream of anything `as_stream` accepts (0 for the legacy default stream)."""
    if not stream:
        return 0
    if isinstance(stream, int):
        return stream
    handle = getattr(stream, "cuda_stream", None)
    if handle is not None:
        return int(handle)
    handle = getattr(stream, "handle", None)
    return int(getattr(handle, "value", handle) or 0)


class CompiledKernel:
    """One kernel specialization compiled for sm_90a with launch bounds (threads, 1), allowed
    `smem_bytes` of dynamic shared memory."""

    def __init__(self, fn, signature, threads, smem_bytes):
        self.threads, self.smem_bytes = threads, smem_bytes
        dispatcher = cuda.jit(signature, launch_bounds=(threads, 1))(fn)
        self._kernel = dispatcher.overloads[signature.args]
        self._set_max_dynamic_smem(smem_bytes)

    def _set_max_dynamic_smem(self, nbytes):
        from cuda.bindings import driver as drv
        cufunc = self._kernel._codelibrary.get_cufunc()
        attr = drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (err,) = drv.cuKernelSetAttribute(attr, nbytes, cufunc.handle, cufunc.device.id)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cannot give the kernel {nbytes} B of shared memory: {err.name}")

    @property
    def registers(self):
        return self._kernel.get_regs_per_thread() if hasattr(self._kernel, "get_regs_per_thread") else None

    def __call__(self, grid, stream, *args):
        self._kernel.launch(args, (grid, 1, 1), (self.threads, 1, 1), as_stream(stream), self.smem_bytes)


@functools.lru_cache(maxsize=None)
def sm_count():
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


def check_hopper():
    """Raise a clear error unless the current device is an sm_90 part."""
    dev = cuda.get_current_device()
    if dev.compute_capability != HOPPER[:2]:
        raise RuntimeError(f"numba_fa3 kernels need a Hopper GPU (sm_90); {dev.name.decode() if isinstance(dev.name, bytes) else dev.name} "
                           f"is sm_{dev.compute_capability[0]}{dev.compute_capability[1]}")


class HopperKernel:
    """Mixin for a kernel class: given `make_kernel()`, `SIGNATURE`, `threads` and `smem`
    (a SharedLayout), provides the compile-only PTX (CI) and the lazily compiled launchable."""

    _kernel = None

    def compile_ptx(self):
        """PTX for sm_90a; needs no GPU (CI assembles it with ptxas)."""
        from .compile import compile_ptx
        return compile_ptx(self.make_kernel(), self.SIGNATURE, self.threads)

    def kernel(self):
        if self._kernel is None:
            check_hopper()
            self._kernel = CompiledKernel(self.make_kernel(), self.SIGNATURE, self.threads, self.smem.bytes)
        return self._kernel
