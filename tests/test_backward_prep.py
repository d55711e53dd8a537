"""The backward's preprocess and postprocess kernels (`numba_fa3.backward_prep`).

Without a GPU: every specialization compiles clean with the accesses the row tiling plans; the
varlen padding gives each sequence whole blocks of rows of its own; bad arguments raise before
launch.  On a Hopper GPU: both kernels against a NumPy model of the workspace, on strided inputs,
odd lengths and varlen batches with empty and 1-token sequences, with every output poisoned (NaN)
beforehand so that each element must be written, and the bytes around strided outputs checked
untouched."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from numba_fa3 import backward_prep as bp
from numba_fa3.primitives import compile as kc
from numba_fa3.primitives.tensors import NUMPY_DTYPES, TensorInfo
from numba_fa3.softmax import LOG2E
from numba_fa3.tiles import SUPPORTED_HEAD_DIMS

gpu = pytest.mark.gpu
LENGTHS = [1, 17, 113, 799]
VARLEN_BATCHES = [[0, 1, 17, 0, 113, 64, 1], [799], [1], [0, 0, 5], [128, 0, 129, 63], [0, 0]]
BLOCKS = [64, 128]
#: 16-bit elements of padding after each row of a strided tensor: 16 bytes, keeping the rows'
#: alignment.
ROW_PAD = 8
NAN_BITS16 = np.uint16(0x7FFF)   # a NaN in both bf16 and fp16


def _assert_clean(report, what):
    assert report["stack"] == 0, f"{what}: {report['stack']} B stack frame\n{report['log']}"
    assert report["spill_stores"] == 0 and report["spill_loads"] == 0, f"{what}: spills\n{report['log']}"
    assert not report["warnings"], f"{what}: ptxas warnings {report['warnings']}"


# --- compile-only -------------------------------------------------------------------------------

SPECIALIZATIONS = list(itertools.product(["bf16", "f16"], SUPPORTED_HEAD_DIMS, [False, True]))


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("dtype,head_dim,varlen", SPECIALIZATIONS)
def test_preprocess_compiles_clean(dtype, head_dim, varlen):
    """No spill, stack or warning; per lane, two 16-byte loads (dO, O) per piece of each row
    group and the unit's dq_accum zeroed in 16-byte stores; the row's lanes summed by shuffles."""
    kern = bp.BackwardPreprocess(dtype, head_dim, varlen)
    t = kern.tiling
    ptx = kern.compile_ptx()
    assert ptx.count("ld.global.nc.v4.b32") == 2 * t.pieces_per_lane * t.groups
    assert ptx.count("st.global.v4.b32") == 2 * t.pieces_per_lane * t.groups
    assert ptx.count("shfl.sync.bfly") == t.groups * int(math.log2(t.lanes_per_row))
    assert ("cvt.f32.f16" in ptx) == (dtype == "f16")
    assert ("ld.global.s32" in ptx) == varlen  # cu_seqlens
    _assert_clean(kc.ptxas_report(ptx), f"preprocess {dtype} d{head_dim} varlen={varlen}")


@pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")
@pytest.mark.parametrize("dtype,head_dim,varlen", SPECIALIZATIONS)
def test_postprocess_compiles_clean(dtype, head_dim, varlen):
    """No spill, stack or warning; per 16-byte dQ piece, two 16-byte float32 loads, four
    round-to-nearest-even conversions and one 16-byte store."""
    kern = bp.BackwardPostprocess(dtype, head_dim, varlen)
    t = kern.tiling
    pieces = t.pieces_per_lane * t.groups
    ptx = kern.compile_ptx()
    assert ptx.count("ld.global.nc.v4.f32") == 2 * pieces
    assert ptx.count(f"cvt.rn.{dtype}x2.f32") == 4 * pieces
    assert ptx.count("st.global.v4.b32") == pieces
    _assert_clean(kc.ptxas_report(ptx), f"postprocess {dtype} d{head_dim} varlen={varlen}")


@pytest.mark.parametrize("head_dim", SUPPORTED_HEAD_DIMS)
def test_row_tiling_covers_rows_in_whole_sectors(head_dim):
    """A row's pieces are split evenly over a power of two of lanes (so each warp access is whole
    32-byte sectors), a warp's row groups fill it, and a unit divides the usual query blocks."""
    t = bp.RowTiling(head_dim)
    assert t.lanes_per_row * t.pieces_per_lane * bp.PIECE_ELEMENTS == head_dim
    assert t.lanes_per_row & (t.lanes_per_row - 1) == 0
    assert t.lanes_per_row * bp.PIECE_BYTES % 32 == 0
    assert t.rows_per_group * t.lanes_per_row == bp.WARP
    assert t.unit_rows == t.rows_per_group * t.groups
    for block_m in (64, 80, 128):
        t.check_block(block_m)


