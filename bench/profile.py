"""One forward or backward configuration, run a few times: a target for `ncu` / `compute-sanitizer`.

    ncu --clock-control none -k regex:forwardparams --launch-skip 2 --launch-count 1 --set full \\
        python -m bench profile --seqlen 16384 --hdim 128 [--causal]
    ncu --clock-control none -k regex:backwardparams --launch-skip 2 --launch-count 1 --set full \\
        python -m bench profile --pass bwd --seqlen 16384 --hdim 128
    ncu --clock-control none -k regex:FlashAttnBwdSm90 --launch-skip 2 --launch-count 1 --set full \\
        python -m bench profile --pass bwd --fa3 .fa3/libdew_flash_attn3.so   # FA3's backward, same problem

Our kernels are named after their parameter records (`forwardparams_kernel`, `backwardparams_kernel`,
the backward's pre- and postprocess after theirs).  With --fa3 the backward runs FA3's instead of
ours, on the same inputs, so the two profiles compare stall reasons and pipe use directly.
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
    p.add_argument("--pass", dest="mode", choices=("fwd", "bwd"), default="fwd")
    p.add_argument("--deterministic", action="store_true", help="the backward's deterministic mode")
    p.add_argument("--fa3", default=None, help="FA3's library: run its backward instead of ours (--pass bwd)")
    args = p.parse_args(argv)
    import torch
    from numba_fa3 import flash_attn, flash_attn_backward
    s, d = args.seqlen, args.hdim
    b, h = max(1, args.tokens // s), 2048 // d
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)
    if args.mode == "fwd":
        for _ in range(args.repeat):
            flash_attn(q, k, v, causal=args.causal, out=out)
        torch.cuda.synchronize()
        print("ok", float(out.float().abs().mean()))
        return
    dout = torch.randn_like(q)
    if args.fa3:
        from .variants import load_fa3
        fa3 = load_fa3(args.fa3)
        if fa3 is None:
            sys.exit(f"no FA3 library at {args.fa3}")
        o3, lse3 = fa3.forward(q, k, v, causal=args.causal)
        for _ in range(args.repeat):
            grads = fa3.backward(dout, q, k, v, o3, lse3, causal=args.causal)
        print("ok", float(grads[0].float().abs().mean()))
        return
    out, lse = flash_attn(q, k, v, causal=args.causal, return_lse=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for _ in range(args.repeat):
        flash_attn_backward(dout, q, k, v, out, lse, causal=args.causal, deterministic=args.deterministic,
                            dq=dq, dk=dk, dv=dv)
    torch.cuda.synchronize()
    print("ok", float(dq.float().abs().mean()))


if __name__ == "__main__":
    run(sys.argv[1:])
