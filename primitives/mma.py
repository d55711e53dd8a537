"""Warpgroup GEMM issue (PTX ISA 9.7.15, wgmma): one accumulator tile of a consumer warpgroup,
m64 x N, over a K extent held in 128-byte swizzled shared-memory chunks, issued as one wgmma
group.  The GEMM, the attention forward (S = Q K^T, O += P V) and the kernels built later on
them (the backward's P^T dO and dS^T Q, the FP8 forward) describe their operands with `Operand`
and get an `issue(acc, a, b_addr, accumulate)` device function from `warpgroup_mma`.

Layouts.  TMA writes a tile in chunks of 128-byte rows (64 16-bit or 128 8-bit elements), each
chunk `chunk_bytes` apart.  A K-major operand (rows along M or N, K contiguous) advances a K step
by `k * element bytes` inside a chunk row and moves to the next chunk every 128 bytes; an
MN-major operand (rows along K, M or N contiguous: V in P V) advances a K step by k rows of 128
bytes, and its descriptor's leading offset is the distance between its MN chunks (9.7.15.5.1).
8-bit types take k = 32 and must be K-major on both sides.
"""
import functools
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numba import cuda

from numba_fa3.ptx_inline import memory, wgmma
from . import smem, warpgroup
from .unroll import constexpr, static_range, unrolled

#: Rows of one wgmma accumulator tile: a consumer warpgroup owns this many rows of M.
WGMMA_M = 64
#: K of one wgmma, and the bytes of one element, per operand type.
WGMMA_K = {"bf16": 16, "f16": 16, "e4m3": 32}
ELEMENT_BYTES = {"bf16": 2, "f16": 2, "e4m3": 1}
#: A from registers instead of shared memory (`warpgroup_mma`'s `a`).
REGISTERS = "registers"


