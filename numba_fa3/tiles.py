"""The forward kernel's tile table: geometry and a few named schedule choices per head dim and
mask (FA3's tile_size.h).  docs/decisions.md holds, per choice, what was measured and why it
stands; the alternatives that measured slower are gone from the code.

Each consumer warpgroup owns 64 query rows (the wgmma M), so block_m = 64 * consumers.  Per
consumer thread the accumulators take O: D/2 registers, S: block_n/2, P (16-bit): block_n/4,
all live at once with the intra-warpgroup overlap; Q in registers adds D/4.  Shared memory holds
Q (block_m x D) and `stages` K and V tiles (block_n x D), 16-bit, in 64-column chunks of the
128-byte swizzle (D = 96 and 192 round up to whole chunks: TMA zero-fills the extra columns and
the GEMMs never read them), within 227 KB:

  D    block_n  stages  smem (Q + K + V)         O + S + P regs
  64   128      2       48 + 32 + 32 = 112 KB    32 + 64 + 32   three consumers (block_m 192)
  96   128      2       32 + 64 + 64 = 160 KB    48 + 64 + 32
  128  128      2       32 + 64 + 64 = 160 KB    64 + 64 + 32
  192  112      2       48 + 84 + 84 = 216 KB    96 + 56 + 28
  256  80       2       64 + 80 + 80 = 224 KB    128 + 40 + 20

Registers: producer 24 / consumers 240 (FA3's split), or 24 / 160 with three consumers.
setmaxnreg moves registers only within what the CTA got at launch: 384 threads x 168 (the
launch-bounds cap) = 64512 = 128 x (24 + 2 x 240); 512 x 128 = 65536 >= 128 x (24 + 3 x 160).
The producer fits 24 because its loop runs on a whole warp with 32-bit index math (intmath).
"""
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Tiles:
    """Geometry, then the schedule choices (each a place where ptxas's schedule lands rather
    than a change of the work; docs/decisions.md)."""
    block_m: int
    block_n: int
    stages: int
    consumers: int
    producer_registers: int
    consumer_registers: int
    #: O rescaled after the step's P V wait, in `rescale_rounds` parts each ordered before a part
    #: of the exponentials (`fragment.after`), as in FA3's SASS; else before the P V issue.
    interleaved_rescale: bool = False
    #: Q's wgmma descriptors built once per tile and kept in uniform registers (True: every K
    #: step's; an int: the first that many), instead of rebuilt before each S wgmma.
    hoist_q_descriptors: bool | int = True
    #: Stage releases as predicated arrives, not lane branches: the loop stays warp-uniform and
    #: the ring's state lives in uniform registers.  Needs interleaved_rescale (release order).
    uniform_pipeline: bool = False
    #: Q loaded into wgmma A fragments once per tile (ldmatrix) and its buffer released at once.
    q_in_registers: bool = False
    #: Parts of the interleaved rescale; P's first 1/rounds exponentiated before the P V wait.
    rescale_rounds: int = 4
    #: The lazy rescale: a row's max moves only past 2^threshold (0: always), and O's multiplies
    #: run only in steps where some row of the warp moved.
    rescale_threshold: float = 0.0
    #: Masked kernels run the masked and plain key blocks as three loops in a row, not a nest.
    sequential_mask_loops: bool = False
    #: The lazy rescale's exponentials after the P V wait take their bias through O, which pins
    #: the wait among the exponentials.
    lazy_tail_after_wait: bool = False

    def with_choices(self, **choices):
        """These tiles with some fields replaced (`python -m bench variants`)."""
        return replace(self, **choices)


#: The lazy rescale's threshold where the table takes it: P up to 2^8 = 256.
LAZY = 8.0
_TWO = dict(block_m=128, stages=2, consumers=2, producer_registers=24, consumer_registers=240)
_THREE = dict(block_m=192, stages=2, consumers=3, producer_registers=24, consumer_registers=160)
_LAZY_PINNED = dict(interleaved_rescale=True, rescale_threshold=LAZY, sequential_mask_loops=True,
                    lazy_tail_after_wait=True)

