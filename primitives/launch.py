"""Compiling a kernel for this GPU and launching it with little Python in between.

Kernels in this library take only scalars (addresses, sizes), so a launch is: normalize the
stream, pack the scalars, call `cuLaunchKernel`.  Numba compiles (or `kernel_cache` finds the cubin
on disk); its dispatcher does not launch (its per-call type resolution costs more than a short
attention kernel runs).
"""
import ctypes
import functools
import threading
from collections import namedtuple

from numba import cuda, types

from . import kernel_cache
from .compile import HOPPER


def stream_handle(stream):
    """The raw CUstream of a stream given as None/0 (legacy default), an int handle, a Numba
    stream, an object with `.cuda_stream` (torch.cuda.Stream) or `.ptr` (CuPy streams), or one
    that speaks the CUDA stream protocol (`__cuda_stream__`: cuda.core)."""
    if not stream:
        return 0
    if isinstance(stream, int):
        return stream
    protocol = getattr(stream, "__cuda_stream__", None)
    if protocol is not None:
        return int(protocol()[1])
    handle = getattr(stream, "cuda_stream", None)
    if handle is None and type(stream).__module__.startswith("cupy"):
        handle = getattr(stream, "ptr", None)
    if handle is not None:
        return int(handle)
    try:
        return int(stream)
    except TypeError:
        handle = getattr(stream, "handle", None)
        return int(getattr(handle, "value", handle) or 0)


def params(name, fields):
    """A kernel's scalar parameters as one record: a namedtuple class of `fields` ((name, Numba
    type) pairs, in launch order), whose `SIGNATURE` is the kernel's.  The kernel body receives
    one record (`entry`), the host builds one and launches with it."""
    cls = namedtuple(name, [f for f, _ in fields])
    cls.SIGNATURE = types.void(*[t for _, t in fields])
    return cls


def entry(record, body):
    """The kernel function of a parameter record: it takes the record's fields as its scalar
    arguments (the launch ABI) and calls `body(record(...))`.  Built from source because a
    Numba kernel cannot take *args."""
    names = ", ".join(record._fields)
    scope = {"body": body, "record": record}
    exec(f"def {record.__name__.lower()}_kernel({names}):\n    body(record({names}))\n", scope)
    return scope[f"{record.__name__.lower()}_kernel"]


#: ctypes of the scalar kernel parameters this library uses (kernels take no arrays).
_CTYPES = {"uint64": ctypes.c_uint64, "int64": ctypes.c_int64, "uint32": ctypes.c_uint32,
           "int32": ctypes.c_int32, "float32": ctypes.c_float}


def cluster_config(grid, threads, smem_bytes, stream, cluster):
    """The `CUlaunchConfig` of a 1-D launch in thread-block clusters of `cluster` CTAs (CUDA
    driver API, cuLaunchKernelEx with CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION).  The grid must be a
    whole number of clusters: the hardware co-schedules each cluster's CTAs on one GPC."""
    from cuda.bindings import driver as drv
    if cluster < 1 or grid % cluster:
        raise ValueError(f"a grid of {grid} CTAs is not a whole number of clusters of {cluster}")
    cfg = drv.CUlaunchConfig()
    cfg.gridDimX, cfg.gridDimY, cfg.gridDimZ = grid, 1, 1
    cfg.blockDimX, cfg.blockDimY, cfg.blockDimZ = threads, 1, 1
    cfg.sharedMemBytes = smem_bytes
    cfg.hStream = stream_handle(stream)
    attr = drv.CUlaunchAttribute()
    attr.id = drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster, 1, 1
    cfg.attrs = [attr]
    cfg.numAttrs = 1
    return cfg


