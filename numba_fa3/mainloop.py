"""The forward kernel's consumer main loop (FA3's CollectiveMainloop::mma): one work tile's key
blocks for one consumer warpgroup (64 query rows), from the first S GEMM to the last P V.

Overlap (FA3 section 3.2): key blocks are walked from the last to the first; in each step the
S GEMM of block j is in flight while the softmax of block j + 1 runs, and that block's P V is
issued right behind it and waited for after the softmax.  A step is a function of named records:
`LoopState` (what it changes: O, P, the softmax state, the K/V ring positions) and `TileEnv`
(what every step of the tile reads).  Blocks that need the mask (`mask.needs_mask`) run a copy
of the step with the mask, those between (`mask.unmasked_range`) a loop of the plain copy; a
branch inside one step ended a basic block before the softmax, and ptxas then put the P V wait
at its top.  Ping-pong (`warpgroup.pingpong`) hands the tensor cores to the other warpgroup once
a step's GEMMs are issued.  The no-overlap ablation (`Schedule.overlap` False) runs S, softmax
and P V in sequence.

Where O is rescaled: before its P V (a step's factors from the block before); with
`Tiles.interleaved_rescale` after the P V wait, in parts each ordered before a part of the
exponentials (`fragment.after`); with the lazy rescale (`Tiles.rescale_threshold`) at the step's
end, behind a warp vote.  docs/decisions.md gives the measurements.
"""
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
from numba import cuda

from numba_fa3.primitives import pipeline, warpgroup
from numba_fa3.primitives.pipeline import PipelineState
from numba_fa3.primitives.fragment import (REGS_PER_GROUP, SECOND_ROW_REG, after, exp2_regs, scale_regs,
                                 scale_rows, tanh_rows, zero_after, zeros)
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import mbarrier, special, wgmma
from . import mask, softmax
from .trace import LoopEvent, TraceEvent, tracer

#: What one step changes: O, P packed as the P V GEMM's A fragments, the softmax state, the K
#: ring position of the next block and the V position of P's block.
LoopState = namedtuple("LoopState", "o pk softmax k v")
#: What every step of a tile reads and none changes: Q as the S GEMM takes it, Q's empty barrier,
#: the tile's key blocks [n_min, n_max), the thread's first column and its rows' key limits,
#: the lane, the warpgroup, whether this thread traces, the tile's number (trace), and what the
#: kernel's `score_scale` reads of the tile (the FP8 kernel's descales).
TileEnv = namedtuple("TileEnv", "q_src q_empty n_min n_max col0 limits lane wg tracer n scale")


