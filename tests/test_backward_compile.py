"""Every backward specialization compiles to sm_90a with no spill, no stack and no wgmma
serialization (ptxas C7510), and its PTX has the GEMMs of the step (`backward_mainloop`).
Runs without a GPU."""
import itertools

import pytest

from numba_fa3.backward import FlashBackward
from numba_fa3.mask import MASK_CAUSAL, MASK_LOCAL, MASK_NONE
from numba_fa3.primitives import compile as kc
from numba_fa3.tiles import BACKWARD_HEAD_DIMS, SPLIT_COLUMNS, SPLIT_KEYS, BackwardTiles
from test_ptx_compile import _assert_clean, _assert_wgmma_operands_untouched

pytestmark = pytest.mark.skipif(kc.find_ptxas() is None, reason="ptxas not installed")

SPECIALIZATIONS = list(itertools.product(["bf16", "f16"], BACKWARD_HEAD_DIMS, [MASK_NONE, MASK_CAUSAL, MASK_LOCAL],
                                         [False, True], [False, True], [False, True]))


@pytest.mark.parametrize("dtype,head_dim,mask_kind,softcap,varlen,deterministic", SPECIALIZATIONS)
def test_backward_specialization_compiles_clean(dtype, head_dim, mask_kind, softcap, varlen, deterministic):
    kern = FlashBackward(dtype, head_dim, mask_kind, softcap=softcap, varlen=varlen, deterministic=deterministic)
    ptx = kern.compile_ptx()
    # per step: S^T and dP^T (D / 16 k-steps each), dV and dK (block_m / 16), dQ (block_n / 16)
    steps = 2 * (head_dim // 16) + 2 * (kern.block_m // 16) + kern.block_n // 16
    # (unequal column shares: a consumer's code per share)
    copies = len(set(kern.col_shares)) if kern.columns else 1
    assert ptx.count("wgmma.mma_async") == copies * steps
    # dQ: TMA reduce-adds from shared memory, or (deterministic) ordered vector reductions
    assert ("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add" in ptx) == kern.dq_bulk
    assert ("red.relaxed.gpu.global.add.v2.f32" in ptx) == (not kern.dq_bulk)
    assert kern.dq_bulk == (not deterministic and head_dim != 256)
    assert ("ld.acquire.gpu.global.s32" in ptx) == deterministic
    assert "setmaxnreg.inc" in ptx and "setmaxnreg.dec" in ptx
    _assert_wgmma_operands_untouched(ptx, reads_allowed=True)
    report = kc.ptxas_report(ptx)
    _assert_clean(report,
                  f"backward {dtype} d{head_dim} mask {mask_kind} softcap={softcap} varlen={varlen} det={deterministic}")


def test_backward_geometry():
    """Each warpgroup owns 64 keys (D <= 128) or a share of D's columns of a 64-key block (D = 192,
    256, whose dK and dV rows would not fit a thread's registers: whole 64-column chunks, 128 and
    64 at D = 192); dQ's columns split into whole 64-column chunks where they can, else alternate
    between the warpgroups (D = 64, 96).  dQ goes through shared memory where its staging fits
    (not at D = 256)."""
    for d in BACKWARD_HEAD_DIMS:
        k = FlashBackward("bf16", d, MASK_NONE)
        assert k.columns == (d >= 192)
        assert k.block_n == (64 if k.columns else 64 * k.consumers)
        if k.columns:
            assert k.col_shares == {192: (128, 64), 256: (128, 128)}[d]
            assert sum(k.col_shares) == d and k.col_stride == k.col_shares[0]
        assert k.kv_cols == (k.col_shares[0] if k.columns else d)
        assert k.s_cols == (k.block_m // k.consumers if k.columns else k.block_m)
        assert k.dq_split == (d in (128, 192, 256))
        assert k.dq_cols == (k.col_shares[0] if k.columns else d // 2 if k.dq_split else d)
        assert k.dq_bulk == (d != 256)
        assert k.smem.bytes <= 227 * 1024


#: FA3's hdim-128 tile (`FlashBackward.dq_t`), beside the table: dense, causal, local, varlen.
EIGHTY = BackwardTiles(block_m=80, stages=2, consumers=2, producer_registers=24, consumer_registers=240)


@pytest.mark.parametrize("mask_kind,varlen", [(MASK_NONE, False), (MASK_CAUSAL, False), (MASK_LOCAL, False),
                                              (MASK_NONE, True), (MASK_CAUSAL, True)])
def test_query_blocks_of_80_compile_clean(mask_kind, varlen):
    """80-query blocks at D = 128: S^T, dP^T (8 k-steps each), dV, dK (5), dQ^T = K^T dS (8), dS by
    stmatrix.trans, no spill, no serialized wgmma; within shared memory."""
    kern = FlashBackward("bf16", 128, mask_kind, varlen=varlen, tiles=EIGHTY)
    ptx = kern.compile_ptx()
    assert kern.dq_t and kern.dq_bulk
    assert ptx.count("wgmma.mma_async") == 2 * 8 + 2 * 5 + 8
    assert ptx.count("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16") == 80 // 16
    assert "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add" in ptx
    _assert_wgmma_operands_untouched(ptx, reads_allowed=True)
    _assert_clean(kc.ptxas_report(ptx), f"backward 80 mask {mask_kind} varlen={varlen}")


@pytest.mark.parametrize("head_dim,deterministic", [(64, False), (256, False), (128, True)])
def test_query_blocks_of_80_need_the_bulk_dq(head_dim, deterministic):
    """dQ^T needs dQ's columns split between the key warpgroups and its bulk adds: refused at
    D = 64 (dQ by turns), D = 256 (columns split, no staging room) and in the deterministic mode."""
    with pytest.raises(ValueError, match="80"):
        FlashBackward("bf16", head_dim, MASK_NONE, deterministic=deterministic,
                      tiles=BackwardTiles(block_m=80, stages=2, consumers=2, producer_registers=24,
                                          consumer_registers=240,
                                          split=SPLIT_COLUMNS if head_dim == 256 else SPLIT_KEYS))
