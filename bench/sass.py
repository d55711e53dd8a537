"""The forward kernel's main loop as ptxas compiled it, on this machine, no GPU: registers and
spills, and for each loop of the consumers' step its length and instruction mix, for the base and
for each --variant (the syntax of `bench variants`).  Most of what moves
the step by a few percent is where ptxas puts things; this is the look before an A/B on the
device, e.g. how many instructions a change saved, or whether the rescale multiplies ended up
among the exponentials.

    python -m bench sass --hdim 128 --mask causal --variant r4 rescale_rounds=4 --dump /tmp/s

--dump writes each kernel's PTX, SASS and the step loops' instruction lists there.  Needs
nvdisasm: from a CUDA toolkit on PATH or `pip install nvidia-cuda-nvdisasm`.
"""
import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from .variants import add_variant_args, kernel_makers

#: A step loop issues both GEMMs and the softmax's exponentials: at least one HGMMA and this many
#: MUFU (the smallest step, hdim 256's 80 keys, has 42).
MIN_STEP_MUFU = 16
#: A masked step is longer than the plain one (FA3's hdim 128: 616 against 469 instructions), a
#: tile loop several steps long.
STEP_LENGTH_SPREAD = 2

_INSTR = re.compile(r"/\*[0-9a-f]{4,}\*/\s+((?:@!?U?P[T0-9]+\s+)?)([A-Z][A-Z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*?`\((\.L_x_\d+)\)")


@dataclass
class Loop:
    """A back edge's body: SASS lines [start, end] and its instructions as (opcode, text)."""
    start: int
    end: int
    ops: list

    def mix(self):
        """Instruction count per base opcode (the part before the first '.')."""
        return collections.Counter(op.split(".")[0] for op, _ in self.ops)

    def __len__(self):
        return len(self.ops)

    def exp2_before_pv_wait(self):
        """How many exponentials (MUFU.EX2) run before the step's P V wait (the wait for every
        wgmma group, `WARPGROUP.DEPBAR.LE gsb0, 0x0`); None if the loop has no such wait.  Where
        ptxas puts that wait among the exponentials is what moved the step by a few percent in
        the forward's history (bench/NOTES.md)."""
        n = 0
        for op, text in self.ops:
            if op == "WARPGROUP.DEPBAR.LE" and text.replace(" ", "").endswith("gsb0,0x0"):
                return n
            n += op == "MUFU.EX2"
        return None


def find_nvdisasm():
    exe = shutil.which("nvdisasm")
    if exe:
        return exe
    try:
        import nvidia.cu13 as cu13  # the nvidia-cuda-nvdisasm wheel installs under nvidia/cu13
        for root in cu13.__path__:
            cand = os.path.join(root, "bin", "nvdisasm")
            if os.path.exists(cand):
                return cand
    except ImportError:
        pass
    return None


def disassemble(cubin):
    exe = find_nvdisasm()
    if exe is None:
        raise RuntimeError("nvdisasm not found: pip install nvidia-cuda-nvdisasm (or put a CUDA toolkit on PATH)")
    return subprocess.run([exe, "-c", cubin], capture_output=True, text=True, check=True).stdout


def instructions(lines):
    """(opcode, text) of each SASS instruction in `lines`; a predicate guard stays in the text."""
    out = []
    for line in lines:
        m = _INSTR.search(line)
        if m:
            out.append((m.group(2), (m.group(1) + m.group(2) + m.group(3)).strip()))
    return out


def loops(sass):
    """Every backward branch's body, innermost first within the listing order."""
    lines = sass.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    found = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            start = labels[m.group(1)]
            found.append(Loop(start, i, instructions(lines[start:i + 1])))
    return found


def step_loops(sass):
    """The loops that hold a whole step (GEMMs and exponentials) and no other such loop: the
    plain step's.  Left out: the try-wait retry loops (no HGMMA); loops around another candidate
    (in masked kernels the masked steps run in the loop around the plain one); and the tile
    loop, which ptxas may lay out beside the step loop rather than around it, but which is
    several steps long (hdim 128: ~1600 instructions against ~480).  With
    Tiles.sequential_mask_loops the masked steps' loops sit beside the plain one and are kept
    (at most STEP_LENGTH_SPREAD times its length)."""
    cands = [lp for lp in loops(sass)
             if lp.mix()["HGMMA"] >= 1 and lp.mix()["MUFU"] >= MIN_STEP_MUFU]
    cands = [lp for lp in cands
             if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in cands)]
    shortest = min((len(lp) for lp in cands), default=0)
    return [lp for lp in cands if len(lp) <= STEP_LENGTH_SPREAD * shortest]


#: Opcodes whose first register operand is a source: they write predicates only.
_PREDICATE_WRITERS = frozenset({"ISETP", "FSETP", "DSETP", "HSETP2", "PSETP", "PLOP3", "UISETP", "UPLOP3"})
_PREDICATE = re.compile(r"!?U?P(T|\d+)")
_REGISTER = re.compile(r"R(\d+)")
_HGMMA_SHAPE = re.compile(r"HGMMA\.64x(\d+)x\d+\.F32")


def _opcode_operands(text):
    """(opcode, [operand, ...]) of an instruction's text, its predicate guard dropped."""
    opcode, _, rest = re.sub(r"^@!?U?P[T0-9]+\s+", "", text.strip()).partition(" ")
    return opcode, [o.strip() for o in rest.split(",") if o.strip()]


