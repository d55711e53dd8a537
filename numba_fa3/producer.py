"""The forward kernel's producer (FA3's CollectiveMainloop::load): one warp feeds each work tile's
Q into its buffer ring and the tile's K and V blocks into the K/V ring, by TMA on mbarriers.

Order per tile (key blocks walked from the last to the first): K of the tile's first block, Q,
then K of block j before V of block j + 1, so the consumers' S_j GEMM can start before their
P_{j+1} V_{j+1}; a block's K and V share one stage index of their two rings.  The next tile is
claimed before the tile's last V load, so the atomic's round trip hides under that load; with one
Q buffer the next tile's Q is prefetched into L2 then, since it can only load once this tile's
last S GEMM is done.  The tile id travels to the consumers through a shared slot per Q buffer,
written before Q's full barrier completes; an id past the last tile tells them to stop.
"""
from numba import cuda
import numpy as np

from numba_fa3.primitives import pipeline, scheduler, smem
from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES
from numba_fa3.primitives.tma_load import chunk_loader, chunk_prefetcher, stage_loader
from numba_fa3.primitives.unroll import static_range, unrolled
from numba_fa3.ptx_inline import mbarrier, memory, special, tma
from . import mask
from .trace import ProducerEvent, tracer


@cuda.jit(device=True, forceinline=True)
def send_tile(tile_slots, q_state, tile):
    """The tile id into Q buffer q_state's slot (one lane; Q's full barrier publishes it)."""
    memory.st_shared_b32(tile_slots + q_state.stage * smem.MBARRIER_BYTES, tile)


@cuda.jit(device=True, forceinline=True)
def receive_tile(tile_slots, q_state):
    """A consumer thread's copy of the tile id in Q buffer q_state's slot (after the buffer's
    full barrier).  Every consumer thread that reads it arrives on the buffer's empty barrier
    afterwards (`mainloop` release_q_now), and the producer rewrites the slot only once that
    phase completed: each read is released by its own thread's arrive."""
    return np.int32(special.uniform_u32(memory.ld_shared_b32(tile_slots + q_state.stage * smem.MBARRIER_BYTES)))


def make_producer(fwd):
    """load(p, sh, lane) for a FlashForward `fwd`: `p` its ForwardParams, `sh` its SharedRegions."""
    BM, BN, STAGES, Q_STAGES = fwd.block_m, fwd.block_n, fwd.stages, fwd.q_stages
    CHUNKS, CHUNK_COLS = fwd.chunks, fwd.chunk_cols
    Q_BYTES = CHUNKS * fwd.q_chunk
    VARLEN, TRACE = fwd.varlen, fwd.trace
    MAP_Q, MAP_K = (m * TENSOR_MAP_BYTES for m in (fwd.MAP_Q, fwd.MAP_K))
    INPUT_MAPS = 3
    tile_coords, seq_info = fwd.scheduler.coords, fwd.scheduler.seq
    load_kv = stage_loader(STAGES, CHUNKS, fwd.kv_chunk, CHUNK_COLS)
    load_v = fwd.v_loader()
    load_q = chunk_loader(CHUNKS, fwd.q_chunk, CHUNK_COLS)
    prefetch_q = chunk_prefetcher(CHUNKS, CHUNK_COLS)
    mark, _ = tracer(TRACE)

    @cuda.jit(device=True, forceinline=True)
    def mark_now(p, n, event, lane):
        if TRACE and lane == 0:
            mark(p.trace, 0, n, event, special.clock64())

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def load(p, sh, lane):
        # The whole warp runs this loop (so ptxas keeps its warp-uniform state in uniform
        # registers); one elected lane issues each TMA.
        if special.elect_one():
            for i in static_range(INPUT_MAPS):
                tma.fence_descriptor_acquire(p.maps + i * TENSOR_MAP_BYTES)
        kv = pipeline.start()
        q_state = pipeline.start()
        tiles = np.int32(p.m_blocks * p.heads * p.batch)
        tile = scheduler.initial_work()
        n = np.int32(0)  # tiles done (trace build)
        while True:
            if tile >= tiles:
                pipeline.producer_wait(sh.q_bars, Q_STAGES, q_state)
                if special.elect_one():
                    send_tile(sh.tile_slots, q_state, tile)
                    mbarrier.arrive(pipeline.full_barrier(sh.q_bars, q_state.stage))
                break
            mb, h, b = tile_coords(p, tile)
            q_off, sq, k_off, sk = seq_info(p, b)
            if VARLEN and mb * BM >= sq:
                # Past this sequence's end (m_blocks counts the longest): nothing to do.
                tile = scheduler.claim_next(p.counter, tiles, lane)
                continue
            bc = 0 if VARLEN else b
            hk, _ = udivmod32(h, p.head_ratio)
            n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, p.left, p.right)
            nb = np.int32(n_max - 1)
            # With one Q buffer the tile's first K goes out before Q, as in FA3: its stage was
            # freed a step before Q's buffer (the previous tile's second-to-last S GEMM vs its
            # last).  With two, this tile's Q buffer has been free for a whole tile.
            if Q_STAGES == 1 and nb >= n_min:
                load_kv(p.maps + MAP_K, sh.k_bars, sh.k, kv, (hk, k_off + nb * BN, bc))
            mark_now(p, n, ProducerEvent.WAIT_Q, lane)
            pipeline.producer_wait(sh.q_bars, Q_STAGES, q_state)
            mark_now(p, n, ProducerEvent.Q_FREE, lane)
            if special.elect_one():
                send_tile(sh.tile_slots, q_state, tile)
                pipeline.producer_expect(sh.q_bars, q_state, Q_BYTES)
                load_q(sh.q + q_state.stage * Q_BYTES, p.maps + MAP_Q, (h, q_off + mb * BM, bc),
                       pipeline.full_barrier(sh.q_bars, q_state.stage))
            q_state = pipeline.advance(q_state, Q_STAGES)
            if Q_STAGES > 1 and nb >= n_min:
                load_kv(p.maps + MAP_K, sh.k_bars, sh.k, kv, (hk, k_off + nb * BN, bc))
            if nb >= n_min:
                mark_now(p, n, ProducerEvent.FIRST_K, lane)
                v_state = kv
                kv = pipeline.advance(kv, STAGES)
                nb = np.int32(nb - 1)
                while nb >= n_min:
                    load_kv(p.maps + MAP_K, sh.k_bars, sh.k, kv, (hk, k_off + nb * BN, bc))
                    load_v(p, sh, v_state, hk, k_off + (nb + 1) * BN, bc, b, k_off)
                    v_state = kv
                    kv = pipeline.advance(kv, STAGES)
                    nb = np.int32(nb - 1)
                upcoming = scheduler.claim_next(p.counter, tiles, lane)
                mark_now(p, n, ProducerEvent.CLAIMED, lane)
                if Q_STAGES == 1 and upcoming < tiles:
                    nmb, nh, nbb = tile_coords(p, upcoming)
                    nq_off, nsq, _, _ = seq_info(p, nbb)
                    if nmb * BM < nsq and special.elect_one():
                        prefetch_q(p.maps + MAP_Q, (nh, nq_off + nmb * BM, 0 if VARLEN else nbb))
                load_v(p, sh, v_state, hk, k_off + (nb + 1) * BN, bc, b, k_off)
                mark_now(p, n, ProducerEvent.LAST_V, lane)
            else:
                upcoming = scheduler.claim_next(p.counter, tiles, lane)
            tile = upcoming
            n = np.int32(n + 1)
    return load
