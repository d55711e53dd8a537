"""The backward kernels (`flash_attn_backward`, `flash_attn_varlen_backward`) against the float64
reference backward, with FA3's tolerance rule as test_blocked_backward applies it: each
gradient's max error vs the float64 gradient is at most 2x the error of the same computation in
the input precision, plus eps * max|gradient| (eps of the input dtype).  The same computation in
the input precision is the NumPy model of the blocked backward (numba_fa3.blocked_backward), fed
the same forward `out` and LSE as the kernel: P and dS rounded to bf16/fp16 before their GEMMs,
dQ accumulated in float32 (test_blocked_backward holds that model to the same rule against the
unblocked input-precision computation).

The forward kernel produces `out` and the LSE, as in training; the reference differentiates from
q, k, v and dout alone.  Preallocated dq, dk, dv are NaN-poisoned, so every element must be
written; rows that see no key must give exactly zero dq, and keys that no query sees exactly
zero dk and dv.  `EDGE_CASES` is a fixed list small enough to run under compute-sanitizer
(`-k edge`)."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import numba_fa3
from numba_fa3 import api, flash_attn, flash_attn_varlen
from numba_fa3.backward import FlashBackward
from numba_fa3.blocked import attention_blocked
from numba_fa3.blocked_backward import attention_backward_blocked
from numba_fa3.primitives.tensors import NUMPY_DTYPES
from numba_fa3.reference import attention_backward_reference, attention_backward_reference_varlen, attention_mask
from numba_fa3.tiles import BACKWARD_HEAD_DIMS, SUPPORTED_HEAD_DIMS, BackwardTiles
from test_forward import _to_numpy, _to_torch, _torch

gpu = pytest.mark.gpu
LENGTHS = [1, 17, 64, 113, 128, 129, 255, 799]
VARLEN_LENGTHS = [0, 1, 2, 17, 80, 113, 128, 129, 300]
GQA_RATIOS = [1, 2, 4]


def _mask(rng, mask):
    """(causal, window_size) of a mask: "none", "causal", "local" (a window of 0-300 keys each
    side, drawn from rng) or an explicit (left, right) window."""
    if isinstance(mask, tuple):
        return False, mask
    if mask == "local":
        return False, (int(rng.integers(0, 300)), int(rng.integers(0, 300)))
    return mask == "causal", (-1, -1)


def _check_grads(got, model, ref, npdt):
    """FA3's rule for (dq, dk, dv): `got` (the kernel's) within 2x the blocked model's max error
    against the float64 `ref`, plus eps times the largest gradient.  The kernel's soft-cap takes
    tanh.approx.f32, which the model does not; its relative error (about 1e-5) is well under the
    rounding of P to fp16 (2^-11), so it needs no term of its own."""
    eps = float(ml_dtypes.finfo(npdt).eps)
    for name, g, m, r in zip(("dq", "dk", "dv"), got, model, ref):
        g = np.asarray(g, np.float64)
        assert g.shape == r.shape, f"{name}: shape {g.shape}, want {r.shape}"
        assert np.isfinite(g).all(), f"{name}: NaN/inf (an element left unwritten, or a row that sees no key)"
        err = np.abs(g - r).max(initial=0)
        low = np.abs(np.asarray(m, np.float64) - r).max(initial=0)
        atol = eps * max(1e-3, float(np.abs(r).max(initial=0)))
        assert err <= 2 * low + atol, f"{name}: max err {err:.3g} vs the blocked model's {low:.3g} (+ {atol:.3g})"


def _check_unseen(grads, no_key, no_query):
    """dq exactly 0 on the rows that see no key, dk and dv exactly 0 on the keys that no query
    sees (boolean masks over the sequence axis, the one before the heads)."""
    dq, dk, dv = (np.asarray(g, np.float64) for g in grads)
    assert (np.take(dq, np.flatnonzero(no_key), axis=-3) == 0).all(), "dq of a row that sees no key is not 0"
    for name, g in (("dk", dk), ("dv", dv)):
        assert (np.take(g, np.flatnonzero(no_query), axis=-3) == 0).all(), f"{name} of a key no query sees is not 0"


def _poisoned(*like):
    torch = _torch()
    return [torch.full_like(x, float("nan")) for x in like]


def _host(g, dtype):
    """A gradient as NumPy: NumPy results as they are, torch ones copied back."""
    return g if isinstance(g, np.ndarray) else _to_numpy(g, dtype)


def _same_bits(a, b):
    torch = _torch()
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


class Dense:
    """One dense problem: NumPy inputs, their torch copies, and the forward kernel's out and LSE;
    the reference and blocked-model gradients are computed once, on first use."""

    def __init__(self, rng, b, sq, sk, h, hk, d, dtype, mask, softcap=0.0, softmax_scale=None):
        self.dtype, self.npdt = dtype, NUMPY_DTYPES[dtype]
        self.q, self.dout = (rng.standard_normal((b, sq, h, d)).astype(self.npdt) for _ in range(2))
        self.k, self.v = (rng.standard_normal((b, sk, hk, d)).astype(self.npdt) for _ in range(2))
        causal, window = _mask(rng, mask)
        self.opts = dict(softmax_scale=softmax_scale, causal=causal, window_size=window, softcap=softcap)
        self.t = {n: _to_torch(getattr(self, n)) for n in ("q", "k", "v", "dout")}
        self.out, self.lse = flash_attn(self.t["q"], self.t["k"], self.t["v"], return_lse=True, **self.opts)
        vis = attention_mask(sq, sk, causal, window)
        self.no_key, self.no_query = ~vis.any(axis=1), ~vis.any(axis=0)
        self._ref = self._model = None

    def args(self):
        t = self.t
        return t["dout"], t["q"], t["k"], t["v"], self.out, self.lse

    def backward(self, deterministic=False, preallocated=True):
        """The kernel's (dq, dk, dv): into NaN-poisoned preallocated tensors, which must be what
        comes back, or (preallocated=False) new ones; the inputs must be left as they were."""
        torch = _torch()
        kept = [x.clone() for x in self.args()]
        pre = _poisoned(self.t["q"], self.t["k"], self.t["v"]) if preallocated else [None] * 3
        got = numba_fa3.flash_attn_backward(*self.args(), deterministic=deterministic,
                                            dq=pre[0], dk=pre[1], dv=pre[2], **self.opts)
        if preallocated:
            assert all(g is p for g, p in zip(got, pre)), "dq, dk, dv returned are not the preallocated ones"
        assert all(torch.equal(a, b) for a, b in zip(kept, self.args())), "the backward changed an input"
        return got

    def check(self, grads):
        if self._ref is None:
            self._ref = attention_backward_reference(self.dout, self.q, self.k, self.v, **self.opts)
            self._model = attention_backward_blocked(self.dout, self.q, self.k, self.v, _to_numpy(self.out, self.dtype),
                                                     self.lse.cpu().numpy(), storage_dtype=self.npdt, **self.opts)
        got = [_host(g, self.dtype) for g in grads]
        _check_grads(got, self._model, self._ref, self.npdt)
        _check_unseen(got, self.no_key, self.no_query)

    def run(self, deterministic=False):
        grads = self.backward(deterministic)
        self.check(grads)
        return grads


class Varlen:
    """Dense's counterpart over sequences packed along one token axis (int32 cu_seqlens on the
    GPU); the blocked model runs per sequence, as the reference does."""

    def __init__(self, rng, lens_q, lens_k, h, hk, d, dtype, mask, softcap=0.0):
        torch = _torch()
        self.dtype, self.npdt = dtype, NUMPY_DTYPES[dtype]
        self.lens_q, self.lens_k = list(lens_q), list(lens_k)
        self.cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
        self.cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
        self.q, self.dout = (rng.standard_normal((self.cu_q[-1], h, d)).astype(self.npdt) for _ in range(2))
        self.k, self.v = (rng.standard_normal((self.cu_k[-1], hk, d)).astype(self.npdt) for _ in range(2))
        causal, window = _mask(rng, mask)
        self.opts = dict(causal=causal, window_size=window, softcap=softcap)
        self.t = {n: _to_torch(getattr(self, n)) for n in ("q", "k", "v", "dout")}
        self.t["cu_q"], self.t["cu_k"] = torch.from_numpy(self.cu_q).cuda(), torch.from_numpy(self.cu_k).cuda()
        self.max_q, self.max_k = max(self.lens_q), max(self.lens_k)
        t = self.t
        self.out, self.lse = flash_attn_varlen(t["q"], t["k"], t["v"], t["cu_q"], t["cu_k"], self.max_q, self.max_k,
                                               return_lse=True, **self.opts)

    def args(self):
        t = self.t
        return t["dout"], t["q"], t["k"], t["v"], self.out, self.lse, t["cu_q"], t["cu_k"], self.max_q, self.max_k

    def backward(self, deterministic=False, preallocated=True):
        torch = _torch()
        kept = [x.clone() for x in self.args()[:8]]
        pre = _poisoned(self.t["q"], self.t["k"], self.t["v"]) if preallocated else [None] * 3
        got = numba_fa3.flash_attn_varlen_backward(*self.args(), deterministic=deterministic,
                                                   dq=pre[0], dk=pre[1], dv=pre[2], **self.opts)
        if preallocated:
            assert all(g is p for g, p in zip(got, pre)), "dq, dk, dv returned are not the preallocated ones"
        assert all(torch.equal(a, b) for a, b in zip(kept, self.args()[:8])), "the backward changed an input"
        return got

    def check(self, grads):
        out, lse = _to_numpy(self.out, self.dtype), self.lse.cpu().numpy()
        ref = attention_backward_reference_varlen(self.dout, self.q, self.k, self.v, self.cu_q, self.cu_k, **self.opts)
        model = [np.zeros(x.shape, np.float32) for x in (self.q, self.k, self.v)]
        no_key, no_query = np.zeros(len(self.q), bool), np.zeros(len(self.k), bool)
        for i, (lq, lk) in enumerate(zip(self.lens_q, self.lens_k)):
            rows, keys = slice(self.cu_q[i], self.cu_q[i + 1]), slice(self.cu_k[i], self.cu_k[i + 1])
            vis = attention_mask(lq, lk, self.opts["causal"], self.opts["window_size"])
            no_key[rows], no_query[keys] = ~vis.any(axis=1), ~vis.any(axis=0)
            if lq and lk:
                g = attention_backward_blocked(self.dout[None, rows], self.q[None, rows], self.k[None, keys],
                                               self.v[None, keys], out[None, rows], lse[None, :, rows],
                                               storage_dtype=self.npdt, **self.opts)
                for m, x, span in zip(model, g, (rows, keys, keys)):
                    m[span] = x[0]
        got = [_host(g, self.dtype) for g in grads]
        _check_grads(got, model, ref, self.npdt)
        _check_unseen(got, no_key, no_query)

    def run(self, deterministic=False):
        grads = self.backward(deterministic)
        self.check(grads)
        return grads


# --- fixed cases -----------------------------------------------------------------------------------

#: ("dense", batch, Sq, Sk, H, Hk, head dim, dtype, mask, softcap) and
#: ("varlen", lengths of q, lengths of k, H, Hk, head dim, dtype, mask, softcap): every head dim,
#: the masks, softcap, GQA 1/2/4, Sq != Sk both ways, rows that see no key and keys no query
#: sees, varlen with empty and 1-token sequences.  Also the compute-sanitizer subset (`-k edge`).
EDGE_CASES = [
    ("dense", 1, 1, 1, 2, 1, 64, "bf16", "none", 0.0),
    ("dense", 2, 128, 128, 4, 4, 64, "f16", "causal", 0.0),
    ("dense", 1, 129, 113, 4, 1, 96, "bf16", "causal", 0.0),      # rows 0-15 see no key
    ("dense", 1, 300, 129, 2, 1, 96, "f16", (10, 10), 0.0),       # rows 0-160 see no key
    ("dense", 1, 113, 799, 2, 1, 128, "bf16", (100, 20), 0.0),    # keys 0-585 (whole key blocks) seen by no query
    ("dense", 2, 17, 129, 4, 2, 128, "f16", "none", 15.0),
    ("dense", 1, 799, 17, 2, 2, 96, "bf16", "causal", 30.0),     # rows 0-781 see no key
    ("dense", 1, 255, 300, 4, 2, 128, "bf16", (64, 0), 0.0),
    ("dense", 1, 200, 333, 4, 2, 256, "bf16", "causal", 0.0),    # D = 256: the column split
    ("dense", 2, 129, 65, 2, 2, 256, "f16", "none", 12.0),
    ("dense", 1, 97, 160, 2, 1, 256, "bf16", (40, 7), 0.0),
    ("dense", 2, 150, 150, 4, 1, 192, "f16", "causal", 0.0),     # D = 192: unequal column shares
    ("dense", 1, 33, 257, 2, 2, 192, "bf16", "none", 25.0),
    ("varlen", [0, 1, 129, 70], [5, 0, 200, 70], 4, 2, 128, "bf16", "causal", 0.0),
    ("varlen", [33, 250], [300, 1], 2, 2, 128, "f16", (40, 8), 20.0),
    ("varlen", [17, 0, 64], [17, 17, 64], 4, 1, 64, "bf16", "none", 0.0),  # keys 17-33: no query
    ("varlen", [1, 1, 1], [799, 1, 128], 2, 1, 64, "f16", "causal", 0.0),
    ("varlen", [3, 5], [0, 0], 2, 1, 96, "bf16", "none", 0.0),  # no keys at all: dq is 0
    ("varlen", [0, 65, 130], [7, 64, 200], 4, 2, 256, "f16", "causal", 10.0),
    ("varlen", [40, 1, 77], [90, 1, 0], 2, 1, 192, "bf16", (16, 16), 0.0),
]


def _case_id(case):
    def part(x):
        if isinstance(x, tuple):
            return f"w{x[0]}_{x[1]}"
        return "x".join(map(str, x)) if isinstance(x, list) else str(x)
    return "-".join(part(x) for x in case)


def _run_case(case, rng):
    if case[0] == "dense":
        _, b, sq, sk, h, hk, d, dtype, mask, softcap = case
        return Dense(rng, b, sq, sk, h, hk, d, dtype, mask, softcap)
    _, lq, lk, h, hk, d, dtype, mask, softcap = case
    return Varlen(rng, lq, lk, h, hk, d, dtype, mask, softcap)


@gpu
@pytest.mark.parametrize("case", EDGE_CASES, ids=_case_id)
def test_backward_edge(case):
    _run_case(case, np.random.default_rng(7)).run()


def test_edge_cases_cover_the_support_matrix():
    """EDGE_CASES, the sanitizer's subset, keeps every feature the kernels specialize on."""
    dense = [c for c in EDGE_CASES if c[0] == "dense"]
    varlen = [c for c in EDGE_CASES if c[0] == "varlen"]
    assert {c[6] for c in dense} == set(BACKWARD_HEAD_DIMS)
    assert {c[-3] for c in EDGE_CASES} == {"bf16", "f16"}
    assert {c[-2] if isinstance(c[-2], str) else "local" for c in dense} == {"none", "causal", "local"}
    assert {c[4] // c[5] for c in dense} >= set(GQA_RATIOS)
    assert any(c[2] > c[3] for c in dense) and any(c[2] < c[3] for c in dense)
    assert {1, 17, 113, 128, 129, 799} <= {c[2] for c in dense} | {c[3] for c in dense}
    assert any(c[-1] > 0 for c in dense) and any(c[-1] > 0 for c in varlen)
    masks = [attention_mask(c[2], c[3], *_mask(None, c[-2])) for c in dense]
    assert any((~vis.any(axis=1)).any() for vis in masks), "a row that sees no key"
    assert any((~vis.any(axis=0)).any() for vis in masks), "a key that no query sees"
    lens = [n for c in varlen for n in c[1] + c[2]]
    assert 0 in lens and 1 in lens
    assert any(sum(c[2]) == 0 for c in varlen), "a packed batch with no keys at all"


# --- random problems -------------------------------------------------------------------------------

@gpu
@settings(max_examples=30, deadline=None)
@given(sq=st.sampled_from(LENGTHS), sk=st.sampled_from(LENGTHS), d=st.sampled_from(BACKWARD_HEAD_DIMS),
       b=st.integers(1, 2), hk=st.integers(1, 2), ratio=st.sampled_from(GQA_RATIOS),
       mask=st.sampled_from(["none", "causal", "local"]), dtype=st.sampled_from(["bf16", "f16"]),
       softcap=st.sampled_from([0.0, 0.0, 15.0]), softmax_scale=st.sampled_from([None, None, 0.2]),
       seed=st.integers(0, 2 ** 31))
def test_backward_matches_reference(sq, sk, d, b, hk, ratio, mask, dtype, softcap, softmax_scale, seed):
    Dense(np.random.default_rng(seed), b, sq, sk, hk * ratio, hk, d, dtype, mask, softcap, softmax_scale).run()


@gpu
@settings(max_examples=20, deadline=None)
@given(lens=st.lists(st.tuples(st.sampled_from(VARLEN_LENGTHS), st.sampled_from(VARLEN_LENGTHS)),
                     min_size=1, max_size=4),
       d=st.sampled_from(BACKWARD_HEAD_DIMS), hk=st.integers(1, 2), ratio=st.sampled_from(GQA_RATIOS),
       mask=st.sampled_from(["none", "causal", "local"]), dtype=st.sampled_from(["bf16", "f16"]),
       softcap=st.sampled_from([0.0, 15.0]), seed=st.integers(0, 2 ** 31))
def test_varlen_backward_matches_reference(lens, d, hk, ratio, mask, dtype, softcap, seed):
    lens_q, lens_k = [a for a, _ in lens], [c for _, c in lens]
    if sum(lens_q) == 0:
        lens_q[0] = 1
    Varlen(np.random.default_rng(seed), lens_q, lens_k, hk * ratio, hk, d, dtype, mask, softcap).run()


# --- rows that see no key --------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("sq,sk,mask,softcap,dtype", [
    (300, 100, "causal", 0.0, "bf16"),    # causal, Sq > Sk: rows 0-199 see no key
    (300, 100, "causal", 20.0, "f16"),    # the same under a soft-cap
    (200, 130, (0, 0), 0.0, "bf16"),      # the diagonal, shifted down: rows 0-69 see no key
    (100, 700, (50, 0), 0.0, "f16"),      # keys 0-549, whole key blocks, seen by no query
])
def test_rows_that_see_no_key_give_zero_gradients(sq, sk, mask, softcap, dtype):
    """The LSE of a row that sees no key is -inf; the backward must not turn that into NaN:
    its dq row is exactly 0, it adds nothing to dk and dv, and keys that no query sees get
    exactly 0 (their key blocks may have no query block at all)."""
    p = Dense(np.random.default_rng(3), 2, sq, sk, 4, 2, 128, dtype, mask, softcap)
    assert p.no_key.any() or p.no_query.any()
    assert np.isneginf(p.lse.cpu().numpy()[:, :, p.no_key]).all()
    p.run()


