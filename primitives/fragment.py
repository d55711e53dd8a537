"""Register fragments of wgmma accumulators (PTX ISA 9.7.15.5.1, "Register Fragments", m64nNk*).

A warpgroup's m64 x nN f32 accumulator is a tuple of N/2 registers per thread.  Register i of
thread t (0..127) holds element (row, col) with
    row = 16 * (t // 32) + (t % 32) // 4 + 8 * ((i // 2) % 2)
    col = 8 * (i // 4) + 2 * (t % 4) + i % 2
so each thread owns two rows (r and r + 8) and, per 8-column group j, registers 4j..4j+3:
(r, c), (r, c+1), (r+8, c), (r+8, c+1).  Loops over j with a compile-time trip count unroll
fully, which keeps the tuple in registers (CI fails on any stack frame).
"""
import numpy as np
from numba import cuda
from numba_fa3.ptx_inline import special

#: Registers per 8-column group, and threads per row of a group.
REGS_PER_GROUP = 4
THREADS_PER_ROW = 4
#: Offset of the second row's (r + 8) first register within an 8-column group.
SECOND_ROW_REG = 2


def zeros(count):
    """A tuple constant of `count` float32 zeros: the initial accumulator."""
    return (np.float32(0),) * count


@cuda.jit(device=True, forceinline=True)
def row_of(tid, i):
    return 16 * (tid // 32) + (tid % 32) // 4 + 8 * ((i // 2) % 2)


@cuda.jit(device=True, forceinline=True)
def col_of(tid, i):
    return 8 * (i // 4) + 2 * (tid % 4) + i % 2


# --- whole-fragment elementwise work, unrolled in the generated code --------------------------
# These lower straight to LLVM over every register of the tuple, so no loop or index survives
# into PTX.  Row selection follows the layout above: registers i with (i // 2) % 2 == 0 belong
# to the thread's first row, the others to its second (row + 8).

from numba import types as _types  # noqa: E402
from numba.core.errors import TypingError as _TypingError  # noqa: E402
from numba.cuda.extending import intrinsic as _intrinsic  # noqa: E402
from llvmlite import ir as _ir  # noqa: E402

from numba_fa3.ptx_inline._asm import F32 as _F32, I32 as _I32, emit as _emit  # noqa: E402


def _f32_tuple(t, what):
    if not (isinstance(t, _types.UniTuple) and t.dtype == _types.float32 and t.count % REGS_PER_GROUP == 0):
        raise _TypingError(f"{what}: expected an accumulator tuple of float32 (multiple of 4), got {t}")
    return t.count


def _vals(builder, tup, n):
    return [builder.extract_value(tup, i) for i in range(n)]


def _f32(context, builder, v, ty):
    return context.cast(builder, v, ty, _types.float32)


def _second_row(i):
    return (i % REGS_PER_GROUP) // SECOND_ROW_REG == 1


def _fmax(builder, a, b):
    # max.f32 semantics (NaN-ignoring); -inf stays -inf.
    return _emit(builder, "max.f32 $0, $1, $2;", [_F32], [(a, "f"), (b, "f")],
                 clobber_memory=False, side_effect=False)


def _after(builder, x, dep):
    """fma(dep, 0, x) in inline PTX (which LLVM cannot fold away): x, ordered after dep."""
    return _emit(builder, "fma.rn.f32 $0, $1, 0f00000000, $2;", [_F32], [(dep, "f"), (x, "f")],
                 clobber_memory=False, side_effect=False)


def _tree(builder, vals, op):
    """Pairwise reduction: depth log2(n) instead of a chain of n dependent instructions, which
    matters because the softmax of one warpgroup runs alone on its SM sub-partitions while the
    other warpgroup's GEMMs run (ping-pong): its latency is not hidden by other warps."""
    while len(vals) > 1:
        nxt = [op(builder, vals[i], vals[i + 1]) for i in range(0, len(vals) - 1, 2)]
        if len(vals) % 2:
            nxt.append(vals[-1])
        vals = nxt
    return vals[0]


def _row_reduce(name, op):
    def typer(typingctx, acc):
        n = _f32_tuple(acc, name)

        def codegen(context, builder, sig, args):
            v = _vals(builder, args[0], n)
            rows = [[x for i, x in enumerate(v) if int(_second_row(i)) == k] for k in (0, 1)]
            return context.make_tuple(builder, sig.return_type, [_tree(builder, r, op) for r in rows])
        return _types.UniTuple(_types.float32, 2)(acc), codegen
    return typer


@_intrinsic
def row_max(typingctx, acc):
    """(max over the thread's registers of row r, of row r + 8): before the quad reduction."""
    return _row_reduce("row_max", _fmax)(typingctx, acc)


@_intrinsic
def row_sum(typingctx, acc):
    """(sum of the thread's registers of row r, of row r + 8)."""
    return _row_reduce("row_sum", lambda b, x, y: b.fadd(x, y))(typingctx, acc)


def _bounds(n, first, last, what):
    lo, hi = (t.literal_value if isinstance(t, _types.IntegerLiteral) else None for t in (first, last))
    if lo is None or hi is None or not 0 <= lo <= hi <= n:
        raise _TypingError(f"{what}: bounds must be compile-time integers within 0..{n}, got {first}, {last}")
    return lo, hi


def _scale_codegen(n, lo, hi):
    """acc (args: acc, s0, s1) with registers lo..hi-1 multiplied by their row's factor."""
    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        f = (_f32(context, builder, args[1], sig.args[1]), _f32(context, builder, args[2], sig.args[2]))
        out = [builder.fmul(x, f[int(_second_row(i))]) if lo <= i < hi else x for i, x in enumerate(v)]
        return context.make_tuple(builder, sig.return_type, out)
    return codegen


_EXP2 = "{\n.reg .f32 t;\nfma.rn.ftz.f32 t, $1, $2, $3;\nex2.approx.ftz.f32 $0, t;\n}"


def _exp2_codegen(n, lo, hi):
    """acc (args: acc, scale, b0, b1) with registers lo..hi-1 replaced by ex2(x * scale - b_row):
    one FFMA and one MUFU.EX2 each."""
    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        sc = _f32(context, builder, args[1], sig.args[1])
        b = (_f32(context, builder, args[2], sig.args[2]), _f32(context, builder, args[3], sig.args[3]))
        out = list(v)
        for i in range(lo, hi):
            out[i] = _emit(builder, _EXP2, [_F32],
                           [(v[i], "f"), (sc, "f"), (builder.fsub(_ir.Constant(_F32, -0.0), b[int(_second_row(i))]), "f")],
                           clobber_memory=False, side_effect=False)
        return context.make_tuple(builder, sig.return_type, out)
    return codegen


@_intrinsic
def scale_rows(typingctx, acc, s0, s1):
    """acc with row r multiplied by s0 and row r + 8 by s1 (the online-softmax rescale of O)."""
    n = _f32_tuple(acc, "scale_rows")
    return acc(acc, s0, s1), _scale_codegen(n, 0, n)


@_intrinsic
def scale_regs(typingctx, acc, s0, s1, first, last):
    """`scale_rows` on registers first..last-1 only (compile-time bounds)."""
    n = _f32_tuple(acc, "scale_regs")
    return acc(acc, s0, s1, first, last), _scale_codegen(n, *_bounds(n, first, last, "scale_regs"))


@_intrinsic
def exp2_rows(typingctx, acc, scale, b0, b1):
    """ex2(x * scale - b_row) for every register: the softmax's exponentials."""
    n = _f32_tuple(acc, "exp2_rows")
    return acc(acc, scale, b0, b1), _exp2_codegen(n, 0, n)


@_intrinsic
def exp2_regs(typingctx, acc, scale, b0, b1, first, last):
    """`exp2_rows` on registers first..last-1 only (compile-time bounds), the others passed
    through: the softmax's exponentials in parts, with other work placed between them."""
    n = _f32_tuple(acc, "exp2_regs")
    return acc(acc, scale, b0, b1, first, last), _exp2_codegen(n, *_bounds(n, first, last, "exp2_regs"))


@_intrinsic
def after(typingctx, x, dep):
    """x, computed as fma(dep, 0, x): the same value for any finite dep, but ptxas must now
    schedule whatever produces dep first (an order dependency, one FFMA)."""
    def codegen(context, builder, sig, args):
        return _after(builder, _f32(context, builder, args[0], sig.args[0]),
                      _f32(context, builder, args[1], sig.args[1]))
    return _types.float32(x, dep), codegen


@_intrinsic
def zero_after(typingctx, dep):
    """The uint32 0, computed as cvt.rzi.u32.f32(fma(dep, 0, 0)) (PTX ISA 9.7.3.6 "fma", 9.7.9.21
    "cvt": NaN converts to 0), so it is 0 for every dep, NaN and inf included, but ptxas must
    schedule whatever produces dep first: an integer order dependency (add it to an address)."""
    def codegen(context, builder, sig, args):
        d = _f32(context, builder, args[0], sig.args[0])
        return _emit(builder, "{\n.reg .f32 t;\nfma.rn.f32 t, $1, 0f00000000, 0f00000000;\ncvt.rzi.u32.f32 $0, t;\n}",
                     [_I32], [(d, "f")], clobber_memory=False, side_effect=False)
    return _types.uint32(dep), codegen


@_intrinsic
def tanh_rows(typingctx, acc, scale):
    """tanh.approx(x * scale) for every register (PTX ISA 9.7.4.12 "tanh"): the logit soft-cap
    of Gemma-style attention, softcap * tanh(s / softcap), with the factor outside folded into
    the exponent scale."""
    n = _f32_tuple(acc, "tanh_rows")

    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        sc = _f32(context, builder, args[1], sig.args[1])
        out = [_emit(builder, "{\n.reg .f32 t;\nmul.ftz.f32 t, $1, $2;\ntanh.approx.f32 $0, t;\n}",
                     [_F32], [(x, "f"), (sc, "f")], clobber_memory=False, side_effect=False) for x in v]
        return context.make_tuple(builder, sig.return_type, out)
    return acc(acc, scale), codegen


@_intrinsic
def mask_cols(typingctx, acc, col0, lo0, hi0, lo1, hi1):
    """-inf where the register's column c = 8 * (i // 4) + i % 2 + col0 falls outside [lo, hi)
    of its row (lo0/hi0 for row r, lo1/hi1 for row r + 8)."""
    n = _f32_tuple(acc, "mask_cols")

    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        c0 = context.cast(builder, args[1], sig.args[1], _types.int32)
        lims = [context.cast(builder, a, t, _types.int32) for a, t in zip(args[2:], sig.args[2:])]
        ninf = _ir.Constant(_F32, float("-inf"))
        out = []
        for i, x in enumerate(v):
            col = builder.add(c0, _ir.Constant(_I32, 8 * (i // 4) + i % 2))
            k = int(_second_row(i))
            lo, hi = lims[2 * k], lims[2 * k + 1]
            keep = builder.and_(builder.icmp_signed(">=", col, lo), builder.icmp_signed("<", col, hi))
            out.append(builder.select(keep, x, ninf))
        return context.make_tuple(builder, sig.return_type, out)
    return acc(acc, col0, lo0, hi0, lo1, hi1), codegen


def _pack_pairs(text):
    def typer(typingctx, acc):
        n = _f32_tuple(acc, "pack")

        def codegen(context, builder, sig, args):
            v = _vals(builder, args[0], n)
            out = [_emit(builder, text, [_I32], [(v[2 * p + 1], "f"), (v[2 * p], "f")],
                         clobber_memory=False, side_effect=False) for p in range(n // 2)]
            return context.make_tuple(builder, sig.return_type, out)
        return _types.UniTuple(_types.uint32, n // 2)(acc), codegen
    return typer


@_intrinsic
def pack_bf16(typingctx, acc):
    """Consecutive register pairs -> bf16x2.  For an S accumulator this is exactly the wgmma A
    fragment of P: registers 4kk..4kk+3 of the result are the A operand of k-step kk."""
    return _pack_pairs("cvt.rn.bf16x2.f32 $0, $1, $2;")(typingctx, acc)


@_intrinsic
def pack_f16(typingctx, acc):
    """Consecutive register pairs -> f16x2 (see pack_bf16)."""
    return _pack_pairs("cvt.rn.f16x2.f32 $0, $1, $2;")(typingctx, acc)


#: Accumulator registers that feed one 8-bit A fragment register of a k = 32 wgmma, per
#: register of a k step's four: of the step's 32 columns (16 accumulator registers), a0 takes
#: the first row's columns 2q, 2q+1 (group 0) and 8+2q, 9+2q (group 1), a1 the same of the
#: second row, a2 and a3 groups 2 and 3.
E4M3_FRAGMENT_SOURCES = ((0, 1, 4, 5), (2, 3, 6, 7), (8, 9, 12, 13), (10, 11, 14, 15))
#: Accumulator registers per k = 32 step (two 8-column groups per 16 columns, two rows).
E4M3_STEP_REGS = 16


@_intrinsic
def pack_e4m3(typingctx, acc):
    """An S accumulator -> the e4m3 A fragments of P (PTX ISA 9.7.15.5.1, m64nNk32 A layout:
    register a holds 4 consecutive columns 4q..4q+3 of one row).  Registers are packed in
    accumulator order (`E4M3_FRAGMENT_SOURCES`, two `cvt.rn.satfinite.e4m3x2.f32`), so fragment
    column 4q + i holds key [2q, 2q+1, 8+2q, 9+2q][i] of its 16: the GEMM's B operand (V) must
    hold its rows in that order (`numba_fa3.fp8_layout`), which costs no register permute.
    Values beyond e4m3's range saturate to +-448."""
    n = _f32_tuple(acc, "pack_e4m3")
    if n % E4M3_STEP_REGS:
        raise _TypingError(f"pack_e4m3: {n} registers are not whole k = 32 steps ({E4M3_STEP_REGS} each)")
    text = ("{\n.reg .b16 lo, hi;\n"
            "cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1;\n"
            "cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3;\n"
            "mov.b32 $0, {lo, hi};\n}")

    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        out = []
        for step in range(n // E4M3_STEP_REGS):
            for src in E4M3_FRAGMENT_SOURCES:
                r = [v[E4M3_STEP_REGS * step + i] for i in src]
                out.append(_emit(builder, text, [_I32], [(x, "f") for x in r],
                                 clobber_memory=False, side_effect=False))
        return context.make_tuple(builder, sig.return_type, out)
    return _types.UniTuple(_types.uint32, n // 4)(acc), codegen


@cuda.jit(device=True, forceinline=True)
def quad_transpose(v0, v1, v2, v3, lane):
    """Transpose a 4 x 4 block of 32-bit values across the four threads of a quad (the threads
    sharing a fragment row): thread q gives (v0..v3) = its values of column groups 0..3 and gets
    back group q's values from threads 0..3, in thread order.  For packed 16-bit output that turns
    four 4-byte pieces of a row per thread into one 16-byte run (one `st.global.v4` instead of
    four partial-sector stores).  Two butterfly stages (xor 2, then xor 1), four shuffles."""
    hi = (lane & 2) != 0
    lo = (lane & 1) != 0
    # Stage 1: keep the two groups on this thread's side of bit 1, swap the other two.
    r0 = special.shfl_xor_b32(v0 if hi else v2, 2)
    r1 = special.shfl_xor_b32(v1 if hi else v3, 2)
    # a[s][e]: from the thread with bit 1 = s, group 2 * hi + e
    a00, a01 = (r0, r1) if hi else (v0, v1)
    a10, a11 = (v2, v3) if hi else (r0, r1)
    # Stage 2: the same on bit 0.
    t0 = special.shfl_xor_b32(a00 if lo else a01, 1)
    t1 = special.shfl_xor_b32(a10 if lo else a11, 1)
    if lo:
        return t0, a01, t1, a11
    return a00, t0, a10, t1


# --- per-column work: fragments whose columns are the rows of another matrix --------------------
# The backward computes S^T and dP^T (rows: keys, columns: queries), so the softmax statistics
# that belong to a query (its LSE, its D = rowsum(dO * O)) vary along a fragment's columns.  A
# thread's columns are 8 j + 2 (t % 4) + {0, 1} for its n/8 groups j: n/4 values per thread, in
# the order `col_index` gives (`column_loader` reads them from shared memory).

def col_index(i):
    """Index into a thread's per-column values of accumulator register i."""
    return 2 * (i // REGS_PER_GROUP) + i % 2


def _cols_tuple(cols, n, what):
    if not (isinstance(cols, _types.UniTuple) and cols.dtype == _types.float32 and cols.count == n // 2):
        raise _TypingError(f"{what}: expected {n // 2} float32 column values, got {cols}")


@_intrinsic
def exp2_cols(typingctx, acc, scale, cols):
    """ex2(x * scale - cols[col_index(i)]) for every register (one FFMA and one MUFU.EX2 each):
    P^T from S^T with each query's log2-unit LSE; an LSE of +inf gives 0 for any finite x."""
    n = _f32_tuple(acc, "exp2_cols")
    _cols_tuple(cols, n, "exp2_cols")

    def codegen(context, builder, sig, args):
        v = _vals(builder, args[0], n)
        sc = _f32(context, builder, args[1], sig.args[1])
        c = _vals(builder, args[2], n // 2)
        out = [_emit(builder, _EXP2, [_F32], [(x, "f"), (sc, "f"), (builder.fsub(_ir.Constant(_F32, -0.0), c[col_index(i)]), "f")],
                     clobber_memory=False, side_effect=False) for i, x in enumerate(v)]
        return context.make_tuple(builder, sig.return_type, out)
    return acc(acc, scale, cols), codegen


@_intrinsic
def sub_cols_mul(typingctx, p, dp, cols):
    """p * (dp - cols[col_index(i)]) for every register: dS^T = P^T * (dP^T - D) with each
    query's D."""
    n = _f32_tuple(p, "sub_cols_mul")
    if dp != p:
        raise _TypingError(f"sub_cols_mul: p and dp must be alike, got {p} and {dp}")
    _cols_tuple(cols, n, "sub_cols_mul")

    def codegen(context, builder, sig, args):
        a, b = _vals(builder, args[0], n), _vals(builder, args[1], n)
        c = _vals(builder, args[2], n // 2)
        out = [builder.fmul(a[i], builder.fsub(b[i], c[col_index(i)])) for i in range(n)]
        return context.make_tuple(builder, sig.return_type, out)
    return p(p, dp, cols), codegen


_LG2 = "lg2.approx.ftz.f32 $0, $1;"


@_intrinsic
def mul_tanh_slope(typingctx, ds, p, cols, inv_scale):
    """ds * max(0, 1 - t * t) for every register, with t = (lg2(p) + cols[col_index(i)]) *
    inv_scale recovered from P^T = exp2(t * scale - LSE_log2): the soft-cap's derivative at the
    cost of one MUFU.LG2 each instead of t's registers held from the scores to dS.  Where P is 0
    (masked, or underflowed) t is infinite, the slope clamps to 0 and so does ds; where P is tiny,
    lg2's absolute error moves t by far less than dS's bf16/fp16 rounding."""
    n = _f32_tuple(ds, "mul_tanh_slope")
    if p != ds:
        raise _TypingError(f"mul_tanh_slope: ds and p must be alike, got {ds} and {p}")
    _cols_tuple(cols, n, "mul_tanh_slope")

    def codegen(context, builder, sig, args):
        d, pv = _vals(builder, args[0], n), _vals(builder, args[1], n)
        c = _vals(builder, args[2], n // 2)
        inv = _f32(context, builder, args[3], sig.args[3])
        one, zero = _ir.Constant(_F32, 1.0), _ir.Constant(_F32, 0.0)
        out = []
        for i in range(n):
            lg = _emit(builder, _LG2, [_F32], [(pv[i], "f")], clobber_memory=False, side_effect=False)
            t = builder.fmul(builder.fadd(lg, c[col_index(i)]), inv)
            g = _fmax(builder, builder.fsub(one, builder.fmul(t, t)), zero)
            out.append(builder.fmul(d[i], g))
        return context.make_tuple(builder, sig.return_type, out)
    return ds(ds, p, cols, inv_scale), codegen


def column_loader(groups):
    """load(addr, col0) -> the thread's 2 * groups float32 column values of a row of float32 at
    shared address addr (one per fragment column: `col_index` order), by 8-byte loads."""
    from numba_fa3.ptx_inline import memory
    from .unroll import static_range, unrolled
    group_bytes = 8 * 4

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def load(addr, col0):
        vals = ()
        base = addr + np.uint32(col0) * np.uint32(4)
        for j in static_range(groups):
            vals = vals + memory.ld_shared_v2_f32(base + j * group_bytes)
        return vals
    return load
