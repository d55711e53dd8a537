"""numba_fa3.torch: the custom operators' registration, fake implementations and autograd wiring,
and gradients against torch's scaled_dot_product_attention.

Tests parametrized over `device` run twice: on "cpu", with the NumPy reference
(numba_fa3.reference) registered as the operators' CPU kernel, which checks everything around
the kernels (schemas, fakes against real outputs, autograd, torch.compile, the comparisons
themselves) without a GPU; and on "cuda" with the kernels, on a Hopper GPU.

Gradients follow FA3's tolerance rule: the error against SDPA's math backend in float32 on the
same bf16 inputs is at most twice the error of SDPA run in bf16, plus a small atol."""
import copy
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import numba_fa3.torch as fa  # noqa: E402
from numba_fa3.reference import (attention_backward_reference, attention_backward_reference_varlen,  # noqa: E402
                                 attention_mask, attention_reference, attention_reference_varlen)

gpu = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCHEMAS = {
    "flash_attn_forward": "numba_fa3::flash_attn_forward(Tensor q, Tensor k, Tensor v, float softmax_scale, "
                          "bool causal, int[] window_size, float softcap, bool deterministic) -> (Tensor, Tensor)",
    "flash_attn_backward": "numba_fa3::flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                           "Tensor lse, float softmax_scale, bool causal, int[] window_size, float softcap, "
                           "bool deterministic) -> (Tensor, Tensor, Tensor)",
    "flash_attn_varlen_forward": "numba_fa3::flash_attn_varlen_forward(Tensor q, Tensor k, Tensor v, "
                                 "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, "
                                 "float softmax_scale, bool causal, int[] window_size, float softcap, "
                                 "bool deterministic) -> (Tensor, Tensor)",
    "flash_attn_varlen_backward": "numba_fa3::flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, "
                                  "Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
                                  "int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, "
                                  "int[] window_size, float softcap, bool deterministic) -> (Tensor, Tensor, Tensor)",
}


# ---------------------------------------------------------------------------------------------
# the NumPy reference as the operators' CPU kernel
# ---------------------------------------------------------------------------------------------

def _np(t):
    return t.detach().float().numpy()  # bf16/fp16 -> float32 is exact


