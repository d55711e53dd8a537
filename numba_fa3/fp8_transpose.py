"""V transposed inside the FP8 kernel (FA3 section 3.3): the producer warpgroup's three helper
warps (`warpgroup.specialize`) turn each V tile that TMA landed (block_n keys x D bytes, 128-byte
swizzled rows) into the V^T tile the P V GEMM reads (D rows of block_n keys, K-major), with the
keys of each 32 in `fp8_layout.key_permutation`'s order, so the user's `[B, Sk, Hk, D]` V needs no
pass of its own.

One atom: 16 keys by 32 columns of D.  `ldmatrix.x4` (16-bit, not transposed) gives a lane 4
bytes of D of one key per matrix; the four matrices are (keys a, D 0-15), (keys b, D 0-15),
(keys a, D 16-31), (keys b, D 16-31), where lane row c of the "a" matrices is key sigma(2c) and of
the "b" ones key sigma(2c+1) (ldmatrix takes a row address per lane, so any key order is free).
Two byte permutes (`prmt`) per pair of registers interleave the two keys: (a0, b0, a1, b1) and
(a2, b2, a3, b3), so each 16-bit element holds keys sigma(2c), sigma(2c+1) of one column of D.
`stmatrix.x4.trans` stores them transposed: element (row c, column j) lands in row j, column c,
i.e. at V^T's row d (4 (j/2) + j%2, + 2 for the second register of a pair) and key position 2c:
the permuted order.  So the whole transpose is 1 ldmatrix, 4 prmt and 1 stmatrix per 512 bytes.

The ring: the producer's TMA fills a raw-V stage (`vraw`) with the same stage index as V^T's
stage; the helpers wait for it and for V^T's stage to be free, transpose, fence the async proxy
(the GEMM reads V^T), meet on a named barrier, and one thread arrives on V^T's full barrier and on
the raw stage's empty one.  The producer ends the helpers with a stop flag beside the raw stage,
published by an arrive on its full barrier without a load.
"""
import numpy as np
from numba import cuda

from numba_fa3.primitives import pipeline, smem, warpgroup
from numba_fa3.primitives.pipeline import PipelineState
from numba_fa3.ptx_inline import barrier, mbarrier, memory, special
from . import fp8_layout

#: Keys and D bytes of one atom.
ATOM_KEYS, ATOM_COLS = 16, 32
#: `prmt` selectors: bytes (a0, b0, a1, b1) and (a2, b2, a3, b3) of registers a, b.
INTERLEAVE_LOW, INTERLEAVE_HIGH = 0x5140, 0x7362
#: Lanes per 8x8 matrix of ldmatrix/stmatrix .x4 (lane i addresses row i % 8 of matrix i // 8).
MATRIX_ROWS = 8
#: The keys an "a" / "b" lane row c holds: sigma(2c), sigma(2c + 1) of the first 16.
KEYS_A = tuple(int(k) for k in fp8_layout.key_permutation()[0:ATOM_KEYS:2])
KEYS_B = tuple(int(k) for k in fp8_layout.key_permutation()[1:ATOM_KEYS:2])
KEY_BITS_A = sum(k << (4 * i) for i, k in enumerate(KEYS_A))   # (8 nibbles: key of row i)
KEY_BITS_B = sum(k << (4 * i) for i, k in enumerate(KEYS_B))


@cuda.jit(device=True, forceinline=True)
def send_stop(stop_slots, state, stop):
    """The producer's flag beside raw stage `state` (1: no more tiles), before the arrive that
    publishes the stage."""
    memory.st_shared_b32(stop_slots + state.stage * smem.MBARRIER_BYTES, stop)


