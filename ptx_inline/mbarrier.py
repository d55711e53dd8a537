"""Shared-memory transaction barriers: `mbarrier.*` (PTX ISA 9.7.13.15, "Parallel Synchronization
and Communication Instructions: mbarrier"; sm_90 for the expect-tx / try_wait.parity forms).

Barriers are addressed by their 32-bit shared-memory address (see `special.shared_address`).
"""
from numba import types
from numba.cuda.extending import intrinsic

from ._asm import as_int, emit, void_asm, I32


@intrinsic
def init(typingctx, bar, count):
    """`mbarrier.init.shared::cta.b64 [bar], count` (9.7.13.15.9): expected arrivals per phase."""
    return void_asm("mbarrier.init.shared::cta.b64 [$0], $1;", "r", "r")(typingctx, bar, count)


@intrinsic
def arrive(typingctx, bar):
    """`mbarrier.arrive.shared::cta.b64 _, [bar]` (9.7.13.15.13): one arrival, no state kept."""
    return void_asm("mbarrier.arrive.shared::cta.b64 _, [$0];", "r")(typingctx, bar)


@intrinsic
def arrive_if(typingctx, bar, cond):
    """`@p mbarrier.arrive.shared::cta.b64 _, [bar]` (9.7.13.15.13) with p = (cond != 0): one
    arrival from the threads whose cond is set, predicated inside the asm instead of behind a
    branch, so the caller's control flow stays warp-uniform for ptxas."""
    return void_asm("{\n.reg .pred p;\nsetp.ne.u32 p, $1, 0;\n@p mbarrier.arrive.shared::cta.b64 _, [$0];\n}",
                    "r", "r")(typingctx, bar, cond)


@intrinsic
def arrive_expect_tx(typingctx, bar, tx_bytes):
    """`mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], tx` (9.7.13.15.13): arrive and tell the
    barrier how many bytes the bulk copies completing on it will bring in this phase."""
    return void_asm("mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;", "r", "r")(
        typingctx, bar, tx_bytes)


@intrinsic
def try_wait_parity(typingctx, bar, parity):
    """One `mbarrier.try_wait.parity.shared::cta.b64` (9.7.13.15.16): True once the phase with the
    given parity has completed.  For a consumer that wants to do something else while it waits."""
    def codegen(context, builder, sig, args):
        text = ("{\n.reg .pred P;\nmbarrier.try_wait.parity.shared::cta.b64 P, [$1], $2;\n"
                "selp.u32 $0, 1, 0, P;\n}")
        r = emit(builder, text, [I32], [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
                                       (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return builder.icmp_unsigned("!=", r, I32(0))
    return types.boolean(bar, parity), codegen


@intrinsic
def wait_parity(typingctx, bar, parity):
    """Spin on `mbarrier.try_wait.parity` (9.7.13.15.16) until the phase with that parity completes.

    try_wait suspends the thread for a hardware-chosen time before returning false, so this loop
    does not hammer shared memory the way a test_wait loop would."""
    text = ("{\n.reg .pred P;\nWAIT_${:uid}:\n"
            "mbarrier.try_wait.parity.shared::cta.b64 P, [$0], $1;\n"
            "@!P bra WAIT_${:uid};\n}")
    return void_asm(text, "r", "r")(typingctx, bar, parity)


@intrinsic
def wait_parity_suspend(typingctx, bar, parity, suspend_ns):
    """`wait_parity` with try_wait's suspendTimeHint operand (9.7.13.15.16): the thread may stay
    suspended in the instruction until the phase completes or `suspend_ns` nanoseconds pass,
    instead of the system-dependent limit, so a waiting warp neither re-issues its try_wait nor
    takes issue slots from the warps that share its scheduler (CUTLASS's ClusterBarrier::wait
    passes 0x989680, i.e. 10 ms)."""
    text = ("{\n.reg .pred P;\nWAIT_${:uid}:\n"
            "mbarrier.try_wait.parity.shared::cta.b64 P, [$0], $1, $2;\n"
            "@!P bra WAIT_${:uid};\n}")
    return void_asm(text, "r", "r", "r")(typingctx, bar, parity, suspend_ns)


@intrinsic
def fence_init(typingctx):
    """`fence.mbarrier_init.release.cluster` (9.7.13.4): make mbarrier.init visible to the async
    proxy (TMA) and to other threads before they use the barriers."""
    return void_asm("fence.mbarrier_init.release.cluster;")(typingctx)
