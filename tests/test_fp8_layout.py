"""V transposed for the FP8 attention kernel (`numba_fa3.fp8_layout`).

Without a GPU: sigma is a permutation and the documented formula; a NumPy model of packing the
S accumulator's registers into the e4m3 A fragment of a k = 32 wgmma shows that V's rows in
sigma order give P V exactly; the NumPy twin `transpose_v_like_kernel` against a direct loop on
odd shapes, with zero padding; the kernel's data movement emulated in NumPy (loads, the shared
swizzle, the prmt byte transposes, the stores) gives the twin and writes every byte; its shared
loads and stores are free of bank conflicts; every specialization compiles clean; bad inputs
raise before launch.

On a Hopper GPU: `transpose_v` against the twin bit for bit on random codes (torch and Numba
inputs, odd shapes, strided inputs), into outputs poisoned with 0xFF; on a side stream; bad
inputs and outputs raise."""
import itertools

import ml_dtypes
import numpy as np
import pytest

from numba_fa3 import fp8_layout as fl
from numba_fa3.primitives import compile as kc

gpu = pytest.mark.gpu
#: Bytes that a test's outputs are filled with first, so that every byte must be written (0xFF
#: is an e4m3 NaN code, which the kernel never writes into the padding).
POISON = 0xFF
#: Shared-memory banks (4 bytes each), lanes of a warp, lanes that one 16-byte shared access
#: phase serves (a quarter warp: 128 bytes).
BANKS, BANK_BYTES, WARP, QUARTER = 32, 4, 32, 8
ODD_KEYS = [1, 31, 33, 300]


# --- the permutation ----------------------------------------------------------------------------

def test_key_permutation_is_a_permutation():
    sigma = fl.key_permutation()
    assert sigma.dtype == np.int64 and sigma.shape == (fl.KEY_GROUP,)
    assert np.array_equal(np.sort(sigma), np.arange(fl.KEY_GROUP))


def test_key_permutation_is_the_formula():
    want = [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15,
            16, 17, 24, 25, 18, 19, 26, 27, 20, 21, 28, 29, 22, 23, 30, 31]
    formula = []
    for j in range(fl.KEY_GROUP):
        r = j % 16
        q, i = r // 4, r % 4
        formula.append(16 * (j // 16) + [2 * q, 2 * q + 1, 8 + 2 * q, 9 + 2 * q][i])
    assert fl.key_permutation().tolist() == want == formula


def _accumulator_columns(t):
    """Columns of a 32-column chunk of the S accumulator that lane t of a quad holds, in register
    order: two adjacent columns of each 8-column group."""
    return [8 * g + 2 * t + e for g in range(4) for e in range(2)]


def _fragment_columns(t):
    """k positions of a k = 32 e4m3 A fragment that lane t of a quad holds, in register order:
    four consecutive ones in each half."""
    return [16 * half + 4 * t + e for half in range(2) for e in range(4)]


def test_packing_model_gives_sigma():
    """Register i of the accumulator goes to slot i of the fragment: the GEMM sees at k position
    fragment[i] the value of key accumulator[i], i.e. sigma(fragment[i])."""
    sigma = fl.key_permutation()
    for t in range(4):
        for acc, frag in zip(_accumulator_columns(t), _fragment_columns(t)):
            assert sigma[frag] == acc
    seen = sorted(c for t in range(4) for c in _fragment_columns(t))
    assert seen == list(range(fl.KEY_GROUP))


@pytest.mark.parametrize("chunks", [1, 3])
def test_packing_with_permuted_v_is_exact(chunks):
    """P fed through the packing model times V's rows in sigma order is P V, exactly (small
    integers); V in natural order is not."""
    rng = np.random.default_rng(chunks)
    m, d = 8, 16
    keys = chunks * fl.KEY_GROUP
    p = rng.integers(-8, 9, size=(m, keys)).astype(np.float64)
    v8 = rng.integers(0, 256, size=(1, keys, 1, d)).astype(np.uint8)
    v = v8[0, :, 0].astype(np.float64)
    fed = np.zeros_like(p)  # what the GEMM reads at each k position
    for c in range(chunks):
        for t in range(4):
            for acc, frag in zip(_accumulator_columns(t), _fragment_columns(t)):
                fed[:, c * fl.KEY_GROUP + frag] = p[:, c * fl.KEY_GROUP + acc]
    vt = fl.transpose_v_like_kernel(v8)[0, 0].astype(np.float64)  # [D, keys]
    assert np.array_equal(fed @ vt.T, p @ v)
    assert not np.array_equal(fed @ v, p @ v)


# --- the NumPy twin -----------------------------------------------------------------------------

def _loop_reference(v8):
    b, sk, hk, d = v8.shape
    pad = fl.padded_keys(sk)
    sigma = fl.key_permutation()
    vt = np.zeros((b, hk, d, pad), np.uint8)
    for bb in range(b):
        for h in range(hk):
            for g in range(pad // fl.KEY_GROUP):
                for j in range(fl.KEY_GROUP):
                    key = fl.KEY_GROUP * g + sigma[j]
                    if key < sk:
                        vt[bb, h, :, fl.KEY_GROUP * g + j] = v8[bb, key, h, :]
    return vt


def test_padded_keys():
    assert [fl.padded_keys(n) for n in (0, 1, 31, 32, 33, 300)] == [0, 32, 32, 32, 64, 320]
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError):
            fl.padded_keys(bad)


@pytest.mark.parametrize("sk,hk,d", list(itertools.product(ODD_KEYS, [1, 2, 3], fl.HEAD_DIMS)))
def test_twin_against_loop(sk, hk, d):
    rng = np.random.default_rng(sk * 7 + hk * 3 + d)
    v8 = rng.integers(0, 256, size=(2, sk, hk, d), dtype=np.uint8)
    vt = fl.transpose_v_like_kernel(v8)
    assert vt.dtype == np.uint8 and vt.shape == (2, hk, d, fl.padded_keys(sk)) and vt.flags.c_contiguous
    assert np.array_equal(vt, _loop_reference(v8))


@pytest.mark.parametrize("sk", ODD_KEYS)
def test_twin_pads_with_zeros(sk):
    v8 = np.full((1, sk, 2, 64), POISON, np.uint8)
    vt = fl.transpose_v_like_kernel(v8)
    sigma = fl.key_permutation()
    position = np.arange(vt.shape[-1])
    key = position - position % fl.KEY_GROUP + sigma[position % fl.KEY_GROUP]
    assert (vt[..., key < sk] == POISON).all()
    assert (vt[..., key >= sk] == 0).all()


def test_twin_takes_e4m3_and_rejects_others():
    codes = np.arange(2 * 40 * 64, dtype=np.uint8).reshape(1, 40, 2, 64)
    want = fl.transpose_v_like_kernel(codes)
    assert np.array_equal(fl.transpose_v_like_kernel(codes.view(ml_dtypes.float8_e4m3fn)), want)
    with pytest.raises(TypeError):
        fl.transpose_v_like_kernel(codes.astype(np.float16))
    with pytest.raises(ValueError):
        fl.transpose_v_like_kernel(codes[0])


# --- the kernel's data movement, emulated ---------------------------------------------------------

def _prmt(a, b, selector):
    """`prmt.b32` (default mode) on uint32 arrays: result byte i is byte (nibble i of selector)
    of the eight bytes b:a (a's bytes 0-3)."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        out |= src[(selector >> (4 * i)) & 0x7] << (8 * i)
    return out


def _transpose4(a, b, c, d):
    """The kernel's `transpose4`, from the module's selectors."""
    ab_low, ab_high = _prmt(a, b, fl.INTERLEAVE_LOW), _prmt(a, b, fl.INTERLEAVE_HIGH)
    cd_low, cd_high = _prmt(c, d, fl.INTERLEAVE_LOW), _prmt(c, d, fl.INTERLEAVE_HIGH)
    return (_prmt(ab_low, cd_low, fl.HALVES_LOW), _prmt(ab_low, cd_low, fl.HALVES_HIGH),
            _prmt(ab_high, cd_high, fl.HALVES_LOW), _prmt(ab_high, cd_high, fl.HALVES_HIGH))


def test_transpose4_transposes_bytes():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 256, size=(5, 4, 4), dtype=np.uint8)  # five 4x4 matrices, row = word
    words = [m[:, i].copy().view("<u4")[:, 0].astype(np.uint64) for i in range(4)]
    got = np.stack([w.astype("<u4").view(np.uint8).reshape(5, 4) for w in _transpose4(*words)], axis=1)
    assert np.array_equal(got, m.transpose(0, 2, 1))


def _read_address(d, tid):
    """Byte offset in the tile's shared rows of each of the 16 words a write-out thread loads,
    as the kernel computes it ([16, threads]), and its (word, block, lane word)."""
    rp = d // fl.PIECE_BYTES
    word, block = tid // fl.BLOCKS, tid % fl.BLOCKS
    column, lane_word = word // fl.WORDS_PER_PIECE, word % fl.WORDS_PER_PIECE
    mixed = column ^ block
    rows = block * fl.HALF_GROUP * rp * fl.PIECE_BYTES + lane_word * fl.WORD_BYTES
    addr = np.stack([rows + k * rp // fl.LINE_PIECES * fl.LINE_BYTES
                     + (mixed ^ (k * rp % fl.LINE_PIECES)) * fl.PIECE_BYTES for k in range(fl.HALF_GROUP)])
    return addr, word, block, column, lane_word


def _emulate(v8):
    """The kernel on NumPy codes, CTA by CTA, threads as arrays; the output starts poisoned."""
    b, sk, hk, d = v8.shape
    pad = fl.padded_keys(sk)
    kern = fl.TransposeVKernel(d)
    rp = d // fl.PIECE_BYTES
    tid = np.arange(kern.threads)
    sigma = fl.key_permutation()
    out = np.full((b, hk, d, pad), POISON, np.uint8)
    written = np.zeros(out.shape, np.int64)
    for bb, h, tile in itertools.product(range(b), range(hk), range(-(-sk // fl.TILE_KEYS))):
        first = tile * fl.TILE_KEYS
        staged = np.full(fl.TILE_KEYS * d, POISON, np.uint8)
        for i in range(kern.loads_per_thread):
            piece = i * kern.threads + tid
            key, c = piece // rp, piece % rp
            rows = v8[bb, np.minimum(first + key, sk - 1), h].reshape(-1, rp, fl.PIECE_BYTES)[tid, c]
            rows[first + key >= sk] = 0
            unit = fl.staged_piece(piece, key)
            staged.reshape(-1, fl.PIECE_BYTES)[unit] = rows
        addr, word, block, _, _ = _read_address(d, tid)
        start = first + block * fl.HALF_GROUP
        live = start < pad
        words = staged.view("<u4")[addr // fl.WORD_BYTES].astype(np.uint64)  # [16, threads]
        cols = [_transpose4(*(words[sigma[q * 4 + e]] for e in range(4))) for q in range(4)]
        for r in range(4):
            piece = np.stack([cols[q][r] for q in range(4)], axis=1).astype("<u4").view(np.uint8)
            for t in tid[live]:
                out[bb, h, 4 * word[t] + r, start[t]:start[t] + fl.HALF_GROUP] = piece[t]
                written[bb, h, 4 * word[t] + r, start[t]:start[t] + fl.HALF_GROUP] += 1
    return out, written


@pytest.mark.parametrize("d,sk", [(64, 1), (64, 300), (128, 33), (128, 129), (256, 31), (256, 200)])
def test_emulated_kernel_is_the_twin(d, sk):
    rng = np.random.default_rng(d + sk)
    v8 = rng.integers(0, 256, size=(2, sk, 2, d), dtype=np.uint8)
    out, written = _emulate(v8)
    assert (written == 1).all(), "every byte of vt written exactly once"
    assert np.array_equal(out, fl.transpose_v_like_kernel(v8))


@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_read_addresses_are_the_staged_pieces(d):
    """The kernel's folded address arithmetic is `staged_piece` of (key, piece) plus the word."""
    rp = d // fl.PIECE_BYTES
    tid = np.arange(fl.TransposeVKernel(d).threads)
    addr, _, block, column, lane_word = _read_address(d, tid)
    for k in range(fl.HALF_GROUP):
        key = block * fl.HALF_GROUP + k
        want = fl.staged_piece(key * rp + column, key) * fl.PIECE_BYTES + lane_word * fl.WORD_BYTES
        assert np.array_equal(addr[k], want)


@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_shared_accesses_have_no_bank_conflicts(d):
    """Each 16-byte store phase (a quarter warp) covers the eight 16-byte units of a 128-byte
    span of banks once; each 4-byte load of a warp hits 32 distinct banks."""
    kern = fl.TransposeVKernel(d)
    rp = d // fl.PIECE_BYTES
    tid = np.arange(kern.threads)
    for i in range(kern.loads_per_thread):
        piece = i * kern.threads + tid
        unit = fl.staged_piece(piece, piece // rp)
        for phase in unit.reshape(-1, QUARTER):
            assert len(set(phase % fl.LINE_PIECES)) == QUARTER
        assert len(set(unit)) == len(unit)
    addr, _, _, _, _ = _read_address(d, tid)
    for k in range(fl.HALF_GROUP):
        for warp in addr[k].reshape(-1, WARP):
            assert len(set((warp // BANK_BYTES) % BANKS)) == WARP


@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_stores_fill_whole_segments(d):
    """The eight lanes of a word write one row's 128 bytes per store (whole 32-byte sectors)."""
    tid = np.arange(fl.TransposeVKernel(d).threads)
    _, word, block, _, _ = _read_address(d, tid)
    for lanes in range(0, len(tid), fl.BLOCKS):
        assert len(set(word[lanes:lanes + fl.BLOCKS])) == 1
        assert sorted(block[lanes:lanes + fl.BLOCKS]) == list(range(fl.BLOCKS))


# --- compile-only -------------------------------------------------------------------------------

def _assert_clean(report, what):
    assert report["stack"] == 0, f"{what}: {report['stack']} B stack frame\n{report['log']}"
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what}: spills\n{report['log']}"
    assert not report["warnings"], f"{what}: ptxas warnings {report['warnings']}"


VARLEN_LENS = [[1], [0, 1, 33, 300, 128, 17, 0], [129, 31, 256]]


def test_varlen_twin_is_the_definition():
    """Sequence i's key j sits at column varlen_start(cu[i], i) + 32 (j // 32) + sigma^-1(j % 32);
    every other byte is 0; regions are 16-aligned and never overlap."""
    rng = np.random.default_rng(3)
    sigma = fl.key_permutation()
    inverse = np.argsort(sigma)
    for lens in VARLEN_LENS:
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        v8 = rng.integers(1, 256, size=(int(cu[-1]), 2, 64), dtype=np.uint8)
        vt = fl.transpose_v_varlen_like_kernel(v8, cu)
        assert vt.shape == (2, 64, fl.varlen_columns(cu[-1], len(lens)))
        seen = np.zeros(vt.shape[2], bool)
        for i, n in enumerate(lens):
            start = fl.varlen_start(int(cu[i]), i)
            assert start % fl.VARLEN_ALIGN == 0
            assert fl.varlen_start(int(cu[i + 1]), i + 1) - start >= fl.padded_keys(n)
            j = np.arange(n)
            col = start + j - j % fl.KEY_GROUP + inverse[j % fl.KEY_GROUP]
            assert np.array_equal(vt[:, :, col], v8[cu[i]:cu[i + 1]].transpose(1, 2, 0))
            seen[col] = True
        assert not vt[:, :, ~seen].any()


def _emulate_varlen(v8, cu):
    """The varlen kernel on NumPy codes, CTA by CTA (as `_emulate`); output poisoned."""
    tk, hk, d = v8.shape
    seqs = len(cu) - 1
    cols = fl.varlen_columns(tk, seqs)
    kern = fl.TransposeVKernel(d, varlen=True)
    rp = d // fl.PIECE_BYTES
    tid = np.arange(kern.threads)
    sigma = fl.key_permutation()
    out = np.full((hk, d, cols), POISON, np.uint8)
    written = np.zeros(out.shape, np.int64)
    tiles = -(-(max(np.diff(cu)) + fl.VARLEN_GAP + fl.VARLEN_ALIGN - 1) // fl.TILE_KEYS)
    for bb, h, tile in itertools.product(range(seqs), range(hk), range(tiles)):
        lo, hi = int(cu[bb]), int(cu[bb + 1])
        col0 = fl.varlen_start(lo, bb)
        region = fl.varlen_start(hi, bb + 1) - col0
        last = hi - lo - 1
        first = tile * fl.TILE_KEYS
        staged = np.full(fl.TILE_KEYS * d, POISON, np.uint8)
        for i in range(kern.loads_per_thread):
            piece = i * kern.threads + tid
            key, c = piece // rp, piece % rp
            rows = v8[min(lo, tk - 1) + np.minimum(first + key, max(last, 0)), h].reshape(-1, rp, fl.PIECE_BYTES)[tid, c]
            rows[first + key > last] = 0
            staged.reshape(-1, fl.PIECE_BYTES)[fl.staged_piece(piece, key)] = rows
        addr, word, block, _, _ = _read_address(d, tid)
        start = first + block * fl.HALF_GROUP
        live = start < region
        words = staged.view("<u4")[addr // fl.WORD_BYTES].astype(np.uint64)
        cols4 = [_transpose4(*(words[sigma[q * 4 + e]] for e in range(4))) for q in range(4)]
        for r in range(4):
            piece = np.stack([cols4[q][r] for q in range(4)], axis=1).astype("<u4").view(np.uint8)
            for t in tid[live]:
                c0 = col0 + start[t]
                out[h, 4 * word[t] + r, c0:c0 + fl.HALF_GROUP] = piece[t]
                written[h, 4 * word[t] + r, c0:c0 + fl.HALF_GROUP] += 1
    return out, written


@pytest.mark.parametrize("d,lens", [(64, VARLEN_LENS[1]), (128, VARLEN_LENS[0]), (256, VARLEN_LENS[2])])
def test_emulated_varlen_kernel_is_the_twin(d, lens):
    rng = np.random.default_rng(d + len(lens))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    v8 = rng.integers(0, 256, size=(int(cu[-1]), 2, d), dtype=np.uint8)
    out, written = _emulate_varlen(v8, cu)
    assert (written == 1).all(), "every byte of vt written exactly once"
    assert np.array_equal(out, fl.transpose_v_varlen_like_kernel(v8, cu))


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_varlen_compiles_clean(d):
    kern = fl.TransposeVKernel(d, varlen=True)
    ptx = kern.compile_ptx()
    assert ptx.count("st.global.v4.b32") == fl.WORDS_PER_PIECE
    report = kc.ptxas_report(ptx)
    _assert_clean(report, f"transpose_v varlen d{d}")
    allocated = -(-report["registers"] // 8) * 8
    assert 2 * kern.threads * allocated <= 64 * 1024, f"{report['registers']} registers: one CTA per SM"


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_compiles_clean(d):
    """No spill, stack or warning, and two or more CTAs fit an SM's registers; per thread: four
    16-byte loads and shared stores, 16 shared word loads, eight prmt per 4x4 byte transpose
    (four), four 16-byte stores, one barrier."""
    kern = fl.TransposeVKernel(d)
    ptx = kern.compile_ptx()
    assert kern.threads == fl.BLOCKS * d // fl.WORD_BYTES
    assert ptx.count("ld.global.nc.v4.b32") == ptx.count("st.shared.v4.b32") == kern.loads_per_thread == 4
    assert ptx.count("ld.shared.b32") == fl.HALF_GROUP
    assert ptx.count("prmt.b32") == 8 * fl.WORDS_PER_PIECE
    assert ptx.count("st.global.v4.b32") == fl.WORDS_PER_PIECE
    assert ptx.count("bar.sync") == 1
    assert "div.s" not in ptx and "rem." not in ptx  # index math: shifts and masks
    report = kc.ptxas_report(ptx)
    _assert_clean(report, f"transpose_v d{d}")
    allocated = -(-report["registers"] // 8) * 8  # registers are allocated 8 per thread at a time
    assert 2 * kern.threads * allocated <= 64 * 1024, f"{report['registers']} registers: one CTA per SM"


# --- bad inputs ---------------------------------------------------------------------------------

class FakeDeviceArray:
    """A `__cuda_array_interface__` exporter of uint8 (or `typestr`) at any address (never read)."""

    def __init__(self, shape, ptr=1 << 20, strides=None, typestr="|u1"):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": typestr, "data": (ptr, False), "version": 3,
            "strides": None if strides is None else tuple(strides)}


SHAPE = (1, 40, 2, 64)


@pytest.mark.parametrize("v8,error", [
    (np.zeros(SHAPE, np.uint8), TypeError),                                    # NumPy: the twin
    ([[0]], TypeError),
    (FakeDeviceArray(SHAPE, typestr="<f2"), TypeError),                        # dtype
    (FakeDeviceArray((40, 2, 64)), ValueError),                                # rank
    (FakeDeviceArray((1, 0, 2, 64)), ValueError),                              # empty
    (FakeDeviceArray((1, 40, 2, 96)), ValueError),                             # head dim
    (FakeDeviceArray((1, 40, 2, 32)), ValueError),
    (FakeDeviceArray(SHAPE, ptr=(1 << 20) + 8), ValueError),                   # base
    (FakeDeviceArray(SHAPE, strides=(40 * 2 * 128, 2 * 128, 128, 2)), ValueError),  # head dim strided
    (FakeDeviceArray(SHAPE, strides=(40 * 2 * 72, 2 * 72, 72, 1)), ValueError),     # 72-byte heads
])
def test_bad_inputs_raise(v8, error):
    with pytest.raises(error):
        fl.transpose_v(v8)


@pytest.mark.parametrize("out", [
    FakeDeviceArray((1, 2, 64, 40)),                                           # keys not padded
    FakeDeviceArray((1, 2, 64, 64), typestr="<f2"),                            # dtype
    FakeDeviceArray((1, 2, 64, 64), ptr=(1 << 20) + 4),                        # base
    FakeDeviceArray((1, 2, 64, 64), strides=(2 * 64 * 128, 64 * 128, 128, 1)),  # not contiguous
])
def test_bad_outputs_raise(out):
    with pytest.raises(ValueError):
        fl.transpose_v(FakeDeviceArray(SHAPE), out=out)


def test_strides_of_size_one_dimensions_are_ignored():
    used, tiles = fl._check_input(1 << 20, (1, 300, 1, 128), (12345, 128, 7, 1), "e4m3")
    assert used == (0, 128, 0) and tiles == 3
    with pytest.raises(ValueError):
        fl._check_input(1 << 20, (2, 300, 1, 128), (12345, 128, 7, 1), "e4m3")


def test_bytes_moved():
    assert fl.bytes_moved((2, 33, 3, 64)) == 2 * 33 * 3 * 64 + 2 * 3 * 64 * 64


# --- GPU ----------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _to_torch(a, dtype="e4m3"):
    """NumPy uint8 codes as a torch CUDA tensor of float8_e4m3fn (or uint8)."""
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
    return t.view(torch.float8_e4m3fn) if dtype == "e4m3" else t


def _bits(t):
    """The bytes of a torch tensor or a Numba device array as NumPy uint8."""
    if hasattr(t, "data_ptr"):
        return t.view(_torch().uint8).cpu().numpy()
    return t.copy_to_host()


def _poisoned(shape, dtype="e4m3"):
    torch = _torch()
    t = torch.full(shape, POISON, dtype=torch.uint8, device="cuda")
    return t.view(torch.float8_e4m3fn) if dtype == "e4m3" else t


def _vt_shape(v8):
    b, sk, hk, d = v8.shape
    return (b, hk, d, fl.padded_keys(sk))


GPU_CASES = [(d, sk, hk) for d, (sk, hk) in itertools.product(
    fl.HEAD_DIMS, [(1, 1), (31, 2), (33, 3), (300, 2), (4097, 1)])]


@gpu
@pytest.mark.parametrize("d,sk,hk", GPU_CASES)
def test_gpu_random_codes(d, sk, hk):
    torch = _torch()
    rng = np.random.default_rng(d * 10000 + sk * 10 + hk)
    v8 = rng.integers(0, 256, size=(2, sk, hk, d), dtype=np.uint8)
    want = fl.transpose_v_like_kernel(v8)
    out = _poisoned(want.shape)
    vt = fl.transpose_v(_to_torch(v8), out=out)
    assert vt is out
    torch.cuda.synchronize()
    assert np.array_equal(_bits(vt), want)
    fresh = fl.transpose_v(_to_torch(v8, "u8"))
    torch.cuda.synchronize()
    assert fresh.dtype == torch.float8_e4m3fn and tuple(fresh.shape) == want.shape and fresh.is_contiguous()
    assert np.array_equal(_bits(fresh), want)


@gpu
@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_gpu_varlen(d):
    torch = _torch()
    rng = np.random.default_rng(d + 7)
    for lens in VARLEN_LENS:
        cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
        v8 = rng.integers(0, 256, size=(int(cu[-1]), 3, d), dtype=np.uint8)
        want = fl.transpose_v_varlen_like_kernel(v8, cu)
        out = _poisoned(want.shape)
        vt = fl.transpose_v_varlen(_to_torch(v8), torch.from_numpy(cu).cuda(), max(lens), out=out)
        torch.cuda.synchronize()
        assert vt is out
        assert np.array_equal(_bits(vt), want)


@gpu
def test_gpu_large():
    torch = _torch()
    rng = np.random.default_rng(1)
    v8 = rng.integers(0, 256, size=(2, 8192 + 96, 4, 128), dtype=np.uint8)
    vt = fl.transpose_v(_to_torch(v8), out=_poisoned(_vt_shape(v8), "u8"))
    torch.cuda.synchronize()
    assert np.array_equal(_bits(vt), fl.transpose_v_like_kernel(v8))


@gpu
def test_gpu_numba_inputs():
    from numba import cuda
    rng = np.random.default_rng(2)
    v8 = rng.integers(0, 256, size=(2, 100, 3, 64), dtype=np.uint8)
    want = fl.transpose_v_like_kernel(v8)
    vt = fl.transpose_v(cuda.to_device(v8))
    cuda.synchronize()
    assert vt.dtype == np.uint8 and vt.shape == want.shape
    assert np.array_equal(vt.copy_to_host(), want)
    out = cuda.to_device(np.full(want.shape, POISON, np.uint8))
    assert fl.transpose_v(cuda.to_device(v8), out=out) is out
    cuda.synchronize()
    assert np.array_equal(out.copy_to_host(), want)


@gpu
@pytest.mark.parametrize("d", fl.HEAD_DIMS)
def test_gpu_strided_inputs(d):
    """Slices of wider tensors (keys from an offset, some heads, half of a wider head dim), and a
    batch of one with an unaligned stride that is never stepped along."""
    torch = _torch()
    rng = np.random.default_rng(d)
    wide = rng.integers(0, 256, size=(2, 300, 5, 2 * d), dtype=np.uint8)
    tw = _to_torch(wide)
    for sl in (np.s_[:, 7:250, 1:4, :d], np.s_[:, :, 4:, d:], np.s_[1:, 33:34, ::2, :d]):
        want = fl.transpose_v_like_kernel(wide[sl])
        vt = fl.transpose_v(tw[sl], out=_poisoned(want.shape))
        torch.cuda.synchronize()
        assert np.array_equal(_bits(vt), want), f"slice {sl}"
    flat = _to_torch(wide.reshape(-1))
    odd = torch.as_strided(flat, (1, 129, 2, d), (12345, 5 * 2 * d, 2 * d, 1))
    want = fl.transpose_v_like_kernel(wide[:1, :129, :2, :d])
    vt = fl.transpose_v(odd)
    torch.cuda.synchronize()
    assert np.array_equal(_bits(vt), want)


@gpu
def test_gpu_side_stream():
    torch = _torch()
    rng = np.random.default_rng(3)
    v8 = rng.integers(0, 256, size=(1, 500, 2, 128), dtype=np.uint8)
    tv = _to_torch(v8)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        vt = fl.transpose_v(tv)  # torch's current stream: the side stream
    side.synchronize()
    assert np.array_equal(_bits(vt), fl.transpose_v_like_kernel(v8))
    out = _poisoned(_vt_shape(v8))
    fl.transpose_v(tv, out=out, stream=side)
    side.synchronize()
    assert np.array_equal(_bits(out), fl.transpose_v_like_kernel(v8))


@gpu
def test_gpu_bad_inputs_and_outputs_raise():
    torch = _torch()
    good = torch.zeros((1, 40, 2, 64), dtype=torch.uint8, device="cuda")
    with pytest.raises(TypeError):
        fl.transpose_v(good.cpu())
    with pytest.raises(TypeError):
        fl.transpose_v(torch.zeros((1, 40, 2, 64), dtype=torch.float16, device="cuda"))
    with pytest.raises(ValueError):
        fl.transpose_v(torch.zeros((1, 40, 2, 96), dtype=torch.uint8, device="cuda"))
    misaligned = torch.zeros(1 + 40 * 2 * 64, dtype=torch.uint8, device="cuda")[1:].view(1, 40, 2, 64)
    with pytest.raises(ValueError):
        fl.transpose_v(misaligned)
    with pytest.raises(ValueError):
        fl.transpose_v(torch.zeros((1, 40, 2, 128), dtype=torch.uint8, device="cuda")[..., ::2])  # strided D
    shape = (1, 2, 64, 64)
    for bad in (torch.empty((1, 2, 64, 40), dtype=torch.uint8, device="cuda"),
                torch.empty(shape, dtype=torch.float16, device="cuda"),
                torch.empty((1, 2, 64, 128), dtype=torch.uint8, device="cuda")[..., :64]):
        with pytest.raises(ValueError):
            fl.transpose_v(good, out=bad)
