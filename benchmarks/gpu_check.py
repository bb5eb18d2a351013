"""The one prepared script for a lent GPU: build, the whole GPU test suite, tuning, benchmarks.

    python benchmarks/gpu_check.py OUT_DIR [--budget-s 450] [--skip-build] [--skip-tests] [--skip-tune]

Runs offline from a checkout, with the Python, torch (>= 2.11), triton (>= 3.3) and transformers
the machine already has, nothing of ours installed and nothing fetched; it needs only this file,
the checkout and a CUDA toolkit ($CUDA_HOME, `nvcc` on PATH, /usr/local/cuda*, or torch's own
nvidia wheels). It imports nothing from benchmarks/. Phases, each with its share of the budget
(default 450 s, under 8 minutes on one H100/H200 with the start-up), each writing what it has
even when stopped at its limit:
  1. build   `python setup.py build_ext --inplace`, this GPU's architecture only, every core;
             ptxas registers, spills and shared memory per CUDA kernel.
  2. tests   the GPU suite, `FINTEAM_GPU_TESTS=1 pytest -m cuda` (Triton compiled, never
             interpreted; both GPU backends against the reference, torch.compile, CUDA graphs,
             past 2**31 elements), in parallel workers when pytest-xdist is there, with run-time
             tuning off except in the tests that turn it on. One JSON line per test.
  3. tune    `python -m finteam_kernels.configs.tune` on two model shapes at 4096 tokens: this
             GPU's table of grouped-GEMM configs, written to OUT_DIR after each shape (commit it
             to finteam_kernels/configs/).
  4. bench   every op on the reference, Triton and CUDA backends (median of CUDA-event timings,
             inputs rotated past the L2), and moe_experts with the heuristic configs against the
             table just tuned; copy bandwidth and bf16 matmul rate measured as the ceilings.
Writes OUT_DIR/gpu_check.json (everything), build.log, tests.jsonl and the tuned table, and
prints a verdict table last. Exit status 0 only if the build and every test passed.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k, N = T*K routed rows.

What the numbers should be, written before the first run (H200: about 4.3 TB/s measured copy,
about 790 TFLOP/s measured bf16 matmul on random data):
  * gating, dispatch, router losses at T=4096, E=64: about 1-3 MB moved, so launch-bound
    (5-20 us per launch); the reference's chain of small torch ops 5-20x slower.
  * permute / unpermute at T=16384, K=8, H=4096 bf16: 1-2 GB moved, 0.3-0.5 ms at 60-85% of
    the copy ceiling.
  * moe_experts, Mixtral-8x7B (T=4096, K=2, H=4096, I=14336) bf16: 1.4 TFLOP forward, so about
    2-3 ms at 60-75% of the matmul ceiling through wgmma on the Triton path; the CUDA library
    (mma.sync, no wgmma) 30-50%. Forward+backward 3x the FLOPs (recomputation adds one GEMM).
  * tuned configs: equal or faster than the heuristic on the shapes tuned (never slower by more
    than the timing noise, a few %).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EVENTS_ENV = "GPU_CHECK_EVENTS"  # where the pytest plugin below appends one JSON line per test
GPU_TEST_FILES = ["tests/test_cuda_compiled.py", "tests/test_cuda.py", "tests/test_addressing_64bit.py",
                  "tests/test_topk_gating.py", "tests/test_router_losses.py", "tests/test_unpermute.py"]
PROVIDERS = ("reference", "triton", "cuda")


# ---- the pytest plugin (loaded with `-p gpu_check` by the tests phase) ----

def pytest_runtest_logreport(report):
    """One JSON line per test outcome, written as it happens (a phase stopped at its limit
    keeps what ran). Only the controlling process writes, never an xdist worker."""
    path = os.environ.get(EVENTS_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when != "call" and not (report.failed or report.skipped):
        return
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3)}
    if report.failed:
        line["error"] = str(report.longrepr)[-3000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        line["reason"] = report.longrepr[2][:200]
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


# ---- helpers ----

def run(cmd: list[str], timeout: float, env: dict | None = None, log: Path | None = None) -> dict:
    """cmd's exit status, seconds and output tail; stopped (status None) past `timeout`."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code = None
        out = (err.stdout or b"").decode(errors="replace") + (err.stderr or b"").decode(errors="replace")
    if log is not None:
        log.write_text(out)
    return {"cmd": " ".join(cmd), "returncode": code, "timed_out": code is None,
            "seconds": round(time.perf_counter() - start, 1), "output_tail": out[-4000:]}


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host_cpus": os.cpu_count()}
    for name in ("triton", "transformers", "numpy", "setuptools"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:  # noqa: BLE001: a missing package is a finding to record
            info[name] = f"missing ({type(err).__name__})"
    props = torch.cuda.get_device_properties(0)
    info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                memory_gib=round(props.total_memory / 2**30, 1))
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                            "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = q.stdout.strip()
    return info


