"""A first look on a new GPU: small GEMMs, with where the errors sit when they are wrong."""
import numpy as np

from numba_fa3.primitives import gemm
from numba_fa3.primitives.tensors import NUMPY_DTYPES


def main():
    rng = np.random.default_rng(0)
    bf16 = NUMPY_DTYPES["bf16"]
    for (m, n, k, tb) in [(128, 256, 64, True), (128, 256, 64, False), (256, 512, 512, True),
                          (256, 512, 512, False), (300, 200, 136, True), (1000, 1000, 1000, False)]:
        a = rng.standard_normal((m, k)).astype(bf16)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(bf16)
        ref = a.astype(np.float64) @ (b.astype(np.float64).T if tb else b.astype(np.float64))
        out = gemm.matmul(a, b, transpose_b=tb, out_dtype="f32").astype(np.float64)
        err = np.abs(out - ref)
        rel = err.max() / np.abs(ref).max()
        print(f"m={m} n={n} k={k} transpose_b={tb}: max rel err {rel:.2e}", flush=True)
        if not rel < 1e-3:
            bad = np.argwhere(err > 1e-2 * np.abs(ref).max())
            print("  wrong at", bad[:8].tolist(), "count", len(bad), "rows", np.unique(bad[:, 0])[:20],
                  "cols", np.unique(bad[:, 1])[:20])
            print("  out[0,:8]", out[0, :8], "\n  ref[0,:8]", ref[0, :8])


if __name__ == "__main__":
    main()
