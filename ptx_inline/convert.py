"""Packing conversions from float32 (PTX ISA 9.7.9.21 "cvt"; e4m3x2 needs sm_89+).

Each returns the two values packed in one register, `lo` in the low half: the order wgmma expects
for consecutive elements of a row.
"""
from numba import types
from numba.cuda.extending import intrinsic

from ._asm import I16, I32, emit


def _pack(text, out_llty, out_ty):
    def typer(typingctx, lo, hi):
        def codegen(context, builder, sig, args):
            a = context.cast(builder, args[0], sig.args[0], types.float32)
            b = context.cast(builder, args[1], sig.args[1], types.float32)
            # cvt's first source lands in the upper half.
            return emit(builder, text, [out_llty], [(b, "f"), (a, "f")],
                        clobber_memory=False, side_effect=False)
        return out_ty(lo, hi), codegen
    return typer


@intrinsic
def pack_bf16x2(typingctx, lo, hi):
    """`cvt.rn.bf16x2.f32`: two floats -> one uint32 holding two bf16, round to nearest even."""
    return _pack("cvt.rn.bf16x2.f32 $0, $1, $2;", I32, types.uint32)(typingctx, lo, hi)


@intrinsic
def pack_f16x2(typingctx, lo, hi):
    """`cvt.rn.f16x2.f32`: two floats -> one uint32 holding two fp16, round to nearest even."""
    return _pack("cvt.rn.f16x2.f32 $0, $1, $2;", I32, types.uint32)(typingctx, lo, hi)


@intrinsic
def pack_e4m3x2(typingctx, lo, hi):
    """`cvt.rn.satfinite.e4m3x2.f32`: two floats -> one uint16 holding two fp8 e4m3, saturating
    to +-448 instead of producing NaN."""
    return _pack("cvt.rn.satfinite.e4m3x2.f32 $0, $1, $2;", I16, types.uint16)(typingctx, lo, hi)