# ---- 1. build ----

def find_cuda_home() -> str | None:
    """The CUDA toolkit folder (bin/nvcc and include/cuda_runtime.h). nvcc itself says where it
    lives (`-dryrun` prints TOP=...), which sees through wrapper scripts on PATH."""
    import torch

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        dry = subprocess.run(["nvcc", "-dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
        top = re.search(r"^#\$ TOP=(.+)$", dry.stdout + dry.stderr, re.MULTILINE)
        if top:
            candidates.append(os.path.realpath(top.group(1).strip()))
    candidates += sorted((str(p) for p in Path("/usr/local").glob("cuda*")), reverse=True)
    site = Path(torch.__file__).parent.parent / "nvidia"
    candidates += [str(p) for p in sorted(site.glob("cu*")) + [site / "cuda_nvcc"]]
    for folder in filter(None, candidates):
        if (Path(folder) / "bin" / "nvcc").exists() and (Path(folder) / "include" / "cuda_runtime.h").exists():
            return folder
    return None


def build(out: Path, timeout: float) -> dict:
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}.{minor}" + ("a" if major in (9, 10) else "")
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 4), FINTEAM_FORCE_CUDA="1")
    cuda_home = find_cuda_home()
    if cuda_home:
        env["CUDA_HOME"] = cuda_home
        env["PATH"] = f"{cuda_home}/bin:{env.get('PATH', '')}"
        if not (Path(cuda_home) / "include" / "cublas_v2.h").exists():  # a minimal toolkit: torch's wheels have them
            nvidia = Path(torch.__file__).parent.parent / "nvidia"
            env["CPATH"] = ":".join([str(p / "include") for p in sorted(nvidia.glob("cu*"))] + [env.get("CPATH", "")])
    result = run([sys.executable, "setup.py", "build_ext", "--inplace"], timeout, env, out / "build.log")
    result.update(arch=arch, cuda_home=cuda_home)
    notes = ROOT / "finteam_kernels" / "_build_info.json"
    if notes.exists():
        result["not_built"] = json.loads(notes.read_text()).get("not_built", {})
    text = (out / "build.log").read_text()
    # ptxas -v per kernel: "Compiling entry function 'NAME' for 'sm_90a'", then "Used N registers, ... S bytes smem",
    # and "N bytes stack frame, N bytes spill stores, N bytes spill loads"
    kernels, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line):
            current = {"kernel": m.group(1), "arch": m.group(2), "spill_stores": 0, "spill_loads": 0}
            kernels.append(current)
        elif current is not None and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current.update(spill_stores=int(m.group(1)), spill_loads=int(m.group(2)))
        elif current is not None and (m := re.search(r"Used (\d+) registers", line)):
            current["registers"] = int(m.group(1))
            if s := re.search(r"(\d+) bytes smem", line):
                current["smem"] = int(s.group(1))
    result["kernels"] = kernels
    result["spilling"] = [k["kernel"] for k in kernels if k["spill_stores"] or k["spill_loads"]]
    result["ok"] = result["returncode"] == 0 and "cuda" not in result.get("not_built", {"cuda": "unknown"})
    return result


# ---- 2. tests ----

