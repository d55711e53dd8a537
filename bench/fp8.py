"""FP8 forward benchmark: our FP8 attention beside cuDNN's FP8 attention and our bf16 forward,
same process, same inputs, over FA3's Figure-5 grid (16k tokens per batch, hidden 2048).

    python -m bench fp8 [--hdims 256 128 64] [--causal false true] [--seqlens 512 1024 ...]
                        [--timing interleaved cold steady] [--rounds 6] [--launches 20]
                        [--host-rounds 10] [--no-headstart] [--cudnn-fp8 .fa3/cudnn_fp8.py] [--no-cudnn]
                        [--out F]

Per point: random bf16 q, k, v [B, S, H, D], quantized once by `quantize_fp8` as
`precision="fp8"` quantizes (`fp8_blocks`: Q per block_m rows, K per block_n rows, V as
`api_fp8.V_GRANULARITY`, Q and K rotated), and these timed (a row's `impl`):
- "ours_fp8": `flash_attn_fp8` on those codes and descales: the V transpose pass
  (`fp8_layout.transpose_v`) and the attention kernel, what a caller holding e4m3 inputs pays;
- "transpose": `transpose_v` alone, into a buffer allocated outside the timed call;
- "ours_fp8_kernel": the attention kernel alone, *not timed on its own*: ours_fp8's median minus
  transpose's, per timing method (a row's `derived` names the formula);
- "quantize": `quantize_fp8` on the bf16 inputs (three launches);
- "copy": torch's copy of a buffer of q, k and v's bytes into another, the bandwidth the
  quantizer is held against (its bytes read and written);
- "e2e_fp8": `flash_attn(..., precision="fp8")`: quantize, transpose and kernel from bf16 inputs;
- "ours_bf16": `flash_attn` on the bf16 inputs;
- "cudnn_fp8": cuDNN's FP8 forward (`CudnnFP8`, the peer module given by --cudnn-fp8) on the same
  codes.  cuDNN takes per-tensor descales only; it gets ours as codes with descales of 1, so its
  output is not the attention of q, k, v (no error is recorded for it), while its work, and so
  its speed, is that of any e4m3 input of this shape.  Where the peer cannot be loaded (no
  module, no cudnn frontend) or declines a shape, its rows are missing, the reason is printed
  and kept in the JSON's `missing`, and the rest still runs.
Attention rows report TFLOPS (4 B H S^2 D, halved for causal); quantize, transpose and copy
report TB/s against the bytes they must move (`quantize.bytes_moved`, `fp8_layout.bytes_moved`,
twice the buffer).

Timing methods (a row's `timing`, `--timing`; see bench/timing.py):
- "interleaved": `timing.interleaved_ms`, CUDA events around each launch, the launches of all
  functions alternated in one loop, over `--rounds` rounds whose function order is rotated by one
  each round (`timing.rotated`); the median of the rounds' medians.  No L2 flush.  Each round
  starts behind a GPU sleep long enough for the host to queue the whole round (`headstart`,
  off with --no-headstart): the transpose moves 64 MB at every point (V is 16k tokens x 2048
  bytes), some 20 us of HBM time, less than its host path, and at short sequences the whole
  loop may be too; an event recorded on an idle GPU would time the host's launch as well.
- "cold" and "steady": `timing.host_interleaved_ms(cold=True)` (L2 flushed before each launch,
  the flushes subtracted; the flush keeps the GPU ahead of the host) and `timing.steady_ms`
  (back to back until the power-capped clock settles), as `bench attention` times them.  Steady
  is the rate of back-to-back calls: for a call shorter than its host path (the transpose, the
  quantizer, the shortest sequences) that is the host's rate, not the GPU's.
Everything runs on torch's default stream (its current one, unchanged here): ours launches on
torch's current stream, and cuDNN's frontend executes on its handle's stream, the legacy default
one, which is torch's default stream, so the events and the host clock's synchronizations
bracket it as they do ours.  Ratios (`ratios`) are taken within one
method, never across.

Printed per point and method: TFLOPS or TB/s per function and the ratios ours_fp8 / cudnn_fp8,
ours_fp8_kernel / cudnn_fp8 and e2e_fp8 / ours_bf16, each a throughput ratio (the inverse ratio
of the times: above 1 when the first is faster); quantize's TB/s against copy's is the
quantizer's share of the copy rate.  The JSON (`--out`, by default
bench/results/fp8-<date>-<device>.json) holds `meta` (device, driver, date, commit, settings,
notes), `rows` (one per function, point and method, as `bench attention`'s), `ratios` (one per
point and method) and `missing`; it is rewritten after every point with `meta.complete` false,
and true at the end.
"""
import argparse
import importlib.util
import os
import re
import statistics
import subprocess
import sys

