"""Which work tile a CTA runs, and where its sequence lies: one interface for the attention
kernels, in both directions.

A work tile is (block, head, batch): `block` is a query block for the forward (the key blocks it
visits: `mask.block_range`) or a key block for a kernel that walks query blocks (the backward:
`mask.query_block_range`).  Tiles are claimed from `primitives.scheduler` (dynamic persistent:
an atomic counter); `tile_scheduler(...)` gives the device functions that map a linear tile to
coordinates (`coords`) and a batch entry to its sequence (`seq`: dense or packed varlen).

Order.  Without a mask, blocks vary fastest, so the CTAs running at one time share a few
(batch, head) pairs' K and V in L2.  Causal: the pairs go in sections whose K and V fit in a
third of L2 together (`l2_section`), longest tiles first across each section; short sequences
(fewer than SECTION_MIN_BLOCKS blocks) go pair by pair, ending on `causal_tail` pairs ordered
longest first together.  docs/decisions.md has the measurements behind each number.

Rotation (the deterministic backward without a mask, `rotation`).  dQ's adds into a query block
go in a fixed order of key blocks; were every key block to start at query block 0, key block n
would wait n steps for those before it, a wavefront of the head's key blocks.  Instead key block n
of a group of G starts at query block n mod G and wraps around, and a query block's adds are
ordered by when the blocks reach it: running side by side, the blocks then wait at most a step.
The group is claimed in order before the next, and no wait can close a cycle: G is at most the
grid (else the group's running blocks could all wait for one that no CTA is free to claim), and
at most the number of query blocks less the producer's lookahead (the ring's stages): a CTA's
producer claims its next tile when the consumers are within `lookahead` steps of the end, and
in those steps a block waits only for the group's blocks that start in the `lookahead` query
blocks before its own start, which, with that cap, were claimed before it.
"""
from types import SimpleNamespace

import numpy as np
from numba import cuda

from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.ptx_inline import memory, special

#: K and V bytes one causal section of (batch, head) pairs may hold: a third of the H100's 50 MB
#: L2, because the CTAs running at one time touch the whole section's K and V.
L2_SECTION_BYTES = 16 << 20
#: Causal runs with fewer blocks per pair keep the pair-by-pair order: the CTAs running one
#: pair's few tiles side by side share its K and V as they load.
SECTION_MIN_BLOCKS = 16
#: Short causal runs end on this many waves of tiles ordered longest first.
CAUSAL_TAIL_WAVES = 2
#: Bytes per element of the 16-bit operands whose K/V size sets the sections.
ELEMENT_BYTES = 2


def tile_scheduler(longest_first, varlen):
    """SimpleNamespace(coords(p, tile) -> (block, head, batch), seq(p, b) -> (q0, sq, k0, sk)):
    `p` a parameter record with fields m_blocks, heads, batch, section, tail (coords) and
    cu_q, cu_k, sq_max, sk_max, total_q, total_k (seq)."""

    @cuda.jit(device=True, forceinline=True)
    def coords(p, tile):
        """(block, head, batch) of a linear tile; longest_first: causal sections (module doc)."""
        blocks = p.m_blocks
        if longest_first:
            pairs = p.heads * p.batch
            rest = (pairs - p.tail) * blocks
            if tile >= rest:
                # the run's last `tail` pairs: one section, longest first across all of them
                mb, bh = udivmod32(tile - rest, p.tail)
                bh = bh + (pairs - p.tail)
            else:
                first, r = udivmod32(tile, p.section * blocks)
                first = first * p.section
                mb, bh = udivmod32(r, min(p.section, pairs - p.tail - first))
                bh = bh + first
            mb = np.int32(blocks - 1 - mb)
        else:
            bh, mb = udivmod32(tile, blocks)
        b, h = udivmod32(bh, p.heads)
        return mb, h, b

    @cuda.jit(device=True, forceinline=True)
    def seq(p, b):
        """(first token of Q, seqlen_q, first token of K, seqlen_k) of batch entry b: from the
        cu_seqlens arrays (int32, B + 1 entries) with varlen, else the fixed lengths.  Entries are
        clamped to the packed lengths, so bad cu_seqlens cannot send a store out of bounds."""
        if varlen:
            # (int32 throughout: a literal 0 would make the clamps 64-bit, and ptxas then holds
            # the totals' sign words across the backward producer's loop, a spill at 24 registers)
            zero = np.int32(0)
            q0 = min(max(memory.ld_global_s32(p.cu_q + 4 * b), zero), p.total_q)
            q1 = min(max(memory.ld_global_s32(p.cu_q + 4 * b + 4), q0), p.total_q)
            k0 = min(max(memory.ld_global_s32(p.cu_k + 4 * b), zero), p.total_k)
            k1 = min(max(memory.ld_global_s32(p.cu_k + 4 * b + 4), k0), p.total_k)
            return np.int32(q0), np.int32(q1 - q0), np.int32(k0), np.int32(k1 - k0)
        return np.int32(0), np.int32(p.sq_max), np.int32(0), np.int32(p.sk_max)

    return SimpleNamespace(coords=coords, seq=seq)


