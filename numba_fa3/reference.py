"""Exact NumPy attention: the ground truth for the FlashAttention-3 kernels.

Layouts follow FlashAttention: dense ``q [B, Sq, H, D]``, ``k [B, Sk, Hk, D]``,
``v [B, Sk, Hk, Dv]``; varlen packs sequences along the first axis. Query head
``h`` reads key/value head ``h // (H // Hk)`` (GQA / MQA).

Masks are bottom-right aligned: with ``shift = Sk - Sq``, query row ``i`` may
see key column ``j`` iff ``i + shift - left <= j <= i + shift + right`` (a
``-1`` bound is infinite). ``causal=True`` is the window ``(left, 0)``.
Rows that see no key give output 0 and LSE ``-inf``.
"""

import math

import ml_dtypes
import numpy as np

__all__ = [
    "attention_mask",
    "attention_reference",
    "attention_reference_varlen",
    "attention_backward_reference",
    "attention_backward_reference_varlen",
    "attention_lowprec",
]


# ---------------------------------------------------------------------------
# validation helpers (shared with blocked.py)
# ---------------------------------------------------------------------------

def _float_array(x, name):
    a = np.asarray(x)
    dt = a.dtype
    if dt.kind == "f":
        return a
    if dt.kind == "V":  # ml_dtypes types (bfloat16, float8_*) have kind 'V'
        try:
            ml_dtypes.finfo(dt)
            return a
        except ValueError:
            pass
    raise ValueError(f"{name} must have a floating-point dtype, got {dt}")


def _compute_dtype(dtype):
    dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _window(causal, window_size):
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    for name, w in (("left", left), ("right", right)):
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < -1:
            raise ValueError(f"window_size {name} must be an int >= -1, got {w!r}")
    left, right = int(left), int(right)
    if causal:
        right = 0
    return left, right


def _softcap(softcap):
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    return softcap


def _scale(softmax_scale, head_dim):
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    s = float(softmax_scale)
    # The kernels take the row max of raw scores, which is only the max of the
    # scaled scores when the scale is positive.
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"softmax_scale must be a finite number > 0, got {softmax_scale}")
    return s


def _check_qkv(q, k, v, rank):
    q = _float_array(q, "q")
    k = _float_array(k, "k")
    v = _float_array(v, "v")
    layout = "[B, S, H, D]" if rank == 4 else "[T, H, D]"
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {a.shape}")
    if rank == 4 and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}")
    if k.shape[-3] != v.shape[-3]:
        raise ValueError(f"k and v sequence lengths differ: {k.shape[-3]} vs {v.shape[-3]}")
    h, hk, hv = q.shape[-2], k.shape[-2], v.shape[-2]
    if hk != hv:
        raise ValueError(f"k and v head counts differ: {hk} vs {hv}")
    if hk < 1 or h < 1 or h % hk != 0:
        raise ValueError(f"query heads ({h}) must be a positive multiple of key/value heads ({hk})")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if q.shape[-1] < 1 or v.shape[-1] < 1:
        raise ValueError("head dims must be >= 1")
    return q, k, v


def _check_cu_seqlens(cu, total, name):
    a = np.asarray(cu)
    if a.ndim != 1 or a.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with length batch + 1 >= 2, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got {a.dtype}")
    a = a.astype(np.int64)
    if a[0] != 0:
        raise ValueError(f"{name}[0] must be 0, got {a[0]}")
    if np.any(np.diff(a) < 0):
        raise ValueError(f"{name} must be non-decreasing")
    if a[-1] != total:
        raise ValueError(f"{name}[-1] ({a[-1]}) must equal the packed length ({total})")
    return a


# ---------------------------------------------------------------------------
# exact attention
# ---------------------------------------------------------------------------

def _options(q, softmax_scale, causal, window_size, softcap):
    """(scale, left, right, softcap) validated, for q's head dim."""
    left, right = _window(causal, window_size)
    return _scale(softmax_scale, q.shape[-1]), left, right, _softcap(softcap)


def _varlen_bounds(q, k, cu_seqlens_q, cu_seqlens_k):
    """The checked cu_seqlens of packed q and k (int64), the same number of sequences."""
    cq = _check_cu_seqlens(cu_seqlens_q, q.shape[0], "cu_seqlens_q")
    ck = _check_cu_seqlens(cu_seqlens_k, k.shape[0], "cu_seqlens_k")
    if cq.shape != ck.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k lengths differ: {cq.shape[0]} vs {ck.shape[0]}")
    return cq, ck


