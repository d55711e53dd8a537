"""Every kernel specialization the library builds (forward, backward, GEMM), run under
compute-sanitizer's memcheck, racecheck, synccheck and initcheck on small shapes with several
tiles per CTA (issue 22).

    python tests/sanitize.py                          # all tools, every spec (a Hopper machine)
    python tests/sanitize.py --quick --tools racecheck
    python tests/sanitize.py --specs 'd256_*' --split  # one child per spec: exact attribution
    python tests/sanitize.py --specs 'bwd*' --tools racecheck,memcheck  # the backward specs
    python tests/sanitize.py --list                   # the specs and their groups, no GPU needed

One child process per (tool, group of specs): `compute-sanitizer --tool T --report-api-errors no
... python tests/sanitize.py --child SPEC,...`.  The child runs each spec once (`run_specs`),
checks its output against numba_fa3.reference (FA3's tolerance rule, as tests/test_forward.py
and tests/test_backward.py; outputs NaN-poisoned so every element must be written) and writes its
results as JSON.  A backward spec runs the forward for out and LSE, then the backward's three
kernels (preprocess, main kernel, postprocess).  The persistent grid is capped at --ctas CTAs in
the child (`primitives.launch.sm_count` replaced), so each CTA runs several tiles and the producer
reuses its Q buffer, tile slot and K/V stages (the backward's: K/V, the Q/dO ring, dS).

The run fails (exit 1) on any kernel-side report (errors, hazards of any severity), on a wrong
result, on a child that timed out or did not finish, and prints a table: one row per spec, one
column per tool.  Reports are attributed to a spec through markers the child prints before each
spec (best effort: the group's totals are what pass or fail).  JSON summary: --out (default
bench/results/sanitize.json).  Without a Hopper GPU it prints a skip message and exits 0.
"""
import argparse
import concurrent.futures
import datetime
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
#: The child prints this before each spec; the parser attributes later reports to that spec.
MARKER = "@@sanitize-spec "
#: compute-sanitizer exits with this when it found errors (our child exits 1 on a wrong result).
SANITIZER_ERROR_EXIT = 86
#: Persistent grid cap in the children: with the shapes below, 4-8 forward tiles per CTA and
#: 2-5 backward tiles (the backward's tiles are whole key blocks, fewer and longer).
DEFAULT_CTAS = 12


