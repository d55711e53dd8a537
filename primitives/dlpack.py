"""DLPack both ways, zero copy, for GPU arrays of libraries without `__cuda_array_interface__`
(JAX) or whose interface cannot say bfloat16.

`view(x)` reads an object with `__dlpack__`: it asks for a (legacy, unversioned) capsule, reads the
`DLManagedTensor` in it and returns its address, shape, strides and dtype with the capsule, which
owns the producer's reference: the memory stays valid while the capsule lives (it is never
consumed, so its destructor returns the reference).

`Export` hands device memory of ours (a Numba device array holding a result) to a consumer, e.g.
`jax.numpy.from_dlpack(Export(...))`: its capsule keeps the Numba array alive until the consumer
calls the deleter, and `__dlpack__(stream=s)` makes stream s wait for the work already queued on
the stream that wrote the array.

Layouts follow dlpack.h (DLPack 1.x); the array API standard's `__dlpack__` protocol.
"""
import ctypes
import threading

#: DLDeviceType values (dlpack.h).
CPU, CUDA, CUDA_HOST, CUDA_MANAGED = 1, 2, 3, 13
#: DLDataTypeCode values (dlpack.h) and our canonical names.
_INT, _UINT, _FLOAT, _BFLOAT = 0, 1, 2, 4
DTYPES = {(_FLOAT, 16): "f16", (_FLOAT, 32): "f32", (_BFLOAT, 16): "bf16", (_INT, 32): "i32"}
_CODES = {name: code for code, name in DTYPES.items()}
#: A stream argument of -1 asks the producer for no synchronization at all (DLPack protocol).
NO_SYNC = -1
#: cudaStreamLegacy: the value the protocol uses for the legacy default stream (0 is ambiguous).
LEGACY_STREAM = 1


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", DLDevice), ("ndim", ctypes.c_int32),
                ("dtype", DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", _DELETER)]


_NAME, _USED = b"dltensor", b"used_dltensor"
_api = ctypes.pythonapi
_api.PyCapsule_GetPointer.restype, _api.PyCapsule_GetPointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_IsValid.restype, _api.PyCapsule_IsValid.argtypes = ctypes.c_int, [ctypes.py_object, ctypes.c_char_p]
_api.PyCapsule_New.restype = ctypes.py_object
_api.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# Called while the capsule is being freed: its argument must stay a raw pointer (a py_object
# would take a reference to a dying object), so these two take c_void_p.
_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_IsValid", _api))
_get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p)(("PyCapsule_GetPointer", _api))


def view(x, stream=None):
    """(address of element 0, shape, strides in elements, canonical dtype, device, capsule) of a
    DLPack producer's array.  stream: the CUDA stream handle the caller will use the array on
    (the producer makes the array ready there); None asks for the legacy default stream."""
    kind, device_id = (int(v) for v in x.__dlpack_device__())
    if kind in (CUDA, CUDA_MANAGED):
        capsule = x.__dlpack__(stream=LEGACY_STREAM if not stream else int(stream))
    else:
        capsule = x.__dlpack__()
    if not _api.PyCapsule_IsValid(capsule, _NAME):
        raise TypeError(f"{type(x).__name__}.__dlpack__ returned no DLPack tensor capsule")
    t = DLManagedTensor.from_address(_api.PyCapsule_GetPointer(capsule, _NAME)).dl_tensor
    dtype = DTYPES.get((t.dtype.code, t.dtype.bits)) if t.dtype.lanes == 1 else None
    if dtype is None:
        raise TypeError(f"unsupported DLPack dtype (code {t.dtype.code}, {t.dtype.bits} bits, "
                        f"{t.dtype.lanes} lanes); expected float16, bfloat16, float32 or int32")
    shape = tuple(t.shape[i] for i in range(t.ndim))
    if t.strides:
        strides = tuple(t.strides[i] for i in range(t.ndim))
    else:  # NULL: row-major contiguous
        strides, acc = [], 1
        for d in reversed(shape):
            strides.append(acc)
            acc *= d
        strides = tuple(reversed(strides))
    return (t.data or 0) + t.byte_offset, shape, strides, dtype, (t.device.device_type, t.device.device_id), capsule


