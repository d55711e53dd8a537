"""Every kernel specialization compiles to sm_90a with no spills, no stack and no wgmma
serialization (ptxas warning C7510); every intrinsic assembles.  Runs without a GPU."""
import dataclasses
import itertools
import re

import numpy as np
import pytest
from numba import cuda, types

from numba_fa3.primitives import compile as kc
from numba_fa3.forward import FlashForward, Schedule
from numba_fa3.tiles import LONG_TILES, SUPPORTED_HEAD_DIMS, tiles_for
from numba_fa3.mask import MASK_CAUSAL, MASK_LOCAL, MASK_NONE
from numba_fa3.primitives.gemm import GemmKernel
from numba_fa3.primitives.unroll import constexpr, static_range, unrolled
from numba_fa3.ptx_inline import barrier, cluster, convert, mbarrier, memory, regs, special, tma, wgmma

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
    """Each table kernel: no spill, stack or ptxas warning; the wgmmas and the table's schedule
    choices visible in its PTX (uniform pipeline: predicated releases; lazy rescale: the warp
    vote; Q in registers: ldmatrix and no S wgmma reading A from shared memory)."""
    kern = FlashForward(dtype, head_dim, mask_kind)
    ptx = kern.compile_ptx()
    # With the intra-warpgroup overlap the S GEMM is issued for the first block and in each copy
    # of the loop step (masked kernels have two: with and without the mask; three with
    # Tiles.sequential_mask_loops, whose masked loops above and below the plain one are two
    # copies), and so is P V (each step copy, last block).
    copies = 1 + (1 if mask_kind == MASK_NONE else 3 if kern.sequential_mask_loops else 2)
    assert ptx.count("wgmma.mma_async") == copies * (head_dim // 16 + kern.block_n // 16)
    assert ("@p mbarrier.arrive" in ptx) == kern.uniform_pipeline
    assert ("vote.sync.any" in ptx) == (kern.rescale_threshold > 0)
    assert ("ldmatrix.sync.aligned.m8n8.x4" in ptx) == kern.q_in_registers
    ss_s_gemms = len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{kern.block_n}k16\S*\s+\{{[^}}]*\}},\s*%rd",
                                ptx))
    assert (ss_s_gemms == 0) == kern.q_in_registers
    _assert_wgmma_operands_untouched(ptx)
    _assert_clean(kc.ptxas_report(ptx), f"forward {dtype} d{head_dim} mask {mask_kind}")


LONG_SPECIALIZATIONS = [(d, kind) for d, masked in LONG_TILES
                        for kind in ((MASK_CAUSAL, MASK_LOCAL) if masked else (MASK_NONE,))]


@pytest.mark.parametrize("head_dim,mask_kind", LONG_SPECIALIZATIONS)
def test_forward_long_query_specialization_compiles_clean(head_dim, mask_kind):
    kern = FlashForward("bf16", head_dim, mask_kind, long_queries=True)
    _assert_clean(kc.ptxas_report(kern.compile_ptx()), f"forward long d{head_dim} mask {mask_kind}")


def test_forward_varlen_softcap_and_trace_builds_compile():
    """The varlen kernel (O from registers, row-checked) with soft-cap compiles clean; the trace
    build (a diagnostic: its stores of timestamps take a few registers' spill) without wgmma
    serialization."""
    kern = FlashForward("bf16", 128, MASK_CAUSAL, varlen=True, softcap=True)
    _assert_clean(kc.ptxas_report(kern.compile_ptx()), "forward d128 varlen softcap")
    ptx = FlashForward("bf16", 128, MASK_NONE, trace=True).compile_ptx()
    assert "%clock64" in ptx and not kc.ptxas_report(ptx)["warnings"]


@pytest.mark.parametrize("head_dim,mask_kind,choice,hoisted", [
    (128, MASK_NONE, None, 0), (64, MASK_NONE, None, 4), (256, MASK_NONE, None, 12), (256, MASK_CAUSAL, None, 0),
    (256, MASK_NONE, True, 16), (96, MASK_NONE, False, 0), (96, MASK_NONE, 99, 6), (256, MASK_CAUSAL, 8, 8),
])
def test_forward_hoisted_q_descriptor_count(head_dim, mask_kind, choice, hoisted):
    """Tiles.hoist_q_descriptors (True: every K step, an int: that many, at most every step);
    none where Q is in registers (hdim 128), whose S GEMMs take no A descriptor."""
    tiles = tiles_for(head_dim, mask_kind != MASK_NONE)
    if choice is not None:
        tiles = tiles.with_choices(hoist_q_descriptors=choice)
    kern = FlashForward("bf16", head_dim, mask_kind, tiles=tiles)
    assert kern.qk.steps == head_dim // 16
    assert kern.qk.hoisted == hoisted


