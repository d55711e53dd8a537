"""The FlashAttention-3 forward kernel: warp-specialized, TMA-fed, wgmma on both GEMMs.

One producer warp loads the Q tile once per work tile and K/V tiles into a ring of shared-memory
stages (separate K and V barriers, so S = Q K^T starts before V lands).  Two consumer warpgroups
own 64 query rows each: S = Q K^T (wgmma, both operands from shared memory), the online softmax in
fp32 registers, P converted to bf16/fp16 in registers and O += P V (wgmma with A from registers).
Key blocks are walked from the last to the first, so masked boundary blocks come first and the
mask is applied only where `mask.needs_mask` says.  The epilogue scales O by 1/l, writes it through
the Q tile's shared memory with TMA stores (rows past Sq are clipped), and stores the LSE.  Work
tiles (m_block, head, batch) are scheduled persistently; causal runs the longest tiles first.

Not yet here (see bench/NOTES.md): ping-pong between the consumer warpgroups, the intra-warpgroup
overlap of softmax with the next S GEMM, softcap, varlen, fp8.
"""
import enum
import functools

import numpy as np
from numba import cuda, types

from primitives import launch, pipeline, scheduler, smem, warpgroup
from primitives.fragment import pack_bf16, pack_f16, row_max, scale_rows, zeros  # noqa: F401
from primitives.tma_desc import TENSOR_MAP_BYTES
from primitives.unroll import static_range, unrolled
from ptx_inline import barrier, mbarrier, memory, regs, special, tma, wgmma
from . import mask, softmax
from .tiles import tiles_for

#: m64 rows per consumer warpgroup; K of one 16-bit wgmma; columns in one 128B swizzle row.
WGMMA_M, WGMMA_K = 64, 16
CHUNK_COLS = smem.SWIZZLE_BYTES // 2
ELEMENT_BYTES = 2


class NamedBarrier(enum.IntEnum):
    """Id 0 is __syncthreads; each consumer warpgroup syncs its epilogue on its own id."""
    EPILOGUE_WG0 = 1
    EPILOGUE_WG1 = 2


class Maps(enum.IntEnum):
    """Order of the tensor maps in the launch's descriptor table."""
    Q = 0
    K = 1
    V = 2
    O = 3


