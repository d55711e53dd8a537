"""The FlashAttention-3 backward kernel: dK and dV per key block in registers, dQ added into a
float32 workspace (TMA reduce-adds from shared memory), warp-specialized and TMA-fed like the
forward (FA3 section 3, its `hopper/` backward).

A kernel class composed of the library's collectives:
- the producer (`backward_producer`): one warp loads each tile's K and V, then streams the query
  blocks that see it (Q, dO and their LSE and D rows) through a ring of stages on mbarriers
  (`primitives.pipeline`, `primitives.tma_load`);
- the consumers (`backward_mainloop`): two warpgroups of 64 keys each, their GEMMs issued by
  `primitives.mma` (S^T, dP^T from shared memory; dV, dK with P^T, dS^T from registers; dQ with
  dS^T through shared memory, staged by `primitives.epilogue.stmatrix_stager`), the mask of
  `mask` on transposed fragments, dK and dV stored by `primitives.epilogue.row_storer`; at
  D = 256 (`tiles.SPLIT_COLUMNS`) the two share a 64-key block and each keeps half of D's
  columns of dK and dV, P^T and dS^T meeting in shared memory;
- the scheduler: dynamic persistent tiles (`primitives.scheduler`) of (key block, key head,
  batch), key blocks fastest (`tile_scheduler.key_block_coords`); a tile runs every query head
  of its key head's group, so GQA's dK and dV are sums in registers, not atomics.
The preprocess (D = rowsum(dO * O), LSE in log2 units, the dQ workspace zeroed) and the
postprocess (dQ to the input dtype, scaled) are `backward_prep`'s kernels; `api` runs the three.
"""
import functools
from collections import namedtuple

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, mma, pipeline, scheduler, smem, tensors, warpgroup
from numba_fa3.primitives.mma import WGMMA_M
from numba_fa3.primitives.tma_desc import bshd_spec
from numba_fa3.ptx_inline import mbarrier, special
from . import backward_prep, mask, softmax, tile_scheduler
from .backward_mainloop import make_backward_mainloop
from .backward_producer import STAT_BYTES, make_backward_producer
from .tiles import SPLIT_COLUMNS, backward_tiles_for

#: Bytes per element of Q, K, V, dO and the gradients (bf16 or fp16).
ELEMENT_BYTES = 2

_U64, _I32, _F32, _I64 = types.uint64, types.int32, types.float32, types.int64
#: The kernel's scalar parameters: the descriptor table (Q, K, V, dO maps), the preprocess's
#: workspaces (LSE in log2 units, D, the float32 dQ, the deterministic mode's semaphores), the
#: tile counter, cu_seqlens (0 when dense), dK and dV, shapes, the window, the scales, the
#: workspaces' row strides (rows) and dK's and dV's strides (elements).
BackwardParams = launch.params("BackwardParams", [
    ("maps", _U64), ("lse_ptr", _U64), ("delta_ptr", _U64), ("dq_ptr", _U64), ("sem_ptr", _U64),
    ("counter", _U64), ("cu_q", _U64), ("cu_k", _U64), ("dk_ptr", _U64), ("dv_ptr", _U64),
    ("batch", _I32), ("heads", _I32), ("heads_k", _I32), ("head_ratio", _I32), ("sq_max", _I32),
    ("sk_max", _I32), ("total_q", _I32), ("total_k", _I32), ("n_blocks", _I32), ("m_blocks", _I32),
    ("left", _I32), ("right", _I32), ("last_tile", _I32),
    ("scale_log2", _F32), ("softcap_scale", _F32), ("grad_scale", _F32),
    ("ws_batch_stride", _I64), ("ws_head_stride", _I64),
    ("dk_row_stride", _I64), ("dk_head_stride", _I64), ("dk_batch_stride", _I64),
    ("dv_row_stride", _I64), ("dv_head_stride", _I64), ("dv_batch_stride", _I64)])

#: Shared addresses: the Q/dO ring's and K/V's barriers, the tile-id slot, the tiles, P^T's tiles
#: (split by columns; else 0) and dQ's staging tiles (dq_bulk; else 0).
SharedRegions = namedtuple("SharedRegions", "q_bars kv_bars tile_slots q do stats k v ds p dq")
#: dQ's float32 staging boxes: 32 columns (one 128-byte swizzle row) by the block's rows.
DQ_BOX_COLS, ACC_BYTES = smem.SWIZZLE_BYTES // 4, 4