@pytest.mark.parametrize("head_dim,block_n,rounds,p_edges,o_edges", [
    (128, 128, 2, (0, 32, 64), (0, 32, 64)),  # the table's shape at hdim 128
    (128, 128, 4, (0, 16, 32, 48, 64), (0, 16, 32, 48, 64)),
    (256, 80, 4, (0, 10, 20, 30, 40), (0, 32, 64, 96, 128)),
    (64, 128, 8, (0, 8, 16, 24, 32, 40, 48, 56, 64), tuple(range(0, 33, 4))),
])
def test_forward_rescale_rounds_edges(head_dim, block_n, rounds, p_edges, o_edges):
    """The interleaved rescale's parts (mainloop.rescale_rounds): P's head before the P V wait,
    the rest and O split evenly, O's parts on whole 8-column groups."""
    from numba_fa3.mainloop import rescale_rounds
    assert rescale_rounds(block_n, head_dim, rounds) == (p_edges, o_edges)


@pytest.mark.parametrize("rounds", [1, 3, 32])
def test_forward_rescale_rounds_bad_shapes(rounds):
    from numba_fa3.mainloop import rescale_rounds
    with pytest.raises(ValueError, match="rescale_rounds"):
        rescale_rounds(128, 128, rounds)


@pytest.mark.parametrize("threshold", [-1.0, 8.5, float("nan")])
def test_forward_lazy_rescale_threshold_range(threshold):
    with pytest.raises(ValueError, match="rescale threshold"):
        FlashForward("bf16", 128, MASK_NONE, tiles=tiles_for(128).with_choices(rescale_threshold=threshold))


def test_forward_schedule_choices_that_need_another():
    """The lazy tail needs the lazy rescale; the uniform pipeline the interleaved rescale (the
    release order); Q in registers the overlap (ptxas clobbers the fragments in the serial loop)."""
    t = tiles_for(128, True)
    assert not FlashForward("bf16", 128, MASK_CAUSAL, tiles=t.with_choices(rescale_threshold=0.0)).lazy_tail_after_wait
    assert not FlashForward("bf16", 128, MASK_NONE,
                            tiles=tiles_for(128).with_choices(interleaved_rescale=False)).uniform_pipeline
    assert not FlashForward("bf16", 128, MASK_CAUSAL, Schedule(True, False)).q_in_registers


@pytest.mark.parametrize("pingpong,overlap", [(False, True), (True, False)])
def test_forward_ablation_schedules_compile_clean(pingpong, overlap):
    kern = FlashForward("bf16", 128, MASK_CAUSAL, Schedule(pingpong, overlap))
    ptx = kern.compile_ptx()
    assert ("bar.arrive" in ptx) == pingpong  # the ping-pong hand-over is the only bar.arrive
    _assert_clean(kc.ptxas_report(ptx), f"forward schedule pingpong={pingpong} overlap={overlap}")


#: PTX instructions whose first operand is not a destination register.
_NO_DESTINATION = ("st.", "stmatrix", "red.", "wgmma", "bar.", "barrier", "mbarrier", "cp.", "fence", "@", "{",
                   "}", "ret", "bra", "setmaxnreg", "//", ".")


def _assert_wgmma_operands_untouched(ptx, reads_allowed=False):
    """PTX forbids modifying the registers a wgmma reads from (its A fragment) until a wait_group
    has retired it, and ptxas does not protect them: a kernel whose P registers were rewritten
    while P V ran computed garbage.  Scanning the PTX in order: between a register-A wgmma and
    the next `wgmma.wait_group.sync.aligned 0`, no other instruction names those registers, or
    with `reads_allowed` none writes them (the backward stages dS^T by stmatrix while dK = dS^T Q
    reads it).  (Order, not control flow: the loops here are laid out in order.)"""
    in_flight = set()
    for n, line in enumerate(ptx.split("\n")):
        t = line.strip()
        m = re.match(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{([^}]*)\}", t)
        if m:
            in_flight |= {x.strip() for x in m.group(1).split(",")}
        elif t.startswith("wgmma.wait_group.sync.aligned 0"):
            in_flight = set()
        elif in_flight and reads_allowed:
            dest = None if not t or t.startswith(_NO_DESTINATION) else re.match(r"\S+\s+(%r\d+)", t)
            assert not (dest and dest.group(1) in in_flight), \
                f"PTX line {n + 1} writes a register of a running wgmma: {t}"
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


