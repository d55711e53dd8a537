"""Host-side plumbing that needs no GPU: stream handles, array inspection."""
import ctypes

import numpy as np
import pytest

from numba_fa3.primitives import launch, tensors


class _TorchLike:
    cuda_stream = 0x1234


class _IntLike:
    def __int__(self):
        return 0x55


class _HandleLike:
    handle = ctypes.c_void_p(0x77)


@pytest.mark.parametrize("stream,expected", [(None, 0), (0, 0), (0x99, 0x99), (_TorchLike(), 0x1234),
                                             (_IntLike(), 0x55), (_HandleLike(), 0x77)])
def test_stream_handle(stream, expected):
    assert launch.stream_handle(stream) == expected


def test_inspect_numpy_dtypes_and_strides():
    info = tensors.inspect(np.zeros((3, 4), np.int32), "cu")
    assert info.dtype == "i32" and info.strides == (4, 1) and info.kind == "numpy"
    bf = tensors.inspect(np.zeros((2, 8), tensors.NUMPY_DTYPES["bf16"])[:, ::2], "x")
    assert bf.dtype == "bf16" and bf.strides == (8, 2)
    with pytest.raises(TypeError, match="expected a NumPy array"):
        tensors.inspect([1, 2, 3], "x")
    with pytest.raises(TypeError, match="unsupported dtype"):
        tensors.inspect(np.zeros(3, np.int64), "x")


def test_tile_table_fits_registers_and_shared_memory():
    """Every (head dim, mask) entry: register budget within the launch allocation, block_m one
    wgmma M per consumer, and a shared-memory plan that fits (with two Q buffers where it says)."""
    from numba_fa3.forward import FlashForward
    from numba_fa3.mask import MASK_CAUSAL, MASK_NONE
    from numba_fa3.primitives.warpgroup import MAX_CONSUMERS
    from numba_fa3.tiles import TILES
    from numba_fa3.primitives import smem
    for (d, masked), t in TILES.items():
        assert 2 <= t.consumers <= MAX_CONSUMERS and t.block_m == 64 * t.consumers
        k = FlashForward("bf16", d, MASK_CAUSAL if masked else MASK_NONE)
        assert k.smem.used + smem.ATOM_BYTES <= smem.MAX_DYNAMIC_SMEM
        assert k.q_stages in (1, 2) and (k.q_stages == 2) == (d <= 128), (d, k.q_stages)
        assert k.tma_store == (d <= 128), (d, k.tma_store)


def test_trace_analysis_on_a_synthetic_trace():
    """bench trace's arithmetic on hand-made timestamps: five phases of 1000 cycles per tile,
    written into per-CTA slabs as the kernel lays them out (trace.split)."""
    import numpy as np
    from bench.trace import analyse, analyse_loop
    from numba_fa3.trace import (CTA_SLOTS, MAX_CONSUMERS, TILE_SLOTS, TRACE_EVENTS, TRACE_LOOP_EVENTS,
                                 TRACE_LOOP_STEPS, TRACE_ROLES, TRACE_TILES, split)
    ctas = 3
    slabs = np.zeros((ctas, CTA_SLOTS), np.int64)
    buf = slabs[:, :TILE_SLOTS].reshape(ctas, TRACE_ROLES, TRACE_TILES, TRACE_EVENTS)
    loop = slabs[:, TILE_SLOTS:].reshape(ctas, MAX_CONSUMERS, TRACE_TILES, TRACE_LOOP_STEPS, TRACE_LOOP_EVENTS)
    for t in range(4):
        for role in (1, 2):
            buf[:, role, t, :6] = 100_000 * t + 1 + 1000 * np.arange(6)
            buf[:, role, t, 6] = 9
        buf[:, 0, t, :5] = 100_000 * t + 1 + 100 * np.arange(5)
    for k in range(5):
        loop[:, :2, :4, k, :] = 1 + 3000 * k + 500 * np.arange(TRACE_LOOP_EVENTS)
    tiles, steps_buf = split(slabs.ravel(), ctas)
    r = analyse(tiles, ctas)
    assert r["tiles"] == ctas * 2 * 4 and r["blocks_per_tile"] == 9
    assert all(v == 0.2 for v in r["share"].values())
    assert r["block_cycles"] == 1000 / 8
    steps = analyse_loop(steps_buf, ctas)
    assert [s["step"] for s in steps] == [0, 1, 2, 3, 4]
    assert steps[1]["period"] == 3000 and steps[1]["wait_k"] == 3000 - 4 * 500 + 0
    assert steps[2]["softmax"] == 500 and steps[2]["wg1_lag"] == 0


def test_maskcost_problems_mask_little():
    """maskcost's problems leave the causal kernel a tile's diagonal to mask and nothing else:
    at most two query blocks per (batch, head), whole key blocks, keys >= 8x queries, and at
    least one tile per SM."""
    from bench.maskcost import PROBLEMS
    for sq, sk, b, h in PROBLEMS:
        assert sq <= 256 and sk % 128 == 0 and sk >= 8 * sq and b * h >= 132


