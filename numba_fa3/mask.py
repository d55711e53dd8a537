"""Causal and sliding-window masks, bottom-right aligned (FA2/FA3): query row i sees key j iff
    i + (Sk - Sq) - left <= j <= i + (Sk - Sq) + right,  and j < Sk,
with left/right < 0 meaning unbounded; causal is (left, 0).  One place answers the questions a kernel
asks: which key blocks does a query tile visit (and, for the backward, which query blocks see a
key block), which of them need the mask, and the mask itself on a score fragment.
"""
import numpy as np
from numba import cuda

from numba_fa3.primitives import fragment

#: A bound that stands for "unbounded" in int32 arithmetic.
FAR = 1 << 30

MASK_NONE, MASK_CAUSAL, MASK_LOCAL = 0, 1, 2


def mask_kind(causal, window_size):
    left, right = window_size
    if causal:
        return MASK_CAUSAL
    if left >= 0 or right >= 0:
        return MASK_LOCAL
    return MASK_NONE


@cuda.jit(device=True, forceinline=True)
def key_limits(row, offset, left, right, seqlen_k):
    """[lo, hi) of the keys row `row` may see."""
    hi = seqlen_k
    if right >= 0:
        hi = min(hi, row + offset + right + 1)
    lo = 0
    if left >= 0:
        lo = row + offset - left
    return np.int32(lo), np.int32(hi)


@cuda.jit(device=True, forceinline=True)
def block_range(m_block, block_m, block_n, seqlen_q, seqlen_k, left, right):
    """[n_min, n_max) of the key blocks that query block m_block must visit."""
    offset = seqlen_k - seqlen_q
    r0 = m_block * block_m
    r1 = min(seqlen_q, r0 + block_m) - 1
    lo, _ = key_limits(r0, offset, left, right, seqlen_k)
    _, hi = key_limits(r1, offset, left, right, seqlen_k)
    lo = max(lo, 0)
    if hi <= lo:
        return np.int32(0), np.int32(0)
    return np.int32(lo // block_n), np.int32((hi + block_n - 1) // block_n)


@cuda.jit(device=True, forceinline=True)
def needs_mask(n_block, m_block, block_m, block_n, seqlen_q, seqlen_k, left, right):
    """Whether any score of (m_block, n_block) is masked (ragged end, diagonal or window edge)."""
    k0 = n_block * block_n
    k1 = k0 + block_n - 1
    if k1 >= seqlen_k:
        return True
    offset = seqlen_k - seqlen_q
    r0 = m_block * block_m
    r1 = r0 + block_m - 1
    if right >= 0 and k1 > r0 + offset + right:
        return True
    if left >= 0 and k0 < r1 + offset - left:
        return True
    return False


@cuda.jit(device=True, forceinline=True)
def unmasked_range(m_block, block_m, block_n, seqlen_q, seqlen_k, left, right):
    """[u_min, u_max): the key blocks for which `needs_mask` is False are exactly those in this
    range (possibly empty, u_min >= u_max), so a kernel can run them in a loop without the mask.
    Above u_max: the ragged end and the diagonal (or right window edge); below u_min: the left
    window edge."""
    u_max = seqlen_k // block_n
    offset = seqlen_k - seqlen_q
    r0 = m_block * block_m
    if right >= 0:
        u_max = min(u_max, max(r0 + offset + right + 1, 0) // block_n)
    u_min = 0
    if left >= 0:
        u_min = (max(r0 + block_m - 1 + offset - left, 0) + block_n - 1) // block_n
    return np.int32(u_min), np.int32(u_max)


@cuda.jit(device=True, forceinline=True)
def query_block_range(n_block, block_m, block_n, seqlen_q, seqlen_k, left, right):
    """[m_min, m_max) of the query blocks that see any key of key block n_block: the reverse of
    `block_range`, for kernels that walk query blocks per key block (the backward).  Row i sees
    key j iff j - offset - right <= i <= j - offset + left (bounds that are unbounded drop out).
    All in int32 (windows are at most `FAR`): 64-bit intermediates cost the backward producer,
    which runs at 24 registers, a spill."""
    offset = np.int32(seqlen_k - seqlen_q)
    k0 = np.int32(n_block * block_n)
    k1 = np.int32(min(seqlen_k, np.int32(k0 + block_n)) - 1)
    lo = np.int32(0)
    if right >= 0:
        lo = np.int32(max(np.int32(0), np.int32(k0 - offset - right)))
    hi = np.int32(seqlen_q)
    if left >= 0:
        hi = np.int32(min(np.int32(seqlen_q), np.int32(k1 - offset + left + 1)))
    if k0 >= seqlen_k or hi <= lo:
        return np.int32(0), np.int32(0)
    return np.int32(lo // block_m), np.int32((hi + block_m - 1) // block_m)


@cuda.jit(device=True, forceinline=True)
def row_limits(row, offset, left, right, seqlen_k, masked):
    """(lo0, hi0, lo1, hi1): the key ranges of a fragment's two rows, `row` and `row + 8`
    (`masked` a constant; without a mask every row sees [0, seqlen_k))."""
    if masked:
        lo0, hi0 = key_limits(row, offset, left, right, seqlen_k)
        lo1, hi1 = key_limits(row + 8, offset, left, right, seqlen_k)
        return lo0, hi0, lo1, hi1
    return np.int32(0), seqlen_k, np.int32(0), seqlen_k


@cuda.jit(device=True, forceinline=True)
def apply(s, n_block, block_n, col0, limits):
    """S of key block n_block (a fragment whose thread columns start at col0) with the columns
    outside each row's [lo, hi) key range (`row_limits`) at -inf."""
    lo0, hi0, lo1, hi1 = limits
    base = n_block * block_n
    return fragment.mask_cols(s, col0, lo0 - base, hi0 - base, lo1 - base, hi1 - base)


@cuda.jit(device=True, forceinline=True)
def query_limits(key, offset, left, right, seqlen_k):
    """[lo, hi) of the query rows that see key `key` (the transpose of `key_limits`): row i sees
    it iff key - offset - right <= i <= key - offset + left; a key past the sequence is seen by
    none.  Rows past seqlen_q need no bound here: the backward gives them an LSE of +inf."""
    lo = np.int32(0)
    if right >= 0:
        lo = np.int32(key - offset - right)
    hi = np.int32(FAR)
    if left >= 0:
        hi = np.int32(key - offset + left + 1)
    if key >= seqlen_k:
        hi = np.int32(-FAR)
    return lo, hi


@cuda.jit(device=True, forceinline=True)
def key_row_limits(key, offset, left, right, seqlen_k):
    """(lo0, hi0, lo1, hi1): the query ranges of a transposed fragment's two rows (keys `key` and
    `key + 8`), for `apply` with query blocks in place of key blocks."""
    lo0, hi0 = query_limits(key, offset, left, right, seqlen_k)
    lo1, hi1 = query_limits(key + 8, offset, left, right, seqlen_k)
    return lo0, hi0, lo1, hi1
