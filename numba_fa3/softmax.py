"""The online softmax of one warpgroup's S tile, in fp32 with exp2 (FA3 section 3.1, Algorithm 1).

State per thread: for each of its two rows, the running max m (of raw scores) and the
thread-partial row sum l; the quad of threads sharing a row reduces l only once, at the end.
The scale is folded into the exponent: p = 2^(s * scale * log2 e - m * scale * log2 e).
The state travels as one `Softmax` record through `online_step` (or its two halves, `online_max`
then `online_sum`, between which a kernel places other work), `rescale` and `finish`.
A row that has seen only masked scores keeps m = -inf; its exponent base is taken as 0 so that
every p and the rescale factor are exactly 0 (never NaN).

With a rescale threshold T (FA4's lazy rescale) the running max moves only when a block's max
exceeds it by more than T in the exponent's units (log2), so p may reach 2^T and the factor that
rescales O is exactly 1 in most steps of a long row: O's multiplies (D/2 per thread and step)
can then be skipped (`any_rescaled`).  P stays within bf16's range and relative precision, and l
and O grow by the same factor, so the quotient is the same to rounding.
"""
import math
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
from numba import cuda

from numba_fa3.primitives import fragment
from numba_fa3.ptx_inline import special

LOG2E = math.log2(math.e)


def softcap_scales(softmax_scale, softcap):
    """(tanh's argument scale, the exponent's scale) of a launch: with a soft-cap, s -> softcap *
    tanh(s * scale / softcap), so the kernel takes scale / softcap for tanh and the exponent and
    LSE scale by softcap instead of softmax_scale; without one, (0, softmax_scale)."""
    if softcap:
        return softmax_scale / softcap, softcap
    return 0.0, softmax_scale
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


#: One warpgroup's online-softmax state, per thread: the running max (raw scores) and
#: thread-partial sum of its two rows, and the factors (a0, a1) by which the last step rescaled
#: them, which O's rows take too.
Softmax = namedtuple("Softmax", "m0 m1 l0 l1 a0 a1")


@cuda.jit(device=True, forceinline=True)
def initial():
    """No score seen: max -inf, sum 0 (a row left so finishes as (0, -inf))."""
    one = np.float32(1)
    return Softmax(NEG_INF, NEG_INF, np.float32(0), np.float32(0), one, one)


@cuda.jit(device=True, forceinline=True)
def online_max(s, st, scale_log2, unmasked=False, threshold=0.0):
    """The first part of `online_step`: the state with the new row maxima and O's rescale
    factors (sums unchanged), and the new exponent bases (st, b0, b1).  `unmasked` (a constant):
    S has no -inf, so the new maxima are finite and the -inf guard of `exponent_base` is left
    out of the critical path (max -> base -> exponentials).  `threshold` (a constant): the lazy
    rescale (`lazy_max`)."""
    m0, m1 = st.m0, st.m1
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
    return Softmax(n0, n1, st.l0, st.l1, a0, a1), b0, b1


@cuda.jit(device=True, forceinline=True)
def online_sum(p, st):
    """The last part of `online_step`: the running row sums, rescaled, plus P's."""
    s0, s1 = fragment.row_sum(p)
    return Softmax(st.m0, st.m1, st.l0 * st.a0 + s0, st.l1 * st.a1 + s1, st.a0, st.a1)


@cuda.jit(device=True, forceinline=True)
def online_step(s, st, scale_log2, unmasked=False, threshold=0.0):
    """Consume one S tile: (P, the new state), the state's a0, a1 rescaling O
    (`unmasked`, `threshold`: see online_max)."""
    st, b0, b1 = online_max(s, st, scale_log2, unmasked, threshold)
    p = fragment.exp2_rows(s, scale_log2, b0, b1)
    return p, online_sum(p, st)


@cuda.jit(device=True, forceinline=True)
def any_rescaled(st):
    """Whether any row of the warp has a rescale factor other than 1 (a warp vote, so a branch
    on it is warp-uniform): with a threshold, O's multiplies are needed only then."""
    return cuda.any_sync(FULL_MASK, st.a0 != np.float32(1) or st.a1 != np.float32(1))


@cuda.jit(device=True, forceinline=True)
def rescale(o, st, lazy=False):
    """O's rows times the state's factors; `lazy` (a constant): only where some row of the warp
    moved its max (most steps of a long row skip it)."""
    if lazy:
        if any_rescaled(st):
            o = fragment.scale_rows(o, st.a0, st.a1)
        return o
    return fragment.scale_rows(o, st.a0, st.a1)


@cuda.jit(device=True, forceinline=True)
def finish_row(m, l, softmax_scale):
    """(1 / row sum, natural-log LSE) from the thread-partial sum; empty rows give (0, -inf)."""
    total = quad_sum(l)
    if total > 0:
        return np.float32(1) / total, m * softmax_scale + math.log(total)
    return np.float32(0), NEG_INF


@cuda.jit(device=True, forceinline=True)
def finish(st, softmax_scale):
    """(1/l0, lse0, 1/l1, lse1) of the thread's two rows (`finish_row`)."""
    inv0, lse0 = finish_row(st.m0, st.l0, softmax_scale)
    inv1, lse1 = finish_row(st.m1, st.l1, softmax_scale)
    return inv0, lse0, inv1, lse1


