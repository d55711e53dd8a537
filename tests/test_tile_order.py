"""Run on the GPU: the forward kernel's tile order (tile_scheduler.coords) maps every linear tile
id to a distinct (m_block, head, batch), and causal runs take each L2 section's pairs longest tile
first, a whole m_block row of the section before the next; mask.unmasked_range bounds exactly the
key blocks that need no mask."""
import collections

import numpy as np
import pytest

SHAPES = [  # (m_blocks, heads, batch, section, tail)
    (16, 16, 8, 32, 0), (32, 16, 4, 16, 0), (128, 16, 1, 4, 0), (7, 5, 3, 4, 0), (3, 1, 1, 1, 0), (5, 12, 2, 8, 0),
    (1, 3, 2, 2, 0), (8, 8, 16, 1, 33), (4, 8, 2, 1, 16), (7, 5, 3, 1, 4), (3, 1, 1, 1, 1), (2, 3, 1, 1, 2),
]


def _sections(pairs, section, tail):
    """(first pair, pairs) of each section in run order: `section`-sized ones, then the tail's."""
    out = [(start, min(section, pairs - tail - start)) for start in range(0, pairs - tail, section)]
    return out + ([(pairs - tail, tail)] if tail else [])


#: the fields of a parameter record that tile_scheduler.coords reads
Order = collections.namedtuple("Order", "m_blocks heads batch section tail")


