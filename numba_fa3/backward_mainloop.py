"""The backward kernel's consumers (FA3's CollectiveMainloopBwd::mma and its epilogue): each
consumer warpgroup owns 64 keys of the tile's key block and keeps their dK and dV in registers
while the query blocks that see the block stream by.

One step (query block m of query head h), per warpgroup, S and dP computed transposed so that
P^T and dS^T come out of the accumulators already as the A fragments of the dV and dK GEMMs:
  S^T  = K_w Q^T          (A: the warpgroup's 64 rows of K; B: Q, both K-major)
  dP^T = V_w dO^T         (issued behind S^T, both in flight)
  P^T  = exp2(S^T * scale_log2 - LSE_log2[query])   (masked entries -inf -> 0)
  dV  += P^T dO           (A: P^T packed from registers; B: dO, MN-major)
  dS^T = P^T * (dP^T - D[query])   (times 1 - tanh^2 under a soft-cap, tanh recovered from P^T)
  dK  += dS^T Q           (A: dS^T from registers; B: Q, MN-major)
  dQ   = dS K             (dS^T through shared memory, where both warpgroups' halves meet:
                           A MN-major; B: K, MN-major), staged in shared memory and added to
                           the float32 dQ workspace by TMA reduce-adds; with `deterministic`
                           by vector reductions from registers, in key-block order (a
                           semaphore per query block, FA3's).
After the tile's last step: dK times the softmax scale, dK and dV stored from registers.

Split by columns (`tiles.SPLIT_COLUMNS`, D = 256: dK and dV of 64 keys over all of D would not
fit a thread's registers) the warpgroups share the block's 64 keys and each keeps dK and dV over
its half of D's columns:
  S^T, dP^T, P^T, dS^T as above, for all 64 keys by the warpgroup's half of the queries
  P^T, dS^T               staged in shared memory, each warpgroup its half of the columns
  dV  += P^T dO_w         (A: P^T's whole tile, K-major; B: dO's warpgroup columns, MN-major)
  dK  += dS^T Q_w         (likewise), and dQ_w = dS K_w as above with the warpgroup's columns.
"""
from collections import namedtuple

import numpy as np
from numba import cuda

from numba_fa3.primitives import epilogue, pipeline, warpgroup
from numba_fa3.primitives.epilogue import fragment_col, fragment_row
from numba_fa3.primitives.fragment import (column_loader, exp2_cols, pack_bf16, pack_f16, scale_rows,
                                           mul_tanh_slope, sub_cols_mul, tanh_rows, zeros)
from numba_fa3.primitives.mma import ELEMENT_BYTES as MMA_ELEMENT_BYTES, WGMMA_M
from numba_fa3.primitives.pipeline import PipelineState
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES
from numba_fa3.ptx_inline import atomic, barrier, mbarrier, special, tma, wgmma
from . import mask
from .backward_producer import STAT_BYTES
from .producer import receive_tile
from .tile_scheduler import key_block_coords, rotated_next, rotated_rank, rotated_start, rotation

#: What every step of a tile reads: the tile's key block, batch entry and sequence placement, its
#: warpgroup, and the warpgroup's first query column of S^T (0 unless split by columns).  The
#: thread's fragment row and column, its first key, and its keys' query limits are recomputed
#: where used (`epilogue.rebuilt`): held through the loop they cost registers its dK and dV need.
TileEnv = namedtuple("TileEnv", "nb b q_off sq sk wg q0")
#: dQ workspace element bytes (float32), and the rows between a fragment's two rows.
ACC_BYTES, SECOND_ROW = 4, 8
#: Spins on the deterministic mode's semaphore before giving up the order (a broken order then
#: shows as nondeterminism in the tests instead of a hung GPU).
SPIN_LIMIT = 1 << 24