@dataclass(frozen=True)
class Operand:
    """A shared-memory operand: `major` "k" (K contiguous) or "mn" (M or N contiguous), and the
    byte distance between its 128-byte chunks (along K for "k", along M/N for "mn")."""
    major: str
    chunk_bytes: int

    def __post_init__(self):
        if self.major not in ("k", "mn"):
            raise ValueError(f"operand major must be 'k' or 'mn', got {self.major!r}")

    def descriptor_base(self):
        lead = self.chunk_bytes if self.major == "mn" else 0
        return smem.descriptor_base(lead, smem.ATOM_BYTES)

    def step_offsets(self, steps, dtype):
        """Byte offset of each K step's slice from the tile's start."""
        k_bytes = WGMMA_K[dtype] * ELEMENT_BYTES[dtype]
        if self.major == "mn":
            return tuple(kk * WGMMA_K[dtype] * smem.SWIZZLE_BYTES for kk in range(steps))
        per_chunk = smem.SWIZZLE_BYTES // k_bytes
        return tuple((kk // per_chunk) * self.chunk_bytes + (kk % per_chunk) * k_bytes for kk in range(steps))


@functools.lru_cache(maxsize=None)
def warpgroup_mma(n, dtype, k_extent, a, b, hoisted=0, a_registers=False):
    """Issue of acc (m64 x n, fp32) = A (m64 x k_extent) B^T (n x k_extent) for one warpgroup.

    `a`: an `Operand` in shared memory, or REGISTERS for A given as wgmma register fragments (a
    flat tuple of uint32, 4 per K step: P packed from an accumulator).  `a_registers`: A's
    shared tile is loaded into fragments once (by `a_source`) and each wgmma reads them from
    registers.  `b`: an `Operand`.  `hoisted` (A read from shared memory): the first this many
    K steps' A descriptors are built once by `a_source`, not before each wgmma
    (`smem.descriptors`: ptxas keeps them in uniform registers).

    Returns a namespace with
      issue(acc, a_src, b_addr, accumulate) -> acc: fence, the K steps' wgmmas, commit (not
        waited); `accumulate` 0 overwrites acc on the first step; b_addr warp-uniform;
      a_source(a_addr, thread) -> a_src for `issue` from A's 64 rows at shared address a_addr
        (fragments by ldmatrix with a_registers, else the address and its hoisted descriptors).
    """
    k = WGMMA_K[dtype]
    if k_extent % k:
        raise ValueError(f"K extent {k_extent} is not a multiple of wgmma's k = {k} for {dtype}")
    steps = k_extent // k
    a_regs = a == REGISTERS or a_registers
    if a_registers and ELEMENT_BYTES[dtype] != 2:
        raise ValueError("A fragments by ldmatrix are 16-bit only")
    trans_b = int(b.major == "mn")
    if a_regs:
        instr = wgmma.mma_rs(n, dtype, trans_b)
    else:
        instr = wgmma.mma_ss(n, dtype, trans_b, int(a.major == "mn"))
    hoisted = 0 if a_regs else max(0, min(int(hoisted), steps))
    desc_b, b_offsets = b.descriptor_base(), b.step_offsets(steps, dtype)
    desc_a = 0 if a_regs else a.descriptor_base()
    a_offsets = (0,) * steps if a_regs else a.step_offsets(steps, dtype)
    hoist = smem.descriptors(a_offsets[:hoisted])  # (constexprs are folded before dead branches go)
    if a_registers and a.major != "k":
        raise ValueError("A fragments by ldmatrix need a K-major tile")
    a_fragments = fragments_loader(steps, a.chunk_bytes if a_registers else 0)

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def issue(acc, a_src, b_addr, accumulate):
        acc = wgmma.fence_tied(acc)
        for kk in static_range(steps):
            if constexpr(a_regs):
                a_op = (a_src[4 * kk], a_src[4 * kk + 1], a_src[4 * kk + 2], a_src[4 * kk + 3])
            elif constexpr(kk < hoisted):
                a_op = a_src[1][kk]
            else:
                a_op = smem.descriptor(desc_a, a_src[0], constexpr(a_offsets[kk]))
            b_op = smem.descriptor(desc_b, b_addr, constexpr(b_offsets[kk]))
            if constexpr(kk == 0):
                acc = instr(acc, a_op, b_op, accumulate)
            else:
                acc = instr(acc, a_op, b_op, 1)
        wgmma.commit_group()
        return acc

    @cuda.jit(device=True, forceinline=True)
    def a_source(a_addr, thread):
        if a_registers:
            return a_fragments(a_addr, thread)
        if hoisted:
            return a_addr, hoist(desc_a, a_addr)
        return a_addr, ()

    return SimpleNamespace(issue=issue, a_source=a_source, steps=steps, hoisted=hoisted)


@functools.lru_cache(maxsize=None)
def fragments_loader(steps, chunk_bytes):
    """load(a_addr, thread) -> the wgmma A fragments (flat uint32 tuple, 4 per K step) of a
    warpgroup's 64 K-major 16-bit rows at shared address a_addr, chunks `chunk_bytes` apart:
    each warp's 16 rows by ldmatrix.x4 per K step (matrices: rows 0-7 / 8-15 by columns 0-7 /
    8-15 of the step), lane l addressing row l % 16, column half l // 16, through the swizzle."""
    k_bytes = WGMMA_K["bf16"] * ELEMENT_BYTES["bf16"]
    per_chunk = smem.SWIZZLE_BYTES // k_bytes
    warp_threads = warpgroup.WARP_THREADS

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def load(a_addr, thread):
        lane = thread % np.uint32(warp_threads)
        row = np.uint32(16) * (thread // np.uint32(warp_threads)) + (lane & np.uint32(15))
        half = (lane >> np.uint32(4)) * np.uint32(16)
        frags = ()
        for kk in static_range(steps):
            c, w = kk // per_chunk, kk % per_chunk
            frags = frags + memory.ldmatrix_x4(
                a_addr + c * chunk_bytes + smem.swizzle_128b(row, np.uint32(w * k_bytes) + half))
        return frags
    return load
