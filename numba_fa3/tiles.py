"""Tile sizes and register budgets of the forward kernel, per head dimension.

Each consumer warpgroup owns 64 query rows (the wgmma M), so block_m = 64 * consumers.  Registers
per consumer thread: O is D/2, S is block_n/2, P (bf16) block_n/4.  Shared memory: Q (block_m x D)
plus `stages` of K and V (block_n x D each), all bf16, must fit 227 KB.
  D=64:  128 x 128, 2 stages: 16 + 2*16 + 2*16 = 80 KB; O 32 + S 64 + P 32 regs.
  D=128: 128 x 128, 2 stages: 32 + 2*32 + 2*32 = 160 KB; O 64 + S 64 + P 32 regs.  (FA3 uses
         block_n 176 for non-causal; 128 keeps the mask arithmetic and the first version simple.)
  D=256 (not yet): 128 x 64, 2 stages = 192 KB, O 128 + S 32 + P 16 regs; it spills at 232
         registers per consumer today (ptxas: 240-290 B), so it is left out until it does not.
Registers: producer 40 / consumers 232.  setmaxnreg moves registers only within what the CTA got
at launch: 384 threads x 168 (the launch-bounds cap) = 64512, so producer + 2 x consumer <= 504.
(48/232 deadlocked on the H100: setmaxnreg.inc waited for registers that never came.)  At 40 the
producer spills 4 bytes (it keeps ~20 64-bit sizes and addresses live; Numba's ints are int64),
at 24 it spills 92.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Tiles:
    block_m: int
    block_n: int
    stages: int
    consumers: int
    producer_registers: int
    consumer_registers: int


TILES = {
    64: Tiles(128, 128, 2, 2, 40, 232),
    128: Tiles(128, 128, 2, 2, 40, 232),
}

SUPPORTED_HEAD_DIMS = tuple(sorted(TILES))


def tiles_for(head_dim):
    if head_dim not in TILES:
        raise ValueError(f"head dim {head_dim} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    return TILES[head_dim]
