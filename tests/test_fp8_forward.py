"""The FP8 forward (`forward_fp8`, `api_fp8`).

Without a GPU: every FP8 specialization compiles clean with e4m3 GEMMs of the planned shapes
and P packed by e4m3 conversions; P's packing feeds V^T's permuted rows the right keys (a NumPy
model of the accumulator and fragment layouts); bad inputs raise before launch.

On a Hopper GPU: the kernel against `fp8_model.attention_fp8_model` (the same quantized inputs,
descales and P rounding; the GEMMs' own accumulation order differs) and against the exact
attention of the dequantized inputs, over odd shapes, GQA, causal with Sq != Sk, windows, every
descale layout; outputs poisoned first; LSE; runs bitwise identical; `precision="fp8"` end to
end within the model's error on outlier inputs.
"""
import dataclasses
import itertools

import ml_dtypes
import numpy as np
import pytest

import numba_fa3
from numba_fa3 import api_fp8, forward_fp8, fp8_layout, fp8_model, reference, tiles
from numba_fa3.api_fp8 import fp8_blocks
from numba_fa3.forward_fp8 import FlashForwardFP8
from numba_fa3.mask import MASK_CAUSAL, MASK_LOCAL, MASK_NONE
from numba_fa3.primitives import compile as kc
from numba_fa3.primitives.fragment import E4M3_FRAGMENT_SOURCES, E4M3_STEP_REGS
from numba_fa3.tiles import FP8_HEAD_DIMS, fp8_tiles_for
from test_ptx_compile import _assert_clean

gpu = pytest.mark.gpu
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
#: Relative accuracy of S from an e4m3 wgmma (its adder keeps fewer bits than float32).
WGMMA_E4M3_ACCURACY = 2.0**-11


# --- without a GPU ------------------------------------------------------------------------------
@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("head_dim,mask_kind,out_dtype",
                         list(itertools.product(FP8_HEAD_DIMS, [MASK_NONE, MASK_CAUSAL, MASK_LOCAL], ["bf16", "f16"])))
def test_fp8_specialization_compiles_clean(head_dim, mask_kind, out_dtype):
    kern = FlashForwardFP8(head_dim, mask_kind, out_dtype)
    ptx = kern.compile_ptx()
    # S: n = block_n over D / 32 k steps; P V: n = D over block_n / 32 (one loop copy per mask need)
    assert f"m64n{kern.block_n}k32.f32.e4m3.e4m3" in ptx
    assert f"m64n{head_dim}k32.f32.e4m3.e4m3" in ptx
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    _assert_clean(kc.ptxas_report(ptx), f"fp8 forward d{head_dim} mask {mask_kind} out {out_dtype}")


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("head_dim,mask_kind,softcap,varlen",
                         [(d, m, sc, vl) for d in FP8_HEAD_DIMS for m in (MASK_NONE, MASK_CAUSAL, MASK_LOCAL)
                          for sc, vl in ((True, False), (False, True), (True, True))])
def test_fp8_softcap_varlen_specializations_compile_clean(head_dim, mask_kind, softcap, varlen):
    """The soft-cap and varlen kernels (bf16 O: the output type changes only the epilogue's
    conversion) fit their registers too."""
    kern = FlashForwardFP8(head_dim, mask_kind, "bf16", softcap=softcap, varlen=varlen)
    _assert_clean(kc.ptxas_report(kern.compile_ptx()),
                  f"fp8 forward d{head_dim} mask {mask_kind} softcap {softcap} varlen {varlen}")


