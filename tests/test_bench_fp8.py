"""bench/fp8.py's pure parts (CPU only): arguments, the grid, FLOPs, the derived kernel-only time,
the ratios and the JSON layout."""
import json
import os

import pytest

from bench import common, fp8


def test_defaults_cover_the_figure_5_grid_and_every_timing_method():
    args = fp8.parser().parse_args([])
    assert args.hdims == [256, 128, 64] and args.causal == ["false", "true"]
    assert args.seqlens == [512, 1024, 2048, 4096, 8192, 16384]
    assert args.timing == ["interleaved", "cold", "steady"]
    assert not args.no_cudnn and not args.no_headstart and args.out is None
    assert args.cudnn_fp8 == ".fa3/cudnn_fp8.py"


def test_arguments_parse_and_reject_unknown_values(capsys):
    args = fp8.parser().parse_args(["--hdims", "128", "--causal", "true", "--seqlens", "2048", "4096",
                                    "--timing", "cold", "--rounds", "2", "--launches", "7", "--no-cudnn",
                                    "--out", "x.json"])
    assert (args.hdims, args.causal, args.seqlens, args.timing) == ([128], ["true"], [2048, 4096], ["cold"])
    assert (args.rounds, args.launches, args.no_cudnn, args.out) == (2, 7, True, "x.json")
    for bad in (["--causal", "yes"], ["--timing", "do_bench"]):
        with pytest.raises(SystemExit):
            fp8.parser().parse_args(bad)
        assert "invalid choice" in capsys.readouterr().err


def test_grid_skips_unsupported_head_dims_and_keeps_16k_tokens_hidden_2048():
    points, skipped = fp8.grid_points([256, 128, 64], ["false", "true"], [512, 16384], supported=(128, 256))
    assert skipped == [64]
    assert [p[:3] for p in points] == [(256, False, 512), (256, False, 16384), (256, True, 512),
                                       (256, True, 16384), (128, False, 512), (128, False, 16384),
                                       (128, True, 512), (128, True, 16384)]
    for d, _, s, b, h in points:
        assert b * s == common.TOKENS and h * d == common.HIDDEN
    assert fp8.grid_points([64], [True], [512], supported=(128, 256)) == ([], [64])


def test_grid_filters_by_the_fp8_forwards_own_head_dims():
    from numba_fa3.tiles import FP8_HEAD_DIMS
    points, skipped = fp8.grid_points([256, 128, 64], [False], [1024])
    assert {p[0] for p in points} == set(FP8_HEAD_DIMS) & {256, 128, 64}
    assert skipped == [d for d in (256, 128, 64) if d not in FP8_HEAD_DIMS]


def test_flops_count_both_gemms_and_halve_for_causal():
    b, h, s, d = 4, 8, 4096, 256
    full = fp8.forward_flops(b, h, s, d, False)
    assert full == 4.0 * b * h * s * s * d
    assert fp8.forward_flops(b, h, s, d, True) == full / 2
    # on the grid, FLOPs / seqlen is 4 x tokens x hidden at every point
    points, _ = fp8.grid_points([128, 256], [False], [512, 16384], supported=(128, 256))
    for d, c, s, b, h in points:
        assert fp8.forward_flops(b, h, s, d, c) / s == 4.0 * common.TOKENS * common.HIDDEN


def test_kernel_only_is_a_difference_of_medians_and_ratios_are_throughput_ratios():
    ms = {"ours_fp8": 1.0, "transpose": 0.1, "quantize": 0.2, "e2e_fp8": 1.5, "ours_bf16": 2.0, "cudnn_fp8": 1.2}
    full = fp8.with_kernel(ms)
    assert full["ours_fp8_kernel"] == pytest.approx(0.9)
    assert list(full)[:3] == ["ours_fp8", "ours_fp8_kernel", "transpose"]  # printed beside its minuend
    assert "ours_fp8_kernel" not in ms  # the medians given stay as they were
    r = fp8.ratios(full)
    assert r["ours_fp8/cudnn_fp8"] == pytest.approx(1.2)
    assert r["ours_fp8_kernel/cudnn_fp8"] == pytest.approx(1.2 / 0.9)
    assert r["e2e_fp8/ours_bf16"] == pytest.approx(2.0 / 1.5)
    # no peer: its ratios are None, the others stay
    no_peer = fp8.ratios(fp8.with_kernel({n: t for n, t in ms.items() if n != "cudnn_fp8"}))
    assert no_peer["ours_fp8/cudnn_fp8"] is None and no_peer["ours_fp8_kernel/cudnn_fp8"] is None
    assert no_peer["e2e_fp8/ours_bf16"] == pytest.approx(2.0 / 1.5)
    assert "ours_fp8_kernel" not in fp8.with_kernel({"ours_fp8": 1.0})


