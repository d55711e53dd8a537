"""The deterministic backward's dQ order, simulated on the CPU: every key block that sees a query
block adds its dQ exactly once, in the order of its rank, and the waits always end.

The simulation runs the kernel's own rules (the Python bodies of `mask.block_range`,
`mask.query_block_range` and the rank of `backward_mainloop`'s `ordered`): tiles (key block, key
head) claimed in `tile_scheduler.key_block_coords`'s order (descending key blocks with a mask)
by a persistent grid whose CTAs also claim their next tile when they start one (the producer
runs ahead), each tile walking its group's query heads and query blocks first to last, a step
proceeding only when its query block's semaphore equals its rank."""
import types

from hypothesis import given, settings, strategies as st

from numba_fa3 import mask


def _python(device_fn, done=None):
    """The Python body of a `cuda.jit(device=True)` function, the device functions it calls
    replaced by theirs too: the kernel's own rule, run on the CPU."""
    done = {} if done is None else done
    if id(device_fn) in done:
        return done[id(device_fn)]
    py = device_fn.py_func
    scope = dict(py.__globals__)
    fn = done[id(device_fn)] = types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)
    for name, value in py.__globals__.items():
        if hasattr(value, "py_func") and name in py.__code__.co_names:
            scope[name] = _python(value, done)
    return fn


_block_range = _python(mask.block_range)
_query_block_range = _python(mask.query_block_range)


def _rank(nb, m, bm, bn, sq, sk, left, right, descending):
    n_min, n_max = _block_range(m, bm, bn, sq, sk, left, right)
    return int(n_max - 1 - nb) if descending else int(nb - n_min)


def simulate(sq, sk, bm, bn, left, right, heads_k, ratio, ctas, descending):
    """(semaphores, added): each query (head, block)'s final count, and the ranks that added."""
    n_blocks = -(-sk // bn)
    tiles = [(n_blocks - 1 - t if descending else t, hk) for hk in range(heads_k) for t in range(n_blocks)]
    sem, added = {}, {}

    def steps(tile):
        nb, hk = tile
        m_min, m_max = _query_block_range(nb, bm, bn, sq, sk, left, right)
        return [(h, m) for h in range(hk * ratio, hk * ratio + ratio) for m in range(m_min, m_max)]

    claimed = 0
    queues = []
    for _ in range(min(ctas, len(tiles))):
        queues.append([[tiles[claimed], steps(tiles[claimed]), False]])
        claimed += 1
    while any(queues):
        progressed = False
        for q in queues:
            if not q:
                continue
            cur = q[0]
            if not cur[2]:  # the tile starts: the producer claims the next one
                cur[2] = True
                if claimed < len(tiles):
                    q.append([tiles[claimed], steps(tiles[claimed]), False])
                    claimed += 1
            if cur[1]:
                h, m = cur[1][0]
                nb = cur[0][0]
                rank = _rank(nb, m, bm, bn, sq, sk, left, right, descending)
                if sem.get((h, m), 0) == rank:
                    sem[(h, m)] = rank + 1
                    added.setdefault((h, m), []).append(nb)
                    cur[1].pop(0)
                    progressed = True
            if not cur[1]:
                q.pop(0)
                progressed = True
        assert progressed, f"the waits never end: {sq=} {sk=} {left=} {right=} {ctas=} {descending=}"
    return sem, added


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 1200), sk=st.integers(1, 1200), left=st.sampled_from([-1, 0, 37, 300]),
       right=st.sampled_from([-1, 0, 5, 200]), heads_k=st.integers(1, 3), ratio=st.sampled_from([1, 2]),
       ctas=st.integers(1, 24))
def test_deterministic_dq_order_is_complete_and_never_waits_forever(sq, sk, left, right, heads_k, ratio, ctas):
    bm, bn = 64, 128
    masked = left >= 0 or right >= 0
    sem, added = simulate(sq, sk, bm, bn, left, right, heads_k, ratio, ctas, descending=masked)
    for h in range(heads_k * ratio):
        for m in range(-(-sq // bm)):
            n_min, n_max = _block_range(m, bm, bn, sq, sk, left, right)
            seen = list(range(int(n_min), int(n_max)))
            # every key block the forward visits for this query block added once, in rank order
            assert sorted(added.get((h, m), [])) == seen
            assert added.get((h, m), []) == (seen[::-1] if masked else seen)
            assert sem.get((h, m), 0) == len(seen)


def test_one_cta_runs_the_causal_order_alone():
    """One CTA (the smallest grid) finishes a causal run in the descending order: every wait is
    on a tile it claimed and finished before."""
    sem, added = simulate(1024, 1024, 64, 128, -1, 0, 2, 2, 1, descending=True)
    assert all(v == sorted(v, reverse=True) for v in added.values())
    assert len(sem) == 4 * (1024 // 64)
