"""Where a work tile's time goes: the forward kernel's trace build (`FlashForward(trace=True)`)
records %clock64 at the tile's landmarks in every CTA, and this prints, per configuration, the
cycles of each phase summed over all tiles, and the per-tile overhead in units of one steady
key-block iteration.

    python -m bench trace [--seqlens 2048 16384] [--hdims 128] [--causal false true] [--same-work] [--out F]
"""
import argparse
import functools
import sys

import numpy as np

from . import common

#: consumer phases: (name, from event, to event)
PHASES = (("wait Q", "WAIT_Q", "TILE"), ("first S", "TILE", "FIRST_S"), ("main loop", "FIRST_S", "LOOP_END"),
          ("last PV", "LOOP_END", "LAST_PV"), ("epilogue", "LAST_PV", "DONE"))


def analyse(buf, ctas):
    """Per-phase cycle totals over both consumer warpgroups and all recorded tiles, the steady
    block time (main loop cycles / its blocks) and the tile boundary's cost in blocks."""
    from numba_fa3.trace import TRACE_EVENTS, TRACE_ROLES, TRACE_TILES, TraceEvent, ProducerEvent
    ev = buf.reshape(ctas, TRACE_ROLES, TRACE_TILES, TRACE_EVENTS).astype(np.int64)
    cons = ev[:, 1:]
    done = cons[..., TraceEvent.DONE] != 0
    done[:, :, TRACE_TILES - 1] = False  # the overflow slot mixes tiles
    blocks = cons[..., TraceEvent.BLOCKS]
    out = {}
    for name, a, b in PHASES:
        d = cons[..., TraceEvent[b]] - cons[..., TraceEvent[a]]
        out[name] = int(d[done].sum())
    loop_blocks = int((blocks[done] - 1).sum())
    tiles = int(done.sum())
    total = sum(out.values())
    block = out["main loop"] / max(loop_blocks, 1)
    overhead = (total - out["main loop"]) / tiles - block   # the first block counts as work
    prod = ev[:, 0]
    pdone = prod[..., ProducerEvent.LAST_V] != 0
    pdone[:, TRACE_TILES - 1] = False
    p_wait = prod[..., ProducerEvent.Q_FREE] - prod[..., ProducerEvent.WAIT_Q]
    p_first = prod[..., ProducerEvent.FIRST_K] - prod[..., ProducerEvent.Q_FREE]
    # From the producer seeing Q's buffer free to the consumers starting that tile: Q's load
    # latency wherever the consumers were waiting for it.
    nxt = cons[:, :, 1:, TraceEvent.TILE]
    free = prod[:, None, 1:, ProducerEvent.Q_FREE]
    ok = done[:, :, 1:] & (nxt > 0)
    q_land = (nxt - free)[ok]
    # Each CTA's span, first Q wait to last epilogue (one SM's clock, so only spans compare across
    # CTAs; all start together, one persistent wave): the tail is the mean CTA's idle share of the
    # longest span, i.e. what load imbalance costs.
    if TRACE_TILES > int(done.sum(axis=2).max()) + 1:
        first = np.where(cons[..., TraceEvent.WAIT_Q] > 0, cons[..., TraceEvent.WAIT_Q], np.iinfo(np.int64).max)
        span = cons[..., TraceEvent.DONE].max(axis=(1, 2)) - first.min(axis=(1, 2))
        tail = float(1 - span.mean() / span.max())
    else:
        tail = float("nan")  # tiles past TRACE_TILES were not recorded
    return dict(tiles=tiles, blocks_per_tile=float(blocks[done].mean()), cycles=out, tail=tail,
                share={k: v / total for k, v in out.items()}, block_cycles=block,
                boundary_blocks=overhead / block, producer_wait_q=float(p_wait[pdone].mean()),
                producer_q_to_first_k=float(p_first[pdone].mean()), q_free_to_tile=float(np.median(q_land)))


