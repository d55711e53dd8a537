"""NumPy model of FlashAttention-3's blocked backward pass (the algorithm the backward kernel
runs, FA3 section 3 and its `hopper/` backward), to study its numerics on the CPU.

* Preprocess: ``D = rowsum(dO * O)`` in float32 from the storage-precision dO and O, and the
  forward's LSE in log2 units (``lse * log2(e)``).
* One work tile per key block of ``block_n`` keys (per batch and key/value head, every query head
  of its group): K and V stay; the query blocks that see the tile (`query_blocks`, the reverse of
  the forward's key-block range) are walked from the first to the last.  Per query block:
  ``S = Q K^T`` in float32; ``P = exp2(S * scale_log2 - LSE_log2)`` (masked entries 0);
  ``dV += round(P)^T dO``; ``dP = dO V^T``; ``dS = P * (dP - D)`` (times ``1 - tanh^2`` under a
  soft-cap); ``dK += round(dS)^T Q``; ``dQ += round(dS) K`` added in float32 (the kernel's
  atomic adds into a float32 dQ, in this order: key block by key block).
* Postprocess: ``dQ`` and ``dK`` times the softmax scale, rounded to storage with dV.

P and dS feed the tensor cores in the storage dtype, as the kernel's wgmmas take them.
"""
import math

import ml_dtypes
import numpy as np

from .blocked import _block
from .reference import _check_qkv, _options, _round_to, _storage_dtype, attention_mask

__all__ = ["attention_backward_blocked", "query_blocks"]

_LOG2E = math.log2(math.e)


def query_blocks(n_block, block_m, block_n, seqlen_q, seqlen_k, left, right):
    """[m_min, m_max) of the query blocks that see any key of key block n_block: the same rule as
    the kernels' `mask.query_block_range` (row i sees key j iff j - shift - right <= i <=
    j - shift + left, shift = seqlen_k - seqlen_q, a negative bound unbounded)."""
    shift = seqlen_k - seqlen_q
    k0 = n_block * block_n
    k1 = min(seqlen_k, k0 + block_n) - 1
    lo = 0 if right < 0 else max(0, k0 - shift - right)
    hi = seqlen_q if left < 0 else min(seqlen_q, k1 - shift + left + 1)
    if k0 >= seqlen_k or hi <= lo:
        return 0, 0
    return lo // block_m, -(-hi // block_m)


def attention_backward_blocked(dout, q, k, v, out, lse, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, block_m=64, block_n=128,
                               storage_dtype=ml_dtypes.bfloat16):
    """(dq, dk, dv) in ``storage_dtype`` for dense ``[B, S, H, D]`` inputs, from the forward's
    ``out`` and natural-log ``lse [B, H, Sq]`` (as `attention_blocked` or the kernel returns them)."""
    storage = _storage_dtype(storage_dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    bm, bn = _block(block_m, "block_m"), _block(block_n, "block_n")
    f32 = np.float32
    b, sq, h, d = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    qf = _round_to(q, storage).transpose(0, 2, 1, 3)      # [B, H, Sq, D]
    kf = _round_to(k, storage).transpose(0, 2, 1, 3)      # [B, Hk, Sk, D]
    vf = _round_to(v, storage).transpose(0, 2, 1, 3)
    dof = _round_to(dout, storage).transpose(0, 2, 1, 3)  # [B, H, Sq, Dv]
    of = _round_to(out, storage).transpose(0, 2, 1, 3)
    delta = (dof * of).sum(axis=-1, dtype=f32)            # [B, H, Sq]
    lse2 = np.where(np.isneginf(lse), f32(np.inf), lse.astype(f32) * f32(_LOG2E)).astype(f32)
    if softcap > 0:
        cap_scale, scale_log2, grad_scale = f32(scale / softcap), f32(softcap * _LOG2E), f32(scale)
    else:
        cap_scale, scale_log2, grad_scale = None, f32(scale * _LOG2E), f32(scale)
    vis_all = attention_mask(sq, sk, window_size=(left, right))
    dq = np.zeros((b, h, sq, d), dtype=f32)
    dk = np.zeros((b, hk, sk, d), dtype=f32)
    dvv = np.zeros((b, hk, sk, dv), dtype=f32)
    for nb in range(-(-sk // bn)):
        n0, n1 = nb * bn, min(nb * bn + bn, sk)
        m_min, m_max = query_blocks(nb, bm, bn, sq, sk, left, right)
        kq = np.repeat(kf[:, :, n0:n1], g, axis=1)  # this tile's K and V for every query head
        vq = np.repeat(vf[:, :, n0:n1], g, axis=1)
        dk_t = np.zeros((b, h, n1 - n0, d), dtype=f32)
        dv_t = np.zeros((b, h, n1 - n0, dv), dtype=f32)
        for mb in range(m_min, m_max):
            m0, m1 = mb * bm, min(mb * bm + bm, sq)
            vis = vis_all[m0:m1, n0:n1]
            s = qf[:, :, m0:m1] @ kq.swapaxes(-1, -2)
            if softcap > 0:
                s = np.tanh(s * cap_scale)
            # one rounding, as the kernel's FFMA: exact float64 products of float32 values
            x = (s.astype(np.float64) * np.float64(scale_log2) - lse2[:, :, m0:m1, None]).astype(f32)
            p = np.where(vis, np.exp2(x), f32(0))
            dv_t += _round_to(p, storage).swapaxes(-1, -2) @ dof[:, :, m0:m1]
            dp = dof[:, :, m0:m1] @ vq.swapaxes(-1, -2)
            ds = p * (dp - delta[:, :, m0:m1, None])
            if softcap > 0:
                ds = ds * (f32(1) - s * s)
            ds_r = _round_to(ds, storage)
            dk_t += ds_r.swapaxes(-1, -2) @ qf[:, :, m0:m1]
            dq[:, :, m0:m1] += ds_r @ kq
        # a key/value head's gradient sums its query heads'
        dk[:, :, n0:n1] = dk_t.reshape(b, hk, g, n1 - n0, d).sum(axis=2, dtype=f32)
        dvv[:, :, n0:n1] = dv_t.reshape(b, hk, g, n1 - n0, dv).sum(axis=2, dtype=f32)
    dq = (dq * grad_scale).transpose(0, 2, 1, 3).astype(storage)
    dk = (dk * grad_scale).transpose(0, 2, 1, 3).astype(storage)
    return dq, dk, dvv.transpose(0, 2, 1, 3).astype(storage)