def _back(a, dtype):
    """A reference result as the real operators return theirs: a new contiguous tensor."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype).contiguous()


def _ref_forward(q, k, v, softmax_scale, causal, window_size, softcap, deterministic):
    out, lse = attention_reference(_np(q), _np(k), _np(v), softmax_scale, causal, tuple(window_size), softcap,
                                   return_lse=True)
    return _back(out, q.dtype), _back(lse, torch.float32)


def _ref_backward(dout, q, k, v, out, lse, softmax_scale, causal, window_size, softcap, deterministic):
    grads = attention_backward_reference(_np(dout), _np(q), _np(k), _np(v), softmax_scale, causal,
                                         tuple(window_size), softcap)
    return tuple(_back(g, x.dtype) for g, x in zip(grads, (q, k, v)))


def _ref_varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size, softcap,
                        deterministic):
    out, lse = attention_reference_varlen(_np(q), _np(k), _np(v), cu_q.numpy(), cu_k.numpy(), softmax_scale,
                                          causal, tuple(window_size), softcap, return_lse=True)
    return _back(out, q.dtype), _back(lse, torch.float32)


def _ref_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale, causal, window_size,
                         softcap, deterministic):
    grads = attention_backward_reference_varlen(_np(dout), _np(q), _np(k), _np(v), cu_q.numpy(), cu_k.numpy(),
                                                softmax_scale, causal, tuple(window_size), softcap)
    return tuple(_back(g, x.dtype) for g, x in zip(grads, (q, k, v)))


def _register_cpu_reference():
    """The operators are CUDA-only; a CPU kernel (kept for the rest of the process: CPU calls
    would fail without it) lets the machinery around the kernels run anywhere.  Registering
    again replaces the function, so this is idempotent."""
    fa.forward_op.register_kernel("cpu", _ref_forward)
    fa.backward_op.register_kernel("cpu", _ref_backward)
    fa.varlen_forward_op.register_kernel("cpu", _ref_varlen_forward)
    fa.varlen_backward_op.register_kernel("cpu", _ref_varlen_backward)


@pytest.fixture(params=[pytest.param("cpu", id="cpu-reference"), pytest.param("cuda", marks=gpu)])
def device(request):
    if request.param == "cpu":
        _register_cpu_reference()
    return request.param


def _randn(*shape, device, dtype=torch.bfloat16, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# the module and the registrations
# ---------------------------------------------------------------------------------------------

def test_import_numba_fa3_does_not_import_torch():
    code = "import numba_fa3, sys; assert 'torch' not in sys.modules, 'numba_fa3 imported torch'"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_module_name_does_not_shadow_pytorch():
    assert fa.torch is torch and torch.__name__ == "torch" and hasattr(torch, "library")
    assert sys.modules["numba_fa3.torch"] is fa
    import numba_fa3
    assert numba_fa3.torch is fa  # the submodule, reached only by importing it


def test_operators_are_registered_with_schemas():
    for name, want in SCHEMAS.items():
        schema = str(getattr(torch.ops.numba_fa3, name).default._schema)
        # custom_op writes `int` arguments as SymInt (so traced shapes may flow into them).
        assert schema.replace("SymInt", "int") == want


def _assert_new_contiguous(t, shape, dtype, device):
    assert tuple(t.shape) == tuple(shape) and t.dtype == dtype and t.device.type == device
    assert t.is_contiguous(), f"strides {t.stride()} for shape {tuple(t.shape)}"


#: Fake CUDA tensors need no GPU, but autograd over them needs torch's CUDA device guard, which a
#: CPU-only build of torch aborts the process for; there the autograd check uses meta tensors.
AUTOGRAD_FAKE_DEVICE = "cuda" if torch.cuda.is_available() else "meta"


def test_fakes_give_shapes_dtypes_and_contiguous_strides():
    """Each operator's fake on fake CUDA tensors: q a transposed view and k, v views of a fused
    buffer, as a model passes them; every result new and contiguous regardless."""
    b, sq, sk, h, hk, d = 2, 113, 799, 6, 2, 128
    with FakeTensorMode():
        q = torch.empty(b, h, sq, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = torch.empty(b, sk, 2, hk, d, device="cuda", dtype=torch.bfloat16).unbind(2)
        out, lse = fa.forward_op(q, k, v, 0.1, True, [-1, -1], 0.0, False)
        _assert_new_contiguous(out, (b, sq, h, d), torch.bfloat16, "cuda")
        _assert_new_contiguous(lse, (b, h, sq), torch.float32, "cuda")
        grads = fa.backward_op(out, q, k, v, out, lse, 0.1, True, [-1, -1], 0.0, False)
        for g, x in zip(grads, (q, k, v)):
            _assert_new_contiguous(g, x.shape, x.dtype, "cuda")

        tq, tk = 300, 420
        cu = torch.empty(4, device="cuda", dtype=torch.int32)
        q = torch.empty(tq, h, d, device="cuda", dtype=torch.float16)
        k, v = torch.empty(tk, 2, hk, d, device="cuda", dtype=torch.float16).unbind(1)
        seq = (cu, cu, 200, 250)
        out, lse = fa.varlen_forward_op(q, k, v, *seq, 0.1, False, [-1, -1], 0.0, False)
        _assert_new_contiguous(out, (tq, h, d), torch.float16, "cuda")
        _assert_new_contiguous(lse, (h, tq), torch.float32, "cuda")
        grads = fa.varlen_backward_op(out, q, k, v, out, lse, *seq, 0.1, False, [-1, -1], 0.0, True)
        for g, x in zip(grads, (q, k, v)):
            _assert_new_contiguous(g, x.shape, x.dtype, "cuda")


def test_autograd_reaches_the_backward_fakes():
    """flash_attn_func / flash_attn_varlen_func on fake tensors: out differentiable, the LSE not,
    and autograd's call of the backward operators gives gradients of the inputs' shapes."""
    dev = AUTOGRAD_FAKE_DEVICE
    b, sq, sk, h, hk, d = 2, 113, 799, 6, 2, 128
    with FakeTensorMode():
        q = torch.empty(b, h, sq, d, device=dev, dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
        kv = torch.empty(b, sk, 2, hk, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        out, lse = fa.flash_attn_func(q, *kv.unbind(2), causal=True, return_lse=True)
        _assert_new_contiguous(out, (b, sq, h, d), torch.bfloat16, dev)
        _assert_new_contiguous(lse, (b, h, sq), torch.float32, dev)
        assert out.requires_grad and not lse.requires_grad
        dq, dkv = torch.autograd.grad(out, (q, kv), torch.empty_like(out))
        assert dq.shape == q.shape and dkv.shape == kv.shape

        cu = torch.empty(4, device=dev, dtype=torch.int32)
        q = torch.empty(300, h, d, device=dev, dtype=torch.float16, requires_grad=True)
        k = torch.empty(420, hk, d, device=dev, dtype=torch.float16, requires_grad=True)
        v = torch.empty(420, hk, d, device=dev, dtype=torch.float16, requires_grad=True)
        out, lse = fa.flash_attn_varlen_func(q, k, v, cu, cu, 200, 250, return_lse=True)
        _assert_new_contiguous(out, (300, h, d), torch.float16, dev)
        _assert_new_contiguous(lse, (h, 300), torch.float32, dev)
        assert out.requires_grad and not lse.requires_grad
        grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
        for g, x in zip(grads, (q, k, v)):
            assert g.shape == x.shape and g.dtype == x.dtype


# ---------------------------------------------------------------------------------------------
# opcheck
# ---------------------------------------------------------------------------------------------

def test_operators_pass_opcheck(device):
    """Schema (no input mutated or aliased), fakes against the real outputs (shapes, dtypes,
    strides), the autograd registration, and AOT dispatch with dynamic shapes."""
    b, sq, sk, h, hk, d = 1, 113, 200, 4, 2, 64
    q = _randn(b, sq, h, d, device=device, seed=1).requires_grad_()
    k = _randn(b, sk, hk, d, device=device, seed=2).requires_grad_()
    v = _randn(b, sk, hk, d, device=device, seed=3).requires_grad_()
    options = (d ** -0.5, True, [-1, -1], 0.0, True)
    torch.library.opcheck(fa.forward_op, (q, k, v) + options)
    out, lse = fa.forward_op(q, k, v, *options)
    dout = _randn(b, sq, h, d, device=device, seed=4)
    torch.library.opcheck(fa.backward_op, (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse) + options)

    lens_q, lens_k = [113, 1, 64], [113, 40, 300]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    q = _randn(sum(lens_q), h, d, device=device, seed=5).requires_grad_()
    k = _randn(sum(lens_k), hk, d, device=device, seed=6).requires_grad_()
    v = _randn(sum(lens_k), hk, d, device=device, seed=7).requires_grad_()
    seq = (cu_q, cu_k, max(lens_q), max(lens_k))
    options = (d ** -0.5, False, [-1, -1], 0.0, True)
    torch.library.opcheck(fa.varlen_forward_op, (q, k, v) + seq + options)
    out, lse = fa.varlen_forward_op(q, k, v, *seq, *options)
    dout = _randn(sum(lens_q), h, d, device=device, seed=8)
    torch.library.opcheck(fa.varlen_backward_op,
                          (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse) + seq + options)


# ---------------------------------------------------------------------------------------------
# gradients against SDPA
# ---------------------------------------------------------------------------------------------

def _mask(sq, sk, causal, window, device):
    """SDPA's boolean mask (True: attend) for our bottom-right aligned causal mask and window;
    None where every key is seen."""
    if not causal and tuple(window) == (-1, -1):
        return None
    return torch.from_numpy(attention_mask(sq, sk, causal, tuple(window))).to(device)


def _sdpa(q, k, v, causal, window, math_backend):
    """SDPA over [B, S, H, D] tensors, GQA by repeating each key/value head for its query heads
    (autograd sums dk, dv back over them)."""
    g = q.shape[2] // k.shape[2]
    mask = _mask(q.shape[1], k.shape[1], causal, window, q.device)
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2)
    if math_backend:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)


def _lse_reference(q, k, causal, window):
    """log-sum-exp [B, H, Sq] of the masked scores, float32 (rows here always see a key)."""
    g = q.shape[2] // k.shape[2]
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float().repeat_interleave(g, 2)) * q.shape[-1] ** -0.5
    mask = _mask(q.shape[1], k.shape[1], causal, window, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s.logsumexp(-1)


def _assert_fa3_rule(ours, ref, low, what):
    """FA3's rule: |ours - ref| <= 2 |low - ref| + atol, atol twice the input-precision rounding
    error at the reference's magnitude (FA3's `2 * (x + 0.3 - 0.3 - x)`)."""
    assert torch.isfinite(ours).all(), f"{what}: NaN/inf"
    x = ref.to(ours.dtype)
    atol = 2 * ((x + 0.3 - 0.3) - x).abs().max().item()
    err = (ours.float() - ref).abs().max().item()
    low_err = (low.float() - ref).abs().max().item()
    assert err <= 2 * low_err + atol, f"{what}: max err {err:.3g} vs SDPA in {ours.dtype} {low_err:.3g}"


def _assert_lse_close(lse, ref):
    assert (lse - ref).abs().max().item() <= 1e-3 * (1 + ref.abs().max().item())


def _leaves(tensors, dtype):
    return [x.detach().to(dtype).requires_grad_() for x in tensors]


#: (batch, seqlen_q, seqlen_k, heads, key heads, head dim, causal, window): odd lengths, GQA and
#: MQA, Sq != Sk both ways.  Causal and windowed cases keep Sq <= Sk, so every query row sees a
#: key (SDPA's fused backends give NaN for rows that see none).
GRAD_CASES = [
    (2, 113, 113, 4, 4, 64, False, (-1, -1)),
    (2, 113, 113, 4, 4, 128, True, (-1, -1)),
    (1, 799, 799, 4, 1, 128, True, (-1, -1)),
    (2, 113, 799, 6, 2, 64, True, (-1, -1)),
    (1, 799, 113, 4, 2, 96, False, (-1, -1)),
    (1, 200, 300, 4, 2, 128, False, (64, 32)),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,window", GRAD_CASES,
                         ids=lambda x: str(x).replace(" ", ""))
def test_gradients_match_sdpa(device, b, sq, sk, h, hk, d, causal, window):
    q = _randn(b, sq, h, d, device=device, seed=10)
    k = _randn(b, sk, hk, d, device=device, seed=11)
    v = _randn(b, sk, hk, d, device=device, seed=12)
    dout = _randn(b, sq, h, d, device=device, seed=13)
    ours = _leaves((q, k, v), torch.bfloat16)
    out, lse = fa.flash_attn_func(*ours, causal=causal, window_size=window, return_lse=True)
    grads = torch.autograd.grad(out, ours, dout)
    ref_in = _leaves((q, k, v), torch.float32)
    ref = _sdpa(*ref_in, causal, window, math_backend=True)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    low_in = _leaves((q, k, v), torch.bfloat16)
    low = _sdpa(*low_in, causal, window, math_backend=False)
    low_grads = torch.autograd.grad(low, low_in, dout)
    _assert_fa3_rule(out, ref, low, "out")
    _assert_lse_close(lse, _lse_reference(q, k, causal, window))
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        _assert_fa3_rule(g, r, lo, name)


def _cu(lens, device):
    return torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=device)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_gradients_match_per_sequence_sdpa(device, causal):
    """Packed sequences, one of them with keys but no queries (its dk, dv must be 0), against
    SDPA run on each sequence alone."""
    lens_q, lens_k = [113, 1, 0, 64, 200], [113, 40, 50, 300, 799]
    h, hk, d = 4, 2, 64
    q = _randn(sum(lens_q), h, d, device=device, seed=20)
    k = _randn(sum(lens_k), hk, d, device=device, seed=21)
    v = _randn(sum(lens_k), hk, d, device=device, seed=22)
    dout = _randn(sum(lens_q), h, d, device=device, seed=23)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    ours = _leaves((q, k, v), torch.bfloat16)
    out = fa.flash_attn_varlen_func(*ours, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    grads = torch.autograd.grad(out, ours, dout)

    def per_sequence(dtype, math_backend):
        leaves = _leaves((q, k, v), dtype)
        outs = []
        for i in range(len(lens_q)):
            if lens_q[i]:
                sq, sk = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
                outs.append(_sdpa(leaves[0][None, sq], leaves[1][None, sk], leaves[2][None, sk], causal, (-1, -1),
                                  math_backend)[0])
        o = torch.cat(outs)
        return o, torch.autograd.grad(o, leaves, dout.to(dtype))

    ref, ref_grads = per_sequence(torch.float32, True)
    low, low_grads = per_sequence(torch.bfloat16, False)
    _assert_fa3_rule(out, ref, low, "out")
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        _assert_fa3_rule(g, r, lo, name)
    empty = slice(cu_k[2], cu_k[3])
    assert (grads[1][empty] == 0).all() and (grads[2][empty] == 0).all()


# ---------------------------------------------------------------------------------------------
# layouts, the LSE, determinism
# ---------------------------------------------------------------------------------------------

def test_strided_inputs_and_gradients_give_the_same_results(device):
    """q, k, v as views of a fused QKV buffer and dout with a non-unit last stride or a zero
    stride (as autograd hands expanded gradients) give exactly the contiguous tensors' results."""
    b, s, h, d = 2, 113, 4, 64
    qkv = _randn(b, s, 3, h, d, device=device, seed=30)
    dense = _randn(b, s, h, 2 * d, device=device, seed=31)[..., ::2]   # last stride 2
    broadcast = _randn(b, s, 1, d, device=device, seed=32).expand(b, s, h, d)  # head stride 0
    for dout in (dense, broadcast):
        grads = []
        for views in (qkv.unbind(2), [x.contiguous() for x in qkv.unbind(2)]):
            leaves = [x.detach().requires_grad_() for x in views]
            out = fa.flash_attn_func(*leaves, causal=True, deterministic=True)
            grads.append((out,) + torch.autograd.grad(out, leaves, dout))
        for strided, contiguous in zip(*grads):
            assert torch.equal(strided, contiguous)


