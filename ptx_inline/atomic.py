"""Global-memory atomics by address (PTX ISA 9.7.13.5 "atom", 9.7.13.6 "red"): the dynamic tile
scheduler's counter (relaxed, GPU scope: it only hands out numbers and orders no other data), the
backward's float32 dQ accumulation (vector reductions, sm_90), and the semaphore that orders
those reductions in deterministic mode (acquire load, release add)."""
from numba import types
from numba.cuda.extending import intrinsic

from ._asm import I32, as_int, emit


def _atom(text):
    def typer(typingctx, addr, value):
        def codegen(context, builder, sig, args):
            return emit(builder, text, [I32], [(as_int(context, builder, args[0], sig.args[0], 64), "l"),
                                               (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return types.uint32(addr, value), codegen
    return typer


@intrinsic
def atom_add_u32(typingctx, addr, value):
    """`atom.relaxed.gpu.global.add.u32 old, [addr], value`: returns the value before the add."""
    return _atom("atom.relaxed.gpu.global.add.u32 $0, [$1], $2;")(typingctx, addr, value)


@intrinsic
def atom_exch_u32(typingctx, addr, value):
    """`atom.relaxed.gpu.global.exch.b32 old, [addr], value`: returns the old value."""
    return _atom("atom.relaxed.gpu.global.exch.b32 $0, [$1], $2;")(typingctx, addr, value)


@intrinsic
def red_add_v2_f32(typingctx, addr, a, b):
    """`red.relaxed.gpu.global.add.v2.f32 [addr], {a, b}` (9.7.13.6, vector .f32 needs sm_90):
    two adjacent float32 added in one L2 reduction (addr 8-byte aligned), nothing returned."""
    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[1], sig.args[1], types.float32)
        y = context.cast(builder, args[2], sig.args[2], types.float32)
        emit(builder, "red.relaxed.gpu.global.add.v2.f32 [$0], {$1, $2};", [],
             [(as_int(context, builder, args[0], sig.args[0], 64), "l"), (x, "f"), (y, "f")])
        return context.get_dummy_value()
    return types.void(addr, a, b), codegen


@intrinsic
def ld_acquire_s32(typingctx, addr):
    """`ld.acquire.gpu.global.s32 v, [addr]` (9.7.9.8): a semaphore's value, with every write
    released before it (by `red_release_add_s32`) visible to this thread's later accesses."""
    def codegen(context, builder, sig, args):
        return emit(builder, "ld.acquire.gpu.global.s32 $0, [$1];", [I32],
                    [(as_int(context, builder, args[0], sig.args[0], 64), "l")])
    return types.int32(addr), codegen


@intrinsic
def red_release_add_s32(typingctx, addr, value):
    """`red.release.gpu.global.add.s32 [addr], v` (9.7.13.6): a semaphore's increment that
    releases this thread's earlier writes (and, cumulatively, those it observed) at GPU scope."""
    def codegen(context, builder, sig, args):
        emit(builder, "red.release.gpu.global.add.s32 [$0], $1;", [],
             [(as_int(context, builder, args[0], sig.args[0], 64), "l"),
              (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen
