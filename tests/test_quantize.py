"""The fused FP8 quantizer (`numba_fa3.quantize`).

Without a GPU: every specialization compiles clean, with the loads, butterflies, shuffles,
conversions and stores the design plans; the kernel's data movement emulated lane by lane in
NumPy computes `kernel_fwht`, which is the Walsh-Hadamard transform to float32 rounding (and
`fp8_model.fwht` bit for bit when its stages run in the model's order); the sign masks are the
model's signs; the NumPy twin `quantize_like_kernel` agrees with `fp8_model` (descales bit for
bit, codes within one e4m3 step where a value lies at a rounding tie) and keeps q k^T within FP8
error; the block plans; bad inputs raise before launch.

On a Hopper GPU: `quantize_fp8` against the twin bit for bit and against
`fp8_model.quantize_fp8_model` (fed the kernel's float32 rotation: descales equal, codes within
one step at ties; with its own float64 rotation: dequantized values within one e4m3 step), on
random and outlier inputs, odd lengths, GQA, clustered blocks, subnormal and zero blocks,
strided and Numba inputs, with every output poisoned (e4m3 NaN, float32 NaN) beforehand so that
each element must be written; and dequantized q k^T equal to the unrotated q k^T within FP8
error."""
import itertools
import math

import ml_dtypes
import numpy as np
import pytest

from numba_fa3 import fp8_model as fm
from numba_fa3 import quantize as qz
from numba_fa3.primitives import compile as kc

gpu = pytest.mark.gpu
LENGTHS = [1, 17, 113, 799]
BF16, F16 = np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16)
NUMPY_16 = {"bf16": BF16, "f16": F16}
#: e4m3 NaN (0x7F) and the bit pattern of -0 (0x80), which compares equal to +0.
E4M3_NAN, E4M3_NEG_ZERO = 0x7F, 0x80
#: Where the kernel's one multiply and the model's two roundings give different codes, the exact
#: quotient lies this close (relative) to the midpoint of the two codes: a few float32 ulps.
NEAR_TIE = 2.0**-21
#: The spacing of float32's subnormals.
SUBNORMAL_SPACING = 2.0**-149
#: Relative float32-against-float64 rotation error allowed (of a row's largest magnitude): the
#: butterflies' roundings, log2(D) of about 2^-24 each, with room.
ROTATION_SLACK = 2.0**-16


def _assert_clean(report, what):
    assert report["stack"] == 0, f"{what}: {report['stack']} B stack frame\n{report['log']}"
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what}: spills\n{report['log']}"
    assert not report["warnings"], f"{what}: ptxas warnings {report['warnings']}"


# --- compile-only -------------------------------------------------------------------------------

#: (rotate, scaling, (cluster, rows)) of each role at the default blocks of 128 rows.
ROLES = {
    "qk": lambda d: (True, qz.Scaling.BLOCK, qz.block_plan(128, d)),
    "v_block": lambda d: (False, qz.Scaling.BLOCK, qz.block_plan(128, d)),
    "v_amax": lambda d: (False, qz.Scaling.AMAX, (1, qz.tile_rows(d))),
    "v_head": lambda d: (False, qz.Scaling.HEAD, (1, qz.tile_rows(d))),
}
SPECIALIZATIONS = [(dt, d, role, 128) for dt, d, role in itertools.product(["bf16", "f16"], qz.HEAD_DIMS, ROLES)]
#: Blocks that need clusters of 2, 3 and 8 CTAs, besides the default block at head dim 256 (2).
CLUSTERED = [("bf16", 128, "qk", 224), ("f16", 256, "qk", 192), ("bf16", 64, "v_block", 1024)]