# --- deterministic mode ----------------------------------------------------------------------------

@gpu
@pytest.mark.parametrize("h,hk,d,dtype,mask", [(4, 2, 128, "bf16", "none"), (4, 1, 64, "f16", "causal"),
                                                (2, 1, 256, "bf16", "causal"), (2, 2, 192, "f16", "none")])
def test_deterministic_is_bitwise_reproducible(h, hk, d, dtype, mask):
    """deterministic=True: three runs give the same bits, on a shape where each query block
    gathers dQ from 24-32 key blocks (4096 keys) and each key head dK, dV from 2 or 4 query
    heads; both modes meet the tolerance rule."""
    p = Dense(np.random.default_rng(11), 1, 1024, 4096, h, hk, d, dtype, mask)
    runs = [p.backward(deterministic=True) for _ in range(3)]
    for again in runs[1:]:
        for name, a, b in zip(("dq", "dk", "dv"), runs[0], again):
            assert _same_bits(a, b), f"{name} differs between two deterministic runs"
    p.check(runs[0])
    p.check(p.backward(deterministic=False))


#: Shapes without a mask for the deterministic mode's rotated walks (`tile_scheduler.rotation`):
#: the edge cases' and groups of key blocks smaller than the key blocks (Sk above Sq), a query
#: block count within the producer's lookahead (G = 1: ascending order), and many key blocks.
ROTATED_CASES = [c for c in EDGE_CASES if c[-2] == "none"] + [
    ("dense", 1, 1100, 700, 2, 1, 128, "bf16", "none", 0.0),
    ("dense", 1, 130, 2000, 2, 2, 64, "f16", "none", 0.0),
    ("dense", 1, 64, 1000, 4, 2, 128, "bf16", "none", 5.0),
    ("varlen", [700, 0, 1, 300], [900, 5, 1, 1300], 4, 2, 128, "bf16", "none", 0.0),
]


