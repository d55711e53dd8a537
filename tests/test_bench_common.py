"""bench/common.py's JSON writing (CPU only)."""
import json
import os

from bench import common


def test_write_json_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "sub" / "r.json")
    common.write_json(path, {"rows": [1]}, quiet=True)
    common.write_json(path, {"rows": [1, 2], "meta": {"complete": True}})
    with open(path) as f:
        assert json.load(f) == {"rows": [1, 2], "meta": {"complete": True}}
    assert os.listdir(tmp_path / "sub") == ["r.json"]


def test_rotated_puts_every_name_in_every_position():
    from bench.timing import rotated
    names = ["ours", "fa2", "cudnn"]
    orders = [rotated(names, r) for r in range(6)]
    assert orders[0] == names and orders[1] == ["fa2", "cudnn", "ours"]
    for pos in range(len(names)):
        counts = {n: sum(o[pos] == n for o in orders) for n in names}
        assert counts == {n: 2 for n in names}
    assert rotated({"a": 1, "b": 2}, 1) == ["b", "a"] and rotated([], 3) == []


def test_pass_flops_scale_the_mask_aware_forward_count():
    from bench.attention import pass_flops
    b, h, s, d = 4, 16, 4096, 128
    full = 4.0 * b * h * s * s * d
    causal = full / 2
    assert pass_flops(full, "fwd") == full
    assert pass_flops(full, "bwd") == 2.5 * full and pass_flops(causal, "bwd") == 1.25 * full
    assert pass_flops(full, "fwd+bwd") == 3.5 * full and pass_flops(causal, "fwd+bwd") == 1.75 * full
    assert pass_flops(full, "fwd+bwd") == pass_flops(full, "fwd") + pass_flops(full, "bwd")


def test_pass_argument_defaults_to_the_forward_and_rejects_others(capsys):
    import pytest
    from bench.attention import parser
    assert parser().parse_args([]).mode == "fwd"
    for mode in ("fwd", "bwd", "fwd+bwd"):
        args = parser().parse_args(["--pass", mode, "--hdims", "64", "--seqlens", "512"])
        assert args.mode == mode and args.hdims == [64] and args.seqlens == [512]
    with pytest.raises(SystemExit):
        parser().parse_args(["--pass", "backward"])
    assert "invalid choice" in capsys.readouterr().err


def test_results_are_named_by_pass_and_date():
    from bench.attention import results_path
    for mode in ("fwd", "bwd", "fwd+bwd"):
        path = results_path(None, mode, "2026-12-01")
        assert os.path.dirname(path) == common.RESULTS
        assert os.path.basename(path) == f"attention-{mode}-2026-12-01.json"
    assert results_path("elsewhere.json", "bwd", "2026-12-01") == "elsewhere.json"


def test_chart_title_follows_the_pass():
    import pytest
    from bench.chart import title_of
    assert title_of([{"impl": "fa3"}]).startswith("Attention forward")  # files before `mode`
    assert title_of([{"mode": "fwd"}]) == "Attention forward"
    assert title_of([{"mode": "bwd"}] * 2).startswith("Attention backward")
    assert title_of([{"mode": "fwd+bwd"}]).startswith("Attention forward + backward")
    with pytest.raises(ValueError):
        title_of([{"mode": "fwd"}, {"mode": "bwd"}])


def _explicit_grads(q, k, v, dout, causal):
    """dq, dk, dv of softmax(q k^T / sqrt(d)) v in float64, written out, [B, S, H, D]."""
    import torch
    s, d = q.shape[1], q.shape[3]
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    scores = torch.einsum("bshd,bthd->bhst", qd, kd) / d ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhst,bthd->bshd", scores.softmax(-1), vd)
    return torch.autograd.grad(o, (qd, kd, vd), dout.double())


def test_reference_grads_in_slices_match_the_written_out_backward():
    import pytest
    torch = pytest.importorskip("torch")
    from bench.attention import reference_grads
    torch.manual_seed(0)
    b, s, h, d = 2, 24, 3, 16
    q, k, v, dout = (torch.randn(b, s, h, d, dtype=torch.bfloat16) for _ in range(4))
    for causal in (False, True):
        expected = _explicit_grads(q, k, v, dout, causal)
        # 2 heads' scores per slice: 3 slices over the 6 (batch, head) pairs; and all in one
        for chunk_bytes in (2 * 4 * s * s, 1 << 28):
            got = reference_grads(q, k, v, dout, causal, chunk_bytes=chunk_bytes)
            for g, e in zip(got, expected):
                assert g.shape == (b, s, h, d) and g.dtype == torch.float32
                assert (g.double() - e).abs().max().item() < 1e-4


def test_sdpa_backward_repeats_the_backward_of_the_graph_built_once():
    import pytest
    torch = pytest.importorskip("torch")
    from torch.nn.attention import SDPBackend
    from bench.attention import grad_errors, reference_grads, sdpa_backward
    torch.manual_seed(1)
    q, k, v, dout = (torch.randn(2, 40, 2, 32) for _ in range(4))
    for causal in (False, True):
        ref = reference_grads(q, k, v, dout, causal)
        for forward in (False, True):
            f = sdpa_backward(SDPBackend.MATH, q, k, v, dout, causal, forward=forward)
            for _ in range(2):  # the retained graph answers every call
                grads = [g.transpose(1, 2) for g in f()]
                assert all(e < 1e-5 for e in grad_errors(grads, ref).values())
    # the inputs themselves stay out of autograd: the other implementations take them as they are
    assert not any(x.requires_grad for x in (q, k, v, dout))