def test_lse_carries_no_gradient(device):
    q = _randn(1, 64, 2, 64, device=device, seed=40).requires_grad_()
    out, lse = fa.flash_attn_func(q, q, q, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError):
        lse.sum().backward()


@gpu
def test_deterministic_backward_repeats_bit_for_bit():
    b, s, h, hk, d = 2, 799, 8, 2, 128
    ins = [_randn(b, s, n, d, device="cuda", seed=50 + i) for i, n in enumerate((h, hk, hk))]
    dout = _randn(b, s, h, d, device="cuda", seed=53)
    runs = []
    for _ in range(2):
        leaves = _leaves(ins, torch.bfloat16)
        out = fa.flash_attn_func(*leaves, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, leaves, dout))
    for a, c in zip(*runs):
        assert torch.equal(a, c)


# ---------------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------------

class _Block(torch.nn.Module):
    """linear -> attention -> linear, with q, k, v split from one projection (strided views)."""

    def __init__(self, width, heads, head_dim, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = torch.nn.Linear(width, (heads + 2 * kv_heads) * head_dim)
        self.proj = torch.nn.Linear(heads * head_dim, width)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.heads + 2 * self.kv_heads, self.head_dim)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=2)
        out = fa.flash_attn_func(q, k, v, causal=True, deterministic=True)
        return self.proj(out.reshape(b, s, -1))


