"""A multi-stage producer/consumer pipeline over mbarriers (the CUTLASS sm90 pipeline, thinned).

Stage s has two barriers in shared memory: `full[s]` (the producer's TMA landed: one arrival with
an expected byte count) and `empty[s]` (every consumer warp finished reading it).  A position in
the ring is a `PipelineState` record (stage, phase): stage counts modulo the ring, and
phase flips each time it wraps, which is the parity `mbarrier.try_wait.parity` waits for.  A
producer starts with phase 0 and waits on `empty` with the opposite parity, so its first pass
over the ring does not block.
"""
from collections import namedtuple

import numpy as np
from numba import cuda

from numba_fa3.ptx_inline import mbarrier
from .smem import MBARRIER_BYTES

#: A position in a ring of stages: (stage, phase), both int32 (Numba would widen them to int64,
#: two registers each, in every consumer thread).
PipelineState = namedtuple("PipelineState", "stage phase")


def barrier_bytes(stages):
    """Shared bytes of the full and empty barrier arrays of a ring of `stages`."""
    return 2 * stages * MBARRIER_BYTES


@cuda.jit(device=True, forceinline=True)
def start():
    """The first position of a ring: stage 0, phase 0."""
    return PipelineState(np.int32(0), np.int32(0))


@cuda.jit(device=True, forceinline=True)
def full_barrier(bars, index):
    return bars + index * MBARRIER_BYTES


@cuda.jit(device=True, forceinline=True)
def empty_barrier(bars, stages, index):
    return bars + (stages + index) * MBARRIER_BYTES


@cuda.jit(device=True, forceinline=True)
def init(bars, stages, consumer_arrivals):
    """One thread: full barriers expect the producer's single arrive, empty ones every consumer."""
    for s in range(stages):
        mbarrier.init(full_barrier(bars, s), 1)
        mbarrier.init(empty_barrier(bars, stages, s), consumer_arrivals)
    mbarrier.fence_init()


@cuda.jit(device=True, forceinline=True)
def advance(state, stages):
    """The next position: the phase flips when the index wraps."""
    # (compared before the increment: `index + 1` is int64 in Numba, and the compare of it was
    # left 64-bit in the consumers' loop, a sign extension and two compares per step)
    if state.stage == stages - 1:
        return PipelineState(np.int32(0), np.int32(state.phase ^ 1))
    return PipelineState(np.int32(state.stage + 1), np.int32(state.phase))


@cuda.jit(device=True, forceinline=True)
def producer_wait(bars, stages, state):
    """Wait until the stage at `state` is free (any number of threads may wait)."""
    mbarrier.wait_parity(empty_barrier(bars, stages, state.stage), state.phase ^ 1)


@cuda.jit(device=True, forceinline=True)
def producer_expect(bars, state, tx_bytes):
    """Announce the bytes the TMA loads into the stage at `state` will bring (one thread)."""
    mbarrier.arrive_expect_tx(full_barrier(bars, state.stage), tx_bytes)


@cuda.jit(device=True, forceinline=True)
def consumer_wait(bars, state):
    """Wait until the stage at `state` has landed."""
    mbarrier.wait_parity(full_barrier(bars, state.stage), state.phase)


@cuda.jit(device=True, forceinline=True)
def consumer_release(bars, stages, state, lane):
    """One arrival per consumer warp (lane 0), after its wgmmas reading the stage completed."""
    if lane == 0:
        mbarrier.arrive(empty_barrier(bars, stages, state.stage))


@cuda.jit(device=True, forceinline=True)
def consumer_release_uniform(bars, stages, state, lane):
    """`consumer_release` as a predicated arrive rather than a branch on the lane: the warp's
    control flow stays uniform, so ptxas can keep the ring's state in uniform registers."""
    mbarrier.arrive_if(empty_barrier(bars, stages, state.stage), lane == 0)
