"""V for the FP8 attention kernel: transposed to ``vt [B, Hk, D, Sk_pad]`` ("k-major", keys
contiguous), the keys permuted within each aligned group of `KEY_GROUP` keys.

Why transposed.  wgmma takes an e4m3 B operand only K-major: for ``O += P V`` the reduction runs
over keys, so each of V's D columns must be a row of keys in memory.  ``Sk_pad`` is ``Sk``
rounded up to `KEY_GROUP` (`padded_keys`), a whole number of the kernel's k = 32 steps; the
padding holds zero bytes, because the kernel's P is exactly 0 there and ``0 * garbage`` can be
NaN (e4m3 0x7F).

Why permuted.  The fp32 accumulator of ``S = Q K^T`` gives lane ``t`` of a quad (``t = lane % 4``)
columns ``8g + 2t + {0, 1}`` of each 8-column group ``g``; the e4m3 A fragment of a k = 32 wgmma
wants columns ``4t + {0..3}`` and ``16 + 4t + {0..3}`` of its 32.  Packing the accumulator's
registers in order into the A fragment (no shuffles) therefore hands the GEMM key ``sigma(j)``
where it expects key ``j`` (`key_permutation`), which is harmless if row ``j`` of V's transposed
group holds key ``sigma(j)``: ``sum_j P[sigma(j)] V[sigma(j)] = sum_k P[k] V[k]``.  So::

    vt[b, h, d, 32 g + j] = v8[b, 32 g + sigma(j), h, d]   (0 where that key is >= Sk)

``sigma`` keeps each aligned half group of `HALF_GROUP` keys together, so one 16-byte piece of
an output row holds exactly the keys of one 16-key block of the input.

The kernel (`TransposeVKernel`), one CTA per (batch, key head, block of `TILE_KEYS` keys), ``2 D``
threads:

* Read.  The block's key rows (D bytes each) are read with 16-byte loads, consecutive threads on
  consecutive pieces (a warp reads 512 contiguous bytes of rows), keys past ``Sk`` as zeros, and
  stored whole into shared memory.
* Shared memory holds the rows packed (piece ``u = key * D / 16 + c``), each piece at
  ``u ^ (key // 16)`` (`staged_piece`): a thread of the write-out phase reads one 32-bit word
  (four head-dim columns) of 16 consecutive keys, and the eight threads of a warp that take the
  eight 16-key blocks would otherwise hit the same banks (rows 16 keys apart are a multiple of
  128 bytes apart at every head dim).  The xor only moves a piece within its 128-byte line, so
  the 16-byte stores of a quarter warp (one line) stay conflict-free too.
* Write.  Thread ``(block p, word w)`` loads its 16 words, turns each four of them (keys
  ``sigma(4q + {0..3})``) into the four head-dim rows' word ``q`` by a 4x4 byte transpose (8
  `prmt`), and stores four 16-byte pieces: rows ``4w .. 4w + 3``, keys ``16p .. 16p + 15`` of the
  block.  The eight threads of a word write one 128-byte row segment per instruction.  Blocks at
  or past ``Sk_pad`` (the last tile's) are not written.
* Occupancy.  A copy at DRAM bandwidth needs its latency's worth of loads in flight (tens of KB
  per SM); each thread issues its four loads before the first use, and the kernel's few
  registers and ``D * TILE_KEYS`` bytes of shared memory leave several CTAs per SM (at least
  two, which test_compiles_clean checks), each with its whole tile in flight.

Timing: `bytes_moved` over the time of `transpose_v` (torch events, as in `quantize`'s docstring).
"""
import functools

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, smem, tensors
from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import memory, special

__all__ = ["KEY_GROUP", "HALF_GROUP", "TILE_KEYS", "HEAD_DIMS", "key_permutation", "padded_keys",
           "transpose_v_like_kernel", "staged_piece", "TransposeVKernel", "transpose_kernel",
           "transpose_v", "bytes_moved", "VARLEN_ALIGN", "VARLEN_GAP", "varlen_start", "varlen_columns",
           "transpose_v_varlen_like_kernel", "transpose_v_varlen"]

# --- the permutation ------------------------------------------------------------------------------

