"""The backward's transposed stagers (`epilogue.stmatrix_transposed_stager`,
`epilogue.transposed_f32_stager`) run as Python on the CPU with their shared-memory stores
recorded: every fragment element lands where the GEMM or the TMA box that reads the tile expects
it, exactly once, and a warp's stores hit distinct banks.  Runs without a GPU."""
import types

import numpy as np
import pytest

from numba_fa3.primitives import epilogue, smem

WARPGROUP, WARP = 128, 32
BANKS, BANK_BYTES = 32, 4


def _python(device_fn, **replace):
    """The Python body of a `cuda.jit(device=True)` stager, its globals replaced by `replace`
    and its swizzle the Python body of `smem.swizzle_128b`."""
    py = device_fn.py_func
    scope = dict(py.__globals__)
    scope["smem"] = types.SimpleNamespace(swizzle_128b=smem.swizzle_128b.py_func, SWIZZLE_BYTES=smem.SWIZZLE_BYTES)
    scope.update(replace)
    return types.FunctionType(py.__code__, scope, py.__name__, py.__defaults__, py.__closure__)


def _unswizzle(offset):
    """(row, byte in row) of a byte offset in a 128-byte swizzled tile."""
    row, inner = divmod(offset, smem.SWIZZLE_BYTES)
    return row, (((inner >> 4) ^ (row % 8)) << 4) | (inner & 15)


def _fragment_row(t):
    return 16 * (t // WARP) + (t % WARP) // 4


@pytest.mark.parametrize("queries", [80, 64, 96])
def test_transposed_f32_stager_puts_dq_t_in_its_boxes(queries):
    """dQ^T's fragment (64 of D's columns by `queries`) into [query][D] float32 boxes of 32
    columns: element (d, q) at box d // 32, row q, column d % 32, once; 32 banks per warp store."""
    groups = queries // 8
    box_bytes = queries * smem.SWIZZLE_BYTES
    stores = []    # (thread, register, address)
    memory = types.SimpleNamespace(st_shared_f32=lambda addr, value: stores.append((current[0], value, int(addr))))
    stage = _python(epilogue.transposed_f32_stager(groups, box_bytes), memory=memory)
    current = [0]
    for t in range(WARPGROUP):
        current[0] = t
        acc = tuple(range(4 * groups))
        stage(0, acc, np.uint32(_fragment_row(t)), np.uint32(2 * (t % 4)))
    assert len(stores) == WARPGROUP * 4 * groups
    seen = set()
    for t, reg, addr in stores:
        j, rest = divmod(reg, 4)
        half, e = divmod(rest, 2)
        d, q = _fragment_row(t) + 8 * half, 8 * j + 2 * (t % 4) + e
        box, offset = divmod(addr, box_bytes)
        row, byte = _unswizzle(offset)
        assert (box, row, byte) == (d // 32, q, 4 * (d % 32)), (t, reg)
        seen.add((d, q))
    assert len(seen) == 64 * queries
    # each warp's store of one register: 32 distinct banks
    by_instr = {}
    for t, reg, addr in stores:
        by_instr.setdefault((t // WARP, reg), []).append(addr)
    for addrs in by_instr.values():
        assert len({(a // BANK_BYTES) % BANKS for a in addrs}) == WARP


@pytest.mark.parametrize("queries", [80, 64])
def test_stmatrix_transposed_stager_stores_ds_by_query(queries):
    """The S^T-shaped fragment (64 keys by `queries`, 16-bit pairs) stored by stmatrix.x4.trans:
    key k, query q at row q, byte 2 k of the chunk (K-major for dQ^T = K^T dS), every element
    once; each 8-lane phase's rows on distinct 16-byte bank groups."""
    groups = queries // 8
    tile = {}
    instrs = []    # per warp: list of (lane addresses, lane registers)
    pending = {}

    def stmatrix_x4_trans(addr, regs):
        pending.setdefault(current[0] // WARP, []).append((current[0] % WARP, int(addr), regs))

    memory = types.SimpleNamespace(stmatrix_x4_trans=stmatrix_x4_trans)
    stage = _python(epilogue.stmatrix_transposed_stager(groups), memory=memory)
    current = [0]
    for t in range(WARPGROUP):
        current[0] = t
        r = _fragment_row(t)
        packed = []
        for j in range(groups):
            for half in range(2):
                # a register holds (row, col) and (row, col + 1): labelled by the first
                packed.append((r + 8 * half, 8 * j + 2 * (t % 4)))
        stage(0, tuple(packed), np.uint32(t), np.uint32(0))
    for warp, calls in pending.items():
        per_instr = len(calls) // WARP
        assert per_instr == groups // 2
        # group the calls per instruction: each lane issues per_instr calls in order
        by_lane = {}
        for lane, addr, regs in calls:
            by_lane.setdefault(lane, []).append((addr, regs))
        for k in range(per_instr):
            addrs = [by_lane[lane][k][0] for lane in range(WARP)]
            regs = [by_lane[lane][k][1] for lane in range(WARP)]
            for mi in range(4):
                phase = addrs[8 * mi:8 * mi + 8]
                assert len({(a % smem.SWIZZLE_BYTES) // 16 for a in phase}) == 8, "bank conflict"
                for i in range(8):
                    addr = addrs[8 * mi + i]
                    for rr in range(8):
                        lane = 4 * rr + i // 2
                        key, q = regs[lane][mi]
                        q += i % 2
                        row, byte = _unswizzle(addr + 2 * rr)
                        assert key == (byte // 2), (warp, k, mi, i, rr)
                        tile[(row, byte // 2)] = (key, q)
                        assert row == q, (warp, k, mi, i, rr)
    assert len(tile) == 64 * queries
    assert all(tile[(q, key)] == (key, q) for q in range(queries) for key in range(64))
