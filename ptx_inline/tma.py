"""Bulk tensor copies between global and shared memory: `cp.async.bulk.tensor` (PTX ISA 9.7.9.25,
"Data Movement and Conversion Instructions: cp.async.bulk.tensor"; sm_90) and the bulk-group
completion instructions (9.7.9.25.4-5), plus the tensor-map cache prefetch/fence.

A tensor map (CUtensorMap, 128 bytes, made on the host by `primitives.tma_desc`) lives in global
memory and is named by its 64-bit generic address; coordinates are a tuple of int32, innermost
dimension first, in elements.  Shared addresses are 32-bit (see `special.shared_address`).
"""
from numba import types
from numba.core.errors import TypingError
from numba.cuda.extending import intrinsic

from ._asm import as_int, emit, literal_int, literal_intrinsic


def _coords(coords):
    if not (isinstance(coords, types.BaseTuple) and 1 <= len(coords) <= 5
            and all(isinstance(t, (types.Integer, types.IntegerLiteral)) for t in coords)):
        raise TypingError(f"TMA coordinates must be a tuple of 1 to 5 integers, got {coords}")
    return len(coords)


def _coord_values(context, builder, tup, tupty):
    return [(as_int(context, builder, builder.extract_value(tup, i), t, 32), "r")
            for i, t in enumerate(tupty)]


def _load(dst, tmap, coords, bar, suffix="", extra=None):
    """Typing and codegen of `cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::
    complete_tx::bytes{suffix}` into `dst`, completing on `bar`; `extra` is (type, bits,
    constraint) of the one trailing operand a suffix takes (cache policy, CTA mask)."""
    nd = _coords(coords)
    args_ty = (dst, tmap, coords, bar) + ((extra[0],) if extra else ())

    def codegen(context, builder, sig, args):
        c = ", ".join(f"${i + 2}" for i in range(nd))
        tail = f", ${nd + 3}" if extra else ""
        text = (f"cp.async.bulk.tensor.{nd}d.shared::cluster.global.mbarrier::complete_tx::bytes"
                f"{suffix} [$0], [$1, {{{c}}}], [${nd + 2}]{tail};")
        ins = [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
               (as_int(context, builder, args[1], sig.args[1], 64), "l")]
        ins += _coord_values(context, builder, args[2], sig.args[2])
        ins.append((as_int(context, builder, args[3], sig.args[3], 32), "r"))
        if extra:
            ins.append((as_int(context, builder, args[4], sig.args[4], extra[1]), extra[2]))
        emit(builder, text, [], ins)
        return context.get_dummy_value()
    return types.void(*args_ty), codegen


@intrinsic
def load(typingctx, dst, tmap, coords, bar):
    """`cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes`: copy the box
    at `coords` into shared memory at `dst`; completion is counted on the mbarrier `bar`."""
    return _load(dst, tmap, coords, bar)


@intrinsic
def load_hint(typingctx, dst, tmap, coords, bar, policy):
    """`load` with `.L2::cache_hint`: `policy` is a 64-bit cache policy (`createpolicy`), e.g.
    evict-last for K/V tiles that several CTAs re-read."""
    return _load(dst, tmap, coords, bar, ".L2::cache_hint", (policy, 64, "l"))


@intrinsic
def load_multicast(typingctx, dst, tmap, coords, bar, cta_mask):
    """`load` with `.multicast::cluster`: the box lands at the same shared offset `dst`, and
    completes on the mbarrier at the same offset `bar`, in every CTA of the cluster whose rank bit
    is set in the 16-bit `cta_mask`.  Each receiving CTA's barrier must expect the bytes."""
    return _load(dst, tmap, coords, bar, ".multicast::cluster", (cta_mask, 16, "h"))


@intrinsic
def prefetch_l2(typingctx, tmap, coords):
    """`cp.async.bulk.prefetch.tensor.Nd.L2.global.tile` (9.7.9.26, "cp.async.bulk.prefetch.tensor"):
    start bringing the box at `coords` into L2, with no shared memory and no completion to wait
    for, so a later `load` of the box finds it there."""
    nd = _coords(coords)

    def codegen(context, builder, sig, args):
        c = ", ".join(f"${i + 1}" for i in range(nd))
        text = f"cp.async.bulk.prefetch.tensor.{nd}d.L2.global.tile [$0, {{{c}}}];"
        ins = [(as_int(context, builder, args[0], sig.args[0], 64), "l")]
        ins += _coord_values(context, builder, args[1], sig.args[1])
        emit(builder, text, [], ins)
        return context.get_dummy_value()
    return types.void(tmap, coords), codegen


def _from_shared(tmap, coords, src, opcode):
    """Typing and codegen of `{opcode}.Nd.global.shared::cta...bulk_group [tmap, coords], [src]`:
    the bulk-group instructions that move a shared box into a tensor (`opcode` holds the
    modifiers between the dimension and the operands)."""
    nd = _coords(coords)

    def codegen(context, builder, sig, args):
        c = ", ".join(f"${i + 1}" for i in range(nd))
        text = opcode.format(nd=nd) + f" [$0, {{{c}}}], [${nd + 1}];"
        ins = [(as_int(context, builder, args[0], sig.args[0], 64), "l")]
        ins += _coord_values(context, builder, args[1], sig.args[1])
        ins.append((as_int(context, builder, args[2], sig.args[2], 32), "r"))
        emit(builder, text, [], ins)
        return context.get_dummy_value()
    return types.void(tmap, coords, src), codegen


