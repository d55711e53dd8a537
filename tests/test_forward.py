"""The forward kernel against the NumPy reference, with FA3's tolerance rule: the kernel's max
error vs an fp64 reference is at most 2x the error of the same computation done in the input
precision (`attention_lowprec`), plus a small absolute term.

GPU inputs go in as torch CUDA tensors with `out` NaN-poisoned, so every element must be written;
each case runs twice and must give the same bits.  `EDGE_CASES` is a fixed list small enough to
run under compute-sanitizer (see README)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numba_fa3 import flash_attn, flash_attn_varlen
from numba_fa3.reference import attention_lowprec, attention_reference, attention_reference_varlen
from numba_fa3.tiles import LONG_QUERIES, SUPPORTED_HEAD_DIMS, has_long_tiles
from numba_fa3.primitives.tensors import NUMPY_DTYPES

gpu = pytest.mark.gpu
LENGTHS = [1, 17, 64, 113, 128, 129, 255, 799, 1023, 2049]
VARLEN_LENGTHS = [0, 1, 2, 17, 80, 113, 128, 129, 300]


def _torch():
    return pytest.importorskip("torch")


def _to_torch(a):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).cuda()
    return t.view(torch.bfloat16 if a.dtype == NUMPY_DTYPES["bf16"] else torch.float16)


def _to_numpy(t, dtype):
    return t.view(_torch().int16).cpu().numpy().view(NUMPY_DTYPES[dtype])


def _window(rng, mask):
    return (int(rng.integers(0, 300)), int(rng.integers(0, 300))) if mask == "local" else (-1, -1)


def _check(out, lse, ref, ref_lse, low):
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), "NaN/inf in the output (unwritten or bad masking)"
    err, low_err = np.abs(out - ref).max(initial=0), np.abs(low - ref).max(initial=0)
    assert err <= 2 * low_err + 1e-3, f"max err {err:.3g} vs low-precision reference {low_err:.3g}"
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), finite), "LSE -inf pattern differs"
    if finite.any():
        assert np.abs(lse[finite] - ref_lse[finite]).max() <= 1e-3 * (1 + np.abs(ref_lse[finite]).max())


def run_dense(rng, b, sq, sk, h, hk, d, dtype, mask, softcap):
    npdt = NUMPY_DTYPES[dtype]
    q = rng.standard_normal((b, sq, h, d)).astype(npdt)
    k = rng.standard_normal((b, sk, hk, d)).astype(npdt)
    v = rng.standard_normal((b, sk, hk, d)).astype(npdt)
    causal, window = mask == "causal", _window(rng, mask)
    tq, tk, tv = _to_torch(q), _to_torch(k), _to_torch(v)
    out = _torch().full_like(tq, float("nan"))
    _, lse = flash_attn(tq, tk, tv, causal=causal, window_size=window, softcap=softcap, return_lse=True, out=out)
    again = flash_attn(tq, tk, tv, causal=causal, window_size=window, softcap=softcap)
    assert _torch().equal(out, again), "two runs on the same inputs differ"
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, softcap=softcap, return_lse=True)
    low = attention_lowprec(q, k, v, causal=causal, window_size=window, softcap=softcap,
                            storage_dtype=npdt).astype(np.float64)
    lse = lse.cpu().numpy()
    _check(_to_numpy(out, dtype), lse, ref, ref_lse, low)
    # Rows that see no key: output 0, LSE -inf.
    assert (np.asarray(_to_numpy(out, dtype), np.float64)[~np.isfinite(ref_lse).transpose(0, 2, 1)] == 0).all()


def run_varlen(rng, lens_q, lens_k, h, hk, d, dtype, mask, softcap):
    npdt = NUMPY_DTYPES[dtype]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, d)).astype(npdt)
    k = rng.standard_normal((cu_k[-1], hk, d)).astype(npdt)
    v = rng.standard_normal((cu_k[-1], hk, d)).astype(npdt)
    causal, window = mask == "causal", _window(rng, mask)
    torch = _torch()
    tq, tk, tv = _to_torch(q), _to_torch(k), _to_torch(v)
    out = torch.full_like(tq, float("nan"))
    cq, ck = torch.from_numpy(cu_q).cuda(), torch.from_numpy(cu_k).cuda()
    mq, mk = max(lens_q, default=0), max(lens_k, default=0)
    _, lse = flash_attn_varlen(tq, tk, tv, cq, ck, mq, mk, causal=causal, window_size=window, softcap=softcap,
                               return_lse=True, out=out)
    ref, ref_lse = attention_reference_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=window,
                                              softcap=softcap, return_lse=True)
    low = np.zeros_like(ref)
    for i in range(len(lens_q)):
        if lens_q[i]:
            sl, kl = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            low[sl] = attention_lowprec(q[None, sl], k[None, kl], v[None, kl], causal=causal, window_size=window,
                                        softcap=softcap, storage_dtype=npdt)[0]
    _check(_to_numpy(out, dtype), lse.cpu().numpy(), ref, ref_lse, low)


@gpu
@settings(max_examples=40, deadline=None)
@given(sq=st.sampled_from(LENGTHS), sk=st.sampled_from(LENGTHS), d=st.sampled_from(SUPPORTED_HEAD_DIMS),
       b=st.integers(1, 2), hk=st.integers(1, 2), ratio=st.sampled_from([1, 2, 3]),
       mask=st.sampled_from(["none", "causal", "local"]), dtype=st.sampled_from(["bf16", "f16"]),
       softcap=st.sampled_from([0.0, 0.0, 15.0]), seed=st.integers(0, 2 ** 31))
def test_forward_matches_reference(sq, sk, d, b, hk, ratio, mask, dtype, softcap, seed):
    run_dense(np.random.default_rng(seed), b, sq, sk, hk * ratio, hk, d, dtype, mask, softcap)


@gpu
@settings(max_examples=25, deadline=None)
@given(lens=st.lists(st.tuples(st.sampled_from(VARLEN_LENGTHS), st.sampled_from(VARLEN_LENGTHS)),
                     min_size=1, max_size=4),
       d=st.sampled_from(SUPPORTED_HEAD_DIMS), hk=st.integers(1, 2), ratio=st.sampled_from([1, 3]),
       mask=st.sampled_from(["none", "causal", "local"]), softcap=st.sampled_from([0.0, 15.0]),
       seed=st.integers(0, 2 ** 31))
def test_varlen_matches_reference(lens, d, hk, ratio, mask, softcap, seed):
    lens_q, lens_k = [a for a, _ in lens], [c for _, c in lens]
    if sum(lens_q) == 0:
        lens_q[0] = 1
    run_varlen(np.random.default_rng(seed), lens_q, lens_k, hk * ratio, hk, d, "bf16", mask, softcap)


#: Fixed, small cases: every head dim, the masks, softcap, GQA, ragged lengths, Sq != Sk, varlen
#: with empty sequences.  Also the compute-sanitizer subset (`-k edge`).
EDGE_CASES = [
    ("dense", 1, 1, 1, 2, 1, 64, "none", 0.0),
    ("dense", 2, 129, 113, 4, 2, 96, "causal", 0.0),
    ("dense", 1, 200, 300, 3, 1, 128, "local", 0.0),
    ("dense", 1, 255, 17, 2, 2, 192, "causal", 30.0),
    ("dense", 2, 300, 300, 2, 1, 256, "none", 0.0),
    ("varlen", [0, 1, 129, 70], [5, 0, 200, 70], 4, 2, 128, "causal", 0.0),
    ("varlen", [33, 250], [300, 1], 2, 2, 256, "local", 20.0),
    ("varlen", [17, 0, 64], [17, 17, 64], 3, 1, 64, "none", 0.0),
]


@gpu
@pytest.mark.parametrize("case", EDGE_CASES, ids=lambda c: "-".join(str(x) for x in c))
def test_forward_edge(case):
    rng = np.random.default_rng(7)
    if case[0] == "dense":
        _, b, sq, sk, h, hk, d, mask, softcap = case
        run_dense(rng, b, sq, sk, h, hk, d, "bf16", mask, softcap)
    else:
        _, lq, lk, h, hk, d, mask, softcap = case
        run_varlen(rng, lq, lk, h, hk, d, "f16", mask, softcap)


@gpu
@pytest.mark.parametrize("mask,sq,sk", [("causal", LONG_QUERIES + 3, LONG_QUERIES + 3),
                                        ("causal", LONG_QUERIES, LONG_QUERIES + 900),
                                        ("local", LONG_QUERIES + 4, LONG_QUERIES - 50)])
def test_forward_long_queries(mask, sq, sk):
    """Dense runs from LONG_QUERIES query rows take tiles.LONG_TILES' kernel (causal/local hdim
    64: three consumer warpgroups instead of two), GQA included."""
    assert has_long_tiles(64, True, sq) and not has_long_tiles(64, True, sq - 5)
    run_dense(np.random.default_rng(11), 1, sq, sk, 4, 2, 64, "bf16", mask, 0.0)


def _kernel_matches_reference(kern, d, causal, window, sq, sk, seed, key_ramp=None, shape=(2, 4, 2)):
    """A FlashForward built with other schedule choices, on `shape` = (batch, query heads, K/V heads),
    B=2, 4 query heads over 2 K/V heads unless said, its poisoned output and LSE checked against
    the reference (FA3's tolerance rule).  key_ramp (first, last): the keys scaled from `first`
    (key 0) to `last`, so the scores' spread grows toward the first keys, which the kernel visits
    last."""
    from numba_fa3.api import _forward
    rng = np.random.default_rng(seed)
    npdt = NUMPY_DTYPES["bf16"]
    b, h, hk = shape
    q = rng.standard_normal((b, sq, h, d)).astype(npdt)
    k = rng.standard_normal((b, sk, hk, d))
    if key_ramp is not None:
        k *= np.linspace(*key_ramp, sk)[None, :, None, None]
    k = k.astype(npdt)
    v = rng.standard_normal((b, sk, hk, d)).astype(npdt)
    tq, tk, tv = _to_torch(q), _to_torch(k), _to_torch(v)
    out = _torch().full_like(tq, float("nan"))
    _, lse = _forward(tq, tk, tv, None, causal, window, 0.0, True, out, None, lambda *a, **kw: kern)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, return_lse=True)
    low = attention_lowprec(q, k, v, causal=causal, window_size=window, storage_dtype=npdt).astype(np.float64)
    _check(_to_numpy(out, "bf16"), lse.cpu().numpy(), ref, ref_lse, low)


#: (head dim, mask, Tiles choices, window, sq, sk, key ramp): each schedule choice where the
#: table does not make it.  Keys ramped from 6 to 0.5 make the lazy max move in some steps and
#: stay in others; sq > sk causal has rows that see no key (0 and LSE -inf).
CHOICES = [
    (128, "causal", dict(uniform_pipeline=False), (-1, -1), 901, 700, None),
    (64, "full", dict(uniform_pipeline=True), (-1, -1), 1000, 333, None),
    (256, "causal", dict(uniform_pipeline=True), (-1, -1), 901, 700, None),
    (128, "full", dict(q_in_registers=False), (-1, -1), 901, 700, None),
    (96, "local", dict(q_in_registers=True), (300, 40), 901, 700, None),
    (192, "causal", dict(q_in_registers=True), (-1, -1), 333, 1000, None),
    (64, "full", dict(rescale_threshold=8.0), (-1, -1), 1000, 333, (6.0, 0.5)),
    (256, "full", dict(rescale_threshold=0.0), (-1, -1), 700, 901, None),
    (256, "local", dict(rescale_threshold=2.0), (300, 40), 901, 700, (6.0, 0.5)),
    (96, "causal", dict(rescale_threshold=4.0, interleaved_rescale=False), (-1, -1), 901, 700, (6.0, 0.5)),
    (128, "causal", dict(sequential_mask_loops=False, lazy_tail_after_wait=False), (-1, -1), 901, 700, (6.0, 0.5)),
    (64, "local", dict(sequential_mask_loops=True), (300, 40), 901, 700, None),
    (128, "full", dict(lazy_tail_after_wait=True), (-1, -1), 700, 901, (6.0, 0.5)),
    (128, "causal", dict(rescale_rounds=8), (-1, -1), 700, 901, None),
    (256, "causal", dict(rescale_rounds=4, hoist_q_descriptors=4), (-1, -1), 901, 700, None),
    (256, "full", dict(interleaved_rescale=False, uniform_pipeline=False), (300, 40), 901, 700, None),
    (192, "full", dict(interleaved_rescale=True), (-1, -1), 700, 901, None),
]


@gpu
@pytest.mark.parametrize("d,mask_name,choices,window,sq,sk,key_ramp", CHOICES)
def test_forward_schedule_choices_match_reference(d, mask_name, choices, window, sq, sk, key_ramp):
    """Each Tiles schedule choice on and off (uniform pipeline, Q in registers, the lazy rescale
    and its threshold, three mask loops or the nest, the pinned lazy tail, rescale rounds,
    hoisted Q descriptors, the interleaved or early rescale): the kernel takes the choice and
    its results match the reference."""
    from numba_fa3 import mask
    from numba_fa3.forward import FlashForward
    from numba_fa3.tiles import tiles_for
    kind = {"full": mask.MASK_NONE, "causal": mask.MASK_CAUSAL, "local": mask.MASK_LOCAL}[mask_name]
    if window != (-1, -1) and kind == mask.MASK_NONE:
        kind = mask.MASK_LOCAL
    kern = FlashForward("bf16", d, kind, tiles=tiles_for(d, kind != mask.MASK_NONE).with_choices(**choices))
    for field, value in choices.items():
        assert getattr(kern.tiles, field) == value
    _kernel_matches_reference(kern, d, mask_name == "causal", window, sq, sk, seed=17, key_ramp=key_ramp)


@gpu
def test_forward_q_in_registers_schedules_match_reference():
    """Q in registers under the ablation's schedule without ping-pong; the schedule without the
    intra-warpgroup overlap keeps Q in shared memory (it computed wrong results with Q in
    registers: FlashForward.__init__)."""
    from numba_fa3 import mask
    from numba_fa3.forward import FlashForward, Schedule
    for schedule in (Schedule(pingpong=False, overlap=True), Schedule(pingpong=True, overlap=False)):
        kern = FlashForward("bf16", 128, mask.MASK_CAUSAL, schedule)
        assert kern.q_in_registers == schedule.overlap
        _kernel_matches_reference(kern, 128, True, (-1, -1), 700, 901, seed=23)


@gpu
def test_forward_numpy_roundtrip_and_gqa_vs_torch():
    torch = _torch()
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 1000, 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(2, 1500, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(2, 1500, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    out = flash_attn(q, k, v, causal=True)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.repeat_interleave(4, 2).transpose(1, 2).float(),
        v.repeat_interleave(4, 2).transpose(1, 2).float(), is_causal=False,
        attn_mask=torch.ones(1000, 1500, device="cuda", dtype=torch.bool).tril(500)).transpose(1, 2)
    assert (out.float() - ref).abs().max().item() < 2e-2
    host = flash_attn(*(_to_numpy(x, "bf16") for x in (q, k, v)), causal=True)
    assert isinstance(host, np.ndarray) and host.dtype == NUMPY_DTYPES["bf16"]
    assert np.array_equal(host.view(np.uint16), _to_numpy(out, "bf16").view(np.uint16))


def test_window_bounds_fit_the_kernels_int32():
    """Windows reach the kernels as int32 and enter int32 sums: a bound past mask.FAR is clamped
    (the same mask for any sequence a GPU holds), a negative one is unbounded, NumPy integers
    are integers."""
    from numba_fa3 import api, mask
    assert api._window((2**40, 2**31)) == (mask.FAR, mask.FAR)
    assert api._window((-7, np.int64(3))) == (-1, 3)
    assert api._options(64, None, True, (2**33, 5), 0.0)[2] == (mask.FAR, 0)
    assert api._options(64, None, False, (-1, -1), 0.0)[3] == mask.MASK_NONE
    assert api._options(64, None, False, (2**40, -1), 0.0)[3] == mask.MASK_LOCAL
    # FAR is past every sequence: the clamped window masks exactly what the wide one does
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 37, 2, 16)) for _ in range(3))
    for window in ((2**40, 3), (5, 2**35)):
        clamped = tuple(min(w, mask.FAR) for w in window)
        assert np.array_equal(attention_reference(q, k, v, window_size=window),
                              attention_reference(q, k, v, window_size=clamped))


def test_max_seqlen_is_an_integer_clamped_to_the_packed_length():
    """max_seqlen reaches the kernels as int32: a bound past the packed length (which no sequence
    exceeds) is clamped to it, NumPy integers are integers."""
    from numba_fa3 import api
    assert api._max_seqlen(2**40, "max_seqlen_q", 100) == 100
    assert api._max_seqlen(np.int64(7), "max_seqlen_q", 100) == 7
    assert api._max_seqlen(0, "max_seqlen_k", 0) == 0


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
    with pytest.raises(ValueError, match="softcap"):
        flash_attn(q, q, q, softcap=-1.0)
    with pytest.raises(ValueError, match="softmax_scale"):
        flash_attn(q, q, q, softmax_scale=-1.0)
    for window in ((2.5, 0), (1, None), (True, 0), 5, (1, 2, 3)):
        with pytest.raises(TypeError, match="window_size"):
            flash_attn(q, q, q, window_size=window)
    with pytest.raises(ValueError, match="contiguous"):
        flash_attn(np.ones((1, 8, 2, 128), bf)[..., ::2], q, q)
    p = np.ones((8, 2, 64), bf)
    with pytest.raises(ValueError, match="packed length"):
        flash_attn_varlen(p, p, p, np.array([0, 4], np.int32), np.array([0, 8], np.int32), 4, 8)
    with pytest.raises(ValueError, match="longer than max_seqlen"):
        flash_attn_varlen(p, p, p, np.array([0, 8], np.int32), np.array([0, 8], np.int32), 4, 8)
    with pytest.raises(ValueError, match="sequences"):
        flash_attn_varlen(p, p, p, np.array([0, 8], np.int32), np.array([0, 4, 8], np.int32), 8, 8)
    for bound in (8.0, 7.9, True, None, "8"):
        with pytest.raises(TypeError, match="max_seqlen_q"):
            flash_attn_varlen(p, p, p, np.array([0, 8], np.int32), np.array([0, 8], np.int32), bound, 8)
    with pytest.raises(ValueError, match="max_seqlen_k must be >= 0"):
        flash_attn_varlen(p, p, p, np.array([0, 8], np.int32), np.array([0, 8], np.int32), 8, -1)
    with pytest.raises(ValueError, match=r"\[total_tokens"):
        flash_attn_varlen(q, q, q, np.array([0, 8], np.int32), np.array([0, 8], np.int32), 8, 8)


@gpu
def test_forward_batch_of_one_with_zero_batch_stride():
    """`x[None]` gives a batch of one with stride 0 (NumPy, and torch tensors made from it): the
    batch dimension's stride is never used, so the result equals the contiguous input's."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((333, 4, 128)).astype(NUMPY_DTYPES["bf16"]) for _ in range(3))
    want = flash_attn(q[None].copy(), k[None].copy(), v[None].copy(), causal=True)
    assert q[None].strides[0] == 0
    got = flash_attn(q[None], k[None], v[None], causal=True)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    t = lambda x: torch.from_numpy(x.view(np.uint16)).cuda().view(torch.bfloat16)
    tq, tk, tv = t(q[None]), t(k[None]), t(v[None])
    assert tq.stride(0) == 0
    gt = flash_attn(tq, tk, tv, causal=True)
    assert np.array_equal(gt.view(torch.int16).cpu().numpy().view(np.uint16), want.view(np.uint16))
