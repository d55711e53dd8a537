"""The FlashAttention-3 forward kernel: warp-specialized, TMA-fed, wgmma on both GEMMs.

A kernel class composed of the library's collectives (docs/architecture.md):
- the producer (`producer`): one warp loads each work tile's Q and its K/V blocks by TMA into
  rings of shared-memory stages on mbarriers (`primitives.pipeline`, `primitives.tma_load`);
- the consumers: two or three warpgroups of 64 query rows each run the main loop (`mainloop`:
  S = Q K^T and O += P V issued by `primitives.mma`, the online softmax of `softmax`, the mask
  of `mask`, ping-pong and intra-warpgroup overlap) and the epilogue (`epilogue`);
- the scheduler (`tile_scheduler` over `primitives.scheduler`): dynamic persistent tiles,
  causal ones longest first in L2-sized sections;
- the roles, register split and named barriers of `primitives.warpgroup`.
The tile table (`tiles`) chooses the geometry and the schedule choices per head dim and mask.
`Schedule` switches ping-pong and the intra-warpgroup overlap off for the ablation (FA3 Table 2);
`trace=True` builds the kernel with %clock64 timestamps for `python -m bench trace`.
"""
import functools
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, mma, pipeline, scheduler, smem, warpgroup
from numba_fa3.primitives.epilogue import fragment_col, fragment_row
from numba_fa3.primitives.fragment import pack_bf16, pack_f16
from numba_fa3.primitives.mma import WGMMA_M
from numba_fa3.primitives.pipeline import PipelineState
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES, bshd_spec
from numba_fa3.primitives.tma_load import stage_loader
from numba_fa3.ptx_inline import mbarrier, special, tma
from . import mask, softmax, tile_scheduler
from .epilogue import make_epilogue
from .mainloop import TileEnv, make_mainloop
from .producer import make_producer, receive_tile
from .tiles import tiles_for
from .trace import TraceEvent, tracer

#: The lazy rescale's largest threshold (Tiles.rescale_threshold): P then reaches 2^8 = 256,
#: far inside fp16's range (65504), with bf16's and fp16's relative precision unchanged.
MAX_RESCALE_THRESHOLD = 8.0
#: Bytes per element of Q, K, V and O (bf16 or fp16).
ELEMENT_BYTES = 2


@dataclass(frozen=True)
class Schedule:
    """The two scheduling techniques, each switchable for the ablation (FA3 Table 2).
    pingpong: the consumer warpgroups take turns issuing GEMMs, so one's softmax runs under the
    other's GEMMs.  overlap: within a warpgroup, the S GEMM of the next block is in flight while
    the softmax of the current one runs."""
    pingpong: bool = True
    overlap: bool = True


FULL_SCHEDULE = Schedule()

#: The kernel's scalar parameters, one record (`launch.params`): the descriptor table (Q, K, V,
#: O maps), LSE and O addresses, the tile counter, varlen's cu_seqlens (0 when dense), shapes,
#: the causal order (`tile_scheduler`), the window, the scales, O's and LSE's strides (elements)
#: and the trace buffer (trace builds only).
_U64, _I32, _F32, _I64 = types.uint64, types.int32, types.float32, types.int64
FORWARD_FIELDS = [
    ("maps", _U64), ("lse_ptr", _U64), ("counter", _U64), ("o_ptr", _U64), ("cu_q", _U64), ("cu_k", _U64),
    ("batch", _I32), ("heads", _I32), ("head_ratio", _I32), ("sq_max", _I32), ("sk_max", _I32),
    ("total_q", _I32), ("total_k", _I32), ("m_blocks", _I32), ("section", _I32), ("tail", _I32),
    ("left", _I32), ("right", _I32),
    ("scale_log2", _F32), ("softmax_scale", _F32), ("softcap_scale", _F32),
    ("o_row_stride", _I64), ("o_head_stride", _I64), ("o_batch_stride", _I64),
    ("lse_batch_stride", _I64), ("lse_head_stride", _I64), ("trace", _U64)]
ForwardParams = launch.params("ForwardParams", FORWARD_FIELDS)

#: Shared addresses of the kernel's regions: the K, V and Q rings' barriers, the tile-id slots
#: (one per Q buffer), and the Q, K, V and O tiles.
SharedRegions = namedtuple("SharedRegions", "k_bars v_bars q_bars tile_slots q k v o")


