"""Every kernel specialization compiles to sm_90a with no spills, no stack and no wgmma
serialization (ptxas warning C7510); every intrinsic assembles.  Runs without a GPU."""
import dataclasses
import itertools
import re

import numpy as np
import pytest
from numba import cuda, types

from primitives import compile as kc
from numba_fa3.forward import FlashForward, Schedule
from numba_fa3.tiles import LONG_TILES, SUPPORTED_HEAD_DIMS, tiles_for
from numba_fa3.mask import MASK_CAUSAL, MASK_LOCAL, MASK_NONE
from primitives.gemm import GemmKernel
from primitives.unroll import constexpr, static_range, unrolled
from ptx_inline import barrier, cluster, convert, mbarrier, memory, regs, special, tma, wgmma

pytestmark = pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")


def _assert_clean(report, what):
    assert report["stack"] == 0, f"{what}: {report['stack']} B stack frame\n{report['log']}"
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what}: spills\n{report['log']}"
    assert not report["warnings"], f"{what}: ptxas warnings {report['warnings']}"


GEMMS = list(itertools.product(["bf16", "f16"], ["bf16", "f16", "f32"], [True, False]))


@pytest.mark.parametrize("ab,out,transpose_b", GEMMS)
def test_gemm_specialization_compiles_clean(ab, out, transpose_b):
    kern = GemmKernel(ab, out, transpose_b)
    ptx = kern.compile_ptx()
    assert ptx.count("wgmma.mma_async") == kern.block_k // 16
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    _assert_clean(kc.ptxas_report(ptx), f"gemm {ab}->{out} transpose_b={transpose_b}")


FORWARD_SPECIALIZATIONS = list(itertools.product(["bf16", "f16"], SUPPORTED_HEAD_DIMS,
                                                 [MASK_NONE, MASK_CAUSAL, MASK_LOCAL]))


