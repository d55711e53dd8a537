"""The FlashAttention-3 forward kernel: warp-specialized, TMA-fed, wgmma on both GEMMs.

One producer warp loads the Q tile once per work tile (into one of two buffers where shared
memory allows, so the next tile's Q lands during this one) and K/V tiles into a ring of shared-
memory stages (separate K and V barriers, so S = Q K^T starts before V lands).  Two or three
consumer warpgroups own 64 query rows each: S = Q K^T (wgmma, both operands from shared memory),
the online softmax in fp32 registers, P converted to bf16/fp16 in registers and O += P V (wgmma
with A from registers).  Key blocks are walked from the last to the first, so masked boundary
blocks come first; the blocks that need the mask (`mask.needs_mask`) run a copy of the loop
step with the mask, those between (`mask.unmasked_range`) a loop of the plain copy.  Q's buffer is released as soon as the tile's last S GEMM is done; the epilogue
scales O by 1/l and writes it by TMA store from its own shared buffer (or, where none fits, and
for varlen, by row-checked 16-byte stores from registers, or with `Tiles.o_through_v` by TMA store
from the V stages, FA3's way), then the LSE.

Scheduling (FA3 section 3): the consumer warpgroups ping-pong (round robin) on named barriers,
and within a warpgroup the S GEMM of the next key block is in flight during the softmax of the
current one, which itself runs under the P V GEMM of the block before; `Schedule` switches each
off for the ablation.  Work tiles (m_block, head, batch) come from a dynamic persistent scheduler
(`scheduler.claim_next`); causal runs go through L2-sized sections of (batch, head) pairs,
longest tiles first across each section, and short ones pair by pair, ending on a section of
their last pairs (`_tile_coords`, `causal_tail`).  `trace=True` builds the
kernel with %clock64 timestamps for `python -m bench trace`.
"""
import dataclasses
import enum
import functools
from dataclasses import dataclass

import numpy as np
from numba import cuda, types

from primitives import launch, pipeline, scheduler, smem, warpgroup
from primitives.intmath import udivmod32
from primitives.fragment import (REGS_PER_GROUP, SECOND_ROW_REG, after, exp2_regs, mask_cols, pack_bf16,
                                 pack_f16, quad_transpose, scale_regs, scale_rows, tanh_rows, zero_after, zeros)
from primitives.tma_desc import TENSOR_MAP_BYTES
from primitives.unroll import constexpr, static_range, unrolled
from ptx_inline import barrier, cluster, mbarrier, memory, regs, special, tma, wgmma
from . import mask, softmax
from .tiles import tiles_for


#: CTAs per cluster in the multicast kernel, and the CTA mask its K/V loads go to (both).
MULTICAST_CTAS = 2
MULTICAST_MASK = (1 << MULTICAST_CTAS) - 1

#: m64 rows per consumer warpgroup; K of one 16-bit wgmma; columns in one 128B swizzle row.
WGMMA_M, WGMMA_K = 64, 16
CHUNK_COLS = smem.SWIZZLE_BYTES // 2
ELEMENT_BYTES = 2
#: The K and V bytes one causal section of (batch, head) pairs may hold.  The longest-first order
#: runs each query block across all of a section's pairs, so the CTAs running at one time touch
#: the whole section's K and V: a third of the H100's 50 MB L2 (FA3's formula counts each head's
#: K and V twice against 32 MB: the same), not two thirds.  H100, interleaved against 32 MB:
#: hdim 64 causal 2k +3.1% (ncu had ours reading 16% more from DRAM than FA3 there), elsewhere
#: within +-0.3%, except where a section of one head held fewer tiles than the grid has CTAs
#: (hdim 256 causal 16k -2.4%): sections hold at least a grid of tiles (`l2_section`).
L2_SECTION_BYTES = 16 << 20
#: Causal runs with fewer query blocks than this keep the pair-by-pair order: there, the CTAs that
#: run one pair's few tiles side by side share its K and V as they load (H100, 512 tokens: 308 vs
#: 268 TFLOPS at hdim 128, 226 vs 208 at hdim 64; 2k: sections 531 vs 508).
SECTION_MIN_M_BLOCKS = 16

#: The lazy rescale's largest threshold (Tiles.rescale_threshold): P then reaches 2^8 = 256,
#: far inside fp16's range (65504) and with bf16's/fp16's relative precision unchanged.
MAX_RESCALE_THRESHOLD = 8.0
#: Where the epilogue puts O (FlashForward._plan's o_place): its own shared buffer and a TMA store; the V
#: stages and a TMA store (Tiles.o_through_v); or 16-byte stores from registers.
O_OWN, O_THROUGH_V, O_REGISTERS = 1, 2, 0


class NamedBarrier(enum.IntEnum):
    """Id 0 is __syncthreads.  Each consumer warpgroup syncs its epilogue on its own id; the
    ping-pong schedule gives each warpgroup a barrier that the one before it (round robin)
    arrives at when it has issued its GEMMs (FA3 section 3.1, "pingpong scheduling")."""
    EPILOGUE_WG0 = 1
    EPILOGUE_WG1 = 2
    EPILOGUE_WG2 = 3
    SCHEDULER_WG0 = 4
    SCHEDULER_WG1 = 5
    SCHEDULER_WG2 = 6
    #: every consumer warpgroup: O through the V stages (Tiles.o_through_v) may overwrite them
    #: once all of them have finished their last P V
    EPILOGUE_ALL = 7


#: consumer warpgroups the barriers above provide for
MAX_CONSUMERS = 3


@dataclass(frozen=True)
class Schedule:
    """The two scheduling techniques, each switchable for the ablation (FA3 Table 2).
    pingpong: the consumer warpgroups take turns issuing GEMMs, so one's softmax runs under the
    other's GEMMs.  overlap: within a warpgroup, the S GEMM of the next block is in flight while
    the softmax of the current one runs."""
    pingpong: bool = True
    overlap: bool = True


FULL_SCHEDULE = Schedule()


class TraceEvent(enum.IntEnum):
    """A consumer warpgroup's timestamps (%clock64) in the trace build, per CTA and work tile:
    waiting for Q, tile start, first S done, main loop done, last P V done, epilogue done; and
    the tile's key-block count."""
    WAIT_Q = 0
    TILE = 1
    FIRST_S = 2
    LOOP_END = 3
    LAST_PV = 4
    DONE = 5
    BLOCKS = 6


class ProducerEvent(enum.IntEnum):
    """The producer's: waiting for Q's buffer, Q's buffer free, Q and the tile's first K issued,
    next tile claimed, last V issued."""
    WAIT_Q = 0
    Q_FREE = 1
    FIRST_K = 2
    CLAIMED = 3
    LAST_V = 4


class LoopEvent(enum.IntEnum):
    """A consumer warpgroup's timestamps in each of the first `TRACE_LOOP_STEPS` steps of the
    overlapped main loop (or, with FlashForward.TRACE_LOOP_TAIL, the last ones, step 0 last), into
    the buffer passed as cu_seqlens_k: K landed, its turn on the tensor cores came, S landed, the
    softmax is done, P V landed."""
    K_READY = 0
    TURN = 1
    S_READY = 2
    SOFTMAX = 3
    PV_DONE = 4


TRACE_TILES, TRACE_EVENTS, TRACE_ROLES = 64, 8, 1 + MAX_CONSUMERS
TRACE_LOOP_STEPS, TRACE_LOOP_EVENTS = 64, 5


def _tracer(enabled):
    @cuda.jit(device=True, forceinline=True)
    def mark(buf, role, n, event, value):
        """Record `value` for (this CTA, role, tile n, event); tiles past TRACE_TILES share the last
        slot.  Compiles to nothing unless the kernel is a trace build."""
        if enabled:
            row = (cuda.blockIdx.x * TRACE_ROLES + role) * TRACE_TILES + min(n, TRACE_TILES - 1)
            memory.st_global_b64(buf + (row * TRACE_EVENTS + event) * 8, value)
    return mark


def _loop_tracer(enabled):
    @cuda.jit(device=True, forceinline=True)
    def mark_step(buf, wg, n, step, event):
        if enabled:
            if n < TRACE_TILES and step < TRACE_LOOP_STEPS:
                row = ((cuda.blockIdx.x * MAX_CONSUMERS + wg) * TRACE_TILES + n) * TRACE_LOOP_STEPS + step
                memory.st_global_b64(buf + (row * TRACE_LOOP_EVENTS + event) * 8, special.clock64())
    return mark_step


class Maps(enum.IntEnum):
    """Order of the tensor maps in the launch's descriptor table."""
    Q = 0
    K = 1
    V = 2
    O = 3


