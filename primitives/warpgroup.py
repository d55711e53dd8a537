"""Warpgroup roles and register budgets (warp specialization, FA3 section 3.1).

A CTA is 1 producer warpgroup + N consumer warpgroups of 128 threads.  The producer needs few
registers (addresses and a loop), the consumers hold accumulators, so after launch the producer
gives registers back with `setmaxnreg.dec` and the consumers take them with `setmaxnreg.inc`.
"""
import enum

from numba import cuda

from ptx_inline import special

WARPGROUP_THREADS = 128
WARP_THREADS = 32
#: The register file each SM has, per thread slot of a 1-CTA-per-SM kernel.
REGISTER_FILE = 64 * 1024


class Role(enum.IntEnum):
    PRODUCER = 0
    CONSUMER0 = 1
    CONSUMER1 = 2


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
