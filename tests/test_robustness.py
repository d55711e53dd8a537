"""Issue 22: the forward kernel under stress and on bad inputs, and the sanitizer script's parts
that run without a GPU.

- Many tiles per CTA with the dynamic scheduler at its edges (tile counts one below, at and one
  above a multiple of a small persistent grid), three runs bitwise identical and right: the
  producer reuses the single Q buffer (hdim 192, 256; two at hdim 128) and its tile slot every
  tile, which is what the Q buffer's empty barrier guards (`release_q_now` in forward.py).
- Out-of-range cu_seqlens on the GPU (past the packed length, decreasing, int32 extremes): the
  kernel clamps them (`_seq_info`), writes nothing outside `out`'s rows, and the sequences that
  clamping leaves alone come out right.
- NaN / Inf in q, k or v stays in the (batch, head) pairs it came in (for k and v, the query
  heads of its GQA group); every other pair's output and LSE are bitwise those of a clean run.
"""
import importlib.util
import os

import numpy as np
import pytest

from numba_fa3.reference import attention_lowprec, attention_mask, attention_reference
from numba_fa3.primitives.tensors import NUMPY_DTYPES

gpu = pytest.mark.gpu
BF16 = NUMPY_DTYPES["bf16"]


def _torch():
    return pytest.importorskip("torch")


def _to_torch(a):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).cuda()
    return t.view(torch.bfloat16 if a.dtype == BF16 else torch.float16)


def _to_numpy(t):
    return t.view(_torch().int16).cpu().numpy().view(BF16)


def _bits(t):
    return t.view(_torch().int16).cpu().numpy()


def _within_fa3_tolerance(out, ref, low):
    err, low_err = np.abs(out - ref).max(initial=0), np.abs(low - ref).max(initial=0)
    return err <= 2 * low_err + 1e-3, f"max err {err:.3g} vs low-precision reference {low_err:.3g}"


# --- many tiles per CTA -------------------------------------------------------------------------

#: The persistent grid the stress test caps the launch at (`launch.sm_count` replaced): prime, so
#: the tile counts below fall one short of, on, and one past a multiple of it.
STRESS_GRID = 7
#: edge -> (batch, query heads, K/V heads, seqlen_q): block_m 128 gives 20, 21 and 22 tiles.
STRESS_SHAPES = {-1: (2, 2, 1, 600), 0: (1, 3, 1, 833), 1: (2, 1, 1, 1300)}


@gpu
@pytest.mark.parametrize("edge", sorted(STRESS_SHAPES))
@pytest.mark.parametrize("mask_name", ["full", "causal"])
@pytest.mark.parametrize("d", [128, 192, 256])
def test_many_tiles_per_cta_bitwise_stable(d, mask_name, edge, monkeypatch):
    """Three runs of one input on a grid of STRESS_GRID CTAs, each running about three tiles,
    give the same bits and match the reference.  Causal runs have Sk = Sq - 150: their first
    query block sees no key at all, so its tile releases Q without a key block."""
    from numba_fa3 import flash_attn
    from numba_fa3.forward import FlashForward
    from numba_fa3.primitives import launch
    torch = _torch()
    b, h, hk, sq = STRESS_SHAPES[edge]
    causal = mask_name == "causal"
    sk = sq - 150 if causal else sq + 37
    block_m = FlashForward("bf16", d, int(causal)).block_m
    tiles = b * h * -(-sq // block_m)
    assert tiles == 3 * STRESS_GRID + edge, (tiles, block_m)
    monkeypatch.setattr(launch, "sm_count", lambda: STRESS_GRID)
    rng = np.random.default_rng(100 * d + 10 * causal + edge)
    q = rng.standard_normal((b, sq, h, d)).astype(BF16)
    k = rng.standard_normal((b, sk, hk, d)).astype(BF16)
    v = rng.standard_normal((b, sk, hk, d)).astype(BF16)
    tq, tk, tv = _to_torch(q), _to_torch(k), _to_torch(v)
    runs = []
    for _ in range(3):
        out = torch.full_like(tq, float("nan"))
        _, lse = flash_attn(tq, tk, tv, causal=causal, return_lse=True, out=out)
        torch.cuda.synchronize()
        runs.append((_bits(out), lse.cpu().numpy()))
    for o, l in runs[1:]:
        assert np.array_equal(o, runs[0][0]), "runs differ: output"
        assert np.array_equal(l.view(np.int32), runs[0][1].view(np.int32)), "runs differ: LSE"
    out = runs[0][0].view(BF16).astype(np.float64)
    assert np.isfinite(out).all(), "unwritten (NaN-poisoned) output"
    ref, ref_lse = attention_reference(q, k, v, causal=causal, return_lse=True)
    low = attention_lowprec(q, k, v, causal=causal, storage_dtype=BF16).astype(np.float64)
    ok, msg = _within_fa3_tolerance(out, ref, low)
    assert ok, msg
    finite = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(runs[0][1]), finite)
    assert np.abs(runs[0][1][finite] - ref_lse[finite]).max() <= 1e-3 * (1 + np.abs(ref_lse[finite]).max())
    if causal:
        assert (out[:, :150] == 0).all(), "rows that see no key must be 0"


