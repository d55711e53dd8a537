"""Does per-call host overhead show?  For the grid's small end (seqlen 512, 16k tokens, hdim 128)
and a tiny problem: the do_bench median of plain calls, of the same call replayed from a CUDA
graph (GPU time only), and the host time of one call (no synchronization).  If the plain median
is above the graph's, the host is the bottleneck at that size.

    python -m bench launch
"""
import argparse
import sys
import time

from . import common


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench launch")
    p.add_argument("--out", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile the host path of 500 calls instead")
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench
    from numba_fa3 import flash_attn

    rows = []
    for name, (b, s, h, d, causal) in {"grid-512": (32, 512, 16, 128, False),
                                       "grid-512-causal": (32, 512, 16, 128, True),
                                       "tiny": (1, 128, 1, 128, False)}.items():
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        out = torch.empty_like(q)

        def fn():
            flash_attn(q, k, v, causal=causal, out=out)

        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        if args.profile:
            import cProfile
            import pstats
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(500):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        host_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        plain = do_bench(fn, warmup=50, rep=300, return_mode="median")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay = do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
        rows.append(dict(case=name, batch=b, seqlen=s, heads=h, hdim=d, causal=causal, plain_ms=plain,
                         graph_ms=replay, host_us_per_call=host_us, overhead_shows=plain > 1.05 * replay))
        print(rows[-1], flush=True)
    result = dict(meta=common.meta(), rows=rows)
    common.write_json(args.out or f"{common.RESULTS}/launch-{result['meta']['date']}.json", result)
    print(common.table(rows, ["case", "plain_ms", "graph_ms", "host_us_per_call", "overhead_shows"]))


if __name__ == "__main__":
    run(sys.argv[1:])
