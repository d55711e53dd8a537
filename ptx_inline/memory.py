"""Plain loads and stores by address, and the warp-wide matrix moves `ldmatrix`/`stmatrix`
(PTX ISA 9.7.9.8 "ld", 9.7.9.10 "st", 9.7.9.16 "ldmatrix", 9.7.9.17 "stmatrix" (sm_90)).

Kernels in this library name shared memory by 32-bit addresses and global memory by 64-bit
addresses, because tiles are carved out of one dynamic allocation by computed offsets.
"""
from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import intrinsic

from ._asm import F32, I32, as_int, emit


def _regs(tup, count, what):
    if not (isinstance(tup, types.UniTuple) and tup.count == count and isinstance(tup.dtype, types.Integer)):
        raise TypingError(f"{what} takes a tuple of {count} uint32, got {tup}")


@intrinsic
def st_shared_v4(typingctx, addr, regs):
    """`st.shared.v4.b32 [addr], {a, b, c, d}`: one 16-byte store (addr 16-byte aligned)."""
    _regs(regs, 4, "st_shared_v4")

    def codegen(context, builder, sig, args):
        ins = [(as_int(context, builder, args[0], sig.args[0], 32), "r")]
        ins += [(as_int(context, builder, builder.extract_value(args[1], i), sig.args[1].dtype, 32), "r")
                for i in range(4)]
        emit(builder, "st.shared.v4.b32 [$0], {$1, $2, $3, $4};", [], ins)
        return context.get_dummy_value()
    return types.void(addr, regs), codegen


