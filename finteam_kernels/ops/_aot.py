"""Compile every Triton kernel and config ahead of time for real GPUs, no GPU needed.

    python -m finteam_kernels.ops._aot [--arch 80 90] [--json FILE] [--jobs N]

Collects `aot_specs()` from every `finteam_kernels/ops/*_kernels.py`, compiles each spec for
each architecture, and reads the cubin's resource usage with the cuobjdump that ships with
Triton: registers, shared memory, stack and local memory. A spill shows as LOCAL or STACK above
0 (ptxas may place spill stores on the stack while cuobjdump's LOCAL stays 0). Prints a table;
exits non-zero if a spec fails to compile or a hot kernel spills. Compiles in `--jobs` worker
processes (default: one per core). Must run without TRITON_INTERPRET (interpreted kernels cannot
be compiled).
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


def collect_specs():
    import finteam_kernels.ops as ops

    specs = []
    for info in pkgutil.iter_modules(ops.__path__):
        if info.name.endswith("_kernels"):
            module = importlib.import_module(f"finteam_kernels.ops.{info.name}")
            specs.extend(module.aot_specs())
    return specs


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_spec(spec, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = {"name": spec.name, "arch": f"sm_{arch}", "hot": spec.hot, "num_warps": spec.num_warps,
              "num_stages": spec.num_stages}
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
    if arch >= 90:
        result["wgmma"] = "wgmma" in compiled.asm["ptx"]
    return result


def spills(result: dict) -> bool:
    return result.get("local", 0) > 0 or result.get("stack", 0) > 0


def compile_all(archs: list[int], jobs: int) -> list[dict]:
    """Compile every (spec, arch) pair: in this process, or split over `jobs` worker processes
    (each a `--shard`) whose results are put back in order."""
    if jobs <= 1:
        return [compile_spec(spec, arch) for spec in collect_specs() for arch in archs]
    with tempfile.TemporaryDirectory() as tmp:
        arch_args = [str(a) for a in archs]
        workers = [subprocess.Popen([sys.executable, "-m", "finteam_kernels.ops._aot", "--arch", *arch_args,
                                     "--shard", f"{i}/{jobs}", "--json", os.path.join(tmp, f"{i}.json")],
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
    parser.add_argument("--shard", help="i/n: compile only every n-th pair from the i-th (worker mode)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled", file=sys.stderr)
        return 2
    if args.shard:
        index, count = map(int, args.shard.split("/"))
        pairs = [(spec, arch) for spec in collect_specs() for arch in args.arch][index::count]
        results = [compile_spec(spec, arch) for spec, arch in pairs]
    else:
        results = compile_all(args.arch, args.jobs)
    print(f"{'kernel':58} {'arch':6} {'warps':>5} {'stages':>6} {'regs':>5} {'smem':>7} {'stack':>5} {'local':>5}")
    bad = 0
    for r in results:
        if "error" in r:
            bad += 1
            print(f"{r['name']:58} {r['arch']:6} FAILED {r['error']}")
            continue
        hot_spill = spills(r) and r["hot"]
        bad += hot_spill
        print(f"{r['name']:58} {r['arch']:6} {r['num_warps']:5} {r['num_stages']:6} {r['registers']:5} "
              f"{r['shared_bytes']:7} {r['stack']:5} {r['local']:5}{'  SPILLS' if hot_spill else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
