"""TMA tensor maps, made on the host (`cuTensorMapEncodeTiled`, CUDA driver API) and handed to
kernels through global memory.

Numba passes no 128-byte by-value (`__grid_constant__`) kernel parameters, so the maps of one
launch are packed into one device buffer, uploaded with one copy, and kernels receive its address
(each map at a 128-byte offset).  The kernel's producer runs `tma.fence_descriptor_acquire` once
before first use.  Tables are cached by everything that goes into them, so a repeated call with
the same tensors costs no encoding and no copy.
"""
from collections import OrderedDict

import numpy as np

#: Bytes of one CUtensorMap; the driver requires 64-byte alignment, device buffers give 256.
TENSOR_MAP_BYTES = 128
#: TMA's own limits (CUDA driver API, cuTensorMapEncodeTiled).
MAX_RANK = 5
MAX_BOX = 256
GLOBAL_ALIGN = 16

_DTYPES = {"bf16": ("CU_TENSOR_MAP_DATA_TYPE_BFLOAT16", 2), "f16": ("CU_TENSOR_MAP_DATA_TYPE_FLOAT16", 2),
           "f32": ("CU_TENSOR_MAP_DATA_TYPE_FLOAT32", 4), "e4m3": ("CU_TENSOR_MAP_DATA_TYPE_UINT8", 1)}


def itemsize(dtype):
    return _DTYPES[dtype][1]


def check_tiled(dtype, dims, strides_bytes, box, ptr):
    """Validate a tiled map the way the driver would, with messages that name the problem.

    dims/box innermost first; strides_bytes has rank-1 entries (the innermost stride is 1 element).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"TMA dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    rank = len(dims)
    if not 1 <= rank <= MAX_RANK or len(box) != rank or len(strides_bytes) != rank - 1:
        raise ValueError(f"TMA map rank {rank} (box {box}, strides {strides_bytes}) is not valid")
    if ptr % GLOBAL_ALIGN:
        raise ValueError(f"TMA needs a {GLOBAL_ALIGN}-byte aligned base address, got {ptr:#x}")
    for s in strides_bytes:
        if s % GLOBAL_ALIGN or s <= 0:
            raise ValueError(f"TMA needs row strides that are positive multiples of {GLOBAL_ALIGN} "
                             f"bytes, got {s} (strides {strides_bytes})")
    for b in box:
        if not 1 <= b <= MAX_BOX:
            raise ValueError(f"TMA box dims must be in [1, {MAX_BOX}], got {box}")
    if box[0] * itemsize(dtype) > 128:
        raise ValueError(f"the 128B swizzle allows at most 128 bytes in the box's inner dim, got {box}")


def unit_dim_strides(dtype, dims, strides_bytes):
    """strides_bytes with the stride of every dimension of extent 1 replaced by the span of the
    dimensions inside it (rounded up to TMA's alignment).  Such a stride is never used to address
    (its index is always 0), and arrays carry any value there: NumPy's `x[None]` and a broadcast
    give 0, which the driver rejects.  Other strides are returned as given."""
    out, span = [], itemsize(dtype) * dims[0]
    for extent, stride in zip(dims[1:], strides_bytes):
        if extent == 1:
            stride = -(-span // GLOBAL_ALIGN) * GLOBAL_ALIGN
        out.append(stride)
        span = max(span, stride * extent)
    return tuple(out)


def encode_tiled(dtype, ptr, dims, strides_bytes, box):
    """One 128B-swizzled, zero-filling tiled tensor map as 128 bytes (uint64[16])."""
    from cuda.bindings import driver as drv
    strides_bytes = unit_dim_strides(dtype, dims, strides_bytes)
    check_tiled(dtype, dims, strides_bytes, box, ptr)
    err, tmap = drv.cuTensorMapEncodeTiled(
        getattr(drv.CUtensorMapDataType, _DTYPES[dtype][0]), len(dims), ptr,
        [drv.cuuint64_t(int(d)) for d in dims], [drv.cuuint64_t(int(s)) for s in strides_bytes],
        [drv.cuuint32_t(int(b)) for b in box], [drv.cuuint32_t(1)] * len(dims),
        drv.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        drv.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        drv.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        drv.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed ({err.name}) for dtype={dtype} dims={dims} "
                           f"strides={strides_bytes} box={box}")
    return np.array(tmap.opaque, dtype=np.uint64)


def bshd_spec(t, box_cols, box_rows):
    """The encoding arguments of a `[B, S, H, D]` tensor (a `tensors.TensorInfo`) as the 4-D
    map (D, H, S, B) that the attention kernels load and store by (byte strides), in boxes of
    `box_cols` columns of one head by `box_rows` rows."""
    b, s, h, d = t.shape
    st = tuple(x * t.itemsize for x in (t.strides[2], t.strides[1], t.strides[0]))
    return (t.dtype, t.ptr, (d, h, s, b), st, (box_cols, 1, box_rows, 1))


class DescriptorTable:
    """Device buffers of tensor maps, cached by their encoding arguments (LRU)."""

    def __init__(self, capacity=256):
        self._cache = OrderedDict()
        self._capacity = capacity

    def get(self, specs):
        """specs: tuple of (dtype, ptr, dims, strides_bytes, box) tuples; returns the device
        address of the first map (map i is at + i * TENSOR_MAP_BYTES)."""
        key = tuple(specs)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit[1]
        from numba import cuda
        host = np.concatenate([encode_tiled(*s) for s in specs])
        buf = cuda.to_device(host)
        addr = buf.device_ctypes_pointer.value
        self._cache[key] = (buf, addr)
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return addr


descriptor_tables = DescriptorTable()
