"""NumPy model of FlashAttention-3's FP8 (e4m3) forward pass: the quantizer and the kernel's arithmetic.

The quantizer (FA3 section 3.3):

* incoherent processing: Q and K are multiplied on the right by the same random orthogonal
  ``M = diag(signs) H / sqrt(d)`` (``H`` the Sylvester Hadamard matrix of the head dim ``d``,
  ``signs`` +-1 drawn from a seed). ``(Q M)(K M)^T = Q K^T`` in exact arithmetic, while an outlier
  coordinate of a row is spread over all ``d`` coordinates of the rotated row. ``x M`` is computed
  as ``fwht(x * signs) / sqrt(d)``, ``O(d log d)`` per row;
* block quantization: per (batch, head), each block of rows along the sequence axis (``block_m``
  query rows, ``block_n`` key/value rows) gets one float32 descale ``amax / 448`` (448 is e4m3's
  largest finite value) and its values are rounded to e4m3 as ``x / descale``.

The kernel (as `attention_fp8_model` computes it, per query tile, key tiles right to left):

* ``S = Q8 K8^T`` from the exact products of e4m3 values summed into float32;
* the descales are folded into the exp2 scale per (query row, key tile):
  ``c = (descale_q * descale_k) * softmax_scale * log2(e)``; the running row max ``m`` is kept
  in these scaled units, since ``c`` changes from one key tile to the next;
* ``P = exp2(S c - (m - p_offset_log2))``: the max offset puts ``P`` in ``(0, 2^p_offset_log2]``
  instead of ``(0, 1]`` (FA3 uses 8: ``P <= 256 <= 448``), so that e4m3's whole exponent range is
  used and small probabilities do not underflow; ``P`` is rounded to e4m3 for the P V GEMM, while
  the row sum ``l`` adds the float32 ``P`` (it cancels the offset at the end);
* ``O += P8 V8`` in float32; a per-block V descale is folded into the accumulator's rescale
  factor (O is kept in units of the current key tile's V descale), a per-head one is applied once
  at the end together with ``1 / l``;
* output bf16, ``LSE = m ln 2 + ln(l 2^-p_offset_log2)`` (natural log, float32).

Descale arrays follow FA3's layout: per (batch, head) ``[B, H]``, or per block ``[B, H, n_blocks]``
with ``n_blocks = ceil(S / block)``; a per-tensor descale is a ``[B, H]`` array of one value.
"""

import math

import ml_dtypes
import numpy as np

from .blocked import _block, attention_blocked
from .reference import _check_qkv, _float_array, _options, attention_mask, attention_reference

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "hadamard",
    "rotation_signs",
    "random_rotation",
    "fwht",
    "rotate",
    "to_e4m3",
    "e4m3_half_ulp",
    "quantize_blocks",
    "quantize_per_head",
    "quantize_per_tensor",
    "dequantize",
    "quantize_fp8_model",
    "attention_fp8_model",
    "outlier_inputs",
    "ERROR_TABLE_ROWS",
    "fp8_attention_error_table",
]

E4M3 = ml_dtypes.float8_e4m3fn
#: e4m3's largest finite value (1.75 * 2^8); a block's amax maps onto it.
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)
#: e4m3 keeps 3 explicit mantissa bits: within a binade [2^e, 2^(e+1)) the spacing is 2^(e-3).
E4M3_MANTISSA_BITS = 3
#: e4m3's smallest normal exponent; below 2^-6 the spacing stays 2^(-6-3) (subnormals).
E4M3_MIN_EXP = -6
#: FA3's ``Max_offset`` for FP8: P = exp2(... + 8) <= 2^8 = 256 fits e4m3 (448).
P_OFFSET_LOG2 = 8
#: The largest offset whose P (<= 2^offset) stays finite in e4m3.
MAX_P_OFFSET_LOG2 = int(math.floor(math.log2(E4M3_MAX)))

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# the rotation
# ---------------------------------------------------------------------------

def _power_of_two(d, name="d"):
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1 or d & (d - 1):
        raise ValueError(f"{name} must be a power of two >= 1, got {d!r}")
    return int(d)


def hadamard(d):
    """The ``d x d`` Sylvester Hadamard matrix (float64, entries +-1, ``H H^T = d I``, symmetric):
    ``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``, so ``H[i, j] = (-1)^popcount(i & j)``.
    ``d`` must be a power of two."""
    d = _power_of_two(d)
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


