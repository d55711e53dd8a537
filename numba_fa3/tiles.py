"""Tile sizes and register budgets of the forward kernel, per head dimension (and mask).

Each consumer warpgroup owns 64 query rows (the wgmma M), so block_m = 64 * consumers: 128 with
two, 192 with three (hdim 64, as FA3).
Per consumer thread the accumulators take O: D/2 registers, S: block_n/2, P (16-bit): block_n/4,
and with the intra-warpgroup overlap all three are live at once (S of block j+1 in flight while P
of block j feeds P V).  Shared memory holds Q (block_m x D) and `stages` K and V tiles (block_n x D),
16-bit, in 64-column chunks of the 128-byte swizzle (D = 96 and 192 round up to whole chunks; TMA
fills the extra columns with zeros and the GEMMs never read them), within 227 KB.  Where Q is held
in registers (Tiles.q_in_registers: hdim 128, hdim 64 with two consumers) it adds D/4 registers
(32 at hdim 128: 192 of the consumers' 240 live through the loop):

  D    block_n  stages  smem (Q + K + V)            O + S + P regs   why this block_n
  64   128      2       48 + 32 + 32 = 112 KB       32 + 64 + 32     full: block_m 192, three
                                                                      consumers at 160 registers; the
                                                                      64-wide P V GEMM is short, so a
                                                                      third softmax hides under two
                                                                      others' GEMMs (2k: 477 vs 439).
                                                                      Causal/local: 128 x 128, two
                                                                      consumers (short causal tiles:
                                                                      512 tokens 234 vs 204 TFLOPS)
                                                                      below LONG_QUERIES, three from it
  96   128      2       32 + 64 + 64 = 160 KB       48 + 64 + 32     (chunks padded to 128 columns)
  128  128      2       32 + 64 + 64 = 160 KB       64 + 64 + 32     (FA3's 176 for non-causal was slower
                                                                      here: 582 vs 612 TFLOPS at 16k, and
                                                                      leaves no room for O; bench/NOTES.md)
  192  112      2       48 + 84 + 84 = 216 KB       96 + 56 + 28     (chunks of 64 columns: 3)
  256  80       2       64 + 80 + 80 = 224 KB       128 + 40 + 20    the most K/V that fits twice

O goes out through its own shared buffer (+ block_m x D) and TMA where that still fits (D = 64,
96, 128), else by stores from registers (or, with Tiles.o_through_v, off in the table, through the
V stages and TMA as FA3 does).
Registers: producer 24 / consumers 240 (FA3's split), or 24 / 160 with three consumers.
setmaxnreg moves registers only within what the CTA got at launch: 384 threads x 168 (the
launch-bounds cap) = 64512 = 128 x (24 + 2 x 240); 512 x 128 = 65536 >= 128 x (24 + 3 x 160).
(48/232 deadlocked on the H100: setmaxnreg.inc waited for registers that never came.)  The
producer fits 24 because its loop runs on a whole warp with 32-bit index math (see intmath).
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
    #: A choice about where ptxas's schedule lands rather than about the work, made per entry by
    #: interleaved measurement (bench/NOTES.md, session 6): O is rescaled after the loop step's
    #: P V wait (FA3's order) instead of between its two GEMM issues.
    late_rescale: bool = False
    #: The late rescale in parts (rescale_rounds, below), each ordered (by a data
    #: dependency, `fragment.after`) before a part of the step's exponentials: ptxas otherwise
    #: put all of it after the last one, on the step's serial tail; so placed it shares cycles
    #: with the MUFUs, as in FA3's SASS (bench/NOTES.md, session 7).  Implies late_rescale.
    interleaved_rescale: bool = False
    #: Q's wgmma descriptors built once per tile and kept by ptxas in a uniform-register quad per
    #: K step for the whole loop (`smem.descriptors`), instead of the quad rebuilt before each
    #: S wgmma: 33 fewer instructions per step at hdim 128.  True: every K step's; an int: the
    #: first that many, the rest built per wgmma.  hdim 256 has 16 K steps, more quads than the
    #: uniform file holds: 12 there (full), none in the causal kernel, which spilled with 12 or 16.
    hoist_q_descriptors: bool | int = True
    #: The main loop's control flow kept warp-uniform for ptxas: the consumer warps' stage
    #: releases are predicated arrives (`mbarrier.arrive_if`), not `if lane == 0` branches, so
    #: ptxas keeps the ring's (index, phase) and the stage addresses in uniform registers and
    #: drops the per-step convergence barriers (BSSY/BSYNC/WARPSYNC) and REDUXes: 7-26 fewer
    #: instructions per step (11 more at hdim 192 causal).  The releases are then ordered after
    #: the exponentials before the P V wait (`fragment.zero_after`), because ptxas otherwise
    #: hoists that wait above all of them (bench/NOTES.md, session 9).  Needs
    #: interleaved_rescale for that order.
    uniform_pipeline: bool = False
    #: Q read from shared memory once per tile into wgmma A fragments (ldmatrix, 4 registers per
    #: K step: 32 at hdim 128, live through the loop) and S = Q K^T issued with A from registers:
    #: the S GEMMs no longer read Q's 16 KB per warpgroup from shared memory every step, and Q's
    #: buffer is released as soon as the fragments are loaded, not after the tile's last S GEMM.
    #: Only where the registers fit (bench sass: hdim 64's three consumers at 160 spill).
    q_in_registers: bool = False
    #: The interleaved rescale's parts (FlashForward.RESCALE_ROUNDS), P's first 1/rounds of
    #: registers exponentiated before the P V wait.  Which shape wins moves with the code around
    #: it: 4 at session 9 (2: -0.7% to -2.6%), 2 with Q in registers (session 10).
    rescale_rounds: int = 4
    #: The lazy rescale (softmax.lazy_max, FA4's): a row's running max moves only when a block's
    #: max exceeds it by more than this many powers of 2 (0: always), and O's multiplies run only
    #: in steps where some row of the warp moved (a warp vote and a branch), in place of the
    #: interleaved rounds.  Dropping the multiplies altogether measured +3.5% to +7% at hdim 256
    #: and +4% at hdim 128 (session 11): on long rows they almost never run.
    rescale_threshold: float = 0.0
    #: Masked kernels: the key blocks that need the mask and those that do not run as three loops
    #: in a row (the diagonal's or right edge's blocks, the plain ones, the left edge's), not as
    #: a loop nest that picks the masked copy or enters the plain loop.  The plain loop is then
    #: shaped as the unmasked kernel's, and ptxas schedules the lazy rescale's step there as it
    #: does in that kernel (hdim 128 causal, lazy with the P V wait pinned by the head's row sums
    #: and the tail: in the nest -2.6%, in a row +0.1%, session 12).
    sequential_mask_loops: bool = False
    #: The lazy rescale: the exponentials after the P V wait take their exponent bias through O's
    #: first register of each row (`fragment.after`), so ptxas places the wait between the
    #: exponentials before it and these, where the eager rounds' multiplies place it.  Left free,
    #: ptxas ran every exponential first at hdim 128 causal (-3.0% against +2.2..3.0%, session 12).
    lazy_tail_after_wait: bool = False
    #: Where O's own shared buffer does not fit (D = 192, 256), the epilogue writes O into the V
    #: stages and TMA-stores it from there (FA3's `smem_o` over `smem_v`) instead of storing
    #: from registers: both consumer warpgroups sync before O overwrites V, and the producer
    #: holds the next tile's first V load until the store has read O (FlashForward.O_THROUGH_V).
    o_through_v: bool = False


def _tiles(block_n, late_rescale=False, interleaved_rescale=False, hoist_q_descriptors=True, uniform_pipeline=False,
           q_in_registers=False, rescale_rounds=4, rescale_threshold=0.0, sequential_mask_loops=False,
           lazy_tail_after_wait=False):
    return Tiles(128, block_n, 2, 2, 24, 240, late_rescale, interleaved_rescale, hoist_q_descriptors,
                 uniform_pipeline, q_in_registers, rescale_rounds, rescale_threshold, sequential_mask_loops,
                 lazy_tail_after_wait)


#: The lazy rescale's threshold where the table takes it: P up to 2^8 = 256 (forward.py's
#: MAX_RESCALE_THRESHOLD).  With scores of unit spread a row's max then moves past its first
#: block's only for outliers, so O is rescaled in a tile's first steps only.
LAZY_RESCALE_THRESHOLD = 8.0


def _tiles3(block_n):
    return Tiles(192, block_n, 2, 3, 24, 160, interleaved_rescale=True)


#: (head_dim, causal-or-local) -> tiles.  H100, launches of both builds interleaved, on vs off:
#: - late_rescale: hdim 256 causal 2k +1.3% / +1.0%, 4k +1.8%, 8k +1.6% / +0.9% (two runs);
#:   elsewhere -0.1% to -5% (hdim 128 causal 8k -5%).
#: - interleaved_rescale: hdim 64 three consumers, full 2k/4k/8k +2.3%, 16k +2.3% / +2.7%,
#:   causal 8k +1.8%, 16k +2.8%; hdim 256 full 2k-16k +0.4% to +0.7%.  Before the hoisted Q
#:   descriptors it lost elsewhere (hdim 128 full 16k -2.7%); with them (session 8): hdim 128
#:   full 2k/4k/8k/16k +3.0% / +3.3% / +3.6% / +3.5%, causal 8k / 16k +0.4% / +0.2%; hdim 256
#:   causal 4k / 16k +0.5% / +0.8% against its late rescale; hdim 96 causal 8k +1.6%, full +0.2%
#:   / +0.3%; hdim 192 causal 8k +0.5%, full -2.3% (8k) / -1.5% (2k), so off there.
#: - hoist_q_descriptors: hdim 128 full 2k / 16k +0.6% / +0.3%, hdim 64 full 16k +0.4%, causal
#:   hdim 64 / 128 -0.4% to +0.1%; hdim 256 full, 16 vs none 4k / 16k +2.1% / +2.1% and 12 vs
#:   16 +1.2% / +1.6%; hdim 256 causal vs none: 16 -1.1%, 12 -3.2% / -5.8%, 8 -0.6% / -0.7%.
#: - uniform_pipeline (session 9): hdim 128 causal 4k / 16k +1.1% / +1.1%, hdim 256 full 16k
#:   +1.0%; hdim 128 full 4k / 16k -0.8% / -0.7%, hdim 256 causal 16k -2.1%, hdim 64 full 16k
#:   -13%, causal 2k -4.4%.  Without the release order: -2% to -9% everywhere but hdim 64 full.
#: - q_in_registers (session 10): hdim 128 full 16k / 8k / 2k +0.9% / +0.8% / -0.2% with the
#:   uniform pipeline (-6% without it: ptxas's schedule again), which it makes a gain there
#:   (alone it lost 0.7%); hdim 128 causal 16k / 4k / 1k +0.3% / +0.6% / +1.3%; hdim 64 causal
#:   (two consumers) 2k / 1k +1.4% / +0.8%.
#: - rescale_rounds 2 against 4, with Q in registers (session 10): hdim 128 causal 16k / 8k +2.1%
#:   / +2.0%, full 16k / 4k +1.7% / +1.5% (4 rounds with half of P before the wait: +1.1% to
#:   +1.5%; none before it: -3.5% to -3.9%).
#: - rescale_threshold 8 against 0 (session 11): hdim 256 causal 16k / 2k +7.4% / +4.5%, full
#:   8k / 4k +3.9% / +3.9% (eager against it, next call: -3.4% to -7%); hdim 128 full 16k / 2k
#:   +1.1% / +0.7%, again 16k / 4k +1.0% / +1.0%; hdim 128 causal 16k / 4k -3.0% / -1.2%
#:   (ptxas moved the P V wait between the two rows' softmax; ordering the stage release after
#:   both rows' exponentials made it -1.2% / -1.1% and full -2.0%, not kept); hdim 64 full /
#:   causal 16k -3.2% / -1.4%; hdim 192 8k +0.1% / -0.4%.  Where the softmax is the step's
#:   critical path (hdim <= 128) the multiplies it saves were hidden among the exponentials; at
#:   hdim 256 they were O's 128 per step.
#: - sequential_mask_loops + lazy_tail_after_wait + rescale_threshold 8 (session 12), against
#:   the eager rescale in the loop nest: hdim 128 causal 16k / 8k / 4k / 2k / 1k +2.7% / +2.8% /
#:   +2.4% / +1.5% / +0.6% (first call +3.0% / +2.7% / +2.2%); without the pinned tail -3.0%;
#:   pinned further (release after the head's row sums) +0.1%, and in the nest so -2.6%; hdim
#:   192 causal 8k / 2k +0.9% / +1.0%.  Lazy with three loops
#:   lost at hdim 64 causal (-5.6% / -3.3%) and hdim 96 (-1.1% / -0.9%); three loops alone moved
#:   hdim 64/96/192/256 causal by -1.4% to +0.7%; the pinned tail at hdim 128 full -0.9% / -1.1%
#:   and hdim 256 0.0% to -0.2%.
#: - o_through_v (session 13), against the stores from registers: hdim 256 causal 512 / 1k / 2k /
#:   16k +2.7% / -1.5% / -6.7% / -0.2%, full 512 / 2k / 16k -1.7% / -0.8% / -0.3%; hdim 192 causal
#:   / full 2k -1.8% / -0.9%.  The sync of both consumer warpgroups before O overwrites V, and
#:   the next tile's first P V waiting on the store, cost more than the stores; off.
TILES = {
    (64, False): _tiles3(128), (64, True): _tiles(128, q_in_registers=True),
    (96, False): _tiles(128, interleaved_rescale=True), (96, True): _tiles(128, interleaved_rescale=True),
    (128, False): _tiles(128, interleaved_rescale=True, uniform_pipeline=True, q_in_registers=True, rescale_rounds=2,
                         rescale_threshold=LAZY_RESCALE_THRESHOLD),
    (128, True): _tiles(128, interleaved_rescale=True, uniform_pipeline=True, q_in_registers=True, rescale_rounds=2,
                        rescale_threshold=LAZY_RESCALE_THRESHOLD, sequential_mask_loops=True,
                        lazy_tail_after_wait=True),
    (192, False): _tiles(112),
    (192, True): _tiles(112, interleaved_rescale=True, rescale_threshold=LAZY_RESCALE_THRESHOLD,
                        sequential_mask_loops=True, lazy_tail_after_wait=True),
    (256, False): _tiles(80, interleaved_rescale=True, hoist_q_descriptors=12, uniform_pipeline=True,
                         rescale_threshold=LAZY_RESCALE_THRESHOLD),
    (256, True): _tiles(80, interleaved_rescale=True, hoist_q_descriptors=False,
                        rescale_threshold=LAZY_RESCALE_THRESHOLD),
}

#: Dense runs with at least this many query rows use LONG_TILES where it has an entry: causal
#: hdim 64 then takes three consumer warpgroups like the full kernel (H100, same run, 3 vs 2:
#: 4k 426 vs 426, 8k 481 vs 456, 16k 504 vs 484 TFLOPS), while its short tiles keep two (1k:
#: 274 vs 317).
LONG_QUERIES = 4096
LONG_TILES = {(64, True): _tiles3(128)}

SUPPORTED_HEAD_DIMS = tuple(sorted({d for d, _ in TILES}))


def tiles_for(head_dim, masked=False, long_queries=False):
    if (head_dim, bool(masked)) not in TILES:
        raise ValueError(f"head dim {head_dim} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    if long_queries and (head_dim, bool(masked)) in LONG_TILES:
        return LONG_TILES[head_dim, bool(masked)]
    return TILES[head_dim, bool(masked)]


def has_long_tiles(head_dim, masked, seqlen_q):
    """Whether a dense run of seqlen_q query rows takes LONG_TILES' entry (a kernel of its own)."""
    return seqlen_q >= LONG_QUERIES and (head_dim, bool(masked)) in LONG_TILES
