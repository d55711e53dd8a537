"""DLPack in and out (primitives/dlpack.py): the struct layout, strides and lifetimes against
NumPy's own DLPack on the CPU; on a Hopper GPU, torch, CuPy, Numba and JAX arrays through
flash_attn and matmul without copies, results in the caller's library."""
import gc
import weakref

import numpy as np
import pytest

from numba_fa3.primitives import dlpack, tensors

gpu = pytest.mark.gpu


@pytest.mark.parametrize("dtype,name", [(np.float16, "f16"), (np.float32, "f32"), (np.int32, "i32")])
def test_view_reads_numpy_exports(dtype, name):
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 10, 4)).astype(dtype)
    for a in (base, base[1:5, ::3], base.transpose(1, 0, 2)[2:]):
        ptr, shape, strides, dt, device, capsule = dlpack.view(a)
        assert (ptr, shape, dt, device[0]) == (a.ctypes.data, a.shape, name, dlpack.CPU)
        assert strides == tuple(s // a.itemsize for s in a.strides)
        del capsule


def test_inspect_takes_host_dlpack_as_numpy():
    class HostExporter:  # a foreign CPU array: only the DLPack protocol and __array__
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

        def __array__(self, dtype=None, copy=None):
            return self.a
    a = np.random.default_rng(6).standard_normal((3, 8)).astype(np.float16)
    info = tensors.inspect(HostExporter(a), "x")
    assert info.kind == "numpy" and info.ptr == a.ctypes.data and info.dtype == "f16"


@pytest.mark.parametrize("dtype,name", [(np.float16, "f16"), (np.float32, "f32"), (np.int32, "i32")])
def test_export_round_trips_and_releases_its_owner(dtype, name):
    """NumPy consumes our capsule zero-copy with the strides we gave; the owner lives exactly as
    long as some consumer holds the tensor, and an unconsumed capsule frees it too."""
    class Owner:
        pass
    rng = np.random.default_rng(7)
    a = rng.standard_normal((5, 12)).astype(dtype)
    owner = Owner()
    alive = weakref.ref(owner)
    view = dlpack.Export(a.ctypes.data, (5, 6), (12, 2), name, 0, owner, device_type=dlpack.CPU)
    del owner
    b = np.from_dlpack(view)
    del view
    assert b.ctypes.data == a.ctypes.data and b.shape == (5, 6)
    np.testing.assert_array_equal(b, a[:, ::2])
    gc.collect()
    assert alive() is not None
    del b
    gc.collect()
    assert alive() is None
    owner = Owner()
    alive = weakref.ref(owner)
    capsule = dlpack.Export(a.ctypes.data, a.shape, (12, 1), name, 0, owner, device_type=dlpack.CPU).__dlpack__()
    del owner
    gc.collect()
    assert alive() is not None
    del capsule
    gc.collect()
    assert alive() is None and not dlpack._live


def test_unsupported_dlpack_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="unsupported DLPack dtype"):
        dlpack.view(np.zeros(4, np.int8))
    with pytest.raises(TypeError, match="cannot export"):
        dlpack.Export(0, (1,), (1,), "e4m3", 0, None)


# --- on the GPU: every library in and out, no copies -----------------------------------------------
# CuPy has no bfloat16 and Numba cannot type it: those two run fp16.
LIBRARIES = {"torch": "bf16", "cupy": "f16", "numba": "f16", "jax": "bf16"}


def _library(name):
    if name == "jax":
        import os
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to the rest
    if name == "numba":
        from numba import cuda
        return cuda
    return pytest.importorskip(name)


def _to_library(name, a):
    """A device array of library `name` holding host array a (bf16 as ml_dtypes)."""
    lib = _library(name)
    if name == "torch":
        import torch
        t = torch.from_numpy(np.ascontiguousarray(a.astype(np.float32)))
        return t.to(torch.bfloat16 if a.dtype == tensors.NUMPY_DTYPES["bf16"] else torch.float16).cuda()
    if name == "cupy":
        return lib.asarray(a)
    if name == "numba":
        return lib.to_device(a)
    import jax
    return jax.device_put(a, jax.devices("gpu")[0])


def _pointer(name, x):
    if name == "torch":
        return x.data_ptr()
    if name == "cupy":
        return x.data.ptr
    if name == "numba":
        return x.__cuda_array_interface__["data"][0]
    return x.unsafe_buffer_pointer()


