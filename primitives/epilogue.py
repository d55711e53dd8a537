"""Epilogues: an accumulator tile from a consumer warpgroup's registers to global memory, shared
by the GEMM and the attention kernels.

Two ways out (PTX ISA 9.7.9.10 st, 9.7.9.17 stmatrix, 9.7.9.25 cp.async.bulk.tensor):
- through shared memory: the fragment is written into a 128-byte swizzled staging tile
  (`stager`: 32-bit stores of packed pairs or 64-bit stores of fp32 pairs; `stmatrix_stager`:
  stmatrix.x4, four 8x8 16-bit matrices per warp and instruction), then one thread TMA-stores it.
  TMA clips at the tensor's edges, so ragged tiles need no checks;
- from registers (`row_storer`): each quad of threads transposes its row's pieces so that a
  thread stores 16 contiguous bytes, each row checked against a limit (where a TMA box would
  cross into the next sequence of a packed batch, or where no staging buffer fits).

Fragment layout: `primitives.fragment` (thread t holds rows r = 16 (t // 32) + (t % 32) // 4 and
r + 8; per 8-column group, packed 16-bit pairs at columns 2 (t % 4) of both rows).
"""
import functools

import numpy as np
from numba import cuda

from numba_fa3.ptx_inline import memory, special
from . import fragment, smem
from .unroll import static_range, unrolled

#: Bytes of one 8-column group's packed 16-bit pair per row and thread, and of an fp32 pair.
PAIR_BYTES_16, PAIR_BYTES_32 = 4, 8
#: Columns in one accumulator group.
GROUP_COLS = 8


@functools.lru_cache(maxsize=None)
def stager(groups, element_bytes, chunk_bytes):
    """stage(buf, regs, row, col_byte): write `groups` 8-column groups of a fragment into the
    swizzled staging tile at shared address `buf` whose 128-byte chunks are `chunk_bytes` apart.
    16-bit output: `regs` packed pairs, 2 per group (row, row + 8); fp32: 4 per group.
    `row` is the thread's first row in the tile, `col_byte` the byte of its pair in a group
    (2 (t % 4) * element_bytes)."""
    group_bytes = GROUP_COLS * element_bytes
    per_chunk = smem.SWIZZLE_BYTES // group_bytes
    packed = element_bytes == 2

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def stage(buf, regs, row, col_byte):
        for j in static_range(groups):
            c, g = j // per_chunk, j % per_chunk
            dst = buf + c * chunk_bytes
            cb = g * group_bytes + col_byte
            if packed:
                memory.st_shared_b32(dst + smem.swizzle_128b(row, cb), regs[2 * j])
                memory.st_shared_b32(dst + smem.swizzle_128b(row + 8, cb), regs[2 * j + 1])
            else:
                memory.st_shared_v2_f32(dst + smem.swizzle_128b(row, cb), regs[4 * j], regs[4 * j + 1])
                memory.st_shared_v2_f32(dst + smem.swizzle_128b(row + 8, cb), regs[4 * j + 2], regs[4 * j + 3])
    return stage