# --- out-of-range cu_seqlens --------------------------------------------------------------------

TQ, TK, GUARD = 700, 650, 64
I32_MAX, I32_MIN = 2 ** 31 - 1, -2 ** 31
#: name -> (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k): what the API cannot check
#: on the host without a sync (GPU cu_seqlens are read by the kernel only).
BAD_CU_SEQLENS = {
    "past_end": ([0, 129, 400, TQ + 1000], [0, 200, 333, TK + 77], TQ + 1000, TK + 77),
    "decreasing": ([0, 300, 180, TQ], [0, 250, 100, TK], TQ, TK),
    "extremes": ([-40, 100, I32_MAX, TQ], [I32_MIN, 120, I32_MAX, TK], TQ, TK),
}


def _clamped(cu, total):
    """The kernel's reading of a cu_seqlens array (`_seq_info`): each entry clamped to [0,
    total], a sequence's end to [its start, total]."""
    out = []
    for i in range(len(cu) - 1):
        a = min(max(cu[i], 0), total)
        out.append((a, min(max(cu[i + 1], a), total)))
    return out


def test_clamped_reading_of_bad_cu_seqlens():
    assert _clamped(BAD_CU_SEQLENS["decreasing"][0], TQ) == [(0, 300), (300, 300), (180, TQ)]
    assert _clamped(BAD_CU_SEQLENS["extremes"][1], TK) == [(0, 120), (120, TK), (TK, TK)]


@gpu
@pytest.mark.parametrize("d,mask_name,case", [(128, "causal", "past_end"), (256, "full", "past_end"),
                                              (128, "full", "decreasing"), (256, "causal", "decreasing"),
                                              (128, "causal", "extremes"), (256, "full", "extremes")])
