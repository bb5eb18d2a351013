"""KTransformers' CPU MoE kernels (`kt-kernel`) as a peer, run in a separate Python.

Shape legend: T tokens, H hidden, I expert intermediate, E experts, K top-k.

kt-kernel 0.7.2 pins torch 2.9.1, so it lives in its own virtual environment; its C++ extension
needs neither torch nor a GPU (only its Python wrapper does, for pinned buffers), so that
environment holds just the package and numpy:

    python3.11 -m venv /work/kt-venv
    /work/kt-venv/bin/pip install --no-deps kt-kernel==0.7.2 && /work/kt-venv/bin/pip install numpy

`KT_PYTHON` names another interpreter. The parent (`measure`) writes the weights and inputs as
.npy files to a temporary folder (bf16 as their raw 16 bits) and starts this file under that
interpreter (`child`), which loads the extension build for this CPU the way kt-kernel does
(AMX, else AVX512-BF16, else AVX2; `KT_KERNEL_CPU_VARIANT` overrides), builds its bf16 MoE
(`AMXBF16_MOE` where the build has it, else `AVX2BF16_MOE`) on a `CPUInfer` worker pool of the
given thread count, lets it pack the weights (not timed), and times `forward_task` submitted and
synced, one call per repeat, rotating as many weight copies as the parent asks (so that, as for
our kernels, weights come from memory rather than cache). It returns the median, p20 and p80
in ms per token count, and its outputs for the first call, which the parent checks against ours.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

DEFAULT_PYTHON = "/work/kt-venv/bin/python"


def python() -> str | None:
    """The interpreter that has kt-kernel, or None."""
    exe = os.environ.get("KT_PYTHON", DEFAULT_PYTHON)
    return exe if shutil.which(exe) or os.path.exists(exe) else None


def why_unusable() -> str | None:
    """None when kt-kernel can run here, else why not (the benchmark lists it as skipped)."""
    exe = python()
    if exe is None:
        return f"kt-kernel's environment not found ({os.environ.get('KT_PYTHON', DEFAULT_PYTHON)}; see benchmarks/kt_peer.py)"
    probe = subprocess.run([exe, __file__, "--probe"], capture_output=True, text=True, timeout=120, check=False)
    if probe.returncode != 0:
        return f"kt-kernel does not load: {(probe.stderr or probe.stdout).strip().splitlines()[-1:]}"
    return None


def measure(w_gate_up_E2IH, w_down_EHI, cases: list[tuple], threads: int, copies: int, budget_s: float) -> dict:
    """Times kt-kernel's forward on our weights (torch bf16) and `cases`, a list of
    (T, x_TH bf16, ids_TK, weights_TK): {T: {"median_ms", "p20_ms", "p80_ms", "reps", "out"}} plus
    "variant" and "kernel"."""
    import numpy as np
    import torch

    E, two_I, H = w_gate_up_E2IH.shape
    I = two_I // 2
    K = cases[0][2].shape[1]
    with tempfile.TemporaryDirectory(prefix="kt-peer-") as tmp:
        def save(name, t):
            t = t.contiguous()
            array = t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            np.save(os.path.join(tmp, name + ".npy"), array)

        save("gate", w_gate_up_E2IH[:, :I])
        save("up", w_gate_up_E2IH[:, I:])
        save("down", w_down_EHI)
        for T, x_TH, ids_TK, weights_TK in cases:
            save(f"x_{T}", x_TH)
            save(f"ids_{T}", ids_TK.to(torch.int64))
            save(f"weights_{T}", weights_TK.to(torch.float32))
        spec = {"E": E, "K": K, "H": H, "I": I, "tokens": [c[0] for c in cases], "threads": threads,
                "copies": copies, "budget_s": budget_s, "dir": tmp}
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        done = subprocess.run([python(), __file__, tmp], capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"kt-kernel child failed: {done.stderr.strip()[-2000:]}")
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
        for T in spec["tokens"]:
            out = np.load(os.path.join(tmp, f"out_{T}.npy"))
            result[str(T)]["out"] = torch.from_numpy(out).view(torch.bfloat16).view(T, H)
    return result


# --- the child: runs under kt-kernel's interpreter, imports no torch ---


def _variant() -> str:
    wanted = os.environ.get("KT_KERNEL_CPU_VARIANT")
    if wanted:
        return wanted
    with open("/proc/cpuinfo") as f:
        flags = set(next((line for line in f if line.startswith("flags")), "").split())
    if {"amx_bf16", "amx_tile"} <= flags:
        return "amx"
    if "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx2"


def _load_extension():
    """kt-kernel's C++ extension for this CPU, without its Python package (which imports torch)."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kt_kernel is not installed in this environment")
    folder = next(iter(spec.submodule_search_locations))
    variant = _variant()
    files = glob.glob(os.path.join(folder, f"_kt_kernel_ext_{variant}.*.so"))
    if not files:
        raise ImportError(f"kt-kernel has no {variant} build in {folder}")
    ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", files[0])
    ext = importlib.util.module_from_spec(ext_spec)
    ext_spec.loader.exec_module(ext)
    return ext, variant