def _step(model, x):
    x = x.detach().requires_grad_()
    loss = model(x).float().square().mean()
    loss.backward()
    return [loss.detach(), x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_step_matches_eager(device, dynamic):
    """torch.compile(fullgraph=True) traces the step without a graph break (fullgraph raises on
    one), with our operators in the graph, and gives eager's loss and gradients.  The CPU run
    uses AOTAutograd without Inductor (its C++ builds would dominate the test)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block(256, 4, 64, 2).to(device=device, dtype=torch.bfloat16)
    compiled_model = copy.deepcopy(eager)
    x = _randn(2, 113, 256, device=device, seed=60)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return torch._dynamo.lookup_backend("inductor" if device == "cuda" else "aot_eager")(gm, example_inputs)

    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True, dynamic=dynamic)
    want = _step(eager, x)
    got = _step(compiled, x)
    assert any("numba_fa3" in t and "flash_attn_forward" in t for t in seen), seen
    for g, w in zip(got, want):
        scale = w.float().abs().max().item()
        assert (g.float() - w.float()).abs().max().item() <= 1e-2 * scale + 1e-5


def test_compiled_varlen_matches_eager(device):
    """flash_attn_varlen_func under torch.compile(fullgraph=True): cu_seqlens tensors and
    max_seqlen ints as operator arguments, the same output and gradients as eager."""
    torch._dynamo.reset()
    lens_q, lens_k = [113, 1, 64], [113, 40, 300]
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    ins = [_randn(sum(n), heads, 64, device=device, seed=70 + i)
           for i, (n, heads) in enumerate(((lens_q, 4), (lens_k, 2), (lens_k, 2)))]

    def loss(q, k, v):
        out = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                        deterministic=True)
        return out, out.float().square().sum()

    def step(fn):
        leaves = _leaves(ins, torch.bfloat16)
        out, value = fn(*leaves)
        value.backward()
        return [out] + [x.grad for x in leaves]

    backend = "inductor" if device == "cuda" else "aot_eager"
    want = step(loss)
    got = step(torch.compile(loss, backend=backend, fullgraph=True))
    for g, w in zip(got, want):
        scale = w.float().abs().max().item()
        assert (g.float() - w.float()).abs().max().item() <= 1e-2 * scale + 1e-5