def test_varlen_out_of_range_cu_seqlens_stay_in_bounds(d, mask_name, case):
    """`out` is a view into a larger buffer whose guard rows before and after hold a sentinel:
    they keep it bit for bit.  Rows of exactly one (clamped) sequence match that sequence's
    reference; rows of two overlapping ones (decreasing entries) match either, element by
    element (two CTAs store them); rows of none keep their NaN poison."""
    from numba_fa3 import flash_attn_varlen
    torch = _torch()
    h, hk = 4, 2
    causal = mask_name == "causal"
    cu_q, cu_k, max_q, max_k = BAD_CU_SEQLENS[case]
    rng = np.random.default_rng(sorted(BAD_CU_SEQLENS).index(case) * 1000 + d)
    q = rng.standard_normal((TQ, h, d)).astype(BF16)
    k = rng.standard_normal((TK, hk, d)).astype(BF16)
    v = rng.standard_normal((TK, hk, d)).astype(BF16)
    big = torch.full((GUARD + TQ + GUARD, h, d), -7777.0, device="cuda", dtype=torch.bfloat16)
    big[GUARD:GUARD + TQ] = float("nan")
    guard_before = _bits(big)
    out = big[GUARD:GUARD + TQ]
    cq = torch.tensor(cu_q, dtype=torch.int32, device="cuda")
    ck = torch.tensor(cu_k, dtype=torch.int32, device="cuda")
    res, lse = flash_attn_varlen(_to_torch(q), _to_torch(k), _to_torch(v), cq, ck, max_q, max_k, causal=causal,
                                 return_lse=True, out=out)
    torch.cuda.synchronize()
    assert res.data_ptr() == out.data_ptr()
    after = _bits(big)
    assert np.array_equal(after[:GUARD], guard_before[:GUARD]), "a store landed before out's first row"
    assert np.array_equal(after[GUARD + TQ:], guard_before[GUARD + TQ:]), "a store landed past out's last row"
    got = after[GUARD:GUARD + TQ].view(BF16).astype(np.float64)
    lse = lse.cpu().numpy()

    seqs = [(qa, qb, ka, kb) for (qa, qb), (ka, kb) in zip(_clamped(cu_q, TQ), _clamped(cu_k, TK)) if qb > qa]
    cover = np.zeros(TQ, np.int32)
    for qa, qb, _, _ in seqs:
        cover[qa:qb] += 1
    assert np.isnan(got[cover == 0]).all(), "rows of no sequence were written"
    candidates = []  # per sequence: (rows, reference, low-precision reference, reference LSE)
    for qa, qb, ka, kb in seqs:
        ref, ref_lse = attention_reference(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal,
                                           return_lse=True)
        low = attention_lowprec(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], causal=causal, storage_dtype=BF16)
        candidates.append((slice(qa, qb), ref[0], low[0].astype(np.float64), ref_lse[0]))
    assert candidates, "every sequence clamped empty: the case tests nothing"
    overlap = cover > 1
    for rows, ref, low, ref_lse in candidates:
        alone = ~overlap[rows]
        ok, msg = _within_fa3_tolerance(got[rows][alone], ref[alone], low[alone])
        assert ok, f"sequence at rows {rows.start}:{rows.stop}: {msg}"
        got_lse, want_lse = lse[:, rows][:, alone], ref_lse[:, alone]
        finite = np.isfinite(want_lse)
        assert np.array_equal(np.isfinite(got_lse), finite), "LSE -inf pattern differs"
        if finite.any():
            assert np.abs(got_lse[finite] - want_lse[finite]).max() <= 1e-3 * (1 + np.abs(want_lse[finite]).max())
    if overlap.any():
        err = np.full(got.shape, np.inf)
        for rows, ref, low, _ in candidates:
            e = np.full(got.shape, np.inf)
            e[rows] = np.abs(got[rows] - ref)
            err = np.minimum(err, e)
        bound = 2 * max(np.abs(low - ref).max(initial=0) for _, ref, low, _ in candidates) + 1e-3
        assert err[overlap].max() <= bound, "overlapping rows match neither sequence"


# --- NaN / Inf confined -------------------------------------------------------------------------

#: (batch, row, head, column) of the poisoned element; for k and v the row is a key and the head
#: a K/V head (query heads 2 * head and 2 * head + 1 read it: 4 query heads over 2 K/V heads).
POISON = {"q": (1, 77, 2, 5), "k": (1, 100, 0, 3), "v": (1, 100, 1, 7)}


