"""The FP8 quantizer on the GPU: `quantize_fp8(q, k, v)` turns bf16/fp16 q, k, v into e4m3 values
and float32 descales, computing what `fp8_model.quantize_fp8_model` models (FA3 section 3.3).

Per tensor, one fused pass: a row is read once, Q and K rows are rotated (`x M` with the random
orthogonal ``M = diag(signs) H / sqrt(d)`` of `fp8_model.random_rotation`), the largest magnitude
of each block of rows of one (batch, head) is reduced, and the rows are written as e4m3 scaled
by that block's ``448 / amax``, with the block's descale ``amax / 448`` (1 for an all-zero block).
Rows past the sequence's end inside the last block neither count nor are written.

Layouts.  q ``[B, S, H, D]``, k and v ``[B, Sk, Hk, D]`` (Hk dividing H), D in `HEAD_DIMS`.  The
outputs: q8, k8, v8 of the inputs' shapes (contiguous); q_descale ``[B, H, ceil(S / block_m)]``,
k_descale ``[B, Hk, ceil(Sk / block_n)]``, v_descale ``[B, Hk]`` (``v_granularity="head"``) or
per block of block_n rows like k's, float32 and contiguous: FA3's layouts, as the model's.

The kernel (`QuantizeKernel`), one CTA per block or part of one at a time:

* Streaming.  The grid is as many CTAs (clusters) as the GPU holds at once; each takes blocks
  `clusters` apart in turn.  A block's rows arrive in shared memory by one bulk copy per row
  (`cp.async.bulk`, counted on an mbarrier) into a ring of `RING_STAGES` tiles, issued as soon as
  the tile they replace has been read, so a CTA's next blocks are loading while it rotates,
  reduces and stores this one (loading a block into registers and then working on it leaves DRAM
  idle whenever both resident CTAs work).  Rows are padded by `ROW_PAD` bytes in the ring so
  that the 16-byte reads below hit distinct banks.
* Rows and lanes.  Two adjacent lanes take one row: lane ``l`` reads the row's 16-byte pieces
  ``2j + l`` (eight 16-bit elements each) from the ring and holds ``D / 2`` float32 values, the
  whole block staying in registers between the read and the write (the input is read once).
  Two lanes per row rather than more: the butterflies whose partners sit in other lanes are
  what costs shuffles, and with two lanes only one stage of the ``log2(D)`` does, as a half
  exchange (below); the two lanes' 16-byte code stores still fill whole 32-byte sectors.
* The rotation.  The signs are applied while loading (an xor of the 16-bit sign bits, from a
  table of masks in the pieces' order: `sign_masks`); the Walsh-Hadamard butterflies of every
  index bit held within a lane's registers run first (bits 0-2 inside a piece, then the piece
  bits from 4 up: `stage_order`); bit 3, the one telling the two lanes apart, runs last as a
  *half exchange*: of each two pieces a lane keeps one and sends the other (a shuffle for half
  its values), so that each lane computes both outputs of the butterflies of the pieces it kept.
  Afterwards a lane holds 16 consecutive elements per kept piece pair: its e4m3 codes are one
  16-byte store, and the two lanes of a row write a whole 32-byte sector per instruction.  The
  butterfly order differs from `fp8_model.fwht`'s (bits in increasing order); `kernel_fwht` is
  the kernel's in NumPy.  ``1 / sqrt(D)`` is folded into the scale.  V (and Q and K without the
  rotation) make the same exchange without the butterfly, for the same 16-byte stores.
* The block's amax: each thread's largest magnitude, a warp's by shuffles, the CTA's through
  shared memory (one barrier); a block of more rows than a CTA takes (`max_cta_rows`: at most
  `MAX_CTA_VALUES` values and `MAX_CTA_THREADS` threads, so that two or more CTAs fit an SM's
  registers) is split over a thread-block cluster of CTAs (`block_plan`), which exchange their
  amax through distributed shared memory.
* Scaling: ``descale = fl(fl(amax_u * c) / 448)`` with ``amax_u`` the block's amax before the
  ``c = fl(1 / sqrt(D))`` factor (so that it equals ``fl(max |fl(u c)|)``, the model's) and a
  value ``u`` becomes ``e4m3(fl(u * fl(c / descale)))``: one multiply per value instead of the
  model's two roundings ``fl(fl(u c) / descale)``; the codes then differ from the model's by one
  step where a value lies within float32 rounding of the midpoint between two e4m3 values.
  Where ``c / descale`` overflows float32 (a rotated amax below ``448 c / FLT_MAX``, about
  1.3e-36 c: blocks of subnormal bf16) the product is taken in two steps, ``fl(fl(u * 2^64) *
  fl(c / (descale * 2^64)))``, the same rounding (the first product is exact).  `quantize_like_kernel` computes exactly this in NumPy: the kernel's twin.
* V per head: its amax needs the whole sequence before any value can be scaled, so V is read
  twice: a pass writes each tile's amax, a second reduces its head's and quantizes, taking the
  tiles in reverse order so that its first reads find the first pass's last ones in L2.

Timing (bytes moved / time, with torch events)::

    import torch
    from numba_fa3.quantize import bytes_moved, quantize_fp8

    q, k, v = (torch.randn(4, 8192, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    quantize_fp8(q, k, v)                                  # compiles (or loads) the kernels
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        quantize_fp8(q, k, v)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / reps
    print(f"{bytes_moved(q.shape, k.shape) / seconds / 1e12:.2f} TB/s")  # H100 copies ~3.0 TB/s
"""
import enum
import functools
import math

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, smem, tensors, warpgroup
from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import cluster, convert, mbarrier, memory, special, tma
from . import fp8_model

__all__ = ["HEAD_DIMS", "Scaling", "QuantizeKernel", "quantize_kernel", "quantize_fp8", "block_plan",
           "max_cta_rows", "tile_rows", "stage_order", "kernel_fwht", "rotation_scale", "sign_masks",
           "quantize_like_kernel", "quantize_fp8_like_kernel", "bytes_moved", "quantize_like_kernel_varlen",
           "quantize_fp8_varlen"]

#: Head dims the quantizer takes: powers of two, so that the Walsh-Hadamard matrix exists.
HEAD_DIMS = (64, 128, 256)
#: Bytes of one vector access (`ld.global.nc.v4`, `st.global.v4`), of an input element, of an
#: e4m3 code, of a float32, of a 32-bit register.
PIECE_BYTES, ELEMENT_BYTES, CODE_BYTES, F32_BYTES, WORD_BYTES = 16, 2, 1, 4, 4
#: 16-bit elements per 16-byte piece.
PIECE_ELEMENTS = PIECE_BYTES // ELEMENT_BYTES
#: Lanes per row (see the module docstring), and the element-index bit that tells them apart
#: when loading (a piece is 2^3 elements).
LANES_PER_ROW = 2
LANE_BIT = PIECE_ELEMENTS.bit_length() - 1
#: Codes per lane and 16-byte store after the exchange: a kept piece and its partner.
CHUNK = LANES_PER_ROW * PIECE_ELEMENTS
WARP = warpgroup.WARP_THREADS
#: Rows of one warp; a CTA holds a whole number of them.
ROW_QUANTUM = WARP // LANES_PER_ROW
#: The most float32 values and threads of one CTA: a thread takes up to about twice as many
#: registers as it holds values (the exchange's received values, addresses, indices), so 64 KB
#: of values and 256 threads keep every specialization at two or more CTAs per SM, one loading
#: while another computes (test_compiles_clean checks it).
MAX_CTA_VALUES = 16384
MAX_CTA_THREADS = 256
#: The most CTAs in a portable thread-block cluster.
MAX_CLUSTER = 8
#: Tiles of a CTA's shared-memory ring (`QuantizeKernel.stages`) per head dim; 0: no ring, each
#: CTA loads one block straight into registers.  Measured per launch against copy's rate (H100,
#: bench/NOTES.md, "Quantizer"):
#:   64:  2 -- as fast as no ring (0.81 rotated / 0.86 plain against 0.81 / 0.87); 3 read 0.77 / 0.83
#:   128: 2 -- 0.87 / 0.90 of copy against 0.69 / 0.83 without; 3 stages (110 KB) read 0.79 / 0.88
#:   256: 0 -- 232 registers leave 8 warps per SM, too few to hide the ring's shared reads (0.96-0.98x)
RING_STAGES = {64: 2, 128: 2, 256: 0}
#: Padding after each row of a ring tile: 32 bytes put the four rows that a quarter-warp's
#: 16-byte loads touch on distinct banks (rows are a multiple of 128 bytes long).
ROW_PAD = 32
#: Bytes of an mbarrier.
MBARRIER_BYTES = 8
#: Row, tile and CTA indices are int32 in the kernel.
MAX_INDEX = 2**31 - 1
FULL_MASK = 0xFFFFFFFF
E4M3_MAX = np.float32(fp8_model.E4M3_MAX)
#: The two-step scale's power of two (see the module docstring): with it, ``descale * 2^64`` is
#: normal and ``c / (descale * 2^64)`` finite for every positive float32 descale.
PRESCALE = np.float32(2.0**64)
FLT_MAX = np.float32(np.finfo(np.float32).max)
_U64, _I32, _I64, _F32 = types.uint64, types.int32, types.int64, types.float32


class Scaling(enum.Enum):
    """What one launch computes.  BLOCK: each block's amax from its rows, its codes and descale.
    AMAX: each tile's amax only (the first pass of per-head V).  HEAD: the head's amax from the
    AMAX pass's tiles, the codes, and the head's descale."""
    BLOCK = "block"
    AMAX = "amax"
    HEAD = "head"


# --- the plan ---------------------------------------------------------------------------------

def _positive_int(value, name):
    """value as an int >= 1: TypeError for a non-integer (`tensors.integer`), ValueError below 1."""
    value = tensors.integer(value, name)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _head_dim(head_dim):
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported by the FP8 quantizer; supported: "
                         f"{HEAD_DIMS} (powers of two, for the Walsh-Hadamard rotation)")
    return int(head_dim)


def block_plan(block, head_dim):
    """(cluster, rows): a descale block of `block` rows is held by `cluster` CTAs of `rows` rows
    each, the fewest CTAs of whole warps (rows a multiple of `ROW_QUANTUM`) of at most
    `max_cta_rows` rows.  Raises ValueError where no cluster of at most `MAX_CLUSTER` CTAs does."""
    block = _positive_int(block, "block")
    most = max_cta_rows(head_dim)
    for n in range(1, MAX_CLUSTER + 1):
        rows, rest = divmod(block, n)
        if not rest and rows % ROW_QUANTUM == 0 and rows <= most:
            return n, rows
    raise ValueError(f"a block of {block} rows at head dim {head_dim} cannot be quantized: it must split "
                     f"into at most {MAX_CLUSTER} equal parts of a multiple of {ROW_QUANTUM} rows and at "
                     f"most {most} rows each")