def attention_mask(seqlen_q, seqlen_k, causal=False, window_size=(-1, -1)):
    """Boolean ``[seqlen_q, seqlen_k]`` matrix, True where query i may see key j."""
    left, right = _window(causal, window_size)
    shift = seqlen_k - seqlen_q
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    vis = np.ones((seqlen_q, seqlen_k), dtype=bool)
    if left >= 0:
        vis &= j >= i + shift - left
    if right >= 0:
        vis &= j <= i + shift + right
    return vis


def _dense(q, k, v, scale, left, right, softcap, dtype):
    """Exact attention on validated, already-cast arrays; returns (out, lse)."""
    b, sq, h, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    # Group query heads by their key head so K/V are broadcast, not copied.
    qt = q.transpose(0, 2, 1, 3).reshape(b, hk, g, sq, d)
    kt = k.transpose(0, 2, 3, 1)[:, :, None]  # [B, Hk, 1, D, Sk]
    vt = v.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hk, 1, Sk, Dv]
    s = (qt @ kt) * dtype.type(scale)
    if softcap > 0:
        s = dtype.type(softcap) * np.tanh(s / dtype.type(softcap))
    vis = attention_mask(sq, sk, window_size=(left, right))
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)  # keeps exp(-inf - (-inf)) = NaN out
    p = np.exp(s - m)
    l = p.sum(axis=-1, keepdims=True)
    seen = l > 0
    l_safe = np.where(seen, l, 1)
    out = (p @ vt) / l_safe  # fully masked rows: p == 0, so out == 0
    lse = np.where(seen, m + np.log(l_safe), -np.inf)
    out = out.reshape(b, h, sq, dv).transpose(0, 2, 1, 3).astype(dtype, copy=False)
    lse = lse[..., 0].reshape(b, h, sq).astype(dtype, copy=False)
    return out, lse