#: (head_dim, causal-or-local) -> tiles, one line of reason each (docs/decisions.md).
TILES = {
    # a third consumer's softmax hides under the other two's short 64-wide P V GEMMs
    (64, False): Tiles(block_n=128, interleaved_rescale=True, **_THREE),
    # short causal tiles: two consumers; LONG_TILES takes three from LONG_QUERIES rows
    (64, True): Tiles(block_n=128, q_in_registers=True, **_TWO),
    (96, False): Tiles(block_n=128, interleaved_rescale=True, **_TWO),   # as hdim 128, chunks padded
    (96, True): Tiles(block_n=128, interleaved_rescale=True, **_TWO),
    # FA3's 176-key block was slower here and leaves no room for O's buffer
    (128, False): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, q_in_registers=True,
                        rescale_rounds=2, rescale_threshold=LAZY, **_TWO),
    # the lazy rescale gains here only with three loops and the pinned tail
    (128, True): Tiles(block_n=128, uniform_pipeline=True, q_in_registers=True, rescale_rounds=2,
                       **_LAZY_PINNED, **_TWO),
    (192, False): Tiles(block_n=112, **_TWO),   # the interleaved rescale lost here
    (192, True): Tiles(block_n=112, **_LAZY_PINNED, **_TWO),
    # the most K/V that fits twice; 12 of 16 Q descriptor quads fit the uniform registers
    (256, False): Tiles(block_n=80, interleaved_rescale=True, hoist_q_descriptors=12, uniform_pipeline=True,
                        rescale_threshold=LAZY, **_TWO),
    # hoisted Q descriptors spill in the causal kernel
    (256, True): Tiles(block_n=80, interleaved_rescale=True, hoist_q_descriptors=False, rescale_threshold=LAZY,
                       **_TWO),
}

#: Dense runs with at least this many query rows use LONG_TILES where it has an entry: causal
#: hdim 64 then takes three consumer warpgroups like the full kernel, while its short tiles keep
#: two.
LONG_QUERIES = 4096
LONG_TILES = {(64, True): TILES[64, False]}

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


#: How the backward's consumer warpgroups share a key block: each owns 64 keys and all of D
#: (block_n = 64 x consumers), or all of a 64-key block shares out D's columns (block_n = 64).
SPLIT_KEYS, SPLIT_COLUMNS = "keys", "columns"


@dataclass(frozen=True)
class BackwardTiles:
    """The backward kernel's geometry (`backward`): with `split` SPLIT_KEYS each consumer
    warpgroup owns 64 keys of the key block and holds their dK and dV over all of D (D / 2
    registers each per thread); with SPLIT_COLUMNS the warpgroups share 64 keys and each holds
    dK and dV over its share of D's columns (D / (2 x consumers) registers each), for the head
    dims whose whole rows do not fit a thread's registers.  Query blocks of block_m rows stream
    through `stages` shared-memory stages of Q, dO and their LSE and D rows."""
    block_m: int
    stages: int
    consumers: int
    producer_registers: int
    consumer_registers: int
    split: str = SPLIT_KEYS

    def __post_init__(self):
        if self.split not in (SPLIT_KEYS, SPLIT_COLUMNS):
            raise ValueError(f"split must be {SPLIT_KEYS!r} or {SPLIT_COLUMNS!r}, got {self.split!r}")

    @property
    def block_n(self):
        return 64 * self.consumers if self.split == SPLIT_KEYS else 64


#: FA3's split: at 32 / 232 ptxas serialized the D = 128 wgmmas (C7512); at 24 the producer
#: fits once its loop-invariant arithmetic is 32-bit and its tile slot address is recomputed
_BWD_TWO = dict(consumers=2, producer_registers=24, consumer_registers=240)