@gpu
@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("d,mask_name", [(64, "full"), (128, "causal"), (256, "full")])
def test_nonfinite_input_confined_to_its_heads(d, mask_name, where, value):
    """One NaN or Inf element: the (batch, head) pairs that read it may turn non-finite (q, k: in
    no row but those that see it), and some output does; every other pair's output and LSE are
    bitwise those of the clean run."""
    from numba_fa3 import flash_attn
    torch = _torch()
    b, sq, sk, h, hk, ratio = 2, 300, 333, 4, 2, 2
    causal = mask_name == "causal"
    rng = np.random.default_rng(d + 7 * causal)
    x = {"q": rng.standard_normal((b, sq, h, d)).astype(BF16),
         "k": rng.standard_normal((b, sk, hk, d)).astype(BF16),
         "v": rng.standard_normal((b, sk, hk, d)).astype(BF16)}

    def run(inputs):
        out = torch.full((b, sq, h, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        _, lse = flash_attn(*(_to_torch(inputs[n]) for n in "qkv"), causal=causal, return_lse=True, out=out)
        torch.cuda.synchronize()
        return _bits(out), lse.cpu().numpy()

    clean, clean_lse = run(x)
    pb, row, ph, col = POISON[where]
    bad = dict(x)
    bad[where] = x[where].copy()
    bad[where][pb, row, ph, col] = value
    got, got_lse = run(bad)

    heads = [ph] if where == "q" else list(range(ph * ratio, (ph + 1) * ratio))
    hit = np.zeros((b, h), bool)
    hit[pb, heads] = True
    for bi in range(b):
        for hi in range(h):
            if not hit[bi, hi]:
                assert np.array_equal(got[bi, :, hi], clean[bi, :, hi]), f"output of batch {bi} head {hi} changed"
                assert np.array_equal(got_lse[bi, hi].view(np.int32), clean_lse[bi, hi].view(np.int32)), \
                    f"LSE of batch {bi} head {hi} changed"
    poisoned = got.view(BF16).astype(np.float64)[pb][:, heads]  # [sq, heads, d]
    bad_rows = ~np.isfinite(poisoned).all(axis=(1, 2))
    assert bad_rows.any(), "the non-finite input reached no output"
    if where == "q":
        assert np.flatnonzero(bad_rows).tolist() == [row]
    elif where == "k":
        sees = attention_mask(sq, sk, causal=causal)[:, row]
        assert not (bad_rows & ~sees).any(), "rows that do not see the poisoned key turned non-finite"
    # (v: masked keys of a visited key block enter P V with P = 0, and 0 * NaN is NaN, as in FA3:
    # only the heads are checked)


# --- the sanitizer script (tests/sanitize.py), no GPU needed ------------------------------------

def _sanitize():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sanitize.py")
    spec = importlib.util.spec_from_file_location("numba_fa3_sanitize_script", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


RACECHECK_LOG = """\
========= COMPUTE-SANITIZER
@@sanitize-spec d256_full
d256_full: ok (12.0 s)
@@sanitize-spec d256_causal
========= Error: Race reported between Read access at flash_fwd_kernel+0x530
=========     and Write access at flash_fwd_kernel+0xeac0 [256 hazards]
=========
d256_causal: ok (14.1 s)
@@sanitize-spec (end)
========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)
"""

MEMCHECK_LOG = """\
========= COMPUTE-SANITIZER
========= Program hit CUDA_ERROR_INVALID_VALUE (error 1) due to "invalid argument" on CUDA API call to cuGetProcAddress_v2.
=========     Saved host backtrace up to driver entry point at error
=========
@@sanitize-spec gemm_bf16_nt
========= Invalid __global__ write of size 16 bytes
=========     at flash_fwd_kernel+0x9a40
=========     by thread (130,0,0) in block (3,0,0)
=========     Address 0x7f0000001000 is out of bounds
=========
@@sanitize-spec (end)
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_log_parser():
    s = _sanitize()
    r = s.parse_log(RACECHECK_LOG)
    assert r["summary"] and r["race"] == (1, 1, 0)
    assert [(k["spec"], k["hazards"]) for k in r["kernel"]] == [("d256_causal", 256)]
    assert "0xeac0" in r["kernel"][0]["detail"][0]
    ok, reasons = s.verdict("racecheck", r, 0, False, {"results": [{"name": "d256_full", "ok": True}]})
    assert not ok and any("hazard" in x for x in reasons)
    m = s.parse_log(MEMCHECK_LOG)
    assert m["errors"] == 2 and len(m["host"]) == 1 and len(m["kernel"]) == 1
    assert m["kernel"][0]["spec"] == "gemm_bf16_nt" and m["kernel"][0]["header"].startswith("Invalid __global__")
    clean = s.parse_log("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
    assert s.verdict("memcheck", clean, 0, False, {"results": [{"name": "x", "ok": True}]}) == (True, [])
    assert not s.verdict("memcheck", clean, 0, False, {"results": [{"name": "x", "ok": False}]})[0]
    assert not s.verdict("memcheck", s.parse_log("========= COMPUTE-SANITIZER\n"), None, True, None)[0]
    host_only = s.parse_log(MEMCHECK_LOG.replace("2 errors", "1 error").split("@@sanitize-spec gemm")[0]
                            + "========= ERROR SUMMARY: 1 error\n")
    assert s.verdict("memcheck", host_only, 0, False, {"results": []}) == (True, [])
    assert s.verdict("memcheck", host_only, s.SANITIZER_ERROR_EXIT, False, {"results": []}) == (True, [])
    assert not s.verdict("memcheck", clean, s.SANITIZER_ERROR_EXIT, False, {"results": []})[0]


def test_sanitizer_specs_cover_every_specialization():
    """The script's specs build every forward table entry (head dim x full/causal/local, bf16), an
    fp16 one, varlen and softcap at several head dims, both long-query kernels and the four GEMMs;
    every spec sits in a group, and --quick names existing specs."""
    from numba_fa3.tiles import SUPPORTED_HEAD_DIMS, has_long_tiles
    s = _sanitize()
    dense = {(x.d, x.mask) for x in s.SPECS if x.kind == "dense" and x.dtype == "bf16" and not x.softcap
             and not has_long_tiles(x.d, x.mask != "full", x.shape[1])}
    assert dense >= {(d, m) for d in SUPPORTED_HEAD_DIMS for m in ("full", "causal", "local")}
    assert any(x.dtype == "f16" for x in s.SPECS)
    assert {x.d for x in s.SPECS if x.kind == "varlen"} == set(SUPPORTED_HEAD_DIMS)
    assert sum(bool(x.softcap) for x in s.SPECS) >= 3
    assert {x.mask for x in s.SPECS if x.kind == "dense" and has_long_tiles(x.d, x.mask != "full", x.shape[1])} \
        == {"causal", "local"}
    assert {(x.out, x.transpose_b) for x in s.SPECS if x.kind == "gemm"} == {(o, t) for o in ("bf16", "f32")
                                                                             for t in (True, False)}
    assert len(s.SPECS_BY_NAME) == len(s.SPECS)
    assert set(sum(s.QUICK.values(), [])) <= set(s.SPECS_BY_NAME)
    assert s.main(["--list", "--quick"]) == 0


def test_sanitizer_specs_cover_the_backward():
    """The backward specs build every backward head dim full and causal, a window, soft-cap,
    fp16, varlen and deterministic mode, each with more tiles (key blocks x key heads x batch)
    than the capped grid has CTAs, so CTAs run several tiles."""
    from numba_fa3.tiles import BACKWARD_HEAD_DIMS
    s = _sanitize()
    bwd = [x for x in s.SPECS if x.kind.startswith("bwd")]
    assert {(x.d, x.mask) for x in bwd if x.kind == "bwd_dense"} >= {(d, m) for d in BACKWARD_HEAD_DIMS
                                                                      for m in ("full", "causal")}
    assert any(x.mask not in ("full", "causal") for x in bwd)
    assert any(x.softcap for x in bwd) and any(x.dtype == "f16" for x in bwd)
    assert any(x.kind == "bwd_varlen" for x in bwd) and any(x.deterministic for x in bwd)
