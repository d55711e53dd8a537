"""NumPy model of the blocked online-softmax forward pass of FlashAttention-3.

It reproduces the kernel's arithmetic, not its scheduling: per query tile of
``block_m`` rows it walks the key tiles of ``block_n`` columns from right to
left (as FA3 does), keeping a float32 running row max ``m`` (of raw, unscaled
scores), row sum ``l`` and accumulator ``O``:

* ``S = Q K^T`` from storage-precision Q, K, accumulated in float32;
* softcap: ``S = tanh(S * scale / softcap)`` and the exp2 scale becomes
  ``softcap * log2(e)`` (otherwise ``scale * log2(e)``);
* key tiles with no visible entry are skipped; the mask is only applied to
  tiles that are partially visible;
* ``P = exp2(S * scale_log2 - m * scale_log2)`` (one rounding, like FFMA);
  ``l`` sums the float32 ``P`` while ``O += round(P) @ V`` uses ``P`` rounded
  to the storage dtype, as the kernel feeds bf16/fp16 P to the tensor core;
* finally ``O = O * (1 / l)`` rounded to storage, and
  ``LSE = m * scale_log2 * ln(2) + ln(l)`` (natural log, float32).

Rows that see no key keep ``l == 0`` and give O = 0, LSE = -inf.
"""

import math

import ml_dtypes
import numpy as np

from .reference import _check_qkv, _options, _round_to, _storage_dtype, attention_mask

__all__ = ["attention_blocked"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


def _block(x, name):
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")
    return int(x)


def attention_blocked(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                      softcap=0.0, block_m=128, block_n=128,
                      storage_dtype=ml_dtypes.bfloat16, return_lse=False):
    """Blocked FA3-style attention over dense ``[B, S, H, D]`` inputs.

    Inputs are first rounded to ``storage_dtype`` (bfloat16, float16 or
    float32). Returns ``out [B, Sq, H, Dv]`` in ``storage_dtype`` or
    ``(out, lse)`` with ``lse [B, H, Sq]`` float32.
    """
    storage = _storage_dtype(storage_dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    scale, left, right, softcap = _options(q, softmax_scale, causal, window_size, softcap)
    bm, bn = _block(block_m, "block_m"), _block(block_n, "block_n")

    f32 = np.float32
    b, sq, h, _ = q.shape
    sk, hk, dv = k.shape[1], k.shape[2], v.shape[3]
    g = h // hk
    qf = _round_to(q, storage).transpose(0, 2, 1, 3)  # [B, H, Sq, D]
    kf = np.repeat(_round_to(k, storage), g, axis=2).transpose(0, 2, 1, 3)
    vf = np.repeat(_round_to(v, storage), g, axis=2).transpose(0, 2, 1, 3)

    if softcap > 0:
        cap_scale = f32(scale / softcap)
        scale_log2 = f32(softcap * _LOG2E)
    else:
        scale_log2 = f32(scale * _LOG2E)
    lse_scale = f32(scale_log2 * f32(_LN2))

    vis_all = attention_mask(sq, sk, window_size=(left, right))
    shift = sk - sq
    out = np.zeros((b, h, sq, dv), dtype=f32)
    lse = np.full((b, h, sq), -np.inf, dtype=f32)

    for m0 in range(0, sq, bm):
        m1 = min(m0 + bm, sq)
        # Key range any row of this tile can see (FA3's n_block_min / max).
        k_lo = 0 if left < 0 else max(0, m0 + shift - left)
        k_hi = sk if right < 0 else min(sk, m1 - 1 + shift + right + 1)
        if k_hi <= k_lo:
            continue  # the whole tile is masked: O = 0, LSE = -inf
        m = np.full((b, h, m1 - m0), -np.inf, dtype=f32)
        l = np.zeros((b, h, m1 - m0), dtype=f32)
        acc = np.zeros((b, h, m1 - m0, dv), dtype=f32)
        for nb in range((k_hi - 1) // bn, k_lo // bn - 1, -1):
            n0, n1 = nb * bn, min(nb * bn + bn, sk)
            vis = vis_all[m0:m1, n0:n1]
            if not vis.any():
                continue
            s = qf[:, :, m0:m1] @ kf[:, :, n0:n1].swapaxes(-1, -2)
            if softcap > 0:
                s = np.tanh(s * cap_scale)
            if not vis.all():
                s = np.where(vis, s, f32(-np.inf))
            m_new = np.maximum(m, s.max(axis=-1))
            # A row with nothing visible yet keeps max -inf; use 0 as its
            # offset so that exp2(-inf - (-inf)) never produces NaN.
            m_off = np.where(m_new == -np.inf, f32(0), m_new)
            corr = np.exp2((m - m_off) * scale_log2)
            max_scaled = (m_off * scale_log2)[..., None]
            # float64 products of float32 are exact, so one rounding to
            # float32 models the kernel's fused multiply-add.
            x = (s.astype(np.float64) * np.float64(scale_log2) - max_scaled).astype(f32)
            p = np.exp2(x)
            l = l * corr + p.sum(axis=-1, dtype=f32)
            acc = acc * corr[..., None] + _round_to(p, storage) @ vf[:, :, n0:n1]
            m = m_new
        seen = l > 0
        l_safe = np.where(seen, l, f32(1))
        inv = np.where(seen, f32(1) / l_safe, f32(0))
        out[:, :, m0:m1] = acc * inv[..., None]
        m_fin = np.where(seen, m, f32(0))
        lse[:, :, m0:m1] = np.where(seen, m_fin * lse_scale + np.log(l_safe), -np.inf)

    out = out.transpose(0, 2, 1, 3).astype(storage)
    return (out, lse) if return_lse else out
