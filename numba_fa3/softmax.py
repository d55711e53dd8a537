"""The online softmax of one warpgroup's S tile, in fp32 with exp2 (FA3 section 3.1, Algorithm 1).

State per thread: for each of its two rows, the running max m (of raw scores) and the
thread-partial row sum l; the quad of threads sharing a row reduces l only once, at the end.
The scale is folded into the exponent: p = 2^(s * scale * log2 e - m * scale * log2 e).
A row that has seen only masked scores keeps m = -inf; its exponent base is taken as 0 so that
every p and the rescale factor are exactly 0 (never NaN).
"""
import math

import numpy as np
from numba import cuda

from primitives import fragment
from ptx_inline import special

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_INF = np.float32(-np.inf)
FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True, forceinline=True)
def quad_max(x):
    x = max(x, cuda.shfl_xor_sync(FULL_MASK, x, 1))
    return max(x, cuda.shfl_xor_sync(FULL_MASK, x, 2))


@cuda.jit(device=True, forceinline=True)
def quad_sum(x):
    x += cuda.shfl_xor_sync(FULL_MASK, x, 1)
    return x + cuda.shfl_xor_sync(FULL_MASK, x, 2)


@cuda.jit(device=True, forceinline=True)
def exponent_base(m, scale_log2, finite=False):
    """m * scale_log2, or 0 for a row with no score yet (m = -inf); `finite` (a constant): m is
    known finite, so the guard is left out."""
    if not finite and m == NEG_INF:
        return np.float32(0)
    return m * scale_log2


@cuda.jit(device=True, forceinline=True)
def online_max(s, m0, m1, scale_log2, unmasked=False, split_rows=False):
    """The first part of `online_step`: the new row maxima, their exponent bases and O's
    rescale factors (n0, n1, b0, b1, alpha0, alpha1).  `unmasked` (a constant): S has no -inf,
    so the new maxima are finite and the -inf guard of `exponent_base` is left out of the
    critical path (max -> base -> exponentials).  `split_rows` (a constant): the second row's
    max waits for the first row's base (`fragment.row_max_after`), FA3's order (an A/B knob,
    FlashForward.SPLIT_ROW_MAX)."""
    if split_rows:
        n0 = max(m0, quad_max(fragment.row_max_after(s, 0, scale_log2)))
        b0 = exponent_base(n0, scale_log2, unmasked)
        n1 = max(m1, quad_max(fragment.row_max_after(s, 1, b0)))
    else:
        mx0, mx1 = fragment.row_max(s)
        n0 = max(m0, quad_max(mx0))
        n1 = max(m1, quad_max(mx1))
        b0 = exponent_base(n0, scale_log2, unmasked)
    b1 = exponent_base(n1, scale_log2, unmasked)
    a0 = special.ex2(m0 * scale_log2 - b0)
    a1 = special.ex2(m1 * scale_log2 - b1)
    return n0, n1, b0, b1, a0, a1


@cuda.jit(device=True, forceinline=True)
def online_step(s, m0, m1, l0, l1, scale_log2, unmasked=False, split_rows=False):
    """Consume one S tile: returns (P, m0, m1, l0, l1, alpha0, alpha1) where alpha rescales O
    (`unmasked`: see online_max)."""
    n0, n1, b0, b1, a0, a1 = online_max(s, m0, m1, scale_log2, unmasked, split_rows)
    p = fragment.exp2_rows(s, scale_log2, b0, b1)
    l0, l1 = online_sum(p, l0, l1, a0, a1)
    return p, n0, n1, l0, l1, a0, a1


@cuda.jit(device=True, forceinline=True)
def online_sum(p, l0, l1, a0, a1):
    """The last part of `online_step`: the running row sums, rescaled, plus P's."""
    s0, s1 = fragment.row_sum(p)
    return l0 * a0 + s0, l1 * a1 + s1


@cuda.jit(device=True, forceinline=True)
def finish_row(m, l, softmax_scale):
    """(1 / row sum, natural-log LSE) from the thread-partial sum; empty rows give (0, -inf)."""
    total = quad_sum(l)
    if total > 0:
        return np.float32(1) / total, m * softmax_scale + math.log(total)
    return np.float32(0), NEG_INF
