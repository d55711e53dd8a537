"""What a new user meets first, without a GPU: one clear error naming the NumPy reference,
`python -m bench --help`, and the bench extra named where a command needs it."""
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from numba_fa3.primitives import launch, tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _no_hopper():
    from conftest import hopper_available
    return not hopper_available()


@pytest.mark.skipif(not _no_hopper(), reason="a Hopper GPU is here")
@pytest.mark.parametrize("call", ["flash_attn", "flash_attn_varlen", "matmul"])
def test_without_a_hopper_gpu_one_clear_error(call):
    from numba_fa3 import flash_attn, flash_attn_varlen
    from numba_fa3.primitives.gemm import matmul
    rng = np.random.default_rng(11)
    bf16 = tensors.NUMPY_DTYPES["bf16"]
    with pytest.raises(launch.NoHopperGPU) as info:
        if call == "flash_attn":
            q = rng.standard_normal((1, 40, 2, 64)).astype(bf16)
            flash_attn(q, q, q, causal=True)
        elif call == "flash_attn_varlen":
            q = rng.standard_normal((40, 2, 64)).astype(bf16)
            cu = np.array([0, 17, 40], np.int32)
            flash_attn_varlen(q, q, q, cu, cu, 23, 23)
        else:
            a = rng.standard_normal((48, 64)).astype(bf16)
            matmul(a, a)
    message = str(info.value)
    assert message.startswith("numba_fa3 needs an NVIDIA Hopper GPU (sm_90); found ")
    assert "numba_fa3.reference.attention_reference runs anywhere (NumPy)" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no driver traceback


def test_reference_named_in_the_error_exists():
    import importlib
    module, _, name = launch.REFERENCE.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))


def test_another_gpu_is_named(monkeypatch):
    a100 = SimpleNamespace(compute_capability=(8, 0), name=b"NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(launch.cuda, "get_current_device", lambda: a100)
    with pytest.raises(launch.NoHopperGPU, match=r"found NVIDIA A100-SXM4-80GB \(sm_80\) — numba_fa3"):
        launch.check_hopper()
    monkeypatch.setattr(launch.cuda, "get_current_device",
                        lambda: SimpleNamespace(compute_capability=(9, 0), name="NVIDIA H100"))
    launch.check_hopper()


def test_numpy_without_row_stack_still_compiles_with_numba_cuda():
    """NumPy 2.5 dropped np.row_stack, which numba-cuda registers at its first compile: the
    packages restore it before numba-cuda loads (ptx_inline/_numpy_compat.py)."""
    import numba_fa3.ptx_inline as ptx_inline  # noqa: F401
    assert np.row_stack is np.vstack or np.lib.NumpyVersion(np.__version__) < "2.5.0"


def _bench(*args):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)


def test_bench_help_describes_every_command():
    from bench.__main__ import COMMANDS, command_module
    r = _bench("--help")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ") and "needs:" not in line]
    assert listed == list(COMMANDS) and all(what and needs for what, needs in COMMANDS.values())
    assert "pip install -e '.[bench]'" in r.stdout
    for name in COMMANDS:  # every listed command is a module with run(argv)
        assert callable(command_module(name).run)
    bad = _bench("nosuch")
    assert bad.returncode == 2 and "unknown command 'nosuch'" in bad.stderr


@pytest.mark.skipif(__import__("importlib").util.find_spec("torch") is not None, reason="torch is installed")
def test_bench_command_without_torch_names_the_extra():
    r = _bench("gemm", "--sizes", "256")
    assert r.returncode == 1
    assert r.stderr.strip() == "python -m bench gemm needs torch: install the bench extra: pip install -e '.[bench]'"


def test_stream_objects_of_the_cuda_stream_protocol():
    class CoreStream:  # cuda.core's protocol: (version, handle)
        def __cuda_stream__(self):
            return (0, 0x4242)
    assert launch.stream_handle(CoreStream()) == 0x4242
