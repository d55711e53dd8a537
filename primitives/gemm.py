"""The worked example: a warp-specialized Hopper GEMM written from this library's pieces.

    C[M, N] = A[M, K] @ B[N, K]^T      (transpose_b=True, both operands K-major)
    C[M, N] = A[M, K] @ B[K, N]        (transpose_b=False, B N-major: the P @ V case)

bf16 or fp16 in, fp32 accumulate, bf16 / fp16 / fp32 out.  One producer warp issues TMA loads into
a ring of shared-memory stages; two consumer warpgroups each own 64 rows of a 128 x 256 tile and run
m64n256k16 wgmmas on it; the epilogue goes registers -> swizzled shared staging -> TMA store, in
128-byte column chunks so that a 4-stage ring and the staging fit in 227 KB.  Tiles are scheduled
persistently (one CTA per SM), so the producer loads the next tile while consumers store this one.
Ragged M, N, K are handled by TMA: loads zero-fill outside the tensor and stores clip.
"""
import enum
import functools

import numpy as np
from numba import cuda, types

from ptx_inline import barrier, convert, memory, regs, special, tma, wgmma
from . import fragment, launch, pipeline, scheduler, smem, tensors, warpgroup
from .unroll import static_range, unrolled
from .tma_desc import TENSOR_MAP_BYTES, descriptor_tables, itemsize


class NamedBarrier(enum.IntEnum):
    """Id 0 is __syncthreads; one barrier per consumer warpgroup guards its epilogue staging."""
    EPILOGUE_WG0 = 1
    EPILOGUE_WG1 = 2


#: m64 rows per consumer warpgroup (the wgmma M), K of one bf16/fp16 wgmma.
WGMMA_M, WGMMA_K = 64, 16
#: One TMA box column of a 128B-swizzled tile holds this many bytes.
CHUNK_BYTES = smem.SWIZZLE_BYTES


