"""Shared-memory layouts for TMA and wgmma: the 128-byte swizzle, matrix descriptors, and a planner
that carves one dynamic allocation into named, aligned regions.

Swizzle (PTX ISA 9.7.15.5.1, "Shared Memory Matrix Layout"; CUtensorMapSwizzle): with the 128-byte
mode a tile is stored as rows of 128 bytes in which the 16-byte unit u of row r sits at unit
u ^ (r % 8).  TMA writes this pattern, wgmma reads it, and eight rows (1024 bytes) form one atom,
so every swizzled tile must start at a 1024-byte boundary.
"""
import functools

from llvmlite import ir
from numba import cuda, types
from numba.core.errors import TypingError

from numba_fa3.ptx_inline._asm import I32, I64, emit, literal_intrinsic as intrinsic

#: Bytes in one swizzled row, and rows in one swizzle atom.
SWIZZLE_BYTES = 128
ATOM_ROWS = 8
ATOM_BYTES = SWIZZLE_BYTES * ATOM_ROWS
#: Shared addresses in a wgmma descriptor are stored in units of 16 bytes.
DESC_UNIT = 16
#: Descriptor "layout type" field (bits 62-63) for the 128-byte swizzle.
_DESC_SWIZZLE_128B = 1
#: An mbarrier object is 8 bytes.
MBARRIER_BYTES = 8
#: Most dynamic shared memory one block may use on sm_90 (227 KB).
MAX_DYNAMIC_SMEM = 227 * 1024


def descriptor_base(leading_byte_offset, stride_byte_offset):
    """The constant part of a 128B-swizzled wgmma matrix descriptor (PTX ISA 9.7.15.5.1.2,
    "Matrix Descriptor Format"): LBO in bits 16-29, SBO in bits 32-45, swizzle in 62-63, all but
    the start address (bits 0-13), which `descriptor` adds on the device.

    K-major operands (rows of K): SBO = 1024, the distance between 8-row atoms; LBO is unused.
    MN-major operands (rows of K, MN contiguous): LBO = distance between 64-element column
    chunks along MN, SBO = 1024 between 8-row atoms along K.
    """
    for name, v in (("leading", leading_byte_offset), ("stride", stride_byte_offset)):
        if v % DESC_UNIT or not 0 <= v >> 4 < 1 << 14:
            raise ValueError(f"{name} byte offset {v} is not a 16-byte multiple below 256 KB")
    return ((leading_byte_offset >> 4) << 16) | ((stride_byte_offset >> 4) << 32) | (
        _DESC_SWIZZLE_128B << 62)


def _split_base(base, who):
    if not isinstance(base, types.IntegerLiteral):
        raise TypingError(f"{who} base must be a compile-time constant, got {base}")
    value = base.literal_value
    return value & 0xFFFFFFFF, value >> 32


def _address_field(context, builder, addr, addr_type, lo_const):
    """The descriptor's low word without its K offset: the 14-bit start-address field of
    `addr` (16-byte units) or-ed with the constant low bits of the base."""
    a = context.cast(builder, addr, addr_type, types.uint32)
    field = builder.and_(builder.lshr(a, ir.Constant(I32, 4)), ir.Constant(I32, (1 << 14) - 1))
    return builder.or_(field, ir.Constant(I32, lo_const))


def _pair(builder, lo, hi):
    return emit(builder, "mov.b64 $0, {$1, $2};", [I64], [(lo, "r"), (ir.Constant(I32, hi), "r")],
                clobber_memory=False, side_effect=False)