class FlashBackward(launch.HopperKernel):
    """One backward specialization: dtype, head dim, mask kind, soft-cap, varlen, deterministic."""

    PARAMS = BackwardParams
    #: Order of the tensor maps in the launch's descriptor table.
    MAP_Q, MAP_K, MAP_V, MAP_DO, MAP_DQ = range(5)

    def __init__(self, dtype="bf16", head_dim=128, mask_kind=mask.MASK_NONE, softcap=False, varlen=False,
                 deterministic=False, tiles=None):
        if dtype not in ("bf16", "f16"):
            raise ValueError(f"dtype must be bf16 or f16, got {dtype}")
        t = tiles or backward_tiles_for(head_dim)
        self.dtype, self.head_dim, self.mask_kind, self.tiles = dtype, head_dim, mask_kind, t
        self.masked = mask_kind != mask.MASK_NONE
        self.softcap, self.varlen, self.deterministic = bool(softcap), bool(varlen), bool(deterministic)
        # deterministic with a mask: dQ's adds per query block in descending key-block order, and
        # tiles claimed last key block first (docs/decisions.md, "The backward")
        self.descending = self.deterministic and self.masked
        # deterministic without a mask: each key block's walk over the query blocks rotated, so
        # that the blocks do not wait in a wavefront (`tile_scheduler.rotation`)
        self.rotated = self.deterministic and not self.masked
        self.block_m, self.block_n, self.stages, self.consumers = t.block_m, t.block_n, t.stages, t.consumers
        self.columns = t.split == SPLIT_COLUMNS
        # one K/V buffer: a second (the next tile's K and V loading under this tile) measured
        # within +-1.5% either way (docs/decisions.md, "The backward")
        self.kv_stages = 1
        if self.consumers != 2:
            raise ValueError("the backward's dQ split and dS buffer parity assume two consumer warpgroups")
        # dQ = dS K is one m64 wgmma, so a query block of any other height computes dQ^T = K^T dS
        # (M: the warpgroup's 64 of D's columns, N: the block's queries; FA3's dQ_swapAB)
        self.dq_t = self.block_m != WGMMA_M
        self.threads = warpgroup.block_threads(self.consumers)
        self.registers = warpgroup.check_budget(t.producer_registers, t.consumer_registers, self.consumers)
        self.chunk_bytes = smem.SWIZZLE_BYTES
        self.chunk_cols = smem.SWIZZLE_BYTES // ELEMENT_BYTES
        self.chunks = -(-head_dim // self.chunk_cols)
        self.q_chunk = self.block_m * smem.SWIZZLE_BYTES
        self.kv_chunk = self.block_n * smem.SWIZZLE_BYTES
        self.qd_bytes = self.chunks * self.q_chunk
        self.kv_bytes = self.chunks * self.kv_chunk
        # dS^T (and P^T, split by columns): block_n rows (keys) of block_m 16-bit columns
        # (queries), one 128-byte row each
        self.ds_bytes = self.block_n * self.block_m * ELEMENT_BYTES
        self.stats_stage_bytes = 2 * self.block_m * STAT_BYTES
        half = head_dim // self.consumers
        if self.columns:
            # each warpgroup: S^T and dP^T of all 64 keys by its share of the block's queries, dK,
            # dV and dQ over its share of D: whole 64-column chunks of the MN-major Q, dO and K,
            # as even as they go (D = 192: 128 and 64 columns), warpgroup w's from w x col_stride
            chunks = head_dim // self.chunk_cols
            per = -(-chunks // self.consumers)
            shares = tuple(min(per, chunks - w * per) * self.chunk_cols for w in range(self.consumers))
            if head_dim % self.chunk_cols or min(shares) <= 0 or self.block_m % (self.consumers * 16):
                raise ValueError(f"head dim {head_dim}, block_m {self.block_m}: a column split needs whole "
                                 f"{self.chunk_cols}-column chunks for every warpgroup and 16-query parts")
            self.col_shares, self.col_stride = shares, per * self.chunk_cols
            self.s_cols, self.kv_cols = self.block_m // self.consumers, shares[0]
            self.dq_split, self.dq_cols = True, shares[0]
        else:
            self.s_cols, self.kv_cols = self.block_m, head_dim
            # dQ's columns split between the warpgroups where each half is whole 64-column
            # chunks (K's MN-major chunks); else each warpgroup does all of dQ every other query
            # block
            self.dq_split = half % self.chunk_cols == 0
            self.dq_cols = half if self.dq_split else head_dim
            self.col_shares, self.col_stride = (self.dq_cols,) * self.consumers, self.dq_cols
        # dQ's float32 staging: each warpgroup's share, col_stride columns apart, of the block's rows
        self.dq_stage_bytes = self.block_m * self.col_stride * ACC_BYTES
        self.dq_box_cols, self.dq_box_bytes = DQ_BOX_COLS, self.block_m * smem.SWIZZLE_BYTES
        # dQ through shared memory and TMA reduce-adds where its staging tiles fit; the
        # deterministic mode keeps its ordered reductions from registers (a bulk add's
        # completion would gate each semaphore release), and so does D = 256, whose two Q/dO
        # stages leave no room for the staging tiles
        self.dq_bulk = not self.deterministic and self._plan(True).bytes <= smem.MAX_DYNAMIC_SMEM
        if self.dq_t and (self.columns or not self.dq_split or not self.dq_bulk or self.block_m % 16):
            raise ValueError(f"query blocks of {self.block_m} rows (dQ^T = K^T dS) need whole 16-row k-steps, "
                             "dQ's columns split by key warpgroups and its bulk adds: not at head dim "
                             f"{head_dim}{' in the deterministic mode' if self.deterministic else ''}")
        self.smem = self._plan(self.dq_bulk).check()
        sched = tile_scheduler.tile_scheduler(False, self.varlen)
        self.seq = sched.seq
        self.workspace_row = backward_prep.block_row(self.block_m, self.varlen)

    @property
    def sdp(self):
        """S^T = K_w Q^T and dP^T = V_w dO^T: A the warpgroup's 64 rows of K (V), B Q (dO), K-major
        (split by columns: B the warpgroup's s_cols rows of Q, dO)."""
        return mma.warpgroup_mma(self.s_cols, self.dtype, self.head_dim, mma.Operand("k", self.kv_chunk),
                                 mma.Operand("k", self.q_chunk))

    def dkv_mma(self, cols):
        """dV += P^T dO and dK += dS^T Q over `cols` of D: A from registers (split by columns:
        P^T's and dS^T's shared tiles, K-major, both warpgroups' parts), B (dO, Q; split by
        columns the warpgroup's columns of them) MN-major."""
        a = mma.Operand("k", self.ds_bytes) if self.columns else mma.REGISTERS
        return mma.warpgroup_mma(cols, self.dtype, self.block_m, a, mma.Operand("mn", self.q_chunk))

    def dqt_mma(self):
        """dQ^T = K^T dS over the warpgroup's 64 of D's columns (M) by the block's queries (N): A
        K's chunk of those columns read MN-major (D contiguous), B dS stored [query][key], K-major
        (`epilogue.stmatrix_transposed_stager`; its 64-key chunks block_m rows apart)."""
        return mma.warpgroup_mma(self.block_m, self.dtype, self.block_n, mma.Operand("mn", self.kv_chunk),
                                 mma.Operand("k", self.q_chunk))

    def dq_mma(self, cols):
        """dQ = dS K over `cols` of D: A dS^T's tile read MN-major (queries contiguous), B K
        MN-major."""
        return mma.warpgroup_mma(cols, self.dtype, self.block_n, mma.Operand("mn", self.ds_bytes),
                                 mma.Operand("mn", self.kv_chunk))

    def _plan(self, dq_bulk):
        plan = smem.SharedLayout()
        plan.add("k", self.kv_stages * self.kv_bytes)
        plan.add("v", self.kv_stages * self.kv_bytes)
        plan.add("q", self.stages * self.qd_bytes)
        plan.add("do", self.stages * self.qd_bytes)
        plan.add("ds", 2 * self.ds_bytes)
        if self.columns:
            plan.add("p", 2 * self.ds_bytes)
        dq_bytes = self.block_m * sum(self.col_shares) * ACC_BYTES
        if self.dq_t:
            # the stats behind dQ's staging: before it, dQ's 1024-byte alignment would take the
            # last kilobyte there is
            plan.add("dq", dq_bytes, align=smem.ATOM_BYTES)
            plan.add("stats", self.stages * self.stats_stage_bytes, align=smem.SWIZZLE_BYTES)
        else:
            plan.add("stats", self.stages * self.stats_stage_bytes, align=smem.SWIZZLE_BYTES)
            if dq_bulk:
                plan.add("dq", dq_bytes, align=smem.ATOM_BYTES)
        # the Q/dO ring's and the K/V ring's barriers, and a tile-id slot per K/V buffer
        plan.add("barriers", pipeline.barrier_bytes(self.stages) + pipeline.barrier_bytes(self.kv_stages)
                 + self.kv_stages * smem.MBARRIER_BYTES, align=smem.MBARRIER_BYTES)
        return plan

    def body(self):
        run = warpgroup.specialize(make_backward_producer(self), make_backward_mainloop(self), self.registers,
                                   narrow_index=True)
        STAGES = self.stages
        CONSUMER_THREADS = self.consumers * warpgroup.WARPGROUP_THREADS
        off = self.smem.offsets
        OFF_Q, OFF_DO, OFF_STATS, OFF_K, OFF_V, OFF_DS, OFF_BARS = (
            off[k] for k in ("q", "do", "stats", "k", "v", "ds", "barriers"))
        OFF_DQ = off["dq"] if self.dq_bulk else 0
        OFF_P = off["p"] if self.columns else 0
        KV_STAGES = self.kv_stages
        RING, KV_RING = pipeline.barrier_bytes(STAGES), pipeline.barrier_bytes(KV_STAGES)

        @cuda.jit(device=True, forceinline=True)
        def flash_backward(p):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            q_bars = base + OFF_BARS
            sh = SharedRegions(q_bars, q_bars + RING, q_bars + RING + KV_RING, base + OFF_Q, base + OFF_DO,
                               base + OFF_STATS, base + OFF_K, base + OFF_V, base + OFF_DS,
                               base + OFF_P, base + OFF_DQ)
            if cuda.threadIdx.x == 0:
                # every consumer thread arrives on the empty barriers (its own shared reads)
                pipeline.init(sh.q_bars, STAGES, CONSUMER_THREADS)
                pipeline.init(sh.kv_bars, KV_STAGES, CONSUMER_THREADS)
                mbarrier.fence_init()
            cuda.syncthreads()
            run(p, sh)
        return flash_backward

    def tensor_maps(self, q, k, v, do, ws=None):
        """4-D maps (D, heads, seqlen, batch) of Q, K, V, dO; with dq_bulk, the dQ workspace
        `ws` (`backward_prep.Workspace`) as (D, rows) in boxes of 32 columns by block_m rows.
        Strides in bytes."""
        cols = self.chunk_cols
        maps = (bshd_spec(q, cols, self.block_m), bshd_spec(k, cols, self.block_n),
                bshd_spec(v, cols, self.block_n), bshd_spec(do, cols, self.block_m))
        if self.dq_bulk:
            d = self.head_dim
            maps += (("f32", tensors.device_ptr(ws.dq_accum), (d, ws.rows), (d * ACC_BYTES,),
                      (DQ_BOX_COLS, self.block_m)),)
        return maps

    def launch(self, table, ws, sem_ptr, dk, dv, batch, heads, heads_k, sq_max, sk_max, window, softmax_scale,
               softcap, stream, cu_seqlens=(0, 0), total=(0, 0)):
        """ws: the `backward_prep.Workspace`; dk, dv: TensorInfo of the outputs ([B, S, Hk, D],
        or [T, Hk, D] packed); sem_ptr: the deterministic mode's zeroed int32 semaphores
        ([B, H, m_blocks]; 0 otherwise)."""
        n_blocks = -(-sk_max // self.block_n)
        m_blocks = -(-sq_max // self.block_m)
        tiles = n_blocks * heads_k * batch
        grid = scheduler.persistent_grid(tiles, launch.sm_count())
        tanh_scale, exp_scale = softmax.softcap_scales(softmax_scale, softcap)

        def strides(t):
            st = t.strides
            return (st[0], st[1], 0) if self.varlen else (st[1], st[2], st[0])
        stream = launch.stream_handle(stream)
        ptr = tensors.device_ptr
        self.launch_with(grid, stream, BackwardParams(
            table, ptr(ws.lse_log2), ptr(ws.delta), ptr(ws.dq_accum), sem_ptr,
            scheduler.tile_counters.get(stream), cu_seqlens[0], cu_seqlens[1], dk.ptr, dv.ptr,
            batch, heads, heads_k, heads // heads_k, sq_max, sk_max, total[0], total[1], n_blocks, m_blocks,
            window[0], window[1], tiles - 1, np.float32(exp_scale * softmax.LOG2E), np.float32(tanh_scale),
            np.float32(softmax_scale), ws.batch_stride, ws.head_stride, *strides(dk), *strides(dv)))


@functools.lru_cache(maxsize=None)
def backward_kernel(dtype, head_dim, mask_kind, softcap=False, varlen=False, deterministic=False):
    return FlashBackward(dtype, head_dim, mask_kind, softcap=softcap, varlen=varlen, deterministic=deterministic)