class FlashForward(launch.HopperKernel):
    """One forward specialization: dtype, head dim, mask kind, soft-cap or not, varlen or not."""

    L2_SECTION_BYTES = L2_SECTION_BYTES  # class attributes, so a tuning experiment can override them
    CAUSAL_TAIL_WAVES = 2  # short causal runs: waves of tiles at the end ordered longest first (`causal_tail`)
    PREFETCH_Q = True
    LATE_RESCALE = None  # None: the tiles table's choice (Tiles.late_rescale)
    MULTICAST = False  # K/V multicast in CTA pairs: measured no faster (bench/NOTES.md, session 5)
    TRACE_LOOP_TAIL = False  # trace build: record each tile's last loop steps, not its first
    WAIT_SUSPEND_NS = 0  # >0: mbarrier waits pass try_wait this suspend-time hint (0: none)
    INTERLEAVED_RESCALE = None  # None: the tiles table's choice (Tiles.interleaved_rescale)
    SPLIT_ROW_MAX = False  # the second row's max after the first row's exponent base (A/B knob)
    HOIST_Q_DESCRIPTORS = None  # None: the tiles table's choice (Tiles.hoist_q_descriptors), else bool or int
    UNIFORM_PIPELINE = None  # None: the tiles table's choice (Tiles.uniform_pipeline)
    RESCALE_ROUNDS = None  # interleaved rescale: O's multiplies in this many parts (None: Tiles.rescale_rounds)
    EXP2_BEFORE_PV_WAIT = None  # interleaved rescale: P registers exponentiated before the P V wait (None: one round's share)
    Q_IN_REGISTERS = None  # None: the tiles table's choice (Tiles.q_in_registers)
    SKIP_RESCALE_BOUND = False  # experiment only, WRONG output: O never rescaled (the rescale's cost)
    RESCALE_THRESHOLD = None  # the lazy rescale's threshold, powers of 2 (None: Tiles.rescale_threshold; 0: off)
    PINGPONG = None  # None: the schedule's (Schedule.pingpong); an A/B knob over every kernel
    SEQUENTIAL_MASK_LOOPS = None  # None: the tiles table's choice (Tiles.sequential_mask_loops)
    LAZY_TAIL_AFTER_WAIT = None  # None: the tiles table's choice (Tiles.lazy_tail_after_wait)
    O_THROUGH_V = None  # None: the tiles table's choice (Tiles.o_through_v)

    def __init__(self, dtype="bf16", head_dim=128, mask_kind=mask.MASK_NONE, schedule=FULL_SCHEDULE,
                 tiles=None, softcap=False, varlen=False, trace=False, long_queries=False):
        """tiles: a `tiles.Tiles` to use instead of the table's (for tuning experiments).
        long_queries: take `tiles.LONG_TILES`' entry where there is one (`tiles.has_long_tiles`).
        varlen: sequences packed along one token axis, delimited by cu_seqlens (see api).
        trace: record `TraceEvent` timestamps per CTA, role and tile into the buffer passed as
        cu_seqlens_q (dense only; `bench trace` reads it)."""
        if trace and varlen:
            raise ValueError("the trace build is dense-only: it takes cu_seqlens_q's slot")
        if dtype not in ("bf16", "f16"):
            raise ValueError(f"dtype must be bf16 or f16, got {dtype}")
        t = tiles or tiles_for(head_dim, mask_kind != mask.MASK_NONE, long_queries)
        if self.PINGPONG is not None:
            schedule = dataclasses.replace(schedule, pingpong=bool(self.PINGPONG))
        self.dtype, self.head_dim, self.mask_kind, self.schedule = dtype, head_dim, mask_kind, schedule
        self.softcap, self.varlen, self.trace = bool(softcap), bool(varlen), bool(trace)
        self.tiles = t
        self.block_m, self.block_n, self.stages = t.block_m, t.block_n, t.stages
        self.consumers = t.consumers
        # Where O is rescaled (Tiles.late_rescale, .interleaved_rescale); an override of either
        # knob wins over the table, and interleaved implies late.
        late, interleaved = t.late_rescale or t.interleaved_rescale, t.interleaved_rescale
        if self.LATE_RESCALE is not None:
            late = bool(self.LATE_RESCALE)
            interleaved = interleaved and late
        if self.INTERLEAVED_RESCALE is not None:
            interleaved = bool(self.INTERLEAVED_RESCALE)
            late = late or interleaved
        self.late_rescale, self.interleaved_rescale = late, interleaved
        uniform = t.uniform_pipeline if self.UNIFORM_PIPELINE is None else bool(self.UNIFORM_PIPELINE)
        self.uniform_pipeline = uniform and interleaved
        hoist = t.hoist_q_descriptors if self.HOIST_Q_DESCRIPTORS is None else self.HOIST_Q_DESCRIPTORS
        # (Q in registers is wrong under the no-overlap ablation's loop: ptxas 13.0 gives the
        # fragments' registers to P and the mask's index math inside that loop, though the PTX
        # keeps them live across it (hdim 128 causal read max error 0.86 on the H100; bench
        # sass.a_fragment_clobbers finds it, tests/test_bench_sass.py).  That kernel keeps Q in
        # shared memory.)
        q_regs = t.q_in_registers if self.Q_IN_REGISTERS is None else self.Q_IN_REGISTERS
        self.q_in_registers = bool(q_regs) and schedule.overlap
        threshold = t.rescale_threshold if self.RESCALE_THRESHOLD is None else self.RESCALE_THRESHOLD
        if not 0 <= float(threshold) <= MAX_RESCALE_THRESHOLD:
            raise ValueError(f"rescale threshold {threshold}: P would reach 2^{threshold}; "
                             f"0 to {MAX_RESCALE_THRESHOLD} allowed")
        self.rescale_threshold = float(threshold)
        seq = t.sequential_mask_loops if self.SEQUENTIAL_MASK_LOOPS is None else self.SEQUENTIAL_MASK_LOOPS
        self.sequential_mask_loops = bool(seq)
        tail = t.lazy_tail_after_wait if self.LAZY_TAIL_AFTER_WAIT is None else self.LAZY_TAIL_AFTER_WAIT
        self.lazy_tail_after_wait = bool(tail) and self.rescale_threshold > 0 and interleaved
        steps = head_dim // WGMMA_K
        # Q's K steps whose descriptors are built once per tile (True: all; an int: the first n)
        self.hoisted_q_steps = steps if hoist is True else max(0, min(int(hoist), steps))
        self.chunks = -(-head_dim // CHUNK_COLS)        # 128-byte column chunks of a row
        # K/V multicast in clusters of two CTAs (`multicast_ok`): each CTA loads half of every
        # K/V stage's column chunks into both CTAs' shared memory, halving L2 -> SM traffic.
        self.multicast = bool(self.MULTICAST) and self.multicast_ok(mask_kind, varlen, self.chunks)
        self.cluster = MULTICAST_CTAS if self.multicast else 1
        if not 1 <= self.consumers <= MAX_CONSUMERS or self.block_m != WGMMA_M * self.consumers:
            raise ValueError(f"{self.consumers} consumer warpgroups with block_m {self.block_m}: each owns "
                             f"{WGMMA_M} rows, at most {MAX_CONSUMERS}")
        if schedule.pingpong and self.consumers < 2:
            raise ValueError("ping-pong needs at least two consumer warpgroups")
        self.threads = warpgroup.block_threads(self.consumers)
        self.registers = warpgroup.check_budget(t.producer_registers, t.consumer_registers, self.consumers)
        self.q_chunk = self.block_m * smem.SWIZZLE_BYTES
        self.kv_chunk = self.block_n * smem.SWIZZLE_BYTES
        # Q is released as soon as the tile's last S GEMM is done, so O never goes through Q's
        # buffer.  It goes out through its own buffer and TMA stores where that fits, else (D =
        # 192, 256, and varlen, whose tiles must not spill into the next sequence) by stores from
        # registers, each row checked against the sequence length.  Where there is room beside
        # that (D <= 128), Q has two buffers: the next tile's Q loads during this tile, and its
        # first S GEMM does not wait ~3000 cycles for Q after the epilogue (bench trace).
        # Where O's own buffer does not fit, Tiles.o_through_v writes O into the V stages instead
        # (FA3's `smem_o` over `smem_v`): all consumer warpgroups sync first, and the producer
        # holds the next tile's V loads until the store has read them (the `o_free` barrier).
        # Not with multicast, whose peer CTA writes into this CTA's V stages.
        through_v = t.o_through_v if self.O_THROUGH_V is None else bool(self.O_THROUGH_V)
        own = O_REGISTERS if self.varlen else O_OWN
        places = [(2, own), (1, own)]
        o_bytes, v_bytes = self.chunks * self.q_chunk, self.stages * self.chunks * self.kv_chunk
        if through_v and own == O_OWN and not self.multicast and o_bytes <= v_bytes:
            places.append((1, O_THROUGH_V))
        for q_stages, o_place in places + [(1, O_REGISTERS)]:
            plan = self._plan(q_stages, o_place)
            if plan.used + smem.ATOM_BYTES <= smem.MAX_DYNAMIC_SMEM:
                break
        self.q_stages = q_stages
        self.tma_store, self.o_through_v = o_place != O_REGISTERS, o_place == O_THROUGH_V
        self.smem = plan.check()

    def rescale_rounds(self):
        """(P's register edges, O's) of the interleaved rescale: P's first part (registers
        0..EXP2_BEFORE_PV_WAIT-1) is exponentiated before the P V wait, then round k multiplies
        O's part k and exponentiates P's part k + 1.  O's parts start on 8-column groups, so each
        holds a register of both of the thread's rows for `after`."""
        rounds = int(self.tiles.rescale_rounds if self.RESCALE_ROUNDS is None else self.RESCALE_ROUNDS)
        p_regs, o_regs = self.block_n // 2, self.head_dim // 2
        if rounds < 2 or o_regs % (rounds * REGS_PER_GROUP):
            raise ValueError(f"RESCALE_ROUNDS={rounds}: O's {o_regs} registers per thread do not split "
                             f"into that many (at least 2) parts of whole {REGS_PER_GROUP}-register groups")
        head = p_regs // rounds if self.EXP2_BEFORE_PV_WAIT is None else int(self.EXP2_BEFORE_PV_WAIT)
        if not 0 <= head <= p_regs:
            raise ValueError(f"EXP2_BEFORE_PV_WAIT={head}: P has {p_regs} registers per thread")
        rest = p_regs - head
        p_edges = (0, head) + tuple(head + k * rest // (rounds - 1) for k in range(1, rounds))
        o_edges = tuple(k * o_regs // rounds for k in range(rounds + 1))
        return p_edges, o_edges

    @staticmethod
    def multicast_ok(mask_kind, varlen, chunks):
        """Multicast needs both CTAs of a cluster on the same keys (no mask: their two m_blocks
        see every key of one (batch, head)), tiles of equal length for the static schedule that
        pairs them, dense rows, and a chunk for each CTA to load."""
        return mask_kind == mask.MASK_NONE and not varlen and chunks >= MULTICAST_CTAS

    def _plan(self, q_stages, o_place):
        q_bytes = self.chunks * self.q_chunk
        plan = smem.SharedLayout()
        plan.add("q", q_stages * q_bytes)
        plan.add("k", self.stages * self.chunks * self.kv_chunk)
        plan.add("v", self.stages * self.chunks * self.kv_chunk)
        # K, V and Q rings, per Q buffer the slot that passes the tile id (an 8-byte unit), and
        # with O through V the barrier that frees V for the next tile's loads.
        plan.add("barriers", 2 * pipeline.barrier_bytes(self.stages) + pipeline.barrier_bytes(q_stages)
                 + (q_stages + (o_place == O_THROUGH_V)) * smem.MBARRIER_BYTES, align=smem.MBARRIER_BYTES)
        if o_place == O_OWN:
            plan.add("o", q_bytes)
        elif o_place == O_THROUGH_V:
            plan.offsets["o"] = plan.offsets["v"]  # (the caller checked that O fits in V's stages)
        return plan

    # --- producer -----------------------------------------------------------------------------
    def make_load(self):
        BM, BN, STAGES, CHUNKS = self.block_m, self.block_n, self.stages, self.chunks
        Q_CHUNK, KV_CHUNK = self.q_chunk, self.kv_chunk
        Q_BYTES, KV_BYTES = CHUNKS * Q_CHUNK, CHUNKS * KV_CHUNK
        Q_STAGES, PREFETCH_Q = self.q_stages, self.PREFETCH_Q
        KV_STAGE = CHUNKS * KV_CHUNK
        MAP = TENSOR_MAP_BYTES
        CAUSAL = self.mask_kind == mask.MASK_CAUSAL
        VARLEN = self.varlen
        tile_coords = _tile_coords(CAUSAL)
        seq_info = _seq_info(VARLEN)
        TRACE = self.trace
        MULTICAST = self.multicast
        MC_LOADS = -(-CHUNKS // MULTICAST_CTAS)  # chunks one CTA loads per stage, at most
        mark = _tracer(TRACE)
        _, producer_wait = _waits(self.WAIT_SUSPEND_NS)
        THROUGH_V = self.o_through_v

        @cuda.jit(device=True, forceinline=True)
        def wait_o_free(tile_slots, n):
            """O through V (Tiles.o_through_v): the store of this CTA's tile n - 1 has read O out of
            the V stages, so tile n's V may load there.  The consumers complete one phase of
            `o_free` per tile, so tile n waits for phase n - 1.  The parity cannot alias: with O
            through V, Q has one buffer, and this tile's Q load waited for tile n - 1 to release
            it, which its consumers do after tile n - 2's epilogue (phase n - 2 is complete)."""
            mbarrier.wait_parity(tile_slots + Q_STAGES * smem.MBARRIER_BYTES, np.int32((n - 1) & 1))

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def load_block(tmap, bars, ring, index, phase, hk, row, b, col):
            # (with multicast the empty barrier counts both CTAs' consumers, and the full one
            # expects the whole stage: this CTA's chunks and its peer's)
            producer_wait(bars, STAGES, index, phase)
            if special.elect_one():
                pipeline.producer_expect(bars, index, KV_BYTES)
                full = pipeline.full_barrier(bars, index)
                if MULTICAST:
                    # chunks rank, rank + 2, ...: `ring` and `col` already point at chunk `rank`
                    # (the producer has 24 registers)
                    for j in static_range(MC_LOADS):
                        if (MC_LOADS * MULTICAST_CTAS == CHUNKS
                                or col + j * MULTICAST_CTAS * CHUNK_COLS < CHUNKS * CHUNK_COLS):
                            tma.load_multicast(ring + index * KV_STAGE + j * MULTICAST_CTAS * KV_CHUNK, tmap,
                                               (col + j * MULTICAST_CTAS * CHUNK_COLS, hk, row, b), full,
                                               MULTICAST_MASK)
                else:
                    for c in static_range(CHUNKS):
                        tma.load(ring + index * KV_STAGE + c * KV_CHUNK, tmap, (c * CHUNK_COLS, hk, row, b), full)

        @cuda.jit(device=True, forceinline=True)
        def next_tile(counter, tiles, lane, tile):
            # Multicast pairs tiles 2p and 2p + 1 (neighbouring m_blocks) in one cluster, and a
            # static schedule keeps them paired; otherwise claim dynamically.
            if MULTICAST:
                return scheduler.next_work(tile)
            return scheduler.claim_next(counter, tiles, lane)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def load(maps, counter, tile_slots, k_bars, v_bars, q_bars, cu_q, cu_k, sq_max, sk_max, total_q, total_k,
                 k_smem, v_smem, q_smem, heads, head_ratio, batch, m_blocks, section, tail, left, right, lane):
            # The whole warp runs this loop (so ptxas keeps its warp-uniform state in uniform
            # registers); one elected lane issues each TMA.
            if special.elect_one():
                for i in static_range(3):
                    tma.fence_descriptor_acquire(maps + i * MAP)
            index, phase = np.int32(0), np.int32(0)
            qi, q_phase = np.int32(0), np.int32(0)  # Q buffer
            tiles = np.int32(m_blocks * heads * batch)
            tile = scheduler.initial_work()
            # This CTA's first chunk of each K/V stage (all of them without multicast).
            col = np.int32(cluster.ctarank() * CHUNK_COLS) if MULTICAST else np.int32(0)
            k_smem = k_smem + col * (KV_CHUNK // CHUNK_COLS)
            v_smem = v_smem + col * (KV_CHUNK // CHUNK_COLS)
            n = np.int32(0)  # tiles done (trace build; O through V's barrier phase)
            while True:
                if tile >= tiles:
                    # The end: an id past the last tile (with no Q) tells the consumers to stop; it
                    # travels like a tile id, through the shared slot the Q barriers guard.
                    producer_wait(q_bars, Q_STAGES, qi, q_phase)
                    if special.elect_one():
                        memory.st_shared_b32(tile_slots + qi * smem.MBARRIER_BYTES, tile)
                        mbarrier.arrive(pipeline.full_barrier(q_bars, qi))
                    if MULTICAST:
                        # The peer's consumers arrive on this CTA's empty barriers: the CTA stays
                        # until every stage's last fill was released by both CTAs (a cluster
                        # barrier at the end instead kept the other warps alive, and ptxas then
                        # gave up this warp's uniform registers and spilled).
                        for _ in static_range(STAGES):
                            producer_wait(k_bars, STAGES, index, phase)
                            producer_wait(v_bars, STAGES, index, phase)
                            index, phase = pipeline.advance(index, phase, STAGES)
                    break
                mb, h, b = tile_coords(tile, m_blocks, heads, batch, section, tail)
                q_off, sq, k_off, sk = seq_info(cu_q, cu_k, b, sq_max, sk_max, total_q, total_k)
                if VARLEN and mb * BM >= sq:
                    # Past this sequence's end (m_blocks counts the longest): nothing to do.
                    tile = next_tile(counter, tiles, lane, tile)
                    continue
                bc = 0 if VARLEN else b
                hk, _ = udivmod32(h, head_ratio)
                n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, left, right)
                nb = np.int32(n_max - 1)
                # With one Q buffer the tile's first K goes out before Q, as in FA3: its stage was
                # freed a step before Q's buffer (the previous tile's second-to-last S GEMM vs its
                # last).  With two, this tile's Q buffer has been free for a whole tile.
                if Q_STAGES == 1 and nb >= n_min:
                    load_block(maps + Maps.K * MAP, k_bars, k_smem, index, phase, hk, k_off + nb * BN, bc, col)
                if TRACE and lane == 0:
                    mark(cu_q, 0, n, ProducerEvent.WAIT_Q, special.clock64())
                producer_wait(q_bars, Q_STAGES, qi, q_phase)
                if TRACE and lane == 0:
                    mark(cu_q, 0, n, ProducerEvent.Q_FREE, special.clock64())
                if special.elect_one():
                    memory.st_shared_b32(tile_slots + qi * smem.MBARRIER_BYTES, tile)
                    pipeline.producer_expect(q_bars, qi, Q_BYTES)
                    q_dst = q_smem + qi * Q_BYTES
                    for c in static_range(CHUNKS):
                        tma.load(q_dst + c * Q_CHUNK, maps + Maps.Q * MAP, (c * CHUNK_COLS, h, q_off + mb * BM, bc),
                                 pipeline.full_barrier(q_bars, qi))
                qi, q_phase = pipeline.advance(qi, q_phase, Q_STAGES)
                if Q_STAGES > 1 and nb >= n_min:
                    load_block(maps + Maps.K * MAP, k_bars, k_smem, index, phase, hk, k_off + nb * BN, bc, col)
                # K of block j goes out before V of block j + 1 (blocks are walked downwards): the
                # consumers' S_j GEMM is issued before their P_{j+1} V_{j+1} GEMM.  Block j's K
                # and V share stage `index`.
                if nb >= n_min:
                    if TRACE and lane == 0:
                        mark(cu_q, 0, n, ProducerEvent.FIRST_K, special.clock64())
                    v_index, v_phase = index, phase
                    index, phase = pipeline.advance(index, phase, STAGES)
                    nb = np.int32(nb - 1)
                    if constexpr(THROUGH_V):
                        # O through V: the previous tile's O is in the V stages until its store
                        # has read it.  The tile's first V load waits for that, its K loads do
                        # not: the loop's first turn is peeled (a flag carried through the loop
                        # spilled the producer's 24 registers); with a single block, the wait
                        # comes before the last V load.
                        if n > 0:
                            if nb >= n_min:
                                load_block(maps + Maps.K * MAP, k_bars, k_smem, index, phase, hk, k_off + nb * BN, bc,
                                           col)
                                wait_o_free(tile_slots, n)
                                load_block(maps + Maps.V * MAP, v_bars, v_smem, v_index, v_phase, hk,
                                           k_off + (nb + 1) * BN, bc, col)
                                v_index, v_phase = index, phase
                                index, phase = pipeline.advance(index, phase, STAGES)
                                nb = np.int32(nb - 1)
                            else:
                                wait_o_free(tile_slots, n)
                    while nb >= n_min:
                        load_block(maps + Maps.K * MAP, k_bars, k_smem, index, phase, hk, k_off + nb * BN, bc, col)
                        load_block(maps + Maps.V * MAP, v_bars, v_smem, v_index, v_phase, hk,
                                   k_off + (nb + 1) * BN, bc, col)
                        v_index, v_phase = index, phase
                        index, phase = pipeline.advance(index, phase, STAGES)
                        nb = np.int32(nb - 1)
                    # The next tile is claimed before the last V load: the atomic's round trip hides
                    # under that load, and the claim still comes when this tile is nearly done (a
                    # claim a whole tile ahead unbalanced causal runs: 616 -> 576 TFLOPS at 16k).
                    upcoming = next_tile(counter, tiles, lane, tile)
                    if TRACE and lane == 0:
                        mark(cu_q, 0, n, ProducerEvent.CLAIMED, special.clock64())
                    if Q_STAGES == 1 and PREFETCH_Q and upcoming < tiles:
                        # One Q buffer: the next Q can only load once this tile's last S GEMM is
                        # done, and from HBM (each Q is read once) the consumers waited for it
                        # (bench trace, hdim 256: ~3.7k cycles from Q free to the tile's start).
                        # Prefetched into L2 now, that load finds it there.
                        nmb, nh, nbb = tile_coords(upcoming, m_blocks, heads, batch, section, tail)
                        nq_off, nsq, _, _ = seq_info(cu_q, cu_k, nbb, sq_max, sk_max, total_q, total_k)
                        if nmb * BM < nsq and special.elect_one():
                            for c in static_range(CHUNKS):
                                tma.prefetch_l2(maps + Maps.Q * MAP,
                                                (c * CHUNK_COLS, nh, nq_off + nmb * BM, 0 if VARLEN else nbb))
                    load_block(maps + Maps.V * MAP, v_bars, v_smem, v_index, v_phase, hk, k_off + (nb + 1) * BN, bc,
                               col)
                    if TRACE and lane == 0:
                        mark(cu_q, 0, n, ProducerEvent.LAST_V, special.clock64())
                else:
                    upcoming = next_tile(counter, tiles, lane, tile)
                tile = upcoming
                n = np.int32(n + 1)
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
        HOISTED = self.hoisted_q_steps
        Q_DESCRIPTORS = smem.descriptors(tuple((kk // STEPS_PER_CHUNK) * Q_CHUNK + (kk % STEPS_PER_CHUNK) * K_STEP_BYTES
                                               for kk in range(HOISTED)))
        Q_REGS = self.q_in_registers
        QK = wgmma.mma_rs(BN, self.dtype, 0) if Q_REGS else wgmma.mma_ss(BN, self.dtype, 0)
        PV = wgmma.mma_rs(D, self.dtype, 1)
        S_ZERO, O_ZERO = zeros(BN // 2), zeros(D // 2)
        PACK = pack_bf16 if self.dtype == "bf16" else pack_f16
        WG_ROWS_BYTES = WGMMA_M * smem.SWIZZLE_BYTES
        MASKED = self.mask_kind != mask.MASK_NONE
        CAUSAL = self.mask_kind == mask.MASK_CAUSAL
        tile_coords = _tile_coords(CAUSAL)
        WG_THREADS = warpgroup.WARPGROUP_THREADS
        EPILOGUE0 = int(NamedBarrier.EPILOGUE_WG0)
        CONSUMERS = self.consumers
        SCHEDULER0 = int(NamedBarrier.SCHEDULER_WG0)
        PAIR_THREADS = 2 * WG_THREADS
        PINGPONG, OVERLAP = self.schedule.pingpong, self.schedule.overlap
        TMA_STORE, VARLEN, SOFTCAP = self.tma_store, self.varlen, self.softcap
        seq_info = _seq_info(VARLEN)
        MAP = TENSOR_MAP_BYTES
        GROUPS = D // 8
        Q_STAGES, Q_BYTES = self.q_stages, CHUNKS * Q_CHUNK
        TRACE = self.trace
        LATE_RESCALE = self.late_rescale
        INTERLEAVE = self.interleaved_rescale
        SKIP_RESCALE = bool(self.SKIP_RESCALE_BOUND)
        THRESHOLD, LAZY = self.rescale_threshold, self.rescale_threshold > 0
        P_REGS = BN // 2
        P_EDGES, O_EDGES = self.rescale_rounds()
        ROUNDS, P_HEAD = len(O_EDGES) - 1, P_EDGES[1]
        TRACE_TAIL = bool(self.TRACE_LOOP_TAIL)
        MULTICAST = self.multicast
        mark = _tracer(TRACE)
        mark_step = _loop_tracer(TRACE)
        consumer_wait, _ = _waits(self.WAIT_SUSPEND_NS)
        UNIFORM = self.uniform_pipeline
        SEQUENTIAL = self.sequential_mask_loops
        THROUGH_V = self.o_through_v
        EPILOGUE_ALL, CONSUMER_THREADS = int(NamedBarrier.EPILOGUE_ALL), self.consumers * WG_THREADS
        TAIL_AFTER_WAIT = self.lazy_tail_after_wait

        @cuda.jit(device=True, forceinline=True)
        def stage_addr(x):
            """A K/V stage's address for the wgmma descriptors, warp-uniform: ptxas knows it is when
            the loop is (Tiles.uniform_pipeline); otherwise REDUX tells it."""
            if UNIFORM:
                return np.uint32(x)
            return special.uniform_u32(x)

        @cuda.jit(device=True, forceinline=True)
        def release(bars, index, lane):
            """This warp is done reading K/V stage `index`.  With multicast both CTAs' producers
            write the stage in both CTAs, so the release goes to both CTAs' empty barriers
            (MULTICAST_CTAS = 2: the peer is rank ^ 1).  With the uniform pipeline the arrive is
            predicated, not behind a branch on the lane (Tiles.uniform_pipeline); the branchy
            form keeps the barrier's address inside the branch, as the measured kernels have it."""
            if UNIFORM:
                mbarrier.arrive_if(pipeline.empty_barrier(bars, STAGES, index), lane == 0)
            else:
                pipeline.consumer_release(bars, STAGES, index, lane)
            if MULTICAST and lane == 0:
                peer = cluster.ctarank() ^ np.uint32(1)
                cluster.arrive_remote(cluster.map_shared(pipeline.empty_barrier(bars, STAGES, index), peer))

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def q_fragments(q_wg, utid):
            """This warpgroup's Q rows as wgmma A fragments, one quad per K step: each warp's 16
            rows by ldmatrix.x4 (matrices: rows 0-7 / 8-15 by columns 0-7 / 8-15 of the step),
            lane l addressing row l % 16, column half l // 16, through the 128-byte swizzle."""
            lane = utid % np.uint32(warpgroup.WARP_THREADS)
            row = np.uint32(16) * (utid // np.uint32(warpgroup.WARP_THREADS)) + (lane & np.uint32(15))
            half = (lane >> np.uint32(4)) * np.uint32(16)
            frags = ()
            for kk in static_range(QK_STEPS):
                c, w = kk // STEPS_PER_CHUNK, kk % STEPS_PER_CHUNK
                frags = frags + (memory.ldmatrix_x4(
                    q_wg + c * Q_CHUNK + smem.swizzle_128b(row, np.uint32(w * K_STEP_BYTES) + half)),)
            return frags

        @cuda.jit(device=True, forceinline=True)
        def q_descriptors(q_wg, utid):
            """What issue_qk takes for this warpgroup's Q rows at shared address `q_wg`: the
            address, for the descriptors built per wgmma, and the hoisted ones
            (Tiles.hoist_q_descriptors); with Q_IN_REGISTERS, Q's fragments."""
            if Q_REGS:
                return q_wg, q_fragments(q_wg, utid)
            if HOISTED:
                return q_wg, Q_DESCRIPTORS(DESC_Q, q_wg)
            return q_wg, ()

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def issue_qk(q_desc, kst):
            """S = Q K^T for this warpgroup's 64 rows, issued as one wgmma group (not waited).
            `q_desc`: Q's address and its hoisted descriptors, built once per tile (`q_descriptors`)."""
            s = wgmma.fence_tied(S_ZERO)
            for kk in static_range(QK_STEPS):
                c, w = kk // STEPS_PER_CHUNK, kk % STEPS_PER_CHUNK
                if Q_REGS or kk < HOISTED:
                    qd = q_desc[1][kk]
                else:
                    qd = smem.descriptor(DESC_Q, q_desc[0], c * Q_CHUNK + w * K_STEP_BYTES)
                s = QK(s, qd,
                       smem.descriptor(DESC_K, kst, c * KV_CHUNK + w * K_STEP_BYTES), 0 if kk == 0 else 1)
            wgmma.commit_group()
            return s

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def issue_pv(o, pk, vst):
            """O += P V, P from registers, issued as one wgmma group (not waited)."""
            o = wgmma.fence_tied(o)
            for kk in static_range(PV_STEPS):
                o = PV(o, (pk[4 * kk], pk[4 * kk + 1], pk[4 * kk + 2], pk[4 * kk + 3]),
                       smem.descriptor(DESC_V, vst, kk * V_STEP_BYTES), 1)
            wgmma.commit_group()
            return o

        @cuda.jit(device=True, forceinline=True)
        def scheduler_sync(wg):
            """Ping-pong: wait for this warpgroup's turn to issue GEMMs."""
            if PINGPONG:
                barrier.sync(SCHEDULER0 + wg, PAIR_THREADS)

        @cuda.jit(device=True, forceinline=True)
        def scheduler_pass(wg):
            """Ping-pong: hand the tensor cores to the next warpgroup (its softmax is done)."""
            if PINGPONG:
                barrier.arrive(SCHEDULER0 + (wg + 1) % CONSUMERS, PAIR_THREADS)

        @cuda.jit(device=True, forceinline=True)
        def s_now(q_desc, k_bars, k_smem, index, phase, lane, wg):
            """S for the key block in stage `index`, waited for at once: a tile's first block (no
            P V to overlap yet), and every block of the no-overlap ablation."""
            consumer_wait(k_bars, index, phase)
            scheduler_sync(wg)
            s = issue_qk(q_desc, stage_addr(k_smem + index * KV_STAGE))
            scheduler_pass(wg)
            s = wgmma.wait_group_tied(0, s)
            release(k_bars, index, lane)
            return s

        @cuda.jit(device=True, forceinline=True)
        def release_q(q_empty, lane):
            """Q's buffer is free for a later tile once every consumer warp's last S GEMM completed
            (with Q_IN_REGISTERS, once its fragments are loaded: `release_q_now`)."""
            if not Q_REGS:
                release_q_now(q_empty, lane)

        @cuda.jit(device=True, forceinline=True)
        def release_q_now(q_empty, lane):
            if UNIFORM:
                mbarrier.arrive_if(q_empty, lane == 0)
            elif lane == 0:
                mbarrier.arrive(q_empty)

        @cuda.jit(device=True, forceinline=True)
        def mask_block(s, nb, col0, limits):
            """S of key block nb with the columns outside each row's [lo, hi) key range at -inf;
            limits: (lo0, hi0, lo1, hi1) of the thread's two rows."""
            lo0, hi0, lo1, hi1 = limits
            base = nb * BN
            return mask_cols(s, col0, lo0 - base, hi0 - base, lo1 - base, hi1 - base)

        @cuda.jit(device=True, forceinline=True)
        def masked_scores(s, nb, mb, sq, sk, left, right, col0, limits, softcap_scale):
            """Soft-cap, then the mask where this block needs one.  Without a mask only a tile's
            first block (its last in key order) can be ragged; the overlapped loop's steps (which
            never see that block) apply the mask themselves, see `make_step`."""
            if SOFTCAP:
                s = tanh_rows(s, softcap_scale)
            base = nb * BN
            if MASKED:
                if mask.needs_mask(nb, mb, BM, BN, sq, sk, left, right):
                    return mask_block(s, nb, col0, limits)
            elif base + BN > sk:  # (lo, hi) are (0, sk) here
                return mask_block(s, nb, col0, limits)
            return s

        @cuda.jit(device=True, forceinline=True)
        def pv_done(o, pk, v_bars, v_index, lane, tracer, cu_k, wg, n, t):
            """End of the step's softmax (as far as the trace is concerned): wait for the P V
            GEMM, then release its V stage."""
            if tracer:
                mark_step(cu_k, wg, n, t, LoopEvent.SOFTMAX)
            o, pk = wgmma.wait_group_keep(0, o, pk)
            if tracer:
                mark_step(cu_k, wg, n, t, LoopEvent.PV_DONE)
            release(v_bars, v_index, lane)
            return o, pk

        @cuda.jit(device=True, forceinline=True)
        def rescale(o, a0, a1):
            """O's rows times their factors; with the lazy rescale only where some row of the
            warp moved its max (most steps of a long row skip it)."""
            if SKIP_RESCALE:
                return o
            if LAZY:
                if softmax.any_rescaled(a0, a1):
                    o = scale_rows(o, a0, a1)
                return o
            return scale_rows(o, a0, a1)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def rescale_among_exponentials(o, p, a0, a1, b0, b1, scale_log2):
            """The interleaved rescale's rounds: O's part k multiplied, then P's part k + 1
            exponentiated with biases taken through `after` that part's first register of each
            row, so ptxas cannot sink the multiplies below the exponentials; O's last part is free."""
            for k in static_range(ROUNDS - 1):
                if not SKIP_RESCALE:
                    o = scale_regs(o, a0, a1, constexpr(O_EDGES[k]), constexpr(O_EDGES[k + 1]))
                p = exp2_regs(p, scale_log2, after(b0, o[constexpr(O_EDGES[k])]),
                              after(b1, o[constexpr(O_EDGES[k] + SECOND_ROW_REG)]),
                              constexpr(P_EDGES[k + 1]), constexpr(P_EDGES[k + 2]))
            if not SKIP_RESCALE:
                o = scale_regs(o, a0, a1, constexpr(O_EDGES[ROUNDS - 1]), constexpr(O_EDGES[ROUNDS]))
            return o, p

        def make_step(masked):
            # A plain step's block has no masked score in any row, so its row maxima are finite
            # (interleaved, with the -inf guard against without: hdim 64 causal 16k -1.4%, other
            # points within +-0.4%)
            UNMASKED_STEP = not masked
            SPLIT_MAX = bool(self.SPLIT_ROW_MAX)

            @cuda.jit(device=True, forceinline=True)
            def step(o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env):
                """One step of the overlapped main loop (FA3 section 3.2): S_nb = Q K_nb^T is in
                flight while the softmax of the previous block's S ran; P V of that block is
                issued right behind it and waited for after this block's softmax.  O is rescaled
                to the running max either before that P V (its factors a0, a1 from the previous
                block's softmax) or, with LATE_RESCALE, after its wait (with this block's), which
                keeps the 64 multiplies out of the ping-pong turn; see Tiles.late_rescale.  With
                INTERLEAVED_RESCALE the wait comes a few exponentials in (EXP2_BEFORE_PV_WAIT) and
                the multiplies are spread among the rest in RESCALE_ROUNDS parts
                (Tiles.interleaved_rescale)."""
                (q_desc, k_bars, v_bars, k_smem, v_smem, q_empty, n_min, col0, limits, softcap_scale, scale_log2, lane,
                 wg, tracer, cu_k, n, n_max) = env
                t = np.int32(nb - n_min) if TRACE_TAIL else np.int32(n_max - 2 - nb)
                consumer_wait(k_bars, index, phase)
                if tracer:
                    mark_step(cu_k, wg, n, t, LoopEvent.K_READY)
                scheduler_sync(wg)
                if tracer:
                    mark_step(cu_k, wg, n, t, LoopEvent.TURN)
                s = issue_qk(q_desc, stage_addr(k_smem + index * KV_STAGE))
                if not LATE_RESCALE:
                    o = rescale(o, a0, a1)
                consumer_wait(v_bars, v_index, v_phase)
                o = issue_pv(o, pk, stage_addr(v_smem + v_index * KV_STAGE))
                scheduler_pass(wg)
                s = wgmma.wait_group_tied(1, s)
                if tracer:
                    mark_step(cu_k, wg, n, t, LoopEvent.S_READY)
                if not UNIFORM:
                    release(k_bars, index, lane)
                    if nb == n_min:
                        release_q(q_empty, lane)
                if SOFTCAP:
                    s = tanh_rows(s, softcap_scale)
                if masked:
                    s = mask_block(s, nb, col0, limits)
                if INTERLEAVE:
                    # (the trace's softmax segment ends at the P V wait, a quarter into it)
                    m0, m1, b0, b1, a0, a1 = softmax.online_max(s, m0, m1, scale_log2, UNMASKED_STEP, SPLIT_MAX,
                                                                THRESHOLD)
                    p = exp2_regs(s, scale_log2, b0, b1, 0, P_HEAD)
                    if UNIFORM:
                        z = zero_after(p[P_HEAD - 1] if P_HEAD else b0)
                        release(k_bars + z, index, lane)
                        if nb == n_min:
                            release_q(q_empty + z, lane)
                    o, pk = pv_done(o, pk, v_bars, v_index, lane, tracer, cu_k, wg, n, t)
                    if TAIL_AFTER_WAIT:  # (implies LAZY: __init__)
                        # (the bias through O's first register of each row: ptxas must place the
                        # P V wait before these, as the eager rounds' multiplies make it)
                        p = exp2_regs(p, scale_log2, after(b0, o[0]), after(b1, o[SECOND_ROW_REG]), P_HEAD, P_REGS)
                    elif LAZY:
                        p = exp2_regs(p, scale_log2, b0, b1, P_HEAD, P_REGS)
                    else:
                        o, p = rescale_among_exponentials(o, p, a0, a1, b0, b1, scale_log2)
                    l0, l1 = softmax.online_sum(p, l0, l1, a0, a1)
                else:
                    p, m0, m1, l0, l1, a0, a1 = softmax.online_step(s, m0, m1, l0, l1, scale_log2, UNMASKED_STEP,
                                                                    SPLIT_MAX, THRESHOLD)
                    o, pk = pv_done(o, pk, v_bars, v_index, lane, tracer, cu_k, wg, n, t)
                    if LATE_RESCALE:
                        o = rescale(o, a0, a1)
                pk = PACK(p)
                if INTERLEAVE and LAZY:
                    # (last: the branch ends the step's one basic block; placed among the
                    # exponentials it split the softmax in two and cost 5-12% at hdim 64/128)
                    o = rescale(o, a0, a1)
                v_index, v_phase = index, phase
                index, phase = pipeline.advance(index, phase, STAGES)
                return o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase
            return step

        step_masked, step_plain = make_step(True), make_step(False)

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def mma(maps, lse_ptr, o_ptr, tile_slots, k_bars, v_bars, q_bars, cu_q, cu_k, sq_max, sk_max, total_q, total_k,
                k_smem, v_smem, q_smem, o_smem, heads, batch, m_blocks, section, tail, left, right, scale_log2, softmax_scale,
                softcap_scale, o_strides, lse_strides, wg, tid):
            # (unsigned 32-bit: Python's floor division and modulo on int64 took two registers
            # each and a sign fix-up, and spilled at 160 registers)
            utid = np.uint32(tid)
            lane = np.int32(utid % np.uint32(warpgroup.WARP_THREADS))
            if TMA_STORE and tid == 0:
                tma.fence_descriptor_acquire(maps + Maps.O * MAP)
            if PINGPONG and wg == CONSUMERS - 1:
                scheduler_pass(wg)  # warpgroup 0 issues first
            index, phase = np.int32(0), np.int32(0)
            qi, q_phase = np.int32(0), np.int32(0)  # Q buffer
            tiles = np.int32(m_blocks * heads * batch)
            o_wg = o_smem + wg * WG_ROWS_BYTES  # used with TMA_STORE only
            r_local = np.int32(np.uint32(16) * (utid // np.uint32(32)) + (utid % np.uint32(32)) // np.uint32(4))
            col0 = np.int32(np.uint32(2) * (utid % np.uint32(4)))
            n = np.int32(0)  # tiles done (trace build)
            tracer = TRACE and tid == 0
            while True:
                if tracer:
                    mark(cu_q, 1 + wg, n, TraceEvent.WAIT_Q, special.clock64())
                consumer_wait(q_bars, qi, q_phase)
                tile = np.int32(special.uniform_u32(memory.ld_shared_b32(tile_slots + qi * smem.MBARRIER_BYTES)))
                if tile >= tiles:
                    break
                if tracer:
                    mark(cu_q, 1 + wg, n, TraceEvent.TILE, special.clock64())
                mb, h, b = tile_coords(tile, m_blocks, heads, batch, section, tail)
                q_off, sq, k_off, sk = seq_info(cu_q, cu_k, b, sq_max, sk_max, total_q, total_k)
                q_desc = q_descriptors(q_smem + qi * Q_BYTES + wg * WG_ROWS_BYTES, utid)
                q_empty = pipeline.empty_barrier(q_bars, Q_STAGES, qi)
                if Q_REGS:
                    release_q_now(q_empty, lane)  # (the arrive's release semantics order the loads)
                offset = sk - sq
                n_min, n_max = mask.block_range(mb, BM, BN, sq, sk, left, right)
                row0 = np.int32(mb * BM + wg * WGMMA_M + r_local)
                if MASKED:
                    lo0, hi0 = mask.key_limits(row0, offset, left, right, sk)
                    lo1, hi1 = mask.key_limits(row0 + 8, offset, left, right, sk)
                    limits = (lo0, hi0, lo1, hi1)
                else:
                    limits = (np.int32(0), sk, np.int32(0), sk)
                o = O_ZERO
                m0, m1 = softmax.NEG_INF, softmax.NEG_INF
                l0, l1 = np.float32(0), np.float32(0)
                nb = np.int32(n_max - 1)
                if OVERLAP:
                    # FA3 section 3.2: S_{j} = Q K_j^T is in flight while the softmax of block
                    # j + 1 (walking downwards) runs; P_{j+1} V_{j+1} is issued right behind it.
                    if nb >= n_min:
                        s = s_now(q_desc, k_bars, k_smem, index, phase, lane, wg)
                        if tracer:
                            mark(cu_q, 1 + wg, n, TraceEvent.FIRST_S, special.clock64())
                            mark(cu_q, 1 + wg, n, TraceEvent.BLOCKS, n_max - n_min)
                        if nb == n_min:  # the tile's last S GEMM is done: Q may be reloaded
                            release_q(q_empty, lane)
                        s = masked_scores(s, nb, mb, sq, sk, left, right, col0, limits, softcap_scale)
                        p, m0, m1, l0, l1, a0, a1 = softmax.online_step(s, m0, m1, l0, l1, scale_log2)
                        pk = PACK(p)
                        v_index, v_phase = index, phase
                        index, phase = pipeline.advance(index, phase, STAGES)
                        nb = np.int32(nb - 1)
                        # what every step of the tile reads and none changes
                        env = (q_desc, k_bars, v_bars, k_smem, v_smem, q_empty, n_min, col0, limits, softcap_scale,
                               scale_log2, lane, wg, tracer, cu_k, n, n_max)
                        if MASKED:
                            # The blocks that need the mask (the diagonal's, the window's edges)
                            # run a copy of the step with the mask in it unconditionally, and the
                            # blocks between run a loop of the plain copy on its own.  A branch
                            # inside the step ended a basic block just before the softmax, and
                            # ptxas put the P V wait at the top of the softmax's block (no softmax
                            # under P V at all); choosing the copy per step instead left the plain
                            # steps ~9% slower than the unmasked kernel's (bench trace, hdim 128 8k).
                            u_min, u_max = mask.unmasked_range(mb, BM, BN, sq, sk, left, right)
                            if SEQUENTIAL:
                                # (Tiles.sequential_mask_loops) the diagonal's or right edge's
                                # blocks, the plain ones, then the left window edge's, in three
                                # loops in a row; where a range is empty its loop runs no step.
                                stop = max(n_min, u_max)
                                while nb >= stop:
                                    (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase) = step_masked(
                                        o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env)
                                    nb = np.int32(nb - 1)
                                stop = max(n_min, u_min)
                                while nb >= stop:
                                    (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase) = step_plain(
                                        o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env)
                                    nb = np.int32(nb - 1)
                                while nb >= n_min:
                                    (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase) = step_masked(
                                        o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env)
                                    nb = np.int32(nb - 1)
                            else:
                                # (the loop nest: a masked step or the plain loop, per turn)
                                while nb >= n_min:
                                    if nb >= u_max or nb < u_min:
                                        (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase) = step_masked(
                                            o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env)
                                        nb = np.int32(nb - 1)
                                    else:
                                        stop = max(n_min, u_min)
                                        while nb >= stop:
                                            (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index,
                                             v_phase) = step_plain(o, pk, m0, m1, l0, l1, a0, a1, index, phase,
                                                                   v_index, v_phase, nb, env)
                                            nb = np.int32(nb - 1)
                        else:
                            # Unmasked kernels have one copy, with no mask (only a tile's first
                            # block, outside this loop, can be ragged).
                            while nb >= n_min:
                                (o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase) = step_plain(
                                    o, pk, m0, m1, l0, l1, a0, a1, index, phase, v_index, v_phase, nb, env)
                                nb = np.int32(nb - 1)
                        if tracer:
                            mark(cu_q, 1 + wg, n, TraceEvent.LOOP_END, special.clock64())
                        if not LATE_RESCALE:
                            o = rescale(o, a0, a1)
                        consumer_wait(v_bars, v_index, v_phase)
                        o = issue_pv(o, pk, stage_addr(v_smem + v_index * KV_STAGE))
                        o, pk = wgmma.wait_group_keep(0, o, pk)
                        release(v_bars, v_index, lane)
                        if tracer:
                            mark(cu_q, 1 + wg, n, TraceEvent.LAST_PV, special.clock64())
                    else:
                        release_q(q_empty, lane)
                else:
                    # The ablation without intra-warpgroup overlap: S, softmax, PV in sequence.
                    while nb >= n_min:
                        s = s_now(q_desc, k_bars, k_smem, index, phase, lane, wg)
                        s = masked_scores(s, nb, mb, sq, sk, left, right, col0, limits, softcap_scale)
                        p, m0, m1, l0, l1, a0, a1 = softmax.online_step(s, m0, m1, l0, l1, scale_log2)
                        o = scale_rows(o, a0, a1)
                        pk = PACK(p)
                        consumer_wait(v_bars, index, phase)
                        o = issue_pv(o, pk, special.uniform_u32(v_smem + index * KV_STAGE))
                        o, pk = wgmma.wait_group_keep(0, o, pk)
                        release(v_bars, index, lane)
                        index, phase = pipeline.advance(index, phase, STAGES)
                        nb = np.int32(nb - 1)
                    release_q(q_empty, lane)
                inv0, lse0 = softmax.finish_row(m0, l0, softmax_scale)
                inv1, lse1 = softmax.finish_row(m1, l1, softmax_scale)
                po = PACK(scale_rows(o, inv0, inv1))
                if TMA_STORE:
                    if constexpr(THROUGH_V):
                        # O goes into the V stages, which every warpgroup's last P V must have
                        # read.  (This warpgroup's previous store read its part before `o_free`.)
                        barrier.sync(EPILOGUE_ALL, CONSUMER_THREADS)
                    else:
                        # The previous tile's O store must have read the buffer before it is rewritten.
                        if tid == 0:
                            tma.wait_group_read(0)
                        barrier.sync(EPILOGUE0 + wg, WG_THREADS)
                    # The swizzled addresses are rebuilt here, per tile: hoisted out of the tile
                    # loop they would hold 2 * GROUPS registers through the main loop.
                    r_out = special.recompute_here(np.uint32(r_local))
                    if constexpr(THROUGH_V):
                        # (rebuilt here rather than taken from before the main loop, like the
                        # register stores' addresses; the kernel the GPU tests ran has it so)
                        o_wg = special.recompute_here(o_smem + wg * WG_ROWS_BYTES)
                    cb0 = special.recompute_here(np.uint32(col0 * ELEMENT_BYTES))
                    for j in static_range(GROUPS):
                        c, g = j // 8, j % 8
                        dst = o_wg + c * Q_CHUNK
                        cb = (8 * g) * ELEMENT_BYTES + cb0
                        memory.st_shared_b32(dst + smem.swizzle_128b(r_out, cb), po[2 * j])
                        memory.st_shared_b32(dst + smem.swizzle_128b(r_out + 8, cb), po[2 * j + 1])
                    barrier.fence_proxy_async()
                    barrier.sync(EPILOGUE0 + wg, WG_THREADS)
                    if tid == 0:
                        for c in static_range(CHUNKS):
                            tma.store(maps + Maps.O * MAP, (c * CHUNK_COLS, h, mb * BM + wg * WGMMA_M, b),
                                      o_wg + c * Q_CHUNK)
                        tma.commit_group()
                    if constexpr(THROUGH_V):
                        # The V stages are free for the next tile's loads once the store has read
                        # them (one arrival per warpgroup completes the tile's phase).  Every thread
                        # waits (only thread 0 has a bulk group, the others pass at once) and the
                        # arrive is predicated: inside an `if tid == 0` the wait and arrive cost
                        # hdim 256's loop its uniform stage state (bench sass: +61 instructions).
                        tma.wait_group_read(0)
                        mbarrier.arrive_if(tile_slots + Q_STAGES * smem.MBARRIER_BYTES, tid == 0)
                else:
                    # Each quad transposes its row's pieces so that a thread stores 16 contiguous
                    # bytes (8 columns) per st.global.v4: a warp's store covers 8 rows x 64
                    # bytes in whole sectors.  Four-byte stores (8 rows x 16 bytes each) made
                    # this epilogue ~13% of a hdim-256 tile at 2k tokens (bench trace).
                    rs, hs, bs = o_strides
                    # (lane-derived values rebuilt here, not hoisted and held through the main loop)
                    quad = np.int32(special.recompute_here(utid % np.uint32(4)))
                    head = o_ptr + (b * bs + h * hs + (q_off + row0) * rs + 8 * quad) * ELEMENT_BYTES
                    head = special.recompute_here(head)
                    for half in static_range(2):
                        for i in static_range(GROUPS // 4):
                            # every lane shuffles (full-warp shfl); only rows inside the sequence store
                            run = quad_transpose(po[8 * i + half], po[8 * i + 2 + half], po[8 * i + 4 + half],
                                                 po[8 * i + 6 + half], quad)
                            if row0 + 8 * half < sq:
                                memory.st_global_v4_b32(head + (8 * half * rs + 32 * i) * ELEMENT_BYTES, run)
                if utid % np.uint32(4) == np.uint32(0):
                    lbs, lhs = lse_strides
                    lse_row = lse_ptr + (b * lbs + h * lhs + q_off + row0) * 4
                    if row0 < sq:
                        memory.st_global_f32(lse_row, lse0)
                    if row0 + 8 < sq:
                        memory.st_global_f32(lse_row + 32, lse1)
                if tracer:
                    mark(cu_q, 1 + wg, n, TraceEvent.DONE, special.clock64())
                n = np.int32(n + 1)
                qi, q_phase = pipeline.advance(qi, q_phase, Q_STAGES)
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
        OFF_O = self.smem.offsets["o"] if self.tma_store else OFF_Q  # ("o" is "v" with O through V)
        THROUGH_V, CONSUMERS = self.o_through_v, self.consumers
        RING = pipeline.barrier_bytes(STAGES)
        Q_STAGES = self.q_stages
        Q_RING = pipeline.barrier_bytes(Q_STAGES)
        REG_PRODUCER, REG_CONSUMER = self.registers
        WG_THREADS = warpgroup.WARPGROUP_THREADS
        MULTICAST, KV_RELEASES = self.multicast, CONSUMER_WARPS * self.cluster

        def flash_fwd_kernel(maps, lse_ptr, counter, o_ptr, cu_q, cu_k, batch, heads, head_ratio, sq_max, sk_max, total_q, total_k,
                             m_blocks, section, tail, left, right, scale_log2, softmax_scale, softcap_scale,
                             o_row_stride, o_head_stride, o_batch_stride, lse_batch_stride, lse_head_stride):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            k_bars = base + OFF_BARS
            v_bars = k_bars + RING
            q_bars = v_bars + RING
            tile_slots = q_bars + Q_RING
            if cuda.threadIdx.x == 0:
                pipeline.init(k_bars, STAGES, KV_RELEASES)
                pipeline.init(v_bars, STAGES, KV_RELEASES)
                pipeline.init(q_bars, Q_STAGES, CONSUMER_WARPS)
                if THROUGH_V:
                    mbarrier.init(tile_slots + Q_STAGES * smem.MBARRIER_BYTES, CONSUMERS)
                mbarrier.fence_init()
            if MULTICAST:
                # The peer multicasts into this CTA's stages and arrives on its barriers: both
                # CTAs' barriers are initialized before either starts.
                cluster.barrier_arrive()
                cluster.barrier_wait()
            else:
                cuda.syncthreads()
            wg = warpgroup.warpgroup_index()
            tid = cuda.threadIdx.x % WG_THREADS
            if wg == 0:
                regs.setmaxnreg_dec(REG_PRODUCER)
                if tid < warpgroup.WARP_THREADS:
                    load(maps, counter, tile_slots, k_bars, v_bars, q_bars, cu_q, cu_k, sq_max, sk_max, total_q, total_k,
                         base + OFF_K, base + OFF_V, base + OFF_Q, heads, head_ratio, batch, m_blocks, section, tail, left, right,
                         tid)
            else:
                regs.setmaxnreg_inc(REG_CONSUMER)
                mma(maps, lse_ptr, o_ptr, tile_slots, k_bars, v_bars, q_bars, cu_q, cu_k, sq_max, sk_max, total_q, total_k,
                    base + OFF_K, base + OFF_V, base + OFF_Q, base + OFF_O, heads, batch, m_blocks, section, tail, left, right,
                    scale_log2, softmax_scale, softcap_scale, (o_row_stride, o_head_stride, o_batch_stride),
                    (lse_batch_stride, lse_head_stride), wg - 1, tid)
        return flash_fwd_kernel

    SIGNATURE = types.void(*([types.uint64] * 6 + [types.int32] * 12 + [types.float32] * 3 + [types.int64] * 5))

    def tensor_maps(self, q, k, v, o):
        """4-D maps (D, heads, seqlen, batch) of Q, K, V, O; strides in bytes."""
        def spec(t, rows):
            b, s, h, d = t.shape
            st = tuple(x * t.itemsize for x in (t.strides[2], t.strides[1], t.strides[0]))
            return (t.dtype, t.ptr, (d, h, s, b), st, (CHUNK_COLS, 1, rows, 1))
        return (spec(q, self.block_m), spec(k, self.block_n), spec(v, self.block_n), spec(o, WGMMA_M))

    def launch(self, table, lse_ptr, o, batch, heads, heads_k, sq_max, sk_max, window, softmax_scale, softcap,
               stream, cu_seqlens=(0, 0), lse_strides=None, total=(0, 0)):
        """o: TensorInfo of the output ([B, S, H, D], or [T, H, D] packed); lse [B, H, S] or, with
        varlen, [H, T]; sq_max/sk_max: the (longest) sequence lengths."""
        m_blocks = -(-sq_max // self.block_m)
        tiles = m_blocks * heads * batch
        causal = self.mask_kind == mask.MASK_CAUSAL
        if self.multicast:
            # Clusters take tiles (2p, 2p + 1) on a static schedule, so the grid is whole clusters
            # and no more than run at once.
            if m_blocks % MULTICAST_CTAS:
                # (a pair straddling two (batch, head)s would multicast two different K/V)
                raise ValueError(f"the multicast kernel pairs neighbouring query blocks of one (batch, head); "
                                 f"{m_blocks} query blocks do not pair up")
            clusters = min(tiles // MULTICAST_CTAS, self.kernel().max_active_clusters())
            grid = MULTICAST_CTAS * max(1, clusters)
        else:
            grid = scheduler.persistent_grid(tiles, launch.sm_count())
        if causal and m_blocks >= SECTION_MIN_M_BLOCKS:
            section = l2_section(sk_max, self.head_dim, heads // heads_k, self.L2_SECTION_BYTES, m_blocks, grid)
            tail = 0
        else:
            section = 1  # pair by pair: each pair's m_blocks in a row
            tail = causal_tail(m_blocks, heads * batch, grid, self.CAUSAL_TAIL_WAVES) if causal else 0
        left, right = window
        if softcap:
            # s -> softcap * tanh(s * scale / softcap): the kernel takes tanh's argument scale, and
            # the exponent and LSE scale by softcap instead of softmax_scale.
            tanh_scale, exp_scale = softmax_scale / softcap, softcap
        else:
            tanh_scale, exp_scale = 0.0, softmax_scale
        st = o.strides
        o_strides = (st[0], st[1], 0) if self.varlen else (st[1], st[2], st[0])
        if lse_strides is None:
            lse_strides = (heads * sq_max, sq_max)
        stream = launch.stream_handle(stream)
        counter = scheduler.tile_counters.get(stream)
        self.kernel()(grid, stream, table, lse_ptr, counter, o.ptr, cu_seqlens[0], cu_seqlens[1], batch, heads,
                      heads // heads_k, sq_max, sk_max, *total, m_blocks, section, tail, left, right,
                      np.float32(exp_scale * softmax.LOG2E), np.float32(exp_scale), np.float32(tanh_scale),
                      *o_strides, *lse_strides)


def _seq_info(varlen):
    @cuda.jit(device=True, forceinline=True)
    def seq_info(cu_q, cu_k, b, sq_max, sk_max, total_q, total_k):
        """(first token of Q, seqlen_q, first token of K, seqlen_k) of batch entry b: from the
        cu_seqlens arrays (int32, B + 1 entries) with varlen, else the fixed lengths.  Entries are
        clamped to the packed lengths, so bad cu_seqlens cannot send a store out of bounds."""
        if varlen:
            q0 = min(max(memory.ld_global_s32(cu_q + 4 * b), 0), total_q)
            q1 = min(max(memory.ld_global_s32(cu_q + 4 * b + 4), q0), total_q)
            k0 = min(max(memory.ld_global_s32(cu_k + 4 * b), 0), total_k)
            k1 = min(max(memory.ld_global_s32(cu_k + 4 * b + 4), k0), total_k)
            return np.int32(q0), np.int32(q1 - q0), np.int32(k0), np.int32(k1 - k0)
        return np.int32(0), np.int32(sq_max), np.int32(0), np.int32(sk_max)
    return seq_info


def _waits(suspend_ns):
    """(consumer_wait, producer_wait) of the pipeline, with try_wait's suspend-time hint where
    suspend_ns > 0."""
    if not suspend_ns:
        return pipeline.consumer_wait, pipeline.producer_wait
    ns = np.uint32(suspend_ns)

    @cuda.jit(device=True, forceinline=True)
    def consumer_wait(bars, index, phase):
        pipeline.consumer_wait_suspend(bars, index, phase, ns)

    @cuda.jit(device=True, forceinline=True)
    def producer_wait(bars, stages, index, phase):
        pipeline.producer_wait_suspend(bars, stages, index, phase, ns)
    return consumer_wait, producer_wait


def _tile_coords(longest_first):
    @cuda.jit(device=True, forceinline=True)
    def tile_coords(tile, m_blocks, heads, batch, section, tail):
        """(m_block, head, batch) of a linear tile.

        Non-causal: m_blocks vary fastest, so the CTAs running at one time work on few (batch,
        head) pairs and share their K and V in L2 (with heads fastest instead, a 2k-token run
        streamed K and V from HBM for every tile).

        Causal: the (batch, head) pairs go in sections of `section` pairs whose K and V fit in L2
        together (`l2_section`); within a section the m_blocks go from the last (longest) to the
        first, each across all the section's pairs.  The run then ends on a section's shortest
        tiles.  Ordered pair by pair instead, the last pair's longest tile was claimed when the
        other CTAs had a few blocks left, and they idled while it ran.  `section` 1 is that
        pair-by-pair order, longest first within each pair (short sequences, see
        SECTION_MIN_M_BLOCKS); the last `tail` pairs then form one section of their own, so that
        the run still ends on short tiles (`causal_tail`)."""
        if longest_first:
            pairs = heads * batch
            rest = (pairs - tail) * m_blocks
            if tile >= rest:
                # the run's last `tail` pairs: one section, longest first across all of them
                mb, bh = udivmod32(tile - rest, tail)
                bh = bh + (pairs - tail)
            else:
                first, r = udivmod32(tile, section * m_blocks)
                first = first * section
                mb, bh = udivmod32(r, min(section, pairs - tail - first))
                bh = bh + first
            mb = np.int32(m_blocks - 1 - mb)
        else:
            bh, mb = udivmod32(tile, m_blocks)
        b, h = udivmod32(bh, heads)
        return mb, h, b
    return tile_coords


def causal_tail(m_blocks, pairs, ctas, waves):
    """(batch, head) pairs at the end of a pair-by-pair causal run that are ordered longest first
    across all of them: enough for `waves` tiles per CTA, so the last tiles claimed are short
    ones.  Pair by pair to the end, the last pair's longest tile is claimed when the other CTAs
    have a few blocks left (ncu, hdim 256 causal 1k: SMs idle 12.5% of the run, FA3's 4%).
    Two waves, interleaved against none (H100): hdim 256 causal 512 / 1k +3.3% / +7.2%, hdim 128
    +3.3% / +3.9%, hdim 64 +2.2% / +2.0%; one wave gains a little less, four lose up to 13%
    (the tail's pairs no longer share K/V loads)."""
    if waves <= 0:
        return 0
    return min(pairs, -(-waves * ctas // m_blocks))


def l2_section(seqlen_k, head_dim, head_ratio, budget=L2_SECTION_BYTES, m_blocks=1, ctas=1):
    """(batch, head) pairs per causal section: a power of two of K/V heads whose K and V take at
    most `budget` (at least one), times the query heads that share each (GQA); doubled while the
    section's tiles (m_blocks per pair) would not give each of the grid's `ctas` one, since a
    section smaller than the grid ends each of its query blocks with CTAs idle for the next."""
    kv_head = max(1, seqlen_k * 2 * head_dim * ELEMENT_BYTES)
    kv_heads = max(1, budget // kv_head)
    pairs = (1 << (kv_heads.bit_length() - 1)) * head_ratio
    while pairs * m_blocks < ctas:
        pairs *= 2
    return pairs


@functools.lru_cache(maxsize=None)
def forward_kernel(dtype, head_dim, mask_kind, schedule=FULL_SCHEDULE, softcap=False, varlen=False,
                   long_queries=False):
    return FlashForward(dtype, head_dim, mask_kind, schedule, softcap=softcap, varlen=varlen,
                        long_queries=long_queries)
