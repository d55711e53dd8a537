"""Named barriers and proxy fences (PTX ISA 9.7.13.1 "bar, barrier" and 9.7.13.4 "membar/fence").

Named barriers let a subset of the CTA synchronize: e.g. the two consumer warpgroups of a
ping-pong schedule, without stopping the producer warp.  Id 0 is `__syncthreads`; the kernels
number theirs from 1 in an IntEnum.
"""
from numba import types
from numba.cuda.extending import intrinsic

from ._asm import as_int, emit


def _bar(text):
    def typer(typingctx, bar_id, nthreads):
        def codegen(context, builder, sig, args):
            emit(builder, text, [], [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
                                     (as_int(context, builder, args[1], sig.args[1], 32), "r")])
            return context.get_dummy_value()
        return types.void(bar_id, nthreads), codegen
    return typer


@intrinsic
def sync(typingctx, bar_id, nthreads):
    """`bar.sync id, n`: wait until n threads (a multiple of 32) have arrived at barrier id."""
    return _bar("bar.sync $0, $1;")(typingctx, bar_id, nthreads)


@intrinsic
def arrive(typingctx, bar_id, nthreads):
    """`bar.arrive id, n`: count this warp's arrival at barrier id without waiting."""
    return _bar("bar.arrive $0, $1;")(typingctx, bar_id, nthreads)


@intrinsic
def fence_proxy_async(typingctx):
    """`fence.proxy.async.shared::cta`: order this thread's ordinary shared-memory writes before
    later reads by the async proxy (TMA stores, wgmma operands)."""
    def codegen(context, builder, sig, args):
        emit(builder, "fence.proxy.async.shared::cta;", [], [])
        return context.get_dummy_value()
    return types.void(), codegen
