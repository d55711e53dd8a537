"""wgmma matrix descriptors (primitives.smem): the per-wgmma `descriptor` and the hoisted
`descriptors` tuple give the same bits, which are those of PTX ISA 9.7.15.5.1.2."""
import numpy as np
import pytest

from numba_fa3.primitives import smem

#: Offsets like a K loop's: 32-byte K steps inside a 1024-byte atom row, then whole 64-column
#: chunks further on (FlashForward's Q at hdim 128: 8 steps over two chunks).
OFFSETS = (0, 32, 64, 96, 8192, 8224, 8256, 8288)


def _model(base, addr, offset):
    """The descriptor from its format: start address in 16-byte units in bits 0-13."""
    return base | ((((addr >> 4) & 0x3FFF) + (offset >> 4)) & 0xFFFFFFFF)


def test_descriptor_base_fields():
    base = smem.descriptor_base(8192, 1024)
    assert (base >> 16) & 0x3FFF == 8192 >> 4
    assert (base >> 32) & 0x3FFF == 1024 >> 4
    assert base >> 62 == 1  # 128-byte swizzle
    assert base & 0x3FFF == 0


@pytest.mark.parametrize("bad", [(8,), (0, 24), (-16,), (1 << 18,)])
def test_descriptors_reject_bad_offsets(bad):
    with pytest.raises(ValueError, match="16-byte multiple"):
        smem.descriptors(bad)


@pytest.mark.gpu
def test_descriptors_match_descriptor_and_format():
    from numba import cuda

    base = smem.descriptor_base(0, smem.ATOM_BYTES)
    many = smem.descriptors(OFFSETS)

    @cuda.jit
    def kernel(addrs, one, tup):
        t = cuda.threadIdx.x
        a = np.uint32(addrs[t])
        d = many(base, a)
        for i in range(len(OFFSETS)):
            tup[t, i] = d[i]
        one[t, 0] = smem.descriptor(base, a, 0)
        one[t, 1] = smem.descriptor(base, a, 32)
        one[t, 2] = smem.descriptor(base, a, 64)
        one[t, 3] = smem.descriptor(base, a, 96)
        one[t, 4] = smem.descriptor(base, a, 8192)
        one[t, 5] = smem.descriptor(base, a, 8224)
        one[t, 6] = smem.descriptor(base, a, 8256)
        one[t, 7] = smem.descriptor(base, a, 8288)

    rng = np.random.default_rng(3)
    # 1024-byte aligned shared addresses below the 227 KB a block may use
    addrs = (rng.integers(0, smem.MAX_DYNAMIC_SMEM // smem.ATOM_BYTES - 16, 32) * smem.ATOM_BYTES).astype(np.uint32)
    poison = np.full((32, len(OFFSETS)), 0xDEADBEEFDEADBEEF, dtype=np.uint64)
    d_one, d_tup = cuda.to_device(poison), cuda.to_device(poison)
    kernel[1, 32](cuda.to_device(addrs), d_one, d_tup)
    one, tup = d_one.copy_to_host(), d_tup.copy_to_host()
    want = np.array([[_model(base, int(a), o) for o in OFFSETS] for a in addrs], dtype=np.uint64)
    np.testing.assert_array_equal(one, want)
    np.testing.assert_array_equal(tup, want)
