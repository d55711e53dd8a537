"""Host-side plumbing that needs no GPU: stream handles, array inspection."""
import ctypes

import numpy as np
import pytest

from primitives import launch, tensors


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