def rescale_rounds(block_n, head_dim, rounds):
    """(P's register edges, O's) of the interleaved rescale: P's first part is exponentiated
    before the P V wait, then round k multiplies O's part k and exponentiates P's part k + 1.
    O's parts start on 8-column groups, so each holds a register of both of the thread's rows
    for `after`."""
    p_regs, o_regs = block_n // 2, head_dim // 2
    if rounds < 2 or o_regs % (rounds * REGS_PER_GROUP):
        raise ValueError(f"rescale_rounds={rounds}: O's {o_regs} registers per thread do not split into that "
                         f"many (at least 2) parts of whole {REGS_PER_GROUP}-register groups")
    head = p_regs // rounds
    rest = p_regs - head
    p_edges = (0, head) + tuple(head + k * rest // (rounds - 1) for k in range(1, rounds))
    o_edges = tuple(k * o_regs // rounds for k in range(rounds + 1))
    return p_edges, o_edges


def _constants(fwd):
    """The compile-time values every part of the main loop reads (bound into each factory's
    locals: a Numba device function sees closure constants, not attributes)."""
    BM, BN, D, STAGES = fwd.block_m, fwd.block_n, fwd.head_dim, fwd.stages
    KV_STAGE, V_STAGE = fwd.chunks * fwd.kv_chunk, fwd.v_stage
    QK, PV = fwd.qk.issue, fwd.pv.issue
    S_ZERO, O_ZERO = zeros(BN // 2), zeros(D // 2)
    PACK = fwd.pack_p
    ONLINE_MAX, ONLINE_STEP = fwd.softmax_ops.online_max, fwd.softmax_ops.online_step
    ONLINE_SUM = fwd.softmax_ops.online_sum
    SCORE_SCALE, VALUE_SCALE, TANH_SCALE = fwd.score_scale, fwd.value_scale, fwd.tanh_scale
    MASKED = fwd.masked
    PINGPONG, OVERLAP = fwd.schedule.pingpong, fwd.schedule.overlap
    SOFTCAP, TRACE = fwd.softcap, fwd.trace
    INTERLEAVE, UNIFORM, Q_REGS = fwd.interleaved_rescale, fwd.uniform_pipeline, fwd.q_in_registers
    THRESHOLD = fwd.rescale_threshold
    LAZY = THRESHOLD > 0
    SEQUENTIAL, TAIL_AFTER_WAIT = fwd.sequential_mask_loops, fwd.lazy_tail_after_wait
    P_REGS = BN // 2
    P_EDGES, O_EDGES = rescale_rounds(BN, D, fwd.tiles.rescale_rounds)
    ROUNDS, P_HEAD = len(O_EDGES) - 1, P_EDGES[1]
    turn_wait, turn_pass, _ = warpgroup.pingpong(PINGPONG, fwd.consumers)
    mark, mark_step = tracer(TRACE)
    return SimpleNamespace(**{k: v for k, v in locals().items() if k != "fwd"})


def _parts(c):
    """The step's pieces (`c`: `_constants`): stage addresses and releases, the first S GEMM, the
    scores' soft-cap and mask, the P V wait, the interleaved rescale's rounds."""
    BM, BN, STAGES, KV_STAGE, QK, S_ZERO = c.BM, c.BN, c.STAGES, c.KV_STAGE, c.QK, c.S_ZERO
    MASKED, SOFTCAP, UNIFORM, Q_REGS, TANH_SCALE = c.MASKED, c.SOFTCAP, c.UNIFORM, c.Q_REGS, c.TANH_SCALE
    O_EDGES, P_EDGES, ROUNDS = c.O_EDGES, c.P_EDGES, c.ROUNDS
    turn_wait, turn_pass, mark_step = c.turn_wait, c.turn_pass, c.mark_step

    @cuda.jit(device=True, forceinline=True)
    def stage_addr(x):
        """A K/V stage's address for the wgmma descriptors, warp-uniform: ptxas knows it is when
        the loop is (Tiles.uniform_pipeline); otherwise REDUX tells it."""
        if UNIFORM:
            return np.uint32(x)
        return special.uniform_u32(x)

    @cuda.jit(device=True, forceinline=True)
    def release(bars, state, lane):
        """This warp is done reading K/V stage `state`: a predicated arrive with the uniform
        pipeline, else behind a branch on the lane (which keeps the barrier's address inside it)."""
        if UNIFORM:
            pipeline.consumer_release_uniform(bars, STAGES, state, lane)
        else:
            pipeline.consumer_release(bars, STAGES, state, lane)

    @cuda.jit(device=True, forceinline=True)
    def release_q_now(q_empty, lane):
        """Q's buffer (and its tile-id slot) may be rewritten: every consumer thread arrives, so
        that its own reads of the slot (and, with Q in registers, its ldmatrix loads of Q) are
        released before the producer's next writes.  (One arrive per warp from lane 0 left the
        other lanes' reads ordered by nothing that compute-sanitizer racecheck follows; the
        barrier counts every consumer thread.)"""
        mbarrier.arrive(q_empty)

    @cuda.jit(device=True, forceinline=True)
    def release_q(q_empty, lane):
        """Q's buffer is free for a later tile once every consumer warp's last S GEMM completed
        (with Q in registers it was released when the fragments were loaded)."""
        if not Q_REGS:
            release_q_now(q_empty, lane)

    @cuda.jit(device=True, forceinline=True)
    def s_now(p, sh, kv, env):
        """S for the key block at `kv`, waited for at once: a tile's first block (no P V to
        overlap yet), and every block of the no-overlap ablation."""
        pipeline.consumer_wait(sh.k_bars, kv)
        turn_wait(env.wg)
        s = QK(S_ZERO, env.q_src, stage_addr(sh.k + kv.stage * KV_STAGE), 0)
        turn_pass(env.wg)
        s = wgmma.wait_group_tied(0, s)
        release(sh.k_bars, kv, env.lane)
        return s

    @cuda.jit(device=True, forceinline=True)
    def masked_scores(s, nb, mb, sq, sk, p, env):
        """Soft-cap, then the mask where this block needs one.  Without a mask only a tile's
        first block (its last in key order) can be ragged; the loop's steps never see it."""
        if SOFTCAP:
            s = tanh_rows(s, TANH_SCALE(p, env, nb))
        base = nb * BN
        if MASKED:
            if mask.needs_mask(nb, mb, BM, BN, sq, sk, p.left, p.right):
                return mask.apply(s, nb, BN, env.col0, env.limits)
        elif base + BN > sk:  # (lo, hi) are (0, sk) here
            return mask.apply(s, nb, BN, env.col0, env.limits)
        return s

    @cuda.jit(device=True, forceinline=True)
    def pv_done(o, pk, p, sh, v, env, t):
        """End of the step's softmax (as far as the trace is concerned): wait for the P V
        GEMM, then release its V stage."""
        if env.tracer:
            mark_step(p.trace, env.wg, env.n, t, LoopEvent.SOFTMAX)
        o, pk = wgmma.wait_group_keep(0, o, pk)
        if env.tracer:
            mark_step(p.trace, env.wg, env.n, t, LoopEvent.PV_DONE)
        release(sh.v_bars, v, env.lane)
        return o, pk

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def rescale_among_exponentials(o, pr, st, b0, b1, scale_log2):
        """The interleaved rescale's rounds: O's part k multiplied, then P's part k + 1
        exponentiated with biases taken through `after` that part's first register of each
        row, so ptxas cannot sink the multiplies below the exponentials; O's last part is free."""
        for k in static_range(ROUNDS - 1):
            o = scale_regs(o, st.a0, st.a1, constexpr(O_EDGES[k]), constexpr(O_EDGES[k + 1]))
            pr = exp2_regs(pr, scale_log2, after(b0, o[constexpr(O_EDGES[k])]),
                           after(b1, o[constexpr(O_EDGES[k] + SECOND_ROW_REG)]),
                           constexpr(P_EDGES[k + 1]), constexpr(P_EDGES[k + 2]))
        o = scale_regs(o, st.a0, st.a1, constexpr(O_EDGES[ROUNDS - 1]), constexpr(O_EDGES[ROUNDS]))
        return o, pr

    return SimpleNamespace(stage_addr=stage_addr, release=release, release_q_now=release_q_now, release_q=release_q, s_now=s_now, masked_scores=masked_scores, pv_done=pv_done, rescale_among_exponentials=rescale_among_exponentials)


def _step(c, h, masked):
    """One step of the overlapped loop, with the mask or without (`masked`)."""
    BN, STAGES, KV_STAGE, QK, PV, S_ZERO, PACK = c.BN, c.STAGES, c.KV_STAGE, c.QK, c.PV, c.S_ZERO, c.PACK
    V_STAGE = c.V_STAGE
    ONLINE_MAX, ONLINE_STEP, ONLINE_SUM = c.ONLINE_MAX, c.ONLINE_STEP, c.ONLINE_SUM
    SCORE_SCALE, VALUE_SCALE, TANH_SCALE = c.SCORE_SCALE, c.VALUE_SCALE, c.TANH_SCALE
    SOFTCAP, INTERLEAVE, UNIFORM, THRESHOLD, LAZY = c.SOFTCAP, c.INTERLEAVE, c.UNIFORM, c.THRESHOLD, c.LAZY
    TAIL_AFTER_WAIT, P_HEAD, P_REGS = c.TAIL_AFTER_WAIT, c.P_HEAD, c.P_REGS
    turn_wait, turn_pass, mark_step = c.turn_wait, c.turn_pass, c.mark_step
    stage_addr, release, release_q, pv_done = h.stage_addr, h.release, h.release_q, h.pv_done
    rescale_among_exponentials = h.rescale_among_exponentials
    # A plain step's block has no masked score in any row, so its row maxima are finite.
    UNMASKED_STEP = not masked

    @cuda.jit(device=True, forceinline=True)
    def step(ls, nb, env, p, sh):
        """One step of the overlapped loop: S of block nb issued, then P V of the block
        before (P in ls.pk); this block's softmax under both; returns the next LoopState."""
        t = np.int32(env.n_max - 2 - nb)
        c = SCORE_SCALE(p, env, nb)
        pipeline.consumer_wait(sh.k_bars, ls.k)
        if env.tracer:
            mark_step(p.trace, env.wg, env.n, t, LoopEvent.K_READY)
        turn_wait(env.wg)
        if env.tracer:
            mark_step(p.trace, env.wg, env.n, t, LoopEvent.TURN)
        s = QK(S_ZERO, env.q_src, stage_addr(sh.k + ls.k.stage * KV_STAGE), 0)
        o = ls.o
        if not INTERLEAVE:
            o = softmax.rescale(o, ls.softmax, LAZY)
        pipeline.consumer_wait(sh.v_bars, ls.v)
        o = PV(o, ls.pk, stage_addr(sh.v + ls.v.stage * V_STAGE), 1)
        turn_pass(env.wg)
        s = wgmma.wait_group_tied(1, s)
        if env.tracer:
            mark_step(p.trace, env.wg, env.n, t, LoopEvent.S_READY)
        if not UNIFORM:
            release(sh.k_bars, ls.k, env.lane)
            if nb == env.n_min:
                release_q(env.q_empty, env.lane)
        if SOFTCAP:
            s = tanh_rows(s, TANH_SCALE(p, env, nb))
        if masked:
            s = mask.apply(s, nb, BN, env.col0, env.limits)
        vscale = VALUE_SCALE(p, env, nb)
        if INTERLEAVE:
            st, b0, b1 = ONLINE_MAX(s, ls.softmax, c, vscale, UNMASKED_STEP, THRESHOLD)
            pr = exp2_regs(s, c, b0, b1, 0, P_HEAD)
            if UNIFORM:
                # the releases after the exponentials before the P V wait, which ptxas would
                # otherwise hoist above all of them
                z = zero_after(pr[P_HEAD - 1] if P_HEAD else b0)
                release(sh.k_bars + z, ls.k, env.lane)
                if nb == env.n_min:
                    release_q(env.q_empty + z, env.lane)
            o, pk = pv_done(o, ls.pk, p, sh, ls.v, env, t)
            if TAIL_AFTER_WAIT:
                # (the bias through O's first register of each row: ptxas must place the
                # P V wait before these, as the eager rounds' multiplies make it)
                pr = exp2_regs(pr, c, after(b0, o[0]), after(b1, o[SECOND_ROW_REG]), P_HEAD, P_REGS)
            elif LAZY:
                pr = exp2_regs(pr, c, b0, b1, P_HEAD, P_REGS)
            else:
                o, pr = rescale_among_exponentials(o, pr, st, b0, b1, c)
            st = ONLINE_SUM(pr, st, vscale)
        else:
            pr, st = ONLINE_STEP(s, ls.softmax, c, vscale, UNMASKED_STEP, THRESHOLD)
            o, pk = pv_done(o, ls.pk, p, sh, ls.v, env, t)
        pk = PACK(pr)
        if INTERLEAVE and LAZY:
            # (last: the branch ends the step's one basic block; among the exponentials it
            # split the softmax in two)
            o = softmax.rescale(o, st, True)
        return LoopState(o, pk, st, pipeline.advance(ls.k, STAGES), ls.k)
    return step


def _key_blocks(c, h):
    """key_blocks(ls, nb, mb, sq, sk, env, p, sh): the overlapped steps of a tile's blocks."""
    BM, BN, MASKED, SEQUENTIAL = c.BM, c.BN, c.MASKED, c.SEQUENTIAL
    step_masked, step_plain = _step(c, h, True), _step(c, h, False)

    def make_loop(step):
        """run(ls, nb, stop) -> (ls, nb): steps of blocks nb down to stop.  (The loop carries the
        record's members, the ring positions as loose int32: as members of a record in the loop's
        variables they left ptxas's uniform registers and the P V wait moved after every
        exponential.)"""

        @cuda.jit(device=True, forceinline=True)
        def run(ls, nb, stop, env, p, sh):
            o, pk, st = ls.o, ls.pk, ls.softmax
            ks, kp, vs, vp = ls.k.stage, ls.k.phase, ls.v.stage, ls.v.phase
            while nb >= stop:
                ls = step(LoopState(o, pk, st, PipelineState(ks, kp), PipelineState(vs, vp)), nb, env, p, sh)
                o, pk, st = ls.o, ls.pk, ls.softmax
                ks, kp, vs, vp = ls.k.stage, ls.k.phase, ls.v.stage, ls.v.phase
                nb = np.int32(nb - 1)
            return LoopState(o, pk, st, PipelineState(ks, kp), PipelineState(vs, vp)), nb
        return run

    masked_steps, plain_steps = make_loop(step_masked), make_loop(step_plain)

    @cuda.jit(device=True, forceinline=True)
    def key_blocks(ls, nb, mb, sq, sk, env, p, sh):
        """The overlapped steps of blocks nb down to n_min: the masked copy where the mask is
        needed, the plain one elsewhere."""
        if MASKED:
            u_min, u_max = mask.unmasked_range(mb, BM, BN, sq, sk, p.left, p.right)
            if SEQUENTIAL:
                # (Tiles.sequential_mask_loops) the diagonal's or right edge's blocks, the plain
                # ones, then the left window edge's, in three loops in a row
                ls, nb = masked_steps(ls, nb, max(env.n_min, u_max), env, p, sh)
                ls, nb = plain_steps(ls, nb, max(env.n_min, u_min), env, p, sh)
                ls, nb = masked_steps(ls, nb, env.n_min, env, p, sh)
            else:
                # (the loop nest: a masked step or the plain loop, per turn)
                o, pk, st = ls.o, ls.pk, ls.softmax
                ks, kp, vs, vp = ls.k.stage, ls.k.phase, ls.v.stage, ls.v.phase
                while nb >= env.n_min:
                    ls = LoopState(o, pk, st, PipelineState(ks, kp), PipelineState(vs, vp))
                    if nb >= u_max or nb < u_min:
                        ls = step_masked(ls, nb, env, p, sh)
                        nb = np.int32(nb - 1)
                    else:
                        ls, nb = plain_steps(ls, nb, max(env.n_min, u_min), env, p, sh)
                    o, pk, st = ls.o, ls.pk, ls.softmax
                    ks, kp, vs, vp = ls.k.stage, ls.k.phase, ls.v.stage, ls.v.phase
                ls = LoopState(o, pk, st, PipelineState(ks, kp), PipelineState(vs, vp))
        else:
            ls, nb = plain_steps(ls, nb, env.n_min, env, p, sh)
        return ls
    return key_blocks


def make_mainloop(fwd):
    """(run_tile, release_q_now) for a FlashForward `fwd`: run_tile(p, sh, kv, env, mb, sq, sk)
    -> (O, softmax state, K/V ring position after the tile)."""
    c = _constants(fwd)
    h = _parts(c)
    STAGES, V_STAGE, PV, O_ZERO, PACK = c.STAGES, c.V_STAGE, c.PV, c.O_ZERO, c.PACK
    ONLINE_STEP, SCORE_SCALE, VALUE_SCALE = c.ONLINE_STEP, c.SCORE_SCALE, c.VALUE_SCALE
    INTERLEAVE, LAZY, OVERLAP = c.INTERLEAVE, c.LAZY, c.OVERLAP
    mark = c.mark
    stage_addr, release, release_q, s_now, masked_scores = h.stage_addr, h.release, h.release_q, h.s_now, h.masked_scores
    key_blocks = _key_blocks(c, h)

    @cuda.jit(device=True, forceinline=True)
    def first_block(p, sh, kv, nb, mb, sq, sk, env):
        """The tile's first block (its last in key order): S waited for at once, its softmax."""
        s = s_now(p, sh, kv, env)
        if env.tracer:
            mark(p.trace, 1 + env.wg, env.n, TraceEvent.FIRST_S, special.clock64())
            mark(p.trace, 1 + env.wg, env.n, TraceEvent.BLOCKS, env.n_max - env.n_min)
        if nb == env.n_min:  # the tile's last S GEMM is done: Q may be reloaded
            release_q(env.q_empty, env.lane)
        s = masked_scores(s, nb, mb, sq, sk, p, env)
        pr, st = ONLINE_STEP(s, softmax.initial(), SCORE_SCALE(p, env, nb), VALUE_SCALE(p, env, nb), False, 0.0)
        return LoopState(O_ZERO, PACK(pr), st, pipeline.advance(kv, STAGES), kv)

    @cuda.jit(device=True, forceinline=True)
    def last_pv(ls, env, p, sh):
        """The tile's last P V (its first key block), waited for."""
        if env.tracer:
            mark(p.trace, 1 + env.wg, env.n, TraceEvent.LOOP_END, special.clock64())
        o = ls.o
        if not INTERLEAVE:
            o = softmax.rescale(o, ls.softmax, LAZY)
        pipeline.consumer_wait(sh.v_bars, ls.v)
        o = PV(o, ls.pk, stage_addr(sh.v + ls.v.stage * V_STAGE), 1)
        o, pk = wgmma.wait_group_keep(0, o, ls.pk)
        release(sh.v_bars, ls.v, env.lane)
        if env.tracer:
            mark(p.trace, 1 + env.wg, env.n, TraceEvent.LAST_PV, special.clock64())
        return o

    @cuda.jit(device=True, forceinline=True)
    def run_overlapped(p, sh, kv, env, mb, sq, sk):
        nb = np.int32(env.n_max - 1)
        if nb >= env.n_min:
            ls = first_block(p, sh, kv, nb, mb, sq, sk, env)
            ls = key_blocks(ls, np.int32(nb - 1), mb, sq, sk, env, p, sh)
            return last_pv(ls, env, p, sh), ls.softmax, ls.k
        release_q(env.q_empty, env.lane)
        return O_ZERO, softmax.initial(), kv

    @cuda.jit(device=True, forceinline=True)
    def run_serial(p, sh, kv, env, mb, sq, sk):
        """The ablation without intra-warpgroup overlap: S, softmax, P V in sequence."""
        o, st = O_ZERO, softmax.initial()
        nb = np.int32(env.n_max - 1)
        while nb >= env.n_min:
            s = s_now(p, sh, kv, env)
            s = masked_scores(s, nb, mb, sq, sk, p, env)
            pr, st = ONLINE_STEP(s, st, SCORE_SCALE(p, env, nb), VALUE_SCALE(p, env, nb), False, 0.0)
            o = scale_rows(o, st.a0, st.a1)
            pk = PACK(pr)
            pipeline.consumer_wait(sh.v_bars, kv)
            o = PV(o, pk, special.uniform_u32(sh.v + kv.stage * V_STAGE), 1)
            o, pk = wgmma.wait_group_keep(0, o, pk)
            release(sh.v_bars, kv, env.lane)
            kv = pipeline.advance(kv, STAGES)
            nb = np.int32(nb - 1)
        release_q(env.q_empty, env.lane)
        return o, st, kv

    return (run_overlapped if OVERLAP else run_serial), h.release_q_now