def test_host_timing_subtracts_flushes_and_interleaves(monkeypatch):
    """bench's host-clocked timing on a fake clock: two implementations on two streams whose
    flushes cost differently.  Cold subtracts each stream's own flushes; without flushes it times launches
    alone; the blocks alternate between implementations, in an order rotated each round."""
    from bench import timing
    clock = [0.0]
    order = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0] / 1e3)

    class FakeStream:
        def __init__(self, flush_ms):
            self.flush_ms = flush_ms

        def flush(self):
            clock[0] += self.flush_ms

        def sync(self, result=None):
            clock[0] += 0.0

    def launch(name, ms):
        def fn():
            order.append(name)
            clock[0] += ms
            return name
        return fn
    fns = {"a": launch("a", 5.0), "b": launch("b", 7.0)}
    streams = {"a": FakeStream(2.0), "b": FakeStream(3.0)}
    for cold in (True, False):
        order.clear()
        ms = timing.host_interleaved_ms(fns, streams, cold=cold, rounds=4, per_block=3, warmup=1)
        assert ms == pytest.approx({"a": 5.0, "b": 7.0})
        timed = order[2:]  # after one warm-up launch each
        assert timed == (["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3) * 2  # the order rotates


def test_steady_timing_settles_then_times_each_in_turn(monkeypatch):
    """bench's steady timing on a fake clock: each function runs untimed for the settle time,
    then timed; functions take turns, in an order rotated each round; the result is milliseconds per launch."""
    from bench import timing
    clock = [0.0]
    order = []
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0] / 1e3)

    class FakeStream:
        def sync(self, result=None):
            pass

    def launch(name, ms):
        def fn():
            order.append(name)
            clock[0] += ms
        return fn
    fns = {"a": launch("a", 2.0), "b": launch("b", 5.0)}
    ms = timing.steady_ms(fns, {"a": FakeStream(), "b": FakeStream()}, seconds=0.104, settle=0.052, rounds=2,
                          per_block=5)
    assert ms == pytest.approx({"a": 2.0, "b": 5.0})
    # whole blocks of 5 until the time is up: a (10 ms blocks) 6 untimed + 11 timed, b (25 ms) 3 + 5
    assert order == ["a"] * 85 + ["b"] * 40 + ["b"] * 40 + ["a"] * 85


def test_bench_variants_points_and_choices():
    """bench variants parses its points and its variants: Tiles fields and the schedule's two
    switches, anything else refused."""
    import argparse
    from bench.variants import parse_point, variant_overrides
    assert parse_point("128,causal,4096") == (128, True, 4096)
    assert parse_point("256,full,2048") == (256, False, 2048)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_point("128,maybe,4096")
    tiles, schedule = variant_overrides(["rescale_rounds=4", "q_in_registers=False", "pingpong=False"])
    assert tiles == {"rescale_rounds": 4, "q_in_registers": False} and schedule == {"pingpong": False}
    with pytest.raises(SystemExit):
        variant_overrides(["MULTICAST=True"])


def test_cluster_launch_config():
    """Clustered launches (for TMA multicast) go through cuLaunchKernelEx with the cluster
    dimension attribute; a grid that is not whole clusters is refused before launch."""
    from cuda.bindings import driver as drv
    cfg = launch.cluster_config(132, 384, 200_000, 0x1234, 2)
    assert (cfg.gridDimX, cfg.blockDimX, cfg.sharedMemBytes, cfg.numAttrs) == (132, 384, 200_000, 1)
    assert int(cfg.hStream) == 0x1234
    attr = cfg.attrs[0]
    assert attr.id == drv.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    assert (attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z) == (2, 1, 1)
    with pytest.raises(ValueError, match="whole number of clusters"):
        launch.cluster_config(133, 384, 0, 0, 2)


def test_unit_dimension_strides_meet_the_tma_rules():
    """A dimension of extent 1 may carry any stride (NumPy's `x[None]` and a broadcast give 0);
    the tensor map gets the span of the dimensions inside it, every other stride as given."""
    from numba_fa3.primitives import tma_desc
    b, s, h, d = 1, 300, 4, 128
    x = np.zeros((s, h, d), tensors.NUMPY_DTYPES["bf16"])[None]
    assert x.strides[0] == 0
    info = tensors.inspect(x, "q")
    dtype, ptr, dims, strides, box = tma_desc.bshd_spec(info, 64, 128)
    with pytest.raises(ValueError, match="positive multiples"):
        tma_desc.check_tiled(dtype, dims, strides, box, 1 << 20)
    fixed = tma_desc.unit_dim_strides(dtype, dims, strides)
    tma_desc.check_tiled(dtype, dims, fixed, box, 1 << 20)
    assert fixed == (d * 2, h * d * 2, s * h * d * 2)
    # a head of one between others, and strides that are not packed: only unit dims move
    assert tma_desc.unit_dim_strides("e4m3", (64, 1, 50, 3), (0, 4096, 4096 * 64)) == (64, 4096, 4096 * 64)
    assert tma_desc.unit_dim_strides("f32", (32, 5, 7), (256, 4096)) == (256, 4096)