# --- the specs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One kernel specialization and the call that runs it.
    dense, bwd_dense: shape (batch, seqlen_q, seqlen_k, heads, kv_heads); varlen, bwd_varlen:
    (lens_q, lens_k, heads, kv_heads); gemm: (m, n, k), with out (bf16 / f32) and transpose_b.
    deterministic: the backward's fixed-order dQ (its own kernel specialization)."""
    name: str
    kind: str
    group: str
    shape: tuple
    d: int = 0
    mask: str = "full"
    window: tuple = (-1, -1)
    dtype: str = "bf16"
    softcap: float = 0.0
    out: str = "bf16"
    transpose_b: bool = True
    deterministic: bool = False

    @property
    def backward(self):
        """Whether the spec runs flash_attn(_varlen)_backward (after the forward for out and LSE)."""
        return self.kind.startswith("bwd_")

    def kernel(self):
        """What the spec builds, in words (for the table and the JSON)."""
        if self.kind == "gemm":
            return f"gemm {self.dtype}->{self.out} transpose_b={self.transpose_b}"
        if self.backward:
            return (f"backward {self.dtype} d{self.d} {self.mask}" + (" softcap" if self.softcap else "")
                    + (" varlen" if self.kind == "bwd_varlen" else "")
                    + (" deterministic" if self.deterministic else ""))
        if self.kind == "fp8":
            return (f"fp8 forward d{self.d} {self.mask}" + (" softcap" if self.softcap else "")
                    + " (with the quantizer and V's rearranging pass)")
        from numba_fa3.tiles import has_long_tiles
        long = self.kind == "dense" and has_long_tiles(self.d, self.mask != "full", self.shape[1])
        return (f"forward {self.dtype} d{self.d} {self.mask}" + (" softcap" if self.softcap else "")
                + (" varlen" if self.kind == "varlen" else "") + (" long-query tiles" if long else ""))

    def tiles(self):
        """The backward main kernel's persistent tiles, (key block, key head, batch) as
        FlashBackward.launch counts them (varlen: key blocks of the longest key sequence for every
        sequence); None for the other kinds."""
        if not self.backward:
            return None
        from numba_fa3.tiles import backward_tiles_for
        if self.kind == "bwd_dense":
            b, _, sk, _, hk = self.shape
        else:
            lens_k, hk = self.shape[1], self.shape[3]
            b, sk = len(lens_k), max(lens_k)
        return -(-sk // backward_tiles_for(self.d).block_n) * hk * b


def _dense(name, group, d, mask, shape, **kw):
    return Spec(name, "dense", group, shape, d=d, mask=mask, **kw)


def _varlen(name, group, d, mask, lens_q, lens_k, h, hk, kind="varlen", **kw):
    return Spec(name, kind, group, (tuple(lens_q), tuple(lens_k), h, hk), d=d, mask=mask, **kw)


def _bwd(name, group, d, mask, shape, **kw):
    return Spec(name, "bwd_dense", group, shape, d=d, mask=mask, **kw)


def _bwd_varlen(name, group, d, mask, lens_q, lens_k, h, hk, **kw):
    return _varlen(name, group, d, mask, lens_q, lens_k, h, hk, kind="bwd_varlen", **kw)


#: Shapes: ragged lengths, GQA, Sq != Sk; causal with Sq > Sk (d128, d192) gives tiles that see no
#: key at all (their Q buffer released without a key block); d256 full / causal are the issue's
#: shapes (batch 2, 1024 tokens, 4 heads; GQA 4:1 with Sq 1023 / Sk 1025).
SPECS = [
    _dense("d64_full", "d64", 64, "full", (2, 1000, 900, 4, 2)),
    _dense("d64_causal", "d64", 64, "causal", (2, 900, 1000, 4, 1)),
    _dense("d64_local", "d64", 64, "local", (2, 1000, 1000, 4, 2), window=(150, 60)),
    _varlen("v64_full", "d64", 64, "full", [0, 1, 300, 129, 700, 17], [5, 1, 300, 200, 650, 0], 4, 2),
    _dense("d96_full", "d96", 96, "full", (2, 777, 800, 4, 2)),
    _dense("d96_causal", "d96", 96, "causal", (2, 777, 800, 4, 4)),
    _dense("d96_local", "d96", 96, "local", (2, 800, 777, 4, 2), window=(100, 40)),
    _varlen("v96_local", "d96", 96, "local", [300, 450, 2], [280, 500, 2], 4, 2, window=(100, 50)),
    _dense("d128_full", "d128", 128, "full", (2, 1023, 1025, 4, 2)),
    _dense("d128_causal", "d128", 128, "causal", (2, 1000, 700, 4, 4)),
    _dense("d128_local", "d128", 128, "local", (2, 900, 1100, 4, 2), window=(200, 30)),
    _dense("d128_causal_f16", "d128", 128, "causal", (2, 600, 600, 3, 1), dtype="f16"),
    _dense("d128_full_softcap", "d128", 128, "full", (2, 700, 500, 4, 2), softcap=30.0),
    _dense("d192_full", "d192", 192, "full", (2, 700, 800, 4, 1)),
    _dense("d192_causal", "d192", 192, "causal", (2, 800, 650, 4, 2)),
    _dense("d192_local", "d192", 192, "local", (2, 640, 640, 4, 4), window=(100, 100)),
    _varlen("v192_full_softcap", "d192", 192, "full", [500, 80, 300], [300, 800, 1], 4, 2, softcap=15.0),
    _dense("d256_full", "d256", 256, "full", (2, 1024, 1024, 4, 4)),
    _dense("d256_causal", "d256", 256, "causal", (2, 1023, 1025, 4, 1)),
    _dense("d256_local", "d256", 256, "local", (2, 700, 760, 4, 2), window=(250, 20)),
    _dense("d256_causal_softcap", "d256", 256, "causal", (1, 900, 900, 4, 2), softcap=20.0),
    _varlen("v128_causal", "varlen", 128, "causal", [129, 0, 700, 33], [200, 17, 650, 70], 4, 2),
    _varlen("v256_causal", "varlen", 256, "causal", [600, 255, 1], [640, 255, 9], 4, 1),
    _dense("long64_causal", "long", 64, "causal", (1, 4099, 4099, 2, 1)),
    _dense("long64_local", "long", 64, "local", (1, 4100, 3900, 2, 2), window=(300, 40)),
    Spec("gemm_bf16_nt", "gemm", "gemm", (1000, 1304, 520), out="bf16", transpose_b=True),
    Spec("gemm_bf16_nn", "gemm", "gemm", (1000, 1304, 520), out="bf16", transpose_b=False),
    Spec("gemm_f32_nt", "gemm", "gemm", (777, 1000, 264), out="f32", transpose_b=True),
    Spec("gemm_f32_nn", "gemm", "gemm", (777, 1000, 264), out="f32", transpose_b=False),
]

#: The backward, every head dim of tiles.BACKWARD_HEAD_DIMS full and causal, a local window,
#: softcap, fp16, GQA 2:1 and MQA, Sq > Sk and Sq < Sk at odd lengths, varlen with empty and
#: 1-token sequences, and the deterministic dQ (its semaphores waited on across CTAs).  Each spec
#: has at least twice DEFAULT_CTAS tiles (the count after each), so CTAs load K and V again and
#: refill the Q/dO ring and dS buffers of the tile before.  Sizes: at most 3.6e8 visible
#: B H Sq Sk D, a third of d128_full's 1.1e9, so with the backward's 2.5x the forward's FLOPs a
#: backward spec costs the sanitizers about what a forward one does.  Racecheck's time grows with
#: the shared-memory traffic, so grow these shapes only with a reason.
SPECS += [
    _bwd("bwd64_full", "bwd64", 64, "full", (2, 300, 799, 4, 2)),                   # 28 tiles
    _bwd("bwd64_causal", "bwd64", 64, "causal", (4, 799, 700, 4, 1)),               # 24; rows 0-98 see no key
    _bwd("bwd96_full", "bwd96", 96, "full", (3, 601, 513, 4, 2)),                   # 30
    _bwd("bwd96_causal_f16", "bwd96", 96, "causal", (2, 113, 799, 4, 4), dtype="f16"),  # 56
    _bwd("bwd96_local", "bwd96", 96, "local", (2, 800, 777, 4, 2), window=(100, 40)),  # 28
    _bwd("bwd128_full", "bwd128", 128, "full", (2, 300, 1025, 4, 2)),               # 36
    _bwd("bwd128_causal", "bwd128", 128, "causal", (2, 799, 640, 4, 4)),            # 40; rows 0-158 see no key
    # keys 0-135 are seen by no query: key block 0 is a tile with no query block at all
    _bwd("bwd128_local", "bwd128", 128, "local", (2, 900, 1100, 4, 2), window=(64, 0)),  # 36
    _bwd("bwd128_full_softcap", "bwd128", 128, "full", (2, 255, 1000, 4, 2), softcap=30.0),  # 32
    _bwd("bwd128_causal_det", "bwd-det", 128, "causal", (2, 300, 1100, 4, 2), deterministic=True),  # 36
    # D = 192 and 256: the column split (64-key blocks; two unequal consumers at 192)
    _bwd("bwd192_full", "bwd192", 192, "full", (2, 300, 700, 4, 2)),               # 44
    _bwd("bwd192_causal_f16", "bwd192", 192, "causal", (2, 600, 500, 4, 2), dtype="f16"),  # 32
    _bwd("bwd256_full", "bwd256", 256, "full", (2, 300, 500, 4, 2)),               # 32
    _bwd("bwd256_causal", "bwd256", 256, "causal", (2, 500, 500, 4, 2)),           # 32
    _bwd_varlen("bwd_v64_full", "bwd-varlen", 64, "full", [0, 1, 300, 129, 17, 250],
                [5, 1, 300, 200, 0, 380], 4, 2),                                     # 36
    _bwd_varlen("bwd_v96_local_softcap", "bwd-varlen", 96, "local", [300, 1, 450, 0, 77], [280, 0, 640, 3, 129],
                4, 1, window=(100, 50), softcap=15.0, dtype="f16"),                  # 25
    _bwd_varlen("bwd_v128_causal_det", "bwd-det", 128, "causal", [129, 0, 700, 1, 33],
                [200, 17, 650, 1, 70], 4, 2, deterministic=True),                   # 60
]
#: The FP8 forward (`forward_fp8`) with its V rearranging pass and the quantizer
#: (precision="fp8"): every head dim, full / causal / local, soft-cap, GQA, ragged lengths, Sq != Sk.
SPECS += [
    Spec("fp8_128_full", "fp8", "fp8", (2, 1000, 777, 4, 2), d=128),
    Spec("fp8_128_local", "fp8", "fp8", (2, 700, 900, 4, 1), d=128, mask="local", window=(150, 40)),
    Spec("fp8_256_causal", "fp8", "fp8", (2, 1023, 1025, 4, 2), d=256, mask="causal"),
    Spec("fp8_64_causal_softcap", "fp8", "fp8", (2, 777, 1000, 4, 1), d=64, mask="causal", softcap=3.0),
]
SPECS_BY_NAME = {s.name: s for s in SPECS}

#: --quick: the issue's kernels (hdim 256 full / causal), Q in registers (hdim 128), three
#: consumer warpgroups (hdim 64 full), varlen's register epilogue, the GEMM, the backward (dense
#: with rows that see no key; varlen with the deterministic dQ); three groups.
QUICK = {"quick-a": ["d256_full", "d256_causal", "d128_full"],
         "quick-b": ["d64_full", "v128_causal", "gemm_bf16_nt"],
         "quick-c": ["bwd128_causal", "bwd_v128_causal_det"]}


# --- the child: run specs, check results ---------------------------------------------------------

def _seed(name):
    return zlib.crc32(name.encode())


def _torch():
    try:
        import torch
        return torch if torch.cuda.is_available() else None
    except ImportError:
        return None


def _cuda(torch, x, dtype):
    """A NumPy bf16/fp16 array as a torch CUDA tensor, through its bits (torch.from_numpy has no
    bfloat16)."""
    import numpy as np
    tdt = torch.bfloat16 if dtype == "bf16" else torch.float16
    return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).cuda().view(tdt)


