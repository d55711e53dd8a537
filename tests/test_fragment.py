"""GPU checks of register-fragment helpers that shuffle across lanes."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_quad_transpose_matches_numpy():
    from numba import cuda
    from primitives.fragment import quad_transpose

    @cuda.jit
    def kernel(src, dst):
        t = cuda.threadIdx.x
        v = (np.uint32(src[t, 0]), np.uint32(src[t, 1]), np.uint32(src[t, 2]), np.uint32(src[t, 3]))
        r = quad_transpose(v[0], v[1], v[2], v[3], np.int32(t % 4))
        for j in range(4):
            dst[t, j] = r[j]

    rng = np.random.default_rng(7)
    src = rng.integers(0, 2**32, size=(64, 4), dtype=np.uint64).astype(np.uint32)
    dst = np.full((64, 4), 0xDEADBEEF, dtype=np.uint32)
    d_dst = cuda.to_device(dst)
    kernel[1, 64](cuda.to_device(src), d_dst)
    got = d_dst.copy_to_host()
    # thread q of each quad gets column q of the quad's 4 x 4 block, rows in thread order
    want = src.reshape(16, 4, 4).transpose(0, 2, 1).reshape(64, 4)
    np.testing.assert_array_equal(got, want)


def test_zero_after_is_zero_for_every_float():
    """fragment.zero_after(dep): 0 for finite values, both zeros, both infinities and NaN (the
    uniform pipeline adds it to barrier addresses, so anything else would corrupt them)."""
    from numba import cuda
    from primitives.fragment import zero_after

    @cuda.jit
    def kernel(src, dst):
        t = cuda.grid(1)
        if t < src.size:
            dst[t] = zero_after(src[t])

    f32 = np.finfo(np.float32)
    src = np.array([0.0, -0.0, 1.5, -2.5, f32.max, -f32.max, f32.tiny, np.inf, -np.inf, np.nan, 1e-45],
                   dtype=np.float32)
    dst = np.full(src.size, 0xDEADBEEF, dtype=np.uint32)
    d_dst = cuda.to_device(dst)
    kernel[1, 32](cuda.to_device(src), d_dst)
    np.testing.assert_array_equal(d_dst.copy_to_host(), np.zeros(src.size, dtype=np.uint32))
