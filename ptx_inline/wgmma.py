"""Warpgroup matrix multiply-accumulate: `wgmma.*` (PTX ISA 9.7.15, "Asynchronous Warpgroup Level
Matrix Multiply-Accumulate Instructions"; sm_90a).

Accumulators are Numba tuples of float32 (one element per register: `n // 2` for m64nNk16 with an
f32 accumulator).  The `_tied` variants pass a tuple through the instruction unchanged so that the
compiler cannot move reads or writes of the accumulators across a fence or a wait: without them,
LLVM may schedule a use of the registers before `wgmma.wait_group`, which ptxas answers by
serializing every wgmma of the kernel (warning C7510).
"""
import functools

from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import intrinsic

from ._asm import F32, I32, as_int, emit, literal_int, literal_intrinsic

#: (A/B PTX type, K of one instruction) for each operand type the kernels use.
AB_TYPES = {"bf16": ("bf16", 16), "f16": ("f16", 16), "e4m3": ("e4m3", 32)}
#: N values of m64nNk* that a kernel may ask for (PTX allows multiples of 8 up to 256).
VALID_N = tuple(range(8, 257, 8))


def _unpack(builder, tup, count):
    return [builder.extract_value(tup, i) for i in range(count)]


@intrinsic
def fence(typingctx):
    """`wgmma.fence.sync.aligned` (9.7.15.5.1): order register/shared accesses before wgmma."""
    def codegen(context, builder, sig, args):
        emit(builder, "wgmma.fence.sync.aligned;", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def commit_group(typingctx):
    """`wgmma.commit_group.sync.aligned` (9.7.15.6.2): close the current group of wgmma ops."""
    def codegen(context, builder, sig, args):
        emit(builder, "wgmma.commit_group.sync.aligned;", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@literal_intrinsic
def wait_group(typingctx, n):
    """`wgmma.wait_group.sync.aligned N` (9.7.15.6.3): wait until at most N groups are pending."""
    pending = literal_int(n, "wait_group's N")

    def codegen(context, builder, sig, args):
        emit(builder, f"wgmma.wait_group.sync.aligned {pending};", [], [])
        return context.get_dummy_value()
    return types.void(n), codegen


def _check_acc(acc, what):
    if not (isinstance(acc, types.UniTuple) and acc.dtype == types.float32):
        raise TypingError(f"{what}: accumulator must be a tuple of float32, got {acc}")


def _tied_passthrough(builder, instr, acc_vals):
    count = len(acc_vals)
    ins = [(v, str(i)) for i, v in enumerate(acc_vals)]
    return emit(builder, instr, [F32] * count, ins) if count > 1 else [emit(builder, instr, [F32], ins)]


@intrinsic
def fence_tied(typingctx, acc):
    """`wgmma.fence` with the accumulator tuple passed through it (returns it), so writes to the
    accumulators made before (e.g. the softmax rescale of O) stay before the fence."""
    _check_acc(acc, "fence_tied")

    def codegen(context, builder, sig, args):
        vals = _unpack(builder, args[0], acc.count)
        out = _tied_passthrough(builder, "wgmma.fence.sync.aligned;", vals)
        return context.make_tuple(builder, sig.return_type, out)
    return acc(acc), codegen


@literal_intrinsic
def wait_group_tied(typingctx, n, acc):
    """`wgmma.wait_group N` with the accumulator tuple passed through it (returns it), so no read
    of the accumulators is scheduled before the wait."""
    pending = literal_int(n, "wait_group's N")
    _check_acc(acc, "wait_group_tied")

    def codegen(context, builder, sig, args):
        vals = _unpack(builder, args[1], acc.count)
        out = _tied_passthrough(builder, f"wgmma.wait_group.sync.aligned {pending};", vals)
        return context.make_tuple(builder, sig.return_type, out)
    return acc(n, acc), codegen


@literal_intrinsic
def wait_group_keep(typingctx, n, acc, frag):
    """`wgmma.wait_group N` passing through both the accumulator tuple and a register A fragment
    (tuple of uint32) of a wgmma that may still be in flight: the A registers are read
    asynchronously, so LLVM must not reuse them before the wait (9.7.15.5.1, "the contents of
    the registers ... must not be modified until the wgmma completes")."""
    pending = literal_int(n, "wait_group's N")
    _check_acc(acc, "wait_group_keep")
    if not (isinstance(frag, types.UniTuple) and isinstance(frag.dtype, types.Integer)
            and frag.dtype.bitwidth == 32):
        raise TypingError(f"wait_group_keep: fragment must be a tuple of 32-bit ints, got {frag}")

    def codegen(context, builder, sig, args):
        vals = _unpack(builder, args[1], acc.count) + _unpack(builder, args[2], frag.count)
        ins = [(v, str(i)) for i, v in enumerate(vals)]
        outs = [F32] * acc.count + [I32] * frag.count
        res = emit(builder, f"wgmma.wait_group.sync.aligned {pending};", outs, ins)
        a = context.make_tuple(builder, sig.return_type.types[0], res[:acc.count])
        f = context.make_tuple(builder, sig.return_type.types[1], res[acc.count:])
        return context.make_tuple(builder, sig.return_type, [a, f])
    return types.Tuple((acc, frag))(n, acc, frag), codegen


def _mma_text(n, ab, trans_b, nacc, a_regs, trans_a=0):
    """The PTX of one m64nNk* wgmma; operands numbered as LLVM numbers them (outputs, then the
    tied accumulator inputs, then A, B descriptor and scale-d)."""
    ptx_ab, k = AB_TYPES[ab]
    d = ", ".join(f"${i}" for i in range(nacc))
    base = nacc + nacc  # outputs + tied inputs
    if a_regs:
        a = "{" + ", ".join(f"${base + i}" for i in range(a_regs)) + "}"
        nxt = base + a_regs
    else:
        a = f"${base}"
        nxt = base + 1
    b, scale = f"${nxt}", f"${nxt + 1}"
    # fp8 wgmma has no transpose immediates: both operands must be K-major.
    imm = "1, 1" if ab == "e4m3" else f"1, 1, {trans_a}, {trans_b}" if not a_regs else f"1, 1, {trans_b}"
    return ("{\n.reg .pred p;\n"
            f"setp.ne.b32 p, {scale}, 0;\n"
            f"wgmma.mma_async.sync.aligned.m64n{n}k{k}.f32.{ptx_ab}.{ptx_ab} "
            f"{{{d}}}, {a}, {b}, p, {imm};\n}}")


def _validate(n, ab, trans_b, trans_a=0):
    if n not in VALID_N:
        raise ValueError(f"wgmma N must be a multiple of 8 in [8, 256], got {n}")
    if ab not in AB_TYPES:
        raise ValueError(f"wgmma operand type must be one of {sorted(AB_TYPES)}, got {ab!r}")
    if ab == "e4m3" and (trans_b or trans_a):
        raise ValueError("fp8 wgmma supports only K-major operands (trans_a=trans_b=0)")


@functools.lru_cache(maxsize=None)
def mma_ss(n, ab="bf16", trans_b=0, trans_a=0):
    """`wgmma.mma_async.sync.aligned.m64nNkK.f32.T.T` with A and B from shared memory (9.7.15.5.2).

    Returns an intrinsic `f(acc, desc_a, desc_b, scale_d) -> acc`: `acc` a tuple of n//2 float32,
    descriptors uint64 (see primitives.smem), scale_d 0 to overwrite / nonzero to accumulate.
    `trans_b=1` means B is MN-major in shared memory (N contiguous), as for P·V; `trans_a=1`
    likewise for A (M contiguous: the backward's P^T dO and dS^T Q).
    """
    _validate(n, ab, trans_b, trans_a)
    nacc = n // 2
    text = _mma_text(n, ab, trans_b, nacc, 0, trans_a)

    @intrinsic
    def wgmma_mma_async_ss(typingctx, acc, desc_a, desc_b, scale_d):
        _check_acc(acc, "wgmma.mma_async")
        if acc.count != nacc:
            raise TypingError(f"m64n{n}: accumulator needs {nacc} float32, got {acc.count}")

        def codegen(context, builder, sig, args):
            vals = _unpack(builder, args[0], nacc)
            ins = [(v, str(i)) for i, v in enumerate(vals)]
            ins += [(as_int(context, builder, args[1], sig.args[1], 64), "l"),
                    (as_int(context, builder, args[2], sig.args[2], 64), "l"),
                    (as_int(context, builder, args[3], sig.args[3], 32), "r")]
            out = emit(builder, text, [F32] * nacc, ins)
            return context.make_tuple(builder, sig.return_type, out)
        return acc(acc, desc_a, desc_b, scale_d), codegen

    return wgmma_mma_async_ss


@functools.lru_cache(maxsize=None)
def mma_rs(n, ab="bf16", trans_b=0):
    """`wgmma.mma_async` with A from registers and B from shared memory (9.7.15.5.2).

    Returns an intrinsic `f(acc, a, desc_b, scale_d) -> acc` where `a` is a tuple of 4 uint32: the
    thread's fragment of the 64x16 (64x32 for fp8) A tile, two packed elements per register, in
    the accumulator's row/column layout (9.7.15.5.1, "Register fragments": the same layout an
    m64nK accumulator has, which is what lets P flow from the S accumulator into P·V).
    """
    _validate(n, ab, trans_b)
    nacc = n // 2
    text = _mma_text(n, ab, trans_b, nacc, 4)

    @intrinsic
    def wgmma_mma_async_rs(typingctx, acc, a, desc_b, scale_d):
        _check_acc(acc, "wgmma.mma_async")
        if acc.count != nacc:
            raise TypingError(f"m64n{n}: accumulator needs {nacc} float32, got {acc.count}")
        if not (isinstance(a, types.UniTuple) and a.count == 4 and isinstance(a.dtype, types.Integer)
                and a.dtype.bitwidth == 32):
            raise TypingError(f"wgmma A fragment must be a tuple of 4 uint32, got {a}")

        def codegen(context, builder, sig, args):
            vals = _unpack(builder, args[0], nacc)
            ins = [(v, str(i)) for i, v in enumerate(vals)]
            ins += [(v, "r") for v in _unpack(builder, args[1], 4)]
            ins += [(as_int(context, builder, args[2], sig.args[2], 64), "l"),
                    (as_int(context, builder, args[3], sig.args[3], 32), "r")]
            out = emit(builder, text, [F32] * nacc, ins)
            return context.make_tuple(builder, sig.return_type, out)
        return acc(acc, a, desc_b, scale_d), codegen

    return wgmma_mma_async_rs


@literal_intrinsic
def wait_group_hold(typingctx, n, held):
    """`wgmma.wait_group N` passing through a tuple of register tuples (accumulators of float32,
    A fragments of 32-bit ints): every one is tied to the wait, so none is read before it and no
    fragment register is reused while a wgmma may still read it (9.7.15.5.1).  For kernels with
    several GEMMs in flight at once (the backward: dV, dK and dQ)."""
    pending = literal_int(n, "wait_group's N")
    if not isinstance(held, types.BaseTuple) or not all(
            isinstance(t, types.UniTuple) and (t.dtype == types.float32 or (
                isinstance(t.dtype, types.Integer) and t.dtype.bitwidth == 32)) for t in held):
        raise TypingError(f"wait_group_hold: expected a tuple of float32 or 32-bit int tuples, got {held}")

    def codegen(context, builder, sig, args):
        vals, outs = [], []
        for i, t in enumerate(held):
            part = builder.extract_value(args[1], i)
            vals += _unpack(builder, part, t.count)
            outs += [F32 if t.dtype == types.float32 else I32] * t.count
        ins = [(v, str(i)) for i, v in enumerate(vals)]
        res = emit(builder, f"wgmma.wait_group.sync.aligned {pending};", outs, ins)
        res = res if isinstance(res, list) else [res]
        parts, k = [], 0
        for i, t in enumerate(held):
            parts.append(context.make_tuple(builder, sig.return_type.types[i], res[k:k + t.count]))
            k += t.count
        return context.make_tuple(builder, sig.return_type, parts)
    return held(n, held), codegen
