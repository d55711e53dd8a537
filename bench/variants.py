"""A/B of forward-kernel variants in one process, FA3 beside when its library is present: each
variant is `FlashForward` with some class attributes overridden (the tuning knobs, e.g.
L2_SECTION_BYTES, LATE_RESCALE).  The variants' launches are interleaved (A B C A B C ...), each
timed with CUDA events, and each variant's median is compared with the base's: the H100's clock
drifts under sustained load by more than the effects measured here (the same kernel read 5-7%
apart within one run when timed in separate blocks), and interleaving makes the drift hit every
variant alike.  FA3 runs through JAX, on another stream: it is timed against the base by one host
clock in alternating blocks (`timing.host_interleaved_ms`), and the other variants through their
ratio to the base.

    python -m bench variants --points 128,causal,4096 256,full,2048 --variant nosec L2_SECTION_BYTES=0

TILES=(block_m, block_n, stages, consumers, producer_registers, consumer_registers) replaces the
table's tiles (numba_fa3.tiles) for every point of that variant.
"""
import argparse
import ast
import functools
import os
import sys

from . import common
from .timing import interleaved_ms


def parse_point(text):
    d, mask, s = text.split(",")
    if mask not in ("causal", "full"):
        raise argparse.ArgumentTypeError(f"mask must be causal or full, got {mask!r}")
    return int(d), mask == "causal", int(s)


def add_variant_args(p):
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "ATTR=VALUE"),
                   help="a name, then FlashForward class attributes to override (Python literals)")
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--launches", type=int, default=60, help="timed launches per variant and point")


def kernel_makers(variant_args):
    """{name: make_kernel} for the base and each --variant (NAME ATTR=VALUE ...)."""
    from numba_fa3.forward import FlashForward
    variants = {"base": {}}
    for name, *assigns in variant_args:
        attrs = {}
        for a in assigns:
            key, _, value = a.partition("=")
            if key == "TILES":  # Tiles(block_m, block_n, stages, consumers, producer_regs, consumer_regs)
                from numba_fa3.tiles import Tiles
                attrs["tiles"] = Tiles(*ast.literal_eval(value))
                continue
            if not hasattr(FlashForward, key):
                sys.exit(f"FlashForward has no attribute {key}")
            attrs[key] = ast.literal_eval(value)
        variants[name] = attrs
    kernels = {}
    for name, attrs in variants.items():
        tiles = attrs.pop("tiles", None)
        cls = type(f"FlashForward_{name}", (FlashForward,), attrs)
        kernels[name] = functools.lru_cache(maxsize=None)(
            lambda dt, d, kind, softcap=False, long_queries=False, cls=cls, tiles=tiles:
            cls(dt, d, kind, softcap=softcap, tiles=tiles, long_queries=long_queries))
    return kernels


def load_fa3(path):
    """FA3's JAX wrapper where its library is present, else None.  JAX is told not to take most
    of the GPU's memory up front (torch shares the device)."""
    if not os.path.exists(path):
        return None
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, os.path.dirname(path))
    from fa3_jax import FA3
    return FA3(path)


def fa3_column(fa3, base, q, k, v, causal, flops, tf):
    """FA3 against the base on one clock (`timing.host_interleaved_ms`, back to back: FA3's own
    method), the other variants through their event-timed ratio to the base."""
    from .timing import fa3_forward, host_interleaved_ms, jax_stream, torch_stream
    ms = host_interleaved_ms({"base": base, "fa3": fa3_forward(fa3, q, k, v, causal)},
                             {"base": torch_stream(), "fa3": jax_stream()}, cold=False)
    f3, base_host = flops / ms["fa3"] * 1e-9, flops / ms["base"] * 1e-9
    return f"fa3 {f3:.0f} vs base {base_host:.0f} (" + ", ".join(
        f"{n} {t / tf['base'] * base_host / f3:.3f}" for n, t in tf.items()) + ")"


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench variants")
    p.add_argument("--points", type=parse_point, nargs="+", required=True, help="hdim,causal|full,seqlen")
    add_variant_args(p)
    args = p.parse_args(argv)
    import torch
    from numba_fa3.api import _forward

    kernels = kernel_makers(args.variant)
    fa3 = load_fa3(args.fa3)
    for d, causal, s in args.points:
        b, h, q, k, v, flops, ref = common.attention_problem(s, d, causal)
        fns = {}
        for name, kern in kernels.items():
            out = torch.empty_like(q)
            fns[name] = functools.partial(_forward, q, k, v, None, causal, (-1, -1), 0.0, False, out, None, kern)
            out.fill_(float("nan"))
            fns[name]()
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            # (a variant named wrong... is a bound experiment that drops work on purpose)
            assert err < 2e-2 or name.startswith("wrong"), f"{name}: max error {err}"
        ms = interleaved_ms(fns, args.launches)
        tf = {n: flops / t * 1e-9 for n, t in ms.items()}
        line = "  ".join(f"{n} {t:.0f} ({t / tf['base']:.3f})" for n, t in tf.items())
        if fa3 is not None:
            line += "  | " + fa3_column(fa3, fns["base"], q, k, v, causal, flops, tf)
        print(f"d{d} {'causal' if causal else 'full':6} {s:6}: {line}", flush=True)


if __name__ == "__main__":
    run(sys.argv[1:])