def _numpy(t, npdt):
    """A torch bf16/fp16 CUDA tensor back as NumPy of npdt, through its bits."""
    import torch
    return t.view(torch.int16).cpu().numpy().view(npdt)


def _compare_attention(out, lse, ref, ref_lse, low, rows_without_keys=None):
    """FA3's tolerance rule (tests/test_forward.py): messages for what is off, [] if right."""
    import numpy as np
    problems = []
    out = np.asarray(out, dtype=np.float64)
    if not np.isfinite(out).all():
        problems.append(f"{int((~np.isfinite(out)).sum())} non-finite outputs (unwritten: NaN-poisoned)")
        return problems
    err, low_err = np.abs(out - ref).max(initial=0), np.abs(low - ref).max(initial=0)
    if not err <= 2 * low_err + 1e-3:
        problems.append(f"max error {err:.3g} > 2 x low-precision error {low_err:.3g} + 1e-3")
    finite = np.isfinite(ref_lse)
    if not np.array_equal(np.isfinite(lse), finite):
        problems.append("LSE -inf pattern differs from the reference")
    elif finite.any():
        lerr = np.abs(lse[finite] - ref_lse[finite]).max()
        if not lerr <= 1e-3 * (1 + np.abs(ref_lse[finite]).max()):
            problems.append(f"LSE max error {lerr:.3g}")
    if rows_without_keys is not None and not (out[rows_without_keys] == 0).all():
        problems.append("rows that see no key are not 0")
    return problems


def _run_dense(spec, torch):
    import numpy as np
    from numba_fa3 import flash_attn
    from numba_fa3.reference import attention_lowprec, attention_reference
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    b, sq, sk, h, hk = spec.shape
    npdt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(_seed(spec.name))
    q = rng.standard_normal((b, sq, h, spec.d)).astype(npdt)
    k = rng.standard_normal((b, sk, hk, spec.d)).astype(npdt)
    v = rng.standard_normal((b, sk, hk, spec.d)).astype(npdt)
    kw = dict(causal=spec.mask == "causal", window_size=spec.window, softcap=spec.softcap)
    if torch is not None:
        tq, tk, tv = (_cuda(torch, x, spec.dtype) for x in (q, k, v))
        out = torch.full_like(tq, float("nan"))
        _, lse = flash_attn(tq, tk, tv, return_lse=True, out=out, **kw)
        torch.cuda.synchronize()
        out = _numpy(out, npdt)
        lse = lse.cpu().numpy()
    else:
        out, lse = flash_attn(q, k, v, return_lse=True, **kw)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, **kw)
    low = attention_lowprec(q, k, v, storage_dtype=npdt, **kw).astype(np.float64)
    return _compare_attention(out, lse, ref, ref_lse, low, ~np.isfinite(ref_lse).transpose(0, 2, 1))


