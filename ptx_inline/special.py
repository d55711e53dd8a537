"""Small special instructions: shared-window addresses, `elect.sync`, `ex2.approx`, `lg2.approx`,
cache policies, warp-uniform indices, byte permutes.
"""
from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import intrinsic

from ._asm import F32, I32, I64, as_int, emit, literal_int, literal_intrinsic


@intrinsic
def shared_address(typingctx, arr):
    """The 32-bit shared-window address of a shared array's first element (`cvta.to.shared`,
    PTX ISA 9.7.9.18): what mbarrier, TMA, wgmma descriptors and ld/st.shared take."""
    if not isinstance(arr, types.Array):
        raise TypingError(f"shared_address takes a shared array, got {arr}")

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.ptrtoint(ary.data, I64)
        text = "{\n.reg .u64 t;\ncvta.to.shared.u64 t, $1;\ncvt.u32.u64 $0, t;\n}"
        return emit(builder, text, [I32], [(ptr, "l")], clobber_memory=False, side_effect=False)
    return types.uint32(arr), codegen


@intrinsic
def elect_one(typingctx):
    """`elect.sync _|p, 0xffffffff` (9.7.12.13): True in exactly one lane of the warp; cheaper and
    clearer than `lane == 0` for "one thread issues the TMA"."""
    def codegen(context, builder, sig, args):
        text = "{\n.reg .pred P;\nelect.sync _|P, 0xffffffff;\nselp.u32 $0, 1, 0, P;\n}"
        r = emit(builder, text, [I32], [], clobber_memory=False)
        return builder.icmp_unsigned("!=", r, I32(0))
    return types.boolean(), codegen


@intrinsic
def ex2(typingctx, x):
    """`ex2.approx.ftz.f32` (9.7.4.9): 2**x on the MUFU unit, one instruction (the softmax's)."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return emit(builder, "ex2.approx.ftz.f32 $0, $1;", [F32], [(v, "f")],
                    clobber_memory=False, side_effect=False)
    return types.float32(x), codegen


@intrinsic
def lg2(typingctx, x):
    """`lg2.approx.ftz.f32` (PTX ISA, floating-point instructions: lg2): log2(x) on the MUFU
    unit, one instruction; exact for powers of two, 0 gives -inf."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[0], sig.args[0], types.float32)
        return emit(builder, "lg2.approx.ftz.f32 $0, $1;", [F32], [(v, "f")],
                    clobber_memory=False, side_effect=False)
    return types.float32(x), codegen


@intrinsic
def policy_evict_last(typingctx):
    """`createpolicy.fractional.L2::evict_last.b64` (9.7.9.19): an L2 policy for tiles re-read by
    other CTAs (use with `tma.load_hint`)."""
    def codegen(context, builder, sig, args):
        return emit(builder, "createpolicy.fractional.L2::evict_last.b64 $0, 1.0;", [I64], [],
                    clobber_memory=False, side_effect=False)
    return types.uint64(), codegen


@intrinsic
def policy_evict_first(typingctx):
    """`createpolicy.fractional.L2::evict_first.b64` (9.7.9.19): for tiles read exactly once."""
    def codegen(context, builder, sig, args):
        return emit(builder, "createpolicy.fractional.L2::evict_first.b64 $0, 1.0;", [I64], [],
                    clobber_memory=False, side_effect=False)
    return types.uint64(), codegen


@intrinsic
def warp_uniform(typingctx, x):
    """Broadcast lane 0's value (`shfl.sync.idx`, 9.7.8.6) so the compiler knows it is uniform
    across the warp: role dispatch on `tid // 128` then compiles to uniform branches."""
    def codegen(context, builder, sig, args):
        v = as_int(context, builder, args[0], sig.args[0], 32)
        return emit(builder, "shfl.sync.idx.b32 $0, $1, 0, 0x1f, 0xffffffff;", [I32], [(v, "r")],
                    clobber_memory=False, side_effect=False)
    return types.uint32(x), codegen