#: head_dim -> backward tiles, one line of reason each.  Registers per consumer thread (SPLIT_KEYS):
#: dK + dV D, S^T and dP^T block_m / 2 each, P^T and dS^T packed block_m / 4 each, dQ D / 4 (split
#: between the two warpgroups) or D / 2 (every other query block, where D / 2 is not whole
#: 64-column chunks); SPLIT_COLUMNS: dK + dV D / 2, S^T and dP^T block_m / 4 each, dQ D / 4.
#: Shared memory: K and V (block_n x D), `stages` x (Q and dO: block_m x D), dS^T twice (block_n
#: x block_m), and P^T twice with SPLIT_COLUMNS.
BACKWARD_TILES = {
    # the forward's 64-key warpgroup split with Q, dO in two stages: 16 + 16 + 2 x 16 + 16 KB
    64: BackwardTiles(block_m=64, stages=2, **_BWD_TWO),
    # D = 96 pads its second chunk (TMA zero-fills it) as the forward does
    96: BackwardTiles(block_m=64, stages=2, **_BWD_TWO),
    # dK + dV take 128 of the 240 registers; 32 + 32 + 2 x 32 + 32 KB of shared memory
    128: BackwardTiles(block_m=64, stages=2, **_BWD_TWO),
    # as 256 (below) with unequal shares (128 and 64 columns: a share is whole 64-column chunks), each
    # warpgroup its own consumer code; 24 + 24 + 2 x (24 + 24) + 32 KB leaves room for dQ's
    # staging (48 KB); its producer spilled at 24 registers (the tile loop's ring phases), its
    # consumers fit 232
    192: BackwardTiles(block_m=64, stages=2, split=SPLIT_COLUMNS, consumers=2, producer_registers=32,
                       consumer_registers=232),
    # whole rows of dK + dV would take 256 registers: the warpgroups split D (128 columns each, whole
    # 64-column chunks of the MN-major operands) over a 64-key block, P^T and dS^T through shared
    # memory; 32 + 32 + 2 x (32 + 32) + 2 x (8 + 8) KB fills shared memory, so dQ's adds are
    # vector reductions from registers (no staging tiles)
    256: BackwardTiles(block_m=64, stages=2, split=SPLIT_COLUMNS, **_BWD_TWO),
}

BACKWARD_HEAD_DIMS = tuple(sorted(BACKWARD_TILES))


def backward_tiles_for(head_dim):
    if head_dim not in BACKWARD_TILES:
        raise ValueError(f"the backward supports head dims {BACKWARD_HEAD_DIMS}, got {head_dim}")
    return BACKWARD_TILES[head_dim]


#: The FP8 forward's tiles (`forward_fp8`), (head_dim, causal-or-local) -> tiles.  block_n is
#: one 128-byte row of V^T's keys (e4m3); per consumer thread O takes D/2 registers, S 64 and
#: P 16 (e4m3, four per register).  No lazy rescale: P's lift to 2^8 already takes e4m3's
#: range.  Shared memory (Q + K + V^T + O's buffer): D 64 (Q and K rows padded to 128 bytes):
#: 24 + 2 x 16 + 2 x 16 (V^T fills 8 of each) + 24 KB; D 128: 16 + 2 x 16 + 2 x 16 + 32 KB (two Q buffers fit);
#: D 256: 32 + 2 x 32 + 2 x 32 + 64 KB.
FP8_TILES = {
    # a third consumer's softmax hides under the other two's GEMMs, as the 16-bit kernel's D 64
    (64, False): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, rescale_rounds=2, **_THREE),
    (64, True): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, rescale_rounds=2,
                      sequential_mask_loops=True, **_THREE),
    # 256-key blocks spill and serialize the wgmmas with the overlap and lose without it; a third
    # consumer spills at 160 registers; 192 and 224 keys (FA3's tile) compile clean, unmeasured
    (128, False): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, rescale_rounds=2, **_TWO),
    (128, True): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, rescale_rounds=2,
                       sequential_mask_loops=True, **_TWO),
    # Q's last four descriptors rebuilt per S GEMM: with more hoisted the uniform registers run
    # out and ptxas spills (the varlen kernel with all eight hoisted, every kernel with seven
    # once V's descale per key block joined the step)
    (256, False): Tiles(block_n=128, interleaved_rescale=True, uniform_pipeline=True, hoist_q_descriptors=4,
                        **_TWO),
    # hoisted Q descriptors, or the uniform pipeline, spill here
    (256, True): Tiles(block_n=128, interleaved_rescale=True, sequential_mask_loops=True, hoist_q_descriptors=False,
                       **_TWO),
}

FP8_HEAD_DIMS = tuple(sorted({d for d, _ in FP8_TILES}))


def fp8_tiles_for(head_dim, masked=False):
    if (head_dim, bool(masked)) not in FP8_TILES:
        raise ValueError(f"the FP8 forward supports head dims {FP8_HEAD_DIMS}, got {head_dim}")
    return FP8_TILES[head_dim, bool(masked)]