def _run_varlen(spec, torch):
    import numpy as np
    from numba_fa3 import flash_attn_varlen
    from numba_fa3.reference import attention_lowprec, attention_reference_varlen
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    lens_q, lens_k, h, hk = spec.shape
    npdt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(_seed(spec.name))
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], h, spec.d)).astype(npdt)
    k = rng.standard_normal((cu_k[-1], hk, spec.d)).astype(npdt)
    v = rng.standard_normal((cu_k[-1], hk, spec.d)).astype(npdt)
    kw = dict(causal=spec.mask == "causal", window_size=spec.window, softcap=spec.softcap)
    mq, mk = max(lens_q), max(lens_k)
    if torch is not None:
        tq, tk, tv = (_cuda(torch, x, spec.dtype) for x in (q, k, v))
        out = torch.full_like(tq, float("nan"))
        cq, ck = torch.from_numpy(cu_q).cuda(), torch.from_numpy(cu_k).cuda()
        _, lse = flash_attn_varlen(tq, tk, tv, cq, ck, mq, mk, return_lse=True, out=out, **kw)
        torch.cuda.synchronize()
        out = _numpy(out, npdt)
        lse = lse.cpu().numpy()
    else:
        out, lse = flash_attn_varlen(q, k, v, cu_q, cu_k, mq, mk, return_lse=True, **kw)
    ref, ref_lse = attention_reference_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    low = np.zeros_like(ref)
    for i in range(len(lens_q)):
        if lens_q[i]:
            sl, kl = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
            low[sl] = attention_lowprec(q[None, sl], k[None, kl], v[None, kl], storage_dtype=npdt, **kw)[0]
    return _compare_attention(out, lse, ref, ref_lse, low, ~np.isfinite(ref_lse).T)


def _run_gemm(spec, torch):
    import numpy as np
    from numba_fa3.primitives import gemm
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    m, n, k = spec.shape
    npdt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(_seed(spec.name))
    a = rng.standard_normal((m, k)).astype(npdt)
    b = rng.standard_normal((n, k) if spec.transpose_b else (k, n)).astype(npdt)
    if torch is not None:
        ta, tb = (_cuda(torch, x, spec.dtype) for x in (a, b))
        out = torch.full((m, n), float("nan"), device="cuda",
                         dtype={"bf16": torch.bfloat16, "f32": torch.float32}[spec.out])
        gemm.matmul(ta, tb, out=out, transpose_b=spec.transpose_b)
        torch.cuda.synchronize()
        out = out.double().cpu().numpy()
    else:
        out = np.asarray(gemm.matmul(a, b, transpose_b=spec.transpose_b, out_dtype=spec.out), np.float64)
    ref = a.astype(np.float64) @ (b.astype(np.float64).T if spec.transpose_b else b.astype(np.float64))
    if not np.isfinite(out).all():
        return [f"{int((~np.isfinite(out)).sum())} non-finite outputs (unwritten: NaN-poisoned)"]
    eps = {"f32": 2.0 ** -23 * np.sqrt(k) * 4, "bf16": 2.0 ** -8}[spec.out]
    err = np.abs(out - ref).max() / np.abs(ref).max()
    return [] if err <= 2 * eps + 1e-6 else [f"max error {err:.3g} relative to max|ref| (bound {2 * eps:.3g})"]


def _compare_grads(got, model, ref, npdt, no_key, no_query):
    """FA3's tolerance rule as tests/test_backward.py applies it, messages for what is off, [] if
    right: each of dq, dk, dv (`got`) within 2x the max error of the blocked model (`model`, the
    same computation in the input precision, fed the kernel's out and LSE) against the float64
    `ref`, plus eps * max|gradient|; every element written (the outputs were NaN-poisoned); dq
    exactly 0 on the rows that see no key (`no_key`) and dk, dv exactly 0 on the keys that no
    query sees (`no_query`), boolean masks over the sequence axis (the one before the heads)."""
    import ml_dtypes
    import numpy as np
    eps = float(ml_dtypes.finfo(npdt).eps)
    problems = []
    for name, g, m, r in zip(("dq", "dk", "dv"), got, model, ref):
        g = np.asarray(g, np.float64)
        if not np.isfinite(g).all():
            problems.append(f"{name}: {int((~np.isfinite(g)).sum())} non-finite (unwritten: NaN-poisoned)")
            continue
        err = np.abs(g - r).max(initial=0)
        low = np.abs(np.asarray(m, np.float64) - r).max(initial=0)
        atol = eps * max(1e-3, float(np.abs(r).max(initial=0)))
        if not err <= 2 * low + atol:
            problems.append(f"{name}: max error {err:.3g} > 2 x blocked model's {low:.3g} + {atol:.3g}")
        unseen = no_key if name == "dq" else no_query
        if not (np.take(g, np.flatnonzero(unseen), axis=-3) == 0).all():
            where = "rows that see no key" if name == "dq" else "keys that no query sees"
            problems.append(f"{name}: not 0 on {where}")
    return problems


