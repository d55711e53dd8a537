"""Clock and power of each implementation under sustained load: is the comparison decided by the
H100's power cap?  Each implementation runs back to back for `--seconds` (after an idle pause,
in turns, `--rounds` times) while nvidia-smi samples the SM clock, board power and throttle
reasons every 20 ms; per run: TFLOPS, median SM clock, median power, and TFLOPS per GHz (the work
done per clock, which the cap does not change).

    python -m bench power [--points 128,full,16384 ...] [--seconds 2] [--out F]
"""
import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time

from . import common, timing
from .variants import load_fa3, parse_point

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
#: nvidia-smi's throttle-reason bits (nvmlClocksThrottleReasons)
REASONS = {0x1: "idle", 0x2: "app clocks", 0x4: "SW power cap", 0x8: "HW slowdown", 0x20: "SW thermal",
           0x40: "HW thermal", 0x80: "HW power brake"}


class Sampler:
    """nvidia-smi in the background, every `period_ms`, into a temporary CSV."""

    def __init__(self, period_ms=20):
        self._file = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
        self._proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader,nounits",
                                       "-lms", str(period_ms)], stdout=self._file)

    def window(self, t0, t1):
        """(sm MHz, W, C, throttle bits) samples stamped between t0 and t1 (time.time())."""
        out = []
        with open(self._file.name) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) != 5:
                    continue
                try:
                    stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                    row = (float(parts[1]), float(parts[2]), float(parts[3]), int(parts[4], 16))
                except ValueError:
                    continue
                if t0 <= stamp <= t1:
                    out.append(row)
        return out

    def close(self):
        self._proc.terminate()
        self._proc.wait()
        os.unlink(self._file.name)


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench power")
    p.add_argument("--points", type=parse_point, nargs="+",
                   default=[parse_point(x) for x in ("128,full,16384", "128,causal,16384", "256,full,16384",
                                                     "64,full,16384", "128,causal,2048")])
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--fa3", default=".fa3/libdew_flash_attn3.so")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from numba_fa3 import flash_attn

    fa3 = load_fa3(args.fa3)
    sampler = Sampler()
    rows = []
    try:
        for d, causal, s in args.points:
            b, h, q, k, v, flops, ref = common.attention_problem(s, d, causal)
            out = torch.empty_like(q)
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))

            def cudnn():
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            impls = {"numba_fa3": (lambda: flash_attn(q, k, v, causal=causal, out=out), timing.torch_stream()),
                     "cudnn-sdpa": (cudnn, timing.torch_stream())}
            if fa3 is not None:
                impls["fa3"] = (timing.fa3_forward(fa3, q, k, v, causal), timing.jax_stream())
            for rnd in range(args.rounds):
                for name, (fn, st) in impls.items():
                    st.sync(fn())
                    time.sleep(0.5)  # from idle each time: no implementation inherits another's clock
                    n, t0 = 0, time.time()
                    while time.time() - t0 < args.seconds:
                        result = None
                        for _ in range(10):
                            result = fn()
                        st.sync(result)
                        n += 10
                    t1 = time.time()
                    time.sleep(0.1)  # the sampler's last lines
                    sm = sampler.window(t0 + 0.3, t1)  # past the first 0.3 s, while the cap settles
                    tflops = flops * n / (t1 - t0) * 1e-12
                    clock = statistics.median(x[0] for x in sm) if sm else float("nan")
                    bits = 0
                    for x in sm:
                        bits |= x[3]
                    rows.append(dict(impl=name, hdim=d, causal=causal, seqlen=s, round=rnd, tflops=tflops,
                                     sm_mhz=clock, watts=statistics.median(x[1] for x in sm) if sm else None,
                                     temp_c=statistics.median(x[2] for x in sm) if sm else None,
                                     tflops_per_ghz=tflops / clock * 1e3 if sm else None,
                                     throttle=[r for bit, r in REASONS.items() if bits & bit]))
                    r = rows[-1]
                    print(f"d{d} {'causal' if causal else 'full':6} {s:6} {name:10} round {rnd}: {tflops:5.0f} TFLOPS "
                          f"{clock:5.0f} MHz {r['watts']} W  {r['tflops_per_ghz']:.1f} TFLOPS/GHz  {r['throttle']}",
                          flush=True)
    finally:
        sampler.close()
    result = dict(meta=common.meta(), rows=rows)
    common.write_json(args.out or os.path.join(common.RESULTS, f"power-{result['meta']['date']}.json"), result)


if __name__ == "__main__":
    run(sys.argv[1:])
