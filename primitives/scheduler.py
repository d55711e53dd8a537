"""Tile schedulers.  All share one interface: `initial_work(...)` and `next_work(...)` return a
linear tile id, `-1`-free: a CTA stops when the id reaches the tile count.

Persistent: the grid is one CTA per SM and each walks tiles blockIdx.x, +gridDim.x, ...; the
producer runs ahead into the next tile while consumers finish the current epilogue.  Tiles are
rastered in groups of `group` rows so that CTAs running at the same time share operand panels in L2.
"""
from numba import cuda


@cuda.jit(device=True, forceinline=True)
def initial_work():
    return cuda.blockIdx.x


@cuda.jit(device=True, forceinline=True)
def next_work(tile):
    return tile + cuda.gridDim.x


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
