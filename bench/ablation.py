"""The forward kernel's ablation (FA3 paper, Table 2): the same kernel with ping-pong and/or the
intra-warpgroup overlap switched off, optionally over block_n variants, beside the full schedule.

    python -m bench ablation [--seqlens 4096 16384] [--hdims 128] [--block-n 128 176] [--out ...]
"""
import argparse
import functools
import os
import sys

from . import common

SCHEDULES = {"full": (True, True), "no-overlap": (True, False), "no-pingpong": (False, True),
             "neither": (False, False)}


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench ablation")
    p.add_argument("--seqlens", type=int, nargs="*", default=[4096, 16384])
    p.add_argument("--hdims", type=int, nargs="*", default=[128])
    p.add_argument("--causal", nargs="*", default=["false", "true"])
    p.add_argument("--schedules", nargs="*", default=list(SCHEDULES))
    p.add_argument("--block-n", type=int, nargs="*", default=[], help="block_n variants (default: the table's)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench
    from numba_fa3.api import _forward
    from numba_fa3.forward import FlashForward, Schedule
    from numba_fa3 import mask
    from numba_fa3.tiles import has_long_tiles, tiles_for

    @functools.lru_cache(maxsize=None)
    def kernel(schedule, block_n, dtype, d, kind, softcap=False, long_queries=False):
        tiles = tiles_for(d, kind != mask.MASK_NONE, long_queries)
        if block_n:
            tiles = type(tiles)(**{**tiles.__dict__, "block_n": block_n})
        return FlashForward(dtype, d, kind, Schedule(*SCHEDULES[schedule]), tiles, softcap=softcap)

    rows = []
    for d, causal, s, (b, h, q, k, v, flops, ref) in common.grid(args):
        out = torch.empty_like(q)
        for sched in args.schedules:
            for bn in args.block_n or [0]:
                make = functools.partial(kernel, sched, bn)
                fn = lambda: _forward(q, k, v, None, causal, (-1, -1), 0.0, False, out, None, make)
                fn()
                err = (out.float() - ref.float()).abs().max().item()
                ms = do_bench(fn, warmup=50, rep=200, return_mode="median")
                kind = mask.MASK_CAUSAL if causal else mask.MASK_NONE
                bn_used = make("bf16", d, kind, long_queries=has_long_tiles(d, causal, s)).block_n
                rows.append(dict(impl=f"numba_fa3[{sched}]", mode="fwd", dtype="bf16", hdim=d,
                                 causal=causal, seqlen=s, batch=b, heads=h, block_n=bn_used, ms=ms,
                                 tflops=flops / ms / 1e9, max_abs_err=err))
                print(f"d={d} causal={causal} s={s} {sched:12s} block_n={bn_used}: "
                      f"{rows[-1]['tflops']:.0f} TFLOPS err={err:.3g}", flush=True)
    result = dict(meta=common.meta(), rows=rows)
    path = args.out or os.path.join(common.RESULTS, f"ablation-fwd-{result['meta']['date']}.json")
    common.write_json(path, result)
    print(common.table(rows, ["impl", "hdim", "causal", "seqlen", "block_n", "ms", "tflops", "max_abs_err"]))


if __name__ == "__main__":
    run(sys.argv[1:])