def dq_adder(groups):
    """add(addr, dq): a warpgroup's m64 x (8 groups) float32 fragment added into a row-major
    float32 matrix: `addr` is the thread's first row at its first column, `row_bytes` apart
    (bound at build).  One 8-byte reduction per register pair: a warp's instruction covers 8 rows
    x 32 bytes, whole sectors."""
    def make(row_bytes):
        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def add(addr, dq):
            for g in static_range(groups):
                atomic.red_add_v2_f32(addr + g * 8 * ACC_BYTES, dq[4 * g], dq[4 * g + 1])
                atomic.red_add_v2_f32(addr + SECOND_ROW * row_bytes + g * 8 * ACC_BYTES, dq[4 * g + 2], dq[4 * g + 3])
        return add
    return make


def make_backward_mainloop(bwd):
    """consume(p, sh, wg, tid) for a FlashBackward `bwd`: one consumer for every warpgroup, or
    split by columns into unequal shares (D = 192: 128 and 64 columns) one per share, chosen by
    the warpgroup (each with its accumulators' own sizes, so no wgmma accumulator crosses a
    branch)."""
    shares = bwd.col_shares
    if not bwd.columns or len(set(shares)) == 1:
        return _consumer(bwd, bwd.kv_cols, bwd.dq_cols)
    if len(shares) != 2:
        raise ValueError(f"unequal column shares {shares} are built for two consumer warpgroups")
    first, last = _consumer(bwd, shares[0], shares[0]), _consumer(bwd, shares[1], shares[1])

    @cuda.jit(device=True, forceinline=True)
    def consume(p, sh, wg, tid):
        if wg == 0:
            first(p, sh, wg, tid)
        else:
            last(p, sh, wg, tid)
    return consume


