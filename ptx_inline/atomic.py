"""Global-memory atomics by address (PTX ISA 9.7.13.5 "atom"): what a dynamic tile scheduler
needs.  Relaxed, GPU scope: the counter only hands out numbers, it orders no other data."""
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