#: Keys of one k step of the FP8 P V GEMM (wgmma's K for e4m3 operands).
KEY_GROUP = 32
#: Lanes of a quad: the lanes that together hold one row of an MMA fragment.
QUAD = 4
#: Adjacent columns one accumulator register pair holds, and columns of one accumulator group.
ACC_PAIR = 2
ACC_GROUP = 8
#: Consecutive columns one lane's e4m3 A fragment holds (four codes of a 32-bit register), and
#: the half of a k step they repeat in.
FRAG_RUN = 4
HALF_GROUP = KEY_GROUP // 2


def key_permutation():
    """sigma, int64 ``[KEY_GROUP]``: position ``j`` of a transposed group of 32 keys holds key
    ``sigma(j) = 16 (j // 16) + [2q, 2q + 1, 8 + 2q, 9 + 2q][i]`` (``q = (j % 16) // 4``,
    ``i = j % 4``).

    The fp32 accumulator of ``S = Q K^T`` gives lane ``t`` of a quad columns ``8g + 2t + {0, 1}``
    of each 8-column group ``g``, in register order ``2t, 2t + 1, 8 + 2t, 9 + 2t, 16 + 2t, ...``;
    the e4m3 A fragment of a k = 32 wgmma wants that lane's columns ``4t + {0..3}`` and
    ``16 + 4t + {0..3}``.  Packing the accumulator's registers in order into the A fragment
    therefore feeds key ``sigma(j)`` where the GEMM expects key ``j``, which is harmless if V's
    row ``j`` holds key ``sigma(j)``."""
    j = np.arange(KEY_GROUP, dtype=np.int64)
    q = (j % HALF_GROUP) // FRAG_RUN         # the lane of the quad whose fragment holds position j
    i = j % FRAG_RUN                         # the register of that lane's run of four
    # Register i of lane q's run is its accumulator column 8 (i // 2) + 2q + i % 2.
    return HALF_GROUP * (j // HALF_GROUP) + ACC_GROUP * (i // ACC_PAIR) + ACC_PAIR * q + i % ACC_PAIR


def padded_keys(sk):
    """Keys of a transposed row: `sk` rounded up to a whole number of `KEY_GROUP`."""
    if isinstance(sk, bool) or not isinstance(sk, (int, np.integer)) or sk < 0:
        raise ValueError(f"the number of keys must be an int >= 0, got {sk!r}")
    return -(-int(sk) // KEY_GROUP) * KEY_GROUP


#: Packed (varlen) V^T: sequence i's keys start at column ``varlen_start(cu[i], i)`` of one
#: ``[Hk, D, varlen_columns(Tk, n)]`` array.  Starts are 16-key aligned (the kernel writes whole
#: 16-key blocks) and at least `VARLEN_GAP` - 15 columns past the previous sequence's last key,
#: so each sequence's region holds its keys rounded up to `KEY_GROUP` (the permutation works
#: per 32 keys from the sequence's start) and is written whole, zeros past its keys: the FP8
#: kernel's boxes that run past a sequence read finite codes, which its zero P ignores.
VARLEN_ALIGN, VARLEN_GAP = 16, 48


def varlen_start(k_off, seq):
    """The V^T column of key 0 of sequence `seq`, whose keys start at row `k_off` of the packed
    v8 (plain integer arithmetic: the kernels' and the host's)."""
    return (k_off & -VARLEN_ALIGN) + VARLEN_GAP * seq


def varlen_columns(total_keys, seqs):
    """Columns of a packed V^T of `seqs` sequences and `total_keys` keys: the start of a
    sequence past the last."""
    return varlen_start(int(total_keys), int(seqs))


def transpose_v_varlen_like_kernel(v8, cu_seqlens_k):
    """The packed layout in NumPy (what `transpose_v_varlen` computes, bit for bit): v8 uint8
    (or float8_e4m3fn) ``[Tk, Hk, D]`` and cu_seqlens_k (n + 1 entries from 0 to Tk) -> vt uint8
    ``[Hk, D, varlen_columns(Tk, n)]``: sequence i's keys transposed and permuted as
    `transpose_v_like_kernel`'s, from column ``varlen_start(cu[i], i)``, zeros elsewhere."""
    v8 = _codes(v8, "v8")
    if v8.ndim != 3:
        raise ValueError(f"v8 must be [total_keys, key heads, head_dim], got shape {v8.shape}")
    cu = np.asarray(cu_seqlens_k, dtype=np.int64)
    tk, hk, d = v8.shape
    n = len(cu) - 1
    vt = np.zeros((hk, d, varlen_columns(tk, n)), dtype=np.uint8)
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        if hi > lo:
            part = transpose_v_like_kernel(v8[None, lo:hi])[0]    # [Hk, D, padded_keys(len)]
            start = varlen_start(lo, i)
            vt[:, :, start:start + part.shape[2]] = part
    return vt


def _codes(v8, name):
    """A NumPy uint8 view of e4m3 codes (uint8 or ml_dtypes float8_e4m3fn)."""
    a = np.asarray(v8)
    e4m3 = tensors.NUMPY_DTYPES["e4m3"]
    if e4m3 is not None and a.dtype == e4m3:
        a = a.view(np.uint8)
    if a.dtype != np.uint8:
        raise TypeError(f"{name} must hold e4m3 codes as uint8 or float8_e4m3fn, got {a.dtype}")
    return a


def transpose_v_like_kernel(v8):
    """The layout in NumPy (what `transpose_v` computes on the GPU, bit for bit): v8 uint8 (or
    float8_e4m3fn) ``[B, Sk, Hk, D]`` -> vt uint8 ``[B, Hk, D, padded_keys(Sk)]`` with
    ``vt[b, h, d, 32 g + j] = v8[b, 32 g + sigma(j), h, d]``, 0 where that key is >= Sk."""
    v8 = _codes(v8, "v8")
    if v8.ndim != 4:
        raise ValueError(f"v8 must be [batch, keys, key heads, head_dim], got shape {v8.shape}")
    b, sk, hk, d = v8.shape
    pad = padded_keys(sk)
    src = np.zeros((b, pad, hk, d), dtype=np.uint8)
    src[:, :sk] = v8
    position = np.arange(pad)
    keys = position - position % KEY_GROUP + key_permutation()[position % KEY_GROUP]
    return np.ascontiguousarray(src[:, keys].transpose(0, 2, 3, 1))


# --- the kernel ---------------------------------------------------------------------------------

#: Head dims the kernel takes (the attention kernel's).
HEAD_DIMS = (64, 128, 256)
#: Keys of one CTA: eight 16-key blocks, one per 16-byte unit of a 128-byte shared-memory line
#: (the swizzle of `staged_piece` spreads the blocks over a line's units).
TILE_KEYS = 128
#: Bytes of one vector access (`ld.global.nc.v4`, `st.shared.v4`, `st.global.v4`), of a 32-bit
#: word, of a shared-memory bank line (32 banks of 4 bytes).
PIECE_BYTES, WORD_BYTES, LINE_BYTES = 16, 4, 128
WORDS_PER_PIECE = PIECE_BYTES // WORD_BYTES
LINE_PIECES = LINE_BYTES // PIECE_BYTES
#: 16-key blocks of a tile: the 16-byte output pieces of one row of the tile; key >> BLOCK_SHIFT
#: is a key's block.
BLOCKS = TILE_KEYS // HALF_GROUP
BLOCK_SHIFT = HALF_GROUP.bit_length() - 1
#: Key indices, tiles and CTAs are int32 in the kernel.
MAX_INDEX = 2**31 - 1
#: `prmt.b32` selectors (PTX ISA 9.7.8.7: result byte i takes byte nibble_i of {b, a}, a's bytes
#: 0-3, b's 4-7) of the 4x4 byte transpose: the first pair interleaves bytes 0, 1 (2, 3) of a
#: and b, the second takes the lower (upper) halves of two such words.
INTERLEAVE_LOW, INTERLEAVE_HIGH = 0x5140, 0x7362
HALVES_LOW, HALVES_HIGH = 0x5410, 0x7632
_U64, _I32, _I64 = types.uint64, types.int32, types.int64

if BLOCKS != LINE_PIECES:  # the bank-conflict argument of `staged_piece`
    raise AssertionError("a tile's 16-key blocks must match a shared-memory line's 16-byte units")


def staged_piece(piece, key):
    """Where piece ``piece = key * (D / 16) + c`` of a tile's rows (key < `TILE_KEYS`) sits in
    shared memory, in 16-byte units: xor-ed with the key's 16-key block, a permutation of the
    units of its 128-byte line (plain integer arithmetic: the kernel's and the tests')."""
    return piece ^ ((key >> BLOCK_SHIFT) & (LINE_PIECES - 1))


def _head_dim(head_dim):
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the V transpose; supported: {HEAD_DIMS}")
    return int(head_dim)


#: The kernel's parameters: the input's and the output's addresses; key heads, keys (Sk; packed:
#: Tk), padded keys (the output's row length: Sk_pad; packed: `varlen_columns`), tiles per
#: (batch, head); the input's (batch, key, head) strides in bytes; packed, cu_seqlens_k (int32).
TransposeParams = launch.params("TransposeVParams", [
    ("v_ptr", _U64), ("out_ptr", _U64),
    ("heads", _I32), ("seqlen", _I32), ("padded", _I32), ("tiles", _I32),
    ("v_batch_stride", _I64), ("v_row_stride", _I64), ("v_head_stride", _I64), ("cu_ptr", _U64)])


class TransposeVKernel(launch.HopperKernel):
    """The V transpose at one head dim (see the module docstring): a CTA per (batch, key head,
    `TILE_KEYS` keys), one thread per (16-key block, 32-bit word of the head dim), the tile's
    rows staged through shared memory."""

    PARAMS = TransposeParams

    def __init__(self, head_dim=128, varlen=False):
        self.head_dim = _head_dim(head_dim)
        self.varlen = bool(varlen)
        self.threads = BLOCKS * self.head_dim // WORD_BYTES   # one output unit each
        plan = smem.SharedLayout()
        plan.add("rows", TILE_KEYS * self.head_dim, align=PIECE_BYTES)
        self.smem = plan.check()

    @property
    def loads_per_thread(self):
        """16-byte loads (and shared stores) per thread: the tile's pieces over the threads."""
        return TILE_KEYS * self.head_dim // PIECE_BYTES // self.threads

    def body(self):
        D, THREADS, VARLEN = self.head_dim, self.threads, self.varlen
        ROW_PIECES = D // PIECE_BYTES
        start_of = cuda.jit(device=True, forceinline=True)(varlen_start)
        LOADS = self.loads_per_thread
        OFF_ROWS = self.smem.offsets["rows"]
        sigma = key_permutation()
        if not (sigma[HALF_GROUP:] == sigma[:HALF_GROUP] + HALF_GROUP).all():
            raise AssertionError("the write-out takes each half group's keys from one 16-key block")
        # Word q of an output piece holds (byte by byte) keys SOURCES[q] of its 16-key block.
        SOURCES = tuple(tuple(int(k) for k in sigma[q * WORDS_PER_PIECE:(q + 1) * WORDS_PER_PIECE])
                        for q in range(WORDS_PER_PIECE))
        ZERO_PIECE = (np.uint32(0),) * WORDS_PER_PIECE
        stage = cuda.jit(device=True, forceinline=True)(staged_piece)

        @cuda.jit(device=True, forceinline=True)
        def transpose4(a, b, c, d):
            """Rows of the 4x4 byte matrix whose row i is word i (byte j of a word its column
            j): word j of the result is column j, a's byte first."""
            ab_low, ab_high = special.prmt(a, b, INTERLEAVE_LOW), special.prmt(a, b, INTERLEAVE_HIGH)
            cd_low, cd_high = special.prmt(c, d, INTERLEAVE_LOW), special.prmt(c, d, INTERLEAVE_HIGH)
            return (special.prmt(ab_low, cd_low, HALVES_LOW), special.prmt(ab_low, cd_low, HALVES_HIGH),
                    special.prmt(ab_high, cd_high, HALVES_LOW), special.prmt(ab_high, cd_high, HALVES_HIGH))

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def transpose(p):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn)) + OFF_ROWS
            tid = np.int32(cuda.threadIdx.x)
            # Tiles vary fastest: consecutive CTAs write adjacent segments of the same rows.
            rest, tile = udivmod32(np.uint32(cuda.blockIdx.x), p.tiles)
            b, h = udivmod32(rest, p.heads)
            first = tile * np.int32(TILE_KEYS)
            if VARLEN:
                # sequence b: its keys, and its region of the output's columns (written whole)
                # (clamped to the packed keys as the attention kernel's scheduler clamps them:
                # the same starts, and no read out of bounds for bad cu_seqlens)
                lo = min(max(memory.ld_global_s32(p.cu_ptr + b * np.int32(4)), np.int32(0)), p.seqlen)
                hi = min(max(memory.ld_global_s32(p.cu_ptr + (b + np.int32(1)) * np.int32(4)), lo), p.seqlen)
                col0 = start_of(lo, b)
                region = start_of(hi, b + np.int32(1)) - col0
                last = hi - lo - np.int32(1)
                # (an empty sequence at the end re-reads the last key, not one past it)
                src = p.v_ptr + min(lo, p.seqlen - np.int32(1)) * p.v_row_stride + h * p.v_head_stride
                out_row0 = h * np.int64(D)
            else:
                col0 = np.int32(0)
                region = p.padded
                last = p.seqlen - np.int32(1)
                src = p.v_ptr + b * p.v_batch_stride + h * p.v_head_stride
                out_row0 = (b * p.heads + h) * np.int64(D)
            # Every load is issued before the first shared store waits for one.  Keys past the
            # end re-read the last key (an address inside v8; a packed empty sequence reads a
            # neighbour's) and are stored as zeros, the padding's bytes.
            top = max(last, np.int32(0))
            x = ()
            for i in static_range(LOADS):
                key, c = udivmod32(tid + np.int32(constexpr(i * THREADS)), ROW_PIECES)
                words = memory.ld_global_nc_v4_b32(src + min(first + key, top) * p.v_row_stride
                                                   + c * np.int32(PIECE_BYTES))
                if first + key > last:
                    words = ZERO_PIECE
                x = x + (words,)
            for i in static_range(LOADS):
                piece = tid + np.int32(constexpr(i * THREADS))
                key, _ = udivmod32(piece, ROW_PIECES)
                memory.st_shared_v4(base + stage(piece, key) * np.int32(PIECE_BYTES), x[i])
            cuda.syncthreads()
            # Lanes 8m .. 8m + 7 of a warp take the eight blocks of one word: their shared loads
            # hit distinct banks (`staged_piece`), their global stores one 128-byte segment.
            word, block = udivmod32(tid, BLOCKS)
            start = first + block * np.int32(HALF_GROUP)
            if start < region:
                column, lane_word = udivmod32(word, WORDS_PER_PIECE)
                # Key k's piece `column` is unit k ROW_PIECES + column of the block's rows, staged
                # at (that ^ block): the constant part of k ROW_PIECES outside a line's units,
                # plus the thread's (column ^ block) with k ROW_PIECES's bits inside them flipped.
                mixed = column ^ block
                rows = (base + block * np.int32(HALF_GROUP * ROW_PIECES * PIECE_BYTES)
                        + lane_word * np.int32(WORD_BYTES))
                w = ()
                for k in static_range(HALF_GROUP):
                    inside = np.int32(constexpr(k * ROW_PIECES % LINE_PIECES))
                    w = w + (memory.ld_shared_b32(rows + np.int32(constexpr(k * ROW_PIECES // LINE_PIECES
                                                                            * LINE_BYTES))
                                                  + (mixed ^ inside) * np.int32(PIECE_BYTES)),)
                cols = ()  # cols[q][r]: word q of head-dim row 4 word + r
                for q in static_range(WORDS_PER_PIECE):
                    cols = cols + (transpose4(w[constexpr(SOURCES[q][0])], w[constexpr(SOURCES[q][1])],
                                              w[constexpr(SOURCES[q][2])], w[constexpr(SOURCES[q][3])]),)
                row = out_row0 + word * np.int32(WORDS_PER_PIECE)
                dst = p.out_ptr + row * p.padded + col0 + start
                for r in static_range(WORDS_PER_PIECE):
                    memory.st_global_v4_b32(dst + r * p.padded,
                                            (cols[0][r], cols[1][r], cols[2][r], cols[3][r]))
        return transpose


