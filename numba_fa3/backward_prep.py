"""The backward pass's preprocess and postprocess kernels (FA3's `flash_bwd_preprocess_kernel`
and `flash_bwd_postprocess_kernel`), and the float32 workspaces they share with the main kernel.

Before the main backward kernel, per (batch, query head) and query row:
- `lse_log2[row] = lse * log2(e)`: the main kernel recomputes P = exp2(S * scale * log2(e) -
  lse_log2).  A row that saw no key (lse -inf) and every padding row hold +inf, so their P is 0
  (with -inf it would be exp2(+inf)).
- `delta[row] = sum_d float(dO[row, d]) * float(O[row, d])` in float32: dS = P * (dP - delta).
  Padding rows hold 0.
- `dq_accum[row, :] = 0`: the main kernel adds each key block's part of dQ into it atomically.
The preprocess writes every element of the three workspaces, padding included, so they need no
other initialization.  After the main kernel the postprocess writes
`dq[token, h, :] = round_to_nearest_even(dq_accum[row, :] * scale)` in q's 16-bit type.

Workspace rows are *padded*: each (batch, head), and with varlen each sequence, owns whole blocks
of `block_m` rows (the main kernel's query block), so the main kernel reads and adds whole blocks
with no bounds checks.
- Dense (q `[B, Sq, H, D]`): Sq_pad = ceil(Sq / block_m) * block_m; lse_log2 and delta are
  `[B, H, Sq_pad]`, dq_accum `[B, H, Sq_pad, D]`, contiguous; (b, h, s) is row
  (b * H + h) * Sq_pad + s.  Rows s in [Sq, Sq_pad) are padding.
- Varlen (q packed `[Tq, H, D]`, int32 `cu_seqlens_q[B + 1]`): T_pad = (Tq // block_m + B + 1) *
  block_m (FA3's bound); lse_log2 and delta are `[H, T_pad]`, dq_accum `[H, T_pad, D]`.  Sequence
  b's rows start at `padded_offset(cu[b], b)` = ((cu[b] + b * block_m) // block_m) * block_m, so
  token t of sequence b is row h * T_pad + padded_offset(cu[b], b) + t - cu[b]; every other row
  is padding.

Why each sequence's rows fit (varlen).  With J(b) = padded_offset(cu[b], b) / block_m =
cu[b] // block_m + b (b * block_m is whole blocks), write cu[b] = q * block_m + r, 0 <= r <
block_m, and L = cu[b + 1] - cu[b].  Then J(b + 1) - J(b) = (r + L) // block_m + 1 >=
L // block_m + 1 >= ceil(L / block_m): sequence b's ceil(L / block_m) blocks end at or before
the next sequence's first row.  The last sequence's blocks end at or before J(B) * block_m =
(Tq // block_m + B) * block_m < T_pad.  J rises by at least 1 per sequence, so the sequence that
owns block j is the last b with J(b) <= j (the kernels find it by bisection over cu_seqlens); a
block past the end of its owner's tokens is padding.  `tests/test_backward_prep.py` checks this
on random lengths, 0 and 1 included.

Both kernels split the rows into *units* of `RowTiling.unit_rows` consecutive rows, one warp
each; unit_rows divides block_m, so a unit lies in one block and one (batch, head, sequence).  A
row's 16-byte pieces (eight 16-bit elements; eight float32 of dq_accum are two pieces) are read by
`lanes_per_row` adjacent lanes, one piece each per access: every warp access covers whole 32-byte
sectors.  Each warp takes one unit (no grid-stride loop): units are small and many, so the
hardware's block scheduler balances them over the SMs and the grid's tail is short.
"""
import functools
from collections import namedtuple

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, smem, tensors, warpgroup
from numba_fa3.primitives.fragment import zeros
from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import convert, memory
from .softmax import LOG2E
from .tiles import SUPPORTED_HEAD_DIMS

