"""Public API: `flash_attn(q, k, v, ...)` and `flash_attn_varlen(q, k, v, cu_seqlens_q, ...)`.

q `[B, Sq, H, D]`, k/v `[B, Sk, Hk, D]` (varlen: packed `[T, H, D]` / `[T, Hk, D]`), Hk dividing H
(GQA/MQA); bf16 or fp16.  GPU inputs (torch CUDA tensors, CuPy and Numba device arrays, JAX and
other DLPack arrays) are used in place, strided ones too as long as the last dimension is
contiguous; the result is a new array of the same library, or `out`.  NumPy inputs are copied to
the GPU and the result comes back as NumPy.  Everything unsupported raises before launch.
"""
import math

import numpy as np

from numba_fa3.primitives import launch, tensors
from numba_fa3.primitives.tma_desc import descriptor_tables
from . import backward_prep, mask, tiles
from .backward import backward_kernel
from .forward import forward_kernel
from .tiles import BACKWARD_HEAD_DIMS, SUPPORTED_HEAD_DIMS


#: The 16-bit API's input types, and how its errors name them.
_DTYPES_16 = (("bf16", "f16"), "bf16 or all fp16")


def _check_layout(infos, rank, what, dtypes=_DTYPES_16):
    """Rank, a contiguous head dimension, one dtype of `dtypes` ((names, as the error says
    them)), all NumPy or all GPU."""
    for info, name in infos:
        if len(info.shape) != rank:
            raise ValueError(f"{name} must be {what}, got shape {info.shape}")
        if info.strides[-1] != 1 and 0 not in info.shape:  # an empty tensor is never read
            raise ValueError(f"{name}: the head dimension must be contiguous, got strides {info.strides}")
    names = ", ".join(n for _, n in infos)
    allowed, said = dtypes
    got = [i.dtype for i, _ in infos]
    if len(set(got)) != 1 or got[0] not in allowed:
        raise TypeError(f"{names} must all be {said}, got {', '.join(got)}")
    if len({i.kind == "numpy" for i, _ in infos}) != 1:
        raise TypeError(f"{names} must all be NumPy arrays or all be GPU arrays")


def _check_heads(h, hk, d, dk, dv, supported=SUPPORTED_HEAD_DIMS):
    if not d == dk == dv:
        raise ValueError(f"q, k, v head dims differ: {d}, {dk}, {dv}")
    if hk < 1 or h % hk:
        raise ValueError(f"key heads ({hk}) must divide query heads ({h})")
    if d not in supported:
        raise ValueError(f"head dim {d} is not supported; supported: {supported}")


def _check_tma(infos):
    for info, name in infos:
        if 0 in info.shape:
            continue
        if info.ptr % 16 or any((s * info.itemsize) % 16 for s in info.strides[:-1]):
            raise ValueError(f"{name}: TMA needs 16-byte aligned base and strides, got base "
                             f"{info.ptr:#x}, strides {info.strides} elements")


def _options(d, softmax_scale, causal, window_size, softcap):
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    if not scale > 0 or not math.isfinite(scale):
        raise ValueError(f"softmax_scale must be positive and finite, got {softmax_scale}")
    softcap = float(softcap)
    if not softcap >= 0 or not math.isfinite(softcap):
        raise ValueError(f"softcap must be a finite number >= 0, got {softcap}")
    left, right = _window(window_size)
    if causal:
        right = 0
    return scale, softcap, (left, right), mask.mask_kind(causal, (left, right))