@functools.lru_cache(maxsize=None)
def transpose_kernel(head_dim, varlen=False):
    return TransposeVKernel(head_dim, varlen)


# --- host -------------------------------------------------------------------------------------

_E4M3_TORCH = ("torch.float8_e4m3fn", "torch.uint8")
_E4M3_TYPESTR = ("|u1", "<u1")


def _array_info(arr, name):
    """(address, shape, strides in elements, dtype name, kind) of a torch CUDA tensor or a
    `__cuda_array_interface__` array (Numba, CuPy); dtype "e4m3" for float8_e4m3fn and uint8."""
    if isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: transpose_v takes GPU arrays; numba_fa3.fp8_layout.transpose_v_like_kernel "
                        "transposes NumPy arrays")
    if type(arr).__module__.startswith("torch"):
        if not arr.is_cuda:
            raise TypeError(f"{name}: torch tensor on {arr.device}; pass a CUDA tensor")
        dtype = "e4m3" if str(arr.dtype) in _E4M3_TORCH else str(arr.dtype)
        return arr.data_ptr(), tuple(arr.shape), tuple(arr.stride()), dtype, "torch"
    cai = getattr(arr, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name}: expected a torch CUDA tensor or a __cuda_array_interface__ array, "
                        f"got {type(arr).__name__}")
    dtype = "e4m3" if cai["typestr"] in _E4M3_TYPESTR else cai["typestr"]
    shape = tuple(cai["shape"])
    if cai.get("strides") is None:
        strides = tensors.contiguous_strides(shape)
    else:  # bytes, which are elements for a one-byte dtype (and only checked for one otherwise)
        strides = tuple(cai["strides"])
    return cai["data"][0], shape, strides, dtype, "cai"