@intrinsic
def recompute_here(typingctx, x):
    """`mov.b32`/`mov.b64` behind a volatile asm: the value cannot be hoisted out of the loop it
    is in, so addresses derived from it are recomputed there instead of being held in registers
    (or spilled) across the whole loop.  For values cheap to rebuild and rarely used, like the
    epilogue's addresses.  32-bit integers stay 32-bit (uint32); wider ones become uint64."""
    if not isinstance(x, (types.Integer, types.IntegerLiteral)):
        raise TypingError(f"recompute_here takes an integer, got {x}")
    bits = 32 if getattr(x, "bitwidth", 64) <= 32 else 64
    out = types.uint32 if bits == 32 else types.uint64

    def codegen(context, builder, sig, args):
        v = as_int(context, builder, args[0], sig.args[0], bits)
        return emit(builder, f"mov.b{bits} $0, $1;", [I32 if bits == 32 else I64],
                    [(v, "r" if bits == 32 else "l")], clobber_memory=False)
    return out(x), codegen


@intrinsic
def uniform_u32(typingctx, x):
    """`redux.sync.min.u32` over the full warp (PTX ISA 9.7.12.10, sm_80+): for a value that is
    already the same in every lane, the same value, but now known warp-uniform to ptxas (REDUX
    writes a uniform register), so addresses and wgmma descriptors derived from it are computed
    on the uniform datapath instead of being moved there (R2UR) before every wgmma."""
    def codegen(context, builder, sig, args):
        v = as_int(context, builder, args[0], sig.args[0], 32)
        return emit(builder, "redux.sync.min.u32 $0, $1, 0xffffffff;", [I32], [(v, "r")],
                    clobber_memory=False, side_effect=False)
    return types.uint32(x), codegen


@intrinsic
def nctaid_x_here(typingctx):
    """`mov.u32 %0, %nctaid.x` (PTX ISA 10.5) behind a volatile asm: the grid size read where it is
    used, not hoisted out of the loop and held (or spilled) in a register across it."""
    def codegen(context, builder, sig, args):
        return emit(builder, "mov.u32 $0, %nctaid.x;", [I32], [], clobber_memory=False)
    return types.uint32(), codegen


@intrinsic
def clock64(typingctx):
    """`mov.u64 %0, %clock64` (PTX ISA 10.14, the SM's cycle counter): timestamps for the kernels'
    trace builds.  Volatile, so each read stays where it is written."""
    def codegen(context, builder, sig, args):
        return emit(builder, "mov.u64 $0, %clock64;", [I64], [], clobber_memory=False)
    return types.uint64(), codegen


@intrinsic
def shfl_xor_b32(typingctx, x, lane_mask):
    """`shfl.sync.bfly.b32` over the full warp (PTX ISA 9.7.8.6): lane i gets lane i ^ lane_mask's
    32 bits.  For packed 16-bit pairs (uint32), which Numba's shfl_xor_sync does not take."""
    def codegen(context, builder, sig, args):
        v = as_int(context, builder, args[0], sig.args[0], 32)
        m = as_int(context, builder, args[1], sig.args[1], 32)
        return emit(builder, "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", [I32], [(v, "r"), (m, "r")],
                    clobber_memory=False, side_effect=False)
    return types.uint32(x, lane_mask), codegen


@literal_intrinsic
def prmt(typingctx, a, b, selector):
    """`prmt.b32 d, a, b, selector` (PTX ISA 9.7.8.7, "prmt") with a compile-time selector: four
    bytes picked from the eight of b:a in one instruction (nibble i of the selector names byte i
    of d: 0-3 from a, 4-7 from b)."""
    sel = literal_int(selector, "prmt selector")

    def codegen(context, builder, sig, args):
        ins = [(as_int(context, builder, args[i], sig.args[i], 32), "r") for i in range(2)]
        return emit(builder, f"prmt.b32 $0, $1, $2, {sel:#x};", [I32], ins, clobber_memory=False,
                    side_effect=False)
    return types.uint32(a, b, selector), codegen
