"""GPU checks of register-fragment helpers that shuffle across lanes."""
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def test_quad_transpose_matches_numpy():
    from numba import cuda
    from numba_fa3.primitives.fragment import quad_transpose

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
    from numba_fa3.primitives.fragment import zero_after

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


def test_stmatrix_stager_matches_the_store_stager():
    """epilogue.stmatrix_stager and epilogue.stager write a warpgroup's 16-bit fragment (64 rows x
    64 columns, packed pairs) into the same 128-byte swizzled tile, and that tile holds element
    (row, col) of the fragment layout (primitives.fragment) at row * 128 + swizzled column."""
    from numba import cuda
    from numba_fa3.primitives import epilogue, smem
    from numba_fa3.primitives.unroll import static_range, unrolled
    from numba_fa3.ptx_inline import memory, special

    groups = 8
    stage_st = epilogue.stager(groups, 2, 0)
    stage_mx = epilogue.stmatrix_stager(groups, 0)
    # the same fragment as two 32-column halves, the second at column byte 64 (the backward's
    # column split: each warpgroup stages its half of P^T's and dS^T's rows)
    stage_half = epilogue.stmatrix_stager(groups // 2, 0)
    tile_bytes = 64 * smem.SWIZZLE_BYTES
    half_regs, half_bytes = groups, groups // 2 * epilogue.GROUP_COLS * 2

    @cuda.jit
    @unrolled
    def kernel(out):
        buf = cuda.shared.array(3 * 64 * 64, dtype=np.uint16)
        base = special.shared_address(buf)
        t = np.uint32(cuda.threadIdx.x)
        regs = ()
        for i in static_range(2 * groups):
            regs = regs + (np.uint32(t * np.uint32(64) + np.uint32(i)),)
        row = epilogue.fragment_row(t)
        stage_st(base, regs, np.uint32(row), np.uint32(epilogue.fragment_col(t) * 2))
        stage_mx(base + tile_bytes, regs, t, np.uint32(0))
        stage_half(base + 2 * tile_bytes, regs[:half_regs], t, np.uint32(0))
        stage_half(base + 2 * tile_bytes, regs[half_regs:], t, np.uint32(half_bytes))
        cuda.syncthreads()
        for k in range(cuda.threadIdx.x, 3 * 64 * 64 // 2, 128):
            out[k] = memory.ld_shared_b32(base + 4 * k)

    d_out = cuda.to_device(np.full(3 * 64 * 64 // 2, 0xDEADBEEF, dtype=np.uint32))
    kernel[1, 128](d_out)
    got = d_out.copy_to_host().view(np.uint16).reshape(3, 64, 64)
    np.testing.assert_array_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0], got[2])
    # the model: thread t's packed register i (group j = i // 2, second row if i odd) holds the
    # pair at columns 8 j + 2 (t % 4), +1 of row r (+ 8), stored little-endian (lo = first column)
    want = np.zeros((64, 64), np.uint16)
    for t in range(128):
        r = 16 * (t // 32) + (t % 32) // 4
        for i in range(2 * groups):
            j, second = i // 2, i % 2
            v = t * 64 + i
            c = 8 * j + 2 * (t % 4)
            want[r + 8 * second, c], want[r + 8 * second, c + 1] = v & 0xFFFF, v >> 16
    unswizzled = np.empty_like(want)
    for r in range(64):
        for u in range(8):  # 16-byte unit u of row r sits at unit u ^ (r % 8)
            unswizzled[r, 8 * u:8 * u + 8] = got[0, r, 8 * (u ^ (r % 8)):8 * (u ^ (r % 8)) + 8]
    np.testing.assert_array_equal(unswizzled, want)
