"""FP8 attention: `flash_attn_fp8(q8, k8, v8, q_descale, k_descale, v_descale, ...)` for e4m3 inputs
with their descales, and `flash_attn_fp8_from(q, k, v, ...)`, which quantizes 16-bit inputs first
(`quantize.quantize_fp8`: the rotation and the block scales) and is what `flash_attn(...,
precision="fp8")` calls.

Descales are float32, each one of: None (1), a positive finite number (per tensor), or an array
- q_descale ``[B, H]`` or ``[B, Hk]`` (FA3's layout, one per key head), or per block of the
  kernel's `block_m` query rows ``[B, H | Hk, ceil(Sq / block_m)]`` (`fp8_blocks`);
- k_descale ``[B, Hk]`` or per block of `block_n` keys ``[B, Hk, ceil(Sk / block_n)]``;
- v_descale ``[B, Hk]`` or per block of `block_n` keys ``[B, Hk, ceil(Sk / block_n)]`` (the kernel
  folds it into P's exponent, so per-block V costs nothing over per-head: `forward_fp8`).
"""
import functools
import math

import numpy as np

from numba_fa3.primitives import tensors
from numba_fa3.primitives.tma_desc import descriptor_tables
from . import api, fp8_layout
from .forward_fp8 import forward_fp8_kernel
from .tiles import FP8_HEAD_DIMS, fp8_tiles_for


def fp8_blocks(head_dim, causal=False, window_size=(-1, -1)):
    """(block_m, block_n): the query and key rows one Q and one K block descale covers, the
    kernel's tiles (quantize_fp8's block_m and block_n)."""
    t = fp8_tiles_for(head_dim, bool(causal) or tuple(window_size) != (-1, -1))
    return t.block_m, t.block_n


#: V's descale granularity of `precision="fp8"`: per key block, so the quantizer reads V once
#: (per head it reads V twice: its amax needs the whole sequence first), and the kernel takes
#: either at the same cost (`forward_fp8`); the NumPy model's error is the same or lower.
V_GRANULARITY = "block"
#: The largest element offset into a descale array the kernel takes (int32).
MAX_OFFSET = 2**31 - 1


@functools.lru_cache(maxsize=64)
def _scalar_on_device(value, device_id):
    """A one-element float32 device array holding `value` (per-tensor descales, read through
    zero strides), one per value and device."""
    return tensors.to_device(np.array([value], dtype=np.float32))


def _descale(x, name, shapes, stream):
    """A descale argument checked, not yet on the GPU (`_descale_on_device` puts it there):
    (a positive finite float, or the array's TensorInfo; its shape, None for a number; the
    widest shape's rank).  `shapes` lists the accepted shapes, widest last; NumPy arrays are
    checked to be positive and finite everywhere."""
    rank = len(shapes[-1])
    if x is None or isinstance(x, (int, float, np.floating, np.integer)):
        value = 1.0 if x is None else float(x)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be positive and finite, got {x}")
        return value, None, rank
    info = tensors.inspect(x, name, stream)
    if info.dtype != "f32":
        raise TypeError(f"{name} must be float32, got {info.dtype}")
    if info.shape not in shapes:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, shapes))}, got {info.shape}")
    if info.kind == "numpy":
        values = np.asarray(info.obj)
        if not (np.all(values > 0) and np.all(np.isfinite(values))):
            raise ValueError(f"{name} must be positive and finite everywhere")
    # (the kernel's offsets into a descale array are int32)
    if sum((n - 1) * abs(st) for n, st in zip(info.shape, info.strides)) > MAX_OFFSET:
        raise ValueError(f"{name}: an element lies past the kernel's int32 offsets (strides {info.strides})")
    return info, info.shape, rank


def _descale_on_device(checked):
    """(address, strides in elements for each axis of the widest shape, the array to keep alive)
    of a `_descale` result: numbers as one-element arrays read through zero strides, NumPy
    arrays copied."""
    from numba import cuda
    x, shape, rank = checked
    if shape is None:
        arr = _scalar_on_device(x, cuda.get_current_device().id)
        return tensors.device_ptr(arr), (0,) * rank, arr
    info = tensors.upload(x) if x.kind == "numpy" else x
    return info.ptr, tuple(info.strides) + (0,) * (rank - len(shape)), info.obj