class GemmKernel(launch.HopperKernel):
    """Compile-time configuration of one GEMM specialization, and its two roles."""

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

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def load(maps, bars, smem_a, smem_b, tiles_m, tiles_n, k_blocks):
            map_a = maps
            map_b = maps + MAP_B
            tma.fence_descriptor_acquire(map_a)
            tma.fence_descriptor_acquire(map_b)
            index, phase = 0, 0
            tile = scheduler.initial_work()
            while tile < tiles_m * tiles_n:
                tm, tn = scheduler.grouped_coords(tile, tiles_m, tiles_n, GROUP)
                for kb in range(k_blocks):
                    pipeline.producer_acquire(bars, STAGES, index, phase, TX)
                    full = pipeline.full_barrier(bars, index)
                    tma.load(smem_a + index * A_STAGE, map_a, (kb * BK, tm * BM), full)
                    if TRANS_B:
                        tma.load(smem_b + index * B_STAGE, map_b, (kb * BK, tn * BN), full)
                    else:
                        for c in static_range(B_BOXES):
                            tma.load(smem_b + index * B_STAGE + c * B_BOX_BYTES, map_b,
                                     (tn * BN + c * B_BOX_COLS, kb * BK), full)
                    index, phase = pipeline.advance(index, phase, STAGES)
                tile = scheduler.next_work(tile)
        return load

    # --- the consumers: two warpgroups, 64 rows each --------------------------------------------
    def make_mma(self):
        BM, BN, BK, STAGES, GROUP = self.block_m, self.block_n, self.block_k, self.stages, self.group_m
        A_STAGE, B_STAGE = self.a_stage, self.b_stage
        K_STEPS = BK // WGMMA_K
        A_KSTEP = WGMMA_K * itemsize(self.ab)                 # bytes along a K-major row
        TRANS_B = self.transpose_b
        # K-major B advances along the row like A; N-major B advances 16 rows of 128 bytes.
        B_KSTEP = A_KSTEP if TRANS_B else WGMMA_K * CHUNK_BYTES
        DESC_A = smem.descriptor_base(0, smem.ATOM_BYTES)
        DESC_B = smem.descriptor_base(0 if TRANS_B else BK * CHUNK_BYTES, smem.ATOM_BYTES)
        MMA = wgmma.mma_ss(BN, self.ab, 0 if TRANS_B else 1)
        ZERO = fragment.zeros(BN // 2)
        WG_ROWS_BYTES = WGMMA_M * CHUNK_BYTES
        epilogue = self.make_epilogue()

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def mma(maps, bars, smem_a, smem_b, smem_c, wg, tid, tiles_m, tiles_n, k_blocks):
            lane = tid % warpgroup.WARP_THREADS
            index, phase = 0, 0
            chunk_count = 0
            tile = scheduler.initial_work()
            while tile < tiles_m * tiles_n:
                tm, tn = scheduler.grouped_coords(tile, tiles_m, tiles_n, GROUP)
                acc = ZERO
                prev = 0
                for kb in range(k_blocks):
                    pipeline.consumer_wait(bars, index, phase)
                    a = special.uniform_u32(smem_a + index * A_STAGE + wg * WG_ROWS_BYTES)
                    b = special.uniform_u32(smem_b + index * B_STAGE)
                    acc = wgmma.fence_tied(acc)
                    for kk in static_range(K_STEPS):
                        acc = MMA(acc, smem.descriptor(DESC_A, a, kk * A_KSTEP),
                                  smem.descriptor(DESC_B, b, kk * B_KSTEP),
                                  0 if kb == 0 and kk == 0 else 1)
                    wgmma.commit_group()
                    # Keep one group in flight; the one before it is done, so its stage is free.
                    acc = wgmma.wait_group_tied(1, acc)
                    if kb > 0:
                        pipeline.consumer_release(bars, STAGES, prev, lane)
                    prev = index
                    index, phase = pipeline.advance(index, phase, STAGES)
                acc = wgmma.wait_group_tied(0, acc)
                pipeline.consumer_release(bars, STAGES, prev, lane)
                chunk_count = epilogue(acc, maps, smem_c, wg, tid, tm * BM + wg * WGMMA_M, tn * BN,
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
        GROUPS = CC // 8                      # 8-column accumulator groups per chunk
        ESIZE = itemsize(OUT)
        CHUNK = self.out_chunk
        MAP_C = 2 * TENSOR_MAP_BYTES
        BAR0 = int(NamedBarrier.EPILOGUE_WG0)
        WG_THREADS = warpgroup.WARPGROUP_THREADS
        pack = convert.pack_bf16x2 if OUT == "bf16" else convert.pack_f16x2

        @cuda.jit(device=True, forceinline=True)
        @unrolled
        def epilogue(acc, maps, smem_c, wg, tid, row0, col0, chunk_count):
            staging = smem_c + wg * 2 * CHUNK
            r = 16 * (tid // 32) + (tid % 32) // 4
            cpair = tid % 4
            for c in static_range(CHUNKS):
                buf = staging + (chunk_count % 2) * CHUNK
                # The store issued two chunks ago read this buffer; wait for it before reuse.
                if tid == 0:
                    tma.wait_group_read(1)
                barrier.sync(BAR0 + wg, WG_THREADS)
                for g in static_range(GROUPS):
                    i = 4 * (c * GROUPS + g)
                    cb = (8 * g + 2 * cpair) * ESIZE
                    if OUT == "f32":
                        memory.st_shared_v2_f32(buf + smem.swizzle_128b(r, cb), acc[i], acc[i + 1])
                        memory.st_shared_v2_f32(buf + smem.swizzle_128b(r + 8, cb), acc[i + 2], acc[i + 3])
                    else:
                        memory.st_shared_b32(buf + smem.swizzle_128b(r, cb), pack(acc[i], acc[i + 1]))
                        memory.st_shared_b32(buf + smem.swizzle_128b(r + 8, cb), pack(acc[i + 2], acc[i + 3]))
                barrier.fence_proxy_async()
                barrier.sync(BAR0 + wg, WG_THREADS)
                if tid == 0:
                    tma.store(maps + MAP_C, (col0 + c * CC, row0), buf)
                    tma.commit_group()
                chunk_count += 1
            return chunk_count
        return epilogue

    # --- the kernel: roles by warpgroup ---------------------------------------------------------
    def make_kernel(self):
        load, mma = self.make_load(), self.make_mma()
        STAGES = self.stages
        CONSUMER_WARPS = self.consumers * (warpgroup.WARPGROUP_THREADS // warpgroup.WARP_THREADS)
        OFF_A, OFF_B = self.smem.offsets["a"], self.smem.offsets["b"]
        OFF_C, OFF_BARS = self.smem.offsets["c"], self.smem.offsets["barriers"]
        REG_PRODUCER, REG_CONSUMER = self.registers
        WG_THREADS = warpgroup.WARPGROUP_THREADS

        def gemm_kernel(maps, tiles_m, tiles_n, k_blocks):
            dyn = cuda.shared.array(0, dtype=np.uint8)
            base = smem.aligned_base(special.shared_address(dyn))
            bars = base + OFF_BARS
            if cuda.threadIdx.x == 0:
                pipeline.init(bars, STAGES, CONSUMER_WARPS)
            cuda.syncthreads()
            wg = warpgroup.warpgroup_index()
            tid = cuda.threadIdx.x % WG_THREADS
            if wg == 0:
                regs.setmaxnreg_dec(REG_PRODUCER)
                if tid < warpgroup.WARP_THREADS and special.elect_one():
                    load(maps, bars, base + OFF_A, base + OFF_B, tiles_m, tiles_n, k_blocks)
            else:
                regs.setmaxnreg_inc(REG_CONSUMER)
                mma(maps, bars, base + OFF_A, base + OFF_B, base + OFF_C, wg - 1, tid,
                    tiles_m, tiles_n, k_blocks)
        return gemm_kernel

    SIGNATURE = types.void(types.uint64, types.int32, types.int32, types.int32)

    def launch(self, map_table, m, n, k, stream=None):
        tiles_m, tiles_n = -(-m // self.block_m), -(-n // self.block_n)
        grid = scheduler.persistent_grid(tiles_m * tiles_n, launch.sm_count())
        self.kernel()(grid, stream, map_table, tiles_m, tiles_n, -(-k // self.block_k))

    def tensor_maps(self, a, b, c):
        """(dtype, ptr, dims, strides, box) of A, B, C for this tiling (innermost first)."""
        chunk_in = CHUNK_BYTES // itemsize(self.ab)
        spec_a = (a.dtype, a.ptr, (a.shape[1], a.shape[0]), (a.strides[0] * a.itemsize,),
                  (self.block_k, self.block_m))
        if self.transpose_b:
            spec_b = (b.dtype, b.ptr, (b.shape[1], b.shape[0]), (b.strides[0] * b.itemsize,),
                      (self.block_k, self.block_n))
        else:
            spec_b = (b.dtype, b.ptr, (b.shape[1], b.shape[0]), (b.strides[0] * b.itemsize,),
                      (chunk_in, self.block_k))
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
    return c[:, :n] if c.shape[1] != n else c
