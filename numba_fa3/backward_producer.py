"""The backward kernel's producer (FA3's CollectiveMainloopBwd::load): one warp loads each work
tile's K and V once, then streams the query blocks that see the tile through a ring of stages,
each stage holding a block's Q and dO (TMA tiles) and its LSE and D rows (bulk copies of the
preprocess's padded float32 rows), all counted on the stage's one full barrier.

Order per tile: K and V (into a free buffer of the K/V ring: with two, while the consumers still
run the tile before), then for each query
head of the key head's group, the query blocks [m_min, m_max) that see the key block
(`mask.query_block_range`), first to last, or (`FlashBackward.rotated`) from the block's
`tile_scheduler.rotation` start around to the one before it.  The tile id reaches the consumers through a shared
slot written before K/V's full barrier completes; an id past the last tile tells them to stop.
"""
import numpy as np
from numba import cuda

from numba_fa3.primitives import pipeline, scheduler
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES
from numba_fa3.primitives.tma_load import chunk_loader
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import atomic, mbarrier, special, tma
from . import mask
from .producer import send_tile
from .tile_scheduler import key_block_coords, rotated_next, rotated_start

#: Bytes of one LSE or D entry (float32).
STAT_BYTES = 4


def make_backward_producer(bwd):
    """load(p, sh, lane) for a FlashBackward `bwd`."""
    BM, BN, STAGES, CHUNKS, CHUNK_COLS = bwd.block_m, bwd.block_n, bwd.stages, bwd.chunks, bwd.chunk_cols
    KV_STAGES, DESCENDING, ROTATED = bwd.kv_stages, bwd.descending, bwd.rotated
    KV_BYTES, QD_BYTES = bwd.kv_bytes, bwd.qd_bytes
    ROW_BYTES = BM * STAT_BYTES
    STAGE_TX = 2 * QD_BYTES + 2 * ROW_BYTES
    STATS_STAGE = bwd.stats_stage_bytes
    VARLEN = bwd.varlen
    MAP_Q, MAP_K, MAP_V, MAP_DO = (m * TENSOR_MAP_BYTES for m in (bwd.MAP_Q, bwd.MAP_K, bwd.MAP_V, bwd.MAP_DO))
    INPUT_MAPS = 4
    seq_info = bwd.seq
    ws_row = bwd.workspace_row
    load_kv = chunk_loader(CHUNKS, bwd.kv_chunk, CHUNK_COLS)
    load_qd = chunk_loader(CHUNKS, bwd.q_chunk, CHUNK_COLS)

    @cuda.jit(device=True, forceinline=True)
    def claim(p, lane):
        """The next tile (`scheduler.claim_next`), with the last tile's number a parameter and the
        grid size read here: held across the tile loop they were spilled at the producer's 24
        registers."""
        claimed = np.int32(0)
        if lane == 0:
            claimed = np.int32(atomic.atom_add_u32(p.counter, 1))
            if claimed == p.last_tile:
                atomic.atom_exch_u32(p.counter, 0)
        claimed = cuda.shfl_sync(0xFFFFFFFF, claimed, 0)
        return np.int32(claimed + special.nctaid_x_here())

    @cuda.jit(device=True, forceinline=True)
    def load_block(p, sh, state, h, m, stats_off, q_off, bc):
        """One query block's Q, dO, LSE and D rows into the stage at `state` (whole warp);
        stats_off: the byte offset of the head's first workspace row."""
        pipeline.producer_wait(sh.q_bars, STAGES, state)
        if special.elect_one():
            full = pipeline.full_barrier(sh.q_bars, state.stage)
            mbarrier.arrive_expect_tx(full, STAGE_TX)
            row = q_off + m * BM
            load_qd(sh.q + state.stage * QD_BYTES, p.maps + MAP_Q, (h, row, bc), full)
            load_qd(sh.do + state.stage * QD_BYTES, p.maps + MAP_DO, (h, row, bc), full)
            w = stats_off + np.uint32(m * ROW_BYTES)
            stats = sh.stats + state.stage * STATS_STAGE
            tma.load_bulk(stats, p.lse_ptr + w, ROW_BYTES, full)
            tma.load_bulk(stats + ROW_BYTES, p.delta_ptr + w, ROW_BYTES, full)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def load(p, sh, lane):
        if special.elect_one():
            for i in static_range(INPUT_MAPS):
                tma.fence_descriptor_acquire(p.maps + i * TENSOR_MAP_BYTES)
        qs = pipeline.start()
        kv = pipeline.start()
        tiles = np.int32(p.n_blocks * p.heads_k * p.batch)
        tile = scheduler.initial_work()
        while True:
            pipeline.producer_wait(sh.kv_bars, KV_STAGES, kv)
            if tile >= tiles:
                if special.elect_one():
                    send_tile(special.recompute_here(sh.tile_slots), kv, tile)
                    mbarrier.arrive(pipeline.full_barrier(sh.kv_bars, kv.stage))
                break
            nb, hk, b = key_block_coords(p, tile, DESCENDING)
            q_off, sq, k_off, sk = seq_info(p, b)
            if VARLEN and nb * BN >= sk:
                # past this sequence's keys (n_blocks counts the longest): nothing to do
                tile = claim(p, lane)
                continue
            bc = 0 if VARLEN else b
            if special.elect_one():
                send_tile(special.recompute_here(sh.tile_slots), kv, tile)
                full = pipeline.full_barrier(sh.kv_bars, kv.stage)
                mbarrier.arrive_expect_tx(full, 2 * KV_BYTES)
                load_kv(sh.k + kv.stage * KV_BYTES, p.maps + MAP_K, (hk, k_off + nb * BN, bc), full)
                load_kv(sh.v + kv.stage * KV_BYTES, p.maps + MAP_V, (hk, k_off + nb * BN, bc), full)
            kv = pipeline.advance(kv, KV_STAGES)
            # (sk through recompute_here: the mask's loop-invariant offsets, held across the
            # tile loop, were the producer's spill at 24 registers)
            m_min, m_max = mask.query_block_range(nb, BM, BN, sq, np.int32(special.recompute_here(sk)), p.left,
                                                  p.right)
            h = np.int32(hk * p.head_ratio)
            h_end = np.int32(h + p.head_ratio)
            while h < h_end:
                # (the head's workspace offset once: the 64-bit row arithmetic per block did not
                # fit the producer's registers)
                stats_off = ws_row(p, b, h, np.int32(0), q_off) * STAT_BYTES
                if constexpr(ROTATED):
                    m = rotated_start(nb, special.recompute_here(sk), BN, m_min, m_max, STAGES)
                    i = m_min
                    while i < m_max:
                        load_block(p, sh, qs, h, m, stats_off, q_off, bc)
                        qs = pipeline.advance(qs, STAGES)
                        m = rotated_next(m, m_min, m_max)
                        i = np.int32(i + 1)
                else:
                    m = m_min
                    while m < m_max:
                        load_block(p, sh, qs, h, m, stats_off, q_off, bc)
                        qs = pipeline.advance(qs, STAGES)
                        m = np.int32(m + 1)
                h = np.int32(h + 1)
            tile = claim(p, lane)
    return load
