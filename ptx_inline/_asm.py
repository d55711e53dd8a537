"""Shared plumbing for the inline-PTX intrinsics: one `asm` call, typed results, literal checks.

Every intrinsic in this package lowers to exactly one `ir.InlineAsm` call. Multi-register results
come back as an LLVM struct that is unpacked into a Numba tuple without touching memory, so tuples
of accumulators stay in registers across loops (SROA promotes them).
"""
from llvmlite import ir
from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import _intrinsic

I16 = ir.IntType(16)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
F32 = ir.FloatType()
VOID = ir.VoidType()

#: LLVM NVPTX inline-asm constraint letter for each LLVM type.
_CONSTRAINT = {16: "h", 32: "r", 64: "l"}


def constraint(llty):
    if isinstance(llty, ir.FloatType):
        return "f"
    if isinstance(llty, ir.DoubleType):
        return "d"
    return _CONSTRAINT[llty.width]


def emit(builder, template, outs, ins, clobber_memory=True, side_effect=True):
    """Emit one inline-asm statement.

    outs: list of LLVM result types ("=" constraints).  ins: list of (value, constraint) pairs,
    where a constraint may be a tied operand index as a string.  Returns None, a value, or a list.
    """
    cons = ["=" + constraint(t) for t in outs] + [c for _, c in ins]
    if clobber_memory:
        cons.append("~{memory}")
    if not outs:
        ret = VOID
    elif len(outs) == 1:
        ret = outs[0]
    else:
        ret = ir.LiteralStructType(outs)
    fnty = ir.FunctionType(ret, [v.type for v, _ in ins])
    res = builder.asm(fnty, template, ",".join(cons), [v for v, _ in ins], side_effect=side_effect)
    if not outs:
        return None
    if len(outs) == 1:
        return res
    return [builder.extract_value(res, i) for i in range(len(outs))]


def void_asm(text, *kinds):
    """The typer of an intrinsic that takes len(kinds) integers (constraint letters in kinds:
    "r" 32-bit, "l" 64-bit) and runs `text` with them as $0, $1, ..., returning nothing."""
    def typer(typingctx, *args):
        def codegen(context, builder, sig, vals):
            ins = [(as_int(context, builder, v, t, 64 if k == "l" else 32), k)
                   for v, t, k in zip(vals, sig.args, kinds)]
            emit(builder, text, [], ins)
            return context.get_dummy_value()
        return types.void(*args), codegen
    return typer


def literal_int(ty, what):
    """The compile-time value of an integer-literal argument, or a clear typing error."""
    if isinstance(ty, types.IntegerLiteral):
        return ty.literal_value
    if isinstance(ty, types.BooleanLiteral):
        return int(ty.literal_value)
    raise TypingError(f"{what} must be a compile-time integer constant, got {ty}")


def as_int(context, builder, value, fromty, bits):
    """Cast a Numba integer (or literal, or boolean) value to an unsigned LLVM integer of `bits`."""
    target = {16: types.uint16, 32: types.uint32, 64: types.uint64}[bits]
    if isinstance(fromty, types.Literal):
        fromty = fromty.literal_type
    return context.cast(builder, value, fromty, target)


def is_int(ty):
    return isinstance(ty, (types.Integer, types.IntegerLiteral, types.BooleanLiteral, types.Boolean))


#: `@intrinsic` that types its arguments as literals first, so immediates (wait counts, barrier
#: ids, register counts) reach codegen as compile-time values.
literal_intrinsic = _intrinsic(prefer_literal=True, target="cuda")