#: Bytes of one vector access (`ld.global.nc.v4`, `st.global.v4`), of a 16-bit element, of a
#: float32 workspace entry and of a cu_seqlens entry (int32).
PIECE_BYTES, ELEMENT_BYTES, F32_BYTES, CU_BYTES = 16, 2, 4, 4
#: 16-bit elements per piece.
PIECE_ELEMENTS = PIECE_BYTES // ELEMENT_BYTES
WARP = warpgroup.WARP_THREADS
#: 16-byte loads per lane and tensor issued before the first is used: enough bytes in flight per
#: warp that a few resident warps per SM cover DRAM latency, at a handful of registers each.
PIECES_IN_FLIGHT = 4
#: Threads per CTA: eight warps, eight units.
THREADS = 256
#: Row indices are int32 in the kernels.
MAX_ROWS = 2**31 - 1
FULL_MASK = 0xFFFFFFFF
_U64, _I32, _I64, _F32 = types.uint64, types.int32, types.int64, types.float32


# --- layouts --------------------------------------------------------------------------------

def padded_seqlen(seqlen_q, block_m):
    """Sq_pad: the dense workspace's rows per (batch, head)."""
    return -(-seqlen_q // block_m) * block_m


def padded_total(total_q, batch, block_m):
    """T_pad: the varlen workspace's rows per head (an upper bound of every sequence's padded
    end; see the module docstring)."""
    return (total_q // block_m + batch + 1) * block_m


def padded_offset(start, b, block_m):
    """The first workspace row (within a head) of varlen sequence b, whose tokens start at
    `start` = cu_seqlens_q[b]: a multiple of block_m."""
    return ((start + b * block_m) // block_m) * block_m


def block_row(block_m, varlen):
    """row(p, b, h, m, q_off) on the device: the first workspace row of query block m of (b, h),
    for a kernel whose parameter record has the Workspace's strides (ws_batch_stride,
    ws_head_stride); q_off = cu_seqlens_q[b] with varlen (`padded_offset`), else unused."""
    @cuda.jit(device=True, forceinline=True)
    def row(p, b, h, m, q_off):
        r = np.int64(b) * p.ws_batch_stride + np.int64(h) * p.ws_head_stride + np.int64(m * block_m)
        if varlen:
            r += np.int64((q_off + b * block_m) // block_m) * block_m
        return r
    return row


#: Shapes of a workspace: lse_log2 and delta (`stats`), dq_accum (`accum`); `rows`: padded rows
#: in all (lse_log2's size); row-index strides of a batch and a head (batch 0 with varlen).
WorkspaceLayout = namedtuple("WorkspaceLayout", "stats_shape accum_shape rows batch_stride head_stride varlen")

#: The workspace: device arrays (Numba), and the layout's `rows`, `batch_stride`, `head_stride`
#: (elements of lse_log2 / delta; dq_accum's row strides are head_dim times these) and `varlen`.
Workspace = namedtuple("Workspace", "lse_log2 delta dq_accum rows batch_stride head_stride varlen")


def workspace_layout(batch, heads, head_dim, block_m, seqlen_q=None, total_q=None):
    """The WorkspaceLayout of a dense (total_q None: q `[batch, seqlen_q, heads, head_dim]`) or
    varlen (q `[total_q, heads, head_dim]`, `batch` sequences) backward."""
    if total_q is None:
        per_head = padded_seqlen(seqlen_q, block_m)
        stats = (batch, heads, per_head)
        layout = WorkspaceLayout(stats, stats + (head_dim,), batch * heads * per_head, heads * per_head,
                                 per_head, False)
    else:
        per_head = padded_total(total_q, batch, block_m)
        layout = WorkspaceLayout((heads, per_head), (heads, per_head, head_dim), heads * per_head, 0,
                                 per_head, True)
    if layout.rows > MAX_ROWS:
        raise ValueError(f"a workspace of {layout.rows} rows: more than int32 row indices reach")
    return layout


def workspace(batch, heads, head_dim, block_m, seqlen_q=None, total_q=None, stream=None, allocate=None):
    """A new Workspace (dense unless total_q is given; see `workspace_layout`), uninitialized:
    `preprocess` writes all of it.  stream: where it will be used (a handle or stream object;
    Numba allocates on it where its memory manager is stream-ordered).  allocate(shape): a float32
    device array from the caller's library instead (torch's caching allocator: the dQ workspace
    is as large as q in float32, and a driver allocation per call cost more than the kernels at
    short sequences)."""
    layout = workspace_layout(batch, heads, head_dim, block_m, seqlen_q, total_q)
    if allocate is None:
        handle = launch.stream_handle(stream)
        on = cuda.external_stream(handle) if handle else 0
        allocate = lambda shape: cuda.device_array(shape, np.float32, stream=on)  # noqa: E731
    lse_log2 = allocate(layout.stats_shape)
    delta = allocate(layout.stats_shape)
    dq_accum = allocate(layout.accum_shape)
    return Workspace(lse_log2, delta, dq_accum, layout.rows, layout.batch_stride, layout.head_stride,
                     layout.varlen)


# --- the row tiling ---------------------------------------------------------------------------

class RowTiling:
    """How a warp covers rows of head_dim 16-bit elements (D / 8 pieces of 16 bytes):
    `lanes_per_row` adjacent lanes per row (the largest power of two dividing the pieces, at most
    a warp), each taking `pieces_per_lane` pieces lanes_per_row apart; `rows_per_group` rows at
    once; `groups` such row groups per unit (so about PIECES_IN_FLIGHT pieces per lane are
    loaded before any is used); `unit_rows` = rows_per_group * groups.
        D       64  96  128  192  256
        lanes    8   4   16    8   32
        pieces   1   3    1    3    1
        rows     4   8    2    4    1
        groups   4   1    4    1    4
        unit    16   8    8    4    4"""

    def __init__(self, head_dim):
        pieces = head_dim // PIECE_ELEMENTS
        if head_dim % PIECE_ELEMENTS or pieces < 1:
            raise ValueError(f"head_dim {head_dim} is not a whole number of {PIECE_BYTES}-byte pieces")
        self.lanes_per_row = min(pieces & -pieces, WARP)
        self.pieces_per_lane = pieces // self.lanes_per_row
        self.rows_per_group = WARP // self.lanes_per_row
        self.groups = max(1, PIECES_IN_FLIGHT // self.pieces_per_lane)
        self.unit_rows = self.rows_per_group * self.groups

    def check_block(self, block_m):
        if block_m < 1 or block_m % self.unit_rows:
            raise ValueError(f"block_m {block_m} must be a positive multiple of {self.unit_rows} "
                             f"(the rows one warp takes at this head dim)")


# --- the device pieces both kernels share ---------------------------------------------------

@cuda.jit(device=True, forceinline=True)
def sequence_of_block(cu_seqlens, batch, block_m, block):
    """The varlen sequence whose padded rows hold padded block `block` of a head: the last b in
    [0, batch] with cu_seqlens[b] // block_m + b <= block (batch: the padding after the last
    sequence).  Bisection; every lane of a warp asks the same, so its loads are broadcasts."""
    lo = np.int32(0)
    hi = np.int32(batch + 1)  # J(lo) <= block < J(hi), J(batch + 1) taken as infinite
    while hi - lo > 1:
        mid = np.int32((lo + hi) >> 1)
        first, _ = udivmod32(memory.ld_global_s32(cu_seqlens + mid * CU_BYTES), block_m)
        if first + mid <= block:
            lo = mid
        else:
            hi = mid
    return lo


def unit_locator(varlen):
    """locate(p, row0) -> (b, h, s0, length, seq0) for the unit whose first workspace row is row0
    (p: a parameter record with cu_seqlens, batch, heads, seqlen, head_rows, block_m): its batch
    and head, its first row's index s0 within the sequence, the sequence's length, and the
    sequence's first token (0 dense; rows s < length are tokens seq0 + s of batch b)."""
    VARLEN = varlen

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def locate(p, row0):
        outer, within = udivmod32(row0, p.head_rows)
        if constexpr(VARLEN):
            h = outer
            block, _ = udivmod32(within, p.block_m)
            b = sequence_of_block(p.cu_seqlens, p.batch, p.block_m, block)
            seq0 = memory.ld_global_s32(p.cu_seqlens + b * CU_BYTES)
            length = np.int32(0)
            if b < p.batch:
                length = np.int32(memory.ld_global_s32(p.cu_seqlens + (b + 1) * CU_BYTES) - seq0)
            first_block, _ = udivmod32(seq0, p.block_m)
            s0 = np.int32(within - (first_block + b) * p.block_m)
        else:
            b, h = udivmod32(outer, p.heads)
            s0 = within
            length = p.seqlen
            seq0 = np.int32(0)
        return np.int32(b), np.int32(h), np.int32(s0), np.int32(length), np.int32(seq0)
    return locate


@cuda.jit(device=True, forceinline=True)
def warp_unit(units_per_cta):
    """(unit, lane) of this thread: warp w of CTA c takes unit c * units_per_cta + w."""
    tid = np.uint32(cuda.threadIdx.x)
    unit = np.int32(np.uint32(cuda.blockIdx.x) * np.uint32(units_per_cta) + tid // np.uint32(WARP))
    return unit, np.int32(tid % np.uint32(WARP))


def _check_dtype(dtype, head_dim):
    if dtype not in ("bf16", "f16"):
        raise ValueError(f"dtype must be bf16 or f16, got {dtype}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} is not supported; supported: {SUPPORTED_HEAD_DIMS}")


# --- the preprocess -------------------------------------------------------------------------

#: The preprocess's parameters: dO, O, LSE, cu_seqlens_q (0 dense) and the three workspaces'
#: addresses; batch, heads, Sq (dense), rows per head of the workspace (Sq_pad / T_pad), block_m,
#: units; the (batch, token, head) strides of dO, O (elements; batch 0 with varlen) and the
#: (batch, head, token) strides of the LSE.
PreprocessParams = launch.params("PreprocessParams", [
    ("do_ptr", _U64), ("o_ptr", _U64), ("lse_ptr", _U64), ("cu_seqlens", _U64),
    ("lse_log2_ptr", _U64), ("delta_ptr", _U64), ("dq_accum_ptr", _U64),
    ("batch", _I32), ("heads", _I32), ("seqlen", _I32), ("head_rows", _I32), ("block_m", _I32), ("units", _I32),
    ("do_batch_stride", _I64), ("do_row_stride", _I64), ("do_head_stride", _I64),
    ("o_batch_stride", _I64), ("o_row_stride", _I64), ("o_head_stride", _I64),
    ("lse_batch_stride", _I64), ("lse_head_stride", _I64), ("lse_row_stride", _I64)])


class _RowKernel(launch.HopperKernel):
    """A kernel whose warps each take a unit of workspace rows (`RowTiling`): one specialization
    per dtype, head dim and dense/varlen."""

    def __init__(self, dtype="bf16", head_dim=128, varlen=False):
        _check_dtype(dtype, head_dim)
        self.dtype, self.head_dim, self.varlen = dtype, head_dim, bool(varlen)
        self.tiling = RowTiling(head_dim)
        self.threads = THREADS
        self.smem = smem.SharedLayout().check()


class BackwardPreprocess(_RowKernel):
    """delta and lse_log2 of every workspace row, and dq_accum zeroed."""

    PARAMS = PreprocessParams

    def body(self):
        t = self.tiling
        LANES, PIECES, ROWS, GROUPS, UNIT = (t.lanes_per_row, t.pieces_per_lane, t.rows_per_group, t.groups,
                                             t.unit_rows)
        UNITS_PER_CTA = self.threads // WARP
        LANE_STRIDE = LANES * PIECE_BYTES              # bytes between one lane's pieces of a row
        SHUFFLES = tuple(LANES >> (i + 1) for i in range(LANES.bit_length() - 1))  # the row's lanes' sum
        # dq_accum rows of a unit are contiguous: the warp zeroes them in 16-byte pieces, lane i
        # taking pieces i, i + 32, ...  A float32 row is two pieces per 16-bit piece, so a unit
        # is 2 * PIECES * GROUPS pieces per lane: whole.
        ZERO_STORES = UNIT * self.head_dim * F32_BYTES // (WARP * PIECE_BYTES)
        ROW_ACCUM_BYTES = self.head_dim * F32_BYTES
        NO_DOTS = zeros(GROUPS)
        NO_LSE = (np.float32(np.inf),) * GROUPS
        ZERO_PIECE = (np.uint32(0),) * 4
        INF = np.float32(np.inf)
        NEG_INF = np.float32(-np.inf)
        LOG2E_F32 = np.float32(LOG2E)
        load = memory.ld_global_nc_v4_bf16_f32 if self.dtype == "bf16" else memory.ld_global_nc_v4_f16_f32
        locate = unit_locator(self.varlen)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def preprocess(p):
            unit, lane = warp_unit(UNITS_PER_CTA)
            if unit < p.units:
                row0 = np.int32(unit * UNIT)
                b, h, s0, length, seq0 = locate(p, row0)
                r_in = np.int32(lane // LANES)       # the row of its group this lane reads
                col = np.int32(lane % LANES) * PIECE_ELEMENTS
                dots = NO_DOTS
                lses = NO_LSE
                if s0 < length:  # (the whole warp: a unit is in one sequence)
                    # Every group's loads first.  Rows past the sequence re-read its last row (a
                    # valid address even where it is the whole unit's only token) and are zeroed
                    # below, so the loads need no branch.
                    found_dots = ()
                    found_lses = ()
                    for g in static_range(GROUPS):
                        tok = seq0 + min(s0 + g * ROWS + r_in, length - 1)
                        do_row = p.do_ptr + (b * p.do_batch_stride + tok * p.do_row_stride
                                             + h * p.do_head_stride + col) * ELEMENT_BYTES
                        o_row = p.o_ptr + (b * p.o_batch_stride + tok * p.o_row_stride
                                           + h * p.o_head_stride + col) * ELEMENT_BYTES
                        lse = memory.ld_global_nc_f32(p.lse_ptr + (b * p.lse_batch_stride + h * p.lse_head_stride
                                                                   + tok * p.lse_row_stride) * F32_BYTES)
                        acc = np.float32(0)
                        for k in static_range(PIECES):
                            x = load(do_row + k * LANE_STRIDE)
                            y = load(o_row + k * LANE_STRIDE)
                            for e in static_range(PIECE_ELEMENTS):
                                acc += x[e] * y[e]
                        found_dots = found_dots + (acc,)
                        found_lses = found_lses + (lse,)
                    dots = found_dots
                    lses = found_lses
                for g in static_range(GROUPS):
                    acc = dots[g]
                    for i in static_range(len(SHUFFLES)):
                        acc += cuda.shfl_xor_sync(FULL_MASK, acc, constexpr(SHUFFLES[i]))
                    if lane % LANES == 0:
                        token = s0 + g * ROWS + r_in < length
                        row = np.int64(row0 + g * ROWS + r_in)
                        lse = lses[g]
                        lse_log2 = INF if not token or lse == NEG_INF else lse * LOG2E_F32
                        memory.st_global_f32(p.lse_log2_ptr + row * F32_BYTES, lse_log2)
                        memory.st_global_f32(p.delta_ptr + row * F32_BYTES, acc if token else np.float32(0))
                zero_at = p.dq_accum_ptr + np.int64(row0) * ROW_ACCUM_BYTES + lane * PIECE_BYTES
                for k in static_range(ZERO_STORES):
                    memory.st_global_v4_b32(zero_at + k * (WARP * PIECE_BYTES), ZERO_PIECE)
        return preprocess


@functools.lru_cache(maxsize=None)
def preprocess_kernel(dtype, head_dim, varlen=False):
    return BackwardPreprocess(dtype, head_dim, varlen)


# --- the postprocess ------------------------------------------------------------------------

#: The postprocess's parameters: dq_accum, dQ and cu_seqlens_q (0 dense) addresses; batch,
#: heads, Sq (dense), rows per head of the workspace, block_m, units; dQ's (batch, token, head)
#: strides (elements; batch 0 with varlen); the scale dQ is multiplied by.
PostprocessParams = launch.params("PostprocessParams", [
    ("dq_accum_ptr", _U64), ("dq_ptr", _U64), ("cu_seqlens", _U64),
    ("batch", _I32), ("heads", _I32), ("seqlen", _I32), ("head_rows", _I32), ("block_m", _I32), ("units", _I32),
    ("dq_batch_stride", _I64), ("dq_row_stride", _I64), ("dq_head_stride", _I64), ("scale", _F32)])


class BackwardPostprocess(_RowKernel):
    """dQ = dq_accum * scale, rounded to the 16-bit dtype, for every token row of the workspace."""

    PARAMS = PostprocessParams

    def body(self):
        t = self.tiling
        LANES, PIECES, ROWS, GROUPS, UNIT = (t.lanes_per_row, t.pieces_per_lane, t.rows_per_group, t.groups,
                                             t.unit_rows)
        UNITS_PER_CTA = self.threads // WARP
        OUT_LANE_STRIDE = LANES * PIECE_BYTES                        # bytes between a lane's dQ pieces
        ACCUM_LANE_STRIDE = LANES * PIECE_ELEMENTS * F32_BYTES       # ... and between their float32 sources
        ROW_ACCUM_BYTES = self.head_dim * F32_BYTES
        pack = convert.pack_bf16x2 if self.dtype == "bf16" else convert.pack_f16x2
        locate = unit_locator(self.varlen)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def postprocess(p):
            unit, lane = warp_unit(UNITS_PER_CTA)
            if unit < p.units:
                row0 = np.int32(unit * UNIT)
                b, h, s0, length, seq0 = locate(p, row0)
                if s0 < length:  # (the whole warp: a unit is in one sequence)
                    r_in = np.int32(lane // LANES)
                    col = np.int32(lane % LANES) * PIECE_ELEMENTS
                    # Every piece's loads first (padding rows of dq_accum exist: no clamping),
                    # then the stores of the token rows.
                    packed = ()
                    for g in static_range(GROUPS):
                        src = p.dq_accum_ptr + np.int64(row0 + g * ROWS + r_in) * ROW_ACCUM_BYTES + col * F32_BYTES
                        for k in static_range(PIECES):
                            lo = memory.ld_global_nc_v4_f32(src + k * ACCUM_LANE_STRIDE)
                            hi = memory.ld_global_nc_v4_f32(src + k * ACCUM_LANE_STRIDE + PIECE_BYTES)
                            packed = packed + ((pack(lo[0] * p.scale, lo[1] * p.scale),
                                                pack(lo[2] * p.scale, lo[3] * p.scale),
                                                pack(hi[0] * p.scale, hi[1] * p.scale),
                                                pack(hi[2] * p.scale, hi[3] * p.scale)),)
                    for g in static_range(GROUPS):
                        s = s0 + g * ROWS + r_in
                        if s < length:
                            dst = p.dq_ptr + (b * p.dq_batch_stride + (seq0 + s) * p.dq_row_stride
                                              + h * p.dq_head_stride + col) * ELEMENT_BYTES
                            for k in static_range(PIECES):
                                memory.st_global_v4_b32(dst + k * OUT_LANE_STRIDE, packed[constexpr(g * PIECES + k)])
        return postprocess


@functools.lru_cache(maxsize=None)
def postprocess_kernel(dtype, head_dim, varlen=False):
    return BackwardPostprocess(dtype, head_dim, varlen)


# --- host -----------------------------------------------------------------------------------

def _check_rows16(info, name, shape):
    """A 16-bit `[.., D]` tensor of `shape` whose rows the kernels read or write in 16-byte pieces."""
    if tuple(info.shape) != tuple(shape):
        raise ValueError(f"{name} must be {tuple(shape)}, got {tuple(info.shape)}")
    if info.dtype not in ("bf16", "f16"):
        raise TypeError(f"{name} must be bf16 or fp16, got {info.dtype}")
    if 0 in info.shape:
        return  # never read nor written
    if info.strides[-1] != 1:
        raise ValueError(f"{name}: the head dimension must be contiguous, got strides {info.strides}")
    if info.ptr % PIECE_BYTES or any((s * ELEMENT_BYTES) % PIECE_BYTES for s in info.strides[:-1]):
        raise ValueError(f"{name}: 16-byte accesses need a 16-byte aligned base and strides, got base "
                         f"{info.ptr:#x}, strides {info.strides} elements")


def _check_workspace(ws, batch, heads, head_dim, block_m, seqlen_q, total_q, varlen):
    expect = workspace_layout(batch, heads, head_dim, block_m, None if varlen else seqlen_q,
                              total_q if varlen else None)
    got = (ws.rows, ws.batch_stride, ws.head_stride, ws.varlen)
    if got != (expect.rows, expect.batch_stride, expect.head_stride, expect.varlen):
        raise ValueError(f"the workspace (rows, batch stride, head stride, varlen) {got} is not the one of "
                         f"this problem {expect}")
    return expect


def _launch_shape(kern, layout, block_m):
    """(units, grid) of a launch over every row of the workspace."""
    kern.tiling.check_block(block_m)
    units = layout.rows // kern.tiling.unit_rows
    per_cta = kern.threads // WARP
    return units, -(-units // per_cta)


def _token_strides(info, varlen):
    """(batch, token, head) strides of a `[B, S, H, D]` or packed `[T, H, D]` tensor (elements)."""
    st = info.strides
    return (0, st[0], st[1]) if varlen else (st[0], st[1], st[2])


def preprocess(ws, dout, out, lse, batch, heads, head_dim, block_m, seqlen_q, stream, cu_seqlens_q=0, total_q=0):
    """Fill the workspace `ws` (from `workspace(...)` for the same problem) for the main backward
    kernel: lse_log2, delta and a zeroed dq_accum, every row (padding included).

    dout, out: TensorInfo of dO and O, `[batch, seqlen_q, heads, head_dim]` (dense) or
    `[total_q, heads, head_dim]` (varlen), bf16 or fp16, any strides with the last dimension
    contiguous, base and strides 16-byte aligned.  lse: TensorInfo of the forward's float32 LSE
    (natural log), `[batch, heads, seqlen_q]` or `[heads, total_q]`, any strides.
    ws.varlen chooses the layout; with varlen, cu_seqlens_q is the device address of the int32
    cu_seqlens (batch + 1 entries), total_q the packed length, and seqlen_q is not used.
    block_m: the main kernel's query block (a multiple of `RowTiling(head_dim).unit_rows`).
    stream: a handle or stream object; the call does not wait."""
    varlen = bool(ws.varlen)
    layout = _check_workspace(ws, batch, heads, head_dim, block_m, seqlen_q, total_q, varlen)
    if varlen and not cu_seqlens_q:
        raise ValueError("a varlen workspace needs cu_seqlens_q")
    rows_shape = (total_q, heads, head_dim) if varlen else (batch, seqlen_q, heads, head_dim)
    _check_rows16(dout, "dout", rows_shape)
    _check_rows16(out, "out", rows_shape)
    if dout.dtype != out.dtype:
        raise TypeError(f"dout and out must have one dtype, got {dout.dtype} and {out.dtype}")
    lse_shape = (heads, total_q) if varlen else (batch, heads, seqlen_q)
    if tuple(lse.shape) != lse_shape or lse.dtype != "f32":
        raise ValueError(f"lse must be float32 {lse_shape}, got {lse.dtype} {tuple(lse.shape)}")
    kern = preprocess_kernel(dout.dtype, head_dim, varlen)
    units, grid = _launch_shape(kern, layout, block_m)
    if not units:
        return
    lse_strides = (0, lse.strides[0], lse.strides[1]) if varlen else tuple(lse.strides)
    kern.launch_with(grid, stream, PreprocessParams(
        dout.ptr, out.ptr, lse.ptr, cu_seqlens_q if varlen else 0,
        tensors.device_ptr(ws.lse_log2), tensors.device_ptr(ws.delta), tensors.device_ptr(ws.dq_accum),
        batch, heads, 0 if varlen else seqlen_q, layout.head_stride, block_m, units,
        *_token_strides(dout, varlen), *_token_strides(out, varlen), *lse_strides))


def postprocess(ws, dq, batch, heads, head_dim, block_m, seqlen_q, scale, stream, cu_seqlens_q=0, total_q=0):
    """dq = dq_accum * scale rounded to nearest even in dq's 16-bit dtype, for every token row of
    the workspace `ws` (after the main kernel).  dq: TensorInfo of the output, `[batch, seqlen_q,
    heads, head_dim]` or `[total_q, heads, head_dim]`, bf16 or fp16, any 16-byte aligned strides
    with the last dimension contiguous.  Other arguments as in `preprocess`."""
    varlen = bool(ws.varlen)
    layout = _check_workspace(ws, batch, heads, head_dim, block_m, seqlen_q, total_q, varlen)
    if varlen and not cu_seqlens_q:
        raise ValueError("a varlen workspace needs cu_seqlens_q")
    _check_rows16(dq, "dq", (total_q, heads, head_dim) if varlen else (batch, seqlen_q, heads, head_dim))
    kern = postprocess_kernel(dq.dtype, head_dim, varlen)
    units, grid = _launch_shape(kern, layout, block_m)
    if not units:
        return
    kern.launch_with(grid, stream, PostprocessParams(
        tensors.device_ptr(ws.dq_accum), dq.ptr, cu_seqlens_q if varlen else 0,
        batch, heads, 0 if varlen else seqlen_q, layout.head_stride, block_m, units,
        *_token_strides(dq, varlen), np.float32(scale)))