def make_transposer(fwd):
    """helpers(p, sh, thread) for a FlashForwardFP8 with the in-kernel transpose: `sh` has the
    raw ring (`vraw`, `vraw_bars`, `stop_slots`) beside V^T's (`v`, `v_bars`)."""
    D, BN, STAGES = fwd.head_dim, fwd.block_n, fwd.stages
    STAGE_BYTES = fwd.chunks * fwd.kv_chunk          # a raw stage and a V^T stage alike
    RAW_CHUNK = fwd.kv_chunk                         # raw V: 128 columns of D per chunk
    ATOMS = (BN // ATOM_KEYS) * (D // ATOM_COLS)
    D_ATOMS = D // ATOM_COLS
    THREADS = warpgroup.HELPER_THREADS
    WARPS = warpgroup.HELPER_WARPS
    BAR = int(warpgroup.NamedBarrier.HELPERS)
    CHUNK_COLS = smem.SWIZZLE_BYTES

    @cuda.jit(device=True, forceinline=True)
    def atom(raw, vt, a, lane):
        """Atom a (key block of 16 a // D_ATOMS, columns 32 (a % D_ATOMS)) from raw to vt."""
        kb = np.uint32(a // D_ATOMS) * np.uint32(ATOM_KEYS)
        d0 = np.uint32(a % D_ATOMS) * np.uint32(ATOM_COLS)
        mat = lane // np.uint32(MATRIX_ROWS)
        row = lane % np.uint32(MATRIX_ROWS)
        bits = np.uint32(KEY_BITS_B) if (mat & np.uint32(1)) else np.uint32(KEY_BITS_A)
        key = kb + ((bits >> (np.uint32(4) * row)) & np.uint32(15))
        col = d0 + (mat >> np.uint32(1)) * np.uint32(16)
        chunk = col // np.uint32(CHUNK_COLS)
        src = raw + chunk * np.uint32(RAW_CHUNK) + smem.swizzle_128b(key, col % np.uint32(CHUNK_COLS))
        x = memory.ldmatrix_x4(src)
        y = (special.prmt(x[0], x[1], INTERLEAVE_LOW), special.prmt(x[0], x[1], INTERLEAVE_HIGH),
             special.prmt(x[2], x[3], INTERLEAVE_LOW), special.prmt(x[2], x[3], INTERLEAVE_HIGH))
        # stored matrix j: rows d0 + 16 (j // 2) + 2 (j % 2) + 4 (r // 2) + r % 2, 16 keys at kb
        d = d0 + (mat >> np.uint32(1)) * np.uint32(16) + (mat & np.uint32(1)) * np.uint32(2) \
            + (row >> np.uint32(1)) * np.uint32(4) + (row & np.uint32(1))
        memory.stmatrix_x4_trans(vt + smem.swizzle_128b(d, kb), y)

    @cuda.jit(device=True, forceinline=True)
    def helpers(p, sh, thread):
        uthread = np.uint32(thread)
        lane = uthread % np.uint32(warpgroup.WARP_THREADS)
        warp = uthread // np.uint32(warpgroup.WARP_THREADS)
        stage, phase = np.int32(0), np.int32(0)
        while True:
            state = PipelineState(stage, phase)
            pipeline.consumer_wait(sh.vraw_bars, state)
            if memory.ld_shared_b32(sh.stop_slots + state.stage * smem.MBARRIER_BYTES) != 0:
                break
            pipeline.producer_wait(sh.v_bars, STAGES, state)
            raw = special.uniform_u32(sh.vraw + state.stage * STAGE_BYTES)
            vt = special.uniform_u32(sh.v + state.stage * STAGE_BYTES)
            a = warp
            while a < np.uint32(ATOMS):
                atom(raw, vt, a, lane)
                a += np.uint32(WARPS)
            barrier.fence_proxy_async()
            barrier.sync(BAR, THREADS)
            if thread == 0:
                mbarrier.arrive(pipeline.full_barrier(sh.v_bars, state.stage))
                mbarrier.arrive(pipeline.empty_barrier(sh.vraw_bars, STAGES, state.stage))
            stage, phase = pipeline.advance(state, STAGES)
    return helpers