@gpu
@pytest.mark.parametrize("case", ROTATED_CASES, ids=_case_id)
def test_deterministic_without_a_mask_matches_reference(case):
    """deterministic=True without a mask (rotated walks, each query block's adds in the walks'
    order): the tolerance rule, and the same bits twice."""
    p = _run_case(case, np.random.default_rng(5))
    first = p.backward(deterministic=True)
    p.check(first)
    for name, a, b in zip(("dq", "dk", "dv"), first, p.backward(deterministic=True)):
        assert _same_bits(a, b), f"{name} differs between two deterministic runs"


# --- query blocks of 80 (dQ^T = K^T dS) ----------------------------------------------------------

#: FA3's hdim-128 tile, not the table's: lengths ending mid-block, GQA, a window, soft-cap's
#: kernel refused (it spills), varlen with empty and 1-token sequences.
EIGHTY_CASES = [
    ("dense", 1, 300, 300, 4, 2, 128, "bf16", "none", 0.0),
    ("dense", 2, 161, 97, 2, 1, 128, "f16", "causal", 0.0),
    ("dense", 1, 1000, 1111, 4, 4, 128, "bf16", (100, 20), 0.0),
    ("dense", 1, 79, 500, 2, 2, 128, "bf16", "causal", 0.0),
    ("varlen", [0, 1, 129, 170], [5, 0, 200, 170], 4, 2, 128, "bf16", "causal", 0.0),
    ("varlen", [81, 1, 240], [90, 1, 0], 2, 1, 128, "f16", "none", 0.0),
]
EIGHTY = BackwardTiles(block_m=80, stages=2, consumers=2, producer_registers=24, consumer_registers=240)


