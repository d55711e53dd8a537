"""How the benchmarks time a kernel, in one place.

- `interleaved_ms`: CUDA events around each launch, the launches of several functions on torch's
  stream alternated (A B C A B C ...).  For A/B tests of our own kernels.
- Host-clocked, for comparisons with FA3: FA3 runs through JAX, on XLA's stream, which torch's
  events cannot bracket, so every implementation is timed by one wall clock, each waiting on its
  own stream:
  - `host_interleaved_ms(cold=True)`: blocks of launches, the blocks of the functions alternated
    round by round, with an L2 flush on the function's stream before every launch (as
    `triton.testing.do_bench` does) and the same round's block of flushes alone subtracted.
  - `steady_ms`: each function back to back for a while on its own (FA3's own `time_forward`,
    made long enough to settle): the throughput of a loop that keeps the GPU busy.

Why steady is separate: the H100 here runs these kernels at its 700 W power cap (nvidia-smi:
throttle reason SW power cap, SM clock 1.47-1.72 GHz, a different one per kernel; bench/NOTES.md,
"Measurement method and noise"), and the flushes of the cold method lower the average power.  Interleaved blocks can
also run under a clock set by the kernel before them.  In one set of runs, ours/FA3 at hdim 128 full
16k read 0.91 interleaved (cold and back to back) and 0.97 steady.

The clock also drifts under sustained load by more than the differences measured here (one
kernel read 5-7% apart within one run when timed in separate blocks), so every comparison in
`bench` alternates what it compares: launch by launch, block by block, or turn by turn.
"""
import functools
import statistics
import time

#: Bytes each L2 flush reads and writes: five times the H100's 50 MB L2 (triton's do_bench uses
#: the same 256 MB).
FLUSH_BYTES = 256 << 20


def rotated(names, r):
    """Round r's order: `names` started r places along, so that over len(names) rounds every name
    runs once in every position.  Under the power cap a block of launches inherits the clock and
    temperature the blocks before it left, and a fixed order gives one implementation the same
    place (and predecessor) every round."""
    names = list(names)
    k = r % len(names) if names else 0
    return names[k:] + names[:k]


def interleaved_ms(fns, launches, warmup=5):
    """Median milliseconds per function (torch stream, CUDA events), launches interleaved."""
    import torch
    for f in fns.values():
        for _ in range(warmup):
            f()
    events = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(launches)] for n in fns}
    for i in range(launches):
        for n, f in fns.items():
            events[n][i][0].record()
            f()
            events[n][i][1].record()
    torch.cuda.synchronize()
    return {n: statistics.median(a.elapsed_time(z) for a, z in ev) for n, ev in events.items()}


class TorchStream:
    """torch's current stream: flush = an in-place add over FLUSH_BYTES; sync = synchronize."""

    def __init__(self):
        import torch
        self._torch = torch
        self._buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")

    def flush(self):
        self._buf.add_(1)

    def sync(self, result=None):
        self._torch.cuda.synchronize()


class JaxStream:
    """XLA's stream: flush = the same add on a donated JAX buffer; sync = wait for the last
    result and the flush buffer."""

    def __init__(self):
        import jax
        import jax.numpy as jnp
        self._jax = jax
        self._buf = jnp.zeros(FLUSH_BYTES // 4, dtype=jnp.int32)
        self._add = jax.jit(lambda x: x + 1, donate_argnums=0)

    def flush(self):
        self._buf = self._add(self._buf)

    def sync(self, result=None):
        if result is not None:
            self._jax.block_until_ready(result)
        self._jax.block_until_ready(self._buf)


@functools.lru_cache(maxsize=None)
def torch_stream():
    return TorchStream()


@functools.lru_cache(maxsize=None)
def jax_stream():
    return JaxStream()


def _block_ms(fn, stream, n, flush):
    result = None
    t0 = time.perf_counter()
    for _ in range(n):
        if flush:
            stream.flush()
        result = fn()
    stream.sync(result)
    return (time.perf_counter() - t0) * 1e3 / n


def host_interleaved_ms(fns, streams, cold, rounds=10, per_block=10, warmup=3):
    """Median milliseconds of one launch per function: fns {name: fn returning its output},
    streams {name: TorchStream | JaxStream}.  Each round times a block of `per_block` launches
    of every function in turn, the order rotated by one each round (and, cold, a block of
    flushes alone per stream, subtracted from that round's blocks)."""
    for name, fn in fns.items():
        for _ in range(warmup):
            streams[name].flush()
            fn()
        streams[name].sync()
    samples = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        flush_ms = {}
        for name in rotated(names, r):
            fn, st = fns[name], streams[name]
            ms = _block_ms(fn, st, per_block, cold)
            if cold:
                if id(st) not in flush_ms:
                    flush_ms[id(st)] = _block_ms(lambda: None, st, per_block, True)
                ms -= flush_ms[id(st)]
            samples[name].append(ms)
    return {n: statistics.median(v) for n, v in samples.items()}


def steady_ms(fns, streams, seconds=0.3, settle=0.15, rounds=2, per_block=10):
    """Median milliseconds of one launch per function, launched back to back: each function in
    turn runs `settle` seconds untimed (the power controller settles on its clock), then
    `seconds` timed; `rounds` such turns each, the order rotated by one each round."""
    samples = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for name in rotated(names, r):
            fn, st = fns[name], streams[name]
            for limit, timed in ((settle, False), (seconds, True)):
                n, t0 = 0, time.perf_counter()
                while True:
                    result = None
                    for _ in range(per_block):
                        result = fn()
                    st.sync(result)
                    n += per_block
                    elapsed = time.perf_counter() - t0
                    if elapsed >= limit:
                        break
            samples[name].append(elapsed * 1e3 / n)
    return {n: statistics.median(v) for n, v in samples.items()}


def fa3_forward(fa3, q, k, v, causal):
    """A zero-argument FA3 forward on fixed inputs (FA3's JAX loader), returning its output."""
    f = fa3._fwd_fn(*fa3._args(q, None, causal, (-1, -1)))
    args = [fa3._j(x) for x in (q, k, v)]
    return lambda: f(*args)


def fa3_backward(fa3, dout, q, k, v, causal, forward=False):
    """A zero-argument FA3 backward on fixed inputs (FA3's JAX loader), returning (dq, dk, dv).
    Its out and lse come from FA3's own forward, run once here (each library's lse is its own
    convention); with forward=True every call runs that forward first (forward plus backward)."""
    a = fa3._args(q, None, causal, (-1, -1))
    fwd, bwd = fa3._fwd_fn(*a), fa3._bwd_fn(*a)
    g, jq, jk, jv = (fa3._j(x) for x in (dout, q, k, v))
    if forward:
        return lambda: bwd(g, jq, jk, jv, *fwd(jq, jk, jv))
    out, lse = fwd(jq, jk, jv)
    return lambda: bwd(g, jq, jk, jv, out, lse)