@cuda.jit(device=True, forceinline=True)
def key_block_coords(p, tile, descending):
    """(key block, key head, batch) of a linear tile of a kernel that walks query blocks per key
    block (the backward; `p` has n_blocks, heads_k): key blocks vary fastest, so the CTAs running
    at one time read the same few heads' Q and dO, which then stay in L2, and in each head the
    blocks that the most query blocks see (the first, with a causal mask) come first; with
    `descending` (a constant) the last come first (the deterministic backward's order: a tile
    waits only on tiles claimed before it)."""
    bh, nb = udivmod32(tile, p.n_blocks)
    b, hk = udivmod32(bh, p.heads_k)
    if descending:
        nb = np.int32(p.n_blocks - 1 - nb)
    return nb, hk, b


@cuda.jit(device=True, forceinline=True)
def rotation(n_block, n_blocks, m_count, lookahead):
    """(first, base, size) of key block n_block of a sequence's n_blocks key blocks, each seeing
    all m_count query blocks (module doc, "Rotation"; `lookahead` the producer's stages): its walk
    starts at query block `first` (counted from the range's start) and wraps around; its group's
    first block is `base`, and the group has `size` blocks."""
    g = max(min(min(n_blocks, np.int32(m_count - np.int32(lookahead))), np.int32(special.nctaid_x_here())),
            np.int32(1))
    group, first = udivmod32(n_block, g)
    base = np.int32(group * g)
    return np.int32(first), base, np.int32(min(g, n_blocks - base))


@cuda.jit(device=True, forceinline=True)
def rotated_rank(m, first, base, size):
    """The position of a key block (`rotation`'s first, base, size) in query block m's order of
    adds: every block of the groups before, then the group's blocks that reach m before it (those
    that started later in the rotation reach m sooner)."""
    if first <= m:
        return np.int32(base + min(m, size - 1) - first)
    return np.int32(base + m + size - first)


@cuda.jit(device=True, forceinline=True)
def rotated_start(n_block, seqlen_k, block_n, m_min, m_max, lookahead):
    """The first query block of key block n_block's rotated walk over [m_min, m_max)."""
    first, _, _ = rotation(n_block, np.int32((seqlen_k + (block_n - 1)) // block_n), np.int32(m_max - m_min),
                           lookahead)
    return np.int32(m_min + first)


@cuda.jit(device=True, forceinline=True)
def rotated_next(m, m_min, m_max):
    """The query block after m in a rotated walk over [m_min, m_max): m + 1, wrapping to m_min."""
    m = np.int32(m + 1)
    if m == m_max:
        m = m_min
    return m


def causal_order(blocks, pairs, ctas, seqlen_k, head_dim, head_ratio):
    """(section, tail) of a causal run: L2 sections of pairs from SECTION_MIN_BLOCKS blocks per
    pair, else pair by pair (section 1) ending on `causal_tail` pairs."""
    if blocks >= SECTION_MIN_BLOCKS:
        return l2_section(seqlen_k, head_dim, head_ratio, L2_SECTION_BYTES, blocks, ctas), 0
    return 1, causal_tail(blocks, pairs, ctas, CAUSAL_TAIL_WAVES)


def causal_tail(blocks, pairs, ctas, waves):
    """(batch, head) pairs at the end of a pair-by-pair causal run that are ordered longest first
    across all of them: enough for `waves` tiles per CTA, so the last tiles claimed are short
    ones (pair by pair to the end, the last pair's longest tile is claimed when the other CTAs
    have a few blocks left)."""
    if waves <= 0:
        return 0
    return min(pairs, -(-waves * ctas // blocks))


def l2_section(seqlen_k, head_dim, head_ratio, budget=L2_SECTION_BYTES, blocks=1, ctas=1):
    """(batch, head) pairs per causal section: a power of two of K/V heads whose K and V take at
    most `budget` (at least one), times the query heads that share each (GQA); doubled while the
    section's tiles (`blocks` per pair) would not give each of the grid's `ctas` one, since a
    section smaller than the grid ends each of its blocks with CTAs idle for the next."""
    kv_head = max(1, seqlen_k * 2 * head_dim * ELEMENT_BYTES)
    kv_heads = max(1, budget // kv_head)
    pairs = (1 << (kv_heads.bit_length() - 1)) * head_ratio
    while pairs * blocks < ctas:
        pairs *= 2
    return pairs
