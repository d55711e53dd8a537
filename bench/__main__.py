"""`python -m bench <command> [options]`: the benchmarks and kernel inspections; `--help` lists
them, `python -m bench <command> --help` gives a command's options."""
import importlib
import sys

#: command -> (what it does, what it needs beyond the library)
COMMANDS = {
    "gemm": ("our GEMM beside torch.matmul (cuBLAS), TFLOPS per size and dtype", "GPU, bench extra"),
    "attention": ("flash_attn beside FA3 and PyTorch SDPA (FA2, cuDNN) over FA3's Figure-5 grid, "
                  "cold and steady TFLOPS; --pass bwd or fwd+bwd for the backward",
                  "GPU, bench extra; FA3's library for its column"),
    "chart": ("the bar chart (PNG) of an attention results file", "bench extra (matplotlib)"),
    "ablation": ("the schedule ablation (FA3 Table 2): ping-pong and/or intra-warpgroup overlap off",
                 "GPU, bench extra"),
    "profile": ("one forward or backward configuration (ours or FA3's) run a few times: a target for ncu / compute-sanitizer",
                "GPU, bench extra"),
    "launch": ("does per-call host time show? plain calls vs CUDA-graph replay", "GPU, bench extra"),
    "trace": ("where a tile's cycles go: the %clock64 trace build of the forward kernel", "GPU, bench extra"),
    "variants": ("A/B of FlashForward knobs (class attributes), launches interleaved",
                 "GPU, bench extra; FA3's library for its column"),
    "bwd-variants": ("A/B of the backward's tiles (e.g. 80-query blocks) and its deterministic mode, "
                     "launches interleaved", "GPU, bench extra"),
    "maskcost": ("what the causal mask costs beyond its work, ours and FA3's", "GPU, bench extra"),
    "power": ("SM clock, board power and throttling per implementation under sustained load",
              "GPU, bench extra, nvidia-smi"),
    "sass": ("registers, spills and the main loop's instruction mix of forward-kernel variants",
             "no GPU; test extra (ptxas, nvdisasm)"),
    "fp8": ("the FP8 forward beside cuDNN's FP8 and our bf16 forward over the Figure-5 grid: TFLOPS, "
            "quantizer and V-transpose TB/s, kernel-only and end-to-end ratios",
            "GPU, bench extra; the cuDNN frontend and .fa3/cudnn_fp8.py for cuDNN's column"),
    "fp8-accuracy": ("FA3 Table 3 on the CPU: RMSE of the bf16 and FP8 NumPy models (per-tensor, "
                     "per-block, Hadamard rotation) on inputs with outliers", "no GPU"),
}
#: Modules of the `bench` extra (pyproject.toml); a command missing one says how to get it.
BENCH_EXTRA = ("torch", "triton", "matplotlib")


def usage():
    width = max(map(len, COMMANDS))
    lines = ["usage: python -m bench <command> [options]   (python -m bench <command> --help for its options)",
             "", "commands:"]
    for name, (what, needs) in COMMANDS.items():
        lines.append(f"  {name:<{width}}  {what}")
        lines.append(f"  {'':<{width}}  needs: {needs}")
    lines += ["", "bench extra: pip install -e '.[bench]'  (torch, triton, matplotlib)"]
    return "\n".join(lines)


def command_module(command):
    """The module that runs a command: its name with '-' as '_' (a module name is an identifier)."""
    return importlib.import_module(f".{command.replace('-', '_')}", __package__)


def main(argv):
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        command_module(command).run(rest)
    except ModuleNotFoundError as e:
        root = (e.name or "").split(".")[0]
        if root not in BENCH_EXTRA:
            raise
        print(f"python -m bench {command} needs {root}: install the bench extra: pip install -e '.[bench]'",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
