"""Benchmark plumbing: run metadata, JSON results, a plain-text table."""
import datetime
import json
import os
import subprocess

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def meta():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(RESULTS)).stdout.strip() or None
    except OSError:
        commit = None
    commit = os.environ.get("NUMBA_FA3_COMMIT", commit)
    device = None
    try:
        import torch
        device = torch.cuda.get_device_name()
    except Exception:
        pass
    return dict(device=device, date=datetime.date.today().isoformat(), commit=commit)


def write_json(path, obj, quiet=False):
    """Write obj as JSON, whole or not at all: through a temporary file renamed over `path`, so a
    run killed mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


def table(rows, cols):
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


#: FA3's Figure 5: 16k tokens per batch, hidden dimension 2048.
TOKENS, HIDDEN = 16384, 2048


def attention_problem(seqlen, hdim, causal, device="cuda"):
    """Figure 5's inputs at one point: random bf16 q, k, v [B, S, H, D] with B = TOKENS / S and
    H = HIDDEN / D.  Returns (batch, heads, q, k, v, flops, SDPA's output for an error check);
    flops = 4 B H S^2 D, halved for causal."""
    import torch
    b, h = TOKENS // seqlen, HIDDEN // hdim
    q, k, v = (torch.randn(b, seqlen, h, hdim, device=device, dtype=torch.bfloat16) for _ in range(3))
    flops = 4.0 * b * h * seqlen * seqlen * hdim / (2 if causal else 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal).transpose(1, 2)
    return b, h, q, k, v, flops, ref


def grid(args):
    """(hdim, causal, seqlen, attention_problem(...)) over a command's --hdims, --causal (strings
    "true"/"false") and --seqlens, in that nesting order."""
    for d in args.hdims:
        for causal in [c == "true" for c in args.causal]:
            for s in args.seqlens:
                yield d, causal, s, attention_problem(s, d, causal)
