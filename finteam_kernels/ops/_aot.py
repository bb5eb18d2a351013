"""Compile every Triton kernel and config ahead of time for real GPUs, no GPU needed.

    python -m finteam_kernels.ops._aot [--arch 80 90] [--json FILE] [--jobs N]

Collects `aot_specs()` from every `finteam_kernels/ops/*_kernels.py`, compiles each spec for
each architecture, and reads from the compiler's own output:
  - the cubin's resource usage, with the cuobjdump that ships with Triton: registers, shared
    memory, stack and local memory. A spill shows as LOCAL or STACK above 0 (ptxas may place
    spill stores on the stack while cuobjdump's LOCAL stays 0);
  - from the TTGIR, how each tl.dot was lowered ("wgmma": Hopper's warp-group MMA, reading its
    operands from shared memory; "mma": mma.sync on registers; "fma": no tensor cores), how many
    shared-memory buffers the pipeliner gave the loop's loads, and how many load groups the loop
    leaves in flight when it waits (0: it waits for every load, so nothing overlaps the dot);
  - from the PTX, approximate math (`ex2.approx` of a plain product, Triton's fast `tl.exp`, and
    `div.full`) for the kernels whose results must round like PyTorch's (`AotSpec.exact`).
`problems(result)` turns these into findings: a failed compile, a spill in a hot kernel, shared
memory over the architecture's limit, a pipeline shallower than asked (`expected_buffers`), a
16-bit or TF32 dot not on wgmma on sm_90, approximate math in an exact kernel. Prints a table;
exits non-zero on any finding but those named by `--tolerate`. Compiles in `--jobs` worker processes (default: one per core).
Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile


def collect_specs(only: str = ""):
    """Every module's specs, or those whose name contains `only`."""
    import finteam_kernels.ops as ops

    specs = []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.endswith("_kernels"):
            module = importlib.import_module(f"finteam_kernels.ops.{info.name}")
            specs.extend(spec for spec in module.aot_specs() if only in spec.name)
    return specs


