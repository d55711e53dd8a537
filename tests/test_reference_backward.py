"""The float64 NumPy reference backward (numba_fa3.reference.attention_backward_reference): the
ground truth of the backward kernels, itself checked against finite differences of the forward
reference on tiny shapes and against the textbook softmax Jacobian over random problems."""
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numba_fa3.reference import (attention_backward_reference, attention_backward_reference_varlen,
                                 attention_mask, attention_reference, attention_reference_varlen)
from test_reference import cases, opts, scale_of


def _loss(q, k, v, dout, o):
    return float((attention_reference(q, k, v, **o) * dout).sum())


def _numeric_grad(x, f, eps=1e-6):
    """Central differences of f() with respect to every element of x (changed in place)."""
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        keep = x[idx]
        x[idx] = keep + eps
        hi = f()
        x[idx] = keep - eps
        lo = f()
        x[idx] = keep
        g[idx] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("sq,sk,h,hk,causal,window,softcap", [
    (3, 4, 2, 1, False, (-1, -1), 0.0),   # GQA 2:1
    (4, 3, 2, 2, True, (-1, -1), 0.0),    # causal, Sq > Sk: the first row sees no key
    (5, 5, 3, 1, False, (1, 1), 2.0),     # a window with soft-cap, MQA
    (2, 6, 1, 1, False, (3, 0), 5.0),     # left window
])
def test_backward_matches_finite_differences(sq, sk, h, hk, causal, window, softcap):
    rng = np.random.default_rng(sq * 100 + sk * 10 + h)
    q = rng.standard_normal((1, sq, h, 4))
    k = rng.standard_normal((1, sk, hk, 4))
    v = rng.standard_normal((1, sk, hk, 3))
    dout = rng.standard_normal((1, sq, h, 3))
    o = dict(causal=causal, window_size=window, softcap=softcap, softmax_scale=0.7)
    dq, dk, dv = attention_backward_reference(dout, q, k, v, **o)
    for x, got in ((q, dq), (k, dk), (v, dv)):
        want = _numeric_grad(x, lambda: _loss(q, k, v, dout, o))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _textbook(dout, c):
    """Per (batch, head, row): P the row's softmax over the keys it sees, dS = (diag(P) - P P^T) dP
    (the softmax's Jacobian), through the soft-cap's derivative, then dQ = scale dS K and dK, dV
    accumulated into the row's key/value head."""
    q, k, v = c["q"], c["k"], c["v"]
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale, cap = scale_of(c), c["softcap"]
    mask = attention_mask(sq, sk, c["causal"], c["window_size"])
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for bb in range(b):
        for hh in range(h):
            kh = hh // (h // hk)
            for i in range(sq):
                cols = np.flatnonzero(mask[i])
                if cols.size == 0:
                    continue
                raw = scale * (k[bb, cols, kh] @ q[bb, i, hh])
                t = cap * np.tanh(raw / cap) if cap > 0 else raw
                p = np.exp(t - t.max())
                p /= p.sum()
                dv[bb, cols, kh] += np.outer(p, dout[bb, i, hh])
                dp = v[bb, cols, kh] @ dout[bb, i, hh]
                ds = (np.diag(p) - np.outer(p, p)) @ dp
                if cap > 0:
                    ds = ds * (1 - np.tanh(raw / cap) ** 2)
                dq[bb, i, hh] += scale * ds @ k[bb, cols, kh]
                dk[bb, cols, kh] += scale * np.outer(ds, q[bb, i, hh])
    return dq, dk, dv


@settings(max_examples=60, deadline=None)
@given(cases(max_len=24), st.integers(0, 2**32 - 1))
def test_backward_matches_textbook(c, seed):
    dout = np.random.default_rng(seed).standard_normal(c["q"].shape[:3] + (c["v"].shape[-1],))
    got = attention_backward_reference(dout, c["q"], c["k"], c["v"], **opts(c))
    for a, b in zip(got, _textbook(dout, c)):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(cases(max_len=24), st.integers(0, 2**32 - 1))
def test_backward_float32_close_to_float64(c, seed):
    dout = np.random.default_rng(seed).standard_normal(c["q"].shape[:3] + (c["v"].shape[-1],))
    g64 = attention_backward_reference(dout, c["q"], c["k"], c["v"], **opts(c))
    g32 = attention_backward_reference(dout, c["q"], c["k"], c["v"], dtype=np.float32, **opts(c))
    for a, b in zip(g32, g64):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4 * max(1.0, float(np.abs(b).max())))


def test_rows_that_see_no_key_give_zero_gradients():
    """Causal with Sq > Sk: the first Sq - Sk rows see no key; their dq is 0 and they add
    nothing to dk and dv (never NaN)."""
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((1, 6, 2, 8)), rng.standard_normal((1, 2, 2, 8)), rng.standard_normal((1, 2, 2, 8))
    dout = rng.standard_normal((1, 6, 2, 8))
    dq, dk, dv = attention_backward_reference(dout, q, k, v, causal=True)
    assert all(np.isfinite(x).all() for x in (dq, dk, dv))
    np.testing.assert_array_equal(dq[:, :4], 0)
    _, dk2, dv2 = attention_backward_reference(dout[:, 4:], q[:, 4:], k, v, causal=True)
    np.testing.assert_allclose(dk, dk2, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dv, dv2, rtol=1e-12, atol=1e-14)


def test_varlen_backward_is_dense_backward_per_sequence():
    rng = np.random.default_rng(5)
    lens_q, lens_k = [3, 0, 5, 1], [4, 2, 0, 6]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    h, hk, d = 4, 2, 8
    q = rng.standard_normal((cu_q[-1], h, d))
    k, v = rng.standard_normal((cu_k[-1], hk, d)), rng.standard_normal((cu_k[-1], hk, d))
    dout = rng.standard_normal((cu_q[-1], h, d))
    o = dict(causal=True, softcap=3.0)
    dq, dk, dv = attention_backward_reference_varlen(dout, q, k, v, cu_q, cu_k, **o)
    for i in range(len(lens_q)):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0 or k1 == k0:
            np.testing.assert_array_equal(dq[q0:q1], 0)
            np.testing.assert_array_equal(dk[k0:k1], 0)
            continue
        g = attention_backward_reference(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **o)
        np.testing.assert_allclose(dq[q0:q1], g[0][0], rtol=1e-12)
        np.testing.assert_allclose(dk[k0:k1], g[1][0], rtol=1e-12)
        np.testing.assert_allclose(dv[k0:k1], g[2][0], rtol=1e-12)
    # and it differentiates the varlen forward
    loss = lambda: float((attention_reference_varlen(q, k, v, cu_q, cu_k, **o) * dout).sum())
    idx = (cu_q[2] + 1, 1, 3)
    keep = q[idx]
    q[idx] = keep + 1e-6
    hi = loss()
    q[idx] = keep - 1e-6
    lo = loss()
    q[idx] = keep
    assert math.isclose(dq[idx], (hi - lo) / 2e-6, rel_tol=1e-5, abs_tol=1e-8)


def test_backward_reference_rejects_bad_input():
    q = np.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="dout must have shape"):
        attention_backward_reference(np.zeros((1, 4, 2, 4)), q, q, q)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        attention_backward_reference(np.zeros((1, 4, 3, 8)), np.zeros((1, 4, 3, 8)), q, q)