def _to_host(name, x):
    if name == "torch":
        return x.float().cpu().numpy()
    if name == "cupy":
        return x.get().astype(np.float32)
    if name == "numba":
        return x.copy_to_host().astype(np.float32)
    return np.asarray(x).astype(np.float32)


def _array_type(name):
    lib = _library(name)
    return {"torch": lambda: lib.Tensor, "cupy": lambda: lib.ndarray,
            "numba": lambda: lib.cudadrv.devicearray.DeviceNDArray, "jax": lambda: lib.Array}[name]()


@pytest.fixture
def kernel_pointers(monkeypatch):
    """The global addresses every launch's tensor maps were encoded with, in order."""
    from numba_fa3.primitives.tma_desc import descriptor_tables
    seen = []
    real = descriptor_tables.get

    def get(specs):
        seen.append([s[1] for s in specs])
        return real(specs)
    monkeypatch.setattr(descriptor_tables, "get", get)
    return seen


@gpu
@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_flash_attn_takes_and_returns_each_library_without_copies(name, kernel_pointers):
    from numba_fa3 import flash_attn
    from numba_fa3.reference import attention_reference
    rng = np.random.default_rng(8)
    npdt = tensors.NUMPY_DTYPES[LIBRARIES[name]]
    q, k, v = (rng.standard_normal((2, 203, 2, 128)).astype(npdt) for _ in range(3))
    dq, dk, dv = (_to_library(name, x) for x in (q, k, v))
    out, lse = flash_attn(dq, dk, dv, causal=True, return_lse=True)
    assert isinstance(out, _array_type(name)) and isinstance(lse, _array_type(name))
    assert kernel_pointers == [[_pointer(name, dq), _pointer(name, dk), _pointer(name, dv), _pointer(name, out)]]
    ref = attention_reference(q, k, v, causal=True)
    err = np.abs(_to_host(name, out) - ref).max()
    assert err <= 2e-2, err
    assert _to_host(name, lse).shape == (2, 2, 203)


@gpu
@pytest.mark.parametrize("name", sorted(LIBRARIES))
def test_matmul_takes_and_returns_each_library_without_copies(name, kernel_pointers):
    from numba_fa3.primitives.gemm import matmul
    rng = np.random.default_rng(9)
    npdt = tensors.NUMPY_DTYPES[LIBRARIES[name]]
    a, b = rng.standard_normal((300, 256)).astype(npdt), rng.standard_normal((264, 256)).astype(npdt)
    da, db = _to_library(name, a), _to_library(name, b)
    c = matmul(da, db)
    assert isinstance(c, _array_type(name)), type(c)
    assert kernel_pointers == [[_pointer(name, da), _pointer(name, db), _pointer(name, c)]]
    ref = a.astype(np.float64) @ b.astype(np.float64).T
    err = np.abs(_to_host(name, c) - ref).max() / np.abs(ref).max()
    assert err <= 2 ** -7, err


@gpu
def test_jax_result_waits_for_the_kernel_on_another_stream():
    """The JAX result is usable by JAX at once: its stream is ordered after ours by an event,
    so a JAX reduction right after the call reads the kernel's output, not unwritten memory."""
    jax = _library("jax")
    from numba import cuda
    from numba_fa3 import flash_attn
    rng = np.random.default_rng(10)
    bf16 = tensors.NUMPY_DTYPES["bf16"]
    q, k, v = (rng.standard_normal((4, 2048, 8, 128)).astype(bf16) for _ in range(3))
    dq, dk, dv = (_to_library("jax", x) for x in (q, k, v))
    stream = cuda.stream()
    out = flash_attn(dq, dk, dv, stream=stream)
    stream.synchronize()
    settled = np.asarray(jax.numpy.sum(out.astype(np.float32)))
    for _ in range(3):  # no host wait: JAX's stream must wait for ours
        assert np.asarray(jax.numpy.sum(flash_attn(dq, dk, dv, stream=stream).astype(np.float32))) == settled


@gpu
def test_jax_out_is_refused():
    jax = _library("jax")
    from numba_fa3 import flash_attn
    x = _to_library("jax", np.zeros((1, 8, 1, 64), tensors.NUMPY_DTYPES["bf16"]))
    with pytest.raises(TypeError, match="immutable"):
        flash_attn(x, x, x, out=jax.numpy.zeros_like(x))
