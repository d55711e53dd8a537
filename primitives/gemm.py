"""The worked example: a warp-specialized Hopper GEMM written from this library's pieces.

    C[M, N] = A[M, K] @ B[N, K]^T      (transpose_b=True, both operands K-major)
    C[M, N] = A[M, K] @ B[K, N]        (transpose_b=False, B N-major: the P @ V case)

bf16 or fp16 in, fp32 accumulate, bf16 / fp16 / fp32 out.  One producer warp issues TMA loads into
a ring of shared-memory stages; two consumer warpgroups each own 64 rows of a 128 x 256 tile and run
m64n256k16 wgmmas on it; the epilogue goes registers -> swizzled shared staging -> TMA store, in
128-byte column chunks so that a 4-stage ring and the staging fit in 227 KB.  Tiles are scheduled
persistently (one CTA per SM), so the producer loads the next tile while consumers store this one.
Ragged M, N, K are handled by TMA: loads zero-fill outside the tensor and stores clip.

Composed from the library's collectives: role dispatch and named barriers (`warpgroup`), the
stage ring (`pipeline`), wgmma issue over swizzled chunks (`mma`), the staged TMA-store
epilogue (`epilogue`), the persistent scheduler (`scheduler`); docs/architecture.md walks
through it.
"""
import functools

import numpy as np
from numba import cuda, types

from numba_fa3.ptx_inline import barrier, special, tma, wgmma
from . import epilogue, fragment, launch, mma, pipeline, scheduler, smem, tensors, warpgroup
from .mma import WGMMA_M
from .unroll import constexpr, static_range, unrolled
from .tma_desc import TENSOR_MAP_BYTES, descriptor_tables, itemsize


#: A 128-byte swizzled row: one TMA box column of a tile, one staging chunk of the output.
CHUNK_BYTES = smem.SWIZZLE_BYTES

#: The GEMM's scalar parameters: the descriptor table (A, B, C maps), tiles along M and N, K blocks.
GemmParams = launch.params("GemmParams", [("maps", types.uint64), ("tiles_m", types.int32),
                                          ("tiles_n", types.int32), ("k_blocks", types.int32)])