def test_rows_carry_tflops_for_attention_and_bandwidth_for_memory_passes():
    point = (128, True, 2048, 8, 16)
    flops = fp8.forward_flops(8, 16, 2048, 128, True)
    ms = {"ours_fp8": 0.5, "transpose": 0.05, "quantize": 0.1, "ours_bf16": 0.8}
    nbytes = {"quantize": 3e8, "transpose": 6e7}
    rounds = {n: [t, t] for n, t in ms.items()}
    rows = fp8.point_rows(point, (128, 128), "interleaved", ms, flops, nbytes, rounds, {"ours_fp8": 0.01})
    by = {r["impl"]: r for r in rows}
    assert set(by) == set(ms) | {"ours_fp8_kernel"}
    for r in rows:
        assert (r["hdim"], r["causal"], r["seqlen"], r["batch"], r["heads"]) == point
        assert (r["block_m"], r["block_n"], r["timing"], r["mode"]) == (128, 128, "interleaved", "fwd")
    assert by["ours_fp8"]["tflops"] == pytest.approx(flops / 0.5 / 1e9) and by["ours_fp8"]["tb_s"] is None
    assert by["ours_fp8"]["max_abs_err"] == 0.01 and by["ours_bf16"]["max_abs_err"] is None
    assert by["ours_bf16"]["dtype"] == "bf16" and by["ours_fp8"]["dtype"] == "fp8"
    kern = by["ours_fp8_kernel"]
    assert kern["ms"] == pytest.approx(0.45) and kern["tflops"] == pytest.approx(flops / 0.45 / 1e9)
    assert kern["derived"] and kern["ms_rounds"] is None and by["ours_fp8"]["derived"] is None
    for name in ("quantize", "transpose"):
        assert by[name]["tflops"] is None and by[name]["bytes"] == nbytes[name]
        assert by[name]["tb_s"] == pytest.approx(nbytes[name] / ms[name] / 1e9)
    assert by["transpose"]["ms_rounds"] == [0.05, 0.05]
    # a non-positive difference (noise) gives no throughput rather than a negative one
    noisy = fp8.point_rows(point, (128, 128), "cold", {"ours_fp8": 0.05, "transpose": 0.06}, flops, nbytes)
    assert {r["impl"]: r["tflops"] for r in noisy}["ours_fp8_kernel"] is None


def test_record_layout_round_trips_through_json(tmp_path):
    point = (256, False, 512, 32, 8)
    ms = {"ours_fp8": 0.2, "transpose": 0.02, "quantize": 0.1, "e2e_fp8": 0.35, "ours_bf16": 0.3}
    rows = fp8.point_rows(point, (128, 128), "steady", ms, fp8.forward_flops(32, 8, 512, 256, False),
                          {"quantize": 1e8, "transpose": 1e7})
    ratio_rows = [fp8.ratio_record(point, "steady", ms)]
    missing = [dict(hdim=256, causal=False, seqlen=512, impl="cudnn_fp8", reason="no plan")]
    run_meta = dict(device="NVIDIA H100 80GB HBM3", driver="580.159.04", date="2026-12-07", commit="abc1234",
                    notes=fp8.notes([64], None))
    obj = fp8.record(run_meta, rows, ratio_rows, missing, complete=False)
    path = str(tmp_path / "r.json")
    common.write_json(path, obj, quiet=True)
    with open(path) as f:
        back = json.load(f)
    assert set(back) == {"meta", "rows", "ratios", "missing"}
    assert back["meta"]["complete"] is False and "complete" not in run_meta
    assert {k: back["meta"][k] for k in ("device", "driver", "date", "commit")} == {
        "device": "NVIDIA H100 80GB HBM3", "driver": "580.159.04", "date": "2026-12-07", "commit": "abc1234"}
    assert back["meta"]["notes"]["skipped_hdims"] == [64] and "ours_fp8_kernel" in back["meta"]["notes"]
    assert back["rows"] == rows and back["missing"] == missing
    (r,) = back["ratios"]
    assert (r["hdim"], r["causal"], r["seqlen"], r["timing"]) == (256, False, 512, "steady")
    assert r["ours_fp8/cudnn_fp8"] is None and r["e2e_fp8/ours_bf16"] == pytest.approx(0.3 / 0.35)
    assert fp8.record(run_meta, rows, ratio_rows, missing, complete=True)["meta"]["complete"] is True


def test_results_are_named_by_date_and_device():
    assert fp8.device_short("NVIDIA H100 80GB HBM3") == "h100"
    assert fp8.device_short("NVIDIA H200") == "h200"
    assert fp8.device_short(None) == "gpu" and fp8.device_short("") == "gpu"
    path = fp8.results_path(None, "2026-12-07", "NVIDIA H100 80GB HBM3")
    assert os.path.dirname(path) == common.RESULTS
    assert os.path.basename(path) == "fp8-2026-12-07-h100.json"
    assert fp8.results_path("elsewhere.json", "2026-12-07", None) == "elsewhere.json"


def test_missing_peer_is_a_note_not_an_error(tmp_path):
    peer, note = fp8.load_peer(str(tmp_path / "absent.py"))
    assert peer is None and "absent.py" in note
    assert fp8.notes([], note)["peer"] == note and "skipped_hdims" not in fp8.notes([], note)


def test_headstart_outlasts_the_hosts_queueing_of_a_round():
    calls = (fp8.INTERLEAVED_WARMUP + 20) * len(fp8.TIMED)
    cycles = fp8.headstart_cycles(calls)
    assert cycles / fp8.SLEEP_CLOCK_HZ >= calls * fp8.HOST_CALL_BOUND_S * (1 - 1e-9)
