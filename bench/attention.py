"""Attention forward benchmark: numba_fa3 beside FA3 (when its library is present), PyTorch SDPA's
FLASH (FA2) and CUDNN backends, same process, same inputs.  16k tokens per batch, hidden 2048.

    python -m bench attention [--seqlens 512 1024 ...] [--hdims 64 128] [--rounds 3] [--fa3 .fa3/libdew_flash_attn3.so]

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

The JSON is rewritten after every point with `meta.complete` false, and true at the end.
"""
import argparse
import os
import statistics
import sys

from . import common, timing
from .variants import load_fa3


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench attention")
    p.add_argument("--seqlens", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--hdims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", nargs="*", default=["false", "true"])
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--rounds", type=int, default=6,
                   help="do_bench rounds per point (median), each round's order rotated by one")
    p.add_argument("--host-rounds", type=int, default=10, help="rounds of the host-clocked cold timing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    from numba_fa3 import flash_attn

    fa3 = load_fa3(args.fa3)
    rows = []
    run_meta = common.meta()
    path = args.out or os.path.join(common.RESULTS, f"attention-fwd-{run_meta['date']}.json")
    for d, causal, s, (b, h, q, k, v, flops, ref) in common.grid(args):
        out = torch.empty_like(q)
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        flash_attn(q, k, v, causal=causal, out=out)
        err = (out.float() - ref.float()).abs().max().item()

        def sdpa(backend):
            def f():
                with sdpa_kernel(backend):
                    torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            return f
        impls = {"numba_fa3": lambda: flash_attn(q, k, v, causal=causal, out=out),
                 "fa2-sdpa": sdpa(SDPBackend.FLASH_ATTENTION),
                 "cudnn-sdpa": sdpa(SDPBackend.CUDNN_ATTENTION)}
        samples = {name: [] for name in impls}
        for r in range(args.rounds):
            for name in timing.rotated(impls, r):
                samples[name].append(do_bench(impls[name], warmup=25, rep=100, return_mode="median"))
        timed = {"do_bench": {n: statistics.median(v) for n, v in samples.items()}}
        host_fns = dict(impls)
        streams = {n: timing.torch_stream() for n in impls}
        if fa3 is not None:
            host_fns["fa3"], streams["fa3"] = timing.fa3_forward(fa3, q, k, v, causal), timing.jax_stream()
        timed["cold"] = timing.host_interleaved_ms(host_fns, streams, cold=True, rounds=args.host_rounds)
        timed["steady"] = timing.steady_ms(host_fns, streams)
        for method, ms_of in timed.items():
            for name, ms in ms_of.items():
                rows.append(dict(impl=name, mode="fwd", dtype="bf16", hdim=d, causal=causal, seqlen=s,
                                 batch=b, heads=h, timing=method, ms=ms, tflops=flops / ms / 1e9,
                                 ms_rounds=samples[name] if method == "do_bench" else None,
                                 max_abs_err=err if name == "numba_fa3" else None))
            tf = {r["impl"]: r["tflops"] for r in rows[-len(ms_of):]}
            ratios = "  ".join(f"/{p}={tf['numba_fa3'] / tf[p]:.3f}" for p in ("cudnn-sdpa", "fa3") if p in tf)
            print(f"d={d} causal={causal} s={s} {method:8}", "  ".join(f"{n}={t:.0f}" for n, t in tf.items()),
                  ratios, f"err={err:.3g}", flush=True)
        # after every point, marked incomplete: a run cut by a time limit still leaves its rows
        common.write_json(path, dict(meta=dict(run_meta, complete=False), rows=rows), quiet=True)
    result = dict(meta=dict(run_meta, complete=True), rows=rows)
    common.write_json(path, result)
    print(common.table(rows, ["impl", "timing", "hdim", "causal", "seqlen", "ms", "tflops"]))


if __name__ == "__main__":
    run(sys.argv[1:])