class GemmKernel(launch.HopperKernel):
    """Compile-time configuration of one GEMM specialization, and its two roles."""

    PARAMS = GemmParams

    def __init__(self, ab="bf16", out="bf16", transpose_b=True, block_n=256, block_k=64,
                 stages=4, consumers=2, group_m=16):
        if ab not in ("bf16", "f16"):
            raise ValueError(f"GEMM inputs must be bf16 or f16, got {ab}")
        if out not in ("bf16", "f16", "f32"):
            raise ValueError(f"GEMM output must be bf16, f16 or f32, got {out}")
        self.ab, self.out, self.transpose_b = ab, out, bool(transpose_b)
        self.consumers = consumers
        self.block_m = WGMMA_M * consumers
        self.block_n, self.block_k, self.stages, self.group_m = block_n, block_k, stages, group_m
        esize = itemsize(ab)
        if block_k * esize != smem.SWIZZLE_BYTES:
            raise ValueError("block_k must fill one 128-byte swizzle row")
        self.threads = warpgroup.block_threads(consumers)
        self.registers = warpgroup.register_budget(consumers)

        # Shared memory, derived from the tile shapes.
        self.a_stage = self.block_m * block_k * esize
        self.b_stage = block_n * block_k * esize
        self.out_chunk_cols = CHUNK_BYTES // itemsize(out)
        self.out_chunk = WGMMA_M * CHUNK_BYTES  # one 64-row x 128-byte staging box
        plan = smem.SharedLayout()
        plan.add("a", stages * self.a_stage)
        plan.add("b", stages * self.b_stage)
        plan.add("c", consumers * 2 * self.out_chunk)  # double-buffered per warpgroup
        plan.add("barriers", pipeline.barrier_bytes(stages), align=smem.MBARRIER_BYTES)
        self.smem = plan.check()
        # A K-major; B K-major (A B^T) or N-major in boxes of 64 columns (A B: the P V case).
        b_operand = mma.Operand("k", 0) if self.transpose_b else mma.Operand("mn", block_k * CHUNK_BYTES)
        self.gemm = mma.warpgroup_mma(block_n, ab, block_k, mma.Operand("k", 0), b_operand)

    @property
    def key(self):
        return (self.ab, self.out, self.transpose_b, self.block_n, self.block_k, self.stages,
                self.consumers, self.group_m)

    # --- the producer: one elected thread of warp 0 --------------------------------------------
    def make_load(self):
        BM, BN, BK, STAGES, GROUP = self.block_m, self.block_n, self.block_k, self.stages, self.group_m
        A_STAGE, B_STAGE = self.a_stage, self.b_stage
        TX = A_STAGE + B_STAGE
        TRANS_B = self.transpose_b
        B_BOXES = 1 if TRANS_B else BN // (CHUNK_BYTES // itemsize(self.ab))
        B_BOX_COLS = CHUNK_BYTES // itemsize(self.ab)
        B_BOX_BYTES = BK * CHUNK_BYTES
        MAP_B = TENSOR_MAP_BYTES
        OFF_A, OFF_B, OFF_BARS = (self.smem.offsets[k] for k in ("a", "b", "barriers"))

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def load(p, base, lane):
            if special.elect_one():
                bars, smem_a, smem_b = base + OFF_BARS, base + OFF_A, base + OFF_B
                map_a = p.maps
                map_b = p.maps + MAP_B
                tma.fence_descriptor_acquire(map_a)
                tma.fence_descriptor_acquire(map_b)
                state = pipeline.start()
                tile = scheduler.initial_work()
                while tile < p.tiles_m * p.tiles_n:
                    tm, tn = scheduler.grouped_coords(tile, p.tiles_m, p.tiles_n, GROUP)
                    for kb in range(p.k_blocks):
                        pipeline.producer_wait(bars, STAGES, state)
                        pipeline.producer_expect(bars, state, TX)
                        full = pipeline.full_barrier(bars, state.stage)
                        tma.load(smem_a + state.stage * A_STAGE, map_a, (kb * BK, tm * BM), full)
                        if TRANS_B:
                            tma.load(smem_b + state.stage * B_STAGE, map_b, (kb * BK, tn * BN), full)
                        else:
                            for c in static_range(B_BOXES):
                                tma.load(smem_b + state.stage * B_STAGE + c * B_BOX_BYTES, map_b,
                                         (tn * BN + c * B_BOX_COLS, kb * BK), full)
                        state = pipeline.advance(state, STAGES)
                    tile = scheduler.next_work(tile)
        return load

    # --- the consumers: two warpgroups, 64 rows each --------------------------------------------
    def make_mma(self):
        BM, BN, STAGES, GROUP = self.block_m, self.block_n, self.stages, self.group_m
        A_STAGE, B_STAGE = self.a_stage, self.b_stage
        ISSUE = self.gemm.issue
        ZERO = fragment.zeros(BN // 2)
        WG_ROWS_BYTES = WGMMA_M * CHUNK_BYTES
        OFF_A, OFF_B, OFF_C, OFF_BARS = (self.smem.offsets[k] for k in ("a", "b", "c", "barriers"))
        epilogue = self.make_epilogue()

        @cuda.jit(device=True, forceinline=True)
        def mma(p, base, wg, tid):
            bars, smem_a, smem_b = base + OFF_BARS, base + OFF_A, base + OFF_B
            lane = tid % warpgroup.WARP_THREADS
            state = pipeline.start()
            chunk_count = 0
            tile = scheduler.initial_work()
            while tile < p.tiles_m * p.tiles_n:
                tm, tn = scheduler.grouped_coords(tile, p.tiles_m, p.tiles_n, GROUP)
                acc = ZERO
                prev = state
                for kb in range(p.k_blocks):
                    pipeline.consumer_wait(bars, state)
                    a = special.uniform_u32(smem_a + state.stage * A_STAGE + wg * WG_ROWS_BYTES)
                    b = special.uniform_u32(smem_b + state.stage * B_STAGE)
                    acc = ISSUE(acc, (a, ()), b, 0 if kb == 0 else 1)
                    # Keep one group in flight; the one before it is done, so its stage is free.
                    acc = wgmma.wait_group_tied(1, acc)
                    if kb > 0:
                        pipeline.consumer_release(bars, STAGES, prev, lane)
                    prev = state
                    state = pipeline.advance(state, STAGES)
                acc = wgmma.wait_group_tied(0, acc)
                pipeline.consumer_release(bars, STAGES, prev, lane)
                chunk_count = epilogue(acc, p.maps, base + OFF_C, wg, tid, tm * BM + wg * WGMMA_M, tn * BN,
                                       chunk_count)
                tile = scheduler.next_work(tile)
            if tid == 0:
                tma.wait_group(0)
        return mma

    def make_epilogue(self):
        BN = self.block_n
        OUT = self.out
        CC = self.out_chunk_cols
        CHUNKS = BN // CC
        GROUPS = CC // epilogue.GROUP_COLS       # 8-column accumulator groups per chunk
        REGS = GROUPS * (fragment.REGS_PER_GROUP if OUT == "f32" else fragment.REGS_PER_GROUP // 2)
        CHUNK = self.out_chunk
        MAP_C = 2 * TENSOR_MAP_BYTES
        ESIZE = itemsize(OUT)
        F32_OUT = OUT == "f32"
        stage = epilogue.stager(GROUPS, ESIZE, 0)
        pack = fragment.pack_bf16 if OUT == "bf16" else fragment.pack_f16

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def store(acc, maps, smem_c, wg, tid, row0, col0, chunk_count):
            staging = smem_c + wg * 2 * CHUNK
            r = epilogue.fragment_row(tid)
            cb = epilogue.fragment_col(tid) * ESIZE
            if constexpr(F32_OUT):
                regs = acc
            else:
                regs = pack(acc)
            for c in static_range(CHUNKS):
                buf = staging + (chunk_count % 2) * CHUNK
                # The store issued two chunks ago read this buffer; wait for it before reuse.
                if tid == 0:
                    tma.wait_group_read(1)
                warpgroup.epilogue_sync(wg)
                stage(buf, regs[constexpr(c * REGS):constexpr((c + 1) * REGS)], r, cb)
                barrier.fence_proxy_async()
                warpgroup.epilogue_sync(wg)
                if tid == 0:
                    tma.store(maps + MAP_C, (col0 + c * CC, row0), buf)
                    tma.commit_group()
                chunk_count += 1
            return chunk_count
        return store

    # --- the kernel: roles by warpgroup ---------------------------------------------------------
    def body(self):
        run = warpgroup.specialize(self.make_load(), self.make_mma(), self.registers)
        STAGES = self.stages
        CONSUMER_WARPS = self.consumers * (warpgroup.WARPGROUP_THREADS // warpgroup.WARP_THREADS)
        OFF_BARS = self.smem.offsets["barriers"]

        @cuda.jit(device=True, forceinline=True)
        def gemm(p):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            if cuda.threadIdx.x == 0:
                pipeline.init(base + OFF_BARS, STAGES, CONSUMER_WARPS)
            cuda.syncthreads()
            run(p, base)
        return gemm

    def launch(self, map_table, m, n, k, stream=None):
        tiles_m, tiles_n = -(-m // self.block_m), -(-n // self.block_n)
        grid = scheduler.persistent_grid(tiles_m * tiles_n, launch.sm_count())
        self.launch_with(grid, stream, GemmParams(map_table, tiles_m, tiles_n, -(-k // self.block_k)))

    def tensor_maps(self, a, b, c):
        """(dtype, ptr, dims, strides, box) of A, B, C for this tiling (innermost first)."""
        spec_a = (a.dtype, a.ptr, (a.shape[1], a.shape[0]), (a.strides[0] * a.itemsize,),
                  (self.block_k, self.block_m))
        if self.transpose_b:
            spec_b = (b.dtype, b.ptr, (b.shape[1], b.shape[0]), (b.strides[0] * b.itemsize,),
                      (self.block_k, self.block_n))
        else:
            spec_b = (b.dtype, b.ptr, (b.shape[1], b.shape[0]), (b.strides[0] * b.itemsize,),
                      (CHUNK_BYTES // itemsize(self.ab), self.block_k))
        spec_c = (c.dtype, c.ptr, (c.shape[1], c.shape[0]), (c.strides[0] * c.itemsize,),
                  (self.out_chunk_cols, WGMMA_M))
        return (spec_a, spec_b, spec_c)


@functools.lru_cache(maxsize=None)
def gemm_kernel(ab, out, transpose_b):
    return GemmKernel(ab, out, transpose_b)


def _check_matrix(info, name):
    if len(info.shape) != 2:
        raise ValueError(f"{name} must be 2-D, got shape {info.shape}")
    if info.strides[1] != 1:
        raise ValueError(f"{name} must have a contiguous last dimension, got strides {info.strides}")
    if (info.strides[0] * info.itemsize) % 16 or info.ptr % 16:
        raise ValueError(f"{name}: TMA needs 16-byte aligned rows (row stride {info.strides[0]} "
                         f"elements, base {info.ptr:#x}); for bf16/fp16 the row length must be a "
                         f"multiple of 8")


def matmul(a, b, out=None, transpose_b=True, out_dtype=None, stream=None):
    """C = A @ B^T (transpose_b=True, B is [N, K]) or A @ B (B is [K, N]).

    GPU inputs (torch CUDA tensors, Numba/CuPy device arrays) are used in place and the result
    is a new array of the same library (or `out`); NumPy inputs are copied to the GPU and the
    result comes back as NumPy.  Raises before launch on bad dtype, shape or alignment.
    `stream`: a stream handle or object; for torch tensors the default is torch's current stream.
    """
    ia, ib = tensors.inspect(a, "a"), tensors.inspect(b, "b")
    if (ia.kind == "numpy") != (ib.kind == "numpy"):
        raise TypeError("a and b must both be NumPy arrays or both be GPU arrays")
    if ia.dtype != ib.dtype or ia.dtype not in ("bf16", "f16"):
        raise TypeError(f"a and b must both be bf16 or both fp16, got {ia.dtype} and {ib.dtype}")
    for info, name in ((ia, "a"), (ib, "b")):
        if len(info.shape) != 2:
            raise ValueError(f"{name} must be 2-D, got shape {info.shape}")
    m, k = ia.shape
    n, kb = ib.shape if transpose_b else ib.shape[::-1]
    if k != kb:
        raise ValueError(f"inner dimensions differ: a is {ia.shape}, b is {ib.shape} "
                         f"(transpose_b={transpose_b})")
    if min(m, n, k) < 1:
        raise ValueError(f"empty GEMM {m}x{n}x{k}")
    out_dtype = out_dtype or ia.dtype
    if out_dtype not in ("bf16", "f16", "f32"):
        raise ValueError(f"out_dtype must be bf16, f16 or f32, got {out_dtype!r}")
    host = ia.kind == "numpy"
    if host:
        if out is not None:
            raise TypeError("out= is for GPU inputs; NumPy inputs get a new NumPy result")
        ia, ib = tensors.upload(ia), tensors.upload(ib)
    _check_matrix(ia, "a")
    _check_matrix(ib, "b")
    if out is None:
        pad = 16 // tensors.NUMPY_DTYPES[out_dtype].itemsize
        n_alloc = -(-n // pad) * pad  # TMA rows must be 16-byte multiples: pad, return a view
        c = tensors.empty_like_kind(ia, (m, n_alloc), out_dtype)
        ic = tensors.TensorInfo(tensors.device_ptr(c), (m, n), (n_alloc, 1), out_dtype, ia.kind, c)
    else:
        ic = tensors.inspect(out, "out")
        if ic.shape != (m, n) or ic.dtype not in ("bf16", "f16", "f32"):
            raise ValueError(f"out must be ({m}, {n}) bf16/fp16/fp32, got {ic.shape} {ic.dtype}")
        _check_matrix(ic, "out")
        c = out
    if stream is None and ia.kind == "torch":
        stream = tensors.torch_stream()
    kern = gemm_kernel(ia.dtype, ic.dtype, bool(transpose_b))
    table = descriptor_tables.get(kern.tensor_maps(ia, ib, ic))
    kern.launch(table, m, n, k, stream)
    if out is not None:
        return out
    if host:
        return tensors.to_host(c, ic.dtype)[:, :n]
    return tensors.to_library(c[:, :n] if c.shape[1] != n else c, ia, ic.dtype, stream)
