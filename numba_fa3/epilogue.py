"""The forward kernel's epilogue (FA3's CollectiveEpilogue): O scaled by 1/l, converted to the
input type and written, then the LSE.

O goes out through its own shared buffer and a TMA store where that fits (`primitives.epilogue`
stager, the GEMM's too), else by row-checked 16-byte stores from registers: at D = 192 and 256
no O buffer fits beside two K/V stages, and varlen tiles must not spill into the next sequence
(a TMA box would).  The staging addresses are rebuilt per tile (`epilogue.rebuilt`): hoisted out
of the tile loop they would hold registers through the main loop.
"""
import numpy as np
from numba import cuda

from numba_fa3.primitives import epilogue, warpgroup
from numba_fa3.primitives.fragment import pack_bf16, pack_f16, scale_rows
from numba_fa3.primitives.mma import WGMMA_M
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES
from numba_fa3.primitives.unroll import static_range, unrolled
from numba_fa3.ptx_inline import barrier, memory, tma

#: Bytes of an LSE entry (float32), and the rows between a fragment's two rows.
LSE_BYTES, SECOND_ROW = 4, 8


def make_epilogue(fwd):
    """store(p, sh, o, st, wg, tid, r_local, col0, mb, h, b, q_off, row0, sq) for a FlashForward."""
    BM, D, CHUNKS, CHUNK_COLS = fwd.block_m, fwd.head_dim, fwd.o_chunks, fwd.o_chunk_cols
    ELEMENT_BYTES = 2
    O_CHUNK = BM * CHUNK_COLS * ELEMENT_BYTES
    WG_ROWS_BYTES = WGMMA_M * CHUNK_COLS * ELEMENT_BYTES
    GROUPS = D // epilogue.GROUP_COLS
    TMA_STORE = fwd.tma_store
    MAP_O = fwd.MAP_O * TENSOR_MAP_BYTES
    PACK = pack_bf16 if fwd.out_dtype == "bf16" else pack_f16
    FINISH = fwd.finish
    stage = epilogue.stager(GROUPS, ELEMENT_BYTES, O_CHUNK)
    store_rows = epilogue.row_storer(GROUPS, ELEMENT_BYTES)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def store(p, sh, o, st, wg, tid, r_local, col0, mb, h, b, q_off, row0, sq):
        utid = np.uint32(tid)
        inv0, lse0, inv1, lse1 = FINISH(p, st, b, h)
        po = PACK(scale_rows(o, inv0, inv1))
        if TMA_STORE:
            o_wg = sh.o + wg * WG_ROWS_BYTES
            # The previous tile's O store must have read the buffer before it is rewritten.
            if tid == 0:
                tma.wait_group_read(0)
            warpgroup.epilogue_sync(wg)
            stage(o_wg, po, epilogue.rebuilt(np.uint32(r_local)), epilogue.rebuilt(np.uint32(col0 * ELEMENT_BYTES)))
            barrier.fence_proxy_async()
            warpgroup.epilogue_sync(wg)
            if tid == 0:
                for c in static_range(CHUNKS):
                    tma.store(p.maps + MAP_O, (c * CHUNK_COLS, h, mb * BM + wg * WGMMA_M, b), o_wg + c * O_CHUNK)
                tma.commit_group()
        else:
            quad = np.int32(epilogue.rebuilt(utid % np.uint32(4)))
            head = p.o_ptr + (b * p.o_batch_stride + h * p.o_head_stride + (q_off + row0) * p.o_row_stride
                              + 8 * quad) * ELEMENT_BYTES
            store_rows(po, epilogue.rebuilt(head), p.o_row_stride, row0, sq, quad)
        if utid % np.uint32(4) == np.uint32(0):
            lse_row = p.lse_ptr + (b * p.lse_batch_stride + h * p.lse_head_stride + q_off + row0) * LSE_BYTES
            if row0 < sq:
                memory.st_global_f32(lse_row, lse0)
            if row0 + SECOND_ROW < sq:
                memory.st_global_f32(lse_row + SECOND_ROW * LSE_BYTES, lse1)
    return store