@functools.lru_cache(maxsize=None)
def stmatrix_stager(groups, chunk_bytes):
    """stage(buf, packed, thread, col_byte): `stager` for 16-bit output by stmatrix.x4: per warp
    and instruction two 8-column groups of its 16 rows (matrices: rows 0-7 / 8-15 of group 2i,
    then of group 2i + 1), lane l addressing row l % 8 (+ 8 for matrices 1 and 3), its group by
    l // 16.  The register order is the fragment's: packed[2j] row r, packed[2j + 1] row r + 8 of
    group j, which is what the backward's transposed operands (P, dS) are staged from.
    `col_byte`: where the fragment's first column sits in a 128-byte row (a multiple of 16, the
    fragment's columns within the row: a part of a tile another warpgroup stages the rest of)."""
    if groups % 2:
        raise ValueError("stmatrix.x4 stages groups in pairs")
    per_chunk = smem.SWIZZLE_BYTES // (GROUP_COLS * 2)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def stage(buf, packed, thread, col_byte):
        lane = thread % np.uint32(32)
        row = np.uint32(16) * (thread // np.uint32(32)) + (lane & np.uint32(7)) + ((lane >> np.uint32(3)) & np.uint32(1)) * np.uint32(8)
        second = lane >> np.uint32(4)
        for i in static_range(groups // 2):
            j = 2 * i
            c, g = j // per_chunk, j % per_chunk
            cb = np.uint32(g * GROUP_COLS * 2) + second * np.uint32(GROUP_COLS * 2) + np.uint32(col_byte)
            memory.stmatrix_x4(buf + c * chunk_bytes + smem.swizzle_128b(row, cb),
                               (packed[2 * j], packed[2 * j + 1], packed[2 * j + 2], packed[2 * j + 3]))
    return stage


@functools.lru_cache(maxsize=None)
def stmatrix_transposed_stager(groups):
    """stage(buf, packed, thread, row_byte): a 16-bit fragment (64 rows by `groups` 8-column
    groups, packed as `stmatrix_stager` takes it) stored transposed by stmatrix.x4.trans: fragment
    column c becomes row c of a 128-byte swizzled chunk at `buf` (8 `groups` rows; no chunk
    crossed), the fragment's rows its contiguous elements from byte `row_byte` + 2 x (the warp's
    first row) on.  Per warp and instruction two
    groups (16 tile rows) of the warp's 16 fragment rows: matrices (rows 0-7, group 2i), (rows
    8-15, group 2i), then group 2i + 1; lane l addresses tile row 8 (l // 16) + l % 8 of the pair,
    at the warp's row (l // 8) % 2 half.  The backward's dS, from the S^T-shaped fragment (keys by
    queries) to [query][key] rows for dQ^T = K^T dS."""
    if groups % 2:
        raise ValueError("stmatrix.x4 stages groups in pairs")

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def stage(buf, packed, thread, row_byte):
        lane = thread % np.uint32(32)
        col = (lane & np.uint32(7)) + (lane >> np.uint32(4)) * np.uint32(GROUP_COLS)
        cb = np.uint32(row_byte) + (np.uint32(16) * (thread // np.uint32(32))
                                    + ((lane >> np.uint32(3)) & np.uint32(1)) * np.uint32(8)) * np.uint32(2)
        # (a group pair further is 16 rows further: the same swizzle, a constant offset)
        first = buf + smem.swizzle_128b(col, cb)
        for i in static_range(groups // 2):
            j = 2 * i
            memory.stmatrix_x4_trans(first + np.uint32(j * GROUP_COLS * smem.SWIZZLE_BYTES),
                                     (packed[2 * j], packed[2 * j + 1], packed[2 * j + 2], packed[2 * j + 3]))
    return stage


@functools.lru_cache(maxsize=None)
def transposed_f32_stager(groups, box_bytes):
    """stage(buf, acc, row, col): a float32 accumulator fragment (64 rows by `groups` 8-column
    groups, `fragment`'s layout: acc[4j], acc[4j + 1] at row `row`, columns 8j + `col`, + 1;
    acc[4j + 2], acc[4j + 3] at row + 8) stored transposed into 128-byte swizzled float32 boxes of
    32 columns: fragment (r, c) at tile row c, column r, in box r // 32 (`box_bytes` apart).  One
    4-byte store per register; a warp's store covers 8 consecutive columns of 4 rows 2 apart,
    which the swizzle puts on 32 distinct banks.  The backward's dQ^T (D by queries) into the
    [query][D] staging that its TMA reduce-adds read."""
    box_cols = smem.SWIZZLE_BYTES // 4

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def stage(buf, acc, row, col):
        # four addresses a thread (two rows of the fragment, two columns of a group); a group
        # further is 8 tile rows further: the same swizzle, a constant offset
        for half in static_range(2):
            r = row + np.uint32(8 * half)
            box = buf + (r // np.uint32(box_cols)) * np.uint32(box_bytes)
            cb = (r % np.uint32(box_cols)) * np.uint32(4)
            for e in static_range(2):
                first = box + smem.swizzle_128b(col + np.uint32(e), cb)
                for j in static_range(groups):
                    memory.st_shared_f32(first + np.uint32(8 * j * smem.SWIZZLE_BYTES), acc[4 * j + 2 * half + e])
    return stage


@functools.lru_cache(maxsize=None)
def row_storer(groups, element_bytes):
    """store(packed, head, row_stride, row0, limit, quad): a 16-bit fragment of `groups`
    8-column groups to global memory.  `head` is the address of the thread's first row at
    column 8 * quad (quad = t % 4), `row_stride` in elements; rows at or past `limit` (row0 is
    the thread's first row, compared with it) are not stored.  Every lane shuffles
    (`fragment.quad_transpose`, full-warp shfl), so the check guards the stores only; each
    st.global.v4 of a warp covers 8 rows x 64 bytes in whole sectors."""
    if groups % 4:
        raise ValueError("the quad transpose stores groups in fours")

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def store(packed, head, row_stride, row0, limit, quad):
        for half in static_range(2):
            for i in static_range(groups // 4):
                run = fragment.quad_transpose(packed[8 * i + half], packed[8 * i + 2 + half],
                                              packed[8 * i + 4 + half], packed[8 * i + 6 + half], quad)
                if row0 + 8 * half < limit:
                    memory.st_global_v4_b32(head + (8 * half * row_stride + 32 * i) * element_bytes, run)
    return store


@cuda.jit(device=True, forceinline=True)
def fragment_row(thread):
    """The thread's first row (r) of a warpgroup's accumulator fragment; its second is r + 8."""
    return np.int32(np.uint32(16) * (thread // np.uint32(32)) + (thread % np.uint32(32)) // np.uint32(4))


@cuda.jit(device=True, forceinline=True)
def fragment_col(thread):
    """The thread's first column within each 8-column group: 2 (t % 4)."""
    return np.int32(np.uint32(2) * (thread % np.uint32(4)))


@cuda.jit(device=True, forceinline=True)
def rebuilt(x):
    """`x` recomputed where it is used (the epilogue's addresses, per tile): hoisted out of the
    tile loop they would hold registers through the main loop."""
    return special.recompute_here(x)
