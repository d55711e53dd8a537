"""A/B of forward-kernel variants in one process, FA3 beside when its library is present: each
variant is the table's kernel with some `Tiles` fields or `Schedule` switches replaced.  The
variants' launches are interleaved (A B C A B C ...), each timed with CUDA events, and each
variant's median is compared with the base's: the H100's clock drifts under sustained load by
more than the effects measured here (the same kernel read 5-7% apart within one run when timed
in separate blocks), and interleaving makes the drift hit every variant alike.  FA3 runs through
JAX, on another stream: it is timed against the base by one host clock in alternating blocks
(`timing.host_interleaved_ms`), and the other variants through their ratio to the base.

    python -m bench variants --points 128,causal,4096 256,full,2048 --variant r4 rescale_rounds=4
    python -m bench variants --points 128,full,16384 --variant nopp pingpong=False
    python -m bench variants --points 128,full,16384 --old /path/to/another/checkout

--old adds a variant "old": the forward of another checkout of the library (its table kernels),
loaded into this process beside this one, so that a refactor is measured against the code it
replaced with interleaved launches.  Variants named `wrong...` skip the correctness check.
"""
import argparse
import ast
import dataclasses
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
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "FIELD=VALUE"),
                   help="a name, then Tiles fields or pingpong/overlap to replace (Python literals)")
    p.add_argument("--old", help="another checkout whose forward runs as the variant 'old'")
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--launches", type=int, default=60, help="timed launches per variant and point")


def variant_overrides(assigns):
    """({Tiles field: value}, {Schedule field: value}) of a variant's FIELD=VALUE words."""
    from numba_fa3.forward import Schedule
    from numba_fa3.tiles import Tiles
    tile_fields = {f.name for f in dataclasses.fields(Tiles)}
    schedule_fields = {f.name for f in dataclasses.fields(Schedule)}
    tiles, schedule = {}, {}
    for a in assigns:
        key, _, value = a.partition("=")
        if key in tile_fields:
            tiles[key] = ast.literal_eval(value)
        elif key in schedule_fields:
            schedule[key] = ast.literal_eval(value)
        else:
            sys.exit(f"{key} is neither a Tiles field ({sorted(tile_fields)}) nor a Schedule one "
                     f"({sorted(schedule_fields)})")
    return tiles, schedule


def load_old(path, module="numba_fa3.forward", name="forward_kernel"):
    """`name` from `module` of the checkout at `path`, imported beside this process's library:
    its packages are imported under their own names, kept alive by the returned object, and taken
    out of sys.modules again so that this checkout's modules stay the ones imported."""
    import importlib
    names = ("numba_fa3", "primitives", "ptx_inline")
    ours = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, os.path.abspath(path))
    try:
        found = getattr(importlib.import_module(module), name)
    finally:
        sys.path.pop(0)
        for k in [k for k in sys.modules if k.split(".")[0] in names]:
            del sys.modules[k]
        sys.modules.update(ours)
    return found


def kernel_makers(variant_args, old=None):
    """{name: make_kernel} for the base, each --variant (NAME FIELD=VALUE ...) and --old."""
    from numba_fa3.forward import FULL_SCHEDULE, FlashForward
    from numba_fa3.tiles import tiles_for

    def maker(tile_choices, schedule_choices):
        schedule = dataclasses.replace(FULL_SCHEDULE, **schedule_choices)

        @functools.lru_cache(maxsize=None)
        def make(dt, d, kind, softcap=False, long_queries=False):
            tiles = tiles_for(d, kind != 0, long_queries).with_choices(**tile_choices)
            return FlashForward(dt, d, kind, schedule, tiles, softcap=softcap, long_queries=long_queries)
        return make

    kernels = {"base": maker({}, {})}
    for name, *assigns in variant_args:
        kernels[name] = maker(*variant_overrides(assigns))
    if old:
        old_kernel = load_old(old)
        kernels["old"] = lambda dt, d, kind, softcap=False, long_queries=False: old_kernel(
            dt, d, kind, softcap=softcap, long_queries=long_queries)
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

    kernels = kernel_makers(args.variant, args.old)
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
