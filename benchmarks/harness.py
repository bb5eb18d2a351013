"""The one timing harness every benchmark script builds on.

    measure(fn, device)        -> Stats: warm-up, then median with p20/p80 (and peak memory)
    interleaved(fns)           -> Stats per provider, timed in alternating rounds (CPU)
    machine_load()             -> load average and CPU pressure, to print beside CPU numbers
    ceilings(device, quick)    -> the machine's roofline, measured now: bandwidth and matmul rate
    matmul_rate(m, n, k, ...)  -> TFLOP/s of one dense GEMM (a ceiling "of the same FLOPs")
    rotation_copies(nbytes)    -> how many input sets to rotate so that caches do not flatter
    environment(device)        -> device, versions, date: the header of every results file
    write_results(dir, ...)    -> JSON;  plot_time_vs_tokens(rows, path) -> PNG

How time is taken:
  GPU  CUDA events around each call, after a warm-up that also triggers compilation and
       autotuning. With `graph=True` the calls are captured into a CUDA graph (several calls per
       graph when one call is short) and each replay is timed: launch gaps vanish, which is what
       a served model running under graphs sees. A function that cannot be captured (a host
       sync, say) falls back to events, and the Stats say which method gave the number.
  CPU  wall clock (perf_counter) around each call, many repeats.
Statistics are over the per-call times: median, 20th and 80th percentiles. Rotating several
copies of the inputs is the caller's job (see `rotation_copies` and `cycle`).

Ceilings (measured in the same run, so fractions hold on any machine):
  copy    a large device-to-device copy; bytes read plus bytes written
  gemv    a bf16 matrix-vector product over a weight much larger than the last-level cache:
          the weight-streaming rate that small-batch MoE inference lives on
  read    a plain read of such a buffer (an integer max over it): what the cores can read,
          which is what streaming weights does (a copy's rate counts written bytes too)
  mem     the fastest of the three: the bandwidth roof of memory-bound rows
  matmul  a large dense bf16 GEMM: the compute roof of GEMM rows
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# How long each measurement runs: quick keeps a 2-core CPU run to minutes, full is for reports.
# A call slower than slow_s is timed once, after its warm-up call (no repeats, no memory
# probe): some peers' backward on many experts takes many seconds on a CPU, and a few such
# cells must not hold up the whole table.
QUICK = {"warmup_s": 0.05, "min_time_s": 0.1, "min_reps": 5, "max_reps": 2000, "slow_s": 1.0}
FULL = {"warmup_s": 0.2, "min_time_s": 1.0, "min_reps": 10, "max_reps": 10000, "slow_s": 30.0}
_GRAPH_MIN_REPLAY_MS = 0.2  # a replay shorter than this is dominated by its own launch


@dataclasses.dataclass
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    method: str  # "wall-clock", "cuda-events" or "cuda-graph"
    peak_bytes: int | None = None  # memory the call allocates above what was live before it

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def cycle(fns: Sequence[Callable[[], object]], start: int = 0) -> Callable[[], object]:
    """One function that calls `fns` in turn, from fns[start]: the way to rotate input copies
    through `measure`."""
    if len(fns) == 1:
        return fns[0]
    turn = itertools.cycle(list(fns[start:]) + list(fns[:start]))
    return lambda: next(turn)()


def _percentile(sorted_ms: list[float], q: float) -> float:
    pos = q * (len(sorted_ms) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def _stats(times_ms: list[float], method: str) -> Stats:
    ordered = sorted(times_ms)
    return Stats(statistics.median(ordered), _percentile(ordered, 0.2), _percentile(ordered, 0.8), len(ordered), method)


def _reps_for(call_ms: float, budget: dict) -> int:
    wanted = math.ceil(budget["min_time_s"] * 1e3 / max(call_ms, 1e-6))
    return max(budget["min_reps"], min(budget["max_reps"], wanted))


def _time_cpu(fn: Callable[[], object], budget: dict) -> Stats:
    start = time.perf_counter()
    fn()
    first_ms = (time.perf_counter() - start) * 1e3
    if first_ms > budget.get("slow_s", math.inf) * 1e3:
        t0 = time.perf_counter_ns()
        fn()
        return _stats([(time.perf_counter_ns() - t0) / 1e6], "wall-clock, one slow call")
    while time.perf_counter() - start < budget["warmup_s"]:
        fn()
    times = []
    for _ in range(_reps_for(first_ms, budget)):
        t0 = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - t0) / 1e6)
    return _stats(times, "wall-clock")


def _events_ms(fn: Callable[[], object], reps: int) -> list[float]:
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for begin, end in pairs:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [begin.elapsed_time(end) for begin, end in pairs]


def _capture(fn: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a side-stream warm-up, as graph capture requires
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    return graph


def _time_cuda(fn: Callable[[], object], budget: dict, graph: bool) -> Stats:
    _events_ms(fn, 1)  # compilation and autotuning happen here: never a timing
    start = time.perf_counter()
    warm = _events_ms(fn, 1)
    if warm[0] > budget.get("slow_s", math.inf) * 1e3:
        return _stats(warm, "cuda-events, one slow call")
    while time.perf_counter() - start < budget["warmup_s"]:
        warm += _events_ms(fn, 1)
    call_ms = statistics.median(warm)
    method, note = "cuda-events", ""
    if graph:
        calls = max(1, min(100, math.ceil(_GRAPH_MIN_REPLAY_MS / max(call_ms, 1e-4))))
        try:
            captured = _capture(fn, calls)
        except Exception as err:  # noqa: BLE001 - any capture failure means: time without a graph
            torch.cuda.synchronize()
            note = f" (graph capture failed: {type(err).__name__})"
        else:
            replays = _events_ms(captured.replay, _reps_for(call_ms * calls, budget))
            return _stats([ms / calls for ms in replays], "cuda-graph")
    stats = _stats(_events_ms(fn, _reps_for(call_ms, budget)), method)
    stats.method += note
    return stats


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints start/stop lines on fd 2; keep the table readable."""
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes the call allocates above what was live before it (its outputs included).

    GPU: the caching allocator's peak. CPU: the largest running sum of the CPU allocator's
    allocations and frees that the profiler records during the call (every tensor, inside
    compiled ops too); None where the profiler cannot say."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    try:
        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def measure(
    fn: Callable[[], object],
    device: torch.device | str,
    *,
    quick: bool = True,
    graph: bool = False,
    memory: bool = True,
    budget: dict | None = None,
) -> Stats:
    """Time `fn()` (no arguments; rotate inputs inside it, see `cycle`) on `device`.

    Warm-up first (compilation, autotuning, allocator growth stay out of the numbers), then as
    many calls as fit `min_time_s` (at least `min_reps`). `graph=True` asks for CUDA-graph
    replay on a GPU. `memory=True` adds the peak memory of one more call."""
    device = torch.device(device)
    budget = budget or (QUICK if quick else FULL)
    if device.type == "cuda":
        stats = _time_cuda(fn, budget, graph)
    else:
        stats = _time_cpu(fn, budget)
    if memory and stats.reps > 1:
        stats.peak_bytes = peak_memory(fn, device)
    return stats