@gpu
@pytest.mark.parametrize("case", EIGHTY_CASES, ids=_case_id)
def test_query_blocks_of_80_match_reference(case, monkeypatch):
    """The backward with 80-query blocks (`FlashBackward.dq_t`: dS stored by query, dQ^T staged
    transposed) against the reference, the table's kernels swapped out for D = 128."""
    table = api.backward_kernel

    def eighty(dtype, d, kind, softcap=False, varlen=False, deterministic=False):
        if d == 128 and not deterministic and not softcap:
            return FlashBackward(dtype, d, kind, softcap=softcap, varlen=varlen, tiles=EIGHTY)
        return table(dtype, d, kind, softcap=softcap, varlen=varlen, deterministic=deterministic)
    monkeypatch.setattr(api, "backward_kernel", eighty)
    _run_case(case, np.random.default_rng(8)).run()


# --- outputs and array kinds -----------------------------------------------------------------------

@gpu
def test_default_outputs_are_new_tensors():
    """dq=dk=dv=None: new torch tensors shaped, typed and placed like q, k, v, with the bits of
    the preallocated run (deterministic mode)."""
    torch = _torch()
    rng = np.random.default_rng(5)
    for p in (Dense(rng, 2, 200, 333, 4, 1, 128, "bf16", "causal"),
              Varlen(rng, [100, 0, 7], [150, 9, 0], 4, 2, 64, "f16", "none")):
        new = p.backward(deterministic=True, preallocated=False)
        into = p.backward(deterministic=True)
        for name, n, i, x in zip(("dq", "dk", "dv"), new, into, (p.t["q"], p.t["k"], p.t["v"])):
            assert isinstance(n, torch.Tensor), name
            assert (n.shape, n.dtype, n.device) == (x.shape, x.dtype, x.device), name
            assert _same_bits(n, i), f"{name}: new and preallocated outputs differ"
        p.check(new)