def _kernel(dtype, head_dim, role, block):
    rotate, scaling, (cluster, rows) = ROLES[role](head_dim)
    if scaling == qz.Scaling.BLOCK:
        cluster, rows = qz.block_plan(block, head_dim)
    return qz.QuantizeKernel(dtype, head_dim, rows, rotate, scaling, cluster)


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("dtype,head_dim,role,block", SPECIALIZATIONS + CLUSTERED)
def test_compiles_clean(dtype, head_dim, role, block):
    """No spill, stack or warning, and two CTAs fit an SM's registers and shared memory; per
    thread (D / 2 values, P = D / 16 pieces): P 16-byte loads, from the ring (one bulk copy per
    row, in the prologue and in the loop) or, without one (`RING_STAGES` 0), from global memory
    (and P of sign masks from global memory, four xors each, with the rotation);
    D / 2 log2(D) butterfly additions and subtractions, the fewest;
    D / 4 shuffles for the exchange and 5 for the warp's amax; the codes in D / 4 conversions and
    P / 2 16-byte stores, each twice (the direct and the two-step scale); the cluster barrier
    twice and one store to a peer's shared memory where a block spans CTAs."""
    kern = _kernel(dtype, head_dim, role, block)
    ptx = kern.compile_ptx()
    values = head_dim // 2
    pieces = values // qz.PIECE_ELEMENTS
    writes = kern.scaling != qz.Scaling.AMAX
    ring = kern.stages == qz.RING_STAGES[head_dim] > 0
    assert ptx.count("ld.shared.v4.b32") == (pieces if ring else 0)
    assert ptx.count("ld.global.nc.v4.b32") == (pieces if kern.rotate else 0) + (0 if ring else pieces)
    assert ptx.count("cp.async.bulk.shared::cluster.global") == (kern.stages + 1 if ring else 0)
    assert ptx.count("xor.b32") == (4 * pieces if kern.rotate else 0)
    butterflies = ptx.count("add.f32") + ptx.count("sub.f32")
    assert butterflies == (values * int(math.log2(head_dim)) if kern.rotate else 0)
    assert ptx.count("shfl.sync.bfly") == (values // 2 if writes else 0) + 5
    assert ptx.count("cvt.rn.satfinite.e4m3x2.f32") == (values if writes else 0)
    assert ptx.count("st.global.v4.b32") == (pieces if writes else 0)
    assert ("cvt.f32.f16" in ptx) == (dtype == "f16")
    clustered = kern.cluster > 1
    assert ptx.count("barrier.cluster.arrive") == ptx.count("barrier.cluster.wait") == (2 if clustered else 0)
    assert ptx.count("st.shared::cluster.f32") == (1 if clustered else 0)
    assert kern.threads * kern.cluster == qz.LANES_PER_ROW * (block if kern.scaling == qz.Scaling.BLOCK
                                                             else qz.tile_rows(head_dim))
    report = kc.ptxas_report(ptx)
    _assert_clean(report, f"quantize {dtype} d{head_dim} {role} block {block}")
    allocated = -(-report["registers"] // 8) * 8  # registers are allocated 8 per thread at a time
    assert 2 * kern.threads * allocated <= 64 * 1024, f"{report['registers']} registers: one CTA per SM"
    assert 2 * (kern.smem.bytes + SMEM_RESERVED_PER_CTA) <= SMEM_PER_SM, f"{kern.smem.bytes} B: one CTA per SM"


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("head_dim,role", list(itertools.product(qz.HEAD_DIMS, ROLES)))
def test_varlen_compiles_clean(head_dim, role):
    """The packed-sequence kernels (`quantize_fp8_varlen`): no spill, stack or warning, two CTAs
    per SM, the same loads and stores as the dense ones."""
    rotate, scaling, (cluster, rows) = ROLES[role](head_dim)
    kern = qz.QuantizeKernel("bf16", head_dim, rows, rotate, scaling, cluster, varlen=True)
    ptx = kern.compile_ptx()
    pieces = head_dim // 2 // qz.PIECE_ELEMENTS
    ring = qz.RING_STAGES[head_dim] > 0
    assert ptx.count("ld.shared.v4.b32") == (pieces if ring else 0)
    assert ptx.count("ld.global.nc.v4.b32") == (pieces if kern.rotate else 0) + (0 if ring else pieces)
    assert ptx.count("st.global.v4.b32") == (pieces if scaling != qz.Scaling.AMAX else 0)
    report = kc.ptxas_report(ptx)
    _assert_clean(report, f"quantize varlen d{head_dim} {role}")
    allocated = -(-report["registers"] // 8) * 8
    assert 2 * kern.threads * allocated <= 64 * 1024, f"{report['registers']} registers: one CTA per SM"


#: An H100's shared memory per SM, and what the driver keeps of it per resident CTA.
SMEM_PER_SM, SMEM_RESERVED_PER_CTA = 228 * 1024, 1024


VARLEN_LENS = [300, 0, 1, 129, 77, 0]


def test_varlen_twin_is_each_sequence_alone():
    """quantize_like_kernel_varlen: each sequence's codes and descales are the dense twin's of
    that sequence alone; descales past a sequence's blocks (and an empty one's head) are 1."""
    rng = np.random.default_rng(11)
    cu = np.concatenate([[0], np.cumsum(VARLEN_LENS)]).astype(np.int32)
    x = rng.standard_normal((int(cu[-1]), 3, 64)).astype(np.float32)
    for per_head in (False, True):
        x8, ds = qz.quantize_like_kernel_varlen(x, cu, 128, not per_head, 5, per_head)
        assert ds.shape == ((len(VARLEN_LENS), 3) if per_head else (len(VARLEN_LENS), 3, 3))
        for i, n in enumerate(VARLEN_LENS):
            if not n:
                assert (ds[i] == 1).all()
                continue
            want8, want = qz.quantize_like_kernel(x[None, cu[i]:cu[i + 1]], 128, not per_head, 5, per_head)
            assert np.array_equal(x8[cu[i]:cu[i + 1]].view(np.uint8), want8[0].view(np.uint8))
            if per_head:
                assert np.array_equal(ds[i], want[0])
            else:
                assert np.array_equal(ds[i, :, :want.shape[2]], want[0]) and (ds[i, :, want.shape[2]:] == 1).all()


# --- the plan -----------------------------------------------------------------------------------

def test_block_plans():
    assert [qz.max_cta_rows(d) for d in qz.HEAD_DIMS] == [128, 128, 64]
    assert qz.block_plan(128, 64) == (1, 128)
    assert qz.block_plan(128, 128) == (1, 128)
    assert qz.block_plan(128, 256) == (2, 64)
    assert qz.block_plan(224, 128) == (2, 112)
    assert qz.block_plan(192, 256) == (3, 64)
    assert qz.block_plan(16, 256) == (1, 16)
    for head_dim in qz.HEAD_DIMS:
        for block in range(16, 4096 + 1, 16):
            fits = [n for n in range(1, qz.MAX_CLUSTER + 1) if block % n == 0
                    and (block // n) % qz.ROW_QUANTUM == 0 and block // n * head_dim <= qz.MAX_CTA_VALUES
                    and block // n * qz.LANES_PER_ROW <= qz.MAX_CTA_THREADS]
            if not fits:
                with pytest.raises(ValueError):
                    qz.block_plan(block, head_dim)
                continue
            assert qz.block_plan(block, head_dim) == (fits[0], block // fits[0])  # the fewest CTAs
        assert qz.block_plan(qz.tile_rows(head_dim), head_dim) == (1, qz.tile_rows(head_dim))
    for bad in (0, -16, 8, 24, 100, 127, 8 * 64 + 16):
        with pytest.raises(ValueError):
            qz.block_plan(bad, 256)
    for not_int in (True, 128.0, "128"):
        with pytest.raises(TypeError):
            qz.block_plan(not_int, 256)
    for bad_dim in (32, 96, 192, 512):
        with pytest.raises(ValueError):
            qz.block_plan(128, bad_dim)


@pytest.mark.parametrize("head_dim", qz.HEAD_DIMS)
def test_stage_order(head_dim):
    """Every index bit once; the bits inside a piece before the piece bits (the kernel runs them in
    that order), the lane bit last (the exchange)."""
    order = qz.stage_order(head_dim)
    assert sorted(order) == list(range(int(math.log2(head_dim))))
    assert order[-1] == qz.LANE_BIT
    inside = [b for b in order if b < qz.LANE_BIT]
    assert list(order[:len(inside)]) == inside


# --- the rotation -------------------------------------------------------------------------------

def _rows(rng, n, d, outliers=True):
    x = rng.standard_normal((n, d))
    if outliers:
        x += np.where(rng.random((n, d)) < 0.01, rng.standard_normal((n, d)) * 100, 0)
    return x.astype(np.float32)


@pytest.mark.parametrize("head_dim", qz.HEAD_DIMS)
def test_kernel_fwht_is_the_transform(head_dim):
    """In the model's stage order, `fp8_model.fwht` of float32 bit for bit; in the kernel's, the
    float64 transform to float32 rounding (log2 D stages, each error at most 2^-24 of a value,
    the values at most D max|x|); applied twice, D times the identity."""
    rng = np.random.default_rng(head_dim)
    x = _rows(rng, 300, head_dim)
    stages = int(math.log2(head_dim))
    assert np.array_equal(qz.kernel_fwht(x, order=range(stages)), fm.fwht(x))
    exact = fm.fwht(x.astype(np.float64))
    got = qz.kernel_fwht(x)
    assert got.dtype == np.float32
    bound = stages * head_dim * 2.0**-24 * np.abs(x).max(axis=-1, keepdims=True)
    assert (np.abs(got - exact) <= bound).all()
    assert np.allclose(qz.kernel_fwht(got).astype(np.float64) / head_dim, x, rtol=1e-5, atol=1e-4)


def _emulate_lanes(x16, masks):
    """The kernel's data movement on rows of 16-bit values (`x16` [R, D], bf16 or fp16), lane by
    lane: lane l loads pieces 2j + l, its words xor-ed with the piece's masks (element 2w in the
    lower half of word w); the butterflies inside each piece, then across pieces; the exchange
    of the lane bit, the odd lane's second halves negated back; chunk m of lane l at elements
    16 (2m + l).  Returns float32 [R, D]: the rotated rows before the 1/sqrt(D) scale."""
    rows, d = x16.shape
    words = np.ascontiguousarray(x16).view(np.uint32).reshape(rows, d // qz.PIECE_ELEMENTS, 4)
    signed = (words ^ masks[None]).view(x16.dtype).reshape(rows, d // qz.PIECE_ELEMENTS, qz.PIECE_ELEMENTS)
    order = qz.stage_order(d)[:-1]
    lanes = []
    for lane in range(qz.LANES_PER_ROW):
        pieces = [signed[:, 2 * j + lane].astype(np.float32) for j in range(d // 16)]
        for bit in order:
            if bit < qz.LANE_BIT:   # inside each piece
                h = 1 << bit
                for j, p in enumerate(pieces):
                    q = p.copy()
                    for i in range(qz.PIECE_ELEMENTS):
                        q[:, i] = p[:, i] + p[:, i + h] if not i & h else p[:, i - h] - p[:, i]
                    pieces[j] = q
            else:                   # across pieces
                h = 1 << (bit - qz.LANE_BIT - 1)
                pieces = [pieces[j] + pieces[j + h] if not j & h else pieces[j - h] - pieces[j]
                          for j in range(len(pieces))]
        lanes.append(pieces)
    out = np.empty((rows, d), dtype=np.float32)
    for m in range(d // 32):
        for lane in range(qz.LANES_PER_ROW):
            other = lanes[1 - lane]
            kept = lanes[lane][2 * m + lane]
            got = other[2 * m + lane]     # the other lane sent its copy of the piece this lane kept
            first, second = kept + got, kept - got
            if lane:
                second = -second
            c = 16 * (2 * m + lane)
            out[:, c:c + 8], out[:, c + 8:c + 16] = first, second
    return out


@pytest.mark.parametrize("dtype,head_dim", list(itertools.product(["bf16", "f16"], qz.HEAD_DIMS)))
def test_lane_emulation_computes_kernel_fwht(dtype, head_dim):
    """The kernel's lanes, emulated (signs by xor on the loaded words, butterflies, exchange),
    give `kernel_fwht(x * signs)` bit for bit: the layout, the masks' placement and the stage
    order agree."""
    rng = np.random.default_rng(head_dim + len(dtype))
    x16 = _rows(rng, 64, head_dim).astype(NUMPY_16[dtype])
    seed = 11
    got = _emulate_lanes(x16, qz.sign_masks(head_dim, seed))
    signs = fm.rotation_signs(head_dim, seed).astype(np.float32)
    assert np.array_equal(got, qz.kernel_fwht(x16.astype(np.float32) * signs))


@pytest.mark.parametrize("head_dim", qz.HEAD_DIMS)
def test_sign_masks_are_the_model_signs(head_dim):
    masks = qz.sign_masks(head_dim, 5)
    assert masks.dtype == np.uint32 and masks.shape == (head_dim // qz.PIECE_ELEMENTS, 4)
    lower, upper = (masks >> 15) & 1, masks >> 31
    negative = np.stack((lower, upper), axis=-1).reshape(-1).astype(bool)
    assert np.array_equal(negative, fm.rotation_signs(head_dim, 5) < 0)
    assert not (masks & ~np.uint32(0x80008000)).any()


# --- the twin against the model -----------------------------------------------------------------

def _rotated(x, seed):
    """The model's input when it is fed the kernel's float32 rotation: fl(kernel_fwht(x s) c)."""
    d = x.shape[-1]
    u = qz.kernel_fwht(np.asarray(x, np.float32) * fm.rotation_signs(d, seed).astype(np.float32))
    return (u * qz.rotation_scale(d)).astype(np.float32)


def _assert_codes_near(got8, want8, exact, slack=0):
    """Equal codes, except where `exact` (the unrounded quotient) lies at a tie between the two
    different codes (within NEAR_TIE of it, and the absolute `slack`), which are then one e4m3
    step apart.  Never NaN."""
    g, w = got8.astype(np.float64), want8.astype(np.float64)
    assert not np.isnan(g).any(), "NaN codes (unwritten outputs?)"
    differ = g != w
    if differ.any():
        step = 2 * fm.e4m3_half_ulp(np.maximum(np.abs(g), np.abs(w)))[differ]
        assert (np.abs(g - w)[differ] <= step).all(), "codes more than one e4m3 step apart"
        mid = (g + w)[differ] / 2
        off = np.abs(exact[differ] - mid)
        near = NEAR_TIE * np.abs(exact[differ]) + np.broadcast_to(slack, g.shape)[differ]
        assert (off <= near).all(), f"codes differ away from a tie: {off.max()}"


def _per_row(descale, s, block):
    """[B, H, n] or [B, H] descales as one per row, [B, S, H] (float64)."""
    d = np.asarray(descale, np.float64)
    rows = np.repeat(d, block, axis=-1)[..., :s] if d.ndim == 3 else np.repeat(d[..., None], s, axis=-1)
    return rows.transpose(0, 2, 1)


def _check_against_fed_model(x, x8, descale, block, rotate, seed, per_head=False):
    """Kernel or twin results against `fp8_model` fed the kernel's rotation: descales equal, codes
    near (`_assert_codes_near`)."""
    r = _rotated(x, seed) if rotate else np.asarray(x, np.float32)
    m8, mds = fm.quantize_per_head(r) if per_head else fm.quantize_blocks(r, block)
    np.testing.assert_array_equal(descale, mds)
    rows = _per_row(mds, r.shape[1], block)[..., None]
    # The model's input r = fl(u c) rounds to 2^-149 where it is subnormal, which the kernel's
    # fl(u fl(c / descale)) does not: that much more room, in code units.
    _assert_codes_near(x8, m8, r.astype(np.float64) / rows, SUBNORMAL_SPACING / rows)


def _inputs(rng, b, s, h, d, dtype, outliers=False, seed=0):
    if outliers:
        return [a[:, :s, :h].astype(NUMPY_16[dtype]) for a in fm.outlier_inputs(b, s, h, d, seed)]
    return [rng.standard_normal((b, s, h, d)).astype(NUMPY_16[dtype]) for _ in range(3)]


@pytest.mark.parametrize("head_dim,seqlen", list(itertools.product(qz.HEAD_DIMS, LENGTHS)))
def test_twin_agrees_with_model(head_dim, seqlen):
    rng = np.random.default_rng(seqlen)
    for dtype, outliers in (("bf16", False), ("f16", True)):
        x = _inputs(rng, 2, seqlen, 3, head_dim, dtype, outliers, seqlen)[0].astype(np.float32)
        for block, rotate in ((128, True), (64, True), (128, False)):
            x8, ds = qz.quantize_like_kernel(x, block, rotate, 3)
            assert x8.dtype == fm.E4M3 and x8.shape == x.shape and ds.shape == (2, 3, -(-seqlen // block))
            _check_against_fed_model(x, x8, ds, block, rotate, 3)
        x8, ds = qz.quantize_like_kernel(x, rotate=False, per_head=True)
        assert ds.shape == (2, 3)
        _check_against_fed_model(x, x8, ds, None, False, 0, per_head=True)


def test_twin_tiny_and_zero_blocks():
    """A block of subnormal bf16 values takes the two-step scale (c / descale overflows float32)
    and still agrees with the model; an all-zero block gets descale 1 and zero codes."""
    rng = np.random.default_rng(1)
    d = 128
    x = rng.standard_normal((1, 256, 2, d)).astype(np.float32)
    x[:, :128, 0] = (rng.standard_normal((128, d)) * 1e-39).astype(BF16).astype(np.float32)
    x[:, 128:, 1] = 0
    assert np.abs(x[:, :128, 0]).max() < np.finfo(np.float32).tiny  # subnormal
    for rotate in (True, False):
        x8, ds = qz.quantize_like_kernel(x, 128, rotate, 2)
        c = qz.rotation_scale(d) if rotate else np.float32(1)
        with np.errstate(over="ignore"):
            assert not np.isfinite(c / ds[0, 0, 0])
        assert ds[0, 1, 1] == 1 and not x8[:, 128:, 1].astype(np.float32).any()
        _check_against_fed_model(x, x8, ds, 128, rotate, 2)


def _assert_dot_products(q, k, q8, k8, dq, dk, block_m, block_n, seed):
    """Dequantized q8 k8^T against the unrotated q k^T (float64): within
    |q~ k~ - q k| <= ||h_q|| ||k~|| + ||q M|| ||h_k|| per pair of rows, h the per-element bound of
    |x~ - x M| (half an e4m3 step of the code times the descale, and the float32 rotation's
    error); GQA query head i against key head i // (H // Hk)."""
    def side(x, x8, ds, block):
        deq = fm.dequantize(x8, ds, block=block)
        rot = fm.rotate(x, seed)
        rows = _per_row(ds, x.shape[1], block)[..., None]
        h = fm.e4m3_half_ulp(x8.astype(np.float64)) * rows
        h = h + ROTATION_SLACK * np.abs(rot).max(axis=-1, keepdims=True)
        assert (np.abs(deq - rot) <= h).all()
        return deq, rot, h

    qd, qm, hq = side(np.asarray(q, np.float64), q8, dq, block_m)
    kd, km, hk = side(np.asarray(k, np.float64), k8, dk, block_n)
    group = q.shape[2] // k.shape[2]
    kd, km, hk = (np.repeat(a, group, axis=2) for a in (kd, km, hk))
    kq = np.repeat(np.asarray(k, np.float64), group, axis=2)
    exact = np.einsum("bshd,bthd->bhst", np.asarray(q, np.float64), kq)
    got = np.einsum("bshd,bthd->bhst", qd, kd)
    norm = lambda a: np.linalg.norm(a, axis=-1).transpose(0, 2, 1)  # noqa: E731  [B, H, S]
    bound = norm(hq)[..., :, None] * norm(kd)[..., None, :] + norm(qm)[..., :, None] * norm(hk)[..., None, :]
    bound += 1e-12 * norm(np.asarray(q, np.float64))[..., :, None] * norm(kq)[..., None, :]
    assert (np.abs(got - exact) <= bound).all()


def test_twin_keeps_dot_products():
    q, k, v = fm.outlier_inputs(1, 300, 4, 128, 9)
    k, v = k[:, :, :2], v[:, :, :2]
    q, k = (a.astype(BF16).astype(np.float64) for a in (q, k))
    q8, k8, _, dq, dk, _ = qz.quantize_fp8_like_kernel(q, k, v, seed=9, block_n=64)
    _assert_dot_products(q, k, q8, k8, dq, dk, 128, 64, 9)


def test_bytes_moved():
    q, kv = (2, 100, 8, 128), (2, 300, 2, 128)
    values = 2 * 100 * 8 * 128 + 2 * 2 * 300 * 2 * 128
    descales = 2 * 8 * 1 + 2 * 2 * 3
    assert qz.bytes_moved(q, kv) == values * 3 + (descales + 2 * 2) * 4
    assert qz.bytes_moved(q, kv, v_granularity="block") == values * 3 + (descales + 2 * 2 * 3) * 4


# --- bad inputs ---------------------------------------------------------------------------------

class FakeDeviceArray:
    """A `__cuda_array_interface__` exporter of an fp16 array at any address (never read)."""

    def __init__(self, shape, ptr=1 << 20, strides=None):
        self.__cuda_array_interface__ = {
            "shape": tuple(shape), "typestr": "<f2", "data": (ptr, False), "version": 3,
            "strides": None if strides is None else tuple(2 * s for s in strides)}


def _np(shape, dtype=BF16):
    return np.zeros(shape, dtype=dtype)


@pytest.mark.parametrize("change,error", [
    (dict(q=_np((1, 8, 2, 96)), k=_np((1, 8, 2, 96)), v=_np((1, 8, 2, 96))), ValueError),   # head dim
    (dict(q=_np((1, 8, 2, 32)), k=_np((1, 8, 2, 32)), v=_np((1, 8, 2, 32))), ValueError),
    (dict(q=_np((8, 2, 64))), ValueError),                                                # rank
    (dict(q=_np((1, 8, 2, 64), np.float32)), TypeError),                                  # dtype
    (dict(k=_np((1, 8, 2, 64), np.float16)), TypeError),                                  # mixed
    (dict(k=_np((1, 8, 3, 64)), v=_np((1, 8, 3, 64))), ValueError),                       # Hk | H
    (dict(v=_np((1, 9, 2, 64))), ValueError),                                             # k != v
    (dict(k=_np((2, 8, 2, 64)), v=_np((2, 8, 2, 64))), ValueError),                       # batch
    (dict(k=_np((1, 8, 2, 128)), v=_np((1, 8, 2, 128))), ValueError),                     # head dims
    (dict(q=_np((1, 0, 2, 64))), ValueError),                                             # empty
    (dict(block_m=100), ValueError), (dict(block_n=0), ValueError), (dict(block_m=8), ValueError),
    (dict(v_granularity="tensor"), ValueError), (dict(seed=-1), ValueError), (dict(seed=1.5), TypeError),
    (dict(seed=True), TypeError), (dict(block_m=128.0), TypeError),
    (dict(), TypeError),                                                                  # NumPy inputs
])
def test_bad_inputs_raise(change, error):
    args = dict(q=_np((1, 8, 2, 64)), k=_np((1, 8, 2, 64)), v=_np((1, 8, 2, 64)))
    args.update(change)
    with pytest.raises(error):
        qz.quantize_fp8(**args)


@pytest.mark.parametrize("which,fake", [
    ("q", FakeDeviceArray((1, 8, 2, 64), ptr=(1 << 20) + 2)),                      # misaligned base
    ("k", FakeDeviceArray((1, 8, 2, 64), strides=(8 * 2 * 64, 2 * 64, 64, 2))),     # head dim strided
    ("v", FakeDeviceArray((1, 8, 2, 64), strides=(8 * 2 * 68, 2 * 68, 68, 1))),     # 136-byte heads
])
def test_unaligned_gpu_inputs_raise(which, fake):
    args = {n: FakeDeviceArray((1, 8, 2, 64)) for n in "qkv"}
    args[which] = fake
    with pytest.raises(ValueError, match=which):
        qz.quantize_fp8(**args)


# --- GPU ----------------------------------------------------------------------------------------

def _torch():
    return pytest.importorskip("torch")


def _to_torch(a):
    torch = _torch()
    t = torch.from_numpy(np.ascontiguousarray(a).view(np.uint16)).cuda()
    return t.view(torch.bfloat16 if a.dtype == BF16 else torch.float16)


def _codes(t):
    """e4m3 codes of a torch float8_e4m3fn tensor or a Numba uint8 device array, -0 as +0."""
    bits = t.view(_torch().uint8).cpu().numpy() if hasattr(t, "data_ptr") else t.copy_to_host()
    bits = np.where(bits == E4M3_NEG_ZERO, 0, bits).astype(np.uint8)
    return bits.view(fm.E4M3)


def _host(t):
    return t.cpu().numpy() if hasattr(t, "data_ptr") else t.copy_to_host()


def _shapes(q, k, block_m, block_n, v_granularity):
    b, s, h, _ = q.shape
    sk, hk = k.shape[1], k.shape[2]
    tn = -(-sk // block_n)
    v = (b, hk) if v_granularity == "head" else (b, hk, tn)
    return q.shape, k.shape, k.shape, (b, h, -(-s // block_m)), (b, hk, tn), v


def _quantize_on_gpu(q, k, v, poison=True, **kw):
    """quantize_fp8 of NumPy q, k, v as torch CUDA tensors, into outputs poisoned with NaN
    (e4m3 0x7F, float32 NaN) or new ones; returns NumPy codes (-0 as +0) and descales."""
    torch = _torch()
    shapes = _shapes(q, k, kw.get("block_m", 128), kw.get("block_n", 128), kw.get("v_granularity", "head"))
    out = None
    if poison:
        out = tuple(torch.full(s, E4M3_NAN, dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
                    for s in shapes[:3])
        out += tuple(torch.full(s, float("nan"), dtype=torch.float32, device="cuda") for s in shapes[3:])
    res = qz.quantize_fp8(_to_torch(q), _to_torch(k), _to_torch(v), out=out, **kw)
    if poison:
        assert all(r is o for r, o in zip(res, out))
    assert res[0].dtype == torch.float8_e4m3fn and res[3].dtype == torch.float32
    assert [tuple(r.shape) for r in res] == [tuple(s) for s in shapes]
    torch.cuda.synchronize()
    return tuple(_codes(r) for r in res[:3]) + tuple(_host(r) for r in res[3:])


def _assert_same(got, want):
    """Kernel results equal to the twin's bit for bit (codes with -0 as +0)."""
    for g, w, name in zip(got, want, ("q8", "k8", "v8", "q_descale", "k_descale", "v_descale")):
        if name.endswith("8"):
            w = np.where(w.view(np.uint8) == E4M3_NEG_ZERO, 0, w.view(np.uint8)).astype(np.uint8)
            assert np.array_equal(g.view(np.uint8), w), f"{name} differs from the twin"
        else:
            assert np.array_equal(g.view(np.uint32), np.asarray(w, np.float32).view(np.uint32)), \
                f"{name} differs from the twin"


def _assert_near_float64_model(x, x8, ds, m8, mds, block):
    """Against the model's float64 rotation: descales to float32 and rotation rounding, dequantized
    values within one e4m3 step (at the larger code, of the larger descale) plus the descales'
    difference."""
    np.testing.assert_allclose(ds, mds, rtol=ROTATION_SLACK)
    rows, mrows = _per_row(ds, x.shape[1], block)[..., None], _per_row(mds, x.shape[1], block)[..., None]
    g, w = x8.astype(np.float64), m8.astype(np.float64)
    step = 2 * fm.e4m3_half_ulp(np.maximum(np.abs(g), np.abs(w))) * np.maximum(rows, mrows)
    assert (np.abs(g * rows - w * mrows) <= step + np.abs(w) * np.abs(rows - mrows) * (1 + 1e-9)).all()


def _check_all(q, k, v, got, hadamard=True, seed=0, block_m=128, block_n=128, v_granularity="head"):
    kw = dict(hadamard=hadamard, seed=seed, block_m=block_m, block_n=block_n, v_granularity=v_granularity)
    q32, k32, v32 = (np.asarray(a, np.float32) for a in (q, k, v))
    _assert_same(got, qz.quantize_fp8_like_kernel(q32, k32, v32, **kw))
    q8, k8, v8, dq, dk, dv = got
    per_head = v_granularity == "head"
    _check_against_fed_model(q32, q8, dq, block_m, hadamard, seed)
    _check_against_fed_model(k32, k8, dk, block_n, hadamard, seed)
    _check_against_fed_model(v32, v8, dv, block_n, False, seed, per_head=per_head)
    model = fm.quantize_fp8_model(q32, k32, v32, hadamard=hadamard, seed=seed, block_m=block_m,
                                  block_n=block_n, granularity="block", v_granularity=v_granularity)
    _assert_near_float64_model(q32, q8, dq, model[0], model[3], block_m)
    _assert_near_float64_model(k32, k8, dk, model[1], model[4], block_n)


#: (dtype, head dim, seqlen_q, seqlen_k, heads, key heads, v_granularity): every length as the
#: query's and the key's, GQA and MQA, both V granularities.
GPU_CASES = [(dt, d, sq, sk, h, hk, vg)
             for (dt, d), (sq, sk), (h, hk), vg in zip(
                 itertools.cycle(itertools.product(["bf16", "f16"], qz.HEAD_DIMS)),
                 [(a, b) for a in LENGTHS for b in LENGTHS],
                 itertools.cycle([(4, 2), (2, 2), (4, 1)]),
                 itertools.cycle(["head", "block"]))]


@gpu
@pytest.mark.parametrize("dtype,head_dim,sq,sk,h,hk,v_granularity", GPU_CASES)
def test_gpu_random_inputs(dtype, head_dim, sq, sk, h, hk, v_granularity):
    rng = np.random.default_rng(sq * 1000 + sk)
    q = rng.standard_normal((2, sq, h, head_dim)).astype(NUMPY_16[dtype])
    k, v = (rng.standard_normal((2, sk, hk, head_dim)).astype(NUMPY_16[dtype]) for _ in range(2))
    seed = sq + sk
    got = _quantize_on_gpu(q, k, v, seed=seed, v_granularity=v_granularity)
    _check_all(q, k, v, got, seed=seed, v_granularity=v_granularity)
    again = _quantize_on_gpu(q, k, v, poison=False, seed=seed, v_granularity=v_granularity)
    for a, b in zip(got, again):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


@gpu
@pytest.mark.parametrize("dtype,head_dim", list(itertools.product(["bf16", "f16"], qz.HEAD_DIMS)))
def test_gpu_outlier_inputs(dtype, head_dim):
    q, k, v = (a.astype(NUMPY_16[dtype]) for a in fm.outlier_inputs(2, 799, 2, head_dim, head_dim))
    for hadamard in (True, False):
        got = _quantize_on_gpu(q, k, v, hadamard=hadamard, seed=4, block_n=64, v_granularity="block")
        _check_all(q, k, v, got, hadamard=hadamard, seed=4, block_n=64, v_granularity="block")


@gpu
@pytest.mark.parametrize("head_dim,block_m,block_n", [(128, 224, 64), (256, 192, 128), (64, 1024, 16), (256, 16, 512)])
def test_gpu_clustered_and_small_blocks(head_dim, block_m, block_n):
    """Blocks split over clusters of 2 and 3 CTAs (their amax through distributed shared memory)
    and blocks of one warp's rows."""
    rng = np.random.default_rng(head_dim)
    q, k, v = _inputs(rng, 1, 1111, 2, head_dim, "bf16", outliers=True, seed=1)
    kw = dict(block_m=block_m, block_n=block_n, v_granularity="block")
    _check_all(q, k, v, _quantize_on_gpu(q, k, v, **kw), **kw)


@gpu
@pytest.mark.parametrize("head_dim", qz.HEAD_DIMS)
@pytest.mark.parametrize("stages", [0, 1, 2, 3])
def test_gpu_ring_depths_agree_with_the_twin(head_dim, stages, monkeypatch):
    """Every ring depth, none included, gives the twin's results bit for bit, packed sequences
    (empty and 1-row ones) and a clustered block too: the table's choice is speed only.  More
    blocks than resident CTAs, so that each CTA takes several and the ring wraps."""
    torch = _torch()
    monkeypatch.setitem(qz.RING_STAGES, head_dim, stages)
    rng = np.random.default_rng(stages)
    q, k, v = _inputs(rng, 2, 2500, 8, head_dim, "bf16", outliers=True, seed=2)
    kw = dict(block_m=224, block_n=128, v_granularity="block")
    _check_all(q, k, v, _quantize_on_gpu(q, k, v, **kw), **kw)
    cu = np.concatenate([[0], np.cumsum(VARLEN_LENS)]).astype(np.int32)
    x = rng.standard_normal((int(cu[-1]), 3, head_dim)).astype(BF16)
    res = qz.quantize_fp8_varlen(_to_torch(x), _to_torch(x), _to_torch(x), torch.from_numpy(cu).cuda(),
                                 torch.from_numpy(cu).cuda(), max(VARLEN_LENS), max(VARLEN_LENS), seed=5,
                                 v_granularity="head")
    torch.cuda.synchronize()
    got = tuple(_codes(r) for r in res[:3]) + tuple(_host(r) for r in res[3:])
    x8, dx = qz.quantize_like_kernel_varlen(x, cu, 128, True, 5)
    v8, dv = qz.quantize_like_kernel_varlen(x, cu, 128, False, 5, per_head=True)
    _assert_same(got, (x8, x8, v8, dx, dx, dv))


@gpu
@pytest.mark.parametrize("head_dim,v_granularity", [(64, "head"), (128, "block"), (256, "head")])
def test_gpu_varlen(head_dim, v_granularity):
    """quantize_fp8_varlen: the twin's codes and descales bit for bit (-0 as +0), empty and
    1-row sequences, GQA."""
    torch = _torch()
    rng = np.random.default_rng(head_dim)
    cu = np.concatenate([[0], np.cumsum(VARLEN_LENS)]).astype(np.int32)
    cuk = np.concatenate([[0], np.cumsum(VARLEN_LENS[::-1])]).astype(np.int32)
    q = rng.standard_normal((int(cu[-1]), 4, head_dim)).astype(BF16)
    k, v = (rng.standard_normal((int(cuk[-1]), 2, head_dim)).astype(BF16) for _ in range(2))
    mq = mk = max(VARLEN_LENS)
    res = qz.quantize_fp8_varlen(_to_torch(q), _to_torch(k), _to_torch(v), torch.from_numpy(cu).cuda(),
                                 torch.from_numpy(cuk).cuda(), mq, mk, seed=3, block_m=128, block_n=128,
                                 v_granularity=v_granularity)
    torch.cuda.synchronize()
    got = tuple(_codes(r) for r in res[:3]) + tuple(_host(r) for r in res[3:])
    q8, dq = qz.quantize_like_kernel_varlen(q, cu, 128, True, 3)
    k8, dk = qz.quantize_like_kernel_varlen(k, cuk, 128, True, 3)
    v8, dv = qz.quantize_like_kernel_varlen(v, cuk, 128, False, 3, per_head=v_granularity == "head")
    _assert_same(got, (q8, k8, v8, dq, dk, dv))


@gpu
def test_gpu_tiny_and_zero_blocks():
    """Subnormal bf16 blocks (the two-step scale) and all-zero blocks (descale 1)."""
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 300, 2, 128)).astype(np.float32) for _ in range(3))
    for x in (q, k, v):
        x[:, :128, 0] *= 1e-39
        x[:, 128:256, 1] = 0
    q, k, v = (x.astype(BF16) for x in (q, k, v))
    for vg in ("head", "block"):
        got = _quantize_on_gpu(q, k, v, v_granularity=vg)
        _check_all(q, k, v, got, v_granularity=vg)
        assert got[3][0, 1, 1] == 1 and got[4][0, 1, 1] == 1


@gpu
def test_gpu_strided_and_numba_inputs():
    """Inputs that are head slices of wider tensors (strided rows), and Numba device arrays
    (uint8 codes back) give the contiguous inputs' results."""
    torch = _torch()
    from numba import cuda
    rng = np.random.default_rng(3)
    wide = rng.standard_normal((2, 113, 6, 64)).astype(F16)
    q, k, v = wide[:, :, :4], wide[:, :, 4:5], wide[:, :, 5:]
    want = _quantize_on_gpu(q, k, v)
    tw = _to_torch(wide)
    res = qz.quantize_fp8(tw[:, :, :4], tw[:, :, 4:5], tw[:, :, 5:])
    torch.cuda.synchronize()
    _assert_same(tuple(_codes(r) for r in res[:3]) + tuple(_host(r) for r in res[3:]), want)
    dq, dk, dv = (cuda.to_device(np.ascontiguousarray(a)) for a in (q, k, v))
    res = qz.quantize_fp8(dq, dk, dv)
    cuda.synchronize()
    assert res[0].dtype == np.uint8 and res[3].dtype == np.float32
    _assert_same(tuple(_codes(r) for r in res[:3]) + tuple(_host(r) for r in res[3:]), want)


@gpu
def test_gpu_out_is_checked():
    torch = _torch()
    q = k = v = _to_torch(np.zeros((1, 16, 2, 64), BF16))
    good = [torch.empty(s, dtype=torch.float8_e4m3fn if i < 3 else torch.float32, device="cuda")
            for i, s in enumerate(_shapes(q, k, 128, 128, "head"))]
    for i, bad in ((0, torch.empty((1, 16, 2, 64), dtype=torch.float16, device="cuda")),
                   (3, torch.empty((1, 2, 2), dtype=torch.float32, device="cuda")),
                   (5, torch.empty((1, 2, 1), dtype=torch.float32, device="cuda"))):
        out = list(good)
        out[i] = bad
        with pytest.raises(ValueError):
            qz.quantize_fp8(q, k, v, out=out)
    with pytest.raises(ValueError):
        qz.quantize_fp8(q, k, v, out=good[:5])


@gpu
@pytest.mark.parametrize("head_dim", qz.HEAD_DIMS)
def test_gpu_rotation_keeps_dot_products(head_dim):
    q, k, v = (a.astype(BF16) for a in fm.outlier_inputs(1, 257, 4, head_dim, 6))
    k, v = k[:, :, :2], v[:, :, :2]
    q8, k8, _, dq, dk, _ = _quantize_on_gpu(q, k, v, seed=6, block_n=64)
    _assert_dot_products(q.astype(np.float64), k.astype(np.float64), q8, k8, dq, dk, 128, 64, 6)