def _thread_columns(q):
    """(accumulator columns, in register order, of quad position q within a 32-column k step;
    the A fragment columns the packed registers stand for, in order)."""
    acc = [8 * (i // 4) + 2 * q + i % 2 for i in range(E4M3_STEP_REGS) if (i // 2) % 2 == 0]
    regs_first_row = [i for i in range(E4M3_STEP_REGS) if (i // 2) % 2 == 0]
    col = dict(zip(regs_first_row, acc))
    packed = [col[i] for src in E4M3_FRAGMENT_SOURCES for i in src if (i // 2) % 2 == 0]
    frag = [4 * q + j for j in range(4)] + [16 + 4 * q + j for j in range(4)]
    return packed, frag


def test_packed_p_meets_permuted_v():
    """The key each packed P byte carries is the key V^T's permuted row at that fragment column
    holds: P_packed @ V^T_permuted == P @ V over a k step."""
    sigma = fp8_layout.key_permutation()
    for q in range(4):
        packed, frag = _thread_columns(q)
        for key, col in zip(packed, frag):
            assert sigma[col] == key
    rng = np.random.default_rng(0)
    p, v = rng.normal(size=(8, 32)), rng.normal(size=(32, 16))
    assert np.allclose(p[:, sigma] @ v[sigma], p @ v)


def _codes(rng, shape, scale=64.0):
    return (rng.normal(size=shape) * scale).astype(E4M3)


def test_bad_inputs_raise_before_launch():
    rng = np.random.default_rng(1)
    q8, k8 = _codes(rng, (1, 64, 2, 128)), _codes(rng, (1, 64, 2, 128))
    with pytest.raises(TypeError):
        numba_fa3.flash_attn_fp8(q8.astype(np.float32), k8, k8)
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8(_codes(rng, (1, 64, 2, 96)), _codes(rng, (1, 64, 2, 96)), _codes(rng, (1, 64, 2, 96)))
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8(q8, _codes(rng, (1, 64, 3, 128)), _codes(rng, (1, 64, 3, 128)))
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8(q8, k8, k8, out_dtype="f32")
    with pytest.raises(ValueError):
        numba_fa3.flash_attn(q8, k8, k8, precision="fp4")
    for name in ("q_descale", "k_descale", "v_descale"):
        with pytest.raises(ValueError, match=name):   # a shape of neither layout
            numba_fa3.flash_attn_fp8(q8, k8, k8, **{name: np.ones((1, 2, 7), np.float32)})
        with pytest.raises(ValueError, match=name):   # not positive
            numba_fa3.flash_attn_fp8(q8, k8, k8, **{name: np.zeros((1, 2), np.float32)})
    # varlen: packed 3-D inputs, cu_seqlens that fit them
    p8 = _codes(rng, (64, 2, 128))
    cu = np.array([0, 30, 64], np.int32)
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8_varlen(q8, k8, k8, cu, cu, 34, 34)
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8_varlen(p8, p8, p8, np.array([0, 30, 65], np.int32), cu, 35, 34)
    with pytest.raises(ValueError):
        numba_fa3.flash_attn_fp8_varlen(p8, p8, p8, cu, cu, 20, 34)   # max_seqlen_q too small


# --- on the GPU -----------------------------------------------------------------------------------
def _descales(rng, kind, b, h, hk, sq, sk, d, causal):
    bm, bn = fp8_blocks(d, causal)
    mq, nk = -(-sq // bm), -(-sk // bn)
    pos = lambda *shape: rng.uniform(0.5, 2.0, size=shape).astype(np.float32) / 64
    if kind == "none":
        return None, None, None
    if kind == "tensor":
        return 1 / 64, 1 / 50, 1 / 80
    if kind == "head":
        return pos(b, h), pos(b, hk), pos(b, hk)
    if kind == "kv_head":
        return pos(b, hk), pos(b, hk), pos(b, hk)
    return pos(b, h, mq), pos(b, hk, nk), pos(b, hk, nk)


def _dequant(x8, descale, block):
    """float64 values of e4m3 codes times their descales (`_descales`' layouts: None, a number,
    [B, heads] or [B, heads, blocks of `block` rows], heads dividing x8's)."""
    x = x8.astype(np.float64)
    b, s, h = x.shape[:3]
    if descale is None:
        return x
    d = np.asarray(descale, dtype=np.float64)
    if d.ndim == 0:
        return x * float(d)
    if d.ndim == 3:
        d = np.repeat(d, block, axis=2)[:, :, :s]                       # [B, heads, S]
    else:
        d = np.repeat(d[:, :, None], s, axis=2)
    d = np.repeat(d, h // d.shape[1], axis=1).transpose(0, 2, 1)        # [B, S, H]
    return x * d[..., None]


def _model_descales(qd, kd, vd, b, h, hk):
    one = np.float32(1)
    def full(x, lead):
        if x is None:
            return np.full(lead, one)
        if np.ndim(x) == 0:
            return np.full(lead, np.float32(x))
        return np.asarray(x, dtype=np.float32)
    return full(qd, (b, h)), full(kd, (b, hk)), full(vd, (b, hk))


CASES = [  # (batch, seqlen_q, seqlen_k, heads, kv_heads, head_dim, causal, descales)
    (1, 128, 128, 2, 2, 128, False, "block"),
    (2, 300, 517, 4, 2, 128, False, "block"),
    (1, 517, 300, 2, 1, 128, True, "block"),
    (1, 1000, 700, 2, 2, 256, False, "block"),
    (2, 700, 1000, 2, 1, 256, True, "head"),
    (1, 1, 1, 1, 1, 128, False, "tensor"),
    (1, 33, 1500, 3, 1, 256, True, "kv_head"),
    (3, 257, 129, 2, 2, 128, True, "none"),
    (2, 333, 611, 4, 1, 64, False, "block"),
    (1, 611, 333, 2, 2, 64, True, "kv_head"),
]


@gpu
@pytest.mark.parametrize("case", CASES)
def test_fp8_forward_matches_model(case):
    _check_against_model(case)


#: Key blocks that are not whole 128-key chunks (FA3's FP8 tile at D = 128 is 128 x 224): V^T's
#: last box runs past the block, and those keys must never reach O.
KEY_BLOCKS = [192, 224]


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("block_n", KEY_BLOCKS)
@pytest.mark.parametrize("mask_kind,varlen", [(MASK_NONE, False), (MASK_CAUSAL, False), (MASK_NONE, True)])
def test_fp8_key_blocks_past_a_chunk_compile_clean(block_n, mask_kind, varlen):
    masked = mask_kind != MASK_NONE
    kern = FlashForwardFP8(128, mask_kind, "bf16", tiles=dataclasses.replace(fp8_tiles_for(128, masked),
                                                                              block_n=block_n), varlen=varlen)
    ptx = kern.compile_ptx()
    assert f"m64n{block_n}k32.f32.e4m3.e4m3" in ptx and "m64n128k32.f32.e4m3.e4m3" in ptx
    assert kern.v_stage == 2 * 128 * 128   # two 128-key chunks of V^T's 128 rows
    _assert_clean(kc.ptxas_report(ptx), f"fp8 forward d128 block_n {block_n} mask {mask_kind} varlen {varlen}")


def test_fp8_key_blocks_are_whole_k_steps():
    with pytest.raises(ValueError, match="whole 32-key steps"):
        FlashForwardFP8(128, MASK_NONE, tiles=dataclasses.replace(fp8_tiles_for(128), block_n=176))


@gpu
@pytest.mark.parametrize("block_n", KEY_BLOCKS)
@pytest.mark.parametrize("case", [(2, 300, 517, 4, 2, 128, False, "block"), (1, 517, 300, 2, 1, 128, True, "block"),
                                  (1, 1000, 700, 2, 2, 128, True, "kv_head")])
def test_fp8_key_blocks_past_a_chunk_match_model(block_n, case, monkeypatch):
    """The tile table's key block changed (and the model's blocks with it, `fp8_blocks`)."""
    key = (128, case[6])
    monkeypatch.setitem(tiles.FP8_TILES, key, dataclasses.replace(tiles.FP8_TILES[key], block_n=block_n))
    forward_fp8.forward_fp8_kernel.cache_clear()
    try:
        assert fp8_blocks(128, case[6])[1] == block_n
        _check_against_model(case)
    finally:
        forward_fp8.forward_fp8_kernel.cache_clear()


def _check_against_model(case):
    b, sq, sk, h, hk, d, causal, kind = case
    rng = np.random.default_rng(hash(case) % 2**32)
    # (without descales the codes are the values: keep the scores O(1), as a quantizer would)
    scale = 2.0 if kind == "none" else 64.0
    q8, k8, v8 = (_codes(rng, shape, scale) for shape in ((b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)))
    qd, kd, vd = _descales(rng, kind, b, h, hk, sq, sk, d, causal)
    out, lse = numba_fa3.flash_attn_fp8(q8, k8, v8, qd, kd, vd, causal=causal, return_lse=True)
    bm, bn = fp8_blocks(d, causal)
    mqd, mkd, mvd = _model_descales(qd, kd, vd, b, h, hk)
    want, want_lse = fp8_model.attention_fp8_model(q8, k8, v8, mqd, mkd, mvd, causal=causal, block_m=bm,
                                                   block_n=bn, return_lse=True)
    got = out.astype(np.float64)
    want = want.astype(np.float64)
    exact = reference.attention_reference(_dequant(q8, qd, bm), _dequant(k8, kd, bn), _dequant(v8, vd, bn),
                                          causal=causal)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    scale = max(rms(exact), 1e-30)
    model_err, kernel_err, apart = rms(want - exact) / scale, rms(got - exact) / scale, rms(got - want) / scale
    assert np.isfinite(got).all()
    # The kernel is the model up to S: Hopper's e4m3 wgmma adds its products with fewer mantissa
    # bits than float32 (S within about 2^-11 of the exactly rounded S the model takes, relative
    # to the row's magnitudes), so the LSE differs at that level and P's codes flip where S c
    # lies near an e4m3 rounding boundary: the kernel stays within 0.75 of the model's own error
    # of the model, and no further from the exact result than 1.25 times the model.
    assert apart <= 0.75 * model_err + 2e-3, (apart, model_err)
    assert kernel_err <= 1.25 * model_err + 2e-3, (kernel_err, model_err)
    assert np.max(np.abs(got - want)) <= 0.05 * np.max(np.abs(want)) + 1e-6
    seen = np.isfinite(want_lse)
    assert np.array_equal(np.isfinite(lse), seen)
    assert np.allclose(lse[seen], want_lse[seen], atol=2e-3, rtol=WGMMA_E4M3_ACCURACY)
    assert np.all(got[~np.isfinite(want_lse).transpose(0, 2, 1)] == 0)


@gpu
@pytest.mark.parametrize("d,window", [(128, (100, 30)), (256, (37, 0)), (64, (0, 200))])
def test_fp8_forward_window(d, window):
    import torch
    rng = np.random.default_rng(d)
    b, sq, sk, h, hk = 2, 400, 450, 2, 1
    q8, k8, v8 = _codes(rng, (b, sq, h, d)), _codes(rng, (b, sk, hk, d)), _codes(rng, (b, sk, hk, d))
    t = lambda x: torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    out = torch.full((b, sq, h, d), float("nan"), dtype=torch.bfloat16, device="cuda")   # poisoned
    numba_fa3.flash_attn_fp8(t(q8), t(k8), t(v8), 1 / 64, 1 / 64, 1 / 64, window_size=window, out=out)
    got = out.float().cpu().numpy()
    exact = reference.attention_reference(q8.astype(np.float64) / 64, k8.astype(np.float64) / 64,
                                          v8.astype(np.float64) / 64, window_size=window)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    assert np.isfinite(got).all()
    assert rms(got - exact) <= 0.05 * rms(exact)


@gpu
@pytest.mark.parametrize("d,causal,softcap", [(128, False, 4.0), (64, True, 2.5), (256, False, 5.0)])
def test_fp8_forward_softcap(d, causal, softcap):
    """The soft-cap on the dequantized scores (block descales enter tanh's argument, not the
    exponent): against the exact soft-capped attention of the dequantized inputs, output poisoned;
    a cap far above the scores gives the uncapped kernel's output."""
    import torch
    rng = np.random.default_rng(d + int(softcap))
    b, sq, sk, h, hk = 2, 333, 517, 4, 2
    q8, k8, v8 = _codes(rng, (b, sq, h, d)), _codes(rng, (b, sk, hk, d)), _codes(rng, (b, sk, hk, d))
    qd, kd, vd = _descales(rng, "block", b, h, hk, sq, sk, d, causal)
    # scores of several units, so that a cap of a few units bends them
    qd, kd = qd * 3, kd * 3
    t = lambda x: torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    c = lambda x: torch.from_numpy(np.ascontiguousarray(x)).cuda()
    out = torch.full((b, sq, h, d), float("nan"), dtype=torch.bfloat16, device="cuda")   # poisoned
    numba_fa3.flash_attn_fp8(t(q8), t(k8), t(v8), c(qd), c(kd), c(vd), causal=causal, softcap=softcap, out=out)
    got = out.float().cpu().numpy()
    bm, bn = fp8_blocks(d, causal)
    qf, kf, vf = _dequant(q8, qd, bm), _dequant(k8, kd, bn), _dequant(v8, vd, bn)
    exact = reference.attention_reference(qf, kf, vf, causal=causal, softcap=softcap)
    uncapped = reference.attention_reference(qf, kf, vf, causal=causal)
    rms = lambda x: float(np.sqrt(np.mean(np.square(x))))
    assert np.isfinite(got).all()
    assert rms(got - exact) <= 0.05 * rms(exact)
    assert rms(exact - uncapped) > 4 * rms(got - exact)   # the cap mattered
    far = numba_fa3.flash_attn_fp8(t(q8), t(k8), t(v8), c(qd), c(kd), c(vd), causal=causal, softcap=1e6)
    plain = numba_fa3.flash_attn_fp8(t(q8), t(k8), t(v8), c(qd), c(kd), c(vd), causal=causal)
    # (tanh.approx's relative error moves the scores slightly)
    assert rms((far.float() - plain.float()).cpu().numpy()) <= 0.02 * rms(uncapped)


@gpu
@pytest.mark.parametrize("d,causal,window,block_descales", [(128, False, (-1, -1), False), (64, True, (-1, -1), True),
                                                            (256, False, (100, 20), False)])
def test_fp8_varlen_matches_dense(d, causal, window, block_descales):
    """Each packed sequence's rows are the dense kernel's on that sequence alone, bit for bit
    (empty and 1-token sequences, Sq != Sk, key sequences without queries and the reverse,
    descales per (sequence, head) or per block), output poisoned."""
    import torch
    rng = np.random.default_rng(d + causal)
    lens_q, lens_k = [300, 0, 1, 129, 77, 5], [280, 5, 1, 0, 300, 1]
    h, hk = 4, 2
    cuq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cuk = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    n = len(lens_q)
    t = lambda x: torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    c = lambda x: torch.from_numpy(np.ascontiguousarray(x)).cuda()
    q8, k8, v8 = _codes(rng, (int(cuq[-1]), h, d)), _codes(rng, (int(cuk[-1]), hk, d)), _codes(rng, (int(cuk[-1]), hk, d))
    bm, bn = fp8_blocks(d, causal, window)
    pos = lambda *shape: rng.uniform(0.5, 2.0, size=shape).astype(np.float32) / 64
    if block_descales:
        nk = -(-max(lens_k) // bn)
        qd, kd, vd = pos(n, h, -(-max(lens_q) // bm)), pos(n, hk, nk), pos(n, hk, nk)
    else:
        qd, kd, vd = pos(n, h), pos(n, hk), pos(n, hk)
    out = torch.full((int(cuq[-1]), h, d), float("nan"), dtype=torch.bfloat16, device="cuda")   # poisoned
    _, lse = numba_fa3.flash_attn_fp8_varlen(t(q8), t(k8), t(v8), c(cuq), c(cuk), max(lens_q), max(lens_k),
                                              c(qd), c(kd), c(vd), causal=causal, window_size=window,
                                              return_lse=True, out=out)
    for i in range(n):
        rows, keys = slice(cuq[i], cuq[i + 1]), slice(cuk[i], cuk[i + 1])
        if not lens_q[i]:
            continue
        if not lens_k[i]:
            assert torch.all(out[rows] == 0) and torch.all(lse[:, rows] == -float("inf"))
            continue
        qs = qd[i:i + 1, :, :-(-lens_q[i] // bm)] if block_descales else qd[i:i + 1]
        ks = kd[i:i + 1, :, :-(-lens_k[i] // bn)] if block_descales else kd[i:i + 1]
        vs = vd[i:i + 1, :, :-(-lens_k[i] // bn)] if block_descales else vd[i:i + 1]
        want, want_lse = numba_fa3.flash_attn_fp8(t(q8[None, rows]), t(k8[None, keys]), t(v8[None, keys]), c(qs),
                                                  c(ks), c(vs), causal=causal, window_size=window,
                                                  return_lse=True)
        assert torch.equal(out[rows].view(torch.int16), want[0].view(torch.int16)), i
        assert torch.equal(lse[:, rows], want_lse[0]), i
    # NumPy inputs: the same values, copied back
    got = numba_fa3.flash_attn_fp8_varlen(q8, k8, v8, cuq, cuk, max(lens_q), max(lens_k), qd, kd, vd,
                                          causal=causal, window_size=window)
    assert np.array_equal(got.view(np.uint16), out.view(torch.int16).cpu().numpy().view(np.uint16))


@gpu
@pytest.mark.parametrize("d,causal", [(128, True), (64, False)])
def test_precision_fp8_varlen_is_each_sequence(d, causal):
    """flash_attn_varlen(precision="fp8"): each sequence's rows are flash_attn(precision="fp8")'s
    of that sequence alone, bit for bit (the quantizer's blocks start at each sequence)."""
    import torch
    torch.manual_seed(d)
    lens_q, lens_k = [257, 1, 0, 100], [300, 1, 7, 64]
    cuq = torch.tensor(np.concatenate([[0], np.cumsum(lens_q)]), dtype=torch.int32, device="cuda")
    cuk = torch.tensor(np.concatenate([[0], np.cumsum(lens_k)]), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(lens_q), 4, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(sum(lens_k), 2, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = numba_fa3.flash_attn_varlen(q, k, v, cuq, cuk, max(lens_q), max(lens_k), causal=causal, precision="fp8")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    for i in range(len(lens_q)):
        rows = slice(int(cuq[i]), int(cuq[i + 1]))
        keys = slice(int(cuk[i]), int(cuk[i + 1]))
        if not lens_q[i]:
            continue
        want = numba_fa3.flash_attn(q[None, rows], k[None, keys], v[None, keys], causal=causal, precision="fp8")
        assert torch.equal(out[rows].view(torch.int16), want[0].view(torch.int16)), i


@gpu
def test_fp8_forward_deterministic():
    import torch
    rng = np.random.default_rng(5)
    b, s, h, d = 2, 1024, 4, 256
    t = lambda x: torch.from_numpy(x.view(np.uint8)).cuda().view(torch.float8_e4m3fn)
    q8, k8, v8 = (t(_codes(rng, (b, s, h, d))) for _ in range(3))
    first = numba_fa3.flash_attn_fp8(q8, k8, v8, causal=True)
    second = numba_fa3.flash_attn_fp8(q8, k8, v8, causal=True)
    assert torch.equal(first.view(torch.int16), second.view(torch.int16))


@gpu
@pytest.mark.parametrize("d,causal", [(128, False), (256, True), (64, True)])
def test_precision_fp8_end_to_end(d, causal):
    """flash_attn(precision="fp8") on outlier inputs (FA3 Table 3's): the error of the fp64
    attention of the bf16 inputs within the model's (rotation, block scales) plus a margin."""
    import torch
    q, k, v = (x.astype(ml_dtypes.bfloat16).astype(np.float64) for x in fp8_model.outlier_inputs(1, 1024, 4, d, seed=7))
    want = reference.attention_reference(q, k, v, causal=causal)
    t = lambda x: torch.from_numpy(x.astype(np.float32)).cuda().to(torch.bfloat16)
    got = numba_fa3.flash_attn(t(q), t(k), t(v), causal=causal, precision="fp8").float().cpu().numpy()
    bm, bn = fp8_blocks(d, causal)
    q8, k8, v8, qd, kd, vd = fp8_model.quantize_fp8_model(q, k, v, hadamard=True, block_m=bm, block_n=bn,
                                                          v_granularity=api_fp8.V_GRANULARITY)
    model = fp8_model.attention_fp8_model(q8, k8, v8, qd, kd, vd, causal=causal, block_m=bm, block_n=bn)
    rmse = lambda x: float(np.sqrt(np.mean(np.square(x))))
    assert rmse(got - want) <= 1.25 * rmse(model.astype(np.float64) - want) + 1e-3


@pytest.mark.parametrize("head_dim", FP8_HEAD_DIMS)
def test_varlen_tensor_maps_pass_the_driver_checks(head_dim):
    """The packed varlen call's four maps, the transposed V as a batch of one included, meet the
    driver's rules (`tma_desc.check_tiled`: no zero stride, even of a dimension of one), on the
    CPU with made-up addresses."""
    from numba_fa3 import api
    from numba_fa3.primitives import tensors
    from numba_fa3.primitives.tma_desc import check_tiled
    tq, h, hk, keys = 300, 4, 2, 1024   # (the packed V^T's keys: each sequence padded, fp8_layout)

    def info(shape, dtype, ptr):
        strides = tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
        return tensors.TensorInfo(ptr, shape, strides, dtype, "cai", None)
    q, k = info((tq, h, head_dim), "e4m3", 1 << 20), info((keys, hk, head_dim), "e4m3", 2 << 20)
    o, vt = info((tq, h, head_dim), "bf16", 3 << 20), info((hk, head_dim, keys), "e4m3", 4 << 20)
    kern = FlashForwardFP8(head_dim, MASK_NONE, "bf16", varlen=True)
    specs = kern.tensor_maps(*(api._as_batch_of_one(x) for x in (q, k, vt, o)))
    for dtype, ptr, dims, strides, box in specs:
        check_tiled(dtype, dims, strides, box, ptr)
