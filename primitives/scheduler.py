"""Tile schedulers.  All share one interface: `initial_work(...)` and `next_work(...)` return a
linear tile id, `-1`-free: a CTA stops when the id reaches the tile count.

Static persistent: the grid is one CTA per SM and each walks tiles blockIdx.x, +gridDim.x, ...;
the producer runs ahead into the next tile while consumers finish the current epilogue.  Tiles
are rastered in groups of `group` rows so that CTAs running at the same time share operand panels
in L2.  Right for tiles of equal cost (GEMM).

Dynamic persistent (`claim_next`): after its first tile (blockIdx.x) a CTA claims the next one
from a global counter, so CTAs that drew short tiles (causal attention) take more of them; list
scheduling in the tile order, which the kernel makes longest-first.  The counter must be 0 at
launch; the CTA that makes the run's last claim puts it back to 0, so one counter serves every
launch on a stream (`TileCounters`).
"""
import threading

import numpy as np
from numba import cuda

from numba_fa3.ptx_inline import atomic


@cuda.jit(device=True, forceinline=True)
def initial_work():
    return np.int32(cuda.blockIdx.x)


@cuda.jit(device=True, forceinline=True)
def next_work(tile):
    return np.int32(tile + cuda.gridDim.x)


@cuda.jit(device=True, forceinline=True)
def grouped_coords(tile, tiles_m, tiles_n, group):
    """(tile_m, tile_n) of a linear tile id, walking `group` M-tiles down before moving right."""
    per_group = group * tiles_n
    first_m = (tile // per_group) * group
    rows = min(tiles_m - first_m, group)
    local = tile % per_group
    return first_m + local % rows, local // rows


def persistent_grid(num_tiles, num_sms):
    return max(1, min(num_tiles, num_sms))


@cuda.jit(device=True, forceinline=True)
def claim_next(counter, tiles, lane):
    """The whole warp calls; lane 0 claims.  Claims return 0, 1, 2, ...: tile gridDim.x + claim.
    Each CTA claims until it draws a tile >= tiles, so a run makes exactly `tiles` claims (with
    tiles >= gridDim.x) and the claim numbered tiles - 1 is the last: it resets the counter."""
    claim = np.int32(0)
    if lane == 0:
        claim = np.int32(atomic.atom_add_u32(counter, 1))
        if claim == tiles - 1:
            atomic.atom_exch_u32(counter, 0)
    claim = cuda.shfl_sync(0xFFFFFFFF, claim, 0)
    return np.int32(claim + cuda.gridDim.x)


class TileCounters:
    """One int32 counter per CUDA stream (launches on one stream never overlap, and each leaves its
    counter at 0), as slots of one zeroed device array made on first use: a new stream costs no
    allocation or copy, so a launch can be captured into a CUDA graph on any stream."""

    SLOTS = 4096

    def __init__(self):
        self._slots = {}
        self._buf = None
        self._lock = threading.Lock()

    def get(self, stream_handle):
        key = int(stream_handle or 0)
        with self._lock:
            if self._buf is None:
                self._buf = cuda.to_device(np.zeros(self.SLOTS, dtype=np.int32))
            slot = self._slots.get(key)
            if slot is None:
                if len(self._slots) == self.SLOTS:
                    raise RuntimeError(f"more than {self.SLOTS} CUDA streams have launched numba_fa3 kernels")
                slot = self._slots[key] = len(self._slots)
        return self._buf.__cuda_array_interface__["data"][0] + 4 * slot


tile_counters = TileCounters()
