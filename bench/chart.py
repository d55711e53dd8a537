"""A bar chart of an attention results file, laid out like FA3's Figure 5: one panel per
(head dim, causal), sequence length on the x axis, one bar per implementation.

    python -m bench chart bench/results/attention-fwd-grid-....json [--timing cold] [--out file.png]
    python -m bench chart bench/results/attention-bwd-....json

The title names the file's pass (its rows' `mode`: forward, backward or both; the oldest files
have no such key and are forward).

All bars of a chart come from one timing method (a row's `timing`; the oldest files
have one method per implementation and no such key): by default "cold", the one that times FA3
and the torch-side implementations alike, with L2 flushed as do_bench does.
"""
import argparse
import json
import os
import sys

ORDER = ["fa2-sdpa", "cudnn-sdpa", "fa3", "numba_fa3-det", "numba_fa3"]
COLORS = {"fa2-sdpa": "#9e9e9e", "cudnn-sdpa": "#4c72b0", "fa3": "#dd8452", "numba_fa3-det": "#a6d8b0",
          "numba_fa3": "#55a868"}
#: A pass (a row's `mode`) -> the chart's title; TFLOPS count the backward as 2.5 forwards
#: (bench/attention.py, PASS_FLOPS).
TITLES = {"fwd": "Attention forward", "bwd": "Attention backward (2.5x the forward's FLOPs)",
          "fwd+bwd": "Attention forward + backward (3.5x the forward's FLOPs)"}


def title_of(rows):
    """The title of a chart of `rows`, which must all be of one pass."""
    modes = {r.get("mode", "fwd") for r in rows}
    if len(modes) != 1:
        raise ValueError(f"rows of several passes ({sorted(modes)}) would share bars")
    return TITLES[modes.pop()]


def run(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench chart")
    p.add_argument("results")
    p.add_argument("--timing", default="cold", help="which rows' timing to plot, where rows have one")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.load(open(args.results))
    rows, meta = data["rows"], data["meta"]
    if any("timing" in r for r in rows):
        rows = [r for r in rows if r.get("timing") == args.timing]
        if not rows:
            sys.exit(f"no rows timed by {args.timing!r} in {args.results}")
    panels = sorted({(r["hdim"], r["causal"]) for r in rows})
    seqlens = sorted({r["seqlen"] for r in rows})
    impls = [i for i in ORDER if any(r["impl"] == i for r in rows)]
    fig, axes = plt.subplots(len(panels) // 2 + len(panels) % 2, 2, figsize=(13, 3.4 * ((len(panels) + 1) // 2)),
                             squeeze=False)
    width = 0.8 / len(impls)
    for ax, (d, causal) in zip(axes.flat, panels):
        for k, impl in enumerate(impls):
            vals = [next((r["tflops"] for r in rows if r["impl"] == impl and r["hdim"] == d
                          and r["causal"] == causal and r["seqlen"] == s), 0) for s in seqlens]
            xs = [i + (k - (len(impls) - 1) / 2) * width for i in range(len(seqlens))]
            bars = ax.bar(xs, vals, width, label=impl, color=COLORS.get(impl))
            for b, v in zip(bars, vals):
                if v:
                    ax.text(b.get_x() + b.get_width() / 2, v + 5, f"{v:.0f}", ha="center", va="bottom", fontsize=6)
        ax.set_xticks(range(len(seqlens)))
        ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
        ax.set_title(f"head dim {d}, {'causal' if causal else 'non-causal'}", fontsize=10)
        ax.set_ylabel("TFLOPS")
        ax.set_ylim(0, max(r["tflops"] for r in rows) * 1.15)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, ncol=len(impls), loc="upper left")
    fig.suptitle(f"{title_of(rows)}, bf16, 16k tokens, hidden 2048 — {meta.get('device')} "
                 f"{meta.get('date')} commit {meta.get('commit')}"
                 + (f", timing {args.timing}" if rows and "timing" in rows[0] else ""), fontsize=11)
    fig.tight_layout()
    out = args.out or os.path.splitext(args.results)[0] + ".png"
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    run(sys.argv[1:])