def interleaved(fns: dict[str, Callable[[], object]], quick: bool = True) -> dict[str, Stats]:
    """Wall-clock Stats per provider, timed in rounds of one call each, in a fresh random order
    every round: on a CPU a drift in memory bandwidth or load while a case runs then hits every
    provider alike, which back-to-back `measure` calls do not promise. (An order that only
    rotates keeps each provider behind the same one every round, and that alone moved a
    provider's median by 4-5% on a 2-core AMD EPYC: two copies of the same call, timed
    interleaved behind a plain read of other memory, differed by that much.)"""
    budget_s = 3.0 if quick else 15.0
    names = list(fns)
    order = random.Random(0)  # seeded: a rerun times the same sequence
    for _ in range(2):  # warm-up rounds (first-call allocations, primitive creation), untimed
        order.shuffle(names)
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < 5 or (time.perf_counter() - start < budget_s and rounds < 400):
        order.shuffle(names)
        for name in names:
            t0 = time.perf_counter_ns()
            fns[name]()
            times[name].append((time.perf_counter_ns() - t0) / 1e6)
        rounds += 1
    stats = {}
    for name, ms in times.items():
        q = statistics.quantiles(ms, n=10, method="inclusive")
        stats[name] = Stats(statistics.median(ms), q[1], q[7], len(ms), "wall-clock, interleaved")
    return stats


