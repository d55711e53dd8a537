"""What the mask costs beyond its work: the causal and the unmasked kernel on one problem where
both do the same work, timed with their launches interleaved, FA3's two kernels beside.

With one query block per (batch, head) (seqlen_q <= block_m) and seqlen_k >> seqlen_q, causal
(aligned bottom-right) masks only the last key block of each tile, the tile order is the same for
both kernels, and all heads share one K/V head (GQA) so K/V stay in L2: the causal/full time ratio
is then the masked kernel's own cost per step.  A ratio, both sides timed in the same stream of
launches, so it does not drift with the clock (bench/NOTES.md).  FA3's ratio is ~1.0.

    python -m bench maskcost [--hdims 128 256] [--variant NAME ATTR=VALUE ...]
"""
import argparse
import functools
import sys

from .timing import interleaved_ms
from .variants import add_variant_args, kernel_makers, load_fa3

#: (seqlen_q, seqlen_k, batch, heads): 264 tiles of 128 key blocks (two per CTA on 132 SMs), and
#: short tiles, where the per-tile costs and the masked block weigh more: 528 tiles of 16 blocks,
#: 1056 of 8 (the lengths of causal tiles at 2k-4k tokens, here all equal)
PROBLEMS = ((128, 16384, 4, 66), (256, 8192, 4, 66), (128, 2048, 8, 66), (128, 1024, 16, 66))


def problem(d, sq, sk, b, h):
    """Random bf16 q [b, sq, h, d] and k, v [b, sk, 1, d] (every query head on one K/V head)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(b, sk, 1, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    return q, k, v


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench maskcost")
    p.add_argument("--hdims", type=int, nargs="+", default=[128, 256])
    add_variant_args(p)
    args = p.parse_args(argv)
    import torch
    from numba_fa3.api import _forward

    kernels = kernel_makers(args.variant)
    fa3 = load_fa3(args.fa3)
    for d in args.hdims:
        for sq, sk, b, h in PROBLEMS:
            q, k, v = problem(d, sq, sk, b, h)
            flops = 4.0 * b * h * sq * sk * d  # the same for both kernels (one masked block of 128)
            fns = {}
            for name, kern in kernels.items():
                for causal in (False, True):
                    out = torch.empty_like(q)
                    fns[name, causal] = functools.partial(_forward, q, k, v, None, causal, (-1, -1), 0.0, False,
                                                          out, None, kern)
            ms = interleaved_ms(fns, args.launches)
            parts = []
            for name in kernels:
                full, causal = (flops / ms[name, c] * 1e-9 for c in (False, True))
                parts.append(f"{name} full {full:.0f} causal {causal:.0f} ({causal / full:.3f})")
            if fa3 is not None:
                f3 = {c: flops / fa3.time_forward(q, k, v, causal=c) * 1e-9 for c in (False, True)}
                parts.append(f"fa3 full {f3[False]:.0f} causal {f3[True]:.0f} ({f3[True] / f3[False]:.3f}); base/fa3 "
                             f"full {flops / ms['base', False] * 1e-9 / f3[False]:.3f} "
                             f"causal {flops / ms['base', True] * 1e-9 / f3[True]:.3f}")
            print(f"d{d} sq {sq} sk {sk}: " + "  ".join(parts), flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