def _coords(longest_first, m_blocks, heads, batch, section, tail):
    from numba import cuda
    from numba_fa3.tile_scheduler import tile_scheduler
    tile_coords = tile_scheduler(longest_first, False).coords

    @cuda.jit
    def kernel(out, m_blocks, heads, batch, section, tail):
        t = cuda.grid(1)
        if t < out.shape[0]:
            p = Order(np.int32(m_blocks), np.int32(heads), np.int32(batch), np.int32(section), np.int32(tail))
            mb, h, b = tile_coords(p, np.int32(t))
            out[t, 0], out[t, 1], out[t, 2] = mb, h, b

    tiles = m_blocks * heads * batch
    d_out = cuda.to_device(np.full((tiles, 3), -7, dtype=np.int32))  # poisoned
    kernel[-(-tiles // 128), 128](d_out, m_blocks, heads, batch, section, tail)
    return d_out.copy_to_host()


@pytest.mark.gpu
@pytest.mark.parametrize("longest_first", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_tile_once(longest_first, shape):
    m_blocks, heads, batch, section, tail = shape
    got = _coords(longest_first, *shape)
    assert got.min() >= 0
    assert got[:, 0].max() < m_blocks and got[:, 1].max() < heads and got[:, 2].max() < batch
    assert len({tuple(r) for r in got}) == len(got)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", SHAPES)
def test_causal_sections_longest_first(shape):
    """Each section (the tail's too: tile_scheduler.causal_tail) takes its pairs' tiles longest first."""
    m_blocks, heads, batch, section, tail = shape
    got = _coords(True, *shape)
    pair = got[:, 2] * heads + got[:, 1]
    for start, width in _sections(heads * batch, section, tail):
        rows = got[start * m_blocks:(start + width) * m_blocks]
        # one section's tiles: only its pairs, m_blocks falling row by row, each row every pair
        assert set(pair[start * m_blocks:(start + width) * m_blocks]) == set(range(start, start + width))
        want_mb = np.repeat(np.arange(m_blocks - 1, -1, -1), width)
        np.testing.assert_array_equal(rows[:, 0], want_mb)


def test_causal_tail_sizes():
    from numba_fa3.tile_scheduler import causal_tail
    assert causal_tail(8, 128, 132, 0) == 0               # off
    assert causal_tail(8, 128, 132, 2) == 33              # two tiles per CTA: 264 tiles of 8 per pair
    assert causal_tail(4, 16, 132, 2) == 16               # no more than there are pairs
    assert causal_tail(1, 500, 132, 1) == 132


def test_l2_section_sizes():
    from numba_fa3.tile_scheduler import L2_SECTION_BYTES, l2_section
    assert L2_SECTION_BYTES == 16 << 20
    # 2k keys at hdim 128: 1 MB of K and V per head, 16 heads per 16 MB section
    assert l2_section(2048, 128, 1) == 16
    assert l2_section(16384, 128, 1) == 2
    assert l2_section(16384, 128, 4) == 8            # GQA: the query heads of each K/V head come along
    assert l2_section(1 << 20, 256, 1) == 1          # one head larger than the budget: sections of one
    assert l2_section(2048, 128, 1, 32 << 20) == 32  # the budget is an argument (tuning runs)
    for sk in (1, 17, 999, 4096, 100000):
        s = l2_section(sk, 96, 1)
        assert s & (s - 1) == 0 and (s == 1 or s * sk * 2 * 96 * 2 <= L2_SECTION_BYTES)
    # hdim 256 causal 16k: one head's 128 query blocks are fewer tiles than 132 CTAs, so two heads
    assert l2_section(16384, 256, 1, blocks=128, ctas=132) == 2
    assert l2_section(16384, 256, 2, blocks=128, ctas=132) == 2  # GQA: one K/V head, two query heads
    assert l2_section(16384, 128, 1, blocks=128, ctas=132) == 2  # already a grid of tiles
    for m_blocks in (16, 33, 128, 1000):
        for ctas in (1, 66, 132, 264):
            s = l2_section(16384, 256, 1, blocks=m_blocks, ctas=ctas)
            assert s * m_blocks >= ctas and (s == 1 or (s // 2) * m_blocks < ctas)


@pytest.mark.gpu
def test_unmasked_range_is_where_no_mask_is_needed():
    """mask.unmasked_range bounds exactly the key blocks for which mask.needs_mask is False, over
    random shapes, tiles, Sq != Sk and windows (the kernel runs those blocks without the mask)."""
    from numba import cuda
    from numba_fa3 import mask

    @cuda.jit
    def kernel(params, flags, ranges):
        i = cuda.grid(1)
        if i < params.shape[0]:
            mb, bm, bn, sq = params[i, 0], params[i, 1], params[i, 2], params[i, 3]
            sk, left, right = params[i, 4], params[i, 5], params[i, 6]
            u_min, u_max = mask.unmasked_range(mb, bm, bn, sq, sk, left, right)
            ranges[i, 0], ranges[i, 1] = u_min, u_max
            for nb in range(flags.shape[1]):
                flags[i, nb] = 1 if mask.needs_mask(nb, mb, bm, bn, sq, sk, left, right) else 0

    rng = np.random.default_rng(3)
    n, max_blocks = 4000, 64
    bm = rng.choice([64, 128, 192], n)
    bn = rng.choice([64, 80, 112, 128, 176], n)
    sq = rng.integers(1, 2500, n)
    sk = np.minimum(rng.integers(1, 2500, n), bn * max_blocks)
    mb = (rng.random(n) * -(-sq // bm)).astype(np.int64)
    left = np.where(rng.random(n) < 0.5, -1, rng.integers(0, 700, n))
    right = np.where(rng.random(n) < 0.3, -1, rng.integers(0, 300, n))
    right[rng.random(n) < 0.3] = 0  # causal-like
    params = np.stack([mb, bm, bn, sq, sk, left, right], axis=1).astype(np.int32)
    d_flags = cuda.to_device(np.full((n, max_blocks), 7, dtype=np.int8))
    d_ranges = cuda.to_device(np.full((n, 2), -7, dtype=np.int32))
    kernel[-(-n // 128), 128](cuda.to_device(params), d_flags, d_ranges)
    flags, ranges = d_flags.copy_to_host(), d_ranges.copy_to_host()
    for i in range(n):
        blocks = -(-int(sk[i]) // int(bn[i]))
        nb = np.arange(blocks)
        plain = (ranges[i, 0] <= nb) & (nb < ranges[i, 1])
        np.testing.assert_array_equal(flags[i, :blocks] == 0, plain, err_msg=str(params[i]))


@pytest.mark.gpu
def test_query_block_range_is_the_reverse_of_block_range():
    """mask.query_block_range (the backward's direction: which query blocks see key block nb)
    holds exactly the query blocks whose mask.block_range contains nb, over random shapes, Sq !=
    Sk and windows."""
    from numba import cuda
    from numba_fa3 import mask

    @cuda.jit
    def kernel(params, ranges, seen):
        i = cuda.grid(1)
        if i < params.shape[0]:
            nb, bm, bn, sq = params[i, 0], params[i, 1], params[i, 2], params[i, 3]
            sk, left, right = params[i, 4], params[i, 5], params[i, 6]
            m_min, m_max = mask.query_block_range(nb, bm, bn, sq, sk, left, right)
            ranges[i, 0], ranges[i, 1] = m_min, m_max
            for mb in range(seen.shape[1]):
                n_min, n_max = mask.block_range(mb, bm, bn, sq, sk, left, right)
                seen[i, mb] = 1 if n_min <= nb < n_max and mb * bm < sq else 0

    rng = np.random.default_rng(5)
    n, max_blocks = 4000, 48
    bm = rng.choice([64, 128, 192], n)
    bn = rng.choice([64, 80, 112, 128], n)
    sq = np.minimum(rng.integers(1, 2500, n), bm * max_blocks)
    sk = rng.integers(1, 2500, n)
    nb = (rng.random(n) * -(-sk // bn)).astype(np.int64)
    left = np.where(rng.random(n) < 0.5, -1, rng.integers(0, 700, n))
    right = np.where(rng.random(n) < 0.3, -1, rng.integers(0, 300, n))
    right[rng.random(n) < 0.3] = 0  # causal-like
    params = np.stack([nb, bm, bn, sq, sk, left, right], axis=1).astype(np.int32)
    d_ranges = cuda.to_device(np.full((n, 2), -7, dtype=np.int32))
    d_seen = cuda.to_device(np.full((n, max_blocks), 7, dtype=np.int8))
    kernel[-(-n // 128), 128](cuda.to_device(params), d_ranges, d_seen)
    ranges, seen = d_ranges.copy_to_host(), d_seen.copy_to_host()
    for i in range(n):
        blocks = -(-int(sq[i]) // int(bm[i]))
        mb = np.arange(blocks)
        inside = (ranges[i, 0] <= mb) & (mb < ranges[i, 1])
        np.testing.assert_array_equal(seen[i, :blocks] == 1, inside, err_msg=str(params[i]))