@intrinsic
def st_shared_b32(typingctx, addr, value):
    """`st.shared.b32 [addr], v`."""
    def codegen(context, builder, sig, args):
        emit(builder, "st.shared.b32 [$0], $1;", [],
             [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
              (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen


@intrinsic
def st_shared_f32(typingctx, addr, value):
    """`st.shared.f32 [addr], v`."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], types.float32)
        emit(builder, "st.shared.f32 [$0], $1;", [], [(as_int(context, builder, args[0], sig.args[0], 32), "r"), (v, "f")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen


@intrinsic
def st_shared_v2_f32(typingctx, addr, a, b):
    """`st.shared.v2.f32 [addr], {a, b}`: 8-byte store (addr 8-byte aligned)."""
    def codegen(context, builder, sig, args):
        x = context.cast(builder, args[1], sig.args[1], types.float32)
        y = context.cast(builder, args[2], sig.args[2], types.float32)
        emit(builder, "st.shared.v2.f32 [$0], {$1, $2};", [],
             [(as_int(context, builder, args[0], sig.args[0], 32), "r"), (x, "f"), (y, "f")])
        return context.get_dummy_value()
    return types.void(addr, a, b), codegen


@intrinsic
def ld_shared_b32(typingctx, addr):
    """`ld.shared.b32 v, [addr]`."""
    def codegen(context, builder, sig, args):
        return emit(builder, "ld.shared.b32 $0, [$1];", [I32],
                    [(as_int(context, builder, args[0], sig.args[0], 32), "r")])
    return types.uint32(addr), codegen


@intrinsic
def ld_shared_f32(typingctx, addr):
    """`ld.shared.f32 v, [addr]`."""
    def codegen(context, builder, sig, args):
        return emit(builder, "ld.shared.f32 $0, [$1];", [F32],
                    [(as_int(context, builder, args[0], sig.args[0], 32), "r")])
    return types.float32(addr), codegen


@intrinsic
def st_global_f32(typingctx, addr, value):
    """`st.global.f32 [addr], v` with a 64-bit global address."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], types.float32)
        emit(builder, "st.global.f32 [$0], $1;", [], [(as_int(context, builder, args[0], sig.args[0], 64), "l"), (v, "f")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen


@intrinsic
def st_global_b32(typingctx, addr, value):
    """`st.global.b32 [addr], v` with a 64-bit global address (e.g. a packed bf16x2 pair)."""
    def codegen(context, builder, sig, args):
        emit(builder, "st.global.b32 [$0], $1;", [], [(as_int(context, builder, args[0], sig.args[0], 64), "l"),
                                                      (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen


@intrinsic
def st_global_b64(typingctx, addr, value):
    """`st.global.b64 [addr], v` with a 64-bit global address (e.g. a trace timestamp)."""
    def codegen(context, builder, sig, args):
        emit(builder, "st.global.b64 [$0], $1;", [], [(as_int(context, builder, args[0], sig.args[0], 64), "l"),
                                                      (as_int(context, builder, args[1], sig.args[1], 64), "l")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen


@intrinsic
def st_global_v4_b32(typingctx, addr, regs):
    """`st.global.v4.b32 [addr], {r0..r3}`: 16 bytes from one thread (addr 16-byte aligned), e.g.
    eight bf16 of an output row."""
    _regs(regs, 4, "st_global_v4_b32")

    def codegen(context, builder, sig, args):
        ins = [(as_int(context, builder, args[0], sig.args[0], 64), "l")]
        ins += [(as_int(context, builder, builder.extract_value(args[1], i), sig.args[1].dtype, 32), "r")
                for i in range(4)]
        emit(builder, "st.global.v4.b32 [$0], {$1, $2, $3, $4};", [], ins)
        return context.get_dummy_value()
    return types.void(addr, regs), codegen


@intrinsic
def ld_global_s32(typingctx, addr):
    """`ld.global.s32 v, [addr]` (e.g. a cu_seqlens entry)."""
    def codegen(context, builder, sig, args):
        return emit(builder, "ld.global.s32 $0, [$1];", [I32],
                    [(as_int(context, builder, args[0], sig.args[0], 64), "l")], clobber_memory=False)
    return types.int32(addr), codegen


@intrinsic
def ld_global_nc_f32(typingctx, addr):
    """`ld.global.nc.f32 v, [addr]`: read-only data through the non-coherent (texture) path."""
    def codegen(context, builder, sig, args):
        return emit(builder, "ld.global.nc.f32 $0, [$1];", [F32],
                    [(as_int(context, builder, args[0], sig.args[0], 64), "l")], clobber_memory=False)
    return types.float32(addr), codegen


def _stmatrix_x4(template, what):
    """The typing and codegen of a stmatrix.x4 form `template` ($0 the address, $1-$4 the
    registers)."""
    def typer(typingctx, addr, regs):
        _regs(regs, 4, what)

        def codegen(context, builder, sig, args):
            ins = [(as_int(context, builder, args[0], sig.args[0], 32), "r")]
            ins += [(as_int(context, builder, builder.extract_value(args[1], i), sig.args[1].dtype, 32), "r")
                    for i in range(4)]
            emit(builder, template, [], ins)
            return context.get_dummy_value()
        return types.void(addr, regs), codegen
    return typer


@intrinsic
def stmatrix_x4(typingctx, addr, regs):
    """`stmatrix.sync.aligned.m8n8.x4.shared.b16 [addr], {r0..r3}`: the warp stores four 8x8
    16-bit matrices; lane i gives the address of row i%8 of matrix i//8.  Register j of each lane
    holds that lane's two elements of matrix j, the layout of an MMA accumulator fragment."""
    return _stmatrix_x4("stmatrix.sync.aligned.m8n8.x4.shared.b16 [$0], {$1, $2, $3, $4};",
                        "stmatrix_x4")(typingctx, addr, regs)


@intrinsic
def stmatrix_x4_trans(typingctx, addr, regs):
    """`stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [addr], {r0..r3}` (9.7.9.17): as
    `stmatrix_x4` with each 8x8 matrix stored transposed: lane i gives the address of row i%8
    of matrix i//8 in memory, which receives column i%8 of the fragment's matrix (its 8 rows'
    elements, 16 contiguous bytes)."""
    return _stmatrix_x4("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [$0], {$1, $2, $3, $4};",
                        "stmatrix_x4_trans")(typingctx, addr, regs)


@intrinsic
def ldmatrix_x4(typingctx, addr):
    """`ldmatrix.sync.aligned.m8n8.x4.shared.b16`: the inverse of `stmatrix_x4`."""
    def codegen(context, builder, sig, args):
        out = emit(builder, "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {$0, $1, $2, $3}, [$4];",
                   [I32] * 4, [(as_int(context, builder, args[0], sig.args[0], 32), "r")])
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(types.uint32, 4)(addr), codegen


@intrinsic
def ld_shared_v2_f32(typingctx, addr):
    """`ld.shared.v2.f32 {a, b}, [addr]`: two adjacent float32 (addr 8-byte aligned), e.g. the
    LSE of a fragment's two columns."""
    def codegen(context, builder, sig, args):
        out = emit(builder, "ld.shared.v2.f32 {$0, $1}, [$2];", [F32, F32],
                   [(as_int(context, builder, args[0], sig.args[0], 32), "r")], clobber_memory=False)
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(types.float32, 2)(addr), codegen


@intrinsic
def ld_global_nc_v4_f32(typingctx, addr):
    """`ld.global.nc.v4.f32 {a, b, c, d}, [addr]` (9.7.9.8): four adjacent float32 (addr 16-byte
    aligned) through the non-coherent path, for data no thread writes during the kernel (e.g. a
    float32 accumulator that a previous kernel filled)."""
    def codegen(context, builder, sig, args):
        out = emit(builder, "ld.global.nc.v4.f32 {$0, $1, $2, $3}, [$4];", [F32] * 4,
                   [(as_int(context, builder, args[0], sig.args[0], 64), "l")], clobber_memory=False)
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(types.float32, 4)(addr), codegen


#: 16-bit elements in one 16-byte load.
_HALVES_PER_V4 = 8
#: The load the widenings share: four 32-bit words from the address, operand $8 (after the eight
#: float32 outputs); global (64-bit address, non-coherent path) or shared (32-bit address).
_LD_V4_WORDS = {"global": f"ld.global.nc.v4.b32 {{w0, w1, w2, w3}}, [${_HALVES_PER_V4}];",
                "shared": f"ld.shared.v4.b32 {{w0, w1, w2, w3}}, [${_HALVES_PER_V4}];"}
_ADDRESS_BITS = {"global": (64, "l"), "shared": (32, "r")}


def _widening_load(widen, scratch="", space="global"):
    """An intrinsic of `addr` returning the eight 16-bit elements at addr (16-byte aligned) as
    eight float32, element 2i from the lower half of word i and 2i + 1 from its upper half: one
    `ld.global.nc.v4.b32` (or `ld.shared.v4.b32`, `space`) and `widen(word, first_output)`'s
    conversion of each word, which may use the registers `scratch` declares."""
    text = "{\n.reg .b32 w<4>;\n" + scratch + _LD_V4_WORDS[space] + "\n"
    text += "".join(widen(f"w{i}", 2 * i) for i in range(_HALVES_PER_V4 // 2)) + "}"
    bits, letter = _ADDRESS_BITS[space]

    def typer(typingctx, addr):
        def codegen(context, builder, sig, args):
            out = emit(builder, text, [F32] * _HALVES_PER_V4,
                       [(as_int(context, builder, args[0], sig.args[0], bits), letter)], clobber_memory=False)
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(types.float32, _HALVES_PER_V4)(addr), codegen
    return typer


def _bf16_words(word, out):
    # bf16 is float32's upper half: the lower element shifted up, the upper one masked.
    return f"shl.b32 ${out}, {word}, 16;\nand.b32 ${out + 1}, {word}, 0xFFFF0000;\n"


def _f16_words(word, out):
    return f"mov.b32 {{h0, h1}}, {word};\ncvt.f32.f16 ${out}, h0;\ncvt.f32.f16 ${out + 1}, h1;\n"


@intrinsic
def ld_global_nc_v4_bf16_f32(typingctx, addr):
    """`ld.global.nc.v4.b32` (9.7.9.8) of eight bf16 (addr 16-byte aligned), returned as eight
    float32: exact, a bf16 being a float32 with a shorter mantissa (`shl`/`and`, "Logic and Shift
    Instructions").  For a 16-bit row read once in 16-byte pieces and summed in float32 (the
    backward's rowsum(dO * O))."""
    return _widening_load(_bf16_words)(typingctx, addr)


@intrinsic
def ld_global_nc_v4_f16_f32(typingctx, addr):
    """`ld.global.nc.v4.b32` (9.7.9.8) of eight fp16 (addr 16-byte aligned), returned as eight
    float32: exact (`cvt.f32.f16`, 9.7.9.21).  As `ld_global_nc_v4_bf16_f32`."""
    return _widening_load(_f16_words, ".reg .b16 h<2>;\n")(typingctx, addr)


@intrinsic
def ld_global_nc_v4_b32(typingctx, addr):
    """`ld.global.nc.v4.b32 {a, b, c, d}, [addr]` (9.7.9.8): four 32-bit words (addr 16-byte
    aligned) through the non-coherent path, as uint32: bit patterns that the kernel combines
    with data, such as the sign masks of the FP8 quantizer's rotation."""
    def codegen(context, builder, sig, args):
        out = emit(builder, "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];", [I32] * 4,
                   [(as_int(context, builder, args[0], sig.args[0], 64), "l")], clobber_memory=False)
        return context.make_tuple(builder, sig.return_type, out)
    return types.UniTuple(types.uint32, 4)(addr), codegen


#: The flip of `_flipping_load`: each loaded word xor-ed with its mask, operands $9..$12 (after
#: the eight float32 outputs and the address).
_XOR_WORDS = "".join(f"xor.b32 w{i}, w{i}, ${_HALVES_PER_V4 + 1 + i};\n" for i in range(_HALVES_PER_V4 // 2))


def _flipping_load(widen, scratch="", space="global"):
    """As `_widening_load`, with a tuple of four uint32 masks after the address: word i is xor-ed
    with mask i before it is widened, so a mask bit 15 or 31 negates element 2i or 2i + 1
    (the sign bit of a bf16 or an fp16; negation is exact)."""
    text = "{\n.reg .b32 w<4>;\n" + scratch + _LD_V4_WORDS[space] + "\n" + _XOR_WORDS
    text += "".join(widen(f"w{i}", 2 * i) for i in range(_HALVES_PER_V4 // 2)) + "}"
    bits, letter = _ADDRESS_BITS[space]

    def typer(typingctx, addr, masks):
        _regs(masks, 4, "a sign-flipping load")

        def codegen(context, builder, sig, args):
            ins = [(as_int(context, builder, args[0], sig.args[0], bits), letter)]
            ins += [(as_int(context, builder, builder.extract_value(args[1], i), sig.args[1].dtype, 32), "r")
                    for i in range(_HALVES_PER_V4 // 2)]
            out = emit(builder, text, [F32] * _HALVES_PER_V4, ins, clobber_memory=False)
            return context.make_tuple(builder, sig.return_type, out)
        return types.UniTuple(types.float32, _HALVES_PER_V4)(addr, masks), codegen
    return typer


@intrinsic
def ld_global_nc_v4_xor_bf16_f32(typingctx, addr, masks):
    """`ld.global.nc.v4.b32` (9.7.9.8) of eight bf16, `xor.b32` (9.7.8, "Logic and Shift
    Instructions") of each word with a mask, widened to eight float32 as by
    `ld_global_nc_v4_bf16_f32`: a row read once with a sign pattern applied on the way (the FP8
    quantizer's random signs, half an instruction per element instead of one)."""
    return _flipping_load(_bf16_words)(typingctx, addr, masks)


@intrinsic
def ld_global_nc_v4_xor_f16_f32(typingctx, addr, masks):
    """As `ld_global_nc_v4_xor_bf16_f32`, for eight fp16 (`cvt.f32.f16`, 9.7.9.21)."""
    return _flipping_load(_f16_words, ".reg .b16 h<2>;\n")(typingctx, addr, masks)


@intrinsic
def ld_shared_v4_bf16_f32(typingctx, addr):
    """`ld.shared.v4.b32` (9.7.9.8) of eight bf16 at a 16-byte aligned shared address, widened to
    eight float32 as by `ld_global_nc_v4_bf16_f32`: rows that a bulk copy brought into shared
    memory ahead of their use (the FP8 quantizer's ring)."""
    return _widening_load(_bf16_words, space="shared")(typingctx, addr)


@intrinsic
def ld_shared_v4_f16_f32(typingctx, addr):
    """As `ld_shared_v4_bf16_f32`, for eight fp16 (`cvt.f32.f16`, 9.7.9.21)."""
    return _widening_load(_f16_words, ".reg .b16 h<2>;\n", space="shared")(typingctx, addr)


@intrinsic
def ld_shared_v4_xor_bf16_f32(typingctx, addr, masks):
    """`ld_shared_v4_bf16_f32` with each word xor-ed with a mask first, as
    `ld_global_nc_v4_xor_bf16_f32` (the quantizer's random signs)."""
    return _flipping_load(_bf16_words, space="shared")(typingctx, addr, masks)


@intrinsic
def ld_shared_v4_xor_f16_f32(typingctx, addr, masks):
    """As `ld_shared_v4_xor_bf16_f32`, for eight fp16."""
    return _flipping_load(_f16_words, ".reg .b16 h<2>;\n", space="shared")(typingctx, addr, masks)


@intrinsic
def st_shared_cluster_f32(typingctx, addr, value):
    """`st.shared::cluster.f32 [addr], v` (9.7.9.10): a store into the shared memory of a CTA of
    this cluster, at a shared::cluster address from `cluster.map_shared` (sm_90)."""
    def codegen(context, builder, sig, args):
        v = context.cast(builder, args[1], sig.args[1], types.float32)
        emit(builder, "st.shared::cluster.f32 [$0], $1;", [],
             [(as_int(context, builder, args[0], sig.args[0], 32), "r"), (v, "f")])
        return context.get_dummy_value()
    return types.void(addr, value), codegen
