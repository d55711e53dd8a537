"""Register reallocation between warpgroups: `setmaxnreg` (PTX ISA 9.7.17.1, sm_90a).

Takes effect only in a kernel compiled with a register cap (launch bounds with min blocks = 1),
and each warpgroup must execute the same value.  The producer gives registers back (`dec`) so the
consumers, whose accumulators dominate, can take them (`inc`).
"""
from numba import types

from ._asm import emit, literal_int, literal_intrinsic

#: setmaxnreg accepts counts in [24, 256] that are multiples of 8.
MIN_REGS, MAX_REGS, GRANULE = 24, 256, 8


def _count(n):
    value = literal_int(n, "setmaxnreg's register count")
    if not (MIN_REGS <= value <= MAX_REGS and value % GRANULE == 0):
        raise ValueError(f"setmaxnreg count must be a multiple of {GRANULE} in "
                         f"[{MIN_REGS}, {MAX_REGS}], got {value}")
    return value


@literal_intrinsic
def setmaxnreg_inc(typingctx, n):
    """`setmaxnreg.inc.sync.aligned.u32 n`: raise this warpgroup's per-thread register count."""
    value = _count(n)

    def codegen(context, builder, sig, args):
        emit(builder, f"setmaxnreg.inc.sync.aligned.u32 {value};", [], [])
        return context.get_dummy_value()
    return types.void(n), codegen


@literal_intrinsic
def setmaxnreg_dec(typingctx, n):
    """`setmaxnreg.dec.sync.aligned.u32 n`: release registers down to n per thread."""
    value = _count(n)

    def codegen(context, builder, sig, args):
        emit(builder, f"setmaxnreg.dec.sync.aligned.u32 {value};", [], [])
        return context.get_dummy_value()
    return types.void(n), codegen