@gpu
def test_numpy_inputs_give_numpy_gradients():
    """NumPy dout, q, k, v, out, LSE (and cu_seqlens) in: NumPy dq, dk, dv of the inputs' dtype,
    the bits of the same run on torch tensors (deterministic mode)."""
    rng = np.random.default_rng(9)
    p = Dense(rng, 2, 129, 300, 4, 2, 96, "f16", "local")
    host = numba_fa3.flash_attn_backward(p.dout, p.q, p.k, p.v, _to_numpy(p.out, "f16"), p.lse.cpu().numpy(),
                                         deterministic=True, **p.opts)
    dev = p.backward(deterministic=True)
    for name, g, x, t in zip(("dq", "dk", "dv"), host, (p.q, p.k, p.v), dev):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape, name
        assert np.array_equal(g.view(np.uint16), _to_numpy(t, "f16").view(np.uint16)), name

    p = Varlen(rng, [5, 0, 130], [17, 3, 129], 4, 1, 128, "bf16", "causal", 10.0)
    host = numba_fa3.flash_attn_varlen_backward(p.dout, p.q, p.k, p.v, _to_numpy(p.out, "bf16"), p.lse.cpu().numpy(),
                                                p.cu_q, p.cu_k, p.max_q, p.max_k, deterministic=True, **p.opts)
    dev = p.backward(deterministic=True)
    for name, g, x, t in zip(("dq", "dk", "dv"), host, (p.q, p.k, p.v), dev):
        assert isinstance(g, np.ndarray) and g.dtype == x.dtype and g.shape == x.shape, name
        assert np.array_equal(g.view(np.uint16), _to_numpy(t, "bf16").view(np.uint16)), name
    p.check(host)