def _check_input(ptr, shape, strides, dtype):
    """The strides the kernel uses (those of dimensions of size 1 as 0: never stepped along, so
    whatever the library left there) and the tiles per (batch, head); raises for what the kernel
    cannot take."""
    if dtype != "e4m3":
        raise TypeError(f"v8 must hold e4m3 codes (float8_e4m3fn or uint8), got {dtype}")
    if len(shape) != 4:
        raise ValueError(f"v8 must be [batch, keys, key heads, head_dim], got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"v8 is empty: shape {shape}")
    b, sk, hk, d = shape
    _head_dim(d)
    if strides[-1] != 1:
        raise ValueError(f"v8: the head dimension must be contiguous, got strides {strides}")
    used = tuple(st if n > 1 else 0 for st, n in zip(strides[:3], shape[:3]))
    if ptr % PIECE_BYTES or any(st % PIECE_BYTES for st in used):
        raise ValueError(f"v8: 16-byte loads need a 16-byte aligned base and strides, got base {ptr:#x}, "
                         f"strides {strides} bytes")
    tiles = -(-sk // TILE_KEYS)
    if padded_keys(sk) > MAX_INDEX or b * hk * tiles > MAX_INDEX:
        raise ValueError(f"v8 of shape {shape} is more than the kernel's int32 key and CTA indices reach")
    return used, tiles


def _output(out, shape, like, like_kind, stream):
    """`out`, checked (a contiguous float8_e4m3fn or uint8 array of `shape`, 16-byte aligned),
    or a new array of the input's library."""
    if out is None:
        if like_kind == "torch":
            import torch
            return torch.empty(shape, dtype=torch.float8_e4m3fn, device=like.device)
        handle = launch.stream_handle(stream)
        return cuda.device_array(shape, np.uint8, stream=cuda.external_stream(handle) if handle else 0)
    ptr, got_shape, strides, dtype, _ = _array_info(out, "out")
    if dtype != "e4m3" or got_shape != shape or strides != tensors.contiguous_strides(shape):
        raise ValueError(f"out must be a contiguous float8_e4m3fn or uint8 array of shape {shape}, got "
                         f"{dtype} {got_shape} strides {strides}")
    if ptr % PIECE_BYTES:
        raise ValueError(f"out: 16-byte stores need a 16-byte aligned base, got {ptr:#x}")
    return out


def transpose_v(v8, out=None, stream=None):
    """V's e4m3 codes in the FP8 attention kernel's layout (see the module docstring):
    ``vt [B, Hk, D, padded_keys(Sk)]`` with ``vt[b, h, d, 32 g + j] = v8[b, 32 g + sigma(j), h, d]``
    (`key_permutation`), 0 for keys >= Sk.

    v8 ``[B, Sk, Hk, D]``, D one of `HEAD_DIMS`: a torch CUDA tensor (float8_e4m3fn or uint8) or a
    uint8 `__cuda_array_interface__` array (Numba, CuPy), used in place with any strides whose
    last dimension is contiguous, base and strides 16-byte aligned.  NumPy inputs raise TypeError:
    `transpose_v_like_kernel` is the NumPy transpose.

    out: a contiguous float8_e4m3fn or uint8 GPU array of the result's shape to write into
    (every byte is written); else a new one, a float8_e4m3fn torch tensor for torch input and a
    uint8 Numba device array otherwise.  stream: where to launch (None: torch's current stream
    for torch inputs, else the legacy default stream; an int handle or a stream object); the call
    does not wait.  Returns vt: `transpose_v_like_kernel`'s values, bit for bit.
    """
    ptr, shape, strides, dtype, kind = _array_info(v8, "v8")
    used, tiles = _check_input(ptr, shape, strides, dtype)
    b, sk, hk, d = shape
    pad = padded_keys(sk)
    if stream is None and kind == "torch":
        stream = tensors.torch_stream(v8)
    vt = _output(out, (b, hk, d, pad), v8, kind, stream)
    kern = transpose_kernel(d)
    kern.launch_with(b * hk * tiles, stream, TransposeParams(
        ptr, tensors.device_ptr(vt), hk, sk, pad, tiles, *used, 0))
    return vt


def transpose_v_varlen(v8, cu_seqlens_k, max_seqlen_k, out=None, stream=None):
    """Packed V's codes in the FP8 kernel's varlen layout: v8 ``[Tk, Hk, D]`` (as `transpose_v`
    takes its input) and cu_seqlens_k (an int32 GPU array of n + 1 entries, 0 to Tk, not read on
    the host; entries are clamped to [0, Tk] as the attention kernel clamps them) -> vt ``[Hk,
    D, varlen_columns(Tk, n)]`` (see `varlen_start`), every byte written.  max_seqlen_k must
    bound every sequence's length.  out, stream and the result's kind as `transpose_v`'s;
    `transpose_v_varlen_like_kernel` is the NumPy twin."""
    ptr, shape, strides, dtype, kind = _array_info(v8, "v8")
    if len(shape) != 3:
        raise ValueError(f"v8 must be [total_keys, key heads, head_dim], got shape {shape}")
    cu_ptr, cu_shape, _, cu_dtype, _ = _array_info(cu_seqlens_k, "cu_seqlens_k")
    if cu_dtype not in ("<i4", "torch.int32") or len(cu_shape) != 1 or cu_shape[0] < 2:
        raise ValueError(f"cu_seqlens_k must be an int32 GPU array of batch + 1 >= 2 entries, got {cu_dtype} "
                         f"{cu_shape}")
    tk, hk, d = shape
    seqs = cu_shape[0] - 1
    max_seqlen_k = tensors.integer(max_seqlen_k, "max_seqlen_k")
    if tk < 1:
        raise ValueError("v8 has no keys")
    if not 0 <= max_seqlen_k <= tk:
        raise ValueError(f"max_seqlen_k must be in [0, {tk}], got {max_seqlen_k}")
    used, _ = _check_input(ptr, (1, tk, hk, d), (0,) + tuple(strides), dtype)
    cols = varlen_columns(tk, seqs)
    tiles = -(-(max_seqlen_k + VARLEN_GAP + VARLEN_ALIGN - 1) // TILE_KEYS)
    if cols > MAX_INDEX or seqs * hk * tiles > MAX_INDEX:
        raise ValueError(f"v8 of shape {shape} with {seqs} sequences is more than the kernel's int32 indices reach")
    if stream is None and kind == "torch":
        stream = tensors.torch_stream(v8)
    vt = _output(out, (hk, d, cols), v8, kind, stream)
    kern = transpose_kernel(d, True)
    kern.launch_with(seqs * hk * tiles, stream, TransposeParams(
        ptr, tensors.device_ptr(vt), hk, tk, cols, tiles, 0, *used[1:], cu_ptr))
    return vt


def bytes_moved(v_shape):
    """The bytes `transpose_v` must move: v8 read once and vt (with its padding) written once."""
    b, sk, hk, d = v_shape
    return b * sk * hk * d + b * hk * d * padded_keys(sk)