# --- the varlen padding -------------------------------------------------------------------------

def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _varlen_rows(lengths, block_m):
    """(T_pad, rows): the row within a head of each token (the layout of the module docstring)."""
    cu = _cu(lengths)
    rows = np.empty(cu[-1], dtype=np.int64)
    for b in range(len(lengths)):
        rows[cu[b]:cu[b + 1]] = bp.padded_offset(cu[b], b, block_m) + np.arange(lengths[b])
    return bp.padded_total(cu[-1], len(lengths), block_m), rows


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 700)), min_size=1, max_size=16),
       block_m=st.sampled_from([16, 64, 80, 128, 176]))
def test_varlen_padding_gives_each_sequence_whole_blocks(lengths, block_m):
    """Each sequence starts on a block and has ceil(len / block_m) whole blocks before the next
    sequence's start, the last one inside T_pad; so token rows are distinct, and the sequence
    that owns a block (the kernels' rule: the last b with cu[b] // block_m + b <= block) is the
    token's own."""
    cu = _cu(lengths)
    batch = len(lengths)
    t_pad, rows = _varlen_rows(lengths, block_m)
    starts = [bp.padded_offset(cu[b], b, block_m) for b in range(batch + 1)]
    assert t_pad % block_m == 0
    for b in range(batch):
        assert starts[b] % block_m == 0
        end = starts[b] + -(-lengths[b] // block_m) * block_m
        assert end <= (starts[b + 1] if b + 1 < batch else t_pad)
    assert starts[batch] < t_pad  # the padding after the last sequence is inside T_pad too
    assert len(np.unique(rows)) == len(rows) and (rows < t_pad).all()
    first_blocks = cu // block_m + np.arange(batch + 1)   # J(b), rising
    assert (np.diff(first_blocks) >= 1).all()
    owner = np.searchsorted(first_blocks, rows // block_m, side="right") - 1
    assert np.array_equal(owner, np.repeat(np.arange(batch), lengths))


def test_varlen_padding_examples():
    """Hand-checked: block 64, lengths 0, 1, 64, 65: starts 0, 64, 128, 256; T_pad (130 // 64 +
    4 + 1) * 64 = 448."""
    t_pad, rows = _varlen_rows([0, 1, 64, 65], 64)
    assert t_pad == 448
    assert rows[0] == 64 and rows[1] == 128 and rows[64] == 191 and rows[65] == 256 and rows[-1] == 320


def test_workspace_layouts():
    dense = bp.workspace_layout(2, 3, 128, 64, seqlen_q=113)
    assert dense == bp.WorkspaceLayout((2, 3, 128), (2, 3, 128, 128), 2 * 3 * 128, 3 * 128, 128, False)
    packed = bp.workspace_layout(4, 3, 64, 128, total_q=300)
    t_pad = (300 // 128 + 4 + 1) * 128
    assert packed == bp.WorkspaceLayout((3, t_pad), (3, t_pad, 64), 3 * t_pad, 0, t_pad, True)
    with pytest.raises(ValueError, match="int32"):
        bp.workspace_layout(1 << 16, 1 << 10, 64, 64, seqlen_q=1 << 10)


# --- argument checks (all before any GPU work) ----------------------------------------------------

def _fake_ws(layout):
    return bp.Workspace(None, None, None, layout.rows, layout.batch_stride, layout.head_stride, layout.varlen)


def _fake(shape, dtype="bf16", strides=None, ptr=1 << 20):
    strides = strides or tuple(int(np.prod(shape[i + 1:])) for i in range(len(shape)))
    return TensorInfo(ptr, tuple(shape), tuple(strides), dtype, "cai", None)


def test_preprocess_rejects_bad_arguments():
    b, s, h, d, bm = 2, 100, 3, 64, 64
    ws = _fake_ws(bp.workspace_layout(b, h, d, bm, seqlen_q=s))
    x, lse = _fake((b, s, h, d)), _fake((b, h, s), "f32")
    with pytest.raises(ValueError, match="multiple of 16"):
        bp.preprocess(_fake_ws(bp.workspace_layout(b, h, d, 72, seqlen_q=s)), x, x, lse, b, h, d, 72, s, 0)
    with pytest.raises(ValueError, match="16-byte"):
        bp.preprocess(ws, _fake((b, s, h, d), strides=(s * h * 68, h * 68, 68, 1)), x, lse, b, h, d, bm, s, 0)
    with pytest.raises(ValueError, match="16-byte"):
        bp.preprocess(ws, x, _fake((b, s, h, d), ptr=(1 << 20) + 2), lse, b, h, d, bm, s, 0)
    with pytest.raises(ValueError, match="contiguous"):
        bp.preprocess(ws, x, _fake((b, s, h, d), strides=(s * h * d, h * d, d, 2)), lse, b, h, d, bm, s, 0)
    with pytest.raises(TypeError, match="one dtype"):
        bp.preprocess(ws, x, _fake((b, s, h, d), "f16"), lse, b, h, d, bm, s, 0)
    with pytest.raises(ValueError, match="lse"):
        bp.preprocess(ws, x, x, _fake((b, h, s), "bf16"), b, h, d, bm, s, 0)
    with pytest.raises(ValueError, match="workspace"):  # Sq_pad 256, not the workspace's 128
        bp.preprocess(ws, x, x, lse, b, h, d, 256, s, 0)
    vws = _fake_ws(bp.workspace_layout(b, h, d, bm, total_q=s))
    with pytest.raises(ValueError, match="cu_seqlens"):
        bp.preprocess(vws, _fake((s, h, d)), _fake((s, h, d)), _fake((h, s), "f32"), b, h, d, bm, 0, 0, total_q=s)


def test_postprocess_rejects_bad_arguments():
    b, s, h, d, bm = 1, 17, 2, 96, 64
    ws = _fake_ws(bp.workspace_layout(b, h, d, bm, seqlen_q=s))
    with pytest.raises(ValueError, match="must be"):
        bp.postprocess(ws, _fake((b, s + 1, h, d)), b, h, d, bm, s, 1.0, 0)
    with pytest.raises(TypeError, match="bf16 or fp16"):
        bp.postprocess(ws, _fake((b, s, h, d), "f32"), b, h, d, bm, s, 1.0, 0)
    with pytest.raises(ValueError, match="16-byte"):
        bp.postprocess(ws, _fake((b, s, h, d), strides=(s * h * 100, h * 100, 100, 1)), b, h, d, bm, s, 1.0, 0)


# --- on the GPU -----------------------------------------------------------------------------------

def _rng_halves(rng, shape, dtype):
    return rng.standard_normal(shape).astype(NUMPY_DTYPES[dtype])


class Strided:
    """A 16-bit `[.., rows, D]` tensor on the GPU inside a larger buffer: its axes permuted by
    `order` in memory and ROW_PAD elements after each row, the rest of the buffer NaN."""

    def __init__(self, shape, dtype, order):
        self.shape, self.dtype, self.order = tuple(shape), dtype, tuple(order)
        mem_shape = tuple(shape[i] for i in order[:-1]) + (shape[-1] + ROW_PAD,)
        self.host = np.full(mem_shape, NAN_BITS16, dtype=np.uint16)
        self.dev = _to_device(self.host)

    def view(self, buf):
        inverse = np.argsort(self.order)
        return buf[..., :self.shape[-1]].transpose(inverse)

    def write(self, x):
        self.view(self.host)[...] = x.view(np.uint16)
        if self.dev is not None:
            self.dev.copy_to_device(self.host)

    def info(self):
        view = self.view(self.host)
        strides = tuple(s // view.itemsize for s in view.strides)
        return TensorInfo(_address(self.dev), self.shape, strides, self.dtype, "cai", self.dev)

    def read(self):
        """(the tensor, the bytes around it): the latter must still be the NaN poison."""
        buf = self.dev.copy_to_host() if self.dev is not None else self.host
        pad = buf[..., self.shape[-1]:]
        return self.view(buf).view(NUMPY_DTYPES[self.dtype]), pad


def _to_device(a):
    """A device copy of `a`, or None where it is empty (nothing of it is ever read)."""
    from numba import cuda
    return cuda.to_device(a) if a.size else None


def _address(dev):
    return dev.__cuda_array_interface__["data"][0] if dev is not None else 0


def _f32_info(dev_buf, host_view):
    """TensorInfo of `host_view` (a view of the float32 array copied to dev_buf) on the GPU."""
    strides = tuple(s // host_view.itemsize for s in host_view.strides)
    return TensorInfo(_address(dev_buf), host_view.shape, strides, "f32", "cai", dev_buf)


def _lse_values(rng, shape):
    """Natural-log LSEs around 3, a fifth of the rows -inf (rows that saw no key)."""
    lse = (rng.standard_normal(shape) + 3).astype(np.float32)
    lse[rng.random(shape) < 0.2] = -np.inf
    return lse


def _poison(ws):
    for a in (ws.lse_log2, ws.delta, ws.dq_accum):
        a.copy_to_device(np.full(a.shape, np.nan, dtype=np.float32))


def _expected_stats(lse_tok, do_tok, o_tok):
    """lse_log2 and delta of token rows (any leading shape, D last), and delta's tolerance:
    float32 summation error over D terms, at most D * 2^-24 * sum |dO * O|."""
    f32 = np.float32
    lse2 = np.where(np.isneginf(lse_tok), f32(np.inf), lse_tok * f32(LOG2E)).astype(f32)
    terms = do_tok.astype(np.float64) * o_tok.astype(np.float64)
    tol = do_tok.shape[-1] * 2.0 ** -24 * np.abs(terms).sum(-1)
    return lse2, terms.sum(-1), tol


def _check_stats(ws, lse2_full, delta_full, tol_full, token_mask):
    """The workspace against the model: token rows as computed, padding +inf / 0, dq_accum 0."""
    lse2, delta, acc = ws.lse_log2.copy_to_host(), ws.delta.copy_to_host(), ws.dq_accum.copy_to_host()
    assert np.array_equal(lse2[token_mask], lse2_full[token_mask]), "lse_log2 of token rows"
    assert (lse2[~token_mask] == np.inf).all(), "lse_log2 of padding rows must be +inf"
    err = np.abs(delta[token_mask].astype(np.float64) - delta_full[token_mask])
    assert (err <= tol_full[token_mask] + 1e-30).all(), f"delta max err {err.max(initial=0):.3g}"
    assert (delta[~token_mask] == 0).all(), "delta of padding rows must be 0"
    assert (acc == 0).all() and not np.signbit(acc).any(), "dq_accum must be zeroed (+0)"


def _run_dense_pre(rng, b, s, h, d, dtype, block_m):
    from numba import cuda
    dout = Strided((b, s, h, d), dtype, (0, 2, 1, 3))   # [B, H, S, D] in memory
    out = Strided((b, s, h, d), dtype, (0, 1, 2, 3))
    x, y = _rng_halves(rng, (b, s, h, d), dtype), _rng_halves(rng, (b, s, h, d), dtype)
    dout.write(x)
    out.write(y)
    lse = _lse_values(rng, (b, h, s))
    lse_buf = np.full((b, s, h), np.nan, np.float32)     # [B, S, H] in memory, seen as [B, H, S]
    lse_buf.transpose(0, 2, 1)[...] = lse
    lse_dev = _to_device(lse_buf)
    ws = bp.workspace(b, h, d, block_m, seqlen_q=s)
    _poison(ws)
    bp.preprocess(ws, dout.info(), out.info(), _f32_info(lse_dev, lse_buf.transpose(0, 2, 1)), b, h, d, block_m,
                  s, 0)
    cuda.synchronize()
    s_pad = bp.padded_seqlen(s, block_m)
    lse2_tok, delta_tok, tol_tok = _expected_stats(lse, x.transpose(0, 2, 1, 3), y.transpose(0, 2, 1, 3))
    full = [np.zeros((b, h, s_pad), dt) for dt in (np.float32, np.float64, np.float64)]
    for f, v in zip(full, (lse2_tok, delta_tok, tol_tok)):
        f[:, :, :s] = v
    mask = np.zeros((b, h, s_pad), bool)
    mask[:, :, :s] = True
    _check_stats(ws, *full, mask)


def _run_varlen_pre(rng, lengths, h, d, dtype, block_m):
    from numba import cuda
    cu = _cu(lengths).astype(np.int32)
    tq, batch = int(cu[-1]), len(lengths)
    dout = Strided((tq, h, d), dtype, (1, 0, 2))        # [H, T, D] in memory
    out = Strided((tq, h, d), dtype, (0, 1, 2))
    x, y = _rng_halves(rng, (tq, h, d), dtype), _rng_halves(rng, (tq, h, d), dtype)
    dout.write(x)
    out.write(y)
    lse = _lse_values(rng, (h, tq))
    lse_buf = np.full((tq, h + 1), np.nan, np.float32)  # [T, H + 1] in memory, seen as [H, T]
    lse_buf[:, :h] = lse.T
    lse_dev = _to_device(lse_buf)
    cu_dev = cuda.to_device(cu)
    ws = bp.workspace(batch, h, d, block_m, total_q=tq)
    _poison(ws)
    bp.preprocess(ws, dout.info(), out.info(), _f32_info(lse_dev, lse_buf[:, :h].T), batch, h, d, block_m, 0, 0,
                  cu_seqlens_q=_address(cu_dev), total_q=tq)
    cuda.synchronize()
    t_pad, rows = _varlen_rows(lengths, block_m)
    lse2_tok, delta_tok, tol_tok = _expected_stats(lse, x.transpose(1, 0, 2), y.transpose(1, 0, 2))
    full = [np.zeros((h, t_pad), dt) for dt in (np.float32, np.float64, np.float64)]
    for f, v in zip(full, (lse2_tok, delta_tok, tol_tok)):
        f[:, rows] = v
    mask = np.zeros((h, t_pad), bool)
    mask[:, rows] = True
    _check_stats(ws, *full, mask)


def _check_dq(dq, expected):
    got, pad = dq.read()
    assert np.array_equal(got.view(np.uint16), expected.view(np.uint16)), \
        f"dq differs in {(got.view(np.uint16) != expected.view(np.uint16)).sum()} elements"
    assert (pad == NAN_BITS16).all(), "bytes beside dq's rows were written"


def _run_dense_post(rng, b, s, h, d, dtype, block_m):
    from numba import cuda
    s_pad = bp.padded_seqlen(s, block_m)
    acc = rng.standard_normal((b, h, s_pad, d)).astype(np.float32) * np.float32(8)
    acc[:, :, s:] = np.nan  # padding rows: never in dq
    scale = 1 / math.sqrt(d)
    ws = bp.workspace(b, h, d, block_m, seqlen_q=s)
    ws.dq_accum.copy_to_device(acc)
    dq = Strided((b, s, h, d), dtype, (0, 2, 1, 3))
    bp.postprocess(ws, dq.info(), b, h, d, block_m, s, scale, 0)
    cuda.synchronize()
    expected = (acc[:, :, :s] * np.float32(scale)).astype(NUMPY_DTYPES[dtype]).transpose(0, 2, 1, 3)
    _check_dq(dq, expected)


def _run_varlen_post(rng, lengths, h, d, dtype, block_m):
    from numba import cuda
    cu = _cu(lengths).astype(np.int32)
    tq, batch = int(cu[-1]), len(lengths)
    t_pad, rows = _varlen_rows(lengths, block_m)
    acc = np.full((h, t_pad, d), np.nan, np.float32)
    acc[:, rows] = rng.standard_normal((h, tq, d)).astype(np.float32) * np.float32(8)
    scale = 0.125
    ws = bp.workspace(batch, h, d, block_m, total_q=tq)
    ws.dq_accum.copy_to_device(acc)
    cu_dev = cuda.to_device(cu)
    dq = Strided((tq, h, d), dtype, (1, 0, 2))
    bp.postprocess(ws, dq.info(), batch, h, d, block_m, 0, scale, 0,
                   cu_seqlens_q=_address(cu_dev), total_q=tq)
    cuda.synchronize()
    expected = (acc[:, rows] * np.float32(scale)).astype(NUMPY_DTYPES[dtype]).transpose(1, 0, 2)
    _check_dq(dq, expected)


DENSE_CASES = [(s, d, dtype, bm) for s in LENGTHS for d in SUPPORTED_HEAD_DIMS
               for dtype, bm in (("bf16", 64), ("f16", 128))]


@gpu
@pytest.mark.parametrize("s,d,dtype,block_m", DENSE_CASES)
def test_preprocess_dense(s, d, dtype, block_m):
    _run_dense_pre(np.random.default_rng(s * 1000 + d), 2, s, 3, d, dtype, block_m)


@gpu
@pytest.mark.parametrize("s,d,dtype,block_m", DENSE_CASES)
def test_postprocess_dense(s, d, dtype, block_m):
    _run_dense_post(np.random.default_rng(s * 1000 + d), 2, s, 3, d, dtype, block_m)


VARLEN_CASES = [(i, d, dtype, bm) for i in range(len(VARLEN_BATCHES)) for d in SUPPORTED_HEAD_DIMS
                for dtype, bm in (("bf16", 128), ("f16", 64))]


@gpu
@pytest.mark.parametrize("batch_index,d,dtype,block_m", VARLEN_CASES)
def test_preprocess_varlen(batch_index, d, dtype, block_m):
    _run_varlen_pre(np.random.default_rng(batch_index * 1000 + d), VARLEN_BATCHES[batch_index], 2, d, dtype,
                    block_m)


@gpu
@pytest.mark.parametrize("batch_index,d,dtype,block_m", VARLEN_CASES)
def test_postprocess_varlen(batch_index, d, dtype, block_m):
    _run_varlen_post(np.random.default_rng(batch_index * 1000 + d), VARLEN_BATCHES[batch_index], 2, d, dtype,
                     block_m)


@gpu
@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.one_of(st.sampled_from([0, 1]), st.integers(0, 400)), min_size=1, max_size=6),
       d=st.sampled_from(SUPPORTED_HEAD_DIMS), dtype=st.sampled_from(["bf16", "f16"]),
       block_m=st.sampled_from([64, 80, 128]), seed=st.integers(0, 2 ** 31))
def test_varlen_random_lengths(lengths, d, dtype, block_m, seed):
    rng = np.random.default_rng(seed)
    _run_varlen_pre(rng, lengths, 2, d, dtype, block_m)
    _run_varlen_post(rng, lengths, 2, d, dtype, block_m)