def attention_reference(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, return_lse=False, dtype=np.float64):
    """Exact attention over dense ``[B, S, H, D]`` inputs.

    Inputs of any float dtype (incl. ml_dtypes.bfloat16, float16) are upcast to
    ``dtype`` (float64 or float32) and everything is computed in ``dtype``.
    Scores are ``softmax_scale * q.k`` (default scale ``1/sqrt(D)``), then
    ``softcap * tanh(s / softcap)`` when ``softcap > 0``, then masked.

    Returns ``out [B, Sq, H, Dv]`` or ``(out, lse)`` with ``lse [B, H, Sq]``
    the natural-log logsumexp of the masked scores, both in ``dtype``.
    """
    dtype = _compute_dtype(dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    out, lse = _dense(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                      scale, left, right, softcap, dtype)
    return (out, lse) if return_lse else out


def attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                               causal=False, window_size=(-1, -1), softcap=0.0,
                               return_lse=False, dtype=np.float64):
    """Exact attention over packed ``q [Tq, H, D]``, ``k/v [Tk, Hk, D|Dv]``.

    Sequence ``b`` is ``q[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` against
    ``k[cu_seqlens_k[b]:cu_seqlens_k[b+1]]``; masks are aligned per sequence.
    Empty sequences are allowed. Returns ``out [Tq, H, Dv]`` or
    ``(out, lse)`` with ``lse [H, Tq]``.
    """
    dtype = _compute_dtype(dtype)
    q, k, v = _check_qkv(q, k, v, 3)
    cq, ck = _varlen_bounds(q, k, cu_seqlens_q, cu_seqlens_k)
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    tq, h = q.shape[0], q.shape[1]
    out = np.zeros((tq, h, v.shape[-1]), dtype=dtype)
    lse = np.full((h, tq), -np.inf, dtype=dtype)
    for b in range(cq.shape[0] - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0:
            continue
        o, l = _dense(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                      scale, left, right, softcap, dtype)
        out[q0:q1] = o[0]
        lse[:, q0:q1] = l[0]
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# the backward pass
# ---------------------------------------------------------------------------

def _dense_backward(dout, q, k, v, scale, left, right, softcap, dtype):
    """Exact gradients of sum(dout * out) on validated, already-cast arrays: (dq, dk, dv).

    With raw scores R = scale * q k^T, capped scores T = softcap * tanh(R / softcap) (T = R
    without a cap), P the masked row softmax of T and O = P V:
        dV = P^T dO,  dP = dO V^T,  D = rowsum(dO * O) = rowsum(P * dP),
        dT = P * (dP - D),  dR = dT * (1 - tanh(R / softcap)^2)  (dR = dT without a cap),
        dQ = scale * dR K,  dK = scale * dR^T Q,
    dK and dV summed over the query heads that share a key/value head.  Rows that see no key
    have P = 0 and contribute nothing."""
    b, sq, h, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    qt = q.transpose(0, 2, 1, 3).reshape(b, hk, g, sq, d)
    dot = dout.transpose(0, 2, 1, 3).reshape(b, hk, g, sq, dv)
    kt = k.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hk, 1, Sk, D]
    vt = v.transpose(0, 2, 1, 3)[:, :, None]  # [B, Hk, 1, Sk, Dv]
    r = (qt @ kt.swapaxes(-1, -2)) * dtype.type(scale)
    t = dtype.type(softcap) * np.tanh(r / dtype.type(softcap)) if softcap > 0 else r
    vis = attention_mask(sq, sk, window_size=(left, right))
    t = np.where(vis, t, -np.inf)
    m = t.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0)
    e = np.exp(t - m)
    l = e.sum(axis=-1, keepdims=True)
    p = e / np.where(l > 0, l, 1)
    dp = dot @ vt.swapaxes(-1, -2)
    drow = (p * dp).sum(axis=-1, keepdims=True)
    dt = p * (dp - drow)
    dr = dt * (1 - np.tanh(r / dtype.type(softcap)) ** 2) if softcap > 0 else dt
    dq = (dr @ kt) * dtype.type(scale)                          # [B, Hk, G, Sq, D]
    dk = (dr.swapaxes(-1, -2) @ qt).sum(axis=2) * dtype.type(scale)  # [B, Hk, Sk, D]
    dvv = (p.swapaxes(-1, -2) @ dot).sum(axis=2)                # [B, Hk, Sk, Dv]
    dq = dq.reshape(b, h, sq, d).transpose(0, 2, 1, 3)
    return (dq.astype(dtype, copy=False), dk.transpose(0, 2, 1, 3).astype(dtype, copy=False),
            dvv.transpose(0, 2, 1, 3).astype(dtype, copy=False))


def attention_backward_reference(dout, q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                                 softcap=0.0, dtype=np.float64):
    """Exact gradients (dq, dk, dv) of ``sum(dout * attention_reference(q, k, v, ...))`` over dense
    ``[B, S, H, D]`` inputs, computed in ``dtype`` (float64 or float32) from inputs of any float
    dtype; ``dout`` is ``[B, Sq, H, Dv]``.  dk and dv are summed over the query heads of each
    key/value head (GQA/MQA); rows that see no key give no gradient."""
    dtype = _compute_dtype(dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    dout = _float_array(dout, "dout")
    want = q.shape[:3] + (v.shape[-1],)
    if dout.shape != want:
        raise ValueError(f"dout must have shape {want}, got {dout.shape}")
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    return _dense_backward(dout.astype(dtype), q.astype(dtype), k.astype(dtype), v.astype(dtype),
                           scale, left, right, softcap, dtype)


def attention_backward_reference_varlen(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None,
                                        causal=False, window_size=(-1, -1), softcap=0.0, dtype=np.float64):
    """`attention_backward_reference` over packed sequences (as `attention_reference_varlen`):
    ``dout [Tq, H, Dv]``; returns ``(dq [Tq, H, D], dk [Tk, Hk, D], dv [Tk, Hk, Dv])``, zero for
    keys of empty sequences."""
    dtype = _compute_dtype(dtype)
    q, k, v = _check_qkv(q, k, v, 3)
    dout = _float_array(dout, "dout")
    if dout.shape != q.shape[:2] + (v.shape[-1],):
        raise ValueError(f"dout must have shape {q.shape[:2] + (v.shape[-1],)}, got {dout.shape}")
    cq, ck = _varlen_bounds(q, k, cu_seqlens_q, cu_seqlens_k)
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    q, k, v, dout = q.astype(dtype), k.astype(dtype), v.astype(dtype), dout.astype(dtype)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for b in range(cq.shape[0] - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 == q0 or k1 == k0:
            continue
        g = _dense_backward(dout[None, q0:q1], q[None, q0:q1], k[None, k0:k1], v[None, k0:k1],
                            scale, left, right, softcap, dtype)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = g[0][0], g[1][0], g[2][0]
    return dq, dk, dv


# ---------------------------------------------------------------------------
# "same computation in the input precision" (FA3's tolerance baseline)
# ---------------------------------------------------------------------------

def _storage_dtype(storage_dtype):
    dt = np.dtype(storage_dtype)
    allowed = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))
    if dt not in allowed:
        raise ValueError(f"storage_dtype must be float32, float16 or bfloat16, got {dt}")
    return dt


