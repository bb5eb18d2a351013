"""Every CUDA kernel file compiles with nvcc for sm_80 and sm_90a (no GPU and no CUDA build of
torch needed: the kernel bodies in csrc/cuda/*.cu use only the CUDA toolkit), and no kernel
spills registers or uses local memory. Every kernel in those files is on the hot path of some op
(the gating, dispatch, row, GEMM and GLU kernels, and the small scans between them), so the rule
holds for all of them.

Also a tool: `python tests/test_cuda_compile.py` compiles and prints the register/spill table;
`python tests/test_cuda_compile.py --log build.log` prints it from a build log made with
`-Xptxas -v` (as setup.py builds the extension).
"""
import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
ARCHS = ("sm_80", "sm_90a")
# The flags torch's CUDAExtension compiles with, so a file that builds here builds there.
NVCC_FLAGS = [
    "-O3", "-std=c++20", "--expt-relaxed-constexpr",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
    "-Xptxas", "-v",
]

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def kernel_files() -> list[str]:
    return sorted(f for f in os.listdir(CUDA_DIR) if f.endswith(".cu"))


def parse_ptxas(text: str) -> list[dict]:
    """One record per kernel and architecture from `-Xptxas -v` output: mangled name, arch,
    registers, stack frame, spill stores/loads and static shared memory (bytes)."""
    records, current = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            current = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "stack": 0, "spill_stores": 0,
                       "spill_loads": 0, "smem": 0}
            records.append(current)
        elif current is not None and (m := _FRAME.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _USED.search(line)):
            current["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                current["smem"] = int(s.group(1))
    names = demangle([r["mangled"] for r in records])
    for record, name in zip(records, names):
        record["kernel"] = name
    return records


def demangle(mangled: list[str]) -> list[str]:
    """Readable kernel names: template arguments kept, namespaces and parameter lists dropped."""
    tool = shutil.which("c++filt")
    if not mangled or tool is None:
        return list(mangled)
    out = subprocess.run([tool], input="\n".join(mangled), capture_output=True, text=True).stdout.splitlines()
    return [_short(name) for name in out] if len(out) == len(mangled) else list(mangled)


def _short(name: str) -> str:
    name = name.removeprefix("void ")
    name = re.sub(r"finteam::(\(anonymous namespace\)::)?", "", name)
    if name.endswith(")"):  # drop the parameter list: the last balanced (...)
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name.replace("__nv_bfloat16", "bf16").replace("__half", "fp16")


def compile_one(nvcc: str, source: str, arch: str, out_dir: str) -> tuple[int, str]:
    """One file for one architecture. The host side is the same for every architecture, so it is
    compiled once (with the last one, a full object); the others compile device code only."""
    mode = "-c" if arch == ARCHS[-1] else "-cubin"
    out = os.path.join(out_dir, f"{os.path.basename(source)}.{arch}{'.o' if mode == '-c' else '.cubin'}")
    proc = subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={arch}", mode, source, "-o", out],
                          capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def compile_all(nvcc: str, jobs: int = 2) -> dict:
    """{(file, arch): (returncode, output)} for every kernel file and architecture."""
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(jobs) as pool:
        tasks = {(f, arch): pool.submit(compile_one, nvcc, os.path.join(CUDA_DIR, f), arch, out_dir)
                 for f in kernel_files() for arch in ARCHS}
        return {key: task.result() for key, task in tasks.items()}


def problems(records: list[dict]) -> list[str]:
    """Kernels that spill or keep anything in local memory."""
    return [f"{r['kernel']} [{r['arch']}]: stack {r['stack']} B, spill stores {r['spill_stores']} B, "
            f"spill loads {r['spill_loads']} B"
            for r in records if r["stack"] or r["spill_stores"] or r["spill_loads"]]


def table(records: list[dict], arch: str | None = None) -> str:
    rows = [r for r in records if arch is None or r["arch"] == arch]
    width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [f"{'kernel':<{width}}  arch    regs  spill(st/ld)  stack  smem"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["arch"])):
        lines.append(f"{r['kernel']:<{width}}  {r['arch']:<6}  {r['registers']:>4}  "
                     f"{r['spill_stores']:>5}/{r['spill_loads']:<6}  {r['stack']:>5}  {r['smem']:>5}")
    return "\n".join(lines)


@functools.cache
def _nvcc() -> str | None:
    return shutil.which("nvcc")


@pytest.fixture(scope="module")
def compiled():
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to compile the CUDA kernels)")
    return compile_all(nvcc)


def test_every_kernel_file_compiles_for_sm80_and_sm90a(compiled):
    assert kernel_files(), "no CUDA kernel files found in csrc/cuda"
    failed = {f"{f} [{arch}]": out[-3000:] for (f, arch), (rc, out) in compiled.items() if rc != 0}
    assert not failed, failed


def test_each_file_defines_kernels_for_both_archs(compiled):
    # Guards the spill test below against passing vacuously (a file whose kernels the parser misses).
    for (f, arch), (_, out) in compiled.items():
        assert [r for r in parse_ptxas(out) if r["arch"] == arch], f"no kernels parsed from {f} for {arch}"


def test_no_kernel_spills_or_uses_local_memory(compiled):
    records = [r for _, out in compiled.values() for r in parse_ptxas(out)]
    print("\n" + table(records, "sm_90a"))
    assert all(r["registers"] is not None for r in records)
    assert not problems(records), problems(records)


def test_parser_reads_spills():
    # A hand-written ptxas report with a spill: the parser must see it, or the test above cannot fail.
    text = ("ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'\n"
            "ptxas info    : Function properties for _Z3fooPf\n"
            "    16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads\n"
            "ptxas info    : Used 255 registers, used 1 barriers, 41088 bytes smem, 400 bytes cmem[0]\n")
    (record,) = parse_ptxas(text)
    assert (record["registers"], record["spill_stores"], record["spill_loads"], record["smem"]) == (255, 12, 20, 41088)
    assert problems([record])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--log", help="parse this build log instead of compiling")
    parser.add_argument("--arch", default=None, help="show one architecture only (e.g. sm_90a)")
    args = parser.parse_args()
    if args.log:
        with open(args.log, errors="replace") as f:
            records = parse_ptxas(f.read())
    else:
        nvcc = _nvcc()
        if nvcc is None:
            print("nvcc is not on PATH", file=sys.stderr)
            return 2
        results = compile_all(nvcc)
        failed = [key for key, (rc, _) in results.items() if rc != 0]
        for key in failed:
            print(f"FAILED {key}:\n{results[key][1][-3000:]}", file=sys.stderr)
        records = [r for _, out in results.values() for r in parse_ptxas(out)]
        if failed:
            return 1
    # One line per kernel and architecture, deduplicated (a build log may hold a kernel twice).
    unique = list({(r["kernel"], r["arch"]): r for r in records}.values())
    if not unique:
        print("no ptxas reports found", file=sys.stderr)
        return 1
    print(table(unique, args.arch))
    bad = problems(unique)
    for line in bad:
        print("SPILL:", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
