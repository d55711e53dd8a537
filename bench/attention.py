"""Attention benchmark, forward, backward or both: numba_fa3 beside FA3 (when its library is
present), PyTorch SDPA's FLASH (FA2) and CUDNN backends, same process, same inputs.  16k tokens per
batch, hidden 2048.

    python -m bench attention [--pass fwd|bwd|fwd+bwd] [--seqlens 512 1024 ...] [--hdims 64 128] [--rounds 3]
                              [--fa3 .fa3/libdew_flash_attn3.so]

Every point is timed three ways, each a row `timing` of the JSON (see bench/timing.py):
- "do_bench": `triton.testing.do_bench` medians (L2 flushed before each launch, CUDA events) for
  the torch-side implementations, the median of `--rounds` rounds that take each in turn, the
  order rotated by one each round (`timing.rotated`).  Before eea3b9c the order was fixed
  (ours, FA2, cuDNN) over 3 rounds, and each implementation's rounds drifted with the GPU's
  heat (ours at hdim 128 full 16k: 3.20, 3.37, 3.46 ms in one point); the median of 6 rotated
  rounds puts every implementation twice in each place.  FA3 cannot be timed so: it launches
  on XLA's stream, which torch's events do not bracket.
- "cold" and "steady": every implementation, FA3 included, by one host clock.  Cold alternates
  blocks of launches between implementations round by round and flushes L2 before each launch
  (do_bench's condition), subtracting the flushes; steady runs each back to back on its own until
  the power-capped clock settles (FA3's own `time_forward`, made longer).  Ratios to FA3 are
  taken within one of these, never across methods: earlier grids set our do_bench
  figure against FA3's back-to-back one (bench/NOTES.md).

What is timed, `--pass` (a row's `mode`; FLOPs as multiples of the forward's 4 B H S^2 D, halved
for causal, `PASS_FLOPS`):
- "fwd" (the default): the forward.
- "bwd": the backward alone, 2.5x.  Each implementation's backward starts from the out and lse of
  its own forward, run once outside the timed function (each library keeps lse its own way), and
  every implementation takes the same q, k, v and dO tensors.
  - numba_fa3: `flash_attn_backward` into dq, dk, dv allocated outside the timed function; and
    again with `deterministic=True` as the row "numba_fa3-det", which reports what the
    deterministic mode costs.
  - fa3: its backward FFI call on XLA's stream (host-clocked only, as its forward).
  - fa2-sdpa, cudnn-sdpa: `torch.autograd.grad` over a graph built once (retain_graph), taken
    with respect to the transposed views SDPA was called on, so that each call runs the backend's
    backward op and nothing else (no forward, no transpose node, no accumulation into `.grad`).
    Calling the aten backward op directly would also skip the autograd engine's host work, but
    that op's arguments change between torch versions; the engine's host time is expected to
    stay hidden behind the queued flush or the previous backward, which take longer.
- "fwd+bwd": each implementation's forward, then its backward from that forward's out and lse,
  3.5x.
In "bwd" and "fwd+bwd", every implementation's dq, dk, dv are checked once per point against
SDPA's math backend in float32 (`reference_grads`), each row's `grad_max_abs_err`: ours beside
the peers' errors, the bf16 error a backward is expected to have.  `max_abs_err` stays our
forward's output error in every pass.

Results go to bench/results/attention-<pass>-<date>.json, rewritten after every point with
`meta.complete` false, and true at the end.
"""
import argparse
import os
import statistics
import sys

from . import common, timing
from .variants import load_fa3

#: Each pass's FLOPs as a multiple of the forward's: the backward runs five GEMMs of the forward's
#: size (S = Q K^T recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q) to the forward's
#: two (S = Q K^T, O = P V), the count FA2's and FA3's benchmarks use.  The mask scales them all
#: alike, so the forward's mask-aware count carries over.
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
GRADS = ("dq", "dk", "dv")


def pass_flops(forward_flops, mode):
    """FLOPs of one `mode` pass ("fwd", "bwd", "fwd+bwd") of a problem whose forward does
    `forward_flops`."""
    return forward_flops * PASS_FLOPS[mode]


def results_path(out, mode, date):
    """--out if given, else bench/results/attention-<mode>-<date>.json."""
    return out or os.path.join(common.RESULTS, f"attention-{mode}-{date}.json")


def parser():
    p = argparse.ArgumentParser(prog="python -m bench attention")
    p.add_argument("--pass", dest="mode", choices=list(PASS_FLOPS), default="fwd",
                   help="what is timed: the forward, the backward alone (from each implementation's own "
                        "forward's out and lse), or forward then backward (default fwd)")
    p.add_argument("--seqlens", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--hdims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", nargs="*", default=["false", "true"])
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--rounds", type=int, default=6,
                   help="do_bench rounds per point (median), each round's order rotated by one")
    p.add_argument("--host-rounds", type=int, default=10, help="rounds of the host-clocked cold timing")
    p.add_argument("--out", default=None)
    return p