def _backward(spec, torch, forward, backward, args, q, k, v, dout, npdt):
    """The forward (out, LSE) then the backward of `spec`, `args` after the first six arguments
    of each (varlen: cu_seqlens and max_seqlen): ([dq, dk, dv], out, lse) as NumPy, the options
    and problems.  With torch, dq, dk, dv are preallocated and NaN-poisoned (every element must be
    written) and must be the tensors returned; without it, NumPy in and out."""
    kw = dict(causal=spec.mask == "causal", window_size=spec.window, softcap=spec.softcap)
    problems = []
    if torch is not None:
        tq, tk, tv, tdo = (_cuda(torch, x, spec.dtype) for x in (q, k, v, dout))
        out, lse = forward(tq, tk, tv, *args, return_lse=True, **kw)
        pre = [torch.full_like(x, float("nan")) for x in (tq, tk, tv)]
        got = backward(tdo, tq, tk, tv, out, lse, *args, deterministic=spec.deterministic,
                       dq=pre[0], dk=pre[1], dv=pre[2], **kw)
        torch.cuda.synchronize()
        if not all(g is p for g, p in zip(got, pre)):
            problems.append("dq, dk, dv returned are not the preallocated ones")
        grads = [_numpy(g, npdt) for g in pre]
        out, lse = _numpy(out, npdt), lse.cpu().numpy()
    else:
        out, lse = forward(q, k, v, *args, return_lse=True, **kw)
        grads = backward(dout, q, k, v, out, lse, *args, deterministic=spec.deterministic, **kw)
    return grads, out, lse, kw, problems


def _run_bwd_dense(spec, torch):
    import numpy as np
    from numba_fa3 import flash_attn, flash_attn_backward
    from numba_fa3.blocked_backward import attention_backward_blocked
    from numba_fa3.reference import attention_backward_reference, attention_mask
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    b, sq, sk, h, hk = spec.shape
    npdt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(_seed(spec.name))
    q, dout = (rng.standard_normal((b, sq, h, spec.d)).astype(npdt) for _ in range(2))
    k, v = (rng.standard_normal((b, sk, hk, spec.d)).astype(npdt) for _ in range(2))
    grads, out, lse, kw, problems = _backward(spec, torch, flash_attn, flash_attn_backward, (), q, k, v, dout, npdt)
    ref = attention_backward_reference(dout, q, k, v, **kw)
    model = attention_backward_blocked(dout, q, k, v, out, lse, storage_dtype=npdt, **kw)
    vis = attention_mask(sq, sk, kw["causal"], kw["window_size"])
    return problems + _compare_grads(grads, model, ref, npdt, ~vis.any(axis=1), ~vis.any(axis=0))


def _run_bwd_varlen(spec, torch):
    import numpy as np
    from numba_fa3 import flash_attn_varlen, flash_attn_varlen_backward
    from numba_fa3.blocked_backward import attention_backward_blocked
    from numba_fa3.reference import attention_backward_reference_varlen, attention_mask
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    lens_q, lens_k, h, hk = spec.shape
    npdt = NUMPY_DTYPES[spec.dtype]
    rng = np.random.default_rng(_seed(spec.name))
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, dout = (rng.standard_normal((cu_q[-1], h, spec.d)).astype(npdt) for _ in range(2))
    k, v = (rng.standard_normal((cu_k[-1], hk, spec.d)).astype(npdt) for _ in range(2))
    cu = (torch.from_numpy(cu_q).cuda(), torch.from_numpy(cu_k).cuda()) if torch is not None else (cu_q, cu_k)
    grads, out, lse, kw, problems = _backward(spec, torch, flash_attn_varlen, flash_attn_varlen_backward,
                                              cu + (max(lens_q), max(lens_k)), q, k, v, dout, npdt)
    ref = attention_backward_reference_varlen(dout, q, k, v, cu_q, cu_k, **kw)
    # the blocked model per sequence, as the reference: each sequence's blocks start at its first row
    model = [np.zeros(x.shape, np.float32) for x in (q, k, v)]
    no_key, no_query = np.zeros(len(q), bool), np.zeros(len(k), bool)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        vis = attention_mask(lq, lk, kw["causal"], kw["window_size"])
        no_key[rows], no_query[keys] = ~vis.any(axis=1), ~vis.any(axis=0)
        if lq and lk:
            g = attention_backward_blocked(dout[None, rows], q[None, rows], k[None, keys], v[None, keys],
                                           out[None, rows], lse[None, :, rows], storage_dtype=npdt, **kw)
            for m, x, span in zip(model, g, (rows, keys, keys)):
                m[span] = x[0]
    return problems + _compare_grads(grads, model, ref, npdt, no_key, no_query)


def _run_fp8(spec, torch):
    """flash_attn(precision="fp8") from bf16 inputs: the quantizer, the V rearranging pass and
    the FP8 kernel; the output against the exact attention within FP8's error (a tenth of the
    output's RMS: the model's error on these inputs is about 2%)."""
    import numpy as np
    from numba_fa3 import flash_attn
    from numba_fa3.reference import attention_reference
    from numba_fa3.primitives.tensors import NUMPY_DTYPES
    if torch is None:
        return ["the FP8 path takes GPU arrays: torch with CUDA is needed"]
    b, sq, sk, h, hk = spec.shape
    npdt = NUMPY_DTYPES["bf16"]
    rng = np.random.default_rng(_seed(spec.name))
    q = rng.standard_normal((b, sq, h, spec.d)).astype(npdt)
    k = rng.standard_normal((b, sk, hk, spec.d)).astype(npdt)
    v = rng.standard_normal((b, sk, hk, spec.d)).astype(npdt)
    kw = dict(causal=spec.mask == "causal", window_size=spec.window, softcap=spec.softcap)
    tq, tk, tv = (_cuda(torch, x, "bf16") for x in (q, k, v))
    out = torch.full_like(tq, float("nan"))
    flash_attn(tq, tk, tv, out=out, precision="fp8", **kw)
    torch.cuda.synchronize()
    got = np.asarray(_numpy(out, npdt), dtype=np.float64)
    ref = attention_reference(q, k, v, **kw)
    if not np.isfinite(got).all():
        return [f"{int((~np.isfinite(got)).sum())} non-finite outputs (unwritten: NaN-poisoned)"]
    rms = float(np.sqrt(np.mean(np.square(got - ref)))) / float(np.sqrt(np.mean(np.square(ref))))
    return [] if rms <= 0.1 else [f"relative RMS error {rms:.3g} > 0.1"]


