"""`bench sass`: finding the step loop in a SASS listing (synthetic listings, no toolkit), and
end to end where nvdisasm is installed."""
import pytest

from bench import sass


def _listing(blocks):
    """A minimal nvdisasm-like listing: blocks of (label or None, [opcode text, ...])."""
    out, addr = [], 0
    for label, ops in blocks:
        if label:
            out.append(f"{label}:")
        for op in ops:
            out.append(f"        /*{addr:04x}*/                   {op} ;")
            addr += 16
    return "\n".join(out)


def _step(n_mufu, n_hgmma, back_to):
    return ([f"HGMMA.64x128x16.F32.BF16 R24, gdesc[UR{4 * i}], R24" for i in range(n_hgmma)]
            + ["MUFU.EX2 R1, R2"] * n_mufu + [f"@P0 BRA `({back_to})"])


def test_step_loop_found_and_retry_loops_left_out():
    text = _listing([
        (".L_x_1", ["SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R3+URZ], R4", "@!P1 BRA `(.L_x_1)"]),
        (".L_x_2", _step(64, 16, ".L_x_2")),
        (None, ["EXIT"]),
    ])
    found = sass.step_loops(text)
    assert len(found) == 1
    assert found[0].mix()["MUFU"] == 64 and found[0].mix()["HGMMA"] == 16
    assert len(found[0]) == 64 + 16 + 1
    assert found[0].ops[-1] == ("BRA", "@P0 BRA `(.L_x_2)")


def test_loop_around_a_step_loop_and_long_tile_loop_left_out():
    inner = _step(64, 16, ".L_x_3")
    text = _listing([
        (".L_x_2", ["MUFU.EX2 R5, R6"] * 20 + ["HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24"]),
        (".L_x_3", inner),
        (None, ["@P2 BRA `(.L_x_2)"]),  # around the step loop
        (".L_x_9", _step(200, 40, ".L_x_9")),  # a tile loop laid out beside it, 3x as long
    ])
    found = sass.step_loops(text)
    assert [len(lp) for lp in found] == [len(inner)]


def test_instruction_parsing_keeps_predicates_and_opcode_suffixes():
    ops = sass.instructions(["        /*0a80*/                   @!UP0 ULOP3.LUT UR18, UR4, 0xfffffc00, URZ, 0xc0, !UPT ;"])
    assert ops == [("ULOP3.LUT", "@!UP0 ULOP3.LUT UR18, UR4, 0xfffffc00, URZ, 0xc0, !UPT")]


@pytest.mark.skipif(sass.find_nvdisasm() is None, reason="nvdisasm not installed")
def test_forward_step_loop_end_to_end():
    from numba_fa3.forward import FlashForward
    r = sass.report(FlashForward("bf16", 128))
    assert r["spills"] == 0
    (step,) = r["loops"]
    mix = step.mix()
    # one step at hdim 128, block_n 128: 8 + 8 HGMMA; 64 exponentials plus the two rescale factors
    assert mix["HGMMA"] == 16 and mix["MUFU"] == 66


@pytest.mark.parametrize("text,written", [
    ("VIADD R153, R7, 0x9", {153}),
    ("@!P2 LOP3.LUT R155, R7.reuse, 0x10, RZ, 0xfc, !PT", {155}),
    ("ISETP.GE.AND P2, PT, R153, R20, PT", set()),  # predicates only: R153 is a source
    ("FSETP.NEU.AND P1, PT, R22, -INF , PT", set()),
    ("SHFL.BFLY PT, R20, R21, 0x1, 0x1f", {20}),
    ("LDSM.16.M88.4 R152, [R17+UR42]", {152, 153, 154, 155}),
    ("IMAD.WIDE.U32 R4, R2, R3, RZ", {4, 5}),
    ("LDS.64 R10, [R2]", {10, 11}),
    ("STS.128 [R2], R4", set()),
    ("@!P6 SYNCS.ARRIVE.TRANS64.A1T0 RZ, [UR31], RZ", set()),
    ("VOTE.ANY P1, P1", set()),
])
def test_written_registers(text, written):
    assert sass.written_registers(text) == written