from . import common, timing

#: The timed functions, in the order of the first interleaved round.
TIMED = ("ours_fp8", "transpose", "quantize", "copy", "e2e_fp8", "ours_bf16", "cudnn_fp8")
PEER = "cudnn_fp8"
#: The kernel-only figure: (name, minuend, subtrahend) of a difference of medians.
KERNEL = ("ours_fp8_kernel", "ours_fp8", "transpose")
#: Passes over memory: reported in TB/s against their bytes rather than in TFLOPS.
MEMORY_PASSES = ("quantize", "transpose", "copy")
#: (numerator, denominator) of each ratio printed and recorded per point.
RATIOS = (("ours_fp8", PEER), (KERNEL[0], PEER), ("e2e_fp8", "ours_bf16"))
#: Whose output is checked against SDPA's bf16 output (max |error|): the outputs that should be
#: the attention of q, k, v.
CHECKED = ("ours_fp8", "e2e_fp8", "ours_bf16")
TIMINGS = ("interleaved", "cold", "steady")
DEFAULT_HDIMS = [256, 128, 64]
DEFAULT_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
DEFAULT_PEER = ".fa3/cudnn_fp8.py"
#: ms x 1e9 = FLOP/s x 1e12 (TFLOPS) and B/s x 1e12 (TB/s).
PER_MS_TO_TERA = 1e9
#: Untimed calls of every function before each interleaved round's timed ones.
INTERLEAVED_WARMUP = 5
#: A generous bound on one call's host time (the launch path took ~0.1 ms a call in
#: bench/NOTES.md, "Launch overhead"; e2e_fp8 launches six kernels).
HOST_CALL_BOUND_S = 0.5e-3
#: Above the H100's highest SM clock, so that a sleep of seconds x this many cycles lasts at
#: least that many seconds.
SLEEP_CLOCK_HZ = 2.0e9


def parser():
    p = argparse.ArgumentParser(prog="python -m bench fp8")
    p.add_argument("--hdims", type=int, nargs="+", default=DEFAULT_HDIMS,
                   help="head dims; those the FP8 forward lacks (tiles.FP8_HEAD_DIMS) are skipped, and said so")
    p.add_argument("--causal", nargs="+", choices=["false", "true"], default=["false", "true"])
    p.add_argument("--seqlens", type=int, nargs="+", default=DEFAULT_SEQLENS)
    p.add_argument("--timing", nargs="+", choices=TIMINGS, default=list(TIMINGS),
                   help="timing methods (default all): interleaved CUDA events, host-clocked cold (L2 flushed) "
                        "and steady (back to back)")
    p.add_argument("--rounds", type=int, default=6,
                   help="interleaved rounds per point (median of the rounds' medians), each round's order "
                        "rotated by one")
    p.add_argument("--launches", type=int, default=20, help="timed launches per function in each interleaved round")
    p.add_argument("--host-rounds", type=int, default=10, help="rounds of the host-clocked cold timing")
    p.add_argument("--no-headstart", action="store_true",
                   help="start interleaved rounds without the GPU sleep that lets the host queue them first")
    p.add_argument("--cudnn-fp8", default=DEFAULT_PEER, help="the cuDNN FP8 peer module (CudnnFP8)")
    p.add_argument("--no-cudnn", action="store_true", help="leave cuDNN's FP8 forward out")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/fp8-<date>-<device>.json)")
    return p


