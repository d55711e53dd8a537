"""What a kernel launch needs to know of an array, from whatever the caller passed.

Accepted: PyTorch CUDA tensors (read through `data_ptr`/`stride`, because torch's
`__cuda_array_interface__` refuses bfloat16), Numba device arrays and CuPy arrays (through
`__cuda_array_interface__`), any other object that exports DLPack from a CUDA device (JAX; read by
`dlpack.view`, since a CUDA array interface cannot say bfloat16), other `__cuda_array_interface__`
objects, and NumPy arrays (host: the caller copies them).  Nothing here copies.
"""
from dataclasses import dataclass
import operator

import numpy as np

try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
    _E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # pragma: no cover - ml_dtypes is a dependency
    _BF16 = _E4M3 = None

#: Canonical dtype names used across the library, with their NumPy dtypes.
NUMPY_DTYPES = {"f16": np.dtype(np.float16), "f32": np.dtype(np.float32), "bf16": _BF16, "e4m3": _E4M3,
                "i32": np.dtype(np.int32)}
_TORCH_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "f16", "torch.float32": "f32",
                "torch.float8_e4m3fn": "e4m3", "torch.int32": "i32"}
#: (uint8 arrays are taken as e4m3 codes: Numba and CuPy have no float8 type)
_TYPESTR = {"<f2": "f16", "<f4": "f32", "<i4": "i32", "|u1": "e4m3"}


@dataclass(frozen=True)
class TensorInfo:
    ptr: int            # address of element [0, ..., 0]
    shape: tuple
    strides: tuple      # in elements
    dtype: str          # canonical name: bf16 / f16 / f32 / e4m3
    kind: str           # "torch", "cai" (Numba, CuPy, ...), "dlpack" (JAX, ...) or "numpy"
    obj: object
    owner: object = None  # what keeps the memory valid besides obj (a DLPack capsule)

    @property
    def itemsize(self):
        return NUMPY_DTYPES[self.dtype].itemsize


def integer(x, name):
    """x as a Python int, for a count or bound that reaches a kernel: integers only (NumPy and
    0-d integer tensors included), since int() would truncate a float silently and a bool is
    a mistake."""
    if isinstance(x, bool):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {x!r}") from None


def contiguous_strides(shape):
    """Row-major strides, in elements, of a contiguous array of `shape`."""
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


def numpy_dtype_name(dt):
    dt = np.dtype(dt)
    for name, d in NUMPY_DTYPES.items():
        if d is not None and d == dt:
            return name
    raise TypeError(f"unsupported dtype {dt}; expected one of float16, bfloat16, float32, float8_e4m3fn, int32")