def analyse_loop(buf, ctas):
    """Per main-loop step (averaged over CTAs and tiles): cycles from the last P V to K landing,
    K to its turn, turn to S landed, the softmax, softmax to P V landed; the step's period; and how
    far warpgroup 1's turn trails warpgroup 0's."""
    from numba_fa3.trace import MAX_CONSUMERS, TRACE_LOOP_EVENTS, TRACE_LOOP_STEPS, TRACE_TILES, LoopEvent as E
    ev = buf.reshape(ctas, MAX_CONSUMERS, TRACE_TILES, TRACE_LOOP_STEPS, TRACE_LOOP_EVENTS).astype(np.int64)
    ok = (ev != 0).all(-1)
    steps = []
    for k in range(0, TRACE_LOOP_STEPS):
        both = ok[..., k] & (ok[..., k - 1] if k else True)
        if both.sum() < 16:
            break
        cur = ev[..., k, :][both]
        prev = ev[..., k - 1, :][both] if k else None
        row = dict(step=k, samples=int(both.sum()),
                   wait_k=float(np.mean(cur[:, E.K_READY] - prev[:, E.PV_DONE])) if k else float("nan"),
                   wait_turn=float(np.mean(cur[:, E.TURN] - cur[:, E.K_READY])),
                   s_latency=float(np.mean(cur[:, E.S_READY] - cur[:, E.TURN])),
                   softmax=float(np.mean(cur[:, E.SOFTMAX] - cur[:, E.S_READY])),
                   wait_pv=float(np.mean(cur[:, E.PV_DONE] - cur[:, E.SOFTMAX])),
                   period=float(np.mean(cur[:, E.TURN] - prev[:, E.TURN])) if k else float("nan"))
        pair = ok[:, 0, :, k] & ok[:, 1, :, k]
        row["wg1_lag"] = float(np.mean(ev[:, 1, :, k, E.TURN][pair] - ev[:, 0, :, k, E.TURN][pair]))
        steps.append(row)
    return steps


def same_work(args):
    """Like common.grid, over `maskcost.PROBLEMS` (seqlen reported as seqlen_k): the full and
    causal kernels doing the same work on the same data (see bench/maskcost.py)."""
    import torch
    from .maskcost import PROBLEMS, problem
    for d in args.hdims:
        for causal in [c == "true" for c in args.causal]:
            for sq, sk, b, h in PROBLEMS:
                q, k, v = problem(d, sq, sk, b, h)
                allowed = torch.ones(sq, sk, device="cuda", dtype=torch.bool)
                if causal:
                    allowed = allowed.tril(sk - sq)
                ref = torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.expand(b, sk, h, d).transpose(1, 2), v.expand(b, sk, h, d).transpose(1, 2),
                    attn_mask=allowed).transpose(1, 2)
                yield d, causal, sk, (b, h, q, k, v, 4.0 * b * h * sq * sk * d, ref)


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench trace")
    p.add_argument("--seqlens", type=int, nargs="*", default=[2048, 4096, 16384])
    p.add_argument("--hdims", type=int, nargs="*", default=[128])
    p.add_argument("--causal", nargs="*", default=["false", "true"])
    p.add_argument("--same-work", action="store_true",
                   help="the maskcost problems (one query block per head, long keys) instead of the grid's")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch
    from numba_fa3.api import _forward
    from numba_fa3.forward import FlashForward
    from numba_fa3.trace import buffer_slots, split
    from numba_fa3.primitives import launch

    ctas = launch.sm_count()
    trace = torch.zeros(buffer_slots(ctas), dtype=torch.int64, device="cuda")

    class Traced(FlashForward):
        def launch(self, *a, **kw):
            super().launch(*a, trace=trace.data_ptr(), **kw)

    @functools.lru_cache(maxsize=None)
    def kernel(dtype, d, kind, softcap=False, long_queries=False):
        return Traced(dtype, d, kind, softcap=softcap, trace=True, long_queries=long_queries)

    rows = []
    for d, causal, s, (b, h, q, k, v, flops, ref) in (same_work(args) if args.same_work else common.grid(args)):
        out = torch.empty_like(q)
        for _ in range(3):  # warm: the last run's trace is read
            trace.zero_()
            _forward(q, k, v, None, causal, (-1, -1), 0.0, False, out, None, kernel)
        torch.cuda.synchronize()
        err = (out.float() - ref.float()).abs().max().item()
        assert err < 2e-2, f"trace build wrong: max error {err}"
        tiles, loop = split(trace.cpu().numpy(), ctas)
        r = analyse(tiles, ctas)
        r.update(hdim=d, causal=causal, seqlen=s, steps=analyse_loop(loop, ctas))
        rows.append(r)
        sh = "  ".join(f"{k} {v:.1%}" for k, v in r["share"].items())
        print(f"d{d} {'causal' if causal else 'full':6} {s:6}: {r['tiles']} tiles x "
              f"{r['blocks_per_tile']:.1f} blocks, block {r['block_cycles']:.0f} cyc, boundary "
              f"{r['boundary_blocks']:.2f} blocks, tail {r['tail']:.1%} | {sh} | producer: waits Q {r['producer_wait_q']:.0f}, "
              f"Q->first K {r['producer_q_to_first_k']:.0f}; Q free -> tile {r['q_free_to_tile']:.0f}")
        shown = [x for x in r["steps"] if x["step"] < 4 or x["step"] % 8 == 0]
        print(common.table(shown, list(shown[0]) if shown else []))
    if args.out:
        common.write_json(args.out, dict(meta=common.meta(), rows=rows))


if __name__ == "__main__":
    run(sys.argv[1:])