def _check_descales(q_descale, k_descale, v_descale, b, h, hk, mq, nk, stream):
    """The three descale arguments checked (`_descale`) against batch b, heads h and key heads
    hk, mq query and nk key blocks."""
    return (_descale(q_descale, "q_descale", [(b, h), (b, hk), (b, h, mq), (b, hk, mq)], stream),
            _descale(k_descale, "k_descale", [(b, hk), (b, hk, nk)], stream),
            _descale(v_descale, "v_descale", [(b, hk), (b, hk, nk)], stream))


def _descales_on_device(checked, h, hk):
    """(the launch's descales: (q address, strides, query heads per descale row), (k address,
    strides), (v address, strides); the arrays to keep alive) of `_check_descales`' result."""
    (qd, qd_st, qd_obj), (kd, kd_st, kd_obj), (vd, vd_st, vd_obj) = (_descale_on_device(c) for c in checked)
    q_shape = checked[0][1]
    # (a descale row per key head serves that head's group of query heads)
    qd_ratio = h // hk if q_shape is not None and q_shape[1] == hk else 1
    return ((qd, *qd_st, qd_ratio), (kd, *kd_st), (vd, *vd_st)), (qd_obj, kd_obj, vd_obj)


def flash_attn_fp8(q8, k8, v8, q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                   window_size=(-1, -1), return_lse=False, out=None, out_dtype="bf16", stream=None, softcap=0.0):
    """Attention over e4m3 inputs: softmax(dequant(q8) dequant(k8)^T * scale) dequant(v8), by the
    FP8 forward kernel (`forward_fp8`).

    q8 ``[B, Sq, H, D]``, k8 and v8 ``[B, Sk, Hk, D]`` (Hk dividing H), D in
    `tiles.FP8_HEAD_DIMS`; e4m3 codes as torch.float8_e4m3fn CUDA tensors, uint8 device arrays
    (Numba, CuPy: the bytes are e4m3 codes) or NumPy ml_dtypes.float8_e4m3fn arrays (copied to
    the GPU, results copied back).  Descales: see the module.  causal, window_size and softcap
    (on the dequantized scores: softcap * tanh(q k^T scale / softcap)) as `flash_attn`.  V is first rearranged into the kernel's V^T layout (`fp8_layout.transpose_v`:
    one pass over V, on the same stream).  Returns O ``[B, Sq, H, D]`` of `out_dtype` (bf16 or
    f16; `out` to write into), and with return_lse the LSE ``[B, H, Sq]`` (float32, natural
    log), as `flash_attn`."""
    iq, ik, iv = (tensors.inspect(x, n, stream) for x, n in ((q8, "q8"), (k8, "k8"), (v8, "v8")))
    api._check_layout([(iq, "q8"), (ik, "k8"), (iv, "v8")], 4, "[batch, seqlen, heads, head_dim]",
                      (("e4m3",), "e4m3 codes (float8_e4m3fn or uint8)"))
    if out_dtype not in ("bf16", "f16"):
        raise ValueError(f"out_dtype must be 'bf16' or 'f16', got {out_dtype!r}")
    b, sq, h, d = iq.shape
    bk, sk, hk, dk = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k8 and v8 must have the same shape, got {ik.shape} and {iv.shape}")
    if bk != b:
        raise ValueError(f"q8 {iq.shape} and k8 {ik.shape} differ in batch")
    api._check_heads(h, hk, d, dk, iv.shape[3], FP8_HEAD_DIMS)
    if min(b, sq, sk, h) < 1:
        raise ValueError(f"empty attention: batch {b}, seqlen_q {sq}, seqlen_k {sk}, heads {h}")
    scale, cap, window, kind = api._options(d, softmax_scale, causal, window_size, softcap)
    kern = forward_fp8_kernel(d, kind, out_dtype, cap > 0)
    mq, nk = -(-sq // kern.block_m), -(-sk // kern.block_n)
    host = iq.kind == "numpy"
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    checked = _check_descales(q_descale, k_descale, v_descale, b, h, hk, mq, nk, stream)
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        iq, ik, iv = tensors.upload(iq), tensors.upload(ik), tensors.upload(iv)
    api._check_tma([(iq, "q8"), (ik, "k8"), (iv, "v8")])
    descales, descale_arrays = _descales_on_device(checked, h, hk)
    like = iq
    o_like = tensors.TensorInfo(iq.ptr, iq.shape, iq.strides, out_dtype, iq.kind, iq.obj, iq.owner)
    o, io = api._output(out, o_like, (b, sq, h, d), stream)
    lse = tensors.empty_like_kind(like, (b, h, sq), "f32")
    vt = fp8_layout.transpose_v(iv.obj, stream=stream)
    ivt = tensors.inspect(vt, "vt", stream)
    table = descriptor_tables.get(kern.tensor_maps(iq, ik, ivt, io))
    kern.launch(table, tensors.device_ptr(lse), io, b, h, hk, sq, sk, window, scale, cap, stream, descales)
    if like.kind != "torch":
        api._keep_until_done((vt, *descale_arrays, iq.obj, ik.obj, iv.obj), stream)
    return api._results(o, lse, like, io, host, out, stream, return_lse)


def flash_attn_fp8_varlen(q8, k8, v8, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q_descale=None,
                          k_descale=None, v_descale=None, softmax_scale=None, causal=False, window_size=(-1, -1),
                          softcap=0.0, return_lse=False, out=None, out_dtype="bf16", stream=None):
    """`flash_attn_fp8` over sequences packed along one token axis, as `flash_attn_varlen`:
    q8 ``[Tq, H, D]``, k8 and v8 ``[Tk, Hk, D]`` (e4m3 codes as `flash_attn_fp8` takes them),
    cu_seqlens_q / cu_seqlens_k (int32, batch + 1 entries from 0; GPU arrays with GPU inputs, not
    read on the host, NumPy with NumPy inputs) and max_seqlen_q / max_seqlen_k bounding every
    sequence.  Descales as `flash_attn_fp8`'s with B the number of sequences: a number, per
    (sequence, head) ``[B, H]`` / ``[B, Hk]``, or per block of a sequence's kernel tiles ``[B, H |
    Hk, ceil(max_seqlen_q / block_m)]`` and, for K and V, ``[B, Hk, ceil(max_seqlen_k /
    block_n)]`` (a sequence's blocks start at its first token; a max_seqlen past the packed
    length counts as that length).  V is rearranged first by `fp8_layout.transpose_v_varlen`.  Returns O ``[Tq, H, D]`` of `out_dtype`, and with return_lse
    the LSE ``[H, Tq]``."""
    iq, ik, iv = (tensors.inspect(x, n, stream) for x, n in ((q8, "q8"), (k8, "k8"), (v8, "v8")))
    api._check_layout([(iq, "q8"), (ik, "k8"), (iv, "v8")], 3, "[total_tokens, heads, head_dim]",
                      (("e4m3",), "e4m3 codes (float8_e4m3fn or uint8)"))
    if out_dtype not in ("bf16", "f16"):
        raise ValueError(f"out_dtype must be 'bf16' or 'f16', got {out_dtype!r}")
    tq, h, d = iq.shape
    tk, hk, dk = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k8 and v8 must have the same shape, got {ik.shape} and {iv.shape}")
    api._check_heads(h, hk, d, dk, iv.shape[2], FP8_HEAD_DIMS)
    if h < 1:
        raise ValueError("no heads")
    scale, cap, window, kind = api._options(d, softmax_scale, causal, window_size, softcap)
    host = iq.kind == "numpy"
    cuq, cuk, bq, max_q, max_k = api._sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tq, tk,
                                                host, stream)
    kern = forward_fp8_kernel(d, kind, out_dtype, cap > 0, True)
    mq, nk = max(1, -(-max_q // kern.block_m)), max(1, -(-max_k // kern.block_n))
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    checked = _check_descales(q_descale, k_descale, v_descale, bq, h, hk, mq, nk, stream)
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        iq, ik, iv = tensors.upload(iq), tensors.upload(ik), tensors.upload(iv)
    (cuq, cuq_ptr), (cuk, cuk_ptr) = api._cu_on_device(cuq, host), api._cu_on_device(cuk, host)
    api._check_tma([(iq, "q8"), (ik, "k8"), (iv, "v8")])
    descales, descale_arrays = _descales_on_device(checked, h, hk)
    o_like = tensors.TensorInfo(iq.ptr, iq.shape, iq.strides, out_dtype, iq.kind, iq.obj, iq.owner)
    o, io = api._output(out, o_like, (tq, h, d), stream)
    lse = tensors.empty_like_kind(iq, (h, tq), "f32")
    keep = (*descale_arrays, iq.obj, ik.obj, iv.obj, cuq, cuk)
    if tq and not tk:
        tensors.fill(o, 0)
        tensors.fill(lse, -np.inf)
    elif tq and max_q:
        vt = fp8_layout.transpose_v_varlen(iv.obj, cuk, max_k, stream=stream)
        ivt = tensors.inspect(vt, "vt", stream)
        table = descriptor_tables.get(kern.tensor_maps(*(api._as_batch_of_one(x) for x in (iq, ik, ivt, io))))
        kern.launch(table, tensors.device_ptr(lse), io, bq, h, hk, max_q, max_k, window, scale, cap, stream,
                    descales, cu_seqlens=(cuq_ptr, cuk_ptr), lse_strides=(0, tq), total=(tq, tk))
        keep += (vt,)
    if iq.kind != "torch":
        api._keep_until_done(keep, stream)
    return api._results(o, lse, iq, io, host, out, stream, return_lse)


def flash_attn_fp8_from(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), return_lse=False,
                        out=None, stream=None, hadamard=True, seed=0, softcap=0.0):
    """`flash_attn` in FP8: q, k, v (bf16 or fp16, `[B, S, H, D]`, GPU arrays) quantized by
    `quantize.quantize_fp8` (rotated by the same random Hadamard matrix when `hadamard`, Q, K and
    V per block of the kernel's tiles: `V_GRANULARITY`), then `flash_attn_fp8`; O of q's dtype."""
    from .quantize import quantize_fp8
    iq = tensors.inspect(q, "q", stream)
    if iq.kind == "numpy":
        raise TypeError("precision='fp8' takes GPU arrays (the quantizer runs on the GPU)")
    d = iq.shape[-1]
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"the FP8 forward supports head dims {FP8_HEAD_DIMS}, got {d}")
    block_m, block_n = fp8_blocks(d, causal, window_size)
    q8, k8, v8, qd, kd, vd = quantize_fp8(q, k, v, hadamard=hadamard, seed=seed, block_m=block_m, block_n=block_n,
                                          v_granularity=V_GRANULARITY, stream=stream)
    return flash_attn_fp8(q8, k8, v8, qd, kd, vd, softmax_scale, causal, window_size, return_lse, out,
                          iq.dtype, stream, softcap)


