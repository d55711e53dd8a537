"""32-bit index arithmetic.  Numba types every integer expression as int64, and a 64-bit division
is a ~70-instruction subroutine that holds many registers; tile and head indices fit 32 bits, so
the kernels divide them with these instead."""
from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import intrinsic


def _is_int(ty):
    return isinstance(ty, (types.Integer, types.IntegerLiteral))


@intrinsic
def udivmod32(typingctx, a, b):
    """(a // b, a % b) for 0 <= a, 0 < b < 2**31, computed in 32 bits; results are int32."""
    if not (_is_int(a) and _is_int(b)):
        raise TypingError(f"udivmod32 takes integers, got {a}, {b}")

    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[0], sig.args[0], types.uint32)
        y = context.cast(builder, args[1], sig.args[1], types.uint32)
        return context.make_tuple(builder, sig.return_type, [builder.udiv(x, y), builder.urem(x, y)])
    return types.UniTuple(types.int32, 2)(a, b), codegen
