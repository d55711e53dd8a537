"""Attention forward benchmark: numba_fa3 beside FA3 (when its library is present), PyTorch SDPA's
FLASH (FA2) and CUDNN backends, same process, same inputs.  16k tokens per batch, hidden 2048.

    python -m bench attention [--seqlens 512 1024 ...] [--hdims 64 128] [--rounds 3] [--fa3 .fa3/libdew_flash_attn3.so]

Each point is timed in `--rounds` interleaved rounds (every implementation once per round, FA3
included) and each implementation's figure is the median of its rounds: single samples of FA3
moved by up to 10% between runs (hdim 256 full 2k: 601-720 TFLOPS), ours by 2-3%.
"""
import argparse
import os
import statistics
import sys

from . import common


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench attention")
    p.add_argument("--seqlens", type=int, nargs="*", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--hdims", type=int, nargs="*", default=[64, 128])
    p.add_argument("--causal", nargs="*", default=["false", "true"])
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per point (median)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench
    from numba_fa3 import flash_attn

    fa3 = None
    if os.path.exists(args.fa3):
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        sys.path.insert(0, os.path.dirname(args.fa3))
        from fa3_jax import FA3
        fa3 = FA3(args.fa3)
    rows = []
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
        if fa3 is not None:
            impls["fa3"] = None
        samples = {name: [] for name in impls}
        for _ in range(args.rounds):
            for name, fn in impls.items():
                if name == "fa3":
                    samples[name].append(fa3.time_forward(q, k, v, causal=causal))
                else:
                    samples[name].append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        for name, ms_rounds in samples.items():
            ms = statistics.median(ms_rounds)
            rows.append(dict(impl=name, mode="fwd", dtype="bf16", hdim=d, causal=causal, seqlen=s,
                             batch=b, heads=h, ms=ms, tflops=flops / ms / 1e9, ms_rounds=ms_rounds,
                             max_abs_err=err if name == "numba_fa3" else None))
        print("  ".join(f"{r['impl']}={r['tflops']:.0f}" for r in rows if r["hdim"] == d
                        and r["causal"] == causal and r["seqlen"] == s), f"d={d} causal={causal} s={s} err={err:.3g}", flush=True)
    result = dict(meta=common.meta(), rows=rows)
    path = args.out or os.path.join(common.RESULTS, f"attention-fwd-{result['meta']['date']}.json")
    common.write_json(path, result)
    print(common.table(rows, ["impl", "hdim", "causal", "seqlen", "ms", "tflops"]))


if __name__ == "__main__":
    run(sys.argv[1:])