# --- bad input -------------------------------------------------------------------------------------

def _raises_before_launch(call, pre, match, **bad):
    """call(**bad) raises a TypeError or ValueError naming the bad argument, and the preallocated
    outputs `pre` are still all NaN: nothing ran."""
    with pytest.raises((TypeError, ValueError), match=match):
        call(**bad)
    _torch().cuda.synchronize()
    assert all(x.isnan().all() for x in pre), f"{match}: an output was written before the error"


@gpu
def test_bad_inputs_raise_before_launch():
    torch = _torch()
    p = Dense(np.random.default_rng(0), 1, 64, 80, 2, 1, 64, "bf16", "none")
    t = p.t
    pre = _poisoned(t["q"], t["k"], t["v"])

    def call(**changes):
        args = dict(dout=t["dout"], q=t["q"], k=t["k"], v=t["v"], out=p.out, lse=p.lse,
                    dq=pre[0], dk=pre[1], dv=pre[2])
        args.update(changes)
        return numba_fa3.flash_attn_backward(**args, **p.opts)

    _raises_before_launch(call, pre, "lse", lse=p.lse.transpose(1, 2).contiguous())  # [B, Sq, H]
    _raises_before_launch(call, pre, "lse", lse=p.lse[:, :, :-1])
    _raises_before_launch(call, pre, "lse", lse=p.lse.to(torch.float16))
    _raises_before_launch(call, pre, "lse", lse=p.lse.cpu())
    _raises_before_launch(call, pre, "dout", dout=t["dout"][:, :-1])
    _raises_before_launch(call, pre, "dout", dout=t["dout"].to(torch.float16))
    _raises_before_launch(call, pre, "out", out=p.out[:, :-1])
    _raises_before_launch(call, pre, "dq", dq=torch.full_like(t["k"][:, :64], float("nan")))  # Hk heads, not H
    _raises_before_launch(call, pre, "dk", dk=torch.full_like(t["k"], float("nan"), dtype=torch.float16))
    _raises_before_launch(call, pre, "dv", dv=torch.full_like(t["q"], float("nan")))

    p = Varlen(np.random.default_rng(0), [30, 34], [40, 40], 2, 1, 64, "bf16", "none")
    t = p.t
    pre = _poisoned(t["q"], t["k"], t["v"])

    def call_varlen(**changes):
        args = dict(dout=t["dout"], q=t["q"], k=t["k"], v=t["v"], out=p.out, lse=p.lse, cu_seqlens_q=t["cu_q"],
                    cu_seqlens_k=t["cu_k"], max_seqlen_q=p.max_q, max_seqlen_k=p.max_k, dq=pre[0], dk=pre[1], dv=pre[2])
        args.update(changes)
        return numba_fa3.flash_attn_varlen_backward(**args, **p.opts)

    _raises_before_launch(call_varlen, pre, "lse", lse=p.lse[None])                   # dense [1, H, Tq]
    _raises_before_launch(call_varlen, pre, "lse", lse=p.lse.t().contiguous())        # [Tq, H]
    _raises_before_launch(call_varlen, pre, "cu_seqlens_q", cu_seqlens_q=t["cu_q"].long())
    _raises_before_launch(call_varlen, pre, "dq", dq=torch.full_like(t["q"][:-1], float("nan")))