class CompiledKernel:
    """One kernel specialization, assembled for sm_90a with launch bounds (threads, 1) (a cubin
    from `kernel_cache`), loaded with the driver, allowed `smem_bytes` of dynamic shared memory,
    launched in clusters of `cluster` CTAs (1: none).

    Launches go straight to `cuLaunchKernel` with a parameter block packed by ctypes: Numba's own
    launch path resolves every argument's type on every call (~10 us per argument, ~250 us for
    the attention kernel's 24), which would dominate a short attention call."""

    def __init__(self, name, image, signature, threads, smem_bytes, cluster=1):
        from cuda.bindings import driver as drv
        self.name, self.threads, self.smem_bytes, self.cluster = name, threads, smem_bytes, cluster
        self._context = cuda.current_context()
        self._drv = drv
        self.image = image  # the cubin, for inspection (nvdisasm)
        # A library is not tied to a context, and Numba's primary context is current, so the
        # kernel's function is found in it.
        self._library = self._check(drv.cuLibraryLoadData(image, None, None, 0, None, None, 0),
                                    "cuLibraryLoadData")
        kernel = self._check(drv.cuLibraryGetKernel(self._library, name.encode()), "cuLibraryGetKernel")
        self._set_max_dynamic_smem(kernel, smem_bytes, self._context.device.id)
        self._function = self._check(drv.cuKernelGetFunction(kernel), "cuKernelGetFunction")
        self._ctypes = [_CTYPES[str(a)] for a in signature.args]
        self._local = threading.local()
        self._configs = {}          # clustered launches: CUlaunchConfig per (grid, stream)
        self._max_clusters = None   # cuOccupancyMaxActiveClusters, asked once
        self._resident = None       # resident_ctas of an unclustered kernel, asked once

    def _check(self, result, what):
        err, *value = result
        if err != self._drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"{what} failed for {self.name}: {err.name}")
        return value[0] if len(value) == 1 else tuple(value)

    def max_active_clusters(self):
        """How many clusters of this kernel the device runs at once (cuOccupancyMaxActiveClusters):
        a persistent grid of clustered CTAs must not exceed it, or the last clusters wait for a
        second wave.  Pairs of SMs of one GPC host a cluster of two, so it can be below
        sm_count / cluster."""
        if self._max_clusters is None:
            cfg = cluster_config(self.cluster * sm_count(), self.threads, self.smem_bytes, 0, self.cluster)
            err, n = self._drv.cuOccupancyMaxActiveClusters(self._function, cfg)
            if err != self._drv.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuOccupancyMaxActiveClusters failed: {err.name}")
            self._max_clusters = int(n)
        return self._max_clusters

    def resident_ctas(self):
        """How many CTAs of this kernel the device holds at once: a persistent grid's size
        (cuOccupancyMaxActiveBlocksPerMultiprocessor per SM, or `max_active_clusters` CTAs)."""
        if self.cluster > 1:
            return self.max_active_clusters() * self.cluster
        if self._resident is None:
            err, n = self._drv.cuOccupancyMaxActiveBlocksPerMultiprocessor(self._function, self.threads,
                                                                           self.smem_bytes)
            if err != self._drv.CUresult.CUDA_SUCCESS:
                raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: {err.name}")
            self._resident = int(n) * sm_count()
        return self._resident

    def _config(self, grid, stream):
        """The clustered launch's CUlaunchConfig, built once per (grid, stream)."""
        key = (grid, stream_handle(stream))
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = cluster_config(grid, self.threads, self.smem_bytes, stream, self.cluster)
        return cfg

    def _set_max_dynamic_smem(self, kernel, nbytes, device):
        attr = self._drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        (err,) = self._drv.cuKernelSetAttribute(attr, nbytes, kernel, device)
        if err != self._drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cannot give the kernel {nbytes} B of shared memory: {err.name}")

    @property
    def registers(self):
        """Registers per thread at launch (before any setmaxnreg)."""
        attr = self._drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_NUM_REGS
        return self._check(self._drv.cuFuncGetAttribute(attr, self._function), "cuFuncGetAttribute")

    def _params(self):
        """This thread's parameter block: one ctypes value per argument and the void* array
        cuLaunchKernel reads (per thread, so concurrent launches do not share it)."""
        block = getattr(self._local, "block", None)
        if block is None:
            values = [t() for t in self._ctypes]
            pointers = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
            block = self._local.block = (values, pointers, ctypes.addressof(pointers))
        return block

    def __call__(self, grid, stream, *args):
        values, _, address = self._params()
        for slot, a in zip(values, args):
            slot.value = a
        drv = self._drv
        if self.cluster > 1:
            cfg = self._config(grid, stream)
            launch = lambda: drv.cuLaunchKernelEx(cfg, self._function, address, 0)
        else:
            launch = lambda: drv.cuLaunchKernel(self._function, grid, 1, 1, self.threads, 1, 1, self.smem_bytes,
                                                stream_handle(stream), address, 0)
        (err,) = launch()
        if err == drv.CUresult.CUDA_ERROR_INVALID_CONTEXT:
            with self._context:  # a thread that has not touched CUDA yet
                (err,) = launch()
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel failed: {err.name} (grid {grid}, {self.threads} threads, "
                               f"{self.smem_bytes} B shared)")


@functools.lru_cache(maxsize=None)
def sm_count():
    return cuda.get_current_device().MULTIPROCESSOR_COUNT


class NoHopperGPU(RuntimeError):
    """There is no usable Hopper GPU: no driver, no device, or another architecture."""


#: What runs anywhere, named in the error.
REFERENCE = "numba_fa3.reference.attention_reference"


def _driver_failure(exc):
    """One line of why CUDA could not start (Numba's message spans several, with advice)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("Error at driver init") and ln != ":"] or [type(exc).__name__]
    return lines[0].rstrip(".:")


def check_hopper():
    """Raise one clear NoHopperGPU (not the driver's traceback) unless the current device is an
    sm_90 part."""
    try:
        dev = cuda.get_current_device()
    except Exception as e:  # noqa: BLE001 - whatever failed, the answer is the same
        found = f"no usable CUDA device ({_driver_failure(e)})"
    else:
        if tuple(dev.compute_capability) == HOPPER[:2]:
            return
        name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
        found = f"{name} (sm_{dev.compute_capability[0]}{dev.compute_capability[1]})"
    raise NoHopperGPU(f"numba_fa3 needs an NVIDIA Hopper GPU (sm_90); found {found} — {REFERENCE} "
                      f"runs anywhere (NumPy)") from None


class HopperKernel:
    """Mixin for a kernel class: given `PARAMS` (a `params` record class), `body()` (the device
    function that takes one record), `threads` and `smem` (a SharedLayout), provides the
    compile-only PTX (CI) and the lazily compiled launchable (`launch_with`)."""

    _kernel = None
    cluster = 1  # CTAs per thread-block cluster

    def make_kernel(self):
        return entry(self.PARAMS, self.body())

    @property
    def SIGNATURE(self):
        return self.PARAMS.SIGNATURE

    def compile_ptx(self):
        """PTX for sm_90a; needs no GPU (CI assembles it with ptxas)."""
        from .compile import compile_ptx
        return compile_ptx(self.make_kernel(), self.SIGNATURE, self.threads)

    def kernel(self):
        """The loaded kernel: from the on-disk cache where compiled before (`kernel_cache`), else
        compiled now (5-30 s) and stored."""
        if self._kernel is None:
            check_hopper()
            name, image = kernel_cache.cubin(self)
            self._kernel = CompiledKernel(name, image, self.SIGNATURE, self.threads, self.smem.bytes,
                                          self.cluster)
        return self._kernel

    def launch_with(self, grid, stream, params):
        """Launch on `grid` CTAs with a parameter record (an instance of PARAMS)."""
        self.kernel()(grid, stream, *params)