def rotation_signs(d, seed):
    """The diagonal of the rotation's random sign matrix: ``1 - 2 * bits`` with ``bits`` the ``d``
    draws of ``numpy.random.default_rng(seed).integers(0, 2)`` (float64). The device quantizer
    takes its signs from this function, so that both rotate by the same matrix."""
    d = _power_of_two(d)
    bits = np.random.default_rng(seed).integers(0, 2, size=d)
    return 1.0 - 2.0 * bits


def random_rotation(d, seed):
    """The orthogonal ``M = diag(rotation_signs(d, seed)) H / sqrt(d)`` (float64) that
    incoherent processing multiplies Q and K by on the right: ``(Q M)(K M)^T = Q K^T``."""
    return rotation_signs(d, seed)[:, None] * hadamard(d) / math.sqrt(d)


def fwht(x, axis=-1):
    """The fast Walsh-Hadamard transform along ``axis``: ``x @ hadamard(d)`` there, in
    ``log2(d)`` butterfly stages of ``d`` additions each. The stage of stride ``h`` combines the
    elements whose indices differ only in the bit of value ``h``; since ``H`` is the Kronecker
    product of ``log2(d)`` copies of ``[[1, 1], [1, -1]]``, one per index bit, the stages may run
    in any order.

    float32 input is transformed in float32 (each stage rounds, as a float32 device butterfly
    does); any other input in float64."""
    x = _float_array(x, "x")
    dtype = np.float32 if x.dtype == np.float32 else np.float64
    y = np.moveaxis(np.asarray(x, dtype=dtype), axis, -1)
    d = _power_of_two(y.shape[-1], "the transformed axis' length")
    lead = y.shape[:-1]
    h = 1
    while h < d:
        pairs = y.reshape(*lead, d // (2 * h), 2, h)
        lo, hi = pairs[..., 0, :], pairs[..., 1, :]
        y = np.stack((lo + hi, lo - hi), axis=-2).reshape(*lead, d)
        h *= 2
    return np.moveaxis(y, -1, axis)


def rotate(x, seed):
    """``x @ random_rotation(d, seed)`` along the last axis, as ``fwht(x * signs) / sqrt(d)``,
    computed in float64."""
    x = np.asarray(_float_array(x, "x"), dtype=np.float64)
    d = x.shape[-1]
    return fwht(x * rotation_signs(d, seed)) / math.sqrt(d)


# ---------------------------------------------------------------------------
# e4m3 rounding and block quantization
# ---------------------------------------------------------------------------

def to_e4m3(x):
    """Round float32 ``x`` to e4m3, to nearest even, saturating to +-448 as the device's
    ``cvt.rn.satfinite.e4m3x2.f32`` does (a plain cast would give NaN above 464)."""
    x = np.asarray(x, dtype=np.float32)
    return np.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def e4m3_half_ulp(y):
    """Half the e4m3 spacing at ``y`` (float64): ``2^(max(e, -6) - 4)`` with ``e = floor(log2|y|)``,
    the largest error of rounding ``y`` (within +-448) to nearest. In a normal binade
    ``[2^e, 2^(e+1))`` the 3 mantissa bits space values ``2^(e-3)`` apart, so the error is at most
    ``2^(e-4) <= 2^-4 |y|``; below ``2^-6`` the subnormals keep the spacing ``2^-9``, an absolute
    error of at most ``2^-10``."""
    a = np.abs(np.asarray(y, dtype=np.float64))
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.where(a > 0, np.maximum(e, E4M3_MIN_EXP), E4M3_MIN_EXP)
    return np.exp2(e - E4M3_MANTISSA_BITS - 1)


def _seq_axis(x, axis):
    axis = int(axis) % x.ndim if x.ndim else 0
    if x.ndim < 2 or axis == x.ndim - 1:
        raise ValueError(f"the sequence axis must be an axis other than the last (feature) axis "
                         f"of an array of rank >= 2; got axis {axis} of shape {x.shape}")
    return axis


def _quantize_rows(x, axis, descale_rows):
    """Round ``x / descale`` to e4m3, ``descale_rows [..., S]`` (float32) one per row of the
    sequence axis, indexed as ``x`` with ``axis`` moved before the last axis."""
    xs = np.moveaxis(x, axis, -2)
    y = xs / descale_rows[..., None]  # float32, correctly rounded as the device's div.rn.f32
    return np.moveaxis(to_e4m3(y), -2, axis)


def _descale(amax):
    """float32 ``amax / 448``; an all-zero block gets descale 1 (any positive descale gives its
    zeros, and a zero descale would turn the V rescale ratio into 0 / 0)."""
    amax = np.asarray(amax, dtype=np.float32)
    return np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)