@pytest.mark.parametrize("n,ab,k_extent,a_major,b_major", [
    (128, "bf16", 64, "mn", "mn"),    # the backward's P^T dO and dS^T Q: A and B M/N-major
    (128, "f16", 128, "k", "mn"),     # P V's shape, A from shared memory
    (256, "e4m3", 128, "k", "k"),     # FP8: k = 32, both K-major
])
def test_warpgroup_mma_forms_assemble(n, ab, k_extent, a_major, b_major):
    """primitives.mma.warpgroup_mma's forms that no table kernel uses yet assemble with the
    operand layout in the instruction (transposed A: imm-trans-a 1) and one wgmma per K step."""
    from numba_fa3.primitives import mma
    chunk = 64 * 128
    g = mma.warpgroup_mma(n, ab, k_extent, mma.Operand(a_major, chunk), mma.Operand(b_major, chunk))
    issue, source = g.issue, g.a_source
    zero = (np.float32(0),) * (n // 2)

    @unrolled
    def k(out, a_addr, b_addr):
        acc = issue(zero, source(a_addr, np.uint32(cuda.threadIdx.x)), b_addr, 0)
        acc = wgmma.wait_group_tied(0, acc)
        s = np.float32(0)
        for i in static_range(n // 2):
            s += acc[i]
        out[0] = s

    ptx = kc.compile_ptx(k, (types.float32[:], types.uint32, types.uint32), 128)
    wgmmas = [line for line in ptx.splitlines() if "wgmma.mma_async" in line]
    assert len(wgmmas) == g.steps == k_extent // mma.WGMMA_K[ab]
    # scale-a, scale-b, then (16-bit only) the transpose immediates of A and B
    imm = "p, 1, 1;" if ab == "e4m3" else f"p, 1, 1, {int(a_major == 'mn')}, {int(b_major == 'mn')};"
    assert all(line.rstrip().endswith(imm) for line in wgmmas), wgmmas
    _assert_clean(kc.ptxas_report(ptx), f"warpgroup_mma m64n{n} {ab} A {a_major} B {b_major}")


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
    from numba_fa3.primitives.fragment import after, exp2_regs, scale_regs

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
    from numba_fa3.primitives.fragment import zero_after

    def k(out, x):
        dyn = cuda.shared.array(0, dtype=np.uint8)
        s = special.shared_address(dyn)
        mbarrier.arrive_if(s + zero_after(x), cuda.threadIdx.x == 0)
        out[0] = x

    ptx = kc.compile_ptx(k, (types.float32[:], types.float32), 128)
    assert "cvt.rzi.u32.f32" in ptx and "fma.rn.f32" in ptx
    assert "@p mbarrier.arrive.shared::cta.b64" in ptx


def test_global_vector_load_intrinsics_assemble():
    """The 16-byte non-coherent loads: four float32, and eight bf16 / fp16 returned as float32
    (bf16 by shift and mask, fp16 by cvt), each one ld.global.nc.v4."""
    @unrolled
    def k(out, gaddr):
        a = memory.ld_global_nc_v4_f32(gaddr)
        b = memory.ld_global_nc_v4_bf16_f32(gaddr + 16)
        c = memory.ld_global_nc_v4_f16_f32(gaddr + 32)
        s = a[0] + a[1] + a[2] + a[3]
        for i in static_range(8):
            s += b[i] * c[i]
        memory.st_global_f32(gaddr, s)

    ptx = kc.compile_ptx(k, (types.float32[:], types.uint64), 128)
    assert ptx.count("ld.global.nc.v4.f32") == 1 and ptx.count("ld.global.nc.v4.b32") == 2
    assert ptx.count("shl.b32") == 4 and ptx.count("and.b32") == 4 and ptx.count("cvt.f32.f16") == 8
    _assert_clean(kc.ptxas_report(ptx), "vector load intrinsics")