def forward_impls(q, k, v, out, causal):
    """{name: zero-argument forward} of the torch-side implementations."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from numba_fa3 import flash_attn
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        return f
    return {"numba_fa3": lambda: flash_attn(q, k, v, causal=causal, out=out),
            "fa2-sdpa": sdpa(SDPBackend.FLASH_ATTENTION),
            "cudnn-sdpa": sdpa(SDPBackend.CUDNN_ATTENTION)}


def ours_backward(q, k, v, dout, out, causal, deterministic, forward):
    """Our backward as a zero-argument function returning (dq, dk, dv) [B, S, H, D], written into
    tensors allocated here, outside the timed call.  forward=False: from out and an lse of our
    forward, run once here; forward=True: each call runs the forward (into `out`) first."""
    import torch
    from numba_fa3 import flash_attn, flash_attn_backward
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    lse = flash_attn(q, k, v, causal=causal, out=out, return_lse=True)[1]

    def f():
        o, l = flash_attn(q, k, v, causal=causal, out=out, return_lse=True) if forward else (out, lse)
        return flash_attn_backward(dout, q, k, v, o, l, causal=causal, deterministic=deterministic,
                                   dq=dq, dk=dk, dv=dv)
    return f


def sdpa_backward(backend, q, k, v, dout, causal, forward):
    """SDPA restricted to `backend`: its backward alone (forward=False) or its forward then its
    backward, as a zero-argument function returning (dq, dk, dv) as [B, H, S, D] views, the layout
    SDPA is called in.  The leaves share q, k, v's storage: `q.detach()`, since q itself must
    stay free of autograd for the other implementations (DLPack refuses tensors that require
    grad)."""
    import torch
    from torch.nn.attention import sdpa_kernel
    qt, kt, vt = (x.detach().requires_grad_().transpose(1, 2) for x in (q, k, v))

    def fwd():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
    o = fwd()
    # dO in O's layout: torch's cuDNN backward, built with cuDNN before 9.5.1, copies a dO of
    # other strides into O's, a copy that would land inside the timed call
    do = dout.transpose(1, 2)
    if do.stride() != o.stride():
        do = torch.empty_like(o).copy_(do)
    if forward:
        return lambda: torch.autograd.grad(fwd(), (qt, kt, vt), do)
    return lambda: torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True)


def reference_grads(q, k, v, dout, causal, chunk_bytes=1 << 28):
    """dq, dk, dv [B, S, H, D] float32 by SDPA's math backend on float32 copies of the inputs, over
    slices of the batch x heads whose S x S scores take at most `chunk_bytes` (one head, if more):
    the math backend holds several such matrices, and all heads' at once would not fit at 16k."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    b, s, h, d = q.shape
    qf, kf, vf, gf = (x.transpose(1, 2).reshape(b * h, s, d) for x in (q, k, v, dout))
    grads = [torch.empty(b * h, s, d, dtype=torch.float32, device=q.device) for _ in GRADS]
    n = max(1, chunk_bytes // (4 * s * s))
    for i in range(0, b * h, n):
        xs = [x[i:i + n].float().requires_grad_() for x in (qf, kf, vf)]
        with sdpa_kernel(SDPBackend.MATH):
            o = torch.nn.functional.scaled_dot_product_attention(*xs, is_causal=causal)
        for g, x in zip(grads, torch.autograd.grad(o, xs, gf[i:i + n].float())):
            g[i:i + n] = x
    return [g.reshape(b, h, s, d).transpose(1, 2) for g in grads]


def grad_errors(grads, ref):
    """{"dq": max |dq - ref dq|, ...} over tensors of one layout."""
    return {n: (g.float() - r).abs().max().item() for n, g, r in zip(GRADS, grads, ref)}


def backward_impls(q, k, v, out, causal, forward, fa3):
    """({name: zero-argument backward (or forward and backward)} of the torch-side
    implementations, FA3's or None, {name: grad_errors vs reference_grads}), on one random dO."""
    import torch
    from torch.nn.attention import SDPBackend
    dout = torch.randn_like(q)
    impls = {"numba_fa3": ours_backward(q, k, v, dout, out, causal, deterministic=False, forward=forward),
             "numba_fa3-det": ours_backward(q, k, v, dout, out, causal, deterministic=True, forward=forward)}
    as_bshd = {n: lambda r: r for n in impls}
    for name, backend in (("fa2-sdpa", SDPBackend.FLASH_ATTENTION), ("cudnn-sdpa", SDPBackend.CUDNN_ATTENTION)):
        try:
            f = sdpa_backward(backend, q, k, v, dout, causal, forward=forward)
            f()
        except RuntimeError as e:  # the backend declines the problem (head dim, version): no row
            print(f"{name}: skipped: {str(e).splitlines()[0]}", flush=True)
            continue
        impls[name], as_bshd[name] = f, lambda r: [g.transpose(1, 2) for g in r]
    checked = dict(impls)
    fa3_fn = None
    if fa3 is not None:
        fa3_fn = checked["fa3"] = timing.fa3_backward(fa3, dout, q, k, v, causal, forward=forward)

        def fa3_grads(r):
            timing.jax_stream().sync(r)
            return [torch.from_dlpack(g) for g in r]
        as_bshd["fa3"] = fa3_grads
    results = {n: f() for n, f in checked.items()}
    torch.cuda.synchronize()
    ref = reference_grads(q, k, v, dout, causal)
    errs = {n: grad_errors(as_bshd[n](r), ref) for n, r in results.items()}
    print("grad max abs err vs fp32 math:", "  ".join(
        f"{n} " + "/".join(f"{e[g]:.3g}" for g in GRADS) for n, e in errs.items()), flush=True)
    return impls, fa3_fn, errs


def run(argv=None):
    p = parser()
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench
    from numba_fa3 import flash_attn
    from numba_fa3.tiles import BACKWARD_HEAD_DIMS

    # before the grid, not at its first such point an hour in
    if args.mode != "fwd" and set(args.hdims) - set(BACKWARD_HEAD_DIMS):
        p.error(f"--pass {args.mode}: the backward supports head dims {BACKWARD_HEAD_DIMS}, got {args.hdims}")

    fa3 = load_fa3(args.fa3)
    rows = []
    run_meta = common.meta()
    path = results_path(args.out, args.mode, run_meta["date"])
    for d, causal, s, (b, h, q, k, v, flops, ref) in common.grid(args):
        flops = pass_flops(flops, args.mode)
        out = torch.empty_like(q)
        flash_attn(q, k, v, causal=causal, out=out)
        err = (out.float() - ref.float()).abs().max().item()
        if args.mode == "fwd":
            impls, grad_errs = forward_impls(q, k, v, out, causal), {}
            fa3_fn = timing.fa3_forward(fa3, q, k, v, causal) if fa3 is not None else None
        else:
            impls, fa3_fn, grad_errs = backward_impls(q, k, v, out, causal, forward=args.mode == "fwd+bwd",
                                                       fa3=fa3)
        samples = {name: [] for name in impls}
        for r in range(args.rounds):
            for name in timing.rotated(impls, r):
                samples[name].append(do_bench(impls[name], warmup=25, rep=100, return_mode="median"))
        timed = {"do_bench": {n: statistics.median(v) for n, v in samples.items()}}
        host_fns = dict(impls)
        streams = {n: timing.torch_stream() for n in impls}
        if fa3_fn is not None:
            host_fns["fa3"], streams["fa3"] = fa3_fn, timing.jax_stream()
        timed["cold"] = timing.host_interleaved_ms(host_fns, streams, cold=True, rounds=args.host_rounds)
        timed["steady"] = timing.steady_ms(host_fns, streams)
        for method, ms_of in timed.items():
            for name, ms in ms_of.items():
                row = dict(impl=name, mode=args.mode, dtype="bf16", hdim=d, causal=causal, seqlen=s,
                           batch=b, heads=h, timing=method, ms=ms, tflops=flops / ms / 1e9,
                           ms_rounds=samples[name] if method == "do_bench" else None,
                           max_abs_err=err if name.startswith("numba_fa3") else None)
                if args.mode != "fwd":
                    row["grad_max_abs_err"] = grad_errs.get(name)
                rows.append(row)
            tf = {r["impl"]: r["tflops"] for r in rows[-len(ms_of):]}
            ratios = "  ".join(f"/{p}={tf['numba_fa3'] / tf[p]:.3f}"
                               for p in ("numba_fa3-det", "cudnn-sdpa", "fa3") if p in tf)
            grad_err = f" grad_err={max(grad_errs['numba_fa3'].values()):.3g}" if grad_errs else ""
            print(f"d={d} causal={causal} s={s} {method:8}", "  ".join(f"{n}={t:.0f}" for n, t in tf.items()),
                  ratios, f"err={err:.3g}" + grad_err, flush=True)
        # after every point, marked incomplete: a run cut by a time limit still leaves its rows
        common.write_json(path, dict(meta=dict(run_meta, complete=False), rows=rows), quiet=True)
    result = dict(meta=dict(run_meta, complete=True), rows=rows)
    common.write_json(path, result)
    print(common.table(rows, ["impl", "timing", "hdim", "causal", "seqlen", "ms", "tflops"]))


if __name__ == "__main__":
    run(sys.argv[1:])