def _window(window_size):
    """(left, right) as the kernels take them: integers (`tensors.integer`), negative meaning
    unbounded (-1), and a bound past `mask.FAR` clamped to it: the kernels' window arithmetic is
    int32, where a larger bound would wrap, and no sequence is that long."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    bounds = (tensors.integer(w, f"window_size {window_size!r}: each entry") for w in (left, right))
    return tuple(-1 if w < 0 else min(w, mask.FAR) for w in bounds)


def _output(out, like, shape, stream):
    if out is None:
        o = tensors.empty_like_kind(like, shape, like.dtype)
        return o, tensors.TensorInfo(tensors.device_ptr(o), shape, tensors.contiguous_strides(shape), like.dtype,
                                     like.kind, o)
    if type(out).__module__.split(".")[0] in ("jax", "jaxlib"):
        raise TypeError("out=: JAX arrays are immutable; leave out=None to get a new JAX array")
    io = tensors.inspect(out, "out", stream)
    if io.shape != shape or io.dtype != like.dtype or io.strides[-1] != 1:
        raise ValueError(f"out must be {shape} {like.dtype} with a contiguous last dim, got {io.shape} {io.dtype}")
    _check_tma([(io, "out")])
    return out, io


def flash_attn(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               return_lse=False, out=None, stream=None, precision=None):
    """Exact attention softmax(q k^T * scale) v, computed by the FlashAttention-3 forward kernel.

    q `[B, Sq, H, D]`, k and v `[B, Sk, Hk, D]` with Hk dividing H (GQA/MQA), D one of
    tiles.SUPPORTED_HEAD_DIMS (64, 96, 128, 192, 256); all three bfloat16 or all float16.
    Array kinds: torch CUDA tensors, CuPy arrays, Numba device arrays, JAX arrays and any other
    CUDA array that exports DLPack (used in place, no copy; the last dimension contiguous, base
    and strides 16-byte aligned), or NumPy arrays (bfloat16 as ml_dtypes.bfloat16; copied to the
    GPU, the result copied back).  Without a Hopper GPU, raises
    numba_fa3.primitives.launch.NoHopperGPU.
    causal: bottom-right aligned when Sq != Sk (as FA2/FA3).  window_size=(left, right), -1 for
    unbounded.  softcap > 0: scores become softcap * tanh(scores / softcap) before the softmax.
    out: a GPU array `[B, Sq, H, D]` of q's dtype to write into (not for NumPy inputs, nor JAX,
    whose arrays are immutable); else a new array of the inputs' library.
    stream: where to launch: None (torch tensors: torch's current stream; others: the legacy
    default stream), an int CUstream handle, or a stream object (Numba, CuPy, torch: anything
    with `.cuda_stream` or `.handle`).  The call does not wait for the kernel.
    Returns out `[B, Sq, H, D]`, and with return_lse the log-sum-exp `[B, H, Sq]` (float32,
    natural log; -inf for rows that see no key, whose output is 0), both of the inputs' library.
    precision="fp8": quantize q, k, v to e4m3 (a random Hadamard rotation of q and k, block
    scales) and run the FP8 kernel (`api_fp8.flash_attn_fp8_from`; GPU inputs, head dims
    tiles.FP8_HEAD_DIMS); None: the inputs' own precision.
    """
    if precision not in (None, "fp8"):
        raise ValueError(f"precision must be None or 'fp8', got {precision!r}")
    if precision == "fp8":
        from .api_fp8 import flash_attn_fp8_from
        return flash_attn_fp8_from(q, k, v, softmax_scale, causal, window_size, return_lse, out, stream,
                                   softcap=softcap)
    return _forward(q, k, v, softmax_scale, causal, window_size, softcap, return_lse, out, stream,
                    forward_kernel)


def _forward(q, k, v, softmax_scale, causal, window_size, softcap, return_lse, out, stream, make_kernel):
    """flash_attn with the kernel chosen by make_kernel(dtype, head_dim, mask_kind, softcap=...,
    long_queries=...): the benchmark's ablation passes kernels with parts of the schedule switched
    off."""
    iq, ik, iv = (tensors.inspect(x, n, stream) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    _check_layout([(iq, "q"), (ik, "k"), (iv, "v")], 4, "[batch, seqlen, heads, head_dim]")
    b, sq, h, d = iq.shape
    bk, sk, hk, dk = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    if bk != b:
        raise ValueError(f"q {iq.shape} and k {ik.shape} differ in batch")
    _check_heads(h, hk, d, dk, iv.shape[3])
    if min(b, sq, sk, h) < 1:
        raise ValueError(f"empty attention: batch {b}, seqlen_q {sq}, seqlen_k {sk}, heads {h}")
    scale, cap, window, kind = _options(d, softmax_scale, causal, window_size, softcap)
    host = iq.kind == "numpy"
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        iq, ik, iv = tensors.upload(iq), tensors.upload(ik), tensors.upload(iv)
    _check_tma([(iq, "q"), (ik, "k"), (iv, "v")])
    o, io = _output(out, iq, (b, sq, h, d), stream)
    lse = tensors.empty_like_kind(iq, (b, h, sq), "f32")
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    kern = make_kernel(iq.dtype, d, kind, softcap=cap > 0,
                       long_queries=tiles.has_long_tiles(d, kind != mask.MASK_NONE, sq))
    table = descriptor_tables.get(kern.tensor_maps(iq, ik, iv, io))
    kern.launch(table, tensors.device_ptr(lse), io, b, h, hk, sq, sk, window, scale, cap, stream)
    return _results(o, lse, iq, io, host, out, stream, return_lse)


def _results(o, lse, like, io, host, out, stream, return_lse):
    """The output (and LSE) as the caller's kind: NumPy back from the GPU, DLPack inputs' results
    handed to their library now that the kernel is queued."""
    if host:
        o, lse = tensors.to_host(o, io.dtype), lse.copy_to_host()
    else:
        o = o if out is not None else tensors.to_library(o, like, io.dtype, stream)
        lse = tensors.to_library(lse, like, "f32", stream)
    return (o, lse) if return_lse else o


def _cu_seqlens(x, name, total, host, stream):
    """(array, device address, batch, lengths) of a cu_seqlens array (int32, batch + 1 entries),
    checked as far as can be without reading GPU memory; NumPy ones are checked fully (and get
    their device address from `_upload_cu` once every check has passed)."""
    if host:
        a = np.asarray(x)
        if a.ndim != 1 or a.shape[0] < 2 or a.dtype.kind not in "iu":
            raise ValueError(f"{name} must be a 1-D integer array of batch + 1 >= 2 entries, got {a.dtype} {a.shape}")
        if a[0] != 0 or np.any(np.diff(a.astype(np.int64)) < 0) or a[-1] != total:
            raise ValueError(f"{name} must start at 0, not decrease, and end at the packed length {total}")
        return a.astype(np.int32), None, a.shape[0] - 1, np.diff(a.astype(np.int64))
    info = tensors.inspect(x, name, stream)
    if info.kind == "numpy":
        raise TypeError(f"{name} must be on the GPU like q, k, v")
    if len(info.shape) != 1 or info.shape[0] < 2 or info.strides[0] != 1:
        raise ValueError(f"{name} must be a contiguous 1-D array of batch + 1 >= 2 entries, got {info.shape}")
    if info.dtype != "i32":
        raise TypeError(f"{name} must be int32, got {info.dtype}")
    return x, info.ptr, info.shape[0] - 1, None


def _max_seqlen(x, name, total):
    """A varlen call's longest-sequence bound: an integer (`tensors.integer`), >= 0, clamped to
    the packed length `total`, which no sequence exceeds: the kernels take it as int32, where a
    larger bound would wrap."""
    n = tensors.integer(x, name)
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return min(n, total)


def _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tq, tk, host, stream):
    """(cu_q, cu_k, batch, max_q, max_k) of a varlen call, checked as far as the host can
    (`_cu_seqlens`; NumPy lengths against max_seqlen too); NumPy cu_seqlens still on the host
    (`_cu_on_device` moves them once every other check has passed)."""
    max_q, max_k = _max_seqlen(max_seqlen_q, "max_seqlen_q", tq), _max_seqlen(max_seqlen_k, "max_seqlen_k", tk)
    cuq, cuq_ptr, bq, lens_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", tq, host, stream)
    cuk, cuk_ptr, bk, lens_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", tk, host, stream)
    if bq != bk:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k describe {bq} and {bk} sequences")
    if host and (lens_q.max(initial=0) > max_q or lens_k.max(initial=0) > max_k):
        raise ValueError(f"a sequence is longer than max_seqlen_q/k ({max_q}, {max_k}): "
                         f"longest {lens_q.max(initial=0)}, {lens_k.max(initial=0)}")
    return (cuq, cuq_ptr), (cuk, cuk_ptr), bq, max_q, max_k


def _cu_on_device(cu, host):
    """(array, device address) of a `_sequences` cu_seqlens entry: NumPy ones copied now."""
    arr, ptr = cu
    if host:
        arr = tensors.to_device(arr)
        ptr = tensors.device_ptr(arr)
    return arr, ptr


def flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                      causal=False, window_size=(-1, -1), softcap=0.0, return_lse=False, out=None, stream=None,
                      precision=None):
    """Attention over sequences packed along one token axis: q `[Tq, H, D]`, k/v `[Tk, Hk, D]`;
    sequence i is tokens cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:
    cu_seqlens_k[i+1] of k and v (int32 arrays of batch + 1 entries, starting at 0).
    max_seqlen_q / max_seqlen_k must bound every sequence's length.  Empty and 1-token sequences
    are allowed (an empty key sequence gives zero output rows and LSE -inf).  Masks and softcap
    as in `flash_attn`, per sequence.  dtypes, array kinds, `out` ([Tq, H, D]) and `stream` as in
    `flash_attn`; cu_seqlens are int32 arrays on the GPU with GPU inputs (not read on the host)
    and NumPy arrays with NumPy inputs (checked).  precision="fp8": each sequence quantized on
    its own (`quantize.quantize_fp8_varlen`), then `api_fp8.flash_attn_fp8_varlen` (GPU inputs).
    Returns out `[Tq, H, D]` and with return_lse the LSE `[H, Tq]` (float32).
    """
    if precision not in (None, "fp8"):
        raise ValueError(f"precision must be None or 'fp8', got {precision!r}")
    if precision == "fp8":
        from .api_fp8 import flash_attn_fp8_varlen_from
        return flash_attn_fp8_varlen_from(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          softmax_scale, causal, window_size, return_lse, out, stream,
                                          softcap=softcap)
    iq, ik, iv = (tensors.inspect(x, n, stream) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    _check_layout([(iq, "q"), (ik, "k"), (iv, "v")], 3, "[total_tokens, heads, head_dim]")
    tq, h, d = iq.shape
    tk, hk, dk = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    _check_heads(h, hk, d, dk, iv.shape[2])
    if h < 1:
        raise ValueError("no heads")
    scale, cap, window, kind = _options(d, softmax_scale, causal, window_size, softcap)
    host = iq.kind == "numpy"
    cuq, cuk, bq, max_q, max_k = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tq, tk,
                                            host, stream)
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        iq, ik, iv = tensors.upload(iq), tensors.upload(ik), tensors.upload(iv)
    (cuq, cuq_ptr), (cuk, cuk_ptr) = _cu_on_device(cuq, host), _cu_on_device(cuk, host)
    _check_tma([(iq, "q"), (ik, "k"), (iv, "v")])
    o, io = _output(out, iq, (tq, h, d), stream)
    lse = tensors.empty_like_kind(iq, (h, tq), "f32")
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    if tq and not tk:
        # No keys at all: every row sees none (output 0, LSE -inf), and there is nothing to map.
        tensors.fill(o, 0)
        tensors.fill(lse, -np.inf)
    elif tq and max_q:
        kern = forward_kernel(iq.dtype, d, kind, softcap=cap > 0, varlen=True)
        table = descriptor_tables.get(kern.tensor_maps(*(_as_batch_of_one(x) for x in (iq, ik, iv, io))))
        kern.launch(table, tensors.device_ptr(lse), io, bq, h, hk, max_q, max_k, window, scale, cap,
                    stream, cu_seqlens=(cuq_ptr, cuk_ptr), lse_strides=(0, tq), total=(tq, tk))
    return _results(o, lse, iq, io, host, out, stream, return_lse)


def _as_batch_of_one(info):
    """A packed 3-D TensorInfo ([T, H, D], or the FP8 kernel's V^T [Hk, D, keys]) seen as a batch
    of one for the kernels' 4-D tensor maps, its batch stride the array's span (the stride of a
    dimension of one is never used; `tma_desc.unit_dim_strides` makes any such stride legal)."""
    t, h, d = info.shape
    return tensors.TensorInfo(info.ptr, (1, t, h, d), (t * info.strides[0],) + tuple(info.strides),
                              info.dtype, info.kind, info.obj, info.owner)


# --- the backward pass ---------------------------------------------------------------------------

def _grad_output(given, like, name, stream):
    """(array, TensorInfo) of a gradient output: `given` checked (a GPU array of like's shape and
    dtype, last dim contiguous, TMA-free so any 16-byte aligned rows), or a new one."""
    if given is None:
        arr = tensors.empty_like_kind(like, like.shape, like.dtype)
        return arr, tensors.TensorInfo(tensors.device_ptr(arr), like.shape, tensors.contiguous_strides(like.shape),
                                       like.dtype, like.kind, arr)
    if type(given).__module__.split(".")[0] in ("jax", "jaxlib"):
        raise TypeError(f"{name}=: JAX arrays are immutable; leave {name}=None to get a new JAX array")
    info = tensors.inspect(given, name, stream)
    if info.kind == "numpy":
        raise TypeError(f"{name}= must be a GPU array")
    if info.shape != like.shape or info.dtype != like.dtype or (info.strides[-1] != 1 and 0 not in info.shape):
        raise ValueError(f"{name} must be {like.shape} {like.dtype} with a contiguous last dim, got "
                         f"{info.shape} {info.dtype} strides {info.strides}")
    if 0 not in info.shape and (info.ptr % 16 or any((s * info.itemsize) % 16 for s in info.strides[:-1])):
        raise ValueError(f"{name}: 16-byte aligned base and strides needed (16-byte row stores)")
    return given, info


def _check_lse(lse, shape, stream):
    info = tensors.inspect(lse, "lse", stream)
    if info.shape != shape or info.dtype != "f32":
        raise ValueError(f"lse must be float32 {shape} (as the forward returns it), got {info.dtype} {info.shape}")
    return info


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, deterministic=False, dq=None, dk=None, dv=None, stream=None):
    """The gradients (dq, dk, dv) of `flash_attn(q, k, v, ...)` for the output gradient `dout`.

    out and lse are the forward's output and log-sum-exp (`flash_attn(..., return_lse=True)`),
    with the same options (softmax_scale, causal, window_size, softcap) as here.  dout and out
    `[B, Sq, H, D]`, lse `[B, H, Sq]` float32; array kinds, dtypes and `stream` as in `flash_attn`
    (all of dout, q, k, v, out of one dtype; NumPy in, NumPy out).  With GQA/MQA, dk and dv of a
    key head sum its query heads'.  Rows that see no key get zero gradients.
    deterministic: dq's float32 additions in a fixed order (key block by key block), so the result
    is bitwise the same run to run; the default adds them as key blocks finish.
    dq, dk, dv: GPU arrays of q's, k's, v's shapes and dtype to write into (else new arrays of the
    inputs' library).  Supported head dims: tiles.BACKWARD_HEAD_DIMS."""
    names = ("dout", "q", "k", "v", "out")
    infos = [tensors.inspect(x, n, stream) for x, n in zip((dout, q, k, v, out), names)]
    _check_layout(list(zip(infos, names)), 4, "[batch, seqlen, heads, head_dim]")
    ido, iq, ik, iv, io = infos
    b, sq, h, d = iq.shape
    bk, sk, hk, dk_ = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    if bk != b:
        raise ValueError(f"q {iq.shape} and k {ik.shape} differ in batch")
    if ido.shape != iq.shape or io.shape != iq.shape:
        raise ValueError(f"dout {ido.shape} and out {io.shape} must have q's shape {iq.shape}")
    _check_heads(h, hk, d, dk_, iv.shape[3])
    _check_backward_head_dim(d)
    if min(b, sq, sk, h) < 1:
        raise ValueError(f"empty attention: batch {b}, seqlen_q {sq}, seqlen_k {sk}, heads {h}")
    ilse = _check_lse(lse, (b, h, sq), stream)
    scale, cap, window, kind = _options(d, softmax_scale, causal, window_size, softcap)
    host = iq.kind == "numpy"
    if host:
        if any(x is not None for x in (dq, dk, dv)):
            raise TypeError("dq=/dk=/dv= are for GPU inputs; NumPy inputs get new NumPy results")
        ido, iq, ik, iv, io, ilse = (tensors.upload(x) for x in (ido, iq, ik, iv, io, ilse))
    _check_tma([(iq, "q"), (ik, "k"), (iv, "v"), (ido, "dout")])
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    outs = [_grad_output(g, like, n, stream) for g, like, n in ((dq, iq, "dq"), (dk, ik, "dk"), (dv, iv, "dv"))]
    kern = backward_kernel(iq.dtype, d, kind, softcap=cap > 0, deterministic=bool(deterministic))
    _run_backward(kern, ido, iq, ik, iv, io, ilse, outs, b, h, hk, sq, sk, window, scale, cap, stream)
    return _grad_results(outs, iq, host, stream)


def _run_backward(kern, ido, iq, ik, iv, io, ilse, outs, b, h, hk, sq, sk, window, scale, cap, stream,
                  cu=(0, 0), total=(0, 0), batch_view=None):
    """Preprocess, the main kernel, postprocess, on one stream."""
    (_, dq_i), (_, dk_i), (_, dv_i) = outs
    varlen = total != (0, 0) or cu != (0, 0)
    bm = kern.block_m
    allocate = _torch_allocator(iq) if iq.kind == "torch" else None
    if varlen:
        ws = backward_prep.workspace(b, h, iq.shape[-1], bm, total_q=total[0], stream=stream, allocate=allocate)
    else:
        ws = backward_prep.workspace(b, h, iq.shape[-1], bm, seqlen_q=sq, stream=stream, allocate=allocate)
    backward_prep.preprocess(ws, ido, io, ilse, b, h, iq.shape[-1], bm, sq, stream, cu_seqlens_q=cu[0],
                             total_q=total[0])
    sem = None
    if kern.deterministic:
        sem = _zeros_i32(b * h * (-(-sq // bm)), stream, iq)
    view = batch_view or (lambda x: x)
    table = descriptor_tables.get(kern.tensor_maps(view(iq), view(ik), view(iv), view(ido), ws))
    kern.launch(table, ws, tensors.device_ptr(sem) if sem is not None else 0, dk_i, dv_i, b, h, hk, sq, sk,
                window, scale, cap, stream, cu_seqlens=cu, total=total)
    backward_prep.postprocess(ws, dq_i, b, h, iq.shape[-1], bm, sq, scale, stream, cu_seqlens_q=cu[0],
                              total_q=total[0])
    # the workspaces must outlive the kernels that use them.  torch's caching allocator reuses a
    # freed block only for later work on the stream it was freed on, so on torch's current stream
    # dropping them now is safe (and needs no event, which CUDA-graph capture would refuse); on
    # any other stream they are held until an event recorded behind the kernels has passed
    if iq.kind != "torch" or launch.stream_handle(stream) != tensors.torch_stream(iq.obj):
        _keep_until_done((ws, sem), stream)


def _grad_results(outs, like, host, stream):
    """The gradients as the caller's kind: NumPy back from the GPU, new arrays of DLPack inputs
    handed to their library (`to_library` returns the others as they are)."""
    if host:
        return tuple(tensors.to_host(arr, info.dtype) for arr, info in outs)
    return tuple(tensors.to_library(arr, like, info.dtype, stream) for arr, info in outs)


def _torch_allocator(like):
    """allocate(shape) -> a float32 torch tensor on like's device (torch's caching allocator)."""
    import torch
    device = like.obj.device
    return lambda shape: torch.empty(shape, dtype=torch.float32, device=device)


def _zeros_i32(count, stream, like):
    """count int32 zeros (at least one), set by a memset on `stream`."""
    from numba import cuda
    from cuda.bindings import driver as drv
    from numba_fa3.primitives.launch import stream_handle
    if like.kind == "torch":
        import torch
        arr = torch.empty(max(1, count), dtype=torch.int32, device=like.obj.device)
    else:
        arr = cuda.device_array(max(1, count), dtype=np.int32)
    (err,) = drv.cuMemsetD32Async(tensors.device_ptr(arr), 0, max(1, count), stream_handle(stream))
    if err != drv.CUresult.CUDA_SUCCESS:
        raise RuntimeError(f"cuMemsetD32Async failed: {err.name}")
    return arr


_PENDING = []


def _keep_until_done(objs, stream):
    """Hold device buffers (Numba frees them when collected) until the stream has passed the
    launches that use them: a CUDA event per call, the held list pruned of completed ones."""
    from cuda.bindings import driver as drv
    from numba_fa3.primitives.launch import stream_handle
    err, ev = drv.cuEventCreate(drv.CUevent_flags.CU_EVENT_DISABLE_TIMING)
    drv.cuEventRecord(ev, stream_handle(stream))
    _PENDING.append((ev, objs))
    while _PENDING and drv.cuEventQuery(_PENDING[0][0])[0] == drv.CUresult.CUDA_SUCCESS:
        drv.cuEventDestroy(_PENDING.pop(0)[0])


def _check_backward_head_dim(d):
    if d not in BACKWARD_HEAD_DIMS:
        raise ValueError(f"the backward supports head dims {BACKWARD_HEAD_DIMS}, got {d}")


def flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                               deterministic=False, dq=None, dk=None, dv=None, stream=None):
    """`flash_attn_backward` for packed sequences: dout, q, out `[Tq, H, D]`, k, v `[Tk, Hk, D]`,
    lse `[H, Tq]`, cu_seqlens and max_seqlen as in `flash_attn_varlen`.  Returns (dq, dk, dv) of
    q's, k's, v's shapes."""
    names = ("dout", "q", "k", "v", "out")
    infos = [tensors.inspect(x, n, stream) for x, n in zip((dout, q, k, v, out), names)]
    _check_layout(list(zip(infos, names)), 3, "[total_tokens, heads, head_dim]")
    ido, iq, ik, iv, io = infos
    tq, h, d = iq.shape
    tk, hk, dk_ = ik.shape
    if iv.shape != ik.shape:
        raise ValueError(f"k and v must have the same shape, got {ik.shape} and {iv.shape}")
    if ido.shape != iq.shape or io.shape != iq.shape:
        raise ValueError(f"dout {ido.shape} and out {io.shape} must have q's shape {iq.shape}")
    _check_heads(h, hk, d, dk_, iv.shape[2])
    _check_backward_head_dim(d)
    ilse = _check_lse(lse, (h, tq), stream)
    scale, cap, window, kind = _options(d, softmax_scale, causal, window_size, softcap)
    host = iq.kind == "numpy"
    cuq, cuk, bq, max_q, max_k = _sequences(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, tq, tk,
                                            host, stream)
    if host:
        if any(x is not None for x in (dq, dk, dv)):
            raise TypeError("dq=/dk=/dv= are for GPU inputs; NumPy inputs get new NumPy results")
        ido, iq, ik, iv, io, ilse = (tensors.upload(x) for x in (ido, iq, ik, iv, io, ilse))
    (cuq, cuq_ptr), (cuk, cuk_ptr) = _cu_on_device(cuq, host), _cu_on_device(cuk, host)
    _check_tma([(iq, "q"), (ik, "k"), (iv, "v"), (ido, "dout")])
    if stream is None and iq.kind == "torch":
        stream = tensors.torch_stream(iq.obj)
    outs = [_grad_output(g, like, n, stream) for g, like, n in ((dq, iq, "dq"), (dk, ik, "dk"), (dv, iv, "dv"))]
    if tk and tq and max_q and max_k:
        kern = backward_kernel(iq.dtype, d, kind, softcap=cap > 0, varlen=True, deterministic=bool(deterministic))
        _run_backward(kern, ido, iq, ik, iv, io, ilse, outs, bq, h, hk, max_q, max_k, window, scale, cap, stream,
                      cu=(cuq_ptr, cuk_ptr), total=(tq, tk), batch_view=_as_batch_of_one)
    else:
        for arr, _ in outs:
            tensors.fill(arr, 0)
    return _grad_results(outs, iq, host, stream)
