"""The online softmax of one warpgroup's S tile, in fp32 with exp2 (FA3 section 3.1, Algorithm 1).

State per thread: for each of its two rows, the running max m (of raw scores) and the
thread-partial row sum l; the quad of threads sharing a row reduces l only once, at the end.
The scale is folded into the exponent: p = 2^(s * scale * log2 e - m * scale * log2 e).
A row that has seen only masked scores keeps m = -inf; its exponent base is taken as 0 so that
every p and the rescale factor are exactly 0 (never NaN).

With a rescale threshold T (FA4's lazy rescale) the running max moves only when a block's max
exceeds it by more than T in the exponent's units (log2), so p may reach 2^T and the factor that
rescales O is exactly 1 in most steps of a long row: O's multiplies (D/2 per thread and step)
can then be skipped (`any_rescaled`).  P stays within bf16's range and relative precision, and l
and O grow by the same factor, so the quotient is the same to rounding.
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
def lazy_max(m, n, scale_log2, threshold):
    """The running max after a block whose row max is n >= m: n only where it exceeds m by
    more than `threshold` (a constant; 0: always n) in the exponent's units.  The bound
    m * scale_log2 + threshold does not depend on the block, so only a compare and a select
    join the critical path.  m = -inf takes any finite n; -inf with -inf stays -inf."""
    if threshold == 0:
        return n
    if n * scale_log2 > m * scale_log2 + np.float32(threshold):
        return n
    return m


@cuda.jit(device=True, forceinline=True)
def online_max(s, m0, m1, scale_log2, unmasked=False, split_rows=False, threshold=0.0):
    """The first part of `online_step`: the new row maxima, their exponent bases and O's
    rescale factors (n0, n1, b0, b1, alpha0, alpha1).  `unmasked` (a constant): S has no -inf,
    so the new maxima are finite and the -inf guard of `exponent_base` is left out of the
    critical path (max -> base -> exponentials).  `split_rows` (a constant): the second row's
    max waits for the first row's base (`fragment.row_max_after`), FA3's order (an A/B knob,
    FlashForward.SPLIT_ROW_MAX).  `threshold` (a constant): the lazy rescale (`lazy_max`)."""
    if split_rows:
        n0 = lazy_max(m0, max(m0, quad_max(fragment.row_max_after(s, 0, scale_log2))), scale_log2, threshold)
        b0 = exponent_base(n0, scale_log2, unmasked)
        n1 = lazy_max(m1, max(m1, quad_max(fragment.row_max_after(s, 1, b0))), scale_log2, threshold)
    else:
        mx0, mx1 = fragment.row_max(s)
        n0 = lazy_max(m0, max(m0, quad_max(mx0)), scale_log2, threshold)
        n1 = lazy_max(m1, max(m1, quad_max(mx1)), scale_log2, threshold)
        b0 = exponent_base(n0, scale_log2, unmasked)
    b1 = exponent_base(n1, scale_log2, unmasked)
    a0 = special.ex2(m0 * scale_log2 - b0)
    a1 = special.ex2(m1 * scale_log2 - b1)
    if threshold != 0:
        # exactly 1 where the max stayed: ptxas fuses m * scale_log2 - b into an FFMA whose
        # unrounded product leaves a factor a rounding away from 1, and every step rescaled
        a0 = np.float32(1) if n0 == m0 else a0
        a1 = np.float32(1) if n1 == m1 else a1
    return n0, n1, b0, b1, a0, a1


@cuda.jit(device=True, forceinline=True)
def online_step(s, m0, m1, l0, l1, scale_log2, unmasked=False, split_rows=False, threshold=0.0):
    """Consume one S tile: returns (P, m0, m1, l0, l1, alpha0, alpha1) where alpha rescales O
    (`unmasked`, `threshold`: see online_max)."""
    n0, n1, b0, b1, a0, a1 = online_max(s, m0, m1, scale_log2, unmasked, split_rows, threshold)
    p = fragment.exp2_rows(s, scale_log2, b0, b1)
    l0, l1 = online_sum(p, l0, l1, a0, a1)
    return p, n0, n1, l0, l1, a0, a1


@cuda.jit(device=True, forceinline=True)
def any_rescaled(a0, a1):
    """Whether any row of the warp has a rescale factor other than 1 (a warp vote, so a branch
    on it is warp-uniform): with a threshold, O's multiplies are needed only then."""
    return cuda.any_sync(FULL_MASK, a0 != np.float32(1) or a1 != np.float32(1))


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