class FlashForward(launch.HopperKernel):
    """One forward specialization: dtype, head dim, mask kind, soft-cap or not, varlen or not."""

    PARAMS = ForwardParams
    #: Order of the tensor maps in the launch's descriptor table.
    MAP_Q, MAP_K, MAP_V, MAP_O = range(4)
    #: Input types, and the tile table's lookup.
    DTYPES = ("bf16", "f16")
    table_tiles = staticmethod(tiles_for)
    #: Whether a consumer rebuilds its fragment row per tile instead of holding it across the
    #: tile loop: a register for a few integer instructions per tile (the FP8 kernels, which hold
    #: the descale rows too; the 16-bit kernels' step loops fit without it).
    ROW_PER_TILE = False

    def __init__(self, dtype="bf16", head_dim=128, mask_kind=mask.MASK_NONE, schedule=FULL_SCHEDULE,
                 tiles=None, softcap=False, varlen=False, trace=False, long_queries=False):
        """tiles: a `tiles.Tiles` to use instead of the table's (`python -m bench variants`).
        long_queries: take `tiles.LONG_TILES`' entry where there is one (`tiles.has_long_tiles`).
        varlen: sequences packed along one token axis, delimited by cu_seqlens (see api).
        trace: record `trace.TraceEvent` timestamps into the buffer `launch` is given."""
        if dtype not in self.DTYPES:
            raise ValueError(f"dtype must be one of {self.DTYPES}, got {dtype}")
        t = tiles or self.table_tiles(head_dim, mask_kind != mask.MASK_NONE, long_queries)
        self.dtype, self.head_dim, self.mask_kind, self.schedule = dtype, head_dim, mask_kind, schedule
        self.masked = mask_kind != mask.MASK_NONE
        self.softcap, self.varlen, self.trace = bool(softcap), bool(varlen), bool(trace)
        self.tiles = t
        self.block_m, self.block_n, self.stages, self.consumers = t.block_m, t.block_n, t.stages, t.consumers
        if self.block_m != WGMMA_M * self.consumers:
            raise ValueError(f"{self.consumers} consumer warpgroups with block_m {self.block_m}: each owns "
                             f"{WGMMA_M} rows")
        if schedule.pingpong and self.consumers < 2:
            raise ValueError("ping-pong needs at least two consumer warpgroups")
        self.threads = warpgroup.block_threads(self.consumers)
        self.registers = warpgroup.check_budget(t.producer_registers, t.consumer_registers, self.consumers)
        self.interleaved_rescale = t.interleaved_rescale
        # (the uniform pipeline orders its releases after the exponentials that the interleaved
        # rescale puts before the P V wait)
        self.uniform_pipeline = t.uniform_pipeline and t.interleaved_rescale
        # (Q in registers is wrong under the no-overlap ablation's loop: ptxas 13.0 gives the
        # fragments' registers to P there (bench sass.a_fragment_clobbers); that kernel keeps Q
        # in shared memory)
        self.q_in_registers = t.q_in_registers and schedule.overlap
        if not 0 <= float(t.rescale_threshold) <= MAX_RESCALE_THRESHOLD:
            raise ValueError(f"rescale threshold {t.rescale_threshold}: P would reach 2^{t.rescale_threshold}; "
                             f"0 to {MAX_RESCALE_THRESHOLD} allowed")
        self.rescale_threshold = float(t.rescale_threshold)
        self.sequential_mask_loops = t.sequential_mask_loops
        self.lazy_tail_after_wait = t.lazy_tail_after_wait and self.rescale_threshold > 0 and t.interleaved_rescale
        self._geometry()
        self.q_stages, self.tma_store, self.smem = self._fit_shared_memory()
        self.scheduler = tile_scheduler.tile_scheduler(mask_kind == mask.MASK_CAUSAL, self.varlen)

    def _geometry(self):
        """Chunks of the tiles (128-byte swizzle rows), O's type and chunks, and the hooks
        the collectives take from the kernel (`mainloop`, `epilogue`, `producer`)."""
        self.chunk_cols = smem.SWIZZLE_BYTES // ELEMENT_BYTES
        self.chunks = -(-self.head_dim // self.chunk_cols)        # 128-byte column chunks of a row
        self.q_chunk = self.block_m * smem.SWIZZLE_BYTES
        self.kv_chunk = self.block_n * smem.SWIZZLE_BYTES
        self.v_stage = self.chunks * self.kv_chunk                  # V's stage is K's shape
        self.out_dtype = self.dtype
        self.o_chunk_cols, self.o_chunks = self.chunk_cols, self.chunks
        self.o_bytes = self.chunks * self.q_chunk
        self.pack_p = pack_bf16 if self.dtype == "bf16" else pack_f16
        self.softmax_ops = softmax.raw_units()

    @staticmethod
    @cuda.jit(device=True, forceinline=True)
    def score_scale(p, env, nb):
        """The exponent's scale of key block nb: one per launch here."""
        return p.scale_log2

    @staticmethod
    @cuda.jit(device=True, forceinline=True)
    def value_scale(p, env, nb):
        """What the softmax takes of V's scale for key block nb (`softmax_ops`): none here."""
        return np.float32(0), np.float32(1)

    @staticmethod
    @cuda.jit(device=True, forceinline=True)
    def tanh_scale(p, env, nb):
        """The soft-cap's tanh argument scale of key block nb (softmax_scale / softcap): one per
        launch here."""
        return p.softcap_scale

    @staticmethod
    @cuda.jit(device=True, forceinline=True)
    def tile_scale(p, b, h, mb):
        """What `score_scale` reads of a tile (TileEnv.scale): nothing here."""
        return np.float32(0)

    @staticmethod
    @cuda.jit(device=True, forceinline=True)
    def finish(p, st, b, h):
        """(1/l0, lse0, 1/l1, lse1) of the thread's rows: O's row factors and the LSE."""
        return softmax.finish(st, p.softmax_scale)

    def v_loader(self):
        """load_v(p, sh, state, kv_head, first_key, batch, seq, k_off): a key block's V into its
        ring stage (the producer's V load), V as the tensor is laid out; `batch` is the map's
        coordinate (0 when packed), `seq` the sequence, whose keys start at row k_off (what a
        packed layout of its own needs: `forward_fp8`)."""
        load = stage_loader(self.stages, self.chunks, self.kv_chunk, self.chunk_cols)
        MAP_V = self.MAP_V * TENSOR_MAP_BYTES

        @cuda.jit(device=True, forceinline=True)
        def load_v(p, sh, state, hk, key, b, seq, k_off):
            load(p.maps + MAP_V, sh.v_bars, sh.v, state, (hk, key, b))
        return load_v

    @property
    def qk(self):
        """S = Q K^T: Q (K-major, in registers or hoisted descriptors per the tiles), K K-major."""
        steps = self.head_dim // mma.WGMMA_K[self.dtype]
        hoist = self.tiles.hoist_q_descriptors
        hoisted = steps if hoist is True else max(0, min(int(hoist), steps))
        return mma.warpgroup_mma(self.block_n, self.dtype, self.head_dim, mma.Operand("k", self.q_chunk),
                                 mma.Operand("k", self.kv_chunk), hoisted, self.q_in_registers)

    @property
    def pv(self):
        """O += P V: P from registers (the S accumulator packed), V MN-major."""
        return mma.warpgroup_mma(self.head_dim, self.dtype, self.block_n, mma.REGISTERS,
                                 mma.Operand("mn", self.kv_chunk))

    def _fit_shared_memory(self):
        """(Q buffers, O through its own buffer and TMA?, plan): Q is released as soon as the
        tile's last S GEMM is done, so O never goes through Q's buffer.  Where O's own buffer fits
        beside two Q buffers, the next tile's Q loads during this tile; else one Q buffer; else
        (D = 192, 256; varlen, whose tiles must not spill into the next sequence) O goes out by
        row-checked stores from registers."""
        own = not self.varlen
        for q_stages, tma_store in ((2, own), (1, own), (1, False)):
            plan = self._plan(q_stages, tma_store)
            if plan.used + smem.ATOM_BYTES <= smem.MAX_DYNAMIC_SMEM:
                return q_stages, tma_store, plan.check()
        raise ValueError(f"no shared-memory plan fits: {plan.sizes}")

    def _plan(self, q_stages, tma_store):
        q_bytes = self.chunks * self.q_chunk
        plan = smem.SharedLayout()
        plan.add("q", q_stages * q_bytes)
        plan.add("k", self.stages * self.chunks * self.kv_chunk)
        plan.add("v", self.stages * self.v_stage)
        # K, V and Q rings, and per Q buffer the slot that passes the tile id (an 8-byte unit).
        plan.add("barriers", 2 * pipeline.barrier_bytes(self.stages) + pipeline.barrier_bytes(q_stages)
                 + q_stages * smem.MBARRIER_BYTES, align=smem.MBARRIER_BYTES)
        if tma_store:
            plan.add("o", self.o_bytes)
        return plan

    # --- the consumers: the tile loop around the main loop and the epilogue ----------------------
    def make_mma(self):
        BM, BN, Q_STAGES = self.block_m, self.block_n, self.q_stages
        Q_BYTES = self.chunks * self.q_chunk
        WG_ROWS_BYTES = WGMMA_M * smem.SWIZZLE_BYTES
        MASKED, TMA_STORE, TRACE = self.masked, self.tma_store, self.trace
        Q_REGS, ROW_PER_TILE = self.q_in_registers, self.ROW_PER_TILE
        MAP_O = self.MAP_O * TENSOR_MAP_BYTES
        A_SOURCE = self.qk.a_source
        tile_coords, seq_info = self.scheduler.coords, self.scheduler.seq
        tile_scale = self.tile_scale
        run_tile, release_q_now = make_mainloop(self)
        store = make_epilogue(self)
        _, _, turn_start = warpgroup.pingpong(self.schedule.pingpong, self.consumers)
        mark, _ = tracer(TRACE)

        @cuda.jit(device=True, forceinline=True)
        def consume(p, sh, wg, tid):
            # (unsigned 32-bit: Python's floor division and modulo on int64 took two registers
            # each and a sign fix-up, and spilled at 160 registers)
            utid = np.uint32(tid)
            lane = np.int32(utid % np.uint32(warpgroup.WARP_THREADS))
            if TMA_STORE and tid == 0:
                tma.fence_descriptor_acquire(p.maps + MAP_O)
            turn_start(wg)  # warpgroup 0 issues first
            # (ring positions cross the tile loop as loose int32, as in the main loop: mainloop)
            kv_stage, kv_phase = np.int32(0), np.int32(0)
            q_stage, q_phase = np.int32(0), np.int32(0)
            tiles = np.int32(p.m_blocks * p.heads * p.batch)
            r_held = fragment_row(utid)
            col0 = fragment_col(utid)
            n = np.int32(0)  # tiles done (trace build)
            tracer_thread = TRACE and tid == 0
            while True:
                if tracer_thread:
                    mark(p.trace, 1 + wg, n, TraceEvent.WAIT_Q, special.clock64())
                q_state = PipelineState(q_stage, q_phase)
                pipeline.consumer_wait(sh.q_bars, q_state)
                tile = receive_tile(sh.tile_slots, q_state)
                if tile >= tiles:
                    break
                if tracer_thread:
                    mark(p.trace, 1 + wg, n, TraceEvent.TILE, special.clock64())
                mb, h, b = tile_coords(p, tile)
                q_off, sq, k_off, sk = seq_info(p, b)
                q_src = A_SOURCE(sh.q + q_state.stage * Q_BYTES + wg * WG_ROWS_BYTES, utid)
                q_empty = pipeline.empty_barrier(sh.q_bars, Q_STAGES, q_state.stage)
                if Q_REGS:
                    release_q_now(q_empty, lane)  # (the arrive's release semantics order the loads)
                n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, p.left, p.right)
                # (rebuilt from a copy of the thread index that cannot be hoisted out of the loop)
                r_local = fragment_row(special.recompute_here(utid)) if ROW_PER_TILE else r_held
                row0 = np.int32(mb * BM + wg * WGMMA_M + r_local)
                limits = mask.row_limits(row0, sk - sq, p.left, p.right, sk, MASKED)
                env = TileEnv(q_src, q_empty, n_min, n_max, col0, limits, lane, wg, tracer_thread, n,
                              tile_scale(p, b, h, mb))
                o, st, kv = run_tile(p, sh, PipelineState(kv_stage, kv_phase), env, mb, sq, sk)
                kv_stage, kv_phase = kv.stage, kv.phase
                store(p, sh, o, st, wg, tid, r_local, col0, mb, h, b, q_off, row0, sq)
                if tracer_thread:
                    mark(p.trace, 1 + wg, n, TraceEvent.DONE, special.clock64())
                n = np.int32(n + 1)
                q_stage, q_phase = pipeline.advance(q_state, Q_STAGES)
            if tid == 0:
                tma.wait_group(0)
        return consume

    # --- the kernel ---------------------------------------------------------------------------
    def body(self):
        run = warpgroup.specialize(make_producer(self), self.make_mma(), self.registers)
        STAGES, Q_STAGES = self.stages, self.q_stages
        CONSUMER_WARPS = self.consumers * (warpgroup.WARPGROUP_THREADS // warpgroup.WARP_THREADS)
        CONSUMER_THREADS = self.consumers * warpgroup.WARPGROUP_THREADS
        OFF_Q, OFF_K, OFF_V, OFF_BARS = (self.smem.offsets[k] for k in ("q", "k", "v", "barriers"))
        OFF_O = self.smem.offsets["o"] if self.tma_store else OFF_Q
        RING, Q_RING = pipeline.barrier_bytes(STAGES), pipeline.barrier_bytes(Q_STAGES)

        @cuda.jit(device=True, forceinline=True)
        def flash_forward(p):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            k_bars = base + OFF_BARS
            sh = SharedRegions(k_bars, k_bars + RING, k_bars + 2 * RING, k_bars + 2 * RING + Q_RING,
                               base + OFF_Q, base + OFF_K, base + OFF_V, base + OFF_O)
            if cuda.threadIdx.x == 0:
                pipeline.init(sh.k_bars, STAGES, CONSUMER_WARPS)
                pipeline.init(sh.v_bars, STAGES, CONSUMER_WARPS)
                pipeline.init(sh.q_bars, Q_STAGES, CONSUMER_THREADS)  # (every consumer thread: mainloop)
                mbarrier.fence_init()
            cuda.syncthreads()
            run(p, sh)
        return flash_forward

    def tensor_maps(self, q, k, v, o):
        """4-D maps (D, heads, seqlen, batch) of Q, K, V, O; strides in bytes."""
        cols = self.chunk_cols
        return (bshd_spec(q, cols, self.block_m), bshd_spec(k, cols, self.block_n),
                bshd_spec(v, cols, self.block_n), bshd_spec(o, cols, WGMMA_M))

    def launch(self, table, lse_ptr, o, batch, heads, heads_k, sq_max, sk_max, window, softmax_scale, softcap,
               stream, cu_seqlens=(0, 0), lse_strides=None, total=(0, 0), trace=0):
        """o: TensorInfo of the output ([B, S, H, D], or [T, H, D] packed); lse [B, H, S] or, with
        varlen, [H, T]; sq_max/sk_max: the (longest) sequence lengths; trace: the trace buffer's
        address (trace builds; `trace.buffer_slots` int64 entries for the grid)."""
        m_blocks = -(-sq_max // self.block_m)
        tiles = m_blocks * heads * batch
        grid = scheduler.persistent_grid(tiles, launch.sm_count())
        section, tail = 1, 0  # (unused without a causal mask)
        if self.mask_kind == mask.MASK_CAUSAL:
            section, tail = tile_scheduler.causal_order(m_blocks, heads * batch, grid, sk_max, self.head_dim,
                                                        heads // heads_k)
        tanh_scale, exp_scale = softmax.softcap_scales(softmax_scale, softcap)
        st = o.strides
        o_strides = (st[0], st[1], 0) if self.varlen else (st[1], st[2], st[0])
        if lse_strides is None:
            lse_strides = (heads * sq_max, sq_max)
        stream = launch.stream_handle(stream)
        self.launch_with(grid, stream, ForwardParams(
            table, lse_ptr, scheduler.tile_counters.get(stream), o.ptr, cu_seqlens[0], cu_seqlens[1], batch, heads,
            heads // heads_k, sq_max, sk_max, total[0], total[1], m_blocks, section, tail, window[0], window[1],
            np.float32(exp_scale * softmax.LOG2E), np.float32(exp_scale), np.float32(tanh_scale), *o_strides,
            *lse_strides, trace))


@functools.lru_cache(maxsize=None)
def forward_kernel(dtype, head_dim, mask_kind, schedule=FULL_SCHEDULE, softcap=False, varlen=False,
                   long_queries=False):
    return FlashForward(dtype, head_dim, mask_kind, schedule, softcap=softcap, varlen=varlen,
                        long_queries=long_queries)