def machine_load() -> dict:
    """The load average and the percent of the last 10 s in which some runnable task waited for
    a CPU (Linux PSI): on a shared machine any other busy process makes a parallel region wait
    for a descheduled thread, so numbers are compared at low load."""
    pressure = None
    with contextlib.suppress(OSError, IndexError, ValueError):
        with open("/proc/pressure/cpu") as f:
            pressure = float(f.readline().split("avg10=")[1].split()[0])
    return {"load_average": os.getloadavg()[0], "cpu_pressure_avg10": pressure}


def gbs(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def cache_bytes(device: torch.device | str) -> int:
    """The last-level cache that repeated calls could be served from (GPU L2, CPU L3)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for level in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        with contextlib.suppress(OSError, ValueError):
            text = (level / "size").read_text().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=32 << 20)


def free_memory(device: torch.device | str) -> int:
    """Bytes that can still be allocated on `device` (host: MemAvailable, which counts the page
    cache the kernel can drop)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def rotation_copies(nbytes_per_set: int, device: torch.device | str, cap: int = 512) -> int:
    """How many copies of the inputs to rotate through so that together they span twice the
    last-level cache: each call then reads its operands from memory, as a model's layers do."""
    if nbytes_per_set <= 0:
        return 1
    return max(1, min(cap, math.ceil(2 * cache_bytes(device) / nbytes_per_set)))


def interleaved_copies(nbytes_per_call: int, providers: int, device: torch.device | str) -> tuple[int, int]:
    """(copies, stride) for `providers` timed by `interleaved` on shared input copies, provider p
    rotating from copy p * stride (see `cycle`): provider p reads the copy that provider p + 1
    read `stride` rounds before, so whatever order the rounds take, at least `stride - 1` whole
    rounds, twice the last-level cache of other copies, are read between two reads of one copy.
    (Rotating from the same copy, every provider but the first in a round reads what the first
    just brought into the cache.)"""
    stride = rotation_copies(nbytes_per_call, device) + 1
    return stride * providers, stride


def random_tensor(shape: tuple[int, ...], device, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    """Normal values times `scale` (never zeros: they hide unwritten outputs, and some units
    run faster on them). Large tensors repeat one random block of 4M values, which costs a
    copy instead of a random draw per element."""
    numel, block = math.prod(shape), 1 << 22
    tile = (torch.randn(min(numel, block), device=device, dtype=torch.float32) * scale).to(dtype)
    if numel <= block:
        return tile.view(shape)
    return tile.repeat(math.ceil(numel / block))[:numel].view(shape)


def matmul_rate(m: int, n: int, k: int, device: torch.device | str, dtype=torch.bfloat16, quick: bool = True) -> float:
    """TFLOP/s of a dense `[m, k] @ [k, n]` product in `dtype`."""
    device = torch.device(device)
    a, b = random_tensor((m, k), device, dtype), random_tensor((k, n), device, dtype)
    stats = measure(lambda: a @ b, device, quick=quick, memory=False)
    return tflops(2.0 * m * n * k, stats.median_ms)


def ceilings(device: torch.device | str, quick: bool = True, stream_bytes: int | None = None,
             dtype: torch.dtype = torch.bfloat16) -> dict:
    """The roofline of this machine, measured now (see the module docstring). The bandwidth
    probes stream `stream_bytes` (default: 4x the last-level cache, at least 512 MiB on a CPU
    in quick mode and 1 GiB otherwise); smaller values only suit smoke tests. The matmul rate is
    measured in `dtype`, the dtype of the run it judges (a CPU without AVX-512 computes bf16
    GEMMs some 50x slower than fp32 ones: one dtype's roof says nothing of the other's)."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    big = stream_bytes or max(4 * cache_bytes(device), (1 << 30) if gpu or not quick else 512 << 20)

    src = random_tensor((big // 2,), device, torch.bfloat16)
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device, quick=quick, memory=False)
    del src, dst

    cols = 8192
    w = random_tensor((big // 2 // cols, cols), device, torch.bfloat16)
    v = random_tensor((cols,), device, torch.bfloat16)
    gemv = measure(lambda: w @ v, device, quick=quick, memory=False)
    gemv_bytes = w.numel() * w.element_size()
    bits = w.view(torch.int16)  # an integer reduction: no float rules to slow it down
    read = measure(lambda: bits.max(), device, quick=quick, memory=False)
    del w, v, bits

    size = 8192 if gpu else (2048 if quick else 4096)
    result = {
        "copy_gbs": gbs(2 * big, copy.median_ms),
        "gemv_gbs": gbs(gemv_bytes, gemv.median_ms),
        "read_gbs": gbs(gemv_bytes, read.median_ms),
        "matmul_tflops": matmul_rate(size, size, size, device, dtype, quick=quick),
        "how": {
            "copy": f"copy of {big / 2**20:.0f} MiB bf16 (bytes read + written)",
            "gemv": f"bf16 [{gemv_bytes // 2 // cols}, {cols}] @ [{cols}] ({gemv_bytes / 2**20:.0f} MiB weight)",
            "read": f"int16 max over the same {gemv_bytes / 2**20:.0f} MiB",
            "matmul": f"{str(dtype).removeprefix('torch.')} {size}x{size}x{size} GEMM",
            "cache_bytes": cache_bytes(device),
        },
    }
    result["mem_gbs"] = max(result["copy_gbs"], result["gemv_gbs"], result["read_gbs"])
    return result


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _finteam_version() -> str | None:
    try:
        import finteam_kernels
    except ImportError:
        return None
    return finteam_kernels.__version__


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def environment(device: torch.device | str, packages: Sequence[str] = ()) -> dict:
    """Who measured what, where and when: the header of every results file."""
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "host": platform.node(),
        "cpu": _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cache_bytes": cache_bytes(device),
        "git_commit": _git_commit(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "finteam_kernels": _finteam_version(),
            **{name: _version(name) for name in ("triton", "transformers", "numpy", "matplotlib", *packages)},
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
        }
    return info


def slug(text: str) -> str:
    """A folder name: letters, digits, '.', '_' and single hyphens."""
    kept = "".join(c if c.isalnum() or c in "_." else "-" for c in text.lower())
    return "-".join(part for part in kept.split("-") if part)


def default_out_dir(device: torch.device | str, root: Path | str = Path(__file__).parent / "results") -> Path:
    """`benchmarks/results/<device>-<date>/`."""
    day = datetime.date.today().isoformat()
    return Path(root) / f"{slug(device_name(device))}-{day}"


def write_results(out_dir: Path | str, name: str, payload: dict) -> Path:
    """Write `payload` (environment, ceilings, rows...) as `<out_dir>/<name>.json`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


def plot_time_vs_tokens(rows: Sequence[dict], path: Path | str, title: str = "") -> Path | None:
    """One panel per (op, mode) and shape: median time against tokens, a line per provider,
    log-log, with the p20-p80 band. Rows need op, mode, shape, tokens, provider, median_ms,
    p20_ms, p80_ms. None when no panel has two token counts to draw a line through."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for row in rows:
        panels.setdefault((row["op"], row["mode"]), {}).setdefault(row["shape"], []).append(row)
    panels = {k: v for k, v in panels.items() if any(len({r["tokens"] for r in rs}) > 1 for rs in v.values())}
    if not panels:
        return None
    shapes = sorted({s for by_shape in panels.values() for s in by_shape})
    width = max(8.0, 3.2 * len(shapes))
    fig, axes = plt.subplots(
        len(panels), len(shapes), figsize=(width, 2.6 * len(panels)), squeeze=False, constrained_layout=True
    )
    providers = sorted({r["provider"] for r in rows})
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(providers)}
    for i, ((op, mode), by_shape) in enumerate(sorted(panels.items())):
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            cells = by_shape.get(shape, [])
            if len({r["tokens"] for r in cells}) < 2:
                ax.axis("off")
                continue
            for provider in providers:
                line = sorted((r for r in cells if r["provider"] == provider), key=lambda r: r["tokens"])
                if not line:
                    continue
                xs = [r["tokens"] for r in line]
                ax.plot(xs, [r["median_ms"] for r in line], marker="o", ms=3, label=provider, color=colors[provider])
                ax.fill_between(xs, [r["p20_ms"] for r in line], [r["p80_ms"] for r in line], alpha=0.2, color=colors[provider])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{op} {mode}\n{shape}", fontsize=8)
            ax.set_xlabel("tokens", fontsize=7)
            ax.set_ylabel("ms", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[p], marker="o", label=p) for p in providers]
    fig.legend(handles=handles, loc="outside lower center", ncol=max(1, min(len(providers), int(width / 1.7))), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


@functools.cache
def has_module(name: str) -> bool:
    """Whether `name` can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
