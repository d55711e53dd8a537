"""PyTorch integration: `flash_attn_func` and `flash_attn_varlen_func`, differentiable in q, k, v.

Imported as `import numba_fa3.torch`; `import numba_fa3` alone never imports PyTorch.  Inside this
module `torch` is PyTorch itself: imports are absolute, so the module's own name shadows nothing.

The forward and backward passes are `torch.library` custom operators in the `numba_fa3`
namespace, so `torch.compile(fullgraph=True)` sees each as one opaque node (traced through its
fake implementation, never through Numba) and autograd reaches the backward through
`register_autograd`:

    numba_fa3::flash_attn_forward(q, k, v, softmax_scale, causal, window_size, softcap,
                                  deterministic) -> (out, lse)
    numba_fa3::flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_size,
                                   softcap, deterministic) -> (dq, dk, dv)
    numba_fa3::flash_attn_varlen_forward / flash_attn_varlen_backward: the same with
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k after v.

Every output is a new contiguous tensor, in the real operators and their fake implementations
alike: the compiler plans the memory of what follows from the fake's strides.
"""
import math

import torch

from .api import flash_attn, flash_attn_varlen

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

#: TMA (the kernels' loads and stores) needs the base address and every stride but the last
#: 16-byte aligned; api._check_tma raises on anything else.
_TMA_ALIGN = 16


def _readable(x):
    """x itself where the kernels can read it in place, else a contiguous copy.

    The kernels need the last dimension contiguous and TMA's alignment; views made by splitting a
    fused QKV projection or by transposing the sequence and head axes already qualify and are
    not copied.  Zero strides are copied too: autograd hands over expanded gradients (that of
    `out.sum(dim=2)` is broadcast over the heads with stride 0, that of `out.sum()` is one scalar
    with every stride 0), and the kernels and their tensor maps are built and tested only for
    tensors in which every element has an address of its own.  The copy is one pass over an
    array the size of the input."""
    strides = x.stride()
    aligned = x.data_ptr() % _TMA_ALIGN == 0 and all(
        (s * x.element_size()) % _TMA_ALIGN == 0 for s in strides[:-1])
    if x.dim() and strides[-1] == 1 and 0 not in strides and aligned:
        return x
    # clone rather than .contiguous(): a contiguous tensor whose base is misaligned (a slice of a
    # flat buffer) must still move; the caching allocator aligns new blocks far beyond 16 bytes.
    return x.clone(memory_format=torch.contiguous_format)


def _new_like(x):
    """A new contiguous tensor of x's shape, dtype and device (whatever x's strides)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _window(window_size):
    """window_size as the operators' `int[]` argument: a list of two plain ints, whatever pair
    (tuple, NumPy integers) the caller gave."""
    left, right = window_size
    return [int(left), int(right)]


def _scale(softmax_scale, q):
    """The default 1/sqrt(head_dim) is settled here, so the operators take a plain float."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


# ---------------------------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("numba_fa3::flash_attn_forward", mutates_args=(), device_types="cuda")
def forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
               window_size: list[int], softcap: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Sq, H, D], lse [B, H, Sq] float32).  `deterministic` is not used by the forward
    pass; it is an argument so that setup_context, which sees only the operator's inputs, can
    hand it to the backward."""
    q, k, v = _readable(q), _readable(k), _readable(v)
    out = _new_like(q)
    _, lse = flash_attn(q, k, v, softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                        softcap=softcap, return_lse=True, out=out)
    return out, lse


@forward_op.register_fake
def _(q, k, v, softmax_scale, causal, window_size, softcap, deterministic):
    b, sq, h, _ = q.shape
    return _new_like(q), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("numba_fa3::flash_attn_backward", mutates_args=(), device_types="cuda")
def backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                lse: torch.Tensor, softmax_scale: float, causal: bool, window_size: list[int], softcap: float,
                deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of q's, k's and v's shapes; dk and dv summed over the query heads of each key
    head (GQA)."""
    from numba_fa3 import flash_attn_backward
    dout, q, k, v, out = (_readable(x) for x in (dout, q, k, v, out))
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    # The LSE goes back in the layout the forward pass wrote it (contiguous [B, H, Sq]; rows of Sq
    # floats need not be 16-byte multiples, so _readable's alignment rule does not apply).
    flash_attn_backward(dout, q, k, v, out, lse.contiguous(), softmax_scale=softmax_scale, causal=causal,
                        window_size=tuple(window_size), softcap=softcap, deterministic=deterministic,
                        dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@backward_op.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap, deterministic):
    return _new_like(q), _new_like(k), _new_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.options = options  # softmax_scale, causal, window_size, softcap, deterministic
    # No gradient flows through the LSE (the backward kernel has no dLSE term): mark it so, so
    # that a loss built on it fails loudly instead of getting a silently wrong gradient.
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = backward_op(dout, q, k, v, out, lse, *ctx.options)
    return (dq, dk, dv) + (None,) * len(ctx.options)


