"""TMA loads of tiles stored as 128-byte swizzled column chunks (PTX ISA 9.7.9.25,
cp.async.bulk.tensor), the producer side of every kernel's shared-memory rings.

A tile whose rows are longer than one 128-byte swizzle row goes in as `chunks` boxes of
`chunk_cols` columns each, `chunk_bytes` apart in shared memory (the layout `primitives.mma`'s
operands describe).  Coordinates are the tensor map's, innermost first; the loaders take the
column of the first chunk implicitly (0) and the outer coordinates as a tuple.
"""
import functools

from numba import cuda

from numba_fa3.ptx_inline import special, tma
from . import pipeline
from .unroll import static_range, unrolled


@functools.lru_cache(maxsize=None)
def chunk_loader(chunks, chunk_bytes, chunk_cols):
    """load(dst, tmap, outer, bar): the tile's chunks into shared address dst, completing on
    mbarrier `bar` (the caller announced the bytes)."""

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def load(dst, tmap, outer, bar):
        for c in static_range(chunks):
            tma.load(dst + c * chunk_bytes, tmap, (c * chunk_cols,) + outer, bar)
    return load


@functools.lru_cache(maxsize=None)
def chunk_prefetcher(chunks, chunk_cols):
    """prefetch(tmap, outer): the tile's chunks into L2 (cp.async.bulk.prefetch.tensor)."""

    @cuda.jit(device=True, forceinline=True)
    @unrolled
    def prefetch(tmap, outer):
        for c in static_range(chunks):
            tma.prefetch_l2(tmap, (c * chunk_cols,) + outer)
    return prefetch


@functools.lru_cache(maxsize=None)
def stage_loader(stages, chunks, chunk_bytes, chunk_cols):
    """load(tmap, bars, ring, state, outer): wait until the ring's stage at `state` is free,
    then one elected lane announces the stage's bytes and loads the tile into it.  The whole
    producer warp calls (so its loop stays warp-uniform)."""
    stage_bytes = chunks * chunk_bytes
    load_chunks = chunk_loader(chunks, chunk_bytes, chunk_cols)

    @cuda.jit(device=True, forceinline=True)
    def load(tmap, bars, ring, state, outer):
        pipeline.producer_wait(bars, stages, state)
        if special.elect_one():
            pipeline.producer_expect(bars, state, stage_bytes)
            load_chunks(ring + state.stage * stage_bytes, tmap, outer, pipeline.full_barrier(bars, state.stage))
    return load