def raw_units():
    """The online softmax as the 16-bit forward's main loop takes it, beside `exponent_units`:
    online_max(s, st, c, vscale, unmasked, threshold), online_sum(p, st, vscale) and
    online_step(s, st, c, vscale, unmasked, threshold), the running max kept in raw scores
    (one scale per launch) and `vscale` ignored (V is not scaled)."""

    @cuda.jit(device=True, forceinline=True)
    def raw_max(s, st, c, vscale, unmasked, threshold):
        return online_max(s, st, c, unmasked, threshold)

    @cuda.jit(device=True, forceinline=True)
    def raw_sum(p, st, vscale):
        return online_sum(p, st)

    @cuda.jit(device=True, forceinline=True)
    def raw_step(s, st, c, vscale, unmasked, threshold):
        return online_step(s, st, c, unmasked, threshold)

    return SimpleNamespace(online_max=raw_max, online_sum=raw_sum, online_step=raw_step)


def exponent_units(offset):
    """The online softmax with the running max kept in the exponent's units (log2, scale
    applied), for kernels whose score scale changes from key block to key block (the FP8
    forward: a block descale per key block, `c = descale_q descale_k scale log2 e`).  A block's
    raw maxima times its c (> 0) are its scaled maxima, so blocks of different c compare; the
    exponentials stay one FFMA, p = 2^(s c - (m - offset)).  `offset` (log2, a constant) lifts P
    into (0, 2^offset] (FA3 section 3.3: e4m3's range, 448, keeps 2^8); l and O carry the
    same factor, and `finish` takes it out of the LSE.

    V's descale of the block, v (per key block or per head), is folded into P the same way:
    `vscale` is (log2 v, 1 / v), the running max is taken of s c + log2 v and P's exponent
    gains log2 v, so the P V GEMM adds P v V8 (P v <= 2^offset: e4m3's range holds whatever the
    blocks' descales), while l adds rowsum(P v) / v, the sum of P alone: O / l is then the
    dequantized output with no factor left for the epilogue, and m - offset + log2 l is still
    the row's log2-sum-exp (each p v / v is p).  Two multiplies and an add per row and block,
    none per element.

    Returns a namespace with online_max(s, st, c, vscale, unmasked, threshold) -> (st, b0, b1),
    online_sum(p, st, vscale) -> st, online_step(s, st, c, vscale, unmasked, threshold) -> (p,
    st), finish(st) -> (1/l0, lse0, 1/l1, lse1).  `threshold` must be 0: the lazy rescale would
    let P reach 2^(offset + threshold)."""
    OFFSET = np.float32(offset)
    LSE_SHIFT = np.float32(offset * LN2)
    LN2_32 = np.float32(LN2)

    @cuda.jit(device=True, forceinline=True)
    def base(n, finite):
        """n, or 0 for a row with no score yet (n = -inf)."""
        if not finite and n == NEG_INF:
            return np.float32(0)
        return n

    @cuda.jit(device=True, forceinline=True)
    def online_max(s, st, c, vscale, unmasked=False, threshold=0.0):
        log2_v, _ = vscale
        mx0, mx1 = fragment.row_max(s)
        n0 = max(st.m0, quad_max(mx0) * c + log2_v)
        n1 = max(st.m1, quad_max(mx1) * c + log2_v)
        e0, e1 = base(n0, unmasked), base(n1, unmasked)
        a0 = special.ex2(st.m0 - e0)
        a1 = special.ex2(st.m1 - e1)
        lift = OFFSET + log2_v
        return Softmax(n0, n1, st.l0, st.l1, a0, a1), e0 - lift, e1 - lift

    @cuda.jit(device=True, forceinline=True)
    def value_sum(p, st, vscale):
        _, inv_v = vscale
        s0, s1 = fragment.row_sum(p)
        return Softmax(st.m0, st.m1, st.l0 * st.a0 + s0 * inv_v, st.l1 * st.a1 + s1 * inv_v, st.a0, st.a1)

    @cuda.jit(device=True, forceinline=True)
    def online_step(s, st, c, vscale, unmasked=False, threshold=0.0):
        st, b0, b1 = online_max(s, st, c, vscale, unmasked, threshold)
        p = fragment.exp2_rows(s, c, b0, b1)
        return p, value_sum(p, st, vscale)

    @cuda.jit(device=True, forceinline=True)
    def finish_row(m, l):
        total = quad_sum(l)
        if total > 0:
            return np.float32(1) / total, m * LN2_32 + math.log(total) - LSE_SHIFT
        return np.float32(0), NEG_INF

    @cuda.jit(device=True, forceinline=True)
    def finish(st):
        inv0, lse0 = finish_row(st.m0, st.l0)
        inv1, lse1 = finish_row(st.m1, st.l1)
        return inv0, lse0, inv1, lse1

    return SimpleNamespace(online_max=online_max, online_sum=value_sum, online_step=online_step, finish=finish)