forward_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    deterministic=False, return_lse=False):
    """`numba_fa3.flash_attn` for torch CUDA tensors, differentiable in q, k and v.

    q `[B, Sq, H, D]`, k and v `[B, Sk, Hk, D]` (Hk dividing H), bf16 or fp16; the last dimension
    need not be contiguous (such inputs are copied once).  Masks, softcap and the default scale
    1/sqrt(D) as in `numba_fa3.flash_attn`.  deterministic: ask the backward pass for a
    reproducible accumulation of dq.  Returns out `[B, Sq, H, D]` (a new contiguous tensor), and
    with return_lse also the log-sum-exp `[B, H, Sq]` (float32, natural log), which carries no
    gradient.  Runs on torch's current stream.
    """
    out, lse = forward_op(q, k, v, _scale(softmax_scale, q), bool(causal), _window(window_size), float(softcap),
                          bool(deterministic))
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("numba_fa3::flash_attn_varlen_forward", mutates_args=(), device_types="cuda")
def varlen_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                      causal: bool, window_size: list[int], softcap: float,
                      deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, H, D], lse [H, Tq] float32); `deterministic` as in forward_op."""
    q, k, v = _readable(q), _readable(k), _readable(v)
    out = _new_like(q)
    _, lse = flash_attn_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=softmax_scale, causal=causal, window_size=tuple(window_size),
                               softcap=softcap, return_lse=True, out=out)
    return out, lse


@varlen_forward_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size,
      softcap, deterministic):
    tq, h, _ = q.shape
    return _new_like(q), q.new_empty((h, tq), dtype=torch.float32)


@torch.library.custom_op("numba_fa3::flash_attn_varlen_backward", mutates_args=(), device_types="cuda")
def varlen_backward_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                       max_seqlen_k: int, softmax_scale: float, causal: bool, window_size: list[int],
                       softcap: float, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq [Tq, H, D], dk [Tk, Hk, D], dv [Tk, Hk, D]), as backward_op per sequence."""
    from numba_fa3 import flash_attn_varlen_backward
    dout, q, k, v, out = (_readable(x) for x in (dout, q, k, v, out))
    dq, dk, dv = _new_like(q), _new_like(k), _new_like(v)
    flash_attn_varlen_backward(dout, q, k, v, out, lse.contiguous(), cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, softmax_scale=softmax_scale, causal=causal,
                               window_size=tuple(window_size), softcap=softcap, deterministic=deterministic,
                               dq=dq, dk=dk, dv=dv)
    return dq, dk, dv


@varlen_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      window_size, softcap, deterministic):
    return _new_like(q), _new_like(k), _new_like(v)


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.options = options  # max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, softcap, deterministic
    ctx.mark_non_differentiable(lse)  # as in _setup_context


def _varlen_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
    dq, dk, dv = varlen_backward_op(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *ctx.options)
    return (dq, dk, dv, None, None) + (None,) * len(ctx.options)


varlen_forward_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, window_size=(-1, -1), softcap=0.0, deterministic=False, return_lse=False):
    """`numba_fa3.flash_attn_varlen` for torch CUDA tensors, differentiable in q, k and v.

    q `[Tq, H, D]`, k and v `[Tk, Hk, D]` packed along the token axis; cu_seqlens_q/k int32 CUDA
    tensors of batch + 1 offsets; max_seqlen_q/k ints bounding every sequence.  Options and
    results as in `flash_attn_func`; the LSE is `[H, Tq]`.
    """
    out, lse = varlen_forward_op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 _scale(softmax_scale, q), bool(causal), _window(window_size), float(softcap),
                                 bool(deterministic))
    return (out, lse) if return_lse else out