RUNNERS = {"dense": _run_dense, "varlen": _run_varlen, "gemm": _run_gemm,
           "bwd_dense": _run_bwd_dense, "bwd_varlen": _run_bwd_varlen, "fp8": _run_fp8}


def run_specs(names, ctas=DEFAULT_CTAS, result_path=None):
    """Run the named specs in this process (under the sanitizer, in the parent's children): each
    one launch, its output checked.  ctas > 0 caps the persistent grid.  Writes
    [{name, kernel, ok, problems, seconds}] to result_path; returns 0 if every spec was right."""
    from numba import cuda
    cuda.current_context()  # attach to the device (and the sanitizer) before the slow imports
    torch = _torch()
    from numba_fa3.primitives import launch
    if ctas:
        launch.sm_count = lambda: int(ctas)  # read per launch by forward.py, backward.py and gemm.py
    results = []
    for name in names:
        spec = SPECS_BY_NAME[name]
        print(MARKER + name, flush=True)
        t0 = time.time()
        try:
            problems = RUNNERS[spec.kind](spec, torch)
        except Exception as e:  # noqa: BLE001 - reported per spec, the rest still run
            problems = [f"{type(e).__name__}: {e}"]
            traceback.print_exc()
        try:
            cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - a sticky error: later specs will say so too
            problems.append(f"synchronize: {type(e).__name__}: {e}")
        results.append(dict(name=name, kernel=spec.kernel(), ok=not problems, problems=problems,
                            seconds=round(time.time() - t0, 1)))
        print(f"{name}: {'ok' if not problems else 'WRONG: ' + '; '.join(problems)} ({results[-1]['seconds']} s)",
              flush=True)
    print(MARKER + "(end)", flush=True)
    if result_path:
        with open(result_path, "w") as f:
            json.dump(dict(torch=torch is not None, ctas=ctas, results=results), f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


# --- the sanitizer's output ----------------------------------------------------------------------

_PREFIX = "========= "
_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_HAZARDS = re.compile(r"\[(\d+) hazards?\]")
#: Report headers that are about the host side or the process, not a kernel.
_HOST = ("on CUDA API call", "Program hit", "Target application returned", "process didn't terminate",
         "Saved host backtrace")
#: Headers that are the tool's notes, not findings (still listed in the JSON).
_NOTES = ("COMPUTE-SANITIZER", "ERROR SUMMARY", "RACECHECK SUMMARY", "LEAK SUMMARY", "CHECK SUMMARY")


def parse_log(text):
    """What compute-sanitizer said in `text` (its output, with the child's markers among it):
    dict(summary=bool: a summary line was seen, errors: ERROR SUMMARY's count, race=(hazards,
    errors, warnings) or None, kernel=[report], host=[report], notes=[line]), a report being
    dict(spec, header, detail=[first lines], hazards).  Kernel-side reports are the headers
    ("========= X", X not indented) that are neither host-side nor summaries."""
    out = dict(summary=False, errors=0, race=None, kernel=[], host=[], notes=[])
    spec, current = None, None
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.startswith(MARKER):
            spec, current = line[len(MARKER):].strip(), None
            spec = None if spec == "(end)" else spec  # reports after the last spec: the group's
            continue
        i = line.find(_PREFIX.rstrip())
        if i < 0:
            continue
        body = line[i + len(_PREFIX.rstrip()):]
        if not body.strip():
            current = None
            continue
        m = _ERROR_SUMMARY.search(body)
        if m:
            out["summary"], out["errors"] = True, out["errors"] + int(m.group(1))
            current = None
            continue
        m = _RACE_SUMMARY.search(body)
        if m:
            out["summary"] = True
            out["race"] = tuple(int(g) for g in m.groups())
            current = None
            continue
        if body.startswith("  ") or body.startswith("\t"):
            # a report's detail line ("=========     at ...", "and Write access at ... [256 hazards]")
            if current is not None:
                if len(current["detail"]) < 12:
                    current["detail"].append(body.strip())
                h = _HAZARDS.search(body)
                if h:
                    current["hazards"] += int(h.group(1))
            continue
        head = body.strip()
        if any(n in head for n in _NOTES):
            current = None
            continue
        current = dict(spec=spec, header=head, detail=[], hazards=0)
        h = _HAZARDS.search(head)
        if h:
            current["hazards"] += int(h.group(1))
        if any(x in head for x in _HOST):
            out["host"].append(current)
        elif head.startswith("Warning:") and "Race" not in head and "hazard" not in head.lower():
            out["notes"].append(head)
            current = None
        else:
            out["kernel"].append(current)
    return out


def verdict(tool, parsed, rc, timed_out, results):
    """(ok, [reasons]) of one child's run."""
    reasons = []
    if timed_out:
        reasons.append("timed out")
    if not parsed["summary"] and not timed_out:
        reasons.append("no sanitizer summary (crashed or did not finish)")
    if parsed["kernel"]:
        reasons.append(f"{len(parsed['kernel'])} kernel-side report(s)")
    host_errors = len(parsed["host"])
    if parsed["errors"] > host_errors and not parsed["kernel"]:
        reasons.append(f"ERROR SUMMARY counts {parsed['errors']} errors, {host_errors} of them host-side")
    if parsed["race"] and parsed["race"][0]:
        reasons.append("racecheck: {} hazard(s) ({} errors, {} warnings)".format(*parsed["race"]))
    if any("num-cuda-barriers" in n for n in parsed["notes"]):
        reasons.append("the sanitizer ran out of barrier tracking slots: pass --sanitizer-args '--num-cuda-barriers 32'")
    if results is None:
        if not timed_out:
            reasons.append(f"the child wrote no results (exit {rc})")
    else:
        bad = [r["name"] for r in results["results"] if not r["ok"]]
        if bad:
            reasons.append("wrong results: " + ", ".join(bad))
    host_only = rc == SANITIZER_ERROR_EXIT and parsed["host"] and parsed["errors"] <= host_errors
    if rc not in (0, None) and not reasons and not host_only:
        reasons.append(f"exit status {rc}")
    return not reasons, reasons


# --- the parent ----------------------------------------------------------------------------------

def find_sanitizer():
    env = os.environ.get("COMPUTE_SANITIZER")
    if env:
        return env
    exe = shutil.which("compute-sanitizer")
    if exe:
        return exe
    cands = (["/usr/local/cuda/bin/compute-sanitizer", "/usr/local/cuda/compute-sanitizer/compute-sanitizer"]
             + sorted(glob.glob("/usr/local/cuda-*/bin/compute-sanitizer"), reverse=True)
             + sorted(glob.glob("/opt/nvidia/*/compute-sanitizer"), reverse=True)
             + sorted(glob.glob("/opt/nvidia/**/compute-sanitizer", recursive=True), reverse=True))
    return next((c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)), None)


