"""The worked-example GEMM: correct against NumPy on random (ragged) shapes, every output written,
clear errors before launch."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numba_fa3.primitives import gemm
from numba_fa3.primitives.tensors import NUMPY_DTYPES

gpu = pytest.mark.gpu


def _inputs(rng, m, n, k, dtype, transpose_b):
    npdt = NUMPY_DTYPES[dtype]
    a = rng.standard_normal((m, k)).astype(npdt)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(npdt)
    ref = a.astype(np.float64) @ (b.astype(np.float64).T if transpose_b else b.astype(np.float64))
    return a, b, ref


def _check(out, ref, out_dtype, k):
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    # fp32 accumulation over k terms, then rounding to the output type.
    eps = {"f32": 2.0 ** -23 * np.sqrt(k) * 4, "bf16": 2.0 ** -8, "f16": 2.0 ** -11}[out_dtype]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err <= 2 * eps + 1e-6, f"max error {err:.3g} relative to max|ref| (bound {2 * eps:.3g})"


@gpu
@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 700), n=st.integers(1, 700), k8=st.integers(1, 90),
       dtype=st.sampled_from(["bf16", "f16"]), out_dtype=st.sampled_from(["same", "f32"]),
       transpose_b=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_matmul_numpy_random_shapes(m, n, k8, dtype, out_dtype, transpose_b, seed):
    k = 8 * k8
    if not transpose_b:
        n = max(8, n // 8 * 8)  # B rows must be 16-byte multiples for TMA
    out_dtype = dtype if out_dtype == "same" else out_dtype
    a, b, ref = _inputs(np.random.default_rng(seed), m, n, k, dtype, transpose_b)
    out = gemm.matmul(a, b, transpose_b=transpose_b, out_dtype=out_dtype)
    assert out.shape == (m, n) and out.dtype == NUMPY_DTYPES[out_dtype]
    _check(out, ref, out_dtype, k)


@gpu
@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("out_dtype", ["bf16", "f32"])
def test_matmul_torch_in_place_poisoned(transpose_b, out_dtype):
    torch = pytest.importorskip("torch")
    m, n, k = 1000, 1304, 1048
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(*((n, k) if transpose_b else (k, n)), device="cuda", dtype=torch.bfloat16, generator=g)
    tdt = {"bf16": torch.bfloat16, "f32": torch.float32}[out_dtype]
    out = torch.full((m, n), float("nan"), device="cuda", dtype=tdt)
    res = gemm.matmul(a, b, out=out, transpose_b=transpose_b)
    assert res is out
    ref = a.double() @ (b.double().T if transpose_b else b.double())
    _check(out.double().cpu().numpy(), ref.cpu().numpy(), out_dtype, k)


@gpu
def test_matmul_strided_rows_no_copy():
    torch = pytest.importorskip("torch")
    big = torch.randn(512, 1024, device="cuda", dtype=torch.float16)
    a = big[:, :512]        # row stride 1024: used in place
    b = big[:256, 512:]
    out = gemm.matmul(a, b)
    ref = a.double() @ b.double().T
    _check(out.double().cpu().numpy(), ref.cpu().numpy(), "f16", 512)


@gpu
def test_matmul_deterministic():
    rng = np.random.default_rng(1)
    a, b, _ = _inputs(rng, 777, 515, 264, "bf16", True)
    x = gemm.matmul(a, b)
    y = gemm.matmul(a, b)
    assert np.array_equal(x.view(np.uint16), y.view(np.uint16))


def test_bad_inputs_raise_before_launch():
    f32 = np.zeros((8, 8), np.float32) + 1
    bf = np.ones((8, 8), NUMPY_DTYPES["bf16"])
    with pytest.raises(TypeError, match="bf16 or both fp16"):
        gemm.matmul(f32, f32)
    with pytest.raises(TypeError, match="bf16 or both fp16"):
        gemm.matmul(bf, np.ones((8, 8), np.float16))
    with pytest.raises(ValueError, match="inner dimensions"):
        gemm.matmul(bf, np.ones((8, 16), NUMPY_DTYPES["bf16"]))
    with pytest.raises(ValueError, match="2-D"):
        gemm.matmul(bf[None], bf)
    with pytest.raises(TypeError, match="NumPy array"):
        gemm.matmul([[1.0]], bf)
    with pytest.raises(ValueError, match="out_dtype"):
        gemm.matmul(bf, bf, out_dtype="f64")