def _finite32(x):
    x = np.asarray(_float_array(x, "x"), dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError("x must be finite (as float32) to be quantized")
    return x


def quantize_blocks(x, block, axis=1):
    """Per-block e4m3 quantization of ``x`` (e.g. ``[B, S, H, D]``, sequence axis 1).

    For every index of the axes other than ``axis`` and the last one (batch and head), the rows
    along ``axis`` are cut into ``ceil(S / block)`` blocks of ``block`` rows (the last may be
    short); a block's float32 descale is ``amax / 448`` over its rows and the last axis, and its
    values become ``e4m3(x / descale)`` (x read as float32). Returns ``(x8, descale)``: ``x8``
    has ``x``'s shape and dtype ``float8_e4m3fn``; ``descale`` is float32 of ``x``'s shape without
    ``axis`` and the last axis, followed by the block index (``[B, H, n_blocks]``)."""
    x = _finite32(x)
    axis = _seq_axis(x, axis)
    bs = _block(block, "block")
    xs = np.moveaxis(x, axis, -2)  # [..., S, D]
    n, d = xs.shape[-2:]
    nb = -(-n // bs)
    pad = [(0, 0)] * (xs.ndim - 2) + [(0, nb * bs - n), (0, 0)]
    blocks = np.pad(np.abs(xs), pad).reshape(*xs.shape[:-2], nb, bs * d)
    descale = _descale(blocks.max(axis=-1, initial=0))
    rows = np.repeat(descale, bs, axis=-1)[..., :n]
    return _quantize_rows(x, axis, rows), descale


def quantize_per_head(x, axis=1):
    """One descale per (batch, head): `quantize_blocks` with one block the whole sequence.
    Returns ``(x8, descale [B, H])``."""
    x = _finite32(x)
    axis = _seq_axis(x, axis)
    x8, descale = quantize_blocks(x, max(x.shape[axis], 1), axis)
    return x8, descale[..., 0]


def quantize_per_tensor(x, axis=1):
    """One descale for the whole tensor (the per-tensor FP8 baseline), returned in FA3's
    per-(batch, head) layout ``[B, H]`` filled with that one value. Returns ``(x8, descale)``."""
    x = _finite32(x)
    axis = _seq_axis(x, axis)
    descale = _descale(np.abs(x).max(initial=0))
    shape = tuple(s for i, s in enumerate(x.shape) if i not in (axis, x.ndim - 1))
    rows = np.full(shape + (x.shape[axis],), descale, dtype=np.float32)
    return _quantize_rows(x, axis, rows), np.full(shape, descale, dtype=np.float32)


def _descale_rows(descale, lead, n, block, name):
    """A descale array expanded to one float32 value per row: ``[*lead, n]``. ``descale`` is per
    (batch, head) ``lead``, or per block ``lead + (ceil(n / block),)``."""
    ds = np.asarray(descale, dtype=np.float32)
    nb = -(-n // block)
    if ds.shape == tuple(lead):
        ds = ds[..., None]
        rows = np.broadcast_to(ds, tuple(lead) + (n,))
    elif ds.shape == tuple(lead) + (nb,):
        rows = np.repeat(ds, block, axis=-1)[..., :n]
    else:
        raise ValueError(f"{name} must have shape {tuple(lead)} (per head) or "
                         f"{tuple(lead) + (nb,)} (per block of {block} rows), got {ds.shape}")
    if not (np.isfinite(rows).all() and (rows > 0).all()):
        raise ValueError(f"{name} must be finite and > 0")
    return np.ascontiguousarray(rows)


def dequantize(x8, descale, block=None, axis=1):
    """``x8 * descale`` in float64 (exact: a 4-bit significand times a float32), the descale per
    (batch, head) or, given ``block``, per block of ``block`` rows along ``axis``."""
    x = np.asarray(x8).astype(np.float64)
    axis = _seq_axis(x, axis)
    xs = np.moveaxis(x, axis, -2)
    n = xs.shape[-2]
    rows = _descale_rows(descale, xs.shape[:-2], n, n if block is None else _block(block, "block"),
                         "descale")
    return np.moveaxis(xs * rows[..., None].astype(np.float64), -2, axis)


# ---------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------

_GRANULARITIES = ("block", "head", "tensor")


def _quantize(x, granularity, block):
    if granularity == "block":
        return quantize_blocks(x, block)
    if granularity == "head":
        return quantize_per_head(x)
    return quantize_per_tensor(x)


def quantize_fp8_model(q, k, v, hadamard=True, seed=0, block_m=128, block_n=128,
                       granularity="block", v_granularity=None):
    """FA3's FP8 quantizer on dense ``[B, S, H, D]`` q, k, v (any float dtype).

    With ``hadamard``, q and k are first rotated by ``random_rotation(D, seed)`` (computed in
    float64, then read as float32 like any input). Q is quantized per block of ``block_m`` query
    rows and K per block of ``block_n`` key rows (``granularity="block"``), or per (batch, head)
    (``"head"``), or per tensor (``"tensor"``); V per ``v_granularity`` (default: the same as
    ``granularity``; ``"block"`` means blocks of ``block_n`` rows). V is never rotated.

    Returns ``(q8, k8, v8, q_descale, k_descale, v_descale)``: e4m3 arrays of the inputs' shapes
    and float32 descales ``[B, H]`` or ``[B, H, n_blocks]`` (see `quantize_blocks`)."""
    q, k, v = _check_qkv(q, k, v, 4)
    v_granularity = granularity if v_granularity is None else v_granularity
    for name, gr in (("granularity", granularity), ("v_granularity", v_granularity)):
        if gr not in _GRANULARITIES:
            raise ValueError(f"{name} must be one of {_GRANULARITIES}, got {gr!r}")
    bm, bn = _block(block_m, "block_m"), _block(block_n, "block_n")
    if hadamard:
        q, k = rotate(q, seed), rotate(k, seed)
    q8, dq = _quantize(q, granularity, bm)
    k8, dk = _quantize(k, granularity, bn)
    v8, dv = _quantize(v, v_granularity, bn)
    return q8, k8, v8, dq, dk, dv


# ---------------------------------------------------------------------------
# the kernel's arithmetic
# ---------------------------------------------------------------------------

def _e4m3_inputs(q8, k8, v8):
    for name, a in (("q8", q8), ("k8", k8), ("v8", v8)):
        if np.asarray(a).dtype != np.dtype(E4M3):
            raise ValueError(f"{name} must have dtype float8_e4m3fn, got {np.asarray(a).dtype}")
    return _check_qkv(q8, k8, v8, 4)


#: V's smallest descale as the kernel takes it (a zero one is clamped here): its reciprocal scales
#: the row sums, which stay finite for any sequence (at most 2^P_OFFSET_LOG2 per key times it).
MIN_V_DESCALE = np.float32(2.0**-64)


def _p_offset(p_offset_log2):
    ok = isinstance(p_offset_log2, (int, np.integer)) and not isinstance(p_offset_log2, bool)
    if not ok or not 0 <= p_offset_log2 <= MAX_P_OFFSET_LOG2:
        raise ValueError(f"p_offset_log2 must be an int in [0, {MAX_P_OFFSET_LOG2}] (P <= "
                         f"2^offset must stay within e4m3's {E4M3_MAX:g}), got {p_offset_log2!r}")
    return int(p_offset_log2)


def attention_fp8_model(q8, k8, v8, q_descale, k_descale, v_descale, softmax_scale=None,
                        causal=False, block_m=128, block_n=128, p_offset_log2=P_OFFSET_LOG2,
                        quantize_p=True, return_lse=False):
    """The FP8 forward as the kernel computes it, over dense e4m3 ``[B, S, H, D]`` inputs (GQA
    allowed: query head ``h`` reads key/value head ``h // (H // Hk)``), bottom-right causal mask.

    ``q_descale`` is ``[B, H]`` or ``[B, Hk]`` (FA3's layout, shared by a group of query heads),
    or per block of ``block_m`` query rows ``[B, H | Hk, ceil(Sq / block_m)]``; ``k_descale`` and
    ``v_descale`` are ``[B, Hk]`` or per block of ``block_n`` key rows ``[B, Hk, ceil(Sk /
    block_n)]``: the kernel folds a descale into a tile, so a block descale's rows are the
    kernel's tile. ``softmax_scale`` defaults to ``1 / sqrt(D)`` and applies to the dequantized
    scores. ``quantize_p=False`` keeps P in float32 for the P V product (not a kernel choice: it
    separates P's rounding from the inputs' in error studies).

    Arithmetic, per query tile and key tile (right to left), all float32 unless said:

    * ``S``: exact sums of exact e4m3 products (float64 holds them exactly for D < 2^17), rounded
      once;
    * ``c = (descale_q * descale_k) * (softmax_scale * log2 e)``, one per (row, key tile), and
      the key tile's V descale ``dv`` (per block, or its head's) as ``lv = log2 dv`` and
      ``iv = exp2(-lv)``;
    * ``m`` is the running max of ``S c + lv`` (``max(S) c + lv``, one rounding: ``c > 0``);
    * ``P = exp2(S c - (m - (offset + lv)))`` (one rounding, the FFMA) in ``(0, 2^offset]``: P
      carries V's descale (``P = 2^offset p dv / max(p dv)`` of the row's probabilities p);
      ``l = l corr + sum(P) iv`` (the probabilities' sum); ``O = O corr + fl(e4m3(P) V8)``
      with ``corr = exp2(m_prev - m)``;
    * ``out = O / l`` rounded to bf16; ``LSE = m ln 2 + ln(l 2^-offset)``.

    Returns ``out [B, Sq, H, Dv]`` (bfloat16) or ``(out, lse)`` with ``lse [B, H, Sq]`` float32;
    rows that see no key give 0 and ``-inf``.
    """
    q8, k8, v8 = _e4m3_inputs(q8, k8, v8)
    scale = _options(q8, softmax_scale, causal, (-1, -1), 0.0)[0]
    bm, bn = _block(block_m, "block_m"), _block(block_n, "block_n")
    offset = np.float32(_p_offset(p_offset_log2))

    f32, f64 = np.float32, np.float64
    b, sq, h, _ = q8.shape
    sk, hk, dv = k8.shape[1], k8.shape[2], v8.shape[3]
    g = h // hk
    qf = q8.astype(f64).transpose(0, 2, 1, 3)  # [B, H, Sq, D], exact
    kf = np.repeat(k8.astype(f64), g, axis=2).transpose(0, 2, 1, 3)
    vf = np.repeat(v8.astype(f64), g, axis=2).transpose(0, 2, 1, 3)

    q_lead = (b, hk) if np.ndim(q_descale) >= 2 and np.shape(q_descale)[1] == hk != h else (b, h)
    dq = _descale_rows(q_descale, q_lead, sq, bm, "q_descale")
    dq = np.repeat(dq, h // q_lead[1], axis=1)  # [B, H, Sq]
    # One value per key tile: the per-row expansion, read at each tile's first row.
    dk = np.repeat(_descale_rows(k_descale, (b, hk), sk, bn, "k_descale")[..., ::bn], g, axis=1)
    dvs = np.repeat(_descale_rows(v_descale, (b, hk), sk, bn, "v_descale")[..., ::bn], g, axis=1)
    log2_v = np.log2(np.maximum(dvs, MIN_V_DESCALE)).astype(f32)          # [B, H, key tiles]
    inv_v = np.exp2(-log2_v).astype(f32)

    scale_log2 = f32(scale * _LOG2E)
    vis_all = attention_mask(sq, sk, causal=causal)
    shift = sk - sq
    out = np.zeros((b, h, sq, dv), dtype=f32)
    lse = np.full((b, h, sq), -np.inf, dtype=f32)

    for m0 in range(0, sq, bm):
        m1 = min(m0 + bm, sq)
        k_hi = min(sk, m1 + shift) if causal else sk  # FA3's n_block_max
        if k_hi <= 0:
            continue  # the whole tile is masked: O = 0, LSE = -inf
        rows = m1 - m0
        m = np.full((b, h, rows), -np.inf, dtype=f32)
        l = np.zeros((b, h, rows), dtype=f32)
        acc = np.zeros((b, h, rows, dv), dtype=f32)
        for nb in range((k_hi - 1) // bn, -1, -1):
            n0, n1 = nb * bn, min(nb * bn + bn, sk)
            vis = vis_all[m0:m1, n0:n1]
            if not vis.any():
                continue
            s = (qf[:, :, m0:m1] @ kf[:, :, n0:n1].swapaxes(-1, -2)).astype(f32)
            if not vis.all():
                s = np.where(vis, s, f32(-np.inf))
            c = ((dq[:, :, m0:m1] * dk[:, :, nb, None]).astype(f32) * scale_log2).astype(f32)
            lv, iv = log2_v[:, :, nb, None], inv_v[:, :, nb, None]
            # float64 products of float32 are exact, so one rounding models an FFMA.
            m_new = np.maximum(m, (s.max(axis=-1).astype(f64) * c + lv).astype(f32))
            # A row with nothing visible yet keeps max -inf; FA3's Check_inf uses 0 as its
            # offset there so that exp2(-inf - (-inf)) never produces NaN.
            unseen = m_new == -np.inf
            base = np.where(unseen, f32(0), m_new)
            corr = np.exp2(m - base).astype(f32)
            max_scaled = (base - (offset + lv).astype(f32)).astype(f32)
            x = (s.astype(f64) * c[..., None].astype(f64) - max_scaled[..., None]).astype(f32)
            p = np.exp2(x)
            l = (l * corr + (p.sum(axis=-1, dtype=f32) * iv).astype(f32)).astype(f32)
            p_mma = to_e4m3(p).astype(f64) if quantize_p else p.astype(f64)
            pv = (p_mma @ vf[:, :, n0:n1]).astype(f32)
            acc = (acc * corr[..., None] + pv).astype(f32)
            m = m_new
        seen = l > 0
        l_safe = np.where(seen, l, f32(1))
        final = np.where(seen, f32(1) / l_safe, f32(0)).astype(f32)
        out[:, :, m0:m1] = acc * final[..., None]
        lse_rows = m * f32(_LN2) + np.log(l_safe * np.exp2(-offset))
        lse[:, :, m0:m1] = np.where(seen, lse_rows, -np.inf)

    out = out.transpose(0, 2, 1, 3).astype(ml_dtypes.bfloat16)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# FA3's Table 3: RMSE against float64 attention on inputs with outliers
# ---------------------------------------------------------------------------

#: FA3 section 4.3's inputs: N(0, 1) plus, with this probability, an independent N(0, 10^2).
OUTLIER_PROB = 0.001
OUTLIER_STD = 10.0


def outlier_inputs(batch, seqlen, heads, hdim, seed, outlier_prob=OUTLIER_PROB,
                   outlier_std=OUTLIER_STD):
    """q, k, v ``[batch, seqlen, heads, hdim]`` float64 with entries
    ``N(0, 1) + N(0, outlier_std^2) * Bernoulli(outlier_prob)``, drawn from ``seed``: the
    outlier features of LLM activations as FA3 simulates them."""
    rng = np.random.default_rng(seed)
    shape = (batch, seqlen, heads, hdim)

    def one():
        x = rng.standard_normal(shape)
        hit = rng.random(shape) < outlier_prob
        return x + np.where(hit, rng.standard_normal(shape) * outlier_std, 0.0)

    return one(), one(), one()


#: The rows of the error table: name -> how that row's output is computed. ``storage`` rows run
#: the blocked bf16/fp16 model (`attention_blocked`) on the inputs; ``fp8`` rows quantize with these
#: arguments of `quantize_fp8_model` and run `attention_fp8_model` (with ``model`` arguments, if
#: any). ``dequantized`` rows are diagnostics: float64 attention with only the named tensors
#: replaced by their dequantized FP8 versions, to tell which tensor's rounding the error comes from.
ERROR_TABLE_ROWS = {
    "fp16": dict(storage=np.float16),
    "bf16": dict(storage=ml_dtypes.bfloat16),
    "fp8 per-tensor": dict(fp8=dict(hadamard=False, granularity="tensor")),
    "fp8 per-tensor + rotation": dict(fp8=dict(hadamard=True, granularity="tensor")),
    "fp8 per-block": dict(fp8=dict(hadamard=False, granularity="block")),
    "fp8 per-block + rotation": dict(fp8=dict(hadamard=True, granularity="block")),
    "fp8 per-block + rotation, V per head": dict(fp8=dict(hadamard=True, granularity="block",
                                                          v_granularity="head")),
    "(fp8 per-block + rotation, P unrounded)": dict(fp8=dict(hadamard=True, granularity="block"),
                                                    model=dict(quantize_p=False)),
    "(fp8 per-block + rotation, no P offset)": dict(fp8=dict(hadamard=True, granularity="block"),
                                                    model=dict(p_offset_log2=0)),
    "(fp64, Q K per-block)": dict(fp8=dict(hadamard=False, granularity="block"), dequantized="qk"),
    "(fp64, Q K per-block + rotation)": dict(fp8=dict(hadamard=True, granularity="block"),
                                             dequantized="qk"),
    "(fp64, V per-block)": dict(fp8=dict(hadamard=False, granularity="block"), dequantized="v"),
}


def _error_table_output(name, inputs, quantized, hs, causal, block_m, block_n):
    """One row's output for the heads ``hs``: ``inputs`` the float64 q, k, v (rotated with the
    row's rotation when the row dequantizes Q and K), ``quantized`` the row's
    `quantize_fp8_model` result for all heads."""
    spec = ERROR_TABLE_ROWS[name]
    q, k, v = (x[:, :, hs] for x in inputs)
    if "storage" in spec:
        return attention_blocked(q, k, v, causal=causal, block_m=block_m, block_n=block_n,
                                 storage_dtype=spec["storage"])
    q8, k8, v8 = (x[:, :, hs] for x in quantized[:3])
    dq, dk, dv = (d[:, hs] for d in quantized[3:])
    if "dequantized" not in spec:
        return attention_fp8_model(q8, k8, v8, dq, dk, dv, causal=causal, block_m=block_m,
                                   block_n=block_n, **spec.get("model", {}))

    def deq(x8, d, block):
        return dequantize(x8, d, block=block if d.ndim == 3 else None)

    if "q" in spec["dequantized"]:
        q, k = deq(q8, dq, block_m), deq(k8, dk, block_n)
    if "v" in spec["dequantized"]:
        v = deq(v8, dv, block_n)
    return attention_reference(q, k, v, causal=causal)


def fp8_attention_error_table(batch=1, seqlen=1024, heads=4, hdim=128, seed=0, causal=False,
                              block_m=128, block_n=128, rows=None, head_chunk=4):
    """RMSE of each row of `ERROR_TABLE_ROWS` (or of the names in ``rows``) against float64
    attention of the unquantized `outlier_inputs`: ``sqrt(mean((out - ref)^2))`` over all output
    elements. The same seed draws the inputs and the rotation's signs. Each tensor is quantized
    whole (a per-tensor descale spans all heads); attention then runs ``head_chunk`` heads at a
    time, which bounds the float64 reference's memory.

    Returns ``[dict(name=..., rmse=..., max_abs=...)]`` in the order of the rows."""
    names = list(ERROR_TABLE_ROWS) if rows is None else list(rows)
    for name in names:
        if name not in ERROR_TABLE_ROWS:
            raise ValueError(f"unknown row {name!r}; rows are {list(ERROR_TABLE_ROWS)}")
    chunk = _block(head_chunk, "head_chunk")
    q, k, v = outlier_inputs(batch, seqlen, heads, hdim, seed)
    quantized, inputs = {}, {}
    for name in names:
        spec = ERROR_TABLE_ROWS[name]
        inputs[name] = (q, k, v)
        if "fp8" in spec:
            quantized[name] = quantize_fp8_model(q, k, v, seed=seed, block_m=block_m,
                                                 block_n=block_n, **spec["fp8"])
            if spec["fp8"]["hadamard"] and "q" in spec.get("dequantized", ""):
                inputs[name] = (rotate(q, seed), rotate(k, seed), v)
    sq_err = dict.fromkeys(names, 0.0)
    max_abs = dict.fromkeys(names, 0.0)
    for h0 in range(0, heads, chunk):
        hs = slice(h0, min(h0 + chunk, heads))
        ref = attention_reference(q[:, :, hs], k[:, :, hs], v[:, :, hs], causal=causal)
        for name in names:
            out = _error_table_output(name, inputs[name], quantized.get(name), hs, causal,
                                      block_m, block_n)
            err = out.astype(np.float64) - ref
            sq_err[name] += float(np.sum(err * err))
            max_abs[name] = max(max_abs[name], float(np.abs(err).max(initial=0)))
    count = q.shape[0] * q.shape[1] * q.shape[2] * v.shape[3]
    return [dict(name=n, rmse=math.sqrt(sq_err[n] / count), max_abs=max_abs[n]) for n in names]
