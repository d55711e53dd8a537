"""The FP8 forward kernel (FA3 section 3.3): e4m3 Q, K and V, fp32 accumulation, bf16 or fp16 O.

The bf16 forward's collectives with three changes, each a hook of `forward.FlashForward`:
- the GEMMs take e4m3 operands at k = 32.  FP8 wgmma reads both operands K-major, so P V needs
  V with keys contiguous: V arrives transposed, `[B, Hk, D, Sk]` with its keys permuted within
  groups of 32 (`fp8_layout`), so that P's e4m3 fragments are the S accumulator packed in
  register order (`fragment.pack_e4m3`) with no register permute;
- the scores' scale changes per key block: ``c = descale_q(query block) descale_k(key block)
  scale log2 e``, read per step (`score_scale`), with the softmax's running max kept in the
  exponent's units (`softmax.exponent_units`) and P lifted by 2^`P_OFFSET_LOG2` into e4m3's
  range;
- V's descale (per key block or per key head) enters P through the exponent's bias
  (`value_scale`, `softmax.exponent_units`), so the epilogue's O / l is the output.

Descales are float32 arrays read through strides, so one kernel serves per-tensor (all strides
0), per-(batch, head) (block stride 0) and per-block descales (Q per `block_m` query rows, K and V
per `block_n` keys: the kernel's tiles); `qd_ratio` maps a query head to its descale row (1, or
the GQA ratio for descales given per key head, FA3's layout).
"""
import functools

import numpy as np
from numba import cuda, types

from numba_fa3.primitives import launch, mma, pipeline, scheduler, smem
from numba_fa3.primitives.fragment import pack_e4m3
from numba_fa3.primitives.intmath import udivmod32
from numba_fa3.primitives.mma import WGMMA_M
from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES, bshd_spec
from numba_fa3.ptx_inline import memory, special, tma
from . import fp8_layout, fp8_model, mask, softmax, tile_scheduler
from .forward import FORWARD_FIELDS, FULL_SCHEDULE, FlashForward
from .tiles import fp8_tiles_for

#: P's lift into e4m3's range, log2 (the NumPy model's, FA3's 2^8: e4m3's largest is 448).
P_OFFSET_LOG2 = fp8_model.P_OFFSET_LOG2
#: Bytes of a descale (float32).
DESCALE_BYTES = 4
#: V's smallest descale as the kernel takes it (the NumPy model's).
MIN_V_DESCALE = fp8_model.MIN_V_DESCALE
#: Bytes of an e4m3 element, and of an element of O.
FP8_BYTES, OUT_BYTES = 1, 2
#: O's columns per 128-byte swizzle row (16-bit).
OUT_CHUNK_COLS = smem.SWIZZLE_BYTES // OUT_BYTES

_U64, _I32, _F32, _I64 = types.uint64, types.int32, types.float32, types.int64
#: The forward's parameters, then the descales: Q's (address, batch / head / query-block
#: strides, query heads per descale row), K's (address, batch / head / key-block strides), V's
#: (address, batch / head / key-block strides), in elements (block strides int32: every offset
#: into a descale array fits, `api_fp8._descale`).
ForwardFP8Params = launch.params("ForwardFP8Params", FORWARD_FIELDS + [
    ("qd_ptr", _U64), ("qd_batch", _I64), ("qd_head", _I64), ("qd_block", _I64), ("qd_ratio", _I32),
    ("kd_ptr", _U64), ("kd_batch", _I64), ("kd_head", _I64), ("kd_block", _I32),
    ("vd_ptr", _U64), ("vd_batch", _I64), ("vd_head", _I64), ("vd_block", _I32)])


