"""Register fragments of wgmma accumulators (PTX ISA 9.7.15.5.1, "Register Fragments", m64nNk*).

A warpgroup's m64 x nN f32 accumulator is a tuple of N/2 registers per thread.  Register i of
thread t (0..127) holds element (row, col) with
    row = 16 * (t // 32) + (t % 32) // 4 + 8 * ((i // 2) % 2)
    col = 8 * (i // 4) + 2 * (t % 4) + i % 2
so each thread owns two rows (r and r + 8) and, per 8-column group j, registers 4j..4j+3:
(r, c), (r, c+1), (r+8, c), (r+8, c+1).  Loops over j with a compile-time trip count unroll
fully, which keeps the tuple in registers (CI fails on any stack frame).
"""
import numpy as np
from numba import cuda

#: Registers per 8-column group, and threads per row of a group.
REGS_PER_GROUP = 4
THREADS_PER_ROW = 4


def zeros(count):
    """A tuple constant of `count` float32 zeros: the initial accumulator."""
    return (np.float32(0),) * count


@cuda.jit(device=True, forceinline=True)
def row_of(tid, i):
    return 16 * (tid // 32) + (tid % 32) // 4 + 8 * ((i // 2) % 2)


@cuda.jit(device=True, forceinline=True)
def col_of(tid, i):
    return 8 * (i // 4) + 2 * (tid % 4) + i % 2
