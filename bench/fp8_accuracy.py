"""FA3's Table 3 on the CPU: the RMSE of attention outputs against float64 attention, for inputs
with outlier features, Q, K, V ~ N(0, 1) + N(0, 10^2) Bernoulli(0.001) (FA3 section 4.3), from the
NumPy models: the blocked bf16/fp16 forward (numba_fa3.blocked) and the FP8 forward
(numba_fa3.fp8_model) with per-tensor or per-block descales, with and without the Hadamard
rotation. The rows in parentheses are diagnostics: float64 attention with only Q and K, or only
V, replaced by their dequantized FP8 versions, and the FP8 model with P left unrounded or
without the 2^8 offset before P's rounding; they tell which rounding the FP8 error comes from.

    python -m bench fp8-accuracy [--seqlen 2048] [--hdim 128] [--heads 16] [--seeds 0 1] [--causal]
"""
import os

# The models multiply many tile-sized matrices, where BLAS threads cost more than they save (and
# far more on a loaded machine): one thread unless the caller chose otherwise.  This must run
# before NumPy loads BLAS.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

from . import common  # noqa: E402

#: FA3 Table 3 (RMSE against float64): FlashAttention-3 in FP16; standard attention in FP8 with
#: per-tensor scaling (FP32 matmul accumulators, softmax intermediates in FP16); FlashAttention-3
#: in FP8 with block quantization and incoherent processing.
PAPER_RMSE = {
    "fp16": 1.9e-4,
    "fp8 per-tensor": 2.4e-2,
    "fp8 per-block + rotation": 9.1e-3,
}


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench fp8-accuracy")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--hdim", type=int, default=128, help="a power of two (the rotation's size)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="each seed draws new inputs and rotation signs; the RMSE pools them")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--block-m", type=int, default=128)
    p.add_argument("--block-n", type=int, default=128)
    p.add_argument("--rows", nargs="+", default=None, help="row names (default: all)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from numba_fa3.fp8_model import ERROR_TABLE_ROWS, fp8_attention_error_table

    names = args.rows or list(ERROR_TABLE_ROWS)
    per_seed = {name: [] for name in names}
    max_abs = dict.fromkeys(names, 0.0)
    t0 = time.perf_counter()
    for seed in args.seeds:
        for r in fp8_attention_error_table(batch=args.batch, seqlen=args.seqlen, heads=args.heads,
                                           hdim=args.hdim, seed=seed, causal=args.causal,
                                           block_m=args.block_m, block_n=args.block_n, rows=names):
            per_seed[r["name"]].append(r["rmse"])
            max_abs[r["name"]] = max(max_abs[r["name"]], r["max_abs"])
        print(f"seed {seed} done, {time.perf_counter() - t0:.0f} s", flush=True)

    rows = []
    for name in names:
        rmses = per_seed[name]
        rmse = math.sqrt(sum(x * x for x in rmses) / len(rmses))  # equal element counts per seed
        rows.append(dict(row=name, rmse=rmse, rmse_min=min(rmses), rmse_max=max(rmses),
                         max_abs=max_abs[name], paper=PAPER_RMSE.get(name), per_seed=rmses))
    fmt = lambda x: "" if x is None else f"{x:.2e}"
    cols = ("row", "rmse", "rmse_min", "rmse_max", "max_abs", "paper")
    print(common.table([{c: (r[c] if c == "row" else fmt(r[c])) for c in cols} for r in rows], cols))

    problem = dict(batch=args.batch, seqlen=args.seqlen, heads=args.heads, hdim=args.hdim,
                   causal=args.causal, block_m=args.block_m, block_n=args.block_n, seeds=args.seeds,
                   inputs="N(0,1) + N(0,100) * Bernoulli(0.001)", reference="float64 attention",
                   seconds=round(time.perf_counter() - t0, 1))
    result = dict(meta=dict(common.meta(), device="CPU (NumPy models)"), problem=problem, rows=rows)
    path = args.out or os.path.join(common.RESULTS, f"fp8-accuracy-{result['meta']['date']}.json")
    common.write_json(path, result)