@pytest.mark.parametrize("dtype,head_dim,mask_kind", FORWARD_SPECIALIZATIONS)
def test_forward_specialization_compiles_clean(dtype, head_dim, mask_kind):
    kern = FlashForward(dtype, head_dim, mask_kind)
    ptx = kern.compile_ptx()
    # With the intra-warpgroup overlap the S GEMM is issued for the first block and in each copy
    # of the loop step (masked kernels have two: with and without the mask; three with
    # Tiles.sequential_mask_loops, whose masked loops above and below the plain one are two
    # copies), and so is P V (each step copy, last block).
    copies = 1 + (1 if mask_kind == MASK_NONE else 3 if kern.sequential_mask_loops else 2)
    assert ptx.count("wgmma.mma_async") == copies * (head_dim // 16 + kern.block_n // 16)
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward {dtype} d{head_dim} mask {mask_kind}")


LONG_SPECIALIZATIONS = [(d, kind) for d, masked in LONG_TILES
                        for kind in ((MASK_CAUSAL, MASK_LOCAL) if masked else (MASK_NONE,))]


@pytest.mark.parametrize("head_dim,mask_kind", LONG_SPECIALIZATIONS)
def test_forward_long_query_specialization_compiles_clean(head_dim, mask_kind):
    kern = FlashForward("bf16", head_dim, mask_kind, long_queries=True)
    assert kern.block_m == LONG_TILES[head_dim, mask_kind != MASK_NONE].block_m
    ptx = kern.compile_ptx()
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward long-query d{head_dim} mask {mask_kind}")


@pytest.mark.parametrize("head_dim", [d for d in SUPPORTED_HEAD_DIMS if d > 64])
def test_forward_multicast_specialization_compiles_clean(head_dim):
    """The K/V multicast variant (FlashForward.MULTICAST; off by default, see bench/NOTES.md):
    clusters of two, each CTA's share of every stage multicast, releases to both CTAs."""
    kern = type("Multicast", (FlashForward,), {"MULTICAST": True})("bf16", head_dim, MASK_NONE)
    assert kern.multicast and kern.cluster == 2
    ptx = kern.compile_ptx()
    assert ".multicast::cluster" in ptx and "mbarrier.arrive.shared::cluster" in ptx
    assert "barrier.cluster.wait" in ptx
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward multicast d{head_dim}")
    masked = type("Multicast", (FlashForward,), {"MULTICAST": True})("bf16", head_dim, MASK_CAUSAL)
    assert not masked.multicast and masked.cluster == 1  # its two tiles would see different keys


@pytest.mark.parametrize("head_dim,mask_kind", [(256, MASK_NONE), (256, MASK_CAUSAL), (192, MASK_LOCAL)])
def test_forward_o_through_v_compiles_clean(head_dim, mask_kind):
    """Tiles.o_through_v (FlashForward.O_THROUGH_V, off in the table): O goes out by TMA store from
    the V stages, after a sync of every consumer warpgroup; the producer waits on `o_free` before
    a tile's first V load.  No spill, no C7510, the wgmma operands untouched."""
    kern = type("OThroughV", (FlashForward,), {"O_THROUGH_V": True})("bf16", head_dim, mask_kind)
    assert kern.o_through_v and kern.tma_store and kern.q_stages == 1
    assert kern.smem.offsets["o"] == kern.smem.offsets["v"]
    assert kern.chunks * kern.q_chunk <= kern.smem.sizes["v"]
    ptx = kern.compile_ptx()
    store = "cp.async.bulk.tensor.4d.global.shared::cta"
    assert store in ptx and "cp.async.bulk.wait_group.read 0" in ptx
    assert store not in FlashForward("bf16", head_dim, mask_kind).compile_ptx()  # the table's: from registers
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward O through V d{head_dim} mask {mask_kind}")


def test_forward_o_through_v_only_where_o_has_no_buffer():
    """Where O's own buffer fits (D <= 128) the knob changes nothing; varlen keeps its stores from
    registers (a tile's rows must not spill into the next sequence); multicast (the peer writes
    this CTA's V stages) does not take it either."""
    knob = type("OThroughV", (FlashForward,), {"O_THROUGH_V": True})
    for d in (64, 96, 128):
        k = knob("bf16", d, MASK_NONE)
        assert not k.o_through_v and k.tma_store and k.smem.offsets["o"] != k.smem.offsets["v"]
    assert not knob("bf16", 256, MASK_NONE, varlen=True).o_through_v
    both = type("Both", (FlashForward,), {"O_THROUGH_V": True, "MULTICAST": True})("bf16", 256, MASK_NONE)
    assert both.multicast and not both.o_through_v and not both.tma_store
    assert not FlashForward("bf16", 256, MASK_NONE).o_through_v


def test_forward_wait_suspend_knob_compiles_clean():
    """FlashForward.WAIT_SUSPEND_NS (off by default; measured in bench/NOTES.md, session 7):
    every mbarrier wait of the kernel passes try_wait the suspend-time hint."""
    kern = type("Suspend", (FlashForward,), {"WAIT_SUSPEND_NS": 10_000_000})("bf16", 128, MASK_NONE)
    ptx = kern.compile_ptx()
    waits = [line for line in ptx.split("\n") if "mbarrier.try_wait.parity" in line]
    assert waits and all(w.count(",") == 3 for w in waits), waits  # P, [bar], parity, hint
    _assert_clean(kc.ptxas_report(ptx), "forward wait-suspend d128")


@pytest.mark.parametrize("head_dim,mask_kind,override,hoisted", [
    (128, MASK_NONE, None, 8), (128, MASK_CAUSAL, None, 8), (64, MASK_NONE, None, 4),
    (256, MASK_NONE, None, 12), (256, MASK_CAUSAL, None, 0),
    (256, MASK_NONE, True, 16), (128, MASK_NONE, False, 0), (128, MASK_NONE, 99, 8), (256, MASK_CAUSAL, 8, 8),
])
def test_forward_hoisted_q_descriptor_count(head_dim, mask_kind, override, hoisted):
    """Tiles.hoist_q_descriptors (True: every K step, an int: that many) and its override knob."""
    kern = type("Hoist", (FlashForward,), {"HOIST_Q_DESCRIPTORS": override})("bf16", head_dim, mask_kind)
    assert kern.hoisted_q_steps == hoisted


@pytest.mark.parametrize("head_dim,mask_kind", [(128, MASK_NONE), (256, MASK_CAUSAL)])
def test_forward_split_row_max_knob_compiles_clean(head_dim, mask_kind):
    """FlashForward.SPLIT_ROW_MAX (off by default, not yet measured): the second row's max
    reduction takes the first row's exponent base as an order dependency."""
    kern = type("Split", (FlashForward,), {"SPLIT_ROW_MAX": True})("bf16", head_dim, mask_kind)
    base = FlashForward("bf16", head_dim, mask_kind).compile_ptx()
    ptx = kern.compile_ptx()
    # one order-dependency FMA per softmax of the loop steps (plain, and masked where there is one)
    assert ptx.count("fma.rn.f32") > base.count("fma.rn.f32")
    _assert_clean(kc.ptxas_report(ptx), f"forward split row max d{head_dim}")


@pytest.mark.parametrize("head_dim,block_n,rounds,head,p_edges,o_edges", [
    (128, 128, None, None, (0, 32, 64), (0, 32, 64)),  # the table's shape at hdim 128 (Tiles.rescale_rounds 2)
    (128, 128, 4, None, (0, 16, 32, 48, 64), (0, 16, 32, 48, 64)),
    (256, 80, 4, None, (0, 10, 20, 30, 40), (0, 32, 64, 96, 128)),
    (128, 128, 2, 0, (0, 0, 64), (0, 32, 64)),
    (64, 128, 8, 8, (0, 8, 16, 24, 32, 40, 48, 56, 64), tuple(range(0, 33, 4))),
])
def test_forward_rescale_rounds_edges(head_dim, block_n, rounds, head, p_edges, o_edges):
    """The interleaved rescale's parts (FlashForward.rescale_rounds): P's head before the P V wait,
    the rest and O split evenly, O's parts on whole 8-column groups."""
    tiles = dataclasses.replace(tiles_for(head_dim, False), block_n=block_n)
    kern = type("Rounds", (FlashForward,), {"RESCALE_ROUNDS": rounds, "EXP2_BEFORE_PV_WAIT": head})(
        "bf16", head_dim, MASK_NONE, tiles=tiles)
    assert kern.rescale_rounds() == (p_edges, o_edges)


@pytest.mark.parametrize("rounds,head,match", [(1, None, "RESCALE_ROUNDS"), (3, None, "RESCALE_ROUNDS"),
                                               (32, None, "RESCALE_ROUNDS"), (4, 65, "EXP2_BEFORE_PV_WAIT")])
def test_forward_rescale_rounds_bad_shapes(rounds, head, match):
    kern = type("Rounds", (FlashForward,), {"RESCALE_ROUNDS": rounds, "EXP2_BEFORE_PV_WAIT": head})(
        "bf16", 128, MASK_NONE)
    with pytest.raises(ValueError, match=match):
        kern.rescale_rounds()


def test_forward_rescale_rounds_compile_clean():
    """Eight rounds with the P V wait before any exponential (hdim 128 causal): no spill."""
    kern = type("Rounds", (FlashForward,), {"INTERLEAVED_RESCALE": True, "RESCALE_ROUNDS": 8,
                                            "EXP2_BEFORE_PV_WAIT": 0})("bf16", 128, MASK_CAUSAL)
    _assert_clean(kc.ptxas_report(kern.compile_ptx()), "forward d128 causal, 8 rescale rounds")


@pytest.mark.parametrize("head_dim,mask_kind", [(128, MASK_CAUSAL), (256, MASK_NONE), (64, MASK_NONE)])
def test_forward_uniform_pipeline_ptx(head_dim, mask_kind):
    """Tiles.uniform_pipeline: no release behind a lane branch (predicated arrives instead), no
    REDUX of the stage addresses, the same PTX otherwise clean; off, the opposite."""
    on = type("Uniform", (FlashForward,), {"UNIFORM_PIPELINE": True})("bf16", head_dim, mask_kind)
    off = type("Branchy", (FlashForward,), {"UNIFORM_PIPELINE": False})("bf16", head_dim, mask_kind)
    assert on.uniform_pipeline and not off.uniform_pipeline
    ptx_on, ptx_off = on.compile_ptx(), off.compile_ptx()
    assert "@p mbarrier.arrive" in ptx_on and "@p mbarrier.arrive" not in ptx_off
    assert ptx_on.count("redux.sync") < ptx_off.count("redux.sync")
    _assert_clean(kc.ptxas_report(ptx_on), f"forward d{head_dim} uniform pipeline")


@pytest.mark.parametrize("head_dim,mask_kind,late,interleaved", [
    (128, MASK_NONE, None, None), (256, MASK_CAUSAL, None, None),  # interleaved: the branch ends the step
    (192, MASK_NONE, False, False), (128, MASK_CAUSAL, True, False)])  # before the P V issue, after its wait
def test_forward_lazy_rescale_ptx(head_dim, mask_kind, late, interleaved):
    """Tiles.rescale_threshold (FlashForward.RESCALE_THRESHOLD) at every place of the rescale: O's
    multiplies behind a warp vote, compiled clean (no spill, no wgmma serialization); off, no vote."""
    knobs = {"LATE_RESCALE": late, "INTERLEAVED_RESCALE": interleaved}
    on = type("Lazy", (FlashForward,), dict(knobs, RESCALE_THRESHOLD=8.0))("bf16", head_dim, mask_kind)
    off = type("Eager", (FlashForward,), dict(knobs, RESCALE_THRESHOLD=0.0))("bf16", head_dim, mask_kind)
    assert on.rescale_threshold == 8.0 and off.rescale_threshold == 0.0
    ptx_on = on.compile_ptx()
    assert "vote.sync.any" in ptx_on and "vote.sync.any" not in off.compile_ptx()
    _assert_clean(kc.ptxas_report(ptx_on), f"forward d{head_dim} lazy rescale")


@pytest.mark.parametrize("threshold", [-1.0, 8.5, float("nan")])
def test_forward_lazy_rescale_threshold_range(threshold):
    with pytest.raises(ValueError, match="rescale threshold"):
        type("Lazy", (FlashForward,), {"RESCALE_THRESHOLD": threshold})("bf16", 128, MASK_NONE)


def test_forward_lazy_tail_needs_the_lazy_rescale():
    kern = type("Tail", (FlashForward,), {"LAZY_TAIL_AFTER_WAIT": True, "RESCALE_THRESHOLD": 0.0})(
        "bf16", 128, MASK_CAUSAL)
    assert not kern.lazy_tail_after_wait


def test_forward_uniform_pipeline_needs_the_interleaved_rescale():
    kern = type("Uniform", (FlashForward,), {"UNIFORM_PIPELINE": True, "INTERLEAVED_RESCALE": False})(
        "bf16", 128, MASK_NONE)
    assert not kern.uniform_pipeline


def test_forward_partly_hoisted_q_descriptors_compile_clean():
    """Part of Q's descriptors hoisted, the rest built per wgmma (hdim 256 full takes 12 of 16):
    the mixed path compiles clean where the table does not choose it."""
    kern = type("Hoist8", (FlashForward,), {"HOIST_Q_DESCRIPTORS": 4})("bf16", 128, MASK_CAUSAL)
    _assert_clean(kc.ptxas_report(kern.compile_ptx()), "forward d128 causal, 4 Q descriptors hoisted")


@pytest.mark.parametrize("pingpong,overlap", [(False, True), (True, False), (False, False)])
def test_forward_ablation_schedules_compile_clean(pingpong, overlap):
    kern = FlashForward("bf16", 128, MASK_CAUSAL, Schedule(pingpong, overlap))
    ptx = kern.compile_ptx()
    assert ("bar.arrive" in ptx) == pingpong  # the ping-pong hand-over is the only bar.arrive
    _assert_clean(kc.ptxas_report(ptx), f"forward schedule pingpong={pingpong} overlap={overlap}")


def _assert_wgmma_operands_untouched(ptx):
    """PTX forbids any access to the registers a wgmma reads from (its A fragment) until a
    wait_group has retired it, and ptxas does not protect them: a kernel whose P registers were
    rewritten while P V ran computed garbage.  Scanning the PTX in order: between a register-A
    wgmma and the next `wgmma.wait_group.sync.aligned 0`, no other instruction names those
    registers.  (Order, not control flow: the loops here are laid out in order.)"""
    in_flight = set()
    for n, line in enumerate(ptx.split("\n")):
        t = line.strip()
        m = re.match(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{([^}]*)\}", t)
        if m:
            in_flight |= {x.strip() for x in m.group(1).split(",")}
        elif t.startswith("wgmma.wait_group.sync.aligned 0"):
            in_flight = set()
        elif in_flight and not t.startswith("wgmma"):
            touched = set(re.findall(r"%r\d+", t)) & in_flight
            assert not touched, f"PTX line {n + 1} touches registers of a running wgmma: {t}"


def _compile(fn, sig, threads=128):
    return kc.ptxas_report(kc.compile_ptx(fn, sig, threads))


@pytest.mark.parametrize("n,ab,trans_b", [(64, "bf16", 0), (128, "f16", 1), (256, "bf16", 1), (256, "e4m3", 0)])
def test_wgmma_forms_assemble(n, ab, trans_b):
    ss, rs = wgmma.mma_ss(n, ab, trans_b), wgmma.mma_rs(n, ab, trans_b)
    zero = (np.float32(0),) * (n // 2)

    @unrolled
    def k(out, da, db, a0):
        acc = wgmma.fence_tied(zero)
        acc = ss(acc, da, db, 0)
        acc = rs(acc, (a0, a0, a0, a0), db, 1)
        wgmma.commit_group()
        acc = wgmma.wait_group_tied(0, acc)
        s = np.float32(0)
        for i in static_range(n // 2):
            s += acc[i]
        out[0] = s

    rep = _compile(k, (types.float32[:], types.uint64, types.uint64, types.uint32))
    _assert_clean(rep, f"wgmma m64n{n} {ab}")


def test_memory_sync_and_conversion_intrinsics_assemble():
    def k(out, gaddr, tmap, x):
        dyn = cuda.shared.array(0, dtype=np.uint8)
        s = special.shared_address(dyn)
        if special.elect_one():
            mbarrier.init(s, 1)
            mbarrier.fence_init()
            mbarrier.arrive_expect_tx(s, 128)
            tma.fence_descriptor_acquire(tmap)
            tma.prefetch_descriptor(tmap)
            tma.load(s + 1024, tmap, (0, 0), s)
            tma.load_hint(s + 1024, tmap, (0, 0, 0), s, special.policy_evict_last())
            tma.prefetch_l2(tmap, (0, 1, 2, 3))
            tma.load_multicast(s + 1024, tmap, (0, 1, 2, 3), s, 3)
            cluster.arrive_remote(cluster.map_shared(s, cluster.ctarank() ^ 1))
            tma.store(tmap, (1, 2, 3, 4, 5), s + 2048)
            tma.commit_group()
            tma.wait_group_read(0)
            tma.wait_group(0)
        mbarrier.wait_parity(s, 0)
        ok = mbarrier.try_wait_parity(s, 1)
        mbarrier.arrive(s)
        mbarrier.arrive_if(s, cuda.threadIdx.x == 0)
        barrier.sync(1, 128)
        barrier.arrive(2, 128)
        barrier.fence_proxy_async()
        cluster.barrier_arrive()
        cluster.barrier_wait()
        p = convert.pack_bf16x2(x, x + 1) ^ convert.pack_f16x2(x, x) ^ convert.pack_e4m3x2(x, x)
        memory.st_shared_b32(s + 16, p)
        memory.st_shared_v4(s + 32, (p, p, p, p))
        memory.st_shared_v2_f32(s + 64, x, x)
        memory.st_shared_f32(s + 72, special.ex2(x))
        m = memory.ldmatrix_x4(s + 128)
        memory.stmatrix_x4(s + 256, m)
        y = memory.ld_shared_f32(s + 72) + memory.ld_global_nc_f32(gaddr)
        memory.st_global_f32(gaddr, y + memory.ld_shared_b32(s + 16) + special.warp_uniform(ok)
                             + special.policy_evict_first())
        out[0] = y

    rep = _compile(k, (types.float32[:], types.uint64, types.uint64, types.float32))
    _assert_clean(rep, "intrinsics")


def test_unrolled_if_constexpr_keeps_only_the_chosen_branch():
    """`if constexpr(flag):` in an @unrolled function: the branch not taken is gone from the
    function (names it alone uses are never looked up), the other is inlined; a plain `if` on a
    run-time value stays."""
    def make(flag):
        @unrolled
        def f(a):
            if constexpr(flag):
                a = a + 1
            else:
                a = undefined_name(a)  # noqa: F821  (pruned when flag is true)
            if a > 2:
                a = a * 10
            for i in static_range(2):
                if constexpr(i == 1):
                    a = a + 100
            return a
        return f

    f = make(True)
    assert f(1) == 102 and f(2) == 130
    assert "undefined_name" not in f.__code__.co_names
    g = make(False)
    assert "undefined_name" in g.__code__.co_names


def test_partial_fragment_intrinsics_compile():
    """exp2_regs / scale_regs touch only their compile-time register range (the interleaved
    rescale's parts), `after` is one fma by zero, and bounds outside the tuple or not
    constant are typing errors."""
    from primitives.fragment import after, exp2_regs, scale_regs

    def k(out, a, x):
        acc = (a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7],
               a[8], a[9], a[10], a[11], a[12], a[13], a[14], a[15])
        p = exp2_regs(acc, x, x, x, 4, 12)
        o = scale_regs(acc, x, x, 0, 8)
        b = after(x, o[0])
        s = np.float32(0)
        for i in static_range(16):
            s += p[i] + o[i]
        out[0] = s + b

    ptx = kc.compile_ptx(unrolled(k), (types.float32[:], types.float32[:], types.float32), 128)
    assert ptx.count("ex2.approx.ftz.f32") == 8
    assert len(re.findall(r"fma\.rn\.f32\s+%f\d+, %f\d+, 0f00000000, %f\d+", ptx)) == 1
    _assert_clean(kc.ptxas_report(ptx), "partial fragment intrinsics")

    def bad(out, x):
        acc = (x, x, x, x)
        out[0] = exp2_regs(acc, x, x, x, 2, 5)[0]
    with pytest.raises(Exception, match="bounds"):
        kc.compile_ptx(bad, (types.float32[:], types.float32), 128)


def test_setmaxnreg_rejects_bad_counts():
    def k(out):
        regs.setmaxnreg_inc(100)
    with pytest.raises(Exception, match="multiple of 8"):
        kc.compile_ptx(k, (types.float32[:],), 128)


def test_unrolled_expands_loops():
    def f(x):
        t = 0
        for i in static_range(3):
            for j in static_range(2):
                t += x * i + j
        return t
    g = unrolled(f)
    assert g(10) == f(10) == sum(10 * i + j for i in range(3) for j in range(2))


def test_unrolled_constexpr_folds_loop_variables():
    EDGES = (0, 3, 7, 12)

    def f(x):
        t = 0
        for k in static_range(3):
            t += x * constexpr(EDGES[k + 1] - EDGES[k]) + constexpr(k * 100)
        return t
    g = unrolled(f)
    assert g(10) == f(10) == 10 * 12 + 300
    # folded away: what Numba sees are constants, which it types as literals
    assert "constexpr" not in g.__code__.co_names and "EDGES" not in g.__code__.co_names


def test_unrolled_constexpr_unknown_name_is_an_error():
    def f(x):
        for k in static_range(2):
            x += constexpr(k + undefined_name)  # noqa: F821
        return x
    with pytest.raises(SyntaxError, match="constexpr"):
        unrolled(f)


def test_zero_after_and_arrive_if_ptx():
    """fragment.zero_after is an fma by zero and a saturating cvt (not folded by LLVM);
    mbarrier.arrive_if is a predicated arrive, no branch."""
    from primitives.fragment import zero_after

    def k(out, x):
        dyn = cuda.shared.array(0, dtype=np.uint8)
        s = special.shared_address(dyn)
        mbarrier.arrive_if(s + zero_after(x), cuda.threadIdx.x == 0)
        out[0] = x

    ptx = kc.compile_ptx(k, (types.float32[:], types.float32), 128)
    assert "cvt.rzi.u32.f32" in ptx and "fma.rn.f32" in ptx
    assert "@p mbarrier.arrive.shared::cta.b64" in ptx


@pytest.mark.parametrize("head_dim,mask_kind,q_regs", [(128, MASK_NONE, True), (96, MASK_CAUSAL, True),
                                                       (128, MASK_CAUSAL, False)])
def test_forward_q_in_registers_ptx(head_dim, mask_kind, q_regs):
    """Tiles.q_in_registers: Q's fragments come from ldmatrix and every S wgmma takes A from
    registers (none from a descriptor), compiled clean with Q's registers untouched while a wgmma
    reads them; off, no ldmatrix in the kernel."""
    kern = type("QRegs", (FlashForward,), {"Q_IN_REGISTERS": q_regs})("bf16", head_dim, mask_kind)
    ptx = kern.compile_ptx()
    assert ("ldmatrix.sync.aligned.m8n8.x4" in ptx) == q_regs
    ss_s_gemms = len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{kern.block_n}k16\S*\s+\{{[^}}]*\}},\s*%rd", ptx))
    assert (ss_s_gemms == 0) == q_regs
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward d{head_dim} Q in registers={q_regs}")