def written_registers(text):
    """The general registers (numbers) an instruction's text writes: its first operand after any
    predicate destinations, widened for multi-register results (.64 / .WIDE: 2, .128 and
    LDSM's .4: 4, an fp32 HGMMA's accumulator: n / 2).  Stores, barriers and the SETP family
    write none.  RZ is not a register."""
    opcode, operands = _opcode_operands(text)
    if opcode.split(".")[0] in _PREDICATE_WRITERS:
        return set()
    while operands and _PREDICATE.fullmatch(operands[0]):
        operands.pop(0)
    m = _REGISTER.fullmatch(operands[0]) if operands else None
    if not m:
        return set()
    first, parts = int(m.group(1)), opcode.split(".")
    hgmma = _HGMMA_SHAPE.match(opcode)
    if hgmma:
        width = int(hgmma.group(1)) // 2
    elif "128" in parts or (parts[0] == "LDSM" and parts[-1] == "4"):
        width = 4
    elif "64" in parts or "WIDE" in parts:
        width = 2
    else:
        width = 1
    return set(range(first, first + width))


def a_fragment_clobbers(sass):
    """Instructions inside a loop that overwrite a register-A wgmma operand the loop's HGMMAs
    read and that ldmatrix loaded outside it (Q in registers, `Tiles.q_in_registers`): the next
    pass reads those registers again, so any write to them there is a miscompile.  Loops that
    reload the fragments themselves (the tile loop) are left out.  ptxas 13.0 did this to
    the no-overlap ablation's step loop, though the PTX keeps the fragments live across it."""
    def loaded(ops):
        return {min(written_registers(text)) for op, text in ops if op.startswith("LDSM")}
    everywhere = loaded(instructions(sass.splitlines()))
    bad = []
    for lp in loops(sass):
        quads, reloaded = set(), loaded(lp.ops)
        for op, text in lp.ops:
            operands = _opcode_operands(text)[1] if op.startswith("HGMMA") else []
            a = _REGISTER.fullmatch(operands[1]) if len(operands) > 1 else None
            if a and int(a.group(1)) in everywhere and int(a.group(1)) not in reloaded:
                quads |= set(range(int(a.group(1)), int(a.group(1)) + 4))
        bad += [text for op, text in lp.ops if not op.startswith("HGMMA") and written_registers(text) & quads]
    return list(dict.fromkeys(bad))


def report(kernel, dump=None, name="base"):
    """dict(registers, spills, loops=[Loop]) of one FlashForward; with `dump` its PTX, SASS and
    loops are written there as NAME.ptx, NAME.sass, NAME.loopK.txt."""
    from numba_fa3.primitives import compile as kc
    ptx = kernel.compile_ptx()
    with tempfile.TemporaryDirectory() as d:
        cubin = os.path.join(d, "k.cubin")
        stats = kc.ptxas_report(ptx, cubin=cubin)
        sass = disassemble(cubin)
    found = step_loops(sass)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext, text in (("ptx", ptx), ("sass", sass)):
            with open(os.path.join(dump, f"{name}.{ext}"), "w") as f:
                f.write(text)
        for k, lp in enumerate(found):
            with open(os.path.join(dump, f"{name}.loop{k}.txt"), "w") as f:
                f.write("\n".join(t for _, t in lp.ops) + "\n")
    return dict(registers=stats["registers"], spills=stats["spill_stores"] + stats["spill_loads"],
                stack=stats["stack"], warnings=stats["warnings"], loops=found, sass=sass)


def _mix_line(mix, base=None, top=12):
    if base is None:
        return " ".join(f"{k} {v}" for k, v in mix.most_common(top))
    keys = sorted(set(mix) | set(base), key=lambda k: -abs(mix[k] - base[k]))
    return " ".join(f"{k} {mix[k] - base[k]:+d}" for k in keys if mix[k] != base[k])[:200] or "(same mix)"


def run(argv=None):
    from numba_fa3 import mask
    p = argparse.ArgumentParser(prog="python -m bench sass")
    p.add_argument("--hdim", type=int, required=True)
    p.add_argument("--mask", choices=("full", "causal", "local"), default="full")
    p.add_argument("--dtype", choices=("bf16", "f16"), default="bf16")
    p.add_argument("--long-queries", action="store_true", help="the long-query tiles (tiles.LONG_TILES)")
    p.add_argument("--dump", help="directory for each kernel's PTX, SASS and step loops")
    add_variant_args(p)
    args = p.parse_args(argv)
    kind = {"full": mask.MASK_NONE, "causal": mask.MASK_CAUSAL, "local": mask.MASK_LOCAL}[args.mask]
    base_loops = None
    for name, make in kernel_makers(args.variant).items():
        r = report(make(args.dtype, args.hdim, kind, long_queries=args.long_queries), args.dump, name)
        print(f"{name}: {r['registers']} registers, {r['spills']} bytes spilled, stack {r['stack']}"
              + (f", {len(r['warnings'])} warnings" if r["warnings"] else ""))
        for k, lp in enumerate(r["loops"]):
            ref = base_loops[k] if base_loops is not None and k < len(base_loops) else None
            delta = f" ({len(lp) - len(ref):+d})" if ref is not None else ""
            print(f"  step loop {k}: {len(lp)} instructions{delta}, {lp.exp2_before_pv_wait()} exponentials "
                  "before the P V wait: " + _mix_line(lp.mix(), ref.mix() if ref is not None else None))
        if base_loops is None:
            base_loops = r["loops"]


if __name__ == "__main__":
    run(sys.argv[1:])