def inspect(x, name="array", stream=None):
    """TensorInfo of x, or a TypeError that says what was expected.  stream: where the caller
    will use x (a DLPack producer makes x ready there; None: the legacy default stream)."""
    mod = type(x).__module__
    if mod.startswith("torch"):
        if not x.is_cuda:
            raise TypeError(f"{name}: torch tensor on {x.device}; pass a CUDA tensor or a NumPy array")
        dt = _TORCH_NAMES.get(str(x.dtype))
        if dt is None:
            raise TypeError(f"{name}: unsupported dtype {x.dtype}")
        return TensorInfo(x.data_ptr(), tuple(x.shape), tuple(x.stride()), dt, "torch", x)
    if isinstance(x, np.ndarray):
        dt = numpy_dtype_name(x.dtype)
        if any(s % x.itemsize for s in x.strides):
            raise ValueError(f"{name}: strides {x.strides} are not whole elements")
        return TensorInfo(x.ctypes.data, x.shape, tuple(s // x.itemsize for s in x.strides), dt, "numpy", x)
    if (hasattr(x, "__dlpack__") and hasattr(x, "__dlpack_device__")
            and mod.split(".")[0] not in ("cupy", "numba", "numba_cuda")):
        return _inspect_dlpack(x, name, stream)
    cai = getattr(x, "__cuda_array_interface__", None)
    if cai is not None:
        dt = _TYPESTR.get(cai["typestr"])
        if dt is None:
            raise TypeError(f"{name}: unsupported typestr {cai['typestr']}")
        item = NUMPY_DTYPES[dt].itemsize
        shape = tuple(cai["shape"])
        if cai.get("strides") is None:
            strides = contiguous_strides(shape)
        else:
            strides = tuple(s // item for s in cai["strides"])
        return TensorInfo(cai["data"][0], shape, strides, dt, "cai", x)
    raise TypeError(f"{name}: expected a NumPy array, a CUDA tensor or an object with "
                    f"__cuda_array_interface__ or __dlpack__, got {type(x).__name__}")


def _inspect_dlpack(x, name, stream):
    from . import dlpack
    from .launch import stream_handle
    device_type, _ = x.__dlpack_device__()
    if device_type == dlpack.CPU:
        return inspect(np.asarray(x), name)  # host memory: as a NumPy array (copied to the GPU)
    if device_type not in (dlpack.CUDA, dlpack.CUDA_MANAGED):
        raise TypeError(f"{name}: {type(x).__name__} on DLPack device type {device_type}; "
                        f"pass a CUDA array or a NumPy array")
    try:
        ptr, shape, strides, dt, (_, device_id), capsule = dlpack.view(x, stream_handle(stream))
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    from numba import cuda
    current = cuda.get_current_device().id
    if device_id != current:
        raise ValueError(f"{name} is on CUDA device {device_id}, the current device is {current}")
    return TensorInfo(ptr, shape, strides, dt, "dlpack", x, capsule)


def empty_like_kind(info, shape, dtype):
    """A new device array of `shape`/`dtype` of the same library as `info` (NumPy callers get a
    Numba device array, to be copied back by the caller; DLPack callers one that `to_library`
    hands to their library after the launch)."""
    if info.kind == "torch":
        import torch
        tdt = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
        return torch.empty(shape, dtype=tdt, device=info.obj.device)
    from numba import cuda
    npdt = NUMPY_DTYPES[dtype]
    if info.kind == "cai" and type(info.obj).__module__.startswith("cupy"):
        import cupy
        return cupy.empty(shape, dtype=npdt)
    # Numba cannot type bfloat16 arrays, and the kernels never index them: store as uint16.
    return cuda.device_array(shape, dtype=np.uint16 if dtype == "bf16" else npdt)


def to_library(arr, like, dtype, stream=None):
    """A result that `empty_like_kind(like, ...)` allocated and a launch on `stream` wrote, as an
    array of `like`'s library.  A DLPack input's result goes to its library's `from_dlpack` (the
    array API namespace's), zero copy; that runs after the launch, so the consumer's stream is
    ordered after the kernel (JAX arrays are immutable: JAX cannot allocate one for us to fill).
    Other kinds are returned as they are."""
    namespace = getattr(like.obj, "__array_namespace__", None) if like.kind == "dlpack" else None
    if namespace is None:
        return arr
    from numba import cuda
    from . import dlpack
    cai = arr.__cuda_array_interface__
    item = NUMPY_DTYPES[dtype].itemsize
    shape = tuple(cai["shape"])
    strides = contiguous_strides(shape) if cai.get("strides") is None else tuple(s // item for s in cai["strides"])
    export = dlpack.Export(cai["data"][0], shape, strides, dtype, cuda.get_current_device().id, arr, stream)
    return namespace().from_dlpack(export)


def fill(arr, value):
    """Set every element of a device array made by `empty_like_kind` (torch, CuPy or Numba)."""
    mod = type(arr).__module__
    if mod.startswith("torch") or mod.startswith("cupy"):
        arr.fill_(value) if mod.startswith("torch") else arr.fill(value)
        return arr
    arr.copy_to_device(np.full(arr.shape, value, dtype=arr.dtype))
    return arr


def device_ptr(arr):
    """Address of a device array made by `empty_like_kind` or `to_device`."""
    if type(arr).__module__.startswith("torch"):
        return arr.data_ptr()
    return arr.__cuda_array_interface__["data"][0]


def to_device(a):
    """Copy a NumPy array to a Numba device array (bf16/e4m3 travel as raw bits).  Without a
    Hopper GPU, raises launch.NoHopperGPU first (a NumPy caller's first touch of the GPU)."""
    from numba import cuda
    from .launch import check_hopper
    check_hopper()
    a = np.ascontiguousarray(a)
    if a.dtype == _BF16:
        a = a.view(np.uint16)
    elif a.dtype == _E4M3:
        a = a.view(np.uint8)
    return cuda.to_device(a)


def to_host(dev, dtype):
    """Copy a device array back as a NumPy array of the canonical `dtype`."""
    return dev.copy_to_host().view(NUMPY_DTYPES[dtype])


def upload(info):
    """TensorInfo of a device copy of a NumPy array's TensorInfo (contiguous, same dtype)."""
    dev = to_device(info.obj)
    return TensorInfo(device_ptr(dev), info.shape, contiguous_strides(info.shape), info.dtype, "cai", dev)


def torch_stream(tensor=None):
    """torch's current CUDA stream handle on `tensor`'s device (else the current device), so our
    launches order with the caller's torch work.  torch's own raw-stream query where it has one:
    `torch.cuda.current_stream()` builds a Stream object and took ~20% of a launch's host time
    (cProfile, `python -m bench launch --profile`)."""
    import torch
    index = tensor.device.index if tensor is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw(index)
    return torch.cuda.current_stream(index).cuda_stream