@intrinsic
def store(typingctx, tmap, coords, src):
    """`cp.async.bulk.tensor.Nd.global.shared::cta.bulk_group`: copy the shared box at `src` to the
    tensor at `coords`.  Elements outside the tensor are not written, so ragged edges are safe."""
    return _from_shared(tmap, coords, src, "cp.async.bulk.tensor.{nd}d.global.shared::cta.bulk_group")


@intrinsic
def reduce_add(typingctx, tmap, coords, src):
    """`cp.reduce.async.bulk.tensor.Nd.global.shared::cta.add.tile.bulk_group` (9.7.9.27,
    "cp.reduce.async.bulk.tensor"): add the shared box at `src` elementwise into the tensor at
    `coords`, each element atomically in L2 (float32 adds in any order, as `red` gives them).
    Elements outside the tensor are left alone."""
    return _from_shared(tmap, coords, src, "cp.reduce.async.bulk.tensor.{nd}d.global.shared::cta.add.tile.bulk_group")


@intrinsic
def commit_group(typingctx):
    """`cp.async.bulk.commit_group` (9.7.9.25.4): close the thread's current group of bulk stores."""
    def codegen(context, builder, sig, args):
        emit(builder, "cp.async.bulk.commit_group;", [], [])
        return context.get_dummy_value()
    return types.void(), codegen


@literal_intrinsic
def wait_group_read(typingctx, n):
    """`cp.async.bulk.wait_group.read N` (9.7.9.25.5): at most N groups still read their shared
    source, so that staging buffer may be overwritten."""
    pending = literal_int(n, "wait_group_read's N")

    def codegen(context, builder, sig, args):
        emit(builder, f"cp.async.bulk.wait_group.read {pending};", [], [])
        return context.get_dummy_value()
    return types.void(n), codegen


@literal_intrinsic
def wait_group(typingctx, n):
    """`cp.async.bulk.wait_group N` (9.7.9.25.5): at most N groups still pending, writes included."""
    pending = literal_int(n, "wait_group's N")

    def codegen(context, builder, sig, args):
        emit(builder, f"cp.async.bulk.wait_group {pending};", [], [])
        return context.get_dummy_value()
    return types.void(n), codegen


@intrinsic
def prefetch_descriptor(typingctx, tmap):
    """`prefetch.tensormap [tmap]` (9.7.9.15): warm the TMA unit's descriptor cache."""
    def codegen(context, builder, sig, args):
        emit(builder, "prefetch.tensormap [$0];", [], [(as_int(context, builder, args[0], sig.args[0], 64), "l")])
        return context.get_dummy_value()
    return types.void(tmap), codegen


@intrinsic
def fence_descriptor_acquire(typingctx, tmap):
    """`fence.proxy.tensormap::generic.acquire.gpu [tmap], 128` (9.7.13.4): tensor maps written to
    global memory through the generic proxy (our host copies) become visible to the TMA unit."""
    def codegen(context, builder, sig, args):
        emit(builder, "fence.proxy.tensormap::generic.acquire.gpu [$0], 128;", [],
             [(as_int(context, builder, args[0], sig.args[0], 64), "l")])
        return context.get_dummy_value()
    return types.void(tmap), codegen


@intrinsic
def load_bulk(typingctx, dst, src, nbytes, bar):
    """`cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [dst], [src], n, [bar]`
    (9.7.9.25.4.1, the non-tensor bulk copy): `nbytes` contiguous bytes from global `src` (16-byte
    aligned, n a multiple of 16) into shared `dst`, counted on the mbarrier `bar` as TMA tiles are.
    The backward streams each query block's LSE and D rows so."""
    def codegen(context, builder, sig, args):
        emit(builder, "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1], $2, [$3];", [],
             [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
              (as_int(context, builder, args[1], sig.args[1], 64), "l"),
              (as_int(context, builder, args[2], sig.args[2], 32), "r"),
              (as_int(context, builder, args[3], sig.args[3], 32), "r")])
        return context.get_dummy_value()
    return types.void(dst, src, nbytes, bar), codegen


@intrinsic
def prefetch_bulk_l2(typingctx, src, nbytes):
    """`cp.async.bulk.prefetch.L2.global [src], n` (9.7.9.25.4.3, the non-tensor bulk prefetch):
    ask for `nbytes` contiguous bytes from global `src` (16-byte aligned, n a multiple of 16) to be
    brought into L2, without waiting and without a destination: a hint that moves DRAM reads ahead
    of the loads that will want them."""
    def codegen(context, builder, sig, args):
        emit(builder, "cp.async.bulk.prefetch.L2.global [$0], $1;", [],
             [(as_int(context, builder, args[0], sig.args[0], 64), "l"),
              (as_int(context, builder, args[1], sig.args[1], 32), "r")])
        return context.get_dummy_value()
    return types.void(src, nbytes), codegen
