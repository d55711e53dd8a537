"""Thread-block clusters (sm_90): a CTA's rank in its cluster, addresses in a peer CTA's shared
memory, arrivals on a peer's mbarrier and the cluster-wide barrier.  The building blocks for TMA
multicast (`tma.load_multicast`), where one CTA's copy lands in every CTA of a mask and each CTA
must release a stage on all of them before it is refilled.

PTX ISA sections are named by instruction (the numbering moves between ISA versions): special
register %cluster_ctarank (10, "Special Registers"), `mapa` (9.7.9, "Data Movement and Conversion
Instructions"), `mbarrier.arrive` and `barrier.cluster` (9.7.13, "Parallel Synchronization and
Communication Instructions").
"""
from numba import types
from numba.cuda.extending import intrinsic

from ._asm import I32, as_int, emit, void_asm


@intrinsic
def ctarank(typingctx):
    """`mov.u32 %0, %cluster_ctarank`: this CTA's rank in its cluster (0 without a cluster)."""
    def codegen(context, builder, sig, args):
        return emit(builder, "mov.u32 $0, %cluster_ctarank;", [I32], [], clobber_memory=False,
                    side_effect=False)
    return types.uint32(), codegen


@intrinsic
def map_shared(typingctx, addr, rank):
    """`mapa.shared::cluster.u32`: the shared::cluster address of shared address `addr` (this
    CTA's 32-bit address) in the CTA of rank `rank`."""
    def codegen(context, builder, sig, args):
        return emit(builder, "mapa.shared::cluster.u32 $0, $1, $2;", [I32],
                    [(as_int(context, builder, args[0], sig.args[0], 32), "r"),
                     (as_int(context, builder, args[1], sig.args[1], 32), "r")],
                    clobber_memory=False, side_effect=False)
    return types.uint32(addr, rank), codegen


@intrinsic
def arrive_remote(typingctx, bar):
    """`mbarrier.arrive.shared::cluster.b64 _, [bar]`: one arrival on the mbarrier at
    shared::cluster address `bar` (from `map_shared`, possibly another CTA's), with the default
    semantics (release, CTA scope), as CUTLASS's ClusterBarrier arrives: what it releases is this
    CTA's reads of its own shared memory, complete once their wgmma wait returned.  With
    `.release.cluster` each arrive waited for the thread's earlier memory operations to be
    visible cluster-wide: ~1.6k cycles per K release in the forward kernel (bench trace)."""
    return void_asm("mbarrier.arrive.shared::cluster.b64 _, [$0];", "r")(typingctx, bar)


@intrinsic
def barrier_arrive(typingctx):
    """`barrier.cluster.arrive.release.aligned`: this thread has arrived at the cluster barrier
    (every thread of every CTA in the cluster arrives once per phase)."""
    return void_asm("barrier.cluster.arrive.release.aligned;")(typingctx)


@intrinsic
def barrier_wait(typingctx):
    """`barrier.cluster.wait.acquire.aligned`: wait until every thread of the cluster arrived.
    Needed after mbarrier init (a peer may arrive on or multicast into this CTA's barriers) and
    before a CTA exits while peers may still write its shared memory."""
    return void_asm("barrier.cluster.wait.acquire.aligned;")(typingctx)