__all__ = ["flash_attn_fp8", "flash_attn_fp8_varlen", "flash_attn_fp8_from", "flash_attn_fp8_varlen_from",
           "fp8_blocks"]


def flash_attn_fp8_varlen_from(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                               causal=False, window_size=(-1, -1), return_lse=False, out=None, stream=None,
                               hadamard=True, seed=0, softcap=0.0):
    """`flash_attn_varlen` in FP8: packed q, k, v (bf16 or fp16 GPU arrays) quantized per sequence
    by `quantize.quantize_fp8_varlen` (blocks of the kernel's tiles from each sequence's first
    row, V's too: `V_GRANULARITY`), then `flash_attn_fp8_varlen`; O of q's dtype."""
    from .quantize import quantize_fp8_varlen
    iq = tensors.inspect(q, "q", stream)
    if iq.kind == "numpy":
        raise TypeError("precision='fp8' takes GPU arrays (the quantizer runs on the GPU)")
    d = iq.shape[-1]
    if d not in FP8_HEAD_DIMS:
        raise ValueError(f"the FP8 forward supports head dims {FP8_HEAD_DIMS}, got {d}")
    block_m, block_n = fp8_blocks(d, causal, window_size)
    q8, k8, v8, qd, kd, vd = quantize_fp8_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                 hadamard=hadamard, seed=seed, block_m=block_m, block_n=block_n,
                                                 v_granularity=V_GRANULARITY, stream=stream)
    return flash_attn_fp8_varlen(q8, k8, v8, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, qd, kd, vd,
                                 softmax_scale, causal, window_size, softcap, return_lse, out, iq.dtype, stream)
