"""Fill the kernel cache ahead of time, e.g. in a container build:

    python -m numba_fa3.precompile                          # every head dim, dtype and mask
    python -m numba_fa3.precompile --hdims 128 --dtypes bf16 --masks causal --varlen --gemm

Each specialization that `flash_attn` (and with --varlen `flash_attn_varlen`, with --gemm
`matmul`) would compile for those choices is compiled once and stored where the library looks
(`primitives.kernel_cache`: $NUMBA_FA3_CACHE_DIR, else $XDG_CACHE_HOME/numba_fa3); ones already
there are skipped.  No GPU is needed: without one the kernels are compiled for sm_90 (H100/H200),
as on a Hopper GPU, so a CPU build machine can fill the cache of the same environment (same
Python packages: their versions are part of every entry's key).
"""
import argparse
import concurrent.futures
import logging
import multiprocessing
import os
import sys
import time

DTYPES = {"bf16": "bf16", "fp16": "f16", "f16": "f16"}
MASKS = ("full", "causal", "local")


def specializations(hdims, dtypes, masks, softcap, varlen, gemm, backward=False):
    """(kind, arguments) of every kernel the API would build for these choices (with `backward`,
    flash_attn_backward's too: its pre- and postprocess, the main kernel in both modes)."""
    from . import mask as mk, tiles
    kinds = {"full": mk.MASK_NONE, "causal": mk.MASK_CAUSAL, "local": mk.MASK_LOCAL}
    specs = []
    for dtype in dtypes:
        for d in hdims:
            for m in masks:
                kind = kinds[m]
                masked = kind != mk.MASK_NONE
                for cap in sorted({False, softcap}):
                    longs = [False] + ([True] if tiles.has_long_tiles(d, masked, tiles.LONG_QUERIES) else [])
                    specs += [("forward", (dtype, d, kind, cap, False, long)) for long in longs]
                    if varlen:
                        specs.append(("forward", (dtype, d, kind, cap, True, False)))
                    if backward and d in tiles.BACKWARD_HEAD_DIMS:
                        specs += [("backward", (dtype, d, kind, cap, vl, det))
                                  for vl in sorted({False, varlen}) for det in (False, True)]
            if backward and d in tiles.BACKWARD_HEAD_DIMS:
                for vl in sorted({False, varlen}):
                    specs += [("preprocess", (dtype, d, vl)), ("postprocess", (dtype, d, vl))]
        if gemm:
            specs += [("gemm", (dtype, out, tb)) for out in (dtype, "f32") for tb in (True, False)]
    return specs


def specs_of(args):
    """`specializations` of the parsed command line."""
    return specializations(args.hdims, [DTYPES[d] for d in dict.fromkeys(args.dtypes)], args.masks, args.softcap,
                           args.varlen, args.gemm, backward=args.backward)


def _kernel(kind, args):
    if kind == "gemm":
        from numba_fa3.primitives.gemm import gemm_kernel
        return gemm_kernel(*args)
    if kind == "backward":
        from .backward import backward_kernel
        dtype, d, mask_kind, softcap, varlen, deterministic = args
        return backward_kernel(dtype, d, mask_kind, softcap=softcap, varlen=varlen, deterministic=deterministic)
    if kind in ("preprocess", "postprocess"):
        from . import backward_prep
        return getattr(backward_prep, f"{kind}_kernel")(*args)
    from .forward import forward_kernel
    dtype, d, mask_kind, softcap, varlen, long_queries = args
    return forward_kernel(dtype, d, mask_kind, softcap=softcap, varlen=varlen, long_queries=long_queries)


def build(spec, cc):
    """Compile one specialization into the cache unless there; (label, seconds or None if it was
    there already)."""
    from numba_fa3.primitives import kernel_cache
    kern = _kernel(*spec)
    label = kernel_cache.describe(kern)
    if kernel_cache.load(kernel_cache.kernel_key(kern, cc), type(kern).__name__) is not None:
        return label, None
    start = time.perf_counter()
    kernel_cache.cubin(kern, cc)
    return label, time.perf_counter() - start


def parser():
    from .tiles import SUPPORTED_HEAD_DIMS
    p = argparse.ArgumentParser(prog="python -m numba_fa3.precompile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hdims", type=int, nargs="+", default=list(SUPPORTED_HEAD_DIMS), choices=SUPPORTED_HEAD_DIMS)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    p.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    p.add_argument("--softcap", action="store_true", help="also the soft-capping kernels (softcap > 0)")
    p.add_argument("--varlen", action="store_true", help="also flash_attn_varlen's kernels")
    p.add_argument("--backward", action="store_true", help="also flash_attn_backward's kernels")
    p.add_argument("--gemm", action="store_true", help="also matmul's kernels (bf16/fp16 or fp32 out, both B layouts)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="compiles at once (each is one CPU core for 5-30 s)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    from numba_fa3.primitives import kernel_cache
    from numba_fa3.primitives.compile import _have_driver
    directory = kernel_cache.cache_dir()
    if directory is None:
        sys.exit("the kernel cache is off (NUMBA_FA3_CACHE=0): nothing to fill")
    if _have_driver():
        from numba_fa3.primitives.launch import check_hopper
        check_hopper()
    else:
        print(f"no GPU here: compiling for sm_{kernel_cache.ASSUMED_CC[0]}{kernel_cache.ASSUMED_CC[1]} "
              "(H100/H200), as a Hopper GPU would")
    cc = kernel_cache.device_cc()
    specs = specs_of(args)
    print(f"{len(specs)} kernels into {directory}, {args.jobs} at a time")
    start, failed = time.perf_counter(), 0
    # Processes, since Numba compiles under a global lock; spawned, since a forked child cannot use
    # the CUDA driver its parent initialized.
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        futures = {pool.submit(build, spec, cc): spec for spec in specs}
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            try:
                label, seconds = fut.result()
            except Exception as e:  # noqa: BLE001 - report every failure, then exit non-zero
                failed += 1
                print(f"[{i}/{len(specs)}] {futures[fut]} FAILED: {e}")
                continue
            print(f"[{i}/{len(specs)}] {label}: " + ("already cached" if seconds is None else f"{seconds:.1f} s"))
    print(f"done in {time.perf_counter() - start:.0f} s" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
