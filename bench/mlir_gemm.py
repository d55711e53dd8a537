"""The worked-example GEMM (primitives/gemm.py: warp-specialized, TMA + mbarrier ring, two consumer
warpgroups of m64n256k16 wgmmas, setmaxnreg, swizzled staging and TMA stores, persistent grouped
tiles) ported to numba-cuda-mlir, NVIDIA's successor of numba-cuda, as an experiment kept outside
the library.  bf16 in, bf16 out, C = A @ B^T, the same tile configuration and kernel parameters
as `GemmKernel()` (descriptor table address, tiles_m, tiles_n, k_blocks), so both cubins launch
through the same `launch.CompiledKernel` and read the same tensor maps.

    python bench/mlir_gemm.py compile [--dump DIR]   # needs numba-cuda-mlir; no GPU: both kernels
        # compiled for sm_90a: compile time, registers, spills, the consumers' main-loop SASS mix;
        # writes the numba-cuda-mlir kernel to bench/results/mlir-gemm-sm90a.kernel (its entry
        # name on the first line, then the cubin)
    python bench/mlir_gemm.py time [--size 8192] [--rounds 20]   # GPU + torch, no numba-cuda-mlir:
        # both GEMMs at size^3 bf16, launches interleaved, TFLOPS and max error vs torch.matmul

Every instruction is the PTX text of the ptx_inline/ intrinsic it replaces: through
`numba_cuda_mlir.cuda.experimental.inline_ptx` where its operands are few, and for the four that
carry the 128 accumulator registers (wgmma fence, mma_async, wait_group 1 and 0) through
`cuda.intrin.define` with MLIR source holding an `llvm.inline_asm` with tied operands, because
`inline_ptx` cannot: a read-write ("+f") operand's new value is not returned, and a call of more
than 30 arguments that passes variables fails in its typing (numba-cuda-mlir 0.6.0, measured
with 8 accumulators).  The kernel body is generated source text: 128 registers are 128 names.
"""
import argparse
import os
import re
import sys
import time

# Run as a script: the repository root replaces this folder on the path (bench/profile.py would
# shadow the standard library's profile module, which numba-cuda-mlir imports).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CUBIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mlir-gemm-sm90a.kernel")
NACC = 128  # m64n256 fp32 accumulator: 128 registers per thread


def _ours():
    from numba_fa3.primitives.gemm import GemmKernel
    return GemmKernel("bf16", "bf16", True)