def tests(out: Path, timeout: float) -> dict:
    events = out / "tests.jsonl"
    events.write_text("")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(FINTEAM_GPU_TESTS="1", FINTEAM_AUTOTUNE="0", PYTHONUNBUFFERED="1", **{EVENTS_ENV: str(events)})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", *GPU_TEST_FILES, "-q", "-p", "no:cacheprovider",
           "-p", "gpu_check", "-o", "addopts="]
    try:
        import xdist  # noqa: F401

        cmd += ["-n", str(min(8, os.cpu_count() or 1))]  # Triton compiles on the host: in parallel
    except ImportError:
        pass
    result = run(cmd, timeout, env)
    lines = [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
    counts: dict[str, int] = {}
    for line in lines:
        counts[line["outcome"]] = counts.get(line["outcome"], 0) + 1
    result.update(counts=counts, failed=[{"test": t["test"], "error": t["error"][-600:]}
                                         for t in lines if t["outcome"] == "failed"][:40])
    result["ok"] = result["returncode"] == 0 and counts.get("failed", 0) == 0
    return result


# ---- 3. tune ----

def tune(out: Path, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = run([sys.executable, "-m", "finteam_kernels.configs.tune", "--models", "mixtral-8x7b", "qwen3-30b-a3b",
                  "--tokens", "4096", "--out", str(out)], timeout, env)
    tables = sorted(p.name for p in out.glob("*.json") if p.name != "gpu_check.json")
    result.update(tables=tables, ok=result["returncode"] == 0 and bool(tables))
    return result


# ---- 4. bench ----

def timed(fn, warmup: int = 3, reps: int = 20) -> dict:
    """Median, p20 and p80 of `reps` CUDA-event timings (ms) after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {"median_ms": times[len(times) // 2], "p20_ms": times[len(times) // 5], "p80_ms": times[(4 * len(times)) // 5]}


def ceilings() -> dict:
    import torch

    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, reps=10)
    return {"copy_gbs": 2 * 2**30 / mm_or(copy) / 1e6, "matmul_tflops": 2 * 8192**3 / mm_or(mm) / 1e9}


def mm_or(t: dict) -> float:
    return max(t["median_ms"], 1e-6)


def bench_cases():
    """(op, shape, mode, make(provider) -> callable, bytes, flops) per case."""
    import torch

    import finteam_kernels as fk
    from finteam_kernels import reference

    dev = "cuda"
    cases = []
    for T, E, K, opts in [(4096, 64, 2, {}), (16384, 256, 8, dict(score="sigmoid", num_groups=8, topk_groups=4))]:
        logits = torch.randn(T, E, device=dev)
        ids = reference.topk_gating(logits, K).ids_TK
        shape = f"T={T} E={E} K={K}"
        cases.append(("topk_gating", shape, "forward",
                      lambda b, x=logits, k=K, o=opts: lambda: fk.topk_gating(x, k, backend=b, **o), T * E * 4, 0))
        cases.append(("dispatch", shape, "forward", lambda b, i=ids, e=E: lambda: fk.dispatch(i, e, backend=b),
                      T * K * 20, 0))

        def losses(b, x=logits, i=ids, e=E):
            leaf = x.detach().requires_grad_()
            return lambda: sum(fk.router_losses(leaf, i, e, backend=b)).backward()

        cases.append(("router_losses", shape, "forward+backward", losses, 3 * T * E * 4, 0))
    T, K, E, H = 16384, 8, 64, 4096
    ids = reference.topk_gating(torch.randn(T, E, device=dev), K).ids_TK
    plan = reference.dispatch(ids, E)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16)
    y = torch.randn(T * K, H, device=dev, dtype=torch.bfloat16)
    w = torch.rand(T, K, device=dev)
    shape = f"T={T} K={K} H={H}"
    cases.append(("permute", shape, "forward", lambda b: lambda: fk.permute(x, plan, backend=b), 2 * T * K * H * 2, 0))
    cases.append(("unpermute", shape, "forward", lambda b: lambda: fk.unpermute(y, plan, w, backend=b),
                  (T * K + T) * H * 2, 0))
    T, K, E, H, I = 4096, 2, 8, 4096, 14336  # Mixtral-8x7B
    g = torch.Generator(device=dev).manual_seed(0)
    xm = torch.randn(T, H, device=dev, generator=g).to(torch.bfloat16)
    routing = reference.topk_gating(torch.randn(T, E, device=dev, generator=g), K)
    gate_up = (torch.randn(E, 2 * I, H, device=dev, generator=g) / H**0.5).to(torch.bfloat16)
    down = (torch.randn(E, H, I, device=dev, generator=g) / I**0.5).to(torch.bfloat16)
    shape = f"T={T} K={K} E={E} H={H} I={I}"
    cases.append(("moe_experts", shape, "forward",
                  lambda b: lambda: fk.moe_experts(xm, routing.ids_TK, routing.weights_TK, gate_up, down, backend=b),
                  0, 6.0 * T * K * H * I))

    def train(b):
        leaves = [t.detach().requires_grad_() for t in (xm, routing.weights_TK, gate_up, down)]
        return lambda: fk.moe_experts(leaves[0], routing.ids_TK, leaves[1], leaves[2], leaves[3],
                                      backend=b).float().square().mean().backward()

    cases.append(("moe_experts", shape, "forward+backward", train, 0, 18.0 * T * K * H * I))
    return cases


def bench(out: Path, deadline: float) -> dict:
    """Runs in this process, case by case, until `deadline` (time.monotonic)."""
    import torch

    from finteam_kernels._backend import why_unusable
    from finteam_kernels.ops import grouped_gemm_kernels as kernels

    os.environ["FINTEAM_AUTOTUNE"] = "0"  # tables (or heuristics) only: tuning is its own phase
    limits = ceilings()
    rows, stopped = [], None
    for op, shape, mode, make, nbytes, flops in bench_cases():
        if time.monotonic() > deadline:
            stopped = f"budget spent before {op} {mode}"
            break
        row = {"op": op, "shape": shape, "mode": mode, "bytes": nbytes, "flops": flops}
        for provider in PROVIDERS:
            reason = why_unusable(provider, torch.device("cuda"), op)
            if reason is not None:
                row[provider] = {"error": reason}
                continue
            try:
                t = timed(make(provider))
            except Exception as err:  # noqa: BLE001: one failing provider must not end the run
                row[provider] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                torch.cuda.synchronize()
                continue
            if flops:
                t["of_ceiling"] = flops / t["median_ms"] / 1e9 / limits["matmul_tflops"]
            elif nbytes:
                t["of_ceiling"] = nbytes / t["median_ms"] / 1e6 / limits["copy_gbs"]
            row[provider] = t
        rows.append(row)
    tuned = compare_tuned(out, bench_cases, deadline)
    return {"ceilings": limits, "rows": rows, "tuned_vs_heuristic": tuned, "stopped": stopped, "ok": not stopped}


def compare_tuned(out: Path, make_cases, deadline: float) -> list[dict]:
    """moe_experts on the Triton backend with the heuristic configs, then with the table the
    tune phase wrote (read through FINTEAM_CONFIG_DIR)."""
    from finteam_kernels import configs

    if time.monotonic() > deadline or not any(p.name != "gpu_check.json" for p in out.glob("*.json")):
        return []
    results = []
    moe = [c for c in make_cases() if c[0] == "moe_experts"]
    for label, folder in (("heuristic", str(out / "none")), ("tuned", str(out))):
        os.environ["FINTEAM_CONFIG_DIR"] = folder
        configs.table.cache_clear()
        for op, shape, mode, make, _, flops in moe:
            results.append({"configs": label, "op": op, "shape": shape, "mode": mode, **timed(make("triton"))})
    os.environ.pop("FINTEAM_CONFIG_DIR", None)
    configs.table.cache_clear()
    return results


# ---- the verdict ----

def verdict_table(report: dict) -> str:
    lines = [f"{'phase':7} {'verdict':8} {'seconds':>7}  detail"]
    for phase in ("build", "tests", "tune", "bench"):
        r = report.get(phase)
        if r is None:
            lines.append(f"{phase:7} {'skipped':8}")
            continue
        if "error" in r:
            lines.append(f"{phase:7} {'ERROR':8} {'':>7}  {r['error'][:100]}")
            continue
        verdict = "ok" if r.get("ok") else ("TIMEOUT" if r.get("timed_out") else "FAIL")
        if phase == "build":
            detail = f"arch {r.get('arch')}, not built: {r.get('not_built') or 'none'}, spills: {r.get('spilling') or 'none'}"
        elif phase == "tests":
            detail = ", ".join(f"{n} {k}" for k, n in sorted(r.get("counts", {}).items()))
            detail += "".join(f"\n{'':26}FAILED {f['test']}" for f in r.get("failed", [])[:10])
        elif phase == "tune":
            detail = f"tables: {', '.join(r.get('tables', [])) or 'none'}"
        else:
            c = r["ceilings"]
            detail = f"copy {c['copy_gbs']:.0f} GB/s, bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s"
        lines.append(f"{phase:7} {verdict:8} {r.get('seconds', 0):7}  {detail}")
    if report.get("bench", {}).get("rows"):
        lines.append(f"\n{'op':<14} {'mode':<17} {'shape':<32} " + " ".join(f"{p:>10}" for p in PROVIDERS)
                     + "   (ms; % of ceiling)")
        for row in report["bench"]["rows"]:
            cells = []
            for p in PROVIDERS:
                t = row.get(p, {})
                if "median_ms" in t:
                    frac = f" {100 * t['of_ceiling']:3.0f}%" if "of_ceiling" in t else ""
                    cells.append(f"{t['median_ms']:7.3f}{frac}")
                else:
                    cells.append(f"{'n/a':>10}")
            lines.append(f"{row['op']:<14} {row['mode']:<17} {row['shape']:<32} " + " ".join(f"{c:>10}" for c in cells))
        for t in report["bench"].get("tuned_vs_heuristic", []):
            lines.append(f"triton {t['op']} {t['mode']:<17} {t['configs']:<10} {t['median_ms']:8.3f} ms")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the results")
    parser.add_argument("--budget-s", type=float, default=450, help="seconds for all phases together")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built in place")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-tune", action="store_true")
    args = parser.parse_args()
    start = time.monotonic()
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, str(ROOT))
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment()}
    # shares of the budget, each at most what is left: build 35%, tests 45%, tune 12%, bench the rest
    phases = [("build", 0.35, lambda t: build(args.out, t), args.skip_build),
              ("tests", 0.45, lambda t: tests(args.out, t), args.skip_tests),
              ("tune", 0.12, lambda t: tune(args.out, t), args.skip_tune)]
    for name, share, fn, skip in phases:
        if skip:
            continue
        try:
            report[name] = fn(min(share * args.budget_s, args.budget_s - (time.monotonic() - start)))
        except Exception as err:  # noqa: BLE001: a broken phase is reported, the others still run
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"{name}: {'ok' if report[name].get('ok') else 'not ok'} after {time.monotonic() - start:.0f} s", flush=True)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    bench_start = time.monotonic()
    try:
        report["bench"] = bench(args.out, start + args.budget_s)
        report["bench"]["seconds"] = round(time.monotonic() - bench_start, 1)
    except Exception as err:  # noqa: BLE001
        report["bench"] = {"error": f"{type(err).__name__}: {err}"}
    report["seconds"] = round(time.monotonic() - start, 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    env = report["environment"]
    print(f"\n{env['device']} (sm {env['capability']}), torch {env['torch']}, triton {env['triton']}, "
          f"transformers {env['transformers']}; {report['seconds']} s; results in {args.out}")
    print(verdict_table(report))
    build_ok = args.skip_build or report["build"].get("ok")
    tests_ok = args.skip_tests or report["tests"].get("ok")
    return 0 if build_ok and tests_ok else 1


if __name__ == "__main__":
    sys.exit(main())