# --- the tolerance itself (no GPU) -----------------------------------------------------------------

def _blocked_problem(rng, npdt, b, sq, sk, h, hk, d, **opts):
    """NumPy inputs with the blocked forward's out and LSE, the blocked model's gradients and the
    reference's: what the GPU tests compare, with the NumPy model standing in for the kernel."""
    q, dout = (rng.standard_normal((b, sq, h, d)).astype(npdt) for _ in range(2))
    k, v = (rng.standard_normal((b, sk, hk, d)).astype(npdt) for _ in range(2))
    out, lse = attention_blocked(q, k, v, storage_dtype=npdt, return_lse=True, **opts)
    model = attention_backward_blocked(dout, q, k, v, out, lse, storage_dtype=npdt, **opts)
    ref = attention_backward_reference(dout, q, k, v, **opts)
    return (dout, q, k, v, out, lse), model, ref


def _passes(got, model, ref, npdt):
    try:
        _check_grads(got, model, ref, npdt)
    except AssertionError:
        return False
    return True


def test_tolerance_admits_other_tilings_and_rejects_typical_bugs():
    """The rule is loose enough for the same algorithm on other tiles (the kernel's need not be
    the model's) and tight enough to fail each of: dQ missing the last key block's
    contribution (a lost atomic add), dK and dV from one query head per key head (GQA not
    summed), the causal mask one key too wide in the backward alone, and dK missing the softmax
    scale."""
    npdt = ml_dtypes.bfloat16
    f = lambda *a, **kw: attention_backward_blocked(*a, storage_dtype=npdt, **kw)
    rng = np.random.default_rng(5)
    (dout, q, k, v, out, lse), model, ref = _blocked_problem(rng, npdt, 1, 200, 300, 4, 2, 64)
    _check_grads(f(dout, q, k, v, out, lse, block_m=128, block_n=64), model, ref, npdt)
    _check_grads(f(dout, q, k, v, out, lse, block_m=64, block_n=80), model, ref, npdt)
    lost_block = f(dout, q, k[:, :256], v[:, :256], out, lse)[0]
    one_head = f(dout[:, :, ::2], q[:, :, ::2], k, v, out[:, :, ::2], lse[:, ::2])
    bugs = {"lost key block": (lost_block, model[1], model[2]),
            "GQA not summed": (model[0], one_head[1], one_head[2]),
            "dK unscaled": (model[0], model[1].astype(np.float64) * 8, model[2])}
    for name, got in bugs.items():
        assert not _passes(got, model, ref, npdt), f"{name} passed the tolerance"

    (dout, q, k, v, out, lse), model, ref = _blocked_problem(rng, npdt, 1, 200, 300, 4, 2, 64, causal=True)
    _check_grads(f(dout, q, k, v, out, lse, causal=True, block_m=128, block_n=64), model, ref, npdt)
    assert not _passes(f(dout, q, k, v, out, lse, window_size=(-1, 1)), model, ref, npdt), "a mask one key too wide"


def test_the_backward_has_every_forward_head_dim():
    assert set(BACKWARD_HEAD_DIMS) == set(SUPPORTED_HEAD_DIMS)


@pytest.mark.parametrize("d", [32, 80, 160])
def test_unsupported_head_dims_raise_before_any_gpu_work(d):
    """Head dims no kernel has raise a ValueError that names the supported ones, from NumPy
    inputs, before anything touches the GPU."""
    rng = np.random.default_rng(d)
    q = rng.standard_normal((1, 8, 2, d)).astype(ml_dtypes.bfloat16)
    lse = np.zeros((1, 2, 8), np.float32)
    with pytest.raises(ValueError, match=r"supported.*\(64, 96, 128, 192, 256\)"):
        numba_fa3.flash_attn_backward(q, q, q, q, q, lse)