# --- export ---------------------------------------------------------------------------------------
_live = {}          # address of each exported DLManagedTensor -> what it keeps alive
_live_lock = threading.Lock()


@_DELETER
def _delete(address):
    """The consumer is done (or the capsule died unconsumed): drop the struct and the owner."""
    try:
        with _live_lock:
            _live.pop(address, None)
    except Exception:  # noqa: BLE001 - may run at interpreter exit, with module state gone
        pass


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _capsule_destructor(capsule):
    # A consumer renames the capsule when it takes ownership; an unconsumed one frees here.
    if _is_valid(capsule, _NAME):
        _delete(_get_pointer(capsule, _NAME))


class Export:
    """Device memory at `ptr` (shape, strides in elements, canonical dtype) on CUDA device
    `device_id`, written by work queued on `stream`, offered through `__dlpack__`.  `owner` (the
    allocation) is kept alive as long as some consumer holds the tensor.  (device_type=CPU offers
    host memory, without streams: how the tests check the layout without a GPU.)"""

    def __init__(self, ptr, shape, strides, dtype, device_id, owner, stream=0, device_type=CUDA):
        if dtype not in _CODES:
            raise TypeError(f"cannot export dtype {dtype} through DLPack")
        self.ptr, self.shape, self.strides, self.dtype = ptr, tuple(shape), tuple(strides), dtype
        self.device_id, self.owner, self.stream, self.device_type = device_id, owner, stream, device_type

    def __dlpack_device__(self):
        return (self.device_type, self.device_id)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        if copy:
            raise BufferError("this export is zero-copy only")
        if dl_device is not None and tuple(dl_device) != self.__dlpack_device__():
            raise BufferError(f"the array is on device {self.__dlpack_device__()}, not {dl_device}")
        if self.device_type == CUDA:
            self._order_before(LEGACY_STREAM if stream is None else stream)
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * max(ndim, 1))(*self.shape)
        strides = (ctypes.c_int64 * max(ndim, 1))(*self.strides)
        code, bits = _CODES[self.dtype]
        managed = DLManagedTensor()
        managed.dl_tensor = DLTensor(self.ptr, DLDevice(self.device_type, self.device_id), ndim, DLDataType(code, bits, 1),
                                     shape, strides, 0)
        managed.deleter = _delete
        address = ctypes.addressof(managed)
        with _live_lock:
            _live[address] = (managed, shape, strides, self.owner)
        return _api.PyCapsule_New(address, _NAME, ctypes.cast(_capsule_destructor, ctypes.c_void_p))

    def _order_before(self, consumer):
        """Make the consumer's stream wait for what is queued on ours (an event, not a host wait)."""
        from .launch import stream_handle
        ours = stream_handle(self.stream)
        consumer = int(consumer)
        if consumer == NO_SYNC or consumer == ours or (consumer in (0, LEGACY_STREAM) and ours in (0, LEGACY_STREAM)):
            return
        from cuda.bindings import driver as drv
        flags = drv.CUevent_flags.CU_EVENT_DISABLE_TIMING
        err, event = drv.cuEventCreate(flags)
        if err != drv.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuEventCreate failed: {err.name}")
        try:
            for call in (lambda: drv.cuEventRecord(event, ours), lambda: drv.cuStreamWaitEvent(consumer, event, 0)):
                (err,) = call()
                if err != drv.CUresult.CUDA_SUCCESS:
                    raise RuntimeError(f"ordering the DLPack consumer's stream after ours failed: {err.name}")
        finally:
            drv.cuEventDestroy(event)  # released once the wait is satisfied
