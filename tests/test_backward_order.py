"""The deterministic backward's dQ order, simulated on the CPU: every key block that sees a query
block adds its dQ exactly once, in the order of its rank, and the waits always end.

The simulation runs the kernel's own rules (the Python bodies of `mask.block_range`,
`mask.query_block_range`, `tile_scheduler.rotation` and `rotated_rank`, and the rank of
`backward_mainloop`'s `ordered`): tiles (key block, key head) claimed in
`tile_scheduler.key_block_coords`'s order (descending key blocks with a mask) by a persistent
grid whose CTAs also claim their next tile while running one (the producer runs ahead: at the
tile's start, the most pessimistic, or, as the kernel's producer does, once its consumers are
within the ring's stages of the tile's end), each tile walking its group's query heads and query
blocks first to last (without a mask, in the rotated order), a step proceeding only when its
query block's semaphore equals its rank."""
import random
import types

from hypothesis import assume, given, settings, strategies as st

from numba_fa3 import mask, tile_scheduler


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
_rotated_rank = _python(tile_scheduler.rotated_rank)


def _rotation(ctas):
    """`tile_scheduler.rotation`'s Python body in a grid of `ctas` CTAs."""
    fn = _python(tile_scheduler.rotation, {})
    fn.__globals__["special"] = types.SimpleNamespace(nctaid_x_here=lambda: ctas)
    fn.__globals__["udivmod32"] = lambda a, b: (int(a) // int(b), int(a) % int(b))
    return fn


def _rank(nb, m, bm, bn, sq, sk, left, right, descending):
    n_min, n_max = _block_range(m, bm, bn, sq, sk, left, right)
    return int(n_max - 1 - nb) if descending else int(nb - n_min)


def simulate(sq, sk, bm, bn, left, right, heads_k, ratio, ctas, descending, lookahead=None, rng=None):
    """(semaphores, added): each query (head, block)'s final count, and the ranks that added.
    lookahead None: a CTA claims its next tile when it starts one; else when `lookahead` steps
    of it are left, and the walks are rotated (the kernel without a mask, deterministic).
    rng: a random.Random that picks one action of one CTA at a time (else each CTA in turn does
    all it can)."""
    n_blocks = -(-sk // bn)
    tiles = [(n_blocks - 1 - t if descending else t, hk) for hk in range(heads_k) for t in range(n_blocks)]
    sem, added = {}, {}
    rotated = lookahead is not None
    rotation = _rotation(max(1, min(ctas, len(tiles))))
    m_count = -(-sq // bm)

    def steps(tile):
        nb, hk = tile
        m_min, m_max = _query_block_range(nb, bm, bn, sq, sk, left, right)
        walk = list(range(m_min, m_max))
        if rotated and walk:
            first = rotation(nb, n_blocks, m_max - m_min, lookahead)[0]
            walk = walk[first:] + walk[:first]
        return [(h, m) for h in range(hk * ratio, hk * ratio + ratio) for m in walk]

    def rank(nb, m):
        if rotated:
            return int(_rotated_rank(m, *rotation(nb, n_blocks, m_count, lookahead)))
        return _rank(nb, m, bm, bn, sq, sk, left, right, descending)

    claimed = 0
    queues = []
    for _ in range(min(ctas, len(tiles))):
        queues.append([[tiles[claimed], steps(tiles[claimed]), False]])
        claimed += 1

    def actions(q):
        """What CTA `q` can do now: claim its next tile, add its step's dQ, or finish its tile."""
        cur = q[0]
        can = []
        if not cur[2] and (not rotated or len(cur[1]) <= lookahead):
            can.append("claim")
        if cur[1]:
            h, m = cur[1][0]
            if sem.get((h, m), 0) == rank(cur[0][0], m):
                can.append("add")
        elif cur[2]:   # (the producer claims before the tile's end)
            can.append("finish")
        return can

    def act(q, what):
        nonlocal claimed
        cur = q[0]
        if what == "claim":
            cur[2] = True
            if claimed < len(tiles):
                q.append([tiles[claimed], steps(tiles[claimed]), False])
                claimed += 1
        elif what == "add":
            h, m = cur[1].pop(0)
            sem[(h, m)] = sem.get((h, m), 0) + 1
            added.setdefault((h, m), []).append(cur[0][0])
        else:
            q.pop(0)

    while any(queues):
        ready = [(q, a) for q in queues if q for a in actions(q)]
        assert ready, f"the waits never end: {sq=} {sk=} {left=} {right=} {ctas=} {descending=} {lookahead=}"
        if rng is None:   # every CTA in turn, each doing all it can
            for q in queues:
                for a in (actions(q) if q else ()):
                    act(q, a)
        else:             # one action of one CTA at a time, at random: CTAs of any relative speed
            act(*ready[rng.randrange(len(ready))])
    return sem, added


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 1200), sk=st.integers(1, 1200), left=st.sampled_from([-1, 0, 37, 300]),
       right=st.sampled_from([-1, 0, 5, 200]), heads_k=st.integers(1, 3), ratio=st.sampled_from([1, 2]),
       ctas=st.integers(1, 24))
def test_deterministic_dq_order_is_complete_and_never_waits_forever(sq, sk, left, right, heads_k, ratio, ctas):
    """With a mask (descending key blocks); without one the kernel's walks are rotated (below)."""
    bm, bn = 64, 128
    masked = left >= 0 or right >= 0
    assume(masked)
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


@settings(max_examples=300, deadline=None)
@given(sq=st.integers(1, 1500), sk=st.integers(1, 2500), heads_k=st.integers(1, 3), ratio=st.sampled_from([1, 2]),
       ctas=st.integers(1, 24), lookahead=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_rotated_dq_order_is_complete_and_never_waits_forever(sq, sk, heads_k, ratio, ctas, lookahead, seed):
    """Without a mask (rotated walks): every key block adds to every query block once, in the
    order the walks reach it, and the waits end, whatever the CTAs' relative speeds, with claims
    made `lookahead` steps before a tile's end."""
    bm, bn = 64, 128
    sem, added = simulate(sq, sk, bm, bn, -1, -1, heads_k, ratio, ctas, False, lookahead, random.Random(seed))
    n_blocks, m_count = -(-sk // bn), -(-sq // bm)
    rotation = _rotation(max(1, min(ctas, n_blocks * heads_k)))
    for h in range(heads_k * ratio):
        for m in range(m_count):
            got = added.get((h, m), [])
            assert sorted(got) == list(range(n_blocks)) and sem[(h, m)] == n_blocks
            # groups in order; in a group, the block that started latest before m first
            def arrival(nb):
                first, base, _ = rotation(nb, n_blocks, m_count, lookahead)
                return base, (m - first) % m_count
            assert got == sorted(got, key=arrival)


def test_rotation_starts_each_block_of_a_group_apart():
    """A group's blocks start at distinct query blocks, so side by side they reach each query
    block one step apart; groups are at most the grid and the query blocks less the lookahead."""
    rotation = _rotation(132)
    for n_blocks, m_count in ((128, 256), (16, 32), (256, 128), (40, 41), (3, 2), (1, 1)):
        firsts = [rotation(nb, n_blocks, m_count, 2) for nb in range(n_blocks)]
        size = max(1, min(n_blocks, m_count - 2, 132))
        assert [f[0] for f in firsts] == [nb % size for nb in range(n_blocks)]
        assert [f[1] for f in firsts] == [nb - nb % size for nb in range(n_blocks)]
