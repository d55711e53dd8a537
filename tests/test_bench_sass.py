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