# The most shared memory one block may use (opt-in maximum): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"name": spec.name, "arch": f"sm_{arch}", "hot": spec.hot, "num_warps": spec.num_warps,
              "num_stages": spec.num_stages, "exact": spec.exact, "tensor_core": spec.tensor_core}
    try:
        attrs = {(spec.fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.aligned}
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # a compile failure is the finding, not a crash of the report
        result["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        return result
    result["shared_bytes"] = compiled.metadata.shared
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    result["registers"], result["stack"], _, result["local"] = map(int, match.groups())
    result.update(dot_pipeline(compiled.asm["ttgir"]))
    result.update(approximate_math(compiled.asm["ptx"]))
    return result


def dot_pipeline(ttgir: str) -> dict:
    """How the kernel's dots were lowered and pipelined, from the TTGIR: `dots` (one of "wgmma",
    "mma", "fma" per dot op), `buffers` (the fewest buffers of a multi-buffered shared-memory
    allocation, the pipeline's depth; 0 when nothing is multi-buffered) and `in_flight` (the most
    async-copy groups any wait leaves outstanding; 0 when every wait drains all loads)."""
    dots = []
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            dots.append("wgmma")
        elif re.search(r"= tt\.dot ", line):
            dots.append("mma" if re.search(r"-> tensor<[^>]*#mma", line) else "fma")
    buffers = [int(m) for m in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    waits = [int(m) for m in re.findall(r"ttg\.async_wait[^\n]*\{num = (\d+)", ttgir)]
    return {"dots": dots, "buffers": min(buffers, default=0), "in_flight": max(waits, default=0)}


def approximate_math(ptx: str) -> dict:
    """Counts of approximate fp32 instructions in the PTX: `fast_exp`, an `ex2.approx` of a plain
    product (Triton's `tl.exp`: x * log2(e), then ex2.approx; libdevice's expf reduces the
    argument with fma first and is exempt), and `div_full` (Triton's fp32 `/`)."""
    defined_by = {reg: op for op, reg in re.findall(r"^\s*([a-z][\w.]*)\s+(%\w+),", ptx, flags=re.M)}
    fast_exp = sum(defined_by.get(src, "").startswith("mul")
                   for src in re.findall(r"ex2\.approx[\w.]*\s+%\w+,\s*(%\w+);", ptx))
    return {"fast_exp": fast_exp, "div_full": len(re.findall(r"\bdiv\.full\.f32\b", ptx))}


def expected_buffers(result: dict) -> int:
    """The buffers a loop pipelined `num_stages` deep gets: wgmma reads its operands from shared
    memory, so every stage is a buffer; mma.sync and FMA dots read registers, loaded from shared
    memory in the last stage, so one stage fewer."""
    if "wgmma" in result["dots"]:
        return result["num_stages"]
    return result["num_stages"] - 1


def spills(result: dict) -> bool:
    return result.get("local", 0) > 0 or result.get("stack", 0) > 0


def problems(result: dict) -> list[str]:
    """What is wrong with one compiled spec (empty when nothing is)."""
    if "error" in result:
        return [f"does not compile: {result['error']}"]
    arch = int(result["arch"].removeprefix("sm_"))
    found = []
    if result["hot"] and spills(result):
        found.append(f"spills (stack {result['stack']}, local {result['local']})")
    if result["shared_bytes"] > SHARED_LIMIT[arch]:
        found.append(f"{result['shared_bytes']} bytes of shared memory, over {result['arch']}'s {SHARED_LIMIT[arch]}")
    if result["dots"] and result["num_stages"] >= 3:
        if result["buffers"] != expected_buffers(result):
            found.append(f"{result['buffers']} pipeline buffers for num_stages={result['num_stages']}, "
                         f"expected {expected_buffers(result)}")
        if result["in_flight"] == 0:
            found.append("the loop waits for every load (no load in flight during the dot)")
    if result["tensor_core"] and result["dots"]:
        wanted = "wgmma" if arch >= 90 else "mma"
        if any(kind != wanted for kind in result["dots"]):
            found.append(f"dots lowered as {sorted(set(result['dots']))}, expected {wanted}")
    if result["exact"] and (result["fast_exp"] or result["div_full"]):
        found.append(f"approximate math: {result['fast_exp']} fast exp, {result['div_full']} div.full")
    return found


def compile_all(archs: list[int], jobs: int, only: str = "") -> list[dict]:
    """Compile every (spec, arch) pair: in this process, or split over `jobs` worker processes
    (each a `--shard`) whose results are put back in order."""
    if jobs <= 1:
        return [compile_spec(spec, arch) for spec in collect_specs(only) for arch in archs]
    with tempfile.TemporaryDirectory() as tmp:
        arch_args = [str(a) for a in archs]
        workers = [subprocess.Popen([sys.executable, "-m", "finteam_kernels.ops._aot", "--arch", *arch_args,
                                     "--only", only, "--shard", f"{i}/{jobs}", "--json", os.path.join(tmp, f"{i}.json")],
                                    stdout=subprocess.DEVNULL) for i in range(jobs)]
        if any(w.wait() not in (0, 1) for w in workers):
            raise RuntimeError("an AOT compile worker failed")
        parts = [json.load(open(os.path.join(tmp, f"{i}.json"))) for i in range(jobs)]
    merged = []
    for i in range(max(len(p) for p in parts)):
        merged.extend(p[i] for p in parts if i < len(p))
    return merged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", default="", help="compile only the specs whose name contains this")
    parser.add_argument("--tolerate", nargs="*", default=[], choices=["spills"],
                        help="report these findings without failing (e.g. spills under an older Triton, "
                             "whose register allocation differs)")
    parser.add_argument("--shard", help="i/n: compile only every n-th pair from the i-th (worker mode)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        pairs = [(spec, arch) for spec in collect_specs(args.only) for arch in args.arch][index::count]
        results = [compile_spec(spec, arch) for spec, arch in pairs]
    else:
        results = compile_all(args.arch, args.jobs, args.only)
    print(f"{'kernel':64} {'arch':6} {'warps':>5} {'stages':>6} {'bufs':>4} {'infl':>4} {'dot':>5} {'regs':>5} "
          f"{'smem':>7} {'stack':>5} {'local':>5}")
    bad = 0
    for r in results:
        found = problems(r)
        bad += any(not any(p.startswith(kind) for kind in args.tolerate) for p in found)
        if "error" in r:
            print(f"{r['name']:64} {r['arch']:6} FAILED {r['error']}")
            continue
        dot = "/".join(sorted(set(r["dots"]))) or "-"
        print(f"{r['name']:64} {r['arch']:6} {r['num_warps']:5} {r['num_stages']:6} {r['buffers']:4} "
              f"{r['in_flight']:4} {dot:>5} {r['registers']:5} {r['shared_bytes']:7} {r['stack']:5} {r['local']:5}"
              + "".join(f"  [{p}]" for p in found))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