def hopper_available(timeout=180):
    """Whether an sm_90 GPU is visible, asked in a child so this process holds no CUDA context."""
    code = ("import sys\ntry:\n from numba import cuda\n ok = cuda.is_available() and "
            "cuda.get_current_device().compute_capability == (9, 0)\nexcept Exception:\n ok = False\n"
            "sys.exit(0 if ok else 3)")
    try:
        return subprocess.run([sys.executable, "-c", code], timeout=timeout, capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _supported(exe, flags):
    """The flags (option names) that `exe --help` mentions; the others are dropped with a note."""
    try:
        text = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set(flags)
    return {f for f in flags if f in text}


def sanitizer_command(exe, tool, supported, extra=()):
    cmd = [exe, "--tool", tool]
    for flag, value in (("--report-api-errors", "no"), ("--error-exitcode", str(SANITIZER_ERROR_EXIT)),
                        ("--launch-timeout", "600"), ("--print-limit", "200")):
        if flag in supported:
            cmd += [flag, value]
    return cmd + list(extra)


#: The children running now (their process groups are ended if this process is stopped).
_RUNNING = set()


def _end_children(signum, frame):
    for proc in list(_RUNNING):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    print(f"sanitize: stopped by signal {signum}; children ended", flush=True)
    os._exit(1)


@dataclass
class Job:
    tool: str
    group: str
    specs: list
    rc: int = None
    timed_out: bool = False
    seconds: float = 0.0
    parsed: dict = field(default_factory=dict)
    results: dict = None
    ok: bool = False
    reasons: list = field(default_factory=list)
    log: str = ""


def run_job(job, cmd_prefix, ctas, timeout, logdir):
    result = os.path.join(logdir, f"{job.tool}-{job.group}.json")
    job.log = os.path.join(logdir, f"{job.tool}-{job.group}.log")
    cmd = cmd_prefix + [sys.executable, os.path.abspath(__file__), "--child", ",".join(job.specs),
                        "--ctas", str(ctas), "--result", result]
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=ROOT + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    t0 = time.time()
    with open(job.log, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        _RUNNING.add(proc)
        try:
            job.rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            job.timed_out = True
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 60)):
                try:
                    os.killpg(proc.pid, sig)  # the sanitizer and the child it started
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            _RUNNING.discard(proc)
    job.seconds = round(time.time() - t0, 1)
    with open(job.log, errors="replace") as f:
        job.parsed = parse_log(f.read())
    if os.path.exists(result):
        with open(result) as f:
            job.results = json.load(f)
    job.ok, job.reasons = verdict(job.tool, job.parsed, job.rc, job.timed_out, job.results)
    return job


def plan(args):
    """[(group, [spec names])] to run."""
    if args.quick:
        groups = [(g, list(names)) for g, names in QUICK.items()]
    else:
        groups = {}
        for s in SPECS:
            groups.setdefault(s.group, []).append(s.name)
        groups = list(groups.items())
    if args.specs:
        pats = [p for p in args.specs.split(",") if p]
        unknown = [p for p in pats if not any(fnmatch.fnmatch(s.name, p) for s in SPECS)]
        if unknown:
            raise SystemExit(f"no spec matches {unknown}; --list shows them")
        groups = [(g, [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]) for g, names in groups]
        groups = [(g, names) for g, names in groups if names]
    if args.split:
        groups = [(n, [n]) for _, names in groups for n in names]
    return groups