class FlashForwardFP8(FlashForward):
    """One FP8 forward specialization: head dim, mask kind, O's type."""

    PARAMS = ForwardFP8Params
    DTYPES = ("e4m3",)
    # (held across the tile loop, the row was the one value the hdim-256 varlen kernel spilled)
    ROW_PER_TILE = True
    table_tiles = staticmethod(lambda head_dim, masked, long_queries=False: fp8_tiles_for(head_dim, masked))

    def __init__(self, head_dim=128, mask_kind=mask.MASK_NONE, out_dtype="bf16", tiles=None, softcap=False,
                 varlen=False):
        if out_dtype not in ("bf16", "f16"):
            raise ValueError(f"out_dtype must be bf16 or f16, got {out_dtype}")
        self._out = out_dtype
        super().__init__("e4m3", head_dim, mask_kind, FULL_SCHEDULE, tiles=tiles, softcap=softcap, varlen=varlen)
        if self.block_n % mma.WGMMA_K["e4m3"] or self.block_n % fp8_layout.KEY_GROUP:
            # (P V takes keys in k steps of 32, and V^T's key order is permuted within 32)
            raise ValueError(f"block_n {self.block_n}: the FP8 kernel takes key blocks of whole "
                             f"{mma.WGMMA_K['e4m3']}-key steps")
        if self.q_in_registers:
            raise ValueError("the FP8 kernel reads Q from shared memory")

    def _geometry(self):
        D, BM, BN = self.head_dim, self.block_m, self.block_n
        self.chunk_cols = smem.SWIZZLE_BYTES // FP8_BYTES
        if D % mma.WGMMA_K["e4m3"]:
            raise ValueError(f"head dim {D}: the FP8 GEMMs take the head dim in steps of {mma.WGMMA_K['e4m3']}")
        # (Q and K rows round up to whole 128-byte chunks, as the 16-bit kernels' D = 96: TMA
        # zero-fills the columns past D and the S GEMM's k steps stop at D)
        self.chunks = -(-D // self.chunk_cols)
        self.q_chunk = BM * smem.SWIZZLE_BYTES
        self.kv_chunk = BN * smem.SWIZZLE_BYTES
        # V^T's stage: D rows of the key block in whole 128-key chunks (a block of 192 or 224 keys
        # loads 256: TMA's 128-byte swizzle rows are whole, and P V's k steps stop at block_n)
        # (and no less than K's stage, which it is at 128 keys but for D = 64: that layout is kept)
        self.v_key_chunks = -(-BN // self.chunk_cols)
        self.v_stage = max(self.v_key_chunks * D * smem.SWIZZLE_BYTES, self.chunks * self.kv_chunk)
        self.out_dtype = self._out
        self.o_chunk_cols, self.o_chunks = OUT_CHUNK_COLS, D // OUT_CHUNK_COLS
        self.o_bytes = BM * D * OUT_BYTES
        self.pack_p = pack_e4m3
        units = softmax.exponent_units(P_OFFSET_LOG2)
        self.softmax_ops = units
        finish_units = units.finish

        @cuda.jit(device=True, forceinline=True)
        def finish(p, st, b, h):
            """1/l for O's rows (V's descales are in P already), and the LSE."""
            return finish_units(st)
        self.finish = finish

        self._scale_hooks()

    def _scale_hooks(self):
        """tile_scale, score_scale, tanh_scale: the descales enter where the scores are scaled
        first, the exponent's scale without a soft-cap, tanh's argument with one (the exponent's
        then is softcap log2 e, one per launch)."""
        SOFTCAP = self.softcap

        @cuda.jit(device=True, forceinline=True)
        def tile_scale(p, b, h, mb):
            """(the first scale, log2 e scale or scale / softcap, times Q's descale of this tile,
            the element offsets of its key head's K and V descale rows): what the per-block
            scales read.  Offsets are int32 (the host checks that every descale's fit): a tile
            keeps them live through its steps, two registers where addresses would take four,
            and a step's block offset is one 32-bit multiply-add."""
            hq, _ = udivmod32(h, p.qd_ratio)
            hk, _ = udivmod32(h, p.head_ratio)
            qd = memory.ld_global_nc_f32(p.qd_ptr + (b * p.qd_batch + hq * p.qd_head + mb * p.qd_block)
                                         * DESCALE_BYTES)
            first = p.softcap_scale if SOFTCAP else p.scale_log2
            return (first * qd, np.int32(b * p.kd_batch + hk * p.kd_head), np.int32(b * p.vd_batch + hk * p.vd_head))

        @cuda.jit(device=True, forceinline=True)
        def block_scale(p, env, nb):
            """The tile's part times K's descale of key block nb."""
            qs, kd_row, _ = env.scale
            return qs * memory.ld_global_nc_f32(p.kd_ptr + np.int32(kd_row + nb * p.kd_block) * DESCALE_BYTES)

        @cuda.jit(device=True, forceinline=True)
        def score_scale(p, env, nb):
            """c of key block nb."""
            if SOFTCAP:
                return p.scale_log2
            return block_scale(p, env, nb)

        @cuda.jit(device=True, forceinline=True)
        def value_scale(p, env, nb):
            """(log2 v, 1 / v) of V's descale v of key block nb, as `softmax.exponent_units`
            takes it.  v is clamped to MIN_V_DESCALE, where 1 / v and the row sums it scales
            stay finite (a descale is positive; a zero one would make 0 * inf)."""
            _, _, vd_row = env.scale
            vd = memory.ld_global_nc_f32(p.vd_ptr + np.int32(vd_row + nb * p.vd_block) * DESCALE_BYTES)
            vd = max(vd, MIN_V_DESCALE)
            log2_v = special.lg2(vd)
            return log2_v, special.ex2(-log2_v)

        self.tile_scale, self.tanh_scale = tile_scale, block_scale
        self.score_scale, self.value_scale = score_scale, value_scale

    @property
    def pv(self):
        """O += P V: P e4m3 from registers, V^T K-major (D rows of block_n keys)."""
        return mma.warpgroup_mma(self.head_dim, self.dtype, self.block_n, mma.REGISTERS,
                                 mma.Operand("k", self.head_dim * smem.SWIZZLE_BYTES))

    def v_loader(self):
        """A key block's V^T (D rows of block_n keys) by one TMA box per 128 keys: each box lands
        as one K-major chunk of the P V GEMM's B operand (the last one past the block where
        block_n is not a multiple of 128: those keys are never read)."""
        STAGES, STAGE_STRIDE = self.stages, self.v_stage
        STAGE_BYTES = self.v_key_chunks * self.head_dim * smem.SWIZZLE_BYTES
        MAP_V = self.MAP_V * TENSOR_MAP_BYTES
        KEY_CHUNKS, CHUNK_KEYS = self.v_key_chunks, self.chunk_cols
        CHUNK_BYTES = self.head_dim * smem.SWIZZLE_BYTES

        VARLEN = self.varlen
        varlen_start = cuda.jit(device=True, forceinline=True)(fp8_layout.varlen_start)

        @cuda.jit(device=True, forceinline=True)
        def load_v(p, sh, state, hk, key, b, seq, k_off):
            pipeline.producer_wait(sh.v_bars, STAGES, state)
            if VARLEN:
                # (the sequence's keys start at its V^T column, fp8_layout.varlen_start)
                key = key - k_off + varlen_start(k_off, seq)
            if special.elect_one():
                pipeline.producer_expect(sh.v_bars, state, STAGE_BYTES)
                for c in range(KEY_CHUNKS):
                    tma.load(sh.v + state.stage * STAGE_STRIDE + c * CHUNK_BYTES, p.maps + MAP_V,
                             (key + c * CHUNK_KEYS, 0, hk, b), pipeline.full_barrier(sh.v_bars, state.stage))
        return load_v

    def tensor_maps(self, q, k, vt, o):
        """Q, K: (D, heads, seqlen, batch) in 128-column boxes; V^T (keys, D, heads, batch) in
        boxes of 128 keys by D rows; O (16-bit) as the bf16 kernel's.  Strides in bytes."""
        b, hk, d, skp = vt.shape
        vst = tuple(x * vt.itemsize for x in (vt.strides[2], vt.strides[1], vt.strides[0]))
        v_spec = (vt.dtype, vt.ptr, (skp, d, hk, b), vst, (self.chunk_cols, d, 1, 1))
        return (bshd_spec(q, self.chunk_cols, self.block_m), bshd_spec(k, self.chunk_cols, self.block_n), v_spec,
                bshd_spec(o, OUT_CHUNK_COLS, WGMMA_M))

    def launch(self, table, lse_ptr, o, batch, heads, heads_k, sq_max, sk_max, window, softmax_scale, softcap, stream,
               descales, cu_seqlens=(0, 0), lse_strides=None, total=(0, 0)):
        """softcap: the soft-cap (0: none; the kernel's specialization must match).  descales:
        ((q address, batch, head, block strides, query heads per row), (k address, batch, head,
        block strides), (v address, batch, head, block strides)), strides in elements; with varlen a
        batch entry is a sequence.  cu_seqlens, lse_strides, total: as `FlashForward.launch`'s."""
        m_blocks = -(-sq_max // self.block_m)
        tiles = m_blocks * heads * batch
        grid = scheduler.persistent_grid(tiles, launch.sm_count())
        section, tail = 1, 0
        if self.mask_kind == mask.MASK_CAUSAL:
            section, tail = tile_scheduler.causal_order(m_blocks, heads * batch, grid, sk_max, self.head_dim,
                                                        heads // heads_k)
        if bool(softcap) != self.softcap:
            raise ValueError(f"softcap {softcap} given to a kernel built with softcap={self.softcap}")
        tanh_scale, exp_scale = softmax.softcap_scales(softmax_scale, softcap)
        st = o.strides
        o_strides = (st[0], st[1], 0) if self.varlen else (st[1], st[2], st[0])
        if lse_strides is None:
            lse_strides = (heads * sq_max, sq_max)
        stream = launch.stream_handle(stream)
        (qd, qdb, qdh, qdm, qratio), (kd, kdb, kdh, kdn), (vd, vdb, vdh, vdn) = descales
        self.launch_with(grid, stream, ForwardFP8Params(
            table, lse_ptr, scheduler.tile_counters.get(stream), o.ptr, cu_seqlens[0], cu_seqlens[1], batch, heads,
            heads // heads_k, sq_max, sk_max, total[0], total[1], m_blocks, section, tail, window[0], window[1],
            np.float32(exp_scale * softmax.LOG2E), np.float32(exp_scale), np.float32(tanh_scale),
            *o_strides, *lse_strides, 0,
            qd, qdb, qdh, qdm, qratio, kd, kdb, kdh, kdn, vd, vdb, vdh, vdn))


@functools.lru_cache(maxsize=None)
def forward_fp8_kernel(head_dim, mask_kind, out_dtype="bf16", softcap=False, varlen=False):
    return FlashForwardFP8(head_dim, mask_kind, out_dtype, softcap=softcap, varlen=varlen)
