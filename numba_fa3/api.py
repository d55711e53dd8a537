"""Public API: `flash_attn(q, k, v, ...)`.

q `[B, Sq, H, D]`, k/v `[B, Sk, Hk, D]`, Hk dividing H (GQA/MQA); bf16 or fp16.  GPU inputs
(torch CUDA tensors, Numba/CuPy device arrays) are used in place, strided ones too as long as the
last dimension is contiguous; the result is a new array of the same library, or `out`.  NumPy
inputs are copied to the GPU and the result comes back as NumPy.  Everything unsupported raises
before launch.
"""
import math

import numpy as np

from primitives import tensors
from primitives.tma_desc import descriptor_tables
from . import mask
from .forward import forward_kernel
from .tiles import SUPPORTED_HEAD_DIMS


def _validate(iq, ik, iv):
    for info, name in ((iq, "q"), (ik, "k"), (iv, "v")):
        if len(info.shape) != 4:
            raise ValueError(f"{name} must be [batch, seqlen, heads, head_dim], got shape {info.shape}")
        if info.strides[3] != 1:
            raise ValueError(f"{name}: the head dimension must be contiguous, got strides {info.strides}")
    if not (iq.dtype == ik.dtype == iv.dtype) or iq.dtype not in ("bf16", "f16"):
        raise TypeError(f"q, k, v must all be bf16 or all fp16, got {iq.dtype}, {ik.dtype}, {iv.dtype}")
    if len({iq.kind == "numpy", ik.kind == "numpy", iv.kind == "numpy"}) != 1:
        raise TypeError("q, k, v must all be NumPy arrays or all be GPU arrays")
    b, sq, h, d = iq.shape
    bk, sk, hk, dk = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    if bk != b or dk != d:
        raise ValueError(f"q {iq.shape} and k {ik.shape} differ in batch or head dim")
    if h % hk:
        raise ValueError(f"key heads ({hk}) must divide query heads ({h})")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if min(b, sq, sk) < 1:
        raise ValueError(f"empty attention: batch {b}, seqlen_q {sq}, seqlen_k {sk}")
    return b, sq, sk, h, hk, d


def flash_attn(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               return_lse=False, out=None, stream=None):
    """Exact attention softmax(q k^T * scale) v, computed by the FlashAttention-3 forward kernel.

    causal: bottom-right aligned when Sq != Sk (as FA2/FA3).  window_size=(left, right), -1 for
    unbounded.  Returns out `[B, Sq, H, D]`, and with return_lse the log-sum-exp `[B, H, Sq]`
    (float32, natural log; -inf for rows that see no key, whose output is 0).
    """
    return _forward(q, k, v, softmax_scale, causal, window_size, softcap, return_lse, out, stream,
                    forward_kernel)


def _forward(q, k, v, softmax_scale, causal, window_size, softcap, return_lse, out, stream, make_kernel):
    """flash_attn with the kernel chosen by make_kernel(dtype, head_dim, mask_kind): the benchmark's
    ablation passes kernels with parts of the schedule switched off."""
    if softcap:
        raise NotImplementedError("softcap is not implemented in the forward kernel yet")
    iq, ik, iv = (tensors.inspect(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    b, sq, sk, h, hk, d = _validate(iq, ik, iv)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    left, right = (int(window_size[0]), int(window_size[1]))
    if causal:
        right = 0
    kind = mask.mask_kind(causal, (left, right))
    host = iq.kind == "numpy"
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        iq, ik, iv = tensors.upload(iq), tensors.upload(ik), tensors.upload(iv)
    for info, name in ((iq, "q"), (ik, "k"), (iv, "v")):
        if info.ptr % 16 or any((s * info.itemsize) % 16 for s in info.strides[:3]):
            raise ValueError(f"{name}: TMA needs 16-byte aligned base and strides, got base "
                             f"{info.ptr:#x}, strides {info.strides} elements")
    if out is None:
        o = tensors.empty_like_kind(iq, (b, sq, h, d), iq.dtype)
        io = tensors.TensorInfo(tensors.device_ptr(o), (b, sq, h, d), (sq * h * d, h * d, d, 1), iq.dtype, iq.kind, o)
    else:
        io = tensors.inspect(out, "out")
        if io.shape != (b, sq, h, d) or io.dtype != iq.dtype or io.strides[3] != 1:
            raise ValueError(f"out must be {(b, sq, h, d)} {iq.dtype} with a contiguous last dim")
        o = out
    lse = tensors.empty_like_kind(iq, (b, h, sq), "f32")
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream()
    kern = make_kernel(iq.dtype, d, kind)
    table = descriptor_tables.get(kern.tensor_maps(iq, ik, iv, io))
    kern.launch(table, tensors.device_ptr(lse), b, h, hk, sq, sk, (left, right), scale, stream)
    if host:
        o = tensors.to_host(o, io.dtype)
        lse = lse.copy_to_host()
    return (o, lse) if return_lse else o