def _consumer(bwd, kv_cols, dq_cols):
    """consume(p, sh, wg, tid) of a warpgroup holding dK and dV over kv_cols of D and computing
    dQ over dq_cols (its column share, from wg x bwd.col_stride where the shares split D)."""
    BM, BN, D, STAGES = bwd.block_m, bwd.block_n, bwd.head_dim, bwd.stages
    CONSUMERS, COLUMNS = bwd.consumers, bwd.columns
    QD_BYTES, DS_BYTES, STATS_STAGE = bwd.qd_bytes, bwd.ds_bytes, bwd.stats_stage_bytes
    KV_STAGES, KV_BYTES, DESCENDING, ROTATED = bwd.kv_stages, bwd.kv_bytes, bwd.descending, bwd.rotated
    ROW_BYTES = BM * STAT_BYTES
    # a warpgroup's first key in the block (split by columns every warpgroup has all 64)
    WG_KEYS = 0 if COLUMNS else WGMMA_M
    WG_KV_BYTES = WG_KEYS * bwd.chunk_bytes     # its rows of K or V (first chunk)
    WG_DS_BYTES = WG_KEYS * bwd.chunk_bytes     # its rows (keys) of dS^T
    S_COLS, KV_COLS, COL_STRIDE = bwd.s_cols, kv_cols, bwd.col_stride
    # split by columns: a warpgroup's query rows of Q and dO (K-major B of S^T, dP^T), its
    # columns of Q and dO (MN-major B of dK, dV), and its first column byte in P^T's, dS^T's rows
    WG_Q_ROWS_BYTES = S_COLS * bwd.chunk_bytes
    WG_QD_COLS_BYTES = (COL_STRIDE // bwd.chunk_cols) * bwd.q_chunk
    WG_S_COL_BYTES = S_COLS * MMA_ELEMENT_BYTES[bwd.dtype]
    MASKED, SOFTCAP, DETERMINISTIC = bwd.masked, bwd.softcap, bwd.deterministic
    DQ_SPLIT, NQ = bwd.dq_split, dq_cols
    DQ_PART_BYTES = bwd.kv_chunk * (COL_STRIDE // bwd.chunk_cols) if DQ_SPLIT else 0
    dkv_mma, dq_mma = bwd.dkv_mma(KV_COLS), bwd.dq_mma(NQ)
    SDP, DKV, DQ = bwd.sdp.issue, dkv_mma.issue, dq_mma.issue
    SDP_SRC, DQ_SRC, DKV_SRC = bwd.sdp.a_source, dq_mma.a_source, dkv_mma.a_source
    S_ZERO, KV_ZERO, DQ_ZERO = zeros(S_COLS // 2), zeros(KV_COLS // 2), zeros(NQ // 2)
    DQ_BULK = bwd.dq_bulk
    DQ_STAGE_BYTES, DQ_BOX_COLS, DQ_BOX_BYTES = bwd.dq_stage_bytes, bwd.dq_box_cols, bwd.dq_box_bytes
    DQ_BOXES = NQ // DQ_BOX_COLS
    MAP_DQ = bwd.MAP_DQ * TENSOR_MAP_BYTES
    stage_dq = epilogue.stager(NQ // 8, ACC_BYTES, DQ_BOX_BYTES)
    PACK = pack_bf16 if bwd.dtype == "bf16" else pack_f16
    load_cols = column_loader(S_COLS // 8)
    stage_ds = epilogue.stmatrix_stager(S_COLS // 8, bwd.kv_chunk)
    store_rows = epilogue.row_storer(KV_COLS // epilogue.GROUP_COLS, 2)
    add_dq = dq_adder(NQ // 8)(D * ACC_BYTES)
    consumers_sync = warpgroup.consumers_sync(CONSUMERS)
    seq_info, ws_row = bwd.seq, bwd.workspace_row
    # query blocks of block_m != 64 rows: dQ^T = K^T dS (`FlashBackward.dqt_mma`), dS stored
    # [query][key] (each warpgroup its 64 keys' chunk), dQ^T staged transposed into dQ's boxes
    DQ_T = bwd.dq_t
    if DQ_T:
        dqt_mma = bwd.dqt_mma()
        DQT, DQT_SRC = dqt_mma.issue, dqt_mma.a_source
        DQT_ZERO = zeros(BM // 2)
        WG_DS_CHUNK = bwd.q_chunk                 # a warpgroup's 64 keys of dS: BM rows of 128 bytes
        WG_K_COLS_BYTES = bwd.kv_chunk            # K's chunk of the warpgroup's 64 columns of D
        stage_ds_t = epilogue.stmatrix_transposed_stager(S_COLS // 8)
        stage_dq_t = epilogue.transposed_f32_stager(BM // 8, DQ_BOX_BYTES)
    # with two Q/dO stages the dS buffer alternates with the stage index: no step count held
    PARITY_FROM_STAGE = DQ_T and STAGES == 2

    @cuda.jit(device=True, forceinline=True)
    def first_key(env, utid):
        """The thread's first key: its fragment's first row in the tile's key block."""
        return np.int32(env.nb * BN + env.wg * WG_KEYS + epilogue.rebuilt(fragment_row(utid)))

    @cuda.jit(device=True, forceinline=True)
    def scores(s, m, p, env, utid):
        """The mask where this (query block, key block) needs one: the diagonal, the window's
        edges or the keys past the sequence (queries past it have LSE +inf)."""
        if MASKED:
            if mask.needs_mask(env.nb, m, BM, BN, env.sq, env.sk, p.left, p.right):
                return masked(s, m, p, env, utid)
        elif (env.nb + 1) * BN > env.sk:
            return masked(s, m, p, env, utid)
        return s

    @cuda.jit(device=True, forceinline=True)
    def masked(s, m, p, env, utid):
        limits = mask.key_row_limits(first_key(env, utid), env.sk - env.sq, p.left, p.right, env.sk)
        return mask.apply(s, m, BM, epilogue.rebuilt(fragment_col(utid)) + env.q0, limits)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def ordered(p, env, h, m, first):
        """Deterministic mode: wait until the key blocks before this one (of those that see
        query block m) have added their dQ, so every dQ element sums in one order of key blocks:
        without a mask the order in which the rotated walks reach m (`tile_scheduler.rotation`);
        with a mask descending (the block on the diagonal, whose first query block m is, goes
        first, so no block waits at its start)."""
        sem = p.sem_ptr + ((env.b * p.heads + h) * p.m_blocks + m) * 4
        if first:
            if constexpr(ROTATED):
                start, base, size = rotation(env.nb, np.int32((env.sk + (BN - 1)) // BN),
                                             np.int32((env.sq + (BM - 1)) // BM), STAGES)
                rank = rotated_rank(m, start, base, size)
            else:
                n_min, n_max = mask.block_range(m, BM, BN, env.sq, env.sk, p.left, p.right)
                rank = np.int32(n_max - 1 - env.nb) if DESCENDING else np.int32(env.nb - n_min)
            spins = np.int32(0)
            while atomic.ld_acquire_s32(sem) != rank and spins < SPIN_LIMIT:
                spins = np.int32(spins + 1)
        return sem

    @cuda.jit(device=True, forceinline=True)
    def dq_step(k_tile, env, ds_buf, utid):
        """dQ for this step's query block (this warpgroup's columns; k_tile: the tile's K)."""
        return DQ(DQ_ZERO, DQ_SRC(ds_buf, utid), special.uniform_u32(k_tile + env.wg * DQ_PART_BYTES), 0)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def bulk_add(p, sh, env, dq, m, ws_base, utid, tid):
        """dQ staged in the warpgroup's shared tile, then added into the workspace by TMA
        reduce-adds from one thread (the tile was freed by `dq_buffer_free` before the step's
        barrier)."""
        buf = special.uniform_u32(sh.dq + env.wg * DQ_STAGE_BYTES)
        stage_dq(buf, dq, epilogue.rebuilt(np.uint32(fragment_row(utid))),
                 epilogue.rebuilt(np.uint32(fragment_col(utid) * ACC_BYTES)))
        barrier.fence_proxy_async()
        warpgroup.epilogue_sync(env.wg)
        if tid == 0:
            col = np.int32(env.wg * COL_STRIDE) if DQ_SPLIT else np.int32(0)
            row = np.int32(ws_base + m * BM)
            for c in static_range(DQ_BOXES):
                tma.reduce_add(p.maps + MAP_DQ, (col + c * DQ_BOX_COLS, row), buf + c * DQ_BOX_BYTES)
            tma.commit_group()

    @cuda.jit(device=True, forceinline=True)
    def dq_buffer_free(tid):
        """The thread that issued the last step's reduce-adds waits until they have read the
        staging tile (before the step's barrier, which every writer of the tile passes after)."""
        if DQ_BULK and tid == 0:
            tma.wait_group_read(0)

    @cuda.jit(device=True, forceinline=True)
    def add_to_workspace(p, env, dq, h, m, ws_base, utid, tid, does_dq):
        first = tid == 0 and env.wg == 0
        if DETERMINISTIC:
            sem = ordered(p, env, h, m, first)
            consumers_sync()
        if does_dq:
            col = np.int32(env.wg * COL_STRIDE) if DQ_SPLIT else np.int32(0)
            row = ws_base + np.int64(m * BM + epilogue.rebuilt(fragment_row(utid)))
            add_dq(p.dq_ptr + (row * D + col + epilogue.rebuilt(fragment_col(utid))) * ACC_BYTES, dq)
        if DETERMINISTIC:
            # every thread's reductions are ordered before the barrier, and the release by one
            # thread after it is cumulative: the next key block's acquire sees them all
            consumers_sync()
            if first:
                atomic.red_release_add_s32(sem, 1)

    @cuda.jit(device=True, forceinline=True)
    def kv_grads(p, sh, dk, dv, qs, m, env, kw, vw, utid):
        """A step's first half (split by keys): wait for the stage, S^T and dP^T, P^T, dV += P^T dO,
        dS^T, dK += dS^T Q (both issued, not waited).  Returns dK, dV and the packed P^T, dS^T."""
        pipeline.consumer_wait(sh.q_bars, qs)
        q = special.uniform_u32(sh.q + qs.stage * QD_BYTES)
        do = special.uniform_u32(sh.do + qs.stage * QD_BYTES)
        stats = sh.stats + qs.stage * STATS_STAGE
        s = SDP(S_ZERO, kw, q, 0)
        dp = SDP(S_ZERO, vw, do, 0)
        s = wgmma.wait_group_tied(1, s)
        if SOFTCAP:
            s = tanh_rows(s, p.softcap_scale)
        s = scores(s, m, p, env, utid)
        col0 = epilogue.rebuilt(fragment_col(utid))
        pr = exp2_cols(s, p.scale_log2, load_cols(stats, col0))
        pk = PACK(pr)
        dv = DKV(dv, pk, do, 1)
        dp = wgmma.wait_group_tied(1, dp)
        ds = sub_cols_mul(pr, dp, load_cols(stats + ROW_BYTES, col0))
        if SOFTCAP:
            ds = mul_tanh_slope(ds, pr, load_cols(stats, col0), np.float32(1) / p.scale_log2)
        dsk = PACK(ds)
        dk = DKV(dk, dsk, q, 1)
        return dk, dv, pk, dsk

    @cuda.jit(device=True, forceinline=True)
    def step(p, sh, dk, dv, qs, j, h, m, ws_base, env, k_tile, kw, vw, utid, tid):
        """One query block: returns dK, dV."""
        dk, dv, pk, dsk = kv_grads(p, sh, dk, dv, qs, m, env, kw, vw, utid)
        ds_buf = sh.ds + (j & 1) * DS_BYTES
        stage_ds(ds_buf + env.wg * WG_DS_BYTES, dsk, utid, np.uint32(0))
        barrier.fence_proxy_async()
        dq_buffer_free(tid)
        consumers_sync()
        does_dq = DQ_SPLIT or (j & 1) == env.wg
        if does_dq:
            dq = dq_step(k_tile, env, ds_buf, utid)
            dq, dk, dv, pk, dsk = wgmma.wait_group_hold(0, (dq, dk, dv, pk, dsk))
        else:
            dq = DQ_ZERO
            dk, dv, pk, dsk = wgmma.wait_group_hold(0, (dk, dv, pk, dsk))
        # every consumer thread arrives: each one's shared reads of the stage (LSE, D rows) are
        # released by its own arrive
        mbarrier.arrive(pipeline.empty_barrier(sh.q_bars, STAGES, qs.stage))
        if DQ_BULK:
            if does_dq:
                bulk_add(p, sh, env, dq, m, ws_base, utid, tid)
        else:
            add_to_workspace(p, env, dq, h, m, ws_base, utid, tid, does_dq)
        return dk, dv

    @cuda.jit(device=True, forceinline=True)
    def step_columns(p, sh, dk, dv, qs, j, h, m, ws_base, env, k_tile, kw, vw, utid, tid):
        """One query block, split by columns: returns dK, dV (the warpgroup's columns)."""
        pipeline.consumer_wait(sh.q_bars, qs)
        q = special.uniform_u32(sh.q + qs.stage * QD_BYTES)
        do = special.uniform_u32(sh.do + qs.stage * QD_BYTES)
        stats = sh.stats + qs.stage * STATS_STAGE
        rows = special.uniform_u32(env.wg * WG_Q_ROWS_BYTES)
        s = SDP(S_ZERO, kw, q + rows, 0)
        dp = SDP(S_ZERO, vw, do + rows, 0)
        s = wgmma.wait_group_tied(1, s)
        if SOFTCAP:
            s = tanh_rows(s, p.softcap_scale)
        s = scores(s, m, p, env, utid)
        col0 = epilogue.rebuilt(fragment_col(utid)) + env.q0
        pr = exp2_cols(s, p.scale_log2, load_cols(stats, col0))
        # (the tiles alternate per step: a tile is rewritten two steps after its GEMMs, which
        # every warpgroup has waited for before the barrier of the step in between)
        p_buf = sh.p + (j & 1) * DS_BYTES
        col_byte = np.uint32(env.wg * WG_S_COL_BYTES)
        stage_ds(p_buf, PACK(pr), utid, col_byte)
        dp = wgmma.wait_group_tied(0, dp)
        ds = sub_cols_mul(pr, dp, load_cols(stats + ROW_BYTES, col0))
        if SOFTCAP:
            ds = mul_tanh_slope(ds, pr, load_cols(stats, col0), np.float32(1) / p.scale_log2)
        ds_buf = sh.ds + (j & 1) * DS_BYTES
        stage_ds(ds_buf, PACK(ds), utid, col_byte)
        barrier.fence_proxy_async()
        dq_buffer_free(tid)
        consumers_sync()   # both warpgroups' parts of P^T and dS^T are written
        cols = special.uniform_u32(env.wg * WG_QD_COLS_BYTES)
        dv = DKV(dv, DKV_SRC(p_buf, utid), do + cols, 1)
        dk = DKV(dk, DKV_SRC(ds_buf, utid), q + cols, 1)
        dq = dq_step(k_tile, env, ds_buf, utid)
        dq, dk, dv = wgmma.wait_group_hold(0, (dq, dk, dv))
        mbarrier.arrive(pipeline.empty_barrier(sh.q_bars, STAGES, qs.stage))
        if DQ_BULK:
            bulk_add(p, sh, env, dq, m, ws_base, utid, tid)
        else:
            add_to_workspace(p, env, dq, h, m, ws_base, utid, tid, True)
        return dk, dv

    if DQ_T:   # (its closure's constants exist only then)
        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def bulk_add_t(p, sh, env, dqt, m, ws_base, utid, tid):
            """dQ^T staged transposed in the warpgroup's [query][D] tile, then added into the
            workspace by TMA reduce-adds from one thread (`bulk_add`)."""
            buf = special.uniform_u32(sh.dq + env.wg * DQ_STAGE_BYTES)
            stage_dq_t(buf, dqt, epilogue.rebuilt(np.uint32(fragment_row(utid))),
                       epilogue.rebuilt(np.uint32(fragment_col(utid))))
            barrier.fence_proxy_async()
            warpgroup.epilogue_sync(env.wg)
            if tid == 0:
                col = np.int32(env.wg * COL_STRIDE)
                row = np.int32(ws_base + m * BM)
                for c in static_range(DQ_BOXES):
                    tma.reduce_add(p.maps + MAP_DQ, (col + c * DQ_BOX_COLS, row), buf + c * DQ_BOX_BYTES)
                tma.commit_group()

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def step_t(p, sh, dk, dv, qs, j, h, m, ws_base, env, k_tile, kw, vw, utid, tid):
            """One query block of BM rows with dQ^T = K^T dS: returns dK, dV.  dK and dV are waited
            for before dQ^T's issue (in flight beside it, ptxas serialized the wgmmas)."""
            dk, dv, pk, dsk = kv_grads(p, sh, dk, dv, qs, m, env, kw, vw, utid)
            if constexpr(PARITY_FROM_STAGE):
                ds_buf = sh.ds + qs.stage * DS_BYTES
            else:
                ds_buf = sh.ds + (j & 1) * DS_BYTES
            # (the stmatrix addresses rebuilt here: hoisted out of the tile loop they were a spill)
            stage_ds_t(ds_buf + env.wg * WG_DS_CHUNK, dsk, epilogue.rebuilt(utid), np.uint32(0))
            barrier.fence_proxy_async()
            dq_buffer_free(tid)
            dk, dv, pk, dsk = wgmma.wait_group_hold(0, (dk, dv, pk, dsk))
            consumers_sync()   # both warpgroups' keys of dS are written
            dqt = DQT(DQT_ZERO, DQT_SRC(k_tile + env.wg * WG_K_COLS_BYTES, utid), special.uniform_u32(ds_buf), 0)
            dqt = wgmma.wait_group_tied(0, dqt)
            # every consumer thread arrives: each one's shared reads of the stage (LSE, D rows) are
            # released by its own arrive
            mbarrier.arrive(pipeline.empty_barrier(sh.q_bars, STAGES, qs.stage))
            bulk_add_t(p, sh, env, dqt, m, ws_base, utid, tid)
            return dk, dv

    run_step = step_columns if COLUMNS else (step_t if DQ_T else step)

    @cuda.jit(device=True, forceinline=True)
    def store_dkdv(p, dk, dv, hk, env, utid):
        """dK (times the softmax scale) and dV of the warpgroup's 64 keys (split by columns: its
        columns of them), rows past the sequence's end not stored."""
        quad = np.int32(epilogue.rebuilt(utid % np.uint32(4)))
        # (the sequence's placement read again: held across the tile's steps it was a spill)
        _, _, k_off, sk = seq_info(p, env.b)
        key = first_key(env, utid)
        row = np.int64(k_off) + key
        col = np.int32(env.wg * COL_STRIDE) if COLUMNS else np.int32(0)
        head = p.dk_ptr + (env.b * p.dk_batch_stride + hk * p.dk_head_stride + row * p.dk_row_stride + col
                           + 8 * quad) * 2
        store_rows(PACK(scale_rows(dk, p.grad_scale, p.grad_scale)), epilogue.rebuilt(head), p.dk_row_stride,
                   key, sk, quad)
        head = p.dv_ptr + (env.b * p.dv_batch_stride + hk * p.dv_head_stride + row * p.dv_row_stride + col
                           + 8 * quad) * 2
        store_rows(PACK(dv), epilogue.rebuilt(head), p.dv_row_stride, key, sk, quad)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def consume(p, sh, wg, tid):
        utid = np.uint32(tid)
        if DQ_BULK and tid == 0:
            tma.fence_descriptor_acquire(p.maps + MAP_DQ)
        qs_stage, qs_phase = np.int32(0), np.int32(0)
        kv_stage, kv_phase = np.int32(0), np.int32(0)
        tiles = np.int32(p.n_blocks * p.heads_k * p.batch)
        j = np.int32(0)  # steps done: the dS buffer's parity
        while True:
            kv = PipelineState(kv_stage, kv_phase)
            # (the ring's address recomputed per tile: held across the tile loop it was a spill)
            kv_bars = special.recompute_here(sh.kv_bars)
            pipeline.consumer_wait(kv_bars, kv)
            tile = receive_tile(special.recompute_here(sh.tile_slots), kv)
            if tile >= tiles:
                break
            nb, hk, b = key_block_coords(p, tile, DESCENDING)
            q_off, sq, k_off, sk = seq_info(p, b)
            env = TileEnv(nb, b, q_off, sq, sk, wg, np.int32(wg * S_COLS) if COLUMNS else np.int32(0))
            k_tile = sh.k + kv.stage * KV_BYTES
            kw = SDP_SRC(k_tile + wg * WG_KV_BYTES, utid)
            vw = SDP_SRC(sh.v + kv.stage * KV_BYTES + wg * WG_KV_BYTES, utid)
            m_min, m_max = mask.query_block_range(nb, BM, BN, sq, sk, p.left, p.right)
            dk, dv = KV_ZERO, KV_ZERO
            h = np.int32(hk * p.head_ratio)
            h_end = np.int32(h + p.head_ratio)
            while h < h_end:
                ws_base = ws_row(p, b, h, np.int32(0), q_off)  # (the head's workspace rows)
                if constexpr(ROTATED):
                    # (the producer's order: from the rotation's start around)
                    m = rotated_start(nb, sk, BN, m_min, m_max, STAGES)
                    i = m_min
                    while i < m_max:
                        dk, dv = run_step(p, sh, dk, dv, PipelineState(qs_stage, qs_phase), j, h, m, ws_base, env,
                                          k_tile, kw, vw, utid, tid)
                        qs_stage, qs_phase = pipeline.advance(PipelineState(qs_stage, qs_phase), STAGES)
                        j = np.int32(j + 1)
                        m = rotated_next(m, m_min, m_max)
                        i = np.int32(i + 1)
                else:
                    m = m_min
                    while m < m_max:
                        dk, dv = run_step(p, sh, dk, dv, PipelineState(qs_stage, qs_phase), j, h, m, ws_base, env,
                                          k_tile, kw, vw, utid, tid)
                        qs_stage, qs_phase = pipeline.advance(PipelineState(qs_stage, qs_phase), STAGES)
                        j = np.int32(j + 1)
                        m = np.int32(m + 1)
                h = np.int32(h + 1)
            # K and V (and the tile slot) are free: every consumer thread arrives after its reads
            mbarrier.arrive(pipeline.empty_barrier(kv_bars, KV_STAGES, kv.stage))
            kv_stage, kv_phase = pipeline.advance(kv, KV_STAGES)
            store_dkdv(p, dk, dv, hk, env, utid)
        if DQ_BULK and tid == 0:
            tma.wait_group(0)   # (the staging tiles must outlive the reduce-adds' reads)
    return consume