def _round_to(x, storage):
    """Round ``x`` to ``storage`` (nearest-even) and return it as float32."""
    # Cast straight from the source dtype: going through float32 first would
    # round twice and can land one storage ulp away from direct rounding.
    return np.asarray(x).astype(storage).astype(np.float32)


def attention_lowprec(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                      softcap=0.0, return_lse=False, storage_dtype=ml_dtypes.bfloat16):
    """Plain attention run in the storage precision, as FA3's tests use it.

    FA3 bounds a kernel's error by a multiple of the error of the textbook
    PyTorch attention run on bf16/fp16 tensors without upcasting (its
    ``attention_ref(..., upcast=False, reorder_ops=True)``). This models that
    run; every tensor op computes in float32 and rounds its result to
    ``storage_dtype`` (round-to-nearest-even), exactly at these points:

    1. q, k, v are rounded to ``storage_dtype`` (the stored inputs);
    2. ``k * softmax_scale`` is rounded (the scale is applied to K);
    3. ``S = q @ (k*scale)^T`` is accumulated in float32, then rounded;
    4. with softcap: ``S / softcap``, ``tanh(.)`` and ``(.) * softcap`` are each
       rounded;
    5. masked entries become -inf; ``P = softmax(S)`` is computed in float32
       and rounded; fully masked rows are set to 0;
    6. ``O = P @ v`` is accumulated in float32, then rounded.

    With ``storage_dtype=float32`` no rounding happens (plain float32 attention).
    Returns ``out`` as ``storage_dtype``; with ``return_lse``, also
    ``lse [B, H, Sq]`` float32, the logsumexp of the rounded scores of step 4
    (PyTorch's reference has no LSE; this is the natural counterpart).
    """
    storage = _storage_dtype(storage_dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    scale = _scale(softmax_scale, q.shape[-1])
    left, right = _window(causal, window_size)
    softcap = _softcap(softcap)
    f32 = np.float32
    qs = _round_to(q, storage)
    ks = _round_to(k, storage)
    vs = _round_to(v, storage)
    ks = _round_to(ks * f32(scale), storage)

    b, sq, h, d = qs.shape
    sk, hk, dv = ks.shape[1], ks.shape[2], vs.shape[3]
    g = h // hk
    qt = qs.transpose(0, 2, 1, 3).reshape(b, hk, g, sq, d)
    kt = ks.transpose(0, 2, 3, 1)[:, :, None]
    vt = vs.transpose(0, 2, 1, 3)[:, :, None]
    s = _round_to(qt @ kt, storage)
    if softcap > 0:
        s = _round_to(s / f32(softcap), storage)
        s = _round_to(np.tanh(s), storage)
        s = _round_to(s * f32(softcap), storage)
    vis = attention_mask(sq, sk, window_size=(left, right))
    s = np.where(vis, s, -np.inf).astype(f32)
    m = s.max(axis=-1, keepdims=True, initial=-np.inf)
    m = np.where(np.isfinite(m), m, 0).astype(f32)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True, dtype=f32)
    seen = l > 0
    l_safe = np.where(seen, l, 1).astype(f32)
    p = _round_to(e / l_safe, storage)  # fully masked rows: e == 0, so p == 0
    out = _round_to(p @ vt, storage)
    out = out.reshape(b, h, sq, dv).transpose(0, 2, 1, 3).astype(storage)
    if not return_lse:
        return out
    lse = np.where(seen, m + np.log(l_safe), -np.inf).astype(f32)
    return out, lse[..., 0].reshape(b, h, sq)