def kernel_source(k):
    """numba-cuda-mlir source of GemmKernel k's kernel (bf16 -> bf16, B K-major)."""
    from numba_fa3.primitives import smem, warpgroup
    from numba_fa3.primitives.tma_desc import TENSOR_MAP_BYTES
    acc = [f"a{i}" for i in range(NACC)]
    accs = ", ".join(acc)
    desc_a = smem.descriptor_base(0, smem.ATOM_BYTES)
    c = dict(BM=k.block_m, BN=k.block_n, BK=k.block_k, STAGES=k.stages, GROUP=k.group_m, A_STAGE=k.a_stage,
             B_STAGE=k.b_stage, TX=k.a_stage + k.b_stage, K_STEPS=k.block_k // 16, KSTEP=32,
             OFF_A=k.smem.offsets["a"], OFF_B=k.smem.offsets["b"], OFF_C=k.smem.offsets["c"],
             OFF_BARS=k.smem.offsets["barriers"], CONSUMER_WARPS=k.consumers * 4, REG_P=k.registers[0],
             REG_C=k.registers[1], MAP_B=TENSOR_MAP_BYTES, MAP_C=2 * TENSOR_MAP_BYTES, CHUNK=k.out_chunk,
             CHUNKS=k.block_n // k.out_chunk_cols, CC=k.out_chunk_cols, WG_ROWS=64 * 128,
             DESC_LO=desc_a & 0xFFFFFFFF, DESC_HI=desc_a >> 32, WGT=warpgroup.WARPGROUP_THREADS)
    def through(fn):
        return f"{accs} = {fn}({accs})"
    epi = []
    for ch in range(c["CHUNKS"]):
        epi.append(f"""
                buf = staging + (chunk_count % 2) * {c['CHUNK']}
                if tid == 0:
                    ptx("cp.async.bulk.wait_group.read 1;")
                ptx("bar.sync %0, %1;", "r", 1 + wg, "r", {c['WGT']})""")
        for g in range(c["CC"] // 8):
            i = 4 * (ch * (c["CC"] // 8) + g)
            epi.append(f"""
                cb = {8 * g * 2} + 4 * cpair
                ptx("{{\\n.reg .b32 t;\\ncvt.rn.bf16x2.f32 t, %2, %1;\\nst.shared.b32 [%0], t;\\n}}", "r", buf + swz(r, cb), "f", a{i}, "f", a{i + 1})
                ptx("{{\\n.reg .b32 t;\\ncvt.rn.bf16x2.f32 t, %2, %1;\\nst.shared.b32 [%0], t;\\n}}", "r", buf + swz(r + 8, cb), "f", a{i + 2}, "f", a{i + 3})""")
        epi.append(f"""
                ptx("fence.proxy.async.shared::cta;")
                ptx("bar.sync %0, %1;", "r", 1 + wg, "r", {c['WGT']})
                if tid == 0:
                    ptx("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {{%1, %2}}], [%3];", "l", maps + {c['MAP_C']}, "r", tn * {c['BN']} + {ch * c['CC']}, "r", row0, "r", buf)
                    ptx("cp.async.bulk.commit_group;")
                chunk_count += 1""")
    kk = "".join(f"""
                da = desc(a_base, {kk * c['KSTEP']})
                db = desc(b_base, {kk * c['KSTEP']})
                scale = {'1 if kb > 0 else 0' if kk == 0 else '1'}
                {accs} = acc_mma({accs}, da, db, scale)"""
                 for kk in range(c["K_STEPS"]))
    zero = ", ".join("np.float32(0)" for _ in acc)  # float32: a Python 0.0 types the registers as float64
    return f'''
import numpy as np
from numba_cuda_mlir import cuda
from numba_cuda_mlir.cuda import experimental as exp


@cuda.jit(device=True, inline="always")
def swz(row, byte):
    return row * 128 + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15)


@cuda.jit(device=True, inline="always")
def desc(addr, offset):
    lo = (((addr >> 4) & 0x3FFF) | {c['DESC_LO']}) + (offset >> 4)
    return ptx("mov.b64 %0, {{%1, %2}};", "=l", 0, "r", lo, "r", {c['DESC_HI']})


@cuda.jit(device=True, inline="always")
def wait(bar, parity):
    done = 0
    while done == 0:
        done = ptx("{{\\n.reg .pred P;\\nmbarrier.try_wait.parity.shared::cta.b64 P, [%1], %2;\\nselp.u32 %0, 1, 0, P;\\n}}", "=r", 0, "r", bar, "r", parity)


@cuda.jit(device=True, inline="always")
def coords(tile, tiles_m, tiles_n):
    per_group = {c['GROUP']} * tiles_n
    first_m = (tile // per_group) * {c['GROUP']}
    rows = min(tiles_m - first_m, {c['GROUP']})
    local = tile % per_group
    return first_m + local % rows, local // rows


def gemm_kernel(maps, tiles_m, tiles_n, k_blocks):
    dyn = cuda.shared.array(0, dtype=np.uint8)
    raw = ptx("cvta.to.shared.u64 %0, %1;", "=l", 0, "C", dyn)
    base = np.int32((raw + 1023) & ~1023)
    bars = base + {c['OFF_BARS']}
    if cuda.threadIdx.x == 0:
        for s in range({c['STAGES']}):
            ptx("mbarrier.init.shared::cta.b64 [%0], %1;", "r", bars + s * 8, "r", 1)
            ptx("mbarrier.init.shared::cta.b64 [%0], %1;", "r", bars + ({c['STAGES']} + s) * 8, "r", {c['CONSUMER_WARPS']})
        ptx("fence.mbarrier_init.release.cluster;")
    cuda.syncthreads()
    wg = cuda.threadIdx.x // {c['WGT']}
    tid = cuda.threadIdx.x % {c['WGT']}
    if wg == 0:
        ptx("setmaxnreg.dec.sync.aligned.u32 {c['REG_P']};")
        elected = ptx("{{\\n.reg .pred P;\\nelect.sync _|P, 0xffffffff;\\nselp.u32 %0, 1, 0, P;\\n}}", "=r", 0)
        if tid < 32 and elected != 0:
            ptx("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;", "l", maps)
            ptx("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;", "l", maps + {c['MAP_B']})
            index = 0
            phase = 0
            tile = cuda.blockIdx.x
            while tile < tiles_m * tiles_n:
                tm, tn = coords(tile, tiles_m, tiles_n)
                for kb in range(k_blocks):
                    wait(bars + ({c['STAGES']} + index) * 8, phase ^ 1)
                    full = bars + index * 8
                    ptx("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;", "r", full, "r", {c['TX']})
                    ptx("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {{%2, %3}}], [%4];", "r", base + {c['OFF_A']} + index * {c['A_STAGE']}, "l", maps, "r", kb * {c['BK']}, "r", tm * {c['BM']}, "r", full)
                    ptx("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {{%2, %3}}], [%4];", "r", base + {c['OFF_B']} + index * {c['B_STAGE']}, "l", maps + {c['MAP_B']}, "r", kb * {c['BK']}, "r", tn * {c['BN']}, "r", full)
                    if index == {c['STAGES'] - 1}:
                        index = 0
                        phase ^= 1
                    else:
                        index += 1
                tile += cuda.gridDim.x
    else:
        ptx("setmaxnreg.inc.sync.aligned.u32 {c['REG_C']};")
        wg -= 1
        lane = tid % 32
        r = 16 * (tid // 32) + (tid % 32) // 4
        cpair = tid % 4
        staging = base + {c['OFF_C']} + wg * 2 * {c['CHUNK']}
        index = 0
        phase = 0
        chunk_count = 0
        tile = cuda.blockIdx.x
        while tile < tiles_m * tiles_n:
            tm, tn = coords(tile, tiles_m, tiles_n)
            {accs} = {zero}
            prev = 0
            for kb in range(k_blocks):
                wait(bars + index * 8, phase)
                a_base = base + {c['OFF_A']} + index * {c['A_STAGE']} + wg * {c['WG_ROWS']}
                b_base = base + {c['OFF_B']} + index * {c['B_STAGE']}
                {through("acc_fence")}{kk}
                ptx("wgmma.commit_group.sync.aligned;")
                {through("acc_wait1")}
                if kb > 0 and lane == 0:
                    ptx("mbarrier.arrive.shared::cta.b64 _, [%0];", "r", bars + ({c['STAGES']} + prev) * 8)
                prev = index
                if index == {c['STAGES'] - 1}:
                    index = 0
                    phase ^= 1
                else:
                    index += 1
            {through("acc_wait0")}
            if lane == 0:
                ptx("mbarrier.arrive.shared::cta.b64 _, [%0];", "r", bars + ({c['STAGES']} + prev) * 8)
            row0 = tm * {c['BM']} + wg * 64
            if True:{"".join(epi)}
            tile += cuda.gridDim.x
        if tid == 0:
            ptx("cp.async.bulk.wait_group 0;")
'''


def _asm_intrinsic(name, text, extra=()):
    """MLIR source of a function passing the 128 accumulator registers through one inline-asm
    statement, tied (constraints "0".."127"), as ptx_inline/wgmma.py's `_tied` intrinsics do:
    `extra` are (MLIR type, constraint) of operands after the accumulators."""
    st = "!llvm.struct<(" + ", ".join(["f32"] * NACC) + ")>"
    params = [f"%c{i}: f32" for i in range(NACC)] + [f"%x{j}: {t}" for j, (t, _) in enumerate(extra)]
    operands = [f"%c{i}" for i in range(NACC)] + [f"%x{j}" for j in range(len(extra))]
    cons = ",".join(["=f"] * NACC + [str(i) for i in range(NACC)] + [cn for _, cn in extra])
    types_in = ", ".join(["f32"] * NACC + [t for t, _ in extra])
    lines = [f"func.func private @{name}({', '.join(params)}) -> ({', '.join(['f32'] * NACC)}) attributes {{always_inline}} {{",
             f'  %r = llvm.inline_asm has_side_effects asm_dialect = att "{text}", "{cons}" {", ".join(operands)} : ({types_in}) -> {st}']
    lines += [f"  %e{i} = llvm.extractvalue %r[{i}] : {st}" for i in range(NACC)]
    lines += ["  return " + ", ".join(f"%e{i}" for i in range(NACC)) + " : " + ", ".join(["f32"] * NACC), "}"]
    return "\n".join(lines)


def intrinsics():
    """The accumulator's four instructions as numba-cuda-mlir intrinsics (`cuda.intrin.define`
    from MLIR source): an `inline_ptx` call cannot carry them (see the module docstring)."""
    from numba_cuda_mlir import cuda
    base = 2 * NACC
    d = ", ".join(f"${i}" for i in range(NACC))
    mma = ("{\\n.reg .pred p;\\n" f"setp.ne.b32 p, ${base + 2}, 0;\\n"
           f"wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {{{d}}}, ${base}, ${base + 1}, p, 1, 1, 0, 0;\\n}}")
    return {
        "acc_fence": cuda.intrin.define(_asm_intrinsic("acc_fence", "wgmma.fence.sync.aligned;")),
        "acc_wait1": cuda.intrin.define(_asm_intrinsic("acc_wait1", "wgmma.wait_group.sync.aligned 1;")),
        "acc_wait0": cuda.intrin.define(_asm_intrinsic("acc_wait0", "wgmma.wait_group.sync.aligned 0;")),
        "acc_mma": cuda.intrin.define(_asm_intrinsic("acc_mma", mma, (("i64", "l"), ("i64", "l"), ("i32", "r")))),
    }


def compile_mlir(k, dump=None):
    """(entry name, cubin, ptx, seconds) of the numba-cuda-mlir port, for sm_90a, without a GPU."""
    import numba_cuda_mlir.tools as tools
    from numba_cuda_mlir import compiler, types as T
    if tools._cached_cc is None:
        try:
            tools.get_gpu_compute_capability(tuple)
        except Exception:  # noqa: BLE001 - no GPU here: tell it which device to compile for
            tools._cached_cc = (9, 0)
    # `ptx(...)` in the template is `exp.inline_ptx(...)`: a module attribute is what the typing
    # recognises (an alias of the function is an untyped global).
    src = re.sub(r"\bptx\(", "exp.inline_ptx(", kernel_source(k))
    if dump:
        with open(os.path.join(dump, "mlir_gemm_kernel.py"), "w") as f:
            f.write(src)
    path = os.path.join(dump or "/tmp", "mlir_gemm_kernel.py")
    with open(path, "w") as f:
        f.write(src)
    scope = {"__file__": path, **intrinsics()}
    exec(compile(src, path, "exec"), scope)
    start = time.perf_counter()
    cres = compiler._compile_and_optimize(scope["gemm_kernel"], (T.int64, T.int32, T.int32, T.int32),
                                          # LTO as numba-cuda links ours: without it the
                                          # cubin's HGMMAs came out serialized (a wait after each)
                                          {"chip": "sm_90a", "launch_bounds": (k.threads, 1), "lto": True})
    seconds = time.perf_counter() - start
    return cres.metadata["func_name"], bytes(cres.metadata["cubin"]), cres.ptx, seconds


def compile_ours(k):
    """(entry name, cubin, ptx, seconds) of our GEMM, compiled as the library does (no cache)."""
    from numba_fa3.primitives import kernel_cache
    start = time.perf_counter()
    name, cubin = kernel_cache.compile_cubin(k.make_kernel(), k.SIGNATURE, k.threads, kernel_cache.device_cc())
    seconds = time.perf_counter() - start
    return name, cubin, k.compile_ptx(), seconds


def _sass_report(label, cubin, ptx):
    """ptxas -v's figures for the PTX, and the consumers' K loop (the innermost loop that issues
    the HGMMAs) of the cubin: its length and instruction mix."""
    import tempfile
    from bench.sass import disassemble, loops
    from numba_fa3.primitives.compile import ptxas_report
    stats = ptxas_report(ptx)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = disassemble(f.name)
    cands = [lp for lp in loops(sass) if lp.mix()["HGMMA"]]
    loop = min(cands, key=len, default=None)
    total = sum(1 for ln in sass.splitlines() if ln.strip().startswith("/*") and "*/" in ln[:12])
    print(f"{label}: {stats['registers']} registers, stack {stats['stack']} B, spills {stats['spill_stores']}/"
          f"{stats['spill_loads']} B, ptxas warnings: {stats['warnings'] or 'none'}")
    if loop is not None:
        top = ", ".join(f"{op} {n}" for op, n in loop.mix().most_common(14))
        print(f"  K loop: {len(loop)} instructions: {top}")
    return stats, loop


def cmd_compile(args):
    k = _ours()
    name_m, cubin_m, ptx_m, t_m = compile_mlir(k, args.dump)
    name_o, cubin_o, ptx_o, t_o = compile_ours(k)
    print(f"compile time (CPU, one process): numba-cuda {t_o:.1f} s, numba-cuda-mlir {t_m:.1f} s")
    _sass_report("numba-cuda (ours)", cubin_o, ptx_o)
    _sass_report("numba-cuda-mlir  ", cubin_m, ptx_m)
    os.makedirs(os.path.dirname(CUBIN), exist_ok=True)
    with open(CUBIN, "wb") as f:
        f.write(name_m.encode() + b"\n" + cubin_m)
    print(f"wrote {CUBIN} ({len(cubin_m)} B cubin, entry {name_m})")
    if args.dump:
        for label, ptx in (("ours", ptx_o), ("mlir", ptx_m)):
            with open(os.path.join(args.dump, f"gemm-{label}.ptx"), "w") as f:
                f.write(ptx)


def cmd_time(args):
    import torch
    from numba_fa3.primitives import launch, scheduler, tensors
    from numba_fa3.primitives.tma_desc import descriptor_tables
    k = _ours()
    with open(args.cubin, "rb") as f:
        name, _, cubin = f.read().partition(b"\n")
    theirs = launch.CompiledKernel(name.decode(), cubin, k.SIGNATURE, k.threads, k.smem.bytes, k.cluster)
    s = args.size
    a = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(s, s, device="cuda", dtype=torch.bfloat16)
    outs = {n: torch.empty(s, s, device="cuda", dtype=torch.bfloat16) for n in ("numba-cuda", "numba-cuda-mlir")}
    stream = torch.cuda.current_stream().cuda_stream
    tiles_m, tiles_n, kb = -(-s // k.block_m), -(-s // k.block_n), -(-s // k.block_k)
    grid = scheduler.persistent_grid(tiles_m * tiles_n, launch.sm_count())
    kernels = {"numba-cuda": k.kernel(), "numba-cuda-mlir": theirs}
    tables = {n: descriptor_tables.get(k.tensor_maps(tensors.inspect(a), tensors.inspect(b), tensors.inspect(c)))
              for n, c in outs.items()}
    run = {n: (lambda n=n: kernels[n](grid, stream, tables[n], tiles_m, tiles_n, kb)) for n in kernels}
    ref = (a.float() @ b.float().T)
    for n in run:
        run[n]()
        err = (outs[n].float() - ref).abs().max().item() / ref.abs().max().item()
        print(f"{n}: max error {err:.2e} relative to max|C|")
    times = {n: [] for n in run}
    for _ in range(args.rounds):  # interleaved, so clock drift hits both alike
        for n in run:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                run[n]()
            end.record()
            end.synchronize()
            times[n].append(start.elapsed_time(end) / 10)
    flops = 2 * s ** 3
    for n, ts in times.items():
        ms = sorted(ts)[len(ts) // 2]
        print(f"{n}: {ms:.3f} ms median, {flops / ms / 1e9:.0f} TFLOPS ({torch.cuda.get_device_name()})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile")
    c.add_argument("--dump", help="a directory for the generated kernel source and both PTX files")
    t = sub.add_parser("time")
    t.add_argument("--size", type=int, default=8192)
    t.add_argument("--rounds", type=int, default=20)
    t.add_argument("--cubin", default=CUBIN)
    args = p.parse_args(argv)
    (cmd_compile if args.command == "compile" else cmd_time)(args)


if __name__ == "__main__":
    main()