@intrinsic
def descriptor(typingctx, base, smem_addr, offset):
    """Full descriptor for a tile at shared address `smem_addr + offset` (1024-byte aligned atoms;
    a 16-byte multiple offset inside the atom selects a K slice, which is how the K loop advances).

    `base` (from `descriptor_base`) must be a compile-time constant, `offset` a multiple of 16
    (constant after unrolling, so LLVM folds it into one add).  The address field
    is built in 32 bits and paired with the constant high word by one `mov.b64`: Numba's int64
    arithmetic would otherwise put 64-bit shifts and adds between the wgmmas of a K loop.  The
    offset is added after the field is extracted, so the steps of one K loop share the
    extraction and cost one add each (shared addresses stay below 256 KB, so the 14-bit field
    never carries into the LBO bits)."""
    lo_const, hi = _split_base(base, "descriptor")

    def codegen(context, builder, sig, args):
        field = _address_field(context, builder, args[1], sig.args[1], lo_const)
        off = context.cast(builder, args[2], sig.args[2], types.uint32)
        return _pair(builder, builder.add(field, builder.lshr(off, ir.Constant(I32, 4))), hi)
    return types.uint64(base, smem_addr, offset), codegen


@functools.lru_cache(maxsize=None)
def descriptors(offsets):
    """An intrinsic `f(base, smem_addr)` giving one descriptor per entry of `offsets` (byte
    offsets, Python ints) for the tile at `smem_addr`, as a tuple: the K loop of an operand that
    stays in place for many GEMMs (FlashForward's Q), built once, outside the loop that issues
    them.

    Why not `descriptor` inside that loop: ptxas then rebuilt all four words of each wgmma's
    uniform-register quad before every wgmma (the A pair copied in, both high words rewritten).
    Given loop-invariant 64-bit values it keeps each A pair in its own quad for the whole loop
    and writes only B's two words: 483 instead of 510 instructions per step at hdim 128.  The
    quads are uniform registers that stay taken for the loop, and a kernel short of them spills
    (FlashForward's hdim 256 causal)."""
    offs = tuple(int(o) for o in offsets)
    for o in offs:
        if o % DESC_UNIT or not 0 <= o >> 4 < 1 << 14:
            raise ValueError(f"descriptor offset {o} is not a 16-byte multiple below 256 KB")
    result = types.UniTuple(types.uint64, len(offs))

    @intrinsic
    def descriptor_tuple(typingctx, base, smem_addr):
        lo_const, hi = _split_base(base, "descriptors")

        def codegen(context, builder, sig, args):
            field = _address_field(context, builder, args[1], sig.args[1], lo_const)
            vals = [_pair(builder, builder.add(field, ir.Constant(I32, o >> 4)), hi) for o in offs]
            return context.make_tuple(builder, sig.return_type, vals)
        return result(base, smem_addr), codegen
    return descriptor_tuple


@cuda.jit(device=True, forceinline=True)
def swizzle_128b(row, byte_in_row):
    """Byte offset of (row, byte) in a 128B-swizzled tile: the 16-byte unit is XORed with row % 8."""
    return row * SWIZZLE_BYTES + (((byte_in_row >> 4) ^ (row & (ATOM_ROWS - 1))) << 4) + (byte_in_row & 15)


class SharedLayout:
    """Plan of one dynamic shared-memory allocation: regions named in order, each aligned.

    Sizes are derived from tile shapes by the kernel, never typed in; `bytes` is what the launch
    asks for, including the slack that lets the kernel align the base to 1024 bytes itself (the
    runtime only promises 16-byte alignment of dynamic shared memory).
    """

    def __init__(self):
        self.offsets = {}
        self.sizes = {}
        self._end = 0

    def add(self, name, nbytes, align=ATOM_BYTES):
        if name in self.offsets:
            raise ValueError(f"shared region {name!r} defined twice")
        start = -(-self._end // align) * align
        self.offsets[name] = start
        self.sizes[name] = nbytes
        self._end = start + nbytes
        return start

    @property
    def used(self):
        return self._end

    @property
    def bytes(self):
        return self._end + ATOM_BYTES

    def check(self, limit=MAX_DYNAMIC_SMEM):
        if self.bytes > limit:
            parts = ", ".join(f"{k}={v}" for k, v in self.sizes.items())
            raise ValueError(f"shared memory plan needs {self.bytes} B > {limit} B ({parts})")
        return self


@cuda.jit(device=True, forceinline=True)
def aligned_base(addr):
    """Round a shared address up to the swizzle atom (see SharedLayout.bytes)."""
    return (addr + (ATOM_BYTES - 1)) & ~(ATOM_BYTES - 1)
