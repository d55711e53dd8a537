"""One forward configuration, run a few times: a target for `ncu` / `compute-sanitizer`.

    ncu --clock-control none -k regex:flash_fwd --launch-skip 2 --launch-count 1 --set full \\
        python -m bench profile --seqlen 16384 --hdim 128 [--causal]
"""
import argparse
import sys


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench profile")
    p.add_argument("--seqlen", type=int, default=16384)
    p.add_argument("--hdim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--repeat", type=int, default=4)
    args = p.parse_args(argv)
    import torch
    from numba_fa3 import flash_attn
    s, d = args.seqlen, args.hdim
    b, h = max(1, args.tokens // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    for _ in range(args.repeat):
        flash_attn(q, k, v, causal=args.causal, out=out)
    torch.cuda.synchronize()
    print("ok", float(out.float().abs().mean()))


if __name__ == "__main__":
    run(sys.argv[1:])