class FlashForward(launch.HopperKernel):
    """One forward specialization: dtype, head dim, mask kind."""

    def __init__(self, dtype="bf16", head_dim=128, mask_kind=mask.MASK_NONE):
        if dtype not in ("bf16", "f16"):
            raise ValueError(f"dtype must be bf16 or f16, got {dtype}")
        t = tiles_for(head_dim)
        self.dtype, self.head_dim, self.mask_kind = dtype, head_dim, mask_kind
        self.block_m, self.block_n, self.stages = t.block_m, t.block_n, t.stages
        self.consumers = t.consumers
        self.threads = warpgroup.block_threads(self.consumers)
        self.registers = warpgroup.check_budget(t.producer_registers, t.consumer_registers, self.consumers)
        self.chunks = head_dim // CHUNK_COLS            # 128-byte column chunks of a row
        self.q_chunk = self.block_m * smem.SWIZZLE_BYTES
        self.kv_chunk = self.block_n * smem.SWIZZLE_BYTES
        plan = smem.SharedLayout()
        plan.add("q", self.chunks * self.q_chunk)
        plan.add("k", self.stages * self.chunks * self.kv_chunk)
        plan.add("v", self.stages * self.chunks * self.kv_chunk)
        plan.add("barriers", 2 * pipeline.barrier_bytes(self.stages) + 2 * smem.MBARRIER_BYTES,
                 align=smem.MBARRIER_BYTES)
        self.smem = plan.check()

    # --- producer -----------------------------------------------------------------------------
    def make_load(self):
        BM, BN, STAGES, CHUNKS = self.block_m, self.block_n, self.stages, self.chunks
        Q_CHUNK, KV_CHUNK = self.q_chunk, self.kv_chunk
        Q_BYTES, KV_BYTES = CHUNKS * Q_CHUNK, CHUNKS * KV_CHUNK
        KV_STAGE = CHUNKS * KV_CHUNK
        MAP = TENSOR_MAP_BYTES
        CAUSAL = self.mask_kind == mask.MASK_CAUSAL
        tile_coords = _tile_coords(CAUSAL)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def load(maps, k_bars, v_bars, q_full, q_empty, sq, sk, k_smem, v_smem, q_smem,
                 heads, head_ratio, batch, m_blocks, left, right):
            for i in static_range(3):
                tma.fence_descriptor_acquire(maps + i * MAP)
            index, phase, q_phase = 0, 0, 0
            tiles = m_blocks * heads * batch
            tile = scheduler.initial_work()
            while tile < tiles:
                mb, h, b = tile_coords(tile, m_blocks, heads, batch)
                hk = h // head_ratio
                n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, left, right)
                mbarrier.wait_parity(q_empty, q_phase ^ 1)
                mbarrier.arrive_expect_tx(q_full, Q_BYTES)
                for c in static_range(CHUNKS):
                    tma.load(q_smem + c * Q_CHUNK, maps + Maps.Q * MAP, (c * CHUNK_COLS, h, mb * BM, b), q_full)
                q_phase ^= 1
                nb = n_max - 1
                while nb >= n_min:
                    pipeline.producer_acquire(k_bars, STAGES, index, phase, KV_BYTES)
                    full = pipeline.full_barrier(k_bars, index)
                    for c in static_range(CHUNKS):
                        tma.load(k_smem + index * KV_STAGE + c * KV_CHUNK, maps + Maps.K * MAP,
                                 (c * CHUNK_COLS, hk, nb * BN, b), full)
                    pipeline.producer_acquire(v_bars, STAGES, index, phase, KV_BYTES)
                    full = pipeline.full_barrier(v_bars, index)
                    for c in static_range(CHUNKS):
                        tma.load(v_smem + index * KV_STAGE + c * KV_CHUNK, maps + Maps.V * MAP,
                                 (c * CHUNK_COLS, hk, nb * BN, b), full)
                    index, phase = pipeline.advance(index, phase, STAGES)
                    nb -= 1
                tile = scheduler.next_work(tile)
        return load

    # --- consumers ----------------------------------------------------------------------------
    def make_mma(self):
        BM, BN, D, STAGES, CHUNKS = self.block_m, self.block_n, self.head_dim, self.stages, self.chunks
        Q_CHUNK, KV_CHUNK = self.q_chunk, self.kv_chunk
        KV_STAGE = CHUNKS * KV_CHUNK
        STEPS_PER_CHUNK = CHUNK_COLS // WGMMA_K
        QK_STEPS, PV_STEPS = D // WGMMA_K, BN // WGMMA_K
        K_STEP_BYTES = WGMMA_K * ELEMENT_BYTES
        V_STEP_BYTES = WGMMA_K * smem.SWIZZLE_BYTES
        DESC_Q = smem.descriptor_base(0, smem.ATOM_BYTES)
        DESC_K = smem.descriptor_base(0, smem.ATOM_BYTES)
        DESC_V = smem.descriptor_base(KV_CHUNK, smem.ATOM_BYTES)
        QK = wgmma.mma_ss(BN, self.dtype, 0)
        PV = wgmma.mma_rs(D, self.dtype, 1)
        S_ZERO, O_ZERO = zeros(BN // 2), zeros(D // 2)
        PACK = pack_bf16 if self.dtype == "bf16" else pack_f16
        WG_ROWS_BYTES = WGMMA_M * smem.SWIZZLE_BYTES
        MASKED = self.mask_kind != mask.MASK_NONE
        CAUSAL = self.mask_kind == mask.MASK_CAUSAL
        tile_coords = _tile_coords(CAUSAL)
        WG_THREADS = warpgroup.WARPGROUP_THREADS
        BAR0 = int(NamedBarrier.EPILOGUE_WG0)
        MAP = TENSOR_MAP_BYTES
        GROUPS = D // 8

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def mma(maps, lse_ptr, k_bars, v_bars, q_full, q_empty, sq, sk, k_smem, v_smem, q_smem,
                heads, batch, m_blocks, left, right, scale_log2, softmax_scale, wg, tid):
            lane = tid % warpgroup.WARP_THREADS
            if tid == 0:
                tma.fence_descriptor_acquire(maps + Maps.O * MAP)
            index, phase, q_phase = 0, 0, 0
            tiles = m_blocks * heads * batch
            q_wg = q_smem + wg * WG_ROWS_BYTES
            r_local = 16 * (tid // 32) + (tid % 32) // 4
            col0 = 2 * (tid % 4)
            offset = sk - sq
            tile = scheduler.initial_work()
            while tile < tiles:
                mb, h, b = tile_coords(tile, m_blocks, heads, batch)
                n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, left, right)
                row0 = mb * BM + wg * WGMMA_M + r_local
                lo0, hi0 = mask.key_limits(row0, offset, left, right, sk)
                lo1, hi1 = mask.key_limits(row0 + 8, offset, left, right, sk)
                o = O_ZERO
                m0, m1 = softmax.NEG_INF, softmax.NEG_INF
                l0, l1 = np.float32(0), np.float32(0)
                mbarrier.wait_parity(q_full, q_phase)
                nb = n_max - 1
                while nb >= n_min:
                    pipeline.consumer_wait(k_bars, index, phase)
                    kst = k_smem + index * KV_STAGE
                    s = wgmma.fence_tied(S_ZERO)
                    for kk in static_range(QK_STEPS):
                        c, w = kk // STEPS_PER_CHUNK, kk % STEPS_PER_CHUNK
                        s = QK(s, smem.descriptor(DESC_Q, q_wg + c * Q_CHUNK + w * K_STEP_BYTES),
                               smem.descriptor(DESC_K, kst + c * KV_CHUNK + w * K_STEP_BYTES),
                               0 if kk == 0 else 1)
                    wgmma.commit_group()
                    s = wgmma.wait_group_tied(0, s)
                    pipeline.consumer_release(k_bars, STAGES, index, lane)
                    if MASKED or nb * BN + BN > sk:
                        if mask.needs_mask(nb, mb, BM, BN, sq, sk, left, right):
                            base = nb * BN
                            s = fragment_mask(s, col0, lo0 - base, hi0 - base, lo1 - base, hi1 - base)
                    p, m0, m1, l0, l1, a0, a1 = softmax.online_step(s, m0, m1, l0, l1, scale_log2)
                    o = scale_rows(o, a0, a1)
                    pk = PACK(p)
                    pipeline.consumer_wait(v_bars, index, phase)
                    vst = v_smem + index * KV_STAGE
                    o = wgmma.fence_tied(o)
                    for kk in static_range(PV_STEPS):
                        o = PV(o, (pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]),
                               smem.descriptor(DESC_V, vst + kk * V_STEP_BYTES), 1)
                    wgmma.commit_group()
                    o = wgmma.wait_group_tied(0, o)
                    pipeline.consumer_release(v_bars, STAGES, index, lane)
                    index, phase = pipeline.advance(index, phase, STAGES)
                    nb -= 1
                inv0, lse0 = softmax.finish_row(m0, l0, softmax_scale)
                inv1, lse1 = softmax.finish_row(m1, l1, softmax_scale)
                po = PACK(scale_rows(o, inv0, inv1))
                # O goes out through this warpgroup's rows of the Q tile (its GEMMs are done).
                for j in static_range(GROUPS):
                    c, g = j // 8, j % 8
                    dst = q_wg + c * Q_CHUNK
                    cb = (8 * g) * ELEMENT_BYTES + col0 * ELEMENT_BYTES
                    memory.st_shared_b32(dst + smem.swizzle_128b(r_local, cb), po[2 * j])
                    memory.st_shared_b32(dst + smem.swizzle_128b(r_local + 8, cb), po[2 * j + 1])
                barrier.fence_proxy_async()
                barrier.sync(BAR0 + wg, WG_THREADS)
                if tid == 0:
                    for c in static_range(CHUNKS):
                        tma.store(maps + Maps.O * MAP, (c * CHUNK_COLS, h, mb * BM + wg * WGMMA_M, b),
                                  q_wg + c * Q_CHUNK)
                    tma.commit_group()
                if tid % 4 == 0:
                    lse_row = lse_ptr + ((b * heads + h) * sq + row0) * 4
                    if row0 < sq:
                        memory.st_global_f32(lse_row, lse0)
                    if row0 + 8 < sq:
                        memory.st_global_f32(lse_row + 32, lse1)
                if tid == 0:
                    # The Q tile may be reloaded once the stores have read this warpgroup's rows.
                    tma.wait_group_read(0)
                    mbarrier.arrive(q_empty)
                q_phase ^= 1
                tile = scheduler.next_work(tile)
            if tid == 0:
                tma.wait_group(0)
        return mma

    # --- the kernel ---------------------------------------------------------------------------
    def make_kernel(self):
        load, mma = self.make_load(), self.make_mma()
        STAGES = self.stages
        CONSUMER_WARPS = self.consumers * (warpgroup.WARPGROUP_THREADS // warpgroup.WARP_THREADS)
        OFF_Q, OFF_K, OFF_V = (self.smem.offsets[k] for k in ("q", "k", "v"))
        OFF_BARS = self.smem.offsets["barriers"]
        RING = pipeline.barrier_bytes(STAGES)
        REG_PRODUCER, REG_CONSUMER = self.registers
        WG_THREADS = warpgroup.WARPGROUP_THREADS
        CONSUMERS = self.consumers

        def flash_fwd_kernel(maps, lse_ptr, batch, heads, head_ratio, sq, sk, m_blocks, left, right,
                             scale_log2, softmax_scale):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            k_bars = base + OFF_BARS
            v_bars = k_bars + RING
            q_full = v_bars + RING
            q_empty = q_full + smem.MBARRIER_BYTES
            if cuda.threadIdx.x == 0:
                pipeline.init(k_bars, STAGES, CONSUMER_WARPS)
                pipeline.init(v_bars, STAGES, CONSUMER_WARPS)
                mbarrier.init(q_full, 1)
                mbarrier.init(q_empty, CONSUMERS)
                mbarrier.fence_init()
            cuda.syncthreads()
            wg = warpgroup.warpgroup_index()
            tid = cuda.threadIdx.x % WG_THREADS
            if wg == 0:
                regs.setmaxnreg_dec(REG_PRODUCER)
                if tid < warpgroup.WARP_THREADS and special.elect_one():
                    load(maps, k_bars, v_bars, q_full, q_empty, sq, sk, base + OFF_K, base + OFF_V,
                         base + OFF_Q, heads, head_ratio, batch, m_blocks, left, right)
            else:
                regs.setmaxnreg_inc(REG_CONSUMER)
                mma(maps, lse_ptr, k_bars, v_bars, q_full, q_empty, sq, sk, base + OFF_K, base + OFF_V,
                    base + OFF_Q, heads, batch, m_blocks, left, right, scale_log2, softmax_scale,
                    wg - 1, tid)
        return flash_fwd_kernel

    SIGNATURE = types.void(types.uint64, types.uint64, types.int32, types.int32, types.int32,
                           types.int32, types.int32, types.int32, types.int32, types.int32,
                           types.float32, types.float32)

    def tensor_maps(self, q, k, v, o):
        """4-D maps (D, heads, seqlen, batch) of Q, K, V, O; strides in bytes."""
        def spec(t, rows):
            b, s, h, d = t.shape
            st = tuple(x * t.itemsize for x in (t.strides[2], t.strides[1], t.strides[0]))
            return (t.dtype, t.ptr, (d, h, s, b), st, (CHUNK_COLS, 1, rows, 1))
        return (spec(q, self.block_m), spec(k, self.block_n), spec(v, self.block_n), spec(o, WGMMA_M))

    def launch(self, table, lse_ptr, batch, heads, heads_k, sq, sk, window, softmax_scale, stream):
        m_blocks = -(-sq // self.block_m)
        grid = scheduler.persistent_grid(m_blocks * heads * batch, launch.sm_count())
        left, right = window
        self.kernel()(grid, stream, table, lse_ptr, batch, heads, heads // heads_k, sq, sk, m_blocks,
                      left, right, np.float32(softmax_scale * softmax.LOG2E), np.float32(softmax_scale))


from primitives.fragment import mask_cols as fragment_mask  # noqa: E402


def _tile_coords(longest_first):
    @cuda.jit(device=True, forceinline=True)
    def tile_coords(tile, m_blocks, heads, batch):
        """(m_block, head, batch) of a linear tile.  Heads and batches vary fastest, so CTAs that
        run together work on the same m_block; causal walks m_blocks from the last (longest)."""
        bh = tile % (heads * batch)
        mb = tile // (heads * batch)
        if longest_first:
            mb = m_blocks - 1 - mb
        return mb, bh % heads, bh // heads
    return tile_coords


@functools.lru_cache(maxsize=None)
def forward_kernel(dtype, head_dim, mask_kind):
    return FlashForward(dtype, head_dim, mask_kind)
