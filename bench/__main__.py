"""`python -m bench gemm ...` | `python -m bench attention ...`"""
import sys

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("gemm", "attention"):
        sys.exit("usage: python -m bench {gemm,attention} [options]")
    if sys.argv[1] == "gemm":
        from .gemm import run
    else:
        from .attention import run
    run(sys.argv[2:])