def test_a_fragment_clobbers_synthetic():
    """A register-A HGMMA whose fragments ldmatrix loaded before the loop: a write to them inside
    the loop is reported, one to other registers (or to the accumulator by the HGMMA) is not, and
    a loop that reloads them (a tile loop) is left out."""
    body = ["HGMMA.64x128x16.F32.BF16 R24, R152, gdesc[UR20], RZ, !UPT", "VIADD R8, R7, 0x9",
            "MUFU.EX2 R30, R30"]
    clean = _listing([(None, ["LDSM.16.M88.4 R152, [R17+UR42]"]), (".L_x_1", body + ["@P0 BRA `(.L_x_1)"])])
    assert sass.a_fragment_clobbers(clean) == []
    broken = _listing([(None, ["LDSM.16.M88.4 R152, [R17+UR42]"]),
                       (".L_x_1", body + ["VIADD R153, R7, 0x9", "@P0 BRA `(.L_x_1)"])])
    assert sass.a_fragment_clobbers(broken) == ["VIADD R153, R7, 0x9"]
    reloading = _listing([(".L_x_1", ["LDSM.16.M88.4 R152, [R17+UR42]"] + body
                           + ["VIADD R153, R7, 0x9", "@P0 BRA `(.L_x_1)"])])
    assert sass.a_fragment_clobbers(reloading) == []


def test_exp2_before_pv_wait_synthetic():
    ops = ["MUFU.EX2 R1, R2", "MUFU.EX2 R3, R4", "WARPGROUP.DEPBAR.LE gsb0, 0x1", "MUFU.EX2 R5, R6",
           "WARPGROUP.DEPBAR.LE gsb0, 0x0", "MUFU.EX2 R7, R8", "@P0 BRA `(.L_x_1)"]
    (lp,) = sass.loops(_listing([(".L_x_1", ops)]))
    assert lp.exp2_before_pv_wait() == 3
    (lp,) = sass.loops(_listing([(".L_x_1", ops[:4] + ops[5:])]))
    assert lp.exp2_before_pv_wait() is None


@pytest.mark.skipif(sass.find_nvdisasm() is None, reason="nvdisasm not installed")
@pytest.mark.parametrize("head_dim,kind", [(128, "causal"), (128, "local"), (192, "causal")])
def test_lazy_tail_places_the_pv_wait_among_the_exponentials(head_dim, kind):
    """The table kernels with Tiles.lazy_tail_after_wait: in the plain step loop (the shortest) the
    P V wait has exponentials on both sides.  Left free, ptxas 13.0 ran all 64 before it at hdim 128
    causal, 3% slower (bench/NOTES.md, "The P V wait and ptxas")."""
    from numba_fa3 import mask
    from numba_fa3.forward import FlashForward
    k = FlashForward("bf16", head_dim, {"causal": mask.MASK_CAUSAL, "local": mask.MASK_LOCAL}[kind])
    assert k.lazy_tail_after_wait and k.sequential_mask_loops
    plain = min(sass.report(k)["loops"], key=len)
    assert 0 < plain.exp2_before_pv_wait() < plain.mix()["MUFU"] - 2  # (2: O's rescale factors)


@pytest.mark.skipif(sass.find_nvdisasm() is None, reason="nvdisasm not installed")
@pytest.mark.parametrize("head_dim,kind,varlen", [(128, "none", False), (128, "causal", False), (128, "local", True),
                                                  (64, "causal", False)])
def test_q_fragments_survive_the_step_loops(head_dim, kind, varlen):
    """Every table kernel that holds Q in registers (Tiles.q_in_registers): in the SASS no
    instruction inside the main loops writes Q's fragments between the tile's ldmatrix and its
    last S GEMM."""
    from numba_fa3 import mask
    from numba_fa3.forward import FlashForward
    k = FlashForward("bf16", head_dim, {"none": mask.MASK_NONE, "causal": mask.MASK_CAUSAL,
                                        "local": mask.MASK_LOCAL}[kind], varlen=varlen)
    assert k.q_in_registers
    assert sass.a_fragment_clobbers(sass.report(k)["sass"]) == []


@pytest.mark.skipif(sass.find_nvdisasm() is None, reason="nvdisasm not installed")
def test_no_overlap_ablation_keeps_q_in_shared_memory_for_a_reason():
    """The no-overlap ablation's step loop with Q in registers: ptxas 13.0 reuses the fragments'
    registers for P and the mask's index math inside it (wrong results on the H100),
    though the PTX keeps them live across the loop.  This is why FlashForward keeps Q in shared
    memory there; if a ptxas stops doing it, this test says the guard can go."""
    from numba_fa3 import mask
    from numba_fa3.forward import FlashForward, Schedule
    k = FlashForward("bf16", 128, mask.MASK_CAUSAL, Schedule(pingpong=True, overlap=False))
    assert not k.q_in_registers
    k.q_in_registers = True  # what the guard in __init__ refuses
    assert sass.a_fragment_clobbers(sass.report(k)["sass"])