def grid_points(hdims, causal, seqlens, supported=None):
    """([(hdim, causal, seqlen, batch, heads)], skipped head dims) of Figure 5's problem (batch =
    TOKENS // seqlen, heads = HIDDEN // hdim), nested hdim, causal, seqlen; `causal` as strings
    "true"/"false" or booleans; head dims outside `supported` (default tiles.FP8_HEAD_DIMS) are
    left out and returned as skipped."""
    if supported is None:
        from numba_fa3.tiles import FP8_HEAD_DIMS as supported
    kept = [d for d in hdims if d in supported]
    skipped = [d for d in hdims if d not in supported]
    masks = [c if isinstance(c, bool) else c == "true" for c in causal]
    points = [(d, c, s, common.TOKENS // s, common.HIDDEN // d) for d in kept for c in masks for s in seqlens]
    return points, skipped


def forward_flops(batch, heads, seqlen, hdim, causal):
    """4 B H S^2 D (two GEMMs of 2 S^2 D per head), halved for causal, the count FA3's Figure 5
    uses (and `common.attention_problem`)."""
    return 4.0 * batch * heads * seqlen * seqlen * hdim / (2 if causal else 1)


def with_kernel(ms):
    """ms {impl: median ms} with the kernel-only entry added, after its minuend, where both its
    terms are present: a difference of medians, not a median of differences."""
    name, total, part = KERNEL
    out = {}
    for n, t in ms.items():
        out[n] = t
        if n == total and part in ms:
            out[name] = t - ms[part]
    return out


def ratios(ms):
    """{"a/b": ms[b] / ms[a]} for each of RATIOS: a's throughput over b's (above 1 when a is
    faster); None where either is missing or a's time is not positive."""
    out = {}
    for a, b in RATIOS:
        ok = a in ms and b in ms and ms[a] > 0
        out[f"{a}/{b}"] = ms[b] / ms[a] if ok else None
    return out


def point_rows(point, blocks, method, ms, flops, nbytes, ms_rounds=None, errors=None):
    """The JSON rows of one point and timing method, one per function in `ms` (with_kernel
    applied): point (hdim, causal, seqlen, batch, heads), blocks (block_m, block_n), flops of the
    attention, nbytes {memory pass: bytes}, ms_rounds {impl: per-round medians} (interleaved),
    errors {impl: max abs error against SDPA}."""
    d, causal, s, b, h = point
    ms_rounds, errors = ms_rounds or {}, errors or {}
    rows = []
    for name, t in with_kernel(ms).items():
        memory = name in MEMORY_PASSES
        rows.append(dict(
            impl=name, mode="fwd", dtype="bf16" if name == "ours_bf16" else "fp8", hdim=d, causal=causal,
            seqlen=s, batch=b, heads=h, block_m=blocks[0], block_n=blocks[1], timing=method, ms=t,
            tflops=None if memory or t <= 0 else flops / t / PER_MS_TO_TERA,
            bytes=nbytes.get(name) if memory else None,
            tb_s=nbytes[name] / t / PER_MS_TO_TERA if memory and t > 0 else None,
            ms_rounds=ms_rounds.get(name),
            derived=f"{KERNEL[1]} - {KERNEL[2]} (medians)" if name == KERNEL[0] else None,
            max_abs_err=errors.get(name)))
    return rows


def ratio_record(point, method, ms):
    """The `ratios` entry of one point and timing method."""
    d, causal, s, b, h = point
    return dict(hdim=d, causal=causal, seqlen=s, batch=b, heads=h, timing=method, **ratios(with_kernel(ms)))


def device_short(name):
    """A file-name tag of a device name: "NVIDIA H100 80GB HBM3" -> "h100"; "gpu" if unknown."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", name or "") if w]
    words = [w for w in words if w.lower() not in ("nvidia", "tesla", "geforce", "rtx")]
    return words[0].lower() if words else "gpu"


def results_path(out, date, device):
    """--out if given, else bench/results/fp8-<date>-<device_short(device)>.json."""
    return out or os.path.join(common.RESULTS, f"fp8-{date}-{device_short(device)}.json")


def notes(skipped_hdims, peer_note):
    """meta.notes: what the derived and peer figures mean, and what was left out."""
    n = {"ours_fp8_kernel": f"{KERNEL[1]} median minus {KERNEL[2]} median, per timing method; "
                            "not timed on its own",
         "ratios": "throughput ratios (inverse ratio of ms) within one timing method: above 1 when the "
                   "first is faster",
         PEER: "cuDNN FP8 on our block-quantized codes with per-tensor descales of 1 (cuDNN has no "
               "per-block descale): same work and speed, output not comparable, no error recorded",
         "max_abs_err": "against SDPA's bf16 output on the same bf16 q, k, v",
         "steady": "the rate of back-to-back calls: the host's rate for calls shorter than their host path "
                   "(transpose, quantize, the shortest sequences)"}
    if skipped_hdims:
        n["skipped_hdims"] = skipped_hdims
    if peer_note:
        n["peer"] = peer_note
    return n


def record(run_meta, rows, ratio_rows, missing, complete):
    """The results file's object."""
    return dict(meta=dict(run_meta, complete=complete), rows=rows, ratios=ratio_rows, missing=missing)


def driver_version():
    """The NVIDIA driver's version (nvidia-smi), else the CUDA driver API's (Numba), else None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from numba.cuda.cudadrv.driver import driver
        return "CUDA " + ".".join(map(str, driver.get_version()))
    except Exception:
        return None


def load_peer(path):
    """(CudnnFP8 class or None, a note saying why not): the peer module at `path`, imported from
    its file; the cudnn frontend it needs must be importable."""
    if not os.path.exists(path):
        return None, f"no cuDNN FP8 peer at {path}"
    if importlib.util.find_spec("cudnn") is None:
        return None, "the cudnn frontend (module cudnn) is not importable: put its wheel on PYTHONPATH"
    try:
        spec = importlib.util.spec_from_file_location("cudnn_fp8", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.CudnnFP8, None
    except Exception as e:
        return None, f"{path} failed to import: {type(e).__name__}: {first_line(e)}"


def first_line(e):
    return (str(e).splitlines() or [""])[0]


def timed_functions(q, k, v, causal, peer):
    """({impl: zero-argument function}, {impl: its output, from one call}, a note if the peer
    failed): the TIMED functions on one point's bf16 q, k, v, quantized once here."""
    import torch
    import numba_fa3
    from numba_fa3 import fp8_layout
    from numba_fa3.api_fp8 import V_GRANULARITY, flash_attn_fp8, fp8_blocks
    from numba_fa3.quantize import quantize_fp8
    bm, bn = fp8_blocks(q.shape[-1], causal)
    vg = V_GRANULARITY
    q8, k8, v8, qd, kd, vd = quantize_fp8(q, k, v, block_m=bm, block_n=bn, v_granularity=vg)
    vt = fp8_layout.transpose_v(v8)
    o8, oe, o16 = (torch.empty_like(q) for _ in range(3))
    src = torch.empty(q.numel() + k.numel() + v.numel(), dtype=q.dtype, device=q.device)
    dst = torch.empty_like(src)
    fns = {"ours_fp8": lambda: flash_attn_fp8(q8, k8, v8, qd, kd, vd, causal=causal, out=o8),
           "transpose": lambda: fp8_layout.transpose_v(v8, out=vt),
           "quantize": lambda: quantize_fp8(q, k, v, block_m=bm, block_n=bn, v_granularity=vg),
           "copy": lambda: dst.copy_(src),
           "e2e_fp8": lambda: numba_fa3.flash_attn(q, k, v, causal=causal, precision="fp8", out=oe),
           "ours_bf16": lambda: numba_fa3.flash_attn(q, k, v, causal=causal, out=o16)}
    note = None
    if peer is not None:
        try:
            fns[PEER] = peer(q8, k8, v8, causal=causal)
            fns[PEER]()
            torch.cuda.synchronize()
        except Exception as e:  # the peer declines the shape (head dim, version, memory): no row
            fns.pop(PEER, None)
            note = f"{type(e).__name__}: {first_line(e)}"
    outputs = {n: fns[n]() for n in CHECKED}
    torch.cuda.synchronize()
    return {n: fns[n] for n in TIMED if n in fns}, outputs, note


def headstart_cycles(calls):
    """GPU cycles of a sleep that outlasts the host's queueing of `calls` calls."""
    return int(calls * HOST_CALL_BOUND_S * SLEEP_CLOCK_HZ)


def headstart(calls):
    """Queue a GPU sleep (torch's `_sleep`, a spin of so many cycles) that outlasts the host's
    queueing of `calls` calls, so that they run back to back from the queue and events time the
    GPU alone; False where this torch lacks it."""
    import torch
    sleep = getattr(torch.cuda, "_sleep", None)
    if sleep is None:
        return False
    sleep(headstart_cycles(calls))
    return True


def time_point(fns, methods, rounds, launches, host_rounds, use_headstart=True):
    """({method: {impl: median ms}}, per-round medians of the interleaved method {impl: [ms]})."""
    timed, per_round = {}, {n: [] for n in fns}
    if "interleaved" in methods:
        for r in range(rounds):
            if use_headstart:
                headstart((INTERLEAVED_WARMUP + launches) * len(fns))
            ms = timing.interleaved_ms({n: fns[n] for n in timing.rotated(fns, r)}, launches,
                                       warmup=INTERLEAVED_WARMUP)
            for n, t in ms.items():
                per_round[n].append(t)
        timed["interleaved"] = {n: statistics.median(per_round[n]) for n in fns}
    streams = {n: timing.torch_stream() for n in fns}
    if "cold" in methods:
        timed["cold"] = timing.host_interleaved_ms(fns, streams, cold=True, rounds=host_rounds)
    if "steady" in methods:
        timed["steady"] = timing.steady_ms(fns, streams)
    return {m: {n: ms[n] for n in fns} for m, ms in timed.items()}, per_round


def summary(point, method, ms, flops, nbytes):
    """One printed line: TFLOPS or TB/s per function, then the ratios."""
    d, causal, s, _, _ = point
    parts = []
    for name, t in with_kernel(ms).items():
        if t <= 0:  # a difference of medians, or a cold time less its flushes, lost in the noise
            parts.append(f"{name}=n/a")
        elif name in MEMORY_PASSES:
            parts.append(f"{name}={nbytes[name] / t / PER_MS_TO_TERA:.2f}TB/s")
        else:
            parts.append(f"{name}={flops / t / PER_MS_TO_TERA:.0f}")
    rs = "  ".join(f"{k}={v:.3f}" for k, v in ratios(with_kernel(ms)).items() if v is not None)
    return f"d={d} causal={causal} s={s} {method:11}  " + "  ".join(parts) + "  " + rs


def run(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if not all(0 < s <= common.TOKENS for s in args.seqlens):
        p.error(f"--seqlens: from 1 to {common.TOKENS} (the tokens per batch)")
    points, skipped = grid_points(args.hdims, args.causal, args.seqlens)
    if skipped:
        from numba_fa3.tiles import FP8_HEAD_DIMS
        print(f"skipping head dims {skipped}: the FP8 forward supports {list(FP8_HEAD_DIMS)}", flush=True)
    if not points:
        p.error("no head dim of --hdims is supported by the FP8 forward")
    from numba_fa3 import fp8_layout, quantize
    from numba_fa3.api_fp8 import V_GRANULARITY, fp8_blocks

    peer, peer_note = (None, "--no-cudnn") if args.no_cudnn else load_peer(args.cudnn_fp8)
    if peer_note:
        print(f"{PEER}: left out: {peer_note}", flush=True)
    run_meta = dict(common.meta(), driver=driver_version(), problem=dict(tokens=common.TOKENS, hidden=common.HIDDEN),
                    settings=dict(timing=args.timing, rounds=args.rounds, launches=args.launches,
                                  warmup=INTERLEAVED_WARMUP, host_rounds=args.host_rounds,
                                  headstart=not args.no_headstart),
                    notes=notes(skipped, peer_note))
    path = results_path(args.out, run_meta["date"], run_meta["device"])
    rows, ratio_rows, missing = [], [], []
    for point in points:
        d, causal, s, b, h = point
        _, _, q, k, v, _, ref = common.attention_problem(s, d, causal)
        flops = forward_flops(b, h, s, d, causal)
        blocks = fp8_blocks(d, causal)
        fns, outputs, note = timed_functions(q, k, v, causal, peer)
        if note:
            print(f"d={d} causal={causal} s={s}: {PEER} skipped: {note}", flush=True)
            missing.append(dict(hdim=d, causal=causal, seqlen=s, impl=PEER, reason=note))
        errors = {n: (o.float() - ref.float()).abs().max().item() for n, o in outputs.items()}
        nbytes = {"quantize": quantize.bytes_moved(q.shape, k.shape, *blocks, v_granularity=V_GRANULARITY),
                  "transpose": fp8_layout.bytes_moved(tuple(v.shape)),
                  "copy": 2 * (q.numel() + k.numel() + v.numel()) * q.element_size()}
        timed, per_round = time_point(fns, args.timing, args.rounds, args.launches, args.host_rounds,
                                      use_headstart=not args.no_headstart)
        for method, ms in timed.items():
            rows += point_rows(point, blocks, method, ms, flops, nbytes,
                               per_round if method == "interleaved" else None, errors)
            ratio_rows.append(ratio_record(point, method, ms))
            print(summary(point, method, ms, flops, nbytes), flush=True)
        print(f"d={d} causal={causal} s={s} max abs err vs SDPA bf16:",
              "  ".join(f"{n}={e:.3g}" for n, e in errors.items()), flush=True)
        del fns, outputs, q, k, v, ref
        # after every point, marked incomplete: a run cut by a time limit still leaves its rows
        common.write_json(path, record(run_meta, rows, ratio_rows, missing, complete=False), quiet=True)
    common.write_json(path, record(run_meta, rows, ratio_rows, missing, complete=True))
    print(common.table(rows, ["impl", "timing", "hdim", "causal", "seqlen", "ms", "tflops", "tb_s"]))
    print(common.table(ratio_rows, ["timing", "hdim", "causal", "seqlen"] + [f"{a}/{b}" for a, b in RATIOS]))


if __name__ == "__main__":
    run(sys.argv[1:])
