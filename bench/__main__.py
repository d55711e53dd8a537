"""`python -m bench <command> [options]`, commands in COMMANDS."""
import importlib
import sys

COMMANDS = ("gemm", "attention", "ablation", "profile", "launch", "chart", "trace", "variants", "maskcost", "power",
            "sass")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m bench {{{','.join(COMMANDS)}}} [options]")
    importlib.import_module(f".{sys.argv[1]}", __package__).run(sys.argv[2:])
