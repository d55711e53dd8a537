"""Warpgroup roles, register budgets, named barriers and the ping-pong turn (warp specialization,
FA3 section 3.1), shared by every warp-specialized kernel of the library.

A CTA is 1 producer warpgroup + N consumer warpgroups of 128 threads.  The producer needs few
registers (addresses and a loop), the consumers hold accumulators, so after launch the producer
gives registers back with `setmaxnreg.dec` and the consumers take them with `setmaxnreg.inc`
(`specialize`).
"""
import enum

import numpy as np

from numba import cuda

from numba_fa3.ptx_inline import barrier, regs, special

WARPGROUP_THREADS = 128
WARP_THREADS = 32
#: The register file each SM has, per thread slot of a 1-CTA-per-SM kernel.
REGISTER_FILE = 64 * 1024
#: Consumer warpgroups a kernel may have: the named barriers below provide for this many.
MAX_CONSUMERS = 3


class NamedBarrier(enum.IntEnum):
    """Named barrier ids (id 0 is __syncthreads), each a base to which the consumer warpgroup's
    index is added.  EPILOGUE: a warpgroup's own threads around its epilogue staging buffer.
    SCHEDULER: the ping-pong turn; the warpgroup before (round robin) arrives at it when it has
    issued its GEMMs (FA3 section 3.1, "pingpong scheduling").  CONSUMERS (one id, no index):
    every consumer thread of the CTA, around a tile that all of them write and each reads (the
    backward's dS)."""
    EPILOGUE = 1
    SCHEDULER = 1 + MAX_CONSUMERS
    CONSUMERS = 1 + 2 * MAX_CONSUMERS


#: (producer, consumer) registers per thread, by number of consumer warpgroups.  The budget must
#: fit the register file: 128 * (producer + n * consumer) <= 65536; FA4 (flash_fwd_sm90) uses the
#: same split for 2 consumers.  The producer keeps 24-40: enough for TMA coordinates.
REGISTER_BUDGET = {1: (56, 256), 2: (40, 232), 3: (32, 160)}
# (1 consumer: 256 threads get 256 each at entry, so 56 + 256 fits; 3 consumers: 512 x 128.)


def entry_registers(threads):
    """Per-thread registers a 1-CTA-per-SM kernel gets at launch (the launch-bounds cap)."""
    return min(255, REGISTER_FILE // threads) // 8 * 8


def check_budget(producer, consumer, consumers):
    """setmaxnreg only moves registers within the CTA's launch allocation: a budget above it makes
    setmaxnreg.inc wait forever (seen on the H100 with 48 + 2 x 232 > 3 x 168)."""
    threads = block_threads(consumers)
    have = entry_registers(threads) * threads
    need = WARPGROUP_THREADS * (producer + consumers * consumer)
    if need > have:
        raise ValueError(f"register budget {producer} + {consumers} x {consumer} needs {need} registers, "
                         f"the CTA has {have}")
    if not 1 <= consumers <= MAX_CONSUMERS:
        raise ValueError(f"{consumers} consumer warpgroups: 1 to {MAX_CONSUMERS} have named barriers")
    return producer, consumer


def register_budget(consumers):
    producer, consumer = REGISTER_BUDGET[consumers]
    return check_budget(producer, consumer, consumers)


def block_threads(consumers):
    return WARPGROUP_THREADS * (1 + consumers)


@cuda.jit(device=True, forceinline=True)
def warpgroup_index():
    """This thread's warpgroup, made warp-uniform so role branches compile without divergence."""
    return special.warp_uniform(cuda.threadIdx.x // WARPGROUP_THREADS)


def specialize(load, mma, registers, narrow_index=False):
    """The role dispatch of a warp-specialized kernel: warp 0 of warpgroup 0 runs
    `load(params, smem, lane)` with the producer's registers, warpgroups 1.. run
    `mma(params, smem, consumer_index, thread_in_warpgroup)` with the consumers'.  The producer's
    other three warps only give their registers back.  `narrow_index`: the thread's index as
    int32; else as Python's modulo gives it, int64 with a sign fix-up, whose high word stays live
    across the role split (the backward's 24-register producer spilled it; the forwards were
    measured with the wide index, and narrowing it moves where ptxas puts their P V wait)."""
    producer_registers, consumer_registers = registers

    @cuda.jit(device=True, forceinline=True)
    def run(params, smem):
        wg = warpgroup_index()
        if narrow_index:
            tid = np.int32(np.uint32(cuda.threadIdx.x) % np.uint32(WARPGROUP_THREADS))
        else:
            tid = cuda.threadIdx.x % WARPGROUP_THREADS
        if wg == 0:
            regs.setmaxnreg_dec(producer_registers)
            if tid < WARP_THREADS:
                load(params, smem, tid)
        else:
            regs.setmaxnreg_inc(consumer_registers)
            mma(params, smem, wg - 1, tid)
    return run


_EPILOGUE = int(NamedBarrier.EPILOGUE)


@cuda.jit(device=True, forceinline=True)
def epilogue_sync(wg):
    """The consumer warpgroup `wg`'s 128 threads meet (its epilogue staging buffer)."""
    barrier.sync(_EPILOGUE + wg, WARPGROUP_THREADS)


def consumers_sync(consumers):
    """sync(): every consumer thread of a CTA with `consumers` warpgroups meets (NamedBarrier
    CONSUMERS); the producer warpgroup is not held."""
    threads = consumers * WARPGROUP_THREADS
    bar_id = int(NamedBarrier.CONSUMERS)

    @cuda.jit(device=True, forceinline=True)
    def sync():
        barrier.sync(bar_id, threads)
    return sync


def pingpong(enabled, consumers):
    """(turn_wait(wg), turn_pass(wg)) of the ping-pong schedule: a consumer warpgroup waits for
    its turn before issuing its GEMMs and hands the tensor cores to the next (round robin) once
    they are issued, so one's softmax runs under the other's GEMMs.  Without ping-pong both
    compile to nothing.  `turn_start(wg)` lets warpgroup 0 go first."""
    pair = 2 * WARPGROUP_THREADS
    base = int(NamedBarrier.SCHEDULER)

    @cuda.jit(device=True, forceinline=True)
    def turn_wait(wg):
        if enabled:
            barrier.sync(base + wg, pair)

    @cuda.jit(device=True, forceinline=True)
    def turn_pass(wg):
        if enabled:
            barrier.arrive(base + (wg + 1) % consumers, pair)

    @cuda.jit(device=True, forceinline=True)
    def turn_start(wg):
        if enabled and wg == consumers - 1:
            turn_pass(wg)
    return turn_wait, turn_pass, turn_start
