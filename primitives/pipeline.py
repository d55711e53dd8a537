"""A multi-stage producer/consumer pipeline over mbarriers (the CUTLASS sm90 pipeline, thinned).

Stage s has two barriers in shared memory: `full[s]` (the producer's TMA landed: one arrival with
an expected byte count) and `empty[s]` (every consumer warp finished reading it).  State is
(index, phase): index counts stages modulo the ring, and phase flips each time it wraps, which is
the parity `mbarrier.try_wait.parity` waits for.  A producer starts with phase 0 and waits on
`empty` with the opposite parity, so its first pass over the ring does not block.
"""
import numpy as np
from numba import cuda

from ptx_inline import mbarrier
from .smem import MBARRIER_BYTES


def barrier_bytes(stages):
    """Shared bytes of the full and empty barrier arrays of a ring of `stages`."""
    return 2 * stages * MBARRIER_BYTES


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
def advance(index, phase, stages):
    """Next (index, phase): the phase flips when the index wraps.  Kept int32 (Numba would widen
    them to int64, two registers each, in every consumer thread)."""
    # (compared before the increment: `index + 1` is int64 in Numba, and the compare of it was
    # left 64-bit in the consumers' loop, a sign extension and two compares per step)
    if index == stages - 1:
        return np.int32(0), np.int32(phase ^ 1)
    return np.int32(index + 1), np.int32(phase)


@cuda.jit(device=True, forceinline=True)
def producer_wait(bars, stages, index, phase):
    """Wait until stage `index` is free (any number of threads may wait)."""
    mbarrier.wait_parity(empty_barrier(bars, stages, index), phase ^ 1)


@cuda.jit(device=True, forceinline=True)
def producer_wait_suspend(bars, stages, index, phase, suspend_ns):
    """`producer_wait` with a try_wait suspend-time hint (`mbarrier.wait_parity_suspend`)."""
    mbarrier.wait_parity_suspend(empty_barrier(bars, stages, index), phase ^ 1, suspend_ns)


@cuda.jit(device=True, forceinline=True)
def producer_expect(bars, index, tx_bytes):
    """Announce the bytes the TMA loads into stage `index` will bring (one thread)."""
    mbarrier.arrive_expect_tx(full_barrier(bars, index), tx_bytes)


@cuda.jit(device=True, forceinline=True)
def producer_acquire(bars, stages, index, phase, tx_bytes):
    """`producer_wait` then `producer_expect`, for a producer that is a single thread."""
    producer_wait(bars, stages, index, phase)
    producer_expect(bars, index, tx_bytes)


@cuda.jit(device=True, forceinline=True)
def consumer_wait(bars, index, phase):
    mbarrier.wait_parity(full_barrier(bars, index), phase)


@cuda.jit(device=True, forceinline=True)
def consumer_wait_suspend(bars, index, phase, suspend_ns):
    """`consumer_wait` with a try_wait suspend-time hint (`mbarrier.wait_parity_suspend`)."""
    mbarrier.wait_parity_suspend(full_barrier(bars, index), phase, suspend_ns)


@cuda.jit(device=True, forceinline=True)
def consumer_try_wait(bars, index, phase):
    return mbarrier.try_wait_parity(full_barrier(bars, index), phase)


@cuda.jit(device=True, forceinline=True)
def consumer_release(bars, stages, index, lane):
    """One arrival per consumer warp (lane 0), after its wgmmas reading the stage completed."""
    if lane == 0:
        mbarrier.arrive(empty_barrier(bars, stages, index))
