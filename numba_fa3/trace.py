"""The forward kernel's trace build: %clock64 timestamps per CTA, role and work tile, and per
step of the first key blocks of each tile, for `python -m bench trace`.  The kernel takes the
trace buffer as a parameter of its own (`ForwardParams.trace`); in any other build the marks
compile to nothing.

Buffer layout (int64), one slab per CTA: its tile events [TRACE_ROLES, TRACE_TILES,
TRACE_EVENTS], then its loop events [MAX_CONSUMERS, TRACE_TILES, TRACE_LOOP_STEPS,
TRACE_LOOP_EVENTS] (`split`).
"""
import enum

from numba import cuda

from numba_fa3.primitives.warpgroup import MAX_CONSUMERS
from numba_fa3.ptx_inline import memory, special


class TraceEvent(enum.IntEnum):
    """A consumer warpgroup's timestamps per CTA and work tile: waiting for Q, tile start, first
    S done, main loop done, last P V done, epilogue done; and the tile's key-block count."""
    WAIT_Q = 0
    TILE = 1
    FIRST_S = 2
    LOOP_END = 3
    LAST_PV = 4
    DONE = 5
    BLOCKS = 6


class ProducerEvent(enum.IntEnum):
    """The producer's: waiting for Q's buffer, Q's buffer free, Q and the tile's first K issued,
    next tile claimed, last V issued."""
    WAIT_Q = 0
    Q_FREE = 1
    FIRST_K = 2
    CLAIMED = 3
    LAST_V = 4


class LoopEvent(enum.IntEnum):
    """A consumer warpgroup's timestamps in each of the first TRACE_LOOP_STEPS steps of the
    overlapped main loop: K landed, its turn on the tensor cores came, S landed, the softmax is
    done, P V landed."""
    K_READY = 0
    TURN = 1
    S_READY = 2
    SOFTMAX = 3
    PV_DONE = 4


TRACE_TILES, TRACE_EVENTS, TRACE_ROLES = 64, 8, 1 + MAX_CONSUMERS
TRACE_LOOP_STEPS, TRACE_LOOP_EVENTS = 64, 5
#: int64 entries of a CTA's tile events and loop events, and of its slab.
TILE_SLOTS = TRACE_ROLES * TRACE_TILES * TRACE_EVENTS
LOOP_SLOTS = MAX_CONSUMERS * TRACE_TILES * TRACE_LOOP_STEPS * TRACE_LOOP_EVENTS
CTA_SLOTS = TILE_SLOTS + LOOP_SLOTS


def buffer_slots(ctas):
    """int64 entries of a trace buffer for up to `ctas` CTAs."""
    return ctas * CTA_SLOTS


def split(buf, ctas):
    """(tile events, loop events) of a trace buffer read back as a NumPy array, each flat."""
    slabs = buf.reshape(ctas, CTA_SLOTS)
    return slabs[:, :TILE_SLOTS].ravel(), slabs[:, TILE_SLOTS:].ravel()


def tracer(enabled):
    """(mark(buf, role, n, event, value), mark_step(buf, wg, n, step, event)) of a build: with
    `enabled` False both compile to nothing.  Tiles past TRACE_TILES share the last slot; steps
    past TRACE_LOOP_STEPS are not recorded."""

    @cuda.jit(device=True, forceinline=True)
    def mark(buf, role, n, event, value):
        if enabled:
            row = role * TRACE_TILES + min(n, TRACE_TILES - 1)
            memory.st_global_b64(buf + (cuda.blockIdx.x * CTA_SLOTS + row * TRACE_EVENTS + event) * 8, value)

    @cuda.jit(device=True, forceinline=True)
    def mark_step(buf, wg, n, step, event):
        if enabled:
            if n < TRACE_TILES and step < TRACE_LOOP_STEPS:
                loops = buf + (cuda.blockIdx.x * CTA_SLOTS + TILE_SLOTS) * 8
                row = (wg * TRACE_TILES + n) * TRACE_LOOP_STEPS + step
                memory.st_global_b64(loops + (row * TRACE_LOOP_EVENTS + event) * 8, special.clock64())
    return mark, mark_step