def table(jobs, tools, groups):
    """The summary: one row per spec, one column per tool."""
    cells = {}
    for job in jobs:
        per_spec = {n: [] for n in job.specs}
        for rep in job.parsed.get("kernel", []):
            per_spec.setdefault(rep["spec"] if rep["spec"] in per_spec else "(group)", []).append(rep)
        wrong = {r["name"]: r for r in (job.results or {}).get("results", [])}
        for n in job.specs:
            if job.timed_out:
                cell = "TIMEOUT"
            elif n not in wrong:
                cell = "NOT RUN" if not job.ok else "ok"
            else:
                reps = per_spec.get(n, [])
                hz = sum(r["hazards"] for r in reps)
                cell = "ok" if not reps else (f"{hz} hazards" if hz else f"{len(reps)} reports")
                if not wrong[n]["ok"]:
                    cell = "WRONG" if cell == "ok" else cell + "+WRONG"
                if cell == "ok" and not job.ok:
                    cell = "ok*"  # the spec itself was clean; its group was not (see below)
            cells[n, job.tool] = cell
    names = [n for _, ns in groups for n in ns]
    width = max([len(n) for n in names] + [4]) + 2
    lines = ["spec".ljust(width) + "".join(t.ljust(14) for t in tools)]
    for n in names:
        lines.append(n.ljust(width) + "".join(cells.get((n, t), "-").ljust(14) for t in tools))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python tests/sanitize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated: " + ",".join(TOOLS))
    p.add_argument("--quick", action="store_true", help="the subset: " + ", ".join(sum(QUICK.values(), [])))
    p.add_argument("--specs", help="comma-separated spec names or globs (e.g. 'd256_*,gemm_*')")
    p.add_argument("--split", action="store_true", help="one child per spec (exact attribution, more launches)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "sanitize.json"), help="JSON summary")
    p.add_argument("--ctas", type=int, default=DEFAULT_CTAS, help="persistent grid cap in the children (0: one per SM)")
    p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                   help="children at once (compiles are CPU-bound, ~15 s a kernel)")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per child")
    p.add_argument("--sanitizer", help="compute-sanitizer executable (default: $COMPUTE_SANITIZER, PATH, /usr/local/cuda)")
    p.add_argument("--sanitizer-args", default="", help="extra compute-sanitizer arguments, one string")
    p.add_argument("--logs", help="keep the children's logs in this directory (default: a temporary one)")
    p.add_argument("--list", action="store_true", help="print the specs and groups and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child is not None:
        return run_specs([n for n in args.child.split(",") if n], args.ctas, args.result)

    tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in tools if t not in TOOLS]
    if bad:
        p.error(f"unknown tool(s) {bad}; choose from {TOOLS}")
    groups = plan(args)
    if args.list:
        for g, names in groups:
            print(f"{g}:")
            for n in names:
                s = SPECS_BY_NAME[n]
                tiles = f"  ({s.tiles()} tiles)" if s.tiles() else ""
                print(f"  {n:22s} {s.kernel():48s} shape {s.shape}{tiles}")
        return 0
    if not hopper_available():
        print("sanitize: SKIPPED: no Hopper (sm_90) GPU here")
        return 0
    exe = args.sanitizer or find_sanitizer()
    if not exe:
        print("sanitize: FAILED: compute-sanitizer not found (set $COMPUTE_SANITIZER or --sanitizer)")
        return 2
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"sanitize: FAILED: {exe} --version: {e}")
        return 2
    version = version.strip().splitlines()
    supported = _supported(exe, ["--report-api-errors", "--error-exitcode", "--launch-timeout", "--print-limit"])
    if "--report-api-errors" not in supported:
        print("sanitize: note: this compute-sanitizer has no --report-api-errors; host-side reports are "
              "listed but do not fail the run")
    prefix = {t: sanitizer_command(exe, t, supported, args.sanitizer_args.split()) for t in tools}
    logdir = args.logs or tempfile.mkdtemp(prefix="sanitize-")
    os.makedirs(logdir, exist_ok=True)
    # biggest groups first, the tools interleaved, so the slow racecheck runs start early
    jobs = [Job(t, g, names) for g, names in sorted(groups, key=lambda x: -len(x[1])) for t in tools]
    print(f"sanitize: {len(jobs)} children ({len(groups)} groups x {len(tools)} tools), {args.jobs} at a time, "
          f"grid capped at {args.ctas or 'one CTA per SM'}; {exe} ({version[-1] if version else '?'}); logs in {logdir}",
          flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _end_children)  # (`timeout` in run_gpu_shards.sh sends SIGTERM)
    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_job, j, prefix[j.tool], args.ctas, args.timeout, logdir) for j in jobs]
        for fut in concurrent.futures.as_completed(futures):
            j = fut.result()
            print(f"  {j.tool:9s} {j.group:12s} {'ok' if j.ok else 'FAIL: ' + '; '.join(j.reasons)} ({j.seconds} s)",
                  flush=True)
    elapsed = round(time.time() - t0, 1)
    ok = all(j.ok for j in jobs)
    print()
    print(table(jobs, tools, groups))
    if not ok:
        print("(ok*: the spec's own run was clean, but its child was not: a report outside any spec's markers, "
              "another spec's failure, or a crash; see below)")
    for j in jobs:
        for rep in j.parsed["kernel"][:5]:
            print(f"\n[{j.tool} {j.group}{' / ' + rep['spec'] if rep['spec'] else ''}] {rep['header']}")
            for d in rep["detail"][:6]:
                print("    " + d)
        if j.results:
            for r in j.results["results"]:
                if not r["ok"]:
                    print(f"\n[{j.tool} {j.group}] {r['name']} WRONG: " + "; ".join(r["problems"]))
        if not j.ok:
            print(f"  (log: {j.log})")
    summary = dict(
        ok=ok, date=datetime.datetime.now().isoformat(timespec="seconds"), seconds=elapsed,
        commit=subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip(),
        sanitizer=dict(path=exe, version=version[-1] if version else None, args=prefix),
        ctas=args.ctas, tools=tools, specs={n: asdict(SPECS_BY_NAME[n]) | {"kernel": SPECS_BY_NAME[n].kernel()}
                                            for _, ns in groups for n in ns},
        runs=[dict(tool=j.tool, group=j.group, specs=j.specs, ok=j.ok, reasons=j.reasons, rc=j.rc,
                   timed_out=j.timed_out, seconds=j.seconds, errors=j.parsed["errors"], race=j.parsed["race"],
                   kernel_reports=j.parsed["kernel"][:50], host_reports=len(j.parsed["host"]),
                   notes=j.parsed["notes"][:20], results=(j.results or {}).get("results"),
                   log=os.path.basename(j.log)) for j in jobs])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\nsanitize: {'PASSED' if ok else 'FAILED'}: {sum(j.ok for j in jobs)}/{len(jobs)} children clean "
          f"in {elapsed} s; summary in {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