def max_cta_rows(head_dim):
    """The most rows one CTA takes: `MAX_CTA_VALUES` values and `MAX_CTA_THREADS` threads."""
    return min(MAX_CTA_VALUES // _head_dim(head_dim), MAX_CTA_THREADS // LANES_PER_ROW)


def tile_rows(head_dim):
    """Rows per CTA of the per-head V passes (whose tiles need not match any block): the most one
    CTA takes."""
    return max_cta_rows(head_dim)


def stage_order(head_dim):
    """The element-index bits of the kernel's butterfly stages, in order: the bits within one
    lane's values (0-2 inside a 16-byte piece, then the piece bits from `LANE_BIT` + 1 up), then
    `LANE_BIT`, the half exchange."""
    bits = range(_head_dim(head_dim).bit_length() - 1)
    return tuple(b for b in bits if b != LANE_BIT) + (LANE_BIT,)


def rotation_scale(head_dim):
    """``c = fl(1 / sqrt(head_dim))``, the rotation's scale as the kernel applies it (float32)."""
    return np.float32(1.0 / math.sqrt(head_dim))


def sign_masks(head_dim, seed):
    """The rotation's signs (`fp8_model.rotation_signs`) as the kernel applies them: uint32
    ``[head_dim // 8, 4]``, word ``w`` of 16-byte piece ``p`` with bit 15 set where element
    ``8p + 2w`` is negated and bit 31 where element ``8p + 2w + 1`` is (the sign bits of the
    lower and upper 16-bit element of that word)."""
    negative = fp8_model.rotation_signs(_head_dim(head_dim), seed) < 0
    pairs = negative.reshape(-1, PIECE_ELEMENTS // 2, 2).astype(np.uint32)
    return (pairs[..., 0] << 15) | (pairs[..., 1] << 31)


# --- the kernel's arithmetic in NumPy -----------------------------------------------------------

def kernel_fwht(x, order=None):
    """The Walsh-Hadamard transform along the last axis in float32, its butterfly stages in
    `order` (element-index bits; default the kernel's `stage_order`), each stage rounding as the
    device's float32 additions do.  With the bits in increasing order it is `fp8_model.fwht` of
    float32 input, bit for bit."""
    y = np.asarray(x, dtype=np.float32)
    d = y.shape[-1]
    order = stage_order(d) if order is None else tuple(order)
    lead = y.shape[:-1]
    for bit in order:
        h = 1 << bit
        pairs = y.reshape(*lead, d // (2 * h), 2, h)
        lo, hi = pairs[..., 0, :], pairs[..., 1, :]
        y = np.stack((lo + hi, lo - hi), axis=-2).reshape(*lead, d)
    return y


def _codes(u, scale_rows, c, descale_rows):
    """e4m3 of ``u [B, S, H, D]`` (float32) with one descale per row ``[B, S, H]``, as the kernel
    rounds: ``fl(u * fl(c / descale))``, or in two steps where ``c / descale`` overflows."""
    with np.errstate(over="ignore", invalid="ignore"):  # (each branch's overflows are not taken)
        direct = (u * scale_rows[..., None]).astype(np.float32)
        step = np.float32(c) / (descale_rows * PRESCALE)
        two_step = ((u * PRESCALE) * step[..., None]).astype(np.float32)
    fast = np.isfinite(scale_rows)[..., None]
    return fp8_model.to_e4m3(np.where(fast, direct, two_step))


def quantize_like_kernel(x, block=128, rotate=True, seed=0, per_head=False):
    """One ``[B, S, H, D]`` tensor quantized as the kernel does (float32 throughout): with
    `rotate`, ``u = kernel_fwht(x * signs)``, else ``u = x``; per block of `block` rows of a
    (batch, head) (or per head), ``amax_r = fl(max |u| * c)``, ``descale = fl(amax_r / 448)``
    (1 where amax_r is 0) and codes ``e4m3(fl(u * fl(c / descale)))`` (`_codes`), ``c =
    rotation_scale(D)`` with the rotation and 1 without.  Returns ``(x8, descale)`` as
    `fp8_model.quantize_blocks` (``[B, H, n_blocks]``) or `fp8_model.quantize_per_head`
    (``[B, H]``): the GPU kernel's results, bit for bit."""
    x = np.asarray(fp8_model._finite32(x), dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"x must be [batch, seqlen, heads, head_dim], got shape {x.shape}")
    b, s, h, d = x.shape
    if rotate:
        u = kernel_fwht(x * fp8_model.rotation_signs(d, seed).astype(np.float32))
        c = rotation_scale(d)
    else:
        u, c = x, np.float32(1)
    rows = max(s, 1) if per_head else _positive_int(block, "block")
    nb = -(-s // rows)
    row_amax = np.pad(np.abs(u).max(axis=-1, initial=0), ((0, 0), (0, nb * rows - s), (0, 0)))
    amax_u = row_amax.reshape(b, nb, rows, h).max(axis=2)                      # [B, nb, H]
    amax_r = (amax_u * c).astype(np.float32)
    descale = np.where(amax_r > 0, amax_r / E4M3_MAX, np.float32(1)).astype(np.float32)
    with np.errstate(over="ignore", divide="ignore"):
        scale = (c / descale).astype(np.float32)
    per_row = lambda a: np.repeat(a, rows, axis=1)[:, :s]                      # noqa: E731
    x8 = _codes(u, per_row(scale), c, per_row(descale))
    descale = descale.transpose(0, 2, 1)
    return (x8, descale[..., 0]) if per_head else (x8, np.ascontiguousarray(descale))


def quantize_fp8_like_kernel(q, k, v, hadamard=True, seed=0, block_m=128, block_n=128, v_granularity="head"):
    """`quantize_fp8`'s results computed in NumPy by `quantize_like_kernel` (the GPU's, bit for bit):
    ``(q8, k8, v8, q_descale, k_descale, v_descale)``."""
    v_granularity = _v_granularity(v_granularity)
    q8, dq = quantize_like_kernel(q, block_m, hadamard, seed)
    k8, dk = quantize_like_kernel(k, block_n, hadamard, seed)
    v8, dv = quantize_like_kernel(v, block_n, False, seed, per_head=v_granularity == "head")
    return q8, k8, v8, dq, dk, dv


def bytes_moved(q_shape, k_shape, block_m=128, block_n=128, v_granularity="head", element_bytes=ELEMENT_BYTES):
    """The bytes `quantize_fp8` must move at the least: q, k and v read once (`element_bytes` per
    element) and written once as e4m3, and the descales written.  Per-head V reads V twice; the
    second read is not counted, so that a bandwidth reported against this figure shows its cost."""
    b, s, h, d = q_shape
    bk, sk, hk, _ = k_shape
    values = b * s * h * d + 2 * bk * sk * hk * d
    v_descales = bk * hk * (1 if _v_granularity(v_granularity) == "head" else _tiles(sk, block_n))
    descales = b * h * _tiles(s, block_m) + bk * hk * _tiles(sk, block_n) + v_descales
    return values * (element_bytes + CODE_BYTES) + descales * F32_BYTES


# --- the kernel -------------------------------------------------------------------------------

#: The kernel's parameters: the input's, the codes', the descales' (BLOCK: per block; HEAD: per
#: head), the tile amaxes' (AMAX writes, HEAD reads) and the sign masks' addresses; heads, rows
#: per (batch, head), tiles per (batch, head) (blocks, or the V passes' tiles), and tiles in all
#: (batch * heads * tiles); the (batch, row, head) strides of the input (elements) and of the codes
#: (bytes); c, the rotation's scale (1 without); the packed sequences' cu_seqlens (varlen).
QuantizeParams = launch.params("QuantizeParams", [
    ("x_ptr", _U64), ("out_ptr", _U64), ("descale_ptr", _U64), ("tile_amax_ptr", _U64), ("signs_ptr", _U64),
    ("heads", _I32), ("seqlen", _I32), ("tiles", _I32), ("groups", _I32),
    ("x_batch_stride", _I64), ("x_row_stride", _I64), ("x_head_stride", _I64),
    ("out_batch_stride", _I64), ("out_row_stride", _I64), ("out_head_stride", _I64),
    ("rotation_scale", _F32), ("cu_ptr", _U64)])


class QuantizeKernel(launch.HopperKernel):
    """One tensor's quantizer (see the module docstring): CTAs of `rows` rows, 2 threads per row,
    in clusters of `cluster` CTAs per descale block (BLOCK; 1 otherwise), each CTA (cluster) taking
    tiles (blocks) in turn through a ring of `stages` shared-memory tiles.  One specialization per
    dtype, head dim, rows, cluster, rotation, `Scaling` and stages."""

    PARAMS = QuantizeParams

    def __init__(self, dtype="bf16", head_dim=128, rows=128, rotate=True, scaling=Scaling.BLOCK, cluster=1,
                 varlen=False, stages=None):
        if dtype not in ("bf16", "f16"):
            raise ValueError(f"dtype must be bf16 or f16, got {dtype}")
        self.dtype, self.head_dim = dtype, _head_dim(head_dim)
        self.rows, self.rotate, self.scaling = _positive_int(rows, "rows"), bool(rotate), Scaling(scaling)
        self.cluster = _positive_int(cluster, "cluster")
        #: packed sequences (`quantize_fp8_varlen`): a "batch" entry is a sequence of cu_seqlens,
        #: its blocks counted from its first row
        self.varlen = bool(varlen)
        self.stages = RING_STAGES[self.head_dim] if stages is None else int(stages)
        if self.stages < 0:
            raise ValueError(f"stages must be >= 0, got {stages}")
        if self.rows % ROW_QUANTUM or self.rows > max_cta_rows(self.head_dim):
            raise ValueError(f"rows {rows} must be a multiple of {ROW_QUANTUM} and at most "
                             f"{max_cta_rows(self.head_dim)} at head dim {head_dim}")
        if self.cluster > MAX_CLUSTER or (self.cluster > 1 and self.scaling != Scaling.BLOCK):
            raise ValueError(f"cluster {cluster}: BLOCK scaling takes at most {MAX_CLUSTER} CTAs per block, "
                             f"the per-head passes 1")
        self.threads = self.rows * LANES_PER_ROW
        plan = smem.SharedLayout()
        # amax slots twice: tile i writes slot i % 2 while a slow thread may still read tile i - 1's
        plan.add("warp_amax", 2 * self.threads // WARP * F32_BYTES, align=PIECE_BYTES)
        plan.add("cluster_amax", 2 * self.cluster * F32_BYTES, align=PIECE_BYTES)
        plan.add("full", max(self.stages, 1) * MBARRIER_BYTES, align=MBARRIER_BYTES)
        plan.add("tiles", self.stages * self.tile_bytes, align=smem.ATOM_BYTES)
        self.smem = plan.check()

    @property
    def row_bytes(self):
        return self.head_dim * ELEMENT_BYTES

    @property
    def tile_bytes(self):
        """Shared bytes of one ring tile: `rows` rows of `row_bytes`, each padded by `ROW_PAD`."""
        return self.rows * (self.row_bytes + ROW_PAD)

    @property
    def values_per_thread(self):
        return self.head_dim // LANES_PER_ROW

    def body(self):
        PIECES = self.values_per_thread // PIECE_ELEMENTS   # 16-byte loads per thread
        PAIRS = PIECES // 2                                  # 16-byte stores per thread
        ROWS, CLUSTER, THREADS = self.rows, self.cluster, self.threads
        BLOCK = ROWS * CLUSTER
        WARPS = THREADS // WARP
        WARP_SHUFFLES = tuple(WARP >> (i + 1) for i in range(WARP.bit_length() - 1))
        ROTATE, VARLEN, STAGES = self.rotate, self.varlen, self.stages
        ROW_BYTES, TILE_BYTES, PITCH = self.row_bytes, self.tile_bytes, self.row_bytes + ROW_PAD
        LOAD_BYTES = ROWS * ROW_BYTES                    # what a tile's copies bring (the mbarrier's tx)
        FROM_VALUES = self.scaling != Scaling.HEAD      # the amax of this CTA's own values
        WRITE_CODES = self.scaling != Scaling.AMAX
        IS_BLOCK, IS_HEAD = self.scaling == Scaling.BLOCK, self.scaling == Scaling.HEAD
        # Element 16 j + 8 l + i of a row is value i of piece j of lane l: an element bit below
        # LANE_BIT is a bit of the value's index in its piece, one above it a bit of the piece's.
        # stage_order puts the former first.
        order = stage_order(self.head_dim)[:-1]
        VALUE_STRIDES = tuple(1 << bit for bit in order if bit < LANE_BIT)
        PIECE_STRIDES = tuple(1 << (bit - LANE_BIT - 1) for bit in order if bit > LANE_BIT)
        LOAD_STEP = LANES_PER_ROW * PIECE_BYTES          # bytes between a lane's pieces
        STORE_STEP = LANES_PER_ROW * CHUNK * CODE_BYTES  # bytes between a lane's chunks
        CODES_PER_WORD = WORD_BYTES // CODE_BYTES
        WORDS = CHUNK // CODES_PER_WORD                  # 32-bit words of a chunk's codes
        HALF_WORDS = WORDS // 2                          # ... of one half (one piece's values)
        OFF_WARPS, OFF_CLUSTER = self.smem.offsets["warp_amax"], self.smem.offsets["cluster_amax"]
        OFF_FULL, OFF_TILES = self.smem.offsets["full"], self.smem.offsets["tiles"]
        bf16 = self.dtype == "bf16"
        if ROTATE:
            load = memory.ld_global_nc_v4_xor_bf16_f32 if bf16 else memory.ld_global_nc_v4_xor_f16_f32
            load_shared = memory.ld_shared_v4_xor_bf16_f32 if bf16 else memory.ld_shared_v4_xor_f16_f32
        else:
            load = memory.ld_global_nc_v4_bf16_f32 if bf16 else memory.ld_global_nc_v4_f16_f32
            load_shared = memory.ld_shared_v4_bf16_f32 if bf16 else memory.ld_shared_v4_f16_f32
        ZERO, ONE = np.float32(0), np.float32(1)
        SHIFT16 = np.uint32(16)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def piece_stages(a):
            """The butterflies within one piece's eight values."""
            for st in static_range(len(VALUE_STRIDES)):
                y = ()
                for i in static_range(PIECE_ELEMENTS):
                    if constexpr(i & VALUE_STRIDES[st]):
                        y = y + (a[constexpr(i - VALUE_STRIDES[st])] - a[i],)
                    else:
                        y = y + (a[i] + a[constexpr(i + VALUE_STRIDES[st])],)
                a = y
            return a

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def add(a, b):
            y = ()
            for i in static_range(PIECE_ELEMENTS):
                y = y + (a[i] + b[i],)
            return y

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def subtract(a, b):
            y = ()
            for i in static_range(PIECE_ELEMENTS):
                y = y + (a[i] - b[i],)
            return y

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def butterflies(x):
            """The Walsh-Hadamard stages within a thread's pieces, in `stage_order`."""
            y = ()
            for j in static_range(PIECES):
                y = y + (piece_stages(x[j]),)
            x = y
            for st in static_range(len(PIECE_STRIDES)):
                y = ()
                for j in static_range(PIECES):
                    if constexpr(j & PIECE_STRIDES[st]):
                        y = y + (subtract(x[constexpr(j - PIECE_STRIDES[st])], x[j]),)
                    else:
                        y = y + (add(x[j], x[constexpr(j + PIECE_STRIDES[st])]),)
                x = y
            return x

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def exchange(x, odd):
            """Halves 2m and 2m + 1 of the result are chunk m, the 16 elements from 16 (2m + l)
            of the row (lane l): of pieces 2m and 2m + 1 the even lane keeps the first, the odd
            lane the second, and each gets the other lane's same piece.  With the rotation, the
            butterfly of LANE_BIT on them: (kept + got, kept - got), whose second half is negated
            in the odd lane (its kept value is the upper one); the scale folds that sign back."""
            y = ()
            for m in static_range(PAIRS):
                a = x[constexpr(2 * m)]
                b = x[constexpr(2 * m + 1)]
                first = ()
                second = ()
                for i in static_range(PIECE_ELEMENTS):
                    kept = b[i] if odd else a[i]
                    got = cuda.shfl_xor_sync(FULL_MASK, a[i] if odd else b[i], 1)
                    if constexpr(ROTATE):
                        first = first + (kept + got,)
                        second = second + (kept - got,)
                    else:
                        first = first + (got if odd else kept,)
                        second = second + (kept if odd else got,)
                y = y + (first, second)
            return y

        def code_writer(two_step):
            """write(dst, y, lo, hi) stores chunk m of `y` at dst + m STORE_STEP: a value v of the
            chunk's first half becomes e4m3(v * lo), of its second half e4m3(v * hi); two_step
            multiplies by PRESCALE first."""
            TWO_STEP = two_step

            @cuda.jit(device=True, forceinline=True)
            @unrolled
            def write(dst, y, lo, hi):
                for m in static_range(PAIRS):
                    words = ()
                    for w in static_range(WORDS):
                        half = y[constexpr(2 * m + w // HALF_WORDS)]
                        if constexpr(w < HALF_WORDS):
                            s = lo
                        else:
                            s = hi
                        v = ()
                        for c in static_range(CODES_PER_WORD):
                            v = v + (half[constexpr(CODES_PER_WORD * (w % HALF_WORDS) + c)],)
                        if constexpr(TWO_STEP):
                            v = (v[0] * PRESCALE, v[1] * PRESCALE, v[2] * PRESCALE, v[3] * PRESCALE)
                        low = np.uint32(convert.pack_e4m3x2(v[0] * s, v[1] * s))
                        high = np.uint32(convert.pack_e4m3x2(v[2] * s, v[3] * s))
                        words = words + (low | (high << SHIFT16),)
                    memory.st_global_v4_b32(dst + m * STORE_STEP, words)
            return write

        write_direct, write_two_step = code_writer(False), code_writer(True)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def locate(p, group):
            """(batch, head, tile) of a group (one block, or one tile of the V passes); HEAD takes
            them in reverse, so that its first reads find the AMAX pass's last rows in L2."""
            if constexpr(IS_HEAD):
                group = np.int32(p.groups - 1 - group)
            rest, h = udivmod32(group, p.heads)
            b, tile = udivmod32(rest, p.tiles)
            return b, h, tile

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def placement(p, b, s):
            """(first, valid, row) of row s of a (batch entry's) tile: the sequence's first packed
            row (0 when dense), whether s is inside it, and the row to read (rows past the end
            re-read the last one and do not count)."""
            if constexpr(VARLEN):
                # sequence b's rows (cu_seqlens clamped to the packed rows, as the attention
                # kernels clamp them); its blocks start at its first row
                first = min(max(memory.ld_global_s32(p.cu_ptr + b * np.int32(4)), np.int32(0)), p.seqlen)
                rows = min(max(memory.ld_global_s32(p.cu_ptr + (b + np.int32(1)) * np.int32(4)), first),
                           p.seqlen) - first
                valid = s < rows
                # (an empty sequence's rows re-read a neighbour's)
                row = min(first + max(min(s, rows - np.int32(1)), np.int32(0)), p.seqlen - np.int32(1))
            else:
                first = np.int32(0)
                valid = s < p.seqlen
                row = min(s, p.seqlen - 1)
            return first, valid, row

        @cuda.jit(device=True, forceinline=True)
        def source(p, b, h, row):
            return p.x_ptr + (b * p.x_batch_stride + row * p.x_row_stride + h * p.x_head_stride) * ELEMENT_BYTES

        @cuda.jit(device=True, forceinline=True)
        def issue(p, base, stage, group, rank, tid):
            """Start the copies of `group`'s rows into ring tile `stage` (free: every thread has
            read it): thread 0 tells the stage's barrier the bytes to expect, thread r < ROWS
            copies row r (one bulk copy of a whole row)."""
            bar = base + OFF_FULL + stage * np.int32(MBARRIER_BYTES)
            if tid == 0:
                mbarrier.arrive_expect_tx(bar, LOAD_BYTES)
            if tid < ROWS:
                b, h, tile = locate(p, group)
                _, _, row = placement(p, b, np.int32(tile * BLOCK + rank * ROWS + tid))
                tma.load_bulk(base + OFF_TILES + stage * np.int32(TILE_BYTES) + tid * np.int32(PITCH),
                              source(p, b, h, row), ROW_BYTES, bar)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def quantize_tile(p, base, x, group, slot, rank, tid, lane, odd, stage, later):
            """One tile from its loaded values `x` to its codes and descale: the rotation, the
            block's amax (the amax slots `slot`), the scale, the stores.  With the ring, once every
            thread has its values, group `later` (if any) starts loading into `stage`."""
            b, h, tile = locate(p, group)
            s = np.int32(tile * BLOCK + rank * ROWS + tid // LANES_PER_ROW)
            first, valid, _ = placement(p, b, s)
            tile_index = (b * p.heads + h) * p.tiles + tile  # of this tile's descale or amax
            amax = ZERO
            if constexpr(IS_HEAD):
                first_tile = (b * p.heads + h) * p.tiles
                for t in range(tid, p.tiles, THREADS):
                    amax = max(amax, memory.ld_global_nc_f32(p.tile_amax_ptr + (first_tile + t) * F32_BYTES))
            if constexpr(ROTATE):
                x = butterflies(x)
            if constexpr(WRITE_CODES):
                y = exchange(x, odd)
            else:
                y = x  # an amax needs no particular order
            if constexpr(FROM_VALUES):
                for j in static_range(2 * PAIRS):
                    for i in static_range(PIECE_ELEMENTS):
                        amax = max(amax, abs(y[j][i]))
                if not valid:
                    amax = ZERO
            for i in static_range(len(WARP_SHUFFLES)):
                amax = max(amax, cuda.shfl_xor_sync(FULL_MASK, amax, constexpr(WARP_SHUFFLES[i])))
            warps = base + OFF_WARPS + slot * np.int32(WARPS * F32_BYTES)
            if tid % WARP == 0:
                memory.st_shared_f32(warps + (tid // WARP) * F32_BYTES, amax)
            cuda.syncthreads()
            if constexpr(STAGES > 0):
                if later < p.groups:
                    issue(p, base, stage, later, rank, tid)
            for w in static_range(WARPS):
                amax = max(amax, memory.ld_shared_f32(warps + w * F32_BYTES))
            if constexpr(CLUSTER > 1):
                peers = base + OFF_CLUSTER + slot * np.int32(CLUSTER * F32_BYTES)
                if tid < CLUSTER:  # thread t gives CTA t this CTA's amax
                    memory.st_shared_cluster_f32(cluster.map_shared(peers + rank * F32_BYTES, tid), amax)
                cluster.barrier_arrive()
                cluster.barrier_wait()
                for r in static_range(CLUSTER):
                    amax = max(amax, memory.ld_shared_f32(peers + r * F32_BYTES))
            if constexpr(IS_HEAD):
                amax_r = amax  # the AMAX pass's tiles are scaled already
            else:
                amax_r = amax * p.rotation_scale
            if constexpr(WRITE_CODES):
                descale = amax_r / E4M3_MAX if amax_r > ZERO else ONE
                scale = p.rotation_scale / descale
                dst = p.out_ptr + b * p.out_batch_stride + (first + s) * p.out_row_stride + h * p.out_head_stride
                dst += lane * (CHUNK * CODE_BYTES)
                sign = ONE
                if constexpr(ROTATE):
                    if odd:
                        sign = -ONE  # the odd lane's second halves are negated (`exchange`)
                if valid:
                    if scale <= FLT_MAX:
                        write_direct(dst, y, scale, sign * scale)
                    else:
                        step = p.rotation_scale / (descale * PRESCALE)
                        write_two_step(dst, y, step, sign * step)
                if constexpr(IS_BLOCK):
                    if rank == 0 and tid == 0:
                        memory.st_global_f32(p.descale_ptr + tile_index * F32_BYTES, descale)
                if constexpr(IS_HEAD):
                    if tile == 0 and tid == 0:
                        memory.st_global_f32(p.descale_ptr + (b * p.heads + h) * F32_BYTES, descale)
            else:
                if tid == 0:
                    memory.st_global_f32(p.tile_amax_ptr + tile_index * F32_BYTES, amax_r)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def sign_masks_of(p, j, lane):
            return memory.ld_global_nc_v4_b32(p.signs_ptr + (j * LANES_PER_ROW + lane) * PIECE_BYTES)

        def piece_reader(read):
            """pieces(p, src, lane): the thread's PIECES 16-byte pieces from src on, LOAD_STEP
            apart, by `read` (from global or shared memory), with the rotation's signs."""
            READ = read

            @cuda.jit(device=True, forceinline=True)
            @unrolled
            def pieces(p, src, lane):
                x = ()
                for j in static_range(PIECES):
                    if constexpr(ROTATE):
                        x = x + (READ(src + j * LOAD_STEP, sign_masks_of(p, j, lane)),)
                    else:
                        x = x + (READ(src + j * LOAD_STEP),)
                return x
            return pieces

        global_pieces, ring_pieces = piece_reader(load), piece_reader(load_shared)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def cta_start():
            """(shared base, thread, lane, odd lane, this CTA's cluster, its rank in it); the
            cluster's first arrive (waited for before a peer's shared memory is written)."""
            if constexpr(CLUSTER > 1):
                cluster.barrier_arrive()
            base = smem.aligned_base(special.shared_address(cuda.shared.array(0, dtype=np.uint8)))
            tid = np.int32(cuda.threadIdx.x)
            lane = tid & np.int32(LANES_PER_ROW - 1)
            cid, rank = udivmod32(np.uint32(cuda.blockIdx.x), CLUSTER)
            return base, tid, lane, lane != 0, cid, rank

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def quantize_direct(p):
            """One tile per CTA (cluster), its rows loaded straight into registers."""
            base, tid, lane, odd, group, rank = cta_start()
            b, h, tile = locate(p, group)
            _, _, row = placement(p, b, np.int32(tile * BLOCK + rank * ROWS + tid // LANES_PER_ROW))
            x = global_pieces(p, source(p, b, h, row) + lane * PIECE_BYTES, lane)
            if constexpr(CLUSTER > 1):
                cluster.barrier_wait()  # every CTA of the cluster has started
            quantize_tile(p, base, x, np.int32(group), np.int32(0), rank, tid, lane, odd, np.int32(0), p.groups)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def quantize_streamed(p):
            """The CTA (cluster) takes tiles `clusters` apart; each tile's rows arrive by bulk
            copies into the ring, up to STAGES - 1 tiles ahead of the one computed."""
            base, tid, lane, odd, cid, rank = cta_start()
            clusters = np.int32(np.uint32(cuda.gridDim.x) // np.uint32(CLUSTER))
            if tid < STAGES:
                mbarrier.init(base + OFF_FULL + tid * np.int32(MBARRIER_BYTES), 1)
                mbarrier.fence_init()
            cuda.syncthreads()
            for st in static_range(STAGES):
                ahead = np.int32(cid + st * clusters)
                if ahead < p.groups:
                    issue(p, base, np.int32(st), ahead, rank, tid)
            if constexpr(CLUSTER > 1):
                cluster.barrier_wait()  # every CTA of the cluster has started
            # this thread's 16-byte pieces in a ring tile
            mine = base + OFF_TILES + (tid // LANES_PER_ROW) * np.int32(PITCH) + lane * np.int32(PIECE_BYTES)
            group = np.int32(cid)
            stage = np.int32(0)
            phase = np.int32(0)
            slot = np.int32(0)
            while group < p.groups:
                mbarrier.wait_parity(base + OFF_FULL + stage * np.int32(MBARRIER_BYTES), phase)
                x = ring_pieces(p, mine + stage * np.int32(TILE_BYTES), lane)
                quantize_tile(p, base, x, group, slot, rank, tid, lane, odd, stage,
                              np.int32(group + STAGES * clusters))
                group = np.int32(group + clusters)
                slot = slot ^ np.int32(1)
                stage = np.int32(stage + 1)
                if stage == STAGES:
                    stage = np.int32(0)
                    phase = phase ^ np.int32(1)

        return quantize_streamed if STAGES > 0 else quantize_direct


def quantize_kernel(dtype, head_dim, rows, rotate, scaling, cluster=1, varlen=False, stages=None):
    """The cached `QuantizeKernel`; stages None: `RING_STAGES`'s."""
    return _quantize_kernel(dtype, head_dim, rows, rotate, scaling, cluster, varlen,
                            RING_STAGES[_head_dim(head_dim)] if stages is None else int(stages))


@functools.lru_cache(maxsize=None)
def _quantize_kernel(dtype, head_dim, rows, rotate, scaling, cluster, varlen, stages):
    return QuantizeKernel(dtype, head_dim, rows, rotate, scaling, cluster, varlen, stages)


# --- host -------------------------------------------------------------------------------------

_V_GRANULARITIES = ("head", "block")


def _v_granularity(value):
    if value not in _V_GRANULARITIES:
        raise ValueError(f"v_granularity must be one of {_V_GRANULARITIES}, got {value!r}")
    return value


def _seed(seed):
    """seed as an int >= 0: TypeError for a non-integer (`tensors.integer`), ValueError below 0."""
    value = tensors.integer(seed, "seed")
    if value < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return value


def _check_inputs(iq, ik, iv):
    for info, name in ((iq, "q"), (ik, "k"), (iv, "v")):
        if len(info.shape) != 4:
            raise ValueError(f"{name} must be [batch, seqlen, heads, head_dim], got shape {info.shape}")
        if min(info.shape) < 1:
            raise ValueError(f"{name} is empty: shape {info.shape}")
    dtypes = {iq.dtype, ik.dtype, iv.dtype}
    if len(dtypes) != 1 or iq.dtype not in ("bf16", "f16"):
        raise TypeError(f"q, k, v must all be bf16 or all fp16, got {iq.dtype}, {ik.dtype}, {iv.dtype}")
    b, _, h, d = iq.shape
    if ik.shape != iv.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    if ik.shape[0] != b or ik.shape[3] != d:
        raise ValueError(f"q {iq.shape} and k {ik.shape} differ in batch or head dim")
    if h % ik.shape[2]:
        raise ValueError(f"key heads ({ik.shape[2]}) must divide query heads ({h})")
    _head_dim(d)
    for info, name in ((iq, "q"), (ik, "k"), (iv, "v")):
        if info.shape[1] > MAX_INDEX // 2:
            raise ValueError(f"{name}: {info.shape[1]} rows is more than int32 row indices reach")
        if info.strides[-1] != 1:
            raise ValueError(f"{name}: the head dimension must be contiguous, got strides {info.strides}")
        if info.ptr % PIECE_BYTES or any((st * ELEMENT_BYTES) % PIECE_BYTES for st in info.strides[:-1]):
            raise ValueError(f"{name}: 16-byte loads need a 16-byte aligned base and strides, got base "
                             f"{info.ptr:#x}, strides {info.strides} elements")


def _tiles(seqlen, rows):
    return -(-seqlen // rows)


def _array_info(arr, name):
    """(address, shape, strides in elements, dtype name) of an output array: a torch CUDA tensor or
    an object with `__cuda_array_interface__` (Numba, CuPy)."""
    if type(arr).__module__.startswith("torch"):
        if not arr.is_cuda:
            raise TypeError(f"{name}: torch tensor on {arr.device}; pass a CUDA tensor")
        names = {"torch.float8_e4m3fn": "e4m3", "torch.uint8": "e4m3", "torch.float32": "f32"}
        return arr.data_ptr(), tuple(arr.shape), tuple(arr.stride()), names.get(str(arr.dtype), str(arr.dtype))
    cai = getattr(arr, "__cuda_array_interface__", None)
    if cai is None:
        raise TypeError(f"{name}: expected a torch CUDA tensor or a __cuda_array_interface__ array, "
                        f"got {type(arr).__name__}")
    dtype = {"|u1": "e4m3", "<u1": "e4m3", "<f4": "f32"}.get(cai["typestr"], cai["typestr"])
    item = 1 if dtype == "e4m3" else F32_BYTES
    shape = tuple(cai["shape"])
    strides = (tensors.contiguous_strides(shape) if cai.get("strides") is None
               else tuple(st // item for st in cai["strides"]))
    return cai["data"][0], shape, strides, dtype


def _outputs(out, shapes, like, stream):
    """The six outputs (q8, k8, v8, q_descale, k_descale, v_descale): `out`'s, checked, or new
    ones of `like`'s library (torch: float8_e4m3fn and float32 tensors; else Numba uint8 and
    float32 device arrays)."""
    dtypes = ("e4m3",) * 3 + ("f32",) * 3
    if out is None:
        return tuple(_new_array(like, shape, dtype, stream) for shape, dtype in zip(shapes, dtypes))
    if len(out) != len(shapes):
        raise ValueError(f"out must be six arrays (q8, k8, v8, q_descale, k_descale, v_descale), got {len(out)}")
    names = ("q8", "k8", "v8", "q_descale", "k_descale", "v_descale")
    for arr, shape, dtype, name in zip(out, shapes, dtypes, names):
        ptr, got_shape, strides, got_dtype = _array_info(arr, f"out {name}")
        want = "float8_e4m3fn or uint8" if dtype == "e4m3" else "float32"
        if got_shape != shape or got_dtype != dtype or strides != tensors.contiguous_strides(shape):
            raise ValueError(f"out {name} must be a contiguous {want} array of shape {shape}, got "
                             f"{got_dtype} {got_shape} strides {strides}")
        if dtype == "e4m3" and ptr % PIECE_BYTES:
            raise ValueError(f"out {name}: 16-byte stores need a 16-byte aligned base, got {ptr:#x}")
    return tuple(out)


def _new_array(like, shape, dtype, stream):
    if like.kind == "torch":
        import torch
        tdt = torch.float8_e4m3fn if dtype == "e4m3" else torch.float32
        return torch.empty(shape, dtype=tdt, device=like.obj.device)
    handle = launch.stream_handle(stream)
    on = cuda.external_stream(handle) if handle else 0
    return cuda.device_array(shape, np.uint8 if dtype == "e4m3" else np.float32, stream=on)


def _used_on(scratch, like, stream):
    """A torch scratch tensor freed when the call returns stays allocated until the work queued
    on `stream` is done: torch's allocator reuses freed memory in the order of its current
    stream, which `stream` may not be."""
    if like.kind != "torch":
        return
    handle = launch.stream_handle(stream)
    if handle != tensors.torch_stream(like.obj):
        import torch
        scratch.record_stream(torch.cuda.ExternalStream(handle, device=like.obj.device))


@functools.lru_cache(maxsize=32)
def _sign_table(head_dim, seed, device_id):
    """`sign_masks` on the device (16 bytes per piece: one `ld.global.nc.v4` per lane and piece,
    from L1 after the first CTAs), one per head dim, seed and device."""
    return tensors.to_device(sign_masks(head_dim, seed))


def _launch(kern, info, out_ptr, descale_ptr, tile_amax_ptr, signs_ptr, tiles, stream, seqs=None):
    """One launch over `info` ([B, S, H, D]; with `seqs` = (n, cu_seqlens address), packed
    [T, H, D] rows of n sequences)."""
    if seqs is None:
        b, s, h, d = info.shape
        strides, out_strides, cu_ptr = info.strides[:3], tensors.contiguous_strides(info.shape)[:3], 0
    else:
        (b, cu_ptr), (s, h, d) = seqs, info.shape
        strides = (0,) + tuple(info.strides[:2])
        out_strides = (0,) + tuple(tensors.contiguous_strides(info.shape)[:2])
    groups = b * h * tiles
    if groups * kern.cluster > MAX_INDEX:
        raise ValueError(f"{groups * kern.cluster} CTAs: more than a grid's int32 indices reach")
    scale = rotation_scale(d) if kern.rotate else np.float32(1)
    # with the ring, as many CTAs (clusters) as are resident at once, each taking groups in turn
    ctas = groups if not kern.stages else min(groups, max(1, kern.kernel().resident_ctas() // kern.cluster))
    kern.launch_with(ctas * kern.cluster, stream, QuantizeParams(
        info.ptr, out_ptr, descale_ptr, tile_amax_ptr, signs_ptr, h, s, tiles, groups,
        *strides, *out_strides, scale, cu_ptr))


def quantize_fp8(q, k, v, hadamard=True, seed=0, block_m=128, block_n=128, v_granularity="head",
                 stream=None, out=None):
    """FA3's FP8 quantizer on the GPU: e4m3 q, k, v and their float32 descales.

    q ``[B, S, H, D]``, k and v ``[B, Sk, Hk, D]`` (Hk dividing H), all bf16 or all fp16, D one of
    `HEAD_DIMS`; GPU arrays that `numba_fa3.primitives.tensors.inspect` reads (torch CUDA tensors,
    Numba and CuPy device arrays, DLPack exporters such as JAX), used in place with any strides
    whose last dimension is contiguous, base and strides 16-byte aligned.  NumPy inputs raise
    TypeError: `fp8_model.quantize_fp8_model` is the NumPy quantizer.  Values must be finite (as
    the model requires); the kernel does not check, and a NaN or infinity makes its block's codes
    and descale meaningless.

    With `hadamard`, q and k are rotated by `fp8_model.random_rotation(D, seed)`.  q is quantized
    per block of `block_m` rows of a (batch, head), k per block of `block_n` rows, v per block of
    `block_n` rows (``v_granularity="block"``) or per (batch, head) (``"head"``).  A block must
    split over at most 8 CTAs of a whole number of 16 rows, at most 128 rows each (64 at D = 256)
    (`block_plan`): e.g. every multiple of 16 up to 128 rows, 192 and 224 at every head dim.

    stream: where to launch (None: torch's current stream for torch inputs, else the legacy
    default stream; an int handle or a stream object); the call does not wait.  out: six
    contiguous GPU arrays to write into, in the order returned (codes float8_e4m3fn or uint8,
    descales float32).  Returns ``(q8, k8, v8, q_descale, k_descale, v_descale)``: the codes in
    the inputs' shapes, float8_e4m3fn torch tensors for torch inputs and uint8 Numba device arrays
    otherwise, and the descales (float32, same library) ``[B, H, ceil(S / block_m)]``, ``[B, Hk,
    ceil(Sk / block_n)]`` and ``[B, Hk]`` or ``[B, Hk, ceil(Sk / block_n)]``.  The values are
    `quantize_fp8_like_kernel`'s, bit for bit.
    """
    iq, ik, iv = (tensors.inspect(x, n, stream) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    _check_inputs(iq, ik, iv)
    b, s, h, d = iq.shape
    sk, hk = ik.shape[1], ik.shape[2]
    plan_m, plan_n = block_plan(block_m, d), block_plan(block_n, d)
    v_granularity = _v_granularity(v_granularity)
    seed = _seed(seed)
    hadamard = bool(hadamard)
    if any(i.kind == "numpy" for i in (iq, ik, iv)):
        raise TypeError("quantize_fp8 takes GPU arrays; numba_fa3.fp8_model.quantize_fp8_model quantizes "
                        "NumPy arrays")
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    tiles_m, tiles_n = _tiles(s, block_m), _tiles(sk, block_n)
    v_shape = (b, hk) if v_granularity == "head" else (b, hk, tiles_n)
    shapes = (iq.shape, ik.shape, iv.shape, (b, h, tiles_m), (b, hk, tiles_n), v_shape)
    results = _outputs(out, shapes, iq, stream)
    q8, k8, v8, dq, dk, dv = (tensors.device_ptr(r) for r in results)
    signs = tensors.device_ptr(_sign_table(d, seed, cuda.get_current_device().id)) if hadamard else 0
    for info, out_ptr, descale_ptr, (n, rows), tiles in ((iq, q8, dq, plan_m, tiles_m),
                                                         (ik, k8, dk, plan_n, tiles_n)):
        kern = quantize_kernel(info.dtype, d, rows, hadamard, Scaling.BLOCK, n)
        _launch(kern, info, out_ptr, descale_ptr, 0, signs, tiles, stream)
    if v_granularity == "block":
        n, rows = plan_n
        _launch(quantize_kernel(iv.dtype, d, rows, False, Scaling.BLOCK, n), iv, v8, dv, 0, 0, tiles_n, stream)
    else:
        rows = tile_rows(d)
        tiles = _tiles(sk, rows)
        tile_amax = _new_array(iq, (b, hk, tiles), "f32", stream)
        _used_on(tile_amax, iq, stream)
        amax_ptr = tensors.device_ptr(tile_amax)
        _launch(quantize_kernel(iv.dtype, d, rows, False, Scaling.AMAX), iv, 0, 0, amax_ptr, 0, tiles, stream)
        _launch(quantize_kernel(iv.dtype, d, rows, False, Scaling.HEAD), iv, v8, dv, amax_ptr, 0, tiles, stream)
    return results


# --- packed sequences ---------------------------------------------------------------------------

def quantize_like_kernel_varlen(x, cu_seqlens, block=128, rotate=True, seed=0, per_head=False):
    """`quantize_like_kernel` of packed ``x [T, H, D]``, each sequence of cu_seqlens on its own
    (its blocks from its first row): ``(x8 [T, H, D], descale)`` with descale ``[n, H,
    ceil(max_len / block)]`` (1 for the blocks past a sequence's end) or ``[n, H]`` per head (1
    for an empty sequence): `quantize_fp8_varlen`'s results, bit for bit."""
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be [total_rows, heads, head_dim], got shape {x.shape}")
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    t, h, d = x.shape
    n = len(cu) - 1
    lens = np.diff(cu)
    x8 = np.zeros((t, h, d), dtype=fp8_model.E4M3)
    tiles = -(-int(lens.max(initial=0)) // _positive_int(block, "block"))
    descale = np.ones((n, h) if per_head else (n, h, tiles), dtype=np.float32)
    for i in range(n):
        lo, hi = int(cu[i]), int(cu[i + 1])
        if hi > lo:
            part, ds = quantize_like_kernel(x[None, lo:hi], block, rotate, seed, per_head)
            x8[lo:hi] = part[0]
            if per_head:
                descale[i] = ds[0]
            else:
                descale[i, :, :ds.shape[2]] = ds[0]
    return x8, descale


def quantize_fp8_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, hadamard=True, seed=0,
                        block_m=128, block_n=128, v_granularity="head", stream=None):
    """`quantize_fp8` of packed sequences: q ``[Tq, H, D]``, k and v ``[Tk, Hk, D]`` GPU arrays,
    cu_seqlens_q / cu_seqlens_k int32 GPU arrays of n + 1 entries (not read on the host; clamped
    to the packed rows), max_seqlen_q / max_seqlen_k bounding every sequence.  Each sequence is
    quantized on its own, its blocks from its first row (the FP8 kernel's tiles of it).  Returns
    ``(q8, k8, v8, q_descale, k_descale, v_descale)``: codes in the inputs' shapes, descales
    ``[n, H, ceil(max_seqlen_q / block_m)]``, ``[n, Hk, ceil(max_seqlen_k / block_n)]`` and ``[n, Hk]``
    (or per block like k's), 1 past a sequence's end; `quantize_like_kernel_varlen`'s values."""
    iq, ik, iv = (tensors.inspect(x, name, stream) for x, name in ((q, "q"), (k, "k"), (v, "v")))
    for info, name in ((iq, "q"), (ik, "k"), (iv, "v")):
        if len(info.shape) != 3:
            raise ValueError(f"{name} must be [total_rows, heads, head_dim], got shape {info.shape}")
        if info.kind == "numpy":
            raise TypeError("quantize_fp8_varlen takes GPU arrays; quantize_like_kernel_varlen is the NumPy one")
    # (the dense checks, on [1, T, H, D] views)
    as4 = lambda i: tensors.TensorInfo(i.ptr, (1,) + i.shape, (0,) + tuple(i.strides), i.dtype, i.kind, i.obj,  # noqa: E731
                                       i.owner)
    _check_inputs(as4(iq), as4(ik), as4(iv))
    cuq, cuk = (tensors.inspect(c, name, stream) for c, name in ((cu_seqlens_q, "cu_seqlens_q"),
                                                                 (cu_seqlens_k, "cu_seqlens_k")))
    for c, name in ((cuq, "cu_seqlens_q"), (cuk, "cu_seqlens_k")):
        if c.kind == "numpy" or len(c.shape) != 1 or c.shape[0] < 2 or c.dtype != "i32":
            raise ValueError(f"{name} must be an int32 GPU array of batch + 1 >= 2 entries")
    if cuq.shape != cuk.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k differ in length: {cuq.shape[0]} and {cuk.shape[0]}")
    n = cuq.shape[0] - 1
    tq, h, d = iq.shape
    tk, hk = ik.shape[0], ik.shape[1]
    max_q, max_k = (tensors.integer(x, name) for x, name in ((max_seqlen_q, "max_seqlen_q"),
                                                             (max_seqlen_k, "max_seqlen_k")))
    if not (0 <= max_q <= tq and 0 <= max_k <= tk):
        raise ValueError(f"max_seqlen_q / max_seqlen_k must be in [0, {tq}] / [0, {tk}], got {max_q}, {max_k}")
    plan_m, plan_n = block_plan(block_m, d), block_plan(block_n, d)
    v_granularity = _v_granularity(v_granularity)
    seed, hadamard = _seed(seed), bool(hadamard)
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    tiles_m, tiles_n = max(1, _tiles(max_q, block_m)), max(1, _tiles(max_k, block_n))
    v_shape = (n, hk) if v_granularity == "head" else (n, hk, tiles_n)
    shapes = (iq.shape, ik.shape, iv.shape, (n, h, tiles_m), (n, hk, tiles_n), v_shape)
    results = tuple(_new_array(iq, shape, dtype, stream)
                    for shape, dtype in zip(shapes, ("e4m3",) * 3 + ("f32",) * 3))
    q8, k8, v8, dq, dk, dv = (tensors.device_ptr(r) for r in results)
    signs = tensors.device_ptr(_sign_table(d, seed, cuda.get_current_device().id)) if hadamard else 0
    for info, out_ptr, descale_ptr, (c, rows), tiles, cu in ((iq, q8, dq, plan_m, tiles_m, cuq),
                                                              (ik, k8, dk, plan_n, tiles_n, cuk)):
        kern = quantize_kernel(info.dtype, d, rows, hadamard, Scaling.BLOCK, c, True)
        _launch(kern, info, out_ptr, descale_ptr, 0, signs, tiles, stream, (n, cu.ptr))
    if v_granularity == "block":
        c, rows = plan_n
        _launch(quantize_kernel(iv.dtype, d, rows, False, Scaling.BLOCK, c, True), iv, v8, dv, 0, 0, tiles_n, stream,
                (n, cuk.ptr))
    else:
        rows = tile_rows(d)
        tiles = max(1, _tiles(max_k, rows))
        tile_amax = _new_array(iq, (n, hk, tiles), "f32", stream)
        _used_on(tile_amax, iq, stream)
        amax_ptr = tensors.device_ptr(tile_amax)
        for scaling, out_ptr, descale_ptr in ((Scaling.AMAX, 0, 0), (Scaling.HEAD, v8, dv)):
            _launch(quantize_kernel(iv.dtype, d, rows, False, scaling, 1, True), iv, out_ptr, descale_ptr, amax_ptr, 0,
                    tiles, stream, (n, cuk.ptr))
    return results
