"""A/B of backward-kernel variants in one process, launches interleaved (torch events): the
table's kernel ("base") beside the same specialization with other `BackwardTiles` (a variant
`NAME FIELD=VALUE ...`, e.g. the 80-query blocks) or the deterministic mode ("det").  Every
variant's gradients are compared with the base's.

    python -m bench bwd-variants --points 128,full,16384 128,causal,16384 128,full,2048 \\
        --variant m80 block_m=80 --det
"""
import argparse
import ast
import dataclasses

from . import common
from .timing import interleaved_ms
from .variants import parse_point

#: FLOPs of the backward as a multiple of the forward's 4 B H S^2 D (halved for causal).
BWD_FLOPS = 2.5


def parser():
    p = argparse.ArgumentParser(prog="python -m bench bwd-variants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=parse_point, nargs="+", default=[parse_point("128,full,16384")],
                   metavar="D,MASK,SEQLEN", help="head dim, full or causal, sequence length (16k tokens a batch)")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "FIELD=VALUE"),
                   help="a name, then BackwardTiles fields to replace (Python literals)")
    p.add_argument("--det", action="store_true", help="also the deterministic mode, as the variant 'det'")
    p.add_argument("--launches", type=int, default=20, help="timed launches per variant and point")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "f16"])
    return p


def tiles_of(base, assigns):
    fields = {f.name for f in dataclasses.fields(base)}
    changes = {}
    for a in assigns:
        key, _, value = a.partition("=")
        if key not in fields:
            raise SystemExit(f"{key} is not a BackwardTiles field ({sorted(fields)})")
        changes[key] = ast.literal_eval(value)
    return dataclasses.replace(base, **changes)


def run(argv=None):
    args = parser().parse_args(argv)
    import torch
    import numba_fa3
    from numba_fa3 import api, mask
    from numba_fa3.backward import FlashBackward
    from numba_fa3.tiles import backward_tiles_for
    table = api.backward_kernel
    chosen = {"kernel": None}

    def pick(dtype, d, kind, softcap=False, varlen=False, deterministic=False):
        return chosen["kernel"] or table(dtype, d, kind, softcap=softcap, varlen=varlen, deterministic=deterministic)
    api.backward_kernel = pick
    torch.manual_seed(0)
    for d, causal, s in args.points:
        b, h = max(1, common.TOKENS // s), common.HIDDEN // d
        tdt = torch.bfloat16 if args.dtype == "bf16" else torch.float16
        q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=tdt) for _ in range(4))
        out, lse = numba_fa3.flash_attn(q, k, v, causal=causal, return_lse=True)
        kind = mask.MASK_CAUSAL if causal else mask.MASK_NONE
        kernels = {"base": None}
        for name, *assigns in args.variant:
            kernels[name] = FlashBackward(args.dtype, d, kind, tiles=tiles_of(backward_tiles_for(d), assigns))
        grads = {n: tuple(torch.empty_like(t) for t in (q, k, v)) for n in kernels}
        if args.det:
            kernels["det"] = None
            grads["det"] = tuple(torch.empty_like(t) for t in (q, k, v))

        def call(name):
            def f():
                chosen["kernel"] = kernels[name]
                dq, dk, dv = grads[name]
                numba_fa3.flash_attn_backward(do, q, k, v, out, lse, causal=causal, deterministic=name == "det",
                                              dq=dq, dk=dk, dv=dv)
            return f
        fns = {n: call(n) for n in kernels}
        for f in fns.values():
            f()
        torch.cuda.synchronize()
        diffs = {n: max(float((a.float() - c.float()).abs().max()) for a, c in zip(grads[n], grads["base"]))
                 for n in kernels if n != "base"}
        ms = interleaved_ms(fns, args.launches)
        flops = BWD_FLOPS * 4 * b * h * s * s * d / (2 if causal else 1)
        line = "  ".join(f"{n}={ms[n]:.3f}ms/{flops / ms[n] / 1e9:.0f}TF" for n in ms)
        ratios = "  ".join(f"{n}/base={ms['base'] / ms[n]:.3f}" for n in ms if n != "base")
        print(f"d={d} {'causal' if causal else 'full'} s={s}: {line}  {ratios}  max|diff| {diffs}", flush=True)
    api.backward_kernel = table
