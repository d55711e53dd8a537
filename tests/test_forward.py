"""The forward kernel against the NumPy reference, with FA3's tolerance rule: the kernel's max
error vs an fp64 reference is at most 2x the error of the same computation done in the input
precision (`attention_lowprec`), plus a small absolute term.  Outputs are NaN-poisoned first."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numba_fa3 import flash_attn
from numba_fa3.reference import attention_lowprec, attention_reference
from numba_fa3.tiles import SUPPORTED_HEAD_DIMS
from primitives.tensors import NUMPY_DTYPES

gpu = pytest.mark.gpu
LENGTHS = [1, 17, 64, 113, 128, 129, 255, 799, 1023, 2049]


def _qkv(rng, b, sq, sk, h, hk, d, dtype):
    npdt = NUMPY_DTYPES[dtype]
    return (rng.standard_normal((b, sq, h, d)).astype(npdt), rng.standard_normal((b, sk, hk, d)).astype(npdt),
            rng.standard_normal((b, sk, hk, d)).astype(npdt))


def _check(q, k, v, out, lse, causal, window, dtype):
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, return_lse=True)
    low = attention_lowprec(q, k, v, causal=causal, window_size=window,
                            storage_dtype=NUMPY_DTYPES[dtype]).astype(np.float64)
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), "NaN/inf in the output (unwritten or bad masking)"
    err, low_err = np.abs(out - ref).max(), np.abs(low - ref).max()
    assert err <= 2 * low_err + 1e-3, f"max err {err:.3g} vs low-precision reference {low_err:.3g}"
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), "LSE -inf pattern differs"
    assert np.abs(lse[finite] - ref_lse[finite]).max() <= 1e-3 * (1 + np.abs(ref_lse[finite]).max())
    assert (out[~finite.transpose(0, 2, 1)] == 0).all(), "fully masked rows must be 0"


@gpu
@settings(max_examples=40, deadline=None)
@given(sq=st.sampled_from(LENGTHS), sk=st.sampled_from(LENGTHS), d=st.sampled_from(SUPPORTED_HEAD_DIMS),
       b=st.integers(1, 2), hk=st.integers(1, 2), ratio=st.sampled_from([1, 2, 3]),
       mask=st.sampled_from(["none", "causal", "local"]), dtype=st.sampled_from(["bf16", "f16"]),
       seed=st.integers(0, 2 ** 31))
def test_forward_matches_reference(sq, sk, d, b, hk, ratio, mask, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, b, sq, sk, hk * ratio, hk, d, dtype)
    causal = mask == "causal"
    window = (int(rng.integers(0, 300)), int(rng.integers(0, 300))) if mask == "local" else (-1, -1)
    out, lse = flash_attn(q, k, v, causal=causal, window_size=window, return_lse=True)
    _check(q, k, v, out, lse, causal, window, dtype)


@gpu
def test_forward_torch_poisoned_and_deterministic():
    torch = pytest.importorskip("torch")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 1500, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 1500, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = torch.full_like(q, float("nan"))
    flash_attn(q, k, v, causal=True, out=out)
    again = flash_attn(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert torch.equal(out, again)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.repeat_interleave(4, 2).transpose(1, 2).float(),
        v.repeat_interleave(4, 2).transpose(1, 2).float(), is_causal=False,
        attn_mask=torch.ones(1000, 1500, device="cuda", dtype=torch.bool).tril(500)).transpose(1, 2)
    assert (out.float() - ref).abs().max().item() < 2e-2


def test_bad_inputs_raise():
    bf = NUMPY_DTYPES["bf16"]
    q = np.ones((1, 8, 2, 64), bf)
    with pytest.raises(ValueError, match="divide"):
        flash_attn(np.ones((1, 8, 3, 64), bf), np.ones((1, 8, 2, 64), bf), np.ones((1, 8, 2, 64), bf))
    with pytest.raises(ValueError, match="head dim"):
        flash_attn(np.ones((1, 8, 2, 40), bf), np.ones((1, 8, 2, 40), bf), np.ones((1, 8, 2, 40), bf))
    with pytest.raises(TypeError, match="bf16"):
        flash_attn(q.astype(np.float32), q, q)
    with pytest.raises(ValueError, match=r"\[batch, seqlen"):
        flash_attn(q[0], q, q)
    with pytest.raises(NotImplementedError, match="softcap"):
        flash_attn(q, q, q, softcap=30.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn(q, q, q, softmax_scale=-1.0)
