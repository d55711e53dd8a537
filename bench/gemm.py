"""GEMM benchmark: numba_fa3's worked-example GEMM beside torch.matmul (cuBLAS), same process.

    python -m bench gemm [--sizes 8192 4096 ...] [--out bench/results/gemm-<date>.json]
    python -m bench gemm --sizes 8192 --old /path/to/another/checkout   # this GEMM against that one's

--old times this checkout's GEMM and another checkout's with interleaved launches (a refactor
against the code it replaced) instead of the cuBLAS comparison.
"""
import argparse
import os
import sys

from . import common


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench gemm")
    p.add_argument("--sizes", type=int, nargs="*", default=[8192, 4096, 6144])
    p.add_argument("--dtypes", nargs="*", default=["bf16", "f16"])
    p.add_argument("--out", default=None)
    p.add_argument("--old", help="another checkout: its GEMM against this one's, interleaved")
    p.add_argument("--launches", type=int, default=200)
    args = p.parse_args(argv)
    import torch
    from triton.testing import do_bench
    from numba_fa3.primitives import gemm
    if args.old:
        return against_old(args)

    rows = []
    for dtype in args.dtypes:
        tdt = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
        for s in args.sizes:
            m = n = k = s
            a = torch.randn(m, k, device="cuda", dtype=tdt)
            b = torch.randn(n, k, device="cuda", dtype=tdt)
            out = torch.empty(m, n, device="cuda", dtype=tdt)
            ref = a @ b.T
            gemm.matmul(a, b, out=out)
            err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
            bt = b.T.contiguous()
            flops = 2.0 * m * n * k
            impls = {
                "cublas": lambda: torch.matmul(a, b.T, out=out),
                "numba_fa3": lambda: gemm.matmul(a, b, out=out),
                "numba_fa3_ab": lambda: gemm.matmul(a, bt, out=out, transpose_b=False),
            }
            for name, fn in impls.items():
                ms = do_bench(fn, warmup=100, rep=500, return_mode="median")
                rows.append(dict(impl=name, dtype=dtype, m=m, n=n, k=k, ms=ms,
                                 tflops=flops / ms / 1e9, max_rel_err=err if name.startswith("numba") else None))
                print(f"{name:14s} {dtype} {m}x{n}x{k}: {ms:.3f} ms  {flops / ms / 1e9:7.1f} TFLOPS", flush=True)
    result = dict(meta=common.meta(), rows=rows)
    path = args.out or os.path.join(common.RESULTS, f"gemm-{result['meta']['date']}.json")
    common.write_json(path, result)
    print(common.table(rows, ["impl", "dtype", "m", "n", "k", "ms", "tflops"]))
    ratio = {(r["dtype"], r["m"]): r["tflops"] for r in rows if r["impl"] == "numba_fa3"}
    for r in rows:
        if r["impl"] == "cublas":
            print(f"{r['dtype']} {r['m']}^3: numba_fa3 / cuBLAS = {ratio[(r['dtype'], r['m'])] / r['tflops']:.3f}")


def against_old(args):
    """This GEMM and another checkout's on the same inputs, launches interleaved (A B A B ...)."""
    import torch
    from numba_fa3.primitives import gemm
    from .timing import interleaved_ms
    from .variants import load_old
    old = load_old(args.old, "primitives.gemm", "matmul")  # (the old layout: top-level primitives)
    for dtype in args.dtypes:
        tdt = {"bf16": torch.bfloat16, "f16": torch.float16}[dtype]
        for s in args.sizes:
            a = torch.randn(s, s, device="cuda", dtype=tdt)
            b = torch.randn(s, s, device="cuda", dtype=tdt)
            outs = {n: torch.full((s, s), float("nan"), device="cuda", dtype=tdt) for n in ("new", "old")}
            fns = {"new": lambda: gemm.matmul(a, b, out=outs["new"]), "old": lambda: old(a, b, out=outs["old"])}
            for f in fns.values():
                f()
            assert torch.equal(outs["new"], outs["old"]), "the two GEMMs differ"
            ms = interleaved_ms(fns, args.launches)
            tf = {n: 2.0 * s ** 3 / t * 1e-9 for n, t in ms.items()}
            print(f"gemm {dtype} {s}^3: new {tf['new']:.0f} old {tf['old']:.0f} TFLOPS, new/old "
                  f"{tf['new'] / tf['old']:.3f}", flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