def _child(folder: str) -> None:
    import numpy as np

    ext, variant = _load_extension()
    with open(os.path.join(folder, "spec.json")) as f:
        spec = json.load(f)
    E, K, H, I, threads = spec["E"], spec["K"], spec["H"], spec["I"], spec["threads"]
    max_T = max(spec["tokens"])
    config = ext.WorkerPoolConfig()
    config.subpool_count = 1
    config.subpool_numa_map = [0]
    config.subpool_thread_count = [threads]
    cpu_infer = ext.CPUInfer(config)
    kernel_cls = getattr(ext.moe, "AMXBF16_MOE", None) or ext.moe.AVX2BF16_MOE

    gate, up, down = (np.load(os.path.join(folder, f"{n}.npy")) for n in ("gate", "up", "down"))
    gpu_mask = np.zeros(E, dtype=np.bool_)  # no expert on a GPU
    physical_to_logical = np.arange(E, dtype=np.int64)
    kernels, keep = [], []
    for _ in range(spec["copies"]):
        # Each copy has its own weight memory (kt packs it again into its own layout).
        g, u, d = (np.ascontiguousarray(a.copy()) for a in (gate, up, down))
        keep.append((g, u, d))
        moe_config = ext.moe.MOEConfig(E, K, H, I, gpu_mask.ctypes.data)
        moe_config.layer_idx = 0
        moe_config.pool = cpu_infer.backend_
        moe_config.max_len = max_T
        moe_config.gate_projs = [[g[e].ctypes.data for e in range(E)]]
        moe_config.up_projs = [[u[e].ctypes.data for e in range(E)]]
        moe_config.down_projs = [[d[e].ctypes.data for e in range(E)]]
        moe_config.gate_scales = [[0] * E]
        moe_config.up_scales = [[0] * E]
        moe_config.down_scales = [[0] * E]
        kernel = kernel_cls(moe_config)
        cpu_infer.submit(kernel.load_weights_task(physical_to_logical.ctypes.data))
        cpu_infer.sync()
        kernels.append((kernel, moe_config))
    keep.append(gpu_mask)

    result = {"variant": variant, "kernel": kernel_cls.__name__, "threads": threads}
    for T in spec["tokens"]:
        x = np.load(os.path.join(folder, f"x_{T}.npy"))
        ids = np.ascontiguousarray(np.load(os.path.join(folder, f"ids_{T}.npy")))
        weights = np.ascontiguousarray(np.load(os.path.join(folder, f"weights_{T}.npy")))
        out = np.zeros((T, H), dtype=np.int16)
        bsz = np.array([T], dtype=np.int32)

        def call(kernel, bsz=bsz, ids=ids, weights=weights, x=x, out=out):
            cpu_infer.submit(kernel.forward_task(bsz.ctypes.data, K, ids.ctypes.data, weights.ctypes.data,
                                                 x.ctypes.data, out.ctypes.data, False))
            cpu_infer.sync()

        call(kernels[0][0])
        np.save(os.path.join(folder, f"out_{T}.npy"), out.copy())
        for kernel, _ in kernels:  # warm-up: one call per copy
            call(kernel)
        times, start, turn = [], time.perf_counter(), 0
        while len(times) < 5 or (time.perf_counter() - start < spec["budget_s"] and len(times) < 2000):
            t0 = time.perf_counter_ns()
            call(kernels[turn % len(kernels)][0])
            times.append((time.perf_counter_ns() - t0) / 1e6)
            turn += 1
        times.sort()
        q20, q50, q80 = (times[round(q * (len(times) - 1))] for q in (0.2, 0.5, 0.8))
        result[str(T)] = {"median_ms": q50, "p20_ms": q20, "p80_ms": q80, "reps": len(times)}
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if sys.argv[1:] == ["--probe"]:
        ext, variant = _load_extension()
        print(variant, getattr(ext.moe, "AMXBF16_MOE", None) or ext.moe.AVX2BF16_MOE)
    else:
        _child(sys.argv[1])
