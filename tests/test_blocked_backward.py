"""The NumPy model of the blocked backward (numba_fa3.blocked_backward) against the float64
reference backward, and its query-block range against the mask."""
import ml_dtypes
import numpy as np
from hypothesis import given, settings, strategies as st

from numba_fa3.blocked import attention_blocked
from numba_fa3.blocked_backward import attention_backward_blocked, query_blocks
from numba_fa3.reference import _window, attention_backward_reference, attention_mask, attention_reference
from test_reference import cases, opts

BLOCKS = st.sampled_from([16, 32, 64])


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@settings(max_examples=100, deadline=None)
@given(cases(max_len=60), BLOCKS, BLOCKS, st.integers(0, 2**32 - 1))
def test_float32_blocked_backward_matches_reference(c, bm, bn, seed):
    """With float32 storage the blocked algorithm is the exact gradient up to float32 rounding,
    for any tiling; the forward's out and LSE come from the reference."""
    dout = np.random.default_rng(seed).standard_normal(c["q"].shape[:3] + (c["v"].shape[-1],))
    out, lse = attention_reference(c["q"], c["k"], c["v"], return_lse=True, **opts(c))
    got = attention_backward_blocked(dout, c["q"], c["k"], c["v"], out, lse, block_m=bm, block_n=bn,
                                     storage_dtype=np.float32, **opts(c))
    want = attention_backward_reference(dout, c["q"], c["k"], c["v"], **opts(c))
    for a, b in zip(got, want):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-4 * max(1.0, float(np.abs(b).max())))


def _lowprec_backward(dout, c, out, lse, storage):
    """The same gradient computed unblocked in float32 from storage-precision inputs, out and LSE,
    P and dS rounded to storage before their GEMMs: the "same computation in the input
    precision" of FA3's tolerance rule."""
    from numba_fa3.reference import _round_to, _scale
    f32 = np.float32
    q, k, v = (_round_to(x, storage).astype(np.float64) for x in (c["q"], c["k"], c["v"]))
    do = _round_to(dout, storage).astype(np.float64)
    o = _round_to(out, storage).astype(np.float64)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    scale, cap = _scale(c["softmax_scale"], d), c["softcap"]
    vis = attention_mask(sq, sk, c["causal"], c["window_size"])
    qt, dot, ot = (x.transpose(0, 2, 1, 3).astype(f32) for x in (q, do, o))
    kt = np.repeat(k, g, axis=2).transpose(0, 2, 1, 3).astype(f32)
    vt = np.repeat(v, g, axis=2).transpose(0, 2, 1, 3).astype(f32)
    raw = (qt @ kt.swapaxes(-1, -2)) * f32(scale)
    t = f32(cap) * np.tanh(raw / f32(cap)) if cap > 0 else raw
    p = np.where(vis, np.exp(np.where(vis, t, 0) - np.where(np.isneginf(lse), np.inf, lse)[..., None]), 0).astype(f32)
    dv = _round_to(p, storage).swapaxes(-1, -2) @ dot
    dp = dot @ vt.swapaxes(-1, -2)
    ds = p * (dp - (dot * ot).sum(-1, keepdims=True))
    if cap > 0:
        ds = ds * (1 - np.tanh(raw / f32(cap)) ** 2)
    ds = _round_to(ds, storage)
    dq = (ds @ kt) * f32(scale)
    dk = (ds.swapaxes(-1, -2) @ qt) * f32(scale)
    fold = lambda x: x.reshape(b, hk, g, sk, x.shape[-1]).sum(axis=2).transpose(0, 2, 1, 3)
    return (dq.transpose(0, 2, 1, 3), fold(dk), fold(dv))


@settings(max_examples=100, deadline=None)
@given(cases(max_len=60), st.sampled_from([ml_dtypes.bfloat16, np.float16]), st.integers(0, 2**32 - 1))
def test_low_precision_blocked_backward_meets_fa3_rule(c, storage, seed):
    """bf16/fp16 storage, out and LSE from the blocked forward: each gradient's error against the
    float64 gradient at most twice that of the same computation unblocked in the input precision,
    plus a small absolute term (FA3's rule: the blocking adds no error of its own)."""
    dout = np.random.default_rng(seed).standard_normal(c["q"].shape[:3] + (c["v"].shape[-1],))
    out, lse = attention_blocked(c["q"], c["k"], c["v"], storage_dtype=storage, return_lse=True, **opts(c))
    got = attention_backward_blocked(dout, c["q"], c["k"], c["v"], out, lse, storage_dtype=storage, **opts(c))
    low = _lowprec_backward(dout, c, out, lse, storage)
    want = attention_backward_reference(dout, c["q"], c["k"], c["v"], **opts(c))
    eps = float(ml_dtypes.finfo(storage).eps)
    for a, lp, b in zip(got, low, want):
        a = np.asarray(a, np.float64)
        assert np.isfinite(a).all()
        err, base = np.abs(a - b).max(), np.abs(np.asarray(lp, np.float64) - b).max()
        assert err <= 2 * base + eps * max(1e-3, float(np.abs(b).max())), (err, base)


@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([16, 64, 128]), st.sampled_from([16, 80, 128]),
       st.one_of(st.just(-1), st.integers(0, 200)), st.one_of(st.just(-1), st.integers(0, 200)), st.booleans())
def test_query_blocks_are_exactly_the_blocks_that_see_the_key_block(sq, sk, bm, bn, left, right, causal):
    left, right = _window(causal, (left, right))
    vis = attention_mask(sq, sk, window_size=(left, right))
    for nb in range(-(-sk // bn)):
        m_min, m_max = query_blocks(nb, bm, bn, sq, sk, left, right)
        for mb in range(-(-sq // bm)):
            sees = vis[mb * bm:(mb + 1) * bm, nb * bn:(nb + 1) * bn].any()
            assert sees == (m_min <= mb < m_max), (nb, mb, m_min, m_max)
